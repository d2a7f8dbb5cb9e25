//! The Multiboot information block (spec 3.3) and where everything goes.
//!
//! Layout: the kernel where its header says; modules page-aligned after it;
//! the information area (a flat GDT, the info structure, the memory map, the
//! module list and every string) in low memory at [`LOW_AREA_START`], or,
//! when the kernel or a module occupies low memory or the area does not fit,
//! page-aligned after the last module. Nothing overlaps; everything is
//! checked against RAM.

use super::{KernelPlan, LoadError, check_in_ram};

/// First byte of the low information area (above the real-mode IVT and BDA).
pub(crate) const LOW_AREA_START: u64 = 0x1000;
/// End of conventional memory below the EBDA (what `mem_lower` reports).
pub(crate) const LOW_MEMORY_END: u64 = 0x9_fc00;
/// Start of extended memory.
pub(crate) const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Page size for module alignment.
const PAGE: u64 = 0x1000;

/// Info flag 0: mem_lower/mem_upper valid.
pub(crate) const INFO_MEMORY: u32 = 1 << 0;
/// Info flag 2: cmdline valid.
pub(crate) const INFO_CMDLINE: u32 = 1 << 2;
/// Info flag 3: mods_count/mods_addr valid.
pub(crate) const INFO_MODS: u32 = 1 << 3;
/// Info flag 6: mmap_length/mmap_addr valid.
pub(crate) const INFO_MEM_MAP: u32 = 1 << 6;
/// Info flag 9: boot_loader_name valid.
pub(crate) const INFO_LOADER_NAME: u32 = 1 << 9;

/// Offsets in the information structure (spec 3.3, "Boot information format").
pub(crate) mod info_off {
    /// flags
    pub(crate) const FLAGS: usize = 0;
    /// mem_lower (KiB)
    pub(crate) const MEM_LOWER: usize = 4;
    /// mem_upper (KiB)
    pub(crate) const MEM_UPPER: usize = 8;
    /// cmdline
    pub(crate) const CMDLINE: usize = 16;
    /// mods_count
    pub(crate) const MODS_COUNT: usize = 20;
    /// mods_addr
    pub(crate) const MODS_ADDR: usize = 24;
    /// mmap_length
    pub(crate) const MMAP_LENGTH: usize = 44;
    /// mmap_addr
    pub(crate) const MMAP_ADDR: usize = 48;
    /// boot_loader_name
    pub(crate) const LOADER_NAME: usize = 64;
}
/// Bytes reserved for the information structure (it is 116 bytes in v0.6.96).
const INFO_SIZE: usize = 128;
/// One memory-map entry: size (u32) + base (u64) + length (u64) + type (u32).
const MMAP_ENTRY_SIZE: usize = 24;
/// One module entry: mod_start, mod_end, string, reserved.
const MOD_ENTRY_SIZE: usize = 16;
/// Memory-map type: available RAM.
pub(crate) const MMAP_AVAILABLE: u32 = 1;
/// Memory-map type: reserved.
pub(crate) const MMAP_RESERVED: u32 = 2;

/// The flat GDT the BSP starts with: null, 32-bit code (selector 0x08),
/// 32-bit data (selector 0x10), base 0, limit 4 GiB.
pub(crate) const BOOT_GDT: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
/// Code selector of [`BOOT_GDT`].
pub(crate) const BOOT_CS: u16 = 0x08;
/// Data selector of [`BOOT_GDT`].
pub(crate) const BOOT_DS: u16 = 0x10;

const LOADER_NAME: &str = concat!("irqconnect vmm ", env!("CARGO_PKG_VERSION"));

/// A module to load, with its command line.
#[derive(Debug, Clone)]
pub(crate) struct ModuleImage {
    /// The file's bytes.
    pub(crate) bytes: Vec<u8>,
    /// Its command line (by convention, starting with its path).
    pub(crate) cmdline: String,
}

