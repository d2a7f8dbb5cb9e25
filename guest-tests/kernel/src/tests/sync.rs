//! `spinlock_`, `synchronize_`, `floating_`: the spin-lock rule for an ISR
//! on two vectors, KeSynchronizeExecution (exclusion and IRQL), and the
//! FP/SSE state across an ISR that clobbers it.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use irqconnect_abi::ntstatus::STATUS_INVALID_PARAMETER;
use irqconnect_abi::testdev::{device_port, reg};

use super::fixture::need_cpus;
use super::pvfix::{
    self, Args, CTX, Env, LOCKS, Policy, check_counts, connect_ok, connect_refused, counters,
    ctx_of, device_isr, disconnect_ok, settle, wait_for,
};
use crate::runner::{Test, TestResult};
use crate::wdm::{
    KINTERRUPT, KINTERRUPT_MODE, KeAcquireInterruptSpinLock, KeInitializeSpinLock,
    KeReleaseInterruptSpinLock, KeSynchronizeExecution, PVOID,
};
use crate::{check, cpu, irql, lapic, lines, time};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("spinlock_required_for_second_vector", || {
        pvfix::run(spinlock_second_vector)
    }),
    Test::new("synchronize_execution_excludes_isr", || {
        pvfix::run(excludes_isr)
    }),
    Test::new("synchronize_execution_at_sync_irql", || {
        pvfix::run(at_sync_irql)
    }),
    Test::new("floating_state_preserved_across_isr", || {
        pvfix::run(floating_state)
    }),
];

/// One ISR for a device's two vectors: without a spin lock every
/// connection is refused, the first one included (docs/semantics.md rule
/// 10); with one, a SynchronizeIrql below the device's highest Irql is
/// refused; with both right, each vector's interrupts reach the ISR at
/// that SynchronizeIrql holding the driver's lock.
fn spinlock_second_vector(env: &Env) -> TestResult {
    let dev = env.multi_vector()?;
    let (r0, r1) = (dev.res(0), dev.res(1));
    let (hi, lo) = if r1.level >= r0.level { (1, 0) } else { (0, 1) };
    let sync = r0.level.max(r1.level);
    let lock = &LOCKS[0];
    KeInitializeSpinLock(lock);

    // Without a lock neither vector connects, not even as the first
    // connection of the device.
    let mut a0 = Args::of(&dev, 0, &CTX[0]);
    a0.sync = sync;
    connect_refused(
        &dev,
        &a0,
        STATUS_INVALID_PARAMETER,
        "first vector without a spin lock",
    )?;
    let mut a1 = Args::of(&dev, 1, &CTX[1]);
    a1.sync = sync;
    connect_refused(
        &dev,
        &a1,
        STATUS_INVALID_PARAMETER,
        "second vector without a spin lock",
    )?;

    // The higher-Irql vector first; the other with the lock but its own Irql
    // as SynchronizeIrql (below the device's highest) is refused.
    let mut first = Args::of(&dev, hi, &CTX[hi]);
    first.lock = Some(lock);
    first.sync = sync;
    let h_hi = connect_ok(&dev, &first)?;
    let mut second = Args::of(&dev, lo, &CTX[lo]);
    second.lock = Some(lock);
    if second.sync < sync {
        connect_refused(
            &dev,
            &second,
            STATUS_INVALID_PARAMETER,
            "SynchronizeIrql below the device's highest Irql",
        )?;
    }
    second.sync = sync;
    let h_lo = connect_ok(&dev, &second)?;

    // Deliveries on both vectors. Resource 0 is the test device's own line;
    // the other is a bare line driven through the pc-testdev port, claimed
    // by soft causes.
    let (c0, c1) = (&CTX[0], &CTX[1]);
    c0.bind(Some(&dev), Policy::One, r0.affinity);
    c1.bind(None, Policy::One, r1.affinity);
    for c in [c0, c1] {
        c.lock.store(lock.address() as usize, Ordering::Release);
    }
    let base = counters(&dev);
    dev.td.enable(true);
    let line1 = u8::try_from(r1.line).unwrap_or(u8::MAX);
    const N: u32 = 3;
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
    check_counts(&dev, base, c0.claimed(), N)?;
    check!(
        c0.last_vector.load(Ordering::Acquire) == r0.vector
            && c1.last_vector.load(Ordering::Acquire) == r1.vector,
        "the ISR saw vectors {} and {}, expected {} and {}",
        crate::display::hex(c0.last_vector.load(Ordering::Acquire)),
        crate::display::hex(c1.last_vector.load(Ordering::Acquire)),
        crate::display::hex(r0.vector),
        crate::display::hex(r1.vector)
    );
    c0.check_clean("on the first vector")?;
    c1.check_clean("on the second vector")?;
    disconnect_ok(h_lo)?;
    disconnect_ok(h_hi)
}

