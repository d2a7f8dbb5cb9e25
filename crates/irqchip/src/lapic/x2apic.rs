//! The MSR interface: IA32_APIC_BASE (SDM Vol. 3A 11.4.4, 11.12.5),
//! IA32_TSC_DEADLINE (11.5.4.1) and the x2APIC register MSRs 0x800..0x8FF
//! (11.12.1.2, Table 11-6).

use super::spec::{
    ApicBaseReg, IA32_APIC_BASE, IA32_TSC_DEADLINE, REG_STRIDE, X2APIC_MSR_FIRST, X2APIC_MSR_LAST,
    x2apic_ldr,
};
use super::{Effect, Gp, Lapic, bump};
use crate::lapic::regs::Reg;

/// The APIC's mode as IA32_APIC_BASE EN/EXTD encode it (SDM Vol. 3A 11.12.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Disabled,
    Xapic,
    X2apic,
    /// EN = 0, EXTD = 1: not reachable (SDM Vol. 3A 11.12.5).
    Invalid,
}

impl Mode {
    const fn of(base: ApicBaseReg) -> Self {
        match (base.enabled(), base.x2apic()) {
            (false, false) => Self::Disabled,
            (true, false) => Self::Xapic,
            (true, true) => Self::X2apic,
            (false, true) => Self::Invalid,
        }
    }
}

impl Lapic {
    /// Whether `msr` is one this model answers: IA32_APIC_BASE,
    /// IA32_TSC_DEADLINE (when configured) and 0x800..=0x8FF.
    pub fn handles_msr(&self, msr: u32) -> bool {
        msr == IA32_APIC_BASE
            || (msr == IA32_TSC_DEADLINE && self.config.tsc.is_some())
            || (X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr)
    }

    /// RDMSR of a local-APIC MSR. x2APIC registers read as in Table 11-6
    /// (ICR as one 64-bit value). `Err` is a #GP for the caller to inject:
    /// not in x2APIC mode, a reserved MSR, a write-only register.
    pub fn msr_read(&mut self, msr: u32, now: u64) -> Result<u64, Gp> {
        let result = self.msr_read_inner(msr, now);
        if result.is_err() {
            bump(&mut self.counters.msr_faults);
        }
        result
    }

    /// WRMSR of a local-APIC MSR. Returns the IPI of an ICR write or the EOI
    /// broadcast of an EOI write. `Err` is a #GP and changes nothing: not in
    /// x2APIC mode, a reserved MSR, a read-only register, reserved bits set
    /// (SDM Vol. 3A 11.12.1.3), an invalid IA32_APIC_BASE transition.
    pub fn msr_write(&mut self, msr: u32, value: u64, now: u64) -> Result<Option<Effect>, Gp> {
        let result = self.msr_write_inner(msr, value, now);
        if result.is_err() {
            bump(&mut self.counters.msr_faults);
        }
        result
    }

    fn msr_read_inner(&mut self, msr: u32, now: u64) -> Result<u64, Gp> {
        match msr {
            IA32_APIC_BASE => Ok(self.apic_base.into_bits()),
            IA32_TSC_DEADLINE => {
                if self.config.tsc.is_none() {
                    return Err(Gp::Unsupported);
                }
                let _ = self.tick(now);
                Ok(self.read_tsc_deadline())
            }
            X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => {
                let reg = self.x2apic_reg(msr)?;
                let _ = self.tick(now);
                self.read_register(reg, now)
            }
            _ => Err(Gp::ReservedMsr),
        }
    }

    fn msr_write_inner(&mut self, msr: u32, value: u64, now: u64) -> Result<Option<Effect>, Gp> {
        match msr {
            IA32_APIC_BASE => self.write_apic_base(value).map(|()| None),
            IA32_TSC_DEADLINE => {
                if self.config.tsc.is_none() {
                    return Err(Gp::Unsupported);
                }
                let _ = self.tick(now);
                self.write_tsc_deadline(value, now);
                Ok(None)
            }
            X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => {
                let reg = self.x2apic_reg(msr)?;
                let _ = self.tick(now);
                self.write_register(reg, value, now)
            }
            _ => Err(Gp::ReservedMsr),
        }
    }

