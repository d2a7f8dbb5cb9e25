//! Putting a VM together, running it, and taking it apart.
//!
//! Order matters: guest RAM, the VM, the interrupt controller (before any
//! vCPU), the image, every vCPU (all created before the BSP runs, so no
//! early SIPI is lost), the devices, the kick handler, the event loop; then
//! one thread per vCPU. Teardown joins every vCPU thread before the VM and
//! then guest RAM go away.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VmFd};

use irqchip_kvm::Irqchip;

use crate::cli::Args;
use crate::control::{Outcome, VmControl};
use crate::cpuid::{self, CpuidConfig};
use crate::devices::{self, DeviceConfig};
use crate::error::{Error, Result};
use crate::event_loop::{EventLoop, LoopConfig};
use crate::loader::{self, ModuleImage};
use crate::report::GuestReport;
use crate::snapshot::{self, Coordinator, Loaded, Snapshotter};
use crate::stats::RunStats;
use crate::trace::{self, Recorder};
use crate::vcpu::{Vcpu, VcpuShared, VcpuStats};
use crate::{boot, memory, pv};

/// Guest-physical address of the 3-page TSS area KVM needs on Intel
/// (`KVM_SET_TSS_ADDR`), just below the identity-map page, both far above RAM.
const TSS_ADDR: usize = 0xfffb_d000;
/// Guest-physical address of the identity-map page (`KVM_SET_IDENTITY_MAP_ADDR`).
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// How a run ended, with what the VMM prints at the end.
pub(crate) struct Finished {
    /// The guest's exit value or the error that stopped the VM.
    pub(crate) outcome: Outcome,
    /// The closing statistics line.
    pub(crate) stats: String,
}

/// Opens `/dev/kvm` with an actionable message on failure.
pub(crate) fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(|e| {
        Error::KvmOpen(match e.errno() {
            libc::ENOENT => "no such device; load the KVM module (kvm_intel or kvm_amd) or enable virtualization".to_string(),
            libc::EACCES | libc::EPERM => {
                "permission denied; add yourself to the kvm group or run as root".to_string()
            }
            _ => e.to_string(),
        })
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::KvmApiVersion(version));
    }
    for (cap, name) in [
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::MpState, "KVM_CAP_MP_STATE"),
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCapability(name));
        }
    }
    Ok(kvm)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// The kernel image: `--kernel` or the embedded guest.
fn kernel_image(args: &Args, embedded: &[u8]) -> Result<(String, Vec<u8>)> {
    match &args.kernel {
        Some(path) => Ok((path.display().to_string(), read_file(path)?)),
        None => Ok(("embedded guest image".to_string(), embedded.to_vec())),
    }
}

/// `--module "PATH [ARGS]"`: the first word is the file, the whole string
/// its command line (as GRUB passes it).
fn modules(args: &Args) -> Result<Vec<ModuleImage>> {
    args.modules
        .iter()
        .map(|spec| {
            let path = spec.split_whitespace().next().unwrap_or_default();
            Ok(ModuleImage {
                bytes: read_file(Path::new(path))?,
                cmdline: spec.trim().to_string(),
            })
        })
        .collect()
}

/// Re-deliveries of a still-asserted level pin after EOI past which our
/// IOAPIC reports a storm and the PV storm guard masks the pin: the chip's
/// default, given to the chip and reported by the PV service alike.
const STORM_THRESHOLD: u32 = irqchip_kvm::DEFAULT_STORM_THRESHOLD;

/// Creates the interrupt controller; before any vCPU exists. It kicks the
/// vCPUs through `control`'s kicker; user mode takes the guest's
/// physical-address width from `supported` (CPUID 0x8000_0008).
fn create_irqchip(
    args: &Args,
    vm: &Arc<VmFd>,
    control: &Arc<VmControl>,
    supported: &kvm_bindings::CpuId,
    trace: Option<&Arc<Recorder>>,
    storm_threshold: u32,
) -> Result<Irqchip> {
    let mut builder = Irqchip::builder(Arc::clone(vm), args.irqchip)
        .cpus(args.cpus as usize)
        .x2apic(args.x2apic.is_on())
        .phys_addr_bits(irqchip_kvm::cpuid::phys_addr_bits(supported.as_slice()))
        .kicker(Arc::clone(control.kicker()))
        .storm_threshold(storm_threshold);
    if let Some(recorder) = trace {
        builder = builder.trace(Arc::clone(recorder) as Arc<dyn irqchip_kvm::TraceSink>);
    }
    Ok(builder.build()?)
}

