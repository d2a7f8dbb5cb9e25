//! An optional trace hook: what the chip does, event by event, for a VMM
//! that draws a timeline (this project's `vmm --trace` writes Chrome
//! trace-event JSON from it).
//!
//! Install a [`TraceSink`] with [`crate::IrqchipBuilder::trace`]. Without
//! one, every hook is a test of an `Option` that is `None`: no event is
//! built, no clock is read, nothing is locked. The sink timestamps the
//! events itself (the chip reads no clock for it) and must be cheap and
//! bounded: it is called on vCPU threads, under the chip's locks.
//!
//! # What each mode can show
//!
//! | event | kernel | split | user |
//! |---|---|---|---|
//! | [`TraceEvent::RunEnter`], [`TraceEvent::RunExit`] | yes | yes | yes |
//! | [`TraceEvent::Line`] | yes | yes | yes |
//! | [`TraceEvent::Msi`] (a device's MSI) | yes | yes | yes |
//! | [`TraceEvent::PinDelivery`], [`TraceEvent::RemoteIrr`], [`TraceEvent::Mask`], [`TraceEvent::Storm`] | no: KVM's IOAPIC | yes | yes |
//! | [`TraceEvent::Inject`] | no: KVM's LAPIC | the `KVM_SIGNAL_MSI` handing it to KVM's LAPICs | `KVM_INTERRUPT` |
//! | [`TraceEvent::Eoi`] | no | `KVM_EXIT_IOAPIC_EOI` (level vectors only) | every LAPIC EOI write |
//! | [`TraceEvent::Ipi`], [`TraceEvent::Timer`], [`TraceEvent::Park`], [`TraceEvent::Unpark`] | no | no | yes |
//! | [`TraceEvent::EoiPoke`] | no | yes | no |
//!
//! In kernel and split modes a `hlt` is spent inside `KVM_RUN` (KVM's
//! LAPIC wakes the vCPU); in user mode it is a `hlt` exit and a park.

use std::sync::Arc;

use irqchip::apic_bus::ApicSet;

/// Receives the chip's events ([`crate::IrqchipBuilder::trace`]).
///
/// Called on any thread, sometimes with a chip lock held: do not call back
/// into the chip, do not block, and keep memory bounded whatever the guest
/// does (a guest decides how many events there are).
pub trait TraceSink: Send + Sync {
    /// One event, as it happens.
    fn record(&self, event: TraceEvent);
}

