//! Replays the checked-in `kvm_differential` corpus
//! (`resources/fuzz-corpus/kvm_differential/`) through the harness the
//! cargo-fuzz target calls, against this machine's KVM. A missing or empty
//! corpus directory fails the test; so does a missing `/dev/kvm`, unless
//! `VMM_SKIP_KVM_TESTS=1`.
//!
//! The `seed-*` files are the hand-made inputs below, one per operation
//! kind (`seed_files_match_their_builders` checks they still are);
//! regenerate them with
//! `WRITE_FUZZ_SEEDS=1 cargo test -p irqchip-kvm --test corpus_replay seed_files`.
//! The other files are minimised campaign inputs and regressions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use irqchip::harness::corpus::{self, Seed};
use irqchip_kvm::differential::{self, POOL_IDS};

const TARGET: &str = "kvm_differential";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn corpus_replay_kvm_differential() {
    if !guest_image::require_kvm() {
        return;
    }
    if let Err(report) = corpus::replay(&workspace(), TARGET, differential::run) {
        panic!("{report}");
    }
}

#[test]
fn corpus_replay_kvm_differential_twice_is_reproducible() {
    // The harness reuses one VM per process; replaying the corpus a second
    // time, after every other input has run, must give the same verdicts.
    if !guest_image::require_kvm() {
        return;
    }
    for _ in 0..2 {
        if let Err(report) = corpus::replay(&workspace(), TARGET, differential::run) {
            panic!("{report}");
        }
    }
}

#[test]
fn regression_lowest_priority_beside_another_pin_with_the_same_vector() {
    // Two vCPUs, vCPU 0 xAPIC flat (LDR bit 0), vCPU 1 x2APIC (LDR 0x2);
    // pins 15 (logical 0x07) and 17 (logical 0x1a) level, lowest priority,
    // vector 0x1a, lines high, Remote IRR clear (nobody matched before).
    // A host entry write re-services both (N11): KVM gives pin 15 to vCPU
    // 0 and pin 17 to vCPU 1, the only APIC it reaches. The harness used to
    // credit both IRR changes to pin 15 and report a lowest-priority
    // message delivered twice (`regression-kvm-lowest-priority-beside-
    // another-pin-same-vector`, minimised from a one-hour campaign).
    if !guest_image::require_kvm() {
        return;
    }
    let input = [
        0x02, 0x00, 0x00, 0x03, 0x00, 0x04, 0xff, 0x01, 0x00, 0x00, 0x03, 0x01, 0x04, 0xff, 0x01,
        0xd8, 0xd8, 0x24, 0xff, 0xb9, 0x1a, 0x1a, 0x07, 0x3d, 0xb9, 0xb9, 0xb9, 0x1a, 0x1a, 0xff,
        0x41, 0xff, 0x03, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0xff, 0xff, 0x04, 0x01, 0x02,
        0x56,
    ];
    assert_eq!(
        std::fs::read(
            workspace()
                .join("resources/fuzz-corpus")
                .join(TARGET)
                .join("regression-kvm-lowest-priority-beside-another-pin-same-vector")
        )
        .unwrap(),
        input
    );
    assert_eq!(differential::run(&input), Ok(()));
}

#[test]
fn regression_lowest_priority_hash_beside_an_apic_without_member_bits() {
    // Three vCPUs in the xAPIC cluster model: vCPU 0 software-disabled,
    // vCPU 1 LDR 0x02 (cluster 0, member bit 1), vCPU 2 LDR 0x50 (cluster
    // 5, no member bit). An MSI, lowest priority to logical 0x07, vector
    // 80: KVM's map (which skips vCPU 2) hashes it to bit 2, a hole, and
    // drops it (N3). The harness took vCPU 2's empty member bits for a
    // reason KVM would give up its map and reported the drop
    // (`regression-kvm-hash-beside-an-apic-without-member-bits`, minimised
    // from the second one-hour campaign).
    if !guest_image::require_kvm() {
        return;
    }
    let input = [
        0x04, 0x00, 0x01, 0x02, 0x03, 0x01, 0x04, 0xff, 0x01, 0x00, 0x00, 0x03, 0x02, 0x04, 0xff,
        0x01, 0x00, 0x01, 0x03, 0x80, 0x80, 0x76, 0x76, 0x76, 0x76, 0x76, 0x76, 0x76, 0x76, 0x04,
        0xff, 0xff, 0x03, 0x01, 0x02, 0x02, 0x00, 0x00, 0x02, 0x03, 0x02, 0x02, 0x00, 0x00, 0x04,
        0x50, 0x02, 0x07, 0x00, 0x00, 0x00, 0x04, 0x50, 0x01,
    ];
    assert_eq!(
        std::fs::read(
            workspace()
                .join("resources/fuzz-corpus")
                .join(TARGET)
                .join("regression-kvm-hash-beside-an-apic-without-member-bits")
        )
        .unwrap(),
        input
    );
    assert_eq!(differential::run(&input), Ok(()));
}

