//! What the fuzz targets share: a counting global allocator, with which a
//! target bounds what one input may make the process allocate
//! ([`check_bounded`], [`peak_growth`]). Only the targets that call it link
//! it.

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

/// Runs `f` and returns its result and the most the heap grew meanwhile
/// above what was live when it started (one thread: the fuzz targets').
pub fn peak_growth<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed).saturating_sub(baseline))
}

/// Runs the harness of fuzz target `target` on `data` and panics (the
/// failure a fuzzer reports) when it names a broken invariant or when the
/// heap grew by more than `fixed + per_byte * data.len()` bytes meanwhile.
pub fn check_bounded(
    target: &str,
    data: &[u8],
    fixed: usize,
    per_byte: usize,
    harness: impl FnOnce(&[u8]) -> Result<(), String>,
) {
    let (result, grew) = peak_growth(|| harness(data));
    if let Err(what) = result {
        panic!("{target} invariant broken: {what}");
    }
    let bound = fixed + per_byte * data.len();
    assert!(
        grew <= bound,
        "one {target} input made the process allocate {grew} bytes (bound {bound})"
    );
}
