//! `split` mode: our IOAPIC model, KVM's local APICs.
//!
//! - Setup: `KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP, 24)` before any vCPU
//!   exists (KVM then creates an in-kernel LAPIC per vCPU and no PIC or
//!   IOAPIC), `KVM_ENABLE_CAP(KVM_CAP_X2APIC_API, USE_32BIT_IDS)`, and one
//!   KVM MSI route per pin on GSI == pin.
//! - Destinations: our IOAPIC decodes the extended destination ID (entry
//!   bits 49..55) and the guest's message-signaled devices are programmed
//!   with it (MSI address bits 5..11). KVM reads no destination bits from an
//!   MSI address's low dword beyond the SDM's 8 (`x86_msi_msg_get_destid`
//!   takes bits 8..31 from the high dword, and only with 32-bit IDs
//!   enabled), so every route and every `KVM_SIGNAL_MSI` goes to KVM in its
//!   x2APIC format ([`MsiFormat::X2apicApi`]). The broadcast quirk stays on:
//!   destination 0xFF from the IOAPIC or an MSI is a broadcast, as in
//!   kernel mode and in our APIC bus.
//! - The model runs in an [`IoapicHost`] whose lock also holds the
//!   generation of the routes KVM holds. After every model operation, still
//!   under the lock, [`SplitChip`]'s [`Deliver`]:
//!   1. refreshes KVM's GSI routes if the model's route generation moved
//!      (`KVM_SET_GSI_ROUTING`), so they mirror the entries before anything
//!      that depends on a new entry is delivered (QEMU's split IOAPIC
//!      delivers an unmasked level pin on the stale route; the guest suite
//!      tests it);
//!   2. sends each message the model returned with `KVM_SIGNAL_MSI`,
//!      encoded by `irqchip::msi::for_message`, the same function that
//!      encodes the pin's route.
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
//! # The EOI watch: a late EOI exit
//!
//! Some hosts' KVM (the README's "Host KVM quirks" says which were seen)
//! EOIs an interrupt in its LAPIC at injection, and the
//! `KVM_EXIT_IOAPIC_EOI` request that EOI raises is not acted on before the
//! guest runs: it waits for the vCPU's next pass through KVM's entry path. A
//! vCPU that then executes `hlt` blocks in the kernel with the request
//! pending (a pending EOI exit is not a wake-up event), so our IOAPIC never
//! sees the EOI: a level pin keeps Remote IRR and a line still high is not
//! re-delivered until something else wakes that vCPU (`vmm/tests/modes.rs`,
//! `level_pin_redelivered_after_eoi_while_asserted`, hangs without the
//! remedy). Remedy: while a level pin has held Remote IRR for
//! [`EOI_POKE`] since its message went out, every vCPU is kicked, and one
//! found halted is made runnable (`KVM_SET_MP_STATE`), so its next
//! `KVM_RUN` delivers the pending exit. The guest sees at worst a spurious
//! wake-up from `hlt`, which guests tolerate (a `hlt` loop re-checks its
//! condition). The interval bounds how late an EOI can be seen, so it bounds
//! the time a run of re-deliveries takes.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use irqchip::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};
use irqchip::ioapic::{Delivery, Ioapic, NUM_PINS};
use irqchip::msi::{self, Msi, MsiFormat};
use kvm_bindings::{
    KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_X2APIC_API, KVM_IRQ_ROUTING_MSI, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE, KVM_X2APIC_API_USE_32BIT_IDS, KvmIrqRouting, kvm_enable_cap,
    kvm_irq_routing_entry, kvm_mp_state, kvm_msi,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::backend::{
    Backend, ExitAction, IrqStats, ModelStats, VcpuBackend, VmPart, kvm_msi_of, msi_vector,
};
use crate::error::{Error, IrqError};
use crate::ioapic_host::{Deliver, ErrorLog, Hosted, HostedIoapic, HostsIoapic, IoapicHost};
use crate::kick::Kicker;
use crate::state::{ChipState, CountersState, IoapicSnapshot, VcpuChipState};
use crate::timerfd;
use crate::trace::{TraceEvent, Tracer};
use crate::vcpu::ChipExit;

/// How often the EOI watch pokes the vCPUs while a level pin has Remote IRR
/// set (see the module documentation).
const EOI_POKE: Duration = Duration::from_micros(200);

/// Our IOAPIC in front of KVM's local APICs.
pub(crate) struct SplitChip {
    vm: Arc<VmFd>,
    ioapic: IoapicHost<Routes>,
    msis: AtomicU64,
    eois: AtomicU64,
    errors: ErrorLog,
    kicker: Arc<Kicker>,
    /// The EOI watch's timer (a timerfd the VMM's event loop watches).
    watch: Mutex<TimerFd>,
    watch_fd: RawFd,
    /// Per vCPU: make it runnable if it is halted (set by the EOI watch).
    poke: Vec<AtomicBool>,
    /// Halted vCPUs the EOI watch made runnable.
    pokes: AtomicU64,
    tracer: Tracer,
}

/// What split mode keeps under the IOAPIC lock.
pub(crate) struct Routes {
    /// The model's route generation KVM's GSI routes mirror; `None` when
    /// the last `KVM_SET_GSI_ROUTING` failed (retried on the next change).
    routed: Option<u64>,
    /// The EOI watch's timer is armed.
    watching: bool,
    /// Per pin: when its last level message was sent (EOI-watch clock).
    sent_at: [Option<Instant>; NUM_PINS],
}

impl SplitChip {
    /// Enables the split irqchip (24 IOAPIC routes reserved) and installs
    /// the reset-state routes; must precede vCPU creation. The EOI watch
    /// kicks the `cpus` vCPUs through `kicker`.
    pub(crate) fn create(
        vm: Arc<VmFd>,
        kicker: Arc<Kicker>,
        cpus: usize,
        storm_threshold: u32,
        tracer: Tracer,
    ) -> Result<Arc<Self>, Error> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = NUM_PINS as u64;
        vm.enable_cap(&cap)
            .map_err(Error::kvm("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
        let mut x2apic_api = kvm_enable_cap {
            cap: KVM_CAP_X2APIC_API,
            ..Default::default()
        };
        x2apic_api.args[0] = u64::from(KVM_X2APIC_API_USE_32BIT_IDS);
        vm.enable_cap(&x2apic_api)
            .map_err(Error::kvm("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)"))?;
        let ioapic = IoapicHost::new(
            storm_threshold,
            Routes {
                routed: None,
                watching: false,
                sent_at: [None; NUM_PINS],
            },
            tracer.clone(),
        );
        {
            let mut hosted = ioapic.lock();
            let routing = routing_table(&hosted.ioapic).map_err(|e| {
                Error::host("build the IOAPIC GSI routes")(std::io::Error::other(e))
            })?;
            vm.set_gsi_routing(&routing)
                .map_err(Error::kvm("KVM_SET_GSI_ROUTING"))?;
            hosted.mode.routed = Some(hosted.ioapic.route_generation());
        }
        let watch = timerfd::nonblocking("create the EOI watch timerfd")?;
        let watch_fd = watch.as_raw_fd();
        Ok(Arc::new(Self {
            vm,
            ioapic,
            msis: AtomicU64::new(0),
            eois: AtomicU64::new(0),
            errors: ErrorLog::new("split irqchip"),
            kicker,
            watch: Mutex::new(watch),
            watch_fd,
            poke: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
            pokes: AtomicU64::new(0),
            tracer,
        }))
    }

    /// Brings KVM's routes up to the model's generation (under the lock).
    fn refresh_routes(&self, hosted: &mut Hosted<Routes>) {
        let generation = hosted.ioapic.route_generation();
        if hosted.mode.routed == Some(generation) {
            return;
        }
        match routing_table(&hosted.ioapic) {
            Ok(table) => match self.vm.set_gsi_routing(&table) {
                Ok(()) => hosted.mode.routed = Some(generation),
                Err(e) => {
                    hosted.mode.routed = None;
                    self.errors.fail(format_args!("KVM_SET_GSI_ROUTING: {e}"));
                }
            },
            Err(e) => {
                hosted.mode.routed = None;
                self.errors.fail(format_args!("GSI routes: {e}"));
            }
        }
    }

    /// Arms the EOI watch for `after` unless it is armed (under the lock).
    fn watch_eois(&self, routes: &mut Routes, after: Duration) {
        if routes.watching {
            return;
        }
        let mut timer = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        match timer.reset(after.max(Duration::from_micros(1)), None) {
            Ok(()) => routes.watching = true,
            Err(e) => {
                drop(timer);
                self.errors.fail(format_args!("arm the EOI watch: {e}"));
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
        let mut hosted = self.ioapic.lock();
        let Hosted { ioapic, mode } = &mut *hosted;
        mode.watching = false;
        let now = Instant::now();
        let mut stale = false;
        let mut next = EOI_POKE;
        for (pin, entry) in ioapic.entries() {
            let sent = mode.sent_at.get(usize::from(pin)).copied().flatten();
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
            self.kicker.kick_all();
        }
        if ioapic.entries().any(|(_, e)| e.remote_irr()) {
            self.watch_eois(mode, next);
        }
    }

    /// Sends one message (under the lock, after the routes are fresh).
    fn send(&self, routes: &mut Routes, pin: u8, message: &Message) {
        if message.trigger_mode == TriggerMode::Level {
            if let Some(at) = routes.sent_at.get_mut(usize::from(pin)) {
                *at = Some(Instant::now());
            }
            self.watch_eois(routes, EOI_POKE);
        }
        self.tracer.emit(|| TraceEvent::PinDelivery {
            pin,
            vector: message.vector,
            level: message.trigger_mode == TriggerMode::Level,
            targets: None,
        });
        match kvm_msi_for(message) {
            Ok(msi) => match self.vm.signal_msi(msi) {
                Ok(_) => {
                    self.msis.fetch_add(1, Ordering::Relaxed);
                    self.tracer.emit(|| TraceEvent::Inject {
                        vcpu: self.single_target(message),
                        vector: message.vector,
                    });
                }
                Err(e) => self
                    .errors
                    .fail(format_args!("KVM_SIGNAL_MSI for pin {pin}: {e}")),
            },
            Err(e) => self.errors.fail(format_args!("pin {pin}: {e}")),
        }
    }
}

impl SplitChip {
    /// The one vCPU `message` names, for the trace: physical, fixed, to an
    /// existing APIC ID (vCPU `i` has APIC ID `i`). `None` when KVM's
    /// LAPICs choose among several.
    fn single_target(&self, message: &Message) -> Option<usize> {
        let index = usize::try_from(message.destination).ok()?;
        (message.destination_mode == DestinationMode::Physical
            && message.delivery_mode == DeliveryMode::Fixed
            && message.shorthand == Shorthand::None
            && index < self.poke.len())
        .then_some(index)
    }
}

impl Deliver for SplitChip {
    type State = Routes;

    fn deliver(&self, hosted: &mut Hosted<Routes>, deliveries: &[Delivery]) {
        self.refresh_routes(hosted);
        for d in deliveries {
            self.send(&mut hosted.mode, d.pin, &d.message);
        }
    }
}

/// KVM's MSI route for GSI `pin`.
fn route_entry(pin: u8, route: Msi) -> kvm_irq_routing_entry {
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

/// The whole routing table: one MSI route per pin, GSI == pin, each the
/// pin's entry as `Ioapic::msi_route` encodes it (level trigger in data
/// bit 15, lowest priority with the redirection hint), whatever its mask
/// and Remote IRR.
fn routing_table(ioapic: &Ioapic) -> Result<KvmIrqRouting, String> {
    let entries = (0..NUM_PINS as u8)
        .map(|pin| {
            ioapic
                .msi_route(pin, KVM_FORMAT)
                .map(|route| route_entry(pin, route))
                .map_err(|e| format!("pin {pin}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    KvmIrqRouting::from_entries(&entries).map_err(|e| format!("{e:?}"))
}

/// How destinations travel to KVM: its x2APIC route format (see the
/// module documentation).
const KVM_FORMAT: MsiFormat = MsiFormat::X2apicApi;

/// The format of the MSIs the guest's devices send (the extended
/// destination ID, `Mode::msi_format`).
const GUEST_FORMAT: MsiFormat = irqchip::Mode::Split.msi_format();

/// The `KVM_SIGNAL_MSI` payload of a message our IOAPIC sends.
fn kvm_msi_for(message: &Message) -> Result<kvm_msi, irqchip::Error> {
    msi::for_message(message, KVM_FORMAT).map(kvm_msi_of)
}

impl HostsIoapic for SplitChip {
    fn ioapic_host(&self) -> &IoapicHost<Routes> {
        &self.ioapic
    }
}

impl Backend for SplitChip {
    fn our_ioapic(&self) -> Option<&dyn HostedIoapic> {
        Some(self)
    }

    fn vcpu(self: Arc<Self>, index: usize, _fd: &VcpuFd) -> Result<Box<dyn VcpuBackend>, Error> {
        Ok(Box::new(SplitVcpu { chip: self, index }))
    }

    fn signal_msi(&self, msi: Msi) -> Result<(), IrqError> {
        let guest = msi;
        let msi = msi::convert(msi, GUEST_FORMAT, KVM_FORMAT).map_err(|e| IrqError::BadMsi {
            address: msi.address,
            data: msi.data,
            why: e.to_string(),
        })?;
        let vector = msi_vector(msi);
        self.tracer.emit(|| TraceEvent::Msi {
            vector,
            targets: None,
        });
        self.vm
            .signal_msi(kvm_msi_of(msi))
            .map_err(|source| IrqError::KvmChip {
                op: "KVM_SIGNAL_MSI",
                source,
            })?;
        self.msis.fetch_add(1, Ordering::Relaxed);
        let vcpu = if self.tracer.on() {
            msi::decode(guest, GUEST_FORMAT)
                .ok()
                .and_then(|d| self.single_target(&d.bus_message()))
        } else {
            None
        };
        self.tracer.emit(|| TraceEvent::Inject { vcpu, vector });
        Ok(())
    }

    fn stats(&self) -> IrqStats {
        IrqStats {
            injected: Some(self.msis.load(Ordering::Relaxed)),
            eois: Some(self.eois.load(Ordering::Relaxed)),
            errors: self.errors.count(),
        }
    }

    fn model_stats(&self) -> Option<ModelStats> {
        Some(ModelStats {
            eoi_pokes: self.pokes.load(Ordering::Relaxed),
            ..self.ioapic.model_stats()
        })
    }

    fn timer_fds(&self) -> Vec<RawFd> {
        vec![self.watch_fd]
    }

    fn save_vm(&self) -> Result<VmPart, Error> {
        let (ioapic, storm_reports, storm_pins) = self.ioapic.save();
        Ok(VmPart {
            ioapic: IoapicSnapshot::Ours(Box::new(ioapic)),
            counters: CountersState {
                injected: self.msis.load(Ordering::Relaxed),
                eois: self.eois.load(Ordering::Relaxed),
                errors: self.errors.count(),
                storm_reports,
                storm_pins,
                eoi_pokes: self.pokes.load(Ordering::Relaxed),
                ..CountersState::default()
            },
            ..VmPart::default()
        })
    }

    fn restore_vm(&self, state: &ChipState) -> Result<(), Error> {
        let IoapicSnapshot::Ours(ioapic) = &state.ioapic else {
            return Err(Error::Config(
                "split mode restores our IOAPIC model's state only".to_string(),
            ));
        };
        let c = state.counters;
        self.ioapic.restore(ioapic, c.storm_reports, c.storm_pins)?;
        self.msis.store(c.injected, Ordering::Relaxed);
        self.eois.store(c.eois, Ordering::Relaxed);
        self.errors.set_count(c.errors);
        self.pokes.store(c.eoi_pokes, Ordering::Relaxed);
        let mut hosted = self.ioapic.lock();
        // KVM's routes mirror the restored entries before any delivery.
        hosted.mode.routed = None;
        self.refresh_routes(&mut hosted);
        if hosted.mode.routed.is_none() {
            return Err(Error::Config(
                "KVM_SET_GSI_ROUTING refused the restored entries".to_string(),
            ));
        }
        // A pin in service at the save is watched as if just sent.
        let Hosted { ioapic, mode } = &mut *hosted;
        let now = Instant::now();
        let mut any = false;
        for (pin, entry) in ioapic.entries() {
            if entry.remote_irr()
                && let Some(at) = mode.sent_at.get_mut(usize::from(pin))
            {
                *at = Some(now);
                any = true;
            }
        }
        if any {
            self.watch_eois(mode, EOI_POKE);
        }
        Ok(())
    }

    fn on_timer(&self, _index: usize) {
        self.eoi_watch_expired();
    }
}

/// The per-vCPU part: `KVM_EXIT_IOAPIC_EOI`, and the EOI watch's pokes.
struct SplitVcpu {
    chip: Arc<SplitChip>,
    index: usize,
}

impl VcpuBackend for SplitVcpu {
    fn save(&mut self, vcpu: &VcpuFd) -> Result<VcpuChipState, Error> {
        crate::kvm_lapic::save(vcpu)
    }

    fn restore(&mut self, vcpu: &VcpuFd, state: &VcpuChipState) -> Result<(), Error> {
        crate::kvm_lapic::restore(vcpu, state)
    }

    fn before_run(&mut self, vcpu: &mut VcpuFd, paused: bool) -> Result<(), Error> {
        if paused {
            // A poke waits for the resumed run: the snapshot keeps KVM's
            // MP state as the guest left it.
            return Ok(());
        }
        let poked = self
            .chip
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
            self.chip.pokes.fetch_add(1, Ordering::Relaxed);
            let vcpu = self.index;
            self.chip.tracer.emit(|| TraceEvent::EoiPoke { vcpu });
        }
        Ok(())
    }

    fn on_exit(&mut self, exit: ChipExit<'_>) -> ExitAction {
        match exit {
            ChipExit::IoapicEoi(vector) => {
                self.chip.eois.fetch_add(1, Ordering::Relaxed);
                let vcpu = self.index;
                self.chip.tracer.emit(|| TraceEvent::Eoi {
                    vcpu,
                    vector: Some(vector),
                });
                self.chip.ioapic.eoi(&*self.chip, vector);
                ExitAction::Resume
            }
            _ => ExitAction::Unexpected,
        }
    }
}

#[cfg(test)]
mod tests {
    use irqchip::apic_bus::{DeliveryMode, DestinationMode};
    use irqchip::ioapic::{IoapicConfig, RedirectionEntry};
    use kvm_bindings::kvm_irq_routing_entry;

    use super::*;

    fn msi_of(e: &kvm_irq_routing_entry) -> (u32, u32, u32) {
        // SAFETY: the test built the entry as an MSI route.
        let m = unsafe { e.u.msi };
        (m.address_lo, m.address_hi, m.data)
    }

    #[test]
    fn routing_table_has_one_msi_route_per_pin_on_its_gsi() {
        let ioapic = Ioapic::new(IoapicConfig::default());

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
        let mut ioapic = Ioapic::new(IoapicConfig::default());
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
        let mut ioapic = Ioapic::new(IoapicConfig::default());
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
        let mut ioapic = Ioapic::new(IoapicConfig::default());
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
    fn kvm_msi_for_physical_fixed_edge_message() {
        let message = Message::fixed_physical(3, 0x51);

        let msi = kvm_msi_for(&message).unwrap();

        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_3000, 0, 0x4051)
        );
    }

    /// Destination bits 8..14 (extended destination ID) reach KVM in the
    /// high address dword, its x2APIC route format.
    #[test]
    fn kvm_msi_for_a_destination_above_8_bits_uses_the_high_dword() {
        let message = Message {
            destination: 0x1ab,
            destination_mode: DestinationMode::Physical,
            ..Message::fixed_physical(0, 0x51)
        };

        let msi = kvm_msi_for(&message).unwrap();

        assert_eq!((msi.address_lo, msi.address_hi), (0xfee_ab000, 0x100));
    }

    /// An entry's extended destination (bits 49..55) becomes the route's
    /// high destination bits.
    #[test]
    fn routing_table_carries_the_extended_destination_id() {
        let mut ioapic = Ioapic::new(IoapicConfig {
            ext_dest_id: true,
            ..IoapicConfig::default()
        });
        let entry = RedirectionEntry::new()
            .with_vector(0x41)
            .with_destination_id(0x0234, true)
            .unwrap();
        ioapic.write_rte(7, entry).unwrap();

        let (lo, hi, _) = msi_of(&routing_table(&ioapic).unwrap().as_slice()[7]);

        assert_eq!((lo, hi), (0xfee3_4000, 0x200));
    }
}
