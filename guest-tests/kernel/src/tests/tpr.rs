//! `tpr_` and `spinlock_`: CR8/TPR hold lower priority classes until
//! lowered; IRQL helpers; spin locks across CPUs.

use core::sync::atomic::{AtomicU32, Ordering};

use super::fixture::{PIN_A, apic_id, count, need_cpus, settle, wait_count};
use crate::ioapic::{self, Rte};
use crate::irql::{self, DISPATCH_LEVEL};
use crate::lapic::{self, Delivery, Dest};
use crate::runner::{Test, TestResult};
use crate::spinlock::SpinLock;
use crate::{check, lines, percpu, smp};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("tpr_cr8_mirrors_lapic_tpr", cr8_mirrors_tpr),
    Test::new("tpr_defers_ipi_until_lowered", defers_ipi),
    Test::new("tpr_higher_class_not_blocked", higher_class_passes),
    Test::new("tpr_defers_ioapic_interrupt_until_lowered", defers_ioapic),
    Test::new("tpr_on_ap_defers_ipi_until_lowered", ap_defers_ipi),
    Test::new("tpr_irql_raise_lower_and_lock_at", irql_helpers),
    Test::new("spinlock_serialises_all_cpus", spinlock_all_cpus),
];

fn cr8_mirrors_tpr() -> TestResult {
    for level in [3u8, 0xc, 0xf, 0] {
        irql::set(level);
        let tpr = lapic::read(lapic::REG_TPR);
        check!(
            tpr >> 4 == u32::from(level),
            "CR8 {} but TPR {}",
            crate::display::hex(level),
            crate::display::hex(tpr)
        );
    }
    lapic::write(lapic::REG_TPR, 0x50);
    let cr8 = irql::current();
    lapic::write(lapic::REG_TPR, 0);
    check!(cr8 == 5, "TPR 0x50 but CR8 {}", crate::display::hex(cr8));
    Ok(())
}

fn defers_ipi() -> TestResult {
    const V: u8 = 0xcb;
    irql::set(0xc);
    lapic::send_ipi(V, Delivery::Fixed, Dest::SelfOnly);
    settle();
    let (taken, pending, ppr) = (
        count(0, V),
        lapic::requested(V),
        lapic::read(lapic::REG_PPR),
    );
    irql::set(0);
    check!(
        taken == 0,
        "vector {V} taken at CR8 0xc",
        V = crate::display::hex(V)
    );
    check!(
        pending,
        "vector {V} not pending in IRR at CR8 0xc",
        V = crate::display::hex(V)
    );
    check!(
        ppr >= 0xc0,
        "PPR {} below the TPR class 0xc",
        crate::display::hex(ppr)
    );
    wait_count(0, V, 1)?;
    settle();
    check!(
        count(0, V) == 1,
        "vector {V} taken {} times",
        crate::display::dec(count(0, V)),
        V = crate::display::hex(V)
    );
    Ok(())
}

fn higher_class_passes() -> TestResult {
    const V: u8 = 0xdb;
    irql::set(0xc);
    lapic::send_ipi(V, Delivery::Fixed, Dest::SelfOnly);
    let r = wait_count(0, V, 1);
    irql::set(0);
    r?;
    settle();
    check!(
        count(0, V) == 1,
        "vector {V} taken {} times",
        crate::display::dec(count(0, V)),
        V = crate::display::hex(V)
    );
    Ok(())
}

fn defers_ioapic() -> TestResult {
    const V: u8 = 0x3b;
    irql::set(3);
    ioapic::write_rte(PIN_A, Rte::new(V, apic_id(0) as u8).0);
    lines::pulse(PIN_A);
    settle();
    let taken = count(0, V);
    irql::set(0);
    check!(
        taken == 0,
        "IOAPIC vector {V} taken at CR8 3",
        V = crate::display::hex(V)
    );
    wait_count(0, V, 1)?;
    settle();
    check!(
        count(0, V) == 1,
        "vector {V} taken {} times",
        crate::display::dec(count(0, V)),
        V = crate::display::hex(V)
    );
    Ok(())
}

