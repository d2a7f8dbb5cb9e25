//! `ex_msi_no_interrupt_lost_under_load`: every message of every
//! message-signaled device connected at once, raised from every processor
//! (up to 16 of them, spread over the online ones: the opening turns below
//! are one after another, and every vCPU is emulated on the host's few
//! cores) for at least a second (the TSC clock) and at least 1000 times in
//! all, and counted exactly: per message
//! raised = sent (the device's SENT) = delivered (the local APICs' counts
//! of its vector) = handled (the routine's calls), none outside its
//! target set, and every raising processor raised messages of every
//! device.
//!
//! A raiser raises message `k` only after claiming it (its `inflight` flag,
//! which the routine clears): one send of a message is in flight at a
//! time, so no two sends of it merge in a local APIC's IRR and the counts
//! can be exact. The processors first take turns raising one message of
//! every device each (a vCPU the host schedules rarely would otherwise
//! lose every race for a one-message device), then all raise at once.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::msgfix::{
    MAX_MSG, MCTX, Taken, check_exact, connect_messages, disconnect_messages, sent_now, settle_io,
    taken_now, wait_io,
};
use super::pvfix::{self, Env, MAX_MSG_DEVICES, MsgDev};
use crate::percpu::{self, MAX_CPUS};
use crate::runner::{Failure, Test, TestResult};
use crate::wdm::PIO_INTERRUPT_MESSAGE_INFO;
use crate::{check, fail, println, smp, time};

/// The suite.
pub const TESTS: &[Test] = &[Test::new("ex_msi_no_interrupt_lost_under_load", || {
    pvfix::run(under_load)
})];

/// How long every processor raises at least.
const DURATION_US: u64 = 1_000_000;
/// Fewest messages a run must raise to mean anything: the raising goes on
/// past [`DURATION_US`] until then (many vCPUs on few host cores run the
/// guest slower), up to [`MAX_DURATION_US`].
const MIN_TOTAL: u32 = 1_000;
/// How long the raising may go on to reach [`MIN_TOTAL`] (and to give
/// every processor its opening turn), and how much longer per processor:
/// the turns are one after another, and every vCPU is emulated on the
/// host's few cores.
const MAX_DURATION_US: u64 = 5_000_000;
const MAX_DURATION_PER_CPU_US: u64 = 100_000;
/// Messages raised so far.
static TOTAL: AtomicU32 = AtomicU32::new(0);

static STOP: AtomicBool = AtomicBool::new(false);
/// The devices raised, as the first `DEVICES_N` entries.
static DEVICES: [AtomicU32; MAX_MSG_DEVICES] = [const { AtomicU32::new(0) }; MAX_MSG_DEVICES];
static COUNTS: [AtomicU32; MAX_MSG_DEVICES] = [const { AtomicU32::new(0) }; MAX_MSG_DEVICES];
static DEVICES_N: AtomicU32 = AtomicU32::new(0);
/// Raises per device and message.
static RAISED: [[AtomicU32; MAX_MSG]; MAX_MSG_DEVICES] =
    [const { [const { AtomicU32::new(0) }; MAX_MSG] }; MAX_MSG_DEVICES];
/// Raises per processor and device.
static BY_CPU: [[AtomicU32; MAX_MSG_DEVICES]; MAX_CPUS] =
    [const { [const { AtomicU32::new(0) }; MAX_MSG_DEVICES] }; MAX_CPUS];

/// The raiser (its place in [`RAISERS`]) whose turn it is to raise one
/// message of every device before the free-for-all starts (so every
/// raiser raises every device's messages, however the host schedules its
/// vCPUs); past the last raiser, everyone raises.
static TOKEN: AtomicU32 = AtomicU32::new(0);
/// Most processors that raise.
const MAX_RAISERS: usize = 16;
/// The raising processors (the BSP first), as the first `RAISERS_N`.
static RAISERS: [AtomicU32; MAX_RAISERS] = [const { AtomicU32::new(0) }; MAX_RAISERS];
static RAISERS_N: AtomicU32 = AtomicU32::new(0);

