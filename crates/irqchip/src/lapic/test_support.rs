//! Helpers shared by the unit tests of every lapic file.

use super::*;

/// An xAPIC-mode, software-enabled APIC with ID `id`.
pub(crate) fn enabled_lapic(id: u32) -> Lapic {
    let mut lapic = Lapic::new(LapicConfig::new(id, id == 0));
    let _ = lapic.mmio_write(u64::from(spec::REG_SVR), &0x1ffu32.to_le_bytes(), 0);
    lapic
}

/// The same with TSC-deadline mode (TSC at 2 GHz, 1000 at time zero).
pub(crate) fn enabled_lapic_with_tsc(id: u32) -> Lapic {
    let config = LapicConfig::new(id, id == 0).with_tsc(TscClock {
        hz: 2_000_000_000,
        tsc_at_zero: 1000,
    });
    let mut lapic = Lapic::new(config);
    let _ = lapic.mmio_write(u64::from(spec::REG_SVR), &0x1ffu32.to_le_bytes(), 0);
    lapic
}

/// A 4-byte MMIO write.
pub(crate) fn write32(lapic: &mut Lapic, offset: u16, value: u32, now: u64) -> Option<Effect> {
    lapic.mmio_write(u64::from(offset), &value.to_le_bytes(), now)
}

/// A 4-byte MMIO write at time 0 whose effect the test does not need.
pub(crate) fn set32(lapic: &mut Lapic, offset: u16, value: u32) {
    let _ = write32(lapic, offset, value, 0);
}

/// A 4-byte MMIO read.
pub(crate) fn read32(lapic: &mut Lapic, offset: u16, now: u64) -> u32 {
    let mut data = [0u8; 4];
    lapic.mmio_read(u64::from(offset), &mut data, now);
    u32::from_le_bytes(data)
}

/// A fixed message to this APIC.
pub(crate) fn fixed(vector: u8, trigger: TriggerMode) -> Message {
    Message {
        trigger_mode: trigger,
        ..Message::fixed_physical(0, vector)
    }
}

/// A message of `mode` to this APIC.
pub(crate) fn with_mode(mode: DeliveryMode, vector: u8) -> Message {
    Message {
        delivery_mode: mode,
        ..Message::fixed_physical(0, vector)
    }
}

/// Switches `lapic` to x2APIC mode.
pub(crate) fn to_x2apic(lapic: &mut Lapic) {
    let base = lapic.msr_read(IA32_APIC_BASE, 0).unwrap_or(0);
    let result = lapic.msr_write(IA32_APIC_BASE, base | (1 << 10), 0);
    assert_eq!(result, Ok(None));
}
