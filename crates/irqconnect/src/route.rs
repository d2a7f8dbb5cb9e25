//! Routing decisions: how each IOAPIC pin is programmed, decided at connect
//! and disconnect time and handed to the VMM as values.
//!
//! Rules (all pins carrying a vector share one decision):
//! - vector: the device table's;
//! - trigger: level for LevelSensitive, edge for Latched, from the oldest live
//!   connection on the vector (the table's mode when none);
//! - destination: the union of the effective masks connected on the vector;
//! - lowest priority when the destination holds more than one processor,
//!   fixed otherwise;
//! - masked when no connection remains on the vector, or when the VMM's storm
//!   guard masked the pin since the vector's connections last changed.
//!
//! Nothing on the per-interrupt path consults the registry.

use irqchip::apic_bus::TriggerMode;
use irqconnect_abi::layout::IOAPIC_PINS;
use irqconnect_abi::pv::trigger;
use serde::{Deserialize, Serialize};

use crate::devices::DeviceTable;
use crate::platform::Platform;
use crate::registry::Registry;

/// The ABI value of a pin's trigger mode ([`trigger`]), as QUERY_ROUTE
/// answers it.
pub const fn trigger_to_abi(mode: TriggerMode) -> u8 {
    match mode {
        TriggerMode::Edge => trigger::EDGE,
        TriggerMode::Level => trigger::LEVEL,
    }
}

/// How one pin is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRoute {
    /// True when the pin must not deliver.
    pub masked: bool,
    /// The vector (0 for a pin no device uses).
    pub vector: u8,
    /// Edge or level.
    pub trigger: TriggerMode,
    /// Processors the pin may deliver to (a processor mask, bit = index).
    pub destination: u64,
    /// Lowest-priority delivery to `destination` (more than one processor);
    /// fixed delivery otherwise.
    pub lowest_priority: bool,
    /// Live connections on the vector.
    pub connections: u32,
}

impl PinRoute {
    /// A masked pin no device uses.
    pub const UNUSED: Self = Self {
        masked: true,
        vector: 0,
        trigger: TriggerMode::Edge,
        destination: 0,
        lowest_priority: false,
        connections: 0,
    };
}

/// A pin whose route changed: the VMM programs it into the active irqchip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteUpdate {
    /// The IOAPIC pin.
    pub pin: u8,
    /// Its new route.
    pub route: PinRoute,
}

/// The route `pin` gets from `devices` and the live connections in
/// `registry`, ignoring the storm guard.
pub fn compute(pin: u8, devices: &DeviceTable, registry: &Registry) -> PinRoute {
    let Some(resource) = devices.resource_on_pin(pin) else {
        return PinRoute::UNUSED;
    };
    let vector = resource.vector;
    let destination = registry.vector_mask(vector);
    let mode = registry
        .on_vector(vector)
        .next()
        .map_or(resource.mode, |(_, c)| c.mode);
    PinRoute {
        masked: destination == 0,
        vector,
        trigger: mode.trigger_mode(),
        destination,
        lowest_priority: destination.count_ones() > 1,
        connections: registry.vector_connections(vector),
    }
}

/// Every pin's programmed route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTable {
    pins: Vec<PinRoute>,
    /// Bit `p`: the VMM's storm guard masked pin `p`.
    storm_masked: u32,
}

impl RouteTable {
    /// The routes with no connection: device pins masked with their vector
    /// and trigger mode, other pins [`PinRoute::UNUSED`].
    pub fn new(devices: &DeviceTable, registry: &Registry) -> Self {
        let pins = (0..IOAPIC_PINS)
            .map(|pin| compute(pin, devices, registry))
            .collect();
        Self {
            pins,
            storm_masked: 0,
        }
    }

    /// Every pin's route, pin order.
    pub fn all(&self) -> &[PinRoute] {
        &self.pins
    }

    /// The route of `pin`.
    pub fn get(&self, pin: u8) -> Option<&PinRoute> {
        self.pins.get(usize::from(pin))
    }

    /// Pins the storm guard masked (bit `p` = pin `p`).
    pub fn storm_masked(&self) -> u32 {
        self.storm_masked
    }

