//! What every mode implements, and the counters they keep.
//!
//! Two layers, one per thread role:
//!
//! - [`Backend`]: the VM-wide chip, called from any thread (line changes,
//!   IOAPIC MMIO, host pin programs, timers).
//! - [`VcpuBackend`]: one per vCPU, called on that vCPU's thread by
//!   [`crate::VcpuChip::run`] around each `KVM_RUN`.
//!
//! Where each mode plugs in:
//!
//! | hook | kernel | split | user |
//! |---|---|---|---|
//! | setup | `KVM_CREATE_IRQCHIP` | `KVM_ENABLE_CAP(SPLIT_IRQCHIP, 24)`, one MSI route per pin | user-space MSR exits, MSR filter for IA32_APIC_BASE and IA32_TSC_DEADLINE |
//! | `set_level` | `KVM_IRQ_LINE` | our IOAPIC -> routes refreshed -> `KVM_SIGNAL_MSI` | our IOAPIC -> APIC bus -> our LAPIC; wake the target vCPU |
//! | `signal_msi` | `KVM_SIGNAL_MSI` | `KVM_SIGNAL_MSI` | decode -> APIC bus -> our LAPIC; wake the target vCPU |
//! | IOAPIC MMIO | none (in KVM) | `0xfec00000` | `0xfec00000` |
//! | `program_pin` | `KVM_GET_IRQCHIP`, edit, `KVM_SET_IRQCHIP` | our IOAPIC | our IOAPIC |
//! | `before_run` | nothing | the EOI watch's pokes | INIT/SIPI, HLT parking, `KVM_NMI`, `KVM_INTERRUPT` or an interrupt window; CR8 out |
//! | `after_run` | nothing | nothing | CR8 and IF in from `kvm_run` |
//! | chip exits | none | `IoapicEoi` | `IrqWindowOpen`, `Hlt`, LAPIC MMIO, x2APIC MSRs, `SetTpr` |
//! | timers | none | the EOI watch | one per LAPIC timer (and TPR poll) |
//!
//! Backends are built as `Arc<Self>`, and methods that hand out a part
//! holding the backend take `self: Arc<Self>`: one pattern for every mode.

use std::os::fd::RawFd;
use std::sync::Arc;

use irqchip::ioapic::RedirectionEntry;
use irqchip::msi::Msi;
use kvm_bindings::{kvm_msi, kvm_run};
use kvm_ioctls::VcpuFd;

use crate::error::{Error, IrqError};
use crate::ioapic_host::HostedIoapic;
use crate::vcpu::ChipExit;

/// Counters a chip keeps, for a VMM's statistics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IrqStats {
    /// Interrupts the VMM itself injected or sent (user mode:
    /// `KVM_INTERRUPT`; split: MSIs sent); `None` when KVM's chip delivers
    /// and the VMM cannot see deliveries (kernel mode).
    pub injected: Option<u64>,
    /// EOIs the VMM handled (split: `KVM_EXIT_IOAPIC_EOI`; user: LAPIC EOI
    /// writes); `None` when KVM handles every EOI.
    pub eois: Option<u64>,
    /// Failures inside the chip (ioctls that failed on the interrupt path),
    /// not counting refused line changes.
    pub errors: u64,
}

/// Counters of our own models (split and user modes).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ModelStats {
    /// Guest IOAPIC accesses the model ignored (bad offset or width, no
    /// register selected, read-only register, no such pin).
    pub ioapic_bad_accesses: u64,
    /// Guest LAPIC accesses the model ignored or faulted (user mode).
    pub lapic_bad_accesses: u64,
    /// IOAPIC storm-guard reports (see `irqchip::ioapic`, "Storm guard").
    pub storm_reports: u64,
    /// Pins that had a storm report, bit `n` for pin `n`.
    pub storm_pins: u32,
    /// Split mode: halted vCPUs the EOI watch made runnable so a held
    /// `KVM_EXIT_IOAPIC_EOI` comes out (see the split module).
    pub eoi_pokes: u64,
    /// User mode: events the vCPU loop dropped (ExtINT and SMI, which this
    /// platform does not wire; a SIPI to a vCPU not waiting for one).
    pub ignored_events: u64,
}

/// The storm guard's callback ([`crate::Irqchip::set_storm_sink`]): called
/// with a pin our IOAPIC model reported storming, with no chip lock held,
/// so it may program pins.
pub type StormSink = Arc<dyn Fn(u8) + Send + Sync>;

