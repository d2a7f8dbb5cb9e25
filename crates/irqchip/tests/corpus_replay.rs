//! Replays the checked-in fuzz corpora (`resources/fuzz-corpus/TARGET/`)
//! through the very harness functions the cargo-fuzz targets call, on the
//! stable toolchain. A missing or empty corpus directory fails the test.
//!
//! The `seed-*` files are the hand-made inputs below (`seed_files_match_their_builders`
//! checks they still are); regenerate them with
//! `WRITE_FUZZ_SEEDS=1 cargo test -p irqchip --test corpus_replay seed_files`.
//! The other files are minimised campaign inputs and crash regressions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use irqchip::harness::corpus::{self, Harness, Seed};

/// Named seeds of one target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

/// The workspace the corpora live in.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Replays `target`'s corpus (see `irqchip::harness::corpus::replay`).
fn replay(target: &str, run: Harness) {
    if let Err(report) = corpus::replay(&workspace(), target, run) {
        panic!("{report}");
    }
}

#[test]
fn corpus_replay_ioapic() {
    replay("ioapic", irqchip::harness::ioapic::run);
}

#[test]
fn corpus_replay_lapic() {
    replay("lapic", irqchip::harness::lapic);
}

#[test]
fn corpus_replay_apic_system() {
    replay("apic_system", irqchip::harness::system::run);
}

#[test]
fn corpus_replay_msi() {
    replay("msi", irqchip::harness::msi::run);
}

// ---------------------------------------------------------------------------
// Hand-made seeds (see each harness module for its input format)
// ---------------------------------------------------------------------------

/// Bytes of an operation stream.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn new(head: &[u8]) -> Self {
        Self(head.to_vec())
    }
    fn b(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn u16(self, v: u16) -> Self {
        self.b(&v.to_le_bytes())
    }
    fn u32(self, v: u32) -> Self {
        self.b(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Self {
        self.b(&v.to_le_bytes())
    }
}

/// `ioapic` operations.
impl Bytes {
    fn io_reg(self, index: u8, value: u32) -> Self {
        self.b(&[1, index]).u32(value)
    }
    fn io_rte_low(self, pin: u8, value: u32) -> Self {
        self.io_reg(0x10 + 2 * pin, value)
    }
    fn io_line(self, pin: u8, level: bool) -> Self {
        self.b(&[5, pin, u8::from(level)])
    }
    fn io_eoi(self, vector: u8) -> Self {
        self.b(&[6, vector])
    }
    fn io_eoi_register(self, vector: u8) -> Self {
        self.b(&[7, 2]).u32(u32::from(vector))
    }
}

fn ioapic_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "level-assert-eoi-redeliver",
            Bytes::new(&[0x00])
                .io_rte_low(5, 0x8061)
                .io_line(5, true)
                .io_eoi(0x61)
                .io_eoi(0x61)
                .io_line(5, false)
                .io_eoi(0x61)
                .0,
        ),
        (
            "edge-masked-edge-lost",
            Bytes::new(&[0x03])
                .io_rte_low(3, 0x1_0041)
                .io_line(3, true)
                .io_rte_low(3, 0x0041)
                .io_line(3, false)
                .io_line(3, true)
                .0,
        ),
        (
            "active-low-level-eoi-register",
            Bytes::new(&[0x00])
                .io_rte_low(7, 0xa051)
                .io_line(7, true)
                .io_line(7, false)
                .io_eoi_register(0x51)
                .io_line(7, true)
                .io_eoi_register(0x51)
                .0,
        ),
        (
            "storm-threshold-1",
            Bytes::new(&[0x20])
                .io_rte_low(9, 0x8071)
                .io_line(9, true)
                .io_eoi(0x71)
                .io_eoi(0x71)
                .io_eoi(0x71)
                .io_rte_low(9, 0xa071)
                .io_rte_low(9, 0x8071)
                .io_eoi(0x71)
                .0,
        ),
        (
            "bad-accesses",
            Bytes::new(&[0x05])
                .b(&[0, 2])
                .u32(0x3)
                .b(&[4, 1, 4, 4, 1, 1, 3, 3, 8])
                .u64(u64::MAX)
                .io_reg(0x01, 0)
                .io_reg(0x02, 0x0f00_0000)
                .io_reg(0x00, 0xffff_ffff)
                .io_reg(0x40, 1)
                .b(&[4, 0x84, 2, 4, 6, 3])
                .0,
        ),
        (
            "reprogram-while-remote-irr",
            Bytes::new(&[0x00])
                .io_rte_low(4, 0x8045)
                .io_line(4, true)
                .io_reg(0x19, 0x0200_0000)
                .io_rte_low(4, 0x0045)
                .io_rte_low(4, 0x8045)
                .io_eoi(0x45)
                .0,
        ),
        (
            "host-rte-ext-dest-msi-routes-snapshot-reset",
            Bytes::new(&[0x10])
                .b(&[8, 2])
                .u64(0x1204_0000_0000_9162)
                .b(&[11, 2, 0, 11, 2, 1, 11, 2, 2])
                .b(&[8, 25])
                .u64(0)
                .io_line(2, true)
                .b(&[9, 2])
                .u64(1 << 14)
                .b(&[0])
                .b(&[10])
                .0,
        ),
    ]
}

