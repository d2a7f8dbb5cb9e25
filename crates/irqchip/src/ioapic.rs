//! The 82093AA IOAPIC model.
