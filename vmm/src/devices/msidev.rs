//! The message-signaled test device (register map and behaviour in
//! `irqconnect_abi::msidev`): one per device-table device with messages,
//! raising its messages as a PCI device with MSI or MSI-X would.
//!
//! The model is pure: messages go out through an [`MsiSink`] (the
//! interrupt controller's `signal_msi`), and the PV service programs each
//! message's address and data ([`MsiDevice::program`]) as CONNECT_EX and
//! DISCONNECT_EX change them. Guest accesses it does not define (another
//! width, an offset past the registers, a read-only register written, a
//! message the device lacks) read as all ones or are ignored, and count in
//! [`MsiDevice::bad_accesses`].

use std::sync::{Arc, Mutex, PoisonError};

use irqchip_kvm::{IrqError, Irqchip};
use irqconnect::MessageRoute;
use irqconnect::messages::MessageKind;
use irqconnect_abi::msidev::{MAX_MESSAGES, encode_id, kind, reg};

use crate::bus::{Access, BusDevice};

/// Where a message goes when the device sends it.
pub(crate) trait MsiSink: Send + Sync {
    /// Sends `address`/`data` (see `Irqchip::signal_msi`).
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), IrqError>;
}

impl MsiSink for Irqchip {
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), IrqError> {
        Irqchip::signal_msi(self, address, data)
    }
}

/// One message-signaled test device as the device table assigns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsidevSpec {
    /// Its index: ports `irqconnect_abi::msidev::device_port(index)`.
    pub(crate) index: u8,
    /// The device-table device whose messages it raises.
    pub(crate) device_id: u8,
    /// MSI or MSI-X.
    pub(crate) kind: MessageKind,
    /// Its messages, 1..=[`MAX_MESSAGES`].
    pub(crate) count: u8,
}

/// One message-signaled test device.
pub(crate) struct MsiDevice {
    spec: MsidevSpec,
    sink: Arc<dyn MsiSink>,
    /// Everything that changes: what a snapshot saves.
    state: MsidevState,
}

/// Shared between the bus (vCPU threads) and the PV service.
pub(crate) type SharedMsidev = Arc<Mutex<MsiDevice>>;

/// A message-signaled test device's state: what changes as it runs, and
/// what a snapshot saves (its spec is the VM's configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct MsidevState {
    /// Bit `k`: message `k` masked.
    mask: u32,
    /// Bit `k`: message `k` fired while masked, not sent yet.
    pending: u32,
    select: u32,
    /// Per message: its address and data, when programmed.
    programmed: Vec<Option<MessageRoute>>,
    /// Per message: sends to the interrupt controller.
    sent: Vec<u32>,
    /// Raises dropped for want of an address.
    dropped: u32,
    /// Sends the interrupt controller refused.
    send_errors: u64,
    bad_accesses: u64,
}

impl MsiDevice {
    /// The device `spec` describes, sending through `sink`; its count is
    /// clamped to [`MAX_MESSAGES`] (the device table never asks for more).
    pub(crate) fn new(spec: MsidevSpec, sink: Arc<dyn MsiSink>) -> Self {
        let spec = MsidevSpec {
            count: spec.count.min(MAX_MESSAGES),
            ..spec
        };
        let n = usize::from(spec.count);
        Self {
            spec,
            sink,
            state: MsidevState {
                mask: 0,
                pending: 0,
                select: 0,
                programmed: vec![None; n],
                sent: vec![0; n],
                dropped: 0,
                send_errors: 0,
                bad_accesses: 0,
            },
        }
    }

    /// A shared device.
    pub(crate) fn shared(spec: MsidevSpec, sink: Arc<dyn MsiSink>) -> SharedMsidev {
        Arc::new(Mutex::new(Self::new(spec, sink)))
    }

    /// Its spec.
    pub(crate) fn spec(&self) -> MsidevSpec {
        self.spec
    }

    /// The snapshot state.
    pub(crate) fn save(&self) -> MsidevState {
        self.state.clone()
    }

    /// Restores a snapshot state of a device with this one's message count.
    pub(crate) fn restore(&mut self, state: &MsidevState) -> Result<(), String> {
        let n = usize::from(self.spec.count);
        if state.programmed.len() != n || state.sent.len() != n {
            return Err(format!(
                "message device {}: {} messages saved, the device has {n}",
                self.spec.index,
                state.programmed.len()
            ));
        }
        let all = self.all_messages();
        self.state = MsidevState {
            mask: state.mask & all,
            pending: state.pending & all,
            ..state.clone()
        };
        Ok(())
    }

