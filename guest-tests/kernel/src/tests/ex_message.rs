//! `ex_message_`: IoConnectInterruptEx MESSAGE_BASED
//! (`docs/semantics.md` rules M1..M9, DISCONNECT_EX): the message table,
//! delivery of each message to its own vector with its number, the
//! policies' target sets, the fallback to line-based, the table buffer,
//! masking, disconnect, KeSynchronizeExecution on a message's object, and
//! messages never shared. Devices are found by what QUERY_MESSAGES says
//! (kind, count, policy), never by id.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use irqconnect_abi::ntstatus::{
    STATUS_BUFFER_TOO_SMALL, STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND, STATUS_SUCCESS,
    status_name,
};
use irqconnect_abi::pv::{irq_policy, message_table_size, platform_flags};

use super::fixture::need_cpus;
use super::msgfix::{
    self, MAX_MSG, MCTX, MCtx, check_exact, connect_messages, connect_table, disconnect_messages,
    disconnect_table, message_isr, params, raise_one, sent_now, settle_io, taken_now, wait_io,
};
use super::pvfix::{
    self, Args, CTX, Env, LOCKS, MsgDev, Policy, check_counts, connect, connect_fs, counters,
    device_isr, disconnect_ex, disconnect_ex_ok, platform, wait_for,
};
use crate::msidev::MsiDev;
use crate::runner::{Failure, Test, TestResult};
use crate::wdm::{
    self, CONNECT_FULLY_SPECIFIED, CONNECT_LINE_BASED, CONNECT_MESSAGE_BASED,
    IO_INTERRUPT_CONNECTION_CONTEXT, IoConnectInterruptEx, KINTERRUPT, KINTERRUPT_MODE,
    KINTERRUPT_POLARITY, KIRQL, KeAcquireInterruptSpinLock, KeInitializeSpinLock,
    KeReleaseInterruptSpinLock, KeSynchronizeExecution, NTSTATUS, PIO_INTERRUPT_MESSAGE_INFO,
    PKINTERRUPT, PVOID,
};
use crate::{check, cpu, fail, irql, percpu, smp, time};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("ex_message_single_msi_delivers_with_message_id", || {
        pvfix::run(single_msi)
    }),
    Test::new("ex_message_multi_msi_each_message_own_vector", || {
        pvfix::run(multi_msi)
    }),
    Test::new("ex_message_msix_eight_messages_all_delivered", || {
        pvfix::run(msix_all)
    }),
    Test::new("ex_message_table_matches_host_route", || {
        pvfix::run(table_matches_route)
    }),
    Test::new("ex_message_falls_back_to_line_based", || {
        pvfix::run(fallback)
    }),
    Test::new("ex_message_buffer_too_small_connects_nothing", || {
        pvfix::run(buffer_too_small)
    }),
    Test::new("ex_message_spread_policy_one_cpu_each", || {
        pvfix::run(spread_policy)
    }),
    Test::new("ex_message_specified_policy_stays_in_mask", || {
        pvfix::run(specified_policy)
    }),
    Test::new("ex_message_masked_pending_delivers_once_on_unmask", || {
        pvfix::run(masked_pending)
    }),
    Test::new("ex_message_disconnect_then_never_called", || {
        pvfix::run(disconnect_never_called)
    }),
    Test::new("ex_message_synchronize_execution_excludes_isr", || {
        pvfix::run(synchronize_excludes)
    }),
    Test::new("ex_message_never_shared", || pvfix::run(never_shared)),
];

fn single(env: &Env) -> Result<MsgDev, Failure> {
    env.message_device("MSI device with one message", |m| {
        !m.is_msix() && m.count() == 1
    })
}

fn multi(env: &Env) -> Result<MsgDev, Failure> {
    env.message_device("MSI device with several messages", |m| {
        !m.is_msix() && m.count() > 1
    })
}

fn msix(env: &Env) -> Result<MsgDev, Failure> {
    env.message_device("MSI-X device", MsgDev::is_msix)
}

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

/// The `n`-th lowest processor of `set` (as a one-bit set; 0 if none).
fn nth(set: u64, n: u32) -> u64 {
    let mut rest = set;
    for _ in 0..n {
        rest &= rest.wrapping_sub(1);
    }
    rest & rest.wrapping_neg()
}

/// Where a route to the processors of `set` delivers (docs/semantics.md,
/// "Destinations", which rule M7 applies to messages): the largest part one
/// destination names, as [`super::topo::Topo::expected`] reads the rule
/// (the whole set with at most 8 processors).
fn deliverable(set: u64) -> u64 {
    super::topo::Topo::get().map_or(set, |t| t.expected(0, set))
}

/// Fails unless entry `k` of `t` is message `k` of `dev` as QUERY_MESSAGES
/// announced it (its vector follows the first, IRQL its class, latched,
/// active high, on `targets`), and its interrupt object is the message's.
fn check_entry(dev: &MsgDev, t: PIO_INTERRUPT_MESSAGE_INFO, k: u32, targets: u64) -> TestResult {
    let Some(e) = t.MessageInfo(k) else {
        fail!("message {} missing from the table", crate::display::dec(k));
    };
    let vector = u32::from(dev.info.first_vector) + k;
    let o = e.InterruptObject;
    check!(
        e.Vector == vector
            && u32::from(e.Irql) == vector >> 4
            && e.Mode == KINTERRUPT_MODE::Latched
            && e.Polarity == KINTERRUPT_POLARITY::InterruptActiveHigh
            && e.TargetProcessorSet == targets
            && e.MessageAddress != 0,
        "{} {} message {}: vector {} irql {} mode {:?} polarity {:?} targets {} address {}; expected vector {} irql {} latched, active high, targets {}",
        dev.name(),
        crate::display::dec(dev.id()),
        crate::display::dec(k),
        crate::display::hex(e.Vector),
        crate::display::dec(e.Irql),
        e.Mode,
        e.Polarity,
        crate::display::hex(e.TargetProcessorSet),
        crate::display::hex(e.MessageAddress),
        crate::display::hex(vector),
        crate::display::dec(vector >> 4),
        crate::display::hex(targets)
    );
    check!(
        o.message_id() == Some(k)
            && u32::from(o.vector()) == e.Vector
            && o.effective_mask() == e.TargetProcessorSet
            && o.synchronize_irql() == t.UnifiedIrql(),
        "message {}: its interrupt object serves message {:?} on vector {} for {} at {}",
        crate::display::dec(k),
        o.message_id(),
        crate::display::hex(o.vector()),
        crate::display::hex(o.effective_mask()),
        crate::display::dec(o.synchronize_irql())
    );
    Ok(())
}

