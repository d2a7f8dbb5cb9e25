//! The register file shared by the xAPIC MMIO page and the x2APIC MSRs, and
//! the MMIO entry points (SDM Vol. 3A 11.4.1, Table 11-1; 11.12.1.2,
//! Table 11-6).
//!
//! A register is decoded once from its index (MMIO offset / 16, or MSR -
//! 0x800) into [`Reg`]; reads and writes then share one implementation. In
//! x2APIC mode a write with reserved bits set faults (SDM 11.12.1.3); through
//! MMIO the reserved bits are simply dropped.

use super::spec::{
    APIC_VERSION, DFR_MODEL_MASK, DivideReg, ESR_ILLEGAL_REGISTER_ADDRESS, IcrReg, LVT_COUNT,
    LvtKind, LvtReg, MMIO_PAGE_SIZE, REG_APR, REG_DFR, REG_EOI, REG_ESR, REG_ICR_HIGH, REG_ICR_LOW,
    REG_ID, REG_IRR0, REG_ISR0, REG_LDR, REG_PPR, REG_SELF_IPI, REG_STRIDE, REG_SVR,
    REG_TIMER_CURRENT, REG_TIMER_DIVIDE, REG_TIMER_INITIAL, REG_TMR0, REG_TPR, REG_VERSION,
    REG_WIDTH, SELF_IPI_VECTOR_MASK, SvrReg, TIMER_MODE_RESERVED, TPR_WRITE_MASK, VersionReg,
    XAPIC_ICR_HIGH_MASK, XAPIC_ID_SHIFT, XAPIC_LDR_MASK,
};
use super::{Effect, Gp, Lapic, bump};

/// Number of 32-bit registers in each of the ISR, TMR and IRR (SDM Vol. 3A
/// 11.8.4, Figure 11-20).
const VECTOR_REGS: u16 = 8;

/// One architectural register of the local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reg {
    Id,
    Version,
    Tpr,
    Apr,
    Ppr,
    Eoi,
    Ldr,
    Dfr,
    Svr,
    Isr(u8),
    Tmr(u8),
    Irr(u8),
    Esr,
    Lvt(LvtKind),
    IcrLow,
    IcrHigh,
    TimerInitial,
    TimerCurrent,
    TimerDivide,
    SelfIpi,
}

impl Reg {
    /// Decodes the register at MMIO `offset` (a multiple of 16) for the mode:
    /// APR, DFR and ICR high exist only in xAPIC mode, SELF IPI only in
    /// x2APIC mode (SDM Vol. 3A 11.12.1.2). `None` for a reserved offset.
    pub(crate) fn decode(offset: u16, x2apic: bool) -> Option<Self> {
        let in_bank = |base: u16| {
            (base..base + VECTOR_REGS * REG_STRIDE as u16)
                .contains(&offset)
                .then(|| ((offset - base) / REG_STRIDE as u16) as u8)
        };
        if let Some(n) = in_bank(REG_ISR0) {
            return Some(Self::Isr(n));
        }
        if let Some(n) = in_bank(REG_TMR0) {
            return Some(Self::Tmr(n));
        }
        if let Some(n) = in_bank(REG_IRR0) {
            return Some(Self::Irr(n));
        }
        if let Some(kind) = LvtKind::ALL.into_iter().find(|k| k.offset() == offset) {
            return Some(Self::Lvt(kind));
        }
        let reg = match offset {
            REG_ID => Self::Id,
            REG_VERSION => Self::Version,
            REG_TPR => Self::Tpr,
            REG_APR if !x2apic => Self::Apr,
            REG_PPR => Self::Ppr,
            REG_EOI => Self::Eoi,
            REG_LDR => Self::Ldr,
            REG_DFR if !x2apic => Self::Dfr,
            REG_SVR => Self::Svr,
            REG_ESR => Self::Esr,
            REG_ICR_LOW => Self::IcrLow,
            REG_ICR_HIGH if !x2apic => Self::IcrHigh,
            REG_TIMER_INITIAL => Self::TimerInitial,
            REG_TIMER_CURRENT => Self::TimerCurrent,
            REG_TIMER_DIVIDE => Self::TimerDivide,
            REG_SELF_IPI if x2apic => Self::SelfIpi,
            _ => return None,
        };
        Some(reg)
    }
}

