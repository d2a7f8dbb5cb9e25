//! Property tests of one local APIC over random operation streams: bus
//! messages, acknowledge and EOI, MMIO and MSR accesses of any width and
//! value, CR8, local interrupts, timer ticks and event takes.
//!
//! Checked after every operation: nothing panics; an acknowledged vector is
//! legal, was requested and lies above the PPR's class; the ISR holds only
//! vectors that were acknowledged; IRR, ISR and TMR never hold vectors 0..15;
//! TMR bits appear only through a level-triggered acceptance of that vector;
//! `highest_deliverable` agrees with IRR and PPR. Checked at the end: a
//! snapshot (also through JSON) restores to an equal APIC that then behaves
//! identically.

use proptest::prelude::*;

use super::spec::{IA32_APIC_BASE, IA32_TSC_DEADLINE, LvtKind};
use super::vectors::VectorSet;
use super::{Lapic, LapicConfig, LapicState, LocalSource, TscClock};
use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};

#[derive(Clone, Debug)]
enum Op {
    Accept(Message),
    Acknowledge,
    Eoi,
    MmioWrite { offset: u64, data: Vec<u8> },
    MmioRead { offset: u64, len: usize },
    MsrWrite { msr: u32, value: u64 },
    MsrRead { msr: u32 },
    SetCr8(u64),
    RaiseLocal(LocalSource),
    Tick,
    TakeEvents,
}

/// A few vectors in distinct classes so priorities interact, plus any.
fn vector() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(vec![0x31u8, 0x32, 0x45, 0x61, 0x80, 0x81, 0xec, 0xfe]),
        1 => any::<u8>(),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (
        vector(),
        0u8..8,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(vector, mode, level_trigger, level, logical)| Message {
            destination: 0,
            destination_mode: if logical {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            delivery_mode: DeliveryMode::from_bits(mode),
            vector,
            trigger_mode: if level_trigger {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level,
            shorthand: Shorthand::None,
        })
}

/// Register values: anything, small ones, and LVT/SVR-shaped ones.
fn reg_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => any::<u32>(),
        2 => 0u32..0x200,
        2 => (vector(), 0u32..8, any::<bool>(), 0u32..4).prop_map(|(v, dm, masked, mode)| {
            u32::from(v) | dm << 8 | u32::from(masked) << 16 | mode << 17
        }),
        1 => Just(0x1ff),
        1 => Just(0x11ff),
    ]
}

fn mmio_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (0u64..0x40).prop_map(|i| i * 16),
        1 => 0u64..0x1100,
    ]
}

fn msr() -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => Just(IA32_APIC_BASE),
        1 => Just(IA32_TSC_DEADLINE),
        6 => 0x800u32..0x840,
        1 => 0x7f0u32..0x910,
    ]
}

fn msr_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => any::<u64>(),
        2 => reg_value().prop_map(u64::from),
        1 => (any::<u32>(), reg_value()).prop_map(|(h, l)| u64::from(h) << 32 | u64::from(l)),
        2 => prop::sample::select(vec![
            0xfee0_0900u64, // enabled, BSP
            0xfee0_0d00,    // x2APIC
            0xfee0_0100,    // disabled
            0xfee0_0000,
        ]),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => message().prop_map(Op::Accept),
        5 => Just(Op::Acknowledge),
        4 => Just(Op::Eoi),
        6 => (mmio_offset(), reg_value(), prop_oneof![6 => Just(4usize), 1 => 0usize..9])
            .prop_map(|(offset, value, len)| {
                let mut data = value.to_le_bytes().to_vec();
                data.resize(len, 0);
                Op::MmioWrite { offset, data }
            }),
        2 => (mmio_offset(), prop_oneof![3 => Just(4usize), 1 => 0usize..9])
            .prop_map(|(offset, len)| Op::MmioRead { offset, len }),
        4 => (msr(), msr_value()).prop_map(|(msr, value)| Op::MsrWrite { msr, value }),
        1 => msr().prop_map(|msr| Op::MsrRead { msr }),
        2 => (0u64..20).prop_map(Op::SetCr8),
        2 => prop::sample::select(vec![
            LocalSource::Lint0,
            LocalSource::Lint1,
            LocalSource::Thermal,
            LocalSource::Perf,
            LocalSource::Cmci,
        ])
        .prop_map(Op::RaiseLocal),
        3 => Just(Op::Tick),
        1 => Just(Op::TakeEvents),
    ]
}

