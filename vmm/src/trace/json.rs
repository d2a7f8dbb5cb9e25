//! The recorded events as a Chrome trace-event JSON object
//! (`{"traceEvents": [...], "displayTimeUnit": "ns", "otherData": {...}}`).
//!
//! Tracks (pid = a group, tid = a track in it; names in `M` events):
//!
//! | pid | tid | track | what is on it |
//! |---|---|---|---|
//! | 1 `vCPUs` | `i` | `vCPU i` | `KVM_RUN (reason)` slices; `inject`, `EOI` and `parked` slices (user); IPI, timer and EOI-poke instants |
//! | 1 | 1000 | `KVM LAPICs` | split: each `KVM_SIGNAL_MSI` handing a vector to KVM's LAPICs |
//! | 2 `IOAPIC` | `p` | `pin p` | `deliver` slices, storm instants; counters `pin p level`, `pin p remote IRR`, `pin p masked` |
//! | 2 | 100 | `device MSIs` | `msi` slices |
//! | 3 `PV service` | `i` | `vCPU i requests` | one slice per doorbell request, opcode and status in its name and arguments |
//! | 4 `guest tests` | 0 | `tests` | one slice per guest test, from its marker to its result line |
//!
//! Flow arrows (`s`, `t`, `f` events, category `irq`) go from a pin's
//! delivery (or a device MSI) to the injection it caused, then to that
//! vector's EOI on the same vCPU.
//!
//! Times are microseconds with nanosecond decimals. Everything a guest
//! controls (test names) is escaped by serde_json.

use std::collections::HashMap;
use std::io::{self, Write};

use irqchip::apic_bus::ApicSet;
use irqchip_kvm::{Mode, TraceEvent};
use irqconnect_abi::ntstatus::status_name;
use irqconnect_abi::pv::opcode;

use super::{Event, Stamped};

/// Track groups.
const PID_VCPUS: u32 = 1;
const PID_IOAPIC: u32 = 2;
const PID_PV: u32 = 3;
const PID_TESTS: u32 = 4;
/// The split-mode track of sends to KVM's LAPICs.
const TID_KVM_LAPICS: usize = 1000;
/// The device-MSI track in the IOAPIC group.
const TID_MSI: usize = 100;
/// Width of a point slice (delivery, injection, EOI), in ns: flow arrows
/// bind to slices, so these are slices, one nanosecond long.
const POINT_NS: u64 = 1;

/// What the file says about the run.
pub(crate) struct Meta {
    /// The irqchip mode.
    pub(crate) mode: Mode,
    /// vCPUs.
    pub(crate) cpus: usize,
    /// `--trace-limit`.
    pub(crate) limit: usize,
}

/// What kernel mode cannot show, said in the file.
const KERNEL_NOTE: &str = "kernel mode: KVM's IOAPIC and LAPICs deliver, inject and take EOIs inside the kernel; this trace has line levels, KVM_RUN exits, device MSIs, PV requests and tests, but no deliveries, injections, EOIs or pin state";

