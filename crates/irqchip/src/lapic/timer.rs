//! The local APIC timer (SDM Vol. 3A 11.5.4): one-shot, periodic and
//! TSC-deadline modes, computed from the caller's `now` with no clock of its
//! own.
//!
//! A countdown is kept as its start time plus the counts already consumed
//! before it (after a divide-configuration change), so the current count and
//! every expiry are exact functions of `now`: a periodic timer's k-th expiry
//! is `start + (k * initial - consumed) * divisor / bus_hz`, with no
//! accumulated rounding.

use super::spec::{
    DivideReg, LvtKind, LvtReg, TIMER_MODE_ONE_SHOT, TIMER_MODE_PERIODIC, TIMER_MODE_TSC_DEADLINE,
};
use super::{Lapic, TscClock, bump};

/// Nanoseconds per second.
pub(crate) const NS_PER_SEC: u128 = 1_000_000_000;

/// The timer mode of an LVT timer value (SDM Vol. 3A 11.5.4, Table 11-2).
/// The reserved encoding 11b runs as one-shot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

impl TimerMode {
    pub(crate) const fn of(lvt: LvtReg) -> Self {
        match lvt.timer_mode() {
            TIMER_MODE_ONE_SHOT => Self::OneShot,
            TIMER_MODE_PERIODIC => Self::Periodic,
            TIMER_MODE_TSC_DEADLINE => Self::TscDeadline,
            // TIMER_MODE_RESERVED
            _ => Self::OneShot,
        }
    }
}

/// A running one-shot or periodic countdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Countdown {
    /// When the countdown (re)started, in ns.
    pub(crate) start_ns: u64,
    /// Counts of the first period already consumed at `start_ns` (non-zero
    /// only after a divide-configuration change while counting).
    pub(crate) consumed: u32,
    /// Periods completed since `start_ns` (periodic mode).
    pub(crate) periods: u64,
}

/// Timer registers and countdown state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Timer {
    /// Initial-count register.
    pub(crate) initial_count: u32,
    /// Divide-configuration register.
    pub(crate) divide: DivideReg,
    /// The running countdown (one-shot, periodic), if any.
    pub(crate) countdown: Option<Countdown>,
    /// IA32_TSC_DEADLINE; 0 when disarmed.
    pub(crate) tsc_deadline: u64,
    /// `tsc_deadline` converted to ns when it was armed.
    pub(crate) tsc_deadline_ns: u64,
}

impl Lapic {
    fn timer_mode(&self) -> TimerMode {
        TimerMode::of(self.lvt(LvtKind::Timer))
    }

    fn bus_hz(&self) -> u128 {
        u128::from(self.config.bus_hz.max(1))
    }

    /// Nanoseconds for `counts` timer counts at the current divisor, rounded up.
    fn counts_to_ns(&self, counts: u128) -> u128 {
        let divisor = u128::from(self.timer.divide.divisor());
        counts
            .saturating_mul(divisor * NS_PER_SEC)
            .div_ceil(self.bus_hz())
    }

    /// Whole timer counts elapsed in `ns` at the current divisor.
    fn ns_to_counts(&self, ns: u64) -> u128 {
        let divisor = u128::from(self.timer.divide.divisor());
        u128::from(ns).saturating_mul(self.bus_hz()) / (NS_PER_SEC * divisor)
    }

    /// Counts consumed since the countdown began (its first period included).
    fn counts_consumed(&self, cd: &Countdown, now: u64) -> u128 {
        u128::from(cd.consumed) + self.ns_to_counts(now.saturating_sub(cd.start_ns))
    }

    /// When the countdown's current period ends.
    fn countdown_expiry(&self, cd: &Countdown) -> u64 {
        let initial = u128::from(self.timer.initial_count);
        let counts = (u128::from(cd.periods) + 1) * initial;
        let ns = self.counts_to_ns(counts.saturating_sub(u128::from(cd.consumed)));
        u64::try_from(u128::from(cd.start_ns) + ns).unwrap_or(u64::MAX)
    }

