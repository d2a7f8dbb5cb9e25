//! IoConnectInterruptEx validation: CONNECT_EX's rules X1..X3, L1..L2 and
//! M1..M9 in `docs/semantics.md`'s order, changing nothing.
//!
//! FULLY_SPECIFIED runs the CONNECT rules ([`validate::check_connect`]) on
//! the block's fields. LINE_BASED runs them once per line resource of the
//! device, with what the PnP manager assigned. MESSAGE_BASED checks the
//! message rules here and produces one exclusive, latched connection per
//! message with its route. The result ([`PlanEx`]) is what the service
//! records when every rule passed; the first failing rule answers.

use irqconnect_abi::pv::{
    HIGH_LEVEL, MessageInfoEntry, MessageTableHeader, connect_version, interrupt_mode,
    message_table_size, polarity,
};

use crate::devices::{Device, InterruptMode, ShareDisposition};
use crate::messages::{MessageResource, MessageRoute};
use crate::processors::ProcessorSet;
use crate::ram::GuestRam;
use crate::registry::Connection;
use crate::validate::{
    self, ConnectRequest, Context, SERVICE_CONTEXT_PROBE, SPIN_LOCK_SIZE, Violation,
};

/// Alignment of the message table buffer (rule M5).
pub const MESSAGE_TABLE_ALIGN: u64 = 8;

/// IoConnectInterruptEx's parameters plus the device, decoded from a
/// CONNECT_EX block (field domains already checked, rule 1). The default
/// is an all-zero block's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectExRequest {
    /// `Version`: one of `irqconnect_abi::pv::connect_version`, unchecked.
    pub version: u32,
    /// The device (PDO).
    pub device_id: u32,
    /// FULLY_SPECIFIED: `Vector`.
    pub vector: u32,
    /// FULLY_SPECIFIED: `Irql`.
    pub irql: u8,
    /// `SynchronizeIrql`.
    pub synchronize_irql: u8,
    /// FULLY_SPECIFIED: `InterruptMode`.
    pub interrupt_mode: InterruptMode,
    /// FULLY_SPECIFIED: `ShareVector`.
    pub share_vector: bool,
    /// `FloatingSave`.
    pub floating_save: bool,
    /// FULLY_SPECIFIED_GROUP: the processor group.
    pub group: u16,
    /// `ProcessorEnableMask` (LINE_BASED, MESSAGE_BASED: 0 or a restriction).
    pub processor_enable_mask: u64,
    /// `ServiceRoutine` or `MessageServiceRoutine`.
    pub service_routine: u64,
    /// MESSAGE_BASED: `FallBackServiceRoutine`.
    pub fallback_service_routine: u64,
    /// `ServiceContext`.
    pub service_context: u64,
    /// `SpinLock`.
    pub spin_lock: u64,
    /// MESSAGE_BASED: the table buffer's guest-physical address.
    pub message_table: u64,
    /// MESSAGE_BASED: the table buffer's length.
    pub message_table_length: u32,
}

impl ConnectExRequest {
    /// The IoConnectInterrupt parameters of a FULLY_SPECIFIED request (its
    /// `version` kept, so rule 10 knows which it is).
    pub fn classic(&self) -> ConnectRequest {
        ConnectRequest {
            device_id: self.device_id,
            vector: self.vector,
            irql: self.irql,
            synchronize_irql: self.synchronize_irql,
            interrupt_mode: self.interrupt_mode,
            share_vector: self.share_vector,
            floating_save: self.floating_save,
            processor_enable_mask: self.processor_enable_mask,
            service_routine: self.service_routine,
            service_context: self.service_context,
            spin_lock: self.spin_lock,
            version: self.version,
        }
    }
}

/// The guest-physical bytes of the request block, which the message table
/// must not overlap (rule M5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSpan {
    /// Where the block starts.
    pub start: u64,
    /// Its length.
    pub len: u64,
}

/// A MESSAGE_BASED connection's message table, ready to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageTable {
    /// Where it goes (guest-physical).
    pub gpa: u64,
    /// The header.
    pub header: MessageTableHeader,
    /// One entry per message, message order.
    pub entries: Vec<MessageInfoEntry>,
}

impl MessageTable {
    /// The table as the bytes the guest reads.
    pub fn to_bytes(&self) -> Vec<u8> {
        use zerocopy::IntoBytes;
        let mut out = Vec::with_capacity(message_table_size(self.entries.len()));
        out.extend_from_slice(self.header.as_bytes());
        for e in &self.entries {
            out.extend_from_slice(e.as_bytes());
        }
        out
    }
}

/// A refused CONNECT_EX: the rule, and the message table size when the
/// refusal came at rule M5 or later (`message_table_required` is answered
/// from M5 on, whatever comes next; 0 before).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExRefusal {
    /// The first rule that failed.
    pub violation: Violation,
    /// The table size, or 0.
    pub table_required: u32,
}

impl From<Violation> for ExRefusal {
    fn from(violation: Violation) -> Self {
        Self {
            violation,
            table_required: 0,
        }
    }
}

