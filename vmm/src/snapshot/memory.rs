//! Guest memory in a snapshot: only pages the guest touched.
//!
//! A page the guest never touched is not resident in the VMM's anonymous
//! mapping (`mincore` says so) and reads as zero: it is skipped without
//! being read. A resident page that is all zero is skipped too. The rest
//! is written as runs of adjacent pages, so a file grows with the memory
//! the guest uses, not with the memory it has. At restore, the fresh
//! mapping is zero and only the runs are copied in.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::file::{PAGE, Run};
use crate::error::{Error, Result};

/// Guest RAM as one host byte slice, for reading while every vCPU is
/// paused.
pub(crate) struct Frozen<'a> {
    bytes: &'a [u8],
}

impl<'a> Frozen<'a> {
    /// Guest RAM of `mem` (one region from address 0, as `memory::create`
    /// makes it).
    ///
    /// # Safety
    ///
    /// While the result lives nothing may write guest memory: every vCPU
    /// is out of `KVM_RUN` and no device or service thread touches RAM.
    pub(crate) unsafe fn new(mem: &'a GuestMemoryMmap) -> Result<Self> {
        let region = mem
            .iter()
            .next()
            .ok_or_else(|| Error::Memory("no guest RAM region".into()))?;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(format!("host address of guest RAM: {e}")))?;
        let len = usize::try_from(region.len())
            .map_err(|_| Error::Memory("guest RAM larger than the address space".into()))?;
        // SAFETY: `host..host+len` is the region's mapping, alive as long as
        // `mem`; the caller guarantees nobody writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        Ok(Self { bytes })
    }

    /// The touched, non-zero pages as runs of (guest-physical address,
    /// bytes).
    pub(crate) fn runs(&self) -> Result<Vec<(u64, &'a [u8])>> {
        let page = PAGE as usize;
        let pages = self.bytes.len() / page;
        let mut resident = vec![0u8; pages];
        // SAFETY: the range is the region's page-aligned mapping (mmap
        // returns page-aligned addresses and the length is whole pages);
        // `resident` has one byte per page, as mincore writes.
        let rc = unsafe {
            libc::mincore(
                self.bytes.as_ptr() as *mut libc::c_void,
                pages * page,
                resident.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::Memory(format!(
                "mincore on guest RAM: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut runs: Vec<(u64, &'a [u8])> = Vec::new();
        let mut open: Option<usize> = None;
        for (n, &r) in resident.iter().enumerate() {
            let data = &self.bytes[n * page..(n + 1) * page];
            let keep = r & 1 != 0 && !all_zero(data);
            match (keep, open) {
                (true, None) => open = Some(n),
                (false, Some(start)) => {
                    runs.push(((start * page) as u64, &self.bytes[start * page..n * page]));
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(start) = open {
            runs.push((
                (start * page) as u64,
                &self.bytes[start * page..pages * page],
            ));
        }
        Ok(runs)
    }
}

fn all_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reads.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Copies the runs of a snapshot file into fresh (zero) guest RAM.
pub(crate) fn restore(mem: &GuestMemoryMmap, file: &[u8], runs: &[Run]) -> Result<()> {
    for run in runs {
        let data = file
            .get(run.offset..run.offset + run.len)
            .ok_or_else(|| Error::Memory("a memory run outside the file".into()))?;
        mem.write_slice(data, GuestAddress(run.gpa))
            .map_err(|e| Error::Memory(format!("restore guest RAM at {:#x}: {e}", run.gpa)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_only_touched_nonzero_pages_are_runs() {
        let mem = crate::memory::create(8 << 20).unwrap();
        mem.write_slice(&[1u8; 10], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2u8; 1], GuestAddress(0x2fff)).unwrap();
        mem.write_slice(&[0u8; 4096], GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[3u8; 1], GuestAddress(0x7f_f000)).unwrap();
        // SAFETY: nothing else uses this memory.
        let frozen = unsafe { Frozen::new(&mem) }.unwrap();
        let runs: Vec<(u64, usize)> = frozen
            .runs()
            .unwrap()
            .iter()
            .map(|(a, d)| (*a, d.len()))
            .collect();
        assert_eq!(runs, [(0x1000, 0x2000), (0x7f_f000, 0x1000)]);
    }
}
