//! Arbitrary guest memory and doorbell writes through the path the VMM
//! calls, [`Service::handle_doorbell`], with every answer checked.
//!
//! Input format ([`run`]):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | bits 0..2: object quota (64, 1, 2, 3, 4, 8, 16, 2^20); bits 3..4: RAM base (0, 0x1000, 0x10_0000, 0xffff_0000) |
//! | 1 | 0: all RAM writable; `w`: the host cannot write `base + 0x40 w .. + 0x40` (an answer there is lost) |
//! | 2.. | a [`super::run_session`] input: processors, step count, steps, RAM |
//!
//! Checked after every doorbell, against a witness of the service taken
//! before it (its registry state: slots with generations, free list, chain
//! order; every pin's route; the storm marks and count) and the host's
//! writes to RAM, which [`HarnessRam`] records (no copy of the service or of
//! RAM is made):
//!
//! - an answered request wrote a defined NTSTATUS into its `status` field
//!   and wrote nothing outside its block (past the header) and, for a
//!   successful MESSAGE_BASED CONNECT_EX, its message table; a refused one
//!   changed nothing in the service; an unreadable one wrote nothing and
//!   changed nothing; an unwritable one left the live state as it was;
//! - a successful CONNECT wrote a live, new handle and its effective mask;
//!   a successful CONNECT_EX wrote a live, new connection or group handle,
//!   its count, mask and version, and (MESSAGE_BASED) a message table that
//!   is exactly its messages' programming; a refused CONNECT_EX wrote
//!   `message_table_required` only with STATUS_BUFFER_TOO_SMALL; a
//!   successful DISCONNECT or DISCONNECT_EX killed its handle (the whole
//!   group); the route updates returned are exactly the pins whose route
//!   changed; the message updates returned, applied to the programming the
//!   harness tracks from the fresh service on, give the service's
//!   programming whenever the service changed;
//! - after a step that changed the service, [`Service::check_vectors`] of
//!   every vector it touched (connections added or removed, routes
//!   changed), and no new live handle is one that died before; every
//!   [`FULL_CHECK_EVERY`] such steps and after the last step,
//!   [`Service::check_invariants`] in full, no dead handle live, the
//!   tracked message programming, and the platform and device table as
//!   built;
//! - memory stays bounded: live connections, registry slots and free slots
//!   never exceed the object quota, whatever the guest sends.

use core::mem::{offset_of, size_of};

use irqconnect_abi::ntstatus::{
    STATUS_BUFFER_TOO_SMALL, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_DEVICE_REQUEST,
    STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER, STATUS_INVALID_PARAMETER_1,
    STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND, STATUS_SUCCESS,
};
use irqconnect_abi::pv::{
    Connect, ConnectEx, Disconnect, DisconnectEx, MessageInfoEntry, MessageTableHeader,
    RequestHeader, connect_version, message_table_size, opcode, request_size,
};
use zerocopy::FromBytes;

use std::collections::BTreeSet;
use std::ops::Range;

use super::COPY_HANDLE_TAG;
use super::ram::HarnessRam;
use crate::devices::DeviceTable;
use crate::handle::Handle;
use crate::messages::MessageUpdate;
use crate::platform::{DEFAULT_OBJECT_QUOTA, MAX_OBJECT_QUOTA, Platform};
use crate::registry::Connection;
use crate::request::Outcome;
use crate::route::{PinRoute, RouteUpdate};
use crate::service::Service;

const QUOTAS: [u32; 8] = [DEFAULT_OBJECT_QUOTA, 1, 2, 3, 4, 8, 16, MAX_OBJECT_QUOTA];
const BASES: [u64; 4] = [0, 0x1000, 0x10_0000, 0xffff_0000];
const DEFINED_STATUSES: [u32; 9] = [
    STATUS_SUCCESS,
    STATUS_INVALID_HANDLE,
    STATUS_INVALID_PARAMETER,
    STATUS_INVALID_DEVICE_REQUEST,
    STATUS_INSUFFICIENT_RESOURCES,
    STATUS_INVALID_PARAMETER_1,
    STATUS_NOT_FOUND,
    STATUS_BUFFER_TOO_SMALL,
    STATUS_INVALID_PARAMETER_10,
];
const STATUS_AT: usize = offset_of!(RequestHeader, status);

