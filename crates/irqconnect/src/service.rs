//! The PV connect service: the platform, the device table, the registry and
//! the programmed routes, and the operations the VMM calls.

use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN, IOAPIC_PINS};
use irqconnect_abi::pv::{ABI_VERSION_MAX, PLATFORM_MAX_CPUS, QueryPlatform};
use serde::{Deserialize, Serialize};
use zerocopy::FromZeros;

use crate::devices::{DeviceTable, TableConfig};
use crate::error::Error;
use crate::handle::Handle;
use crate::platform::{DEFAULT_OBJECT_QUOTA, Platform, PlatformFacts};
use crate::ram::GuestRam;
use crate::registry::{Registry, may_chain};
use crate::request::{self, Outcome};
use crate::route::{self, PinRoute, RouteTable, RouteUpdate};
use crate::validate::{self, ConnectRequest, Violation};

/// Everything needed to build a [`Service`], as configuration (serde).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Platform facts.
    pub platform: PlatformFacts,
    /// The device table; the test platform's default when absent.
    #[serde(default)]
    pub devices: Option<TableConfig>,
    /// The object quota; [`DEFAULT_OBJECT_QUOTA`] when absent.
    #[serde(default)]
    pub object_quota: Option<u32>,
}

/// A successful CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connected {
    /// The connection's handle (never 0).
    pub handle: Handle,
    /// Processors that received an interrupt object.
    pub effective_mask: u64,
    /// Pins whose route changed.
    pub routes: Vec<RouteUpdate>,
}

/// The host-side PV IoConnectInterrupt service of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    platform: Platform,
    devices: DeviceTable,
    registry: Registry,
    routes: RouteTable,
    storm_masked_pins: u32,
}

impl Service {
    /// A service with no connection: every device pin masked.
    pub fn new(platform: Platform, devices: DeviceTable, object_quota: u32) -> Result<Self, Error> {
        let registry = Registry::new(object_quota)?;
        let routes = RouteTable::new(&devices, &registry);
        Ok(Self {
            platform,
            devices,
            registry,
            routes,
            storm_masked_pins: 0,
        })
    }

    /// The guest test platform: `cpu_count` processors all online, the
    /// default device table and quota.
    pub fn with_defaults(cpu_count: u32) -> Result<Self, Error> {
        let platform = Platform::uniform(cpu_count)?;
        let devices = DeviceTable::default_for(&platform);
        Self::new(platform, devices, DEFAULT_OBJECT_QUOTA)
    }

    /// Builds the service `config` describes.
    pub fn from_config(config: &ServiceConfig) -> Result<Self, Error> {
        let platform = Platform::new(config.platform.clone())?;
        let devices = match &config.devices {
            Some(table) => DeviceTable::from_config(table, &platform)?,
            None => DeviceTable::default_for(&platform),
        };
        Self::new(
            platform,
            devices,
            config.object_quota.unwrap_or(DEFAULT_OBJECT_QUOTA),
        )
    }

