//! Interrupt round-trip benchmark: a guest loop of raise -> interrupt ->
//! ISR -> EOI -> next raise, timed from the host as the difference between
//! a run with N round trips and one with none (which is also the
//! boot-to-exit time of a minimal guest). Two sources:
//!
//! - pin: two `out`s to pc-testdev make an edge on IOAPIC pin 17;
//! - MSI: one `out` to the RAISE register of message-signaled test device 0
//!   (device 8's one MSI), which the guest first connects with a
//!   MESSAGE_BASED CONNECT_EX through the PV doorbell, so the host
//!   programmed its address and data.
//!
//! Runs in each `--irqchip` mode (kernel, split, user), one vCPU.
//!
//! `cargo bench -p vmm --bench irq_roundtrip [-- N]` (default N = 20000).
//! Needs /dev/kvm (skipped with VMM_SKIP_KVM_TESTS=1).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use irqconnect_abi::layout::PC_TESTDEV_IRQ_BASE;
use irqconnect_abi::msidev::{device_port, reg};

const VECTOR: u8 = 0x40;
const PIN: u16 = 17;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Pin,
    Msi,
}

fn image(n: u32, source: Source) -> Vec<u8> {
    kernel(&[(VECTOR, "isr"), (MSI_VECTOR, "isr")], move |a| {
        mask_pic(a);
        lapic_enable(a);
        a.store_imm(VAR0, 0); // interrupts taken
        a.store_imm(VAR1, 0); // interrupts raised
        match source {
            Source::Pin => ioapic_route(a, u32::from(PIN), u32::from(VECTOR), 0),
            Source::Msi => connect_msi_device(a, "lost"),
        }
        a.sti();
        a.label("next");
        a.cmp_mem(VAR1, n);
        a.jae("done");
        a.inc_mem(VAR1);
        match source {
            Source::Pin => {
                a.outb(PC_TESTDEV_IRQ_BASE + PIN, 1);
                a.outb(PC_TESTDEV_IRQ_BASE + PIN, 0);
            }
            Source::Msi => a.outl(device_port(0) + reg::RAISE, 0),
        }
        a.label("wait");
        a.load_eax(VAR0);
        a.cmp_eax_mem(VAR1);
        a.jb("wait");
        a.jmp("next");
        a.label("done");
        a.cmp_mem(VAR0, n);
        a.jne("lost");
        exit(a, 0);
        a.label("lost");
        exit(a, 1);
        a.label("isr");
        a.push_scratch();
        a.inc_mem(VAR0);
        eoi(a);
        a.pop_scratch();
        a.iretq();
    })
}

/// Best of `reps` runs: (wall time, the VMM's statistics line).
fn best(mode: &str, name: &str, n: u32, source: Source, reps: usize) -> (Duration, String) {
    let img = image(n, source);
    let mut best: Option<(Duration, String)> = None;
    for _ in 0..reps {
        let t = Instant::now();
        let r = run_vmm(name, &img, &["--irqchip", mode, "--cpus", "1"], None);
        let dt = t.elapsed();
        assert_eq!(r.status, Some(0), "{r:?}");
        let stats = r
            .stderr
            .lines()
            .find(|l| l.starts_with("vmm: stats:"))
            .unwrap_or("")
            .to_string();
        if best.as_ref().is_none_or(|(b, _)| dt < *b) {
            best = Some((dt, stats));
        }
    }
    best.unwrap()
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        if std::env::var("VMM_SKIP_KVM_TESTS").as_deref() == Ok("1") {
            eprintln!("skipped: /dev/kvm is missing and VMM_SKIP_KVM_TESTS=1");
            return;
        }
        panic!("/dev/kvm is missing; set VMM_SKIP_KVM_TESTS=1 to skip");
    }
    let n: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    for mode in ["kernel", "split", "user"] {
        println!("{mode} irqchip, 1 vCPU:");
        for (source, what) in [
            (Source::Pin, format!("2 outs -> edge on pin {PIN}")),
            (Source::Msi, "1 out -> MSI of device 8".to_string()),
        ] {
            let tag = if source == Source::Pin { "pin" } else { "msi" };
            let (base, _) = best(mode, &format!("bench0-{tag}-{mode}"), 0, source, 5);
            let (total, stats) = best(mode, &format!("benchN-{tag}-{mode}"), n, source, 3);
            let per = total.saturating_sub(base).as_secs_f64() / f64::from(n);
            println!(
                "  {tag}: boot to exit of a minimal guest: {:.1} ms",
                base.as_secs_f64() * 1e3
            );
            println!(
                "  {tag}: {n} round trips ({what} -> ISR -> EOI): {:.3} s, {:.1} us each",
                total.as_secs_f64(),
                per * 1e6
            );
            println!("  {tag}: {stats}");
        }
    }
}
