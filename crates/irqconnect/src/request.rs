//! The doorbell path: read a request block from guest memory, check its
//! header and fields (`docs/semantics.md` rule 1), dispatch it, write the answer.
//!
//! Header checks, in order; the first failure answers (only `status` is
//! written) and nothing changes:
//!
//! 1. the 16-byte header cannot be read: no answer ([`Outcome::Unreadable`]);
//! 2. `magic != PV_MAGIC`: STATUS_INVALID_PARAMETER;
//! 3. the block is not 8-byte aligned: STATUS_INVALID_PARAMETER;
//! 4. `abi_version` unknown: STATUS_INVALID_PARAMETER_1;
//! 5. `opcode` unknown for that version: STATUS_INVALID_DEVICE_REQUEST;
//! 6. `length` is not the opcode's size: STATUS_INVALID_PARAMETER;
//! 7. the whole block cannot be read: no answer; its status field cannot
//!    be written: no answer ([`Outcome::Unwritable`]), nothing done;
//! 8. a reserved field is non-zero, or a CONNECT or CONNECT_EX field is
//!    outside its domain (`InterruptMode` not 0/1, `ShareVector` or
//!    `FloatingSave` not 0/1): STATUS_INVALID_PARAMETER.
//!
//! Then the opcode runs. On an opcode-level failure the outputs are written
//! as zeros (a failed CONNECT answers handle 0, *InterruptObject stays NULL;
//! a CONNECT_EX refused with STATUS_BUFFER_TOO_SMALL also answers the table
//! size it needs). A MESSAGE_BASED CONNECT_EX writes its message table to
//! the guest's buffer first, then the outputs, then `status`; input fields
//! are never written. At most [`MAX_REQUEST_SIZE`] bytes of the block are
//! read, into a stack buffer; the table is at most
//! `message_table_size(MAX_MESSAGES)` bytes.

use core::mem::{offset_of, size_of};

use irqconnect_abi::layout::IOAPIC_PINS;
use irqconnect_abi::ntstatus::{
    NtStatus, STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_PARAMETER, STATUS_INVALID_PARAMETER_1,
    STATUS_SUCCESS,
};
use irqconnect_abi::pv::{
    ABI_VERSION_1, ABI_VERSION_MAX, BLOCK_ALIGN, Connect, ConnectEx, Disconnect, DisconnectEx,
    InterruptResource, MAX_REQUEST_SIZE, MAX_RESOURCES, PV_MAGIC, QueryMessages, QueryMessagesV2,
    QueryPlatform, QueryPlatformV2, QueryResources, QueryResourcesV2, QueryRoute, QueryRouteV2,
    RequestHeader, Retarget, SetApicModel, connect_version, opcode, request_size,
    route_destination,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::connect_ex::{BlockSpan, ConnectExRequest, MessageTable};
use crate::destination::{ApicDestination, ApicModel};
use crate::devices::InterruptMode;
use crate::handle::Handle;
use crate::messages::MessageUpdate;
use crate::ram::GuestRam;
use crate::retarget::RetargetRequest;
use crate::route::RouteUpdate;
use crate::service::Service;
use crate::validate::{ConnectRequest, Violation};

/// A malformed block (rule 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// `magic` is not [`PV_MAGIC`].
    BadMagic,
    /// The block's address is not a multiple of [`BLOCK_ALIGN`].
    Misaligned,
    /// `abi_version` is not one the VMM implements.
    UnknownVersion,
    /// `opcode` is not defined for the version.
    UnknownOpcode,
    /// `length` is not the opcode's block size.
    BadLength,
    /// A reserved field is not zero.
    ReservedNotZero,
    /// A field holds a value outside its domain.
    FieldOutOfDomain,
}

impl BlockError {
    /// The NTSTATUS the guest receives.
    pub const fn status(self) -> NtStatus {
        match self {
            Self::UnknownVersion => STATUS_INVALID_PARAMETER_1,
            Self::UnknownOpcode => STATUS_INVALID_DEVICE_REQUEST,
            _ => STATUS_INVALID_PARAMETER,
        }
    }
}

/// Why an answered request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The block is malformed (rule 1).
    Block(BlockError),
    /// A CONNECT or DISCONNECT rule, or QUERY_RESOURCES' unknown device.
    Rule(Violation),
    /// QUERY_ROUTE names a pin the IOAPIC does not have.
    PinOutOfRange,
}

impl Refusal {
    /// The NTSTATUS the guest receives.
    pub const fn status(self) -> NtStatus {
        match self {
            Self::Block(e) => e.status(),
            Self::Rule(v) => v.status(),
            Self::PinOutOfRange => STATUS_INVALID_PARAMETER,
        }
    }
}

/// An answered request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The header's opcode (as the guest wrote it).
    pub opcode: u16,
    /// The status written.
    pub status: NtStatus,
    /// Why it failed, when it did.
    pub refusal: Option<Refusal>,
    /// Pins whose route changed: the VMM applies them.
    pub routes: Vec<RouteUpdate>,
    /// Messages whose programming changed: the VMM applies them.
    pub messages: Vec<MessageUpdate>,
}

/// What a doorbell write led to, for the VMM to count, log and apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The block was answered.
    Answered(Answer),
    /// The block (or its header) is not readable guest RAM: no answer, no
    /// change. The VMM counts it and logs at a rate limit.
    Unreadable {
        /// The doorbell address.
        gpa: u64,
        /// Bytes that could not be read.
        len: u64,
    },
    /// The answer could not be written; any change was undone.
    Unwritable {
        /// The doorbell address.
        gpa: u64,
    },
}

