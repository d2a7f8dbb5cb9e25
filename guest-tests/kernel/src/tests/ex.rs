//! `ex_`: IoConnectInterruptEx's line-based versions and its refusals
//! (`docs/semantics.md`, "IoConnectInterruptEx": X1..X3, FULLY_SPECIFIED,
//! LINE_BASED L1..L2), and the PASSIVE_LEVEL rule of every connect and
//! disconnect.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use irqconnect_abi::ntstatus::{
    STATUS_INVALID_HANDLE, STATUS_INVALID_LEVEL, STATUS_INVALID_PARAMETER,
    STATUS_INVALID_PARAMETER_1, STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND, STATUS_SUCCESS,
    status_name,
};
use irqconnect_abi::pv::ConnectEx;

use super::msgfix::{self, MCTX};
use super::pvfix::{
    self, Args, CTX, Dev, Env, LOCKS, Policy, check_counts, connect, connect_fs, connect_ok,
    counters, device_isr, disconnect_ex, disconnect_ex_ok, disconnect_ok, fs_params,
    objects_in_use, platform, route, settle, wait_for,
};
use crate::pv::{self, Request};
use crate::runner::{Failure, Test, TestResult};
use crate::wdm::{
    self, CONNECT_FULLY_SPECIFIED, CONNECT_FULLY_SPECIFIED_GROUP, CONNECT_LINE_BASED,
    CONNECT_MESSAGE_BASED, IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS,
    IO_CONNECT_INTERRUPT_PARAMETERS, IO_INTERRUPT_CONNECTION_CONTEXT, IoConnectInterruptEx,
    IoDisconnectInterrupt, KINTERRUPT, KINTERRUPT_MODE, KIRQL, KSPIN_LOCK, KeInitializeSpinLock,
    NTSTATUS, PKINTERRUPT, PVOID,
};
use crate::{check, fail, irql, lines, percpu};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("ex_fully_specified_behaves_as_classic", || {
        pvfix::run(fully_specified)
    }),
    Test::new("ex_line_based_connects_every_line_resource", || {
        pvfix::run(line_based)
    }),
    Test::new("ex_unknown_version_rejected", || {
        pvfix::run(unknown_version)
    }),
    Test::new("ex_connect_above_passive_level_refused", || {
        pvfix::run(above_passive)
    }),
];

/// Fails unless `status` is `want`.
fn expect(what: &str, status: NTSTATUS, want: NTSTATUS) -> TestResult {
    check!(
        status == want,
        "{}: {} ({}), expected {}",
        what,
        status_name(status),
        crate::display::hex(status),
        status_name(want)
    );
    Ok(())
}

/// The host's (objects in use, connections) and the guest's usage now.
fn usage() -> Result<(u32, u32, (usize, usize)), Failure> {
    let p = platform()?;
    Ok((p.objects_in_use, p.connections, wdm::usage()))
}

/// Fails unless nothing was connected since `before` ([`usage`]).
fn nothing_connected(what: &str, before: (u32, u32, (usize, usize))) -> TestResult {
    let now = usage()?;
    check!(
        now == before,
        "{}: connected something: host {} objects / {} connections (was {} / {}), guest {} connections (was {})",
        what,
        crate::display::dec(now.0),
        crate::display::dec(now.1),
        crate::display::dec(before.0),
        crate::display::dec(before.1),
        crate::display::dec(now.2.0),
        crate::display::dec(before.2.0)
    );
    Ok(())
}

/// The same refusal from IoConnectInterrupt (`classic`) and from
/// IoConnectInterruptEx FULLY_SPECIFIED (`ex`), nothing connected by
/// either, `*InterruptObject` left empty.
fn refused_both(dev: &Dev, a: &Args, classic: NTSTATUS, ex: NTSTATUS, what: &str) -> TestResult {
    let before = usage()?;
    let (s1, h1) = connect(dev, a);
    let (s2, h2) = connect_fs(dev, a);
    if let Some(h) = h1 {
        let _ = IoDisconnectInterrupt(h);
    }
    if let Some(h) = h2 {
        let _ = disconnect_ex(CONNECT_FULLY_SPECIFIED, h);
    }
    expect(what, s1, classic)?;
    expect(what, s2, ex)?;
    check!(
        h1.is_none() && h2.is_none(),
        "{}: *InterruptObject set on failure",
        what
    );
    nothing_connected(what, before)
}