/// The full checks run after every this many steps that changed the
/// service (and after the last step); the steps between check only what
/// they touched.
pub const FULL_CHECK_EVERY: u32 = 16;

/// Runs the doorbells `data` encodes (see the module documentation). `Err`
/// names the first broken check.
pub fn run(data: &[u8]) -> Result<(), String> {
    let layout = data.first().copied().unwrap_or(0);
    let window = data.get(1).copied().unwrap_or(0);
    let session = data.get(2..).unwrap_or(&[]);
    let quota = QUOTAS[usize::from(layout & 7)];
    let base = BASES[usize::from(layout >> 3) & 3];
    let cpus = 1 + u32::from(session.first().copied().unwrap_or(0) % 16);
    let steps = usize::from(session.get(1).copied().unwrap_or(0));
    let rest = session.get(2..).unwrap_or(&[]);
    let steps_len = (steps * 4).min(rest.len() / 4 * 4);
    let (step_bytes, memory) = rest.split_at(steps_len);
    let platform = Platform::uniform(cpus).map_err(|e| format!("platform: {e}"))?;
    let devices = DeviceTable::default_for(&platform);
    let service = Service::new(platform.clone(), devices.clone(), quota)
        .map_err(|e| format!("service: {e}"))?;
    service
        .check_invariants()
        .map_err(|what| format!("a fresh service breaks an invariant: {what}"))?;
    let read_only = (window != 0).then(|| {
        let start = base + 0x40 * u64::from(window);
        start..start + 0x40
    });
    // Steps between doorbells change nothing in the service, so one
    // doorbell's witness after is the next one's before.
    let mut witness = Witness::of(&service);
    let mut session = Session {
        programming: service.message_programming(),
        service,
        ram: HarnessRam::new(base, memory.to_vec(), read_only),
        platform,
        devices,
        dead: BTreeSet::new(),
        changes: 0,
        spare: None,
    };
    let mut last_handle: Option<Handle> = None;
    for (n, chunk) in step_bytes.chunks_exact(4).enumerate() {
        let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if value & 0xf000_0000 == COPY_HANDLE_TAG {
            if let Some(h) = last_handle {
                let at = base.saturating_add(u64::from(value & 0x0fff_ffff));
                // The guest stores the handle: the host's write protection
                // does not apply.
                let _ = session.ram.write_as_guest(at, &h.raw().to_le_bytes());
            }
            continue;
        }
        let (made, after) = session
            .doorbell(value, witness)
            .map_err(|what| format!("step {n} (doorbell {value:#x}): {what}"))?;
        witness = after;
        if made.is_some() {
            last_handle = made;
        }
    }
    session
        .full_check()
        .map_err(|what| format!("after the last step: {what}"))
}

/// The service under test and what the harness tracks beside it.
struct Session {
    service: Service,
    ram: HarnessRam,
    /// The platform and device table the service was built with: the
    /// service never changes them.
    platform: Platform,
    devices: DeviceTable,
    /// Every handle that was live and died.
    dead: BTreeSet<Handle>,
    /// Every message's programming, as the answers' updates left it.
    programming: Vec<MessageUpdate>,
    /// Steps that changed the service.
    changes: u32,
    /// A witness whose buffers the next step refills.
    spare: Option<Witness>,
}

/// What one step may change in the service, taken before it: every slot
/// with its generation and live connection, the free list, each vector's
/// chain order, every pin's route, the storm marks and count. Equal
/// witnesses mean an unchanged service (its derived indexes aside, which
/// [`crate::registry::Registry::check_consistency`] checks in the full
/// check). A witness is words, one-to-one with that state: two compare
/// with one memory compare, where comparing the typed values field by
/// field was most of the harness's time under coverage instrumentation,
/// and one witness's buffer is refilled for the next step.
///
/// Layout: [`SLOT_WORDS`] per slot (its generation, then
/// [`connection_words`]), the free slots, `slot | vector << 32` per chain
/// entry (vectors ascending, chains in connection order), the three
/// section lengths, two words per pin ([`packed`]), the storm marks and
/// count, the objects in use.
#[derive(PartialEq, Eq)]
struct Witness {
    words: Vec<u64>,
    slots: usize,
    free: usize,
    chained: usize,
}