impl Lapic {
    /// The version register (SDM Vol. 3A 11.4.8).
    pub(crate) fn version_reg(&self) -> u32 {
        VersionReg::new()
            .with_version(APIC_VERSION)
            .with_max_lvt(LVT_COUNT - 1)
            .with_eoi_broadcast_suppression(self.config.directed_eoi)
            .into_bits()
    }

    /// Reads a register decoded for the current mode. Only the write-only
    /// registers fail, and only in x2APIC mode (an xAPIC EOI read gives 0).
    pub(crate) fn read_register(&self, reg: Reg, now: u64) -> Result<u64, Gp> {
        let x2apic = self.is_x2apic();
        let value = match reg {
            Reg::Id if x2apic => self.config.apic_id,
            Reg::Id => u32::from(self.xapic_id) << XAPIC_ID_SHIFT,
            Reg::Version => self.version_reg(),
            Reg::Tpr => u32::from(self.tpr),
            Reg::Apr => u32::from(self.apr()),
            Reg::Ppr => u32::from(self.ppr()),
            Reg::Eoi if x2apic => return Err(Gp::WriteOnly),
            Reg::Eoi => 0,
            Reg::Ldr => self.ldr,
            Reg::Dfr => self.dfr,
            Reg::Svr => self.svr.into_bits(),
            Reg::Isr(n) => self.isr.register(n),
            Reg::Tmr(n) => self.tmr.register(n),
            Reg::Irr(n) => self.irr.register(n),
            Reg::Esr => self.esr,
            Reg::Lvt(kind) => self.lvt(kind).into_bits(),
            Reg::IcrLow if x2apic => return Ok(self.icr.into_bits()),
            Reg::IcrLow => self.icr.into_bits() as u32,
            Reg::IcrHigh => (self.icr.into_bits() >> 32) as u32,
            Reg::TimerInitial => self.timer.initial_count,
            Reg::TimerCurrent => self.timer_current_count(now),
            Reg::TimerDivide => self.timer.divide.into_bits(),
            Reg::SelfIpi => return Err(Gp::WriteOnly),
        };
        Ok(u64::from(value))
    }

    /// The register at xAPIC `offset` (a multiple of 16) as a guest reads it
    /// now through the interface of the current mode (the MMIO page in
    /// xAPIC mode, MSR `0x800 + offset / 16` in x2APIC mode), without a
    /// read's side effects: the timer is not first brought up to `now` (see
    /// [`Self::tick`]) and no counter moves. `None` while globally disabled
    /// and where the mode has no readable register at `offset` (an MMIO read
    /// gives 0 there, RDMSR faults).
    pub fn peek_register(&self, offset: u16, now: u64) -> Option<u64> {
        if !self.hw_enabled() {
            return None;
        }
        let reg = Reg::decode(offset, self.is_x2apic())?;
        self.read_register(reg, now).ok()
    }

    /// In x2APIC mode, faults when `value` has a bit outside `allowed` (SDM
    /// Vol. 3A 11.12.1.3). Through MMIO the caller masks instead.
    fn check_reserved(&self, value: u64, allowed: u64) -> Result<(), Gp> {
        if self.is_x2apic() && value & !allowed != 0 {
            Err(Gp::ReservedBits)
        } else {
            Ok(())
        }
    }