/// Creates an output file a flag names, before the VM exists, so a path
/// that cannot be written is a usage error and not a lost run.
fn create_output(flag: &'static str, path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(|source| Error::OutputFile {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `--trace`'s file from `recorder`.
fn write_trace(
    file: std::fs::File,
    path: &Path,
    recorder: &Recorder,
    meta: &trace::json::Meta,
) -> Result<()> {
    let (events, dropped) = recorder.take();
    let mut out = std::io::BufWriter::new(file);
    trace::json::write(&mut out, &events, dropped, meta)
        .and_then(|()| out.flush())
        .map_err(|source| Error::WriteFile {
            path: path.to_path_buf(),
            source,
        })
}

/// The arguments of a restored VM: the snapshot's vCPU count, memory and
/// x2APIC offer, its mode unless `--irqchip` names another.
fn restored_args(args: &Args, loaded: &Loaded) -> Args {
    let mut out = args.clone();
    out.cpus = loaded.header.cpus;
    out.memory = loaded.header.memory >> 20;
    out.x2apic = if loaded.meta.x2apic {
        crate::cli::OnOff::On
    } else {
        crate::cli::OnOff::Off
    };
    out.irqchip = loaded.mode(args.irqchip_given.then_some(args.irqchip));
    out
}

/// Builds the VM from `args`, runs it to the end and tears it down.
/// `serial_out` receives the guest's COM1 output; `embedded` is the kernel
/// when `--kernel` is absent.
pub(crate) fn run(
    args: &Args,
    serial_out: Box<dyn Write + Send>,
    embedded: &[u8],
) -> Result<Finished> {
    let restore_started = Instant::now();
    // Every check of a snapshot file comes before KVM is opened.
    let loaded = match &args.restore {
        Some(path) => Some(Loaded::read(path)?),
        None => None,
    };
    let restored;
    let args = match &loaded {
        Some(l) => {
            restored = restored_args(args, l);
            &restored
        }
        None => args,
    };
    let restore_error = |why: String| Error::Restore {
        path: args.restore.clone().unwrap_or_default(),
        why,
    };
    let (image_name, image) = match &args.restore {
        Some(path) => (format!("snapshot {}", path.display()), Vec::new()),
        None => kernel_image(args, embedded)?,
    };
    let modules = modules(args)?;
    let cpus = args.cpus as usize;
    let ram = args.memory << 20;
    let load_error = |source| Error::Load {
        what: image_name.clone(),
        source,
    };
    let storm_threshold = loaded
        .as_ref()
        .map_or(STORM_THRESHOLD, |l| l.meta.storm_threshold);
    let pv_service = match &loaded {
        None => {
            loader::check(ram, &image, &args.guest_cmdline(), &modules).map_err(load_error)?;
            // Before KVM too: a bad --devices table is a one-line error.
            pv::config::service_from_args(args, STORM_THRESHOLD)?
        }
        Some(l) => pv::config::restore_service(
            pv::config::platform_facts(
                args.cpus,
                args.irqchip,
                args.x2apic.is_on(),
                storm_threshold,
            ),
            &l.pv,
        )
        .map_err(restore_error)?,
    };
    let trace_file = match &args.trace {
        Some(path) => Some((create_output("--trace", path)?, path)),
        None => None,
    };
    let stats_file = match &args.stats_json {
        Some(path) => Some((create_output("--stats-json", path)?, path)),
        None => None,
    };
    let recorder = trace_file.as_ref().map(|_| {
        Arc::new(Recorder::new(
            usize::try_from(args.trace_limit).unwrap_or(usize::MAX),
        ))
    });

    let kvm = open_kvm()?;
    // Guest RAM is declared before the VM so it is dropped after it.
    let mem = memory::create(ram)?;
    let vm = Arc::new(kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?);
    vm.set_tss_address(TSS_ADDR)
        .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(Error::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
    memory::register(&vm, &mem)?;
    let control = Arc::new(VmControl::new(cpus)?);
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let chip = create_irqchip(
        args,
        &vm,
        &control,
        &supported,
        recorder.as_ref(),
        storm_threshold,
    )?;
    // The chip's state in this VM's mode, refused before anything runs.
    let chip_state = match &loaded {
        Some(l) => {
            snapshot::vcpu::check_xsave(&vm)?;
            Some(
                chip.convert(&l.chip)
                    .map_err(|e| restore_error(e.to_string()))?,
            )
        }
        None => None,
    };

    let boot_entry = match &loaded {
        None => {
            let entry =
                loader::load(&mem, &image, &args.guest_cmdline(), &modules).map_err(load_error)?;
            log::debug!("{image_name}: {entry:x?}");
            Some(entry)
        }
        Some(l) => {
            snapshot::memory::restore(&mem, &l.bytes, &l.runs)?;
            None
        }
    };

    let cpuid_cfg = CpuidConfig {
        cpus: args.cpus,
        features: chip.cpuid_features(),
    };
    let mut vcpus = Vec::with_capacity(cpus);
    for i in 0..cpus {
        let fd = vm
            .create_vcpu(i as u64)
            .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpuid::vcpu_cpuid(&supported, i as u32, cpuid_cfg)?)
            .map_err(Error::kvm("KVM_SET_CPUID2"))?;
        if i == 0
            && let Some(entry) = &boot_entry
        {
            boot::setup_bsp(&fd, entry)?;
        }
        vcpus.push(fd);
    }
    // Every vCPU exists before any part of the chip runs (no early SIPI is
    // lost); the chip leaves the APs waiting for INIT/SIPI.
    let mut vcpu_chips = vcpus
        .iter()
        .enumerate()
        .map(|(i, fd)| chip.vcpu(i, fd))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let msrs = Arc::new(snapshot::vcpu::msr_indices(&kvm)?);
    let coordinator = Coordinator::new(
        cpus,
        chip.clone(),
        args.snapshot.is_some(),
        loaded
            .as_ref()
            .map_or(0, |l| l.meta.restores.saturating_add(1)),
    )?;

    let mut guest_report = GuestReport::new();
    if let Some(recorder) = &recorder {
        guest_report.set_trace(Arc::clone(recorder));
    }
    let report = Arc::new(Mutex::new(guest_report));
    let pv = pv::PvConnect::new(
        pv_service,
        mem.clone(),
        chip.clone(),
        Arc::new(chip.clone()),
    );
    chip.set_storm_sink(pv.storm_sink());
    let devices = devices::build(
        &DeviceConfig {
            cpus: args.cpus as u16,
            ram,
            mode: args.irqchip,
            testdevs: pv.testdev_specs(),
            msidevs: pv.msidevs().to_vec(),
            pv_doorbell: Some(pv::doorbell::Doorbell::shared(&pv, recorder.clone())),
            snapshot: Some(Arc::new(Mutex::new(snapshot::SnapshotDevice::new(
                Arc::clone(&coordinator),
            )))),
            serial_state: loaded.as_ref().map(|l| l.devices.serial.clone()),
        },
        &chip,
        &control,
        &report,
        serial_out,
    )?;
    if let (Some(l), Some(state)) = (&loaded, &chip_state) {
        restore_vm(l, state, &chip, &vcpus, &mut vcpu_chips, &devices, &pv).map_err(
            |e| match e {
                Error::Restore { .. } => e,
                other => restore_error(other.to_string()),
            },
        )?;
    }
    let snapshotter = Snapshotter {
        path: args.snapshot.clone(),
        exit_after: args.snapshot_then == crate::cli::SnapshotThen::Exit,
        coordinator: Arc::clone(&coordinator),
        control: Arc::clone(&control),
        chip: chip.clone(),
        mem: mem.clone(),
        pv: Arc::clone(&pv),
        uart: Arc::clone(&devices.uart),
        pc_testdev: Arc::clone(&devices.pc_testdev),
        fw_cfg: Arc::clone(&devices.fw_cfg),
        pic: devices.pic.clone(),
        testdevs: devices.testdevs.clone(),
        header: snapshot::file::Header {
            mode: args.irqchip,
            cpus: args.cpus,
            memory: ram,
        },
        meta: snapshot::Meta {
            x2apic: args.x2apic.is_on(),
            storm_threshold,
            restores: 0,
            tag: 0,
        },
    };
    snapshot::install_sigusr1(&coordinator)?;
    let mut event_loop = EventLoop::new(LoopConfig {
        control: Arc::clone(&control),
        uart: Arc::clone(&devices.uart),
        testdevs: devices.testdevs.clone(),
        report: Arc::clone(&report),
        timeout: args.timeout,
        stdin: true,
        chip: chip.clone(),
        snapshotter: Some(snapshotter),
    })?;

    if let (Some(path), Some(l)) = (&args.restore, &loaded) {
        eprintln!(
            "vmm: restore: {} ({} bytes) ready to resume in {:.1} ms",
            path.display(),
            l.bytes.len(),
            restore_started.elapsed().as_secs_f64() * 1e3
        );
    }
    let start = Instant::now();
    let mut threads = Vec::with_capacity(cpus);
    let shared = VcpuShared {
        pio: Arc::clone(&devices.pio),
        mmio: Arc::clone(&devices.mmio),
        control: Arc::clone(&control),
        coordinator: Arc::clone(&coordinator),
        msrs: Arc::clone(&msrs),
    };
    for (i, (fd, part)) in vcpus.into_iter().zip(vcpu_chips).enumerate() {
        let vcpu = Vcpu::new(i, fd, part, &shared);
        match std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || vcpu.run())
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                control.finish(Outcome::Failed(Error::host("start a vCPU thread")(e)));
                break;
            }
        }
    }
    if let Err(e) = event_loop.run() {
        control.finish(Outcome::Failed(e));
    }
    chip.shutdown();
    let mut vcpu_stats = VcpuStats::default();
    for t in threads {
        match t.join() {
            Ok(s) => vcpu_stats.add(&s),
            Err(_) => control.finish(Outcome::Failed(Error::Host {
                op: "vCPU thread",
                source: std::io::Error::other("a vCPU thread panicked"),
            })),
        }
    }
    let elapsed = start.elapsed();
    snapshot::uninstall_sigusr1();
    drop(event_loop);
    devices
        .uart
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .writer_mut()
        .finish();

    let outcome = control.take_outcome().unwrap_or_else(|| {
        Outcome::Failed(Error::Host {
            op: "run the VM",
            source: std::io::Error::other("the VM stopped without a recorded reason"),
        })
    });
    {
        let mut report = report.lock().unwrap_or_else(PoisonError::into_inner);
        if let Outcome::Failed(e) = &outcome {
            report.abort_current(&e.to_string());
        }
        if let Outcome::Snapshot(path) = &outcome {
            log::info!("snapshot written to {}; the VM stopped", path.display());
        }
        if let Some(path) = &args.junit {
            let xml = report.junit(
                "guest",
                &[
                    ("irqchip", chip.mode().name().to_string()),
                    ("cpus", args.cpus.to_string()),
                    ("x2apic", format!("{:?}", args.x2apic).to_lowercase()),
                    ("image", image_name.clone()),
                ],
            );
            std::fs::write(path, xml).map_err(|source| Error::WriteFile {
                path: path.clone(),
                source,
            })?;
        }
        if let Some((passed, failed)) = report.summary() {
            log::info!("guest summary: {passed} passed, {failed} failed");
        }
    }
    let run_stats = RunStats {
        elapsed,
        vcpu: vcpu_stats,
        pio: &devices.pio,
        mmio: &devices.mmio,
        chip: &chip,
        pv: pv.stats(),
    };
    if let Some((file, path)) = stats_file {
        let write = |file: std::fs::File| -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(file);
            serde_json::to_writer_pretty(&mut out, &run_stats.json())?;
            out.write_all(b"\n")?;
            out.flush()
        };
        write(file).map_err(|source| Error::WriteFile {
            path: path.clone(),
            source,
        })?;
    }
    if let (Some((file, path)), Some(recorder)) = (trace_file, &recorder) {
        let meta = trace::json::Meta {
            mode: chip.mode(),
            cpus,
            limit: usize::try_from(args.trace_limit).unwrap_or(usize::MAX),
        };
        write_trace(file, path, recorder, &meta)?;
    }
    let stats = run_stats.line();
    Ok(Finished { outcome, stats })
}