static INSIDE: AtomicBool = AtomicBool::new(false);
static OVERLAPS: AtomicU32 = AtomicU32::new(0);
static SYNC_RUNS: AtomicU32 = AtomicU32::new(0);

fn enter_exclusive() {
    if INSIDE.swap(true, Ordering::AcqRel) {
        OVERLAPS.fetch_add(1, Ordering::AcqRel);
    }
}

fn leave_exclusive() {
    INSIDE.store(false, Ordering::Release);
}

fn exclusive_isr(interrupt: &KINTERRUPT, context: PVOID) -> bool {
    enter_exclusive();
    let claimed = device_isr(interrupt, context);
    leave_exclusive();
    claimed
}

/// The synchronized routine: marks the shared section, spins, returns
/// TRUE on every other run.
fn exclusive_routine(_context: PVOID) -> bool {
    enter_exclusive();
    for _ in 0..300 {
        cpu::pause();
    }
    let run = SYNC_RUNS.fetch_add(1, Ordering::AcqRel) + 1;
    leave_exclusive();
    run.is_multiple_of(2)
}

/// The ISR runs on the APs (host timer raising causes), the BSP runs
/// synchronized routines in a loop: the two never overlap, every cause is
/// claimed, and KeSynchronizeExecution returns the routine's result.
fn excludes_isr(env: &Env) -> TestResult {
    need_cpus(2)?;
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let aps = env.online() & !1;
    let ctx = CTX[0].bind(Some(&dev), Policy::One, aps);
    ctx.spin.store(300, Ordering::Relaxed);
    INSIDE.store(false, Ordering::Release);
    OVERLAPS.store(0, Ordering::Release);
    SYNC_RUNS.store(0, Ordering::Release);
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.routine = Some(exclusive_isr);
    a.mask = aps;
    let h = connect_ok(&dev, &a)?;
    let base = counters(&dev);
    const CAUSES: u16 = 200;
    dev.td.enable(true);
    dev.td.timer_start(CAUSES, 100);
    let mut interleaved = 0u32;
    let mut wrong_result = 0u32;
    let deadline = time::now_us() + 10 * pvfix::TIMEOUT_US;
    while (dev.td.timer_remaining() > 0 || ctx.claimed() < u32::from(CAUSES))
        && time::now_us() < deadline
    {
        let claims = ctx.claimed();
        let result = KeSynchronizeExecution(h, exclusive_routine, core::ptr::null_mut());
        if result != SYNC_RUNS.load(Ordering::Acquire).is_multiple_of(2) {
            wrong_result += 1;
        }
        if ctx.claimed() != claims {
            interleaved += 1;
        }
        // Leave the lock free for a moment: a test-and-set lock is not
        // fair, and back-to-back runs would starve the ISR.
        time::delay_us(20);
    }
    settle();
    dev.td.enable(false);
    let overlaps = OVERLAPS.load(Ordering::Acquire);
    check!(
        overlaps == 0,
        "the ISR and a synchronized routine overlapped {} times",
        crate::display::dec(overlaps)
    );
    check!(
        wrong_result == 0,
        "KeSynchronizeExecution changed the routine's result {} times",
        crate::display::dec(wrong_result)
    );
    check_counts(&dev, base, ctx.claimed(), u32::from(CAUSES))?;
    let runs = SYNC_RUNS.load(Ordering::Acquire);
    check!(
        runs >= 10 && interleaved >= 1,
        "only {} synchronized runs, {} with ISR claims in between: no concurrency exercised",
        crate::display::dec(runs),
        crate::display::dec(interleaved)
    );
    ctx.check_clean("on the APs")?;
    disconnect_ok(h)
}

