//! What the PV doorbell counts, for the closing statistics line.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use irqconnect::Outcome;
use irqconnect_abi::ntstatus::{
    NtStatus, STATUS_BUFFER_TOO_SMALL, STATUS_INSUFFICIENT_RESOURCES,
    STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
    STATUS_INVALID_PARAMETER_1, STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND, STATUS_SUCCESS,
};

/// The statuses counted one by one, with their names in the statistics
/// line; anything else counts as `other`.
const STATUSES: [(NtStatus, &str); 9] = [
    (STATUS_SUCCESS, "ok"),
    (STATUS_INVALID_PARAMETER, "invalid_parameter"),
    (STATUS_INVALID_PARAMETER_1, "invalid_parameter_1"),
    (STATUS_INVALID_PARAMETER_10, "invalid_parameter_10"),
    (STATUS_INVALID_DEVICE_REQUEST, "invalid_device_request"),
    (STATUS_INVALID_HANDLE, "invalid_handle"),
    (STATUS_NOT_FOUND, "not_found"),
    (STATUS_INSUFFICIENT_RESOURCES, "insufficient_resources"),
    (STATUS_BUFFER_TOO_SMALL, "buffer_too_small"),
];

/// Live counters, shared by every vCPU thread.
#[derive(Default)]
pub(crate) struct PvCounters {
    by_status: [AtomicU64; STATUSES.len()],
    other_status: AtomicU64,
    unreadable: AtomicU64,
    unwritable: AtomicU64,
    routes_applied: AtomicU64,
    route_failures: AtomicU64,
    storm_masks: AtomicU64,
    bad_accesses: AtomicU64,
    messages_programmed: AtomicU64,
}

/// The counters in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PvCountersState {
    by_status: Vec<u64>,
    other_status: u64,
    unreadable: u64,
    unwritable: u64,
    routes_applied: u64,
    route_failures: u64,
    storm_masks: u64,
    bad_accesses: u64,
    messages_programmed: u64,
}

impl PvCounters {
    /// The counters as a snapshot state.
    pub(crate) fn save(&self) -> PvCountersState {
        let Self {
            by_status,
            other_status,
            unreadable,
            unwritable,
            routes_applied,
            route_failures,
            storm_masks,
            bad_accesses,
            messages_programmed,
        } = self;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PvCountersState {
            by_status: by_status.iter().map(get).collect(),
            other_status: get(other_status),
            unreadable: get(unreadable),
            unwritable: get(unwritable),
            routes_applied: get(routes_applied),
            route_failures: get(route_failures),
            storm_masks: get(storm_masks),
            bad_accesses: get(bad_accesses),
            messages_programmed: get(messages_programmed),
        }
    }

    /// Takes the counters of a snapshot (statuses this build does not
    /// count separately go to "other").
    pub(crate) fn restore(&self, state: &PvCountersState) {
        let set = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        for (c, &v) in self.by_status.iter().zip(&state.by_status) {
            set(c, v);
        }
        let extra: u64 = state.by_status.iter().skip(self.by_status.len()).sum();
        set(&self.other_status, state.other_status.saturating_add(extra));
        set(&self.unreadable, state.unreadable);
        set(&self.unwritable, state.unwritable);
        set(&self.routes_applied, state.routes_applied);
        set(&self.route_failures, state.route_failures);
        set(&self.storm_masks, state.storm_masks);
        set(&self.bad_accesses, state.bad_accesses);
        set(&self.messages_programmed, state.messages_programmed);
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl PvCounters {
    /// Counts what one doorbell write led to.
    pub(crate) fn outcome(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Answered(a) => {
                match STATUSES.iter().position(|&(s, _)| s == a.status) {
                    Some(i) => self.by_status.get(i).map_or((), bump),
                    None => bump(&self.other_status),
                };
            }
            Outcome::Unreadable { .. } => bump(&self.unreadable),
            Outcome::Unwritable { .. } => bump(&self.unwritable),
        }
    }

    /// A route programmed into the interrupt controller.
    pub(crate) fn route_applied(&self) {
        bump(&self.routes_applied);
    }

    /// A route the interrupt controller refused.
    pub(crate) fn route_failed(&self) {
        bump(&self.route_failures);
    }

    /// A pin masked by the storm guard.
    pub(crate) fn storm_mask(&self) {
        bump(&self.storm_masks);
    }

    /// A doorbell access of the wrong width or offset.
    pub(crate) fn bad_access(&self) {
        bump(&self.bad_accesses);
    }

    /// A message of a message-signaled test device (re)programmed.
    pub(crate) fn message_programmed(&self) {
        bump(&self.messages_programmed);
    }

    /// A snapshot of the counters.
    pub(crate) fn snapshot(&self) -> PvStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PvStats {
            by_status: STATUSES
                .iter()
                .zip(&self.by_status)
                .map(|(&(_, name), c)| (name, get(c)))
                .collect(),
            other_status: get(&self.other_status),
            unreadable: get(&self.unreadable),
            unwritable: get(&self.unwritable),
            routes_applied: get(&self.routes_applied),
            route_failures: get(&self.route_failures),
            storm_masks: get(&self.storm_masks),
            bad_accesses: get(&self.bad_accesses),
            messages_programmed: get(&self.messages_programmed),
            msi_sent: 0,
            msi_dropped: 0,
            msi_errors: 0,
            msidev_bad_accesses: 0,
        }
    }
}

