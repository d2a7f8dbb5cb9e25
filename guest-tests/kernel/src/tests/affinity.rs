//! `affinity_`: ProcessorEnableMask: the host routes the pin to the
//! processors of the effective mask (the union over a shared vector's
//! connections), the guest puts objects only there, and an ISR never runs
//! anywhere else.

use super::fixture::need_cpus;
use super::pvfix::{
    self, Args, CTX, Ctx, Dev, Env, Policy, check_counts, connect_ok, counters, cpus, deliveries,
    disconnect_ok, none_outside, route, settle, wait_for,
};
use crate::runner::{Test, TestResult};
use crate::wdm::{self, KAFFINITY, KINTERRUPT_MODE};
use crate::{check, percpu};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("affinity_single_cpu_each_cpu", || {
        pvfix::run(single_cpu_each)
    }),
    Test::new("affinity_subset_never_outside_mask", || pvfix::run(subset)),
    Test::new("affinity_union_of_two_connections", || {
        pvfix::run(union_of_two)
    }),
];

/// Fails unless `dev`'s pin is routed, unmasked, to exactly `mask`, lowest
/// priority when `mask` has more than one processor.
fn check_route(dev: &Dev, mask: KAFFINITY) -> TestResult {
    let r = route(dev.line())?;
    let lowest = u8::from(mask.count_ones() > 1);
    check!(
        r.masked == 0
            && r.vector == dev.vector()
            && r.destination_mask == mask
            && r.lowest_priority == lowest,
        "route of pin {}: masked {} vector {} destination {} lowest-priority {}, expected {} to {} ({})",
        crate::display::dec(dev.line()),
        crate::display::dec(r.masked),
        crate::display::hex(r.vector),
        crate::display::hex(r.destination_mask),
        crate::display::dec(r.lowest_priority),
        crate::display::hex(dev.vector()),
        crate::display::hex(mask),
        crate::display::dec(lowest)
    );
    Ok(())
}

/// For each processor in turn: a connection with only that processor
/// gets every delivery there and nowhere else.
fn single_cpu_each(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let v = dev.vector();
    const PER_CPU: u32 = 3;
    for c in cpus(env.online()) {
        let mask = 1u64 << c;
        let ctx = CTX[0].bind(Some(&dev), Policy::One, mask);
        let mut a = Args::of(&dev, 0, &CTX[0]);
        a.mask = mask;
        let h = connect_ok(&dev, &a)?;
        check!(
            h.effective_mask() == mask,
            "cpu {}: effective mask {}",
            crate::display::dec(c),
            crate::display::hex(h.effective_mask())
        );
        check_route(&dev, mask)?;
        pvfix::flush_cpus();
        let before = deliveries(v);
        let base = counters(&dev);
        dev.td.enable(true);
        for n in 1..=PER_CPU {
            dev.td.raise(1);
            wait_for("the ISR on the chosen cpu", || ctx.claimed() >= n)?;
        }
        settle();
        dev.td.enable(false);
        check_counts(&dev, base, ctx.claimed(), PER_CPU)?;
        none_outside(v, &before, mask)?;
        let claimed_calls = Ctx::get(&ctx.claimed_calls);
        let on_c = Ctx::get(&ctx.per_cpu[c]);
        check!(
            on_c == claimed_calls,
            "cpu {}: {} of {} claiming calls ran elsewhere",
            crate::display::dec(c),
            crate::display::dec(claimed_calls - on_c),
            crate::display::dec(claimed_calls)
        );
        ctx.check_clean("of the single-cpu connection")?;
        disconnect_ok(h)?;
    }
    Ok(())
}

