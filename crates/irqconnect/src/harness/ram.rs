//! The guest memory the harnesses hand the service: flat RAM at a chosen
//! base, optionally with a window the host cannot write (so an answer can
//! fail to land and the service's undo path runs), recording where the host
//! wrote (so a harness knows what an answer touched without a copy of RAM).

use core::ops::Range;

use crate::error::Error;
use crate::ram::{FlatRam, GuestRam};

/// [`FlatRam`] with an optional window the host cannot write, and a log of
/// the host's writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarnessRam {
    ram: FlatRam,
    read_only: Option<Range<u64>>,
    /// Byte offsets of every successful host write since the last
    /// [`HarnessRam::take_writes`].
    writes: Vec<Range<usize>>,
}

impl HarnessRam {
    /// `bytes` at guest-physical `base`; host writes touching `read_only` fail.
    pub fn new(base: u64, bytes: Vec<u8>, read_only: Option<Range<u64>>) -> Self {
        Self {
            ram: FlatRam::from_bytes(base, bytes),
            read_only,
            writes: Vec::new(),
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

    /// The byte offsets the host ([`GuestRam::write`]) wrote since the last
    /// call, in order, and a fresh log. Failed writes change nothing and
    /// are not listed; writes by the guest ([`HarnessRam::write_as_guest`])
    /// neither.
    pub fn take_writes(&mut self) -> Vec<Range<usize>> {
        core::mem::take(&mut self.writes)
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
        self.ram.write(gpa, buf)?;
        // A write of nothing touches nothing.
        if let Some(at) = self.ram.offsets(gpa, buf.len()).filter(|r| !r.is_empty()) {
            self.writes.push(at);
        }
        Ok(())
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.ram.is_ram(gpa, len)
    }
}
