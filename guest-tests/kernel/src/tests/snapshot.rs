//! `snapshot_`: each test brings the interrupt machinery to one of the
//! moments a naive snapshot loses something, asks the VMM for a snapshot
//! right there (the snapshot device, `crate::snapshot`), and after the VM
//! went on (restored in a new process, or continued) checks that the state
//! of that moment was carried and that the interrupts in flight arrive
//! exactly as often as they would have without the snapshot.
//!
//! Every test takes one snapshot: with `--snapshot-then exit` the VM ends
//! at the request, and `vmm --restore` (without `--snapshot`) resumes it,
//! where further requests would be ignored. Without the device or without
//! `--snapshot` every test skips ("snapshots not enabled ..."): nothing
//! here passes without a snapshot. Each prints
//! `# NAME: snapshot taken, restored (N restores)` or `..., continued`.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use irqconnect_abi::ntstatus::{STATUS_INVALID_HANDLE, STATUS_SUCCESS, status_name};
use irqconnect_abi::pv::{Connect, irqchip_mode};

use super::fixture::{self, PIN_A, PIN_B, apic_id, count, need_cpus};
use super::msgfix::{
    self, MCTX, connect_messages, disconnect_messages, sent_now, settle_io, taken_now,
};
use super::pvfix::{
    self, Args, CTX, Dev, Env, MAX_DEVICES, MsgDev, Policy, check_counts, connect_ok, counters,
    cpus, deliveries, disconnect_ok, none_outside, route,
};
use crate::ioapic::{self, RTE_REMOTE_IRR, Rte};
use crate::lapic::{self, Delivery, Dest};
use crate::runner::{Failure, Test, TestResult};
use crate::snapshot::{self, Resumed};
use crate::wdm::{self, KAFFINITY, KINTERRUPT, KINTERRUPT_MODE, PVOID};
use crate::{check, cpu, fail, interrupts, irql, lines, percpu, println, pv, skip, smp, time};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("snapshot_level_in_service_remote_irr_set", level_in_service),
    Test::new("snapshot_edge_pending_in_irr", edge_pending),
    Test::new("snapshot_lapic_timer_armed_fires_once", timer_armed),
    Test::new("snapshot_ipi_between_init_and_sipi", init_then_sipi),
    Test::new("snapshot_storm_count_carried", storm_count),
    Test::new("snapshot_pv_connections_and_handles_survive", || {
        need_snapshot()?;
        pvfix::run(pv_survive)
    }),
    Test::new("snapshot_message_pending_bit_survives", || {
        need_snapshot()?;
        pvfix::run(message_pending)
    }),
    Test::new("snapshot_interrupts_under_load_none_lost", || {
        need_snapshot()?;
        pvfix::run(under_load)
    }),
];

/// How long a test waits for an interrupt after the resume (a restored
/// vCPU may start late on a loaded host).
const TIMEOUT_US: u64 = 2_000_000;

/// Skips unless the VMM takes snapshots on request.
fn need_snapshot() -> TestResult {
    if let Some(why) = snapshot::unavailable_reason() {
        skip!("{}", why);
    }
    Ok(())
}

/// Encodes a [`Resumed`] for an atomic (0: no snapshot taken yet).
fn code(r: Resumed) -> u8 {
    match r {
        Resumed::Restored => 1,
        Resumed::Continued => 2,
    }
}

/// Prints how the VM went on after the test's snapshot; fails when the
/// test never took it (`code` 0).
fn report(name: &str, code: u8) -> TestResult {
    match code {
        1 => println!(
            "# {}: snapshot taken, restored ({} restores)",
            name,
            crate::display::dec(snapshot::restores())
        ),
        2 => println!("# {}: snapshot taken, continued", name),
        _ => fail!("the snapshot was never requested"),
    }
    Ok(())
}

/// Takes the test's snapshot from thread context and reports it.
fn take(name: &str, tag: u32) -> TestResult {
    let r = snapshot::take(tag);
    report(name, code(r))
}

fn bsp() -> u8 {
    apic_id(0) as u8
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) -> TestResult {
    if time::wait_until(TIMEOUT_US, || {
        // A port read: an exit, where an emulating host delivers.
        let _ = snapshot::restores();
        cond()
    }) {
        Ok(())
    } else {
        fail!("timeout waiting for {}", what)
    }
}

// ---- a level interrupt in service ----

