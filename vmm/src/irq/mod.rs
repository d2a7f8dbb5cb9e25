//! The interrupt-controller abstraction every `--irqchip` mode implements.
//!
//! Three layers, from the devices inward:
//!
//! 1. [`LineSink`]: what a device model sees, one method, one line. Models
//!    are unit-tested against a recording sink.
//! 2. [`lines::IrqLines`]: the board's wiring. Each device gets an
//!    [`lines::IrqLine`] (a `LineSink`) for one GSI; lines shared by several
//!    sources are wired-OR, and only changes of the combined level reach the
//!    controller. Counts assertions per GSI.
//! 3. [`InterruptController`]: the chip. VM-wide (`set_level`, called from
//!    any thread) plus one [`VcpuInterrupts`] per vCPU that the vCPU loop
//!    calls on its own thread: before each `KVM_RUN` and for the exits that
//!    belong to the interrupt controller.
//!
//! Where each mode plugs in:
//!
//! | hook | kernel | split | user |
//! |---|---|---|---|
//! | VM setup ([`kernel::create`], [`split::create`], [`user::create`]) | `KVM_CREATE_IRQCHIP` | `KVM_ENABLE_CAP(SPLIT_IRQCHIP, 24)`, one MSI route per pin | user-space MSR exits, MSR filter for IA32_APIC_BASE and IA32_TSC_DEADLINE |
//! | `set_level` | `KVM_IRQ_LINE` | our IOAPIC model -> routes refreshed -> `KVM_SIGNAL_MSI` | our IOAPIC -> APIC bus -> our LAPIC; kick the target vCPU |
//! | [`InterruptController::mmio_devices`] | none | IOAPIC window `0xfec00000` | IOAPIC window |
//! | [`VcpuInterrupts::before_run`] | nothing | nothing | INIT/SIPI, HLT parking, `KVM_NMI`, `KVM_INTERRUPT` when `ready_for_interrupt_injection`, else `request_interrupt_window`; CR8 out |
//! | [`VcpuInterrupts::after_run`] | nothing | nothing | CR8 and IF in from `kvm_run` |
//! | [`VcpuInterrupts::on_exit`] | nothing expected | `IoapicEoi(vector)` -> our IOAPIC EOI | `IrqWindowOpen`, `Hlt`, LAPIC MMIO, x2APIC MSRs, `SetTpr` |
//! | [`InterruptController::timer_fds`] | none | none | one timerfd per LAPIC timer, watched by the event loop |
//! | `kick` | - | - | a vCPU with a new deliverable interrupt is kicked ([`crate::kick`]) or its parked thread woken |

pub(crate) mod host_ioapic;
pub(crate) mod kernel;
pub(crate) mod lines;
pub(crate) mod split;
pub(crate) mod user;

use std::os::fd::RawFd;
use std::sync::Arc;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;

use crate::bus::BusDevice;
use crate::cli::IrqchipMode;
use crate::error::Result;

/// A device's view of its interrupt line: one method, so models stay pure.
pub(crate) trait LineSink {
    /// Drives the line high (`true`) or low (`false`). Edge-triggered
    /// devices send a pulse: `set_level(true)` then `set_level(false)`.
    fn set_level(&mut self, high: bool);
}

/// Why a line change could not be applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IrqError {
    /// The GSI is not one the controller has.
    #[error("GSI {0} does not exist")]
    NoSuchGsi(u32),
    /// KVM refused the change.
    #[error("KVM_IRQ_LINE for GSI {gsi}: {source}")]
    Kvm {
        /// The GSI.
        gsi: u32,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The mode cannot program IOAPIC pins from the host
    /// ([`InterruptController::program_pin`]).
    #[error("host pin programming is not supported with --irqchip {0}")]
    Unsupported(&'static str),
    /// A [`PinProgram`] destination does not fit the IOAPIC's destination
    /// field (8 bits, 82093AA 3.2.4).
    #[error("destination {0:#x} does not fit the IOAPIC's 8-bit destination field")]
    DestinationTooWide(u32),
    /// A KVM ioctl on the in-kernel interrupt controller failed.
    #[error("{op}: {source}")]
    KvmChip {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
}

/// How the host programs one IOAPIC pin ([`InterruptController::program_pin`]):
/// the PV connect service's route in redirection-entry terms (82093AA 3.2.4).
/// Polarity is always active high; the read-only bits (delivery status,
/// Remote IRR) are the controller's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PinProgram {
    /// The IDT vector (bits 0..7).
    pub(crate) vector: u8,
    /// Edge or level (bit 15).
    pub(crate) trigger: PinTrigger,
    /// Physical or logical destination (bit 11).
    pub(crate) dest_mode: PinDestMode,
    /// An APIC ID (physical) or a logical destination set (logical). 32 bits
    /// so an x2APIC ID fits; a controller whose entries hold fewer bits
    /// refuses what does not fit ([`IrqError::DestinationTooWide`]).
    pub(crate) destination: u32,
    /// Fixed or lowest-priority delivery (bits 8..10).
    pub(crate) delivery: PinDelivery,
    /// The pin must not deliver (bit 16).
    pub(crate) masked: bool,
}

/// Trigger mode of a [`PinProgram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinTrigger {
    /// Edge-triggered.
    Edge,
    /// Level-triggered.
    Level,
}

