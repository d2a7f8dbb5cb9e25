//! The `snapshot_restore` fuzz target's harness: a snapshot file from
//! arbitrary bytes through every check `vmm --restore` makes before it
//! opens KVM (`Loaded::decode`: header, checksum, sections, memory runs,
//! every state's decoding; then the PV service rebuilt from its state and
//! the chip state converted into each mode), without KVM.
//!
//! Input: byte 0 is a flag byte (bit 0: rewrite the file's CRC before
//! decoding, so that mutations reach the sections behind the checksum);
//! the rest is the file.
//!
//! Oracle: no panic (the fuzz target also bounds what one input may make
//! the process allocate); every refusal is one non-empty line, as the VMM
//! prints it; an accepted file's memory runs are page-aligned, ascending,
//! inside the file and inside the guest's memory, its sections agree with
//! its header, and a conversion that succeeds yields the target's mode with
//! one part per vCPU. [`seeds`] builds valid files of each mode from
//! synthetic states.

use irqchip::Mode;
use irqchip::ioapic::{Ioapic, IoapicConfig, NUM_PINS};
use irqchip::lapic::{Lapic, LapicConfig};
use irqchip_kvm::state::{
    Activity, CHIP_STATE_VERSION, ChipState, CountersState, IoapicSnapshot, KvmIoapicState,
    LapicSnapshot, Target, VcpuChipState,
};
use irqconnect_abi::layout::{LAPIC_BUS_HZ, PC_TESTDEV_IRQ_COUNT};

use crate::devices::fw_cfg::FwCfgState;
use crate::devices::pic::LegacyPic;
use crate::pv::PvState;
use crate::pv::config::{build_service, platform_facts, restore_service};
use crate::snapshot::file::{self, Header, PAGE, Tag};
use crate::snapshot::vcpu::VcpuState;
use crate::snapshot::{DevicesState, Loaded, Meta};

/// Fails unless `why` is one non-empty line.
fn one_line(what: &str, why: &str) -> Result<(), String> {
    if why.is_empty() || why.contains('\n') {
        Err(format!("{what}: not one line: {why:?}"))
    } else {
        Ok(())
    }
}

/// Runs one input (see the module documentation).
///
/// # Errors
///
/// The first broken invariant.
pub fn run(data: &[u8]) -> Result<(), String> {
    let Some((&flags, rest)) = data.split_first() else {
        return Ok(());
    };
    let mut bytes = rest.to_vec();
    if flags & 1 == 1 {
        file::fix_checksum(&mut bytes);
    }
    let len = bytes.len();
    let loaded = match Loaded::decode(bytes) {
        Ok(l) => l,
        Err(why) => return one_line("refusal", &why),
    };
    check_accepted(&loaded, len)
}

fn check_accepted(loaded: &Loaded, len: usize) -> Result<(), String> {
    let cpus = loaded.header.cpus as usize;
    if loaded.vcpus.len() != cpus || loaded.chip.vcpus.len() != cpus {
        return Err(format!(
            "accepted with {} and {} vCPU parts for {cpus} vCPUs",
            loaded.vcpus.len(),
            loaded.chip.vcpus.len()
        ));
    }
    let mut next = 0u64;
    for run in &loaded.runs {
        let end = run.gpa.checked_add(run.len as u64);
        let in_file = run.offset.checked_add(run.len).is_some_and(|e| e <= len);
        if !run.gpa.is_multiple_of(PAGE)
            || !(run.len as u64).is_multiple_of(PAGE)
            || run.gpa < next
            || end.is_none_or(|e| e > loaded.header.memory)
            || !in_file
        {
            return Err(format!(
                "accepted a memory run at {:#x}+{:#x} (file offset {}) of a {}-byte file, memory {:#x}",
                run.gpa, run.len, run.offset, len, loaded.header.memory
            ));
        }
        next = end.unwrap_or(u64::MAX);
    }
    for mode in Mode::ALL {
        let target = Target {
            mode,
            cpus,
            x2apic: loaded.meta.x2apic,
            phys_addr_bits: 40,
            tsc_deadline: true,
        };
        match loaded.chip.convert(&target) {
            Ok(state) => {
                if state.mode != mode || state.vcpus.len() != cpus {
                    return Err(format!("converted into {} mode wrongly", mode.name()));
                }
            }
            Err(e) => one_line("conversion", &e.to_string())?,
        }
        let facts = platform_facts(
            loaded.header.cpus,
            mode,
            loaded.meta.x2apic,
            loaded.meta.storm_threshold,
        );
        if let Err(why) = restore_service(facts, &loaded.pv) {
            one_line("PV service", &why)?;
        }
    }
    Ok(())
}

