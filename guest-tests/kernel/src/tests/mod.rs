//! The test suites, grouped by prefix.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::runner::Test;

mod affinity;
mod bench;
mod connect;
mod disconnect;
mod ex;
mod ex_load;
mod ex_message;
pub mod fixture;
mod hostile;
mod ioapic;
mod ipi;
mod lapic;
mod load;
mod msgfix;
mod nmi;
mod pvfix;
mod retarget;
mod rule10;
mod scale;
mod share;
mod snapshot;
mod sync;
mod timer;
mod topo;
mod tpr;

/// Every suite, in run order.
pub static SUITES: &[&[Test]] = &[
    lapic::TESTS,
    ipi::TESTS,
    nmi::TESTS,
    tpr::TESTS,
    timer::TESTS,
    ioapic::TESTS,
    connect::TESTS,
    share::TESTS,
    affinity::TESTS,
    scale::TESTS,
    retarget::TESTS,
    disconnect::TESTS,
    sync::TESTS,
    ex::TESTS,
    ex_message::TESTS,
    rule10::TESTS,
    load::TESTS,
    ex_load::TESTS,
    hostile::TESTS,
    snapshot::TESTS,
    // Last, and only when asked for (see `runner::selected`).
    bench::TESTS,
];

static EXPECTED_CPUS: AtomicUsize = AtomicUsize::new(1);

/// Records the CPU count fw_cfg announced (checked by `lapic_` tests).
pub fn set_expected_cpus(n: usize) {
    EXPECTED_CPUS.store(n, Ordering::Relaxed);
}

fn expected_cpus() -> usize {
    EXPECTED_CPUS.load(Ordering::Relaxed)
}
