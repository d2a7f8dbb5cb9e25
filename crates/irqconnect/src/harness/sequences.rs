//! Structured connect / disconnect / assert sequences against a reference
//! of `docs/semantics.md` written for this harness.
//!
//! [`decode`] turns any byte string into a platform and a list of typed
//! operations ([`Sequence`], [`Op`]), the way `arbitrary` would: every
//! input is a valid sequence, and small mutations make small changes.
//! [`check`] runs it through [`Service::connect`], [`Service::connect_ex`],
//! [`Service::disconnect`], [`Service::disconnect_ex`],
//! [`Service::report_storm_masked`] and snapshots, beside a shadow list of
//! live connections. Every operation is checked:
//!
//! - each CONNECT is accepted or refused exactly as the reference
//!   validator (`expected_verdict`, rules 2..11 in order) decides, with
//!   the effective mask it computes;
//! - each CONNECT_EX likewise (`expected_ex`: rules X1..X3, then the
//!   version's: FULLY_SPECIFIED as CONNECT, LINE_BASED per line resource,
//!   MESSAGE_BASED M1..M9 with its own reading of the policies); for
//!   messages, the table, the programmed address and data and the
//!   connection's objects name one set of processors, exactly the ones the
//!   message reaches on the bus (`irqchip::apic_bus::resolve`), inside the
//!   policy's set;
//! - each DISCONNECT_EX removes the whole group, and a group handle is
//!   refused by DISCONNECT;
//! - a new handle is none handed out before;
//! - a snapshot restores to a service equal to the one saved;
//! - an asserted device line reaches, through the route and its APIC
//!   destination ([`ApicDestination::for_route`]), only processors that
//!   hold an interrupt object on the vector, and reaches one whenever the
//!   device is connected;
//!
//! and then compared with the shadow where it touched it (the vectors of
//! connections that came or went and of pins whose storm mark moved, and
//! those handles), everywhere every [`FULL_CHECK_EVERY`] operations that
//! touched something and after the last operation:
//!
//! - the service's invariants ([`Service::check_vectors`] of the touched
//!   vectors; [`Service::check_invariants`] in full);
//! - the pins' routes (touched or all) equal what the live connections
//!   imply: the union of their masks on the pin's vector, the oldest one's
//!   trigger mode, lowest priority for more than one processor, masked
//!   when none or while the storm guard holds it;
//! - the handles' connections (touched or all live) are the shadow's, and
//!   no disconnected (or forged) handle is accepted again (among the
//!   touched vectors' connections; every dead handle in full);
//! - after every operation, the objects in use equal the live masks'
//!   processors and never exceed the quota, the live connections are the
//!   shadow's count, the storm marks are the shadow's;
//! - disconnecting everything returns to the initial state.
//!
//! Input format: byte 0 picks the processor count (`1 + b % 64`), byte 1 the
//! online mask (all, or a pattern), byte 2 the quota and x2APIC; then
//! operations as in [`Op`]'s variants, an opcode byte (`% 8`: 0, 1
//! CONNECT, 2 CONNECT_EX, 3 DISCONNECT, 4 forged DISCONNECT, 5 assert,
//! 6 storm / snapshot / disconnect all, 7 DISCONNECT_EX) and operands.

use std::collections::BTreeSet;

use crate::connect_ex::{BlockSpan, ConnectExRequest, ExRefusal, MESSAGE_TABLE_ALIGN};
use crate::devices::{Device, DeviceTable, InterruptMode, ShareDisposition};
use crate::error::Error;
use crate::handle::Handle;
use crate::messages::{IrqPolicy, MessageKind, MessageResource, MessageRoute};
use crate::platform::{Platform, PlatformFacts, present_mask};
use crate::ram::GuestRam;
use crate::route::{ApicDestination, PinRoute};
use crate::service::{ConnectedEx, Service};
use crate::validate::{ConnectRequest, SERVICE_CONTEXT_PROBE, SPIN_LOCK_SIZE, Violation};
use irqchip::apic_bus::{self, ApicTarget};
use irqchip::msi::{self, Msi, MsiFormat};
use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN, IOAPIC_PINS};
use irqconnect_abi::pv::{
    HIGH_LEVEL, connect_version, interrupt_mode, message_table_size, polarity,
};

