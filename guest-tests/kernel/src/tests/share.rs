//! `share_`: vector sharing (`docs/semantics.md` rule 9) and chained dispatch:
//! two devices on one level pin, two edge pins on one vector, the level
//! chain's stop at the first claim, the latched chain's rescans, and
//! disconnecting one ISR of a chain.

use core::sync::atomic::Ordering;

use irqconnect_abi::ntstatus::STATUS_INVALID_PARAMETER;

use super::pvfix::{
    self, Args, CTX, Ctx, Dev, Env, ORDER_VIOLATIONS, Policy, chain_first_isr, chain_second_isr,
    check_counts, connect_ok, connect_refused, counters, disconnect_ok, raise_held, route, settle,
    wait_for,
};
use crate::runner::{Test, TestResult};
use crate::wdm::{self, KINTERRUPT_MODE, PKINTERRUPT};
use crate::{check, percpu};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("share_one_pin_level_both_isrs_called", || {
        pvfix::run(one_pin_level)
    }),
    Test::new("share_two_pins_edge_both_isrs_called", || {
        pvfix::run(two_pins_edge)
    }),
    Test::new("share_level_chain_stops_at_first_claim", || {
        pvfix::run(level_stops)
    }),
    Test::new("share_latched_chain_rescans_until_quiet", || {
        pvfix::run(latched_rescans)
    }),
    Test::new("share_exclusive_then_shared_rejected", || {
        pvfix::run(exclusive_then_shared)
    }),
    Test::new("share_shared_then_exclusive_rejected", || {
        pvfix::run(shared_then_exclusive)
    }),
    Test::new("share_mode_mismatch_rejected", || pvfix::run(mode_mismatch)),
    Test::new("share_disconnect_one_keeps_other", || {
        pvfix::run(disconnect_one)
    }),
];

/// Fails unless every processor of `mask` has exactly `want` (in order) on
/// its chain for `vector`, and the others have nothing.
fn check_chains(vector: u8, mask: u64, want: &[PKINTERRUPT]) -> TestResult {
    let mut got = [PKINTERRUPT::default(); 4];
    for c in 0..percpu::count() {
        let n = wdm::chain(c, vector, &mut got);
        let expect: &[PKINTERRUPT] = if c < 64 && mask & (1 << c) != 0 {
            want
        } else {
            &[]
        };
        check!(
            n == expect.len() && got[..n] == *expect,
            "cpu {}: chain on vector {} holds {} objects, expected {} in connection order",
            crate::display::dec(c),
            crate::display::hex(vector),
            crate::display::dec(n),
            crate::display::dec(expect.len())
        );
    }
    Ok(())
}

fn connect_pair(
    env: &Env,
    a: &Dev,
    b: &Dev,
    policy: Policy,
    mask: u64,
) -> Result<(PKINTERRUPT, PKINTERRUPT), crate::runner::Failure> {
    let mask = env.effective(mask)?;
    CTX[0].bind(Some(a), policy, mask);
    CTX[1].bind(Some(b), policy, mask);
    let mut args_a = Args::of(a, 0, &CTX[0]);
    let mut args_b = Args::of(b, 0, &CTX[1]);
    args_a.mask = mask;
    args_b.mask = mask;
    let ha = connect_ok(a, &args_a)?;
    let hb = connect_ok(b, &args_b)?;
    check_chains(a.vector(), mask, &[ha, hb])?;
    Ok((ha, hb))
}

