//! IoConnectInterruptEx and IoDisconnectInterruptEx over CONNECT_EX and
//! DISCONNECT_EX (`docs/semantics.md`, "IoConnectInterruptEx").
//!
//! The host checks and connects; the guest then builds its objects from
//! what the host answered: FULLY_SPECIFIED one connection as
//! IoConnectInterrupt does; LINE_BASED one per line resource of the
//! device (the resources as QUERY_RESOURCES lists them, processors = the
//! resource's affinity AND the online processors AND the
//! ProcessorEnableMask when it is not 0, rule L2); MESSAGE_BASED one per
//! message of the table the host wrote (vector, target set), each message
//! on its own vector. An answer the guest cannot make sense of (counts,
//! masks, or a message vector that already has a connection here) is
//! undone at the host and answered STATUS_UNSUCCESSFUL, with a `# wdm:`
//! line saying what did not fit.

use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN};
use irqconnect_abi::ntstatus::{
    STATUS_BUFFER_TOO_SMALL, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE,
    STATUS_INVALID_LEVEL, STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
};
use irqconnect_abi::pv::{
    ConnectEx, MAX_MESSAGES, MAX_RESOURCES, RESOURCE_FLAG_LATCHED, connect_version, interrupt_mode,
    message_table_size,
};

use super::object::{self, NIL, kind};
use super::table::{self, PIO_INTERRUPT_MESSAGE_INFO};
use super::{
    Common, DEVICE_OBJECT, KAFFINITY, KINTERRUPT_MODE, KIRQL, KMESSAGE_SERVICE_ROUTINE,
    KSERVICE_ROUTINE, KSPIN_LOCK, NTSTATUS, PKINTERRUPT, PVOID, Spec, at_passive_level, build,
    handle_of, online_mask, teardown,
};
use crate::println;
use crate::pv::{self, Request};

/// `CONNECT_FULLY_SPECIFIED`.
pub const CONNECT_FULLY_SPECIFIED: u32 = connect_version::FULLY_SPECIFIED;
/// `CONNECT_LINE_BASED`.
pub const CONNECT_LINE_BASED: u32 = connect_version::LINE_BASED;
/// `CONNECT_MESSAGE_BASED`.
pub const CONNECT_MESSAGE_BASED: u32 = connect_version::MESSAGE_BASED;
/// `CONNECT_FULLY_SPECIFIED_GROUP`.
pub const CONNECT_FULLY_SPECIFIED_GROUP: u32 = connect_version::FULLY_SPECIFIED_GROUP;

/// `STATUS_UNSUCCESSFUL`: the host's answer did not fit what the guest
/// knows (its connection was undone).
pub const STATUS_UNSUCCESSFUL: NTSTATUS = 0xc000_0001;

/// `IO_CONNECT_INTERRUPT_FULLY_SPECIFIED_PARAMETERS`.
#[derive(Clone, Copy)]
pub struct IO_CONNECT_INTERRUPT_FULLY_SPECIFIED_PARAMETERS<'a> {
    /// `PhysicalDeviceObject`.
    pub PhysicalDeviceObject: Option<&'a DEVICE_OBJECT>,
    /// Output `*InterruptObject`: `Some` only on STATUS_SUCCESS.
    pub InterruptObject: Option<PKINTERRUPT>,
    /// `ServiceRoutine`.
    pub ServiceRoutine: Option<KSERVICE_ROUTINE>,
    /// `ServiceContext`.
    pub ServiceContext: PVOID,
    /// `SpinLock`.
    pub SpinLock: Option<&'static KSPIN_LOCK>,
    /// `SynchronizeIrql`.
    pub SynchronizeIrql: KIRQL,
    /// `FloatingSave`.
    pub FloatingSave: bool,
    /// `ShareVector`.
    pub ShareVector: bool,
    /// `Vector`.
    pub Vector: u32,
    /// `Irql`.
    pub Irql: KIRQL,
    /// `InterruptMode`.
    pub InterruptMode: KINTERRUPT_MODE,
    /// `ProcessorEnableMask`.
    pub ProcessorEnableMask: KAFFINITY,
    /// `Group`: read with CONNECT_FULLY_SPECIFIED_GROUP only.
    pub Group: u16,
}

