//! `timer_`: the LAPIC timer at the 1 GHz bus clock (divide by 1).

use core::sync::atomic::{AtomicU64, Ordering};

use super::fixture::{TIMEOUT_US, count, need_cpus, settle, wait_count};
use crate::display::dec;
use crate::lapic::{self, LVT_TIMER_PERIODIC, REG_LVT_TIMER, REG_TIMER_INITIAL};
use crate::runner::{Failure, Msg, Test, TestResult};
use crate::{check, cpu, fail, interrupts, percpu, smp, time};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("timer_oneshot_fires_once", oneshot),
    Test::new("timer_periodic_fires_repeatedly", periodic),
    Test::new("timer_masked_does_not_fire", masked),
    Test::new("timer_current_count_decrements_steadily", current_count),
    Test::new("timer_oneshot_on_each_ap", oneshot_on_aps),
    Test::new("timer_calibrated_tsc_plausible", tsc_plausible),
    Test::new(
        "timer_oneshot_to_periodic_keeps_counting",
        oneshot_to_periodic,
    ),
    Test::new(
        "timer_periodic_to_oneshot_keeps_counting",
        periodic_to_oneshot,
    ),
    Test::new(
        "timer_expired_oneshot_to_periodic_stays_zero",
        expired_oneshot_to_periodic,
    ),
    Test::new(
        "timer_tsc_deadline_fires_once_at_deadline",
        tsc_deadline_once,
    ),
];

const V: u8 = 0xe0;

fn oneshot() -> TestResult {
    let t0 = time::now_us();
    lapic::timer_start(V, 1_000_000, false, false);
    wait_count(0, V, 1)?;
    let elapsed = time::now_us() - t0;
    time::delay_us(3_000);
    check!(
        count(0, V) == 1,
        "one-shot fired {} times",
        crate::display::dec(count(0, V))
    );
    check!(
        elapsed >= 900,
        "1 ms one-shot fired after {} us",
        crate::display::dec(elapsed)
    );
    check!(
        lapic::timer_current() == 0,
        "current count {} after expiry",
        crate::display::dec(lapic::timer_current())
    );
    Ok(())
}

fn periodic() -> TestResult {
    let t0 = time::now_us();
    lapic::timer_start(V, 500_000, true, false);
    let r = wait_count(0, V, 5);
    let elapsed = time::now_us() - t0;
    lapic::timer_stop();
    r?;
    check!(
        elapsed >= 2_250,
        "5 periods of 500 us took {} us",
        crate::display::dec(elapsed)
    );
    settle();
    let stopped = count(0, V);
    settle();
    check!(count(0, V) == stopped, "timer fired after it was stopped");
    Ok(())
}

fn masked() -> TestResult {
    lapic::timer_start(V, 200_000, false, true);
    let expired = time::wait_until(super::fixture::TIMEOUT_US, || lapic::timer_current() == 0);
    settle();
    lapic::timer_stop();
    check!(expired, "masked one-shot never counted down");
    check!(
        count(0, V) == 0,
        "masked timer delivered {} interrupts",
        crate::display::dec(count(0, V))
    );
    Ok(())
}

fn current_count() -> TestResult {
    lapic::timer_start(V, u32::MAX, false, true);
    let (c0, t0) = (lapic::timer_current(), time::now_us());
    time::delay_us(2_000);
    let (c1, t1) = (lapic::timer_current(), time::now_us());
    lapic::timer_stop();
    let ticks = u64::from(c0 - c1);
    let us = t1 - t0;
    // The TSC was calibrated against this timer at boot: the count must keep
    // falling at that same rate (1000 ticks per microsecond at 1 GHz), +-10%.
    check!(
        ticks * 10 >= us * 1000 * 9 && ticks * 10 <= us * 1000 * 11,
        "{} ticks in {} us",
        crate::display::dec(ticks),
        crate::display::dec(us)
    );
    Ok(())
}

fn start_oneshot(_: usize) -> usize {
    lapic::timer_start(V, 200_000, false, false);
    0
}

fn oneshot_on_aps() -> TestResult {
    need_cpus(2)?;
    for ap in 1..percpu::count() {
        smp::run_on(ap, start_oneshot, 0)?;
        wait_count(ap, V, 1)?;
    }
    settle();
    for c in 0..percpu::count() {
        check!(
            count(c, V) == u32::from(c != 0),
            "cpu {} took {} timer interrupts",
            crate::display::dec(c),
            crate::display::dec(count(c, V))
        );
    }
    Ok(())
}

/// The TSC was calibrated assuming the LAPIC timer counts at 1 GHz: a timer
/// clocked 10x off would show as a TSC below 200 MHz or above 10 GHz.
fn tsc_plausible() -> TestResult {
    let mhz = time::tsc_per_us();
    check!(
        (200..=10_000).contains(&mhz),
        "TSC calibrated at {} MHz against a 1 GHz LAPIC timer: the timer is not at 1 GHz",
        crate::display::dec(mhz)
    );
    Ok(())
}

