//! `scale_`: affinity on large platforms (`docs/semantics.md`,
//! "Destinations", rule R, rule X3). Every processor of every group can be
//! connected alone; a mask one logical destination names is kept whole and
//! delivered inside; a mask no destination names is narrowed to the largest
//! set one does (the tie rule decides between equals), the effective mask
//! says exactly that set and QUERY_ROUTE agrees; sharers of a vector keep
//! one destination; group 1 reaches processor 64; a group or mask outside
//! the platform is refused. Effective masks are predicted by [`Topo`],
//! from the guest's own APIC mode and the destination width.

use core::sync::atomic::Ordering;

use irqconnect_abi::ntstatus::{
    STATUS_INVALID_PARAMETER, STATUS_INVALID_PARAMETER_10, STATUS_SUCCESS,
};
use irqconnect_abi::pv::route_destination;

use super::fixture::need_cpus;
use super::pvfix::{
    self, Args, CTX, Ctx, Dev, Env, Policy, check_counts, counters, deliveries, settle, wait_for,
};
use super::topo::{GROUP_SIZE, Topo};
use crate::runner::{Test, TestResult};
use crate::wdm::{self, IoConnectInterruptEx, KAFFINITY, KINTERRUPT_MODE, PKINTERRUPT};
use crate::{check, cpu, fail, percpu, skip};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("scale_affinity_each_cpu_alone", || {
        pvfix::run(each_cpu_alone)
    }),
    Test::new("scale_affinity_cluster_mask_stays_inside", || {
        pvfix::run(cluster_mask)
    }),
    Test::new("scale_affinity_cross_cluster_mask_effective_subset", || {
        pvfix::run(cross_cluster)
    }),
    Test::new("scale_affinity_query_route_matches_effective_mask", || {
        pvfix::run(query_route_matches)
    }),
    Test::new("scale_affinity_union_of_sharers_across_clusters", || {
        pvfix::run(sharers_across_clusters)
    }),
    Test::new("scale_group_one_connect_reaches_cpu_64", || {
        pvfix::run(group_one)
    }),
    Test::new("scale_group_mask_outside_group_rejected", || {
        pvfix::run(group_outside)
    }),
    Test::new("scale_no_interrupt_lost_under_load", || {
        pvfix::run(under_load)
    }),
];

/// IoConnectInterruptEx FULLY_SPECIFIED_GROUP of `a` for `dev` in `group`:
/// the status and the interrupt object; the context learns its connection.
pub fn connect_group(dev: &Dev, a: &Args, group: u16) -> (u32, Option<PKINTERRUPT>) {
    let mut p = pvfix::fs_params(dev, a, wdm::CONNECT_FULLY_SPECIFIED_GROUP);
    p.FullySpecified.Group = group;
    let status = IoConnectInterruptEx(&mut p);
    if let (Some(h), Some(ctx)) = (p.FullySpecified.InterruptObject, pvfix::ctx_of(a.context)) {
        ctx.expect_object.store(h.to_bits(), Ordering::Release);
    }
    (status, p.FullySpecified.InterruptObject)
}

/// [`connect_group`], expecting success.
pub fn connect_group_ok(
    dev: &Dev,
    a: &Args,
    group: u16,
) -> Result<PKINTERRUPT, crate::runner::Failure> {
    match connect_group(dev, a, group) {
        (STATUS_SUCCESS, Some(h)) => Ok(h),
        (s, _) => fail!(
            "IoConnectInterruptEx (group {}) of device {} mask {}: {}",
            crate::display::dec(group),
            crate::display::dec(dev.id()),
            crate::display::hex(a.mask),
            irqconnect_abi::ntstatus::status_name(s)
        ),
    }
}