/// Fails unless `dev`'s pin is routed, unmasked, on its vector to `mask`.
fn check_routed(dev: &Dev, r: usize, mask: u64, connections: u32) -> TestResult {
    let res = dev.res(r);
    let q = route(res.line)?;
    check!(
        q.masked == 0
            && u32::from(q.vector) == res.vector
            && q.destination_mask == mask
            && q.connections == connections,
        "route of pin {}: masked {} vector {} destination {} connections {}, expected unmasked {} to {} with {}",
        crate::display::dec(res.line),
        crate::display::dec(q.masked),
        crate::display::hex(q.vector),
        crate::display::hex(q.destination_mask),
        crate::display::dec(q.connections),
        crate::display::hex(res.vector),
        crate::display::hex(mask),
        crate::display::dec(connections)
    );
    Ok(())
}

/// Fails unless `dev`'s pin `r` is masked.
fn check_masked(dev: &Dev, r: usize) -> TestResult {
    let line = dev.res(r).line;
    check!(
        route(line)?.masked == 1,
        "pin {} still unmasked after the last disconnect",
        crate::display::dec(line)
    );
    Ok(())
}

/// FULLY_SPECIFIED connects one resource as IoConnectInterrupt does: the
/// same deliveries, route and refusals (but rule 2's
/// STATUS_INVALID_PARAMETER_10), the group variant in group 0 only (X3),
/// a handle the classic DISCONNECT accepts, and a shared chain with a
/// classic connection.
fn fully_specified(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let ctx = CTX[0].bind(Some(&dev), Policy::One, env.online());
    let a = Args::of(&dev, 0, &CTX[0]);
    let mut p = fs_params(&dev, &a, CONNECT_FULLY_SPECIFIED);
    expect(
        "FULLY_SPECIFIED",
        IoConnectInterruptEx(&mut p),
        STATUS_SUCCESS,
    )?;
    let Some(h) = p.FullySpecified.InterruptObject else {
        fail!("FULLY_SPECIFIED succeeded without an interrupt object");
    };
    ctx.expect_object.store(h.to_bits(), Ordering::Release);
    let mask = env.effective(a.mask)?;
    check!(
        p.Version == CONNECT_FULLY_SPECIFIED
            && h.effective_mask() == mask
            && h.synchronize_irql() == a.sync
            && h.vector() == dev.vector()
            && h.message_id().is_none()
            && h.group() == Some(h),
        "FULLY_SPECIFIED: Version {} after, effective mask {} (expected {}), SynchronizeIrql {}",
        crate::display::dec(p.Version),
        crate::display::hex(h.effective_mask()),
        crate::display::hex(mask),
        crate::display::dec(h.synchronize_irql())
    );
    check_routed(&dev, 0, mask, 1)?;
    let base = counters(&dev);
    dev.td.enable(true);
    dev.td.raise(1);
    wait_for("the ISR to claim 1 cause", || ctx.claimed() >= 1)?;
    dev.td.raise(3);
    wait_for("the ISR to claim 4 causes", || ctx.claimed() >= 4)?;
    settle();
    dev.td.enable(false);
    check_counts(&dev, base, ctx.claimed(), 4)?;
    ctx.check_clean("of the FULLY_SPECIFIED connection")?;
    disconnect_ex_ok(CONNECT_FULLY_SPECIFIED, h)?;
    check_masked(&dev, 0)?;
    expect(
        "IoDisconnectInterruptEx of the disconnected object",
        disconnect_ex(CONNECT_FULLY_SPECIFIED, h),
        STATUS_INVALID_HANDLE,
    )?;

    // The CONNECT rules, answered alike (rule 2 with the Ex status).
    let mut b = a;
    b.mask = 0;
    refused_both(
        &dev,
        &b,
        STATUS_INVALID_PARAMETER,
        STATUS_INVALID_PARAMETER_10,
        "mask 0",
    )?;
    if !env.online() != 0 {
        b.mask = !env.online();
        refused_both(
            &dev,
            &b,
            STATUS_INVALID_PARAMETER,
            STATUS_INVALID_PARAMETER_10,
            "mask of absent processors only",
        )?;
    }
    let mut b = a;
    b.sync = a.irql - 1;
    refused_both(
        &dev,
        &b,
        STATUS_INVALID_PARAMETER,
        STATUS_INVALID_PARAMETER,
        "SynchronizeIrql = Irql - 1",
    )?;
    let mut b = a;
    b.irql += 1;
    b.sync = b.irql;
    refused_both(
        &dev,
        &b,
        STATUS_INVALID_PARAMETER,
        STATUS_INVALID_PARAMETER,
        "Irql = class + 1",
    )?;
    let mut b = a;
    b.routine = None;
    refused_both(
        &dev,
        &b,
        STATUS_INVALID_PARAMETER,
        STATUS_INVALID_PARAMETER,
        "ServiceRoutine NULL",
    )?;
    if let Some(other) = (0..pvfix::MAX_DEVICES)
        .filter_map(|i| env.device(i))
        .filter(|d| d.id() != dev.id())
        .map(|d| d.res(0).vector)
        .find(|&v| v != a.vector)
    {
        let mut b = a;
        b.vector = other;
        b.irql = (other >> 4) as KIRQL;
        b.sync = b.irql;
        refused_both(
            &dev,
            &b,
            STATUS_NOT_FOUND,
            STATUS_NOT_FOUND,
            "another device's vector",
        )?;
    }

    // The group variant: group 0 connects; the classic DISCONNECT takes
    // its handle. A group the platform does not have is refused (X3).
    let mut p = fs_params(&dev, &a, CONNECT_FULLY_SPECIFIED_GROUP);
    expect(
        "FULLY_SPECIFIED_GROUP in group 0",
        IoConnectInterruptEx(&mut p),
        STATUS_SUCCESS,
    )?;
    let Some(hg) = p.FullySpecified.InterruptObject else {
        fail!("FULLY_SPECIFIED_GROUP succeeded without an interrupt object");
    };
    check!(
        hg.effective_mask() == mask,
        "FULLY_SPECIFIED_GROUP: effective mask {}",
        crate::display::hex(hg.effective_mask())
    );
    expect(
        "IoDisconnectInterrupt of a FULLY_SPECIFIED_GROUP connection",
        IoDisconnectInterrupt(hg),
        STATUS_SUCCESS,
    )?;
    check_masked(&dev, 0)?;
    let before = usage()?;
    // The first group past the platform's (group 1 up to 64 processors).
    let absent = wdm::KeQueryActiveGroupCount();
    let mut p = fs_params(&dev, &a, CONNECT_FULLY_SPECIFIED_GROUP);
    p.FullySpecified.Group = absent;
    expect(
        "FULLY_SPECIFIED_GROUP in a group the platform lacks",
        IoConnectInterruptEx(&mut p),
        STATUS_INVALID_PARAMETER,
    )?;
    check!(
        p.FullySpecified.InterruptObject.is_none(),
        "group {}: *InterruptObject set on failure",
        crate::display::dec(absent)
    );
    nothing_connected("a group the platform lacks", before)?;

    // A shared vector: a classic connection and a FULLY_SPECIFIED one
    // chain in connection order, each claims its own device's causes.
    let Ok((sa, sb)) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true) else {
        return Ok(());
    };
    let mask = env.effective(env.online())?;
    let (ca, cb) = (
        CTX[1].bind(Some(&sa), Policy::One, mask),
        CTX[2].bind(Some(&sb), Policy::One, mask),
    );
    let mut args_a = Args::of(&sa, 0, &CTX[1]);
    args_a.mask = mask;
    let mut args_b = Args::of(&sb, 0, &CTX[2]);
    args_b.mask = mask;
    let ha = connect_ok(&sa, &args_a)?;
    let (status, hb) = connect_fs(&sb, &args_b);
    expect("FULLY_SPECIFIED on a shared vector", status, STATUS_SUCCESS)?;
    let Some(hb) = hb else {
        fail!("no interrupt object for the shared FULLY_SPECIFIED connection");
    };
    let mut chain = [PKINTERRUPT::default(); 4];
    for c in 0..percpu::count() {
        let n = wdm::chain(c, sa.vector(), &mut chain);
        let here = c < 64 && mask & (1 << c) != 0;
        check!(
            (!here && n == 0) || (n == 2 && chain[0] == ha && chain[1] == hb),
            "cpu {}: chain of vector {} holds {} objects, expected [classic, FULLY_SPECIFIED]",
            crate::display::dec(c),
            crate::display::hex(sa.vector()),
            crate::display::dec(n)
        );
    }
    let (base_a, base_b) = (counters(&sa), counters(&sb));
    sa.td.enable(true);
    sb.td.enable(true);
    sb.td.raise(1);
    wait_for("the FULLY_SPECIFIED ISR", || cb.claimed() >= 1)?;
    sa.td.raise(1);
    wait_for("the classic ISR", || ca.claimed() >= 1)?;
    settle();
    sa.td.enable(false);
    sb.td.enable(false);
    check_counts(&sa, base_a, ca.claimed(), 1)?;
    check_counts(&sb, base_b, cb.claimed(), 1)?;
    ca.check_clean("classic, shared")?;
    cb.check_clean("FULLY_SPECIFIED, shared")?;
    disconnect_ex_ok(CONNECT_FULLY_SPECIFIED, hb)?;
    disconnect_ok(ha)
}

