//! `hostile_pv_concurrent_requests_from_every_cpu`: every processor rings
//! the doorbell at the same time, bypassing the guest's request lock (a
//! hostile kernel need not serialise), each with its own block: CONNECT on
//! one shared vector with its own processor, QUERY_ROUTE, a bad magic,
//! DISCONNECT, DISCONNECT again. Every answer must be the one a serial host
//! would give; afterwards the vector's pins hold no connection and are
//! masked, and the host is back at its baseline. The processors one
//! destination names together (all of them with at most 8) connect; the
//! others, whose connections rule R would refuse depending on who is
//! connected at that moment, send a CONNECT with an empty mask (refused by
//! rule 2) and a DISCONNECT of handle 0 instead. Rounds shrink as
//! processors grow (100 with 4), so the requests stay about 2000.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use irqconnect_abi::layout::PV_DOORBELL_PORT;
use irqconnect_abi::ntstatus::{
    NtStatus, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
};
use irqconnect_abi::pv::{Connect, Disconnect, QueryRoute};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::blocks;
use super::pvfix::{self, Env};
use super::{Cases, Name, Shown};
use crate::percpu::{self, MAX_CPUS};
use crate::pv::Request;
use crate::runner::TestResult;
use crate::smp;
use crate::wdm::KINTERRUPT_MODE;

/// Requests of all processors together, about (100 rounds with 4).
const TOTAL_ROUNDS: u32 = 400;
/// Rounds per processor now (set by the test).
static ROUNDS: AtomicU32 = AtomicU32::new(100);
/// Requests per round.
const PER_ROUND: u32 = 5;

/// One processor's request block.
#[repr(C, align(8))]
struct Slot(UnsafeCell<[u8; 128]>);

// SAFETY: slot `i` is used only by processor `i` (and the VMM during that
// processor's doorbell write).
unsafe impl Sync for Slot {}

static SLOTS: [Slot; MAX_CPUS] = [const { Slot(UnsafeCell::new([0; 128])) }; MAX_CPUS];

/// What the processors are told: the CONNECT every one of them makes
/// (its mask replaced by the processor's own bit) and the pin to query.
static PLAN_DEVICE: AtomicU32 = AtomicU32::new(0);
static PLAN_VECTOR: AtomicU32 = AtomicU32::new(0);
static PLAN_IRQL: AtomicU32 = AtomicU32::new(0);
static PLAN_PIN: AtomicU32 = AtomicU32::new(0);
/// The processors that connect (group 0).
static PLAN_MASK: AtomicU64 = AtomicU64::new(0);

/// Unexpected answers per processor.
static WRONG: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// QUERY_ROUTEs that showed no connection while this processor held one.
static EMPTY_ROUTE: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// The first unexpected answer per processor: request number << 32 | status.
static FIRST_WRONG: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Sends `req` from this processor's slot, without the guest's request
/// lock; returns the answered block.
fn ring<T: FromBytes + IntoBytes + Immutable>(cpu: usize, req: &T) -> T {
    let Some(slot) = SLOTS.get(cpu) else {
        return T::new_zeroed();
    };
    let p = slot.0.get().cast::<u8>();
    let bytes = req.as_bytes();
    let n = bytes.len().min(128);
    // SAFETY: the slot is this processor's; `n` <= its size.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n) };
    // SAFETY: the VMM answers into this processor's own slot; the asm is
    // not `nomem`, so the block is written before and read after it.
    unsafe {
        asm!("out dx, eax", in("dx") PV_DOORBELL_PORT, in("eax") p as usize as u32,
             options(nostack, preserves_flags))
    }
    let mut out = T::new_zeroed();
    // SAFETY: as above.
    unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_bytes().as_mut_ptr(), n) };
    out
}

/// Records an answer on processor `cpu`: request `n` answered `got`.
fn expect(cpu: usize, n: u32, got: NtStatus, want: NtStatus) {
    if got == want {
        return;
    }
    if let (Some(w), Some(f)) = (WRONG.get(cpu), FIRST_WRONG.get(cpu))
        && w.fetch_add(1, Ordering::AcqRel) == 0
    {
        f.store(u64::from(n) << 32 | u64::from(got), Ordering::Release);
    }
}

