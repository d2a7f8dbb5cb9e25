//! RETARGET: moving a live connection to other processors of its group
//! (`docs/semantics.md`, "RETARGET"), checked here rule by rule, changing
//! nothing; the service applies the plan.
//!
//! Modelled on Hyper-V's `HvCallRetargetDeviceInterrupt` (TLFS): the
//! interrupt is named by what the connect answered (here its handle, there
//! the device and its MSI address and data), reserved bits must be zero,
//! and a target processor the partition lacks is refused. A host
//! extension: Windows drivers have no such call; the guest's
//! `IoRetargetInterrupt` makes it.
//!
//! Rules, in order (the first failure answers, nothing changes):
//!
//! - RT1: the handle names a live connection the guest was given (a
//!   connection, or a LINE_BASED or MESSAGE_BASED group): else
//!   STATUS_INVALID_HANDLE.
//! - RT2: `group` is the group of every line or message of the connection:
//!   else STATUS_INVALID_PARAMETER.
//! - RT3: `processor_mask` is not 0 and names only processors the VM has
//!   in the group: else STATUS_INVALID_PARAMETER.
//! - RT4: a MESSAGE_BASED group gives its message table buffer (rule M5's
//!   checks and answers); any other connection gives none (0, 0): else
//!   STATUS_INVALID_PARAMETER.
//! - RT5: each line or message gets its processors as at connect, with the
//!   mask in the place of `ProcessorEnableMask` (FULLY_SPECIFIED: the
//!   mask's online processors; LINE_BASED: rule L2; MESSAGE_BASED: rule
//!   M7): none: STATUS_INVALID_PARAMETER.
//! - then rule R (one destination with the vector's other connections),
//!   rule 9 (the chains, against the other connections) and rule 11 (the
//!   quota, counting the objects the move adds and frees).

use crate::connect_ex::{self, BlockSpan, MessageTable, restricted};
use crate::handle::Handle;
use crate::messages::MessageRoute;
use crate::processors::ProcessorSet;
use crate::ram::GuestRam;
use crate::registry::Connection;
use crate::validate::{Context, Violation, routable};
use irqconnect_abi::pv::{connect_version, message_table_size};

/// RETARGET's inputs, decoded (reserved fields already checked, rule 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetargetRequest {
    /// The connection or group.
    pub handle: Handle,
    /// The processor group of `processor_mask`.
    pub group: u16,
    /// The new processors.
    pub processor_mask: u64,
    /// MESSAGE_BASED: the table buffer to rewrite.
    pub message_table: u64,
    /// MESSAGE_BASED: its length.
    pub message_table_length: u32,
}

/// What a RETARGET that passed every rule changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetargetPlan {
    /// Each line or message's handle and new mask, in message or vector
    /// order.
    pub changes: Vec<(Handle, u64)>,
    /// The masks they have now (to undo).
    pub before: Vec<(Handle, u64)>,
    /// The vectors whose routes change.
    pub vectors: Vec<u8>,
    /// MESSAGE_BASED: each message's new route, message order.
    pub message_routes: Vec<MessageRoute>,
    /// MESSAGE_BASED: the table to write.
    pub table: Option<MessageTable>,
    /// The device (for the message updates).
    pub device: u32,
}

