//! Replays the checked-in fuzz corpora (`resources/fuzz-corpus/pv_requests/`
//! and `resources/fuzz-corpus/connect_sequences/`) through the very harness
//! functions the cargo-fuzz targets call, on the stable toolchain. A missing
//! or empty corpus directory fails the test.
//!
//! The `seed-*` files are the inputs below (`seed_files_match_their_builders`
//! checks they still are); regenerate them with
//! `WRITE_FUZZ_SEEDS=1 cargo test -p irqconnect --test corpus_replay seed_files`.
//! The other files are minimised campaign inputs and crash regressions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use irqconnect::harness::{pv_requests, sequences};

use irqchip::harness::corpus::{self, Harness, Seed};

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
fn corpus_replay_pv_requests() {
    replay("pv_requests", pv_requests::run);
}

#[test]
fn corpus_replay_connect_sequences() {
    replay("connect_sequences", sequences::run);
}

/// `connect_sequences` operations (see `irqconnect::harness::sequences`).
struct Ops(Vec<u8>);

impl Ops {
    /// `cpus` processors (1..=64), online pattern byte, flags (quota bits
    /// 0..2, x2APIC bit 3, irqchip mode bits 4..5, APIC model bits 6..7).
    fn new(cpus: u8, online: u8, flags: u8) -> Self {
        Self(vec![cpus - 1, online, flags])
    }
    /// 255 processors (four groups), as [`Ops::new`] otherwise.
    fn cpus_255(online: u8, flags: u8) -> Self {
        Self(vec![0xff, online, flags])
    }
    /// SET_APIC_MODEL with the ABI value `model`.
    fn set_model(mut self, model: u8) -> Self {
        self.0.extend_from_slice(&[6, 0x60 | model]);
        self
    }
    /// RETARGET of the `n`-th handle: `group` (`None`: the connection's),
    /// the mask as eight bytes, and the table (0 in place, 1 none, 2 too
    /// short).
    fn retarget(mut self, n: u8, group: Option<u8>, mask: u64, table: u8) -> Self {
        let g = group.map_or(0, |g| 4 | g);
        self.0.extend_from_slice(&[6, 0xc0, n, g, 3]);
        self.0.extend_from_slice(&mask.to_le_bytes());
        self.0.push(table);
        self
    }
    /// A CONNECT from the device's resource `which`, with `flags` (bits 0..1
    /// the mask encoding, 2 flip mode, 3 flip share, 4 floating save, 5 null
    /// routine) and `breaks` (pointer choices, IRQL and vector breakage).
    fn connect(mut self, device: u8, which: u8, flags: u8, breaks: u8, operands: &[u8]) -> Self {
        self.0.extend_from_slice(&[0, device, which, flags, breaks]);
        self.0.extend_from_slice(operands);
        self
    }
    /// A CONNECT_EX: `version` selector (0 FULLY_SPECIFIED, 2 LINE_BASED,
    /// 4 MESSAGE_BASED, 6 FULLY_SPECIFIED_GROUP), CONNECT's bytes as
    /// [`Ops::connect`], then the Ex `choices` byte and its operands.
    #[allow(clippy::too_many_arguments)]
    fn connect_ex(
        mut self,
        version: u8,
        device: u8,
        flags: u8,
        breaks: u8,
        operands: &[u8],
        choices: u8,
        extra: &[u8],
    ) -> Self {
        self.0
            .extend_from_slice(&[2, version, device, 0, flags, breaks]);
        self.0.extend_from_slice(operands);
        self.0.push(choices);
        self.0.extend_from_slice(extra);
        self
    }
    fn disconnect_ex(mut self, n: u8, version: u8) -> Self {
        self.0.extend_from_slice(&[7, n, version]);
        self
    }
    fn disconnect(mut self, n: u8) -> Self {
        self.0.extend_from_slice(&[3, n]);
        self
    }
    fn forged(mut self, raw: u64) -> Self {
        self.0.push(4);
        self.0.extend_from_slice(&raw.to_le_bytes());
        self
    }
    fn assert_line(mut self, device: u8) -> Self {
        self.0.extend_from_slice(&[5, device]);
        self
    }
    fn storm(mut self, pin: u8) -> Self {
        self.0.extend_from_slice(&[6, pin]);
        self
    }
    fn snapshot(mut self) -> Self {
        self.0.extend_from_slice(&[6, 0x40]);
        self
    }
    fn disconnect_all(mut self) -> Self {
        self.0.extend_from_slice(&[6, 0x80]);
        self
    }
}

