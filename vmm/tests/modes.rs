//! KVM tests, with small hand-assembled kernels, of what the split and user
//! modes do themselves where kernel mode leaves it to KVM, run in all three
//! modes so kernel mode is the reference: INIT of a running AP and a second
//! start-up at another vector, a level pin re-delivered after EOI while its
//! line is still high, an unknown MSR; and a device's MSI (`signal_msi`)
//! through the message-signaled test device, masked and unmasked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::asm::Asm;
use common::*;

const MODES: [&str; 3] = ["kernel", "split", "user"];

fn args<'a>(mode: &'a str, cpus: &'a str) -> Vec<&'a str> {
    vec!["--irqchip", mode, "--cpus", cpus, "--timeout", "60"]
}

/// Emits: copy `code` (padded with NOPs to whole dwords) to `addr`.
fn copy_code(a: &mut Asm, addr: u32, code: &[u8]) {
    let mut padded = code.to_vec();
    padded.resize(code.len().div_ceil(4) * 4, 0x90);
    for (i, chunk) in padded.chunks(4).enumerate() {
        let w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        a.store_imm(addr + 4 * i as u32, w);
    }
}

/// Emits: spin (bounded) until the dword at `var` is at least `n`.
fn spin_until(a: &mut Asm, var: u32, n: u32, label: &'static str, done: &'static str) {
    spin_at_most(a, var, n, 20_000_000, label, done);
}

/// Emits: spin until the dword at `var` is at least `n`, or `rounds`
/// rounds (a wait for something that must not happen).
fn spin_at_most(
    a: &mut Asm,
    var: u32,
    n: u32,
    rounds: u32,
    label: &'static str,
    done: &'static str,
) {
    a.mov_r_imm(1, rounds); // ecx
    a.label(label);
    a.cmp_mem(var, n);
    a.jae(done);
    a.dec_ecx();
    a.jne(label);
    a.label(done);
}

/// INIT stops a running AP and puts it back to wait-for-SIPI; a second SIPI
/// starts it at the new vector, and the old code does not run again. The
/// first trampoline spins without ever exiting, so the INIT must reach a
/// vCPU that is inside `KVM_RUN`.
#[test]
fn init_of_a_running_ap_then_sipi_at_a_new_vector() {
    if !require_kvm() {
        return;
    }
    // 0x8000 (SIPI 8): lock inc word [0x7000]; jmp $
    let first = [0xf0, 0xff, 0x06, 0x00, 0x70, 0xeb, 0xfe];
    // 0x9000 (SIPI 9): lock inc word [0x7004]; cli; hlt; jmp $-1
    let second = [0xf0, 0xff, 0x06, 0x04, 0x70, 0xfa, 0xf4, 0xeb, 0xfd];
    let img = kernel(&[], move |a| {
        a.store_imm(VAR0, 0);
        a.store_imm(VAR1, 0);
        copy_code(a, 0x8000, &first);
        copy_code(a, 0x9000, &second);
        lapic_enable(a);
        a.store_imm(LAPIC_ICR_HI, 1 << 24); // APIC ID 1
        a.store_imm(LAPIC_ICR_LO, 0x0000_4500); // INIT, physical
        a.store_imm(LAPIC_ICR_LO, 0x0000_4608); // SIPI 8
        spin_until(a, VAR0, 1, "wait_first", "first_done");
        a.store_imm(LAPIC_ICR_LO, 0x0000_4500); // INIT the running AP
        a.store_imm(LAPIC_ICR_LO, 0x0000_4609); // SIPI 9
        spin_until(a, VAR1, 1, "wait_second", "second_done");
        // Exit with VAR1 * 16 + VAR0: 0x11 when each ran once.
        a.load_eax(VAR1);
        a.shl_eax(4);
        a.add_eax_mem(VAR0);
        a.jmp("exit_eax");
    });
    for mode in MODES {
        let r = run_vmm(&format!("init-{mode}"), &img, &args(mode, "2"), None);
        assert_eq!(r.status, Some(0x11), "--irqchip {mode}: {r:?}");
    }
}

/// A level pin whose handler EOIs without lowering the line is delivered
/// again after each EOI (Remote IRR cleared, line still high); the third
/// time the handler lowers the line and no fourth delivery comes. Split:
/// `KVM_EXIT_IOAPIC_EOI` to our IOAPIC, which on hosts with a late EOI exit
/// needs the EOI watch (the waiting loop halts; see `irqchip-kvm`'s split
/// module); user: our LAPIC's EOI broadcast.
#[test]
fn level_pin_redelivered_after_eoi_while_asserted() {
    if !require_kvm() {
        return;
    }
    const PIN: u32 = 5;
    const VECTOR: u32 = 0x45;
    let img = kernel(&[(VECTOR as u8, "isr")], |a| {
        a.store_imm(VAR0, 0);
        mask_pic(a);
        lapic_enable(a);
        ioapic_route(a, PIN, RTE_LEVEL | VECTOR, 0);
        a.outb(0x2000 + PIN as u16, 1); // line high
        wait_until_at_least(a, VAR0, 3, "wait", "done");
        // Give a (wrong) fourth delivery time to arrive.
        a.mov_r_imm(1, 200_000);
        a.label("linger");
        a.dec_ecx();
        a.jne("linger");
        a.load_eax(VAR0);
        a.jmp("exit_eax");

        a.label("isr");
        a.push_scratch();
        a.inc_mem(VAR0);
        a.cmp_mem(VAR0, 3);
        a.jb("keep_high");
        a.outb(0x2000 + PIN as u16, 0); // third time: line low
        a.label("keep_high");
        eoi(a);
        a.pop_scratch();
        a.iretq();
    });
    for mode in MODES {
        let r = run_vmm(&format!("level-{mode}"), &img, &args(mode, "1"), None);
        assert_eq!(r.status, Some(3), "--irqchip {mode}: {r:?}");
    }
}

