//! Spin locks: test-and-test-and-set with `pause`; variants that hold
//! interrupts off or raise the IRQL while the lock is held.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu;
use crate::irql::{self, Kirql};

/// A spin lock protecting a `T`.
pub struct SpinLock<T> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
}

// SAFETY: access to `data` is serialised by `locked`.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// An unlocked lock.
    pub const fn new(data: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            data: UnsafeCell::new(data),
        }
    }

    fn acquire(&self) {
        loop {
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
            while self.locked.load(Ordering::Relaxed) {
                cpu::pause();
            }
        }
    }

    /// Takes the lock (the caller's IRQL and IF stay as they are).
    pub fn lock(&self) -> SpinGuard<'_, T> {
        self.acquire();
        SpinGuard {
            lock: self,
            restore: Restore::Nothing,
        }
    }

    /// Takes the lock with interrupts disabled; IF is restored on release.
    pub fn lock_irqsave(&self) -> SpinGuard<'_, T> {
        let irq = cpu::IrqGuard::new();
        self.acquire();
        SpinGuard {
            lock: self,
            restore: Restore::Irq(irq),
        }
    }

    /// KeAcquireSpinLock-style: raises to `level` (>= current), takes the
    /// lock; release drops the lock, then lowers to the previous IRQL.
    pub fn lock_at(&self, level: Kirql) -> SpinGuard<'_, T> {
        let old = irql::raise(level);
        self.acquire();
        SpinGuard {
            lock: self,
            restore: Restore::Irql(old),
        }
    }

    /// True when held (for tests).
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

enum Restore {
    Nothing,
    Irq(#[allow(dead_code)] cpu::IrqGuard),
    Irql(Kirql),
}

/// Holds a [`SpinLock`]; releases it when dropped.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
    restore: Restore,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves the lock is held.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves the lock is held, exclusively.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
        if let Restore::Irql(old) = self.restore {
            irql::lower(old);
        }
        // `Restore::Irq` restores IF when the field drops, after the release.
    }
}