/// Raises every message of `dev` `times` times, one at a time, each
/// awaited (`ctx` freshly bound: its counts start at 0); then checks the
/// exact counts.
fn raise_each(dev: &MsgDev, ctx: &MCtx, t: PIO_INTERRUPT_MESSAGE_INFO, times: u32) -> TestResult {
    let sent0 = sent_now(dev);
    let taken0 = taken_now(t);
    dev.md.set_mask(0);
    for n in 1..=times {
        for k in 0..dev.count() {
            raise_one(dev, ctx, k, n)?;
        }
    }
    settle_io(dev);
    dev.md.set_mask(dev.all());
    check_exact(dev, ctx, t, &sent0, &taken0, |_| times)
}

/// After the disconnect: every message unprogrammed, a raise dropped (not
/// sent, not handled).
fn check_silent(dev: &MsgDev, ctx: &MCtx) -> TestResult {
    for k in 0..dev.count() {
        check!(
            dev.md.address(k) == 0 && dev.md.data(k) == 0,
            "message {} still programmed after IoDisconnectInterruptEx (address {}, data {})",
            crate::display::dec(k),
            crate::display::hex(dev.md.address(k)),
            crate::display::hex(dev.md.data(k))
        );
    }
    let (dropped, sent, calls) = (
        dev.md.dropped(),
        dev.md.sent(0),
        ctx.calls.load(Ordering::Acquire),
    );
    dev.md.set_mask(0);
    dev.md.raise(0);
    settle_io(dev);
    dev.md.set_mask(dev.all());
    check!(
        dev.md.dropped() == dropped + 1
            && dev.md.sent(0) == sent
            && ctx.calls.load(Ordering::Acquire) == calls,
        "a raise after the disconnect: dropped {} -> {}, sent {} -> {}, routine calls {} -> {}",
        crate::display::dec(dropped),
        crate::display::dec(dev.md.dropped()),
        crate::display::dec(sent),
        crate::display::dec(dev.md.sent(0)),
        crate::display::dec(calls),
        crate::display::dec(ctx.calls.load(Ordering::Acquire))
    );
    Ok(())
}

/// One MSI message: the table (UnifiedIrql = its class without a lock,
/// the OneCloseProcessor target), five deliveries to the routine with
/// message number 0, its object and context, on the target at
/// UnifiedIrql under the lock; after the disconnect the device sends
/// nothing and the table reads as stale.
fn single_msi(env: &Env) -> TestResult {
    let m = single(env)?;
    let ctx = MCTX[0].bind(&m);
    let t = connect_messages(&m, ctx)?;
    let allowed = m.info.affinity & env.online();
    check!(
        t.UnifiedIrql() == m.info.irql && t.MessageCount() == 1,
        "table: UnifiedIrql {} MessageCount {}, expected {} and 1",
        crate::display::dec(t.UnifiedIrql()),
        crate::display::dec(t.MessageCount()),
        crate::display::dec(m.info.irql)
    );
    let targets = if m.info.policy == irq_policy::ONE_CLOSE_PROCESSOR {
        nth(allowed, 0)
    } else {
        t.MessageInfo(0).map_or(0, |e| e.TargetProcessorSet)
    };
    check_entry(&m, t, 0, targets)?;
    raise_each(&m, ctx, t, 5)?;
    check!(
        ctx.last_context.load(Ordering::Acquire) == ctx.as_context() as usize,
        "the routine got ServiceContext {}, expected {}",
        crate::display::hex(ctx.last_context.load(Ordering::Acquire)),
        crate::display::hex(ctx.as_context() as usize)
    );
    ctx.check_clean("of the one-message MSI device")?;
    // The classic DISCONNECT does not take a message's object.
    if let Some(e) = t.MessageInfo(0) {
        expect(
            "IoDisconnectInterrupt of a message's interrupt object",
            wdm::IoDisconnectInterrupt(e.InterruptObject),
            STATUS_INVALID_PARAMETER,
        )?;
        check!(
            t.is_live() && m.md.address(0) != 0,
            "the refused classic disconnect disconnected the message"
        );
    }
    disconnect_messages(t)?;
    check!(
        !t.is_live() && t.MessageCount() == 0 && t.MessageInfo(0).is_none(),
        "the table still reads after IoDisconnectInterruptEx"
    );
    check_silent(&m, ctx)
}

/// Several MSI messages: consecutive vectors from the first, one address
/// and consecutive data (MSI), one object per message, one group, one
/// lock; message `k` raised `k + 1` times reaches the routine exactly so
/// often with number `k` on its own vector.
fn multi_msi(env: &Env) -> TestResult {
    let m = multi(env)?;
    let ctx = MCTX[0].bind(&m);
    let t = connect_messages(&m, ctx)?;
    let Some(first) = t.MessageInfo(0) else {
        fail!("message 0 missing");
    };
    for k in 0..m.count() {
        check_entry(&m, t, k, first.TargetProcessorSet)?;
        let Some(e) = t.MessageInfo(k) else {
            fail!("message {} missing", crate::display::dec(k));
        };
        check!(
            e.MessageAddress == first.MessageAddress
                && e.MessageData == first.MessageData + k
                && e.InterruptObject.group() == first.InterruptObject.group()
                && e.InterruptObject.spin_lock_address()
                    == first.InterruptObject.spin_lock_address()
                && (k == 0 || e.InterruptObject != first.InterruptObject),
            "MSI message {}: address {} data {} (message 0: {} {}), or not in message 0's group under its lock",
            crate::display::dec(k),
            crate::display::hex(e.MessageAddress),
            crate::display::hex(e.MessageData),
            crate::display::hex(first.MessageAddress),
            crate::display::hex(first.MessageData)
        );
    }
    let sent0 = sent_now(&m);
    let taken0 = taken_now(t);
    m.md.set_mask(0);
    for k in 0..m.count() {
        for n in 1..=k + 1 {
            raise_one(&m, ctx, k, n)?;
        }
    }
    settle_io(&m);
    m.md.set_mask(m.all());
    check_exact(&m, ctx, t, &sent0, &taken0, |k| k as u32 + 1)?;
    ctx.check_clean("of the MSI device")?;
    disconnect_messages(t)?;
    check_silent(&m, ctx)
}

