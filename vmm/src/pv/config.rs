//! Building the PV connect service at VM start: platform facts from the
//! command line, the device table from `--devices` or irqconnect's default.

use std::path::Path;

use irqconnect::platform::{DEFAULT_OBJECT_QUOTA, present_mask};
use irqconnect::{DeviceTable, Platform, PlatformFacts, Service};

use irqchip_kvm::Mode;

use crate::cli::Args;
use crate::error::{Error, Result};

/// The platform facts of a VM with `cpus` vCPUs in `mode`, whose IOAPIC
/// reports storms past `storm_threshold` (reported to the guest in
/// QUERY_PLATFORM). vCPU `i` has APIC ID `i` (see `cpuid`); every vCPU is
/// online; a KAFFINITY names the first 64.
pub(crate) fn platform_facts(
    cpus: u32,
    mode: Mode,
    x2apic: bool,
    storm_threshold: u32,
) -> PlatformFacts {
    PlatformFacts {
        cpu_count: cpus,
        online_mask: present_mask(cpus),
        apic_ids: (0..cpus).collect(),
        irqchip_mode: mode,
        x2apic,
        storm_threshold,
    }
}

/// The service for `facts` with the device table of the JSON file
/// `devices` (an irqconnect `TableConfig`), or the default table for the
/// CPU count when `None`.
pub(crate) fn build_service(facts: PlatformFacts, devices: Option<&Path>) -> Result<Service> {
    let platform = Platform::new(facts).map_err(|source| Error::PvConfig {
        what: "PV platform".to_string(),
        source,
    })?;
    let table = match devices {
        None => DeviceTable::default_for(&platform),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
                path: path.to_path_buf(),
                source,
            })?;
            DeviceTable::from_json(&text, &platform).map_err(|source| Error::PvConfig {
                what: format!("device table {}", path.display()),
                source,
            })?
        }
    };
    Service::new(platform, table, DEFAULT_OBJECT_QUOTA).map_err(|source| Error::PvConfig {
        what: "PV service".to_string(),
        source,
    })
}

/// The service `args` describe (`--cpus`, `--irqchip`, `--x2apic`,
/// `--devices`), reporting `storm_threshold`. Needs no KVM, so a bad table
/// is reported before the VM exists.
pub(crate) fn service_from_args(args: &Args, storm_threshold: u32) -> Result<Service> {
    build_service(
        platform_facts(
            args.cpus,
            args.irqchip,
            args.x2apic.is_on(),
            storm_threshold,
        ),
        args.devices.as_deref(),
    )
}

/// The service of a snapshot: its device table and quota on the platform
/// `facts` describe (the restoring VM's: the mode may differ from the
/// saving VM's), then its registry and storm marks, every invariant
/// checked.
pub(crate) fn restore_service(
    facts: PlatformFacts,
    state: &super::PvState,
) -> std::result::Result<Service, String> {
    let platform = Platform::new(facts).map_err(|e| format!("PV platform: {e}"))?;
    let table = DeviceTable::from_json(&state.table, &platform)
        .map_err(|e| format!("PV device table: {e}"))?;
    // The quota is checked like a configured one.
    Service::new(platform.clone(), table.clone(), state.object_quota)
        .map_err(|e| format!("PV service: {e}"))?;
    Service::restore(platform, table, &state.service).map_err(|e| format!("PV service: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `resources/devices/default.json`, the example `--devices` file.
    const DEFAULT_JSON: &str = include_str!("../../../resources/devices/default.json");

    const THRESHOLD: u32 = irqchip_kvm::DEFAULT_STORM_THRESHOLD;

    fn facts(cpus: u32) -> PlatformFacts {
        platform_facts(cpus, Mode::Kernel, false, THRESHOLD)
    }

    #[test]
    fn platform_facts_follow_the_command_line() {
        let f = platform_facts(3, Mode::Split, true, THRESHOLD);
        assert_eq!(f.cpu_count, 3);
        assert_eq!(f.online_mask, 0b111);
        assert_eq!(f.apic_ids, vec![0, 1, 2]);
        assert_eq!(f.irqchip_mode, Mode::Split);
        assert!(f.x2apic);
        assert_eq!(f.storm_threshold, THRESHOLD);
        // KAFFINITY names the first 64 processors only.
        assert_eq!(
            platform_facts(100, Mode::User, false, THRESHOLD).online_mask,
            u64::MAX
        );
    }

    #[test]
    fn default_json_parses_to_the_default_table_for_any_cpu_count() {
        for cpus in [1, 2, 4, 8, 64, 255] {
            let platform = Platform::new(facts(cpus)).unwrap();
            let parsed = DeviceTable::from_json(DEFAULT_JSON, &platform).unwrap();
            assert_eq!(parsed, DeviceTable::default_for(&platform), "{cpus} CPUs");
        }
    }

    #[test]
    fn build_service_without_file_uses_default_table() {
        let s = build_service(facts(4), None).unwrap();
        assert_eq!(s.devices().len(), 11);
        assert_eq!(s.platform().cpu_count(), 4);
    }

    #[test]
    fn build_service_bad_table_is_one_line_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let syntax = dir.join("syntax.json");
        std::fs::write(&syntax, "{\"devices\": [").unwrap();
        let pin = dir.join("pin.json");
        std::fs::write(
            &pin,
            r#"{"devices":[{"id":0,"resources":[{"pin":24,"vector":96,"mode":"latched","share":"exclusive"}]}]}"#,
        )
        .unwrap();
        for path in [&syntax, &pin] {
            let e = build_service(facts(2), Some(path)).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("device table "), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
            assert_eq!(e.exit_status(), crate::error::EXIT_VMM_ERROR);
        }
        let missing = dir.join("missing.json");
        assert!(matches!(
            build_service(facts(2), Some(&missing)),
            Err(Error::ReadFile { .. })
        ));
    }
}
