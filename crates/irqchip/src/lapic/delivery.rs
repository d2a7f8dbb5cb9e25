//! Interrupt acceptance and priority (SDM Vol. 3A 11.8): messages from the
//! bus and the LVT into the IRR, the processor priority, acknowledge, EOI,
//! errors (11.5.3) and IPIs out of the ICR (11.6.1).

use super::*;

impl Lapic {
    /// The processor-priority register (SDM Vol. 3A 11.8.3.1): the TPR if its
    /// class is at least the highest in-service class, else that class.
    pub const fn ppr(&self) -> u8 {
        let isrv = match self.isr.highest() {
            Some(v) => v,
            None => 0,
        };
        if self.tpr & PRIORITY_CLASS_MASK >= isrv & PRIORITY_CLASS_MASK {
            self.tpr
        } else {
            isrv & PRIORITY_CLASS_MASK
        }
    }

    /// The arbitration-priority register (SDM Vol. 3A 11.6.2.4).
    pub fn apr(&self) -> u8 {
        let class = |v: Option<u8>| v.map_or(0, |v| v & PRIORITY_CLASS_MASK);
        let tpr_class = self.tpr & PRIORITY_CLASS_MASK;
        let isr_class = class(self.isr.highest());
        let irr_class = class(self.irr.highest());
        if tpr_class >= irr_class && tpr_class > isr_class {
            self.tpr
        } else {
            tpr_class.max(isr_class).max(irr_class)
        }
    }

    /// CR8 as the processor sees it: TPR bits 7:4 (SDM Vol. 3A 11.8.6).
    pub const fn cr8(&self) -> u64 {
        (self.tpr >> spec::CR8_SHIFT) as u64
    }

    /// Mirrors a guest CR8 write (SDM Vol. 3A 11.8.6: `TPR[7:4]` = `CR8[3:0]`,
    /// `TPR[3:0]` = 0) and returns the vector now deliverable, if any. A VMM
    /// without an in-kernel LAPIC calls this with `kvm_run.cr8` on every exit
    /// (and puts [`Lapic::cr8`] back before entry). A value equal to the
    /// current class leaves the TPR alone, so mirroring an unchanged CR8 does
    /// not wipe a sub-class the guest wrote through MMIO.
    pub fn set_cr8(&mut self, cr8: u64) -> Option<u8> {
        let class = (cr8 & spec::CR8_MASK) as u8;
        if u64::from(class) != self.cr8() {
            self.tpr = class << spec::CR8_SHIFT;
        }
        self.highest_deliverable()
    }

    // -----------------------------------------------------------------------
    // Interrupt acceptance, priority, acknowledge, EOI (SDM Vol. 3A 11.8)
    // -----------------------------------------------------------------------

