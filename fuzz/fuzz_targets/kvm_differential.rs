//! Our IOAPIC, LAPICs and bus against KVM's in-kernel IOAPIC and LAPICs in
//! a VM whose vCPUs never run: line levels, host entry writes, MSIs, LAPIC
//! register pages and IA32_APIC_BASE, with IRR/TMR, the addressing
//! registers and the IOAPIC entries compared after every step. Needs
//! /dev/kvm.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(what) = irqchip_kvm::differential::run(data) {
        panic!("kvm_differential: {what}");
    }
});
