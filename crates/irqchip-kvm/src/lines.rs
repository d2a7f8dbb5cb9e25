//! The board's interrupt wiring: per-source lines, wired-OR per GSI.
//!
//! Several sources may drive one GSI (a pc-testdev port and a test device on
//! the same pin). A physical board ORs them; KVM's `KVM_IRQ_LINE` knows one
//! user-space source only, so the OR is done here and only changes of the
//! combined level are passed on. A pulse on a line another source holds high
//! is therefore invisible, as on real hardware.

use std::convert::Infallible;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::Backend;
use crate::error::Error;
use crate::ratelimit::RateLimiter;
use crate::trace::{TraceEvent, Tracer};

/// A device's view of its interrupt line: one method, so device models stay
/// pure and are unit-tested against a recording sink.
pub trait LineSink {
    /// Drives the line high (`true`) or low (`false`). Edge-triggered
    /// devices send a pulse: `set_level(true)` then `set_level(false)`.
    fn set_level(&mut self, high: bool);
}

/// Most sources one GSI may have (bits of a `u64`).
const MAX_SOURCES_PER_GSI: u32 = 64;

/// The wiring of every GSI to the chip.
pub(crate) struct IrqLines {
    chip: Arc<dyn Backend>,
    tracer: Tracer,
    /// Per GSI: the set of sources currently driving it high.
    high: Mutex<Vec<u64>>,
    /// Per GSI: sources handed out so far.
    sources: Mutex<Vec<u32>>,
    /// Per GSI: rising edges of the combined line.
    assertions: Vec<AtomicU64>,
    errors: AtomicU64,
    warn: RateLimiter,
}

impl IrqLines {
    /// Wiring for `gsis` GSIs of `chip`.
    pub(crate) fn new(chip: Arc<dyn Backend>, gsis: usize, tracer: Tracer) -> Arc<Self> {
        Arc::new(Self {
            chip,
            tracer,
            high: Mutex::new(vec![0; gsis]),
            sources: Mutex::new(vec![0; gsis]),
            assertions: (0..gsis).map(|_| AtomicU64::new(0)).collect(),
            errors: AtomicU64::new(0),
            warn: RateLimiter::new(),
        })
    }

    /// A new source on `gsi`, or `None` when the GSI does not exist or has
    /// too many sources.
    pub(crate) fn line(self: &Arc<Self>, gsi: u32) -> Option<IrqLine> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let count = sources.get_mut(gsi as usize)?;
        if *count >= MAX_SOURCES_PER_GSI {
            return None;
        }
        let bit = 1u64 << *count;
        *count += 1;
        Some(IrqLine {
            lines: Arc::clone(self),
            gsi,
            bit,
        })
    }

    fn drive(&self, gsi: u32, bit: u64, high: bool) {
        let mut levels = self.high.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(level) = levels.get_mut(gsi as usize) else {
            return;
        };
        let was_high = *level != 0;
        if high {
            *level |= bit;
        } else {
            *level &= !bit;
        }
        let is_high = *level != 0;
        if was_high == is_high {
            return;
        }
        // Still under the lock, so two sources cannot reorder their changes
        // on the way to the chip.
        if is_high && let Some(count) = self.assertions.get(gsi as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.tracer.emit(|| TraceEvent::Line { gsi, high: is_high });
        if let Err(e) = self.chip.set_level(gsi, is_high) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            if self.warn.allow() {
                log::warn!("interrupt line: {e}");
            }
        }
    }

    /// Rising edges per GSI of the combined line, for GSIs that had any.
    pub(crate) fn assertions(&self) -> Vec<(u32, u64)> {
        self.assertions
            .iter()
            .enumerate()
            .map(|(gsi, c)| (gsi as u32, c.load(Ordering::Relaxed)))
            .filter(|&(_, c)| c > 0)
            .collect()
    }

    /// Line changes the chip refused.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// One source's connection to one GSI ([`crate::Irqchip::line`]).
///
/// Drive it as a level ([`IrqLine::set`], [`LineSink::set_level`]) or pulse
/// it for an edge ([`IrqLine::pulse`], vm-superio's [`vm_superio::Trigger`]).
pub struct IrqLine {
    lines: Arc<IrqLines>,
    gsi: u32,
    bit: u64,
}

impl IrqLine {
    /// Drives the line (shared-reference form, for `Trigger`-style callers).
    pub fn set(&self, high: bool) {
        self.lines.drive(self.gsi, self.bit, high);
    }

    /// One rising and one falling edge.
    pub fn pulse(&self) {
        self.set(true);
        self.set(false);
    }

    /// The GSI (IOAPIC pin) this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl LineSink for IrqLine {
    fn set_level(&mut self, high: bool) {
        self.set(high);
    }
}

/// An interrupt edge per call, as vm-superio's devices (the 16550 UART, the
/// i8042) signal an ISA edge.
impl vm_superio::Trigger for IrqLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.pulse();
        Ok(())
    }
}

