//! `bench_`: interrupt-path benchmarks, timed by this guest's TSC, so one
//! image measures the same thing under any VMM. Not in the default run:
//! the runner selects a `bench_` test only when a `tests=` entry that
//! names `bench` matches it (`tests=bench_`, `tests=bench_self_ipi`).
//!
//! Each prints one line, `# bench NAME: N samples, median X ns, p99 Y ns`,
//! and passes when every sample completed (a lost interrupt fails it with
//! the timeout of the fixtures). Speeds are compared outside the guest
//! (`resources/bench/compare`), never asserted here. Every benchmark but
//! the two PV ones needs only the raw hardware QEMU also has (pc-testdev,
//! IOAPIC, LAPIC); those two skip visibly without the PV doorbell.

use core::sync::atomic::{AtomicU64, Ordering};

use super::fixture::{PIN_A, PIN_B, TIMEOUT_US, apic_id, count, need_cpus};
use super::msgfix::{MCTX, connect_messages, disconnect_messages};
use super::pvfix::{self, Args, CTX, Env, Policy, connect_ok, disconnect_ok};
use crate::interrupts;
use crate::ioapic::{self, RTE_REMOTE_IRR, Rte};
use crate::lapic::{self, Delivery, Dest};
use crate::msidev::MsiDev;
use crate::runner::{Test, TestResult};
use crate::wdm::KINTERRUPT_MODE;
use crate::{cpu, fail, lines, println, time};

/// The suite (kept out of the default run by the runner).
pub const TESTS: &[Test] = &[
    Test::new("bench_edge_roundtrip", edge_roundtrip),
    Test::new("bench_level_roundtrip", level_roundtrip),
    Test::new("bench_self_ipi", self_ipi),
    Test::new("bench_ipi_pingpong", ipi_pingpong),
    Test::new(
        "bench_lapic_timer_oneshot_latency",
        lapic_timer_oneshot_latency,
    ),
    Test::new("bench_tpr_write", tpr_write),
    Test::new("bench_pv_connect_disconnect", pv_connect_disconnect),
    Test::new("bench_msi_roundtrip", msi_roundtrip),
];

/// Samples per benchmark: enough for a p99, short under an emulating host.
const SAMPLES: usize = 400;
/// Samples of the PV connect/disconnect pair (each is two doorbell rings).
const PV_SAMPLES: usize = 200;
/// Vectors (IOAPIC range 0x30..0x5F; IPI and timer range 0xC0..0xFD).
const V_EDGE: u8 = 0x3a;
const V_LEVEL: u8 = 0x3b;
const V_SELF: u8 = 0xd0;
const V_PING: u8 = 0xd1;
const V_PONG: u8 = 0xd2;
const V_TIMER: u8 = 0xd3;
/// The one-shot timer's count: 20 us at the 1 GHz LAPIC bus, divide 1.
const TIMER_TICKS: u32 = 20_000;

/// TSC ticks as nanoseconds.
fn ns(ticks: u64) -> u64 {
    ticks.saturating_mul(1000) / time::tsc_per_us().max(1)
}

/// Sorts `samples` (shell sort: no allocation, fine for hundreds).
fn sort(samples: &mut [u64]) {
    let mut gap = samples.len() / 2;
    while gap > 0 {
        for i in gap..samples.len() {
            let mut j = i;
            while j >= gap && samples[j - gap] > samples[j] {
                samples.swap(j - gap, j);
                j -= gap;
            }
        }
        gap /= 2;
    }
}

/// Prints the benchmark line of `samples` (TSC ticks).
fn report(name: &str, samples: &mut [u64]) -> TestResult {
    if samples.is_empty() {
        fail!("no samples");
    }
    sort(samples);
    let n = samples.len();
    let median = samples[n / 2];
    let p99 = samples[(n * 99 / 100).min(n - 1)];
    println!(
        "# bench {}: {} samples, median {} ns, p99 {} ns",
        name,
        crate::display::dec(n),
        crate::display::dec(ns(median)),
        crate::display::dec(ns(p99))
    );
    Ok(())
}

