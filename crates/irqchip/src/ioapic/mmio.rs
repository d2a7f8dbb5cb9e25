//! Guest MMIO: IOREGSEL, IOWIN and the EOI register.

use super::spec::{
    ArbitrationRegister, EOI_OFFSET, ID_WRITABLE_MASK, IOREGSEL_OFFSET, IOWIN_OFFSET, IdRegister,
    MAX_REDIRECTION_ENTRY, REG_ARBITRATION, REG_ID, REG_REDIRECTION_BASE, REG_REDIRECTION_END,
    REG_VERSION, VERSION, VersionRegister,
};
use super::{Ioapic, IoapicOutput, bump};

/// Which half of a redirection entry a register index selects.
#[derive(Clone, Copy)]
enum Half {
    Low,
    High,
}

/// What an indirect register index names.
#[derive(Clone, Copy)]
enum Register {
    Id,
    Version,
    Arbitration,
    Redirection(u8, Half),
    None,
}

fn decode_index(index: u8) -> Register {
    match index {
        REG_ID => Register::Id,
        REG_VERSION => Register::Version,
        REG_ARBITRATION => Register::Arbitration,
        REG_REDIRECTION_BASE..REG_REDIRECTION_END => {
            let offset = index - REG_REDIRECTION_BASE;
            let half = if offset.is_multiple_of(2) {
                Half::Low
            } else {
                Half::High
            };
            Register::Redirection(offset / 2, half)
        }
        _ => Register::None,
    }
}

