//! `retarget_`: IoRetargetInterrupt over RETARGET (`docs/semantics.md`,
//! "RETARGET"). Each guarantee has its test: an edge raised around every
//! move is claimed exactly once; a level interrupt in flight on the old
//! processor completes there and the line's next delivery goes to the new
//! set (observable where the LAPIC holds ISR until EOI: user mode); a
//! shared vector's route stays the union of its sharers; every message of
//! a MESSAGE_BASED connection moves; a stale or forged handle, a processor
//! the VM lacks, an empty mask, another group and a reserved flag are
//! refused and change nothing.

use core::sync::atomic::Ordering;

use irqconnect_abi::ntstatus::{
    STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER, STATUS_SUCCESS, status_name,
};
use irqconnect_abi::pv::{Retarget, irq_policy};

use super::fixture::{need_cpus, need_isr_held};
use super::msgfix::{self, MCTX, connect_table, disconnect_messages, params, raise_one};
use super::pvfix::{
    self, Args, CTX, Ctx, Env, Policy, check_counts, counters, deliveries, settle, wait_for,
};
use super::scale::{check_route, inside};
use super::topo::Topo;
use crate::pv::{self, Request};
use crate::runner::{Test, TestResult};
use crate::wdm::{self, IoRetargetInterrupt, KAFFINITY, KINTERRUPT_MODE, PKINTERRUPT};
use crate::{check, fail, ioapic, percpu};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("retarget_edge_no_loss_no_duplicate", || {
        pvfix::run(edge_no_loss)
    }),
    Test::new("retarget_level_remote_irr_redelivers_to_new_set", || {
        pvfix::run(level_remote_irr)
    }),
    Test::new("retarget_shared_vector_keeps_union", || {
        pvfix::run(shared_union)
    }),
    Test::new("retarget_message_based_each_message", || {
        pvfix::run(message_based)
    }),
    Test::new("retarget_stale_handle_invalid_handle", || {
        pvfix::run(stale_handle)
    }),
    Test::new("retarget_mask_outside_vm_invalid_parameter", || {
        pvfix::run(outside_vm)
    }),
];

/// IoRetargetInterrupt, expecting success and the effective mask `want`.
fn retarget_ok(h: PKINTERRUPT, mask: KAFFINITY, want: KAFFINITY) -> TestResult {
    let status = IoRetargetInterrupt(h, 0, mask);
    check!(
        status == STATUS_SUCCESS && h.effective_mask() == want,
        "IoRetargetInterrupt to {}: {}, effective mask {}, expected {}",
        crate::display::hex(mask),
        status_name(status),
        crate::display::hex(h.effective_mask()),
        crate::display::hex(want)
    );
    Ok(())
}

/// Two single processors for moves: two APs when there are, else the two
/// processors.
fn two_cpus() -> (usize, usize) {
    if percpu::count() >= 3 { (1, 2) } else { (0, 1) }
}

/// An edge device moved between two processors twenty times, a cause
/// raised just before every move (in flight across it): each cause is
/// claimed exactly once (delivered once, nowhere else, nothing left
/// unclaimed), and once a move returned its old processor takes nothing.
fn edge_no_loss(env: &Env) -> TestResult {
    need_cpus(2)?;
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    let (a, b) = two_cpus();
    let (ma, mb) = (1u64 << a, 1u64 << b);
    let ctx = CTX[0].bind(Some(&dev), Policy::All, ma | mb);
    let mut args = Args::of(&dev, 0, &CTX[0]);
    args.mask = ma;
    let h = pvfix::connect_ok(&dev, &args)?;
    pvfix::flush_cpus();
    let v = dev.vector();
    let before = deliveries(v);
    let unclaimed: u32 = (0..percpu::count()).map(|c| wdm::unclaimed(c, v)).sum();
    let base = counters(&dev);
    dev.td.enable(true);
    const N: u32 = 20;
    let mut now = ma;
    for i in 1..=N {
        let (next, old) = if now == ma { (mb, a) } else { (ma, b) };
        dev.td.raise(1);
        retarget_ok(h, next, next)?;
        let old_then = percpu::cpu(old).count(v);
        wait_for("the cause raised across the move", || ctx.claimed() >= i)?;
        check!(
            percpu::cpu(old).count(v) == old_then,
            "move {}: cpu {} took vector {} after it left",
            crate::display::dec(i),
            crate::display::dec(old),
            crate::display::hex(v)
        );
        check_route(&dev, 0, next)?;
        now = next;
    }
    settle();
    dev.td.enable(false);
    check_counts(&dev, base, ctx.claimed(), N)?;
    let since = inside(v, &before, 0, ma | mb)?;
    let total: u32 = since.iter().sum();
    let unclaimed_now: u32 = (0..percpu::count()).map(|c| wdm::unclaimed(c, v)).sum();
    check!(
        total == N && unclaimed_now == unclaimed,
        "{} causes: {} deliveries, {} unclaimed",
        crate::display::dec(N),
        crate::display::dec(total),
        crate::display::dec(unclaimed_now - unclaimed)
    );
    ctx.check_clean("across the moves")?;
    pvfix::disconnect_ok(h)
}

