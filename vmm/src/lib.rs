//! `vmm`: boots a Multiboot v1 guest under KVM with our interrupt controllers.
//!
//! The binary (`src/main.rs`) is [`main`] with the embedded guest image;
//! everything else lives here, private to the crate, so that the fuzz
//! harness of the device layer (`harness`, behind the `fuzzing` feature)
//! drives the buses and device models the VMM builds, without KVM.
//!
//! The interrupt controllers, in all three `--irqchip` modes, come from the
//! `irqchip-kvm` crate; this VMM is its first user. Module map: `cli`
//! (arguments), `machine` (assembly and teardown), `memory`, `loader`
//! (Multiboot v1), `boot` (the BSP's initial state), `cpuid`, `vcpu` (the
//! per-thread run loop), `pv` (the PV connect doorbell and service), `bus`
//! and `devices`, `event_loop`, `control` (how a run ends), `report` (guest
//! results, JUnit), `snapshot` (`--snapshot`, `--restore`), `stats`, `trace`
//! (`--trace`).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod boot;
mod bus;
mod cli;
mod control;
mod cpuid;
mod devices;
mod error;
mod event_loop;
#[cfg(feature = "fuzzing")]
pub mod harness;
mod loader;
mod machine;
mod memory;
mod pv;
mod report;
mod snapshot;
mod stats;
mod trace;
mod vcpu;

use std::io::Write;
use std::process::ExitCode;

use crate::cli::Args;
use crate::control::Outcome;
use crate::error::{EXIT_SNAPSHOT, EXIT_VMM_ERROR, Error};

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            writeln!(
                buf,
                "vmm: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
}

fn dump_guest(path: &std::path::Path, image: &[u8]) -> Result<(), Error> {
    std::fs::write(path, image).map_err(|source| Error::WriteFile {
        path: path.to_path_buf(),
        source,
    })
}

/// The `vmm` command: parses the command line, boots the guest (by default
/// `embedded_guest`, the image the binary carries) and returns the exit
/// status (see the README).
pub fn main(embedded_guest: &'static [u8]) -> ExitCode {
    init_logging();
    let args = Args::from_env();
    if let Some(path) = &args.dump_guest {
        return match dump_guest(path, embedded_guest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmm: error: {e}");
                ExitCode::from(EXIT_VMM_ERROR)
            }
        };
    }
    let finished = match machine::run(&args, Box::new(std::io::stdout()), embedded_guest) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(e.exit_status());
        }
    };
    let status = match finished.outcome {
        Outcome::GuestExit(code) => match u8::try_from(code) {
            Ok(code) => code,
            Err(_) => {
                eprintln!(
                    "vmm: the guest's exit value {code:#x} does not fit an exit status; exiting with 255"
                );
                255
            }
        },
        Outcome::Failed(e) => {
            eprintln!("vmm: error: {e}");
            e.exit_status()
        }
        Outcome::Snapshot(_) => EXIT_SNAPSHOT,
    };
    if !args.quiet_stats {
        eprintln!("{}", finished.stats);
    }
    ExitCode::from(status)
}