fn sequence_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Mask encoding 0: the next byte is the mask; sync extra, then the two
    // pointer operands as `breaks` selects (0 and 1 need none).
    vec![
        (
            "shared-level-pin-two-devices",
            Ops::new(4, 0, 0)
                .connect(2, 0, 0, 0b0100, &[0b0011, 0])
                .connect(3, 0, 0, 0b0100, &[0b0100, 1])
                .assert_line(2)
                .disconnect(0)
                .assert_line(3)
                .snapshot()
                .0,
        ),
        (
            "two-pins-one-vector-latched",
            Ops::new(8, 0, 0)
                .connect(4, 0, 0, 0, &[0x0f, 0])
                .connect(5, 0, 0, 0, &[0xf0, 0])
                .assert_line(4)
                .assert_line(5)
                .storm(19)
                .assert_line(4)
                .disconnect(1)
                .0,
        ),
        (
            "spin-lock-rule-two-vectors",
            Ops::new(4, 0, 0)
                .connect(6, 0, 0, 0b0100, &[0b0001, 1])
                .connect(6, 1, 0, 0b0000, &[0b0001, 1])
                .connect(6, 1, 0, 0b0100, &[0b0001, 0])
                .connect(6, 1, 0, 0b0100, &[0b0001, 2])
                .assert_line(6)
                .disconnect_all()
                .0,
        ),
        (
            "quota-exhaustion-and-stale-handles",
            Ops::new(16, 0, 2)
                .connect(0, 0, 1, 0, &[0])
                .connect(7, 0, 0, 0, &[0x01, 0])
                .connect(1, 0, 0, 0, &[0x01, 0])
                .disconnect(1)
                .disconnect(1)
                .forged(0x1_0000_0001)
                .forged(0)
                .connect(1, 0, 0, 0, &[0x01, 0])
                .0,
        ),
        (
            "sharing-conflicts-mode-and-exclusive",
            Ops::new(4, 0, 0)
                .connect(0, 0, 0, 0, &[0b0011, 0])
                .connect(0, 0, 0b1000, 0, &[0b0100, 0])
                .connect(2, 0, 0, 0, &[0b0001, 0])
                .connect(3, 0, 0b0100, 0, &[0b0001, 0])
                .connect(3, 0, 0, 0, &[0b0010, 0])
                .assert_line(3)
                .0,
        ),
        (
            "x2apic-partial-online-physical-destination",
            Ops::new(20, 0xa5, 0x08)
                .connect(0, 0, 1, 0, &[0])
                .assert_line(0)
                .connect(4, 0, 2, 0, &[9, 0])
                .assert_line(4)
                .storm(16)
                .storm(30)
                .snapshot()
                .0,
        ),
        (
            "bad-parameters-each-rule",
            Ops::new(2, 0, 0)
                .connect(0, 0, 0, 0, &[0b100, 0])
                .connect(0, 0, 0b10_0000, 0, &[1, 0])
                .connect(0, 0, 0, 0b11, &[1, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])
                .connect(0, 0, 0, 0b1000_0000, &[1, 0x25, 0])
                .connect(0, 0, 0, 0b0010_0000, &[1, 3, 0])
                .connect(0, 0, 0, 0b0001_0000, &[1, 0])
                .connect(8, 0, 0, 0, &[1, 0])
                .connect(1, 0, 0, 0b1000_0000, &[1, 0x60, 0])
                .0,
        ),
    ]
}