fn set_cr8(level: usize) -> usize {
    irql::set(level as u8);
    0
}

fn ap_defers_ipi() -> TestResult {
    const V: u8 = 0xcc;
    need_cpus(2)?;
    smp::run_on(1, set_cr8, 0xd)?;
    lapic::send_ipi(V, Delivery::Fixed, Dest::Physical(apic_id(1)));
    settle();
    let taken = count(1, V);
    let pending = smp::run_on(1, |_| usize::from(lapic::requested(0xcc)), 0);
    smp::run_on(1, set_cr8, 0)?;
    check!(
        taken == 0,
        "cpu 1 took vector {V} at CR8 0xd",
        V = crate::display::hex(V)
    );
    check!(
        pending? == 1,
        "vector {V} not pending in cpu 1's IRR",
        V = crate::display::hex(V)
    );
    wait_count(1, V, 1)?;
    settle();
    check!(
        count(1, V) == 1,
        "cpu 1 took vector {V} {} times",
        crate::display::dec(count(1, V)),
        V = crate::display::hex(V)
    );
    Ok(())
}

fn irql_helpers() -> TestResult {
    check!(
        irql::current() == 0,
        "IRQL {} at test start",
        crate::display::dec(irql::current())
    );
    let a = irql::raise(DISPATCH_LEVEL);
    let b = irql::raise(irql::CLOCK_LEVEL);
    let at_clock = irql::current();
    irql::lower(b);
    let at_dispatch = irql::current();
    irql::lower(a);
    check!(
        a == 0 && b == DISPATCH_LEVEL,
        "raise returned {}, {}",
        crate::display::dec(a),
        crate::display::dec(b)
    );
    check!(
        at_clock == irql::CLOCK_LEVEL && at_dispatch == DISPATCH_LEVEL,
        "IRQL {}, {}",
        crate::display::dec(at_clock),
        crate::display::dec(at_dispatch)
    );
    static LOCK: SpinLock<u32> = SpinLock::new(0);
    {
        let mut g = LOCK.lock_at(DISPATCH_LEVEL);
        *g += 1;
        check!(
            irql::current() == DISPATCH_LEVEL,
            "IRQL {} under lock_at",
            crate::display::dec(irql::current())
        );
    }
    check!(
        irql::current() == 0 && !LOCK.is_locked(),
        "IRQL {} after release",
        crate::display::dec(irql::current())
    );
    Ok(())
}

static SHARED: SpinLock<(u32, u32)> = SpinLock::new((0, 0));
static STARTED: AtomicU32 = AtomicU32::new(0);
const ROUNDS: u32 = 200;

fn hammer(_: usize) -> usize {
    STARTED.fetch_add(1, Ordering::AcqRel);
    for _ in 0..ROUNDS {
        let mut g = SHARED.lock_at(DISPATCH_LEVEL);
        // A non-atomic read-modify-write: only the lock keeps it exact.
        let v = g.0;
        core::hint::spin_loop();
        g.0 = v + 1;
        g.1 = g.1.wrapping_add(v);
    }
    0
}

fn spinlock_all_cpus() -> TestResult {
    *SHARED.lock() = (0, 0);
    STARTED.store(0, Ordering::Relaxed);
    let n = percpu::count();
    for c in 1..n {
        smp::post(c, hammer, 0)?;
    }
    hammer(0);
    // Mutual exclusion is the property, not speed. With more vCPUs than
    // host cores, a lock holder the host preempts stalls every other CPU
    // until it runs again, so the time all of them take grows with their
    // number: the budget does too (5.8 s for 4 CPUs, 56 s for 255).
    let budget_us = 5_000_000 + 200_000 * n as u64;
    for c in 1..n {
        smp::wait(c, budget_us)?;
    }
    let total = SHARED.lock().0;
    check!(
        total == ROUNDS * n as u32,
        "counter {}, expected {}",
        crate::display::dec(total),
        crate::display::dec(ROUNDS * n as u32)
    );
    Ok(())
}
