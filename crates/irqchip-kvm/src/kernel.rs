//! `kernel` mode: KVM's in-kernel PIC, IOAPIC and local APICs.
//!
//! Lines go in with `KVM_IRQ_LINE` (GSIs 0..15 reach both the PIC and the
//! IOAPIC under KVM's default routing, 16..23 the IOAPIC only). Everything
//! else (EOI, INIT/SIPI, HLT, the APIC timer) happens inside KVM, so the
//! per-vCPU part has nothing to do.
//!
//! Host pin programming (`Backend::program_pin`): KVM has no ioctl for one
//! redirection entry, so the entry is rewritten by a read-modify-write of
//! the whole IOAPIC state (`KVM_GET_IRQCHIP`, edit one entry,
//! `KVM_SET_IRQCHIP`). `KVM_SET_IRQCHIP` writes back everything it is
//! given, line levels (`irr`) included, and re-injects every set `irr` bit,
//! so:
//!
//! - the read-modify-write and every `KVM_IRQ_LINE` hold one lock
//!   (`KernelChip::ioapic_writes`), so a line change made by another thread
//!   (a host-timer test device, another vCPU's pc-testdev write) cannot
//!   fall between the read and the write and be lost;
//! - `irr` bits of edge-triggered pins are dropped from the state written
//!   back (see [`edit_ioapic_state`]): re-injecting a line that is merely
//!   held high would fabricate an edge.
//!
//! The price, found by the `kvm_differential` fuzz target (`fuzz/README.md`,
//! N9): after a host pin write KVM takes the line of every edge-triggered
//! pin as low (`KVM_GET_IRQCHIP` already hides the line of an edge it has
//! delivered), so a device that holds an edge line high across the write
//! and asserts it again without lowering it gives KVM a new edge, and a pin
//! switched from edge to level while its line is high does not fire until
//! the line toggles. `KVM_SET_IRQCHIP` offers no way to restore a held-high
//! edge line without injecting it. Also, `KVM_SET_IRQCHIP` re-services
//! every unmasked level pin whose line is high and whose Remote IRR is
//! clear (N11); KVM leaves Remote IRR clear when no APIC took the message
//! (N1), so such a pin fires again at the next host write.
//!
//! What the lock cannot cover: changes KVM makes by itself between the two
//! ioctls. A guest EOI on another vCPU clearing a level pin's Remote IRR, or
//! a guest IOREGSEL write, in that window is overwritten with the value read.
//! The window is two back-to-back ioctls; closing it would need every other
//! vCPU held out of `KVM_RUN`. Split and user modes own their IOAPIC and
//! have no such window.
//!
//! KVM's IOAPIC holds an 8-bit destination and ignores the extended
//! destination bits, so a host program reaches APIC IDs 0..=255 only.

use std::sync::{Arc, Mutex, PoisonError};

use irqchip::ioapic::RedirectionEntry;
use irqchip::ioapic::spec::{RTE_EXTENDED_DESTINATION_MASK, RTE_WRITABLE_MASK};
use irqconnect_abi::layout::IOAPIC_PINS;
use kvm_bindings::{KVM_IRQCHIP_IOAPIC, kvm_ioapic_state, kvm_irqchip};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::backend::{Backend, ExitAction, IrqStats, VcpuBackend, kvm_msi_of, msi_vector};
use crate::error::{Error, IrqError};
use crate::trace::{TraceEvent, Tracer};
use crate::vcpu::ChipExit;

/// KVM's in-kernel interrupt controllers.
pub(crate) struct KernelChip {
    vm: Arc<VmFd>,
    /// Held around every user-space change of KVM's IOAPIC state: each
    /// `KVM_IRQ_LINE` and each `program_pin` read-modify-write.
    ioapic_writes: Mutex<()>,
    tracer: Tracer,
}

impl KernelChip {
    /// Creates the in-kernel PIC, IOAPIC and LAPICs; must precede vCPU
    /// creation.
    pub(crate) fn create(vm: Arc<VmFd>, tracer: Tracer) -> Result<Arc<Self>, Error> {
        vm.create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        Ok(Arc::new(Self {
            vm,
            ioapic_writes: Mutex::new(()),
            tracer,
        }))
    }
}

impl Backend for KernelChip {
    fn set_level(&self, gsi: u32, high: bool) -> Result<(), IrqError> {
        if gsi >= u32::from(IOAPIC_PINS) {
            return Err(IrqError::NoSuchGsi(gsi));
        }
        let _writes = self
            .ioapic_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.vm
            .set_irq_line(gsi, high)
            .map_err(|source| IrqError::Kvm { gsi, source })
    }

    fn signal_msi(&self, msi: irqchip::msi::Msi) -> Result<(), IrqError> {
        self.tracer.emit(|| TraceEvent::Msi {
            vector: msi_vector(msi),
            targets: None,
        });
        self.vm
            .signal_msi(kvm_msi_of(msi))
            .map(|_| ())
            .map_err(|source| IrqError::KvmChip {
                op: "KVM_SIGNAL_MSI",
                source,
            })
    }