/// Checks RETARGET's rules (module documentation); changes nothing.
pub fn check_retarget<R: GuestRam + ?Sized>(
    req: &RetargetRequest,
    block: BlockSpan,
    ctx: &Context<'_>,
    ram: &R,
) -> Result<RetargetPlan, Violation> {
    let registry = ctx.registry;
    // RT1.
    let lead = registry
        .get(req.handle)
        .filter(|c| c.lead.is_none())
        .ok_or(Violation::UnknownHandle)?;
    let members: Vec<(Handle, Connection)> = if lead.in_group() {
        registry
            .group_members(req.handle)
            .ok_or(Violation::UnknownHandle)?
            .into_iter()
            .map(|(h, c)| (h, *c))
            .collect()
    } else {
        vec![(req.handle, *lead)]
    };
    // RT2.
    if members.iter().any(|(_, c)| c.group != req.group) {
        return Err(Violation::RetargetGroupMismatch);
    }
    // RT3.
    let present = ctx.platform.group_present(req.group);
    if req.processor_mask == 0 || req.processor_mask & !present != 0 {
        return Err(Violation::ProcessorsOutsideVm);
    }
    // RT4.
    let message_based = lead.version == connect_version::MESSAGE_BASED;
    if message_based {
        let required = message_table_size(members.len());
        connect_ex::check_table(
            req.message_table,
            req.message_table_length,
            block,
            required,
            ram,
        )?;
    } else if req.message_table != 0 || req.message_table_length != 0 {
        return Err(Violation::RetargetTableMismatch);
    }
    let except: Vec<Handle> = members.iter().map(|&(h, _)| h).collect();
    // RT5: at least one online processor (each line or message below).
    let online = req.processor_mask & ctx.platform.group_online(req.group);
    if online == 0 {
        return Err(Violation::RetargetMaskEmpty);
    }
    let mut changes = Vec::with_capacity(members.len());
    let mut message_routes = Vec::new();
    if message_based {
        // RT5 and rules M7, M8 with the mask as the restriction.
        let messages = ctx
            .devices
            .device(lead.device)
            .and_then(|d| d.messages())
            .ok_or(Violation::UnknownHandle)?;
        let targets =
            connect_ex::message_targets(ctx, messages, online, &except).map_err(|v| match v {
                Violation::MessageTargetsEmpty => Violation::RetargetMaskEmpty,
                v => v,
            })?;
        for ((h, _), (_, route)) in members.iter().zip(&targets) {
            changes.push((*h, route.targets));
        }
        message_routes = targets.into_iter().map(|(_, r)| r).collect();
    } else {
        for (h, c) in &members {
            // RT5.
            let wanted = match c.version {
                connect_version::LINE_BASED => {
                    let affinity = ctx
                        .devices
                        .device(c.device)
                        .and_then(|d| d.resource_for_vector(u32::from(c.vector)))
                        .map_or(0, |r| r.affinity);
                    restricted(affinity, online) & online
                }
                _ => online,
            };
            if wanted == 0 {
                return Err(Violation::RetargetMaskEmpty);
            }
            // Rule R.
            let effective = routable(
                ctx,
                c.vector,
                ProcessorSet::of_group(req.group, wanted),
                &except,
            )?;
            // Rule 9.
            if let Some(cpu) = registry.sharing_conflict_except(
                c.vector,
                effective,
                c.mode,
                c.share_vector,
                &except,
            ) {
                return Err(Violation::SharingConflict { cpu });
            }
            changes.push((*h, effective.group_mask(req.group)));
        }
    }
    // Rule 11: the objects the move adds, less those it frees.
    let now: u32 = members.iter().map(|(_, c)| c.objects()).sum();
    let after: u32 = changes.iter().map(|(_, m)| m.count_ones()).sum();
    if after > now && !registry.fits(after - now) {
        return Err(Violation::QuotaExceeded);
    }
    let conns: Vec<Connection> = members
        .iter()
        .zip(&changes)
        .map(|((_, c), &(_, mask))| Connection { mask, ..*c })
        .collect();
    let table = message_based.then(|| {
        connect_ex::message_table(
            req.message_table,
            lead.synchronize_irql,
            &conns,
            &message_routes,
        )
    });
    let mut vectors: Vec<u8> = members.iter().map(|(_, c)| c.vector).collect();
    vectors.dedup();
    Ok(RetargetPlan {
        before: members.iter().map(|(h, c)| (*h, c.mask)).collect(),
        changes,
        vectors,
        message_routes,
        table,
        device: lead.device,
    })
}

#[cfg(test)]
mod tests {
    //! One test per RETARGET rule (RT1..RT5, then R, 9 and 11 on the new
    //! mask), and the moves of a connection, a LINE_BASED group and a
    //! MESSAGE_BASED group, on the default 4-processor platform.