/// CONNECT_EX sequences. `breaks` 0b0100: no context, the spin lock at
/// 0x1000; the operands are the mask byte and the SynchronizeIrql extra;
/// choices 0x08: no processor restriction, a table that fits.
fn sequence_ex_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const FULLY: u8 = 0;
    const LINE: u8 = 2;
    const MESSAGE: u8 = 4;
    vec![
        (
            "ex-message-devices-each-policy",
            Ops::new(4, 0, 0)
                .connect_ex(MESSAGE, 8, 0, 0b0100, &[0, 0], 0x08, &[])
                .connect_ex(MESSAGE, 9, 0, 0, &[0b0110, 0], 0, &[])
                .connect_ex(MESSAGE, 10, 0, 0b0100, &[0, 1], 0x08, &[])
                .assert_line(8)
                .assert_line(9)
                .assert_line(10)
                .snapshot()
                .connect_ex(MESSAGE, 10, 0, 0b0100, &[0, 1], 0x08, &[])
                .disconnect_ex(1, 3)
                .assert_line(9)
                .disconnect_all()
                .0,
        ),
        (
            "ex-line-based-rule-10-and-versions",
            Ops::new(4, 0, 0)
                .connect_ex(LINE, 6, 0, 0b0100, &[0b0001, 1], 0, &[])
                .connect(6, 0, 0, 0b1100, &[0b0010, 1, 0, 0x20, 0, 0, 0, 0, 0, 0])
                .disconnect(0)
                .disconnect_ex(0, 1)
                .assert_line(6)
                .disconnect_ex(0, 2)
                .connect_ex(FULLY, 0, 0, 0, &[0b0011, 0], 0, &[])
                .disconnect_ex(1, 1)
                .0,
        ),
        (
            "ex-fallback-and-table-too-small",
            Ops::new(2, 0, 0)
                .connect_ex(MESSAGE, 0, 0, 0, &[0b11, 0], 0x0a, &[])
                .assert_line(0)
                .connect_ex(MESSAGE, 10, 0, 0, &[0b11, 0], 0x18, &[4])
                .connect_ex(MESSAGE, 10, 0, 0, &[0b11, 0], 0x28, &[1])
                .connect_ex(MESSAGE, 1, 0, 0, &[0b11, 0], 0x08, &[])
                .disconnect_all()
                .0,
        ),
    ]
}

/// RETARGET, SET_APIC_MODEL, processor groups and the destination models.
fn sequence_affinity_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const MESSAGE: u8 = 4;
    const GROUP: u8 = 6;
    // Flags: x2APIC, split irqchip (15-bit destinations), and a model.
    const X2APIC_SPLIT: u8 = 0x08 | 0x10;
    const MODEL_X2APIC: u8 = 0x40;
    const MODEL_CLUSTER: u8 = 0xc0;
    vec![
        (
            "retarget-line-shared-union-and-refusals",
            Ops::new(8, 0, 0)
                .connect(2, 0, 0, 0b0100, &[0b0011, 0])
                .connect(3, 0, 0, 0b0100, &[0b0100, 1])
                .retarget(0, None, 0b1000, 1)
                .assert_line(2)
                .assert_line(3)
                .retarget(1, None, 0xff00, 1)
                .retarget(0, Some(1), 0b1, 1)
                .retarget(0, None, 0b1, 0)
                .disconnect_all()
                .0,
        ),
        (
            "retarget-message-based-table",
            Ops::new(4, 0, 0)
                .connect_ex(MESSAGE, 10, 0, 0b0100, &[0, 1], 0x08, &[])
                .retarget(0, None, 0b0110, 0)
                .assert_line(10)
                .retarget(0, None, 0b0001, 2)
                .retarget(0, None, 0b0011, 1)
                .disconnect_all()
                .0,
        ),
        (
            "groups-255-x2apic-group-one-retarget-and-model",
            Ops::cpus_255(0, X2APIC_SPLIT | MODEL_X2APIC)
                .connect_ex(
                    GROUP,
                    2,
                    3,
                    0b0100,
                    &[0xff, 0xff, 0, 0, 0, 0, 0, 0, 0],
                    0x10,
                    &[],
                )
                .assert_line(2)
                .retarget(0, Some(1), 0xf0, 1)
                .assert_line(2)
                .retarget(0, Some(2), 0xf0, 1)
                .set_model(3)
                .disconnect_all()
                .set_model(3)
                .connect(4, 0, 3, 0, &[0x0f, 0x0f, 0, 0, 0, 0, 0, 0, 0])
                .assert_line(4)
                .snapshot()
                .0,
        ),
        (
            "xapic-cluster-16-sharers-across-clusters",
            Ops::new(16, 0, MODEL_CLUSTER)
                .connect(2, 0, 3, 0b0100, &[0xf0, 0, 0, 0, 0, 0, 0, 0, 0])
                .connect(3, 0, 3, 0b0100, &[0, 0x0f, 0, 0, 0, 0, 0, 0, 1])
                .connect(3, 0, 0, 0b0100, &[0x30, 1])
                .assert_line(2)
                .retarget(0, None, 0x0f00, 1)
                .retarget(1, None, 0x40, 1)
                .assert_line(3)
                .disconnect_all()
                .0,
        ),
    ]
}

