//! How the host's routes can address this guest's processors, read the
//! way `docs/semantics.md` ("Destinations") states it, from what the guest
//! knows: its own APIC mode and IDs, and QUERY_PLATFORM version 2's
//! destination width and declared model. The tests predict effective masks
//! with it; the host's chooser is never consulted.

use irqconnect_abi::pv::{PlatformGroups, apic_model, irqchip_mode};

use super::pvfix;
use crate::runner::Failure;
use crate::{lapic, percpu};

/// The xAPIC broadcast destination: names every processor.
const BROADCAST: u32 = 0xff;
/// Processors in a group.
pub const GROUP_SIZE: usize = irqconnect_abi::pv::GROUP_SIZE;

/// The platform's addressing as the tests see it.
#[derive(Clone, Copy)]
pub struct Topo {
    /// Destination bits a route carries (8, or 15 with the extended
    /// destination ID).
    pub width: u32,
    /// The model the guest declared (`apic_model`).
    pub model: u8,
    /// Processors online.
    pub n: usize,
    /// The irqchip mode (`irqchip_mode`).
    pub mode: u8,
    /// QUERY_PLATFORM version 2's groups.
    pub groups: PlatformGroups,
}

impl Topo {
    /// Reads the platform (QUERY_PLATFORM versions 1 and 2).
    pub fn get() -> Result<Self, Failure> {
        let g = pvfix::groups()?;
        let p = pvfix::platform()?;
        Ok(Self {
            width: u32::from(g.destination_bits),
            model: g.apic_model,
            n: percpu::count(),
            mode: p.irqchip_mode,
            groups: g,
        })
    }

    /// True in user mode (our local APICs: lowest priority rotates among
    /// equally idle processors, `irqchip::apic_bus`).
    pub fn user_mode(&self) -> bool {
        self.mode == irqchip_mode::USER
    }

    /// Processor `i`'s bit in a logical destination and the destination's
    /// cluster part, or `None` when no logical destination of this width
    /// names it.
    fn logical(&self, i: usize) -> Option<(u32, u32)> {
        match self.model {
            apic_model::X2APIC => {
                let id = percpu::cpu(i).apic_id();
                (id < self.width).then(|| (0, 1 << id))
            }
            apic_model::XAPIC_CLUSTER => (i < lapic::CLUSTERS * lapic::CLUSTER_SIZE).then(|| {
                (
                    ((i / lapic::CLUSTER_SIZE) << 4) as u32,
                    1 << (i % lapic::CLUSTER_SIZE),
                )
            }),
            apic_model::PHYSICAL => None,
            // Flat, and undeclared (processors 0..7 with APIC ID = index).
            _ => (i < lapic::FLAT_PROCESSORS
                && (self.model == apic_model::XAPIC_FLAT || percpu::cpu(i).apic_id() == i as u32))
                .then(|| (0, 1 << i)),
        }
    }

    /// The logical domain processor `i` belongs to: the processors of its
    /// group one logical destination can name together with it (empty
    /// when none names it).
    pub fn domain_of(&self, i: usize) -> u64 {
        let Some((cluster, _)) = self.logical(i) else {
            return 0;
        };
        let group = i / GROUP_SIZE;
        (0..GROUP_SIZE)
            .map(|b| group * GROUP_SIZE + b)
            .filter(|&p| p < self.n && self.logical(p).is_some_and(|(c, _)| c == cluster))
            .fold(0, |m, p| m | (1u64 << (p % GROUP_SIZE)))
    }

    /// Where the host routes a connection of `mask` in `group` alone on its
    /// vector (docs/semantics.md, "Destinations"): the largest set one
    /// destination reaches, ties to the lowest first processor, logical
    /// over physical; a would-be broadcast drops its highest processor.
    pub fn expected(&self, group: u16, mask: u64) -> u64 {
        let base = usize::from(group) * GROUP_SIZE;
        let present = |b: usize| base + b < self.n;
        let mask = (0..GROUP_SIZE)
            .filter(|&b| mask & (1u64 << b) != 0 && present(b))
            .fold(0u64, |m, b| m | (1 << b));
        let mut best = 0u64;
        let mut better = |set: u64| {
            let (n, bn) = (set.count_ones(), best.count_ones());
            if n > bn || (n == bn && n > 0 && set.trailing_zeros() < best.trailing_zeros()) {
                best = set;
            }
        };
        let mut seen = 0u64;
        for b in 0..GROUP_SIZE {
            if mask & (1 << b) == 0 || seen & (1 << b) != 0 {
                continue;
            }
            let domain = self.domain_of(base + b);
            if domain == 0 {
                continue;
            }
            seen |= domain;
            let mut set = mask & domain;
            let dest = self.destination(base, set);
            if dest == BROADCAST && self.n != set.count_ones() as usize {
                set &= !(1u64 << (63 - set.leading_zeros()));
            }
            better(set);
        }
        let physical = (0..GROUP_SIZE).find(|&b| {
            mask & (1 << b) != 0 && {
                let id = percpu::cpu(base + b).apic_id();
                u64::from(id) < 1u64 << self.width && id != BROADCAST
            }
        });
        if let Some(b) = physical {
            better(1 << b);
        }
        best
    }

    /// The logical destination of the processors of `set` (one domain) in
    /// the group starting at processor `base`.
    pub fn destination(&self, base: usize, set: u64) -> u32 {
        (0..GROUP_SIZE)
            .filter(|&b| set & (1u64 << b) != 0)
            .filter_map(|b| self.logical(base + b))
            .fold(0, |d, (c, bit)| d | c | bit)
    }

    /// A processor of group 0 no logical destination names together with
    /// processor 1 (another cluster, or beyond the destination width), if
    /// the platform has one.
    pub fn outside_of_1(&self) -> Option<usize> {
        let d = self.domain_of(1);
        (2..self.n.min(GROUP_SIZE)).find(|&p| d & (1u64 << p) == 0)
    }
}
