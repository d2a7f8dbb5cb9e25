//! Command line.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, ValueEnum};
use irqchip_kvm::Mode;
use irqconnect_abi::layout;

/// Boots a Multiboot v1 guest under KVM with our interrupt controllers.
///
/// Without --kernel, boots the embedded guest test suite and exits with its
/// status. The guest's serial port (COM1) goes to stdout; diagnostics and the
/// closing statistics line go to stderr.
#[derive(Debug, Parser)]
#[command(name = "vmm", version)]
pub(crate) struct Args {
    /// Multiboot v1 kernel image (ELF32 or a.out kludge); default: the embedded guest.
    #[arg(long, value_name = "PATH")]
    pub(crate) kernel: Option<PathBuf>,

    /// A Multiboot module: "PATH [ARGS...]"; the whole string is its command line.
    #[arg(long = "module", value_name = "PATH [ARGS]")]
    pub(crate) modules: Vec<String>,

    /// The kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    pub(crate) cmdline: String,

    /// Number of vCPUs (1 to 255).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=layout::MAX_CPUS as i64))]
    pub(crate) cpus: u32,

    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128, value_parser = clap::value_parser!(u64).range(MIN_RAM_MIB..=layout::MAX_RAM_MIB))]
    pub(crate) memory: u64,

    /// Interrupt controller: KVM's (kernel), our IOAPIC with KVM's LAPICs
    /// (split), or ours entirely (user).
    #[arg(long, default_value = "split", value_parser = mode_parser())]
    pub(crate) irqchip: Mode,

    /// PV device table (JSON, see resources/devices/default.json): each
    /// device's interrupt resources, which also give test device i its line
    /// and trigger mode. Default: the built-in table for the CPU count.
    #[arg(long, value_name = "PATH")]
    pub(crate) devices: Option<PathBuf>,

    /// Offer x2APIC in CPUID.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub(crate) x2apic: OnOff,

    /// Run only the guest tests whose name contains one of these
    /// comma-separated strings (adds tests=FILTER to the command line).
    #[arg(long, value_name = "FILTER")]
    pub(crate) tests: Option<String>,

    /// Write the guest's test results as JUnit XML.
    #[arg(long, value_name = "PATH")]
    pub(crate) junit: Option<PathBuf>,

    /// Stop the guest after this many seconds (exit status 124), naming the
    /// test that was running.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) timeout: Option<u64>,

    /// Write the embedded guest image to PATH and exit.
    #[arg(long, value_name = "PATH")]
    pub(crate) dump_guest: Option<PathBuf>,

    /// Do not print the closing statistics line.
    #[arg(long)]
    pub(crate) quiet_stats: bool,

    /// Write a timeline of the run as Chrome trace-event JSON (open it in
    /// ui.perfetto.dev or chrome://tracing).
    #[arg(long, value_name = "PATH")]
    pub(crate) trace: Option<PathBuf>,

    /// Most events --trace keeps: the newest; older ones are dropped and
    /// counted in the file.
    #[arg(long, value_name = "N", default_value_t = crate::trace::DEFAULT_LIMIT as u64, value_parser = clap::value_parser!(u64).range(1..=MAX_TRACE_LIMIT))]
    pub(crate) trace_limit: u64,

    /// Write the closing statistics as JSON.
    #[arg(long, value_name = "PATH")]
    pub(crate) stats_json: Option<PathBuf>,
}

/// Largest `--trace-limit`: 100 million events (about 6.4 GB of memory).
pub(crate) const MAX_TRACE_LIMIT: u64 = 100_000_000;

/// Smallest RAM size the VMM accepts, in MiB (room for a kernel at 1 MiB).
pub(crate) const MIN_RAM_MIB: u64 = 2;

/// `--irqchip`'s values: the names of [`Mode`], each with its help line.
fn mode_parser() -> impl TypedValueParser<Value = Mode> {
    PossibleValuesParser::new(Mode::ALL.map(|m| PossibleValue::new(m.name()).help(m.description())))
        .try_map(|name| name.parse::<Mode>())
}

/// An on/off switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl OnOff {
    /// True for `on`.
    pub(crate) fn is_on(self) -> bool {
        self == OnOff::On
    }
}

impl Args {
    /// The command line the guest gets: `--cmdline`, then `tests=FILTER`.
    pub(crate) fn guest_cmdline(&self) -> String {
        let mut line = self.cmdline.trim().to_string();
        if let Some(filter) = &self.tests {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str("tests=");
            line.push_str(filter);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("vmm").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_brief() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.cpus, 4);
        assert_eq!(a.memory, 128);
        assert_eq!(a.irqchip, Mode::Split);
        assert!(a.kernel.is_none());
    }

    #[test]
    fn irqchip_takes_every_mode_name_and_nothing_else() {
        for mode in Mode::ALL {
            assert_eq!(parse(&["--irqchip", mode.name()]).unwrap().irqchip, mode);
        }
        let err = parse(&["--irqchip", "both"]).unwrap_err().to_string();
        assert!(err.contains("kernel") && err.contains("split") && err.contains("user"));
    }

    #[test]
    fn cpus_out_of_range_rejected() {
        assert!(parse(&["--cpus", "0"]).is_err());
        assert!(parse(&["--cpus", "256"]).is_err());
        assert_eq!(parse(&["--cpus", "255"]).unwrap().cpus, 255);
    }

    #[test]
    fn memory_above_the_hole_rejected() {
        let too_big = (layout::MAX_RAM_MIB + 1).to_string();
        assert!(parse(&["--memory", &too_big]).is_err());
        assert!(parse(&["--memory", "1"]).is_err());
    }

    #[test]
    fn tests_filter_appended_to_cmdline() {
        let a = parse(&["--cmdline", "verbose=1", "--tests", "ioapic,lapic"]).unwrap();
        assert_eq!(a.guest_cmdline(), "verbose=1 tests=ioapic,lapic");
        let b = parse(&["--tests", "x"]).unwrap();
        assert_eq!(b.guest_cmdline(), "tests=x");
    }

    #[test]
    fn devices_flag_takes_a_path() {
        assert!(parse(&[]).unwrap().devices.is_none());
        let a = parse(&["--devices", "resources/devices/default.json"]).unwrap();
        assert_eq!(
            a.devices,
            Some(PathBuf::from("resources/devices/default.json"))
        );
        assert!(parse(&["--devices"]).is_err());
    }

    #[test]
    fn trace_limit_defaults_and_rejects_zero() {
        let a = parse(&["--trace", "t.json"]).unwrap();
        assert_eq!(a.trace_limit, crate::trace::DEFAULT_LIMIT as u64);
        assert_eq!(a.trace, Some(PathBuf::from("t.json")));
        assert!(parse(&["--trace-limit", "0"]).is_err());
        assert!(parse(&["--trace-limit", "many"]).is_err());
        assert_eq!(parse(&["--trace-limit", "5"]).unwrap().trace_limit, 5);
        let b = parse(&["--stats-json", "s.json"]).unwrap();
        assert_eq!(b.stats_json, Some(PathBuf::from("s.json")));
    }

    #[test]
    fn modules_repeat() {
        let a = parse(&["--module", "a.bin x=1", "--module", "b.bin"]).unwrap();
        assert_eq!(
            a.modules,
            vec!["a.bin x=1".to_string(), "b.bin".to_string()]
        );
    }
}
