//! Arbitrary guest memory and doorbell writes through the path the VMM
//! calls, [`Service::handle_doorbell`], with every answer checked.
//!
//! Input format ([`run`]):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | bits 0..2: object quota (64, 1, 2, 3, 4, 8, 16, 2^20); bits 3..4: RAM base (0, 0x1000, 0x10_0000, 0xffff_0000) |
//! | 1 | 0: all RAM writable; `w`: the host cannot write `base + 0x40 w .. + 0x40` (an answer there is lost) |
//! | 2.. | a [`super::run_session`] input: platform, step count, steps, RAM |
//!
//! Checked after every doorbell:
//!
//! - an answered request wrote a defined NTSTATUS into its `status` field,
//!   touched no byte outside its block and none of the header's other
//!   fields; a refused one changed nothing in the service; an unreadable one
//!   changed nothing at all; an unwritable one left the live state as it was;
//! - a successful CONNECT wrote a live, new handle and its effective mask;
//!   a successful CONNECT_EX wrote a live, new connection or group handle,
//!   its count, mask and version, and (MESSAGE_BASED) a message table that
//!   is exactly its messages' programming, the one write allowed outside
//!   the block; a refused CONNECT_EX wrote `message_table_required` only
//!   with STATUS_BUFFER_TOO_SMALL; a successful DISCONNECT or DISCONNECT_EX
//!   killed its handle (the whole group); a successful RETARGET left the
//!   same lines or messages under the same handle, in the request's group
//!   and inside its mask's online processors, every other connection
//!   untouched, answered their union and count, and (MESSAGE_BASED)
//!   rewrote the table with the new programming; a successful
//!   SET_APIC_MODEL found no connection and set the model asked for; a
//!   QUERY_ROUTE version 2 answer is the pin's route (group, destination
//!   mode and ID); the route and message updates returned are exactly what
//!   changed;
//! - a block is as long as its header's ABI version and opcode say
//!   (`request_size`): nothing past it is written;
//! - [`Service::check_invariants`] holds (checked whenever the service
//!   changed); a handle is never accepted after its disconnect;
//! - memory stays bounded: live connections, registry slots and free slots
//!   never exceed the object quota, whatever the guest sends.

use core::mem::{offset_of, size_of};

use irqconnect_abi::ntstatus::{
    STATUS_BUFFER_TOO_SMALL, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_DEVICE_REQUEST,
    STATUS_INVALID_DEVICE_STATE, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
    STATUS_INVALID_PARAMETER_1, STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND, STATUS_SUCCESS,
};
use irqconnect_abi::pv::{
    ABI_VERSION_2, Connect, ConnectEx, Disconnect, DisconnectEx, MessageInfoEntry,
    MessageTableHeader, QueryRouteV2, RequestHeader, Retarget, SetApicModel, connect_version,
    message_table_size, opcode, request_size, route_destination,
};
use zerocopy::FromBytes;

use super::COPY_HANDLE_TAG;
use super::ram::HarnessRam;
use crate::destination::{ApicDestination, ApicModel};
use crate::devices::DeviceTable;
use crate::handle::Handle;
use crate::platform::{DEFAULT_OBJECT_QUOTA, MAX_OBJECT_QUOTA, Platform};
use crate::registry::Connection;
use crate::request::Outcome;
use crate::service::Service;

const QUOTAS: [u32; 8] = [DEFAULT_OBJECT_QUOTA, 1, 2, 3, 4, 8, 16, MAX_OBJECT_QUOTA];
const BASES: [u64; 4] = [0, 0x1000, 0x10_0000, 0xffff_0000];
const DEFINED_STATUSES: [u32; 10] = [
    STATUS_SUCCESS,
    STATUS_INVALID_DEVICE_STATE,
    STATUS_INVALID_HANDLE,
    STATUS_INVALID_PARAMETER,
    STATUS_INVALID_DEVICE_REQUEST,
    STATUS_INSUFFICIENT_RESOURCES,
    STATUS_INVALID_PARAMETER_1,
    STATUS_NOT_FOUND,
    STATUS_BUFFER_TOO_SMALL,
    STATUS_INVALID_PARAMETER_10,
];
const STATUS_AT: usize = offset_of!(RequestHeader, status);

