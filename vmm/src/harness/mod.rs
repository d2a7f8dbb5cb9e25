//! Fuzz entry points for the VMM's device layer, behind the `fuzzing`
//! feature: the fuzz target `vmm_devices` and the corpus replay in
//! `tests/corpus_replay.rs` call [`devices::run`]; the fuzz target
//! `snapshot_restore` calls [`snapshot::run`], the checks of a snapshot
//! file before a restore.

pub mod devices;
mod logs;
pub mod snapshot;
mod wiring;