fn all_seeds() -> Vec<Seed> {
    let pv = pv_requests::seed_corpus()
        .into_iter()
        .map(|(name, data)| Seed {
            target: "pv_requests",
            name,
            data,
            run: pv_requests::run,
        });
    let sequences = sequence_seeds()
        .into_iter()
        .chain(sequence_ex_seeds())
        .chain(sequence_affinity_seeds())
        .map(|(name, data)| Seed {
            target: "connect_sequences",
            name: name.to_string(),
            data,
            run: sequences::run,
        });
    pv.chain(sequences).collect()
}

/// The seeds pass their harness (they are also in the corpus).
#[test]
fn seeds_pass_their_harness() {
    corpus::seeds_pass(&all_seeds()).unwrap_or_else(|e| panic!("{e}"));
}

/// The write-protected seed really takes the undo path, and the quota seed
/// really hits the quota: the seeds cover what their names say.
#[test]
fn seeds_reach_unwritable_and_quota_outcomes() {
    use irqconnect::Outcome;
    use irqconnect::harness::ram::HarnessRam;
    use irqconnect_abi::ntstatus::STATUS_INSUFFICIENT_RESOURCES;
    let seeds = pv_requests::seed_corpus();
    let find = |n: &str| seeds.iter().find(|(name, _)| name == n).unwrap().1.clone();
    let outcomes = |data: &[u8], quota: u32, read_only: Option<std::ops::Range<u64>>| {
        let steps = usize::from(data[3]);
        let platform = irqconnect::Platform::uniform(1 + u32::from(data[2] % 16)).unwrap();
        let devices = irqconnect::DeviceTable::default_for(&platform);
        let mut service = irqconnect::Service::new(platform, devices, quota).unwrap();
        let memory = data[4 + 4 * steps..].to_vec();
        let mut ram = HarnessRam::new(0, memory, read_only);
        let mut out = Vec::new();
        for chunk in data[4..4 + 4 * steps].chunks_exact(4) {
            let value = u32::from_le_bytes(chunk.try_into().unwrap());
            if value & 0xf000_0000 == 0 {
                out.push(service.handle_doorbell(&mut ram, value));
            }
        }
        out
    };
    let unwritable = outcomes(&find("connect_answer_unwritable"), 64, Some(0x700..0x740));
    assert!(matches!(unwritable[0], Outcome::Unwritable { gpa: 0x700 }));
    let quota = outcomes(&find("connect_over_quota"), 1, None);
    assert_eq!(quota[0].status(), Some(STATUS_INSUFFICIENT_RESOURCES));
}

