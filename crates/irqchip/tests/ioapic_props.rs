//! Property tests of the IOAPIC over random operation streams: guest MMIO,
//! host entry writes, line changes, EOIs and resets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use irqchip::apic_bus::{Message, TriggerMode};
use irqchip::ioapic::spec::{EOI_OFFSET, IOREGSEL_OFFSET, IOWIN_OFFSET};
use irqchip::ioapic::{Ioapic, IoapicConfig, IoapicState, NUM_PINS, RedirectionEntry};
use proptest::prelude::*;

/// Vectors the stream uses, few so that EOIs often match.
const VECTORS: [u8; 3] = [0x40, 0x41, 0x42];

#[derive(Clone, Debug)]
enum Op {
    SetLine { pin: u8, level: bool },
    Eoi { vector: u8 },
    MmioWrite { offset: u64, data: Vec<u8> },
    MmioRead { offset: u64, len: usize },
    HostWrite { pin: u8, entry: u64 },
    Reset,
}

fn entry_bits() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (
            prop::sample::select(VECTORS.to_vec()),
            0u64..8,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<u8>(),
        )
            .prop_map(|(vector, mode, logical, low, level, masked, dest)| {
                u64::from(vector)
                    | mode << 8
                    | u64::from(logical) << 11
                    | u64::from(low) << 13
                    | u64::from(level) << 15
                    | u64::from(masked) << 16
                    | u64::from(dest) << 56
            }),
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let index = prop_oneof![4 => 0x10u8..0x40, 1 => any::<u8>()];
    prop_oneof![
        6 => (0u8..26, any::<bool>()).prop_map(|(pin, level)| Op::SetLine { pin, level }),
        2 => prop_oneof![
            3 => prop::sample::select(VECTORS.to_vec()),
            1 => any::<u8>(),
        ]
        .prop_map(|vector| Op::Eoi { vector }),
        2 => index.prop_map(|index| Op::MmioWrite {
            offset: IOREGSEL_OFFSET,
            data: u32::from(index).to_le_bytes().to_vec(),
        }),
        2 => entry_bits().prop_flat_map(|bits| {
            prop::sample::select(vec![bits as u32, (bits >> 32) as u32]).prop_map(|value| {
                Op::MmioWrite {
                    offset: IOWIN_OFFSET,
                    data: value.to_le_bytes().to_vec(),
                }
            })
        }),
        1 => (
            prop::sample::select(vec![0u64, 1, 4, 0x10, 0x12, 0x40, 0x44, 0x80, 0xfff]),
            prop::collection::vec(any::<u8>(), 0..9),
        )
            .prop_map(|(offset, data)| Op::MmioWrite { offset, data }),
        1 => (
            prop::sample::select(vec![IOREGSEL_OFFSET, IOWIN_OFFSET, EOI_OFFSET, 3, 0x20]),
            0usize..9,
        )
            .prop_map(|(offset, len)| Op::MmioRead { offset, len }),
        3 => (0u8..25, entry_bits()).prop_map(|(pin, entry)| Op::HostWrite { pin, entry }),
        1 => Just(Op::Reset),
    ]
}

/// What one operation produced: messages by pin, and any MMIO read data.
#[derive(Debug, PartialEq, Eq)]
struct Effect {
    deliveries: Vec<(u8, Message)>,
    read: Vec<u8>,
    storm: u32,
    routes_changed: bool,
}

fn apply(ioapic: &mut Ioapic, op: &Op) -> Effect {
    let mut effect = Effect {
        deliveries: Vec::new(),
        read: Vec::new(),
        storm: 0,
        routes_changed: false,
    };
    let output = match op {
        Op::SetLine { pin, level } => {
            if let Some(message) = ioapic.set_line(*pin, *level) {
                effect.deliveries.push((*pin, message));
            }
            None
        }
        Op::Eoi { vector } => Some(ioapic.eoi(*vector)),
        Op::MmioWrite { offset, data } => Some(ioapic.mmio_write(*offset, data)),
        Op::MmioRead { offset, len } => {
            effect.read = vec![0; *len];
            ioapic.mmio_read(*offset, &mut effect.read);
            None
        }
        Op::HostWrite { pin, entry } => ioapic
            .write_rte(*pin, RedirectionEntry::from_bits(*entry))
            .ok(),
        Op::Reset => {
            ioapic.reset();
            None
        }
    };
    if let Some(output) = output {
        effect
            .deliveries
            .extend(output.deliveries().iter().map(|d| (d.pin, d.message)));
        effect.storm = output.storm_pins().bits();
        effect.routes_changed = output.routes_changed();
    }
    effect
}

