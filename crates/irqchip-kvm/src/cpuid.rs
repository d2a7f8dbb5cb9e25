//! The CPUID bits that describe the interrupt controller to the guest.
//!
//! A VMM builds each vCPU's CPUID from KVM's supported set and its own
//! topology; [`apply`] then writes what belongs to the chip (SDM Vol. 2A
//! "CPUID"):
//!
//! - leaf 1 EBX bits 31..24: the initial (xAPIC) APIC ID;
//! - leaf 1 EDX bit 9: an on-chip APIC;
//! - leaf 1 ECX bit 21: x2APIC, as the chip was built ([`Features::x2apic`]);
//! - leaf 1 ECX bit 24: TSC-deadline mode of the LAPIC timer, where the chip
//!   has it ([`Features::tsc_deadline`]);
//! - leaves 0xB and 0x1F, every sub-leaf present: EDX = the x2APIC ID;
//! - KVM's feature leaf 0x4000_0001, when present, EAX bit 15
//!   (`KVM_FEATURE_MSI_EXT_DEST_ID`): IOAPIC entries and MSI addresses carry
//!   destination bits 8..14 ([`Features::ext_dest_id`]; the leaf is KVM's
//!   paravirtual CPUID, `Documentation/virt/kvm/x86/cpuid.rst`).

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: x2APIC.
pub const LEAF1_ECX_X2APIC: u32 = 1 << 21;
/// Leaf 1 ECX: TSC-deadline mode of the LAPIC timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: on-chip APIC.
pub const LEAF1_EDX_APIC: u32 = 1 << 9;
/// Leaf 1 EBX: the initial APIC ID's position (bits 24..31).
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
/// KVM's paravirtual feature leaf (`KVM_CPUID_FEATURES`).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// `KVM_CPUID_FEATURES` EAX: `KVM_FEATURE_MSI_EXT_DEST_ID`, the extended
/// destination ID in IOAPIC entries (bits 49..55) and MSI addresses (bits
/// 5..11).
pub const KVM_FEATURE_MSI_EXT_DEST_ID: u32 = 1 << 15;

/// What the chip offers the guest ([`crate::Irqchip::cpuid_features`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// The local APICs accept x2APIC mode.
    pub x2apic: bool,
    /// The LAPIC timer has TSC-deadline mode (kernel and split: KVM's
    /// `KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
    /// Destinations wider than 8 bits travel as the extended destination
    /// ID (split and user: our IOAPIC decodes it; `Mode::msi_format`).
    pub ext_dest_id: bool,
}

/// Writes the chip's bits (see the module documentation) into `entries`,
/// the CPUID of the vCPU whose APIC ID is `apic_id`.
///
/// # Example
///
/// ```
/// use irqchip_kvm::cpuid::{self, Features, LEAF1_ECX_X2APIC};
/// use kvm_bindings::kvm_cpuid_entry2;
///
/// let mut entries = [kvm_cpuid_entry2 { function: 1, ..Default::default() }];
/// let features = Features { x2apic: true, tsc_deadline: false, ext_dest_id: false };
/// cpuid::apply(&mut entries, 3, features);
/// assert_eq!(entries[0].ebx >> 24, 3);
/// assert_ne!(entries[0].ecx & LEAF1_ECX_X2APIC, 0);
/// ```
pub fn apply(entries: &mut [kvm_cpuid_entry2], apic_id: u32, features: Features) {
    for e in entries {
        match e.function {
            1 => {
                e.ebx = (e.ebx & !(0xff << LEAF1_EBX_APIC_ID_SHIFT))
                    | ((apic_id & 0xff) << LEAF1_EBX_APIC_ID_SHIFT);
                e.edx |= LEAF1_EDX_APIC;
                set_bit(&mut e.ecx, LEAF1_ECX_X2APIC, features.x2apic);
                set_bit(&mut e.ecx, LEAF1_ECX_TSC_DEADLINE, features.tsc_deadline);
            }
            0xb | 0x1f => e.edx = apic_id,
            KVM_CPUID_FEATURES => {
                set_bit(
                    &mut e.eax,
                    KVM_FEATURE_MSI_EXT_DEST_ID,
                    features.ext_dest_id,
                );
            }
            _ => {}
        }
    }
}

/// The guest physical-address width, `CPUID.80000008H:EAX[7:0]`; 36 bits
/// (the architectural minimum with PAE) when the leaf is missing or zero.
/// User mode sizes IA32_APIC_BASE's base field with it
/// ([`crate::IrqchipBuilder::phys_addr_bits`]).
pub fn phys_addr_bits(entries: &[kvm_cpuid_entry2]) -> u8 {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|&bits| bits != 0)
        .unwrap_or(36)
}

fn set_bit(reg: &mut u32, bit: u32, on: bool) {
    if on {
        *reg |= bit;
    } else {
        *reg &= !bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x00ab_cdef,
            ecx: LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE,
            ..Default::default()
        }
    }

    #[test]
    fn unit_apply_sets_apic_id_and_feature_bits_keeps_the_rest() {
        let mut e = [
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0x1f, 2),
            leaf(7, 0),
        ];

        apply(&mut e, 0x1_0005, Features::default());

        assert_eq!(e[0].ebx, 0x05ab_cdef, "8-bit initial APIC ID, rest kept");
        assert_eq!(e[0].ecx & (LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE), 0);
        assert_ne!(e[0].edx & LEAF1_EDX_APIC, 0);
        assert!(e[1..4].iter().all(|l| l.edx == 0x1_0005), "x2APIC ID");
        assert_eq!(e[4].edx, 0);
    }

    #[test]
    fn unit_apply_offers_x2apic_and_tsc_deadline_when_asked() {
        let mut e = [kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        }];

        apply(
            &mut e,
            0,
            Features {
                x2apic: true,
                tsc_deadline: true,
                ext_dest_id: false,
            },
        );

        assert_eq!(
            e[0].ecx & (LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE),
            LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE
        );
    }

    #[test]
    fn unit_phys_addr_bits_from_leaf_80000008_or_36() {
        let mut e = leaf(0x8000_0008, 0);
        e.eax = 0x3027;
        assert_eq!(phys_addr_bits(&[e]), 0x27);
        e.eax = 0;
        assert_eq!(phys_addr_bits(&[e]), 36);
        assert_eq!(phys_addr_bits(&[]), 36);
    }

    #[test]
    fn unit_apply_offers_the_extended_destination_id_in_kvms_feature_leaf() {
        let mut e = [leaf(KVM_CPUID_FEATURES, 0), leaf(1, 0)];
        e[0].eax = 1;
        let on = Features {
            ext_dest_id: true,
            ..Features::default()
        };

        apply(&mut e, 0, on);
        assert_eq!(e[0].eax, 1 | KVM_FEATURE_MSI_EXT_DEST_ID, "other bits kept");
        apply(&mut e, 0, Features::default());
        assert_eq!(e[0].eax, 1);
    }
}
