//! The per-vCPU interface: [`VcpuChip::run`] is one trip into the guest
//! with the chip's work around it.
//!
//! One call does, on the vCPU's own thread:
//!
//! 1. the mode's `before_run` (user mode: INIT/SIPI, HLT parking, NMI and
//!    interrupt injection);
//! 2. `KVM_RUN`, kickable: the thread is registered with the [`Kicker`]
//!    and its run page published to the kick handler only for the duration
//!    of the call, and a kick that arrived since `before_run` looked makes
//!    `KVM_RUN` return at once (`immediate_exit`);
//! 3. an exit that is not the chip's goes to the VMM's `on_exit` while it
//!    still borrows the run page (port I/O, MMIO outside the chip, ...);
//! 4. the mode's `after_run` with the run page (user mode reads CR8 and IF);
//! 5. `EINTR`/`EAGAIN` and the exits that belong to the chip (LAPIC MMIO
//!    and MSRs, interrupt windows, HLT without an in-kernel LAPIC,
//!    `KVM_EXIT_IOAPIC_EOI`) are handled and completed in the run page (an
//!    MMIO read's bytes, an RDMSR value, a #GP).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{KVM_EXIT_MMIO, KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::backend::{ExitAction, VcpuBackend};
use crate::error::Error;
use crate::kick::{Kicker, RunPageGuard};
use crate::state::VcpuChipState;
use crate::trace::{TraceEvent, Tracer};

/// Most bytes one MMIO exit carries (`kvm_run.mmio.data`).
const MMIO_MAX: usize = 8;

/// What one [`VcpuChip::run`] came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run<T> {
    /// The exit was the VMM's: this is what its `on_exit` returned.
    Exit(T),
    /// Nothing for the VMM: the chip handled the exit, or `KVM_RUN` was
    /// interrupted by a kick. Look at whatever the VMM's own kicks are for
    /// (a stop flag), then run again.
    Handled,
    /// The chip was shut down ([`crate::Irqchip::shutdown`]): the guest was
    /// not entered. Leave the loop.
    Stopped,
    /// The VM is pausing ([`crate::Irqchip::pause`]): the last exit is
    /// complete in KVM and the guest was not entered. Wait until the VMM
    /// resumes (saving the vCPU with [`VcpuChip::save`] meanwhile), then
    /// run again.
    Paused,
}

/// Exit counters of one vCPU's chip part, for a VMM's statistics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VcpuCounters {
    /// Every `KVM_RUN`, errors included.
    pub runs: u64,
    /// `EINTR` and `KVM_EXIT_INTR` (kicks).
    pub kicks: u64,
    /// `EAGAIN` (an AP waiting for SIPI in KVM).
    pub eagain: u64,
    /// Exits the chip handled (not counting kicks).
    pub chip_exits: u64,
    /// Of those: MMIO reads and writes of the LAPIC window (user mode).
    pub chip_mmio_reads: u64,
    /// See `chip_mmio_reads`.
    pub chip_mmio_writes: u64,
}

/// One vCPU's part of the chip; lives on that vCPU's thread
/// ([`crate::Irqchip::vcpu`]).
pub struct VcpuChip {
    index: usize,
    backend: Box<dyn VcpuBackend>,
    kicker: Arc<Kicker>,
    stopping: Arc<AtomicBool>,
    pausing: Arc<AtomicBool>,
    counters: VcpuCounters,
    tracer: Tracer,
}

