//! Guest memory as the service sees it: a narrow trait the VMM implements
//! over its bounds-checked guest memory, and a flat in-memory implementation
//! for tests, benchmarks and the fuzz harness.

use crate::error::Error;

/// Guest-physical memory access. Every method fails (or answers `false`)
/// for a range that is not wholly guest RAM; none may panic.
pub trait GuestRam {
    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error>;
    /// Writes `buf` at `gpa`.
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Error>;
    /// True when `gpa..gpa + len` lies wholly in guest RAM (resident memory).
    fn is_ram(&self, gpa: u64, len: u64) -> bool;
}

/// Guest RAM as one byte vector starting at guest-physical `base`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatRam {
    base: u64,
    bytes: Vec<u8>,
}

impl FlatRam {
    /// `size` zeroed bytes at `base`.
    pub fn new(base: u64, size: usize) -> Self {
        Self {
            base,
            bytes: vec![0; size],
        }
    }

    /// `bytes` as RAM at `base`.
    pub fn from_bytes(base: u64, bytes: Vec<u8>) -> Self {
        Self { base, bytes }
    }

    /// The RAM's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The byte offsets of `gpa..gpa + len` in [`FlatRam::bytes`], if that
    /// range is wholly RAM.
    pub fn offsets(&self, gpa: u64, len: usize) -> Option<core::ops::Range<usize>> {
        self.range(gpa, len)
    }

    fn range(&self, gpa: u64, len: usize) -> Option<core::ops::Range<usize>> {
        let start = usize::try_from(gpa.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.bytes.len()).then_some(start..end)
    }
}

impl GuestRam for FlatRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        let not_ram = Error::NotRam {
            gpa,
            len: buf.len() as u64,
        };
        let range = self.range(gpa, buf.len()).ok_or(not_ram.clone())?;
        buf.copy_from_slice(self.bytes.get(range).ok_or(not_ram)?);
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Error> {
        let not_ram = Error::NotRam {
            gpa,
            len: buf.len() as u64,
        };
        let range = self.range(gpa, buf.len()).ok_or(not_ram.clone())?;
        self.bytes
            .get_mut(range)
            .ok_or(not_ram)?
            .copy_from_slice(buf);
        Ok(())
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        usize::try_from(len)
            .ok()
            .and_then(|len| self.range(gpa, len))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_ram_bounds_checked_reads_and_writes() {
        let mut ram = FlatRam::new(0x1000, 16);
        assert_eq!(ram.write(0x1008, &[1, 2, 3]), Ok(()));
        let mut buf = [0u8; 3];
        assert_eq!(ram.read(0x1008, &mut buf), Ok(()));
        assert_eq!(buf, [1, 2, 3]);
        assert!(ram.read(0xfff, &mut buf).is_err());
        assert!(ram.write(0x100e, &[0; 3]).is_err());
        assert!(ram.is_ram(0x1000, 16));
        assert!(!ram.is_ram(0x1000, 17));
        assert!(!ram.is_ram(u64::MAX, 2));
    }
}