const LEVEL_V: u8 = 0x3c;
static LEVEL_CALLS: AtomicU32 = AtomicU32::new(0);
static LEVEL_RESUMED: AtomicU8 = AtomicU8::new(0);
/// RTE, ISR bit and handler calls at the snapshot (before) and at the
/// resume (after).
static LEVEL_RTE_BEFORE: AtomicU64 = AtomicU64::new(0);
static LEVEL_RTE_AFTER: AtomicU64 = AtomicU64::new(0);
static LEVEL_ISR_BEFORE: AtomicBool = AtomicBool::new(false);
static LEVEL_CALLS_AFTER: AtomicU32 = AtomicU32::new(0);

/// The level handler: on its first call (the line still asserted) it takes
/// the snapshot, the interrupt in service; then on every call it sends its
/// EOI with the line still asserted and only then lowers the line. So
/// exactly one more delivery follows the first: re-sent at the EOI where
/// the LAPIC holds ISR until EOI, or already re-sent at injection where it
/// acks and EOIs there (the boot probe's quirk) and pending in IRR at the
/// snapshot. Either way the second call's EOI finds the line low.
fn level_in_service_handler(vector: u8) {
    if LEVEL_CALLS.fetch_add(1, Ordering::AcqRel) == 0 {
        LEVEL_RTE_BEFORE.store(ioapic::read_rte(PIN_B), Ordering::Relaxed);
        LEVEL_ISR_BEFORE.store(lapic::in_service(vector), Ordering::Relaxed);
        let r = snapshot::take(0x100);
        LEVEL_RTE_AFTER.store(ioapic::read_rte(PIN_B), Ordering::Relaxed);
        LEVEL_CALLS_AFTER.store(LEVEL_CALLS.load(Ordering::Acquire), Ordering::Relaxed);
        LEVEL_RESUMED.store(code(r), Ordering::Release);
    }
    interrupts::eoi_now();
    // One round trip through the VMM before the line drops: with KVM's
    // LAPIC and our IOAPIC (split mode) KVM hands a level EOI to the VMM
    // only at the vCPU's next exit, which would otherwise be the line
    // drop itself (seen here when a snapshot taken in user mode, ISR set,
    // resumes in split mode).
    crate::serial::exit_to_vmm();
    lines::set(PIN_B, false);
}

/// A level interrupt in service at the snapshot: the line asserted, Remote
/// IRR set, the handler running (ISR set where the LAPIC holds it). After
/// the resume: Remote IRR still set, and after the EOI exactly one more
/// delivery (the line was still asserted at the EOI), then none (the line
/// is low at the next EOI); Remote IRR clear at the end.
fn level_in_service() -> TestResult {
    need_snapshot()?;
    LEVEL_CALLS.store(0, Ordering::Release);
    LEVEL_RESUMED.store(0, Ordering::Release);
    LEVEL_CALLS_AFTER.store(0, Ordering::Release);
    interrupts::set_handler(LEVEL_V, Some(level_in_service_handler));
    ioapic::write_rte(PIN_B, Rte::new(LEVEL_V, bsp()).level().0);
    lines::set(PIN_B, true);
    wait("two deliveries of the level pin", || count(0, LEVEL_V) >= 2)?;
    fixture::settle();
    time::delay_us(20_000);
    report(
        "snapshot_level_in_service_remote_irr_set",
        LEVEL_RESUMED.load(Ordering::Acquire),
    )?;
    let (before, after) = (
        LEVEL_RTE_BEFORE.load(Ordering::Relaxed),
        LEVEL_RTE_AFTER.load(Ordering::Relaxed),
    );
    check!(
        before & RTE_REMOTE_IRR != 0,
        "Remote IRR not set at the snapshot (RTE {})",
        crate::display::hex(before)
    );
    check!(
        after & RTE_REMOTE_IRR != 0 && after & 0xff == u64::from(LEVEL_V),
        "Remote IRR or vector lost by the snapshot: RTE {} at the snapshot, {} after it",
        crate::display::hex(before),
        crate::display::hex(after)
    );
    check!(
        !fixture::isr_held() || LEVEL_ISR_BEFORE.load(Ordering::Relaxed),
        "ISR bit of vector {} not set in its handler at the snapshot",
        crate::display::hex(LEVEL_V)
    );
    check!(
        LEVEL_CALLS_AFTER.load(Ordering::Relaxed) == 1,
        "{} handler calls when the snapshot returned, expected 1",
        crate::display::dec(LEVEL_CALLS_AFTER.load(Ordering::Relaxed))
    );
    let (calls, on_bsp, total) = (
        LEVEL_CALLS.load(Ordering::Acquire),
        count(0, LEVEL_V),
        fixture::total(LEVEL_V),
    );
    check!(
        calls == 2 && on_bsp == 2 && total == 2,
        "level pin: {} handler calls, {} deliveries ({} on the BSP), expected 2: one in service at the snapshot, one after its EOI",
        crate::display::dec(calls),
        crate::display::dec(total),
        crate::display::dec(on_bsp)
    );
    let end = ioapic::read_rte(PIN_B);
    check!(
        end & RTE_REMOTE_IRR == 0,
        "Remote IRR still set at the end (RTE {})",
        crate::display::hex(end)
    );
    Ok(())
}