/// The CONNECT_EX sequence seeds get the answers their names promise.
#[test]
fn sequence_ex_seeds_reach_success_fallback_and_too_small() {
    use irqconnect::harness::sequences::{Op, decode};
    use irqconnect::{FlatRam, Handle, Platform, Service, Violation};
    use irqconnect_abi::pv::connect_version::{LINE_BASED, MESSAGE_BASED};
    let block = irqconnect::connect_ex::BlockSpan {
        start: 0x3000,
        len: 120,
    };
    let answers = |data: &[u8]| {
        let seq = decode(data);
        let platform = Platform::uniform(seq.cpus).unwrap();
        let mut s = Service::with_defaults(platform.cpu_count()).unwrap();
        let ram = FlatRam::new(0, 0x1_0000);
        let mut handles: Vec<Handle> = Vec::new();
        let mut out = Vec::new();
        for op in &seq.ops {
            match op {
                Op::ConnectEx(r) => {
                    let a = s
                        .connect_ex(r, block, &ram)
                        .map(|c| {
                            handles.push(c.handle);
                            c.version_used
                        })
                        .map_err(|e| e.violation);
                    out.push(format!("{a:?}"));
                }
                Op::DisconnectEx(n, v) => {
                    let h = handles[n % handles.len()];
                    out.push(format!("{:?}", s.disconnect_ex(*v, h).map(|_| ())));
                }
                Op::Connect(r) => out.push(format!("{:?}", s.connect(r, &ram).map(|_| ()))),
                Op::Disconnect(n) => {
                    let h = handles[n % handles.len()];
                    out.push(format!("{:?}", s.disconnect(h).map(|_| ())));
                }
                _ => {}
            }
        }
        out
    };
    let seeds = sequence_ex_seeds();
    let find = |n: &str| seeds.iter().find(|(name, _)| *name == n).unwrap().1.clone();
    let m = format!("Ok({MESSAGE_BASED})");
    let l = format!("Ok({LINE_BASED})");
    assert_eq!(
        answers(&find("ex-message-devices-each-policy")),
        [
            m.clone(),
            m.clone(),
            m.clone(),
            format!("Err({:?})", Violation::SharingConflict { cpu: 0 }),
            "Ok(())".into()
        ]
    );
    assert_eq!(
        answers(&find("ex-line-based-rule-10-and-versions")),
        [
            l.clone(),
            format!("Err({:?})", Violation::SpinLockMismatch),
            format!("Err({:?})", Violation::GroupNeedsDisconnectEx),
            format!("Err({:?})", Violation::VersionMismatch),
            "Ok(())".into(),
            "Ok(1)".into(),
            "Ok(())".into(),
        ]
    );
    assert_eq!(
        answers(&find("ex-fallback-and-table-too-small")),
        [
            l,
            format!("Err({:?})", Violation::TableTooSmall),
            format!("Err({:?})", Violation::TableNotUsable),
            format!("Err({:?})", Violation::NoMessages),
        ]
    );
}