/// The second resource of the line-based test: its vector, and the
/// lock every call must hold.
static LINE_VECTOR_1: AtomicU32 = AtomicU32::new(0);
static LINE_LOCK: AtomicU64 = AtomicU64::new(0);
static LINE_WRONG_LOCK: AtomicU32 = AtomicU32::new(0);

/// One ISR for both line resources of a device: resource 0's causes on
/// `CTX[0]` (its test device), the other vector's on `CTX[1]` (soft
/// causes of a bare line); every call under the group's one lock.
fn line_isr(interrupt: &KINTERRUPT, _context: PVOID) -> bool {
    let lock = interrupt.spin_lock();
    if !lock.is_held() || lock.address() != LINE_LOCK.load(Ordering::Acquire) {
        LINE_WRONG_LOCK.fetch_add(1, Ordering::AcqRel);
    }
    let ctx = if u32::from(interrupt.vector()) == LINE_VECTOR_1.load(Ordering::Acquire) {
        &CTX[1]
    } else {
        &CTX[0]
    };
    pvfix::claim(interrupt, ctx, ctx.as_context())
}

/// LINE_BASED with `lock` / `sync` / `mask` for `dev`: the group's handle.
fn connect_line(
    dev: &Dev,
    routine: wdm::KSERVICE_ROUTINE,
    lock: Option<&'static KSPIN_LOCK>,
    sync: KIRQL,
    mask: u64,
) -> (NTSTATUS, Option<PKINTERRUPT>) {
    let mut p = IO_CONNECT_INTERRUPT_PARAMETERS::new(CONNECT_LINE_BASED);
    p.LineBased = IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS {
        PhysicalDeviceObject: Some(&dev.obj),
        ServiceRoutine: Some(routine),
        ServiceContext: CTX[0].as_context(),
        SpinLock: lock,
        SynchronizeIrql: sync,
        ProcessorEnableMask: mask,
        ..Default::default()
    };
    let status = IoConnectInterruptEx(&mut p);
    (status, p.LineBased.InterruptObject)
}