// ---- edge vectors pending in IRR ----

/// Three edge-triggered interrupts pending in the BSP's IRR at the
/// snapshot, not injected: a self IPI (0xCB) and an IOAPIC edge (pin 3,
/// 0x3B) held by CR8 0xC, and a self IPI of a higher class (0xD5) held by
/// IF=0. After the resume: all three still in IRR, CR8 still 0xC, nothing
/// taken; `sti` takes 0xD5 once and only it; lowering CR8 takes the other
/// two once each; IRR clear.
fn edge_pending() -> TestResult {
    need_snapshot()?;
    const IPI: u8 = 0xcb;
    const IO: u8 = 0x3b;
    const HIGH: u8 = 0xd5;
    ioapic::write_rte(PIN_A, Rte::new(IO, bsp()).0);
    irql::set(0xc);
    lapic::send_ipi(IPI, Delivery::Fixed, Dest::SelfOnly);
    lines::pulse(PIN_A);
    cpu::cli();
    lapic::send_ipi(HIGH, Delivery::Fixed, Dest::SelfOnly);
    let pending = time::wait_until(fixture::TIMEOUT_US, || {
        lapic::requested(IPI) && lapic::requested(IO) && lapic::requested(HIGH)
    });
    let taken = count(0, IPI) + count(0, IO) + count(0, HIGH);
    let r = snapshot::take(0x200);
    let still = [
        lapic::requested(IPI),
        lapic::requested(IO),
        lapic::requested(HIGH),
    ];
    let (cr8, tpr) = (cpu::read_cr8(), lapic::read(lapic::REG_TPR));
    let taken_after = count(0, IPI) + count(0, IO) + count(0, HIGH);
    cpu::sti();
    let high_alone = wait("vector 0xd5 after sti", || count(0, HIGH) >= 1);
    fixture::settle();
    let held = (count(0, IPI), count(0, IO));
    irql::set(0);
    report("snapshot_edge_pending_in_irr", code(r))?;
    check!(
        pending && taken == 0,
        "before the snapshot: vectors 0xcb, 0x3b, 0xd5 not all pending in IRR ({} taken)",
        crate::display::dec(taken)
    );
    check!(
        still == [true, true, true] && taken_after == 0,
        "after the snapshot: IRR bits of 0xcb, 0x3b, 0xd5 {} {} {}, {} taken",
        u8::from(still[0]),
        u8::from(still[1]),
        u8::from(still[2]),
        crate::display::dec(taken_after)
    );
    check!(
        cr8 == 0xc && tpr >> 4 == 0xc,
        "after the snapshot: CR8 {}, TPR {}, expected class 0xc",
        crate::display::hex(cr8),
        crate::display::hex(tpr)
    );
    high_alone?;
    check!(
        held == (0, 0),
        "with CR8 0xc: 0xcb taken {} times, 0x3b {} times",
        crate::display::dec(held.0),
        crate::display::dec(held.1)
    );
    wait("vectors 0xcb and 0x3b after CR8 dropped", || {
        count(0, IPI) >= 1 && count(0, IO) >= 1
    })?;
    fixture::settle();
    for v in [IPI, IO, HIGH] {
        fixture::expect_counts(v, |c| u32::from(c == 0))?;
        check!(
            !lapic::requested(v),
            "vector {} still pending in IRR",
            crate::display::hex(v)
        );
    }
    Ok(())
}

// ---- armed LAPIC timers ----

const TIMER_V: u8 = 0xc6;

