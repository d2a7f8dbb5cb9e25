//! `hostile_storm_unclaimed_level_is_masked`: a level device whose ISR never
//! claims, its line held asserted and never acknowledged. Our IOAPIC (split
//! and user modes) re-delivers after every EOI; past QUERY_PLATFORM's
//! `storm_threshold` the host masks the pin. The test shows the mask
//! (QUERY_ROUTE, `storm_masked_pins`), that deliveries stop, that another
//! device's interrupts still arrive and are claimed, and that after the
//! device is acknowledged and disconnected its pin connects and works again.
//!
//! The storm runs on the last processor (the BSP when alone), so the BSP
//! can watch the route. It prints
//! `# hostile_storm: pin P vector V masked after N ISR calls (K when the mask was seen; threshold T) in M ms on cpu C`.

use core::sync::atomic::{AtomicU32, Ordering};

use irqconnect_abi::pv::irqchip_mode;

use super::pvfix::{
    self, Args, CTX, Dev, MAX_DEVICES, Policy, check_counts, connect_ok, counters, disconnect_ok,
    route,
};
use super::{check_suite_baseline, expect_host_counter, record_suite_baseline};
use crate::runner::TestResult;
use crate::wdm::{self, KINTERRUPT, KINTERRUPT_MODE, PVOID};
use crate::{check, fail, percpu, println, skip, time};

/// How long the storm may take before the test gives up (the guest runs
/// emulated here: about 4M instructions/s, and a delivery costs a few
/// hundred of them plus exits).
const STORM_TIMEOUT_US: u64 = 120_000_000;
/// How long the other device's interrupts may wait while the storm runs.
const OTHER_TIMEOUT_US: u64 = STORM_TIMEOUT_US;

/// How often the BSP asks for the route while the storm runs (each ask
/// is a doorbell exit competing with the storm for the host's cores).
const POLL_US: u64 = 10_000;

/// Calls of [`never_claims`].
static STORM_CALLS: AtomicU32 = AtomicU32::new(0);

/// The storming device's ISR: counts and declines.
fn never_claims(_interrupt: &KINTERRUPT, _context: PVOID) -> bool {
    STORM_CALLS.fetch_add(1, Ordering::AcqRel);
    false
}

/// Every device of the host's table, quiet.
/// The test: skips without the PV device and in kernel mode (KVM's IOAPIC:
/// the VMM never sees the EOIs, so there is no storm guard).
pub fn run() -> TestResult {
    pvfix::need_pv()?;
    record_suite_baseline()?;
    let start = pvfix::platform()?;
    if start.irqchip_mode == irqchip_mode::KERNEL {
        skip!("storm guard needs our IOAPIC (split/user)");
    }
    let devs = pvfix::started_devices(start.device_count);
    pvfix::quiesce_all(&devs);
    let result = storm(&devs, start.storm_masked_pins, start.storm_threshold);
    wdm::disconnect_all();
    pvfix::quiesce_all(&devs);
    result?;
    pvfix::check_storm_aftermath(&start)?;
    check_suite_baseline()
}

