//! The PV connect service: the platform, the device table, the registry and
//! the programmed routes, and the operations the VMM calls.

use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN, IOAPIC_PINS};
use irqconnect_abi::pv::{
    ABI_VERSION_MAX, MAX_GROUPS, PLATFORM_MAX_CPUS, PlatformGroups, QueryMessages, QueryPlatform,
    connect_version, message_kind, message_table_size,
};
use serde::{Deserialize, Serialize};
use zerocopy::FromZeros;

use crate::connect_ex::{self, BlockSpan, ConnectExRequest, ExRefusal, MessageTable};
use crate::destination::{ApicModel, Topology};
use crate::devices::{DeviceTable, InterruptMode, TableConfig};
use crate::error::Error;
use crate::handle::Handle;
use crate::messages::{MessageRoute, MessageUpdate};
use crate::platform::{DEFAULT_OBJECT_QUOTA, Platform, PlatformFacts};
use crate::processors::ProcessorSet;
use crate::ram::GuestRam;
use crate::registry::{Registry, may_chain};
use crate::request::{self, Outcome};
use crate::retarget::{self, RetargetRequest};
use crate::route::{self, PinRoute, RouteTable, RouteUpdate};
use crate::validate::{self, ConnectRequest, Context, Violation};

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

/// A successful CONNECT_EX.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectedEx {
    /// The handle of the connection or group (never 0).
    pub handle: Handle,
    /// The version connected.
    pub version_used: u32,
    /// Processors that received an interrupt object (union).
    pub effective_mask: u64,
    /// Line resources or messages connected.
    pub count: u32,
    /// The IRQL every routine of the connection runs at.
    pub unified_irql: u8,
    /// MESSAGE_BASED: the bytes of the message table.
    pub table_required: u32,
    /// MESSAGE_BASED: the table to write into the guest's buffer.
    pub table: Option<MessageTable>,
    /// Pins whose route changed.
    pub routes: Vec<RouteUpdate>,
    /// Messages whose programming changed.
    pub messages: Vec<MessageUpdate>,
}

/// A successful DISCONNECT or DISCONNECT_EX: what the VMM applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Disconnected {
    /// Pins whose route changed.
    pub routes: Vec<RouteUpdate>,
    /// Messages that lost their programming.
    pub messages: Vec<MessageUpdate>,
}

/// A successful RETARGET: what the VMM applies, and what undoes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retargeted {
    /// Processors holding an object now (the union over lines or messages).
    pub effective_mask: u64,
    /// Lines or messages moved.
    pub count: u32,
    /// Pins whose route changed.
    pub routes: Vec<RouteUpdate>,
    /// Messages whose programming changed.
    pub messages: Vec<MessageUpdate>,
    /// MESSAGE_BASED: the table to write into the guest's buffer.
    pub table: Option<MessageTable>,
    /// The masks before the move.
    pub before: Vec<(Handle, u64)>,
}

/// The host-side PV IoConnectInterrupt service of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    platform: Platform,
    devices: DeviceTable,
    /// The destinations routes use: the platform with the guest's
    /// declared [`ApicModel`].
    topology: Topology,
    registry: Registry,
    routes: RouteTable,
    storm_masked_pins: u32,
}

impl Service {
    /// A service with no connection: every device pin masked, no APIC
    /// model declared.
    pub fn new(platform: Platform, devices: DeviceTable, object_quota: u32) -> Result<Self, Error> {
        let registry = Registry::new(object_quota)?;
        let topology = Topology::new(&platform, ApicModel::Undeclared);
        let routes = RouteTable::new(&devices, &registry, &topology);
        Ok(Self {
            platform,
            devices,
            topology,
            registry,
            routes,
            storm_masked_pins: 0,
        })
    }

