//! `nmi_`: how NMIs queue (SDM Vol. 3A 7.7.1 "Handling Multiple NMIs"):
//! two that arrive before either is taken are both handled; any number
//! sent while the handler runs collapse into one, taken after its IRET; an
//! NMI sent before a fixed IPI by the same CPU is handled before that IPI.
//!
//! Every NMI of this suite goes to the BSP (physical destination: the SDM
//! does not allow the self shorthand with delivery mode NMI). The dispatcher
//! counts an NMI in `PerCpu::nmi_count` before it runs the NMI handler.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::fixture::{apic_id, count, need_cpus, settle};
use crate::display::dec;
use crate::lapic::{self, Delivery, Dest};
use crate::runner::{Failure, Test, TestResult};
use crate::{check, fail, interrupts, percpu, serial, smp, time};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("nmi_two_at_once_both_handled", two_at_once),
    Test::new("nmi_during_nmi_latched_exactly_once", latched_once),
    Test::new(
        "nmi_before_fixed_ipi_from_same_sender_first",
        before_fixed_ipi,
    ),
];

/// Rounds of the two multi-CPU tests. Every round needs both vCPUs on a
/// host processor at once, so a busy host stretches each round; 1,000
/// keeps the test to seconds there and still crosses every interleaving
/// the ordering depends on many times.
const ROUNDS: u32 = 1_000;
/// Rounds of the latching test.
const LATCH_ROUNDS: u32 = 1_000;
/// NMIs the handler sends itself in each latching round.
const BURST: u32 = 10;
/// The fixed IPI of the ordering test.
const V: u8 = 0xd1;
/// How long either side waits for the other in one round: long, because a
/// busy host can keep a vCPU off its processor for a while; a lost NMI or
/// IPI fails the test after it.
const ROUND_TIMEOUT_US: u64 = 5_000_000;
/// How long the BSP waits for CPU 1's work item once its own side is done
/// (CPU 1 gives up within `ROUND_TIMEOUT_US` of the BSP).
const AP_TIMEOUT_US: u64 = 2 * ROUND_TIMEOUT_US;

/// The round the BSP has opened (two-at-once), or the IPIs the BSP has
/// handled (ordering): what CPU 1 waits for before each send.
static PROGRESS: AtomicU32 = AtomicU32::new(0);
/// Set by the BSP when it gives up, so CPU 1 stops waiting.
static ABORT: AtomicBool = AtomicBool::new(false);

fn nmis(cpu: usize) -> u32 {
    percpu::cpu(cpu).nmi_count.load(Ordering::Acquire)
}

/// Waits up to `ROUND_TIMEOUT_US` for `cond`, going through the VMM at
/// every poll so that a pending NMI or interrupt is delivered at once.
fn bsp_wait(mut cond: impl FnMut() -> bool) -> bool {
    time::wait_until(ROUND_TIMEOUT_US, || {
        serial::exit_to_vmm();
        cond()
    })
}

/// An NMI to the BSP.
fn nmi_to_bsp() {
    lapic::send_ipi(0, Delivery::Nmi, Dest::Physical(apic_id(0)));
}

/// Waits until `PROGRESS` reaches `n`; false when the BSP aborted or the
/// wait timed out.
fn wait_progress(n: u32) -> bool {
    time::wait_until(ROUND_TIMEOUT_US, || {
        PROGRESS.load(Ordering::Acquire) >= n || ABORT.load(Ordering::Acquire)
    }) && !ABORT.load(Ordering::Acquire)
}

/// Runs `bsp_side` on the BSP while CPU 1 runs `ap_side(ROUNDS)`; CPU 1
/// returns 0 when it sent every round, else the round it stopped in.
fn with_cpu1(ap_side: fn(usize) -> usize, bsp_side: fn() -> TestResult) -> TestResult {
    need_cpus(2)?;
    PROGRESS.store(0, Ordering::Release);
    ABORT.store(false, Ordering::Release);
    smp::post(1, ap_side, ROUNDS as usize)?;
    let result = bsp_side();
    if result.is_err() {
        ABORT.store(true, Ordering::Release);
    }
    let stopped = smp::wait(1, AP_TIMEOUT_US);
    result?;
    match stopped {
        Ok(0) => Ok(()),
        Ok(round) => fail!("cpu 1 stopped waiting in round {}", dec(round)),
        Err(e) => Err(Failure::from(e)),
    }
}

/// CPU 1: one NMI to the BSP in each round the BSP opens.
fn remote_nmi_per_round(rounds: usize) -> usize {
    for r in 1..=rounds as u32 {
        if !wait_progress(r) {
            return r as usize;
        }
        nmi_to_bsp();
    }
    0
}

/// Each round the BSP sends itself an NMI while CPU 1 sends it one (both
/// start on the same store): exactly two handler runs, whether the second
/// arrives before the first is taken (both pending: one now, one after the
/// IRET), while it runs (latched) or after it.
fn two_at_once() -> TestResult {
    with_cpu1(remote_nmi_per_round, || {
        for r in 1..=ROUNDS {
            let before = nmis(0);
            check!(
                before == 2 * (r - 1),
                "round {}: {} NMIs handled before it, expected {}",
                dec(r),
                dec(before),
                dec(2 * (r - 1))
            );
            PROGRESS.store(r, Ordering::Release);
            nmi_to_bsp();
            if !bsp_wait(|| nmis(0) >= 2 * r) {
                fail!(
                    "round {}: {} NMIs handled, expected {} (an NMI lost, or 5 s late)",
                    dec(r),
                    dec(nmis(0)),
                    dec(2 * r)
                );
            }
        }
        settle();
        check!(
            nmis(0) == 2 * ROUNDS,
            "{} NMIs handled in {} rounds of two",
            dec(nmis(0)),
            dec(ROUNDS)
        );
        Ok(())
    })
}

