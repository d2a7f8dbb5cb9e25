//! The Multiboot v1 header: finding it and turning it into a load plan.
//!
//! Specification: "Multiboot Specification version 0.6.96", section 3.1
//! (OS image format). The header is 4-byte aligned within the first 8192
//! bytes. With flag 16 (the a.out kludge) the header's address fields say
//! where the image goes; otherwise the image must be ELF32 ([`super::elf`]).

use super::{KernelPlan, LoadError, Segment, check_in_ram, elf, le32};

/// Header magic (spec 3.1.2).
pub(crate) const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What the loader puts in EAX (spec 3.2).
pub(crate) const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie wholly in this many leading bytes (spec 3.1.1).
pub(crate) const SEARCH_WINDOW: usize = 8192;

/// Flag 0: align modules on 4 KiB pages.
pub(crate) const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Flag 1: mem_* fields (and the memory map) must be provided.
pub(crate) const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Flag 2: video mode information requested.
pub(crate) const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Flag 16: the address fields of the header are valid (a.out kludge).
pub(crate) const FLAG_AOUT_KLUDGE: u32 = 1 << 16;

/// Required-feature flags this loader honours. Video mode (flag 2) is a
/// request we cannot meet but that the specification lets a kernel live
/// without (the info block simply lacks the video fields), as QEMU does.
const SUPPORTED_REQUIRED_FLAGS: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// The fixed part of the header: magic, flags, checksum.
const HEADER_LEN: usize = 12;
/// The header with the five a.out-kludge address fields.
const KLUDGE_HEADER_LEN: usize = 32;

/// A header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// File offset of the magic.
    pub(crate) offset: usize,
    /// The flags field.
    pub(crate) flags: u32,
}

/// Finds the Multiboot header: the first 4-byte-aligned magic in the first
/// 8 KiB whose checksum is valid.
pub(crate) fn find_header(image: &[u8]) -> Result<Header, LoadError> {
    if image.is_empty() {
        return Err(LoadError::Empty);
    }
    let mut bad_checksum = None;
    let mut offset = 0;
    while offset + HEADER_LEN <= image.len() {
        if le32(image, offset) == Some(HEADER_MAGIC) {
            let flags = le32(image, offset + 4).unwrap_or(0);
            let checksum = le32(image, offset + 8).unwrap_or(0);
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) == 0 {
                if offset + HEADER_LEN > SEARCH_WINDOW {
                    return Err(LoadError::HeaderPastSearchWindow { offset });
                }
                return Ok(Header { offset, flags });
            }
            if offset + HEADER_LEN <= SEARCH_WINDOW && bad_checksum.is_none() {
                bad_checksum = Some(offset);
            }
        }
        offset += 4;
    }
    match bad_checksum {
        Some(offset) => Err(LoadError::BadChecksum { offset }),
        None => Err(LoadError::NoHeader),
    }
}

/// Turns an image into a load plan for RAM of `ram` bytes.
pub(crate) fn plan_kernel(image: &[u8], ram: u64) -> Result<KernelPlan, LoadError> {
    let header = find_header(image)?;
    let required = header.flags & 0xffff;
    if required & !SUPPORTED_REQUIRED_FLAGS != 0 {
        return Err(LoadError::UnsupportedFlags(header.flags));
    }
    if required & FLAG_VIDEO_MODE != 0 {
        log::warn!("the kernel asks for a video mode; this VMM has no display and ignores it");
    }
    let plan = if header.flags & FLAG_AOUT_KLUDGE != 0 {
        plan_kludge(image, header, ram)?
    } else {
        elf::plan_elf32(image, header.flags, ram)?
    };
    check_in_ram("the entry point", u64::from(plan.entry), 1, ram)?;
    Ok(plan)
}