    use super::*;
    use crate::connect_ex::ConnectExRequest;
    use crate::devices::InterruptMode;
    use crate::ram::FlatRam;
    use crate::service::Service;
    use crate::validate::ConnectRequest;
    use irqconnect_abi::ntstatus::{
        STATUS_BUFFER_TOO_SMALL, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE,
        STATUS_INVALID_PARAMETER,
    };

    const BLOCK: BlockSpan = BlockSpan {
        start: 0x8000,
        len: 64,
    };
    const TABLE: u64 = 0x9000;

    fn ram() -> FlatRam {
        FlatRam::new(0, 0x10_0000)
    }

    fn service(cpus: u32, quota: u32) -> Service {
        let platform = crate::Platform::uniform(cpus).unwrap();
        let devices = crate::DeviceTable::default_for(&platform);
        Service::new(platform, devices, quota).unwrap()
    }

    /// A CONNECT of `device` on its first resource (vector, mode, share
    /// from the default table) on `mask`.
    fn connect(
        s: &mut Service,
        device: u32,
        vector: u32,
        mode: InterruptMode,
        share: bool,
        mask: u64,
    ) -> Handle {
        let class = (vector >> 4) as u8;
        let r = ConnectRequest {
            device_id: device,
            vector,
            irql: class,
            synchronize_irql: class,
            interrupt_mode: mode,
            share_vector: share,
            processor_enable_mask: mask,
            service_routine: 0x1000,
            version: connect_version::FULLY_SPECIFIED,
            ..ConnectRequest::default()
        };
        s.connect(&r, &ram()).unwrap().handle
    }

    fn req(handle: Handle, mask: u64) -> RetargetRequest {
        RetargetRequest {
            handle,
            group: 0,
            processor_mask: mask,
            message_table: 0,
            message_table_length: 0,
        }
    }

    /// The refusal of `r`, which must change nothing.
    fn refused(s: &mut Service, r: &RetargetRequest) -> Violation {
        let before = s.clone();
        let v = s.retarget(r, BLOCK, &ram()).err().unwrap();
        assert_eq!(*s, before, "a refusal changed the service");
        v
    }

    #[test]
    fn rule_rt1_unknown_stale_or_member_handle_invalid_handle() {
        let mut s = service(4, 64);
        assert_eq!(
            refused(&mut s, &req(Handle::from_raw(0), 1)),
            Violation::UnknownHandle
        );
        let h = connect(&mut s, 0, 0x60, InterruptMode::LevelSensitive, false, 1);
        assert!(s.disconnect(h).is_ok());
        assert_eq!(refused(&mut s, &req(h, 1)), Violation::UnknownHandle);
        // A member of a LINE_BASED group was never handed out.
        let group = s
            .connect_ex(&ex_request(connect_version::LINE_BASED, 6), BLOCK, &ram())
            .unwrap()
            .handle;
        let member = s
            .registry()
            .group_members(group)
            .unwrap()
            .iter()
            .map(|&(h, _)| h)
            .find(|&m| m != group)
            .unwrap();
        assert_eq!(refused(&mut s, &req(member, 1)), Violation::UnknownHandle);
        assert_eq!(Violation::UnknownHandle.status(), STATUS_INVALID_HANDLE);
    }

    #[test]
    fn rule_rt2_another_group_invalid_parameter() {
        let mut s = service(130, 64);
        let h = connect(&mut s, 0, 0x60, InterruptMode::LevelSensitive, false, 1);
        let r = RetargetRequest {
            group: 1,
            ..req(h, 1)
        };
        assert_eq!(refused(&mut s, &r), Violation::RetargetGroupMismatch);
        assert_eq!(
            Violation::RetargetGroupMismatch.status(),
            STATUS_INVALID_PARAMETER
        );
    }