/// What CONNECT_EX would record, once every rule passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEx {
    /// The version connected (MESSAGE_BASED may fall back to LINE_BASED).
    pub version_used: u32,
    /// The connections: one (FULLY_SPECIFIED) or a group, lead first.
    pub connections: Vec<Connection>,
    /// Each message's route, in message order (MESSAGE_BASED only).
    pub message_routes: Vec<MessageRoute>,
    /// The IRQL every routine of the connection runs at.
    pub unified_irql: u8,
    /// MESSAGE_BASED: the table to write.
    pub table: Option<MessageTable>,
    /// MESSAGE_BASED: the table's size (0 otherwise).
    pub table_required: u32,
}

/// Checks CONNECT_EX (rules X1.., then the version's rules); changes nothing.
pub fn check_connect_ex<R: GuestRam + ?Sized>(
    req: &ConnectExRequest,
    block: BlockSpan,
    ctx: &Context<'_>,
    ram: &R,
) -> Result<PlanEx, ExRefusal> {
    // Rule X1.
    if !matches!(
        req.version,
        connect_version::FULLY_SPECIFIED
            | connect_version::LINE_BASED
            | connect_version::MESSAGE_BASED
            | connect_version::FULLY_SPECIFIED_GROUP
    ) {
        return Err(Violation::UnknownConnectVersion.into());
    }
    // Rule X2.
    if unused_inputs(req) != 0 {
        return Err(Violation::UnusedInputNotZero.into());
    }
    match req.version {
        connect_version::LINE_BASED => {
            check_line_based(req, req.service_routine, ctx, ram).map_err(ExRefusal::from)
        }
        connect_version::MESSAGE_BASED => check_message_based(req, block, ctx, ram),
        _ => check_fully_specified(req, ctx, ram).map_err(ExRefusal::from),
    }
}

/// The inputs `req.version` does not use, OR-ed together (rule X2).
fn unused_inputs(req: &ConnectExRequest) -> u64 {
    let table = req.message_table | u64::from(req.message_table_length);
    let fully = u64::from(req.vector)
        | u64::from(req.irql)
        | u64::from(req.interrupt_mode.to_abi())
        | u64::from(req.share_vector);
    match req.version {
        connect_version::FULLY_SPECIFIED => {
            u64::from(req.group) | req.fallback_service_routine | table
        }
        connect_version::FULLY_SPECIFIED_GROUP => req.fallback_service_routine | table,
        connect_version::LINE_BASED => {
            fully | u64::from(req.group) | req.fallback_service_routine | table
        }
        _ => fully | u64::from(req.group),
    }
}

fn check_fully_specified<R: GuestRam + ?Sized>(
    req: &ConnectExRequest,
    ctx: &Context<'_>,
    ram: &R,
) -> Result<PlanEx, Violation> {
    // Rule X3.
    if req.group >= ctx.platform.group_count() {
        return Err(Violation::GroupNotPresent);
    }
    let classic = req.classic();
    let accepted =
        validate::check_connect_in_group(&classic, req.group, ctx, ram).map_err(|v| match v {
            Violation::EmptyEffectiveMask => Violation::EmptyEffectiveMaskEx,
            v => v,
        })?;
    Ok(PlanEx {
        version_used: req.version,
        unified_irql: req.synchronize_irql,
        connections: vec![accepted.connection],
        message_routes: Vec::new(),
        table: None,
        table_required: 0,
    })
}

/// The processors a LINE_BASED or MESSAGE_BASED connection may use within
/// `affinity`: the guest's restriction when it gave one (rules L2, M7).
pub(crate) fn restricted(affinity: u64, processor_enable_mask: u64) -> u64 {
    if processor_enable_mask == 0 {
        affinity
    } else {
        affinity & processor_enable_mask
    }
}

/// Rules L1, L2 (and M2's fallback, with `routine` the fallback routine).
fn check_line_based<R: GuestRam + ?Sized>(
    req: &ConnectExRequest,
    routine: u64,
    ctx: &Context<'_>,
    ram: &R,
) -> Result<PlanEx, Violation> {
    // Rule L1.
    let device = ctx
        .devices
        .device(req.device_id)
        .ok_or(Violation::UnknownDevice)?;
    if device.resources().is_empty() {
        return Err(Violation::NoLineResources);
    }
    // Rule L2: with no lock the system provides one, at the device's
    // highest Irql.
    let unified_irql = if req.spin_lock == 0 {
        device.highest_line_irql()
    } else {
        req.synchronize_irql
    };
    let mut connections = Vec::with_capacity(device.resources().len());
    let mut objects = 0u32;
    for r in device.resources() {
        let member = ConnectRequest {
            device_id: req.device_id,
            vector: u32::from(r.vector),
            irql: r.irql(),
            synchronize_irql: unified_irql,
            interrupt_mode: r.mode,
            share_vector: r.share == ShareDisposition::Shared,
            floating_save: req.floating_save,
            processor_enable_mask: restricted(r.affinity, req.processor_enable_mask),
            service_routine: routine,
            service_context: req.service_context,
            spin_lock: req.spin_lock,
            version: connect_version::LINE_BASED,
        };
        let accepted = validate::check_connect_in_group(&member, r.group, ctx, ram)?;
        objects = objects.saturating_add(accepted.connection.objects());
        connections.push(accepted.connection);
    }
    // Rule 11 over the whole group.
    if !ctx.registry.fits(objects) {
        return Err(Violation::QuotaExceeded);
    }
    Ok(PlanEx {
        version_used: connect_version::LINE_BASED,
        unified_irql,
        connections,
        message_routes: Vec::new(),
        table: None,
        table_required: 0,
    })
}