/// Destination mode of a [`PinProgram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinDestMode {
    /// The destination is one APIC ID.
    Physical,
    /// The destination is a logical set, matched against each LDR.
    Logical,
}

/// Delivery mode of a [`PinProgram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinDelivery {
    /// Every processor of the destination.
    Fixed,
    /// The lowest-priority processor of the destination.
    LowestPriority,
}

/// Counters a controller keeps; printed in the closing statistics line.
#[derive(Debug, Default, Clone)]
pub(crate) struct IrqStats {
    /// Interrupts the VMM itself injected into vCPUs (user mode:
    /// `KVM_INTERRUPT`; split: MSIs sent); `None` when KVM's chip delivers
    /// and the VMM cannot see deliveries.
    pub(crate) injected: Option<u64>,
    /// EOIs the VMM handled (split: `KVM_EXIT_IOAPIC_EOI`; user: LAPIC EOI
    /// writes); `None` when KVM handles every EOI.
    pub(crate) eois: Option<u64>,
    /// Failures inside the controller (not counting refused line changes,
    /// which the wiring counts).
    pub(crate) errors: u64,
}

/// Counters of our own models (split and user modes), for the statistics
/// line and for policy (the PV service may mask a storming pin).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelStats {
    /// Guest IOAPIC accesses the model ignored (bad offset or width, no
    /// register selected, read-only register, no such pin).
    pub(crate) ioapic_bad_accesses: u64,
    /// Guest LAPIC accesses the model ignored or faulted (user mode).
    pub(crate) lapic_bad_accesses: u64,
    /// IOAPIC storm-guard reports (see `irqchip::ioapic`, "Storm guard").
    pub(crate) storm_reports: u64,
    /// Pins that had a storm report, bit `n` for pin `n`.
    pub(crate) storm_pins: u32,
    /// Split mode: halted vCPUs the EOI watch made runnable so a held
    /// `KVM_EXIT_IOAPIC_EOI` comes out (a host quirk, see `split`).
    pub(crate) eoi_pokes: u64,
    /// User mode: events the vCPU loop dropped (ExtINT and SMI, which this
    /// platform does not wire; a SIPI to a vCPU not waiting for one).
    pub(crate) ignored_events: u64,
}

/// The storm guard's callback (the PV service's `storm_sink`): called with a
/// pin the IOAPIC model reported storming, with no controller lock held.
pub(crate) type StormSink = Arc<dyn Fn(u8) + Send + Sync>;

/// An MMIO window a controller emulates in user space (e.g. the IOAPIC).
pub(crate) struct MmioWindow {
    /// Guest-physical base.
    pub(crate) base: u64,
    /// Length in bytes.
    pub(crate) len: u64,
    /// Name for statistics.
    pub(crate) name: &'static str,
    /// The device.
    pub(crate) device: Arc<std::sync::Mutex<dyn BusDevice>>,
}

/// One interrupt controller (IOAPIC + local APICs), VM-wide part.
///
/// `set_level` is called from any thread (vCPU threads for port writes, the
/// event-loop thread for timers and stdin). Implementations must apply the
/// change before returning, so a vCPU that wrote a pc-testdev port sees its
/// effect when it re-enters `KVM_RUN`.
pub(crate) trait InterruptController: Send + Sync {
    /// Which mode this is.
    fn mode(&self) -> IrqchipMode;

    /// Number of GSIs (IOAPIC pins) the controller has.
    fn gsi_count(&self) -> u32;

    /// Sets the level of `gsi`. Edge semantics are the caller's pulse.
    fn set_level(&self, gsi: u32, high: bool) -> std::result::Result<(), IrqError>;

    /// MMIO windows the controller emulates in user space, with their base
    /// and length (split and user modes: the IOAPIC).
    fn mmio_devices(&self) -> Vec<MmioWindow> {
        Vec::new()
    }

    /// The per-vCPU part for vCPU `index`; called once per vCPU before any
    /// vCPU thread starts.
    fn vcpu(&self, index: usize) -> Box<dyn VcpuInterrupts>;

