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
//! Connect and disconnect are serialised by the registry lock and must be
//! called at IRQL <= DISPATCH_LEVEL, outside interrupt dispatch.

// Windows names (KINTERRUPT, IoConnectInterrupt, CmResourceShareShared).
#![allow(
    non_snake_case,
    non_camel_case_types,
    non_upper_case_globals,
    clippy::upper_case_acronyms
)]

mod dispatch;
mod lock;
mod object;
mod pnp;

use core::sync::atomic::Ordering;

use irqconnect_abi::ntstatus::{
    STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE, STATUS_SUCCESS,
};
use irqconnect_abi::pv::interrupt_mode;

pub use dispatch::{dispatch, reset_counters, unclaimed};
pub use lock::{KSPIN_LOCK, KeInitializeSpinLock};
pub use object::{KINTERRUPT, MAX_OBJECTS};
pub use pnp::{CM_PARTIAL_RESOURCE_DESCRIPTOR, DEVICE_OBJECT};

use crate::{irql, pv};

/// `NTSTATUS`.
pub type NTSTATUS = irqconnect_abi::ntstatus::NtStatus;
/// `KIRQL`.
pub type KIRQL = u8;
/// `KAFFINITY`: bit `i` = processor index `i`.
pub type KAFFINITY = u64;
/// `PVOID`: a driver context pointer (resident memory; identity-mapped).
pub type PVOID = *mut core::ffi::c_void;

/// `KSERVICE_ROUTINE`: the ISR. Called at the connection's SynchronizeIrql
/// under its spin lock with the per-processor interrupt object and the
/// ServiceContext; returns TRUE when its device interrupted.
pub type KSERVICE_ROUTINE = fn(interrupt: &KINTERRUPT, service_context: PVOID) -> bool;
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
    /// mask), or 0 once disconnected.
    pub fn effective_mask(self) -> KAFFINITY {
        self.live().map_or(0, |c| c.mask.load(Ordering::Relaxed))
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
}

fn check_passive(caller: &str) {
    let level = irql::current();
    if level > irql::DISPATCH_LEVEL || dispatch_depth() != 0 {
        panic!(
            "IRQL_NOT_LESS_OR_EQUAL: {} at IRQL {} (dispatch depth {})",
            caller,
            crate::display::dec(level),
            crate::display::dec(dispatch_depth())
        );
    }
}

fn dispatch_depth() -> u64 {
    dispatch::depth()
}

/// IoConnectInterrupt, plus the physical device object the resource belongs
/// to (the host checks that the device owns `Vector`, as
/// IoConnectInterruptEx's PhysicalDeviceObject lets Windows do).
///
/// `*interrupt_object` is `None` unless the call returns STATUS_SUCCESS.
/// From a successful return on, `service_routine` may be called on any
/// processor of the effective mask ([`PKINTERRUPT::effective_mask`]).
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
    check_passive("IoConnectInterrupt");
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
        return irqconnect_abi::ntstatus::STATUS_INVALID_PARAMETER;
    };
    let mask = answer.effective_mask;
    let Some(c) = registry.allocate(mask) else {
        // The guest pool is smaller than the host's quota: undo at the host.
        let _ = pv::disconnect(answer.handle);
        return STATUS_INSUFFICIENT_RESOURCES;
    };
    let connection = object::conn(c);
    connection
        .host_handle
        .store(answer.handle, Ordering::Relaxed);
    connection.vector.store(vector8, Ordering::Relaxed);
    connection.irql.store(irql, Ordering::Relaxed);
    connection
        .sync_irql
        .store(synchronize_irql, Ordering::Relaxed);
    connection.latched.store(
        interrupt_mode == KINTERRUPT_MODE::Latched,
        Ordering::Relaxed,
    );
    connection
        .floating_save
        .store(floating_save, Ordering::Relaxed);
    connection
        .routine
        .store(routine as usize, Ordering::Relaxed);
    connection
        .context
        .store(service_context as usize, Ordering::Relaxed);
    connection.lock.store(
        spin_lock.map_or(0, |l| l as *const KSPIN_LOCK as usize),
        Ordering::Relaxed,
    );
    KeInitializeSpinLock(&connection.own_lock);
    connection.mask.store(mask, Ordering::Relaxed);
    connection.live.store(true, Ordering::Release);
    registry.link(c, vector8);
    *interrupt_object = Some(PKINTERRUPT {
        slot: c,
        generation: connection.generation.load(Ordering::Acquire),
    });
    STATUS_SUCCESS
}

/// IoDisconnectInterrupt. When it returns STATUS_SUCCESS, the connection's
/// ISR runs nowhere and is never called again. A stale handle answers
/// STATUS_INVALID_HANDLE and changes nothing (Windows' routine returns
/// nothing; the status is this platform's addition), as does a handle the
/// host refuses.
pub fn IoDisconnectInterrupt(interrupt_object: PKINTERRUPT) -> NTSTATUS {
    check_passive("IoDisconnectInterrupt");
    let mut registry = object::REGISTRY.lock();
    let Some(connection) = interrupt_object.live() else {
        return STATUS_INVALID_HANDLE;
    };
    let status = pv::disconnect(connection.host_handle.load(Ordering::Relaxed));
    if status != STATUS_SUCCESS {
        return status;
    }
    let c = interrupt_object.slot;
    connection.live.store(false, Ordering::Release);
    registry.unlink(c, connection.vector.load(Ordering::Relaxed));
    dispatch::wait_quiescent(connection.mask.load(Ordering::Relaxed));
    registry.free(c);
    STATUS_SUCCESS
}

/// KeSynchronizeExecution: raises to the connection's SynchronizeIrql, takes
/// its spin lock, runs `synchronize_routine(synchronize_context)`, releases,
/// lowers back and returns the routine's result unchanged. The caller's IRQL
/// must be <= SynchronizeIrql.
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

/// KeAcquireInterruptSpinLock: raises to SynchronizeIrql, takes the
/// connection's spin lock, returns the previous IRQL.
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

/// Disconnects every live connection (after a failed test); returns how
/// many there were.
pub fn disconnect_all() -> usize {
    let mut n = 0;
    for slot in 0..object::MAX_CONNECTIONS as u16 {
        let Some(c) = object::conn_checked(slot) else {
            break;
        };
        if c.live.load(Ordering::Acquire) {
            let handle = PKINTERRUPT {
                slot,
                generation: c.generation.load(Ordering::Acquire),
            };
            if IoDisconnectInterrupt(handle) == STATUS_SUCCESS {
                n += 1;
            }
        }
    }
    n
}