    /// The PV service (re)programs message `k`: `None` unprograms it.
    /// Ignored for a message the device lacks.
    pub(crate) fn program(&mut self, k: u8, route: Option<MessageRoute>) {
        if let Some(slot) = self.state.programmed.get_mut(usize::from(k)) {
            *slot = route;
        }
    }

    /// Message `k`'s programming.
    #[cfg(test)]
    pub(crate) fn programmed(&self, k: u8) -> Option<MessageRoute> {
        self.state.programmed.get(usize::from(k)).copied().flatten()
    }

    /// Accesses the model ignored.
    pub(crate) fn bad_accesses(&self) -> u64 {
        self.state.bad_accesses
    }

    /// Sends the interrupt controller refused.
    pub(crate) fn send_errors(&self) -> u64 {
        self.state.send_errors
    }

    /// Sends of every message.
    pub(crate) fn sent_total(&self) -> u64 {
        self.state.sent.iter().map(|&n| u64::from(n)).sum()
    }

    /// Raises dropped for want of an address.
    pub(crate) fn dropped(&self) -> u32 {
        self.state.dropped
    }

    fn bit(k: u32) -> u32 {
        1u32.checked_shl(k).unwrap_or(0)
    }

    fn all_messages(&self) -> u32 {
        match u32::from(self.spec.count) {
            32.. => u32::MAX,
            n => (1 << n) - 1,
        }
    }

    /// A 32-bit register read.
    pub(crate) fn read(&mut self, offset: u16) -> u32 {
        let selected = usize::try_from(self.state.select).ok();
        let route = selected.and_then(|k| self.state.programmed.get(k).copied().flatten());
        match offset {
            reg::ID => encode_id(
                self.spec.device_id,
                match self.spec.kind {
                    MessageKind::Msi => kind::MSI,
                    MessageKind::Msix => kind::MSIX,
                },
                self.spec.count,
            ),
            reg::MASK => self.state.mask,
            reg::PENDING => self.state.pending,
            reg::SELECT => self.state.select,
            reg::ADDRESS_LO => route.map_or(0, |r| r.address as u32),
            reg::ADDRESS_HI => route.map_or(0, |r| (r.address >> 32) as u32),
            reg::DATA => route.map_or(0, |r| r.data),
            reg::SENT => selected
                .and_then(|k| self.state.sent.get(k).copied())
                .unwrap_or(0),
            reg::DROPPED => self.state.dropped,
            _ => {
                self.state.bad_accesses += 1;
                u32::MAX
            }
        }
    }

    /// A 32-bit register write.
    pub(crate) fn write(&mut self, offset: u16, value: u32) {
        match offset {
            reg::RAISE => self.raise(value),
            reg::MASK => {
                let value = value & self.all_messages();
                let unmasked = self.state.mask & !value;
                self.state.mask = value;
                // Unmasking a pending message sends it once.
                let due = unmasked & self.state.pending;
                self.state.pending &= !due;
                for k in 0..u32::from(self.spec.count) {
                    if due & Self::bit(k) != 0 {
                        self.send(k);
                    }
                }
            }
            reg::SELECT => self.state.select = value,
            _ => self.state.bad_accesses += 1,
        }
    }

    /// Message `k` fires.
    fn raise(&mut self, k: u32) {
        if k >= u32::from(self.spec.count) {
            self.state.bad_accesses += 1;
        } else if self.state.mask & Self::bit(k) != 0 {
            self.state.pending |= Self::bit(k);
        } else {
            self.send(k);
        }
    }

    /// Sends message `k` if it has an address.
    fn send(&mut self, k: u32) {
        let Some(i) = usize::try_from(k).ok() else {
            return;
        };
        let Some(route) = self.state.programmed.get(i).copied().flatten() else {
            self.state.dropped = self.state.dropped.wrapping_add(1);
            return;
        };
        match self.sink.signal_msi(route.address, route.data) {
            Ok(()) => {
                if let Some(n) = self.state.sent.get_mut(i) {
                    *n = n.wrapping_add(1);
                }
            }
            Err(e) => {
                self.state.send_errors += 1;
                if self.state.send_errors == 1 {
                    log::warn!(
                        "message-signaled test device {}: message {k} not sent: {e}",
                        self.spec.index
                    );
                }
            }
        }
    }
}

/// The device's port window on the bus.
pub(crate) struct MsidevPort {
    device: SharedMsidev,
}

