//! MSI address/data encoding (SDM Vol. 3A 11.11).
//!
//! A message-signalled interrupt is a 32-bit write of [`MsiData`] to an
//! address in the interrupt window 0xfee0_0000..=0xfeef_ffff
//! ([`MsiAddress`]). This module turns an APIC-bus [`Message`] into that
//! pair and back.
//!
//! The 8-bit destination of the SDM layout is too narrow for x2APIC IDs;
//! [`MsiFormat`] picks how the higher destination bits travel:
//!
//! | format | destination bits | where the bits above 7 go |
//! |---|---|---|
//! | [`MsiFormat::Compatibility`] | 0..7 | nowhere (SDM layout) |
//! | [`MsiFormat::ExtendedDestinationId`] | 0..14 | bits 8..14 in address bits 5..11 (the paravirtual "extended destination ID" of KVM and Linux, `KVM_FEATURE_MSI_EXT_DEST_ID`) |
//! | [`MsiFormat::X2apicApi`] | 0..31 | bits 8..31 in address bits 40..63, i.e. the high address dword's bits 8..31 (KVM's `KVM_X2APIC_API_USE_32BIT_IDS` route format) |
//!
//! An edge-triggered message is always an assert (SDM Vol. 3A 11.11.2), so
//! decoding an edge MSI yields `level: true` whatever data bit 14 holds.

use bitfield_struct::bitfield;

use crate::Error;
use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};

/// The interrupt window's fixed address bits 20..31 (SDM Vol. 3A 11.11.1).
pub const MSI_ADDRESS_BASE: u16 = 0xfee;

/// The lowest MSI address (SDM Vol. 3A 11.11.1).
pub const MSI_ADDRESS_WINDOW_START: u64 = 0xfee0_0000;

/// Address bit 2: destination mode, 1 = logical (SDM Vol. 3A 11.11.1).
pub const MSI_ADDRESS_DESTINATION_MODE_BIT: u32 = 2;

/// Address bit 3: redirection hint, 1 = lowest-priority redirection among
/// the destinations (SDM Vol. 3A 11.11.1).
pub const MSI_ADDRESS_REDIRECTION_HINT_BIT: u32 = 3;

/// Address bits 5..11: destination bits 8..14 in the extended destination
/// ID format (KVM's `KVM_FEATURE_MSI_EXT_DEST_ID`; reserved in SDM Vol. 3A
/// 11.11.1).
pub const MSI_ADDRESS_EXT_DESTINATION_SHIFT: u32 = 5;

/// Address bits 12..19: destination ID bits 0..7 (SDM Vol. 3A 11.11.1).
pub const MSI_ADDRESS_DESTINATION_SHIFT: u32 = 12;

/// Address bits 40..63 (high dword bits 8..31): destination bits 8..31 in
/// KVM's x2APIC route format (`KVM_X2APIC_API_USE_32BIT_IDS`).
pub const MSI_ADDRESS_HIGH_DESTINATION_SHIFT: u32 = 40;

/// Destination bits carried in address bits 12..19: the low 8 (SDM Vol. 3A
/// 11.11.1); the formats' extra bits start at destination bit 8.
pub const MSI_DESTINATION_LOW_BITS: u32 = 8;

/// Address bits 32..39: must be zero in KVM's x2APIC route format (KVM
/// refuses such routes, `kvm_msi_route_invalid`).
pub const MSI_ADDRESS_HIGH_RESERVED_MASK: u64 = 0xff << 32;

/// Data bits 8..10: delivery mode (SDM Vol. 3A 11.11.2).
pub const MSI_DATA_DELIVERY_MODE_SHIFT: u32 = 8;

/// Data bit 14: level, 1 = assert (SDM Vol. 3A 11.11.2).
pub const MSI_DATA_LEVEL_BIT: u32 = 14;

/// Data bit 15: trigger mode, 1 = level (SDM Vol. 3A 11.11.2).
pub const MSI_DATA_TRIGGER_BIT: u32 = 15;

