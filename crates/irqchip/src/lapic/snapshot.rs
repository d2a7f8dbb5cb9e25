//! Save and restore of a local APIC as a plain serde struct.
//!
//! [`Lapic::save`] and [`Lapic::restore`] destructure every field
//! (`let Self { .. } = self`), so a field added to the model and forgotten
//! here breaks the build. `Lapic::restore(&lapic.save())` equals `lapic` and
//! behaves identically from then on, counters included.

use serde::{Deserialize, Serialize};

use super::spec::{ApicBaseReg, DivideReg, IcrReg, LvtKind, LvtReg, SvrReg};
use super::timer::{Countdown, Timer};
use super::vectors::VectorSet;
use super::{Lapic, LapicConfig, LapicCounters, PendingEvents};

/// The seven LVT entries as raw register values (SDM Vol. 3A 11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LvtState {
    /// LVT timer (0x320).
    pub timer: u32,
    /// LVT thermal sensor (0x330).
    pub thermal: u32,
    /// LVT performance counters (0x340).
    pub perf: u32,
    /// LVT LINT0 (0x350).
    pub lint0: u32,
    /// LVT LINT1 (0x360).
    pub lint1: u32,
    /// LVT error (0x370).
    pub error: u32,
    /// LVT CMCI (0x2f0).
    pub cmci: u32,
}

/// A running one-shot or periodic countdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CountdownState {
    /// When the countdown (re)started, in ns since VM start.
    pub start_ns: u64,
    /// Counts of the first period already consumed at `start_ns`.
    pub consumed: u32,
    /// Periods completed since `start_ns`.
    pub periods: u64,
}

/// Timer registers and countdown (SDM Vol. 3A 11.5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimerState {
    /// Initial-count register.
    pub initial_count: u32,
    /// Divide-configuration register.
    pub divide: u32,
    /// The running countdown, if any.
    pub countdown: Option<CountdownState>,
    /// IA32_TSC_DEADLINE (0 when disarmed).
    pub tsc_deadline: u64,
    /// The armed deadline in ns since VM start.
    pub tsc_deadline_ns: u64,
}

/// Events latched for the vCPU loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EventsState {
    /// NMIs pending (0..=2; a larger saved value restores as 2).
    pub nmis: u8,
    /// A pending SMI.
    pub smi: bool,
    /// A pending INIT.
    pub init: bool,
    /// A pending start-up IPI's vector.
    pub sipi: Option<u8>,
    /// A pending ExtINT.
    pub extint: bool,
}

/// The complete state of one local APIC.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LapicState {
    /// The creation-time configuration.
    pub config: LapicConfig,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// The 8-bit xAPIC ID.
    pub xapic_id: u8,
    /// TPR.
    pub tpr: u8,
    /// LDR as read.
    pub ldr: u32,
    /// DFR.
    pub dfr: u32,
    /// SVR.
    pub svr: u32,
    /// ISR, register 0 (vectors 0..31) first.
    pub isr: [u32; 8],
    /// IRR, register 0 first.
    pub irr: [u32; 8],
    /// TMR, register 0 first.
    pub tmr: [u32; 8],
    /// ESR as software reads it.
    pub esr: u32,
    /// Errors logged since the last ESR write.
    pub esr_pending: u32,
    /// The 64-bit ICR.
    pub icr: u64,
    /// The LVT entries.
    pub lvt: LvtState,
    /// The timer.
    pub timer: TimerState,
    /// Latched events.
    pub events: EventsState,
    /// Counters.
    pub counters: LapicCounters,
}

impl Lapic {
    /// The complete state, for a snapshot.
    pub fn save(&self) -> LapicState {
        let Self {
            config,
            apic_base,
            xapic_id,
            tpr,
            ldr,
            dfr,
            svr,
            isr,
            irr,
            tmr,
            esr,
            esr_pending,
            icr,
            lvt,
            timer,
            events,
            counters,
        } = self;
        let Timer {
            initial_count,
            divide,
            countdown,
            tsc_deadline,
            tsc_deadline_ns,
        } = timer;
        let PendingEvents {
            nmis,
            smi,
            init,
            sipi,
            extint,
        } = events;
        let entry = |kind: LvtKind| lvt[kind.index()].into_bits();
        LapicState {
            config: *config,
            apic_base: apic_base.into_bits(),
            xapic_id: *xapic_id,
            tpr: *tpr,
            ldr: *ldr,
            dfr: *dfr,
            svr: svr.into_bits(),
            isr: isr.to_registers(),
            irr: irr.to_registers(),
            tmr: tmr.to_registers(),
            esr: *esr,
            esr_pending: *esr_pending,
            icr: icr.into_bits(),
            lvt: LvtState {
                timer: entry(LvtKind::Timer),
                thermal: entry(LvtKind::Thermal),
                perf: entry(LvtKind::Perf),
                lint0: entry(LvtKind::Lint0),
                lint1: entry(LvtKind::Lint1),
                error: entry(LvtKind::Error),
                cmci: entry(LvtKind::Cmci),
            },
            timer: TimerState {
                initial_count: *initial_count,
                divide: divide.into_bits(),
                countdown: countdown.map(
                    |Countdown {
                         start_ns,
                         consumed,
                         periods,
                     }| {
                        CountdownState {
                            start_ns,
                            consumed,
                            periods,
                        }
                    },
                ),
                tsc_deadline: *tsc_deadline,
                tsc_deadline_ns: *tsc_deadline_ns,
            },
            events: EventsState {
                nmis: *nmis,
                smi: *smi,
                init: *init,
                sipi: *sipi,
                extint: *extint,
            },
            counters: *counters,
        }
    }