    /// Writes a register decoded for the current mode. `Err` means the write
    /// was refused and changed nothing: a #GP in x2APIC mode, a counted,
    /// ignored write through MMIO.
    pub(crate) fn write_register(
        &mut self,
        reg: Reg,
        value: u64,
        now: u64,
    ) -> Result<Option<Effect>, Gp> {
        let x2apic = self.is_x2apic();
        let low = value as u32;
        match reg {
            Reg::Id if x2apic => return Err(Gp::ReadOnly),
            Reg::Id => {
                self.check_reserved(value, u64::from(u32::MAX))?;
                self.xapic_id = (low >> XAPIC_ID_SHIFT) as u8;
            }
            Reg::Version
            | Reg::Apr
            | Reg::Ppr
            | Reg::Isr(_)
            | Reg::Tmr(_)
            | Reg::Irr(_)
            | Reg::TimerCurrent => return Err(Gp::ReadOnly),
            Reg::Ldr if x2apic => return Err(Gp::ReadOnly),
            Reg::Tpr => {
                self.check_reserved(value, u64::from(TPR_WRITE_MASK))?;
                self.tpr = (low & TPR_WRITE_MASK) as u8;
            }
            Reg::Eoi => {
                // x2APIC: a non-zero write faults (SDM Vol. 3A Table 11-6).
                self.check_reserved(value, 0)?;
                return Ok(self.eoi());
            }
            Reg::Ldr => self.ldr = low & XAPIC_LDR_MASK,
            Reg::Dfr => self.dfr = (low & DFR_MODEL_MASK) | !DFR_MODEL_MASK,
            Reg::Svr => {
                let mask = SvrReg::write_mask(self.config.directed_eoi);
                self.check_reserved(value, u64::from(mask))?;
                self.svr = SvrReg::from_bits(low & mask);
                if !self.svr.apic_enabled() {
                    self.mask_all_lvts();
                }
            }
            Reg::Esr => {
                // x2APIC: only zero may be written (SDM Vol. 3A 11.5.3).
                self.check_reserved(value, 0)?;
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            Reg::Lvt(kind) => self.write_lvt(kind, value)?,
            Reg::IcrLow => {
                let high = if x2apic { u64::from(u32::MAX) << 32 } else { 0 };
                self.check_reserved(value, high | u64::from(IcrReg::LOW_WRITE_MASK))?;
                let old_high = self.icr.into_bits() & (u64::from(u32::MAX) << 32);
                let new_high = if x2apic { value & high } else { old_high };
                self.icr = IcrReg::from_bits(new_high | u64::from(low & IcrReg::LOW_WRITE_MASK));
                return Ok(self.send_ipi());
            }
            Reg::IcrHigh => {
                let low_half = self.icr.into_bits() & u64::from(u32::MAX);
                let high = u64::from(low & XAPIC_ICR_HIGH_MASK) << 32;
                self.icr = IcrReg::from_bits(high | low_half);
            }
            Reg::TimerInitial => {
                self.check_reserved(value, u64::from(u32::MAX))?;
                self.write_initial_count(low, now);
            }
            Reg::TimerDivide => {
                self.check_reserved(value, u64::from(DivideReg::WRITE_MASK))?;
                self.write_divide(DivideReg::from_bits(low & DivideReg::WRITE_MASK), now);
            }
            Reg::SelfIpi => {
                self.check_reserved(value, SELF_IPI_VECTOR_MASK)?;
                self.self_ipi(low as u8);
            }
        }
        Ok(None)
    }

    /// LVT write (SDM Vol. 3A 11.5.1): read-only bits keep their value; the
    /// mask bit is forced while software-disabled (11.4.7.2).
    fn write_lvt(&mut self, kind: LvtKind, value: u64) -> Result<(), Gp> {
        let tsc_deadline = self.config.tsc.is_some();
        let mask = LvtReg::write_mask(kind, tsc_deadline);
        let read_only = LvtReg::read_only_mask(kind);
        self.check_reserved(value, u64::from(mask | read_only))?;
        let mut new = LvtReg::from_bits(value as u32 & mask);
        if kind == LvtKind::Timer && self.is_x2apic() && new.timer_mode() == TIMER_MODE_RESERVED {
            // Reserved timer mode (SDM Vol. 3A 11.5.4, Table 11-2).
            return Err(Gp::ReservedBits);
        }
        let old = self.lvt(kind);
        new = LvtReg::from_bits(new.into_bits() | (old.into_bits() & read_only));
        if !self.sw_enabled() {
            new.set_masked(true);
        }
        if kind == LvtKind::Timer {
            self.lvt_timer_written(old, new);
        }
        self.lvt[kind.index()] = new;
        Ok(())
    }

    /// An xAPIC MMIO read at `offset` into the page (SDM Vol. 3A 11.4.1).
    ///
    /// 1-, 2- and 4-byte reads within the first 32 bits of a register are
    /// served. A page that is not decoded (globally disabled, x2APIC mode)
    /// and a bad width or alignment read all ones; a reserved register reads
    /// 0 and sets ESR bit 7. All three are counted.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now: u64) {
        if !self.mmio_decoded() {
            bump(&mut self.counters.disabled_mmio_accesses);
            data.fill(0xff);
            return;
        }
        let within = (offset % REG_STRIDE) as usize;
        if offset >= MMIO_PAGE_SIZE
            || !matches!(data.len(), 1 | 2 | 4)
            || within + data.len() > REG_WIDTH
        {
            bump(&mut self.counters.bad_mmio_accesses);
            data.fill(0xff);
            return;
        }
        let _ = self.tick(now);
        let reg_offset = (offset - within as u64) as u16;
        let value = match Reg::decode(reg_offset, false) {
            Some(reg) => self.read_register(reg, now).unwrap_or(0) as u32,
            None => {
                self.reserved_register_access();
                0
            }
        };
        let bytes = value.to_le_bytes();
        for (dst, src) in data.iter_mut().zip(bytes.iter().skip(within)) {
            *dst = *src;
        }
    }

