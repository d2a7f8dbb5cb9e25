//! `ioapic_`: register rules and delivery through the IOAPIC, lines driven
//! by the pc-testdev ports.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use super::fixture::{
    PIN_A, PIN_B, PIN_C, apic_id, count, expect_counts, in_set, ioapic_logical_dest, need_cpus,
    need_isr_held, settle, target_set, total, wait_count, wait_total,
};
use crate::interrupts;
use crate::ioapic::{self, RTE_DELIVERY_STATUS, RTE_DEST_SHIFT, RTE_LEVEL, RTE_REMOTE_IRR, Rte};
use crate::runner::{Test, TestResult};
use crate::{check, fail, lapic, lines, percpu, skip, smp};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("ioapic_id_only_bits_24_27_writable", id_register),
    Test::new("ioapic_version_read_only_24_pins", version_register),
    Test::new("ioapic_arbitration_id_read_only", arbitration_id),
    Test::new("ioapic_rte_round_trip_read_only_bits", rte_round_trip),
    Test::new("ioapic_edge_delivers_once", edge_once),
    Test::new("ioapic_edge_each_pulse_delivered", edge_pulses),
    Test::new("ioapic_level_delivers_once_remote_irr_cleared", level_once),
    Test::new(
        "ioapic_level_coalesces_while_remote_irr_set",
        level_coalesced,
    ),
    Test::new("ioapic_level_sequential_rounds", level_sequential),
    Test::new(
        "ioapic_level_redelivered_after_eoi_while_asserted",
        level_redelivered,
    ),
    Test::new("ioapic_masked_edge_is_lost", masked_edge_lost),
    Test::new(
        "ioapic_masked_level_fires_on_unmask",
        masked_level_fires_on_unmask,
    ),
    Test::new("ioapic_tmr_set_for_level_clear_for_edge", tmr_level_edge),
    Test::new("ioapic_remote_irr_survives_rte_write", remote_irr_read_only),
    Test::new("ioapic_physical_destination_cpu1", physical_cpu1),
    Test::new("ioapic_logical_flat_destination_set", logical_set),
    Test::new(
        "ioapic_lowest_priority_stays_in_set",
        lowest_priority_in_set,
    ),
    Test::new(
        "ioapic_retarget_while_remote_irr_set",
        retarget_while_pending,
    ),
    Test::new(
        "ioapic_level_to_edge_clears_remote_irr",
        level_to_edge_while_pending,
    ),
    Test::new("ioapic_handler_retargets_own_pin", handler_retargets),
    Test::new(
        "ioapic_handler_switches_own_pin_to_edge",
        handler_switches_to_edge,
    ),
    Test::new("ioapic_eoi_register_clears_remote_irr", eoi_register),
];

fn bsp() -> u8 {
    apic_id(0) as u8
}

// ---- register rules ----

fn id_register() -> TestResult {
    let orig = ioapic::read(ioapic::REG_ID);
    ioapic::write(ioapic::REG_ID, 0xffff_ffff);
    let all = ioapic::read(ioapic::REG_ID);
    ioapic::write(ioapic::REG_ID, 0x0500_0000);
    let five = ioapic::read(ioapic::REG_ID);
    ioapic::write(ioapic::REG_ID, orig);
    check!(
        all == 0x0f00_0000,
        "ID after writing all ones: {}, expected 0x0f000000",
        crate::display::hex(all)
    );
    check!(
        five == 0x0500_0000,
        "ID after writing 0x05000000: {}",
        crate::display::hex(five)
    );
    check!(ioapic::read(ioapic::REG_ID) == orig, "ID not restored");
    Ok(())
}