/// Initial count of the mode-switch tests: 20 ms at 1 GHz (one count per
/// nanosecond at divide by 1).
const SWITCH_COUNT: u32 = 20_000_000;
/// Attempts of a mode-switch scenario before the test gives up.
const ATTEMPTS: u32 = 4;

/// What one attempt of a mode-switch scenario found: `None` when every
/// check held, or what it saw when that is also what a host that stalled
/// the guest at the wrong moment (10 ms or more) produces (no conclusion:
/// try again). A check that fails whatever the host did is a `Failure`.
type Attempt = Result<Option<Msg>, Failure>;

/// Runs `scenario` until an attempt is conclusive; after `ATTEMPTS`
/// inconclusive ones the test fails with the last one's observation.
fn attempts(scenario: fn() -> Attempt) -> TestResult {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let outcome = scenario();
        lapic::timer_stop();
        settle();
        percpu::reset_counters();
        match outcome? {
            None => return Ok(()),
            Some(msg) => last = Some(msg),
        }
    }
    fail!(
        "{} attempts inconclusive (host stalls?), the last: {}",
        dec(ATTEMPTS),
        last.as_ref().map_or("", Msg::as_str)
    )
}

/// An inconclusive attempt, with what it saw.
macro_rules! inconclusive {
    ($($arg:tt)*) => {
        return Ok(Some(Msg::from_fmt(format_args!($($arg)*))))
    };
}

/// Starts the LVT timer (vector `V`, unmasked) with `SWITCH_COUNT` and
/// waits until the count is at or below half.
fn start_and_wait_half(periodic: bool) -> TestResult {
    lapic::timer_start(V, SWITCH_COUNT, periodic, false);
    if !time::wait_until(TIMEOUT_US, || lapic::timer_current() <= SWITCH_COUNT / 2) {
        fail!(
            "current count {} never fell to half of {}",
            dec(lapic::timer_current()),
            dec(SWITCH_COUNT)
        );
    }
    Ok(())
}

/// A one-shot switched to periodic halfway down is not disarmed: the count
/// goes on below half, the timer fires at zero and reloads near the
/// initial count, which the switch kept (KVM's `apic_update_lvtt`; the SDM
/// and the models are discussed in `irqchip::lapic`).
fn oneshot_to_periodic() -> TestResult {
    attempts(|| {
        start_and_wait_half(false)?;
        lapic::write(REG_LVT_TIMER, u32::from(V) | LVT_TIMER_PERIODIC);
        let after = lapic::timer_current();
        if after == 0 {
            // Disarmed, or it ran out before the switch: then it fired.
            if wait_count(0, V, 1).is_ok() {
                inconclusive!("the one-shot ran out before the switch");
            }
            fail!("current count 0 and no interrupt after the switch to periodic (disarmed)");
        }
        if after > SWITCH_COUNT / 2 {
            inconclusive!("count {} after the switch: reloaded already", dec(after));
        }
        // The reload: a read above the one before it.
        let mut prev = after;
        let mut reloaded = 0;
        time::wait_until(TIMEOUT_US, || {
            let c = lapic::timer_current();
            if c > prev {
                reloaded = c;
            }
            prev = c;
            reloaded != 0
        });
        let initial = lapic::read(REG_TIMER_INITIAL);
        check!(
            reloaded != 0,
            "no reload within {} us of the switch to periodic: the count stayed at {}",
            dec(TIMEOUT_US),
            dec(prev)
        );
        check!(
            initial == SWITCH_COUNT,
            "initial count {} after the switch, expected {}",
            dec(initial),
            dec(SWITCH_COUNT)
        );
        wait_count(0, V, 1)?;
        if reloaded <= SWITCH_COUNT / 2 {
            inconclusive!(
                "reloaded to {}, expected near {} (or read late)",
                dec(reloaded),
                dec(SWITCH_COUNT)
            );
        }
        Ok(None)
    })
}

/// A periodic timer switched to one-shot halfway down its first period is
/// not disarmed: the count goes on falling, the timer fires once at zero
/// and stays there; the initial count is kept.
fn periodic_to_oneshot() -> TestResult {
    attempts(|| {
        start_and_wait_half(true)?;
        lapic::write(REG_LVT_TIMER, u32::from(V));
        let after = lapic::timer_current();
        let mut low = after;
        let mut rose = 0;
        let zero = time::wait_until(TIMEOUT_US, || {
            let c = lapic::timer_current();
            if c > low {
                rose = c;
            }
            low = low.min(c);
            c == 0 || rose != 0
        });
        check!(
            rose == 0,
            "the count rose from {} to {} after the switch to one-shot (reloaded)",
            dec(low),
            dec(rose)
        );
        check!(zero, "the count stayed at {}", dec(low));
        // Disarmed at the switch: zero at once and no interrupt, ever.
        if wait_count(0, V, 1).is_err() {
            fail!(
                "no interrupt after the switch to one-shot (count {} right after it: disarmed)",
                dec(after)
            );
        }
        // Past where a periodic timer would have fired again.
        time::delay_us(u64::from(SWITCH_COUNT / 1000) + 5_000);
        let (later, fired, initial) = (
            lapic::timer_current(),
            count(0, V),
            lapic::read(REG_TIMER_INITIAL),
        );
        check!(
            later == 0,
            "count {} a period after reaching zero (restarted)",
            dec(later)
        );
        check!(
            initial == SWITCH_COUNT,
            "initial count {} after the switch, expected {}",
            dec(initial),
            dec(SWITCH_COUNT)
        );
        check!(
            fired <= 2,
            "{} interrupts: the one-shot fired again",
            dec(fired)
        );
        if fired == 2 || after == 0 {
            // A period ended before the switch (its interrupt late).
            inconclusive!(
                "{} interrupts, count {} after the switch: the first period ended before it",
                dec(fired),
                dec(after)
            );
        }
        Ok(None)
    })
}

