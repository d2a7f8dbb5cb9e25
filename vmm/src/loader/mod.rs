//! Loading a Multiboot v1 kernel and its modules into guest memory.
//!
//! Parsing is pure ([`multiboot::plan_kernel`] turns image bytes into a
//! [`KernelPlan`]; [`bootinfo::BootInfoBuilder`] lays out the information
//! block), so malformed images are unit-tested without KVM. [`load`] then
//! writes everything into guest memory.

pub(crate) mod bootinfo;
pub(crate) mod elf;
pub(crate) mod multiboot;

use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub(crate) use bootinfo::{BootInfoBuilder, ModuleImage};

/// Why an image cannot be loaded. Messages are plain sentences.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LoadError {
    /// The image is empty.
    #[error("the image is empty")]
    Empty,
    /// No Multiboot header anywhere.
    #[error(
        "no Multiboot v1 header (magic 0x1BADB002 with a valid checksum) in the first 8 KiB; \
         is this a Multiboot kernel?"
    )]
    NoHeader,
    /// A valid header, but after the first 8 KiB, where loaders do not look.
    #[error(
        "the Multiboot header is at offset {offset:#x}, past the first 8 KiB where the \
         specification requires it"
    )]
    HeaderPastSearchWindow {
        /// Where it was found.
        offset: usize,
    },
    /// The magic is there but the checksum does not match.
    #[error(
        "the Multiboot header at offset {offset:#x} has a bad checksum (magic + flags + checksum != 0)"
    )]
    BadChecksum {
        /// Where the magic was found.
        offset: usize,
    },
    /// Required-feature flags (bits 0..15) this loader does not provide.
    #[error("the Multiboot header requires features this loader does not provide (flags {0:#x})")]
    UnsupportedFlags(u32),
    /// Inconsistent a.out-kludge addresses.
    #[error("bad Multiboot a.out-kludge addresses: {0}")]
    BadKludge(String),
    /// The file is shorter than its headers say.
    #[error("the image is truncated: {what} needs {needed} bytes, the file has {len}")]
    Truncated {
        /// Which part.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// File length.
        len: u64,
    },
    /// A load address range outside guest RAM.
    #[error(
        "{what} at {start:#x}..{end:#x} is outside guest RAM (0..{ram:#x}); use a larger --memory \
         or fix the load address"
    )]
    OutsideRam {
        /// Which part.
        what: String,
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
        /// RAM size.
        ram: u64,
    },
    /// Not an ELF32 image and no a.out kludge.
    #[error("{0}")]
    BadElf(String),
    /// Two parts of the boot image would overlap.
    #[error("{0}")]
    Overlap(String),
}

/// A piece of the image copied to guest memory; the rest of `mem_size` past
/// the file bytes is zeroed (bss).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Guest-physical load address.
    pub(crate) addr: u64,
    /// Bytes of the file to copy there.
    pub(crate) file: Range<usize>,
    /// Size in guest memory (>= the file part).
    pub(crate) mem_size: u64,
}

/// What loading a kernel image means: where its bytes go and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelPlan {
    /// Guest-physical entry point (32-bit protected mode).
    pub(crate) entry: u32,
    /// The pieces to load.
    pub(crate) segments: Vec<Segment>,
    /// The header's flags.
    pub(crate) flags: u32,
    /// Whether the a.out kludge (flag 16) was used rather than ELF headers.
    pub(crate) kludge: bool,
}

impl KernelPlan {
    /// The guest-physical range the kernel occupies (lowest start .. highest end).
    pub(crate) fn extent(&self) -> Range<u64> {
        let start = self.segments.iter().map(|s| s.addr).min().unwrap_or(0);
        let end = self
            .segments
            .iter()
            .map(|s| s.addr + s.mem_size)
            .max()
            .unwrap_or(0);
        start..end
    }
}

/// Checks that `start..start+len` lies in RAM of `ram` bytes.
pub(crate) fn check_in_ram(what: &str, start: u64, len: u64, ram: u64) -> Result<(), LoadError> {
    let end = start.checked_add(len);
    match end {
        Some(end) if end <= ram => Ok(()),
        _ => Err(LoadError::OutsideRam {
            what: what.to_string(),
            start,
            end: end.unwrap_or(u64::MAX),
            ram,
        }),
    }
}

/// Where the BSP starts and what it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BootEntry {
    /// EIP.
    pub(crate) entry: u32,
    /// EBX: the Multiboot information block.
    pub(crate) info_addr: u32,
    /// Guest-physical address of the flat GDT the VMM wrote.
    pub(crate) gdt_addr: u32,
}

/// Checks that the image and modules can be loaded into `ram` bytes,
/// without touching guest memory (so errors come before KVM is opened).
pub(crate) fn check(
    ram: u64,
    image: &[u8],
    cmdline: &str,
    modules: &[ModuleImage],
) -> Result<(), LoadError> {
    let plan = multiboot::plan_kernel(image, ram)?;
    BootInfoBuilder::new(ram, cmdline, modules).build(&plan)?;
    Ok(())
}

/// Writes the kernel, its modules and the information block to guest memory.
pub(crate) fn load(
    mem: &GuestMemoryMmap,
    image: &[u8],
    cmdline: &str,
    modules: &[ModuleImage],
) -> Result<BootEntry, LoadError> {
    let ram = mem_size(mem);
    let plan = multiboot::plan_kernel(image, ram)?;
    let layout = BootInfoBuilder::new(ram, cmdline, modules).build(&plan)?;
    let write = |addr: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| LoadError::OutsideRam {
                what: format!("write to guest memory ({e})"),
                start: addr,
                end: addr + bytes.len() as u64,
                ram,
            })
    };
    for seg in &plan.segments {
        let bytes = &image[seg.file.clone()];
        write(seg.addr, bytes)?;
        let bss = seg.mem_size - bytes.len() as u64;
        if bss > 0 {
            write(seg.addr + bytes.len() as u64, &vec![0u8; bss as usize])?;
        }
    }
    for (i, range) in layout.modules.iter().enumerate() {
        log::debug!("module {i} at {range:#x?}");
    }
    for (addr, bytes) in &layout.writes {
        write(*addr, bytes)?;
    }
    Ok(BootEntry {
        entry: plan.entry,
        info_addr: layout.info_addr,
        gdt_addr: layout.gdt_addr,
    })
}

/// The end of guest RAM (one region starting at 0).
fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

/// Reads a little-endian u32 at `off`, or `None` past the end.
pub(crate) fn le32(bytes: &[u8], off: usize) -> Option<u32> {
    let b = bytes.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a little-endian u16 at `off`, or `None` past the end.
pub(crate) fn le16(bytes: &[u8], off: usize) -> Option<u16> {
    let b = bytes.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}