/// Words per slot in a [`Witness`].
const SLOT_WORDS: usize = 8;

/// The live flag in a slot's second connection word.
const LIVE: u64 = 1;
/// The message flag in a slot's second connection word.
const MESSAGE: u64 = 1 << 5;

/// IOAPIC pins.
const PINS: usize = irqconnect_abi::layout::IOAPIC_PINS as usize;

/// A route as two words, one-to-one.
fn packed(route: &PinRoute) -> [u64; 2] {
    // Every field by name, so that a new one breaks the build here.
    let PinRoute {
        masked,
        vector,
        trigger,
        destination: targets,
        lowest_priority: lowest,
        connections: count,
    } = *route;
    let level = trigger == irqchip::apic_bus::TriggerMode::Level;
    let flags = u64::from(masked) | u64::from(lowest) << 1 | u64::from(level) << 2;
    [
        targets,
        u64::from(count) | u64::from(vector) << 32 | flags << 40,
    ]
}

/// A slot's connection (or its absence: zeros) as words, one-to-one: the
/// vector in bits 32..40 of the first, [`LIVE`] and [`MESSAGE`] in the
/// second.
fn connection_words(connection: Option<&Connection>) -> [u64; SLOT_WORDS - 1] {
    let Some(c) = connection else {
        return [0; SLOT_WORDS - 1];
    };
    // Every field by name, so that a new one breaks the build here.
    let Connection {
        device,
        vector,
        irql,
        synchronize_irql,
        mode,
        share_vector,
        floating_save,
        mask,
        service_routine,
        service_context,
        spin_lock,
        version,
        lead,
        message,
    } = *c;
    let level = mode == crate::devices::InterruptMode::LevelSensitive;
    let flags = LIVE
        | u64::from(level) << 1
        | u64::from(share_vector) << 2
        | u64::from(floating_save) << 3
        | u64::from(lead.is_some()) << 4
        | if message.is_some() { MESSAGE } else { 0 };
    [
        u64::from(device)
            | u64::from(vector) << 32
            | u64::from(irql) << 40
            | u64::from(synchronize_irql) << 48,
        flags | u64::from(message.unwrap_or(0)) << 8 | u64::from(version) << 32,
        u64::from(lead.unwrap_or(0)),
        mask,
        service_routine,
        service_context,
        spin_lock,
    ]
}

/// A live connection as a [`Witness`] holds it.
#[derive(Clone, Copy)]
struct LiveSlot<'a> {
    words: &'a [u64],
}

impl LiveSlot<'_> {
    fn vector(self) -> u8 {
        (self.words.first().copied().unwrap_or(0) >> 32) as u8
    }

    fn is_message(self) -> bool {
        self.words.get(1).is_some_and(|w| w & MESSAGE != 0)
    }
}

impl Witness {
    fn of(service: &Service) -> Self {
        let mut w = Self {
            words: Vec::new(),
            slots: 0,
            free: 0,
            chained: 0,
        };
        w.fill(service);
        w
    }

    /// Takes the witness of `service` into this one's buffer.
    fn fill(&mut self, service: &Service) {
        let registry = service.registry();
        self.words.clear();
        for (generation, c) in registry.slots() {
            self.words.push(u64::from(generation));
            self.words.extend(connection_words(c));
        }
        self.slots = self.words.len() / SLOT_WORDS;
        self.words.extend(registry.free_slots().map(u64::from));
        self.free = self.words.len() - self.slots * SLOT_WORDS;
        for vector in registry.vectors_in_use() {
            for (h, _) in registry.on_vector(vector) {
                let slot = h.slot().map_or(u64::MAX, |s| s as u64);
                self.words.push(slot | u64::from(vector) << 32);
            }
        }
        self.chained = self.words.len() - self.slots * SLOT_WORDS - self.free;
        self.words
            .extend([self.slots, self.free, self.chained].map(|n| n as u64));
        let routes = service.routes();
        self.words.extend(routes.iter().flat_map(packed));
        self.words.extend(
            core::iter::repeat_n([u64::MAX; 2], PINS.saturating_sub(routes.len())).flatten(),
        );
        self.words
            .push(u64::from(service.storm_bits()) | u64::from(service.storm_masked_pins()) << 32);
        self.words.push(u64::from(registry.objects_in_use()));
    }

