//! The registry of connections and their interrupt objects.
//!
//! A connection is one successful CONNECT: one interrupt object on each
//! processor of its effective mask. The chain on (processor, vector) is the
//! vector's connections whose mask holds the processor, in connection order;
//! the registry keeps each vector's connections in that order, with running
//! unions of their masks so the sharing check and the route do not walk the
//! chain. Slots are reused; handles carry a generation (see [`crate::handle`]).
//!
//! A LINE_BASED or MESSAGE_BASED CONNECT_EX makes a *group*: one connection
//! per line resource or message, inserted together ([`Registry::insert_group`])
//! and removed together ([`Registry::remove_group`]). The first is the
//! group's lead: its handle names the group. The others record the lead's
//! slot ([`Connection::lead`]); their own handles are never handed out.
//!
//! Memory is bounded: every connection holds at least one object, so live
//! connections, and so live slots, never exceed the object quota.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use irqconnect_abi::pv::connect_version;
use serde::{Deserialize, Serialize};

use crate::devices::InterruptMode;
use crate::error::Error;
use crate::handle::{FIRST_GENERATION, Handle};
use crate::platform::MAX_OBJECT_QUOTA;
use crate::processors::ProcessorSet;

/// One connection: the IoConnectInterrupt parameters that were accepted and
/// the effective mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// The device (PDO) whose resource is connected.
    pub device: u32,
    /// The vector.
    pub vector: u8,
    /// `Irql` (= vector >> 4).
    pub irql: u8,
    /// `SynchronizeIrql`.
    pub synchronize_irql: u8,
    /// `InterruptMode`.
    pub mode: InterruptMode,
    /// `ShareVector`.
    pub share_vector: bool,
    /// `FloatingSave`.
    pub floating_save: bool,
    /// Effective mask: the processors of `group` that hold one of its
    /// objects (bit `b` = processor `64 * group + b`).
    pub mask: u64,
    /// The processor group of `mask` (0 for a classic CONNECT).
    #[serde(default)]
    pub group: u16,
    /// `ServiceRoutine` (guest address).
    pub service_routine: u64,
    /// `ServiceContext` (guest-physical address or 0).
    pub service_context: u64,
    /// `SpinLock` (guest-physical address or 0; for a LINE_BASED or
    /// MESSAGE_BASED group, 0 means the lock the system provides the group).
    pub spin_lock: u64,
    /// The `IO_CONNECT_INTERRUPT_PARAMETERS` version that made it
    /// (`irqconnect_abi::pv::connect_version`); a classic CONNECT records
    /// FULLY_SPECIFIED.
    #[serde(default = "fully_specified")]
    pub version: u32,
    /// In a group, for every connection but the lead: the lead's slot.
    #[serde(default)]
    pub lead: Option<u32>,
    /// For a MESSAGE_BASED connection: the message number.
    #[serde(default)]
    pub message: Option<u8>,
}

const fn fully_specified() -> u32 {
    connect_version::FULLY_SPECIFIED
}

impl Connection {
    /// Interrupt objects the connection holds: one per processor of its mask.
    pub fn objects(&self) -> u32 {
        self.mask.count_ones()
    }

    /// The processors holding its objects.
    pub fn processors(&self) -> ProcessorSet {
        ProcessorSet::of_group(self.group, self.mask)
    }

    /// True for a connection of a LINE_BASED or MESSAGE_BASED group (its
    /// lead or a member).
    pub fn in_group(&self) -> bool {
        matches!(
            self.version,
            connect_version::LINE_BASED | connect_version::MESSAGE_BASED
        )
    }
}

/// True when `a` and `b` may sit in one (processor, vector) chain: both
/// share the vector, with one interrupt mode and one IRQL (rule 9).
pub fn may_chain(a: &Connection, b: &Connection) -> bool {
    a.share_vector && b.share_vector && a.mode == b.mode && a.irql == b.irql
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    slot: u32,
    set: ProcessorSet,
    mode: InterruptMode,
    share: bool,
}

impl Entry {
    fn of(slot: u32, c: &Connection) -> Self {
        Self {
            slot,
            set: c.processors(),
            mode: c.mode,
            share: c.share_vector,
        }
    }
}

/// Unions of the processors of some connections on one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Unions {
    /// Processors with at least one object on the vector.
    all: ProcessorSet,
    /// Processors holding an object that does not share the vector.
    exclusive: ProcessorSet,
    /// Processors holding a LevelSensitive object.
    level: ProcessorSet,
    /// Processors holding a Latched object.
    latched: ProcessorSet,
}

