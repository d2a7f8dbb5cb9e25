//! Platform facts the VMM hands the service at construction: processors,
//! their APIC IDs, which are online, the irqchip mode, x2APIC, the limits;
//! and what follows from them: the processor groups and how wide a route's
//! destination is.

use irqconnect_abi::layout::MAX_CPUS;
use irqconnect_abi::pv::{GROUP_SIZE, PLATFORM_MAX_CPUS, irqchip_mode, platform_flags};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::processors::ProcessorSet;

/// Default VM-wide quota of interrupt objects (one object per processor of a
/// connection's effective mask). Eight devices on eight processors fill it.
pub const DEFAULT_OBJECT_QUOTA: u32 = 64;
/// Largest quota accepted: bounds the registry's memory.
pub const MAX_OBJECT_QUOTA: u32 = 1 << 20;
/// Storm-guard threshold [`PlatformFacts`] report when none is given: the
/// IOAPIC model's own default. A VMM reports the threshold its IOAPIC
/// really uses (this project's `vmm` takes it from its chip).
pub const DEFAULT_STORM_THRESHOLD: u32 = irqchip::ioapic::spec::DEFAULT_STORM_THRESHOLD;

/// Processors a KAFFINITY can name: bits 0..63.
pub const AFFINITY_BITS: u32 = u64::BITS;

/// The irqchip mode the VMM runs (`vmm --irqchip`): the models crate's
/// [`irqchip::Mode`].
pub use irqchip::Mode as IrqchipMode;

/// The value of `QueryPlatform::irqchip_mode` for `mode`.
pub const fn irqchip_mode_to_abi(mode: IrqchipMode) -> u8 {
    match mode {
        IrqchipMode::Kernel => irqchip_mode::KERNEL,
        IrqchipMode::Split => irqchip_mode::SPLIT,
        IrqchipMode::User => irqchip_mode::USER,
    }
}

/// What the VMM knows about the machine, before validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformFacts {
    /// Number of processors (vCPUs), 1..=255.
    pub cpu_count: u32,
    /// Online processors of group 0 (bits 0..63). Processors 64 and up are
    /// online when present.
    pub online_mask: u64,
    /// APIC ID of processor `i` at index `i`.
    pub apic_ids: Vec<u32>,
    /// The irqchip mode.
    #[serde(default)]
    pub irqchip_mode: IrqchipMode,
    /// Whether the vCPUs offer x2APIC.
    #[serde(default)]
    pub x2apic: bool,
    /// Storm-guard threshold the VMM applies (reported, not enforced here).
    #[serde(default = "default_storm_threshold")]
    pub storm_threshold: u32,
}

const fn default_storm_threshold() -> u32 {
    DEFAULT_STORM_THRESHOLD
}

impl PlatformFacts {
    /// `cpu_count` processors, all online, APIC ID = index, kernel irqchip,
    /// no x2APIC, the default storm threshold.
    pub fn uniform(cpu_count: u32) -> Self {
        Self {
            cpu_count,
            online_mask: present_mask(cpu_count),
            apic_ids: (0..cpu_count).collect(),
            irqchip_mode: IrqchipMode::Kernel,
            x2apic: false,
            storm_threshold: DEFAULT_STORM_THRESHOLD,
        }
    }
}

/// The mask of processors `0..cpu_count` a KAFFINITY can name.
pub const fn present_mask(cpu_count: u32) -> u64 {
    if cpu_count >= AFFINITY_BITS {
        u64::MAX
    } else {
        (1u64 << cpu_count) - 1
    }
}

/// Validated platform facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    facts: PlatformFacts,
}

