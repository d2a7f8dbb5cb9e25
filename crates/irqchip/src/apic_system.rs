//! Every local APIC of a VM on one APIC bus: what a VMM that emulates the
//! local APICs itself (no in-kernel LAPIC) holds behind one lock.
//!
//! [`ApicSystem`] keeps one [`Lapic`] per vCPU, the [`ApicTarget`] each one
//! shows the bus, and the lowest-priority [`Arbiter`]. `targets[i]` is
//! refreshed after every operation on `lapics[i]` ([`ApicSystem::with`]), so
//! routing a message reads a consistent, allocation-free slice instead of
//! querying every LAPIC.
//!
//! Wake-ups are values: [`ApicSystem::deliver`] returns the vCPUs whose
//! LAPIC took the message, and the caller decides how to get each one to
//! look (a kick, a condition variable, nothing for the calling vCPU).
//!
//! # Lowest-priority tie-break among parked vCPUs
//!
//! A vCPU whose thread is parked (halted, or an AP waiting for SIPI; the
//! VMM says so with [`ApicSystem::set_parked`]) shows the bus an arbitration
//! priority one above its PPR. Among processors of equal priority a running
//! one therefore wins, and no sleeping thread has to be woken. The SDM
//! leaves the choice among equals to the implementation (see
//! [`crate::apic_bus`], "Lowest-priority arbitration"). Without it a level
//! interrupt re-asserted at each EOI rotates over halted APs and pays a host
//! thread wake-up per delivery.

use crate::apic_bus::{ApicSet, ApicTarget, Arbiter, ArbiterState, Message};
use crate::lapic::{AcceptOutcome, Lapic, LapicConfig};

/// Every local APIC of the VM, indexed by vCPU, and the bus between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApicSystem {
    lapics: Vec<Lapic>,
    targets: Vec<ApicTarget>,
    arbiter: Arbiter,
    /// Per vCPU: its thread waits rather than runs (see the module
    /// documentation).
    parked: Vec<bool>,
}