    /// Slot `i`'s words: its generation, then [`connection_words`].
    fn slot(&self, i: usize) -> Option<&[u64]> {
        let at = i.checked_mul(SLOT_WORDS)?;
        self.words
            .get(at..at + SLOT_WORDS)
            .filter(|_| i < self.slots)
    }

    /// The live connections, slot order, with their handles.
    fn live(&self) -> impl Iterator<Item = (Handle, LiveSlot<'_>)> + '_ {
        (0..self.slots).filter_map(|i| {
            let words = self.slot(i)?;
            let (&generation, connection) = words.split_first()?;
            let live = connection.get(1).is_some_and(|w| w & LIVE != 0);
            live.then(|| {
                Some((
                    Handle::new(i, generation as u32)?,
                    LiveSlot { words: connection },
                ))
            })?
        })
    }

    /// The live connection `handle` names.
    fn get(&self, handle: Handle) -> Option<LiveSlot<'_>> {
        let words = self.slot(handle.slot()?)?;
        let (&generation, connection) = words.split_first()?;
        let live = connection.get(1).is_some_and(|w| w & LIVE != 0);
        (live && generation == u64::from(handle.generation()))
            .then_some(LiveSlot { words: connection })
    }

    /// Every chain entry's connection, vectors ascending, chains in
    /// connection order: the live state without handles (what
    /// [`Service::same_live_state`] compares).
    fn chains(&self) -> Vec<&[u64]> {
        let start = self.slots * SLOT_WORDS + self.free;
        self.words
            .get(start..start + self.chained)
            .unwrap_or(&[])
            .iter()
            .filter_map(|&e| self.slot((e & 0xffff_ffff) as usize)?.get(1..))
            .collect()
    }

    /// Every pin's route, [`packed`].
    fn routes(&self) -> &[u64] {
        let start = (self.slots * SLOT_WORDS + self.free + self.chained + 3).min(self.words.len());
        self.words.get(start..start + 2 * PINS).unwrap_or(&[])
    }

