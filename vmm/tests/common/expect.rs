//! The guest suite's expected result per mode and vCPU count, and the
//! parse of a run's result lines: shared by the boot tests
//! (`guest_suite.rs`) and the snapshot chains (`snapshot.rs`), whose
//! chained results must equal an uninterrupted run's.

use std::collections::{BTreeMap, BTreeSet};

use irqchip_kvm::Mode;

use super::Run;
use super::suite::{SNAPSHOT_DISABLED, SUITE};

/// Tests that need more than one CPU, with how many.
pub const NEEDS_CPUS: &[(&str, u32)] = &[
    ("ipi_broadcast_all_excluding_self", 2),
    ("ipi_logical_destination_set", 2),
    ("ipi_from_ap_to_bsp", 2),
    ("ipi_between_aps", 3),
    ("ipi_nmi_to_each_ap", 2),
    ("nmi_two_at_once_both_handled", 2),
    ("nmi_before_fixed_ipi_from_same_sender_first", 2),
    ("tpr_on_ap_defers_ipi_until_lowered", 2),
    ("timer_oneshot_on_each_ap", 2),
    ("ioapic_physical_destination_cpu1", 2),
    ("ioapic_logical_flat_destination_set", 2),
    ("ioapic_lowest_priority_stays_in_set", 2),
    ("ioapic_retarget_while_remote_irr_set", 2),
    ("ioapic_handler_retargets_own_pin", 2),
    ("affinity_subset_never_outside_mask", 2),
    ("affinity_union_of_two_connections", 2),
    ("synchronize_execution_excludes_isr", 2),
    ("ex_message_spread_policy_one_cpu_each", 2),
    ("ex_message_specified_policy_stays_in_mask", 2),
    ("ex_message_synchronize_execution_excludes_isr", 2),
    ("scale_affinity_cluster_mask_stays_inside", 3),
    ("scale_affinity_cross_cluster_mask_effective_subset", 4),
    ("scale_affinity_union_of_sharers_across_clusters", 4),
    ("scale_group_one_connect_reaches_cpu_64", 65),
    ("retarget_edge_no_loss_no_duplicate", 2),
    ("retarget_level_remote_irr_redelivers_to_new_set", 3),
    ("retarget_shared_vector_keeps_union", 4),
    ("retarget_message_based_each_message", 2),
    ("snapshot_ipi_between_init_and_sipi", 2),
];

/// Tests that need two logical domains in group 0 (processors no one
/// destination names together); they skip while every processor is in
/// processor 1's domain.
pub const TWO_DOMAINS: &[&str] = &[
    "scale_affinity_cross_cluster_mask_effective_subset",
    "scale_affinity_union_of_sharers_across_clusters",
];

/// Whether every processor of a `cpus`-vCPU guest is in processor 1's
/// logical domain (docs/semantics.md, "Destinations"): x2APIC cluster 0
/// within the route's destination width (8 bits in kernel mode, 15 with
/// the extended destination ID), or the xAPIC flat model (at most 8
/// processors; above 8 the guest uses the cluster model, 4 a cluster).
pub fn one_domain(mode: Mode, cpus: u32, x2apic: bool) -> bool {
    let width = if x2apic && mode != Mode::Kernel {
        15
    } else {
        8
    };
    cpus <= width
}

/// Tests whose expectation depends on the LAPIC holding ISR until EOI; the
/// guest skips them when its boot probe says the host LAPIC does not.
pub const EOI_TIMING: &[&str] = &[
    "lapic_isr_set_in_handler_cleared_by_eoi",
    "ioapic_level_redelivered_after_eoi_while_asserted",
    "ioapic_handler_retargets_own_pin",
    "ioapic_handler_switches_own_pin_to_edge",
];

/// Tests that run under the ISR quirk but check their EOI-timing part only
/// where the LAPIC holds ISR until EOI (or with `strict=1`, where that part
/// may fail under KVM's LAPIC).
pub const EOI_TIMING_PART: &[&str] = &["retarget_level_remote_irr_redelivers_to_new_set"];

/// The guest's skip reason for [`EOI_TIMING`] when its probe fails.
pub const ISR_QUIRK: &str = "host LAPIC does not hold ISR until EOI (acks and EOIs at injection; boot probe), EOI semantics not observable";

/// Tests that need our IOAPIC (split and user modes: the VMM sees the
/// EOIs), with the guest's skip reason in kernel mode.
pub const NEEDS_OUR_IOAPIC: &[&str] = &[
    "hostile_storm_unclaimed_level_is_masked",
    "snapshot_storm_count_carried",
];
pub const OUR_IOAPIC_REASON: &str = "storm guard needs our IOAPIC (split/user)";

/// Needs the EOI register of an IOAPIC version 0x20.
pub const EOI_REGISTER: &str = "ioapic_eoi_register_clears_remote_irr";

/// Needs a processor a KAFFINITY names that is absent: skips from 64
/// processors on.
pub const ABSENT_CPUS: &str = "connect_absent_cpus_mask_invalid_parameter";

