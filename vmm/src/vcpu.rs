//! One thread per vCPU: enter the guest through the chip, handle the exit,
//! repeat.
//!
//! The loop is the same in every `--irqchip` mode: `VcpuChip::run` (from
//! `irqchip-kvm`) does the interrupt controller's work around each
//! `KVM_RUN` and handles the exits that belong to it (LAPIC MMIO and MSRs,
//! interrupt windows, `KVM_EXIT_IOAPIC_EOI`, ...). Port and MMIO exits come
//! back here and go to the buses synchronously, so a device's effect (e.g.
//! a pc-testdev line level) is in place before the vCPU re-enters the
//! guest.

use std::sync::Arc;

use irqchip_kvm::{Run, VcpuChip};
use kvm_bindings::{KVM_EXIT_INTERNAL_ERROR, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::regs_line;
use crate::bus::{Access, Bus};
use crate::control::{Outcome, VmControl};
use crate::error::{Error, Result};
use crate::snapshot::{Coordinator, VcpuCapture};

/// Exit counters of one vCPU, summed into the closing statistics line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct VcpuStats {
    /// Every return from `KVM_RUN`, errors included.
    pub(crate) runs: u64,
    /// Port reads.
    pub(crate) io_in: u64,
    /// Port writes.
    pub(crate) io_out: u64,
    /// MMIO reads (the chip's LAPIC window included).
    pub(crate) mmio_read: u64,
    /// MMIO writes (the chip's LAPIC window included).
    pub(crate) mmio_write: u64,
    /// Exits the interrupt controller handled.
    pub(crate) irqchip: u64,
    /// `EINTR` (kicks) and `KVM_EXIT_INTR`.
    pub(crate) kicks: u64,
    /// `EAGAIN` (an AP waiting for SIPI).
    pub(crate) eagain: u64,
}

impl VcpuStats {
    /// Adds `other` into `self`.
    pub(crate) fn add(&mut self, other: &VcpuStats) {
        let VcpuStats {
            runs,
            io_in,
            io_out,
            mmio_read,
            mmio_write,
            irqchip,
            kicks,
            eagain,
        } = other;
        self.runs += runs;
        self.io_in += io_in;
        self.io_out += io_out;
        self.mmio_read += mmio_read;
        self.mmio_write += mmio_write;
        self.irqchip += irqchip;
        self.kicks += kicks;
        self.eagain += eagain;
    }
}

/// A vCPU ready to run on its own thread.
pub(crate) struct Vcpu {
    index: usize,
    fd: VcpuFd,
    chip: VcpuChip,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    control: Arc<VmControl>,
    coordinator: Arc<Coordinator>,
    msrs: Arc<Vec<u32>>,
}

/// What every vCPU thread shares: the buses, the run's control, the
/// snapshot pause coordinator and the MSRs a snapshot saves.
pub(crate) struct VcpuShared {
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) msrs: Arc<Vec<u32>>,
}

/// What to do after an exit the VMM handled.
enum Next {
    Continue,
    Fault(String),
    Shutdown,
}

impl Vcpu {
    /// vCPU `index` with its part of the chip and what every vCPU shares.
    pub(crate) fn new(index: usize, fd: VcpuFd, chip: VcpuChip, shared: &VcpuShared) -> Self {
        Self {
            index,
            fd,
            chip,
            pio: Arc::clone(&shared.pio),
            mmio: Arc::clone(&shared.mmio),
            control: Arc::clone(&shared.control),
            coordinator: Arc::clone(&shared.coordinator),
            msrs: Arc::clone(&shared.msrs),
        }
    }

    /// The thread body: runs until the VM stops; a fault stops the VM.
    pub(crate) fn run(mut self) -> VcpuStats {
        let mut stats = VcpuStats::default();
        let result = self.run_loop(&mut stats);
        let c = self.chip.counters();
        stats.runs = c.runs;
        stats.kicks += c.kicks;
        stats.eagain = c.eagain;
        stats.irqchip = c.chip_exits;
        stats.mmio_read += c.chip_mmio_reads;
        stats.mmio_write += c.chip_mmio_writes;
        if let Err(e) = result {
            self.control.finish(Outcome::Failed(e));
        }
        stats
    }

