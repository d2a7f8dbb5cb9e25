//! The `connect_sequences` harness's own reading of `docs/semantics.md`:
//! the shadow of live connections and what each request should do, written
//! apart from the service's code.
//!
//! Destinations are read from the local APICs as the guest programs them
//! under its declared model ([`readings`]: the LDR of every processor, and
//! for an undeclared model with x2APIC offered both the x2APIC and the xAPIC
//! flat readings, which must agree), and every destination is checked on
//! the APIC bus model (`irqchip::apic_bus::resolve`).

use std::collections::BTreeSet;

use crate::connect_ex::{BlockSpan, ConnectExRequest, ExRefusal, MESSAGE_TABLE_ALIGN};
use crate::destination::{ApicDestination, ApicModel};
use crate::devices::{DeviceTable, InterruptMode, ShareDisposition};
use crate::handle::Handle;
use crate::messages::{IrqPolicy, MessageKind, MessageResource};
use crate::platform::Platform;
use crate::processors::ProcessorSet;
use crate::validate::{ConnectRequest, SERVICE_CONTEXT_PROBE, SPIN_LOCK_SIZE, Violation};
use irqchip::apic_bus::{self, ApicTarget, Message, XAPIC_BROADCAST};
use irqchip::msi::{self, Msi};
use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN};
use irqconnect_abi::pv::{GROUP_SIZE, HIGH_LEVEL, connect_version};

/// Guest RAM size of the sequences: pointers below it are resident.
pub(super) const RAM_SIZE: u64 = 0x1_0000;

/// Where the sequences pretend the CONNECT_EX and RETARGET blocks lie (the
/// message table must not overlap them).
pub(super) const BLOCK: BlockSpan = BlockSpan {
    start: 0x3000,
    len: 120,
};

/// A message table buffer that fits every device.
pub(super) const TABLE_AT: u64 = 0x4000;

/// One live connection in the shadow list, in connection order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Live {
    /// The handle the guest holds: the connection's, or its group's.
    pub(super) handle: Handle,
    pub(super) device: u32,
    pub(super) vector: u8,
    pub(super) irql: u8,
    pub(super) mode: InterruptMode,
    pub(super) share: bool,
    /// Its processors, of `group`.
    pub(super) mask: u64,
    pub(super) group: u16,
    pub(super) spin_lock: u64,
    /// The version that made it (CONNECT: FULLY_SPECIFIED).
    pub(super) version: u32,
    /// The message number, for a message.
    pub(super) message: Option<u8>,
    /// SynchronizeIrql (a message's: the unified IRQL).
    pub(super) synchronize_irql: u8,
}

impl Live {
    pub(super) fn in_group(&self) -> bool {
        matches!(
            self.version,
            connect_version::LINE_BASED | connect_version::MESSAGE_BASED
        )
    }

    pub(super) fn processors(&self) -> ProcessorSet {
        ProcessorSet::of_group(self.group, self.mask)
    }
}

/// The platform as the reference sees it: processors, how the guest's
/// local APICs read destinations, and how wide destinations are.
#[derive(Clone, Debug)]
pub(super) struct Topo {
    pub(super) cpus: u32,
    pub(super) present: ProcessorSet,
    pub(super) online: ProcessorSet,
    /// Destination bits a route carries.
    pub(super) width: u32,
    pub x2apic_offered: bool,
    pub(super) apic_ids: Vec<u32>,
    pub(super) model: ApicModel,
    /// One or two readings of every local APIC (which must agree).
    pub(super) readings: Vec<Vec<ApicTarget>>,
    /// [`logical_member`] of every processor, worked out once from the
    /// readings (they never change: a new model builds a new `Topo`).
    members: Vec<Option<(u32, u32)>>,
    /// [`ref_broadcast_alias`], worked out once from `members`.
    broadcast_alias: Option<ProcessorSet>,
}

impl Topo {
    pub(super) fn new(platform: &Platform, model: ApicModel) -> Self {
        let mut topo = Self {
            cpus: platform.cpu_count(),
            present: platform.present(),
            online: platform.online(),
            width: platform.msi_format().destination_bits(),
            x2apic_offered: platform.x2apic(),
            apic_ids: platform.apic_ids().to_vec(),
            model,
            readings: readings(platform, model),
            members: Vec::new(),
            broadcast_alias: None,
        };
        topo.members = (0..topo.cpus)
            .map(|p| read_logical_member(&topo, p))
            .collect();
        topo.broadcast_alias = ref_broadcast_alias(&topo);
        topo
    }

    pub(super) fn group_online(&self, group: u16) -> u64 {
        self.online.group_mask(group)
    }

    pub(super) fn group_present(&self, group: u16) -> u64 {
        self.present.group_mask(group)
    }

    pub(super) fn group_count(&self) -> u16 {
        self.cpus.div_ceil(GROUP_SIZE as u32) as u16
    }
}

