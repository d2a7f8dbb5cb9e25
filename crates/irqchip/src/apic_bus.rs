//! The APIC bus: the interrupt message every source (IOAPIC pin, MSI, IPI)
//! sends, and the resolution of its destination to local APICs.
//!
//! A [`Message`] is what travels on the bus. The IOAPIC builds one from a
//! redirection entry, the MSI decoder from an address/data pair, and a local
//! APIC from an ICR write. Local APICs accept the ones addressed to them.
//!
//! # Destination resolution
//!
//! [`resolve`] turns a message into the set of vCPU indices ([`ApicSet`])
//! whose local APIC receives it, given one [`ApicTarget`] per vCPU (index =
//! vCPU index, at most [`MAX_APICS`]; targets past that are never addressed)
//! and the sender's index for IPIs (`None` for IOAPIC and MSI messages).
//! A target receives the message when both of these hold:
//!
//! 1. **The destination matches** ([`matches_destination`]):
//!    - Shorthand self: the sender only; all-including-self: every target;
//!      all-excluding-self: every target but the sender (SDM Vol. 3A
//!      11.6.1). Without a sender, "self" is nobody and "all but self" is
//!      everybody.
//!    - Physical, xAPIC target: `destination == 0xff` (broadcast) or
//!      `destination == apic_id` (SDM Vol. 3A 11.6.2.1). A destination above
//!      0xff never matches an xAPIC (no aliasing of the low byte, as KVM).
//!    - Physical, x2APIC target: `destination == 0xffff_ffff` (broadcast)
//!      or `destination == apic_id` (SDM Vol. 3A 11.12.9).
//!    - Logical, xAPIC target, `destination == 0xff`: broadcast.
//!      Flat model: `logical_id & destination != 0`. Cluster model: the
//!      high nibbles are equal and the low nibbles share a bit (SDM Vol. 3A
//!      11.6.2.2).
//!    - Logical, x2APIC target, `destination == 0xffff_ffff`: broadcast.
//!      Otherwise the cluster (bits 16..31) is equal and the member bits
//!      (0..15) share a bit (SDM Vol. 3A 11.12.10.2).
//!    - KVM's x2APIC broadcast quirk, reproduced so the user-mode chip
//!      behaves like the in-kernel one: a message without a sender (IOAPIC,
//!      MSI) whose destination is `0xff` is a broadcast for a target in
//!      x2APIC mode, in physical and logical mode alike. Other 8-bit logical
//!      destinations reach x2APIC targets through the x2APIC rule above:
//!      cluster 0, member bits = the destination (KVM's
//!      `kvm_apic_match_logical_addr` / `kvm_apic_mda`).
//! 2. **The target accepts the delivery mode** ([`accepts`]): a
//!    hardware-disabled APIC (IA32_APIC_BASE enable clear, SDM Vol. 3A
//!    11.4.3) receives nothing; a software-disabled APIC (SVR enable clear)
//!    receives only NMI, INIT, start-up and SMI messages (SDM Vol. 3A
//!    11.4.7.2); nobody receives the reserved delivery mode.
//!
//! # Lowest-priority arbitration
//!
//! The SDM leaves the choice model-specific (Vol. 3A 11.6.2.4): P6-family
//! and Pentium processors arbitrate on the APIC bus with the arbitration
//! priority register (APR), Pentium 4 and later processors leave it to the
//! chipset, which uses the TPR, and the focus-processor rule is optional.
//! KVM does neither: with its default `vector_hashing` it picks the
//! (vector mod n)-th processor of the destination set, whatever the
//! priorities, and otherwise the first one. We follow the architecture's
//! intent, which is also what a guest can observe and test (a processor
//! that raised its TPR does not get the interrupt while an idle one is
//! available): the processor with the lowest PPR, which covers the TPR and
//! what is in service. Concretely:
//!
//! [`Arbiter::route`] resolves as above and, for a lowest-priority message,
//! keeps one target: among the resolved targets that accept fixed
//! interrupts (hardware and software enabled), the one with the smallest
//! [`ApicTarget::arbitration_priority`] (a local APIC reports its PPR). Ties go to
//! the first tied index at or after the arbiter's cursor, counting upward
//! and wrapping from 255 to 0; the cursor then moves to the winner's index
//! plus one. So equal-priority APICs take turns in index order. The cursor
//! is the arbiter's whole state ([`ArbiterState`]); one pass over the
//! targets decides, so the cost grows linearly with the number of vCPUs.
//! As KVM does, a lowest-priority message to the physical broadcast
//! destination `0xff` is delivered to every resolved target, like a fixed
//! one. The focus-processor rule (SDM 11.6.2.4, optional) is not
//! emulated.

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

