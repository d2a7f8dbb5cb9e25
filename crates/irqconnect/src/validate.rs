//! CONNECT and DISCONNECT validation, rule by rule, in `docs/semantics.md`'s order.
//!
//! Rule 1 (the block itself) is [`crate::request`]'s; this module checks
//! rules 2..11 on a decoded request against the platform, the device table,
//! the registry and guest RAM, changing nothing. The first failing rule wins
//! ([`Violation`]); rule 12 (all or nothing) holds because the caller records
//! a connection only after every rule passed.

use irqconnect_abi::layout::{DEVICE_VECTOR_MAX, DEVICE_VECTOR_MIN};
use irqconnect_abi::ntstatus::{
    NtStatus, STATUS_BUFFER_TOO_SMALL, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_DEVICE_STATE,
    STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER, STATUS_INVALID_PARAMETER_1,
    STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND,
};
use irqconnect_abi::pv::{HIGH_LEVEL, connect_version};

use crate::destination::Topology;
use crate::devices::{DeviceTable, InterruptMode};
use crate::handle::Handle;
use crate::platform::Platform;
use crate::processors::ProcessorSet;
use crate::ram::GuestRam;
use crate::registry::{Connection, Registry};

/// Bytes of a `KSPIN_LOCK` (one `ULONG_PTR`): what must be resident at
/// `SpinLock` (rule 4).
pub const SPIN_LOCK_SIZE: u64 = 8;
/// Bytes that must be resident at `ServiceContext` (rule 4): its size is the
/// driver's business, so the host checks the first byte.
pub const SERVICE_CONTEXT_PROBE: u64 = 1;

/// IoConnectInterrupt's parameters plus the device, decoded from a CONNECT
/// block (field domains already checked). The default is an all-zero
/// block's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// The `IO_CONNECT_INTERRUPT_PARAMETERS` version the connection is made
    /// for: FULLY_SPECIFIED for CONNECT; LINE_BASED for each line resource of
    /// a LINE_BASED CONNECT_EX, whose `spin_lock` 0 stands for the lock the
    /// system provides the group (rule 10).
    pub version: u32,
}

impl ConnectRequest {
    /// True when `spin_lock` 0 means the group's system-provided lock
    /// rather than no lock.
    pub fn system_lock(&self) -> bool {
        self.version == connect_version::LINE_BASED && self.spin_lock == 0
    }
}

/// Why a CONNECT or DISCONNECT is refused: one variant per check, tagged
/// with its `docs/semantics.md` rule; [`Violation::status`] is the guest's answer.
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
    /// Rule 5 (HOST+): `SynchronizeIrql > HIGH_LEVEL` (15): no CR8 value.
    SynchronizeIrqlAboveHighLevel,
    /// Rule 6: `Vector` is outside the device range.
    VectorOutsideDeviceRange,
    /// Rule 6: `Irql != Vector >> 4`.
    IrqlNotVectorClass,
    /// Rule 7: no such device.
    UnknownDevice,
    /// Rule 7: the device owns no resource with this vector.
    VectorNotOwned,
    /// Rule R: no APIC destination reaches a processor of the effective
    /// mask together with every processor the vector's other connections
    /// hold.
    NoCommonDestination,
    /// Rule 9: the chain on (`cpu`, vector) cannot take the new object.
    SharingConflict {
        /// The first processor where it conflicts.
        cpu: u32,
    },
    /// Rule 10 (HOST+): the device has several interrupt resources and
    /// `SpinLock` is 0.
    SpinLockRequired,
    /// Rule 10 (HOST+): a live connection of the device (several resources)
    /// holds another spin lock.
    SpinLockMismatch,
    /// Rule 10 (HOST+): `SynchronizeIrql` is below the highest Irql of the
    /// device's interrupt resources.
    SynchronizeIrqlBelowDeviceIrql,
    /// Rule 11: the VM's object quota would be exceeded.
    QuotaExceeded,
    /// DISCONNECT: the handle is 0, forged or stale, or names a member of
    /// a group rather than the group.
    UnknownHandle,
    /// DISCONNECT (HOST+): the handle names a LINE_BASED or MESSAGE_BASED
    /// group, which only DISCONNECT_EX takes apart.
    GroupNeedsDisconnectEx,
    /// Rule X1: the CONNECT_EX or DISCONNECT_EX `version` is unknown.
    UnknownConnectVersion,
    /// Rule X2 (HOST+): an input the version does not use is not zero.
    UnusedInputNotZero,
    /// Rule X3: the processor group does not exist.
    GroupNotPresent,
    /// Rule 2 for FULLY_SPECIFIED: `ProcessorEnableMask` (the tenth member)
    /// names no online processor.
    EmptyEffectiveMaskEx,
    /// Rule L1: the device has no line-based resource.
    NoLineResources,
    /// Rule M2: the device has no messages and no fallback routine was given.
    NoMessages,
    /// Rule M5: the message table buffer is shorter than the table
    /// (`ExRefusal::table_required` says how long it must be).
    TableTooSmall,
    /// Rule M5 (HOST+): the message table buffer is misaligned, not guest
    /// RAM, or overlaps the request block.
    TableNotUsable,
    /// Rule M7: a message's processors have no destination.
    MessageTargetsEmpty,
    /// DISCONNECT_EX: `version` is not the one CONNECT_EX answered with.
    VersionMismatch,
    /// Rule RT2: RETARGET's group is not the connection's.
    RetargetGroupMismatch,
    /// Rule RT3: RETARGET's mask is empty or names a processor the VM does
    /// not have in the group.
    ProcessorsOutsideVm,
    /// Rule RT4: RETARGET of a MESSAGE_BASED group without its table, or of
    /// another connection with one.
    RetargetTableMismatch,
    /// Rule RT5: the new mask names no online processor of a line or
    /// message.
    RetargetMaskEmpty,
    /// SET_APIC_MODEL: the model is not one `apic_model` defines, or is
    /// x2APIC on a platform that does not offer it.
    UnknownApicModel,
    /// SET_APIC_MODEL: connections are live.
    ConnectionsLive,
}

