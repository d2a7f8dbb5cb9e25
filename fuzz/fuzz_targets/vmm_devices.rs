//! Arbitrary port and MMIO accesses through the VMM's buses and device
//! models, without KVM, checked by `vmm::harness::devices::run` (counters
//! against the accesses made, rate-limited warnings). A counting allocator
//! also bounds the memory one input may make the device layer allocate: the
//! PV service and its device table, the buses, the UART and the harness's
//! bookkeeping in 1 MiB (guest RAM is a mapping, not heap), plus 16 bytes
//! per input byte (a console line the report keeps, a test name).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    irqconnect_fuzz::check_bounded("vmm_devices", data, 1 << 20, 16, vmm::harness::devices::run);
});