fn storm(devs: &[Option<Dev>; MAX_DEVICES], masked_before: u32, threshold: u32) -> TestResult {
    let Some(s) = pvfix::exclusive(devs, KINTERRUPT_MODE::LevelSensitive, true) else {
        skip!("the host's device table has no exclusive level device");
    };
    let Some(b) = pvfix::exclusive(devs, KINTERRUPT_MODE::LevelSensitive, false)
        .filter(|b| b.id() != s.id())
        .or_else(|| pvfix::exclusive(devs, KINTERRUPT_MODE::Latched, false))
    else {
        skip!("the host's device table has no second exclusive device");
    };
    s.check_wiring()?;
    b.check_wiring()?;
    // The last processor a classic KAFFINITY (group 0) names.
    let n = percpu::count().min(64);
    let cpu = n - 1;
    let online = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    let (pin, vector) = (s.line(), s.vector());

    // The other device, on every processor, claiming everything.
    let other = CTX[1].bind(Some(&b), Policy::All, online);
    let hb = connect_ok(&b, &Args::of(&b, 0, &CTX[1]))?;
    let b_base = counters(&b);
    b.td.enable(true);

    // The storming device, on one processor, never claiming.
    let mut a = Args::of(&s, 0, &CTX[0]);
    a.routine = Some(never_claims);
    a.context = core::ptr::null_mut();
    a.mask = 1 << cpu;
    let hs = connect_ok(&s, &a)?;
    let r = route(pin)?;
    check!(
        r.masked == 0 && r.vector == vector && r.destination_mask == 1 << cpu,
        "route of pin {} before the storm: masked {} vector {} destination {}",
        crate::display::dec(pin),
        crate::display::dec(r.masked),
        crate::display::hex(r.vector),
        crate::display::hex(r.destination_mask)
    );
    STORM_CALLS.store(0, Ordering::Release);
    let unclaimed_before = wdm::unclaimed(cpu, vector);

    let t0 = time::now_us();
    s.td.enable(true);
    s.td.raise(1);
    // While the storm runs: the other device raises 5 causes.
    b.td.raise(5);
    let masked = time::wait_until(STORM_TIMEOUT_US, || {
        time::delay_us(POLL_US);
        pvfix::route(pin).is_ok_and(|r| r.masked != 0)
    });
    let elapsed_us = time::now_us() - t0;
    let calls_at_mask = STORM_CALLS.load(Ordering::Acquire);
    check!(
        masked,
        "pin {} not masked after {} s: {} ISR calls (threshold {})",
        crate::display::dec(pin),
        crate::display::dec(elapsed_us / 1_000_000),
        crate::display::dec(calls_at_mask),
        crate::display::dec(threshold)
    );
    expect_host_counter("storm_masks", 1);

    // Masked for good: the host says so, the calls stop, the line is
    // still asserted (the device still has its cause), the route still
    // holds the connection.
    let p = pvfix::platform()?;
    check!(
        p.storm_masked_pins == masked_before + 1,
        "storm_masked_pins {} after the mask, was {}",
        crate::display::dec(p.storm_masked_pins),
        crate::display::dec(masked_before)
    );
    time::delay_us(20_000);
    let settled = STORM_CALLS.load(Ordering::Acquire);
    time::delay_us(50_000);
    let later = STORM_CALLS.load(Ordering::Acquire);
    println!(
        "# hostile_storm: pin {} vector {} masked after {} ISR calls ({} when the mask was seen; threshold {}) in {} ms on cpu {}",
        crate::display::dec(pin),
        crate::display::hex(vector),
        crate::display::dec(later),
        crate::display::dec(calls_at_mask),
        crate::display::dec(threshold),
        crate::display::dec(elapsed_us / 1000),
        crate::display::dec(cpu)
    );
    check!(
        later == settled,
        "ISR still called after the mask: {} calls in 50 ms",
        crate::display::dec(later - settled)
    );
    check!(
        settled >= threshold,
        "masked after {} ISR calls, below the threshold {}",
        crate::display::dec(settled),
        crate::display::dec(threshold)
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
        "the storming device has {} pending causes, expected 1 (never acknowledged)",
        crate::display::dec(s.td.status())
    );
    let r = route(pin)?;
    check!(
        r.masked == 1 && r.connections == 1,
        "route of pin {} after the storm: masked {} connections {}",
        crate::display::dec(pin),
        crate::display::dec(r.masked),
        crate::display::dec(r.connections)
    );

    // Every other device keeps working: the 5 raised during the storm
    // arrive, and 20 more after it.
    if !time::wait_until(OTHER_TIMEOUT_US, || other.claimed() >= 5) {
        fail!(
            "the other device's 5 causes raised during the storm: {} claimed",
            crate::display::dec(other.claimed())
        );
    }
    b.td.raise(20);
    pvfix::wait_for("20 more causes of the other device", || {
        other.claimed() >= 25
    })?;
    pvfix::settle();
    check_counts(&b, b_base, other.claimed(), 25)?;
    other.check_clean("of the other device")?;

    // Clean up: acknowledge, disconnect; the pin is masked with no
    // connection, then connects again (re-armed) and works.
    s.td.enable(false);
    s.td.drain(10);
    disconnect_ok(hs)?;
    let r = route(pin)?;
    check!(
        r.masked == 1 && r.connections == 0,
        "route of pin {} after the disconnect: masked {} connections {}",
        crate::display::dec(pin),
        crate::display::dec(r.masked),
        crate::display::dec(r.connections)
    );
    pvfix::rearmed_by_new_connect(&s, online)?;
    b.td.enable(false);
    disconnect_ok(hb)?;
    Ok(())
}
