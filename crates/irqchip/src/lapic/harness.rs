//! A byte-driven interpreter of local-APIC operations, for fuzzing.
//!
//! [`run`] turns arbitrary bytes into a configuration and a stream of
//! operations (bus messages, acknowledge, EOI, MMIO and MSR accesses of any
//! width and value, IA32_APIC_BASE mode switches and relocation, any x2APIC
//! MSR, CR8, local interrupts, timer ticks with advancing time, event takes,
//! snapshot round trips) and checks the model's invariants after each:
//! nothing illegal or unacknowledged in the registers, nothing acknowledged
//! at or below the PPR, the PPR and CR8 as the SDM derives them, an EOI
//! retiring the highest in-service vector and broadcasting exactly for a
//! level one without suppression, a disabled APIC holding nothing. NMIs: an
//! NMI reaching an enabled APIC (bus message or NMI-mode LVT entry) is never
//! lost while fewer than two are pending and never adds a third; taking them
//! hands out exactly the count pending. Timer: a register write that
//! switches the LVT timer between one-shot and periodic leaves the countdown,
//! the initial count and the current count as they were; one that switches
//! into or out of TSC-deadline mode leaves nothing armed. A cargo-fuzz
//! target calls it and panics on `Err`; a stable test replays a corpus
//! through it. The model itself never panics, so `run` never does either.

use super::spec::{DM_NMI, LvtKind};
use super::timer::TimerMode;
use super::vectors::VectorSet;
use super::{AcceptOutcome, Lapic, LapicConfig, LocalSource, MAX_PENDING_NMIS, TscClock};
use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};

/// MSRs the interpreter picks from: IA32_APIC_BASE, IA32_TSC_DEADLINE, every
/// x2APIC register and a few reserved or foreign ones.
const MSRS: [u32; 20] = [
    0x1b, 0x6e0, 0x802, 0x803, 0x808, 0x80a, 0x80b, 0x80d, 0x80f, 0x828, 0x830, 0x832, 0x835,
    0x837, 0x838, 0x839, 0x83e, 0x83f, 0x80e, 0x8ff,
];

/// Reads little-endian values off the front of the input; missing bytes are 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let take = self.0.len().min(N);
        let (head, tail) = self.0.split_at(take);
        for (dst, src) in out.iter_mut().zip(head) {
            *dst = *src;
        }
        self.0 = tail;
        out
    }

    fn u8(&mut self) -> u8 {
        u8::from_le_bytes(self.bytes())
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    fn message(&mut self) -> Message {
        let flags = self.u8();
        Message {
            destination: 0,
            destination_mode: if flags & 1 != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            delivery_mode: DeliveryMode::from_bits(flags >> 1),
            vector: self.u8(),
            trigger_mode: if flags & 0x10 != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: flags & 0x20 == 0,
            shorthand: Shorthand::None,
        }
    }
}

/// Runs the operations `data` encodes on one local APIC. `Err` names the
/// first broken invariant.
pub fn run(data: &[u8]) -> Result<(), String> {
    let mut input = Input(data);
    let id = u32::from(input.u16());
    let flags = input.u8();
    let mut config = LapicConfig::new(id, flags & 1 != 0);
    config.x2apic = flags & 2 == 0;
    config.directed_eoi = flags & 4 == 0;
    if flags & 8 != 0 {
        config = config.with_tsc(TscClock {
            hz: input.u64(),
            tsc_at_zero: input.u64() as i64,
        });
    }
    let mut lapic = Lapic::new(config);
    let mut acknowledged = VectorSet::EMPTY;
    let mut now = 0u64;
    while !input.0.is_empty() {
        now = now.saturating_add(u64::from(input.u16()));
        step(&mut lapic, &mut input, now, &mut acknowledged)?;
        check(&lapic, &acknowledged)?;
    }
    let restored = Lapic::restore(&lapic.save());
    if restored != lapic {
        return Err("restore(save(x)) differs from x".into());
    }
    Ok(())
}

