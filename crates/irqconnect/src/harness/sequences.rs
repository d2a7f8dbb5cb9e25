//! Structured connect / disconnect / retarget / assert sequences against a
//! reference of `docs/semantics.md` written for this harness
//! ([`super::reference`]).
//!
//! [`decode`] turns any byte string into a platform and a list of typed
//! operations ([`Sequence`], [`Op`]), the way `arbitrary` would: every
//! input is a valid sequence, and small mutations make small changes.
//! [`check`] runs it through [`Service::connect`], [`Service::connect_ex`],
//! [`Service::retarget`], [`Service::set_apic_model`],
//! [`Service::disconnect`], [`Service::disconnect_ex`],
//! [`Service::report_storm_masked`] and snapshots, beside a shadow list of
//! live connections. Every operation is checked:
//!
//! - each CONNECT is accepted or refused exactly as the reference
//!   validator (`expected_verdict`, rules 2..11 with rule R in order)
//!   decides, with the effective mask it computes; the reference chooses
//!   destinations from the local APICs as the guest programs them under its
//!   declared model (`ref_choose`);
//! - each CONNECT_EX likewise (`expected_ex`: rules X1..X3, then the
//!   version's: FULLY_SPECIFIED as CONNECT in the request's processor
//!   group, LINE_BASED per line resource, MESSAGE_BASED M1..M9 with its own
//!   reading of the policies); for messages, the table, the programmed
//!   address and data and the connection's objects name one set of
//!   processors, exactly the ones the message reaches on the bus
//!   (`irqchip::apic_bus::resolve`), inside the policy's set;
//! - each RETARGET likewise (`expected_retarget`: RT1..RT5, R, 9, 11),
//!   answering the union and count of the reference's new masks, moving
//!   every line or message of the connection and nothing else, and
//!   (MESSAGE_BASED) rewriting the table at the request's buffer with the
//!   group's unified IRQL and the new programming;
//! - each SET_APIC_MODEL is accepted or refused as the reference decides
//!   (undefined model, x2APIC not offered, connections live);
//! - each DISCONNECT_EX removes the whole group and unprograms its
//!   messages, and a group handle is refused by DISCONNECT;
//! - a new handle is none handed out before;
//! - a snapshot restores to a service equal to the one saved;
//! - an asserted device line reaches, through the route's APIC destination
//!   on the bus, exactly the route's processors, each of which holds an
//!   interrupt object on the vector, and reaches one whenever the device is
//!   connected; each of its messages reaches exactly its connection's
//!   processors (an unconnected one is unprogrammed);
//!
//! A snapshot or an assert that repeats one made since the last operation
//! that could change anything (any but these two) is skipped: it would
//! check the same state again. So is a snapshot of a service equal to the
//! last one restored from a snapshot (operations refused in between leave
//! it as it was): `snapshot` and `restore` are functions of the state, so
//! the round trip of an equal state is the one already checked.
//!
//! Each operation is then compared with the shadow where it touched it
//! (the vectors of connections that came, went or moved, a RETARGET's
//! included, and of pins whose storm mark moved, and those handles),
//! everywhere after an accepted SET_APIC_MODEL, every
//! [`FULL_CHECK_EVERY`] operations that touched something and after the
//! last operation:
//!
//! - the service's invariants ([`Service::check_vectors`] of the touched
//!   vectors; [`Service::check_invariants`] in full);
//! - the pins' routes (touched or all) equal what the live connections
//!   imply: the union of their processors on the pin's vector (one group),
//!   the destination the reference chooses for it, which reaches on the
//!   bus exactly that union, the oldest one's trigger mode, lowest priority
//!   for more than one processor, masked when none or while the storm
//!   guard holds it;
//! - the handles' connections (touched or all live: message, vector,
//!   processor group, mask) are the shadow's, and no disconnected (or
//!   forged) handle is accepted again (among the touched vectors'
//!   connections; every dead handle in full);
//! - after every operation, the objects in use equal the live masks'
//!   processors and never exceed the quota, the live connections are the
//!   shadow's count, the storm marks are the shadow's;
//! - disconnecting everything returns to the initial state.
//!
//! Input format: byte 0 picks the processor count (`1 + b % 64` below
//! 0xc0, else 65 up to 255), byte 1 the online mask of group 0 (all, or a
//! pattern), byte 2 the quota (bits 0..2), x2APIC (bit 3), the irqchip
//! mode (bits 4..5: kernel, split, user, kernel; 8- or 15-bit
//! destinations) and the APIC model declared first (bits 6..7:
//! undeclared, x2APIC when offered, xAPIC flat, xAPIC cluster); then
//! operations as in [`Op`]'s variants, an opcode byte (`% 8`: 0, 1
//! CONNECT, 2 CONNECT_EX, 3 DISCONNECT, 4 forged DISCONNECT, 5 assert, 6
//! storm / snapshot / SET_APIC_MODEL / disconnect all / RETARGET, 7
//! DISCONNECT_EX) and operands.

use std::collections::BTreeSet;

use super::reference::{
    self, BLOCK, ExpectedEx, Live, RAM_SIZE, Shadow, TABLE_AT, Topo, bus_reach, expected_ex,
    expected_retarget, expected_verdict, msi_reach, ref_choose,
};
use crate::connect_ex::ConnectExRequest;
use crate::destination::{ApicDestination, ApicModel};
use crate::devices::{Device, DeviceTable, InterruptMode, ShareDisposition};
use crate::error::Error;
use crate::handle::Handle;
use crate::messages::MessageRoute;
use crate::platform::{IrqchipMode, Platform, PlatformFacts, present_mask};
use crate::processors::ProcessorSet;
use crate::ram::GuestRam;
use crate::registry::Connection;
use crate::retarget::RetargetRequest;
use crate::route::PinRoute;
use crate::service::{ConnectedEx, Service};
use crate::validate::{ConnectRequest, Violation};
use irqconnect_abi::layout::IOAPIC_PINS;
use irqconnect_abi::pv::{connect_version, interrupt_mode, message_table_size, polarity};

const QUOTAS: [u32; 8] = [64, 1, 2, 3, 5, 8, 16, 256];

/// The full comparison of the service with the reference (`compare`) runs
/// after every this many operations that touched the live connections,
/// the storm marks or the APIC model, and after the last operation; the
/// operations between compare what they touched (`compare_touched`).
pub const FULL_CHECK_EVERY: u32 = 16;

/// Guest RAM of [`RAM_SIZE`] zero bytes at 0 (the service only asks
/// whether its pointers are resident and reads nothing that matters),
/// without a buffer to allocate per input.
struct ResidentRam;

