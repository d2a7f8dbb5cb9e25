//! ABI version 2 through the doorbell: the processor groups and the APIC
//! destination in the queries, RETARGET (answered, refused, undone when its
//! answer cannot be written) and SET_APIC_MODEL (`docs/semantics.md`,
//! "Destinations", "RETARGET", "SET_APIC_MODEL").

#![allow(clippy::unwrap_used, clippy::expect_used)]

use irqconnect::harness::ram::HarnessRam;
use irqconnect::{FlatRam, GuestRam, Outcome, Platform, PlatformFacts, Service};
use irqconnect_abi::ntstatus::{
    STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_DEVICE_STATE, STATUS_INVALID_HANDLE,
    STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
};
use irqconnect_abi::pv::{
    ABI_VERSION_1, ABI_VERSION_2, Connect, ConnectEx, QueryMessagesV2, QueryPlatformV2,
    QueryResourcesV2, QueryRouteV2, RequestHeader, Retarget, SetApicModel, apic_model,
    connect_version, interrupt_mode, opcode, platform_flags, route_destination,
};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

const AT: u32 = 0x1000;

fn service(facts: PlatformFacts) -> Service {
    let platform = Platform::new(facts).unwrap();
    let devices = irqconnect::DeviceTable::default_for(&platform);
    Service::new(platform, devices, 64).unwrap()
}

/// Writes `block` at [`AT`], rings, returns the outcome and the answer.
fn ask<T: FromBytes + IntoBytes + Immutable + KnownLayout>(
    s: &mut Service,
    ram: &mut FlatRam,
    block: &T,
) -> (Outcome, T) {
    ram.write(u64::from(AT), block.as_bytes()).unwrap();
    let outcome = s.handle_doorbell(ram, AT);
    let mut back = vec![0u8; core::mem::size_of::<T>()];
    ram.read(u64::from(AT), &mut back).unwrap();
    (outcome, T::read_from_bytes(&back).unwrap())
}

fn v2<T: FromZeros>(op: u16) -> (T, RequestHeader) {
    (
        T::new_zeroed(),
        RequestHeader::versioned::<T>(ABI_VERSION_2, op),
    )
}

/// A CONNECT of device 0 (vector 0x60, level) on `mask`.
fn connect_block(mask: u64) -> Connect {
    let mut c = Connect::new_zeroed();
    c.header = RequestHeader::new::<Connect>(opcode::CONNECT);
    (c.vector, c.irql, c.synchronize_irql) = (0x60, 6, 6);
    c.interrupt_mode = interrupt_mode::LEVEL_SENSITIVE;
    (c.processor_enable_mask, c.service_routine) = (mask, 0x1000);
    c
}

#[test]
fn query_platform_v2_reports_groups_model_and_destination_width() {
    let mut facts = PlatformFacts::uniform(130);
    facts.irqchip_mode = irqchip::Mode::Split;
    facts.x2apic = true;
    let mut s = service(facts);
    let mut ram = FlatRam::new(0, 0x10000);
    let (mut q, h) = v2::<QueryPlatformV2>(opcode::QUERY_PLATFORM);
    q.base.header = h;
    let (o, a) = ask(&mut s, &mut ram, &q);
    assert_eq!(o.status(), Some(STATUS_SUCCESS));
    assert_eq!(a.base.abi_version_max, 2);
    assert_eq!(a.base.cpu_count, 130);
    assert_ne!(a.base.flags & platform_flags::MSI_EXT_DEST_ID, 0);
    assert_eq!(a.groups.group_count, 3);
    assert_eq!(a.groups.group_sizes, [64, 64, 2, 0]);
    assert_eq!(a.groups.group_online, [u64::MAX, u64::MAX, 0b11, 0]);
    assert_eq!(a.groups.destination_bits, 15);
    assert_eq!(a.groups.apic_model, apic_model::UNDECLARED);
}

#[test]
fn set_apic_model_declares_and_is_refused_while_connected() {
    let mut facts = PlatformFacts::uniform(16);
    facts.irqchip_mode = irqchip::Mode::User;
    let mut s = service(facts);
    let mut ram = FlatRam::new(0, 0x10000);
    let (mut m, h) = v2::<SetApicModel>(opcode::SET_APIC_MODEL);
    m.header = h;
    m.model = apic_model::X2APIC;
    // x2APIC is not offered here.
    assert_eq!(
        ask(&mut s, &mut ram, &m).0.status(),
        Some(STATUS_INVALID_PARAMETER)
    );
    m.model = 9;
    assert_eq!(
        ask(&mut s, &mut ram, &m).0.status(),
        Some(STATUS_INVALID_PARAMETER)
    );
    m.model = apic_model::XAPIC_CLUSTER;
    assert_eq!(ask(&mut s, &mut ram, &m).0.status(), Some(STATUS_SUCCESS));
    m.reserved0[3] = 1;
    assert_eq!(
        ask(&mut s, &mut ram, &m).0.status(),
        Some(STATUS_INVALID_PARAMETER)
    );
    m.reserved0[3] = 0;
    // Cluster 1 (processors 4..7) of the declared model, whole.
    let (o, c) = ask(&mut s, &mut ram, &connect_block(0xf0));
    assert_eq!((o.status(), c.effective_mask), (Some(STATUS_SUCCESS), 0xf0));
    m.model = apic_model::XAPIC_FLAT;
    let (o, _) = ask(&mut s, &mut ram, &m);
    assert_eq!(o.status(), Some(STATUS_INVALID_DEVICE_STATE));
    assert_eq!(
        s.topology().model(),
        irqconnect::ApicModel::XapicCluster,
        "a refusal changed the model"
    );
    // Version 1 does not have the opcode.
    m.header.abi_version = ABI_VERSION_1;
    m.header.length = 24;
    assert_eq!(
        ask(&mut s, &mut ram, &m).0.status(),
        Some(STATUS_INVALID_DEVICE_REQUEST)
    );
}

