//! Snapshot and restore of a running VM (issue 11), with the embedded guest
//! suite and 4 vCPUs in each `--irqchip` mode.
//!
//! - **Chains** (guest command-line key `snapshot=each`: the guest asks
//!   for a snapshot between every two tests): the first process boots and
//!   runs one test, snapshots and exits (status 10); each next process
//!   restores the file in a fresh VM, runs one more test, snapshots and
//!   exits; the last one finishes the suite. The chained result lines must
//!   be exactly an uninterrupted run's (`common::expect::expected`).
//! - **Across modes:** a chain whose links alternate split and user (every
//!   restore converts: split to user, user to split), and a kernel-mode
//!   chain where each snapshot is also restored in user mode for one test
//!   (kernel to user at every test boundary). Restores into kernel mode are
//!   refused with one line, exit status 3, and nothing resumed.
//! - **SIGUSR1**, at an arbitrary moment inside a test: with
//!   `--snapshot-then exit` the restored VM finishes the run; with
//!   `--snapshot-then continue` the VM finishes too, and so does a restore
//!   of its file.
//! - **Bad files:** truncated, corrupted, of another format version, with
//!   a length the header does not say, or not a snapshot at all: one line,
//!   exit status 3, no guest output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};

use irqchip_kvm::Mode;

use common::expect::{Expected, Reported, check_exact, expected, expected_with_snapshots, parse};
use common::{Run, require_kvm, run_vmm_args, scratch};

/// `--snapshot-then exit`'s status (`EXIT_SNAPSHOT`, vmm/README.md).
const EXIT_SNAPSHOT: i32 = 10;
/// A VMM error, a refused or bad snapshot among them.
const EXIT_VMM_ERROR: i32 = 3;
/// vCPUs of every VM here.
const CPUS: &str = "4";
/// Each process's `--timeout`.
const TIMEOUT: &str = "300";

/// One VM at a time (2 host cores; see `guest_suite.rs`).
static ONE_VM: Mutex<()> = Mutex::new(());

/// A boot with snapshots to `snap` (`--snapshot-then exit`).
fn boot(mode: Mode, snap: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "--irqchip",
        mode.name(),
        "--cpus",
        CPUS,
        "--timeout",
        TIMEOUT,
        "--quiet-stats",
        "--snapshot",
        snap.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_vmm_args(&args)
}

/// A restore of `from` in `mode`, its next snapshot going to `to`.
fn restore(from: &Path, mode: Mode, to: &Path) -> Run {
    run_vmm_args(&[
        "--restore",
        from.to_str().unwrap(),
        "--irqchip",
        mode.name(),
        "--timeout",
        TIMEOUT,
        "--quiet-stats",
        "--snapshot",
        to.to_str().unwrap(),
    ])
}

/// A link of a chain ended at a snapshot or at the end of the run, with
/// no VMM error.
fn check_link(r: &Run, what: &str) {
    assert!(
        matches!(r.status, Some(0 | 1 | EXIT_SNAPSHOT)),
        "{what}: exit status {:?}\n{}\n{}",
        r.status,
        r.stdout,
        r.stderr
    );
    assert!(
        !r.stderr.contains("vmm: error"),
        "{what}: a VMM error\n{}",
        r.stderr
    );
}

/// The result lines of a whole chain.
struct Chain {
    stdout: String,
    /// Restores after the first boot.
    restores: usize,
    /// Forks run (one per snapshot when asked for).
    forks: usize,
    /// The last process's exit status.
    status: Option<i32>,
}