/// The most local APICs a bus resolves against (one per vCPU index).
pub const MAX_APICS: usize = 256;

/// xAPIC broadcast destination, physical and logical (SDM Vol. 3A 11.6.2.1,
/// 11.6.2.2).
pub const XAPIC_BROADCAST: u32 = 0xff;

/// x2APIC broadcast destination, physical and logical (SDM Vol. 3A 11.12.9).
pub const X2APIC_BROADCAST: u32 = 0xffff_ffff;

/// xAPIC logical ID: 8 bits, LDR bits 24..31 (SDM Vol. 3A 11.6.2.2); the
/// [`ApicTarget`] holds it shifted down to bits 0..7.
pub const XAPIC_LOGICAL_ID_MASK: u32 = 0xff;

/// xAPIC cluster model: the cluster is the logical ID's high nibble (SDM
/// Vol. 3A 11.6.2.2).
pub const XAPIC_CLUSTER_SHIFT: u32 = 4;

/// xAPIC cluster model: the member bits are the logical ID's low nibble (SDM
/// Vol. 3A 11.6.2.2).
pub const XAPIC_CLUSTER_MEMBER_MASK: u32 = 0xf;

/// x2APIC logical ID: the cluster is bits 16..31 (SDM Vol. 3A 11.12.10.2).
pub const X2APIC_CLUSTER_SHIFT: u32 = 16;

/// x2APIC logical ID: the member bits are bits 0..15 (SDM Vol. 3A
/// 11.12.10.2).
pub const X2APIC_CLUSTER_MEMBER_MASK: u32 = 0xffff;

const SET_WORDS: usize = MAX_APICS / 64;

/// A set of vCPU indices below [`MAX_APICS`]: a fixed 256-bit bitset, so
/// resolving a message never allocates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ApicSet {
    words: [u64; SET_WORDS],
}

impl ApicSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self {
            words: [0; SET_WORDS],
        }
    }

    /// The set holding `index` alone; empty if `index >= MAX_APICS`.
    pub fn single(index: usize) -> Self {
        let mut set = Self::new();
        set.insert(index);
        set
    }

    /// Adds `index`; returns false (and changes nothing) if it is not below
    /// [`MAX_APICS`].
    pub fn insert(&mut self, index: usize) -> bool {
        match self.words.get_mut(index / 64) {
            Some(word) => {
                *word |= 1 << (index % 64);
                true
            }
            None => false,
        }
    }

    /// Removes `index` (nothing happens if it is absent).
    pub fn remove(&mut self, index: usize) {
        if let Some(word) = self.words.get_mut(index / 64) {
            *word &= !(1 << (index % 64));
        }
    }

    /// Whether `index` is in the set.
    pub fn contains(&self, index: usize) -> bool {
        self.words
            .get(index / 64)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&word| word == 0)
    }

    /// The number of indices in the set.
    pub fn len(&self) -> usize {
        self.words
            .iter()
            .map(|word| word.count_ones() as usize)
            .sum()
    }

    /// The smallest index in the set.
    pub fn first(&self) -> Option<usize> {
        self.iter().next()
    }

    /// The indices in increasing order.
    pub fn iter(&self) -> ApicSetIter {
        ApicSetIter {
            words: self.words,
            word: 0,
        }
    }
}

