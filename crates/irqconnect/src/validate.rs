//! CONNECT and DISCONNECT validation, rule by rule, in SEMANTICS.md's order.
//!
//! Rule 1 (the block itself) is [`crate::request`]'s; this module checks
//! rules 2..11 on a decoded request against the platform, the device table,
//! the registry and guest RAM, changing nothing. The first failing rule wins
//! ([`Violation`]); rule 12 (all or nothing) holds because the caller records
//! a connection only after every rule passed.

use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN};
use irqconnect_abi::ntstatus::{
    NtStatus, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
    STATUS_NOT_FOUND,
};

use crate::devices::{DeviceTable, InterruptMode};
use crate::platform::Platform;
use crate::ram::GuestRam;
use crate::registry::{Connection, Registry};

/// Bytes of a `KSPIN_LOCK` (one `ULONG_PTR`): what must be resident at
/// `SpinLock` (rule 4).
pub const SPIN_LOCK_SIZE: u64 = 8;
/// Bytes that must be resident at `ServiceContext` (rule 4): its size is the
/// driver's business, so the host checks the first byte.
pub const SERVICE_CONTEXT_PROBE: u64 = 1;

/// IoConnectInterrupt's parameters plus the device, decoded from a CONNECT
/// block (field domains already checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The device (PDO).
    pub device_id: u32,
    /// `Vector`.
    pub vector: u32,
    /// `Irql`.
    pub irql: u8,
    /// `SynchronizeIrql`.
    pub synchronize_irql: u8,
    /// `InterruptMode`.
    pub interrupt_mode: InterruptMode,
    /// `ShareVector`.
    pub share_vector: bool,
    /// `FloatingSave`.
    pub floating_save: bool,
    /// `ProcessorEnableMask`.
    pub processor_enable_mask: u64,
    /// `ServiceRoutine`.
    pub service_routine: u64,
    /// `ServiceContext`.
    pub service_context: u64,
    /// `SpinLock`.
    pub spin_lock: u64,
}

/// Why a CONNECT or DISCONNECT is refused: one variant per check, tagged
/// with its SEMANTICS.md rule; [`Violation::status`] is the guest's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Rule 2: `ProcessorEnableMask` names no online processor.
    EmptyEffectiveMask,
    /// Rule 3 (HOST+): `ServiceRoutine` is 0.
    NullServiceRoutine,
    /// Rule 4 (HOST+): `ServiceContext` is not in guest RAM.
    ServiceContextNotResident,
    /// Rule 4 (HOST+): `SpinLock` is not in guest RAM.
    SpinLockNotResident,
    /// Rule 5: `SynchronizeIrql < Irql`.
    SynchronizeIrqlBelowIrql,
    /// Rule 6: `Vector` is outside the device range.
    VectorOutsideDeviceRange,
    /// Rule 6: `Irql != Vector >> 4`.
    IrqlNotVectorClass,
    /// Rule 7: no such device.
    UnknownDevice,
    /// Rule 7: the device owns no resource with this vector.
    VectorNotOwned,
    /// Rule 9: the chain on (`cpu`, vector) cannot take the new object.
    SharingConflict {
        /// The first processor where it conflicts.
        cpu: u32,
    },
    /// Rule 10 (HOST+): the device already has a connection on another
    /// vector and `SpinLock` is 0.
    SpinLockRequired,
    /// Rule 10 (HOST+): `SynchronizeIrql` is below the highest IRQL of the
    /// device's connections.
    SynchronizeIrqlBelowDeviceIrql,
    /// Rule 11: the VM's object quota would be exceeded.
    QuotaExceeded,
    /// DISCONNECT: the handle is 0, forged or stale.
    UnknownHandle,
}