/// The work of one processor (`cpu` = its index).
fn hammer(cpu: usize) -> usize {
    let mut c = Connect::blank();
    c.device_id = PLAN_DEVICE.load(Ordering::Acquire);
    c.vector = PLAN_VECTOR.load(Ordering::Acquire);
    c.irql = PLAN_IRQL.load(Ordering::Acquire) as u8;
    c.synchronize_irql = c.irql;
    c.interrupt_mode = KINTERRUPT_MODE::LevelSensitive as u8;
    c.share_vector = 1;
    let own = 1u64.checked_shl(cpu as u32).unwrap_or(0);
    let connects = own & PLAN_MASK.load(Ordering::Acquire) != 0;
    c.processor_enable_mask = if connects { own } else { 0 };
    c.service_routine = blocks::raw_isr_address();
    let mut q = QueryRoute::blank();
    q.pin = PLAN_PIN.load(Ordering::Acquire);
    let mut bad = Disconnect::blank();
    bad.header.magic ^= 0x0100;
    let (made_status, gone_status) = if connects {
        (STATUS_SUCCESS, STATUS_SUCCESS)
    } else {
        (STATUS_INVALID_PARAMETER, STATUS_INVALID_HANDLE)
    };
    for round in 0..ROUNDS.load(Ordering::Acquire) {
        let n = round * PER_ROUND;
        let made = ring(cpu, &c);
        expect(cpu, n, made.header.status, made_status);
        let route = ring(cpu, &q);
        expect(cpu, n + 1, route.header.status, STATUS_SUCCESS);
        if connects
            && route.header.status == STATUS_SUCCESS
            && route.connections == 0
            && let Some(e) = EMPTY_ROUTE.get(cpu)
        {
            e.fetch_add(1, Ordering::AcqRel);
        }
        let refused = ring(cpu, &bad);
        expect(cpu, n + 2, refused.header.status, STATUS_INVALID_PARAMETER);
        let mut d = Disconnect::blank();
        d.handle = made.handle;
        let gone = ring(cpu, &d);
        expect(cpu, n + 3, gone.header.status, gone_status);
        let again = ring(cpu, &d);
        expect(cpu, n + 4, again.header.status, STATUS_INVALID_HANDLE);
    }
    0
}

/// The test body.
pub fn every_cpu(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_concurrent_requests_from_every_cpu");
    let (dev, _) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    let r = dev.res(0);
    PLAN_DEVICE.store(dev.id(), Ordering::Relaxed);
    PLAN_VECTOR.store(r.vector, Ordering::Relaxed);
    PLAN_IRQL.store(u32::from(r.level), Ordering::Relaxed);
    PLAN_MASK.store(env.effective(env.online())?, Ordering::Relaxed);
    PLAN_PIN.store(r.line, Ordering::Release);
    let n = percpu::count().min(MAX_CPUS);
    ROUNDS.store((TOTAL_ROUNDS / n as u32).clamp(5, 100), Ordering::Release);
    for c in 0..n {
        WRONG[c].store(0, Ordering::Relaxed);
        EMPTY_ROUTE[c].store(0, Ordering::Relaxed);
        FIRST_WRONG[c].store(0, Ordering::Relaxed);
    }
    let mut posted = [false; MAX_CPUS];
    for (c, p) in posted.iter_mut().enumerate().take(n).skip(1) {
        *p = smp::post(c, hammer, c).is_ok();
    }
    hammer(0);
    for (c, &p) in posted.iter().enumerate().take(n) {
        let name = Name::of(format_args!("cpu {}", crate::display::dec(c)));
        if c > 0 {
            let done = p && smp::wait(c, 60_000_000).is_ok();
            cases.check(
                name.as_str(),
                done,
                format_args!("its work item did not run to the end"),
            );
        }
        let wrong = WRONG[c].load(Ordering::Acquire);
        let first = FIRST_WRONG[c].load(Ordering::Acquire);
        cases.check(
            name.as_str(),
            wrong == 0,
            format_args!(
                "{} of {} answers unexpected; first: request {} answered {}",
                crate::display::dec(wrong),
                crate::display::dec(ROUNDS.load(Ordering::Relaxed) * PER_ROUND),
                crate::display::dec(first >> 32),
                Shown(first as u32)
            ),
        );
    }
    let empty: u32 = EMPTY_ROUTE.iter().map(|e| e.load(Ordering::Acquire)).sum();
    cases.check(
        "QUERY_ROUTE sees the asker's own connection",
        empty == 0,
        format_args!(
            "{} routes showed no connection while the asker held one",
            crate::display::dec(empty)
        ),
    );
    let route = pvfix::route(r.line)?;
    cases.check(
        "the shared pin afterwards",
        route.masked == 1 && route.connections == 0,
        format_args!(
            "masked {}, {} connections",
            crate::display::dec(route.masked),
            crate::display::dec(route.connections)
        ),
    );
    cases.finish()
}