/// A level device with two causes, one claimed per call, on processor A;
/// its first call is held (in flight) while the connection moves to B. The
/// move waits for it: the held call completes on A. The line is still
/// asserted (one cause left), so after its EOI the IOAPIC delivers again:
/// where the LAPIC holds ISR until EOI (user mode) Remote IRR is set
/// during the move and that delivery goes to B; where the host EOIs at
/// injection (kernel, split: "Host KVM quirks") it may already be pending
/// on A before the move, and A's objects, still linked, take it. Either
/// way both causes are claimed once, on A or B, and nothing reaches A
/// once the move returned.
fn level_remote_irr(env: &Env) -> TestResult {
    need_cpus(3)?;
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let (a, b) = (1usize, 2usize);
    let (ma, mb) = (1u64 << a, 1u64 << b);
    let ctx = CTX[0].bind(Some(&dev), Policy::One, ma | mb);
    let mut args = Args::of(&dev, 0, &CTX[0]);
    args.mask = ma;
    let h = pvfix::connect_ok(&dev, &args)?;
    pvfix::flush_cpus();
    let v = dev.vector();
    let base = counters(&dev);
    ctx.hold_next_us.store(30_000, Ordering::Release);
    dev.td.enable(true);
    dev.td.raise(2);
    wait_for("the first call in flight", || {
        ctx.in_isr.load(Ordering::Acquire) == 1
    })?;
    let remote_irr = ioapic::read_rte(dev.line() as u8) & (1 << 14) != 0;
    retarget_ok(h, mb, mb)?;
    let on_a = Ctx::get(&ctx.per_cpu[a]);
    check!(
        on_a >= 1,
        "the held call did not complete on cpu {} before the move returned",
        crate::display::dec(a)
    );
    let a_then = percpu::cpu(a).count(v);
    wait_for("both causes claimed", || ctx.claimed() >= 2)?;
    settle();
    dev.td.enable(false);
    check_counts(&dev, base, ctx.claimed(), 2)?;
    check!(
        percpu::cpu(a).count(v) == a_then,
        "cpu {} took vector {} after the move returned",
        crate::display::dec(a),
        crate::display::hex(v)
    );
    ctx.check_clean("of the level device")?;
    let on_b = Ctx::get(&ctx.per_cpu[b]);
    pvfix::disconnect_ok(h)?;
    if need_isr_held().is_ok() {
        check!(
            remote_irr && on_b == 1,
            "Remote IRR during the move {}, claims on the new processor {} (expected set, 1)",
            crate::display::dec(u8::from(remote_irr)),
            crate::display::dec(on_b)
        );
    }
    Ok(())
}

