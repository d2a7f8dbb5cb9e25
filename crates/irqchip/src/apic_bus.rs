//! The APIC bus: the interrupt message every source (IOAPIC pin, MSI, IPI)
//! sends, and the resolution of its destination to local APICs.
//!
//! A [`Message`] is what travels on the bus. The IOAPIC builds one from a
//! redirection entry, the MSI decoder from an address/data pair, and a local
//! APIC from an ICR write. Local APICs accept the ones addressed to them.

use serde::{Deserialize, Serialize};

/// Delivery mode (SDM Vol. 3A 11.6.1, ICR bits 8..10; 82093AA RTE bits 8..10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// 000: deliver `vector` to every destination.
    Fixed,
    /// 001: deliver `vector` to the destination with the lowest priority.
    LowestPriority,
    /// 010: system management interrupt (vector ignored).
    Smi,
    /// 100: non-maskable interrupt (vector ignored).
    Nmi,
    /// 101: INIT (vector ignored).
    Init,
    /// 110: start-up IPI; `vector` is the start page.
    StartUp,
    /// 111: external interrupt, the vector comes from an 8259.
    ExtInt,
    /// 011: reserved encoding; a message carrying it is dropped.
    Reserved,
}

impl DeliveryMode {
    /// Decodes the 3-bit field.
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0b111 {
            0b000 => Self::Fixed,
            0b001 => Self::LowestPriority,
            0b010 => Self::Smi,
            0b100 => Self::Nmi,
            0b101 => Self::Init,
            0b110 => Self::StartUp,
            0b111 => Self::ExtInt,
            _ => Self::Reserved,
        }
    }

    /// Encodes the 3-bit field.
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Fixed => 0b000,
            Self::LowestPriority => 0b001,
            Self::Smi => 0b010,
            Self::Reserved => 0b011,
            Self::Nmi => 0b100,
            Self::Init => 0b101,
            Self::StartUp => 0b110,
            Self::ExtInt => 0b111,
        }
    }
}

/// Destination mode (SDM Vol. 3A 11.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DestinationMode {
    /// The destination is an APIC ID.
    Physical,
    /// The destination is matched against each APIC's LDR (and DFR in xAPIC mode).
    Logical,
}

/// Trigger mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TriggerMode {
    /// Edge-triggered: no EOI broadcast, TMR clear.
    Edge,
    /// Level-triggered: TMR set, EOI broadcast to the IOAPICs.
    Level,
}

/// Destination shorthand (SDM Vol. 3A 11.6.1, ICR bits 18..19). Only ICR
/// writes carry one; IOAPIC and MSI messages use [`Shorthand::None`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Shorthand {
    /// Use the destination field.
    None,
    /// The sending APIC only.
    SelfOnly,
    /// Every APIC, the sender included.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

/// One interrupt message on the APIC bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Destination: an 8-bit xAPIC ID or logical mask, or a 32-bit x2APIC ID
    /// or logical ID. `0xff` (xAPIC) and `0xffff_ffff` (x2APIC) broadcast.
    pub destination: u32,
    /// How `destination` is interpreted.
    pub destination_mode: DestinationMode,
    /// What the destination does with the message.
    pub delivery_mode: DeliveryMode,
    /// The vector (fixed, lowest priority) or start page (SIPI).
    pub vector: u8,
    /// Edge or level.
    pub trigger_mode: TriggerMode,
    /// Assert (true) or de-assert; only INIT level de-assert uses false.
    pub level: bool,
    /// Destination shorthand (ICR only).
    pub shorthand: Shorthand,
}

impl Message {
    /// A fixed, edge, asserted message to physical APIC ID `apic_id`.
    pub const fn fixed_physical(apic_id: u32, vector: u8) -> Self {
        Self {
            destination: apic_id,
            destination_mode: DestinationMode::Physical,
            delivery_mode: DeliveryMode::Fixed,
            vector,
            trigger_mode: TriggerMode::Edge,
            level: true,
            shorthand: Shorthand::None,
        }
    }
}

/// What the bus needs to know about one local APIC to decide whether a
/// message reaches it. A local APIC model produces it
/// (`lapic::Lapic::bus_target`); a VMM may also build it from KVM state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ApicTarget {
    /// The APIC ID (xAPIC: bits 24..31 of the ID register; x2APIC: 32 bits).
    pub apic_id: u32,
    /// The APIC is in x2APIC mode.
    pub x2apic: bool,
    /// The logical destination register (xAPIC: bits 24..31 hold the logical
    /// ID, stored here shifted down to bits 0..7; x2APIC: the 32-bit LDR).
    pub logical_id: u32,
    /// xAPIC DFR model: true for flat (0b1111), false for cluster (0b0000).
    pub dfr_flat: bool,
    /// IA32_APIC_BASE global enable (hardware enable).
    pub hw_enabled: bool,
    /// SVR software enable.
    pub sw_enabled: bool,
    /// The priority used for lowest-priority arbitration (the processor
    /// priority, PPR, SDM Vol. 3A 11.8.3.1).
    pub arbitration_priority: u8,
}
