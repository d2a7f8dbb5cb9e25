//! The local APIC's hot path: one interrupt's whole life in the model.
//!
//! `accept` (bus message into the IRR) + `highest_deliverable` +
//! `acknowledge` (IRR -> ISR) + `eoi` (ISR clear, EOI-broadcast decision),
//! edge and level, plus the same cycle with the guest's EOI arriving as an
//! xAPIC MMIO write and as an x2APIC MSR write.
//!
//! Run with `cargo bench -p irqchip --bench lapic_cycle`. Target: the plain
//! cycle at or under 30 ns.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use irqchip::apic_bus::{Message, TriggerMode};
use irqchip::lapic::{IA32_APIC_BASE, Lapic, LapicConfig};

/// xAPIC SVR offset and a value that software-enables the APIC (SDM Vol. 3A 11.9).
const SVR_OFFSET: u64 = 0xf0;
const SVR_ENABLED: u32 = 0x1ff;
/// xAPIC EOI offset (SDM Vol. 3A 11.8.5) and its x2APIC MSR.
const EOI_OFFSET: u64 = 0xb0;
const X2APIC_EOI_MSR: u32 = 0x80b;

fn enabled_lapic() -> Lapic {
    let mut lapic = Lapic::new(LapicConfig::new(0, true));
    let effect = lapic.mmio_write(SVR_OFFSET, &SVR_ENABLED.to_le_bytes(), 0);
    assert!(effect.is_none());
    // A lower-priority vector in service, as in a nested interrupt, so the
    // PPR computation does real work.
    assert!(lapic.accept(&Message::fixed_physical(0, 0x31)).accepted());
    assert_eq!(lapic.acknowledge(), Some(0x31));
    lapic
}

fn cycle(c: &mut Criterion) {
    let edge = Message::fixed_physical(0, 0x61);
    let level = Message {
        trigger_mode: TriggerMode::Level,
        ..edge
    };

    let mut lapic = enabled_lapic();
    c.bench_function("lapic_cycle/edge", |b| {
        b.iter(|| {
            let accepted = lapic.accept(black_box(&edge));
            let deliverable = lapic.highest_deliverable();
            let vector = lapic.acknowledge();
            let eoi = lapic.eoi();
            black_box((accepted, deliverable, vector, eoi))
        })
    });

    let mut lapic = enabled_lapic();
    c.bench_function("lapic_cycle/level", |b| {
        b.iter(|| {
            let accepted = lapic.accept(black_box(&level));
            let deliverable = lapic.highest_deliverable();
            let vector = lapic.acknowledge();
            let eoi = lapic.eoi();
            black_box((accepted, deliverable, vector, eoi))
        })
    });

    let mut lapic = enabled_lapic();
    c.bench_function("lapic_cycle/level_mmio_eoi", |b| {
        b.iter(|| {
            let accepted = lapic.accept(black_box(&level));
            let vector = lapic.acknowledge();
            let eoi = lapic.mmio_write(EOI_OFFSET, &[0; 4], black_box(1000));
            black_box((accepted, vector, eoi))
        })
    });

    let mut lapic = enabled_lapic();
    let base = lapic.msr_read(IA32_APIC_BASE, 0).unwrap();
    lapic
        .msr_write(IA32_APIC_BASE, base | (1 << 10), 0)
        .unwrap();
    c.bench_function("lapic_cycle/level_x2apic_msr_eoi", |b| {
        b.iter(|| {
            let accepted = lapic.accept(black_box(&level));
            let vector = lapic.acknowledge();
            let eoi = lapic.msr_write(X2APIC_EOI_MSR, 0, black_box(1000));
            black_box((accepted, vector, eoi))
        })
    });
}

criterion_group!(benches, cycle);
criterion_main!(benches);
