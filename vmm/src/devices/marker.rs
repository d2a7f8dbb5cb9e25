//! The test-marker port: the guest writes the name of the test it starts,
//! one byte per `out`, ended by `\n`; the VMM remembers it so `--timeout`
//! and the JUnit report can name the test that was running.

use std::sync::{Arc, Mutex, PoisonError};

use irqconnect_abi::layout::TEST_MARKER_MAX_LEN;

use crate::bus::{Access, BusDevice};
use crate::report::GuestReport;

/// The marker port.
pub(crate) struct TestMarker {
    partial: Vec<u8>,
    report: Arc<Mutex<GuestReport>>,
}

impl TestMarker {
    /// A marker port feeding `report`.
    pub(crate) fn new(report: Arc<Mutex<GuestReport>>) -> Self {
        Self {
            partial: Vec::new(),
            report,
        }
    }
}

impl BusDevice for TestMarker {
    fn read(&mut self, _access: Access, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _access: Access, _offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        if b == b'\n' {
            let name = String::from_utf8_lossy(&self.partial).trim().to_string();
            self.partial.clear();
            log::debug!("guest test started: {name}");
            self.report
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .test_started(name);
        } else if self.partial.len() < TEST_MARKER_MAX_LEN {
            self.partial.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_completed_by_newline_and_truncated() {
        let report = Arc::new(Mutex::new(GuestReport::new()));
        let mut m = TestMarker::new(report.clone());
        let a = Access { vcpu: 0 };
        for &b in b"ioapic_level\n" {
            m.write(a, 0, &[b]);
        }
        assert_eq!(report.lock().unwrap().current_test(), Some("ioapic_level"));
        for _ in 0..200 {
            m.write(a, 0, b"x");
        }
        m.write(a, 0, b"\n");
        let r = report.lock().unwrap();
        assert_eq!(r.current_test().map(str::len), Some(TEST_MARKER_MAX_LEN));
    }
}