/// MSI address register layout (SDM Vol. 3A 11.11.1, Figure 11-24), with the
/// extended destination bits of [`MsiFormat`].
#[bitfield(u64)]
#[derive(PartialEq, Eq, Hash)]
pub struct MsiAddress {
    #[bits(2)]
    __: u8,
    /// Bit 2: 1 = logical destination mode.
    pub logical: bool,
    /// Bit 3: redirection hint (lowest-priority among the destinations).
    pub redirection_hint: bool,
    #[bits(1)]
    __: u8,
    /// Bits 5..11: destination bits 8..14 in the extended destination ID
    /// format.
    #[bits(7)]
    pub ext_destination: u8,
    /// Bits 12..19: destination bits 0..7.
    pub destination: u8,
    /// Bits 20..31: 0xfee for an interrupt.
    #[bits(12)]
    pub base: u16,
    #[bits(8)]
    __: u8,
    /// Bits 40..63: destination bits 8..31 in KVM's x2APIC route format.
    #[bits(24)]
    pub destination_high: u32,
}

/// MSI data register layout (SDM Vol. 3A 11.11.2, Figure 11-25).
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash)]
pub struct MsiData {
    /// Bits 0..7: vector.
    pub vector: u8,
    /// Bits 8..10: delivery mode.
    #[bits(3, from = DeliveryMode::from_bits, into = DeliveryMode::to_bits, default = DeliveryMode::Fixed)]
    pub delivery_mode: DeliveryMode,
    #[bits(3)]
    __: u8,
    /// Bit 14: 1 = assert (only meaningful for level trigger).
    pub assert: bool,
    /// Bit 15: 1 = level-triggered.
    pub level_triggered: bool,
    #[bits(16)]
    __: u16,
}

/// Where an MSI address carries destination bits above bit 7 (see the
/// [module documentation](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsiFormat {
    /// 8-bit destinations only (SDM layout).
    Compatibility,
    /// 15-bit destinations, bits 8..14 in address bits 5..11.
    ExtendedDestinationId,
    /// 32-bit destinations, bits 8..31 in address bits 40..63.
    X2apicApi,
}

impl MsiFormat {
    /// How many destination bits the format carries: 8, 15 or 32.
    pub const fn destination_bits(self) -> u32 {
        match self {
            Self::Compatibility => MSI_DESTINATION_LOW_BITS,
            Self::ExtendedDestinationId => {
                MSI_DESTINATION_LOW_BITS + MsiAddress::EXT_DESTINATION_BITS as u32
            }
            Self::X2apicApi => u32::BITS,
        }
    }
}

/// An MSI address/data pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Msi {
    /// The 64-bit address (the high dword is zero except in
    /// [`MsiFormat::X2apicApi`]).
    pub address: u64,
    /// The 32-bit data.
    pub data: u32,
}

/// An MSI decoded into a bus message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodedMsi {
    /// The message as encoded: delivery mode, destination, vector, trigger.
    pub message: Message,
    /// Address bit 3.
    pub redirection_hint: bool,
}

impl DecodedMsi {
    /// The message to put on the bus. With the redirection hint set, a fixed
    /// message is delivered to one of its destinations by lowest-priority
    /// arbitration (SDM Vol. 3A 11.11.1); everything else is unchanged.
    ///
    /// KVM goes further (`kvm_lowest_prio_delivery`): it arbitrates every
    /// delivery mode with the hint, so an NMI, SMI, INIT or start-up MSI
    /// with the hint reaches one APIC under KVM and every destination
    /// here; and with the hint and the physical destination 0xff (which the
    /// SDM forbids) KVM picks one APIC where this bus broadcasts. Both
    /// differences are listed in `fuzz/README.md` (`kvm_differential`).
    pub fn bus_message(&self) -> Message {
        let mut message = self.message;
        if self.redirection_hint && message.delivery_mode == DeliveryMode::Fixed {
            message.delivery_mode = DeliveryMode::LowestPriority;
        }
        message
    }
}

