//! Snapshot and restore cost, with the guest suite's memory use: the
//! embedded suite (4 vCPUs) with `snapshot=each` and `--snapshot-then
//! continue`, so the VMM takes a snapshot between every two tests of one
//! uninterrupted run, at 128 MiB and 1 GiB of guest memory in each mode.
//! Per configuration:
//!
//! - the file size (min, median, max over the run's snapshots): memory is
//!   sparse, so it follows the pages the guest touched, not its size;
//! - the VMM's pause (`vmm: snapshot:` line: from the request to the file
//!   written and the vCPUs released), median and max;
//! - the pause the guest sees (`# snapshot N: paused U us`: its TSC across
//!   the request), median and max;
//! - the restore of the run's last snapshot in a fresh process, best and
//!   median of `REPEATS` (`vmm: restore:` line: from the start of the run
//!   to the vCPUs about to resume: reading and checking the file, the VM,
//!   memory, vCPU and chip state), and the process's wall time (which adds
//!   the last test and teardown).
//!
//! `cargo bench -p vmm --bench snapshot [-- REPEATS [MODE...]]` (default
//! 5 restores, every mode). Needs /dev/kvm (skipped with
//! VMM_SKIP_KVM_TESTS=1). The figures are in vmm/README.md ("Benchmark:
//! snapshot and restore").

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{require_kvm, run_vmm_args, scratch};

const MEMORY_MIB: [u32; 2] = [128, 1024];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// `(bytes, ms)` of a `vmm: snapshot: PATH (N bytes), vCPUs paused X ms`
/// line.
fn snapshot_line(line: &str) -> Option<(f64, f64)> {
    let rest = line.strip_prefix("vmm: snapshot: ")?;
    let (_, rest) = rest.split_once(" (")?;
    let (bytes, rest) = rest.split_once(" bytes), vCPUs paused ")?;
    let ms = rest.strip_suffix(" ms")?;
    Some((bytes.parse().ok()?, ms.parse().ok()?))
}

/// Microseconds of a `# snapshot N: paused U us` line.
fn guest_line(line: &str) -> Option<f64> {
    let rest = line.strip_prefix("# snapshot ")?;
    let (_, rest) = rest.split_once(": paused ")?;
    rest.strip_suffix(" us")?.parse().ok()
}

/// Milliseconds of a `vmm: restore: ... ready to resume in X ms` line.
fn restore_line(line: &str) -> Option<f64> {
    let rest = line.strip_prefix("vmm: restore: ")?;
    let (_, ms) = rest.split_once(" ready to resume in ")?;
    ms.strip_suffix(" ms")?.parse().ok()
}

fn bench(mode: &str, mib: u32, repeats: usize) {
    let snap = scratch("bench.snap");
    let memory = mib.to_string();
    let r = run_vmm_args(&[
        "--irqchip",
        mode,
        "--cpus",
        "4",
        "--memory",
        &memory,
        "--cmdline",
        "snapshot=each",
        "--snapshot",
        snap.to_str().unwrap(),
        "--snapshot-then",
        "continue",
        "--timeout",
        "600",
        "--quiet-stats",
    ]);
    assert_eq!(r.status, Some(0), "{}\n{}", r.stdout, r.stderr);
    let (mut sizes, mut pauses): (Vec<f64>, Vec<f64>) =
        r.stderr.lines().filter_map(snapshot_line).unzip();
    let mut seen: Vec<f64> = r.stdout.lines().filter_map(guest_line).collect();
    assert!(!sizes.is_empty(), "no snapshot taken:\n{}", r.stderr);
    let mut ready = Vec::new();
    let mut wall = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        let again = run_vmm_args(&[
            "--restore",
            snap.to_str().unwrap(),
            "--timeout",
            "120",
            "--quiet-stats",
        ]);
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(again.status, Some(0), "{}\n{}", again.stdout, again.stderr);
        ready.extend(again.stderr.lines().filter_map(restore_line));
    }
    let count = sizes.len();
    let kib = |b: f64| b / 1024.0;
    let (size_min, size_max) = (
        kib(sizes.iter().copied().fold(f64::INFINITY, f64::min)),
        kib(max(&sizes)),
    );
    let size_median = kib(median(&mut sizes));
    let pause_max = max(&pauses);
    let seen_max = max(&seen) / 1e3;
    let ready_best = ready.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "| `{mode}` | {mib} MiB | {count} | {size_min:.0} / {size_median:.0} / {size_max:.0} KiB | {:.1} / {pause_max:.1} ms | {:.1} / {seen_max:.1} ms | {ready_best:.1} / {:.1} ms | {:.0} ms |",
        median(&mut pauses),
        median(&mut seen) / 1e3,
        median(&mut ready),
        median(&mut wall),
    );
}

fn main() {
    if !require_kvm() {
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let repeats = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let named: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let modes: Vec<&str> = ["kernel", "split", "user"]
        .into_iter()
        .filter(|m| named.is_empty() || named.contains(m))
        .collect();
    println!(
        "| mode | memory | snapshots | file size min / median / max | VMM pause median / max | guest-seen pause median / max | restore ready best / median | restore process wall (median) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for mib in MEMORY_MIB {
        for mode in &modes {
            bench(mode, mib, repeats);
        }
    }
}