/// Two sharers of one vector on two pins: A on processor 1, B on 2, the
/// route their union; A moves to 3: both pins route to {2, 3}; A moves
/// onto B's processor: {2}, and a cause of each is claimed there by its
/// own ISR; a move of A to a processor no destination reaches with B's is
/// refused (STATUS_INVALID_PARAMETER) and changes nothing.
fn shared_union(env: &Env) -> TestResult {
    need_cpus(4)?;
    let (da, db) = env.shared_pair(KINTERRUPT_MODE::Latched, false)?;
    let ia = CTX[0].bind(Some(&da), Policy::All, 0b1010 | 0b100);
    let ib = CTX[1].bind(Some(&db), Policy::All, 0b100);
    let mut args_a = Args::of(&da, 0, &CTX[0]);
    let mut args_b = Args::of(&db, 0, &CTX[1]);
    args_a.mask = 0b10;
    args_b.mask = 0b100;
    let ha = pvfix::connect_ok(&da, &args_a)?;
    let hb = pvfix::connect_ok(&db, &args_b)?;
    check_route(&da, 0, 0b110)?;
    retarget_ok(ha, 0b1000, 0b1000)?;
    check_route(&da, 0, 0b1100)?;
    check_route(&db, 0, 0b1100)?;
    retarget_ok(ha, 0b100, 0b100)?;
    check_route(&da, 0, 0b100)?;
    check_route(&db, 0, 0b100)?;
    pvfix::flush_cpus();
    let before = deliveries(da.vector());
    let (ca, cb) = (counters(&da), counters(&db));
    da.td.enable(true);
    db.td.enable(true);
    da.td.raise(1);
    db.td.raise(1);
    wait_for("both sharers' causes claimed", || {
        ia.claimed() >= 1 && ib.claimed() >= 1
    })?;
    settle();
    da.td.enable(false);
    db.td.enable(false);
    check_counts(&da, ca, ia.claimed(), 1)?;
    check_counts(&db, cb, ib.claimed(), 1)?;
    inside(da.vector(), &before, 0, 0b100)?;
    if let Some(o) = Topo::get()?.outside_of_1() {
        let status = IoRetargetInterrupt(ha, 0, 1u64 << o);
        check!(
            status == STATUS_INVALID_PARAMETER && ha.effective_mask() == 0b100,
            "move of a sharer to cpu {} outside the route's domain: {}, effective {}",
            crate::display::dec(o),
            status_name(status),
            crate::display::hex(ha.effective_mask())
        );
        check_route(&da, 0, 0b100)?;
    }
    ia.check_clean("A")?;
    ib.check_clean("B")?;
    pvfix::disconnect_ok(ha)?;
    pvfix::disconnect_ok(hb)
}

/// A MESSAGE_BASED connection of the spread-policy device moves to two
/// processors, then to one: every message's table entry and interrupt
/// object name its new processor (the (k mod 2)-th of the two, then the
/// one), together they cover the mask, the host holds one object per
/// message, and each message raised runs only there.
fn message_based(env: &Env) -> TestResult {
    need_cpus(2)?;
    let m = env.message_device("device with the spread policy", |m| {
        m.info.policy == irq_policy::SPREAD_MESSAGES_ACROSS_ALL_PROCESSORS
    })?;
    let (a, b) = two_cpus();
    let ctx = MCTX[0].bind(&m);
    let mut p = params(&m, ctx);
    let t = connect_table(&m, ctx, &mut p)?;
    let Some(first) = t.MessageInfo(0) else {
        fail!("message 0 missing from the table");
    };
    let h = first.InterruptObject;
    for (mask, picks) in [((1u64 << a) | (1u64 << b), [a, b]), (1u64 << b, [b, b])] {
        let status = IoRetargetInterrupt(h, 0, mask);
        check!(
            status == STATUS_SUCCESS,
            "IoRetargetInterrupt of the message group to {}: {}",
            crate::display::hex(mask),
            status_name(status)
        );
        ctx.learn(t);
        let mut union = 0;
        for k in 0..m.count() {
            let want = 1u64 << picks[k as usize % 2];
            let e = t.MessageInfo(k).unwrap_or(first);
            check!(
                e.TargetProcessorSet == want && e.InterruptObject.effective_mask() == want,
                "message {} after the move to {}: table {}, object {}, expected {}",
                crate::display::dec(k),
                crate::display::hex(mask),
                crate::display::hex(e.TargetProcessorSet),
                crate::display::hex(e.InterruptObject.effective_mask()),
                crate::display::hex(want)
            );
            union |= want;
        }
        let objects = pvfix::platform()?.objects_in_use - env.platform.objects_in_use;
        check!(
            objects == m.count() && union == mask,
            "after the move to {}: the host holds {} objects for {} messages, they cover {}",
            crate::display::hex(mask),
            crate::display::dec(objects),
            crate::display::dec(m.count()),
            crate::display::hex(union)
        );
        m.md.set_mask(0);
        for k in 0..m.count() {
            raise_one(&m, ctx, k, 1 + u32::from(mask == 1u64 << b))?;
        }
        msgfix::settle_io(&m);
        m.md.set_mask(m.all());
        ctx.check_clean("after the move")?;
    }
    disconnect_messages(t)
}