    /// Where the rules look.
    fn ctx(&self) -> Context<'_> {
        Context {
            platform: &self.platform,
            topology: &self.topology,
            devices: &self.devices,
            registry: &self.registry,
        }
    }

    /// The destinations routes use.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// SET_APIC_MODEL: routes follow `model` from now on. Refused while
    /// connections are live (their routes were chosen for the old model),
    /// and for x2APIC on a platform that does not offer it. On `Err`
    /// nothing changed.
    pub fn set_apic_model(&mut self, model: ApicModel) -> Result<(), Violation> {
        if model == ApicModel::X2apic && !self.platform.x2apic() {
            return Err(Violation::UnknownApicModel);
        }
        if self.registry.connections() != 0 {
            return Err(Violation::ConnectionsLive);
        }
        // The topology is the platform's under the model: the same model
        // again leaves it as it is.
        if self.topology.model() != model {
            self.topology = Topology::new(&self.platform, model);
        }
        Ok(())
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
    pub fn routes(&self) -> &[PinRoute] {
        self.routes.all()
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
        let accepted = validate::check_connect(req, &self.ctx(), ram)?;
        let connection = accepted.connection;
        let handle = self
            .registry
            .insert(connection)
            .ok_or(Violation::QuotaExceeded)?;
        let routes = self.refresh(connection.vector);
        Ok(Connected {
            handle,
            effective_mask: connection.mask,
            routes,
        })
    }

    /// IoDisconnectInterrupt: removes every object of the connection and
    /// re-routes its vector. A group's handle is refused
    /// ([`Violation::GroupNeedsDisconnectEx`]). On `Err` nothing changed.
    pub fn disconnect(&mut self, handle: Handle) -> Result<Vec<RouteUpdate>, Violation> {
        let c = self.live_handle(handle)?;
        if c.in_group() {
            return Err(Violation::GroupNeedsDisconnectEx);
        }
        let connection = self
            .registry
            .remove(handle)
            .ok_or(Violation::UnknownHandle)?;
        Ok(self.refresh(connection.vector))
    }

    /// Recomputes the routes of the pins carrying `vector`; the changed ones.
    fn refresh(&mut self, vector: u8) -> Vec<RouteUpdate> {
        self.routes
            .refresh_vector(vector, &self.devices, &self.registry, &self.topology)
    }

    /// The connection `handle` names, if the guest was given that handle
    /// (a group member's own handle never was).
    fn live_handle(&self, handle: Handle) -> Result<&crate::registry::Connection, Violation> {
        self.registry
            .get(handle)
            .filter(|c| c.lead.is_none())
            .ok_or(Violation::UnknownHandle)
    }

    /// IoConnectInterruptEx: checks rules X1.. and the version's rules
    /// (`crate::connect_ex`) and, when all pass, records the connection or
    /// group, re-routes its vectors and programs its messages. `block` is
    /// where the request block lies (the message table must not overlap
    /// it). On `Err` nothing changed.
    pub fn connect_ex<R: GuestRam + ?Sized>(
        &mut self,
        req: &ConnectExRequest,
        block: BlockSpan,
        ram: &R,
    ) -> Result<ConnectedEx, ExRefusal> {
        let plan = connect_ex::check_connect_ex(req, block, &self.ctx(), ram)?;
        let handle = if plan.version_used == connect_version::FULLY_SPECIFIED
            || plan.version_used == connect_version::FULLY_SPECIFIED_GROUP
        {
            plan.connections
                .first()
                .and_then(|c| self.registry.insert(*c))
        } else {
            self.registry.insert_group(&plan.connections)
        }
        .ok_or(ExRefusal {
            violation: Violation::QuotaExceeded,
            table_required: plan.table_required,
        })?;
        let mut routes = Vec::new();
        let mut effective_mask = 0;
        for c in &plan.connections {
            effective_mask |= c.mask;
            routes.extend(self.refresh(c.vector));
        }
        let messages =
            self.message_updates(req.device_id, plan.message_routes.iter().copied().map(Some));
        Ok(ConnectedEx {
            handle,
            version_used: plan.version_used,
            effective_mask,
            count: plan.connections.len() as u32,
            unified_irql: plan.unified_irql,
            table_required: plan.table_required,
            table: plan.table,
            routes,
            messages,
        })
    }

    /// RETARGET: moves the connection or group `req.handle` names to the
    /// processors of `req.processor_mask`, after the rules of
    /// `crate::retarget`. Every line or message keeps its place in its
    /// chains; all routes change in one step (the VMM applies them before
    /// the vCPU resumes). On `Err` nothing changed.
    pub fn retarget<R: GuestRam + ?Sized>(
        &mut self,
        req: &RetargetRequest,
        block: BlockSpan,
        ram: &R,
    ) -> Result<Retargeted, Violation> {
        let plan = retarget::check_retarget(req, block, &self.ctx(), ram)?;
        self.registry
            .retarget(&plan.changes)
            .ok_or(Violation::QuotaExceeded)?;
        let mut routes = Vec::new();
        for &v in &plan.vectors {
            routes.extend(self.refresh(v));
        }
        let effective_mask = plan.changes.iter().fold(0, |m, &(_, c)| m | c);
        let messages = if plan.message_routes.is_empty() {
            Vec::new()
        } else {
            self.message_updates(plan.device, plan.message_routes.iter().copied().map(Some))
        };
        Ok(Retargeted {
            effective_mask,
            count: plan.changes.len() as u32,
            routes,
            messages,
            table: plan.table,
            before: plan.before,
        })
    }

    /// Takes back a RETARGET whose answer could not be written: the masks
    /// `before`, the routes they imply, the storm marks from before it.
    pub(crate) fn undo_retarget(&mut self, before: &[(Handle, u64)], storm_before: u32) {
        if self.registry.retarget(before).is_some() {
            let vectors: Vec<u8> = before
                .iter()
                .filter_map(|&(h, _)| self.registry.get(h).map(|c| c.vector))
                .collect();
            for v in vectors {
                self.refresh(v);
            }
        }
        self.restore_storm(storm_before);
    }

    /// One update per message of `device`'s test device, in message order.
    fn message_updates(
        &self,
        device: u32,
        routes: impl Iterator<Item = Option<MessageRoute>>,
    ) -> Vec<MessageUpdate> {
        let Some(test_device) = self
            .devices
            .device(device)
            .and_then(|d| d.messages())
            .and_then(|m| m.test_device)
        else {
            return Vec::new();
        };
        routes
            .zip(0u8..)
            .map(|(route, message)| MessageUpdate {
                device,
                test_device,
                message,
                route,
            })
            .collect()
    }

    /// IoDisconnectInterruptEx: `version` must be the `version_used`
    /// CONNECT_EX answered (rule X1 for an unknown one); removes the
    /// connection or the whole group, re-routes and unprograms its
    /// messages. On `Err` nothing changed.
    pub fn disconnect_ex(
        &mut self,
        version: u32,
        handle: Handle,
    ) -> Result<Disconnected, Violation> {
        if !(connect_version::FULLY_SPECIFIED..=connect_version::FULLY_SPECIFIED_GROUP)
            .contains(&version)
        {
            return Err(Violation::UnknownConnectVersion);
        }
        let c = *self.live_handle(handle)?;
        if c.version != version {
            return Err(Violation::VersionMismatch);
        }
        let gone = if c.in_group() {
            self.registry.remove_group(handle)
        } else {
            self.registry.remove(handle).map(|c| vec![c])
        }
        .ok_or(Violation::UnknownHandle)?;
        let mut out = Disconnected::default();
        for g in &gone {
            out.routes.extend(self.refresh(g.vector));
        }
        if c.version == connect_version::MESSAGE_BASED {
            out.messages = self.message_updates(c.device, gone.iter().map(|_| None));
        }
        Ok(out)
    }

    /// Takes back a connection or group just made whose answer could not
    /// be written, with the storm marks from before it.
    pub(crate) fn undo_connect(&mut self, handle: Handle, storm_before: u32) {
        let gone = match self.registry.get(handle) {
            Some(c) if c.in_group() => self.registry.remove_group(handle).unwrap_or_default(),
            Some(_) => self.registry.remove(handle).into_iter().collect(),
            None => Vec::new(),
        };
        for g in &gone {
            self.refresh(g.vector);
        }
        self.restore_storm(storm_before);
    }

    /// The QUERY_MESSAGES outputs for `device` (header and input zeroed);
    /// `None` for an unknown device.
    pub fn query_messages(&self, device: u32) -> Option<QueryMessages> {
        let d = self.devices.device(device)?;
        let mut q = QueryMessages::new_zeroed();
        q.test_device = u32::MAX;
        if let Some(m) = d.messages() {
            q.message_count = u32::from(m.count);
            q.kind = m.kind.to_abi();
            q.policy = m.policy.to_abi();
            q.irql = m.irql();
            q.first_vector = m.first_vector;
            q.test_device = m.test_device.map_or(u32::MAX, u32::from);
            q.affinity = m.affinity;
            q.table_size = message_table_size(usize::from(m.count)) as u32;
        } else {
            q.kind = message_kind::NONE;
        }
        Some(q)
    }

    /// Every message of every device with a test device, with its current
    /// programming (`None`: unconnected): what a restored VM programs.
    pub fn message_programming(&self) -> Vec<MessageUpdate> {
        let mut out = Vec::new();
        for d in self.devices.devices() {
            let Some(m) = d.messages() else { continue };
            let routes = (0..m.count).map(|k| {
                let vector = m.vector(k)?;
                let c = self
                    .registry
                    .on_vector(vector)
                    .map(|(_, c)| c)
                    .find(|c| c.device == d.id() && c.message == Some(k))?;
                self.message_route(vector, c.processors())
            });
            out.extend(self.message_updates(d.id(), routes));
        }
        out
    }

    /// The route of message-signaled `vector` to `processors` (a
    /// connection's: one destination reaches them exactly).
    fn message_route(&self, vector: u8, processors: ProcessorSet) -> Option<MessageRoute> {
        let choice = self.topology.choose(processors, ProcessorSet::EMPTY)?;
        MessageRoute::for_choice(vector, &choice, self.platform.msi_format())
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
        q.irqchip_mode = crate::platform::irqchip_mode_to_abi(self.platform.irqchip_mode());
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

    /// What ABI version 2 adds to the QUERY_PLATFORM outputs.
    pub fn query_platform_groups(&self) -> PlatformGroups {
        let mut g = PlatformGroups {
            group_count: self.platform.group_count(),
            apic_model: self.topology.model().to_abi(),
            destination_bits: self.platform.destination_bits() as u8,
            ..PlatformGroups::default()
        };
        for group in 0..MAX_GROUPS as u16 {
            let i = usize::from(group);
            if let (Some(size), Some(online)) =
                (g.group_sizes.get_mut(i), g.group_online.get_mut(i))
            {
                *size = self.platform.group_size(group);
                *online = self.platform.group_online(group);
            }
        }
        g
    }

    /// Checks every invariant of the service; `Err` names the first broken
    /// one. Used by the fuzz harnesses, the property tests and snapshot
    /// restore.
    ///
    /// - the registry is consistent and within its quota;
    /// - every connection's mask is non-empty and online, its device owns its
    ///   vector, its IRQL is the vector's class (a message's route reaches
    ///   exactly its mask, inside the message's affinity);
    /// - a device with several line resources holds its line connections
    ///   under one lock (rule 10);
    /// - every (processor, vector) chain satisfies the sharing rule;
    /// - every programmed route equals what the live connections imply
    ///   (storm-masked pins aside, which must read masked).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.registry.check_consistency()?;
        self.check_connections()?;
        for pin in 0..IOAPIC_PINS {
            self.check_route(pin)?;
        }
        Ok(())
    }

    /// [`Service::check_invariants`] but the registry's own consistency
    /// and the routes: what a restore checks, whose routes it has just
    /// computed from the restored connections.
    fn check_connections(&self) -> Result<(), String> {
        for (h, c) in self.registry.iter() {
            self.check_connection(h, c)?;
        }
        for d in self.devices.devices() {
            self.check_device_locks(d.id())?;
        }
        for vector in self.registry.vectors_in_use() {
            self.check_chains(vector)?;
        }
        Ok(())
    }

    /// [`Service::check_invariants`] for what a change of the connections
    /// on `vectors` can break: the registry's lists and unions of those
    /// vectors, their connections, the lock rule of those connections'
    /// devices, their chains and the routes of their pins. A caller that
    /// knows which vectors an operation touched (connections added or
    /// removed, routes changed) checks those after it, and everything now
    /// and then; the registry's global counters and indexes are left to
    /// the full check. Removing a connection cannot break the lock rule
    /// of its device, so the devices are those still connected.
    pub fn check_vectors(&self, vectors: &[u8]) -> Result<(), String> {
        let mut devices = Vec::new();
        for &vector in vectors {
            self.registry.check_vector(vector)?;
            for (h, c) in self.registry.on_vector(vector) {
                self.check_connection(h, c)?;
                devices.push(c.device);
            }
            self.check_chains(vector)?;
            let pins = self.devices.pins_of_vector(vector);
            for pin in (0..IOAPIC_PINS).filter(|p| pins & (1 << p) != 0) {
                self.check_route(pin)?;
            }
        }
        devices.sort_unstable();
        devices.dedup();
        for d in devices {
            self.check_device_locks(d)?;
        }
        Ok(())
    }

    /// One connection: online mask, owned vector, IRQL of the vector's
    /// class, a message's route.
    fn check_connection(&self, h: Handle, c: &crate::registry::Connection) -> Result<(), String> {
        let h = h.raw();
        if !c.processors().is_subset(&self.platform.online()) || c.processors().is_empty() {
            return Err(format!(
                "connection {h:#x} has objects off the online processors"
            ));
        }
        let device = self.devices.device(c.device);
        let owned = match c.message {
            None => device
                .and_then(|d| d.resource_for_vector(u32::from(c.vector)))
                .is_some(),
            Some(k) => {
                device.and_then(|d| d.messages()).and_then(|m| m.vector(k)) == Some(c.vector)
            }
        };
        if !owned || c.irql != c.vector >> 4 {
            return Err(format!("connection {h:#x} names a vector its device lacks"));
        }
        if c.message.is_some() {
            let route = self.message_route(c.vector, c.processors());
            let allowed = device
                .and_then(|d| d.messages())
                .map_or(ProcessorSet::EMPTY, |m| {
                    ProcessorSet::of_group(m.group, m.affinity)
                });
            if route.is_none_or(|r| ProcessorSet::of_group(r.group, r.targets) != c.processors())
                || !c.processors().is_subset(&allowed)
            {
                return Err(format!(
                    "message connection {h:#x} holds objects where its message does not go"
                ));
            }
        }
        Ok(())
    }

    /// Rule 10: a device with several line resources has one lock.
    fn check_device_locks(&self, device: u32) -> Result<(), String> {
        let Some(d) = self.devices.device(device) else {
            return Ok(());
        };
        if d.resources().len() <= 1 {
            return Ok(());
        }
        let mut lines = self
            .registry
            .device_connections(d.id())
            .filter(|c| c.message.is_none());
        if let Some(first) = lines.next() {
            let one_group = first.spin_lock == 0
                && first.version == connect_version::LINE_BASED
                && self
                    .registry
                    .device_connections(d.id())
                    .filter(|c| c.message.is_none())
                    .count()
                    <= d.resources().len();
            let shared = lines.all(|c| c.spin_lock == first.spin_lock);
            if !shared || (first.spin_lock == 0 && !one_group) {
                return Err(format!(
                    "device {} holds connections under different locks",
                    d.id()
                ));
            }
        }
        Ok(())
    }

    /// Rule R (one destination reaches exactly `vector`'s processors) and
    /// the sharing rule on every (processor, `vector`) chain.
    fn check_chains(&self, vector: u8) -> Result<(), String> {
        let union = self.registry.vector_mask(vector);
        if !union.is_empty()
            && self
                .topology
                .choose(union, ProcessorSet::EMPTY)
                .is_none_or(|c| c.reach != union)
        {
            return Err(format!(
                "no destination reaches exactly the processors of vector {vector:#x}"
            ));
        }
        // ... and still does after any of them goes: no union of them is a
        // set only the broadcast names.
        for alias in self.topology.broadcast_aliases() {
            if self.registry.union_inside(vector, alias, &[]) == alias {
                return Err(format!(
                    "connections on vector {vector:#x} could leave it on processors only the broadcast names"
                ));
            }
        }
        // Every pair of them that meets on a processor may chain. One pass
        // in connection order: a connection clashes with an earlier one
        // where it meets a processor holding one that does not share, or,
        // not sharing itself, any; or, sharing, one of another (mode, IRQL).
        // The first clash is the first illegal pair, so this answers as
        // the check of every pair does, in linear time.
        let mut all = ProcessorSet::EMPTY;
        let mut exclusive = ProcessorSet::EMPTY;
        let mut shared = ProcessorSet::EMPTY;
        let mut kinds: Vec<((InterruptMode, u8), ProcessorSet)> = Vec::new();
        for (i, (hb, b)) in self.registry.on_vector(vector).enumerate() {
            let set = b.processors();
            let kind = (b.mode, b.irql);
            let slot = kinds.iter().position(|(k, _)| *k == kind);
            let clash = if b.share_vector {
                let same_kind = slot
                    .and_then(|k| kinds.get(k))
                    .map_or(ProcessorSet::EMPTY, |(_, s)| *s);
                set & (exclusive | (shared - same_kind))
            } else {
                set & all
            };
            if !clash.is_empty() {
                let earlier = self
                    .registry
                    .on_vector(vector)
                    .take(i)
                    .find(|(_, a)| !(a.processors() & set).is_empty() && !may_chain(a, b));
                let ha = earlier.map_or(0, |(h, _)| h.raw());
                return Err(format!(
                    "connections {ha:#x} and {:#x} share a chain illegally",
                    hb.raw()
                ));
            }
            all |= set;
            if !b.share_vector {
                exclusive |= set;
                continue;
            }
            shared |= set;
            match slot.and_then(|k| kinds.get_mut(k)) {
                Some((_, s)) => *s |= set,
                None => kinds.push((kind, set)),
            }
        }
        Ok(())
    }

    /// `pin`'s programmed route is what the live connections imply.
    fn check_route(&self, pin: u8) -> Result<(), String> {
        let expected = route::compute(pin, &self.devices, &self.registry, &self.topology);
        let Some(actual) = self.route(pin) else {
            return Err(format!("pin {pin} has no route"));
        };
        let expected = if self.routes.storm_masked() & (1 << pin) != 0 {
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
        Ok(())
    }

    /// True when the live state equals `other`'s: same platform, table,
    /// quota, connections in the same chain order, same routes. Handles,
    /// slot generations and the storm count may differ.
    pub fn same_live_state(&self, other: &Self) -> bool {
        self.platform == other.platform
            && self.devices == other.devices
            && self.topology == other.topology
            && self.registry.quota() == other.registry.quota()
            && self.registry.live_chains() == other.registry.live_chains()
            && self.routes == other.routes
    }

    /// The service's snapshot state.
    pub fn snapshot(&self) -> ServiceState {
        let Self {
            platform: _,
            devices: _,
            topology,
            registry,
            routes,
            storm_masked_pins,
        } = self;
        ServiceState {
            registry: registry.to_state(),
            storm_masked: routes.storm_masked(),
            storm_masked_pins: *storm_masked_pins,
            apic_model: topology.model(),
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
        if state.apic_model == ApicModel::X2apic && !platform.x2apic() {
            return Err(Error::SnapshotInconsistent {
                what: "an x2APIC model on a platform without x2APIC".into(),
            });
        }
        let topology = Topology::new(&platform, state.apic_model);
        let mut routes = RouteTable::new(&devices, &registry, &topology);
        routes.restore_storm_masked(state.storm_masked & ((1 << IOAPIC_PINS) - 1));
        let service = Self {
            platform,
            devices,
            topology,
            registry,
            routes,
            storm_masked_pins: state.storm_masked_pins,
        };
        // `Registry::from_state` checked the registry's consistency, and
        // the routes were just computed from it (the storm marks aside).
        service
            .check_connections()
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
    /// The APIC model the guest declared.
    #[serde(default)]
    pub apic_model: ApicModel,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::InterruptMode;
    use crate::ram::FlatRam;
    use irqchip::apic_bus::TriggerMode as Trigger;

    fn service(cpus: u32) -> Service {
        match Service::with_defaults(cpus) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    fn req(
        device: u32,
        vector: u32,
        mode: InterruptMode,
        share: bool,
        mask: u64,
    ) -> ConnectRequest {
        ConnectRequest {
            device_id: device,
            vector,
            irql: (vector >> 4) as u8,
            synchronize_irql: (vector >> 4) as u8,
            interrupt_mode: mode,
            share_vector: share,
            floating_save: false,
            processor_enable_mask: mask,
            service_routine: 0x1000,
            service_context: 0,
            spin_lock: 0x3000,
            version: irqconnect_abi::pv::connect_version::FULLY_SPECIFIED,
        }
    }

    fn connect(s: &mut Service, r: &ConnectRequest) -> Connected {
        match s.connect(r, &FlatRam::new(0, 0x10_000)) {
            Ok(c) => c,
            Err(v) => panic!("refused: {v:?}"),
        }
    }

    const LEVEL: InterruptMode = InterruptMode::LevelSensitive;
    const LATCHED: InterruptMode = InterruptMode::Latched;

    #[test]
    fn route_initial_device_pins_masked_with_table_vector() {
        let s = service(4);
        let r16 = s.route(16);
        assert_eq!(
            r16.map(|r| (r.masked, r.vector, r.trigger)),
            Some((true, 0x60, Trigger::Level))
        );
        assert_eq!(s.route(17).map(|r| r.trigger), Some(Trigger::Edge));
        assert_eq!(s.route(3), Some(PinRoute::UNUSED));
        assert_eq!(s.check_invariants(), Ok(()));
    }

    #[test]
    fn route_single_processor_is_fixed_delivery() {
        let mut s = service(4);
        let done = connect(&mut s, &req(0, 0x60, LEVEL, false, 0b0100));
        let route = PinRoute {
            masked: false,
            vector: 0x60,
            trigger: Trigger::Level,
            group: 0,
            destination: 0b0100,
            lowest_priority: false,
            connections: 1,
            target: crate::ApicDestination::Logical {
                destination: 0b0100,
                lowest_priority: false,
            },
        };
        assert_eq!(done.routes, vec![RouteUpdate { pin: 16, route }]);
    }

    #[test]
    fn route_more_than_one_processor_is_lowest_priority() {
        let mut s = service(4);
        connect(&mut s, &req(1, 0x61, LATCHED, false, 0b1010));
        let r = s.route(17);
        assert_eq!(
            r.map(|r| (r.masked, r.trigger, r.destination, r.lowest_priority)),
            Some((false, Trigger::Edge, 0b1010, true))
        );
    }

    #[test]
    fn route_shared_pin_two_devices_destination_is_union_of_masks() {
        let mut s = service(4);
        let a = connect(&mut s, &req(2, 0x70, LEVEL, true, 0b0001));
        let b = connect(&mut s, &req(3, 0x70, LEVEL, true, 0b0100));
        assert_eq!(
            s.route(18).map(|r| (r.destination, r.connections)),
            Some((0b0101, 2))
        );
        assert_eq!(b.routes.len(), 1);
        assert!(s.disconnect(a.handle).is_ok());
        assert_eq!(
            s.route(18).map(|r| (r.destination, r.lowest_priority)),
            Some((0b0100, false))
        );
    }

    #[test]
    fn route_two_pins_one_vector_both_follow_the_vector() {
        let mut s = service(4);
        let done = connect(&mut s, &req(4, 0x80, LATCHED, true, 0b0011));
        assert_eq!(
            done.routes.iter().map(|u| u.pin).collect::<Vec<_>>(),
            vec![19, 20]
        );
        connect(&mut s, &req(5, 0x80, LATCHED, true, 0b1000));
        for pin in [19, 20] {
            assert_eq!(
                s.route(pin).map(|r| (r.destination, r.connections)),
                Some((0b1011, 2))
            );
        }
    }

    #[test]
    fn route_masked_when_last_connection_goes() {
        let mut s = service(2);
        let fresh = s.clone();
        let a = connect(&mut s, &req(0, 0x60, LEVEL, false, 0b11));
        let updates = s.disconnect(a.handle);
        let masked = fresh.route(16);
        assert_eq!(updates.map(|u| u.first().map(|u| u.route)), Ok(masked));
        assert!(s.same_live_state(&fresh));
    }

    #[test]
    fn route_unchanged_pins_are_not_reported() {
        let mut s = service(4);
        connect(&mut s, &req(2, 0x70, LEVEL, true, 0b0011));
        // Connections change but the route (destination, mode) barely does:
        // the count moves, so pin 18 is reported once.
        let again = connect(&mut s, &req(3, 0x70, LEVEL, true, 0b0001));
        assert_eq!(again.routes.len(), 1);
        assert_eq!(again.routes.first().map(|u| u.route.connections), Some(2));
    }

    #[test]
    fn storm_report_masks_pin_counts_once_and_shows_in_query_platform() {
        let mut s = service(2);
        connect(&mut s, &req(7, 0xb0, LEVEL, false, 0b01));
        assert_eq!(s.report_storm_masked(22), Ok(()));
        assert_eq!(s.report_storm_masked(22), Ok(()));
        assert_eq!(s.route(22).map(|r| r.masked), Some(true));
        assert_eq!(s.query_platform().storm_masked_pins, 1);
        assert_eq!(s.check_invariants(), Ok(()));
        assert!(matches!(
            s.report_storm_masked(24),
            Err(Error::NoSuchPin { pin: 24, .. })
        ));
        // A new connection on the vector re-arms the pin.
        let mut shared_b0 = req(7, 0xb0, LEVEL, false, 0b10);
        shared_b0.share_vector = false;
        connect(&mut s, &shared_b0);
        assert_eq!(s.route(22).map(|r| r.masked), Some(false));
        assert_eq!(s.storm_masked_pins(), 1);
    }

    #[test]
    fn config_json_builds_service_with_quota_and_platform() {
        let json = r#"{
            "platform": {"cpu_count": 2, "online_mask": 1, "apic_ids": [0, 4],
                         "irqchip_mode": "split", "x2apic": true},
            "object_quota": 5
        }"#;
        let s = Service::from_json(json);
        let q = s.as_ref().map(Service::query_platform);
        assert_eq!(
            q.as_ref()
                .map(|q| (q.object_quota, q.online_mask, q.irqchip_mode, q.apic_ids[1])),
            Ok((5, 1, 1, 4))
        );
        assert_eq!(
            q.map(|q| q.flags & irqconnect_abi::pv::platform_flags::X2APIC),
            Ok(irqconnect_abi::pv::platform_flags::X2APIC)
        );
        assert!(matches!(
            Service::from_json(
                r#"{"platform": {"cpu_count": 0, "online_mask": 0, "apic_ids": []}}"#
            ),
            Err(Error::CpuCountOutOfRange { .. })
        ));
        assert!(matches!(
            Service::from_json(
                r#"{"platform": {"cpu_count": 1, "online_mask": 1, "apic_ids": [0]}, "object_quota": 0}"#
            ),
            Err(Error::QuotaOutOfRange { .. })
        ));
    }

    #[test]
    fn snapshot_roundtrips_through_json() {
        let mut s = service(4);
        let a = connect(&mut s, &req(2, 0x70, LEVEL, true, 0b0011));
        connect(&mut s, &req(3, 0x70, LEVEL, true, 0b0110));
        connect(&mut s, &req(6, 0xa0, LATCHED, false, 0b1000));
        assert!(s.disconnect(a.handle).is_ok());
        assert_eq!(s.report_storm_masked(23), Ok(()));
        let text = serde_json::to_string(&s.snapshot()).unwrap_or_default();
        let state: Result<ServiceState, _> = serde_json::from_str(&text);
        let back = state
            .map_err(|e| Error::ConfigSyntax {
                message: e.to_string(),
            })
            .and_then(|st| Service::restore(s.platform.clone(), s.devices.clone(), &st));
        assert_eq!(back.as_ref(), Ok(&s));
        // The old handle stays stale after restore.
        assert_eq!(
            back.map(|mut b| b.disconnect(a.handle)),
            Ok(Err(Violation::UnknownHandle))
        );
    }

    #[test]
    fn snapshot_inconsistent_state_rejected() {
        let mut s = service(4);
        connect(&mut s, &req(2, 0x70, LEVEL, true, 0b0011));
        let mut state = s.snapshot();
        // A connection on a processor that is not online.
        if let Some(c) = state.registry.slots[0].connection.as_mut() {
            c.mask = 1 << 9;
        }
        let r = Service::restore(s.platform.clone(), s.devices.clone(), &state);
        assert!(matches!(r, Err(Error::SnapshotInconsistent { .. })));
        let mut state = s.snapshot();
        state.registry.order.clear();
        let r = Service::restore(s.platform.clone(), s.devices.clone(), &state);
        assert!(matches!(r, Err(Error::SnapshotInconsistent { .. })));
    }

    /// The sharing rule on one vector, as its statement reads: every pair
    /// of connections that meet on a processor may chain.
    fn every_pair_may_chain(on: &[crate::registry::Connection]) -> bool {
        on.iter().enumerate().all(|(i, a)| {
            on.iter()
                .skip(i + 1)
                .all(|b| (a.processors() & b.processors()).is_empty() || may_chain(a, b))
        })
    }

    proptest::proptest! {
        /// `check_chains` answers as checking every pair does, for any
        /// connections on one vector, legal or not (inserted into the
        /// registry directly, past the validator).
        #[test]
        fn check_chains_answers_as_every_pair(
            specs in proptest::collection::vec(
                (1u64..16, proptest::bool::ANY, proptest::bool::ANY, 0u8..3),
                0..8,
            )
        ) {
            let mut s = service(4);
            let mut on = Vec::new();
            for (mask, share, level, irql) in specs {
                let connection = crate::registry::Connection {
                    device: 2,
                    vector: 0x70,
                    irql: 6 + irql,
                    synchronize_irql: 8,
                    mode: if level { LEVEL } else { LATCHED },
                    share_vector: share,
                    floating_save: false,
                    mask,
                    service_routine: 0x1000,
                    service_context: 0,
                    spin_lock: 0,
                    version: irqconnect_abi::pv::connect_version::FULLY_SPECIFIED,
                    lead: None,
                    message: None,
                    group: 0,
                };
                proptest::prop_assert!(s.registry.insert(connection).is_some());
                on.push(connection);
            }
            let got = s.check_chains(0x70);
            proptest::prop_assert_eq!(got.is_ok(), every_pair_may_chain(&on), "{:?}", got);
            if let Err(what) = got {
                proptest::prop_assert!(what.contains("share a chain illegally"), "{}", what);
            }
        }
    }
}
