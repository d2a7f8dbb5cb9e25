//! Replays the checked-in fuzz corpus of the device layer
//! (`resources/fuzz-corpus/vmm_devices/`) through the harness the cargo-fuzz
//! target calls (`vmm::harness::devices`), on the stable toolchain and
//! without KVM. A missing or empty corpus directory fails the test.
//!
//! The `seed-*` files are the inputs below (`seed_files_match_their_builders`
//! checks they still are); regenerate them with
//! `WRITE_FUZZ_SEEDS=1 cargo test -p vmm --test corpus_replay seed_files`.
//! The other files are minimised campaign inputs and crash regressions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use irqchip::harness::corpus::{self, Seed};
use irqconnect_abi::layout::{IOAPIC_MMIO_BASE, LAPIC_MMIO_BASE};
use irqconnect_abi::pv::{ConnectEx, QueryPlatform};
use irqconnect_abi::{msidev, testdev};
use vmm::harness::devices::{self, Summary};
use vmm::harness::snapshot;

const TARGET: &str = "vmm_devices";
/// The snapshot file's target (`vmm::harness::snapshot`).
const SNAPSHOT_TARGET: &str = "snapshot_restore";

/// The workspace the corpus lives in.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn corpus_replay_vmm_devices() {
    if let Err(report) = corpus::replay(&workspace(), TARGET, devices::run) {
        panic!("{report}");
    }
}

#[test]
fn corpus_replay_snapshot_restore() {
    if let Err(report) = corpus::replay(&workspace(), SNAPSHOT_TARGET, snapshot::run) {
        panic!("{report}");
    }
}

/// `vmm_devices` operations (see `vmm::harness::devices`).
struct Ops(Vec<u8>);

/// Port selectors: indexes into `vmm::harness::devices::PORTS`.
const SERIAL: u8 = 0;
const EXIT: u8 = 1;
const FW_CFG: u8 = 2;
const PC_TESTDEV: u8 = 3;
const TESTDEVS: u8 = 4;
const MSIDEVS: u8 = 5;
const DOORBELL: u8 = 6;
const PIC_MASTER: u8 = 8;
const PIC_SLAVE: u8 = 9;
const ELCR: u8 = 10;

impl Ops {
    /// Mode 0 kernel, 1 split, 2 user; `cpus` 1..=8; flags as documented.
    fn new(mode: u8, cpus: u8, flags: u8) -> Self {
        Self(vec![mode + 3 * (cpus - 1), flags])
    }

    fn op(mut self, kind: u8, width: usize) -> Self {
        let code = match width {
            1 => 0,
            2 => 1,
            4 => 2,
            _ => 3,
        };
        self.0.push(kind | code << 3);
        self
    }

    /// A write of `value` at `offset` in the port range `selector`.
    fn out(mut self, selector: u8, offset: u8, value: &[u8]) -> Self {
        self = self.op(1, value.len());
        self.0.extend_from_slice(&[selector, offset]);
        self.0.extend_from_slice(value);
        self
    }

    /// A write of `value` at any port.
    fn out_port(mut self, port: u16, value: &[u8]) -> Self {
        self = self.op(1, value.len());
        self.0.push(0xff);
        self.0.extend_from_slice(&port.to_le_bytes());
        self.0.extend_from_slice(value);
        self
    }

    /// A read of `width` bytes at `offset` in the port range `selector`.
    fn inp(mut self, selector: u8, offset: u8, width: usize) -> Self {
        self = self.op(0, width);
        self.0.extend_from_slice(&[selector, offset]);
        self
    }

    /// A read of `width` bytes at any port.
    fn in_port(mut self, port: u16, width: usize) -> Self {
        self = self.op(0, width);
        self.0.push(0xff);
        self.0.extend_from_slice(&port.to_le_bytes());
        self
    }

    /// An MMIO read (`value` `None`, `width` bytes) or write at `addr`:
    /// the IOAPIC window's base plus an offset below 0x1100 is encoded as
    /// such, any other address in full.
    fn mmio(mut self, addr: u64, value: Option<&[u8]>, width: usize) -> Self {
        self = self.op(if value.is_some() { 3 } else { 2 }, width);
        match addr.checked_sub(IOAPIC_MMIO_BASE).filter(|&o| o < 0x1100) {
            Some(offset) => {
                self.0.push(0);
                self.0.extend_from_slice(&(offset as u16).to_le_bytes());
            }
            None => {
                self.0.push(0xff);
                self.0.extend_from_slice(&addr.to_le_bytes());
            }
        }
        self.0.extend_from_slice(value.unwrap_or(&[]));
        self
    }