/// Two level devices on one pin and one vector: each cause is claimed by
/// its own device's ISR; the first ISR is called (and declines) for the
/// second device's causes.
fn one_pin_level(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    let (ha, hb) = connect_pair(env, &a, &b, Policy::One, env.online())?;
    let r = route(a.line())?;
    check!(
        r.masked == 0 && r.trigger == 1 && r.connections == 2,
        "route of pin {}: masked {} trigger {} connections {}, expected unmasked level with 2",
        crate::display::dec(a.line()),
        crate::display::dec(r.masked),
        crate::display::dec(r.trigger),
        crate::display::dec(r.connections)
    );
    let (ia, ib) = (&CTX[0], &CTX[1]);
    let (base_a, base_b) = (counters(&a), counters(&b));
    a.td.enable(true);
    b.td.enable(true);
    a.td.raise(1);
    wait_for("A to claim its cause", || ia.claimed() >= 1)?;
    let a_calls = ia.called();
    b.td.raise(1);
    wait_for("B to claim its cause", || ib.claimed() >= 1)?;
    check!(
        ia.called() > a_calls,
        "A was not called for B's interrupt (A runs first in the chain)"
    );
    raise_held(&[(&a, 1), (&b, 1)]);
    wait_for("both to claim a second cause", || {
        ia.claimed() >= 2 && ib.claimed() >= 2
    })?;
    settle();
    check_counts(&a, base_a, ia.claimed(), 2)?;
    check_counts(&b, base_b, ib.claimed(), 2)?;
    ia.check_clean("A")?;
    ib.check_clean("B")?;
    a.td.enable(false);
    b.td.enable(false);
    disconnect_ok(hb)?;
    disconnect_ok(ha)
}

/// Two latched devices on two pins, one vector: both pins carry the same
/// route; each edge is claimed by its own ISR and the other ISR is called
/// in the same dispatch (every pass calls the whole chain).
fn two_pins_edge(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::Latched, false)?;
    let (ha, hb) = connect_pair(env, &a, &b, Policy::All, env.online())?;
    let (ra, rb) = (route(a.line())?, route(b.line())?);
    check!(
        ra.masked == 0
            && ra.trigger == 0
            && (ra.vector, ra.destination_mask, ra.masked)
                == (rb.vector, rb.destination_mask, rb.masked),
        "routes of pins {} and {} differ or are not unmasked edge: {} {} vs {} {}",
        crate::display::dec(a.line()),
        crate::display::dec(b.line()),
        crate::display::hex(ra.vector),
        crate::display::hex(ra.destination_mask),
        crate::display::hex(rb.vector),
        crate::display::hex(rb.destination_mask)
    );
    let (ia, ib) = (&CTX[0], &CTX[1]);
    let (base_a, base_b) = (counters(&a), counters(&b));
    a.td.enable(true);
    b.td.enable(true);
    a.td.raise(1);
    wait_for("A to claim its edge", || ia.claimed() >= 1)?;
    wait_for("B to be called for A's edge", || ib.called() >= 1)?;
    b.td.raise(1);
    wait_for("B to claim its edge", || ib.claimed() >= 1)?;
    wait_for("A to be called for B's edge", || {
        ia.called() > Ctx::get(&ia.claimed_calls)
    })?;
    settle();
    check_counts(&a, base_a, ia.claimed(), 1)?;
    check_counts(&b, base_b, ib.claimed(), 1)?;
    ia.check_clean("A")?;
    ib.check_clean("B")?;
    a.td.enable(false);
    b.td.enable(false);
    disconnect_ok(ha)?;
    disconnect_ok(hb)
}

/// Level chain [A, B] on the BSP, both devices pending: A claims, the
/// dispatch stops (B is never called after A claimed in the same
/// dispatch); the line stays up and the next delivery reaches B.
fn level_stops(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    let mask = 1;
    CTX[0].bind(Some(&a), Policy::One, mask);
    CTX[1].bind(Some(&b), Policy::One, mask);
    let mut args_a = Args::of(&a, 0, &CTX[0]);
    let mut args_b = Args::of(&b, 0, &CTX[1]);
    args_a.routine = Some(chain_first_isr);
    args_b.routine = Some(chain_second_isr);
    args_a.mask = mask;
    args_b.mask = mask;
    let ha = connect_ok(&a, &args_a)?;
    let hb = connect_ok(&b, &args_b)?;
    check_chains(a.vector(), mask, &[ha, hb])?;
    let (ia, ib) = (&CTX[0], &CTX[1]);
    let (base_a, base_b) = (counters(&a), counters(&b));
    a.td.enable(true);
    b.td.enable(true);
    const ROUNDS: u32 = 5;
    for round in 1..=ROUNDS {
        raise_held(&[(&a, 1), (&b, 1)]);
        wait_for("both ISRs to claim", || {
            ia.claimed() >= round && ib.claimed() >= round
        })?;
    }
    settle();
    let violations = ORDER_VIOLATIONS.load(Ordering::Acquire);
    check!(
        violations == 0,
        "B was called {} times in a dispatch where A had claimed",
        crate::display::dec(violations)
    );
    check_counts(&a, base_a, ia.claimed(), ROUNDS)?;
    check_counts(&b, base_b, ib.claimed(), ROUNDS)?;
    ia.check_clean("A")?;
    ib.check_clean("B")?;
    a.td.enable(false);
    b.td.enable(false);
    disconnect_ok(ha)?;
    disconnect_ok(hb)
}