    /// Counters for the closing statistics line.
    fn stats(&self) -> IrqStats;

    /// Programs IOAPIC `pin` from the host (the PV connect service's
    /// routes), before the calling vCPU resumes. Only the pin's writable
    /// fields change; its Remote IRR and delivery status stay as the
    /// controller has them (switching to edge clears Remote IRR, as the
    /// 82093AA does). Must be serialised with every line change, so no
    /// level change is lost while the entry is rewritten. Modes that cannot
    /// program pins answer [`IrqError::Unsupported`].
    fn program_pin(&self, _pin: u8, _route: &PinProgram) -> std::result::Result<(), IrqError> {
        Err(IrqError::Unsupported(self.mode().name()))
    }

    /// Counters of our own IOAPIC/LAPIC models; `None` in kernel mode.
    fn model_stats(&self) -> Option<ModelStats> {
        None
    }

    /// Installs the storm guard's policy (split and user modes: our IOAPIC
    /// model reports storms; kernel mode never sees EOIs).
    fn set_storm_sink(&self, _sink: StormSink) {}

    /// Timer descriptors the event loop watches for the controller (user
    /// mode: one timerfd per local APIC timer). When descriptor `i` becomes
    /// readable the loop calls [`InterruptController::on_timer`]`(i)`.
    fn timer_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Timer `index` of [`InterruptController::timer_fds`] is readable.
    fn on_timer(&self, _index: usize) {}

    /// The VM is stopping: wake any vCPU the controller itself holds (user
    /// mode parks a halted vCPU on a condition variable, which a kick
    /// signal does not interrupt). Called before the vCPU threads are joined.
    fn shutdown(&self) {}
}

/// Exits that belong to the interrupt controller, handed to
/// [`VcpuInterrupts::on_exit`] by the vCPU loop.
#[derive(Debug)]
pub(crate) enum IrqExit<'a> {
    /// `KVM_EXIT_IOAPIC_EOI` (split mode): the guest EOI'd a level vector.
    IoapicEoi(u8),
    /// `KVM_EXIT_IRQ_WINDOW_OPEN` (user mode).
    IrqWindowOpen,
    /// `KVM_EXIT_HLT`: only without an in-kernel LAPIC.
    Hlt,
    /// `KVM_EXIT_SET_TPR` (user mode: CR8 lowered).
    SetTpr,
    /// An MMIO read in the local APIC window (user mode).
    LapicRead(u64, &'a mut [u8]),
    /// An MMIO write in the local APIC window (user mode).
    LapicWrite(u64, &'a [u8]),
    /// `KVM_EXIT_X86_RDMSR` (user mode, x2APIC MSRs): index, value out.
    RdMsr(u32, &'a mut u64),
    /// `KVM_EXIT_X86_WRMSR` (user mode, x2APIC MSRs): index, value.
    WrMsr(u32, u64),
}

impl IrqExit<'_> {
    /// The exit's name, for messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            IrqExit::IoapicEoi(_) => "IoapicEoi",
            IrqExit::IrqWindowOpen => "IrqWindowOpen",
            IrqExit::Hlt => "Hlt",
            IrqExit::SetTpr => "SetTpr",
            IrqExit::LapicRead(..) => "LAPIC MMIO read",
            IrqExit::LapicWrite(..) => "LAPIC MMIO write",
            IrqExit::RdMsr(..) => "RDMSR",
            IrqExit::WrMsr(..) => "WRMSR",
        }
    }
}

/// What the vCPU loop does after [`VcpuInterrupts::on_exit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitAction {
    /// Handled: run the guest again.
    Resume,
    /// The exit was not expected in this mode: the vCPU loop reports it.
    Unexpected,
}

/// The per-vCPU part of an interrupt controller; lives on its vCPU's thread.
pub(crate) trait VcpuInterrupts: Send {
    /// Called before every `KVM_RUN`. User mode injects here (INIT/SIPI
    /// state, `KVM_INTERRUPT`, interrupt-window requests).
    fn before_run(&mut self, _vcpu: &mut VcpuFd) -> Result<()> {
        Ok(())
    }

    /// Called after every return from `KVM_RUN` (exits and `EINTR` alike),
    /// before the exit's interrupt-controller part is handled, with the run
    /// page as KVM left it. User mode reads the guest's CR8 and IF here.
    fn after_run(&mut self, _run: &kvm_run) {}

    /// Whether guest-physical `addr` is in a window this vCPU's local APIC
    /// emulates in user space (so the vCPU loop sends it to `on_exit`).
    fn owns_mmio(&self, _addr: u64) -> bool {
        false
    }

    /// An interrupt-controller exit.
    fn on_exit(&mut self, exit: IrqExit<'_>) -> ExitAction;
}
