//! The per-vCPU part of user mode, run on the vCPU's own thread.
//!
//! Each `KVM_RUN` return: [`UserVcpu::after_run`] mirrors the guest's CR8
//! into the LAPIC's TPR (once per return, before the exit is handled, so a
//! TPR read after a CR8 raise sees it and a TPR written by MMIO is not
//! overwritten) and notes IF and `ready_for_interrupt_injection`. Then the
//! exit ([`UserVcpu::on_exit`]): LAPIC MMIO and MSRs to the model, HLT
//! noted. Before each entry ([`UserVcpu::before_run`]): the LAPIC's TSC
//! clock (first entry, then once a second), due timers, INIT and SIPI,
//! parking (halted without a wake-up, or an AP waiting for SIPI), one
//! `KVM_NMI` per pending NMI, then one vector by `KVM_INTERRUPT` if KVM says
//! the vCPU can take it now and holds no undelivered NMI of ours (it would
//! inject the vector first), acknowledged in the LAPIC in the same step;
//! otherwise an interrupt-window request. CR8 goes back into `kvm_run`.
//!
//! ExtINT and SMI are dropped (counted): the 8259 stays masked and there is
//! no SMM.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use irqchip::lapic::{Gp, IA32_APIC_BASE};
use irqconnect_abi::layout::LAPIC_MMIO_SIZE;
use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;

use super::plan::{self, Activity, Injection};
use super::{UserChip, kvm};
use crate::backend::{ExitAction, VcpuBackend};
use crate::error::Error;
use crate::startup;
use crate::trace::TraceEvent;
use crate::vcpu::ChipExit;

type Result<T> = std::result::Result<T, Error>;

/// xAPIC EOI register offset (SDM Vol. 3A Table 11-1).
const XAPIC_EOI: u64 = 0xb0;
/// x2APIC EOI MSR (SDM Vol. 3A Table 11-6).
const X2APIC_EOI: u32 = 0x80b;
/// How often the LAPIC's TSC clock is anchored again to the guest TSC, so
/// the models' clock (CLOCK_MONOTONIC, which NTP may slew) and the TSC
/// cannot drift apart for long.
const TSC_CLOCK_RESYNC_NS: u64 = 1_000_000_000;

/// One vCPU's interrupt state, owned by its thread.
pub(super) struct UserVcpu {
    chip: Arc<UserChip>,
    index: usize,
    activity: Activity,
    /// The guest executed `hlt` and has not been woken since.
    halted: bool,
    /// A SIPI arrived while running (counted before the next entry).
    dropped_sipi: bool,
    /// `kvm_run.if_flag` at the last exit.
    if_flag: bool,
    /// `kvm_run.ready_for_interrupt_injection` at the last exit.
    ready: bool,
    /// Base of the LAPIC's MMIO page (IA32_APIC_BASE), for `owns_mmio`.
    mmio_base: u64,
    /// IA32_APIC_BASE may differ from KVM's copy (initially, and after a
    /// guest write): mirror it before the next entry.
    apic_base_dirty: bool,
    /// When (model clock) the LAPIC's TSC clock was last anchored.
    tsc_clock_at: Option<u64>,
    /// An NMI went to KVM and KVM has not yet been seen without one.
    nmi_in_kvm: bool,
}

impl UserVcpu {
    pub(super) fn new(chip: Arc<UserChip>, index: usize) -> Self {
        let mmio_base = chip
            .lock_apics()
            .get(index)
            .map_or(irqconnect_abi::layout::LAPIC_MMIO_BASE, |l| l.mmio_base());
        Self {
            chip,
            index,
            // APs hold until INIT/SIPI; the BSP runs.
            activity: if index == 0 {
                Activity::Running
            } else {
                Activity::WaitForSipi
            },
            halted: false,
            dropped_sipi: false,
            if_flag: false,
            ready: false,
            mmio_base,
            apic_base_dirty: true,
            tsc_clock_at: None,
            nmi_in_kvm: false,
        }
    }

    /// Gives the LAPIC its TSC clock (TSC-deadline mode, offered in CPUID)
    /// before the vCPU first runs, and anchors it again once a second.
    fn sync_tsc_clock(&mut self, vcpu: &VcpuFd) {
        let now = self.chip.now();
        if self
            .tsc_clock_at
            .is_some_and(|at| now.saturating_sub(at) < TSC_CLOCK_RESYNC_NS)
        {
            return;
        }
        // A failure is retried a second later; meanwhile a first anchoring
        // that failed leaves TSC-deadline mode unusable (mode 10b ignored,
        // IA32_TSC_DEADLINE faults).
        self.tsc_clock_at = Some(now);
        match kvm::tsc_clock(vcpu, || self.chip.now()) {
            Ok(clock) => {
                let mut apics = self.chip.lock_apics();
                let _ = apics.with(self.index, |l| l.set_tsc_clock(clock));
                self.chip.sync_timer(&apics, self.index);
            }
            Err(e) => self.chip.errors.fail(format_args!(
                "vcpu {}: the guest TSC clock: {e}",
                self.index
            )),
        }
    }

