//! IOAPIC driver (MMIO at 0xFEC0_0000, 82093AA / ICH IOAPIC register model).
//!
//! IOREGSEL/IOWIN is a two-step access, so every access holds a lock with
//! interrupts off: a handler on this CPU or another CPU cannot slip its own
//! select in between.

use irqconnect_abi::layout::{IOAPIC_MMIO_BASE, IOAPIC_PINS};

use crate::spinlock::SpinLock;

/// IOREGSEL offset.
const IOREGSEL: u64 = 0x00;
/// IOWIN offset.
const IOWIN: u64 = 0x10;
/// EOI register offset (version >= 0x20).
const IOEOI: u64 = 0x40;

/// ID register index (bits 24..27 writable).
pub const REG_ID: u32 = 0x00;
/// Version register index (read-only: version bits 0..7, max entry 16..23).
pub const REG_VERSION: u32 = 0x01;
/// Arbitration ID register index (read-only).
pub const REG_ARB: u32 = 0x02;
/// First redirection-table register index (pin n: 0x10 + 2n, 0x11 + 2n).
pub const REG_REDTBL: u32 = 0x10;

/// RTE field: vector (bits 0..7).
pub const RTE_VECTOR_MASK: u64 = 0xff;
/// RTE field: delivery mode shift (bits 8..10).
pub const RTE_DELIVERY_SHIFT: u32 = 8;
/// RTE: logical destination mode (bit 11).
pub const RTE_DEST_LOGICAL: u64 = 1 << 11;
/// RTE: delivery status, read-only (bit 12).
pub const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// RTE: active-low polarity (bit 13).
pub const RTE_ACTIVE_LOW: u64 = 1 << 13;
/// RTE: remote IRR, read-only (bit 14).
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
/// RTE: level-triggered (bit 15).
pub const RTE_LEVEL: u64 = 1 << 15;
/// RTE: masked (bit 16).
pub const RTE_MASKED: u64 = 1 << 16;
/// RTE: destination shift (bits 56..63).
pub const RTE_DEST_SHIFT: u32 = 56;

/// Delivery mode: fixed.
pub const DELIVERY_FIXED: u64 = 0;
/// Delivery mode: lowest priority.
pub const DELIVERY_LOWEST: u64 = 1;

static LOCK: SpinLock<()> = SpinLock::new(());

fn mmio(offset: u64) -> *mut u32 {
    (IOAPIC_MMIO_BASE + offset) as *mut u32
}

/// Reads indirect register `reg`.
pub fn read(reg: u32) -> u32 {
    let _g = LOCK.lock_irqsave();
    // SAFETY: the IOAPIC page is identity-mapped uncached; IOREGSEL/IOWIN
    // accesses have no memory effects; the lock serialises the pair.
    unsafe {
        core::ptr::write_volatile(mmio(IOREGSEL), reg);
        core::ptr::read_volatile(mmio(IOWIN))
    }
}

/// Writes indirect register `reg`.
pub fn write(reg: u32, value: u32) {
    let _g = LOCK.lock_irqsave();
    // SAFETY: as in `read`.
    unsafe {
        core::ptr::write_volatile(mmio(IOREGSEL), reg);
        core::ptr::write_volatile(mmio(IOWIN), value);
    }
}

/// Writes the EOI register (meaningful from version 0x20).
pub fn eoi(vector: u8) {
    let _g = LOCK.lock_irqsave();
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile(mmio(IOEOI), u32::from(vector)) }
}

/// Version (bits 0..7 of the version register).
pub fn version() -> u8 {
    read(REG_VERSION) as u8
}

/// Highest redirection entry index.
pub fn max_entry() -> u8 {
    (read(REG_VERSION) >> 16) as u8
}

/// Reads pin `pin`'s 64-bit redirection entry.
pub fn read_rte(pin: u8) -> u64 {
    let reg = REG_REDTBL + 2 * u32::from(pin);
    let _g = LOCK.lock_irqsave();
    // SAFETY: as in `read`.
    unsafe {
        core::ptr::write_volatile(mmio(IOREGSEL), reg);
        let low = core::ptr::read_volatile(mmio(IOWIN));
        core::ptr::write_volatile(mmio(IOREGSEL), reg + 1);
        let high = core::ptr::read_volatile(mmio(IOWIN));
        (u64::from(high) << 32) | u64::from(low)
    }
}

/// Writes pin `pin`'s redirection entry: the destination half first, then
/// the half holding the mask, so an unmasking write fires with the new
/// destination.
pub fn write_rte(pin: u8, value: u64) {
    let reg = REG_REDTBL + 2 * u32::from(pin);
    let _g = LOCK.lock_irqsave();
    // SAFETY: as in `read`.
    unsafe {
        core::ptr::write_volatile(mmio(IOREGSEL), reg + 1);
        core::ptr::write_volatile(mmio(IOWIN), (value >> 32) as u32);
        core::ptr::write_volatile(mmio(IOREGSEL), reg);
        core::ptr::write_volatile(mmio(IOWIN), value as u32);
    }
}

/// Masks pin `pin` (edge, vector 0), which also clears a stale remote IRR.
pub fn mask(pin: u8) {
    write_rte(pin, RTE_MASKED);
}

/// Masks every pin.
pub fn mask_all() {
    for pin in 0..IOAPIC_PINS {
        mask(pin);
    }
}

/// A redirection entry under construction.
#[derive(Clone, Copy, Debug)]
pub struct Rte(pub u64);

impl Rte {
    /// Fixed, physical, active-high, edge, unmasked, to APIC ID `dest`.
    pub fn new(vector: u8, dest: u8) -> Self {
        Self(u64::from(vector) | (u64::from(dest) << RTE_DEST_SHIFT))
    }

    /// Level-triggered.
    pub fn level(self) -> Self {
        Self(self.0 | RTE_LEVEL)
    }

    /// Masked.
    pub fn masked(self) -> Self {
        Self(self.0 | RTE_MASKED)
    }

    /// Logical destination mode.
    pub fn logical(self) -> Self {
        Self(self.0 | RTE_DEST_LOGICAL)
    }

    /// Lowest-priority delivery.
    pub fn lowest_priority(self) -> Self {
        Self(self.0 | (DELIVERY_LOWEST << RTE_DELIVERY_SHIFT))
    }
}