fn config() -> IoapicConfig {
    IoapicConfig {
        storm_threshold: 3,
        ..IoapicConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Remote IRR is only ever set on level-triggered entries, delivery
    /// status always reads 0, and no reserved bit is ever set.
    #[test]
    fn remote_irr_only_on_level_entries(ops in prop::collection::vec(op(), 0..200)) {
        let mut ioapic = Ioapic::new(config());
        for op in &ops {
            apply(&mut ioapic, op);
            for (pin, entry) in ioapic.entries() {
                prop_assert!(!entry.remote_irr() || entry.level_triggered(), "pin {pin}: {entry:?}");
                prop_assert!(!entry.delivery_status());
                prop_assert_eq!(entry.into_bits() & 0x00ff_ffff_fffe_0000, 0);
            }
        }
    }

    /// Every message is the one the pin's entry describes right after the
    /// operation that sent it, and comes from an unmasked pin.
    #[test]
    fn deliveries_carry_the_entry_at_delivery_time(ops in prop::collection::vec(op(), 0..200)) {
        let mut ioapic = Ioapic::new(config());
        for op in &ops {
            let effect = apply(&mut ioapic, op);
            for (pin, message) in effect.deliveries {
                let entry = ioapic.rte(pin).unwrap();
                prop_assert_eq!(Some(message), ioapic.message(pin));
                prop_assert_eq!(message.vector, entry.vector());
                prop_assert_eq!(message.destination, u32::from(entry.destination()));
                prop_assert!(!entry.masked());
            }
        }
    }

    /// A level pin sends only with Remote IRR clear before the operation,
    /// or on the EOI of its vector; and it leaves Remote IRR set.
    #[test]
    fn level_pins_deliver_only_once_per_eoi(ops in prop::collection::vec(op(), 0..200)) {
        let mut ioapic = Ioapic::new(config());
        for op in &ops {
            let before = ioapic.clone();
            let effect = apply(&mut ioapic, op);
            for (pin, message) in effect.deliveries {
                if message.trigger_mode != TriggerMode::Level {
                    continue;
                }
                let was = before.rte(pin).unwrap();
                let eoi_of_its_vector = matches!(op, Op::Eoi { vector } if *vector == was.vector())
                    || matches!(op, Op::MmioWrite { offset, data }
                        if *offset == EOI_OFFSET && data.first() == Some(&was.vector()));
                prop_assert!(!was.remote_irr() || eoi_of_its_vector, "pin {pin} after {op:?}");
                prop_assert!(ioapic.rte(pin).unwrap().remote_irr());
            }
        }
    }

    /// Saving at any point and restoring into a fresh IOAPIC gives one that
    /// answers the rest of the stream exactly as the original.
    #[test]
    fn snapshot_round_trip_is_exact(
        ops in prop::collection::vec(op(), 0..200),
        split in any::<prop::sample::Index>(),
    ) {
        let split = split.index(ops.len() + 1);
        let mut original = Ioapic::new(config());
        for op in &ops[..split] {
            apply(&mut original, op);
        }
        let json = serde_json::to_string(&original.save()).unwrap();
        let state: IoapicState = serde_json::from_str(&json).unwrap();
        let mut restored = Ioapic::new(config());
        restored.restore(&state).unwrap();
        prop_assert_eq!(&restored, &original);
        for op in &ops[split..] {
            prop_assert_eq!(apply(&mut restored, op), apply(&mut original, op));
        }
        prop_assert_eq!(restored.save(), original.save());
    }

    /// Raw MMIO of any offset and width never panics, and accesses the
    /// IOAPIC does not decode are all counted.
    #[test]
    fn arbitrary_mmio_is_counted_not_fatal(
        accesses in prop::collection::vec((0u64..0x100, prop::collection::vec(any::<u8>(), 0..9), any::<bool>()), 0..100),
    ) {
        let mut ioapic = Ioapic::new(config());
        let mut expected_bad = 0u64;
        for (offset, data, is_write) in &accesses {
            let decoded = matches!(
                (*offset, data.len()),
                (IOREGSEL_OFFSET, 1 | 2 | 4) | (IOWIN_OFFSET, 4) | (EOI_OFFSET, 1 | 2 | 4)
            );
            expected_bad += u64::from(!decoded);
            if *is_write {
                ioapic.mmio_write(*offset, data);
            } else {
                let mut buffer = data.clone();
                ioapic.mmio_read(*offset, &mut buffer);
                if !decoded {
                    prop_assert!(buffer.iter().all(|&b| b == 0xff));
                }
            }
        }
        let counters = ioapic.counters();
        prop_assert_eq!(counters.bad_mmio_reads + counters.bad_mmio_writes, expected_bad);
        prop_assert!(ioapic.entries().count() == NUM_PINS);
    }
}