    /// Makes KVM's IA32_APIC_BASE equal to the model's (KVM derives
    /// CPUID.01H:EDX.APIC from it).
    fn mirror_apic_base(&mut self, vcpu: &VcpuFd) {
        if !std::mem::take(&mut self.apic_base_dirty) {
            return;
        }
        let now = self.chip.now();
        let value = self
            .chip
            .lock_apics()
            .with(self.index, |l| l.msr_read(IA32_APIC_BASE, now));
        if let Some(Ok(value)) = value
            && let Err(e) = kvm::mirror_apic_base(vcpu, value)
        {
            self.chip.errors.fail(format_args!(
                "vcpu {}: mirror IA32_APIC_BASE: {e}",
                self.index
            ));
        }
    }

    /// INIT and SIPI register changes (APIC lock not held).
    fn apply_startup(&mut self, vcpu: &VcpuFd, startup: plan::Startup) -> Result<()> {
        if startup.init {
            startup::init_state(vcpu)?;
            self.halted = false;
            self.if_flag = false;
            self.ready = false;
        }
        if let Some(vector) = startup.sipi {
            startup::start_at_sipi(vcpu, vector)?;
        }
        Ok(())
    }

    fn mmio(&mut self, exit: ChipExit<'_>) -> ExitAction {
        let chip = Arc::clone(&self.chip);
        let now = chip.now();
        let mut apics = chip.lock_apics();
        let effect = match exit {
            ChipExit::LapicRead(addr, data) => {
                let offset = addr.wrapping_sub(self.mmio_base);
                apics.with(self.index, |l| l.mmio_read(offset, data, now));
                None
            }
            ChipExit::LapicWrite(addr, data) => {
                let offset = addr.wrapping_sub(self.mmio_base);
                if offset == XAPIC_EOI {
                    chip.counters.eois.fetch_add(1, Ordering::Relaxed);
                    chip.trace_eoi(&apics, self.index);
                }
                apics
                    .with(self.index, |l| l.mmio_write(offset, data, now))
                    .flatten()
            }
            _ => return ExitAction::Unexpected,
        };
        chip.sync_timer(&apics, self.index);
        drop(apics);
        chip.apply_effect(effect, self.index);
        ExitAction::Resume
    }

    fn msr(&mut self, exit: ChipExit<'_>) -> ExitAction {
        let chip = Arc::clone(&self.chip);
        let now = chip.now();
        let mut apics = chip.lock_apics();
        if !apics
            .get(self.index)
            .is_some_and(|l| l.handles_msr(msr_index(&exit)))
        {
            // Not a LAPIC MSR: #GP, as KVM gives for an MSR it refused.
            return ExitAction::Unexpected;
        }
        let result: std::result::Result<_, Gp> = match exit {
            ChipExit::RdMsr(msr, value) => apics
                .with(self.index, |l| l.msr_read(msr, now))
                .unwrap_or(Err(Gp::ReservedMsr))
                .map(|v| {
                    *value = v;
                    None
                }),
            ChipExit::WrMsr(msr, value) => {
                self.apic_base_dirty |= msr == IA32_APIC_BASE;
                if msr == X2APIC_EOI {
                    chip.counters.eois.fetch_add(1, Ordering::Relaxed);
                    chip.trace_eoi(&apics, self.index);
                }
                apics
                    .with(self.index, |l| l.msr_write(msr, value, now))
                    .unwrap_or(Err(Gp::ReservedMsr))
            }
            _ => return ExitAction::Unexpected,
        };
        if let Some(l) = apics.get(self.index) {
            self.mmio_base = l.mmio_base();
        }
        chip.sync_timer(&apics, self.index);
        drop(apics);
        match result {
            Ok(effect) => {
                chip.apply_effect(effect, self.index);
                ExitAction::Resume
            }
            // The vCPU loop injects #GP for an MSR exit it cannot complete.
            Err(_) => ExitAction::Unexpected,
        }
    }
}

fn msr_index(exit: &ChipExit<'_>) -> u32 {
    match exit {
        ChipExit::RdMsr(msr, _) | ChipExit::WrMsr(msr, _) => *msr,
        _ => 0,
    }
}