    fn run_loop(&mut self, stats: &mut VcpuStats) -> Result<()> {
        let access = Access { vcpu: self.index };
        loop {
            if self.control.stopping() {
                return Ok(());
            }
            let (pio, mmio) = (&self.pio, &self.mmio);
            let next = match self.chip.run(&mut self.fd, |exit| {
                dispatch(exit, access, pio, mmio, stats)
            }) {
                Ok(Run::Exit(next)) => next,
                Ok(Run::Handled) => Next::Continue,
                Ok(Run::Stopped) => return Ok(()),
                Ok(Run::Paused) => {
                    let (fd, chip, msrs) = (&self.fd, &mut self.chip, &self.msrs);
                    let control = &self.control;
                    self.coordinator.paused(
                        self.index,
                        || {
                            // The chip's part first: reading KVM's MP state
                            // applies a pending INIT or SIPI to the registers.
                            let chip = chip.save(fd)?;
                            let arch = crate::snapshot::vcpu::save(fd, msrs)?;
                            Ok(VcpuCapture { arch, chip })
                        },
                        || control.stopping(),
                    );
                    Next::Continue
                }
                Err(irqchip_kvm::Error::UnexpectedExit(what)) => Next::Fault(format!(
                    "unexpected exit {what} for this interrupt-controller mode"
                )),
                Err(e) => return Err(e.into()),
            };
            match next {
                Next::Continue => {}
                Next::Shutdown => {
                    return Err(Error::GuestShutdown {
                        cpu: self.index,
                        regs: regs_line(&self.fd),
                    });
                }
                Next::Fault(what) => {
                    let what = if what == INTERNAL_ERROR {
                        self.internal_error()
                    } else {
                        what
                    };
                    return Err(Error::VcpuFault {
                        cpu: self.index,
                        what,
                        regs: regs_line(&self.fd),
                    });
                }
            }
        }
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` with its suberror.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return INTERNAL_ERROR.to_string();
        }
        // SAFETY: exit_reason says the `internal` member of the union is
        // the one KVM filled in; it is plain integers.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        format!(
            "KVM internal error, suberror {} ({}), data {:x?}",
            internal.suberror,
            match internal.suberror {
                1 => "instruction emulation failed",
                2 => "simultaneous exception",
                3 => "delivery event",
                4 => "unexpected exit reason",
                _ => "unknown",
            },
            &internal.data[..n]
        )
    }
}

const INTERNAL_ERROR: &str = "KVM internal error";

/// Handles an exit the chip did not take.
fn dispatch(
    exit: VcpuExit<'_>,
    access: Access,
    pio: &Bus,
    mmio: &Bus,
    stats: &mut VcpuStats,
) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            stats.io_in += 1;
            pio.read(access, u64::from(port), data);
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            stats.io_out += 1;
            pio.write(access, u64::from(port), data);
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            stats.mmio_read += 1;
            mmio.read(access, addr, data);
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio_write += 1;
            mmio.write(access, addr, data);
            Next::Continue
        }
        // Counted as a kick by the chip.
        VcpuExit::Intr => Next::Continue,
        VcpuExit::Shutdown => Next::Shutdown,
        VcpuExit::FailEntry(reason, cpu) => Next::Fault(format!(
            "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host cpu {cpu})"
        )),
        VcpuExit::InternalError => Next::Fault(INTERNAL_ERROR.to_string()),
        VcpuExit::SystemEvent(kind, _) => Next::Fault(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => "the guest requested a power-off".to_string(),
            KVM_SYSTEM_EVENT_RESET => "the guest requested a reset".to_string(),
            k => format!("system event {k}"),
        }),
        other => Next::Fault(format!("unexpected exit {other:?}")),
    }
}
