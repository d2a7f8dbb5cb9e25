//! Message-signaled interrupts (MSI and MSI-X) of a device, as the PnP
//! manager assigns them, and how the host routes each message.
//!
//! A device's message resource ([`MessageResource`]) has a kind, a count,
//! the IRQL class its vectors are in, an affinity and an `IRQ_DEVICE_POLICY`.
//! Its vectors are assigned when the device table is built (the PnP step):
//! `count` consecutive vectors of the class, aligned to the next power of
//! two (MSI requires it: a device ORs the message number into the data's
//! low bits), from the top of the class down, never a vector another
//! resource uses, so messages are never shared (`docs/semantics.md` rule
//! M8).
//!
//! At CONNECT_EX each message gets its processors from the policy
//! ([`MessageResource::targets`], rule M7), its route from the APIC
//! destination of that set ([`MessageRoute::for_targets`]), and the host
//! hands the VMM one [`MessageUpdate`] per message to program into the
//! device.

use irqchip::msi::{self, MsiFormat};
use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN};
use irqconnect_abi::pv::{MAX_MESSAGES, irq_policy, message_kind};
use serde::{Deserialize, Serialize};

use crate::destination::Choice;

/// MSI or MSI-X.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// One address for every message; data = base data + message number.
    Msi,
    /// An address, data and mask bit per message.
    Msix,
}

impl MessageKind {
    /// The ABI value ([`message_kind`]).
    pub const fn to_abi(self) -> u8 {
        match self {
            Self::Msi => message_kind::MSI,
            Self::Msix => message_kind::MSIX,
        }
    }
}

/// `IRQ_DEVICE_POLICY`: how the messages are spread over processors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IrqPolicy {
    /// No particular assignment.
    MachineDefault,
    /// Processors close to the device (every processor: no NUMA here).
    AllCloseProcessors,
    /// One processor close to the device.
    OneCloseProcessor,
    /// Every processor of the machine.
    AllProcessorsInMachine,
    /// The resource's affinity.
    SpecifiedProcessors,
    /// Different messages to different processors, where possible.
    SpreadMessagesAcrossAllProcessors,
}

impl IrqPolicy {
    /// The ABI value ([`irq_policy`]).
    pub const fn to_abi(self) -> u8 {
        match self {
            Self::MachineDefault => irq_policy::MACHINE_DEFAULT,
            Self::AllCloseProcessors => irq_policy::ALL_CLOSE_PROCESSORS,
            Self::OneCloseProcessor => irq_policy::ONE_CLOSE_PROCESSOR,
            Self::AllProcessorsInMachine => irq_policy::ALL_PROCESSORS_IN_MACHINE,
            Self::SpecifiedProcessors => irq_policy::SPECIFIED_PROCESSORS,
            Self::SpreadMessagesAcrossAllProcessors => {
                irq_policy::SPREAD_MESSAGES_ACROSS_ALL_PROCESSORS
            }
        }
    }
}

/// A device's message-signaled interrupts, with their vectors assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageResource {
    /// MSI or MSI-X.
    pub kind: MessageKind,
    /// Messages, 1..=[`MAX_MESSAGES`].
    pub count: u8,
    /// The vector of message 0; message `k` has `first_vector + k`.
    pub first_vector: u8,
    /// The spreading policy.
    pub policy: IrqPolicy,
    /// Processors the device may interrupt (of `group`).
    pub affinity: u64,
    /// The processor group of `affinity`.
    pub group: u16,
    /// The message-signaled test device that raises these messages
    /// (`irqconnect_abi::msidev`), if the platform has one for the device.
    pub test_device: Option<u8>,
}

impl MessageResource {
    /// The vector of message `k`, if the device has it.
    pub fn vector(&self, k: u8) -> Option<u8> {
        (k < self.count).then(|| self.first_vector.wrapping_add(k))
    }

    /// The IRQL class of every message (`vector >> 4`).
    pub const fn irql(&self) -> u8 {
        self.first_vector >> 4
    }

