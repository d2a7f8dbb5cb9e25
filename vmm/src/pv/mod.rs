//! The paravirtual IoConnectInterrupt interface: the doorbell device, the
//! PV connect service (`irqconnect`) it drives, and how the service's
//! routes reach the interrupt controller.
//!
//! - [`config`]: the service built at VM start from the platform facts and
//!   the device table (`--devices PATH` or irqconnect's default).
//! - [`doorbell`]: the 4-byte port at `PV_DOORBELL_PORT`. A 32-bit write
//!   hands the guest-physical address of a request block to
//!   [`PvConnect::doorbell`] on the writing vCPU's thread.
//! - [`ram`]: [`irqconnect::GuestRam`] over vm-memory's checked accesses.
//! - [`route`]: a service route as the redirection entry the chip
//!   programs.
//! - [`counters`]: what the statistics line shows.
//!
//! Route application: every route update a request returns is programmed
//! with `Irqchip::program_pin` (through [`PinProgrammer`]) before the
//! doorbell write returns, so before the vCPU resumes; the service lock is
//! held meanwhile, so two vCPUs' requests cannot reorder their pin
//! programming. A failed update still leaves a correct answer; it is
//! counted and warned about at a rate limit. Message updates (CONNECT_EX,
//! DISCONNECT_EX of message-signaled interrupts) are programmed the same
//! way into the message-signaled test devices the service owns
//! ([`PvConnect::msidevs`]), as the PnP manager writes a PCI device's MSI
//! capability; a device's sends then go straight to the chip's
//! `signal_msi`.
//!
//! Storm guard ([`PvConnect::mask_storming_pin`]): the split and user
//! modes' IOAPIC model reports a level pin re-delivered past the storm
//! threshold after EOI; the chip hands the pin, with its locks released, to
//! the sink `machine` installed ([`PvConnect::storm_sink`] through
//! `Irqchip::set_storm_sink`),
//! which masks it and tells the service. Kernel mode cannot see EOIs, so
//! there is no storm guard there.

pub(crate) mod config;
pub(crate) mod counters;
pub(crate) mod doorbell;
pub(crate) mod ram;
pub(crate) mod route;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use irqchip::ioapic::RedirectionEntry;
use irqchip_kvm::ratelimit::RateLimiter;
use irqchip_kvm::{IrqError, Irqchip, StormSink};
use irqconnect::{DeviceTable, MessageUpdate, Outcome, PinRoute, RouteUpdate, Service};
use vm_memory::GuestMemoryMmap;

use crate::devices::msidev::{MsiDevice, MsiSink, MsidevSpec, SharedMsidev};
use crate::devices::testdev::TestdevSpec;
use counters::{PvCounters, PvCountersState, PvStats};

/// The PV part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PvState {
    /// The service's registry and storm marks.
    pub(crate) service: irqconnect::ServiceState,
    /// The device table the service ran on, as `--devices` JSON (the
    /// table's configuration type is made for JSON: it skips absent
    /// optional fields, which a non-self-describing format cannot).
    pub(crate) table: String,
    /// Its object quota.
    pub(crate) object_quota: u32,
    /// Its counters.
    pub(crate) counters: PvCountersState,
    /// Pins whose storm masking was logged.
    pub(crate) storm_logged: u32,
    /// The message-signaled test devices.
    pub(crate) msidevs: Vec<crate::devices::msidev::MsidevState>,
}
use ram::VmRam;

/// Where the service's routes go: the interrupt controller's host pin
/// programming (a trait so the service is tested against a recording chip).
pub(crate) trait PinProgrammer: Send + Sync {
    /// Programs `pin` with `entry` (see `Irqchip::program_pin`).
    fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), IrqError>;
}

impl PinProgrammer for Irqchip {
    fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), IrqError> {
        Irqchip::program_pin(self, pin, entry)
    }
}

/// The PV connect service of one VM, with what it needs to answer and
/// route: guest RAM and the interrupt controller.
pub(crate) struct PvConnect {
    service: Mutex<Service>,
    mem: GuestMemoryMmap,
    chip: Box<dyn PinProgrammer>,
    /// The message-signaled test devices, by index.
    msidevs: Vec<SharedMsidev>,
    counters: PvCounters,
    /// Pins whose storm masking was logged (bit `p` = pin `p`).
    storm_logged: AtomicU32,
    warn_unreadable: RateLimiter,
    warn_unwritable: RateLimiter,
    warn_route: RateLimiter,
    warn_access: RateLimiter,
}

