//! COM1: vm-superio's 16550A, output to stdout, input from the event loop,
//! interrupt on IOAPIC pin 4 (a pulse per interrupt condition, as an ISA
//! UART's edge).

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use irqchip_kvm::IrqLine;
use vm_superio::{Serial, Trigger};

use crate::bus::{Access, BusDevice};
use crate::report::GuestReport;
use irqchip_kvm::ratelimit::RateLimiter;

/// Longest line kept for result parsing; longer lines are passed through
/// but not parsed.
const MAX_LINE: usize = 4096;

/// Where the guest's output goes: a writer (stdout), plus complete lines to
/// the [`GuestReport`].
pub(crate) struct SerialOut {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    report: Arc<Mutex<GuestReport>>,
}

impl SerialOut {
    /// Output to `out`, lines to `report`.
    pub(crate) fn new(out: Box<dyn Write + Send>, report: Arc<Mutex<GuestReport>>) -> Self {
        Self {
            out,
            line: Vec::new(),
            report,
        }
    }

    /// Flushes a partial last line (at exit).
    pub(crate) fn finish(&mut self) {
        if !self.line.is_empty() {
            self.end_line();
        }
        let _ = self.out.flush();
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .line(&text);
        self.line.clear();
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        Ok(n)
    }

    /// vm-superio flushes after every byte; the underlying stdout is
    /// line-buffered, so a flush here only happens at line ends.
    fn flush(&mut self) -> io::Result<()> {
        if self.line.is_empty() {
            self.out.flush()
        } else {
            Ok(())
        }
    }
}

/// The UART, interrupting through `L` (an edge per interrupt condition).
pub(crate) type Uart<L = IrqLine> = Serial<L, vm_superio::serial::NoEvents, SerialOut>;

/// Bus adapter around the shared UART (the event loop feeds its input).
pub(crate) struct SerialDevice<L: Trigger> {
    uart: Arc<Mutex<Uart<L>>>,
    warn: RateLimiter,
}

impl<L: Trigger> SerialDevice<L> {
    /// The bus device for `uart`.
    pub(crate) fn new(uart: Arc<Mutex<Uart<L>>>) -> Self {
        Self {
            uart,
            warn: RateLimiter::new(),
        }
    }
}

impl<L: Trigger + Send> BusDevice for SerialDevice<L> {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            let mut uart = self.uart.lock().unwrap_or_else(PoisonError::into_inner);
            *first = uart.read(offset as u8);
        }
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let mut uart = self.uart.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = uart.write(offset as u8, value)
            && self.warn.allow()
        {
            log::warn!("serial output: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_passes_through_and_lines_reach_report() {
        let sink = Shared::default();
        let report = Arc::new(Mutex::new(GuestReport::new()));
        let mut out = SerialOut::new(Box::new(sink.clone()), report.clone());
        out.write_all(b"ok first\nFAIL sec").unwrap();
        out.write_all(b"ond: no\npartial").unwrap();
        out.finish();
        assert_eq!(
            &*sink.0.lock().unwrap(),
            b"ok first\nFAIL second: no\npartial"
        );
        let r = report.lock().unwrap();
        assert_eq!(r.results().len(), 2);
        assert_eq!(r.results()[1].name, "second");
    }
}
