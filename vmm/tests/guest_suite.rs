//! Boots the embedded guest kernel (guest-tests/) in kernel mode with 1 and
//! 4 vCPUs and checks its results by name.
//!
//! The names are the guest suite's (guest-tests/kernel/src/tests/). Listed
//! here are the tests that must pass under KVM's in-kernel irqchip on any
//! host; tests the guest itself skips depending on the host (e.g. EOI
//! semantics when the host LAPIC does not hold ISR until EOI) are not
//! listed. When the guest renames a test, update the list.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Run, require_kvm, run_vmm_args, scratch};

/// Must pass with any number of vCPUs.
const ANY_CPUS: &[&str] = &[
    "lapic_mode_matches_cpuid",
    "lapic_version_register",
    "lapic_ids_match_cpuid_in_index_order",
    "lapic_svr_enabled_spurious_vector",
    "ipi_self_shorthand",
    "ipi_self_physical_id",
    "tpr_cr8_mirrors_lapic_tpr",
    "spinlock_serialises_all_cpus",
    "timer_oneshot_fires_once",
    "timer_periodic_fires_repeatedly",
    "ioapic_version_read_only_24_pins",
    "ioapic_rte_round_trip_read_only_bits",
    "ioapic_edge_delivers_once",
    "ioapic_edge_each_pulse_delivered",
    "ioapic_masked_edge_is_lost",
];

/// Must pass with 4 vCPUs (they skip with 1).
const SMP: &[&str] = &[
    "ipi_each_cpu_physical",
    "ipi_broadcast_all_excluding_self",
    "ipi_from_ap_to_bsp",
    "ipi_between_aps",
    "ipi_nmi_to_each_ap",
    "timer_oneshot_on_each_ap",
    "ioapic_physical_destination_cpu1",
    "ioapic_logical_flat_destination_set",
];

fn boot(cpus: &str, junit: &str) -> (Run, String) {
    let path = scratch(junit);
    let r = run_vmm_args(&[
        "--irqchip",
        "kernel",
        "--cpus",
        cpus,
        "--timeout",
        "300",
        "--junit",
        path.to_str().unwrap(),
    ]);
    let xml = std::fs::read_to_string(&path).unwrap_or_default();
    (r, xml)
}

/// The suite ran to its end, the VMM's exit status and JUnit report agree
/// with the guest's summary, and every listed test passed. Failures of
/// unlisted tests (e.g. ones the guest engineer is still writing) are
/// printed, not asserted: this test checks the VMM, the guest's own
/// suite checks itself.
fn check(r: &Run, xml: &str, must_pass: &[&str]) {
    let summary = r
        .stdout
        .lines()
        .find(|l| l.ends_with(" failed") && l.contains(" passed, "))
        .unwrap_or_else(|| panic!("no closing summary line:\n{}\n{}", r.stdout, r.stderr));
    let (passed, failed) = summary.split_once(" passed, ").unwrap();
    let passed: usize = passed.trim().parse().unwrap();
    let failed: usize = failed.trim_end_matches(" failed").parse().unwrap();
    let fail_lines: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL "))
        .collect();
    let ok_lines = r.stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!((ok_lines, fail_lines.len()), (passed, failed), "{summary}");
    assert_eq!(r.status, Some(i32::from(failed > 0)), "{}", r.stderr);
    assert!(
        xml.contains(&format!("failures=\"{failed}\" errors=\"0\"")),
        "JUnit disagrees with `{summary}`:\n{xml}"
    );
    for name in must_pass {
        assert!(
            r.stdout.lines().any(|l| l == format!("ok {name}")),
            "guest test {name} did not pass (renamed? see guest-tests/kernel/src/tests):\n{}",
            r.stdout
        );
        assert!(
            xml.contains(&format!("<testcase name=\"{name}\"")),
            "{name} missing from the JUnit report"
        );
    }
    if !fail_lines.is_empty() {
        eprintln!("note: unlisted guest tests failed: {fail_lines:#?}");
    }
}

#[test]
fn embedded_suite_passes_with_one_vcpu() {
    if !require_kvm() {
        return;
    }
    let (r, xml) = boot("1", "suite1.xml");
    check(&r, &xml, ANY_CPUS);
}

#[test]
fn embedded_suite_passes_with_four_vcpus() {
    if !require_kvm() {
        return;
    }
    let (r, xml) = boot("4", "suite4.xml");
    check(&r, &xml, &[ANY_CPUS, SMP].concat());
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
