//! The local APIC alone: xAPIC MMIO, x2APIC MSRs, IA32_APIC_BASE, accepts,
//! acknowledges, EOIs, timer ticks with advancing time, CR8, snapshots.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(what) = irqchip::harness::lapic(data) {
        panic!("lapic invariant broken: {what}");
    }
});
