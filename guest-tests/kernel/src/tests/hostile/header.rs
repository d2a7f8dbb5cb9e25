//! Header-level malformations (rule 1 and its sub-order: magic, alignment,
//! version, opcode, length, whole block readable, reserved fields): each
//! answered with its status and nothing but the status written, or not
//! answered at all when the block is not readable RAM.

use irqconnect_abi::layout::{IOAPIC_MMIO_BASE, LAPIC_MMIO_BASE, MMIO_HOLE_START};
use irqconnect_abi::ntstatus::{
    STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_PARAMETER, STATUS_INVALID_PARAMETER_1,
    STATUS_SUCCESS,
};
use irqconnect_abi::pv::{
    ABI_VERSION_MAX, MAX_REQUEST_SIZE, PV_MAGIC, RequestHeader, STATUS_NO_ANSWER,
};
use zerocopy::{FromBytes, IntoBytes};

use super::blocks::{self, Block};
use super::pvfix::Env;
use super::raw::{self, refuse};
use super::{Cases, Name, Want, expect_host_counter, ram_end};
use crate::runner::TestResult;

const IP: Want = Want::Status(STATUS_INVALID_PARAMETER);
const IP1: Want = Want::Status(STATUS_INVALID_PARAMETER_1);
const IDR: Want = Want::Status(STATUS_INVALID_DEVICE_REQUEST);

/// A block's bytes with its header changed by `edit`.
fn with_header(block: &Block, edit: impl FnOnce(&mut RequestHeader)) -> Block {
    let mut b = *block;
    let mut h = RequestHeader::read_from_prefix(b.bytes())
        .map(|(h, _)| h)
        .unwrap_or_default();
    edit(&mut h);
    b.bytes_mut()[..16].copy_from_slice(h.as_bytes());
    b
}

/// Wrong magic on every opcode: STATUS_INVALID_PARAMETER.
pub fn bad_magic(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_bad_magic_invalid_parameter");
    let all = blocks::every_opcode(env)?;
    let magics: [(&str, u32); 4] = [
        ("magic 0", 0),
        ("magic byte-swapped", PV_MAGIC.swap_bytes()),
        ("magic one bit off", PV_MAGIC ^ 1 << 7),
        ("magic all ones", u32::MAX),
    ];
    for (i, (name, magic)) in magics.iter().enumerate() {
        let (op, block) = all[i % all.len()];
        let b = with_header(&block, |h| h.magic = *magic);
        let n = Name::of(format_args!("{} on {}", name, op));
        refuse(&mut cases, n.as_str(), &b, 0, IP);
    }
    cases.finish()
}

/// ABI versions other than 1 and 2, and IoConnectInterruptEx versions CONNECT_EX
/// and DISCONNECT_EX do not define (rule X1): STATUS_INVALID_PARAMETER_1.
pub fn unknown_version(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_unknown_version_invalid_parameter_1");
    let all = blocks::every_opcode(env)?;
    let versions: [(&str, u16); 4] = [
        ("version 0", 0),
        ("version 3", ABI_VERSION_MAX + 1),
        ("version 0x8001", 0x8001),
        ("version 0xffff", u16::MAX),
    ];
    for (i, (name, version)) in versions.iter().enumerate() {
        let (op, block) = all[(i + 2) % all.len()];
        let b = with_header(&block, |h| h.abi_version = *version);
        let n = Name::of(format_args!("{} on {}", name, op));
        refuse(&mut cases, n.as_str(), &b, 0, IP1);
    }
    super::ex::versions(&mut cases, env)?;
    cases.finish()
}

/// Opcodes version 1 does not define: STATUS_INVALID_DEVICE_REQUEST
/// (0x7f: well past the last one defined, `opcode::QUERY_MESSAGES`).
pub fn unknown_opcode(_env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_unknown_opcode_invalid_device_request");
    let route = blocks::route(0);
    for (name, opcode) in [
        ("opcode 0", 0u16),
        ("opcode 0x7f", 0x7f),
        ("opcode 0x100", 0x100),
        ("opcode 0xffff", u16::MAX),
    ] {
        let b = with_header(&route, |h| h.opcode = opcode);
        refuse(&mut cases, name, &b, 0, IDR);
    }
    cases.finish()
}

