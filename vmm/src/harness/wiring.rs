//! Recording stand-ins for what the device layer reaches outside itself:
//! the interrupt controller's lines and MMIO window ([`FakeWiring`]), its
//! host pin programming and message delivery ([`ChipRecorder`]) and the guest's
//! console ([`CountingOut`]). Each
//! counts what it was given, so the harness can hold the VMM's own counters
//! against them.

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use irqchip::Mode;
use irqchip::ioapic::RedirectionEntry;
use irqchip_kvm::{IrqError, LineSink, MmioWindow};
use irqconnect_abi::layout::{IOAPIC_MMIO_BASE, IOAPIC_MMIO_SIZE, IOAPIC_PINS};
use vm_superio::Trigger;

use crate::bus::{Access, BusDevice};
use crate::devices::Wiring;
use crate::devices::msidev::MsiSink;
use crate::pv::PinProgrammer;

/// The interrupt lines of a board without KVM: per GSI, which sources
/// drive it high, wired-OR as `irqchip_kvm`'s lines are.
#[derive(Default)]
struct Lines {
    /// Per GSI: sources handed out.
    sources: Vec<u32>,
    /// Per GSI: bit `s` set while source `s` drives the line high.
    high: Vec<u64>,
}

/// The controller's side of the wiring: lines, and in the modes where the
/// VMM emulates the IOAPIC ([`Mode::our_ioapic`]) its MMIO window, served
/// by a [`WindowRecorder`].
pub(crate) struct FakeWiring {
    mode: Mode,
    lines: Arc<Mutex<Lines>>,
    window: Arc<Mutex<WindowRecorder>>,
}

impl FakeWiring {
    /// The wiring of a VM in `mode`.
    pub(crate) fn new(mode: Mode) -> Self {
        let pins = usize::from(IOAPIC_PINS);
        Self {
            mode,
            lines: Arc::new(Mutex::new(Lines {
                sources: vec![0; pins],
                high: vec![0; pins],
            })),
            window: Arc::new(Mutex::new(WindowRecorder::default())),
        }
    }

    /// The MMIO window's device, for its counts.
    pub(crate) fn window(&self) -> &Arc<Mutex<WindowRecorder>> {
        &self.window
    }

    /// Whether line `gsi` is high (any source drives it).
    pub(crate) fn is_high(&self, gsi: u8) -> bool {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.high.get(usize::from(gsi)).is_some_and(|&h| h != 0)
    }
}

impl Wiring for FakeWiring {
    type Line = FakeLine;

    fn line(&self, gsi: u8) -> Option<FakeLine> {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let count = lines.sources.get_mut(usize::from(gsi))?;
        let bit = 1u64.checked_shl(*count)?;
        *count += 1;
        Some(FakeLine {
            lines: Arc::clone(&self.lines),
            gsi,
            bit,
        })
    }

    fn mmio_windows(&self) -> Vec<(MmioWindow, Arc<Mutex<dyn BusDevice>>)> {
        if !self.mode.our_ioapic() {
            return Vec::new();
        }
        let window = MmioWindow {
            base: IOAPIC_MMIO_BASE,
            len: IOAPIC_MMIO_SIZE,
            name: "ioapic",
        };
        let device: Arc<Mutex<dyn BusDevice>> = self.window.clone();
        vec![(window, device)]
    }
}

/// One source on one GSI.
pub(crate) struct FakeLine {
    lines: Arc<Mutex<Lines>>,
    gsi: u8,
    bit: u64,
}

impl LineSink for FakeLine {
    fn set_level(&mut self, high: bool) {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(level) = lines.high.get_mut(usize::from(self.gsi)) {
            if high {
                *level |= self.bit;
            } else {
                *level &= !self.bit;
            }
        }
    }
}

/// An edge per call, as `IrqLine`'s.
impl Trigger for FakeLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        // Up and down: the level is as before unless another source holds
        // the line; only this source's bit moves.
        if let Some(level) = lines.high.get_mut(usize::from(self.gsi)) {
            *level &= !self.bit;
        }
        Ok(())
    }
}

/// The chip's MMIO window: counts accesses, checks that the bus handed it
/// only offsets inside the window, reads a pattern of the offset.
#[derive(Default)]
pub(crate) struct WindowRecorder {
    /// Reads and writes it was given.
    pub(crate) accesses: u64,
    /// Accesses whose offset was past the window (the bus must not route
    /// those here).
    pub(crate) outside: u64,
}

impl WindowRecorder {
    fn access(&mut self, offset: u64) {
        self.accesses += 1;
        if offset >= IOAPIC_MMIO_SIZE {
            self.outside += 1;
        }
    }
}

impl BusDevice for WindowRecorder {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        self.access(offset);
        for (i, b) in (0u64..).zip(data.iter_mut()) {
            *b = offset.wrapping_add(i) as u8;
        }
    }

    fn write(&mut self, _access: Access, offset: u64, _data: &[u8]) {
        self.access(offset);
    }
}

/// What the controller is offered (host pin programs, messages): counted,
/// and all refused when built so (the VMM's failure paths).
pub(crate) struct ChipRecorder {
    refuse: bool,
    taken: AtomicU64,
    refused: AtomicU64,
}

impl ChipRecorder {
    /// A recorder that takes what it is offered, or refuses everything.
    pub(crate) fn new(refuse: bool) -> Arc<Self> {
        Arc::new(Self {
            refuse,
            taken: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// (offers taken, offers refused).
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.taken.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// Counts an offer the controller could take (`valid`); whether it did.
    fn offer(&self, valid: bool) -> bool {
        let taken = valid && !self.refuse;
        let counter = if taken { &self.taken } else { &self.refused };
        counter.fetch_add(1, Ordering::Relaxed);
        taken
    }
}

/// Host pin programming, as the PV service reaches it.
pub(crate) struct ChipHandle(pub(crate) Arc<ChipRecorder>);

impl PinProgrammer for ChipHandle {
    fn program_pin(&self, pin: u8, _entry: RedirectionEntry) -> Result<(), IrqError> {
        if self.0.offer(pin < IOAPIC_PINS) {
            Ok(())
        } else {
            Err(IrqError::NoSuchGsi(u32::from(pin)))
        }
    }
}

/// Message delivery, as the message-signaled test devices reach it.
impl MsiSink for ChipRecorder {
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), IrqError> {
        if self.offer(true) {
            Ok(())
        } else {
            Err(IrqError::BadMsi {
                address,
                data,
                why: "the harness refuses every message".to_string(),
            })
        }
    }
}

/// The guest's console: counts the bytes, keeps none.
#[derive(Clone, Default)]
pub(crate) struct CountingOut(pub(crate) Arc<AtomicU64>);

impl io::Write for CountingOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
