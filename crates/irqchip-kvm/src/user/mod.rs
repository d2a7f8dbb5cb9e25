//! `user` mode: our IOAPIC and our local APICs; KVM has no interrupt
//! controller at all.
//!
//! # Shape
//!
//! - [`UserChip`] (VM-wide): our IOAPIC in an [`IoapicHost`]; every vCPU's
//!   LAPIC, bus target and the lowest-priority arbiter in an
//!   [`ApicSystem`] behind a second mutex; per vCPU a condition variable
//!   (paired with the APIC mutex) its thread parks on, and a timerfd for its
//!   LAPIC timer, watched by the VMM's event loop.
//! - [`vcpu::UserVcpu`] (per vCPU thread): CR8/IF in after every exit, INIT
//!   and SIPI, HLT parking, NMI and `KVM_INTERRUPT` injection before every
//!   entry, LAPIC MMIO and MSR exits.
//!
//! # Locks
//!
//! Order: IOAPIC, then APICs, then a timer slot; the kicker's slot locks
//! are leaves. The IOAPIC lock is held while its messages are offered to
//! the LAPICs, so a level message is in an IRR before the EOI that could
//! clear its Remote IRR can be written. A LAPIC EOI is taken under the APIC
//! lock, which is released before the broadcast takes the IOAPIC lock.
//!
//! # Wake-ups
//!
//! A LAPIC that took a message (or whose timer fired) has its vCPU woken:
//! a parked thread through its condition variable, a running one by a kick
//! (see `crate::kick`), nothing for the calling thread itself (its loop
//! re-checks before the next entry).

mod kvm;
mod plan;
mod vcpu;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use irqchip::apic_bus::ApicSet;
use irqchip::apic_system::ApicSystem;
use irqchip::ioapic::Delivery;
use irqchip::lapic::{Effect, LapicConfig};
use irqchip::msi::{self, Msi, MsiFormat};
use irqconnect_abi::layout::LAPIC_BUS_HZ;
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::backend::{Backend, IrqStats, ModelStats, VcpuBackend, VmPart};
use crate::error::{Error, IrqError};
use crate::ioapic_host::{Deliver, ErrorLog, Hosted, HostedIoapic, HostsIoapic, IoapicHost};
use crate::kick::Kicker;
use crate::state::{ChipState, CountersState, IoapicSnapshot, LapicSnapshot};
use crate::timerfd;
use crate::trace::{TraceEvent, Tracer};

/// What user mode needs to know about the VM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UserConfig {
    /// vCPUs; vCPU `i` has APIC ID `i`, vCPU 0 is the BSP.
    pub(crate) cpus: usize,
    /// x2APIC offered in CPUID (the LAPICs accept the switch).
    pub(crate) x2apic: bool,
    /// Guest physical-address width (`CPUID.80000008H:EAX[7:0]`).
    pub(crate) phys_addr_bits: u8,
    /// Our IOAPIC's storm threshold.
    pub(crate) storm_threshold: u32,
}

/// A vCPU's timer on the host: a timerfd armed for the earlier of its
/// LAPIC timer's next deadline and its TPR poll.
struct HostTimer {
    fd: TimerFd,
    /// The deadline (ns since VM start) the timerfd is armed for.
    armed: Option<u64>,
    /// When to kick the vCPU to look at its CR8 again (a vector waits on
    /// the TPR and the host may not exit on CR8 writes).
    poll: Option<u64>,
}

/// How often a vCPU whose pending vector waits on its TPR is kicked, so a
/// CR8 lowered without an exit is noticed (see `plan::tpr_blocked`).
const TPR_POLL_NS: u64 = 200_000;

/// Counters kept by the chip.
#[derive(Default)]
struct Counters {
    injected: AtomicU64,
    eois: AtomicU64,
    /// ExtINT, SMI and stray SIPIs dropped by the vCPU loops.
    ignored_events: AtomicU64,
}