/// Fails unless `dev`'s pin is routed, unmasked, to exactly `mask` of
/// `group` (QUERY_ROUTE version 2, and version 1 for group 0), logical
/// and lowest priority for more than one processor.
pub fn check_route(dev: &Dev, group: u16, mask: KAFFINITY) -> TestResult {
    let r = pvfix::route_v2(dev.line())?;
    let v1 = pvfix::route(dev.line())?;
    let several = mask.count_ones() > 1;
    check!(
        r.base.masked == 0
            && r.base.vector == dev.vector()
            && r.group == group
            && r.base.destination_mask == mask
            && r.base.lowest_priority == u8::from(several)
            && (!several || r.destination_mode == route_destination::LOGICAL)
            && r.destination_mode != route_destination::NONE
            && v1.destination_mask == if group == 0 { mask } else { 0 },
        "route of pin {}: masked {} group {} destination {} (version 1: {}) lowest-priority {} mode {} id {}; expected group {} destination {}",
        crate::display::dec(dev.line()),
        crate::display::dec(r.base.masked),
        crate::display::dec(r.group),
        crate::display::hex(r.base.destination_mask),
        crate::display::hex(v1.destination_mask),
        crate::display::dec(r.base.lowest_priority),
        crate::display::dec(r.destination_mode),
        crate::display::hex(r.apic_destination),
        crate::display::dec(group),
        crate::display::hex(mask)
    );
    Ok(())
}

/// The processors of `mask` in `group`, as indices.
pub fn cpus_of(group: u16, mask: KAFFINITY) -> impl Iterator<Item = usize> {
    let base = usize::from(group) * GROUP_SIZE;
    (0..GROUP_SIZE)
        .filter(move |&b| mask & (1u64 << b) != 0)
        .map(move |b| base + b)
}

/// Fails when a processor outside `mask` of `group` took `vector` since
/// `before`; returns the deliveries per processor since.
pub fn inside(
    vector: u8,
    before: &[u32; percpu::MAX_CPUS],
    group: u16,
    mask: KAFFINITY,
) -> Result<[u32; percpu::MAX_CPUS], crate::runner::Failure> {
    let now = deliveries(vector);
    let mut since = [0u32; percpu::MAX_CPUS];
    for c in 0..percpu::count() {
        since[c] = now[c].wrapping_sub(before[c]);
        let in_mask =
            c / GROUP_SIZE == usize::from(group) && mask & (1u64 << (c % GROUP_SIZE)) != 0;
        check!(
            in_mask || since[c] == 0,
            "cpu {} outside group {} mask {} took {} interrupts on vector {}",
            crate::display::dec(c),
            crate::display::dec(group),
            crate::display::hex(mask),
            crate::display::dec(since[c]),
            crate::display::hex(vector)
        );
    }
    Ok(since)
}

/// Raises `n` causes one at a time, each claimed before the next.
pub fn raise_claimed(dev: &Dev, ctx: &Ctx, n: u32) -> TestResult {
    raise_claimed_apart(dev, ctx, n, 0)
}

/// [`raise_claimed`], `gap_us` apart (so the processor that took one is
/// idle again when the next is raised).
pub fn raise_claimed_apart(dev: &Dev, ctx: &Ctx, n: u32, gap_us: u64) -> TestResult {
    let start = ctx.claimed();
    for i in 1..=n {
        dev.td.raise(1);
        wait_for("the ISR to claim a cause", || ctx.claimed() >= start + i)?;
        crate::time::delay_us(gap_us);
    }
    Ok(())
}

/// Connects `dev` (exclusive, latched) on `mask` of `group`, checks the
/// effective mask against `want` and the route, raises `n` causes and
/// checks that every one was claimed and delivered inside `want`; returns
/// the deliveries per processor and disconnects.
fn connect_raise_check(
    dev: &Dev,
    group: u16,
    mask: KAFFINITY,
    want: KAFFINITY,
    n: u32,
) -> Result<[u32; percpu::MAX_CPUS], crate::runner::Failure> {
    connect_raise_check_apart(dev, group, mask, want, n, 0)
}

