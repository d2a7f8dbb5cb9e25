//! Chained dispatch of connected interrupts, and the grace period that makes
//! IoDisconnectInterrupt safe against dispatch on other processors.
//!
//! Dispatch of `vector` on processor `p` (entered from the IDT stub with
//! interrupts off):
//! 1. announce: `p`'s dispatch word gets depth + 1 (a locked add: a full
//!    fence before the chain is read);
//! 2. raise CR8 to the vector's class (the DIRQL);
//! 3. walk the chain of (`p`, `vector`) in connection order; for each object:
//!    raise to its SynchronizeIrql, enable interrupts, take the connection's
//!    lock, call ISR(object, context), release, disable, lower back.
//!    LevelSensitive: stop at the first TRUE. Latched: rescan from the head
//!    while a pass had a TRUE. Nobody claimed: count it for (`p`, `vector`);
//!    A message's vector has exactly one connection: its
//!    `KMESSAGE_SERVICE_ROUTINE` is called once, with the message number;
//! 4. EOI, lower CR8 to the interrupted level;
//! 5. depth - 1; when it reaches 0, the epoch advances.
//!
//! Grace period (disconnect): after unlinking, for every processor `p` of the
//! connection's mask, read `p`'s word once. Depth 0: `p` is not dispatching,
//! and any dispatch it starts later reads the chain after the unlink (the
//! unlinking side fences before reading the word, the dispatch side fences by
//! its locked add before reading the chain). Depth > 0: wait until the epoch
//! moves, i.e. until the outermost dispatch running at the time of the read,
//! and with it every nested one, has returned. Then no processor can still
//! reach the unlinked objects and they can be freed.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use super::object::{self, KINTERRUPT, NIL};
use super::{KMESSAGE_SERVICE_ROUTINE, KSERVICE_ROUTINE, PVOID};
use crate::percpu::MAX_CPUS;
use crate::{cpu, interrupts, irql, percpu, time};

const DEPTH_MASK: u64 = 0xffff;
const EPOCH_ONE: u64 = 1 << 16;

/// A latched chain that still finds work after this many passes is broken
/// (an ISR that always returns TRUE): bug check instead of hanging.
const MAX_LATCHED_PASSES: u32 = 100_000;

/// How long a disconnect waits for another processor's dispatch to return.
const GRACE_TIMEOUT_US: u64 = 5_000_000;

struct CpuDispatch {
    /// Bits 0..15: dispatch nesting depth; bits 16..: epoch (outermost
    /// dispatches finished). Written only by the owning processor.
    word: AtomicU64,
    /// Deliveries nobody claimed, per vector.
    unclaimed: [AtomicU32; 256],
}

static CPU_DISPATCH: [CpuDispatch; MAX_CPUS] = [const {
    CpuDispatch {
        word: AtomicU64::new(0),
        unclaimed: [const { AtomicU32::new(0) }; 256],
    }
}; MAX_CPUS];

/// Deliveries of `vector` on processor `cpu` that no ISR claimed (the
/// chain was empty, or every ISR returned FALSE).
pub fn unclaimed(cpu: usize, vector: u8) -> u32 {
    CPU_DISPATCH.get(cpu).map_or(0, |d| {
        d.unclaimed[usize::from(vector)].load(Ordering::Acquire)
    })
}

