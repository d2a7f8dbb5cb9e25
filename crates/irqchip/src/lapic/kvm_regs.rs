//! The 1-KiB register page of KVM's `struct kvm_lapic_state`
//! (`KVM_GET_LAPIC`/`KVM_SET_LAPIC`): the first 1 KiB of the xAPIC MMIO page,
//! each register little-endian at its offset (SDM Vol. 3A 11.4.1, Table 11-1).
//!
//! A VMM can mirror state between this model and KVM's in-kernel LAPIC with
//! it. Its user is the snapshot across irqchip modes (a VM saved with KVM's
//! LAPICs, kernel or split mode, resumed with ours, user mode, and back):
//! nothing on today's interrupt path calls it; its round trips are tested
//! below so the conversion is ready, and right, when that lands. In x2APIC mode the ID at 0x20 is the 32-bit x2APIC ID and 0x310 the
//! 32-bit destination, as KVM lays them out with `KVM_CAP_X2APIC_API`
//! (`KVM_X2APIC_API_USE_32BIT_IDS`). IA32_APIC_BASE and IA32_TSC_DEADLINE are
//! MSRs, outside the page: move them with [`Lapic::msr_read`] /
//! [`Lapic::msr_write`].

use super::Lapic;
use super::regs::Reg;
use super::spec::{
    DFR_MODEL_MASK, DivideReg, FIRST_LEGAL_VECTOR, IcrReg, LvtKind, LvtReg, REG_APR, REG_DFR,
    REG_ESR, REG_ICR_HIGH, REG_ICR_LOW, REG_ID, REG_IRR0, REG_ISR0, REG_LDR, REG_PPR, REG_STRIDE,
    REG_SVR, REG_TIMER_CURRENT, REG_TIMER_DIVIDE, REG_TIMER_INITIAL, REG_TMR0, REG_TPR,
    REG_VERSION, SvrReg, TPR_WRITE_MASK, XAPIC_ICR_HIGH_MASK, XAPIC_ID_SHIFT, XAPIC_LDR_MASK,
};
use super::timer::{Countdown, TimerMode};
use super::vectors::VectorSet;

/// Size of KVM's LAPIC register page (`KVM_APIC_REG_SIZE`).
pub const KVM_LAPIC_PAGE_SIZE: usize = 0x400;

fn put(page: &mut [u8; KVM_LAPIC_PAGE_SIZE], offset: u16, value: u32) {
    let start = usize::from(offset);
    if let Some(slot) = page.get_mut(start..start + 4) {
        slot.copy_from_slice(&value.to_le_bytes());
    }
}

