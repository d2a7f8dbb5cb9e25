//! The IoConnectInterruptEx opcodes (CONNECT_EX, DISCONNECT_EX,
//! QUERY_MESSAGES) in the hostile families: each function adds its cases
//! to the family of the same kind (lengths, reserved fields and X2's
//! unused inputs, flags, versions, handles, pointers and the message
//! table buffer, queries). A CONNECT_EX a case expected refused but the
//! host accepted is disconnected again (DISCONNECT_EX), so the family's
//! "nothing connected" check reports it once.

use core::cell::UnsafeCell;

use irqconnect_abi::layout::{LAPIC_MMIO_BASE, MMIO_HOLE_START};
use irqconnect_abi::ntstatus::{
    STATUS_BUFFER_TOO_SMALL, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
    STATUS_INVALID_PARAMETER_1, STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND, STATUS_SUCCESS,
};
use irqconnect_abi::pv::{
    ConnectEx, DisconnectEx, MAX_MESSAGES, QueryMessages, connect_version, message_table_size,
};

use super::blocks::{self, Block};
use super::pvfix::Env;
use super::raw::{self, Sent, refuse, refuse_typed};
use super::{Cases, Name, Want, ram_end};
use crate::pv::{self, Request};
use crate::runner::Failure;
use crate::wdm::KINTERRUPT_MODE;

const IP: Want = Want::Status(STATUS_INVALID_PARAMETER);
const IP1: Want = Want::Status(STATUS_INVALID_PARAMETER_1);
const IP10: Want = Want::Status(STATUS_INVALID_PARAMETER_10);
const IH: Want = Want::Status(STATUS_INVALID_HANDLE);
const NF: Want = Want::Status(STATUS_NOT_FOUND);
const OK: Want = Want::Status(STATUS_SUCCESS);
const TOO_SMALL: Want = Want::Status(STATUS_BUFFER_TOO_SMALL);

/// Bytes of the message table buffer, with guards on both sides.
const TABLE_GUARD: usize = 16;
const TABLE_BYTES: usize = message_table_size(MAX_MESSAGES) + 2 * TABLE_GUARD;
/// What the table buffer holds where the host must not write.
const CANARY: u8 = 0x5a;

#[repr(C, align(8))]
struct TableBuffer(UnsafeCell<[u8; TABLE_BYTES]>);

// SAFETY: only the test runner's thread (tests run one at a time on the
// BSP) and, during a doorbell write, the host touch it.
unsafe impl Sync for TableBuffer {}

/// Where a CONNECT_EX a case sends may have its table written.
static TABLE: TableBuffer = TableBuffer(UnsafeCell::new([0; TABLE_BYTES]));

fn table_base() -> *mut u8 {
    TABLE.0.get().cast::<u8>()
}

/// The guest-physical address `offset` bytes into the table buffer.
fn table_at(offset: usize) -> u64 {
    table_base().wrapping_add(offset) as u64
}

/// Fills the table buffer with the canary.
fn table_fill() {
    // SAFETY: the buffer is ours (see `Sync` above); no reference into it
    // is live.
    unsafe { core::ptr::write_bytes(table_base(), CANARY, TABLE_BYTES) };
}

/// True when the whole table buffer still holds the canary.
fn table_untouched() -> bool {
    // SAFETY: as in `table_fill`; the doorbell's asm is not `nomem`, so
    // these reads see what the host wrote.
    let bytes = unsafe { core::slice::from_raw_parts(table_base(), TABLE_BYTES) };
    bytes.chunks_exact(8).all(|w| w == [CANARY; 8])
}

/// A FULLY_SPECIFIED CONNECT_EX the host accepts: the classic CONNECT of
/// `blocks::connect_typed` in CONNECT_EX's layout.
pub fn fully_specified(env: &Env) -> Result<ConnectEx, Failure> {
    let c = blocks::connect_typed(env)?;
    let mut x = ConnectEx::blank();
    x.version = connect_version::FULLY_SPECIFIED;
    x.device_id = c.device_id;
    x.vector = c.vector;
    x.irql = c.irql;
    x.synchronize_irql = c.synchronize_irql;
    x.interrupt_mode = c.interrupt_mode;
    x.share_vector = c.share_vector;
    x.processor_enable_mask = c.processor_enable_mask;
    x.service_routine = c.service_routine;
    Ok(x)
}