/// Zeroes the unclaimed counters of the online processors (between tests;
/// guest memory writes are slow here, so only what can have counted).
pub fn reset_counters() {
    for d in CPU_DISPATCH.iter().take(percpu::count()) {
        for c in d.unclaimed.iter() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The nesting depth of dispatch on this processor (0 outside interrupts).
pub fn depth() -> u64 {
    CPU_DISPATCH[percpu::current_index()]
        .word
        .load(Ordering::Relaxed)
        & DEPTH_MASK
}

/// Dispatches `vector` on this processor: the chain, then EOI. Called by
/// the interrupt entry with interrupts disabled.
pub fn dispatch(vector: u8) {
    let cpu = percpu::current_index();
    let Some(me) = CPU_DISPATCH.get(cpu) else {
        interrupts::eoi_now();
        return;
    };
    me.word.fetch_add(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);

    let entry_irql = irql::current();
    let dirql = (vector >> 4).max(entry_irql);
    cpu::write_cr8(u64::from(dirql));

    let claimed = run_chain(cpu, vector);
    if !claimed {
        me.unclaimed[usize::from(vector)].fetch_add(1, Ordering::AcqRel);
    }

    cpu::cli();
    interrupts::eoi_now();
    cpu::write_cr8(u64::from(entry_irql));

    let word = me.word.load(Ordering::Relaxed);
    let next = if word & DEPTH_MASK == 1 {
        word - 1 + EPOCH_ONE
    } else {
        word - 1
    };
    me.word.store(next, Ordering::Release);
}

/// Runs the chain of (`cpu`, `vector`); true when an ISR claimed.
fn run_chain(cpu: usize, vector: u8) -> bool {
    let head = object::head(cpu, vector);
    if head == NIL {
        return false;
    }
    let first = object::obj(head).connection();
    if first.kind.load(Ordering::Relaxed) == object::kind::MESSAGE {
        // A message's vector has its one connection: one call per
        // message, no rescan (an edge that comes during the call is a
        // new delivery).
        return call_isr(object::obj(head));
    }
    let latched = first.latched.load(Ordering::Relaxed);
    if !latched {
        let mut at = head;
        while at != NIL {
            let o = object::obj(at);
            if call_isr(o) {
                return true;
            }
            at = o.next();
        }
        return false;
    }
    let mut claimed = false;
    for _ in 0..MAX_LATCHED_PASSES {
        let mut any = false;
        let mut at = object::head(cpu, vector);
        while at != NIL {
            let o = object::obj(at);
            any |= call_isr(o);
            at = o.next();
        }
        if !any {
            return claimed;
        }
        claimed = true;
    }
    panic!(
        "latched chain on vector {} still claims after {} passes",
        crate::display::hex(vector),
        crate::display::dec(MAX_LATCHED_PASSES)
    )
}

/// One ISR call: at its SynchronizeIrql, interrupts enabled (higher IRQLs
/// may nest), under its connection's lock.
fn call_isr(o: &'static KINTERRUPT) -> bool {
    let c = o.connection();
    let raw = c.routine.load(Ordering::Relaxed);
    if raw == 0 {
        return false;
    }
    let context = c.context.load(Ordering::Relaxed) as PVOID;
    let message = (c.kind.load(Ordering::Relaxed) == object::kind::MESSAGE)
        .then(|| c.message_id.load(Ordering::Relaxed));
    let old = irql::current();
    let sync = c.sync_irql.load(Ordering::Relaxed).max(old);
    cpu::write_cr8(u64::from(sync));
    cpu::sti();
    let lock = c.spin_lock();
    lock.acquire();
    let claimed = match message {
        Some(id) => {
            // SAFETY: a MESSAGE connection's `routine` only ever holds a
            // `KMESSAGE_SERVICE_ROUTINE` stored by IoConnectInterruptEx
            // (non-zero: checked above).
            let routine = unsafe { core::mem::transmute::<usize, KMESSAGE_SERVICE_ROUTINE>(raw) };
            routine(o, context, id)
        }
        None => {
            // SAFETY: any other connection's `routine` only ever holds a
            // `KSERVICE_ROUTINE` stored by IoConnectInterrupt(Ex)
            // (non-zero: checked above).
            let routine = unsafe { core::mem::transmute::<usize, KSERVICE_ROUTINE>(raw) };
            routine(o, context)
        }
    };
    lock.release();
    cpu::cli();
    cpu::write_cr8(u64::from(old));
    claimed
}

/// Waits until no processor of `mask` is still in a dispatch that may have
/// seen objects unlinked before this call (see the module docs).
pub fn wait_quiescent(group: u16, mask: u64) {
    wait_quiescent_on(object::bits(group, mask));
}

/// [`wait_quiescent`] on the processors `cpus`.
pub fn wait_quiescent_on(cpus: impl Iterator<Item = usize>) {
    fence(Ordering::SeqCst);
    let me = percpu::current_index();
    for cpu in cpus {
        let Some(d) = CPU_DISPATCH.get(cpu) else {
            continue;
        };
        let word = d.word.load(Ordering::SeqCst);
        if word & DEPTH_MASK == 0 {
            continue;
        }
        if cpu == me {
            panic!("IoDisconnectInterrupt called from interrupt dispatch on the same processor");
        }
        let epoch = word >> 16;
        if !time::wait_until(GRACE_TIMEOUT_US, || {
            d.word.load(Ordering::Acquire) >> 16 != epoch
        }) {
            panic!(
                "IoDisconnectInterrupt: dispatch on cpu {} did not return within 5 s",
                crate::display::dec(cpu)
            );
        }
    }
    fence(Ordering::SeqCst);
}
