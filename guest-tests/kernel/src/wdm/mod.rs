//! The WDM-style interrupt API, with Windows names and Rust-typed signatures:
//! `IoConnectInterrupt`, `IoDisconnectInterrupt`, `KeSynchronizeExecution`,
//! `KeAcquireInterruptSpinLock`/`KeReleaseInterruptSpinLock`,
//! `KeInitializeSpinLock`, and the PnP step that hands a driver its
//! translated interrupt resources ([`DEVICE_OBJECT::start`]).
//!
//! The host validates every connect (`docs/semantics.md`) and routes the device's
//! pin; this side owns the interrupt objects and dispatch:
//! - connect: ask the host; only on success take one [`KINTERRUPT`] per
//!   processor of the effective mask from a bounded static pool, append each
//!   to its (processor, vector) chain and publish it;
//! - dispatch: [`dispatch`] (chained, level/latched rules, per-connection lock);
//! - disconnect: ask the host, unlink, wait for a grace period on every
//!   processor of the mask, then free (see `dispatch.rs`).
//!
//! IoConnectInterruptEx and IoDisconnectInterruptEx (`ex.rs`) connect
//! one resource (FULLY_SPECIFIED), every line resource of a device
//! (LINE_BASED) or every message of it (MESSAGE_BASED, with the message
//! table of `table.rs`); a group's connections share one host handle and
//! one spin lock, and messages are dispatched to a
//! [`KMESSAGE_SERVICE_ROUTINE`] with their number.
//!
//! Connect and disconnect are serialised by the registry lock and run at
//! PASSIVE_LEVEL only, outside interrupt dispatch: anywhere else they
//! return STATUS_INVALID_LEVEL without asking the host.

// Windows names (KINTERRUPT, IoConnectInterrupt, CmResourceShareShared).
#![allow(
    non_snake_case,
    non_camel_case_types,
    non_upper_case_globals,
    clippy::upper_case_acronyms
)]

mod dispatch;
mod ex;
mod lock;
mod object;
mod pnp;
mod retarget;
mod table;

use core::sync::atomic::Ordering;

use irqconnect_abi::ntstatus::{
    STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE, STATUS_INVALID_LEVEL,
    STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
};
use irqconnect_abi::pv::interrupt_mode;

pub use dispatch::{dispatch, reset_counters, unclaimed};
pub use ex::{
    CONNECT_FULLY_SPECIFIED, CONNECT_FULLY_SPECIFIED_GROUP, CONNECT_LINE_BASED,
    CONNECT_MESSAGE_BASED, IO_CONNECT_INTERRUPT_FULLY_SPECIFIED_PARAMETERS,
    IO_CONNECT_INTERRUPT_LINE_BASED_PARAMETERS, IO_CONNECT_INTERRUPT_MESSAGE_BASED_PARAMETERS,
    IO_CONNECT_INTERRUPT_PARAMETERS, IO_DISCONNECT_INTERRUPT_PARAMETERS,
    IO_INTERRUPT_CONNECTION_CONTEXT, IoConnectInterruptEx, IoDisconnectInterruptEx,
};
pub use lock::{KSPIN_LOCK, KeInitializeSpinLock};
pub use object::{KINTERRUPT, MAX_OBJECTS};
pub use pnp::{CM_PARTIAL_RESOURCE_DESCRIPTOR, DEVICE_OBJECT};
pub use retarget::IoRetargetInterrupt;
pub use table::{KINTERRUPT_POLARITY, PIO_INTERRUPT_MESSAGE_INFO};

use crate::{irql, pv};

/// `NTSTATUS`.
pub type NTSTATUS = irqconnect_abi::ntstatus::NtStatus;
/// `KIRQL`.
pub type KIRQL = u8;
/// `KAFFINITY`: bit `b` = processor `64 * group + b` of a processor group
/// (group 0 when no group is named).
pub type KAFFINITY = u64;

/// `GROUP_AFFINITY`: a processor group and a mask of its processors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GROUP_AFFINITY {
    /// `Mask`.
    pub Mask: KAFFINITY,
    /// `Group`.
    pub Group: u16,
}

/// `PROCESSOR_NUMBER`: a processor as its group and its number in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PROCESSOR_NUMBER {
    /// `Group`.
    pub Group: u16,
    /// `Number`: the bit of the processor in its group's KAFFINITY.
    pub Number: u8,
}

