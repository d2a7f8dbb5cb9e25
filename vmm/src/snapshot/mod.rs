//! Snapshot and restore of a running VM.
//!
//! - [`file`]: the versioned file (header, checksum, sections).
//! - [`vcpu`]: each vCPU's registers; [`memory`]: touched guest pages.
//! - [`Coordinator`]: the pause. A snapshot is asked for by the guest (the
//!   snapshot device, [`SnapshotDevice`]) or by SIGUSR1. The chip is
//!   paused (`Irqchip::pause`): every vCPU thread completes its last exit
//!   inside KVM, comes back with `Run::Paused` and waits here. Once all
//!   have, each saves its own registers and its part of the chip, while
//!   the event loop's thread (which runs every host timer and device
//!   input) waits for them; so nothing moves while the state is read.
//! - [`Snapshotter`]: on the event loop's thread, gathers the vCPUs'
//!   parts, saves the chip, the devices, the PV service and memory,
//!   writes the file, then resumes the VM or ends it
//!   (`--snapshot-then`).
//! - [`Loaded`]: a file read back for `--restore`, every check done
//!   before the VM is built.

pub(crate) mod file;
pub(crate) mod memory;
pub(crate) mod vcpu;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use irqchip_kvm::state::VcpuChipState;
use irqchip_kvm::{ChipState, Irqchip, Mode};
use irqconnect_abi::snapshot::{SIGNATURE, reg};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::{Access, BusDevice};
use crate::control::{Outcome, VmControl};
use crate::devices::fw_cfg::{FwCfg, FwCfgState};
use crate::devices::pc_testdev::PcTestdev;
use crate::devices::pic::LegacyPic;
use crate::devices::serial::Uart;
use crate::devices::testdev_port::{SharedTestdev, TestdevState};
use crate::error::{Error, Result};
use crate::pv::{PvConnect, PvState};
use file::{Header, Tag};
use vcpu::VcpuState;

/// How long the event loop waits for every vCPU to reach its pause point
/// before it gives up on a snapshot (a vCPU thread that died).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The snapshot's own facts: the VM's configuration the file restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// x2APIC offered in CPUID.
    pub(crate) x2apic: bool,
    /// The storm threshold the chip and the PV service used.
    pub(crate) storm_threshold: u32,
    /// Restores this VM went through before this snapshot.
    pub(crate) restores: u32,
    /// The value the guest wrote to the request register (0 for SIGUSR1).
    pub(crate) tag: u32,
}

/// The devices' state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DevicesState {
    /// COM1, through vm-superio's own state.
    #[serde(with = "SerialStateDef")]
    pub(crate) serial: vm_superio::SerialState,
    /// The pc-testdev line levels.
    pub(crate) pc_testdev: Vec<bool>,
    /// fw_cfg's selector and offset.
    pub(crate) fw_cfg: FwCfgState,
    /// The 8259 port model (split and user modes).
    pub(crate) pic: Option<LegacyPic>,
    /// The test devices, with their timers.
    pub(crate) testdevs: Vec<TestdevState>,
}

/// serde for vm-superio's `SerialState`: serde's remote derive checks
/// every field against vm-superio's type at compile time, so the state is
/// vm-superio's (`Serial::state` / `Serial::from_state`), not a copy.
#[derive(Serialize, Deserialize)]
#[serde(remote = "vm_superio::SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// What one vCPU thread hands over at the pause.
pub(crate) struct VcpuCapture {
    /// Its registers.
    pub(crate) arch: VcpuState,
    /// Its part of the chip.
    pub(crate) chip: VcpuChipState,
}

struct Phase {
    /// A snapshot is in progress.
    active: bool,
    generation: u64,
    arrived: usize,
    capture: bool,
    parts: Vec<Option<std::result::Result<VcpuCapture, String>>>,
    released: u64,
    tag: u32,
}

/// The pause every vCPU thread and the event loop meet at.
pub(crate) struct Coordinator {
    cpus: usize,
    chip: Irqchip,
    phase: Mutex<Phase>,
    cv: Condvar,
    request: EventFd,
    /// Restores this VM went through (the RESTORES register).
    restores: AtomicU32,
    /// Whether `--snapshot` was given.
    enabled: bool,
    /// Requests the device ignored (no `--snapshot`).
    ignored: AtomicU64,
}

impl Coordinator {
    /// The coordinator of a VM with `cpus` vCPUs.
    pub(crate) fn new(
        cpus: usize,
        chip: Irqchip,
        enabled: bool,
        restores: u32,
    ) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            cpus,
            chip,
            phase: Mutex::new(Phase {
                active: false,
                generation: 0,
                arrived: 0,
                capture: false,
                parts: Vec::new(),
                released: 0,
                tag: 0,
            }),
            cv: Condvar::new(),
            request: EventFd::new(EFD_NONBLOCK)
                .map_err(Error::host("create the snapshot eventfd"))?,
            restores: AtomicU32::new(restores),
            enabled,
            ignored: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The eventfd the event loop watches.
    pub(crate) fn event(&self) -> &EventFd {
        &self.request
    }