impl Default for IO_CONNECT_INTERRUPT_FULLY_SPECIFIED_PARAMETERS<'_> {
    fn default() -> Self {
        Self {
            PhysicalDeviceObject: None,
            InterruptObject: None,
            ServiceRoutine: None,
            ServiceContext: core::ptr::null_mut(),
            SpinLock: None,
            SynchronizeIrql: 0,
            FloatingSave: false,
            ShareVector: false,
            Vector: 0,
            Irql: 0,
            InterruptMode: KINTERRUPT_MODE::LevelSensitive,
            ProcessorEnableMask: 0,
            Group: 0,
        }
    }
}

/// `IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS`.
#[derive(Clone, Copy)]
pub struct IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS<'a> {
    /// `PhysicalDeviceObject`.
    pub PhysicalDeviceObject: Option<&'a DEVICE_OBJECT>,
    /// Output `*InterruptObject`: `Some` only on STATUS_SUCCESS; names the
    /// group of connections (one per line resource).
    pub InterruptObject: Option<PKINTERRUPT>,
    /// `ServiceRoutine`: one ISR for every line resource.
    pub ServiceRoutine: Option<KSERVICE_ROUTINE>,
    /// `ServiceContext`.
    pub ServiceContext: PVOID,
    /// `SpinLock`: the driver's, or `None` for one the system provides.
    pub SpinLock: Option<&'static KSPIN_LOCK>,
    /// `SynchronizeIrql`: used with a `SpinLock`; without one the largest
    /// Irql of the device's line resources is used.
    pub SynchronizeIrql: KIRQL,
    /// `FloatingSave`.
    pub FloatingSave: bool,
    /// Platform extension (rule L2): 0, or the processors to keep the
    /// device's interrupts within.
    pub ProcessorEnableMask: KAFFINITY,
}

impl Default for IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS<'_> {
    fn default() -> Self {
        Self {
            PhysicalDeviceObject: None,
            InterruptObject: None,
            ServiceRoutine: None,
            ServiceContext: core::ptr::null_mut(),
            SpinLock: None,
            SynchronizeIrql: 0,
            FloatingSave: false,
            ProcessorEnableMask: 0,
        }
    }
}

/// `ConnectionContext` of the MESSAGE_BASED parameters and of
/// IoDisconnectInterruptEx's: what IoConnectInterruptEx connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IO_INTERRUPT_CONNECTION_CONTEXT {
    /// Nothing (`Generic` = NULL).
    None,
    /// A line-based connection (a fallback of MESSAGE_BASED, or
    /// FULLY_SPECIFIED / LINE_BASED at disconnect).
    InterruptObject(PKINTERRUPT),
    /// A MESSAGE_BASED connection's table.
    InterruptMessageTable(PIO_INTERRUPT_MESSAGE_INFO),
}