/// The PV counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PvStats {
    /// Answered requests per status name (`ok`, `invalid_parameter`, ...).
    pub(crate) by_status: Vec<(&'static str, u64)>,
    /// Answered with a status not in the list.
    pub(crate) other_status: u64,
    /// Blocks that were not readable guest RAM (no answer).
    pub(crate) unreadable: u64,
    /// Answers that could not be written (the request was undone).
    pub(crate) unwritable: u64,
    /// Route updates programmed into the interrupt controller.
    pub(crate) routes_applied: u64,
    /// Route updates the interrupt controller refused.
    pub(crate) route_failures: u64,
    /// Pins masked by the storm guard.
    pub(crate) storm_masks: u64,
    /// Doorbell accesses of another width or offset (ignored).
    pub(crate) bad_accesses: u64,
    /// Messages of the message-signaled test devices (re)programmed.
    pub(crate) messages_programmed: u64,
    /// Messages the message-signaled test devices sent.
    pub(crate) msi_sent: u64,
    /// Raises of unprogrammed messages (dropped).
    pub(crate) msi_dropped: u64,
    /// Sends the interrupt controller refused.
    pub(crate) msi_errors: u64,
    /// Message-signaled test device accesses ignored.
    pub(crate) msidev_bad_accesses: u64,
}

impl PvStats {
    /// Requests answered, whatever the status.
    pub(crate) fn answered(&self) -> u64 {
        self.by_status.iter().map(|(_, n)| n).sum::<u64>() + self.other_status
    }

    /// Answered requests with status `name`.
    #[cfg(test)]
    pub(crate) fn status(&self, name: &str) -> u64 {
        self.by_status
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |&(_, c)| c)
    }
}

impl PvStats {
    /// `msi: programmed P, sent S, dropped D, failed F, bad accesses B`:
    /// the message-signaled test devices.
    pub(crate) fn msi_part(&self) -> String {
        format!(
            "msi: programmed {}, sent {}, dropped {}, failed {}, bad accesses {}",
            self.messages_programmed,
            self.msi_sent,
            self.msi_dropped,
            self.msi_errors,
            self.msidev_bad_accesses
        )
    }
}

/// `pv: requests N (ok A, invalid_parameter B), unreadable U, unwritable W,
/// routes R (failed F), storm masks S, bad accesses X`.
impl fmt::Display for PvStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pv: requests {}", self.answered())?;
        let mut parts: Vec<String> = self
            .by_status
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        if self.other_status > 0 {
            parts.push(format!("other {}", self.other_status));
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        write!(
            f,
            ", unreadable {}, unwritable {}, routes {} (failed {}), storm masks {}, bad accesses {}",
            self.unreadable,
            self.unwritable,
            self.routes_applied,
            self.route_failures,
            self.storm_masks,
            self.bad_accesses
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqconnect::request::Answer;

    fn answered(status: NtStatus) -> Outcome {
        Outcome::Answered(Answer {
            opcode: 1,
            status,
            refusal: None,
            routes: Vec::new(),
            messages: Vec::new(),
        })
    }

    #[test]
    fn counters_by_status_and_kind_in_the_line() {
        let c = PvCounters::default();
        c.outcome(&answered(STATUS_SUCCESS));
        c.outcome(&answered(STATUS_SUCCESS));
        c.outcome(&answered(STATUS_NOT_FOUND));
        c.outcome(&answered(0xc000_0001));
        c.outcome(&Outcome::Unreadable { gpa: 1, len: 16 });
        c.outcome(&Outcome::Unwritable { gpa: 8 });
        c.route_applied();
        c.route_failed();
        c.storm_mask();
        c.bad_access();
        let s = c.snapshot();
        assert_eq!(s.answered(), 4);
        assert_eq!(s.status("ok"), 2);
        assert_eq!(s.status("not_found"), 1);
        assert_eq!(
            s.to_string(),
            "pv: requests 4 (ok 2, not_found 1, other 1), unreadable 1, unwritable 1, \
             routes 1 (failed 1), storm masks 1, bad accesses 1"
        );
    }

    #[test]
    fn counters_empty_line_has_no_status_list() {
        assert_eq!(
            PvCounters::default().snapshot().to_string(),
            "pv: requests 0, unreadable 0, unwritable 0, routes 0 (failed 0), storm masks 0, bad accesses 0"
        );
    }
}
