//! Rate limiting for guest-triggerable warnings: a short burst, then at most
//! one message per interval, telling how many were suppressed meanwhile.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Messages let through before the limit applies.
const BURST: u32 = 5;
/// At most one message per this interval after the burst.
const INTERVAL: Duration = Duration::from_secs(1);

/// A per-call-site limiter.
pub(crate) struct RateLimiter {
    state: Mutex<State>,
}

struct State {
    burst_left: u32,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter with a fresh burst.
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                burst_left: BURST,
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a message may be emitted now, `n` being how many were
    /// suppressed since the last one; `None` to stay quiet.
    pub(crate) fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// Whether a message may be emitted now.
    pub(crate) fn allow(&self) -> bool {
        self.check().is_some()
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let due = s.burst_left > 0 || s.last.is_none_or(|t| now.duration_since(t) >= INTERVAL);
        if !due {
            s.suppressed += 1;
            return None;
        }
        s.burst_left = s.burst_left.saturating_sub(1);
        s.last = Some(now);
        Some(std::mem::take(&mut s.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_one_per_interval_counting_suppressed() {
        let r = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(r.check_at(t0), Some(0));
        }
        assert_eq!(r.check_at(t0), None);
        assert_eq!(r.check_at(t0 + INTERVAL / 2), None);
        assert_eq!(r.check_at(t0 + INTERVAL), Some(2));
        assert_eq!(r.check_at(t0 + INTERVAL), None);
    }
}
