//! Fuzz entry points for the VMM's device layer, behind the `fuzzing`
//! feature: the fuzz target `vmm_devices` and the corpus replay in
//! `tests/corpus_replay.rs` call [`devices::run`].

pub mod devices;
mod logs;
mod wiring;