/// `IO_CONNECT_INTERRUPT_MESSAGE_BASED_PARAMETERS`, plus three platform
/// fields (the table buffer is the guest kernel's, see `table.rs`).
#[derive(Clone, Copy)]
pub struct IO_CONNECT_INTERRUPT_MESSAGE_BASED_PARAMETERS<'a> {
    /// `PhysicalDeviceObject`.
    pub PhysicalDeviceObject: Option<&'a DEVICE_OBJECT>,
    /// Output `*ConnectionContext`: the message table, or with a fallback
    /// the line-based connection's interrupt object; `None` on failure.
    pub ConnectionContext: IO_INTERRUPT_CONNECTION_CONTEXT,
    /// `MessageServiceRoutine`.
    pub MessageServiceRoutine: Option<KMESSAGE_SERVICE_ROUTINE>,
    /// `ServiceContext`.
    pub ServiceContext: PVOID,
    /// `SpinLock`: the driver's, or `None` for one the system provides
    /// (one for all the messages).
    pub SpinLock: Option<&'static KSPIN_LOCK>,
    /// `SynchronizeIrql`: used with a `SpinLock`; without one the largest
    /// message Irql is the `UnifiedIrql`.
    pub SynchronizeIrql: KIRQL,
    /// `FloatingSave`.
    pub FloatingSave: bool,
    /// `FallBackServiceRoutine`: connected LINE_BASED when the device has
    /// no message-signaled interrupts.
    pub FallBackServiceRoutine: Option<KSERVICE_ROUTINE>,
    /// Platform extension (rule M7): 0, or the processors to keep the
    /// messages within.
    pub ProcessorEnableMask: KAFFINITY,
    /// Platform extension, for tests of the host: offer exactly this many
    /// bytes of table buffer and do not retry on STATUS_BUFFER_TOO_SMALL.
    /// `None`: offer a small buffer, and when the host answers
    /// STATUS_BUFFER_TOO_SMALL retry once with `MessageTableRequired`
    /// bytes.
    pub MessageTableLength: Option<u32>,
    /// Output, platform extension: the bytes the host said the table takes.
    pub MessageTableRequired: u32,
}

impl Default for IO_CONNECT_INTERRUPT_MESSAGE_BASED_PARAMETERS<'_> {
    fn default() -> Self {
        Self {
            PhysicalDeviceObject: None,
            ConnectionContext: IO_INTERRUPT_CONNECTION_CONTEXT::None,
            MessageServiceRoutine: None,
            ServiceContext: core::ptr::null_mut(),
            SpinLock: None,
            SynchronizeIrql: 0,
            FloatingSave: false,
            FallBackServiceRoutine: None,
            ProcessorEnableMask: 0,
            MessageTableLength: None,
            MessageTableRequired: 0,
        }
    }
}

/// `IO_CONNECT_INTERRUPT_PARAMETERS`: `Version` says which member is read
/// (Windows overlays them in a union; here they sit side by side).
/// IoConnectInterruptEx sets `Version` to CONNECT_LINE_BASED when a
/// MESSAGE_BASED request fell back to the device's line resources.
#[derive(Clone, Copy, Default)]
pub struct IO_CONNECT_INTERRUPT_PARAMETERS<'a> {
    /// `Version`: one of the `CONNECT_*` values.
    pub Version: u32,
    /// For CONNECT_FULLY_SPECIFIED(_GROUP).
    pub FullySpecified: IO_CONNECT_INTERRUPT_FULLY_SPECIFIED_PARAMETERS<'a>,
    /// For CONNECT_LINE_BASED.
    pub LineBased: IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS<'a>,
    /// For CONNECT_MESSAGE_BASED.
    pub MessageBased: IO_CONNECT_INTERRUPT_MESSAGE_BASED_PARAMETERS<'a>,
}

impl IO_CONNECT_INTERRUPT_PARAMETERS<'_> {
    /// Parameters of `version`, every member defaulted.
    pub fn new(version: u32) -> Self {
        Self {
            Version: version,
            ..Self::default()
        }
    }
}

/// `IO_DISCONNECT_INTERRUPT_PARAMETERS`.
#[derive(Clone, Copy, Debug)]
pub struct IO_DISCONNECT_INTERRUPT_PARAMETERS {
    /// `Version`: the version IoConnectInterruptEx connected (its output).
    pub Version: u32,
    /// `ConnectionContext`: the interrupt object or message table
    /// IoConnectInterruptEx returned.
    pub ConnectionContext: IO_INTERRUPT_CONNECTION_CONTEXT,
}