/// The user-mode interrupt controller, shared by every thread.
pub(crate) struct UserChip {
    ioapic: IoapicHost<()>,
    apics: Mutex<ApicSystem>,
    wake: Vec<Condvar>,
    timers: Vec<Mutex<HostTimer>>,
    timer_fds: Vec<RawFd>,
    clock: Instant,
    /// Added (wrapping) to the time since `clock`: a restored chip's clock
    /// continues from the snapshot's.
    clock_offset: AtomicU64,
    kicker: Arc<Kicker>,
    stopping: AtomicBool,
    /// The VM is pausing for a snapshot: parked vCPU threads return.
    pausing: AtomicBool,
    counters: Counters,
    errors: ErrorLog,
    tracer: Tracer,
}

impl UserChip {
    /// Sets up user-space MSR exits and the models; before any vCPU exists.
    pub(crate) fn create(
        vm: &VmFd,
        kicker: Arc<Kicker>,
        cfg: UserConfig,
        tracer: Tracer,
    ) -> Result<Arc<Self>, Error> {
        kvm::route_msrs_to_user_space(vm)?;
        let configs = (0..cfg.cpus).map(|i| LapicConfig {
            apic_id: i as u32,
            bsp: i == 0,
            x2apic: cfg.x2apic,
            directed_eoi: true,
            phys_addr_bits: cfg.phys_addr_bits,
            bus_hz: LAPIC_BUS_HZ,
            // Each vCPU's thread supplies it (`set_tsc_clock`) before the
            // vCPU first runs: the guest TSC can only be read once the vCPU
            // exists.
            tsc: None,
        });
        let mut timers = Vec::with_capacity(cfg.cpus);
        let mut timer_fds = Vec::with_capacity(cfg.cpus);
        for _ in 0..cfg.cpus {
            let fd = timerfd::nonblocking("create a LAPIC timerfd")?;
            timer_fds.push(fd.as_raw_fd());
            timers.push(Mutex::new(HostTimer {
                fd,
                armed: None,
                poll: None,
            }));
        }
        Ok(Arc::new(Self {
            ioapic: IoapicHost::new(cfg.storm_threshold, (), tracer.clone()),
            apics: Mutex::new(ApicSystem::new(configs)),
            wake: (0..cfg.cpus).map(|_| Condvar::new()).collect(),
            timers,
            timer_fds,
            clock: Instant::now(),
            clock_offset: AtomicU64::new(0),
            kicker,
            stopping: AtomicBool::new(false),
            pausing: AtomicBool::new(false),
            counters: Counters::default(),
            errors: ErrorLog::new("user irqchip"),
            tracer,
        }))
    }

    /// Nanoseconds since the VM was created: the LAPIC models' clock.
    fn now(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .wrapping_add(self.clock_offset.load(Ordering::Relaxed))
    }

    fn lock_apics(&self) -> MutexGuard<'_, ApicSystem> {
        self.apics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn pausing(&self) -> bool {
        self.pausing.load(Ordering::Acquire)
    }

    /// Gets vCPU `index` to look at its LAPIC (under the APIC lock).
    fn wake(&self, apics: &ApicSystem, index: usize) {
        if apics.parked(index) {
            if let Some(cv) = self.wake.get(index) {
                cv.notify_one();
            }
        } else {
            // A no-op when called by vCPU `index`'s own thread.
            self.kicker.kick(index);
        }
    }

    fn wake_all_in(&self, apics: &ApicSystem, set: &ApicSet) {
        for index in set.iter() {
            self.wake(apics, index);
        }
    }

    /// Starts or stops vCPU `index`'s TPR poll (under the APIC lock).
    fn set_tpr_poll(&self, apics: &ApicSystem, index: usize, on: bool) {
        let Some(slot) = self.timers.get(index) else {
            return;
        };
        {
            let mut timer = slot.lock().unwrap_or_else(PoisonError::into_inner);
            match (on, timer.poll) {
                (true, None) => timer.poll = Some(self.now().saturating_add(TPR_POLL_NS)),
                (false, Some(_)) => timer.poll = None,
                _ => return,
            }
        }
        self.sync_timer(apics, index);
    }

