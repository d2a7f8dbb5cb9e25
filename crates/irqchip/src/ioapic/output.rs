//! What IOAPIC operations hand back to their caller: messages to send,
//! storm reports, a routes-changed flag, and the counters of ignored
//! guest accesses.

use serde::{Deserialize, Serialize};

use super::spec::NUM_PINS;
use crate::apic_bus::Message;

/// One message the IOAPIC sends for a pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// The pin (0..=23) that fired.
    pub pin: u8,
    /// The APIC-bus message, built from the pin's redirection entry at the
    /// time of delivery.
    pub message: Message,
}

/// A set of IOAPIC pins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PinMask(u32);

impl PinMask {
    /// The empty set.
    pub const fn new() -> Self {
        Self(0)
    }

    /// The set as a bit mask, bit `n` for pin `n`.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether `pin` is in the set.
    pub const fn contains(self, pin: u8) -> bool {
        pin < 32 && self.0 & (1 << pin) != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The pins in increasing order.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0..NUM_PINS as u8).filter(move |&pin| self.contains(pin))
    }

    pub(crate) fn insert(&mut self, pin: u8) {
        if usize::from(pin) < NUM_PINS {
            self.0 |= 1 << pin;
        }
    }
}

/// The effects of one IOAPIC operation (an MMIO write, an EOI, a host RTE
/// write). Holds at most one delivery per pin, in pin order, without
/// allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoapicOutput {
    deliveries: [Delivery; NUM_PINS],
    len: u8,
    storm: PinMask,
    routes_changed: bool,
}

impl Default for IoapicOutput {
    fn default() -> Self {
        Self::new()
    }
}

impl IoapicOutput {
    /// No effect.
    pub const fn new() -> Self {
        Self {
            deliveries: [Delivery {
                pin: 0,
                message: Message::fixed_physical(0, 0),
            }; NUM_PINS],
            len: 0,
            storm: PinMask::new(),
            routes_changed: false,
        }
    }

    /// The messages to send, in pin order.
    pub fn deliveries(&self) -> &[Delivery] {
        self.deliveries.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// Pins whose consecutive re-deliveries after EOI passed the storm
    /// threshold in this operation (see [`super::Ioapic::eoi`]). They were
    /// still delivered; the caller decides what to do (log, mask, delay).
    pub fn storm_pins(&self) -> PinMask {
        self.storm
    }

    /// Whether a redirection entry's routing fields (everything but Remote
    /// IRR) changed: a split-mode VMM re-programs its GSI routes.
    pub fn routes_changed(&self) -> bool {
        self.routes_changed
    }

    /// Whether the operation asks nothing of the caller.
    pub fn is_empty(&self) -> bool {
        self.len == 0 && self.storm.is_empty() && !self.routes_changed
    }

    pub(crate) fn push(&mut self, pin: u8, message: Message) {
        if let Some(slot) = self.deliveries.get_mut(usize::from(self.len)) {
            *slot = Delivery { pin, message };
            self.len += 1;
        }
    }

    pub(crate) fn report_storm(&mut self, pin: u8) {
        self.storm.insert(pin);
    }

    pub(crate) fn set_routes_changed(&mut self) {
        self.routes_changed = true;
    }
}

/// What the IOAPIC ignored or noticed, for the caller to read (a guest's bad
/// access is counted, never logged per access, never an error). All counts
/// saturate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IoapicCounters {
    /// MMIO reads at an offset, width or alignment the IOAPIC does not
    /// decode; answered with all ones.
    pub bad_mmio_reads: u64,
    /// MMIO writes at an offset, width or alignment the IOAPIC does not
    /// decode; ignored.
    pub bad_mmio_writes: u64,
    /// IOWIN reads while IOREGSEL selects no register; answered with all
    /// ones.
    pub bad_register_reads: u64,
    /// IOWIN writes while IOREGSEL selects no register; ignored.
    pub bad_register_writes: u64,
    /// IOWIN writes to the read-only version or arbitration registers (such
    /// as the probe write of 0 some guests make); ignored.
    pub read_only_writes: u64,
    /// Line changes or host calls for a pin that does not exist; ignored.
    pub bad_pins: u64,
    /// Messages sent.
    pub deliveries: u64,
    /// Rising edges on masked edge-triggered pins; lost, as on hardware.
    pub masked_edges: u64,
    /// Assertions of a level-triggered pin while its Remote IRR was set;
    /// coalesced into the interrupt in service.
    pub coalesced_levels: u64,
    /// Re-deliveries after EOI past the storm threshold.
    pub storm_reports: u64,
}
