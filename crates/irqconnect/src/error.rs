//! The crate's one error type: mistakes of the host's configuration.
//!
//! A guest's mistake is never an [`Error`]: it is answered with an NTSTATUS
//! (see [`crate::validate::Violation`] and [`crate::request::BlockError`]).

use thiserror::Error as ThisError;

/// A host-side configuration error: a bad platform description, device
/// table, snapshot or a call the VMM should not have made.
#[derive(Clone, Debug, PartialEq, Eq, ThisError)]
pub enum Error {
    /// The processor count is zero or above the platform's maximum.
    #[error("the processor count {count} is outside 1..={max}")]
    CpuCountOutOfRange {
        /// The count given.
        count: u32,
        /// The largest count accepted.
        max: u32,
    },
    /// The APIC ID list does not have one entry per processor.
    #[error("{got} APIC IDs were given for {expected} processors")]
    ApicIdCount {
        /// The processor count.
        expected: u32,
        /// The number of APIC IDs given.
        got: usize,
    },
    /// Two processors were given the same APIC ID.
    #[error("APIC ID {apic_id} is given to more than one processor")]
    DuplicateApicId {
        /// The APIC ID used twice.
        apic_id: u32,
    },
    /// The online mask is empty or names processors that do not exist.
    #[error("the online mask {mask:#x} is empty or names absent processors")]
    OnlineMaskInvalid {
        /// The mask given.
        mask: u64,
    },
    /// The object quota is zero or too large to bound memory.
    #[error("the interrupt-object quota {quota} is outside 1..={max}")]
    QuotaOutOfRange {
        /// The quota given.
        quota: u32,
        /// The largest quota accepted.
        max: u32,
    },
    /// The device table has more devices than the test-device window holds.
    #[error("the device table has {count} devices; at most {max} are supported")]
    TooManyDevices {
        /// Devices in the table.
        count: usize,
        /// The most accepted.
        max: usize,
    },
    /// More devices have messages than there are message-signaled test
    /// devices.
    #[error("more than {max} devices have message-signaled interrupts")]
    TooManyMessageDevices {
        /// The most accepted.
        max: u16,
    },
    /// A device's message configuration cannot be assigned.
    #[error("device {device}: messages: {what}")]
    MessagesInvalid {
        /// The device.
        device: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// Device ids must be 0, 1, 2, ... in table order.
    #[error("device at index {index} has id {id}; ids must equal their index")]
    DeviceIdNotIndex {
        /// Position in the table.
        index: usize,
        /// The id given.
        id: u32,
    },
    /// A device has no interrupt resource, or more than the ABI can report.
    #[error(
        "device {device} has {count} line interrupt resources; 0..={max} are supported, and a device needs at least one, or messages"
    )]
    ResourceCount {
        /// The device.
        device: u32,
        /// Its resource count.
        count: usize,
        /// The most accepted.
        max: usize,
    },
    /// A resource names an IOAPIC pin that does not exist.
    #[error("device {device} uses pin {pin}, but the IOAPIC has {pins} pins")]
    PinOutOfRange {
        /// The device.
        device: u32,
        /// The pin given.
        pin: u8,
        /// Number of IOAPIC pins.
        pins: u8,
    },
    /// A resource's vector is outside the device vector range.
    #[error(
        "device {device} uses vector {vector:#x}, outside the device range {min:#x}..={max:#x}"
    )]
    VectorOutOfRange {
        /// The device.
        device: u32,
        /// The vector given.
        vector: u8,
        /// Lowest device vector.
        min: u8,
        /// Highest device vector.
        max: u8,
    },
    /// A resource states an IRQL that is not its vector's priority class.
    #[error("device {device} gives vector {vector:#x} IRQL {irql}; it must be vector >> 4")]
    IrqlMismatch {
        /// The device.
        device: u32,
        /// The vector.
        vector: u8,
        /// The IRQL given.
        irql: u8,
    },
    /// One device lists the same vector twice.
    #[error("device {device} lists vector {vector:#x} more than once")]
    DuplicateVector {
        /// The device.
        device: u32,
        /// The vector.
        vector: u8,
    },
    /// A resource's affinity names no online processor.
    #[error(
        "device {device} vector {vector:#x} has affinity {affinity:#x}, which names no online processor"
    )]
    AffinityEmpty {
        /// The device.
        device: u32,
        /// The vector.
        vector: u8,
        /// The affinity given.
        affinity: u64,
    },
    /// Two resources on one pin disagree on vector or trigger mode, or one
    /// of them is exclusive.
    #[error(
        "pin {pin} is used by devices {first} and {second}, which do not share it alike (same vector, same trigger mode, both shared)"
    )]
    PinConflict {
        /// The pin.
        pin: u8,
        /// The first device using it.
        first: u32,
        /// The device that conflicts.
        second: u32,
    },
    /// Two resources on one vector disagree on trigger mode, or one of them
    /// is exclusive.
    #[error(
        "vector {vector:#x} is used by devices {first} and {second}, which do not share it alike (same trigger mode, both shared)"
    )]
    VectorConflict {
        /// The vector.
        vector: u8,
        /// The first device using it.
        first: u32,
        /// The device that conflicts.
        second: u32,
    },
    /// A configuration text could not be parsed.
    #[error("the configuration cannot be parsed: {message}")]
    ConfigSyntax {
        /// The parser's message.
        message: String,
    },
    /// The VMM reported a storm on a pin the IOAPIC does not have.
    #[error("pin {pin} does not exist; the IOAPIC has {pins} pins")]
    NoSuchPin {
        /// The pin given.
        pin: u32,
        /// Number of IOAPIC pins.
        pins: u8,
    },
    /// A guest-physical range is not (wholly) guest RAM.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not guest RAM")]
    NotRam {
        /// Start of the range.
        gpa: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// A snapshot does not describe a state this service can be in.
    #[error("the snapshot is inconsistent: {what}")]
    SnapshotInconsistent {
        /// What is wrong with it.
        what: String,
    },
}