/// Fails unless every processor of `mask` (and no other) holds one object
/// of group `h` on `vector`, at SynchronizeIrql `sync`.
fn check_member(h: PKINTERRUPT, vector: u8, mask: u64, sync: KIRQL) -> TestResult {
    let mut chain = [PKINTERRUPT::default(); 4];
    for c in 0..percpu::count() {
        let n = wdm::chain(c, vector, &mut chain);
        let want = usize::from(c < 64 && mask & (1 << c) != 0);
        check!(
            n == want
                && chain[..n].iter().all(|o| {
                    o.group() == Some(h) && o.synchronize_irql() == sync && o.message_id().is_none()
                }),
            "cpu {}: {} objects on vector {} (expected {} of the group, at SynchronizeIrql {})",
            crate::display::dec(c),
            crate::display::dec(n),
            crate::display::hex(vector),
            crate::display::dec(want),
            crate::display::dec(sync)
        );
    }
    Ok(())
}

/// Raises `n` causes on each of the two vectors of `dev` (resource 0 by
/// its test device, resource 1 by its bare line) and waits for each claim.
fn raise_both(dev: &Dev, n: u32) -> TestResult {
    let r1 = dev.res(1);
    let line1 = u8::try_from(r1.line).unwrap_or(u8::MAX);
    let (c0, c1) = (&CTX[0], &CTX[1]);
    let (start0, start1) = (c0.claimed(), c1.claimed());
    dev.td.enable(true);
    for i in 1..=n {
        dev.td.raise(1);
        wait_for("the ISR on the first vector", || c0.claimed() >= start0 + i)?;
        c1.soft_pending.fetch_add(1, Ordering::AcqRel);
        if r1.interrupt_mode() == KINTERRUPT_MODE::Latched {
            lines::pulse(line1);
        } else {
            lines::set(line1, true);
        }
        wait_for("the ISR on the second vector", || {
            c1.claimed() >= start1 + i
        })?;
        lines::set(line1, false);
    }
    settle();
    dev.td.enable(false);
    Ok(())
}

