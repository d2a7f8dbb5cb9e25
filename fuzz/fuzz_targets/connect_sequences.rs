//! Structured connect / disconnect / assert / storm / snapshot sequences
//! against the harness's reference of `docs/semantics.md`
//! (`irqconnect::harness::sequences`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(what) = irqconnect::harness::sequences::run(data) {
        panic!("connect_sequences invariant broken: {what}");
    }
});
