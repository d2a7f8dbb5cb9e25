//! Split mode: a pin's entry as the MSI route KVM delivers for GSI == pin.

use super::Ioapic;
use crate::Error;
use crate::msi::{self, Msi, MsiFormat};

impl Ioapic {
    /// The MSI address/data pair a split-mode VMM programs as the route of
    /// GSI `pin`, so that KVM delivers what this pin's entry says:
    ///
    /// - address: 0xfee in bits 20..31, destination bits 0..7 in bits
    ///   12..19, logical destination mode in bit 2, the redirection hint in
    ///   bit 3 when the entry asks for lowest priority, higher destination
    ///   bits (extended destination ID) where `format` puts them
    ///   (SDM Vol. 3A 11.11.1);
    /// - data: vector in bits 0..7, delivery mode in bits 8..10, assert in
    ///   bit 14, level trigger in bit 15 (SDM Vol. 3A 11.11.2). KVM only
    ///   reports the EOI of a level route's vector (`KVM_EXIT_IOAPIC_EOI`)
    ///   when bit 15 is set.
    ///
    /// The route ignores the mask and Remote IRR: the VMM raises the GSI only
    /// when [`Ioapic::set_line`] or an output says the pin fires. Fails for a
    /// pin that does not exist, or a destination `format` cannot carry.
    pub fn msi_route(&self, pin: u8, format: MsiFormat) -> Result<Msi, Error> {
        let message = self.message(pin).ok_or(Error::PinOutOfRange(pin))?;
        msi::for_message(&message, format)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{IoapicConfig, RedirectionEntry};
    use super::*;
    use crate::apic_bus::DeliveryMode;

    #[test]
    fn msi_route_of_level_logical_lowest_entry_sets_every_field() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        let entry = RedirectionEntry::new()
            .with_vector(0x62)
            .with_delivery_mode(DeliveryMode::LowestPriority)
            .with_logical(true)
            .with_level_triggered(true)
            .with_destination(0x03);
        ioapic.write_rte(5, entry).unwrap();

        let route = ioapic.msi_route(5, MsiFormat::Compatibility).unwrap();

        assert_eq!(
            route,
            Msi {
                address: 0xfee0_300c,
                data: 0xc162,
            }
        );
    }

    #[test]
    fn msi_route_of_edge_physical_fixed_entry_has_no_hint_and_no_level_bit() {
        let mut ioapic = Ioapic::new(IoapicConfig::default());
        let entry = RedirectionEntry::new()
            .with_vector(0x31)
            .with_destination(0x01);
        ioapic.write_rte(0, entry).unwrap();

        let route = ioapic.msi_route(0, MsiFormat::Compatibility).unwrap();

        assert_eq!(
            route,
            Msi {
                address: 0xfee0_1000,
                data: 0x4031,
            }
        );
    }

    #[test]
    fn msi_route_of_extended_destination_uses_address_bits_5_to_11() {
        let config = IoapicConfig {
            ext_dest_id: true,
            ..IoapicConfig::default()
        };
        let mut ioapic = Ioapic::new(config);
        let entry = RedirectionEntry::new()
            .with_vector(0x40)
            .with_destination(0x10)
            .with_extended_destination(0x05 << 1);
        ioapic.write_rte(1, entry).unwrap();

        let route = ioapic
            .msi_route(1, MsiFormat::ExtendedDestinationId)
            .unwrap();

        assert_eq!(route.address, 0xfee1_00a0);
    }

    #[test]
    fn msi_route_of_missing_pin_is_an_error() {
        let ioapic = Ioapic::new(IoapicConfig::default());

        let route = ioapic.msi_route(30, MsiFormat::Compatibility);

        assert_eq!(route, Err(Error::PinOutOfRange(30)));
    }
}
