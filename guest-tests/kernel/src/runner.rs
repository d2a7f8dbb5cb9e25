//! The test runner: named tests in static tables, the `tests=A,B` filter,
//! the test-marker port, one result line per test, the closing line
//! `N passed, M failed`, and the exit code on port 0xf4.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use irqconnect_abi::layout::{EXIT_PORT, IOAPIC_PINS, TEST_MARKER_PORT};

use crate::interrupts::{self, WAKE_VECTOR};
use crate::{cpu, ioapic, irql, lapic, lines, percpu, println, smp, time};

/// A registered test.
pub struct Test {
    /// Name printed in the result line (snake_case, grouped by prefix).
    pub name: &'static str,
    /// The test body; runs on the BSP with interrupts enabled at IRQL 0.
    pub run: fn() -> TestResult,
}

/// A failure or skip message, formatted without allocation.
pub struct Msg {
    buf: [u8; 200],
    len: usize,
}

impl Msg {
    /// Formats `args`, truncated to the buffer.
    pub fn from_fmt(args: fmt::Arguments<'_>) -> Self {
        let mut m = Self {
            buf: [0; 200],
            len: 0,
        };
        let _ = m.write_fmt(args);
        m
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                break;
            }
            self.buf[self.len] = if b == b'\n' { b' ' } else { b };
            self.len += 1;
        }
        Ok(())
    }
}

impl Test {
    /// A table entry.
    pub const fn new(name: &'static str, run: fn() -> TestResult) -> Self {
        Self { name, run }
    }
}

/// Why a test did not pass.
pub enum Failure {
    /// `FAIL NAME: reason`.
    Fail(Msg),
    /// `skip NAME: reason` (cannot apply here, e.g. too few CPUs).
    Skip(Msg),
}

impl From<&'static str> for Failure {
    fn from(s: &'static str) -> Self {
        Failure::Fail(Msg::from_fmt(format_args!("{}", s)))
    }
}

/// What a test returns.
pub type TestResult = Result<(), Failure>;

/// Fails the current test with a formatted reason.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::runner::Failure::Fail($crate::runner::Msg::from_fmt(format_args!($($arg)*))))
    };
}

/// Fails the current test unless the condition holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::fail!($($arg)*);
        }
    };
}

/// Skips the current test with a formatted reason.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {
        return Err($crate::runner::Failure::Skip($crate::runner::Msg::from_fmt(format_args!($($arg)*))))
    };
}

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);
static CURRENT_PTR: AtomicUsize = AtomicUsize::new(0);
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);

fn current_name() -> &'static str {
    let ptr = CURRENT_PTR.load(Ordering::Acquire);
    if ptr == 0 {
        return "boot";
    }
    let len = CURRENT_LEN.load(Ordering::Acquire);
    // SAFETY: ptr/len were taken from a `&'static str` test name.
    let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, len) };
    core::str::from_utf8(bytes).unwrap_or("?")
}

fn set_current(name: &'static str) {
    CURRENT_LEN.store(name.len(), Ordering::Release);
    CURRENT_PTR.store(name.as_ptr() as usize, Ordering::Release);
}

/// Writes the exit code to the exit port; halts if the VM goes on.
pub fn exit(code: u32) -> ! {
    // SAFETY: the exit port ends the VM; no memory effects.
    unsafe { cpu::outl(EXIT_PORT, code) };
    cpu::halt_forever()
}

/// Ends the run from any CPU: `FAIL <current test>: reason`, the closing
/// line counting this failure, exit code 1.
pub fn fatal(args: fmt::Arguments<'_>) -> ! {
    println!("FAIL {}: {}", current_name(), args);
    println!(
        "{} passed, {} failed",
        crate::display::dec(PASSED.load(Ordering::Acquire)),
        crate::display::dec(FAILED.load(Ordering::Acquire) + 1)
    );
    exit(1)
}

fn marker(name: &str) {
    // SAFETY: the test-marker port only records bytes.
    unsafe {
        for b in name.bytes() {
            cpu::outb(TEST_MARKER_PORT, b);
        }
        cpu::outb(TEST_MARKER_PORT, b'\n');
    }
}

/// Name prefix of the benchmarks, which run only when asked for.
pub const BENCH_PREFIX: &str = "bench_";

/// Whether `filter` (the `tests=` value) selects test `name`: without a
/// filter every test but the benchmarks; with one, the tests whose name
/// contains an entry, and a benchmark only through an entry that itself
/// names `bench` (so `tests=tpr_` does not time `bench_tpr_write`).
fn selected(name: &str, filter: Option<&str>) -> bool {
    let bench = name.starts_with(BENCH_PREFIX);
    match filter {
        None => !bench,
        Some(f) => f
            .split(',')
            .filter(|p| !p.is_empty())
            .any(|p| contains(name, p) && (!bench || contains(p, "bench"))),
    }
}