/// IoConnectInterruptEx. Every output is cleared first and set only on
/// STATUS_SUCCESS (except `MessageTableRequired`). Above PASSIVE_LEVEL:
/// STATUS_INVALID_LEVEL without asking the host. An unknown `Version` is
/// passed to the host, which answers STATUS_INVALID_PARAMETER_1.
pub fn IoConnectInterruptEx(parameters: &mut IO_CONNECT_INTERRUPT_PARAMETERS<'_>) -> NTSTATUS {
    parameters.FullySpecified.InterruptObject = None;
    parameters.LineBased.InterruptObject = None;
    parameters.MessageBased.ConnectionContext = IO_INTERRUPT_CONNECTION_CONTEXT::None;
    parameters.MessageBased.MessageTableRequired = 0;
    if !at_passive_level() {
        return STATUS_INVALID_LEVEL;
    }
    match parameters.Version {
        CONNECT_FULLY_SPECIFIED | CONNECT_FULLY_SPECIFIED_GROUP => {
            connect_fully_specified(parameters.Version, &mut parameters.FullySpecified)
        }
        CONNECT_LINE_BASED => connect_line_based(&mut parameters.LineBased),
        CONNECT_MESSAGE_BASED => connect_message_based(parameters),
        other => connect_unknown(other, parameters),
    }
}

/// Undoes a host connection the guest will not keep.
fn undo(answer: &ConnectEx, why: core::fmt::Arguments<'_>) -> NTSTATUS {
    println!(
        "# wdm: IoConnectInterruptEx: the host's answer does not fit ({}); connection undone",
        why
    );
    let _ = pv::disconnect_ex(answer.version_used, answer.handle);
    STATUS_UNSUCCESSFUL
}

fn routine_address(r: Option<KSERVICE_ROUTINE>) -> u64 {
    r.map_or(0, |r| r as usize as u64)
}

fn connect_fully_specified(
    version: u32,
    p: &mut IO_CONNECT_INTERRUPT_FULLY_SPECIFIED_PARAMETERS<'_>,
) -> NTSTATUS {
    let Some(pdo) = p.PhysicalDeviceObject else {
        return STATUS_INVALID_PARAMETER;
    };
    let mut req = ConnectEx::blank();
    req.version = version;
    req.device_id = pdo.device_id();
    req.vector = p.Vector;
    req.irql = p.Irql;
    req.synchronize_irql = p.SynchronizeIrql;
    req.interrupt_mode = p.InterruptMode as u8;
    req.share_vector = u8::from(p.ShareVector);
    req.floating_save = u8::from(p.FloatingSave);
    req.group = if version == CONNECT_FULLY_SPECIFIED_GROUP {
        p.Group
    } else {
        0
    };
    req.processor_enable_mask = p.ProcessorEnableMask;
    req.service_routine = routine_address(p.ServiceRoutine);
    req.service_context = p.ServiceContext as u64;
    req.spin_lock = p.SpinLock.map_or(0, KSPIN_LOCK::address);

    let mut registry = object::REGISTRY.lock();
    let (status, answer) = pv::connect_ex(req);
    if status != STATUS_SUCCESS {
        return status;
    }
    let (Some(routine), Ok(vector)) = (p.ServiceRoutine, u8::try_from(p.Vector)) else {
        return undo(
            &answer,
            format_args!("accepted a null routine or a wide vector"),
        );
    };
    if answer.version_used != version
        || answer.count != 1
        || answer.handle == 0
        || answer.unified_irql != p.SynchronizeIrql
    {
        return undo(
            &answer,
            format_args!(
                "version_used {} count {} handle {} UnifiedIrql {} for version {}",
                crate::display::dec(answer.version_used),
                crate::display::dec(answer.count),
                crate::display::hex(answer.handle),
                crate::display::dec(answer.unified_irql),
                crate::display::dec(version)
            ),
        );
    }
    let common = Common {
        host_handle: answer.handle,
        device: pdo.device_id(),
        routine: routine as usize,
        context: p.ServiceContext as usize,
        lock: p.SpinLock.map_or(0, |l| l.address() as usize),
        floating_save: p.FloatingSave,
        version_used: answer.version_used,
    };
    let spec = Spec {
        vector,
        irql: p.Irql,
        sync_irql: p.SynchronizeIrql,
        latched: p.InterruptMode == KINTERRUPT_MODE::Latched,
        mask: answer.effective_mask,
        group: req.group,
        line: 0,
        affinity: 0,
        kind: kind::SINGLE,
        message_id: 0,
    };
    let mut slots = [NIL; 1];
    match build(&mut registry, &common, 1, false, |_| spec, &mut slots) {
        Ok(c) => {
            p.InterruptObject = Some(handle_of(c));
            STATUS_SUCCESS
        }
        Err(status) => {
            let _ = pv::disconnect_ex(answer.version_used, answer.handle);
            status
        }
    }
}