/// Every local APIC as the guest programs it under `model`.
fn readings(platform: &Platform, model: ApicModel) -> Vec<Vec<ApicTarget>> {
    let target = |i: u32, x2apic: bool, dfr_flat: bool, logical_id: u32| ApicTarget {
        apic_id: platform.apic_id(i).unwrap_or(u32::MAX),
        x2apic,
        logical_id,
        dfr_flat,
        hw_enabled: true,
        sw_enabled: true,
        arbitration_priority: 0,
    };
    let all = |f: &dyn Fn(u32) -> ApicTarget| (0..platform.cpu_count()).map(f).collect();
    let x2 = |i: u32| {
        let id = platform.apic_id(i).unwrap_or(u32::MAX);
        target(i, true, true, ((id >> 4) << 16) | (1 << (id & 0xf)))
    };
    let flat = |i: u32| target(i, false, true, if i < 8 { 1 << i } else { 0 });
    let cluster = |i: u32| {
        let ldr = if i < 60 {
            ((i / 4) << 4) | (1 << (i % 4))
        } else {
            0
        };
        target(i, false, false, ldr)
    };
    let physical = |i: u32| target(i, platform.x2apic(), true, 0);
    match model {
        ApicModel::X2apic => vec![all(&x2)],
        ApicModel::XapicFlat => vec![all(&flat)],
        ApicModel::XapicCluster => vec![all(&cluster)],
        ApicModel::Physical => vec![all(&physical)],
        ApicModel::Undeclared if platform.x2apic() => vec![all(&x2), all(&flat)],
        ApicModel::Undeclared => vec![all(&flat)],
    }
}

/// Where `message` (IOAPIC or MSI: no sender) lands on the bus, before
/// lowest-priority arbitration: the same set under every reading, or an
/// error.
pub(super) fn bus_reach(topo: &Topo, message: &Message) -> Result<ProcessorSet, String> {
    let mut out: Option<ProcessorSet> = None;
    for targets in &topo.readings {
        let set: ProcessorSet = apic_bus::resolve(message, targets, None)
            .iter()
            .map(|i| i as u32)
            .collect();
        match out {
            Some(s) if s != set => {
                return Err(format!(
                    "{message:?} reaches {s:?} under one reading of the LAPICs, {set:?} under another"
                ));
            }
            _ => out = Some(set),
        }
    }
    Ok(out.unwrap_or(ProcessorSet::EMPTY))
}

/// Where an MSI lands on the bus, and its vector.
pub(super) fn msi_reach(
    topo: &Topo,
    address: u64,
    data: u32,
    format: msi::MsiFormat,
) -> Result<(ProcessorSet, u8), String> {
    let decoded = msi::decode(Msi { address, data }, format)
        .map_err(|e| format!("message {address:#x}/{data:#x} does not decode: {e:?}"))?;
    let message = decoded.bus_message();
    Ok((bus_reach(topo, &message)?, message.vector))
}

/// Processors one logical destination can address together under the
/// readings: keyed by (processor group, cluster), with each processor's
/// member bit, read from the (first) reading's LDR; for two readings only
/// the processors whose LDRs agree. Read once per processor into
/// `Topo::members` ([`logical_member`] looks it up).
fn read_logical_member(topo: &Topo, p: u32) -> Option<(u32, u32)> {
    let first = topo.readings.first()?.get(p as usize)?;
    if topo.readings.iter().any(|r| {
        r.get(p as usize)
            .is_none_or(|t| logical_bits(t) != logical_bits(first))
    }) {
        return None;
    }
    let (cluster, bit) = logical_bits(first)?;
    // The destination must fit the route's width, and an xAPIC destination
    // its 8 bits; cluster 15 of the xAPIC cluster model is the broadcast.
    let dest = cluster | bit;
    let fits = u64::from(dest) < 1u64 << topo.width.min(if first.x2apic { 32 } else { 8 });
    let broadcast_cluster = !first.x2apic && !first.dfr_flat && cluster == 0xf0;
    (fits && !broadcast_cluster).then_some((cluster, bit))
}

/// [`read_logical_member`] of processor `p`, as `Topo::new` worked it out.
fn logical_member(topo: &Topo, p: u32) -> Option<(u32, u32)> {
    topo.members.get(p as usize).copied().flatten()
}

/// (cluster part, member bit) of a target's LDR as a destination reads it;
/// `None` when it has no logical ID.
fn logical_bits(t: &ApicTarget) -> Option<(u32, u32)> {
    let (cluster, bits) = if t.x2apic {
        (t.logical_id & 0xffff_0000, t.logical_id & 0xffff)
    } else if t.dfr_flat {
        (0, t.logical_id & 0xff)
    } else {
        (t.logical_id & 0xf0, t.logical_id & 0xf)
    };
    (bits.count_ones() == 1).then_some((cluster, bits))
}