impl PvConnect {
    /// The service `service`, answering in `mem`, routing pins through
    /// `chip` and sending its message-signaled test devices' messages
    /// through `msi`.
    pub(crate) fn new(
        service: Service,
        mem: GuestMemoryMmap,
        chip: impl PinProgrammer + 'static,
        msi: Arc<dyn MsiSink>,
    ) -> Arc<Self> {
        let msidevs = msidev_specs(service.devices())
            .into_iter()
            .map(|spec| MsiDevice::shared(spec, Arc::clone(&msi)))
            .collect();
        Arc::new(Self {
            service: Mutex::new(service),
            mem,
            chip: Box::new(chip),
            msidevs,
            counters: PvCounters::default(),
            storm_logged: AtomicU32::new(0),
            warn_unreadable: RateLimiter::new(),
            warn_unwritable: RateLimiter::new(),
            warn_route: RateLimiter::new(),
            warn_access: RateLimiter::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Service> {
        self.service.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The test devices of the service's device table.
    pub(crate) fn testdev_specs(&self) -> Vec<TestdevSpec> {
        testdev_specs(self.lock().devices())
    }

    /// The message-signaled test devices, for the port bus.
    pub(crate) fn msidevs(&self) -> &[SharedMsidev] {
        &self.msidevs
    }

    /// A 32-bit doorbell write of `value` (the block's guest-physical
    /// address): answers the request and programs the routes it changed,
    /// all before returning.
    pub(crate) fn doorbell(&self, value: u32) -> Outcome {
        let mut service = self.lock();
        let outcome = service.handle_doorbell(&mut VmRam::new(&self.mem), value);
        self.counters.outcome(&outcome);
        match &outcome {
            Outcome::Answered(answer) => {
                for update in &answer.routes {
                    self.apply(&service, update);
                }
                for update in &answer.messages {
                    self.program_message(update);
                }
            }
            Outcome::Unreadable { gpa, len } => {
                if let Some(suppressed) = self.warn_unreadable.check() {
                    log::warn!(
                        "PV doorbell: request block {gpa:#x}+{len:#x} is not guest RAM; not answered{}",
                        suppressed_note(suppressed)
                    );
                }
            }
            Outcome::Unwritable { gpa } => {
                if let Some(suppressed) = self.warn_unwritable.check() {
                    log::warn!(
                        "PV doorbell: the answer to the block at {gpa:#x} could not be written; request undone{}",
                        suppressed_note(suppressed)
                    );
                }
            }
        }
        outcome
    }

    /// Programs one route update; counts it and reports a failure.
    fn apply(&self, service: &Service, update: &RouteUpdate) {
        let entry = route::entry_for(&update.route, service.platform());
        match self.chip.program_pin(update.pin, entry) {
            Ok(()) => self.counters.route_applied(),
            Err(e) => {
                self.counters.route_failed();
                self.report_route_failure(update.pin, &e);
            }
        }
    }

    /// Programs one message of a message-signaled test device.
    fn program_message(&self, update: &MessageUpdate) {
        let Some(dev) = self.msidevs.get(usize::from(update.test_device)) else {
            return;
        };
        dev.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .program(update.message, update.route);
        self.counters.message_programmed();
    }

    fn report_route_failure(&self, pin: u8, e: &IrqError) {
        if let Some(suppressed) = self.warn_route.check() {
            log::warn!(
                "PV route for pin {pin} not applied: {e}{}",
                suppressed_note(suppressed)
            );
        }
    }

    /// The storm-guard hook: the IOAPIC model (split and user modes)
    /// reported level pin `pin` past the storm threshold. Masks the pin
    /// through [`PinProgrammer::program_pin`] (the service's route,
    /// masked), records it in the service (QUERY_ROUTE reads it masked,
    /// QUERY_PLATFORM counts it; the next CONNECT on the vector re-arms the
    /// pin), logs once per pin, counts each masking. A report for a pin
    /// already held masked is ignored.
    ///
    /// Call it with no interrupt-controller lock held: it takes the service
    /// lock and then, through `program_pin`, the controller's, the same
    /// order as the doorbell path.
    pub(crate) fn mask_storming_pin(&self, pin: u8) {
        let mut service = self.lock();
        let bit = 1u32.checked_shl(u32::from(pin)).unwrap_or(0);
        let Some(route) = service.route(pin) else {
            return;
        };
        if service.storm_bits() & bit != 0 {
            return;
        }
        if service.devices().resource_on_pin(pin).is_none() {
            // The guest programs this pin itself; a host program would
            // overwrite its entry. The model's own report stands.
            if self.storm_logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                log::warn!(
                    "storm guard: pin {pin} is not a PV device pin; left as the guest programmed it"
                );
            }
            return;
        }
        let masked = PinRoute {
            masked: true,
            ..route
        };
        self.apply(&service, &RouteUpdate { pin, route: masked });
        if service.report_storm_masked(u32::from(pin)).is_err() {
            return;
        }
        self.counters.storm_mask();
        if self.storm_logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            log::warn!(
                "storm guard: pin {pin} (vector {:#x}) re-delivered more than {} times after EOI with nobody claiming it; masked until its vector's connections change",
                route.vector,
                service.platform().storm_threshold()
            );
        }
    }

    /// [`PvConnect::mask_storming_pin`] as a callback for the interrupt
    /// controller. It holds the service weakly: the service holds the
    /// controller, so a strong reference would be a cycle.
    pub(crate) fn storm_sink(self: &Arc<Self>) -> StormSink {
        let pv = Arc::downgrade(self);
        Arc::new(move |pin| {
            if let Some(pv) = pv.upgrade() {
                pv.mask_storming_pin(pin);
            }
        })
    }

    /// A doorbell access of another width or offset: ignored, counted,
    /// warned at a rate limit.
    pub(crate) fn bad_access(&self, what: &str, offset: u64, len: usize) {
        self.counters.bad_access();
        if let Some(suppressed) = self.warn_access.check() {
            log::warn!(
                "PV doorbell: {len}-byte {what} at offset {offset:#x} ignored (the doorbell is one 32-bit register){}",
                suppressed_note(suppressed)
            );
        }
    }

    /// The service's snapshot state: its registry and storm marks, the
    /// device table it runs on, its counters, and its message-signaled
    /// test devices.
    pub(crate) fn save(&self) -> PvState {
        let service = self.lock();
        PvState {
            service: service.snapshot(),
            table: serde_json::to_string(&service.devices().to_config()).unwrap_or_default(),
            object_quota: service.query_platform().object_quota,
            counters: self.counters.save(),
            storm_logged: self.storm_logged.load(Ordering::Relaxed),
            msidevs: self
                .msidevs
                .iter()
                .map(|d| d.lock().unwrap_or_else(PoisonError::into_inner).save())
                .collect(),
        }
    }

    /// Takes the counters, log marks and message-device states of a
    /// snapshot (the service itself is rebuilt from it before: see
    /// `pv::config::restore_service`).
    pub(crate) fn restore(&self, state: &PvState) -> Result<(), String> {
        if state.msidevs.len() != self.msidevs.len() {
            return Err(format!(
                "{} message devices saved, the device table has {}",
                state.msidevs.len(),
                self.msidevs.len()
            ));
        }
        for (dev, saved) in self.msidevs.iter().zip(&state.msidevs) {
            dev.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .restore(saved)?;
        }
        self.counters.restore(&state.counters);
        self.storm_logged
            .store(state.storm_logged, Ordering::Relaxed);
        Ok(())
    }

    /// The counters now, with the message-signaled test devices'.
    pub(crate) fn stats(&self) -> PvStats {
        let mut stats = self.counters.snapshot();
        for dev in &self.msidevs {
            let d = dev.lock().unwrap_or_else(PoisonError::into_inner);
            stats.msi_sent += d.sent_total();
            stats.msi_dropped += u64::from(d.dropped());
            stats.msi_errors += d.send_errors();
            stats.msidev_bad_accesses += d.bad_accesses();
        }
        stats
    }
}

fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar messages suppressed)")
    }
}

