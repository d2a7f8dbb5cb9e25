//! One thread per vCPU: `KVM_RUN`, dispatch the exit, repeat.
//!
//! The loop is the same in every `--irqchip` mode; what differs lives behind
//! [`VcpuInterrupts`]: `before_run` (user mode injects there) and `on_exit`
//! for the interrupt-controller exits (`IoapicEoi`, `IrqWindowOpen`, `Hlt`,
//! LAPIC MMIO, x2APIC MSRs, `SetTpr`). Port and MMIO exits go to the buses
//! synchronously, so a device's effect (e.g. a pc-testdev line level) is in
//! place before the vCPU re-enters the guest.

use std::sync::Arc;

use kvm_bindings::{KVM_EXIT_INTERNAL_ERROR, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::regs_line;
use crate::bus::{Access, Bus};
use crate::control::{Outcome, VmControl};
use crate::error::{Error, Result};
use crate::irq::{ExitAction, IrqExit, VcpuInterrupts};
use crate::kick::RunPageGuard;

/// Exit counters of one vCPU, summed into the closing statistics line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct VcpuStats {
    /// Every return from `KVM_RUN`, errors included.
    pub(crate) runs: u64,
    /// Port reads.
    pub(crate) io_in: u64,
    /// Port writes.
    pub(crate) io_out: u64,
    /// MMIO reads.
    pub(crate) mmio_read: u64,
    /// MMIO writes.
    pub(crate) mmio_write: u64,
    /// Interrupt-controller exits handed to [`VcpuInterrupts::on_exit`].
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
    irq: Box<dyn VcpuInterrupts>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    control: Arc<VmControl>,
}

/// What to do after an exit, once the exit's borrow of the vCPU has ended.
enum Next {
    Continue,
    Fault(String),
    Shutdown,
}

impl Vcpu {
    /// vCPU `index` with its interrupt part and the buses.
    pub(crate) fn new(
        index: usize,
        fd: VcpuFd,
        irq: Box<dyn VcpuInterrupts>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        control: Arc<VmControl>,
    ) -> Self {
        Self {
            index,
            fd,
            irq,
            pio,
            mmio,
            control,
        }
    }

    /// The thread body: runs until the VM stops; a fault stops the VM.
    pub(crate) fn run(mut self) -> VcpuStats {
        let control = Arc::clone(&self.control);
        control.kicker().register_current(self.index);
        let mut stats = VcpuStats::default();
        let result = {
            // The guard unpublishes the run page before `self` (and its
            // mapping) is dropped at the end of this function.
            let _page = RunPageGuard::publish(self.fd.get_kvm_run());
            self.run_loop(&mut stats)
        };
        control.kicker().unregister_current(self.index);
        if let Err(e) = result {
            control.finish(Outcome::Failed(e));
        }
        stats
    }

    fn run_loop(&mut self, stats: &mut VcpuStats) -> Result<()> {
        let access = Access { vcpu: self.index };
        loop {
            if self.control.stopping() {
                return Ok(());
            }
            self.irq.before_run(&mut self.fd)?;
            stats.runs += 1;
            let next = match self.fd.run() {
                Ok(exit) => dispatch(
                    exit,
                    access,
                    &self.pio,
                    &self.mmio,
                    self.irq.as_mut(),
                    stats,
                ),
                Err(e) if e.errno() == libc::EINTR => {
                    stats.kicks += 1;
                    self.fd.set_kvm_immediate_exit(0);
                    Next::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => {
                    stats.eagain += 1;
                    Next::Continue
                }
                Err(source) => {
                    return Err(Error::Kvm {
                        op: "KVM_RUN",
                        source,
                    });
                }
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

fn dispatch(
    exit: VcpuExit<'_>,
    access: Access,
    pio: &Bus,
    mmio: &Bus,
    irq: &mut dyn VcpuInterrupts,
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
            if irq.owns_mmio(addr) {
                to_irq(irq, IrqExit::LapicRead(addr, data), stats)
            } else {
                mmio.read(access, addr, data);
                Next::Continue
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio_write += 1;
            if irq.owns_mmio(addr) {
                to_irq(irq, IrqExit::LapicWrite(addr, data), stats)
            } else {
                mmio.write(access, addr, data);
                Next::Continue
            }
        }
        VcpuExit::IoapicEoi(vector) => to_irq(irq, IrqExit::IoapicEoi(vector), stats),
        VcpuExit::IrqWindowOpen => to_irq(irq, IrqExit::IrqWindowOpen, stats),
        VcpuExit::Hlt => to_irq(irq, IrqExit::Hlt, stats),
        VcpuExit::SetTpr => to_irq(irq, IrqExit::SetTpr, stats),
        VcpuExit::X86Rdmsr(msr) => {
            let index = msr.index;
            let next = to_irq(irq, IrqExit::RdMsr(index, msr.data), stats);
            if matches!(next, Next::Fault(_)) {
                // Not ours: the guest gets #GP, as for an unknown MSR.
                *msr.error = 1;
                return Next::Continue;
            }
            next
        }
        VcpuExit::X86Wrmsr(msr) => {
            let next = to_irq(irq, IrqExit::WrMsr(msr.index, msr.data), stats);
            if matches!(next, Next::Fault(_)) {
                *msr.error = 1;
                return Next::Continue;
            }
            next
        }
        VcpuExit::Intr => {
            stats.kicks += 1;
            Next::Continue
        }
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

fn to_irq(irq: &mut dyn VcpuInterrupts, exit: IrqExit<'_>, stats: &mut VcpuStats) -> Next {
    stats.irqchip += 1;
    let what = exit.name();
    match irq.on_exit(exit) {
        ExitAction::Resume => Next::Continue,
        ExitAction::Unexpected => Next::Fault(format!(
            "unexpected exit {what} for this interrupt-controller mode"
        )),
    }
}