impl Outcome {
    /// Route updates to apply (empty unless answered with changes).
    pub fn routes(&self) -> &[RouteUpdate] {
        match self {
            Self::Answered(a) => &a.routes,
            _ => &[],
        }
    }

    /// Message updates to apply (empty unless answered with changes).
    pub fn messages(&self) -> &[MessageUpdate] {
        match self {
            Self::Answered(a) => &a.messages,
            _ => &[],
        }
    }

    /// The status written, if an answer was.
    pub fn status(&self) -> Option<NtStatus> {
        match self {
            Self::Answered(a) => Some(a.status),
            _ => None,
        }
    }
}

const STATUS_OFFSET: u64 = offset_of!(RequestHeader, status) as u64;

/// Checks the header (steps 2..6) and returns the block size.
pub fn check_header(header: &RequestHeader, gpa: u64) -> Result<usize, BlockError> {
    if header.magic != PV_MAGIC {
        return Err(BlockError::BadMagic);
    }
    if !gpa.is_multiple_of(BLOCK_ALIGN) {
        return Err(BlockError::Misaligned);
    }
    if header.abi_version == 0 || header.abi_version > ABI_VERSION_MAX {
        return Err(BlockError::UnknownVersion);
    }
    let size = request_size(header.abi_version, header.opcode).ok_or(BlockError::UnknownOpcode)?;
    if header.length as usize != size {
        return Err(BlockError::BadLength);
    }
    Ok(size)
}

/// Decodes a CONNECT block's inputs, checking reserved fields and domains.
pub fn decode_connect(block: &Connect) -> Result<ConnectRequest, BlockError> {
    if block.reserved0 != [0; 3] {
        return Err(BlockError::ReservedNotZero);
    }
    Ok(ConnectRequest {
        device_id: block.device_id,
        vector: block.vector,
        irql: block.irql,
        synchronize_irql: block.synchronize_irql,
        interrupt_mode: InterruptMode::from_abi(block.interrupt_mode)
            .ok_or(BlockError::FieldOutOfDomain)?,
        share_vector: flag(block.share_vector)?,
        floating_save: flag(block.floating_save)?,
        processor_enable_mask: block.processor_enable_mask,
        service_routine: block.service_routine,
        service_context: block.service_context,
        spin_lock: block.spin_lock,
        version: connect_version::FULLY_SPECIFIED,
    })
}

fn flag(v: u8) -> Result<bool, BlockError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(BlockError::FieldOutOfDomain),
    }
}

/// Decodes a CONNECT_EX block's inputs, checking reserved fields and
/// domains (rule 1.8); the version's rules come after.
pub fn decode_connect_ex(block: &ConnectEx) -> Result<ConnectExRequest, BlockError> {
    if block.reserved0 != 0 || block.reserved1 != [0; 3] {
        return Err(BlockError::ReservedNotZero);
    }
    Ok(ConnectExRequest {
        version: block.version,
        device_id: block.device_id,
        vector: block.vector,
        irql: block.irql,
        synchronize_irql: block.synchronize_irql,
        interrupt_mode: InterruptMode::from_abi(block.interrupt_mode)
            .ok_or(BlockError::FieldOutOfDomain)?,
        share_vector: flag(block.share_vector)?,
        floating_save: flag(block.floating_save)?,
        group: block.group,
        processor_enable_mask: block.processor_enable_mask,
        service_routine: block.service_routine,
        fallback_service_routine: block.fallback_service_routine,
        service_context: block.service_context,
        spin_lock: block.spin_lock,
        message_table: block.message_table,
        message_table_length: block.message_table_length,
    })
}

/// The outputs one opcode writes back: bytes at `offset` within the block.
struct Reply {
    offset: usize,
    bytes: [u8; MAX_REQUEST_SIZE],
    len: usize,
    /// Undo on a failed write: the handle of a connection just made.
    made: Option<Handle>,
    /// Undo on a failed write: the masks a RETARGET replaced.
    moved: Option<Vec<(Handle, u64)>>,
    /// Storm-guard marks before the request ran (restored on undo).
    storm_before: u32,
    /// A message table to write before the outputs.
    table: Option<MessageTable>,
    /// Messages whose programming changed.
    messages: Vec<MessageUpdate>,
}

impl Reply {
    fn none() -> Self {
        Self {
            offset: 0,
            bytes: [0; MAX_REQUEST_SIZE],
            len: 0,
            made: None,
            moved: None,
            storm_before: 0,
            table: None,
            messages: Vec::new(),
        }
    }

    /// The bytes `start..end` of `block`.
    fn of<T: IntoBytes + zerocopy::Immutable>(block: &T, start: usize, end: usize) -> Self {
        let mut reply = Self::none();
        if let Some(src) = block.as_bytes().get(start..end)
            && let Some(dst) = reply.bytes.get_mut(..src.len())
        {
            dst.copy_from_slice(src);
            reply.offset = start;
            reply.len = src.len();
        }
        reply
    }
}

