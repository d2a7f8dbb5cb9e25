//! Volume: a CONNECT flood up to the host's object quota, and a stream of
//! random and mutated blocks, each answered with a defined status.

use irqconnect_abi::ntstatus::{
    NtStatus, STATUS_BUFFER_TOO_SMALL, STATUS_INSUFFICIENT_RESOURCES,
    STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
    STATUS_INVALID_PARAMETER_1, STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND, STATUS_SUCCESS,
    status_name,
};
use irqconnect_abi::pv::{ABI_VERSION_MAX, Connect, ConnectEx, PV_MAGIC, opcode, request_size};

use super::blocks::{self, Block};
use super::pvfix::{self, Env};
use super::raw::{self, MAX_MISALIGN};
use super::{Cases, Name, Shown, Want};
use crate::pv;
use crate::runner::TestResult;
use crate::wdm::KINTERRUPT_MODE;
use crate::{fail, skip};

const IR: Want = Want::Status(STATUS_INSUFFICIENT_RESOURCES);
const OK: Want = Want::Status(STATUS_SUCCESS);

/// Most connections the flood holds.
const MAX_HANDLES: usize = 128;

/// A raw CONNECT; the status and the handle (0 unless success).
fn connect(c: &Connect) -> (NtStatus, u64) {
    let sent = raw::send(&Block::of(c), 0);
    let handle = if sent.status == STATUS_SUCCESS {
        sent.read::<Connect>().handle
    } else {
        0
    };
    (sent.status, handle)
}

/// Raw CONNECTs on a shared vector until the objects in use equal the
/// quota exactly (full masks, then single processors); one more object
/// and a full mask are STATUS_INSUFFICIENT_RESOURCES and change nothing;
/// everything disconnected is the baseline again, and a connect succeeds.
pub fn quota_flood(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_connect_flood_hits_quota_then_recovers");
    let (dev, _) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    let start = pvfix::platform()?;
    // Every online processor one destination names (all of them with at
    // most 8 processors).
    let online = env.effective(env.online())?;
    let k = online.count_ones();
    let free = start.object_quota.saturating_sub(start.objects_in_use);
    if (free / k + k) as usize > MAX_HANDLES {
        skip!(
            "host quota {} needs more than {} connections",
            crate::display::dec(start.object_quota),
            crate::display::dec(MAX_HANDLES)
        );
    }
    let r = dev.res(0);
    let mut full = <Connect as pv::Request>::blank();
    full.device_id = dev.id();
    full.vector = r.vector;
    full.irql = r.level;
    full.synchronize_irql = r.level;
    full.interrupt_mode = KINTERRUPT_MODE::LevelSensitive as u8;
    full.share_vector = 1;
    full.processor_enable_mask = online;
    full.service_routine = blocks::raw_isr_address();
    let mut one = full;
    one.processor_enable_mask = online & online.wrapping_neg();

    let mut handles = [0u64; MAX_HANDLES];
    let mut n = 0;
    let mut objects = start.objects_in_use;
    let mut refused = None;
    while objects < start.object_quota && n < MAX_HANDLES {
        let c = if objects + k <= start.object_quota {
            (&full, k)
        } else {
            (&one, 1)
        };
        match connect(c.0) {
            (STATUS_SUCCESS, h) => {
                handles[n] = h;
                n += 1;
                objects += c.1;
            }
            (s, _) => {
                refused = Some((s, objects));
                break;
            }
        }
    }
    let name = Name::of(format_args!(
        "{} connects filling the quota of {}",
        crate::display::dec(n),
        crate::display::dec(start.object_quota)
    ));
    cases.check(
        name.as_str(),
        refused.is_none(),
        format_args!(
            "refused with {} at {} objects",
            Shown(refused.map_or(0, |r| r.0)),
            crate::display::dec(refused.map_or(0, |r| r.1))
        ),
    );
    let at_quota = pvfix::platform()?;
    cases.check(
        "objects in use equal the quota exactly",
        at_quota.objects_in_use == at_quota.object_quota,
        format_args!(
            "{} of {} objects in use",
            crate::display::dec(at_quota.objects_in_use),
            crate::display::dec(at_quota.object_quota)
        ),
    );
    let (s1, h1) = connect(&one);
    cases.status("one object over the quota", s1, IR);
    let (s2, h2) = connect(&full);
    cases.status("a full mask over the quota", s2, IR);
    for h in [h1, h2] {
        if h != 0 {
            let _ = pv::disconnect(h);
        }
    }
    let still = pvfix::platform()?;
    cases.check(
        "refusals over the quota recorded nothing",
        still.objects_in_use == at_quota.objects_in_use
            && still.connections == at_quota.connections,
        format_args!(
            "{} objects / {} connections, were {} / {}",
            crate::display::dec(still.objects_in_use),
            crate::display::dec(still.connections),
            crate::display::dec(at_quota.objects_in_use),
            crate::display::dec(at_quota.connections)
        ),
    );
    let mut bad = 0u32;
    for &h in handles.iter().take(n) {
        if pv::disconnect(h) != STATUS_SUCCESS {
            bad += 1;
        }
    }
    cases.check(
        "every flood connection disconnects",
        bad == 0,
        format_args!("{} disconnects refused", crate::display::dec(bad)),
    );
    let end = pvfix::platform()?;
    cases.check(
        "back at the baseline after the flood",
        end.objects_in_use == start.objects_in_use && end.connections == start.connections,
        format_args!(
            "{} objects / {} connections, baseline {} / {}",
            crate::display::dec(end.objects_in_use),
            crate::display::dec(end.connections),
            crate::display::dec(start.objects_in_use),
            crate::display::dec(start.connections)
        ),
    );
    let (s3, h3) = connect(&full);
    cases.status("a connect after the flood", s3, OK);
    if h3 != 0 {
        cases.status("its DISCONNECT", pv::disconnect(h3), OK);
    }
    cases.finish()
}