/// Plans an a.out-kludge image (spec 3.1.3, fields at header offsets 12..32).
fn plan_kludge(image: &[u8], header: Header, ram: u64) -> Result<KernelPlan, LoadError> {
    let field = |i: usize| le32(image, header.offset + HEADER_LEN + 4 * i);
    let (Some(header_addr), Some(load_addr), Some(load_end_addr), Some(bss_end_addr), Some(entry)) =
        (field(0), field(1), field(2), field(3), field(4))
    else {
        return Err(LoadError::Truncated {
            what: "the a.out-kludge header",
            needed: (header.offset + KLUDGE_HEADER_LEN) as u64,
            len: image.len() as u64,
        });
    };
    let bad = |m: String| Err(LoadError::BadKludge(m));
    if load_addr > header_addr {
        return bad(format!(
            "load_addr {load_addr:#x} is above header_addr {header_addr:#x}"
        ));
    }
    // The file offset that load_addr corresponds to.
    let Some(load_offset) = (header.offset as u64).checked_sub(u64::from(header_addr - load_addr))
    else {
        return bad(format!(
            "header_addr - load_addr = {:#x} reaches before the start of the file (header at offset {:#x})",
            header_addr - load_addr,
            header.offset
        ));
    };
    let file_len = image.len() as u64;
    let load_size = if load_end_addr == 0 {
        file_len - load_offset
    } else {
        if load_end_addr < load_addr {
            return bad(format!(
                "load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}"
            ));
        }
        u64::from(load_end_addr - load_addr)
    };
    if load_offset + load_size > file_len {
        return Err(LoadError::Truncated {
            what: "the text and data (load_addr..load_end_addr)",
            needed: load_offset + load_size,
            len: file_len,
        });
    }
    let load_end = u64::from(load_addr) + load_size;
    let mem_end = if bss_end_addr == 0 {
        load_end
    } else {
        if u64::from(bss_end_addr) < load_end {
            return bad(format!(
                "bss_end_addr {bss_end_addr:#x} is below the end of the loaded data {load_end:#x}"
            ));
        }
        u64::from(bss_end_addr)
    };
    let mem_size = mem_end - u64::from(load_addr);
    check_in_ram("the kernel image", u64::from(load_addr), mem_size, ram)?;
    Ok(KernelPlan {
        entry,
        segments: vec![Segment {
            addr: u64::from(load_addr),
            file: load_offset as usize..(load_offset + load_size) as usize,
            mem_size,
        }],
        flags: header.flags,
        kludge: true,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a kludge image: `pad` bytes, the header, then `body`. The
    /// header says the file is loaded at `load_addr` with the header at
    /// `load_addr + pad`.
    pub(crate) fn kludge_image(pad: usize, load_addr: u32, body: &[u8], bss: u32) -> Vec<u8> {
        let mut img = vec![0u8; pad];
        let flags = FLAG_AOUT_KLUDGE | FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO;
        let header_addr = load_addr + pad as u32;
        let total = (pad + KLUDGE_HEADER_LEN + body.len()) as u32;
        let entry = header_addr + KLUDGE_HEADER_LEN as u32;
        for v in [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
            header_addr,
            load_addr,
            load_addr + total,
            load_addr + total + bss,
            entry,
        ] {
            img.extend_from_slice(&v.to_le_bytes());
        }
        img.extend_from_slice(body);
        img
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn kludge_valid_image_planned_at_its_addresses() {
        let img = kludge_image(16, 0x10_0000, &[0xf4; 100], 0x1000);
        let plan = plan_kernel(&img, 16 * MIB).unwrap();
        assert!(plan.kludge);
        assert_eq!(plan.entry, 0x10_0000 + 16 + 32);
        assert_eq!(plan.segments.len(), 1);
        let seg = &plan.segments[0];
        assert_eq!(seg.addr, 0x10_0000);
        assert_eq!(seg.file, 0..img.len());
        assert_eq!(seg.mem_size, img.len() as u64 + 0x1000);
    }

    #[test]
    fn kludge_load_end_zero_means_whole_file() {
        let mut img = kludge_image(0, 0x20_0000, &[1, 2, 3, 4], 0);
        img[20..24].copy_from_slice(&0u32.to_le_bytes()); // load_end_addr
        img[24..28].copy_from_slice(&0u32.to_le_bytes()); // bss_end_addr
        let plan = plan_kernel(&img, 16 * MIB).unwrap();
        assert_eq!(plan.segments[0].file, 0..img.len());
        assert_eq!(plan.segments[0].mem_size, img.len() as u64);
    }

    #[test]
    fn no_magic_rejected_with_no_header() {
        let img = vec![0x90u8; 4096];
        assert_eq!(plan_kernel(&img, 16 * MIB), Err(LoadError::NoHeader));
    }

    #[test]
    fn empty_file_rejected() {
        assert_eq!(plan_kernel(&[], 16 * MIB), Err(LoadError::Empty));
    }

    #[test]
    fn bad_checksum_rejected_naming_offset() {
        let mut img = kludge_image(8, 0x10_0000, &[0; 8], 0);
        img[16] ^= 1; // checksum
        assert_eq!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::BadChecksum { offset: 8 })
        );
    }

    #[test]
    fn header_past_8k_rejected() {
        let img = kludge_image(SEARCH_WINDOW, 0x10_0000, &[0; 8], 0);
        assert_eq!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::HeaderPastSearchWindow {
                offset: SEARCH_WINDOW
            })
        );
    }

    #[test]
    fn header_at_end_of_window_accepted() {
        let img = kludge_image(SEARCH_WINDOW - 12, 0x10_0000, &[0; 8], 0);
        assert!(plan_kernel(&img, 16 * MIB).is_ok());
    }

    #[test]
    fn load_address_outside_ram_rejected() {
        let img = kludge_image(0, 0x100_0000, &[0; 64], 0);
        let err = plan_kernel(&img, 8 * MIB).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::OutsideRam {
                    start: 0x100_0000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bss_past_ram_rejected() {
        let img = kludge_image(0, 0x10_0000, &[0; 64], 0x200_0000);
        assert!(matches!(
            plan_kernel(&img, 8 * MIB),
            Err(LoadError::OutsideRam { .. })
        ));
    }

    #[test]
    fn truncated_file_rejected() {
        let mut img = kludge_image(0, 0x10_0000, &[0; 64], 0);
        img.truncate(img.len() - 10);
        let err = plan_kernel(&img, 16 * MIB).unwrap_err();
        assert!(matches!(err, LoadError::Truncated { .. }), "{err}");
    }

    #[test]
    fn truncated_kludge_header_rejected() {
        let img = kludge_image(0, 0x10_0000, &[], 0);
        let err = plan_kernel(&img[..20], 16 * MIB).unwrap_err();
        assert!(matches!(err, LoadError::Truncated { .. }), "{err}");
    }

    #[test]
    fn load_addr_above_header_addr_rejected() {
        let mut img = kludge_image(0, 0x10_0000, &[0; 8], 0);
        img[16..20].copy_from_slice(&0x20_0000u32.to_le_bytes()); // load_addr
        assert!(matches!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::BadKludge(_))
        ));
    }

    #[test]
    fn header_offset_before_file_start_rejected() {
        // header_addr - load_addr larger than the header's file offset.
        let mut img = kludge_image(0, 0x10_0000, &[0; 8], 0);
        img[12..16].copy_from_slice(&0x10_1000u32.to_le_bytes()); // header_addr
        assert!(matches!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::BadKludge(_))
        ));
    }

    #[test]
    fn unknown_required_flag_rejected() {
        let mut img = kludge_image(0, 0x10_0000, &[0; 8], 0);
        let flags = FLAG_AOUT_KLUDGE | (1 << 5);
        img[4..8].copy_from_slice(&flags.to_le_bytes());
        let checksum = 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags));
        img[8..12].copy_from_slice(&checksum.to_le_bytes());
        assert_eq!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::UnsupportedFlags(flags))
        );
    }

    #[test]
    fn entry_outside_ram_rejected() {
        let mut img = kludge_image(0, 0x10_0000, &[0; 8], 0);
        img[28..32].copy_from_slice(&0xf000_0000u32.to_le_bytes());
        assert!(matches!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::OutsideRam { .. })
        ));
    }
}