/// A line driven through an `EventFd` ([`crate::Irqchip::eventfd_line`]):
/// every write to the eventfd is one edge, as an irqfd is for KVM.
///
/// Hand a clone of [`EventFdLine::eventfd`] to the device (another thread,
/// another process); watch [`EventFdLine::as_raw_fd`] for input in the
/// VMM's event loop and call [`EventFdLine::process`] when it is readable.
/// Writes that come before the line is processed coalesce into one edge, as
/// edges on a pin do while the interrupt is not yet taken.
pub struct EventFdLine {
    evt: EventFd,
    line: IrqLine,
}

impl EventFdLine {
    pub(crate) fn new(line: IrqLine) -> Result<Self, Error> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::host("create a line eventfd"))?;
        Ok(Self { evt, line })
    }

    /// The eventfd a device writes to raise an edge.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Consumes the eventfd's count and, if anything was written, pulses
    /// the line once. Returns the count (0 when nothing was pending).
    pub fn process(&self) -> u64 {
        match self.evt.read() {
            Ok(n) if n > 0 => {
                self.line.pulse();
                n
            }
            _ => 0,
        }
    }
}

impl AsRawFd for EventFdLine {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use irqchip::ioapic::RedirectionEntry;
    use kvm_ioctls::VcpuFd;

    use super::*;
    use crate::backend::{IrqStats, VcpuBackend};
    use crate::error::IrqError;

    /// A chip that records every level change it is given.
    #[derive(Default)]
    pub(crate) struct RecordingController {
        pub(crate) changes: Mutex<Vec<(u32, bool)>>,
    }

    impl Backend for RecordingController {
        fn set_level(&self, gsi: u32, high: bool) -> Result<(), IrqError> {
            self.changes.lock().unwrap().push((gsi, high));
            Ok(())
        }
        fn vcpu(
            self: Arc<Self>,
            _index: usize,
            _fd: &VcpuFd,
        ) -> Result<Box<dyn VcpuBackend>, Error> {
            Err(Error::Config("no vCPUs".to_string()))
        }
        fn stats(&self) -> IrqStats {
            IrqStats::default()
        }
        fn program_pin(&self, _pin: u8, _entry: RedirectionEntry) -> Result<(), IrqError> {
            Ok(())
        }
        fn signal_msi(&self, _msi: irqchip::msi::Msi) -> Result<(), IrqError> {
            Ok(())
        }
    }

    fn wiring() -> (Arc<RecordingController>, Arc<IrqLines>) {
        let ctrl = Arc::new(RecordingController::default());
        let lines = IrqLines::new(ctrl.clone(), 24, Tracer::default());
        (ctrl, lines)
    }

    #[test]
    fn wired_or_passes_only_combined_changes() {
        let (ctrl, lines) = wiring();
        let mut a = lines.line(16).unwrap();
        let mut b = lines.line(16).unwrap();
        a.set_level(true);
        b.set_level(true);
        a.set_level(false);
        b.set_level(false);
        assert_eq!(*ctrl.changes.lock().unwrap(), vec![(16, true), (16, false)]);
        assert_eq!(lines.assertions(), vec![(16, 1)]);
    }

    #[test]
    fn pulse_under_a_held_line_is_invisible() {
        let (ctrl, lines) = wiring();
        let mut hold = lines.line(4).unwrap();
        let mut pulse = lines.line(4).unwrap();
        hold.set_level(true);
        pulse.set_level(true);
        pulse.set_level(false);
        assert_eq!(*ctrl.changes.lock().unwrap(), vec![(4, true)]);
    }

    #[test]
    fn repeated_level_is_not_repeated() {
        let (ctrl, lines) = wiring();
        let mut a = lines.line(2).unwrap();
        a.set_level(true);
        a.set_level(true);
        a.set_level(false);
        a.set_level(false);
        assert_eq!(ctrl.changes.lock().unwrap().len(), 2);
    }

    #[test]
    fn gsi_out_of_range_has_no_line() {
        let (_, lines) = wiring();
        assert!(lines.line(24).is_none());
    }

    #[test]
    fn unit_trigger_is_one_edge() {
        let (ctrl, lines) = wiring();
        let line = lines.line(4).unwrap();

        vm_superio::Trigger::trigger(&line).unwrap();

        assert_eq!(*ctrl.changes.lock().unwrap(), vec![(4, true), (4, false)]);
    }

    #[test]
    fn unit_eventfd_writes_before_processing_coalesce_into_one_edge() {
        let (ctrl, lines) = wiring();
        let line = EventFdLine::new(lines.line(9).unwrap()).unwrap();

        assert_eq!(line.process(), 0, "nothing written yet");
        line.eventfd().write(1).unwrap();
        line.eventfd().write(2).unwrap();
        assert_eq!(line.process(), 3);
        assert_eq!(line.process(), 0);

        assert_eq!(*ctrl.changes.lock().unwrap(), vec![(9, true), (9, false)]);
    }
}
