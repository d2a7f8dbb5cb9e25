//! `--irqchip user`: our IOAPIC and our local APICs; KVM has no interrupt
//! controller at all.
//!
//! # Shape
//!
//! - [`Chip`] (VM-wide): the IOAPIC model behind one mutex; every vCPU's
//!   LAPIC model, its bus target and the lowest-priority arbiter behind a
//!   second one ([`apics::Apics`]); per vCPU a condition variable (paired
//!   with the APIC mutex) its thread parks on, and a timerfd for its LAPIC
//!   timer, watched by the event loop.
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
//! a parked thread through its condition variable, a running one by the
//! kick signal (`immediate_exit`), nothing for the calling thread itself
//! (its loop re-checks before the next entry).

mod apics;
mod kvm;
mod plan;
mod vcpu;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use irqchip::apic_bus::{ApicSet, Message};
use irqchip::ioapic::{Ioapic, IoapicOutput, NUM_PINS, PinMask};
use irqchip::lapic::{Effect, LapicConfig};
use irqconnect_abi::layout::LAPIC_BUS_HZ;
use kvm_ioctls::VmFd;
use vmm_sys_util::timerfd::TimerFd;

use super::host_ioapic::{self, IoapicMmio, StormWatch};
use super::{
    InterruptController, IrqError, IrqStats, MmioWindow, ModelStats, PinProgram, StormSink,
    VcpuInterrupts,
};
use crate::cli::IrqchipMode;
use crate::control::VmControl;
use crate::error::Result;
use crate::ratelimit::RateLimiter;
use apics::Apics;

/// What user mode needs to know about the VM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UserConfig {
    /// vCPUs; vCPU `i` has APIC ID `i`, vCPU 0 is the BSP.
    pub(crate) cpus: usize,
    /// x2APIC offered in CPUID (the LAPICs accept the switch).
    pub(crate) x2apic: bool,
    /// Guest physical-address width (`CPUID.80000008H:EAX[7:0]`).
    pub(crate) phys_addr_bits: u8,
}

/// The user-mode interrupt controller.
pub(crate) struct UserIrqchip(Arc<Chip>);

/// A vCPU's timer on the host: a timerfd armed for the earlier of its
/// LAPIC timer's next deadline and its TPR poll.
struct HostTimer {
    fd: TimerFd,
    /// The deadline (ns since VM start) the timerfd is armed for.
    armed: Option<u64>,
    /// When to kick the vCPU to look at its CR8 again (a vector waits on
    /// the TPR and this host does not exit on CR8 writes).
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
    errors: AtomicU64,
    /// ExtINT, SMI and stray SIPIs dropped by the vCPU loops.
    ignored_events: AtomicU64,
}

/// The state every thread shares.
pub(super) struct Chip {
    ioapic: Mutex<Ioapic>,
    apics: Mutex<Apics>,
    wake: Vec<Condvar>,
    timers: Vec<Mutex<HostTimer>>,
    timer_fds: Vec<RawFd>,
    clock: Instant,
    control: Arc<VmControl>,
    counters: Counters,
    storm: StormWatch,
    warn: RateLimiter,
}

/// Sets up user-space MSR exits and the models; before any vCPU exists.
pub(crate) fn create(
    vm: &VmFd,
    control: Arc<VmControl>,
    cfg: UserConfig,
) -> Result<Arc<UserIrqchip>> {
    kvm::route_msrs_to_user_space(vm)?;
    let configs = (0..cfg.cpus).map(|i| LapicConfig {
        apic_id: i as u32,
        bsp: i == 0,
        x2apic: cfg.x2apic,
        directed_eoi: true,
        phys_addr_bits: cfg.phys_addr_bits,
        bus_hz: LAPIC_BUS_HZ,
        tsc: None,
    });
    let mut timers = Vec::with_capacity(cfg.cpus);
    let mut timer_fds = Vec::with_capacity(cfg.cpus);
    for _ in 0..cfg.cpus {
        let fd = host_ioapic::nonblocking_timerfd("create a LAPIC timerfd")?;
        timer_fds.push(fd.as_raw_fd());
        timers.push(Mutex::new(HostTimer {
            fd,
            armed: None,
            poll: None,
        }));
    }
    let chip = Arc::new(Chip {
        ioapic: Mutex::new(host_ioapic::new_ioapic()),
        apics: Mutex::new(Apics::new(configs)),
        wake: (0..cfg.cpus).map(|_| Condvar::new()).collect(),
        timers,
        timer_fds,
        clock: Instant::now(),
        control,
        counters: Counters::default(),
        storm: StormWatch::new(),
        warn: RateLimiter::new(),
    });
    Ok(Arc::new(UserIrqchip(chip)))
}