/// QUERY_ROUTE version 2 says what the connect answered: the group, the
/// mask, the destination it is programmed with; version 1 reports group 0
/// only. QUERY_RESOURCES and QUERY_MESSAGES version 2 give the groups.
#[test]
fn query_route_v2_matches_the_effective_mask_in_every_group() {
    let mut s = service(PlatformFacts::uniform(70));
    let mut ram = FlatRam::new(0, 0x10000);
    let mut c = ConnectEx::request(connect_version::FULLY_SPECIFIED_GROUP, 0, 0x1000);
    (c.vector, c.irql, c.synchronize_irql) = (0x60, 6, 6);
    (c.group, c.processor_enable_mask) = (1, 0b110);
    let (o, a) = ask(&mut s, &mut ram, &c);
    assert_eq!(o.status(), Some(STATUS_SUCCESS));
    // Processors 65 and 66: no logical form, 65 physically.
    assert_eq!(a.effective_mask, 0b10);
    let (mut q, h) = v2::<QueryRouteV2>(opcode::QUERY_ROUTE);
    q.base.header = h;
    q.base.pin = 16;
    let (o, r) = ask(&mut s, &mut ram, &q);
    assert_eq!(o.status(), Some(STATUS_SUCCESS));
    assert_eq!(
        (
            r.group,
            r.base.destination_mask,
            r.destination_mode,
            r.apic_destination
        ),
        (1, 0b10, route_destination::PHYSICAL, 65)
    );
    let mut q1 = q.base;
    q1.header = RequestHeader::new::<irqconnect_abi::pv::QueryRoute>(opcode::QUERY_ROUTE);
    let (_, r1) = ask(&mut s, &mut ram, &q1);
    assert_eq!((r1.masked, r1.destination_mask), (0, 0));
    q.reserved1 = 1;
    assert_eq!(
        ask(&mut s, &mut ram, &q).0.status(),
        Some(STATUS_INVALID_PARAMETER)
    );
    let (mut res, h) = v2::<QueryResourcesV2>(opcode::QUERY_RESOURCES);
    res.base.header = h;
    res.base.device_id = 6;
    let (o, r) = ask(&mut s, &mut ram, &res);
    assert_eq!(
        (o.status(), r.base.count, r.groups),
        (Some(STATUS_SUCCESS), 2, [0; 4])
    );
    let (mut m, h) = v2::<QueryMessagesV2>(opcode::QUERY_MESSAGES);
    m.base.header = h;
    m.base.device_id = 10;
    let (o, r) = ask(&mut s, &mut ram, &m);
    assert_eq!(
        (o.status(), r.base.message_count, r.group),
        (Some(STATUS_SUCCESS), 8, 0)
    );
}

fn retarget_block(handle: u64, mask: u64) -> Retarget {
    let (mut r, h) = v2::<Retarget>(opcode::RETARGET);
    r.header = h;
    r.handle = handle;
    r.processor_mask = mask;
    r
}

/// RETARGET answers the new effective mask and the moved count, refuses
/// with the rules' statuses (outputs zero), and when its answer cannot be
/// written the move is undone.
#[test]
fn retarget_by_doorbell_answers_refuses_and_undoes() {
    let mut s = service(PlatformFacts::uniform(4));
    let mut ram = FlatRam::new(0, 0x10000);
    let (_, c) = ask(&mut s, &mut ram, &connect_block(0b0001));
    let (o, a) = ask(&mut s, &mut ram, &retarget_block(c.handle, 0b0110));
    assert_eq!(o.status(), Some(STATUS_SUCCESS));
    assert_eq!((a.effective_mask, a.count), (0b0110, 1));
    assert_eq!(
        o.routes().first().map(|u| u.route.destination),
        Some(0b0110)
    );
    for (block, status) in [
        (
            retarget_block(c.handle ^ (1 << 40), 1),
            STATUS_INVALID_HANDLE,
        ),
        (retarget_block(c.handle, 0), STATUS_INVALID_PARAMETER),
        (retarget_block(c.handle, 1 << 4), STATUS_INVALID_PARAMETER),
        (
            Retarget {
                flags: 1,
                ..retarget_block(c.handle, 1)
            },
            STATUS_INVALID_PARAMETER,
        ),
    ] {
        let (o, a) = ask(&mut s, &mut ram, &block);
        assert_eq!(o.status(), Some(status));
        assert_eq!((a.effective_mask, a.count), (0, 0));
    }
    assert_eq!(s.route(16).map(|r| r.destination), Some(0b0110));
    // Unwritable outputs: no answer, nothing moved.
    let before = s.clone();
    let mut bytes = ram.bytes().to_vec();
    let block = retarget_block(c.handle, 0b1000);
    bytes[AT as usize..AT as usize + 64].copy_from_slice(block.as_bytes());
    let outputs = u64::from(AT) + 40;
    let mut locked = HarnessRam::new(0, bytes, Some(outputs..outputs + 24));
    let o = s.handle_doorbell(&mut locked, AT);
    assert!(matches!(o, Outcome::Unwritable { .. }), "{o:?}");
    assert!(s.same_live_state(&before));
    assert_eq!(s.route(16).map(|r| r.destination), Some(0b0110));
    // Version 1 has no RETARGET.
    let mut v1 = retarget_block(c.handle, 1);
    v1.header.abi_version = ABI_VERSION_1;
    assert_eq!(
        ask(&mut s, &mut ram, &v1).0.status(),
        Some(STATUS_INVALID_DEVICE_REQUEST)
    );
}
