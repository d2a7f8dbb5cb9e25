//! `no_interrupt_lost_under_load`: every test device connected at once,
//! raised by the host timers and by the guest in bursts, on every processor
//! of group 0 in turn (at most 16 of them, spread over the group: every
//! vCPU is emulated on the host's few cores) and then on all of them (as
//! many as the host's object quota allows); about 3600 causes in all. Per device the host's assert count,
//! the ISR's claims and the device's ack count agree, and no ISR runs
//! outside its mask.

use super::pvfix::{
    self, Args, CTX, Env, LOCKS, MAX_DEVICES, Policy, check_counts, connect_ok, counters, cpus,
    deliveries, disconnect_ok, none_outside, settle,
};
use crate::runner::{Test, TestResult};
use crate::wdm::{KAFFINITY, KINTERRUPT_MODE, PKINTERRUPT};
use crate::{check, fail, percpu, time};

/// The suite.
pub const TESTS: &[Test] = &[Test::new("no_interrupt_lost_under_load", || {
    pvfix::run(under_load)
})];

/// Causes the host timer raises per device over all rounds (one per
/// 100 us), spread over the rounds (50 per round with 4 CPUs).
const TIMER_CAUSES_TOTAL: u32 = 250;
/// Guest bursts per device over all rounds (20 per round with 4 CPUs),
/// `BURST` causes each.
const BURSTS_TOTAL: u32 = 100;
const BURST: u32 = 2;

fn under_load(env: &Env) -> TestResult {
    let (devs, n) = env.wired()?;
    let devs = &devs[..n];
    let online: [usize; percpu::MAX_CPUS] = {
        let mut list = [0; percpu::MAX_CPUS];
        for (slot, c) in list.iter_mut().zip(cpus(env.online())) {
            *slot = c;
        }
        list
    };
    // The processors a classic KAFFINITY names, and the ones that get a
    // round of their own.
    let ncpu = percpu::count().min(64);
    let singles = ncpu.min(16);
    let step = ncpu / singles;
    // Devices on one vector form a group and must share a mask (an
    // interrupt of one reaching a processor where only the other is
    // connected would find nobody to claim it).
    let mut group = [0usize; MAX_DEVICES];
    let mut groups = 0;
    for (i, d) in devs.iter().enumerate() {
        match devs[..i].iter().position(|e| e.vector() == d.vector()) {
            Some(j) => group[i] = group[j],
            None => {
                group[i] = groups;
                groups += 1;
            }
        }
    }
    // Rounds: one per processor, then all at once; the work per round
    // shrinks as the rounds grow so the wall time stays bounded.
    let rounds = singles as u32 + 1;
    let timer_causes = (TIMER_CAUSES_TOTAL / rounds).max(20);
    let bursts = (BURSTS_TOTAL / rounds).max(5);
    let per_round = timer_causes + bursts * BURST;
    // The all-processor round must fit the host's object quota: at most
    // `width` processors per device.
    let free = env
        .platform
        .object_quota
        .saturating_sub(env.platform.objects_in_use) as usize;
    let width = (free / n.max(1)).clamp(1, ncpu);
    let wide: KAFFINITY = online[..width].iter().fold(0, |m, &c| m | (1u64 << c));
    let mut total = 0u32;
    for round in 0..=singles {
        let mut handles: [Option<PKINTERRUPT>; MAX_DEVICES] = [None; MAX_DEVICES];
        let mut masks: [KAFFINITY; MAX_DEVICES] = [0; MAX_DEVICES];
        let mut bases = [(0, 0); MAX_DEVICES];
        let mut before = [[0; percpu::MAX_CPUS]; MAX_DEVICES];
        pvfix::flush_cpus();
        for (i, d) in devs.iter().enumerate() {
            let r = d.res(0);
            let mask = if round == singles {
                r.affinity & wide
            } else {
                (1u64 << online[(group[i] + round * step) % ncpu]) & r.affinity
            };
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
                // One ISR for several vectors: the driver's lock and the
                // device's highest Irql (docs/semantics.md rule 10).
                a.lock = Some(&LOCKS[0]);
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
                d.td.timer_start(timer_causes as u16, 100);
            }
        }
        for _ in 0..bursts {
            for (i, d) in devs.iter().enumerate() {
                if handles[i].is_some() {
                    d.td.raise(BURST);
                }
            }
            time::delay_us(50);
        }
        let done = || {
            devs.iter().enumerate().all(|(i, d)| {
                handles[i].is_none()
                    || (d.td.timer_remaining() == 0
                        && CTX[i].claimed() >= d.td.assert_count().wrapping_sub(bases[i].0))
            })
        };
        let finished = time::wait_until(3 * pvfix::TIMEOUT_US, done);
        settle();
        for (i, d) in devs.iter().enumerate() {
            if handles[i].is_some() {
                d.td.enable(false);
            }
        }
        if !finished {
            for (i, d) in devs.iter().enumerate() {
                let raised = d.td.assert_count().wrapping_sub(bases[i].0);
                if handles[i].is_some() && CTX[i].claimed() < raised {
                    fail!(
                        "round {}: device {}: {} raised, {} claimed, {} pending, {} timer raises to go after 3 s",
                        crate::display::dec(round),
                        crate::display::dec(d.id()),
                        crate::display::dec(raised),
                        crate::display::dec(CTX[i].claimed()),
                        crate::display::dec(d.td.status()),
                        crate::display::dec(d.td.timer_remaining())
                    );
                }
            }
        }
        for (i, d) in devs.iter().enumerate() {
            let Some(h) = handles[i] else {
                continue;
            };
            check_counts(d, bases[i], CTX[i].claimed(), per_round)?;
            CTX[i].check_clean("under load")?;
            none_outside(d.vector(), &before[i], masks[i])?;
            disconnect_ok(h)?;
            total += per_round;
        }
    }
    check!(
        total >= 1000,
        "only {} causes raised: the load is too light to mean anything",
        crate::display::dec(total)
    );
    Ok(())
}
