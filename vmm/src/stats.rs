//! The closing statistics: one line on stderr at exit, and the same
//! counters as JSON for `--stats-json PATH`.

use std::fmt::Write as _;
use std::time::Duration;

use irqchip_kvm::Irqchip;
use serde_json::json;

use crate::bus::Bus;
use crate::pv::counters::PvStats;
use crate::vcpu::VcpuStats;

/// Everything counted during a run.
pub(crate) struct RunStats<'a> {
    /// From the first vCPU thread start to the last join.
    pub(crate) elapsed: Duration,
    /// Summed over vCPUs.
    pub(crate) vcpu: VcpuStats,
    /// Port bus.
    pub(crate) pio: &'a Bus,
    /// MMIO bus.
    pub(crate) mmio: &'a Bus,
    /// The interrupt controller (line assertions, its counters, its
    /// models' counters in split and user modes).
    pub(crate) chip: &'a Irqchip,
    /// The PV connect doorbell's counters.
    pub(crate) pv: PvStats,
}

impl RunStats<'_> {
    /// One line: `vmm: stats: ...`.
    pub(crate) fn line(&self) -> String {
        let v = &self.vcpu;
        let assertions = self.chip.line_assertions();
        let irq = self.chip.stats();
        let secs = self.elapsed.as_secs_f64();
        let exits = v.runs;
        let rate = if secs > 0.0 { exits as f64 / secs } else { 0.0 };
        let mut s = format!(
            "vmm: stats: {secs:.3} s, {exits} exits ({rate:.0}/s): io in {} out {}, mmio r {} w {}, irqchip {}, kicks {}, eagain {}",
            v.io_in, v.io_out, v.mmio_read, v.mmio_write, v.irqchip, v.kicks, v.eagain
        );
        s.push_str("; devices:");
        let mut any = false;
        for c in self.pio.counters().into_iter().chain(self.mmio.counters()) {
            let _ = write!(s, " {} r{}/w{}", c.name, c.reads, c.writes);
            any = true;
        }
        if !any {
            s.push_str(" none");
        }
        let (pr, pw) = self.pio.unclaimed_counts();
        let (mr, mw) = self.mmio.unclaimed_counts();
        let _ = write!(
            s,
            "; unclaimed: pio r{pr}/w{pw}, mmio r{mr}/w{mw}; irq: lines asserted {}",
            assertions.iter().map(|(_, c)| c).sum::<u64>()
        );
        let per_gsi: Vec<String> = assertions
            .iter()
            .map(|(g, c)| format!("gsi{g} {c}"))
            .collect();
        if !per_gsi.is_empty() {
            let _ = write!(s, " ({})", per_gsi.join(", "));
        }
        let by_kvm = |v: Option<u64>| v.map_or_else(|| "by KVM".to_string(), |n| n.to_string());
        let _ = write!(
            s,
            ", injected {}, eoi {}, errors {}",
            by_kvm(irq.injected),
            by_kvm(irq.eois),
            irq.errors + self.chip.line_errors()
        );
        if let Some(m) = &self.chip.model_stats() {
            let _ = write!(
                s,
                ", bad ioapic accesses {}, bad lapic accesses {}, storm reports {}",
                m.ioapic_bad_accesses, m.lapic_bad_accesses, m.storm_reports
            );
            if m.storm_pins != 0 {
                let _ = write!(s, " (pins {:#x})", m.storm_pins);
            }
            if m.eoi_pokes != 0 {
                let _ = write!(s, ", eoi pokes {}", m.eoi_pokes);
            }
            if m.ignored_events != 0 {
                let _ = write!(s, ", ignored events {}", m.ignored_events);
            }
        }
        let _ = write!(s, "; {}; {}", self.pv.msi_part(), self.pv);
        s
    }

    /// The same counters as [`RunStats::line`], as a JSON object
    /// (`--stats-json`; the README's "Statistics as JSON" has the keys).
    /// Counters KVM keeps to itself (kernel mode's injections and EOIs)
    /// are `null`; `model` is `null` in kernel mode.
    pub(crate) fn json(&self) -> serde_json::Value {
        let v = &self.vcpu;
        let irq = self.chip.stats();
        let assertions = self.chip.line_assertions();
        let devices: Vec<_> = self
            .pio
            .counters()
            .into_iter()
            .chain(self.mmio.counters())
            .map(|c| json!({"name": c.name, "reads": c.reads, "writes": c.writes}))
            .collect();
        let (pr, pw) = self.pio.unclaimed_counts();
        let (mr, mw) = self.mmio.unclaimed_counts();
        let model = self.chip.model_stats().map(|m| {
            json!({
                "bad_ioapic_accesses": m.ioapic_bad_accesses,
                "bad_lapic_accesses": m.lapic_bad_accesses,
                "storm_reports": m.storm_reports,
                "storm_pins": m.storm_pins,
                "eoi_pokes": m.eoi_pokes,
                "ignored_events": m.ignored_events,
            })
        });
        let p = &self.pv;
        let by_status: serde_json::Map<_, _> = p
            .by_status
            .iter()
            .map(|&(name, n)| (name.to_string(), json!(n)))
            .collect();
        json!({
            "irqchip": self.chip.mode().name(),
            "cpus": self.chip.cpus(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "exits": v.runs,
            "exit_kinds": {
                "io_in": v.io_in,
                "io_out": v.io_out,
                "mmio_read": v.mmio_read,
                "mmio_write": v.mmio_write,
                "irqchip": v.irqchip,
            },
            "kicks": v.kicks,
            "eagain": v.eagain,
            "devices": devices,
            "unclaimed": {"pio_reads": pr, "pio_writes": pw, "mmio_reads": mr, "mmio_writes": mw},
            "irq": {
                "lines_asserted": assertions.iter().map(|(_, c)| c).sum::<u64>(),
                "lines_asserted_per_gsi": assertions
                    .iter()
                    .map(|(g, c)| (g.to_string(), json!(c)))
                    .collect::<serde_json::Map<_, _>>(),
                "injected": irq.injected,
                "eoi": irq.eois,
                "errors": irq.errors + self.chip.line_errors(),
                "model": model,
            },
            "msi": {
                "programmed": p.messages_programmed,
                "sent": p.msi_sent,
                "dropped": p.msi_dropped,
                "failed": p.msi_errors,
                "bad_accesses": p.msidev_bad_accesses,
            },
            "pv": {
                "requests": p.answered(),
                "by_status": by_status,
                "other_status": p.other_status,
                "unreadable": p.unreadable,
                "unwritable": p.unwritable,
                "routes": p.routes_applied,
                "route_failures": p.route_failures,
                "storm_masks": p.storm_masks,
                "bad_accesses": p.bad_accesses,
            },
        })
    }
}
