//! Our IOAPIC model (`irqchip::ioapic::Ioapic`) as the split and user modes
//! host it: the one place for what they share.
//!
//! [`IoapicHost`] holds the model behind one mutex, next to the state the
//! mode keeps with it (split: the GSI routes KVM holds; user: nothing), and
//! does every IOAPIC operation the same way in both modes:
//!
//! 1. check the pin, take the lock, run the model;
//! 2. still under the lock, hand what the model sent to the mode's
//!    [`Deliver`] (split: refresh KVM's routes, then `KVM_SIGNAL_MSI`;
//!    user: our APIC bus), so a level message is delivered before the EOI
//!    that could clear its Remote IRR can be handled;
//! 3. record storm reports ([`StormWatch`]) and, once the lock is released,
//!    hand them to the storm sink, which may program pins itself.
//!
//! Failures on the interrupt path (an ioctl, a route table) are counted and
//! warned at a rate limit by an [`ErrorLog`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use irqchip::ioapic::{
    Delivery, Ioapic, IoapicConfig, IoapicCounters, IoapicOutput, NUM_PINS, PinMask,
    RedirectionEntry,
};

use crate::backend::{ModelStats, StormSink};
use crate::error::{Error, IrqError};
use crate::ratelimit::RateLimiter;
use crate::trace::{TraceEvent, Tracer};

/// How a mode delivers what our IOAPIC sends.
pub(crate) trait Deliver {
    /// What the mode keeps under the IOAPIC lock next to the model.
    type State: Send;

    /// Called under the IOAPIC lock after every model operation that sent
    /// messages or changed routes: deliver `deliveries`, in order.
    fn deliver(&self, hosted: &mut Hosted<Self::State>, deliveries: &[Delivery]);
}

/// A mode that hosts our IOAPIC: where its [`IoapicHost`] is. The mode
/// then has the whole IOAPIC side of `Backend` through [`HostedIoapic`].
pub(crate) trait HostsIoapic: Deliver + Sized {
    /// The mode's IOAPIC.
    fn ioapic_host(&self) -> &IoapicHost<Self::State>;
}

/// The IOAPIC side of a mode, object-safe (`Backend::our_ioapic`).
pub(crate) trait HostedIoapic {
    /// A line change of `gsi`.
    fn set_level(&self, gsi: u32, high: bool) -> Result<(), IrqError>;
    /// A guest read of the IOAPIC's registers.
    fn mmio_read(&self, offset: u64, data: &mut [u8]);
    /// A guest write of the IOAPIC's registers.
    fn mmio_write(&self, offset: u64, data: &[u8]);
    /// A host program of `pin`.
    fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), IrqError>;
    /// Installs the storm sink.
    fn set_storm_sink(&self, sink: StormSink);
}

impl<T: HostsIoapic> HostedIoapic for T {
    fn set_level(&self, gsi: u32, high: bool) -> Result<(), IrqError> {
        self.ioapic_host().set_level(self, gsi, high)
    }

    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.ioapic_host().mmio_read(offset, data);
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.ioapic_host().mmio_write(self, offset, data);
    }

    fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), IrqError> {
        self.ioapic_host().program_pin(self, pin, entry)
    }

    fn set_storm_sink(&self, sink: StormSink) {
        self.ioapic_host().set_storm_sink(sink);
    }
}

/// What the IOAPIC lock protects.
pub(crate) struct Hosted<S> {
    /// The model.
    pub(crate) ioapic: Ioapic,
    /// The mode's state.
    pub(crate) mode: S,
}

/// Our IOAPIC, hosted (see the module documentation).
pub(crate) struct IoapicHost<S> {
    hosted: Mutex<Hosted<S>>,
    storm: StormWatch,
    tracer: Tracer,
}

/// Every pin's Remote IRR and mask bits (bit `n` for pin `n`), for the
/// trace's [`TraceEvent::RemoteIrr`] and [`TraceEvent::Mask`].
#[derive(Clone, Copy, PartialEq, Eq)]
struct PinBits {
    remote_irr: u32,
    masked: u32,
}

impl PinBits {
    fn of(ioapic: &Ioapic) -> Self {
        let mut bits = Self {
            remote_irr: 0,
            masked: 0,
        };
        for (pin, entry) in ioapic.entries() {
            let bit = 1u32 << (u32::from(pin) & 31);
            if entry.remote_irr() {
                bits.remote_irr |= bit;
            }
            if entry.masked() {
                bits.masked |= bit;
            }
        }
        bits
    }

