//! `lapic_`: local APIC identity, mode and in-service/request state.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::fixture::{count, settle, wait_count};
use crate::display::dec;
use crate::interrupts::{self, eoi_now};
use crate::lapic::{self, Delivery, Dest};
use crate::runner::{Test, TestResult};
use crate::{check, cpu, multiboot, percpu, smp};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("lapic_mode_matches_cpuid", mode_matches_cpuid),
    Test::new("lapic_version_register", version_register),
    Test::new("lapic_ids_match_cpuid_in_index_order", ids_in_order),
    Test::new("lapic_logical_ids_flat_or_cluster", logical_ids),
    Test::new("lapic_svr_enabled_spurious_vector", svr_enabled),
    Test::new(
        "lapic_isr_set_in_handler_cleared_by_eoi",
        isr_set_in_handler,
    ),
    Test::new(
        "lapic_irr_holds_interrupt_while_disabled",
        irr_holds_while_disabled,
    ),
    Test::new("lapic_higher_vector_delivered_first", higher_vector_first),
    Test::new("lapic_nested_interrupt_in_handler", nested_in_handler),
    Test::new("lapic_interrupt_preserves_red_zone", red_zone_preserved),
];

fn apic_base_on(cpu: usize) -> Result<u64, crate::runner::Failure> {
    Ok(smp::run_on(cpu, |_| lapic::apic_base() as usize, 0)? as u64)
}

fn mode_matches_cpuid() -> TestResult {
    let forced_off = multiboot::option("x2apic") == Some("off");
    let want_x2 = lapic::cpuid_has_x2apic() && !forced_off;
    check!(
        lapic::x2apic() == want_x2,
        "x2APIC mode {} but CPUID says {}",
        crate::display::dec(lapic::x2apic()),
        crate::display::dec(want_x2)
    );
    for c in 0..percpu::count() {
        let base = apic_base_on(c)?;
        check!(
            base & lapic::APIC_BASE_EN != 0,
            "cpu {}: APIC_BASE {} not enabled",
            crate::display::dec(c),
            crate::display::hex(base)
        );
        check!(
            (base & lapic::APIC_BASE_EXTD != 0) == want_x2,
            "cpu {}: APIC_BASE {} EXTD != {}",
            crate::display::dec(c),
            crate::display::hex(base),
            crate::display::dec(want_x2)
        );
        check!(
            (base & lapic::APIC_BASE_BSP != 0) == (c == 0),
            "cpu {}: APIC_BASE {} BSP flag wrong",
            crate::display::dec(c),
            crate::display::hex(base)
        );
        check!(
            base & 0xffff_f000 == 0xfee0_0000,
            "cpu {}: APIC base address {}",
            crate::display::dec(c),
            crate::display::hex(base)
        );
    }
    Ok(())
}

fn version_register() -> TestResult {
    for c in 0..percpu::count() {
        let v = smp::run_on(c, |_| lapic::read(lapic::REG_VERSION) as usize, 0)? as u32;
        let (version, max_lvt) = (v & 0xff, (v >> 16) & 0xff);
        check!(
            (0x10..=0x15).contains(&version),
            "cpu {}: version {} is not an integrated APIC",
            crate::display::dec(c),
            crate::display::hex(version)
        );
        check!(
            max_lvt >= 4,
            "cpu {}: max LVT entry {} < 4",
            crate::display::dec(c),
            crate::display::dec(max_lvt)
        );
    }
    Ok(())
}

fn ids_in_order() -> TestResult {
    let expected = super::expected_cpus();
    check!(
        percpu::count() == expected,
        "{} CPUs online, fw_cfg announced {}",
        crate::display::dec(percpu::count()),
        crate::display::dec(expected)
    );
    for c in 0..percpu::count() {
        let packed = smp::run_on(
            c,
            |_| ((lapic::id() as usize) << 32) | cpu::cpuid_apic_id() as usize,
            0,
        )?;
        let (id, cpuid_id) = ((packed >> 32) as u32, packed as u32);
        let recorded = percpu::cpu(c).apic_id();
        check!(
            id == recorded && cpuid_id == recorded,
            "cpu {}: APIC ID {}, CPUID {}, recorded {}",
            crate::display::dec(c),
            crate::display::dec(id),
            crate::display::dec(cpuid_id),
            crate::display::dec(recorded)
        );
        if c > 0 {
            let prev = percpu::cpu(c - 1).apic_id();
            check!(
                prev < recorded,
                "cpu {}: APIC ID {} not above cpu {}'s {}",
                crate::display::dec(c),
                crate::display::dec(recorded),
                crate::display::dec(c - 1),
                crate::display::dec(prev)
            );
        }
    }
    Ok(())
}