/// Set by the BSP before a round's first NMI: that NMI's handler sends the
/// burst.
static ARMED: AtomicBool = AtomicBool::new(false);
/// Handler runs in progress (more than one would be a nested NMI).
static DEPTH: AtomicU32 = AtomicU32::new(0);
/// Handler runs that started inside another.
static NESTED: AtomicU32 = AtomicU32::new(0);

fn burst_handler(_: u8) {
    if DEPTH.fetch_add(1, Ordering::AcqRel) != 0 {
        NESTED.fetch_add(1, Ordering::AcqRel);
    }
    if ARMED.swap(false, Ordering::AcqRel) {
        for _ in 0..BURST {
            nmi_to_bsp();
            // Let the host take each NMI now, while this handler blocks
            // NMIs: a host that looks at accepted NMIs only when the vCPU
            // returns from user space would otherwise see all ten after the
            // IRET, when nothing blocks them, and rightly deliver two.
            serial::exit_to_vmm();
        }
    }
    DEPTH.fetch_sub(1, Ordering::AcqRel);
}

/// Each round: one NMI whose handler sends the BSP `BURST` more. They are
/// blocked until the handler's IRET and collapse into one: exactly one more
/// handler run per round, never nested.
fn latched_once() -> TestResult {
    ARMED.store(false, Ordering::Release);
    DEPTH.store(0, Ordering::Release);
    NESTED.store(0, Ordering::Release);
    interrupts::set_handler(2, Some(burst_handler));
    for r in 1..=LATCH_ROUNDS {
        let before = nmis(0);
        check!(
            before == 2 * (r - 1),
            "round {}: {} NMIs handled before it, expected {} (more than one latched)",
            dec(r),
            dec(before),
            dec(2 * (r - 1))
        );
        ARMED.store(true, Ordering::Release);
        nmi_to_bsp();
        if !bsp_wait(|| nmis(0) >= 2 * r) {
            fail!(
                "round {}: {} NMIs handled, expected {} (none latched during the handler, or 5 s late)",
                dec(r),
                dec(nmis(0)),
                dec(2 * r)
            );
        }
    }
    settle();
    let nested = NESTED.load(Ordering::Acquire);
    check!(
        nmis(0) == 2 * LATCH_ROUNDS,
        "{} NMIs handled in {} rounds, expected 2 per round",
        dec(nmis(0)),
        dec(LATCH_ROUNDS)
    );
    check!(nested == 0, "{} NMI handler runs nested", dec(nested));
    Ok(())
}

/// Fixed IPIs the BSP's handler has seen.
static IPIS: AtomicU32 = AtomicU32::new(0);
/// IPI handler runs that found their round's NMI not yet handled.
static EARLY: AtomicU32 = AtomicU32::new(0);
/// The first such round.
static FIRST_EARLY: AtomicU32 = AtomicU32::new(0);

fn ipi_handler(_: u8) {
    let k = IPIS.fetch_add(1, Ordering::AcqRel) + 1;
    if nmis(0) < k {
        EARLY.fetch_add(1, Ordering::AcqRel);
        let _ = FIRST_EARLY.compare_exchange(0, k, Ordering::AcqRel, Ordering::Acquire);
    }
    PROGRESS.store(k, Ordering::Release);
}

/// CPU 1: an NMI, then a fixed IPI, to the BSP, once the BSP has handled the
/// previous round's IPI.
fn nmi_then_ipi_per_round(rounds: usize) -> usize {
    for r in 1..=rounds as u32 {
        if !wait_progress(r - 1) {
            return r as usize;
        }
        nmi_to_bsp();
        lapic::send_ipi(V, Delivery::Fixed, Dest::Physical(apic_id(0)));
    }
    0
}

/// CPU 1 sends the BSP an NMI and then a fixed IPI, round after round: the
/// IPI's handler always finds that round's NMI already handled (NMI before
/// INTR, and the NMI was accepted first).
fn before_fixed_ipi() -> TestResult {
    IPIS.store(0, Ordering::Release);
    EARLY.store(0, Ordering::Release);
    FIRST_EARLY.store(0, Ordering::Release);
    interrupts::set_handler(V, Some(ipi_handler));
    with_cpu1(nmi_then_ipi_per_round, || {
        let mut seen = 0;
        while seen < ROUNDS {
            if !bsp_wait(|| IPIS.load(Ordering::Acquire) > seen) {
                fail!(
                    "round {}: no IPI within 5 s ({} NMIs handled)",
                    dec(seen + 1),
                    dec(nmis(0))
                );
            }
            seen = IPIS.load(Ordering::Acquire);
        }
        settle();
        let early = EARLY.load(Ordering::Acquire);
        check!(
            early == 0,
            "{} of {} IPI handler runs came before their NMI (first in round {})",
            dec(early),
            dec(ROUNDS),
            dec(FIRST_EARLY.load(Ordering::Acquire))
        );
        check!(
            nmis(0) == ROUNDS && count(0, V) == ROUNDS,
            "{} NMIs and {} IPIs handled, expected {} each",
            dec(nmis(0)),
            dec(count(0, V)),
            dec(ROUNDS)
        );
        Ok(())
    })
}