/// What to write where, and the addresses the BSP is handed.
#[derive(Debug, Clone)]
pub(crate) struct BootLayout {
    /// `(guest-physical address, bytes)` pairs (modules and the info area).
    pub(crate) writes: Vec<(u64, Vec<u8>)>,
    /// Address of the information structure (EBX).
    pub(crate) info_addr: u32,
    /// Address of [`BOOT_GDT`].
    pub(crate) gdt_addr: u32,
    /// Where each module went (`start..end`).
    pub(crate) modules: Vec<std::ops::Range<u64>>,
}

/// Builds the [`BootLayout`] for a planned kernel.
pub(crate) struct BootInfoBuilder<'a> {
    ram: u64,
    cmdline: &'a str,
    modules: &'a [ModuleImage],
}

impl<'a> BootInfoBuilder<'a> {
    /// A builder for RAM of `ram` bytes.
    pub(crate) fn new(ram: u64, cmdline: &'a str, modules: &'a [ModuleImage]) -> Self {
        Self {
            ram,
            cmdline,
            modules,
        }
    }

    /// The memory map: conventional memory, the EBDA/ROM hole, extended
    /// memory, and the IOAPIC and local APIC windows.
    pub(crate) fn memory_map(&self) -> Vec<(u64, u64, u32)> {
        use irqconnect_abi::layout::{
            IOAPIC_MMIO_BASE, IOAPIC_MMIO_SIZE, LAPIC_MMIO_BASE, LAPIC_MMIO_SIZE,
        };
        vec![
            (0, LOW_MEMORY_END, MMAP_AVAILABLE),
            (
                LOW_MEMORY_END,
                HIGH_MEMORY_START - LOW_MEMORY_END,
                MMAP_RESERVED,
            ),
            (
                HIGH_MEMORY_START,
                self.ram.saturating_sub(HIGH_MEMORY_START),
                MMAP_AVAILABLE,
            ),
            (IOAPIC_MMIO_BASE, IOAPIC_MMIO_SIZE, MMAP_RESERVED),
            (LAPIC_MMIO_BASE, LAPIC_MMIO_SIZE, MMAP_RESERVED),
        ]
    }

    /// Places modules and the info area around `plan`.
    pub(crate) fn build(&self, plan: &KernelPlan) -> Result<BootLayout, LoadError> {
        let kernel = plan.extent();
        let mut writes = Vec::new();
        let mut modules = Vec::new();
        let mut next = align_up(kernel.end, PAGE);
        for (i, m) in self.modules.iter().enumerate() {
            let len = m.bytes.len() as u64;
            check_in_ram(&format!("module {i} ({})", m.cmdline), next, len, self.ram)?;
            writes.push((next, m.bytes.clone()));
            modules.push(next..next + len);
            next = align_up(next + len, PAGE);
        }

        let area_len = self.area_len();
        let low = LOW_AREA_START..LOW_AREA_START + area_len as u64;
        let low_ok = low.end <= LOW_MEMORY_END
            && !overlaps(&low, &kernel)
            && modules.iter().all(|m| !overlaps(&low, m));
        let base = if low_ok { low.start } else { next };
        check_in_ram(
            "the Multiboot information area",
            base,
            area_len as u64,
            self.ram,
        )?;
        if base > u64::from(u32::MAX) - area_len as u64 {
            return Err(LoadError::Overlap(
                "the Multiboot information area does not fit below 4 GiB".to_string(),
            ));
        }
        let (area, info_addr, gdt_addr) = self.area(base, &modules);
        writes.push((base, area));
        Ok(BootLayout {
            writes,
            info_addr,
            gdt_addr,
            modules,
        })
    }

    fn area_len(&self) -> usize {
        let strings: usize = self.cmdline.len()
            + 1
            + LOADER_NAME.len()
            + 1
            + self
                .modules
                .iter()
                .map(|m| m.cmdline.len() + 1)
                .sum::<usize>();
        32 + INFO_SIZE
            + MMAP_ENTRY_SIZE * self.memory_map().len()
            + MOD_ENTRY_SIZE * self.modules.len()
            + strings
    }