/// LINE_BASED connects every line resource of the device with one ISR:
/// one object per processor of each resource's affinity, both pins routed,
/// one lock (the system's, or the driver's) and the largest Irql as
/// SynchronizeIrql without a driver lock; the classic DISCONNECT refuses
/// the group's handle, DISCONNECT_EX takes it. A single-resource device
/// connects its one line; a device without line resources is
/// STATUS_NOT_FOUND (L1).
fn line_based(env: &Env) -> TestResult {
    let dev = env.multi_vector()?;
    let (r0, r1) = (dev.res(0), dev.res(1));
    let top = r0.level.max(r1.level);
    // What one destination names of the online processors (every one of
    // them with at most 8).
    let online = env.effective(env.online())?;
    LINE_VECTOR_1.store(r1.vector, Ordering::Release);
    LINE_WRONG_LOCK.store(0, Ordering::Release);

    // Without a lock: the system's, at the largest Irql.
    CTX[0].bind(Some(&dev), Policy::One, r0.affinity & online);
    CTX[1].bind(None, Policy::One, r1.affinity & online);
    let (status, h) = connect_line(&dev, line_isr, None, 0, 0);
    expect("LINE_BASED without a lock", status, STATUS_SUCCESS)?;
    let Some(h) = h else {
        fail!("LINE_BASED succeeded without an interrupt object");
    };
    let lock = h.spin_lock_address();
    LINE_LOCK.store(lock, Ordering::Release);
    check!(
        lock != 0 && LOCKS.iter().all(|l| l.address() != lock),
        "LINE_BASED without a lock runs under {} (expected one of the system's)",
        crate::display::hex(lock)
    );
    check_member(h, r0.vector as u8, r0.affinity & online, top)?;
    check_member(h, r1.vector as u8, r1.affinity & online, top)?;
    check!(
        h.effective_mask() == r0.affinity & online,
        "the group's first connection has mask {}",
        crate::display::hex(h.effective_mask())
    );
    check_routed(&dev, 0, r0.affinity & online, 1)?;
    check_routed(&dev, 1, r1.affinity & online, 1)?;
    let base = counters(&dev);
    raise_both(&dev, 3)?;
    check_counts(&dev, base, CTX[0].claimed(), 3)?;
    CTX[0].check_clean("of the first line")?;
    CTX[1].check_clean("of the second line")?;
    let wrong = LINE_WRONG_LOCK.load(Ordering::Acquire);
    check!(
        wrong == 0,
        "{} ISR calls without the group's one lock",
        crate::display::dec(wrong)
    );
    // The classic DISCONNECT does not take a LINE_BASED handle.
    expect(
        "IoDisconnectInterrupt of a LINE_BASED group",
        IoDisconnectInterrupt(h),
        STATUS_INVALID_PARAMETER,
    )?;
    check_routed(&dev, 1, r1.affinity & online, 1)?;
    disconnect_ex_ok(CONNECT_LINE_BASED, h)?;
    check_masked(&dev, 0)?;
    check_masked(&dev, 1)?;

    // The driver's lock and SynchronizeIrql, kept to one processor by the
    // platform's ProcessorEnableMask.
    let last = 1u64 << (percpu::count() - 1);
    let driver = &LOCKS[1];
    KeInitializeSpinLock(driver);
    LINE_LOCK.store(driver.address(), Ordering::Release);
    let sync = top + 1;
    CTX[0].bind(Some(&dev), Policy::One, last);
    CTX[1].bind(None, Policy::One, last);
    let (status, h) = connect_line(&dev, line_isr, Some(driver), sync, last);
    expect(
        "LINE_BASED with a lock, SynchronizeIrql + 1, one processor",
        status,
        STATUS_SUCCESS,
    )?;
    let Some(h) = h else {
        fail!("LINE_BASED succeeded without an interrupt object");
    };
    check!(
        h.spin_lock_address() == driver.address(),
        "LINE_BASED with the driver's lock runs under {}",
        crate::display::hex(h.spin_lock_address())
    );
    check_member(h, r0.vector as u8, r0.affinity & last, sync)?;
    check_member(h, r1.vector as u8, r1.affinity & last, sync)?;
    raise_both(&dev, 2)?;
    CTX[0].check_clean("of the first line, driver's lock")?;
    CTX[1].check_clean("of the second line, driver's lock")?;
    disconnect_ex_ok(CONNECT_LINE_BASED, h)?;
    check!(
        LINE_WRONG_LOCK.load(Ordering::Acquire) == 0,
        "ISR calls without the driver's lock"
    );

    // The driver's lock with a SynchronizeIrql below a line's Irql.
    let before = usage()?;
    let (status, h) = connect_line(&dev, line_isr, Some(driver), r0.level.min(r1.level), 0);
    expect(
        "LINE_BASED with SynchronizeIrql below the largest line Irql",
        status,
        STATUS_INVALID_PARAMETER,
    )?;
    check!(h.is_none(), "*InterruptObject set on failure");
    nothing_connected("LINE_BASED, low SynchronizeIrql", before)?;

    // Rule 2 inside LINE_BASED: no processor left, STATUS_INVALID_PARAMETER
    // (not FULLY_SPECIFIED's STATUS_INVALID_PARAMETER_10).
    if !env.online() != 0 {
        let before = usage()?;
        let (status, h) = connect_line(&dev, line_isr, Some(driver), top, !env.online());
        if let Some(h) = h {
            let _ = disconnect_ex(CONNECT_LINE_BASED, h);
        }
        expect(
            "LINE_BASED with ProcessorEnableMask of absent processors only",
            status,
            STATUS_INVALID_PARAMETER,
        )?;
        nothing_connected("LINE_BASED, absent processors", before)?;
    }

    // One line resource: one connection.
    let single = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let ctx = CTX[2].bind(Some(&single), Policy::One, online);
    let mut p = IO_CONNECT_INTERRUPT_PARAMETERS::new(CONNECT_LINE_BASED);
    p.LineBased = IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS {
        PhysicalDeviceObject: Some(&single.obj),
        ServiceRoutine: Some(device_isr),
        ServiceContext: CTX[2].as_context(),
        ..Default::default()
    };
    expect(
        "LINE_BASED of a one-line device",
        IoConnectInterruptEx(&mut p),
        STATUS_SUCCESS,
    )?;
    let Some(hs) = p.LineBased.InterruptObject else {
        fail!("LINE_BASED succeeded without an interrupt object");
    };
    check_member(
        hs,
        single.vector(),
        single.res(0).affinity & online,
        single.res(0).level,
    )?;
    let base = counters(&single);
    single.td.enable(true);
    single.td.raise(2);
    wait_for("the one-line ISR", || ctx.claimed() >= 2)?;
    settle();
    single.td.enable(false);
    check_counts(&single, base, ctx.claimed(), 2)?;
    disconnect_ex_ok(CONNECT_LINE_BASED, hs)?;

    // No line resources: nothing to connect (L1).
    if let Some(m) = env.message_devices().next() {
        let before = usage()?;
        let mut p = IO_CONNECT_INTERRUPT_PARAMETERS::new(CONNECT_LINE_BASED);
        p.LineBased = IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS {
            PhysicalDeviceObject: Some(&m.obj),
            ServiceRoutine: Some(device_isr),
            ..Default::default()
        };
        expect(
            "LINE_BASED of a device without line resources",
            IoConnectInterruptEx(&mut p),
            STATUS_NOT_FOUND,
        )?;
        check!(
            p.LineBased.InterruptObject.is_none(),
            "*InterruptObject set on failure"
        );
        nothing_connected("LINE_BASED of a message-only device", before)?;
    }
    Ok(())
}

