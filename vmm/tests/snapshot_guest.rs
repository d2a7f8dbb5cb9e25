//! The guest's `snapshot_` tests (guest-tests/kernel/src/tests/snapshot.rs),
//! each in a VM that is saved and resumed in a new process: boot with
//! `--snapshot PATH --snapshot-then exit --tests NAME` (the guest asks for
//! the snapshot at the test's hard moment and the VMM exits with status
//! 10), then `vmm --restore PATH` (optionally `--irqchip` another mode),
//! which must finish the test: `ok NAME`, `1 passed, 0 failed`, exit 0,
//! and the guest's note that it was restored once.
//!
//! In every mode with 4 vCPUs (`kernel`, `split`, `user`), and across
//! modes: kernel to user, split to user, user to split (with x2APIC, and
//! again with `--x2apic off`).
//!
//! One exception, derived from the mode the snapshot is taken in:
//! `snapshot_storm_count_carried` needs our IOAPIC's storm guard, so in
//! kernel mode it skips before any snapshot (as
//! `hostile_storm_unclaimed_level_is_masked` does): that run must exit 0
//! with that skip and `0 passed, 0 failed`, and leave no snapshot file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use irqchip_kvm::Mode;
use std::sync::{Mutex, PoisonError};

use common::suite::snapshot_tests;
use common::{Run, require_kvm, run_vmm_args, scratch};

/// The VMM's exit status after a snapshot with `--snapshot-then exit`.
const EXIT_SNAPSHOT: i32 = 10;

/// The guest's skip reason for the storm test in kernel mode.
const STORM: &str = "snapshot_storm_count_carried";
const STORM_KERNEL_SKIP: &str = "storm guard needs our IOAPIC (split/user)";

/// One VM at a time (the guest tests have time budgets; see
/// tests/guest_suite.rs).
static ONE_VM: Mutex<()> = Mutex::new(());

/// What a guest run printed.
#[derive(Debug, Default)]
struct Results {
    ok: Vec<String>,
    fail: Vec<String>,
    skip: Vec<String>,
    summary: Option<(usize, usize)>,
}

fn parse(r: &Run) -> Results {
    let mut out = Results::default();
    for line in r.stdout.lines() {
        if let Some(name) = line.strip_prefix("ok ") {
            out.ok.push(name.to_string());
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            out.fail.push(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("skip ") {
            out.skip.push(rest.to_string());
        } else if let Some((p, f)) = line.split_once(" passed, ")
            && let (Ok(p), Ok(f)) = (p.parse(), f.trim_end_matches(" failed").parse())
        {
            out.summary = Some((p, f));
        }
    }
    out
}

fn show(what: &str, r: &Run) -> String {
    format!(
        "--- {what}: status {:?}\n{}--- stderr\n{}",
        r.status, r.stdout, r.stderr
    )
}

/// Runs guest test `name`: snapshot in `from`, restore in `to` (the
/// snapshot's own mode when `None`). Returns a description of what went
/// wrong, if anything.
fn snapshot_then_restore(
    name: &str,
    from: Mode,
    to: Option<Mode>,
    x2apic: bool,
) -> Result<(), String> {
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let snap = scratch("guest.snap");
    let path = snap.to_str().unwrap();
    let mut boot = vec![
        "--irqchip",
        from.name(),
        "--cpus",
        "4",
        "--timeout",
        "200",
        "--quiet-stats",
        "--tests",
        name,
        "--snapshot",
        path,
        "--snapshot-then",
        "exit",
    ];
    if !x2apic {
        boot.extend(["--x2apic", "off"]);
    }
    let first = run_vmm_args(&boot);
    let got = parse(&first);
    if from == Mode::Kernel && name == STORM {
        let want_skip = format!("{name}: {STORM_KERNEL_SKIP}");
        if first.status != Some(0)
            || got.skip != [want_skip]
            || !got.ok.is_empty()
            || got.summary != Some((0, 0))
            || snap.exists()
        {
            return Err(format!(
                "expected the kernel-mode skip, no snapshot\n{}",
                show("boot", &first)
            ));
        }
        return Ok(());
    }
    if first.status != Some(EXIT_SNAPSHOT)
        || !got.ok.is_empty()
        || !got.fail.is_empty()
        || !got.skip.is_empty()
        || !snap.exists()
    {
        return Err(format!(
            "expected exit status {EXIT_SNAPSHOT} at the test's snapshot, with no result yet\n{}",
            show("boot", &first)
        ));
    }
    let mut args = vec!["--restore", path, "--timeout", "200", "--quiet-stats"];
    if let Some(to) = to {
        args.extend(["--irqchip", to.name()]);
    }
    let second = run_vmm_args(&args);
    let got = parse(&second);
    let restored = format!("# {name}: snapshot taken, restored (1 restores)");
    if second.status != Some(0)
        || got.ok != [name]
        || !got.fail.is_empty()
        || !got.skip.is_empty()
        || got.summary != Some((1, 0))
        || !second.stdout.lines().any(|l| l == restored)
    {
        return Err(format!(
            "expected `ok {name}`, `1 passed, 0 failed` and `{restored}`\n{}",
            show("restore", &second)
        ));
    }
    Ok(())
}

/// Every snapshot test, snapshot in `from` and restored in `to` (x2APIC
/// offered or not); fails with every test's failure at once.
fn all(from: Mode, to: Option<Mode>, x2apic: bool) {
    if !require_kvm() {
        return;
    }
    let mut failures = Vec::new();
    let mut ran = 0;
    for name in snapshot_tests() {
        ran += 1;
        if let Err(e) = snapshot_then_restore(name, from, to, x2apic) {
            failures.push(format!("=== {name}: {e}"));
        }
    }
    assert_eq!(ran, 8, "the suite's snapshot tests");
    assert!(
        failures.is_empty(),
        "{} of {ran} snapshot tests failed ({} -> {}{}):\n{}",
        failures.len(),
        from.name(),
        to.unwrap_or(from).name(),
        if x2apic { "" } else { ", xAPIC" },
        failures.join("\n")
    );
}

#[test]
fn kernel_mode_snapshot_tests() {
    all(Mode::Kernel, None, true);
}

#[test]
fn split_mode_snapshot_tests() {
    all(Mode::Split, None, true);
}

#[test]
fn user_mode_snapshot_tests() {
    all(Mode::User, None, true);
}

#[test]
fn kernel_to_user_snapshot_tests() {
    all(Mode::Kernel, Some(Mode::User), true);
}

#[test]
fn split_to_user_snapshot_tests() {
    all(Mode::Split, Some(Mode::User), true);
}

#[test]
fn user_to_split_snapshot_tests() {
    all(Mode::User, Some(Mode::Split), true);
}

// The cross-mode restores with x2APIC off (the LAPIC's ID and LDR are
// converted in their xAPIC form).

#[test]
fn kernel_to_user_snapshot_tests_xapic() {
    all(Mode::Kernel, Some(Mode::User), false);
}

#[test]
fn split_to_user_snapshot_tests_xapic() {
    all(Mode::Split, Some(Mode::User), false);
}

#[test]
fn user_to_split_snapshot_tests_xapic() {
    all(Mode::User, Some(Mode::Split), false);
}