/// Boots the suite (names containing one of `parts`; all when empty) in
/// `modes[0]` with `snapshot=each`, then restores link `i` in
/// `modes[i % modes.len()]` until the run ends. `fork`: each snapshot is
/// also restored once in that mode for one test, whose result lines go to
/// the returned map (test name -> lines) and are not part of the chain.
fn chain(modes: &[Mode], parts: &[&str], fork: Option<Mode>) -> (Chain, BTreeMap<String, String>) {
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let snap = scratch("chain.snap");
    let forked = scratch("fork.snap");
    let joined = parts.join(",");
    let mut extra = vec!["--cmdline", "snapshot=each"];
    if !parts.is_empty() {
        extra.extend(["--tests", &joined]);
    }
    let first = boot(modes[0], &snap, &extra);
    check_link(&first, "boot");
    let mut out = first.stdout;
    let mut status = first.status;
    let mut restores = 0;
    let mut forks = BTreeMap::new();
    let mut forks_run = 0;
    while status == Some(EXIT_SNAPSHOT) {
        assert!(
            restores <= 2 * common::suite::SUITE.len(),
            "more than two snapshots per test"
        );
        if let Some(mode) = fork {
            let mut f = restore(&snap, mode, &forked);
            check_link(&f, &format!("fork {restores} in {} mode", mode.name()));
            // A `snapshot_` test takes a snapshot of its own: a fork that
            // starts one stops there with no result yet; its own restore
            // (same mode) finishes the test.
            let first_results = parse(&f);
            if f.status == Some(EXIT_SNAPSHOT)
                && first_results.ok.is_empty()
                && first_results.skip.is_empty()
                && first_results.fail.is_empty()
            {
                let g = restore(&forked, mode, &forked);
                check_link(&g, &format!("fork {restores}, second link"));
                f.stdout.push_str(&g.stdout);
            }
            forks_run += 1;
            let name = f
                .stdout
                .lines()
                .find_map(|l| {
                    ["ok ", "skip ", "FAIL "]
                        .iter()
                        .find_map(|p| l.strip_prefix(p))
                })
                .map(|rest| rest.split(": ").next().unwrap_or(rest).to_string())
                .unwrap_or_else(|| panic!("fork {restores} ran no test:\n{}", f.stdout));
            forks.entry(name).or_insert(f.stdout);
        }
        restores += 1;
        let mode = modes[restores % modes.len()];
        let r = restore(&snap, mode, &snap);
        check_link(&r, &format!("restore {restores} in {} mode", mode.name()));
        out.push_str(&r.stdout);
        status = r.status;
    }
    (
        Chain {
            stdout: out,
            restores,
            forks: forks_run,
            status,
        },
        forks,
    )
}

/// The expected result of the tests whose names contain one of `parts`:
/// with `snapshots` (they run where the VMM takes snapshots, as every
/// link of a chain does) the `snapshot_` tests run, without they skip.
fn expected_of(mode: Mode, parts: &[&str], snapshots: bool) -> Expected {
    let mut want = if snapshots {
        expected_with_snapshots(mode, 4, true)
    } else {
        expected(mode, 4, true)
    };
    if !parts.is_empty() {
        let named = |n: &String| parts.iter().any(|p| n.contains(p));
        want.ok.retain(named);
        want.skip.retain(|n, _| named(n));
    }
    want
}

/// The chain's result lines are exactly `want`, one snapshot between every
/// two tests, and the closing line and exit status agree.
fn check_chain(c: &Chain, want: &Expected) -> Reported {
    let run = Run {
        status: c.status,
        stdout: c.stdout.clone(),
        stderr: String::new(),
    };
    let rep = parse(&run);
    check_exact(&rep, want, &run);
    // Each `snapshot_` test that runs takes one more of its own.
    let own = want
        .ok
        .iter()
        .filter(|n| n.starts_with("snapshot_"))
        .count();
    assert_eq!(
        c.restores + 1,
        want.ok.len() + want.skip.len() + own,
        "one snapshot between every two tests, and one in each snapshot_ test"
    );
    assert_eq!(
        rep.summary,
        (rep.ok.len(), 0),
        "the closing line counts every link's tests\n{}",
        c.stdout
    );
    assert_eq!(c.status, Some(0), "the last link's exit status");
    rep
}

fn chain_in(mode: Mode) {
    if !require_kvm() {
        return;
    }
    let (c, _) = chain(&[mode], &[], None);
    check_chain(&c, &expected_of(mode, &[], true));
}

#[test]
fn chain_kernel_mode_four_vcpus() {
    chain_in(Mode::Kernel);
}

#[test]
fn chain_split_mode_four_vcpus() {
    chain_in(Mode::Split);
}

#[test]
fn chain_user_mode_four_vcpus() {
    chain_in(Mode::User);
}

/// Booted in split mode, every restore converts: split to user, user to
/// split. The guest's boot probes ran under KVM's LAPIC, so its results
/// are split mode's (our IOAPIC in both modes).
#[test]
fn chain_alternating_split_and_user_converts_at_every_test() {
    if !require_kvm() {
        return;
    }
    let (c, _) = chain(&[Mode::Split, Mode::User], &[], None);
    check_chain(&c, &expected_of(Mode::Split, &[], true));
}