impl Violation {
    /// The `docs/semantics.md` rule (CONNECT rules "2".."11", "D1" for
    /// DISCONNECT, "X1".."X3", "L1", "M2".."M7" for CONNECT_EX, "DX" for
    /// DISCONNECT_EX).
    pub const fn rule(self) -> &'static str {
        match self {
            Self::EmptyEffectiveMask | Self::EmptyEffectiveMaskEx => "2",
            Self::NoCommonDestination => "R",
            Self::NullServiceRoutine => "3",
            Self::ServiceContextNotResident | Self::SpinLockNotResident => "4",
            Self::SynchronizeIrqlBelowIrql | Self::SynchronizeIrqlAboveHighLevel => "5",
            Self::VectorOutsideDeviceRange | Self::IrqlNotVectorClass => "6",
            Self::UnknownDevice | Self::VectorNotOwned => "7",
            Self::SharingConflict { .. } => "9",
            Self::SpinLockRequired
            | Self::SpinLockMismatch
            | Self::SynchronizeIrqlBelowDeviceIrql => "10",
            Self::QuotaExceeded => "11",
            Self::UnknownHandle | Self::GroupNeedsDisconnectEx => "D1",
            Self::UnknownConnectVersion => "X1",
            Self::UnusedInputNotZero => "X2",
            Self::GroupNotPresent => "X3",
            Self::NoLineResources => "L1",
            Self::NoMessages => "M2",
            Self::TableTooSmall | Self::TableNotUsable => "M5",
            Self::MessageTargetsEmpty => "M7",
            Self::VersionMismatch => "DX",
            Self::RetargetGroupMismatch => "RT2",
            Self::ProcessorsOutsideVm => "RT3",
            Self::RetargetTableMismatch => "RT4",
            Self::RetargetMaskEmpty => "RT5",
            Self::UnknownApicModel => "AM1",
            Self::ConnectionsLive => "AM2",
        }
    }

    /// The NTSTATUS the guest receives.
    pub const fn status(self) -> NtStatus {
        match self {
            Self::UnknownDevice
            | Self::VectorNotOwned
            | Self::NoLineResources
            | Self::NoMessages => STATUS_NOT_FOUND,
            Self::QuotaExceeded => STATUS_INSUFFICIENT_RESOURCES,
            Self::UnknownHandle => STATUS_INVALID_HANDLE,
            Self::UnknownConnectVersion => STATUS_INVALID_PARAMETER_1,
            Self::EmptyEffectiveMaskEx => STATUS_INVALID_PARAMETER_10,
            Self::TableTooSmall => STATUS_BUFFER_TOO_SMALL,
            Self::ConnectionsLive => STATUS_INVALID_DEVICE_STATE,
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

/// Where a request's rules look: the platform, the guest's APIC topology,
/// the device table and the registry.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// The platform.
    pub platform: &'a Platform,
    /// The destinations routes can use.
    pub topology: &'a Topology,
    /// The device table.
    pub devices: &'a DeviceTable,
    /// The live connections.
    pub registry: &'a Registry,
}

/// Rule R: the processors of `wanted` (one group's, online) a connection on
/// `vector` gets: the part of them the destination
/// [`Topology::choose`] picks reaches together with the vector's other
/// connections (all but those `except` names). The result is never empty.
///
/// The vector's processors must stay reachable by one destination after
/// any of its connections goes, so no union of its connections may be a
/// set only the broadcast would name ([`Topology::broadcast_aliases`]):
/// when the connections inside such a set would cover it with this one,
/// this one drops its highest processor the others lack there.
pub fn routable(
    ctx: &Context<'_>,
    vector: u8,
    wanted: ProcessorSet,
    except: &[Handle],
) -> Result<ProcessorSet, Violation> {
    let fixed = ctx.registry.vector_mask_except(vector, except);
    let mut effective = ctx
        .topology
        .choose(wanted, fixed)
        .map_or(ProcessorSet::EMPTY, |c| c.reach & wanted);
    for alias in ctx.topology.broadcast_aliases() {
        if !effective.is_subset(&alias) {
            continue;
        }
        let inside = ctx.registry.union_inside(vector, alias, except);
        if inside | effective == alias
            && let Some(p) = (effective - inside).last()
        {
            effective.remove(p);
        }
    }
    Some(effective)
        .filter(|e| !e.is_empty())
        .ok_or(Violation::NoCommonDestination)
}

/// Checks CONNECT rules 2..11 in order for processor group 0; changes
/// nothing.
pub fn check_connect<R: GuestRam + ?Sized>(
    req: &ConnectRequest,
    ctx: &Context<'_>,
    ram: &R,
) -> Result<Accepted, Violation> {
    check_connect_in_group(req, 0, ctx, ram)
}

/// Checks CONNECT rules 2..11 in order, `ProcessorEnableMask` naming
/// processors of `group` (which the platform has: rule X3 ran before);
/// changes nothing.
pub fn check_connect_in_group<R: GuestRam + ?Sized>(
    req: &ConnectRequest,
    group: u16,
    ctx: &Context<'_>,
    ram: &R,
) -> Result<Accepted, Violation> {
    let Context {
        platform,
        devices,
        registry,
        ..
    } = *ctx;
    // Rule 2: absent processors drop out silently; none left is an error.
    let online = req.processor_enable_mask & platform.group_online(group);
    if online == 0 {
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
    if req.synchronize_irql > HIGH_LEVEL {
        return Err(Violation::SynchronizeIrqlAboveHighLevel);
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
    // Rule R: the processors one destination reaches with the vector's
    // other connections.
    let effective = routable(ctx, vector, ProcessorSet::of_group(group, online), &[])?;
    let mask = effective.group_mask(group);
    // Rule 9.
    if let Some(cpu) =
        registry.sharing_conflict(vector, effective, req.interrupt_mode, req.share_vector)
    {
        return Err(Violation::SharingConflict { cpu });
    }
    // Rule 10: one lock, at one IRQL covering every line, for a device
    // whose ISR serves several resources; checked at every connection, the
    // first included, so the order of connections does not matter.
    if device.resources().len() > 1 {
        let system_lock = req.system_lock();
        if req.spin_lock == 0 && !system_lock {
            return Err(Violation::SpinLockRequired);
        }
        // A system-provided lock belongs to its own group: no live
        // connection can hold it. A guest lock must be every live one's.
        let mismatch = registry
            .device_connections(req.device_id)
            .filter(|c| c.message.is_none())
            .any(|c| system_lock || c.spin_lock != req.spin_lock);
        if mismatch {
            return Err(Violation::SpinLockMismatch);
        }
    }
    if req.synchronize_irql < device.highest_line_irql() {
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
            version: req.version,
            lead: None,
            message: None,
            group,
        },
    })
}

#[cfg(test)]
mod tests {
    //! One test per `docs/semantics.md` rule, named after it, run through
    //! [`Service::connect`] / [`Service::disconnect`] on the default
    //! 4-processor test platform.

    use super::*;
    use crate::handle::Handle;
    use crate::ram::FlatRam;
    use crate::service::Service;
    use irqconnect_abi::ntstatus::STATUS_SUCCESS;

    const RAM_SIZE: usize = 0x10_0000;

    fn service() -> Service {
        match Service::with_defaults(4) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    fn ram() -> FlatRam {
        FlatRam::new(0, RAM_SIZE)
    }

    /// A valid CONNECT of device 0 (pin 16, vector 0x60, level, exclusive).
    fn req() -> ConnectRequest {
        ConnectRequest {
            device_id: 0,
            vector: 0x60,
            irql: 6,
            synchronize_irql: 6,
            interrupt_mode: InterruptMode::LevelSensitive,
            share_vector: false,
            floating_save: false,
            processor_enable_mask: 0b1111,
            service_routine: 0x1000,
            service_context: 0x2000,
            spin_lock: 0x3000,
            version: irqconnect_abi::pv::connect_version::FULLY_SPECIFIED,
        }
    }

    /// A shared CONNECT of device `device` (2 or 3) on vector 0x70.
    fn shared(device: u32, mask: u64) -> ConnectRequest {
        ConnectRequest {
            device_id: device,
            vector: 0x70,
            irql: 7,
            synchronize_irql: 7,
            share_vector: true,
            processor_enable_mask: mask,
            ..req()
        }
    }

    fn refused(s: &mut Service, r: &ConnectRequest) -> Option<Violation> {
        s.connect(r, &ram()).err()
    }

    fn connected(s: &mut Service, r: &ConnectRequest) -> Handle {
        match s.connect(r, &ram()) {
            Ok(c) => c.handle,
            Err(v) => panic!("refused: {v:?}"),
        }
    }

    #[test]
    fn valid_connect_succeeds_with_handle_and_effective_mask() {
        let mut s = service();
        let done = s.connect(&req(), &ram());
        assert!(
            done.as_ref()
                .is_ok_and(|c| c.handle.raw() != 0 && c.effective_mask == 0b1111)
        );
        assert_eq!(s.registry().objects_in_use(), 4);
    }

    #[test]
    fn rule_02_empty_effective_mask_invalid_parameter() {
        let mut s = service();
        let r = ConnectRequest {
            processor_enable_mask: 0b1_0000,
            ..req()
        };
        assert_eq!(refused(&mut s, &r), Some(Violation::EmptyEffectiveMask));
        assert_eq!(
            Violation::EmptyEffectiveMask.status(),
            STATUS_INVALID_PARAMETER
        );
    }

    #[test]
    fn rule_02_absent_processors_dropped_silently() {
        let mut s = service();
        let r = ConnectRequest {
            processor_enable_mask: 0xffff_0000_0000_0101,
            ..req()
        };
        let done = s.connect(&r, &ram());
        assert_eq!(done.map(|c| c.effective_mask), Ok(0b1));
    }

    #[test]
    fn rule_03_null_service_routine_invalid_parameter() {
        let mut s = service();
        let r = ConnectRequest {
            service_routine: 0,
            ..req()
        };
        assert_eq!(refused(&mut s, &r), Some(Violation::NullServiceRoutine));
        assert_eq!(
            Violation::NullServiceRoutine.status(),
            STATUS_INVALID_PARAMETER
        );
    }

    #[test]
    fn rule_04_service_context_outside_ram_invalid_parameter() {
        let mut s = service();
        let r = ConnectRequest {
            service_context: RAM_SIZE as u64,
            ..req()
        };
        assert_eq!(
            refused(&mut s, &r),
            Some(Violation::ServiceContextNotResident)
        );
        assert_eq!(
            Violation::ServiceContextNotResident.status(),
            STATUS_INVALID_PARAMETER
        );
    }

    #[test]
    fn rule_04_spin_lock_outside_ram_invalid_parameter() {
        let mut s = service();
        // The lock's 8 bytes must all be RAM: the last 4 bytes of RAM are not enough.
        let r = ConnectRequest {
            spin_lock: RAM_SIZE as u64 - 4,
            ..req()
        };
        assert_eq!(refused(&mut s, &r), Some(Violation::SpinLockNotResident));
        // Zero pointers are optional parameters, not errors.
        let r = ConnectRequest {
            spin_lock: 0,
            version: irqconnect_abi::pv::connect_version::FULLY_SPECIFIED,
            service_context: 0,
            ..req()
        };
        assert!(s.connect(&r, &ram()).is_ok());
    }

    #[test]
    fn rule_05_synchronize_irql_below_irql_invalid_parameter() {
        let mut s = service();
        let r = ConnectRequest {
            synchronize_irql: 5,
            ..req()
        };
        assert_eq!(
            refused(&mut s, &r),
            Some(Violation::SynchronizeIrqlBelowIrql)
        );
        let higher = ConnectRequest {
            synchronize_irql: 11,
            ..req()
        };
        assert!(s.connect(&higher, &ram()).is_ok());
    }

    #[test]
    fn rule_05_synchronize_irql_above_high_level_invalid_parameter() {
        let mut s = service();
        for sync in [16, 31, 255] {
            let r = ConnectRequest {
                synchronize_irql: sync,
                ..req()
            };
            assert_eq!(
                refused(&mut s, &r),
                Some(Violation::SynchronizeIrqlAboveHighLevel),
                "SynchronizeIrql {sync}"
            );
        }
        assert_eq!(
            Violation::SynchronizeIrqlAboveHighLevel.status(),
            STATUS_INVALID_PARAMETER
        );
        let highest = ConnectRequest {
            synchronize_irql: HIGH_LEVEL,
            ..req()
        };
        assert!(s.connect(&highest, &ram()).is_ok());
    }

    #[test]
    fn rule_06_irql_not_vector_class_invalid_parameter() {
        let mut s = service();
        let r = ConnectRequest {
            irql: 5,
            synchronize_irql: 6,
            ..req()
        };
        assert_eq!(refused(&mut s, &r), Some(Violation::IrqlNotVectorClass));
        assert_eq!(
            Violation::IrqlNotVectorClass.status(),
            STATUS_INVALID_PARAMETER
        );
    }

    #[test]
    fn rule_06_vector_outside_device_range_invalid_parameter() {
        let mut s = service();
        for vector in [0x2f, 0xc0, 0x160, u32::MAX] {
            let r = ConnectRequest {
                vector,
                irql: 2,
                synchronize_irql: 12,
                ..req()
            };
            assert_eq!(
                refused(&mut s, &r),
                Some(Violation::VectorOutsideDeviceRange)
            );
        }
    }

    #[test]
    fn rule_07_unknown_device_not_found() {
        let mut s = service();
        let r = ConnectRequest {
            device_id: 11,
            ..req()
        };
        assert_eq!(refused(&mut s, &r), Some(Violation::UnknownDevice));
        assert_eq!(Violation::UnknownDevice.status(), STATUS_NOT_FOUND);
    }

    #[test]
    fn rule_07_vector_not_owned_not_found() {
        let mut s = service();
        let r = ConnectRequest {
            vector: 0x61,
            ..req()
        };
        assert_eq!(refused(&mut s, &r), Some(Violation::VectorNotOwned));
        assert_eq!(Violation::VectorNotOwned.status(), STATUS_NOT_FOUND);
    }

    #[test]
    fn rule_08_floating_save_true_accepted() {
        let mut s = service();
        let r = ConnectRequest {
            floating_save: true,
            ..req()
        };
        let h = connected(&mut s, &r);
        assert_eq!(s.registry().get(h).map(|c| c.floating_save), Some(true));
    }

    #[test]
    fn rule_09_exclusive_chain_refuses_second_object_invalid_parameter() {
        let mut s = service();
        connected(&mut s, &shared(2, 0b0011));
        let exclusive = ConnectRequest {
            share_vector: false,
            ..shared(3, 0b0110)
        };
        assert_eq!(
            refused(&mut s, &exclusive),
            Some(Violation::SharingConflict { cpu: 1 })
        );
        assert_eq!(
            Violation::SharingConflict { cpu: 1 }.status(),
            STATUS_INVALID_PARAMETER
        );
    }

    #[test]
    fn rule_09_mode_mismatch_on_shared_chain_invalid_parameter() {
        let mut s = service();
        connected(&mut s, &shared(2, 0b0001));
        let latched = ConnectRequest {
            interrupt_mode: InterruptMode::Latched,
            ..shared(3, 0b0001)
        };
        assert_eq!(
            refused(&mut s, &latched),
            Some(Violation::SharingConflict { cpu: 0 })
        );
    }

    #[test]
    fn rule_09_shared_same_mode_chains_and_disjoint_processors_never_conflict() {
        let mut s = service();
        let a = connected(&mut s, &shared(2, 0b0011));
        let b = connected(&mut s, &shared(3, 0b0010));
        assert_eq!(s.registry().chain(1, 0x70), vec![a, b]);
        // Exclusive objects on processors nobody else uses on the vector are fine.
        let exclusive = ConnectRequest {
            share_vector: false,
            ..shared(3, 0b1100)
        };
        assert!(s.connect(&exclusive, &ram()).is_ok());
    }

    /// Device 6 has two resources: 0x90 (Irql 9, level) and 0xa0 (Irql 10,
    /// latched).
    fn device_6(vector: u32, spin_lock: u64, synchronize_irql: u8) -> ConnectRequest {
        ConnectRequest {
            device_id: 6,
            vector,
            irql: (vector >> 4) as u8,
            synchronize_irql,
            interrupt_mode: if vector == 0x90 {
                InterruptMode::LevelSensitive
            } else {
                InterruptMode::Latched
            },
            spin_lock,
            ..req()
        }
    }

    #[test]
    fn rule_10_first_connection_without_spin_lock_invalid_parameter() {
        let mut s = service();
        assert_eq!(
            refused(&mut s, &device_6(0x90, 0, 10)),
            Some(Violation::SpinLockRequired)
        );
        assert_eq!(
            Violation::SpinLockRequired.status(),
            STATUS_INVALID_PARAMETER
        );
        assert_eq!(s.registry().connections(), 0);
        // A device with one resource needs no lock.
        let single = ConnectRequest {
            spin_lock: 0,
            ..req()
        };
        assert!(s.connect(&single, &ram()).is_ok());
    }

    #[test]
    fn rule_10_second_vector_with_other_spin_lock_invalid_parameter() {
        let mut s = service();
        connected(&mut s, &device_6(0x90, 0x3000, 10));
        assert_eq!(
            refused(&mut s, &device_6(0xa0, 0x3008, 10)),
            Some(Violation::SpinLockMismatch)
        );
        assert_eq!(
            Violation::SpinLockMismatch.status(),
            STATUS_INVALID_PARAMETER
        );
        assert_eq!(
            refused(&mut s, &device_6(0xa0, 0, 10)),
            Some(Violation::SpinLockRequired)
        );
        connected(&mut s, &device_6(0xa0, 0x3000, 10));
        // Once every connection is gone, another lock may start over.
        for (h, _) in s
            .registry()
            .iter()
            .map(|(h, c)| (h, *c))
            .collect::<Vec<_>>()
        {
            assert!(s.disconnect(h).is_ok());
        }
        connected(&mut s, &device_6(0xa0, 0x3008, 10));
    }

    #[test]
    fn rule_10_synchronize_irql_below_device_highest_irql_low_vector_first() {
        // Regression: the low vector first with its own Irql used to be
        // accepted, and the high vector's ISR then ran above the lock's IRQL.
        let mut s = service();
        assert_eq!(
            refused(&mut s, &device_6(0x90, 0x3000, 9)),
            Some(Violation::SynchronizeIrqlBelowDeviceIrql)
        );
        connected(&mut s, &device_6(0x90, 0x3000, 10));
        assert_eq!(
            refused(&mut s, &device_6(0xa0, 0x3000, 9)),
            Some(Violation::SynchronizeIrqlBelowIrql)
        );
        connected(&mut s, &device_6(0xa0, 0x3000, 11));
    }

    #[test]
    fn rule_11_quota_exceeded_insufficient_resources() {
        let mut s = service();
        // 64 objects: 16 connections of 4 processors each fill the default quota.
        for _ in 0..16 {
            connected(&mut s, &shared(2, 0b1111));
        }
        assert_eq!(s.registry().objects_in_use(), 64);
        assert_eq!(
            refused(&mut s, &shared(3, 0b0001)),
            Some(Violation::QuotaExceeded)
        );
        assert_eq!(
            Violation::QuotaExceeded.status(),
            STATUS_INSUFFICIENT_RESOURCES
        );
    }

    #[test]
    fn rule_12_refused_connect_changes_nothing() {
        let mut s = service();
        connected(&mut s, &shared(2, 0b0011));
        let before = s.clone();
        let bad = ConnectRequest {
            interrupt_mode: InterruptMode::Latched,
            ..shared(3, 0b1111)
        };
        assert!(refused(&mut s, &bad).is_some());
        assert_eq!(s, before);
    }

    #[test]
    fn rule_order_first_failing_rule_wins() {
        let mut s = service();
        let everything_wrong = ConnectRequest {
            device_id: 99,
            vector: 0x10,
            irql: 9,
            synchronize_irql: 0,
            processor_enable_mask: 0,
            service_routine: 0,
            service_context: u64::MAX,
            spin_lock: u64::MAX,
            ..req()
        };
        let mut r = everything_wrong;
        let mut rules = Vec::new();
        // Fix one rule at a time, in order, and watch the next one fail.
        for fix in 0..6 {
            rules.push(refused(&mut s, &r).map(Violation::rule));
            match fix {
                0 => r.processor_enable_mask = 1,
                1 => r.service_routine = 0x1000,
                2 => {
                    r.service_context = 0;
                    r.spin_lock = 0;
                }
                3 => r.synchronize_irql = 9,
                4 => r.vector = 0x90,
                _ => {}
            }
        }
        assert_eq!(
            rules,
            vec![
                Some("2"),
                Some("3"),
                Some("4"),
                Some("5"),
                Some("6"),
                Some("7")
            ]
        );
        r.device_id = 6;
        assert_eq!(refused(&mut s, &r).map(Violation::rule), Some("10"));
        r.spin_lock = 0x3000;
        r.synchronize_irql = 10;
        assert!(s.connect(&r, &ram()).is_ok());
    }

    #[test]
    fn disconnect_unknown_or_stale_handle_invalid_handle() {
        let mut s = service();
        assert_eq!(
            s.disconnect(Handle::from_raw(0)),
            Err(Violation::UnknownHandle)
        );
        assert_eq!(Violation::UnknownHandle.status(), STATUS_INVALID_HANDLE);
        let h = connected(&mut s, &req());
        assert!(s.disconnect(h).is_ok());
        let before = s.clone();
        assert_eq!(s.disconnect(h), Err(Violation::UnknownHandle));
        assert_eq!(
            s.disconnect(Handle::from_raw(h.raw() + 1)),
            Err(Violation::UnknownHandle)
        );
        assert_eq!(s, before);
    }

    #[test]
    fn disconnect_removes_every_object_and_keeps_other_connections() {
        let mut s = service();
        let a = connected(&mut s, &shared(2, 0b0011));
        let b = connected(&mut s, &shared(3, 0b0110));
        assert_eq!(s.registry().objects_in_use(), 4);
        assert!(s.disconnect(a).is_ok());
        assert_eq!(s.registry().objects_in_use(), 2);
        for cpu in 0..4 {
            assert!(!s.registry().chain(cpu, 0x70).contains(&a));
        }
        assert_eq!(s.registry().chain(1, 0x70), vec![b]);
        assert_eq!(STATUS_SUCCESS, 0);
    }

    /// A service on `cpus` processors in split mode (15-bit destinations),
    /// x2APIC offered, with the guest's `model` declared.
    fn declared(cpus: u32, model: crate::ApicModel) -> Service {
        let mut facts = crate::PlatformFacts::uniform(cpus);
        facts.x2apic = true;
        facts.irqchip_mode = crate::platform::IrqchipMode::Split;
        let platform = Platform::new(facts).unwrap();
        let devices = DeviceTable::default_for(&platform);
        let mut s = Service::new(platform, devices, 256).unwrap();
        s.set_apic_model(model).unwrap();
        s
    }

    /// Rule R: a mask no destination names is narrowed to the largest
    /// part one does, which the answer, the objects and the route name.
    #[test]
    fn rule_r_mask_no_destination_names_narrowed_to_the_largest_part() {
        // x2APIC with 15-bit destinations: cluster 0 up to APIC ID 14.
        let mut s = declared(32, crate::ApicModel::X2apic);
        let r = ConnectRequest {
            processor_enable_mask: 0xf_ff00,
            ..req()
        };
        let done = s.connect(&r, &ram()).unwrap();
        assert_eq!(done.effective_mask, 0x7f00);
        assert_eq!(s.registry().objects_in_use(), 7);
        let route = s.route(16).unwrap();
        assert_eq!((route.group, route.destination), (0, 0x7f00));
        assert_eq!(
            route.target,
            crate::ApicDestination::Logical {
                destination: 0x7f00,
                lowest_priority: true
            }
        );
    }

    /// Rule R's tie rule: between equal parts, the one holding the lowest
    /// processor; between a logical and a physical destination of one
    /// processor, the logical one.
    #[test]
    fn rule_r_ties_go_to_the_lowest_processor() {
        let mut s = declared(16, crate::ApicModel::XapicCluster);
        let r = ConnectRequest {
            processor_enable_mask: 0b0110_0000_0110_0000,
            ..req()
        };
        // Clusters 1 ({5, 6}) and 3 ({13, 14}): cluster 1.
        assert_eq!(
            s.connect(&r, &ram()).map(|c| c.effective_mask),
            Ok(0b0110_0000)
        );
        let mut x2 = declared(32, crate::ApicModel::X2apic);
        // IDs 20 and 25 have no logical form: processor 20, physically.
        let r = ConnectRequest {
            processor_enable_mask: (1 << 20) | (1 << 25),
            ..req()
        };
        assert_eq!(
            x2.connect(&r, &ram()).map(|c| c.effective_mask),
            Ok(1 << 20)
        );
        assert_eq!(
            x2.route(16).map(|r| r.target),
            Some(crate::ApicDestination::Physical { apic_id: 20 })
        );
    }

    /// Rule R with sharers: a later connection of a vector gets only the
    /// processors one destination reaches together with the earlier ones;
    /// none such: STATUS_INVALID_PARAMETER, nothing recorded.
    #[test]
    fn rule_r_sharer_no_destination_reaches_with_the_vector_invalid_parameter() {
        let mut s = declared(32, crate::ApicModel::XapicCluster);
        connected(&mut s, &shared(2, 0b0110));
        // Processors 3 (cluster 0) and 8, 9 (cluster 2): only 3 joins.
        let b = s.connect(&shared(3, 0b11_0000_1000), &ram()).unwrap();
        assert_eq!(b.effective_mask, 0b1000);
        assert_eq!(s.route(18).map(|r| r.destination), Some(0b1110));
        let before = s.clone();
        assert_eq!(
            s.connect(&shared(3, 0b11_0000_0000), &ram()).err(),
            Some(Violation::NoCommonDestination)
        );
        assert_eq!(s, before);
        assert_eq!(
            (
                Violation::NoCommonDestination.rule(),
                Violation::NoCommonDestination.status()
            ),
            ("R", STATUS_INVALID_PARAMETER)
        );
    }

    /// The broadcast 0xFF names every processor: on a larger platform the
    /// processors 0..7 it would encode lose their highest one.
    #[test]
    fn rule_r_processors_0_to_7_of_a_larger_platform_drop_the_highest() {
        let mut s = declared(9, crate::ApicModel::XapicFlat);
        let r = ConnectRequest {
            processor_enable_mask: 0x1ff,
            ..req()
        };
        assert_eq!(s.connect(&r, &ram()).map(|c| c.effective_mask), Ok(0x7f));
    }

    /// Rule R holds after a disconnect too: sharers inside processors
    /// 0..7 of a larger platform never cover them all, or the vector would
    /// be left on a set only the broadcast names (found by
    /// `connect_sequences`: x2APIC, 15-bit destinations, a sharer on 0..14,
    /// one on 0..7, the first disconnected).
    #[test]
    fn rule_r_sharers_never_cover_the_broadcast_set() {
        for model in [crate::ApicModel::X2apic, crate::ApicModel::XapicFlat] {
            let mut s = declared(32, model);
            let wide = if model == crate::ApicModel::X2apic {
                0x7fff
            } else {
                0xff
            };
            let a = connected(&mut s, &shared(2, wide));
            // The vector reaches 0..14 (x2APIC) or 0..6 (flat: 0..7 is the broadcast).
            let b = s.connect(&shared(3, 0xff), &ram()).unwrap();
            assert_eq!(b.effective_mask, 0x7f, "{model:?}");
            s.check_invariants().unwrap();
            s.disconnect(a).unwrap();
            s.check_invariants().unwrap();
            let route = s.route(18).unwrap();
            assert_eq!(route.destination, 0x7f, "{model:?}");
            // Two sharers of four each: the second loses processor 7.
            let mut s = declared(32, model);
            connected(&mut s, &shared(2, wide));
            connected(&mut s, &shared(3, 0x0f));
            let c = s.connect(&shared(3, 0xf0), &ram()).unwrap();
            assert_eq!(c.effective_mask, 0x70, "{model:?}");
            s.check_invariants().unwrap();
        }
        // On a platform of 8, 0xFF names exactly processors 0..7.
        let mut s = declared(8, crate::ApicModel::X2apic);
        connected(&mut s, &shared(2, 0x0f));
        assert_eq!(
            s.connect(&shared(3, 0xf0), &ram())
                .map(|c| c.effective_mask),
            Ok(0xf0)
        );
    }
}