impl ResidentRam {
    fn check(gpa: u64, len: u64) -> Result<(), Error> {
        if reference::resident(gpa, len) {
            Ok(())
        } else {
            Err(Error::NotRam { gpa, len })
        }
    }
}

impl GuestRam for ResidentRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        Self::check(gpa, buf.len() as u64)?;
        buf.fill(0);
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Error> {
        Self::check(gpa, buf.len() as u64)
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        reference::resident(gpa, len)
    }
}

/// One operation of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// IoConnectInterrupt with these parameters.
    Connect(ConnectRequest),
    /// IoConnectInterruptEx with these parameters.
    ConnectEx(ConnectExRequest),
    /// IoDisconnectInterruptEx of the `n`-th handle ever returned (modulo
    /// the count) with this version.
    DisconnectEx(usize, u32),
    /// IoDisconnectInterrupt of the `n`-th handle ever returned (modulo the
    /// count), live or dead.
    Disconnect(usize),
    /// IoDisconnectInterrupt of an arbitrary (forged) handle value.
    DisconnectRaw(u64),
    /// The device's line is asserted: where can its interrupt go?
    Assert(u32),
    /// The VMM's storm guard masks a pin.
    StormMask(u32),
    /// Snapshot and restore the service.
    Snapshot,
    /// Disconnect every live connection.
    DisconnectAll,
    /// SET_APIC_MODEL with this ABI value.
    SetApicModel(u8),
    /// RETARGET of the `n`-th handle ever returned (modulo the count).
    Retarget {
        /// Which handle.
        n: usize,
        /// The group: `None` for the connection's own.
        group: Option<u16>,
        /// The new mask.
        mask: u64,
        /// The table buffer and its length.
        table: (u64, u32),
    },
}

/// A platform and the operations to run on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// Processors.
    pub cpus: u32,
    /// Online processors of group 0.
    pub online: u64,
    /// The object quota.
    pub quota: u32,
    /// Whether the vCPUs offer x2APIC.
    pub x2apic: bool,
    /// The irqchip mode (8- or 15-bit destinations).
    pub mode: IrqchipMode,
    /// The APIC model declared before the operations.
    pub model: ApicModel,
    /// The operations.
    pub ops: Vec<Op>,
}

/// Reads little-endian values off the front of the input; missing bytes
/// are 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut raw = [0u8; 8];
        for b in &mut raw {
            *b = self.u8();
        }
        u64::from_le_bytes(raw)
    }
}

/// Decodes any bytes into a sequence (see the module documentation).
pub fn decode(data: &[u8]) -> Sequence {
    let mut input = Input(data);
    let cpus = match input.u8() {
        b @ 0..=0xbf => 1 + u32::from(b % 64),
        b => (65 + 3 * u32::from(b - 0xc0)).min(255),
    };
    let present = present_mask(cpus);
    let online = match input.u8() {
        0..=0x7f => present,
        b => {
            let pattern = u64::from_le_bytes([b; 8]).rotate_left(u32::from(b));
            match pattern & present {
                0 => 1,
                m => m,
            }
        }
    };
    let flags = input.u8();
    let quota = QUOTAS[usize::from(flags & 7)];
    let x2apic = flags & 8 != 0;
    let mode = match (flags >> 4) & 3 {
        1 => IrqchipMode::Split,
        2 => IrqchipMode::User,
        _ => IrqchipMode::Kernel,
    };
    let model = match flags >> 6 {
        1 if x2apic => ApicModel::X2apic,
        2 => ApicModel::XapicFlat,
        3 => ApicModel::XapicCluster,
        _ => ApicModel::Undeclared,
    };
    let platform = facts(cpus, online, x2apic, mode);
    let devices = Platform::new(platform)
        .map(|p| DeviceTable::default_for(&p))
        .ok();
    let mut ops = Vec::new();
    while !input.0.is_empty() {
        let op = match input.u8() % 8 {
            0 | 1 => Op::Connect(connect_request(&mut input, devices.as_ref())),
            2 => Op::ConnectEx(connect_ex_request(&mut input, devices.as_ref())),
            3 => Op::Disconnect(usize::from(input.u8())),
            4 => Op::DisconnectRaw(input.u64()),
            5 => Op::Assert(u32::from(input.u8() % 12)),
            6 => match input.u8() {
                b @ 0..=0x3f => Op::StormMask(u32::from(b % 26)),
                0x40..=0x5f => Op::Snapshot,
                b @ 0x60..=0x7f => Op::SetApicModel(b & 7),
                0x80..=0xbf => Op::DisconnectAll,
                _ => retarget_op(&mut input),
            },
            _ => {
                let n = usize::from(input.u8());
                let version = match input.u8() {
                    v @ 0..=4 => u32::from(v),
                    v => u32::from(v) << 8,
                };
                Op::DisconnectEx(n, version)
            }
        };
        ops.push(op);
    }
    Sequence {
        cpus,
        online,
        quota,
        x2apic,
        mode,
        model,
        ops,
    }
}

/// A RETARGET: the handle index, a group byte (bit 2: the group in bits
/// 0..1, else the connection's), a mask as [`connect_request`] encodes one,
/// and a table byte (0: the table at its place, 1: none, 2: too short, 3:
/// arbitrary).
fn retarget_op(input: &mut Input<'_>) -> Op {
    let n = usize::from(input.u8());
    let g = input.u8();
    let group = (g & 4 != 0).then_some(u16::from(g & 3));
    let mask = mask_operand(input.u8(), input);
    let table = match input.u8() % 4 {
        0 => (TABLE_AT, 0x1000),
        1 => (0, 0),
        2 => (TABLE_AT, 8),
        _ => (input.u64(), u32::from(input.u8()) << 4),
    };
    Op::Retarget {
        n,
        group,
        mask,
        table,
    }
}

fn facts(cpus: u32, online: u64, x2apic: bool, mode: IrqchipMode) -> PlatformFacts {
    let mut facts = PlatformFacts::uniform(cpus);
    facts.online_mask = online;
    facts.x2apic = x2apic;
    facts.irqchip_mode = mode;
    // Distinct APIC IDs, not the indices on small platforms, so a wrong
    // index-to-ID mapping shows; on large ones ID = index, as the VMM
    // does (odd IDs would pass 255).
    facts.apic_ids = if cpus <= 64 {
        (0..cpus).map(|i| i * 2 + 1).collect()
    } else {
        (0..cpus).collect()
    };
    facts
}