/// The processors the host gave a line resource on `line` of `group`
/// that may use `wanted` (its affinity, the online processors, the
/// driver's restriction): the host narrows them to what one destination
/// reaches with the vector's other connections (`docs/semantics.md` rule
/// R), and that destination is the pin's route, so they are the route's
/// processors among `wanted`. Read under the registry lock, right after
/// the host's answer, so no other connect of this guest moved the route.
pub(super) fn line_processors(line: u32, group: u16, wanted: KAFFINITY) -> Option<KAFFINITY> {
    let route = pv::query_route_v2(line).ok()?;
    (route.group == group).then_some(route.base.destination_mask & wanted)
}

/// The line-based connections of a LINE_BASED answer (or a MESSAGE_BASED
/// one that fell back): one per line resource of the device, built into a
/// group with `routine`. Returns the group's handle.
fn build_line_group(
    registry: &mut object::Registry,
    answer: &ConnectEx,
    routine: KSERVICE_ROUTINE,
) -> Result<PKINTERRUPT, NTSTATUS> {
    let resources = match pv::query_resources_v2(answer.device_id) {
        Ok(r) => r,
        Err(s) => {
            return Err(undo(
                answer,
                format_args!(
                    "QUERY_RESOURCES of the device answered {}",
                    crate::display::hex(s)
                ),
            ));
        }
    };
    let groups = resources.groups;
    let resources = resources.base;
    let n = resources.count as usize;
    if n == 0 || n > MAX_RESOURCES || answer.count as usize != n {
        return Err(undo(
            answer,
            format_args!(
                "{} line resources connected, the device has {}",
                crate::display::dec(answer.count),
                crate::display::dec(n)
            ),
        ));
    }
    let keep = match answer.processor_enable_mask {
        0 => u64::MAX,
        m => m,
    };
    let mut union = 0;
    let mut masks = [0u64; MAX_RESOURCES];
    for (i, r) in resources.resources[..n].iter().enumerate() {
        let wanted = r.affinity & keep & online_mask(groups[i]);
        let mask = line_processors(r.line, groups[i], wanted).unwrap_or(0);
        masks[i] = mask;
        let vector_ok = u8::try_from(r.vector)
            .is_ok_and(|v| (DEVICE_VECTOR_MIN..=DEVICE_VECTOR_MAX).contains(&v));
        if mask == 0 || !vector_ok {
            return Err(undo(
                answer,
                format_args!(
                    "resource vector {} would connect on processors {}",
                    crate::display::hex(r.vector),
                    crate::display::hex(mask)
                ),
            ));
        }
        union |= mask;
    }
    if union != answer.effective_mask {
        return Err(undo(
            answer,
            format_args!(
                "effective mask {}, the resources give {}",
                crate::display::hex(answer.effective_mask),
                crate::display::hex(union)
            ),
        ));
    }
    let common = Common {
        host_handle: answer.handle,
        device: answer.device_id,
        routine: routine as usize,
        context: answer.service_context as usize,
        lock: answer.spin_lock as usize,
        floating_save: answer.floating_save != 0,
        version_used: answer.version_used,
    };
    let sync = answer.unified_irql;
    let spec = |i: usize| {
        let r = &resources.resources[i];
        Spec {
            vector: r.vector as u8,
            irql: u8::try_from(r.level).unwrap_or(u8::MAX),
            sync_irql: sync,
            latched: r.flags & RESOURCE_FLAG_LATCHED != 0,
            mask: masks[i],
            group: groups[i],
            line: r.line as u8,
            affinity: r.affinity,
            kind: kind::LINE,
            message_id: 0,
        }
    };
    let mut slots = [NIL; MAX_RESOURCES];
    match build(registry, &common, n, true, spec, &mut slots) {
        Ok(leader) => Ok(handle_of(leader)),
        Err(status) => {
            let _ = pv::disconnect_ex(answer.version_used, answer.handle);
            Err(status)
        }
    }
}

