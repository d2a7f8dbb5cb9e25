//! A snapshot file from arbitrary bytes through every check `vmm --restore`
//! makes before it opens KVM, checked by `vmm::harness::snapshot::run` (no
//! panic, one-line refusals, accepted files consistent). A counting
//! allocator bounds what one input may make the decoding allocate: the
//! decoded states are bounded by the bytes postcard reads, so 1 MiB plus
//! 64 bytes per input byte (the file's own copy, the PV device table
//! rebuilt for each mode).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    irqconnect_fuzz::check_bounded(
        "snapshot_restore",
        data,
        1 << 20,
        64,
        vmm::harness::snapshot::run,
    );
});