/// A mask as `flags & 3` selects: the next byte, all ones, one bit, or
/// eight bytes.
fn mask_operand(flags: u8, input: &mut Input<'_>) -> u64 {
    match flags & 3 {
        0 => u64::from(input.u8()),
        1 => u64::MAX,
        2 => 1 << (input.u8() % 64),
        _ => input.u64(),
    }
}

/// A CONNECT, mostly built from one of the device's own resources so that
/// most requests get deep into the rules; flags break one field at a time.
fn connect_request(input: &mut Input<'_>, devices: Option<&DeviceTable>) -> ConnectRequest {
    let device_id = u32::from(input.u8() % 12);
    let which = input.u8();
    let flags = input.u8();
    let breaks = input.u8();
    let mask = mask_operand(flags, input);
    let resource = devices
        .and_then(|d| d.device(device_id).or_else(|| d.device(0)))
        .and_then(|d| {
            let resources = d.resources();
            resources.get(usize::from(which) % resources.len().max(1))
        });
    let (mut vector, mode, shared) = resource.map_or((0x60, InterruptMode::Latched, false), |r| {
        (
            u32::from(r.vector),
            r.mode,
            r.share == ShareDisposition::Shared,
        )
    });
    let mode = if flags & 4 != 0 {
        match mode {
            InterruptMode::Latched => InterruptMode::LevelSensitive,
            InterruptMode::LevelSensitive => InterruptMode::Latched,
        }
    } else {
        mode
    };
    if breaks & 0x80 != 0 {
        vector = u32::from(input.u8()) | u32::from(breaks & 0x40) << 2;
    }
    let irql = if breaks & 0x20 != 0 {
        input.u8() % 16
    } else {
        (vector >> 4) as u8
    };
    let synchronize_irql = irql
        .saturating_add(input.u8() % 4)
        .wrapping_sub(u8::from(breaks & 0x10 != 0));
    let pointer = |sel: u8, input: &mut Input<'_>| match sel % 4 {
        0 => 0,
        1 => 0x1000,
        2 => RAM_SIZE - 1 - u64::from(input.u8() % 16),
        _ => input.u64(),
    };
    let service_context = pointer(breaks, input);
    let spin_lock = pointer(breaks >> 2, input);
    ConnectRequest {
        device_id,
        vector,
        irql,
        synchronize_irql,
        interrupt_mode: mode,
        share_vector: shared != (flags & 8 != 0),
        floating_save: flags & 0x10 != 0,
        processor_enable_mask: mask,
        service_routine: if flags & 0x20 != 0 { 0 } else { 0x10_0000 },
        service_context,
        spin_lock,
        version: irqconnect_abi::pv::connect_version::FULLY_SPECIFIED,
    }
}

/// A CONNECT_EX: a version, then CONNECT's fields (as [`connect_request`]
/// builds them), then a byte of Ex choices. Bits 6..7 both set break rule
/// X2 or X3 as bits 0..2 say: bit 0 a group, bit 1 a fallback routine
/// outside MESSAGE_BASED, bit 2 the FULLY_SPECIFIED fields kept for the
/// other versions, or a table length for FULLY_SPECIFIED. MESSAGE_BASED
/// takes bit 1 alone as its fallback routine. FULLY_SPECIFIED_GROUP takes
/// its group from bits 4..5. Bit 3: no processor
/// restriction. Bits 4..5, MESSAGE_BASED: the table buffer fits, has a
/// length from the next byte, is misplaced as the next byte picks
/// (misaligned, overlapping the block, past RAM, absent), or arbitrary.
fn connect_ex_request(input: &mut Input<'_>, devices: Option<&DeviceTable>) -> ConnectExRequest {
    let version = match input.u8() % 8 {
        0 | 1 => connect_version::FULLY_SPECIFIED,
        2 | 3 => connect_version::LINE_BASED,
        4 | 5 => connect_version::MESSAGE_BASED,
        6 => connect_version::FULLY_SPECIFIED_GROUP,
        _ => u32::from(input.u8()),
    };
    let base = connect_request(input, devices);
    let choices = input.u8();
    let breaks = |bit: u8| choices & 0xc0 == 0xc0 && choices & bit != 0;
    let fully = matches!(
        version,
        connect_version::FULLY_SPECIFIED | connect_version::FULLY_SPECIFIED_GROUP
    );
    let message = version == connect_version::MESSAGE_BASED;
    let keep_fields = fully || breaks(4);
    let fallback = if message { choices & 2 != 0 } else { breaks(2) };
    let (message_table, message_table_length) = if message {
        match (choices >> 4) & 3 {
            0 => (TABLE_AT, 0x1000),
            1 => (TABLE_AT, u32::from(input.u8()) * 8),
            2 => match input.u8() % 4 {
                0 => (TABLE_AT + 4, 0x1000),
                1 => (BLOCK.start + 64, 0x1000),
                2 => (RAM_SIZE - 16, 0x1000),
                _ => (0, 0),
            },
            _ => (input.u64(), u32::from(input.u8()) << 4),
        }
    } else if fully && breaks(4) {
        (0, 8)
    } else {
        (0, 0)
    };
    ConnectExRequest {
        version,
        device_id: base.device_id,
        vector: if keep_fields { base.vector } else { 0 },
        irql: if keep_fields { base.irql } else { 0 },
        synchronize_irql: base.synchronize_irql,
        interrupt_mode: if keep_fields {
            base.interrupt_mode
        } else {
            InterruptMode::LevelSensitive
        },
        share_vector: keep_fields && base.share_vector,
        floating_save: base.floating_save,
        group: if req_group_version(version) {
            u16::from((choices >> 4) & 3)
        } else {
            u16::from(breaks(1))
        },
        processor_enable_mask: if !fully && choices & 8 != 0 {
            0
        } else {
            base.processor_enable_mask
        },
        service_routine: base.service_routine,
        fallback_service_routine: if fallback { 0x20_0000 } else { 0 },
        service_context: base.service_context,
        spin_lock: base.spin_lock,
        message_table,
        message_table_length,
    }
}

fn req_group_version(version: u32) -> bool {
    version == connect_version::FULLY_SPECIFIED_GROUP
}