impl IntoIterator for &ApicSet {
    type Item = usize;
    type IntoIter = ApicSetIter;

    fn into_iter(self) -> ApicSetIter {
        self.iter()
    }
}

impl FromIterator<usize> for ApicSet {
    /// Collects indices; those not below [`MAX_APICS`] are dropped.
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut set = Self::new();
        for index in iter {
            set.insert(index);
        }
        set
    }
}

/// Iterator over an [`ApicSet`]'s indices, in increasing order.
#[derive(Clone, Debug)]
pub struct ApicSetIter {
    words: [u64; SET_WORDS],
    word: usize,
}

impl Iterator for ApicSetIter {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while let Some(bits) = self.words.get_mut(self.word) {
            if *bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                *bits &= *bits - 1;
                return Some(self.word * 64 + bit);
            }
            self.word += 1;
        }
        None
    }
}

/// Whether `message`'s destination (shorthand, mode and ID) selects
/// `target`, the APIC of vCPU `index`; `source` is the sending vCPU's index
/// for an IPI, `None` for IOAPIC and MSI messages. The rules are in the
/// [module documentation](self). Enable state is not looked at here: see
/// [`accepts`].
#[inline]
pub fn matches_destination(
    message: &Message,
    target: &ApicTarget,
    index: usize,
    source: Option<usize>,
) -> bool {
    Selector::new(message, source).selects(target, index)
}

/// A message's destination, decoded once for a pass over the targets.
#[derive(Clone, Copy)]
enum Selector {
    /// Only this index (shorthand self); `None` selects nobody.
    Only(Option<usize>),
    /// Everybody but this index (shorthand all-excluding-self, or
    /// all-including-self with `None`).
    AllBut(Option<usize>),
    /// Physical or logical destination as xAPIC targets see it, and as
    /// x2APIC targets see it (KVM's broadcast quirk applied).
    Address {
        logical: bool,
        xapic: u32,
        x2apic: u32,
    },
}

impl Selector {
    #[inline]
    fn new(message: &Message, source: Option<usize>) -> Self {
        match message.shorthand {
            Shorthand::SelfOnly => Self::Only(source),
            Shorthand::AllIncludingSelf => Self::AllBut(None),
            Shorthand::AllExcludingSelf => Self::AllBut(source),
            Shorthand::None => {
                let xapic = message.destination;
                // Without a sender, 0xff means "everybody" to an x2APIC.
                let x2apic = if source.is_none() && xapic == XAPIC_BROADCAST {
                    X2APIC_BROADCAST
                } else {
                    xapic
                };
                Self::Address {
                    logical: message.destination_mode == DestinationMode::Logical,
                    xapic,
                    x2apic,
                }
            }
        }
    }

    #[inline]
    fn selects(self, target: &ApicTarget, index: usize) -> bool {
        match self {
            Self::Only(only) => only == Some(index),
            Self::AllBut(but) => but != Some(index),
            Self::Address {
                logical,
                xapic,
                x2apic,
            } => {
                if target.x2apic {
                    x2apic == X2APIC_BROADCAST
                        || if logical {
                            matches_x2apic_logical(target.logical_id, x2apic)
                        } else {
                            x2apic == target.apic_id
                        }
                } else {
                    xapic == XAPIC_BROADCAST
                        || if logical {
                            matches_xapic_logical(target, xapic)
                        } else {
                            xapic == target.apic_id
                        }
                }
            }
        }
    }
}

fn matches_x2apic_logical(logical_id: u32, destination: u32) -> bool {
    logical_id >> X2APIC_CLUSTER_SHIFT == destination >> X2APIC_CLUSTER_SHIFT
        && logical_id & destination & X2APIC_CLUSTER_MEMBER_MASK != 0
}