/// Waits for an interrupt to this processor as an idle guest does: `hlt`
/// until `cond` holds (checked with interrupts off, then `sti; hlt`, so
/// an interrupt between the check and the `hlt` still wakes it). Some
/// hosts take a pending interrupt only at an exit (README, "Host KVM
/// quirks"); `hlt` is one, so every VMM delivers at once. An interrupt
/// that never comes leaves the processor halted: the VMM's `--timeout`
/// (which names the test) ends the run.
fn wait(what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    let end = time::now_us() + TIMEOUT_US;
    loop {
        cpu::cli();
        if cond() {
            cpu::sti();
            return Ok(());
        }
        if time::now_us() >= end {
            cpu::sti();
            fail!("timeout waiting for {}", what);
        }
        cpu::sti_hlt();
    }
}

/// Waits for `cond` with a port read of `dev` on every turn (an exit,
/// at which a pending interrupt is taken), for an interrupt that may go
/// to another processor.
fn wait_io(dev: &MsiDev, what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    if time::wait_until(TIMEOUT_US, || {
        let _ = dev.pending();
        cond()
    }) {
        Ok(())
    } else {
        fail!("timeout waiting for {}", what)
    }
}

/// Pin A edge to the BSP: the pc-testdev pulse (two port writes), the
/// delivery, the ISR and its EOI, until the main loop sees it counted.
fn edge_roundtrip() -> TestResult {
    ioapic::write_rte(PIN_A, Rte::new(V_EDGE, apic_id(0) as u8).0);
    let mut samples = [0u64; SAMPLES];
    for s in samples.iter_mut() {
        let before = count(0, V_EDGE);
        let t0 = cpu::rdtsc();
        lines::pulse(PIN_A);
        wait("the edge interrupt", || count(0, V_EDGE) > before)?;
        *s = cpu::rdtsc() - t0;
    }
    ioapic::mask(PIN_A);
    report("bench_edge_roundtrip", &mut samples)
}

fn lower_level_line(_: u8) {
    lines::set(PIN_B, false);
}

/// Pin B level to the BSP: assert, the ISR de-asserts, EOI, until Remote
/// IRR reads clear. (A host LAPIC that EOIs at injection delivers a level
/// vector a second time before the ISR lowers the line; the next sample
/// starts after every delivery of this one.)
fn level_roundtrip() -> TestResult {
    ioapic::write_rte(PIN_B, Rte::new(V_LEVEL, apic_id(0) as u8).level().0);
    interrupts::set_handler(V_LEVEL, Some(lower_level_line));
    let mut samples = [0u64; SAMPLES];
    for s in samples.iter_mut() {
        let before = count(0, V_LEVEL);
        let t0 = cpu::rdtsc();
        lines::set(PIN_B, true);
        wait("the level interrupt", || count(0, V_LEVEL) > before)?;
        wait("Remote IRR to clear", || {
            ioapic::read_rte(PIN_B) & RTE_REMOTE_IRR == 0
        })?;
        *s = cpu::rdtsc() - t0;
    }
    ioapic::mask(PIN_B);
    interrupts::set_handler(V_LEVEL, None);
    report("bench_level_roundtrip", &mut samples)
}

/// A self IPI (shorthand), its ISR and EOI.
fn self_ipi() -> TestResult {
    let mut samples = [0u64; SAMPLES];
    for s in samples.iter_mut() {
        let before = count(0, V_SELF);
        let t0 = cpu::rdtsc();
        lapic::send_ipi(V_SELF, Delivery::Fixed, Dest::SelfOnly);
        wait("the self IPI", || count(0, V_SELF) > before)?;
        *s = cpu::rdtsc() - t0;
    }
    report("bench_self_ipi", &mut samples)
}

fn pong(_: u8) {
    lapic::send_ipi(V_PONG, Delivery::Fixed, Dest::Physical(apic_id(0)));
}

/// The BSP sends CPU 1 an IPI whose ISR sends one back: one round trip
/// per sample (CPU 1 idles in `hlt` between them).
fn ipi_pingpong() -> TestResult {
    need_cpus(2)?;
    interrupts::set_handler(V_PING, Some(pong));
    let mut samples = [0u64; SAMPLES];
    for s in samples.iter_mut() {
        let before = count(0, V_PONG);
        let t0 = cpu::rdtsc();
        lapic::send_ipi(V_PING, Delivery::Fixed, Dest::Physical(apic_id(1)));
        wait("the pong IPI", || count(0, V_PONG) > before)?;
        *s = cpu::rdtsc() - t0;
    }
    interrupts::set_handler(V_PING, None);
    report("bench_ipi_pingpong", &mut samples)
}

