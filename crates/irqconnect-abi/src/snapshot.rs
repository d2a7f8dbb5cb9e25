//! The snapshot test device: a guest asks the VMM for a snapshot of the
//! whole VM at an exact moment, and learns how often it was restored.
//!
//! Two 32-bit registers at [`SNAPSHOT_PORT`] (other widths and offsets read
//! all ones and are ignored):
//!
//! | offset | read | write |
//! |---|---|---|
//! | [`reg::REQUEST`] | [`SIGNATURE`] when the VMM takes snapshots (`--snapshot PATH`), 0 when it does not | any value: take a snapshot now (the value is recorded in the file as its tag); the VMM pauses every vCPU before this vCPU runs its next instruction. Ignored (and counted) without `--snapshot` |
//! | [`reg::RESTORES`] | how many times this VM was restored from a snapshot | ignored |
//!
//! Without the device (another VMM) both read all ones.

/// The device's port (8 bytes: two 32-bit registers).
pub const SNAPSHOT_PORT: u16 = 0x2210;
/// Bytes of the register window.
pub const SNAPSHOT_PORT_SIZE: u16 = 8;
/// [`reg::REQUEST`] reads this when snapshots are enabled: `"SNAP"`.
pub const SIGNATURE: u32 = u32::from_le_bytes(*b"SNAP");

/// Register offsets.
pub mod reg {
    /// Write: take a snapshot. Read: [`super::SIGNATURE`] or 0.
    pub const REQUEST: u16 = 0x0;
    /// Read: restores so far.
    pub const RESTORES: u16 = 0x4;
}