fn matches_xapic_logical(target: &ApicTarget, destination: u32) -> bool {
    let logical_id = target.logical_id & XAPIC_LOGICAL_ID_MASK;
    if target.dfr_flat {
        logical_id & destination != 0
    } else {
        logical_id >> XAPIC_CLUSTER_SHIFT == destination >> XAPIC_CLUSTER_SHIFT
            && logical_id & destination & XAPIC_CLUSTER_MEMBER_MASK != 0
    }
}

/// Whether `target` takes a message of `delivery_mode` at all, given its
/// enable state: hardware-disabled APICs take nothing (SDM Vol. 3A 11.4.3),
/// software-disabled ones only NMI, INIT, start-up and SMI (SDM Vol. 3A
/// 11.4.7.2), and nobody takes the reserved mode.
#[inline]
pub fn accepts(delivery_mode: DeliveryMode, target: &ApicTarget) -> bool {
    Acceptance::of(delivery_mode).accepts(target)
}

/// What a delivery mode asks of a target's enable state.
#[derive(Clone, Copy)]
enum Acceptance {
    /// Hardware enabled is enough (NMI, INIT, start-up, SMI).
    HardwareEnabled,
    /// Hardware and software enabled (fixed, lowest priority, ExtINT).
    SoftwareEnabled,
    /// Nobody (the reserved mode).
    Nobody,
}

impl Acceptance {
    #[inline]
    const fn of(delivery_mode: DeliveryMode) -> Self {
        match delivery_mode {
            DeliveryMode::Nmi | DeliveryMode::Init | DeliveryMode::StartUp | DeliveryMode::Smi => {
                Self::HardwareEnabled
            }
            DeliveryMode::Fixed | DeliveryMode::LowestPriority | DeliveryMode::ExtInt => {
                Self::SoftwareEnabled
            }
            DeliveryMode::Reserved => Self::Nobody,
        }
    }

    #[inline]
    const fn accepts(self, target: &ApicTarget) -> bool {
        match self {
            Self::HardwareEnabled => target.hw_enabled,
            Self::SoftwareEnabled => target.hw_enabled && target.sw_enabled,
            Self::Nobody => false,
        }
    }
}

/// Every vCPU index whose APIC receives `message` (destination match and
/// acceptance, see the [module documentation](self)), before
/// lowest-priority arbitration. Targets past [`MAX_APICS`] are ignored.
#[inline]
pub fn resolve(message: &Message, targets: &[ApicTarget], source: Option<usize>) -> ApicSet {
    let mut set = ApicSet::new();
    let acceptance = Acceptance::of(message.delivery_mode);
    if matches!(acceptance, Acceptance::Nobody) {
        return set;
    }
    let selector = Selector::new(message, source);
    for (index, target) in targets.iter().enumerate().take(MAX_APICS) {
        if acceptance.accepts(target) && selector.selects(target, index) {
            set.insert(index);
        }
    }
    set
}

/// Whether `message` is a lowest-priority message that the bus narrows to
/// one APIC (everything but KVM's physical-broadcast exception).
fn is_arbitrated(message: &Message) -> bool {
    message.delivery_mode == DeliveryMode::LowestPriority
        && !(message.shorthand == Shorthand::None
            && message.destination_mode == DestinationMode::Physical
            && message.destination == XAPIC_BROADCAST)
}

/// Lowest-priority arbitration state: a rotating cursor over vCPU indices
/// that breaks ties fairly (rule in the [module documentation](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Arbiter {
    cursor: u8,
}

/// The saved state of an [`Arbiter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArbiterState {
    /// The first index that wins a tie.
    pub cursor: u8,
}

impl Arbiter {
    /// An arbiter whose cursor is at index 0.
    pub const fn new() -> Self {
        Self { cursor: 0 }
    }

    /// The index that wins the next tie if it takes part.
    pub const fn cursor(&self) -> u8 {
        self.cursor
    }

