//! The raw request path: any bytes, at any offset of a guarded arena or at
//! any guest-physical address, rung with `pv::ring_raw`, and what the host
//! wrote back.
//!
//! The arena puts [`GUARD_BEFORE`] bytes of [`CANARY`] before the block and
//! [`GUARD_AFTER`] after it: a host that writes outside a block it answers
//! (or answers a block it should refuse at the header) is caught by
//! [`Sent::guards_intact`] and [`Sent::changed_besides_status`].

use core::cell::UnsafeCell;
use core::mem::offset_of;

use irqconnect_abi::ntstatus::NtStatus;
use irqconnect_abi::pv::{MAX_REQUEST_SIZE, RequestHeader, STATUS_NO_ANSWER};
use zerocopy::{FromBytes, IntoBytes};

use super::{Cases, Want};
use crate::pv;

/// Guard bytes before the block.
const GUARD_BEFORE: usize = 16;
/// Guard bytes after the block.
const GUARD_AFTER: usize = 64;
/// Most a block may be misaligned by.
pub const MAX_MISALIGN: usize = 7;
const ARENA_SIZE: usize = GUARD_BEFORE + MAX_MISALIGN + MAX_REQUEST_SIZE + GUARD_AFTER;
/// What the guards hold.
const CANARY: u8 = 0xa5;
/// Offset of `status` in a block.
const STATUS_AT: usize = offset_of!(RequestHeader, status);

#[repr(C, align(8))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: the arena is only touched by the test runner's thread (tests run
// one at a time on the BSP) and, during a doorbell write, by the VMM.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));

/// What the host left in a block sent from the arena.
pub struct Sent {
    /// The header's status after the doorbell.
    pub status: NtStatus,
    /// The block after the doorbell (first `len` bytes).
    pub block: [u8; MAX_REQUEST_SIZE],
    /// Bytes sent.
    pub len: usize,
    /// Every guard byte still holds [`CANARY`].
    pub guards_intact: bool,
}

impl Sent {
    /// The first offset, other than the status field, whose byte differs
    /// from `sent`.
    pub fn changed_besides_status(&self, sent: &[u8]) -> Option<usize> {
        sent.iter()
            .zip(self.block.iter())
            .enumerate()
            .find(|&(i, (a, b))| a != b && !(STATUS_AT..STATUS_AT + 4).contains(&i))
            .map(|(i, _)| i)
    }

    /// The answered block as a `T` (zero-filled where it was not sent).
    pub fn read<T: FromBytes>(&self) -> T {
        let size = core::mem::size_of::<T>().min(MAX_REQUEST_SIZE);
        match T::read_from_prefix(&self.block[..size]) {
            Ok((t, _)) => t,
            Err(_) => T::new_zeroed(),
        }
    }
}

/// Sends `bytes` (at most [`MAX_REQUEST_SIZE`]) as a block `misalign` bytes
/// past an 8-byte boundary, guards around it; returns what came back.
pub fn send(bytes: &[u8], misalign: usize) -> Sent {
    let len = bytes.len().min(MAX_REQUEST_SIZE);
    let misalign = misalign.min(MAX_MISALIGN);
    let base = ARENA.0.get().cast::<u8>();
    let at = GUARD_BEFORE + misalign;
    // SAFETY: `at + len + GUARD_AFTER <= ARENA_SIZE`; the arena is ours
    // (see `Sync` above) and no reference into it exists.
    unsafe {
        core::ptr::write_bytes(base, CANARY, ARENA_SIZE);
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(at), len);
    }
    // SAFETY: the block and its guards are the arena, which nothing else uses.
    unsafe { pv::ring_raw(base.add(at) as usize as u32) };
    let mut block = [0u8; MAX_REQUEST_SIZE];
    let mut guards_intact = true;
    // SAFETY: as above; the ring's asm is not `nomem`, so these reads
    // happen after the host's writes.
    unsafe {
        core::ptr::copy_nonoverlapping(base.add(at), block.as_mut_ptr(), len);
        for i in (0..at).chain(at + len..(at + len + GUARD_AFTER).min(ARENA_SIZE)) {
            if base.add(i).read() != CANARY {
                guards_intact = false;
            }
        }
    }
    let status = block
        .get(STATUS_AT..STATUS_AT + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(STATUS_NO_ANSWER, u32::from_le_bytes);
    Sent {
        status,
        block,
        len,
        guards_intact,
    }
}

/// Sends `bytes` aligned (or `misalign` off) and records case `name`: the
/// answer must be `want`, the guards intact, and (for refusals and no
/// answer) every byte but the status unchanged. Returns what came back.
pub fn refuse(cases: &mut Cases, name: &str, bytes: &[u8], misalign: usize, want: Want) -> Sent {
    let sent = send(bytes, misalign);
    cases.status(name, sent.status, want);
    let besides = sent.changed_besides_status(&bytes[..sent.len]);
    cases.check(
        name,
        sent.guards_intact && besides.is_none(),
        format_args!(
            "the host wrote {} (a refusal writes the status only)",
            match (sent.guards_intact, besides) {
                (false, _) => "outside the block",
                (true, Some(_)) => "block bytes other than the status",
                _ => "nothing",
            }
        ),
    );
    sent
}

/// Sends a typed block with [`refuse`].
pub fn refuse_typed<T: IntoBytes + zerocopy::Immutable>(
    cases: &mut Cases,
    name: &str,
    block: &T,
    want: Want,
) -> Sent {
    refuse(cases, name, block.as_bytes(), 0, want)
}

/// Writes `visible` at guest-physical `gpa` (which must be RAM the kernel
/// does not use), rings the doorbell with `gpa`, and returns those bytes as
/// they are afterwards. `gpa` may lie anywhere when `visible` is empty.
pub fn send_at(gpa: u64, visible: &[u8], out: &mut [u8]) {
    let n = visible.len().min(out.len());
    let p = gpa as usize as *mut u8;
    if n > 0 {
        // SAFETY: the caller names unused RAM (identity-mapped) for these
        // `n` bytes.
        unsafe { core::ptr::copy_nonoverlapping(visible.as_ptr(), p, n) };
    }
    let value = u32::try_from(gpa).unwrap_or(u32::MAX);
    // SAFETY: whatever the host might write at `gpa` is RAM the caller
    // gave up, or not RAM at all.
    unsafe { pv::ring_raw(value) };
    if n > 0 {
        // SAFETY: as above.
        unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), n) };
    }
}

/// Puts `bytes` in the arena (aligned, guards around) without ringing;
/// returns the block's guest-physical address, for doorbell accesses the
/// test makes itself.
pub fn stage(bytes: &[u8]) -> u32 {
    let len = bytes.len().min(MAX_REQUEST_SIZE);
    let base = ARENA.0.get().cast::<u8>();
    // SAFETY: as in `send`: the arena is ours and large enough.
    unsafe {
        core::ptr::write_bytes(base, CANARY, ARENA_SIZE);
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(GUARD_BEFORE), len);
        base.add(GUARD_BEFORE) as usize as u32
    }
}

/// The status of the block [`stage`] put in the arena.
pub fn staged_status() -> NtStatus {
    let base = ARENA.0.get().cast::<u8>();
    let mut word = [0u8; 4];
    // SAFETY: inside the arena; the doorbell asm before this call is not
    // `nomem`, so the read sees what the host wrote.
    unsafe {
        core::ptr::copy_nonoverlapping(base.add(GUARD_BEFORE + STATUS_AT), word.as_mut_ptr(), 4)
    };
    u32::from_le_bytes(word)
}