/// Latched chain [A, B] on the BSP; ISRs claim one cause per call. 3 + 2
/// causes behind at most 2 edges (raised with CR8 holding the vector) are
/// all claimed: the dispatch rescans while a pass claimed, every pass calls
/// both ISRs, and each dispatch ends with a pass where both declined.
fn latched_rescans(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::Latched, false)?;
    let (ha, hb) = connect_pair(env, &a, &b, Policy::One, 1)?;
    let (ia, ib) = (&CTX[0], &CTX[1]);
    let (base_a, base_b) = (counters(&a), counters(&b));
    let v = a.vector();
    a.td.enable(true);
    b.td.enable(true);
    raise_held(&[(&a, 3), (&b, 2)]);
    wait_for("all 5 causes claimed", || {
        ia.claimed() >= 3 && ib.claimed() >= 2
    })?;
    settle();
    let deliveries = percpu::cpu(0).count(v);
    let passes = ia.called();
    check_counts(&a, base_a, ia.claimed(), 3)?;
    check_counts(&b, base_b, ib.claimed(), 2)?;
    check!(
        (1..=2).contains(&deliveries),
        "{} deliveries for 2 edges",
        crate::display::dec(deliveries)
    );
    check!(
        ib.called() == passes,
        "A was called {} times, B {}: a pass skipped an ISR",
        crate::display::dec(passes),
        crate::display::dec(ib.called())
    );
    check!(
        passes >= deliveries + 3,
        "{} passes over {} deliveries: fewer than 3 claiming passes plus one quiet pass each",
        crate::display::dec(passes),
        crate::display::dec(deliveries)
    );
    check!(
        wdm::unclaimed(0, v) == 0,
        "{} deliveries claimed by nobody",
        crate::display::dec(wdm::unclaimed(0, v))
    );
    check!(
        a.td.status() == 0 && b.td.status() == 0,
        "causes left pending after the dispatch went quiet"
    );
    ia.check_clean("A")?;
    ib.check_clean("B")?;
    a.td.enable(false);
    b.td.enable(false);
    disconnect_ok(ha)?;
    disconnect_ok(hb)
}

/// A connected with ShareVector FALSE: B (shared or not) is refused on the
/// vector, A keeps working; once A is gone B connects.
fn exclusive_then_shared(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    let ia = CTX[0].bind(Some(&a), Policy::One, env.online());
    let mut args_a = Args::of(&a, 0, &CTX[0]);
    args_a.share = false;
    let ha = connect_ok(&a, &args_a)?;
    let mut args_b = Args::of(&b, 0, &CTX[1]);
    args_b.share = true;
    connect_refused(
        &b,
        &args_b,
        STATUS_INVALID_PARAMETER,
        "shared after exclusive",
    )?;
    args_b.share = false;
    connect_refused(
        &b,
        &args_b,
        STATUS_INVALID_PARAMETER,
        "exclusive after exclusive",
    )?;
    let base = counters(&a);
    a.td.enable(true);
    a.td.raise(1);
    wait_for("A to claim", || ia.claimed() >= 1)?;
    settle();
    check_counts(&a, base, ia.claimed(), 1)?;
    a.td.enable(false);
    disconnect_ok(ha)?;
    args_b.share = true;
    let hb = connect_ok(&b, &args_b)?;
    disconnect_ok(hb)
}

