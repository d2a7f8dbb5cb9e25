//! The destination chooser: which APIC destination a set of processors
//! gets, and which processors that destination reaches
//! (`docs/semantics.md`, "Destinations").
//!
//! One IOAPIC entry or MSI carries one destination. Which sets of
//! processors one destination can name depends on how the guest's local
//! APICs decode logical destinations (the [`ApicModel`] it declared) and on
//! how many destination bits a route carries (8, or 15 with the extended
//! destination ID, [`crate::Platform::destination_bits`]):
//!
//! | model | one logical destination names | destination ID |
//! |---|---|---|
//! | x2APIC | any processors whose x2APIC ID is below the destination width (IDs 0..7 with 8 bits, 0..14 with 15): cluster 0, member bits = IDs | `OR 1 << id` |
//! | xAPIC flat | any of processors 0..7 | `OR 1 << index` |
//! | xAPIC cluster | any processors of one cluster of four, `4c..4c+3`, `c` in 0..14 | `c << 4 OR 1 << (index % 4)` |
//! | undeclared | any of processors 0..7 whose APIC ID is their index when x2APIC is offered (the x2APIC and the xAPIC flat readings then agree; a destination whose bits happen to reach the same processors under both readings of differing LDRs is not sought) | `OR 1 << index` |
//! | physical | nothing | - |
//!
//! An x2APIC destination of cluster 1 or above needs bits 16..31, which no
//! IOAPIC entry or MSI address carries without interrupt remapping; such
//! processors are reached one at a time, physically. A physical destination
//! names one processor whose APIC ID fits the width.
//!
//! The destination 0xFF is the broadcast in every mode and model (SDM
//! Vol. 3A 11.6.2.1; for IOAPIC and MSI messages to x2APIC targets, KVM's
//! `kvm_apic_mda` broadcast quirk, which our `apic_bus` reproduces). The
//! chooser never picks it for itself: it is a route's destination only
//! where it is the encoding of a domain's processors that are every
//! processor of the platform (the xAPIC flat or x2APIC cluster 0 form of a
//! platform of at most 8). Elsewhere the broadcast would hand a vector to
//! every processor whatever its connections asked, and a mask of every
//! processor of a 64-processor VM would take the default quota's 64
//! interrupt objects in one connection; a would-be 0xFF of fewer processors
//! drops its highest one.
//!
//! An xAPIC destination is 8 bits even where routes carry 15. KVM matches a
//! wider logical destination's low 8 bits against a flat LDR without taking
//! it for the broadcast (`kvm_apic_match_logical_addr` compares the whole
//! value with 0xFF), so 0x1FF would name processors 0..7 on a larger
//! platform; the extended destination ID is defined for x2APIC IDs above
//! 255, and the chooser does not lean on that reading for xAPIC guests.
//!
//! [`Topology::choose`] picks, among every destination whose processors lie
//! in the wanted set (and, for a shared vector, contain the processors the
//! vector's other connections already hold), the one reaching the most
//! processors. Ties: the set whose lowest processor is lowest, then a
//! logical destination over a physical one. A destination never spans two
//! processor groups.

use irqchip::apic_bus::{
    DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode, XAPIC_BROADCAST,
};
use irqconnect_abi::pv::apic_model;
use serde::{Deserialize, Serialize};

use crate::platform::Platform;
use crate::processors::ProcessorSet;

/// How the guest's local APICs decode logical destinations
/// (`irqconnect_abi::pv::apic_model`), as the guest declared it with
/// SET_APIC_MODEL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApicModel {
    /// Nothing declared (see the module documentation).
    #[default]
    Undeclared,
    /// x2APIC mode on every processor.
    X2apic,
    /// xAPIC flat model, LDR = 1 << index for processors 0..7.
    XapicFlat,
    /// xAPIC cluster model, LDR = (index / 4) << 4 | 1 << (index % 4) for
    /// processors 0..59.
    XapicCluster,
    /// No logical destinations.
    Physical,
}