impl ApicSystem {
    /// One LAPIC per configuration, in vCPU order.
    ///
    /// # Example
    ///
    /// ```
    /// use irqchip::apic_bus::Message;
    /// use irqchip::apic_system::ApicSystem;
    /// use irqchip::lapic::LapicConfig;
    ///
    /// let mut system = ApicSystem::new((0..2).map(|i| LapicConfig::new(i, i == 0)));
    /// // Software-enable both LAPICs (SVR bit 8), as a guest does.
    /// for i in 0..2 {
    ///     system.with(i, |l| l.mmio_write(0xf0, &0x1ffu32.to_le_bytes(), 0));
    /// }
    /// let took = system.deliver(&Message::fixed_physical(1, 0x41), None);
    /// assert_eq!(took.iter().collect::<Vec<_>>(), [1]);
    /// assert!(system.get(1).is_some_and(|l| l.is_requested(0x41)));
    /// ```
    pub fn new(configs: impl IntoIterator<Item = LapicConfig>) -> Self {
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

    /// The number of vCPUs.
    pub fn len(&self) -> usize {
        self.lapics.len()
    }

    /// Whether there is no vCPU at all.
    pub fn is_empty(&self) -> bool {
        self.lapics.is_empty()
    }

    /// Read-only view of LAPIC `index`.
    pub fn get(&self, index: usize) -> Option<&Lapic> {
        self.lapics.get(index)
    }

    /// Runs `f` on LAPIC `index` and refreshes its bus target; `None` when
    /// there is no such vCPU.
    pub fn with<R>(&mut self, index: usize, f: impl FnOnce(&mut Lapic) -> R) -> Option<R> {
        let lapic = self.lapics.get_mut(index)?;
        let result = f(lapic);
        self.refresh(index);
        Some(result)
    }

    /// Recomputes the bus target of vCPU `index`.
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

    /// Routes `message` (sent by vCPU `source`, or by an IOAPIC or MSI when
    /// `None`) on the bus ([`Arbiter::route`]: destination, acceptance,
    /// lowest-priority arbitration), offers it to each destination, and
    /// returns the vCPUs whose LAPIC took it (they may have something new
    /// to do).
    pub fn deliver(&mut self, message: &Message, source: Option<usize>) -> ApicSet {
        let mut took = ApicSet::new();
        self.deliver_each(message, source, |index, outcome| {
            if outcome.accepted() {
                took.insert(index);
            }
        });
        took
    }

    /// [`ApicSystem::deliver`], telling `seen` each destination the bus
    /// chose and what its LAPIC answered, in index order. Returns the
    /// destinations.
    pub fn deliver_each(
        &mut self,
        message: &Message,
        source: Option<usize>,
        mut seen: impl FnMut(usize, AcceptOutcome),
    ) -> ApicSet {
        let destinations = self.arbiter.route(message, &self.targets, source);
        for index in destinations.iter() {
            if let Some(outcome) = self.with(index, |lapic| lapic.accept(message)) {
                seen(index, outcome);
            }
        }
        destinations
    }

    /// Whether vCPU `index`'s thread is parked.
    pub fn parked(&self, index: usize) -> bool {
        self.parked.get(index).copied().unwrap_or(false)
    }

    /// Marks vCPU `index`'s thread parked or not.
    pub fn set_parked(&mut self, index: usize, parked: bool) {
        if let Some(p) = self.parked.get_mut(index) {
            *p = parked;
        }
        self.refresh(index);
    }

    /// The bus targets, in vCPU order.
    pub fn targets(&self) -> &[ApicTarget] {
        &self.targets
    }

    /// The lowest-priority arbiter's state.
    pub fn arbiter(&self) -> ArbiterState {
        self.arbiter.save()
    }

    /// Replaces every LAPIC and the arbiter (a restored snapshot); bus
    /// targets are recomputed, parking is cleared.
    pub fn replace(&mut self, lapics: Vec<Lapic>, arbiter: &ArbiterState) {
        self.targets = lapics.iter().map(Lapic::bus_target).collect();
        self.parked = vec![false; lapics.len()];
        self.lapics = lapics;
        self.arbiter = Arbiter::restore(arbiter);
    }

    /// Every LAPIC, in vCPU order.
    pub fn lapics(&self) -> &[Lapic] {
        &self.lapics
    }

    /// Sum of every LAPIC's counters of ignored or faulted guest accesses
    /// (saturating).
    pub fn bad_accesses(&self) -> u64 {
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
    use crate::apic_bus::{DeliveryMode, DestinationMode, Shorthand, TriggerMode};

    use super::*;

    /// xAPIC MMIO offsets used by the tests (SDM Vol. 3A Table 11-1).
    const SVR: u64 = 0xf0;
    const LDR: u64 = 0xd0;
    const TPR: u64 = 0x80;

    fn write(system: &mut ApicSystem, i: usize, offset: u64, value: u32) {
        let effect = system.with(i, |l| l.mmio_write(offset, &value.to_le_bytes(), 0));
        assert_eq!(effect, Some(None));
    }

    /// `n` LAPICs, software-enabled, logical flat ID 1 << index.
    fn enabled(n: usize) -> ApicSystem {
        let mut system = ApicSystem::new((0..n).map(|i| LapicConfig::new(i as u32, i == 0)));
        for i in 0..n {
            write(&mut system, i, SVR, 0x1ff);
            write(&mut system, i, LDR, (1 << i) << 24);
        }
        system
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
    fn unit_deliver_physical_reaches_one_lapic_and_sets_irr() {
        let mut system = enabled(4);

        let took = system.deliver(&Message::fixed_physical(2, 0x51), None);

        assert_eq!(took.iter().collect::<Vec<_>>(), [2]);
        assert!(system.get(2).unwrap().is_requested(0x51));
        assert!(!system.get(1).unwrap().is_requested(0x51));
    }

    #[test]
    fn unit_deliver_logical_set_reaches_each_member() {
        let mut system = enabled(4);

        let m = message(DeliveryMode::Fixed, DestinationMode::Logical, 0b0110);
        let took = system.deliver(&m, None);

        assert_eq!(took.iter().collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn unit_deliver_lowest_priority_picks_the_lower_ppr() {
        let mut system = enabled(4);
        write(&mut system, 1, TPR, 0x40);

        let m = message(
            DeliveryMode::LowestPriority,
            DestinationMode::Logical,
            0b0110,
        );
        let took = system.deliver(&m, None);

        assert_eq!(took.iter().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn unit_deliver_lowest_priority_prefers_a_running_lapic_among_equals() {
        let mut system = enabled(4);
        let m = message(
            DeliveryMode::LowestPriority,
            DestinationMode::Logical,
            0b1110,
        );
        system.set_parked(1, true);
        system.set_parked(3, true);

        let took: Vec<usize> = (0..3)
            .flat_map(|_| system.deliver(&m, None).iter().collect::<Vec<_>>())
            .collect();

        assert_eq!(took, [2, 2, 2]);
        // A lower priority still wins over running: PPR beats the tie-break
        // (then the cursor, just past 2, picks 3 among the parked equals).
        write(&mut system, 2, TPR, 0x20);
        assert_eq!(system.deliver(&m, None).iter().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn unit_targets_follow_register_writes() {
        let mut system = enabled(2);

        write(&mut system, 1, TPR, 0x30);

        assert_eq!(system.targets()[1].arbitration_priority, 0x30);
        assert_eq!(system.targets()[1].logical_id, 0b10);
    }

    #[test]
    fn unit_self_shorthand_goes_to_the_source_only() {
        let mut system = enabled(3);
        let mut m = Message::fixed_physical(0, 0x60);
        m.shorthand = Shorthand::SelfOnly;

        let took = system.deliver(&m, Some(2));

        assert_eq!(took.iter().collect::<Vec<_>>(), [2]);
        assert!(system.deliver(&m, None).is_empty());
    }

    #[test]
    fn unit_all_excluding_self_skips_the_sender() {
        let mut system = enabled(3);
        let mut m = Message::fixed_physical(0, 0x61);
        m.shorthand = Shorthand::AllExcludingSelf;

        let took = system.deliver(&m, Some(1));

        assert_eq!(took.iter().collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn unit_disabled_lapic_does_not_take_fixed_interrupts() {
        let mut system = ApicSystem::new([LapicConfig::new(0, true)]);

        let took = system.deliver(&Message::fixed_physical(0, 0x51), None);

        assert!(took.is_empty());
    }

    #[test]
    fn unit_deliver_each_reports_destinations_and_outcomes() {
        let mut system = enabled(3);
        let m = message(DeliveryMode::Fixed, DestinationMode::Logical, 0b101);
        let mut seen = Vec::new();

        let destinations = system.deliver_each(&m, None, |i, o| seen.push((i, o)));

        assert_eq!(destinations.iter().collect::<Vec<_>>(), [0, 2]);
        assert_eq!(
            seen,
            [(0, AcceptOutcome::Requested), (2, AcceptOutcome::Requested)]
        );
    }

    #[test]
    fn unit_replace_recomputes_targets_and_clears_parking() {
        let mut system = enabled(2);
        system.set_parked(1, true);
        let lapics = system.lapics().to_vec();
        let arbiter = system.arbiter();

        system.replace(lapics, &arbiter);

        assert!(!system.parked(1));
        assert_eq!(system.targets()[1].arbitration_priority, 0);
    }

    #[test]
    fn unit_out_of_range_index_is_none() {
        let mut system = enabled(1);

        assert!(system.with(5, |l| l.tpr()).is_none());
        assert!(!system.parked(5));
        system.set_parked(5, true);
    }
}