fn step(
    lapic: &mut Lapic,
    input: &mut Input<'_>,
    now: u64,
    acknowledged: &mut VectorSet,
) -> Result<(), String> {
    match input.u8() % 14 {
        0 => {
            let msg = input.message();
            let nmi = msg.delivery_mode == DeliveryMode::Nmi;
            let (enabled, before) = (lapic.hw_enabled(), lapic.events.nmis);
            let outcome = lapic.accept(&msg);
            if nmi {
                check_nmi_delivery(lapic, enabled, before, outcome)?;
            }
        }
        1 => {
            let ppr = lapic.ppr();
            let expected = lapic.highest_deliverable();
            let taken = lapic.acknowledge();
            if taken != expected {
                return Err(format!(
                    "acknowledge gave {taken:?}, deliverable was {expected:?}"
                ));
            }
            if let Some(v) = taken {
                if v & 0xf0 <= ppr & 0xf0 {
                    return Err(format!("acknowledged {v:#x} at or below PPR {ppr:#x}"));
                }
                acknowledged.set(v);
            }
        }
        2 => {
            let retired = lapic.isr.highest();
            let broadcast =
                retired.filter(|&v| lapic.tmr.contains(v) && !lapic.svr.suppress_eoi_broadcast());
            let effect = lapic.eoi();
            let expected = broadcast.map(|vector| super::Effect::EoiBroadcast { vector });
            if effect != expected {
                return Err(format!(
                    "EOI retiring {retired:x?} gave {effect:?}, expected {expected:?}"
                ));
            }
            if let Some(v) = retired {
                if lapic.isr.contains(v) {
                    return Err(format!("EOI left {v:#x} in service"));
                }
                acknowledged.clear(v);
            }
        }
        3 => {
            let offset = u64::from(input.u16() % 0x1100);
            let len = usize::from(input.u8() % 9);
            let value = input.u64().to_le_bytes();
            let data = value.get(..len).unwrap_or(&[]);
            let probe = TimerProbe::new(lapic, now);
            let _ = lapic.mmio_write(offset, data, now);
            probe.check(lapic, now)?;
        }
        4 => {
            let offset = u64::from(input.u16() % 0x1100);
            let mut data = [0u8; 8];
            let len = usize::from(input.u8() % 9);
            if let Some(slice) = data.get_mut(..len) {
                lapic.mmio_read(offset, slice, now);
            }
        }
        5 => {
            let msr = MSRS
                .get(usize::from(input.u8()) % MSRS.len())
                .copied()
                .unwrap_or(0);
            let value = input.u64();
            let probe = TimerProbe::new(lapic, now);
            let _ = lapic.msr_write(msr, value, now);
            probe.check(lapic, now)?;
        }
        6 => {
            let msr = MSRS
                .get(usize::from(input.u8()) % MSRS.len())
                .copied()
                .unwrap_or(0);
            let _ = lapic.msr_read(msr, now);
        }
        7 => {
            let _ = lapic.set_cr8(u64::from(input.u8()));
        }
        8 => {
            let source = match input.u8() % 5 {
                0 => LocalSource::Lint0,
                1 => LocalSource::Lint1,
                2 => LocalSource::Thermal,
                3 => LocalSource::Perf,
                _ => LocalSource::Cmci,
            };
            let lvt = lapic.lvt(source.lvt());
            let nmi = !lvt.masked() && lvt.delivery_mode() == DM_NMI;
            let (enabled, before) = (lapic.hw_enabled(), lapic.events.nmis);
            let outcome = lapic.raise_local(source);
            if nmi {
                check_nmi_delivery(lapic, enabled, before, outcome)?;
            }
        }
        9 => {
            let _ = lapic.tick(now);
            let _ = lapic.next_deadline();
        }
        10 => {
            let pending = lapic.events.nmis;
            let taken = lapic.take_nmis();
            if taken != pending || lapic.events.nmis != 0 {
                return Err(format!(
                    "take_nmis gave {taken} of {pending} pending, left {}",
                    lapic.events.nmis
                ));
            }
            let _ = (lapic.take_smi(), lapic.take_init());
            let _ = (lapic.take_sipi(), lapic.take_extint());
        }
        12 => {
            // IA32_APIC_BASE with a valid value: disabled, xAPIC or x2APIC,
            // at the default base or relocated, BSP kept.
            let mode = input.u8();
            let bsp = lapic.apic_base.bsp();
            let base = if mode & 4 != 0 {
                0xfed0_0000
            } else {
                0xfee0_0000
            };
            let bits = match mode % 3 {
                0 => 0,
                1 => 1 << 11,
                _ => (1 << 11) | (1 << 10),
            };
            let value = base | bits | u64::from(bsp) << 8;
            if lapic.msr_write(super::IA32_APIC_BASE, value, now).is_ok() && !lapic.hw_enabled() {
                *acknowledged = VectorSet::EMPTY;
            }
        }
        13 => {
            // Any MSR of the x2APIC range, read or written.
            let msr = super::X2APIC_MSR_FIRST + u32::from(input.u8());
            if input.u8() & 1 != 0 {
                let probe = TimerProbe::new(lapic, now);
                let _ = lapic.msr_write(msr, input.u64(), now);
                probe.check(lapic, now)?;
            } else {
                let _ = lapic.msr_read(msr, now);
            }
        }
        _ => {
            let restored = Lapic::restore(&lapic.save());
            if restored != *lapic {
                return Err("restore(save(x)) differs from x".into());
            }
            let mut copy = lapic.clone();
            copy.load_kvm_page(&lapic.to_kvm_page(now), now);
            if copy.to_kvm_page(now) != lapic.to_kvm_page(now) {
                return Err("KVM register page does not round-trip".into());
            }
            *lapic = restored;
        }
    }
    Ok(())
}