    /// The guest stores `bytes` at `at` (in pieces of at most 64).
    fn store(mut self, at: u16, bytes: &[u8]) -> Self {
        for (i, chunk) in bytes.chunks(64).enumerate() {
            self.0.push(4);
            self.0
                .extend_from_slice(&(at + 64 * i as u16).to_le_bytes());
            self.0.push(chunk.len() as u8);
            self.0.extend_from_slice(chunk);
        }
        self
    }

    /// Test device `which`'s timer expires `n` times.
    fn expire(mut self, which: u8, n: u8) -> Self {
        self.0.extend_from_slice(&[5, which, n]);
        self
    }

    /// Console input.
    fn console(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(&[6, bytes.len() as u8]);
        self.0.extend_from_slice(bytes);
        self
    }

    /// The storm guard reports `pin`.
    fn storm(mut self, pin: u8) -> Self {
        self.0.extend_from_slice(&[7, pin]);
        self
    }

    /// The doorbell rung with the block at `at`.
    fn ring(self, at: u32) -> Self {
        self.out(DOORBELL, 0, &at.to_le_bytes())
    }

    fn testdev(self, index: u8, register: u16, value: u32) -> Self {
        let offset = index * testdev_stride() + register as u8;
        self.out(TESTDEVS, offset, &value.to_le_bytes())
    }

    fn msidev(self, index: u8, register: u16, value: u32) -> Self {
        let offset = index * msidev_stride() + register as u8;
        self.out(MSIDEVS, offset, &value.to_le_bytes())
    }
}

fn testdev_stride() -> u8 {
    (testdev::device_port(1) - testdev::device_port(0)) as u8
}

fn msidev_stride() -> u8 {
    (msidev::device_port(1) - msidev::device_port(0)) as u8
}

/// Guest RAM with a request block of every opcode, as the `pv_requests`
/// seeds lay it out (`irqconnect::harness::seed_corpus`): QUERY_PLATFORM at
/// 0, a MESSAGE_BASED CONNECT_EX of device 10 (8 MSI-X messages, message
/// test device 2) at 0x800 with its table at 0xa00.
fn pv_seed_ram() -> Vec<u8> {
    let seeds = irqconnect::harness::seed_corpus();
    let (_, session) = seeds
        .iter()
        .find(|(name, _)| *name == "query_platform")
        .unwrap();
    // Processors, step count, one step, then RAM.
    session[6..].to_vec()
}

/// The request block of type `T` at `at` in [`pv_seed_ram`].
fn block<T>(at: usize) -> Vec<u8> {
    pv_seed_ram()[at..at + size_of::<T>()].to_vec()
}