    /// A local APIC in exactly the saved state. Any state is accepted
    /// (nothing the model computes can panic on it); a state that `save` did
    /// not produce behaves as its registers say.
    pub fn restore(state: &LapicState) -> Self {
        let LapicState {
            config,
            apic_base,
            xapic_id,
            tpr,
            ldr,
            dfr,
            svr,
            isr,
            irr,
            tmr,
            esr,
            esr_pending,
            icr,
            lvt,
            timer,
            events,
            counters,
        } = state;
        let LvtState {
            timer: lvt_timer,
            thermal,
            perf,
            lint0,
            lint1,
            error,
            cmci,
        } = *lvt;
        let TimerState {
            initial_count,
            divide,
            countdown,
            tsc_deadline,
            tsc_deadline_ns,
        } = *timer;
        let EventsState {
            nmis,
            smi,
            init,
            sipi,
            extint,
        } = *events;
        let mut lvts = [LvtReg::new(); super::spec::LVT_COUNT as usize];
        for (kind, raw) in [
            (LvtKind::Timer, lvt_timer),
            (LvtKind::Thermal, thermal),
            (LvtKind::Perf, perf),
            (LvtKind::Lint0, lint0),
            (LvtKind::Lint1, lint1),
            (LvtKind::Error, error),
            (LvtKind::Cmci, cmci),
        ] {
            lvts[kind.index()] = LvtReg::from_bits(raw);
        }
        Self {
            config: *config,
            apic_base: ApicBaseReg::from_bits(*apic_base),
            xapic_id: *xapic_id,
            tpr: *tpr,
            ldr: *ldr,
            dfr: *dfr,
            svr: SvrReg::from_bits(*svr),
            isr: VectorSet::from_registers(*isr),
            irr: VectorSet::from_registers(*irr),
            tmr: VectorSet::from_registers(*tmr),
            esr: *esr,
            esr_pending: *esr_pending,
            icr: IcrReg::from_bits(*icr),
            lvt: lvts,
            timer: Timer {
                initial_count,
                divide: DivideReg::from_bits(divide),
                countdown: countdown.map(
                    |CountdownState {
                         start_ns,
                         consumed,
                         periods,
                     }| {
                        Countdown {
                            start_ns,
                            consumed,
                            periods,
                        }
                    },
                ),
                tsc_deadline,
                tsc_deadline_ns,
            },
            events: PendingEvents {
                nmis: nmis.min(super::MAX_PENDING_NMIS),
                smi,
                init,
                sipi,
                extint,
            },
            counters: *counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::spec::{REG_LVT_TIMER, REG_TIMER_DIVIDE, REG_TIMER_INITIAL, REG_TPR};
    use super::super::test_support::*;
    use super::super::{DeliveryMode, IA32_APIC_BASE};
    use super::*;
    use crate::apic_bus::TriggerMode;

    fn busy_lapic() -> Lapic {
        let mut lapic = enabled_lapic_with_tsc(3);
        set32(&mut lapic, REG_TPR, 0x21);
        set32(&mut lapic, REG_TIMER_DIVIDE, 0b0001);
        set32(&mut lapic, REG_LVT_TIMER, (1 << 17) | 0xec);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 777, 100);
        let _ = lapic.accept(&fixed(0x61, TriggerMode::Level));
        let _ = lapic.acknowledge();
        let _ = lapic.accept(&fixed(0x91, TriggerMode::Edge));
        let _ = lapic.accept(&fixed(0x02, TriggerMode::Edge));
        let _ = lapic.accept(&with_mode(DeliveryMode::StartUp, 0x12));
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        let _ = lapic.accept(&with_mode(DeliveryMode::Nmi, 0));
        let _ = lapic.tick(5000);
        lapic
    }

    #[test]
    fn save_two_pending_nmis_restores_both() {
        // Arrange
        let lapic = busy_lapic();
        // Act
        let state = lapic.save();
        let mut restored = Lapic::restore(&state);
        // Assert
        assert_eq!(state.events.nmis, 2);
        assert_eq!(restored.take_nmis(), 2);
    }

    #[test]
    fn restore_pending_nmis_above_limit_clamped() {
        // Arrange
        let mut state = busy_lapic().save();
        state.events.nmis = 200;
        // Act
        let mut restored = Lapic::restore(&state);
        // Assert
        assert_eq!(restored.take_nmis(), super::super::MAX_PENDING_NMIS);
    }

    #[test]
    fn restore_of_save_equals_original() {
        // Arrange
        let lapic = busy_lapic();
        // Act
        let restored = Lapic::restore(&lapic.save());
        // Assert
        assert_eq!(restored, lapic);
    }

    #[test]
    fn restore_of_json_round_trip_equals_original() {
        // Arrange
        let mut lapic = busy_lapic();
        to_x2apic(&mut lapic);
        let json = serde_json::to_string(&lapic.save()).unwrap_or_default();
        // Act
        let state: Option<LapicState> = serde_json::from_str(&json).ok();
        // Assert
        assert_eq!(state.map(|s| Lapic::restore(&s)), Some(lapic));
    }

    #[test]
    fn restore_then_same_operations_same_results() {
        // Arrange
        let mut original = busy_lapic();
        let mut restored = Lapic::restore(&original.save());
        // Act
        let run = |lapic: &mut Lapic| {
            let ticked = lapic.tick(20_000);
            let acked = lapic.acknowledge();
            let eoi = lapic.eoi();
            let base = lapic.msr_read(IA32_APIC_BASE, 20_000);
            (
                ticked,
                acked,
                eoi,
                base,
                lapic.next_deadline(),
                lapic.take_sipi(),
            )
        };
        let a = run(&mut original);
        let b = run(&mut restored);
        // Assert
        assert_eq!(a, b);
        assert_eq!(original, restored);
    }
}
