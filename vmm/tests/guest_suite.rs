//! Boots the embedded guest kernel (guest-tests/) in every `--irqchip`
//! mode and checks its COMPLETE result by test name: exactly which tests
//! pass, exactly which skip and why, and that none fails.
//!
//! The three modes are each other's oracle: the passing set is the same in
//! all of them except for the documented causes below, all derived from one
//! list ([`expected`]):
//!
//! - **ISR quirk** (kernel and split: KVM's local APIC). On some hosts'
//!   KVM (the README's "Host KVM quirks") the in-kernel LAPIC acknowledges
//!   and EOIs an interrupt at injection (ISR and PPR read 0 inside
//!   handlers). The guest probes this at boot and
//!   skips the 4 tests whose expectation depends on EOI timing
//!   ([`EOI_TIMING`]). Evidence that this is the host and not a hidden
//!   failure: with `strict=1` the guest runs them anyway, and in kernel mode
//!   exactly those 4 fail ([`kernel_mode_strict_fails_exactly_the_eoi_timing_tests`]);
//!   in split mode they fail too, the ISR test among them
//!   ([`split_mode_strict_shows_the_same_lapic_quirk`]). With our LAPIC
//!   (user mode) the probe says "yes" and all 4 pass.
//! - **IOAPIC version** (kernel: KVM's IOAPIC is an 82093AA, version 0x11,
//!   without the EOI register). `ioapic_eoi_register_clears_remote_irr`
//!   skips there; our IOAPIC (split, user) is version 0x20 and runs it.
//! - **Storm guard** (kernel: KVM handles EOIs, the VMM never sees a storm).
//!   The tests in [`NEEDS_OUR_IOAPIC`] skip there.
//!
//! With 1 vCPU the multi-processor tests skip ("needs N CPUs") in every mode.
//! The `snapshot_` tests skip in every run here (no `--snapshot`:
//! `SNAPSHOT_DISABLED`); `tests/snapshot_guest.rs` and the chains of
//! `tests/snapshot.rs` run them.
//! Two tests need two logical domains ([`TWO_DOMAINS`]: processors no one
//! destination names together), which 4 vCPUs do not have; the group-1
//! test needs 65 vCPUs; from 64 vCPUs on no KAFFINITY names an absent
//! processor ([`ABSENT_CPUS`]).
//!
//! At scale (issue 10): the affinity tests (`affinity_`, `scale_`,
//! `retarget_`) at 16 vCPUs with x2APIC and with xAPIC (the cluster model)
//! and at 64, the group tests at 128, in every mode, and the whole suite
//! at 255 vCPUs in user mode.
//!
//! The names are the guest suite's (guest-tests/kernel/src/tests/). When a
//! guest test is added or renamed, update `SUITE` in `tests/common/suite.rs` (and the lists here
//! if it needs more CPUs or EOI timing): an unknown name fails these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use irqchip_kvm::Mode;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use common::expect::*;
use common::suite::SUITE;
use common::{Run, require_kvm, run_vmm_args, scratch};

/// The affinity tests, as `--tests` name parts.
const AFFINITY: &[&str] = &["affinity_", "scale_", "retarget_"];

/// One suite VM at a time: a 4-vCPU guest may already time-share the
/// host's cores, and some guest tests have time budgets (e.g.
/// `synchronize_execution_excludes_isr`: 200 level interrupts against a
/// spin lock within 3 s) that concurrent guests can exhaust (the README's
/// "Host KVM quirks" has what was seen).
static ONE_VM: Mutex<()> = Mutex::new(());