/// The seeds, each named for what it reaches.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hello = b"ok hello\n"
        .iter()
        .fold(Ops::new(1, 4, 0), |ops, &b| ops.out(SERIAL, 0, &[b]));
    let loopback = Ops::new(2, 1, 0)
        .out(SERIAL, 4, &[0x10])
        .out(SERIAL, 0, b"x")
        .console(b"typed")
        .inp(SERIAL, 0, 1)
        .inp(SERIAL, 5, 1)
        .out(SERIAL, 3, &[0x80])
        .out(SERIAL, 0, &[1])
        .out(SERIAL, 3, &[0x03])
        .out(SERIAL, 4, &[0])
        .out(SERIAL, 1, &[0x0f])
        .out(SERIAL, 0, b"y");
    let fw_cfg = Ops::new(0, 3, 0)
        .out(FW_CFG, 0, &[0, 0])
        .inp(FW_CFG, 1, 1)
        .inp(FW_CFG, 1, 2)
        .inp(FW_CFG, 1, 4)
        .out(FW_CFG, 0, &[5])
        .inp(FW_CFG, 1, 2)
        .out(FW_CFG, 0, &[3, 0])
        .inp(FW_CFG, 1, 4)
        .inp(FW_CFG, 1, 4)
        .inp(FW_CFG, 0, 1)
        .out(FW_CFG, 1, &[9]);
    let pc_testdev = Ops::new(1, 2, 0)
        .out(PC_TESTDEV, 5, &[1])
        .inp(PC_TESTDEV, 5, 1)
        .out(PC_TESTDEV, 23, &[0x80, 0])
        .out(PC_TESTDEV, 5, &[0])
        .out(PC_TESTDEV, 24, &[1])
        .inp(PC_TESTDEV, 23, 4);
    let testdevs = Ops::new(2, 4, 0)
        .testdev(0, testdev::reg::CTRL, testdev::CTRL_ENABLE)
        .testdev(0, testdev::reg::RAISE, 3)
        .testdev(0, testdev::reg::ACK, 0)
        .inp(TESTDEVS, testdev::reg::STATUS as u8, 4)
        .testdev(1, testdev::reg::CTRL, testdev::CTRL_ENABLE)
        .testdev(1, testdev::reg::TIMER, 5 << 16 | 100)
        .expire(1, 2)
        .expire(1, 9)
        .testdev(3, testdev::reg::RAISE, 0)
        .testdev(3, testdev::reg::CTRL, testdev::CTRL_ENABLE)
        .out(TESTDEVS, 2, &[1, 2])
        .inp(TESTDEVS, 1, 4);
    let doorbell = Ops::new(1, 4, 0)
        .inp(DOORBELL, 0, 4)
        .store(0x1000, &block::<QueryPlatform>(0))
        .ring(0x1000)
        .out(DOORBELL, 0, &[0, 0x10])
        .out(DOORBELL, 1, &0x1000u32.to_le_bytes())
        .inp(DOORBELL, 2, 1)
        .ring(0xffff_f000);
    let traced = (0..12).fold(
        Ops::new(2, 2, 8).store(0x1000, &block::<QueryPlatform>(0)),
        |ops, _| ops.ring(0x1000),
    );
    let messages = Ops::new(2, 4, 0)
        .store(0x800, &block::<ConnectEx>(0x800))
        .ring(0x800)
        .msidev(2, msidev::reg::RAISE, 0)
        .msidev(2, msidev::reg::MASK, 0b10)
        .msidev(2, msidev::reg::RAISE, 1)
        .msidev(2, msidev::reg::MASK, 0)
        .msidev(2, msidev::reg::RAISE, 8)
        .msidev(2, msidev::reg::SELECT, 1)
        .inp(MSIDEVS, 2 * msidev_stride() + msidev::reg::SENT as u8, 4)
        .inp(MSIDEVS, 2 * msidev_stride() + 2, 2)
        .msidev(0, msidev::reg::RAISE, 0);
    let refused = Ops::new(1, 2, 3)
        .store(0x800, &block::<ConnectEx>(0x800))
        .ring(0x800)
        .msidev(2, msidev::reg::RAISE, 0)
        .msidev(2, msidev::reg::RAISE, 1);
    let pic = Ops::new(1, 1, 0)
        .out(PIC_MASTER, 0, &[0x11])
        .out(PIC_SLAVE, 0, &[0x11])
        .out(PIC_MASTER, 1, &[0x20])
        .out(PIC_SLAVE, 1, &[0x28])
        .out(PIC_MASTER, 1, &[4])
        .out(PIC_SLAVE, 1, &[2])
        .out(PIC_MASTER, 1, &[1])
        .out(PIC_SLAVE, 1, &[1])
        .out(PIC_MASTER, 1, &[0xfb])
        .inp(PIC_MASTER, 1, 1)
        .out(ELCR, 0, &[0xff, 0xff])
        .inp(ELCR, 0, 2);
    let kernel_pic = Ops::new(0, 1, 0)
        .out(PIC_MASTER, 0, &[0x11])
        .inp(PIC_MASTER, 1, 1)
        .inp(ELCR, 1, 1);
    let unclaimed = Ops::new(1, 2, 0)
        .in_port(0x80, 1)
        .out_port(0x80, &[0x55])
        .in_port(0xcf8, 4)
        .in_port(0xffff, 4)
        .mmio(IOAPIC_MMIO_BASE, Some(&[1, 0, 0, 0]), 4)
        .mmio(IOAPIC_MMIO_BASE + 0x10, None, 4)
        .mmio(IOAPIC_MMIO_BASE + 0xffe, None, 4)
        .mmio(IOAPIC_MMIO_BASE + 0x1000, None, 8)
        .mmio(LAPIC_MMIO_BASE + 0x20, None, 4)
        .mmio(u64::MAX, None, 8);
    let exit = Ops::new(0, 1, 0)
        .out(EXIT, 0, &7u32.to_le_bytes())
        .out(EXIT, 2, &[1]);
    let storm = Ops::new(1, 4, 0).storm(16).storm(16).storm(3).storm(30);
    let noisy = (0..160u8).fold(Ops::new(1, 2, 0), |ops, i| {
        ops.in_port(0x300 + u16::from(i), 1)
            .out(TESTDEVS, 1, &[i])
            .out(DOORBELL, 2, &[i])
    });
    vec![
        ("console_hello", hello.0),
        ("console_loopback_and_input", loopback.0),
        ("fw_cfg_items", fw_cfg.0),
        ("pc_testdev_lines", pc_testdev.0),
        ("testdevs_raise_ack_timer", testdevs.0),
        ("doorbell_query_platform_and_bad_rings", doorbell.0),
        ("doorbell_traced_past_the_ring", traced.0),
        ("connect_ex_messages_then_raise", messages.0),
        ("chip_refuses_routes_and_messages", refused.0),
        ("pic_init_and_elcr", pic.0),
        ("kernel_mode_pic_ports_unclaimed", kernel_pic.0),
        ("unclaimed_ports_and_mmio", unclaimed.0),
        ("exit_port", exit.0),
        ("storm_guard_reports", storm.0),
        ("bad_accesses_rate_limited", noisy.0),
    ]
}

