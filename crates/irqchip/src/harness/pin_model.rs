//! A reference model of the IOAPIC, written for the fuzz harnesses from the
//! 82093AA and ICH10 datasheets and the behaviour documented in
//! [`crate::ioapic`], without sharing code with the model under test: raw
//! `u64` entries and literal masks instead of the bitfield types, a plain
//! per-pin loop instead of the output buffers.
//!
//! It predicts, for every operation, the messages each pin sends (edge,
//! level, mask, polarity, Remote IRR, EOI re-delivery), the storm reports,
//! the route generation, every counter and every register a guest can read.
//! [`crate::harness::ioapic`] and [`crate::harness::system`] run it beside
//! [`Ioapic`] and compare after every operation.

use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};
use crate::ioapic::{Ioapic, IoapicConfig, IoapicCounters, IoapicOutput, IoapicState};

/// Pins of the modelled IOAPIC: the model's own count (the reference
/// restates behaviour, not platform facts).
pub const PINS: usize = crate::ioapic::NUM_PINS;

/// Entry bits 0..7 vector, 8..10 delivery mode, 11 destination mode,
/// 13 polarity, 15 trigger mode, 16 mask: writable (82093AA 3.2.4).
const LOW_WRITABLE: u64 = 0x0001_afff;
/// Entry bits 56..63: destination, writable (82093AA 3.2.4).
const DESTINATION_WRITABLE: u64 = 0xff00_0000_0000_0000;
/// Entry bits 49..55: destination bits 8..14 when the paravirtual extended
/// destination ID is configured.
const EXT_DESTINATION_WRITABLE: u64 = 0x00fe_0000_0000_0000;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const ACTIVE_LOW: u64 = 1 << 13;
const LOGICAL: u64 = 1 << 11;

/// The ICH10 version register: version 0x20, maximum redirection entry 0x17.
pub const VERSION_REGISTER: u32 = 0x0017_0020;

/// What one operation made the reference send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefOutput {
    /// `(pin, entry bits at delivery)`, in the order sent.
    pub deliveries: Vec<(u8, u64)>,
    /// Pins reported by the storm guard (bit `n` = pin `n`).
    pub storm: u32,
    /// Whether a routing field of an entry changed.
    pub routes_changed: bool,
}

/// The reference IOAPIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefIoapic {
    ext_dest: bool,
    storm_threshold: u32,
    reset_id: u8,
    id: u8,
    ioregsel: u8,
    /// Writable bits plus Remote IRR (bit 14); delivery status is always 0.
    entries: [u64; PINS],
    lines: [bool; PINS],
    storm: [u32; PINS],
    generation: u64,
    counters: IoapicCounters,
}

fn bump(counter: &mut u64) {
    *counter = counter.saturating_add(1);
}

impl RefIoapic {
    /// The reference of an IOAPIC built with `config`, in its reset state.
    pub fn new(config: &IoapicConfig) -> Self {
        Self {
            ext_dest: config.ext_dest_id,
            storm_threshold: config.storm_threshold,
            reset_id: config.id & 0xf,
            id: config.id & 0xf,
            ioregsel: 0,
            entries: [MASKED; PINS],
            lines: [false; PINS],
            storm: [0; PINS],
            generation: 0,
            counters: IoapicCounters::default(),
        }
    }

    fn writable(&self) -> u64 {
        let ext = if self.ext_dest {
            EXT_DESTINATION_WRITABLE
        } else {
            0
        };
        LOW_WRITABLE | DESTINATION_WRITABLE | ext
    }

