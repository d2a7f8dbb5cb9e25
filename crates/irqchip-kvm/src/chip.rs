//! [`Irqchip`], the VM-wide handle, and its builder.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use irqchip::ioapic::{NUM_PINS, RedirectionEntry};
use irqconnect_abi::layout::{IOAPIC_MMIO_BASE, IOAPIC_MMIO_SIZE, MAX_CPUS};
use kvm_ioctls::{Cap, VcpuFd, VmFd};

use crate::backend::{Backend, IrqStats, ModelStats, StormSink};
use crate::cpuid::Features;
use crate::error::{Error, IrqError};
use crate::kick::{self, Kicker};
use crate::lines::{EventFdLine, IrqLine, IrqLines};
use crate::state::{
    CHIP_STATE_VERSION, ChipState, ConvertError, CountersState, Target, VcpuChipState,
};
use crate::trace::{TraceSink, Tracer};
use crate::vcpu::VcpuChip;
use crate::{DEFAULT_STORM_THRESHOLD, kernel, split, startup, user};
use irqchip::Mode;

/// How to build an [`Irqchip`] ([`Irqchip::builder`]).
pub struct IrqchipBuilder {
    vm: Arc<VmFd>,
    mode: Mode,
    cpus: usize,
    x2apic: bool,
    phys_addr_bits: u8,
    storm_threshold: u32,
    kicker: Option<Arc<Kicker>>,
    trace: Option<Arc<dyn TraceSink>>,
}

impl IrqchipBuilder {
    /// The number of vCPUs, 1 to 255 (default 1). vCPU `i` has APIC ID
    /// `i`; vCPU 0 is the bootstrap processor.
    pub fn cpus(mut self, cpus: usize) -> Self {
        self.cpus = cpus;
        self
    }

    /// Whether the guest is offered x2APIC (default on): the local APICs
    /// accept the switch, and [`Irqchip::cpuid_features`] says so.
    pub fn x2apic(mut self, on: bool) -> Self {
        self.x2apic = on;
        self
    }

    /// The guest's physical-address width, `CPUID.80000008H:EAX[7:0]`
    /// (user mode: the width of IA32_APIC_BASE's base field). Default 36.
    pub fn phys_addr_bits(mut self, bits: u8) -> Self {
        self.phys_addr_bits = bits;
        self
    }

    /// Re-deliveries of a still-asserted level pin after EOI past which our
    /// IOAPIC reports a storm (default [`DEFAULT_STORM_THRESHOLD`]).
    pub fn storm_threshold(mut self, threshold: u32) -> Self {
        self.storm_threshold = threshold;
        self
    }

    /// The kicker the VMM also uses (to stop its vCPUs); by default the
    /// chip makes its own, available from [`Irqchip::kicker`].
    pub fn kicker(mut self, kicker: Arc<Kicker>) -> Self {
        self.kicker = Some(kicker);
        self
    }

    /// Hands every event of the chip to `sink` (see [`crate::trace`]): for
    /// a timeline. Without a sink (the default) nothing is recorded and the
    /// hooks cost a test of an empty `Option`.
    pub fn trace(mut self, sink: Arc<dyn TraceSink>) -> Self {
        self.trace = Some(sink);
        self
    }