fn all_seeds() -> Vec<Seed> {
    seeds()
        .into_iter()
        .map(|(name, data)| Seed {
            target: TARGET,
            name: name.to_string(),
            data,
            run: devices::run,
        })
        .chain(snapshot::seeds().into_iter().map(|(name, data)| Seed {
            target: SNAPSHOT_TARGET,
            name: name.to_string(),
            data,
            run: snapshot::run,
        }))
        .collect()
}

#[test]
fn seed_files_match_their_builders() {
    corpus::seed_files_match(&workspace(), &all_seeds()).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn seeds_pass_their_harness() {
    corpus::seeds_pass(&all_seeds()).unwrap_or_else(|e| panic!("{e}"));
}

fn summary_of(name: &str) -> Summary {
    let seeds = seeds();
    let (_, data) = seeds.iter().find(|(n, _)| *n == name).unwrap();
    devices::summary(data).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The seeds reach what they are named for.
#[test]
fn seeds_reach_what_they_are_named_for() {
    assert_eq!(summary_of("console_hello").console_bytes, 9);
    assert_eq!(summary_of("console_loopback_and_input").console_bytes, 1);
    assert_eq!(summary_of("doorbell_traced_past_the_ring").succeeded, 12);
    let doorbell = summary_of("doorbell_query_platform_and_bad_rings");
    assert_eq!((doorbell.answered, doorbell.succeeded), (1, 1));
    let messages = summary_of("connect_ex_messages_then_raise");
    assert_eq!(messages.succeeded, 1);
    assert_eq!(messages.messages_sent, 2, "message 0, then 1 on unmask");
    let refused = summary_of("chip_refuses_routes_and_messages");
    assert_eq!((refused.succeeded, refused.messages_sent), (1, 0));
    assert!(summary_of("kernel_mode_pic_ports_unclaimed").unclaimed >= 3);
    assert_eq!(summary_of("unclaimed_ports_and_mmio").unclaimed, 7);
    assert_eq!(summary_of("exit_port").exit, Some(7));
    let noisy = summary_of("bad_accesses_rate_limited");
    assert_eq!(noisy.operations, 480);
    assert!(
        noisy.warnings > 0 && noisy.warnings < 160,
        "{} warnings for 480 bad accesses",
        noisy.warnings
    );
}

/// The valid snapshot seeds decode in full (every mode), the broken ones
/// are refused.
#[test]
fn snapshot_seeds_are_accepted_or_refused_as_named() {
    for (name, data) in snapshot::seeds() {
        let valid = ["kernel_one_vcpu", "split_four_vcpus", "user_two_vcpus"].contains(&name);
        assert_eq!(snapshot::accepted(&data), valid, "{name}");
    }
}