/// One-shot timer of CPU `cpu`: 40 ms + 10 ms per processor index (1 GHz
/// bus, divide by 1).
fn timer_ticks(cpu: usize) -> u32 {
    ((40 + 10 * (cpu as u32 % 16)) * 1_000_000).min(u32::MAX / 2)
}

fn arm_timer(cpu: usize) -> usize {
    lapic::timer_start(TIMER_V, timer_ticks(cpu), false, false);
    lapic::timer_current() as usize
}

fn timer_now(_: usize) -> usize {
    lapic::timer_current() as usize
}

/// A one-shot LAPIC timer armed on every processor at the snapshot (none
/// fired yet): after the resume each fires exactly once, on its own
/// processor, and its current count is 0 afterwards.
fn timer_armed() -> TestResult {
    need_snapshot()?;
    let n = percpu::count();
    for c in 1..n {
        let left = smp::run_on(c, arm_timer, c).map_err(Failure::from)?;
        check!(
            left > 0,
            "cpu {}: timer current count 0 right after arming",
            crate::display::dec(c)
        );
    }
    arm_timer(0);
    let fired_before = fixture::total(TIMER_V);
    let left = lapic::timer_current();
    let r = snapshot::take(0x300);
    report("snapshot_lapic_timer_armed_fires_once", code(r))?;
    check!(
        fired_before == 0 && left > 0,
        "before the snapshot: {} timers fired, BSP current count {}",
        crate::display::dec(fired_before),
        crate::display::dec(left)
    );
    wait("every processor's timer", || {
        (0..n).all(|c| count(c, TIMER_V) >= 1)
    })?;
    // Longer than any timer's period: a timer that re-armed would fire again.
    time::delay_us(250_000);
    fixture::expect_counts(TIMER_V, |_| 1)?;
    for c in 0..n {
        let now = smp::run_on(c, timer_now, 0).map_err(Failure::from)?;
        check!(
            now == 0,
            "cpu {}: timer current count {} after it fired",
            crate::display::dec(c),
            crate::display::dec(now)
        );
    }
    Ok(())
}

// ---- an AP between INIT and SIPI ----

const SIPI_IPI_V: u8 = 0xc8;

fn plus_one(x: usize) -> usize {
    x + 1
}

/// The last AP gets INIT (waiting for SIPI, offline) before the snapshot.
/// After the resume it has not started by itself (50 ms); SIPI starts it:
/// it comes online, runs a work item, and takes exactly one fixed IPI.
fn init_then_sipi() -> TestResult {
    need_cpus(2)?;
    need_snapshot()?;
    let n = percpu::count();
    if n >= percpu::MAX_CPUS {
        skip!("every AP stack is in use (no free stack for a restarted AP)");
    }
    let ap = n - 1;
    smp::init_one(ap);
    let r = snapshot::take(0x400);
    time::delay_us(50_000);
    let early = percpu::cpu(ap).online.load(Ordering::Acquire);
    // Ticket n - 1: the APs took tickets 0..n-2 at boot.
    let started = smp::restart(ap, (n - 1) as u32, TIMEOUT_US);
    report("snapshot_ipi_between_init_and_sipi", code(r))?;
    check!(
        !early,
        "cpu {} came online after the resume without a SIPI",
        crate::display::dec(ap)
    );
    check!(
        started,
        "cpu {} did not come online after SIPI",
        crate::display::dec(ap)
    );
    let got = smp::run_on(ap, plus_one, 41).map_err(Failure::from)?;
    check!(
        got == 42,
        "cpu {}: work item answered {}",
        crate::display::dec(ap),
        crate::display::dec(got)
    );
    lapic::send_ipi(SIPI_IPI_V, Delivery::Fixed, Dest::Physical(apic_id(ap)));
    wait("the IPI on the restarted AP", || count(ap, SIPI_IPI_V) >= 1)?;
    fixture::settle();
    fixture::expect_counts(SIPI_IPI_V, |c| u32::from(c == ap))
}

// ---- half a storm ----

static STORM_CALLS: AtomicU32 = AtomicU32::new(0);
static STORM_AT: AtomicU32 = AtomicU32::new(u32::MAX);
static STORM_RESUMED: AtomicU8 = AtomicU8::new(0);

/// The storming device's ISR: counts, declines, and takes the snapshot at
/// call [`STORM_AT`] (half the host's threshold).
fn storm_isr(_interrupt: &KINTERRUPT, _context: PVOID) -> bool {
    let n = STORM_CALLS.fetch_add(1, Ordering::AcqRel) + 1;
    if n == STORM_AT.load(Ordering::Acquire) {
        STORM_RESUMED.store(code(snapshot::take(0x500)), Ordering::Release);
    }
    false
}