impl Unions {
    fn add(&mut self, e: &Entry) {
        self.all |= e.set;
        if !e.share {
            self.exclusive |= e.set;
        }
        match e.mode {
            InterruptMode::LevelSensitive => self.level |= e.set,
            InterruptMode::Latched => self.latched |= e.set,
        }
    }

    /// The first processor of `set` whose chain a connection with `mode`
    /// and `share` could not join (rule 9).
    fn conflict(&self, set: ProcessorSet, mode: InterruptMode, share: bool) -> Option<u32> {
        let mut conflict = set & self.exclusive;
        if !share {
            conflict |= set & self.all;
        }
        conflict |= set
            & match mode {
                InterruptMode::LevelSensitive => self.latched,
                InterruptMode::Latched => self.level,
            };
        conflict.first()
    }
}

/// One vector's connections in connection order, with unions of their masks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct VectorChains {
    entries: Vec<Entry>,
    unions: Unions,
}

impl VectorChains {
    fn add_to_unions(&mut self, e: &Entry) {
        self.unions.add(e);
    }

    fn recompute_unions(&mut self) {
        self.unions = self.unions_except(&[]);
    }

    /// The unions of every connection but those in slots `except`.
    fn unions_except(&self, except: &[u32]) -> Unions {
        let mut u = Unions::default();
        for e in self.entries.iter().filter(|e| !except.contains(&e.slot)) {
            u.add(e);
        }
        u
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    generation: u32,
    connection: Option<Connection>,
}

/// Per-(processor, vector) chains of interrupt objects, the object quota and
/// the handles that name connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    quota: u32,
    slots: Vec<Slot>,
    /// Dead slots ready for reuse, oldest first (spreads generations).
    free: VecDeque<u32>,
    /// The chains of every vector with at least one connection (a vector
    /// whose last connection goes is removed, so equal registries have
    /// equal maps).
    vectors: BTreeMap<u8, VectorChains>,
    /// Live connections by (device, slot).
    by_device: BTreeSet<(u32, u32)>,
    /// Each live group's lead slot and its other members' slots.
    members: BTreeMap<u32, Vec<u32>>,
    objects: u32,
    connections: u32,
}

impl Registry {
    /// An empty registry holding at most `quota` interrupt objects.
    pub fn new(quota: u32) -> Result<Self, Error> {
        if quota == 0 || quota > MAX_OBJECT_QUOTA {
            return Err(Error::QuotaOutOfRange {
                quota,
                max: MAX_OBJECT_QUOTA,
            });
        }
        Ok(Self {
            quota,
            slots: Vec::new(),
            free: VecDeque::new(),
            vectors: BTreeMap::new(),
            by_device: BTreeSet::new(),
            members: BTreeMap::new(),
            objects: 0,
            connections: 0,
        })
    }

    /// The object quota.
    pub fn quota(&self) -> u32 {
        self.quota
    }

    /// Interrupt objects in use.
    pub fn objects_in_use(&self) -> u32 {
        self.objects
    }

    /// Live connections.
    pub fn connections(&self) -> u32 {
        self.connections
    }

    /// True when `extra` more objects fit the quota.
    pub fn fits(&self, extra: u32) -> bool {
        self.objects
            .checked_add(extra)
            .is_some_and(|n| n <= self.quota)
    }

    /// The live connection `handle` names; `None` for a stale, forged or
    /// zero handle.
    pub fn get(&self, handle: Handle) -> Option<&Connection> {
        let slot = self.slots.get(handle.slot()?)?;
        if slot.generation != handle.generation() {
            return None;
        }
        slot.connection.as_ref()
    }

    /// The first processor of `set` whose chain on `vector` a connection
    /// with `mode` and `share` could not join (rule 9), or `None`.
    pub fn sharing_conflict(
        &self,
        vector: u8,
        set: ProcessorSet,
        mode: InterruptMode,
        share: bool,
    ) -> Option<u32> {
        self.sharing_conflict_except(vector, set, mode, share, &[])
    }

    /// [`Registry::sharing_conflict`] as if the connections in the slots of
    /// `except` were gone (a RETARGET checks a connection's new processors
    /// against the others).
    pub fn sharing_conflict_except(
        &self,
        vector: u8,
        set: ProcessorSet,
        mode: InterruptMode,
        share: bool,
        except: &[Handle],
    ) -> Option<u32> {
        let v = self.vectors.get(&vector)?;
        if except.is_empty() {
            return v.unions.conflict(set, mode, share);
        }
        v.unions_except(&slots_of(except))
            .conflict(set, mode, share)
    }

