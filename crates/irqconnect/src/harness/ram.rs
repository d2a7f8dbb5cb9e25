//! The guest memory the harnesses hand the service: flat RAM at a chosen
//! base, optionally with a window the host cannot write (so an answer can
//! fail to land and the service's undo path runs).

use core::ops::Range;

use crate::error::Error;
use crate::ram::GuestRam;

/// Flat RAM with an optional write-protected window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarnessRam {
    base: u64,
    bytes: Vec<u8>,
    read_only: Option<Range<u64>>,
}

impl HarnessRam {
    /// `bytes` at guest-physical `base`; writes touching `read_only` fail.
    pub fn new(base: u64, bytes: Vec<u8>, read_only: Option<Range<u64>>) -> Self {
        Self {
            base,
            bytes,
            read_only,
        }
    }

    /// The RAM's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    fn range(&self, gpa: u64, len: usize) -> Option<Range<usize>> {
        let start = usize::try_from(gpa.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.bytes.len()).then_some(start..end)
    }

    /// A write by the guest itself: the write-protected window only stops
    /// the host. Fails outside RAM.
    pub fn write_as_guest(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Error> {
        let range = self.range(gpa, buf.len()).ok_or(Error::NotRam {
            gpa,
            len: buf.len() as u64,
        })?;
        if let Some(dst) = self.bytes.get_mut(range) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }

    /// The byte offsets of `gpa..gpa + len`, if wholly RAM.
    pub fn offsets(&self, gpa: u64, len: usize) -> Option<Range<usize>> {
        self.range(gpa, len)
    }
}

impl GuestRam for HarnessRam {
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
        let end = gpa.saturating_add(buf.len() as u64);
        if let Some(ro) = &self.read_only
            && !buf.is_empty()
            && gpa < ro.end
            && ro.start < end
        {
            return Err(not_ram);
        }
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
