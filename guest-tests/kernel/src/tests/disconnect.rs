//! `disconnect_` and `quota_`: IoDisconnectInterrupt while interrupts flow,
//! stale handles, and the host's object quota.

use irqconnect_abi::ntstatus::{
    STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE, STATUS_SUCCESS, status_name,
};

use super::pvfix::{
    self, Args, CTX, Ctx, Env, Policy, check_counts, connect, connect_ok, connect_refused,
    counters, disconnect_ok, objects_in_use, platform, settle, wait_for,
};
use crate::runner::{Test, TestResult};
use crate::wdm::{self, IoDisconnectInterrupt, KINTERRUPT_MODE, PKINTERRUPT};
use crate::{check, fail, pv, skip, time};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("disconnect_then_never_called", || {
        pvfix::run(then_never_called)
    }),
    Test::new("disconnect_stale_handle_invalid_handle", || {
        pvfix::run(stale_handle)
    }),
    Test::new("quota_exhausted_then_recovers", || pvfix::run(quota)),
];

/// A (slow ISR) and B share a latched vector on the APs; both
/// devices are raised by the host timers. A is disconnected while its
/// interrupts flow: when IoDisconnectInterrupt returns no call of A is
/// running, and A is never called again although its device's edges keep
/// arriving on the vector (B is called for them and declines).
fn then_never_called(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::Latched, false)?;
    // Off the BSP when there are APs: the disconnect runs on the BSP, so a
    // dispatch there could only nest inside it; on an AP it runs alongside.
    let mask = if env.online() & !1 != 0 {
        env.online() & !1
    } else {
        env.online()
    };
    let ib = CTX[1].bind(Some(&b), Policy::All, mask);
    let mut args_b = Args::of(&b, 0, &CTX[1]);
    args_b.mask = mask;
    let hb = connect_ok(&b, &args_b)?;
    b.td.enable(true);
    b.td.timer_start(400, 100);
    const ROUNDS: u32 = 4;
    for _ in 0..ROUNDS {
        let ia = CTX[0].bind(Some(&a), Policy::All, mask);
        ia.spin.store(1000, core::sync::atomic::Ordering::Relaxed);
        let mut args_a = Args::of(&a, 0, &CTX[0]);
        args_a.mask = mask;
        let ha = connect_ok(&a, &args_a)?;
        a.td.enable(true);
        a.td.timer_start(60, 100);
        wait_for("A to claim 3 causes", || ia.claimed() >= 3)?;
        let b_calls = ib.called();
        disconnect_ok(ha)?;
        let running = Ctx::get(&ia.in_isr);
        let calls = ia.called();
        check!(
            running == 0,
            "{} calls of A still running when IoDisconnectInterrupt returned",
            crate::display::dec(running)
        );
        // A's device keeps interrupting on the (still routed, shared)
        // vector: B is called for those edges, A never again.
        for _ in 0..3 {
            a.td.raise(1);
            time::delay_us(200);
        }
        wait_for("a delivery on the vector after A's disconnect", || {
            ib.called() > b_calls
        })?;
        time::wait_until(pvfix::TIMEOUT_US, || a.td.timer_remaining() == 0);
        settle();
        check!(
            ia.called() == calls,
            "A was called {} times after IoDisconnectInterrupt returned",
            crate::display::dec(ia.called() - calls)
        );
        a.td.enable(false);
        a.td.drain(1000);
        ia.check_clean("A")?;
    }
    b.td.timer_stop();
    settle();
    b.td.enable(false);
    ib.check_clean("B")?;
    disconnect_ok(hb)
}

