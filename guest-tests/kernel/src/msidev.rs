//! Driver of the message-signaled test devices (`irqconnect_abi::msidev`):
//! 32-bit registers at `device_port(j) + offset`.
//!
//! The host programs each message's address and data at CONNECT_EX and
//! clears them at DISCONNECT_EX; the guest raises, masks and reads back.
//! `SELECT` makes the per-message registers (`ADDRESS_*`, `DATA`, `SENT`)
//! a two-step access: callers that read them keep to one processor at a
//! time (the tests read them on the BSP while no other processor does).

use irqconnect_abi::layout::MSIDEV_MAX_DEVICES;
use irqconnect_abi::msidev::{ID_MAGIC, device_port, reg};

use crate::cpu;

/// Most messages one device's `MASK`/`PENDING` registers describe.
pub const MAX_MASKABLE: u32 = 32;

/// Message-signaled test device `index` (QUERY_MESSAGES' `test_device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiDev(u16);

impl MsiDev {
    /// Device `index`, when the port window has room for it.
    pub fn new(index: u32) -> Option<Self> {
        let index = u16::try_from(index).ok()?;
        (index < MSIDEV_MAX_DEVICES).then_some(Self(index))
    }

    /// The device's index in the port window.
    pub fn index(self) -> u32 {
        u32::from(self.0)
    }

    fn read(self, offset: u16) -> u32 {
        // SAFETY: a message-device register (or an unclaimed port reading
        // all ones); no memory effects.
        unsafe { cpu::inl(device_port(self.0) + offset) }
    }

    fn write(self, offset: u16, value: u32) {
        // SAFETY: a message-device register; no memory effects (the message
        // the device may send is an interrupt, not a memory write the guest
        // sees).
        unsafe { cpu::outl(device_port(self.0) + offset, value) }
    }

    /// `(device id, kind, message count)` from the ID register, `None`
    /// when nothing answers with the magic.
    pub fn id(self) -> Option<(u8, u32, u32)> {
        let v = self.read(reg::ID);
        (v != u32::MAX && v >> 24 == ID_MAGIC).then_some((
            v as u8,
            (v >> 8) & 0xff,
            (v >> 16) & 0xff,
        ))
    }

    /// Fires message `k`: sent when unmasked and programmed, pending when
    /// masked, dropped when it has no address.
    pub fn raise(self, k: u32) {
        self.write(reg::RAISE, k);
    }

    /// The mask bits (bit `k` masks message `k`).
    pub fn mask(self) -> u32 {
        self.read(reg::MASK)
    }

    /// Sets the mask bits; clearing the bit of a pending message sends it.
    pub fn set_mask(self, bits: u32) {
        self.write(reg::MASK, bits);
    }

    /// Messages that fired while masked and were not sent yet.
    pub fn pending(self) -> u32 {
        self.read(reg::PENDING)
    }

    fn select(self, k: u32) {
        self.write(reg::SELECT, k);
    }

    /// Message `k`'s address as the host programmed it (0: none).
    pub fn address(self, k: u32) -> u64 {
        self.select(k);
        u64::from(self.read(reg::ADDRESS_LO)) | (u64::from(self.read(reg::ADDRESS_HI)) << 32)
    }

    /// Message `k`'s data as the host programmed it.
    pub fn data(self, k: u32) -> u32 {
        self.select(k);
        self.read(reg::DATA)
    }

    /// Sends of message `k` since reset.
    pub fn sent(self, k: u32) -> u32 {
        self.select(k);
        self.read(reg::SENT)
    }

    /// Raises of any message dropped for want of an address.
    pub fn dropped(self) -> u32 {
        self.read(reg::DROPPED)
    }

    /// All `count` messages' mask bits.
    pub fn all(count: u32) -> u32 {
        if count >= MAX_MASKABLE {
            u32::MAX
        } else {
            (1u32 << count) - 1
        }
    }

    /// Quiets the device: every message masked, and a pending message
    /// whose address is gone (its connection was disconnected) unmasked
    /// once, which drops it. Returns the pending bits left (non-zero when a
    /// message is still programmed: its connection is still live).
    pub fn quiet(self, count: u32) -> u32 {
        let all = Self::all(count);
        self.set_mask(all);
        let pending = self.pending() & all;
        for k in (0..count.min(MAX_MASKABLE)).filter(|k| pending & (1 << k) != 0) {
            if self.address(k) == 0 {
                self.set_mask(all & !(1 << k));
                self.set_mask(all);
            }
        }
        self.pending() & all
    }
}