/// [`connect_raise_check`] with the causes `gap_us` apart.
fn connect_raise_check_apart(
    dev: &Dev,
    group: u16,
    mask: KAFFINITY,
    want: KAFFINITY,
    n: u32,
    gap_us: u64,
) -> Result<[u32; percpu::MAX_CPUS], crate::runner::Failure> {
    let ctx = CTX[0].bind_in_group(Some(dev), Policy::All, group, want);
    let mut a = Args::of(dev, 0, &CTX[0]);
    a.mask = mask;
    let h = connect_group_ok(dev, &a, group)?;
    let got = h.affinity();
    check!(
        got.Group == group && got.Mask == want,
        "group {} mask {}: effective group {} mask {}, expected {}",
        crate::display::dec(group),
        crate::display::hex(mask),
        crate::display::dec(got.Group),
        crate::display::hex(got.Mask),
        crate::display::hex(want)
    );
    check_route(dev, group, want)?;
    let before = deliveries(dev.vector());
    let base = counters(dev);
    dev.td.enable(true);
    let raised = raise_claimed_apart(dev, ctx, n, gap_us);
    settle();
    dev.td.enable(false);
    raised?;
    check_counts(dev, base, ctx.claimed(), n)?;
    // A delivery is counted after its dispatch returned: let the
    // processors that may take it get back to idle before the count (a
    // stray delivery elsewhere still pending shows in a later count: a
    // caller that loops flushes every processor at its end).
    pvfix::flush_in(group, want);
    let since = inside(dev.vector(), &before, group, want)?;
    ctx.check_clean("of the connection")?;
    pvfix::disconnect_ex_ok(wdm::CONNECT_FULLY_SPECIFIED_GROUP, h)?;
    Ok(since)
}

/// Every online processor of every group, alone: effective mask and route
/// name it, its one interrupt arrives there.
fn each_cpu_alone(env: &Env) -> TestResult {
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    pvfix::flush_cpus();
    let start = deliveries(dev.vector());
    for c in 0..percpu::count() {
        let (group, bit) = ((c / GROUP_SIZE) as u16, 1u64 << (c % GROUP_SIZE));
        let since = connect_raise_check(&dev, group, bit, bit, 1)?;
        check!(
            since[c] == 1,
            "cpu {}: {} deliveries of its one interrupt",
            crate::display::dec(c),
            crate::display::dec(since[c])
        );
    }
    // Every processor idle: each took exactly its own one.
    pvfix::flush_cpus();
    let end = deliveries(dev.vector());
    for c in 0..percpu::count() {
        let n = end[c].wrapping_sub(start[c]);
        check!(
            n == 1,
            "cpu {}: {} deliveries over the test, expected its own one",
            crate::display::dec(c),
            crate::display::dec(n)
        );
    }
    Ok(())
}

/// The processors of processor 1's logical domain but the BSP (which runs
/// the test and would win every lowest-priority tie in user mode): one
/// destination names them all, so the effective mask is the mask; two
/// interrupts per processor land only inside; in user mode (our local
/// APICs rotate lowest priority among idle processors, a running one
/// winning over a halted one) every one of them takes some when each
/// interrupt comes after the last one's processor went idle (1 ms
/// apart). The extended destination ID is offered in CPUID exactly
/// when the platform says routes carry 15 bits.
fn cluster_mask(env: &Env) -> TestResult {
    need_cpus(3)?;
    let t = Topo::get()?;
    let leaf = cpu::cpuid(0x4000_0001, 0).0;
    let offered = cpu::cpuid(0x4000_0000, 0).0 >= 0x4000_0001 && leaf & (1 << 15) != 0;
    check!(
        offered == (t.width == 15),
        "CPUID KVM_FEATURE_MSI_EXT_DEST_ID {}, the platform's routes carry {} destination bits",
        crate::display::dec(u8::from(offered)),
        crate::display::dec(t.width)
    );
    let mask = t.domain_of(1) & !1;
    check!(
        mask.count_ones() >= 2,
        "processor 1's logical domain {} holds one processor besides the BSP",
        crate::display::hex(t.domain_of(1))
    );
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    pvfix::flush_cpus();
    let gap = if t.user_mode() { 1_000 } else { 0 };
    let since = connect_raise_check_apart(&dev, 0, mask, mask, 2 * mask.count_ones(), gap)?;
    if t.user_mode() {
        for c in cpus_of(0, mask) {
            check!(
                since[c] > 0,
                "user mode: idle cpu {} of {} took none of {} interrupts (lowest priority rotates among equals)",
                crate::display::dec(c),
                crate::display::hex(mask),
                crate::display::dec(2 * mask.count_ones())
            );
        }
    }
    Ok(())
}

/// The topology and a processor of group 0 outside processor 1's logical
/// domain, or a skip (4 processors at least; with at most 8 every
/// processor is in one domain).
fn two_domains() -> Result<(Topo, usize), crate::runner::Failure> {
    need_cpus(4)?;
    let t = Topo::get()?;
    let Some(o) = t.outside_of_1() else {
        skip!(
            "every processor of group 0 is in processor 1's logical domain ({} processors)",
            crate::display::dec(t.n)
        );
    };
    Ok((t, o))
}

