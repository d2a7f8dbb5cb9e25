//! Guest memory as the PV connect service sees it: [`irqconnect::GuestRam`]
//! over vm-memory's bounds-checked accesses.
//!
//! Every access goes through `GuestMemoryMmap::read_slice`/`write_slice`,
//! which refuse (never truncate) a range that is not wholly inside the RAM
//! regions: a block straddling the end of RAM, an address beyond it, the
//! MMIO hole. No access allocates.

use irqconnect::{Error as PvError, GuestRam};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The VM's RAM, borrowed for one doorbell request.
pub(crate) struct VmRam<'a> {
    mem: &'a GuestMemoryMmap,
}

impl<'a> VmRam<'a> {
    /// A view of `mem`.
    pub(crate) fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self { mem }
    }
}

fn not_ram(gpa: u64, len: usize) -> PvError {
    PvError::NotRam {
        gpa,
        len: len as u64,
    }
}

impl GuestRam for VmRam<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PvError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| not_ram(gpa, buf.len()))
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), PvError> {
        // Check first, so a refused write changes no byte.
        if !self.is_ram(gpa, buf.len() as u64) {
            return Err(not_ram(gpa, buf.len()));
        }
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| not_ram(gpa, buf.len()))
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        if gpa.checked_add(len as u64).is_none() {
            return false;
        }
        if len == 0 {
            return self.mem.address_in_range(GuestAddress(gpa));
        }
        self.mem.check_range(GuestAddress(gpa), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 MiB of RAM at 0.
    const RAM: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    #[test]
    fn vm_ram_read_write_inside_ram_roundtrip() {
        let m = mem();
        let mut ram = VmRam::new(&m);
        ram.write(0x1000, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 4];
        ram.read(0x1000, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        ram.write(RAM - 4, &[9; 4]).unwrap();
        ram.read(RAM - 4, &mut buf).unwrap();
        assert_eq!(buf, [9; 4]);
        assert!(ram.is_ram(0, RAM));
    }

    #[test]
    fn vm_ram_block_straddling_end_refused_and_unchanged() {
        let m = mem();
        let mut ram = VmRam::new(&m);
        let mut buf = [0u8; 16];
        assert_eq!(
            ram.read(RAM - 8, &mut buf),
            Err(PvError::NotRam {
                gpa: RAM - 8,
                len: 16
            })
        );
        assert!(ram.write(RAM - 8, &[0xaa; 16]).is_err());
        let mut tail = [0u8; 8];
        ram.read(RAM - 8, &mut tail).unwrap();
        assert_eq!(tail, [0; 8], "a refused write changed RAM");
        assert!(!ram.is_ram(RAM - 8, 16));
        assert!(ram.is_ram(RAM - 8, 8));
    }

    #[test]
    fn vm_ram_address_beyond_ram_refused() {
        let m = mem();
        let mut ram = VmRam::new(&m);
        let mut buf = [0u8; 4];
        assert!(ram.read(RAM, &mut buf).is_err());
        assert!(ram.read(u64::from(u32::MAX) - 1, &mut buf).is_err());
        assert!(ram.read(u64::MAX - 1, &mut buf).is_err());
        assert!(ram.write(RAM, &buf).is_err());
        assert!(!ram.is_ram(RAM, 1));
        assert!(!ram.is_ram(RAM, 0));
        assert!(!ram.is_ram(u64::MAX, 2));
        assert!(!ram.is_ram(0, u64::MAX));
    }

    #[test]
    fn vm_ram_mmio_hole_is_not_ram() {
        use irqconnect_abi::layout::{IOAPIC_MMIO_BASE, LAPIC_MMIO_BASE, MMIO_HOLE_START};
        let m = mem();
        let mut ram = VmRam::new(&m);
        let mut buf = [0u8; 16];
        for gpa in [MMIO_HOLE_START, IOAPIC_MMIO_BASE, LAPIC_MMIO_BASE] {
            assert!(ram.read(gpa, &mut buf).is_err());
            assert!(ram.write(gpa, &buf).is_err());
            assert!(!ram.is_ram(gpa, 8));
        }
    }

    #[test]
    fn vm_ram_zero_length_is_ram_only_inside() {
        let m = mem();
        let ram = VmRam::new(&m);
        assert!(ram.is_ram(0x1000, 0));
        assert!(!ram.is_ram(RAM + 0x1000, 0));
    }
}