fn connect_line_based(p: &mut IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS<'_>) -> NTSTATUS {
    let Some(pdo) = p.PhysicalDeviceObject else {
        return STATUS_INVALID_PARAMETER;
    };
    let mut req = ConnectEx::blank();
    req.version = CONNECT_LINE_BASED;
    req.device_id = pdo.device_id();
    req.synchronize_irql = p.SynchronizeIrql;
    req.floating_save = u8::from(p.FloatingSave);
    req.processor_enable_mask = p.ProcessorEnableMask;
    req.service_routine = routine_address(p.ServiceRoutine);
    req.service_context = p.ServiceContext as u64;
    req.spin_lock = p.SpinLock.map_or(0, KSPIN_LOCK::address);

    let mut registry = object::REGISTRY.lock();
    let (status, answer) = pv::connect_ex(req);
    if status != STATUS_SUCCESS {
        return status;
    }
    let Some(routine) = p.ServiceRoutine else {
        return undo(&answer, format_args!("accepted a null routine"));
    };
    if answer.version_used != CONNECT_LINE_BASED || answer.handle == 0 {
        return undo(
            &answer,
            format_args!(
                "version_used {} for LINE_BASED",
                crate::display::dec(answer.version_used)
            ),
        );
    }
    match build_line_group(&mut registry, &answer, routine) {
        Ok(h) => {
            p.InterruptObject = Some(h);
            STATUS_SUCCESS
        }
        Err(status) => status,
    }
}

/// Checks the table the host wrote into `slot` against its answer.
fn check_table(slot: u16, answer: &ConnectEx, offered: usize) -> Result<(), NTSTATUS> {
    let n = answer.count as usize;
    let header = table::header(slot);
    if n == 0
        || n > MAX_MESSAGES
        || message_table_size(n) > offered
        || header.message_count != answer.count
        || header.unified_irql != answer.unified_irql
    {
        return Err(undo(
            answer,
            format_args!(
                "{} messages answered, table header says {} at UnifiedIrql {} (answer {}), {} bytes offered",
                crate::display::dec(answer.count),
                crate::display::dec(header.message_count),
                crate::display::dec(header.unified_irql),
                crate::display::dec(answer.unified_irql),
                crate::display::dec(offered)
            ),
        ));
    }
    let mut union = 0;
    let mut vectors = [0u64; 4];
    for k in 0..n {
        let Some(e) = table::entry(slot, k) else {
            return Err(undo(
                answer,
                format_args!("entry {} unreadable", crate::display::dec(k)),
            ));
        };
        let v = u8::try_from(e.vector).unwrap_or(0);
        let bit = 1u64 << (v % 64);
        let fresh = vectors[usize::from(v / 64)] & bit == 0;
        vectors[usize::from(v / 64)] |= bit;
        let free_here = super::object::bits(e.group, e.target_processor_set)
            .all(|cpu| object::head(cpu, v) == NIL);
        let ok = e.message_id as usize == k
            && (DEVICE_VECTOR_MIN..=DEVICE_VECTOR_MAX).contains(&v)
            && e.irql == v >> 4
            && e.irql <= answer.unified_irql
            && e.mode == interrupt_mode::LATCHED
            && e.target_processor_set != 0
            && e.target_processor_set & !answer.effective_mask == 0
            && fresh
            && free_here;
        if !ok {
            return Err(undo(
                answer,
                format_args!(
                    "entry {}: message {} vector {} irql {} mode {} targets {} (effective mask {}){}{}",
                    crate::display::dec(k),
                    crate::display::dec(e.message_id),
                    crate::display::hex(e.vector),
                    crate::display::dec(e.irql),
                    crate::display::dec(e.mode),
                    crate::display::hex(e.target_processor_set),
                    crate::display::hex(answer.effective_mask),
                    if fresh {
                        ""
                    } else {
                        ", vector repeated in the table"
                    },
                    if free_here {
                        ""
                    } else {
                        ", vector already connected here"
                    }
                ),
            ));
        }
        union |= e.target_processor_set;
    }
    if union != answer.effective_mask {
        return Err(undo(
            answer,
            format_args!(
                "effective mask {}, the targets give {}",
                crate::display::hex(answer.effective_mask),
                crate::display::hex(union)
            ),
        ));
    }
    Ok(())
}