/// An exit that belongs to the chip, with its data.
#[derive(Debug)]
pub(crate) enum ChipExit<'a> {
    /// `KVM_EXIT_IOAPIC_EOI` (split mode): the guest EOI'd a level vector.
    IoapicEoi(u8),
    /// `KVM_EXIT_IRQ_WINDOW_OPEN` (user mode).
    IrqWindowOpen,
    /// `KVM_EXIT_HLT`: only without an in-kernel LAPIC.
    Hlt,
    /// `KVM_EXIT_SET_TPR` (user mode: CR8 lowered).
    SetTpr,
    /// An MMIO read in the local APIC window (user mode).
    LapicRead(u64, &'a mut [u8]),
    /// An MMIO write in the local APIC window (user mode).
    LapicWrite(u64, &'a [u8]),
    /// `KVM_EXIT_X86_RDMSR` (user mode): index, value out.
    RdMsr(u32, &'a mut u64),
    /// `KVM_EXIT_X86_WRMSR` (user mode): index, value.
    WrMsr(u32, u64),
}

impl ChipExit<'_> {
    /// The exit's name, for messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            ChipExit::IoapicEoi(_) => "IoapicEoi",
            ChipExit::IrqWindowOpen => "IrqWindowOpen",
            ChipExit::Hlt => "Hlt",
            ChipExit::SetTpr => "SetTpr",
            ChipExit::LapicRead(..) => "LAPIC MMIO read",
            ChipExit::LapicWrite(..) => "LAPIC MMIO write",
            ChipExit::RdMsr(..) => "RDMSR",
            ChipExit::WrMsr(..) => "WRMSR",
        }
    }
}

/// How a `KVM_RUN` ended, once its exit no longer borrows the run page.
enum Outcome<T> {
    /// The chip's exit, to handle.
    Chip(Work),
    /// The VMM's exit, already handled by its `on_exit`.
    Vmm(T),
    /// `EINTR`: a kick.
    Kicked,
    /// `EAGAIN`: an AP waiting for SIPI in KVM.
    Again,
    /// `EINTR` of a pausing run: the last exit is complete.
    Paused,
}

/// A chip exit copied out of the run page, so the page can be borrowed
/// again to complete it.
#[derive(Debug, Clone, Copy)]
enum Work {
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

impl VcpuChip {
    pub(crate) fn new(
        index: usize,
        backend: Box<dyn VcpuBackend>,
        kicker: Arc<Kicker>,
        stopping: Arc<AtomicBool>,
        pausing: Arc<AtomicBool>,
        tracer: Tracer,
    ) -> Self {
        Self {
            index,
            backend,
            kicker,
            stopping,
            pausing,
            counters: VcpuCounters::default(),
            tracer,
        }
    }

    /// The vCPU's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The counters so far.
    pub fn counters(&self) -> VcpuCounters {
        self.counters
    }

    /// This vCPU's part of a snapshot ([`crate::ChipState`]): call it on
    /// the vCPU's thread after [`VcpuChip::run`] returned [`Run::Paused`]
    /// and every other vCPU is paused too.
    ///
    /// # Errors
    ///
    /// A failed ioctl.
    pub fn save(&mut self, vcpu: &VcpuFd) -> Result<VcpuChipState, Error> {
        self.backend.save(vcpu)
    }

    /// Restores this vCPU's part of a snapshot, converted for the chip
    /// ([`crate::Irqchip::convert`]): after [`crate::Irqchip::restore`]
    /// and after the VMM restored the vCPU's registers and MSRs (the guest
    /// TSC among them), before its vCPU events and before it first runs.
    ///
    /// # Errors
    ///
    /// A failed ioctl, or a part of another mode.
    pub fn restore(&mut self, vcpu: &VcpuFd, state: &VcpuChipState) -> Result<(), Error> {
        self.backend.restore(vcpu, state)
    }