    /// An xAPIC MMIO write at `offset` into the page (SDM Vol. 3A 11.4.1).
    ///
    /// Only 4-byte writes at a register's offset are taken. A page that is
    /// not decoded, a bad width or alignment, a read-only register and a
    /// reserved register (which also sets ESR bit 7) ignore the write and
    /// count it. Returns the IPI of an ICR write or the EOI broadcast of an
    /// EOI write.
    #[must_use]
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now: u64) -> Option<Effect> {
        if !self.mmio_decoded() {
            bump(&mut self.counters.disabled_mmio_accesses);
            return None;
        }
        let Ok(bytes) = <[u8; REG_WIDTH]>::try_from(data) else {
            bump(&mut self.counters.bad_mmio_accesses);
            return None;
        };
        if offset >= MMIO_PAGE_SIZE || !offset.is_multiple_of(REG_STRIDE) {
            bump(&mut self.counters.bad_mmio_accesses);
            return None;
        }
        let _ = self.tick(now);
        let value = u32::from_le_bytes(bytes);
        let Some(reg) = Reg::decode(offset as u16, false) else {
            self.reserved_register_access();
            return None;
        };
        match self.write_register(reg, u64::from(value), now) {
            Ok(effect) => effect,
            Err(_) => {
                bump(&mut self.counters.read_only_writes);
                None
            }
        }
    }

    fn reserved_register_access(&mut self) {
        bump(&mut self.counters.reserved_register_accesses);
        self.record_error(ESR_ILLEGAL_REGISTER_ADDRESS);
    }
}

