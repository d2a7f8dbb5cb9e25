//! Driver of the interrupt-source test devices (`irqconnect_abi::testdev`):
//! 32-bit registers at `device_port(i) + offset`.

use irqconnect_abi::layout::TESTDEV_MAX_DEVICES;
use irqconnect_abi::testdev::{CTRL_ENABLE, CTRL_LEVEL, decode_id, device_port, reg};

use crate::cpu;

/// Test device `index` (0-based, the PV device id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestDev(u16);

impl TestDev {
    /// Device `index`, when the port window has room for it.
    pub fn new(index: u32) -> Option<Self> {
        let index = u16::try_from(index).ok()?;
        (index < TESTDEV_MAX_DEVICES).then_some(Self(index))
    }

    /// The device id.
    pub fn index(self) -> u32 {
        u32::from(self.0)
    }

    fn read(self, offset: u16) -> u32 {
        // SAFETY: a test-device register (or an unclaimed port reading all
        // ones); no memory effects.
        unsafe { cpu::inl(device_port(self.0) + offset) }
    }

    fn write(self, offset: u16, value: u32) {
        // SAFETY: a test-device register; no memory effects.
        unsafe { cpu::outl(device_port(self.0) + offset, value) }
    }

    /// `(device id, line)` from the ID register, `None` when nothing answers.
    pub fn id(self) -> Option<(u8, u8)> {
        decode_id(self.read(reg::ID))
    }

    /// True when the device is level-triggered (CTRL bit 1).
    pub fn is_level(self) -> bool {
        self.read(reg::CTRL) & CTRL_LEVEL != 0
    }

    /// Enables or disables the device's interrupt.
    pub fn enable(self, on: bool) {
        self.write(reg::CTRL, if on { CTRL_ENABLE } else { 0 });
    }

    /// Pending causes (an ISR reads this to claim: non-zero means "mine").
    pub fn status(self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Acknowledges one pending cause.
    pub fn ack(self) {
        self.write(reg::ACK, 1);
    }

    /// Adds `n` pending causes (at least 1) and raises the line.
    pub fn raise(self, n: u32) {
        self.write(reg::RAISE, n);
    }

    /// Total causes raised since reset.
    pub fn assert_count(self) -> u32 {
        self.read(reg::ASSERT_COUNT)
    }

    /// Total causes acknowledged since reset.
    pub fn ack_count(self) -> u32 {
        self.read(reg::ACK_COUNT)
    }

    /// Has the host raise one cause every `period_us` (>= 50), `count` times.
    pub fn timer_start(self, count: u16, period_us: u16) {
        self.write(reg::TIMER, (u32::from(count) << 16) | u32::from(period_us));
    }

    /// Stops the host timer.
    pub fn timer_stop(self) {
        self.write(reg::TIMER, 0);
    }

    /// Raises still to come from the host timer.
    pub fn timer_remaining(self) -> u32 {
        self.read(reg::TIMER)
    }

    /// Acknowledges every pending cause (at most `limit`); returns how many.
    pub fn drain(self, limit: u32) -> u32 {
        let mut acked = 0;
        while acked < limit {
            let pending = self.status();
            if pending == 0 || pending == u32::MAX {
                break;
            }
            for _ in 0..pending.min(limit - acked) {
                self.ack();
                acked += 1;
            }
        }
        acked
    }
}