#[test]
fn seeds_pass() {
    if !guest_image::require_kvm() {
        return;
    }
    if let Err(what) = corpus::seeds_pass(&seeds()) {
        panic!("{what}");
    }
}

#[test]
fn seed_files_match_their_builders() {
    if let Err(what) = corpus::seed_files_match(&workspace(), &seeds()) {
        panic!("{what}");
    }
}

// ---------------------------------------------------------------------------
// Hand-made seeds (input format: `irqchip_kvm::differential`)
// ---------------------------------------------------------------------------

/// Bytes of an input: the VM and vCPU choice, then operations.
struct Bytes(Vec<u8>);

/// Pool index of vCPU ID `id`.
fn pool(id: u32) -> u8 {
    POOL_IDS.iter().position(|&p| p == id).unwrap() as u8
}

impl Bytes {
    /// `ids` (vCPU IDs from `POOL_IDS`), in the VM with or without the
    /// x2APIC API.
    fn new(x2apic_api: bool, ids: &[u32]) -> Self {
        let mut data = vec![u8::from(x2apic_api) | ((ids.len() as u8 - 1) << 1)];
        data.extend(ids.iter().map(|&id| pool(id)));
        Self(data)
    }
    fn b(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn u32(self, v: u32) -> Self {
        self.b(&v.to_le_bytes())
    }
    fn line(self, pin: u8, level: bool) -> Self {
        self.b(&[0, pin, u8::from(level)])
    }
    /// Redirection entry: `fields` (delivery mode bits 0..2, [`RTE_LOGICAL`],
    /// [`RTE_LEVEL`], [`RTE_MASKED`]), vector, destination.
    fn rte(self, pin: u8, fields: u16, vector: u8, dest: u8) -> Self {
        self.b(&[1, pin])
            .b(&fields.to_le_bytes())
            .b(&[vector, dest])
    }
    /// MSI: `flags` bit 2 logical, bit 3 redirection hint; `mode` bits 0..2
    /// delivery mode, bit 6 assert, bit 7 level.
    fn msi(self, destination: u32, flags: u8, vector: u8, mode: u8) -> Self {
        self.b(&[2]).u32(destination).b(&[flags, vector, mode])
    }
    /// Register `which` (0 ID, 1 TPR, 2 LDR, 3 DFR, 4 SVR) of `cpu`.
    fn reg(self, cpu: u8, which: u8, value: u32) -> Self {
        self.b(&[3, cpu, which]).u32(value)
    }
    fn enable(self, cpu: u8) -> Self {
        self.reg(cpu, 4, 0x1ff)
    }
    /// IA32_APIC_BASE of `cpu`: 0 disabled, 1 xAPIC, 2 x2APIC.
    fn mode(self, cpu: u8, mode: u8) -> Self {
        self.b(&[4, cpu, mode])
    }
}

const RTE_LOGICAL: u16 = 0x8;
const RTE_LEVEL: u16 = 0x20;
const RTE_MASKED: u16 = 0x40;
const FIXED: u8 = 0;
const LOWEST: u8 = 1;
const NMI: u8 = 4;
const INIT: u8 = 5;
const LOGICAL: u8 = 0b100;
const HINT: u8 = 0b1000;
const ASSERT: u8 = 0x40;
const LEVEL: u8 = 0x80;

fn seeds() -> Vec<Seed> {
    let named: Vec<(&str, Vec<u8>)> = vec![
        (
            "line-edge-fixed-physical",
            Bytes::new(false, &[0, 1])
                .enable(1)
                .rte(3, u16::from(FIXED), 0x41, 1)
                .line(3, true)
                .line(3, false)
                .line(3, true)
                .0,
        ),
        (
            "line-level-remote-irr-coalesced",
            Bytes::new(false, &[0])
                .enable(0)
                .rte(9, u16::from(FIXED) | RTE_LEVEL, 0x61, 0)
                .line(9, true)
                .line(9, false)
                .line(9, true)
                .0,
        ),
        (
            "rte-unmask-level-line-high",
            Bytes::new(false, &[0, 2])
                .enable(0)
                .enable(1)
                .rte(10, u16::from(FIXED) | RTE_LEVEL | RTE_MASKED, 0x71, 2)
                .line(10, true)
                .rte(10, u16::from(FIXED) | RTE_LEVEL, 0x71, 2)
                .0,
        ),
        (
            "rte-level-to-nobody-then-enable",
            Bytes::new(false, &[0, 1])
                .rte(11, u16::from(FIXED) | RTE_LEVEL, 0x52, 1)
                .line(11, true)
                .enable(1)
                .rte(4, u16::from(FIXED) | RTE_MASKED, 0x30, 0)
                .0,
        ),
        (
            "msi-fixed-physical-level",
            Bytes::new(false, &[0, 3])
                .enable(1)
                .msi(3, 0, 0x45, FIXED | LEVEL | ASSERT)
                .msi(3, 0, 0x46, FIXED)
                .0,
        ),
        (
            "msi-lowest-priority-logical-flat",
            Bytes::new(false, &[0, 1, 2])
                .enable(0)
                .enable(1)
                .enable(2)
                .reg(0, 2, 0x0100_0000)
                .reg(1, 2, 0x0200_0000)
                .reg(2, 2, 0x0400_0000)
                .msi(0x07, LOGICAL, 0x50, LOWEST)
                .msi(0x07, LOGICAL | HINT, 0x51, FIXED)
                .msi(0x06, LOGICAL, 0x53, LOWEST | LEVEL | ASSERT)
                .0,
        ),
        (
            "msi-lowest-priority-hash-hole",
            Bytes::new(false, &[0])
                .enable(0)
                .reg(0, 2, 0x0100_0000)
                .msi(0x03, LOGICAL, 0x41, LOWEST)
                .msi(0x03, LOGICAL, 0x42, LOWEST)
                .0,
        ),
        (
            "register-cluster-ldr-dfr-tpr",
            Bytes::new(false, &[0, 1])
                .enable(0)
                .enable(1)
                .reg(0, 3, 0x0fff_ffff)
                .reg(1, 3, 0x0fff_ffff)
                .reg(0, 2, 0x1100_0000)
                .reg(1, 2, 0x1200_0000)
                .reg(1, 1, 0x40)
                .reg(0, 0, 0x07)
                .msi(0x13, LOGICAL, 0x60, FIXED)
                .msi(0x07, 0, 0x61, FIXED)
                .0,
        ),
        (
            "mode-x2apic-32bit-id-msi",
            Bytes::new(true, &[0x101, 0x12])
                .mode(0, 2)
                .mode(1, 2)
                .enable(0)
                .enable(1)
                .msi(0x101, 0, 0x70, FIXED)
                .msi(0x0010_0002, LOGICAL, 0x71, FIXED)
                .msi(0x0001_0004, LOGICAL, 0x72, FIXED)
                .0,
        ),
        (
            "mode-disable-reenable",
            Bytes::new(false, &[0, 1])
                .enable(1)
                .msi(1, 0, 0x80, FIXED)
                .mode(1, 0)
                .msi(1, 0, 0x81, FIXED)
                .mode(1, 1)
                .mode(1, 2)
                .mode(1, 1)
                .mode(1, 0)
                .0,
        ),
        (
            "x2apic-broadcast-quirk-ioapic",
            Bytes::new(false, &[0, 0xff, 2])
                .mode(0, 2)
                .mode(1, 2)
                .enable(0)
                .enable(1)
                .enable(2)
                .rte(5, u16::from(FIXED), 0x90, 0xff)
                .line(5, true)
                .rte(6, u16::from(FIXED) | RTE_LOGICAL, 0x91, 0xff)
                .line(6, true)
                .0,
        ),
        (
            "msi-nmi-init-physical",
            Bytes::new(false, &[0, 1])
                .enable(0)
                .reg(0, 1, 0x20)
                .msi(0, 0, 0, NMI)
                .msi(1, 0, 0, NMI)
                .msi(0, 0, 0, INIT)
                .0,
        ),
    ];
    named
        .into_iter()
        .map(|(name, data)| Seed {
            target: TARGET,
            name: name.to_string(),
            data,
            run: differential::run,
        })
        .collect()
}
