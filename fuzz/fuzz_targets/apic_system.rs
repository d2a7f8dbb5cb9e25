//! IOAPIC + local APICs + bus: destinations against an independent oracle,
//! IRR/ISR/TMR/PPR consistency, IOAPIC pins against the reference model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(what) = irqchip::harness::system::run(data) {
        panic!("apic_system invariant broken: {what}");
    }
});
