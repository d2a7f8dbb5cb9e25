//! The QEMU `isa-debug-exit` compatible exit port: a write of `v` ends the VM
//! and the VMM exits with status `v`.

use std::sync::Arc;

use crate::bus::{Access, BusDevice};
use crate::control::{Outcome, VmControl};

/// The exit port.
pub(crate) struct ExitPort {
    control: Arc<VmControl>,
}

impl ExitPort {
    /// An exit port that stops the VM through `control`.
    pub(crate) fn new(control: Arc<VmControl>) -> Self {
        Self { control }
    }
}

/// The little-endian value of a 1-, 2- or 4-byte access, zero-extended.
pub(crate) fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0, |v, (i, &b)| v | (u32::from(b) << (8 * i)))
}

impl BusDevice for ExitPort {
    fn read(&mut self, _access: Access, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, access: Access, _offset: u64, data: &[u8]) {
        let code = le_value(data);
        log::debug!("vcpu {} wrote {code:#x} to the exit port", access.vcpu);
        self.control.finish(Outcome::GuestExit(code));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_value_zero_extends() {
        assert_eq!(le_value(&[1]), 1);
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(le_value(&[1, 0, 0, 0x80]), 0x8000_0001);
    }

    #[test]
    fn write_records_guest_exit() {
        let control = Arc::new(VmControl::new(1).unwrap());
        let mut port = ExitPort::new(control.clone());
        port.write(Access { vcpu: 0 }, 0, &7u32.to_le_bytes());
        assert!(control.stopping());
        assert!(matches!(
            control.take_outcome(),
            Some(Outcome::GuestExit(7))
        ));
    }
}