    /// Recomputes the pins carrying `vector` after its connections changed:
    /// clears their storm mask and returns the pins whose route changed.
    pub fn refresh_vector(
        &mut self,
        vector: u8,
        devices: &DeviceTable,
        registry: &Registry,
    ) -> Vec<RouteUpdate> {
        let pins = devices.pins_of_vector(vector);
        let mut updates = Vec::new();
        for pin in 0..IOAPIC_PINS {
            if pins & (1 << pin) == 0 {
                continue;
            }
            self.storm_masked &= !(1 << pin);
            let route = compute(pin, devices, registry);
            if let Some(slot) = self.pins.get_mut(usize::from(pin))
                && *slot != route
            {
                *slot = route;
                updates.push(RouteUpdate { pin, route });
            }
        }
        updates
    }

    /// Marks `pin` masked by the storm guard. Returns false for a pin the
    /// IOAPIC does not have.
    pub fn storm_mask(&mut self, pin: u8) -> bool {
        match self.pins.get_mut(usize::from(pin)) {
            Some(route) => {
                route.masked = true;
                self.storm_masked |= 1 << pin;
                true
            }
            None => false,
        }
    }

    /// Restores storm-guard marks (from a snapshot).
    pub(crate) fn restore_storm_masked(&mut self, bits: u32) {
        for pin in 0..IOAPIC_PINS {
            if bits & (1 << pin) != 0 {
                self.storm_mask(pin);
            }
        }
    }
}

/// Where the VMM sends a route: the processor mask turned into an APIC
/// destination for the active convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicDestination {
    /// An 8-bit logical destination; lowest-priority delivery when
    /// `lowest_priority`. Bit `i` is processor `i`. xAPIC (flat model, the
    /// platform's convention LDR = 1 << processor index): processors 0..7.
    /// x2APIC offered: an x2APIC-mode guest's LDR is derived from its APIC
    /// ID, and an 8-bit logical destination addresses cluster 0 (bit `n` =
    /// APIC ID `n`; SDM Vol. 3A 11.12.10.2, and how KVM's
    /// `kvm_apic_match_logical_addr` and our `apic_bus` read it), while a
    /// guest that stays in xAPIC mode follows the flat convention. Both
    /// readings name the same processors when processor `i` has APIC ID `i`,
    /// so on an x2APIC platform this form is used only then.
    Logical {
        /// The destination byte.
        mask: u8,
        /// Deliver lowest-priority rather than fixed.
        lowest_priority: bool,
    },
    /// Physical destination, fixed delivery: used when the mask has no
    /// logical form (xAPIC: a processor above 7; x2APIC: a processor above 7
    /// or whose APIC ID is not its index). The lowest-numbered processor of
    /// the mask gets every interrupt, so delivery stays inside the mask.
    Physical {
        /// Its APIC ID.
        apic_id: u32,
    },
    /// The route is masked or names no processor: program nothing.
    None,
}

impl ApicDestination {
    /// Converts `route` for `platform`.
    pub fn for_route(route: &PinRoute, platform: &Platform) -> Self {
        if route.masked {
            return Self::None;
        }
        Self::for_processors(route.destination, route.lowest_priority, platform)
    }

    /// The destination of `processors` (bit `i` = processor `i`) on
    /// `platform`, lowest priority when `lowest_priority`: the one rule for
    /// pin routes and message routes.
    pub fn for_processors(processors: u64, lowest_priority: bool, platform: &Platform) -> Self {
        if processors == 0 {
            return Self::None;
        }
        if let Some(mask) = Self::logical_mask(processors, platform) {
            return Self::Logical {
                mask,
                lowest_priority,
            };
        }
        match platform.apic_id(processors.trailing_zeros()) {
            Some(apic_id) => Self::Physical { apic_id },
            None => Self::None,
        }
    }

    /// The 8-bit logical destination naming exactly the processors of
    /// `processors`, if there is one. 0xFF is the broadcast destination
    /// (SDM Vol. 3A 11.6.2.1; KVM's `kvm_apic_broadcast` and our
    /// `apic_bus` deliver it to every APIC), so it names processors 0..7
    /// only on a platform that has no others.
    fn logical_mask(processors: u64, platform: &Platform) -> Option<u8> {
        let mask = u8::try_from(processors).ok()?;
        if u32::from(mask) == irqchip::apic_bus::XAPIC_BROADCAST && platform.cpu_count() > 8 {
            return None;
        }
        let ids_are_indices = (0..8u32)
            .filter(|i| mask & (1 << i) != 0)
            .all(|i| platform.apic_id(i) == Some(i));
        (!platform.x2apic() || ids_are_indices).then_some(mask)
    }