/// Accepts version 0x11 (82093AA; KVM's in-kernel IOAPIC) or 0x20 (ICH;
/// QEMU's and our IOAPIC): both are real IOAPICs. `ioapic_eoi_register_`
/// checks that a 0x20 part also has the EOI register.
fn version_register() -> TestResult {
    let v = ioapic::read(ioapic::REG_VERSION);
    let (version, max) = (v & 0xff, (v >> 16) & 0xff);
    check!(
        version == 0x20 || version == 0x11,
        "version {}, expected 0x20 (or 0x11 for an 82093AA)",
        crate::display::hex(version)
    );
    check!(
        max == 23,
        "max redirection entry {}, expected 23",
        crate::display::dec(max)
    );
    ioapic::write(ioapic::REG_VERSION, 0);
    let after_zero = ioapic::read(ioapic::REG_VERSION);
    ioapic::write(ioapic::REG_VERSION, 0xffff_ffff);
    let after_ones = ioapic::read(ioapic::REG_VERSION);
    check!(
        after_zero == v && after_ones == v,
        "version register changed by writes: {}, {}",
        crate::display::hex(after_zero),
        crate::display::hex(after_ones)
    );
    Ok(())
}

fn arbitration_id() -> TestResult {
    let orig_id = ioapic::read(ioapic::REG_ID);
    let orig_arb = ioapic::read(ioapic::REG_ARB);
    ioapic::write(ioapic::REG_ARB, 0x0a00_0000);
    let arb = ioapic::read(ioapic::REG_ARB);
    let id = ioapic::read(ioapic::REG_ID);
    check!(
        arb == orig_arb && id == orig_id,
        "write to arbitration changed it: arb {} (was {}), id {}",
        crate::display::hex(arb),
        crate::display::hex(orig_arb),
        crate::display::hex(id)
    );
    check!(
        arb & !0x0f00_0000 == 0,
        "arbitration {} has bits outside 24..27",
        crate::display::hex(arb)
    );
    Ok(())
}

fn rte_round_trip() -> TestResult {
    let pin = PIN_C;
    let value = 0x3au64
        | (ioapic::DELIVERY_LOWEST << ioapic::RTE_DELIVERY_SHIFT)
        | ioapic::RTE_DEST_LOGICAL
        | ioapic::RTE_MASKED
        | (0xa5u64 << RTE_DEST_SHIFT);
    ioapic::write_rte(pin, value | RTE_DELIVERY_STATUS | RTE_REMOTE_IRR);
    let edge = ioapic::read_rte(pin);
    ioapic::write_rte(
        pin,
        value | RTE_LEVEL | RTE_DELIVERY_STATUS | RTE_REMOTE_IRR,
    );
    let level = ioapic::read_rte(pin);
    ioapic::mask(pin);
    let defined = 0x1_ffffu64 | (0xffu64 << RTE_DEST_SHIFT);
    check!(
        edge & defined == value,
        "edge RTE read back {}, wrote {} (+ read-only bits)",
        crate::display::hex(edge),
        crate::display::hex(value)
    );
    check!(
        level & defined == value | RTE_LEVEL,
        "level RTE read back {}, wrote {}",
        crate::display::hex(level),
        crate::display::hex(value | RTE_LEVEL)
    );
    Ok(())
}

// ---- edge ----

fn edge_once() -> TestResult {
    const V: u8 = 0x31;
    ioapic::write_rte(PIN_A, Rte::new(V, bsp()).0);
    lines::pulse(PIN_A);
    wait_count(0, V, 1)?;
    settle();
    expect_counts(V, |c| u32::from(c == 0))?;
    let rte = ioapic::read_rte(PIN_A);
    check!(
        rte & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS) == 0,
        "edge RTE {} has remote IRR / delivery status",
        crate::display::hex(rte)
    );
    Ok(())
}

fn edge_pulses() -> TestResult {
    const V: u8 = 0x32;
    const N: u32 = 20;
    ioapic::write_rte(PIN_A, Rte::new(V, bsp()).0);
    for i in 1..=N {
        lines::pulse(PIN_A);
        wait_count(0, V, i)?;
    }
    settle();
    check!(
        count(0, V) == N,
        "{} interrupts for {N} pulses",
        crate::display::dec(count(0, V)),
        N = crate::display::dec(N)
    );
    Ok(())
}

