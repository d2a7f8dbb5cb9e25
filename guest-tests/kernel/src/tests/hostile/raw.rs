//! The raw request path: a [`Block`] at any offset of a guarded arena, or
//! any bytes at any guest-physical address, rung with `pv::ring_raw`, and
//! what the host wrote back.
//!
//! The arena puts [`GUARD_BEFORE`] bytes of [`CANARY`] before the block and
//! [`GUARD_AFTER`] after it: a host that writes outside a block it answers
//! (or answers a block it should refuse at the header) is caught by
//! [`Sent::guards_intact`] and [`Sent::only_status_changed`].
//!
//! Guest memory is moved eight bytes per string-instruction step: an
//! emulating host costs about the same per step whatever the width, so
//! `rep movsq` is up to eight times faster than a `rep movsb`.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::mem::offset_of;

use irqconnect_abi::ntstatus::NtStatus;
use irqconnect_abi::pv::{MAX_REQUEST_SIZE, RequestHeader, STATUS_NO_ANSWER};
use zerocopy::{FromBytes, IntoBytes};

use super::blocks::{Block, INLINE};
use super::{Cases, Want, same};
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

/// What the guards must still hold.
static CANARIES: [u8; GUARD_AFTER] = [CANARY; GUARD_AFTER];
/// What a block holds past its inline bytes.
static ZEROS: [u8; MAX_REQUEST_SIZE] = [0; MAX_REQUEST_SIZE];
const _: () = assert!(GUARD_AFTER >= GUARD_BEFORE + MAX_MISALIGN);

/// Copies `n` bytes from `src` to `dst`, eight per step.
///
/// # Safety
/// Both ranges valid for `n` bytes, not overlapping.
unsafe fn copy(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees the ranges; DF is clear in Rust code.
    unsafe {
        asm!("rep movsq", "mov rcx, {tail}", "rep movsb", tail = in(reg) n & 7,
             inout("rcx") n >> 3 => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    }
}

/// Fills `n` bytes at `dst` with `byte`, eight per step.
///
/// # Safety
/// The range valid for `n` bytes.
unsafe fn fill(dst: *mut u8, byte: u8, n: usize) {
    // SAFETY: the caller guarantees the range; DF is clear in Rust code.
    unsafe {
        asm!("rep stosq", "mov rcx, {tail}", "rep stosb", tail = in(reg) n & 7,
             inout("rcx") n >> 3 => _, inout("rdi") dst => _,
             in("rax") u64::from_ne_bytes([byte; 8]), options(nostack, preserves_flags))
    }
}

fn base() -> *mut u8 {
    ARENA.0.get().cast::<u8>()
}

/// The arena bytes `at..at + len` (call only between doorbell writes).
fn arena(at: usize, len: usize) -> &'static [u8] {
    let len = len.min(ARENA_SIZE.saturating_sub(at));
    // SAFETY: inside the arena; nothing writes it while the slice is used
    // (the host writes only during a doorbell write, which the test makes
    // after it is done with the slice).
    unsafe { core::slice::from_raw_parts(base().add(at), len) }
}

/// What the host left in a block sent from the arena (read from the arena:
/// valid until the next send).
pub struct Sent {
    /// The header's status after the doorbell.
    pub status: NtStatus,
    /// Every guard byte still holds [`CANARY`].
    pub guards_intact: bool,
    at: usize,
    len: usize,
}

impl Sent {
    /// True when every byte but the status field is what `block` holds.
    pub fn only_status_changed(&self, block: &Block) -> bool {
        let now = arena(self.at, self.len);
        let head = block.bytes();
        let n = head.len();
        n >= STATUS_AT + 4
            && same(&now[..STATUS_AT], &head[..STATUS_AT])
            && same(&now[STATUS_AT + 4..n], &head[STATUS_AT + 4..])
            && same(&now[n..], &ZEROS[..self.len - n])
    }