    /// The storm marks (bits) and count.
    fn storm(&self) -> u64 {
        self.words
            .len()
            .checked_sub(2)
            .and_then(|i| self.words.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Interrupt objects in use.
    fn objects(&self) -> u32 {
        self.words.last().map_or(0, |&n| n as u32)
    }
}

impl Session {
    /// One doorbell and its checks, `before` being the service's witness
    /// now; returns the handle a CONNECT made and the witness after.
    fn doorbell(
        &mut self,
        value: u32,
        before: Witness,
    ) -> Result<(Option<Handle>, Witness), String> {
        let gpa = u64::from(value);
        let base = self.ram.base();
        self.ram.take_writes();
        let outcome = self.service.handle_doorbell(&mut self.ram, value);
        let writes = self.ram.take_writes();
        let after = match self.spare.take() {
            Some(mut w) => {
                w.fill(&self.service);
                w
            }
            None => Witness::of(&self.service),
        };
        let changed = after != before;
        let service = &self.service;
        let mut made = None;
        match &outcome {
            Outcome::Unreadable { gpa: at, .. } => {
                if *at != gpa || !writes.is_empty() || changed {
                    return Err(format!(
                        "an unreadable request changed something: {outcome:?}"
                    ));
                }
            }
            Outcome::Unwritable { gpa: at } => {
                if *at != gpa
                    || after.chains() != before.chains()
                    || after.routes() != before.routes()
                    || after.storm() as u32 != before.storm() as u32
                {
                    return Err("an unwritable answer left a change behind".into());
                }
            }
            Outcome::Answered(answer) => {
                if !DEFINED_STATUSES.contains(&answer.status) {
                    return Err(format!(
                        "status {:#x} is not a defined NTSTATUS",
                        answer.status
                    ));
                }
                let block = self
                    .ram
                    .offsets(gpa, size_of::<RequestHeader>())
                    .ok_or("an answered block's header is not RAM")?;
                let start = block.start;
                let bytes = self.ram.bytes();
                let written = bytes.get(start + STATUS_AT..start + STATUS_AT + 4);
                if written != Some(&answer.status.to_le_bytes()[..]) {
                    return Err(format!("status {:#x} was not written", answer.status));
                }
                let header = start..start + STATUS_AT;
                if writes
                    .iter()
                    .any(|w| w.start < header.end && header.start < w.end)
                {
                    return Err("the answer wrote over the header".into());
                }
                // The header is as the guest left it, so its opcode is the
                // request's.
                let opcode_field = read_u16(bytes, start + offset_of!(RequestHeader, opcode));
                let size = request_size(1, opcode_field).unwrap_or(size_of::<RequestHeader>());
                let end = start.saturating_add(size.max(size_of::<RequestHeader>()));
                // A successful MESSAGE_BASED CONNECT_EX also writes its table.
                let table = (answer.opcode == opcode::CONNECT_EX && answer.refusal.is_none())
                    .then(|| written_table(bytes, start, base))
                    .flatten();
                let allowed = |w: &Range<usize>| {
                    (start + STATUS_AT <= w.start && w.end <= end)
                        || table
                            .as_ref()
                            .is_some_and(|t| t.start <= w.start && w.end <= t.end)
                };
                if let Some(w) = writes.iter().find(|w| !allowed(w)) {
                    return Err(format!(
                        "the answer wrote {w:?}, outside its block {start}..{end} and table {table:?}"
                    ));
                }
                if answer.refusal.is_some() {
                    if changed {
                        return Err(format!("refusal {:?} changed the service", answer.refusal));
                    }
                    if answer.status == STATUS_SUCCESS {
                        return Err("a refusal answered STATUS_SUCCESS".into());
                    }
                    if !answer.messages.is_empty() {
                        return Err("a refusal programmed messages".into());
                    }
                    // A malformed block (rule 1) answers only its status.
                    if answer.opcode == opcode::CONNECT_EX
                        && matches!(answer.refusal, Some(crate::request::Refusal::Rule(_)))
                    {
                        check_refused_ex(service, bytes, start, answer.status)?;
                    }
                } else if answer.status != STATUS_SUCCESS {
                    return Err(format!("success answered {:#x}", answer.status));
                } else if answer.opcode == opcode::CONNECT {
                    made = Some(check_connected(service, &before, bytes, start)?);
                } else if answer.opcode == opcode::CONNECT_EX {
                    made = Some(check_connected_ex(
                        service, &before, bytes, start, base, answer,
                    )?);
                } else if answer.opcode == opcode::DISCONNECT
                    || answer.opcode == opcode::DISCONNECT_EX
                {
                    check_disconnected(service, &before, bytes, start, answer)?;
                } else if changed {
                    return Err(format!(
                        "query opcode {} changed the service",
                        answer.opcode
                    ));
                }
                if answer.refusal.is_none() {
                    let programming = applied(&self.programming, answer);
                    if (changed || programming != self.programming)
                        && service.message_programming() != programming
                    {
                        return Err("the message updates are not what changed".into());
                    }
                    self.programming = programming;
                }
                // Routes that did not move and no update: nothing to match.
                if after.routes() != before.routes() || !answer.routes.is_empty() {
                    check_route_updates(service, before.routes(), after.routes(), &answer.routes)?;
                }
            }
        }
        if changed {
            self.changed(&before, &after)?;
        }
        check_footprint(&self.service, &after)?;
        self.spare = Some(before);
        Ok((made, after))
    }

    /// After a step that changed the service: handles that died are dead
    /// for good, the touched vectors keep their invariants, and every
    /// [`FULL_CHECK_EVERY`] changes everything is checked.
    fn changed(&mut self, before: &Witness, after: &Witness) -> Result<(), String> {
        let mut touched = Vec::new();
        for (h, c) in before.live() {
            if after.get(h).is_none() {
                self.dead.insert(h);
                touched.push(c.vector());
            }
        }
        for (h, c) in after.live() {
            if before.get(h).is_none() {
                if self.dead.contains(&h) {
                    return Err(format!(
                        "handle {:#x} accepted after its disconnect",
                        h.raw()
                    ));
                }
                touched.push(c.vector());
            }
        }
        let pairs = before.routes().chunks(2).zip(after.routes().chunks(2));
        for (pin, (was, now)) in (0..).zip(pairs) {
            if was != now {
                touched.extend(self.service.route(pin).map(|r| r.vector));
            }
        }
        touched.sort_unstable();
        touched.dedup();
        self.service
            .check_vectors(&touched)
            .map_err(|what| format!("invariant broken: {what}"))?;
        self.changes += 1;
        if self.changes.is_multiple_of(FULL_CHECK_EVERY) {
            self.full_check()?;
        }
        Ok(())
    }

    /// Everything: the service's invariants, the dead handles, the
    /// message programming, the configuration.
    fn full_check(&self) -> Result<(), String> {
        let service = &self.service;
        service
            .check_invariants()
            .map_err(|what| format!("invariant broken: {what}"))?;
        if let Some(h) = self
            .dead
            .iter()
            .find(|&&h| service.registry().get(h).is_some())
        {
            return Err(format!(
                "handle {:#x} accepted after its disconnect",
                h.raw()
            ));
        }
        if service.message_programming() != self.programming {
            return Err("the message programming is not what the updates made it".into());
        }
        if *service.platform() != self.platform || *service.devices() != self.devices {
            return Err("the platform or device table changed".into());
        }
        Ok(())
    }
}

/// The route updates `updates` name exactly the pins whose route went
/// from `before` to `after` ([`packed`]), with the service's new route.
fn check_route_updates(
    service: &Service,
    before: &[u64],
    after: &[u64],
    updates: &[RouteUpdate],
) -> Result<(), String> {
    for (pin, (was, now)) in (0..).zip(before.chunks(2).zip(after.chunks(2))) {
        match updates.iter().find(|u| u.pin == pin) {
            Some(u) if Some(u.route) != service.route(pin) => {
                return Err(format!("update {u:?} is not pin {pin}'s route"));
            }
            None if was != now => {
                return Err(format!("pin {pin}'s route changed without an update"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A successful DISCONNECT or DISCONNECT_EX: its handle was live and is
/// dead, and the messages it held are unprogrammed.
fn check_disconnected(
    service: &Service,
    before: &Witness,
    after: &[u8],
    start: usize,
    answer: &crate::request::Answer,
) -> Result<(), String> {
    let at = start
        + if answer.opcode == opcode::DISCONNECT {
            offset_of!(Disconnect, handle)
        } else {
            offset_of!(DisconnectEx, handle)
        };
    let handle = read_u64(after, at).map(Handle::from_raw);
    if !handle.is_some_and(|h| service.registry().get(h).is_none() && before.get(h).is_some()) {
        return Err(format!(
            "DISCONNECT of {handle:x?} succeeded but the handle was not live then dead"
        ));
    }
    let unprogrammed = answer.messages.iter().all(|u| u.route.is_none());
    let messages_before = before.live().filter(|(_, c)| c.is_message()).count();
    let messages_after = service
        .registry()
        .iter()
        .filter(|(_, c)| c.message.is_some())
        .count();
    if !unprogrammed || answer.messages.len() != messages_before - messages_after {
        return Err(format!(
            "DISCONNECT answered message updates {:?}",
            answer.messages
        ));
    }
    Ok(())
}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    bytes
        .get(at..at.saturating_add(2))
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut raw = [0u8; 8];
    raw.copy_from_slice(b);
    Some(u64::from_le_bytes(raw))
}

fn check_connected(
    service: &Service,
    before: &Witness,
    after: &[u8],
    start: usize,
) -> Result<Handle, String> {
    let handle = read_u64(after, start + offset_of!(Connect, handle)).map(Handle::from_raw);
    let mask = read_u64(after, start + offset_of!(Connect, effective_mask));
    let (Some(handle), Some(mask)) = (handle, mask) else {
        return Err("CONNECT succeeded without writing its outputs".into());
    };
    let live = service.registry().get(handle);
    if live.is_none_or(|c| c.mask != mask) || before.get(handle).is_some() {
        return Err(format!(
            "CONNECT wrote handle {:#x} mask {mask:#x}, registry holds {live:?}",
            handle.raw()
        ));
    }
    let grew = service.registry().objects_in_use() - before.objects();
    if grew != mask.count_ones() || mask & !service.platform().online_mask() != 0 || mask == 0 {
        return Err(format!("CONNECT of mask {mask:#x} added {grew} objects"));
    }
    Ok(handle)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Where a MESSAGE_BASED CONNECT_EX at `start` put its table (RAM offsets),
/// from the block's inputs and `message_table_required`.
fn written_table(after: &[u8], start: usize, base: u64) -> Option<core::ops::Range<usize>> {
    let version = read_u32(after, start + offset_of!(ConnectEx, version_used))?;
    if version != connect_version::MESSAGE_BASED {
        return None;
    }
    let at = read_u64(after, start + offset_of!(ConnectEx, message_table))?;
    let len = read_u32(after, start + offset_of!(ConnectEx, message_table_required))?;
    let from = usize::try_from(at.checked_sub(base)?).ok()?;
    Some(from..from.checked_add(len as usize)?)
}

/// A refused CONNECT_EX answered zeros, except the table size, which is
/// the device's with STATUS_BUFFER_TOO_SMALL and after any rule from M5 on
/// (so 0 or the device's otherwise).
fn check_refused_ex(
    service: &Service,
    after: &[u8],
    start: usize,
    status: u32,
) -> Result<(), String> {
    let outputs = after
        .get(start + offset_of!(ConnectEx, version_used)..start + size_of::<ConnectEx>())
        .ok_or("a refused CONNECT_EX block is not RAM")?;
    let required = read_u32(after, start + offset_of!(ConnectEx, message_table_required));
    let others = outputs
        .iter()
        .enumerate()
        .filter(|(i, _)| !(4..8).contains(i))
        .all(|(_, &b)| b == 0);
    let version = read_u32(after, start + offset_of!(ConnectEx, version));
    let device = read_u32(after, start + offset_of!(ConnectEx, device_id)).unwrap_or(u32::MAX);
    let size = match service.query_messages(device) {
        Some(q) if version == Some(connect_version::MESSAGE_BASED) => q.table_size,
        _ => 0,
    };
    let required_ok = if status == STATUS_BUFFER_TOO_SMALL {
        size > 0 && required == Some(size)
    } else {
        required == Some(0) || required == Some(size)
    };
    if others && required_ok {
        Ok(())
    } else {
        Err(format!(
            "a refused CONNECT_EX ({status:#x}) left outputs {outputs:?}"
        ))
    }
}

/// A successful CONNECT_EX: its handle names a new connection or group
/// holding `count` connections whose masks make `effective_mask` and the
/// objects added; a MESSAGE_BASED table is the connections' routes.
fn check_connected_ex(
    service: &Service,
    before: &Witness,
    after: &[u8],
    start: usize,
    base: u64,
    answer: &crate::request::Answer,
) -> Result<Handle, String> {
    let field = |offset: usize| read_u64(after, start + offset);
    let (Some(handle), Some(mask)) = (
        field(offset_of!(ConnectEx, handle)).map(Handle::from_raw),
        field(offset_of!(ConnectEx, effective_mask)),
    ) else {
        return Err("CONNECT_EX succeeded without writing its outputs".into());
    };
    let count = read_u32(after, start + offset_of!(ConnectEx, count)).unwrap_or(0);
    let version = read_u32(after, start + offset_of!(ConnectEx, version_used)).unwrap_or(0);
    let members: Vec<crate::registry::Connection> = match service.registry().group(handle) {
        Some(g) => g.into_iter().copied().collect(),
        None => service
            .registry()
            .get(handle)
            .into_iter()
            .copied()
            .collect(),
    };
    let union = members.iter().fold(0, |m, c| m | c.mask);
    let objects: u32 = members.iter().map(|c| c.objects()).sum();
    let grew = service.registry().objects_in_use() - before.objects();
    if before.get(handle).is_some()
        || members.len() != count as usize
        || members.iter().any(|c| c.version != version)
        || union != mask
        || grew != objects
        || mask & !service.platform().online_mask() != 0
    {
        return Err(format!(
            "CONNECT_EX wrote handle {:#x} mask {mask:#x} count {count} version {version}, registry holds {members:?}",
            handle.raw()
        ));
    }
    if version == connect_version::MESSAGE_BASED {
        let range = written_table(after, start, base).ok_or("no table for MESSAGE_BASED")?;
        let bytes = after.get(range).ok_or("the table is outside RAM")?;
        let head = MessageTableHeader::read_from_prefix(bytes)
            .map_err(|_| "short table")?
            .0;
        if bytes.len() != message_table_size(members.len()) || head.message_count != count {
            return Err("the table's size or count is wrong".into());
        }
        let entries = bytes.get(size_of::<MessageTableHeader>()..).unwrap_or(&[]);
        for ((chunk, c), u) in entries
            .chunks_exact(size_of::<MessageInfoEntry>())
            .zip(&members)
            .zip(&answer.messages)
        {
            let e = MessageInfoEntry::read_from_bytes(chunk).map_err(|_| "bad entry")?;
            let route = u.route.ok_or("a connected message is unprogrammed")?;
            if e.target_processor_set != c.mask
                || route.targets != c.mask
                || (e.message_address, e.message_data) != (route.address, route.data)
                || e.vector != u32::from(c.vector)
                || Some(e.message_id as u8) != c.message
                || head.unified_irql != c.synchronize_irql
            {
                return Err(format!("table entry {e:?} disagrees with {c:?} and {u:?}"));
            }
        }
    }
    Ok(handle)
}

/// The message programming `programming` with `answer`'s updates applied.
fn applied(programming: &[MessageUpdate], answer: &crate::request::Answer) -> Vec<MessageUpdate> {
    let mut all = programming.to_vec();
    for u in &answer.messages {
        if let Some(slot) = all
            .iter_mut()
            .find(|p| p.device == u.device && p.message == u.message)
        {
            *slot = *u;
        }
    }
    all
}

/// The registry's memory is bounded by the quota, not by the guest.
fn check_footprint(service: &Service, witness: &Witness) -> Result<(), String> {
    let registry = service.registry();
    let quota = registry.quota() as usize;
    let (slots, free, chained) = (witness.slots, witness.free, witness.chained);
    if slots > quota || free > slots || chained > quota || registry.connections() as usize > quota {
        return Err(format!(
            "footprint beyond the quota {quota}: {slots} slots, {free} free, {chained} chained"
        ));
    }
    Ok(())
}

/// Named seed inputs for [`run`]: the [`super::seed_corpus`] sessions on the
/// default layout, and the connect session with its answer write-protected.
pub fn seed_corpus() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (name, session) in super::seed_corpus() {
        let mut data = vec![0u8, 0u8];
        data.extend_from_slice(&session);
        seeds.push((name.to_string(), data.clone()));
        if name == "connect_route_disconnect" {
            // The DISCONNECT block at 0x780: its status cannot be written.
            data[1] = 0x1e; // 0x1e * 0x40 = 0x780
            seeds.push(("disconnect_answer_unwritable".to_string(), data.clone()));
            // The CONNECT block at 0x700: its status cannot be written.
            data[1] = 0x1c; // 0x1c * 0x40 = 0x700
            seeds.push(("connect_answer_unwritable".to_string(), data.clone()));
            // Quota 1: the 2-processor connect is refused.
            data[0] = 1;
            data[1] = 0;
            seeds.push(("connect_over_quota".to_string(), data));
        }
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_seed_corpus_ok() {
        for (name, data) in seed_corpus() {
            assert_eq!(run(&data), Ok(()), "{name}");
        }
    }

    #[test]
    fn run_empty_and_short_inputs_ok() {
        assert_eq!(run(&[]), Ok(()));
        assert_eq!(run(&[0xff]), Ok(()));
        assert_eq!(run(&[0xff, 0xff, 0xff, 0xff]), Ok(()));
    }
}
