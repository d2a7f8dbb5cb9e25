//! Register layouts and constants of the IOAPIC.
//!
//! Sources: the Intel 82093AA I/O Advanced Programmable Interrupt Controller
//! datasheet (section 3, "Register Description") and the Intel I/O
//! Controller Hub 10 (ICH10) datasheet (section 13.5, "Advanced
//! Programmable Interrupt Controller (APIC) (D31:F0)"), whose IOxAPIC is
//! the version-0x20 variant modelled here.

use bitfield_struct::bitfield;

use crate::apic_bus::DeliveryMode;

/// Number of interrupt input pins (82093AA section 1, "24 interrupt
/// lines"; ICH10 13.5.6, MRE hardwired to 17h).
pub const NUM_PINS: usize = 24;

/// The highest redirection entry index reported in the version register
/// (ICH10 13.5.6, MRE = 17h).
pub const MAX_REDIRECTION_ENTRY: u8 = (NUM_PINS - 1) as u8;

/// The implementation version: 0x20, the ICH IOxAPIC with the EOI register
/// (ICH10 13.5.6, VER default 0017_0020h).
pub const VERSION: u8 = 0x20;

/// MMIO offset of IOREGSEL, the 8-bit index register (82093AA 3.1.1;
/// ICH10 13.5.2 "IND").
pub const IOREGSEL_OFFSET: u64 = 0x00;

/// MMIO offset of IOWIN, the 32-bit data window onto the register that
/// IOREGSEL selects (82093AA 3.1.2; ICH10 13.5.3 "DAT").
pub const IOWIN_OFFSET: u64 = 0x10;

/// MMIO offset of the EOI register: writing a vector clears Remote IRR of
/// every entry with that vector (ICH10 13.5.4 "EOIR"; not in the 82093AA).
pub const EOI_OFFSET: u64 = 0x40;

/// Indirect register index of the ID register (82093AA 3.2.1 "IOAPICID";
/// ICH10 13.5.5).
pub const REG_ID: u8 = 0x00;

/// Indirect register index of the version register (82093AA 3.2.2
/// "IOAPICVER"; ICH10 13.5.6).
pub const REG_VERSION: u8 = 0x01;

/// Indirect register index of the arbitration ID register (82093AA 3.2.3
/// "IOAPICARB").
pub const REG_ARBITRATION: u8 = 0x02;

/// Indirect register index of redirection entry 0's low dword; entry `n`
/// is at `0x10 + 2n` (low) and `0x11 + 2n` (high) (82093AA 3.2.4
/// "IOREDTBL"; ICH10 13.5.7).
pub const REG_REDIRECTION_BASE: u8 = 0x10;

/// One past the last redirection register index (entry 23's high dword is
/// 0x3f) (82093AA 3.2.4).
pub const REG_REDIRECTION_END: u8 = REG_REDIRECTION_BASE + 2 * NUM_PINS as u8;

/// Bits of the ID register software may write: the 4-bit APIC ID, bits
/// 24..27 (82093AA 3.2.1).
pub const ID_WRITABLE_MASK: u32 = 0x0f00_0000;

/// The ID register's APIC ID field, 4 bits (82093AA 3.2.1).
pub const ID_FIELD_MASK: u8 = 0xf;

/// Default threshold of the storm guard: consecutive re-deliveries of one
/// pin after EOI before it is reported. 10 000 is the count after which
/// QEMU and KVM start throttling a level interrupt that never drops.
pub const DEFAULT_STORM_THRESHOLD: u32 = 10_000;

/// The ID register (82093AA 3.2.1; ICH10 13.5.5).
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash)]
pub struct IdRegister {
    #[bits(24)]
    __: u32,
    /// Bits 24..27: the IOAPIC's APIC ID, R/W.
    #[bits(4)]
    pub id: u8,
    #[bits(4)]
    __: u8,
}

/// The version register, read-only (82093AA 3.2.2; ICH10 13.5.6).
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash)]
pub struct VersionRegister {
    /// Bits 0..7: implementation version.
    pub version: u8,
    #[bits(8)]
    __: u8,
    /// Bits 16..23: index of the highest redirection entry.
    pub max_redirection_entry: u8,
    #[bits(8)]
    __: u8,
}

/// The arbitration ID register, read-only; its ID follows the ID register
/// (82093AA 3.2.3).
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash)]
pub struct ArbitrationRegister {
    #[bits(24)]
    __: u32,
    /// Bits 24..27: the bus arbitration ID.
    #[bits(4)]
    pub arbitration_id: u8,
    #[bits(4)]
    __: u8,
}

