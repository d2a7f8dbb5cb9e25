//! `KSPIN_LOCK`: an 8-byte spin lock in driver-supplied (or the connection's
//! own) storage. The host checks that a lock passed to IoConnectInterrupt
//! lies in guest RAM (8 bytes), so the type is exactly one `u64`.
//!
//! Value: 0 when free, the holder's processor index + 1 when held, so a
//! processor that tries to take a lock it already holds is caught (Windows'
//! SPIN_LOCK_ALREADY_OWNED bug check) instead of spinning forever.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{cpu, percpu};

/// A Windows-style spin lock (`KSPIN_LOCK`, a `ULONG_PTR`).
#[repr(transparent)]
pub struct KSPIN_LOCK(AtomicU64);

impl KSPIN_LOCK {
    /// A free lock (what `KeInitializeSpinLock` leaves behind).
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// The lock's address (its guest-physical address: identity map).
    pub fn address(&self) -> u64 {
        self as *const Self as u64
    }

    /// True while some processor holds the lock.
    pub fn is_held(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }

    /// Spins until the lock is ours (test-and-test-and-set with `pause`).
    /// The caller has raised the IRQL as the lock's users require.
    pub(super) fn acquire(&self) {
        let me = percpu::current_index() as u64 + 1;
        loop {
            match self
                .0
                .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(owner) if owner == me => {
                    panic!("SPIN_LOCK_ALREADY_OWNED: this processor already holds the lock")
                }
                Err(_) => {}
            }
            while self.0.load(Ordering::Relaxed) != 0 {
                cpu::pause();
            }
        }
    }

    /// Releases the lock.
    pub(super) fn release(&self) {
        self.0.store(0, Ordering::Release);
    }
}

impl Default for KSPIN_LOCK {
    fn default() -> Self {
        Self::new()
    }
}

/// KeInitializeSpinLock: puts `spin_lock` in the free state.
pub fn KeInitializeSpinLock(spin_lock: &KSPIN_LOCK) {
    spin_lock.0.store(0, Ordering::Release);
}