/// MSRs our LAPIC does not own, or not in this mode, fault as under KVM:
/// an unknown MSR and an x2APIC register while in xAPIC mode give #GP;
/// IA32_APIC_BASE reads the BSP's power-up value. (User mode gets all three
/// as user-space MSR exits.)
#[test]
fn msr_faults_and_apic_base_match_kvm() {
    if !require_kvm() {
        return;
    }
    let rdmsr = |a: &mut Asm, msr: u32| {
        a.mov_r_imm(1, msr); // ecx
        a.bytes(&[0x0f, 0x32]); // rdmsr
    };
    let img = kernel(&[(13, "gp")], move |a| {
        a.store_imm(VAR0, 0);
        rdmsr(a, 0xbad); // no such MSR
        rdmsr(a, 0x802); // x2APIC ID, but the APIC is in xAPIC mode
        rdmsr(a, 0x1b); // IA32_APIC_BASE
        a.cmp_eax(0xfee0_0900); // base 0xfee00000, enabled, BSP
        a.jne("bad_base");
        a.load_eax(VAR0);
        a.bytes(&[0x83, 0xc0, 0x10]); // add eax, 0x10
        a.jmp("exit_eax");
        a.label("bad_base");
        a.mov_eax(0xbb);
        a.jmp("exit_eax");

        // #GP: count it and skip the 2-byte rdmsr.
        a.label("gp");
        a.inc_mem(VAR0);
        a.bytes(&[0x48, 0x83, 0x44, 0x24, 0x08, 0x02]); // add qword [rsp+8], 2
        a.bytes(&[0x48, 0x83, 0xc4, 0x08]); // add rsp, 8 (error code)
        a.iretq();
    });
    for mode in MODES {
        let r = run_vmm(&format!("msr-{mode}"), &img, &args(mode, "1"), None);
        assert_eq!(r.status, Some(0x12), "--irqchip {mode}: {r:?}");
    }
}

/// A device MSI in every mode: the guest connects device 8's message
/// (MESSAGE_BASED CONNECT_EX), raises it and takes it once; masked, two
/// raises leave it pending and deliver nothing; unmasked, it arrives
/// exactly once more. Exit code: interrupts * 16 + PENDING as read while
/// masked, so 0x21.
#[test]
fn device_msi_delivered_and_masked_pending_sent_once_on_unmask() {
    use irqconnect_abi::msidev::{device_port, reg};
    if !require_kvm() {
        return;
    }
    let port = |r: u16| device_port(0) + r;
    let img = kernel(&[(MSI_VECTOR, "isr")], move |a| {
        mask_pic(a);
        lapic_enable(a);
        a.store_imm(VAR0, 0);
        a.store_imm(VAR2, 0);
        connect_msi_device(a, "failed");
        a.sti();
        a.outl(port(reg::RAISE), 0);
        spin_until(a, VAR0, 1, "wait_first", "first_done");
        a.outl(port(reg::MASK), 1);
        a.outl(port(reg::RAISE), 0);
        a.outl(port(reg::RAISE), 0);
        // Give a wrongly sent message time to arrive.
        spin_at_most(a, VAR0, 2, 200_000, "masked_wait", "masked_done");
        a.inl(port(reg::PENDING));
        a.store_eax(VAR2);
        a.outl(port(reg::MASK), 0);
        spin_until(a, VAR0, 2, "wait_second", "second_done");
        // And time for a wrong third one.
        spin_at_most(a, VAR0, 3, 200_000, "wait_third", "third_done");
        a.load_eax(VAR0);
        a.shl_eax(4);
        a.add_eax_mem(VAR2);
        a.jmp("exit_eax");
        a.label("failed");
        exit(a, 0xe1);
        a.label("isr");
        a.push_scratch();
        a.inc_mem(VAR0);
        eoi(a);
        a.pop_scratch();
        a.iretq();
    });
    for mode in MODES {
        let r = run_vmm(&format!("msi-{mode}"), &img, &args(mode, "1"), None);
        assert_eq!(r.status, Some(0x21), "--irqchip {mode}: {r:?}");
        assert!(
            r.stderr
                .contains("msi: programmed 1, sent 2, dropped 0, failed 0"),
            "--irqchip {mode}: {}",
            r.stderr
        );
    }
}