/// MSI-X, eight messages: the table needs more than the first buffer the
/// kernel offers, so the connect retries with the size the host asked
/// for; each message on its own vector, each raised three times, all
/// delivered and handled exactly.
fn msix_all(env: &Env) -> TestResult {
    let m = msix(env)?;
    let ctx = MCTX[0].bind(&m);
    let mut p = params(&m, ctx);
    let t = connect_table(&m, ctx, &mut p)?;
    check!(
        p.MessageBased.MessageTableRequired == m.info.table_size
            && m.info.table_size as usize == message_table_size(m.count() as usize),
        "MessageTableRequired {}, QUERY_MESSAGES table_size {}, {} messages take {}",
        crate::display::dec(p.MessageBased.MessageTableRequired),
        crate::display::dec(m.info.table_size),
        crate::display::dec(m.count()),
        crate::display::dec(message_table_size(m.count() as usize))
    );
    for k in 0..m.count() {
        let targets = t.MessageInfo(k).map_or(0, |e| e.TargetProcessorSet);
        check_entry(&m, t, k, targets)?;
    }
    raise_each(&m, ctx, t, 3)?;
    ctx.check_clean("of the MSI-X device")?;
    disconnect_messages(t)?;
    check_silent(&m, ctx)
}

/// Every message of every device: the table's address and data are what
/// the host programmed into the device (read back through SELECT,
/// ADDRESS, DATA), an MSI in the 0xFEE window carrying the vector, edge,
/// fixed delivery to one processor or lowest priority to a set, addressed
/// to exactly the target set; four raises of each land only there.
fn table_matches_route(env: &Env) -> TestResult {
    let (devs, n) = env.message_wired()?;
    let platform = platform()?;
    let flat = platform.flags & platform_flags::LOGICAL_FLAT_BY_INDEX != 0;
    let topo = super::topo::Topo::get()?;
    let mut tables = [None; pvfix::MAX_MSG_DEVICES];
    for (i, m) in devs.iter().take(n).flatten().enumerate() {
        let ctx = MCTX[i].bind(m);
        let t = connect_messages(m, ctx)?;
        tables[i] = Some(t);
        for k in 0..m.count() {
            let Some(e) = t.MessageInfo(k) else {
                fail!("message {} missing", crate::display::dec(k));
            };
            let (address, data) = (m.md.address(k), m.md.data(k));
            check!(
                e.MessageAddress == address && e.MessageData == data,
                "{} {} message {}: table address {} data {}, the device holds {} {}",
                m.name(),
                crate::display::dec(m.id()),
                crate::display::dec(k),
                crate::display::hex(e.MessageAddress),
                crate::display::hex(e.MessageData),
                crate::display::hex(address),
                crate::display::hex(data)
            );
            let targets = e.TargetProcessorSet;
            let several = targets.count_ones() > 1;
            let logical = address & (1 << 2) != 0;
            // Destination bits 0..7 in address bits 12..19; with the
            // extended destination ID bits 8..14 in address bits 5..11.
            let ext = if topo.width > 8 {
                (address >> 5) & 0x7f
            } else {
                0
            };
            let dest = (((address >> 12) & 0xff) | ext << 8) as u32;
            let delivery = (data >> 8) & 7;
            let dest_ok = if logical {
                flat && dest == topo.destination(0, targets)
            } else {
                !several && percpu::cpu(targets.trailing_zeros() as usize).apic_id() == dest
            };
            check!(
                address >> 20 == 0xfee
                    && data & 0xff == e.Vector
                    && data & (1 << 15) == 0
                    && delivery == u32::from(several)
                    && dest_ok,
                "{} {} message {}: MSI address {} data {} does not send vector {} edge {} to {}",
                m.name(),
                crate::display::dec(m.id()),
                crate::display::dec(k),
                crate::display::hex(address),
                crate::display::hex(data),
                crate::display::hex(e.Vector),
                if several { "lowest-priority" } else { "fixed" },
                crate::display::hex(targets)
            );
        }
    }
    for (i, m) in devs.iter().take(n).flatten().enumerate() {
        let Some(t) = tables[i] else { continue };
        raise_each(m, &MCTX[i], t, 4)?;
        for k in 0..m.count() as usize {
            let targets = t.MessageInfo(k as u32).map_or(0, |e| e.TargetProcessorSet);
            let ran = MCTX[i].ran_on[k].load(Ordering::Acquire);
            check!(
                ran & !targets == 0 && ran != 0,
                "{} {} message {} ran on {}, its target set is {}",
                m.name(),
                crate::display::dec(m.id()),
                crate::display::dec(k),
                crate::display::hex(ran),
                crate::display::hex(targets)
            );
        }
        MCTX[i].check_clean(m.name())?;
    }
    for (i, m) in devs.iter().take(n).flatten().enumerate() {
        if let Some(t) = tables[i] {
            disconnect_messages(t)?;
            check_silent(m, &MCTX[i])?;
        }
    }
    Ok(())
}

static MESSAGE_ROUTINE_CALLS: AtomicU32 = AtomicU32::new(0);

/// A message routine that must never run (the device has no messages).
fn unexpected_message_isr(_interrupt: &KINTERRUPT, _context: PVOID, _message_id: u32) -> bool {
    MESSAGE_ROUTINE_CALLS.fetch_add(1, Ordering::AcqRel);
    false
}

