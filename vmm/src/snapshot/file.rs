//! The snapshot file: a fixed header, then sections.
//!
//! ```text
//! offset  size  field (little-endian)
//!  0       8    magic "IRQSNAP\0"
//!  8       4    format version (FORMAT_VERSION)
//! 12       1    irqchip mode: 0 kernel, 1 split, 2 user
//! 13       3    reserved, 0
//! 16       4    vCPU count
//! 20       4    section count
//! 24       8    guest memory size in bytes
//! 32       8    file length in bytes
//! 40       4    CRC-32 (IEEE) of the whole file with these 4 bytes zero
//! 44       4    reserved, 0
//! 48            sections: { tag u32, reserved u32 (0), length u64, payload }
//! ```
//!
//! Section payloads are postcard encodings of the state types (see
//! [`super::state`]), except [`Tag::Memory`]: guest memory as runs of
//! touched pages, `{ guest-physical address u64, length u64, bytes }`, in
//! ascending order, page-aligned, inside the memory size. Pages that are
//! not in a run are zero.
//!
//! Decoding checks, in this order, and fails with one line naming the first
//! problem: the length (at least a header, at most the header's memory
//! size plus [`MAX_STATE_BYTES`]), the magic, the version, the mode, the
//! vCPU count (1..=255), the memory size (a whole number of MiB within the
//! VMM's range), the file length against the header, the checksum, every
//! section's bounds, tag and uniqueness, every required section present,
//! the memory runs, and each state payload's decoding (the vCPU section's
//! element count against the header first, [`Sections::count`]). Nothing is
//! allocated beyond the file itself and the decoded states, which postcard
//! bounds by the bytes it reads.

use irqchip_kvm::Mode;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first 8 bytes of every snapshot file.
pub(crate) const MAGIC: [u8; 8] = *b"IRQSNAP\0";
/// The layout version this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Bytes of the fixed header.
pub(crate) const HEADER_LEN: usize = 48;
/// Bytes of a section header.
const SECTION_HEADER_LEN: usize = 16;
/// Offset of the CRC in the header.
const CRC_OFFSET: usize = 40;
/// Most bytes of everything but guest memory (vCPU, chip, device and PV
/// state): 64 MiB, far above what 255 vCPUs need (about 6 KiB each).
pub(crate) const MAX_STATE_BYTES: u64 = 64 << 20;
/// Guest pages, the unit of the memory runs.
pub(crate) const PAGE: u64 = 4096;

/// A section's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Tag {
    /// [`super::state::Meta`].
    Meta = 1,
    /// Every vCPU's registers ([`super::state::VcpuState`] per vCPU).
    Vcpus = 2,
    /// The interrupt controller (`irqchip_kvm::ChipState`).
    Chip = 3,
    /// The devices ([`super::state::DevicesState`]).
    Devices = 4,
    /// The PV connect service ([`super::state::PvState`]).
    Pv = 5,
    /// Guest memory runs.
    Memory = 6,
}

impl Tag {
    const ALL: [Tag; 6] = [
        Tag::Meta,
        Tag::Vcpus,
        Tag::Chip,
        Tag::Devices,
        Tag::Pv,
        Tag::Memory,
    ];

    fn from_u32(v: u32) -> Option<Tag> {
        Tag::ALL.into_iter().find(|t| *t as u32 == v)
    }

    fn name(self) -> &'static str {
        match self {
            Tag::Meta => "meta",
            Tag::Vcpus => "vcpus",
            Tag::Chip => "chip",
            Tag::Devices => "devices",
            Tag::Pv => "pv",
            Tag::Memory => "memory",
        }
    }
}

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// The mode that saved the VM.
    pub(crate) mode: Mode,
    /// vCPUs.
    pub(crate) cpus: u32,
    /// Guest memory in bytes.
    pub(crate) memory: u64,
}

/// Why a file is not a snapshot this build can resume (one line each).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FileError {
    /// Shorter than a header, or than the header says.
    #[error("truncated: {0}")]
    Truncated(String),
    /// Not a snapshot file.
    #[error("not a snapshot file (bad magic)")]
    Magic,
    /// Another format version.
    #[error("format version {found}, this vmm reads version {FORMAT_VERSION}")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// A header field or section out of range.
    #[error("{0}")]
    Bad(String),
    /// The checksum does not match.
    #[error(
        "checksum mismatch (file {stored:#010x}, computed {computed:#010x}): the file is corrupted"
    )]
    Checksum {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the contents.
        computed: u32,
    },
    /// A section's payload does not decode.
    #[error("section {section}: {why}")]
    Payload {
        /// The section's name.
        section: &'static str,
        /// postcard's reason.
        why: String,
    },
}