/// What the expectations need to know of a mode, beyond `Mode` itself.
pub trait ModeFacts {
    /// KVM's IOAPIC version is 0x11, ours 0x20.
    fn ioapic_version(self) -> &'static str;
}

impl ModeFacts for Mode {
    fn ioapic_version(self) -> &'static str {
        if self.our_ioapic() { "0x20" } else { "0x11" }
    }
}

/// What one run must report.
#[derive(Debug, PartialEq, Eq)]
pub struct Expected {
    pub ok: BTreeSet<String>,
    pub skip: BTreeMap<String, String>,
}

/// The expected result of the suite in `mode` with `cpus` vCPUs (x2APIC
/// or not), run without `--snapshot`: the `snapshot_` tests skip
/// ([`SNAPSHOT_DISABLED`]). The guest checks the ISR probe before the CPU
/// count, the CPU count before the domains.
pub fn expected(mode: Mode, cpus: u32, x2apic: bool) -> Expected {
    expected_snapshots(mode, cpus, x2apic, false)
}

/// [`expected`] for a run that takes snapshots (`--snapshot PATH`, as a
/// chain's links do): the `snapshot_` tests run (each takes one snapshot
/// of its own), but where they need more CPUs or our IOAPIC.
pub fn expected_with_snapshots(mode: Mode, cpus: u32, x2apic: bool) -> Expected {
    expected_snapshots(mode, cpus, x2apic, true)
}

fn expected_snapshots(mode: Mode, cpus: u32, x2apic: bool, snapshots: bool) -> Expected {
    let mut ok = BTreeSet::new();
    let mut skip = BTreeMap::new();
    for &name in SUITE {
        let needs = NEEDS_CPUS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(1, |&(_, c)| c);
        let reason = if mode.kvm_lapic() && EOI_TIMING.contains(&name) {
            Some(ISR_QUIRK.to_string())
        } else if cpus < needs {
            Some(format!("needs {needs} CPUs, {cpus} online"))
        } else if !snapshots && name.starts_with("snapshot_") {
            Some(SNAPSHOT_DISABLED.to_string())
        } else if TWO_DOMAINS.contains(&name) && one_domain(mode, cpus, x2apic) {
            Some(format!(
                "every processor of group 0 is in processor 1's logical domain ({cpus} processors)"
            ))
        } else if name == ABSENT_CPUS && cpus >= 64 {
            Some("all 64 processors a KAFFINITY names are online".to_string())
        } else if mode == Mode::Kernel && name == EOI_REGISTER {
            Some("IOAPIC version 0x11 has no EOI register".to_string())
        } else if mode == Mode::Kernel && NEEDS_OUR_IOAPIC.contains(&name) {
            Some(OUR_IOAPIC_REASON.to_string())
        } else {
            None
        };
        match reason {
            Some(r) => {
                skip.insert(name.to_string(), r);
            }
            None => {
                ok.insert(name.to_string());
            }
        }
    }
    Expected { ok, skip }
}

/// What one run reported.
#[derive(Debug, Default)]
pub struct Reported {
    pub ok: BTreeSet<String>,
    pub skip: BTreeMap<String, String>,
    pub fail: BTreeMap<String, String>,
    pub banner: String,
    pub summary: (usize, usize),
}

pub fn parse(r: &Run) -> Reported {
    let mut rep = Reported::default();
    for line in r.stdout.lines() {
        if let Some(name) = line.strip_prefix("ok ") {
            rep.ok.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("skip ") {
            let (name, why) = rest.split_once(": ").unwrap_or((rest, ""));
            rep.skip.insert(name.to_string(), why.to_string());
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            let (name, why) = rest.split_once(": ").unwrap_or((rest, ""));
            rep.fail.insert(name.to_string(), why.to_string());
        } else if line.starts_with("# guest-kernel:") {
            rep.banner = line.to_string();
        } else if let Some((p, f)) = line.split_once(" passed, ")
            && let (Ok(p), Ok(f)) = (p.parse(), f.trim_end_matches(" failed").parse())
        {
            rep.summary = (p, f);
        }
    }
    rep
}

/// The complete result: exactly the expected passes and skips (with their
/// reasons), no failure.
pub fn check_exact(rep: &Reported, want: &Expected, r: &Run) {
    assert!(
        rep.fail.is_empty(),
        "guest tests failed: {:#?}\n{}",
        rep.fail,
        r.stdout
    );
    let unknown: Vec<&String> = rep
        .ok
        .iter()
        .chain(rep.skip.keys())
        .filter(|n| !SUITE.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "guest tests not in SUITE (added or renamed? update tests/common/suite.rs): {unknown:?}"
    );
    let missing: Vec<&String> = want.ok.difference(&rep.ok).collect();
    let extra: Vec<&String> = rep.ok.difference(&want.ok).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "passing set differs: expected but not ok {missing:?}, ok but not expected {extra:?}\n{}",
        r.stdout
    );
    assert_eq!(rep.skip, want.skip, "skips differ\n{}", r.stdout);
}
