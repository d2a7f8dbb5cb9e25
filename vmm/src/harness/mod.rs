//! Fuzz entry points for the VMM's device layer, behind the `fuzzing`
//! feature: the fuzz target `vmm_devices` and the corpus replay in
//! `tests/corpus_replay.rs` call [`devices::run`]; the fuzz target
//! `snapshot_restore` calls [`snapshot_restore`], the decoding of a
//! snapshot file.

pub mod devices;
pub use crate::snapshot::fuzz_decode as snapshot_restore;
mod logs;
mod wiring;