    /// The processors (bit `i` = processor `i`, the first 64) a delivery
    /// to this destination can reach on `platform`.
    pub fn processors(&self, platform: &Platform) -> u64 {
        match *self {
            Self::None => 0,
            Self::Logical { mask, .. } => u64::from(mask),
            Self::Physical { apic_id } => platform
                .apic_ids()
                .iter()
                .position(|&id| id == apic_id)
                .filter(|&i| i < 64)
                .map_or(0, |i| 1 << i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_destination_logical_for_low_processors_physical_above() {
        let Ok(p) = Platform::uniform(12) else {
            panic!("platform");
        };
        let mut route = PinRoute {
            masked: false,
            vector: 0x60,
            trigger: TriggerMode::Level,
            destination: 0b110,
            lowest_priority: true,
            connections: 1,
        };
        assert_eq!(
            ApicDestination::for_route(&route, &p),
            ApicDestination::Logical {
                mask: 0b110,
                lowest_priority: true
            }
        );
        route.destination = 0b1_0000_0100;
        assert_eq!(
            ApicDestination::for_route(&route, &p),
            ApicDestination::Physical { apic_id: 2 }
        );
        route.masked = true;
        assert_eq!(
            ApicDestination::for_route(&route, &p),
            ApicDestination::None
        );
    }

    /// Regression (guest `no_interrupt_lost_under_load` with 9 vCPUs):
    /// processors 0..7 of a larger platform are no logical destination,
    /// since 0xFF broadcasts to processor 8 and up too.
    #[test]
    fn apic_destination_processors_0_to_7_of_9_are_not_the_broadcast() {
        let p = Platform::uniform(9).unwrap();
        let dest = ApicDestination::for_processors(0xff, true, &p);
        assert_eq!(dest, ApicDestination::Physical { apic_id: 0 });
        let small = Platform::uniform(8).unwrap();
        assert_eq!(
            ApicDestination::for_processors(0xff, true, &small),
            ApicDestination::Logical {
                mask: 0xff,
                lowest_priority: true
            }
        );
    }

    fn x2apic_platform(apic_ids: Vec<u32>) -> Platform {
        let mut facts = crate::PlatformFacts::uniform(apic_ids.len() as u32);
        facts.x2apic = true;
        facts.apic_ids = apic_ids;
        match Platform::new(facts) {
            Ok(p) => p,
            Err(e) => panic!("platform: {e}"),
        }
    }

    #[test]
    fn apic_destination_x2apic_ids_equal_indices_logical_set() {
        let p = x2apic_platform((0..12).collect());
        let route = PinRoute {
            masked: false,
            vector: 0x60,
            trigger: TriggerMode::Edge,
            destination: 0b0110,
            lowest_priority: true,
            connections: 2,
        };
        let dest = ApicDestination::for_route(&route, &p);
        assert_eq!(
            dest,
            ApicDestination::Logical {
                mask: 0b0110,
                lowest_priority: true
            }
        );
        assert_eq!(dest.processors(&p), 0b0110);
    }

    #[test]
    fn apic_destination_x2apic_id_not_index_physical_lowest() {
        let p = x2apic_platform(vec![0, 3, 5, 7, 9]);
        let route = PinRoute {
            masked: false,
            vector: 0x60,
            trigger: TriggerMode::Level,
            destination: 0b0011,
            lowest_priority: true,
            connections: 1,
        };
        let dest = ApicDestination::for_route(&route, &p);
        assert_eq!(dest, ApicDestination::Physical { apic_id: 0 });
        assert_eq!(dest.processors(&p), 0b0001);
    }

    #[test]
    fn apic_destination_x2apic_processor_above_7_physical_lowest() {
        let p = x2apic_platform((0..12).collect());
        let route = PinRoute {
            masked: false,
            vector: 0x60,
            trigger: TriggerMode::Level,
            destination: 0b11 << 8,
            lowest_priority: true,
            connections: 1,
        };
        let dest = ApicDestination::for_route(&route, &p);
        assert_eq!(dest, ApicDestination::Physical { apic_id: 8 });
        assert_eq!(dest.processors(&p), 1 << 8);
    }
}