    /// Picks, among `candidates` that accept fixed interrupts, the one with
    /// the lowest arbitration priority; ties go to the first index at or
    /// after the cursor, which then moves past the winner. Candidates with
    /// no entry in `targets` are skipped. `None` (cursor unmoved) if no
    /// candidate qualifies.
    pub fn select(&mut self, candidates: &ApicSet, targets: &[ApicTarget]) -> Option<usize> {
        let mut best = None;
        for index in candidates {
            let Some(target) = targets.get(index) else {
                break;
            };
            if accepts(DeliveryMode::Fixed, target) {
                best = self.better(best, index, target);
            }
        }
        self.award(best)
    }

    /// The arbitration key of `target` at `index`: priority first, then the
    /// distance from the cursor. `index < MAX_APICS == 256` fits in a u8.
    fn key(&self, index: usize, target: &ApicTarget) -> u16 {
        u16::from(target.arbitration_priority) << 8
            | u16::from((index as u8).wrapping_sub(self.cursor))
    }

    /// The better of the best so far and `target` at `index`.
    #[inline]
    fn better(
        &self,
        best: Option<(u16, usize)>,
        index: usize,
        target: &ApicTarget,
    ) -> Option<(u16, usize)> {
        let key = self.key(index, target);
        match best {
            Some((best_key, _)) if best_key <= key => best,
            _ => Some((key, index)),
        }
    }

    /// Moves the cursor past the winner, if any.
    fn award(&mut self, best: Option<(u16, usize)>) -> Option<usize> {
        let (_, winner) = best?;
        self.cursor = (winner as u8).wrapping_add(1);
        Some(winner)
    }

    /// Resolves `message` ([`resolve`]) and, for a lowest-priority message,
    /// narrows the set to the arbitration winner ([`Arbiter::select`]).
    #[inline]
    pub fn route(
        &mut self,
        message: &Message,
        targets: &[ApicTarget],
        source: Option<usize>,
    ) -> ApicSet {
        if !is_arbitrated(message) {
            return resolve(message, targets, source);
        }
        // One pass: the same result as `select(&resolve(..))`, without the
        // intermediate set.
        let mut best = None;
        let selector = Selector::new(message, source);
        for (index, target) in targets.iter().enumerate().take(MAX_APICS) {
            if target.hw_enabled && target.sw_enabled && selector.selects(target, index) {
                best = self.better(best, index, target);
            }
        }
        match self.award(best) {
            Some(winner) => ApicSet::single(winner),
            None => ApicSet::new(),
        }
    }

    /// The arbiter's state.
    pub fn save(&self) -> ArbiterState {
        let Self { cursor } = *self;
        ArbiterState { cursor }
    }

