//! `connect_`: IoConnectInterrupt's parameter rules (`docs/semantics.md` rules 2..7)
//! and the first delivery to a connected ISR.

use irqconnect_abi::layout::{LAPIC_MMIO_BASE, MMIO_HOLE_START};
use irqconnect_abi::ntstatus::{STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND};

use super::pvfix::{
    self, Args, CTX, Env, Policy, check_counts, connect_ok, connect_refused, counters,
    disconnect_ok, route, settle, wait_for,
};
use crate::runner::{Test, TestResult};
use crate::wdm::{self, KINTERRUPT_MODE, PVOID};
use crate::{check, fw_cfg, percpu, skip};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("connect_exclusive_delivers_to_isr_with_context", || {
        pvfix::run(exclusive_delivers)
    }),
    Test::new("connect_empty_mask_invalid_parameter", || {
        pvfix::run(empty_mask)
    }),
    Test::new("connect_absent_cpus_mask_invalid_parameter", || {
        pvfix::run(absent_cpus)
    }),
    Test::new("connect_partial_mask_trims_to_online", || {
        pvfix::run(partial_mask)
    }),
    Test::new("connect_sync_irql_below_irql_invalid_parameter", || {
        pvfix::run(sync_below_irql)
    }),
    Test::new("connect_irql_not_vector_class_invalid_parameter", || {
        pvfix::run(irql_not_class)
    }),
    Test::new("connect_vector_not_owned_not_found", || {
        pvfix::run(vector_not_owned)
    }),
    Test::new("connect_null_routine_invalid_parameter", || {
        pvfix::run(null_routine)
    }),
    Test::new("connect_context_outside_ram_invalid_parameter", || {
        pvfix::run(context_outside_ram)
    }),
];

/// An exclusive level device: the ISR gets its ServiceContext and its own
/// interrupt object, on a processor of the mask, once per cause.
fn exclusive_delivers(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let a = Args::of(&dev, 0, &CTX[0]);
    let want = env.effective(a.mask)?;
    let ctx = CTX[0].bind(Some(&dev), Policy::One, want);
    let h = connect_ok(&dev, &a)?;
    check!(
        h.effective_mask() == want,
        "effective mask {}, expected {}",
        crate::display::hex(h.effective_mask()),
        crate::display::hex(want)
    );
    let base = counters(&dev);
    dev.td.enable(true);
    dev.td.raise(1);
    wait_for("the ISR to claim 1 cause", || ctx.claimed() >= 1)?;
    settle();
    check!(
        ctx.last_context.load(core::sync::atomic::Ordering::Acquire)
            == CTX[0].as_context() as usize,
        "ISR got ServiceContext {}, expected {}",
        crate::display::hex(ctx.last_context.load(core::sync::atomic::Ordering::Acquire)),
        crate::display::hex(CTX[0].as_context() as usize)
    );
    check_counts(&dev, base, ctx.claimed(), 1)?;
    // Three causes at once: one ACK per call, so the level line brings the
    // ISR back until the device is quiet.
    dev.td.raise(3);
    wait_for("the ISR to claim 4 causes", || ctx.claimed() >= 4)?;
    settle();
    check_counts(&dev, base, ctx.claimed(), 4)?;
    ctx.check_clean("of the exclusive device")?;
    dev.td.enable(false);
    disconnect_ok(h)
}

fn empty_mask(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.mask = 0;
    connect_refused(&dev, &a, STATUS_INVALID_PARAMETER, "mask 0")
}

fn absent_cpus(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let absent = !env.online();
    if absent == 0 {
        skip!("all 64 processors a KAFFINITY names are online");
    }
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.mask = absent;
    connect_refused(
        &dev,
        &a,
        STATUS_INVALID_PARAMETER,
        "mask of absent processors only",
    )?;
    // A single absent processor, the one just past the online ones.
    a.mask = absent & absent.wrapping_neg();
    connect_refused(
        &dev,
        &a,
        STATUS_INVALID_PARAMETER,
        "mask of one absent processor",
    )
}