// ---- level: one handler, configured per test ----

/// Pin the level handler lowers.
static LEVEL_PIN: AtomicU8 = AtomicU8::new(0);
/// Deliveries the handler lets pass before it lowers the line.
static HOLD: AtomicU32 = AtomicU32::new(0);
/// RTE as the handler saw it on its first call.
static RTE_IN_ISR: AtomicU64 = AtomicU64::new(0);
/// TMR bit of the vector as the handler saw it.
static TMR_IN_ISR: AtomicBool = AtomicBool::new(false);
static CALLS: AtomicU32 = AtomicU32::new(0);

fn arm_level(pin: u8, hold: u32) {
    LEVEL_PIN.store(pin, Ordering::Relaxed);
    HOLD.store(hold, Ordering::Relaxed);
    RTE_IN_ISR.store(0, Ordering::Relaxed);
    CALLS.store(0, Ordering::Relaxed);
}

fn level_handler(vector: u8) {
    let pin = LEVEL_PIN.load(Ordering::Relaxed);
    if CALLS.fetch_add(1, Ordering::Relaxed) == 0 {
        RTE_IN_ISR.store(ioapic::read_rte(pin), Ordering::Relaxed);
        TMR_IN_ISR.store(lapic::level_triggered(vector), Ordering::Relaxed);
    }
    if HOLD.load(Ordering::Relaxed) > 0 {
        HOLD.fetch_sub(1, Ordering::Relaxed);
    } else {
        lines::set(pin, false);
    }
}

/// With interrupts off, asserts pin `pin` (level, vector `v`, to the BSP)
/// and waits until the IOAPIC has sent it (remote IRR set, IRR bit set), so
/// the rest of a test acts while the interrupt is pending but not taken.
/// Returns the RTE seen. Interrupts stay off.
fn assert_pending(pin: u8, v: u8) -> u64 {
    crate::cpu::cli();
    lines::set(pin, true);
    let mut rte = 0;
    crate::time::wait_until(super::fixture::TIMEOUT_US, || {
        rte = ioapic::read_rte(pin);
        rte & RTE_REMOTE_IRR != 0 && lapic::requested(v)
    });
    rte
}

/// Level delivery, one assertion: remote IRR is set once the message is sent
/// and stays set until the EOI, the line dropped before the EOI gives exactly
/// one interrupt, and the EOI clears remote IRR. The line is lowered before
/// the interrupt is taken, so hosts that EOI at injection give the same result.
fn level_once() -> TestResult {
    const V: u8 = 0x33;
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().0);
    let rte = assert_pending(PIN_B, V);
    let pending = lapic::requested(V);
    lines::set(PIN_B, false);
    let still = ioapic::read_rte(PIN_B);
    crate::cpu::sti();
    check!(
        rte & RTE_REMOTE_IRR != 0,
        "remote IRR not set after delivery (RTE {})",
        crate::display::hex(rte)
    );
    check!(pending, "vector not pending in the LAPIC IRR");
    check!(
        still & RTE_REMOTE_IRR != 0,
        "remote IRR cleared by dropping the line (RTE {})",
        crate::display::hex(still)
    );
    wait_count(0, V, 1)?;
    settle();
    expect_counts(V, |c| u32::from(c == 0))?;
    let after = ioapic::read_rte(PIN_B);
    check!(
        after & RTE_REMOTE_IRR == 0,
        "remote IRR still set after EOI (RTE {})",
        crate::display::hex(after)
    );
    Ok(())
}

fn level_coalesced() -> TestResult {
    const V: u8 = 0x34;
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().0);
    let rte = assert_pending(PIN_B, V);
    for _ in 0..5 {
        lines::set(PIN_B, false);
        lines::set(PIN_B, true);
    }
    lines::set(PIN_B, false);
    crate::cpu::sti();
    check!(
        rte & RTE_REMOTE_IRR != 0,
        "remote IRR not set once delivered (RTE {})",
        crate::display::hex(rte)
    );
    wait_count(0, V, 1)?;
    settle();
    check!(
        count(0, V) == 1,
        "{} interrupts for re-assertions while remote IRR was set",
        crate::display::dec(count(0, V))
    );
    Ok(())
}

