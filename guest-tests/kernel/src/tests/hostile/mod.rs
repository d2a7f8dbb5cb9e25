//! `hostile_`: the guest as an adversary of the host. Malformed PV request
//! blocks of every kind (each case expecting its defined NTSTATUS, or no
//! answer), forged and stale handles, a connect flood up to the quota,
//! doorbell accesses of the wrong width, unclaimed ports and MMIO, and an
//! interrupt storm nobody claims. The host must answer as documented, change
//! nothing on a refusal, write nothing outside a request block, and keep
//! running; the platform ends every test at the baseline taken before the
//! first hostile test ran.
//!
//! Table-driven families report every failing case by name (one `# ` line
//! each, and the names in the failure message) and print how many cases they
//! checked: `# hostile_NAME: N cases`. Tests that provoke host counters
//! print what the closing `vmm: stats:` line must show
//! (`# hostile counter NAME N`), which `vmm/tests/hostile.rs` sums.

mod blocks;
mod concurrent;
mod ex;
mod fields;
mod flood;
mod handles;
mod header;
mod raw;
mod storm;
mod unclaimed;

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use irqconnect_abi::ntstatus::{NtStatus, status_name};
use irqconnect_abi::pv::STATUS_NO_ANSWER;

use super::pvfix::{self, Env};
use crate::runner::{Test, TestResult};
use crate::{check, fail, println};

/// The suite.
pub const TESTS: &[Test] = &[
    Test::new("hostile_pv_bad_magic_invalid_parameter", || {
        run(header::bad_magic)
    }),
    Test::new("hostile_pv_unknown_version_invalid_parameter_1", || {
        run(header::unknown_version)
    }),
    Test::new("hostile_pv_unknown_opcode_invalid_device_request", || {
        run(header::unknown_opcode)
    }),
    Test::new("hostile_pv_bad_length_invalid_parameter", || {
        run(header::bad_length)
    }),
    Test::new("hostile_pv_header_checks_in_documented_order", || {
        run(header::check_order)
    }),
    Test::new("hostile_pv_misaligned_block_invalid_parameter", || {
        run(header::misaligned)
    }),
    Test::new("hostile_pv_unreadable_block_gets_no_answer", || {
        run(header::unreadable)
    }),
    Test::new("hostile_pv_reserved_fields_invalid_parameter", || {
        run(fields::reserved)
    }),
    Test::new(
        "hostile_pv_connect_flags_outside_0_1_invalid_parameter",
        || run(fields::flags),
    ),
    Test::new(
        "hostile_pv_connect_vectors_and_irqls_invalid_parameter",
        || run(fields::vectors_irqls),
    ),
    Test::new(
        "hostile_pv_sync_irql_above_high_level_invalid_parameter",
        || run(fields::sync_irql_above_high),
    ),
    Test::new("hostile_pv_connect_masks_pointers_devices", || {
        run(fields::masks_pointers_devices)
    }),
    Test::new("hostile_pv_queries_out_of_range", || {
        run(fields::queries_out_of_range)
    }),
    Test::new("hostile_pv_forged_and_stale_handles_invalid_handle", || {
        run(handles::forged_and_stale)
    }),
    Test::new("hostile_pv_connect_flood_hits_quota_then_recovers", || {
        run(flood::quota_flood)
    }),
    Test::new("hostile_pv_random_blocks_defined_statuses", || {
        run(flood::random_blocks)
    }),
    Test::new("hostile_pv_concurrent_requests_from_every_cpu", || {
        run(concurrent::every_cpu)
    }),
    Test::new("hostile_pv_doorbell_other_widths_ignored", || {
        run(unclaimed::doorbell_widths)
    }),
    Test::new("hostile_unclaimed_ports_read_ones_writes_ignored", || {
        run(unclaimed::ports)
    }),
    Test::new("hostile_unclaimed_mmio_reads_ones_writes_ignored", || {
        run(unclaimed::mmio)
    }),
    Test::new("hostile_storm_unclaimed_level_is_masked", storm::run),
];

static BASELINE_SET: AtomicBool = AtomicBool::new(false);
static BASELINE_OBJECTS: AtomicU32 = AtomicU32::new(0);
static BASELINE_CONNECTIONS: AtomicU32 = AtomicU32::new(0);

/// Records the host's objects and connections before the first hostile
/// test (whichever the filter selects first).
fn record_suite_baseline() -> TestResult {
    if !BASELINE_SET.load(Ordering::Acquire) {
        let p = pvfix::platform()?;
        BASELINE_OBJECTS.store(p.objects_in_use, Ordering::Relaxed);
        BASELINE_CONNECTIONS.store(p.connections, Ordering::Relaxed);
        BASELINE_SET.store(true, Ordering::Release);
    }
    Ok(())
}

/// Fails unless QUERY_PLATFORM shows the objects and connections of the
/// suite baseline.
fn check_suite_baseline() -> TestResult {
    let p = pvfix::platform()?;
    let (objects, connections) = (
        BASELINE_OBJECTS.load(Ordering::Relaxed),
        BASELINE_CONNECTIONS.load(Ordering::Relaxed),
    );
    check!(
        p.objects_in_use == objects && p.connections == connections,
        "host not back at the suite's baseline: {} objects / {} connections, {} / {} before the first hostile test",
        crate::display::dec(p.objects_in_use),
        crate::display::dec(p.connections),
        crate::display::dec(objects),
        crate::display::dec(connections)
    );
    Ok(())
}

