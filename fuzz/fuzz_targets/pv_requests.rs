//! Arbitrary guest memory and doorbell writes through the PV service's
//! doorbell path (`Service::handle_doorbell`), every answer checked by
//! `irqconnect::harness::pv_requests::run`. A counting allocator also bounds
//! the memory one input may make the service allocate: the service with up
//! to 255 connections, the route table and the checks' witnesses in 1 MiB,
//! plus 4 bytes per input byte.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    irqconnect_fuzz::check_bounded(
        "pv_requests",
        data,
        1 << 20,
        4,
        irqconnect::harness::pv_requests::run,
    );
});