/// The destination ID an MSI address carries in `format`. Fails if the
/// address is not in the interrupt window, or (x2APIC format) if the high
/// dword's bits 0..7 are set, as KVM refuses such routes.
pub fn destination(address: u64, format: MsiFormat) -> Result<u32, Error> {
    let fields = MsiAddress::from_bits(address);
    let high_dword_reserved = address & MSI_ADDRESS_HIGH_RESERVED_MASK;
    let in_window = fields.base() == MSI_ADDRESS_BASE
        && match format {
            MsiFormat::Compatibility | MsiFormat::ExtendedDestinationId => address >> 32 == 0,
            MsiFormat::X2apicApi => high_dword_reserved == 0,
        };
    if !in_window {
        return Err(Error::NotMsiAddress(address));
    }
    let low = u32::from(fields.destination());
    Ok(match format {
        MsiFormat::Compatibility => low,
        MsiFormat::ExtendedDestinationId => {
            low | u32::from(fields.ext_destination()) << MSI_DESTINATION_LOW_BITS
        }
        MsiFormat::X2apicApi => low | fields.destination_high() << MSI_DESTINATION_LOW_BITS,
    })
}

/// `address` with its destination replaced by `destination` in `format`
/// (the destination bits of the other formats are cleared). Fails if the
/// destination does not fit the format.
pub fn with_destination(address: u64, destination: u32, format: MsiFormat) -> Result<u64, Error> {
    let high = destination >> MSI_DESTINATION_LOW_BITS;
    let fits = match format {
        MsiFormat::Compatibility => high == 0,
        MsiFormat::ExtendedDestinationId => high < 1 << MsiAddress::EXT_DESTINATION_BITS,
        MsiFormat::X2apicApi => true,
    };
    if !fits {
        return Err(Error::DestinationTooWide(destination));
    }
    let mut fields = MsiAddress::from_bits(address)
        .with_destination(destination as u8)
        .with_ext_destination(0)
        .with_destination_high(0);
    match format {
        MsiFormat::Compatibility => {}
        // `high` fits the field: checked above.
        MsiFormat::ExtendedDestinationId => fields.set_ext_destination(high as u8),
        MsiFormat::X2apicApi => fields.set_destination_high(high),
    }
    Ok(fields.into_bits())
}

/// Encodes `message` as an MSI in `format`. Fails if the message carries a
/// shorthand (an MSI cannot) or its destination does not fit the format.
pub fn encode(message: &Message, redirection_hint: bool, format: MsiFormat) -> Result<Msi, Error> {
    if message.shorthand != Shorthand::None {
        return Err(Error::ShorthandInMsi);
    }
    let address = MsiAddress::new()
        .with_base(MSI_ADDRESS_BASE)
        .with_logical(message.destination_mode == DestinationMode::Logical)
        .with_redirection_hint(redirection_hint);
    let address = with_destination(address.into_bits(), message.destination, format)?;
    let data = MsiData::new()
        .with_vector(message.vector)
        .with_delivery_mode(message.delivery_mode)
        .with_assert(message.level)
        .with_level_triggered(message.trigger_mode == TriggerMode::Level);
    Ok(Msi {
        address,
        data: data.into_bits(),
    })
}

/// The MSI that delivers `message` as an interrupt controller sends it:
/// [`encode`] with the redirection hint set exactly for lowest-priority
/// delivery (SDM Vol. 3A 11.11.1: with RH = 1 and DM = 1 the message goes to
/// the lowest-priority processor of the logical set; a physical
/// lowest-priority message is redirected the same way by KVM). This is the
/// one place that rule lives: an IOAPIC pin's split-mode route
/// (`Ioapic::msi_route`) and a message sent by `KVM_SIGNAL_MSI` both come
/// from here, so they cannot drift apart.
pub fn for_message(message: &Message, format: MsiFormat) -> Result<Msi, Error> {
    let redirection_hint = message.delivery_mode == DeliveryMode::LowestPriority;
    encode(message, redirection_hint, format)
}