/// Operations with the time at which each happens (non-decreasing).
fn timed_ops(max: usize) -> impl Strategy<Value = Vec<(u64, Op)>> {
    prop::collection::vec((0u64..3000, op()), 1..max).prop_map(|ops| {
        let mut now = 0;
        ops.into_iter()
            .map(|(delta, op)| {
                now += delta;
                (now, op)
            })
            .collect()
    })
}

fn new_lapic() -> Lapic {
    let config = LapicConfig::new(1, false).with_tsc(TscClock {
        hz: 3_000_000_000,
        tsc_at_zero: 12_345,
    });
    let mut lapic = Lapic::new(config);
    let _ = lapic.mmio_write(0xf0, &0x1ffu32.to_le_bytes(), 0);
    lapic
}

/// Runs one operation; returns a description of every output it produced.
fn apply(lapic: &mut Lapic, now: u64, op: &Op) -> String {
    match op {
        Op::Accept(msg) => format!("{:?}", lapic.accept(msg)),
        Op::Acknowledge => format!("{:?}", lapic.acknowledge()),
        Op::Eoi => format!("{:?}", lapic.eoi()),
        Op::MmioWrite { offset, data } => format!("{:?}", lapic.mmio_write(*offset, data, now)),
        Op::MmioRead { offset, len } => {
            let mut data = vec![0u8; *len];
            lapic.mmio_read(*offset, &mut data, now);
            format!("{data:?}")
        }
        Op::MsrWrite { msr, value } => format!("{:?}", lapic.msr_write(*msr, *value, now)),
        Op::MsrRead { msr } => format!("{:?}", lapic.msr_read(*msr, now)),
        Op::SetCr8(v) => format!("{:?}", lapic.set_cr8(*v)),
        Op::RaiseLocal(source) => format!("{:?}", lapic.raise_local(*source)),
        Op::Tick => format!("{:?} {:?}", lapic.tick(now), lapic.next_deadline()),
        Op::TakeEvents => format!(
            "{:?}",
            (
                lapic.take_nmis(),
                lapic.take_smi(),
                lapic.take_init(),
                lapic.take_sipi(),
                lapic.take_extint(),
            )
        ),
    }
}

/// The vectors a level-triggered acceptance by `op` may add to the TMR.
fn level_vectors(lapic: &Lapic, op: &Op) -> VectorSet {
    let mut allowed = VectorSet::EMPTY;
    match op {
        Op::Accept(msg) if msg.trigger_mode == TriggerMode::Level => allowed.set(msg.vector),
        Op::RaiseLocal(LocalSource::Lint0) => allowed.set(lapic.lvt(LvtKind::Lint0).vector()),
        _ => {}
    }
    allowed
}

/// Shadow state the invariants need.
struct Shadow {
    /// Every vector ever acknowledged.
    acknowledged: VectorSet,
}

fn check_step(
    before: &Lapic,
    after: &Lapic,
    op: &Op,
    output: &str,
    shadow: &mut Shadow,
) -> Result<(), TestCaseError> {
    if let Op::Acknowledge = op {
        if let Some(v) = before.highest_deliverable() {
            prop_assert_eq!(output, format!("{:?}", Some(v)));
            prop_assert!(v >= 16, "acknowledged illegal vector {:#x}", v);
            prop_assert!(
                before.irr.contains(v),
                "acknowledged {:#x} not requested",
                v
            );
            prop_assert!(
                v & 0xf0 > before.ppr() & 0xf0,
                "acknowledged {:#x} at or below PPR {:#x}",
                v,
                before.ppr()
            );
            shadow.acknowledged.set(v);
        } else {
            prop_assert_eq!(output, "None");
        }
    }
    prop_assert!(
        after.isr.is_subset(&shadow.acknowledged),
        "ISR holds a never-acknowledged vector"
    );
    prop_assert_eq!(after.irr.illegal_bits(), 0);
    prop_assert_eq!(after.isr.illegal_bits(), 0);
    prop_assert_eq!(after.tmr.illegal_bits(), 0);
    let mut new_tmr = after.tmr;
    for v in 0..=255u8 {
        if before.tmr.contains(v) {
            new_tmr.clear(v);
        }
    }
    prop_assert!(
        new_tmr.is_subset(&level_vectors(before, op)),
        "TMR gained a bit without a level acceptance: {:?}",
        op
    );
    if let Some(v) = after.highest_deliverable() {
        prop_assert!(after.irr.contains(v));
        prop_assert!(v & 0xf0 > after.ppr() & 0xf0);
        prop_assert_eq!(after.irr.highest(), Some(v));
    }
    Ok(())
}