/// What the chip did. vCPUs are indices (vCPU `i` has APIC ID `i`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceEvent {
    /// vCPU `vcpu` is about to enter `KVM_RUN`.
    RunEnter {
        /// The vCPU.
        vcpu: usize,
    },
    /// `KVM_RUN` of `vcpu` returned.
    RunExit {
        /// The vCPU.
        vcpu: usize,
        /// Why, as KVM said it: `io-in`, `io-out`, `mmio-read`,
        /// `mmio-write`, `hlt`, `irq-window`, `ioapic-eoi`, `rdmsr`,
        /// `wrmsr`, `set-tpr`, `intr`, `shutdown`, `kick` (`EINTR`),
        /// `eagain`, `error`, or `other`.
        reason: &'static str,
        /// The port, address, MSR or vector of the exit, when it has one.
        detail: u64,
    },
    /// The wired-OR level of line `gsi` changed (every mode: the level
    /// handed to the chip, `KVM_IRQ_LINE` in kernel mode).
    Line {
        /// The line.
        gsi: u32,
        /// Its new level.
        high: bool,
    },
    /// Our IOAPIC sent pin `pin`'s message (split, user).
    PinDelivery {
        /// The pin.
        pin: u8,
        /// The vector.
        vector: u8,
        /// Level-triggered (sets Remote IRR).
        level: bool,
        /// The vCPUs that took it (user); `None` when KVM's LAPICs decide
        /// (split).
        targets: Option<ApicSet>,
    },
    /// A pin's Remote IRR changed (split, user).
    RemoteIrr {
        /// The pin.
        pin: u8,
        /// Set (a level message went out) or cleared (its EOI).
        set: bool,
    },
    /// A pin's mask bit changed (split, user: a guest or host write).
    Mask {
        /// The pin.
        pin: u8,
        /// Masked or unmasked.
        masked: bool,
    },
    /// Our IOAPIC reported a storm on `pin` (split, user); the storm sink
    /// gets it next.
    Storm {
        /// The pin.
        pin: u8,
    },
    /// A device's message-signaled interrupt ([`crate::Irqchip::signal_msi`]).
    Msi {
        /// Its vector.
        vector: u8,
        /// The vCPUs that took it (user); `None` when KVM's LAPICs decide.
        targets: Option<ApicSet>,
    },
    /// An IPI from `from`'s LAPIC reached the bus (user).
    Ipi {
        /// The sender.
        from: usize,
        /// The vector.
        vector: u8,
        /// The vCPUs that took it.
        targets: ApicSet,
    },
    /// `vcpu`'s LAPIC timer fired and requested `vector` (user).
    Timer {
        /// The vCPU.
        vcpu: usize,
        /// The LVT timer's vector.
        vector: u8,
    },
    /// An interrupt went in. User: `KVM_INTERRUPT` into `vcpu`,
    /// acknowledged in our LAPIC. Split: a `KVM_SIGNAL_MSI` to KVM's
    /// LAPICs, with `vcpu` when the message names exactly one vCPU
    /// (physical, fixed) and `None` when KVM picks.
    Inject {
        /// The vCPU, when known.
        vcpu: Option<usize>,
        /// The vector.
        vector: u8,
    },
    /// `vcpu` ended the service of a vector. User: a LAPIC EOI write
    /// (`vector` the highest in service then; `None` when none was).
    /// Split: a `KVM_EXIT_IOAPIC_EOI`.
    Eoi {
        /// The vCPU.
        vcpu: usize,
        /// The vector, when one was in service.
        vector: Option<u8>,
    },
    /// `vcpu`'s thread parks: halted with nothing deliverable, or waiting
    /// for SIPI (user).
    Park {
        /// The vCPU.
        vcpu: usize,
    },
    /// `vcpu`'s thread woke from a park (user).
    Unpark {
        /// The vCPU.
        vcpu: usize,
    },
    /// The split EOI watch made halted `vcpu` runnable so a held
    /// `KVM_EXIT_IOAPIC_EOI` comes out.
    EoiPoke {
        /// The vCPU.
        vcpu: usize,
    },
}

/// The chip's handle on the optional sink: `emit` builds the event only
/// when a sink is installed.
#[derive(Clone, Default)]
pub(crate) struct Tracer(Option<Arc<dyn TraceSink>>);

impl Tracer {
    /// A tracer that hands events to `sink`, or drops them all.
    pub(crate) fn new(sink: Option<Arc<dyn TraceSink>>) -> Self {
        Self(sink)
    }

    /// Whether a sink is installed (to skip work done only for events).
    #[inline]
    pub(crate) fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Records the event `make` builds, if a sink is installed.
    #[inline]
    pub(crate) fn emit(&self, make: impl FnOnce() -> TraceEvent) {
        if let Some(sink) = &self.0 {
            sink.record(make());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<TraceEvent>>);

    impl TraceSink for Recorder {
        fn record(&self, event: TraceEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    #[test]
    fn unit_tracer_without_sink_never_builds_the_event() {
        let tracer = Tracer::default();
        let mut built = false;

        tracer.emit(|| {
            built = true;
            TraceEvent::Park { vcpu: 0 }
        });

        assert!(!tracer.on());
        assert!(!built);
    }

    #[test]
    fn unit_tracer_with_sink_records_in_order() {
        let sink = Arc::new(Recorder::default());
        let tracer = Tracer::new(Some(sink.clone()));

        tracer.emit(|| TraceEvent::Park { vcpu: 1 });
        tracer.emit(|| TraceEvent::Unpark { vcpu: 1 });

        assert!(tracer.on());
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec![TraceEvent::Park { vcpu: 1 }, TraceEvent::Unpark { vcpu: 1 }]
        );
    }
}