    /// Decodes an x2APIC MSR (SDM Vol. 3A 11.12.1.2): only in x2APIC mode,
    /// only the MSRs of Table 11-6.
    fn x2apic_reg(&self, msr: u32) -> Result<Reg, Gp> {
        if !self.is_x2apic() {
            return Err(Gp::NotX2apicMode);
        }
        let index = msr.wrapping_sub(X2APIC_MSR_FIRST);
        let offset = u16::try_from(u64::from(index) * REG_STRIDE).map_err(|_| Gp::ReservedMsr)?;
        Reg::decode(offset, true).ok_or(Gp::ReservedMsr)
    }

    /// IA32_APIC_BASE write (SDM Vol. 3A 11.4.4, 11.12.5).
    ///
    /// Faults on a reserved bit (bits 0..7, 9, and from the physical-address
    /// width up; x2APIC enable when x2APIC is not offered), on the invalid
    /// state EN=0/EXTD=1, on x2APIC -> xAPIC and on disabled -> x2APIC.
    /// Disabling resets every register to its power-up value; re-enabling
    /// restores the configured APIC ID; entering x2APIC mode derives the LDR.
    fn write_apic_base(&mut self, value: u64) -> Result<(), Gp> {
        let valid = ApicBaseReg::valid_mask(self.config.phys_addr_bits, self.config.x2apic);
        if value & !valid != 0 {
            return Err(Gp::ReservedBits);
        }
        let new = ApicBaseReg::from_bits(value);
        let (old_mode, new_mode) = (Mode::of(self.apic_base), Mode::of(new));
        match (old_mode, new_mode) {
            (_, Mode::Invalid) | (Mode::X2apic, Mode::Xapic) | (Mode::Disabled, Mode::X2apic) => {
                return Err(Gp::InvalidTransition);
            }
            _ => {}
        }
        self.apic_base = new;
        match (old_mode, new_mode) {
            (Mode::Xapic | Mode::X2apic | Mode::Invalid, Mode::Disabled) => {
                self.reset_registers();
            }
            (Mode::Disabled | Mode::Invalid, Mode::Xapic) => {
                self.xapic_id = self.config.apic_id as u8;
                self.reset_registers();
            }
            (Mode::Xapic, Mode::X2apic) => {
                self.ldr = x2apic_ldr(self.config.apic_id);
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::spec::{REG_LVT_LINT0, REG_SVR, REG_TPR};
    use super::super::test_support::*;
    use super::super::{LapicConfig, TscClock};
    use super::*;
    use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};

    const EN: u64 = 1 << 11;
    const EXTD: u64 = 1 << 10;
    const BSP: u64 = 1 << 8;
    const BASE: u64 = 0xfee0_0000;

    fn x2apic_lapic(id: u32) -> Lapic {
        let mut lapic = enabled_lapic(id);
        to_x2apic(&mut lapic);
        lapic
    }

    #[test]
    fn apic_base_read_power_up_value() {
        // Arrange
        let mut lapic = Lapic::new(LapicConfig::new(0, true));
        // Act
        let value = lapic.msr_read(IA32_APIC_BASE, 0);
        // Assert
        assert_eq!(value, Ok(BASE | EN | BSP));
    }

    #[test]
    fn apic_base_x2apic_without_enable_faults() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let result = lapic.msr_write(IA32_APIC_BASE, BASE | EXTD, 0);
        // Assert
        assert_eq!(result, Err(Gp::InvalidTransition));
        assert_eq!(lapic.msr_read(IA32_APIC_BASE, 0), Ok(BASE | EN | BSP));
    }

    #[test]
    fn apic_base_x2apic_to_xapic_directly_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_write(IA32_APIC_BASE, BASE | EN, 0);
        // Assert
        assert_eq!(result, Err(Gp::InvalidTransition));
        assert!(lapic.is_x2apic());
    }

