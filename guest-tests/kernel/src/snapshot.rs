//! The snapshot test device (`irqconnect_abi::snapshot`): asks the VMM for
//! a snapshot of the whole VM at an exact moment, and tells whether the VM
//! went on in the same process or was restored from the snapshot.
//!
//! REQUEST reads the signature `SNAP` when the VMM takes snapshots
//! (`--snapshot PATH`), 0 when it does not (no `--snapshot`, or a restored
//! VM without one), all ones without the device (another VMM). A write
//! pauses every vCPU before this one runs its next instruction; with
//! `--snapshot-then exit` the VM ends there (status 10) and goes on only
//! when `vmm --restore` resumes it in a new process, RESTORES one higher.

use irqconnect_abi::snapshot::{SIGNATURE, SNAPSHOT_PORT, reg};

use crate::cpu;

fn read(offset: u16) -> u32 {
    // SAFETY: a read of the snapshot device's port has no memory effects
    // (all ones without the device).
    unsafe { cpu::inl(SNAPSHOT_PORT + offset) }
}

/// The REQUEST register as read: [`SIGNATURE`], 0 or all ones.
pub fn request_register() -> u32 {
    read(reg::REQUEST)
}

/// True when the VMM takes a snapshot on request.
pub fn enabled() -> bool {
    request_register() == SIGNATURE
}

/// How many times this VM was restored from a snapshot (all ones without
/// the device).
pub fn restores() -> u32 {
    read(reg::RESTORES)
}

/// Why snapshots cannot be taken here (for a `skip` line), or `None` when
/// they can.
pub fn unavailable_reason() -> Option<&'static str> {
    match request_register() {
        SIGNATURE => None,
        0 => Some("snapshots not enabled (the VMM was started without --snapshot)"),
        u32::MAX => Some("no snapshot device (port 0x2210 reads all ones)"),
        _ => Some("no snapshot device (REQUEST does not read the signature)"),
    }
}

/// How the VM went on after a snapshot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// Restored from the snapshot (RESTORES went up): a new VMM process.
    Restored,
    /// The same VM went on (`--snapshot-then continue`).
    Continued,
}

/// Takes a snapshot now (`tag` is recorded in the file) and returns how
/// the VM went on. Callable from any CPU and from interrupt handlers; the
/// caller checks [`enabled`] first (without the device the write is
/// ignored and this returns [`Resumed::Continued`]).
pub fn take(tag: u32) -> Resumed {
    let before = restores();
    // SAFETY: the snapshot request only pauses the VM; no memory effects.
    unsafe { cpu::outl(SNAPSHOT_PORT + reg::REQUEST, tag) };
    if restores() != before {
        Resumed::Restored
    } else {
        Resumed::Continued
    }
}
