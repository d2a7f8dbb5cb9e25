//! `--trace` and `--stats-json` from the outside: boots the embedded guest
//! with a few interrupt-heavy tests (edge and level pins, MSIs, PV
//! connects) in each `--irqchip` mode with 2 vCPUs, then parses both files
//! and checks
//!
//! - the trace is well-formed JSON in the trace-event shape (`traceEvents`,
//!   every event with a phase, slices with numeric `ts` and `dur`, flows
//!   that start before they step or end);
//! - every injection has a preceding cause for that vCPU and vector (a pin
//!   delivery, a device MSI, an IPI or a LAPIC timer), counted: no more
//!   injections of a (vCPU, vector) than causes so far;
//! - its counts match the statistics line: `KVM_RUN` slices = exits,
//!   injections = `injected`, EOIs = `eoi`, line rises = `lines
//!   asserted`, answered PV requests = `pv: requests`, one test slice per
//!   result line; kernel mode has no injection or EOI (KVM's) and says so;
//! - `--stats-json` carries the same numbers as the line;
//! - a small `--trace-limit` drops the oldest events and says how many;
//! - an unwritable path is a one-line usage error (exit 2) before the VM.
//!
//! Needs /dev/kvm (fails with a clear message unless VMM_SKIP_KVM_TESTS=1).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use serde_json::Value;

use common::{Run, require_kvm, run_vmm_args, run_vmm_ok, scratch};

/// Guest tests with pin deliveries (edge, level), device MSIs and PV
/// requests, short enough for three modes.
const TESTS: &str = "ioapic_edge_delivers_once,ioapic_level_delivers_once,ioapic_level_sequential,connect_exclusive_delivers,ex_message_single_msi,ex_message_msix_eight,tpr_";

/// One VM at a time (2 host cores).
static ONE_VM: Mutex<()> = Mutex::new(());

/// A counter of the statistics line: the number after `key`.
fn stat(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    let rest = line[at..].trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The `vmm: stats:` line.
fn stats_line(run: &Run) -> &str {
    run.stderr
        .lines()
        .find(|l| l.starts_with("vmm: stats:"))
        .unwrap_or_else(|| panic!("no statistics line:\n{}", run.stderr))
}

fn traced_run(mode: &str, extra: &[&str]) -> (Run, Value, Value) {
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let trace = scratch("trace.json");
    let stats = scratch("stats.json");
    let mut args = vec![
        "--irqchip",
        mode,
        "--cpus",
        "2",
        "--tests",
        TESTS,
        "--timeout",
        "120",
        "--trace",
        trace.to_str().unwrap(),
        "--stats-json",
        stats.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = run_vmm_ok(mode, &args);
    let trace: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap())
        .unwrap_or_else(|e| panic!("{mode}: the trace is not JSON: {e}"));
    let stats: Value = serde_json::from_slice(&std::fs::read(&stats).unwrap())
        .unwrap_or_else(|e| panic!("{mode}: --stats-json is not JSON: {e}"));
    (run, trace, stats)
}

fn events(trace: &Value) -> &Vec<Value> {
    trace["traceEvents"]
        .as_array()
        .expect("traceEvents is an array")
}

fn ts(e: &Value) -> f64 {
    e["ts"]
        .as_f64()
        .unwrap_or_else(|| panic!("no numeric ts: {e}"))
}

/// The trace-event shape: phases, numeric times, flows in order.
fn check_shape(mode: &str, trace: &Value) {
    assert_eq!(trace["displayTimeUnit"], "ns");
    let mut flow_started: HashMap<u64, f64> = HashMap::new();
    for e in events(trace) {
        let ph = e["ph"].as_str().unwrap_or_else(|| panic!("no ph: {e}"));
        assert!(e["pid"].is_u64() && e["tid"].is_u64(), "{mode}: {e}");
        match ph {
            "M" => assert!(e["args"]["name"].is_string() || e["args"]["sort_index"].is_u64()),
            "X" => {
                assert!(
                    ts(e) >= 0.0 && e["dur"].as_f64().is_some_and(|d| d >= 0.0),
                    "{e}"
                );
                assert!(e["name"].is_string(), "{e}");
            }
            "C" => assert!(e["args"]["value"].is_u64(), "{e}"),
            "i" => assert!(e["s"].is_string() && ts(e) >= 0.0, "{e}"),
            "s" => {
                let id = e["id"].as_u64().unwrap();
                assert!(flow_started.insert(id, ts(e)).is_none(), "flow {id} twice");
            }
            "t" | "f" => {
                let id = e["id"].as_u64().unwrap();
                let start = flow_started
                    .get(&id)
                    .unwrap_or_else(|| panic!("{mode}: flow {id} {ph} before it started"));
                assert!(ts(e) >= *start, "{mode}: flow {id} goes back in time");
            }
            other => panic!("{mode}: unexpected phase {other}: {e}"),
        }
    }
}

fn with_cat<'a>(trace: &'a Value, cat: &str) -> Vec<&'a Value> {
    events(trace)
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] == cat)
        .collect()
}