/// A kernel-mode chain; each of its snapshots also restores in user mode
/// for one test. The chain is kernel mode's uninterrupted result; every
/// converted test passes or skips for the reason kernel mode gives, except
/// where user mode has what kernel mode lacks (our IOAPIC's EOI register
/// and storm guard), where it passes.
#[test]
fn kernel_to_user_at_every_test() {
    if !require_kvm() {
        return;
    }
    let (c, forks) = chain(&[Mode::Kernel], &[], Some(Mode::User));
    let rep = check_chain(&c, &expected_of(Mode::Kernel, &[], true));
    assert_eq!(c.forks, c.restores, "one fork per snapshot");
    for (name, out) in &forks {
        let fork = parse(&Run {
            status: None,
            stdout: out.clone(),
            stderr: String::new(),
        });
        assert!(
            fork.fail.is_empty(),
            "{name} after kernel -> user: {:?}\n{out}",
            fork.fail
        );
        if rep.ok.contains(name) {
            assert!(
                fork.ok.contains(name),
                "{name} passed in kernel mode only\n{out}"
            );
        } else if !fork.ok.contains(name) {
            assert_eq!(
                fork.skip.get(name),
                rep.skip.get(name),
                "{name}: another skip reason after kernel -> user"
            );
        }
    }
}

/// A snapshot of `mode` taken between the first two tests of the
/// `lapic_` suite.
fn early_snapshot(mode: Mode, snap: &Path) {
    let r = boot(
        mode,
        snap,
        &[
            "--cmdline",
            "snapshot=each",
            "--tests",
            "lapic_mode_matches_cpuid,lapic_version_register",
        ],
    );
    assert_eq!(r.status, Some(EXIT_SNAPSHOT), "{}\n{}", r.stdout, r.stderr);
}

/// Nothing resumed and one `vmm: error:` line naming `want`.
fn check_refused(r: &Run, want: &str) {
    assert_eq!(r.status, Some(EXIT_VMM_ERROR), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.is_empty(), "the guest ran:\n{}", r.stdout);
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmm: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{}", r.stderr);
    assert!(errors[0].contains(want), "`{want}` not in: {}", errors[0]);
}

/// Split and user snapshots do not restore in kernel mode: KVM's IOAPIC
/// cannot carry our IOAPIC's EOI register and storm counts.
#[test]
fn restore_into_kernel_mode_is_refused() {
    if !require_kvm() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    for mode in [Mode::Split, Mode::User] {
        let snap = scratch("early.snap");
        early_snapshot(mode, &snap);
        let r = run_vmm_args(&[
            "--restore",
            snap.to_str().unwrap(),
            "--irqchip",
            "kernel",
            "--quiet-stats",
        ]);
        check_refused(&r, "no EOI register");
    }
}

/// Starts `args` with the guest's output piped; once `after` result lines
/// were printed, sends SIGUSR1; returns the finished run.
fn signal_after(args: &[&str], after: usize) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut stdout = String::new();
    let mut results = 0;
    let mut signalled = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("ok ") || line.starts_with("skip ") {
            results += 1;
        }
        stdout.push_str(&line);
        stdout.push('\n');
        if results >= after && !signalled {
            signalled = true;
            // SAFETY: kill(2) on our own child's pid.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
        }
    }
    let status = child.wait().unwrap().code();
    assert!(signalled, "the run ended before {after} results:\n{stdout}");
    Run {
        status,
        stdout,
        stderr: err_thread.join().unwrap(),
    }
}

/// The tests the SIGUSR1 runs use: a few hundred milliseconds each, with
/// timers, level and edge pins, IPIs and PV connections in flight.
const SIGNAL_TESTS: &[&str] = &["timer_", "ioapic_level", "ipi_", "connect_exclusive"];

/// SIGUSR1 inside a test with `--snapshot-then exit`: exit 10, and the
/// restore in a fresh process finishes the run with every test passing.
fn sigusr1_exit(mode: Mode) {
    if !require_kvm() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let snap = scratch("signal.snap");
    let tests = SIGNAL_TESTS.join(",");
    let first = signal_after(
        &[
            "--irqchip",
            mode.name(),
            "--cpus",
            CPUS,
            "--timeout",
            TIMEOUT,
            "--snapshot",
            snap.to_str().unwrap(),
            "--tests",
            &tests,
        ],
        3,
    );
    assert_eq!(
        first.status,
        Some(EXIT_SNAPSHOT),
        "{}\n{}",
        first.stdout,
        first.stderr
    );
    assert!(first.stderr.contains("vmm: snapshot: "), "{}", first.stderr);
    let second = run_vmm_args(&[
        "--restore",
        snap.to_str().unwrap(),
        "--timeout",
        TIMEOUT,
        "--quiet-stats",
    ]);
    let whole = Run {
        status: second.status,
        stdout: format!("{}{}", first.stdout, second.stdout),
        stderr: second.stderr.clone(),
    };
    // The `snapshot_` tests SIGNAL_TESTS names (`timer_`, `ipi_`) run last,
    // after the signal, in the restore without `--snapshot`: they skip.
    check_exact(
        &parse(&whole),
        &expected_of(mode, SIGNAL_TESTS, false),
        &whole,
    );
    assert_eq!(second.status, Some(0), "{}", second.stderr);
}