    /// Re-arms vCPU `index`'s timerfd if the earlier of its LAPIC's next
    /// deadline and its TPR poll moved (under the APIC lock).
    fn sync_timer(&self, apics: &ApicSystem, index: usize) {
        let lapic_deadline = apics.get(index).and_then(|l| l.next_deadline());
        let Some(slot) = self.timers.get(index) else {
            return;
        };
        let mut timer = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let deadline = match (lapic_deadline, timer.poll) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if timer.armed == deadline {
            return;
        }
        let result = match deadline {
            // A zero duration would disarm: a due deadline fires in 1 ns.
            Some(d) => {
                let ns = d.saturating_sub(self.now()).max(1);
                timer.fd.reset(Duration::from_nanos(ns), None)
            }
            None => timer.fd.clear(),
        };
        match result {
            Ok(()) => timer.armed = deadline,
            Err(e) => {
                timer.armed = None;
                drop(timer);
                self.errors
                    .fail(format_args!("arm the LAPIC timer of vcpu {index}: {e}"));
            }
        }
    }

    /// Traces an EOI write of vCPU `index`, before the model takes it: the
    /// vector it ends is the highest in service (under the APIC lock).
    fn trace_eoi(&self, apics: &ApicSystem, index: usize) {
        if !self.tracer.on() {
            return;
        }
        let vector = apics
            .get(index)
            .and_then(|l| (16..=u8::MAX).rev().find(|&v| l.is_in_service(v)));
        self.tracer.emit(|| TraceEvent::Eoi {
            vcpu: index,
            vector,
        });
    }

    /// What a LAPIC register write of vCPU `source` asks of the others.
    fn apply_effect(&self, effect: Option<Effect>, source: usize) {
        match effect {
            None => {}
            Some(Effect::Ipi(message)) => {
                let mut apics = self.lock_apics();
                let mut took = apics.deliver(&message, Some(source));
                self.tracer.emit(|| TraceEvent::Ipi {
                    from: source,
                    vector: message.vector,
                    targets: took,
                });
                took.remove(source);
                self.wake_all_in(&apics, &took);
            }
            Some(Effect::EoiBroadcast { vector }) => self.ioapic.eoi(self, vector),
        }
    }
}

impl Deliver for UserChip {
    type State = ();

    fn deliver(&self, _hosted: &mut Hosted<()>, deliveries: &[Delivery]) {
        if deliveries.is_empty() {
            return;
        }
        let mut apics = self.lock_apics();
        for d in deliveries {
            let took = apics.deliver(&d.message, None);
            self.tracer.emit(|| TraceEvent::PinDelivery {
                pin: d.pin,
                vector: d.message.vector,
                level: d.message.trigger_mode == irqchip::apic_bus::TriggerMode::Level,
                targets: Some(took),
            });
            self.wake_all_in(&apics, &took);
        }
    }
}

/// The format of the MSIs the guest's devices send (the extended
/// destination ID, `Mode::msi_format`).
const GUEST_FORMAT: MsiFormat = irqchip::Mode::User.msi_format();

impl HostsIoapic for UserChip {
    fn ioapic_host(&self) -> &IoapicHost<()> {
        &self.ioapic
    }
}

impl Backend for UserChip {
    fn our_ioapic(&self) -> Option<&dyn HostedIoapic> {
        Some(self)
    }

    fn vcpu(self: Arc<Self>, index: usize, _fd: &VcpuFd) -> Result<Box<dyn VcpuBackend>, Error> {
        Ok(Box::new(vcpu::UserVcpu::new(self, index)))
    }

    fn signal_msi(&self, msi: Msi) -> Result<(), IrqError> {
        let decoded = msi::decode(msi, GUEST_FORMAT).map_err(|e| IrqError::BadMsi {
            address: msi.address,
            data: msi.data,
            why: e.to_string(),
        })?;
        let mut apics = self.lock_apics();
        let took = apics.deliver(&decoded.bus_message(), None);
        self.tracer.emit(|| TraceEvent::Msi {
            vector: decoded.bus_message().vector,
            targets: Some(took),
        });
        self.wake_all_in(&apics, &took);
        Ok(())
    }

    fn stats(&self) -> IrqStats {
        let c = &self.counters;
        IrqStats {
            injected: Some(c.injected.load(Ordering::Relaxed)),
            eois: Some(c.eois.load(Ordering::Relaxed)),
            errors: self.errors.count(),
        }
    }