/// Writes the whole file.
pub(crate) fn write(
    out: &mut impl Write,
    events: &[Stamped],
    dropped: u64,
    meta: &Meta,
) -> io::Result<()> {
    let mut w = Writer {
        out,
        first: true,
        split: meta.mode == Mode::Split,
        state: State::default(),
    };
    w.out
        .write_all(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")?;
    w.metadata(meta)?;
    let first_ns = events.first().map_or(0, |e| e.ns);
    if dropped > 0 {
        w.global_instant(
            first_ns,
            &format!(
                "{dropped} older events dropped (--trace-limit {})",
                meta.limit
            ),
        )?;
    }
    if meta.mode == Mode::Kernel {
        w.global_instant(first_ns, KERNEL_NOTE)?;
    }
    for e in events {
        w.event(e)?;
    }
    let end = events.last().map_or(0, |e| e.ns);
    w.close_open(end)?;
    write!(
        w.out,
        "\n],\"otherData\":{{\"producer\":\"vmm --trace\",\"irqchip\":\"{}\",\"cpus\":{},\"trace_limit\":{},\"events_kept\":{},\"events_dropped\":{}",
        meta.mode.name(),
        meta.cpus,
        meta.limit,
        events.len(),
        dropped
    )?;
    if meta.mode == Mode::Kernel {
        w.out.write_all(b",\"note\":")?;
        serde_json::to_writer(&mut w.out, KERNEL_NOTE)?;
    }
    w.out.write_all(b"}}\n")
}

/// Open slices and flow bookkeeping while the events are written.
#[derive(Default)]
struct State {
    /// Per vCPU: when its current `KVM_RUN` began.
    run_since: HashMap<usize, u64>,
    /// Per vCPU: when its thread parked.
    parked_since: HashMap<usize, u64>,
    /// The test the marker named last, and when.
    test: Option<(Box<str>, u64)>,
    /// When the last test ended (a test whose marker was dropped starts there).
    last_test_end: u64,
    next_flow: u64,
    /// Flows waiting for an injection: per (vCPU, vector), and per vector
    /// when the target is KVM's choice.
    pending: HashMap<(usize, u8), u64>,
    pending_any: HashMap<u8, u64>,
    /// Flows waiting for an EOI, keyed the same way.
    in_service: HashMap<(usize, u8), u64>,
    in_service_any: HashMap<u8, u64>,
}

struct Writer<'a, W: Write> {
    out: &'a mut W,
    first: bool,
    /// Split mode: injections are sends to KVM's LAPICs.
    split: bool,
    state: State,
}

/// `ns` as trace microseconds.
struct Us(u64);

impl std::fmt::Display for Us {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// A target list as JSON: `[0,2]`, or `null` when KVM chooses.
fn targets_json(targets: Option<&ApicSet>) -> String {
    match targets {
        Some(set) => {
            let list: Vec<String> = set.iter().map(|i| i.to_string()).collect();
            format!("[{}]", list.join(","))
        }
        None => "null".to_string(),
    }
}

/// The name of a PV opcode, for slice names.
fn opcode_label(op: Option<u16>) -> &'static str {
    op.map_or("unread request", opcode::name)
}