/// The doorbell path (see the module docs).
pub fn handle<M: GuestRam + ?Sized>(service: &mut Service, mem: &mut M, doorbell: u32) -> Outcome {
    let gpa = u64::from(doorbell);
    let mut head = [0u8; size_of::<RequestHeader>()];
    if mem.read(gpa, &mut head).is_err() {
        return Outcome::Unreadable {
            gpa,
            len: head.len() as u64,
        };
    }
    let Ok(header) = RequestHeader::read_from_bytes(&head[..]) else {
        return Outcome::Unreadable {
            gpa,
            len: head.len() as u64,
        };
    };
    let size = match check_header(&header, gpa) {
        Ok(size) => size,
        Err(e) => {
            return finish(
                service,
                mem,
                gpa,
                header.opcode,
                Err(Refusal::Block(e)),
                Reply::none(),
            );
        }
    };
    let mut buf = [0u8; MAX_REQUEST_SIZE];
    let Some(block) = buf.get_mut(..size) else {
        return Outcome::Unreadable {
            gpa,
            len: size as u64,
        };
    };
    if mem.read(gpa, block).is_err() {
        return Outcome::Unreadable {
            gpa,
            len: size as u64,
        };
    }
    // All or nothing for every opcode: before anything is done, prove that
    // the answer's status can land by writing back the value just read. A
    // DISCONNECT cannot be undone once made (its handle is dead), so an
    // answer lost afterwards would leave a change the VMM never hears of.
    if mem
        .write(
            gpa.saturating_add(STATUS_OFFSET),
            &header.status.to_le_bytes(),
        )
        .is_err()
    {
        return Outcome::Unwritable { gpa };
    }
    let storm_before = service.storm_bits();
    let span = BlockSpan {
        start: gpa,
        len: size as u64,
    };
    let (result, mut reply) = dispatch(service, mem, &header, block, span);
    reply.storm_before = storm_before;
    finish(service, mem, gpa, header.opcode, result, reply)
}

type Dispatched = (Result<Vec<RouteUpdate>, Refusal>, Reply);

fn dispatch<M: GuestRam + ?Sized>(
    service: &mut Service,
    mem: &M,
    header: &RequestHeader,
    block: &[u8],
    span: BlockSpan,
) -> Dispatched {
    let malformed = (Err(Refusal::Block(BlockError::BadLength)), Reply::none());
    let v1 = header.abi_version == ABI_VERSION_1;
    match header.opcode {
        opcode::QUERY_PLATFORM if v1 => match QueryPlatform::read_from_bytes(block) {
            Ok(b) => query_platform(service, &b),
            Err(_) => malformed,
        },
        opcode::QUERY_PLATFORM => match QueryPlatformV2::read_from_bytes(block) {
            Ok(b) => query_platform_v2(service, &b),
            Err(_) => malformed,
        },
        opcode::QUERY_RESOURCES if v1 => match QueryResources::read_from_bytes(block) {
            Ok(b) => query_resources(service, b),
            Err(_) => malformed,
        },
        opcode::QUERY_RESOURCES => match QueryResourcesV2::read_from_bytes(block) {
            Ok(b) => query_resources_v2(service, b),
            Err(_) => malformed,
        },
        opcode::CONNECT => match Connect::read_from_bytes(block) {
            Ok(b) => connect(service, mem, b),
            Err(_) => malformed,
        },
        opcode::DISCONNECT => match Disconnect::read_from_bytes(block) {
            Ok(b) => disconnect(service, &b),
            Err(_) => malformed,
        },
        opcode::QUERY_ROUTE if v1 => match QueryRoute::read_from_bytes(block) {
            Ok(b) => query_route(service, b),
            Err(_) => malformed,
        },
        opcode::QUERY_ROUTE => match QueryRouteV2::read_from_bytes(block) {
            Ok(b) => query_route_v2(service, b),
            Err(_) => malformed,
        },
        opcode::CONNECT_EX => match ConnectEx::read_from_bytes(block) {
            Ok(b) => connect_ex(service, mem, b, span),
            Err(_) => malformed,
        },
        opcode::DISCONNECT_EX => match DisconnectEx::read_from_bytes(block) {
            Ok(b) => disconnect_ex(service, &b),
            Err(_) => malformed,
        },
        opcode::QUERY_MESSAGES if v1 => match QueryMessages::read_from_bytes(block) {
            Ok(b) => query_messages(service, b),
            Err(_) => malformed,
        },
        opcode::QUERY_MESSAGES => match QueryMessagesV2::read_from_bytes(block) {
            Ok(b) => query_messages_v2(service, b),
            Err(_) => malformed,
        },
        opcode::RETARGET => match Retarget::read_from_bytes(block) {
            Ok(b) => retarget(service, mem, b, span),
            Err(_) => malformed,
        },
        opcode::SET_APIC_MODEL => match SetApicModel::read_from_bytes(block) {
            Ok(b) => set_apic_model(service, &b),
            Err(_) => malformed,
        },
        _ => (
            Err(Refusal::Block(BlockError::UnknownOpcode)),
            Reply::none(),
        ),
    }
}