    /// The answered block as a `T` (zero where it was not sent).
    pub fn read<T: FromBytes + IntoBytes>(&self) -> T {
        let mut t = T::new_zeroed();
        let out = t.as_mut_bytes();
        let n = out.len().min(self.len);
        // SAFETY: `n` bytes inside the arena and inside `t`.
        unsafe { copy(out.as_mut_ptr(), base().add(self.at), n) };
        t
    }
}

/// The guest-physical address [`send`] puts a block at, `misalign` bytes
/// past its 8-byte boundary.
pub fn block_address(misalign: usize) -> u64 {
    base().wrapping_add(GUARD_BEFORE + misalign.min(MAX_MISALIGN)) as u64
}

/// Sends `block` as a block `misalign` bytes past an 8-byte boundary,
/// guards around it; returns what came back.
pub fn send(block: &Block, misalign: usize) -> Sent {
    let len = block.len().min(MAX_REQUEST_SIZE);
    let head = block.bytes();
    let at = GUARD_BEFORE + misalign.min(MAX_MISALIGN);
    let b = base();
    // SAFETY: `at + len + GUARD_AFTER <= ARENA_SIZE`; the arena is ours
    // (see `Sync` above) and no reference into it is live.
    unsafe {
        fill(b, CANARY, at);
        copy(b.add(at), head.as_ptr(), head.len());
        fill(b.add(at + head.len()), 0, len - head.len());
        fill(b.add(at + len), CANARY, GUARD_AFTER);
    }
    // SAFETY: the block and its guards are the arena, which nothing else uses.
    unsafe { pv::ring_raw(b.wrapping_add(at) as usize as u32) };
    // The ring's asm is not `nomem`: these reads see the host's writes.
    let guards_intact =
        same(arena(0, at), &CANARIES[..at]) && same(arena(at + len, GUARD_AFTER), &CANARIES[..]);
    let status = arena(at + STATUS_AT, 4)
        .try_into()
        .map_or(STATUS_NO_ANSWER, u32::from_le_bytes);
    Sent {
        status,
        guards_intact,
        at,
        len,
    }
}

/// Sends `block` aligned (or `misalign` off) and records case `name`: the
/// answer must be `want`, the guards intact, and (for refusals and no
/// answer) every byte but the status unchanged. Returns what came back.
pub fn refuse(cases: &mut Cases, name: &str, block: &Block, misalign: usize, want: Want) -> Sent {
    let sent = send(block, misalign);
    cases.status(name, sent.status, want);
    let only_status = sent.only_status_changed(block);
    cases.check(
        name,
        sent.guards_intact && only_status,
        format_args!(
            "the host wrote {} (a refusal writes the status only)",
            if sent.guards_intact {
                "block bytes other than the status"
            } else {
                "outside the block"
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
    refuse(cases, name, &Block::of(block), 0, want)
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
        unsafe { copy(p, visible.as_ptr(), n) };
    }
    let value = u32::try_from(gpa).unwrap_or(u32::MAX);
    // SAFETY: whatever the host might write at `gpa` is RAM the caller
    // gave up, or not RAM at all.
    unsafe { pv::ring_raw(value) };
    if n > 0 {
        // SAFETY: as above.
        unsafe { copy(out.as_mut_ptr(), p, n) };
    }
}

/// Puts `block` in the arena (aligned, guards around) without ringing;
/// returns its guest-physical address, for doorbell accesses the test
/// makes itself.
pub fn stage(block: &Block) -> u32 {
    let len = block.len().min(INLINE);
    let b = base();
    // SAFETY: as in `send`: the arena is ours and large enough.
    unsafe {
        fill(b, CANARY, ARENA_SIZE);
        copy(b.add(GUARD_BEFORE), block.bytes().as_ptr(), len);
    }
    b.wrapping_add(GUARD_BEFORE) as usize as u32
}

/// The status of the block [`stage`] put in the arena.
pub fn staged_status() -> NtStatus {
    arena(GUARD_BEFORE + STATUS_AT, 4)
        .try_into()
        .map_or(STATUS_NO_ANSWER, u32::from_le_bytes)
}
