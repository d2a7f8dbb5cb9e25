//! The APIC bus of user mode: every vCPU's [`Lapic`], the [`ApicTarget`]
//! each one shows the bus, and the lowest-priority [`Arbiter`], in one
//! struct under one mutex (see the parent module for the locking).
//!
//! `targets[i]` is refreshed after every operation on `lapics[i]`, so
//! resolving a message reads a consistent, allocation-free slice instead
//! of locking and querying every LAPIC.
//!
//! Lowest-priority tie-break: a parked vCPU (halted, its thread asleep)
//! shows the bus an arbitration priority one above its PPR, so among
//! processors of equal priority a running one wins and no sleeping thread
//! has to be woken (the SDM leaves the choice among equals to the
//! implementation; KVM's vector hashing is likewise sticky). Without it a
//! level interrupt re-asserted at each EOI rotates over halted APs and pays
//! a host thread wake-up per delivery, which under host load (2 cores, many
//! vCPU threads) slowed a guest test from 0.2 s to more than 3 s.

use irqchip::apic_bus::{ApicSet, ApicTarget, Arbiter, Message, Shorthand};
use irqchip::lapic::{AcceptOutcome, Lapic, LapicConfig};

/// Every local APIC of the VM, indexed by vCPU.
pub(crate) struct Apics {
    lapics: Vec<Lapic>,
    targets: Vec<ApicTarget>,
    arbiter: Arbiter,
    /// Per vCPU: its thread waits on its condition variable (halted, or an
    /// AP waiting for SIPI) rather than running or about to run `KVM_RUN`.
    parked: Vec<bool>,
}

impl Apics {
    /// One LAPIC per configuration, in vCPU order.
    pub(crate) fn new(configs: impl IntoIterator<Item = LapicConfig>) -> Self {
        let lapics: Vec<Lapic> = configs.into_iter().map(Lapic::new).collect();
        let targets = lapics.iter().map(Lapic::bus_target).collect();
        let parked = vec![false; lapics.len()];
        Self {
            lapics,
            targets,
            arbiter: Arbiter::new(),
            parked,
        }
    }

    /// Read-only view of LAPIC `index`.
    pub(crate) fn get(&self, index: usize) -> Option<&Lapic> {
        self.lapics.get(index)
    }

    /// Runs `f` on LAPIC `index` and refreshes its bus target; `None` when
    /// there is no such vCPU.
    pub(crate) fn with<R>(&mut self, index: usize, f: impl FnOnce(&mut Lapic) -> R) -> Option<R> {
        let lapic = self.lapics.get_mut(index)?;
        let result = f(lapic);
        self.refresh(index);
        Some(result)
    }

    /// Recomputes the bus target of vCPU `index` (see the module
    /// documentation for the parked tie-break).
    fn refresh(&mut self, index: usize) {
        let (Some(lapic), Some(slot)) = (self.lapics.get(index), self.targets.get_mut(index))
        else {
            return;
        };
        let mut target = lapic.bus_target();
        if self.parked.get(index).copied().unwrap_or(false) {
            target.arbitration_priority = target.arbitration_priority.saturating_add(1);
        }
        *slot = target;
    }

    /// Resolves `message` (sent by vCPU `source`, or by the IOAPIC when
    /// `None`) against every LAPIC, narrows lowest priority with the
    /// arbiter, and offers it to each destination. Returns the vCPUs whose
    /// LAPIC took it (they may have something new to do).
    pub(crate) fn deliver(&mut self, message: &Message, source: Option<usize>) -> ApicSet {
        let destinations = if message.shorthand == Shorthand::SelfOnly {
            // The bus resolves "self" through `source`; without one (the
            // IOAPIC never sends a shorthand) nobody gets it.
            source.map_or_else(ApicSet::new, ApicSet::single)
        } else {
            self.arbiter.route(message, &self.targets, source)
        };
        let mut took = ApicSet::new();
        for index in destinations.iter() {
            let outcome = self.with(index, |lapic| lapic.accept(message));
            if outcome.is_some_and(AcceptOutcome::accepted) {
                took.insert(index);
            }
        }
        took
    }

    /// Whether vCPU `index`'s thread is parked.
    pub(crate) fn parked(&self, index: usize) -> bool {
        self.parked.get(index).copied().unwrap_or(false)
    }

    /// Marks vCPU `index`'s thread parked or not.
    pub(crate) fn set_parked(&mut self, index: usize, parked: bool) {
        if let Some(p) = self.parked.get_mut(index) {
            *p = parked;
        }
        self.refresh(index);
    }

