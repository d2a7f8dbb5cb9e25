//! The guest's `bench_` tests in each `--irqchip` mode (2 vCPUs): every
//! benchmark passes and prints one well-formed line
//! (`# bench NAME: N samples, median X ns, p99 Y ns`) with a positive
//! median no larger than its p99; and a run without a `bench` filter
//! entry times nothing. Speeds are not asserted here (they belong to
//! `resources/bench/compare` and `docs/bench.md`).
//!
//! Needs /dev/kvm (fails with a clear message unless VMM_SKIP_KVM_TESTS=1).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Mutex, PoisonError};

use common::{require_kvm, run_vmm_args, run_vmm_ok};

/// Every benchmark and its sample count.
const BENCHES: &[(&str, u64)] = &[
    ("bench_edge_roundtrip", 400),
    ("bench_level_roundtrip", 400),
    ("bench_self_ipi", 400),
    ("bench_ipi_pingpong", 400),
    ("bench_lapic_timer_oneshot_latency", 400),
    ("bench_tpr_write", 400),
    ("bench_pv_connect_disconnect", 200),
    ("bench_msi_roundtrip", 400),
];

/// One VM at a time (2 host cores).
static ONE_VM: Mutex<()> = Mutex::new(());

/// `(name, samples, median, p99)` of a bench line.
fn parse(line: &str) -> Option<(&str, u64, u64, u64)> {
    let rest = line.strip_prefix("# bench ")?;
    let (name, rest) = rest.split_once(": ")?;
    // The numbers, without the 99 of "p99".
    let nums: Vec<u64> = rest
        .replace("p99", "p")
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let expected = format!(
        "{} samples, median {} ns, p99 {} ns",
        nums.first()?,
        nums.get(1)?,
        nums.get(2)?
    );
    (rest == expected).then(|| (name, nums[0], nums[1], nums[2]))
}

fn check_mode(mode: &str) {
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let run = run_vmm_ok(
        mode,
        &[
            "--irqchip",
            mode,
            "--cpus",
            "2",
            "--tests",
            "bench_",
            "--timeout",
            "300",
        ],
    );
    let lines: Vec<_> = run
        .stdout
        .lines()
        .filter_map(|l| parse(l.trim_end()))
        .collect();
    for &(name, samples) in BENCHES {
        let ok = format!("ok {name}");
        assert!(
            run.stdout.lines().any(|l| l.trim_end() == ok),
            "{mode}: {name} did not pass:\n{}",
            run.stdout
        );
        let found: Vec<_> = lines.iter().filter(|l| l.0 == name).collect();
        assert_eq!(
            found.len(),
            1,
            "{mode}: {name}: one line expected:\n{}",
            run.stdout
        );
        let (_, n, median, p99) = *found[0];
        assert_eq!(n, samples, "{mode}: {name}");
        assert!(
            median > 0 && median <= p99,
            "{mode}: {name}: median {median}, p99 {p99}"
        );
    }
    assert_eq!(lines.len(), BENCHES.len(), "{mode}: {}", run.stdout);
    assert!(
        run.stdout
            .contains(&format!("{} passed, 0 failed", BENCHES.len()))
    );
}

#[test]
fn bench_kernel_mode_every_benchmark_reports() {
    if require_kvm() {
        check_mode("kernel");
    }
}

#[test]
fn bench_split_mode_every_benchmark_reports() {
    if require_kvm() {
        check_mode("split");
    }
}

#[test]
fn bench_user_mode_every_benchmark_reports() {
    if require_kvm() {
        check_mode("user");
    }
}

#[test]
fn bench_tests_run_only_when_a_filter_entry_names_bench() {
    if !require_kvm() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    // `tpr_` matches bench_tpr_write's name, but does not name `bench`.
    let run = run_vmm_args(&["--irqchip", "kernel", "--cpus", "1", "--tests", "tpr_cr8"]);
    assert_eq!(run.status, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("ok tpr_cr8_mirrors_lapic_tpr"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("bench"), "{}", run.stdout);
}