/// Decodes an MSI in `format`. Fails if the address is not an interrupt
/// address for that format (see [`destination`]). Reserved bits are
/// ignored.
pub fn decode(msi: Msi, format: MsiFormat) -> Result<DecodedMsi, Error> {
    let destination = destination(msi.address, format)?;
    let address = MsiAddress::from_bits(msi.address);
    let data = MsiData::from_bits(msi.data);
    let trigger_mode = if data.level_triggered() {
        TriggerMode::Level
    } else {
        TriggerMode::Edge
    };
    let message = Message {
        destination,
        destination_mode: if address.logical() {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        },
        delivery_mode: data.delivery_mode(),
        vector: data.vector(),
        trigger_mode,
        // Edge messages are always asserts (SDM Vol. 3A 11.11.2).
        level: trigger_mode == TriggerMode::Edge || data.assert(),
        shorthand: Shorthand::None,
    };
    Ok(DecodedMsi {
        message,
        redirection_hint: address.redirection_hint(),
    })
}

/// Rewrites an MSI from one destination format to another, leaving every
/// other bit as it is (for example extended-destination-ID MSIs a guest
/// programs, into the x2APIC route format KVM takes).
pub fn convert(msi: Msi, from: MsiFormat, to: MsiFormat) -> Result<Msi, Error> {
    let destination = destination(msi.address, from)?;
    Ok(Msi {
        address: with_destination(msi.address, destination, to)?,
        data: msi.data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(destination: u32) -> Message {
        Message::fixed_physical(destination, 0x41)
    }

    #[test]
    fn encode_physical_fixed_edge_follows_the_sdm_layout() {
        let msi = encode(&message(0x12), false, MsiFormat::Compatibility).unwrap();

        assert_eq!(
            msi,
            Msi {
                address: 0xfee1_2000,
                data: 0x4041,
            }
        );
    }

    #[test]
    fn encode_logical_destination_sets_address_bit_2() {
        let logical = Message {
            destination_mode: DestinationMode::Logical,
            ..message(0x01)
        };

        let msi = encode(&logical, false, MsiFormat::Compatibility).unwrap();

        assert_eq!(msi.address, 0xfee0_1004);
    }

    #[test]
    fn encode_redirection_hint_sets_address_bit_3() {
        let msi = encode(&message(0x01), true, MsiFormat::Compatibility).unwrap();

        assert_eq!(msi.address, 0xfee0_1008);
    }

    #[test]
    fn encode_level_lowest_priority_sets_data_bits_8_14_15() {
        let level = Message {
            delivery_mode: DeliveryMode::LowestPriority,
            trigger_mode: TriggerMode::Level,
            ..message(0)
        };

        let msi = encode(&level, false, MsiFormat::Compatibility).unwrap();

        assert_eq!(msi.data, 0xc141);
    }

    #[test]
    fn encode_shorthand_is_an_error() {
        let ipi = Message {
            shorthand: Shorthand::AllExcludingSelf,
            ..message(0)
        };

        let result = encode(&ipi, false, MsiFormat::Compatibility);

        assert_eq!(result, Err(Error::ShorthandInMsi));
    }

    #[test]
    fn encode_compatibility_of_destination_above_0xff_is_an_error() {
        let result = encode(&message(0x100), false, MsiFormat::Compatibility);

        assert_eq!(result, Err(Error::DestinationTooWide(0x100)));
    }

    #[test]
    fn encode_ext_dest_of_destination_above_15_bits_is_an_error() {
        let result = encode(&message(0x8000), false, MsiFormat::ExtendedDestinationId);

        assert_eq!(result, Err(Error::DestinationTooWide(0x8000)));
    }

    #[test]
    fn decode_of_encode_returns_the_message_and_hint() {
        let original = Message {
            destination: 0x7ab3,
            destination_mode: DestinationMode::Logical,
            delivery_mode: DeliveryMode::Nmi,
            vector: 0x02,
            trigger_mode: TriggerMode::Level,
            level: false,
            shorthand: Shorthand::None,
        };

        let msi = encode(&original, true, MsiFormat::ExtendedDestinationId).unwrap();
        let decoded = decode(msi, MsiFormat::ExtendedDestinationId).unwrap();

        assert_eq!(
            decoded,
            DecodedMsi {
                message: original,
                redirection_hint: true
            }
        );
    }

    #[test]
    fn decode_edge_with_assert_bit_clear_is_an_assert() {
        let msi = Msi {
            address: 0xfee0_0000,
            data: 0x0041,
        };

        let decoded = decode(msi, MsiFormat::Compatibility).unwrap();

        assert!(decoded.message.level);
    }

    #[test]
    fn decode_address_outside_the_window_is_an_error() {
        let msi = Msi {
            address: 0xfed0_0000,
            data: 0x41,
        };

        let result = decode(msi, MsiFormat::Compatibility);

        assert_eq!(result, Err(Error::NotMsiAddress(0xfed0_0000)));
    }

    #[test]
    fn decode_compatibility_ignores_extended_destination_bits() {
        let msi = Msi {
            address: 0xfee0_3fe0,
            data: 0x41,
        };

        let decoded = decode(msi, MsiFormat::Compatibility).unwrap();

        assert_eq!(decoded.message.destination, 0x03);
    }

    #[test]
    fn decode_ext_dest_id_takes_destination_bits_8_to_14_from_address_bits_5_to_11() {
        let msi = Msi {
            address: 0xfee0_30a0,
            data: 0x41,
        };

        let decoded = decode(msi, MsiFormat::ExtendedDestinationId).unwrap();

        assert_eq!(decoded.message.destination, 0x503);
    }

    #[test]
    fn x2apic_api_round_trips_a_32bit_destination() {
        let original = message(0xdead_be01);

        let msi = encode(&original, false, MsiFormat::X2apicApi).unwrap();
        let decoded = decode(msi, MsiFormat::X2apicApi).unwrap();

        assert_eq!(msi.address, 0xdead_be00_fee0_1000);
        assert_eq!(decoded.message, original);
    }

    #[test]
    fn x2apic_api_decode_with_high_dword_bits_0_to_7_is_an_error() {
        let msi = Msi {
            address: 0x0000_0001_fee0_0000,
            data: 0x41,
        };

        let result = decode(msi, MsiFormat::X2apicApi);

        assert!(matches!(result, Err(Error::NotMsiAddress(_))));
    }

    #[test]
    fn convert_ext_dest_to_x2apic_api_moves_the_high_destination_bits() {
        let guest = encode(&message(0x1234), false, MsiFormat::ExtendedDestinationId).unwrap();

        let kvm = convert(
            guest,
            MsiFormat::ExtendedDestinationId,
            MsiFormat::X2apicApi,
        )
        .unwrap();

        assert_eq!(kvm.address, 0x0000_1200_fee3_4000);
        assert_eq!(kvm.data, guest.data);
    }

    #[test]
    fn bus_message_with_redirection_hint_turns_fixed_into_lowest_priority() {
        let decoded = DecodedMsi {
            message: message(0x0f),
            redirection_hint: true,
        };

        let bus = decoded.bus_message();

        assert_eq!(bus.delivery_mode, DeliveryMode::LowestPriority);
    }

    #[test]
    fn regression_bus_message_with_redirection_hint_keeps_an_nmi_an_nmi() {
        // The kvm_differential target found this documented as "as KVM
        // does": KVM arbitrates an NMI with the hint, this model does not
        // (fuzz/README.md, normalisation N6).
        let decoded = DecodedMsi {
            message: Message {
                delivery_mode: DeliveryMode::Nmi,
                ..message(0x0f)
            },
            redirection_hint: true,
        };

        let bus = decoded.bus_message();

        assert_eq!(bus, decoded.message);
    }

    #[test]
    fn bus_message_without_redirection_hint_is_the_message() {
        let decoded = DecodedMsi {
            message: message(0x0f),
            redirection_hint: false,
        };

        let bus = decoded.bus_message();

        assert_eq!(bus, decoded.message);
    }
}