    /// The bus targets, in vCPU order (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn targets(&self) -> &[ApicTarget] {
        &self.targets
    }

    /// Sum of every LAPIC's counters of ignored or faulted guest accesses.
    pub(crate) fn bad_accesses(&self) -> u64 {
        self.lapics
            .iter()
            .map(|l| {
                let c = l.counters();
                [
                    c.bad_mmio_accesses,
                    c.reserved_register_accesses,
                    c.disabled_mmio_accesses,
                    c.read_only_writes,
                    c.msr_faults,
                ]
                .iter()
                .fold(0u64, |a, &b| a.saturating_add(b))
            })
            .fold(0u64, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use irqchip::apic_bus::{DeliveryMode, DestinationMode, TriggerMode};

    use super::*;

    /// xAPIC MMIO offsets used by the tests (SDM Vol. 3A Table 11-1).
    const SVR: u64 = 0xf0;
    const LDR: u64 = 0xd0;
    const TPR: u64 = 0x80;

    fn write(apics: &mut Apics, i: usize, offset: u64, value: u32) {
        let effect = apics.with(i, |l| l.mmio_write(offset, &value.to_le_bytes(), 0));
        assert_eq!(effect, Some(None));
    }

    /// `n` LAPICs, software-enabled, logical flat ID 1 << index.
    fn enabled(n: usize) -> Apics {
        let mut apics = Apics::new((0..n).map(|i| LapicConfig::new(i as u32, i == 0)));
        for i in 0..n {
            write(&mut apics, i, SVR, 0x1ff);
            write(&mut apics, i, LDR, (1 << i) << 24);
        }
        apics
    }

    fn message(mode: DeliveryMode, dest_mode: DestinationMode, dest: u32) -> Message {
        Message {
            destination: dest,
            destination_mode: dest_mode,
            delivery_mode: mode,
            vector: 0x51,
            trigger_mode: TriggerMode::Edge,
            level: true,
            shorthand: Shorthand::None,
        }
    }

    #[test]
    fn deliver_physical_reaches_one_lapic_and_sets_irr() {
        let mut apics = enabled(4);

        let took = apics.deliver(&Message::fixed_physical(2, 0x51), None);

        assert_eq!(took.iter().collect::<Vec<_>>(), [2]);
        assert!(apics.get(2).unwrap().is_requested(0x51));
        assert!(!apics.get(1).unwrap().is_requested(0x51));
    }

    #[test]
    fn deliver_logical_set_reaches_each_member() {
        let mut apics = enabled(4);

        let m = message(DeliveryMode::Fixed, DestinationMode::Logical, 0b0110);
        let took = apics.deliver(&m, None);

        assert_eq!(took.iter().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn deliver_lowest_priority_picks_the_lower_ppr() {
        let mut apics = enabled(4);
        write(&mut apics, 1, TPR, 0x40);

        let m = message(
            DeliveryMode::LowestPriority,
            DestinationMode::Logical,
            0b0110,
        );
        let took = apics.deliver(&m, None);

        assert_eq!(took.iter().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn deliver_lowest_priority_prefers_a_running_lapic_among_equals() {
        let mut apics = enabled(4);
        let m = message(
            DeliveryMode::LowestPriority,
            DestinationMode::Logical,
            0b1110,
        );
        apics.set_parked(1, true);
        apics.set_parked(3, true);

        let took: Vec<usize> = (0..3)
            .flat_map(|_| apics.deliver(&m, None).iter().collect::<Vec<_>>())
            .collect();

        assert_eq!(took, [2, 2, 2]);
        // A lower priority still wins over running: PPR beats the tie-break
        // (then the cursor, just past 2, picks 3 among the parked equals).
        write(&mut apics, 2, TPR, 0x20);
        assert_eq!(apics.deliver(&m, None).iter().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn targets_follow_register_writes() {
        let mut apics = enabled(2);

        write(&mut apics, 1, TPR, 0x30);

        assert_eq!(apics.targets()[1].arbitration_priority, 0x30);
        assert_eq!(apics.targets()[1].logical_id, 0b10);
    }

    #[test]
    fn self_shorthand_goes_to_the_source_only() {
        let mut apics = enabled(3);
        let mut m = Message::fixed_physical(0, 0x60);
        m.shorthand = Shorthand::SelfOnly;

        let took = apics.deliver(&m, Some(2));

        assert_eq!(took.iter().collect::<Vec<_>>(), [2]);
        assert!(apics.deliver(&m, None).is_empty());
    }

    #[test]
    fn all_excluding_self_skips_the_sender() {
        let mut apics = enabled(3);
        let mut m = Message::fixed_physical(0, 0x61);
        m.shorthand = Shorthand::AllExcludingSelf;

        let took = apics.deliver(&m, Some(1));

        assert_eq!(took.iter().collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn disabled_lapic_does_not_take_fixed_interrupts() {
        let mut apics = Apics::new([LapicConfig::new(0, true)]);

        let took = apics.deliver(&Message::fixed_physical(0, 0x51), None);

        assert!(took.is_empty());
    }

    #[test]
    fn out_of_range_index_is_none() {
        let mut apics = enabled(1);

        assert!(apics.with(5, |l| l.tpr()).is_none());
        assert!(!apics.parked(5));
        apics.set_parked(5, true);
    }
}