/// One run of guest memory in a file: where it goes and where its bytes
/// are in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    /// Guest-physical address.
    pub(crate) gpa: u64,
    /// Offset of the bytes in the file.
    pub(crate) offset: usize,
    /// Length in bytes.
    pub(crate) len: usize,
}

/// A decoded file: the header, each state section's bytes, and the memory
/// runs (borrowed from the file).
#[derive(Debug)]
pub(crate) struct Sections<'a> {
    /// The header.
    pub(crate) header: Header,
    /// The bytes of each state section, by tag.
    payloads: [&'a [u8]; 6],
    /// The memory runs.
    pub(crate) runs: Vec<Run>,
}

impl Sections<'_> {
    /// Decodes the section `tag` as `T`.
    pub(crate) fn decode<T: DeserializeOwned>(&self, tag: Tag) -> Result<T, FileError> {
        let bytes = self.payloads[tag as usize - 1];
        let (value, rest) =
            postcard::take_from_bytes::<T>(bytes).map_err(|e| FileError::Payload {
                section: tag.name(),
                why: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(FileError::Payload {
                section: tag.name(),
                why: format!("{} bytes after the state", rest.len()),
            });
        }
        Ok(value)
    }

    /// The element count a section holding a sequence (postcard: a
    /// varint length first) starts with, read before any element is
    /// decoded: a decoded element may be far larger than the bytes it
    /// takes in the file (kvm-bindings zero-pads a short byte string to
    /// the whole structure), so a count is checked before it costs memory.
    pub(crate) fn count(&self, tag: Tag) -> Result<u64, FileError> {
        let bytes = self.payloads[tag as usize - 1];
        postcard::take_from_bytes::<u64>(bytes)
            .map(|(n, _)| n)
            .map_err(|e| FileError::Payload {
                section: tag.name(),
                why: format!("element count: {e}"),
            })
    }
}

fn mode_code(mode: Mode) -> u8 {
    match mode {
        Mode::Kernel => 0,
        Mode::Split => 1,
        Mode::User => 2,
    }
}

fn mode_of(code: u8) -> Option<Mode> {
    Mode::ALL.into_iter().find(|&m| mode_code(m) == code)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

/// The CRC of `bytes` with the header's CRC field taken as zero.
fn crc(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let split = CRC_OFFSET.min(bytes.len());
    h.update(&bytes[..split]);
    h.update(&[0u8; 4][..(bytes.len() - split).min(4)]);
    if let Some(rest) = bytes.get(CRC_OFFSET + 4..) {
        h.update(rest);
    }
    h.finalize()
}

/// Checks the header in the first bytes of a file whose length is `len`:
/// before the whole file is read, so a wrong file is refused without
/// reading (or allocating) more.
pub(crate) fn check_header(first: &[u8], len: u64) -> Result<Header, FileError> {
    if first.len() < HEADER_LEN || len < HEADER_LEN as u64 {
        return Err(FileError::Truncated(format!(
            "{len} bytes, shorter than the {HEADER_LEN}-byte header"
        )));
    }
    if first[..8] != MAGIC {
        return Err(FileError::Magic);
    }
    let version = u32_at(first, 8);
    if version != FORMAT_VERSION {
        return Err(FileError::Version { found: version });
    }
    let mode = mode_of(first[12])
        .ok_or_else(|| FileError::Bad(format!("irqchip mode code {} is unknown", first[12])))?;
    if first[13..16] != [0; 3] || u32_at(first, 44) != 0 {
        return Err(FileError::Bad("reserved header bytes are not zero".into()));
    }
    let cpus = u32_at(first, 16);
    if cpus == 0 || cpus as usize > irqconnect_abi::layout::MAX_CPUS {
        return Err(FileError::Bad(format!(
            "{cpus} vCPUs (1 to {} allowed)",
            irqconnect_abi::layout::MAX_CPUS
        )));
    }
    let memory = u64_at(first, 24);
    let mib = memory >> 20;
    if memory & ((1 << 20) - 1) != 0
        || !(crate::cli::MIN_RAM_MIB..=irqconnect_abi::layout::MAX_RAM_MIB).contains(&mib)
    {
        return Err(FileError::Bad(format!(
            "guest memory of {memory} bytes (whole MiB from {} to {} allowed)",
            crate::cli::MIN_RAM_MIB,
            irqconnect_abi::layout::MAX_RAM_MIB
        )));
    }
    let stated = u64_at(first, 32);
    if stated > memory.saturating_add(MAX_STATE_BYTES) {
        return Err(FileError::Bad(format!(
            "a stated length of {stated} bytes, more than memory plus {MAX_STATE_BYTES} bytes of state"
        )));
    }
    if len < stated {
        return Err(FileError::Truncated(format!(
            "{len} bytes, the header says {stated}"
        )));
    }
    if len > stated {
        return Err(FileError::Bad(format!(
            "{len} bytes, the header says {stated}: trailing data"
        )));
    }
    Ok(Header { mode, cpus, memory })
}

/// Decodes a whole file (see the module documentation for the checks).
pub(crate) fn decode(bytes: &[u8]) -> Result<Sections<'_>, FileError> {
    let header = check_header(bytes, bytes.len() as u64)?;
    let stored = u32_at(bytes, CRC_OFFSET);
    let computed = crc(bytes);
    if stored != computed {
        return Err(FileError::Checksum { stored, computed });
    }
    let count = u32_at(bytes, 20);
    let mut payloads: [Option<&[u8]>; 6] = [None; 6];
    let mut at = HEADER_LEN;
    for n in 0..count {
        let head = bytes.get(at..at + SECTION_HEADER_LEN).ok_or_else(|| {
            FileError::Truncated(format!("section {n} of {count} starts past the end"))
        })?;
        let tag = Tag::from_u32(u32_at(head, 0)).ok_or_else(|| {
            FileError::Bad(format!("section {n} has unknown tag {}", u32_at(head, 0)))
        })?;
        if u32_at(head, 4) != 0 {
            return Err(FileError::Bad(format!(
                "section {}: reserved bytes are not zero",
                tag.name()
            )));
        }
        let len = u64_at(head, 8);
        let start = at + SECTION_HEADER_LEN;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                FileError::Truncated(format!(
                    "section {} of {len} bytes runs past the end",
                    tag.name()
                ))
            })?;
        let slot = &mut payloads[tag as usize - 1];
        if slot.is_some() {
            return Err(FileError::Bad(format!(
                "section {} appears twice",
                tag.name()
            )));
        }
        *slot = Some(&bytes[start..end]);
        at = end;
    }
    if at != bytes.len() {
        return Err(FileError::Bad(format!(
            "{} bytes after the last section",
            bytes.len() - at
        )));
    }
    let mut found = [&bytes[..0]; 6];
    for tag in Tag::ALL {
        found[tag as usize - 1] = payloads[tag as usize - 1]
            .ok_or_else(|| FileError::Bad(format!("section {} is missing", tag.name())))?;
    }
    let memory_start = found[Tag::Memory as usize - 1].as_ptr() as usize - bytes.as_ptr() as usize;
    let runs = memory_runs(found[Tag::Memory as usize - 1], memory_start, header.memory)?;
    Ok(Sections {
        header,
        payloads: found,
        runs,
    })
}