    /// The entry of `pin` as a guest reads it (64 bits).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.entries.get(pin).copied()
    }

    /// The message an entry describes, built from the raw bits.
    pub fn message(&self, bits: u64) -> Message {
        let mut destination = (bits >> 56) as u32;
        if self.ext_dest {
            destination |= ((bits >> 49) & 0x7f) as u32 * 0x100;
        }
        Message {
            destination,
            destination_mode: if bits & LOGICAL != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            delivery_mode: DeliveryMode::from_bits(((bits >> 8) & 7) as u8),
            vector: bits as u8,
            trigger_mode: if bits & LEVEL != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: true,
            shorthand: Shorthand::None,
        }
    }

    fn asserted(&self, pin: usize) -> bool {
        match (self.lines.get(pin), self.entries.get(pin)) {
            (Some(&line), Some(&bits)) => line != (bits & ACTIVE_LOW != 0),
            _ => false,
        }
    }

    /// A level pin sends when asserted, unmasked, with Remote IRR clear,
    /// and sets Remote IRR.
    fn fire_level(&mut self, pin: usize) -> Option<u64> {
        let asserted = self.asserted(pin);
        let bits = self.entries.get_mut(pin)?;
        if *bits & LEVEL == 0 || *bits & MASKED != 0 || *bits & REMOTE_IRR != 0 || !asserted {
            return None;
        }
        *bits |= REMOTE_IRR;
        let sent = *bits;
        bump(&mut self.counters.deliveries);
        Some(sent)
    }

    /// The storm count follows the pin: back to 0 whenever it is not asserted.
    fn settle_storm(&mut self, pin: usize) {
        if !self.asserted(pin)
            && let Some(count) = self.storm.get_mut(pin)
        {
            *count = 0;
        }
    }

    /// A device drives `pin`'s line to `level`.
    pub fn set_line(&mut self, pin: u8, level: bool) -> Option<u64> {
        let p = usize::from(pin);
        if p >= PINS {
            bump(&mut self.counters.bad_pins);
            return None;
        }
        let before = self.asserted(p);
        self.lines[p] = level;
        let after = self.asserted(p);
        self.settle_storm(p);
        let bits = self.entries[p];
        if !after {
            return None;
        }
        if bits & LEVEL != 0 {
            if bits & REMOTE_IRR != 0 {
                bump(&mut self.counters.coalesced_levels);
            }
            return self.fire_level(p);
        }
        if before {
            return None;
        }
        if bits & MASKED != 0 {
            bump(&mut self.counters.masked_edges);
            return None;
        }
        bump(&mut self.counters.deliveries);
        Some(bits)
    }

    /// An EOI for `vector`, by broadcast or through the EOI register.
    pub fn eoi(&mut self, vector: u8, out: &mut RefOutput) {
        for p in 0..PINS {
            let bits = self.entries[p];
            if bits & REMOTE_IRR == 0 || bits as u8 != vector {
                continue;
            }
            self.entries[p] &= !REMOTE_IRR;
            if let Some(sent) = self.fire_level(p) {
                self.storm[p] = self.storm[p].saturating_add(1);
                if self.storm[p] > self.storm_threshold {
                    bump(&mut self.counters.storm_reports);
                    out.storm |= 1 << p;
                }
                out.deliveries.push((p as u8, sent));
            }
        }
    }

    /// A write of `requested` to `pin`'s entry (guest or host).
    pub fn write_entry(&mut self, pin: u8, requested: u64, out: &mut RefOutput) {
        let p = usize::from(pin);
        if p >= PINS {
            return;
        }
        let writable = self.writable();
        let old = self.entries[p];
        let mut new = (old & !writable) | (requested & writable);
        if new & LEVEL == 0 {
            new &= !REMOTE_IRR;
        }
        self.entries[p] = new;
        if (old ^ new) & writable != 0 {
            self.generation = self.generation.wrapping_add(1);
            out.routes_changed = true;
        }
        self.settle_storm(p);
        if let Some(sent) = self.fire_level(p) {
            out.deliveries.push((pin, sent));
        }
    }

    /// The register IOREGSEL selects, as IOWIN reads it.
    fn read_register(&mut self) -> u32 {
        match self.ioregsel {
            0x00 => u32::from(self.id) << 24,
            0x01 => VERSION_REGISTER,
            0x02 => u32::from(self.id) << 24,
            index @ 0x10..=0x3f => {
                let bits = self.entries[usize::from((index - 0x10) / 2)];
                if index % 2 == 0 {
                    bits as u32
                } else {
                    (bits >> 32) as u32
                }
            }
            _ => {
                bump(&mut self.counters.bad_register_reads);
                u32::MAX
            }
        }
    }

    /// A guest read of `len` bytes at `offset`: the bytes it must see.
    pub fn mmio_read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let value = match (offset, len) {
            (0x00, 1 | 2 | 4) => Some(u32::from(self.ioregsel)),
            (0x10, 4) => Some(self.read_register()),
            (0x40, 1 | 2 | 4) => Some(0),
            _ => None,
        };
        match value {
            Some(value) => value.to_le_bytes().into_iter().take(len).collect(),
            None => {
                bump(&mut self.counters.bad_mmio_reads);
                vec![0xff; len]
            }
        }
    }

    /// A guest write of `data` at `offset`.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], out: &mut RefOutput) {
        match (offset, data.len(), data.first()) {
            (0x00, 1 | 2 | 4, Some(&index)) => self.ioregsel = index,
            (0x10, 4, _) => {
                let mut dword = [0u8; 4];
                dword.copy_from_slice(data);
                self.write_register(u32::from_le_bytes(dword), out);
            }
            (0x40, 1 | 2 | 4, Some(&vector)) => self.eoi(vector, out),
            _ => bump(&mut self.counters.bad_mmio_writes),
        }
    }

    fn write_register(&mut self, value: u32, out: &mut RefOutput) {
        match self.ioregsel {
            0x00 => self.id = ((value >> 24) & 0xf) as u8,
            0x01 | 0x02 => bump(&mut self.counters.read_only_writes),
            index @ 0x10..=0x3f => {
                let pin = (index - 0x10) / 2;
                let old = self.entries[usize::from(pin)];
                let requested = if index % 2 == 0 {
                    (old & 0xffff_ffff_0000_0000) | u64::from(value)
                } else {
                    (old & 0x0000_0000_ffff_ffff) | (u64::from(value) << 32)
                };
                self.write_entry(pin, requested, out);
            }
            _ => bump(&mut self.counters.bad_register_writes),
        }
    }

    /// The IOAPIC's reset: registers to power-up values, lines and counters
    /// kept.
    pub fn reset(&mut self) {
        if self.entries != [MASKED; PINS] {
            self.generation = self.generation.wrapping_add(1);
        }
        self.entries = [MASKED; PINS];
        self.id = self.reset_id;
        self.ioregsel = 0;
        self.storm = [0; PINS];
    }

    /// Takes over a state the model accepted through `restore`.
    pub fn adopt(&mut self, state: &IoapicState) {
        self.id = ((state.id >> 24) & 0xf) as u8;
        self.ioregsel = state.ioregsel;
        self.entries = state.entries;
        for (pin, line) in self.lines.iter_mut().enumerate() {
            *line = state.lines & (1 << pin) != 0;
        }
        self.storm = state.storm_counts;
        self.generation = state.route_generation;
        self.counters = state.counters;
    }

    /// Compares everything the model exposes with the reference: entries,
    /// lines, storm counts, route generation, counters, ID. `Err` names the
    /// first difference.
    pub fn compare(&self, ioapic: &Ioapic) -> Result<(), String> {
        for (pin, entry) in ioapic.entries() {
            let expected = self.entries.get(usize::from(pin)).copied();
            if Some(entry.into_bits()) != expected {
                return Err(format!(
                    "pin {pin}: entry {:#018x}, reference {expected:#018x?}",
                    entry.into_bits()
                ));
            }
            let line = self.lines.get(usize::from(pin)).copied();
            if ioapic.line(pin) != line {
                return Err(format!(
                    "pin {pin}: line {:?}, reference {line:?}",
                    ioapic.line(pin)
                ));
            }
            let storm = self.storm.get(usize::from(pin)).copied();
            if ioapic.storm_count(pin) != storm {
                return Err(format!(
                    "pin {pin}: storm count {:?}, reference {storm:?}",
                    ioapic.storm_count(pin)
                ));
            }
        }
        if ioapic.route_generation() != self.generation {
            return Err(format!(
                "route generation {}, reference {}",
                ioapic.route_generation(),
                self.generation
            ));
        }
        if *ioapic.counters() != self.counters {
            return Err(format!(
                "counters {:?}, reference {:?}",
                ioapic.counters(),
                self.counters
            ));
        }
        if ioapic.id() != self.id {
            return Err(format!("ID {}, reference {}", ioapic.id(), self.id));
        }
        Ok(())
    }

    /// Compares one operation's output with the reference's: the same pins
    /// in the same order, each with the message of the entry the reference
    /// sent, the same storm reports and routes-changed flag.
    pub fn compare_output(
        &self,
        output: &IoapicOutput,
        expected: &RefOutput,
    ) -> Result<(), String> {
        let got: Vec<(u8, Message)> = output
            .deliveries()
            .iter()
            .map(|d| (d.pin, d.message))
            .collect();
        let want: Vec<(u8, Message)> = expected
            .deliveries
            .iter()
            .map(|&(pin, bits)| (pin, self.message(bits)))
            .collect();
        if got != want {
            return Err(format!("deliveries {got:?}, reference {want:?}"));
        }
        if output.storm_pins().bits() != expected.storm {
            return Err(format!(
                "storm pins {:#x}, reference {:#x}",
                output.storm_pins().bits(),
                expected.storm
            ));
        }
        if output.routes_changed() != expected.routes_changed {
            return Err(format!(
                "routes changed {}, reference {}",
                output.routes_changed(),
                expected.routes_changed
            ));
        }
        Ok(())
    }

    /// Compares a single `set_line` result.
    pub fn compare_line(&self, got: Option<Message>, expected: Option<u64>) -> Result<(), String> {
        let want = expected.map(|bits| self.message(bits));
        if got != want {
            return Err(format!("set_line sent {got:?}, reference {want:?}"));
        }
        Ok(())
    }
}