/// Every injection has a cause before it, for its vCPU (or a cause whose
/// target KVM picks) and vector, counting coalesced causes once each.
fn check_causes(mode: &str, trace: &Value) -> usize {
    let mut timeline: Vec<&Value> = events(trace)
        .iter()
        .filter(|e| e["cat"] == "cause" || (e["ph"] == "X" && e["cat"] == "inject"))
        .collect();
    // Causes first at equal times: a cause and its injection can share a
    // microsecond stamp.
    timeline.sort_by(|a, b| {
        ts(a)
            .total_cmp(&ts(b))
            .then_with(|| (a["cat"] == "inject").cmp(&(b["cat"] == "inject")))
    });
    let mut causes: HashMap<(Option<u64>, u64), u64> = HashMap::new();
    let mut injected: HashMap<(Option<u64>, u64), u64> = HashMap::new();
    for e in timeline {
        let args = &e["args"];
        let vector = args["vector"].as_u64().unwrap();
        if e["cat"] == "cause" {
            match args["targets"].as_array() {
                Some(list) => {
                    for t in list {
                        *causes.entry((t.as_u64(), vector)).or_default() += 1;
                    }
                }
                None => *causes.entry((None, vector)).or_default() += 1,
            }
            continue;
        }
        let vcpu = args["vcpu"].as_u64();
        let n = injected.entry((vcpu, vector)).or_default();
        *n += 1;
        let available = match vcpu {
            Some(_) => {
                causes.get(&(vcpu, vector)).copied().unwrap_or(0)
                    + causes.get(&(None, vector)).copied().unwrap_or(0)
            }
            // KVM chose the vCPU: any cause of the vector.
            None => causes
                .iter()
                .filter(|((_, v), _)| *v == vector)
                .map(|(_, c)| c)
                .sum(),
        };
        assert!(
            *n <= available,
            "{mode}: injection {n} of vector {vector:#x} on vCPU {vcpu:?} at {} us has {available} causes before it",
            ts(e)
        );
    }
    injected.values().sum::<u64>() as usize
}

fn count_matches(trace: &Value, f: impl Fn(&Value) -> bool) -> u64 {
    events(trace).iter().filter(|e| f(e)).count() as u64
}