impl Platform {
    /// Validates `facts`: 1..=255 processors, one distinct APIC ID each, a
    /// non-empty online mask naming only present processors.
    pub fn new(facts: PlatformFacts) -> Result<Self, Error> {
        let max = MAX_CPUS.min(PLATFORM_MAX_CPUS) as u32;
        if facts.cpu_count == 0 || facts.cpu_count > max {
            return Err(Error::CpuCountOutOfRange {
                count: facts.cpu_count,
                max,
            });
        }
        if facts.apic_ids.len() != facts.cpu_count as usize {
            return Err(Error::ApicIdCount {
                expected: facts.cpu_count,
                got: facts.apic_ids.len(),
            });
        }
        let mut sorted = facts.apic_ids.clone();
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(Error::DuplicateApicId { apic_id: pair[0] });
        }
        if facts.online_mask == 0 || facts.online_mask & !present_mask(facts.cpu_count) != 0 {
            return Err(Error::OnlineMaskInvalid {
                mask: facts.online_mask,
            });
        }
        Ok(Self { facts })
    }

    /// [`PlatformFacts::uniform`], validated.
    pub fn uniform(cpu_count: u32) -> Result<Self, Error> {
        Self::new(PlatformFacts::uniform(cpu_count))
    }

    /// The facts this platform was built from.
    pub fn facts(&self) -> &PlatformFacts {
        &self.facts
    }

    /// Number of processors.
    pub fn cpu_count(&self) -> u32 {
        self.facts.cpu_count
    }

    /// Online processors of group 0 (what a classic KAFFINITY names).
    pub fn online_mask(&self) -> u64 {
        self.facts.online_mask
    }

    /// Every processor the platform has.
    pub fn present(&self) -> ProcessorSet {
        ProcessorSet::first_n(self.facts.cpu_count)
    }

    /// Every online processor: group 0's online mask, and the processors
    /// of the other groups.
    pub fn online(&self) -> ProcessorSet {
        let above = self.present() - ProcessorSet::of_group(0, u64::MAX);
        ProcessorSet::of_group(0, self.facts.online_mask) | above
    }

    /// Processor groups: the processors in groups of 64, the last one
    /// possibly partial (`KeQueryActiveGroupCount`).
    pub fn group_count(&self) -> u16 {
        self.facts.cpu_count.div_ceil(GROUP_SIZE as u32) as u16
    }

    /// Processors in `group` (`KeQueryActiveProcessorCountEx`); 0 for a
    /// group the platform lacks.
    pub fn group_size(&self, group: u16) -> u32 {
        let first = u32::from(group) * GROUP_SIZE as u32;
        self.facts
            .cpu_count
            .saturating_sub(first)
            .min(GROUP_SIZE as u32)
    }

    /// The processors of `group` the platform has (bit `b` = processor
    /// `64 * group + b`).
    pub fn group_present(&self, group: u16) -> u64 {
        self.present().group_mask(group)
    }

    /// The online processors of `group`.
    pub fn group_online(&self, group: u16) -> u64 {
        self.online().group_mask(group)
    }

    /// How destinations wider than 8 bits travel in the IOAPIC entries and
    /// MSI addresses of this platform (the irqchip mode's,
    /// [`irqchip::Mode::msi_format`]).
    pub fn msi_format(&self) -> irqchip::msi::MsiFormat {
        self.facts.irqchip_mode.msi_format()
    }

    /// Bits of a route's destination ID: 8, or 15 with the extended
    /// destination ID.
    pub fn destination_bits(&self) -> u32 {
        self.msi_format().destination_bits()
    }

    /// APIC ID of processor `index`.
    pub fn apic_id(&self, index: u32) -> Option<u32> {
        self.facts.apic_ids.get(index as usize).copied()
    }

    /// APIC IDs in processor order.
    pub fn apic_ids(&self) -> &[u32] {
        &self.facts.apic_ids
    }

    /// The irqchip mode.
    pub fn irqchip_mode(&self) -> IrqchipMode {
        self.facts.irqchip_mode
    }

    /// Whether the vCPUs offer x2APIC.
    pub fn x2apic(&self) -> bool {
        self.facts.x2apic
    }

    /// The storm-guard threshold.
    pub fn storm_threshold(&self) -> u32 {
        self.facts.storm_threshold
    }

    /// `QueryPlatform::flags`.
    pub fn abi_flags(&self) -> u32 {
        let x2apic = if self.facts.x2apic {
            platform_flags::X2APIC
        } else {
            0
        };
        let ext_dest = if self.destination_bits() > 8 {
            platform_flags::MSI_EXT_DEST_ID
        } else {
            0
        };
        x2apic | ext_dest | platform_flags::LOGICAL_FLAT_BY_INDEX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_uniform_four_cpus_all_online() {
        let p = Platform::uniform(4);
        assert_eq!(p.as_ref().map(Platform::online_mask), Ok(0b1111));
        assert_eq!(
            p.as_ref().map(|p| p.apic_ids().to_vec()),
            Ok(vec![0, 1, 2, 3])
        );
    }

    #[test]
    fn platform_more_than_64_cpus_mask_saturates() {
        let p = Platform::uniform(100);
        assert_eq!(p.map(|p| p.online_mask()), Ok(u64::MAX));
    }

    #[test]
    fn platform_groups_of_64_and_online_above_group_0() {
        let mut facts = PlatformFacts::uniform(130);
        facts.online_mask = 0b110;
        let p = Platform::new(facts).unwrap();
        assert_eq!(p.group_count(), 3);
        assert_eq!(
            (
                p.group_size(0),
                p.group_size(1),
                p.group_size(2),
                p.group_size(3)
            ),
            (64, 64, 2, 0)
        );
        assert_eq!(p.group_online(0), 0b110);
        assert_eq!(p.group_online(1), u64::MAX);
        assert_eq!(p.group_online(2), 0b11);
        assert_eq!(p.online().len(), 2 + 64 + 2);
        assert_eq!(Platform::uniform(64).unwrap().group_count(), 1);
        assert_eq!(Platform::uniform(65).unwrap().group_count(), 2);
    }

    #[test]
    fn platform_destination_bits_follow_the_irqchip_mode() {
        let mut facts = PlatformFacts::uniform(4);
        assert_eq!(Platform::new(facts.clone()).unwrap().destination_bits(), 8);
        facts.irqchip_mode = IrqchipMode::Split;
        let split = Platform::new(facts).unwrap();
        assert_eq!(split.destination_bits(), 15);
        assert_ne!(split.abi_flags() & platform_flags::MSI_EXT_DEST_ID, 0);
    }

    #[test]
    fn platform_zero_cpus_rejected() {
        assert_eq!(
            Platform::uniform(0),
            Err(Error::CpuCountOutOfRange { count: 0, max: 255 })
        );
        assert!(matches!(
            Platform::uniform(256),
            Err(Error::CpuCountOutOfRange { .. })
        ));
    }

    #[test]
    fn platform_online_mask_naming_absent_cpu_rejected() {
        let mut facts = PlatformFacts::uniform(2);
        facts.online_mask = 0b100;
        assert_eq!(
            Platform::new(facts),
            Err(Error::OnlineMaskInvalid { mask: 0b100 })
        );
    }

    #[test]
    fn platform_duplicate_apic_id_rejected() {
        let mut facts = PlatformFacts::uniform(3);
        facts.apic_ids = vec![0, 2, 2];
        assert_eq!(
            Platform::new(facts),
            Err(Error::DuplicateApicId { apic_id: 2 })
        );
        let mut facts = PlatformFacts::uniform(3);
        facts.apic_ids = vec![0, 1];
        assert!(matches!(
            Platform::new(facts),
            Err(Error::ApicIdCount { .. })
        ));
    }
}