/// A level and an edge device, both on a subset of the processors, under
/// a stream of causes: every delivery and every ISR call inside the subset.
fn subset(env: &Env) -> TestResult {
    need_cpus(2)?;
    let mask: KAFFINITY = if percpu::count() >= 3 { 0b110 } else { 0b10 };
    let level = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let edge = env.exclusive(KINTERRUPT_MODE::Latched)?;
    let il = CTX[0].bind(Some(&level), Policy::One, mask);
    let ie = CTX[1].bind(Some(&edge), Policy::All, mask);
    let mut al = Args::of(&level, 0, &CTX[0]);
    let mut ae = Args::of(&edge, 0, &CTX[1]);
    al.mask = mask;
    ae.mask = mask;
    let hl = connect_ok(&level, &al)?;
    let he = connect_ok(&edge, &ae)?;
    check_route(&level, mask)?;
    check_route(&edge, mask)?;
    pvfix::flush_cpus();
    let (bl, be) = (deliveries(level.vector()), deliveries(edge.vector()));
    let (cl, ce) = (counters(&level), counters(&edge));
    level.td.enable(true);
    edge.td.enable(true);
    const N: u32 = 20;
    for n in 1..=N {
        level.td.raise(1);
        edge.td.raise(1);
        wait_for("both ISRs to claim", || {
            il.claimed() >= n && ie.claimed() >= n
        })?;
    }
    settle();
    level.td.enable(false);
    edge.td.enable(false);
    check_counts(&level, cl, il.claimed(), N)?;
    check_counts(&edge, ce, ie.claimed(), N)?;
    none_outside(level.vector(), &bl, mask)?;
    none_outside(edge.vector(), &be, mask)?;
    il.check_clean("of the level device")?;
    ie.check_clean("of the edge device")?;
    disconnect_ok(hl)?;
    disconnect_ok(he)
}

/// Two connections on one (two-pin, latched) vector with disjoint masks:
/// both pins are routed to the union; each ISR runs only on its own
/// processor; deliveries stay in the union; after each disconnect the
/// route shrinks to what is left. The two processors are the last two of
/// 0..7, which one logical destination names in every APIC model (rule R
/// refuses a second connection no destination reaches with the first:
/// `scale_affinity_union_of_sharers_across_clusters`).
fn union_of_two(env: &Env) -> TestResult {
    need_cpus(2)?;
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::Latched, false)?;
    let n = percpu::count().min(crate::lapic::FLAT_PROCESSORS);
    let (ma, mb): (KAFFINITY, KAFFINITY) = (1 << (n - 2), 1 << (n - 1));
    let ia = CTX[0].bind(Some(&a), Policy::All, ma);
    let ib = CTX[1].bind(Some(&b), Policy::All, mb);
    let mut args_a = Args::of(&a, 0, &CTX[0]);
    let mut args_b = Args::of(&b, 0, &CTX[1]);
    args_a.mask = ma;
    args_b.mask = mb;
    let ha = connect_ok(&a, &args_a)?;
    check_route(&a, ma)?;
    let hb = connect_ok(&b, &args_b)?;
    check_route(&a, ma | mb)?;
    check_route(&b, ma | mb)?;
    let v = a.vector();
    pvfix::flush_cpus();
    let before = deliveries(v);
    let (ca, cb) = (counters(&a), counters(&b));
    a.td.enable(true);
    b.td.enable(true);
    const N: u32 = 6;
    let total = |d: &[u32; percpu::MAX_CPUS]| -> u32 { d.iter().sum() };
    let start = total(&before);
    for i in 1..=N {
        a.td.raise(1);
        wait_for("a delivery of A's edge", || {
            total(&deliveries(v)) >= start + 2 * i - 1
        })?;
        b.td.raise(1);
        wait_for("a delivery of B's edge", || {
            total(&deliveries(v)) >= start + 2 * i
        })?;
    }
    settle();
    a.td.enable(false);
    b.td.enable(false);
    none_outside(v, &before, ma | mb)?;
    ia.check_clean("A")?;
    ib.check_clean("B")?;
    // An edge that reached the other processor found only the other ISR
    // there; its cause is still pending. Nothing is lost: claimed + pending
    // = raised.
    let (pa, pb) = (a.td.drain(N), b.td.drain(N));
    check_counts(&a, ca, ia.claimed() + pa, N)?;
    check_counts(&b, cb, ib.claimed() + pb, N)?;
    let unclaimed: u32 = (0..n).map(|c| wdm::unclaimed(c, v)).sum();
    check!(
        unclaimed >= u32::from(pa > 0) + u32::from(pb > 0),
        "causes left pending ({} and {}) but no unclaimed delivery counted",
        crate::display::dec(pa),
        crate::display::dec(pb)
    );
    disconnect_ok(ha)?;
    check_route(&a, mb)?;
    check_route(&b, mb)?;
    disconnect_ok(hb)?;
    let (ra, rb) = (route(a.line())?, route(b.line())?);
    check!(
        ra.masked == 1 && rb.masked == 1,
        "pins still unmasked with no connection on the vector"
    );
    Ok(())
}