impl Ioapic {
    /// A guest read of `data.len()` bytes at `offset` from the IOAPIC base.
    /// Accesses the IOAPIC does not decode (see the module documentation)
    /// read all ones and are counted.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL_OFFSET, 1 | 2 | 4) => Some(u32::from(self.ioregsel)),
            (IOWIN_OFFSET, 4) => Some(self.read_register()),
            (EOI_OFFSET, 1 | 2 | 4) => Some(0),
            _ => None,
        };
        match value {
            Some(value) => {
                for (byte, value) in data.iter_mut().zip(value.to_le_bytes()) {
                    *byte = value;
                }
            }
            None => {
                bump(&mut self.counters.bad_mmio_reads);
                data.fill(0xff);
            }
        }
    }

    /// A guest write of `data` at `offset` from the IOAPIC base. Returns the
    /// messages the write makes the IOAPIC send (an unmasked level pin, an
    /// EOI register write) and whether routes changed. Accesses the IOAPIC
    /// does not decode are ignored and counted.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> IoapicOutput {
        let mut output = IoapicOutput::new();
        match (offset, data) {
            (IOREGSEL_OFFSET, [index] | [index, _] | [index, _, _, _]) => self.ioregsel = *index,
            (IOWIN_OFFSET, &[b0, b1, b2, b3]) => {
                self.write_register(u32::from_le_bytes([b0, b1, b2, b3]), &mut output);
            }
            (EOI_OFFSET, [vector] | [vector, _] | [vector, _, _, _]) => {
                self.eoi_into(*vector, &mut output);
            }
            _ => bump(&mut self.counters.bad_mmio_writes),
        }
        output
    }

    /// The register IOREGSEL selects, as IOWIN reads it.
    fn read_register(&mut self) -> u32 {
        match decode_index(self.ioregsel) {
            Register::Id => self.id.into_bits(),
            Register::Version => VersionRegister::new()
                .with_version(VERSION)
                .with_max_redirection_entry(MAX_REDIRECTION_ENTRY)
                .into_bits(),
            Register::Arbitration => ArbitrationRegister::new()
                .with_arbitration_id(self.id.id())
                .into_bits(),
            Register::Redirection(pin, half) => {
                let bits = self.rte(pin).map_or(u64::MAX, |entry| entry.into_bits());
                match half {
                    Half::Low => bits as u32,
                    Half::High => (bits >> 32) as u32,
                }
            }
            Register::None => {
                bump(&mut self.counters.bad_register_reads);
                u32::MAX
            }
        }
    }

    /// A write through IOWIN to the register IOREGSEL selects.
    fn write_register(&mut self, value: u32, output: &mut IoapicOutput) {
        match decode_index(self.ioregsel) {
            Register::Id => self.id = IdRegister::from_bits(value & ID_WRITABLE_MASK),
            Register::Version | Register::Arbitration => {
                bump(&mut self.counters.read_only_writes);
            }
            Register::Redirection(pin, half) => {
                let Some(entry) = self.rte(pin) else {
                    return;
                };
                let old = entry.into_bits();
                let requested = match half {
                    Half::Low => old & !0xffff_ffff | u64::from(value),
                    Half::High => old & 0xffff_ffff | u64::from(value) << 32,
                };
                self.write_entry(pin, requested, output);
            }
            Register::None => bump(&mut self.counters.bad_register_writes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{IoapicConfig, RedirectionEntry};
    use super::*;
    use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};

    fn ioapic() -> Ioapic {
        Ioapic::new(IoapicConfig::default())
    }

    fn read(ioapic: &mut Ioapic, index: u8) -> u32 {
        ioapic.mmio_write(IOREGSEL_OFFSET, &u32::from(index).to_le_bytes());
        let mut data = [0; 4];
        ioapic.mmio_read(IOWIN_OFFSET, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(ioapic: &mut Ioapic, index: u8, value: u32) -> IoapicOutput {
        ioapic.mmio_write(IOREGSEL_OFFSET, &u32::from(index).to_le_bytes());
        ioapic.mmio_write(IOWIN_OFFSET, &value.to_le_bytes())
    }

    fn low(pin: u8) -> u8 {
        REG_REDIRECTION_BASE + 2 * pin
    }

    fn high(pin: u8) -> u8 {
        low(pin) + 1
    }

    #[test]
    fn ioregsel_read_returns_the_selected_index() {
        let mut ioapic = ioapic();
        ioapic.mmio_write(IOREGSEL_OFFSET, &[0x13]);

        let mut data = [0; 4];
        ioapic.mmio_read(IOREGSEL_OFFSET, &mut data);

        assert_eq!(u32::from_le_bytes(data), 0x13);
    }

    #[test]
    fn id_register_write_keeps_only_bits_24_to_27() {
        let mut ioapic = ioapic();

        write(&mut ioapic, REG_ID, 0xffff_ffff);

        assert_eq!(read(&mut ioapic, REG_ID), 0x0f00_0000);
        assert_eq!(ioapic.id(), 0xf);
    }

    #[test]
    fn version_register_reports_0x20_and_23_entries() {
        let mut ioapic = ioapic();

        let version = read(&mut ioapic, REG_VERSION);

        assert_eq!(version, 0x0017_0020);
    }

    #[test]
    fn version_register_probe_write_of_zero_is_ignored_and_counted() {
        let mut ioapic = ioapic();

        write(&mut ioapic, REG_VERSION, 0);

        assert_eq!(read(&mut ioapic, REG_VERSION), 0x0017_0020);
        assert_eq!(ioapic.counters().read_only_writes, 1);
    }

    #[test]
    fn arbitration_register_follows_the_id() {
        let mut ioapic = ioapic();
        write(&mut ioapic, REG_ID, 0x0500_0000);

        let arbitration = read(&mut ioapic, REG_ARBITRATION);

        assert_eq!(arbitration, 0x0500_0000);
    }

    #[test]
    fn arbitration_register_write_is_ignored() {
        let mut ioapic = ioapic();
        write(&mut ioapic, REG_ID, 0x0300_0000);

        write(&mut ioapic, REG_ARBITRATION, 0x0900_0000);

        assert_eq!(read(&mut ioapic, REG_ARBITRATION), 0x0300_0000);
    }

    #[test]
    fn unimplemented_index_reads_all_ones_and_is_counted() {
        let mut ioapic = ioapic();

        let value = read(&mut ioapic, 0x03);

        assert_eq!(value, u32::MAX);
        assert_eq!(ioapic.counters().bad_register_reads, 1);
    }

    #[test]
    fn unimplemented_index_write_is_ignored_and_counted() {
        let mut ioapic = ioapic();
        let before = ioapic.clone();

        write(&mut ioapic, 0x40, 0x1234);

        assert_eq!(ioapic.counters().bad_register_writes, 1);
        assert_eq!(ioapic.rte(0), before.rte(0));
    }

    #[test]
    fn rte_write_delivery_status_and_remote_irr_stay_read_only() {
        let mut ioapic = ioapic();

        write(&mut ioapic, low(4), 0x0001_d030);

        // Bits 12 and 14 dropped; vector, trigger and mask kept.
        assert_eq!(read(&mut ioapic, low(4)), 0x0001_8030);
    }

    #[test]
    fn rte_reserved_bits_read_as_zero() {
        let mut ioapic = ioapic();

        write(&mut ioapic, high(4), 0xffff_ffff);
        write(&mut ioapic, low(4), 0xffff_ffff);

        assert_eq!(read(&mut ioapic, high(4)), 0xff00_0000);
        assert_eq!(read(&mut ioapic, low(4)) & 0xfffe_0000, 0x0000_0000);
    }

    #[test]
    fn rte_high_dword_write_sets_the_destination() {
        let mut ioapic = ioapic();

        write(&mut ioapic, high(7), 0x0300_0000);

        assert_eq!(ioapic.rte(7).unwrap().destination(), 3);
    }

    #[test]
    fn iowin_byte_access_reads_all_ones_and_is_counted() {
        let mut ioapic = ioapic();
        ioapic.mmio_write(IOREGSEL_OFFSET, &[REG_VERSION]);

        let mut data = [0; 1];
        ioapic.mmio_read(IOWIN_OFFSET, &mut data);

        assert_eq!(data, [0xff]);
        assert_eq!(ioapic.counters().bad_mmio_reads, 1);
    }

    #[test]
    fn misaligned_iowin_write_is_ignored_and_counted() {
        let mut ioapic = ioapic();
        ioapic.mmio_write(IOREGSEL_OFFSET, &[low(0)]);

        ioapic.mmio_write(IOWIN_OFFSET + 1, &0u32.to_le_bytes());

        assert!(ioapic.rte(0).unwrap().masked());
        assert_eq!(ioapic.counters().bad_mmio_writes, 1);
    }

    #[test]
    fn eight_byte_access_reads_all_ones_and_is_counted() {
        let mut ioapic = ioapic();

        let mut data = [0; 8];
        ioapic.mmio_read(IOREGSEL_OFFSET, &mut data);

        assert_eq!(data, [0xff; 8]);
        assert_eq!(ioapic.counters().bad_mmio_reads, 1);
    }

    #[test]
    fn unknown_offset_write_is_ignored_and_counted() {
        let mut ioapic = ioapic();

        let output = ioapic.mmio_write(0x20, &[0x11]);

        assert!(output.is_empty());
        assert_eq!(ioapic.counters().bad_mmio_writes, 1);
    }

    #[test]
    fn empty_access_reads_nothing_and_is_counted() {
        let mut ioapic = ioapic();

        ioapic.mmio_read(IOWIN_OFFSET, &mut []);

        assert_eq!(ioapic.counters().bad_mmio_reads, 1);
    }

    #[test]
    fn eoi_register_read_returns_zero() {
        let mut ioapic = ioapic();

        let mut data = [0xaa; 4];
        ioapic.mmio_read(EOI_OFFSET, &mut data);

        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn eoi_register_write_clears_remote_irr_and_redelivers_asserted_line() {
        let mut ioapic = ioapic();
        write(&mut ioapic, low(5), 0x0000_8061); // level, unmasked, vector 0x61
        let first = ioapic.set_line(5, true);

        let output = ioapic.mmio_write(EOI_OFFSET, &0x61u32.to_le_bytes());

        assert!(first.is_some());
        assert_eq!(output.deliveries().len(), 1);
        assert_eq!(output.deliveries()[0].pin, 5);
        assert!(ioapic.rte(5).unwrap().remote_irr());
    }

    #[test]
    fn rte_unmask_write_of_asserted_level_pin_delivers_in_output() {
        let mut ioapic = ioapic();
        write(&mut ioapic, low(2), 0x0001_8042); // level, masked
        ioapic.set_line(2, true);

        let output = write(&mut ioapic, low(2), 0x0000_8042);

        assert_eq!(
            output.deliveries()[0].message,
            Message {
                destination: 0,
                destination_mode: DestinationMode::Physical,
                delivery_mode: DeliveryMode::Fixed,
                vector: 0x42,
                trigger_mode: TriggerMode::Level,
                level: true,
                shorthand: Shorthand::None,
            }
        );
    }

    #[test]
    fn guest_rte_write_reports_route_change() {
        let mut ioapic = ioapic();

        let output = write(&mut ioapic, high(1), 0x0100_0000);

        assert!(output.routes_changed());
        assert_eq!(ioapic.route_generation(), 1);
    }

    #[test]
    fn rte_write_matches_host_write() {
        let mut by_guest = ioapic();
        let mut by_host = ioapic();
        let entry = RedirectionEntry::from_bits(0x0400_0000_0000_a0b1);

        write(&mut by_guest, high(3), (entry.into_bits() >> 32) as u32);
        write(&mut by_guest, low(3), entry.into_bits() as u32);
        by_host.write_rte(3, entry).unwrap();

        assert_eq!(by_guest.rte(3), by_host.rte(3));
    }
}
