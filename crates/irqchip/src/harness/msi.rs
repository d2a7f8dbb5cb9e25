//! MSI encode and decode against the SDM layout, written out here bit by
//! bit (SDM Vol. 3A 11.11, Figures 11-24 and 11-25).
//!
//! Input format: a stream of cases, each an opcode byte and its operands:
//!
//! | opcode % 3 | case |
//! |---|---|
//! | 0 | encode a message (any destination, mode, vector, trigger, level, shorthand, hint) in a format |
//! | 1 | decode any address/data pair in a format, re-encode, decode again |
//! | 2 | convert any address between two formats |
//!
//! Checks: `encode` fails exactly for a shorthand or a destination the
//! format cannot carry, and otherwise produces the bits of the SDM layout;
//! `decode(encode(m)) == m` (edge messages decode as asserts); decoding is
//! idempotent through a re-encode; a conversion keeps the destination.

use super::input::Input;
use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};
use crate::msi::{self, Msi, MsiFormat};

const FORMATS: [MsiFormat; 3] = [
    MsiFormat::Compatibility,
    MsiFormat::ExtendedDestinationId,
    MsiFormat::X2apicApi,
];

/// Runs the cases `data` encodes. `Err` names the first broken check.
pub fn run(data: &[u8]) -> Result<(), String> {
    let mut input = Input::new(data);
    let mut case = 0usize;
    while !input.is_empty() {
        let op = input.u8() % 3;
        let result = match op {
            0 => encode_case(&mut input),
            1 => decode_case(&mut input),
            _ => convert_case(&mut input),
        };
        result.map_err(|what| format!("case {case} (op {op}): {what}"))?;
        case += 1;
    }
    Ok(())
}

fn format(input: &mut Input<'_>) -> MsiFormat {
    input.pick(&FORMATS).unwrap_or(MsiFormat::Compatibility)
}

fn message(input: &mut Input<'_>) -> (Message, bool) {
    let flags = input.u8();
    let destination = match flags >> 5 {
        0 => u32::from(input.u8()),
        1 => u32::from(input.u16()),
        2 => u32::from(input.u16()) & 0x7fff,
        _ => input.u32(),
    };
    let shorthand = match input.u8() {
        0xfd => Shorthand::SelfOnly,
        0xfe => Shorthand::AllIncludingSelf,
        0xff => Shorthand::AllExcludingSelf,
        _ => Shorthand::None,
    };
    let message = Message {
        destination,
        destination_mode: if flags & 1 != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        },
        delivery_mode: DeliveryMode::from_bits(flags >> 1),
        vector: input.u8(),
        trigger_mode: if flags & 0x10 != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        },
        level: input.bool(),
        shorthand,
    };
    (message, input.bool())
}

/// The address and data the SDM layout gives `message` in `format`, or
/// `None` when the format cannot carry it.
fn expected_bits(message: &Message, hint: bool, format: MsiFormat) -> Option<Msi> {
    if message.shorthand != Shorthand::None {
        return None;
    }
    let d = u64::from(message.destination);
    let mut address = 0xfee0_0000 | (d & 0xff) << 12;
    match format {
        MsiFormat::Compatibility if d > 0xff => return None,
        MsiFormat::ExtendedDestinationId if d > 0x7fff => return None,
        MsiFormat::Compatibility => {}
        MsiFormat::ExtendedDestinationId => address |= (d >> 8) << 5,
        MsiFormat::X2apicApi => address |= (d >> 8) << 40,
    }
    if message.destination_mode == DestinationMode::Logical {
        address |= 1 << 2;
    }
    if hint {
        address |= 1 << 3;
    }
    let mut data = u32::from(message.vector) | u32::from(message.delivery_mode.to_bits()) << 8;
    if message.level {
        data |= 1 << 14;
    }
    if message.trigger_mode == TriggerMode::Level {
        data |= 1 << 15;
    }
    Some(Msi { address, data })
}

fn encode_case(input: &mut Input<'_>) -> Result<(), String> {
    let (message, hint) = message(input);
    let format = format(input);
    let expected = expected_bits(&message, hint, format);
    let encoded = msi::encode(&message, hint, format).ok();
    if encoded != expected {
        return Err(format!(
            "encode({message:?}, {hint}, {format:?}) = {encoded:x?}, SDM layout {expected:x?}"
        ));
    }
    let Some(encoded) = encoded else {
        return Ok(());
    };
    let decoded = msi::decode(encoded, format)
        .map_err(|e| format!("encoded {encoded:x?} does not decode: {e}"))?;
    let want = Message {
        level: message.level || message.trigger_mode == TriggerMode::Edge,
        ..message
    };
    if decoded.message != want || decoded.redirection_hint != hint {
        return Err(format!(
            "decode(encode({message:?})) = {decoded:?}, expected {want:?} hint {hint}"
        ));
    }
    let bus = decoded.bus_message();
    let lowest = hint && message.delivery_mode == DeliveryMode::Fixed;
    if (bus.delivery_mode == DeliveryMode::LowestPriority)
        != (lowest || message.delivery_mode == DeliveryMode::LowestPriority)
    {
        return Err(format!("bus message {bus:?} of {decoded:?}"));
    }
    Ok(())
}

fn decode_case(input: &mut Input<'_>) -> Result<(), String> {
    let raw = Msi {
        address: input.u64(),
        data: input.u32(),
    };
    let format = format(input);
    let in_window = (raw.address >> 20) & 0xfff == 0xfee
        && match format {
            MsiFormat::X2apicApi => (raw.address >> 32) & 0xff == 0,
            _ => raw.address >> 32 == 0,
        };
    let decoded = match msi::decode(raw, format) {
        Ok(decoded) if in_window => decoded,
        Err(_) if !in_window => return Ok(()),
        other => {
            return Err(format!(
                "decode({raw:x?}, {format:?}) = {other:?}, in window: {in_window}"
            ));
        }
    };
    let again = msi::encode(&decoded.message, decoded.redirection_hint, format)
        .map_err(|e| format!("re-encode of {decoded:?} failed: {e}"))?;
    let twice =
        msi::decode(again, format).map_err(|e| format!("re-decode of {again:x?} failed: {e}"))?;
    if twice != decoded {
        return Err(format!(
            "decode is not idempotent: {decoded:?} then {twice:?}"
        ));
    }
    Ok(())
}

fn convert_case(input: &mut Input<'_>) -> Result<(), String> {
    let raw = Msi {
        address: input.u64(),
        data: input.u32(),
    };
    let from = format(input);
    let to = format(input);
    let Ok(destination) = msi::destination(raw.address, from) else {
        return match msi::convert(raw, from, to) {
            Err(_) => Ok(()),
            Ok(out) => Err(format!(
                "{raw:x?} is no MSI in {from:?} yet converts to {out:x?}"
            )),
        };
    };
    match msi::convert(raw, from, to) {
        Ok(out) => {
            let back = msi::destination(out.address, to)
                .map_err(|e| format!("converted {out:x?} is no MSI in {to:?}: {e}"))?;
            if back != destination || out.data != raw.data {
                return Err(format!(
                    "convert {raw:x?} {from:?} -> {to:?} = {out:x?}: destination {destination:#x} became {back:#x}"
                ));
            }
        }
        Err(_) => {
            let fits = match to {
                MsiFormat::Compatibility => destination <= 0xff,
                MsiFormat::ExtendedDestinationId => destination <= 0x7fff,
                MsiFormat::X2apicApi => true,
            };
            if fits {
                return Err(format!("convert {raw:x?} {from:?} -> {to:?} refused"));
            }
        }
    }
    Ok(())
}