    /// Sets the chip up on the VM. Call it before creating any vCPU (KVM
    /// requires the in-kernel or split chip to exist first).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use irqchip_kvm::{Irqchip, Mode};
    ///
    /// let vm = Arc::new(kvm_ioctls::Kvm::new()?.create_vm()?);
    /// let chip = Irqchip::builder(vm, Mode::User)
    ///     .cpus(4)
    ///     .x2apic(false)
    ///     .build()?;
    /// assert_eq!(chip.pin_count(), 24);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// A vCPU count outside 1..=255 or a kicker of another size
    /// ([`Error::Config`]), a KVM without what the mode needs, or a failed
    /// ioctl or host resource.
    pub fn build(self) -> Result<Irqchip, Error> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(Error::Config(format!(
                "{} vCPUs (the chip drives 1 to {MAX_CPUS})",
                self.cpus
            )));
        }
        let kicker = match self.kicker {
            Some(k) if k.len() != self.cpus => {
                return Err(Error::Config(format!(
                    "the kicker has room for {} vCPUs, the chip has {}",
                    k.len(),
                    self.cpus
                )));
            }
            Some(k) => k,
            None => Arc::new(Kicker::new(self.cpus)),
        };
        kick::install_handler()?;
        let tracer = Tracer::new(self.trace);
        let features = Features {
            x2apic: self.x2apic,
            // TSC-deadline mode: KVM's LAPIC timer (kernel, split), or our
            // model's, which needs the guest TSC's rate (user).
            tsc_deadline: self.vm.check_extension(match self.mode {
                Mode::Kernel | Mode::Split => Cap::TscDeadlineTimer,
                Mode::User => Cap::GetTscKhz,
            }),
            ext_dest_id: self.mode.msi_format() == irqchip::msi::MsiFormat::ExtendedDestinationId,
        };
        let backend: Arc<dyn Backend> = match self.mode {
            Mode::Kernel => kernel::KernelChip::create(Arc::clone(&self.vm), tracer.clone())?,
            Mode::Split => split::SplitChip::create(
                Arc::clone(&self.vm),
                Arc::clone(&kicker),
                self.cpus,
                self.storm_threshold,
                tracer.clone(),
            )?,
            Mode::User => user::UserChip::create(
                &self.vm,
                Arc::clone(&kicker),
                user::UserConfig {
                    cpus: self.cpus,
                    x2apic: self.x2apic,
                    phys_addr_bits: self.phys_addr_bits,
                    storm_threshold: self.storm_threshold,
                },
                tracer.clone(),
            )?,
        };
        let lines = IrqLines::new(Arc::clone(&backend), NUM_PINS, tracer.clone());
        Ok(Irqchip {
            inner: Arc::new(Inner {
                backend,
                lines,
                kicker,
                stopping: Arc::new(AtomicBool::new(false)),
                pausing: Arc::new(AtomicBool::new(false)),
                mode: self.mode,
                cpus: self.cpus,
                x2apic: self.x2apic,
                phys_addr_bits: self.phys_addr_bits,
                storm_threshold: self.storm_threshold,
                features,
                tracer,
            }),
        })
    }
}

/// An MMIO window the chip emulates: route guest accesses in it to
/// [`Irqchip::mmio_read`] and [`Irqchip::mmio_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioWindow {
    /// Guest-physical base.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it is, for statistics (`"ioapic"`).
    pub name: &'static str,
}

/// The interrupt controller of one VM: a cheap handle (`Clone` shares it)
/// usable from any thread.
#[derive(Clone)]
pub struct Irqchip {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    lines: Arc<IrqLines>,
    kicker: Arc<Kicker>,
    stopping: Arc<AtomicBool>,
    pausing: Arc<AtomicBool>,
    mode: Mode,
    cpus: usize,
    x2apic: bool,
    phys_addr_bits: u8,
    storm_threshold: u32,
    features: Features,
    tracer: Tracer,
}

