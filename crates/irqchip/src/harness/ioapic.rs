//! The IOAPIC alone, against the reference model ([`super::pin_model`]).
//!
//! Input format: byte 0 is the configuration (bits 0..3 the ID, bit 4 the
//! extended destination ID, bits 5..6 the storm threshold: 0, 1, 3 or the
//! default); then operations, each an opcode byte and its operands:
//!
//! | opcode % 12 | operation |
//! |---|---|
//! | 0 | IOREGSEL write, 1, 2 or 4 bytes |
//! | 1 | IOREGSEL write then IOWIN dword write (one register write) |
//! | 2 | IOWIN dword write |
//! | 3 | any MMIO write: offset (decoded ones favoured), width 0..8, data |
//! | 4 | any MMIO read: offset, width 0..8 |
//! | 5 | line level of a pin (pins 24, 25 do not exist) |
//! | 6 | EOI broadcast from a local APIC |
//! | 7 | EOI register write, 1, 2 or 4 bytes |
//! | 8 | host redirection-entry write (`write_rte`), pins 0..25 |
//! | 9 | snapshot: exact round trip, then restore of a corrupted state |
//! | 10 | reset |
//! | 11 | split-mode MSI route of a pin, decoded back |
//!
//! After every operation the model's outputs, entries, lines, storm counts,
//! route generation, counters and every readable register must equal the
//! reference's, Remote IRR must sit on level entries only, and delivery
//! status must read 0.

use super::input::Input;
use super::pin_model::{PINS, RefIoapic, RefOutput};
use crate::ioapic::spec::{EOI_OFFSET, IOREGSEL_OFFSET, IOWIN_OFFSET};
use crate::ioapic::{Ioapic, IoapicConfig, RedirectionEntry};
use crate::msi::{self, MsiFormat};

/// Offsets the MMIO operations pick from: the three registers, and
/// misaligned or unknown ones around them.
const OFFSETS: [u64; 10] = [0x00, 0x10, 0x40, 0x01, 0x04, 0x0c, 0x11, 0x20, 0x44, 0x100];

/// The storm thresholds a configuration byte selects.
const STORM_THRESHOLDS: [u32; 4] = [0, 1, 3, crate::ioapic::spec::DEFAULT_STORM_THRESHOLD];

/// The configuration byte 0 selects.
pub fn config(byte: u8) -> IoapicConfig {
    IoapicConfig {
        id: byte & 0xf,
        ext_dest_id: byte & 0x10 != 0,
        storm_threshold: STORM_THRESHOLDS[usize::from(byte >> 5) & 3],
    }
}

/// Runs the operations `data` encodes (see the module documentation) on
/// one IOAPIC and the reference. `Err` names the first broken invariant or
/// difference.
pub fn run(data: &[u8]) -> Result<(), String> {
    let mut input = Input::new(data);
    let config = config(input.u8());
    let mut ioapic = Ioapic::new(config);
    let mut reference = RefIoapic::new(&config);
    let mut step = 0usize;
    while !input.is_empty() {
        let op = input.u8() % 12;
        apply(&mut ioapic, &mut reference, &mut input, op)
            .and_then(|()| check(&ioapic, &reference))
            .map_err(|what| format!("step {step} (op {op}): {what}"))?;
        step += 1;
    }
    Ok(())
}

fn apply(
    ioapic: &mut Ioapic,
    reference: &mut RefIoapic,
    input: &mut Input<'_>,
    op: u8,
) -> Result<(), String> {
    let mut expected = RefOutput::default();
    match op {
        0 => {
            let width = input.pick(&[1usize, 2, 4]).unwrap_or(4);
            let value = input.u32().to_le_bytes();
            let data = value.get(..width).unwrap_or(&[]);
            mmio_write(ioapic, reference, IOREGSEL_OFFSET, data)?;
        }
        1 => {
            let index = input.u8();
            let value = input.u32().to_le_bytes();
            mmio_write(ioapic, reference, IOREGSEL_OFFSET, &[index])?;
            mmio_write(ioapic, reference, IOWIN_OFFSET, &value)?;
        }
        2 => {
            let value = input.u32().to_le_bytes();
            mmio_write(ioapic, reference, IOWIN_OFFSET, &value)?;
        }
        3 => {
            let offset = offset(input);
            let width = input.width();
            let value = input.u64().to_le_bytes();
            let data = value.get(..width).unwrap_or(&[]);
            mmio_write(ioapic, reference, offset, data)?;
        }
        4 => {
            let offset = offset(input);
            let width = input.width();
            mmio_read(ioapic, reference, offset, width)?;
        }
        5 => {
            let pin = input.u8() % (PINS as u8 + 2);
            let level = input.bool();
            let got = ioapic.set_line(pin, level);
            let want = reference.set_line(pin, level);
            reference.compare_line(got, want)?;
        }
        6 => {
            let vector = input.u8();
            let output = ioapic.eoi(vector);
            reference.eoi(vector, &mut expected);
            reference.compare_output(&output, &expected)?;
        }
        7 => {
            let width = input.pick(&[1usize, 2, 4]).unwrap_or(1);
            let value = input.u32().to_le_bytes();
            let data = value.get(..width).unwrap_or(&[]);
            mmio_write(ioapic, reference, EOI_OFFSET, data)?;
        }
        8 => {
            let pin = input.u8() % (PINS as u8 + 2);
            let bits = input.u64();
            match ioapic.write_rte(pin, RedirectionEntry::from_bits(bits)) {
                Ok(output) => {
                    reference.write_entry(pin, bits, &mut expected);
                    reference.compare_output(&output, &expected)?;
                }
                Err(_) if usize::from(pin) >= PINS => {}
                Err(e) => return Err(format!("write_rte of pin {pin} failed: {e}")),
            }
        }
        9 => snapshot(ioapic, reference, input)?,
        10 => {
            ioapic.reset();
            reference.reset();
        }
        _ => {
            let pin = input.u8() % (PINS as u8 + 2);
            let format = input
                .pick(&[
                    MsiFormat::Compatibility,
                    MsiFormat::ExtendedDestinationId,
                    MsiFormat::X2apicApi,
                ])
                .unwrap_or(MsiFormat::Compatibility);
            msi_route(ioapic, reference, pin, format)?;
        }
    }
    Ok(())
}

