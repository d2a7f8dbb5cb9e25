//! Accesses no device claims, and the doorbell at the wrong width: reads
//! return all ones, writes are ignored (a read after still gives all ones,
//! a request block rung the wrong way stays unanswered), and the VMM goes
//! on (QUERY_PLATFORM answers, a device interrupt reaches its ISR).

use core::arch::asm;

use irqconnect_abi::layout::{MMIO_HOLE_START, PV_DOORBELL_PORT, PV_DOORBELL_SIGNATURE};
use irqconnect_abi::ntstatus::STATUS_SUCCESS;

use super::blocks;
use super::pvfix::{self, Args, CTX, Env, Policy, check_counts, connect_ok, counters, wait_for};
use super::raw;
use super::{Cases, Name, Want, expect_host_counter, ram_end};
use crate::pv;
use crate::runner::TestResult;
use crate::wdm::KINTERRUPT_MODE;

/// Access widths in bytes.
#[derive(Clone, Copy)]
enum Width {
    B1 = 1,
    B2 = 2,
    B4 = 4,
    B8 = 8,
}

impl Width {
    fn ones(self) -> u64 {
        match self {
            Width::B8 => u64::MAX,
            w => (1u64 << (8 * w as u32)) - 1,
        }
    }

    fn bits(self) -> u32 {
        8 * self as u32
    }
}

/// A port read of `w` (8/16/32 bits). Not `nomem`: memory accesses stay on
/// their side of it.
fn port_read(port: u16, w: Width) -> u64 {
    let v: u32;
    // SAFETY: a read of a port no device of the platform decodes (or the
    // doorbell, whose reads have no effects); nothing in guest memory changes.
    unsafe {
        match w {
            Width::B1 => {
                asm!("xor eax, eax", "in al, dx", out("eax") v, in("dx") port, options(nostack))
            }
            Width::B2 => {
                asm!("xor eax, eax", "in ax, dx", out("eax") v, in("dx") port, options(nostack))
            }
            _ => asm!("in eax, dx", out("eax") v, in("dx") port, options(nostack, preserves_flags)),
        }
    }
    u64::from(v)
}

/// A port write of `w` (8/16/32 bits). Not `nomem`: the block a doorbell
/// write names is complete before it.
fn port_write(port: u16, w: Width, value: u32) {
    // SAFETY: a port no device decodes, or the doorbell: at worst the VMM
    // answers into the test's own arena block.
    unsafe {
        match w {
            Width::B1 => {
                asm!("out dx, al", in("dx") port, in("al") value as u8, options(nostack, preserves_flags))
            }
            Width::B2 => {
                asm!("out dx, ax", in("dx") port, in("ax") value as u16, options(nostack, preserves_flags))
            }
            _ => {
                asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
            }
        }
    }
}

/// An MMIO read of `w` at `addr` (identity-mapped, not RAM).
fn mmio_read(addr: u64, w: Width) -> u64 {
    let p = addr as usize;
    // SAFETY: an address in a hole of the platform's MMIO map: no device,
    // no RAM, so the access exits to the VMM and touches no guest memory.
    unsafe {
        match w {
            Width::B1 => u64::from(core::ptr::read_volatile(p as *const u8)),
            Width::B2 => u64::from(core::ptr::read_volatile(p as *const u16)),
            Width::B4 => u64::from(core::ptr::read_volatile(p as *const u32)),
            Width::B8 => core::ptr::read_volatile(p as *const u64),
        }
    }
}

/// An MMIO write of `w` at `addr`.
fn mmio_write(addr: u64, w: Width, value: u64) {
    let p = addr as usize;
    // SAFETY: as in `mmio_read`.
    unsafe {
        match w {
            Width::B1 => core::ptr::write_volatile(p as *mut u8, value as u8),
            Width::B2 => core::ptr::write_volatile(p as *mut u16, value as u16),
            Width::B4 => core::ptr::write_volatile(p as *mut u32, value as u32),
            Width::B8 => core::ptr::write_volatile(p as *mut u64, value),
        }
    }
}

/// After the abuse: QUERY_PLATFORM answers, and the exclusive latched
/// device's interrupt reaches its ISR (3 causes claimed).
fn still_running(cases: &mut Cases, env: &Env) -> TestResult {
    let alive = pv::query_platform().is_ok();
    cases.check(
        "QUERY_PLATFORM answers afterwards",
        alive,
        format_args!("no answer"),
    );
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    let ctx = CTX[0].bind(Some(&dev), Policy::All, env.online());
    let h = connect_ok(&dev, &Args::of(&dev, 0, &CTX[0]))?;
    let base = counters(&dev);
    dev.td.enable(true);
    dev.td.raise(3);
    let claimed = wait_for("3 causes claimed", || ctx.claimed() >= 3);
    dev.td.enable(false);
    let counted = check_counts(&dev, base, ctx.claimed(), 3);
    cases.check(
        "a device interrupt is claimed afterwards",
        claimed.is_ok() && counted.is_ok(),
        format_args!("{} causes claimed of 3", crate::display::dec(ctx.claimed())),
    );
    pvfix::disconnect_ok(h)
}