fn logical_ids() -> TestResult {
    for c in 0..percpu::count() {
        let ldr = smp::run_on(c, |_| lapic::read(lapic::REG_LDR) as usize, 0)? as u32;
        let recorded = percpu::cpu(c).logical_id();
        if lapic::x2apic() {
            let id = percpu::cpu(c).apic_id();
            let want = ((id >> 4) << 16) | (1 << (id & 0xf));
            check!(
                ldr == want && recorded == want,
                "cpu {}: x2APIC LDR {}, recorded {}, want {}",
                crate::display::dec(c),
                crate::display::hex(ldr),
                crate::display::hex(recorded),
                crate::display::hex(want)
            );
        } else {
            // Flat up to 8 processors, the cluster model above.
            let dfr = smp::run_on(c, |_| lapic::read(lapic::REG_DFR) as usize, 0)? as u32;
            let model = if lapic::xapic_cluster() { 0 } else { 0xf };
            check!(
                dfr >> 28 == model,
                "cpu {}: DFR {}, want model {}",
                crate::display::dec(c),
                crate::display::hex(dfr),
                crate::display::hex(model)
            );
            let want = lapic::xapic_logical_id(c);
            check!(
                ldr >> 24 == want && recorded == want,
                "cpu {}: LDR {}, want logical ID {}",
                crate::display::dec(c),
                crate::display::hex(ldr),
                crate::display::hex(want)
            );
        }
    }
    Ok(())
}

fn svr_enabled() -> TestResult {
    for c in 0..percpu::count() {
        let svr = smp::run_on(c, |_| lapic::read(lapic::REG_SVR) as usize, 0)? as u32;
        check!(
            svr & 0x1ff == 0x1ff,
            "cpu {}: SVR {}, want enabled with vector 0xff",
            crate::display::dec(c),
            crate::display::hex(svr)
        );
    }
    Ok(())
}

static ISR_BEFORE: AtomicU32 = AtomicU32::new(0);
static ISR_AFTER: AtomicU32 = AtomicU32::new(0);

fn isr_probe(vector: u8) {
    ISR_BEFORE.store(u32::from(lapic::in_service(vector)), Ordering::Relaxed);
    eoi_now();
    ISR_AFTER.store(u32::from(lapic::in_service(vector)), Ordering::Relaxed);
}

fn isr_set_in_handler() -> TestResult {
    super::fixture::need_isr_held()?;
    const V: u8 = 0xc1;
    ISR_BEFORE.store(9, Ordering::Relaxed);
    ISR_AFTER.store(9, Ordering::Relaxed);
    interrupts::set_handler(V, Some(isr_probe));
    lapic::send_ipi(V, Delivery::Fixed, Dest::SelfOnly);
    wait_count(0, V, 1)?;
    let (before, after) = (
        ISR_BEFORE.load(Ordering::Relaxed),
        ISR_AFTER.load(Ordering::Relaxed),
    );
    check!(
        before == 1,
        "ISR bit of {V} not set in its handler ({})",
        crate::display::dec(before),
        V = crate::display::hex(V)
    );
    check!(
        after == 0,
        "ISR bit of {V} still set after EOI ({})",
        crate::display::dec(after),
        V = crate::display::hex(V)
    );
    check!(
        !lapic::in_service(V),
        "ISR bit of {V} set after the handler",
        V = crate::display::hex(V)
    );
    Ok(())
}

fn irr_holds_while_disabled() -> TestResult {
    const V: u8 = 0xc2;
    cpu::cli();
    lapic::send_ipi(V, Delivery::Fixed, Dest::SelfOnly);
    let pending = lapic::requested(V);
    let taken = count(0, V);
    cpu::sti();
    check!(
        pending,
        "IRR bit of {V} not set while interrupts are disabled",
        V = crate::display::hex(V)
    );
    check!(
        taken == 0,
        "vector {V} taken with IF=0",
        V = crate::display::hex(V)
    );
    wait_count(0, V, 1)?;
    settle();
    check!(
        count(0, V) == 1,
        "vector {V} taken {} times",
        crate::display::dec(count(0, V)),
        V = crate::display::hex(V)
    );
    check!(
        !lapic::requested(V),
        "IRR bit of {V} still set after delivery",
        V = crate::display::hex(V)
    );
    Ok(())
}

static ORDER: [AtomicU32; 4] = [const { AtomicU32::new(0) }; 4];
static ORDER_LEN: AtomicUsize = AtomicUsize::new(0);

fn record_order(vector: u8) {
    let i = ORDER_LEN.fetch_add(1, Ordering::AcqRel);
    if let Some(slot) = ORDER.get(i) {
        slot.store(u32::from(vector), Ordering::Relaxed);
    }
}

