//! Time source: the TSC, calibrated once against the LAPIC timer, whose
//! input clock is `LAPIC_BUS_HZ` (1 GHz: one tick per nanosecond at divide 1).

use core::sync::atomic::{AtomicU64, Ordering};

use irqconnect_abi::layout::LAPIC_BUS_HZ;

use crate::{cpu, lapic};

static TSC_PER_MHZ: AtomicU64 = AtomicU64::new(1000);

/// Calibrates the TSC over ~2 ms of LAPIC timer ticks (timer masked).
/// Call on the BSP after its LAPIC is enabled. Returns TSC ticks per µs.
pub fn calibrate() -> u64 {
    const WINDOW_TICKS: u64 = LAPIC_BUS_HZ / 500;
    lapic::timer_start(0, u32::MAX, false, true);
    let c0 = u64::from(lapic::timer_current());
    let t0 = cpu::rdtsc();
    let (mut c1, mut t1);
    loop {
        c1 = u64::from(lapic::timer_current());
        t1 = cpu::rdtsc();
        if c0.saturating_sub(c1) >= WINDOW_TICKS || c1 == 0 {
            break;
        }
    }
    lapic::timer_stop();
    let ns = (c0.saturating_sub(c1)).max(1) * 1_000_000_000 / LAPIC_BUS_HZ;
    let per_us = ((t1 - t0) * 1000 / ns).max(1);
    TSC_PER_MHZ.store(per_us, Ordering::Relaxed);
    per_us
}

/// Microseconds since an arbitrary origin.
pub fn now_us() -> u64 {
    cpu::rdtsc() / TSC_PER_MHZ.load(Ordering::Relaxed)
}

/// Busy-waits `us` microseconds (interrupts are taken if enabled).
pub fn delay_us(us: u64) {
    let end = now_us() + us;
    while now_us() < end {
        cpu::pause();
    }
}

/// Polls `cond` until it holds (true) or `timeout_us` elapsed (false).
pub fn wait_until(timeout_us: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = now_us() + timeout_us;
    loop {
        if cond() {
            return true;
        }
        if now_us() >= end {
            return cond();
        }
        cpu::pause();
    }
}

/// TSC ticks per microsecond found by [`calibrate`].
pub fn tsc_per_us() -> u64 {
    TSC_PER_MHZ.load(Ordering::Relaxed)
}
