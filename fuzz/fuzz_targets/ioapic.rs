//! The IOAPIC alone against the reference model: IOREGSEL/IOWIN/EOI-register
//! accesses of every width and offset, line levels, EOI broadcasts, host RTE
//! writes, snapshot/restore, reset, split-mode routes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(what) = irqchip::harness::ioapic::run(data) {
        panic!("ioapic invariant broken: {what}");
    }
});