/// The affinity sequence seeds get the answers their names promise (each
/// connection's own effective mask): RETARGET moves, and refuses by RT3,
/// RT2, R, RT4 and a table too short or missing (length 0);
/// SET_APIC_MODEL is refused while connected; group 1 connects.
#[test]
fn sequence_affinity_seeds_reach_their_rules() {
    use irqconnect::harness::sequences::{Op, decode};
    use irqconnect::platform::PlatformFacts;
    use irqconnect::retarget::RetargetRequest;
    use irqconnect::{ApicModel, FlatRam, Handle, Platform, Service, Violation};
    let block = irqconnect::connect_ex::BlockSpan {
        start: 0x3000,
        len: 64,
    };
    let answers = |data: &[u8]| {
        let seq = decode(data);
        let mut facts = PlatformFacts::uniform(seq.cpus);
        facts.x2apic = seq.x2apic;
        facts.irqchip_mode = seq.mode;
        let platform = Platform::new(facts).unwrap();
        let devices = irqconnect::DeviceTable::default_for(&platform);
        let mut s = Service::new(platform, devices, seq.quota).unwrap();
        s.set_apic_model(seq.model).unwrap();
        let ram = FlatRam::new(0, 0x1_0000);
        let mut handles: Vec<Handle> = Vec::new();
        let mut out = Vec::new();
        for op in &seq.ops {
            match op {
                Op::Connect(r) => {
                    let a = s.connect(r, &ram).map(|c| {
                        handles.push(c.handle);
                        c.effective_mask
                    });
                    out.push(format!("{a:?}"));
                }
                Op::ConnectEx(r) => {
                    let a = s
                        .connect_ex(r, block, &ram)
                        .map(|c| {
                            handles.push(c.handle);
                            c.effective_mask
                        })
                        .map_err(|e| e.violation);
                    out.push(format!("{a:?}"));
                }
                Op::Retarget {
                    n,
                    group,
                    mask,
                    table,
                } => {
                    let handle = handles[n % handles.len()];
                    let own = s.registry().get(handle).map_or(0, |c| c.group);
                    let req = RetargetRequest {
                        handle,
                        group: group.unwrap_or(own),
                        processor_mask: *mask,
                        message_table: table.0,
                        message_table_length: table.1,
                    };
                    let a = s.retarget(&req, block, &ram).map(|r| r.effective_mask);
                    out.push(format!("{a:?}"));
                }
                Op::SetApicModel(m) => {
                    let model = ApicModel::from_abi(*m).unwrap();
                    out.push(format!("{:?}", s.set_apic_model(model)));
                }
                Op::DisconnectAll => {
                    for h in handles.drain(..) {
                        if let Some(version) = s.registry().get(h).map(|c| c.version) {
                            s.disconnect_ex(version, h).unwrap();
                        }
                    }
                }
                _ => {}
            }
        }
        out
    };
    let seeds = sequence_affinity_seeds();
    let find = |n: &str| seeds.iter().find(|(name, _)| *name == n).unwrap().1.clone();
    let err = |v: Violation| format!("Err({v:?})");
    assert_eq!(
        answers(&find("retarget-line-shared-union-and-refusals")),
        [
            "Ok(3)".to_string(),
            "Ok(4)".into(),
            "Ok(8)".into(),
            err(Violation::ProcessorsOutsideVm),
            err(Violation::RetargetGroupMismatch),
            err(Violation::RetargetTableMismatch),
        ]
    );
    assert_eq!(
        answers(&find("retarget-message-based-table")),
        [
            "Ok(15)".to_string(),
            "Ok(6)".into(),
            err(Violation::TableTooSmall),
            err(Violation::TableTooSmall),
        ]
    );
    assert_eq!(
        answers(&find("groups-255-x2apic-group-one-retarget-and-model")),
        [
            // x2APIC cluster 4 (IDs 64..79) has no logical form with 15
            // destination bits: one processor, physically.
            "Ok(1)".to_string(),
            "Ok(16)".into(),
            err(Violation::RetargetGroupMismatch),
            err(Violation::ConnectionsLive),
            "Ok(())".into(),
            "Ok(15)".into(),
        ]
    );
    assert_eq!(
        answers(&find("xapic-cluster-16-sharers-across-clusters")),
        [
            "Ok(240)".to_string(),
            err(Violation::NoCommonDestination),
            "Ok(48)".into(),
            err(Violation::NoCommonDestination),
            "Ok(64)".into(),
        ]
    );
}

/// The checked-in `seed-*` files are exactly what the seed builders above
/// produce (`WRITE_FUZZ_SEEDS=1 cargo test --test corpus_replay seed_files`
/// rewrites them).
#[test]
fn seed_files_match_their_builders() {
    corpus::seed_files_match(&workspace(), &all_seeds()).unwrap_or_else(|e| panic!("{e}"));
}
