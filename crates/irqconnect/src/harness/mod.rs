//! Fuzz and property-test entry points: arbitrary bytes become guest memory
//! and doorbell writes, run through the same path the VMM calls
//! ([`Service::handle_doorbell`]), with every invariant checked after each
//! step. A broken invariant panics, which is what a fuzzer looks for.
//!
//! Session input format ([`run_session`]):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | the platform ([`session_platform`]): `1 + b % 16` processors below 0xf0, 75..=255 with x2APIC from 0xf0; all online, default device table |
//! | 1 | `n`: number of steps |
//! | 2 .. 2 + 4n | steps, each a little-endian `u32` |
//! | the rest | guest RAM at guest-physical 0 |
//!
//! A step whose top nibble is `0xf` is not a doorbell: it writes the handle
//! of the last successful CONNECT or CONNECT_EX (little-endian `u64`) at RAM offset
//! `step & 0x0fff_ffff`, so a fuzzer can disconnect live handles. Any other
//! step is a doorbell write of that value. Input that ends early is padded
//! with nothing: missing steps are not run.

use core::mem::offset_of;

use irqconnect_abi::pv::{
    Connect, ConnectEx, Disconnect, DisconnectEx, QueryMessages, QueryPlatform, QueryResources,
    QueryRoute, RequestHeader, connect_version, opcode,
};
use zerocopy::{FromZeros, IntoBytes};

use crate::devices::DeviceTable;
use crate::handle::Handle;
use crate::platform::{DEFAULT_OBJECT_QUOTA, IrqchipMode, Platform, PlatformFacts};
use crate::ram::{FlatRam, GuestRam};
use crate::request::Outcome;
use crate::service::Service;

pub mod pv_requests;
pub mod ram;
mod reference;
pub mod sequences;

/// Step values with this top nibble are handle copies, not doorbells.
pub const COPY_HANDLE_TAG: u32 = 0xf000_0000;

/// The platform a session's byte 0 picks: below 0xf0, `1 + b % 16`
/// processors (kernel irqchip, xAPIC); from 0xf0, `255 - 12 * (0xff - b)`
/// processors (75..=255: two to four processor groups) offering x2APIC,
/// split irqchip (15-bit destinations).
pub fn session_platform(b: u8) -> PlatformFacts {
    if b < 0xf0 {
        return PlatformFacts::uniform(1 + u32::from(b % 16));
    }
    let mut facts = PlatformFacts::uniform(255 - 12 * u32::from(0xff - b));
    facts.x2apic = true;
    facts.irqchip_mode = IrqchipMode::Split;
    facts
}

/// Runs one doorbell write on a fresh 4-processor test platform with
/// `memory` as guest RAM at guest-physical 0, checks the invariants, and
/// returns the outcome. Panics when an invariant breaks.
pub fn one_request(memory: &[u8], doorbell: u32) -> Outcome {
    let Ok(mut service) = Service::with_defaults(4) else {
        panic!("the default platform must build");
    };
    let mut ram = FlatRam::from_bytes(0, memory.to_vec());
    let outcome = step(&mut service, &mut ram, doorbell, memory);
    assert_invariants(&service);
    outcome
}