/// MESSAGE_BASED on a device with line resources only: connected
/// LINE_BASED with the FallBackServiceRoutine, `Version` updated to
/// CONNECT_LINE_BASED and a KINTERRUPT in ConnectionContext; its causes
/// reach the fallback routine (never the message routine); DISCONNECT_EX
/// wants CONNECT_LINE_BASED. Without a fallback: STATUS_NOT_FOUND (M2).
fn fallback(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    if env.has_messages(dev.id()) {
        crate::skip!("the exclusive level device also has messages");
    }
    MESSAGE_ROUTINE_CALLS.store(0, Ordering::Release);
    let online = env.online();
    let ctx = CTX[0].bind(Some(&dev), Policy::One, online);
    let mut p = wdm::IO_CONNECT_INTERRUPT_PARAMETERS::new(CONNECT_MESSAGE_BASED);
    p.MessageBased = wdm::IO_CONNECT_INTERRUPT_MESSAGE_BASED_PARAMETERS {
        PhysicalDeviceObject: Some(&dev.obj),
        MessageServiceRoutine: Some(unexpected_message_isr),
        ServiceContext: CTX[0].as_context(),
        FallBackServiceRoutine: Some(device_isr),
        ..Default::default()
    };
    expect(
        "MESSAGE_BASED with a fallback on a line device",
        IoConnectInterruptEx(&mut p),
        STATUS_SUCCESS,
    )?;
    let IO_INTERRUPT_CONNECTION_CONTEXT::InterruptObject(h) = p.MessageBased.ConnectionContext
    else {
        fail!(
            "the fallback returned {:?}, expected an interrupt object",
            p.MessageBased.ConnectionContext
        );
    };
    ctx.expect_object.store(h.to_bits(), Ordering::Release);
    let r = dev.res(0);
    check!(
        p.Version == CONNECT_LINE_BASED
            && h.effective_mask() == env.effective(r.affinity)?
            && h.vector() == dev.vector()
            && h.message_id().is_none(),
        "fallback: Version {} afterwards (expected {}), mask {}, vector {}",
        crate::display::dec(p.Version),
        crate::display::dec(CONNECT_LINE_BASED),
        crate::display::hex(h.effective_mask()),
        crate::display::hex(h.vector())
    );
    let base = counters(&dev);
    dev.td.enable(true);
    dev.td.raise(1);
    wait_for("the fallback routine", || ctx.claimed() >= 1)?;
    dev.td.raise(3);
    wait_for("the fallback routine to claim 4", || ctx.claimed() >= 4)?;
    pvfix::settle();
    dev.td.enable(false);
    check_counts(&dev, base, ctx.claimed(), 4)?;
    ctx.check_clean("fallback")?;
    check!(
        MESSAGE_ROUTINE_CALLS.load(Ordering::Acquire) == 0,
        "the message routine ran for a line interrupt"
    );
    expect(
        "IoDisconnectInterruptEx with CONNECT_MESSAGE_BASED after a fallback",
        disconnect_ex(CONNECT_MESSAGE_BASED, h),
        STATUS_INVALID_PARAMETER,
    )?;
    check!(
        h.effective_mask() != 0,
        "the refused disconnect disconnected"
    );
    disconnect_ex_ok(CONNECT_LINE_BASED, h)?;

    let before = platform()?;
    p.Version = CONNECT_MESSAGE_BASED;
    p.MessageBased.FallBackServiceRoutine = None;
    expect(
        "MESSAGE_BASED without a fallback on a line device",
        IoConnectInterruptEx(&mut p),
        STATUS_NOT_FOUND,
    )?;
    let after = platform()?;
    check!(
        p.Version == CONNECT_MESSAGE_BASED
            && p.MessageBased.ConnectionContext == IO_INTERRUPT_CONNECTION_CONTEXT::None
            && after.objects_in_use == before.objects_in_use
            && after.connections == before.connections,
        "a refused MESSAGE_BASED changed Version ({}), ConnectionContext or the host's counts",
        crate::display::dec(p.Version)
    );
    Ok(())
}

/// A message table buffer below what the table needs (empty, header only,
/// one entry short, one byte short): STATUS_BUFFER_TOO_SMALL with the size
/// it needs, nothing connected (host counts, the guest's pools), the
/// device not programmed (a raise is dropped); the exact size and the
/// kernel's own retry both connect.
fn buffer_too_small(env: &Env) -> TestResult {
    let Some(m) = env.message_devices().max_by_key(|m| m.count()).copied() else {
        crate::skip!("the host's device table has no message-signaled device");
    };
    m.check_wiring()?;
    let ctx = MCTX[0].bind(&m);
    let need = m.info.table_size;
    check!(
        need as usize == message_table_size(m.count() as usize),
        "QUERY_MESSAGES table_size {} for {} messages",
        crate::display::dec(need),
        crate::display::dec(m.count())
    );
    for len in [0, 8, need - 40, need - 1] {
        let before = platform()?;
        let guest = wdm::usage();
        let mut p = params(&m, ctx);
        p.MessageBased.MessageTableLength = Some(len);
        let status = IoConnectInterruptEx(&mut p);
        let what = crate::runner::Msg::from_fmt(format_args!(
            "a table buffer of {} bytes ({} needed)",
            crate::display::dec(len),
            crate::display::dec(need)
        ));
        if let IO_INTERRUPT_CONNECTION_CONTEXT::InterruptMessageTable(t) =
            p.MessageBased.ConnectionContext
        {
            let _ = disconnect_table(t);
        }
        expect(what.as_str(), status, STATUS_BUFFER_TOO_SMALL)?;
        let after = platform()?;
        check!(
            p.MessageBased.MessageTableRequired == need
                && p.MessageBased.ConnectionContext == IO_INTERRUPT_CONNECTION_CONTEXT::None
                && after.objects_in_use == before.objects_in_use
                && after.connections == before.connections
                && wdm::usage() == guest,
            "{}: MessageTableRequired {}, or something was connected",
            what.as_str(),
            crate::display::dec(p.MessageBased.MessageTableRequired)
        );
        for k in 0..m.count() {
            check!(
                m.md.address(k) == 0,
                "{}: message {} programmed",
                what.as_str(),
                crate::display::dec(k)
            );
        }
    }
    let (dropped, sent) = (m.md.dropped(), m.md.sent(0));
    m.md.set_mask(0);
    m.md.raise(0);
    settle_io(&m);
    m.md.set_mask(m.all());
    check!(
        m.md.dropped() == dropped + 1 && m.md.sent(0) == sent && ctx.total() == 0,
        "a raise after the refusals was not dropped"
    );
    // The exact size.
    let mut p = params(&m, ctx);
    p.MessageBased.MessageTableLength = Some(need);
    let t = connect_table(&m, ctx, &mut p)?;
    raise_each(&m, ctx, t, 1)?;
    disconnect_messages(t)?;
    // The kernel's retry.
    let mut p = params(&m, ctx);
    let t = connect_table(&m, ctx, &mut p)?;
    check!(
        p.MessageBased.MessageTableRequired == need,
        "after the retry MessageTableRequired is {}",
        crate::display::dec(p.MessageBased.MessageTableRequired)
    );
    disconnect_messages(t)?;
    ctx.check_clean("after too-small buffers")
}