/// A Version IoConnectInterruptEx does not define: STATUS_INVALID_PARAMETER_1
/// from the API and from the host (a CONNECT_EX block otherwise valid),
/// nothing connected; DISCONNECT_EX with an unknown version likewise,
/// with another connect's version STATUS_INVALID_PARAMETER, and the
/// connection stays until the right version comes.
fn unknown_version(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let a = Args::of(&dev, 0, &CTX[0]);
    for version in [0u32, 5, 0x100, u32::MAX] {
        let before = usage()?;
        let mut p = fs_params(&dev, &a, version);
        let status = IoConnectInterruptEx(&mut p);
        let what = crate::runner::Msg::from_fmt(format_args!(
            "IoConnectInterruptEx Version {}",
            crate::display::hex(version)
        ));
        expect(what.as_str(), status, STATUS_INVALID_PARAMETER_1)?;
        check!(
            p.FullySpecified.InterruptObject.is_none() && p.Version == version,
            "{}: outputs changed on failure",
            what.as_str()
        );
        nothing_connected(what.as_str(), before)?;
        // The host itself, every other field a valid FULLY_SPECIFIED's.
        let mut req = ConnectEx::blank();
        req.version = version;
        req.device_id = dev.id();
        req.vector = a.vector;
        req.irql = a.irql;
        req.synchronize_irql = a.sync;
        req.interrupt_mode = a.mode as u8;
        req.share_vector = u8::from(a.share);
        req.processor_enable_mask = a.mask;
        let routine: wdm::KSERVICE_ROUTINE = device_isr;
        req.service_routine = routine as usize as u64;
        let (status, answer) = pv::connect_ex(req);
        if status == STATUS_SUCCESS {
            let _ = pv::disconnect_ex(answer.version_used, answer.handle);
        }
        expect(
            "CONNECT_EX of that version",
            status,
            STATUS_INVALID_PARAMETER_1,
        )?;
        check!(
            answer.handle == 0 && answer.effective_mask == 0 && answer.version_used == 0,
            "a refused CONNECT_EX answered handle {} mask {} version_used {}",
            crate::display::hex(answer.handle),
            crate::display::hex(answer.effective_mask),
            crate::display::dec(answer.version_used)
        );
        nothing_connected("CONNECT_EX of an unknown version", before)?;
    }
    let ctx = CTX[0].bind(Some(&dev), Policy::One, env.online());
    let (status, h) = connect_fs(&dev, &a);
    expect("FULLY_SPECIFIED", status, STATUS_SUCCESS)?;
    let Some(h) = h else {
        fail!("FULLY_SPECIFIED succeeded without an interrupt object");
    };
    for version in [0u32, 5, u32::MAX] {
        expect(
            "IoDisconnectInterruptEx with an unknown Version",
            disconnect_ex(version, h),
            STATUS_INVALID_PARAMETER_1,
        )?;
    }
    for version in [CONNECT_LINE_BASED, CONNECT_MESSAGE_BASED] {
        expect(
            "IoDisconnectInterruptEx with another connect's Version",
            disconnect_ex(version, h),
            STATUS_INVALID_PARAMETER,
        )?;
    }
    check!(
        h.effective_mask() != 0 && route(dev.line())?.connections == 1,
        "a refused IoDisconnectInterruptEx disconnected"
    );
    let base = counters(&dev);
    dev.td.enable(true);
    dev.td.raise(1);
    wait_for("the ISR after the refused disconnects", || {
        ctx.claimed() >= 1
    })?;
    settle();
    dev.td.enable(false);
    check_counts(&dev, base, ctx.claimed(), 1)?;
    disconnect_ex_ok(CONNECT_FULLY_SPECIFIED, h)
}