fn query_platform(service: &Service, block: &QueryPlatform) -> Dispatched {
    if block.reserved0 != 0 || block.reserved1 != 0 {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    let out = service.query_platform();
    let start = offset_of!(QueryPlatform, abi_version_max);
    (
        Ok(Vec::new()),
        Reply::of(&out, start, size_of::<QueryPlatform>()),
    )
}

fn query_platform_v2(service: &Service, block: &QueryPlatformV2) -> Dispatched {
    if block.base.reserved0 != 0 || block.base.reserved1 != 0 || block.groups.reserved2 != 0 {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    let out = QueryPlatformV2 {
        base: service.query_platform(),
        groups: service.query_platform_groups(),
    };
    let start = offset_of!(QueryPlatformV2, base) + offset_of!(QueryPlatform, abi_version_max);
    (
        Ok(Vec::new()),
        Reply::of(&out, start, size_of::<QueryPlatformV2>()),
    )
}

/// Version 2: the version 1 answer and each resource's group.
fn query_resources_v2(service: &Service, mut block: QueryResourcesV2) -> Dispatched {
    let (result, _) = query_resources(service, block.base);
    let start = offset_of!(QueryResourcesV2, base) + offset_of!(QueryResources, count);
    let end = size_of::<QueryResourcesV2>();
    block.base.count = 0;
    block.base.resources = [InterruptResource::default(); MAX_RESOURCES];
    block.groups = [0; MAX_RESOURCES];
    if let Some(device) = service.devices().device(block.base.device_id) {
        for ((slot, group), r) in block
            .base
            .resources
            .iter_mut()
            .zip(block.groups.iter_mut())
            .zip(device.resources())
        {
            *slot = r.to_abi();
            *group = r.group;
            block.base.count += 1;
        }
    }
    (result, Reply::of(&block, start, end))
}

fn query_resources(service: &Service, mut block: QueryResources) -> Dispatched {
    let start = offset_of!(QueryResources, count);
    let end = size_of::<QueryResources>();
    block.count = 0;
    block.resources = [InterruptResource::default(); MAX_RESOURCES];
    let Some(device) = service.devices().device(block.device_id) else {
        return (
            Err(Refusal::Rule(Violation::UnknownDevice)),
            Reply::of(&block, start, end),
        );
    };
    for (slot, r) in block.resources.iter_mut().zip(device.resources()) {
        *slot = r.to_abi();
        block.count += 1;
    }
    (Ok(Vec::new()), Reply::of(&block, start, end))
}

fn connect<M: GuestRam + ?Sized>(service: &mut Service, mem: &M, mut block: Connect) -> Dispatched {
    let start = offset_of!(Connect, handle);
    let end = size_of::<Connect>();
    block.handle = 0;
    block.effective_mask = 0;
    let req = match decode_connect(&block) {
        Ok(req) => req,
        Err(e) => return (Err(Refusal::Block(e)), Reply::none()),
    };
    match service.connect(&req, mem) {
        Ok(done) => {
            block.handle = done.handle.raw();
            block.effective_mask = done.effective_mask;
            let mut reply = Reply::of(&block, start, end);
            reply.made = Some(done.handle);
            (Ok(done.routes), reply)
        }
        Err(v) => (Err(Refusal::Rule(v)), Reply::of(&block, start, end)),
    }
}

fn connect_ex<M: GuestRam + ?Sized>(
    service: &mut Service,
    mem: &M,
    mut block: ConnectEx,
    span: BlockSpan,
) -> Dispatched {
    let start = offset_of!(ConnectEx, version_used);
    let end = size_of::<ConnectEx>();
    let req = match decode_connect_ex(&block) {
        Ok(req) => req,
        Err(e) => return (Err(Refusal::Block(e)), Reply::none()),
    };
    block.version_used = 0;
    block.message_table_required = 0;
    block.handle = 0;
    block.effective_mask = 0;
    block.unified_irql = 0;
    block.count = 0;
    match service.connect_ex(&req, span, mem) {
        Ok(done) => {
            block.version_used = done.version_used;
            block.message_table_required = done.table_required;
            block.handle = done.handle.raw();
            block.effective_mask = done.effective_mask;
            block.unified_irql = done.unified_irql;
            block.count = done.count;
            let mut reply = Reply::of(&block, start, end);
            reply.made = Some(done.handle);
            reply.table = done.table;
            reply.messages = done.messages;
            (Ok(done.routes), reply)
        }
        Err(refused) => {
            block.message_table_required = refused.table_required;
            (
                Err(Refusal::Rule(refused.violation)),
                Reply::of(&block, start, end),
            )
        }
    }
}

fn disconnect_ex(service: &mut Service, block: &DisconnectEx) -> Dispatched {
    if block.reserved0 != 0 {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    match service.disconnect_ex(block.version, Handle::from_raw(block.handle)) {
        Ok(done) => {
            let mut reply = Reply::none();
            reply.messages = done.messages;
            (Ok(done.routes), reply)
        }
        Err(v) => (Err(Refusal::Rule(v)), Reply::none()),
    }
}

fn query_messages_v2(service: &Service, block: QueryMessagesV2) -> Dispatched {
    if block.base.reserved0 != 0 || block.reserved1 != [0; 6] {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    let start = offset_of!(QueryMessagesV2, base) + offset_of!(QueryMessages, message_count);
    let end = offset_of!(QueryMessagesV2, reserved1);
    let mut out = QueryMessagesV2::new_zeroed();
    match service.query_messages(block.base.device_id) {
        Some(q) => {
            out.base = q;
            out.group = service
                .devices()
                .device(block.base.device_id)
                .and_then(|d| d.messages())
                .map_or(0, |m| m.group);
            (Ok(Vec::new()), Reply::of(&out, start, end))
        }
        None => (
            Err(Refusal::Rule(Violation::UnknownDevice)),
            Reply::of(&out, start, end),
        ),
    }
}

fn query_messages(service: &Service, block: QueryMessages) -> Dispatched {
    let start = offset_of!(QueryMessages, message_count);
    let end = offset_of!(QueryMessages, reserved0);
    if block.reserved0 != 0 {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    match service.query_messages(block.device_id) {
        Some(out) => (Ok(Vec::new()), Reply::of(&out, start, end)),
        None => (
            Err(Refusal::Rule(Violation::UnknownDevice)),
            Reply::of(&QueryMessages::new_zeroed(), start, end),
        ),
    }
}

fn disconnect(service: &mut Service, block: &Disconnect) -> Dispatched {
    match service.disconnect(Handle::from_raw(block.handle)) {
        Ok(routes) => (Ok(routes), Reply::none()),
        Err(v) => (Err(Refusal::Rule(v)), Reply::none()),
    }
}

fn query_route(service: &Service, mut block: QueryRoute) -> Dispatched {
    if block.reserved0 != 0 {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    let start = offset_of!(QueryRoute, masked);
    let end = offset_of!(QueryRoute, reserved0);
    block.masked = 0;
    block.trigger = 0;
    block.vector = 0;
    block.lowest_priority = 0;
    block.destination_mask = 0;
    block.connections = 0;
    let route = u8::try_from(block.pin)
        .ok()
        .filter(|&p| p < IOAPIC_PINS)
        .and_then(|p| service.route(p));
    let Some(route) = route else {
        return (Err(Refusal::PinOutOfRange), Reply::of(&block, start, end));
    };
    block.masked = u8::from(route.masked);
    block.trigger = crate::route::trigger_to_abi(route.trigger);
    block.vector = route.vector;
    block.lowest_priority = u8::from(route.lowest_priority);
    // Version 1 has no group: it reports group 0's processors only.
    block.destination_mask = if route.group == 0 {
        route.destination
    } else {
        0
    };
    block.connections = route.connections;
    (Ok(Vec::new()), Reply::of(&block, start, end))
}

/// Version 2: the destination with its group and the APIC destination.
fn query_route_v2(service: &Service, mut block: QueryRouteV2) -> Dispatched {
    if block.base.reserved0 != 0 || block.reserved1 != 0 {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    let start = offset_of!(QueryRouteV2, base) + offset_of!(QueryRoute, masked);
    let end = size_of::<QueryRouteV2>();
    let (result, _) = query_route(service, block.base);
    let pin = block.base.pin;
    block.base = QueryRoute {
        header: block.base.header,
        pin,
        ..QueryRoute::new_zeroed()
    };
    block.group = 0;
    block.destination_mode = route_destination::NONE;
    block.apic_destination = 0;
    let route = u8::try_from(pin)
        .ok()
        .filter(|&p| p < IOAPIC_PINS)
        .and_then(|p| service.route(p));
    if let (Ok(_), Some(route)) = (&result, route) {
        block.base.masked = u8::from(route.masked);
        block.base.trigger = crate::route::trigger_to_abi(route.trigger);
        block.base.vector = route.vector;
        block.base.lowest_priority = u8::from(route.lowest_priority);
        block.base.destination_mask = route.destination;
        block.base.connections = route.connections;
        block.group = route.group;
        (block.destination_mode, block.apic_destination) = match route.target {
            ApicDestination::Logical { destination, .. } => {
                (route_destination::LOGICAL, destination)
            }
            ApicDestination::Physical { apic_id } => (route_destination::PHYSICAL, apic_id),
            ApicDestination::None => (route_destination::NONE, 0),
        };
    }
    (result, Reply::of(&block, start, end))
}

fn retarget<M: GuestRam + ?Sized>(
    service: &mut Service,
    mem: &M,
    mut block: Retarget,
    span: BlockSpan,
) -> Dispatched {
    if block.flags != 0 || block.reserved0 != 0 {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    let start = offset_of!(Retarget, effective_mask);
    let end = size_of::<Retarget>();
    block.effective_mask = 0;
    block.count = 0;
    let req = RetargetRequest {
        handle: Handle::from_raw(block.handle),
        group: block.group,
        processor_mask: block.processor_mask,
        message_table: block.message_table,
        message_table_length: block.message_table_length,
    };
    match service.retarget(&req, span, mem) {
        Ok(done) => {
            block.effective_mask = done.effective_mask;
            block.count = done.count;
            let mut reply = Reply::of(&block, start, end);
            reply.moved = Some(done.before);
            reply.table = done.table;
            reply.messages = done.messages;
            (Ok(done.routes), reply)
        }
        Err(v) => (Err(Refusal::Rule(v)), Reply::of(&block, start, end)),
    }
}

fn set_apic_model(service: &mut Service, block: &SetApicModel) -> Dispatched {
    if block.reserved0 != [0; 7] {
        return (
            Err(Refusal::Block(BlockError::ReservedNotZero)),
            Reply::none(),
        );
    }
    let result = match ApicModel::from_abi(block.model) {
        Some(model) => service.set_apic_model(model),
        None => Err(Violation::UnknownApicModel),
    };
    match result {
        Ok(()) => (Ok(Vec::new()), Reply::none()),
        Err(v) => (Err(Refusal::Rule(v)), Reply::none()),
    }
}

/// Writes the outputs, then the status; undoes a connection whose answer
/// could not be written.
fn finish<M: GuestRam + ?Sized>(
    service: &mut Service,
    mem: &mut M,
    gpa: u64,
    op: u16,
    result: Result<Vec<RouteUpdate>, Refusal>,
    reply: Reply,
) -> Outcome {
    let status = match &result {
        Ok(_) => STATUS_SUCCESS,
        Err(r) => r.status(),
    };
    let outputs = reply.bytes.get(..reply.len).unwrap_or(&[]);
    let table = match &reply.table {
        Some(t) => mem.write(t.gpa, &t.to_bytes()),
        None => Ok(()),
    };
    let written = table
        .and_then(|()| mem.write(gpa.saturating_add(reply.offset as u64), outputs))
        .and_then(|()| mem.write(gpa.saturating_add(STATUS_OFFSET), &status.to_le_bytes()));
    if written.is_err() {
        if let Some(handle) = reply.made {
            // The guest never learns the handle: take the connection (or
            // group) back so CONNECT stays all or nothing. The routes and
            // storm marks return to their state before the connect and its
            // messages were never programmed, so nothing needs applying.
            service.undo_connect(handle, reply.storm_before);
        }
        if let Some(before) = &reply.moved {
            // Likewise a RETARGET: the guest never learns of the move.
            service.undo_retarget(before, reply.storm_before);
        }
        return Outcome::Unwritable { gpa };
    }
    let (refusal, routes, messages) = match result {
        Ok(routes) => (None, routes, reply.messages),
        Err(r) => (Some(r), Vec::new(), Vec::new()),
    };
    Outcome::Answered(Answer {
        opcode: op,
        status,
        refusal,
        routes,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::ram::FlatRam;
    use irqconnect_abi::ntstatus::{STATUS_INVALID_HANDLE, STATUS_NOT_FOUND};
    use irqconnect_abi::pv::{STATUS_NO_ANSWER, trigger};
    use zerocopy::{FromZeros, Immutable, KnownLayout};

    const AT: u32 = 0x1000;

    fn service() -> Service {
        match Service::with_defaults(4) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    fn ram() -> FlatRam {
        FlatRam::new(0, 0x10_000)
    }

    fn put<T: IntoBytes + Immutable>(ram: &mut FlatRam, at: u32, block: &T) {
        if let Err(e) = ram.write(u64::from(at), block.as_bytes()) {
            panic!("{e}");
        }
    }

    fn get<T: FromBytes + KnownLayout + Immutable>(ram: &FlatRam, at: u32) -> T {
        let start = at as usize;
        let bytes = ram.bytes().get(start..start + size_of::<T>());
        match bytes.map(T::read_from_bytes) {
            Some(Ok(t)) => t,
            _ => panic!("block outside RAM"),
        }
    }

    fn connect_block() -> Connect {
        let mut c = Connect::new_zeroed();
        c.header = RequestHeader::new::<Connect>(opcode::CONNECT);
        c.device_id = 4;
        c.vector = 0x80;
        c.irql = 8;
        c.synchronize_irql = 8;
        c.interrupt_mode = irqconnect_abi::pv::interrupt_mode::LATCHED;
        c.share_vector = 1;
        c.processor_enable_mask = 0b0110;
        c.service_routine = 0x20_0000;
        c
    }

    /// Runs `block` at `at` and returns the outcome and the block after.
    fn run<T>(s: &mut Service, at: u32, block: &T) -> (Outcome, T)
    where
        T: IntoBytes + FromBytes + KnownLayout + Immutable,
    {
        let mut mem = ram();
        put(&mut mem, at, block);
        let outcome = s.handle_doorbell(&mut mem, at);
        (outcome, get(&mem, at))
    }

    fn refusal(o: &Outcome) -> Option<Refusal> {
        match o {
            Outcome::Answered(a) => a.refusal,
            _ => None,
        }
    }

    /// Found by the `pv_requests` harness's unwritable-answer check (corpus
    /// file `seed-disconnect_answer_unwritable`, once the harness let the
    /// guest itself store a handle inside the host-write-protected window):
    /// a DISCONNECT whose status the host could not write was carried out
    /// anyway and answered `Unwritable`, which carries no route updates, so
    /// the VMM never re-routed the pin while the service had.
    #[test]
    fn regression_disconnect_with_unwritable_answer_changes_nothing() {
        use crate::harness::ram::HarnessRam;
        let mut s = service();
        let mut c = connect_block();
        c.processor_enable_mask = 0b1;
        let (outcome, answered) = run(&mut s, AT, &c);
        assert_eq!(outcome.status(), Some(STATUS_SUCCESS));
        let before = s.clone();
        let mut d = Disconnect::new_zeroed();
        d.header = RequestHeader::new::<Disconnect>(opcode::DISCONNECT);
        d.handle = answered.handle;
        let mut bytes = vec![0u8; 0x10_000];
        bytes[0x2000..0x2000 + size_of::<Disconnect>()].copy_from_slice(d.as_bytes());
        let mut mem = HarnessRam::new(0, bytes, Some(0x2000..0x2040));

        let outcome = s.handle_doorbell(&mut mem, 0x2000);

        assert_eq!(outcome, Outcome::Unwritable { gpa: 0x2000 });
        assert_eq!(s, before);
    }

    #[test]
    fn rule_01_unreadable_header_gets_no_answer() {
        let mut s = service();
        let mut mem = ram();
        let before = mem.clone();
        assert_eq!(
            s.handle_doorbell(&mut mem, 0x10_000 - 8),
            Outcome::Unreadable {
                gpa: 0x10_000 - 8,
                len: 16
            }
        );
        assert_eq!(mem, before);
    }

    #[test]
    fn rule_01_unreadable_block_tail_gets_no_answer() {
        let mut s = service();
        let mut mem = ram();
        let at = 0x10_000 - 40;
        put(&mut mem, at, &connect_block().header);
        let before = mem.clone();
        assert_eq!(
            s.handle_doorbell(&mut mem, at),
            Outcome::Unreadable {
                gpa: u64::from(at),
                len: 80
            }
        );
        assert_eq!(mem, before);
        assert_eq!(s.registry().connections(), 0);
    }

    #[test]
    fn rule_01_wrong_magic_invalid_parameter() {
        let mut c = connect_block();
        c.header.magic ^= 1;
        let (o, after) = run(&mut service(), AT, &c);
        assert_eq!(refusal(&o), Some(Refusal::Block(BlockError::BadMagic)));
        assert_eq!(after.header.status, STATUS_INVALID_PARAMETER);
        assert_eq!(after.handle, 0);
    }

    #[test]
    fn rule_01_misaligned_block_invalid_parameter() {
        let (o, after) = run(&mut service(), AT + 4, &connect_block());
        assert_eq!(refusal(&o), Some(Refusal::Block(BlockError::Misaligned)));
        assert_eq!(after.header.status, STATUS_INVALID_PARAMETER);
    }

    #[test]
    fn rule_01_unknown_version_invalid_parameter_1() {
        for version in [0, ABI_VERSION_MAX + 1, u16::MAX] {
            let mut c = connect_block();
            c.header.abi_version = version;
            let (o, after) = run(&mut service(), AT, &c);
            assert_eq!(
                refusal(&o),
                Some(Refusal::Block(BlockError::UnknownVersion))
            );
            assert_eq!(after.header.status, STATUS_INVALID_PARAMETER_1);
        }
    }

    #[test]
    fn rule_01_unknown_opcode_invalid_device_request() {
        for op in [0, 0x7f, u16::MAX] {
            let mut c = connect_block();
            c.header.opcode = op;
            let (o, after) = run(&mut service(), AT, &c);
            assert_eq!(refusal(&o), Some(Refusal::Block(BlockError::UnknownOpcode)));
            assert_eq!(after.header.status, STATUS_INVALID_DEVICE_REQUEST);
        }
    }

    #[test]
    fn rule_01_length_not_opcode_size_invalid_parameter() {
        for length in [0, 79, 81, 24, u32::MAX] {
            let mut c = connect_block();
            c.header.length = length;
            let (o, after) = run(&mut service(), AT, &c);
            assert_eq!(refusal(&o), Some(Refusal::Block(BlockError::BadLength)));
            assert_eq!(after.header.status, STATUS_INVALID_PARAMETER);
        }
    }

    #[test]
    fn rule_01_reserved_field_not_zero_invalid_parameter() {
        let mut s = service();
        let mut c = connect_block();
        c.reserved0 = [0, 0, 1];
        let (o, after) = run(&mut s, AT, &c);
        assert_eq!(
            refusal(&o),
            Some(Refusal::Block(BlockError::ReservedNotZero))
        );
        assert_eq!(after.header.status, STATUS_INVALID_PARAMETER);
        let mut q = QueryRoute::new_zeroed();
        q.header = RequestHeader::new::<QueryRoute>(opcode::QUERY_ROUTE);
        q.reserved0 = 1;
        let (o, _) = run(&mut s, AT, &q);
        assert_eq!(
            refusal(&o),
            Some(Refusal::Block(BlockError::ReservedNotZero))
        );
        let mut p = QueryPlatform::new_zeroed();
        p.header = RequestHeader::new::<QueryPlatform>(opcode::QUERY_PLATFORM);
        p.reserved1 = 1;
        let (o, after) = run(&mut s, AT, &p);
        assert_eq!(
            refusal(&o),
            Some(Refusal::Block(BlockError::ReservedNotZero))
        );
        assert_eq!(after.cpu_count, 0, "no output on a malformed block");
        assert_eq!(s.registry().connections(), 0);
    }

    #[test]
    fn rule_01_field_outside_domain_invalid_parameter() {
        let mut s = service();
        let fields: [fn(&mut Connect); 3] = [
            |c| c.interrupt_mode = 2,
            |c| c.share_vector = 2,
            |c| c.floating_save = 0xff,
        ];
        for set in fields {
            let mut c = connect_block();
            set(&mut c);
            let (o, after) = run(&mut s, AT, &c);
            assert_eq!(
                refusal(&o),
                Some(Refusal::Block(BlockError::FieldOutOfDomain))
            );
            assert_eq!(after.header.status, STATUS_INVALID_PARAMETER);
        }
    }

    #[test]
    fn query_platform_reports_processors_limits_and_counters() {
        let mut s = service();
        let mut p = QueryPlatform::new_zeroed();
        p.header = RequestHeader::new::<QueryPlatform>(opcode::QUERY_PLATFORM);
        let (o, after) = run(&mut s, AT, &p);
        assert_eq!(o.status(), Some(STATUS_SUCCESS));
        assert_eq!(
            after.header,
            RequestHeader {
                status: 0,
                ..p.header
            }
        );
        assert_eq!(after.abi_version_max, ABI_VERSION_MAX);
        assert_eq!(after.cpu_count, 4);
        assert_eq!(after.device_count, 11);
        assert_eq!(after.online_mask, 0b1111);
        assert_eq!((after.vector_min, after.vector_max), (0x30, 0xbf));
        assert_eq!(after.object_quota, 64);
        assert_eq!(after.apic_ids[..5], [0, 1, 2, 3, 0]);
        assert_eq!(
            after.flags,
            irqconnect_abi::pv::platform_flags::LOGICAL_FLAT_BY_INDEX
        );
    }

    #[test]
    fn query_resources_reports_device_6_two_vectors() {
        let mut q = QueryResources::new_zeroed();
        q.header = RequestHeader::new::<QueryResources>(opcode::QUERY_RESOURCES);
        q.device_id = 6;
        let (o, after) = run(&mut service(), AT, &q);
        assert_eq!(o.status(), Some(STATUS_SUCCESS));
        assert_eq!(after.count, 2);
        let r = after.resources;
        assert_eq!((r[0].vector, r[0].level, r[0].line), (0x90, 9, 21));
        assert_eq!((r[1].vector, r[1].level, r[1].line), (0xa0, 10, 23));
        assert_eq!(r[2], InterruptResource::default());
    }

    #[test]
    fn query_resources_unknown_device_not_found() {
        let mut q = QueryResources::new_zeroed();
        q.header = RequestHeader::new::<QueryResources>(opcode::QUERY_RESOURCES);
        q.device_id = 11;
        q.count = 7;
        let (o, after) = run(&mut service(), AT, &q);
        assert_eq!(o.status(), Some(STATUS_NOT_FOUND));
        assert_eq!(after.count, 0);
    }

    #[test]
    fn connect_answers_handle_mask_and_route_updates_inputs_untouched() {
        let mut s = service();
        let c = connect_block();
        let (o, after) = run(&mut s, AT, &c);
        assert_eq!(o.status(), Some(STATUS_SUCCESS));
        assert_ne!(after.handle, 0);
        assert_eq!(after.effective_mask, 0b0110);
        let mut inputs = after;
        inputs.header.status = c.header.status;
        inputs.handle = 0;
        inputs.effective_mask = 0;
        assert_eq!(inputs, c, "input fields are never written");
        // Vector 0x80 is on pins 19 and 20: both routed.
        let pins: Vec<u8> = o.routes().iter().map(|u| u.pin).collect();
        assert_eq!(pins, vec![19, 20]);
    }

    #[test]
    fn connect_refused_answers_null_handle() {
        let mut c = connect_block();
        c.header.status = STATUS_NO_ANSWER;
        c.handle = 0x1234;
        c.processor_enable_mask = 0;
        let (o, after) = run(&mut service(), AT, &c);
        assert_eq!(o.status(), Some(STATUS_INVALID_PARAMETER));
        assert_eq!((after.handle, after.effective_mask), (0, 0));
        assert!(o.routes().is_empty());
    }

    #[test]
    fn disconnect_by_doorbell_masks_pins_and_stale_handle_is_invalid() {
        let mut s = service();
        let (_, connected) = run(&mut s, AT, &connect_block());
        let mut d = Disconnect::new_zeroed();
        d.header = RequestHeader::new::<Disconnect>(opcode::DISCONNECT);
        d.handle = connected.handle;
        let (o, after) = run(&mut s, AT, &d);
        assert_eq!(o.status(), Some(STATUS_SUCCESS));
        assert_eq!(after.handle, connected.handle);
        assert!(o.routes().iter().all(|u| u.route.masked));
        assert_eq!(o.routes().len(), 2);
        let (o, _) = run(&mut s, AT, &d);
        assert_eq!(o.status(), Some(STATUS_INVALID_HANDLE));
    }

    #[test]
    fn query_route_reports_programmed_pin() {
        let mut s = service();
        run(&mut s, AT, &connect_block());
        let mut q = QueryRoute::new_zeroed();
        q.header = RequestHeader::new::<QueryRoute>(opcode::QUERY_ROUTE);
        q.pin = 20;
        let (o, after) = run(&mut s, AT, &q);
        assert_eq!(o.status(), Some(STATUS_SUCCESS));
        assert_eq!(
            (
                after.masked,
                after.trigger,
                after.vector,
                after.lowest_priority
            ),
            (0, trigger::EDGE, 0x80, 1)
        );
        assert_eq!((after.destination_mask, after.connections), (0b0110, 1));
    }

    #[test]
    fn query_route_pin_out_of_range_invalid_parameter() {
        let mut q = QueryRoute::new_zeroed();
        q.header = RequestHeader::new::<QueryRoute>(opcode::QUERY_ROUTE);
        for pin in [24, 255, 256, u32::MAX] {
            q.pin = pin;
            let (o, _) = run(&mut service(), AT, &q);
            assert_eq!(refusal(&o), Some(Refusal::PinOutOfRange));
            assert_eq!(o.status(), Some(STATUS_INVALID_PARAMETER));
        }
    }

    /// RAM that can be read but never written.
    struct ReadOnly(FlatRam);

    impl GuestRam for ReadOnly {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
            self.0.read(gpa, buf)
        }
        fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Error> {
            Err(Error::NotRam {
                gpa,
                len: buf.len() as u64,
            })
        }
        fn is_ram(&self, gpa: u64, len: u64) -> bool {
            self.0.is_ram(gpa, len)
        }
    }

    #[test]
    fn connect_whose_answer_cannot_be_written_is_undone() {
        let mut s = service();
        let mut mem = ram();
        put(&mut mem, AT, &connect_block());
        let before = s.clone();
        let mut ro = ReadOnly(mem);
        assert_eq!(
            s.handle_doorbell(&mut ro, AT),
            Outcome::Unwritable { gpa: u64::from(AT) }
        );
        assert!(s.same_live_state(&before));
        assert_eq!(s.check_invariants(), Ok(()));
    }
}