/// A storm of unclaimed level re-deliveries (as in
/// `hostile_storm_unclaimed_level_is_masked`) with the snapshot taken by
/// the ISR at half the host's threshold: after the resume the storm guard
/// goes on counting from there, so the pin is masked after exactly as many
/// ISR calls as without a snapshot, threshold + 2 (a guard that restarted
/// its count would need half a threshold more), `storm_masked_pins` one
/// higher. Skips in
/// kernel mode (KVM's IOAPIC: no storm guard).
fn storm_count() -> TestResult {
    pvfix::need_pv()?;
    need_snapshot()?;
    let start = pvfix::platform()?;
    if start.irqchip_mode == irqchip_mode::KERNEL {
        skip!("storm guard needs our IOAPIC (split/user)");
    }
    let devs = pvfix::started_devices(start.device_count);
    pvfix::quiesce_all(&devs);
    let result = storm_run(&devs, start.storm_threshold);
    wdm::disconnect_all();
    pvfix::quiesce_all(&devs);
    result?;
    pvfix::check_storm_aftermath(&start)
}

fn storm_run(devs: &[Option<Dev>; MAX_DEVICES], threshold: u32) -> TestResult {
    let Some(s) = pvfix::exclusive(devs, KINTERRUPT_MODE::LevelSensitive, true) else {
        skip!("the host's device table has no exclusive level device");
    };
    s.check_wiring()?;
    check!(
        threshold >= 4,
        "storm threshold {} too low to snapshot half-way",
        crate::display::dec(threshold)
    );
    let n = percpu::count().min(64);
    let cpu = n - 1;
    let (pin, vector) = (s.line(), s.vector());
    let mut a = Args::of(&s, 0, &CTX[0]);
    a.routine = Some(storm_isr);
    a.context = core::ptr::null_mut();
    a.mask = 1 << cpu;
    STORM_CALLS.store(0, Ordering::Release);
    STORM_RESUMED.store(0, Ordering::Release);
    STORM_AT.store(threshold / 2, Ordering::Release);
    let hs = connect_ok(&s, &a)?;
    let unclaimed_before = wdm::unclaimed(cpu, vector);
    s.td.enable(true);
    s.td.raise(1);
    let masked = time::wait_until(120_000_000, || {
        time::delay_us(10_000);
        pvfix::route(pin).is_ok_and(|r| r.masked != 0)
    });
    STORM_AT.store(u32::MAX, Ordering::Release);
    time::delay_us(20_000);
    let settled = STORM_CALLS.load(Ordering::Acquire);
    time::delay_us(50_000);
    let later = STORM_CALLS.load(Ordering::Acquire);
    report(
        "snapshot_storm_count_carried",
        STORM_RESUMED.load(Ordering::Acquire),
    )?;
    check!(
        masked,
        "pin {} not masked: {} ISR calls (threshold {})",
        crate::display::dec(pin),
        crate::display::dec(settled),
        crate::display::dec(threshold)
    );
    println!(
        "# snapshot_storm: pin {} vector {} masked after {} ISR calls (snapshot at {}; threshold {}) on cpu {}",
        crate::display::dec(pin),
        crate::display::hex(vector),
        crate::display::dec(later),
        crate::display::dec(threshold / 2),
        crate::display::dec(threshold),
        crate::display::dec(cpu)
    );
    check!(
        later == settled,
        "ISR still called after the mask: {} calls in 50 ms",
        crate::display::dec(later - settled)
    );
    // An uninterrupted storm: the first delivery, then re-deliveries after
    // each EOI until the count of them exceeds the threshold; the one that
    // exceeds it still goes out, then the host masks the pin.
    let want = threshold + 2;
    check!(
        settled == want,
        "masked after {} ISR calls, expected {} as without a snapshot (threshold {} + 2; snapshot at {})",
        crate::display::dec(settled),
        crate::display::dec(want),
        crate::display::dec(threshold),
        crate::display::dec(threshold / 2)
    );
    let unclaimed = wdm::unclaimed(cpu, vector).wrapping_sub(unclaimed_before);
    check!(
        unclaimed == settled,
        "dispatch counted {} unclaimed deliveries for {} ISR calls",
        crate::display::dec(unclaimed),
        crate::display::dec(settled)
    );
    check!(
        s.td.status() == 1,
        "the storming device has {} pending causes, expected 1",
        crate::display::dec(s.td.status())
    );
    // Clean up: acknowledge, disconnect, re-arm the pin with a claiming
    // connection and see it work.
    s.td.enable(false);
    s.td.drain(10);
    disconnect_ok(hs)?;
    let online = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    pvfix::rearmed_by_new_connect(&s, online)
}