    /// Lays out the area at `base`: GDT (32 bytes), info, mmap, mods, strings.
    fn area(&self, base: u64, modules: &[std::ops::Range<u64>]) -> (Vec<u8>, u32, u32) {
        let mut buf = vec![0u8; self.area_len()];
        let addr = |off: usize| (base + off as u64) as u32;
        for (i, d) in BOOT_GDT.iter().enumerate() {
            put(&mut buf, 8 * i, &d.to_le_bytes());
        }
        let info = 32;
        let mmap = info + INFO_SIZE;
        let map = self.memory_map();
        for (i, (start, len, kind)) in map.iter().enumerate() {
            let e = mmap + i * MMAP_ENTRY_SIZE;
            put(&mut buf, e, &20u32.to_le_bytes());
            put(&mut buf, e + 4, &start.to_le_bytes());
            put(&mut buf, e + 12, &len.to_le_bytes());
            put(&mut buf, e + 20, &kind.to_le_bytes());
        }
        let mods = mmap + map.len() * MMAP_ENTRY_SIZE;
        let mut strings = mods + self.modules.len() * MOD_ENTRY_SIZE;
        let mut push_str = |buf: &mut Vec<u8>, s: &str| {
            let at = strings;
            put(buf, at, s.as_bytes());
            strings += s.len() + 1; // NUL already there
            addr(at)
        };
        let cmdline = push_str(&mut buf, self.cmdline);
        let loader = push_str(&mut buf, LOADER_NAME);
        for (i, (m, range)) in self.modules.iter().zip(modules).enumerate() {
            let e = mods + i * MOD_ENTRY_SIZE;
            let s = push_str(&mut buf, &m.cmdline);
            put(&mut buf, e, &(range.start as u32).to_le_bytes());
            put(&mut buf, e + 4, &(range.end as u32).to_le_bytes());
            put(&mut buf, e + 8, &s.to_le_bytes());
        }
        let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MEM_MAP | INFO_LOADER_NAME;
        if !self.modules.is_empty() {
            flags |= INFO_MODS;
        }
        let mem_lower = (LOW_MEMORY_END / 1024) as u32;
        let mem_upper = (self.ram.saturating_sub(HIGH_MEMORY_START) / 1024) as u32;
        put(&mut buf, info + info_off::FLAGS, &flags.to_le_bytes());
        put(
            &mut buf,
            info + info_off::MEM_LOWER,
            &mem_lower.to_le_bytes(),
        );
        put(
            &mut buf,
            info + info_off::MEM_UPPER,
            &mem_upper.to_le_bytes(),
        );
        put(&mut buf, info + info_off::CMDLINE, &cmdline.to_le_bytes());
        let count = self.modules.len() as u32;
        put(&mut buf, info + info_off::MODS_COUNT, &count.to_le_bytes());
        put(
            &mut buf,
            info + info_off::MODS_ADDR,
            &addr(mods).to_le_bytes(),
        );
        let mmap_len = (map.len() * MMAP_ENTRY_SIZE) as u32;
        put(
            &mut buf,
            info + info_off::MMAP_LENGTH,
            &mmap_len.to_le_bytes(),
        );
        put(
            &mut buf,
            info + info_off::MMAP_ADDR,
            &addr(mmap).to_le_bytes(),
        );
        put(
            &mut buf,
            info + info_off::LOADER_NAME,
            &loader.to_le_bytes(),
        );
        (buf, addr(info), addr(0))
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn overlaps(a: &std::ops::Range<u64>, b: &std::ops::Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

#[cfg(test)]
mod tests {
    use super::super::multiboot::{plan_kernel, tests::kludge_image};
    use super::*;
    use crate::loader::le32;

    const MIB: u64 = 1 << 20;

    fn read_cstr(area: &[u8], base: u64, addr: u32) -> String {
        let off = (u64::from(addr) - base) as usize;
        let end = area[off..].iter().position(|&b| b == 0).unwrap() + off;
        String::from_utf8(area[off..end].to_vec()).unwrap()
    }

    #[test]
    fn info_in_low_memory_with_cmdline_mmap_and_modules() {
        let img = kludge_image(0, 0x10_0000, &[0; 0x1800], 0x800);
        let plan = plan_kernel(&img, 32 * MIB).unwrap();
        let mods = vec![
            ModuleImage {
                bytes: vec![7; 10],
                cmdline: "a.bin x=1".into(),
            },
            ModuleImage {
                bytes: vec![8; 5000],
                cmdline: "b.bin".into(),
            },
        ];
        let layout = BootInfoBuilder::new(32 * MIB, "tests=foo", &mods)
            .build(&plan)
            .unwrap();
        assert_eq!(layout.gdt_addr as u64, LOW_AREA_START);
        // Modules page-aligned after the kernel (0x100000 + 0x1820 + bss 0x800).
        assert_eq!(layout.modules[0], 0x10_3000..0x10_300a);
        assert_eq!(layout.modules[1].start, 0x10_4000);
        let (base, area) = layout.writes.last().unwrap();
        assert_eq!(*base, LOW_AREA_START);
        let info = (layout.info_addr as u64 - base) as usize;
        let flags = le32(area, info).unwrap();
        assert_eq!(
            flags,
            INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_LOADER_NAME
        );
        assert_eq!(le32(area, info + info_off::MEM_LOWER), Some(639));
        assert_eq!(le32(area, info + info_off::MEM_UPPER), Some(31 * 1024));
        let cmd = le32(area, info + info_off::CMDLINE).unwrap();
        assert_eq!(read_cstr(area, *base, cmd), "tests=foo");
        assert_eq!(le32(area, info + info_off::MODS_COUNT), Some(2));
        let mods_addr = le32(area, info + info_off::MODS_ADDR).unwrap();
        let m1 = (u64::from(mods_addr) - base) as usize + MOD_ENTRY_SIZE;
        assert_eq!(le32(area, m1), Some(0x10_4000));
        assert_eq!(le32(area, m1 + 4), Some(0x10_4000 + 5000));
        assert_eq!(read_cstr(area, *base, le32(area, m1 + 8).unwrap()), "b.bin");
        let mmap_len = le32(area, info + info_off::MMAP_LENGTH).unwrap();
        assert_eq!(mmap_len as usize, 5 * MMAP_ENTRY_SIZE);
        let mmap = (u64::from(le32(area, info + info_off::MMAP_ADDR).unwrap()) - base) as usize;
        // Third entry: extended memory up to the end of RAM.
        let e = mmap + 2 * MMAP_ENTRY_SIZE;
        assert_eq!(le32(area, e), Some(20));
        assert_eq!(le32(area, e + 4), Some(0x10_0000));
        assert_eq!(le32(area, e + 12), Some((31 * MIB) as u32));
        assert_eq!(le32(area, e + 20), Some(MMAP_AVAILABLE));
    }

    #[test]
    fn info_moves_above_modules_when_kernel_is_in_low_memory() {
        let img = kludge_image(0, 0x800, &[0; 0x100], 0);
        let plan = plan_kernel(&img, 4 * MIB).unwrap();
        let layout = BootInfoBuilder::new(4 * MIB, "", &[]).build(&plan).unwrap();
        let kernel = plan.extent();
        let info = u64::from(layout.info_addr);
        assert!(
            info >= kernel.end,
            "info {info:#x} overlaps kernel {kernel:?}"
        );
        assert_eq!(u64::from(layout.gdt_addr) % PAGE, 0);
    }

    #[test]
    fn module_past_ram_rejected() {
        let img = kludge_image(0, 0x10_0000, &[0; 16], 0);
        let plan = plan_kernel(&img, 2 * MIB).unwrap();
        let mods = vec![ModuleImage {
            bytes: vec![0; 2 * MIB as usize],
            cmdline: "big".into(),
        }];
        let err = BootInfoBuilder::new(2 * MIB, "", &mods)
            .build(&plan)
            .unwrap_err();
        assert!(err.to_string().contains("module 0 (big)"), "{err}");
    }
}