    #[test]
    fn rule_rt3_empty_mask_or_processor_outside_the_vm_invalid_parameter() {
        let mut s = service(4, 64);
        let h = connect(&mut s, 0, 0x60, InterruptMode::LevelSensitive, false, 1);
        assert_eq!(refused(&mut s, &req(h, 0)), Violation::ProcessorsOutsideVm);
        assert_eq!(
            refused(&mut s, &req(h, 0b1_0010)),
            Violation::ProcessorsOutsideVm
        );
        assert_eq!(
            Violation::ProcessorsOutsideVm.status(),
            STATUS_INVALID_PARAMETER
        );
    }

    #[test]
    fn rule_rt4_a_table_for_messages_only() {
        let mut s = service(4, 64);
        let h = connect(&mut s, 0, 0x60, InterruptMode::LevelSensitive, false, 1);
        let with_table = RetargetRequest {
            message_table: TABLE,
            message_table_length: 0x100,
            ..req(h, 2)
        };
        assert_eq!(
            refused(&mut s, &with_table),
            Violation::RetargetTableMismatch
        );
        let m = s
            .connect_ex(&message_request(10), BLOCK, &ram())
            .unwrap()
            .handle;
        assert_eq!(refused(&mut s, &req(m, 2)), Violation::TableTooSmall);
        let short = RetargetRequest {
            message_table: TABLE,
            message_table_length: 8,
            ..req(m, 2)
        };
        assert_eq!(refused(&mut s, &short), Violation::TableTooSmall);
        assert_eq!(Violation::TableTooSmall.status(), STATUS_BUFFER_TOO_SMALL);
        let misaligned = RetargetRequest {
            message_table: TABLE + 4,
            message_table_length: 0x1000,
            ..req(m, 2)
        };
        assert_eq!(refused(&mut s, &misaligned), Violation::TableNotUsable);
    }

    #[test]
    fn rule_rt5_no_online_processor_invalid_parameter() {
        let mut facts = crate::PlatformFacts::uniform(4);
        facts.online_mask = 0b0011;
        let platform = crate::Platform::new(facts).unwrap();
        let devices = crate::DeviceTable::default_for(&platform);
        let mut s = Service::new(platform, devices, 64).unwrap();
        let h = connect(&mut s, 0, 0x60, InterruptMode::LevelSensitive, false, 1);
        assert_eq!(
            refused(&mut s, &req(h, 0b1100)),
            Violation::RetargetMaskEmpty
        );
    }

    /// Rules R, 9 and 11 judge the new mask against the other connections
    /// only (the connection's own objects do not count).
    #[test]
    fn retarget_rules_r_9_11_on_the_new_mask() {
        let mut s = service(4, 4);
        let a = connect(
            &mut s,
            0,
            0x60,
            InterruptMode::LevelSensitive,
            false,
            0b0011,
        );
        // Rule 11: 2 + 2 objects in use; 3 more for A would be 5 > 4...
        connect(&mut s, 1, 0x61, InterruptMode::Latched, false, 0b0011);
        assert_eq!(refused(&mut s, &req(a, 0b0111)), Violation::QuotaExceeded);
        assert_eq!(
            Violation::QuotaExceeded.status(),
            STATUS_INSUFFICIENT_RESOURCES
        );
        // ...but moving its two objects elsewhere fits.
        assert!(s.retarget(&req(a, 0b1100), BLOCK, &ram()).is_ok());
        // Rule 9: an exclusive sharer on the processor.
        let mut s = service(4, 64);
        let x = connect(
            &mut s,
            2,
            0x70,
            InterruptMode::LevelSensitive,
            false,
            0b0001,
        );
        let y = connect(
            &mut s,
            3,
            0x70,
            InterruptMode::LevelSensitive,
            false,
            0b0010,
        );
        assert_eq!(
            refused(&mut s, &req(x, 0b0010)),
            Violation::SharingConflict { cpu: 1 }
        );
        assert!(s.retarget(&req(y, 0b0100), BLOCK, &ram()).is_ok());
        // Rule R: with 12 processors, undeclared, processor 9 has no
        // destination together with processor 2.
        let mut s = service(12, 64);
        let a = connect(&mut s, 2, 0x70, InterruptMode::LevelSensitive, true, 0b0001);
        connect(&mut s, 3, 0x70, InterruptMode::LevelSensitive, true, 0b0100);
        assert_eq!(
            refused(&mut s, &req(a, 1 << 9)),
            Violation::NoCommonDestination
        );
    }