/// Processors in a processor group: the bits of a KAFFINITY.
pub const GROUP_SIZE: usize = object::GROUP_SIZE;

/// `KeQueryActiveGroupCount`: the processor groups with an active
/// processor (processors are numbered in groups of 64).
pub fn KeQueryActiveGroupCount() -> u16 {
    crate::percpu::count().div_ceil(GROUP_SIZE) as u16
}

/// `KeQueryActiveProcessorCountEx`: the active processors of `group`.
pub fn KeQueryActiveProcessorCountEx(group: u16) -> u32 {
    let first = usize::from(group) * GROUP_SIZE;
    crate::percpu::count().saturating_sub(first).min(GROUP_SIZE) as u32
}

/// `KeGetProcessorNumberFromIndex`: processor `index` as a group and a
/// number.
pub fn KeGetProcessorNumberFromIndex(index: usize) -> PROCESSOR_NUMBER {
    PROCESSOR_NUMBER {
        Group: (index / GROUP_SIZE) as u16,
        Number: (index % GROUP_SIZE) as u8,
    }
}

/// `KeGetProcessorIndexFromNumber`: the index of a group and number.
pub fn KeGetProcessorIndexFromNumber(number: PROCESSOR_NUMBER) -> usize {
    usize::from(number.Group) * GROUP_SIZE + usize::from(number.Number)
}
/// `PVOID`: a driver context pointer (resident memory; identity-mapped).
pub type PVOID = *mut core::ffi::c_void;

/// `KSERVICE_ROUTINE`: the ISR. Called at the connection's SynchronizeIrql
/// under its spin lock with the per-processor interrupt object and the
/// ServiceContext; returns TRUE when its device interrupted.
pub type KSERVICE_ROUTINE = fn(interrupt: &KINTERRUPT, service_context: PVOID) -> bool;
/// `KMESSAGE_SERVICE_ROUTINE` (InterruptMessageService): the service
/// routine of a MESSAGE_BASED connection. Called at the connection's
/// `UnifiedIrql` under its one spin lock with the message's interrupt
/// object, the ServiceContext and the message number; returns TRUE when
/// the message was its device's.
pub type KMESSAGE_SERVICE_ROUTINE =
    fn(interrupt: &KINTERRUPT, service_context: PVOID, message_id: u32) -> bool;
/// `KSYNCHRONIZE_ROUTINE`: run by KeSynchronizeExecution.
pub type KSYNCHRONIZE_ROUTINE = fn(synchronize_context: PVOID) -> bool;

/// `KINTERRUPT_MODE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum KINTERRUPT_MODE {
    /// The device holds its line until serviced.
    LevelSensitive = interrupt_mode::LEVEL_SENSITIVE,
    /// The device signals with an edge.
    Latched = interrupt_mode::LATCHED,
}

/// What `*InterruptObject` receives: names one connection (its set of
/// per-processor interrupt objects). Generation-tagged, so a copy kept past
/// IoDisconnectInterrupt is recognised as stale.
///
/// `PKINTERRUPT::default()` names no connection (generations start at 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PKINTERRUPT {
    slot: u16,
    generation: u32,
}