impl<W: Write> Writer<'_, W> {
    /// Starts one event object (comma-separated).
    fn begin(&mut self) -> io::Result<()> {
        if !self.first {
            self.out.write_all(b",\n")?;
        }
        self.first = false;
        Ok(())
    }

    fn metadata(&mut self, meta: &Meta) -> io::Result<()> {
        let processes = [
            (PID_VCPUS, "vCPUs"),
            (PID_IOAPIC, "IOAPIC"),
            (PID_PV, "PV service"),
            (PID_TESTS, "guest tests"),
        ];
        for (pid, name) in processes {
            self.begin()?;
            write!(
                self.out,
                "{{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":{pid},\"tid\":0,\"args\":{{\"name\":\"{name}\"}}}}"
            )?;
            self.begin()?;
            write!(
                self.out,
                "{{\"ph\":\"M\",\"name\":\"process_sort_index\",\"pid\":{pid},\"tid\":0,\"args\":{{\"sort_index\":{pid}}}}}"
            )?;
        }
        for i in 0..meta.cpus {
            self.thread_name(PID_VCPUS, i, &format!("vCPU {i}"))?;
            self.thread_name(PID_PV, i, &format!("vCPU {i} requests"))?;
        }
        if meta.mode == Mode::Split {
            self.thread_name(PID_VCPUS, TID_KVM_LAPICS, "KVM LAPICs")?;
        }
        for pin in 0..irqchip::ioapic::NUM_PINS {
            self.thread_name(PID_IOAPIC, pin, &format!("pin {pin}"))?;
        }
        self.thread_name(PID_IOAPIC, TID_MSI, "device MSIs")?;
        self.thread_name(PID_TESTS, 0, "tests")
    }

    fn thread_name(&mut self, pid: u32, tid: usize, name: &str) -> io::Result<()> {
        self.begin()?;
        write!(
            self.out,
            "{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{pid},\"tid\":{tid},\"args\":{{\"name\":\"{name}\"}}}}"
        )?;
        self.begin()?;
        write!(
            self.out,
            "{{\"ph\":\"M\",\"name\":\"thread_sort_index\",\"pid\":{pid},\"tid\":{tid},\"args\":{{\"sort_index\":{tid}}}}}"
        )
    }

    fn global_instant(&mut self, ns: u64, name: &str) -> io::Result<()> {
        self.begin()?;
        self.out.write_all(b"{\"ph\":\"i\",\"s\":\"g\",\"name\":")?;
        serde_json::to_writer(&mut *self.out, name)?;
        write!(
            self.out,
            ",\"pid\":{PID_VCPUS},\"tid\":0,\"ts\":{}}}",
            Us(ns)
        )
    }

    /// A complete slice; `args` is a JSON object's inside (may be empty).
    fn slice(
        &mut self,
        (pid, tid): (u32, usize),
        name: &str,
        cat: &str,
        start: u64,
        end: u64,
        args: &str,
    ) -> io::Result<()> {
        self.begin()?;
        self.out.write_all(b"{\"ph\":\"X\",\"name\":")?;
        serde_json::to_writer(&mut *self.out, name)?;
        write!(
            self.out,
            ",\"cat\":\"{cat}\",\"pid\":{pid},\"tid\":{tid},\"ts\":{},\"dur\":{},\"args\":{{{args}}}}}",
            Us(start),
            Us(end.saturating_sub(start))
        )
    }

    /// A thread-scoped instant; category `cause` when `args` hold a vector
    /// and its targets, `irqchip` otherwise.
    fn instant(&mut self, pid: u32, tid: usize, name: &str, ns: u64, args: &str) -> io::Result<()> {
        self.begin()?;
        let cat = if args.is_empty() { "irqchip" } else { "cause" };
        write!(
            self.out,
            "{{\"ph\":\"i\",\"s\":\"t\",\"name\":\"{name}\",\"cat\":\"{cat}\",\"pid\":{pid},\"tid\":{tid},\"ts\":{},\"args\":{{{args}}}}}",
            Us(ns)
        )
    }

    fn counter(&mut self, name: &str, ns: u64, value: u8) -> io::Result<()> {
        self.begin()?;
        write!(
            self.out,
            "{{\"ph\":\"C\",\"name\":\"{name}\",\"pid\":{PID_IOAPIC},\"tid\":0,\"ts\":{},\"args\":{{\"value\":{value}}}}}",
            Us(ns)
        )
    }

    /// A flow event (`s`, `t` or `f`) of flow `id` at `ns` on a track.
    fn flow(&mut self, ph: char, id: u64, pid: u32, tid: usize, ns: u64) -> io::Result<()> {
        self.begin()?;
        let bp = if ph == 'f' { ",\"bp\":\"e\"" } else { "" };
        write!(
            self.out,
            "{{\"ph\":\"{ph}\",\"name\":\"irq\",\"cat\":\"irq\",\"id\":{id},\"pid\":{pid},\"tid\":{tid},\"ts\":{}{bp}}}",
            Us(ns)
        )
    }

    /// A cause (pin delivery or device MSI) at `ns` on a track: starts a
    /// flow waiting for the injection on each target.
    fn start_flow(
        &mut self,
        pid: u32,
        tid: usize,
        ns: u64,
        vector: u8,
        targets: Option<&ApicSet>,
    ) -> io::Result<()> {
        let id = self.state.next_flow;
        self.state.next_flow += 1;
        self.flow('s', id, pid, tid, ns)?;
        match targets {
            Some(set) => {
                for vcpu in set.iter() {
                    self.state.pending.insert((vcpu, vector), id);
                }
            }
            None => {
                self.state.pending_any.insert(vector, id);
            }
        }
        Ok(())
    }

    fn event(&mut self, e: &Stamped) -> io::Result<()> {
        let ns = e.ns;
        match &e.event {
            Event::Chip(c) => self.chip(ns, c),
            Event::Pv {
                vcpu,
                opcode,
                status,
                start_ns,
            } => {
                let status_label = status.map_or("no answer", status_name);
                let name = format!("{} -> {status_label}", opcode_label(*opcode));
                let args = format!(
                    "\"opcode\":{},\"status\":{}",
                    opcode.map_or("null".to_string(), |o| o.to_string()),
                    status.map_or("null".to_string(), |s| format!("\"{s:#010x}\""))
                );
                self.slice((PID_PV, *vcpu), &name, "pv", *start_ns, ns, &args)
            }
            Event::TestStart { name } => {
                if let Some((open, since)) = self.state.test.take() {
                    self.slice(
                        (PID_TESTS, 0),
                        &open,
                        "test",
                        since,
                        ns,
                        "\"verdict\":\"none\"",
                    )?;
                }
                self.state.test = Some((name.clone(), ns));
                Ok(())
            }
            Event::TestEnd { name, verdict } => {
                let since = match self.state.test.take() {
                    Some((open, since)) if open == *name => since,
                    Some(other) => {
                        self.state.test = Some(other);
                        self.state.last_test_end
                    }
                    None => self.state.last_test_end,
                };
                self.state.last_test_end = ns;
                let args = format!("\"verdict\":\"{verdict}\"");
                self.slice((PID_TESTS, 0), name, "test", since, ns, &args)
            }
        }
    }

    fn chip(&mut self, ns: u64, c: &TraceEvent) -> io::Result<()> {
        match *c {
            TraceEvent::RunEnter { vcpu } => {
                self.state.run_since.insert(vcpu, ns);
                Ok(())
            }
            TraceEvent::RunExit {
                vcpu,
                reason,
                detail,
            } => {
                let Some(since) = self.state.run_since.remove(&vcpu) else {
                    return Ok(());
                };
                let name = format!("KVM_RUN ({reason})");
                let args = if detail != 0 {
                    format!("\"detail\":\"{detail:#x}\"")
                } else {
                    String::new()
                };
                self.slice((PID_VCPUS, vcpu), &name, "exit", since, ns, &args)
            }
            TraceEvent::Line { gsi, high } => {
                self.counter(&format!("pin {gsi} level"), ns, u8::from(high))
            }
            TraceEvent::PinDelivery {
                pin,
                vector,
                level,
                targets,
            } => {
                let tid = usize::from(pin);
                let args = format!(
                    "\"vector\":{vector},\"level\":{level},\"targets\":{}",
                    targets_json(targets.as_ref())
                );
                let name = format!("deliver v{vector:#04x}");
                self.slice((PID_IOAPIC, tid), &name, "cause", ns, ns + POINT_NS, &args)?;
                self.start_flow(PID_IOAPIC, tid, ns, vector, targets.as_ref())
            }
            TraceEvent::RemoteIrr { pin, set } => {
                self.counter(&format!("pin {pin} remote IRR"), ns, u8::from(set))
            }
            TraceEvent::Mask { pin, masked } => {
                self.counter(&format!("pin {pin} masked"), ns, u8::from(masked))
            }
            TraceEvent::Storm { pin } => {
                self.instant(PID_IOAPIC, usize::from(pin), "storm", ns, "")
            }
            TraceEvent::Msi { vector, targets } => {
                let args = format!(
                    "\"vector\":{vector},\"targets\":{}",
                    targets_json(targets.as_ref())
                );
                let name = format!("msi v{vector:#04x}");
                self.slice(
                    (PID_IOAPIC, TID_MSI),
                    &name,
                    "cause",
                    ns,
                    ns + POINT_NS,
                    &args,
                )?;
                self.start_flow(PID_IOAPIC, TID_MSI, ns, vector, targets.as_ref())
            }
            TraceEvent::Ipi {
                from,
                vector,
                targets,
            } => {
                let args = format!(
                    "\"vector\":{vector},\"targets\":{}",
                    targets_json(Some(&targets))
                );
                self.instant(PID_VCPUS, from, "ipi", ns, &args)
            }
            TraceEvent::Timer { vcpu, vector } => {
                let args = format!("\"vector\":{vector},\"targets\":[{vcpu}]");
                self.instant(PID_VCPUS, vcpu, "timer", ns, &args)
            }
            TraceEvent::Inject { vcpu, vector } => self.inject(ns, vcpu, vector),
            TraceEvent::Eoi { vcpu, vector } => self.eoi(ns, vcpu, vector),
            TraceEvent::Park { vcpu } => {
                self.state.parked_since.insert(vcpu, ns);
                Ok(())
            }
            TraceEvent::Unpark { vcpu } => match self.state.parked_since.remove(&vcpu) {
                Some(since) => self.slice((PID_VCPUS, vcpu), "parked", "halt", since, ns, ""),
                None => Ok(()),
            },
            TraceEvent::EoiPoke { vcpu } => self.instant(PID_VCPUS, vcpu, "EOI poke", ns, ""),
            // A newer chip's event this writer does not draw.
            _ => Ok(()),
        }
    }

    fn inject(&mut self, ns: u64, vcpu: Option<usize>, vector: u8) -> io::Result<()> {
        // User mode injects on the vCPU's own track; split hands the
        // vector to KVM's LAPICs, whatever thread sends it.
        let (tid, on_vcpu) = match vcpu {
            Some(i) if !self.split => (i, true),
            _ => (TID_KVM_LAPICS, false),
        };
        let args = format!(
            "\"vector\":{vector},\"vcpu\":{}",
            vcpu.map_or("null".to_string(), |i| i.to_string())
        );
        let name = format!("inject v{vector:#04x}");
        self.slice((PID_VCPUS, tid), &name, "inject", ns, ns + POINT_NS, &args)?;
        let s = &mut self.state;
        let flow = vcpu
            .and_then(|i| s.pending.remove(&(i, vector)))
            .or_else(|| s.pending_any.remove(&vector));
        if let Some(id) = flow {
            self.flow('t', id, PID_VCPUS, tid, ns)?;
            match vcpu {
                Some(i) if on_vcpu => self.state.in_service.insert((i, vector), id),
                _ => self.state.in_service_any.insert(vector, id),
            };
        }
        Ok(())
    }

    fn eoi(&mut self, ns: u64, vcpu: usize, vector: Option<u8>) -> io::Result<()> {
        let args = match vector {
            Some(v) => format!("\"vector\":{v}"),
            None => "\"vector\":null".to_string(),
        };
        let name = match vector {
            Some(v) => format!("EOI v{v:#04x}"),
            None => "EOI".to_string(),
        };
        self.slice((PID_VCPUS, vcpu), &name, "eoi", ns, ns + POINT_NS, &args)?;
        let Some(v) = vector else { return Ok(()) };
        let s = &mut self.state;
        if let Some(id) = s
            .in_service
            .remove(&(vcpu, v))
            .or_else(|| s.in_service_any.remove(&v))
        {
            self.flow('f', id, PID_VCPUS, vcpu, ns)?;
        }
        Ok(())
    }

    /// Ends what is still open at the last event: runs, parks, a test.
    fn close_open(&mut self, end: u64) -> io::Result<()> {
        let mut runs: Vec<_> = self.state.run_since.drain().collect();
        runs.sort_unstable();
        for (vcpu, since) in runs {
            self.slice(
                (PID_VCPUS, vcpu),
                "KVM_RUN (open at the end)",
                "exit",
                since,
                end,
                "",
            )?;
        }
        let mut parks: Vec<_> = self.state.parked_since.drain().collect();
        parks.sort_unstable();
        for (vcpu, since) in parks {
            self.slice((PID_VCPUS, vcpu), "parked", "halt", since, end, "")?;
        }
        if let Some((name, since)) = self.state.test.take() {
            self.slice(
                (PID_TESTS, 0),
                &name,
                "test",
                since,
                end,
                "\"verdict\":\"none\"",
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ns: u64, event: TraceEvent) -> Stamped {
        Stamped {
            ns,
            event: Event::Chip(event),
        }
    }

    fn written(mode: Mode, events: &[Stamped], dropped: u64) -> serde_json::Value {
        let mut out = Vec::new();
        let meta = Meta {
            mode,
            cpus: 1,
            limit: 10,
        };
        write(&mut out, events, dropped, &meta).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn of_phase<'a>(v: &'a serde_json::Value, ph: &str) -> Vec<&'a serde_json::Value> {
        v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == ph)
            .collect()
    }

    #[test]
    fn unit_delivery_injection_eoi_are_one_flow() {
        let events = [
            at(1_000, TraceEvent::Line { gsi: 5, high: true }),
            at(
                1_100,
                TraceEvent::PinDelivery {
                    pin: 5,
                    vector: 0x41,
                    level: true,
                    targets: Some(ApicSet::single(0)),
                },
            ),
            at(2_000, TraceEvent::RunEnter { vcpu: 0 }),
            at(
                3_500,
                TraceEvent::RunExit {
                    vcpu: 0,
                    reason: "io-out",
                    detail: 0x2005,
                },
            ),
            at(
                4_000,
                TraceEvent::Inject {
                    vcpu: Some(0),
                    vector: 0x41,
                },
            ),
            at(
                5_000,
                TraceEvent::Eoi {
                    vcpu: 0,
                    vector: Some(0x41),
                },
            ),
        ];

        let v = written(Mode::User, &events, 0);

        let flows: Vec<_> = ["s", "t", "f"].iter().map(|p| of_phase(&v, p)).collect();
        assert!(flows.iter().all(|f| f.len() == 1));
        assert!(flows.iter().all(|f| f[0]["id"] == flows[0][0]["id"]));
        assert_eq!(flows[0][0]["pid"], PID_IOAPIC);
        assert_eq!(
            (flows[1][0]["tid"].as_u64(), flows[2][0]["bp"].as_str()),
            (Some(0), Some("e"))
        );
        let run = of_phase(&v, "X")
            .into_iter()
            .find(|e| e["name"] == "KVM_RUN (io-out)")
            .unwrap();
        assert_eq!(
            (run["ts"].as_f64(), run["dur"].as_f64()),
            (Some(2.0), Some(1.5))
        );
        assert_eq!(run["args"]["detail"], "0x2005");
        let level = of_phase(&v, "C");
        assert_eq!(level[0]["name"], "pin 5 level");
        assert_eq!(level[0]["args"]["value"], 1);
    }

    #[test]
    fn unit_dropped_events_and_kernel_mode_are_said_in_the_file() {
        let events = [at(
            7,
            TraceEvent::Line {
                gsi: 1,
                high: false,
            },
        )];

        let v = written(Mode::Kernel, &events, 42);

        let notes: Vec<_> = of_phase(&v, "i")
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        assert!(
            notes
                .iter()
                .any(|n| n == "42 older events dropped (--trace-limit 10)")
        );
        assert!(notes.iter().any(|n| n.starts_with("kernel mode:")));
        assert_eq!(v["otherData"]["events_dropped"], 42);
    }

    #[test]
    fn unit_test_names_are_escaped_and_slices_close_at_the_end() {
        let events = [
            Stamped {
                ns: 10,
                event: Event::TestStart {
                    name: "a\"b\\\n".into(),
                },
            },
            at(20, TraceEvent::RunEnter { vcpu: 0 }),
            at(30, TraceEvent::Park { vcpu: 0 }),
        ];

        let v = written(Mode::User, &events, 0);

        let slices = of_phase(&v, "X");
        assert!(
            slices
                .iter()
                .any(|e| e["name"] == "a\"b\\\n" && e["args"]["verdict"] == "none")
        );
        assert!(
            slices
                .iter()
                .any(|e| e["name"] == "KVM_RUN (open at the end)")
        );
    }
}