/// Runs the doorbells `data` encodes (see the module documentation). `Err`
/// names the first broken check.
pub fn run(data: &[u8]) -> Result<(), String> {
    let layout = data.first().copied().unwrap_or(0);
    let window = data.get(1).copied().unwrap_or(0);
    let session = data.get(2..).unwrap_or(&[]);
    let quota = QUOTAS[usize::from(layout & 7)];
    let base = BASES[usize::from(layout >> 3) & 3];
    let facts = super::session_platform(session.first().copied().unwrap_or(0));
    let steps = usize::from(session.get(1).copied().unwrap_or(0));
    let rest = session.get(2..).unwrap_or(&[]);
    let steps_len = (steps * 4).min(rest.len() / 4 * 4);
    let (step_bytes, memory) = rest.split_at(steps_len);
    let platform = Platform::new(facts).map_err(|e| format!("platform: {e}"))?;
    let devices = DeviceTable::default_for(&platform);
    let mut service =
        Service::new(platform, devices, quota).map_err(|e| format!("service: {e}"))?;
    service
        .check_invariants()
        .map_err(|what| format!("a fresh service breaks an invariant: {what}"))?;
    let read_only = (window != 0).then(|| {
        let start = base + 0x40 * u64::from(window);
        start..start + 0x40
    });
    let mut ram = HarnessRam::new(base, memory.to_vec(), read_only);
    let mut last_handle: Option<Handle> = None;
    let mut dead: Vec<Handle> = Vec::new();
    for (n, chunk) in step_bytes.chunks_exact(4).enumerate() {
        let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if value & 0xf000_0000 == COPY_HANDLE_TAG {
            if let Some(h) = last_handle {
                let at = base.saturating_add(u64::from(value & 0x0fff_ffff));
                // The guest stores the handle: the host's write protection
                // does not apply.
                let _ = ram.write_as_guest(at, &h.raw().to_le_bytes());
            }
            continue;
        }
        let made = doorbell(&mut service, &mut ram, value, &mut dead)
            .map_err(|what| format!("step {n} (doorbell {value:#x}): {what}"))?;
        if made.is_some() {
            last_handle = made;
        }
    }
    Ok(())
}