    /// A move keeps the connection's place in its chains, changes its
    /// objects, routes the vector to the union with its sharers and
    /// returns the changed pins; a move back restores the routes.
    #[test]
    fn retarget_moves_in_place_and_routes_the_union() {
        let mut s = service(4, 64);
        let a = connect(&mut s, 2, 0x70, InterruptMode::LevelSensitive, true, 0b0001);
        let b = connect(&mut s, 3, 0x70, InterruptMode::LevelSensitive, true, 0b0011);
        let before = s.route(18);
        let done = s.retarget(&req(a, 0b0110), BLOCK, &ram()).unwrap();
        assert_eq!((done.effective_mask, done.count), (0b0110, 1));
        assert_eq!(s.registry().chain(1, 0x70), vec![a, b]);
        assert!(s.registry().chain(0, 0x70) == vec![b]);
        assert_eq!(s.registry().objects_in_use(), 4);
        assert_eq!(s.route(18).map(|r| r.destination), Some(0b0111));
        assert_eq!(done.routes.len(), 1);
        assert!(s.retarget(&req(a, 0b0001), BLOCK, &ram()).is_ok());
        assert_eq!(s.route(18), before);
        assert_eq!(s.check_invariants(), Ok(()));
    }

    /// A CONNECT_EX of `version` for `device`, nothing else given.
    fn ex_request(version: u32, device: u32) -> ConnectExRequest {
        ConnectExRequest {
            version,
            device_id: device,
            service_routine: 0x1000,
            ..ConnectExRequest::default()
        }
    }

    fn message_request(device: u32) -> ConnectExRequest {
        ConnectExRequest {
            message_table: TABLE,
            message_table_length: 0x1000,
            ..ex_request(connect_version::MESSAGE_BASED, device)
        }
    }

    /// A MESSAGE_BASED group moves every message by its policy (spread:
    /// message k on the (k mod 2)-th of two processors), rewrites the
    /// table and reprograms every message.
    #[test]
    fn retarget_message_based_moves_every_message() {
        let mut s = service(4, 64);
        let m = s
            .connect_ex(&message_request(10), BLOCK, &ram())
            .unwrap()
            .handle;
        let r = RetargetRequest {
            message_table: TABLE,
            message_table_length: 0x1000,
            ..req(m, 0b1010)
        };
        let done = s.retarget(&r, BLOCK, &ram()).unwrap();
        assert_eq!((done.effective_mask, done.count), (0b1010, 8));
        let table = done.table.unwrap();
        for (k, e) in table.entries.iter().enumerate() {
            let want = if k % 2 == 0 { 0b0010 } else { 0b1000 };
            assert_eq!(e.target_processor_set, want, "message {k}");
            let update = done.messages.get(k).and_then(|u| u.route).unwrap();
            assert_eq!((update.address, update.targets), (e.message_address, want));
        }
        assert_eq!(s.check_invariants(), Ok(()));
    }

    /// A LINE_BASED group moves every line within its resource's affinity.
    #[test]
    fn retarget_line_based_moves_every_line() {
        let mut s = service(4, 64);
        let lines = ex_request(connect_version::LINE_BASED, 6);
        let g = s.connect_ex(&lines, BLOCK, &ram()).unwrap().handle;
        let done = s.retarget(&req(g, 0b0100), BLOCK, &ram()).unwrap();
        assert_eq!((done.effective_mask, done.count), (0b0100, 2));
        for pin in [21, 23] {
            assert_eq!(s.route(pin).map(|r| r.destination), Some(0b0100));
        }
    }
}