/// Puts a snapshot's state into the freshly built VM: the chip's VM-wide
/// part, each vCPU (registers, its part of the chip, events last), the
/// devices and the PV service. Nothing has run yet.
fn restore_vm(
    loaded: &Loaded,
    chip_state: &irqchip_kvm::ChipState,
    chip: &Irqchip,
    vcpus: &[kvm_ioctls::VcpuFd],
    vcpu_chips: &mut [irqchip_kvm::VcpuChip],
    devices: &devices::Devices,
    pv: &pv::PvConnect,
) -> Result<()> {
    let fail = |why: String| Error::Snapshot(why);
    chip.restore(chip_state)?;
    for (i, ((fd, part), arch)) in vcpus
        .iter()
        .zip(vcpu_chips.iter_mut())
        .zip(&loaded.vcpus)
        .enumerate()
    {
        snapshot::vcpu::restore_registers(fd, arch).map_err(|e| fail(format!("vCPU {i}: {e}")))?;
        let state = chip_state
            .vcpus
            .get(i)
            .ok_or_else(|| fail(format!("vCPU {i} has no chip state")))?;
        part.restore(fd, state)
            .map_err(|e| fail(format!("vCPU {i}: {e}")))?;
        snapshot::vcpu::restore_events(fd, arch).map_err(|e| fail(format!("vCPU {i}: {e}")))?;
    }
    let saved = &loaded.devices;
    devices
        .pc_testdev
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .restore_levels(&saved.pc_testdev)
        .map_err(fail)?;
    devices
        .fw_cfg
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .restore(saved.fw_cfg);
    if let (Some(pic), Some(state)) = (&devices.pic, &saved.pic) {
        *pic.lock().unwrap_or_else(PoisonError::into_inner) = state.clone();
    }
    let specs = pv.testdev_specs();
    if saved.testdevs.len() != devices.testdevs.len() || specs.len() != devices.testdevs.len() {
        return Err(fail(format!(
            "{} test devices saved, the VM has {}",
            saved.testdevs.len(),
            devices.testdevs.len()
        )));
    }
    for ((slot, state), spec) in devices.testdevs.iter().zip(&saved.testdevs).zip(specs) {
        slot.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .restore(state, spec)
            .map_err(fail)?;
    }
    pv.restore(&loaded.pv).map_err(fail)
}