    /// The next time the timer expires, if armed: the caller sleeps until
    /// then and calls [`Lapic::tick`]. Reported whether or not the LVT timer
    /// is masked (an expiry still disarms a one-shot or TSC-deadline timer).
    pub fn next_deadline(&self) -> Option<u64> {
        if !self.hw_enabled() {
            return None;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                (self.timer.tsc_deadline != 0).then_some(self.timer.tsc_deadline_ns)
            }
            TimerMode::OneShot | TimerMode::Periodic => {
                let cd = self.timer.countdown?;
                (self.timer.initial_count != 0).then(|| self.countdown_expiry(&cd))
            }
        }
    }

    /// The vector the timer requests when it fires: the LVT timer's, or
    /// `None` while that entry is masked (an expiry then requests nothing).
    pub fn timer_vector(&self) -> Option<u8> {
        let lvt = self.lvt(LvtKind::Timer);
        (!lvt.masked()).then_some(lvt.vector())
    }

    /// Fires the timer if it is due at `now`: the LVT timer vector is
    /// requested unless masked; a periodic timer re-arms from its start time,
    /// a one-shot or TSC-deadline timer disarms. Returns whether it expired.
    pub fn tick(&mut self, now: u64) -> bool {
        let Some(deadline) = self.next_deadline() else {
            return false;
        };
        if now < deadline {
            return false;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => self.timer.tsc_deadline = 0,
            TimerMode::OneShot => self.timer.countdown = None,
            TimerMode::Periodic => {
                let initial = u128::from(self.timer.initial_count);
                if let Some(mut cd) = self.timer.countdown {
                    // The period that contains `now` ends after `now`: see the
                    // module docs for why `consumed / initial` indexes it.
                    let index = self.counts_consumed(&cd, now) / initial.max(1);
                    let index = u64::try_from(index).unwrap_or(u64::MAX);
                    let missed = index.saturating_sub(cd.periods).saturating_sub(1);
                    self.counters.timer_missed_periods =
                        self.counters.timer_missed_periods.saturating_add(missed);
                    cd.periods = index.max(cd.periods.saturating_add(1));
                    self.timer.countdown = Some(cd);
                }
            }
        }
        bump(&mut self.counters.timer_expirations);
        let _ = self.deliver_lvt(LvtKind::Timer);
        true
    }

    /// The current-count register at `now` (SDM Vol. 3A 11.5.4): 0 when
    /// stopped, expired (one-shot) or in TSC-deadline mode.
    pub(crate) fn timer_current_count(&self, now: u64) -> u32 {
        let initial = u128::from(self.timer.initial_count);
        let Some(cd) = self.timer.countdown else {
            return 0;
        };
        if initial == 0 {
            return 0;
        }
        let consumed = self.counts_consumed(&cd, now);
        let remaining = match self.timer_mode() {
            TimerMode::TscDeadline => 0,
            // The count left in the current period: a one-shot that was
            // switched from periodic runs out where that period ends.
            TimerMode::OneShot => {
                let earlier_periods = u128::from(cd.periods).saturating_mul(initial);
                initial.saturating_sub(consumed.saturating_sub(earlier_periods))
            }
            TimerMode::Periodic => initial - consumed % initial,
        };
        u32::try_from(remaining).unwrap_or(u32::MAX)
    }

    /// Initial-count write (SDM Vol. 3A 11.5.4): (re)starts the countdown, 0
    /// stops it; ignored in TSC-deadline mode (11.5.4.1).
    pub(crate) fn write_initial_count(&mut self, value: u32, now: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        self.timer.initial_count = value;
        self.timer.countdown = (value != 0).then_some(Countdown {
            start_ns: now,
            consumed: 0,
            periods: 0,
        });
    }

    /// Divide-configuration write: a running countdown keeps its current
    /// count and continues at the new rate.
    pub(crate) fn write_divide(&mut self, divide: DivideReg, now: u64) {
        let remaining = self.timer_current_count(now);
        self.timer.divide = divide;
        if let Some(cd) = self.timer.countdown.as_mut() {
            cd.start_ns = now;
            cd.consumed = self.timer.initial_count.saturating_sub(remaining);
            cd.periods = 0;
            if remaining == 0 {
                self.timer.countdown = None;
            }
        }
    }

    /// LVT timer write. A change into or out of TSC-deadline mode disarms
    /// the timer and clears the initial count; a change between one-shot and
    /// periodic leaves the countdown and the initial count alone, as KVM's
    /// `apic_update_lvtt` does (the [module documentation](super) says how
    /// this departs from the SDM's wording). The caller has already ticked
    /// the timer at the time of the write, in the old mode, so a countdown
    /// that ran out before the write has fired and stopped (one-shot) or
    /// reloaded (periodic). From here: a periodic countdown switched to
    /// one-shot runs out at the end of its current period and stops; a
    /// one-shot switched to periodic reloads from the initial count when it
    /// reaches zero; a one-shot that already stopped stays at zero.
    pub(crate) fn lvt_timer_written(&mut self, old: LvtReg, new: LvtReg) {
        let deadline = |lvt| TimerMode::of(lvt) == TimerMode::TscDeadline;
        if deadline(old) != deadline(new) {
            self.timer.countdown = None;
            self.timer.initial_count = 0;
            self.timer.tsc_deadline = 0;
        }
    }

    /// Offers TSC-deadline mode from now on, with `tsc` as the guest's TSC:
    /// for a VMM that learns the guest TSC only once the vCPU exists
    /// (KVM_GET_TSC_KHZ, IA32_TSC through KVM_GET_MSRS), creates the LAPIC
    /// without one and calls this before the vCPU first runs. Calling it
    /// again corrects the clock: an armed deadline is converted anew.
    pub fn set_tsc_clock(&mut self, tsc: TscClock) {
        self.config.tsc = Some(tsc);
        if self.timer.tsc_deadline != 0 {
            self.timer.tsc_deadline_ns = tsc.ns_at(self.timer.tsc_deadline);
        }
    }

    /// IA32_TSC_DEADLINE read: the armed deadline, 0 when disarmed or not in
    /// TSC-deadline mode (SDM Vol. 3A 11.5.4.1).
    pub(crate) fn read_tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.timer.tsc_deadline
        } else {
            0
        }
    }

    /// IA32_TSC_DEADLINE write: arms (non-zero) or disarms (0); ignored
    /// outside TSC-deadline mode (SDM Vol. 3A 11.5.4.1). A deadline already
    /// passed fires at once.
    pub(crate) fn write_tsc_deadline(&mut self, value: u64, now: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        let Some(tsc) = self.config.tsc else {
            return;
        };
        self.timer.tsc_deadline = value;
        self.timer.tsc_deadline_ns = tsc.ns_at(value);
        if value != 0 {
            let _ = self.tick(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::spec::{
        IA32_TSC_DEADLINE, REG_LVT_TIMER, REG_TIMER_CURRENT, REG_TIMER_DIVIDE, REG_TIMER_INITIAL,
    };
    use super::super::test_support::*;
    use super::super::{LapicConfig, TscClock};
    use super::*;

    const ONE_SHOT_VEC: u32 = 0xec;
    const PERIODIC: u32 = 1 << 17;
    const DEADLINE: u32 = 2 << 17;
    const DIV_1: u32 = 0b1011;

    #[test]
    fn one_shot_expired_sets_irr_of_timer_vector() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 500);
        // Act
        let fired = lapic.tick(1500);
        // Assert
        assert!(fired);
        assert!(lapic.is_requested(0xec));
        assert_eq!(lapic.next_deadline(), None);
    }

    #[test]
    fn timer_vector_is_the_lvt_vector_unless_masked() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act / Assert
        assert_eq!(lapic.timer_vector(), None, "reset state is masked");
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        assert_eq!(lapic.timer_vector(), Some(0xec));
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC | 1 << 16);
        assert_eq!(lapic.timer_vector(), None);
    }

    #[test]
    fn one_shot_before_deadline_does_not_fire() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 500);
        // Act
        let fired = lapic.tick(1499);
        // Assert
        assert!(!fired);
        assert!(!lapic.is_requested(0xec));
        assert_eq!(lapic.next_deadline(), Some(1500));
    }

    #[test]
    fn one_shot_divide_by_16_scales_deadline() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, 0b0011);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        // Act
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 100, 0);
        // Assert: 100 counts * 16 ns at 1 GHz.
        assert_eq!(lapic.next_deadline(), Some(1600));
    }

    #[test]
    fn current_count_midway_reads_remaining() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, 0b0000);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 0);
        // Act: divide by 2, 600 ns = 300 counts.
        let current = read32(&mut lapic, REG_TIMER_CURRENT, 600);
        // Assert
        assert_eq!(current, 700);
    }

    #[test]
    fn current_count_after_one_shot_expiry_reads_zero() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 10, 0);
        // Act
        let current = read32(&mut lapic, REG_TIMER_CURRENT, 50);
        // Assert
        assert_eq!(current, 0);
    }

    #[test]
    fn initial_count_zero_stops_timer() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 10, 0);
        // Act
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 0, 5);
        // Assert
        assert_eq!(lapic.next_deadline(), None);
        assert!(!lapic.tick(1_000_000));
    }

    #[test]
    fn periodic_rearms_without_drift() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xec);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 100);
        // Act: tick late each time; the next deadline stays on the grid.
        let _ = lapic.tick(1137);
        let second = lapic.next_deadline();
        let _ = lapic.tick(2100);
        let third = lapic.next_deadline();
        // Assert
        assert_eq!(second, Some(2100));
        assert_eq!(third, Some(3100));
    }

    #[test]
    fn periodic_missed_periods_coalesce_and_count() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xec);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 100, 0);
        // Act: 3.5 periods pass before the first tick.
        let fired = lapic.tick(350);
        // Assert
        assert!(fired);
        assert_eq!(lapic.counters().timer_expirations, 1);
        assert_eq!(lapic.counters().timer_missed_periods, 2);
        assert_eq!(lapic.next_deadline(), Some(400));
    }

    #[test]
    fn periodic_current_count_wraps_each_period() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xec);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 100, 0);
        // Act
        let current = read32(&mut lapic, REG_TIMER_CURRENT, 230);
        // Assert
        assert_eq!(current, 70);
    }

    #[test]
    fn masked_timer_expires_without_irr() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, (1 << 16) | 0xec);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 10, 0);
        // Act
        let fired = lapic.tick(10);
        // Assert
        assert!(fired);
        assert!(!lapic.is_requested(0xec));
    }

    #[test]
    fn divide_change_while_counting_keeps_current_count() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 0);
        // Act: 400 counts consumed, 600 left, now at divide-by-2.
        let _ = write32(&mut lapic, REG_TIMER_DIVIDE, 0b0000, 400);
        // Assert
        assert_eq!(read32(&mut lapic, REG_TIMER_CURRENT, 400), 600);
        assert_eq!(lapic.next_deadline(), Some(400 + 1200));
    }

    #[test]
    fn lvt_timer_one_shot_to_periodic_keeps_counting_then_reloads() {
        // Arrange: 1000 counts of 1 ns from time 0.
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 0);
        // Act: periodic at 400, 600 counts left.
        let _ = write32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xec, 400);
        let after_switch = read32(&mut lapic, REG_TIMER_CURRENT, 400);
        let deadline = lapic.next_deadline();
        let fired = lapic.tick(1000);
        let reloaded = read32(&mut lapic, REG_TIMER_CURRENT, 1250);
        // Assert
        assert_eq!(after_switch, 600);
        assert_eq!(deadline, Some(1000));
        assert!(fired);
        assert!(lapic.is_requested(0xec));
        assert_eq!(reloaded, 750);
        assert_eq!(lapic.next_deadline(), Some(2000));
        assert_eq!(read32(&mut lapic, REG_TIMER_INITIAL, 1250), 1000);
    }

    #[test]
    fn lvt_timer_periodic_to_one_shot_counts_to_zero_and_stops() {
        // Arrange: periodic, 1000 counts; the first period ends at 1000.
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xec);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 0);
        let _ = lapic.tick(1000);
        let _ = lapic.acknowledge();
        let _ = lapic.eoi();
        // Act: one-shot at 1300, in the second period.
        let _ = write32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC, 1300);
        let after_switch = read32(&mut lapic, REG_TIMER_CURRENT, 1300);
        let deadline = lapic.next_deadline();
        let fired = lapic.tick(2000);
        // Assert: 700 left, fires once at the end of that period, then 0.
        assert_eq!(after_switch, 700);
        assert_eq!(deadline, Some(2000));
        assert!(fired);
        assert!(lapic.is_requested(0xec));
        assert_eq!(lapic.next_deadline(), None);
        assert_eq!(read32(&mut lapic, REG_TIMER_CURRENT, 2500), 0);
        assert_eq!(read32(&mut lapic, REG_TIMER_INITIAL, 2500), 1000);
    }

    #[test]
    fn lvt_timer_expired_one_shot_to_periodic_stays_zero() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 100, 0);
        let _ = lapic.tick(100);
        // Act
        let _ = write32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xec, 150);
        // Assert
        assert_eq!(read32(&mut lapic, REG_TIMER_CURRENT, 150), 0);
        assert_eq!(lapic.next_deadline(), None);
        assert!(!lapic.tick(10_000));
        assert_eq!(read32(&mut lapic, REG_TIMER_INITIAL, 150), 100);
    }

    #[test]
    fn lvt_timer_due_one_shot_fires_in_old_mode_before_switch() {
        // Arrange: a one-shot due at 100 that nobody ticked.
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 100, 0);
        // Act: periodic with another vector at 150.
        let _ = write32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xd0, 150);
        // Assert: it fired on its old vector and stopped at zero.
        assert!(lapic.is_requested(0xec));
        assert!(!lapic.is_requested(0xd0));
        assert_eq!(lapic.next_deadline(), None);
        assert_eq!(read32(&mut lapic, REG_TIMER_CURRENT, 150), 0);
    }

    #[test]
    fn lvt_timer_vector_change_same_mode_keeps_countdown() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xec);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 0);
        // Act
        let _ = write32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xd0, 300);
        // Assert
        assert_eq!(lapic.next_deadline(), Some(1000));
        assert!(lapic.tick(1000));
        assert!(lapic.is_requested(0xd0));
    }

    #[test]
    fn lvt_timer_into_tsc_deadline_disarms_and_clears_initial_count() {
        // Arrange
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 0);
        // Act
        let _ = write32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec, 10);
        let in_deadline = (
            lapic.next_deadline(),
            read32(&mut lapic, REG_TIMER_INITIAL, 10),
        );
        let _ = write32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC, 20);
        // Assert: nothing left to count after the round trip either.
        assert_eq!(in_deadline, (None, 0));
        assert_eq!(read32(&mut lapic, REG_TIMER_INITIAL, 20), 0);
        assert_eq!(read32(&mut lapic, REG_TIMER_CURRENT, 20), 0);
        assert!(!lapic.tick(10_000));
    }

    #[test]
    fn lvt_timer_out_of_tsc_deadline_disarms_deadline() {
        // Arrange: a deadline armed for 5000 ns.
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec);
        let _ = lapic.msr_write(IA32_TSC_DEADLINE, 1000 + 2 * 5000, 0);
        // Act
        let _ = write32(&mut lapic, REG_LVT_TIMER, PERIODIC | 0xec, 10);
        let _ = write32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec, 20);
        // Assert
        assert_eq!(lapic.msr_read(IA32_TSC_DEADLINE, 20), Ok(0));
        assert_eq!(lapic.next_deadline(), None);
        assert!(!lapic.tick(10_000));
        assert!(!lapic.is_requested(0xec));
    }

    #[test]
    fn lvt_timer_one_shot_to_reserved_mode_keeps_counting() {
        // Arrange: mode 11b (reserved, runs as one-shot) is writable by
        // MMIO when bit 18 exists, i.e. with TSC-deadline support.
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 0);
        // Act
        let _ = write32(&mut lapic, REG_LVT_TIMER, (3 << 17) | 0xec, 400);
        // Assert: not a TSC-deadline transition.
        assert_eq!(read32(&mut lapic, REG_TIMER_CURRENT, 400), 600);
        assert_eq!(lapic.next_deadline(), Some(1000));
    }

    #[test]
    fn bus_clock_100mhz_scales_deadline() {
        // Arrange
        let mut config = LapicConfig::new(0, true);
        config.bus_hz = 100_000_000;
        let mut lapic = Lapic::new(config);
        set32(&mut lapic, super::super::spec::REG_SVR, 0x1ff);
        set32(&mut lapic, REG_TIMER_DIVIDE, DIV_1);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        // Act
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 5, 0);
        // Assert: 5 counts of 10 ns.
        assert_eq!(lapic.next_deadline(), Some(50));
    }

    #[test]
    fn tsc_deadline_fires_when_tsc_reaches_value() {
        // Arrange: TSC 2 GHz, 1000 at time zero.
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec);
        // Act
        let write = lapic.msr_write(IA32_TSC_DEADLINE, 1000 + 2 * 5000, 0);
        let early = lapic.tick(4999);
        let due = lapic.tick(5000);
        // Assert
        assert_eq!(write, Ok(None));
        assert!(!early);
        assert!(due);
        assert!(lapic.is_requested(0xec));
        assert_eq!(lapic.msr_read(IA32_TSC_DEADLINE, 5000), Ok(0));
    }

    #[test]
    fn tsc_deadline_in_past_fires_on_write() {
        // Arrange
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec);
        // Act
        let _ = lapic.msr_write(IA32_TSC_DEADLINE, 1, 100);
        // Assert
        assert!(lapic.is_requested(0xec));
        assert_eq!(lapic.next_deadline(), None);
    }

    #[test]
    fn tsc_deadline_write_outside_deadline_mode_ignored() {
        // Arrange
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_LVT_TIMER, ONE_SHOT_VEC);
        // Act
        let _ = lapic.msr_write(IA32_TSC_DEADLINE, 1_000_000, 0);
        // Assert
        assert_eq!(lapic.msr_read(IA32_TSC_DEADLINE, 0), Ok(0));
        assert_eq!(lapic.next_deadline(), None);
    }

    #[test]
    fn tsc_deadline_mode_initial_count_write_ignored() {
        // Arrange
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec);
        // Act
        let _ = write32(&mut lapic, REG_TIMER_INITIAL, 1000, 0);
        // Assert
        assert_eq!(read32(&mut lapic, REG_TIMER_INITIAL, 0), 0);
        assert_eq!(lapic.next_deadline(), None);
    }

    #[test]
    fn tsc_deadline_without_tsc_config_faults() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let result = lapic.msr_write(IA32_TSC_DEADLINE, 5, 0);
        // Assert
        assert_eq!(result, Err(super::super::Gp::Unsupported));
    }

    #[test]
    fn tsc_deadline_mode_bit_without_tsc_config_not_writable() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        set32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec);
        // Assert
        assert_eq!(read32(&mut lapic, REG_LVT_TIMER, 0), 0xec);
    }

    #[test]
    fn set_tsc_clock_without_config_enables_deadline_mode() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        lapic.set_tsc_clock(TscClock {
            hz: 1_000_000_000,
            tsc_at_zero: 500,
        });
        set32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec);
        let write = lapic.msr_write(IA32_TSC_DEADLINE, 500 + 2000, 0);
        // Assert
        assert_eq!(read32(&mut lapic, REG_LVT_TIMER, 0), DEADLINE | 0xec);
        assert_eq!(write, Ok(None));
        assert_eq!(lapic.next_deadline(), Some(2000));
    }

    #[test]
    fn set_tsc_clock_armed_deadline_converted_again() {
        // Arrange: TSC 2 GHz, 1000 at zero; deadline at TSC 11000 = 5000 ns.
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec);
        let _ = lapic.msr_write(IA32_TSC_DEADLINE, 11_000, 0);
        // Act: the TSC is at 1 GHz from 1000 after all.
        lapic.set_tsc_clock(TscClock {
            hz: 1_000_000_000,
            tsc_at_zero: 1000,
        });
        // Assert
        assert_eq!(lapic.next_deadline(), Some(10_000));
        assert_eq!(lapic.msr_read(IA32_TSC_DEADLINE, 0), Ok(11_000));
    }

    #[test]
    fn timer_with_clock_config_tsc_zero_hz_does_not_panic() {
        // Arrange
        let config = LapicConfig::new(0, true).with_tsc(TscClock {
            hz: 0,
            tsc_at_zero: 0,
        });
        let mut lapic = Lapic::new(config);
        set32(&mut lapic, super::super::spec::REG_SVR, 0x1ff);
        set32(&mut lapic, REG_LVT_TIMER, DEADLINE | 0xec);
        // Act
        let _ = lapic.msr_write(IA32_TSC_DEADLINE, u64::MAX, 0);
        // Assert
        assert_eq!(lapic.next_deadline(), Some(u64::MAX));
    }
}