/// SpreadMessagesAcrossAllProcessors: message `k` on exactly the
/// `(k mod n)`-th of the `n` allowed processors, so every processor gets
/// some; two raises of each land only there. Kept within two processors
/// by ProcessorEnableMask, the messages alternate between them.
fn spread_policy(env: &Env) -> TestResult {
    need_cpus(2)?;
    let m = env.message_device("device with the spread policy", |m| {
        m.info.policy == irq_policy::SPREAD_MESSAGES_ACROSS_ALL_PROCESSORS
    })?;
    let allowed = m.info.affinity & env.online();
    let n = allowed.count_ones();
    for keep in [0u64, nth(allowed, 0) | nth(allowed, n - 1)] {
        let within = if keep == 0 { allowed } else { allowed & keep };
        let ctx = MCTX[0].bind(&m);
        let mut p = params(&m, ctx);
        p.MessageBased.ProcessorEnableMask = keep;
        let t = connect_table(&m, ctx, &mut p)?;
        let mut union = 0;
        for k in 0..m.count() {
            let want = nth(within, k % within.count_ones());
            check_entry(&m, t, k, want)?;
            union |= want;
        }
        check!(
            union == within || m.count() < within.count_ones(),
            "the messages cover {} of {}",
            crate::display::hex(union),
            crate::display::hex(within)
        );
        raise_each(&m, ctx, t, 2)?;
        for k in 0..m.count() as usize {
            let want = nth(within, k as u32 % within.count_ones());
            let ran = ctx.ran_on[k].load(Ordering::Acquire);
            check!(
                ran == want,
                "message {} ran on {}, its processor is {}",
                crate::display::dec(k),
                crate::display::hex(ran),
                crate::display::hex(want)
            );
        }
        ctx.check_clean("with the spread policy")?;
        disconnect_messages(t)?;
    }
    Ok(())
}

/// SpecifiedProcessors: every message's target set is the resource's
/// affinity within the online processors (as far as a route can name it:
/// [`deliverable`]); five raises of each land only inside it. ProcessorEnableMask narrows it to one processor; one
/// disjoint from the affinity leaves no processor (STATUS_INVALID_PARAMETER,
/// M7).
fn specified_policy(env: &Env) -> TestResult {
    need_cpus(2)?;
    let m = env.message_device("device with the specified-processors policy", |m| {
        m.info.policy == irq_policy::SPECIFIED_PROCESSORS
    })?;
    let allowed = m.info.affinity & env.online();
    let highest = 1u64 << (63 - allowed.leading_zeros());
    for (keep, want) in [(0u64, deliverable(allowed)), (highest, highest)] {
        let ctx = MCTX[0].bind(&m);
        let mut p = params(&m, ctx);
        p.MessageBased.ProcessorEnableMask = keep;
        let t = connect_table(&m, ctx, &mut p)?;
        for k in 0..m.count() {
            check_entry(&m, t, k, want)?;
        }
        raise_each(&m, ctx, t, if keep == 0 { 5 } else { 2 })?;
        for k in 0..m.count() as usize {
            let ran = ctx.ran_on[k].load(Ordering::Acquire);
            check!(
                ran & !want == 0,
                "message {} ran on {}, outside {}",
                crate::display::dec(k),
                crate::display::hex(ran),
                crate::display::hex(want)
            );
        }
        ctx.check_clean("with the specified-processors policy")?;
        disconnect_messages(t)?;
    }
    let outside = env.online() & !m.info.affinity;
    if outside != 0 {
        let before = platform()?;
        let ctx = MCTX[0].bind(&m);
        let mut p = params(&m, ctx);
        p.MessageBased.ProcessorEnableMask = outside;
        let status = IoConnectInterruptEx(&mut p);
        if let IO_INTERRUPT_CONNECTION_CONTEXT::InterruptMessageTable(t) =
            p.MessageBased.ConnectionContext
        {
            let _ = disconnect_table(t);
        }
        expect(
            "ProcessorEnableMask outside the affinity",
            status,
            STATUS_INVALID_PARAMETER,
        )?;
        let after = platform()?;
        check!(
            after.objects_in_use == before.objects_in_use,
            "the refused connect left objects"
        );
    }
    Ok(())
}

/// A masked message that fires is held pending (not sent, routine not
/// called, however often it fires); unmasking sends it exactly once. The
/// other messages, masked and never raised, stay quiet; unmasked, a raise
/// is delivered at once.
fn masked_pending(env: &Env) -> TestResult {
    let m = msix(env).or_else(|_| multi(env)).or_else(|_| single(env))?;
    let ctx = MCTX[0].bind(&m);
    let t = connect_messages(&m, ctx)?;
    let k = m.count() - 1;
    let sent0 = sent_now(&m);
    let taken0 = taken_now(t);
    m.md.set_mask(m.all());
    for _ in 0..3 {
        m.md.raise(k);
    }
    settle_io(&m);
    check!(
        m.md.pending() == 1 << k && m.md.sent(k) == sent0[k as usize] && ctx.total() == 0,
        "masked message {} raised 3 times: pending {}, sent {}, routine called {} times",
        crate::display::dec(k),
        crate::display::hex(m.md.pending()),
        crate::display::dec(m.md.sent(k).wrapping_sub(sent0[k as usize])),
        crate::display::dec(ctx.total())
    );
    msgfix::unmask_delivers_pending_once(&m, ctx, t, k, &sent0, &taken0)?;
    ctx.check_clean("masking")?;
    disconnect_messages(t)
}