/// One redirection table entry (82093AA 3.2.4; ICH10 13.5.7).
#[bitfield(u64)]
#[derive(PartialEq, Eq, Hash)]
pub struct RedirectionEntry {
    /// Bits 0..7: interrupt vector, R/W.
    pub vector: u8,
    /// Bits 8..10: delivery mode, R/W.
    #[bits(3, from = DeliveryMode::from_bits, into = DeliveryMode::to_bits, default = DeliveryMode::Fixed)]
    pub delivery_mode: DeliveryMode,
    /// Bit 11: destination mode, 1 = logical, R/W.
    pub logical: bool,
    /// Bit 12: delivery status, read-only. Deliveries complete at once in
    /// this model, so it always reads 0 (idle).
    pub delivery_status: bool,
    /// Bit 13: input polarity, 1 = active low, R/W.
    pub active_low: bool,
    /// Bit 14: Remote IRR, read-only: set when a level interrupt is
    /// delivered, cleared by its EOI.
    pub remote_irr: bool,
    /// Bit 15: trigger mode, 1 = level, R/W.
    pub level_triggered: bool,
    /// Bit 16: mask, 1 = masked, R/W. Set at reset.
    #[bits(default = true)]
    pub masked: bool,
    #[bits(31)]
    __: u32,
    /// Bits 48..55: extended destination ID (ICH10 13.5.7 "EDID", read-only
    /// there). Bits 49..55 are writable only when the IOAPIC is configured
    /// for the paravirtual extended destination ID, where they carry
    /// destination bits 8..14; bit 48 is always 0.
    pub extended_destination: u8,
    /// Bits 56..63: destination, an APIC ID (physical) or a logical
    /// destination set (logical), R/W.
    pub destination: u8,
}

/// Bit 12, delivery status (82093AA 3.2.4).
pub const RTE_DELIVERY_STATUS: u64 = 1 << RedirectionEntry::DELIVERY_STATUS_OFFSET;

/// Bit 14, Remote IRR (82093AA 3.2.4).
pub const RTE_REMOTE_IRR: u64 = 1 << RedirectionEntry::REMOTE_IRR_OFFSET;

/// Bits 49..55 of an entry: the part of the extended destination ID (ICH10
/// 13.5.7, bits 48..55) that carries destination bits 8..14 in the
/// paravirtual extended destination ID format Linux programs. Bit 48 stays
/// reserved.
pub const RTE_EXTENDED_DESTINATION_MASK: u64 =
    0xfe << RedirectionEntry::EXTENDED_DESTINATION_OFFSET;

/// Bits a guest or the host may write, without the extended destination:
/// vector, delivery mode, destination mode, polarity, trigger mode, mask and
/// destination (82093AA 3.2.4: bits 12 and 14 are read-only, 17..55
/// reserved). Built from the entry's own fields, so it follows the layout.
pub const RTE_WRITABLE_MASK: u64 = RedirectionEntry::new()
    .with_vector(u8::MAX)
    // Every bit of the 3-bit field (0b111).
    .with_delivery_mode(DeliveryMode::from_bits(u8::MAX))
    .with_logical(true)
    .with_active_low(true)
    .with_level_triggered(true)
    .with_masked(true)
    .with_destination(u8::MAX)
    .into_bits();

/// Bits that may be set at all: the writable ones, the extended destination
/// and Remote IRR (delivery status always reads 0 here).
pub const RTE_DEFINED_MASK: u64 =
    RTE_WRITABLE_MASK | RTE_EXTENDED_DESTINATION_MASK | RTE_REMOTE_IRR;

impl RedirectionEntry {
    /// The entry after a write of `requested` to an entry that held `self`:
    /// the bits of `writable` come from `requested`, every other bit
    /// (delivery status, Remote IRR, reserved bits, and the extended
    /// destination unless `writable` has it) stays; and a write that leaves
    /// the entry edge-triggered clears Remote IRR. The one rule for every
    /// writer of an entry: the guest through IOWIN, the host through
    /// `Ioapic::write_rte`, and a VMM editing KVM's in-kernel IOAPIC state.
    ///
    /// The 82093AA defines Remote IRR for level entries only (3.2.4); KVM's
    /// `ioapic_write_indirect` clears it when an entry becomes edge, which
    /// guests without an EOI register rely on, and so does this rule.
    #[must_use]
    pub const fn written(self, requested: Self, writable: u64) -> Self {
        let merged =
            Self::from_bits(self.into_bits() & !writable | requested.into_bits() & writable);
        if merged.level_triggered() {
            merged
        } else {
            merged.with_remote_irr(false)
        }
    }
}