/// The runs of a memory section that starts at file offset `base`.
fn memory_runs(section: &[u8], base: usize, memory: u64) -> Result<Vec<Run>, FileError> {
    let mut runs = Vec::new();
    let mut at = 0usize;
    let mut next_free = 0u64;
    while at < section.len() {
        let head = section.get(at..at + 16).ok_or_else(|| {
            FileError::Truncated("a memory run's header runs past the section".into())
        })?;
        let (gpa, len) = (u64_at(head, 0), u64_at(head, 8));
        let end = gpa.saturating_add(len);
        if gpa % PAGE != 0 || len == 0 || len % PAGE != 0 || gpa < next_free || end > memory {
            return Err(FileError::Bad(format!(
                "memory run at {gpa:#x} of {len:#x} bytes: not page-aligned, empty, out of order or past the memory size {memory:#x}"
            )));
        }
        let start = at + 16;
        let stop = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&s| s <= section.len())
            .ok_or_else(|| {
                FileError::Truncated(format!("memory run at {gpa:#x} runs past the section"))
            })?;
        runs.push(Run {
            gpa,
            offset: base + start,
            len: stop - start,
        });
        next_free = end;
        at = stop;
    }
    Ok(runs)
}

/// Builds a file: header, then the sections in order.
pub(crate) struct Writer {
    bytes: Vec<u8>,
    sections: u32,
}

