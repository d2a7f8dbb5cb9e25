//! Delivery-path benchmarks: an IOAPIC edge through the APIC bus into a
//! local APIC's IRR, and lowest-priority arbitration as the vCPU count grows.
//!
//! Run with `cargo bench -p irqchip --bench delivery`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use irqchip::apic_bus::{
    ApicTarget, Arbiter, DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode,
};
use irqchip::ioapic::{Ioapic, IoapicConfig, RedirectionEntry};
use irqchip::lapic::{Lapic, LapicConfig};

/// xAPIC SVR offset and a value that software-enables the APIC (SDM Vol. 3A
/// 11.9).
const SVR_OFFSET: u64 = 0xf0;
const SVR_ENABLED: u32 = 0x1ff;

const PIN: u8 = 4;
const VECTOR: u8 = 0x40;

fn enabled_lapics(count: u32) -> Vec<Lapic> {
    (0..count)
        .map(|id| {
            let mut lapic = Lapic::new(LapicConfig::new(id, id == 0));
            let effect = lapic.mmio_write(SVR_OFFSET, &SVR_ENABLED.to_le_bytes(), 0);
            assert!(effect.is_none());
            lapic
        })
        .collect()
}

fn edge_ioapic(destination: u8) -> Ioapic {
    let mut ioapic = Ioapic::new(IoapicConfig::default());
    let entry = RedirectionEntry::new()
        .with_vector(VECTOR)
        .with_destination(destination)
        .with_masked(false);
    ioapic.write_rte(PIN, entry).unwrap();
    ioapic
}

/// One rising edge: IOAPIC pin -> bus resolution -> LAPIC accept; then the
/// line drops so the next call is an edge again.
#[inline]
fn edge_to_lapics(
    ioapic: &mut Ioapic,
    arbiter: &mut Arbiter,
    targets: &[ApicTarget],
    lapics: &mut [Lapic],
) {
    let message = ioapic.set_line(black_box(PIN), true).unwrap();
    for index in &arbiter.route(&message, targets, None) {
        if let Some(lapic) = lapics.get_mut(index) {
            black_box(lapic.accept(&message));
        }
    }
    ioapic.set_line(PIN, false);
}

fn edge_to_irr(c: &mut Criterion) {
    let mut group = c.benchmark_group("edge_assert_to_irr");

    // The VMM keeps the targets up to date when an APIC's addressing
    // changes; the delivery path only reads them.
    let mut lapics = enabled_lapics(4);
    let targets: Vec<ApicTarget> = lapics.iter().map(Lapic::bus_target).collect();
    let mut ioapic = edge_ioapic(2);
    let mut arbiter = Arbiter::new();
    edge_to_lapics(&mut ioapic, &mut arbiter, &targets, &mut lapics);
    assert!(lapics[2].is_requested(VECTOR));
    group.bench_function("cached_targets_4_vcpus", |b| {
        b.iter(|| edge_to_lapics(&mut ioapic, &mut arbiter, &targets, &mut lapics));
    });

    // Worst case: the targets are rebuilt from the LAPICs on every delivery.
    group.bench_function("fresh_targets_4_vcpus", |b| {
        b.iter(|| {
            let mut fresh = [lapics[0].bus_target(); 4];
            for (target, lapic) in fresh.iter_mut().zip(&lapics) {
                *target = lapic.bus_target();
            }
            edge_to_lapics(&mut ioapic, &mut arbiter, &fresh, &mut lapics);
        });
    });

    // The parts: the IOAPIC alone (rising then falling edge), and the bus
    // resolution alone.
    group.bench_function("part_ioapic_edge_pair", |b| {
        b.iter(|| {
            black_box(ioapic.set_line(black_box(PIN), true));
            black_box(ioapic.set_line(black_box(PIN), false));
        });
    });
    let message = ioapic.message(PIN).unwrap();
    group.bench_function("part_bus_route_4_vcpus", |b| {
        b.iter(|| black_box(arbiter.route(black_box(&message), &targets, None)));
    });
    group.finish();
}

/// Targets with a spread of priorities and some ties, all in the logical
/// broadcast's reach.
fn arbitration_targets(count: usize) -> Vec<ApicTarget> {
    (0..count)
        .map(|i| ApicTarget {
            apic_id: i as u32,
            x2apic: false,
            logical_id: 1 << (i % 8),
            dfr_flat: true,
            hw_enabled: true,
            sw_enabled: true,
            arbitration_priority: ((i * 37) % 11) as u8 * 0x10,
        })
        .collect()
}

fn lowest_priority(c: &mut Criterion) {
    let message = Message {
        destination: 0xff,
        destination_mode: DestinationMode::Logical,
        delivery_mode: DeliveryMode::LowestPriority,
        vector: VECTOR,
        trigger_mode: TriggerMode::Edge,
        level: true,
        shorthand: Shorthand::None,
    };
    let mut group = c.benchmark_group("lowest_priority_route");
    for count in [8usize, 64, 255] {
        let targets = arbitration_targets(count);
        let mut arbiter = Arbiter::new();
        group.bench_with_input(
            BenchmarkId::from_parameter(count),
            &targets,
            |b, targets| {
                b.iter(|| black_box(arbiter.route(black_box(&message), targets, None)));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, edge_to_irr, lowest_priority);
criterion_main!(benches);