    fn vcpu(self: Arc<Self>, _index: usize, _fd: &VcpuFd) -> Result<Box<dyn VcpuBackend>, Error> {
        Ok(Box::new(KernelVcpu))
    }

    fn stats(&self) -> IrqStats {
        // Line changes are counted by the wiring; KVM delivers and EOIs.
        IrqStats::default()
    }

    fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), IrqError> {
        if pin >= IOAPIC_PINS {
            return Err(IrqError::NoSuchGsi(u32::from(pin)));
        }
        let _writes = self
            .ioapic_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.vm
            .get_irqchip(&mut chip)
            .map_err(|source| IrqError::KvmChip {
                op: "KVM_GET_IRQCHIP",
                source,
            })?;
        // SAFETY: with chip_id KVM_IRQCHIP_IOAPIC, KVM_GET_IRQCHIP filled
        // the `ioapic` member; it is plain integers, valid for any bits.
        let mut state = unsafe { chip.chip.ioapic };
        edit_ioapic_state(&mut state, pin, entry)?;
        chip.chip.ioapic = state;
        self.vm
            .set_irqchip(&chip)
            .map_err(|source| IrqError::KvmChip {
                op: "KVM_SET_IRQCHIP",
                source,
            })
    }
}

/// Rewrites redirection entry `pin` of `state` as `entry` asks, for
/// `KVM_SET_IRQCHIP`:
///
/// - the entry's writable fields (the extended destination included, which
///   KVM stores and ignores) come from `entry`, its read-only bits stay, by
///   the one rule every writer follows ([`RedirectionEntry::written`]:
///   Remote IRR kept for a level entry, cleared for an edge entry);
/// - every other entry, the ID, IOREGSEL and base address are untouched;
/// - `irr` keeps the line levels of level-triggered pins and drops those of
///   edge-triggered pins: `KVM_SET_IRQCHIP` re-injects every set bit, which
///   for an edge pin whose line is merely held high would be a new edge.
///   (A masked level pin with its line high fires when unmasked, as on the
///   chip.)
pub(crate) fn edit_ioapic_state(
    state: &mut kvm_ioapic_state,
    pin: u8,
    entry: RedirectionEntry,
) -> Result<(), IrqError> {
    let slot = state
        .redirtbl
        .get_mut(usize::from(pin))
        .ok_or(IrqError::NoSuchGsi(u32::from(pin)))?;
    // SAFETY: both members of the union are views of the same 8 bytes of
    // plain integers; any bit pattern is a valid u64.
    let old = RedirectionEntry::from_bits(unsafe { slot.bits });
    slot.bits = old
        .written(entry, RTE_WRITABLE_MASK | RTE_EXTENDED_DESTINATION_MASK)
        .into_bits();
    state.irr &= level_pins(state);
    Ok(())
}

/// Pins whose entry in `state` is level-triggered (bit `p` = pin `p`).
fn level_pins(state: &kvm_ioapic_state) -> u32 {
    state
        .redirtbl
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            // SAFETY: as in `edit_ioapic_state`: plain integers.
            let bits = unsafe { e.bits };
            RedirectionEntry::from_bits(bits).level_triggered()
        })
        .fold(0, |acc, (pin, _)| acc | (1u32 << pin))
}

/// Nothing to do per vCPU: KVM handles every interrupt exit itself.
struct KernelVcpu;

impl VcpuBackend for KernelVcpu {
    fn on_exit(&mut self, _exit: ChipExit<'_>) -> ExitAction {
        ExitAction::Unexpected
    }
}

#[cfg(test)]
mod tests {
    use irqchip::apic_bus::DeliveryMode;
    use irqchip::ioapic::spec::{RTE_DELIVERY_STATUS, RTE_REMOTE_IRR};

    use super::*;

    fn bits(state: &kvm_ioapic_state, pin: usize) -> u64 {
        // SAFETY: plain integers (see `edit_ioapic_state`).
        unsafe { state.redirtbl[pin].bits }
    }

    fn state_with(entries: &[(usize, u64)], irr: u32) -> kvm_ioapic_state {
        let mut s = kvm_ioapic_state {
            base_address: 0xfec0_0000,
            ioregsel: 0x21,
            id: 0x0200_0000,
            irr,
            ..Default::default()
        };
        for e in s.redirtbl.iter_mut() {
            e.bits = RedirectionEntry::new().into_bits();
        }
        for &(pin, b) in entries {
            s.redirtbl[pin].bits = b;
        }
        s
    }

    const LEVEL_LOGICAL: RedirectionEntry = RedirectionEntry::new()
        .with_vector(0x60)
        .with_level_triggered(true)
        .with_logical(true)
        .with_destination(0b0110)
        .with_delivery_mode(DeliveryMode::LowestPriority)
        .with_masked(false);