/// xorshift64: a fixed seed makes every run send the same blocks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// True with probability `n` / 8.
    fn eighths(&mut self, n: u64) -> bool {
        self.next() % 8 < n
    }
}

/// Blocks sent by [`random_blocks`].
const RANDOM_BLOCKS: u32 = 300;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// What the header alone decides (rule 1's order), or `None` when the
/// header passes and the body decides.
fn header_verdict(
    magic: u32,
    misalign: usize,
    version: u16,
    op: u16,
    length: u32,
) -> Option<NtStatus> {
    if magic != PV_MAGIC || misalign != 0 {
        return Some(STATUS_INVALID_PARAMETER);
    }
    if version == 0 || version > ABI_VERSION_MAX {
        return Some(STATUS_INVALID_PARAMETER_1);
    }
    let Some(size) = request_size(version, op) else {
        return Some(STATUS_INVALID_DEVICE_REQUEST);
    };
    (length as usize != size).then_some(STATUS_INVALID_PARAMETER)
}

/// A stream of [`RANDOM_BLOCKS`] blocks: well-formed blocks of every opcode
/// with 1..3 random bytes, or random header fields over a valid body,
/// sometimes misaligned. Header defects get exactly their status (rule 1's
/// order); every answer is a defined status; nothing is written outside the
/// block; a CONNECT that happens to succeed is disconnected.
pub fn random_blocks(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_random_blocks_defined_statuses");
    let all = blocks::every_opcode(env)?;
    let mut rng = Rng(SEED);
    let mut stray = 0u32;
    for i in 0..RANDOM_BLOCKS {
        let mut b = all[(rng.next() % all.len() as u64) as usize].1;
        let len = b.bytes().len();
        if rng.eighths(4) {
            for _ in 0..1 + rng.next() % 3 {
                let at = (rng.next() % len as u64) as usize;
                b.bytes_mut()[at] = rng.next() as u8;
            }
        } else {
            let bytes = b.bytes_mut();
            if rng.eighths(1) {
                bytes[0..4].copy_from_slice(&(rng.next() as u32).to_le_bytes());
            }
            if rng.eighths(2) {
                bytes[4..6].copy_from_slice(&(rng.next() as u16 % 4).to_le_bytes());
            }
            if rng.eighths(3) {
                bytes[6..8].copy_from_slice(&(rng.next() as u16 % 8).to_le_bytes());
            }
            if rng.eighths(2) {
                bytes[8..12].copy_from_slice(&(rng.next() as u32 % 1200).to_le_bytes());
            }
        }
        let misalign = if rng.eighths(1) {
            1 + (rng.next() % MAX_MISALIGN as u64) as usize
        } else {
            0
        };
        let bytes = b.bytes();
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let half = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let (magic, version, op, length) = (word(0), half(4), half(6), word(8));
        let sent = raw::send(&b, misalign);
        let verdict = header_verdict(magic, misalign, version, op, length);
        let defined = matches!(
            sent.status,
            STATUS_SUCCESS
                | STATUS_INVALID_PARAMETER
                | STATUS_INVALID_PARAMETER_1
                | STATUS_INVALID_DEVICE_REQUEST
                | STATUS_INVALID_HANDLE
                | STATUS_NOT_FOUND
                | STATUS_INSUFFICIENT_RESOURCES
                | STATUS_BUFFER_TOO_SMALL
                | STATUS_INVALID_PARAMETER_10
        );
        let ok = sent.guards_intact
            && defined
            && verdict.is_none_or(|v| v == sent.status)
            && (verdict.is_none() || sent.only_status_changed(&b));
        if ok {
            cases.passed();
        } else {
            let name = Name::of(format_args!(
                "block {} (opcode {}, misalign {})",
                crate::display::dec(i),
                crate::display::dec(op),
                crate::display::dec(misalign)
            ));
            cases.check(
                name.as_str(),
                false,
                format_args!(
                    "answered {}, header says {}, guards {}",
                    Shown(sent.status),
                    Shown(verdict.unwrap_or(u32::MAX)),
                    if sent.guards_intact {
                        "intact"
                    } else {
                        "overwritten"
                    }
                ),
            );
        }
        if sent.status == STATUS_SUCCESS && op == opcode::CONNECT {
            let made: Connect = sent.read();
            if pv::disconnect(made.handle) != STATUS_SUCCESS {
                stray += 1;
            }
        }
        // A mutated opcode byte can name CONNECT_EX (its length must then
        // have come out right too).
        if sent.status == STATUS_SUCCESS && op == opcode::CONNECT_EX {
            let made: ConnectEx = sent.read();
            if pv::disconnect_ex(made.version_used, made.handle) != STATUS_SUCCESS {
                stray += 1;
            }
        }
    }
    if stray > 0 {
        fail!(
            "{} accepted random CONNECTs could not be disconnected ({})",
            crate::display::dec(stray),
            status_name(STATUS_INVALID_HANDLE)
        );
    }
    cases.finish()
}