static STOP: AtomicBool = AtomicBool::new(false);
static RAISE_DEVICE: AtomicU32 = AtomicU32::new(0);
static RAISE_COUNT: AtomicU32 = AtomicU32::new(0);
static RAISED: AtomicUsize = AtomicUsize::new(0);

/// Work item: raises the messages of `RAISE_DEVICE` round robin until
/// `STOP`, pausing between raises (each raise is a port access, so this
/// processor takes its interrupts on the way).
fn raiser(_arg: usize) -> usize {
    let Some(md) = MsiDev::new(RAISE_DEVICE.load(Ordering::Acquire)) else {
        return 0;
    };
    let count = RAISE_COUNT.load(Ordering::Acquire).max(1);
    let mut n = 0usize;
    while !STOP.load(Ordering::Acquire) {
        md.raise((n % count as usize) as u32);
        n += 1;
        RAISED.fetch_add(1, Ordering::AcqRel);
        time::delay_us(100);
    }
    n
}

/// Stops the raisers of every AP and waits for their work items.
fn stop_raisers() -> TestResult {
    STOP.store(true, Ordering::Release);
    for c in 1..percpu::count() {
        if !percpu::cpu(c).mailbox.idle() {
            smp::wait(c, 1_000_000).map_err(Failure::from)?;
        }
    }
    Ok(())
}

/// While the other processors keep raising the device's messages (and
/// their routines spin), IoDisconnectInterruptEx on the BSP: when it
/// returns no call is running anywhere, and none ever starts again while
/// the raises go on (the device drops them: no address). Four rounds.
/// With one processor the BSP raises before and after the disconnect.
fn disconnect_never_called(env: &Env) -> TestResult {
    let m = msix(env).or_else(|_| multi(env)).or_else(|_| single(env))?;
    for _ in 0..4 {
        let result = disconnect_round(&m);
        stop_raisers()?;
        m.md.set_mask(m.all());
        result?;
    }
    Ok(())
}

fn disconnect_round(m: &MsgDev) -> TestResult {
    let helpers = percpu::count() > 1;
    let ctx = MCTX[0].bind(m);
    ctx.spin.store(1000, Ordering::Relaxed);
    let t = connect_messages(m, ctx)?;
    m.md.set_mask(0);
    STOP.store(false, Ordering::Release);
    RAISE_DEVICE.store(m.md.index(), Ordering::Release);
    RAISE_COUNT.store(m.count(), Ordering::Release);
    if helpers {
        // Up to 15 APs spread over the online ones (every vCPU is emulated
        // on the host's few cores).
        let step = (percpu::count() / 16).max(1);
        for c in (1..percpu::count()).step_by(step) {
            smp::post(c, raiser, 0).map_err(Failure::from)?;
        }
    } else {
        for k in 0..m.count() {
            m.md.raise(k);
        }
    }
    wait_io(m, "3 message routine calls", || ctx.total() >= 3)?;
    let status = disconnect_table(t);
    let running = ctx.in_routine.load(Ordering::Acquire);
    let calls = ctx.calls.load(Ordering::Acquire);
    let dropped = m.md.dropped();
    if !helpers {
        for k in 0..m.count() {
            m.md.raise(k);
        }
    }
    // The raises go on: the device drops them now (no address), and the
    // routine must not run for any of them.
    let dropping = wait_io(m, "a raise dropped after the disconnect", || {
        m.md.dropped() > dropped
    });
    settle_io(m);
    stop_raisers()?;
    settle_io(m);
    expect("IoDisconnectInterruptEx", status, STATUS_SUCCESS)?;
    check!(
        running == 0,
        "{} message routine calls still running when IoDisconnectInterruptEx returned",
        crate::display::dec(running)
    );
    let after = ctx.calls.load(Ordering::Acquire);
    check!(
        after == calls,
        "the message routine was called {} times after IoDisconnectInterruptEx returned",
        crate::display::dec(after - calls)
    );
    dropping?;
    ctx.check_clean("disconnected mid-stream")
}

static INSIDE: AtomicBool = AtomicBool::new(false);
static OVERLAPS: AtomicU32 = AtomicU32::new(0);
static SYNC_RUNS: AtomicU32 = AtomicU32::new(0);
static SYNC_WRONG_IRQL: AtomicU32 = AtomicU32::new(0);
static SYNC_IRQL: AtomicU32 = AtomicU32::new(0);

fn enter_exclusive() {
    if INSIDE.swap(true, Ordering::AcqRel) {
        OVERLAPS.fetch_add(1, Ordering::AcqRel);
    }
}

fn leave_exclusive() {
    INSIDE.store(false, Ordering::Release);
}

/// The message routine inside the exclusive section.
fn exclusive_message_isr(interrupt: &KINTERRUPT, context: PVOID, message_id: u32) -> bool {
    enter_exclusive();
    let handled = message_isr(interrupt, context, message_id);
    leave_exclusive();
    handled
}

/// The synchronized routine: marks the section, checks CR8, spins,
/// returns TRUE every other run.
fn exclusive_routine(_context: PVOID) -> bool {
    enter_exclusive();
    if cpu::read_cr8() != u64::from(SYNC_IRQL.load(Ordering::Relaxed)) {
        SYNC_WRONG_IRQL.fetch_add(1, Ordering::AcqRel);
    }
    for _ in 0..300 {
        cpu::pause();
    }
    let run = SYNC_RUNS.fetch_add(1, Ordering::AcqRel) + 1;
    leave_exclusive();
    run.is_multiple_of(2)
}

