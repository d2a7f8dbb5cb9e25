//! Pure models of the x86 interrupt controllers: IOAPIC, local APIC, the APIC
//! bus and MSI.
//!
//! No KVM, no libc, no threads, no clocks: time comes in as an argument and
//! every effect goes out as a return value.

#![forbid(unsafe_code)]

pub mod apic_bus;
pub mod ioapic;
pub mod lapic;
pub mod msi;
