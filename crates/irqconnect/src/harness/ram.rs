//! The guest memory the harnesses hand the service: flat RAM at a chosen
//! base, optionally with a window the host cannot write (so an answer can
//! fail to land and the service's undo path runs).

use core::ops::Range;

use crate::error::Error;
use crate::ram::{FlatRam, GuestRam};

/// [`FlatRam`] with an optional window the host cannot write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarnessRam {
    ram: FlatRam,
    read_only: Option<Range<u64>>,
}

impl HarnessRam {
    /// `bytes` at guest-physical `base`; host writes touching `read_only` fail.
    pub fn new(base: u64, bytes: Vec<u8>, read_only: Option<Range<u64>>) -> Self {
        Self {
            ram: FlatRam::from_bytes(base, bytes),
            read_only,
        }
    }

    /// The RAM's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.ram.bytes()
    }

    /// The base address.
    pub fn base(&self) -> u64 {
        self.ram.base()
    }

    /// A write by the guest itself: the write-protected window only stops
    /// the host. Fails outside RAM.
    pub fn write_as_guest(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Error> {
        self.ram.write(gpa, buf)
    }

    /// The byte offsets of `gpa..gpa + len`, if wholly RAM.
    pub fn offsets(&self, gpa: u64, len: usize) -> Option<Range<usize>> {
        self.ram.offsets(gpa, len)
    }
}

impl GuestRam for HarnessRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.ram.read(gpa, buf)
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Error> {
        let end = gpa.saturating_add(buf.len() as u64);
        if let Some(ro) = &self.read_only
            && !buf.is_empty()
            && gpa < ro.end
            && ro.start < end
        {
            return Err(Error::NotRam {
                gpa,
                len: buf.len() as u64,
            });
        }
        self.ram.write(gpa, buf)
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.ram.is_ram(gpa, len)
    }
}
