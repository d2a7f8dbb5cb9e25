//! The interrupt-source test device model (register map in
//! `irqconnect_abi::testdev`). Pure: no threads, no clocks, no KVM. The line
//! goes out through a [`LineSink`]; the host timer is a value the caller
//! arms ([`TimerCommand`]) and ticks ([`TestDevice::timer_expired`]).

use std::time::Duration;

use irqconnect_abi::testdev::{
    CTRL_ENABLE, CTRL_LEVEL, MAX_PENDING, MIN_TIMER_PERIOD_US, encode_id, reg,
};

use irqchip::apic_bus::TriggerMode;
use irqchip_kvm::LineSink;

/// One test device as the device table (the PnP manager) assigns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TestdevSpec {
    /// The device id: test device `index` at `device_port(index)`.
    pub(crate) index: u8,
    /// The IOAPIC pin it drives (its first resource's pin).
    pub(crate) pin: u8,
    /// Level (holds the line high while enabled with causes pending) for a
    /// level-sensitive resource; edge (one rising edge per raise) for a
    /// latched one.
    pub(crate) trigger: TriggerMode,
}

/// What the caller must do with the device's host timer after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerCommand {
    /// Fire every `period` until told otherwise.
    Start {
        /// Interval between raises.
        period: Duration,
    },
    /// Disarm.
    Stop,
}

/// One test device. Its snapshot state is the value itself (serde).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TestDevice {
    index: u8,
    line: u8,
    trigger: TriggerMode,
    enabled: bool,
    pending: u32,
    assert_count: u32,
    ack_count: u32,
    timer_remaining: u32,
    /// The level this device drives its line to.
    line_high: bool,
}

impl TestDevice {
    /// Whether this device is the one `spec` describes (a restored state
    /// must be).
    pub(crate) fn matches(&self, spec: TestdevSpec) -> bool {
        (self.index, self.line, self.trigger) == (spec.index, spec.pin, spec.trigger)
    }

    /// The device `spec` describes.
    pub(crate) fn from_spec(spec: TestdevSpec) -> Self {
        Self::new(spec.index, spec.pin, spec.trigger)
    }

    /// Device `index` on IOAPIC pin `line`.
    pub(crate) fn new(index: u8, line: u8, trigger: TriggerMode) -> Self {
        Self {
            index,
            line,
            trigger,
            enabled: false,
            pending: 0,
            assert_count: 0,
            ack_count: 0,
            timer_remaining: 0,
            line_high: false,
        }
    }

    /// A 32-bit register read.
    pub(crate) fn read(&self, offset: u16) -> u32 {
        match offset {
            reg::ID => encode_id(self.index, self.line),
            reg::CTRL => {
                let mut v = 0;
                if self.enabled {
                    v |= CTRL_ENABLE;
                }
                if self.trigger == TriggerMode::Level {
                    v |= CTRL_LEVEL;
                }
                v
            }
            reg::STATUS => self.pending,
            reg::ASSERT_COUNT => self.assert_count,
            reg::ACK_COUNT => self.ack_count,
            reg::TIMER => self.timer_remaining,
            _ => u32::MAX,
        }
    }

    /// A 32-bit register write; returns what to do with the host timer.
    pub(crate) fn write(
        &mut self,
        offset: u16,
        value: u32,
        sink: &mut dyn LineSink,
    ) -> Option<TimerCommand> {
        match offset {
            reg::CTRL => {
                let enable = value & CTRL_ENABLE != 0;
                if enable != self.enabled {
                    self.enabled = enable;
                    match self.trigger {
                        TriggerMode::Level => self.update_level(sink),
                        TriggerMode::Edge if enable && self.pending > 0 => pulse(sink),
                        TriggerMode::Edge => {}
                    }
                }
                None
            }
            reg::ACK => {
                self.ack();
                self.update_level(sink);
                None
            }
            reg::RAISE => {
                self.raise(value.max(1), sink);
                None
            }
            reg::TIMER => {
                let count = value >> 16;
                let period_us = (value & 0xffff).max(MIN_TIMER_PERIOD_US);
                if count == 0 {
                    self.timer_remaining = 0;
                    Some(TimerCommand::Stop)
                } else {
                    self.timer_remaining = count;
                    Some(TimerCommand::Start {
                        period: Duration::from_micros(u64::from(period_us)),
                    })
                }
            }
            // ID, STATUS and the counters are read-only.
            _ => None,
        }
    }

