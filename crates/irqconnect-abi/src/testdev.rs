//! The interrupt-source test device: a register map both sides agree on.
//!
//! Device `i` decodes ports `TESTDEV_BASE_PORT + i * TESTDEV_STRIDE ..` (see
//! [`crate::layout`]); every register is 32 bits wide and accessed with 32-bit
//! `in`/`out`. A device drives one interrupt line chosen by the VMM (the PnP
//! manager); its trigger mode is fixed by the VMM's device table.
//!
//! Model: the device holds a count of pending interrupt causes.
//! - Level devices hold their line high while interrupts are enabled and the
//!   pending count is non-zero; `ACK` takes one cause away and drops the line
//!   when none is left.
//! - Edge devices send one rising edge per `RAISE` write (and one when
//!   interrupts are enabled with causes pending); an ISR drains causes with
//!   `STATUS`/`ACK`, so edges that coalesce in the APIC lose nothing.
//!
//! The assert and ack counters let the host and the guest both measure lost or
//! duplicated interrupts instead of guessing.

/// Register offsets from a device's first port.
pub mod reg {
    /// RO: bits 0..7 the interrupt line (IOAPIC pin), bits 16..23 the device id,
    /// bits 24..31 [`super::ID_MAGIC`].
    pub const ID: u16 = 0x00;
    /// RW: [`super::CTRL_ENABLE`] (interrupt enable); RO [`super::CTRL_LEVEL`].
    pub const CTRL: u16 = 0x04;
    /// RO: the number of pending causes. An ISR reads it to claim: non-zero means
    /// "mine".
    pub const STATUS: u16 = 0x08;
    /// WO: any write acknowledges one pending cause (ignored when none is pending).
    pub const ACK: u16 = 0x0c;
    /// WO: `n` adds `n` pending causes (1 when `n` is 0; the pending count
    /// saturates at [`super::MAX_PENDING`]) and raises the line (see module docs).
    pub const RAISE: u16 = 0x10;
    /// RO: total causes raised since reset (wraps at 2^32).
    pub const ASSERT_COUNT: u16 = 0x14;
    /// RO: total causes acknowledged since reset (wraps at 2^32).
    pub const ACK_COUNT: u16 = 0x18;
    /// RW: host-timed raising. Write `(count << 16) | period_us` to have the
    /// host raise one cause every `period_us` microseconds (at least
    /// [`super::MIN_TIMER_PERIOD_US`]), `count` times, from the VMM's event
    /// loop (another thread than the vCPU's). Writing 0 stops it. Reads return
    /// the number of raises still to come.
    pub const TIMER: u16 = 0x1c;
}

/// `CTRL` bit 0: interrupts enabled.
pub const CTRL_ENABLE: u32 = 1 << 0;
/// `CTRL` bit 1 (read-only): the device is level-triggered (clear: edge).
pub const CTRL_LEVEL: u32 = 1 << 1;

/// The top byte of the `ID` register.
pub const ID_MAGIC: u32 = 0xd5;
/// Saturation limit of the pending count.
pub const MAX_PENDING: u32 = 1 << 20;
/// Shortest period of the host timer.
pub const MIN_TIMER_PERIOD_US: u32 = 50;

/// The first port of test device `index`.
pub const fn device_port(index: u16) -> u16 {
    crate::layout::TESTDEV_BASE_PORT + index * crate::layout::TESTDEV_STRIDE
}

/// Decodes an `ID` register value into `(device id, line)`, or `None` when
/// no test device answered (all ones, or the magic is wrong).
pub const fn decode_id(value: u32) -> Option<(u8, u8)> {
    if value >> 24 != ID_MAGIC {
        return None;
    }
    Some(((value >> 16) as u8, value as u8))
}

/// Encodes an `ID` register value.
pub const fn encode_id(device: u8, line: u8) -> u32 {
    (ID_MAGIC << 24) | ((device as u32) << 16) | line as u32
}

// The port windows must not overlap: checked at compile time.
const _: () = {
    use crate::layout::{
        PV_DOORBELL_PORT, PV_DOORBELL_SIZE, TEST_MARKER_PORT, TESTDEV_MAX_DEVICES, TESTDEV_STRIDE,
    };
    assert!(device_port(TESTDEV_MAX_DEVICES - 1) + TESTDEV_STRIDE <= PV_DOORBELL_PORT);
    assert!(TEST_MARKER_PORT >= PV_DOORBELL_PORT + PV_DOORBELL_SIZE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_roundtrip_and_all_ones_rejected() {
        assert_eq!(decode_id(encode_id(3, 17)), Some((3, 17)));
        assert_eq!(decode_id(u32::MAX), None);
        assert_eq!(decode_id(0), None);
    }
}