fn get(page: &[u8; KVM_LAPIC_PAGE_SIZE], offset: u16) -> u32 {
    let start = usize::from(offset);
    page.get(start..start + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

fn bank(page: &[u8; KVM_LAPIC_PAGE_SIZE], base: u16) -> VectorSet {
    let mut regs = [0u32; 8];
    for (n, slot) in (0u16..).zip(regs.iter_mut()) {
        *slot = get(page, base + n * REG_STRIDE as u16);
    }
    let mut set = VectorSet::from_registers(regs);
    for v in 0..FIRST_LEGAL_VECTOR {
        set.clear(v);
    }
    set
}

impl Lapic {
    /// The register page in KVM's `kvm_lapic_state` layout at time `now`
    /// (the current count is computed for `now`).
    pub fn to_kvm_page(&self, now: u64) -> [u8; KVM_LAPIC_PAGE_SIZE] {
        let mut page = [0u8; KVM_LAPIC_PAGE_SIZE];
        let x2apic = self.is_x2apic();
        let read = |reg: Reg| self.read_register(reg, now).map_or(0, |v| v as u32);
        put(&mut page, REG_ID, read(Reg::Id));
        put(&mut page, REG_VERSION, self.version_reg());
        put(&mut page, REG_TPR, u32::from(self.tpr));
        put(&mut page, REG_APR, u32::from(self.apr()));
        put(&mut page, REG_PPR, u32::from(self.ppr()));
        put(&mut page, REG_LDR, self.ldr);
        put(&mut page, REG_DFR, self.dfr);
        put(&mut page, REG_SVR, self.svr.into_bits());
        for n in 0u8..8 {
            let at = |base: u16| base + u16::from(n) * REG_STRIDE as u16;
            put(&mut page, at(REG_ISR0), self.isr.register(n));
            put(&mut page, at(REG_TMR0), self.tmr.register(n));
            put(&mut page, at(REG_IRR0), self.irr.register(n));
        }
        put(&mut page, REG_ESR, self.esr);
        for kind in LvtKind::ALL {
            put(&mut page, kind.offset(), self.lvt(kind).into_bits());
        }
        let icr = self.icr.into_bits();
        put(&mut page, REG_ICR_LOW, icr as u32);
        let high = (icr >> 32) as u32;
        put(
            &mut page,
            REG_ICR_HIGH,
            if x2apic {
                high
            } else {
                high & XAPIC_ICR_HIGH_MASK
            },
        );
        put(&mut page, REG_TIMER_INITIAL, self.timer.initial_count);
        put(&mut page, REG_TIMER_CURRENT, self.timer_current_count(now));
        put(&mut page, REG_TIMER_DIVIDE, self.timer.divide.into_bits());
        page
    }

    /// Loads a register page in KVM's layout at time `now`: every writable
    /// register takes the page's value (masked to its defined bits, vectors
    /// 0..15 dropped from ISR/IRR/TMR); a one-shot or periodic countdown
    /// resumes from the page's current count, as KVM does. The APIC ID is
    /// taken in xAPIC mode only (the x2APIC ID is fixed); the x2APIC LDR stays
    /// derived. Version, APR and PPR are computed, not loaded. Pending
    /// events, IA32_APIC_BASE and IA32_TSC_DEADLINE are left alone.
    pub fn load_kvm_page(&mut self, page: &[u8; KVM_LAPIC_PAGE_SIZE], now: u64) {
        let x2apic = self.is_x2apic();
        if !x2apic {
            self.xapic_id = (get(page, REG_ID) >> XAPIC_ID_SHIFT) as u8;
            self.ldr = get(page, REG_LDR) & XAPIC_LDR_MASK;
        }
        self.tpr = (get(page, REG_TPR) & TPR_WRITE_MASK) as u8;
        self.dfr = (get(page, REG_DFR) & DFR_MODEL_MASK) | !DFR_MODEL_MASK;
        self.svr =
            SvrReg::from_bits(get(page, REG_SVR) & SvrReg::write_mask(self.config.directed_eoi));
        self.isr = bank(page, REG_ISR0);
        self.tmr = bank(page, REG_TMR0);
        self.irr = bank(page, REG_IRR0);
        self.esr = get(page, REG_ESR);
        self.esr_pending = 0;
        let tsc_deadline = self.config.tsc.is_some();
        for kind in LvtKind::ALL {
            let keep = LvtReg::write_mask(kind, tsc_deadline) | LvtReg::read_only_mask(kind);
            let mut lvt = LvtReg::from_bits(get(page, kind.offset()) & keep);
            lvt.set_delivery_pending(false);
            if !self.svr.apic_enabled() {
                lvt.set_masked(true);
            }
            self.lvt[kind.index()] = lvt;
        }
        let high = get(page, REG_ICR_HIGH);
        let high = if x2apic {
            high
        } else {
            high & XAPIC_ICR_HIGH_MASK
        };
        let low = get(page, REG_ICR_LOW) & IcrReg::LOW_WRITE_MASK;
        self.icr = IcrReg::from_bits((u64::from(high) << 32) | u64::from(low));
        self.timer.divide =
            DivideReg::from_bits(get(page, REG_TIMER_DIVIDE) & DivideReg::WRITE_MASK);
        self.timer.tsc_deadline = 0;
        let initial = get(page, REG_TIMER_INITIAL);
        let current = get(page, REG_TIMER_CURRENT).min(initial);
        let counting = TimerMode::of(self.lvt(LvtKind::Timer)) != TimerMode::TscDeadline;
        self.timer.initial_count = initial;
        self.timer.countdown = (counting && current != 0).then_some(Countdown {
            start_ns: now,
            consumed: initial - current,
            periods: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::spec::{REG_LVT_LINT0, REG_LVT_TIMER};
    use super::super::test_support::*;
    use super::*;
    use crate::apic_bus::TriggerMode;

    #[test]
    fn to_kvm_page_registers_at_mmio_offsets() {
        // Arrange
        let mut lapic = enabled_lapic(6);
        set32(&mut lapic, REG_TPR, 0x42);
        let _ = lapic.accept(&fixed(0x91, TriggerMode::Level));
        // Act
        let page = lapic.to_kvm_page(0);
        // Assert
        assert_eq!(get(&page, REG_ID), 6 << 24);
        assert_eq!(get(&page, REG_TPR), 0x42);
        assert_eq!(get(&page, REG_SVR), 0x1ff);
        assert_eq!(get(&page, REG_IRR0 + 0x40), 1 << 0x11);
        assert_eq!(get(&page, REG_TMR0 + 0x40), 1 << 0x11);
        assert_eq!(get(&page, REG_VERSION), 0x0106_0014);
    }

    #[test]
    fn load_kvm_page_of_other_lapic_reads_back_identically() {
        // Arrange
        let mut source = enabled_lapic(2);
        set32(&mut source, REG_TPR, 0x31);
        set32(&mut source, REG_LDR, 0x0400_0000);
        set32(&mut source, REG_LVT_LINT0, 0x8000 | 0x700);
        set32(&mut source, REG_TIMER_DIVIDE, 0b1011);
        set32(&mut source, REG_LVT_TIMER, (1 << 17) | 0xec);
        let _ = write32(&mut source, REG_TIMER_INITIAL, 1000, 0);
        let _ = source.accept(&fixed(0x61, TriggerMode::Level));
        let _ = source.acknowledge();
        let page = source.to_kvm_page(250);
        let mut target = enabled_lapic(2);
        // Act
        target.load_kvm_page(&page, 250);
        // Assert
        assert_eq!(target.to_kvm_page(250), page);
        assert_eq!(target.next_deadline(), source.next_deadline());
    }

    #[test]
    fn load_kvm_page_illegal_vectors_dropped() {
        // Arrange
        let mut page = [0u8; KVM_LAPIC_PAGE_SIZE];
        put(&mut page, REG_SVR, 0x1ff);
        put(&mut page, REG_IRR0, 0xffff_ffff);
        let mut lapic = enabled_lapic(0);
        // Act
        lapic.load_kvm_page(&page, 0);
        // Assert
        assert!(!lapic.is_requested(15));
        assert!(lapic.is_requested(16));
    }

    #[test]
    fn load_kvm_page_deadline_mode_keeps_initial_count() {
        // Arrange: regression (proptest): a non-zero initial count in
        // TSC-deadline mode was dropped by the load. (A switch into that
        // mode clears the count; a loaded page can still carry one.)
        let mut lapic = enabled_lapic_with_tsc(0);
        set32(&mut lapic, REG_LVT_TIMER, (2 << 17) | 0x31);
        let mut page = lapic.to_kvm_page(0);
        put(&mut page, REG_TIMER_INITIAL, 1);
        let mut copy = lapic.clone();
        // Act
        copy.load_kvm_page(&page, 0);
        // Assert
        assert_eq!(get(&copy.to_kvm_page(0), REG_TIMER_INITIAL), 1);
    }

    #[test]
    fn to_kvm_page_x2apic_id_is_32_bit() {
        // Arrange
        let mut lapic = enabled_lapic(0x345);
        to_x2apic(&mut lapic);
        // Act
        let page = lapic.to_kvm_page(0);
        // Assert
        assert_eq!(get(&page, REG_ID), 0x345);
        assert_eq!(get(&page, REG_LDR), (0x34 << 16) | (1 << 5));
    }
}
