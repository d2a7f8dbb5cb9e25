//! Kicking a vCPU out of `KVM_RUN`: a pending flag, a signal and
//! `kvm_run.immediate_exit`.
//!
//! A kick asks vCPU `i` to pass through its chip's `before_run` before it
//! next enters the guest (a new interrupt to inject, a stop flag to see).
//! [`Kicker::kick`] sets vCPU `i`'s pending flag, then, if `i`'s thread is
//! inside [`crate::VcpuChip::run`], sends it the kick signal. While `run`
//! is in progress the thread's `kvm_run` page is published in a
//! thread-local pointer, and the signal handler sets `immediate_exit = 1`
//! there. Whichever way the race goes, the kick is not lost:
//!
//! - the kick comes before `run` clears the pending flag on entry:
//!   `before_run` runs after it;
//! - between that and `KVM_RUN`: `run` finds the flag set, or the handler
//!   finds the page published, and `KVM_RUN` returns `EINTR` at once;
//! - during `KVM_RUN`: the signal interrupts it (`EINTR`);
//! - after `KVM_RUN` returned: the next `run` calls `before_run` anyway.
//!
//! A kick from vCPU `i`'s own thread is a no-op: that thread is not in
//! `KVM_RUN` and passes through `before_run` before it enters again.
//!
//! The signal is `SIGRTMIN` ([`kick_signal`]); [`install_handler`] installs
//! its handler (the chip's builder does), process-wide.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::error::Error;

thread_local! {
    /// This thread's `kvm_run` page while it is in `VcpuChip::run`, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The kick signal: the first real-time signal (libc reserves none of
/// `SIGRTMIN()..`).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a thread-local read and a volatile store: async-signal-safe.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` was published by this very thread through
        // `RunPageGuard::publish`, whose contract keeps the page mapped
        // until the guard drops and resets the pointer to null, so the page
        // is mapped. `immediate_exit` is a
        // plain u8 that KVM reads on entry to `KVM_RUN`; a volatile byte
        // store cannot tear.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick signal's handler, process-wide. Idempotent; the
/// chip's builder calls it.
///
/// # Errors
///
/// The handler could not be installed.
pub fn install_handler() -> Result<(), Error> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| Error::host("install the vCPU kick signal handler")(std::io::Error::from(e)))
}

/// Publishes a vCPU's `kvm_run` page to this thread's kick handler while
/// the guard lives (inside `VcpuChip::run` only).
pub(crate) struct RunPageGuard {
    run: *mut kvm_run,
}

impl RunPageGuard {
    /// Publishes `run`.
    ///
    /// # Safety
    ///
    /// `run` must point at a mapped `kvm_run` page that stays mapped while
    /// the guard lives: the page of a `VcpuFd` the caller holds borrowed
    /// for longer than the guard.
    pub(crate) unsafe fn publish(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|c| c.set(run));
        Self { run }
    }

    /// Makes the next `KVM_RUN` return `EINTR` at once.
    pub(crate) fn set_immediate_exit(&self) {
        // SAFETY: `publish`'s contract keeps the page mapped while the
        // guard lives; the store races only with this thread's own signal
        // handler, which stores the same byte with a volatile store.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*self.run).immediate_exit), 1) };
    }
}

impl Drop for RunPageGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(ptr::null_mut()));
    }
}

/// One vCPU's slot: its thread while inside `VcpuChip::run`, and whether a
/// kick is pending.
struct Slot {
    thread: Mutex<Option<libc::pthread_t>>,
    pending: AtomicBool,
}

/// Kicks vCPUs out of `KVM_RUN`, from any thread. One per VM, shared by
/// the chip (which kicks a vCPU when it has a new interrupt for it) and the
/// VMM (which kicks every vCPU to stop).
pub struct Kicker {
    slots: Vec<Slot>,
}

