//! `ipi_`: inter-processor interrupts through the ICR: self, physical,
//! logical, broadcasts, NMI, and an AP as the sender.

use core::sync::atomic::Ordering;

use super::fixture::{
    apic_id, expect_counts, in_set, logical_dest, need_cpus, settle, target_set, wait_count,
    wait_total,
};
use crate::lapic::{self, Delivery, Dest};
use crate::runner::{Test, TestResult};
use crate::{check, fail, percpu, smp, time};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("ipi_self_shorthand", self_shorthand),
    Test::new("ipi_self_physical_id", self_physical),
    Test::new("ipi_each_cpu_physical", each_cpu_physical),
    Test::new("ipi_broadcast_all_excluding_self", all_excluding_self),
    Test::new("ipi_broadcast_all_including_self", all_including_self),
    Test::new("ipi_logical_destination_set", logical_set),
    Test::new("ipi_from_ap_to_bsp", ap_to_bsp),
    Test::new("ipi_between_aps", between_aps),
    Test::new("ipi_nmi_to_each_ap", nmi_to_each_ap),
];

fn self_shorthand() -> TestResult {
    const V: u8 = 0xc4;
    for round in 1..=3 {
        lapic::send_ipi(V, Delivery::Fixed, Dest::SelfOnly);
        wait_count(0, V, round)?;
    }
    settle();
    expect_counts(V, |c| if c == 0 { 3 } else { 0 })
}

fn self_physical() -> TestResult {
    const V: u8 = 0xc5;
    lapic::send_ipi(V, Delivery::Fixed, Dest::Physical(apic_id(0)));
    wait_count(0, V, 1)?;
    settle();
    expect_counts(V, |c| u32::from(c == 0))
}

fn each_cpu_physical() -> TestResult {
    const V: u8 = 0xc6;
    for c in 0..percpu::count() {
        lapic::send_ipi(V, Delivery::Fixed, Dest::Physical(apic_id(c)));
        wait_count(c, V, 1)?;
    }
    settle();
    expect_counts(V, |_| 1)
}

fn all_excluding_self() -> TestResult {
    const V: u8 = 0xc7;
    need_cpus(2)?;
    lapic::send_ipi(V, Delivery::Fixed, Dest::AllExcludingSelf);
    for c in 1..percpu::count() {
        wait_count(c, V, 1)?;
    }
    settle();
    expect_counts(V, |c| u32::from(c != 0))
}

fn all_including_self() -> TestResult {
    const V: u8 = 0xc8;
    lapic::send_ipi(V, Delivery::Fixed, Dest::AllIncludingSelf);
    for c in 0..percpu::count() {
        wait_count(c, V, 1)?;
    }
    settle();
    expect_counts(V, |_| 1)
}

fn logical_set() -> TestResult {
    const V: u8 = 0xc9;
    let set = target_set()?;
    let dest = logical_dest(set)?;
    lapic::send_ipi(V, Delivery::Fixed, Dest::Logical(dest));
    for &c in set {
        wait_count(c, V, 1)?;
    }
    settle();
    expect_counts(V, |c| u32::from(in_set(set, c)))
}

fn send_to_cpu(target: usize) -> usize {
    lapic::send_ipi(0xca, Delivery::Fixed, Dest::Physical(apic_id(target)));
    0
}

fn ap_to_bsp() -> TestResult {
    const V: u8 = 0xca;
    need_cpus(2)?;
    for ap in 1..percpu::count() {
        smp::run_on(ap, send_to_cpu, 0)?;
        wait_count(0, V, ap as u32)?;
    }
    settle();
    expect_counts(V, |c| {
        if c == 0 {
            (percpu::count() - 1) as u32
        } else {
            0
        }
    })
}

fn between_aps() -> TestResult {
    const V: u8 = 0xca;
    need_cpus(3)?;
    let n = percpu::count();
    for ap in 1..n {
        let target = if ap + 1 < n { ap + 1 } else { 1 };
        smp::run_on(ap, send_to_cpu, target)?;
        wait_count(target, V, 1)?;
    }
    settle();
    expect_counts(V, |c| u32::from(c != 0))
}

fn nmi_to_each_ap() -> TestResult {
    need_cpus(2)?;
    let n = percpu::count();
    for ap in 1..n {
        lapic::send_ipi(0, Delivery::Nmi, Dest::Physical(apic_id(ap)));
        let slot = percpu::cpu(ap);
        if !time::wait_until(super::fixture::TIMEOUT_US, || {
            slot.nmi_count.load(Ordering::Acquire) >= 1
        }) {
            fail!("timeout: cpu {} took no NMI", crate::display::dec(ap));
        }
    }
    settle();
    for c in 0..n {
        let got = percpu::cpu(c).nmi_count.load(Ordering::Acquire);
        check!(
            got == u32::from(c != 0),
            "cpu {} took {} NMIs",
            crate::display::dec(c),
            crate::display::dec(got)
        );
    }
    wait_total(0xca, 0)
}
