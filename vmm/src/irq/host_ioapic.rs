//! What the split and user modes share about hosting our IOAPIC model
//! (`irqchip::ioapic::Ioapic`): its MMIO window on the bus, the translation
//! of a host [`PinProgram`] into a redirection entry, the storm guard's
//! bookkeeping, and the non-blocking timerfds both use.
//!
//! The model itself lives behind each mode's own mutex; this module only
//! holds the pieces that do not depend on where the LAPICs are.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use irqchip::apic_bus::DeliveryMode;
use irqchip::ioapic::{Ioapic, IoapicConfig, IoapicCounters, PinMask, RedirectionEntry};
use irqconnect_abi::layout::{IOAPIC_MMIO_BASE, IOAPIC_MMIO_SIZE};
use vmm_sys_util::timerfd::TimerFd;

use super::{
    IrqError, MmioWindow, ModelStats, PinDelivery, PinDestMode, PinProgram, PinTrigger, StormSink,
};
use crate::bus::{Access, BusDevice};
use crate::ratelimit::RateLimiter;

/// A mode that emulates the IOAPIC's MMIO registers (split and user).
pub(crate) trait IoapicMmio: Send + Sync + 'static {
    /// A guest read at `offset` from the IOAPIC base.
    fn ioapic_read(&self, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` from the IOAPIC base; its effects (route
    /// updates, deliveries) happen before it returns.
    fn ioapic_write(&self, offset: u64, data: &[u8]);
}

/// The bus device of the IOAPIC window: forwards to the mode, which takes
/// its own lock.
struct IoapicWindow<T: IoapicMmio>(Arc<T>);

impl<T: IoapicMmio> BusDevice for IoapicWindow<T> {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        self.0.ioapic_read(offset, data);
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        self.0.ioapic_write(offset, data);
    }
}

/// The IOAPIC's MMIO window at 0xFEC00000 for the bus.
pub(crate) fn window<T: IoapicMmio>(chip: Arc<T>) -> MmioWindow {
    MmioWindow {
        base: IOAPIC_MMIO_BASE,
        len: IOAPIC_MMIO_SIZE,
        name: "ioapic",
        device: Arc::new(Mutex::new(IoapicWindow(chip))),
    }
}

/// The redirection entry a host [`PinProgram`] asks for: active high, no
/// extended destination; the model keeps its read-only bits (Remote IRR,
/// delivery status) when it is written with `Ioapic::write_rte`.
pub(crate) fn pin_entry(route: &PinProgram) -> Result<RedirectionEntry, IrqError> {
    let destination = u8::try_from(route.destination)
        .map_err(|_| IrqError::DestinationTooWide(route.destination))?;
    Ok(RedirectionEntry::new()
        .with_vector(route.vector)
        .with_delivery_mode(match route.delivery {
            PinDelivery::Fixed => DeliveryMode::Fixed,
            PinDelivery::LowestPriority => DeliveryMode::LowestPriority,
        })
        .with_logical(route.dest_mode == PinDestMode::Logical)
        .with_level_triggered(route.trigger == PinTrigger::Level)
        .with_masked(route.masked)
        .with_destination(destination))
}

/// Consecutive re-deliveries of a still-asserted level pin after EOI past
/// which our IOAPIC reports a storm and the PV storm guard masks the pin;
/// QUERY_PLATFORM reports the same value. The model's default (10 000,
/// where QEMU and KVM start throttling) takes 5 to 12 s of emulated guest
/// time here; 1 000 takes 0.5 to 1.2 s and still sits about ten times above
/// the longest run of legitimate re-deliveries the guest suites make (a
/// level device with 90 pending causes, one acknowledged per ISR call).
pub(crate) const STORM_THRESHOLD: u32 = 1_000;

/// Our IOAPIC model as the split and user modes run it.
pub(crate) fn new_ioapic() -> Ioapic {
    Ioapic::new(IoapicConfig {
        storm_threshold: STORM_THRESHOLD,
        ..IoapicConfig::default()
    })
}

/// Level-interrupt storms the IOAPIC reported (a pin re-delivered after EOI
/// more than `storm_threshold` times in a row while asserted). The model
/// still delivers; this counts the reports, remembers which pins had one,
/// warns at a limited rate, and hands each report to the storm sink (the
/// PV service's masking policy) once the controller's locks are released.
pub(crate) struct StormWatch {
    reports: AtomicU64,
    pins: AtomicU32,
    warn: RateLimiter,
    sink: Mutex<Option<StormSink>>,
}

impl StormWatch {
    /// No storm seen yet.
    pub(crate) fn new() -> Self {
        Self {
            reports: AtomicU64::new(0),
            pins: AtomicU32::new(0),
            warn: RateLimiter::new(),
            sink: Mutex::new(None),
        }
    }

    /// Installs the callback that gets every storm report.
    pub(crate) fn set_sink(&self, sink: StormSink) {
        *self.sink.lock().unwrap_or_else(PoisonError::into_inner) = Some(sink);
    }

    /// Hands `pins` to the sink, one call per pin. Call it with no
    /// controller lock held: the sink programs pins through the controller.
    pub(crate) fn dispatch(&self, pins: PinMask) {
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

    /// Records the storm pins of one IOAPIC operation (under the
    /// controller's lock) and returns them for [`StormWatch::dispatch`].
    pub(crate) fn note(&self, pins: PinMask) -> PinMask {
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

    /// Reports so far, and the pins that had one (bit `n` for pin `n`).
    pub(crate) fn get(&self) -> (u64, u32) {
        (
            self.reports.load(Ordering::Relaxed),
            self.pins.load(Ordering::Relaxed),
        )
    }
}

/// A non-blocking timerfd (so a read after a re-arm cannot stall the event
/// loop); `what` names it in the error.
pub(crate) fn nonblocking_timerfd(what: &'static str) -> crate::error::Result<TimerFd> {
    let timer = TimerFd::new().map_err(crate::error::Error::host(what))?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor we own; no memory is
    // passed.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(timer)
    } else {
        Err(crate::error::Error::host(what)(
            std::io::Error::last_os_error(),
        ))
    }
}

/// The IOAPIC part of [`ModelStats`].
pub(crate) fn ioapic_stats(counters: &IoapicCounters, storm: &StormWatch) -> ModelStats {
    let (storm_reports, storm_pins) = storm.get();
    ModelStats {
        ioapic_bad_accesses: [
            counters.bad_mmio_reads,
            counters.bad_mmio_writes,
            counters.bad_register_reads,
            counters.bad_register_writes,
            counters.read_only_writes,
            counters.bad_pins,
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b)),
        storm_reports,
        storm_pins,
        ..ModelStats::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::irq::{PinDelivery, PinDestMode, PinTrigger};

    const LEVEL_LOGICAL: PinProgram = PinProgram {
        vector: 0x60,
        trigger: PinTrigger::Level,
        dest_mode: PinDestMode::Logical,
        destination: 0b0110,
        delivery: PinDelivery::LowestPriority,
        masked: false,
    };

    #[test]
    fn pin_entry_sets_every_programmed_field() {
        let e = pin_entry(&LEVEL_LOGICAL).unwrap();

        assert_eq!(e.vector(), 0x60);
        assert_eq!(e.delivery_mode(), DeliveryMode::LowestPriority);
        assert!(e.logical() && e.level_triggered() && !e.masked() && !e.active_low());
        assert_eq!((e.destination(), e.extended_destination()), (0b0110, 0));
    }

    #[test]
    fn pin_entry_physical_fixed_edge_masked() {
        let program = PinProgram {
            trigger: PinTrigger::Edge,
            dest_mode: PinDestMode::Physical,
            destination: 3,
            delivery: PinDelivery::Fixed,
            masked: true,
            ..LEVEL_LOGICAL
        };

        let e = pin_entry(&program).unwrap();

        assert!(!e.logical() && !e.level_triggered() && e.masked());
        assert_eq!(
            (e.delivery_mode(), e.destination()),
            (DeliveryMode::Fixed, 3)
        );
    }

    #[test]
    fn pin_entry_refuses_a_destination_wider_than_8_bits() {
        let program = PinProgram {
            destination: 0x100,
            ..LEVEL_LOGICAL
        };

        assert!(matches!(
            pin_entry(&program),
            Err(IrqError::DestinationTooWide(0x100))
        ));
    }

    #[test]
    fn storm_watch_counts_and_hands_pins_to_the_sink_only_on_dispatch() {
        let watch = StormWatch::new();
        let seen = Arc::new(AtomicU32::new(0));
        let sink_seen = Arc::clone(&seen);
        watch.set_sink(Arc::new(move |pin| {
            sink_seen.fetch_or(1 << pin, Ordering::Relaxed);
        }));
        let mut ioapic = irqchip::ioapic::Ioapic::new(irqchip::ioapic::IoapicConfig {
            storm_threshold: 1,
            ..Default::default()
        });
        let level = RedirectionEntry::new()
            .with_vector(0x44)
            .with_level_triggered(true)
            .with_masked(false);
        ioapic.write_rte(7, level).unwrap();
        let _ = ioapic.set_line(7, true);
        let mut pins = PinMask::new();
        for _ in 0..3 {
            pins = ioapic.eoi(0x44).storm_pins();
            if !pins.is_empty() {
                break;
            }
        }

        let noted = watch.note(pins);

        assert_eq!(noted, pins);
        assert!(noted.contains(7));
        assert_eq!(
            seen.load(Ordering::Relaxed),
            0,
            "no sink call under the lock"
        );
        watch.dispatch(noted);
        assert_eq!(seen.load(Ordering::Relaxed), 1 << 7);
        assert_eq!(watch.get(), (1, 1 << 7));
    }

    #[test]
    fn storm_watch_without_sink_or_pins_does_nothing() {
        let watch = StormWatch::new();

        watch.dispatch(watch.note(PinMask::new()));

        assert_eq!(watch.get(), (0, 0));
    }

    #[test]
    fn ioapic_stats_sum_the_ignored_guest_accesses() {
        let counters = IoapicCounters {
            bad_mmio_reads: 1,
            bad_register_writes: 2,
            read_only_writes: u64::MAX,
            ..IoapicCounters::default()
        };

        let stats = ioapic_stats(&counters, &StormWatch::new());

        assert_eq!(stats.ioapic_bad_accesses, u64::MAX, "saturates");
        assert_eq!((stats.storm_reports, stats.storm_pins), (0, 0));
    }
}