/// An NMI offered to an APIC that was `enabled` with `before` NMIs pending
/// (SDM Vol. 3A 7.7.1 and KVM's `process_nmi`, as the module documentation
/// of `lapic` says): an enabled APIC counts it up to two; at two it merges.
fn check_nmi_delivery(
    lapic: &Lapic,
    enabled: bool,
    before: u8,
    outcome: AcceptOutcome,
) -> Result<(), String> {
    let after = lapic.events.nmis;
    let expected = if enabled {
        before.saturating_add(1).min(MAX_PENDING_NMIS)
    } else {
        before
    };
    let expected_outcome = match (enabled, before >= MAX_PENDING_NMIS) {
        (false, _) => AcceptOutcome::Disabled,
        (true, false) => AcceptOutcome::Latched,
        (true, true) => AcceptOutcome::Coalesced,
    };
    if after != expected || outcome != expected_outcome {
        return Err(format!(
            "NMI with {before} pending (enabled: {enabled}) gave {outcome:?} and {after} pending, \
             expected {expected_outcome:?} and {expected}"
        ));
    }
    Ok(())
}

/// The timer before a register write, for the mode-switch rule: the
/// write path ticks the timer at `now` before it changes a register, so
/// `ticked` is what the LVT timer write finds.
struct TimerProbe {
    mode: TimerMode,
    apic_base: u64,
    ticked: Lapic,
}

impl TimerProbe {
    fn new(lapic: &Lapic, now: u64) -> Self {
        let mut ticked = lapic.clone();
        let _ = ticked.tick(now);
        Self {
            mode: TimerMode::of(lapic.lvt(LvtKind::Timer)),
            apic_base: lapic.apic_base.into_bits(),
            ticked,
        }
    }

    /// One-shot <-> periodic keeps the countdown; into or out of
    /// TSC-deadline mode disarms (KVM's `apic_update_lvtt`). An
    /// IA32_APIC_BASE write that reset the registers is not a mode switch.
    fn check(&self, lapic: &Lapic, now: u64) -> Result<(), String> {
        let mode = TimerMode::of(lapic.lvt(LvtKind::Timer));
        if mode == self.mode || lapic.apic_base.into_bits() != self.apic_base {
            return Ok(());
        }
        let timer = &lapic.timer;
        if (mode == TimerMode::TscDeadline) != (self.mode == TimerMode::TscDeadline) {
            if timer.countdown.is_some() || timer.initial_count != 0 || timer.tsc_deadline != 0 {
                return Err(format!(
                    "timer still armed after {:?} -> {mode:?}: {timer:?}",
                    self.mode
                ));
            }
            return Ok(());
        }
        let old = &self.ticked;
        let (count, old_count) = (lapic.timer_current_count(now), old.timer_current_count(now));
        if timer.countdown != old.timer.countdown
            || timer.initial_count != old.timer.initial_count
            || count != old_count
        {
            return Err(format!(
                "{:?} -> {mode:?} changed the countdown: {:?} (count {old_count}) became {timer:?} (count {count})",
                self.mode, old.timer
            ));
        }
        Ok(())
    }
}