impl Writer {
    /// A file for `header`.
    pub(crate) fn new(header: Header, capacity: usize) -> Self {
        let mut bytes = Vec::with_capacity(capacity.max(HEADER_LEN));
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&[mode_code(header.mode), 0, 0, 0]);
        bytes.extend_from_slice(&header.cpus.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&header.memory.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 16]);
        Self { bytes, sections: 0 }
    }

    fn begin(&mut self, tag: Tag) -> usize {
        self.bytes.extend_from_slice(&(tag as u32).to_le_bytes());
        self.bytes.extend_from_slice(&0u32.to_le_bytes());
        self.bytes.extend_from_slice(&0u64.to_le_bytes());
        self.sections += 1;
        self.bytes.len()
    }

    fn end(&mut self, start: usize) {
        let len = (self.bytes.len() - start) as u64;
        self.bytes[start - 8..start].copy_from_slice(&len.to_le_bytes());
    }

    /// A state section: `value`'s postcard encoding.
    pub(crate) fn state<T: Serialize>(&mut self, tag: Tag, value: &T) -> Result<(), String> {
        let start = self.begin(tag);
        let mut out = std::mem::take(&mut self.bytes);
        out = postcard::to_extend(value, out).map_err(|e| format!("encode {}: {e}", tag.name()))?;
        self.bytes = out;
        self.end(start);
        Ok(())
    }

    /// The memory section: `runs` of (guest-physical address, bytes).
    pub(crate) fn memory<'a>(&mut self, runs: impl IntoIterator<Item = (u64, &'a [u8])>) {
        let start = self.begin(Tag::Memory);
        for (gpa, data) in runs {
            self.bytes.extend_from_slice(&gpa.to_le_bytes());
            self.bytes
                .extend_from_slice(&(data.len() as u64).to_le_bytes());
            self.bytes.extend_from_slice(data);
        }
        self.end(start);
    }

    /// The finished file: section count, length and CRC filled in.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let sections = self.sections;
        self.bytes[20..24].copy_from_slice(&sections.to_le_bytes());
        let len = self.bytes.len() as u64;
        self.bytes[32..40].copy_from_slice(&len.to_le_bytes());
        let crc = crc(&self.bytes);
        self.bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        self.bytes
    }
}

/// Rewrites the CRC of `bytes` (a file whose checksum a test or fuzz
/// input broke on purpose), so decoding reaches the sections.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fix_checksum(bytes: &mut [u8]) {
    if bytes.len() >= HEADER_LEN {
        let crc = crc(bytes);
        bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(
            Header {
                mode: Mode::User,
                cpus: 2,
                memory: 4 << 20,
            },
            0,
        );
        for tag in [Tag::Meta, Tag::Vcpus, Tag::Chip, Tag::Devices, Tag::Pv] {
            w.state(tag, &(tag as u32, "x")).unwrap();
        }
        let page = [7u8; PAGE as usize];
        w.memory([(0x1000, &page[..]), (0x3000, &page[..])]);
        w.finish()
    }

    #[test]
    fn unit_written_file_decodes_with_its_runs() {
        let bytes = sample();
        let s = decode(&bytes).unwrap();
        assert_eq!(s.header.cpus, 2);
        assert_eq!(s.header.mode, Mode::User);
        assert_eq!(s.runs.len(), 2);
        let r = s.runs[1];
        assert_eq!((r.gpa, r.len), (0x3000, 4096));
        assert!(bytes[r.offset..r.offset + r.len].iter().all(|&b| b == 7));
        let (n, x): (u32, String) = s.decode(Tag::Pv).unwrap();
        assert_eq!((n, x.as_str()), (5, "x"));
    }

    #[test]
    fn unit_every_truncation_is_refused_without_panic() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).unwrap_err();
            assert!(matches!(err, FileError::Truncated(_)), "{len}: {err}");
        }
    }

    #[test]
    fn unit_a_flipped_byte_is_a_checksum_mismatch() {
        let mut bytes = sample();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x40;
        assert!(matches!(decode(&bytes), Err(FileError::Checksum { .. })));
    }

    #[test]
    fn unit_wrong_magic_version_and_sizes_are_named() {
        let mut b = sample();
        b[0] = b'X';
        assert_eq!(decode(&b).unwrap_err(), FileError::Magic);
        let mut b = sample();
        b[8] = 2;
        assert_eq!(decode(&b).unwrap_err(), FileError::Version { found: 2 });
        let mut b = sample();
        b[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode(&b).unwrap_err().to_string().contains("0 vCPUs"));
        let mut b = sample();
        b[24..32].copy_from_slice(&(3u64 << 40).to_le_bytes());
        assert!(decode(&b).unwrap_err().to_string().contains("guest memory"));
    }

    #[test]
    fn unit_a_run_past_memory_is_refused_even_with_a_good_checksum() {
        let mut b = sample();
        // The first run's address: header, 5 state sections, memory head.
        let s = decode(&b).unwrap();
        let at = s.runs[0].offset - 16;
        b[at..at + 8].copy_from_slice(&(4u64 << 20).to_le_bytes());
        fix_checksum(&mut b);
        let err = decode(&b).unwrap_err().to_string();
        assert!(err.contains("memory run"), "{err}");
    }

    #[test]
    fn unit_a_missing_section_is_named() {
        let mut w = Writer::new(
            Header {
                mode: Mode::Split,
                cpus: 1,
                memory: 2 << 20,
            },
            0,
        );
        w.state(Tag::Meta, &1u8).unwrap();
        let b = w.finish();
        assert_eq!(
            decode(&b).unwrap_err().to_string(),
            "section vcpus is missing"
        );
    }
}