/// CONNECT_EX's answer against the reference's plan; for messages, the
/// table, the programming and the bus agree.
fn check_connected_ex(
    req: &ConnectExRequest,
    want: &ExpectedEx,
    done: &ConnectedEx,
    device: Option<&Device>,
    shadow: &Shadow,
    format: irqchip::msi::MsiFormat,
) -> Result<(), String> {
    let union = want.planned.iter().fold(0, |m, p| m | p.mask);
    let got = (
        done.version_used,
        done.unified_irql,
        done.count as usize,
        done.effective_mask,
        done.table_required,
    );
    let expected = (
        want.version_used,
        want.unified_irql,
        want.planned.len(),
        union,
        want.table_required,
    );
    if got != expected {
        return Err(format!(
            "CONNECT_EX {req:?} answered (version, unified IRQL, count, mask, table) {got:?}, reference {expected:?}"
        ));
    }
    if want.version_used != connect_version::MESSAGE_BASED {
        return if done.table.is_none() && done.messages.is_empty() {
            Ok(())
        } else {
            Err("a line connection wrote a table or programmed messages".into())
        };
    }
    let (Some(table), Some(m)) = (&done.table, device.and_then(Device::messages)) else {
        return Err("MESSAGE_BASED without a table".into());
    };
    let header = (
        table.gpa,
        table.header.unified_irql,
        table.header.message_count,
    );
    if header != (req.message_table, want.unified_irql, u32::from(m.count))
        || table.entries.len() != want.planned.len()
        || done.messages.len() != want.planned.len()
        || message_table_size(table.entries.len()) as u32 != want.table_required
    {
        return Err(format!(
            "message table header {header:?} or sizes are wrong"
        ));
    }
    check_messages(
        table,
        &done.messages,
        &want.planned,
        req.device_id,
        m,
        shadow,
        format,
    )
}

/// A message table and the message updates against the planned messages:
/// entries, programming and the bus name one set of processors each.
fn check_messages(
    table: &crate::connect_ex::MessageTable,
    updates: &[crate::messages::MessageUpdate],
    planned: &[reference::Planned],
    device: u32,
    m: &crate::messages::MessageResource,
    shadow: &Shadow,
    format: irqchip::msi::MsiFormat,
) -> Result<(), String> {
    for ((p, e), u) in planned.iter().zip(&table.entries).zip(updates) {
        let route = u.route.ok_or("a connected message is unprogrammed")?;
        let (reached, vector) = msi_reach(&shadow.topo, e.message_address, e.message_data, format)?;
        let entry_ok = e.vector == u32::from(p.vector)
            && e.irql == p.vector >> 4
            && e.mode == interrupt_mode::LATCHED
            && e.polarity == polarity::ACTIVE_HIGH
            && Some(e.message_id as u8) == p.message
            && e.group == p.group;
        let set = ProcessorSet::of_group(p.group, p.mask);
        let same_set = e.target_processor_set == p.mask
            && route.targets == p.mask
            && route.group == p.group
            && reached == set
            && vector == p.vector;
        let same_route = (route.address, route.data) == (e.message_address, e.message_data)
            && Some(u.message) == p.message
            && u.device == device
            && Some(u.test_device) == m.test_device;
        if !(entry_ok && same_set && same_route) {
            return Err(format!(
                "message {:?}: entry {e:?}, update {u:?}, reaches {reached:?} vector {vector:#x}, reference {p:?}",
                p.message
            ));
        }
    }
    Ok(())
}

/// The route of `pin` the shadow's live connections imply, checked on the
/// bus: its destination reaches exactly the union.
fn expected_route(pin: u8, shadow: &Shadow, devices: &DeviceTable) -> Result<PinRoute, String> {
    let Some(resource) = devices
        .devices()
        .iter()
        .flat_map(|d| d.resources())
        .find(|r| r.pin == pin)
    else {
        return Ok(PinRoute::UNUSED);
    };
    let mut on = shadow.live.iter().filter(|c| c.vector == resource.vector);
    let first = on.next();
    let connections = first.map_or(0, |_| 1 + on.count() as u32);
    let union = shadow.vector_union(resource.vector, None);
    let (target, reach) = ref_choose(&shadow.topo, union, ProcessorSet::EMPTY)
        .unwrap_or((ApicDestination::None, ProcessorSet::EMPTY));
    if reach != union {
        return Err(format!(
            "vector {:#x}: no destination reaches exactly its processors {union:?}",
            resource.vector
        ));
    }
    if let Some(message) = target.edge_message(resource.vector) {
        let on_bus = bus_reach(&shadow.topo, &message)?;
        if on_bus != union {
            return Err(format!(
                "the destination {target:?} reaches {on_bus:?} on the bus, not {union:?}"
            ));
        }
    }
    let (group, destination) = union.as_group_affinity().unwrap_or((0, 0));
    let mode = first.map_or(resource.mode, |c| c.mode);
    Ok(PinRoute {
        masked: destination == 0 || shadow.storm & (1 << pin) != 0,
        vector: resource.vector,
        trigger: match mode {
            InterruptMode::LevelSensitive => irqchip::apic_bus::TriggerMode::Level,
            InterruptMode::Latched => irqchip::apic_bus::TriggerMode::Edge,
        },
        group,
        destination,
        lowest_priority: destination.count_ones() > 1,
        connections,
        target,
    })
}

/// Decodes `data` and checks the sequence. `Err` names the first broken
/// check.
pub fn run(data: &[u8]) -> Result<(), String> {
    check(&decode(data))
}