/// The VM-wide part of a mode.
///
/// `set_level` is called from any thread and applies the change before it
/// returns. The IOAPIC operations go to our IOAPIC ([`Backend::our_ioapic`])
/// in the modes that host it; kernel mode overrides the ones KVM does.
pub(crate) trait Backend: Send + Sync {
    /// Our IOAPIC, in the modes that host it (split, user).
    fn our_ioapic(&self) -> Option<&dyn HostedIoapic> {
        None
    }

    /// Sets the level of `gsi`. Edge semantics are the caller's pulse.
    fn set_level(&self, gsi: u32, high: bool) -> Result<(), IrqError> {
        match self.our_ioapic() {
            Some(ioapic) => ioapic.set_level(gsi, high),
            None => Err(IrqError::NoSuchGsi(gsi)),
        }
    }

    /// A device's message-signaled interrupt: `msi` (compatibility format)
    /// goes to the local APICs it addresses.
    fn signal_msi(&self, msi: Msi) -> Result<(), IrqError>;

    /// A guest read of our IOAPIC's registers at `offset` from its base;
    /// `false` when the mode has no IOAPIC of ours.
    fn ioapic_read(&self, offset: u64, data: &mut [u8]) -> bool {
        self.our_ioapic()
            .map(|ioapic| ioapic.mmio_read(offset, data))
            .is_some()
    }

    /// A guest write of our IOAPIC's registers; `false` when the mode has
    /// no IOAPIC of ours.
    fn ioapic_write(&self, offset: u64, data: &[u8]) -> bool {
        self.our_ioapic()
            .map(|ioapic| ioapic.mmio_write(offset, data))
            .is_some()
    }

    /// The per-vCPU part of vCPU `index`, whose descriptor is `fd`.
    fn vcpu(self: Arc<Self>, index: usize, fd: &VcpuFd) -> Result<Box<dyn VcpuBackend>, Error>;

    /// Counters.
    fn stats(&self) -> IrqStats;

    /// Programs IOAPIC `pin` from the host: its writable fields become
    /// `entry`'s (Remote IRR and delivery status stay the chip's,
    /// `RedirectionEntry::written`), serialised with every line change.
    fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), IrqError> {
        match self.our_ioapic() {
            Some(ioapic) => ioapic.program_pin(pin, entry),
            None => Err(IrqError::NoSuchGsi(u32::from(pin))),
        }
    }

    /// Counters of our own models; `None` in kernel mode.
    fn model_stats(&self) -> Option<ModelStats> {
        None
    }

    /// Installs the storm guard's callback (split and user modes).
    fn set_storm_sink(&self, sink: StormSink) {
        if let Some(ioapic) = self.our_ioapic() {
            ioapic.set_storm_sink(sink);
        }
    }

    /// Timer descriptors to watch; when descriptor `i` is readable, call
    /// [`Backend::on_timer`]`(i)`.
    fn timer_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Timer `index` of [`Backend::timer_fds`] is readable.
    fn on_timer(&self, _index: usize) {}

    /// The VM is stopping: wake any vCPU thread the mode holds itself.
    fn shutdown(&self) {}
}

/// The `KVM_SIGNAL_MSI` payload of `msi`.
pub(crate) fn kvm_msi_of(msi: Msi) -> kvm_msi {
    kvm_msi {
        address_lo: msi.address as u32,
        address_hi: (msi.address >> 32) as u32,
        data: msi.data,
        ..Default::default()
    }
}

/// The vector of a compatibility-format MSI (data bits 7:0, SDM Vol. 3A
/// 11.11.2), for trace events.
pub(crate) fn msi_vector(msi: Msi) -> u8 {
    (msi.data & 0xff) as u8
}

/// What the vCPU's run does after [`VcpuBackend::on_exit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitAction {
    /// Handled: run the guest again.
    Resume,
    /// The exit does not belong here (an MSR exit becomes #GP; anything
    /// else is an error of the mode).
    Unexpected,
}

/// The per-vCPU part of a mode; lives on its vCPU's thread.
pub(crate) trait VcpuBackend: Send {
    /// Before every `KVM_RUN`.
    fn before_run(&mut self, _vcpu: &mut VcpuFd) -> Result<(), Error> {
        Ok(())
    }

    /// After every return from `KVM_RUN` (exits and `EINTR` alike), before
    /// the chip's exit is handled, with the run page as KVM left it.
    fn after_run(&mut self, _run: &kvm_run) {}

    /// Whether guest-physical `addr` is in this vCPU's local APIC window
    /// (user mode).
    fn owns_mmio(&self, _addr: u64) -> bool {
        false
    }

    /// An exit that belongs to the chip.
    fn on_exit(&mut self, exit: ChipExit<'_>) -> ExitAction;
}