fn level_sequential() -> TestResult {
    const V: u8 = 0x35;
    const N: u32 = 30;
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().0);
    for i in 1..=N {
        assert_pending(PIN_B, V);
        lines::set(PIN_B, false);
        crate::cpu::sti();
        wait_count(0, V, i)?;
    }
    settle();
    check!(
        count(0, V) == N,
        "{} interrupts for {N} assertions",
        crate::display::dec(count(0, V)),
        N = crate::display::dec(N)
    );
    let after = ioapic::read_rte(PIN_B);
    check!(
        after & RTE_REMOTE_IRR == 0,
        "remote IRR still set (RTE {})",
        crate::display::hex(after)
    );
    Ok(())
}

fn level_redelivered() -> TestResult {
    need_isr_held()?;
    const V: u8 = 0x36;
    arm_level(PIN_B, 3);
    interrupts::set_handler(V, Some(level_handler));
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().0);
    lines::set(PIN_B, true);
    wait_count(0, V, 4)?;
    settle();
    check!(
        count(0, V) == 4,
        "{} deliveries, expected 4 (3 EOIs with the line high, then lowered)",
        crate::display::dec(count(0, V))
    );
    let after = ioapic::read_rte(PIN_B);
    check!(
        after & RTE_REMOTE_IRR == 0,
        "remote IRR still set (RTE {})",
        crate::display::hex(after)
    );
    Ok(())
}

fn masked_edge_lost() -> TestResult {
    const V: u8 = 0x37;
    ioapic::write_rte(PIN_A, Rte::new(V, bsp()).masked().0);
    lines::pulse(PIN_A);
    settle();
    ioapic::write_rte(PIN_A, Rte::new(V, bsp()).0);
    settle();
    check!(
        total(V) == 0,
        "masked edge delivered {} times",
        crate::display::dec(total(V))
    );
    lines::pulse(PIN_A);
    wait_count(0, V, 1)?;
    Ok(())
}

fn masked_level_fires_on_unmask() -> TestResult {
    const V: u8 = 0x38;
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().masked().0);
    lines::set(PIN_B, true);
    settle();
    check!(
        total(V) == 0,
        "masked level pin delivered {} times",
        crate::display::dec(total(V))
    );
    crate::cpu::cli();
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().0);
    let sent = crate::time::wait_until(super::fixture::TIMEOUT_US, || lapic::requested(V));
    lines::set(PIN_B, false);
    crate::cpu::sti();
    if !sent {
        crate::cpu::sti();
        settle();
        match super::fixture::stray_vector(0, V) {
            Some(other) => fail!(
                "unmasking sent vector {} instead of {} (stale route)",
                crate::display::hex(other),
                crate::display::hex(V)
            ),
            None => fail!("unmasking an asserted level pin sent nothing"),
        }
    }
    wait_count(0, V, 1)?;
    settle();
    check!(
        count(0, V) == 1,
        "{} deliveries after unmask",
        crate::display::dec(count(0, V))
    );
    Ok(())
}

static EDGE_TMR: AtomicBool = AtomicBool::new(true);

fn edge_tmr_probe(vector: u8) {
    EDGE_TMR.store(lapic::level_triggered(vector), Ordering::Relaxed);
}

fn tmr_level_edge() -> TestResult {
    const VL: u8 = 0x39;
    const VE: u8 = 0x3a;
    arm_level(PIN_B, 0);
    TMR_IN_ISR.store(false, Ordering::Relaxed);
    EDGE_TMR.store(true, Ordering::Relaxed);
    interrupts::set_handler(VL, Some(level_handler));
    interrupts::set_handler(VE, Some(edge_tmr_probe));
    ioapic::write_rte(PIN_B, Rte::new(VL, bsp()).level().0);
    ioapic::write_rte(PIN_A, Rte::new(VE, bsp()).0);
    lines::set(PIN_B, true);
    wait_count(0, VL, 1)?;
    lines::pulse(PIN_A);
    wait_count(0, VE, 1)?;
    check!(
        TMR_IN_ISR.load(Ordering::Relaxed),
        "TMR bit clear for a level-triggered delivery"
    );
    check!(
        !EDGE_TMR.load(Ordering::Relaxed),
        "TMR bit set for an edge-triggered delivery"
    );
    Ok(())
}