    /// The host timer fired `expirations` times; raises one cause per
    /// expiration while the programmed count lasts. Returns
    /// [`TimerCommand::Stop`] once the count is used up.
    pub(crate) fn timer_expired(
        &mut self,
        expirations: u64,
        sink: &mut dyn LineSink,
    ) -> Option<TimerCommand> {
        if self.timer_remaining == 0 {
            return Some(TimerCommand::Stop);
        }
        let n = u32::try_from(expirations)
            .unwrap_or(u32::MAX)
            .min(self.timer_remaining);
        for _ in 0..n {
            self.raise(1, sink);
        }
        self.timer_remaining -= n;
        (self.timer_remaining == 0).then_some(TimerCommand::Stop)
    }

    fn raise(&mut self, n: u32, sink: &mut dyn LineSink) {
        self.pending = self.pending.saturating_add(n).min(MAX_PENDING);
        self.assert_count = self.assert_count.wrapping_add(n);
        match self.trigger {
            TriggerMode::Level => self.update_level(sink),
            TriggerMode::Edge if self.enabled => pulse(sink),
            TriggerMode::Edge => {}
        }
    }

    fn ack(&mut self) {
        if self.pending > 0 {
            self.pending -= 1;
            self.ack_count = self.ack_count.wrapping_add(1);
        }
    }

    /// Level devices: line = enabled && pending; only changes go out.
    fn update_level(&mut self, sink: &mut dyn LineSink) {
        if self.trigger != TriggerMode::Level {
            return;
        }
        let high = self.enabled && self.pending > 0;
        if high != self.line_high {
            self.line_high = high;
            sink.set_level(high);
        }
    }
}