    fn model_stats(&self) -> Option<ModelStats> {
        Some(ModelStats {
            lapic_bad_accesses: self.lock_apics().bad_accesses(),
            ignored_events: self.counters.ignored_events.load(Ordering::Relaxed),
            ..self.ioapic.model_stats()
        })
    }

    fn timer_fds(&self) -> Vec<RawFd> {
        self.timer_fds.clone()
    }

    fn on_timer(&self, index: usize) {
        let mut apics = self.lock_apics();
        let now = self.now();
        let mut poll_due = false;
        if let Some(slot) = self.timers.get(index) {
            let mut timer = slot.lock().unwrap_or_else(PoisonError::into_inner);
            // Consume the expiration (EAGAIN: re-armed meanwhile).
            let _ = timer.fd.wait();
            timer.armed = None;
            if timer.poll.is_some_and(|p| p <= now) {
                // The vCPU's loop starts a new poll if it still needs one.
                timer.poll = None;
                poll_due = true;
            }
        }
        let (fired, vector) = apics
            .with(index, |l| (l.tick(now), l.timer_vector()))
            .unwrap_or((false, None));
        if fired && let Some(vector) = vector {
            self.tracer.emit(|| TraceEvent::Timer {
                vcpu: index,
                vector,
            });
        }
        self.sync_timer(&apics, index);
        if fired || poll_due {
            self.wake(&apics, index);
        }
    }

    fn set_paused(&self, paused: bool) {
        self.pausing.store(paused, Ordering::Release);
        let _apics = self.lock_apics();
        for cv in &self.wake {
            cv.notify_all();
        }
    }

    fn save_vm(&self) -> Result<VmPart, Error> {
        let (ioapic, storm_reports, storm_pins) = self.ioapic.save();
        let apics = self.lock_apics();
        let c = &self.counters;
        Ok(VmPart {
            ioapic: IoapicSnapshot::Ours(Box::new(ioapic)),
            pic: None,
            arbiter: Some(apics.arbiter()),
            clock_ns: self.now(),
            counters: CountersState {
                injected: c.injected.load(Ordering::Relaxed),
                eois: c.eois.load(Ordering::Relaxed),
                errors: self.errors.count(),
                storm_reports,
                storm_pins,
                ignored_events: c.ignored_events.load(Ordering::Relaxed),
                ..CountersState::default()
            },
        })
    }

    fn restore_vm(&self, state: &ChipState) -> Result<(), Error> {
        let IoapicSnapshot::Ours(ioapic) = &state.ioapic else {
            return Err(Error::Config(
                "user mode restores our IOAPIC model's state only".to_string(),
            ));
        };
        let lapics = state
            .vcpus
            .iter()
            .map(|v| match &v.lapic {
                LapicSnapshot::Ours(l) => Ok(irqchip::lapic::Lapic::restore(l)),
                LapicSnapshot::Kvm { .. } => Err(Error::Config(
                    "a KVM LAPIC state reached user mode unconverted".to_string(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if lapics.len() != self.wake.len() {
            return Err(Error::Config(format!(
                "{} LAPICs for {} vCPUs",
                lapics.len(),
                self.wake.len()
            )));
        }
        let c = state.counters;
        self.ioapic.restore(ioapic, c.storm_reports, c.storm_pins)?;
        let elapsed = u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.clock_offset
            .store(state.clock_ns.wrapping_sub(elapsed), Ordering::Relaxed);
        self.counters.injected.store(c.injected, Ordering::Relaxed);
        self.counters.eois.store(c.eois, Ordering::Relaxed);
        self.counters
            .ignored_events
            .store(c.ignored_events, Ordering::Relaxed);
        self.errors.set_count(c.errors);
        let mut apics = self.lock_apics();
        apics.replace(lapics, &state.arbiter.unwrap_or_default());
        for index in 0..apics.len() {
            self.sync_timer(&apics, index);
        }
        Ok(())
    }

    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let _apics = self.lock_apics();
        for cv in &self.wake {
            cv.notify_all();
        }
    }
}
