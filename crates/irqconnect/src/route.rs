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

use irqconnect_abi::layout::IOAPIC_PINS;
use irqconnect_abi::pv::trigger;
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceTable, InterruptMode};
use crate::platform::Platform;
use crate::registry::Registry;

/// A pin's trigger mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    /// Edge-triggered (Latched devices).
    Edge,
    /// Level-triggered (LevelSensitive devices).
    Level,
}

impl Trigger {
    /// The trigger mode that serves `mode`.
    pub const fn for_mode(mode: InterruptMode) -> Self {
        match mode {
            InterruptMode::LevelSensitive => Self::Level,
            InterruptMode::Latched => Self::Edge,
        }
    }

    /// The ABI value ([`trigger`]).
    pub const fn to_abi(self) -> u8 {
        match self {
            Self::Edge => trigger::EDGE,
            Self::Level => trigger::LEVEL,
        }
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
    pub trigger: Trigger,
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
        trigger: Trigger::Edge,
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
        trigger: Trigger::for_mode(mode),
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
    /// Logical flat destination (LDR = 1 << processor index): the mask's
    /// low byte; lowest-priority delivery when `lowest_priority`.
    LogicalFlat {
        /// Bit `i` = processor `i`, processors 0..7.
        mask: u8,
        /// Deliver lowest-priority rather than fixed.
        lowest_priority: bool,
    },
    /// Physical destination, fixed delivery: used when the mask names a
    /// processor above 7 or the vCPUs run x2APIC. The lowest-numbered
    /// processor of the mask gets every interrupt.
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
        if route.masked || route.destination == 0 {
            return Self::None;
        }
        if !platform.x2apic()
            && let Ok(mask) = u8::try_from(route.destination)
        {
            return Self::LogicalFlat {
                mask,
                lowest_priority: route.lowest_priority,
            };
        }
        match platform.apic_id(route.destination.trailing_zeros()) {
            Some(apic_id) => Self::Physical { apic_id },
            None => Self::None,
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
            trigger: Trigger::Level,
            destination: 0b110,
            lowest_priority: true,
            connections: 1,
        };
        assert_eq!(
            ApicDestination::for_route(&route, &p),
            ApicDestination::LogicalFlat {
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
}