    /// The live connections of `device`, in slot order.
    pub fn device_connections(&self, device: u32) -> impl Iterator<Item = &Connection> + '_ {
        self.by_device
            .range((device, 0)..=(device, u32::MAX))
            .filter_map(|&(_, slot)| self.live(slot as usize).map(|(_, c)| c))
    }

    /// Records `connection` at the tail of its chains. `None` (and nothing
    /// recorded) when its objects do not fit the quota or its mask is empty.
    pub fn insert(&mut self, connection: Connection) -> Option<Handle> {
        let objects = connection.objects();
        if objects == 0 || !self.fits(objects) {
            return None;
        }
        let index = match self.free.front() {
            Some(&i) => i as usize,
            None => self.slots.len(),
        };
        let generation = self
            .slots
            .get(index)
            .map_or(FIRST_GENERATION, |s| s.generation);
        let handle = Handle::new(index, generation)?;
        let entry = Entry::of(u32::try_from(index).ok()?, &connection);
        // Nothing can fail from here on.
        if self.free.pop_front().is_none() {
            self.slots.push(Slot {
                generation,
                connection: None,
            });
        }
        if let Some(slot) = self.slots.get_mut(index) {
            slot.connection = Some(connection);
        }
        let chains = self.vectors.entry(connection.vector).or_default();
        chains.add_to_unions(&entry);
        chains.entries.push(entry);
        self.by_device.insert((connection.device, entry.slot));
        self.objects += objects;
        self.connections += 1;
        Some(handle)
    }

    /// Removes the connection `handle` names and all its objects. `None`
    /// (and nothing changed) for a stale, forged or zero handle, and for a
    /// connection of a group (those go with [`Registry::remove_group`]).
    pub fn remove(&mut self, handle: Handle) -> Option<Connection> {
        if self.get(handle)?.in_group() {
            return None;
        }
        self.take(handle)
    }

    fn take(&mut self, handle: Handle) -> Option<Connection> {
        let index = handle.slot()?;
        let slot = self.slots.get_mut(index)?;
        if slot.generation != handle.generation() {
            return None;
        }
        let connection = slot.connection.take()?;
        match slot.generation.checked_add(1) {
            Some(next) => {
                slot.generation = next;
                self.free.push_back(index as u32);
            }
            // Retired: the slot is never reused, so no handle repeats.
            None => slot.generation = 0,
        }
        if let Some(chains) = self.vectors.get_mut(&connection.vector) {
            chains.entries.retain(|e| e.slot as usize != index);
            if chains.entries.is_empty() {
                self.vectors.remove(&connection.vector);
            } else {
                chains.recompute_unions();
            }
        }
        self.by_device.remove(&(connection.device, index as u32));
        self.members.remove(&(index as u32));
        self.objects -= connection.objects();
        self.connections -= 1;
        Some(connection)
    }

    /// Records a group: `connections[0]` is the lead, whose handle is
    /// returned; the others get the lead's slot in [`Connection::lead`].
    /// All or nothing: `None` (and nothing recorded) when the group is
    /// empty, a mask is empty, or the objects of all of them do not fit
    /// the quota.
    pub fn insert_group(&mut self, connections: &[Connection]) -> Option<Handle> {
        let (first, rest) = connections.split_first()?;
        let mut total = 0u32;
        for c in connections {
            if c.mask == 0 {
                return None;
            }
            total = total.checked_add(c.objects())?;
        }
        if !self.fits(total) {
            return None;
        }
        let lead = self.insert(Connection {
            lead: None,
            ..*first
        })?;
        let lead_slot = u32::try_from(lead.slot()?).ok()?;
        let mut slots = Vec::with_capacity(rest.len());
        for c in rest {
            match self.insert(Connection {
                lead: Some(lead_slot),
                ..*c
            }) {
                Some(h) => slots.push(h),
                None => {
                    for h in slots {
                        self.take(h);
                    }
                    self.take(lead);
                    return None;
                }
            }
        }
        // Slot order, as `from_state` rebuilds it: one form of the index.
        let mut members: Vec<u32> = slots
            .iter()
            .filter_map(|h| h.slot().and_then(|s| u32::try_from(s).ok()))
            .collect();
        members.sort_unstable();
        self.members.insert(lead_slot, members);
        Some(lead)
    }

    /// Removes the group `handle` names (its lead) and every member, and
    /// returns them, lead first. `None` (and nothing changed) when `handle`
    /// names no live group lead.
    pub fn remove_group(&mut self, handle: Handle) -> Option<Vec<Connection>> {
        let lead = self.get(handle)?;
        if !lead.in_group() || lead.lead.is_some() {
            return None;
        }
        let lead_slot = u32::try_from(handle.slot()?).ok()?;
        let members = self.members.remove(&lead_slot).unwrap_or_default();
        let mut gone = Vec::with_capacity(members.len() + 1);
        gone.push(self.take(handle)?);
        for slot in members {
            let member = self
                .slots
                .get(slot as usize)
                .and_then(|s| Handle::new(slot as usize, s.generation));
            if let Some(c) = member.and_then(|h| self.take(h)) {
                gone.push(c);
            }
        }
        Some(gone)
    }

    /// The connections of the group `handle` names, lead included, in
    /// message order (MESSAGE_BASED) or vector order (LINE_BASED); `None`
    /// when `handle` names no live group lead.
    pub fn group(&self, handle: Handle) -> Option<Vec<&Connection>> {
        Some(
            self.group_members(handle)?
                .into_iter()
                .map(|(_, c)| c)
                .collect(),
        )
    }

    /// [`Registry::group`] with each connection's handle.
    pub fn group_members(&self, handle: Handle) -> Option<Vec<(Handle, &Connection)>> {
        let lead = self.get(handle)?;
        if !lead.in_group() || lead.lead.is_some() {
            return None;
        }
        let lead_slot = u32::try_from(handle.slot()?).ok()?;
        let mut all = vec![(handle, lead)];
        for &slot in self.members.get(&lead_slot).into_iter().flatten() {
            all.extend(self.live(slot as usize));
        }
        all.sort_by_key(|(_, c)| (c.message, c.vector));
        Some(all)
    }

    /// Processors with at least one object on `vector`.
    pub fn vector_mask(&self, vector: u8) -> ProcessorSet {
        self.vector_mask_except(vector, &[])
    }

    /// Processors with an object on `vector` of a connection other than
    /// those `except` names.
    pub fn vector_mask_except(&self, vector: u8, except: &[Handle]) -> ProcessorSet {
        let Some(v) = self.vectors.get(&vector) else {
            return ProcessorSet::EMPTY;
        };
        if except.is_empty() {
            v.unions.all
        } else {
            v.unions_except(&slots_of(except)).all
        }
    }

    /// Gives the live connections `changes` names new masks (their group
    /// unchanged), keeping their places in every chain: a RETARGET. All or
    /// nothing: `None` (and nothing changed) when a handle names no live
    /// connection, a mask is empty, or the objects would exceed the quota.
    pub fn retarget(&mut self, changes: &[(Handle, u64)]) -> Option<()> {
        let mut objects = i64::from(self.objects);
        for &(h, mask) in changes {
            let c = self.get(h)?;
            if mask == 0 {
                return None;
            }
            objects += i64::from(mask.count_ones()) - i64::from(c.objects());
        }
        if objects < 0 || objects > i64::from(self.quota) {
            return None;
        }
        for &(h, mask) in changes {
            let slot = u32::try_from(h.slot()?).ok()?;
            let Some(c) = self
                .slots
                .get_mut(slot as usize)
                .and_then(|s| s.connection.as_mut())
            else {
                continue;
            };
            c.mask = mask;
            let (vector, set) = (c.vector, c.processors());
            if let Some(chains) = self.vectors.get_mut(&vector) {
                for e in chains.entries.iter_mut().filter(|e| e.slot == slot) {
                    e.set = set;
                }
                chains.recompute_unions();
            }
        }
        self.objects = u32::try_from(objects).ok()?;
        Some(())
    }

    /// The union of the processors of `vector`'s connections (but those
    /// `except` names) that lie wholly inside `within`.
    pub fn union_inside(
        &self,
        vector: u8,
        within: ProcessorSet,
        except: &[Handle],
    ) -> ProcessorSet {
        self.on_vector(vector)
            .filter(|(h, _)| !except.contains(h))
            .map(|(_, c)| c.processors())
            .filter(|set| set.is_subset(&within))
            .fold(ProcessorSet::EMPTY, |u, set| u | set)
    }

    /// Live connections on `vector`.
    pub fn vector_connections(&self, vector: u8) -> u32 {
        self.vectors
            .get(&vector)
            .map_or(0, |v| v.entries.len() as u32)
    }

    /// The connections on `vector` in connection order.
    pub fn on_vector(&self, vector: u8) -> impl Iterator<Item = (Handle, &Connection)> + '_ {
        self.vectors
            .get(&vector)
            .into_iter()
            .flat_map(|v| v.entries.iter())
            .filter_map(|e| self.live(e.slot as usize))
    }

    /// The chain on (`cpu`, `vector`): handles in connection order.
    pub fn chain(&self, cpu: u32, vector: u8) -> Vec<Handle> {
        self.on_vector(vector)
            .filter(|(_, c)| c.processors().contains(cpu))
            .map(|(h, _)| h)
            .collect()
    }

    /// Every live connection, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Handle, &Connection)> + '_ {
        (0..self.slots.len()).filter_map(|i| self.live(i))
    }

    fn live(&self, index: usize) -> Option<(Handle, &Connection)> {
        let slot = self.slots.get(index)?;
        let c = slot.connection.as_ref()?;
        Some((Handle::new(index, slot.generation)?, c))
    }

    /// The vectors with at least one connection, ascending.
    pub fn vectors_in_use(&self) -> impl Iterator<Item = u8> + '_ {
        self.vectors.keys().copied()
    }

    /// Every slot ever used, in slot order: its generation (0: retired,
    /// never reused) and its live connection, if any.
    pub fn slots(&self) -> impl Iterator<Item = (u32, Option<&Connection>)> + '_ {
        self.slots
            .iter()
            .map(|s| (s.generation, s.connection.as_ref()))
    }

    /// Dead slots ready for reuse, in reuse order.
    pub fn free_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().copied()
    }

    /// The live state without handles: for each vector with connections,
    /// the connections in connection order. Two registries with equal live
    /// chains differ at most in slot generations and the free-slot order.
    pub fn live_chains(&self) -> Vec<(u8, Vec<Connection>)> {
        self.vectors_in_use()
            .filter_map(|v| {
                let chain: Vec<Connection> = self.on_vector(v).map(|(_, c)| *c).collect();
                (!chain.is_empty()).then_some((v, chain))
            })
            .collect()
    }

    /// Checks the registry's internal consistency: counters, unions, order
    /// lists and free list agree with the slots. `Err` names the first
    /// inconsistency.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut objects = 0u64;
        let mut connections = 0u32;
        // (device, slot) of every connection; each group's lead, and (lead,
        // member) of each other member: what the indexes must hold.
        let mut per_device = Vec::new();
        let mut leads = Vec::new();
        let mut members = Vec::new();
        for (h, c) in self.iter() {
            if c.mask == 0 {
                return Err(format!("connection {:#x} has an empty mask", h.raw()));
            }
            objects += u64::from(c.objects());
            connections += 1;
            let slot = h
                .slot()
                .and_then(|s| u32::try_from(s).ok())
                .unwrap_or(u32::MAX);
            per_device.push((c.device, slot));
            match (c.in_group(), c.lead) {
                (false, None) => {}
                (false, Some(_)) => {
                    return Err(format!(
                        "connection {:#x} names a lead outside a group",
                        h.raw()
                    ));
                }
                (true, None) => leads.push(slot),
                (true, Some(lead)) => {
                    let l = self.live(lead as usize).map(|(_, l)| l);
                    if l.is_none_or(|l| {
                        l.lead.is_some() || l.version != c.version || l.device != c.device
                    }) {
                        return Err(format!(
                            "connection {:#x} names lead slot {lead}, which is no lead of its group",
                            h.raw()
                        ));
                    }
                    members.push((lead, slot));
                }
            }
            let listed = self.vectors.get(&c.vector).map_or(0, |v| {
                v.entries
                    .iter()
                    .filter(|e| Some(e.slot as usize) == h.slot())
                    .count()
            });
            if listed != 1 {
                return Err(format!(
                    "connection {:#x} is listed {listed} times on vector {:#x}",
                    h.raw(),
                    c.vector
                ));
            }
        }
        if objects != u64::from(self.objects) || objects > u64::from(self.quota) {
            return Err(format!(
                "objects: counted {objects}, recorded {}, quota {}",
                self.objects, self.quota
            ));
        }
        if connections != self.connections {
            return Err(format!(
                "connections: counted {connections}, recorded {}",
                self.connections
            ));
        }
        // `iter` is slot order; the indexes are sorted.
        per_device.sort_unstable();
        if !per_device.iter().eq(self.by_device.iter()) {
            return Err("the per-device index disagrees with the slots".into());
        }
        let mut recorded: Vec<(u32, u32)> = self
            .members
            .iter()
            .flat_map(|(&lead, m)| m.iter().map(move |&slot| (lead, slot)))
            .collect();
        recorded.sort_unstable();
        members.sort_unstable();
        if !leads.iter().eq(self.members.keys()) || recorded != members {
            return Err("the group index disagrees with the slots".into());
        }
        let mut listed = 0;
        for (&vector, v) in &self.vectors {
            if v.entries.is_empty() {
                return Err(format!("vector {vector:#x} keeps an empty chain"));
            }
            listed += v.entries.len();
            self.check_vector(vector)?;
        }
        if listed != connections as usize {
            return Err(format!(
                "{listed} chain entries for {connections} connections"
            ));
        }
        for &i in &self.free {
            if self
                .slots
                .get(i as usize)
                .is_none_or(|s| s.connection.is_some())
            {
                return Err(format!("free slot {i} is live or absent"));
            }
        }
        Ok(())
    }

    /// Checks the part of the registry's consistency that concerns one
    /// vector: its chain lists only live connections on the vector, with
    /// their processors, and its unions are those of its entries. Part of
    /// [`Registry::check_consistency`]; a caller that changed only some
    /// vectors' connections checks those.
    pub fn check_vector(&self, vector: u8) -> Result<(), String> {
        let Some(v) = self.vectors.get(&vector) else {
            return Ok(());
        };
        let mut fresh = VectorChains::default();
        for e in &v.entries {
            let c = self.live(e.slot as usize).map(|(_, c)| c);
            if c.is_none_or(|c| c.vector != vector || c.processors() != e.set) {
                return Err(format!("vector {vector:#x} lists a dead or foreign slot"));
            }
            fresh.add_to_unions(e);
        }
        if fresh.unions != v.unions {
            return Err(format!("stale mask unions on vector {vector:#x}"));
        }
        Ok(())
    }

    /// The registry as a plain serde value.
    pub fn to_state(&self) -> RegistryState {
        let Self {
            quota,
            slots,
            free,
            vectors,
            by_device: _,
            members: _,
            objects: _,
            connections: _,
        } = self;
        RegistryState {
            quota: *quota,
            slots: slots
                .iter()
                .map(|s| SlotState {
                    generation: s.generation,
                    connection: s.connection,
                })
                .collect(),
            free: free.iter().copied().collect(),
            order: vectors
                .iter()
                .map(|(&vector, v)| VectorOrder {
                    vector,
                    slots: v.entries.iter().map(|e| e.slot).collect(),
                })
                .collect(),
        }
    }

    /// Rebuilds a registry from [`Registry::to_state`]'s value, checking its
    /// structure (quota, slots, order lists, free list).
    pub fn from_state(state: &RegistryState) -> Result<Self, Error> {
        let bad = |what: &str| Error::SnapshotInconsistent { what: what.into() };
        let mut reg = Self::new(state.quota)?;
        if state.slots.len() > MAX_OBJECT_QUOTA as usize * 2 {
            return Err(bad("too many slots"));
        }
        reg.slots = state
            .slots
            .iter()
            .map(|s| Slot {
                generation: s.generation,
                connection: s.connection,
            })
            .collect();
        reg.free = state.free.iter().copied().collect();
        for order in &state.order {
            if reg.vectors.contains_key(&order.vector) {
                return Err(bad("a vector is listed twice"));
            }
            let mut chains = VectorChains::default();
            for &slot in &order.slots {
                let c = reg
                    .slots
                    .get(slot as usize)
                    .and_then(|s| s.connection)
                    .ok_or_else(|| bad("an order list names a dead slot"))?;
                if c.vector != order.vector {
                    return Err(bad("an order list names another vector's connection"));
                }
                let entry = Entry::of(slot, &c);
                chains.add_to_unions(&entry);
                chains.entries.push(entry);
            }
            // A vector without connections has no chains (one form).
            if !chains.entries.is_empty() {
                reg.vectors.insert(order.vector, chains);
            }
        }
        for c in reg.slots.iter().filter_map(|s| s.connection) {
            reg.objects = reg
                .objects
                .checked_add(c.objects())
                .ok_or_else(|| bad("object count overflows"))?;
            reg.connections += 1;
        }
        for (i, slot) in reg.slots.iter().enumerate() {
            let Some(c) = slot.connection else { continue };
            let i = u32::try_from(i).map_err(|_| bad("too many slots"))?;
            reg.by_device.insert((c.device, i));
            if c.in_group() {
                match c.lead {
                    None => {
                        reg.members.entry(i).or_default();
                    }
                    Some(lead) => reg.members.entry(lead).or_default().push(i),
                }
            }
        }
        if reg.objects > reg.quota {
            return Err(bad("objects exceed the quota"));
        }
        let mut seen = std::collections::BTreeSet::new();
        if !reg.free.iter().all(|&i| seen.insert(i)) {
            return Err(bad("the free list repeats a slot"));
        }
        let dead = reg
            .slots
            .iter()
            .filter(|s| s.connection.is_none() && s.generation != 0);
        if dead.count() != reg.free.len() {
            return Err(bad("the free list does not hold every reusable dead slot"));
        }
        reg.check_consistency().map_err(|what| bad(&what))?;
        Ok(reg)
    }
}