/// Clusters of the xAPIC cluster model: 0..14 (cluster 15 is the
/// broadcast, SDM Vol. 3A 11.6.2.2).
const XAPIC_CLUSTERS: u32 = 15;
/// Processors in an xAPIC cluster.
const XAPIC_CLUSTER_SIZE: u32 = 4;
/// Processors the xAPIC flat model names (one LDR bit each).
const XAPIC_FLAT_PROCESSORS: u32 = 8;

impl ApicModel {
    /// The model of an ABI value, `None` for an undefined one.
    pub const fn from_abi(value: u8) -> Option<Self> {
        match value {
            apic_model::UNDECLARED => Some(Self::Undeclared),
            apic_model::X2APIC => Some(Self::X2apic),
            apic_model::XAPIC_FLAT => Some(Self::XapicFlat),
            apic_model::XAPIC_CLUSTER => Some(Self::XapicCluster),
            apic_model::PHYSICAL => Some(Self::Physical),
            _ => None,
        }
    }

    /// The ABI value.
    pub const fn to_abi(self) -> u8 {
        match self {
            Self::Undeclared => apic_model::UNDECLARED,
            Self::X2apic => apic_model::X2APIC,
            Self::XapicFlat => apic_model::XAPIC_FLAT,
            Self::XapicCluster => apic_model::XAPIC_CLUSTER,
            Self::Physical => apic_model::PHYSICAL,
        }
    }
}

/// An APIC destination as a route programs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ApicDestination {
    /// A logical destination (destination mode 1), lowest-priority
    /// delivery when `lowest_priority`, fixed otherwise.
    Logical {
        /// The destination ID (8 or 15 bits).
        destination: u32,
        /// Deliver lowest-priority rather than fixed.
        lowest_priority: bool,
    },
    /// A physical destination, fixed delivery.
    Physical {
        /// The APIC ID.
        apic_id: u32,
    },
    /// No destination: nothing is programmed (the route is masked).
    #[default]
    None,
}

impl ApicDestination {
    /// The edge-triggered bus message of `vector` to this destination (an
    /// MSI's, or what a pin routed here sends): logical or physical, lowest
    /// priority or fixed as the destination says. `None` for
    /// [`ApicDestination::None`].
    pub fn edge_message(&self, vector: u8) -> Option<Message> {
        let (destination, destination_mode, delivery_mode) = match *self {
            Self::Logical {
                destination,
                lowest_priority,
            } => (
                destination,
                DestinationMode::Logical,
                if lowest_priority {
                    DeliveryMode::LowestPriority
                } else {
                    DeliveryMode::Fixed
                },
            ),
            Self::Physical { apic_id } => (apic_id, DestinationMode::Physical, DeliveryMode::Fixed),
            Self::None => return None,
        };
        Some(Message {
            destination,
            destination_mode,
            delivery_mode,
            vector,
            trigger_mode: TriggerMode::Edge,
            level: true,
            shorthand: Shorthand::None,
        })
    }

    /// The destination ID, `None` for [`ApicDestination::None`].
    pub fn id(&self) -> Option<u32> {
        match *self {
            Self::Logical { destination, .. } => Some(destination),
            Self::Physical { apic_id } => Some(apic_id),
            Self::None => None,
        }
    }
}

/// A chosen destination and the processors it reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// What to program.
    pub destination: ApicDestination,
    /// Exactly the processors a delivery to it can reach.
    pub reach: ProcessorSet,
}

/// Processors one logical destination can name together.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Domain {
    members: ProcessorSet,
    /// Destination bits every destination of the domain has (the xAPIC
    /// cluster number).
    base: u32,
}

/// What the chooser knows of a platform and the guest's model
/// (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    model: ApicModel,
    present: ProcessorSet,
    /// Processors a physical destination names.
    physical: ProcessorSet,
    domains: Vec<Domain>,
    /// Per processor: its APIC ID.
    apic_ids: Vec<u32>,
    /// Per processor: its bit in a logical destination of its domain.
    logical_bit: Vec<u32>,
    /// [`Topology::broadcast_aliases`], worked out once from the rest.
    aliases: Vec<ProcessorSet>,
}

