//! MSI encode/decode round trips against the SDM bit layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(what) = irqchip::harness::msi::run(data) {
        panic!("msi invariant broken: {what}");
    }
});