/// Boots the embedded suite; returns the run, its parse and the JUnit XML.
fn boot(mode: Mode, cpus: u32, extra: &[&str], tag: &str) -> (Run, Reported, String) {
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let junit = scratch(&format!("suite-{tag}.xml"));
    let cpus = cpus.to_string();
    let mut args = vec![
        "--irqchip",
        mode.name(),
        "--cpus",
        &cpus,
        "--timeout",
        "300",
        "--junit",
        junit.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let r = run_vmm_args(&args);
    let xml = std::fs::read_to_string(&junit).unwrap_or_default();
    let rep = parse(&r);
    (r, rep, xml)
}

/// The run ended normally, and its banner, summary, exit status and JUnit
/// report agree with what it printed.
fn check_consistent(r: &Run, rep: &Reported, xml: &str, mode: Mode, cpus: u32, x2apic: bool) {
    let ctx = || format!("{}\n{}", r.stdout, r.stderr);
    assert!(
        rep.banner
            .contains(&format!("{cpus} of {cpus} cpus online")),
        "banner: {}\n{}",
        rep.banner,
        ctx()
    );
    // The xAPIC cluster model above 8 processors.
    let apic = match (x2apic, cpus > 8) {
        (true, _) => "x2apic mode",
        (false, false) => "xapic mode",
        (false, true) => "xapic cluster mode",
    };
    let isr = if mode.kvm_lapic() {
        "ISR held until EOI: NO"
    } else {
        "ISR held until EOI: yes"
    };
    let ioapic = format!("ioapic version {}", mode.ioapic_version());
    for want in [apic, isr, &ioapic] {
        assert!(
            rep.banner.contains(want),
            "banner lacks `{want}`: {}",
            rep.banner
        );
    }
    assert_eq!(
        rep.summary,
        (rep.ok.len(), rep.fail.len()),
        "summary line disagrees with the ok/FAIL lines\n{}",
        ctx()
    );
    assert_eq!(
        r.status,
        Some(i32::from(!rep.fail.is_empty())),
        "exit status\n{}",
        ctx()
    );
    assert!(
        xml.contains(&format!("failures=\"{}\" errors=\"0\"", rep.fail.len())),
        "JUnit disagrees with the run:\n{xml}"
    );
    for name in &rep.ok {
        assert!(
            xml.contains(&format!("<testcase name=\"{name}\"")),
            "{name} missing from the JUnit report"
        );
    }
}

fn suite(mode: Mode, cpus: u32, x2apic: bool) {
    suite_of(mode, cpus, x2apic, &[]);
}

/// The tests of the suite whose names contain one of `parts` (the guest's
/// `--tests` filter; all when empty), checked as [`suite`] does.
fn suite_of(mode: Mode, cpus: u32, x2apic: bool, parts: &[&str]) {
    if !require_kvm() {
        return;
    }
    let joined = parts.join(",");
    let mut extra: Vec<&str> = Vec::new();
    if !x2apic {
        extra.extend(["--x2apic", "off"]);
    }
    if !parts.is_empty() {
        extra.extend(["--tests", &joined]);
    }
    let tag = format!(
        "{}-{cpus}-{}{}",
        mode.name(),
        if x2apic { "x2" } else { "x" },
        if parts.is_empty() { "" } else { "-some" }
    );
    let (r, rep, xml) = boot(mode, cpus, &extra, &tag);
    check_consistent(&r, &rep, &xml, mode, cpus, x2apic);
    let mut want = expected(mode, cpus, x2apic);
    if !parts.is_empty() {
        let named = |n: &String| parts.iter().any(|p| n.contains(p));
        want.ok.retain(named);
        want.skip.retain(|n, _| named(n));
        assert!(!want.ok.is_empty(), "no test named by {parts:?}");
    }
    check_exact(&rep, &want, &r);
}

#[test]
fn kernel_mode_one_vcpu() {
    suite(Mode::Kernel, 1, true);
}

#[test]
fn kernel_mode_four_vcpus() {
    suite(Mode::Kernel, 4, true);
}

#[test]
fn kernel_mode_four_vcpus_xapic() {
    suite(Mode::Kernel, 4, false);
}

#[test]
fn split_mode_one_vcpu() {
    suite(Mode::Split, 1, true);
}

#[test]
fn split_mode_four_vcpus() {
    suite(Mode::Split, 4, true);
}

#[test]
fn split_mode_four_vcpus_xapic() {
    suite(Mode::Split, 4, false);
}

#[test]
fn user_mode_one_vcpu() {
    suite(Mode::User, 1, true);
}

#[test]
fn user_mode_four_vcpus() {
    suite(Mode::User, 4, true);
}

#[test]
fn user_mode_four_vcpus_xapic() {
    suite(Mode::User, 4, false);
}

// Affinity at scale (issue 10): the affinity tests at 16 vCPUs with x2APIC
// and with xAPIC (the cluster model), at 64, the group tests at 128 (group
// 1 exists), and the whole suite at 255 in user mode. The README's "Scale"
// section has their times.

#[test]
fn kernel_mode_16_vcpus_affinity() {
    suite_of(Mode::Kernel, 16, true, AFFINITY);
}

#[test]
fn split_mode_16_vcpus_affinity() {
    suite_of(Mode::Split, 16, true, AFFINITY);
}

#[test]
fn user_mode_16_vcpus_affinity() {
    suite_of(Mode::User, 16, true, AFFINITY);
}

#[test]
fn kernel_mode_16_vcpus_xapic_affinity() {
    suite_of(Mode::Kernel, 16, false, AFFINITY);
}

#[test]
fn split_mode_16_vcpus_xapic_affinity() {
    suite_of(Mode::Split, 16, false, AFFINITY);
}

#[test]
fn user_mode_16_vcpus_xapic_affinity() {
    suite_of(Mode::User, 16, false, AFFINITY);
}

#[test]
fn kernel_mode_64_vcpus_affinity() {
    suite_of(Mode::Kernel, 64, true, AFFINITY);
}

#[test]
fn split_mode_64_vcpus_affinity() {
    suite_of(Mode::Split, 64, true, AFFINITY);
}

#[test]
fn user_mode_64_vcpus_affinity() {
    suite_of(Mode::User, 64, true, AFFINITY);
}

#[test]
fn kernel_mode_128_vcpus_groups() {
    suite_of(Mode::Kernel, 128, true, &["scale_group_"]);
}

#[test]
fn split_mode_128_vcpus_groups() {
    suite_of(Mode::Split, 128, true, &["scale_group_"]);
}

#[test]
fn user_mode_128_vcpus_groups() {
    suite_of(Mode::User, 128, true, &["scale_group_"]);
}

#[test]
fn user_mode_255_vcpus_whole_suite() {
    suite(Mode::User, 255, true);
}

/// The evidence for the ISR quirk: told to ignore its probe, the guest
/// fails exactly the EOI-timing tests under KVM's in-kernel irqchip, and
/// nothing else changes. The EOI-timing part of [`EOI_TIMING_PART`] may
/// pass or fail: under the quirk the level pin's next delivery may or may
/// not be pending before the move (the guest test's documentation), and
/// this host has shown both.
#[test]
fn kernel_mode_strict_fails_exactly_the_eoi_timing_tests() {
    if !require_kvm() {
        return;
    }
    let (r, rep, xml) = boot(Mode::Kernel, 4, &["--cmdline", "strict=1"], "strict-kernel");
    check_consistent(&r, &rep, &xml, Mode::Kernel, 4, true);
    let failed: BTreeSet<&str> = rep
        .fail
        .keys()
        .map(String::as_str)
        .filter(|n| !EOI_TIMING_PART.contains(n))
        .collect();
    let timing: BTreeSet<&str> = EOI_TIMING.iter().copied().collect();
    assert_eq!(failed, timing, "{}", r.stdout);
    assert!(
        rep.fail["lapic_isr_set_in_handler_cleared_by_eoi"].contains("not set in its handler"),
        "{:?}",
        rep.fail
    );
    let mut normal = expected(Mode::Kernel, 4, true);
    normal.ok.retain(|n| !EOI_TIMING_PART.contains(&n.as_str()));
    let mut ok = rep.ok.clone();
    ok.retain(|n| !EOI_TIMING_PART.contains(&n.as_str()));
    assert_eq!(ok, normal.ok, "{}", r.stdout);
    for name in EOI_TIMING_PART {
        assert!(
            rep.ok.contains(*name) || rep.fail.contains_key(*name),
            "{name} neither passed nor failed\n{}",
            r.stdout
        );
    }
    // The usual skips but the EOI-timing ones (which ran, and failed).
    let skips: BTreeSet<&str> = rep.skip.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = normal
        .skip
        .keys()
        .map(String::as_str)
        .filter(|n| !EOI_TIMING.contains(n))
        .collect();
    assert!(want.contains(EOI_REGISTER), "{want:?}");
    assert_eq!(skips, want, "{}", r.stdout);
}

/// Split mode has KVM's LAPIC too: with `strict=1` the ISR test fails with
/// the same observation (ISR clear inside the handler), every failure is an
/// EOI-timing test ([`EOI_TIMING`], [`EOI_TIMING_PART`]), and every other
/// test passes as usual. (How many of the others fail depends on when the
/// EOI exit reaches our IOAPIC.)
#[test]
fn split_mode_strict_shows_the_same_lapic_quirk() {
    if !require_kvm() {
        return;
    }
    let (r, rep, xml) = boot(Mode::Split, 4, &["--cmdline", "strict=1"], "strict-split");
    check_consistent(&r, &rep, &xml, Mode::Split, 4, true);
    assert!(
        rep.fail
            .get("lapic_isr_set_in_handler_cleared_by_eoi")
            .is_some_and(|why| why.contains("not set in its handler")),
        "{}",
        r.stdout
    );
    let timing =
        |n: &String| EOI_TIMING.contains(&n.as_str()) || EOI_TIMING_PART.contains(&n.as_str());
    assert!(rep.fail.keys().all(timing), "{:?}", rep.fail);
    let mut normal = expected(Mode::Split, 4, true);
    normal.ok.retain(|n| !timing(n));
    assert!(normal.ok.is_subset(&rep.ok), "{}", r.stdout);
    // The usual skips but the EOI-timing ones.
    let usual: BTreeMap<String, String> = normal
        .skip
        .into_iter()
        .filter(|(n, _)| !EOI_TIMING.contains(&n.as_str()))
        .collect();
    assert_eq!(rep.skip, usual, "{}", r.stdout);
}

/// The three modes' expectations differ only by the two documented causes.
#[test]
fn expected_results_differ_between_modes_only_by_documented_causes() {
    for cpus in [1, 4] {
        let user = expected(Mode::User, cpus, true);
        let split = expected(Mode::Split, cpus, true);
        let kernel = expected(Mode::Kernel, cpus, true);
        let timing: BTreeSet<String> = EOI_TIMING.iter().map(|s| s.to_string()).collect();
        let only_user: BTreeSet<String> = user.ok.difference(&split.ok).cloned().collect();
        assert!(only_user.is_subset(&timing), "{only_user:?}");
        assert!(split.ok.is_subset(&user.ok));
        let only_split: BTreeSet<&str> = split
            .ok
            .difference(&kernel.ok)
            .map(String::as_str)
            .collect();
        // Without --snapshot the snapshot_ tests skip in every mode.
        let ours: BTreeSet<&str> = [EOI_REGISTER]
            .into_iter()
            .chain(NEEDS_OUR_IOAPIC.iter().copied())
            .filter(|n| !n.starts_with("snapshot_"))
            .collect();
        assert_eq!(only_split, ours);
        assert!(kernel.ok.is_subset(&split.ok));
    }
    // With 4 vCPUs every test passes in user mode but those that need more
    // processors or two logical domains, and the snapshot_ tests, which
    // skip without --snapshot.
    let four = expected(Mode::User, 4, true);
    let skipped: BTreeSet<&str> = four.skip.keys().map(String::as_str).collect();
    let wider: BTreeSet<&str> = NEEDS_CPUS
        .iter()
        .filter(|(_, n)| *n > 4)
        .map(|(name, _)| *name)
        .chain(TWO_DOMAINS.iter().copied())
        .chain(SUITE.iter().copied().filter(|n| n.starts_with("snapshot_")))
        .collect();
    assert_eq!(skipped, wider);
    assert_eq!(four.ok.len() + four.skip.len(), SUITE.len());
}

#[test]
fn dump_guest_writes_the_embedded_multiboot_image() {
    let path = scratch("dumped.elf");
    let r = run_vmm_args(&["--dump-guest", path.to_str().unwrap()]);
    assert_eq!(r.status, Some(0), "{r:?}");
    let img = std::fs::read(&path).unwrap();
    let magic = 0x1bad_b002u32.to_le_bytes();
    let window = &img[..img.len().min(8192)];
    assert!(
        window.windows(4).any(|w| w == magic),
        "no Multiboot header in the first 8 KiB of the dumped image"
    );
}