/// Runs a hostile test under the PV fixture (skip without the PV device,
/// devices quiet, per-test baseline), then checks the suite baseline.
fn run(body: fn(&Env) -> TestResult) -> TestResult {
    pvfix::need_pv()?;
    record_suite_baseline()?;
    pvfix::run(body)?;
    check_suite_baseline()
}

/// The RAM size fw_cfg reports, when it is plausible (at least 1 MiB,
/// not past the MMIO hole): the first guest-physical address past RAM.
fn ram_end() -> Option<u64> {
    crate::fw_cfg::ram_size()
        .filter(|ram| (1 << 20..=irqconnect_abi::layout::MMIO_HOLE_START).contains(ram))
}

/// `a == b`, eight bytes per step: under an instruction emulator a byte
/// loop (what `memcmp` and `repe cmpsb` amount to) costs a step per byte
/// (`guest-tests/README.md` has the measured cost).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .all(|(x, y)| x == y);
    let word = |c: &[u8]| c.try_into().map_or(0, u64::from_ne_bytes);
    tails && ca.zip(cb).all(|(x, y)| word(x) == word(y))
}

/// Prints what the host's closing statistics line must have counted
/// because of this test (summed by `vmm/tests/hostile.rs`).
fn expect_host_counter(name: &str, n: u32) {
    println!("# hostile counter {} {}", name, crate::display::dec(n));
}

/// What a case expects from the host.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// This status in the header.
    Status(NtStatus),
    /// No answer at all (the block is not readable guest RAM).
    NoAnswer,
}

impl fmt::Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Want::Status(s) => f.write_str(status_name(s)),
            Want::NoAnswer => f.write_str("no answer"),
        }
    }
}

/// A status as a name, `no answer` for [`STATUS_NO_ANSWER`].
struct Shown(NtStatus);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            STATUS_NO_ANSWER => f.write_str("no answer"),
            s => write!(f, "{} ({})", status_name(s), crate::display::hex(s)),
        }
    }
}

/// The cases of one family: counts them (consecutive checks under one
/// name are one case), prints each failure on its own line, and fails with
/// the failing names.
struct Cases {
    test: &'static str,
    checked: u32,
    failed: u32,
    last: Name,
    last_failed: bool,
    names: [u8; 160],
    names_len: usize,
}

impl Cases {
    fn new(test: &'static str) -> Self {
        Self {
            test,
            checked: 0,
            failed: 0,
            last: Name::of(format_args!("")),
            last_failed: false,
            names: [0; 160],
            names_len: 0,
        }
    }

    /// Records a check of case `name`: passed when `ok`, else `why` is
    /// printed.
    fn check(&mut self, name: &str, ok: bool, why: fmt::Arguments<'_>) {
        if self.checked == 0 || !same(self.last.as_str().as_bytes(), name.as_bytes()) {
            self.checked += 1;
            self.last = Name::of(format_args!("{}", name));
            self.last_failed = false;
        }
        if ok {
            return;
        }
        println!("# {}: case `{}` failed: {}", self.test, name, why);
        if self.last_failed {
            return;
        }
        self.last_failed = true;
        self.failed += 1;
        let sep: &[u8] = if self.names_len == 0 { b"" } else { b", " };
        for &b in sep.iter().chain(name.as_bytes()) {
            if let Some(slot) = self.names.get_mut(self.names_len) {
                *slot = b;
                self.names_len += 1;
            }
        }
    }

    /// Records a passed case without formatting its name (for streams of
    /// generated cases: formatting costs milliseconds under emulation).
    fn passed(&mut self) {
        self.checked += 1;
        self.last = Name::of(format_args!(""));
        self.last_failed = false;
    }

    /// Records a case whose answer must be `want`.
    fn status(&mut self, name: &str, got: NtStatus, want: Want) {
        let ok = match want {
            Want::Status(s) => got == s,
            Want::NoAnswer => got == STATUS_NO_ANSWER,
        };
        self.check(
            name,
            ok,
            format_args!("answered {}, expected {}", Shown(got), want),
        );
    }

    /// Prints the count; fails naming the failed cases.
    fn finish(self) -> TestResult {
        println!(
            "# {}: {} cases",
            self.test,
            crate::display::dec(self.checked)
        );
        if self.failed > 0 {
            let names = core::str::from_utf8(&self.names[..self.names_len]).unwrap_or("?");
            fail!(
                "{} of {} cases failed: {}",
                crate::display::dec(self.failed),
                crate::display::dec(self.checked),
                names
            );
        }
        Ok(())
    }
}

/// A small buffer for case names built at run time (`vector 0x60 + 1`).
struct Name {
    buf: [u8; 96],
    len: usize,
}

impl Name {
    fn of(args: fmt::Arguments<'_>) -> Self {
        let mut n = Self {
            buf: [0; 96],
            len: 0,
        };
        let _ = n.write_fmt(args);
        n
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Name {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}
