//! The `minimal_vmm` example, run as a test: it boots the embedded guest
//! suite's raw-hardware tests (`ioapic_`, `lapic_`, `ipi_`, `tpr_`,
//! `timer_`) with 2 vCPUs in each irqchip mode, and every mode must report
//! `0 failed` and exit 0. Proof that a VMM other than `vmm` embeds the crate.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../examples/minimal_vmm.rs"]
mod example;

use irqchip_kvm::Mode;

fn boots_raw_suites_in(mode: Mode) {
    if !guest_image::require_kvm() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();

    let (code, out) = example::boot(&kvm, mode, guest_image::IMAGE, false).unwrap();

    let summary = out.lines().rev().find(|l| l.contains(" passed, "));
    let summary = summary.unwrap_or_else(|| panic!("{mode}: no summary line in:\n{out}"));
    assert!(summary.ends_with(" 0 failed"), "{mode}: {summary}\n{out}");
    let passed: u32 = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 40, "{mode}: only {passed} tests ran:\n{out}");
    assert!(!out.contains("FAIL "), "{mode}:\n{out}");
    assert_eq!(code, 0, "{mode}: exit code\n{out}");
}

#[test]
fn minimal_vmm_kernel_mode_passes_the_raw_suites() {
    boots_raw_suites_in(Mode::Kernel);
}

#[test]
fn minimal_vmm_split_mode_passes_the_raw_suites() {
    boots_raw_suites_in(Mode::Split);
}

#[test]
fn minimal_vmm_user_mode_passes_the_raw_suites() {
    boots_raw_suites_in(Mode::User);
}