/// The slots `handles` name (a handle without a slot names none).
fn slots_of(handles: &[Handle]) -> Vec<u32> {
    handles
        .iter()
        .filter_map(|h| h.slot().and_then(|s| u32::try_from(s).ok()))
        .collect()
}

/// One slot in a [`RegistryState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// The slot's current generation (0: retired).
    pub generation: u32,
    /// Its live connection, if any.
    pub connection: Option<Connection>,
}

/// One vector's connection order in a [`RegistryState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorOrder {
    /// The vector.
    pub vector: u8,
    /// Slots of its connections, in connection order.
    pub slots: Vec<u32>,
}

/// The registry's snapshot state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryState {
    /// The object quota.
    pub quota: u32,
    /// Every slot ever used, with its generation.
    pub slots: Vec<SlotState>,
    /// Dead slots in reuse order.
    pub free: Vec<u32>,
    /// Per vector, the connection order.
    pub order: Vec<VectorOrder>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(device: u32, vector: u8, mask: u64, mode: InterruptMode, share: bool) -> Connection {
        Connection {
            device,
            vector,
            irql: vector >> 4,
            synchronize_irql: vector >> 4,
            mode,
            share_vector: share,
            floating_save: false,
            mask,
            service_routine: 0x1000,
            service_context: 0,
            spin_lock: 0,
            version: connect_version::FULLY_SPECIFIED,
            lead: None,
            message: None,
            group: 0,
        }
    }

    fn set(mask: u64) -> ProcessorSet {
        ProcessorSet::of_group(0, mask)
    }

    fn registry(quota: u32) -> Registry {
        match Registry::new(quota) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    const LEVEL: InterruptMode = InterruptMode::LevelSensitive;

    #[test]
    fn registry_chain_keeps_connection_order_per_processor() {
        let mut r = registry(16);
        let a = r.insert(conn(2, 0x70, 0b011, LEVEL, true));
        let b = r.insert(conn(3, 0x70, 0b110, LEVEL, true));
        let c = r.insert(conn(2, 0x70, 0b100, LEVEL, true));
        let (Some(a), Some(b), Some(c)) = (a, b, c) else {
            panic!("insert failed");
        };
        assert_eq!(r.chain(0, 0x70), vec![a]);
        assert_eq!(r.chain(1, 0x70), vec![a, b]);
        assert_eq!(r.chain(2, 0x70), vec![b, c]);
        r.remove(b);
        assert_eq!(r.chain(2, 0x70), vec![c]);
        assert_eq!(r.objects_in_use(), 3);
        assert_eq!(r.check_consistency(), Ok(()));
    }

    #[test]
    fn registry_stale_handle_never_hits_reused_slot() {
        let mut r = registry(4);
        let Some(old) = r.insert(conn(0, 0x60, 1, LEVEL, false)) else {
            panic!("insert failed");
        };
        assert!(r.remove(old).is_some());
        let Some(new) = r.insert(conn(0, 0x60, 1, LEVEL, false)) else {
            panic!("insert failed");
        };
        assert_eq!(old.slot(), new.slot());
        assert_ne!(old, new);
        assert!(r.get(old).is_none());
        assert!(r.remove(old).is_none());
        assert!(r.get(new).is_some());
        assert!(r.get(Handle::from_raw(0)).is_none());
        assert!(r.get(Handle::from_raw(new.raw() ^ (1 << 40))).is_none());
    }

    #[test]
    fn registry_generation_wrap_retires_slot() {
        let mut r = registry(4);
        let Some(h) = r.insert(conn(0, 0x60, 1, LEVEL, false)) else {
            panic!("insert failed");
        };
        let mut state = r.to_state();
        state.slots[0].generation = u32::MAX;
        let Ok(mut r) = Registry::from_state(&state) else {
            panic!("restore failed");
        };
        let wrapped = Handle::from_raw((u64::from(u32::MAX) << 32) | 1);
        assert!(r.remove(wrapped).is_some());
        let again = r.insert(conn(0, 0x60, 1, LEVEL, false));
        assert_eq!(again.and_then(Handle::slot), Some(1));
        assert!(r.get(h).is_none());
        assert_eq!(r.check_consistency(), Ok(()));
    }

    #[test]
    fn registry_quota_refuses_insert_beyond_it() {
        let mut r = registry(3);
        assert!(r.insert(conn(0, 0x60, 0b11, LEVEL, true)).is_some());
        assert!(r.insert(conn(1, 0x60, 0b11, LEVEL, true)).is_none());
        assert!(r.insert(conn(1, 0x60, 0b1, LEVEL, true)).is_some());
        assert_eq!(r.objects_in_use(), 3);
        assert!(Registry::new(0).is_err());
    }

    #[test]
    fn registry_sharing_conflict_names_first_bad_processor() {
        let mut r = registry(16);
        r.insert(conn(0, 0x70, 0b0100, LEVEL, true));
        r.insert(conn(1, 0x70, 0b1000, LEVEL, false));
        assert_eq!(r.sharing_conflict(0x70, set(0b0011), LEVEL, true), None);
        assert_eq!(r.sharing_conflict(0x70, set(0b0110), LEVEL, false), Some(2));
        assert_eq!(
            r.sharing_conflict(0x70, set(0b0110), InterruptMode::Latched, true),
            Some(2)
        );
        assert_eq!(r.sharing_conflict(0x70, set(0b1001), LEVEL, true), Some(3));
    }

    /// Regression (`connect_sequences` campaign): a group inserted into
    /// reused slots kept its members in insertion order, `from_state`
    /// rebuilt them in slot order, and a snapshot no longer restored to an
    /// equal registry.
    #[test]
    fn regression_group_in_reused_slots_restores_equal() {
        let mut r = registry(16);
        let fill: Vec<Handle> = (0..3)
            .filter_map(|i| r.insert(conn(0, 0x60, 1 << i, LEVEL, true)))
            .collect();
        // Free slots 2, then 1, then 0: the group reuses them in that order.
        for &h in fill.iter().rev() {
            r.remove(h);
        }
        let member = |k: u8| Connection {
            version: connect_version::MESSAGE_BASED,
            message: Some(k),
            ..conn(10, 0x48 + k, 1, InterruptMode::Latched, false)
        };
        let g = r.insert_group(&[member(0), member(1), member(2)]);
        assert!(g.is_some());
        let back = Registry::from_state(&r.to_state());
        assert_eq!(back.as_ref(), Ok(&r));
        let order: Vec<_> = r
            .group(g.unwrap())
            .unwrap()
            .iter()
            .map(|c| c.message)
            .collect();
        assert_eq!(order, [Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn registry_state_roundtrip_preserves_everything() {
        let mut r = registry(16);
        let a = r.insert(conn(2, 0x70, 0b011, LEVEL, true));
        r.insert(conn(3, 0x70, 0b110, LEVEL, true));
        r.insert(conn(6, 0xa0, 0b1, InterruptMode::Latched, false));
        if let Some(a) = a {
            r.remove(a);
        }
        let back = Registry::from_state(&r.to_state());
        assert_eq!(back.as_ref(), Ok(&r));
    }

    #[test]
    fn registry_groups_keep_chains_apart_and_retarget_keeps_order() {
        let mut r = registry(16);
        let a = r.insert(conn(2, 0x70, 0b01, LEVEL, true)).unwrap();
        let b = r
            .insert(Connection {
                group: 1,
                ..conn(3, 0x70, 0b01, LEVEL, true)
            })
            .unwrap();
        assert_eq!(r.chain(0, 0x70), vec![a]);
        assert_eq!(r.chain(64, 0x70), vec![b]);
        assert_eq!(r.vector_mask(0x70).iter().collect::<Vec<_>>(), vec![0, 64]);
        assert_eq!(
            r.vector_mask_except(0x70, &[a]).iter().collect::<Vec<_>>(),
            vec![64]
        );
        // A moves onto processors 1 and 2, keeping its place ahead of B.
        assert_eq!(r.retarget(&[(a, 0b110)]), Some(()));
        assert_eq!(r.chain(2, 0x70), vec![a]);
        assert_eq!(
            r.on_vector(0x70).map(|(h, _)| h).collect::<Vec<_>>(),
            vec![a, b]
        );
        assert_eq!(r.objects_in_use(), 3);
        assert_eq!(r.check_consistency(), Ok(()));
        // Beyond the quota, an empty mask or a stale handle: nothing changes.
        let before = r.clone();
        assert_eq!(r.retarget(&[(a, u64::MAX)]), None);
        assert_eq!(r.retarget(&[(a, 0)]), None);
        assert_eq!(r.retarget(&[(a, 1), (Handle::from_raw(0), 1)]), None);
        assert_eq!(r, before);
        assert_eq!(
            r.sharing_conflict_except(0x70, set(0b110), LEVEL, false, &[a]),
            None
        );
        assert_eq!(r.sharing_conflict(0x70, set(0b110), LEVEL, false), Some(1));
    }
}