/// Test device `i` of `table`: the line of its first resource, level for a
/// level-sensitive resource, edge for a latched one. Devices past the
/// test-device window do not exist.
pub(crate) fn testdev_specs(table: &DeviceTable) -> Vec<TestdevSpec> {
    table
        .devices()
        .iter()
        .filter_map(|d| {
            let index = u8::try_from(d.id()).ok()?;
            let first = d.resources().first()?;
            (u16::from(index) < irqconnect_abi::layout::TESTDEV_MAX_DEVICES).then_some(
                TestdevSpec {
                    index,
                    pin: first.pin,
                    trigger: first.mode.trigger_mode(),
                },
            )
        })
        .collect()
}

/// The message-signaled test devices of `table`: one per device whose
/// messages have a test device (`MessageResource::test_device`), in index
/// order.
pub(crate) fn msidev_specs(table: &DeviceTable) -> Vec<MsidevSpec> {
    let mut specs: Vec<MsidevSpec> = table
        .devices()
        .iter()
        .filter_map(|d| {
            let m = d.messages()?;
            Some(MsidevSpec {
                index: m.test_device?,
                device_id: u8::try_from(d.id()).ok()?,
                kind: m.kind,
                count: m.count,
            })
        })
        .collect();
    specs.sort_by_key(|s| s.index);
    specs
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A recording interrupt controller and a PV service over 1 MiB of RAM.

    use std::sync::{Arc, Mutex};

    use irqchip::ioapic::RedirectionEntry;
    use irqchip_kvm::{IrqError, Mode};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::config::{build_service, platform_facts};
    use super::{PinProgrammer, PvConnect};

    /// Guest RAM of the tests' services.
    pub(crate) const RAM: u64 = 0x10_0000;

    /// Records every `program_pin`; `failing` refuses each one as a failed
    /// ioctl would.
    pub(crate) struct RecordingChip {
        failing: bool,
        programs: Mutex<Vec<(u8, RedirectionEntry)>>,
    }

    impl RecordingChip {
        /// Programs every pin.
        pub(crate) fn working() -> Arc<Self> {
            Arc::new(Self {
                failing: false,
                programs: Mutex::new(Vec::new()),
            })
        }

        /// Refuses to program pins.
        pub(crate) fn failing() -> Arc<Self> {
            Arc::new(Self {
                failing: true,
                programs: Mutex::new(Vec::new()),
            })
        }

        /// Every pin programmed so far, in order.
        pub(crate) fn programs(&self) -> Vec<(u8, RedirectionEntry)> {
            self.programs.lock().unwrap().clone()
        }
    }

    impl PinProgrammer for Arc<RecordingChip> {
        fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), IrqError> {
            if self.failing {
                return Err(IrqError::NoSuchGsi(u32::from(pin)));
            }
            self.programs.lock().unwrap().push((pin, entry));
            Ok(())
        }
    }

    /// A 4-CPU kernel-mode service with the default table over [`RAM`]
    /// bytes, routing through `chip`.
    pub(crate) fn pv_with(
        chip: Arc<RecordingChip>,
    ) -> (Arc<PvConnect>, Arc<RecordingChip>, GuestMemoryMmap) {
        let facts = platform_facts(4, Mode::Kernel, false, irqchip_kvm::DEFAULT_STORM_THRESHOLD);
        let service = build_service(facts, None).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let msi: Arc<dyn crate::devices::msidev::MsiSink> = Arc::new(NoMsi);
        (
            PvConnect::new(service, mem.clone(), Arc::clone(&chip), msi),
            chip,
            mem,
        )
    }

    /// Refuses every message (the PV tests only look at programming).
    struct NoMsi;

    impl crate::devices::msidev::MsiSink for NoMsi {
        fn signal_msi(&self, _address: u64, _data: u32) -> Result<(), IrqError> {
            Err(IrqError::NoSuchGsi(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{RAM, RecordingChip, pv_with};
    use super::*;
    use irqchip::apic_bus::{DeliveryMode, TriggerMode};
    use irqconnect_abi::ntstatus::{STATUS_INVALID_HANDLE, STATUS_SUCCESS};
    use irqconnect_abi::pv::{
        Connect, Disconnect, QueryPlatform, QueryRoute, RequestHeader, STATUS_NO_ANSWER,
        interrupt_mode, opcode,
    };
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::{FromBytes, FromZeros, IntoBytes};

    const BLOCK: u64 = 0x2000;

    fn connect_block(device: u32, vector: u32, mode: u8, share: u8, mask: u64) -> Connect {
        let mut c = Connect::new_zeroed();
        c.header = RequestHeader::new::<Connect>(opcode::CONNECT);
        c.device_id = device;
        c.vector = vector;
        c.irql = (vector >> 4) as u8;
        c.synchronize_irql = (vector >> 4) as u8;
        c.interrupt_mode = mode;
        c.share_vector = share;
        c.processor_enable_mask = mask;
        c.service_routine = 0x10_0000;
        c.spin_lock = 0x3000;
        c
    }

    fn ring<T: IntoBytes + FromBytes + zerocopy::Immutable>(
        pv: &PvConnect,
        mem: &GuestMemoryMmap,
        block: &T,
    ) -> T {
        mem.write_slice(block.as_bytes(), GuestAddress(BLOCK))
            .unwrap();
        let _ = pv.doorbell(BLOCK as u32);
        let mut out = T::new_zeroed();
        mem.read_slice(out.as_mut_bytes(), GuestAddress(BLOCK))
            .unwrap();
        out
    }

    fn connect_device0(pv: &PvConnect, mem: &GuestMemoryMmap, mask: u64) -> Connect {
        let c = ring(
            pv,
            mem,
            &connect_block(0, 0x60, interrupt_mode::LEVEL_SENSITIVE, 0, mask),
        );
        assert_eq!(c.header.status, STATUS_SUCCESS);
        c
    }

    #[test]
    fn doorbell_connect_programs_pin_before_returning() {
        let (pv, chip, mem) = pv_with(RecordingChip::working());
        let c = connect_device0(&pv, &mem, 0b0101);
        assert_ne!(c.handle, 0);
        assert_eq!(c.effective_mask, 0b0101);
        assert_eq!(
            chip.programs(),
            vec![(
                16,
                RedirectionEntry::new()
                    .with_vector(0x60)
                    .with_level_triggered(true)
                    .with_logical(true)
                    .with_destination(0b0101)
                    .with_delivery_mode(DeliveryMode::LowestPriority)
                    .with_masked(false)
            )]
        );
        let s = pv.stats();
        assert_eq!(
            (s.status("ok"), s.routes_applied, s.route_failures),
            (1, 1, 0)
        );
    }

    #[test]
    fn doorbell_disconnect_masks_pin_and_stale_handle_refused() {
        let (pv, chip, mem) = pv_with(RecordingChip::working());
        let c = connect_device0(&pv, &mem, 0b1);
        let mut d = Disconnect::new_zeroed();
        d.header = RequestHeader::new::<Disconnect>(opcode::DISCONNECT);
        d.handle = c.handle;
        assert_eq!(ring(&pv, &mem, &d).header.status, STATUS_SUCCESS);
        let last = chip.programs().last().copied().unwrap();
        assert_eq!(last.0, 16);
        assert!(last.1.masked());
        d.header.status = STATUS_NO_ANSWER;
        assert_eq!(ring(&pv, &mem, &d).header.status, STATUS_INVALID_HANDLE);
        assert_eq!(chip.programs().len(), 2);
        assert_eq!(pv.stats().status("invalid_handle"), 1);
    }

    #[test]
    fn doorbell_route_failure_still_answers_and_is_counted() {
        let (pv, chip, mem) = pv_with(RecordingChip::failing());
        let c = connect_device0(&pv, &mem, 0b1);
        assert_ne!(c.handle, 0);
        let e = ring(
            &pv,
            &mem,
            &connect_block(1, 0x61, interrupt_mode::LATCHED, 0, 0b10),
        );
        assert_eq!(e.header.status, STATUS_SUCCESS);
        assert!(chip.programs().is_empty());
        let s = pv.stats();
        assert_eq!((s.routes_applied, s.route_failures), (0, 2));
        // The service still reports the route it decided.
        let mut q = QueryRoute::new_zeroed();
        q.header = RequestHeader::new::<QueryRoute>(opcode::QUERY_ROUTE);
        q.pin = 16;
        let r = ring(&pv, &mem, &q);
        assert_eq!((r.masked, r.vector, r.destination_mask), (0, 0x60, 1));
    }

    #[test]
    fn doorbell_unreadable_blocks_counted_not_answered() {
        let (pv, chip, _mem) = pv_with(RecordingChip::working());
        for gpa in [RAM as u32, RAM as u32 - 8, 0xfec0_0000, u32::MAX] {
            assert!(
                matches!(pv.doorbell(gpa), Outcome::Unreadable { .. }),
                "{gpa:#x}"
            );
        }
        let s = pv.stats();
        assert_eq!((s.unreadable, s.answered()), (4, 0));
        assert!(chip.programs().is_empty());
    }

    #[test]
    fn storm_hook_masks_pin_records_it_and_ignores_repeats() {
        let (pv, chip, mem) = pv_with(RecordingChip::working());
        connect_device0(&pv, &mem, 0b1);
        pv.mask_storming_pin(16);
        pv.mask_storming_pin(16);
        let programs = chip.programs();
        assert_eq!(programs.len(), 2);
        assert_eq!(programs[1].0, 16);
        assert!(programs[1].1.masked());
        assert_eq!(programs[1].1.vector(), 0x60);
        assert_eq!(pv.stats().storm_masks, 1);
        let mut q = QueryPlatform::new_zeroed();
        q.header = RequestHeader::new::<QueryPlatform>(opcode::QUERY_PLATFORM);
        let p = ring(&pv, &mem, &q);
        assert_eq!(p.storm_masked_pins, 1);
        // A new CONNECT on the vector re-arms the pin.
        let again = ring(
            &pv,
            &mem,
            &connect_block(0, 0x60, interrupt_mode::LEVEL_SENSITIVE, 0, 0b10),
        );
        assert_eq!(again.header.status, STATUS_SUCCESS);
        let last = chip.programs().last().copied().unwrap();
        assert_eq!((last.0, last.1.masked()), (16, false));
        // Pins past the IOAPIC, and pins no PV device uses, are left alone.
        pv.mask_storming_pin(40);
        pv.mask_storming_pin(5);
        assert_eq!(pv.stats().storm_masks, 1);
        assert_eq!(chip.programs().len(), 3);
    }

    #[test]
    fn storm_sink_masks_through_a_weak_reference() {
        let (pv, chip, mem) = pv_with(RecordingChip::working());
        connect_device0(&pv, &mem, 0b1);
        let sink = pv.storm_sink();
        sink(16);
        assert_eq!(pv.stats().storm_masks, 1);
        assert!(chip.programs().last().unwrap().1.masked());
        drop(pv);
        sink(16); // the service is gone: nothing happens, no panic
    }

    #[test]
    fn testdev_specs_follow_the_default_table() {
        let (pv, _chip, _mem) = pv_with(RecordingChip::working());
        let specs = pv.testdev_specs();
        let got: Vec<_> = specs.iter().map(|s| (s.index, s.pin, s.trigger)).collect();
        assert_eq!(
            got,
            vec![
                (0, 16, TriggerMode::Level),
                (1, 17, TriggerMode::Edge),
                (2, 18, TriggerMode::Level),
                (3, 18, TriggerMode::Level),
                (4, 19, TriggerMode::Edge),
                (5, 20, TriggerMode::Edge),
                (6, 21, TriggerMode::Level),
                (7, 22, TriggerMode::Level),
            ]
        );
    }

    #[test]
    fn doorbell_connect_ex_programs_messages_and_disconnect_ex_clears_them() {
        use irqconnect_abi::pv::{ConnectEx, DisconnectEx, connect_version};
        let (pv, chip, mem) = pv_with(RecordingChip::working());
        let specs: Vec<_> = pv
            .msidevs()
            .iter()
            .map(|d| {
                let s = d.lock().unwrap().spec();
                (s.index, s.device_id, s.count)
            })
            .collect();
        assert_eq!(specs, [(0, 8, 1), (1, 9, 4), (2, 10, 8)]);
        let mut cx = ConnectEx::request(connect_version::MESSAGE_BASED, 10, 0x10_0000);
        cx.message_table = 0x4000;
        cx.message_table_length = 0x400;
        let done = ring(&pv, &mem, &cx);
        assert_eq!((done.header.status, done.count), (STATUS_SUCCESS, 8));
        let dev = &pv.msidevs()[2];
        let programmed: Vec<_> = (0..8)
            .map(|k| {
                dev.lock()
                    .unwrap()
                    .programmed(k)
                    .map(|r| (r.data & 0xff, r.targets))
            })
            .collect();
        assert_eq!(
            programmed,
            (0..8u32)
                .map(|k| Some((0x48 + k, 1u64 << (k % 4))))
                .collect::<Vec<_>>()
        );
        // No pin changes for messages.
        assert!(chip.programs().is_empty());
        let mut dx = DisconnectEx::new_zeroed();
        dx.header = RequestHeader::new::<DisconnectEx>(opcode::DISCONNECT_EX);
        dx.version = connect_version::MESSAGE_BASED;
        dx.handle = done.handle;
        assert_eq!(ring(&pv, &mem, &dx).header.status, STATUS_SUCCESS);
        assert!((0..8).all(|k| dev.lock().unwrap().programmed(k).is_none()));
        assert_eq!(pv.stats().messages_programmed, 16);
    }

    #[test]
    fn testdev_specs_short_table_has_fewer_devices() {
        let platform = irqconnect::Platform::uniform(2).unwrap();
        let table = DeviceTable::from_json(
            r#"{"devices":[{"id":0,"resources":[{"pin":5,"vector":81,"mode":"latched","share":"exclusive"}]}]}"#,
            &platform,
        )
        .unwrap();
        let specs = testdev_specs(&table);
        assert_eq!(specs.len(), 1);
        assert_eq!((specs[0].pin, specs[0].trigger), (5, TriggerMode::Edge));
    }
}