impl Violation {
    /// The SEMANTICS.md rule number (CONNECT rules 2..11; 0 for DISCONNECT).
    pub const fn rule(self) -> u8 {
        match self {
            Self::EmptyEffectiveMask => 2,
            Self::NullServiceRoutine => 3,
            Self::ServiceContextNotResident | Self::SpinLockNotResident => 4,
            Self::SynchronizeIrqlBelowIrql => 5,
            Self::VectorOutsideDeviceRange | Self::IrqlNotVectorClass => 6,
            Self::UnknownDevice | Self::VectorNotOwned => 7,
            Self::SharingConflict { .. } => 9,
            Self::SpinLockRequired | Self::SynchronizeIrqlBelowDeviceIrql => 10,
            Self::QuotaExceeded => 11,
            Self::UnknownHandle => 0,
        }
    }

    /// The NTSTATUS the guest receives.
    pub const fn status(self) -> NtStatus {
        match self {
            Self::UnknownDevice | Self::VectorNotOwned => STATUS_NOT_FOUND,
            Self::QuotaExceeded => STATUS_INSUFFICIENT_RESOURCES,
            Self::UnknownHandle => STATUS_INVALID_HANDLE,
            _ => STATUS_INVALID_PARAMETER,
        }
    }
}

/// What CONNECT would record, once every rule passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The connection to record.
    pub connection: Connection,
}

/// Checks CONNECT rules 2..11 in order; changes nothing.
pub fn check_connect<R: GuestRam + ?Sized>(
    req: &ConnectRequest,
    platform: &Platform,
    devices: &DeviceTable,
    registry: &Registry,
    ram: &R,
) -> Result<Accepted, Violation> {
    // Rule 2: absent processors drop out silently; none left is an error.
    let mask = req.processor_enable_mask & platform.online_mask();
    if mask == 0 {
        return Err(Violation::EmptyEffectiveMask);
    }
    // Rule 3.
    if req.service_routine == 0 {
        return Err(Violation::NullServiceRoutine);
    }
    // Rule 4.
    if req.service_context != 0 && !ram.is_ram(req.service_context, SERVICE_CONTEXT_PROBE) {
        return Err(Violation::ServiceContextNotResident);
    }
    if req.spin_lock != 0 && !ram.is_ram(req.spin_lock, SPIN_LOCK_SIZE) {
        return Err(Violation::SpinLockNotResident);
    }
    // Rule 5.
    if req.synchronize_irql < req.irql {
        return Err(Violation::SynchronizeIrqlBelowIrql);
    }
    // Rule 6.
    let vector = match u8::try_from(req.vector) {
        Ok(v) if (DEVICE_VECTOR_MIN..=DEVICE_VECTOR_MAX).contains(&v) => v,
        _ => return Err(Violation::VectorOutsideDeviceRange),
    };
    if req.irql != vector >> 4 {
        return Err(Violation::IrqlNotVectorClass);
    }
    // Rule 7.
    let device = devices
        .device(req.device_id)
        .ok_or(Violation::UnknownDevice)?;
    if device.resource_for_vector(req.vector).is_none() {
        return Err(Violation::VectorNotOwned);
    }
    // Rule 8: FloatingSave is legal either way on x64.
    // Rule 9.
    if let Some(cpu) = registry.sharing_conflict(vector, mask, req.interrupt_mode, req.share_vector)
    {
        return Err(Violation::SharingConflict { cpu });
    }
    // Rule 10.
    let mut other_vector = false;
    let mut highest_irql = 0u8;
    for (v, _) in registry.device_vectors(req.device_id) {
        other_vector |= v != vector;
        highest_irql = highest_irql.max(v >> 4);
    }
    if other_vector && req.spin_lock == 0 {
        return Err(Violation::SpinLockRequired);
    }
    if req.synchronize_irql < highest_irql {
        return Err(Violation::SynchronizeIrqlBelowDeviceIrql);
    }
    // Rule 11.
    if !registry.fits(mask.count_ones()) {
        return Err(Violation::QuotaExceeded);
    }
    Ok(Accepted {
        connection: Connection {
            device: req.device_id,
            vector,
            irql: req.irql,
            synchronize_irql: req.synchronize_irql,
            mode: req.interrupt_mode,
            share_vector: req.share_vector,
            floating_save: req.floating_save,
            mask,
            service_routine: req.service_routine,
            service_context: req.service_context,
            spin_lock: req.spin_lock,
        },
    })
}