    /// One trip into the guest (see the module documentation). Call it in
    /// a loop on the vCPU's own thread with the vCPU's descriptor. An exit
    /// that is not the chip's goes to `on_exit` while it still borrows the
    /// run page (complete it there, as kvm-ioctls documents: fill an I/O
    /// read's data), and what `on_exit` returns comes back in
    /// [`Run::Exit`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use irqchip_kvm::{Irqchip, Mode, Run};
    /// # use kvm_ioctls::{Kvm, VcpuExit};
    /// # let vm = Arc::new(Kvm::new()?.create_vm()?);
    /// # let chip = Irqchip::builder(Arc::clone(&vm), Mode::User).cpus(1).build()?;
    /// let mut fd = vm.create_vcpu(0)?;
    /// let mut vcpu = chip.vcpu(0, &fd)?;
    /// let exit_code = loop {
    ///     let next = vcpu.run(&mut fd, |exit| match exit {
    ///         VcpuExit::IoOut(0xf4, data) => Some(data[0]),
    ///         VcpuExit::IoIn(_, data) => {
    ///             data.fill(0xff);
    ///             None
    ///         }
    ///         _ => None,
    ///     })?;
    ///     match next {
    ///         Run::Exit(Some(code)) => break code,
    ///         Run::Stopped => break 0,
    ///         // Paused: this VMM never pauses (`Irqchip::pause`).
    ///         Run::Exit(None) | Run::Handled | Run::Paused => {}
    ///     }
    /// };
    /// # let _ = exit_code;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A failed `KVM_RUN` (other than `EINTR`/`EAGAIN`), a failed ioctl of
    /// the mode, or an exit the mode cannot get ([`Error::UnexpectedExit`]).
    pub fn run<T>(
        &mut self,
        vcpu: &mut VcpuFd,
        on_exit: impl FnOnce(VcpuExit<'_>) -> T,
    ) -> Result<Run<T>, Error> {
        let kicker = Arc::clone(&self.kicker);
        let _thread = kicker.enter(self.index);
        let paused = self.pausing.load(Ordering::Acquire);
        self.backend.before_run(vcpu, paused)?;
        if self.stopping.load(Ordering::Acquire) {
            return Ok(Run::Stopped);
        }
        // A pause that came during `before_run` still gets its completing
        // run, whatever `before_run` did.
        let paused = paused || self.pausing.load(Ordering::Acquire);
        self.counters.runs += 1;
        let run_page: *mut kvm_run = vcpu.get_kvm_run();
        // SAFETY: the page belongs to `vcpu`, which this call borrows for
        // longer than the guard (dropped below, before `vcpu` is returned
        // to the caller), so it stays mapped.
        let page = unsafe { RunPageGuard::publish(run_page) };
        // A pausing run completes the last exit inside KVM (an I/O read's
        // data, a string operation's next step) and returns at once: KVM's
        // state is then the guest's, with nothing held half done.
        if kicker.take_pending(self.index) || paused {
            page.set_immediate_exit();
        }
        let index = self.index;
        self.tracer.emit(|| TraceEvent::RunEnter { vcpu: index });
        let result = vcpu.run();
        if self.tracer.on() {
            let (reason, detail) = exit_reason(&result);
            self.tracer.emit(|| TraceEvent::RunExit {
                vcpu: index,
                reason,
                detail,
            });
        }
        let outcome = match result {
            Ok(exit) => match self.claim(&exit) {
                Some(work) => Outcome::Chip(work),
                None => {
                    if matches!(exit, VcpuExit::Intr) {
                        self.counters.kicks += 1;
                    }
                    Outcome::Vmm(on_exit(exit))
                }
            },
            Err(e) if e.errno() == libc::EINTR && paused => Outcome::Paused,
            Err(e) if e.errno() == libc::EINTR => {
                self.counters.kicks += 1;
                Outcome::Kicked
            }
            Err(e) if e.errno() == libc::EAGAIN => {
                self.counters.eagain += 1;
                Outcome::Again
            }
            Err(source) => {
                return Err(Error::Kvm {
                    op: "KVM_RUN",
                    source,
                });
            }
        };
        drop(page);
        if matches!(outcome, Outcome::Kicked | Outcome::Paused) {
            // The kick is consumed; the next entry must not stop at once.
            vcpu.set_kvm_immediate_exit(0);
        }
        self.backend.after_run(vcpu.get_kvm_run());
        match outcome {
            Outcome::Chip(work) => {
                self.handle(vcpu, work)?;
                Ok(Run::Handled)
            }
            Outcome::Vmm(value) => Ok(Run::Exit(value)),
            Outcome::Kicked | Outcome::Again => Ok(Run::Handled),
            Outcome::Paused => Ok(Run::Paused),
        }
    }

    /// Copies `exit` out if it belongs to the chip.
    fn claim(&mut self, exit: &VcpuExit<'_>) -> Option<Work> {
        let work = match exit {
            VcpuExit::MmioRead(addr, data) if self.backend.owns_mmio(*addr) => {
                self.counters.chip_mmio_reads += 1;
                Work::LapicRead {
                    addr: *addr,
                    len: data.len().min(MMIO_MAX),
                }
            }
            VcpuExit::MmioWrite(addr, data) if self.backend.owns_mmio(*addr) => {
                self.counters.chip_mmio_writes += 1;
                let mut copy = [0u8; MMIO_MAX];
                let len = data.len().min(MMIO_MAX);
                copy[..len].copy_from_slice(&data[..len]);
                Work::LapicWrite {
                    addr: *addr,
                    len,
                    data: copy,
                }
            }
            VcpuExit::IoapicEoi(vector) => Work::IoapicEoi(*vector),
            VcpuExit::IrqWindowOpen => Work::IrqWindowOpen,
            VcpuExit::Hlt => Work::Hlt,
            VcpuExit::SetTpr => Work::SetTpr,
            VcpuExit::X86Rdmsr(msr) => Work::RdMsr(msr.index),
            VcpuExit::X86Wrmsr(msr) => Work::WrMsr(msr.index, msr.data),
            _ => return None,
        };
        self.counters.chip_exits += 1;
        Some(work)
    }

    /// Hands a chip exit to the mode and completes it in the run page.
    fn handle(&mut self, vcpu: &mut VcpuFd, work: Work) -> Result<(), Error> {
        let mut buf = [0u8; MMIO_MAX];
        let mut value = 0u64;
        let exit = match work {
            Work::IoapicEoi(v) => ChipExit::IoapicEoi(v),
            Work::IrqWindowOpen => ChipExit::IrqWindowOpen,
            Work::Hlt => ChipExit::Hlt,
            Work::SetTpr => ChipExit::SetTpr,
            Work::LapicRead { addr, len } => ChipExit::LapicRead(addr, &mut buf[..len]),
            Work::LapicWrite {
                addr,
                len,
                ref data,
            } => ChipExit::LapicWrite(addr, &data[..len]),
            Work::RdMsr(index) => ChipExit::RdMsr(index, &mut value),
            Work::WrMsr(index, data) => ChipExit::WrMsr(index, data),
        };
        let what = exit.name();
        let action = self.backend.on_exit(exit);
        let run = vcpu.get_kvm_run();
        match (work, action) {
            (Work::LapicRead { len, .. }, ExitAction::Resume) => {
                complete_mmio_read(run, &buf[..len]);
                Ok(())
            }
            // Not the chip's MSR, or a #GP it raised: the guest gets #GP,
            // as for an MSR KVM does not know.
            (Work::RdMsr(_), action) => {
                complete_msr(run, value, action == ExitAction::Unexpected);
                Ok(())
            }
            (Work::WrMsr(..), action) => {
                complete_msr(run, 0, action == ExitAction::Unexpected);
                Ok(())
            }
            (_, ExitAction::Resume) => Ok(()),
            (_, ExitAction::Unexpected) => Err(Error::UnexpectedExit(what)),
        }
    }
}

/// A `KVM_RUN` result's name and detail for [`TraceEvent::RunExit`].
fn exit_reason(result: &Result<VcpuExit<'_>, kvm_ioctls::Error>) -> (&'static str, u64) {
    match result {
        Ok(exit) => match exit {
            VcpuExit::IoIn(port, _) => ("io-in", u64::from(*port)),
            VcpuExit::IoOut(port, _) => ("io-out", u64::from(*port)),
            VcpuExit::MmioRead(addr, _) => ("mmio-read", *addr),
            VcpuExit::MmioWrite(addr, _) => ("mmio-write", *addr),
            VcpuExit::Hlt => ("hlt", 0),
            VcpuExit::IrqWindowOpen => ("irq-window", 0),
            VcpuExit::IoapicEoi(vector) => ("ioapic-eoi", u64::from(*vector)),
            VcpuExit::X86Rdmsr(msr) => ("rdmsr", u64::from(msr.index)),
            VcpuExit::X86Wrmsr(msr) => ("wrmsr", u64::from(msr.index)),
            VcpuExit::SetTpr => ("set-tpr", 0),
            VcpuExit::Intr => ("intr", 0),
            VcpuExit::Shutdown => ("shutdown", 0),
            _ => ("other", 0),
        },
        Err(e) if e.errno() == libc::EINTR => ("kick", 0),
        Err(e) if e.errno() == libc::EAGAIN => ("eagain", 0),
        Err(_) => ("error", 0),
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
