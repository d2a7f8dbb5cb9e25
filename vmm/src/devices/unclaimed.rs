//! Accesses no device claims: reads return all ones (an empty ISA/PCI bus
//! floats high), writes are dropped; both are counted and warned about at a
//! rate limit, never per access.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bus::BusKind;
use irqchip_kvm::ratelimit::RateLimiter;

/// The fallback of one bus.
pub(crate) struct Unclaimed {
    kind: BusKind,
    reads: AtomicU64,
    writes: AtomicU64,
    warn: RateLimiter,
}

impl Unclaimed {
    /// Fallback for a bus of `kind`.
    pub(crate) fn new(kind: BusKind) -> Self {
        Self {
            kind,
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            warn: RateLimiter::new(),
        }
    }

    fn what(&self) -> &'static str {
        match self.kind {
            BusKind::Pio => "port",
            BusKind::Mmio => "MMIO address",
        }
    }

    /// An unclaimed read: all ones.
    pub(crate) fn read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.reads.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.warn.check() {
            log::warn!(
                "guest read {} bytes from unclaimed {} {addr:#x} (reads all ones){}",
                data.len(),
                self.what(),
                suppressed_note(suppressed)
            );
        }
    }

    /// An unclaimed write: dropped.
    pub(crate) fn write(&self, addr: u64, data: &[u8]) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.warn.check() {
            log::warn!(
                "guest wrote {:02x?} to unclaimed {} {addr:#x} (ignored){}",
                data,
                self.what(),
                suppressed_note(suppressed)
            );
        }
    }

    /// (reads, writes).
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }
}

fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} similar accesses not shown")
    }
}
