//! Field-level malformations of well-formed headers: reserved fields, the
//! CONNECT byte flags, vectors and IRQLs, masks, pointers and devices, and
//! query inputs out of range. Each refusal writes the status (and zeroed
//! outputs) only, and connects nothing.

use irqconnect_abi::layout::{LAPIC_MMIO_BASE, MMIO_HOLE_START};
use irqconnect_abi::ntstatus::{
    STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND, STATUS_SUCCESS, status_name,
};
use irqconnect_abi::pv::{Connect, QueryResources};

use super::blocks::{self, Block};
use super::pvfix::{self, Env};
use super::raw::{self, refuse, refuse_typed};
use super::{Cases, Name, Want, ram_end};
use crate::fail;
use crate::pv::{self, Request};
use crate::runner::TestResult;

const IP: Want = Want::Status(STATUS_INVALID_PARAMETER);
const NF: Want = Want::Status(STATUS_NOT_FOUND);
const OK: Want = Want::Status(STATUS_SUCCESS);

/// A change to a CONNECT block.
type Edit = fn(&mut Connect);
/// A change to a CONNECT block given the online mask and the end of RAM.
type EditWith = fn(&mut Connect, u64, u64);

/// Records that the host's object count is what it was before the cases.
fn nothing_connected(cases: &mut Cases, before: u32) -> TestResult {
    let after = pvfix::objects_in_use()?;
    cases.check(
        "refusals connected nothing",
        after == before,
        format_args!(
            "objects in use {} -> {}",
            crate::display::dec(before),
            crate::display::dec(after)
        ),
    );
    Ok(())
}

/// Sends a CONNECT that must succeed; returns its handle (0 on failure,
/// recorded as a failed case).
fn connect_ok(cases: &mut Cases, name: &str, c: &Connect) -> Connect {
    let sent = raw::send(&Block::of(c), 0);
    cases.status(name, sent.status, OK);
    cases.check(
        name,
        sent.guards_intact,
        format_args!("the host wrote outside the block"),
    );
    if sent.status == STATUS_SUCCESS {
        sent.read()
    } else {
        <Connect as zerocopy::FromZeros>::new_zeroed()
    }
}

/// Every reserved field of every opcode that has one, and every input a
/// CONNECT_EX version does not use (rule X2), non-zero on an otherwise
/// valid block: STATUS_INVALID_PARAMETER.
pub fn reserved(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_reserved_fields_invalid_parameter");
    let before = pvfix::objects_in_use()?;
    for (name, r0, r1) in [
        ("QUERY_PLATFORM reserved0 = 1", 1u8, 0u16),
        ("QUERY_PLATFORM reserved0 = 0x80", 0x80, 0),
        ("QUERY_PLATFORM reserved1 = 1", 0, 1),
        ("QUERY_PLATFORM reserved1 = 0x8000", 0, 0x8000),
    ] {
        let mut q = irqconnect_abi::pv::QueryPlatform::blank();
        q.reserved0 = r0;
        q.reserved1 = r1;
        refuse_typed(&mut cases, name, &q, IP);
    }
    let good = blocks::connect_typed(env)?;
    for (name, reserved) in [
        ("CONNECT reserved0[0] = 1", [1u8, 0, 0]),
        ("CONNECT reserved0[1] = 1", [0, 1, 0]),
        ("CONNECT reserved0[2] = 0x80", [0, 0, 0x80]),
        ("CONNECT reserved0 all ones", [0xff; 3]),
    ] {
        let mut c = good;
        c.reserved0 = reserved;
        refuse_typed(&mut cases, name, &c, IP);
    }
    for (name, r0) in [
        ("QUERY_ROUTE reserved0 = 1", 1u32),
        ("QUERY_ROUTE reserved0 = 0x80000000", 0x8000_0000),
    ] {
        let mut q = blocks::route_typed(0);
        q.reserved0 = r0;
        refuse_typed(&mut cases, name, &q, IP);
    }
    super::ex::reserved(&mut cases, env)?;
    nothing_connected(&mut cases, before)?;
    cases.finish()
}