#[test]
fn sigusr1_then_exit_restores_kernel_mode() {
    sigusr1_exit(Mode::Kernel);
}

#[test]
fn sigusr1_then_exit_restores_split_mode() {
    sigusr1_exit(Mode::Split);
}

#[test]
fn sigusr1_then_exit_restores_user_mode() {
    sigusr1_exit(Mode::User);
}

/// SIGUSR1 with `--snapshot-then continue`: the VM finishes the run with
/// every test passing, and its snapshot restores and finishes it again.
fn sigusr1_continue(mode: Mode) {
    if !require_kvm() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let snap = scratch("continue.snap");
    let tests = SIGNAL_TESTS.join(",");
    // One process with `--snapshot`: the `snapshot_` tests SIGNAL_TESTS
    // names run too (and continue after their own snapshots).
    let want = expected_of(mode, SIGNAL_TESTS, true);
    let run = signal_after(
        &[
            "--irqchip",
            mode.name(),
            "--cpus",
            CPUS,
            "--timeout",
            TIMEOUT,
            "--snapshot",
            snap.to_str().unwrap(),
            "--snapshot-then",
            "continue",
            "--tests",
            &tests,
        ],
        3,
    );
    assert_eq!(run.status, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("vmm: snapshot: "), "{}", run.stderr);
    check_exact(&parse(&run), &want, &run);
    let again = run_vmm_args(&[
        "--restore",
        snap.to_str().unwrap(),
        "--timeout",
        TIMEOUT,
        "--quiet-stats",
    ]);
    assert_eq!(again.status, Some(0), "{}\n{}", again.stdout, again.stderr);
    let rep = parse(&again);
    assert!(rep.fail.is_empty(), "{}", again.stdout);
    assert!(
        rep.ok.iter().all(|n| want.ok.contains(n)) && !rep.ok.is_empty(),
        "the restore ran other tests:\n{}",
        again.stdout
    );
}

#[test]
fn sigusr1_then_continue_finishes_and_the_file_restores_kernel_mode() {
    sigusr1_continue(Mode::Kernel);
}

#[test]
fn sigusr1_then_continue_finishes_and_the_file_restores_split_mode() {
    sigusr1_continue(Mode::Split);
}

#[test]
fn sigusr1_then_continue_finishes_and_the_file_restores_user_mode() {
    sigusr1_continue(Mode::User);
}

/// Bad files: each gets one line and exit status 3 before any guest runs.
#[test]
fn bad_snapshot_files_are_refused_with_one_line() {
    if !require_kvm() {
        return;
    }
    let _one = ONE_VM.lock().unwrap_or_else(PoisonError::into_inner);
    let snap = scratch("good.snap");
    early_snapshot(Mode::User, &snap);
    let good = std::fs::read(&snap).unwrap();
    let bad = scratch("bad.snap");
    let refuse = |bytes: &[u8], want: &str| {
        std::fs::write(&bad, bytes).unwrap();
        let r = run_vmm_args(&["--restore", bad.to_str().unwrap(), "--quiet-stats"]);
        check_refused(&r, want);
    };
    refuse(&good[..good.len() / 2], "truncated");
    refuse(&good[..20], "truncated");
    refuse(&[], "truncated");
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    refuse(&corrupt, "checksum mismatch");
    let mut version = good.clone();
    version[8..12].copy_from_slice(&99u32.to_le_bytes());
    refuse(&version, "format version 99");
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4096]);
    refuse(&longer, "trailing data");
    let mut memory = good.clone();
    memory[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    refuse(&memory, "guest memory of");
    refuse(
        b"#!/bin/sh\necho not a snapshot\n........................................",
        "bad magic",
    );
    let r = run_vmm_args(&["--restore", "/nonexistent/snap", "--quiet-stats"]);
    check_refused(&r, "/nonexistent/snap");
}
