//! Arbitrary guest memory and doorbell writes through the PV service's
//! doorbell path (`Service::handle_doorbell`), every answer checked by
//! `irqconnect::harness::pv_requests::run`. A counting allocator also bounds
//! the memory one input may make the service allocate.
#![no_main]

/// What one input may cost beyond its own bytes: the service with up to 255
/// connections, the route table, the checks' witnesses.
const FIXED_BOUND: usize = 1 << 20;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (result, grew) =
        irqconnect_fuzz::peak_growth(|| irqconnect::harness::pv_requests::run(data));
    if let Err(what) = result {
        panic!("pv_requests invariant broken: {what}");
    }
    let bound = FIXED_BOUND + 4 * data.len();
    assert!(
        grew <= bound,
        "one input made the service allocate {grew} bytes (bound {bound})"
    );
});