fn pulse(sink: &mut dyn LineSink) {
    sink.set_level(true);
    sink.set_level(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqconnect_abi::testdev::decode_id;

    #[derive(Default)]
    struct Rec(Vec<bool>);
    impl LineSink for Rec {
        fn set_level(&mut self, high: bool) {
            self.0.push(high);
        }
    }

    fn dev(trigger: TriggerMode) -> (TestDevice, Rec) {
        (TestDevice::new(2, 18, trigger), Rec::default())
    }

    #[test]
    fn id_and_ctrl_describe_the_device() {
        let (d, _) = dev(TriggerMode::Level);
        assert_eq!(decode_id(d.read(reg::ID)), Some((2, 18)));
        assert_eq!(d.read(reg::CTRL), CTRL_LEVEL);
        let (e, _) = dev(TriggerMode::Edge);
        assert_eq!(e.read(reg::CTRL), 0);
        assert_eq!(e.read(0x40), u32::MAX);
    }

    #[test]
    fn level_enabled_raise_holds_line_until_last_ack() {
        let (mut d, mut s) = dev(TriggerMode::Level);
        d.write(reg::CTRL, CTRL_ENABLE, &mut s);
        d.write(reg::RAISE, 2, &mut s);
        assert_eq!(s.0, vec![true]);
        assert_eq!(d.read(reg::STATUS), 2);
        d.write(reg::ACK, 0, &mut s);
        assert_eq!(s.0, vec![true]);
        d.write(reg::ACK, 0, &mut s);
        assert_eq!(s.0, vec![true, false]);
        assert_eq!(d.read(reg::ASSERT_COUNT), 2);
        assert_eq!(d.read(reg::ACK_COUNT), 2);
    }

    #[test]
    fn level_disabled_raise_waits_for_enable() {
        let (mut d, mut s) = dev(TriggerMode::Level);
        d.write(reg::RAISE, 0, &mut s); // 0 means 1
        assert!(s.0.is_empty());
        assert_eq!(d.pending, 1);
        d.write(reg::CTRL, CTRL_ENABLE, &mut s);
        assert_eq!(s.0, vec![true]);
        d.write(reg::CTRL, 0, &mut s);
        assert_eq!(s.0, vec![true, false]);
    }

    #[test]
    fn edge_raise_pulses_once_per_write() {
        let (mut d, mut s) = dev(TriggerMode::Edge);
        d.write(reg::CTRL, CTRL_ENABLE, &mut s);
        d.write(reg::RAISE, 3, &mut s);
        d.write(reg::RAISE, 1, &mut s);
        assert_eq!(s.0, vec![true, false, true, false]);
        assert_eq!(d.read(reg::STATUS), 4);
    }

    #[test]
    fn edge_enable_with_pending_pulses() {
        let (mut d, mut s) = dev(TriggerMode::Edge);
        d.write(reg::RAISE, 1, &mut s);
        assert!(s.0.is_empty());
        d.write(reg::CTRL, CTRL_ENABLE, &mut s);
        assert_eq!(s.0, vec![true, false]);
    }

    #[test]
    fn ack_without_pending_is_ignored() {
        let (mut d, mut s) = dev(TriggerMode::Level);
        d.write(reg::ACK, 0, &mut s);
        assert_eq!(d.read(reg::ACK_COUNT), 0);
        assert!(s.0.is_empty());
    }

    #[test]
    fn pending_saturates_but_assert_count_counts_all() {
        let (mut d, mut s) = dev(TriggerMode::Level);
        d.write(reg::RAISE, MAX_PENDING, &mut s);
        d.write(reg::RAISE, 5, &mut s);
        assert_eq!(d.read(reg::STATUS), MAX_PENDING);
        assert_eq!(d.read(reg::ASSERT_COUNT), MAX_PENDING + 5);
    }

    #[test]
    fn timer_program_clamps_period_and_counts_down() {
        let (mut d, mut s) = dev(TriggerMode::Edge);
        d.write(reg::CTRL, CTRL_ENABLE, &mut s);
        let cmd = d.write(reg::TIMER, (3 << 16) | 10, &mut s);
        assert_eq!(
            cmd,
            Some(TimerCommand::Start {
                period: Duration::from_micros(u64::from(MIN_TIMER_PERIOD_US))
            })
        );
        assert_eq!(d.read(reg::TIMER), 3);
        assert_eq!(d.timer_expired(1, &mut s), None);
        assert_eq!(d.timer_expired(5, &mut s), Some(TimerCommand::Stop));
        assert_eq!(d.read(reg::TIMER), 0);
        assert_eq!(d.read(reg::ASSERT_COUNT), 3);
        assert_eq!(s.0.len(), 6);
    }

    #[test]
    fn timer_write_zero_stops() {
        let (mut d, mut s) = dev(TriggerMode::Level);
        d.write(reg::TIMER, (10 << 16) | 100, &mut s);
        assert_eq!(d.write(reg::TIMER, 0, &mut s), Some(TimerCommand::Stop));
        assert_eq!(d.timer_expired(1, &mut s), Some(TimerCommand::Stop));
        assert_eq!(d.read(reg::ASSERT_COUNT), 0);
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let (mut d, mut s) = dev(TriggerMode::Level);
        d.write(reg::ASSERT_COUNT, 9, &mut s);
        d.write(reg::STATUS, 9, &mut s);
        d.write(reg::ID, 9, &mut s);
        assert_eq!(d.read(reg::STATUS), 0);
        assert_eq!(d.read(reg::ASSERT_COUNT), 0);
    }
}