/// A LINE_BASED CONNECT_EX the host accepts (the first exclusive level
/// device).
fn line_based(env: &Env) -> Result<ConnectEx, Failure> {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let mut x = ConnectEx::blank();
    x.version = connect_version::LINE_BASED;
    x.device_id = dev.id();
    x.service_routine = blocks::raw_isr_address();
    Ok(x)
}

/// A MESSAGE_BASED CONNECT_EX the host accepts, its table into the table
/// buffer past its front guard; `None` without a message device.
fn message_based(env: &Env) -> Option<ConnectEx> {
    let m = env.message_devices().next()?;
    let mut x = ConnectEx::blank();
    x.version = connect_version::MESSAGE_BASED;
    x.device_id = m.id();
    x.service_routine = blocks::raw_isr_address();
    x.message_table = table_at(TABLE_GUARD);
    x.message_table_length = m.info.table_size;
    Some(x)
}

/// Undoes a CONNECT_EX the host accepted.
fn undo(sent: &Sent) {
    if sent.status == STATUS_SUCCESS {
        let made: ConnectEx = sent.read();
        let _ = pv::disconnect_ex(made.version_used, made.handle);
    }
}

/// [`refuse_typed`] for a CONNECT_EX, undone if the host accepts it.
fn refuse_ex(cases: &mut Cases, name: &str, x: &ConnectEx, want: Want) {
    table_fill();
    let sent = refuse_typed(cases, name, x, want);
    undo(&sent);
    cases.check(
        name,
        table_untouched(),
        format_args!("the host wrote into the message table buffer"),
    );
}