// ---- PV connections and handles ----

/// A raw CONNECT of `dev` (level, every processor): its host handle.
fn raw_connect(env: &Env, dev: &Dev) -> Result<u64, Failure> {
    let r = dev.res(0);
    let mut c: Connect = pv::connect_block();
    c.device_id = dev.id();
    c.vector = r.vector;
    c.irql = r.level;
    c.synchronize_irql = r.level;
    c.interrupt_mode = r.interrupt_mode() as u8;
    c.share_vector = u8::from(r.share_vector());
    c.processor_enable_mask = env.online();
    c.service_routine = pvfix::device_isr as *const () as u64;
    match pv::connect(c) {
        Ok(answer) => Ok(answer.handle),
        Err(s) => fail!(
            "raw CONNECT of device {}: {}",
            crate::display::dec(dev.id()),
            status_name(s)
        ),
    }
}

/// A connected device: its handle and its (assert, ack) counters then.
type Connected = (Dev, crate::wdm::PKINTERRUPT, (u32, u32));

/// Connections made through IoConnectInterrupt (a level and, when the
/// table has one, a latched device) and a stale host handle (a raw
/// CONNECT of the level device, disconnected, so its slot's next
/// generation is the live one) at the snapshot, 2 causes claimed on each.
/// After the resume: QUERY_PLATFORM's objects and connections and the
/// pins' routes unchanged; 3 more causes each, claimed exactly by the same
/// ISRs with their contexts on their processors; the stale handle
/// STATUS_INVALID_HANDLE, the live ones disconnect, and a second
/// IoDisconnectInterrupt of one is STATUS_INVALID_HANDLE.
fn pv_survive(env: &Env) -> TestResult {
    let level = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let latched = env.exclusive(KINTERRUPT_MODE::Latched).ok();
    let stale = raw_connect(env, &level)?;
    match pv::disconnect(stale) {
        STATUS_SUCCESS => {}
        s => fail!("DISCONNECT of a raw connection: {}", status_name(s)),
    }
    let mut devs: [Option<Connected>; 2] = [None, None];
    for (i, d) in [Some(level), latched].into_iter().enumerate() {
        let Some(d) = d else { continue };
        let a = Args::of(&d, 0, &CTX[i]);
        let want = env.effective(a.mask)?;
        let policy = if d.res(0).interrupt_mode() == KINTERRUPT_MODE::Latched {
            Policy::All
        } else {
            Policy::One
        };
        CTX[i].bind(Some(&d), policy, want);
        let h = connect_ok(&d, &a)?;
        let base = counters(&d);
        d.td.enable(true);
        d.td.raise(2);
        pvfix::wait_for("2 causes claimed before the snapshot", || {
            CTX[i].claimed() >= 2
        })?;
        devs[i] = Some((d, h, base));
    }
    pvfix::settle();
    let p0 = pvfix::platform()?;
    let routes0 = [
        route(level.line())?,
        route(latched.map_or(level.line(), |d| d.line()))?,
    ];
    take("snapshot_pv_connections_and_handles_survive", 0x600)?;
    let p1 = pvfix::platform()?;
    check!(
        p1.objects_in_use == p0.objects_in_use
            && p1.connections == p0.connections
            && p1.object_quota == p0.object_quota
            && p1.device_count == p0.device_count
            && p1.online_mask == p0.online_mask
            && p1.storm_masked_pins == p0.storm_masked_pins,
        "QUERY_PLATFORM after the snapshot: {} objects / {} connections / quota {}, was {} / {} / {}",
        crate::display::dec(p1.objects_in_use),
        crate::display::dec(p1.connections),
        crate::display::dec(p1.object_quota),
        crate::display::dec(p0.objects_in_use),
        crate::display::dec(p0.connections),
        crate::display::dec(p0.object_quota)
    );
    let routes1 = [
        route(level.line())?,
        route(latched.map_or(level.line(), |d| d.line()))?,
    ];
    for (r0, r1) in routes0.iter().zip(routes1.iter()) {
        check!(
            r0.masked == r1.masked
                && r0.trigger == r1.trigger
                && r0.vector == r1.vector
                && r0.destination_mask == r1.destination_mask
                && r0.connections == r1.connections,
            "route of pin {} changed by the snapshot: vector {} destination {} connections {} masked {}, was {} {} {} {}",
            crate::display::dec(r1.pin),
            crate::display::hex(r1.vector),
            crate::display::hex(r1.destination_mask),
            crate::display::dec(r1.connections),
            crate::display::dec(r1.masked),
            crate::display::hex(r0.vector),
            crate::display::hex(r0.destination_mask),
            crate::display::dec(r0.connections),
            crate::display::dec(r0.masked)
        );
    }
    for (i, slot) in devs.iter().enumerate() {
        let Some((d, _, _)) = slot else { continue };
        d.td.raise(3);
        pvfix::wait_for("3 causes claimed after the snapshot", || {
            CTX[i].claimed() >= 5
        })?;
    }
    pvfix::settle();
    for (i, slot) in devs.iter().enumerate() {
        let Some((d, _, base)) = slot else { continue };
        check_counts(d, *base, CTX[i].claimed(), 5)?;
        CTX[i].check_clean("across the snapshot")?;
        check!(
            CTX[i].last_context.load(Ordering::Acquire) == CTX[i].as_context() as usize,
            "ISR got ServiceContext {} after the snapshot, expected {}",
            crate::display::hex(CTX[i].last_context.load(Ordering::Acquire)),
            crate::display::hex(CTX[i].as_context() as usize)
        );
        d.td.enable(false);
    }
    let s = pv::disconnect(stale);
    check!(
        s == STATUS_INVALID_HANDLE,
        "DISCONNECT of the stale handle {} after the snapshot: {}, expected STATUS_INVALID_HANDLE",
        crate::display::hex(stale),
        status_name(s)
    );
    for (_, h, _) in devs.iter().flatten() {
        disconnect_ok(*h)?;
    }
    if let Some((_, h, _)) = devs[0] {
        let s = wdm::IoDisconnectInterrupt(h);
        check!(
            s == STATUS_INVALID_HANDLE,
            "second IoDisconnectInterrupt: {}, expected STATUS_INVALID_HANDLE",
            status_name(s)
        );
    }
    Ok(())
}

