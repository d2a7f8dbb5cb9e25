//! The board's interrupt wiring: per-source lines, wired-OR per GSI.
//!
//! Several sources may drive one GSI (a pc-testdev port and a test device on
//! the same pin). A physical board ORs them; KVM's `KVM_IRQ_LINE` knows one
//! user-space source only, so the OR is done here and only changes of the
//! combined level are passed on. A pulse on a line another source holds high
//! is therefore invisible, as on real hardware.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{InterruptController, LineSink};
use crate::ratelimit::RateLimiter;

/// Most sources one GSI may have (bits of a `u64`).
const MAX_SOURCES_PER_GSI: u32 = 64;

/// The wiring of every GSI to the interrupt controller.
pub(crate) struct IrqLines {
    ctrl: Arc<dyn InterruptController>,
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
    /// Wiring for every GSI of `ctrl`.
    pub(crate) fn new(ctrl: Arc<dyn InterruptController>) -> Arc<Self> {
        let n = ctrl.gsi_count() as usize;
        Arc::new(Self {
            ctrl,
            high: Mutex::new(vec![0; n]),
            sources: Mutex::new(vec![0; n]),
            assertions: (0..n).map(|_| AtomicU64::new(0)).collect(),
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
        // on the way to the controller.
        if is_high && let Some(count) = self.assertions.get(gsi as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.ctrl.set_level(gsi, is_high) {
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

    /// Line changes the controller refused.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The controller behind the wiring.
    pub(crate) fn controller(&self) -> &Arc<dyn InterruptController> {
        &self.ctrl
    }
}

/// One source's connection to one GSI.
pub(crate) struct IrqLine {
    lines: Arc<IrqLines>,
    gsi: u32,
    bit: u64,
}

impl IrqLine {
    /// Drives the line (shared-reference form, for `Trigger`-style callers).
    pub(crate) fn set(&self, high: bool) {
        self.lines.drive(self.gsi, self.bit, high);
    }

    /// One rising and one falling edge.
    pub(crate) fn pulse(&self) {
        self.set(true);
        self.set(false);
    }
}

impl LineSink for IrqLine {
    fn set_level(&mut self, high: bool) {
        self.set(high);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cli::IrqchipMode;
    use crate::irq::{ExitAction, IrqError, IrqExit, IrqStats, VcpuInterrupts};

    /// A controller that records every level change it is given.
    #[derive(Default)]
    pub(crate) struct RecordingController {
        pub(crate) changes: Mutex<Vec<(u32, bool)>>,
    }

    struct NoVcpu;
    impl VcpuInterrupts for NoVcpu {
        fn on_exit(&mut self, _exit: IrqExit<'_>) -> ExitAction {
            ExitAction::Unexpected
        }
    }

    impl InterruptController for RecordingController {
        fn mode(&self) -> IrqchipMode {
            IrqchipMode::Kernel
        }
        fn gsi_count(&self) -> u32 {
            24
        }
        fn set_level(&self, gsi: u32, high: bool) -> Result<(), IrqError> {
            self.changes.lock().unwrap().push((gsi, high));
            Ok(())
        }
        fn vcpu(&self, _index: usize) -> Box<dyn VcpuInterrupts> {
            Box::new(NoVcpu)
        }
        fn stats(&self) -> IrqStats {
            IrqStats::default()
        }
    }

    #[test]
    fn wired_or_passes_only_combined_changes() {
        let ctrl = Arc::new(RecordingController::default());
        let lines = IrqLines::new(ctrl.clone());
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
        let ctrl = Arc::new(RecordingController::default());
        let lines = IrqLines::new(ctrl.clone());
        let mut hold = lines.line(4).unwrap();
        let mut pulse = lines.line(4).unwrap();
        hold.set_level(true);
        pulse.set_level(true);
        pulse.set_level(false);
        assert_eq!(*ctrl.changes.lock().unwrap(), vec![(4, true)]);
    }

    #[test]
    fn repeated_level_is_not_repeated() {
        let ctrl = Arc::new(RecordingController::default());
        let lines = IrqLines::new(ctrl.clone());
        let mut a = lines.line(2).unwrap();
        a.set_level(true);
        a.set_level(true);
        a.set_level(false);
        a.set_level(false);
        assert_eq!(ctrl.changes.lock().unwrap().len(), 2);
    }

    #[test]
    fn gsi_out_of_range_has_no_line() {
        let lines = IrqLines::new(Arc::new(RecordingController::default()));
        assert!(lines.line(24).is_none());
    }
}