impl Topology {
    /// The topology of `platform` with the guest's `model`.
    pub fn new(platform: &Platform, model: ApicModel) -> Self {
        let limit = 1u64 << platform.destination_bits();
        let apic_ids = platform.apic_ids().to_vec();
        let count = apic_ids.len() as u32;
        let physical = (0..count)
            .filter(|&i| {
                apic_ids
                    .get(i as usize)
                    .is_some_and(|&id| u64::from(id) < limit && id != XAPIC_BROADCAST)
            })
            .collect();
        let mut logical_bit = vec![0u32; apic_ids.len()];
        let mut domains = Vec::new();
        let mut domain = |members: ProcessorSet, base: u32| {
            for g in 0..platform.group_count() {
                let part = members & ProcessorSet::of_group(g, u64::MAX);
                if !part.is_empty() {
                    domains.push(Domain {
                        members: part,
                        base,
                    });
                }
            }
        };
        let by_index = |i: u32, bits: &mut [u32]| {
            if let Some(b) = bits.get_mut(i as usize) {
                *b = 1 << i;
            }
        };
        match model {
            ApicModel::Physical => {}
            ApicModel::Undeclared | ApicModel::XapicFlat => {
                let agree = |i: u32| {
                    model == ApicModel::XapicFlat
                        || !platform.x2apic()
                        || platform.apic_id(i) == Some(i)
                };
                let members: ProcessorSet = (0..count.min(XAPIC_FLAT_PROCESSORS))
                    .filter(|&i| agree(i))
                    .collect();
                for i in members.iter() {
                    by_index(i, &mut logical_bit);
                }
                domain(members, 0);
            }
            ApicModel::XapicCluster => {
                for c in 0..XAPIC_CLUSTERS {
                    let first = c * XAPIC_CLUSTER_SIZE;
                    let members: ProcessorSet = (first..first + XAPIC_CLUSTER_SIZE)
                        .filter(|&i| i < count)
                        .collect();
                    for i in members.iter() {
                        if let Some(b) = logical_bit.get_mut(i as usize) {
                            *b = 1 << (i % XAPIC_CLUSTER_SIZE);
                        }
                    }
                    domain(members, c << 4);
                }
            }
            ApicModel::X2apic => {
                // Cluster 0 only: a member bit must fit the destination.
                let width = platform.destination_bits();
                let members: ProcessorSet = (0..count)
                    .filter(|&i| platform.apic_id(i).is_some_and(|id| id < width))
                    .collect();
                for i in members.iter() {
                    if let (Some(b), Some(id)) =
                        (logical_bit.get_mut(i as usize), platform.apic_id(i))
                    {
                        *b = 1 << id;
                    }
                }
                domain(members, 0);
            }
        }
        let mut topology = Self {
            model,
            present: platform.present(),
            physical,
            domains,
            apic_ids,
            logical_bit,
            aliases: Vec::new(),
        };
        topology.aliases = topology.find_broadcast_aliases();
        topology
    }

    /// The guest's model this topology follows.
    pub fn model(&self) -> ApicModel {
        self.model
    }

    /// The logical destination of `reach` (processors of `domain`).
    fn encode(&self, domain: &Domain, reach: &ProcessorSet) -> u32 {
        reach.iter().fold(domain.base, |d, p| {
            d | self.logical_bit.get(p as usize).copied().unwrap_or(0)
        })
    }

