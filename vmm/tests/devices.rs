//! KVM tests of the VMM with small hand-assembled Multiboot kernels:
//! serial, exit port, Multiboot info, pc-testdev lines and interrupts, the
//! test devices and their host timer, fw_cfg, unclaimed ports, stdin, SMP
//! start-up through INIT/SIPI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::asm::Asm;
use common::*;

const K: &[&str] = &["--irqchip", "kernel", "--timeout", "60"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    K.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn serial_output_and_exit_code() {
    if !require_kvm() {
        return;
    }
    let img = kernel(&[], |a| {
        print(a, "msg");
        exit(a, 42);
        a.label("msg");
        a.bytes(b"hello from the guest\n\0");
    });
    let r = run_vmm("hello", &img, &args(&["--cpus", "1"]), None);
    assert_eq!(r.status, Some(42), "{r:?}");
    assert_eq!(r.stdout, "hello from the guest\n");
    assert!(r.stderr.contains("vmm: stats:"), "{}", r.stderr);
    assert!(r.stderr.contains("serial r0/w21"), "{}", r.stderr);
}

#[test]
fn multiboot_registers_and_cmdline_reach_the_kernel() {
    if !require_kvm() {
        return;
    }
    // EAX must be the loader magic; print the command line from info.cmdline.
    let img = kernel(&[], |a| {
        a.cmp_eax(0x2bad_b002);
        a.jne("bad");
        a.mov_esi_ebx_disp(16); // info->cmdline
        a.call("print");
        exit(a, 0);
        a.label("bad");
        exit(a, 9);
    });
    let r = run_vmm(
        "cmdline",
        &img,
        &args(&["--cmdline", "hello=world", "--tests", "ioapic,lapic"]),
        None,
    );
    assert_eq!(r.status, Some(0), "{r:?}");
    assert_eq!(r.stdout, "hello=world tests=ioapic,lapic");
}

/// The handler of the level pc-testdev test: lower the line, count, EOI.
fn pc_testdev_handler(a: &mut Asm, line: u16) {
    a.label("isr");
    a.push_scratch();
    a.outb(0x2000 + line, 0);
    a.inc_mem(VAR0);
    eoi(a);
    a.pop_scratch();
    a.iretq();
}

#[test]
fn pc_testdev_level_line_interrupts_through_ioapic() {
    if !require_kvm() {
        return;
    }
    let img = kernel(&[(0x40, "isr")], |a| {
        mask_pic(a);
        lapic_enable(a);
        a.store_imm(VAR0, 0);
        ioapic_route(a, 16, 0x40 | RTE_LEVEL, 0);
        for (i, (w, d)) in [("w0", "d0"), ("w1", "d1"), ("w2", "d2")]
            .into_iter()
            .enumerate()
        {
            a.outb(0x2010, 1);
            wait_until_at_least(a, VAR0, i as u32 + 1, w, d);
        }
        a.load_eax(VAR0);
        a.jmp("exit_eax");
        pc_testdev_handler(a, 0x10);
    });
    let r = run_vmm("pctestdev", &img, &args(&["--cpus", "1"]), None);
    assert_eq!(r.status, Some(3), "{r:?}");
    assert!(r.stderr.contains("gsi16 3"), "{}", r.stderr);
}

#[test]
fn pc_testdev_line_raised_while_masked_fires_on_unmask() {
    if !require_kvm() {
        return;
    }
    // Level line held high while the RTE is masked; unmasking delivers it.
    let img = kernel(&[(0x41, "isr")], |a| {
        mask_pic(a);
        lapic_enable(a);
        a.store_imm(VAR0, 0);
        ioapic_route(a, 18, 0x41 | RTE_LEVEL | (1 << 16), 0);
        a.outb(0x2012, 1);
        a.sti();
        a.cmp_mem(VAR0, 0); // nothing yet
        a.jne("early");
        ioapic_route(a, 18, 0x41 | RTE_LEVEL, 0);
        wait_until_at_least(a, VAR0, 1, "w", "d");
        exit(a, 0);
        a.label("early");
        exit(a, 7);
        pc_testdev_handler(a, 0x12);
    });
    let r = run_vmm("masked", &img, &args(&["--cpus", "1"]), None);
    assert_eq!(r.status, Some(0), "{r:?}");
}

/// Handler draining a test device at `port`: while STATUS != 0, ACK; count
/// the interrupt in `var`; EOI.
fn testdev_drain_handler(
    a: &mut Asm,
    label: &'static str,
    lp: &'static str,
    ld: &'static str,
    port: u16,
    var: u32,
) {
    a.label(label);
    a.push_scratch();
    a.inc_mem(var);
    a.label(lp);
    a.inl(port + 0x08); // STATUS
    a.test_eax();
    a.je(ld);
    a.outl(port + 0x0c, 1); // ACK
    a.jmp(lp);
    a.label(ld);
    eoi(a);
    a.pop_scratch();
    a.iretq();
}

#[test]
fn testdev_raise_ack_counts_and_host_timer() {
    if !require_kvm() {
        return;
    }
    // Device 0: level, pin 16. Device 1: edge, pin 17 (phase-1 table).
    let d0: u16 = 0x2100;
    let d1: u16 = 0x2120;
    let img = kernel(&[(0x50, "isr0"), (0x51, "isr1")], |a| {
        mask_pic(a);
        lapic_enable(a);
        a.store_imm(VAR0, 0);
        a.store_imm(VAR1, 0);
        // ID register: magic 0xd5, device 1, line 17.
        a.inl(d1);
        a.cmp_eax(0xd501_0011);
        a.jne("bad_id");
        ioapic_route(a, 16, 0x50 | RTE_LEVEL, 0);
        ioapic_route(a, 17, 0x51, 0);
        a.outl(d0 + 0x04, 1); // CTRL enable
        a.outl(d1 + 0x04, 1);
        a.outl(d0 + 0x10, 3); // RAISE 3
        a.sti();
        // Level device drained by the ISR: wait for ACK_COUNT == 3.
        a.label("w0");
        a.cli();
        a.inl(d0 + 0x18);
        a.cmp_eax(3);
        a.je("d0");
        a.sti();
        a.hlt();
        a.jmp("w0");
        a.label("d0");
        // Edge device raised by the host timer: 5 causes, 200 us apart.
        a.outl(d1 + 0x1c, (5 << 16) | 200);
        a.label("w1");
        a.cli();
        a.inl(d1 + 0x18);
        a.cmp_eax(5);
        a.je("d1");
        a.sti();
        a.hlt();
        a.jmp("w1");
        a.label("d1");
        // Report ASSERT_COUNT(d1) * 16 + ASSERT_COUNT(d0): 5 * 16 + 3 = 83.
        a.inl(d0 + 0x14);
        a.store_eax(VAR2);
        a.inl(d1 + 0x14);
        a.shl_eax(4);
        a.add_eax_mem(VAR2);
        a.jmp("exit_eax");
        a.label("bad_id");
        exit(a, 1);
        testdev_drain_handler(a, "isr0", "l0", "e0", d0, VAR0);
        testdev_drain_handler(a, "isr1", "l1", "e1", d1, VAR1);
    });
    let r = run_vmm("testdev", &img, &args(&["--cpus", "1"]), None);
    assert_eq!(r.status, Some(83), "{r:?}");
    assert!(r.stderr.contains("testdev r"), "{}", r.stderr);
}

#[test]
fn fw_cfg_reports_cpus_and_ram() {
    if !require_kvm() {
        return;
    }
    // Check the signature, then exit with NB_CPUS + 16 * (byte 3 of RAM_SIZE):
    // 64 MiB = 0x0400_0000, so byte 3 is 4.
    let img = kernel(&[], |a| {
        a.mov_dx(0x510);
        a.bytes(&[0x66, 0xb8, 0x00, 0x00]); // mov ax, 0 (signature)
        a.bytes(&[0x66, 0xef]); // out dx, ax
        a.mov_dx(0x511);
        a.in_al_dx();
        a.bytes(&[0x3c, b'Q']); // cmp al, 'Q'
        a.jne("bad");
        a.mov_dx(0x510);
        a.bytes(&[0x66, 0xb8, 0x05, 0x00]); // mov ax, FW_CFG_NB_CPUS
        a.bytes(&[0x66, 0xef]);
        a.mov_dx(0x511);
        a.mov_eax(0);
        a.in_al_dx();
        a.store_eax(VAR0);
        a.mov_dx(0x510);
        a.bytes(&[0x66, 0xb8, 0x03, 0x00]); // mov ax, FW_CFG_RAM_SIZE
        a.bytes(&[0x66, 0xef]);
        a.mov_dx(0x511);
        a.in_al_dx(); // byte 0
        a.in_al_dx(); // byte 1
        a.in_al_dx(); // byte 2: 64 MiB = 0x0400_0000 -> 0x00
        a.in_al_dx(); // byte 3: 0x04
        a.bytes(&[0x0f, 0xb6, 0xc0]); // movzx eax, al
        a.shl_eax(4);
        a.add_eax_mem(VAR0);
        a.jmp("exit_eax");
        a.label("bad");
        exit(a, 1);
    });
    let r = run_vmm(
        "fwcfg",
        &img,
        &args(&["--cpus", "3", "--memory", "64"]),
        None,
    );
    // RAM byte 3 = 4 -> 4 << 4 = 64, plus 3 CPUs.
    assert_eq!(r.status, Some(67), "{r:?}");
}

#[test]
fn unclaimed_ports_read_all_ones_and_are_counted() {
    if !require_kvm() {
        return;
    }
    let img = kernel(&[], |a| {
        a.inl(0x2204); // between the PV doorbell and the test marker
        a.cmp_eax(0xffff_ffff);
        a.jne("bad");
        a.outb(0x1234 & 0xff, 1);
        a.outl(0x1234, 5);
        exit(a, 0);
        a.label("bad");
        exit(a, 1);
    });
    let r = run_vmm("unclaimed", &img, &args(&["--cpus", "1"]), None);
    assert_eq!(r.status, Some(0), "{r:?}");
    assert!(r.stderr.contains("unclaimed: pio r1/w2"), "{}", r.stderr);
    assert!(r.stderr.contains("unclaimed port 0x2204"), "{}", r.stderr);
}

#[test]
fn stdin_reaches_the_uart_receiver() {
    if !require_kvm() {
        return;
    }
    // Poll LSR.DR and exit with the received byte.
    let img = kernel(&[], |a| {
        a.label("poll");
        a.mov_dx(0x3fd);
        a.in_al_dx();
        a.bytes(&[0xa8, 0x01]); // test al, 1
        a.je("poll");
        a.mov_dx(0x3f8);
        a.mov_eax(0);
        a.in_al_dx();
        a.jmp("exit_eax");
    });
    let r = run_vmm("stdin", &img, &args(&["--cpus", "1"]), Some(b"Z"));
    assert_eq!(r.status, Some(i32::from(b'Z')), "{r:?}");
}

#[test]
fn aps_start_with_init_sipi_in_kernel_mode() {
    if !require_kvm() {
        return;
    }
    // Real-mode trampoline at 0x8000: lock inc word [0x7000]; cli; hlt; jmp $-1.
    let tramp: [u8; 9] = [0xf0, 0xff, 0x06, 0x00, 0x70, 0xfa, 0xf4, 0xeb, 0xfd];
    let img = kernel(&[], move |a| {
        a.store_imm(VAR0, 0);
        let mut padded = tramp.to_vec();
        padded.resize(12, 0x90);
        for (i, chunk) in padded.chunks(4).enumerate() {
            let w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            a.store_imm(0x8000 + 4 * i as u32, w);
        }
        lapic_enable(a);
        a.store_imm(LAPIC_ICR_HI, 0);
        a.store_imm(LAPIC_ICR_LO, 0x000c_4500); // INIT, all excluding self
        a.store_imm(LAPIC_ICR_LO, 0x000c_4608); // SIPI vector 8 -> 0x8000
        // Wait (bounded) for the three APs.
        a.mov_r_imm(1, 50_000_000); // ecx
        a.label("spin");
        a.cmp_mem(VAR0, 3);
        a.je("done");
        a.dec_ecx();
        a.jne("spin");
        a.label("done");
        a.load_eax(VAR0);
        a.jmp("exit_eax");
    });
    let r = run_vmm("sipi", &img, &args(&["--cpus", "4"]), None);
    assert_eq!(r.status, Some(3), "{r:?}");
}