    #[test]
    fn edit_rte_writes_fields_and_keeps_other_entries_and_registers() {
        let other = RedirectionEntry::new()
            .with_vector(0x41)
            .with_level_triggered(true)
            .with_masked(false)
            .with_remote_irr(true)
            .into_bits();
        let mut s = state_with(&[(3, other)], 0);
        edit_ioapic_state(&mut s, 16, LEVEL_LOGICAL).unwrap();
        let e = RedirectionEntry::from_bits(bits(&s, 16));
        assert_eq!(e.vector(), 0x60);
        assert_eq!(e.delivery_mode(), DeliveryMode::LowestPriority);
        assert!(e.logical() && e.level_triggered() && !e.masked());
        assert_eq!(e.destination(), 0b0110);
        assert!(!e.active_low() && !e.remote_irr());
        assert_eq!(bits(&s, 3), other);
        for pin in (0..24).filter(|&p| p != 3 && p != 16) {
            assert_eq!(bits(&s, pin), RedirectionEntry::new().into_bits());
        }
        assert_eq!(
            (s.base_address, s.ioregsel, s.id),
            (0xfec0_0000, 0x21, 0x0200_0000)
        );
    }

    #[test]
    fn edit_rte_level_keeps_remote_irr_and_delivery_status() {
        let old = RTE_REMOTE_IRR | RTE_DELIVERY_STATUS | RedirectionEntry::new().into_bits();
        let mut s = state_with(&[(18, old)], 0);
        edit_ioapic_state(&mut s, 18, LEVEL_LOGICAL).unwrap();
        let b = bits(&s, 18);
        assert_eq!(
            b & (RTE_REMOTE_IRR | RTE_DELIVERY_STATUS),
            RTE_REMOTE_IRR | RTE_DELIVERY_STATUS
        );
        assert!(!RedirectionEntry::from_bits(b).masked());
    }

    #[test]
    fn edit_rte_edge_clears_remote_irr_keeps_delivery_status() {
        let old = RTE_REMOTE_IRR | RTE_DELIVERY_STATUS;
        let mut s = state_with(&[(17, old)], 0);
        let edge = LEVEL_LOGICAL
            .with_level_triggered(false)
            .with_logical(false)
            .with_destination(2)
            .with_delivery_mode(DeliveryMode::Fixed);
        edit_ioapic_state(&mut s, 17, edge).unwrap();
        let e = RedirectionEntry::from_bits(bits(&s, 17));
        assert!(!e.remote_irr() && e.delivery_status());
        assert!(!e.logical() && !e.level_triggered());
        assert_eq!(
            (e.delivery_mode(), e.destination()),
            (DeliveryMode::Fixed, 2)
        );
    }

    #[test]
    fn edit_rte_irr_keeps_level_lines_drops_edge_lines() {
        let level = RedirectionEntry::new()
            .with_level_triggered(true)
            .into_bits();
        // Pin 4: level, line high. Pin 5: edge, line high. Pin 16: becomes
        // level with its line high. Pin 17: becomes edge with its line high.
        let mut s = state_with(
            &[(4, level), (17, level)],
            (1 << 4) | (1 << 5) | (1 << 16) | (1 << 17),
        );
        edit_ioapic_state(&mut s, 16, LEVEL_LOGICAL).unwrap();
        assert_eq!(s.irr, (1 << 4) | (1 << 16) | (1 << 17));
        let edge = LEVEL_LOGICAL.with_level_triggered(false);
        edit_ioapic_state(&mut s, 17, edge).unwrap();
        assert_eq!(s.irr, (1 << 4) | (1 << 16));
    }

    #[test]
    fn edit_rte_masked_program_sets_mask() {
        let mut s = state_with(&[], 0);
        let masked = LEVEL_LOGICAL.with_masked(true);
        edit_ioapic_state(&mut s, 20, masked).unwrap();
        assert!(RedirectionEntry::from_bits(bits(&s, 20)).masked());
    }

    #[test]
    fn edit_rte_refuses_missing_pin_unchanged() {
        let mut s = state_with(&[], 1 << 5);
        assert!(matches!(
            edit_ioapic_state(&mut s, 24, LEVEL_LOGICAL),
            Err(IrqError::NoSuchGsi(24))
        ));
        assert_eq!(s.irr, 1 << 5);
    }

    #[test]
    fn edit_rte_stores_the_extended_destination_kvm_ignores() {
        let mut s = state_with(&[], 0);
        edit_ioapic_state(&mut s, 16, LEVEL_LOGICAL.with_extended_destination(0x0e)).unwrap();
        assert_eq!(
            RedirectionEntry::from_bits(bits(&s, 16)).extended_destination(),
            0x0e
        );
    }
}
