//! CPUID per vCPU: KVM's supported set with our topology.
//!
//! One package, one thread per core, `cpus` cores; vCPU `i` has APIC ID `i`.
//! The interrupt controller's bits (APIC IDs, x2APIC, TSC-deadline) are the
//! chip's to write (`irqchip_kvm::cpuid::apply`). The topology leaves
//! written here (SDM Vol. 2A "CPUID"; AMD APM Vol. 3 appendix E):
//! - 1: EBX[23:16] addressable IDs, EDX.HTT, ECX.hypervisor;
//! - 4 (Intel): cores per package in EAX[31:26], L3 sharing in EAX[25:14];
//! - 0xB (always; the max basic leaf is raised to 0xB if lower) and 0x1F
//!   (when the max basic leaf reaches it): SMT level (1 thread), core level
//!   (`cpus` cores);
//! - 0x8000_0001 ECX.CmpLegacy, 0x8000_0008 ECX (NC, ApicIdCoreIdSize) and
//!   0x8000_001E (extended APIC ID) on AMD, when present.

use irqchip_kvm::cpuid::{self as chip_cpuid, Features};
use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

use crate::error::{Error, Result};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: EBX[23:16] is valid (multi-threading / multi-core).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: CmpLegacy (AMD).
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0xB/0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The topology-relevant settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuidConfig {
    /// vCPUs in the VM.
    pub(crate) cpus: u32,
    /// What the interrupt controller offers.
    pub(crate) features: Features,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    Amd,
    Other,
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    match entries.iter().find(|e| e.function == 0) {
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e) => {
            Vendor::Intel
        }
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163) => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_leaf(function: u32, cpus: u32) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        ..Default::default()
    };
    [
        // SMT: one thread per core, no bits to shift.
        entry(0, 0, 1, LEVEL_TYPE_SMT << 8),
        // Core: shift past the core ID bits to reach the package ID.
        entry(1, id_bits(cpus), cpus, (LEVEL_TYPE_CORE << 8) | 1),
        // Terminator: level type 0 (invalid).
        entry(2, 0, 0, 2),
    ]
}

/// The CPUID entries of vCPU `index` (APIC ID `index`) from KVM's supported set.
pub(crate) fn vcpu_entries(
    supported: &[kvm_cpuid_entry2],
    index: u32,
    cfg: CpuidConfig,
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = index;
    let vendor = vendor(supported);
    let max_basic = supported
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let core_bits = id_bits(cfg.cpus);
    let addressable = (1u32 << core_bits).min(255);

    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();
    for e in &mut out {
        match e.function {
            0 => e.eax = e.eax.max(0xb),
            1 => {
                e.ebx = (e.ebx & 0xff00_ffff) | (addressable << 16);
                if cfg.cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                e.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            4 if vendor == Vendor::Intel => {
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 {
                    (1u32 << core_bits) - 1
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | (((1u32 << core_bits) - 1) << 26);
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if cfg.cpus > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (cfg.cpus - 1);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // one thread per core: core ID = APIC ID
                e.ecx = 0; // node 0, one node per package
            }
            _ => {}
        }
    }
    for function in [0xb, 0x1f] {
        if function == 0xb || max_basic >= function {
            out.extend(topology_leaf(function, cfg.cpus));
        }
    }
    chip_cpuid::apply(&mut out, apic_id, cfg.features);
    out
}

/// [`vcpu_entries`] as the `CpuId` KVM takes.
pub(crate) fn vcpu_cpuid(supported: &CpuId, index: u32, cfg: CpuidConfig) -> Result<CpuId> {
    let entries = vcpu_entries(supported.as_slice(), index, cfg);
    CpuId::from_entries(&entries).map_err(|e| Error::Host {
        op: "build CPUID",
        source: std::io::Error::other(format!("{e:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(1, 0, 0x806f8, 0xff0a_0800, chip_cpuid::LEAF1_ECX_X2APIC, 0),
            leaf(4, 0, 0x121, 0, 0, 0),
            leaf(4, 3, 0x163, 0, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 7),
        ]
    }

    const CFG: CpuidConfig = CpuidConfig {
        cpus: 4,
        features: Features {
            x2apic: true,
            tsc_deadline: true,
            ext_dest_id: true,
        },
    };

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(255), 8);
    }

    #[test]
    fn leaf1_carries_apic_id_and_feature_bits() {
        let e = vcpu_entries(&intel(), 3, CFG);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & chip_cpuid::LEAF1_ECX_X2APIC, 0);
        assert_ne!(l1.ecx & chip_cpuid::LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let off = vcpu_entries(
            &intel(),
            0,
            CpuidConfig {
                cpus: 1,
                features: Features::default(),
            },
        );
        let l1 = find(&off, 1, 0);
        assert_eq!(
            l1.ecx & (chip_cpuid::LEAF1_ECX_X2APIC | chip_cpuid::LEAF1_ECX_TSC_DEADLINE),
            0
        );
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn leaf_b_and_1f_describe_cores_and_x2apic_id() {
        let e = vcpu_entries(&intel(), 2, CFG);
        for f in [0xb, 0x1f] {
            let smt = find(&e, f, 0);
            let core = find(&e, f, 1);
            let end = find(&e, f, 2);
            assert_eq!(
                (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff),
                (0, 1, LEVEL_TYPE_SMT)
            );
            assert_eq!(
                (core.eax, core.ebx, (core.ecx >> 8) & 0xff),
                (2, 4, LEVEL_TYPE_CORE)
            );
            assert_eq!((end.ecx >> 8) & 0xff, 0);
            assert_eq!(smt.edx, 2);
            assert_eq!(core.edx, 2);
        }
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
    }

    #[test]
    fn intel_leaf4_counts_cores() {
        let e = vcpu_entries(&intel(), 0, CFG);
        assert_eq!(find(&e, 4, 0).eax >> 26, 3);
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&e, 4, 3).eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn amd_extended_leaves_follow_topology() {
        let amd = vec![
            leaf(0, 0, 0xa, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            leaf(1, 0, 0, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 0, 0, 0),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
            leaf(0x8000_001e, 0, 9, 9, 9, 0),
        ];
        let e = vcpu_entries(&amd, 5, CpuidConfig { cpus: 6, ..CFG });
        assert_ne!(find(&e, 0x8000_0001, 0).ecx & EXT1_ECX_CMP_LEGACY, 0);
        assert_eq!(find(&e, 0x8000_0008, 0).ecx, (3 << 12) | 5);
        assert_eq!(find(&e, 0x8000_001e, 0).eax, 5);
        // Max basic leaf 0xa: raised to 0xB, which is added; no 0x1F.
        assert_eq!(find(&e, 0, 0).eax, 0xb);
        assert_eq!(find(&e, 0xb, 1).edx, 5);
        assert!(e.iter().all(|x| x.function != 0x1f));
    }
}
