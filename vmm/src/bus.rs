//! Port I/O and MMIO buses: address ranges mapped to devices.
//!
//! A bus is built once before the vCPUs start and then shared read-only
//! (`Arc<Bus>`), so a lookup takes no lock; each device has its own mutex.
//! Accesses nobody claims read all ones and are counted per kind, with a
//! rate-limited warning.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::devices::unclaimed::Unclaimed;

/// Who is accessing a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    /// Index of the vCPU doing the access.
    pub(crate) vcpu: usize,
}

/// A device on a bus. `offset` is relative to the base the device was
/// inserted at; `data.len()` is the access width.
pub(crate) trait BusDevice: Send {
    /// A read: fill `data`.
    fn read(&mut self, access: Access, offset: u64, data: &mut [u8]);
    /// A write of `data`.
    fn write(&mut self, access: Access, offset: u64, data: &[u8]);
}

/// Which address space a bus decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BusKind {
    /// `in`/`out` ports.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

struct Entry {
    base: u64,
    len: u64,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
    reads: AtomicU64,
    writes: AtomicU64,
}

/// Overlapping registration: a programming error of the VMM.
#[derive(Debug, thiserror::Error)]
#[error("bus: {new} at {base:#x}+{len:#x} overlaps {old}")]
pub(crate) struct OverlapError {
    new: &'static str,
    old: &'static str,
    base: u64,
    len: u64,
}

/// Per-device access counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceCounters {
    /// Device name.
    pub(crate) name: &'static str,
    /// Reads.
    pub(crate) reads: u64,
    /// Writes.
    pub(crate) writes: u64,
}

/// An address space.
pub(crate) struct Bus {
    kind: BusKind,
    entries: Vec<Entry>,
    unclaimed: Unclaimed,
}

impl Bus {
    /// An empty bus.
    pub(crate) fn new(kind: BusKind) -> Self {
        Self {
            kind,
            entries: Vec::new(),
            unclaimed: Unclaimed::new(kind),
        }
    }

    /// Maps `base..base+len` to `device`.
    pub(crate) fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &'static str,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), OverlapError> {
        if let Some(old) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(OverlapError {
                new: name,
                old: old.name,
                base,
                len,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            at,
            Entry {
                base,
                len,
                name,
                device,
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Entry> {
        let at = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(at.checked_sub(1)?)?;
        (addr < e.base + e.len).then_some(e)
    }

    /// A read at `addr`; unclaimed addresses read all ones.
    pub(crate) fn read(&self, access: Access, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some(e) => {
                e.reads.fetch_add(1, Ordering::Relaxed);
                let mut dev = e.device.lock().unwrap_or_else(PoisonError::into_inner);
                dev.read(access, addr - e.base, data);
            }
            None => self.unclaimed.read(addr, data),
        }
    }

    /// A write at `addr`; unclaimed writes are dropped.
    pub(crate) fn write(&self, access: Access, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some(e) => {
                e.writes.fetch_add(1, Ordering::Relaxed);
                let mut dev = e.device.lock().unwrap_or_else(PoisonError::into_inner);
                dev.write(access, addr - e.base, data);
            }
            None => self.unclaimed.write(addr, data),
        }
    }

    /// Counters of every device with at least one access, merged by name.
    pub(crate) fn counters(&self) -> Vec<DeviceCounters> {
        let mut out: Vec<DeviceCounters> = Vec::new();
        for e in &self.entries {
            let (r, w) = (
                e.reads.load(Ordering::Relaxed),
                e.writes.load(Ordering::Relaxed),
            );
            if r + w == 0 {
                continue;
            }
            match out.iter_mut().find(|c| c.name == e.name) {
                Some(c) => {
                    c.reads += r;
                    c.writes += w;
                }
                None => out.push(DeviceCounters {
                    name: e.name,
                    reads: r,
                    writes: w,
                }),
            }
        }
        out
    }

    /// Unclaimed (reads, writes).
    pub(crate) fn unclaimed_counts(&self) -> (u64, u64) {
        self.unclaimed.counts()
    }

    /// A one-line map of the bus, for `RUST_LOG=debug`.
    pub(crate) fn describe(&self) -> String {
        let mut s = format!("{:?}:", self.kind);
        for e in &self.entries {
            let _ = write!(s, " {}@{:#x}+{:#x}", e.name, e.base, e.len);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, access: Access, offset: u64, data: &[u8]) {
            self.writes.push((access.vcpu, offset, data.to_vec()));
        }
    }

    const A: Access = Access { vcpu: 1 };

    #[test]
    fn access_routed_with_offset_from_base() {
        let mut bus = Bus::new(BusKind::Pio);
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, "serial", dev.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.read(A, 0x3fd, &mut b);
        assert_eq!(b, [5]);
        bus.write(A, 0x3f8, b"x");
        assert_eq!(dev.lock().unwrap().writes, vec![(1, 0, vec![b'x'])]);
        assert_eq!(
            bus.counters(),
            vec![DeviceCounters {
                name: "serial",
                reads: 1,
                writes: 1
            }]
        );
    }

    #[test]
    fn unclaimed_reads_all_ones_and_counts() {
        let mut bus = Bus::new(BusKind::Mmio);
        bus.insert(
            0x1000,
            0x10,
            "dev",
            Arc::new(Mutex::new(Recorder::default())),
        )
        .unwrap();
        let mut b = [0u8; 4];
        bus.read(A, 0x1010, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.read(A, 0xfff, &mut b);
        bus.write(A, 0x2000, &[1]);
        assert_eq!(bus.unclaimed_counts(), (2, 1));
    }

    #[test]
    fn overlap_rejected() {
        let mut bus = Bus::new(BusKind::Pio);
        let d = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x20, 2, "pic", d.clone()).unwrap();
        assert!(bus.insert(0x21, 1, "x", d.clone()).is_err());
        assert!(bus.insert(0x1f, 2, "y", d.clone()).is_err());
        bus.insert(0x22, 1, "z", d).unwrap();
    }
}