/// Every opcode (the eight of ABI version 1) with a length that is not its
/// size: 0, the header alone, 8 short, 1 short, 8 over, another opcode's
/// size, all ones.
pub fn bad_length(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_bad_length_invalid_parameter");
    let all = blocks::every_opcode(env)?;
    let ex = super::ex::opcodes(env)?;
    for &(op, block) in all.iter().chain(ex.iter()) {
        let size = block.len() as u32;
        let other = if size == 80 { 24 } else { 80 };
        for (what, length) in [
            ("length 0", 0u32),
            ("header only", 16),
            ("truncated by 8", size - 8),
            ("truncated by 1", size - 1),
            ("oversized by 8", size + 8),
            ("another opcode's size", other),
            ("length all ones", u32::MAX),
        ] {
            let b = with_header(&block, |h| h.length = length);
            let n = Name::of(format_args!("{} {}", op, what));
            refuse(&mut cases, n.as_str(), &b, 0, IP);
        }
    }
    cases.finish()
}

/// Two defects at once: the earlier check answers (magic, alignment,
/// version, opcode, length, reserved).
pub fn check_order(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_header_checks_in_documented_order");
    let connect = blocks::connect_valid(env)?;
    let route = blocks::route(0);
    let everything = with_header(&connect, |h| {
        h.magic = 0;
        h.abi_version = 9;
        h.opcode = 77;
        h.length = 3;
    });
    refuse(&mut cases, "magic before everything", &everything, 0, IP);
    let bad_version = with_header(&route, |h| h.abi_version = ABI_VERSION_MAX + 1);
    refuse(&mut cases, "alignment before version", &bad_version, 4, IP);
    let version_opcode = with_header(&route, |h| {
        h.abi_version = ABI_VERSION_MAX + 1;
        h.opcode = 99;
    });
    refuse(&mut cases, "version before opcode", &version_opcode, 0, IP1);
    let opcode_length = with_header(&route, |h| {
        h.opcode = 99;
        h.length = 7;
    });
    refuse(&mut cases, "opcode before length", &opcode_length, 0, IDR);
    // A header in RAM whose block runs past its end: the header checks
    // answer before the host finds the rest unreadable.
    if let Some(ram) = ram_end() {
        let at_end: [(&str, Block, Want); 4] = [
            (
                "magic before whole-block readability",
                with_header(&connect, |h| h.magic = 1),
                IP,
            ),
            (
                "opcode before whole-block readability",
                with_header(&connect, |h| h.opcode = 99),
                IDR,
            ),
            (
                "length before whole-block readability",
                with_header(&connect, |h| h.length = 88),
                IP,
            ),
            (
                "readability of a well-formed header",
                connect,
                Want::NoAnswer,
            ),
        ];
        let mut unreadable = 0;
        for (name, block, want) in at_end.iter() {
            let mut after = [0u8; 16];
            raw::send_at(ram - 16, &block.bytes()[..16], &mut after);
            let status = u32::from_le_bytes([after[12], after[13], after[14], after[15]]);
            cases.status(name, status, *want);
            if *want == Want::NoAnswer {
                unreadable += 1;
            }
        }
        expect_host_counter("unreadable", unreadable);
    }
    cases.finish()
}