    /// Starts a pause for a snapshot tagged `tag` (any thread); nothing
    /// when one is in progress. The vCPUs stop before they next enter the
    /// guest; the event loop takes the snapshot.
    pub(crate) fn request(&self, tag: u32) {
        if self.start(tag)
            && let Err(e) = self.request.write(1)
        {
            log::error!("wake the event loop for a snapshot: {e}");
        }
    }

    /// Starts a pause tagged `tag` unless one is in progress (then false),
    /// without waking the event loop: the event loop's own start
    /// (SIGUSR1), or [`Coordinator::request`]'s.
    fn start(&self, tag: u32) -> bool {
        {
            let mut p = self.lock();
            if p.active {
                return false;
            }
            p.active = true;
            p.generation += 1;
            p.arrived = 0;
            p.capture = false;
            p.parts = (0..self.cpus).map(|_| None).collect();
            p.tag = tag;
        }
        self.chip.pause();
        true
    }

    /// A vCPU thread whose run came back `Paused`: waits until the
    /// snapshot is taken, saving its part with `capture` when asked.
    pub(crate) fn paused(
        &self,
        index: usize,
        mut capture: impl FnMut() -> Result<VcpuCapture>,
        stopping: impl Fn() -> bool,
    ) {
        let mut p = self.lock();
        if !p.active {
            return;
        }
        let generation = p.generation;
        p.arrived += 1;
        self.cv.notify_all();
        loop {
            if p.released >= generation || stopping() {
                return;
            }
            if p.capture && p.parts.get(index).is_some_and(Option::is_none) {
                drop(p);
                let part = capture().map_err(|e| e.to_string());
                p = self.lock();
                if let Some(slot) = p.parts.get_mut(index) {
                    *slot = Some(part);
                }
                self.cv.notify_all();
                continue;
            }
            p = self
                .cv
                .wait_timeout(p, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The event loop: waits for every vCPU at its pause point, has each
    /// save its part, and returns the parts in vCPU order with the tag.
    fn gather(&self, control: &VmControl) -> Result<(Vec<VcpuCapture>, u32)> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut p = self.lock();
        while p.arrived < self.cpus {
            if control.stopping() || Instant::now() >= deadline {
                return Err(Error::Snapshot(format!(
                    "only {} of {} vCPUs reached the pause",
                    p.arrived, self.cpus
                )));
            }
            p = self
                .cv
                .wait_timeout(p, Duration::from_millis(20))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        p.capture = true;
        self.cv.notify_all();
        while p.parts.iter().any(Option::is_none) {
            if control.stopping() || Instant::now() >= deadline {
                return Err(Error::Snapshot("a vCPU did not save its state".into()));
            }
            p = self
                .cv
                .wait_timeout(p, Duration::from_millis(20))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let tag = p.tag;
        let mut parts = Vec::with_capacity(self.cpus);
        for (i, part) in p.parts.iter_mut().enumerate() {
            match part.take() {
                Some(Ok(c)) => parts.push(c),
                Some(Err(e)) => return Err(Error::Snapshot(format!("vCPU {i}: {e}"))),
                None => return Err(Error::Snapshot(format!("vCPU {i} saved nothing"))),
            }
        }
        Ok((parts, tag))
    }

    /// Ends the pause: the vCPUs run again (or see the stop flag).
    pub(crate) fn release(&self) {
        {
            let mut p = self.lock();
            p.active = false;
            p.released = p.generation;
            p.parts.clear();
        }
        self.chip.resume();
        self.cv.notify_all();
    }
}

/// The snapshot device at `SNAPSHOT_PORT` (`irqconnect_abi::snapshot`).
pub(crate) struct SnapshotDevice {
    coordinator: Arc<Coordinator>,
}

impl SnapshotDevice {
    /// The device of `coordinator`'s VM.
    pub(crate) fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

impl BusDevice for SnapshotDevice {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (o, 4) if o == u64::from(reg::REQUEST) => {
                if self.coordinator.enabled {
                    SIGNATURE
                } else {
                    0
                }
            }
            (o, 4) if o == u64::from(reg::RESTORES) => {
                self.coordinator.restores.load(Ordering::Relaxed)
            }
            _ => u32::MAX,
        };
        for (d, s) in data.iter_mut().zip(value.to_le_bytes().iter().cycle()) {
            *d = *s;
        }
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        if offset != u64::from(reg::REQUEST) || data.len() != 4 {
            self.coordinator.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !self.coordinator.enabled {
            self.coordinator.ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let tag = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.coordinator.request(tag);
    }
}

/// The eventfd SIGUSR1's handler writes (-1: none).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigusr1(_: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is the coordinator's
        // eventfd, open for the VM's lifetime (the handler is reset to
        // the default before it closes); the buffer is 8 valid bytes.
        unsafe {
            libc::write(fd, (&raw const one).cast(), 8);
        }
    }
}

/// SIGUSR1 asks for a snapshot: installs the handler that wakes the event
/// loop through `coordinator`'s eventfd. [`uninstall_sigusr1`] before the
/// coordinator goes.
pub(crate) fn install_sigusr1(coordinator: &Coordinator) -> Result<()> {
    use std::os::fd::AsRawFd;
    SIGNAL_FD.store(coordinator.event().as_raw_fd(), Ordering::Relaxed);
    // SAFETY: the handler only loads an atomic and calls write(2), both
    // async-signal-safe; sigaction gets a zeroed, then filled, struct.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigusr1 as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(Error::host("install the SIGUSR1 handler")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Puts SIGUSR1 back to its default action.
pub(crate) fn uninstall_sigusr1() {
    // SAFETY: resetting a signal's disposition to SIG_DFL touches no memory
    // of ours.
    unsafe {
        libc::signal(libc::SIGUSR1, libc::SIG_DFL);
    }
    SIGNAL_FD.store(-1, Ordering::Relaxed);
}

/// Everything a snapshot reads, held by the event loop.
pub(crate) struct Snapshotter {
    /// `--snapshot` (None: SIGUSR1 is refused with a warning).
    pub(crate) path: Option<PathBuf>,
    /// `--snapshot-then exit`.
    pub(crate) exit_after: bool,
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) chip: Irqchip,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) pv: Arc<PvConnect>,
    pub(crate) uart: Arc<Mutex<Uart>>,
    pub(crate) pc_testdev: Arc<Mutex<PcTestdev<irqchip_kvm::IrqLine>>>,
    pub(crate) fw_cfg: Arc<Mutex<FwCfg>>,
    pub(crate) pic: Option<Arc<Mutex<LegacyPic>>>,
    pub(crate) testdevs: Vec<SharedTestdev>,
    pub(crate) header: Header,
    pub(crate) meta: Meta,
}

fn locked<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Snapshotter {
    /// The event loop saw the request eventfd (the guest's request or
    /// SIGUSR1): takes the snapshot, then resumes or ends the VM.
    pub(crate) fn on_request(&mut self) {
        let _ = self.coordinator.event().read();
        let Some(path) = self.path.clone() else {
            log::warn!("SIGUSR1: no --snapshot PATH was given; no snapshot taken");
            return;
        };
        self.coordinator.start(0);
        let started = Instant::now();
        match self.take(&path) {
            Ok(bytes) => {
                eprintln!(
                    "vmm: snapshot: {} ({bytes} bytes), vCPUs paused {:.1} ms",
                    path.display(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                if self.exit_after {
                    self.control.finish(Outcome::Snapshot(path));
                }
            }
            Err(e) => self.control.finish(Outcome::Failed(e)),
        }
        self.coordinator.release();
    }

    /// Takes the snapshot into `path`; returns its size.
    fn take(&self, path: &Path) -> Result<usize> {
        let (parts, tag) = self.coordinator.gather(&self.control)?;
        let (arch, chip_parts): (Vec<VcpuState>, Vec<VcpuChipState>) =
            parts.into_iter().map(|p| (p.arch, p.chip)).unzip();
        let chip = self.chip.save(chip_parts)?;
        let devices = DevicesState {
            serial: locked(&self.uart).state(),
            pc_testdev: locked(&self.pc_testdev).levels(),
            fw_cfg: locked(&self.fw_cfg).save(),
            pic: self.pic.as_ref().map(|p| locked(p).clone()),
            testdevs: self
                .testdevs
                .iter()
                .map(|t| locked(t).save())
                .collect::<Result<_>>()?,
        };
        let pv = self.pv.save();
        let meta = Meta {
            tag,
            restores: self.coordinator.restores.load(Ordering::Relaxed),
            ..self.meta.clone()
        };
        // SAFETY: every vCPU is paused (gathered above) and this thread
        // runs the event loop, so no device writes guest RAM until the
        // coordinator releases the vCPUs, after the file is built.
        let frozen = unsafe { memory::Frozen::new(&self.mem) }?;
        let runs = frozen.runs()?;
        let total: usize = runs.iter().map(|(_, d)| d.len() + 16).sum();
        let mut w = file::Writer::new(self.header, total + (1 << 20));
        let encode = |e: String| Error::Snapshot(e);
        w.state(Tag::Meta, &meta).map_err(encode)?;
        w.state(Tag::Vcpus, &arch).map_err(encode)?;
        w.state(Tag::Chip, &chip).map_err(encode)?;
        w.state(Tag::Devices, &devices).map_err(encode)?;
        w.state(Tag::Pv, &pv).map_err(encode)?;
        w.memory(runs);
        let bytes = w.finish();
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| Error::WriteFile {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(bytes.len())
    }
}

/// A snapshot file read back and decoded: every check of [`file::decode`]
/// passed and every state section decoded.
pub(crate) struct Loaded {
    /// The file's bytes (memory runs point into them).
    pub(crate) bytes: Vec<u8>,
    pub(crate) header: Header,
    pub(crate) meta: Meta,
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) chip: ChipState,
    pub(crate) devices: DevicesState,
    pub(crate) pv: PvState,
    pub(crate) runs: Vec<file::Run>,
}

impl Loaded {
    /// Decodes `bytes` (see [`file::decode`]) and checks the sections
    /// agree with the header.
    pub(crate) fn decode(bytes: Vec<u8>) -> std::result::Result<Self, String> {
        let (header, meta, vcpus, chip, devices, pv, runs) = {
            let s = file::decode(&bytes).map_err(|e| e.to_string())?;
            let meta: Meta = s.decode(Tag::Meta).map_err(|e| e.to_string())?;
            let vcpus: Vec<VcpuState> = s.decode(Tag::Vcpus).map_err(|e| e.to_string())?;
            let chip: ChipState = s.decode(Tag::Chip).map_err(|e| e.to_string())?;
            let devices: DevicesState = s.decode(Tag::Devices).map_err(|e| e.to_string())?;
            let pv: PvState = s.decode(Tag::Pv).map_err(|e| e.to_string())?;
            (s.header, meta, vcpus, chip, devices, pv, s.runs)
        };
        let cpus = header.cpus as usize;
        if vcpus.len() != cpus || chip.vcpus.len() != cpus {
            return Err(format!(
                "the header says {cpus} vCPUs, the sections hold {} and {}",
                vcpus.len(),
                chip.vcpus.len()
            ));
        }
        if chip.mode != header.mode {
            return Err(format!(
                "the header says {} mode, the chip section {}",
                header.mode.name(),
                chip.mode.name()
            ));
        }
        if chip.x2apic != meta.x2apic {
            return Err("the chip and meta sections disagree on x2APIC".into());
        }
        Ok(Self {
            bytes,
            header,
            meta,
            vcpus,
            chip,
            devices,
            pv,
            runs,
        })
    }

    /// Reads and decodes `path`: the header is checked before the rest is
    /// read, so a wrong or oversized file costs no more than its header.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let fail = |why: String| Error::Restore {
            path: path.to_path_buf(),
            why,
        };
        let mut f = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let len = f.metadata().map_err(|e| fail(e.to_string()))?.len();
        let mut head = [0u8; file::HEADER_LEN];
        let got = read_up_to(&mut f, &mut head).map_err(|e| fail(e.to_string()))?;
        file::check_header(&head[..got], len).map_err(|e| fail(e.to_string()))?;
        let total = usize::try_from(len).map_err(|_| fail("too large".into()))?;
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(total)
            .map_err(|_| fail(format!("cannot allocate {total} bytes to read it")))?;
        bytes.extend_from_slice(&head);
        f.take(len - head.len() as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(e.to_string()))?;
        Self::decode(bytes).map_err(fail)
    }

    /// The target mode: `--irqchip` when given, else the snapshot's.
    pub(crate) fn mode(&self, given: Option<Mode>) -> Mode {
        given.unwrap_or(self.header.mode)
    }
}

fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Runs the decoding of a snapshot file on arbitrary bytes, for the
/// `snapshot_restore` fuzz target and its corpus replay: never panics;
/// `Ok` only for a file every check accepts. The first byte chooses
/// whether the checksum is fixed first (odd), so inputs also reach the
/// sections behind it.
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode(data: &[u8]) -> std::result::Result<(), String> {
    let Some((&mode, rest)) = data.split_first() else {
        return Err("empty".into());
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 {
        file::fix_checksum(&mut bytes);
    }
    // As `Loaded::read` does: the header first, against the length.
    file::check_header(&bytes, bytes.len() as u64).map_err(|e| e.to_string())?;
    let loaded = Loaded::decode(bytes)?;
    // What the restore checks before it touches KVM: the chip state in
    // every mode it could be restored into.
    for target in Mode::ALL {
        let _ = loaded.chip.convert(&irqchip_kvm::state::Target {
            mode: target,
            cpus: loaded.header.cpus as usize,
            x2apic: loaded.meta.x2apic,
            phys_addr_bits: 40,
            tsc_deadline: true,
        });
    }
    Ok(())
}