/// `lapic` operations: each is a time step (u16), an opcode and operands.
impl Bytes {
    fn la_op(self, dt: u16, op: u8) -> Self {
        self.u16(dt).b(&[op])
    }
    fn la_mmio_write(self, offset: u16, value: u32) -> Self {
        self.la_op(0, 3).u16(offset).b(&[4]).u64(u64::from(value))
    }
    fn la_accept(self, flags: u8, vector: u8) -> Self {
        self.la_op(0, 0).b(&[flags, vector])
    }
    fn la_msr_write(self, msr: u32, value: u64) -> Self {
        self.la_op(0, 13).b(&[(msr - 0x800) as u8, 1]).u64(value)
    }
}

fn lapic_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "enable-accept-level-ack-eoi",
            Bytes::new(&[1, 0, 0])
                .la_mmio_write(0xf0, 0x1ff)
                .la_accept(0x10, 0x61)
                .la_accept(0x00, 0x95)
                .la_op(0, 1)
                .la_op(0, 2)
                .la_op(0, 1)
                .la_op(0, 2)
                .la_op(0, 11)
                .0,
        ),
        (
            "periodic-timer-ticks",
            Bytes::new(&[0, 0, 1])
                .la_mmio_write(0xf0, 0x1ff)
                .la_mmio_write(0x3e0, 0xb)
                .la_mmio_write(0x320, 0x2_0040)
                .la_mmio_write(0x380, 1000)
                .la_op(999, 9)
                .la_op(1, 9)
                .la_op(5000, 9)
                .la_mmio_write(0x3e0, 0x3)
                .la_op(700, 9)
                .la_op(0, 1)
                .la_op(0, 2)
                .0,
        ),
        (
            "x2apic-msrs-self-ipi-icr",
            Bytes::new(&[0x23, 0x01, 0])
                .la_op(0, 12)
                .b(&[2])
                .la_msr_write(0x80f, 0x11ff)
                .la_msr_write(0x83f, 0x44)
                .la_msr_write(0x830, 0x0000_0001_0000_4055)
                .la_msr_write(0x808, 0x30)
                .la_op(0, 1)
                .la_op(0, 7)
                .b(&[0])
                .la_op(0, 1)
                .la_op(0, 2)
                .la_op(0, 12)
                .b(&[0])
                .0,
        ),
        (
            "tsc-deadline",
            Bytes::new(&[0, 0, 0x08])
                .u64(2_000_000_000)
                .u64(1000)
                .la_mmio_write(0xf0, 0x1ff)
                .la_mmio_write(0x320, 0x4_00ef)
                .la_op(0, 5)
                .b(&[1])
                .u64(5000)
                .la_op(10_000, 9)
                .la_op(0, 1)
                .0,
        ),
        (
            "lint0-level-nmi-init-events",
            Bytes::new(&[2, 0, 0])
                .la_mmio_write(0xf0, 0x1ff)
                .la_mmio_write(0x350, 0x8058)
                .la_op(0, 8)
                .b(&[0])
                .la_op(0, 8)
                .b(&[0])
                .la_mmio_write(0x360, 0x400)
                .la_op(0, 8)
                .b(&[1])
                .la_accept(0x0a, 0)
                .la_op(0, 10)
                .la_op(0, 7)
                .b(&[0x0f])
                .0,
        ),
    ]
}