impl Chip {
    /// Nanoseconds since the VM was created: the LAPIC models' clock.
    fn now(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock_apics(&self) -> MutexGuard<'_, Apics> {
        self.apics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_ioapic(&self) -> MutexGuard<'_, Ioapic> {
        self.ioapic.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, what: std::fmt::Arguments<'_>) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.warn.check() {
            log::warn!("user irqchip: {what} ({suppressed} similar warnings suppressed)");
        }
    }

    /// Gets vCPU `index` to look at its LAPIC (under the APIC lock).
    fn wake(&self, apics: &Apics, index: usize) {
        if apics.parked(index) {
            if let Some(cv) = self.wake.get(index) {
                cv.notify_one();
            }
        } else {
            // A no-op when called by vCPU `index`'s own thread.
            self.control.kicker().kick(index);
        }
    }

    fn wake_all_in(&self, apics: &Apics, set: &ApicSet, except: Option<usize>) {
        for index in set.iter().filter(|&i| Some(i) != except) {
            self.wake(apics, index);
        }
    }

    /// Starts or stops vCPU `index`'s TPR poll (under the APIC lock).
    fn set_tpr_poll(&self, apics: &Apics, index: usize, on: bool) {
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
    fn sync_timer(&self, apics: &Apics, index: usize) {
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
                self.fail(format_args!("arm the LAPIC timer of vcpu {index}: {e}"));
            }
        }
    }

    /// Offers the IOAPIC's messages to the LAPICs (IOAPIC lock held);
    /// returns the storm reports for [`StormWatch::dispatch`] once the
    /// locks are released.
    fn deliver_ioapic(&self, output: &IoapicOutput) -> PinMask {
        if !output.deliveries().is_empty() {
            let mut apics = self.lock_apics();
            for d in output.deliveries() {
                let took = apics.deliver(&d.message, None);
                self.wake_all_in(&apics, &took, None);
            }
        }
        self.storm.note(output.storm_pins())
    }

    /// A message from the IOAPIC pin (IOAPIC lock held).
    fn deliver_one(&self, message: &Message) {
        let mut apics = self.lock_apics();
        let took = apics.deliver(message, None);
        self.wake_all_in(&apics, &took, None);
    }

    /// What a LAPIC register write of vCPU `source` asks of the others.
    fn apply_effect(&self, effect: Option<Effect>, source: usize) {
        match effect {
            None => {}
            Some(Effect::Ipi(message)) => {
                let mut apics = self.lock_apics();
                let took = apics.deliver(&message, Some(source));
                self.wake_all_in(&apics, &took, Some(source));
            }
            Some(Effect::EoiBroadcast { vector }) => {
                let storms = {
                    let mut ioapic = self.lock_ioapic();
                    let output = ioapic.eoi(vector);
                    self.deliver_ioapic(&output)
                };
                self.storm.dispatch(storms);
            }
        }
    }
}

impl IoapicMmio for Chip {
    fn ioapic_read(&self, offset: u64, data: &mut [u8]) {
        self.lock_ioapic().mmio_read(offset, data);
    }

    fn ioapic_write(&self, offset: u64, data: &[u8]) {
        let storms = {
            let mut ioapic = self.lock_ioapic();
            let output = ioapic.mmio_write(offset, data);
            self.deliver_ioapic(&output)
        };
        // An EOI-register write can report a storm.
        self.storm.dispatch(storms);
    }
}

impl InterruptController for UserIrqchip {
    fn mode(&self) -> IrqchipMode {
        IrqchipMode::User
    }

    fn gsi_count(&self) -> u32 {
        NUM_PINS as u32
    }

    fn set_level(&self, gsi: u32, high: bool) -> std::result::Result<(), IrqError> {
        let pin = u8::try_from(gsi)
            .ok()
            .filter(|&p| usize::from(p) < NUM_PINS)
            .ok_or(IrqError::NoSuchGsi(gsi))?;
        let mut ioapic = self.0.lock_ioapic();
        if let Some(message) = ioapic.set_line(pin, high) {
            self.0.deliver_one(&message);
        }
        Ok(())
    }

    fn mmio_devices(&self) -> Vec<MmioWindow> {
        vec![host_ioapic::window(Arc::clone(&self.0))]
    }

    fn vcpu(&self, index: usize) -> Box<dyn VcpuInterrupts> {
        Box::new(vcpu::UserVcpu::new(Arc::clone(&self.0), index))
    }

    fn stats(&self) -> IrqStats {
        let c = &self.0.counters;
        IrqStats {
            injected: Some(c.injected.load(Ordering::Relaxed)),
            eois: Some(c.eois.load(Ordering::Relaxed)),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    fn model_stats(&self) -> Option<ModelStats> {
        let counters = *self.0.lock_ioapic().counters();
        let mut stats = host_ioapic::ioapic_stats(&counters, &self.0.storm);
        stats.lapic_bad_accesses = self.0.lock_apics().bad_accesses();
        stats.ignored_events = self.0.counters.ignored_events.load(Ordering::Relaxed);
        Some(stats)
    }

    fn program_pin(&self, pin: u8, route: &PinProgram) -> std::result::Result<(), IrqError> {
        if usize::from(pin) >= NUM_PINS {
            return Err(IrqError::NoSuchGsi(u32::from(pin)));
        }
        let entry = host_ioapic::pin_entry(route)?;
        let mut ioapic = self.0.lock_ioapic();
        let output = ioapic
            .write_rte(pin, entry)
            .map_err(|_| IrqError::NoSuchGsi(u32::from(pin)))?;
        // An entry write reports no storm (only EOIs do), and the caller
        // (the PV service) holds its own lock: nothing to dispatch.
        let _ = self.0.deliver_ioapic(&output);
        Ok(())
    }

    fn set_storm_sink(&self, sink: StormSink) {
        self.0.storm.set_sink(sink);
    }

    fn timer_fds(&self) -> Vec<RawFd> {
        self.0.timer_fds.clone()
    }

    fn on_timer(&self, index: usize) {
        let chip = &self.0;
        let mut apics = chip.lock_apics();
        let now = chip.now();
        let mut poll_due = false;
        if let Some(slot) = chip.timers.get(index) {
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
        let fired = apics.with(index, |l| l.tick(now)).unwrap_or(false);
        chip.sync_timer(&apics, index);
        if fired || poll_due {
            chip.wake(&apics, index);
        }
    }

    fn shutdown(&self) {
        let _apics = self.0.lock_apics();
        for cv in &self.0.wake {
            cv.notify_all();
        }
    }
}
