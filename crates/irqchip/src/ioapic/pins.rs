//! Pin inputs: line changes, EOIs and the level re-delivery that follows.

use super::{Ioapic, IoapicOutput, NUM_PINS, bump};
use crate::apic_bus::Message;

impl Ioapic {
    /// Sets the electrical level of `pin`'s line and returns the message the
    /// pin sends because of it, if any (see the module documentation for the
    /// edge and level rules). A pin that does not exist is counted in
    /// [`super::IoapicCounters::bad_pins`] and ignored.
    #[inline]
    pub fn set_line(&mut self, pin: u8, level: bool) -> Option<Message> {
        let Some(entry) = self.rte(pin) else {
            bump(&mut self.counters.bad_pins);
            return None;
        };
        let bit = 1u32 << pin;
        let was_asserted = (self.lines & bit != 0) != entry.active_low();
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        let asserted = level != entry.active_low();
        if !asserted {
            if let Some(count) = self.storm_counts.get_mut(usize::from(pin)) {
                *count = 0;
            }
            return None;
        }
        if entry.level_triggered() {
            if entry.remote_irr() {
                bump(&mut self.counters.coalesced_levels);
            }
            return self.service_level(pin);
        }
        if was_asserted {
            return None;
        }
        if entry.masked() {
            bump(&mut self.counters.masked_edges);
            return None;
        }
        bump(&mut self.counters.deliveries);
        Some(self.entry_message(entry))
    }

    /// An EOI for `vector`, broadcast by a local APIC (or written to the EOI
    /// register): clears Remote IRR of every level entry with that vector,
    /// and re-delivers those whose line is still asserted and that are
    /// unmasked. Each such re-delivery counts toward the pin's storm guard.
    pub fn eoi(&mut self, vector: u8) -> IoapicOutput {
        let mut output = IoapicOutput::new();
        self.eoi_into(vector, &mut output);
        output
    }

    pub(super) fn eoi_into(&mut self, vector: u8, output: &mut IoapicOutput) {
        for pin in 0..NUM_PINS as u8 {
            let Some(entry) = self.entries.get_mut(usize::from(pin)) else {
                continue;
            };
            if !entry.remote_irr() || entry.vector() != vector {
                continue;
            }
            entry.set_remote_irr(false);
            let Some(message) = self.service_level(pin) else {
                continue;
            };
            let threshold = self.config.storm_threshold;
            if let Some(count) = self.storm_counts.get_mut(usize::from(pin)) {
                *count = count.saturating_add(1);
                if *count > threshold {
                    bump(&mut self.counters.storm_reports);
                    output.report_storm(pin);
                }
            }
            output.push(pin, message);
        }
    }