/// Runs `sequence` (see the module documentation). `Err` names the first
/// broken check.
pub fn check(sequence: &Sequence) -> Result<(), String> {
    let facts = facts(
        sequence.cpus,
        sequence.online,
        sequence.x2apic,
        sequence.mode,
    );
    let platform = Platform::new(facts).map_err(|e| format!("platform: {e}"))?;
    let devices = DeviceTable::default_for(&platform);
    let mut service = Service::new(platform.clone(), devices.clone(), sequence.quota)
        .map_err(|e| format!("service: {e}"))?;
    service
        .set_apic_model(sequence.model)
        .map_err(|v| format!("the first SET_APIC_MODEL {:?}: {v:?}", sequence.model))?;
    let fresh = service.clone();
    let ram = ResidentRam;
    let mut shadow = Shadow {
        topo: Topo::new(&platform, sequence.model),
        quota: sequence.quota,
        live: Vec::new(),
        issued: Vec::new(),
        dead: BTreeSet::new(),
        storm: 0,
        storm_count: 0,
    };
    let ops = sequence
        .ops
        .iter()
        .chain(core::iter::once(&Op::DisconnectAll));
    let mut changes = 0u32;
    // The live keys before and after an operation, and what it touched:
    // buffers refilled for every operation.
    let (mut before, mut keys) = (Vec::new(), Vec::new());
    live_keys(&shadow, &mut keys);
    let mut touched = Touched::default();
    // The read-only operations (a snapshot, an asserted line) made since
    // the last one that could change the service or the shadow: the same
    // one again would repeat its checks on the same state, so it is left
    // out.
    let mut unchanged: Vec<Op> = Vec::new();
    // The service as the last snapshot restored it.
    let mut restored: Option<Service> = None;
    for (n, op) in ops.enumerate() {
        if matches!(op, Op::Snapshot | Op::Assert(_)) {
            if unchanged.contains(op)
                || (*op == Op::Snapshot && restored.as_ref() == Some(&service))
            {
                continue;
            }
            unchanged.push(*op);
        } else {
            unchanged.clear();
        }
        core::mem::swap(&mut before, &mut keys);
        let (storm, model) = (shadow.storm, shadow.topo.model);
        apply(&mut service, &mut shadow, &devices, &ram, &mut restored, op)
            .and_then(|()| {
                live_keys(&shadow, &mut keys);
                touched.fill(&before, &keys, storm ^ shadow.storm, &devices);
                compare_touched(&service, &shadow, &devices, &touched)?;
                let remodelled = model != shadow.topo.model;
                if !touched.is_empty() || remodelled {
                    changes += 1;
                    // A new model may move every route: compare them all.
                    if remodelled || changes.is_multiple_of(FULL_CHECK_EVERY) {
                        compare(&service, &shadow, &devices)?;
                    }
                }
                Ok(())
            })
            .map_err(|what| format!("op {n} ({op:?}): {what}"))?;
    }
    compare(&service, &shadow, &devices).map_err(|what| format!("after the last op: {what}"))?;
    // Everything disconnected: the live state of a fresh service, given
    // the same storm-guard marks (a VMM fact, not connection state) and
    // the same declared model.
    let mut marked = fresh;
    marked
        .set_apic_model(shadow.topo.model)
        .map_err(|v| format!("the last model: {v:?}"))?;
    for pin in 0..u32::from(IOAPIC_PINS) {
        if service.storm_bits() & (1 << pin) != 0 {
            marked
                .report_storm_masked(pin)
                .map_err(|e| format!("storm mark of pin {pin}: {e}"))?;
        }
    }
    if !service.same_live_state(&marked) || service.registry().objects_in_use() != 0 {
        return Err("disconnecting everything did not return to the initial state".into());
    }
    Ok(())
}

fn disconnect(service: &mut Service, shadow: &mut Shadow, handle: Handle) -> Result<(), String> {
    let position = shadow.live.iter().position(|c| c.handle == handle);
    let group = position
        .and_then(|i| shadow.live.get(i))
        .is_some_and(Live::in_group);
    let result = service.disconnect(handle);
    match (position, result) {
        (Some(_), Err(Violation::GroupNeedsDisconnectEx)) if group => Ok(()),
        (Some(i), Ok(_)) if !group => {
            let gone = shadow.live.remove(i);
            shadow.dead.insert(handle);
            let vector = gone.vector;
            clear_storm(shadow, service, vector);
            Ok(())
        }
        (None, Err(Violation::UnknownHandle)) => Ok(()),
        (i, r) => Err(format!(
            "disconnect of {:#x}: live in shadow {}, service answered {r:?}",
            handle.raw(),
            i.is_some()
        )),
    }
}
/// DISCONNECT_EX of `handle` with `version`: the reference's verdict, then
/// the whole group goes and its messages are unprogrammed.
fn disconnect_ex(
    service: &mut Service,
    shadow: &mut Shadow,
    handle: Handle,
    version: u32,
) -> Result<(), String> {
    let live_version = shadow
        .live
        .iter()
        .find(|c| c.handle == handle)
        .map(|c| c.version);
    let expected = if !(1..=4).contains(&version) {
        Err(Violation::UnknownConnectVersion)
    } else {
        match live_version {
            None => Err(Violation::UnknownHandle),
            Some(v) if v != version => Err(Violation::VersionMismatch),
            Some(_) => Ok(()),
        }
    };
    let result = service.disconnect_ex(version, handle);
    match (&expected, &result) {
        (Ok(()), Ok(done)) => {
            let gone: Vec<Live> = shadow
                .live
                .iter()
                .filter(|c| c.handle == handle)
                .copied()
                .collect();
            shadow.live.retain(|c| c.handle != handle);
            shadow.dead.insert(handle);
            let messages = gone.iter().filter(|c| c.message.is_some()).count();
            if done.messages.len() != messages || done.messages.iter().any(|u| u.route.is_some()) {
                return Err(format!(
                    "DISCONNECT_EX of {} messages unprogrammed {:?}",
                    messages, done.messages
                ));
            }
            for c in gone {
                clear_storm(shadow, service, c.vector);
            }
            Ok(())
        }
        (Err(a), Err(b)) if a == b => Ok(()),
        _ => Err(format!(
            "DISCONNECT_EX of {:#x} version {version}: service {result:?}, reference {expected:?}",
            handle.raw()
        )),
    }
}

/// The vector's connections changed: its pins' storm marks clear.
fn clear_storm(shadow: &mut Shadow, service: &Service, vector: u8) {
    shadow.storm &= !service.devices().pins_of_vector(vector);
}