/// Runs a session (see the module docs) and returns each doorbell's
/// outcome. Panics when an invariant breaks.
pub fn run_session(data: &[u8]) -> Vec<Outcome> {
    let facts = session_platform(data.first().copied().unwrap_or(0));
    let steps = usize::from(data.get(1).copied().unwrap_or(0));
    let step_bytes = data.get(2..).unwrap_or(&[]);
    let steps_len = (steps * 4).min(step_bytes.len() / 4 * 4);
    let (step_bytes, memory) = step_bytes.split_at(steps_len);
    let Ok(platform) = Platform::new(facts) else {
        panic!("a session platform must build");
    };
    let devices = DeviceTable::default_for(&platform);
    let Ok(mut service) = Service::new(platform, devices, DEFAULT_OBJECT_QUOTA) else {
        panic!("the default service must build");
    };
    let mut ram = FlatRam::from_bytes(0, memory.to_vec());
    let mut last_handle: Option<Handle> = None;
    let mut dead: Vec<Handle> = Vec::new();
    let mut outcomes = Vec::new();
    for chunk in step_bytes.chunks_exact(4) {
        let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if value & 0xf000_0000 == COPY_HANDLE_TAG {
            if let Some(h) = last_handle {
                let _ = ram.write(u64::from(value & 0x0fff_ffff), &h.raw().to_le_bytes());
            }
            continue;
        }
        let before_handles: Vec<Handle> = service.registry().iter().map(|(h, _)| h).collect();
        let before = ram.bytes().to_vec();
        let outcome = step(&mut service, &mut ram, value, &before);
        assert_invariants(&service);
        for h in before_handles {
            if service.registry().get(h).is_none() {
                dead.push(h);
            }
        }
        for h in &dead {
            assert!(
                service.registry().get(*h).is_none(),
                "handle {:#x} accepted after its disconnect",
                h.raw()
            );
        }
        let handle_at = match &outcome {
            Outcome::Answered(a) if a.refusal.is_none() && a.opcode == opcode::CONNECT => {
                Some(offset_of!(Connect, handle))
            }
            Outcome::Answered(a) if a.refusal.is_none() && a.opcode == opcode::CONNECT_EX => {
                Some(offset_of!(ConnectEx, handle))
            }
            _ => None,
        };
        if let Some(offset) = handle_at {
            let at = (value as usize).saturating_add(offset);
            if let Some(b) = ram.bytes().get(at..at.saturating_add(8)) {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(b);
                last_handle = Some(Handle::from_raw(u64::from_le_bytes(raw)));
            }
        }
        outcomes.push(outcome);
    }
    outcomes
}

/// One doorbell with the path's own postconditions checked.
fn step(service: &mut Service, ram: &mut FlatRam, doorbell: u32, before: &[u8]) -> Outcome {
    let objects = service.registry().objects_in_use();
    let routes = service.routes().to_vec();
    let outcome = service.handle_doorbell(ram, doorbell);
    match &outcome {
        Outcome::Unreadable { .. } | Outcome::Unwritable { .. } => {
            assert_eq!(ram.bytes(), before, "no answer must leave memory alone");
            assert_eq!(service.registry().objects_in_use(), objects);
            assert_eq!(service.routes(), routes);
        }
        Outcome::Answered(answer) => {
            let at = (doorbell as usize).saturating_add(offset_of!(RequestHeader, status));
            let status = ram
                .bytes()
                .get(at..at.saturating_add(4))
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            assert_eq!(status, Some(answer.status), "the status must be written");
            if answer.refusal.is_some() {
                assert_eq!(service.registry().objects_in_use(), objects);
                assert_eq!(service.routes(), routes, "a refusal must change no route");
            }
            for update in &answer.routes {
                assert_eq!(service.route(update.pin), Some(update.route));
            }
        }
    }
    outcome
}

fn assert_invariants(service: &Service) {
    if let Err(what) = service.check_invariants() {
        panic!("invariant broken: {what}");
    }
}

/// Seed RAM: request blocks at fixed offsets of 4 KiB.
struct SeedRam(Vec<u8>);