impl VcpuBackend for UserVcpu {
    fn before_run(&mut self, vcpu: &mut VcpuFd) -> Result<()> {
        self.mirror_apic_base(vcpu);
        self.sync_tsc_clock(vcpu);
        let chip = Arc::clone(&self.chip);
        let i = self.index;
        let mut apics = chip.lock_apics();
        loop {
            if chip.stopping() {
                return Ok(());
            }
            let now = chip.now();
            let (init, sipi, timer) = apics
                .with(i, |l| {
                    let fired = l.tick(now);
                    let timer = l.timer_vector().filter(|_| fired);
                    (l.take_init(), l.take_sipi(), timer)
                })
                .unwrap_or((false, None, None));
            if let Some(vector) = timer {
                chip.tracer.emit(|| TraceEvent::Timer { vcpu: i, vector });
            }
            chip.sync_timer(&apics, i);
            let (activity, startup) = plan::startup(self.activity, i == 0, init, sipi);
            self.activity = activity;
            self.dropped_sipi |= startup.dropped_sipi;
            if startup.init || startup.sipi.is_some() {
                drop(apics);
                self.apply_startup(vcpu, startup)?;
                apics = chip.lock_apics();
                continue;
            }
            let Some(lapic) = apics.get(i) else {
                return Ok(());
            };
            let park = activity == Activity::WaitForSipi
                || (self.halted && !plan::halt_ends(lapic, self.if_flag));
            if !park {
                break;
            }
            apics.set_parked(i, true);
            chip.tracer.emit(|| TraceEvent::Park { vcpu: i });
            apics = match chip.wake.get(i) {
                Some(cv) => cv.wait(apics).unwrap_or_else(PoisonError::into_inner),
                None => apics,
            };
            apics.set_parked(i, false);
            chip.tracer.emit(|| TraceEvent::Unpark { vcpu: i });
        }
        self.halted = false;

        let (nmis, smi, extint) = apics
            .with(i, |l| (l.take_nmis(), l.take_smi(), l.take_extint()))
            .unwrap_or((0, false, false));
        let ignored = u64::from(smi) + u64::from(extint) + u64::from(self.dropped_sipi);
        if ignored != 0 {
            chip.counters
                .ignored_events
                .fetch_add(ignored, Ordering::Relaxed);
            self.dropped_sipi = false;
        }
        // One KVM_NMI per pending NMI (at most two): KVM's process_nmi then
        // keeps one latched behind an NMI in service and drops the rest, as
        // the processor does.
        for _ in 0..nmis {
            if let Err(e) = vcpu.nmi() {
                chip.errors.fail(format_args!("KVM_NMI on vcpu {i}: {e}"));
                break;
            }
            self.nmi_in_kvm = true;
        }
        let deliverable = apics.get(i).and_then(|l| l.highest_deliverable());
        if self.nmi_in_kvm && nmis == 0 && deliverable.is_some() && self.ready {
            // Before a vector goes in: has KVM delivered the NMIs it got?
            self.nmi_in_kvm = kvm::nmi_held(vcpu).unwrap_or_else(|e| {
                chip.errors
                    .fail(format_args!("KVM_GET_VCPU_EVENTS on vcpu {i}: {e}"));
                false
            });
        }
        if let Injection::Inject(vector) = plan::injection(deliverable, self.ready, self.nmi_in_kvm)
        {
            match kvm::interrupt(vcpu, vector) {
                Ok(()) => {
                    // Acknowledged exactly when injected: IRR -> ISR.
                    // The lock is held since the peek, so this is `vector`.
                    let acked = apics.with(i, |l| l.acknowledge()).flatten();
                    if acked != Some(vector) {
                        chip.errors.fail(format_args!(
                            "vcpu {i}: injected {vector:#x} but acknowledged {acked:?}"
                        ));
                    }
                    chip.counters.injected.fetch_add(1, Ordering::Relaxed);
                    chip.tracer.emit(|| TraceEvent::Inject {
                        vcpu: Some(i),
                        vector,
                    });
                    self.ready = false;
                }
                // EEXIST: KVM still holds one; the window exit comes later.
                Err(e) if e.errno() == libc::EEXIST => {}
                Err(e) => chip
                    .errors
                    .fail(format_args!("KVM_INTERRUPT on vcpu {i}: {e}")),
            }
        }
        let (pending, blocked, cr8) = apics.get(i).map_or((false, false, 0), |l| {
            (
                l.highest_deliverable().is_some(),
                plan::tpr_blocked(l),
                l.cr8(),
            )
        });
        chip.set_tpr_poll(&apics, i, blocked);
        drop(apics);
        let run = vcpu.get_kvm_run();
        run.request_interrupt_window = u8::from(pending);
        run.cr8 = cr8;
        Ok(())
    }

    fn after_run(&mut self, run: &kvm_run) {
        self.if_flag = run.if_flag != 0;
        self.ready = run.ready_for_interrupt_injection != 0;
        let cr8 = run.cr8;
        let _ = self.chip.lock_apics().with(self.index, |l| l.set_cr8(cr8));
    }

    fn owns_mmio(&self, addr: u64) -> bool {
        addr.wrapping_sub(self.mmio_base) < LAPIC_MMIO_SIZE
    }

    fn on_exit(&mut self, exit: ChipExit<'_>) -> ExitAction {
        match exit {
            ChipExit::IrqWindowOpen | ChipExit::SetTpr => ExitAction::Resume,
            ChipExit::Hlt => {
                self.halted = true;
                ExitAction::Resume
            }
            e @ (ChipExit::LapicRead(..) | ChipExit::LapicWrite(..)) => self.mmio(e),
            e @ (ChipExit::RdMsr(..) | ChipExit::WrMsr(..)) => self.msr(e),
            ChipExit::IoapicEoi(_) => ExitAction::Unexpected,
        }
    }
}