/// Statuses an ISR got from connect and disconnect calls it made.
static ISR_CONNECT_STATUS: AtomicU32 = AtomicU32::new(0);
static ISR_DISCONNECT_STATUS: AtomicU32 = AtomicU32::new(0);
static ISR_CALLS: AtomicU32 = AtomicU32::new(0);

/// An ISR that tries to connect (FULLY_SPECIFIED) and to disconnect its
/// own connection from inside dispatch, then claims.
fn connecting_isr(interrupt: &KINTERRUPT, context: PVOID) -> bool {
    if ISR_CALLS.fetch_add(1, Ordering::AcqRel) == 0 {
        let mut p = IO_CONNECT_INTERRUPT_PARAMETERS::new(CONNECT_LINE_BASED);
        ISR_CONNECT_STATUS.store(IoConnectInterruptEx(&mut p), Ordering::Release);
        ISR_DISCONNECT_STATUS.store(
            IoDisconnectInterrupt(interrupt.interrupt_object()),
            Ordering::Release,
        );
    }
    device_isr(interrupt, context)
}

/// Connect and disconnect, classic and Ex, at APC_LEVEL, DISPATCH_LEVEL
/// and a device IRQL, and from inside an ISR: STATUS_INVALID_LEVEL, the
/// host never asked (the guest's request count unchanged), outputs empty,
/// the live connection untouched; at PASSIVE_LEVEL the same disconnect
/// succeeds.
fn above_passive(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let ctx = CTX[0].bind(Some(&dev), Policy::One, env.online());
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.routine = Some(connecting_isr);
    ISR_CALLS.store(0, Ordering::Release);
    ISR_CONNECT_STATUS.store(0, Ordering::Release);
    ISR_DISCONNECT_STATUS.store(0, Ordering::Release);
    let h = connect_ok(&dev, &a)?;
    let msg = env.message_devices().next().copied();
    let line = env.multi_vector().ok();
    for level in [irql::APC_LEVEL, irql::DISPATCH_LEVEL, dev.res(0).level] {
        let sent = pv::requests();
        let old = irql::raise(level);
        let (s_classic, o_classic) = connect(&dev, &a);
        let mut fs = fs_params(&dev, &a, CONNECT_FULLY_SPECIFIED);
        let s_fs = IoConnectInterruptEx(&mut fs);
        let mut lb = IO_CONNECT_INTERRUPT_PARAMETERS::new(CONNECT_LINE_BASED);
        lb.LineBased.PhysicalDeviceObject = Some(line.as_ref().map_or(&dev.obj, |d| &d.obj));
        lb.LineBased.ServiceRoutine = Some(device_isr);
        let s_lb = IoConnectInterruptEx(&mut lb);
        let s_mb = match &msg {
            Some(m) => {
                let mut mb = msgfix::params(m, &MCTX[0]);
                let s = IoConnectInterruptEx(&mut mb);
                (s, mb.MessageBased.ConnectionContext)
            }
            None => (STATUS_INVALID_LEVEL, IO_INTERRUPT_CONNECTION_CONTEXT::None),
        };
        let s_dis = IoDisconnectInterrupt(h);
        let s_dis_ex = disconnect_ex(CONNECT_FULLY_SPECIFIED, h);
        irql::lower(old);
        let asked = pv::requests() - sent;
        let statuses = [s_classic, s_fs, s_lb, s_mb.0, s_dis, s_dis_ex];
        check!(
            statuses.iter().all(|&s| s == STATUS_INVALID_LEVEL),
            "at IRQL {}: IoConnectInterrupt {}, Ex FULLY_SPECIFIED {}, LINE_BASED {}, MESSAGE_BASED {}, IoDisconnectInterrupt {}, IoDisconnectInterruptEx {} (expected STATUS_INVALID_LEVEL for all)",
            crate::display::dec(level),
            crate::display::hex(s_classic),
            crate::display::hex(s_fs),
            crate::display::hex(s_lb),
            crate::display::hex(s_mb.0),
            crate::display::hex(s_dis),
            crate::display::hex(s_dis_ex)
        );
        check!(
            asked == 0,
            "at IRQL {}: the refused calls sent {} requests to the host",
            crate::display::dec(level),
            crate::display::dec(asked)
        );
        check!(
            o_classic.is_none()
                && fs.FullySpecified.InterruptObject.is_none()
                && lb.LineBased.InterruptObject.is_none()
                && s_mb.1 == IO_INTERRUPT_CONNECTION_CONTEXT::None,
            "at IRQL {}: an output was set on a refusal",
            crate::display::dec(level)
        );
        check!(
            h.effective_mask() != 0,
            "at IRQL {}: the refused disconnect disconnected",
            crate::display::dec(level)
        );
    }
    // From inside the ISR (dispatch, at the device's IRQL).
    let base = counters(&dev);
    dev.td.enable(true);
    dev.td.raise(1);
    wait_for("the ISR", || ctx.claimed() >= 1)?;
    settle();
    dev.td.enable(false);
    check_counts(&dev, base, ctx.claimed(), 1)?;
    let (c, d) = (
        ISR_CONNECT_STATUS.load(Ordering::Acquire),
        ISR_DISCONNECT_STATUS.load(Ordering::Acquire),
    );
    check!(
        c == STATUS_INVALID_LEVEL && d == STATUS_INVALID_LEVEL,
        "inside the ISR: IoConnectInterruptEx {} ({}), IoDisconnectInterrupt {} ({}), expected STATUS_INVALID_LEVEL",
        status_name(c),
        crate::display::hex(c),
        status_name(d),
        crate::display::hex(d)
    );
    check!(
        h.effective_mask() != 0,
        "the ISR's refused disconnect disconnected"
    );
    ctx.check_clean("that tried to disconnect itself")?;
    let used = objects_in_use()?;
    disconnect_ok(h)?;
    check!(
        objects_in_use()? < used,
        "the disconnect at PASSIVE_LEVEL freed nothing"
    );
    Ok(())
}