static SEEN_CR8: AtomicU64 = AtomicU64::new(0);

/// Records CR8; returns TRUE when the context is non-null.
fn irql_routine(context: PVOID) -> bool {
    SEEN_CR8.store(cpu::read_cr8(), Ordering::Release);
    !context.is_null()
}

/// The routine runs at SynchronizeIrql (chosen above Irql) from PASSIVE,
/// DISPATCH and SynchronizeIrql itself; the caller's IRQL comes back; the
/// result passes through; the ISR also runs at SynchronizeIrql.
fn at_sync_irql(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let ctx = CTX[0].bind(Some(&dev), Policy::One, 1);
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.sync = a.irql + 1;
    a.mask = 1;
    let h = connect_ok(&dev, &a)?;
    check!(
        h.synchronize_irql() == a.sync,
        "SynchronizeIrql not recorded"
    );
    for caller in [irql::PASSIVE_LEVEL, irql::DISPATCH_LEVEL, a.sync] {
        let old = irql::raise(caller);
        for want in [true, false] {
            SEEN_CR8.store(u64::MAX, Ordering::Release);
            let context = if want {
                1usize as PVOID
            } else {
                core::ptr::null_mut()
            };
            let got = KeSynchronizeExecution(h, irql_routine, context);
            let seen = SEEN_CR8.load(Ordering::Acquire);
            let after = irql::current();
            check!(
                seen == u64::from(a.sync) && got == want && after == caller,
                "from IRQL {}: routine saw CR8 {} (want {}), returned {} (routine {}), IRQL after {}",
                crate::display::dec(caller),
                crate::display::hex(seen),
                crate::display::dec(a.sync),
                crate::display::dec(got),
                crate::display::dec(want),
                crate::display::dec(after)
            );
        }
        let before = KeAcquireInterruptSpinLock(h);
        let inside = irql::current();
        KeReleaseInterruptSpinLock(h, before);
        check!(
            before == caller && inside == a.sync && irql::current() == caller,
            "KeAcquireInterruptSpinLock from {}: returned {}, IRQL {} inside, {} after",
            crate::display::dec(caller),
            crate::display::dec(before),
            crate::display::dec(inside),
            crate::display::dec(irql::current())
        );
        irql::lower(old);
    }
    let base = counters(&dev);
    dev.td.enable(true);
    dev.td.raise(2);
    wait_for("the ISR", || ctx.claimed() >= 2)?;
    settle();
    dev.td.enable(false);
    check_counts(&dev, base, ctx.claimed(), 2)?;
    ctx.check_clean("at SynchronizeIrql")?;
    disconnect_ok(h)
}

/// A 512-byte FXSAVE area, 16-byte aligned, as atomics so the ISR and the
/// test share it without `static mut`.
#[repr(C, align(16))]
struct FxArea([AtomicU64; 64]);

