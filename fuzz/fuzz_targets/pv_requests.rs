//! Arbitrary guest memory and doorbell writes through the PV service's
//! doorbell path (`Service::handle_doorbell`), every answer checked by
//! `irqconnect::harness::pv_requests::run`. A counting allocator also bounds
//! the memory one input may make the service allocate.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes live on the heap now, and the most since the last reset.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments, so
// `System`'s guarantees hold; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What one input may cost beyond its own bytes: the service with up to 255
/// connections, the route table, a copy of memory per step for the checks.
const FIXED_BOUND: usize = 1 << 20;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    if let Err(what) = irqconnect::harness::pv_requests::run(data) {
        panic!("pv_requests invariant broken: {what}");
    }
    let grew = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
    let bound = FIXED_BOUND + 4 * data.len();
    assert!(
        grew <= bound,
        "one input made the service allocate {grew} bytes (bound {bound})"
    );
});