/// Guest RAM size of the sequences: pointers below it are resident.
pub const RAM_SIZE: u64 = 0x1_0000;

/// The full comparison of the service with the reference (`compare`) runs
/// after every this many operations that changed the live connections or
/// the storm marks, and after the last operation; the operations between
/// compare what they touched (`compare_touched`).
pub const FULL_CHECK_EVERY: u32 = 16;

/// Guest RAM of [`RAM_SIZE`] zero bytes at 0 (the service only asks
/// whether its pointers are resident and reads nothing that matters),
/// without a buffer to allocate per input.
struct ResidentRam;

impl ResidentRam {
    fn check(gpa: u64, len: u64) -> Result<(), Error> {
        if resident(gpa, len) {
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
        resident(gpa, len)
    }
}

const QUOTAS: [u32; 8] = [64, 1, 2, 3, 5, 8, 16, 256];

/// Where the sequences pretend the CONNECT_EX block lies (the message
/// table must not overlap it).
const BLOCK: BlockSpan = BlockSpan {
    start: 0x3000,
    len: 120,
};

/// A message table buffer that fits every device.
const TABLE_AT: u64 = 0x4000;

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
}

/// A platform and the operations to run on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// Processors.
    pub cpus: u32,
    /// Online processors.
    pub online: u64,
    /// The object quota.
    pub quota: u32,
    /// Whether the vCPUs run x2APIC (physical destinations).
    pub x2apic: bool,
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
    let cpus = 1 + u32::from(input.u8() % 64);
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
    let platform = facts(cpus, online, x2apic);
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
                0x40..=0x7f => Op::Snapshot,
                _ => Op::DisconnectAll,
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
        ops,
    }
}

fn facts(cpus: u32, online: u64, x2apic: bool) -> PlatformFacts {
    let mut facts = PlatformFacts::uniform(cpus);
    facts.online_mask = online;
    facts.x2apic = x2apic;
    // Distinct, non-identity APIC IDs, so a wrong index-to-ID mapping shows.
    facts.apic_ids = (0..cpus).map(|i| i * 2 + 1).collect();
    facts
}

/// A CONNECT, mostly built from one of the device's own resources so that
/// most requests get deep into the rules; flags break one field at a time.
fn connect_request(input: &mut Input<'_>, devices: Option<&DeviceTable>) -> ConnectRequest {
    let device_id = u32::from(input.u8() % 12);
    let which = input.u8();
    let flags = input.u8();
    let breaks = input.u8();
    let mask = match flags & 3 {
        0 => u64::from(input.u8()),
        1 => u64::MAX,
        2 => 1 << (input.u8() % 64),
        _ => input.u64(),
    };
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
/// takes bit 1 alone as its fallback routine. Bit 3: no processor
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
        group: u16::from(breaks(1)),
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

/// One live connection in the shadow list, in connection order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Live {
    /// The handle the guest holds: the connection's, or its group's.
    handle: Handle,
    device: u32,
    vector: u8,
    irql: u8,
    mode: InterruptMode,
    share: bool,
    mask: u64,
    spin_lock: u64,
    /// The version that made it (CONNECT: FULLY_SPECIFIED).
    version: u32,
    /// The message number, for a message.
    message: Option<u8>,
}

impl Live {
    fn in_group(&self) -> bool {
        matches!(
            self.version,
            connect_version::LINE_BASED | connect_version::MESSAGE_BASED
        )
    }
}

/// The reference's state beside the service.
struct Shadow {
    online: u64,
    quota: u32,
    live: Vec<Live>,
    issued: Vec<Handle>,
    dead: BTreeSet<Handle>,
    storm: u32,
    storm_count: u32,
}

fn resident(address: u64, len: u64) -> bool {
    address.checked_add(len).is_some_and(|end| end <= RAM_SIZE)
}