fn higher_vector_first() -> TestResult {
    const VS: [u8; 3] = [0xc3, 0xd3, 0xe3];
    ORDER_LEN.store(0, Ordering::Relaxed);
    for v in VS {
        interrupts::set_handler(v, Some(record_order));
    }
    cpu::cli();
    for v in VS {
        lapic::send_ipi(v, Delivery::Fixed, Dest::SelfOnly);
    }
    cpu::sti();
    wait_count(0, VS[0], 1)?;
    settle();
    let n = ORDER_LEN.load(Ordering::Acquire);
    let got = [
        ORDER[0].load(Ordering::Relaxed),
        ORDER[1].load(Ordering::Relaxed),
        ORDER[2].load(Ordering::Relaxed),
    ];
    check!(
        n == 3,
        "{} interrupts taken, expected 3",
        crate::display::dec(n)
    );
    check!(
        got == [0xe3, 0xd3, 0xc3],
        "delivery order {}, expected [0xe3, 0xd3, 0xc3]",
        crate::display::Vectors(&got)
    );
    Ok(())
}

static OUTER_ACTIVE: AtomicU32 = AtomicU32::new(0);
static INNER_SAW_OUTER: AtomicU32 = AtomicU32::new(0);
static INNER_TAKEN_IN_OUTER: AtomicU32 = AtomicU32::new(0);

fn outer(_: u8) {
    OUTER_ACTIVE.store(1, Ordering::SeqCst);
    lapic::send_ipi(0xd4, Delivery::Fixed, Dest::SelfOnly);
    cpu::sti();
    crate::time::wait_until(super::fixture::TIMEOUT_US, || count(0, 0xd4) >= 1);
    cpu::cli();
    INNER_TAKEN_IN_OUTER.store(count(0, 0xd4), Ordering::SeqCst);
    OUTER_ACTIVE.store(0, Ordering::SeqCst);
}

fn inner(_: u8) {
    INNER_SAW_OUTER.store(OUTER_ACTIVE.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// A handler that enables interrupts takes a higher vector nested on its
/// own stack (IST1 is free again once the entry stub left it) and resumes.
fn nested_in_handler() -> TestResult {
    OUTER_ACTIVE.store(0, Ordering::SeqCst);
    INNER_SAW_OUTER.store(0, Ordering::SeqCst);
    INNER_TAKEN_IN_OUTER.store(0, Ordering::SeqCst);
    interrupts::set_handler(0xc4, Some(outer));
    interrupts::set_handler(0xd4, Some(inner));
    lapic::send_ipi(0xc4, Delivery::Fixed, Dest::SelfOnly);
    wait_count(0, 0xc4, 1)?;
    settle();
    check!(
        INNER_SAW_OUTER.load(Ordering::SeqCst) == 1,
        "inner interrupt did not run inside the outer handler"
    );
    check!(
        INNER_TAKEN_IN_OUTER.load(Ordering::SeqCst) == 1,
        "inner interrupt not taken while the outer handler waited"
    );
    check!(
        count(0, 0xc4) == 1 && count(0, 0xd4) == 1,
        "counts {} and {}",
        dec(count(0, 0xc4)),
        dec(count(0, 0xd4))
    );
    Ok(())
}

/// Fills the 128-byte red zone below RSP, lets a pending interrupt in, and
/// checks the red zone afterwards: the entry stub must not push below the
/// interrupted RSP (the prebuilt `core` may keep data there).
fn red_zone_preserved() -> TestResult {
    const V: u8 = 0xc5;
    cpu::cli();
    lapic::send_ipi(V, Delivery::Fixed, Dest::SelfOnly);
    let bad: u64;
    // SAFETY: writes only the 128 bytes below RSP, which no code of ours
    // uses (no-redzone) and which the interrupt entry must leave alone; the
    // asm takes the pending interrupt in `sti; hlt` and disables them again.
    unsafe {
        core::arch::asm!(
            "mov rax, 0x5a5a5a5a00000000",
            "mov rcx, 16",
            "2:",
            "mov rdx, rax",
            "or rdx, rcx",
            "mov [rsp + rcx * 8 - 136], rdx",
            "dec rcx",
            "jnz 2b",
            "sti",
            "hlt",
            "cli",
            "xor {bad}, {bad}",
            "mov rcx, 16",
            "3:",
            "mov rdx, rax",
            "or rdx, rcx",
            "cmp [rsp + rcx * 8 - 136], rdx",
            "je 4f",
            "inc {bad}",
            "4:",
            "dec rcx",
            "jnz 3b",
            bad = out(reg) bad,
            out("rax") _,
            out("rcx") _,
            out("rdx") _,
        );
    }
    cpu::sti();
    wait_count(0, V, 1)?;
    check!(
        bad == 0,
        "{} of 16 red-zone qwords clobbered by the interrupt",
        dec(bad)
    );
    Ok(())
}