/// InterruptMode, ShareVector and FloatingSave outside 0..1:
/// STATUS_INVALID_PARAMETER; FloatingSave 1 is accepted (x64).
pub fn flags(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_connect_flags_outside_0_1_invalid_parameter");
    let before = pvfix::objects_in_use()?;
    let good = blocks::connect_typed(env)?;
    let edits: [(&str, Edit); 6] = [
        ("InterruptMode 2", |c| c.interrupt_mode = 2),
        ("InterruptMode 0xff", |c| c.interrupt_mode = 0xff),
        ("ShareVector 2", |c| c.share_vector = 2),
        ("ShareVector 0xff", |c| c.share_vector = 0xff),
        ("FloatingSave 2", |c| c.floating_save = 2),
        ("FloatingSave 0x80", |c| c.floating_save = 0x80),
    ];
    for (name, edit) in edits {
        let mut c = good;
        edit(&mut c);
        refuse_typed(&mut cases, name, &c, IP);
    }
    super::ex::flags(&mut cases, env)?;
    nothing_connected(&mut cases, before)?;
    let mut c = good;
    c.floating_save = 1;
    let made = connect_ok(&mut cases, "FloatingSave 1 accepted", &c);
    if made.handle != 0 {
        cases.status("its DISCONNECT", pv::disconnect(made.handle), OK);
    }
    cases.finish()
}

/// Vectors 0, 15, 255, just outside the device range, wider than a byte
/// (no truncation to a valid one), another device's; IRQLs 0, 31, 255 on
/// the device's vector; SynchronizeIrql below Irql.
pub fn vectors_irqls(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_connect_vectors_and_irqls_invalid_parameter");
    let before = pvfix::objects_in_use()?;
    let good = blocks::connect_typed(env)?;
    let v = good.vector;
    let class = good.irql;
    // (name, vector, irql, sync, expected)
    let table: [(&str, u32, u8, u8, Want); 13] = [
        ("vector 0", 0, 0, 0, IP),
        ("vector 15", 15, 0, 0, IP),
        ("vector 255", 255, 15, 15, IP),
        ("vector 0x2f (below the device range)", 0x2f, 2, 2, IP),
        ("vector 0xc0 (above the device range)", 0xc0, 12, 12, IP),
        (
            "vector + 0x100 (truncates to the device's)",
            v + 0x100,
            class,
            class,
            IP,
        ),
        ("vector 0xffffffff", u32::MAX, 15, 15, IP),
        ("Irql 31", v, 31, 31, IP),
        ("Irql 255", v, 255, 255, IP),
        ("Irql 0 on the device's vector", v, 0, class, IP),
        ("Irql class + 1", v, class + 1, class + 1, IP),
        ("SynchronizeIrql 0 (below Irql)", v, class, 0, IP),
        ("SynchronizeIrql = Irql - 1", v, class, class - 1, IP),
    ];
    for (name, vector, irql, sync, want) in table {
        let mut c = good;
        c.vector = vector;
        c.irql = irql;
        c.synchronize_irql = sync;
        refuse_typed(&mut cases, name, &c, want);
    }
    // A device-range vector that belongs to another device.
    if let Some(other) = (0..8)
        .filter_map(|i| env.device(i))
        .flat_map(|d| d.obj.allocated_resources_translated().iter().copied())
        .map(|r| r.vector)
        .find(|&ov| ov != v)
    {
        let mut c = good;
        c.vector = other;
        c.irql = (other >> 4) as u8;
        c.synchronize_irql = c.irql.max(class);
        refuse_typed(&mut cases, "another device's vector", &c, NF);
    }
    nothing_connected(&mut cases, before)?;
    cases.finish()
}

