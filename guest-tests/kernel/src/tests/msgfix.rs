//! What the message-signaled (`ex_message_`, `ex_msi_`) tests share: the
//! message service routine and its per-message counts ([`MCtx`]),
//! connecting a [`MsgDev`] MESSAGE_BASED, and waits that leave the
//! processor through a port access on every turn (a pending interrupt is
//! taken at an exit).
//!
//! The routine checks on every call what docs/semantics.md rules M6..M8
//! promise: the message number is the device's, the call is on the
//! object's processor and inside the message's target set, CR8 is the
//! connection's `UnifiedIrql`, the object is the table entry's, and the
//! connection's one spin lock is held (the same lock for every message).

use core::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use irqconnect_abi::ntstatus::{STATUS_SUCCESS, status_name};

use super::pvfix::{MsgDev, TIMEOUT_US};
use crate::msidev::MAX_MASKABLE;
use crate::runner::{Failure, TestResult};
use crate::wdm::{
    CONNECT_MESSAGE_BASED, IO_CONNECT_INTERRUPT_MESSAGE_BASED_PARAMETERS,
    IO_CONNECT_INTERRUPT_PARAMETERS, IO_DISCONNECT_INTERRUPT_PARAMETERS,
    IO_INTERRUPT_CONNECTION_CONTEXT, IoConnectInterruptEx, IoDisconnectInterruptEx, KINTERRUPT,
    NTSTATUS, PIO_INTERRUPT_MESSAGE_INFO, PVOID,
};
use crate::{check, cpu, fail, percpu, time};

/// Messages per device a context follows (the `MASK` register's width).
pub const MAX_MSG: usize = MAX_MASKABLE as usize;

/// What a message service routine knows and counts, per message.
/// `MCTX[i]` is handed to IoConnectInterruptEx as the ServiceContext.
pub struct MCtx {
    count: AtomicU32,
    /// The `UnifiedIrql` every call must run at (0: not checked yet).
    unified: AtomicU8,
    /// Per message: the processors its calls may run on (of
    /// `allowed_group`).
    pub allowed: [AtomicU64; MAX_MSG],
    /// Per message: the processor group of `allowed`.
    pub allowed_group: [AtomicU16; MAX_MSG],
    /// Per message: the interrupt object (`PKINTERRUPT::to_bits`) its
    /// calls must get, 0: not checked.
    pub expect_object: [AtomicU64; MAX_MSG],
    /// Per message: calls (each one handled: the routine returns TRUE).
    pub handled: [AtomicU32; MAX_MSG],
    /// Per message: the processors it ran on (bits).
    pub ran_on: [AtomicU64; MAX_MSG],
    /// Per message: set by a raiser, cleared by the routine (one message
    /// in flight at a time, so no two sends merge in a local APIC's IRR).
    pub inflight: [AtomicU32; MAX_MSG],
    /// Busy-loop iterations per call (to widen race windows).
    pub spin: AtomicU32,
    /// Calls.
    pub calls: AtomicU32,
    /// Calls with a message number past the device's.
    pub bad_message: AtomicU32,
    /// Calls outside the message's target set, or not on the object's
    /// processor.
    pub outside: AtomicU32,
    /// Calls at a CR8 other than the `UnifiedIrql`.
    pub wrong_irql: AtomicU32,
    /// Calls for another object than the message's.
    pub wrong_object: AtomicU32,
    /// Calls whose spin lock was not held.
    pub unlocked: AtomicU32,
    /// Calls under another lock than the first call's.
    pub other_lock: AtomicU32,
    /// The lock the first call ran under (then every call must).
    pub lock: AtomicU64,
    /// Calls running now.
    pub in_routine: AtomicU32,
    /// The ServiceContext of the last call.
    pub last_context: AtomicUsize,
}