/// Rules M1..M9.
fn check_message_based<R: GuestRam + ?Sized>(
    req: &ConnectExRequest,
    block: BlockSpan,
    ctx: &Context<'_>,
    ram: &R,
) -> Result<PlanEx, ExRefusal> {
    // Rule M1.
    let device = ctx
        .devices
        .device(req.device_id)
        .ok_or(ExRefusal::from(Violation::UnknownDevice))?;
    // Rule M2.
    let Some(messages) = device.messages() else {
        if req.fallback_service_routine == 0 {
            return Err(Violation::NoMessages.into());
        }
        return check_line_based(req, req.fallback_service_routine, ctx, ram)
            .map_err(ExRefusal::from);
    };
    // Rule M3.
    if req.service_routine == 0 {
        return Err(Violation::NullServiceRoutine.into());
    }
    // Rule M4.
    if req.service_context != 0 && !ram.is_ram(req.service_context, SERVICE_CONTEXT_PROBE) {
        return Err(Violation::ServiceContextNotResident.into());
    }
    if req.spin_lock != 0 && !ram.is_ram(req.spin_lock, SPIN_LOCK_SIZE) {
        return Err(Violation::SpinLockNotResident.into());
    }
    // Rule M5: from here on, a refusal answers the table's size.
    let count = usize::from(messages.count);
    let required = message_table_size(count);
    let table_required = u32::try_from(required).unwrap_or(u32::MAX);
    let refuse = |violation: Violation| ExRefusal {
        violation,
        table_required,
    };
    check_table(
        req.message_table,
        req.message_table_length,
        block,
        required,
        ram,
    )
    .map_err(refuse)?;
    // Rule M6.
    let message_irql = messages.irql();
    let unified_irql = if req.spin_lock == 0 {
        message_irql
    } else if req.synchronize_irql < message_irql {
        return Err(refuse(Violation::SynchronizeIrqlBelowIrql));
    } else if req.synchronize_irql > HIGH_LEVEL {
        return Err(refuse(Violation::SynchronizeIrqlAboveHighLevel));
    } else {
        req.synchronize_irql
    };
    // Rules M7, M8.
    let targets = message_targets(ctx, messages, req.processor_enable_mask, &[]).map_err(refuse)?;
    let mut connections = Vec::with_capacity(count);
    let mut objects = 0u32;
    for (&(vector, ref route), k) in targets.iter().zip(0u8..) {
        let connection = message_connection(req, device, vector, k, route, unified_irql);
        objects = objects.saturating_add(connection.objects());
        connections.push(connection);
    }
    let routes: Vec<MessageRoute> = targets.into_iter().map(|(_, r)| r).collect();
    // Rule M9.
    if !ctx.registry.fits(objects) {
        return Err(refuse(Violation::QuotaExceeded));
    }
    let table = message_table(req.message_table, unified_irql, &connections, &routes);
    Ok(PlanEx {
        version_used: connect_version::MESSAGE_BASED,
        unified_irql,
        connections,
        message_routes: routes,
        table: Some(table),
        table_required,
    })
}

/// Rules M7 and M8 for every message of `messages`, in message order: its
/// processors by the policy within the resource's affinity, the online
/// processors and `restriction` (when not 0), the destination chosen for
/// them (whose reach becomes its targets), and the exclusive chain check
/// against the connections other than `except`. Each message's vector and
/// route.
pub(crate) fn message_targets(
    ctx: &Context<'_>,
    messages: &MessageResource,
    restriction: u64,
    except: &[crate::handle::Handle],
) -> Result<Vec<(u8, MessageRoute)>, Violation> {
    let allowed = restricted(
        messages.affinity & ctx.platform.group_online(messages.group),
        restriction,
    );
    if allowed == 0 {
        return Err(Violation::MessageTargetsEmpty);
    }
    let format = ctx.platform.msi_format();
    let mut out = Vec::with_capacity(usize::from(messages.count));
    for k in 0..messages.count {
        let vector = messages.vector(k).ok_or(Violation::MessageTargetsEmpty)?;
        let wanted = ProcessorSet::of_group(messages.group, messages.targets(k, allowed));
        // Messages are never shared (M8), so no other connection's
        // processors need reaching: the chain check below refuses any.
        let route = ctx
            .topology
            .choose(wanted, ProcessorSet::EMPTY)
            .and_then(|c| MessageRoute::for_choice(vector, &c, format))
            .filter(|r| r.targets != 0)
            .ok_or(Violation::MessageTargetsEmpty)?;
        // Rule M8: exclusive, so an earlier connection of these vectors
        // refuses this one (rule 9), on any processor: the message has one
        // route, so a second connection elsewhere would take it from the
        // first. The processor answered: the first of the chains both
        // would share, else this message's first.
        let set = ProcessorSet::of_group(route.group, route.targets);
        let conflict = ctx
            .registry
            .sharing_conflict_except(vector, set, InterruptMode::Latched, false, except)
            .or_else(|| {
                let taken = !ctx.registry.vector_mask_except(vector, except).is_empty();
                taken.then(|| set.first()).flatten()
            });
        if let Some(cpu) = conflict {
            return Err(Violation::SharingConflict { cpu });
        }
        out.push((vector, route));
    }
    Ok(out)
}