    /// An arbiter in the saved state (every state is valid).
    pub fn restore(state: &ArbiterState) -> Self {
        let ArbiterState { cursor } = *state;
        Self { cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xapic(apic_id: u32) -> ApicTarget {
        ApicTarget {
            apic_id,
            x2apic: false,
            logical_id: 0,
            dfr_flat: true,
            hw_enabled: true,
            sw_enabled: true,
            arbitration_priority: 0,
        }
    }

    fn x2apic(apic_id: u32) -> ApicTarget {
        ApicTarget {
            x2apic: true,
            // The x2APIC LDR is derived from the ID (SDM Vol. 3A 11.12.10.2).
            logical_id: ((apic_id >> 4) << 16) | (1 << (apic_id & 0xf)),
            ..xapic(apic_id)
        }
    }

    fn logical(destination: u32) -> Message {
        Message {
            destination_mode: DestinationMode::Logical,
            ..Message::fixed_physical(destination, 0x40)
        }
    }

    fn with_mode(message: Message, delivery_mode: DeliveryMode) -> Message {
        Message {
            delivery_mode,
            ..message
        }
    }

    fn with_shorthand(shorthand: Shorthand) -> Message {
        Message {
            shorthand,
            ..Message::fixed_physical(0, 0x40)
        }
    }

    fn set(indices: &[usize]) -> ApicSet {
        indices.iter().copied().collect()
    }

    #[test]
    fn apic_set_insert_past_max_is_refused() {
        let mut s = ApicSet::new();

        let inserted = s.insert(MAX_APICS);

        assert!(!inserted);
        assert!(s.is_empty());
    }

    #[test]
    fn apic_set_iter_yields_indices_in_increasing_order() {
        let s = set(&[255, 3, 64, 0, 127]);

        let indices: Vec<usize> = s.iter().collect();

        assert_eq!(indices, vec![0, 3, 64, 127, 255]);
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn physical_xapic_id_reaches_only_that_apic() {
        let targets = [xapic(0), xapic(1), xapic(2)];

        let got = resolve(&Message::fixed_physical(1, 0x40), &targets, None);

        assert_eq!(got, set(&[1]));
    }

    #[test]
    fn physical_xapic_broadcast_reaches_every_xapic() {
        let targets = [xapic(0), xapic(1), xapic(2)];

        let got = resolve(&Message::fixed_physical(0xff, 0x40), &targets, None);

        assert_eq!(got, set(&[0, 1, 2]));
    }

    #[test]
    fn physical_x2apic_32bit_id_reaches_that_apic() {
        let targets = [x2apic(0), x2apic(0x1_0002)];

        let got = resolve(&Message::fixed_physical(0x1_0002, 0x40), &targets, None);

        assert_eq!(got, set(&[1]));
    }

    #[test]
    fn physical_x2apic_broadcast_reaches_every_x2apic() {
        let targets = [x2apic(0), x2apic(7), x2apic(0x300)];

        let got = resolve(
            &Message::fixed_physical(X2APIC_BROADCAST, 0x40),
            &targets,
            None,
        );

        assert_eq!(got, set(&[0, 1, 2]));
    }

    #[test]
    fn physical_0xff_without_sender_broadcasts_to_x2apic_targets() {
        let targets = [x2apic(0), x2apic(1), xapic(2)];

        let got = resolve(&Message::fixed_physical(0xff, 0x40), &targets, None);

        assert_eq!(got, set(&[0, 1, 2]));
    }

    #[test]
    fn physical_0xff_ipi_reaches_only_x2apic_id_0xff() {
        let targets = [x2apic(0), x2apic(0xff)];

        let got = resolve(&Message::fixed_physical(0xff, 0x40), &targets, Some(0));

        assert_eq!(got, set(&[1]));
    }

    #[test]
    fn physical_destination_above_0xff_misses_xapic_with_same_low_byte() {
        let targets = [xapic(0x05)];

        let got = resolve(&Message::fixed_physical(0x105, 0x40), &targets, None);

        assert!(got.is_empty());
    }

    #[test]
    fn logical_flat_reaches_apics_sharing_a_bit() {
        let targets: Vec<ApicTarget> = (0..4)
            .map(|i| ApicTarget {
                logical_id: 1 << i,
                ..xapic(i)
            })
            .collect();

        let got = resolve(&logical(0b0101), &targets, None);

        assert_eq!(got, set(&[0, 2]));
    }

    #[test]
    fn logical_xapic_cluster_reaches_members_of_the_cluster() {
        let targets = [
            ApicTarget {
                logical_id: 0x21,
                dfr_flat: false,
                ..xapic(0)
            },
            ApicTarget {
                logical_id: 0x22,
                dfr_flat: false,
                ..xapic(1)
            },
            ApicTarget {
                logical_id: 0x31,
                dfr_flat: false,
                ..xapic(2)
            },
        ];

        let got = resolve(&logical(0x23), &targets, None);

        assert_eq!(got, set(&[0, 1]));
    }

    #[test]
    fn logical_xapic_cluster_0xff_broadcasts() {
        let targets = [
            ApicTarget {
                logical_id: 0x21,
                dfr_flat: false,
                ..xapic(0)
            },
            ApicTarget {
                logical_id: 0x31,
                dfr_flat: false,
                ..xapic(1)
            },
        ];

        let got = resolve(&logical(0xff), &targets, None);

        assert_eq!(got, set(&[0, 1]));
    }

    #[test]
    fn logical_x2apic_cluster_reaches_members_of_that_cluster_only() {
        // IDs 0x10 and 0x11 are cluster 1 members 0 and 1; ID 0x01 is cluster 0.
        let targets = [x2apic(0x10), x2apic(0x11), x2apic(0x01)];

        let got = resolve(&logical(0x0001_0003), &targets, None);

        assert_eq!(got, set(&[0, 1]));
    }

    #[test]
    fn logical_8bit_destination_reaches_x2apic_cluster_zero_members() {
        // As KVM: mda = 0x06, cluster 0, members 1 and 2.
        let targets = [x2apic(0), x2apic(1), x2apic(2), x2apic(0x11)];

        let got = resolve(&logical(0x06), &targets, None);

        assert_eq!(got, set(&[1, 2]));
    }

    #[test]
    fn logical_0xff_without_sender_broadcasts_to_x2apic_targets() {
        let targets = [x2apic(0x20), x2apic(0x31)];

        let got = resolve(&logical(0xff), &targets, None);

        assert_eq!(got, set(&[0, 1]));
    }

    #[test]
    fn shorthand_self_reaches_only_the_sender() {
        let targets = [xapic(0), xapic(1), xapic(2)];

        let got = resolve(&with_shorthand(Shorthand::SelfOnly), &targets, Some(2));

        assert_eq!(got, set(&[2]));
    }

    #[test]
    fn shorthand_self_without_sender_reaches_nobody() {
        let targets = [xapic(0), xapic(1)];

        let got = resolve(&with_shorthand(Shorthand::SelfOnly), &targets, None);

        assert!(got.is_empty());
    }

    #[test]
    fn shorthand_all_including_self_reaches_everyone() {
        let targets = [xapic(0), x2apic(1), xapic(2)];

        let got = resolve(
            &with_shorthand(Shorthand::AllIncludingSelf),
            &targets,
            Some(1),
        );

        assert_eq!(got, set(&[0, 1, 2]));
    }

    #[test]
    fn shorthand_all_excluding_self_skips_the_sender() {
        let targets = [xapic(0), xapic(1), xapic(2)];

        let got = resolve(
            &with_shorthand(Shorthand::AllExcludingSelf),
            &targets,
            Some(1),
        );

        assert_eq!(got, set(&[0, 2]));
    }

    #[test]
    fn hw_disabled_apic_receives_not_even_nmi() {
        let targets = [ApicTarget {
            hw_enabled: false,
            ..xapic(0)
        }];
        let nmi = with_mode(Message::fixed_physical(0, 0), DeliveryMode::Nmi);

        let got = resolve(&nmi, &targets, None);

        assert!(got.is_empty());
    }

    #[test]
    fn sw_disabled_apic_receives_only_nmi_init_sipi_smi() {
        let target = ApicTarget {
            sw_enabled: false,
            ..xapic(0)
        };

        let taken: Vec<DeliveryMode> = (0..8)
            .map(DeliveryMode::from_bits)
            .filter(|&mode| accepts(mode, &target))
            .collect();

        assert_eq!(
            taken,
            vec![
                DeliveryMode::Smi,
                DeliveryMode::Nmi,
                DeliveryMode::Init,
                DeliveryMode::StartUp
            ]
        );
    }

    #[test]
    fn reserved_delivery_mode_reaches_nobody() {
        let targets = [xapic(0), xapic(1)];
        let message = with_mode(Message::fixed_physical(0xff, 0x40), DeliveryMode::Reserved);

        let got = resolve(&message, &targets, None);

        assert!(got.is_empty());
    }

    #[test]
    fn resolve_ignores_targets_past_max_apics() {
        let targets = vec![xapic(0); MAX_APICS + 4];

        let got = resolve(&with_shorthand(Shorthand::AllIncludingSelf), &targets, None);

        assert_eq!(got.len(), MAX_APICS);
    }

    fn priorities(priorities: &[u8]) -> Vec<ApicTarget> {
        priorities
            .iter()
            .enumerate()
            .map(|(i, &p)| ApicTarget {
                arbitration_priority: p,
                ..xapic(i as u32)
            })
            .collect()
    }

    fn lowest_to_all() -> Message {
        with_mode(logical(0xff), DeliveryMode::LowestPriority)
    }

    #[test]
    fn lowest_priority_picks_the_lowest_arbitration_priority() {
        let targets = priorities(&[0x40, 0x20, 0x30]);
        let mut arbiter = Arbiter::new();

        let got = arbiter.route(&lowest_to_all(), &targets, None);

        assert_eq!(got, set(&[1]));
    }

    #[test]
    fn lowest_priority_ties_rotate_through_the_tied_apics() {
        let targets = priorities(&[0x10, 0x50, 0x10, 0x10]);
        let mut arbiter = Arbiter::new();

        let winners: Vec<Option<usize>> = (0..4)
            .map(|_| arbiter.route(&lowest_to_all(), &targets, None).first())
            .collect();

        assert_eq!(winners, vec![Some(0), Some(2), Some(3), Some(0)]);
    }

    #[test]
    fn lowest_priority_skips_software_disabled_apics() {
        let mut targets = priorities(&[0x00, 0x70]);
        targets[0].sw_enabled = false;
        let mut arbiter = Arbiter::new();

        let got = arbiter.route(&lowest_to_all(), &targets, None);

        assert_eq!(got, set(&[1]));
    }

    #[test]
    fn lowest_priority_without_candidates_leaves_the_cursor() {
        let targets = priorities(&[0x10]);
        let mut arbiter = Arbiter::new();
        let message = with_mode(
            Message::fixed_physical(5, 0x40),
            DeliveryMode::LowestPriority,
        );

        let got = arbiter.route(&message, &targets, None);

        assert!(got.is_empty());
        assert_eq!(arbiter.cursor(), 0);
    }

    #[test]
    fn lowest_priority_to_physical_broadcast_reaches_everyone() {
        let targets = priorities(&[0x10, 0x20, 0x30]);
        let mut arbiter = Arbiter::new();
        let message = with_mode(
            Message::fixed_physical(0xff, 0x40),
            DeliveryMode::LowestPriority,
        );

        let got = arbiter.route(&message, &targets, None);

        assert_eq!(got, set(&[0, 1, 2]));
    }

    #[test]
    fn arbiter_restore_of_save_continues_the_same_rotation() {
        let targets = priorities(&[0x10; 5]);
        let mut original = Arbiter::new();
        original.route(&lowest_to_all(), &targets, None);
        original.route(&lowest_to_all(), &targets, None);

        let json = serde_json::to_string(&original.save()).unwrap();
        let state: ArbiterState = serde_json::from_str(&json).unwrap();
        let mut restored = Arbiter::restore(&state);

        for _ in 0..7 {
            assert_eq!(
                restored.route(&lowest_to_all(), &targets, None),
                original.route(&lowest_to_all(), &targets, None)
            );
        }
    }

    #[test]
    fn route_of_lowest_priority_equals_select_of_resolve() {
        let mut targets = priorities(&[0x30, 0x10, 0x20, 0x10, 0x10, 0x10]);
        targets[3].sw_enabled = false;
        targets[4].hw_enabled = false;
        let mut by_route = Arbiter::new();
        let mut by_select = Arbiter::new();

        for _ in 0..5 {
            let routed = by_route.route(&lowest_to_all(), &targets, None).first();
            let resolved = resolve(&lowest_to_all(), &targets, None);
            let selected = by_select.select(&resolved, &targets);
            assert_eq!(routed, selected);
        }
    }

    #[test]
    fn arbiter_cursor_wraps_from_index_255_to_0() {
        let targets = vec![xapic(0); MAX_APICS];
        let mut arbiter = Arbiter::restore(&ArbiterState { cursor: 255 });

        let first = arbiter.select(&set(&[0, 255]), &targets);
        let second = arbiter.select(&set(&[0, 255]), &targets);

        assert_eq!((first, second), (Some(255), Some(0)));
    }
}