/// The doorbell at 8 and 16 bits and at other offsets: a valid block rung
/// that way stays unanswered; reads give all ones; the 32-bit read still
/// gives the signature and a 32-bit write still answers.
pub fn doorbell_widths(_env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_doorbell_other_widths_ignored");
    let route = blocks::route(0);
    let port = PV_DOORBELL_PORT;
    let mut bad = 0;
    let writes: [(&str, u16, Width); 5] = [
        ("8-bit write", port, Width::B1),
        ("16-bit write", port, Width::B2),
        ("8-bit write at offset 3", port + 3, Width::B1),
        ("16-bit write at offset 2", port + 2, Width::B2),
        ("32-bit write at offset 1", port + 1, Width::B4),
    ];
    for (name, p, w) in writes {
        let gpa = raw::stage(&route);
        port_write(p, w, gpa);
        bad += 1;
        cases.status(name, raw::staged_status(), Want::NoAnswer);
    }
    let reads: [(&str, u16, Width); 4] = [
        ("8-bit read", port, Width::B1),
        ("16-bit read", port, Width::B2),
        ("8-bit read at offset 3", port + 3, Width::B1),
        ("32-bit read at offset 2", port + 2, Width::B4),
    ];
    for (name, p, w) in reads {
        let v = port_read(p, w);
        bad += 1;
        cases.check(
            name,
            v == w.ones(),
            format_args!("read {}, expected all ones", crate::display::hex(v)),
        );
    }
    let sig = port_read(port, Width::B4);
    cases.check(
        "32-bit read still the signature",
        sig == u64::from(PV_DOORBELL_SIGNATURE),
        format_args!("read {}", crate::display::hex(sig)),
    );
    let gpa = raw::stage(&route);
    port_write(port, Width::B4, gpa);
    cases.status(
        "32-bit write still answers",
        raw::staged_status(),
        Want::Status(STATUS_SUCCESS),
    );
    expect_host_counter("pv_bad_accesses", bad);
    cases.finish()
}

/// Ports no device decodes, 8, 16 and 32 bits wide, between and around
/// the platform's devices and at the top of the port space.
const PORTS: [(u16, Width); 15] = [
    (0x0080, Width::B1),
    (0x0070, Width::B1),
    (0x0278, Width::B1),
    (0x2204, Width::B1),
    (0x2209, Width::B1),
    (0xffff, Width::B1),
    (0x01ce, Width::B2),
    (0x2018, Width::B2),
    (0x2206, Width::B2),
    (0xfffe, Width::B2),
    (0x0cf8, Width::B4),
    (0x0cfc, Width::B4),
    (0x2220, Width::B4),
    (0x4444, Width::B4),
    (0xfffc, Width::B4),
];

/// Unclaimed ports: all ones before and after a write of a pattern.
pub fn ports(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_unclaimed_ports_read_ones_writes_ignored");
    for (port, w) in PORTS {
        let name = Name::of(format_args!(
            "port {} {}-bit",
            crate::display::hex(port),
            crate::display::dec(w.bits())
        ));
        let first = port_read(port, w);
        port_write(port, w, 0x5a5a_5a5a);
        let again = port_read(port, w);
        cases.check(
            name.as_str(),
            first == w.ones() && again == w.ones(),
            format_args!(
                "read {}, after a write {}; expected all ones",
                crate::display::hex(first),
                crate::display::hex(again)
            ),
        );
    }
    expect_host_counter("unclaimed_pio_reads", 2 * PORTS.len() as u32);
    expect_host_counter("unclaimed_pio_writes", PORTS.len() as u32);
    still_running(&mut cases, env)?;
    cases.finish()
}

/// Unclaimed MMIO: the 0xFED00000 page range (HPET, TPM, chipset windows
/// of a PC; nothing here), the MMIO hole and a PCIe-ECAM-like address below
/// it, above the LAPIC page, and the first byte past RAM; 1, 2, 4 and 8
/// bytes wide.
pub fn mmio(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_unclaimed_mmio_reads_ones_writes_ignored");
    let past_ram = ram_end()
        .filter(|&ram| ram < MMIO_HOLE_START)
        .unwrap_or(MMIO_HOLE_START + 0x1000);
    let addrs: [(u64, Width); 10] = [
        (0xfed0_0000, Width::B4),
        (0xfed0_0008, Width::B8),
        (0xfed1_c000, Width::B2),
        (0xfed4_0000, Width::B1),
        (0xfedf_fff8, Width::B8),
        (MMIO_HOLE_START, Width::B1),
        (0xe000_0000, Width::B4),
        (0xfeb0_0000, Width::B2),
        (0xfef0_0000, Width::B4),
        (past_ram, Width::B4),
    ];
    for (addr, w) in addrs {
        let name = Name::of(format_args!(
            "{} {}-bit",
            crate::display::hex(addr),
            crate::display::dec(w.bits())
        ));
        let first = mmio_read(addr, w);
        mmio_write(addr, w, 0x5a5a_5a5a_5a5a_5a5a);
        let again = mmio_read(addr, w);
        cases.check(
            name.as_str(),
            first == w.ones() && again == w.ones(),
            format_args!(
                "read {}, after a write {}; expected all ones",
                crate::display::hex(first),
                crate::display::hex(again)
            ),
        );
    }
    expect_host_counter("unclaimed_mmio_reads", 2 * addrs.len() as u32);
    expect_host_counter("unclaimed_mmio_writes", addrs.len() as u32);
    still_running(&mut cases, env)?;
    cases.finish()
}