/// The message table of `connections` (message order) routed as `routes`.
pub(crate) fn message_table(
    gpa: u64,
    unified_irql: u8,
    connections: &[Connection],
    routes: &[MessageRoute],
) -> MessageTable {
    MessageTable {
        gpa,
        header: MessageTableHeader {
            unified_irql,
            reserved: [0; 3],
            message_count: connections.len() as u32,
        },
        entries: connections
            .iter()
            .zip(routes)
            .zip(0u32..)
            .map(|((c, r), k)| MessageInfoEntry {
                message_address: r.address,
                target_processor_set: r.targets,
                message_data: r.data,
                vector: u32::from(c.vector),
                irql: c.irql,
                mode: interrupt_mode::LATCHED,
                polarity: polarity::ACTIVE_HIGH,
                reserved0: 0,
                message_id: k,
                group: r.group,
                reserved1: [0; 6],
            })
            .collect(),
    }
}

/// Rule M5: the buffer at `start` of `length` bytes is long enough (else
/// BUFFER_TOO_SMALL with the size), aligned, guest RAM, and apart from the
/// request block.
pub(crate) fn check_table<R: GuestRam + ?Sized>(
    start: u64,
    length: u32,
    block: BlockSpan,
    required: usize,
    ram: &R,
) -> Result<(), Violation> {
    let required32 = u32::try_from(required).map_err(|_| Violation::TableNotUsable)?;
    if length < required32 {
        return Err(Violation::TableTooSmall);
    }
    let len = required as u64;
    let end = start.checked_add(len).ok_or(Violation::TableNotUsable)?;
    let block_end = block.start.saturating_add(block.len);
    let overlaps = start < block_end && block.start < end;
    if !start.is_multiple_of(MESSAGE_TABLE_ALIGN) || !ram.is_ram(start, len) || overlaps {
        return Err(Violation::TableNotUsable);
    }
    Ok(())
}

fn message_connection(
    req: &ConnectExRequest,
    device: &Device,
    vector: u8,
    message: u8,
    route: &MessageRoute,
    unified_irql: u8,
) -> Connection {
    Connection {
        device: device.id(),
        vector,
        irql: vector >> 4,
        synchronize_irql: unified_irql,
        mode: InterruptMode::Latched,
        share_vector: false,
        floating_save: req.floating_save,
        mask: route.targets,
        group: route.group,
        service_routine: req.service_routine,
        service_context: req.service_context,
        spin_lock: req.spin_lock,
        version: connect_version::MESSAGE_BASED,
        lead: None,
        message: Some(message),
    }
}

#[cfg(test)]
mod tests {
    //! One test per CONNECT_EX / DISCONNECT_EX rule of `docs/semantics.md`,
    //! named after it, on the default 4-processor test platform (devices
    //! 8, 9, 10 have messages; device 6 has two line resources).

    use super::*;
    use crate::handle::Handle;
    use crate::messages::IrqPolicy;
    use crate::ram::FlatRam;
    use crate::service::{ConnectedEx, Service};
    use irqconnect_abi::ntstatus::{
        STATUS_BUFFER_TOO_SMALL, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
        STATUS_INVALID_PARAMETER_1, STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND,
    };
    use irqconnect_abi::pv::connect_version::{
        FULLY_SPECIFIED, FULLY_SPECIFIED_GROUP, LINE_BASED, MESSAGE_BASED,
    };

    const BLOCK: BlockSpan = BlockSpan {
        start: 0x8000,
        len: 120,
    };
    const TABLE: u64 = 0x9000;

    fn service() -> Service {
        Service::with_defaults(4).unwrap()
    }

    fn ram() -> FlatRam {
        FlatRam::new(0, 0x10_0000)
    }

    /// FULLY_SPECIFIED: device 0's vector 0x60 on every processor.
    fn fully() -> ConnectExRequest {
        ConnectExRequest {
            version: FULLY_SPECIFIED,
            device_id: 0,
            vector: 0x60,
            irql: 6,
            synchronize_irql: 6,
            interrupt_mode: InterruptMode::LevelSensitive,
            share_vector: false,
            floating_save: false,
            group: 0,
            processor_enable_mask: 0b1111,
            service_routine: 0x1000,
            fallback_service_routine: 0,
            service_context: 0x2000,
            spin_lock: 0x3000,
            message_table: 0,
            message_table_length: 0,
        }
    }

    fn line(device: u32) -> ConnectExRequest {
        ConnectExRequest {
            version: LINE_BASED,
            device_id: device,
            vector: 0,
            irql: 0,
            processor_enable_mask: 0,
            ..fully()
        }
    }

