//! One thread per vCPU: `KVM_RUN`, dispatch the exit, repeat.
//!
//! The loop is the same in every `--irqchip` mode; what differs lives behind
//! [`VcpuInterrupts`]: `before_run` (user mode injects there), `after_run`
//! (user mode reads CR8 and IF) and `on_exit` for the interrupt-controller
//! exits (`IoapicEoi`, `IrqWindowOpen`, `Hlt`, LAPIC MMIO, x2APIC MSRs,
//! `SetTpr`). Port and MMIO exits go to the buses synchronously, so a
//! device's effect (e.g. a pc-testdev line level) is in place before the
//! vCPU re-enters the guest.
//!
//! Order after each `KVM_RUN` return: bus exits are handled while the exit
//! borrows the run page; an interrupt-controller exit is copied out (at
//! most 8 data bytes), then `after_run` sees the run page, then `on_exit`
//! handles the copy and its result (an MMIO read's bytes, an RDMSR value or
//! a #GP) is written back into the run page for KVM to complete the
//! instruction on the next entry.

use std::sync::Arc;

use kvm_bindings::{
    KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_MMIO, KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
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
    Irq(IrqWork),
    Fault(String),
    Shutdown,
}

/// Most bytes one MMIO exit carries (`kvm_run.mmio.data`).
const MMIO_MAX: usize = 8;

/// An interrupt-controller exit copied out of the run page.
#[derive(Debug, Clone, Copy)]
enum IrqWork {
    IoapicEoi(u8),
    IrqWindowOpen,
    Hlt,
    SetTpr,
    LapicRead {
        addr: u64,
        len: usize,
    },
    LapicWrite {
        addr: u64,
        len: usize,
        data: [u8; MMIO_MAX],
    },
    RdMsr(u32),
    WrMsr(u32, u64),
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
            if self.control.stopping() {
                return Ok(());
            }
            stats.runs += 1;
            let next = match self.fd.run() {
                Ok(exit) => dispatch(
                    exit,
                    access,
                    &self.pio,
                    &self.mmio,
                    self.irq.as_ref(),
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
            self.irq.after_run(self.fd.get_kvm_run());
            let next = match next {
                Next::Irq(work) => self.irq_exit(work, stats),
                other => other,
            };
            match next {
                Next::Continue | Next::Irq(_) => {}
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

    /// Hands an interrupt-controller exit to the controller and completes
    /// it in the run page.
    fn irq_exit(&mut self, work: IrqWork, stats: &mut VcpuStats) -> Next {
        stats.irqchip += 1;
        let mut buf = [0u8; MMIO_MAX];
        let mut value = 0u64;
        let exit = match work {
            IrqWork::IoapicEoi(v) => IrqExit::IoapicEoi(v),
            IrqWork::IrqWindowOpen => IrqExit::IrqWindowOpen,
            IrqWork::Hlt => IrqExit::Hlt,
            IrqWork::SetTpr => IrqExit::SetTpr,
            IrqWork::LapicRead { addr, len } => IrqExit::LapicRead(addr, &mut buf[..len]),
            IrqWork::LapicWrite {
                addr,
                len,
                ref data,
            } => IrqExit::LapicWrite(addr, &data[..len]),
            IrqWork::RdMsr(index) => IrqExit::RdMsr(index, &mut value),
            IrqWork::WrMsr(index, data) => IrqExit::WrMsr(index, data),
        };
        let what = exit.name();
        let action = self.irq.on_exit(exit);
        let run = self.fd.get_kvm_run();
        match (work, action) {
            (IrqWork::LapicRead { len, .. }, ExitAction::Resume) => {
                complete_mmio_read(run, &buf[..len]);
            }
            // Not the controller's MSR, or a #GP it raised: the guest gets
            // #GP, as for an unknown MSR.
            (IrqWork::RdMsr(_), action) => {
                complete_msr(run, value, action == ExitAction::Unexpected);
                return Next::Continue;
            }
            (IrqWork::WrMsr(..), action) => {
                complete_msr(run, 0, action == ExitAction::Unexpected);
                return Next::Continue;
            }
            _ => {}
        }
        match action {
            ExitAction::Resume => Next::Continue,
            ExitAction::Unexpected => Next::Fault(format!(
                "unexpected exit {what} for this interrupt-controller mode"
            )),
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
    irq: &dyn VcpuInterrupts,
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
                Next::Irq(IrqWork::LapicRead {
                    addr,
                    len: data.len().min(MMIO_MAX),
                })
            } else {
                mmio.read(access, addr, data);
                Next::Continue
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio_write += 1;
            if irq.owns_mmio(addr) {
                let mut copy = [0u8; MMIO_MAX];
                let len = data.len().min(MMIO_MAX);
                copy[..len].copy_from_slice(&data[..len]);
                Next::Irq(IrqWork::LapicWrite {
                    addr,
                    len,
                    data: copy,
                })
            } else {
                mmio.write(access, addr, data);
                Next::Continue
            }
        }
        VcpuExit::IoapicEoi(vector) => Next::Irq(IrqWork::IoapicEoi(vector)),
        VcpuExit::IrqWindowOpen => Next::Irq(IrqWork::IrqWindowOpen),
        VcpuExit::Hlt => Next::Irq(IrqWork::Hlt),
        VcpuExit::SetTpr => Next::Irq(IrqWork::SetTpr),
        VcpuExit::X86Rdmsr(msr) => Next::Irq(IrqWork::RdMsr(msr.index)),
        VcpuExit::X86Wrmsr(msr) => Next::Irq(IrqWork::WrMsr(msr.index, msr.data)),
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

/// Writes an MMIO read's result where KVM takes it on the next entry.
fn complete_mmio_read(run: &mut kvm_run, data: &[u8]) {
    if run.exit_reason != KVM_EXIT_MMIO {
        return;
    }
    // SAFETY: exit_reason is KVM_EXIT_MMIO, so `mmio` is the union member
    // KVM filled in for this exit and reads back on the next entry; it is
    // plain integers and bytes, valid for any bit pattern.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    for (dst, src) in mmio.data.iter_mut().zip(data) {
        *dst = *src;
    }
}

/// Completes an RDMSR/WRMSR exit: the value read, or `error` for #GP.
fn complete_msr(run: &mut kvm_run, value: u64, error: bool) {
    let rdmsr = run.exit_reason == KVM_EXIT_X86_RDMSR;
    if !rdmsr && run.exit_reason != KVM_EXIT_X86_WRMSR {
        return;
    }
    // SAFETY: exit_reason is KVM_EXIT_X86_RDMSR or _WRMSR, so `msr` is the
    // union member KVM filled in and reads back on the next entry; it is
    // plain integers, valid for any bit pattern.
    let msr = unsafe { &mut run.__bindgen_anon_1.msr };
    if !error && rdmsr {
        msr.data = value;
    }
    msr.error = u8::from(error);
}