    /// Emits the changes from `self` to `after`.
    fn emit_changes(self, after: Self, tracer: &Tracer) {
        let changed = |a: u32, b: u32| (0..NUM_PINS as u8).filter(move |p| (a ^ b) >> p & 1 != 0);
        for pin in changed(self.remote_irr, after.remote_irr) {
            let set = after.remote_irr >> pin & 1 != 0;
            tracer.emit(|| TraceEvent::RemoteIrr { pin, set });
        }
        for pin in changed(self.masked, after.masked) {
            let masked = after.masked >> pin & 1 != 0;
            tracer.emit(|| TraceEvent::Mask { pin, masked });
        }
    }
}

impl<S: Send> IoapicHost<S> {
    /// A reset IOAPIC reporting storms past `storm_threshold`, decoding the
    /// extended destination ID (entry bits 49..55: split and user modes
    /// offer it, `Mode::msi_format`), with the mode's `state`.
    pub(crate) fn new(storm_threshold: u32, state: S, tracer: Tracer) -> Self {
        Self {
            hosted: Mutex::new(Hosted {
                ioapic: Ioapic::new(IoapicConfig {
                    storm_threshold,
                    ext_dest_id: true,
                    ..IoapicConfig::default()
                }),
                mode: state,
            }),
            storm: StormWatch::new(),
            tracer,
        }
    }

    /// The pins' bits before an operation, when tracing.
    fn bits_before(&self, ioapic: &Ioapic) -> Option<PinBits> {
        self.tracer.on().then(|| PinBits::of(ioapic))
    }

    /// Traces what changed since `before` (under the lock).
    fn trace_after(&self, before: Option<PinBits>, ioapic: &Ioapic) {
        if let Some(before) = before {
            before.emit_changes(PinBits::of(ioapic), &self.tracer);
        }
    }

    /// The lock, for a mode's own look at the model.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Hosted<S>> {
        self.hosted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `op` on the model under the lock, delivers its output, and
    /// dispatches storm reports after the lock is released.
    fn apply<D: Deliver<State = S>>(
        &self,
        deliver: &D,
        op: impl FnOnce(&mut Ioapic) -> IoapicOutput,
    ) {
        let storms = {
            let mut hosted = self.lock();
            let before = self.bits_before(&hosted.ioapic);
            let output = op(&mut hosted.ioapic);
            if !output.deliveries().is_empty() || output.routes_changed() {
                deliver.deliver(&mut hosted, output.deliveries());
            }
            self.trace_after(before, &hosted.ioapic);
            for pin in output.storm_pins().iter() {
                self.tracer.emit(|| TraceEvent::Storm { pin });
            }
            self.storm.note(output.storm_pins())
        };
        self.storm.dispatch(storms);
    }

    /// A line change of `gsi`.
    pub(crate) fn set_level<D: Deliver<State = S>>(
        &self,
        deliver: &D,
        gsi: u32,
        high: bool,
    ) -> Result<(), IrqError> {
        let pin = pin(gsi)?;
        let mut hosted = self.lock();
        let before = self.bits_before(&hosted.ioapic);
        if let Some(message) = hosted.ioapic.set_line(pin, high) {
            deliver.deliver(&mut hosted, &[Delivery { pin, message }]);
        }
        self.trace_after(before, &hosted.ioapic);
        Ok(())
    }

    /// A guest read of the IOAPIC's registers.
    pub(crate) fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.lock().ioapic.mmio_read(offset, data);
    }

    /// A guest write of the IOAPIC's registers (an EOI-register write can
    /// report a storm).
    pub(crate) fn mmio_write<D: Deliver<State = S>>(&self, deliver: &D, offset: u64, data: &[u8]) {
        self.apply(deliver, |ioapic| ioapic.mmio_write(offset, data));
    }

    /// An EOI of `vector` from a local APIC (a broadcast, or KVM's
    /// `KVM_EXIT_IOAPIC_EOI`).
    pub(crate) fn eoi<D: Deliver<State = S>>(&self, deliver: &D, vector: u8) {
        self.apply(deliver, |ioapic| ioapic.eoi(vector));
    }

    /// A host program of `pin` (see `Backend::program_pin`).
    pub(crate) fn program_pin<D: Deliver<State = S>>(
        &self,
        deliver: &D,
        pin: u8,
        entry: RedirectionEntry,
    ) -> Result<(), IrqError> {
        let mut result = Ok(());
        self.apply(deliver, |ioapic| match ioapic.write_rte(pin, entry) {
            Ok(output) => output,
            Err(_) => {
                result = Err(IrqError::NoSuchGsi(u32::from(pin)));
                IoapicOutput::new()
            }
        });
        result
    }

    /// Installs the storm sink.
    pub(crate) fn set_storm_sink(&self, sink: StormSink) {
        self.storm.set_sink(sink);
    }

    /// Our IOAPIC's state and the storm guard's counters (reports, pins),
    /// for a snapshot.
    pub(crate) fn save(&self) -> (irqchip::ioapic::IoapicState, u64, u32) {
        let state = self.lock().ioapic.save();
        (
            state,
            self.storm.reports.load(Ordering::Relaxed),
            self.storm.pins.load(Ordering::Relaxed),
        )
    }

    /// Replaces our IOAPIC's state and the storm guard's counters (a
    /// restored snapshot); nothing is delivered.
    pub(crate) fn restore(
        &self,
        state: &irqchip::ioapic::IoapicState,
        storm_reports: u64,
        storm_pins: u32,
    ) -> Result<(), Error> {
        self.lock()
            .ioapic
            .restore(state)
            .map_err(|e| Error::Config(format!("IOAPIC state: {e}")))?;
        self.storm.reports.store(storm_reports, Ordering::Relaxed);
        self.storm.pins.store(storm_pins, Ordering::Relaxed);
        Ok(())
    }

    /// The IOAPIC part of [`ModelStats`].
    pub(crate) fn model_stats(&self) -> ModelStats {
        let counters = *self.lock().ioapic.counters();
        ModelStats {
            ioapic_bad_accesses: bad_accesses(&counters),
            storm_reports: self.storm.reports.load(Ordering::Relaxed),
            storm_pins: self.storm.pins.load(Ordering::Relaxed),
            ..ModelStats::default()
        }
    }
}