impl FxArea {
    const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; 64])
    }

    fn ptr(&self) -> *const u8 {
        self.0.as_ptr().cast()
    }

    fn save(&self) {
        // SAFETY: FXSAVE writes 512 bytes into this 16-byte aligned area.
        unsafe {
            core::arch::asm!("fxsave64 [{}]", in(reg) self.ptr(), options(nostack, preserves_flags))
        }
    }

    fn word(&self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }

    fn set_word(&self, i: usize, v: u64) {
        self.0[i].store(v, Ordering::Relaxed);
    }

    /// Bytes 0..8: FCW, FSW, abridged FTW, reserved, FOP.
    fn set_control(&self, fcw: u16, ftw: u8) {
        let w = self.word(0);
        let w = (w & !0xffff & !(0xff << 32)) | u64::from(fcw) | (u64::from(ftw) << 32);
        self.set_word(0, w);
    }

    /// Bytes 24..28: MXCSR.
    fn set_mxcsr(&self, mxcsr: u32) {
        let w = self.word(3);
        self.set_word(3, (w & !0xffff_ffff) | u64::from(mxcsr));
    }

    fn fcw(&self) -> u64 {
        self.word(0) & 0xffff
    }

    fn ftw(&self) -> u64 {
        (self.word(0) >> 32) & 0xff
    }

    fn mxcsr(&self) -> u64 {
        self.word(3) & 0xffff_ffff
    }

    /// ST(i): 80 bits in 16-byte slot i at byte 32 (words 4 + 2i, 5 + 2i).
    fn set_st(&self, i: usize, mantissa: u64, exp: u16) {
        self.set_word(4 + 2 * i, mantissa);
        self.set_word(5 + 2 * i, u64::from(exp));
    }

    fn st(&self, i: usize) -> (u64, u64) {
        (self.word(4 + 2 * i), self.word(5 + 2 * i) & 0xffff)
    }

    /// XMM(i): 16 bytes at byte 160 (words 20 + 2i, 21 + 2i).
    fn xmm(&self, i: usize) -> (u64, u64) {
        (self.word(20 + 2 * i), self.word(21 + 2 * i))
    }

    fn set_xmm(&self, i: usize, lo: u64, hi: u64) {
        self.set_word(20 + 2 * i, lo);
        self.set_word(21 + 2 * i, hi);
    }
}

static SAVED: FxArea = FxArea::new();
static KNOWN: FxArea = FxArea::new();
static JUNK: FxArea = FxArea::new();
static AFTER: FxArea = FxArea::new();
/// XMM0..15 loaded by `movups` after the FXRSTOR (16 x 16 bytes).
static XMM_IN: FxArea = FxArea::new();
/// XMM0..15 stored by `movups` after the interrupt.
static XMM_OUT: FxArea = FxArea::new();
static ISR_CLOBBERED: AtomicU32 = AtomicU32::new(0);

const KNOWN_FCW: u16 = 0x027f;
const KNOWN_MXCSR: u32 = 0x3f80;
const JUNK_FCW: u16 = 0x0c7f;
const JUNK_MXCSR: u32 = 0x7f80;

fn pattern(i: usize, salt: u64) -> (u64, u64) {
    let x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    (x, x.rotate_left(29) ^ 0x5555_aaaa_5555_aaaa)
}