    /// Parses a JSON [`ServiceConfig`] and builds the service.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let config: ServiceConfig =
            serde_json::from_str(text).map_err(|e| Error::ConfigSyntax {
                message: e.to_string(),
            })?;
        Self::from_config(&config)
    }

    /// The platform facts.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The device table.
    pub fn devices(&self) -> &DeviceTable {
        &self.devices
    }

    /// The registry of connections.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The programmed route of `pin`.
    pub fn route(&self, pin: u8) -> Option<PinRoute> {
        self.routes.get(pin).copied()
    }

    /// Every pin's programmed route, pin order.
    pub fn routes(&self) -> Vec<PinRoute> {
        (0..IOAPIC_PINS).filter_map(|p| self.route(p)).collect()
    }

    /// Pins the storm guard has masked since boot.
    pub fn storm_masked_pins(&self) -> u32 {
        self.storm_masked_pins
    }

    /// Handles a doorbell write: reads the request block at guest-physical
    /// `doorbell`, validates and executes it, writes the answer. Never
    /// panics, whatever the guest memory holds.
    pub fn handle_doorbell<M: GuestRam + ?Sized>(&mut self, mem: &mut M, doorbell: u32) -> Outcome {
        request::handle(self, mem, doorbell)
    }

    /// IoConnectInterrupt: checks rules 2..11 and, when all pass, records one
    /// object per processor of the effective mask and re-routes the vector.
    /// On `Err` nothing changed.
    pub fn connect<R: GuestRam + ?Sized>(
        &mut self,
        req: &ConnectRequest,
        ram: &R,
    ) -> Result<Connected, Violation> {
        let accepted =
            validate::check_connect(req, &self.platform, &self.devices, &self.registry, ram)?;
        let connection = accepted.connection;
        let handle = self
            .registry
            .insert(connection)
            .ok_or(Violation::QuotaExceeded)?;
        let routes = self
            .routes
            .refresh_vector(connection.vector, &self.devices, &self.registry);
        Ok(Connected {
            handle,
            effective_mask: connection.mask,
            routes,
        })
    }

    /// IoDisconnectInterrupt: removes every object of the connection and
    /// re-routes its vector. On `Err` nothing changed.
    pub fn disconnect(&mut self, handle: Handle) -> Result<Vec<RouteUpdate>, Violation> {
        let connection = self
            .registry
            .remove(handle)
            .ok_or(Violation::UnknownHandle)?;
        Ok(self
            .routes
            .refresh_vector(connection.vector, &self.devices, &self.registry))
    }

    /// The VMM's storm guard masked `pin`: the pin reads as masked until its
    /// vector's connections next change, and the storm count goes up (once
    /// per masking; a repeated report of a pin still masked is not counted).
    pub fn report_storm_masked(&mut self, pin: u32) -> Result<(), Error> {
        let no_such_pin = Error::NoSuchPin {
            pin,
            pins: IOAPIC_PINS,
        };
        let pin8 = u8::try_from(pin).map_err(|_| no_such_pin.clone())?;
        let already = self.routes.storm_masked() & 1u32.checked_shl(pin).unwrap_or(0) != 0;
        if !self.routes.storm_mask(pin8) {
            return Err(no_such_pin);
        }
        if !already {
            self.storm_masked_pins = self.storm_masked_pins.saturating_add(1);
        }
        Ok(())
    }

    /// Pins currently held masked by the storm guard (bit `p` = pin `p`).
    pub fn storm_bits(&self) -> u32 {
        self.routes.storm_masked()
    }

    /// Re-applies storm-guard marks `bits` (undo of a connect whose answer
    /// was lost).
    pub(crate) fn restore_storm(&mut self, bits: u32) {
        self.routes.restore_storm_masked(bits);
    }

    /// The QUERY_PLATFORM outputs (header zeroed).
    pub fn query_platform(&self) -> QueryPlatform {
        let mut q = QueryPlatform::new_zeroed();
        q.abi_version_max = ABI_VERSION_MAX;
        q.irqchip_mode = self.platform.irqchip_mode().to_abi();
        q.flags = self.platform.abi_flags();
        q.cpu_count = self.platform.cpu_count();
        q.device_count = self.devices.len() as u32;
        q.online_mask = self.platform.online_mask();
        q.vector_min = DEVICE_VECTOR_MIN;
        q.vector_max = DEVICE_VECTOR_MAX;
        q.object_quota = self.registry.quota();
        q.objects_in_use = self.registry.objects_in_use();
        q.connections = self.registry.connections();
        q.storm_threshold = self.platform.storm_threshold();
        q.storm_masked_pins = self.storm_masked_pins;
        for (slot, &id) in q
            .apic_ids
            .iter_mut()
            .zip(self.platform.apic_ids().iter().take(PLATFORM_MAX_CPUS))
        {
            *slot = id;
        }
        q
    }

    /// Checks every invariant of the service; `Err` names the first broken
    /// one. Used by the fuzz harness, the property tests and snapshot restore.
    ///
    /// - the registry is consistent and within its quota;
    /// - every connection's mask is non-empty and online, its device owns its
    ///   vector, its IRQL is the vector's class;
    /// - every (processor, vector) chain satisfies the sharing rule;
    /// - every programmed route equals what the live connections imply
    ///   (storm-masked pins aside, which must read masked).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.registry.check_consistency()?;
        let online = self.platform.online_mask();
        for (h, c) in self.registry.iter() {
            let h = h.raw();
            if c.mask & !online != 0 {
                return Err(format!("connection {h:#x} has objects off the online mask"));
            }
            let owned = self
                .devices
                .device(c.device)
                .and_then(|d| d.resource_for_vector(u32::from(c.vector)));
            if owned.is_none() || c.irql != c.vector >> 4 {
                return Err(format!("connection {h:#x} names a vector its device lacks"));
            }
        }
        for vector in 0..=u8::MAX {
            let on: Vec<_> = self.registry.on_vector(vector).collect();
            for (i, (ha, a)) in on.iter().enumerate() {
                for (hb, b) in on.iter().skip(i + 1) {
                    if a.mask & b.mask != 0 && !may_chain(a, b) {
                        return Err(format!(
                            "connections {:#x} and {:#x} share a chain illegally",
                            ha.raw(),
                            hb.raw()
                        ));
                    }
                }
            }
        }
        let storm = self.routes.storm_masked();
        for pin in 0..IOAPIC_PINS {
            let expected = route::compute(pin, &self.devices, &self.registry);
            let Some(actual) = self.route(pin) else {
                return Err(format!("pin {pin} has no route"));
            };
            let expected = if storm & (1 << pin) != 0 {
                PinRoute {
                    masked: true,
                    ..expected
                }
            } else {
                expected
            };
            if actual != expected {
                return Err(format!(
                    "pin {pin} is programmed {actual:?}, connections imply {expected:?}"
                ));
            }
        }
        Ok(())
    }

    /// True when the live state equals `other`'s: same platform, table,
    /// quota, connections in the same chain order, same routes. Handles,
    /// slot generations and the storm count may differ.
    pub fn same_live_state(&self, other: &Self) -> bool {
        self.platform == other.platform
            && self.devices == other.devices
            && self.registry.quota() == other.registry.quota()
            && self.registry.live_chains() == other.registry.live_chains()
            && self.routes == other.routes
    }

    /// The service's snapshot state.
    pub fn snapshot(&self) -> ServiceState {
        let Self {
            platform: _,
            devices: _,
            registry,
            routes,
            storm_masked_pins,
        } = self;
        ServiceState {
            registry: registry.to_state(),
            storm_masked: routes.storm_masked(),
            storm_masked_pins: *storm_masked_pins,
        }
    }

    /// Rebuilds a service from `state` on `platform` and `devices`, checking
    /// that the state is one the service can be in.
    pub fn restore(
        platform: Platform,
        devices: DeviceTable,
        state: &ServiceState,
    ) -> Result<Self, Error> {
        let registry = Registry::from_state(&state.registry)?;
        let mut routes = RouteTable::new(&devices, &registry);
        routes.restore_storm_masked(state.storm_masked & ((1 << IOAPIC_PINS) - 1));
        let service = Self {
            platform,
            devices,
            registry,
            routes,
            storm_masked_pins: state.storm_masked_pins,
        };
        service
            .check_invariants()
            .map_err(|what| Error::SnapshotInconsistent { what })?;
        Ok(service)
    }
}

/// The service's snapshot: a plain serde value. Platform facts and the
/// device table are configuration, not state: the VMM rebuilds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// The registry.
    pub registry: crate::registry::RegistryState,
    /// Pins the storm guard holds masked (bit `p` = pin `p`).
    pub storm_masked: u32,
    /// Pins masked by the storm guard since boot.
    pub storm_masked_pins: u32,
}
