//! The message-signaled test device: a register map both sides agree on.
//!
//! Message-signaled test device `j` decodes ports
//! `MSIDEV_BASE_PORT + j * MSIDEV_STRIDE ..` (see [`crate::layout`]); every
//! register is 32 bits wide and accessed with 32-bit `in`/`out`. It belongs
//! to the `j`-th device of the VMM's device table that has message
//! resources, and has that resource's messages: MSI (1 or more messages,
//! one address, consecutive data) or MSI-X (a table entry per message).
//!
//! Model, per message `k`:
//! - the VMM programs an address and data when a CONNECT_EX connects the
//!   device's messages (as the PnP manager does on real hardware) and
//!   clears them at DISCONNECT_EX: a message without an address is not
//!   sent ([`reg::DROPPED`] counts it);
//! - a mask bit ([`reg::MASK`]): a masked message that fires sets its
//!   pending bit ([`reg::PENDING`]) instead of being sent; unmasking a
//!   message whose pending bit is set sends it once and clears the bit
//!   (PCI Local Bus 3.0, MSI-X "Pending Bits"; the MSI devices here have
//!   the optional per-vector masking too);
//! - a count of the messages sent ([`reg::SENT`]).
//!
//! Messages are edge interrupts: one write, one interrupt. A raise of a
//! message that is sent again before the guest took the first may merge
//! with it in the local APIC's IRR, as on hardware; the count of sends says
//! what was sent.

/// Register offsets from a device's first port.
pub mod reg {
    /// RO: bits 0..7 the device id, 8..15 the kind ([`super::kind`]),
    /// 16..23 the number of messages, 24..31 [`super::ID_MAGIC`].
    pub const ID: u16 = 0x00;
    /// WO: `k` fires message `k` (ignored for `k` past the last message).
    pub const RAISE: u16 = 0x04;
    /// RW: bit `k` masks message `k`. Clearing a bit whose message is
    /// pending sends the message once.
    pub const MASK: u16 = 0x08;
    /// RO: bit `k`: message `k` fired while masked and was not sent yet.
    pub const PENDING: u16 = 0x0c;
    /// RW: the message the next four registers describe.
    pub const SELECT: u16 = 0x10;
    /// RO: bits 0..31 of the selected message's address (0: not programmed).
    pub const ADDRESS_LO: u16 = 0x14;
    /// RO: bits 32..63 of the selected message's address.
    pub const ADDRESS_HI: u16 = 0x18;
    /// RO: the selected message's data.
    pub const DATA: u16 = 0x1c;
    /// RO: sends of the selected message to the interrupt controller since
    /// reset (wraps at 2^32).
    pub const SENT: u16 = 0x20;
    /// RO: raises of any message dropped because it had no address.
    pub const DROPPED: u16 = 0x24;
}

/// Values of the `ID` register's kind byte.
pub mod kind {
    /// Message Signaled Interrupts: one address, data + message number.
    pub const MSI: u32 = 1;
    /// MSI-X: an address, data and mask bit per message.
    pub const MSIX: u32 = 2;
}

/// Most messages a message-signaled test device has: the `MASK` and
/// `PENDING` registers hold one bit per message. A device-table device
/// with more messages gets no test device.
pub const MAX_MESSAGES: u8 = 32;

/// The top byte of the `ID` register (`'M'`).
pub const ID_MAGIC: u32 = 0x4d;

/// The first port of message-signaled test device `index`.
pub const fn device_port(index: u16) -> u16 {
    crate::layout::MSIDEV_BASE_PORT + index * crate::layout::MSIDEV_STRIDE
}

/// The `ID` register value of device `device_id` of `kind` with `count`
/// messages.
pub const fn encode_id(device_id: u8, kind: u32, count: u8) -> u32 {
    (ID_MAGIC << 24) | ((count as u32) << 16) | ((kind & 0xff) << 8) | device_id as u32
}

// The window ends before anything else the platform decodes.
const _: () = assert!(
    device_port(crate::layout::MSIDEV_MAX_DEVICES - 1) + crate::layout::MSIDEV_STRIDE <= 0x2400
);
const _: () = assert!(crate::layout::MSIDEV_BASE_PORT > crate::layout::TEST_MARKER_PORT);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_encode_id_packs_every_field() {
        assert_eq!(encode_id(10, kind::MSIX, 8), 0x4d08_020a);
    }

    #[test]
    fn unit_device_ports_follow_the_stride() {
        assert_eq!(device_port(0), 0x2300);
        assert_eq!(device_port(3), 0x23c0);
    }
}