/// SynchronizeIrql above HIGH_LEVEL (15) with a valid Irql: not an IRQL on
/// x64 (a guest would load it into CR8), so STATUS_INVALID_PARAMETER (the
/// host's rule 5, HOST+). A host that accepts one gets the connection undone
/// and the case fails.
pub fn sync_irql_above_high(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_sync_irql_above_high_level_invalid_parameter");
    let before = pvfix::objects_in_use()?;
    let good = blocks::connect_typed(env)?;
    for (name, sync) in [
        ("SynchronizeIrql 16", 16u8),
        ("SynchronizeIrql 31", 31),
        ("SynchronizeIrql 255", 255),
    ] {
        let mut c = good;
        c.synchronize_irql = sync;
        let sent = raw::send(&Block::of(&c), 0);
        if sent.status == STATUS_SUCCESS {
            let made: Connect = sent.read();
            let _ = pv::disconnect(made.handle);
        }
        cases.status(name, sent.status, IP);
    }
    let mut highest = good;
    highest.synchronize_irql = 15;
    let made = connect_ok(
        &mut cases,
        "SynchronizeIrql 15 (HIGH_LEVEL) accepted",
        &highest,
    );
    if made.handle != 0 {
        let _ = pv::disconnect(made.handle);
    }
    nothing_connected(&mut cases, before)?;
    cases.finish()
}

/// Masks (every bit: trimmed to the online processors; none; absent ones
/// only), ServiceRoutine 0, ServiceContext and SpinLock outside RAM or
/// straddling its end (with address overflow), absent devices, and a
/// refused CONNECT whose output fields came pre-filled.
pub fn masks_pointers_devices(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_connect_masks_pointers_devices");
    let before = pvfix::objects_in_use()?;
    let good = blocks::connect_typed(env)?;
    let online = env.online();

    let mut all = good;
    all.processor_enable_mask = u64::MAX;
    let made = connect_ok(&mut cases, "mask of every bit", &all);
    if made.handle != 0 {
        let routable = env.effective(online)?;
        cases.check(
            "mask of every bit trimmed to the online processors",
            made.effective_mask == routable,
            format_args!(
                "effective mask {}, online {} (one destination names {})",
                crate::display::hex(made.effective_mask),
                crate::display::hex(online),
                crate::display::hex(routable)
            ),
        );
        cases.status("its DISCONNECT", pv::disconnect(made.handle), OK);
    }

    let ram = ram_end().unwrap_or(0);
    let ram_known = ram != 0;
    let edits: [(&str, bool, EditWith, Want); 12] = [
        ("mask 0", true, |c, _, _| c.processor_enable_mask = 0, IP),
        (
            "mask of absent processors only",
            online != u64::MAX,
            |c, online, _| c.processor_enable_mask = !online,
            IP,
        ),
        (
            "mask bit 63 only",
            online & (1 << 63) == 0,
            |c, _, _| c.processor_enable_mask = 1 << 63,
            IP,
        ),
        (
            "ServiceRoutine 0",
            true,
            |c, _, _| c.service_routine = 0,
            IP,
        ),
        (
            "ServiceContext all ones",
            true,
            |c, _, _| c.service_context = u64::MAX,
            IP,
        ),
        (
            "ServiceContext first byte past RAM",
            ram_known,
            |c, _, ram| c.service_context = ram,
            IP,
        ),
        (
            "ServiceContext in the LAPIC page",
            true,
            |c, _, _| c.service_context = LAPIC_MMIO_BASE,
            IP,
        ),
        (
            "SpinLock straddling the end of RAM",
            ram_known,
            |c, _, ram| c.spin_lock = ram - 4,
            IP,
        ),
        (
            "SpinLock wrapping past 2^64",
            true,
            |c, _, _| c.spin_lock = u64::MAX - 3,
            IP,
        ),
        (
            "SpinLock in the MMIO hole",
            true,
            |c, _, _| c.spin_lock = MMIO_HOLE_START,
            IP,
        ),
        (
            "device 0xffffffff",
            true,
            |c, _, _| c.device_id = u32::MAX,
            NF,
        ),
        (
            "device 0x80000000",
            true,
            |c, _, _| c.device_id = 0x8000_0000,
            NF,
        ),
    ];
    for (name, applies, edit, want) in edits {
        if !applies {
            continue;
        }
        let mut c = good;
        edit(&mut c, online, ram);
        refuse_typed(&mut cases, name, &c, want);
    }
    let mut absent = good;
    absent.device_id = env.platform.device_count;
    refuse_typed(&mut cases, "first absent device", &absent, NF);

    // Outputs the guest pre-filled: a refusal answers handle 0, mask 0.
    let mut prefilled = good;
    prefilled.processor_enable_mask = 0;
    prefilled.handle = 0x0000_0001_0000_0001;
    prefilled.effective_mask = u64::MAX;
    let sent = raw::send(&Block::of(&prefilled), 0);
    let back: Connect = sent.read();
    cases.status("refused CONNECT with pre-filled outputs", sent.status, IP);
    cases.check(
        "refused CONNECT zeroes pre-filled outputs",
        back.handle == 0 && back.effective_mask == 0 && sent.guards_intact,
        format_args!(
            "handle {}, effective mask {} after the refusal",
            crate::display::hex(back.handle),
            crate::display::hex(back.effective_mask)
        ),
    );
    super::ex::pointers(&mut cases, env)?;
    nothing_connected(&mut cases, before)?;
    cases.finish()
}