fn connect_message_based(parameters: &mut IO_CONNECT_INTERRUPT_PARAMETERS<'_>) -> NTSTATUS {
    let p = &mut parameters.MessageBased;
    let Some(pdo) = p.PhysicalDeviceObject else {
        return STATUS_INVALID_PARAMETER;
    };
    let mut registry = object::REGISTRY.lock();
    let (explicit, mut offered) = match p.MessageTableLength {
        Some(len) => (true, len as usize),
        None => (false, table::SMALL_BYTES),
    };
    let Some(mut slot) = registry.take_table(offered) else {
        return STATUS_INSUFFICIENT_RESOURCES;
    };
    let mut req = ConnectEx::blank();
    req.version = CONNECT_MESSAGE_BASED;
    req.device_id = pdo.device_id();
    req.synchronize_irql = p.SynchronizeIrql;
    req.floating_save = u8::from(p.FloatingSave);
    req.processor_enable_mask = p.ProcessorEnableMask;
    req.service_routine = p.MessageServiceRoutine.map_or(0, |r| r as usize as u64);
    req.fallback_service_routine = routine_address(p.FallBackServiceRoutine);
    req.service_context = p.ServiceContext as u64;
    req.spin_lock = p.SpinLock.map_or(0, KSPIN_LOCK::address);
    req.message_table = table::address(slot);
    req.message_table_length = offered as u32;
    let (mut status, mut answer) = pv::connect_ex(req);
    if status == STATUS_BUFFER_TOO_SMALL && !explicit {
        // The documented retry: a buffer of the size the host asked for.
        let need = answer.message_table_required as usize;
        registry.free_table(slot);
        let Some(larger) = registry.take_table(need) else {
            p.MessageTableRequired = answer.message_table_required;
            return STATUS_INSUFFICIENT_RESOURCES;
        };
        slot = larger;
        offered = need;
        req.message_table = table::address(slot);
        req.message_table_length = need as u32;
        (status, answer) = pv::connect_ex(req);
    }
    p.MessageTableRequired = answer.message_table_required;
    if status != STATUS_SUCCESS {
        registry.free_table(slot);
        return status;
    }
    if answer.handle == 0 {
        registry.free_table(slot);
        return undo(&answer, format_args!("handle 0"));
    }
    if answer.version_used == CONNECT_LINE_BASED {
        registry.free_table(slot);
        let Some(fallback) = p.FallBackServiceRoutine else {
            return undo(
                &answer,
                format_args!("fell back without a fallback routine"),
            );
        };
        return match build_line_group(&mut registry, &answer, fallback) {
            Ok(h) => {
                parameters.Version = CONNECT_LINE_BASED;
                parameters.MessageBased.ConnectionContext =
                    IO_INTERRUPT_CONNECTION_CONTEXT::InterruptObject(h);
                STATUS_SUCCESS
            }
            Err(status) => status,
        };
    }
    let Some(routine) = p.MessageServiceRoutine else {
        registry.free_table(slot);
        return undo(&answer, format_args!("accepted a null message routine"));
    };
    if answer.version_used != CONNECT_MESSAGE_BASED {
        registry.free_table(slot);
        return undo(
            &answer,
            format_args!(
                "version_used {} for MESSAGE_BASED",
                crate::display::dec(answer.version_used)
            ),
        );
    }
    if let Err(status) = check_table(slot, &answer, offered) {
        registry.free_table(slot);
        return status;
    }
    let n = answer.count as usize;
    let common = Common {
        host_handle: answer.handle,
        device: pdo.device_id(),
        routine: routine as usize,
        context: p.ServiceContext as usize,
        lock: p.SpinLock.map_or(0, |l| l.address() as usize),
        floating_save: p.FloatingSave,
        version_used: answer.version_used,
    };
    let unified = answer.unified_irql;
    let spec = |k: usize| {
        let e = table::entry(slot, k).unwrap_or_default();
        Spec {
            vector: e.vector as u8,
            irql: e.irql,
            sync_irql: unified,
            latched: true,
            mask: e.target_processor_set,
            group: e.group,
            line: 0,
            affinity: 0,
            kind: kind::MESSAGE,
            message_id: k as u32,
        }
    };
    let mut slots = [NIL; MAX_MESSAGES];
    match build(&mut registry, &common, n, true, spec, &mut slots) {
        Ok(leader) => {
            object::conn(leader)
                .table
                .store(slot, core::sync::atomic::Ordering::Relaxed);
            let t = registry.publish_table(slot, leader, &slots[..n]);
            p.ConnectionContext = IO_INTERRUPT_CONNECTION_CONTEXT::InterruptMessageTable(t);
            STATUS_SUCCESS
        }
        Err(status) => {
            registry.free_table(slot);
            let _ = pv::disconnect_ex(answer.version_used, answer.handle);
            status
        }
    }
}