/// Online and absent bits: success, effective mask = the online part; the
/// guest's objects, the host's route and the deliveries all follow it.
fn partial_mask(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    // The last processor a KAFFINITY of group 0 names.
    let target = percpu::count().min(64) - 1;
    let online_part = 1u64 << target;
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.mask = online_part | !env.online();
    let ctx = CTX[0].bind(Some(&dev), Policy::One, online_part);
    let h = connect_ok(&dev, &a)?;
    check!(
        h.effective_mask() == online_part,
        "mask {} gave effective mask {}, expected {}",
        crate::display::hex(a.mask),
        crate::display::hex(h.effective_mask()),
        crate::display::hex(online_part)
    );
    let mut chain = [h; 4];
    for c in 0..percpu::count() {
        let n = wdm::chain(c, dev.vector(), &mut chain);
        check!(
            n == usize::from(c == target),
            "cpu {} holds {} objects on vector {}",
            crate::display::dec(c),
            crate::display::dec(n),
            crate::display::hex(dev.vector())
        );
    }
    let r = route(dev.line())?;
    check!(
        r.masked == 0 && r.destination_mask == online_part && r.vector == dev.vector(),
        "route of pin {}: masked {} vector {} destination {}, expected unmasked {} to {}",
        crate::display::dec(dev.line()),
        crate::display::dec(r.masked),
        crate::display::hex(r.vector),
        crate::display::hex(r.destination_mask),
        crate::display::hex(dev.vector()),
        crate::display::hex(online_part)
    );
    let base = counters(&dev);
    dev.td.enable(true);
    for n in 1..=2 {
        dev.td.raise(1);
        wait_for("the ISR to claim", || ctx.claimed() >= n)?;
    }
    settle();
    check_counts(&dev, base, ctx.claimed(), 2)?;
    ctx.check_clean("of the trimmed connection")?;
    dev.td.enable(false);
    disconnect_ok(h)?;
    let r = route(dev.line())?;
    check!(
        r.masked == 1,
        "pin {} still unmasked after the last disconnect",
        crate::display::dec(dev.line())
    );
    Ok(())
}

fn sync_below_irql(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.sync = a.irql - 1;
    connect_refused(
        &dev,
        &a,
        STATUS_INVALID_PARAMETER,
        "SynchronizeIrql = Irql - 1",
    )
}

fn irql_not_class(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.irql += 1;
    a.sync = a.irql;
    connect_refused(&dev, &a, STATUS_INVALID_PARAMETER, "Irql = class + 1")?;
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.irql -= 1;
    connect_refused(&dev, &a, STATUS_INVALID_PARAMETER, "Irql = class - 1")
}

/// Another device's vector, and a device-range vector nobody owns (no
/// line resource and no message).
fn vector_not_owned(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let owned = |v: u32| env.vector_owned(v);
    let mine = |v: u32| {
        dev.obj
            .allocated_resources_translated()
            .iter()
            .any(|r| r.vector == v)
    };
    let (lo, hi) = (
        u32::from(env.platform.vector_min),
        u32::from(env.platform.vector_max),
    );
    let mut tried = 0;
    if let Some(other) = (lo..=hi).find(|&v| owned(v) && !mine(v)) {
        let mut a = Args::of(&dev, 0, &CTX[0]);
        a.vector = other;
        a.irql = (other >> 4) as u8;
        a.sync = a.irql;
        connect_refused(&dev, &a, STATUS_NOT_FOUND, "another device's vector")?;
        tried += 1;
    }
    if let Some(free) = (lo..=hi).find(|&v| !owned(v)) {
        let mut a = Args::of(&dev, 0, &CTX[0]);
        a.vector = free;
        a.irql = (free >> 4) as u8;
        a.sync = a.irql;
        connect_refused(&dev, &a, STATUS_NOT_FOUND, "a vector no device owns")?;
        tried += 1;
    }
    check!(
        tried > 0,
        "no vector in the device range the device does not own"
    );
    Ok(())
}

fn null_routine(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.routine = None;
    connect_refused(&dev, &a, STATUS_INVALID_PARAMETER, "ServiceRoutine NULL")
}

/// ServiceContext past the end of RAM and in the LAPIC page: refused; the
/// same call with a context in RAM succeeds.
fn context_outside_ram(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let ram = fw_cfg::ram_size().unwrap_or(0);
    let mut a = Args::of(&dev, 0, &CTX[0]);
    if ram > 0 && ram < MMIO_HOLE_START {
        a.context = ram as usize as PVOID;
        connect_refused(
            &dev,
            &a,
            STATUS_INVALID_PARAMETER,
            "context at the end of RAM",
        )?;
    }
    a.context = LAPIC_MMIO_BASE as usize as PVOID;
    connect_refused(
        &dev,
        &a,
        STATUS_INVALID_PARAMETER,
        "context in the LAPIC page",
    )?;
    a.context = MMIO_HOLE_START as usize as PVOID;
    connect_refused(
        &dev,
        &a,
        STATUS_INVALID_PARAMETER,
        "context at the MMIO hole",
    )?;
    let ok = Args::of(&dev, 0, &CTX[0]);
    let h = connect_ok(&dev, &ok)?;
    disconnect_ok(h)
}