/// `docs/semantics.md`'s CONNECT rules 2..11, in order, as this harness reads
/// them: the effective mask, or the first rule that fails.
fn expected_verdict(
    req: &ConnectRequest,
    shadow: &Shadow,
    devices: &DeviceTable,
) -> Result<u64, Violation> {
    let mask = req.processor_enable_mask & shadow.online;
    if mask == 0 {
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
    if req.synchronize_irql > irqconnect_abi::pv::HIGH_LEVEL {
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
    // The first processor of the mask whose chain on the vector holds a
    // connection the request may not share with.
    let clashing = shadow
        .live
        .iter()
        .filter(|c| {
            c.vector == vector
                && !(c.share
                    && req.share_vector
                    && c.mode == req.interrupt_mode
                    && c.irql == req.irql)
        })
        .fold(0, |m, c| m | c.mask)
        & mask;
    if clashing != 0 {
        return Err(Violation::SharingConflict {
            cpu: clashing.trailing_zeros(),
        });
    }
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
    let objects: u32 = shadow.live.iter().map(|c| c.mask.count_ones()).sum();
    if objects + mask.count_ones() > shadow.quota {
        return Err(Violation::QuotaExceeded);
    }
    Ok(mask)
}

/// One connection CONNECT_EX is expected to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Planned {
    vector: u8,
    mode: InterruptMode,
    share: bool,
    /// Its processors (for a message: where its route reaches).
    mask: u64,
    message: Option<u8>,
}

/// What CONNECT_EX is expected to do.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ExpectedEx {
    version_used: u32,
    unified_irql: u8,
    planned: Vec<Planned>,
    /// MESSAGE_BASED: the table size.
    table_required: u32,
}

/// The processors a message for `wanted` reaches, by the documented
/// destination rule (`route::ApicDestination`): the whole set when an
/// 8-bit logical destination names it (xAPIC: processors 0..7; x2APIC:
/// also each APIC ID equal to its index; 0xFF only with at most 8
/// processors, since it broadcasts), else only its lowest processor
/// (physical), which a compatibility-format MSI can address only with an
/// APIC ID below 256.
fn reach(wanted: u64, platform: &Platform) -> u64 {
    let low = wanted < 0x100
        && (wanted != 0xff || platform.cpu_count() <= 8)
        && (0..8u32)
            .filter(|i| wanted & (1 << i) != 0)
            .all(|i| !platform.x2apic() || platform.apic_id(i) == Some(i));
    if low {
        return wanted;
    }
    let first = wanted.trailing_zeros();
    match platform.apic_id(first) {
        Some(id) if id < 0x100 => 1 << first,
        _ => 0,
    }
}

