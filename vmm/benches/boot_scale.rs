//! Boot time against the vCPU count: the embedded guest suite booted with
//! 1, 16, 64, 128 and 255 vCPUs in each `--irqchip` mode, running one test
//! (`lapic_ids_match_cpuid_in_index_order`, which reads every processor's
//! APIC ID), timed from the host as the wall time of the whole run (VM and
//! vCPU creation, guest boot and processor bring-up, the test, teardown).
//! Also printed: the guest's own bring-up figures (the `# smp:` line: APs
//! that reported their APIC ID, then online) and a least-squares line per
//! mode, with each point's distance from it.
//!
//! `cargo bench -p vmm --bench boot_scale [-- REPEATS]` (best of REPEATS
//! runs per point, default 3). Needs /dev/kvm (skipped with
//! VMM_SKIP_KVM_TESTS=1). The README's "Scale" section has the figures.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::run_vmm_args;

const CPUS: [u32; 5] = [1, 16, 64, 128, 255];
const TEST: &str = "lapic_ids_match_cpuid_in_index_order";

/// Best of `reps` runs: the wall time and the guest's `# smp:` line.
fn best(mode: &str, cpus: u32, reps: usize) -> (Duration, String) {
    let n = cpus.to_string();
    let mut best: Option<(Duration, String)> = None;
    for _ in 0..reps {
        let t = Instant::now();
        let r = run_vmm_args(&[
            "--irqchip",
            mode,
            "--cpus",
            &n,
            "--tests",
            TEST,
            "--timeout",
            "120",
            "--quiet-stats",
        ]);
        let dt = t.elapsed();
        assert_eq!(r.status, Some(0), "{r:?}");
        assert!(
            r.stdout.contains(&format!("{cpus} of {cpus} cpus online")),
            "{}",
            r.stdout
        );
        let smp = r
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("# smp: "))
            .unwrap_or("no APs")
            .to_string();
        if best.as_ref().is_none_or(|(b, _)| dt < *b) {
            best = Some((dt, smp));
        }
    }
    best.unwrap()
}

/// Least-squares line through `(x, y)`: (slope, intercept).
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let slope = if sxx == 0.0 { 0.0 } else { sxy / sxx };
    (slope, my - slope * mx)
}

fn main() {
    if !common::require_kvm() {
        return;
    }
    let reps: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    for mode in ["kernel", "split", "user"] {
        println!("{mode} irqchip, best of {reps}, `--tests {TEST}`:");
        let mut points = Vec::new();
        for cpus in CPUS {
            let (t, smp) = best(mode, cpus, reps);
            let ms = t.as_secs_f64() * 1e3;
            points.push((f64::from(cpus), ms));
            println!("  {cpus:>3} vCPUs: {ms:7.1} ms  (guest: {smp})");
        }
        let (slope, intercept) = fit(&points);
        println!("  fit: {intercept:.1} ms + {slope:.2} ms per vCPU");
        for (x, y) in &points {
            let line = intercept + slope * x;
            println!(
                "    {x:>3} vCPUs: {:+.1} ms from the line ({:+.0} %)",
                y - line,
                100.0 * (y - line) / line
            );
        }
    }
}