    #[test]
    fn apic_base_disabled_to_x2apic_directly_faults() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.msr_write(IA32_APIC_BASE, BASE, 0);
        // Act
        let result = lapic.msr_write(IA32_APIC_BASE, BASE | EN | EXTD, 0);
        // Assert
        assert_eq!(result, Err(Gp::InvalidTransition));
        assert!(!lapic.hw_enabled());
    }

    #[test]
    fn apic_base_x2apic_via_disabled_to_xapic_allowed() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let to_disabled = lapic.msr_write(IA32_APIC_BASE, BASE, 0);
        let to_xapic = lapic.msr_write(IA32_APIC_BASE, BASE | EN, 0);
        // Assert
        assert_eq!((to_disabled, to_xapic), (Ok(None), Ok(None)));
        assert!(lapic.mmio_decoded());
    }

    #[test]
    fn apic_base_reserved_bit_9_faults() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let result = lapic.msr_write(IA32_APIC_BASE, BASE | EN | (1 << 9), 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn apic_base_above_phys_addr_width_faults() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act: 40 physical-address bits configured.
        let result = lapic.msr_write(IA32_APIC_BASE, (1 << 40) | EN, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn apic_base_x2apic_not_offered_faults() {
        // Arrange
        let mut config = LapicConfig::new(0, true);
        config.x2apic = false;
        let mut lapic = Lapic::new(config);
        // Act
        let result = lapic.msr_write(IA32_APIC_BASE, BASE | EN | EXTD, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn apic_base_relocation_moves_mmio_base() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let result = lapic.msr_write(IA32_APIC_BASE, 0xfed0_0000 | EN, 0);
        // Assert
        assert_eq!(result, Ok(None));
        assert_eq!(lapic.mmio_base(), 0xfed0_0000);
    }

    #[test]
    fn apic_base_disable_resets_registers_and_reenable_restores_id() {
        // Arrange
        let mut lapic = enabled_lapic(4);
        set32(&mut lapic, REG_TPR, 0x70);
        set32(&mut lapic, super::super::spec::REG_ID, 0x0900_0000);
        let _ = lapic.accept(&fixed(0x50, TriggerMode::Edge));
        // Act
        let _ = lapic.msr_write(IA32_APIC_BASE, BASE, 0);
        let _ = lapic.msr_write(IA32_APIC_BASE, BASE | EN, 0);
        // Assert
        assert_eq!(lapic.apic_id(), 4);
        assert_eq!(lapic.tpr(), 0);
        assert!(!lapic.is_requested(0x50));
        assert!(!lapic.sw_enabled());
        assert_eq!(read32(&mut lapic, REG_LVT_LINT0, 0), 1 << 16);
    }

    #[test]
    fn msr_x2apic_register_in_xapic_mode_faults() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let result = lapic.msr_read(0x808, 0);
        // Assert
        assert_eq!(result, Err(Gp::NotX2apicMode));
        assert_eq!(lapic.counters().msr_faults, 1);
    }

    #[test]
    fn msr_reserved_x2apic_msr_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act / Assert: DFR (0x80e) and ICR high (0x831) are absent; 0x8ff too.
        assert_eq!(lapic.msr_read(0x80e, 0), Err(Gp::ReservedMsr));
        assert_eq!(lapic.msr_read(0x831, 0), Err(Gp::ReservedMsr));
        assert_eq!(lapic.msr_read(0x809, 0), Err(Gp::ReservedMsr));
        assert_eq!(lapic.msr_write(0x8ff, 0, 0), Err(Gp::ReservedMsr));
    }

    #[test]
    fn msr_read_x2apic_id_is_32_bit() {
        // Arrange
        let mut lapic = x2apic_lapic(0x1_0203);
        // Act
        let id = lapic.msr_read(0x802, 0);
        // Assert
        assert_eq!(id, Ok(0x1_0203));
    }

    #[test]
    fn msr_write_x2apic_id_faults_read_only() {
        // Arrange
        let mut lapic = x2apic_lapic(1);
        // Act
        let result = lapic.msr_write(0x802, 5, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReadOnly));
    }

    #[test]
    fn msr_read_x2apic_ldr_derived_from_id() {
        // Arrange
        let mut lapic = x2apic_lapic(0x35);
        // Act
        let ldr = lapic.msr_read(0x80d, 0);
        // Assert
        assert_eq!(ldr, Ok((3 << 16) | (1 << 5)));
    }

    #[test]
    fn msr_write_x2apic_ldr_faults_read_only() {
        // Arrange
        let mut lapic = x2apic_lapic(0x35);
        // Act
        let result = lapic.msr_write(0x80d, 1, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReadOnly));
    }

    #[test]
    fn msr_write_tpr_reserved_bits_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_write(0x808, 0x100, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
        assert_eq!(lapic.tpr(), 0);
    }

    #[test]
    fn msr_write_high_half_of_32_bit_register_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_write(0x838, 1 << 32, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn msr_write_eoi_nonzero_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        let _ = lapic.accept(&fixed(0x40, TriggerMode::Edge));
        let _ = lapic.acknowledge();
        // Act
        let result = lapic.msr_write(0x80b, 1, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
        assert!(lapic.is_in_service(0x40));
    }

    #[test]
    fn msr_write_eoi_zero_level_vector_returns_broadcast() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        let _ = lapic.accept(&fixed(0x40, TriggerMode::Level));
        let _ = lapic.acknowledge();
        // Act
        let result = lapic.msr_write(0x80b, 0, 0);
        // Assert
        assert_eq!(result, Ok(Some(Effect::EoiBroadcast { vector: 0x40 })));
    }

    #[test]
    fn msr_read_eoi_faults_write_only() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_read(0x80b, 0);
        // Assert
        assert_eq!(result, Err(Gp::WriteOnly));
    }

    #[test]
    fn msr_write_esr_nonzero_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_write(0x828, 4, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn msr_write_icr_64_bit_returns_x2apic_ipi() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_write(0x830, (0x1_0002u64 << 32) | (1 << 11) | 0x8051, 0);
        // Assert
        assert_eq!(
            result,
            Ok(Some(Effect::Ipi(Message {
                destination: 0x1_0002,
                destination_mode: DestinationMode::Logical,
                delivery_mode: DeliveryMode::Fixed,
                vector: 0x51,
                trigger_mode: TriggerMode::Level,
                level: true,
                shorthand: Shorthand::None,
            })))
        );
        assert_eq!(
            lapic.msr_read(0x830, 0),
            Ok((0x1_0002u64 << 32) | (1 << 11) | 0x8051)
        );
    }

    #[test]
    fn msr_write_icr_reserved_low_bit_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act: bit 12 (delivery status) is reserved in x2APIC mode.
        let result = lapic.msr_write(0x830, (1 << 12) | 0x40, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn msr_write_self_ipi_sets_irr() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_write(0x83f, 0x77, 0);
        // Assert
        assert_eq!(result, Ok(None));
        assert!(lapic.is_requested(0x77));
        assert!(!lapic.is_level(0x77));
    }

    #[test]
    fn msr_write_self_ipi_illegal_vector_sets_send_illegal() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let _ = lapic.msr_write(0x83f, 0x07, 0);
        let _ = lapic.msr_write(0x828, 0, 0);
        // Assert
        assert_eq!(lapic.msr_read(0x828, 0), Ok(1 << 5));
        assert!(!lapic.is_requested(0x07));
    }

    #[test]
    fn msr_write_self_ipi_reserved_bits_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_write(0x83f, 0x177, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn msr_read_self_ipi_faults_write_only() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act
        let result = lapic.msr_read(0x83f, 0);
        // Assert
        assert_eq!(result, Err(Gp::WriteOnly));
    }

    #[test]
    fn msr_write_lvt_reserved_timer_mode_faults() {
        // Arrange
        let config = LapicConfig::new(0, true).with_tsc(TscClock {
            hz: 1,
            tsc_at_zero: 0,
        });
        let mut lapic = Lapic::new(config);
        let _ = lapic.mmio_write(u64::from(REG_SVR), &0x1ffu32.to_le_bytes(), 0);
        to_x2apic(&mut lapic);
        // Act
        let result = lapic.msr_write(0x832, (0b11 << 17) | 0xec, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn msr_write_lvt_reserved_bit_faults() {
        // Arrange
        let mut lapic = x2apic_lapic(0);
        // Act: bit 8 (delivery mode) does not exist in the error LVT.
        let result = lapic.msr_write(0x837, 0x1fe, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedBits));
    }

    #[test]
    fn msr_unknown_msr_faults() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let result = lapic.msr_read(0x10, 0);
        // Assert
        assert_eq!(result, Err(Gp::ReservedMsr));
        assert!(!lapic.handles_msr(0x10));
        assert!(lapic.handles_msr(0x830));
    }

    #[test]
    fn x2apic_transition_keeps_other_registers() {
        // Arrange
        let mut lapic = enabled_lapic(2);
        set32(&mut lapic, REG_TPR, 0x30);
        // Act
        to_x2apic(&mut lapic);
        // Assert
        assert_eq!(lapic.msr_read(0x808, 0), Ok(0x30));
        assert_eq!(lapic.msr_read(0x80f, 0), Ok(0x1ff));
    }
}