/// Loads the junk state (FXRSTOR of `JUNK`, `movups` of junk into every
/// XMM register) and checks that it took; then claims.
fn fp_clobber_isr(interrupt: &KINTERRUPT, context: PVOID) -> bool {
    // SAFETY: loads FP/SSE registers from a valid FXSAVE image and from
    // 256 bytes of `JUNK`; the interrupt stub saved this state on entry and
    // restores it on exit, and this kernel (built without SSE) keeps no
    // values in these registers across the asm.
    unsafe {
        core::arch::asm!(
            "fninit",
            "fxrstor64 [{j}]",
            "movups xmm0, [{x}]", "movups xmm1, [{x}+16]", "movups xmm2, [{x}+32]",
            "movups xmm3, [{x}+48]", "movups xmm4, [{x}+64]", "movups xmm5, [{x}+80]",
            "movups xmm6, [{x}+96]", "movups xmm7, [{x}+112]", "movups xmm8, [{x}+128]",
            "movups xmm9, [{x}+144]", "movups xmm10, [{x}+160]", "movups xmm11, [{x}+176]",
            "movups xmm12, [{x}+192]", "movups xmm13, [{x}+208]", "movups xmm14, [{x}+224]",
            "movups xmm15, [{x}+240]",
            j = in(reg) JUNK.ptr(),
            x = in(reg) JUNK.ptr().wrapping_add(160),
            options(nostack, preserves_flags)
        );
    }
    let probe = FxArea::new();
    probe.save();
    if probe.mxcsr() == u64::from(JUNK_MXCSR) && probe.fcw() == u64::from(JUNK_FCW) {
        ISR_CLOBBERED.fetch_add(1, Ordering::AcqRel);
    }
    match ctx_of(context) {
        Some(ctx) => pvfix::claim(interrupt, ctx, context),
        None => false,
    }
}

