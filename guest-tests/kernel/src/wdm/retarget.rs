//! IoRetargetInterrupt: moves a connection's interrupt objects to other
//! processors of its group, over RETARGET (`docs/semantics.md`,
//! "RETARGET"). A platform extension: Windows drivers have no such call.
//!
//! The move, with the registry lock held:
//!
//! 1. objects are made and linked on the processors the connection may get
//!    and lacks (the mask's online processors; for a line, within its
//!    resource's affinity; for a message, its policy's set, rule M7), so an
//!    interrupt the host sends there after its switch finds them;
//! 2. the host reroutes every pin or message of the connection in one step
//!    and answers where interrupts arrive now;
//! 3. objects made in 1 outside that answer are unlinked;
//! 4. every processor the connection leaves is flushed: a work item that
//!    takes a VM exit with interrupts enabled runs there, so an interrupt
//!    the host delivered before its switch has been dispatched, by the
//!    objects still linked (an interrupt in flight completes);
//! 5. the objects of the processors left are unlinked, a grace period
//!    passes (`dispatch::wait_quiescent`), and they are freed.
//!
//! So nothing the host delivers is lost (every delivery finds the
//! connection's objects) and nothing is delivered twice (the host sends
//! each interrupt to one set). Between the call and its return the service
//! routine may run on the old effective mask and the requested processors;
//! after it returns, only on the new effective mask.

use core::sync::atomic::Ordering;

use irqconnect_abi::ntstatus::{
    STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE, STATUS_INVALID_LEVEL, STATUS_SUCCESS,
};
use irqconnect_abi::pv::{Retarget, irq_policy, message_kind};

use super::object::{self, NIL, kind};
use super::{KAFFINITY, NTSTATUS, PKINTERRUPT, at_passive_level, dispatch, online_mask, table};
use crate::pv::{self, Request};
use crate::{cpu, percpu, smp};

/// Most lines or messages of one connection.
const MAX_MEMBERS: usize = irqconnect_abi::pv::MAX_MESSAGES;