/// Remote IRR and delivery status are read-only: rewriting the RTE with
/// both bits clear while the interrupt is pending keeps remote IRR set.
fn remote_irr_read_only() -> TestResult {
    const V: u8 = 0x3c;
    let rte = Rte::new(V, bsp()).level().0;
    ioapic::write_rte(PIN_B, rte);
    let before = assert_pending(PIN_B, V);
    ioapic::write_rte(PIN_B, rte & !(RTE_REMOTE_IRR | RTE_DELIVERY_STATUS));
    let seen = ioapic::read_rte(PIN_B);
    lines::set(PIN_B, false);
    crate::cpu::sti();
    check!(
        before & RTE_REMOTE_IRR != 0,
        "remote IRR not set after delivery (RTE {})",
        crate::display::hex(before)
    );
    check!(
        seen & RTE_REMOTE_IRR != 0,
        "writing 0 to remote IRR cleared it (RTE {})",
        crate::display::hex(seen)
    );
    wait_count(0, V, 1)?;
    settle();
    let after = ioapic::read_rte(PIN_B);
    check!(
        after & RTE_REMOTE_IRR == 0,
        "remote IRR still set after EOI (RTE {})",
        crate::display::hex(after)
    );
    check!(
        count(0, V) == 1,
        "{} deliveries",
        crate::display::dec(count(0, V))
    );
    Ok(())
}

// ---- destinations ----

fn physical_cpu1() -> TestResult {
    const V: u8 = 0x3d;
    need_cpus(2)?;
    ioapic::write_rte(PIN_A, Rte::new(V, apic_id(1) as u8).0);
    lines::pulse(PIN_A);
    wait_count(1, V, 1)?;
    settle();
    expect_counts(V, |c| u32::from(c == 1))
}

fn logical_set() -> TestResult {
    const V: u8 = 0x3e;
    let set = target_set()?;
    let dest = ioapic_logical_dest(set)?;
    ioapic::write_rte(PIN_A, Rte::new(V, dest).logical().0);
    lines::pulse(PIN_A);
    for &c in set {
        wait_count(c, V, 1)?;
    }
    settle();
    expect_counts(V, |c| u32::from(in_set(set, c)))
}

fn lowest_priority_in_set() -> TestResult {
    const V: u8 = 0x3f;
    const N: u32 = 20;
    let set = target_set()?;
    let dest = ioapic_logical_dest(set)?;
    ioapic::write_rte(PIN_A, Rte::new(V, dest).logical().lowest_priority().0);
    for i in 1..=N {
        lines::pulse(PIN_A);
        wait_total(V, i)?;
    }
    settle();
    check!(
        total(V) == N,
        "{} deliveries for {N} edges",
        crate::display::dec(total(V)),
        N = crate::display::dec(N)
    );
    for c in 0..percpu::count() {
        check!(
            in_set(set, c) || count(c, V) == 0,
            "cpu {} outside the set {} took {}",
            crate::display::dec(c),
            crate::display::Set(set),
            crate::display::dec(count(c, V))
        );
    }
    Ok(())
}

// ---- a handler reprogramming its own pin ----

static RETARGET_TO: AtomicU8 = AtomicU8::new(0);