/// Blocks at an address that is not 8-byte aligned: STATUS_INVALID_PARAMETER
/// (the header is readable, so the status is written, misaligned), and a
/// CONNECT so refused connects nothing.
pub fn misaligned(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_misaligned_block_invalid_parameter");
    let route = blocks::route(0);
    for off in [1usize, 2, 4, 7] {
        let n = Name::of(format_args!("QUERY_ROUTE at +{}", crate::display::dec(off)));
        refuse(&mut cases, n.as_str(), &route, off, IP);
    }
    refuse(
        &mut cases,
        "QUERY_PLATFORM at +4",
        &blocks::platform(),
        4,
        IP,
    );
    refuse(
        &mut cases,
        "DISCONNECT at +3",
        &blocks::disconnect(1),
        3,
        IP,
    );
    let before = super::pvfix::platform()?;
    let connect = blocks::connect_valid(env)?;
    refuse(&mut cases, "valid CONNECT at +4", &connect, 4, IP);
    let after = super::pvfix::platform()?;
    cases.check(
        "misaligned CONNECT connects nothing",
        after.objects_in_use == before.objects_in_use,
        format_args!(
            "objects in use {} -> {}",
            crate::display::dec(before.objects_in_use),
            crate::display::dec(after.objects_in_use)
        ),
    );
    // The same CONNECT aligned succeeds: the alignment alone was refused.
    let sent = raw::send(&connect, 0);
    cases.status(
        "the same CONNECT aligned",
        sent.status,
        Want::Status(STATUS_SUCCESS),
    );
    if sent.status == STATUS_SUCCESS {
        let c: irqconnect_abi::pv::Connect = sent.read();
        cases.status(
            "its DISCONNECT",
            crate::pv::disconnect(c.handle),
            Want::Status(STATUS_SUCCESS),
        );
    }
    cases.finish()
}

/// Blocks the host cannot read whole: the header or the body past the end
/// of RAM, addresses past RAM, in the MMIO hole, in the IOAPIC and LAPIC
/// windows, at the top of 4 GiB. No answer (status untouched where the
/// guest can see it, nothing written), and the host goes on answering.
pub fn unreadable(env: &Env) -> TestResult {
    let mut cases = Cases::new("hostile_pv_unreadable_block_gets_no_answer");
    let ram = ram_end().unwrap_or(0);
    let mut sent = 0;
    if ram != 0 {
        let route = blocks::route(0);
        let platform = blocks::platform();
        let connect = blocks::connect_valid(env)?;
        // (name, block, bytes of it inside RAM)
        let straddling: [(&str, &Block, usize); 4] = [
            ("header straddles the end of RAM", &route, 8),
            ("QUERY_PLATFORM body past the end of RAM", &platform, 16),
            ("CONNECT body half past the end of RAM", &connect, 40),
            ("QUERY_ROUTE last 8 bytes past the end of RAM", &route, 32),
        ];
        for (name, block, inside) in straddling {
            let mut after = [0u8; MAX_REQUEST_SIZE];
            let visible = &block.bytes()[..inside];
            raw::send_at(ram - inside as u64, visible, &mut after);
            sent += 1;
            let after = &after[..inside];
            let status = after
                .get(12..16)
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
                .map_or(STATUS_NO_ANSWER, u32::from_le_bytes);
            cases.status(name, status, Want::NoAnswer);
            cases.check(
                name,
                after == visible,
                format_args!("the host wrote into the part inside RAM"),
            );
        }
    } else {
        cases.check(
            "RAM size from fw_cfg",
            false,
            format_args!(
                "fw_cfg RAM size {} is not below the MMIO hole",
                crate::display::hex(ram)
            ),
        );
    }
    for (name, gpa) in [
        ("first byte past RAM", ram),
        ("MMIO hole start", MMIO_HOLE_START),
        ("IOAPIC window", IOAPIC_MMIO_BASE),
        ("LAPIC window", LAPIC_MMIO_BASE),
        ("top of 4 GiB", 0xffff_fff8u64),
        ("all ones", 0xffff_ffffu64),
    ] {
        if gpa == 0 {
            continue; // RAM size unknown: address 0 is RAM.
        }
        raw::send_at(gpa, &[], &mut []);
        sent += 1;
        // Not visible to the guest; the host counts it (checked on the
        // host side) and must still answer the next request.
        let alive = crate::pv::query_platform().is_ok();
        cases.check(
            name,
            alive,
            format_args!("QUERY_PLATFORM failed after the unreadable block"),
        );
    }
    expect_host_counter("unreadable", sent);
    cases.finish()
}
