//! The IOAPIC: an Intel 82093AA with the ICH10's version 0x20 additions
//! (the EOI register at offset 0x40).
//!
//! # Interface
//!
//! - Guest MMIO: [`Ioapic::mmio_read`] and [`Ioapic::mmio_write`] at offsets
//!   relative to the IOAPIC base. Accepted accesses:
//!
//!   | offset | register | widths |
//!   |---|---|---|
//!   | 0x00 | IOREGSEL, the 8-bit index (ICH10 13.5.2) | 1, 2, 4 bytes (the upper bytes read 0, writes to them are dropped) |
//!   | 0x10 | IOWIN, the 32-bit window (ICH10 13.5.3) | 4 bytes only: the datasheets require dword accesses |
//!   | 0x40 | EOI, write-only (ICH10 13.5.4) | 1, 2, 4 bytes (the low byte is the vector); reads return 0 |
//!
//!   Anything else (another offset, another width, an 8-byte access, an
//!   access starting inside a register) reads all ones and is ignored on
//!   write, and is counted in [`IoapicCounters`].
//! - Device lines: [`Ioapic::set_line`] with the electrical level of a pin.
//! - EOI broadcast from a local APIC: [`Ioapic::eoi`].
//! - Host routing (the VMM's PV service): [`Ioapic::rte`],
//!   [`Ioapic::write_rte`], [`Ioapic::entries`], [`Ioapic::route_generation`]
//!   and [`Ioapic::msi_route`] for split mode.
//! - Snapshot: [`Ioapic::save`] and [`Ioapic::restore`].
//!
//! # Pin semantics
//!
//! A pin is *asserted* when its line level differs from its polarity bit
//! (active high: line high; active low: line low).
//!
//! - Edge-triggered: a change from not asserted to asserted, seen by
//!   [`Ioapic::set_line`], sends one message if the pin is unmasked; an edge
//!   on a masked pin is lost. Changing the polarity or the mask does not
//!   create an edge.
//! - Level-triggered: while asserted, unmasked and with Remote IRR clear,
//!   the pin sends one message and sets Remote IRR. Further assertions are
//!   coalesced. An EOI for the entry's vector (a broadcast through
//!   [`Ioapic::eoi`] or a write to the EOI register) clears Remote IRR, and
//!   the pin sends again at once if it is still asserted and unmasked. A
//!   masked asserted pin sends when it is unmasked. The check runs after
//!   every line change, entry write and EOI.
//! - Switching an entry to edge clears its Remote IRR. Any other field
//!   (destination, vector, trigger) may be rewritten while Remote IRR is
//!   set, by the guest's handler or by the host; the EOI that clears it must
//!   carry the entry's vector at EOI time.
//! - Delivery is immediate, so the delivery status bit always reads 0.
//! - The delivery mode is sent as programmed. The 82093AA reserves 110
//!   (start-up); like KVM's IOAPIC, this model sends it anyway.
//!
//! # Storm guard
//!
//! A level line that stays asserted while its handler EOIs without quieting
//! the device re-delivers forever. Each re-delivery caused by an EOI adds
//! one to the pin's storm count; the count returns to 0 when the pin stops
//! being asserted. A re-delivery that brings the count above
//! [`IoapicConfig::storm_threshold`] is still made, but the pin is also
//! reported in [`IoapicOutput::storm_pins`] and counted in
//! [`IoapicCounters::storm_reports`]; what to do (mask the pin, delay the
//! vCPU, log once) is the caller's decision.

mod mmio;
mod output;
mod pins;
mod route;
pub mod spec;
mod state;

pub use output::{Delivery, IoapicCounters, IoapicOutput, PinMask};
pub use spec::{NUM_PINS, RedirectionEntry};
pub use state::IoapicState;

use spec::{DEFAULT_STORM_THRESHOLD, IdRegister, RTE_EXTENDED_DESTINATION_MASK, RTE_WRITABLE_MASK};

use crate::Error;
use crate::apic_bus::{DestinationMode, Message, Shorthand, TriggerMode};

/// Construction-time settings of an [`Ioapic`]. They are not part of the
/// saved state: restore into an IOAPIC built with the same configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoapicConfig {
    /// The APIC ID the ID register holds after reset (4 bits; higher bits
    /// are dropped).
    pub id: u8,
    /// Consecutive re-deliveries after EOI of one pin beyond which it is
    /// reported (see the module documentation). `u32::MAX` never reports.
    pub storm_threshold: u32,
    /// Accept destination bits 8..14 in entry bits 49..55 (the paravirtual
    /// extended destination ID, `KVM_FEATURE_MSI_EXT_DEST_ID`). When false
    /// those bits are read-only zero, as on the ICH10.
    pub ext_dest_id: bool,
}

impl Default for IoapicConfig {
    fn default() -> Self {
        Self {
            id: 0,
            storm_threshold: DEFAULT_STORM_THRESHOLD,
            ext_dest_id: false,
        }
    }
}