    /// Whether `vector` is one of the device's messages.
    pub fn owns_vector(&self, vector: u8) -> bool {
        vector
            .checked_sub(self.first_vector)
            .is_some_and(|k| k < self.count)
    }

    /// The processors message `k` goes to, within `allowed` (the resource's
    /// affinity, the online processors and the guest's restriction; not
    /// empty), by the policy (`docs/semantics.md` rule M7). MSI has one
    /// address for every message, so every message gets message 0's set.
    pub fn targets(&self, k: u8, allowed: u64) -> u64 {
        let k = match self.kind {
            MessageKind::Msi => 0,
            MessageKind::Msix => k,
        };
        match self.policy {
            IrqPolicy::MachineDefault
            | IrqPolicy::AllCloseProcessors
            | IrqPolicy::AllProcessorsInMachine
            | IrqPolicy::SpecifiedProcessors => allowed,
            IrqPolicy::OneCloseProcessor => nth_processor(allowed, 0),
            IrqPolicy::SpreadMessagesAcrossAllProcessors => {
                let n = allowed.count_ones();
                nth_processor(allowed, u32::from(k).checked_rem(n).unwrap_or(0))
            }
        }
    }
}

/// The set holding the `n`-th lowest processor of `set` (empty if there is
/// none).
fn nth_processor(set: u64, n: u32) -> u64 {
    let mut rest = set;
    for _ in 0..n {
        rest &= rest.wrapping_sub(1);
    }
    rest & rest.wrapping_neg()
}

/// Where one message goes: what the host programs into the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRoute {
    /// The MSI address (0xFEE..., SDM Vol. 3A 11.11.1), destination bits
    /// above 7 in the platform's format (`Platform::msi_format`).
    pub address: u64,
    /// The MSI data: the vector, fixed or lowest-priority, edge.
    pub data: u32,
    /// The processors the message reaches: exactly where the route
    /// delivers (of `group`).
    pub targets: u64,
    /// The processor group of `targets`.
    #[serde(default)]
    pub group: u16,
}

impl MessageRoute {
    /// The route of `vector` to the destination `choice` (from
    /// [`crate::destination::Topology::choose`]), encoded as an MSI in
    /// `format`. `None` when the choice has no destination, spans groups,
    /// or its destination does not fit the format.
    pub fn for_choice(vector: u8, choice: &Choice, format: MsiFormat) -> Option<Self> {
        let (group, targets) = choice.reach.as_group_affinity()?;
        let message = choice.destination.edge_message(vector)?;
        let msi = msi::for_message(&message, format).ok()?;
        Some(Self {
            address: msi.address,
            data: msi.data,
            targets,
            group,
        })
    }
}

/// A message whose programming changed: the VMM writes it into the
/// device's message-signaled test device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageUpdate {
    /// The device.
    pub device: u32,
    /// Its message-signaled test device.
    pub test_device: u8,
    /// The message number.
    pub message: u8,
    /// Its route, or `None`: unprogrammed (the device sends nothing).
    pub route: Option<MessageRoute>,
}

/// A message resource in a device table configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageConfig {
    /// MSI or MSI-X.
    pub kind: MessageKind,
    /// Messages: 1..=64; for MSI a power of two up to 32.
    pub count: u8,
    /// The IRQL class of the vectors, 3..=11 (the device vector range).
    pub irql: u8,
    /// The spreading policy.
    pub policy: IrqPolicy,
    /// Affinity; all online processors of `group` when absent.
    #[serde(default)]
    pub affinity: Option<u64>,
    /// The processor group of `affinity`; 0 when absent.
    #[serde(default)]
    pub group: u16,
}

/// Why a message configuration cannot be assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageConfigError {
    /// The count is 0, above [`MAX_MESSAGES`], or (MSI) not a power of two
    /// up to 32.
    BadCount,
    /// The class is outside the device vector range.
    BadClass,
    /// No free block of `count` aligned vectors is left in the class.
    ClassFull,
}