/// A handle used after its disconnect: STATUS_INVALID_HANDLE from the
/// guest and from the host (its old host handle, 0, and a forged next
/// generation), nothing changes, and a new connection (which may reuse the
/// slot) is not disturbed.
fn stale_handle(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let h = connect_ok(&dev, &Args::of(&dev, 0, &CTX[0]))?;
    let host = h.host_handle();
    check!(host != 0, "the host answered handle 0 on success");
    disconnect_ok(h)?;
    let baseline = objects_in_use()?;
    let expect_invalid = |what: &str, status| -> TestResult {
        check!(
            status == STATUS_INVALID_HANDLE,
            "{}: {} ({}), expected STATUS_INVALID_HANDLE",
            what,
            status_name(status),
            crate::display::hex(status)
        );
        Ok(())
    };
    expect_invalid(
        "IoDisconnectInterrupt of a disconnected object",
        IoDisconnectInterrupt(h),
    )?;
    expect_invalid("host DISCONNECT of the old handle", pv::disconnect(host))?;
    expect_invalid("host DISCONNECT of handle 0", pv::disconnect(0))?;
    expect_invalid(
        "host DISCONNECT of the next generation of the slot",
        pv::disconnect(host.wrapping_add(1 << 32)),
    )?;
    check!(
        objects_in_use()? == baseline,
        "a refused disconnect changed the object count"
    );
    let ctx = CTX[1].bind(Some(&dev), Policy::One, env.online());
    let h2 = connect_ok(&dev, &Args::of(&dev, 0, &CTX[1]))?;
    check!(
        h2 != h && h2.host_handle() != host,
        "a new connection got the stale handle back"
    );
    expect_invalid(
        "IoDisconnectInterrupt of the stale object",
        IoDisconnectInterrupt(h),
    )?;
    expect_invalid("host DISCONNECT of the old handle", pv::disconnect(host))?;
    let base = counters(&dev);
    dev.td.enable(true);
    dev.td.raise(1);
    wait_for("the new connection's ISR to claim", || ctx.claimed() >= 1)?;
    settle();
    dev.td.enable(false);
    check_counts(&dev, base, ctx.claimed(), 1)?;
    disconnect_ok(h2)
}

/// Connections on a shared vector until the host's object quota is used
/// up exactly: one more object is STATUS_INSUFFICIENT_RESOURCES (nothing
/// recorded); after one disconnect the same connect succeeds.
fn quota(env: &Env) -> TestResult {
    let (dev, _) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    let p = platform()?;
    let free = p.object_quota.saturating_sub(p.objects_in_use) as usize;
    let (guest_conns, guest_objs) = wdm::usage();
    // Every online processor one destination names (all of them with at
    // most 8 processors).
    let online = env.effective(env.online())?;
    let k = online.count_ones() as usize;
    const MAX_HANDLES: usize = 80;
    if free > wdm::MAX_OBJECTS - guest_objs || free / k + 2 > MAX_HANDLES.min(128 - guest_conns) {
        skip!(
            "host quota {} exceeds what this test holds (guest pool {} objects)",
            crate::display::dec(p.object_quota),
            crate::display::dec(wdm::MAX_OBJECTS)
        );
    }
    let mut handles: [Option<PKINTERRUPT>; MAX_HANDLES] = [None; MAX_HANDLES];
    let mut n = 0;
    let mut args = Args::of(&dev, 0, &CTX[0]);
    args.share = true;
    args.mask = online;
    let result = (|| -> TestResult {
        for _ in 0..free / k {
            handles[n] = Some(connect_ok(&dev, &args)?);
            n += 1;
        }
        let rest = free % k;
        if rest > 0 {
            let mut partial = args;
            partial.mask = pvfix::cpus(online).take(rest).fold(0, |m, c| m | (1 << c));
            handles[n] = Some(connect_ok(&dev, &partial)?);
            n += 1;
        }
        let full = platform()?;
        check!(
            full.objects_in_use == full.object_quota,
            "{} of {} objects in use after filling the quota",
            crate::display::dec(full.objects_in_use),
            crate::display::dec(full.object_quota)
        );
        let mut one = args;
        one.mask = online & online.wrapping_neg();
        connect_refused(
            &dev,
            &one,
            STATUS_INSUFFICIENT_RESOURCES,
            "one object over the quota",
        )?;
        connect_refused(
            &dev,
            &args,
            STATUS_INSUFFICIENT_RESOURCES,
            "a full mask over the quota",
        )?;
        // Free k objects: the full-mask connect now fits.
        let Some(first) = handles[0].take() else {
            fail!("no connection was made");
        };
        disconnect_ok(first)?;
        let (status, h) = connect(&dev, &args);
        check!(
            status == STATUS_SUCCESS,
            "after a disconnect the connect still answered {}",
            status_name(status)
        );
        handles[0] = h;
        Ok(())
    })();
    for h in handles.iter_mut().take(n) {
        if let Some(h) = h.take() {
            disconnect_ok(h)?;
        }
    }
    result
}
