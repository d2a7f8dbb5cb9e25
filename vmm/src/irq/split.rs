//! `--irqchip split`: our IOAPIC model, KVM's local APICs.
//!
//! - Setup: `KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP, 24)` before any vCPU
//!   exists (KVM then creates an in-kernel LAPIC per vCPU and no PIC or
//!   IOAPIC), and one KVM MSI route per pin on GSI == pin.
//! - The model ([`Ioapic`]) sits behind one mutex with the generation of the
//!   routes KVM holds. Every operation (a device line change on any thread,
//!   a guest MMIO access, a `KVM_EXIT_IOAPIC_EOI`, a host `program_pin`)
//!   takes the lock, runs the model, then, still under the lock:
//!   1. refreshes KVM's GSI routes if the model's route generation moved
//!      (`KVM_SET_GSI_ROUTING`), so they mirror the entries before anything
//!      that depends on a new entry is delivered (QEMU's split IOAPIC delivers
//!      an unmasked level pin on the stale route; the guest suite tests it);
//!   2. sends each delivery the model returned with `KVM_SIGNAL_MSI`, the
//!      message encoded by `irqchip::msi` exactly as the route would be;
//!   3. records storm reports.
//!
//!   Line changes are synchronous on the calling thread: a pc-testdev write
//!   takes effect before its vCPU re-enters `KVM_RUN`.
//! - Why routes at all when deliveries go by `KVM_SIGNAL_MSI`: KVM sets a
//!   vCPU's EOI-exit bit for a vector only when a *level* MSI route (data bit
//!   15) on a GSI below the reserved 24 targets that vCPU. The guest's EOI of
//!   such a vector then exits with `KVM_EXIT_IOAPIC_EOI`, which goes to the
//!   model's EOI (Remote IRR cleared, re-delivery while asserted).
//! - `KVM_IRQFD_FLAG_RESAMPLE` is refused by KVM in this mode; nothing here
//!   uses irqfds.
//!
//! # Host quirk: a late EOI exit
//!
//! On this host's KVM (kvm_pvm) the in-kernel LAPIC EOIs an interrupt at
//! injection, and the `KVM_EXIT_IOAPIC_EOI` request that EOI raises is not
//! acted on before the guest runs: it waits for the vCPU's next pass through
//! KVM's entry path. A vCPU that then executes `hlt` blocks in the kernel
//! with the request pending (a pending EOI exit is not a wake-up event), so
//! our IOAPIC never sees the EOI: a level pin keeps Remote IRR and a line
//! still high is not re-delivered until something else wakes that vCPU
//! (`tests/modes.rs`, `level_pin_redelivered_after_eoi_while_asserted`,
//! hangs without the remedy). Remedy, the EOI watch: while a level pin has
//! held Remote IRR for [`EOI_POKE`] since its message went out, every vCPU
//! is kicked, and one found halted is made runnable (`KVM_SET_MP_STATE`),
//! so its next `KVM_RUN` delivers the pending exit. The guest sees at worst
//! a spurious wake-up from `hlt`, which guests tolerate (a `hlt` loop
//! re-checks its condition). The interval bounds how late an EOI can be:
//! the guest suite's storm test (10,000 re-deliveries of an unclaimed level
//! pin) took 12 s with 1 ms and 4 s with 200 us.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use irqchip::apic_bus::{DeliveryMode, Message, TriggerMode};
use irqchip::ioapic::{Ioapic, IoapicOutput, NUM_PINS, PinMask};
use irqchip::msi::{self, Msi, MsiFormat};
use kvm_bindings::{
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE,
    KvmIrqRouting, kvm_enable_cap, kvm_irq_routing_entry, kvm_mp_state, kvm_msi,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::timerfd::TimerFd;

use super::host_ioapic::{self, IoapicMmio, StormWatch};
use super::{
    ExitAction, InterruptController, IrqError, IrqExit, IrqStats, MmioWindow, ModelStats,
    PinProgram, StormSink, VcpuInterrupts,
};
use crate::cli::IrqchipMode;
use crate::control::VmControl;
use crate::error::{Error, Result};
use crate::ratelimit::RateLimiter;

/// IOAPIC pins, and the GSIs KVM reserves for them.
const PINS: u32 = NUM_PINS as u32;

/// How often the EOI watch pokes the vCPUs while a level pin has Remote IRR
/// set (see the module documentation).
const EOI_POKE: Duration = Duration::from_micros(200);

/// Our IOAPIC in front of KVM's local APICs.
pub(crate) struct SplitIrqchip {
    /// This chip, for the per-vCPU parts and the MMIO window.
    me: Weak<SplitIrqchip>,
    vm: Arc<VmFd>,
    state: Mutex<State>,
    msis: AtomicU64,
    eois: AtomicU64,
    errors: AtomicU64,
    storm: StormWatch,
    warn: RateLimiter,
    control: Arc<VmControl>,
    /// The EOI watch's timer (a timerfd the event loop watches).
    watch: Mutex<TimerFd>,
    watch_fd: RawFd,
    /// Per vCPU: make it runnable if it is halted (set by the EOI watch).
    poke: Vec<AtomicBool>,
    /// Halted vCPUs the EOI watch made runnable.
    pokes: AtomicU64,
}

/// What the lock protects.
struct State {
    ioapic: Ioapic,
    /// The model's route generation KVM's GSI routes mirror; `None` when
    /// the last `KVM_SET_GSI_ROUTING` failed (retried on the next change).
    routed: Option<u64>,
    /// The EOI watch's timer is armed.
    watching: bool,
    /// Per pin: when its last level message was sent (EOI-watch clock).
    sent_at: [Option<std::time::Instant>; NUM_PINS],
}

/// Enables the split irqchip (24 IOAPIC routes reserved) and installs the
/// reset-state routes; must precede vCPU creation. `control` gives the EOI
/// watch the kicker for the `cpus` vCPUs.
pub(crate) fn create(
    vm: Arc<VmFd>,
    control: Arc<VmControl>,
    cpus: usize,
) -> Result<Arc<SplitIrqchip>> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = u64::from(PINS);
    vm.enable_cap(&cap)
        .map_err(Error::kvm("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
    let ioapic = host_ioapic::new_ioapic();
    let routing = routing_table(&ioapic)
        .map_err(|e| Error::host("build the IOAPIC GSI routes")(std::io::Error::other(e)))?;
    vm.set_gsi_routing(&routing)
        .map_err(Error::kvm("KVM_SET_GSI_ROUTING"))?;
    let routed = Some(ioapic.route_generation());
    let watch = host_ioapic::nonblocking_timerfd("create the EOI watch timerfd")?;
    let watch_fd = watch.as_raw_fd();
    Ok(Arc::new_cyclic(|me| SplitIrqchip {
        me: me.clone(),
        vm,
        state: Mutex::new(State {
            ioapic,
            routed,
            watching: false,
            sent_at: [None; NUM_PINS],
        }),
        msis: AtomicU64::new(0),
        eois: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        storm: StormWatch::new(),
        warn: RateLimiter::new(),
        control,
        watch: Mutex::new(watch),
        watch_fd,
        poke: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
        pokes: AtomicU64::new(0),
    }))
}

/// KVM's MSI route for GSI `pin`: the pin's entry as `Ioapic::msi_route`
/// encodes it (level trigger in data bit 15, lowest priority with the
/// redirection hint), whatever its mask and Remote IRR.
pub(crate) fn route_entry(pin: u8, route: Msi) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi: u32::from(pin),
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = route.address as u32;
    entry.u.msi.address_hi = (route.address >> 32) as u32;
    entry.u.msi.data = route.data;
    entry
}

/// The whole routing table: one MSI route per pin, GSI == pin.
pub(crate) fn routing_table(ioapic: &Ioapic) -> std::result::Result<KvmIrqRouting, String> {
    let entries = (0..NUM_PINS as u8)
        .map(|pin| {
            ioapic
                .msi_route(pin, MsiFormat::Compatibility)
                .map(|route| route_entry(pin, route))
                .map_err(|e| format!("pin {pin}: {e}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    KvmIrqRouting::from_entries(&entries).map_err(|e| format!("{e:?}"))
}

/// The `KVM_SIGNAL_MSI` payload for a message the IOAPIC sends: the same
/// encoding as the pin's route (redirection hint for lowest priority).
pub(crate) fn msi_for(message: &Message) -> std::result::Result<kvm_msi, irqchip::Error> {
    let hint = message.delivery_mode == DeliveryMode::LowestPriority;
    let Msi { address, data } = msi::encode(message, hint, MsiFormat::Compatibility)?;
    Ok(kvm_msi {
        address_lo: address as u32,
        address_hi: (address >> 32) as u32,
        data,
        ..Default::default()
    })
}

impl SplitIrqchip {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, what: std::fmt::Arguments<'_>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.warn.check() {
            log::warn!("split irqchip: {what} ({suppressed} similar warnings suppressed)");
        }
    }

    /// Brings KVM's routes up to the model's generation (under the lock).
    fn refresh_routes(&self, st: &mut State) {
        let generation = st.ioapic.route_generation();
        if st.routed == Some(generation) {
            return;
        }
        match routing_table(&st.ioapic) {
            Ok(table) => match self.vm.set_gsi_routing(&table) {
                Ok(()) => st.routed = Some(generation),
                Err(e) => {
                    st.routed = None;
                    self.fail(format_args!("KVM_SET_GSI_ROUTING: {e}"));
                }
            },
            Err(e) => {
                st.routed = None;
                self.fail(format_args!("GSI routes: {e}"));
            }
        }
    }

    /// Arms the EOI watch for `after` unless it is armed (under the lock).
    fn watch_eois(&self, st: &mut State, after: Duration) {
        if st.watching {
            return;
        }
        let mut timer = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        match timer.reset(after.max(Duration::from_micros(1)), None) {
            Ok(()) => st.watching = true,
            Err(e) => {
                drop(timer);
                self.fail(format_args!("arm the EOI watch: {e}"));
            }
        }
    }

    /// The EOI watch fired: if a level pin has kept Remote IRR for
    /// [`EOI_POKE`] since its message went out, poke every vCPU; watch again
    /// while any level pin has Remote IRR set.
    fn eoi_watch_expired(&self) {
        // Consume the expiration (EAGAIN: re-armed meanwhile).
        let _ = self
            .watch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .wait();
        let mut st = self.lock();
        st.watching = false;
        let now = std::time::Instant::now();
        let mut stale = false;
        let mut next = EOI_POKE;
        for (pin, entry) in st.ioapic.entries() {
            let sent = st.sent_at.get(usize::from(pin)).copied().flatten();
            match sent {
                Some(at) if entry.remote_irr() => {
                    let age = now.saturating_duration_since(at);
                    if age >= EOI_POKE {
                        stale = true;
                    } else {
                        next = next.min(EOI_POKE - age);
                    }
                }
                _ => {}
            }
        }
        if stale {
            for poke in &self.poke {
                poke.store(true, Ordering::Release);
            }
            self.control.kicker().kick_all();
        }
        if st.ioapic.entries().any(|(_, e)| e.remote_irr()) {
            self.watch_eois(&mut st, next);
        }
    }

    /// Sends one message (under the lock, after the routes are fresh).
    fn send(&self, st: &mut State, pin: u8, message: &Message) {
        if message.trigger_mode == TriggerMode::Level {
            if let Some(at) = st.sent_at.get_mut(usize::from(pin)) {
                *at = Some(std::time::Instant::now());
            }
            self.watch_eois(st, EOI_POKE);
        }
        match msi_for(message) {
            Ok(msi) => match self.vm.signal_msi(msi) {
                Ok(_) => {
                    self.msis.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.fail(format_args!("KVM_SIGNAL_MSI for pin {pin}: {e}")),
            },
            Err(e) => self.fail(format_args!("pin {pin}: {e}")),
        }
    }

    /// Routes first, then every delivery; returns the storm reports for
    /// [`StormWatch::dispatch`] once the lock is released.
    fn apply(&self, st: &mut State, output: &IoapicOutput) -> PinMask {
        self.refresh_routes(st);
        for d in output.deliveries() {
            self.send(st, d.pin, &d.message);
        }
        self.storm.note(output.storm_pins())
    }

    /// `KVM_EXIT_IOAPIC_EOI`: the guest EOI'd `vector` on a level route.
    fn eoi(&self, vector: u8) {
        self.eois.fetch_add(1, Ordering::Relaxed);
        let storms = {
            let mut st = self.lock();
            let output = st.ioapic.eoi(vector);
            self.apply(&mut st, &output)
        };
        self.storm.dispatch(storms);
    }
}

impl IoapicMmio for SplitIrqchip {
    fn ioapic_read(&self, offset: u64, data: &mut [u8]) {
        self.lock().ioapic.mmio_read(offset, data);
    }

    fn ioapic_write(&self, offset: u64, data: &[u8]) {
        let storms = {
            let mut st = self.lock();
            let output = st.ioapic.mmio_write(offset, data);
            self.apply(&mut st, &output)
        };
        // An EOI-register write can report a storm.
        self.storm.dispatch(storms);
    }
}

impl InterruptController for SplitIrqchip {
    fn mode(&self) -> IrqchipMode {
        IrqchipMode::Split
    }

    fn gsi_count(&self) -> u32 {
        PINS
    }

    fn set_level(&self, gsi: u32, high: bool) -> std::result::Result<(), IrqError> {
        let pin = u8::try_from(gsi)
            .ok()
            .filter(|&p| u32::from(p) < PINS)
            .ok_or(IrqError::NoSuchGsi(gsi))?;
        let mut st = self.lock();
        if let Some(message) = st.ioapic.set_line(pin, high) {
            self.refresh_routes(&mut st);
            self.send(&mut st, pin, &message);
        }
        Ok(())
    }

    fn mmio_devices(&self) -> Vec<MmioWindow> {
        self.me
            .upgrade()
            .map(host_ioapic::window)
            .into_iter()
            .collect()
    }

    fn vcpu(&self, index: usize) -> Box<dyn VcpuInterrupts> {
        Box::new(SplitVcpu {
            chip: self.me.upgrade(),
            index,
        })
    }

    fn stats(&self) -> IrqStats {
        IrqStats {
            injected: Some(self.msis.load(Ordering::Relaxed)),
            eois: Some(self.eois.load(Ordering::Relaxed)),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    fn model_stats(&self) -> Option<ModelStats> {
        let mut stats = host_ioapic::ioapic_stats(self.lock().ioapic.counters(), &self.storm);
        stats.eoi_pokes = self.pokes.load(Ordering::Relaxed);
        Some(stats)
    }

    fn timer_fds(&self) -> Vec<RawFd> {
        vec![self.watch_fd]
    }

    fn on_timer(&self, _index: usize) {
        self.eoi_watch_expired();
    }

    fn program_pin(&self, pin: u8, route: &PinProgram) -> std::result::Result<(), IrqError> {
        if u32::from(pin) >= PINS {
            return Err(IrqError::NoSuchGsi(u32::from(pin)));
        }
        let entry = host_ioapic::pin_entry(route)?;
        let mut st = self.lock();
        let output = st
            .ioapic
            .write_rte(pin, entry)
            .map_err(|_| IrqError::NoSuchGsi(u32::from(pin)))?;
        // An entry write reports no storm (only EOIs do), and the caller
        // (the PV service) holds its own lock: nothing to dispatch.
        let _ = self.apply(&mut st, &output);
        Ok(())
    }

    fn set_storm_sink(&self, sink: StormSink) {
        self.storm.set_sink(sink);
    }
}

/// The per-vCPU part: `KVM_EXIT_IOAPIC_EOI`, and the EOI watch's pokes.
struct SplitVcpu {
    chip: Option<Arc<SplitIrqchip>>,
    index: usize,
}

impl VcpuInterrupts for SplitVcpu {
    fn before_run(&mut self, vcpu: &mut VcpuFd) -> Result<()> {
        let Some(chip) = &self.chip else {
            return Ok(());
        };
        let poked = chip
            .poke
            .get(self.index)
            .is_some_and(|p| p.swap(false, Ordering::AcqRel));
        if !poked {
            return Ok(());
        }
        let state = vcpu
            .get_mp_state()
            .map_err(Error::kvm("KVM_GET_MP_STATE"))?;
        if state.mp_state == KVM_MP_STATE_HALTED {
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(Error::kvm("KVM_SET_MP_STATE"))?;
            chip.pokes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn on_exit(&mut self, exit: IrqExit<'_>) -> ExitAction {
        match (exit, &self.chip) {
            (IrqExit::IoapicEoi(vector), Some(chip)) => {
                chip.eoi(vector);
                ExitAction::Resume
            }
            _ => ExitAction::Unexpected,
        }
    }
}

#[cfg(test)]
mod tests {
    use irqchip::apic_bus::DestinationMode;
    use irqchip::ioapic::RedirectionEntry;
    use kvm_bindings::kvm_irq_routing_entry;

    use super::*;

    fn msi_of(e: &kvm_irq_routing_entry) -> (u32, u32, u32) {
        // SAFETY: the test built the entry as an MSI route.
        let m = unsafe { e.u.msi };
        (m.address_lo, m.address_hi, m.data)
    }

    #[test]
    fn routing_table_has_one_msi_route_per_pin_on_its_gsi() {
        let ioapic = host_ioapic::new_ioapic();

        let table = routing_table(&ioapic).unwrap();

        let entries = table.as_slice();
        assert_eq!(entries.len(), NUM_PINS);
        for (pin, e) in entries.iter().enumerate() {
            assert_eq!(
                (e.gsi, e.type_, e.flags),
                (pin as u32, KVM_IRQ_ROUTING_MSI, 0)
            );
        }
    }

    #[test]
    fn routing_table_mirrors_level_entry_with_trigger_in_data_bit_15() {
        let mut ioapic = host_ioapic::new_ioapic();
        let entry = RedirectionEntry::new()
            .with_vector(0x38)
            .with_level_triggered(true)
            .with_destination(2)
            .with_masked(false);
        let out = ioapic.write_rte(5, entry).unwrap();
        assert!(out.routes_changed());

        let table = routing_table(&ioapic).unwrap();

        let (lo, hi, data) = msi_of(&table.as_slice()[5]);
        assert_eq!((lo, hi), (0xfee0_2000, 0));
        assert_eq!(data, 0xc038, "vector 0x38, fixed, assert, level");
        assert_ne!(data & (1 << 15), 0);
    }

    #[test]
    fn routing_table_mirrors_logical_lowest_priority_with_redirection_hint() {
        let mut ioapic = host_ioapic::new_ioapic();
        let entry = RedirectionEntry::new()
            .with_vector(0x41)
            .with_delivery_mode(DeliveryMode::LowestPriority)
            .with_logical(true)
            .with_destination(0b0110);
        ioapic.write_rte(16, entry).unwrap();

        let table = routing_table(&ioapic).unwrap();

        let (lo, _, data) = msi_of(&table.as_slice()[16]);
        // Destination 0b0110 in bits 12..19, hint (bit 3), logical (bit 2).
        assert_eq!(lo, 0xfee0_600c);
        assert_eq!(data, 0x4141, "vector 0x41, lowest priority, assert, edge");
    }

    #[test]
    fn routing_table_follows_a_rewrite_and_ignores_the_mask() {
        let mut ioapic = host_ioapic::new_ioapic();
        let edge = RedirectionEntry::new().with_vector(0x35).with_masked(false);
        ioapic.write_rte(3, edge).unwrap();
        let generation = ioapic.route_generation();
        // The guest test of QEMU's stale-route bug: masked, vector changed,
        // then unmasked with the line high.
        ioapic
            .write_rte(
                3,
                edge.with_vector(0x38)
                    .with_level_triggered(true)
                    .with_masked(true),
            )
            .unwrap();
        assert_ne!(ioapic.route_generation(), generation);

        let (_, _, data) = msi_of(&routing_table(&ioapic).unwrap().as_slice()[3]);

        assert_eq!(data & 0xff, 0x38);
        assert_ne!(data & (1 << 15), 0);
    }

    #[test]
    fn msi_for_a_delivery_matches_the_pins_route() {
        let mut ioapic = host_ioapic::new_ioapic();
        let entry = RedirectionEntry::new()
            .with_vector(0x62)
            .with_delivery_mode(DeliveryMode::LowestPriority)
            .with_logical(true)
            .with_level_triggered(true)
            .with_destination(0x03)
            .with_masked(false);
        ioapic.write_rte(9, entry).unwrap();
        let message = ioapic.set_line(9, true).unwrap();

        let msi = msi_for(&message).unwrap();

        let (lo, hi, data) = msi_of(&routing_table(&ioapic).unwrap().as_slice()[9]);
        assert_eq!((msi.address_lo, msi.address_hi, msi.data), (lo, hi, data));
        assert_eq!(msi.flags, 0);
    }

    #[test]
    fn msi_for_physical_fixed_edge_message() {
        let message = Message::fixed_physical(3, 0x51);

        let msi = msi_for(&message).unwrap();

        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_3000, 0, 0x4051)
        );
    }

    #[test]
    fn msi_for_refuses_a_destination_above_8_bits() {
        let message = Message {
            destination: 0x100,
            destination_mode: DestinationMode::Physical,
            ..Message::fixed_physical(0, 0x51)
        };

        assert!(msi_for(&message).is_err());
    }
}