/// Masks over two logical domains: the effective mask is the larger part
/// (or, between equal parts, the one with the lowest processor), exactly
/// as [`Topo::expected`] reads the documented rule; interrupts land only
/// there.
fn cross_cluster(env: &Env) -> TestResult {
    let (t, o) = two_domains()?;
    let d = t.domain_of(1);
    let outside_domain = t.domain_of(o);
    // The largest part outside, up to three processors from `o` up.
    let out: KAFFINITY = (o..t.n.min(GROUP_SIZE))
        .filter(|&p| {
            d & (1u64 << p) == 0 && (outside_domain == 0 || outside_domain & (1u64 << p) != 0)
        })
        .take(3)
        .fold(0, |m, p| m | (1u64 << p));
    let inner = d & !1;
    // Two processors of processor 1's domain.
    let two = (1u64 << (63 - inner.leading_zeros())) | (1u64 << inner.trailing_zeros());
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    pvfix::flush_cpus();
    let mut cases = 0;
    let lowest_two = |m: u64| {
        let first = m & m.wrapping_neg();
        let rest = m & !first;
        first | (rest & rest.wrapping_neg())
    };
    // The larger part wins; then ties: two processors no logical
    // destination names (the lowest, physically), or two of each of two
    // clusters (the cluster of the lowest processor).
    let tie = if outside_domain == 0 {
        lowest_two(out)
    } else {
        two | lowest_two(out)
    };
    for mask in [two | out, two | (out & out.wrapping_neg()), tie] {
        if mask == 0 || mask.count_ones() < 2 {
            continue;
        }
        let want = t.expected(0, mask);
        check!(
            want != 0 && want & !mask == 0 && want != mask,
            "mask {}: the rule's subset {} is not a proper subset",
            crate::display::hex(mask),
            crate::display::hex(want)
        );
        connect_raise_check(&dev, 0, mask, want, 2)?;
        cases += 1;
    }
    check!(cases > 0, "no mask spans two domains here");
    Ok(())
}

/// Several masks (single, pairs, the lowest and highest processor, a whole
/// group, every group): the effective mask is the rule's, QUERY_ROUTE
/// (versions 1 and 2) reports the same set, an interrupt lands inside.
fn query_route_matches(env: &Env) -> TestResult {
    let t = Topo::get()?;
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    let n = t.n;
    let last = n - 1;
    let mut masks: [(u16, KAFFINITY); 8] = [(0, 0); 8];
    let g0 = t.groups.group_online[0];
    masks[0] = (0, 1);
    masks[1] = (0, g0);
    masks[2] = (0, 1 | (1u64 << (last.min(GROUP_SIZE - 1))));
    masks[3] = (0, g0 & 0b110);
    for g in 1..t.groups.group_count.min(4) {
        masks[3 + usize::from(g)] = (g, t.groups.group_online[usize::from(g)]);
    }
    pvfix::flush_cpus();
    for &(group, mask) in masks.iter().filter(|(_, m)| *m != 0) {
        let want = t.expected(group, mask);
        connect_raise_check(&dev, group, mask, want, 1)?;
    }
    Ok(())
}

