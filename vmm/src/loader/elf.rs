//! ELF32 program headers, for Multiboot images without the a.out kludge
//! (Multiboot spec 3.1.3: "the loader uses the ELF headers"; System V ABI,
//! "Program Header").

use super::{KernelPlan, LoadError, Segment, check_in_ram, le16, le32};

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;
/// Size of the ELF32 file header.
const EHDR_LEN: usize = 52;
/// Size of one ELF32 program header.
const PHDR_LEN: usize = 32;

/// Plans an ELF32 image: every `PT_LOAD` segment goes to its physical
/// address; the entry point is translated from virtual to physical through
/// the segment containing it.
pub(crate) fn plan_elf32(image: &[u8], flags: u32, ram: u64) -> Result<KernelPlan, LoadError> {
    let bad = |m: &str| Err(LoadError::BadElf(m.to_string()));
    if image.len() < EHDR_LEN || image[..4] != ELF_MAGIC {
        return bad(
            "not an ELF file and the Multiboot header has no a.out-kludge addresses (flag 16)",
        );
    }
    match image[EI_CLASS] {
        ELFCLASS32 => {}
        ELFCLASS64 => {
            return bad(
                "a 64-bit ELF kernel needs the Multiboot a.out kludge (flag 16) to be loaded by a Multiboot v1 loader",
            );
        }
        _ => return bad("unknown ELF class"),
    }
    if image[EI_DATA] != ELFDATA2LSB {
        return bad("the ELF image is not little-endian");
    }
    let field16 = |off| le16(image, off).unwrap_or(0);
    let field32 = |off| le32(image, off).unwrap_or(0);
    if field16(16) != ET_EXEC {
        return bad("the ELF image is not an executable (e_type != ET_EXEC)");
    }
    if field16(18) != EM_386 {
        return bad("the ELF image is not for i386 (e_machine != EM_386)");
    }
    let entry = field32(24);
    let phoff = field32(28) as usize;
    let phentsize = field16(42) as usize;
    let phnum = field16(44) as usize;
    if phentsize < PHDR_LEN {
        return bad("ELF program header entries are smaller than 32 bytes");
    }
    let table_end = phoff as u64 + (phentsize * phnum) as u64;
    if table_end > image.len() as u64 {
        return Err(LoadError::Truncated {
            what: "the ELF program header table",
            needed: table_end,
            len: image.len() as u64,
        });
    }
    let mut segments = Vec::new();
    let mut phys_entry = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if field32(ph) != PT_LOAD {
            continue;
        }
        let offset = u64::from(field32(ph + 4));
        let vaddr = u64::from(field32(ph + 8));
        let paddr = u64::from(field32(ph + 12));
        let filesz = u64::from(field32(ph + 16));
        let memsz = u64::from(field32(ph + 20));
        if filesz > memsz {
            return Err(LoadError::BadElf(format!(
                "ELF segment {i} has p_filesz {filesz:#x} larger than p_memsz {memsz:#x}"
            )));
        }
        if offset + filesz > image.len() as u64 {
            return Err(LoadError::Truncated {
                what: "an ELF segment",
                needed: offset + filesz,
                len: image.len() as u64,
            });
        }
        if memsz == 0 {
            continue;
        }
        check_in_ram(&format!("ELF segment {i}"), paddr, memsz, ram)?;
        if (vaddr..vaddr + memsz).contains(&u64::from(entry)) {
            phys_entry = Some(u64::from(entry) - vaddr + paddr);
        }
        segments.push(Segment {
            addr: paddr,
            file: offset as usize..(offset + filesz) as usize,
            mem_size: memsz,
        });
    }
    if segments.is_empty() {
        return bad("the ELF image has no loadable segment");
    }
    let mut sorted: Vec<_> = segments.iter().map(|s| (s.addr, s.mem_size)).collect();
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        if pair[0].0 + pair[0].1 > pair[1].0 {
            return Err(LoadError::Overlap(format!(
                "ELF segments at {:#x} and {:#x} overlap",
                pair[0].0, pair[1].0
            )));
        }
    }
    Ok(KernelPlan {
        entry: phys_entry.unwrap_or(u64::from(entry)) as u32,
        segments,
        flags,
        kludge: false,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::multiboot::{FLAG_MEMORY_INFO, HEADER_MAGIC, plan_kernel};
    use super::*;

    /// One loadable segment: (paddr, vaddr, file bytes, memsz).
    pub(crate) type TestSegment<'a> = (u32, u32, &'a [u8], u32);

    /// Builds an ELF32 Multiboot image: ELF header, program headers, the
    /// Multiboot header (no kludge) and the segments' bytes.
    pub(crate) fn elf32_image(entry: u32, segs: &[TestSegment<'_>]) -> Vec<u8> {
        let phoff = EHDR_LEN;
        let mb_off = phoff + PHDR_LEN * segs.len();
        let mut data_off = mb_off + 12;
        let mut img = vec![0u8; data_off];
        img[..4].copy_from_slice(&ELF_MAGIC);
        img[EI_CLASS] = ELFCLASS32;
        img[EI_DATA] = ELFDATA2LSB;
        img[6] = 1;
        img[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        img[18..20].copy_from_slice(&EM_386.to_le_bytes());
        img[20..24].copy_from_slice(&1u32.to_le_bytes());
        img[24..28].copy_from_slice(&entry.to_le_bytes());
        img[28..32].copy_from_slice(&(phoff as u32).to_le_bytes());
        img[40..42].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes());
        img[42..44].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        img[44..46].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let flags = FLAG_MEMORY_INFO;
        img[mb_off..mb_off + 4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        img[mb_off + 4..mb_off + 8].copy_from_slice(&flags.to_le_bytes());
        let checksum = 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags));
        img[mb_off + 8..mb_off + 12].copy_from_slice(&checksum.to_le_bytes());
        let mut payload = Vec::new();
        for (i, (paddr, vaddr, bytes, memsz)) in segs.iter().enumerate() {
            let ph = phoff + i * PHDR_LEN;
            let words = [
                PT_LOAD,
                data_off as u32,
                *vaddr,
                *paddr,
                bytes.len() as u32,
                *memsz,
                5,
                0x1000,
            ];
            for (j, w) in words.iter().enumerate() {
                img[ph + 4 * j..ph + 4 * j + 4].copy_from_slice(&w.to_le_bytes());
            }
            payload.extend_from_slice(bytes);
            data_off += bytes.len();
        }
        img.extend_from_slice(&payload);
        img
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn elf32_segments_loaded_at_paddr() {
        let img = elf32_image(
            0x10_0000,
            &[
                (0x10_0000, 0x10_0000, &[0xf4; 16], 0x20),
                (0x20_0000, 0x20_0000, &[1; 4], 4),
            ],
        );
        let plan = plan_kernel(&img, 16 * MIB).unwrap();
        assert!(!plan.kludge);
        assert_eq!(plan.entry, 0x10_0000);
        assert_eq!(plan.segments.len(), 2);
        assert_eq!(plan.segments[0].addr, 0x10_0000);
        assert_eq!(plan.segments[0].mem_size, 0x20);
        assert_eq!(plan.segments[0].file.len(), 16);
        assert_eq!(&img[plan.segments[1].file.clone()], &[1, 1, 1, 1]);
    }

    #[test]
    fn elf32_virtual_entry_translated_to_physical() {
        let img = elf32_image(0xc010_0010, &[(0x10_0000, 0xc010_0000, &[0; 32], 32)]);
        let plan = plan_kernel(&img, 16 * MIB).unwrap();
        assert_eq!(plan.entry, 0x10_0010);
    }

    #[test]
    fn elf32_segment_outside_ram_rejected() {
        let img = elf32_image(0x10_0000, &[(0x10_0000, 0x10_0000, &[0; 16], 0x100_0000)]);
        assert!(matches!(
            plan_kernel(&img, 8 * MIB),
            Err(LoadError::OutsideRam { .. })
        ));
    }

    #[test]
    fn elf32_truncated_segment_rejected() {
        let mut img = elf32_image(0x10_0000, &[(0x10_0000, 0x10_0000, &[0; 64], 64)]);
        img.truncate(img.len() - 1);
        assert!(matches!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::Truncated { .. })
        ));
    }

    #[test]
    fn elf32_filesz_above_memsz_rejected() {
        let img = elf32_image(0x10_0000, &[(0x10_0000, 0x10_0000, &[0; 64], 8)]);
        assert!(matches!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::BadElf(_))
        ));
    }

    #[test]
    fn elf64_without_kludge_rejected() {
        let mut img = elf32_image(0x10_0000, &[(0x10_0000, 0x10_0000, &[0; 8], 8)]);
        img[EI_CLASS] = ELFCLASS64;
        let err = plan_kernel(&img, 16 * MIB).unwrap_err();
        assert!(err.to_string().contains("a.out kludge"), "{err}");
    }

    #[test]
    fn non_elf_without_kludge_rejected() {
        let mut img = elf32_image(0x10_0000, &[(0x10_0000, 0x10_0000, &[0; 8], 8)]);
        img[0] = 0;
        assert!(matches!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::BadElf(_))
        ));
    }

    #[test]
    fn overlapping_segments_rejected() {
        let img = elf32_image(
            0x10_0000,
            &[
                (0x10_0000, 0x10_0000, &[0; 8], 0x100),
                (0x10_0080, 0x10_0080, &[0; 8], 8),
            ],
        );
        assert!(matches!(
            plan_kernel(&img, 16 * MIB),
            Err(LoadError::Overlap(_))
        ));
    }
}
