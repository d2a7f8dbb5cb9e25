//! Rate limiting for guest-triggerable warnings: a short burst, then at most
//! one message per interval, telling how many were suppressed meanwhile.
//!
//! The chip uses it for every warning a guest can provoke; it is public so
//! an embedding VMM limits its own guest-triggered messages the same way.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Messages let through before the limit applies.
pub const BURST: u32 = 5;
/// At most one message per this interval after the burst.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A per-call-site limiter.
///
/// # Example
///
/// ```
/// use irqchip_kvm::ratelimit::RateLimiter;
///
/// let warn = RateLimiter::new();
/// for access in 0..100 {
///     if let Some(suppressed) = warn.check() {
///         eprintln!("bad access {access} ({suppressed} similar suppressed)");
///     }
/// }
/// ```
pub struct RateLimiter {
    state: Mutex<State>,
}

struct State {
    burst_left: u32,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimiter {
    /// A limiter with a fresh burst.
    pub fn new() -> Self {
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
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// Whether a message may be emitted now.
    pub fn allow(&self) -> bool {
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