fn offset(input: &mut Input<'_>) -> u64 {
    let byte = input.u8();
    if byte & 0x80 != 0 {
        u64::from(byte & 0x7f)
    } else {
        OFFSETS[usize::from(byte) % OFFSETS.len()]
    }
}

fn mmio_write(
    ioapic: &mut Ioapic,
    reference: &mut RefIoapic,
    offset: u64,
    data: &[u8],
) -> Result<(), String> {
    let mut expected = RefOutput::default();
    let output = ioapic.mmio_write(offset, data);
    reference.mmio_write(offset, data, &mut expected);
    reference.compare_output(&output, &expected)
}

fn mmio_read(
    ioapic: &mut Ioapic,
    reference: &mut RefIoapic,
    offset: u64,
    width: usize,
) -> Result<(), String> {
    let mut got = [0u8; 8];
    let slice = got.get_mut(..width).unwrap_or(&mut []);
    ioapic.mmio_read(offset, slice);
    let want = reference.mmio_read(offset, width);
    if slice != want.as_slice() {
        return Err(format!(
            "read of {width} bytes at {offset:#x}: {slice:02x?}, reference {want:02x?}"
        ));
    }
    Ok(())
}

/// Snapshot: `restore(save(x))` is `x`; a corrupted state is either
/// refused with nothing changed, or accepted and then followed by the
/// reference.
fn snapshot(
    ioapic: &mut Ioapic,
    reference: &mut RefIoapic,
    input: &mut Input<'_>,
) -> Result<(), String> {
    let state = ioapic.save();
    let mut restored = Ioapic::new(*ioapic.config());
    restored
        .restore(&state)
        .map_err(|e| format!("restore of a saved state failed: {e}"))?;
    if restored != *ioapic {
        return Err("restore(save(x)) differs from x".into());
    }
    let mut corrupted = state;
    let pin = usize::from(input.u8()) % PINS;
    let flip = input.u64();
    match input.u8() % 4 {
        0 => corrupted.entries[pin] ^= flip,
        1 => corrupted.lines ^= flip as u32,
        2 => corrupted.id ^= flip as u32,
        _ => corrupted.storm_counts[pin] ^= flip as u32,
    }
    let before = ioapic.clone();
    match ioapic.restore(&corrupted) {
        Ok(()) => reference.adopt(&corrupted),
        Err(_) if *ioapic == before => {}
        Err(e) => return Err(format!("a refused restore ({e}) changed the IOAPIC")),
    }
    Ok(())
}

/// The split-mode route of `pin` decodes back to the message the entry
/// describes (when the format can carry its destination).
fn msi_route(
    ioapic: &Ioapic,
    reference: &RefIoapic,
    pin: u8,
    format: MsiFormat,
) -> Result<(), String> {
    let Some(bits) = reference.entry(usize::from(pin)) else {
        return match ioapic.msi_route(pin, format) {
            Err(_) => Ok(()),
            Ok(route) => Err(format!("pin {pin} does not exist but has route {route:?}")),
        };
    };
    let message = reference.message(bits);
    let fits = match format {
        MsiFormat::Compatibility => message.destination <= 0xff,
        MsiFormat::ExtendedDestinationId => message.destination <= 0x7fff,
        MsiFormat::X2apicApi => true,
    };
    match ioapic.msi_route(pin, format) {
        Ok(route) => {
            let decoded = msi::decode(route, format)
                .map_err(|e| format!("route {route:?} of pin {pin} does not decode: {e}"))?;
            if decoded.message != message {
                return Err(format!(
                    "route of pin {pin} decodes to {:?}, entry says {message:?}",
                    decoded.message
                ));
            }
        }
        Err(e) if fits => return Err(format!("route of pin {pin} failed: {e}")),
        Err(_) => {}
    }
    Ok(())
}

/// Invariants after every operation.
fn check(ioapic: &Ioapic, reference: &RefIoapic) -> Result<(), String> {
    reference.compare(ioapic)?;
    for (pin, entry) in ioapic.entries() {
        if entry.remote_irr() && !entry.level_triggered() {
            return Err(format!("pin {pin}: Remote IRR on an edge entry"));
        }
        if entry.delivery_status() {
            return Err(format!("pin {pin}: delivery status set"));
        }
    }
    // The selected register reads back through IOWIN as the reference
    // says (entries, ID and counters are compared directly above; any
    // register is read by operation 4).
    let mut probe = ioapic.clone();
    let mut shadow = reference.clone();
    mmio_read(&mut probe, &mut shadow, IOWIN_OFFSET, 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_empty_input_ok() {
        assert_eq!(run(&[]), Ok(()));
    }

    #[test]
    fn run_level_pin_assert_eoi_redelivers_ok() {
        // Pin 5: level, unmasked, vector 0x61; line high; EOI 0x61.
        let data = [
            0x00, // config
            1, 0x1a, 0x61, 0x80, 0x00, 0x00, // RTE 5 low := 0x8061
            5, 5, 1, // line 5 high
            6, 0x61, // EOI broadcast
            9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // snapshot, no-op corruption
        ];
        assert_eq!(run(&data), Ok(()));
    }
}