impl PKINTERRUPT {
    fn live(self) -> Option<&'static object::Connection> {
        let c = object::conn_checked(self.slot)?;
        (c.live.load(Ordering::Acquire) && c.generation.load(Ordering::Acquire) == self.generation)
            .then_some(c)
    }

    fn expect_live(self, caller: &str) -> &'static object::Connection {
        match self.live() {
            Some(c) => c,
            None => panic!("{}: interrupt object is not connected", caller),
        }
    }

    /// A non-zero number naming this connection (slot and generation).
    pub fn to_bits(self) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(self.generation)
    }

    /// The processors that got an interrupt object (the host's effective
    /// mask, of [`PKINTERRUPT::processor_group`]), or 0 once disconnected.
    pub fn effective_mask(self) -> KAFFINITY {
        self.live().map_or(0, |c| c.mask.load(Ordering::Relaxed))
    }

    /// The processor group of [`PKINTERRUPT::effective_mask`].
    pub fn processor_group(self) -> u16 {
        self.live().map_or(0, |c| c.group.load(Ordering::Relaxed))
    }

    /// The effective mask with its group.
    pub fn affinity(self) -> GROUP_AFFINITY {
        GROUP_AFFINITY {
            Mask: self.effective_mask(),
            Group: self.processor_group(),
        }
    }

    /// The host's handle of this connection (0 once disconnected).
    pub fn host_handle(self) -> u64 {
        self.live()
            .map_or(0, |c| c.host_handle.load(Ordering::Relaxed))
    }

    /// The connection's vector (0 once disconnected).
    pub fn vector(self) -> u8 {
        self.live().map_or(0, |c| c.vector.load(Ordering::Relaxed))
    }

    /// The connection's SynchronizeIrql (0 once disconnected).
    pub fn synchronize_irql(self) -> KIRQL {
        self.live()
            .map_or(0, |c| c.sync_irql.load(Ordering::Relaxed))
    }

    /// The message this connection serves (`None` for a line-based one or
    /// once disconnected).
    pub fn message_id(self) -> Option<u32> {
        self.live()
            .filter(|c| c.kind.load(Ordering::Relaxed) == object::kind::MESSAGE)
            .map(|c| c.message_id.load(Ordering::Relaxed))
    }

    /// The address of the spin lock the connection's service routine and
    /// synchronized routines take (0 once disconnected).
    pub fn spin_lock_address(self) -> u64 {
        self.live().map_or(0, |c| c.spin_lock().address())
    }

    /// True while some processor holds the connection's spin lock.
    pub fn spin_lock_held(self) -> bool {
        self.live().is_some_and(|c| c.spin_lock().is_held())
    }

    /// The connection that leads this one's group (itself when alone;
    /// `None` once disconnected): two handles of one group have the same.
    pub fn group(self) -> Option<PKINTERRUPT> {
        self.live().map(|c| handle_of(c.leader_slot(self.slot)))
    }
}

/// True when the caller may connect or disconnect: PASSIVE_LEVEL and
/// outside interrupt dispatch (Windows documents IRQL = PASSIVE_LEVEL for
/// IoConnectInterrupt(Ex) and IoDisconnectInterrupt(Ex)).
fn at_passive_level() -> bool {
    irql::current() == irql::PASSIVE_LEVEL && dispatch::depth() == 0
}