/// QUERY_RESOURCES of absent devices: STATUS_NOT_FOUND (pre-filled outputs
/// zeroed); QUERY_ROUTE of pins past 23, including one that truncates to a
/// valid pin: STATUS_INVALID_PARAMETER.
pub fn queries_out_of_range(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_queries_out_of_range");
    let count = env.platform.device_count;
    for (what, device) in [
        ("first absent", count),
        ("8", 8),
        ("0x80000000", 0x8000_0000),
        ("0xffffffff", u32::MAX),
    ] {
        if device < count {
            continue;
        }
        let n = Name::of(format_args!("QUERY_RESOURCES of device {}", what));
        refuse(&mut cases, n.as_str(), &blocks::resources(device), 0, NF);
    }
    let mut q = QueryResources::blank();
    q.device_id = count;
    q.count = 4;
    q.resources[0].vector = 0x60;
    let sent = raw::send(&Block::of(&q), 0);
    let back: QueryResources = sent.read();
    cases.status("QUERY_RESOURCES pre-filled, absent device", sent.status, NF);
    cases.check(
        "QUERY_RESOURCES of an absent device zeroes pre-filled outputs",
        back.count == 0 && back.resources[0].vector == 0 && sent.guards_intact,
        format_args!(
            "count {}, first vector {}",
            crate::display::dec(back.count),
            crate::display::hex(back.resources[0].vector)
        ),
    );
    for (name, pin) in [
        ("QUERY_ROUTE pin 24", 24u32),
        ("QUERY_ROUTE pin 255", 255),
        ("QUERY_ROUTE pin 256", 256),
        ("QUERY_ROUTE pin 0x116 (truncates to 22)", 0x116),
        ("QUERY_ROUTE pin 0xffffffff", u32::MAX),
    ] {
        refuse(&mut cases, name, &blocks::route(pin), 0, IP);
    }
    super::ex::queries(&mut cases, env)?;
    // In range, the same block shape answers.
    match pv::query_route(23) {
        Ok(_) => cases.check("QUERY_ROUTE pin 23", true, format_args!("")),
        Err(s) => cases.check(
            "QUERY_ROUTE pin 23",
            false,
            format_args!("answered {}", status_name(s)),
        ),
    }
    if cases.checked == 0 {
        fail!("no case applied");
    }
    cases.finish()
}