impl MsidevPort {
    /// The window of `device`.
    pub(crate) fn new(device: SharedMsidev) -> Self {
        Self { device }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MsiDevice> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl BusDevice for MsidevPort {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        let mut dev = self.lock();
        match (u16::try_from(offset), data.len()) {
            (Ok(offset), 4) if offset % 4 == 0 => {
                data.copy_from_slice(&dev.read(offset).to_le_bytes());
            }
            _ => {
                dev.state.bad_accesses += 1;
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        let mut dev = self.lock();
        match (u16::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(offset), Ok(bytes)) if offset % 4 == 0 => {
                dev.write(offset, u32::from_le_bytes(bytes));
            }
            _ => dev.state.bad_accesses += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every message sent.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);

    impl MsiSink for Recorder {
        fn signal_msi(&self, address: u64, data: u32) -> Result<(), IrqError> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
    }

    fn device(count: u8) -> (MsiDevice, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let spec = MsidevSpec {
            index: 2,
            device_id: 10,
            kind: MessageKind::Msix,
            count,
        };
        let mut d = MsiDevice::new(spec, rec.clone());
        for k in 0..count {
            d.program(
                k,
                Some(MessageRoute {
                    address: 0xfee0_0000 | u64::from(k) << 12,
                    data: 0x48 + u32::from(k),
                    targets: 1 << k,
                    group: 0,
                }),
            );
        }
        (d, rec)
    }

    fn sent(rec: &Recorder) -> Vec<u32> {
        rec.0.lock().unwrap().iter().map(|&(_, d)| d).collect()
    }

    #[test]
    fn id_register_names_device_kind_and_count() {
        let (mut d, _) = device(8);
        assert_eq!(d.read(reg::ID), 0x4d08_020a);
    }

    #[test]
    fn raise_sends_the_programmed_message_and_counts_it() {
        let (mut d, rec) = device(8);
        d.write(reg::RAISE, 3);
        d.write(reg::RAISE, 3);
        assert_eq!(sent(&rec), [0x4b, 0x4b]);
        d.write(reg::SELECT, 3);
        assert_eq!(d.read(reg::SENT), 2);
        assert_eq!(d.read(reg::ADDRESS_LO), 0xfee0_3000);
        assert_eq!(d.read(reg::DATA), 0x4b);
    }

    #[test]
    fn masked_message_is_pending_and_sent_once_on_unmask() {
        let (mut d, rec) = device(8);
        d.write(reg::MASK, 0b100);
        d.write(reg::RAISE, 2);
        d.write(reg::RAISE, 2);
        assert!(sent(&rec).is_empty());
        assert_eq!(d.read(reg::PENDING), 0b100);
        d.write(reg::MASK, 0);
        assert_eq!(sent(&rec), [0x4a]);
        assert_eq!(d.read(reg::PENDING), 0);
        // Unmasking again sends nothing more.
        d.write(reg::MASK, 0);
        assert_eq!(sent(&rec).len(), 1);
    }

    #[test]
    fn unprogrammed_message_is_dropped_and_counted() {
        let (mut d, rec) = device(2);
        d.program(1, None);
        d.write(reg::RAISE, 1);
        assert!(sent(&rec).is_empty());
        assert_eq!(d.read(reg::DROPPED), 1);
        d.write(reg::SELECT, 1);
        assert_eq!((d.read(reg::ADDRESS_LO), d.read(reg::DATA)), (0, 0));
    }

    #[test]
    fn hostile_accesses_are_defined_and_counted() {
        let (mut d, rec) = device(2);
        d.write(reg::RAISE, 2);
        d.write(reg::RAISE, u32::MAX);
        d.write(reg::ID, 5);
        d.write(reg::MASK, u32::MAX);
        assert_eq!(d.read(reg::MASK), 0b11, "mask bits past the last message");
        d.write(reg::SELECT, u32::MAX);
        assert_eq!((d.read(reg::SENT), d.read(reg::DATA)), (0, 0));
        assert_eq!(d.read(0x3c), u32::MAX);
        assert!(sent(&rec).is_empty());
        assert_eq!(d.bad_accesses(), 4);
        let mut port = MsidevPort::new(Arc::new(Mutex::new(d)));
        let mut two = [0u8; 2];
        port.read(Access { vcpu: 0 }, 0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        port.write(Access { vcpu: 0 }, 2, &[1, 0, 0, 0]);
        assert_eq!(port.lock().bad_accesses(), 6);
    }
}