// ---- a masked message with its pending bit ----

fn message_device(env: &Env) -> Result<MsgDev, Failure> {
    env.message_device("MSI-X device", MsgDev::is_msix)
        .or_else(|_| env.message_device("MSI device", |m| m.count() >= 1))
}

/// A message-based connection whose last message is masked and raised 3
/// times (pending bit set, nothing sent) at the snapshot. After the
/// resume: pending bit still set, nothing sent or handled; the unmask
/// sends and delivers it exactly once; 2 more raises are delivered once
/// each.
fn message_pending(env: &Env) -> TestResult {
    let m = message_device(env)?;
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
    let before = (m.md.pending(), m.md.mask(), m.md.sent(k), ctx.total());
    take("snapshot_message_pending_bit_survives", 0x700)?;
    let after = (m.md.pending(), m.md.mask(), m.md.sent(k), ctx.total());
    check!(
        before.0 == 1 << k && before.2 == sent0[k as usize] && before.3 == 0,
        "before the snapshot: masked message {} raised 3 times: pending {}, sent {}, handled {}",
        crate::display::dec(k),
        crate::display::hex(before.0),
        crate::display::dec(before.2.wrapping_sub(sent0[k as usize])),
        crate::display::dec(before.3)
    );
    check!(
        after == before,
        "after the snapshot: pending {} mask {} sent {} handled {}, was {} {} {} {}",
        crate::display::hex(after.0),
        crate::display::hex(after.1),
        crate::display::dec(after.2),
        crate::display::dec(after.3),
        crate::display::hex(before.0),
        crate::display::hex(before.1),
        crate::display::dec(before.2),
        crate::display::dec(before.3)
    );
    msgfix::unmask_delivers_pending_once(&m, ctx, t, k, &sent0, &taken0)?;
    ctx.check_clean("across the snapshot")?;
    disconnect_messages(t)
}

// ---- under load ----

