//! Routing decisions: how each IOAPIC pin is programmed, decided at connect
//! and disconnect time and handed to the VMM as values.
//!
//! Rules (all pins carrying a vector share one decision):
//! - vector: the device table's;
//! - trigger: level for LevelSensitive, edge for Latched, from the oldest live
//!   connection on the vector (the table's mode when none);
//! - destination: the union of the effective masks connected on the vector,
//!   which one APIC destination reaches exactly (the connect rules keep it
//!   so, `docs/semantics.md` rule R), and that destination
//!   ([`crate::destination::Topology::choose`]);
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

use crate::destination::{ApicDestination, Topology};
use crate::devices::DeviceTable;
use crate::processors::ProcessorSet;
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
    /// The processor group of `destination`.
    #[serde(default)]
    pub group: u16,
    /// Processors the pin delivers to: exactly those `target` reaches
    /// (bit `b` = processor `64 * group + b`).
    pub destination: u64,
    /// Lowest-priority delivery to `destination` (more than one processor);
    /// fixed delivery otherwise.
    pub lowest_priority: bool,
    /// Live connections on the vector.
    pub connections: u32,
    /// The APIC destination to program (`None` when no processor is
    /// connected; a storm-masked pin keeps it).
    #[serde(default)]
    pub target: ApicDestination,
}

impl PinRoute {
    /// A masked pin no device uses.
    pub const UNUSED: Self = Self {
        masked: true,
        vector: 0,
        trigger: TriggerMode::Edge,
        group: 0,
        destination: 0,
        lowest_priority: false,
        connections: 0,
        target: ApicDestination::None,
    };

    /// The processors the pin delivers to.
    pub fn processors(&self) -> ProcessorSet {
        ProcessorSet::of_group(self.group, self.destination)
    }
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
/// `registry` on `topology`, ignoring the storm guard. The destination is
/// the one `topology` chooses for the union of the vector's connections:
/// by the connect rules it reaches all of them; should it ever reach
/// fewer, the route still never leaves the union, and
/// `Service::check_invariants` reports it.
pub fn compute(
    pin: u8,
    devices: &DeviceTable,
    registry: &Registry,
    topology: &Topology,
) -> PinRoute {
    let Some(resource) = devices.resource_on_pin(pin) else {
        return PinRoute::UNUSED;
    };
    let vector = resource.vector;
    let union = registry.vector_mask(vector);
    let choice = topology.choose(union, ProcessorSet::EMPTY);
    let (target, reach) = choice.map_or((ApicDestination::None, ProcessorSet::EMPTY), |c| {
        (c.destination, c.reach)
    });
    let (group, destination) = reach.as_group_affinity().unwrap_or((0, 0));
    let mode = registry
        .on_vector(vector)
        .next()
        .map_or(resource.mode, |(_, c)| c.mode);
    PinRoute {
        masked: destination == 0,
        vector,
        trigger: mode.trigger_mode(),
        group,
        destination,
        lowest_priority: destination.count_ones() > 1,
        connections: registry.vector_connections(vector),
        target,
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
    pub fn new(devices: &DeviceTable, registry: &Registry, topology: &Topology) -> Self {
        let pins = (0..IOAPIC_PINS)
            .map(|pin| compute(pin, devices, registry, topology))
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
        topology: &Topology,
    ) -> Vec<RouteUpdate> {
        let pins = devices.pins_of_vector(vector);
        let mut updates = Vec::new();
        for pin in 0..IOAPIC_PINS {
            if pins & (1 << pin) == 0 {
                continue;
            }
            self.storm_masked &= !(1 << pin);
            let route = compute(pin, devices, registry, topology);
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