/// KeSynchronizeExecution on one message's object excludes the routine
/// of every message of the connection (one lock), at UnifiedIrql from
/// PASSIVE, DISPATCH and UnifiedIrql; KeAcquireInterruptSpinLock likewise.
/// The messages run on the APs while the BSP raises them and synchronizes
/// in a loop: never overlapping, every raise handled exactly, the
/// routine's result passed through. Once with the system's lock, once
/// with the driver's and a SynchronizeIrql above the messages' Irql.
fn synchronize_excludes(env: &Env) -> TestResult {
    need_cpus(2)?;
    let m = env
        .message_device("MSI device with several messages", |m| {
            m.count() > 1 && m.info.affinity & env.online() & !1 != 0
        })
        .or_else(|_| msix(env))?;
    let aps = env.online() & !1;
    let lock = &LOCKS[0];
    KeInitializeSpinLock(lock);
    // M6: with the driver's lock, SynchronizeIrql between the largest
    // message Irql and HIGH_LEVEL.
    for (sync, what) in [
        (m.info.irql - 1, "SynchronizeIrql below the messages' Irql"),
        (irql::HIGH_LEVEL + 1, "SynchronizeIrql above HIGH_LEVEL"),
    ] {
        let before = platform()?;
        let ctx = MCTX[0].bind(&m);
        let mut p = params(&m, ctx);
        p.MessageBased.SpinLock = Some(lock);
        p.MessageBased.SynchronizeIrql = sync;
        let status = IoConnectInterruptEx(&mut p);
        if let IO_INTERRUPT_CONNECTION_CONTEXT::InterruptMessageTable(t) =
            p.MessageBased.ConnectionContext
        {
            let _ = disconnect_table(t);
        }
        expect(what, status, STATUS_INVALID_PARAMETER)?;
        check!(
            platform()?.objects_in_use == before.objects_in_use,
            "{}: objects left",
            what
        );
    }
    for with_lock in [false, true] {
        let ctx = MCTX[0].bind(&m);
        ctx.spin.store(300, Ordering::Relaxed);
        let mut p = params(&m, ctx);
        p.MessageBased.MessageServiceRoutine = Some(exclusive_message_isr);
        p.MessageBased.ProcessorEnableMask = aps;
        if with_lock {
            p.MessageBased.SpinLock = Some(lock);
            p.MessageBased.SynchronizeIrql = m.info.irql + 1;
        }
        let t = connect_table(&m, ctx, &mut p)?;
        let unified = t.UnifiedIrql();
        let want_unified = if with_lock {
            m.info.irql + 1
        } else {
            m.info.irql
        };
        check!(
            unified == want_unified,
            "UnifiedIrql {}, expected {}",
            crate::display::dec(unified),
            crate::display::dec(want_unified)
        );
        let objects: [PKINTERRUPT; MAX_MSG] = core::array::from_fn(|k| {
            t.MessageInfo(k as u32)
                .map_or(PKINTERRUPT::default(), |e| e.InterruptObject)
        });
        let n = m.count() as usize;
        let the_lock = objects[0].spin_lock_address();
        check!(
            objects[..n]
                .iter()
                .all(|o| o.spin_lock_address() == the_lock && o.synchronize_irql() == unified)
                && (!with_lock || the_lock == lock.address()),
            "the messages' objects do not share one lock at UnifiedIrql (lock {})",
            crate::display::hex(the_lock)
        );
        SYNC_IRQL.store(u32::from(unified), Ordering::Release);
        SYNC_WRONG_IRQL.store(0, Ordering::Release);
        for caller in [irql::PASSIVE_LEVEL, irql::DISPATCH_LEVEL, unified] {
            let old = irql::raise(caller);
            let got =
                KeSynchronizeExecution(objects[n - 1], exclusive_routine, core::ptr::null_mut());
            let before = KeAcquireInterruptSpinLock(objects[0]);
            let inside = irql::current();
            let held = objects[0].spin_lock_held();
            KeReleaseInterruptSpinLock(objects[0], before);
            let after = irql::current();
            irql::lower(old);
            let runs = SYNC_RUNS.load(Ordering::Acquire);
            check!(
                got == runs.is_multiple_of(2)
                    && before == caller
                    && inside == unified
                    && held
                    && after == caller,
                "from IRQL {}: KeAcquireInterruptSpinLock returned {}, IRQL {} inside (lock held {}), {} after",
                crate::display::dec(caller),
                crate::display::dec(before),
                crate::display::dec(inside),
                held,
                crate::display::dec(after)
            );
        }
        INSIDE.store(false, Ordering::Release);
        OVERLAPS.store(0, Ordering::Release);
        SYNC_RUNS.store(0, Ordering::Release);
        let sent0 = sent_now(&m);
        let taken0 = taken_now(t);
        m.md.set_mask(0);
        let mut raised = [0u32; MAX_MSG];
        let mut interleaved = 0u32;
        let mut wrong_result = 0u32;
        const RAISES: u32 = 120;
        let mut total = 0;
        let deadline = time::now_us() + 10 * pvfix::TIMEOUT_US;
        let mut i = 0usize;
        let mut last = ctx.total();
        while total < RAISES && time::now_us() < deadline {
            let k = i % n;
            i += 1;
            if ctx.inflight[k]
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                m.md.raise(k as u32);
                raised[k] += 1;
                total += 1;
            }
            let result =
                KeSynchronizeExecution(objects[i % n], exclusive_routine, core::ptr::null_mut());
            if result != SYNC_RUNS.load(Ordering::Acquire).is_multiple_of(2) {
                wrong_result += 1;
            }
            // Message calls since the previous synchronized run ended.
            let handled = ctx.total();
            if handled != last {
                interleaved += 1;
                last = handled;
            }
            time::delay_us(20);
        }
        wait_io(&m, "every raised message to be handled", || {
            (0..n).all(|k| ctx.handled(k) == raised[k])
        })?;
        settle_io(&m);
        m.md.set_mask(m.all());
        let overlaps = OVERLAPS.load(Ordering::Acquire);
        check!(
            overlaps == 0,
            "a message routine and a synchronized routine overlapped {} times",
            crate::display::dec(overlaps)
        );
        check!(
            wrong_result == 0 && SYNC_WRONG_IRQL.load(Ordering::Acquire) == 0,
            "KeSynchronizeExecution changed the result {} times, ran the routine off UnifiedIrql {} times",
            crate::display::dec(wrong_result),
            crate::display::dec(SYNC_WRONG_IRQL.load(Ordering::Acquire))
        );
        check!(
            total == RAISES && interleaved >= 1,
            "{} of {} raises, {} synchronized runs with message calls in between: no concurrency exercised",
            crate::display::dec(total),
            crate::display::dec(RAISES),
            crate::display::dec(interleaved)
        );
        check_exact(&m, ctx, t, &sent0, &taken0, |k| raised[k])?;
        ctx.check_clean("against KeSynchronizeExecution")?;
        disconnect_messages(t)?;
    }
    Ok(())
}