/// An IOAPIC with 24 pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ioapic {
    config: IoapicConfig,
    id: IdRegister,
    ioregsel: u8,
    entries: [RedirectionEntry; NUM_PINS],
    /// Electrical line levels, bit `n` for pin `n`.
    lines: u32,
    storm_counts: [u32; NUM_PINS],
    route_generation: u64,
    counters: IoapicCounters,
}

impl Ioapic {
    /// An IOAPIC in its reset state: every entry masked, every line low.
    pub fn new(config: IoapicConfig) -> Self {
        Self {
            config,
            id: IdRegister::new().with_id(config.id & spec::ID_FIELD_MASK),
            ioregsel: 0,
            entries: [RedirectionEntry::new(); NUM_PINS],
            lines: 0,
            storm_counts: [0; NUM_PINS],
            route_generation: 0,
            counters: IoapicCounters::default(),
        }
    }

    /// Resets the registers (ID, IOREGSEL, every entry masked and otherwise
    /// zero). Line levels are the devices' and stay; counters stay. Bumps the
    /// route generation if any entry changed.
    pub fn reset(&mut self) {
        let reset = Self::new(self.config);
        if self.entries != reset.entries {
            self.bump_route_generation();
        }
        self.id = reset.id;
        self.ioregsel = reset.ioregsel;
        self.entries = reset.entries;
        self.storm_counts = reset.storm_counts;
    }

    /// The configuration this IOAPIC was built with.
    pub fn config(&self) -> &IoapicConfig {
        &self.config
    }

    /// The counters of ignored accesses and notable events.
    pub fn counters(&self) -> &IoapicCounters {
        &self.counters
    }

    /// The 4-bit APIC ID of the IOAPIC.
    pub fn id(&self) -> u8 {
        self.id.id()
    }

    /// The redirection entry of `pin`, `None` if there is no such pin.
    pub fn rte(&self, pin: u8) -> Option<RedirectionEntry> {
        self.entries.get(usize::from(pin)).copied()
    }