/// IoRetargetInterrupt (platform extension): moves the connection (or the
/// LINE_BASED or MESSAGE_BASED group) `interrupt` names to the processors
/// of `mask` in processor `group`, which must be its own group. The host
/// checks the request (an unknown connection: STATUS_INVALID_HANDLE; a
/// processor the VM lacks or another group: STATUS_INVALID_PARAMETER) and
/// may narrow the mask to what one APIC destination reaches; on
/// STATUS_SUCCESS [`PKINTERRUPT::effective_mask`] is where interrupts
/// arrive from now on (for a group, the union over its lines or messages;
/// a message table reads the new targets). Above PASSIVE_LEVEL:
/// STATUS_INVALID_LEVEL without asking the host; when the guest's object
/// pool cannot hold the new processors: STATUS_INSUFFICIENT_RESOURCES.
pub fn IoRetargetInterrupt(interrupt: PKINTERRUPT, group: u16, mask: KAFFINITY) -> NTSTATUS {
    if !at_passive_level() {
        return STATUS_INVALID_LEVEL;
    }
    let mut registry = object::REGISTRY.lock();
    let Some(c) = interrupt.live() else {
        return STATUS_INVALID_HANDLE;
    };
    let leader = c.leader_slot(interrupt.slot);
    let mut members = [NIL; MAX_MEMBERS];
    let mut n = 0;
    let mut at = leader;
    while at != NIL && n < MAX_MEMBERS {
        members[n] = at;
        n += 1;
        at = match object::conn(at).leader.load(Ordering::Relaxed) {
            NIL => NIL,
            _ => object::conn(at).next_member.load(Ordering::Relaxed),
        };
    }
    let members = &members[..n];
    let wanted = wanted_sets(members, group, mask);

    // 1. Objects where the connection may go and is not yet.
    let mut added = [0u64; MAX_MEMBERS];
    let need: u32 = members
        .iter()
        .zip(&wanted)
        .map(|(&m, &w)| (w & !same_group_mask(m, group)).count_ones())
        .sum();
    if (need as usize) > registry.objects_free() {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    for ((&m, &w), add) in members.iter().zip(&wanted).zip(added.iter_mut()) {
        let vector = object::conn(m).vector.load(Ordering::Relaxed);
        *add = w & !same_group_mask(m, group);
        for cpu in object::bits(group, *add) {
            if registry.add_object(m, cpu).is_some() {
                registry.link_one(m, cpu, vector);
            }
        }
    }

    // 2. The host moves the routes.
    let leader_c = object::conn(leader);
    let slot = leader_c.table.load(Ordering::Relaxed);
    let mut req = Retarget::blank();
    req.handle = leader_c.host_handle.load(Ordering::Relaxed);
    req.group = group;
    req.processor_mask = mask;
    if slot != NIL {
        req.message_table = table::address(slot);
        req.message_table_length = table::capacity(slot) as u32;
    }
    let (status, answer) = pv::retarget(req);
    if status != STATUS_SUCCESS {
        for ((&m, &add), _) in members.iter().zip(&added).zip(&wanted) {
            remove(&mut registry, m, group, add);
        }
        return status;
    }

    // 3..5. The new sets; what is left behind goes.
    for (i, (&m, &add)) in members.iter().zip(&added).enumerate() {
        let conn = object::conn(m);
        let new = match conn.kind.load(Ordering::Relaxed) {
            kind::SINGLE => answer.effective_mask,
            kind::LINE => super::ex::line_processors(
                u32::from(conn.line.load(Ordering::Relaxed)),
                group,
                wanted[i],
            )
            .unwrap_or(0),
            _ => table::entry(slot, i).map_or(0, |e| e.target_processor_set),
        };
        let old = same_group_mask(m, group);
        let vector = conn.vector.load(Ordering::Relaxed);
        // A processor the host chose that has no object yet (it lies
        // outside what the guest expected): make one now.
        for cpu in object::bits(group, new & !old & !add) {
            if registry.add_object(m, cpu).is_some() {
                registry.link_one(m, cpu, vector);
            }
        }
        let leaving_old = old & !new;
        let unused = add & !new;
        for cpu in object::bits(group, unused) {
            registry.unlink_one(m, cpu, vector);
        }
        flush(object::bits(group, leaving_old));
        let old_group = conn.group.load(Ordering::Relaxed);
        let old_mask = conn.mask.load(Ordering::Relaxed);
        let gone = if old_group == group {
            leaving_old
        } else {
            old_mask
        };
        for cpu in object::bits(old_group, gone) {
            registry.unlink_one(m, cpu, vector);
        }
        dispatch::wait_quiescent(old_group, gone);
        dispatch::wait_quiescent(group, unused);
        for cpu in object::bits(old_group, gone).chain(object::bits(group, unused)) {
            registry.drop_object(m, cpu);
        }
        conn.mask.store(new, Ordering::Release);
        conn.group.store(group, Ordering::Release);
    }
    STATUS_SUCCESS
}

/// The processors of `group` connection `m` holds objects on now (0 when
/// its group is another).
fn same_group_mask(m: u16, group: u16) -> KAFFINITY {
    let c = object::conn(m);
    if c.group.load(Ordering::Relaxed) == group {
        c.mask.load(Ordering::Relaxed)
    } else {
        0
    }
}

/// Per member, the processors the host may give it for `mask`: the mask's
/// online processors, within a line's affinity, by a message's policy.
fn wanted_sets(members: &[u16], group: u16, mask: KAFFINITY) -> [KAFFINITY; MAX_MEMBERS] {
    let mut out = [0; MAX_MEMBERS];
    let online = mask & online_mask(group);
    let Some(&leader) = members.first() else {
        return out;
    };
    let lead = object::conn(leader);
    let message = lead.kind.load(Ordering::Relaxed) == kind::MESSAGE;
    let info = if message {
        pv::query_messages(lead.device.load(Ordering::Relaxed)).ok()
    } else {
        None
    };
    for (i, (&m, w)) in members.iter().zip(out.iter_mut()).enumerate() {
        let c = object::conn(m);
        *w = match c.kind.load(Ordering::Relaxed) {
            kind::LINE => online & c.affinity.load(Ordering::Relaxed),
            kind::MESSAGE => match &info {
                Some(q) => policy_set(q, i as u32, online & q.affinity),
                None => online,
            },
            _ => online,
        };
    }
    out
}

/// The processors of message `k`, as `docs/semantics.md` rule M7 gives
/// them: every allowed processor, the lowest, or the `(k mod n)`-th lowest
/// of the `n` (MSI: every message message 0's).
fn policy_set(q: &irqconnect_abi::pv::QueryMessages, k: u32, allowed: KAFFINITY) -> KAFFINITY {
    let k = if q.kind == message_kind::MSI { 0 } else { k };
    let nth = |n: u32| {
        let mut rest = allowed;
        for _ in 0..n {
            rest &= rest.wrapping_sub(1);
        }
        rest & rest.wrapping_neg()
    };
    match q.policy {
        irq_policy::ONE_CLOSE_PROCESSOR => nth(0),
        irq_policy::SPREAD_MESSAGES_ACROSS_ALL_PROCESSORS => {
            nth(k.checked_rem(allowed.count_ones()).unwrap_or(0))
        }
        _ => allowed,
    }
}

/// Unlinks and frees connection `m`'s objects on the processors of
/// `mask` in `group`, after a grace period.
fn remove(registry: &mut object::Registry, m: u16, group: u16, mask: KAFFINITY) {
    let vector = object::conn(m).vector.load(Ordering::Relaxed);
    for cpu in object::bits(group, mask) {
        registry.unlink_one(m, cpu, vector);
    }
    dispatch::wait_quiescent(group, mask);
    for cpu in object::bits(group, mask) {
        registry.drop_object(m, cpu);
    }
}

/// A work item: a VM exit with interrupts enabled, at which an interrupt
/// pending for this processor is taken.
fn take_pending(_: usize) -> usize {
    cpu::sti();
    let _ = pv::doorbell_read();
    0
}

/// Makes every processor of `cpus` take the interrupts pending for it
/// (step 4 of the module documentation).
fn flush(cpus: impl Iterator<Item = usize>) {
    let me = percpu::current_index();
    for cpu in cpus {
        if cpu == me {
            take_pending(0);
        } else {
            let _ = smp::run_on(cpu, take_pending, 0);
        }
    }
}