/// `gsi` as a pin of our IOAPIC.
fn pin(gsi: u32) -> Result<u8, IrqError> {
    u8::try_from(gsi)
        .ok()
        .filter(|&p| usize::from(p) < NUM_PINS)
        .ok_or(IrqError::NoSuchGsi(gsi))
}

/// Guest IOAPIC accesses the model ignored, summed (saturating).
fn bad_accesses(counters: &IoapicCounters) -> u64 {
    [
        counters.bad_mmio_reads,
        counters.bad_mmio_writes,
        counters.bad_register_reads,
        counters.bad_register_writes,
        counters.read_only_writes,
        counters.bad_pins,
    ]
    .iter()
    .fold(0u64, |a, &b| a.saturating_add(b))
}

/// Level-interrupt storms the IOAPIC reported (a pin re-delivered after EOI
/// more than `storm_threshold` times in a row while asserted). The model
/// still delivers; this counts the reports, remembers which pins had one,
/// warns at a limited rate, and hands each report to the storm sink once
/// the chip's locks are released.
struct StormWatch {
    /// Reports so far.
    reports: AtomicU64,
    /// Pins that had one, bit `n` for pin `n`.
    pins: AtomicU32,
    warn: RateLimiter,
    sink: Mutex<Option<StormSink>>,
}

impl StormWatch {
    fn new() -> Self {
        Self {
            reports: AtomicU64::new(0),
            pins: AtomicU32::new(0),
            warn: RateLimiter::new(),
            sink: Mutex::new(None),
        }
    }

    fn set_sink(&self, sink: StormSink) {
        *self.sink.lock().unwrap_or_else(PoisonError::into_inner) = Some(sink);
    }

    /// Hands `pins` to the sink, one call per pin. Called with no chip lock
    /// held: the sink programs pins through the chip.
    fn dispatch(&self, pins: PinMask) {
        if pins.is_empty() {
            return;
        }
        let sink = self
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(sink) = sink {
            for pin in pins.iter() {
                sink(pin);
            }
        }
    }

    /// Records the storm pins of one IOAPIC operation (under the IOAPIC
    /// lock) and returns them for [`StormWatch::dispatch`].
    fn note(&self, pins: PinMask) -> PinMask {
        if pins.is_empty() {
            return pins;
        }
        let n = u64::from(pins.bits().count_ones());
        self.reports.fetch_add(n, Ordering::Relaxed);
        self.pins.fetch_or(pins.bits(), Ordering::Relaxed);
        if let Some(suppressed) = self.warn.check() {
            let list: Vec<String> = pins.iter().map(|p| p.to_string()).collect();
            log::warn!(
                "IOAPIC pin(s) {}: level interrupt storm (re-delivered after EOI while still asserted); {suppressed} similar warnings suppressed",
                list.join(",")
            );
        }
        pins
    }
}

/// Failures on a mode's interrupt path: counted, and warned about at a
/// rate limit with the mode's name.
pub(crate) struct ErrorLog {
    count: AtomicU64,
    warn: RateLimiter,
    what: &'static str,
}