fn apply(
    service: &mut Service,
    shadow: &mut Shadow,
    devices: &DeviceTable,
    ram: &ResidentRam,
    restored: &mut Option<Service>,
    op: &Op,
) -> Result<(), String> {
    match *op {
        Op::Connect(req) => {
            let expected = expected_verdict(&req, 0, shadow, devices);
            let got = service.connect(&req, ram);
            match (&expected, &got) {
                (Ok(mask), Ok(done)) if done.effective_mask == *mask => {
                    issue(shadow, done.handle)?;
                    shadow.live.push(Live {
                        handle: done.handle,
                        device: req.device_id,
                        vector: req.vector as u8,
                        irql: req.irql,
                        mode: req.interrupt_mode,
                        share: req.share_vector,
                        mask: *mask,
                        group: 0,
                        spin_lock: req.spin_lock,
                        version: connect_version::FULLY_SPECIFIED,
                        message: None,
                        synchronize_irql: req.synchronize_irql,
                    });
                    clear_storm(shadow, service, req.vector as u8);
                }
                (Err(want), Err(got)) if want == got => {}
                _ => {
                    return Err(format!(
                        "connect {req:?}: service {:?}, reference {expected:?}",
                        got.map(|c| (c.handle.raw(), c.effective_mask))
                    ));
                }
            }
        }
        Op::ConnectEx(req) => {
            let expected = expected_ex(&req, shadow, devices);
            let got = service.connect_ex(&req, BLOCK, ram);
            match (&expected, &got) {
                (Ok(want), Ok(done)) => {
                    let device = devices.device(req.device_id);
                    let format = service.platform().msi_format();
                    check_connected_ex(&req, want, done, device, shadow, format)?;
                    issue(shadow, done.handle)?;
                    let spin_lock = req.spin_lock;
                    for p in &want.planned {
                        shadow.live.push(Live {
                            handle: done.handle,
                            device: req.device_id,
                            vector: p.vector,
                            irql: p.vector >> 4,
                            mode: p.mode,
                            share: p.share,
                            mask: p.mask,
                            group: p.group,
                            spin_lock,
                            version: want.version_used,
                            message: p.message,
                            synchronize_irql: want.unified_irql,
                        });
                        clear_storm(shadow, service, p.vector);
                    }
                }
                (Err(a), Err(b)) if a == b => {}
                _ => {
                    return Err(format!(
                        "connect_ex {req:?}: service {:?}, reference {expected:?}",
                        got.map(|c| (c.handle.raw(), c.version_used, c.effective_mask))
                    ));
                }
            }
        }
        Op::Retarget {
            n,
            group,
            mask,
            table,
        } => {
            if let Some(&handle) = shadow.issued.get(n % shadow.issued.len().max(1)) {
                retarget(service, shadow, devices, ram, handle, group, mask, table)?;
            }
        }
        Op::SetApicModel(value) => {
            let model = ApicModel::from_abi(value);
            let expected = match model {
                None => Err(Violation::UnknownApicModel),
                Some(ApicModel::X2apic) if !shadow.topo.x2apic_offered => {
                    Err(Violation::UnknownApicModel)
                }
                Some(_) if !shadow.live.is_empty() => Err(Violation::ConnectionsLive),
                Some(m) => Ok(m),
            };
            let got = match model {
                Some(m) => service.set_apic_model(m),
                None => Err(Violation::UnknownApicModel),
            };
            match (expected, got) {
                (Ok(m), Ok(())) if m != shadow.topo.model => {
                    shadow.topo = Topo::new(service.platform(), m);
                }
                (Ok(_), Ok(())) => {}
                (Err(a), Err(b)) if a == b => {}
                (e, g) => {
                    return Err(format!(
                        "SET_APIC_MODEL {value}: service {g:?}, reference {e:?}"
                    ));
                }
            }
        }
        Op::Disconnect(n) => {
            if let Some(&handle) = shadow.issued.get(n % shadow.issued.len().max(1)) {
                disconnect(service, shadow, handle)?;
            }
        }
        Op::DisconnectEx(n, version) => {
            if let Some(&handle) = shadow.issued.get(n % shadow.issued.len().max(1)) {
                disconnect_ex(service, shadow, handle, version)?;
            }
        }
        Op::DisconnectRaw(raw) => disconnect(service, shadow, Handle::from_raw(raw))?,
        Op::DisconnectAll => {
            let mut handles: Vec<(Handle, u32, bool)> = shadow
                .live
                .iter()
                .map(|c| (c.handle, c.version, c.in_group()))
                .collect();
            handles.dedup();
            for (handle, version, group) in handles {
                if group {
                    disconnect_ex(service, shadow, handle, version)?;
                } else {
                    disconnect(service, shadow, handle)?;
                }
            }
        }
        Op::StormMask(pin) => {
            let result = service.report_storm_masked(pin);
            match (pin < u32::from(IOAPIC_PINS), result) {
                (true, Ok(())) => {
                    if shadow.storm & (1 << pin) == 0 {
                        shadow.storm_count += 1;
                    }
                    shadow.storm |= 1 << pin;
                }
                (false, Err(_)) => {}
                (_, r) => return Err(format!("storm mask of pin {pin}: {r:?}")),
            }
            if service.storm_masked_pins() != shadow.storm_count {
                return Err(format!(
                    "storm count {}, reference {}",
                    service.storm_masked_pins(),
                    shadow.storm_count
                ));
            }
        }
        Op::Snapshot => {
            let copy = Service::restore(
                service.platform().clone(),
                service.devices().clone(),
                &service.snapshot(),
            )
            .map_err(|e| format!("restore of a snapshot failed: {e}"))?;
            if copy != *service {
                return Err("restore(snapshot(x)) differs from x".into());
            }
            *restored = Some(copy);
        }
        Op::Assert(device) => assert_line(service, shadow, device)?,
    }
    Ok(())
}

/// Records a handle just handed out, which must be new.
fn issue(shadow: &mut Shadow, handle: Handle) -> Result<(), String> {
    if shadow.issued.contains(&handle) || handle.raw() == 0 {
        return Err(format!("handle {:#x} handed out twice", handle.raw()));
    }
    shadow.issued.push(handle);
    Ok(())
}

/// RETARGET of `handle`: the reference's verdict and masks, then the moved
/// connections, their routes and (MESSAGE_BASED) the table and programming.
#[allow(clippy::too_many_arguments)]
fn retarget(
    service: &mut Service,
    shadow: &mut Shadow,
    devices: &DeviceTable,
    ram: &ResidentRam,
    handle: Handle,
    group: Option<u16>,
    mask: u64,
    table: (u64, u32),
) -> Result<(), String> {
    let own = shadow
        .live
        .iter()
        .find(|c| c.handle == handle)
        .map_or(0, |c| c.group);
    let group = group.unwrap_or(own);
    let expected = expected_retarget(handle, group, mask, table, shadow, devices);
    let req = RetargetRequest {
        handle,
        group,
        processor_mask: mask,
        message_table: table.0,
        message_table_length: table.1,
    };
    let got = service.retarget(&req, BLOCK, ram);
    match (&expected, &got) {
        (Ok(moves), Ok(done)) => {
            let union = moves.iter().fold(0, |m, &(_, mask)| m | mask);
            if (done.effective_mask, done.count as usize) != (union, moves.len()) {
                return Err(format!(
                    "retarget of {:#x} to {group}/{mask:#x}: answered {:#x} count {}, reference {moves:?}",
                    handle.raw(),
                    done.effective_mask,
                    done.count
                ));
            }
            for &(i, new) in moves {
                if let Some(c) = shadow.live.get_mut(i) {
                    c.mask = new;
                }
            }
            let vectors: Vec<u8> = moves
                .iter()
                .filter_map(|&(i, _)| shadow.live.get(i).map(|c| c.vector))
                .collect();
            for v in vectors {
                clear_storm(shadow, service, v);
            }
            let lead = shadow.live.iter().find(|c| c.handle == handle).copied();
            if let (Some(lead), Some(table)) = (lead, &done.table) {
                let m = devices
                    .device(lead.device)
                    .and_then(Device::messages)
                    .ok_or("a retargeted message group without messages")?;
                let planned: Vec<reference::Planned> = shadow
                    .live
                    .iter()
                    .filter(|c| c.handle == handle)
                    .map(|c| reference::Planned {
                        vector: c.vector,
                        mode: c.mode,
                        share: c.share,
                        mask: c.mask,
                        group: c.group,
                        message: c.message,
                    })
                    .collect();
                if table.gpa != table_gpa(table, req)
                    || table.header.unified_irql != lead.synchronize_irql
                    || table.entries.len() != planned.len()
                {
                    return Err("the rewritten message table header is wrong".into());
                }
                let format = service.platform().msi_format();
                check_messages(
                    table,
                    &done.messages,
                    &planned,
                    lead.device,
                    m,
                    shadow,
                    format,
                )?;
            } else if !done.messages.is_empty() || done.table.is_some() {
                return Err("a line connection's retarget wrote a table or messages".into());
            }
        }
        (Err(a), Err(b)) if a == b => {}
        _ => {
            return Err(format!(
                "retarget of {:#x} to {group}/{mask:#x} table {table:?}: service {:?}, reference {expected:?}",
                handle.raw(),
                got.map(|d| (d.effective_mask, d.count))
            ));
        }
    }
    Ok(())
}

