//! `--irqchip kernel`: KVM's in-kernel PIC, IOAPIC and local APICs.
//!
//! Lines go in with `KVM_IRQ_LINE` (GSIs 0..15 reach both the PIC and the
//! IOAPIC under KVM's default routing, 16..23 the IOAPIC only). Everything
//! else (EOI, INIT/SIPI, HLT, the APIC timer) happens inside KVM, so the
//! per-vCPU part has nothing to do.

use std::sync::Arc;

use irqconnect_abi::layout::IOAPIC_PINS;
use kvm_ioctls::VmFd;

use super::{ExitAction, InterruptController, IrqError, IrqExit, IrqStats, VcpuInterrupts};
use crate::cli::IrqchipMode;
use crate::error::{Error, Result};

/// KVM's in-kernel interrupt controllers.
pub(crate) struct KernelIrqchip {
    vm: Arc<VmFd>,
}

/// Creates the in-kernel PIC, IOAPIC and LAPICs; must precede vCPU creation.
pub(crate) fn create(vm: Arc<VmFd>) -> Result<Arc<KernelIrqchip>> {
    vm.create_irq_chip()
        .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    Ok(Arc::new(KernelIrqchip { vm }))
}

impl InterruptController for KernelIrqchip {
    fn mode(&self) -> IrqchipMode {
        IrqchipMode::Kernel
    }

    fn gsi_count(&self) -> u32 {
        u32::from(IOAPIC_PINS)
    }

    fn set_level(&self, gsi: u32, high: bool) -> std::result::Result<(), IrqError> {
        if gsi >= self.gsi_count() {
            return Err(IrqError::NoSuchGsi(gsi));
        }
        self.vm
            .set_irq_line(gsi, high)
            .map_err(|source| IrqError::Kvm { gsi, source })
    }

    fn vcpu(&self, _index: usize) -> Box<dyn VcpuInterrupts> {
        Box::new(KernelVcpu)
    }

    fn stats(&self) -> IrqStats {
        // Line changes are counted by the wiring; KVM delivers and EOIs.
        IrqStats {
            injected: None,
            eois: None,
            errors: 0,
        }
    }
}

/// Nothing to do per vCPU: KVM handles every interrupt exit itself.
struct KernelVcpu;

impl VcpuInterrupts for KernelVcpu {
    fn on_exit(&mut self, _exit: IrqExit<'_>) -> ExitAction {
        ExitAction::Unexpected
    }
}