impl Kicker {
    /// Room for `n` vCPUs.
    ///
    /// # Example
    ///
    /// ```
    /// use irqchip_kvm::kick::Kicker;
    ///
    /// let kicker = Kicker::new(2);
    /// // No vCPU thread is running: the kick stays pending for vCPU 1's
    /// // next `VcpuChip::run`, and nobody is signalled.
    /// kicker.kick(1);
    /// kicker.kick_all();
    /// ```
    pub fn new(n: usize) -> Self {
        Self {
            slots: (0..n)
                .map(|_| Slot {
                    thread: Mutex::new(None),
                    pending: AtomicBool::new(false),
                })
                .collect(),
        }
    }

    /// The number of vCPUs.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the kicker has no vCPU.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Kicks vCPU `index` (see the module documentation). A no-op for an
    /// index that does not exist and when called from `index`'s own thread.
    pub fn kick(&self, index: usize) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        let thread = slot.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(thread) = *thread {
            // SAFETY: pthread_self and pthread_equal have no preconditions.
            if unsafe { libc::pthread_equal(thread, libc::pthread_self()) } != 0 {
                return;
            }
        }
        slot.pending.store(true, Ordering::SeqCst);
        if let Some(thread) = *thread {
            // SAFETY: the thread registered itself in `enter` and
            // unregisters (under this lock) before it leaves
            // `VcpuChip::run`, so while we hold the lock `thread` names a
            // live thread; the signal has the handler `install_handler`
            // installed (the chip's builder calls it before any vCPU part
            // exists).
            let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
            if rc != 0 {
                log::warn!(
                    "kick vcpu {index}: {}",
                    std::io::Error::from_raw_os_error(rc)
                );
            }
        }
    }

    /// Kicks every vCPU.
    pub fn kick_all(&self) {
        for i in 0..self.slots.len() {
            self.kick(i);
        }
    }

    /// Called by vCPU `index`'s thread when `VcpuChip::run` starts: it can
    /// be signalled until the guard drops, and kicks made before now are
    /// answered by the `before_run` that follows.
    pub(crate) fn enter(&self, index: usize) -> ThreadGuard<'_> {
        if let Some(slot) = self.slots.get(index) {
            // SAFETY: pthread_self has no preconditions and cannot fail.
            let me = unsafe { libc::pthread_self() };
            *slot.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(me);
            slot.pending.store(false, Ordering::SeqCst);
        }
        ThreadGuard {
            kicker: self,
            index,
        }
    }

    /// Whether a kick came since [`Kicker::enter`]; clears it.
    pub(crate) fn take_pending(&self, index: usize) -> bool {
        self.slots
            .get(index)
            .is_some_and(|s| s.pending.swap(false, Ordering::SeqCst))
    }
}

/// Unregisters a vCPU thread from its kicker when dropped.
pub(crate) struct ThreadGuard<'a> {
    kicker: &'a Kicker,
    index: usize,
}

impl Drop for ThreadGuard<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.kicker.slots.get(self.index) {
            *slot.thread.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_kick_outside_run_stays_pending_until_taken() {
        let kicker = Kicker::new(2);

        kicker.kick(1);

        assert!(!kicker.take_pending(0));
        assert!(kicker.take_pending(1));
        assert!(!kicker.take_pending(1), "taken once");
    }

    #[test]
    fn unit_enter_clears_earlier_kicks_and_own_kick_is_a_noop() {
        let kicker = Kicker::new(1);
        kicker.kick(0);

        let guard = kicker.enter(0);
        assert!(!kicker.take_pending(0), "before_run answers earlier kicks");
        kicker.kick(0);
        assert!(!kicker.take_pending(0), "a kick from the vCPU's own thread");
        drop(guard);

        kicker.kick(0);
        assert!(kicker.take_pending(0), "after run, kicks pend again");
    }

    #[test]
    fn unit_kick_of_a_missing_vcpu_is_ignored() {
        let kicker = Kicker::new(1);

        kicker.kick(7);

        assert!(!kicker.take_pending(7));
        assert_eq!(kicker.len(), 1);
    }
}
