//! Save and restore of the IOAPIC.

use serde::{Deserialize, Serialize};

use super::spec::{ID_WRITABLE_MASK, IdRegister, NUM_PINS, RTE_REMOTE_IRR, RedirectionEntry};
use super::{Ioapic, IoapicCounters};
use crate::Error;

/// Everything an [`Ioapic`] holds besides its configuration. Restoring it
/// into an IOAPIC built with the same [`super::IoapicConfig`] gives one that
/// behaves exactly as the saved one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IoapicState {
    /// The ID register.
    pub id: u32,
    /// IOREGSEL.
    pub ioregsel: u8,
    /// The 24 redirection entries, Remote IRR included.
    pub entries: [u64; NUM_PINS],
    /// Line levels, bit `n` for pin `n`.
    pub lines: u32,
    /// Storm guard counts, one per pin.
    pub storm_counts: [u32; NUM_PINS],
    /// The route generation.
    pub route_generation: u64,
    /// The counters.
    pub counters: IoapicCounters,
}

impl Ioapic {
    /// The IOAPIC's state.
    pub fn save(&self) -> IoapicState {
        let Self {
            config: _,
            id,
            ioregsel,
            entries,
            lines,
            storm_counts,
            route_generation,
            counters,
        } = self;
        IoapicState {
            id: id.into_bits(),
            ioregsel: *ioregsel,
            entries: entries.map(RedirectionEntry::into_bits),
            lines: *lines,
            storm_counts: *storm_counts,
            route_generation: *route_generation,
            counters: *counters,
        }
    }

    /// Replaces the IOAPIC's state by `state`. Fails, changing nothing, if
    /// `state` is one no IOAPIC with this configuration can be in: bits set
    /// outside the ID field, outside an entry's defined fields, or on a line
    /// above pin 23, or Remote IRR set on an edge-triggered entry.
    pub fn restore(&mut self, state: &IoapicState) -> Result<(), Error> {
        let IoapicState {
            id,
            ioregsel,
            entries,
            lines,
            storm_counts,
            route_generation,
            counters,
        } = state;
        if id & !ID_WRITABLE_MASK != 0 {
            return Err(Error::InvalidSnapshot(
                "the ID register has reserved bits set",
            ));
        }
        if lines >> NUM_PINS != 0 {
            return Err(Error::InvalidSnapshot("a line above pin 23 is high"));
        }
        let defined = self.writable_mask() | RTE_REMOTE_IRR;
        for &bits in entries {
            if bits & !defined != 0 {
                return Err(Error::InvalidSnapshot(
                    "a redirection entry has reserved or read-only bits set",
                ));
            }
            let entry = RedirectionEntry::from_bits(bits);
            if entry.remote_irr() && !entry.level_triggered() {
                return Err(Error::InvalidSnapshot(
                    "an edge-triggered redirection entry has Remote IRR set",
                ));
            }
        }
        self.id = IdRegister::from_bits(*id);
        self.ioregsel = *ioregsel;
        self.entries = entries.map(RedirectionEntry::from_bits);
        self.lines = *lines;
        self.storm_counts = *storm_counts;
        self.route_generation = *route_generation;
        self.counters = *counters;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::IoapicConfig;
    use super::*;

    fn busy_ioapic() -> Ioapic {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        let level = RedirectionEntry::new()
            .with_vector(0x51)
            .with_level_triggered(true)
            .with_masked(false);
        ioapic.write_rte(4, level).unwrap();
        ioapic.set_line(4, true);
        ioapic.set_line(4, true);
        ioapic.mmio_write(0, &[0x12]);
        ioapic
    }

    #[test]
    fn restore_of_save_gives_an_identical_ioapic() {
        let original = busy_ioapic();
        let json = serde_json::to_string(&original.save()).unwrap();
        let state: IoapicState = serde_json::from_str(&json).unwrap();

        let mut restored = Ioapic::new(IoapicConfig::default());
        restored.restore(&state).unwrap();

        assert_eq!(restored, original);
    }

    #[test]
    fn restore_of_remote_irr_on_edge_entry_fails_and_changes_nothing() {
        let mut state = busy_ioapic().save();
        state.entries[0] = RTE_REMOTE_IRR;
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        let before = ioapic.clone();

        let result = ioapic.restore(&state);

        assert!(matches!(result, Err(Error::InvalidSnapshot(_))));
        assert_eq!(ioapic, before);
    }

    #[test]
    fn restore_of_reserved_entry_bits_fails() {
        let mut state = busy_ioapic().save();
        state.entries[1] = 1 << 20;
        let mut ioapic = Ioapic::new(IoapicConfig::default());

        let result = ioapic.restore(&state);

        assert!(matches!(result, Err(Error::InvalidSnapshot(_))));
    }

    #[test]
    fn restore_of_line_above_pin_23_fails() {
        let mut state = busy_ioapic().save();
        state.lines = 1 << 24;
        let mut ioapic = Ioapic::new(IoapicConfig::default());

        let result = ioapic.restore(&state);

        assert!(matches!(result, Err(Error::InvalidSnapshot(_))));
    }

    #[test]
    fn restore_of_reserved_id_bits_fails() {
        let mut state = busy_ioapic().save();
        state.id = 0x1000_0000;
        let mut ioapic = Ioapic::new(IoapicConfig::default());

        let result = ioapic.restore(&state);

        assert!(matches!(result, Err(Error::InvalidSnapshot(_))));
    }
}