    /// Offers a bus message addressed to this APIC (the bus has resolved the
    /// destination). Fixed and lowest-priority set the IRR (TMR set for level,
    /// cleared for edge); NMI, SMI, INIT, SIPI and ExtINT are latched for the
    /// vCPU loop; INIT also resets the APIC (SDM Vol. 3A 11.4.7.3).
    pub fn accept(&mut self, msg: &Message) -> AcceptOutcome {
        if !self.hw_enabled() {
            bump(&mut self.counters.dropped_messages);
            return AcceptOutcome::Disabled;
        }
        match msg.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.request(msg.vector, msg.trigger_mode == TriggerMode::Level)
            }
            DeliveryMode::Nmi => self.latch_nmi(),
            DeliveryMode::Smi => {
                self.events.smi = true;
                AcceptOutcome::Latched
            }
            DeliveryMode::Init => {
                if msg.trigger_mode == TriggerMode::Level && !msg.level {
                    // INIT level de-assert: no effect on modern processors
                    // (SDM Vol. 3A 11.4.7.4).
                    return AcceptOutcome::Ignored;
                }
                self.init();
                AcceptOutcome::Latched
            }
            DeliveryMode::StartUp => {
                self.events.sipi = Some(msg.vector);
                AcceptOutcome::Latched
            }
            DeliveryMode::ExtInt => self.latch_extint(),
            DeliveryMode::Reserved => {
                bump(&mut self.counters.dropped_messages);
                AcceptOutcome::Ignored
            }
        }
    }

    /// Raises a local interrupt through its LVT entry (SDM Vol. 3A 11.5.1):
    /// one edge, or an assertion of a level-triggered LINT0 (coalesced while
    /// its remote IRR is set, until the EOI of its vector).
    pub fn raise_local(&mut self, source: LocalSource) -> AcceptOutcome {
        self.deliver_lvt(source.lvt())
    }

    /// The vector the processor would take next: the highest requested one
    /// whose priority class is above the PPR's (SDM Vol. 3A 11.8.3.1).
    pub const fn highest_deliverable(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        match self.irr.highest() {
            Some(v) if v & PRIORITY_CLASS_MASK > self.ppr() & PRIORITY_CLASS_MASK => Some(v),
            _ => None,
        }
    }

    /// The processor takes the highest deliverable vector: its IRR bit moves
    /// to the ISR (SDM Vol. 3A 11.8.4). Returns the vector to inject, or
    /// `None` when nothing is deliverable (no spurious vector is produced).
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.highest_deliverable()?;
        self.irr.clear(v);
        self.isr.set(v);
        Some(v)
    }

    /// An EOI (SDM Vol. 3A 11.8.5): the highest in-service vector leaves the
    /// ISR; a level-triggered one (TMR set) is broadcast unless SVR bit 12
    /// suppresses it. The remote IRR of a level LINT entry with that vector
    /// clears. An EOI with nothing in service is counted and ignored.
    #[must_use]
    pub fn eoi(&mut self) -> Option<Effect> {
        let Some(v) = self.isr.highest() else {
            bump(&mut self.counters.spurious_eois);
            return None;
        };
        self.isr.clear(v);
        for kind in [LvtKind::Lint0, LvtKind::Lint1] {
            let lvt = &mut self.lvt[kind.index()];
            if lvt.remote_irr() && lvt.vector() == v {
                lvt.set_remote_irr(false);
            }
        }
        (self.tmr.contains(v) && !self.svr.suppress_eoi_broadcast())
            .then_some(Effect::EoiBroadcast { vector: v })
    }

    /// Sets `vector` in the IRR for a fixed interrupt (bus or LVT).
    pub(super) fn request(&mut self, vector: u8, level: bool) -> AcceptOutcome {
        if !self.sw_enabled() {
            bump(&mut self.counters.dropped_messages);
            return AcceptOutcome::Disabled;
        }
        if vector < FIRST_LEGAL_VECTOR {
            bump(&mut self.counters.illegal_vectors_received);
            self.record_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return AcceptOutcome::IllegalVector;
        }
        if level {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        if self.irr.contains(vector) {
            bump(&mut self.counters.coalesced_interrupts);
            AcceptOutcome::Coalesced
        } else {
            self.irr.set(vector);
            AcceptOutcome::Requested
        }
    }

    /// One more pending NMI, up to [`MAX_PENDING_NMIS`]; an NMI beyond that
    /// merges into the pending ones (module documentation).
    pub(super) fn latch_nmi(&mut self) -> AcceptOutcome {
        if self.events.nmis >= MAX_PENDING_NMIS {
            return AcceptOutcome::Coalesced;
        }
        self.events.nmis += 1;
        AcceptOutcome::Latched
    }

    pub(super) fn latch_extint(&mut self) -> AcceptOutcome {
        if !self.sw_enabled() {
            bump(&mut self.counters.dropped_messages);
            return AcceptOutcome::Disabled;
        }
        self.events.extint = true;
        AcceptOutcome::Latched
    }

    /// Delivers the interrupt of LVT entry `kind` (SDM Vol. 3A 11.5.1).
    pub(super) fn deliver_lvt(&mut self, kind: LvtKind) -> AcceptOutcome {
        if !self.hw_enabled() {
            bump(&mut self.counters.dropped_messages);
            return AcceptOutcome::Disabled;
        }
        let lvt = self.lvt[kind.index()];
        if lvt.masked() {
            return AcceptOutcome::Masked;
        }
        let mode = if kind.has_delivery_mode() {
            lvt.delivery_mode()
        } else {
            DM_FIXED
        };
        match mode {
            DM_FIXED => {
                // Only LINT0 honours level triggering; LINT1 is always edge
                // (SDM Vol. 3A 11.5.1, trigger mode bit).
                let level = kind == LvtKind::Lint0 && lvt.level_triggered();
                if level && lvt.remote_irr() {
                    bump(&mut self.counters.coalesced_interrupts);
                    return AcceptOutcome::Coalesced;
                }
                let outcome = self.request(lvt.vector(), level);
                if level && outcome == AcceptOutcome::Requested {
                    self.lvt[kind.index()].set_remote_irr(true);
                }
                outcome
            }
            DM_SMI => {
                self.events.smi = true;
                AcceptOutcome::Latched
            }
            DM_NMI => self.latch_nmi(),
            DM_INIT => {
                self.init();
                AcceptOutcome::Latched
            }
            DM_EXTINT => self.latch_extint(),
            _ => {
                bump(&mut self.counters.dropped_messages);
                AcceptOutcome::Ignored
            }
        }
    }

    /// Logs `bits` in the ESR's pending errors and raises the error LVT (SDM
    /// Vol. 3A 11.5.3). An error LVT with an illegal vector logs "receive
    /// illegal vector" without raising again.
    pub(super) fn record_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LvtKind::Error.index()];
        if !self.hw_enabled() || lvt.masked() {
            return;
        }
        if lvt.vector() < FIRST_LEGAL_VECTOR {
            bump(&mut self.counters.illegal_vectors_received);
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            return;
        }
        // The error LVT is edge-triggered and software-enabled (it is
        // unmasked), so this is a plain request.
        self.request(lvt.vector(), false);
    }

    /// The IPI of the ICR's current value (SDM Vol. 3A 11.6.1).
    pub(super) fn send_ipi(&mut self) -> Option<Effect> {
        let icr = self.icr;
        let mode = DeliveryMode::from_bits(icr.delivery_mode());
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
                if icr.vector() < FIRST_LEGAL_VECTOR =>
            {
                bump(&mut self.counters.illegal_vectors_sent);
                self.record_error(ESR_SEND_ILLEGAL_VECTOR);
                return None;
            }
            DeliveryMode::Init if icr.level_triggered() && !icr.assert() => return None,
            DeliveryMode::Reserved => {
                bump(&mut self.counters.dropped_messages);
                return None;
            }
            _ => {}
        }
        let destination = if self.is_x2apic() {
            icr.destination()
        } else {
            icr.destination() >> XAPIC_DEST_SHIFT
        };
        let shorthand = match icr.shorthand() {
            SHORTHAND_NONE => Shorthand::None,
            SHORTHAND_SELF => Shorthand::SelfOnly,
            SHORTHAND_ALL_INCLUDING_SELF => Shorthand::AllIncludingSelf,
            SHORTHAND_ALL_EXCLUDING_SELF => Shorthand::AllExcludingSelf,
            _ => Shorthand::None,
        };
        Some(Effect::Ipi(Message {
            destination,
            destination_mode: if icr.logical() {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            delivery_mode: mode,
            vector: icr.vector(),
            trigger_mode: if icr.level_triggered() {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: true,
            shorthand,
        }))
    }

    /// A self IPI through the x2APIC SELF IPI register (SDM Vol. 3A
    /// 11.12.11): fixed, edge, straight into this APIC's IRR.
    pub(super) fn self_ipi(&mut self, vector: u8) {
        if vector < FIRST_LEGAL_VECTOR {
            bump(&mut self.counters.illegal_vectors_sent);
            self.record_error(ESR_SEND_ILLEGAL_VECTOR);
            return;
        }
        let _ = self.request(vector, false);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::apic_bus::TriggerMode::{Edge, Level};

    #[test]
    fn accept_fixed_edge_sets_irr_clears_tmr() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x40, Level));
        let _ = lapic.acknowledge();
        let _ = lapic.eoi();
        // Act
        let outcome = lapic.accept(&fixed(0x40, Edge));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Requested);
        assert!(lapic.is_requested(0x40));
        assert!(!lapic.is_level(0x40));
    }

    #[test]
    fn accept_fixed_level_sets_irr_and_tmr() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let outcome = lapic.accept(&fixed(0x51, Level));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Requested);
        assert!(lapic.is_requested(0x51));
        assert!(lapic.is_level(0x51));
    }

    #[test]
    fn accept_same_vector_twice_coalesces() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x60, Edge));
        // Act
        let outcome = lapic.accept(&fixed(0x60, Edge));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Coalesced);
        assert_eq!(lapic.counters().coalesced_interrupts, 1);
    }

    #[test]
    fn accept_illegal_vector_sets_esr_not_irr() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let outcome = lapic.accept(&fixed(0x0f, Edge));
        set32(&mut lapic, spec::REG_ESR, 0);
        // Assert
        assert_eq!(outcome, AcceptOutcome::IllegalVector);
        assert!(!lapic.is_requested(0x0f));
        assert_eq!(
            read32(&mut lapic, spec::REG_ESR, 0),
            ESR_RECEIVE_ILLEGAL_VECTOR
        );
    }

    #[test]
    fn accept_fixed_software_disabled_dropped() {
        // Arrange
        let mut lapic = Lapic::new(LapicConfig::new(0, true));
        // Act
        let outcome = lapic.accept(&fixed(0x40, Edge));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Disabled);
        assert!(!lapic.is_requested(0x40));
    }

    #[test]
    fn accept_nmi_software_disabled_latched() {
        // Arrange
        let mut lapic = Lapic::new(LapicConfig::new(0, true));
        // Act
        let outcome = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert_eq!(lapic.take_nmis(), 1);
        assert_eq!(lapic.take_nmis(), 0);
    }

    #[test]
    fn accept_two_nmis_before_take_both_pending() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let first = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Act
        let second = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Assert: the second is not lost; the vCPU loop injects both.
        assert_eq!(
            (first, second),
            (AcceptOutcome::Latched, AcceptOutcome::Latched)
        );
        assert!(lapic.has_pending_event());
        assert_eq!(lapic.take_nmis(), 2);
        assert!(!lapic.has_pending_event());
    }

    #[test]
    fn accept_third_nmi_before_take_coalesces() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Act
        let third = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Assert: one now, one latched; a third adds no delivery.
        assert_eq!(third, AcceptOutcome::Coalesced);
        assert!(third.accepted());
        assert_eq!(lapic.take_nmis(), MAX_PENDING_NMIS);
    }

    #[test]
    fn accept_nmi_after_take_counts_again_from_one() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        let _ = lapic.take_nmis();
        // Act
        let outcome = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert_eq!(lapic.take_nmis(), 1);
    }

    #[test]
    fn take_nmis_two_pending_drains_both() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Act
        let taken = lapic.take_nmis();
        // Assert
        assert_eq!(taken, 2);
        assert_eq!(lapic.take_nmis(), 0);
        assert!(!lapic.has_pending_event());
    }

    #[test]
    fn accept_init_clears_pending_nmis() {
        // Arrange
        let mut lapic = enabled_lapic(1);
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Act
        let _ = lapic.accept(&with_mode(DeliveryMode::Init, 0));
        // Assert
        assert_eq!(lapic.take_nmis(), 0);
    }

    #[test]
    fn accept_hardware_disabled_drops_everything() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        lapic
            .msr_write(IA32_APIC_BASE, 0xfee0_0000, 0)
            .unwrap_or(None);
        // Act
        let outcome = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Disabled);
        assert_eq!(lapic.take_nmis(), 0);
    }

    #[test]
    fn accept_smi_latched_once() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let outcome = lapic.accept(&with_mode(DeliveryMode::Smi, 0));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert!(lapic.take_smi());
        assert!(!lapic.take_smi());
    }

    #[test]
    fn accept_extint_sets_extint_flag() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let outcome = lapic.accept(&with_mode(DeliveryMode::ExtInt, 0));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert!(lapic.has_pending_event());
        assert!(lapic.take_extint());
    }

    #[test]
    fn accept_sipi_yields_start_vector() {
        // Arrange
        let mut lapic = enabled_lapic(1);
        // Act
        let outcome = lapic.accept(&with_mode(DeliveryMode::StartUp, 0x9a));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert_eq!(lapic.take_sipi(), Some(0x9a));
        assert_eq!(lapic.take_sipi(), None);
    }

    #[test]
    fn accept_init_resets_registers_keeps_id() {
        // Arrange
        let mut lapic = enabled_lapic(5);
        set32(&mut lapic, spec::REG_TPR, 0x30);
        set32(&mut lapic, spec::REG_LDR, 0x0400_0000);
        let _ = lapic.accept(&fixed(0x70, Edge));
        // Act
        let outcome = lapic.accept(&with_mode(DeliveryMode::Init, 0));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert!(lapic.take_init());
        assert_eq!(lapic.apic_id(), 5);
        assert_eq!(lapic.tpr(), 0);
        assert!(!lapic.sw_enabled());
        assert!(!lapic.is_requested(0x70));
        assert_eq!(read32(&mut lapic, spec::REG_LDR, 0), 0);
        assert_eq!(read32(&mut lapic, spec::REG_LVT_TIMER, 0), 1 << 16);
    }

    #[test]
    fn accept_init_clears_pending_sipi() {
        // Arrange
        let mut lapic = enabled_lapic(1);
        let _ = lapic.accept(&with_mode(DeliveryMode::StartUp, 0x10));
        // Act
        let _ = lapic.accept(&with_mode(DeliveryMode::Init, 0));
        // Assert
        assert_eq!(lapic.take_sipi(), None);
    }

    #[test]
    fn accept_init_level_deassert_ignored() {
        // Arrange
        let mut lapic = enabled_lapic(1);
        set32(&mut lapic, spec::REG_TPR, 0x20);
        let msg = Message {
            level: false,
            trigger_mode: Level,
            ..with_mode(DeliveryMode::Init, 0)
        };
        // Act
        let outcome = lapic.accept(&msg);
        // Assert
        assert_eq!(outcome, AcceptOutcome::Ignored);
        assert!(!lapic.take_init());
        assert_eq!(lapic.tpr(), 0x20);
    }

    #[test]
    fn accept_init_in_x2apic_mode_stays_x2apic() {
        // Arrange
        let mut lapic = enabled_lapic(0x21);
        to_x2apic(&mut lapic);
        // Act
        let _ = lapic.accept(&with_mode(DeliveryMode::Init, 0));
        // Assert
        assert!(lapic.is_x2apic());
        assert_eq!(lapic.msr_read(0x80d, 0), Ok(u64::from(x2apic_ldr(0x21))));
    }

    #[test]
    fn accept_reserved_delivery_mode_ignored() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let outcome = lapic.accept(&with_mode(DeliveryMode::Reserved, 0x40));
        // Assert
        assert_eq!(outcome, AcceptOutcome::Ignored);
        assert!(!lapic.is_requested(0x40));
    }

    #[test]
    fn highest_deliverable_two_vectors_returns_higher() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x41, Edge));
        let _ = lapic.accept(&fixed(0x92, Edge));
        // Act
        let v = lapic.highest_deliverable();
        // Assert
        assert_eq!(v, Some(0x92));
    }

    #[test]
    fn highest_deliverable_same_class_as_tpr_blocked() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_TPR, 0x45);
        let _ = lapic.accept(&fixed(0x4f, Edge));
        // Act
        let v = lapic.highest_deliverable();
        // Assert
        assert_eq!(v, None);
    }

    #[test]
    fn highest_deliverable_below_in_service_class_blocked() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x80, Edge));
        let _ = lapic.acknowledge();
        let _ = lapic.accept(&fixed(0x71, Edge));
        // Act
        let v = lapic.highest_deliverable();
        // Assert
        assert_eq!(v, None);
    }

    #[test]
    fn ppr_tpr_below_isr_class_uses_isr_class() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_TPR, 0x25);
        let _ = lapic.accept(&fixed(0x63, Edge));
        let _ = lapic.acknowledge();
        // Act
        let ppr = read32(&mut lapic, spec::REG_PPR, 0);
        // Assert
        assert_eq!(ppr, 0x60);
    }

    #[test]
    fn ppr_tpr_at_or_above_isr_class_uses_tpr() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x63, Edge));
        let _ = lapic.acknowledge();
        set32(&mut lapic, spec::REG_TPR, 0x6a);
        // Act
        let ppr = lapic.ppr();
        // Assert
        assert_eq!(ppr, 0x6a);
    }

    #[test]
    fn apr_irr_above_tpr_uses_irr_class() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_TPR, 0x31);
        let _ = lapic.accept(&fixed(0x57, Edge));
        // Act
        let apr = read32(&mut lapic, spec::REG_APR, 0);
        // Assert
        assert_eq!(apr, 0x50);
    }

    #[test]
    fn acknowledge_moves_irr_to_isr() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x55, Edge));
        // Act
        let v = lapic.acknowledge();
        // Assert
        assert_eq!(v, Some(0x55));
        assert!(!lapic.is_requested(0x55));
        assert!(lapic.is_in_service(0x55));
    }

    #[test]
    fn acknowledge_nothing_pending_returns_none() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let v = lapic.acknowledge();
        // Assert
        assert_eq!(v, None);
    }

    #[test]
    fn eoi_level_vector_returns_broadcast() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x61, Level));
        let _ = lapic.acknowledge();
        // Act
        let effect = lapic.eoi();
        // Assert
        assert_eq!(effect, Some(Effect::EoiBroadcast { vector: 0x61 }));
        assert!(!lapic.is_in_service(0x61));
    }

    #[test]
    fn eoi_edge_vector_returns_nothing() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x61, Edge));
        let _ = lapic.acknowledge();
        // Act
        let effect = lapic.eoi();
        // Assert
        assert_eq!(effect, None);
        assert!(!lapic.is_in_service(0x61));
    }

    #[test]
    fn eoi_broadcast_suppressed_by_svr_bit_12_returns_nothing() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_SVR, 0x11ff);
        let _ = lapic.accept(&fixed(0x61, Level));
        let _ = lapic.acknowledge();
        // Act
        let effect = lapic.eoi();
        // Assert
        assert_eq!(effect, None);
        assert!(!lapic.is_in_service(0x61));
    }

    #[test]
    fn eoi_nested_clears_highest_in_service_first() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x40, Edge));
        let _ = lapic.acknowledge();
        let _ = lapic.accept(&fixed(0x90, Edge));
        let _ = lapic.acknowledge();
        // Act
        let _ = lapic.eoi();
        // Assert
        assert!(!lapic.is_in_service(0x90));
        assert!(lapic.is_in_service(0x40));
    }

    #[test]
    fn eoi_nothing_in_service_counted() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let effect = lapic.eoi();
        // Assert
        assert_eq!(effect, None);
        assert_eq!(lapic.counters().spurious_eois, 1);
    }

    #[test]
    fn set_cr8_lowered_below_pending_returns_vector() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.set_cr8(0xf);
        let _ = lapic.accept(&fixed(0x81, Edge));
        // Act
        let deliverable = lapic.set_cr8(0x7);
        // Assert
        assert_eq!(deliverable, Some(0x81));
        assert_eq!(lapic.tpr(), 0x70);
    }

    #[test]
    fn set_cr8_raised_to_pending_class_blocks_delivery() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x81, Edge));
        // Act
        let deliverable = lapic.set_cr8(0x8);
        // Assert
        assert_eq!(deliverable, None);
    }

    #[test]
    fn set_cr8_unchanged_class_keeps_tpr_subclass() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_TPR, 0x57);
        // Act
        let _ = lapic.set_cr8(0x5);
        // Assert
        assert_eq!(lapic.tpr(), 0x57);
    }

    #[test]
    fn cr8_reflects_tpr_high_nibble() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_TPR, 0xb7);
        // Act
        let cr8 = lapic.cr8();
        // Assert
        assert_eq!(cr8, 0xb);
    }

    #[test]
    fn raise_local_lint1_nmi_latches_nmi() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_LINT1, 0x400);
        // Act
        let outcome = lapic.raise_local(LocalSource::Lint1);
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert_eq!(lapic.take_nmis(), 1);
    }

    #[test]
    fn raise_local_lint1_nmi_twice_both_pending() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_LINT1, 0x400);
        let _ = lapic.raise_local(LocalSource::Lint1);
        // Act
        let outcome = lapic.raise_local(LocalSource::Lint1);
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert_eq!(lapic.take_nmis(), 2);
    }

    #[test]
    fn raise_local_lint0_extint_latches_extint() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_LINT0, 0x700);
        // Act
        let outcome = lapic.raise_local(LocalSource::Lint0);
        // Assert
        assert_eq!(outcome, AcceptOutcome::Latched);
        assert!(lapic.take_extint());
    }

    #[test]
    fn raise_local_masked_lint_not_delivered() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_LINT1, 0x1_0400);
        // Act
        let outcome = lapic.raise_local(LocalSource::Lint1);
        // Assert
        assert_eq!(outcome, AcceptOutcome::Masked);
        assert_eq!(lapic.take_nmis(), 0);
    }

    #[test]
    fn raise_local_lint0_level_fixed_coalesces_until_eoi() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_LINT0, 0x8000 | 0x58);
        let first = lapic.raise_local(LocalSource::Lint0);
        let _ = lapic.acknowledge();
        // Act
        let while_in_service = lapic.raise_local(LocalSource::Lint0);
        let eoi = lapic.eoi();
        let after_eoi = lapic.raise_local(LocalSource::Lint0);
        // Assert
        assert_eq!(first, AcceptOutcome::Requested);
        assert_eq!(while_in_service, AcceptOutcome::Coalesced);
        assert_eq!(eoi, Some(Effect::EoiBroadcast { vector: 0x58 }));
        assert_eq!(after_eoi, AcceptOutcome::Requested);
    }

    #[test]
    fn raise_local_thermal_fixed_requests_vector() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_THERMAL, 0xd1);
        // Act
        let outcome = lapic.raise_local(LocalSource::Thermal);
        // Assert
        assert_eq!(outcome, AcceptOutcome::Requested);
        assert!(lapic.is_requested(0xd1));
    }

    #[test]
    fn raise_local_cmci_illegal_vector_sets_receive_illegal() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_CMCI, 0x05);
        // Act
        let outcome = lapic.raise_local(LocalSource::Cmci);
        set32(&mut lapic, spec::REG_ESR, 0);
        // Assert
        assert_eq!(outcome, AcceptOutcome::IllegalVector);
        assert_eq!(
            read32(&mut lapic, spec::REG_ESR, 0),
            ESR_RECEIVE_ILLEGAL_VECTOR
        );
    }

    #[test]
    fn error_lvt_unmasked_illegal_accept_requests_error_vector() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_ERROR, 0xfe);
        // Act
        let _ = lapic.accept(&fixed(0x03, Edge));
        // Assert
        assert!(lapic.is_requested(0xfe));
    }

    #[test]
    fn error_lvt_illegal_vector_does_not_recurse() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, spec::REG_LVT_ERROR, 0x02);
        // Act
        let _ = lapic.accept(&fixed(0x03, Edge));
        set32(&mut lapic, spec::REG_ESR, 0);
        // Assert
        assert_eq!(
            read32(&mut lapic, spec::REG_ESR, 0),
            ESR_RECEIVE_ILLEGAL_VECTOR
        );
        assert_eq!(lapic.counters().illegal_vectors_received, 2);
    }
}