    /// The sets of processors whose logical destination would be the
    /// broadcast 0xFF although they are not every processor of the
    /// platform: no destination reaches one of them exactly (at most one
    /// per domain; none in the xAPIC cluster and physical models). Rule R
    /// keeps every union of a vector's connections off them
    /// ([`crate::validate::routable`]).
    pub fn broadcast_aliases(&self) -> impl Iterator<Item = ProcessorSet> + '_ {
        self.aliases.iter().copied()
    }

    /// [`Topology::broadcast_aliases`] from the domains, once per topology.
    fn find_broadcast_aliases(&self) -> Vec<ProcessorSet> {
        self.domains
            .iter()
            .filter_map(|d| {
                let set: ProcessorSet = d
                    .members
                    .iter()
                    .filter(|&p| {
                        let bit = self.logical_bit.get(p as usize).copied().unwrap_or(0);
                        (d.base | bit) & !XAPIC_BROADCAST == 0
                    })
                    .collect();
                (self.encode(d, &set) == XAPIC_BROADCAST && set != self.present).then_some(set)
            })
            .collect()
    }

    /// The destination reaching the most processors of `wanted`, together
    /// with all of `fixed` (the processors a shared vector's other
    /// connections hold; empty otherwise), by the rule and tie rule of the
    /// module documentation. Its reach holds all of `fixed` and lies in
    /// `wanted | fixed`. `None` when no destination reaches a processor of
    /// `wanted` together with `fixed`.
    pub fn choose(&self, wanted: ProcessorSet, fixed: ProcessorSet) -> Option<Choice> {
        let wanted = wanted & self.present;
        let pool = wanted | fixed;
        let mut best: Option<(Choice, bool)> = None;
        for d in &self.domains {
            if !fixed.is_subset(&d.members) {
                continue;
            }
            let mut reach = pool & d.members;
            let mut destination = self.encode(d, &reach);
            if destination == XAPIC_BROADCAST && reach != self.present {
                let Some(drop) = (reach - fixed).last() else {
                    continue;
                };
                reach.remove(drop);
                destination = self.encode(d, &reach);
            }
            if (reach & wanted).is_empty() {
                continue;
            }
            let choice = Choice {
                destination: ApicDestination::Logical {
                    destination,
                    lowest_priority: reach.len() > 1,
                },
                reach,
            };
            consider(&mut best, choice, true);
        }
        if fixed.len() <= 1 {
            let one = fixed.first().or_else(|| (wanted & self.physical).first());
            if let Some(p) = one.filter(|&p| self.physical.contains(p) && wanted.contains(p))
                && let Some(&apic_id) = self.apic_ids.get(p as usize)
            {
                let choice = Choice {
                    destination: ApicDestination::Physical { apic_id },
                    reach: ProcessorSet::single(p),
                };
                consider(&mut best, choice, false);
            }
        }
        best.map(|(c, _)| c)
    }

    /// The processors a delivery to `destination` reaches under this
    /// topology: what [`Topology::choose`] promises, for checks.
    pub fn reach(&self, destination: &ApicDestination) -> ProcessorSet {
        match *destination {
            ApicDestination::None => ProcessorSet::EMPTY,
            ApicDestination::Physical { apic_id } => self
                .apic_ids
                .iter()
                .position(|&id| id == apic_id)
                .map_or(ProcessorSet::EMPTY, |i| ProcessorSet::single(i as u32)),
            ApicDestination::Logical { destination, .. } => {
                if destination == XAPIC_BROADCAST {
                    return self.present;
                }
                self.domains
                    .iter()
                    .flat_map(|d| d.members.iter().filter(|&p| self.is_in(d, p, destination)))
                    .collect()
            }
        }
    }

    /// Whether processor `p` of `domain` answers logical `destination`.
    fn is_in(&self, domain: &Domain, p: u32, destination: u32) -> bool {
        let bit = self.logical_bit.get(p as usize).copied().unwrap_or(0);
        let cluster_match = match self.model {
            ApicModel::XapicCluster => destination & !0xf == domain.base,
            _ => true,
        };
        cluster_match && destination & bit != 0
    }
}