/// A connected shared: B with ShareVector FALSE is refused; B shared is
/// accepted and both chain.
fn shared_then_exclusive(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    let mut args_a = Args::of(&a, 0, &CTX[0]);
    args_a.share = true;
    let ha = connect_ok(&a, &args_a)?;
    let mut args_b = Args::of(&b, 0, &CTX[1]);
    args_b.share = false;
    connect_refused(
        &b,
        &args_b,
        STATUS_INVALID_PARAMETER,
        "exclusive after shared",
    )?;
    args_b.share = true;
    let hb = connect_ok(&b, &args_b)?;
    check_chains(a.vector(), env.effective(args_a.mask)?, &[ha, hb])?;
    disconnect_ok(hb)?;
    disconnect_ok(ha)
}

/// On a shared vector, a second connection in the other InterruptMode is
/// refused; in the same mode it is accepted. Checked on the level pair and,
/// when the table has one, the latched pair.
fn mode_mismatch(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    mismatch_on(&a, &b, KINTERRUPT_MODE::Latched)?;
    if let Ok((c, d)) = env.shared_pair(KINTERRUPT_MODE::Latched, false) {
        mismatch_on(&c, &d, KINTERRUPT_MODE::LevelSensitive)?;
    }
    Ok(())
}

fn mismatch_on(a: &Dev, b: &Dev, other: KINTERRUPT_MODE) -> TestResult {
    let ha = connect_ok(a, &Args::of(a, 0, &CTX[0]))?;
    let mut args_b = Args::of(b, 0, &CTX[1]);
    args_b.mode = other;
    connect_refused(
        b,
        &args_b,
        STATUS_INVALID_PARAMETER,
        "the other InterruptMode",
    )?;
    let hb = connect_ok(b, &Args::of(b, 0, &CTX[1]))?;
    disconnect_ok(hb)?;
    disconnect_ok(ha)
}

/// Chain [A, B]; A disconnected: B stays on every chain, the pin stays
/// routed, B keeps claiming, A is never called again.
fn disconnect_one(env: &Env) -> TestResult {
    let (a, b) = env.shared_pair(KINTERRUPT_MODE::LevelSensitive, true)?;
    let (ha, hb) = connect_pair(env, &a, &b, Policy::One, env.online())?;
    let (ia, ib) = (&CTX[0], &CTX[1]);
    let base_b = counters(&b);
    a.td.enable(true);
    b.td.enable(true);
    a.td.raise(1);
    b.td.raise(1);
    wait_for("A and B to claim", || {
        ia.claimed() >= 1 && ib.claimed() >= 1
    })?;
    a.td.enable(false);
    disconnect_ok(ha)?;
    let a_calls = ia.called();
    let mask = env.effective(Args::of(&b, 0, &CTX[1]).mask)?;
    check_chains(b.vector(), mask, &[hb])?;
    let r = route(b.line())?;
    check!(
        r.masked == 0 && r.connections == 1 && r.destination_mask == mask,
        "route of pin {} after one disconnect: masked {} connections {} destination {}",
        crate::display::dec(b.line()),
        crate::display::dec(r.masked),
        crate::display::dec(r.connections),
        crate::display::hex(r.destination_mask)
    );
    b.td.raise(3);
    wait_for("B to claim 3 more causes", || ib.claimed() >= 4)?;
    settle();
    check_counts(&b, base_b, ib.claimed(), 4)?;
    check!(
        ia.called() == a_calls,
        "A was called {} times after its disconnect",
        crate::display::dec(ia.called() - a_calls)
    );
    ib.check_clean("B")?;
    b.td.enable(false);
    disconnect_ok(hb)?;
    let r = route(b.line())?;
    check!(r.masked == 1, "pin still unmasked with no connection left");
    Ok(())
}