proptest! {
    // Failures are reported, not persisted: the crate's regression files
    // belong to its owner; a found case becomes a named unit test instead.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_ops_keep_priority_and_vector_invariants(ops in timed_ops(200)) {
        let mut lapic = new_lapic();
        let mut shadow = Shadow { acknowledged: VectorSet::EMPTY };
        for (now, op) in &ops {
            let before = lapic.clone();
            let output = apply(&mut lapic, *now, op);
            check_step(&before, &lapic, op, &output, &mut shadow)?;
        }
    }

    #[test]
    fn snapshot_round_trip_is_exact_and_behaves_identically(
        first in timed_ops(120),
        second in timed_ops(120),
    ) {
        let mut lapic = new_lapic();
        for (now, op) in &first {
            let _ = apply(&mut lapic, *now, op);
        }
        let state = lapic.save();
        let json = serde_json::to_string(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded: LapicState =
            serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded, &state);
        let mut restored = Lapic::restore(&decoded);
        prop_assert_eq!(&restored, &lapic);
        let offset = first.last().map_or(0, |(now, _)| *now);
        for (now, op) in &second {
            let a = apply(&mut lapic, offset + now, op);
            let b = apply(&mut restored, offset + now, op);
            prop_assert_eq!(a, b);
        }
        prop_assert_eq!(restored, lapic);
    }

    #[test]
    fn kvm_page_round_trip_reads_back_identically(ops in timed_ops(120)) {
        let mut lapic = new_lapic();
        let mut now = 0;
        for (t, op) in &ops {
            now = *t;
            let _ = apply(&mut lapic, now, op);
        }
        let page = lapic.to_kvm_page(now);
        let mut copy = lapic.clone();
        copy.load_kvm_page(&page, now);
        prop_assert_eq!(copy.to_kvm_page(now), page);
    }

    #[test]
    fn restore_of_arbitrary_state_never_panics(
        raw in prop::collection::vec(any::<u64>(), 40),
        ops in timed_ops(60),
    ) {
        let r = |i: usize| raw.get(i).copied().unwrap_or(0);
        let mut state = new_lapic().save();
        state.config.bus_hz = r(0);
        state.config.tsc = Some(TscClock { hz: r(1), tsc_at_zero: r(2) as i64 });
        state.apic_base = r(3);
        state.tpr = r(4) as u8;
        state.svr = r(5) as u32;
        state.isr = [r(6) as u32, r(7) as u32, 0, 0, 0, 0, r(8) as u32, 0];
        state.irr = [r(9) as u32, 0, r(10) as u32, 0, 0, 0, 0, r(11) as u32];
        state.tmr = [r(12) as u32; 8];
        state.icr = r(13);
        state.lvt.timer = r(14) as u32;
        state.lvt.lint0 = r(15) as u32;
        state.lvt.error = r(16) as u32;
        state.timer.initial_count = r(17) as u32;
        state.timer.divide = r(18) as u32;
        state.timer.countdown = Some(super::snapshot::CountdownState {
            start_ns: r(19),
            consumed: r(20) as u32,
            periods: r(21),
        });
        state.timer.tsc_deadline = r(22);
        state.timer.tsc_deadline_ns = r(23);
        state.counters.timer_missed_periods = r(24);
        state.counters.timer_expirations = u64::MAX;
        let mut lapic = Lapic::restore(&state);
        for (now, op) in &ops {
            let _ = apply(&mut lapic, now.saturating_add(r(25) >> 1), op);
            let _ = lapic.next_deadline();
            let _ = lapic.to_kvm_page(*now);
        }
    }
}
