//! The local APIC model (xAPIC and x2APIC).
