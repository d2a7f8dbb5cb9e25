//! IRQL on CR8, Windows x64 style: IRQL = vector priority class
//! (vector >> 4); raising to N holds every vector whose class is <= N.

use crate::cpu;

/// An IRQL (0..=15).
pub type Kirql = u8;

/// PASSIVE_LEVEL.
pub const PASSIVE_LEVEL: Kirql = 0;
/// APC_LEVEL.
pub const APC_LEVEL: Kirql = 1;
/// DISPATCH_LEVEL.
pub const DISPATCH_LEVEL: Kirql = 2;
/// CLOCK_LEVEL.
pub const CLOCK_LEVEL: Kirql = 13;
/// IPI_LEVEL.
pub const IPI_LEVEL: Kirql = 14;
/// HIGH_LEVEL.
pub const HIGH_LEVEL: Kirql = 15;

/// The current IRQL.
pub fn current() -> Kirql {
    cpu::read_cr8() as Kirql
}

/// KeRaiseIrql: raises to `new` (which must not be below the current IRQL)
/// and returns the previous IRQL.
pub fn raise(new: Kirql) -> Kirql {
    let old = current();
    assert!(
        new >= old && new <= HIGH_LEVEL,
        "KeRaiseIrql to {new} from {old}"
    );
    cpu::write_cr8(u64::from(new));
    old
}

/// KeLowerIrql: lowers to `old` (which must not be above the current IRQL).
/// Interrupts of classes above `old` that were held become deliverable.
pub fn lower(old: Kirql) {
    let now = current();
    assert!(old <= now, "KeLowerIrql to {old} from {now}");
    cpu::write_cr8(u64::from(old));
}

/// Sets CR8 unconditionally (test set-up and clean-up only).
pub fn set(level: Kirql) {
    cpu::write_cr8(u64::from(level & 0xf));
}