    /// Fires a level-triggered pin if it is asserted, unmasked and has Remote
    /// IRR clear: sets Remote IRR and returns the message.
    pub(super) fn service_level(&mut self, pin: u8) -> Option<Message> {
        let line_high = self.line(pin)?;
        let entry = self.entries.get_mut(usize::from(pin))?;
        if !entry.level_triggered()
            || entry.masked()
            || entry.remote_irr()
            || line_high == entry.active_low()
        {
            return None;
        }
        entry.set_remote_irr(true);
        let entry = *entry;
        bump(&mut self.counters.deliveries);
        Some(self.entry_message(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{IoapicConfig, RedirectionEntry};
    use super::*;
    use crate::apic_bus::{DestinationMode, TriggerMode};

    const VECTOR: u8 = 0x50;

    fn edge() -> RedirectionEntry {
        RedirectionEntry::new()
            .with_vector(VECTOR)
            .with_masked(false)
    }

    fn level() -> RedirectionEntry {
        edge().with_level_triggered(true)
    }

    fn ioapic_with(pin: u8, entry: RedirectionEntry) -> Ioapic {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        ioapic.write_rte(pin, entry).unwrap();
        ioapic
    }

    fn pins(output: &IoapicOutput) -> Vec<u8> {
        output.deliveries().iter().map(|d| d.pin).collect()
    }

    #[test]
    fn edge_rising_line_delivers_one_edge_message() {
        let mut ioapic = ioapic_with(3, edge());

        let message = ioapic.set_line(3, true).unwrap();

        assert_eq!(message.vector, VECTOR);
        assert_eq!(message.trigger_mode, TriggerMode::Edge);
    }

    #[test]
    fn edge_line_held_high_does_not_redeliver() {
        let mut ioapic = ioapic_with(3, edge());
        ioapic.set_line(3, true);

        let second = ioapic.set_line(3, true);

        assert_eq!(second, None);
    }

    #[test]
    fn edge_falling_line_on_active_high_pin_does_not_deliver() {
        let mut ioapic = ioapic_with(3, edge());
        ioapic.set_line(3, true);

        let falling = ioapic.set_line(3, false);

        assert_eq!(falling, None);
    }

    #[test]
    fn edge_active_low_pin_delivers_on_falling_line() {
        let mut ioapic = ioapic_with(3, edge().with_active_low(true));
        ioapic.set_line(3, true);

        let falling = ioapic.set_line(3, false);

        assert!(falling.is_some());
    }

    #[test]
    fn edge_on_masked_pin_is_lost_and_counted() {
        let mut ioapic = ioapic_with(3, edge().with_masked(true));
        let during_mask = ioapic.set_line(3, true);

        let unmask = ioapic.write_rte(3, edge()).unwrap();

        assert_eq!(during_mask, None);
        assert!(unmask.deliveries().is_empty());
        assert_eq!(ioapic.counters().masked_edges, 1);
    }

    #[test]
    fn edge_delivery_never_sets_remote_irr() {
        let mut ioapic = ioapic_with(3, edge());

        ioapic.set_line(3, true);

        assert!(!ioapic.rte(3).unwrap().remote_irr());
    }

    #[test]
    fn level_assert_delivers_once_and_sets_remote_irr() {
        let mut ioapic = ioapic_with(6, level());

        let message = ioapic.set_line(6, true).unwrap();

        assert_eq!(message.trigger_mode, TriggerMode::Level);
        assert!(ioapic.rte(6).unwrap().remote_irr());
    }

    #[test]
    fn level_reassertion_with_remote_irr_set_coalesces() {
        let mut ioapic = ioapic_with(6, level());
        ioapic.set_line(6, true);
        ioapic.set_line(6, false);

        let again = ioapic.set_line(6, true);

        assert_eq!(again, None);
        assert_eq!(ioapic.counters().coalesced_levels, 1);
    }

    #[test]
    fn level_eoi_with_line_still_asserted_redelivers() {
        let mut ioapic = ioapic_with(6, level());
        ioapic.set_line(6, true);

        let output = ioapic.eoi(VECTOR);

        assert_eq!(pins(&output), vec![6]);
        assert!(ioapic.rte(6).unwrap().remote_irr());
    }

    #[test]
    fn level_eoi_after_line_dropped_clears_remote_irr_without_delivery() {
        let mut ioapic = ioapic_with(6, level());
        ioapic.set_line(6, true);
        ioapic.set_line(6, false);

        let output = ioapic.eoi(VECTOR);

        assert!(output.deliveries().is_empty());
        assert!(!ioapic.rte(6).unwrap().remote_irr());
    }

    #[test]
    fn level_eoi_for_another_vector_keeps_remote_irr() {
        let mut ioapic = ioapic_with(6, level());
        ioapic.set_line(6, true);

        let output = ioapic.eoi(VECTOR + 1);

        assert!(output.deliveries().is_empty());
        assert!(ioapic.rte(6).unwrap().remote_irr());
    }

    #[test]
    fn level_masked_asserted_pin_fires_on_unmask() {
        let mut ioapic = ioapic_with(6, level().with_masked(true));
        let while_masked = ioapic.set_line(6, true);

        let unmask = ioapic.write_rte(6, level()).unwrap();

        assert_eq!(while_masked, None);
        assert_eq!(pins(&unmask), vec![6]);
    }

    #[test]
    fn level_eoi_of_masked_asserted_pin_waits_for_unmask() {
        let mut ioapic = ioapic_with(6, level());
        ioapic.set_line(6, true);
        ioapic.write_rte(6, level().with_masked(true)).unwrap();

        let eoi = ioapic.eoi(VECTOR);
        let unmask = ioapic.write_rte(6, level()).unwrap();

        assert!(eoi.deliveries().is_empty());
        assert_eq!(pins(&unmask), vec![6]);
    }

    #[test]
    fn level_active_low_pin_asserts_on_low_line() {
        let mut ioapic = ioapic_with(6, level().with_active_low(true).with_masked(true));
        ioapic.set_line(6, true);

        let unmask = ioapic.write_rte(6, level().with_active_low(true)).unwrap();
        let low = ioapic.set_line(6, false);

        assert!(unmask.deliveries().is_empty());
        assert!(low.is_some());
    }

    #[test]
    fn level_switch_to_edge_clears_remote_irr() {
        let mut ioapic = ioapic_with(6, level());
        ioapic.set_line(6, true);

        ioapic.write_rte(6, edge()).unwrap();

        assert!(!ioapic.rte(6).unwrap().remote_irr());
    }

    #[test]
    fn level_handler_retargets_destination_while_remote_irr_set() {
        let mut ioapic = ioapic_with(6, level().with_destination(1));
        ioapic.set_line(6, true);

        let rewrite = ioapic
            .write_rte(6, level().with_destination(2).with_logical(true))
            .unwrap();
        let eoi = ioapic.eoi(VECTOR);

        assert!(rewrite.deliveries().is_empty());
        assert!(rewrite.routes_changed());
        let message = eoi.deliveries()[0].message;
        assert_eq!(message.destination, 2);
        assert_eq!(message.destination_mode, DestinationMode::Logical);
    }

    #[test]
    fn level_handler_switches_own_pin_to_edge_and_back_redelivers() {
        let mut ioapic = ioapic_with(6, level());
        ioapic.set_line(6, true);

        ioapic.write_rte(6, edge()).unwrap();
        let back = ioapic.write_rte(6, level()).unwrap();

        assert_eq!(pins(&back), vec![6]);
    }

    #[test]
    fn eoi_redelivers_every_asserted_pin_with_that_vector_in_pin_order() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        for pin in [9, 2, 17] {
            ioapic.write_rte(pin, level()).unwrap();
            ioapic.set_line(pin, true);
        }

        let output = ioapic.eoi(VECTOR);

        assert_eq!(pins(&output), vec![2, 9, 17]);
    }

    fn storm_ioapic(threshold: u32) -> Ioapic {
        let config = IoapicConfig {
            storm_threshold: threshold,
            ..IoapicConfig::default()
        };
        let mut ioapic = Ioapic::new(config);
        ioapic.write_rte(8, level()).unwrap();
        ioapic.set_line(8, true);
        ioapic
    }

    #[test]
    fn storm_guard_reports_pin_past_threshold_and_still_delivers() {
        let mut ioapic = storm_ioapic(2);
        let quiet: Vec<bool> = (0..2)
            .map(|_| ioapic.eoi(VECTOR).storm_pins().is_empty())
            .collect();

        let third = ioapic.eoi(VECTOR);

        assert_eq!(quiet, vec![true, true]);
        assert!(third.storm_pins().contains(8));
        assert_eq!(pins(&third), vec![8]);
        assert_eq!(ioapic.counters().storm_reports, 1);
    }

    #[test]
    fn storm_count_resets_when_line_drops() {
        let mut ioapic = storm_ioapic(2);
        ioapic.eoi(VECTOR);
        ioapic.eoi(VECTOR);

        ioapic.set_line(8, false);

        assert_eq!(ioapic.storm_count(8), Some(0));
    }

    /// Found by the `ioapic` fuzz target (corpus file
    /// `regression-storm-count-rte-deassert`): an entry write that left the
    /// pin not asserted (polarity flipped) kept the storm count, so the next
    /// assertion's re-deliveries were reported as a storm too early.
    #[test]
    fn regression_storm_count_resets_when_rte_write_deasserts_pin() {
        let mut ioapic = storm_ioapic(2);
        ioapic.eoi(VECTOR);
        ioapic.eoi(VECTOR);

        ioapic.write_rte(8, level().with_active_low(true)).unwrap();
        ioapic.write_rte(8, level()).unwrap();
        let first = ioapic.eoi(VECTOR);
        let second = ioapic.eoi(VECTOR);

        assert_eq!(ioapic.storm_count(8), Some(2));
        assert!(first.storm_pins().is_empty());
        assert!(second.storm_pins().is_empty());
    }

    #[test]
    fn storm_count_ignores_first_delivery_of_each_assertion() {
        let mut ioapic = storm_ioapic(0);
        ioapic.set_line(8, false);
        ioapic.eoi(VECTOR);

        let fresh = ioapic.set_line(8, true);

        assert!(fresh.is_some());
        assert_eq!(ioapic.storm_count(8), Some(0));
    }

    #[test]
    fn set_line_of_missing_pin_is_ignored_and_counted() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());

        let message = ioapic.set_line(24, true);

        assert_eq!(message, None);
        assert_eq!(ioapic.counters().bad_pins, 1);
        assert_eq!(ioapic.line(24), None);
    }

    #[test]
    fn deliveries_counter_counts_every_message() {
        let mut ioapic = ioapic_with(6, level());
        ioapic.write_rte(1, edge()).unwrap();
        ioapic.set_line(6, true);
        ioapic.set_line(1, true);

        ioapic.eoi(VECTOR);

        assert_eq!(ioapic.counters().deliveries, 3);
    }
}
