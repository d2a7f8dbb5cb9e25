//! Structured connect / disconnect / assert sequences against a reference
//! of `docs/semantics.md` written for this harness.
//!
//! [`decode`] turns any byte string into a platform and a list of typed
//! operations ([`Sequence`], [`Op`]), the way `arbitrary` would: every
//! input is a valid sequence, and small mutations make small changes.
//! [`check`] runs it through [`Service::connect`], [`Service::disconnect`],
//! [`Service::report_storm_masked`] and snapshots, beside a shadow list of
//! live connections, and checks after every operation:
//!
//! - each CONNECT is accepted or refused exactly as the reference
//!   validator (`expected_verdict`, rules 2..11 in order) decides, with
//!   the effective mask it computes;
//! - every pin's route equals what the live connections imply: the union
//!   of their masks on the pin's vector, the oldest one's trigger mode,
//!   lowest priority for more than one processor, masked when none or
//!   while the storm guard holds it;
//! - the objects in use equal the live masks' processors and never exceed
//!   the quota;
//! - a disconnected (or forged) handle is never accepted again;
//! - an asserted device line reaches, through the route and its APIC
//!   destination ([`ApicDestination::for_route`]), only processors that
//!   hold an interrupt object on the vector, and reaches one whenever the
//!   device is connected;
//! - disconnecting everything returns to the initial state.
//!
//! Input format: byte 0 picks the processor count (`1 + b % 64`), byte 1 the
//! online mask (all, or a pattern), byte 2 the quota and x2APIC; then
//! operations as in [`Op`]'s variants, an opcode byte (`% 8`) and operands.

use crate::devices::{DeviceTable, InterruptMode, ShareDisposition};
use crate::handle::Handle;
use crate::platform::{Platform, PlatformFacts, present_mask};
use crate::ram::FlatRam;
use crate::route::{ApicDestination, PinRoute};
use crate::service::Service;
use crate::validate::{ConnectRequest, SERVICE_CONTEXT_PROBE, SPIN_LOCK_SIZE, Violation};
use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN, IOAPIC_PINS};

/// Guest RAM size of the sequences: pointers below it are resident.
pub const RAM_SIZE: u64 = 0x1_0000;

const QUOTAS: [u32; 8] = [64, 1, 2, 3, 5, 8, 16, 256];

/// One operation of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// IoConnectInterrupt with these parameters.
    Connect(ConnectRequest),
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
            0..=2 => Op::Connect(connect_request(&mut input, devices.as_ref())),
            3 => Op::Disconnect(usize::from(input.u8())),
            4 => Op::DisconnectRaw(input.u64()),
            5 => Op::Assert(u32::from(input.u8() % 9)),
            6 => match input.u8() {
                b @ 0..=0x3f => Op::StormMask(u32::from(b % 26)),
                0x40..=0x7f => Op::Snapshot,
                _ => Op::DisconnectAll,
            },
            _ => Op::Disconnect(usize::from(input.u8())),
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
    let device_id = u32::from(input.u8() % 9);
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
    }
}

/// One live connection in the shadow list, in connection order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Live {
    handle: Handle,
    device: u32,
    vector: u8,
    irql: u8,
    mode: InterruptMode,
    share: bool,
    mask: u64,
}

/// The reference's state beside the service.
struct Shadow {
    online: u64,
    quota: u32,
    live: Vec<Live>,
    issued: Vec<Handle>,
    dead: Vec<Handle>,
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
    for cpu in 0..64 {
        let bit = 1u64 << cpu;
        if mask & bit == 0 {
            continue;
        }
        let clash = shadow.live.iter().any(|c| {
            c.vector == vector
                && c.mask & bit != 0
                && !(c.share
                    && req.share_vector
                    && c.mode == req.interrupt_mode
                    && c.irql == req.irql)
        });
        if clash {
            return Err(Violation::SharingConflict { cpu });
        }
    }
    let mine = shadow.live.iter().filter(|c| c.device == req.device_id);
    let other_vector = mine.clone().any(|c| c.vector != vector);
    let highest = mine.map(|c| c.irql).max().unwrap_or(0);
    if other_vector && req.spin_lock == 0 {
        return Err(Violation::SpinLockRequired);
    }
    if req.synchronize_irql < highest {
        return Err(Violation::SynchronizeIrqlBelowDeviceIrql);
    }
    let objects: u32 = shadow.live.iter().map(|c| c.mask.count_ones()).sum();
    if objects + mask.count_ones() > shadow.quota {
        return Err(Violation::QuotaExceeded);
    }
    Ok(mask)
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
    let ram = FlatRam::new(0, RAM_SIZE as usize);
    let mut shadow = Shadow {
        online: sequence.online,
        quota: sequence.quota,
        live: Vec::new(),
        issued: Vec::new(),
        dead: Vec::new(),
        storm: 0,
        storm_count: 0,
    };
    let ops = sequence
        .ops
        .iter()
        .chain(core::iter::once(&Op::DisconnectAll));
    for (n, op) in ops.enumerate() {
        apply(&mut service, &mut shadow, &devices, &ram, op)
            .and_then(|()| compare(&service, &shadow, &devices))
            .map_err(|what| format!("op {n} ({op:?}): {what}"))?;
    }
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
    let result = service.disconnect(handle);
    match (position, result) {
        (Some(i), Ok(_)) => {
            let gone = shadow.live.remove(i);
            shadow.dead.push(handle);
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

/// The vector's connections changed: its pins' storm marks clear.
fn clear_storm(shadow: &mut Shadow, service: &Service, vector: u8) {
    shadow.storm &= !service.devices().pins_of_vector(vector);
}

fn apply(
    service: &mut Service,
    shadow: &mut Shadow,
    devices: &DeviceTable,
    ram: &FlatRam,
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
        Op::Disconnect(n) => {
            if let Some(&handle) = shadow.issued.get(n % shadow.issued.len().max(1)) {
                disconnect(service, shadow, handle)?;
            }
        }
        Op::DisconnectRaw(raw) => disconnect(service, shadow, Handle::from_raw(raw))?,
        Op::DisconnectAll => {
            let handles: Vec<Handle> = shadow.live.iter().map(|c| c.handle).collect();
            for handle in handles {
                disconnect(service, shadow, handle)?;
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

/// The service against the shadow, after every operation.
fn compare(service: &Service, shadow: &Shadow, devices: &DeviceTable) -> Result<(), String> {
    service
        .check_invariants()
        .map_err(|what| format!("invariant broken: {what}"))?;
    for pin in 0..IOAPIC_PINS {
        let expected = expected_route(pin, shadow, devices);
        if service.route(pin) != Some(expected) {
            return Err(format!(
                "pin {pin} routed {:?}, live connections imply {expected:?}",
                service.route(pin)
            ));
        }
    }
    let objects: u32 = shadow.live.iter().map(|c| c.mask.count_ones()).sum();
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
    for c in &shadow.live {
        if registry.get(c.handle).is_none_or(|r| r.mask != c.mask) {
            return Err(format!(
                "live handle {:#x} not in the registry",
                c.handle.raw()
            ));
        }
    }
    for h in &shadow.dead {
        if registry.get(*h).is_some() {
            return Err(format!(
                "handle {:#x} accepted after its disconnect",
                h.raw()
            ));
        }
    }
    if service.storm_bits() != shadow.storm {
        return Err(format!(
            "storm marks {:#x}, reference {:#x}",
            service.storm_bits(),
            shadow.storm
        ));
    }
    Ok(())
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