impl SeedRam {
    fn new() -> Self {
        Self(vec![0u8; 0x1000])
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        if let Some(dst) = self.0.get_mut(offset..offset + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    /// A session (module documentation) on platform byte `platform`
    /// running `steps` over this RAM.
    fn session(&self, platform: u8, steps: &[u32]) -> Vec<u8> {
        let mut data = vec![platform, steps.len() as u8];
        for s in steps {
            data.extend_from_slice(&s.to_le_bytes());
        }
        data.extend_from_slice(&self.0);
        data
    }
}

/// Named seed inputs for [`run_session`]: valid requests of every opcode,
/// connect/disconnect cycles and malformed headers. A fuzz corpus can start
/// from these.
pub fn seed_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    // Layout of the seed RAM: one block per 0x200 bytes.
    let mut ram = SeedRam::new();
    let mut put = |offset: usize, bytes: &[u8]| ram.put(offset, bytes);
    let mut qp = QueryPlatform::new_zeroed();
    qp.header = RequestHeader::new::<QueryPlatform>(opcode::QUERY_PLATFORM);
    put(0x000, qp.as_bytes());
    let mut qr = QueryResources::new_zeroed();
    qr.header = RequestHeader::new::<QueryResources>(opcode::QUERY_RESOURCES);
    qr.device_id = 6;
    put(0x600, qr.as_bytes());
    let mut c = Connect::new_zeroed();
    c.header = RequestHeader::new::<Connect>(opcode::CONNECT);
    c.device_id = 2;
    c.vector = 0x70;
    c.irql = 7;
    c.synchronize_irql = 7;
    c.share_vector = 1;
    c.processor_enable_mask = 0b11;
    c.service_routine = 0x10_0000;
    c.service_context = 0x800;
    put(0x700, c.as_bytes());
    let mut d = Disconnect::new_zeroed();
    d.header = RequestHeader::new::<Disconnect>(opcode::DISCONNECT);
    put(0x780, d.as_bytes());
    let mut route = QueryRoute::new_zeroed();
    route.header = RequestHeader::new::<QueryRoute>(opcode::QUERY_ROUTE);
    route.pin = 18;
    put(0x7c0, route.as_bytes());
    // CONNECT_EX MESSAGE_BASED of device 10 (8 MSI-X messages) with its
    // table at 0xa00 (328 bytes), then DISCONNECT_EX, QUERY_MESSAGES of
    // device 9, and a LINE_BASED CONNECT_EX of device 6 with its lock.
    let mut cx = ConnectEx::request(connect_version::MESSAGE_BASED, 10, 0x10_0000);
    cx.service_context = 0x800;
    cx.message_table = 0xa00;
    cx.message_table_length = 0x400;
    put(0x800, cx.as_bytes());
    let mut dx = DisconnectEx::new_zeroed();
    dx.header = RequestHeader::new::<DisconnectEx>(opcode::DISCONNECT_EX);
    dx.version = connect_version::MESSAGE_BASED;
    put(0x880, dx.as_bytes());
    let mut qm = QueryMessages::new_zeroed();
    qm.header = RequestHeader::new::<QueryMessages>(opcode::QUERY_MESSAGES);
    qm.device_id = 9;
    put(0x8c0, qm.as_bytes());
    let mut lx = ConnectEx::request(connect_version::LINE_BASED, 6, 0x10_0000);
    lx.synchronize_irql = 10;
    lx.spin_lock = 0x9f8;
    put(0x900, lx.as_bytes());
    let mut short = cx;
    short.device_id = 9;
    short.message_table_length = 0x20;
    put(0x980, short.as_bytes());
    let session = |steps: &[u32]| ram.session(3, steps);
    let copy_to_disconnect = COPY_HANDLE_TAG | (0x780 + 16);
    seeds.push(("query_platform", session(&[0x000])));
    seeds.push(("query_resources_device_6", session(&[0x600])));
    seeds.push((
        "connect_route_disconnect",
        session(&[0x700, 0x7c0, copy_to_disconnect, 0x780, 0x7c0]),
    ));
    seeds.push(("connect_twice_shared", session(&[0x700, 0x700, 0x7c0])));
    let copy_to_disconnect_ex = COPY_HANDLE_TAG | (0x880 + 24);
    seeds.push((
        "connect_ex_messages_table_disconnect_ex",
        session(&[0x800, copy_to_disconnect_ex, 0x880, 0x8c0, 0x800]),
    ));
    seeds.push((
        "connect_ex_line_based_then_classic_disconnect",
        session(&[0x900, copy_to_disconnect, 0x780, 0x7c0]),
    ));
    seeds.push(("connect_ex_table_too_small", session(&[0x980, 0x8c0])));
    seeds.push((
        "misaligned_and_unreadable",
        session(&[0x704, 0x0fff, 0x10_0000]),
    ));
    seeds.extend(seed_corpus_v2());
    seeds
}

/// ABI version 2 seeds on a 255-processor x2APIC platform (byte 0 0xff):
/// the version 2 queries, SET_APIC_MODEL, a FULLY_SPECIFIED_GROUP connect
/// in group 1, RETARGET of it and of a MESSAGE_BASED connection.
fn seed_corpus_v2() -> Vec<(&'static str, Vec<u8>)> {
    use irqconnect_abi::pv::{
        ABI_VERSION_2, QueryMessagesV2, QueryPlatformV2, QueryResourcesV2, QueryRouteV2, Retarget,
        SetApicModel, apic_model,
    };
    let mut ram = SeedRam::new();
    let mut put = |offset: usize, bytes: &[u8]| ram.put(offset, bytes);
    let mut qp = QueryPlatformV2::new_zeroed();
    qp.base.header =
        RequestHeader::versioned::<QueryPlatformV2>(ABI_VERSION_2, opcode::QUERY_PLATFORM);
    put(0x000, qp.as_bytes()); // 1144 bytes
    let mut model = SetApicModel::new_zeroed();
    model.header = RequestHeader::versioned::<SetApicModel>(ABI_VERSION_2, opcode::SET_APIC_MODEL);
    model.model = apic_model::X2APIC;
    put(0x480, model.as_bytes());
    let mut qr = QueryResourcesV2::new_zeroed();
    qr.base.header =
        RequestHeader::versioned::<QueryResourcesV2>(ABI_VERSION_2, opcode::QUERY_RESOURCES);
    qr.base.device_id = 2;
    put(0x4c0, qr.as_bytes()); // 0x1b8 bytes
    let mut route = QueryRouteV2::new_zeroed();
    route.base.header =
        RequestHeader::versioned::<QueryRouteV2>(ABI_VERSION_2, opcode::QUERY_ROUTE);
    route.base.pin = 18;
    put(0x680, route.as_bytes());
    // FULLY_SPECIFIED_GROUP of device 2 (pin 18) on processors 64, 65.
    let mut cx = ConnectEx::request(connect_version::FULLY_SPECIFIED_GROUP, 2, 0x10_0000);
    (cx.vector, cx.irql, cx.synchronize_irql, cx.share_vector) = (0x70, 7, 7, 1);
    (cx.group, cx.processor_enable_mask) = (1, 0b11);
    put(0x700, cx.as_bytes());
    // RETARGET of it to processors 66, 67 (the handle is copied in).
    let mut rt = Retarget::new_zeroed();
    rt.header = RequestHeader::versioned::<Retarget>(ABI_VERSION_2, opcode::RETARGET);
    rt.group = 1;
    rt.processor_mask = 0b1100;
    put(0x7c0, rt.as_bytes());
    let mut dx = DisconnectEx::new_zeroed();
    dx.header = RequestHeader::new::<DisconnectEx>(opcode::DISCONNECT_EX);
    dx.version = connect_version::FULLY_SPECIFIED_GROUP;
    put(0x800, dx.as_bytes());
    // MESSAGE_BASED of device 10 (8 messages), its table at 0xc00; a
    // RETARGET of it to processors 2..5 with the table; QUERY_MESSAGES.
    let mut mx = ConnectEx::request(connect_version::MESSAGE_BASED, 10, 0x10_0000);
    mx.message_table = 0xc00;
    mx.message_table_length = 0x400;
    put(0x840, mx.as_bytes());
    let mut mt = Retarget::new_zeroed();
    mt.header = RequestHeader::versioned::<Retarget>(ABI_VERSION_2, opcode::RETARGET);
    mt.processor_mask = 0b11_1100;
    mt.message_table = 0xc00;
    mt.message_table_length = 0x400;
    put(0x8c0, mt.as_bytes());
    let mut qm = QueryMessagesV2::new_zeroed();
    qm.base.header =
        RequestHeader::versioned::<QueryMessagesV2>(ABI_VERSION_2, opcode::QUERY_MESSAGES);
    qm.base.device_id = 10;
    put(0x900, qm.as_bytes());
    // A RETARGET with a flag set (reserved): refused.
    let mut bad = rt;
    bad.flags = 1;
    put(0x9c0, bad.as_bytes());
    let session = |steps: &[u32]| ram.session(0xff, steps);
    let handle = |block: usize, offset: usize| COPY_HANDLE_TAG | (block + offset) as u32;
    let rt_handle = offset_of!(Retarget, handle);
    vec![
        (
            "v2_queries_and_apic_model",
            session(&[0x000, 0x480, 0x4c0, 0x680]),
        ),
        (
            "v2_group_one_connect_retarget_route",
            session(&[
                0x480,
                0x700,
                handle(0x7c0, rt_handle),
                0x7c0,
                0x680,
                0x480,
                handle(0x9c0, rt_handle),
                0x9c0,
                handle(0x800, offset_of!(DisconnectEx, handle)),
                0x800,
                0x7c0,
            ]),
        ),
        (
            "v2_retarget_message_based_table",
            session(&[0x840, handle(0x8c0, rt_handle), 0x8c0, 0x900]),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqconnect_abi::ntstatus::{STATUS_INVALID_HANDLE, STATUS_SUCCESS};

    #[test]
    fn harness_seed_corpus_runs_clean() {
        for (name, data) in seed_corpus() {
            let outcomes = run_session(&data);
            assert!(!outcomes.is_empty(), "{name}");
        }
    }

    #[test]
    fn harness_connect_route_disconnect_seed_answers_success() {
        let seeds = seed_corpus();
        let Some((_, data)) = seeds.iter().find(|(n, _)| *n == "connect_route_disconnect") else {
            panic!("seed missing");
        };
        let statuses: Vec<_> = run_session(data).iter().map(Outcome::status).collect();
        assert_eq!(statuses, vec![Some(STATUS_SUCCESS); 4]);
    }

    /// The statuses seed `name` of [`seed_corpus`] answers.
    fn seed_statuses(name: &str) -> Vec<Option<u32>> {
        let seeds = seed_corpus();
        let Some((_, data)) = seeds.iter().find(|(n, _)| *n == name) else {
            panic!("seed {name} missing");
        };
        run_session(data).iter().map(Outcome::status).collect()
    }

    /// The CONNECT_EX seeds reach what their names say.
    #[test]
    fn harness_connect_ex_seeds_answer_as_named() {
        use irqconnect_abi::ntstatus::{STATUS_BUFFER_TOO_SMALL, STATUS_INVALID_PARAMETER};
        let statuses = seed_statuses;
        let ok = Some(STATUS_SUCCESS);
        // Connect, disconnect, query, connect again (the messages are free).
        assert_eq!(
            statuses("connect_ex_messages_table_disconnect_ex"),
            vec![ok, ok, ok, ok]
        );
        // A group handle is refused by the classic DISCONNECT.
        assert_eq!(
            statuses("connect_ex_line_based_then_classic_disconnect"),
            vec![ok, Some(STATUS_INVALID_PARAMETER), ok]
        );
        assert_eq!(
            statuses("connect_ex_table_too_small"),
            vec![Some(STATUS_BUFFER_TOO_SMALL), ok]
        );
    }

    /// The version 2 seeds reach what their names say.
    #[test]
    fn harness_v2_seeds_answer_as_named() {
        use irqconnect_abi::ntstatus::{
            STATUS_INVALID_DEVICE_STATE, STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
        };
        let statuses = seed_statuses;
        let ok = Some(STATUS_SUCCESS);
        assert_eq!(statuses("v2_queries_and_apic_model"), vec![ok; 4]);
        // Model, connect in group 1, retarget, route; the model again
        // (refused while connected), a retarget with a flag (refused),
        // disconnect, retarget of the dead handle.
        assert_eq!(
            statuses("v2_group_one_connect_retarget_route"),
            vec![
                ok,
                ok,
                ok,
                ok,
                Some(STATUS_INVALID_DEVICE_STATE),
                Some(STATUS_INVALID_PARAMETER),
                ok,
                Some(STATUS_INVALID_HANDLE)
            ]
        );
        assert_eq!(
            statuses("v2_retarget_message_based_table"),
            vec![ok, ok, ok]
        );
    }

    #[test]
    fn harness_disconnect_of_zero_handle_is_invalid_handle() {
        let seeds = seed_corpus();
        let Some((_, data)) = seeds.iter().find(|(n, _)| *n == "query_platform") else {
            panic!("seed missing");
        };
        let mut data = data.clone();
        data[1] = 1;
        data[2..6].copy_from_slice(&0x780u32.to_le_bytes());
        let statuses: Vec<_> = run_session(&data).iter().map(Outcome::status).collect();
        assert_eq!(statuses, vec![Some(STATUS_INVALID_HANDLE)]);
    }

    #[test]
    fn harness_garbage_never_panics() {
        let mut data: Vec<u8> = (0..600u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        data[1] = 40;
        run_session(&data);
        run_session(&[]);
        run_session(&[7]);
        one_request(&[0xff; 64], 0);
        one_request(&[], u32::MAX);
    }
}