/// Every message of every device on a vector of its own: all vectors
/// distinct and no line resource's; each target processor's chain for a
/// message vector holds exactly that message's object, other processors
/// none. A second MESSAGE_BASED of a connected device is refused (M8), and
/// so is any CONNECT of a message vector (the classic call or
/// FULLY_SPECIFIED, by a line device or the message device itself:
/// STATUS_NOT_FOUND, no resource owns it); nothing changes, and each
/// device's message still reaches only its own routine.
fn never_shared(env: &Env) -> TestResult {
    let (devs, n) = env.message_wired()?;
    let line = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let mut tables = [None; pvfix::MAX_MSG_DEVICES];
    let mut seen = [0u64; 4];
    for (i, m) in devs.iter().take(n).flatten().enumerate() {
        let ctx = MCTX[i].bind(m);
        let t = connect_messages(m, ctx)?;
        tables[i] = Some(t);
        for k in 0..m.count() {
            let Some(e) = t.MessageInfo(k) else {
                fail!("message {} missing", crate::display::dec(k));
            };
            let v = e.Vector as u8;
            let bit = 1u64 << (v % 64);
            let line_owned = (0..pvfix::MAX_DEVICES)
                .filter_map(|d| env.device(d))
                .any(|d| {
                    d.obj
                        .allocated_resources_translated()
                        .iter()
                        .any(|r| r.vector == e.Vector)
                });
            check!(
                seen[usize::from(v / 64)] & bit == 0 && !line_owned,
                "vector {} of {} {} message {} is another message's or a line resource's",
                crate::display::hex(v),
                m.name(),
                crate::display::dec(m.id()),
                crate::display::dec(k)
            );
            seen[usize::from(v / 64)] |= bit;
            let mut chain = [PKINTERRUPT::default(); 4];
            for c in 0..percpu::count() {
                let got = wdm::chain(c, v, &mut chain);
                let want = usize::from(c < 64 && e.TargetProcessorSet & (1 << c) != 0);
                check!(
                    got == want && (want == 0 || chain[0] == e.InterruptObject),
                    "cpu {}: {} objects on message vector {} (expected {})",
                    crate::display::dec(c),
                    crate::display::dec(got),
                    crate::display::hex(v),
                    crate::display::dec(want)
                );
            }
        }
    }
    let before = platform()?;
    for (i, m) in devs.iter().take(n).flatten().enumerate() {
        let Some(t) = tables[i] else { continue };
        let ctx = &MCTX[(i + 1) % MCTX.len()];
        let mut p = params(m, ctx);
        let status = IoConnectInterruptEx(&mut p);
        if let IO_INTERRUPT_CONNECTION_CONTEXT::InterruptMessageTable(t2) =
            p.MessageBased.ConnectionContext
        {
            let _ = disconnect_table(t2);
        }
        expect(
            "a second MESSAGE_BASED of a connected device",
            status,
            STATUS_INVALID_PARAMETER,
        )?;
        let Some(e) = t.MessageInfo(0) else { continue };
        let v = e.Vector;
        for (who, dev_obj) in [("a line device", &line.obj), ("the message device", &m.obj)] {
            let mut a = Args::of(&line, 0, &CTX[0]);
            a.vector = v;
            a.irql = (v >> 4) as KIRQL;
            a.sync = a.irql;
            a.mode = KINTERRUPT_MODE::Latched;
            a.share = true;
            let target = pvfix::Dev {
                obj: *dev_obj,
                td: line.td,
            };
            let (s1, h1) = connect(&target, &a);
            let (s2, h2) = connect_fs(&target, &a);
            if let Some(h) = h1 {
                let _ = wdm::IoDisconnectInterrupt(h);
            }
            if let Some(h) = h2 {
                let _ = disconnect_ex(CONNECT_FULLY_SPECIFIED, h);
            }
            check!(
                s1 == STATUS_NOT_FOUND && s2 == STATUS_NOT_FOUND,
                "CONNECT of message vector {} by {}: classic {} ({}), FULLY_SPECIFIED {} ({}); expected STATUS_NOT_FOUND",
                crate::display::hex(v),
                who,
                status_name(s1),
                crate::display::hex(s1),
                status_name(s2),
                crate::display::hex(s2)
            );
        }
    }
    let after = platform()?;
    check!(
        after.objects_in_use == before.objects_in_use && after.connections == before.connections,
        "refused connects changed the host's counts ({} / {} -> {} / {})",
        crate::display::dec(before.objects_in_use),
        crate::display::dec(before.connections),
        crate::display::dec(after.objects_in_use),
        crate::display::dec(after.connections)
    );
    for (i, m) in devs.iter().take(n).flatten().enumerate() {
        let Some(t) = tables[i] else { continue };
        let calls: [u32; pvfix::MAX_MSG_DEVICES] =
            core::array::from_fn(|j| MCTX[j].calls.load(Ordering::Acquire));
        m.md.set_mask(0);
        raise_one(m, &MCTX[i], 0, 1)?;
        settle_io(m);
        m.md.set_mask(m.all());
        for j in 0..n {
            let now = MCTX[j].calls.load(Ordering::Acquire);
            check!(
                now == calls[j] + u32::from(i == j),
                "message 0 of device {} called routine {} {} times",
                crate::display::dec(m.id()),
                crate::display::dec(j),
                crate::display::dec(now - calls[j])
            );
        }
        MCTX[i].check_clean(m.name())?;
        disconnect_messages(t)?;
    }
    Ok(())
}
