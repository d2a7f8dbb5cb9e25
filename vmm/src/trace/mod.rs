//! `--trace PATH`: a timeline of the run as Chrome trace-event JSON
//! (Perfetto and chrome://tracing open it).
//!
//! [`Recorder`] is the chip's [`TraceSink`] and also takes the VMM's own
//! events: PV requests (from the doorbell) and the guest's test boundaries
//! (from the test-marker port and the result lines). Events go into a ring
//! of at most `--trace-limit` entries, stamped under its lock, so the ring
//! is in time order; when it is full the oldest event is dropped and
//! counted, whatever the guest does. At the end [`json::write`] turns the
//! ring into the file (tracks, flow arrows, the dropped count).

pub(crate) mod json;

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use irqchip_kvm::{TraceEvent, TraceSink};
use irqconnect_abi::layout::TEST_MARKER_MAX_LEN;

/// Events kept when `--trace-limit` is not given: a whole run of the guest
/// suite in user mode with 4 vCPUs fits (README, "Tracing").
pub(crate) const DEFAULT_LIMIT: usize = 1_000_000;

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// The interrupt controller's.
    Chip(TraceEvent),
    /// A PV doorbell request, answered (`status`) or not (`None`: the block
    /// was not readable, or the answer not writable), from `start_ns`.
    Pv {
        /// The vCPU that rang.
        vcpu: usize,
        /// The request's opcode, when the header was read.
        opcode: Option<u16>,
        /// The status written back.
        status: Option<u32>,
        /// When the doorbell write arrived.
        start_ns: u64,
    },
    /// The test-marker port named a test.
    TestStart {
        /// Its name (at most `TEST_MARKER_MAX_LEN` bytes).
        name: Box<str>,
    },
    /// A result line: `ok`, `FAIL` or `skip`.
    TestEnd {
        /// The test's name.
        name: Box<str>,
        /// `ok`, `FAIL` or `skip`.
        verdict: &'static str,
    },
}

/// A test name as the trace keeps it: at most `TEST_MARKER_MAX_LEN`
/// bytes (cut at a character boundary), whatever the guest printed.
pub(crate) fn test_name(name: &str) -> Box<str> {
    let mut end = name.len().min(TEST_MARKER_MAX_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].into()
}

/// An event and when it happened (ns since the recorder was made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamped {
    /// Nanoseconds since the recorder's start.
    pub(crate) ns: u64,
    /// The event.
    pub(crate) event: Event,
}

struct Ring {
    events: VecDeque<Stamped>,
    limit: usize,
    dropped: u64,
}

/// The bounded event ring (see the module documentation).
pub(crate) struct Recorder {
    start: Instant,
    ring: Mutex<Ring>,
}

impl Recorder {
    /// A recorder keeping at most `limit` events (at least 1).
    pub(crate) fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            start: Instant::now(),
            ring: Mutex::new(Ring {
                // Grown on demand: a short run does not pay for the limit.
                events: VecDeque::with_capacity(limit.min(4096)),
                limit,
                dropped: 0,
            }),
        }
    }

    /// Nanoseconds since the recorder was made.
    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records `event` now.
    pub(crate) fn push(&self, event: Event) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        // Stamped under the lock: the ring stays in time order.
        let ns = self.now();
        if ring.events.len() >= ring.limit {
            ring.events.pop_front();
            ring.dropped += 1;
        }
        ring.events.push_back(Stamped { ns, event });
    }

    /// The events kept, oldest first, and how many were dropped.
    pub(crate) fn take(&self) -> (Vec<Stamped>, u64) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let dropped = ring.dropped;
        (std::mem::take(&mut ring.events).into(), dropped)
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl TraceSink for Recorder {
    fn record(&self, event: TraceEvent) {
        self.push(Event::Chip(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_and_counts_the_dropped() {
        let r = Recorder::new(3);

        for vcpu in 0..5 {
            r.record(TraceEvent::Park { vcpu });
        }

        let (events, dropped) = r.take();
        assert_eq!(dropped, 2);
        let kept: Vec<_> = events.iter().map(|s| s.event.clone()).collect();
        assert_eq!(
            kept,
            (2..5)
                .map(|vcpu| Event::Chip(TraceEvent::Park { vcpu }))
                .collect::<Vec<_>>()
        );
        assert!(events.windows(2).all(|w| w[0].ns <= w[1].ns));
    }

    #[test]
    fn test_name_is_bounded_at_a_char_boundary() {
        let long = "é".repeat(100);
        let kept = test_name(&long);
        assert!(kept.len() <= TEST_MARKER_MAX_LEN);
        assert!(long.starts_with(&*kept));
        assert_eq!(&*test_name("ioapic_x"), "ioapic_x");
    }

    #[test]
    fn ring_limit_zero_keeps_one() {
        let r = Recorder::new(0);
        r.record(TraceEvent::Park { vcpu: 0 });
        r.record(TraceEvent::Park { vcpu: 1 });
        let (events, dropped) = r.take();
        assert_eq!((events.len(), dropped), (1, 1));
    }
}