/// The first vector of the highest free block of `count` vectors of class
/// `irql`, aligned to `count`'s next power of two, where `used` marks
/// vectors already assigned. Marks the block used.
pub fn assign_vectors(
    config: &MessageConfig,
    used: &mut [bool; 256],
) -> Result<u8, MessageConfigError> {
    let count = usize::from(config.count);
    let msi_ok = config.kind != MessageKind::Msi || (count.is_power_of_two() && count <= 32);
    if count == 0 || count > MAX_MESSAGES || !msi_ok {
        return Err(MessageConfigError::BadCount);
    }
    let low = usize::from(config.irql) << 4;
    let high = low + 15;
    if low < usize::from(DEVICE_VECTOR_MIN) || high > usize::from(DEVICE_VECTOR_MAX) {
        return Err(MessageConfigError::BadClass);
    }
    let align = count.next_power_of_two();
    let mut start = (high + 1).saturating_sub(align) / align * align;
    loop {
        if start < low {
            return Err(MessageConfigError::ClassFull);
        }
        let block = start..start + count;
        if block.end <= high + 1
            && used
                .get(block.clone())
                .is_some_and(|b| b.iter().all(|u| !u))
        {
            if let Some(b) = used.get_mut(block) {
                b.fill(true);
            }
            return u8::try_from(start).map_err(|_| MessageConfigError::BadClass);
        }
        match start.checked_sub(align) {
            Some(next) => start = next,
            None => return Err(MessageConfigError::ClassFull),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::{ApicModel, Topology};
    use crate::platform::{Platform, PlatformFacts};
    use crate::processors::ProcessorSet;

    fn route(vector: u8, wanted: u64, platform: &Platform) -> Option<MessageRoute> {
        let t = Topology::new(platform, ApicModel::Undeclared);
        let choice = t.choose(ProcessorSet::of_group(0, wanted), ProcessorSet::EMPTY)?;
        MessageRoute::for_choice(vector, &choice, platform.msi_format())
    }

    fn resource(kind: MessageKind, count: u8, policy: IrqPolicy) -> MessageResource {
        MessageResource {
            kind,
            count,
            first_vector: 0x48,
            policy,
            affinity: 0b1111,
            group: 0,
            test_device: Some(0),
        }
    }

    #[test]
    fn unit_policy_all_kinds_give_the_whole_allowed_set() {
        for policy in [
            IrqPolicy::MachineDefault,
            IrqPolicy::AllCloseProcessors,
            IrqPolicy::AllProcessorsInMachine,
            IrqPolicy::SpecifiedProcessors,
        ] {
            let r = resource(MessageKind::Msix, 4, policy);
            assert!((0..4).all(|k| r.targets(k, 0b0110) == 0b0110), "{policy:?}");
        }
    }

    #[test]
    fn unit_policy_one_close_processor_is_the_lowest_allowed() {
        let r = resource(MessageKind::Msix, 3, IrqPolicy::OneCloseProcessor);
        assert!((0..3).all(|k| r.targets(k, 0b1100) == 0b0100));
    }

    #[test]
    fn unit_policy_spread_gives_message_k_the_k_th_processor_round_robin() {
        let r = resource(
            MessageKind::Msix,
            8,
            IrqPolicy::SpreadMessagesAcrossAllProcessors,
        );
        let got: Vec<u64> = (0..8).map(|k| r.targets(k, 0b1011)).collect();
        assert_eq!(got, [1, 2, 8, 1, 2, 8, 1, 2]);
    }

    #[test]
    fn unit_msi_messages_share_message_zero_targets() {
        let r = resource(
            MessageKind::Msi,
            4,
            IrqPolicy::SpreadMessagesAcrossAllProcessors,
        );
        assert!((0..4).all(|k| r.targets(k, 0b1111) == 0b0001));
    }

    #[test]
    fn unit_targets_stay_inside_the_allowed_set_for_every_policy() {
        for policy in [
            IrqPolicy::MachineDefault,
            IrqPolicy::OneCloseProcessor,
            IrqPolicy::SpecifiedProcessors,
            IrqPolicy::SpreadMessagesAcrossAllProcessors,
        ] {
            let r = resource(MessageKind::Msix, 8, policy);
            for allowed in [1u64, 0b1010, 0xf0, u64::MAX] {
                for k in 0..8 {
                    let t = r.targets(k, allowed);
                    assert!(t != 0 && t & !allowed == 0, "{policy:?} {allowed:#x} {k}");
                }
            }
        }
    }

    #[test]
    fn unit_vectors_and_ownership() {
        let r = resource(MessageKind::Msix, 8, IrqPolicy::MachineDefault);
        assert_eq!(
            (r.vector(0), r.vector(7), r.vector(8)),
            (Some(0x48), Some(0x4f), None)
        );
        assert!(r.owns_vector(0x4f) && !r.owns_vector(0x47) && !r.owns_vector(0x50));
        assert_eq!(r.irql(), 4);
    }

    fn config(kind: MessageKind, count: u8, irql: u8) -> MessageConfig {
        MessageConfig {
            kind,
            count,
            irql,
            policy: IrqPolicy::MachineDefault,
            affinity: None,
            group: 0,
        }
    }

    #[test]
    fn unit_assign_vectors_takes_aligned_blocks_from_the_top_of_the_class() {
        let mut used = [false; 256];
        used[0x5f] = true;
        assert_eq!(
            assign_vectors(&config(MessageKind::Msi, 1, 5), &mut used),
            Ok(0x5e)
        );
        assert_eq!(
            assign_vectors(&config(MessageKind::Msi, 4, 5), &mut used),
            Ok(0x58)
        );
        assert_eq!(
            assign_vectors(&config(MessageKind::Msix, 8, 5), &mut used),
            Ok(0x50)
        );
        assert_eq!(
            assign_vectors(&config(MessageKind::Msix, 2, 5), &mut used),
            Ok(0x5c)
        );
        assert_eq!(
            assign_vectors(&config(MessageKind::Msix, 8, 5), &mut used),
            Err(MessageConfigError::ClassFull)
        );
    }

    #[test]
    fn unit_assign_vectors_refuses_bad_counts_and_classes() {
        let mut used = [false; 256];
        for (kind, count) in [
            (MessageKind::Msi, 3),
            (MessageKind::Msi, 64),
            (MessageKind::Msix, 0),
        ] {
            assert_eq!(
                assign_vectors(&config(kind, count, 5), &mut used),
                Err(MessageConfigError::BadCount)
            );
        }
        assert_eq!(
            assign_vectors(&config(MessageKind::Msix, 65, 5), &mut used),
            Err(MessageConfigError::BadCount)
        );
        for class in [2, 12, 15] {
            assert_eq!(
                assign_vectors(&config(MessageKind::Msix, 1, class), &mut used),
                Err(MessageConfigError::BadClass)
            );
        }
        assert!(used.iter().all(|u| !u), "nothing assigned on failure");
    }

    #[test]
    fn unit_route_of_one_processor_is_fixed_logical_and_of_several_lowest_priority() {
        let platform = Platform::new(PlatformFacts::uniform(4)).unwrap();

        let one = route(0x48, 0b0100, &platform).unwrap();
        let several = route(0x49, 0b0110, &platform).unwrap();

        assert_eq!(
            (one.address, one.data, one.targets),
            (0xfee0_4004, 0x4048, 0b0100)
        );
        assert_eq!(
            (several.address, several.data, several.targets),
            (0xfee0_600c, 0x4149, 0b0110)
        );
    }

    #[test]
    fn unit_route_above_processor_7_is_physical_to_the_lowest() {
        let platform = Platform::new(PlatformFacts::uniform(12)).unwrap();

        let r = route(0x48, (1 << 9) | (1 << 10), &platform).unwrap();

        assert_eq!((r.address, r.targets), (0xfee0_9000, 1 << 9));
        assert_eq!(r.data & 0x700, 0, "fixed delivery");
    }
}