/// The processors of one (group, cluster) whose logical destination,
/// read from the local APICs, is the broadcast 0xFF without their being
/// every processor. Worked out once per `Topo` (`Topo::broadcast_alias`).
fn ref_broadcast_alias(topo: &Topo) -> Option<ProcessorSet> {
    let mut keys: Vec<(u32, u32)> = Vec::new();
    for p in topo.present.iter() {
        if let Some((cluster, _)) = logical_member(topo, p) {
            let key = (p / GROUP_SIZE as u32, cluster);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    keys.into_iter().find_map(|(group, cluster)| {
        let set: ProcessorSet = topo
            .present
            .iter()
            .filter(|&p| {
                p / GROUP_SIZE as u32 == group
                    && logical_member(topo, p)
                        .is_some_and(|(c, b)| c == cluster && (c | b) & !XAPIC_BROADCAST == 0)
            })
            .collect();
        let dest = set.iter().fold(cluster, |d, p| {
            d | logical_member(topo, p).map_or(0, |(_, b)| b)
        });
        (dest == XAPIC_BROADCAST && set != topo.present).then_some(set)
    })
}

/// The destination the reference picks for `wanted` together with `fixed`
/// (docs/semantics.md, "Destinations"): the largest set one destination
/// reaches, ties to the lowest first processor, then logical over physical.
pub(super) fn ref_choose(
    topo: &Topo,
    wanted: ProcessorSet,
    fixed: ProcessorSet,
) -> Option<(ApicDestination, ProcessorSet)> {
    let wanted = wanted & topo.present;
    let pool = wanted | fixed;
    // Candidates: per (group, cluster), every pool processor of it.
    let mut keys: Vec<(u32, u32)> = Vec::new();
    for p in pool.iter() {
        if let Some((cluster, _)) = logical_member(topo, p) {
            let key = (p / GROUP_SIZE as u32, cluster);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let mut best: Option<(ApicDestination, ProcessorSet, bool)> = None;
    let mut consider = |dest: ApicDestination, set: ProcessorSet, logical: bool| {
        let better = match &best {
            None => true,
            Some((_, b, b_logical)) => {
                set.len() > b.len()
                    || (set.len() == b.len() && set.first() < b.first())
                    || (set.len() == b.len() && set.first() == b.first() && logical && !b_logical)
            }
        };
        if better {
            best = Some((dest, set, logical));
        }
    };
    for (group, cluster) in keys {
        let member = |p: u32| {
            p / GROUP_SIZE as u32 == group
                && logical_member(topo, p).is_some_and(|(c, _)| c == cluster)
        };
        if !fixed.iter().all(member) {
            continue;
        }
        let mut set: ProcessorSet = pool.iter().filter(|&p| member(p)).collect();
        let encode = |set: &ProcessorSet| {
            set.iter().fold(cluster, |d, p| {
                d | logical_member(topo, p).map_or(0, |(_, b)| b)
            })
        };
        let mut dest = encode(&set);
        if dest == XAPIC_BROADCAST && set != topo.present {
            let Some(drop) = (set - fixed).last() else {
                continue;
            };
            set.remove(drop);
            dest = encode(&set);
        }
        if (set & wanted).is_empty() {
            continue;
        }
        consider(
            ApicDestination::Logical {
                destination: dest,
                lowest_priority: set.len() > 1,
            },
            set,
            true,
        );
    }
    if fixed.len() <= 1 {
        let physical = |p: u32| {
            topo.apic_ids
                .get(p as usize)
                .is_some_and(|&id| u64::from(id) < 1u64 << topo.width && id != XAPIC_BROADCAST)
        };
        let one = fixed
            .first()
            .or_else(|| wanted.iter().find(|&p| physical(p)));
        if let Some(p) = one.filter(|&p| physical(p) && wanted.contains(p))
            && let Some(&apic_id) = topo.apic_ids.get(p as usize)
        {
            consider(
                ApicDestination::Physical { apic_id },
                ProcessorSet::single(p),
                false,
            );
        }
    }
    best.map(|(d, s, _)| (d, s))
}

/// The reference's state beside the service.
pub(super) struct Shadow {
    pub(super) topo: Topo,
    pub(super) quota: u32,
    pub(super) live: Vec<Live>,
    pub(super) issued: Vec<Handle>,
    pub(super) dead: BTreeSet<Handle>,
    pub(super) storm: u32,
    pub(super) storm_count: u32,
}

impl Shadow {
    /// The processors the live connections on `vector` hold, but those of
    /// `except`.
    pub(super) fn vector_union(&self, vector: u8, except: Option<Handle>) -> ProcessorSet {
        self.live
            .iter()
            .filter(|c| c.vector == vector && Some(c.handle) != except)
            .fold(ProcessorSet::EMPTY, |m, c| m | c.processors())
    }

    pub(super) fn objects(&self) -> u32 {
        self.live.iter().map(|c| c.mask.count_ones()).sum()
    }
}

pub(super) fn resident(address: u64, len: u64) -> bool {
    address.checked_add(len).is_some_and(|end| end <= RAM_SIZE)
}

/// Rule R and rule 9 for a connection of `vector` with `mode` and `share`
/// wanting `wanted`: its processors, or the first failure. `except`: a
/// connection (or group) being moved.
fn route_and_chain(
    shadow: &Shadow,
    vector: u8,
    irql: u8,
    mode: InterruptMode,
    share: bool,
    wanted: ProcessorSet,
    except: Option<Handle>,
) -> Result<ProcessorSet, Violation> {
    let fixed = shadow.vector_union(vector, except);
    let (_, reach) =
        ref_choose(&shadow.topo, wanted, fixed).ok_or(Violation::NoCommonDestination)?;
    let mut effective = reach & wanted;
    // No union of the vector's connections may be a set of one (group,
    // cluster) whose destination is the broadcast without being every
    // processor: this one gives up its highest processor there that the
    // vector's other connections inside that set lack.
    if let Some(alias) = shadow.topo.broadcast_alias
        && effective.is_subset(&alias)
    {
        let inside = shadow
            .live
            .iter()
            .filter(|c| c.vector == vector && Some(c.handle) != except)
            .map(|c| c.processors())
            .filter(|set| set.is_subset(&alias))
            .fold(ProcessorSet::EMPTY, |u, set| u | set);
        if inside | effective == alias
            && let Some(p) = (effective - inside).last()
        {
            effective.remove(p);
        }
    }
    if effective.is_empty() {
        return Err(Violation::NoCommonDestination);
    }
    // The first processor whose chain on the vector holds a connection
    // the request may not share with.
    let clashing = shadow
        .live
        .iter()
        .filter(|c| {
            c.vector == vector
                && Some(c.handle) != except
                && !(c.share && share && c.mode == mode && c.irql == irql)
        })
        .fold(ProcessorSet::EMPTY, |m, c| m | c.processors())
        & effective;
    if let Some(cpu) = clashing.first() {
        return Err(Violation::SharingConflict { cpu });
    }
    Ok(effective)
}

/// `docs/semantics.md`'s CONNECT rules 2..11, in order, as this harness
/// reads them, in processor `group`: the effective mask, or the first rule
/// that fails.
pub(super) fn expected_verdict(
    req: &ConnectRequest,
    group: u16,
    shadow: &Shadow,
    devices: &DeviceTable,
) -> Result<u64, Violation> {
    let online = req.processor_enable_mask & shadow.topo.group_online(group);
    if online == 0 {
        return Err(Violation::EmptyEffectiveMask);
    }
    if req.service_routine == 0 {
        return Err(Violation::NullServiceRoutine);
    }
    if req.service_context != 0 && !resident(req.service_context, SERVICE_CONTEXT_PROBE) {
        return Err(Violation::ServiceContextNotResident);
    }
    if req.spin_lock != 0 && !resident(req.spin_lock, SPIN_LOCK_SIZE) {
        return Err(Violation::SpinLockNotResident);
    }
    if req.synchronize_irql < req.irql {
        return Err(Violation::SynchronizeIrqlBelowIrql);
    }
    if req.synchronize_irql > HIGH_LEVEL {
        return Err(Violation::SynchronizeIrqlAboveHighLevel);
    }
    if !(u32::from(DEVICE_VECTOR_MIN)..=u32::from(DEVICE_VECTOR_MAX)).contains(&req.vector) {
        return Err(Violation::VectorOutsideDeviceRange);
    }
    let vector = req.vector as u8;
    if u32::from(req.irql) != req.vector >> 4 {
        return Err(Violation::IrqlNotVectorClass);
    }
    let device = devices
        .devices()
        .iter()
        .find(|d| d.id() == req.device_id)
        .ok_or(Violation::UnknownDevice)?;
    if !device.resources().iter().any(|r| r.vector == vector) {
        return Err(Violation::VectorNotOwned);
    }
    let effective = route_and_chain(
        shadow,
        vector,
        req.irql,
        req.interrupt_mode,
        req.share_vector,
        ProcessorSet::of_group(group, online),
        None,
    )?;
    // Rule 10: a device with several line resources has one lock, which
    // every connection names (LINE_BASED: 0 is the group's own lock, which
    // no live connection can share), at an IRQL covering all its lines.
    if device.resources().len() > 1 {
        let system_lock = req.version == connect_version::LINE_BASED && req.spin_lock == 0;
        if req.spin_lock == 0 && !system_lock {
            return Err(Violation::SpinLockRequired);
        }
        let other_lock = shadow.live.iter().any(|c| {
            c.device == req.device_id
                && c.message.is_none()
                && (system_lock || c.spin_lock != req.spin_lock)
        });
        if other_lock {
            return Err(Violation::SpinLockMismatch);
        }
    }
    let highest = device.resources().iter().map(|r| r.vector >> 4).max();
    if req.synchronize_irql < highest.unwrap_or(0) {
        return Err(Violation::SynchronizeIrqlBelowDeviceIrql);
    }
    if shadow.objects() + effective.len() > shadow.quota {
        return Err(Violation::QuotaExceeded);
    }
    Ok(effective.group_mask(group))
}

/// One connection CONNECT_EX is expected to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Planned {
    pub(super) vector: u8,
    pub(super) mode: InterruptMode,
    pub(super) share: bool,
    /// Its processors (for a message: where its route reaches).
    pub(super) mask: u64,
    pub(super) group: u16,
    pub(super) message: Option<u8>,
}

/// What CONNECT_EX is expected to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ExpectedEx {
    pub(super) version_used: u32,
    pub(super) unified_irql: u8,
    pub(super) planned: Vec<Planned>,
    /// MESSAGE_BASED: the table size.
    pub(super) table_required: u32,
}

/// The processors of message `k`, by `docs/semantics.md` rule M7 as this
/// harness reads it.
pub(super) fn policy_set(m: &MessageResource, k: u8, allowed: u64) -> u64 {
    let k = if m.kind == MessageKind::Msi { 0 } else { k };
    let lowest = |n: u32| {
        let mut bits = (0..64).filter(|b| allowed & (1u64 << b) != 0);
        bits.nth(n as usize).map_or(0, |b| 1u64 << b)
    };
    match m.policy {
        IrqPolicy::OneCloseProcessor => lowest(0),
        IrqPolicy::SpreadMessagesAcrossAllProcessors => {
            lowest(u32::from(k) % allowed.count_ones().max(1))
        }
        _ => allowed,
    }
}

/// The restriction of `affinity` to a non-zero `mask`.
fn restrict(affinity: u64, mask: u64) -> u64 {
    if mask == 0 { affinity } else { affinity & mask }
}

/// Rules M7 and M8 for every message: where each goes, or the failure.
/// `except`: the group being moved.
pub(super) fn message_plan(
    shadow: &Shadow,
    messages: &MessageResource,
    restriction: u64,
    except: Option<Handle>,
) -> Result<Vec<Planned>, Violation> {
    let allowed = restrict(
        messages.affinity & shadow.topo.group_online(messages.group),
        restriction,
    );
    if allowed == 0 {
        return Err(Violation::MessageTargetsEmpty);
    }
    let mut planned = Vec::new();
    for k in 0..messages.count {
        let vector = messages.first_vector + k;
        let wanted = ProcessorSet::of_group(messages.group, policy_set(messages, k, allowed));
        let (_, reach) = ref_choose(&shadow.topo, wanted, ProcessorSet::EMPTY)
            .ok_or(Violation::MessageTargetsEmpty)?;
        let Some((group, mask)) = reach.as_group_affinity() else {
            return Err(Violation::MessageTargetsEmpty);
        };
        // Exclusive on every processor: any other connection of the
        // vector refuses it.
        let taken = shadow.vector_union(vector, except);
        if !taken.is_empty() {
            let cpu = (reach & taken).first().or(reach.first()).unwrap_or(0);
            return Err(Violation::SharingConflict { cpu });
        }
        planned.push(Planned {
            vector,
            mode: InterruptMode::Latched,
            share: false,
            mask,
            group,
            message: Some(k),
        });
    }
    Ok(planned)
}

/// `docs/semantics.md`'s CONNECT_EX rules, in order, as this harness reads
/// them.
pub(super) fn expected_ex(
    req: &ConnectExRequest,
    shadow: &Shadow,
    devices: &DeviceTable,
) -> Result<ExpectedEx, ExRefusal> {
    use connect_version::{FULLY_SPECIFIED, FULLY_SPECIFIED_GROUP, LINE_BASED, MESSAGE_BASED};
    if !(1..=4).contains(&req.version) {
        return Err(Violation::UnknownConnectVersion.into());
    }
    let table = req.message_table != 0 || req.message_table_length != 0;
    let fully_fields = req.vector != 0
        || req.irql != 0
        || req.interrupt_mode != InterruptMode::LevelSensitive
        || req.share_vector;
    let fallback = req.fallback_service_routine != 0;
    let unused = match req.version {
        FULLY_SPECIFIED => req.group != 0 || fallback || table,
        FULLY_SPECIFIED_GROUP => fallback || table,
        LINE_BASED => fully_fields || req.group != 0 || fallback || table,
        _ => fully_fields || req.group != 0,
    };
    if unused {
        return Err(Violation::UnusedInputNotZero.into());
    }
    if req.version == FULLY_SPECIFIED || req.version == FULLY_SPECIFIED_GROUP {
        if req.group >= shadow.topo.group_count() {
            return Err(Violation::GroupNotPresent.into());
        }
        let classic = req.classic();
        let mask = expected_verdict(&classic, req.group, shadow, devices).map_err(|v| match v {
            Violation::EmptyEffectiveMask => Violation::EmptyEffectiveMaskEx,
            v => v,
        })?;
        return Ok(ExpectedEx {
            version_used: req.version,
            unified_irql: req.synchronize_irql,
            planned: vec![Planned {
                vector: req.vector as u8,
                mode: req.interrupt_mode,
                share: req.share_vector,
                mask,
                group: req.group,
                message: None,
            }],
            table_required: 0,
        });
    }
    let device = devices
        .devices()
        .iter()
        .find(|d| d.id() == req.device_id)
        .ok_or(ExRefusal::from(Violation::UnknownDevice))?;
    let line_based = |routine: u64| -> Result<ExpectedEx, Violation> {
        if device.resources().is_empty() {
            return Err(Violation::NoLineResources);
        }
        let highest = device
            .resources()
            .iter()
            .map(|r| r.vector >> 4)
            .max()
            .unwrap_or(0);
        let unified = if req.spin_lock == 0 {
            highest
        } else {
            req.synchronize_irql
        };
        let mut planned = Vec::new();
        for r in device.resources() {
            let member = ConnectRequest {
                device_id: req.device_id,
                vector: u32::from(r.vector),
                irql: r.vector >> 4,
                synchronize_irql: unified,
                interrupt_mode: r.mode,
                share_vector: r.share == ShareDisposition::Shared,
                floating_save: req.floating_save,
                processor_enable_mask: restrict(r.affinity, req.processor_enable_mask),
                service_routine: routine,
                service_context: req.service_context,
                spin_lock: req.spin_lock,
                version: LINE_BASED,
            };
            let mask = expected_verdict(&member, r.group, shadow, devices)?;
            planned.push(Planned {
                vector: r.vector,
                mode: r.mode,
                share: member.share_vector,
                mask,
                group: r.group,
                message: None,
            });
        }
        let objects = shadow.objects() + planned.iter().map(|p| p.mask.count_ones()).sum::<u32>();
        if objects > shadow.quota {
            return Err(Violation::QuotaExceeded);
        }
        Ok(ExpectedEx {
            version_used: LINE_BASED,
            unified_irql: unified,
            planned,
            table_required: 0,
        })
    };
    if req.version == LINE_BASED {
        return line_based(req.service_routine).map_err(ExRefusal::from);
    }
    debug_assert_eq!(req.version, MESSAGE_BASED);
    let Some(messages) = device.messages() else {
        if !fallback {
            return Err(Violation::NoMessages.into());
        }
        return line_based(req.fallback_service_routine).map_err(ExRefusal::from);
    };
    if req.service_routine == 0 {
        return Err(Violation::NullServiceRoutine.into());
    }
    if req.service_context != 0 && !resident(req.service_context, SERVICE_CONTEXT_PROBE) {
        return Err(Violation::ServiceContextNotResident.into());
    }
    if req.spin_lock != 0 && !resident(req.spin_lock, SPIN_LOCK_SIZE) {
        return Err(Violation::SpinLockNotResident.into());
    }
    // From rule M5 on, a refusal answers the table's size.
    let required = 8 + 40 * u32::from(messages.count);
    let refuse = |violation| {
        Err(ExRefusal {
            violation,
            table_required: required,
        })
    };
    if let Err(v) = table_verdict(req.message_table, req.message_table_length, required) {
        return refuse(v);
    }
    let class = messages.first_vector >> 4;
    let unified = if req.spin_lock == 0 {
        class
    } else if req.synchronize_irql < class {
        return refuse(Violation::SynchronizeIrqlBelowIrql);
    } else if req.synchronize_irql > HIGH_LEVEL {
        return refuse(Violation::SynchronizeIrqlAboveHighLevel);
    } else {
        req.synchronize_irql
    };
    let planned = match message_plan(shadow, messages, req.processor_enable_mask, None) {
        Ok(p) => p,
        Err(v) => return refuse(v),
    };
    let objects = shadow.objects() + planned.iter().map(|p| p.mask.count_ones()).sum::<u32>();
    if objects > shadow.quota {
        return refuse(Violation::QuotaExceeded);
    }
    Ok(ExpectedEx {
        version_used: MESSAGE_BASED,
        unified_irql: unified,
        planned,
        table_required: required,
    })
}

/// Rule M5 on a table buffer at `table` of `length` bytes.
pub(super) fn table_verdict(table: u64, length: u32, required: u32) -> Result<(), Violation> {
    if length < required {
        return Err(Violation::TableTooSmall);
    }
    let block_end = BLOCK.start + BLOCK.len;
    let table_end = table.checked_add(u64::from(required));
    let usable = table.is_multiple_of(MESSAGE_TABLE_ALIGN)
        && table_end
            .is_some_and(|end| end <= RAM_SIZE && (end <= BLOCK.start || table >= block_end));
    if usable {
        Ok(())
    } else {
        Err(Violation::TableNotUsable)
    }
}

/// What RETARGET is expected to do: each line or message's new mask (the
/// shadow's order), or the first failing rule (RT1..RT5, R, 9, 11).
pub(super) fn expected_retarget(
    handle: Handle,
    group: u16,
    mask: u64,
    table: (u64, u32),
    shadow: &Shadow,
    devices: &DeviceTable,
) -> Result<Vec<(usize, u64)>, Violation> {
    let members: Vec<(usize, &Live)> = shadow
        .live
        .iter()
        .enumerate()
        .filter(|(_, c)| c.handle == handle)
        .collect();
    let Some(&(_, lead)) = members.first() else {
        return Err(Violation::UnknownHandle);
    };
    if members.iter().any(|(_, c)| c.group != group) {
        return Err(Violation::RetargetGroupMismatch);
    }
    if mask == 0 || mask & !shadow.topo.group_present(group) != 0 {
        return Err(Violation::ProcessorsOutsideVm);
    }
    let message_based = lead.version == connect_version::MESSAGE_BASED;
    if message_based {
        table_verdict(table.0, table.1, 8 + 40 * members.len() as u32)?;
    } else if table != (0, 0) {
        return Err(Violation::RetargetTableMismatch);
    }
    let online = mask & shadow.topo.group_online(group);
    if online == 0 {
        return Err(Violation::RetargetMaskEmpty);
    }
    let mut out = Vec::new();
    if message_based {
        let messages = devices
            .device(lead.device)
            .and_then(|d| d.messages())
            .ok_or(Violation::UnknownHandle)?;
        let planned =
            message_plan(shadow, messages, online, Some(handle)).map_err(|v| match v {
                Violation::MessageTargetsEmpty => Violation::RetargetMaskEmpty,
                v => v,
            })?;
        for (i, c) in members.iter().map(|(i, c)| (*i, c)) {
            let p = planned
                .iter()
                .find(|p| p.message == c.message)
                .ok_or(Violation::RetargetMaskEmpty)?;
            out.push((i, p.mask));
        }
    } else {
        for (i, c) in members.iter().map(|(i, c)| (*i, *c)) {
            let wanted = if c.version == connect_version::LINE_BASED {
                let affinity = devices
                    .device(c.device)
                    .and_then(|d| d.resources().iter().find(|r| r.vector == c.vector))
                    .map_or(0, |r| r.affinity);
                affinity & online
            } else {
                online
            };
            if wanted == 0 {
                return Err(Violation::RetargetMaskEmpty);
            }
            let effective = route_and_chain(
                shadow,
                c.vector,
                c.irql,
                c.mode,
                c.share,
                ProcessorSet::of_group(group, wanted),
                Some(handle),
            )?;
            out.push((i, effective.group_mask(group)));
        }
    }
    let now: u32 = members.iter().map(|(_, c)| c.mask.count_ones()).sum();
    let after: u32 = out.iter().map(|(_, m)| m.count_ones()).sum();
    if after > now && shadow.objects() + (after - now) > shadow.quota {
        return Err(Violation::QuotaExceeded);
    }
    Ok(out)
}

/// The destination chooser against the APIC bus: for random platforms,
/// models and masks, [`crate::destination::Topology::choose`] agrees with
/// [`ref_choose`], its reach lies in the mask and is exactly where the bus
/// delivers its destination, and (on small platforms, by trying every
/// destination a route can carry) no destination reaches more.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::Topology;
    use crate::platform::{IrqchipMode, PlatformFacts};
    use proptest::prelude::*;

    const MODELS: [ApicModel; 5] = [
        ApicModel::Undeclared,
        ApicModel::X2apic,
        ApicModel::XapicFlat,
        ApicModel::XapicCluster,
        ApicModel::Physical,
    ];
    const MODES: [IrqchipMode; 3] = [IrqchipMode::Kernel, IrqchipMode::Split, IrqchipMode::User];

    /// A platform of `cpus` processors; `stride` spreads the APIC IDs
    /// (x2APIC only: xAPIC IDs stay below 0xFF).
    fn platform(cpus: u32, mode: usize, x2apic: bool, stride: u32) -> Platform {
        let mut facts = PlatformFacts::uniform(cpus);
        facts.irqchip_mode = MODES[mode % MODES.len()];
        facts.x2apic = x2apic;
        let stride = if x2apic || cpus * stride < 0xff {
            stride
        } else {
            1
        };
        facts.apic_ids = (0..cpus).map(|i| i * stride).collect();
        Platform::new(facts).unwrap()
    }

    fn set_of(words: [u64; 4], cpus: u32) -> ProcessorSet {
        (0..cpus)
            .filter(|&p| words[(p / 64) as usize] >> (p % 64) & 1 == 1)
            .collect()
    }

    /// The processors the bus delivers `destination` to, `None` when the
    /// readings disagree.
    fn on_bus(topo: &Topo, destination: &ApicDestination) -> Option<ProcessorSet> {
        let message = destination.edge_message(0x40)?;
        bus_reach(topo, &message).ok()
    }

    #[derive(Debug)]
    struct Case {
        platform: Platform,
        model: ApicModel,
        wanted: ProcessorSet,
        fixed: ProcessorSet,
    }

    fn case(max_cpus: u32) -> impl Strategy<Value = Case> {
        (
            1..=max_cpus,
            0usize..3,
            any::<bool>(),
            1u32..=2,
            0usize..MODELS.len(),
            any::<[u64; 4]>(),
            any::<[u64; 4]>(),
            0u32..4,
        )
            .prop_map(
                move |(cpus, mode, x2apic, stride, model, wanted, other, shape)| {
                    let platform = platform(cpus, mode, x2apic, stride);
                    let model = MODELS[model];
                    // Sparse masks too: a mask of a few processors is where
                    // clusters and ties matter.
                    let thin = |w: [u64; 4]| w.map(|x| x & x.rotate_left(17) & x.rotate_left(31));
                    let wanted = set_of(if shape & 1 == 1 { thin(wanted) } else { wanted }, cpus);
                    // What a shared vector's other connections hold: the
                    // reach of another choice, or nothing.
                    let fixed = if shape & 2 == 2 {
                        Topology::new(&platform, model)
                            .choose(set_of(thin(other), cpus), ProcessorSet::EMPTY)
                            .map_or(ProcessorSet::EMPTY, |c| c.reach)
                    } else {
                        ProcessorSet::EMPTY
                    };
                    Case {
                        platform,
                        model,
                        wanted,
                        fixed,
                    }
                },
            )
    }

    /// Every destination a route of the platform can carry that the rule
    /// allows for the case, with its reach on the bus.
    fn allowed(c: &Case, topo: &Topo) -> Vec<(ApicDestination, ProcessorSet)> {
        let pool = (c.wanted & c.platform.present()) | c.fixed;
        let max_id = c.platform.apic_ids().iter().copied().max().unwrap_or(0);
        // Bits above the highest APIC ID name nobody more: the enumeration
        // stops there. xAPIC destinations are 8 bits (module documentation
        // of `crate::destination`).
        let x2apic = topo.readings.iter().flatten().any(|t| t.x2apic);
        let bits = if x2apic { (max_id + 1).max(8) } else { 8 };
        let limit = 1u32 << topo.width.min(bits);
        let mut out = Vec::new();
        for d in 0..limit {
            for dest in [
                ApicDestination::Logical {
                    destination: d,
                    lowest_priority: false,
                },
                ApicDestination::Physical { apic_id: d },
            ] {
                let Some(reach) = on_bus(topo, &dest) else {
                    continue;
                };
                // A physical destination reaching more than one processor
                // is the broadcast, which delivers to all of them (no
                // arbitration): never a route. The logical broadcast only
                // as the encoding of every processor (`crate::destination`).
                // Undeclared: only processors whose readings agree (a
                // destination whose bits happen to reach the same
                // processors under both readings is not sought).
                let usable = match dest {
                    ApicDestination::Physical { .. } => reach.len() == 1,
                    _ if d == XAPIC_BROADCAST => {
                        let members: Option<Vec<(u32, u32)>> = topo
                            .present
                            .iter()
                            .map(|p| logical_member(topo, p))
                            .collect();
                        members.is_some_and(|m| {
                            m.iter().all(|&(c, _)| c == 0)
                                && m.iter().fold(0, |a, &(_, b)| a | b) == XAPIC_BROADCAST
                        })
                    }
                    _ => reach.iter().all(|p| logical_member(topo, p).is_some()),
                };
                if usable
                    && !reach.is_empty()
                    && reach.as_group_affinity().is_some()
                    && reach.is_subset(&pool)
                    && c.fixed.is_subset(&reach)
                    && !(reach & c.wanted).is_empty()
                {
                    out.push((dest, reach));
                }
            }
        }
        out
    }

    fn check(c: &Case) -> Result<Option<ProcessorSet>, TestCaseError> {
        let topology = Topology::new(&c.platform, c.model);
        let topo = Topo::new(&c.platform, c.model);
        let chosen = topology.choose(c.wanted, c.fixed);
        let reference = ref_choose(&topo, c.wanted, c.fixed);
        prop_assert_eq!(
            chosen.as_ref().map(|c| (c.destination, c.reach)),
            reference,
            "chooser and reference differ"
        );
        let Some(chosen) = chosen else {
            return Ok(None);
        };
        prop_assert!(chosen.reach.is_subset(&(c.wanted | c.fixed)));
        prop_assert!(c.fixed.is_subset(&chosen.reach));
        prop_assert_eq!(on_bus(&topo, &chosen.destination), Some(chosen.reach));
        prop_assert_eq!(topology.reach(&chosen.destination), chosen.reach);
        Ok(Some(chosen.reach))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn choice_lies_in_the_mask_and_is_where_the_bus_delivers(c in case(255)) {
            check(&c)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Largest set, then the lowest first processor, then logical:
        /// checked against every destination a route can carry.
        #[test]
        fn no_destination_reaches_more(c in case(16)) {
            let chosen = check(&c)?;
            let topo = Topo::new(&c.platform, c.model);
            let allowed = allowed(&c, &topo);
            let best = allowed.iter().map(|(_, r)| r.len()).max();
            prop_assert_eq!(chosen.map(|r| r.len()), best);
            if let (Some(reach), Some(best)) = (chosen, best) {
                let first = allowed
                    .iter()
                    .filter(|(_, r)| r.len() == best)
                    .filter_map(|(_, r)| r.first())
                    .min();
                prop_assert_eq!(reach.first(), first);
                let logical = allowed
                    .iter()
                    .any(|(d, r)| *r == reach && matches!(d, ApicDestination::Logical { .. }));
                let chose_logical = matches!(
                    Topology::new(&c.platform, c.model).choose(c.wanted, c.fixed).map(|c| c.destination),
                    Some(ApicDestination::Logical { .. })
                );
                prop_assert_eq!(chose_logical, logical);
            }
        }
    }
}