/// The processors of message `k`, by `docs/semantics.md` rule M7 as this
/// harness reads it.
fn policy_set(m: &MessageResource, k: u8, allowed: u64) -> u64 {
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

/// `docs/semantics.md`'s CONNECT_EX rules, in order, as this harness reads
/// them.
fn expected_ex(
    req: &ConnectExRequest,
    shadow: &Shadow,
    platform: &Platform,
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
        if req.group != 0 {
            return Err(Violation::GroupNotPresent.into());
        }
        let classic = req.classic();
        let mask = expected_verdict(&classic, shadow, devices).map_err(|v| match v {
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
    let restrict = |affinity: u64| {
        if req.processor_enable_mask == 0 {
            affinity
        } else {
            affinity & req.processor_enable_mask
        }
    };
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
                processor_enable_mask: restrict(r.affinity),
                service_routine: routine,
                service_context: req.service_context,
                spin_lock: req.spin_lock,
                version: LINE_BASED,
            };
            let mask = expected_verdict(&member, shadow, devices)?;
            planned.push(Planned {
                vector: r.vector,
                mode: r.mode,
                share: member.share_vector,
                mask,
                message: None,
            });
        }
        let objects =
            live_objects(shadow) + planned.iter().map(|p| p.mask.count_ones()).sum::<u32>();
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
    if req.message_table_length < required {
        return refuse(Violation::TableTooSmall);
    }
    let block_end = BLOCK.start + BLOCK.len;
    let table_end = req.message_table.checked_add(u64::from(required));
    let usable = req.message_table.is_multiple_of(MESSAGE_TABLE_ALIGN)
        && table_end.is_some_and(|end| {
            end <= RAM_SIZE && (end <= BLOCK.start || req.message_table >= block_end)
        });
    if !usable {
        return refuse(Violation::TableNotUsable);
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
    let allowed = restrict(messages.affinity & shadow.online);
    if allowed == 0 {
        return refuse(Violation::MessageTargetsEmpty);
    }
    let mut planned = Vec::new();
    for k in 0..messages.count {
        let vector = messages.first_vector + k;
        let mask = reach(policy_set(messages, k, allowed), platform);
        if mask == 0 {
            return refuse(Violation::MessageTargetsEmpty);
        }
        let taken = shadow
            .live
            .iter()
            .filter(|c| c.vector == vector)
            .fold(0, |m, c| m | c.mask);
        if mask & taken != 0 {
            return refuse(Violation::SharingConflict {
                cpu: (mask & taken).trailing_zeros(),
            });
        }
        planned.push(Planned {
            vector,
            mode: InterruptMode::Latched,
            share: false,
            mask,
            message: Some(k),
        });
    }
    let objects = live_objects(shadow) + planned.iter().map(|p| p.mask.count_ones()).sum::<u32>();
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

fn live_objects(shadow: &Shadow) -> u32 {
    shadow.live.iter().map(|c| c.mask.count_ones()).sum()
}

/// The APICs of `platform` as its guest programs them: xAPIC flat with
/// logical ID `1 << index`, or x2APIC with the LDR its APIC ID implies.
fn bus_targets(platform: &Platform) -> Vec<ApicTarget> {
    (0..platform.cpu_count())
        .map(|i| {
            let id = platform.apic_id(i).unwrap_or(u32::MAX);
            let (x2apic, logical_id) = if platform.x2apic() {
                (true, ((id >> 4) << 16) | (1 << (id & 0xf)))
            } else {
                (false, if i < 8 { 1 << i } else { 0 })
            };
            ApicTarget {
                apic_id: id,
                x2apic,
                logical_id,
                dfr_flat: true,
                hw_enabled: true,
                sw_enabled: true,
                arbitration_priority: 0,
            }
        })
        .collect()
}

/// The processors (first 64) an MSI with `address` and `data` reaches on
/// the bus, before lowest-priority arbitration, and its vector.
fn msi_reach(address: u64, data: u32, platform: &Platform) -> Result<(u64, u8), String> {
    let decoded = msi::decode(Msi { address, data }, MsiFormat::Compatibility)
        .map_err(|e| format!("message {address:#x}/{data:#x} does not decode: {e:?}"))?;
    let message = decoded.bus_message();
    let set = apic_bus::resolve(&message, &bus_targets(platform), None);
    let mask = set
        .iter()
        .filter(|&i| i < 64)
        .fold(0u64, |m, i| m | (1 << i));
    Ok((mask, message.vector))
}

/// CONNECT_EX's answer against the reference's plan; for messages, the
/// table, the programming and the bus agree.
fn check_connected_ex(
    req: &ConnectExRequest,
    want: &ExpectedEx,
    done: &ConnectedEx,
    device: Option<&Device>,
    platform: &Platform,
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
    for ((p, e), u) in want.planned.iter().zip(&table.entries).zip(&done.messages) {
        let route = u.route.ok_or("a connected message is unprogrammed")?;
        let (reached, vector) = msi_reach(e.message_address, e.message_data, platform)?;
        let entry_ok = e.vector == u32::from(p.vector)
            && e.irql == p.vector >> 4
            && e.mode == interrupt_mode::LATCHED
            && e.polarity == polarity::ACTIVE_HIGH
            && Some(e.message_id as u8) == p.message
            && e.group == 0;
        let same_set = e.target_processor_set == p.mask
            && route.targets == p.mask
            && reached == p.mask
            && vector == p.vector;
        let same_route = (route.address, route.data) == (e.message_address, e.message_data)
            && Some(u.message) == p.message
            && u.device == req.device_id
            && Some(u.test_device) == m.test_device;
        if !(entry_ok && same_set && same_route) {
            return Err(format!(
                "message {:?}: entry {e:?}, update {u:?}, reaches {reached:#x} vector {vector:#x}, reference {p:?}",
                p.message
            ));
        }
    }
    Ok(())
}

/// The route of `pin` the shadow's live connections imply.
fn expected_route(pin: u8, shadow: &Shadow, devices: &DeviceTable) -> PinRoute {
    let Some(resource) = devices
        .devices()
        .iter()
        .flat_map(|d| d.resources())
        .find(|r| r.pin == pin)
    else {
        return PinRoute::UNUSED;
    };
    let on: Vec<&Live> = shadow
        .live
        .iter()
        .filter(|c| c.vector == resource.vector)
        .collect();
    let destination = on.iter().fold(0, |m, c| m | c.mask);
    let mode = on.first().map_or(resource.mode, |c| c.mode);
    PinRoute {
        masked: destination == 0 || shadow.storm & (1 << pin) != 0,
        vector: resource.vector,
        trigger: match mode {
            InterruptMode::LevelSensitive => irqchip::apic_bus::TriggerMode::Level,
            InterruptMode::Latched => irqchip::apic_bus::TriggerMode::Edge,
        },
        destination,
        lowest_priority: destination.count_ones() > 1,
        connections: on.len() as u32,
    }
}

/// Decodes `data` and checks the sequence. `Err` names the first broken
/// check.
pub fn run(data: &[u8]) -> Result<(), String> {
    check(&decode(data))
}

/// Runs `sequence` (see the module documentation). `Err` names the first
/// broken check.
pub fn check(sequence: &Sequence) -> Result<(), String> {
    let facts = facts(sequence.cpus, sequence.online, sequence.x2apic);
    let platform = Platform::new(facts).map_err(|e| format!("platform: {e}"))?;
    let devices = DeviceTable::default_for(&platform);
    let mut service = Service::new(platform, devices.clone(), sequence.quota)
        .map_err(|e| format!("service: {e}"))?;
    let fresh = service.clone();
    let ram = ResidentRam;
    let mut shadow = Shadow {
        online: sequence.online,
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
    let mut keys = live_keys(&shadow);
    for (n, op) in ops.enumerate() {
        let before = core::mem::take(&mut keys);
        let storm = shadow.storm;
        apply(&mut service, &mut shadow, &devices, &ram, op)
            .and_then(|()| {
                keys = live_keys(&shadow);
                let touched = touched(&before, &keys, storm ^ shadow.storm, &devices);
                compare_touched(&service, &shadow, &devices, &touched)?;
                if !touched.is_empty() {
                    changes += 1;
                    if changes.is_multiple_of(FULL_CHECK_EVERY) {
                        compare(&service, &shadow, &devices)?;
                    }
                }
                Ok(())
            })
            .map_err(|what| format!("op {n} ({op:?}): {what}"))?;
    }
    compare(&service, &shadow, &devices).map_err(|what| format!("after the last op: {what}"))?;
    // Everything disconnected: the live state of a fresh service, given
    // the same storm-guard marks (a VMM fact, not connection state).
    let mut marked = fresh;
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
    op: &Op,
) -> Result<(), String> {
    match *op {
        Op::Connect(req) => {
            let expected = expected_verdict(&req, shadow, devices);
            let got = service.connect(&req, ram);
            match (&expected, &got) {
                (Ok(mask), Ok(done)) if done.effective_mask == *mask => {
                    if shadow.issued.contains(&done.handle) || done.handle.raw() == 0 {
                        return Err(format!("handle {:#x} handed out twice", done.handle.raw()));
                    }
                    shadow.issued.push(done.handle);
                    shadow.live.push(Live {
                        handle: done.handle,
                        device: req.device_id,
                        vector: req.vector as u8,
                        irql: req.irql,
                        mode: req.interrupt_mode,
                        share: req.share_vector,
                        mask: *mask,
                        spin_lock: req.spin_lock,
                        version: connect_version::FULLY_SPECIFIED,
                        message: None,
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
            let expected = expected_ex(&req, shadow, service.platform(), devices);
            let got = service.connect_ex(&req, BLOCK, ram);
            match (&expected, &got) {
                (Ok(want), Ok(done)) => {
                    let device = devices.device(req.device_id);
                    check_connected_ex(&req, want, done, device, service.platform())?;
                    if shadow.issued.contains(&done.handle) || done.handle.raw() == 0 {
                        return Err(format!("handle {:#x} handed out twice", done.handle.raw()));
                    }
                    shadow.issued.push(done.handle);
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
                            spin_lock,
                            version: want.version_used,
                            message: p.message,
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
            let restored = Service::restore(
                service.platform().clone(),
                service.devices().clone(),
                &service.snapshot(),
            )
            .map_err(|e| format!("restore of a snapshot failed: {e}"))?;
            if restored != *service {
                return Err("restore(snapshot(x)) differs from x".into());
            }
        }
        Op::Assert(device) => assert_line(service, shadow, device)?,
    }
    Ok(())
}

/// The device raises its line: the programmed route must reach only
/// processors with an object on the vector, and one when it is connected.
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
        let dest = ApicDestination::for_route(&route, service.platform());
        if let ApicDestination::Physical { apic_id } = dest
            && !service.platform().apic_ids().contains(&apic_id)
        {
            return Err(format!("physical destination {apic_id} is no processor"));
        }
        let reached = dest.processors(service.platform());
        if reached & !route.destination != 0 {
            return Err(format!(
                "pin {} reaches processors {reached:#x} outside its route {:#x}",
                r.pin, route.destination
            ));
        }
        if !route.masked && reached == 0 {
            return Err(format!("unmasked pin {} reaches no processor", r.pin));
        }
        for cpu in 0..64u32 {
            if reached & (1 << cpu) != 0 && service.registry().chain(cpu, r.vector).is_empty() {
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
                }),
            ) => {
                let (reached, vector) = msi_reach(address, data, service.platform())?;
                if reached != c.mask || targets != c.mask || vector != c.vector {
                    return Err(format!(
                        "device {} message {k} reaches {reached:#x} with {vector:#x}, connected {:#x} on {:#x}",
                        d.id(),
                        c.mask,
                        c.vector
                    ));
                }
                for cpu in 0..64u32 {
                    if reached & (1 << cpu) != 0 && service.registry().chain(cpu, vector).is_empty()
                    {
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

/// The shadow's live connections as sortable keys: handle, vector,
/// message.
fn live_keys(shadow: &Shadow) -> Vec<(Handle, u8, Option<u8>)> {
    let mut keys: Vec<_> = shadow
        .live
        .iter()
        .map(|c| (c.handle, c.vector, c.message))
        .collect();
    keys.sort_unstable();
    keys
}

/// What one operation touched: the vectors of connections that came or
/// went (keys in one of `before` and `after` only) and of pins whose
/// storm mark moved, ascending; and the handles that came or went.
struct Touched {
    vectors: Vec<u8>,
    handles: Vec<Handle>,
}

impl Touched {
    fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }
}

fn touched(
    before: &[(Handle, u8, Option<u8>)],
    after: &[(Handle, u8, Option<u8>)],
    storm_moved: u32,
    devices: &DeviceTable,
) -> Touched {
    let mut vectors = Vec::new();
    let mut handles = Vec::new();
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
        if let Some(&(h, v, _)) = key {
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
    Touched { vectors, handles }
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
    let expected = expected_route(pin, shadow, devices);
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
    let objects = live_objects(shadow);
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

/// The registry holds exactly the shadow's connections under `h` (none
/// for a handle the shadow holds dead).
fn check_handle(service: &Service, shadow: &Shadow, h: Handle) -> Result<(), String> {
    let registry = service.registry();
    let mut mine: Vec<(Option<u8>, u8, u64)> = shadow
        .live
        .iter()
        .filter(|c| c.handle == h)
        .map(|c| (c.message, c.vector, c.mask))
        .collect();
    mine.sort_unstable();
    let theirs: Vec<(Option<u8>, u8, u64)> = match registry.group(h) {
        Some(g) => g.iter().map(|c| (c.message, c.vector, c.mask)).collect(),
        None => registry
            .get(h)
            .map(|c| vec![(c.message, c.vector, c.mask)])
            .unwrap_or_default(),
    };
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
    for h in &shadow.dead {
        if service.registry().get(*h).is_some() {
            return Err(format!(
                "handle {:#x} accepted after its disconnect",
                h.raw()
            ));
        }
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

    #[test]
    fn decode_any_bytes_gives_a_valid_platform() {
        for seed in 0u8..=255 {
            let data: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let sequence = decode(&data);
            let facts = facts(sequence.cpus, sequence.online, sequence.x2apic);
            assert!(Platform::new(facts).is_ok(), "{sequence:?}");
            assert_eq!(run(&data), Ok(()), "{sequence:?}");
        }
    }
}