/// One doorbell and its checks; returns the handle a CONNECT made.
fn doorbell(
    service: &mut Service,
    ram: &mut HarnessRam,
    value: u32,
    dead: &mut Vec<Handle>,
) -> Result<Option<Handle>, String> {
    let before = service.clone();
    let memory = ram.bytes().to_vec();
    let gpa = u64::from(value);
    let base = ram.base();
    let outcome = service.handle_doorbell(ram, value);
    let mut made = None;
    match &outcome {
        Outcome::Unreadable { gpa: at, .. } => {
            if *at != gpa || ram.bytes() != memory || *service != before {
                return Err(format!(
                    "an unreadable request changed something: {outcome:?}"
                ));
            }
        }
        Outcome::Unwritable { gpa: at } => {
            if *at != gpa
                || !service.same_live_state(&before)
                || service.storm_bits() != before.storm_bits()
            {
                return Err("an unwritable answer left a change behind".into());
            }
        }
        Outcome::Answered(answer) => {
            if !DEFINED_STATUSES.contains(&answer.status) {
                return Err(format!(
                    "status {:#x} is not a defined NTSTATUS",
                    answer.status
                ));
            }
            let block = ram
                .offsets(gpa, size_of::<RequestHeader>())
                .ok_or("an answered block's header is not RAM")?;
            let start = block.start;
            let written = ram.bytes().get(start + STATUS_AT..start + STATUS_AT + 4);
            if written != Some(&answer.status.to_le_bytes()[..]) {
                return Err(format!("status {:#x} was not written", answer.status));
            }
            let header: &[u8] = memory.get(start..start + STATUS_AT).unwrap_or(&[]);
            let u16_at = |offset: usize| {
                memory
                    .get(start + offset..)
                    .and_then(|b| b.get(..2))
                    .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
            };
            let opcode_field = u16_at(offset_of!(RequestHeader, opcode));
            let version_field = u16_at(offset_of!(RequestHeader, abi_version));
            let size =
                request_size(version_field, opcode_field).unwrap_or(size_of::<RequestHeader>());
            let end = start.saturating_add(size.max(size_of::<RequestHeader>()));
            let after = ram.bytes();
            // A successful MESSAGE_BASED CONNECT_EX or RETARGET also writes
            // its table.
            let table = match answer.opcode {
                _ if answer.refusal.is_some() => None,
                opcode::CONNECT_EX => written_table(after, start, base),
                opcode::RETARGET => retarget_table(service, after, start, base),
                _ => None,
            };
            let outside = |range: core::ops::Range<usize>| {
                range
                    .filter(|&i| table.as_ref().is_none_or(|t| !t.contains(&i)))
                    .any(|i| after.get(i) != memory.get(i))
            };
            if outside(0..start)
                || outside(end..after.len().max(memory.len()))
                || after.get(start..start + STATUS_AT) != Some(header)
            {
                return Err("the answer wrote outside its block or over the header".into());
            }
            if answer.refusal.is_some() {
                if *service != before {
                    return Err(format!("refusal {:?} changed the service", answer.refusal));
                }
                if answer.status == STATUS_SUCCESS {
                    return Err("a refusal answered STATUS_SUCCESS".into());
                }
                if !answer.messages.is_empty() {
                    return Err("a refusal programmed messages".into());
                }
                // A malformed block (rule 1) answers only its status.
                if answer.opcode == opcode::CONNECT_EX
                    && matches!(answer.refusal, Some(crate::request::Refusal::Rule(_)))
                {
                    check_refused_ex(service, after, start, answer.status)?;
                }
            } else if answer.status != STATUS_SUCCESS {
                return Err(format!("success answered {:#x}", answer.status));
            } else if answer.opcode == opcode::CONNECT {
                made = Some(check_connected(service, &before, after, start)?);
            } else if answer.opcode == opcode::CONNECT_EX {
                made = Some(check_connected_ex(
                    service, &before, after, start, base, answer,
                )?);
            } else if answer.opcode == opcode::RETARGET {
                let block: Retarget = read_block(after, start)?;
                let table = retarget_table(service, after, start, base)
                    .map(|range| after.get(range).ok_or("the table is outside RAM"))
                    .transpose()?;
                check_retargeted(service, &before, &block, table, answer)?;
            } else if answer.opcode == opcode::SET_APIC_MODEL {
                check_model_set(service, &before, after, start)?;
            } else if answer.opcode == opcode::DISCONNECT || answer.opcode == opcode::DISCONNECT_EX
            {
                let at = start
                    + if answer.opcode == opcode::DISCONNECT {
                        offset_of!(Disconnect, handle)
                    } else {
                        offset_of!(DisconnectEx, handle)
                    };
                let handle = read_u64(after, at).map(Handle::from_raw);
                match handle {
                    Some(h)
                        if service.registry().get(h).is_none()
                            && before.registry().get(h).is_some() =>
                    {
                        dead.push(h);
                    }
                    _ => {
                        return Err(format!(
                            "DISCONNECT of {handle:x?} succeeded but the handle was not live then dead"
                        ));
                    }
                }
                let unprogrammed = answer.messages.iter().all(|u| u.route.is_none());
                let messages_before = before
                    .registry()
                    .iter()
                    .filter(|(_, c)| c.message.is_some())
                    .count();
                let messages_after = service
                    .registry()
                    .iter()
                    .filter(|(_, c)| c.message.is_some())
                    .count();
                if !unprogrammed || answer.messages.len() != messages_before - messages_after {
                    return Err(format!(
                        "DISCONNECT answered message updates {:?}",
                        answer.messages
                    ));
                }
            } else if *service != before {
                return Err(format!(
                    "query opcode {} changed the service",
                    answer.opcode
                ));
            } else if answer.opcode == opcode::QUERY_ROUTE && version_field == ABI_VERSION_2 {
                check_route_v2(service, after, start)?;
            }
            if answer.refusal.is_none()
                && service.message_programming() != expected_programming(&before, answer)
            {
                return Err("the message updates are not what changed".into());
            }
            for pin in 0..irqconnect_abi::layout::IOAPIC_PINS {
                let updated = answer.routes.iter().find(|u| u.pin == pin);
                let changed = service.route(pin) != before.route(pin);
                match updated {
                    Some(u) if Some(u.route) != service.route(pin) => {
                        return Err(format!("update {u:?} is not pin {pin}'s route"));
                    }
                    None if changed => {
                        return Err(format!("pin {pin}'s route changed without an update"));
                    }
                    _ => {}
                }
            }
        }
    }
    // A service equal to the one before keeps its invariants (checked
    // when it was built): only a change needs the (costly) full check.
    if *service != before {
        service
            .check_invariants()
            .map_err(|what| format!("invariant broken: {what}"))?;
    }
    for h in dead.iter() {
        if service.registry().get(*h).is_some() {
            return Err(format!(
                "handle {:#x} accepted after its disconnect",
                h.raw()
            ));
        }
    }
    for (h, _) in before.registry().iter() {
        if service.registry().get(h).is_none() && !dead.contains(&h) {
            dead.push(h);
        }
    }
    check_footprint(service)?;
    Ok(made)
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut raw = [0u8; 8];
    raw.copy_from_slice(b);
    Some(u64::from_le_bytes(raw))
}

