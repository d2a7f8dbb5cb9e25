//! `timer_`: the LAPIC timer at the 1 GHz bus clock (divide by 1).

use super::fixture::{count, need_cpus, settle, wait_count};
use crate::lapic;
use crate::runner::{Test, TestResult};
use crate::{check, percpu, smp, time};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("timer_oneshot_fires_once", oneshot),
    Test::new("timer_periodic_fires_repeatedly", periodic),
    Test::new("timer_masked_does_not_fire", masked),
    Test::new("timer_current_count_decrements_steadily", current_count),
    Test::new("timer_oneshot_on_each_ap", oneshot_on_aps),
    Test::new("timer_calibrated_tsc_plausible", tsc_plausible),
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