#[cfg(test)]
mod tests {
    use super::super::spec::{REG_LVT_ERROR, REG_LVT_LINT0, REG_LVT_TIMER};
    use super::super::test_support::*;
    use super::super::{AcceptOutcome, IA32_APIC_BASE, LapicConfig};
    use super::*;
    use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};

    #[test]
    fn mmio_read_disabled_apic_all_ones() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.msr_write(IA32_APIC_BASE, 0xfee0_0000, 0);
        let mut data = [0u8; 4];
        // Act
        lapic.mmio_read(u64::from(REG_VERSION), &mut data, 0);
        // Assert
        assert_eq!(data, [0xff; 4]);
        assert_eq!(lapic.counters().disabled_mmio_accesses, 1);
    }

    #[test]
    fn peek_register_reads_as_mmio_and_msr_without_side_effects() {
        // Arrange: a fixed vector requested, a one-shot timer due at 100.
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x45, TriggerMode::Level));
        set32(&mut lapic, REG_LVT_TIMER, 0x30);
        set32(&mut lapic, REG_TIMER_DIVIDE, 0xb);
        set32(&mut lapic, REG_TIMER_INITIAL, 100);
        let before = lapic.clone();
        // Act / Assert: xAPIC, the MMIO values; the timer not ticked.
        for offset in [
            REG_ID,
            REG_TPR,
            REG_PPR,
            REG_SVR,
            REG_IRR0 + 0x20,
            REG_TMR0 + 0x20,
        ] {
            let peeked = lapic.peek_register(offset, 200);
            assert_eq!(
                peeked,
                Some(u64::from(read32(&mut before.clone(), offset, 0)))
            );
        }
        assert_eq!(lapic, before);
        assert_eq!(lapic.peek_register(0x40, 0), None);
        // x2APIC: the MSR values, DFR gone.
        to_x2apic(&mut lapic);
        let peeked = lapic.peek_register(REG_LDR, 0);
        assert_eq!(peeked, lapic.clone().msr_read(0x80d, 0).ok());
        assert_eq!(lapic.peek_register(REG_DFR, 0), None);
        // Globally disabled: nothing reads.
        let _ = lapic.msr_write(IA32_APIC_BASE, 0xfee0_0000, 0);
        assert_eq!(lapic.peek_register(REG_SVR, 0), None);
    }

    #[test]
    fn mmio_write_disabled_apic_ignored() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.msr_write(IA32_APIC_BASE, 0xfee0_0000, 0);
        // Act
        let effect = write32(&mut lapic, REG_TPR, 0x40, 0);
        // Assert
        assert_eq!(effect, None);
        assert_eq!(lapic.tpr(), 0);
        assert_eq!(lapic.counters().disabled_mmio_accesses, 1);
    }

    #[test]
    fn mmio_read_x2apic_mode_all_ones() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        to_x2apic(&mut lapic);
        // Act
        let value = read32(&mut lapic, REG_VERSION, 0);
        // Assert
        assert_eq!(value, 0xffff_ffff);
    }

    #[test]
    fn mmio_read_version_reports_0x14_max_lvt_6_directed_eoi() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let value = read32(&mut lapic, REG_VERSION, 0);
        // Assert
        assert_eq!(value, 0x0106_0014);
    }

    #[test]
    fn mmio_read_version_without_directed_eoi_clears_bit_24() {
        // Arrange
        let mut config = LapicConfig::new(0, true);
        config.directed_eoi = false;
        let mut lapic = Lapic::new(config);
        // Act
        let value = read32(&mut lapic, REG_VERSION, 0);
        // Assert
        assert_eq!(value, 0x0006_0014);
    }

    #[test]
    fn mmio_read_one_byte_of_tpr_returns_that_byte() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_TPR, 0x5a);
        let mut data = [0u8; 1];
        // Act
        lapic.mmio_read(u64::from(REG_TPR), &mut data, 0);
        // Assert
        assert_eq!(data, [0x5a]);
    }

    #[test]
    fn mmio_read_misaligned_all_ones_counted() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let mut data = [0u8; 4];
        // Act
        lapic.mmio_read(u64::from(REG_TPR) + 2, &mut data, 0);
        // Assert
        assert_eq!(data, [0xff; 4]);
        assert_eq!(lapic.counters().bad_mmio_accesses, 1);
    }

    #[test]
    fn mmio_read_eight_bytes_all_ones_counted() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let mut data = [0u8; 8];
        // Act
        lapic.mmio_read(u64::from(REG_TPR), &mut data, 0);
        // Assert
        assert_eq!(data, [0xff; 8]);
        assert_eq!(lapic.counters().bad_mmio_accesses, 1);
    }

    #[test]
    fn mmio_read_outside_page_all_ones_counted() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let mut data = [0u8; 4];
        // Act
        lapic.mmio_read(0x1000, &mut data, 0);
        // Assert
        assert_eq!(data, [0xff; 4]);
        assert_eq!(lapic.counters().bad_mmio_accesses, 1);
    }

    #[test]
    fn mmio_write_two_bytes_ignored_counted() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let effect = lapic.mmio_write(u64::from(REG_TPR), &[0x40, 0], 0);
        // Assert
        assert_eq!(effect, None);
        assert_eq!(lapic.tpr(), 0);
        assert_eq!(lapic.counters().bad_mmio_accesses, 1);
    }

    #[test]
    fn mmio_read_reserved_offset_zero_sets_esr_illegal_register() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let value = read32(&mut lapic, 0x040, 0);
        set32(&mut lapic, REG_ESR, 0);
        // Assert
        assert_eq!(value, 0);
        assert_eq!(read32(&mut lapic, REG_ESR, 0), ESR_ILLEGAL_REGISTER_ADDRESS);
        assert_eq!(lapic.counters().reserved_register_accesses, 1);
    }

    #[test]
    fn mmio_read_self_ipi_offset_in_xapic_is_reserved() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let value = read32(&mut lapic, REG_SELF_IPI, 0);
        // Assert
        assert_eq!(value, 0);
        assert_eq!(lapic.counters().reserved_register_accesses, 1);
    }

    #[test]
    fn mmio_write_read_only_register_ignored_counted() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        set32(&mut lapic, REG_VERSION, 0);
        // Assert
        assert_eq!(read32(&mut lapic, REG_VERSION, 0), lapic.version_reg());
        assert_eq!(lapic.counters().read_only_writes, 1);
    }

    #[test]
    fn mmio_read_eoi_reads_zero() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let value = read32(&mut lapic, REG_EOI, 0);
        // Assert
        assert_eq!(value, 0);
        assert_eq!(lapic.counters().reserved_register_accesses, 0);
    }

    #[test]
    fn mmio_write_id_changes_xapic_id() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        set32(&mut lapic, REG_ID, 0x0900_0000);
        // Assert
        assert_eq!(lapic.apic_id(), 9);
        assert_eq!(read32(&mut lapic, REG_ID, 0), 0x0900_0000);
    }

    #[test]
    fn mmio_write_tpr_reserved_bits_dropped() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        set32(&mut lapic, REG_TPR, 0xffff_ff35);
        // Assert
        assert_eq!(read32(&mut lapic, REG_TPR, 0), 0x35);
    }

    #[test]
    fn mmio_write_ldr_keeps_only_bits_24_31() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        set32(&mut lapic, REG_LDR, 0x1234_5678);
        // Assert
        assert_eq!(read32(&mut lapic, REG_LDR, 0), 0x1200_0000);
    }

    #[test]
    fn mmio_write_dfr_cluster_low_bits_read_as_ones() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        set32(&mut lapic, REG_DFR, 0);
        // Assert
        assert_eq!(read32(&mut lapic, REG_DFR, 0), 0x0fff_ffff);
        assert!(!lapic.bus_target().dfr_flat);
    }

    #[test]
    fn mmio_write_svr_clear_enable_masks_all_lvts() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_LVT_LINT0, 0x700);
        // Act
        set32(&mut lapic, REG_SVR, 0xff);
        // Assert
        assert!(!lapic.sw_enabled());
        assert_eq!(read32(&mut lapic, REG_LVT_LINT0, 0), 0x1_0700);
    }

    #[test]
    fn mmio_write_lvt_while_software_disabled_keeps_mask() {
        // Arrange
        let mut lapic = Lapic::new(LapicConfig::new(0, true));
        // Act
        set32(&mut lapic, REG_LVT_TIMER, 0xec);
        // Assert
        assert_eq!(read32(&mut lapic, REG_LVT_TIMER, 0), 0x1_00ec);
    }

    #[test]
    fn mmio_write_svr_bit_12_without_directed_eoi_dropped() {
        // Arrange
        let mut config = LapicConfig::new(0, true);
        config.directed_eoi = false;
        let mut lapic = Lapic::new(config);
        // Act
        set32(&mut lapic, REG_SVR, 0x11ff);
        // Assert
        assert_eq!(read32(&mut lapic, REG_SVR, 0), 0x1ff);
    }

    #[test]
    fn mmio_write_lvt_remote_irr_bit_read_only() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        set32(&mut lapic, REG_LVT_LINT0, 0x4000 | 0x1000 | 0x30);
        // Assert
        assert_eq!(read32(&mut lapic, REG_LVT_LINT0, 0), 0x30);
    }

    #[test]
    fn esr_write_latches_errors_since_last_write() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x01, TriggerMode::Edge));
        let before_latch = read32(&mut lapic, REG_ESR, 0);
        // Act
        set32(&mut lapic, REG_ESR, 0);
        let latched = read32(&mut lapic, REG_ESR, 0);
        set32(&mut lapic, REG_ESR, 0);
        let cleared = read32(&mut lapic, REG_ESR, 0);
        // Assert
        assert_eq!(before_latch, 0);
        assert_eq!(latched, 1 << 6);
        assert_eq!(cleared, 0);
    }

    #[test]
    fn isr_irr_tmr_registers_show_vector_bits() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x61, TriggerMode::Level));
        let _ = lapic.acknowledge();
        let _ = lapic.accept(&fixed(0x22, TriggerMode::Edge));
        // Act
        let isr3 = read32(&mut lapic, REG_ISR0 + 0x30, 0);
        let tmr3 = read32(&mut lapic, REG_TMR0 + 0x30, 0);
        let irr1 = read32(&mut lapic, REG_IRR0 + 0x10, 0);
        // Assert
        assert_eq!(isr3, 1 << 1);
        assert_eq!(tmr3, 1 << 1);
        assert_eq!(irr1, 1 << 2);
    }

    #[test]
    fn mmio_write_eoi_level_returns_broadcast() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        let _ = lapic.accept(&fixed(0x61, TriggerMode::Level));
        let _ = lapic.acknowledge();
        // Act
        let effect = write32(&mut lapic, REG_EOI, 0, 0);
        // Assert
        assert_eq!(effect, Some(Effect::EoiBroadcast { vector: 0x61 }));
    }

    #[test]
    fn icr_write_fixed_physical_returns_ipi_message() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_ICR_HIGH, 0x0300_0000);
        // Act
        let effect = write32(&mut lapic, REG_ICR_LOW, 0x4031, 0);
        // Assert
        assert_eq!(effect, Some(Effect::Ipi(Message::fixed_physical(3, 0x31))));
    }

    #[test]
    fn icr_write_logical_all_but_self_nmi_carries_shorthand() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let effect = write32(&mut lapic, REG_ICR_LOW, (0b11 << 18) | (1 << 11) | 0x400, 0);
        // Assert
        assert_eq!(
            effect,
            Some(Effect::Ipi(Message {
                destination: 0,
                destination_mode: DestinationMode::Logical,
                delivery_mode: DeliveryMode::Nmi,
                vector: 0,
                trigger_mode: TriggerMode::Edge,
                level: true,
                shorthand: Shorthand::AllExcludingSelf,
            }))
        );
    }

    #[test]
    fn icr_write_init_then_sipi_sends_both() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_ICR_HIGH, 0x0100_0000);
        // Act
        let init = write32(&mut lapic, REG_ICR_LOW, 0xc500, 0);
        let sipi = write32(&mut lapic, REG_ICR_LOW, 0x0608, 0);
        // Assert
        let Some(Effect::Ipi(init)) = init else {
            panic!("no INIT sent: {init:?}")
        };
        let Some(Effect::Ipi(sipi)) = sipi else {
            panic!("no SIPI sent: {sipi:?}")
        };
        assert_eq!(
            (init.delivery_mode, init.destination),
            (DeliveryMode::Init, 1)
        );
        assert_eq!(
            (sipi.delivery_mode, sipi.vector),
            (DeliveryMode::StartUp, 0x08)
        );
    }

    #[test]
    fn icr_write_init_level_deassert_sends_nothing() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let effect = write32(&mut lapic, REG_ICR_LOW, 0x8500 | (0b10 << 18), 0);
        // Assert
        assert_eq!(effect, None);
    }

    #[test]
    fn icr_write_illegal_vector_sets_send_illegal_not_sent() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let effect = write32(&mut lapic, REG_ICR_LOW, 0x000e, 0);
        set32(&mut lapic, REG_ESR, 0);
        // Assert
        assert_eq!(effect, None);
        assert_eq!(read32(&mut lapic, REG_ESR, 0), 1 << 5);
        assert_eq!(lapic.counters().illegal_vectors_sent, 1);
    }

    #[test]
    fn icr_read_delivery_status_idle_and_fields_kept() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        set32(&mut lapic, REG_ICR_LOW, 0xffff_ffff);
        // Assert
        assert_eq!(read32(&mut lapic, REG_ICR_LOW, 0), 0x000c_cfff);
    }

    #[test]
    fn error_lvt_reserved_register_access_raises_error_vector() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        set32(&mut lapic, REG_LVT_ERROR, 0xfd);
        // Act
        set32(&mut lapic, 0x050, 1);
        // Assert
        assert!(lapic.is_requested(0xfd));
    }

    #[test]
    fn decode_every_offset_never_panics_and_matches_mode() {
        // Arrange / Act / Assert
        for offset in (0..0x1000u16).step_by(16) {
            let x = Reg::decode(offset, false);
            let x2 = Reg::decode(offset, true);
            if offset == REG_DFR {
                assert_eq!((x, x2), (Some(Reg::Dfr), None));
            }
            if offset == REG_SELF_IPI {
                assert_eq!((x, x2), (None, Some(Reg::SelfIpi)));
            }
        }
        assert_eq!(Reg::decode(0x170, false), Some(Reg::Isr(7)));
        assert_eq!(Reg::decode(0x400, false), None);
    }

    #[test]
    fn accept_after_self_ipi_shorthand_icr_leaves_irr_to_bus() {
        // Arrange
        let mut lapic = enabled_lapic(0);
        // Act
        let effect = write32(&mut lapic, REG_ICR_LOW, (0b01 << 18) | 0x44, 0);
        // Assert: the model does not loop the IPI back itself.
        assert!(matches!(effect, Some(Effect::Ipi(m)) if m.shorthand == Shorthand::SelfOnly));
        assert!(!lapic.is_requested(0x44));
        let Some(Effect::Ipi(msg)) = effect else {
            return;
        };
        assert_eq!(lapic.accept(&msg), AcceptOutcome::Requested);
    }
}