impl ErrorLog {
    /// A log whose warnings start with `what` ("split irqchip").
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            count: AtomicU64::new(0),
            warn: RateLimiter::new(),
            what,
        }
    }

    /// Counts a failure and warns unless the rate limit holds it back.
    pub(crate) fn fail(&self, message: std::fmt::Arguments<'_>) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.warn.check() {
            log::warn!(
                "{}: {message} ({suppressed} similar warnings suppressed)",
                self.what
            );
        }
    }

    /// Failures so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sets the count (a restored snapshot).
    pub(crate) fn set_count(&self, count: u64) {
        self.count.store(count, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use irqchip::apic_bus::Message;

    use super::*;

    /// A mode that records what it is handed.
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<(u8, Message)>>,
    }

    impl Deliver for Recorder {
        type State = u32;

        fn deliver(&self, hosted: &mut Hosted<u32>, deliveries: &[Delivery]) {
            hosted.mode += 1;
            let mut sent = self.sent.lock().unwrap();
            sent.extend(deliveries.iter().map(|d| (d.pin, d.message)));
        }
    }

    fn level(vector: u8) -> RedirectionEntry {
        RedirectionEntry::new()
            .with_vector(vector)
            .with_level_triggered(true)
            .with_masked(false)
    }

    #[test]
    fn unit_set_level_delivers_under_the_lock_and_refuses_missing_pins() {
        let host = IoapicHost::new(1_000, 0u32, Tracer::default());
        let mode = Recorder::default();
        host.program_pin(&mode, 7, level(0x44)).unwrap();

        host.set_level(&mode, 7, true).unwrap();

        let sent = mode.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0].0, sent[0].1.vector), (7, 0x44));
        assert!(matches!(
            host.set_level(&mode, 24, true),
            Err(IrqError::NoSuchGsi(24))
        ));
        assert!(matches!(
            host.program_pin(&mode, 24, level(1)),
            Err(IrqError::NoSuchGsi(24))
        ));
    }

    #[test]
    fn unit_program_pin_that_changes_routes_reaches_the_mode_without_a_delivery() {
        let host = IoapicHost::new(1_000, 0u32, Tracer::default());
        let mode = Recorder::default();

        host.program_pin(&mode, 3, level(0x41).with_masked(true))
            .unwrap();

        assert_eq!(host.lock().mode, 1, "routes changed");
        assert!(mode.sent.lock().unwrap().is_empty());
    }

    #[test]
    fn unit_storms_are_counted_and_dispatched_after_the_lock() {
        let host = Arc::new(IoapicHost::new(1, 0u32, Tracer::default()));
        let mode = Recorder::default();
        let seen = Arc::new(AtomicU32::new(0));
        let (sink_seen, sink_host) = (Arc::clone(&seen), Arc::clone(&host));
        host.set_storm_sink(Arc::new(move |pin| {
            // The lock is free: a sink may program pins.
            drop(sink_host.lock());
            sink_seen.fetch_or(1 << pin, Ordering::Relaxed);
        }));
        host.program_pin(&mode, 7, level(0x44)).unwrap();
        host.set_level(&mode, 7, true).unwrap();

        for _ in 0..3 {
            host.eoi(&mode, 0x44);
        }

        assert_eq!(seen.load(Ordering::Relaxed), 1 << 7);
        let stats = host.model_stats();
        assert!(stats.storm_reports >= 1);
        assert_eq!(stats.storm_pins, 1 << 7);
    }

    #[derive(Default)]
    struct Events(Mutex<Vec<TraceEvent>>);

    impl crate::trace::TraceSink for Events {
        fn record(&self, event: TraceEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    #[test]
    fn unit_traced_remote_irr_mask_and_storm_changes() {
        let events = Arc::new(Events::default());
        let host = IoapicHost::new(1, 0u32, Tracer::new(Some(events.clone())));
        let mode = Recorder::default();

        host.program_pin(&mode, 7, level(0x44)).unwrap();
        host.set_level(&mode, 7, true).unwrap();
        for _ in 0..3 {
            host.eoi(&mode, 0x44);
        }
        host.set_level(&mode, 7, false).unwrap();
        host.eoi(&mode, 0x44);

        let seen = events.0.lock().unwrap().clone();
        assert_eq!(
            seen.first(),
            Some(&TraceEvent::Mask {
                pin: 7,
                masked: false
            })
        );
        assert_eq!(
            seen.get(1),
            Some(&TraceEvent::RemoteIrr { pin: 7, set: true })
        );
        assert!(seen.contains(&TraceEvent::Storm { pin: 7 }));
        assert_eq!(
            seen.last(),
            Some(&TraceEvent::RemoteIrr { pin: 7, set: false })
        );
    }

    #[test]
    fn unit_bad_accesses_sum_saturates() {
        let counters = IoapicCounters {
            bad_mmio_reads: 1,
            bad_register_writes: 2,
            read_only_writes: u64::MAX,
            ..IoapicCounters::default()
        };

        assert_eq!(bad_accesses(&counters), u64::MAX);
    }
}