fn retarget_handler(vector: u8) {
    let pin = LEVEL_PIN.load(Ordering::Relaxed);
    if CALLS.fetch_add(1, Ordering::Relaxed) == 0 {
        let rte = ioapic::read_rte(pin);
        RTE_IN_ISR.store(rte, Ordering::Relaxed);
        let dest = u64::from(RETARGET_TO.load(Ordering::Relaxed)) << RTE_DEST_SHIFT;
        ioapic::write_rte(pin, (rte & !(0xffu64 << RTE_DEST_SHIFT)) | dest);
    }
    let _ = vector;
    lines::set(pin, false);
}

fn handler_retargets() -> TestResult {
    need_isr_held()?;
    const V: u8 = 0x40;
    need_cpus(2)?;
    arm_level(PIN_B, 0);
    RETARGET_TO.store(apic_id(1) as u8, Ordering::Relaxed);
    interrupts::set_handler(V, Some(retarget_handler));
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().0);
    lines::set(PIN_B, true);
    wait_count(0, V, 1)?;
    settle();
    let seen = RTE_IN_ISR.load(Ordering::Relaxed);
    check!(
        seen & RTE_REMOTE_IRR != 0,
        "remote IRR clear in the handler (RTE {})",
        crate::display::hex(seen)
    );
    let rte = ioapic::read_rte(PIN_B);
    check!(
        rte & RTE_REMOTE_IRR == 0,
        "remote IRR stuck after retargeting in the handler (RTE {})",
        crate::display::hex(rte)
    );
    check!(
        rte >> RTE_DEST_SHIFT == u64::from(apic_id(1)),
        "destination not updated (RTE {})",
        crate::display::hex(rte)
    );
    lines::set(PIN_B, true);
    wait_count(1, V, 1)?;
    settle();
    expect_counts(V, |c| u32::from(c <= 1))
}

static SWITCHED_RTE: AtomicU64 = AtomicU64::new(0);

fn switch_to_edge_handler(_vector: u8) {
    let pin = LEVEL_PIN.load(Ordering::Relaxed);
    if CALLS.fetch_add(1, Ordering::Relaxed) == 0 {
        let rte = ioapic::read_rte(pin);
        RTE_IN_ISR.store(rte, Ordering::Relaxed);
        ioapic::write_rte(pin, rte & !RTE_LEVEL);
        SWITCHED_RTE.store(ioapic::read_rte(pin), Ordering::Relaxed);
        lines::set(pin, false);
    }
}

fn handler_switches_to_edge() -> TestResult {
    need_isr_held()?;
    const V: u8 = 0x41;
    arm_level(PIN_B, 0);
    SWITCHED_RTE.store(u64::MAX, Ordering::Relaxed);
    interrupts::set_handler(V, Some(switch_to_edge_handler));
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().0);
    lines::set(PIN_B, true);
    wait_count(0, V, 1)?;
    settle();
    let seen = RTE_IN_ISR.load(Ordering::Relaxed);
    let switched = SWITCHED_RTE.load(Ordering::Relaxed);
    check!(
        seen & RTE_REMOTE_IRR != 0,
        "remote IRR clear in the handler (RTE {})",
        crate::display::hex(seen)
    );
    check!(
        switched & (RTE_REMOTE_IRR | RTE_LEVEL) == 0,
        "switching to edge left RTE {}",
        crate::display::hex(switched)
    );
    lines::pulse(PIN_B);
    wait_count(0, V, 2)?;
    settle();
    check!(
        count(0, V) == 2,
        "{} deliveries, expected 2 (level, then one edge)",
        crate::display::dec(count(0, V))
    );
    Ok(())
}

// ---- the EOI register (version 0x20) ----

fn eoi_register() -> TestResult {
    const V: u8 = 0x42;
    let version = ioapic::version();
    if version < 0x20 {
        skip!(
            "IOAPIC version {} has no EOI register",
            crate::display::hex(version)
        );
    }
    ioapic::write_rte(PIN_B, Rte::new(V, bsp()).level().0);
    let before = assert_pending(PIN_B, V);
    lines::set(PIN_B, false);
    ioapic::eoi(V);
    let after_eoi = ioapic::read_rte(PIN_B);
    crate::cpu::sti();
    check!(
        before & RTE_REMOTE_IRR != 0,
        "remote IRR not set after delivery (RTE {})",
        crate::display::hex(before)
    );
    check!(
        after_eoi & RTE_REMOTE_IRR == 0,
        "remote IRR still set after the EOI register write (RTE {})",
        crate::display::hex(after_eoi)
    );
    wait_count(0, V, 1)?;
    settle();
    check!(
        count(0, V) == 1,
        "{} deliveries",
        crate::display::dec(count(0, V))
    );
    Ok(())
}