fn check_connected(
    service: &Service,
    before: &Service,
    after: &[u8],
    start: usize,
) -> Result<Handle, String> {
    let handle = read_u64(after, start + offset_of!(Connect, handle)).map(Handle::from_raw);
    let mask = read_u64(after, start + offset_of!(Connect, effective_mask));
    let (Some(handle), Some(mask)) = (handle, mask) else {
        return Err("CONNECT succeeded without writing its outputs".into());
    };
    let live = service.registry().get(handle);
    if live.is_none_or(|c| c.mask != mask) || before.registry().get(handle).is_some() {
        return Err(format!(
            "CONNECT wrote handle {:#x} mask {mask:#x}, registry holds {live:?}",
            handle.raw()
        ));
    }
    let grew = service.registry().objects_in_use() - before.registry().objects_in_use();
    if grew != mask.count_ones() || mask & !service.platform().online_mask() != 0 || mask == 0 {
        return Err(format!("CONNECT of mask {mask:#x} added {grew} objects"));
    }
    Ok(handle)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Where a MESSAGE_BASED CONNECT_EX at `start` put its table (RAM offsets),
/// from the block's inputs and `message_table_required`.
fn written_table(after: &[u8], start: usize, base: u64) -> Option<core::ops::Range<usize>> {
    let version = read_u32(after, start + offset_of!(ConnectEx, version_used))?;
    if version != connect_version::MESSAGE_BASED {
        return None;
    }
    let at = read_u64(after, start + offset_of!(ConnectEx, message_table))?;
    let len = read_u32(after, start + offset_of!(ConnectEx, message_table_required))?;
    let from = usize::try_from(at.checked_sub(base)?).ok()?;
    Some(from..from.checked_add(len as usize)?)
}

/// A refused CONNECT_EX answered zeros, except the table size, which is
/// the device's with STATUS_BUFFER_TOO_SMALL and after any rule from M5 on
/// (so 0 or the device's otherwise).
fn check_refused_ex(
    service: &Service,
    after: &[u8],
    start: usize,
    status: u32,
) -> Result<(), String> {
    let outputs = after
        .get(start + offset_of!(ConnectEx, version_used)..start + size_of::<ConnectEx>())
        .ok_or("a refused CONNECT_EX block is not RAM")?;
    let required = read_u32(after, start + offset_of!(ConnectEx, message_table_required));
    let others = outputs
        .iter()
        .enumerate()
        .filter(|(i, _)| !(4..8).contains(i))
        .all(|(_, &b)| b == 0);
    let version = read_u32(after, start + offset_of!(ConnectEx, version));
    let device = read_u32(after, start + offset_of!(ConnectEx, device_id)).unwrap_or(u32::MAX);
    let size = match service.query_messages(device) {
        Some(q) if version == Some(connect_version::MESSAGE_BASED) => q.table_size,
        _ => 0,
    };
    let required_ok = if status == STATUS_BUFFER_TOO_SMALL {
        size > 0 && required == Some(size)
    } else {
        required == Some(0) || required == Some(size)
    };
    if others && required_ok {
        Ok(())
    } else {
        Err(format!(
            "a refused CONNECT_EX ({status:#x}) left outputs {outputs:?}"
        ))
    }
}

/// A successful CONNECT_EX: its handle names a new connection or group
/// holding `count` connections whose masks make `effective_mask` and the
/// objects added; a MESSAGE_BASED table is the connections' routes.
fn check_connected_ex(
    service: &Service,
    before: &Service,
    after: &[u8],
    start: usize,
    base: u64,
    answer: &crate::request::Answer,
) -> Result<Handle, String> {
    let field = |offset: usize| read_u64(after, start + offset);
    let (Some(handle), Some(mask)) = (
        field(offset_of!(ConnectEx, handle)).map(Handle::from_raw),
        field(offset_of!(ConnectEx, effective_mask)),
    ) else {
        return Err("CONNECT_EX succeeded without writing its outputs".into());
    };
    let count = read_u32(after, start + offset_of!(ConnectEx, count)).unwrap_or(0);
    let version = read_u32(after, start + offset_of!(ConnectEx, version_used)).unwrap_or(0);
    let members = members_of(service, handle);
    let union = members.iter().fold(0, |m, c| m | c.mask);
    let objects: u32 = members.iter().map(|c| c.objects()).sum();
    let grew = service.registry().objects_in_use() - before.registry().objects_in_use();
    if before.registry().get(handle).is_some()
        || members.len() != count as usize
        || members.iter().any(|c| c.version != version)
        || union != mask
        || grew != objects
        || mask & !service.platform().online_mask() != 0
    {
        return Err(format!(
            "CONNECT_EX wrote handle {:#x} mask {mask:#x} count {count} version {version}, registry holds {members:?}",
            handle.raw()
        ));
    }
    if version == connect_version::MESSAGE_BASED {
        let range = written_table(after, start, base).ok_or("no table for MESSAGE_BASED")?;
        let bytes = after.get(range).ok_or("the table is outside RAM")?;
        check_table(bytes, &members, answer)?;
    }
    Ok(handle)
}

/// A message table as written (`bytes`) describes `members` (one entry
/// each, in order) exactly as `answer` programmed them.
fn check_table(
    bytes: &[u8],
    members: &[Connection],
    answer: &crate::request::Answer,
) -> Result<(), String> {
    let head = MessageTableHeader::read_from_prefix(bytes)
        .map_err(|_| "short table")?
        .0;
    if bytes.len() != message_table_size(members.len())
        || head.message_count as usize != members.len()
        || answer.messages.len() != members.len()
    {
        return Err("the table's size or count is wrong".into());
    }
    let entries = bytes.get(size_of::<MessageTableHeader>()..).unwrap_or(&[]);
    for ((chunk, c), u) in entries
        .chunks_exact(size_of::<MessageInfoEntry>())
        .zip(members)
        .zip(&answer.messages)
    {
        let e = MessageInfoEntry::read_from_bytes(chunk).map_err(|_| "bad entry")?;
        let route = u.route.ok_or("a connected message is unprogrammed")?;
        if e.target_processor_set != c.mask
            || route.targets != c.mask
            || (e.message_address, e.message_data) != (route.address, route.data)
            || e.vector != u32::from(c.vector)
            || Some(e.message_id as u8) != c.message
            || head.unified_irql != c.synchronize_irql
        {
            return Err(format!("table entry {e:?} disagrees with {c:?} and {u:?}"));
        }
    }
    Ok(())
}

/// The connections a handle names: a group's members, or the connection.
fn members_of(service: &Service, handle: Handle) -> Vec<Connection> {
    match service.registry().group(handle) {
        Some(g) => g.into_iter().copied().collect(),
        None => service
            .registry()
            .get(handle)
            .into_iter()
            .copied()
            .collect(),
    }
}

/// Where a successful RETARGET of a MESSAGE_BASED connection at `start`
/// rewrote its table (RAM offsets).
fn retarget_table(
    service: &Service,
    after: &[u8],
    start: usize,
    base: u64,
) -> Option<core::ops::Range<usize>> {
    let handle = Handle::from_raw(read_u64(after, start + offset_of!(Retarget, handle))?);
    let members = members_of(service, handle);
    if !members.iter().any(|c| c.message.is_some()) {
        return None;
    }
    let at = read_u64(after, start + offset_of!(Retarget, message_table))?;
    let from = usize::try_from(at.checked_sub(base)?).ok()?;
    Some(from..from.checked_add(message_table_size(members.len()))?)
}

/// A successful RETARGET: the same connections under the same handle, now
/// in the request's group and inside its mask (online processors), each
/// other connection untouched; the answer's mask is their union and its
/// count theirs; the objects follow the masks; a MESSAGE_BASED table is the
/// new programming (`table`, as written).
fn check_retargeted(
    service: &Service,
    before: &Service,
    block: &Retarget,
    table: Option<&[u8]>,
    answer: &crate::request::Answer,
) -> Result<(), String> {
    let handle = Handle::from_raw(block.handle);
    let (old, new) = (members_of(before, handle), members_of(service, handle));
    let online = service.platform().group_online(block.group);
    let union = new.iter().fold(0, |m, c| m | c.mask);
    let objects = |cs: &[Connection]| cs.iter().map(|c| c.objects()).sum::<u32>();
    let grew = i64::from(service.registry().objects_in_use())
        - i64::from(before.registry().objects_in_use());
    let same_lines = old.len() == new.len()
        && old
            .iter()
            .zip(&new)
            .all(|(o, n)| (o.device, o.vector, o.message) == (n.device, n.vector, n.message));
    if old.is_empty()
        || !same_lines
        || new.iter().any(|c| {
            c.group != block.group || c.mask == 0 || c.mask & !(block.processor_mask & online) != 0
        })
        || block.effective_mask != union
        || block.count as usize != new.len()
        || grew != i64::from(objects(&new)) - i64::from(objects(&old))
    {
        return Err(format!(
            "RETARGET {block:?} answered, connections {old:?} became {new:?}"
        ));
    }
    let group: Vec<Handle> = before
        .registry()
        .group_members(handle)
        .map_or_else(Vec::new, |g| g.into_iter().map(|(h, _)| h).collect());
    let moved = |h: Handle| h == handle || group.contains(&h);
    for (h, c) in before.registry().iter() {
        if !moved(h) && service.registry().get(h) != Some(c) {
            return Err(format!("RETARGET of {handle:?} changed connection {h:?}"));
        }
    }
    if let Some(bytes) = table {
        check_table(bytes, &new, answer)?;
    }
    Ok(())
}

/// A successful SET_APIC_MODEL: no connection was live, the model is the
/// one asked for, nothing else changed.
fn check_model_set(
    service: &Service,
    before: &Service,
    after: &[u8],
    start: usize,
) -> Result<(), String> {
    let block: SetApicModel = read_block(after, start)?;
    let asked = ApicModel::from_abi(block.model);
    if before.registry().connections() != 0
        || Some(service.topology().model()) != asked
        || service.registry() != before.registry()
        || service.routes() != before.routes()
    {
        return Err(format!(
            "SET_APIC_MODEL {:?} accepted: model {:?}, {} connections before",
            block.model,
            service.topology().model(),
            before.registry().connections()
        ));
    }
    Ok(())
}

/// The answered block of type `T` at RAM offset `start`.
fn read_block<T: FromBytes>(after: &[u8], start: usize) -> Result<T, String> {
    let bytes = after
        .get(start..start.saturating_add(size_of::<T>()))
        .ok_or_else(|| format!("an answered {} is not RAM", core::any::type_name::<T>()))?;
    T::read_from_bytes(bytes).map_err(|_| "a short block".into())
}

/// A QUERY_ROUTE version 2 answer is the pin's route.
fn check_route_v2(service: &Service, after: &[u8], start: usize) -> Result<(), String> {
    let block: QueryRouteV2 = read_block(after, start)?;
    let route = u8::try_from(block.base.pin)
        .ok()
        .and_then(|pin| service.route(pin))
        .ok_or("QUERY_ROUTE succeeded for a pin without a route")?;
    let (mode, id) = match route.target {
        ApicDestination::Logical { destination, .. } => (route_destination::LOGICAL, destination),
        ApicDestination::Physical { apic_id } => (route_destination::PHYSICAL, apic_id),
        ApicDestination::None => (route_destination::NONE, 0),
    };
    if block.base.destination_mask != route.destination
        || block.group != route.group
        || (block.destination_mode, block.apic_destination) != (mode, id)
        || block.base.masked != u8::from(route.masked)
    {
        return Err(format!("QUERY_ROUTE version 2 {block:?} is not {route:?}"));
    }
    Ok(())
}

/// The message programming after `answer`, from the programming before.
fn expected_programming(
    before: &Service,
    answer: &crate::request::Answer,
) -> Vec<crate::messages::MessageUpdate> {
    let mut all = before.message_programming();
    for u in &answer.messages {
        if let Some(slot) = all
            .iter_mut()
            .find(|p| p.device == u.device && p.message == u.message)
        {
            *slot = *u;
        }
    }
    all
}

/// The registry's memory is bounded by the quota, not by the guest.
fn check_footprint(service: &Service) -> Result<(), String> {
    let registry = service.registry();
    let state = registry.to_state();
    let quota = registry.quota() as usize;
    let chained: usize = state.order.iter().map(|o| o.slots.len()).sum();
    if state.slots.len() > quota
        || state.free.len() > state.slots.len()
        || chained > quota
        || registry.connections() as usize > quota
    {
        return Err(format!(
            "footprint beyond the quota {quota}: {} slots, {} free, {chained} chained",
            state.slots.len(),
            state.free.len()
        ));
    }
    Ok(())
}

/// Named seed inputs for [`run`]: the [`super::seed_corpus`] sessions on the
/// default layout, and the connect session with its answer write-protected.
pub fn seed_corpus() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (name, session) in super::seed_corpus() {
        let mut data = vec![0u8, 0u8];
        data.extend_from_slice(&session);
        seeds.push((name.to_string(), data.clone()));
        if name == "connect_route_disconnect" {
            // The DISCONNECT block at 0x780: its status cannot be written.
            data[1] = 0x1e; // 0x1e * 0x40 = 0x780
            seeds.push(("disconnect_answer_unwritable".to_string(), data.clone()));
            // The CONNECT block at 0x700: its status cannot be written.
            data[1] = 0x1c; // 0x1c * 0x40 = 0x700
            seeds.push(("connect_answer_unwritable".to_string(), data.clone()));
            // Quota 1: the 2-processor connect is refused.
            data[0] = 1;
            data[1] = 0;
            seeds.push(("connect_over_quota".to_string(), data));
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_seed_corpus_ok() {
        for (name, data) in seed_corpus() {
            assert_eq!(run(&data), Ok(()), "{name}");
        }
    }

    #[test]
    fn run_empty_and_short_inputs_ok() {
        assert_eq!(run(&[]), Ok(()));
        assert_eq!(run(&[0xff]), Ok(()));
        assert_eq!(run(&[0xff, 0xff, 0xff, 0xff]), Ok(()));
    }
}