/// Known x87 (ST0..7, FCW, tags), MXCSR and XMM0..15 values in the
/// registers (FXRSTOR, then `movups`: an emulating host may lack the x87
/// load/store instructions; see `guest-tests/README.md`), an interrupt
/// taken in `sti; hlt` whose ISR
/// loads other values into all of them, and everything comes back.
fn floating_state(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    let ctx = CTX[0].bind(Some(&dev), Policy::All, 1);
    let mut a = Args::of(&dev, 0, &CTX[0]);
    a.routine = Some(fp_clobber_isr);
    a.mask = 1;
    a.floating = true;
    ISR_CLOBBERED.store(0, Ordering::Release);

    SAVED.save();
    for (area, fcw, mxcsr, salt) in [
        (&KNOWN, KNOWN_FCW, KNOWN_MXCSR, 0x1111_0000_0000_1111),
        (&JUNK, JUNK_FCW, JUNK_MXCSR, 0xdead_beef_0bad_f00d),
    ] {
        area.save();
        area.set_control(fcw, 0xff);
        area.set_mxcsr(mxcsr);
        for i in 0..8 {
            let (m, e) = pattern(i, salt);
            area.set_st(i, m | (1 << 63), 0x3fff + (e as u16 & 0xff));
        }
        for i in 0..16 {
            let (lo, hi) = pattern(i + 8, salt);
            area.set_xmm(i, lo, hi);
        }
    }
    for i in 0..16 {
        let (lo, hi) = pattern(i + 40, 0x2222_0000_0000_2222);
        XMM_IN.set_word(2 * i, lo);
        XMM_IN.set_word(2 * i + 1, hi);
    }

    let h = connect_ok(&dev, &a)?;
    dev.td.enable(true);
    // A periodic timer wakes the `hlt` should the device interrupt not come.
    lapic::timer_start(0xe6, 200_000, true, false);
    let raise_port = device_port(dev.id() as u16) + reg::RAISE;
    let flag = CTX[0].claims.as_ptr();
    let mut spins: u64 = 5_000;
    // SAFETY: FXRSTOR of a valid image (KNOWN was FXSAVEd, then only
    // FCW/tags/MXCSR (valid values)/ST/XMM changed), `movups` between the
    // registers and our static areas, an `out` to the test device's RAISE
    // register, and `sti; hlt` with the interrupt entry saving and restoring
    // every register it touches. This kernel keeps no values in x87/SSE
    // registers (built without SSE), so nothing of the compiler's is lost.
    unsafe {
        core::arch::asm!(
            "cli",
            "fxrstor64 [{known}]",
            "movups xmm0, [{xin}]", "movups xmm1, [{xin}+16]", "movups xmm2, [{xin}+32]",
            "movups xmm3, [{xin}+48]", "movups xmm4, [{xin}+64]", "movups xmm5, [{xin}+80]",
            "movups xmm6, [{xin}+96]", "movups xmm7, [{xin}+112]", "movups xmm8, [{xin}+128]",
            "movups xmm9, [{xin}+144]", "movups xmm10, [{xin}+160]", "movups xmm11, [{xin}+176]",
            "movups xmm12, [{xin}+192]", "movups xmm13, [{xin}+208]", "movups xmm14, [{xin}+224]",
            "movups xmm15, [{xin}+240]",
            "out dx, eax",
            "2:",
            "cmp dword ptr [{flag}], 0",
            "jne 3f",
            "sti",
            "hlt",
            "cli",
            "dec {spins}",
            "jnz 2b",
            "3:",
            "movups [{xout}], xmm0", "movups [{xout}+16], xmm1", "movups [{xout}+32], xmm2",
            "movups [{xout}+48], xmm3", "movups [{xout}+64], xmm4", "movups [{xout}+80], xmm5",
            "movups [{xout}+96], xmm6", "movups [{xout}+112], xmm7", "movups [{xout}+128], xmm8",
            "movups [{xout}+144], xmm9", "movups [{xout}+160], xmm10", "movups [{xout}+176], xmm11",
            "movups [{xout}+192], xmm12", "movups [{xout}+208], xmm13", "movups [{xout}+224], xmm14",
            "movups [{xout}+240], xmm15",
            "fxsave64 [{after}]",
            "fninit",
            "fxrstor64 [{saved}]",
            "sti",
            known = in(reg) KNOWN.ptr(),
            xin = in(reg) XMM_IN.ptr(),
            xout = in(reg) XMM_OUT.ptr(),
            after = in(reg) AFTER.ptr(),
            saved = in(reg) SAVED.ptr(),
            flag = in(reg) flag,
            spins = inout(reg) spins,
            in("dx") raise_port,
            in("eax") 1u32,
            options(nostack)
        );
    }
    lapic::timer_stop();
    settle();
    dev.td.enable(false);
    let _ = spins;
    check!(ctx.claimed() >= 1, "the device's interrupt never came");
    check!(
        ISR_CLOBBERED.load(Ordering::Acquire) >= 1,
        "the ISR could not load its own FP/SSE values (the test would prove nothing)"
    );
    check!(
        AFTER.fcw() == u64::from(KNOWN_FCW)
            && AFTER.mxcsr() == u64::from(KNOWN_MXCSR)
            && AFTER.ftw() == 0xff,
        "control state after the ISR: FCW {} MXCSR {} tags {}, expected {} {} 0xff",
        crate::display::hex(AFTER.fcw()),
        crate::display::hex(AFTER.mxcsr()),
        crate::display::hex(AFTER.ftw()),
        crate::display::hex(KNOWN_FCW),
        crate::display::hex(KNOWN_MXCSR)
    );
    for i in 0..8 {
        check!(
            AFTER.st(i) == KNOWN.st(i),
            "ST{} after the ISR: {} {}, expected {} {}",
            crate::display::dec(i),
            crate::display::hex(AFTER.st(i).1),
            crate::display::hex(AFTER.st(i).0),
            crate::display::hex(KNOWN.st(i).1),
            crate::display::hex(KNOWN.st(i).0)
        );
    }
    for i in 0..16 {
        let want = (XMM_IN.word(2 * i), XMM_IN.word(2 * i + 1));
        let got = (XMM_OUT.word(2 * i), XMM_OUT.word(2 * i + 1));
        check!(
            got == want && AFTER.xmm(i) == want,
            "XMM{} after the ISR: {} {} (FXSAVE {} {}), expected {} {}",
            crate::display::dec(i),
            crate::display::hex(got.1),
            crate::display::hex(got.0),
            crate::display::hex(AFTER.xmm(i).1),
            crate::display::hex(AFTER.xmm(i).0),
            crate::display::hex(want.1),
            crate::display::hex(want.0)
        );
    }
    ctx.check_clean("clobbering FP state")?;
    disconnect_ok(h)
}
