//! The hostile-guest suite from the host's side: boots the embedded guest
//! with `--tests hostile_` (4 vCPUs) in each `--irqchip` mode and checks
//!
//! - every hostile test by name: `ok`, except the storm test in kernel mode
//!   (skips: KVM's IOAPIC hides the EOIs, so there is no storm guard);
//! - the VMM exits 0 after the guest's closing line (it kept answering to
//!   the end: the last tests ask QUERY_PLATFORM and take a device interrupt
//!   after the abuse);
//! - the closing `vmm: stats:` line counts what the guest says it provoked
//!   (`# hostile counter NAME N` lines): unclaimed port and MMIO accesses,
//!   unreadable PV blocks, bad doorbell accesses, storm masks, and PV
//!   answers of every status the suite asks for;
//! - the warnings the guest causes are rate-limited: per source at most a
//!   burst of 5 plus one per second of the run.
//!
//! Needs /dev/kvm (fails with a clear message unless VMM_SKIP_KVM_TESTS=1).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use irqchip_kvm::Mode;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use common::suite::hostile_tests;
use common::{Run, require_kvm, run_vmm_args};

/// The storm test and its kernel-mode skip reason.
const STORM: &str = "hostile_storm_unclaimed_level_is_masked";
const STORM_KERNEL_SKIP: &str = "storm guard needs our IOAPIC (split/user)";

/// Fewest malformed-request cases the suite must check.
const MIN_CASES: u64 = 30;

/// The rate limiter's burst (irqchip_kvm::ratelimit): messages let through
/// before the one-per-second limit applies.
const WARN_BURST: u64 = 5;

/// PV answers the suite provokes, by the statistics line's names.
const STATUSES: &[&str] = &[
    "ok",
    "invalid_parameter",
    "invalid_parameter_1",
    "invalid_device_request",
    "invalid_handle",
    "not_found",
    "insufficient_resources",
];

/// One VM at a time: 4 vCPUs already time-share the 2 host cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// What one run reported.
#[derive(Debug, Default)]
struct Reported {
    ok: BTreeSet<String>,
    skip: BTreeMap<String, String>,
    fail: BTreeMap<String, String>,
    summary: Option<(u64, u64)>,
    /// Sum of the `# NAME: N cases` lines.
    cases: u64,
    /// Sums of the `# hostile counter NAME N` lines.
    counters: BTreeMap<String, u64>,
    /// The `# hostile_storm: ...` line.
    storm: Option<String>,
}

fn parse(stdout: &str) -> Reported {
    let mut rep = Reported::default();
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("ok ") {
            rep.ok.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("skip ") {
            let (name, why) = rest.split_once(": ").unwrap_or((rest, ""));
            rep.skip.insert(name.to_string(), why.to_string());
        } else if let Some(rest) = line.strip_prefix("FAIL ") {
            let (name, why) = rest.split_once(": ").unwrap_or((rest, ""));
            rep.fail.insert(name.to_string(), why.to_string());
        } else if let Some(rest) = line.strip_prefix("# hostile counter ") {
            let (name, n) = rest.split_once(' ').unwrap_or((rest, "0"));
            *rep.counters.entry(name.to_string()).or_default() += n.parse::<u64>().unwrap_or(0);
        } else if line.starts_with("# hostile_storm: ") {
            rep.storm = Some(line.to_string());
        } else if let Some(n) = line
            .strip_prefix("# hostile_")
            .and_then(|l| l.strip_suffix(" cases"))
            .and_then(|l| l.rsplit_once(": "))
        {
            rep.cases += n.1.parse::<u64>().unwrap_or(0);
        } else if let Some((p, f)) = line.split_once(" passed, ")
            && let (Ok(p), Ok(f)) = (p.parse(), f.trim_end_matches(" failed").parse())
        {
            rep.summary = Some((p, f));
        }
    }
    rep
}

/// The closing statistics line.
fn stats_line(r: &Run) -> &str {
    r.stderr
        .lines()
        .find(|l| l.starts_with("vmm: stats:"))
        .unwrap_or_else(|| panic!("no statistics line:\n{}", r.stderr))
}

/// The number right after `key` in `line` (e.g. `"unclaimed: pio r"`).
fn number_after(line: &str, key: &str) -> u64 {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("`{key}` missing from the statistics line: {line}"));
    let digits: String = line[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after `{key}` in: {line}"))
}