/// Two sharers of one vector (two pins): A on two processors of processor
/// 1's domain; B asking for a processor outside that domain alone is
/// refused (no destination reaches both, rule R); B asking for one more
/// processor of the domain and the outside one gets the domain's part:
/// the route is the union, one destination; deliveries stay inside it and
/// each ISR runs only on its own processors.
fn sharers_across_clusters(env: &Env) -> TestResult {
    let (t, o) = two_domains()?;
    let d = t.domain_of(1);
    let inner = d & !0b11;
    check!(
        inner != 0,
        "processor 1's domain {} has no third processor",
        crate::display::hex(d)
    );
    let third = inner & inner.wrapping_neg();
    let (ma, mb) = (0b110 & d, third | (1u64 << o));
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::Latched, false)?;
    let ia = CTX[0].bind(Some(&a), Policy::All, ma);
    let ib = CTX[1].bind(Some(&b), Policy::All, third);
    let mut args_a = Args::of(&a, 0, &CTX[0]);
    let mut args_b = Args::of(&b, 0, &CTX[1]);
    args_a.mask = ma;
    let ha = pvfix::connect_ok(&a, &args_a)?;
    check_route(&a, 0, ma)?;
    args_b.mask = 1u64 << o;
    pvfix::connect_refused(
        &b,
        &args_b,
        STATUS_INVALID_PARAMETER,
        "a sharer outside the route's domain",
    )?;
    check_route(&a, 0, ma)?;
    args_b.mask = mb;
    let hb = pvfix::connect_ok(&b, &args_b)?;
    check!(
        hb.effective_mask() == third,
        "sharer B asked {}: effective {}, expected {}",
        crate::display::hex(mb),
        crate::display::hex(hb.effective_mask()),
        crate::display::hex(third)
    );
    let union = ma | third;
    check_route(&a, 0, union)?;
    check_route(&b, 0, union)?;
    pvfix::flush_cpus();
    let before = deliveries(a.vector());
    let (ca, cb) = (counters(&a), counters(&b));
    a.td.enable(true);
    b.td.enable(true);
    const N: u32 = 4;
    let total = |d: &[u32; percpu::MAX_CPUS]| -> u32 { d.iter().sum() };
    let start = total(&before);
    for i in 1..=N {
        a.td.raise(1);
        wait_for("a delivery of A's edge", || {
            total(&deliveries(a.vector())) >= start + 2 * i - 1
        })?;
        b.td.raise(1);
        wait_for("a delivery of B's edge", || {
            total(&deliveries(a.vector())) >= start + 2 * i
        })?;
    }
    settle();
    a.td.enable(false);
    b.td.enable(false);
    inside(a.vector(), &before, 0, union)?;
    ia.check_clean("A")?;
    ib.check_clean("B")?;
    // An edge that reached the other sharer's processor found only its ISR;
    // its cause is still pending: claimed + pending = raised.
    let (pa, pb) = (a.td.drain(N), b.td.drain(N));
    check_counts(&a, ca, ia.claimed() + pa, N)?;
    check_counts(&b, cb, ib.claimed() + pb, N)?;
    pvfix::disconnect_ok(ha)?;
    check_route(&b, 0, third)?;
    pvfix::disconnect_ok(hb)
}

/// Group 1 (needs 65 processors): QUERY_PLATFORM's groups agree with the
/// guest's; a connect of bit 0 of group 1 reaches processor 64 and only it;
/// two processors of group 1 get the rule's subset.
fn group_one(env: &Env) -> TestResult {
    need_cpus(65)?;
    let t = Topo::get()?;
    check!(
        t.groups.group_count == wdm::KeQueryActiveGroupCount(),
        "the host has {} groups, the guest {}",
        crate::display::dec(t.groups.group_count),
        crate::display::dec(wdm::KeQueryActiveGroupCount())
    );
    for g in 0..t.groups.group_count {
        let size = t.groups.group_sizes[usize::from(g)];
        check!(
            size == wdm::KeQueryActiveProcessorCountEx(g)
                && t.groups.group_online[usize::from(g)].count_ones() == size,
            "group {}: the host has {} processors, {} online; the guest {}",
            crate::display::dec(g),
            crate::display::dec(size),
            crate::display::dec(t.groups.group_online[usize::from(g)].count_ones()),
            crate::display::dec(wdm::KeQueryActiveProcessorCountEx(g))
        );
    }
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    pvfix::flush_cpus();
    let since = connect_raise_check(&dev, 1, 1, 1, 3)?;
    let (calls, on_64) = (
        Ctx::get(&CTX[0].claimed_calls),
        Ctx::get(&CTX[0].per_cpu[64]),
    );
    check!(
        since[64] >= 1 && on_64 == calls && calls >= 1,
        "cpu 64 took {} deliveries of the 3 causes, {} of the ISR's {} claiming calls ran there",
        crate::display::dec(since[64]),
        crate::display::dec(on_64),
        crate::display::dec(calls)
    );
    let pair = t.groups.group_online[1] & 0b11;
    connect_raise_check(&dev, 1, pair, t.expected(1, pair), 2)?;
    Ok(())
}