/// A one-shot that has fired and stopped at zero stays at zero when
/// switched to periodic: the switch starts nothing.
fn expired_oneshot_to_periodic() -> TestResult {
    const SHORT: u32 = 1_000_000;
    lapic::timer_start(V, SHORT, false, false);
    wait_count(0, V, 1)?;
    let stopped = lapic::timer_current();
    lapic::write(REG_LVT_TIMER, u32::from(V) | LVT_TIMER_PERIODIC);
    let after = lapic::timer_current();
    time::delay_us(3 * u64::from(SHORT / 1000));
    let (later, fired, initial) = (
        lapic::timer_current(),
        count(0, V),
        lapic::read(REG_TIMER_INITIAL),
    );
    lapic::timer_stop();
    check!(
        stopped == 0 && after == 0 && later == 0,
        "current count {} after expiry, {} after the switch to periodic, {} 3 ms later",
        dec(stopped),
        dec(after),
        dec(later)
    );
    check!(
        fired == 1,
        "{} interrupts: the switch restarted the timer",
        dec(fired)
    );
    check!(
        initial == SHORT,
        "initial count {} after the switch, expected {}",
        dec(initial),
        dec(SHORT)
    );
    Ok(())
}

/// TSC when the TSC-deadline test's handler ran.
static FIRED_TSC: AtomicU64 = AtomicU64::new(0);

fn note_tsc(_: u8) {
    FIRED_TSC.store(cpu::rdtsc(), Ordering::Release);
}

/// How far ahead the TSC-deadline test arms the timer.
const DEADLINE_US: u64 = 10_000;
/// How late its interrupt may come before the attempt counts as disturbed
/// by the host; a timer clock that is off makes every attempt late.
const DEADLINE_LATE_US: u64 = 20_000;

/// CPUID offers TSC-deadline mode; a deadline 10 ms ahead reads back until
/// it fires, fires once, never before the TSC reaches it, and then reads 0
/// (SDM 11.5.4.1). Firing more than `DEADLINE_LATE_US` late in every
/// attempt fails too.
fn tsc_deadline_once() -> TestResult {
    check!(
        cpu::cpuid(1, 0).2 & (1 << 24) != 0,
        "CPUID.01H:ECX[24] clear: TSC-deadline mode not offered"
    );
    interrupts::set_handler(V, Some(note_tsc));
    attempts(tsc_deadline_attempt)
}

fn tsc_deadline_attempt() -> Attempt {
    FIRED_TSC.store(0, Ordering::Release);
    lapic::write(REG_LVT_TIMER, u32::from(V) | lapic::LVT_TIMER_TSC_DEADLINE);
    // The SDM asks for the LVT write to be ordered before the MSR write
    // (MFENCE after an xAPIC write); CPUID serialises.
    let _ = cpu::cpuid(0, 0);
    let per_us = time::tsc_per_us();
    let deadline = cpu::rdtsc() + DEADLINE_US * per_us;
    // SAFETY: CPUID offers TSC-deadline mode (checked by the caller), so
    // the MSR exists; arming the LAPIC timer has no memory effects.
    let armed = unsafe {
        cpu::wrmsr(lapic::MSR_TSC_DEADLINE, deadline);
        cpu::rdmsr(lapic::MSR_TSC_DEADLINE)
    };
    let read_at = cpu::rdtsc();
    wait_count(0, V, 1)?;
    let fired = FIRED_TSC.load(Ordering::Acquire);
    // SAFETY: as above.
    let after = unsafe { cpu::rdmsr(lapic::MSR_TSC_DEADLINE) };
    settle();
    let total = count(0, V);
    check!(
        armed == deadline || (armed == 0 && read_at >= deadline),
        "IA32_TSC_DEADLINE read {} before the deadline, written {}",
        crate::display::hex(armed),
        crate::display::hex(deadline)
    );
    check!(
        fired >= deadline,
        "fired {} us before the deadline",
        dec((deadline - fired) / per_us)
    );
    check!(
        after == 0,
        "IA32_TSC_DEADLINE reads {} after firing, expected 0",
        crate::display::hex(after)
    );
    check!(total == 1, "fired {} times", dec(total));
    if fired - deadline > DEADLINE_LATE_US * per_us {
        inconclusive!(
            "fired {} us after the deadline",
            dec((fired - deadline) / per_us)
        );
    }
    Ok(None)
}