/// The opening turn of processor `cpu`, raiser `slot`: one message of
/// every device, each as soon as one of its messages is free; then the
/// next raiser's turn.
fn opening_turn(cpu: usize, slot: usize) {
    let n = DEVICES_N.load(Ordering::Acquire) as usize;
    for d in 0..n {
        let Some(md) = crate::msidev::MsiDev::new(DEVICES[d].load(Ordering::Relaxed)) else {
            continue;
        };
        let count = COUNTS[d].load(Ordering::Relaxed) as usize;
        let deadline = time::now_us() + pvfix::TIMEOUT_US;
        while time::now_us() < deadline {
            if let Some(k) = (0..count).find(|&k| {
                MCTX[d].inflight[k]
                    .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            }) {
                RAISED[d][k].fetch_add(1, Ordering::AcqRel);
                TOTAL.fetch_add(1, Ordering::AcqRel);
                BY_CPU[cpu][d].fetch_add(1, Ordering::AcqRel);
                md.raise(k as u32);
                break;
            }
            let _ = md.pending();
        }
    }
    TOKEN.store(slot as u32 + 1, Ordering::Release);
}

/// One pass over every message of every device, starting at a place that
/// depends on `turn`: raises each message that has none in flight (after
/// the opening turns: before, only the processor whose turn it is raises).
/// Returns how many it raised.
fn pass(cpu: usize, slot: usize, turn: usize) -> u32 {
    let token = TOKEN.load(Ordering::Acquire) as usize;
    if token < RAISERS_N.load(Ordering::Acquire) as usize {
        if token == slot {
            opening_turn(cpu, slot);
        } else if let Some(md) = crate::msidev::MsiDev::new(DEVICES[0].load(Ordering::Relaxed)) {
            let _ = md.pending();
        }
        return 0;
    }
    let n = DEVICES_N.load(Ordering::Acquire) as usize;
    let mut raised = 0;
    for i in 0..n {
        let d = (i + turn) % n;
        let Some(md) = crate::msidev::MsiDev::new(DEVICES[d].load(Ordering::Relaxed)) else {
            continue;
        };
        let count = COUNTS[d].load(Ordering::Relaxed) as usize;
        for j in 0..count {
            let k = (j + turn) % count;
            if MCTX[d].inflight[k]
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                RAISED[d][k].fetch_add(1, Ordering::AcqRel);
                TOTAL.fetch_add(1, Ordering::AcqRel);
                BY_CPU[cpu][d].fetch_add(1, Ordering::AcqRel);
                md.raise(k as u32);
                raised += 1;
            }
        }
        if raised == 0 {
            // Nothing to raise here: a port access all the same, so a
            // pending interrupt is taken.
            let _ = md.pending();
        }
    }
    raised
}

/// Work item of every raising AP (`slot`: its place in [`RAISERS`]):
/// passes until [`STOP`].
fn raiser(slot: usize) -> usize {
    let cpu = percpu::current_index();
    let mut turn = cpu;
    while !STOP.load(Ordering::Acquire) {
        pass(cpu, slot, turn);
        turn += 1;
    }
    0
}