// ---- reprogramming a pin while its interrupt is pending (any host) ----

/// Moves a level pin to CPU 1 while remote IRR is set (interrupt pending on
/// the BSP, IF=0): remote IRR stays until the BSP's EOI, then clears; the
/// next assertion reaches CPU 1.
fn retarget_while_pending() -> TestResult {
    const V: u8 = 0x43;
    need_cpus(2)?;
    let rte = Rte::new(V, bsp()).level().0;
    ioapic::write_rte(PIN_B, rte);
    assert_pending(PIN_B, V);
    let cpu1 = u64::from(apic_id(1)) << RTE_DEST_SHIFT;
    ioapic::write_rte(PIN_B, (rte & !(0xffu64 << RTE_DEST_SHIFT)) | cpu1);
    let moved = ioapic::read_rte(PIN_B);
    lines::set(PIN_B, false);
    crate::cpu::sti();
    check!(
        moved & RTE_REMOTE_IRR != 0 && moved >> RTE_DEST_SHIFT == u64::from(apic_id(1)),
        "after retargeting: RTE {}",
        crate::display::hex(moved)
    );
    wait_count(0, V, 1)?;
    settle();
    let after = ioapic::read_rte(PIN_B);
    check!(
        after & RTE_REMOTE_IRR == 0,
        "remote IRR stuck after the BSP's EOI (RTE {})",
        crate::display::hex(after)
    );
    // CPU 1 holds the vector below its CR8 while the line is up, so the
    // line is low again when it takes the interrupt (same result on hosts
    // that EOI at injection).
    smp::run_on(1, set_cr8, 4)?;
    lines::set(PIN_B, true);
    let sent = crate::time::wait_until(super::fixture::TIMEOUT_US, || {
        ioapic::read_rte(PIN_B) & RTE_REMOTE_IRR != 0
    });
    lines::set(PIN_B, false);
    smp::run_on(1, set_cr8, 0)?;
    check!(sent, "second assertion not sent (remote IRR never set)");
    wait_count(1, V, 1)?;
    settle();
    expect_counts(V, |c| u32::from(c <= 1))
}

fn set_cr8(level: usize) -> usize {
    crate::irql::set(level as u8);
    0
}

/// Rewriting a pending level pin as edge clears remote IRR at once; the
/// pending interrupt is still taken once, and the pin then works as edge.
fn level_to_edge_while_pending() -> TestResult {
    const V: u8 = 0x44;
    let rte = Rte::new(V, bsp()).level().0;
    ioapic::write_rte(PIN_B, rte);
    let before = assert_pending(PIN_B, V);
    lines::set(PIN_B, false);
    ioapic::write_rte(PIN_B, rte & !RTE_LEVEL);
    let switched = ioapic::read_rte(PIN_B);
    crate::cpu::sti();
    check!(
        before & RTE_REMOTE_IRR != 0,
        "remote IRR not set after delivery (RTE {})",
        crate::display::hex(before)
    );
    check!(
        switched & (RTE_REMOTE_IRR | RTE_LEVEL) == 0,
        "switching to edge left RTE {}",
        crate::display::hex(switched)
    );
    wait_count(0, V, 1)?;
    lines::pulse(PIN_B);
    wait_count(0, V, 2)?;
    settle();
    check!(
        count(0, V) == 2,
        "{} deliveries, expected 2 (the pending level one, one edge)",
        crate::display::dec(count(0, V))
    );
    Ok(())
}