fn table_gpa(_table: &crate::connect_ex::MessageTable, req: RetargetRequest) -> u64 {
    req.message_table
}

/// The device raises its line: the programmed route must reach, on the
/// bus, exactly the route's processors, each with an object on the vector,
/// and one when it is connected.
fn assert_line(service: &Service, shadow: &Shadow, device: u32) -> Result<(), String> {
    let Some(d) = service.devices().device(device) else {
        return Ok(());
    };
    raise_messages(service, shadow, d)?;
    for r in d.resources() {
        let Some(route) = service.route(r.pin) else {
            return Err(format!("pin {} has no route", r.pin));
        };
        let connected = shadow
            .live
            .iter()
            .any(|c| c.device == device && c.vector == r.vector);
        let held = shadow.storm & (1 << r.pin) != 0;
        if connected && !held && route.masked {
            return Err(format!(
                "device {device} is connected but pin {} is masked",
                r.pin
            ));
        }
        let reached = match route.target.edge_message(r.vector) {
            Some(m) => bus_reach(&shadow.topo, &m)?,
            None => ProcessorSet::EMPTY,
        };
        if !route.masked && reached != route.processors() {
            return Err(format!(
                "pin {} reaches processors {reached:?}, its route says {:?}",
                r.pin,
                route.processors()
            ));
        }
        if !route.masked && reached.is_empty() {
            return Err(format!("unmasked pin {} reaches no processor", r.pin));
        }
        for cpu in reached.iter() {
            if service.registry().chain(cpu, r.vector).is_empty() {
                return Err(format!(
                    "pin {} delivers vector {:#x} to processor {cpu}, which has no object for it",
                    r.pin, r.vector
                ));
            }
        }
    }
    Ok(())
}

/// The device raises each of its messages: a connected message's
/// programming reaches exactly its connection's processors, each of which
/// holds an object for the vector; an unconnected one is unprogrammed.
fn raise_messages(service: &Service, shadow: &Shadow, d: &Device) -> Result<(), String> {
    let Some(m) = d.messages() else {
        return Ok(());
    };
    let programming = service.message_programming();
    let format = service.platform().msi_format();
    for k in 0..m.count {
        let update = programming
            .iter()
            .find(|u| u.device == d.id() && u.message == k)
            .ok_or_else(|| format!("device {} message {k} has no programming", d.id()))?;
        let live = shadow
            .live
            .iter()
            .find(|c| c.device == d.id() && c.message == Some(k));
        match (live, update.route) {
            (None, None) => {}
            (
                Some(c),
                Some(MessageRoute {
                    address,
                    data,
                    targets,
                    group,
                }),
            ) => {
                let (reached, vector) = msi_reach(&shadow.topo, address, data, format)?;
                if reached != c.processors()
                    || (group, targets) != (c.group, c.mask)
                    || vector != c.vector
                {
                    return Err(format!(
                        "device {} message {k} reaches {reached:?} with {vector:#x}, connected {:?} on {:#x}",
                        d.id(),
                        c.processors(),
                        c.vector
                    ));
                }
                for cpu in reached.iter() {
                    if service.registry().chain(cpu, vector).is_empty() {
                        return Err(format!(
                            "message {k} reaches processor {cpu} without an object"
                        ));
                    }
                }
            }
            (l, r) => {
                return Err(format!(
                    "device {} message {k}: connected {}, programmed {r:?}",
                    d.id(),
                    l.is_some()
                ));
            }
        }
    }
    Ok(())
}

/// A shadow connection as a sortable key: handle, vector, message,
/// processor group, mask. A RETARGET changes the key of every connection
/// it moves.
type Key = (Handle, u8, Option<u8>, u16, u64);

/// The shadow's live connections as sorted keys.
fn live_keys(shadow: &Shadow, keys: &mut Vec<Key>) {
    keys.clear();
    keys.extend(
        shadow
            .live
            .iter()
            .map(|c| (c.handle, c.vector, c.message, c.group, c.mask)),
    );
    keys.sort_unstable();
}

/// What one operation touched: the vectors of connections that came, went
/// or moved (keys in one of `before` and `after` only) and of pins whose
/// storm mark moved, ascending; and the handles of those connections.
#[derive(Default)]
struct Touched {
    vectors: Vec<u8>,
    handles: Vec<Handle>,
}