/// Keeps the better of `best` and `choice` (logical when `logical`): more
/// processors, then the lowest first processor, then logical.
fn consider(best: &mut Option<(Choice, bool)>, choice: Choice, logical: bool) {
    let better = match best {
        None => true,
        Some((b, b_logical)) => {
            let (n, bn) = (choice.reach.len(), b.reach.len());
            n > bn
                || (n == bn && choice.reach.first() < b.reach.first())
                || (n == bn && choice.reach.first() == b.reach.first() && logical && !*b_logical)
        }
    };
    if better {
        *best = Some((choice, logical));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::{IrqchipMode, PlatformFacts};

    fn platform(cpus: u32, mode: IrqchipMode, x2apic: bool) -> Platform {
        let mut facts = PlatformFacts::uniform(cpus);
        facts.irqchip_mode = mode;
        facts.x2apic = x2apic;
        Platform::new(facts).unwrap()
    }

    fn set(ps: &[u32]) -> ProcessorSet {
        ps.iter().copied().collect()
    }

    fn pick(t: &Topology, wanted: &[u32]) -> Choice {
        t.choose(set(wanted), ProcessorSet::EMPTY).unwrap()
    }

    #[test]
    fn choose_xapic_flat_any_of_processors_0_to_7() {
        let t = Topology::new(
            &platform(16, IrqchipMode::Kernel, false),
            ApicModel::XapicFlat,
        );
        let c = pick(&t, &[1, 3, 9]);
        assert_eq!(c.reach, set(&[1, 3]));
        assert_eq!(
            c.destination,
            ApicDestination::Logical {
                destination: 0b1010,
                lowest_priority: true
            }
        );
    }

    /// Tie rule: equal sizes, the set holding the lowest processor wins.
    #[test]
    fn choose_xapic_cluster_largest_cluster_then_lowest() {
        let t = Topology::new(
            &platform(64, IrqchipMode::Split, false),
            ApicModel::XapicCluster,
        );
        // Cluster 1 holds two of them, cluster 3 three.
        let c = pick(&t, &[4, 5, 12, 13, 14]);
        assert_eq!(c.reach, set(&[12, 13, 14]));
        assert_eq!(c.destination.id(), Some(0x37));
        // Two each in clusters 2 and 5: cluster 2 (lowest processor 8).
        let c = pick(&t, &[21, 22, 8, 11]);
        assert_eq!(c.reach, set(&[8, 11]));
        assert_eq!(c.destination.id(), Some(0x29));
        // Processors 60 and up have no cluster: physical.
        let c = pick(&t, &[60, 61]);
        assert_eq!(c.destination, ApicDestination::Physical { apic_id: 60 });
    }

    #[test]
    fn choose_x2apic_cluster_0_within_the_destination_width() {
        let kernel = Topology::new(&platform(64, IrqchipMode::Kernel, true), ApicModel::X2apic);
        let split = Topology::new(&platform(64, IrqchipMode::Split, true), ApicModel::X2apic);
        let wanted = (0..16).collect::<Vec<_>>();
        assert_eq!(pick(&kernel, &wanted).reach, set(&[0, 1, 2, 3, 4, 5, 6]));
        let c = pick(&split, &wanted);
        assert_eq!(c.reach, (0..15).collect());
        assert_eq!(c.destination.id(), Some(0x7fff));
        // Cluster 1 (IDs 16..31) has no logical form: one processor.
        assert_eq!(pick(&split, &[17, 20]).reach, set(&[17]));
    }

    #[test]
    fn choose_never_the_broadcast_on_a_larger_platform() {
        let t = Topology::new(
            &platform(9, IrqchipMode::Kernel, false),
            ApicModel::Undeclared,
        );
        let c = pick(&t, &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(c.reach, set(&[0, 1, 2, 3, 4, 5, 6]));
        assert_eq!(c.destination.id(), Some(0x7f));
        let small = Topology::new(
            &platform(8, IrqchipMode::Kernel, false),
            ApicModel::Undeclared,
        );
        assert_eq!(
            pick(&small, &[0, 1, 2, 3, 4, 5, 6, 7]).destination.id(),
            Some(0xff)
        );
    }

    /// The broadcast only as the encoding of the whole platform: a mask
    /// of every processor of a larger platform gets the largest domain.
    #[test]
    fn choose_the_broadcast_only_for_a_whole_small_platform() {
        for (cpus, model, reach) in [
            (2, ApicModel::Physical, vec![0]),
            (16, ApicModel::XapicCluster, vec![0, 1, 2, 3]),
            (64, ApicModel::X2apic, (0..15).collect()),
        ] {
            let t = Topology::new(&platform(cpus, IrqchipMode::Split, true), model);
            let all: Vec<u32> = (0..cpus).collect();
            assert_eq!(pick(&t, &all).reach, set(&reach), "{model:?}");
        }
        // Processor 4 (cluster 1) is held: the others cannot join it.
        let t = Topology::new(
            &platform(5, IrqchipMode::Kernel, false),
            ApicModel::XapicCluster,
        );
        assert_eq!(t.choose(set(&[0, 1, 2, 3]), set(&[4])), None);
    }

    #[test]
    fn choose_undeclared_x2apic_needs_ids_equal_to_indices() {
        let mut facts = PlatformFacts::uniform(5);
        facts.x2apic = true;
        facts.apic_ids = vec![0, 3, 5, 7, 9];
        let t = Topology::new(&Platform::new(facts).unwrap(), ApicModel::Undeclared);
        // Processor 1 (APIC ID 3) reads differently in the two modes.
        let c = pick(&t, &[0, 1]);
        assert_eq!(c.reach, set(&[0]));
        assert_eq!(
            c.destination,
            ApicDestination::Logical {
                destination: 1,
                lowest_priority: false
            }
        );
        let c = pick(&t, &[1, 2]);
        assert_eq!(c.destination, ApicDestination::Physical { apic_id: 3 });
    }

    #[test]
    fn choose_with_fixed_keeps_the_other_connections() {
        let t = Topology::new(
            &platform(32, IrqchipMode::User, false),
            ApicModel::XapicCluster,
        );
        // The vector holds 1 and 2 (cluster 0): only processor 3 can join.
        let c = t.choose(set(&[3, 17, 18]), set(&[1, 2])).unwrap();
        assert_eq!(c.reach, set(&[1, 2, 3]));
        assert_eq!(t.choose(set(&[17, 18]), set(&[1, 2])), None);
        // A physical route can only grow into a logical one that holds it.
        let phys = Topology::new(&platform(32, IrqchipMode::User, false), ApicModel::Physical);
        assert_eq!(phys.choose(set(&[5]), set(&[4])), None);
        assert_eq!(
            phys.choose(set(&[4, 5]), set(&[4])).map(|c| c.reach),
            Some(set(&[4]))
        );
    }

    #[test]
    fn choose_never_spans_groups() {
        let t = Topology::new(
            &platform(128, IrqchipMode::Split, false),
            ApicModel::Physical,
        );
        let c = pick(&t, &[70, 3]);
        assert_eq!(c.reach, set(&[3]));
        let x = Topology::new(&platform(128, IrqchipMode::Split, true), ApicModel::X2apic);
        assert_eq!(pick(&x, &[64, 65]).reach.as_group_affinity(), Some((1, 1)));
    }

    #[test]
    fn reach_agrees_with_choose() {
        for model in [
            ApicModel::Undeclared,
            ApicModel::X2apic,
            ApicModel::XapicFlat,
            ApicModel::XapicCluster,
            ApicModel::Physical,
        ] {
            let t = Topology::new(&platform(40, IrqchipMode::Split, true), model);
            for wanted in [
                &[0u32, 1, 2][..],
                &[5, 6, 7, 8, 9],
                &[13, 14, 15, 39],
                &[33],
            ] {
                let c = pick(&t, wanted);
                assert_eq!(t.reach(&c.destination), c.reach, "{model:?} {wanted:?}");
            }
        }
    }
}