impl Irqchip {
    /// A builder for `mode` on `vm`: 1 vCPU, x2APIC on, 36 physical-address
    /// bits, the default storm threshold, a kicker of its own.
    pub fn builder(vm: Arc<VmFd>, mode: Mode) -> IrqchipBuilder {
        IrqchipBuilder {
            vm,
            mode,
            cpus: 1,
            x2apic: true,
            phys_addr_bits: 36,
            storm_threshold: DEFAULT_STORM_THRESHOLD,
            kicker: None,
            trace: None,
        }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// The number of vCPUs.
    pub fn cpus(&self) -> usize {
        self.inner.cpus
    }

    /// IOAPIC pins, and GSIs: 24.
    pub fn pin_count(&self) -> usize {
        NUM_PINS
    }

    /// The storm threshold our IOAPIC uses (split and user modes).
    pub fn storm_threshold(&self) -> u32 {
        self.inner.storm_threshold
    }

    /// What the guest's CPUID must offer for this chip; apply it with
    /// [`crate::cpuid::apply`].
    pub fn cpuid_features(&self) -> Features {
        self.inner.features
    }

    /// The per-vCPU part of vCPU `index`, created with descriptor `fd`.
    /// Call it once per vCPU, after creating every vCPU and before any of
    /// them runs; vCPUs other than 0 are left waiting for INIT/SIPI.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use irqchip_kvm::{Irqchip, Mode};
    /// # let vm = Arc::new(kvm_ioctls::Kvm::new()?.create_vm()?);
    /// let chip = Irqchip::builder(Arc::clone(&vm), Mode::Split).cpus(2).build()?;
    /// let fds = [vm.create_vcpu(0)?, vm.create_vcpu(1)?];
    /// let parts = fds
    ///     .iter()
    ///     .enumerate()
    ///     .map(|(i, fd)| chip.vcpu(i, fd))
    ///     .collect::<Result<Vec<_>, _>>()?;
    /// // Move each (fd, part) pair to its own thread and loop on `run`.
    /// # let _ = parts;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// An index the chip was not built for, or a failed ioctl.
    pub fn vcpu(&self, index: usize, fd: &VcpuFd) -> Result<VcpuChip, Error> {
        if index >= self.inner.cpus {
            return Err(Error::NoSuchVcpu {
                index,
                cpus: self.inner.cpus,
            });
        }
        if index != 0 {
            startup::leave_waiting_for_sipi(fd, self.inner.mode)?;
        }
        let backend = Arc::clone(&self.inner.backend).vcpu(index, fd)?;
        Ok(VcpuChip::new(
            index,
            backend,
            Arc::clone(&self.inner.kicker),
            Arc::clone(&self.inner.stopping),
            Arc::clone(&self.inner.pausing),
            self.inner.tracer.clone(),
        ))
    }

    /// A new source on interrupt line `gsi` (0..24), for a device model;
    /// `None` for a GSI that does not exist or has 64 sources already.
    /// Sources on one GSI are wired-OR.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use irqchip_kvm::{Irqchip, Mode, LineSink};
    /// # let vm = Arc::new(kvm_ioctls::Kvm::new()?.create_vm()?);
    /// # let chip = Irqchip::builder(vm, Mode::Kernel).build()?;
    /// let mut line = chip.line(5).expect("pin 5");
    /// line.set_level(true); // a level device asserts
    /// line.set_level(false);
    /// line.pulse(); // an edge device
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn line(&self, gsi: u32) -> Option<IrqLine> {
        self.inner.lines.line(gsi)
    }

    /// A source on `gsi` driven by an eventfd (see [`EventFdLine`]).
    ///
    /// # Errors
    ///
    /// No such GSI (or too many sources), or the eventfd could not be made.
    pub fn eventfd_line(&self, gsi: u32) -> Result<EventFdLine, Error> {
        let line = self
            .line(gsi)
            .ok_or_else(|| Error::Config(format!("GSI {gsi} has no free source")))?;
        EventFdLine::new(line)
    }

    /// Rising edges per GSI of the wired-OR lines, for GSIs that had any.
    pub fn line_assertions(&self) -> Vec<(u32, u64)> {
        self.inner.lines.assertions()
    }

    /// Line changes the chip refused (counted, warned at a rate limit).
    pub fn line_errors(&self) -> u64 {
        self.inner.lines.errors()
    }

    /// The MMIO windows the chip emulates in user space: the IOAPIC's in
    /// split and user modes, none in kernel mode (KVM decodes it). The local
    /// APIC window of user mode is per vCPU and handled inside
    /// [`VcpuChip::run`].
    pub fn mmio_windows(&self) -> Vec<MmioWindow> {
        if self.inner.mode.our_ioapic() {
            vec![MmioWindow {
                base: IOAPIC_MMIO_BASE,
                len: IOAPIC_MMIO_SIZE,
                name: "ioapic",
            }]
        } else {
            Vec::new()
        }
    }

    /// A guest MMIO read at guest-physical `addr`; `false` (and `data`
    /// untouched) when no window of the chip holds it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match ioapic_offset(addr) {
            Some(offset) => self.inner.backend.ioapic_read(offset, data),
            None => false,
        }
    }

    /// A guest MMIO write at guest-physical `addr`; its effects (route
    /// changes, deliveries) happen before it returns. `false` when no
    /// window of the chip holds it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match ioapic_offset(addr) {
            Some(offset) => self.inner.backend.ioapic_write(offset, data),
            None => false,
        }
    }

    /// Programs IOAPIC `pin` from the host (a hypervisor's own routing
    /// decision): its writable fields become `entry`'s; Remote IRR and
    /// delivery status stay the chip's (`RedirectionEntry::written`), and
    /// the change is serialised with every line change, so no level is
    /// lost. In kernel mode KVM's IOAPIC holds an 8-bit destination only.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use irqchip_kvm::{Irqchip, Mode};
    /// use irqchip::apic_bus::DeliveryMode;
    /// use irqchip::ioapic::RedirectionEntry;
    /// # let vm = Arc::new(kvm_ioctls::Kvm::new()?.create_vm()?);
    /// # let chip = Irqchip::builder(vm, Mode::Split).cpus(4).build()?;
    /// // Pin 16, level, vector 0x61, lowest priority to logical set {1, 2}.
    /// let entry = RedirectionEntry::new()
    ///     .with_vector(0x61)
    ///     .with_level_triggered(true)
    ///     .with_delivery_mode(DeliveryMode::LowestPriority)
    ///     .with_logical(true)
    ///     .with_destination(0b0110)
    ///     .with_masked(false);
    /// chip.program_pin(16, entry)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// No such pin, or (kernel mode) a failed ioctl.
    pub fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), IrqError> {
        self.inner.backend.program_pin(pin, entry)
    }

    /// Sends a device's message-signaled interrupt: `address` and `data` in
    /// the format of the chip's mode ([`irqchip::Mode::msi_format`]: the
    /// SDM Vol. 3A 11.11 compatibility format with 8-bit destinations in
    /// kernel mode; in split and user mode, whose guests are offered
    /// `KVM_FEATURE_MSI_EXT_DEST_ID`, also the extended destination ID), as
    /// a PCI device writes them. Kernel and split mode hand it to KVM's local APICs
    /// (`KVM_SIGNAL_MSI`); user mode decodes it and delivers it on our APIC
    /// bus, waking the vCPUs that took it. Call it from any thread.
    ///
    /// # Errors
    ///
    /// The message does not decode (user mode) or KVM refused it.
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<(), IrqError> {
        self.inner
            .backend
            .signal_msi(irqchip::msi::Msi { address, data })
    }

    /// Installs the storm guard's callback: called with a pin our IOAPIC
    /// reported storming (split and user modes), with no chip lock held.
    pub fn set_storm_sink(&self, sink: StormSink) {
        self.inner.backend.set_storm_sink(sink);
    }

    /// Timer descriptors to watch for input (user mode: one per LAPIC
    /// timer; split: the EOI watch). When descriptor `i` is readable, call
    /// [`Irqchip::on_timer`]`(i)`.
    pub fn timer_fds(&self) -> Vec<RawFd> {
        self.inner.backend.timer_fds()
    }

    /// Timer `index` of [`Irqchip::timer_fds`] is readable.
    pub fn on_timer(&self, index: usize) {
        self.inner.backend.on_timer(index);
    }

    /// The chip's counters.
    pub fn stats(&self) -> IrqStats {
        self.inner.backend.stats()
    }

    /// Our models' counters; `None` in kernel mode.
    pub fn model_stats(&self) -> Option<ModelStats> {
        self.inner.backend.model_stats()
    }

    /// The kicker of the VM's vCPUs.
    pub fn kicker(&self) -> &Arc<Kicker> {
        &self.inner.kicker
    }

    /// Pauses the VM for a snapshot: every [`VcpuChip::run`] from now on
    /// completes the vCPU's last exit inside KVM without entering the
    /// guest and returns [`crate::Run::Paused`]; vCPUs in `KVM_RUN` are
    /// kicked out and threads the chip parks are woken. Nothing is
    /// injected meanwhile: an interrupt that arrives stays in the chip.
    /// Once every vCPU thread has seen `Paused`, take each one's part with
    /// [`VcpuChip::save`] and then [`Irqchip::save`]; [`Irqchip::resume`]
    /// lets them run again.
    pub fn pause(&self) {
        self.inner.pausing.store(true, Ordering::Release);
        self.inner.backend.set_paused(true);
        self.inner.kicker.kick_all();
    }

    /// Ends a pause ([`Irqchip::pause`]).
    pub fn resume(&self) {
        self.inner.pausing.store(false, Ordering::Release);
        self.inner.backend.set_paused(false);
        self.inner.kicker.kick_all();
    }

    /// The chip's state: the VM-wide part and `vcpus`, each vCPU's part
    /// ([`VcpuChip::save`], in vCPU order). Call it while paused, after
    /// every vCPU's part was taken, with nothing else driving the chip's
    /// lines or timers.
    ///
    /// # Errors
    ///
    /// A failed ioctl, or not one part per vCPU.
    pub fn save(&self, vcpus: Vec<VcpuChipState>) -> Result<ChipState, Error> {
        if vcpus.len() != self.inner.cpus {
            return Err(Error::Config(format!(
                "{} vCPU parts for {} vCPUs",
                vcpus.len(),
                self.inner.cpus
            )));
        }
        let part = self.inner.backend.save_vm()?;
        let (lines, line_assertions) = self.inner.lines.save();
        Ok(ChipState {
            version: CHIP_STATE_VERSION,
            mode: self.inner.mode,
            x2apic: self.inner.x2apic,
            ioapic: part.ioapic,
            pic: part.pic,
            vcpus,
            arbiter: part.arbiter,
            clock_ns: part.clock_ns,
            lines,
            line_assertions,
            counters: CountersState {
                line_errors: self.inner.lines.errors(),
                ..part.counters
            },
        })
    }

    /// What this chip is, for [`ChipState::convert`].
    pub fn target(&self) -> Target {
        Target {
            mode: self.inner.mode,
            cpus: self.inner.cpus,
            x2apic: self.inner.x2apic,
            phys_addr_bits: self.inner.phys_addr_bits,
            tsc_deadline: self.inner.features.tsc_deadline,
        }
    }

    /// `state` in this chip's mode ([`ChipState::convert`]).
    ///
    /// # Errors
    ///
    /// One line naming what cannot be carried.
    pub fn convert(&self, state: &ChipState) -> Result<ChipState, ConvertError> {
        state.convert(&self.target())
    }

    /// Restores the VM-wide part of `state`, already in this chip's mode
    /// ([`Irqchip::convert`]), into this fresh chip: after every vCPU and
    /// every line exist, before any vCPU's part ([`VcpuChip::restore`])
    /// and before any vCPU runs. The wired-OR lines take the saved levels
    /// without a change reaching the chip.
    ///
    /// # Errors
    ///
    /// A failed ioctl, a state of another mode, or lines this VM lacks.
    pub fn restore(&self, state: &ChipState) -> Result<(), Error> {
        if state.mode != self.inner.mode {
            return Err(Error::Config(format!(
                "a {} state for a {} chip: convert it first",
                state.mode.name(),
                self.inner.mode.name()
            )));
        }
        self.inner.backend.restore_vm(state)?;
        self.inner
            .lines
            .restore(
                &state.lines,
                &state.line_assertions,
                state.counters.line_errors,
            )
            .map_err(Error::Config)
    }

    /// The VM is stopping: every [`VcpuChip::run`] from now on returns
    /// [`crate::Run::Stopped`] without entering the guest, vCPUs in
    /// `KVM_RUN` are kicked out, and vCPU threads the chip parks are woken.
    /// Call it before joining the vCPU threads.
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.backend.shutdown();
        self.inner.kicker.kick_all();
    }
}

/// `addr`'s offset in the IOAPIC window, if it is in it.
fn ioapic_offset(addr: u64) -> Option<u64> {
    let offset = addr.checked_sub(IOAPIC_MMIO_BASE)?;
    (offset < IOAPIC_MMIO_SIZE).then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_ioapic_offset_covers_exactly_the_window() {
        assert_eq!(ioapic_offset(IOAPIC_MMIO_BASE), Some(0));
        assert_eq!(
            ioapic_offset(IOAPIC_MMIO_BASE + IOAPIC_MMIO_SIZE - 1),
            Some(IOAPIC_MMIO_SIZE - 1)
        );
        assert_eq!(ioapic_offset(IOAPIC_MMIO_BASE + IOAPIC_MMIO_SIZE), None);
        assert_eq!(ioapic_offset(IOAPIC_MMIO_BASE - 1), None);
        assert_eq!(ioapic_offset(0), None);
    }
}