/// The processors online in processor `group`, as a KAFFINITY.
fn online_mask(group: u16) -> KAFFINITY {
    let n = KeQueryActiveProcessorCountEx(group) as usize;
    if n >= GROUP_SIZE {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// What one connection of a connect is made of.
#[derive(Clone, Copy)]
struct Spec {
    vector: u8,
    irql: KIRQL,
    sync_irql: KIRQL,
    latched: bool,
    /// The processors that get an object, of `group`.
    mask: KAFFINITY,
    /// The processor group of `mask`.
    group: u16,
    /// LINE: the resource's line (IOAPIC pin) and affinity.
    line: u8,
    affinity: KAFFINITY,
    /// One of `object::kind`.
    kind: u8,
    message_id: u32,
}

/// What every connection of one connect shares.
struct Common {
    host_handle: u64,
    /// The device (its PnP id).
    device: u32,
    /// The service routine (a `KSERVICE_ROUTINE`, or for messages a
    /// `KMESSAGE_SERVICE_ROUTINE`), as an address.
    routine: usize,
    context: usize,
    /// The driver's spin lock, or 0: the connection's own (a group's: its
    /// first connection's).
    lock: usize,
    floating_save: bool,
    /// The host's `version_used` (0: IoConnectInterrupt).
    version_used: u32,
}

/// Makes and publishes the guest side of a host connection: `n`
/// connections, the `i`-th made as `spec(i)` says, one object per processor
/// of its mask; a group (chained from the first, one lock) when `group`.
/// All or nothing: when the pools run dry nothing is made and
/// STATUS_INSUFFICIENT_RESOURCES is returned (the caller undoes the host's
/// connection). Returns the first connection's slot.
fn build(
    registry: &mut object::Registry,
    common: &Common,
    n: usize,
    group: bool,
    spec: impl Fn(usize) -> Spec,
    slots: &mut [u16],
) -> Result<u16, NTSTATUS> {
    if n == 0 || n > slots.len() {
        return Err(STATUS_INSUFFICIENT_RESOURCES);
    }
    for i in 0..n {
        let s = spec(i);
        match registry.allocate(s.group, s.mask) {
            Some(c) => slots[i] = c,
            None => {
                for &c in &slots[..i] {
                    registry.free(c);
                }
                return Err(STATUS_INSUFFICIENT_RESOURCES);
            }
        }
    }
    let leader = slots[0];
    let lock = if common.lock != 0 {
        common.lock
    } else if group {
        let own = &object::conn(leader).own_lock;
        KeInitializeSpinLock(own);
        own.address() as usize
    } else {
        0
    };
    for i in 0..n {
        let s = spec(i);
        let connection = object::conn(slots[i]);
        connection
            .host_handle
            .store(common.host_handle, Ordering::Relaxed);
        connection.vector.store(s.vector, Ordering::Relaxed);
        connection.irql.store(s.irql, Ordering::Relaxed);
        connection.sync_irql.store(s.sync_irql, Ordering::Relaxed);
        connection.latched.store(s.latched, Ordering::Relaxed);
        connection
            .floating_save
            .store(common.floating_save, Ordering::Relaxed);
        connection.routine.store(common.routine, Ordering::Relaxed);
        connection.context.store(common.context, Ordering::Relaxed);
        connection.lock.store(lock, Ordering::Relaxed);
        KeInitializeSpinLock(&connection.own_lock);
        connection.mask.store(s.mask, Ordering::Relaxed);
        connection.group.store(s.group, Ordering::Relaxed);
        connection.device.store(common.device, Ordering::Relaxed);
        connection.line.store(s.line, Ordering::Relaxed);
        connection.affinity.store(s.affinity, Ordering::Relaxed);
        connection.kind.store(s.kind, Ordering::Relaxed);
        connection.message_id.store(s.message_id, Ordering::Relaxed);
        connection
            .version_used
            .store(common.version_used, Ordering::Relaxed);
        connection
            .leader
            .store(if group { leader } else { object::NIL }, Ordering::Relaxed);
        connection.next_member.store(
            if group && i + 1 < n {
                slots[i + 1]
            } else {
                object::NIL
            },
            Ordering::Relaxed,
        );
        connection.table.store(object::NIL, Ordering::Relaxed);
    }
    // The group's own lock may have been re-initialised above: only now,
    // with every field in place, publish.
    for &c in &slots[..n] {
        object::conn(c).live.store(true, Ordering::Release);
        registry.link(c, object::conn(c).vector.load(Ordering::Relaxed));
    }
    Ok(leader)
}

/// The handle of connection `slot` as it is now.
fn handle_of(slot: u16) -> PKINTERRUPT {
    PKINTERRUPT {
        slot,
        generation: object::conn(slot).generation.load(Ordering::Acquire),
    }
}

/// Takes down the guest side of the connection (or group) led by
/// `leader`, after the host disconnected it: dead, unlinked, a grace
/// period on every processor any of its objects was on, freed (with its
/// message table).
fn teardown(registry: &mut object::Registry, leader: u16) {
    let mut at = leader;
    while at != object::NIL {
        let c = object::conn(at);
        c.live.store(false, Ordering::Release);
        registry.unlink(at, c.vector.load(Ordering::Relaxed));
        at = c.next_member.load(Ordering::Relaxed);
    }
    let mut at = leader;
    while at != object::NIL {
        let c = object::conn(at);
        dispatch::wait_quiescent(
            c.group.load(Ordering::Relaxed),
            c.mask.load(Ordering::Relaxed),
        );
        at = c.next_member.load(Ordering::Relaxed);
    }
    let table = object::conn(leader).table.load(Ordering::Relaxed);
    let mut at = leader;
    while at != object::NIL {
        let next = object::conn(at).next_member.load(Ordering::Relaxed);
        registry.free(at);
        at = next;
    }
    if table != object::NIL {
        registry.free_table(table);
    }
}

/// IoConnectInterrupt, plus the physical device object the resource belongs
/// to (the host checks that the device owns `Vector`, as
/// IoConnectInterruptEx's PhysicalDeviceObject lets Windows do).
///
/// `*interrupt_object` is `None` unless the call returns STATUS_SUCCESS.
/// From a successful return on, `service_routine` may be called on any
/// processor of the effective mask ([`PKINTERRUPT::effective_mask`]).
/// Above PASSIVE_LEVEL (or inside interrupt dispatch) the call returns
/// STATUS_INVALID_LEVEL without asking the host.
#[allow(clippy::too_many_arguments)]
pub fn IoConnectInterrupt(
    physical_device_object: &DEVICE_OBJECT,
    interrupt_object: &mut Option<PKINTERRUPT>,
    service_routine: Option<KSERVICE_ROUTINE>,
    service_context: PVOID,
    spin_lock: Option<&'static KSPIN_LOCK>,
    vector: u32,
    irql: KIRQL,
    synchronize_irql: KIRQL,
    interrupt_mode: KINTERRUPT_MODE,
    share_vector: bool,
    processor_enable_mask: KAFFINITY,
    floating_save: bool,
) -> NTSTATUS {
    *interrupt_object = None;
    if !at_passive_level() {
        return STATUS_INVALID_LEVEL;
    }
    let mut req = pv::connect_block();
    req.device_id = physical_device_object.device_id();
    req.vector = vector;
    req.irql = irql;
    req.synchronize_irql = synchronize_irql;
    req.interrupt_mode = interrupt_mode as u8;
    req.share_vector = u8::from(share_vector);
    req.floating_save = u8::from(floating_save);
    req.processor_enable_mask = processor_enable_mask;
    req.service_routine = service_routine.map_or(0, |r| r as usize as u64);
    req.service_context = service_context as u64;
    req.spin_lock = spin_lock.map_or(0, KSPIN_LOCK::address);

    let mut registry = object::REGISTRY.lock();
    let answer = match pv::connect(req) {
        Ok(answer) => answer,
        Err(status) => return status,
    };
    let (Some(routine), Ok(vector8)) = (service_routine, u8::try_from(vector)) else {
        // The host accepted what it must refuse (rule 3 / rule 6): undo.
        let _ = pv::disconnect(answer.handle);
        return STATUS_INVALID_PARAMETER;
    };
    let common = Common {
        host_handle: answer.handle,
        device: physical_device_object.device_id(),
        routine: routine as usize,
        context: service_context as usize,
        lock: spin_lock.map_or(0, |l| l.address() as usize),
        floating_save,
        version_used: 0,
    };
    let spec = Spec {
        vector: vector8,
        irql,
        sync_irql: synchronize_irql,
        latched: interrupt_mode == KINTERRUPT_MODE::Latched,
        mask: answer.effective_mask,
        group: 0,
        line: 0,
        affinity: 0,
        kind: object::kind::SINGLE,
        message_id: 0,
    };
    let mut slots = [object::NIL; 1];
    match build(&mut registry, &common, 1, false, |_| spec, &mut slots) {
        Ok(c) => {
            *interrupt_object = Some(handle_of(c));
            STATUS_SUCCESS
        }
        Err(status) => {
            // The guest pool is smaller than the host's quota: undo.
            let _ = pv::disconnect(answer.handle);
            status
        }
    }
}

/// IoDisconnectInterrupt. When it returns STATUS_SUCCESS, the connection's
/// ISR runs nowhere and is never called again. A stale handle answers
/// STATUS_INVALID_HANDLE and changes nothing (Windows' routine returns
/// nothing; the status is this platform's addition), as does a handle the
/// host refuses (a LINE_BASED or MESSAGE_BASED connection of
/// IoConnectInterruptEx: the host wants DISCONNECT_EX for those). Above
/// PASSIVE_LEVEL: STATUS_INVALID_LEVEL, the host is not asked.
pub fn IoDisconnectInterrupt(interrupt_object: PKINTERRUPT) -> NTSTATUS {
    if !at_passive_level() {
        return STATUS_INVALID_LEVEL;
    }
    let mut registry = object::REGISTRY.lock();
    let Some(connection) = interrupt_object.live() else {
        return STATUS_INVALID_HANDLE;
    };
    let status = pv::disconnect(connection.host_handle.load(Ordering::Relaxed));
    if status != STATUS_SUCCESS {
        return status;
    }
    teardown(&mut registry, connection.leader_slot(interrupt_object.slot));
    STATUS_SUCCESS
}

/// KeSynchronizeExecution: raises to the connection's SynchronizeIrql, takes
/// its spin lock, runs `synchronize_routine(synchronize_context)`, releases,
/// lowers back and returns the routine's result unchanged. The caller's IRQL
/// must be <= SynchronizeIrql. On any object of an IoConnectInterruptEx
/// group (a message's `InterruptObject`, a LINE_BASED group's) that is the
/// group's `UnifiedIrql` and its one lock, so the routine excludes the
/// service routine of every message or line of the connection.
pub fn KeSynchronizeExecution(
    interrupt: PKINTERRUPT,
    synchronize_routine: KSYNCHRONIZE_ROUTINE,
    synchronize_context: PVOID,
) -> bool {
    let old = KeAcquireInterruptSpinLock(interrupt);
    let result = synchronize_routine(synchronize_context);
    KeReleaseInterruptSpinLock(interrupt, old);
    result
}

/// KeAcquireInterruptSpinLock: raises to SynchronizeIrql (a group's
/// `UnifiedIrql`), takes the connection's spin lock (a group's one lock),
/// returns the previous IRQL. The caller's IRQL must be <= SynchronizeIrql.
pub fn KeAcquireInterruptSpinLock(interrupt: PKINTERRUPT) -> KIRQL {
    let c = interrupt.expect_live("KeAcquireInterruptSpinLock");
    let sync = c.sync_irql.load(Ordering::Relaxed);
    let now = irql::current();
    if now > sync {
        panic!(
            "IRQL_NOT_LESS_OR_EQUAL: interrupt spin lock taken at IRQL {} above SynchronizeIrql {}",
            crate::display::dec(now),
            crate::display::dec(sync)
        );
    }
    let old = irql::raise(sync);
    c.spin_lock().acquire();
    old
}

/// KeReleaseInterruptSpinLock: releases the connection's spin lock and
/// lowers to `old_irql`.
pub fn KeReleaseInterruptSpinLock(interrupt: PKINTERRUPT, old_irql: KIRQL) {
    let c = interrupt.expect_live("KeReleaseInterruptSpinLock");
    c.spin_lock().release();
    irql::lower(old_irql);
}

/// Tells the host how this kernel's local APICs decode logical
/// destinations (SET_APIC_MODEL), so routes can use logical destinations
/// beyond processors 0..7: x2APIC, or xAPIC flat (up to 8 processors) or
/// cluster (more). Called once at boot, before any connect (the host
/// refuses a change while connections are live).
pub fn declare_apic_model() -> NTSTATUS {
    use irqconnect_abi::pv::apic_model;
    let model = if crate::lapic::x2apic() {
        apic_model::X2APIC
    } else if crate::lapic::xapic_cluster() {
        apic_model::XAPIC_CLUSTER
    } else {
        apic_model::XAPIC_FLAT
    };
    pv::set_apic_model(model)
}

/// Live connections and objects of this guest (diagnostics).
pub fn usage() -> (usize, usize) {
    let registry = object::REGISTRY.lock();
    (
        registry.connections_live(),
        MAX_OBJECTS - registry.objects_free(),
    )
}

/// The connections whose objects are on the chain of (`cpu`, `vector`), in
/// chain order; returns how many were written to `out`.
pub fn chain(cpu: usize, vector: u8, out: &mut [PKINTERRUPT]) -> usize {
    let _registry = object::REGISTRY.lock();
    let mut n = 0;
    let mut at = object::head(cpu, vector);
    while at != object::NIL && n < out.len() {
        let o = object::obj(at);
        out[n] = o.interrupt_object();
        n += 1;
        at = o.next();
    }
    n
}

/// Disconnects every live connection (after a failed test), groups of
/// IoConnectInterruptEx with DISCONNECT_EX; returns how many there were.
pub fn disconnect_all() -> usize {
    let mut n = 0;
    for slot in 0..object::MAX_CONNECTIONS as u16 {
        let Some(c) = object::conn_checked(slot) else {
            break;
        };
        if !c.live.load(Ordering::Acquire) || c.leader_slot(slot) != slot {
            // Free, or a group member: it goes with its group's first.
            continue;
        }
        let handle = handle_of(slot);
        let status = match c.version_used.load(Ordering::Relaxed) {
            0 => IoDisconnectInterrupt(handle),
            version => IoDisconnectInterruptEx(&IO_DISCONNECT_INTERRUPT_PARAMETERS {
                Version: version,
                ConnectionContext: IO_INTERRUPT_CONNECTION_CONTEXT::InterruptObject(handle),
            }),
        };
        if status == STATUS_SUCCESS {
            n += 1;
        }
    }
    n
}
