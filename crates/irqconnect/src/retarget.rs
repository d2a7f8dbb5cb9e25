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