fn check(lapic: &Lapic, acknowledged: &VectorSet) -> Result<(), String> {
    if lapic.events.nmis > MAX_PENDING_NMIS {
        return Err(format!("{} NMIs pending", lapic.events.nmis));
    }
    for (name, set) in [
        ("IRR", &lapic.irr),
        ("ISR", &lapic.isr),
        ("TMR", &lapic.tmr),
    ] {
        if set.to_registers()[0] & 0xffff != 0 {
            return Err(format!("{name} holds an illegal vector"));
        }
    }
    for v in 0..=255u8 {
        if lapic.isr.contains(v) && !acknowledged.contains(v) {
            return Err(format!("ISR holds {v:#x}, never acknowledged"));
        }
    }
    if let Some(v) = lapic.highest_deliverable()
        && (!lapic.irr.contains(v) || v & 0xf0 <= lapic.ppr() & 0xf0)
    {
        return Err(format!("deliverable {v:#x} not requested or not above PPR"));
    }
    if !lapic.hw_enabled() {
        if lapic.irr != VectorSet::EMPTY || lapic.isr != VectorSet::EMPTY {
            return Err("IRR or ISR not empty while globally disabled".into());
        }
        if lapic.highest_deliverable().is_some() {
            return Err("a globally disabled APIC offers a vector".into());
        }
    }
    // PPR (SDM Vol. 3A 11.8.3.1): the TPR if its class is at least the
    // highest in-service class, else that class.
    let isrv = lapic.isr.highest().unwrap_or(0) & 0xf0;
    let ppr = if lapic.tpr & 0xf0 >= isrv {
        lapic.tpr
    } else {
        isrv
    };
    if lapic.ppr() != ppr {
        return Err(format!("PPR {:#x}, expected {ppr:#x}", lapic.ppr()));
    }
    if u64::from(lapic.tpr >> 4) != lapic.cr8() {
        return Err(format!(
            "CR8 {} does not mirror TPR {:#x}",
            lapic.cr8(),
            lapic.tpr
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn run_empty_input_ok() {
        // Arrange / Act
        let result = run(&[]);
        // Assert
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn run_enable_accept_ack_eoi_sequence_ok() {
        // Arrange: id 1, TSC off; SVR := 0x1ff; accept 0x61 level; ack; EOI.
        let mut data = vec![1, 0, 0];
        data.extend([0, 0, 3, 0xf0, 0, 4, 0xff, 1, 0, 0, 0, 0, 0, 0]);
        data.extend([0, 0, 0, 0x10, 0x61]);
        data.extend([0, 0, 1]);
        data.extend([0, 0, 2]);
        data.extend([0, 0, 11]);
        // Act
        let result = run(&data);
        // Assert
        assert_eq!(result, Ok(()));
    }

    /// `now += 0`, then an xAPIC MMIO write of `value` at `offset` (op 3).
    fn mmio_write(data: &mut Vec<u8>, advance: u16, offset: u16, value: u32) {
        data.extend(advance.to_le_bytes());
        data.push(3);
        data.extend(offset.to_le_bytes());
        data.push(4);
        data.extend(u64::from(value).to_le_bytes());
    }

    #[test]
    fn run_three_nmis_then_take_ok() {
        // Arrange: id 1, TSC off; SVR := 0x1ff; three NMI messages (op 0,
        // flags 4 << 1 = NMI), take (op 10).
        let mut data = vec![1, 0, 0];
        mmio_write(&mut data, 0, 0xf0, 0x1ff);
        for _ in 0..3 {
            data.extend([0, 0, 0, 4 << 1, 0]);
        }
        data.extend([0, 0, 10]);
        // Act
        let result = run(&data);
        // Assert
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn run_timer_mode_switches_ok() {
        // Arrange: id 0, TSC at 1 GHz; SVR; divide by 1; one-shot 1000 at
        // t=0; periodic at 400; one-shot at 1400 (after the reload at 1000);
        // TSC-deadline at 1500; one-shot at 1600.
        let mut data = vec![0, 0, 8];
        data.extend(1_000_000_000u64.to_le_bytes());
        data.extend(0u64.to_le_bytes());
        mmio_write(&mut data, 0, 0xf0, 0x1ff);
        mmio_write(&mut data, 0, 0x3e0, 0b1011);
        mmio_write(&mut data, 0, 0x320, 0xec);
        mmio_write(&mut data, 0, 0x380, 1000);
        mmio_write(&mut data, 400, 0x320, (1 << 17) | 0xec);
        mmio_write(&mut data, 1000, 0x320, 0xec);
        mmio_write(&mut data, 100, 0x320, (2 << 17) | 0xec);
        mmio_write(&mut data, 100, 0x320, 0xec);
        // Act
        let result = run(&data);
        // Assert
        assert_eq!(result, Ok(()));
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn run_random_bytes_never_breaks_invariants(
            data in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            prop_assert_eq!(run(&data), Ok(()));
        }
    }
}