/// A `Version` this kernel does not know: the host is asked (with the
/// device of whichever member names one), and must refuse it.
fn connect_unknown(version: u32, parameters: &IO_CONNECT_INTERRUPT_PARAMETERS<'_>) -> NTSTATUS {
    let pdo = parameters
        .FullySpecified
        .PhysicalDeviceObject
        .or(parameters.LineBased.PhysicalDeviceObject)
        .or(parameters.MessageBased.PhysicalDeviceObject);
    let mut req = ConnectEx::blank();
    req.version = version;
    req.device_id = pdo.map_or(u32::MAX, DEVICE_OBJECT::device_id);
    let _registry = object::REGISTRY.lock();
    let (status, answer) = pv::connect_ex(req);
    if status == STATUS_SUCCESS {
        return undo(
            &answer,
            format_args!("version {} accepted", crate::display::dec(version)),
        );
    }
    status
}

/// IoDisconnectInterruptEx: disconnects what IoConnectInterruptEx
/// connected (`ConnectionContext`: the interrupt object, any one of a
/// group's, or the message table), with the `Version` it connected (the
/// host refuses another). When it returns STATUS_SUCCESS no service
/// routine of the connection runs anywhere or will run again. A stale
/// handle: STATUS_INVALID_HANDLE without asking the host; above
/// PASSIVE_LEVEL: STATUS_INVALID_LEVEL.
pub fn IoDisconnectInterruptEx(parameters: &IO_DISCONNECT_INTERRUPT_PARAMETERS) -> NTSTATUS {
    if !at_passive_level() {
        return STATUS_INVALID_LEVEL;
    }
    let mut registry = object::REGISTRY.lock();
    let leader = match parameters.ConnectionContext {
        IO_INTERRUPT_CONNECTION_CONTEXT::None => return STATUS_INVALID_PARAMETER,
        IO_INTERRUPT_CONNECTION_CONTEXT::InterruptObject(h) => match h.live() {
            Some(c) => c.leader_slot(h.slot),
            None => return STATUS_INVALID_HANDLE,
        },
        IO_INTERRUPT_CONNECTION_CONTEXT::InterruptMessageTable(t) => match t.leader() {
            Some(l) => l,
            None => return STATUS_INVALID_HANDLE,
        },
    };
    let handle = object::conn(leader)
        .host_handle
        .load(core::sync::atomic::Ordering::Relaxed);
    let status = pv::disconnect_ex(parameters.Version, handle);
    if status != STATUS_SUCCESS {
        return status;
    }
    teardown(&mut registry, leader);
    STATUS_SUCCESS
}
