//! How the VM ends: the first outcome recorded wins, every thread sees the
//! stop flag, and the event loop is woken through an eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use irqchip_kvm::kick::Kicker;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::error::{Error, Result};

/// Why the VM stopped.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The guest wrote this value to the exit port.
    GuestExit(u32),
    /// Something went wrong (guest fault, KVM error, timeout).
    Failed(Error),
    /// A snapshot was written here and `--snapshot-then exit` ended the VM.
    Snapshot(std::path::PathBuf),
}

/// Shared by the vCPU threads, the devices and the event loop.
pub(crate) struct VmControl {
    stop: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    exit_evt: EventFd,
    /// Shared with the interrupt controller, which kicks vCPUs too.
    kicker: Arc<Kicker>,
}

impl VmControl {
    /// Control for a VM of `vcpus` vCPUs.
    pub(crate) fn new(vcpus: usize) -> Result<Self> {
        Ok(Self {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            exit_evt: EventFd::new(EFD_NONBLOCK).map_err(Error::host("create the exit eventfd"))?,
            kicker: Arc::new(Kicker::new(vcpus)),
        })
    }

    /// Records `outcome` unless one is already recorded, stops every vCPU
    /// and wakes the event loop.
    pub(crate) fn finish(&self, outcome: Outcome) {
        {
            let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                *slot = Some(outcome);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("wake the event loop: {e}");
        }
        self.kicker.kick_all();
    }

    /// Whether the VM is stopping.
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Takes the recorded outcome.
    pub(crate) fn take_outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The eventfd the event loop watches.
    pub(crate) fn exit_event(&self) -> &EventFd {
        &self.exit_evt
    }

    /// The vCPU kicker.
    pub(crate) fn kicker(&self) -> &Arc<Kicker> {
        &self.kicker
    }
}
