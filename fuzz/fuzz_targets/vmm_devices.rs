//! Arbitrary port and MMIO accesses through the VMM's buses and device
//! models, without KVM, checked by `vmm::harness::devices::run` (counters
//! against the accesses made, rate-limited warnings). A counting allocator
//! also bounds the memory one input may make the device layer allocate.
#![no_main]

/// What one input may cost beyond its own bytes: the PV service and its
/// device table, the buses, the UART, the harness's own bookkeeping (guest
/// RAM is a mapping, not heap).
const FIXED_BOUND: usize = 1 << 20;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (result, grew) = irqconnect_fuzz::peak_growth(|| vmm::harness::devices::run(data));
    if let Err(what) = result {
        panic!("vmm_devices invariant broken: {what}");
    }
    // Each input byte may add a few (a console line the report keeps, a
    // test name).
    let bound = FIXED_BOUND + 16 * data.len();
    assert!(
        grew <= bound,
        "one input made the device layer allocate {grew} bytes (bound {bound})"
    );
});