/// `apic_system` operations.
impl Bytes {
    fn sy_svr(self, cpu: u8) -> Self {
        self.b(&[14, cpu, 1])
    }
    /// Register write; `register` is the index into the harness's list
    /// (0 ID, 1 TPR, 2 EOI, 3 LDR, 4 DFR, 5 SVR, 8 LVT timer, 14 initial count).
    fn sy_reg(self, cpu: u8, register: u8, value: u32) -> Self {
        self.b(&[4, cpu, register]).u32(value)
    }
    fn sy_rte(self, pin: u8, fields: u16, vector: u8, destination: u8) -> Self {
        self.b(&[2, pin]).u16(fields).b(&[vector, destination])
    }
    fn sy_line(self, pin: u8, level: bool) -> Self {
        self.b(&[0, pin, u8::from(level)])
    }
    fn sy_ack(self, cpu: u8) -> Self {
        self.b(&[7, cpu])
    }
    fn sy_eoi(self, cpu: u8, how: u8) -> Self {
        self.b(&[8, cpu, how])
    }
    fn sy_ipi(self, cpu: u8, low: u32, destination: u32) -> Self {
        self.b(&[6, cpu]).u32(low).u32(destination)
    }
}

fn apic_system_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let four = || Bytes::new(&[0x00, 0x03, 0, 1, 2, 3]);
    vec![
        (
            "level-pin-ack-eoi-redeliver",
            Bytes::new(&[0x00, 0x01, 0x00, 0x00])
                .sy_svr(0)
                .sy_svr(1)
                .sy_rte(3, 0x20, 0x42, 1)
                .sy_line(3, true)
                .sy_ack(1)
                .sy_eoi(1, 0)
                .sy_ack(1)
                .sy_line(3, false)
                .sy_eoi(1, 2)
                .b(&[13])
                .0,
        ),
        (
            "lowest-priority-logical-flat",
            four()
                .sy_svr(0)
                .sy_svr(1)
                .sy_svr(2)
                .sy_svr(3)
                .sy_reg(0, 3, 0x0100_0000)
                .sy_reg(1, 3, 0x0200_0000)
                .sy_reg(2, 3, 0x0400_0000)
                .sy_reg(3, 3, 0x0800_0000)
                .sy_reg(0, 1, 0x40)
                .sy_reg(2, 1, 0x20)
                .sy_rte(5, 0x09, 0x51, 0x0f)
                .sy_line(5, true)
                .sy_line(5, false)
                .sy_line(5, true)
                .sy_ack(1)
                .sy_ack(3)
                .sy_eoi(1, 1)
                .0,
        ),
        (
            "logical-cluster-and-broadcast",
            four()
                .sy_svr(0)
                .sy_svr(1)
                .sy_svr(2)
                .sy_svr(3)
                .sy_reg(0, 4, 0x0fff_ffff)
                .sy_reg(1, 4, 0x0fff_ffff)
                .sy_reg(0, 3, 0x1100_0000)
                .sy_reg(1, 3, 0x1200_0000)
                .sy_rte(6, 0x08, 0x61, 0x13)
                .sy_line(6, true)
                .sy_rte(7, 0x00, 0x62, 0xff)
                .sy_line(7, true)
                .sy_ipi(2, 0x0008_4063, 0x13)
                .0,
        ),
        (
            "x2apic-cluster-ipi-and-0xff-quirk",
            Bytes::new(&[0x00, 0x83, 0xc0, 0x21, 0x00, 0x02, 0x05, 0x13])
                .b(&[5, 0, 2, 5, 1, 2, 5, 2, 2])
                .sy_svr(0)
                .sy_svr(1)
                .sy_svr(2)
                .sy_svr(3)
                .sy_ipi(0, 0x0000_4871, 0x0002_0002)
                .sy_ipi(1, 0x0000_4172, 0x0000_0003)
                .sy_rte(8, 0x20, 0x73, 0xff)
                .sy_line(8, true)
                .sy_ack(0)
                .sy_eoi(0, 1)
                .0,
        ),
        (
            "init-sipi-nmi-ipis",
            Bytes::new(&[0x00, 0x01, 0x00, 0x00])
                .sy_svr(0)
                .sy_ipi(0, 0x0000_4500, 1)
                .sy_ipi(0, 0x0000_0500, 1)
                .sy_ipi(0, 0x0000_4610, 1)
                .sy_ipi(0, 0x000c_4400, 0)
                .b(&[12, 1, 12, 0])
                .0,
        ),
        (
            // Two vectors in service at once, the EOI must retire the
            // higher; a TPR in the class of the highest in-service vector
            // is the PPR (SDM Vol. 3A 11.8.3.1: ties go to the TPR).
            "nested-in-service-and-tpr-tie",
            Bytes::new(&[0x00, 0x00, 0x00])
                .sy_svr(0)
                .sy_ipi(0, 0x0004_4040, 0)
                .sy_ack(0)
                .sy_ipi(0, 0x0004_4050, 0)
                .sy_ack(0)
                .sy_reg(0, 1, 0x55)
                .sy_reg(0, 1, 0)
                .sy_eoi(0, 0)
                .sy_ipi(0, 0x0004_4060, 0)
                .sy_ack(0)
                .sy_eoi(0, 2)
                .sy_eoi(0, 0)
                .0,
        ),
        (
            "timer-and-directed-eoi",
            Bytes::new(&[0x00, 0x80, 0x00])
                .b(&[14, 0, 3])
                .sy_reg(0, 8, 0x2_0080)
                .sy_reg(0, 14, 100)
                .b(&[10])
                .u16(1000)
                .b(&[0])
                .sy_rte(2, 0x20, 0x90, 0)
                .sy_line(2, true)
                .sy_ack(0)
                .sy_ack(0)
                .sy_eoi(0, 0)
                .sy_eoi(0, 0)
                .b(&[3, 0x90])
                .0,
        ),
    ]
}