    fn message(device: u32) -> ConnectExRequest {
        ConnectExRequest {
            version: MESSAGE_BASED,
            message_table: TABLE,
            message_table_length: 0x1000,
            ..line(device)
        }
    }

    fn run(s: &mut Service, r: &ConnectExRequest) -> Result<ConnectedEx, Violation> {
        s.connect_ex(r, BLOCK, &ram()).map_err(|e| e.violation)
    }

    /// The refusal of `r`, which must change nothing.
    fn refusal(s: &mut Service, r: &ConnectExRequest) -> ExRefusal {
        let before = s.clone();
        match s.connect_ex(r, BLOCK, &ram()) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => {
                assert_eq!(*s, before, "a refusal changed the service");
                e
            }
        }
    }

    /// The rule that refused `r`; no table size answered (before M5).
    fn refused(s: &mut Service, r: &ConnectExRequest) -> Violation {
        let e = refusal(s, r);
        assert_eq!(e.table_required, 0, "{e:?}");
        e.violation
    }

    /// The rule that refused `r` at M5 or later, which answers the table
    /// size `required`.
    fn refused_with_size(s: &mut Service, r: &ConnectExRequest, required: u32) -> Violation {
        let e = refusal(s, r);
        assert_eq!(e.table_required, required, "{e:?}");
        e.violation
    }

    #[test]
    fn rule_x1_unknown_version_invalid_parameter_1() {
        let mut s = service();
        for version in [0, 5, u32::MAX] {
            let r = ConnectExRequest { version, ..fully() };
            assert_eq!(refused(&mut s, &r), Violation::UnknownConnectVersion);
        }
        assert_eq!(
            Violation::UnknownConnectVersion.status(),
            STATUS_INVALID_PARAMETER_1
        );
    }

    #[test]
    fn rule_x2_inputs_a_version_does_not_use_must_be_zero() {
        let mut s = service();
        let cases = [
            ConnectExRequest {
                group: 1,
                ..fully()
            },
            ConnectExRequest {
                fallback_service_routine: 1,
                ..fully()
            },
            ConnectExRequest {
                message_table_length: 8,
                ..fully()
            },
            ConnectExRequest {
                message_table: TABLE,
                version: FULLY_SPECIFIED_GROUP,
                ..fully()
            },
            ConnectExRequest {
                vector: 0x90,
                ..line(6)
            },
            ConnectExRequest {
                share_vector: true,
                ..line(6)
            },
            ConnectExRequest {
                message_table: TABLE,
                ..line(6)
            },
            ConnectExRequest {
                irql: 5,
                ..message(10)
            },
            ConnectExRequest {
                interrupt_mode: InterruptMode::Latched,
                ..message(10)
            },
            ConnectExRequest {
                group: 1,
                ..message(10)
            },
        ];
        for r in cases {
            assert_eq!(refused(&mut s, &r), Violation::UnusedInputNotZero, "{r:?}");
        }
        assert_eq!(
            Violation::UnusedInputNotZero.status(),
            STATUS_INVALID_PARAMETER
        );
    }

    #[test]
    fn rule_x3_group_the_platform_lacks_invalid_parameter() {
        let mut s = service();
        let r = ConnectExRequest {
            version: FULLY_SPECIFIED_GROUP,
            group: 1,
            ..fully()
        };
        assert_eq!(refused(&mut s, &r), Violation::GroupNotPresent);
        let ok = run(&mut s, &ConnectExRequest { group: 0, ..r }).unwrap();
        assert_eq!((ok.version_used, ok.count), (FULLY_SPECIFIED_GROUP, 1));
    }

    /// Rule X3 on 130 processors: groups 0..2 exist (64, 64, 2); bit 0
    /// of group 1 is processor 64, in the objects and the route; a group's
    /// absent processors drop out (rule 2); group 3 does not exist.
    #[test]
    fn rule_x3_group_one_reaches_processor_64() {
        let platform = crate::platform::Platform::uniform(130).unwrap();
        let devices = crate::DeviceTable::default_for(&platform);
        let mut s = Service::new(platform, devices, 64).unwrap();
        let r = ConnectExRequest {
            version: FULLY_SPECIFIED_GROUP,
            group: 1,
            processor_enable_mask: 1,
            ..fully()
        };
        let done = run(&mut s, &r).unwrap();
        assert_eq!(done.effective_mask, 1);
        assert_eq!(s.registry().chain(64, 0x60).len(), 1);
        assert!(s.registry().chain(0, 0x60).is_empty());
        let route = s.route(16).unwrap();
        assert_eq!((route.group, route.destination), (1, 1));
        assert_eq!(
            route.target,
            crate::ApicDestination::Physical { apic_id: 64 }
        );
        let beyond = ConnectExRequest {
            group: 2,
            processor_enable_mask: 0b100,
            device_id: 1,
            vector: 0x61,
            interrupt_mode: InterruptMode::Latched,
            ..r
        };
        assert_eq!(refused(&mut s, &beyond), Violation::EmptyEffectiveMaskEx);
        let absent = ConnectExRequest { group: 3, ..beyond };
        assert_eq!(refused(&mut s, &absent), Violation::GroupNotPresent);
    }

    #[test]
    fn ex_fully_specified_behaves_as_classic_and_classic_disconnect_takes_it() {
        let mut s = service();
        let done = run(&mut s, &fully()).unwrap();
        assert_eq!(
            (
                done.version_used,
                done.effective_mask,
                done.count,
                done.unified_irql
            ),
            (FULLY_SPECIFIED, 0b1111, 1, 6)
        );
        assert!(done.table.is_none() && done.messages.is_empty());
        assert!(
            s.route(16)
                .is_some_and(|r| !r.masked && r.destination == 0b1111)
        );
        // The same rules as CONNECT: a second exclusive connect conflicts.
        assert_eq!(
            refused(&mut s, &fully()),
            Violation::SharingConflict { cpu: 0 }
        );
        assert!(s.disconnect(done.handle).is_ok());
        assert!(s.route(16).is_some_and(|r| r.masked));
    }

    #[test]
    fn rule_02_fully_specified_empty_mask_invalid_parameter_10() {
        let mut s = service();
        let r = ConnectExRequest {
            processor_enable_mask: 0b1_0000,
            ..fully()
        };
        assert_eq!(refused(&mut s, &r), Violation::EmptyEffectiveMaskEx);
        assert_eq!(
            Violation::EmptyEffectiveMaskEx.status(),
            STATUS_INVALID_PARAMETER_10
        );
    }

    #[test]
    fn rule_l1_device_without_line_resources_not_found() {
        let mut s = service();
        assert_eq!(refused(&mut s, &line(10)), Violation::NoLineResources);
        assert_eq!(refused(&mut s, &line(11)), Violation::UnknownDevice);
        assert_eq!(Violation::NoLineResources.status(), STATUS_NOT_FOUND);
    }

    #[test]
    fn rule_l2_line_based_connects_every_line_resource_with_one_lock() {
        let mut s = service();
        // No lock: the system's, at the device's highest Irql (10).
        let r = ConnectExRequest {
            spin_lock: 0,
            synchronize_irql: 0,
            ..line(6)
        };
        let done = run(&mut s, &r).unwrap();
        assert_eq!(
            (
                done.version_used,
                done.count,
                done.unified_irql,
                done.effective_mask
            ),
            (LINE_BASED, 2, 10, 0b1111)
        );
        let group = s.registry().group(done.handle).unwrap();
        let vectors: Vec<_> = group
            .iter()
            .map(|c| (c.vector, c.mode, c.synchronize_irql))
            .collect();
        assert_eq!(
            vectors,
            [
                (0x90, InterruptMode::LevelSensitive, 10),
                (0xa0, InterruptMode::Latched, 10)
            ]
        );
        assert!(s.route(21).is_some_and(|r| !r.masked));
        assert!(s.route(23).is_some_and(|r| !r.masked));
        assert_eq!(s.check_invariants(), Ok(()));
        assert!(s.disconnect_ex(LINE_BASED, done.handle).is_ok());
        // With a lock, the block's SynchronizeIrql, checked by rule 10, and
        // the restriction keeps every line on processor 2.
        let locked = ConnectExRequest {
            synchronize_irql: 9,
            processor_enable_mask: 0b0100,
            ..line(6)
        };
        assert_eq!(
            refused(&mut s, &locked),
            Violation::SynchronizeIrqlBelowDeviceIrql
        );
        let done = run(
            &mut s,
            &ConnectExRequest {
                synchronize_irql: 12,
                ..locked
            },
        )
        .unwrap();
        assert_eq!((done.effective_mask, done.unified_irql), (0b0100, 12));
        // A classic connect of the device must name the group's lock.
        let classic = crate::validate::ConnectRequest {
            device_id: 6,
            vector: 0x90,
            irql: 9,
            synchronize_irql: 12,
            interrupt_mode: InterruptMode::LevelSensitive,
            share_vector: false,
            floating_save: false,
            processor_enable_mask: 0b0001,
            service_routine: 0x1000,
            service_context: 0,
            spin_lock: 0x3008,
            version: FULLY_SPECIFIED,
        };
        assert_eq!(
            s.connect(&classic, &ram()).err(),
            Some(Violation::SpinLockMismatch)
        );
        let same = crate::validate::ConnectRequest {
            spin_lock: 0x3000,
            ..classic
        };
        assert!(s.connect(&same, &ram()).is_ok());
    }

    #[test]
    fn rule_m1_unknown_device_not_found() {
        let mut s = service();
        assert_eq!(refused(&mut s, &message(11)), Violation::UnknownDevice);
    }

    #[test]
    fn rule_m2_device_without_messages_falls_back_to_line_based() {
        let mut s = service();
        assert_eq!(refused(&mut s, &message(2)), Violation::NoMessages);
        assert_eq!(Violation::NoMessages.status(), STATUS_NOT_FOUND);
        let r = ConnectExRequest {
            fallback_service_routine: 0x5000,
            synchronize_irql: 7,
            ..message(2)
        };
        let done = run(&mut s, &r).unwrap();
        assert_eq!(
            (done.version_used, done.count, done.table_required),
            (LINE_BASED, 1, 0)
        );
        assert!(done.table.is_none());
        let group = s.registry().group(done.handle).unwrap();
        assert_eq!(group[0].service_routine, 0x5000);
        assert_eq!(group[0].version, LINE_BASED);
        assert_eq!(
            s.disconnect_ex(MESSAGE_BASED, done.handle).err(),
            Some(Violation::VersionMismatch)
        );
        assert!(s.disconnect_ex(LINE_BASED, done.handle).is_ok());
    }

    #[test]
    fn rule_m3_null_message_service_routine_invalid_parameter() {
        let mut s = service();
        let r = ConnectExRequest {
            service_routine: 0,
            ..message(8)
        };
        assert_eq!(refused(&mut s, &r), Violation::NullServiceRoutine);
    }

    #[test]
    fn rule_m4_context_and_lock_must_be_guest_ram() {
        let mut s = service();
        let r = ConnectExRequest {
            service_context: 0x10_0000,
            ..message(8)
        };
        assert_eq!(refused(&mut s, &r), Violation::ServiceContextNotResident);
        let r = ConnectExRequest {
            spin_lock: 0xf_fffc,
            ..message(8)
        };
        assert_eq!(refused(&mut s, &r), Violation::SpinLockNotResident);
    }

    #[test]
    fn rule_m5_table_too_small_answers_required_size_and_connects_nothing() {
        let mut s = service();
        let r = ConnectExRequest {
            message_table_length: 327,
            ..message(10)
        };
        assert_eq!(refused_with_size(&mut s, &r, 328), Violation::TableTooSmall);
        assert_eq!(Violation::TableTooSmall.status(), STATUS_BUFFER_TOO_SMALL);
        let exact = ConnectExRequest {
            message_table_length: 328,
            ..r
        };
        assert_eq!(run(&mut s, &exact).unwrap().table_required, 328);
    }

    #[test]
    fn rule_m5_table_misaligned_outside_ram_or_over_the_block_invalid_parameter() {
        let mut s = service();
        for at in [
            TABLE + 4,
            0xf_ff00,
            BLOCK.start + 0x40,
            BLOCK.start - 0x100,
            u64::MAX - 7,
        ] {
            let r = ConnectExRequest {
                message_table: at,
                ..message(10)
            };
            assert_eq!(
                refused_with_size(&mut s, &r, 328),
                Violation::TableNotUsable,
                "{at:#x}"
            );
        }
        // Right after the block is fine.
        let r = ConnectExRequest {
            message_table: BLOCK.start + BLOCK.len,
            ..message(10)
        };
        assert!(run(&mut s, &r).is_ok());
    }

    #[test]
    fn rule_m6_unified_irql_is_the_message_class_or_the_locks() {
        let mut s = service();
        // No lock: the class of device 10's messages (4), whatever was asked.
        let r = ConnectExRequest {
            spin_lock: 0,
            synchronize_irql: 0,
            ..message(10)
        };
        let done = run(&mut s, &r).unwrap();
        assert_eq!(done.unified_irql, 4);
        assert_eq!(done.table.as_ref().map(|t| t.header.unified_irql), Some(4));
        // A lock: the block's, between the class and HIGH_LEVEL.
        for (sync, want) in [
            (3, Some(Violation::SynchronizeIrqlBelowIrql)),
            (16, Some(Violation::SynchronizeIrqlAboveHighLevel)),
            (9, None),
        ] {
            let r = ConnectExRequest {
                synchronize_irql: sync,
                ..message(9)
            };
            match want {
                Some(v) => assert_eq!(refused_with_size(&mut s, &r, 168), v),
                None => assert_eq!(run(&mut s, &r).unwrap().unified_irql, 9),
            }
        }
    }

    #[test]
    fn rule_m7_each_policy_picks_its_processors_inside_the_mask() {
        let mut s = service();
        // Device 8: MSI, OneCloseProcessor: the lowest allowed processor.
        let one = run(
            &mut s,
            &ConnectExRequest {
                processor_enable_mask: 0b1100,
                ..message(8)
            },
        )
        .unwrap();
        assert_eq!(one.effective_mask, 0b0100);
        // Device 9: MSI x4, SpecifiedProcessors: every message to the whole
        // allowed set, one address.
        let specified = run(
            &mut s,
            &ConnectExRequest {
                processor_enable_mask: 0b0110,
                ..message(9)
            },
        )
        .unwrap();
        let t = specified.table.unwrap();
        assert!(t.entries.iter().all(|e| e.target_processor_set == 0b0110));
        assert!(
            t.entries
                .iter()
                .all(|e| e.message_address == t.entries[0].message_address)
        );
        let vectors: Vec<_> = t
            .entries
            .iter()
            .map(|e| (e.vector, e.message_data & 0xff))
            .collect();
        assert_eq!(
            vectors,
            [(0x58, 0x58), (0x59, 0x59), (0x5a, 0x5a), (0x5b, 0x5b)]
        );
        // Device 10: MSI-X x8, Spread: message k on the (k mod n)-th.
        let spread = run(&mut s, &message(10)).unwrap();
        let sets: Vec<_> = spread
            .table
            .unwrap()
            .entries
            .iter()
            .map(|e| e.target_processor_set)
            .collect();
        assert_eq!(sets, [1, 2, 4, 8, 1, 2, 4, 8]);
        let targets: Vec<_> = spread
            .messages
            .iter()
            .map(|u| u.route.map(|r| r.targets))
            .collect();
        assert_eq!(targets, sets.iter().map(|&t| Some(t)).collect::<Vec<_>>());
        assert_eq!(s.check_invariants(), Ok(()));
        let m = s
            .devices()
            .device(10)
            .and_then(|d| d.messages())
            .copied()
            .unwrap();
        assert_eq!(m.policy, IrqPolicy::SpreadMessagesAcrossAllProcessors);
    }

    #[test]
    fn rule_m7_restriction_outside_the_affinity_invalid_parameter() {
        let mut s = service();
        let r = ConnectExRequest {
            processor_enable_mask: 0b1_0000,
            ..message(10)
        };
        assert_eq!(
            refused_with_size(&mut s, &r, 328),
            Violation::MessageTargetsEmpty
        );
    }

    #[test]
    fn rule_m8_messages_are_never_shared() {
        let mut s = service();
        run(&mut s, &message(9)).unwrap();
        assert!(matches!(
            refused_with_size(&mut s, &message(9), 168),
            Violation::SharingConflict { .. }
        ));
        // On any processor: a second connection of the messages elsewhere
        // would take their one route from the first (found by
        // connect_sequences).
        let mut s = service();
        let on = |mask: u64| ConnectExRequest {
            processor_enable_mask: mask,
            ..message(9)
        };
        let first = run(&mut s, &on(0b10)).unwrap();
        assert_eq!(first.effective_mask, 0b10);
        assert!(matches!(
            refusal(&mut s, &on(0b01)).violation,
            Violation::SharingConflict { cpu: 0 }
        ));
        s.check_invariants().unwrap();
        // Every message has a vector of its own, which no line resource has.
        let table = s.devices();
        for v in 0x30..=0xbfu8 {
            let owners = table
                .devices()
                .iter()
                .filter(|d| {
                    d.messages().is_some_and(|m| m.owns_vector(v))
                        || d.resource_for_vector(u32::from(v)).is_some()
                })
                .count();
            assert!(
                owners <= 1 || table.message_of_vector(v).is_none(),
                "vector {v:#x}"
            );
        }
    }

    #[test]
    fn rule_m9_every_message_counts_against_the_quota() {
        let platform = crate::platform::Platform::uniform(4).unwrap();
        let devices = crate::DeviceTable::default_for(&platform);
        let mut s = Service::new(platform, devices, 7).unwrap();
        assert_eq!(
            refused_with_size(&mut s, &message(10), 328),
            Violation::QuotaExceeded
        );
        let mut s8 = Service::new(s.platform().clone(), s.devices().clone(), 8).unwrap();
        assert!(run(&mut s8, &message(10)).is_ok());
        assert_eq!(s8.registry().objects_in_use(), 8);
    }

    #[test]
    fn disconnect_ex_rules_version_handle_and_whole_group() {
        let mut s = service();
        let done = run(&mut s, &message(10)).unwrap();
        assert_eq!(
            s.disconnect_ex(9, done.handle).err(),
            Some(Violation::UnknownConnectVersion)
        );
        assert_eq!(
            s.disconnect_ex(MESSAGE_BASED, Handle::from_raw(done.handle.raw() + 1))
                .err(),
            Some(Violation::UnknownHandle)
        );
        assert_eq!(Violation::UnknownHandle.status(), STATUS_INVALID_HANDLE);
        assert_eq!(
            s.disconnect_ex(LINE_BASED, done.handle).err(),
            Some(Violation::VersionMismatch)
        );
        assert_eq!(
            s.disconnect(done.handle).err(),
            Some(Violation::GroupNeedsDisconnectEx)
        );
        let gone = s.disconnect_ex(MESSAGE_BASED, done.handle).unwrap();
        assert_eq!(gone.messages.len(), 8);
        assert!(
            gone.messages
                .iter()
                .all(|u| u.route.is_none() && u.device == 10)
        );
        assert_eq!(s.registry().connections(), 0);
        assert!(s.message_programming().iter().all(|u| u.route.is_none()));
        assert_eq!(
            s.disconnect_ex(MESSAGE_BASED, done.handle).err(),
            Some(Violation::UnknownHandle)
        );
    }

    #[test]
    fn query_messages_reports_the_pnp_assignment() {
        let s = service();
        let q = s.query_messages(10).unwrap();
        assert_eq!(
            (
                q.message_count,
                q.kind,
                q.irql,
                q.first_vector,
                q.test_device,
                q.affinity,
                q.table_size
            ),
            (
                8,
                irqconnect_abi::pv::message_kind::MSIX,
                4,
                0x48,
                2,
                0b1111,
                328
            )
        );
        let none = s.query_messages(0).unwrap();
        assert_eq!((none.message_count, none.test_device), (0, u32::MAX));
        assert!(s.query_messages(11).is_none());
    }
}