/// Substring test by bytes (`str::contains` builds a two-way searcher whose
/// set-up uses SSE instructions the emulator here lacks).
fn contains(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.len() <= h.len() && (0..=h.len() - n.len()).any(|i| &h[i..i + n.len()] == n)
}

/// Puts the machine back into a known state between tests: test pins masked
/// and lines low, handlers removed, IRQL 0, timer stopped, stragglers
/// drained, counters zeroed.
fn reset_platform() {
    for pin in 1..IOAPIC_PINS.min(16) {
        ioapic::mask(pin);
        lines::set(pin, false);
    }
    interrupts::clear_handlers();
    irql::set(irql::PASSIVE_LEVEL);
    lapic::timer_stop();
    cpu::sti();
    time::delay_us(200);
    percpu::reset_counters();
    let _ = WAKE_VECTOR;
}

fn reset_ap(_: usize) -> usize {
    irql::set(irql::PASSIVE_LEVEL);
    lapic::timer_stop();
    0
}

/// After a failure: puts each AP back to IRQL 0 with its timer stopped (a
/// failed test may have returned before undoing what it did there). An AP
/// still busy with the failed test's work item is left alone.
fn reset_aps() {
    for c in 1..percpu::count() {
        if percpu::cpu(c).mailbox.idle() {
            let _ = smp::run_on(c, reset_ap, 0);
        }
    }
    time::delay_us(200);
    percpu::reset_counters();
}

/// Command-line key `snapshot=each`: a snapshot between every two tests
/// (see [`snapshot_between`]).
fn snapshot_each() -> bool {
    crate::multiboot::option("snapshot") == Some("each")
}

/// `snapshot=each`: before every test but the first, with the previous
/// test's clean-up done and every AP idle, asks the VMM for a snapshot
/// (tagged with the number of tests run so far), so the host can run the
/// suite as a chain of restores. Nothing happens when the VMM takes no
/// snapshots (no device, or no `--snapshot`). Returns whether one was
/// requested. Prints what the guest saw of the pause, its TSC across the
/// request (after a restore, counted from the saved TSC on):
/// `# snapshot N: paused U us` (the VMM's snapshot benchmark reads it).
fn snapshot_between(ran: u32) -> bool {
    if !crate::snapshot::enabled() {
        return false;
    }
    let before = cpu::rdtsc();
    crate::snapshot::take(ran);
    let us = cpu::rdtsc().wrapping_sub(before) / time::tsc_per_us().max(1);
    println!(
        "# snapshot {}: paused {} us",
        crate::display::dec(ran),
        crate::display::dec(us)
    );
    true
}

/// Runs every test of `suites` that `filter` selects, prints the closing
/// line and exits.
pub fn run(suites: &[&[Test]], filter: Option<&str>) -> ! {
    let each = snapshot_each();
    let (mut ran, mut snapshots) = (0u32, 0u32);
    for test in suites.iter().flat_map(|s| s.iter()) {
        if !selected(test.name, filter) {
            continue;
        }
        if each && ran > 0 && snapshot_between(ran) {
            snapshots += 1;
        }
        ran += 1;
        set_current(test.name);
        marker(test.name);
        reset_platform();
        let result = (test.run)();
        reset_platform();
        if !matches!(result, Ok(()) | Err(Failure::Skip(_))) {
            reset_aps();
        }
        match result {
            Ok(()) => {
                PASSED.fetch_add(1, Ordering::AcqRel);
                println!("ok {}", test.name);
            }
            Err(Failure::Fail(msg)) => {
                FAILED.fetch_add(1, Ordering::AcqRel);
                println!("FAIL {}: {}", test.name, msg.as_str());
            }
            Err(Failure::Skip(msg)) => println!("skip {}: {}", test.name, msg.as_str()),
        }
    }
    CURRENT_PTR.store(0, Ordering::Release);
    if each {
        match crate::snapshot::unavailable_reason() {
            Some(why) if snapshots == 0 => println!("# snapshot=each: no snapshot taken: {}", why),
            _ => println!(
                "# snapshot=each: {} snapshots requested, restored {} times",
                crate::display::dec(snapshots),
                crate::display::dec(crate::snapshot::restores())
            ),
        }
    }
    let (passed, failed) = (
        PASSED.load(Ordering::Acquire),
        FAILED.load(Ordering::Acquire),
    );
    println!(
        "{} passed, {} failed",
        crate::display::dec(passed),
        crate::display::dec(failed)
    );
    exit(u32::from(failed != 0))
}