fn under_load(env: &Env) -> TestResult {
    let (devs, n) = env.message_wired()?;
    let ncpu = percpu::count();
    let mut tables: [Option<PIO_INTERRUPT_MESSAGE_INFO>; MAX_MSG_DEVICES] = [None; MAX_MSG_DEVICES];
    let mut sent0 = [[0u32; MAX_MSG]; MAX_MSG_DEVICES];
    let mut taken0 = [[Taken::default(); MAX_MSG]; MAX_MSG_DEVICES];
    let list: [Option<MsgDev>; MAX_MSG_DEVICES] = devs;
    for (i, m) in list.iter().take(n).flatten().enumerate() {
        let ctx = MCTX[i].bind(m);
        let t = connect_messages(m, ctx)?;
        tables[i] = Some(t);
        DEVICES[i].store(m.md.index(), Ordering::Relaxed);
        COUNTS[i].store(m.count().min(MAX_MSG as u32), Ordering::Relaxed);
        for r in RAISED[i].iter() {
            r.store(0, Ordering::Relaxed);
        }
        for row in BY_CPU.iter().take(ncpu) {
            row[i].store(0, Ordering::Relaxed);
        }
        sent0[i] = sent_now(m);
        taken0[i] = taken_now(t);
        m.md.set_mask(0);
    }
    DEVICES_N.store(n as u32, Ordering::Release);
    TOKEN.store(0, Ordering::Release);
    TOTAL.store(0, Ordering::Release);
    STOP.store(false, Ordering::Release);
    let raisers = ncpu.min(MAX_RAISERS);
    for (slot, r) in RAISERS.iter().enumerate().take(raisers) {
        r.store((slot * ncpu / raisers) as u32, Ordering::Relaxed);
    }
    RAISERS_N.store(raisers as u32, Ordering::Release);
    let mut posted = Ok(());
    for (slot, r) in RAISERS.iter().enumerate().take(raisers).skip(1) {
        let c = r.load(Ordering::Relaxed) as usize;
        posted = posted.and_then(|()| smp::post(c, raiser, slot));
    }
    let start = time::now_us();
    let mut turn = 0;
    let limit = start + MAX_DURATION_US + MAX_DURATION_PER_CPU_US * raisers as u64;
    let going = |now: u64| {
        now < start + DURATION_US
            || ((TOTAL.load(Ordering::Acquire) < MIN_TOTAL
                || (TOKEN.load(Ordering::Acquire) as usize) < raisers)
                && now < limit)
    };
    while posted.is_ok() && going(time::now_us()) {
        pass(0, 0, turn);
        turn += 1;
    }
    STOP.store(true, Ordering::Release);
    let elapsed = time::now_us() - start;
    for c in 1..ncpu {
        if !percpu::cpu(c).mailbox.idle() {
            smp::wait(c, 2_000_000).map_err(Failure::from)?;
        }
    }
    posted.map_err(Failure::from)?;
    let Some(first) = list.iter().take(n).flatten().next() else {
        fail!("no device");
    };
    wait_io(first, "every raised message to be handled", || {
        (0..n).all(|d| {
            (0..COUNTS[d].load(Ordering::Relaxed) as usize)
                .all(|k| MCTX[d].inflight[k].load(Ordering::Acquire) == 0)
        })
    })?;
    settle_io(first);
    let mut total = 0u32;
    for (i, m) in list.iter().take(n).flatten().enumerate() {
        m.md.set_mask(m.all());
        let Some(t) = tables[i] else { continue };
        check_exact(m, &MCTX[i], t, &sent0[i], &taken0[i], |k| {
            RAISED[i][k].load(Ordering::Acquire)
        })?;
        MCTX[i].check_clean(m.name())?;
        for r in RAISERS.iter().take(raisers) {
            let c = r.load(Ordering::Relaxed) as usize;
            let by = BY_CPU[c][i].load(Ordering::Acquire);
            check!(
                by > 0,
                "cpu {} raised no message of {} {} (opening turns reached cpu {} of {} in {} ms)",
                crate::display::dec(c),
                m.name(),
                crate::display::dec(m.id()),
                crate::display::dec(TOKEN.load(Ordering::Acquire)),
                crate::display::dec(raisers),
                crate::display::dec(elapsed / 1000)
            );
        }
        total += (0..m.count() as usize)
            .map(|k| RAISED[i][k].load(Ordering::Acquire))
            .sum::<u32>();
    }
    println!(
        "# ex_msi_no_interrupt_lost_under_load: {} messages of {} devices raised from {} cpus in {} ms, each delivered and handled once",
        crate::display::dec(total),
        crate::display::dec(n),
        crate::display::dec(raisers),
        crate::display::dec(elapsed / 1000)
    );
    check!(
        elapsed >= DURATION_US && total >= MIN_TOTAL,
        "only {} messages in {} ms: the load is too light to mean anything",
        crate::display::dec(total),
        crate::display::dec(elapsed / 1000)
    );
    for t in tables.iter().take(n).flatten() {
        disconnect_messages(*t)?;
    }
    Ok(())
}