fn msi_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "encode-every-format",
            Bytes::new(&[])
                .b(&[0, 0x13, 0x05, 0x00, 0x41, 1, 1, 0])
                .b(&[0, 0x30])
                .u16(0x1234)
                .b(&[0x00, 0x42, 0, 0, 2])
                .b(&[0, 0x60])
                .u32(0x0012_3456)
                .b(&[0x00, 0x43, 1, 0, 2])
                .b(&[0, 0x60])
                .u32(0x0012_3456)
                .b(&[0x00, 0x43, 1, 0, 0])
                .b(&[0, 0x00, 0x01, 0xfe, 0x30, 1, 0, 0])
                .0,
        ),
        (
            "decode-and-convert",
            Bytes::new(&[])
                .b(&[1])
                .u64(0xfee1_00a8)
                .u32(0xc162)
                .b(&[1])
                .b(&[1])
                .u64(0x0000_1200_fee0_1000)
                .u32(0x4031)
                .b(&[2])
                .b(&[1])
                .u64(0xfee0_0000)
                .u32(0)
                .b(&[0])
                .b(&[2])
                .u64(0xfee1_00a0)
                .u32(0x41)
                .b(&[1, 2])
                .b(&[2])
                .u64(0x0000_1200_fee0_1000)
                .u32(0x41)
                .b(&[2, 0])
                .0,
        ),
    ]
}

fn all_seeds() -> Vec<Seed> {
    let mut all = Vec::new();
    let sets: [(&str, Seeds, Harness); 4] = [
        ("ioapic", ioapic_seeds(), irqchip::harness::ioapic::run),
        ("lapic", lapic_seeds(), irqchip::harness::lapic),
        (
            "apic_system",
            apic_system_seeds(),
            irqchip::harness::system::run,
        ),
        ("msi", msi_seeds(), irqchip::harness::msi::run),
    ];
    for (target, seeds, run) in sets {
        for (name, data) in seeds {
            let name = name.to_string();
            all.push(Seed {
                target,
                name,
                data,
                run,
            });
        }
    }
    all
}

/// The seeds pass their harness (they are also in the corpus).
#[test]
fn seeds_pass_their_harness() {
    corpus::seeds_pass(&all_seeds()).unwrap_or_else(|e| panic!("{e}"));
}

/// The checked-in `seed-*` files are exactly what the seed builders above
/// produce (`WRITE_FUZZ_SEEDS=1 cargo test --test corpus_replay seed_files`
/// rewrites them).
#[test]
fn seed_files_match_their_builders() {
    corpus::seed_files_match(&workspace(), &all_seeds()).unwrap_or_else(|e| panic!("{e}"));
}