impl Touched {
    fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Refills `self` with what an operation that took the live keys from
    /// `before` to `after` and moved the storm marks `storm_moved` touched.
    fn fill(&mut self, before: &[Key], after: &[Key], storm_moved: u32, devices: &DeviceTable) {
        let (vectors, handles) = (&mut self.vectors, &mut self.handles);
        vectors.clear();
        handles.clear();
        let (mut b, mut a) = (before.iter().peekable(), after.iter().peekable());
        loop {
            let gone = match (b.peek(), a.peek()) {
                (None, None) => break,
                (Some(x), Some(y)) if x == y => {
                    b.next();
                    a.next();
                    continue;
                }
                (Some(x), Some(y)) => x < y,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            let key = if gone { b.next() } else { a.next() };
            if let Some(&(h, v, ..)) = key {
                vectors.push(v);
                handles.push(h);
            }
        }
        for pin in 0..IOAPIC_PINS {
            if storm_moved & (1 << pin) != 0
                && let Some(r) = devices.resource_on_pin(pin)
            {
                vectors.push(r.vector);
            }
        }
        vectors.sort_unstable();
        vectors.dedup();
        handles.sort_unstable();
        handles.dedup();
    }
}

/// The service against the shadow where one operation touched it: the
/// invariants of the touched vectors ([`Service::check_vectors`]), their
/// pins' routes, no dead handle among their connections, the touched
/// handles' connections; and after every operation the counts of objects
/// and connections and the storm marks.
fn compare_touched(
    service: &Service,
    shadow: &Shadow,
    devices: &DeviceTable,
    touched: &Touched,
) -> Result<(), String> {
    service
        .check_vectors(&touched.vectors)
        .map_err(|what| format!("invariant broken: {what}"))?;
    for &vector in &touched.vectors {
        let pins = devices.pins_of_vector(vector);
        for pin in (0..IOAPIC_PINS).filter(|p| pins & (1 << p) != 0) {
            check_pin(service, shadow, devices, pin)?;
        }
        for (h, _) in service.registry().on_vector(vector) {
            if shadow.dead.contains(&h) {
                return Err(format!(
                    "handle {:#x} accepted after its disconnect",
                    h.raw()
                ));
            }
        }
    }
    check_counts(service, shadow)?;
    for &h in &touched.handles {
        check_handle(service, shadow, h)?;
    }
    check_storm(service, shadow)
}

/// `pin`'s route is what the shadow's live connections imply.
fn check_pin(
    service: &Service,
    shadow: &Shadow,
    devices: &DeviceTable,
    pin: u8,
) -> Result<(), String> {
    let expected = expected_route(pin, shadow, devices)?;
    if service.route(pin) != Some(expected) {
        return Err(format!(
            "pin {pin} routed {:?}, live connections imply {expected:?}",
            service.route(pin)
        ));
    }
    Ok(())
}

/// Objects in use and live connections equal the shadow's, within the
/// quota.
fn check_counts(service: &Service, shadow: &Shadow) -> Result<(), String> {
    let objects = shadow.objects();
    let registry = service.registry();
    if registry.objects_in_use() != objects || objects > shadow.quota {
        return Err(format!(
            "objects in use {}, live masks hold {objects}, quota {}",
            registry.objects_in_use(),
            shadow.quota
        ));
    }
    if registry.connections() as usize != shadow.live.len() {
        return Err("live connection count differs".into());
    }
    Ok(())
}

/// The registry holds exactly the shadow's connections under `h` (message,
/// vector, processor group and mask; none for a handle the shadow holds
/// dead).
fn check_handle(service: &Service, shadow: &Shadow, h: Handle) -> Result<(), String> {
    type Held = (Option<u8>, u8, u16, u64);
    let registry = service.registry();
    let held = |c: &Connection| (c.message, c.vector, c.group, c.mask);
    let mine = || {
        shadow
            .live
            .iter()
            .filter(|c| c.handle == h)
            .map(|c| (c.message, c.vector, c.group, c.mask))
    };
    let theirs: Vec<Held> = match registry.group(h) {
        Some(g) => g.into_iter().map(held).collect(),
        None => {
            // Most handles hold one connection: compared without a list.
            let one = registry.get(h).map(held);
            if mine().eq(one) {
                return Ok(());
            }
            one.into_iter().collect()
        }
    };
    let mut mine: Vec<Held> = mine().collect();
    mine.sort_unstable();
    if theirs != mine {
        return Err(format!(
            "handle {:#x}: registry holds {theirs:?}, reference {mine:?}",
            h.raw()
        ));
    }
    Ok(())
}

/// The storm marks equal the shadow's.
fn check_storm(service: &Service, shadow: &Shadow) -> Result<(), String> {
    let (marks, reference) = (service.storm_bits(), shadow.storm);
    (marks == reference)
        .then_some(())
        .ok_or_else(|| format!("storm marks {marks:#x}, reference {reference:#x}"))
}

/// The service against the shadow in full: [`Service::check_invariants`],
/// every pin's route, the counts, every live handle's connections, no dead
/// handle live, the storm marks.
fn compare(service: &Service, shadow: &Shadow, devices: &DeviceTable) -> Result<(), String> {
    service
        .check_invariants()
        .map_err(|what| format!("invariant broken: {what}"))?;
    for pin in 0..IOAPIC_PINS {
        check_pin(service, shadow, devices, pin)?;
    }
    check_counts(service, shadow)?;
    let mut handles: Vec<Handle> = shadow.live.iter().map(|c| c.handle).collect();
    handles.dedup();
    for h in handles {
        check_handle(service, shadow, h)?;
    }
    if let Some(h) = shadow
        .dead
        .iter()
        .find(|&&h| service.registry().get(h).is_some())
    {
        return Err(format!(
            "handle {:#x} accepted after its disconnect",
            h.raw()
        ));
    }
    check_storm(service, shadow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_empty_input_ok() {
        assert_eq!(run(&[]), Ok(()));
    }

    /// The premise of skipping a snapshot of a service equal to the last
    /// one restored: a CONNECT the service refuses leaves it equal to its
    /// restored copy, one it accepts does not.
    #[test]
    fn a_refused_connect_leaves_the_service_equal_to_its_restored_copy() {
        let (mut accepted, mut refused) = (0, 0);
        for breaks in 0u8..=255 {
            // 4 processors, all online, quota 64, kernel mode, undeclared
            // model; one CONNECT of device `breaks % 12` with its break.
            let sequence = decode(&[3, 0, 0, 0, breaks, 0, 0, breaks, 0x0f, 0, 0, 0]);
            let Some(Op::Connect(req)) = sequence.ops.first().copied() else {
                panic!("not a CONNECT: {sequence:?}");
            };
            let platform = Platform::new(facts(4, 0xf, false, IrqchipMode::Kernel)).unwrap();
            let devices = DeviceTable::default_for(&platform);
            let mut service = Service::new(platform.clone(), devices.clone(), 64).unwrap();
            let copy = Service::restore(platform, devices, &service.snapshot()).unwrap();
            assert!(copy == service);
            match service.connect(&req, &ResidentRam) {
                Ok(_) => {
                    accepted += 1;
                    assert!(
                        copy != service,
                        "accepted {req:?} left the service as it was"
                    );
                }
                Err(_) => {
                    refused += 1;
                    assert!(copy == service, "refused {req:?} changed the service");
                }
            }
        }
        assert!(
            accepted > 0 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn decode_any_bytes_gives_a_valid_platform() {
        for seed in 0u8..=255 {
            let data: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let sequence = decode(&data);
            let facts = facts(
                sequence.cpus,
                sequence.online,
                sequence.x2apic,
                sequence.mode,
            );
            assert!(Platform::new(facts).is_ok(), "{sequence:?}");
            assert_eq!(run(&data), Ok(()), "{sequence:?}");
        }
    }
}