/// The statistics line's `pv: requests N (name count, ...)` breakdown.
fn pv_by_status(line: &str) -> BTreeMap<String, u64> {
    let pv = &line[line.find("pv: requests ").expect("pv counters")..];
    let Some(open) = pv.find('(') else {
        return BTreeMap::new();
    };
    let close = pv[open..].find(')').map_or(pv.len(), |c| open + c);
    pv[open + 1..close]
        .split(", ")
        .filter_map(|part| part.rsplit_once(' '))
        .map(|(name, n)| (name.to_string(), n.parse().unwrap_or(0)))
        .collect()
}

fn boot(mode: Mode) -> (Run, Reported) {
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let r = run_vmm_args(&[
        "--irqchip",
        mode.name(),
        "--cpus",
        "4",
        "--tests",
        "hostile_",
        "--timeout",
        "600",
    ]);
    let rep = parse(&r.stdout);
    (r, rep)
}

/// Every hostile test by name: ok, or its one allowed skip.
fn check_results(mode: Mode, r: &Run, rep: &Reported) {
    let ctx = || format!("{}\n{}", r.stdout, r.stderr);
    assert!(
        rep.fail.is_empty(),
        "hostile tests failed: {:#?}\n{}",
        rep.fail,
        ctx()
    );
    let ran: Vec<&String> = rep.ok.iter().chain(rep.skip.keys()).collect();
    let unknown: Vec<&&String> = ran
        .iter()
        .filter(|n| !hostile_tests().any(|h| h == n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "tests not in the suite's hostile_ names (added or renamed? update tests/common/suite.rs): {unknown:?}"
    );
    for name in hostile_tests() {
        if rep.ok.contains(name) {
            if mode == Mode::Kernel {
                assert_ne!(name, STORM, "the storm test ran in kernel mode\n{}", ctx());
            }
            continue;
        }
        let why = rep
            .skip
            .get(name)
            .unwrap_or_else(|| panic!("{name} did not run\n{}", ctx()));
        if name == STORM {
            assert_eq!(mode, Mode::Kernel, "{name} skipped: {why}\n{}", ctx());
            assert_eq!(why, STORM_KERNEL_SKIP);
        } else {
            panic!("{name} skipped: {why}\n{}", ctx());
        }
    }
    assert_eq!(
        rep.summary,
        Some((rep.ok.len() as u64, 0)),
        "closing line\n{}",
        ctx()
    );
    assert_eq!(r.status, Some(0), "exit status\n{}", ctx());
    assert!(
        rep.cases >= MIN_CASES,
        "only {} cases checked\n{}",
        rep.cases,
        r.stdout
    );
}

/// The statistics line counts what the guest provoked, per source.
fn check_stats(mode: Mode, r: &Run, rep: &Reported) {
    let line = stats_line(r);
    let counter = |name: &str| rep.counters.get(name).copied().unwrap_or(0);
    let unclaimed = &line[line.find("unclaimed: ").expect("unclaimed counters")..];
    let mmio = &unclaimed[unclaimed.find("mmio r").expect("unclaimed MMIO counters")..];
    let (pio_r, pio_w) = (
        number_after(unclaimed, "pio r"),
        number_after(unclaimed, "/w"),
    );
    let (mmio_r, mmio_w) = (number_after(mmio, "mmio r"), number_after(mmio, "/w"));
    for (what, seen, provoked) in [
        (
            "unclaimed port reads",
            pio_r,
            counter("unclaimed_pio_reads"),
        ),
        (
            "unclaimed port writes",
            pio_w,
            counter("unclaimed_pio_writes"),
        ),
        (
            "unclaimed MMIO reads",
            mmio_r,
            counter("unclaimed_mmio_reads"),
        ),
        (
            "unclaimed MMIO writes",
            mmio_w,
            counter("unclaimed_mmio_writes"),
        ),
    ] {
        assert!(provoked > 0, "the guest reported no {what}\n{}", r.stdout);
        assert!(
            seen >= provoked,
            "{what}: the statistics line counts {seen}, the guest made {provoked}\n{line}"
        );
    }
    let pv = &line[line.find("pv: ").expect("pv counters")..];
    let unreadable = number_after(pv, "unreadable ");
    assert!(counter("unreadable") > 0, "{}", r.stdout);
    assert_eq!(
        unreadable,
        counter("unreadable"),
        "unreadable PV blocks counted vs sent\n{line}"
    );
    let bad = number_after(pv, "bad accesses ");
    assert!(counter("pv_bad_accesses") > 0, "{}", r.stdout);
    assert_eq!(
        bad,
        counter("pv_bad_accesses"),
        "bad doorbell accesses counted vs made\n{line}"
    );
    let storms = number_after(pv, "storm masks ");
    let want_storms = if mode == Mode::Kernel { 0 } else { 1 };
    assert_eq!(counter("storm_masks"), want_storms, "{}", r.stdout);
    assert_eq!(storms, want_storms, "storm masks\n{line}");
    if mode != Mode::Kernel {
        assert!(
            number_after(line, "storm reports ") >= 1,
            "the IOAPIC model reported no storm\n{line}"
        );
    }
    let by_status = pv_by_status(line);
    for &status in STATUSES {
        assert!(
            by_status.get(status).copied().unwrap_or(0) > 0,
            "no PV answer `{status}` counted: {by_status:?}\n{line}"
        );
    }
    assert_eq!(number_after(pv, "unwritable "), 0, "answers lost\n{line}");
}

/// Warning lines the guest causes, by source: at most the burst plus one
/// per second of the run each; the storm guard logs its pin once.
fn check_warnings(mode: Mode, r: &Run) {
    let line = stats_line(r);
    let secs: f64 = line["vmm: stats: ".len()..]
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("run time in the statistics line");
    let limit = WARN_BURST + secs.ceil() as u64 + 1;
    let warns: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmm: warn:"))
        .collect();
    let sources: [(&str, &str); 5] = [
        ("unclaimed port", "unclaimed port "),
        ("unclaimed MMIO", "unclaimed MMIO address "),
        ("unreadable PV blocks", "PV doorbell: request block "),
        (
            "bad doorbell accesses",
            "(the doorbell is one 32-bit register)",
        ),
        ("IOAPIC storm reports", "level interrupt storm"),
    ];
    for (what, marker) in sources {
        let n = warns.iter().filter(|l| l.contains(marker)).count() as u64;
        assert!(
            n <= limit,
            "{n} warning lines about {what} in a {secs:.1} s run (limit {limit}):\n{}",
            r.stderr
        );
    }
    let guard = warns
        .iter()
        .filter(|l| l.contains("storm guard: pin"))
        .count();
    assert_eq!(
        guard,
        usize::from(mode != Mode::Kernel),
        "storm guard lines\n{}",
        r.stderr
    );
    let known =
        |l: &&&str| sources.iter().any(|(_, m)| l.contains(m)) || l.contains("storm guard: pin");
    let other: Vec<&&str> = warns.iter().filter(|l| !known(l)).collect();
    assert!(other.is_empty(), "unexpected warnings: {other:#?}");
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(!r.stderr.contains("vmm: error"), "{}", r.stderr);
}

fn hostile(mode: Mode) {
    if !require_kvm() {
        return;
    }
    let (r, rep) = boot(mode);
    check_results(mode, &r, &rep);
    check_stats(mode, &r, &rep);
    check_warnings(mode, &r);
    if let Some(storm) = &rep.storm {
        eprintln!("{} mode: {storm}", mode.name());
    }
    eprintln!("{} mode: {}", mode.name(), stats_line(&r));
}

#[test]
fn hostile_suite_split_mode() {
    hostile(Mode::Split);
}

#[test]
fn hostile_suite_user_mode() {
    hostile(Mode::User);
}

#[test]
fn hostile_suite_kernel_mode_storm_skips() {
    hostile(Mode::Kernel);
}

#[test]
fn parse_reads_cases_counters_and_statuses() {
    let rep = parse(
        "# hostile_a: 8 cases\nok hostile_a\n# hostile counter unreadable 4\n\
         # hostile counter unreadable 3\nskip hostile_b: why: because\n1 passed, 0 failed\n",
    );
    assert_eq!(rep.cases, 8);
    assert_eq!(rep.counters["unreadable"], 7);
    assert_eq!(rep.skip["hostile_b"], "why: because");
    assert_eq!(rep.summary, Some((1, 0)));
    let line = "vmm: stats: 1.0 s; unclaimed: pio r30/w15, mmio r20/w10; pv: requests 9 \
                (ok 5, not_found 4), unreadable 2, unwritable 0";
    assert_eq!(number_after(line, "mmio r"), 20);
    let by = pv_by_status(line);
    assert_eq!((by["ok"], by["not_found"]), (5, 4));
}