/// A handle whose connection is gone: IoRetargetInterrupt answers
/// STATUS_INVALID_HANDLE without the host; the host answers a RETARGET of
/// its old handle and of a forged one with STATUS_INVALID_HANDLE.
fn stale_handle(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    let mut args = Args::of(&dev, 0, &CTX[0]);
    args.mask = 1;
    let h = pvfix::connect_ok(&dev, &args)?;
    let host = h.host_handle();
    pvfix::disconnect_ok(h)?;
    let asked = pv::requests();
    let status = IoRetargetInterrupt(h, 0, 1);
    check!(
        status == STATUS_INVALID_HANDLE && pv::requests() == asked,
        "IoRetargetInterrupt of a disconnected interrupt: {}, host asked {} times",
        status_name(status),
        crate::display::dec(pv::requests() - asked)
    );
    for handle in [host, 0, host ^ (1 << 40)] {
        let mut req = Retarget::blank();
        req.handle = handle;
        req.processor_mask = 1;
        let (status, answer) = pv::retarget(req);
        check!(
            status == STATUS_INVALID_HANDLE && answer.effective_mask == 0,
            "RETARGET of handle {}: {}",
            crate::display::hex(handle),
            status_name(status)
        );
    }
    Ok(())
}

/// A processor the VM lacks, an empty mask, another group and a reserved
/// flag: STATUS_INVALID_PARAMETER, and the connection, its route and the
/// object counts stay as they were.
fn outside_vm(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    let mut args = Args::of(&dev, 0, &CTX[0]);
    args.mask = 1;
    let h = pvfix::connect_ok(&dev, &args)?;
    let t = Topo::get()?;
    let objects = pvfix::platform()?.objects_in_use;
    let usage = wdm::usage();
    let size = t.groups.group_sizes[0];
    let mut cases: [(u16, KAFFINITY, &str); 3] = [
        (0, 0, "an empty mask"),
        (t.groups.group_count, 1, "a group the VM lacks"),
        (0, 0, ""),
    ];
    if size < 64 {
        cases[2] = (0, 1 | (1u64 << size), "a processor the VM lacks");
    } else if t.groups.group_count > 1 {
        cases[2] = (1, 1, "another group than the connection's");
    }
    for (group, mask, what) in cases.iter().filter(|c| !c.2.is_empty()) {
        let status = IoRetargetInterrupt(h, *group, *mask);
        check!(
            status == STATUS_INVALID_PARAMETER,
            "{} (group {} mask {}): {}",
            what,
            crate::display::dec(*group),
            crate::display::hex(*mask),
            status_name(status)
        );
        check!(
            h.effective_mask() == 1 && wdm::usage() == usage,
            "{}: the connection changed (effective {})",
            what,
            crate::display::hex(h.effective_mask())
        );
    }
    let mut req = Retarget::blank();
    req.handle = h.host_handle();
    req.processor_mask = 1;
    req.flags = 1;
    let (status, _) = pv::retarget(req);
    check!(
        status == STATUS_INVALID_PARAMETER,
        "RETARGET with a reserved flag: {}",
        status_name(status)
    );
    check_route(&dev, 0, 1)?;
    check!(
        pvfix::platform()?.objects_in_use == objects,
        "a refused move changed the host's objects"
    );
    if t.n > 64 {
        // The guest refuses nothing itself: the host answers a group it
        // has for a connection of another group.
        let status = IoRetargetInterrupt(h, 1, 1);
        check!(
            status == STATUS_INVALID_PARAMETER,
            "group 1: {}",
            status_name(status)
        );
    }
    pvfix::disconnect_ok(h)
}
