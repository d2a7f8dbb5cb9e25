//! `rule10_`: the full docs/semantics.md rule 10 for a device with several
//! interrupt resources (one ISR, several vectors): at every CONNECT, the
//! first one included, a SpinLock that is the same for all the device's
//! connections, and a SynchronizeIrql of at least the largest Irql of any
//! of its resources, connected or not. Regression tests for the three
//! gaps the partial rule had: a first connection without a lock, two
//! different locks, and the lower vector connected first with its own
//! Irql.

use core::sync::atomic::Ordering;

use irqconnect_abi::ntstatus::{STATUS_INVALID_PARAMETER, STATUS_SUCCESS, status_name};

use super::pvfix::{
    self, Args, CTX, Dev, Env, LOCKS, Policy, check_counts, connect_fs, connect_ok,
    connect_refused, counters, disconnect_ex, disconnect_ex_ok, disconnect_ok, settle, wait_for,
};
use crate::runner::{Failure, Test, TestResult};
use crate::wdm::{
    CONNECT_FULLY_SPECIFIED, CONNECT_LINE_BASED, IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS,
    IO_CONNECT_INTERRUPT_PARAMETERS, IoConnectInterruptEx, KINTERRUPT_MODE, KIRQL, KSPIN_LOCK,
    KeInitializeSpinLock, NTSTATUS, PKINTERRUPT,
};
use crate::{check, lines};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("rule10_spin_lock_must_be_shared_by_all_vectors", || {
        pvfix::run(one_lock)
    }),
    Test::new(
        "rule10_sync_irql_covers_all_device_irqls_low_vector_first",
        || pvfix::run(low_vector_first),
    ),
];

/// The multi-vector device, its (lower, higher)-Irql resource indices and
/// its largest Irql.
fn device(env: &Env) -> Result<(Dev, usize, usize, KIRQL), Failure> {
    let dev = env.multi_vector()?;
    let (r0, r1) = (dev.res(0), dev.res(1));
    let (lo, hi) = if r1.level >= r0.level { (0, 1) } else { (1, 0) };
    Ok((dev, lo, hi, r0.level.max(r1.level)))
}

/// Resource `r`'s arguments with `lock` and `sync`, context `CTX[r]`.
fn args(dev: &Dev, r: usize, lock: Option<&'static KSPIN_LOCK>, sync: KIRQL) -> Args {
    let mut a = Args::of(dev, r, &CTX[r]);
    a.lock = lock;
    a.sync = sync;
    a
}

/// The classic call and FULLY_SPECIFIED both refuse `a` with
/// STATUS_INVALID_PARAMETER and connect nothing.
fn refused(dev: &Dev, a: &Args, what: &str) -> TestResult {
    connect_refused(dev, a, STATUS_INVALID_PARAMETER, what)?;
    let (status, h) = connect_fs(dev, a);
    if let Some(h) = h {
        let _ = disconnect_ex(CONNECT_FULLY_SPECIFIED, h);
    }
    check!(
        status == STATUS_INVALID_PARAMETER,
        "{} (FULLY_SPECIFIED): {} ({}), expected STATUS_INVALID_PARAMETER",
        what,
        status_name(status),
        crate::display::hex(status)
    );
    Ok(())
}

/// Interrupts on both vectors (resource 0 by its test device, the other by
/// its bare line) reach the ISR at `sync` holding `lock`.
fn deliver_both(dev: &Dev, lock: &'static KSPIN_LOCK) -> TestResult {
    let (r0, r1) = (dev.res(0), dev.res(1));
    let (c0, c1) = (&CTX[0], &CTX[1]);
    c0.bind(Some(dev), Policy::One, r0.affinity);
    c1.bind(None, Policy::One, r1.affinity);
    for c in [c0, c1] {
        c.lock.store(lock.address() as usize, Ordering::Release);
    }
    let base = counters(dev);
    dev.td.enable(true);
    let line1 = u8::try_from(r1.line).unwrap_or(u8::MAX);
    const N: u32 = 2;
    for n in 1..=N {
        dev.td.raise(1);
        wait_for("the ISR on the first vector", || c0.claimed() >= n)?;
        c1.soft_pending.fetch_add(1, Ordering::AcqRel);
        if r1.interrupt_mode() == KINTERRUPT_MODE::Latched {
            lines::pulse(line1);
        } else {
            lines::set(line1, true);
        }
        wait_for("the ISR on the second vector", || c1.claimed() >= n)?;
        lines::set(line1, false);
    }
    settle();
    dev.td.enable(false);
    check_counts(dev, base, c0.claimed(), N)?;
    c0.check_clean("on the first vector")?;
    c1.check_clean("on the second vector")
}