impl MCtx {
    const fn new() -> Self {
        Self {
            count: AtomicU32::new(0),
            unified: AtomicU8::new(0),
            allowed: [const { AtomicU64::new(u64::MAX) }; MAX_MSG],
            allowed_group: [const { AtomicU16::new(0) }; MAX_MSG],
            expect_object: [const { AtomicU64::new(0) }; MAX_MSG],
            handled: [const { AtomicU32::new(0) }; MAX_MSG],
            ran_on: [const { AtomicU64::new(0) }; MAX_MSG],
            inflight: [const { AtomicU32::new(0) }; MAX_MSG],
            spin: AtomicU32::new(0),
            calls: AtomicU32::new(0),
            bad_message: AtomicU32::new(0),
            outside: AtomicU32::new(0),
            wrong_irql: AtomicU32::new(0),
            wrong_object: AtomicU32::new(0),
            unlocked: AtomicU32::new(0),
            other_lock: AtomicU32::new(0),
            lock: AtomicU64::new(0),
            in_routine: AtomicU32::new(0),
            last_context: AtomicUsize::new(0),
        }
    }

    /// Binds the context to `dev`'s messages; every count restarts at 0
    /// (only the device's messages are reset: guest stores are slow).
    pub fn bind(&'static self, dev: &MsgDev) -> &'static Self {
        let n = (dev.count() as usize).min(MAX_MSG);
        self.count.store(n as u32, Ordering::Relaxed);
        self.unified.store(0, Ordering::Relaxed);
        for k in 0..n {
            self.allowed[k].store(u64::MAX, Ordering::Relaxed);
            self.allowed_group[k].store(0, Ordering::Relaxed);
            self.expect_object[k].store(0, Ordering::Relaxed);
            self.handled[k].store(0, Ordering::Relaxed);
            self.ran_on[k].store(0, Ordering::Relaxed);
            self.inflight[k].store(0, Ordering::Relaxed);
        }
        for a in [
            &self.spin,
            &self.calls,
            &self.bad_message,
            &self.outside,
            &self.wrong_irql,
            &self.wrong_object,
            &self.unlocked,
            &self.other_lock,
            &self.in_routine,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.lock.store(0, Ordering::Relaxed);
        self.last_context.store(0, Ordering::Relaxed);
        core::sync::atomic::fence(Ordering::SeqCst);
        self
    }

    /// Learns from the connection's table what each call must see: its
    /// message's target set and interrupt object, the `UnifiedIrql`.
    pub fn learn(&self, table: PIO_INTERRUPT_MESSAGE_INFO) {
        for k in 0..self.messages() {
            if let Some(e) = table.MessageInfo(k as u32) {
                self.allowed[k].store(e.TargetProcessorSet, Ordering::Relaxed);
                self.allowed_group[k].store(e.Group, Ordering::Relaxed);
                self.expect_object[k].store(e.InterruptObject.to_bits(), Ordering::Relaxed);
            }
        }
        self.unified.store(table.UnifiedIrql(), Ordering::Relaxed);
        core::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Messages the context follows.
    pub fn messages(&self) -> usize {
        self.count.load(Ordering::Relaxed) as usize
    }

    /// The ServiceContext naming this context.
    pub fn as_context(&'static self) -> PVOID {
        self as *const Self as PVOID
    }

    /// Calls of message `k` so far.
    pub fn handled(&self, k: usize) -> u32 {
        self.handled.get(k).map_or(0, |h| h.load(Ordering::Acquire))
    }

    /// Calls of every message so far.
    pub fn total(&self) -> u32 {
        (0..self.messages()).map(|k| self.handled(k)).sum()
    }

    /// Fails when a call had a wrong message number, ran outside its
    /// target set, at the wrong IRQL, for a wrong object, without the lock
    /// or under another lock.
    pub fn check_clean(&self, name: &str) -> TestResult {
        let get = |a: &AtomicU32| a.load(Ordering::Acquire);
        let (b, o, i, w, u, l) = (
            get(&self.bad_message),
            get(&self.outside),
            get(&self.wrong_irql),
            get(&self.wrong_object),
            get(&self.unlocked),
            get(&self.other_lock),
        );
        check!(
            b + o + i + w + u + l == 0,
            "message routine of {}: {} calls with a bad message number, {} outside the target set, {} at the wrong IRQL, {} for a wrong object, {} without the lock, {} under another lock",
            name,
            crate::display::dec(b),
            crate::display::dec(o),
            crate::display::dec(i),
            crate::display::dec(w),
            crate::display::dec(u),
            crate::display::dec(l)
        );
        Ok(())
    }
}

/// The message-routine contexts (one per connection a test makes).
pub static MCTX: [MCtx; 4] = [const { MCtx::new() }; 4];

/// The context a ServiceContext names, when it is one of [`MCTX`].
pub fn mctx_of(context: PVOID) -> Option<&'static MCtx> {
    let base = MCTX.as_ptr() as usize;
    let size = core::mem::size_of::<MCtx>();
    let off = (context as usize).checked_sub(base)?;
    (off % size == 0).then(|| MCTX.get(off / size)).flatten()
}

/// The test's `KMESSAGE_SERVICE_ROUTINE`: checks and counts (see the
/// module docs), spins `spin` turns, returns TRUE.
pub fn message_isr(interrupt: &KINTERRUPT, context: PVOID, message_id: u32) -> bool {
    let Some(ctx) = mctx_of(context) else {
        return false;
    };
    ctx.in_routine.fetch_add(1, Ordering::AcqRel);
    ctx.calls.fetch_add(1, Ordering::AcqRel);
    ctx.last_context.store(context as usize, Ordering::Relaxed);
    let k = message_id as usize;
    if k >= ctx.messages() || interrupt.message_id() != Some(message_id) {
        ctx.bad_message.fetch_add(1, Ordering::AcqRel);
        ctx.in_routine.fetch_sub(1, Ordering::AcqRel);
        return true;
    }
    let me = percpu::current_index();
    if me != interrupt.processor()
        || !super::pvfix::in_group_mask(me, &ctx.allowed_group[k], &ctx.allowed[k])
    {
        ctx.outside.fetch_add(1, Ordering::AcqRel);
    }
    let unified = ctx.unified.load(Ordering::Relaxed);
    if cpu::read_cr8() != u64::from(interrupt.synchronize_irql())
        || (unified != 0 && cpu::read_cr8() != u64::from(unified))
    {
        ctx.wrong_irql.fetch_add(1, Ordering::AcqRel);
    }
    let expect = ctx.expect_object[k].load(Ordering::Relaxed);
    if expect != 0 && interrupt.interrupt_object().to_bits() != expect {
        ctx.wrong_object.fetch_add(1, Ordering::AcqRel);
    }
    let lock = interrupt.spin_lock();
    if !lock.is_held() {
        ctx.unlocked.fetch_add(1, Ordering::AcqRel);
    }
    if let Err(first) =
        ctx.lock
            .compare_exchange(0, lock.address(), Ordering::AcqRel, Ordering::Acquire)
        && first != lock.address()
    {
        ctx.other_lock.fetch_add(1, Ordering::AcqRel);
    }
    for _ in 0..ctx.spin.load(Ordering::Relaxed) {
        cpu::pause();
    }
    ctx.handled[k].fetch_add(1, Ordering::AcqRel);
    ctx.ran_on[k].fetch_or(1u64 << me, Ordering::AcqRel);
    ctx.inflight[k].store(0, Ordering::Release);
    ctx.in_routine.fetch_sub(1, Ordering::AcqRel);
    true
}

/// MESSAGE_BASED parameters for `dev` with [`message_isr`] and `ctx`. On
/// a platform with more than 8 processors they keep the messages on
/// processors 0..7 (`ProcessorEnableMask`), so every message device of the
/// default table fits the host's default quota (64 objects) at once, as it
/// does with 8 processors; without the restriction one destination can
/// name up to 15 processors per message.
pub fn params<'a>(dev: &'a MsgDev, ctx: &'static MCtx) -> IO_CONNECT_INTERRUPT_PARAMETERS<'a> {
    let mut p = IO_CONNECT_INTERRUPT_PARAMETERS::new(CONNECT_MESSAGE_BASED);
    p.MessageBased = IO_CONNECT_INTERRUPT_MESSAGE_BASED_PARAMETERS {
        PhysicalDeviceObject: Some(&dev.obj),
        MessageServiceRoutine: Some(message_isr),
        ServiceContext: ctx.as_context(),
        ProcessorEnableMask: if crate::percpu::count() > crate::lapic::FLAT_PROCESSORS {
            0xff
        } else {
            0
        },
        ..Default::default()
    };
    p
}

/// Connects `p` and expects a message table of `dev`'s count; `ctx`
/// learns it.
pub fn connect_table(
    dev: &MsgDev,
    ctx: &'static MCtx,
    p: &mut IO_CONNECT_INTERRUPT_PARAMETERS<'_>,
) -> Result<PIO_INTERRUPT_MESSAGE_INFO, Failure> {
    let status = IoConnectInterruptEx(p);
    check!(
        status == STATUS_SUCCESS,
        "IoConnectInterruptEx MESSAGE_BASED of {} {}: {} ({})",
        dev.name(),
        crate::display::dec(dev.id()),
        status_name(status),
        crate::display::hex(status)
    );
    let IO_INTERRUPT_CONNECTION_CONTEXT::InterruptMessageTable(t) =
        p.MessageBased.ConnectionContext
    else {
        fail!("MESSAGE_BASED succeeded without a message table");
    };
    check!(
        p.Version == CONNECT_MESSAGE_BASED && t.MessageCount() == dev.count(),
        "MESSAGE_BASED of {} {}: Version {} afterwards, {} messages in the table, QUERY_MESSAGES says {}",
        dev.name(),
        crate::display::dec(dev.id()),
        crate::display::dec(p.Version),
        crate::display::dec(t.MessageCount()),
        crate::display::dec(dev.count())
    );
    ctx.learn(t);
    Ok(t)
}

/// Connects `dev` MESSAGE_BASED with defaults.
pub fn connect_messages(
    dev: &MsgDev,
    ctx: &'static MCtx,
) -> Result<PIO_INTERRUPT_MESSAGE_INFO, Failure> {
    connect_table(dev, ctx, &mut params(dev, ctx))
}

/// IoDisconnectInterruptEx of a message table.
pub fn disconnect_table(t: PIO_INTERRUPT_MESSAGE_INFO) -> NTSTATUS {
    IoDisconnectInterruptEx(&IO_DISCONNECT_INTERRUPT_PARAMETERS {
        Version: CONNECT_MESSAGE_BASED,
        ConnectionContext: IO_INTERRUPT_CONNECTION_CONTEXT::InterruptMessageTable(t),
    })
}

/// Disconnects a message table and expects success.
pub fn disconnect_messages(t: PIO_INTERRUPT_MESSAGE_INFO) -> TestResult {
    match disconnect_table(t) {
        STATUS_SUCCESS => Ok(()),
        s => fail!(
            "IoDisconnectInterruptEx MESSAGE_BASED: {} ({})",
            status_name(s),
            crate::display::hex(s)
        ),
    }
}

/// Waits up to [`TIMEOUT_US`] for `cond`, reading `dev`'s PENDING
/// register on every turn (a port access: the exit at which a pending
/// interrupt is taken); fails with `what` otherwise.
pub fn wait_io(dev: &MsgDev, what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    if time::wait_until(TIMEOUT_US, || {
        let _ = dev.md.pending();
        cond()
    }) {
        Ok(())
    } else {
        fail!("timeout waiting for {}", what)
    }
}

/// Lets stragglers arrive (port reads on the way) before a "nothing
/// more" assertion.
pub fn settle_io(dev: &MsgDev) {
    let end = time::now_us() + super::pvfix::SETTLE_US;
    while time::now_us() < end {
        let _ = dev.md.pending();
    }
}

/// Raises message `k` of `dev` once and waits until its routine ran for
/// it (the `n`-th call of message `k`).
pub fn raise_one(dev: &MsgDev, ctx: &MCtx, k: u32, n: u32) -> TestResult {
    dev.md.raise(k);
    wait_io(dev, "the message routine", || ctx.handled(k as usize) >= n)
}

/// Deliveries of a message's vector: on every processor, and on the
/// processors outside its target set.
#[derive(Clone, Copy, Default)]
pub struct Taken {
    /// On every processor.
    pub all: u32,
    /// Outside the message's target set.
    pub outside: u32,
}

/// [`Taken`] of every message of `table` now (per-processor vector counts).
pub fn taken_now(table: PIO_INTERRUPT_MESSAGE_INFO) -> [Taken; MAX_MSG] {
    let mut out = [Taken::default(); MAX_MSG];
    for (k, slot) in out
        .iter_mut()
        .enumerate()
        .take(table.MessageCount() as usize)
    {
        if let Some(e) = table.MessageInfo(k as u32) {
            for c in 0..percpu::count() {
                let n = percpu::cpu(c).count(e.Vector as u8);
                slot.all = slot.all.wrapping_add(n);
                if e.TargetProcessorSet & (1u64 << c) == 0 {
                    slot.outside = slot.outside.wrapping_add(n);
                }
            }
        }
    }
    out
}

/// SENT of every message of `dev` now.
pub fn sent_now(dev: &MsgDev) -> [u32; MAX_MSG] {
    let mut out = [0; MAX_MSG];
    for (k, slot) in out.iter_mut().enumerate().take(dev.count() as usize) {
        *slot = dev.md.sent(k as u32);
    }
    out
}

/// Fails unless, for every message `k`, since `sent0` / `taken0` the
/// device sent exactly `want(k)` messages, the local APICs took its vector
/// exactly that often (none outside its target set) and the routine
/// handled exactly as many (counted since `ctx` was bound).
pub fn check_exact(
    dev: &MsgDev,
    ctx: &MCtx,
    table: PIO_INTERRUPT_MESSAGE_INFO,
    sent0: &[u32; MAX_MSG],
    taken0: &[Taken; MAX_MSG],
    want: impl Fn(usize) -> u32,
) -> TestResult {
    // A processor counts a vector after the routine returned and the EOI
    // went out, so a routine seen to have run may not be counted yet:
    // give the counts (bounded) time to catch up before comparing. A
    // timeout is not a failure here; the comparison below reports it.
    let _ = wait_io(dev, "the vector counts", || {
        let taken = taken_now(table);
        (0..ctx.messages()).all(|k| taken[k].all.wrapping_sub(taken0[k].all) >= ctx.handled(k))
    });
    let taken = taken_now(table);
    for k in 0..ctx.messages() {
        let Some(e) = table.MessageInfo(k as u32) else {
            fail!("message {} missing from the table", crate::display::dec(k));
        };
        let sent = dev.md.sent(k as u32).wrapping_sub(sent0[k]);
        let handled = ctx.handled(k);
        let delivered = taken[k].all.wrapping_sub(taken0[k].all);
        let outside = taken[k].outside.wrapping_sub(taken0[k].outside);
        let w = want(k);
        check!(
            sent == w && handled == w && delivered == w && outside == 0,
            "{} {} message {} (vector {}, targets {}): raised {}, sent {}, delivered {} ({} outside the targets), handled {}",
            dev.name(),
            crate::display::dec(dev.id()),
            crate::display::dec(k),
            crate::display::hex(e.Vector),
            crate::display::hex(e.TargetProcessorSet),
            crate::display::dec(w),
            crate::display::dec(sent),
            crate::display::dec(delivered),
            crate::display::dec(outside),
            crate::display::dec(handled)
        );
    }
    Ok(())
}

/// Message `k` of `m` is masked with its pending bit set (nothing else
/// pending or sent since `sent0` / `taken0`): unmasking it delivers it
/// exactly once and clears the bit; raised again it arrives once more;
/// then every message is masked again.
pub fn unmask_delivers_pending_once(
    m: &MsgDev,
    ctx: &MCtx,
    t: PIO_INTERRUPT_MESSAGE_INFO,
    k: u32,
    sent0: &[u32; MAX_MSG],
    taken0: &[Taken; MAX_MSG],
) -> TestResult {
    m.md.set_mask(m.all() & !(1 << k));
    wait_io(m, "the pending message after its unmask", || {
        ctx.handled(k as usize) >= 1
    })?;
    settle_io(m);
    check!(
        m.md.pending() == 0,
        "pending {} after the unmask",
        crate::display::hex(m.md.pending())
    );
    check_exact(m, ctx, t, sent0, taken0, |i| u32::from(i as u32 == k))?;
    raise_one(m, ctx, k, 2)?;
    settle_io(m);
    m.md.set_mask(m.all());
    check_exact(m, ctx, t, sent0, taken0, |i| 2 * u32::from(i as u32 == k))
}