static TIMER_FIRED_AT: AtomicU64 = AtomicU64::new(0);

fn timer_fired(_: u8) {
    TIMER_FIRED_AT.store(cpu::rdtsc(), Ordering::Release);
}

/// A one-shot LAPIC timer of 20 us: from its programmed expiry to its ISR
/// (0 when it fired early by the TSC).
fn lapic_timer_oneshot_latency() -> TestResult {
    interrupts::set_handler(V_TIMER, Some(timer_fired));
    let period = u64::from(TIMER_TICKS) / 1000 * time::tsc_per_us();
    let mut samples = [0u64; SAMPLES];
    for s in samples.iter_mut() {
        TIMER_FIRED_AT.store(0, Ordering::Release);
        let t0 = cpu::rdtsc();
        lapic::timer_start(V_TIMER, TIMER_TICKS, false, false);
        wait("the one-shot timer", || {
            TIMER_FIRED_AT.load(Ordering::Acquire) != 0
        })?;
        let fired = TIMER_FIRED_AT.load(Ordering::Acquire);
        *s = fired.saturating_sub(t0).saturating_sub(period);
    }
    lapic::timer_stop();
    interrupts::set_handler(V_TIMER, None);
    report("bench_lapic_timer_oneshot_latency", &mut samples)
}

/// One CR8 write (the task priority), alternately raising to 2 and
/// lowering to 0 with nothing pending.
fn tpr_write() -> TestResult {
    let mut samples = [0u64; SAMPLES];
    for (i, s) in samples.iter_mut().enumerate() {
        let value = if i % 2 == 0 { 2 } else { 0 };
        let t0 = cpu::rdtsc();
        cpu::write_cr8(value);
        *s = cpu::rdtsc() - t0;
    }
    cpu::write_cr8(0);
    report("bench_tpr_write", &mut samples)
}

/// IoConnectInterrupt then IoDisconnectInterrupt of an exclusive level
/// device through the PV doorbell: one pair per sample.
fn pv_connect_disconnect() -> TestResult {
    pvfix::run(pv_connect_disconnect_in)
}

fn pv_connect_disconnect_in(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let _ = CTX[0].bind(Some(&dev), Policy::One, env.online());
    let a = Args::of(&dev, 0, &CTX[0]);
    let mut samples = [0u64; PV_SAMPLES];
    for s in samples.iter_mut() {
        let t0 = cpu::rdtsc();
        let h = connect_ok(&dev, &a)?;
        disconnect_ok(h)?;
        *s = cpu::rdtsc() - t0;
    }
    report("bench_pv_connect_disconnect", &mut samples)
}

/// A message-signaled test device's one message, connected MESSAGE_BASED
/// through the PV doorbell: RAISE (one port write), delivery, the message
/// service routine and EOI, until the main loop sees it handled (polling
/// the device's PENDING register: the message's processor is the host's
/// choice, maybe not this one).
fn msi_roundtrip() -> TestResult {
    pvfix::run(msi_roundtrip_in)
}

fn msi_roundtrip_in(env: &Env) -> TestResult {
    let m = env.message_device("MSI device with one message", |m| {
        !m.is_msix() && m.count() == 1
    })?;
    let ctx = MCTX[0].bind(&m);
    let table = connect_messages(&m, ctx)?;
    m.md.set_mask(0);
    let mut samples = [0u64; SAMPLES];
    for s in samples.iter_mut() {
        let before = ctx.handled(0);
        let t0 = cpu::rdtsc();
        m.md.raise(0);
        wait_io(&m.md, "the message routine", || ctx.handled(0) > before)?;
        *s = cpu::rdtsc() - t0;
    }
    m.md.set_mask(m.all());
    disconnect_messages(table)?;
    ctx.check_clean("of the benchmarked MSI device")?;
    report("bench_msi_roundtrip", &mut samples)
}