/// LINE_BASED of `dev` with `lock` and `sync`: the status and the handle.
fn line_based(
    dev: &Dev,
    lock: Option<&'static KSPIN_LOCK>,
    sync: KIRQL,
) -> (NTSTATUS, Option<PKINTERRUPT>) {
    let mut p = IO_CONNECT_INTERRUPT_PARAMETERS::new(CONNECT_LINE_BASED);
    p.LineBased = IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS {
        PhysicalDeviceObject: Some(&dev.obj),
        ServiceRoutine: Some(pvfix::device_isr),
        ServiceContext: CTX[0].as_context(),
        SpinLock: lock,
        SynchronizeIrql: sync,
        ..Default::default()
    };
    let status = IoConnectInterruptEx(&mut p);
    (status, p.LineBased.InterruptObject)
}

/// Without a lock even the first connection is refused (either vector,
/// classic and FULLY_SPECIFIED). With a lock, a second connection under
/// another lock, or none, is refused whichever vector came first; under
/// the same lock it connects and both vectors reach the ISR holding it;
/// LINE_BASED without a lock (the system's, another one) is refused then.
/// Alone, LINE_BASED without a driver lock gets one lock for both lines.
fn one_lock(env: &Env) -> TestResult {
    let (dev, lo, hi, top) = device(env)?;
    let (l0, l1) = (&LOCKS[0], &LOCKS[1]);
    KeInitializeSpinLock(l0);
    KeInitializeSpinLock(l1);
    for r in [lo, hi] {
        refused(
            &dev,
            &args(&dev, r, None, top),
            "the first connection of a two-vector device without a lock",
        )?;
    }
    for (first, second) in [(hi, lo), (lo, hi)] {
        let h = connect_ok(&dev, &args(&dev, first, Some(l0), top))?;
        if first == hi {
            // The system's lock of a LINE_BASED group is not L0 either.
            let before = pvfix::objects_in_use()?;
            let (status, g) = line_based(&dev, None, 0);
            if let Some(g) = g {
                let _ = disconnect_ex(CONNECT_LINE_BASED, g);
            }
            check!(
                status == STATUS_INVALID_PARAMETER && pvfix::objects_in_use()? == before,
                "LINE_BASED without a lock while a vector is connected under the driver's lock: {} ({})",
                status_name(status),
                crate::display::hex(status)
            );
        }
        refused(
            &dev,
            &args(&dev, second, Some(l1), top),
            "the second vector under another lock",
        )?;
        refused(
            &dev,
            &args(&dev, second, None, top),
            "the second vector without a lock",
        )?;
        let h2 = connect_ok(&dev, &args(&dev, second, Some(l0), top))?;
        deliver_both(&dev, l0)?;
        disconnect_ok(h2)?;
        disconnect_ok(h)?;
    }
    // LINE_BASED leaves the lock to the system: one for every line.
    let (status, h) = line_based(&dev, None, 0);
    check!(
        status == STATUS_SUCCESS,
        "LINE_BASED of the two-vector device without a lock: {} ({})",
        status_name(status),
        crate::display::hex(status)
    );
    if let Some(h) = h {
        disconnect_ex_ok(CONNECT_LINE_BASED, h)?;
    }
    Ok(())
}

/// The lower-Irql vector first, with the lock but its own Irql as
/// SynchronizeIrql: refused (the device's highest Irql counts even before
/// its vector is connected), classic, FULLY_SPECIFIED and LINE_BASED
/// alike. With the highest Irql both vectors connect in that order and
/// their interrupts run at it under the lock.
fn low_vector_first(env: &Env) -> TestResult {
    let (dev, lo, hi, top) = device(env)?;
    let low = dev.res(lo).level;
    if low == top {
        crate::skip!("both resources of the two-vector device have Irql {}", top);
    }
    let lock = &LOCKS[0];
    KeInitializeSpinLock(lock);
    refused(
        &dev,
        &args(&dev, lo, Some(lock), low),
        "the lower vector first with SynchronizeIrql = its own Irql",
    )?;
    let before = pvfix::objects_in_use()?;
    let (status, h) = line_based(&dev, Some(lock), low);
    if let Some(h) = h {
        let _ = disconnect_ex(CONNECT_LINE_BASED, h);
    }
    check!(
        status == STATUS_INVALID_PARAMETER && pvfix::objects_in_use()? == before,
        "LINE_BASED with SynchronizeIrql = the lower Irql: {} ({}), expected STATUS_INVALID_PARAMETER",
        status_name(status),
        crate::display::hex(status)
    );
    let h_lo = connect_ok(&dev, &args(&dev, lo, Some(lock), top))?;
    let h_hi = connect_ok(&dev, &args(&dev, hi, Some(lock), top))?;
    check!(
        h_lo.synchronize_irql() == top && h_hi.synchronize_irql() == top,
        "SynchronizeIrql {} and {}, expected {}",
        crate::display::dec(h_lo.synchronize_irql()),
        crate::display::dec(h_hi.synchronize_irql()),
        crate::display::dec(top)
    );
    deliver_both(&dev, lock)?;
    disconnect_ok(h_hi)?;
    disconnect_ok(h_lo)
}