/// A valid snapshot file of a `cpus`-vCPU VM in `mode` with 2 MiB of
/// memory, two touched pages, built from synthetic states.
///
/// # Panics
///
/// When the synthetic states do not build (a harness bug).
#[allow(clippy::expect_used)]
pub fn synthetic_file(mode: Mode, cpus: u32) -> Vec<u8> {
    let x2apic = true;
    let threshold = irqchip_kvm::DEFAULT_STORM_THRESHOLD;
    let facts = platform_facts(cpus, mode, x2apic, threshold);
    let service = build_service(facts, None).expect("the default device table");
    let pv = PvState {
        service: service.snapshot(),
        table: serde_json::to_string(&service.devices().to_config()).expect("JSON"),
        object_quota: service.query_platform().object_quota,
        counters: Default::default(),
        storm_logged: 0,
        msidevs: Vec::new(),
    };
    let meta = Meta {
        x2apic,
        storm_threshold: threshold,
        restores: 0,
        tag: 1,
    };
    let vcpus: Vec<VcpuState> = (0..cpus).map(|_| VcpuState::zeroed()).collect();
    let devices = DevicesState {
        serial: vm_superio::SerialState::default(),
        pc_testdev: vec![false; usize::from(PC_TESTDEV_IRQ_COUNT)],
        fw_cfg: FwCfgState {
            selected: 0,
            offset: 0,
        },
        pic: (mode != Mode::Kernel).then(LegacyPic::new),
        testdevs: Vec::new(),
    };
    let memory = 2u64 << 20;
    let mut w = file::Writer::new(Header { mode, cpus, memory }, 1 << 16);
    w.state(Tag::Meta, &meta).expect("meta");
    w.state(Tag::Vcpus, &vcpus).expect("vcpus");
    w.state(Tag::Chip, &chip_state(mode, cpus, x2apic))
        .expect("chip");
    w.state(Tag::Devices, &devices).expect("devices");
    w.state(Tag::Pv, &pv).expect("pv");
    let low = [0x90u8; PAGE as usize];
    let code = [0xf4u8; PAGE as usize];
    w.memory([(0x7000, &low[..]), (0x10_0000, &code[..])]);
    w.finish()
}

/// The chip of a fresh VM in `mode` as a snapshot holds it.
fn chip_state(mode: Mode, cpus: u32, x2apic: bool) -> ChipState {
    let ours = |i: u32| {
        let lapic = Lapic::new(LapicConfig {
            apic_id: i,
            bsp: i == 0,
            x2apic,
            directed_eoi: true,
            phys_addr_bits: 40,
            bus_hz: LAPIC_BUS_HZ,
            tsc: None,
        });
        LapicSnapshot::Ours(Box::new(lapic.save()))
    };
    let kvm = |i: u32| {
        let mut page = vec![0u8; irqchip::lapic::KVM_LAPIC_PAGE_SIZE];
        page[0x20..0x24].copy_from_slice(&(i << 24).to_le_bytes());
        page[0xf0..0xf4].copy_from_slice(&0xffu32.to_le_bytes());
        LapicSnapshot::Kvm {
            page,
            apic_base: 0xfee0_0800 | if i == 0 { 1 << 8 } else { 0 },
            tsc_deadline: 0,
        }
    };
    let vcpus = (0..cpus)
        .map(|i| VcpuChipState {
            lapic: if mode.kvm_lapic() { kvm(i) } else { ours(i) },
            activity: if i == 0 {
                Activity::Running
            } else {
                Activity::WaitForSipi
            },
        })
        .collect();
    let ioapic = if mode.our_ioapic() {
        IoapicSnapshot::Ours(Box::new(Ioapic::new(IoapicConfig::default()).save()))
    } else {
        IoapicSnapshot::Kvm(KvmIoapicState {
            base_address: 0xfec0_0000,
            ioregsel: 0,
            id: 0,
            irr: 0,
            entries: vec![1 << 16; NUM_PINS],
        })
    };
    // `struct kvm_irqchip` of a PIC: chip_id and pad, then the state with
    // every input masked (IMR at offset 10).
    let mut pic = vec![0u8; 8 + 512];
    pic[10] = 0xff;
    ChipState {
        version: CHIP_STATE_VERSION,
        mode,
        x2apic,
        ioapic,
        pic: (mode == Mode::Kernel).then(|| [pic.clone(), pic]),
        vcpus,
        arbiter: (!mode.kvm_lapic()).then(Default::default),
        clock_ns: 0,
        lines: vec![0; NUM_PINS],
        line_assertions: vec![0; NUM_PINS],
        counters: CountersState::default(),
    }
}

/// The hand-made seeds of `snapshot_restore`: `(name, input)`, each input
/// a flag byte and a file (see the module documentation).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |flags: u8, file: Vec<u8>| {
        let mut input = vec![flags];
        input.extend(file);
        input
    };
    let user = synthetic_file(Mode::User, 2);
    let mut truncated = user.clone();
    truncated.truncate(user.len() - 100);
    let mut version = user.clone();
    version[8] = 2;
    let mut payload = user.clone();
    // A byte inside the first section's payload (the meta section), with
    // the checksum rewritten by the flag.
    payload[file::HEADER_LEN + 16] ^= 0x80;
    vec![
        ("kernel_one_vcpu", with(0, synthetic_file(Mode::Kernel, 1))),
        ("split_four_vcpus", with(0, synthetic_file(Mode::Split, 4))),
        ("user_two_vcpus", with(0, user)),
        ("truncated", with(0, truncated)),
        ("version_2", with(0, version)),
        ("payload_byte_flipped_checksum_fixed", with(1, payload)),
    ]
}

/// Whether `input` (a seed) decodes as a file every check accepts.
pub fn accepted(input: &[u8]) -> bool {
    let Some((&flags, rest)) = input.split_first() else {
        return false;
    };
    let mut bytes = rest.to_vec();
    if flags & 1 == 1 {
        file::fix_checksum(&mut bytes);
    }
    Loaded::decode(bytes).is_ok()
}