/// Which bits of the extended destination carry destination bits 8..14
/// (bits 49..55 of the entry; bit 48 is unused), as Linux programs them.
pub const EXT_DESTINATION_ID_SHIFT: u32 = 1;

impl RedirectionEntry {
    /// The entry with destination ID `id`: bits 0..7 in the destination
    /// field and, with the extended destination ID (`ext_dest_id`), bits
    /// 8..14 in entry bits 49..55, as `Ioapic::message` reads them. `None`
    /// when `id` needs more bits than the format has.
    ///
    /// # Example
    ///
    /// ```
    /// use irqchip::ioapic::RedirectionEntry;
    ///
    /// let e = RedirectionEntry::new().with_destination_id(0x1ab, true).unwrap();
    /// assert_eq!((e.destination(), e.extended_destination()), (0xab, 0x02));
    /// assert!(RedirectionEntry::new().with_destination_id(0x1ab, false).is_none());
    /// ```
    pub fn with_destination_id(self, id: u32, ext_dest_id: bool) -> Option<Self> {
        let high = id >> EXT_DESTINATION_FIRST_BIT;
        let limit = if ext_dest_id {
            1 << (Self::EXTENDED_DESTINATION_BITS as u32 - EXT_DESTINATION_ID_SHIFT)
        } else {
            1
        };
        (high < limit).then(|| {
            self.with_destination(id as u8)
                .with_extended_destination((high << EXT_DESTINATION_ID_SHIFT) as u8)
        })
    }
}

/// The first destination bit the extended destination ID carries: bits
/// 0..7 are the entry's 8-bit destination field (82093AA 3.2.4).
pub const EXT_DESTINATION_FIRST_BIT: u32 = RedirectionEntry::DESTINATION_BITS as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rte_writable_mask_covers_exactly_the_rw_fields() {
        let all = RedirectionEntry::from_bits(u64::MAX);
        let writable = RedirectionEntry::new()
            .with_vector(all.vector())
            .with_delivery_mode(all.delivery_mode())
            .with_logical(true)
            .with_active_low(true)
            .with_level_triggered(true)
            .with_masked(true)
            .with_destination(0xff);

        assert_eq!(writable.into_bits(), RTE_WRITABLE_MASK);
    }

    #[test]
    fn unit_rte_writable_mask_is_the_82093aa_value() {
        // Bits 0..11, 13, 15, 16 and 56..63 (82093AA 3.2.4).
        assert_eq!(RTE_WRITABLE_MASK, 0xff00_0000_0001_afff);
    }

    #[test]
    fn unit_written_keeps_read_only_bits_of_a_level_entry() {
        let old = RedirectionEntry::new()
            .with_level_triggered(true)
            .with_remote_irr(true)
            .with_delivery_status(true)
            .with_extended_destination(0x40);
        let requested = RedirectionEntry::new()
            .with_vector(0x61)
            .with_level_triggered(true)
            .with_masked(false)
            .with_destination(3);

        let new = old.written(requested, RTE_WRITABLE_MASK);

        assert!(new.remote_irr() && new.delivery_status());
        assert_eq!(new.extended_destination(), 0x40);
        assert_eq!((new.vector(), new.destination()), (0x61, 3));
        assert!(!new.masked());
    }

    #[test]
    fn unit_written_edge_clears_remote_irr_and_takes_writable_extended_destination() {
        let old = RedirectionEntry::new()
            .with_level_triggered(true)
            .with_remote_irr(true)
            .with_extended_destination(0x40);
        let requested = RedirectionEntry::new().with_extended_destination(0x0e);

        let new = old.written(requested, RTE_WRITABLE_MASK | RTE_EXTENDED_DESTINATION_MASK);

        assert!(!new.remote_irr() && !new.level_triggered());
        assert_eq!(new.extended_destination(), 0x0e);
    }

    #[test]
    fn rte_reset_value_is_masked_and_otherwise_zero() {
        let reset = RedirectionEntry::new();

        assert_eq!(reset.into_bits(), 1 << 16);
    }

    #[test]
    fn redirection_registers_end_after_entry_23_high_dword() {
        assert_eq!(REG_REDIRECTION_END, 0x40);
    }
}