    /// Every pin with its redirection entry, in pin order.
    pub fn entries(&self) -> impl Iterator<Item = (u8, RedirectionEntry)> + '_ {
        (0u8..).zip(self.entries.iter().copied())
    }

    /// The electrical level of `pin`'s line.
    pub fn line(&self, pin: u8) -> Option<bool> {
        (usize::from(pin) < NUM_PINS).then(|| self.lines & (1 << pin) != 0)
    }

    /// The consecutive re-deliveries after EOI `pin` made since its line
    /// last dropped.
    pub fn storm_count(&self, pin: u8) -> Option<u32> {
        self.storm_counts.get(usize::from(pin)).copied()
    }

    /// A counter that goes up whenever any entry's routing fields change
    /// (guest or host writes, reset). A split-mode VMM compares it with the
    /// value it last programmed KVM's GSI routes at.
    pub fn route_generation(&self) -> u64 {
        self.route_generation
    }

    /// Host-side write of `pin`'s redirection entry (vector, trigger,
    /// polarity, destination, mask...). The same rules as a guest write
    /// apply: delivery status and Remote IRR are read-only, switching to edge
    /// clears Remote IRR, and an asserted level pin that becomes deliverable
    /// fires at once (in the returned output).
    pub fn write_rte(&mut self, pin: u8, entry: RedirectionEntry) -> Result<IoapicOutput, Error> {
        if usize::from(pin) >= NUM_PINS {
            return Err(Error::PinOutOfRange(pin));
        }
        let mut output = IoapicOutput::new();
        self.write_entry(pin, entry.into_bits(), &mut output);
        Ok(output)
    }

    /// The message `pin`'s entry describes now, whatever its mask, line and
    /// Remote IRR.
    pub fn message(&self, pin: u8) -> Option<Message> {
        self.rte(pin).map(|entry| self.entry_message(entry))
    }

    #[inline]
    fn entry_message(&self, entry: RedirectionEntry) -> Message {
        let mut destination = u32::from(entry.destination());
        if self.config.ext_dest_id {
            destination |=
                u32::from(entry.extended_destination() >> spec::EXT_DESTINATION_ID_SHIFT)
                    << spec::EXT_DESTINATION_FIRST_BIT;
        }
        Message {
            destination,
            destination_mode: if entry.logical() {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            delivery_mode: entry.delivery_mode(),
            vector: entry.vector(),
            trigger_mode: if entry.level_triggered() {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: true,
            shorthand: Shorthand::None,
        }
    }

    fn writable_mask(&self) -> u64 {
        if self.config.ext_dest_id {
            RTE_WRITABLE_MASK | RTE_EXTENDED_DESTINATION_MASK
        } else {
            RTE_WRITABLE_MASK
        }
    }

    /// Applies a write of `requested` to `pin`'s entry (read-only bits kept),
    /// then fires the pin if it became deliverable.
    fn write_entry(&mut self, pin: u8, requested: u64, output: &mut IoapicOutput) {
        let writable = self.writable_mask();
        let Some(slot) = self.entries.get_mut(usize::from(pin)) else {
            return;
        };
        let old = slot.into_bits();
        let new = slot.written(RedirectionEntry::from_bits(requested), writable);
        *slot = new;
        if (old ^ new.into_bits()) & writable != 0 {
            self.bump_route_generation();
            output.set_routes_changed();
        }
        // A polarity (or trigger) change can leave the pin not asserted: its
        // storm count restarts, as when the line drops.
        let line_high = self.lines & (1 << pin) != 0;
        if line_high == new.active_low()
            && let Some(count) = self.storm_counts.get_mut(usize::from(pin))
        {
            *count = 0;
        }
        if let Some(message) = self.service_level(pin) {
            output.push(pin, message);
        }
    }

    fn bump_route_generation(&mut self) {
        self.route_generation = self.route_generation.wrapping_add(1);
    }
}

/// Adds one to a counter, saturating.
fn bump(counter: &mut u64) {
    *counter = counter.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apic_bus::DeliveryMode;

    #[test]
    fn new_ioapic_has_every_entry_masked() {
        let ioapic = Ioapic::new(IoapicConfig::default());

        assert!(ioapic.entries().all(|(_, entry)| entry.masked()));
        assert_eq!(ioapic.entries().count(), NUM_PINS);
    }

    #[test]
    fn write_rte_bad_pin_is_an_error() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());

        let result = ioapic.write_rte(24, RedirectionEntry::new());

        assert_eq!(result, Err(Error::PinOutOfRange(24)));
    }

    #[test]
    fn write_rte_routing_change_bumps_generation_and_reports_it() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());

        let output = ioapic
            .write_rte(3, RedirectionEntry::new().with_vector(0x41))
            .unwrap();

        assert!(output.routes_changed());
        assert_eq!(ioapic.route_generation(), 1);
    }

    #[test]
    fn write_rte_same_value_leaves_generation() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        let entry = RedirectionEntry::new().with_vector(0x41);
        ioapic.write_rte(3, entry).unwrap();

        let output = ioapic.write_rte(3, entry).unwrap();

        assert!(!output.routes_changed());
        assert_eq!(ioapic.route_generation(), 1);
    }

    #[test]
    fn write_rte_by_host_cannot_set_remote_irr_or_delivery_status() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        let entry = RedirectionEntry::new()
            .with_level_triggered(true)
            .with_remote_irr(true)
            .with_delivery_status(true);

        ioapic.write_rte(0, entry).unwrap();

        let stored = ioapic.rte(0).unwrap();
        assert!(!stored.remote_irr());
        assert!(!stored.delivery_status());
    }

    #[test]
    fn message_carries_the_entry_fields() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        let entry = RedirectionEntry::new()
            .with_vector(0x55)
            .with_delivery_mode(DeliveryMode::LowestPriority)
            .with_logical(true)
            .with_level_triggered(true)
            .with_destination(0x0c);
        ioapic.write_rte(9, entry).unwrap();

        let message = ioapic.message(9).unwrap();

        assert_eq!(
            message,
            Message {
                destination: 0x0c,
                destination_mode: DestinationMode::Logical,
                delivery_mode: DeliveryMode::LowestPriority,
                vector: 0x55,
                trigger_mode: TriggerMode::Level,
                level: true,
                shorthand: Shorthand::None,
            }
        );
    }

    #[test]
    fn ext_dest_id_disabled_keeps_extended_destination_read_only() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());

        ioapic
            .write_rte(1, RedirectionEntry::new().with_extended_destination(0xfe))
            .unwrap();

        assert_eq!(ioapic.rte(1).unwrap().extended_destination(), 0);
    }

    #[test]
    fn ext_dest_id_enabled_adds_destination_bits_8_to_14() {
        let config = IoapicConfig {
            ext_dest_id: true,
            ..IoapicConfig::default()
        };
        let mut ioapic = Ioapic::new(config);
        // Destination 0x2a5: bits 8..14 = 0x02 in entry bits 49..55.
        let entry = RedirectionEntry::new()
            .with_destination(0xa5)
            .with_extended_destination(0x02 << 1);
        ioapic.write_rte(1, entry).unwrap();

        let message = ioapic.message(1).unwrap();

        assert_eq!(message.destination, 0x2a5);
    }

    #[test]
    fn reset_masks_entries_and_keeps_lines() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        ioapic
            .write_rte(2, RedirectionEntry::new().with_masked(false))
            .unwrap();
        ioapic.set_line(2, true);

        ioapic.reset();

        assert!(ioapic.rte(2).unwrap().masked());
        assert_eq!(ioapic.line(2), Some(true));
    }
}