/// Causes per device: the host timer's (one per 100 us) and the guest's
/// bursts (2 each), half of the bursts before the snapshot.
const LOAD_TIMER_CAUSES: u32 = 60;
const LOAD_BURSTS: u32 = 20;
const LOAD_BURST: u32 = 2;

/// Every wired test device connected on every processor (as many as the
/// quota allows), raised by the host timers and by the guest in bursts;
/// the snapshot is taken in the middle, with timers running, causes
/// pending and interrupts in flight. Per device the assert count, the
/// ISR's claims and the device's ack count agree exactly, and no ISR ran
/// outside its mask.
fn under_load(env: &Env) -> TestResult {
    let (devs, n) = env.wired()?;
    let devs = &devs[..n];
    let ncpu = percpu::count().min(64);
    let free = env
        .platform
        .object_quota
        .saturating_sub(env.platform.objects_in_use) as usize;
    let width = (free / n.max(1)).clamp(1, ncpu);
    let online: KAFFINITY = env.online();
    let wide: KAFFINITY = cpus(online).take(width).fold(0, |m, c| m | (1u64 << c));
    let mut handles = [None; MAX_DEVICES];
    let mut masks: [KAFFINITY; MAX_DEVICES] = [0; MAX_DEVICES];
    let mut bases = [(0, 0); MAX_DEVICES];
    let mut before = [[0; percpu::MAX_CPUS]; MAX_DEVICES];
    // Devices on one vector must share a mask: every one gets `wide`.
    pvfix::flush_cpus();
    for (i, d) in devs.iter().enumerate() {
        let r = d.res(0);
        let mask = r.affinity & wide;
        if mask == 0 {
            continue;
        }
        let policy = if r.interrupt_mode() == KINTERRUPT_MODE::Latched {
            Policy::All
        } else {
            Policy::One
        };
        CTX[i].bind(Some(d), policy, mask);
        let mut a = Args::of(d, 0, &CTX[i]);
        a.mask = mask;
        if d.res_count() > 1 {
            a.lock = Some(&pvfix::LOCKS[0]);
            a.sync = d
                .obj
                .allocated_resources_translated()
                .iter()
                .map(|r| r.level)
                .max()
                .unwrap_or(a.sync);
        }
        handles[i] = Some(connect_ok(d, &a)?);
        masks[i] = mask;
        bases[i] = counters(d);
        before[i] = deliveries(d.vector());
    }
    for (i, d) in devs.iter().enumerate() {
        if handles[i].is_some() {
            d.td.enable(true);
            d.td.timer_start(LOAD_TIMER_CAUSES as u16, 100);
        }
    }
    let mut r = None;
    for b in 0..LOAD_BURSTS {
        if b == LOAD_BURSTS / 2 {
            r = Some(snapshot::take(0x800));
        }
        for (i, d) in devs.iter().enumerate() {
            if handles[i].is_some() {
                d.td.raise(LOAD_BURST);
            }
        }
        time::delay_us(50);
    }
    let per_device = LOAD_TIMER_CAUSES + LOAD_BURSTS * LOAD_BURST;
    let done = || {
        devs.iter().enumerate().all(|(i, d)| {
            handles[i].is_none() || (d.td.timer_remaining() == 0 && CTX[i].claimed() >= per_device)
        })
    };
    let finished = time::wait_until(3 * pvfix::TIMEOUT_US, done);
    pvfix::settle();
    for (i, d) in devs.iter().enumerate() {
        if handles[i].is_some() {
            d.td.enable(false);
        }
    }
    report(
        "snapshot_interrupts_under_load_none_lost",
        r.map_or(0, code),
    )?;
    let mut connected = 0;
    for (i, d) in devs.iter().enumerate() {
        let Some(h) = handles[i] else { continue };
        if !finished && CTX[i].claimed() < per_device {
            fail!(
                "device {}: {} raised, {} claimed, {} pending, {} timer raises to go after 3 s",
                crate::display::dec(d.id()),
                crate::display::dec(d.td.assert_count().wrapping_sub(bases[i].0)),
                crate::display::dec(CTX[i].claimed()),
                crate::display::dec(d.td.status()),
                crate::display::dec(d.td.timer_remaining())
            );
        }
        check_counts(d, bases[i], CTX[i].claimed(), per_device)?;
        CTX[i].check_clean("under load across the snapshot")?;
        none_outside(d.vector(), &before[i], masks[i])?;
        disconnect_ok(h)?;
        connected += 1;
    }
    check!(connected > 0, "no device connected");
    Ok(())
}