/// The three opcodes' well-formed blocks, for the length family.
pub fn opcodes(env: &Env) -> Result<[(&'static str, Block); 3], Failure> {
    let mut q = QueryMessages::blank();
    q.device_id = 0;
    let mut d = DisconnectEx::blank();
    d.version = connect_version::FULLY_SPECIFIED;
    d.handle = 1;
    Ok([
        ("CONNECT_EX", Block::of(&fully_specified(env)?)),
        ("DISCONNECT_EX", Block::of(&d)),
        ("QUERY_MESSAGES", Block::of(&q)),
    ])
}

/// Reserved fields of the three opcodes, and X2: every input a version
/// does not use, non-zero: STATUS_INVALID_PARAMETER.
pub fn reserved(cases: &mut Cases, env: &Env) -> Result<(), Failure> {
    let fs = fully_specified(env)?;
    for (name, r0, r1) in [
        ("CONNECT_EX reserved0 = 1", 1u8, [0u8; 3]),
        ("CONNECT_EX reserved1[0] = 1", 0, [1, 0, 0]),
        ("CONNECT_EX reserved1[2] = 0x80", 0, [0, 0, 0x80]),
    ] {
        let mut x = fs;
        x.reserved0 = r0;
        x.reserved1 = r1;
        refuse_ex(cases, name, &x, IP);
    }
    let mut d = DisconnectEx::blank();
    d.version = connect_version::FULLY_SPECIFIED;
    d.reserved0 = 1;
    refuse_typed(cases, "DISCONNECT_EX reserved0 = 1 (handle 0)", &d, IP);
    let mut q = QueryMessages::blank();
    q.reserved0 = 0x8000_0000;
    refuse_typed(cases, "QUERY_MESSAGES reserved0 = 0x80000000", &q, IP);

    // X2, per version: (version's block, name, edit).
    type XEdit = fn(&mut ConnectEx);
    let fs_unused: [(&str, XEdit); 4] = [
        ("FULLY_SPECIFIED group 1", |x| x.group = 1),
        ("FULLY_SPECIFIED fallback routine", |x| {
            x.fallback_service_routine = blocks::raw_isr_address()
        }),
        ("FULLY_SPECIFIED message table", |x| {
            x.message_table = table_at(TABLE_GUARD)
        }),
        ("FULLY_SPECIFIED message table length", |x| {
            x.message_table_length = 48
        }),
    ];
    for (name, edit) in fs_unused {
        let mut x = fs;
        edit(&mut x);
        refuse_ex(cases, name, &x, IP);
    }
    let mut group = fs;
    group.version = connect_version::FULLY_SPECIFIED_GROUP;
    let group_unused: [(&str, XEdit); 3] = [
        ("FULLY_SPECIFIED_GROUP fallback routine", |x| {
            x.fallback_service_routine = blocks::raw_isr_address()
        }),
        ("FULLY_SPECIFIED_GROUP message table", |x| {
            x.message_table = table_at(TABLE_GUARD)
        }),
        ("FULLY_SPECIFIED_GROUP message table length", |x| {
            x.message_table_length = 48
        }),
    ];
    for (name, edit) in group_unused {
        let mut x = group;
        edit(&mut x);
        refuse_ex(cases, name, &x, IP);
    }
    let line = line_based(env)?;
    let line_unused: [(&str, XEdit); 6] = [
        ("LINE_BASED vector", |x| x.vector = 0x60),
        ("LINE_BASED irql", |x| x.irql = 6),
        ("LINE_BASED interrupt mode", |x| x.interrupt_mode = 1),
        ("LINE_BASED share vector", |x| x.share_vector = 1),
        ("LINE_BASED group", |x| x.group = 1),
        ("LINE_BASED message table", |x| {
            x.message_table = table_at(TABLE_GUARD);
            x.message_table_length = 8;
        }),
    ];
    for (name, edit) in line_unused {
        let mut x = line;
        edit(&mut x);
        refuse_ex(cases, name, &x, IP);
    }
    if let Some(msg) = message_based(env) {
        let msg_unused: [(&str, XEdit); 5] = [
            ("MESSAGE_BASED vector", |x| x.vector = 0x50),
            ("MESSAGE_BASED irql", |x| x.irql = 5),
            ("MESSAGE_BASED interrupt mode", |x| x.interrupt_mode = 1),
            ("MESSAGE_BASED share vector", |x| x.share_vector = 1),
            ("MESSAGE_BASED group", |x| x.group = 1),
        ];
        for (name, edit) in msg_unused {
            let mut x = msg;
            edit(&mut x);
            refuse_ex(cases, name, &x, IP);
        }
    }
    Ok(())
}

/// CONNECT_EX's byte flags outside 0..1: STATUS_INVALID_PARAMETER.
pub fn flags(cases: &mut Cases, env: &Env) -> Result<(), Failure> {
    let fs = fully_specified(env)?;
    for (name, mode, share, floating) in [
        ("CONNECT_EX InterruptMode 2", 2u8, 0u8, 0u8),
        ("CONNECT_EX ShareVector 2", 0, 2, 0),
        ("CONNECT_EX FloatingSave 0xff", 0, 0, 0xff),
    ] {
        let mut x = fs;
        x.interrupt_mode = mode;
        x.share_vector = share;
        x.floating_save = floating;
        refuse_ex(cases, name, &x, IP);
    }
    Ok(())
}

/// CONNECT_EX versions 0, 5 and all ones on an otherwise valid
/// FULLY_SPECIFIED block, and DISCONNECT_EX versions 0 and 5 (handle 0:
/// the version is checked first): STATUS_INVALID_PARAMETER_1 (X1).
pub fn versions(cases: &mut Cases, env: &Env) -> Result<(), Failure> {
    let fs = fully_specified(env)?;
    for (name, version) in [
        ("CONNECT_EX version 0", 0u32),
        ("CONNECT_EX version 5", 5),
        ("CONNECT_EX version 0xffffffff", u32::MAX),
    ] {
        let mut x = fs;
        x.version = version;
        refuse_ex(cases, name, &x, IP1);
    }
    for (name, version) in [
        ("DISCONNECT_EX version 0", 0u32),
        ("DISCONNECT_EX version 5", 5),
    ] {
        let mut d = DisconnectEx::blank();
        d.version = version;
        refuse_typed(cases, name, &d, IP1);
    }
    Ok(())
}

/// A raw CONNECT_EX that must succeed: its answer (zero on failure,
/// recorded as a failed case).
fn connect_ok(cases: &mut Cases, name: &str, x: &ConnectEx) -> ConnectEx {
    let sent = raw::send(&Block::of(x), 0);
    cases.status(name, sent.status, OK);
    if sent.status == STATUS_SUCCESS {
        sent.read()
    } else {
        <ConnectEx as zerocopy::FromZeros>::new_zeroed()
    }
}

/// DISCONNECT_EX of `handle` with `version`.
fn disconnect(version: u32, handle: u64) -> Block {
    let mut d = DisconnectEx::blank();
    d.version = version;
    d.handle = handle;
    Block::of(&d)
}

/// DISCONNECT_EX of forged handles (0, random, all ones, a live one's
/// next generation and next slot), of a live handle with another
/// version (STATUS_INVALID_PARAMETER), twice, and of the stale handle:
/// STATUS_INVALID_HANDLE, the live connection untouched until its own
/// disconnect.
pub fn handles(cases: &mut Cases, env: &Env) -> Result<(), Failure> {
    const GEN: u64 = 1 << 32;
    let fs_version = connect_version::FULLY_SPECIFIED;
    for (name, handle) in [
        ("DISCONNECT_EX handle 0", 0u64),
        ("DISCONNECT_EX random handle", 0x1234_5678_9abc_def0),
        ("DISCONNECT_EX handle all ones", u64::MAX),
    ] {
        refuse(cases, name, &disconnect(fs_version, handle), 0, IH);
    }
    let made = connect_ok(cases, "CONNECT_EX to forge from", &fully_specified(env)?);
    let h = made.handle;
    if h == 0 {
        return Ok(());
    }
    let before = super::pvfix::objects_in_use()?;
    refuse(
        cases,
        "DISCONNECT_EX live handle, next generation",
        &disconnect(fs_version, h.wrapping_add(GEN)),
        0,
        IH,
    );
    refuse(
        cases,
        "DISCONNECT_EX live handle, next slot",
        &disconnect(fs_version, h.wrapping_add(1)),
        0,
        IH,
    );
    refuse(
        cases,
        "DISCONNECT_EX live handle, LINE_BASED version",
        &disconnect(connect_version::LINE_BASED, h),
        0,
        IP,
    );
    let after = super::pvfix::objects_in_use()?;
    cases.check(
        "forged DISCONNECT_EX left the connection",
        after == before,
        format_args!(
            "objects in use {} -> {}",
            crate::display::dec(before),
            crate::display::dec(after)
        ),
    );
    cases.status(
        "DISCONNECT_EX of the live handle",
        pv::disconnect_ex(fs_version, h),
        OK,
    );
    refuse(
        cases,
        "DISCONNECT_EX twice",
        &disconnect(fs_version, h),
        0,
        IH,
    );
    refuse(
        cases,
        "classic DISCONNECT of the stale CONNECT_EX handle",
        &blocks::disconnect(h),
        0,
        IH,
    );
    Ok(())
}

/// MESSAGE_BASED with the table buffer over the request block, outside
/// RAM, straddling its end, wrapping, in the LAPIC page, in the MMIO hole
/// or misaligned:
/// STATUS_INVALID_PARAMETER; shorter than the table:
/// STATUS_BUFFER_TOO_SMALL. Either way `message_table_required` says the
/// size, nothing else is answered and the host writes nothing into the
/// buffer (the guarded one, for those inside it). Also: MESSAGE_BASED
/// without a routine or with a lock in the MMIO hole (M3, M4),
/// LINE_BASED and MESSAGE_BASED of absent devices (L1, M1), and
/// FULLY_SPECIFIED with mask 0 (STATUS_INVALID_PARAMETER_10).
pub fn pointers(cases: &mut Cases, env: &Env) -> Result<(), Failure> {
    let mut fs = fully_specified(env)?;
    fs.processor_enable_mask = 0;
    refuse_ex(cases, "CONNECT_EX FULLY_SPECIFIED mask 0", &fs, IP10);
    let mut line = line_based(env)?;
    line.device_id = u32::MAX;
    refuse_ex(cases, "CONNECT_EX LINE_BASED device 0xffffffff", &line, NF);
    let Some(msg) = message_based(env) else {
        return Ok(());
    };
    let mut x = msg;
    x.device_id = env.platform.device_count;
    refuse_ex(
        cases,
        "CONNECT_EX MESSAGE_BASED first absent device",
        &x,
        NF,
    );
    let mut x = msg;
    x.service_routine = 0;
    refuse_ex(cases, "CONNECT_EX MESSAGE_BASED routine 0", &x, IP);
    let mut x = msg;
    x.spin_lock = MMIO_HOLE_START;
    refuse_ex(
        cases,
        "CONNECT_EX MESSAGE_BASED SpinLock in the MMIO hole",
        &x,
        IP,
    );

    let need = msg.message_table_length;
    let ram = ram_end().unwrap_or(0);
    // A rule after M5: required written all the same.
    let mut x = msg;
    x.spin_lock = table_at(0);
    x.synchronize_irql = 16;
    table_fill();
    let name = "CONNECT_EX MESSAGE_BASED SynchronizeIrql 16 with a lock (M6)";
    let sent = raw::send(&Block::of(&x), 0);
    undo(&sent);
    cases.status(name, sent.status, IP);
    let back: ConnectEx = sent.read();
    cases.check(
        name,
        back.message_table_required == need,
        format_args!(
            "message_table_required {}, expected {} (rule M5: written whatever comes next)",
            crate::display::dec(back.message_table_required),
            crate::display::dec(need)
        ),
    );
    let tables: [(&str, bool, u64, u32, Want); 10] = [
        (
            "table over the request block",
            true,
            raw::block_address(0),
            need,
            IP,
        ),
        (
            "table straddling the end of RAM",
            ram != 0,
            ram.wrapping_sub(8),
            need,
            IP,
        ),
        ("table at the first byte past RAM", ram != 0, ram, need, IP),
        ("table wrapping past 2^64", true, u64::MAX - 7, need, IP),
        ("table in the LAPIC page", true, LAPIC_MMIO_BASE, need, IP),
        ("table in the MMIO hole", true, MMIO_HOLE_START, need, IP),
        (
            "table misaligned by 4",
            true,
            table_at(TABLE_GUARD + 4),
            need,
            IP,
        ),
        (
            "table one byte short",
            true,
            table_at(TABLE_GUARD),
            need - 1,
            TOO_SMALL,
        ),
        (
            "table header only",
            true,
            table_at(TABLE_GUARD),
            8,
            TOO_SMALL,
        ),
        ("table length 0", true, table_at(TABLE_GUARD), 0, TOO_SMALL),
    ];
    for (what, applies, address, length, want) in tables {
        if !applies {
            continue;
        }
        let name = Name::of(format_args!("CONNECT_EX MESSAGE_BASED {}", what));
        let mut x = msg;
        x.message_table = address;
        x.message_table_length = length;
        table_fill();
        let sent = raw::send(&Block::of(&x), 0);
        undo(&sent);
        cases.status(name.as_str(), sent.status, want);
        let back: ConnectEx = sent.read();
        let mut expected = x;
        expected.header.status = sent.status;
        expected.message_table_required = back.message_table_required;
        cases.check(
            name.as_str(),
            back.message_table_required == need,
            format_args!(
                "message_table_required {}, expected {} (rule M5: written whatever comes next)",
                crate::display::dec(back.message_table_required),
                crate::display::dec(need)
            ),
        );
        cases.check(
            name.as_str(),
            sent.guards_intact && back == expected && table_untouched(),
            format_args!(
                "other outputs {}, guards {}, table buffer {}",
                if back == expected { "zero" } else { "written" },
                if sent.guards_intact {
                    "intact"
                } else {
                    "overwritten"
                },
                if table_untouched() {
                    "untouched"
                } else {
                    "written"
                }
            ),
        );
    }
    Ok(())
}

/// QUERY_MESSAGES of absent devices: STATUS_NOT_FOUND with pre-filled
/// outputs zeroed; of a device with line resources only: every output
/// "none" (count 0, test device all ones).
pub fn queries(cases: &mut Cases, env: &Env) -> Result<(), Failure> {
    for (name, device) in [
        (
            "QUERY_MESSAGES of the first absent device",
            env.platform.device_count,
        ),
        ("QUERY_MESSAGES of device 0xffffffff", u32::MAX),
    ] {
        let mut q = QueryMessages::blank();
        q.device_id = device;
        refuse_typed(cases, name, &q, NF);
    }
    let mut q = QueryMessages::blank();
    q.device_id = env.platform.device_count;
    q.message_count = 4;
    q.first_vector = 0x50;
    q.test_device = 1;
    q.table_size = 168;
    let sent = raw::send(&Block::of(&q), 0);
    let back: QueryMessages = sent.read();
    cases.status("QUERY_MESSAGES pre-filled, absent device", sent.status, NF);
    cases.check(
        "QUERY_MESSAGES of an absent device zeroes pre-filled outputs",
        back.message_count == 0
            && back.first_vector == 0
            && back.test_device == 0
            && back.table_size == 0
            && sent.guards_intact,
        format_args!(
            "count {}, first vector {}, test device {}, table size {}",
            crate::display::dec(back.message_count),
            crate::display::hex(back.first_vector),
            crate::display::dec(back.test_device),
            crate::display::dec(back.table_size)
        ),
    );
    if let Ok(dev) = env.exclusive(KINTERRUPT_MODE::LevelSensitive)
        && !env.has_messages(dev.id())
    {
        let name = "QUERY_MESSAGES of a line device";
        match pv::query_messages(dev.id()) {
            Ok(a) => cases.check(
                name,
                a.message_count == 0 && a.test_device == u32::MAX,
                format_args!(
                    "count {}, test device {}",
                    crate::display::dec(a.message_count),
                    crate::display::hex(a.test_device)
                ),
            ),
            Err(s) => cases.status(name, s, OK),
        }
    }
    Ok(())
}