fn check_mode(mode: &str) {
    let (run, trace, stats) = traced_run(mode, &[]);
    check_shape(mode, &trace);
    let line = stats_line(&run);
    assert_eq!(trace["otherData"]["events_dropped"], 0, "{mode}");
    assert_eq!(trace["otherData"]["irqchip"], mode);

    // KVM_RUN slices are the exits.
    let exits = stat(line, "stats:").and_then(|_| {
        let after = line.split(" s, ").nth(1)?;
        after.split(' ').next()?.parse::<u64>().ok()
    });
    let runs = count_matches(&trace, |e| {
        e["ph"] == "X"
            && e["cat"] == "exit"
            && e["name"]
                .as_str()
                .is_some_and(|n| !n.contains("open at the end"))
    });
    assert_eq!(Some(runs), exits, "{mode}: KVM_RUN slices vs exits: {line}");
    assert_eq!(stats["exits"], runs, "{mode}: --stats-json exits");

    // Line rises.
    let rises = count_matches(&trace, |e| {
        e["ph"] == "C"
            && e["name"].as_str().is_some_and(|n| n.ends_with(" level"))
            && e["args"]["value"] == 1
    });
    assert_eq!(Some(rises), stat(line, "lines asserted"), "{mode}: {line}");
    assert_eq!(stats["irq"]["lines_asserted"], rises);
    assert!(rises > 0, "{mode}: no line was raised");

    // Injections and EOIs.
    let injections = check_causes(mode, &trace) as u64;
    let eois = with_cat(&trace, "eoi").len() as u64;
    if mode == "kernel" {
        assert!(line.contains("injected by KVM, eoi by KVM"), "{line}");
        assert_eq!((injections, eois), (0, 0));
        assert!(stats["irq"]["injected"].is_null() && stats["irq"]["eoi"].is_null());
        assert!(
            trace["otherData"]["note"]
                .as_str()
                .is_some_and(|n| n.contains("inside the kernel"))
        );
    } else {
        assert_eq!(Some(injections), stat(line, "injected"), "{mode}: {line}");
        assert_eq!(Some(eois), stat(line, ", eoi"), "{mode}: {line}");
        assert_eq!(stats["irq"]["injected"], injections);
        assert_eq!(stats["irq"]["eoi"], eois);
        assert!(
            injections > 0 && eois > 0,
            "{mode}: {injections} injections, {eois} EOIs"
        );
        // Flow arrows: from a delivery to an injection to its EOI.
        let steps = count_matches(&trace, |e| e["ph"] == "t");
        let ends = count_matches(&trace, |e| e["ph"] == "f");
        assert!(
            steps > 0 && ends > 0,
            "{mode}: {steps} flow steps, {ends} ends"
        );
        let deliveries = with_cat(&trace, "cause")
            .iter()
            .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("deliver")))
            .count();
        assert!(deliveries > 0, "{mode}: no pin delivery");
    }

    // PV requests answered, by the line and by the JSON.
    let answered = with_cat(&trace, "pv")
        .iter()
        .filter(|e| !e["args"]["status"].is_null())
        .count() as u64;
    assert_eq!(Some(answered), stat(line, "pv: requests"), "{mode}: {line}");
    assert_eq!(stats["pv"]["requests"], answered);
    assert!(answered > 0);

    // One test slice per result line, named by the test.
    let results: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| {
            ["ok ", "FAIL ", "skip "]
                .iter()
                .find_map(|p| l.strip_prefix(p))
                .map(|rest| rest.split(':').next().unwrap_or(rest))
        })
        .collect();
    let slices: Vec<&str> = with_cat(&trace, "test")
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(slices, results, "{mode}: test slices");
    assert_eq!(stats["irqchip"], mode);
}

#[test]
fn trace_kernel_mode_counts_match_the_stats_line() {
    if !require_kvm() {
        return;
    }
    check_mode("kernel");
}

#[test]
fn trace_split_mode_every_injection_has_a_cause_and_counts_match() {
    if !require_kvm() {
        return;
    }
    check_mode("split");
}

#[test]
fn trace_user_mode_every_injection_has_a_cause_and_counts_match() {
    if !require_kvm() {
        return;
    }
    check_mode("user");
}

#[test]
fn trace_limit_keeps_the_newest_and_notes_the_dropped() {
    if !require_kvm() {
        return;
    }
    let (_run, trace, _stats) = traced_run("user", &["--trace-limit", "500"]);
    check_shape("user --trace-limit 500", &trace);
    let other = &trace["otherData"];
    assert_eq!(other["events_kept"], 500);
    assert!(other["events_dropped"].as_u64().is_some_and(|d| d > 0));
    let note = events(&trace).iter().find(|e| {
        e["ph"] == "i"
            && e["name"]
                .as_str()
                .is_some_and(|n| n.contains("older events dropped (--trace-limit 500)"))
    });
    assert!(note.is_some(), "no dropped-events note");
    // 500 recorded events become at most 2 JSON events each (a flow and
    // its slice), besides the track names.
    let drawn = count_matches(&trace, |e| e["ph"] != "M");
    assert!(drawn <= 2 * 500 + 1, "{drawn} events drawn from 500");
}

#[test]
fn trace_and_stats_json_unwritable_paths_are_usage_errors() {
    for flag in ["--trace", "--stats-json"] {
        let run = run_vmm_args(&[flag, "/nonexistent-dir/out.json", "--tests", "none"]);
        assert_eq!(run.status, Some(2), "{flag}: {}", run.stderr);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{flag}: {}", run.stderr);
        assert!(
            lines[0].starts_with("vmm: error: ")
                && lines[0].contains(flag)
                && lines[0].contains("writable directory"),
            "{}",
            lines[0]
        );
    }
}
