//! Kicking a vCPU out of `KVM_RUN`: a signal plus `kvm_run.immediate_exit`.
//!
//! Each vCPU thread publishes its `kvm_run` page in a thread-local pointer.
//! The kick signal's handler (running on that thread) sets
//! `immediate_exit = 1` there, so the kick is not lost whether the signal
//! arrives inside `KVM_RUN` (it returns `EINTR`) or just before it (the next
//! `KVM_RUN` returns `EINTR` at once). The vCPU loop clears the flag after
//! every `EINTR` and then looks at what the kicker asked for (stop flag,
//! pending interrupts); kickers set those before they signal.

use std::cell::Cell;
use std::ptr;
use std::sync::{Mutex, PoisonError};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::error::{Error, Result};

thread_local! {
    /// This thread's `kvm_run` page, or null when it runs no vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The kick signal: the first real-time signal (libc reserves none of
/// `SIGRTMIN()..`).
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a thread-local read and a volatile store: async-signal-safe.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` was published by this very thread through
        // `RunPageGuard`, which points it at the `kvm_run` page of the
        // `VcpuFd` the thread owns and resets it to null before that page
        // is unmapped, so the page is mapped. `immediate_exit` is a plain u8
        // that KVM reads on entry to `KVM_RUN`; a volatile byte store cannot
        // tear.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the kick handler; once per process, before any vCPU thread.
pub(crate) fn install_handler() -> Result<()> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| Error::host("install the vCPU kick signal handler")(std::io::Error::from(e)))
}

/// Publishes a vCPU's `kvm_run` page to this thread's kick handler for as
/// long as the guard lives.
pub(crate) struct RunPageGuard(());

impl RunPageGuard {
    /// Publishes `run`, which must stay mapped while the guard lives.
    pub(crate) fn publish(run: &mut kvm_run) -> Self {
        KVM_RUN.with(|c| c.set(run as *mut kvm_run));
        RunPageGuard(())
    }
}

impl Drop for RunPageGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(ptr::null_mut()));
    }
}

/// The threads running vCPUs, so any thread can kick one.
pub(crate) struct Kicker {
    /// Per vCPU: its thread while that thread runs the vCPU loop.
    threads: Vec<Mutex<Option<libc::pthread_t>>>,
}

impl Kicker {
    /// Room for `n` vCPUs.
    pub(crate) fn new(n: usize) -> Self {
        Self {
            threads: (0..n).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Called by vCPU `index`'s thread when it starts.
    pub(crate) fn register_current(&self, index: usize) {
        if let Some(slot) = self.threads.get(index) {
            // SAFETY: pthread_self has no preconditions and cannot fail.
            let me = unsafe { libc::pthread_self() };
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(me);
        }
    }

    /// Called by vCPU `index`'s thread before it ends.
    pub(crate) fn unregister_current(&self, index: usize) {
        if let Some(slot) = self.threads.get(index) {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// Kicks vCPU `index` out of `KVM_RUN`. A no-op when its thread is gone,
    /// and when the caller is that thread: it is not in `KVM_RUN`, and its
    /// loop looks at the stop flag and the interrupt controller before it
    /// enters again, so the signal would only cost a wasted entry.
    pub(crate) fn kick(&self, index: usize) {
        let Some(slot) = self.threads.get(index) else {
            return;
        };
        let guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(thread) = *guard {
            // SAFETY: pthread_self and pthread_equal have no preconditions.
            if unsafe { libc::pthread_equal(thread, libc::pthread_self()) } != 0 {
                return;
            }
            // SAFETY: the thread registered itself and unregisters (under this
            // lock) before it returns, so while we hold the lock `thread`
            // names a live thread; the signal has a handler installed by
            // `install_handler`.
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
    pub(crate) fn kick_all(&self) {
        for i in 0..self.threads.len() {
            self.kick(i);
        }
    }
}