/// A group the platform lacks: STATUS_INVALID_PARAMETER (rule X3); a mask
/// naming only processors a group lacks: STATUS_INVALID_PARAMETER_10
/// (rule 2); nothing connected either way.
fn group_outside(env: &Env) -> TestResult {
    let t = Topo::get()?;
    let dev = env.exclusive(KINTERRUPT_MODE::Latched)?;
    let a = Args::of(&dev, 0, &CTX[0]);
    let objects = env.platform.objects_in_use;
    for group in [t.groups.group_count, u16::MAX] {
        let (status, h) = connect_group(&dev, &a, group);
        check!(
            status == STATUS_INVALID_PARAMETER && h.is_none(),
            "group {} of {}: {}",
            crate::display::dec(group),
            crate::display::dec(t.groups.group_count),
            irqconnect_abi::ntstatus::status_name(status)
        );
    }
    let last = t.groups.group_count - 1;
    let size = t.groups.group_sizes[usize::from(last)];
    if size < GROUP_SIZE as u32 {
        let mut beyond = a;
        beyond.mask = !((1u64 << size) - 1);
        let (status, h) = connect_group(&dev, &beyond, last);
        check!(
            status == STATUS_INVALID_PARAMETER_10 && h.is_none(),
            "group {} mask {} (the group has {} processors): {}",
            crate::display::dec(last),
            crate::display::hex(beyond.mask),
            crate::display::dec(size),
            irqconnect_abi::ntstatus::status_name(status)
        );
    }
    check!(
        pvfix::platform()?.objects_in_use == objects,
        "a refused connect left objects behind"
    );
    Ok(())
}

/// Every exclusive device connected on every online processor of group 0
/// (narrowed by the host to one destination), one in group 1 when there is
/// one; 40 causes per device in bursts from the BSP, twice over: every
/// cause claimed once, every delivery inside its connection's effective
/// mask.
fn under_load(env: &Env) -> TestResult {
    let t = Topo::get()?;
    let (devs, n) = env.wired()?;
    let mut picked: [Option<(Dev, u16, KAFFINITY, PKINTERRUPT)>; 4] = [None; 4];
    let mut k = 0;
    for d in devs[..n].iter() {
        if k == picked.len() || d.res_count() != 1 || d.res(0).share_vector() {
            continue;
        }
        // The last device goes to the last group, when there are several.
        let group = if k == 0 { t.groups.group_count - 1 } else { 0 };
        let mask = t.groups.group_online[usize::from(group)];
        let ctx = &CTX[k];
        let want = t.expected(group, mask);
        ctx.bind_in_group(Some(d), Policy::All, group, want);
        let mut a = Args::of(d, 0, ctx);
        a.mask = mask;
        let h = connect_group_ok(d, &a, group)?;
        check!(
            h.effective_mask() == want,
            "device {}: effective {}, expected {}",
            crate::display::dec(d.id()),
            crate::display::hex(h.effective_mask()),
            crate::display::hex(want)
        );
        picked[k] = Some((*d, group, want, h));
        k += 1;
    }
    check!(k > 0, "no exclusive device to load");
    pvfix::flush_cpus();
    let live = || picked.iter().flatten();
    let mut before = [[0u32; percpu::MAX_CPUS]; 4];
    let mut bases = [(0, 0); 4];
    for (i, (d, ..)) in live().enumerate() {
        before[i] = deliveries(d.vector());
        bases[i] = counters(d);
        d.td.enable(true);
    }
    const BURST: u32 = 4;
    const BURSTS: u32 = 10;
    for round in 1..=BURSTS {
        for (d, ..) in live() {
            d.td.raise(BURST);
        }
        let want = round * BURST;
        wait_for("every burst claimed", || {
            live().enumerate().all(|(i, _)| CTX[i].claimed() >= want)
        })?;
    }
    settle();
    for (i, (d, group, want, h)) in live().enumerate() {
        d.td.enable(false);
        check_counts(d, bases[i], CTX[i].claimed(), BURST * BURSTS)?;
        inside(d.vector(), &before[i], *group, *want)?;
        CTX[i].check_clean("under load")?;
        pvfix::disconnect_ex_ok(wdm::CONNECT_FULLY_SPECIFIED_GROUP, *h)?;
    }
    Ok(())
}
