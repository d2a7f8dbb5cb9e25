//! Byte-driven interpreters for fuzzing, one per guest-facing surface.
//!
//! Each `run` turns arbitrary bytes into a configuration and a stream of
//! operations, drives the models with them and checks invariants after
//! every operation, returning `Err` with the first broken one. The
//! cargo-fuzz targets in `fuzz/` are thin wrappers that panic on `Err`; the
//! stable test `tests/corpus_replay.rs` replays the checked-in corpus
//! (`resources/fuzz-corpus/TARGET/`) through the very same functions.
//!
//! | fuzz target | function |
//! |---|---|
//! | `ioapic` | [`ioapic::run`]: the IOAPIC alone, against [`pin_model::RefIoapic`] |
//! | `lapic` | [`crate::lapic::harness::run`]: one local APIC |
//! | `apic_system` | [`system::run`]: IOAPIC + local APICs + bus, against an independent destination oracle and the reference IOAPIC |
//! | `msi` | [`msi::run`]: MSI encode/decode against the SDM bit layout |
//!
//! None of them panics on any input: a panic in a fuzz run is a bug of the
//! model (or of the harness), never of the input.

pub mod corpus;
pub mod input;
pub mod ioapic;
pub mod msi;
pub mod pin_model;
pub mod system;

/// The local APIC interpreter, re-exported so every harness is reachable
/// from one module.
pub use crate::lapic::harness::run as lapic;
