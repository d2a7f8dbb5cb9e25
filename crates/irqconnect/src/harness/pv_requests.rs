//! Arbitrary guest memory and doorbell writes through the path the VMM
//! calls, [`Service::handle_doorbell`], with every answer checked.
//!
//! Input format ([`run`]):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | bits 0..2: object quota (64, 1, 2, 3, 4, 8, 16, 2^20); bits 3..4: RAM base (0, 0x1000, 0x10_0000, 0xffff_0000) |
//! | 1 | 0: all RAM writable; `w`: the host cannot write `base + 0x40 w .. + 0x40` (an answer there is lost) |
//! | 2.. | a [`super::run_session`] input: platform, step count, steps, RAM |
//!
//! Checked after every doorbell, against a witness of the service taken
//! before it (every registry slot with its generation and connection, mask
//! and processor group included; the free list; each vector's chain order;
//! every pin's route with its group and APIC destination; the storm marks
//! and count; the declared APIC model; the objects in use) and the host's
//! writes to RAM, which [`HarnessRam`] records. No copy of the service or
//! of RAM is made; before a RETARGET doorbell (its opcode read from guest
//! RAM) the connections its handle names are kept, nothing else:
//!
//! - an answered request wrote a defined NTSTATUS into its `status` field,
//!   nothing over the header's other fields, and nothing outside its block
//!   (as long as its header's ABI version and opcode say, `request_size`)
//!   but, for a successful MESSAGE_BASED CONNECT_EX or RETARGET, its
//!   message table; a refused one changed nothing in the service; an
//!   unreadable one wrote nothing and changed nothing; an unwritable one
//!   left the live state as it was (connections in chain order, routes,
//!   storm marks, APIC model);
//! - a successful CONNECT wrote a live, new handle and its effective mask;
//!   a successful CONNECT_EX wrote a live, new connection or group handle,
//!   its count, mask and version, and (MESSAGE_BASED) a message table that
//!   is exactly its messages' programming; a refused CONNECT_EX wrote
//!   `message_table_required` only with STATUS_BUFFER_TOO_SMALL, and one
//!   refused by rule 1 zeroed its other outputs; a successful DISCONNECT
//!   or DISCONNECT_EX killed its handle (the whole group) and unprogrammed
//!   exactly the messages it held; a successful RETARGET left the same
//!   connections under the same handle (only their masks and group moved),
//!   in the request's group and inside its mask's online processors, every
//!   other slot untouched, answered their union and count, the objects
//!   following the masks, and (MESSAGE_BASED) rewrote the table with the
//!   new programming; a successful SET_APIC_MODEL found no connection, set
//!   the model asked for and changed nothing else; a QUERY_ROUTE version 2
//!   answer is the pin's route (group, destination mode and ID, mask); any
//!   other query changed nothing;
//! - the route updates returned are exactly the pins whose route changed,
//!   with their new routes; the message updates returned, applied to the
//!   programming the harness tracks from the fresh service on, give the
//!   service's programming whenever the service changed;
//! - after a doorbell that changed the service,
//!   [`Service::check_vectors`] of every vector it touched (the vectors of
//!   slots whose connection came, went or moved, a RETARGET's included,
//!   and of pins whose route changed), and no new live handle is one that
//!   died before; every [`FULL_CHECK_EVERY`] such doorbells and after the
//!   last one, [`Service::check_invariants`] in full, no dead handle live,
//!   the tracked message programming, the platform and device table as
//!   built, and the topology the platform's with the declared model;
//! - memory stays bounded: live connections, registry slots, free slots
//!   and chain entries never exceed the object quota, whatever the guest
//!   sends.

use core::mem::{offset_of, size_of};
use std::collections::BTreeSet;
use std::ops::Range;

use irqconnect_abi::ntstatus::{
    STATUS_BUFFER_TOO_SMALL, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_DEVICE_REQUEST,
    STATUS_INVALID_DEVICE_STATE, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
    STATUS_INVALID_PARAMETER_1, STATUS_INVALID_PARAMETER_10, STATUS_NOT_FOUND, STATUS_SUCCESS,
};
use irqconnect_abi::pv::{
    ABI_VERSION_2, Connect, ConnectEx, Disconnect, DisconnectEx, MessageInfoEntry,
    MessageTableHeader, QueryRouteV2, RequestHeader, Retarget, SetApicModel, connect_version,
    message_table_size, opcode, request_size, route_destination,
};
use zerocopy::FromBytes;

use super::COPY_HANDLE_TAG;
use super::ram::HarnessRam;
use crate::destination::{ApicDestination, ApicModel, Topology};
use crate::devices::DeviceTable;
use crate::handle::Handle;
use crate::messages::MessageUpdate;
use crate::platform::{DEFAULT_OBJECT_QUOTA, MAX_OBJECT_QUOTA, Platform};
use crate::registry::Connection;
use crate::request::{Answer, Outcome};
use crate::route::{PinRoute, RouteUpdate};
use crate::service::Service;

const QUOTAS: [u32; 8] = [DEFAULT_OBJECT_QUOTA, 1, 2, 3, 4, 8, 16, MAX_OBJECT_QUOTA];
const BASES: [u64; 4] = [0, 0x1000, 0x10_0000, 0xffff_0000];
const DEFINED_STATUSES: [u32; 10] = [
    STATUS_SUCCESS,
    STATUS_INVALID_DEVICE_STATE,
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

/// The full checks run after every this many doorbells that changed the
/// service (and after the last doorbell); the doorbells between check only
/// what they touched.
pub const FULL_CHECK_EVERY: u32 = 16;

/// Runs the doorbells `data` encodes (see the module documentation). `Err`
/// names the first broken check.
pub fn run(data: &[u8]) -> Result<(), String> {
    let layout = data.first().copied().unwrap_or(0);
    let window = data.get(1).copied().unwrap_or(0);
    let session = data.get(2..).unwrap_or(&[]);
    let quota = QUOTAS[usize::from(layout & 7)];
    let base = BASES[usize::from(layout >> 3) & 3];
    let facts = super::session_platform(session.first().copied().unwrap_or(0));
    let steps = usize::from(session.get(1).copied().unwrap_or(0));
    let rest = session.get(2..).unwrap_or(&[]);
    let steps_len = (steps * 4).min(rest.len() / 4 * 4);
    let (step_bytes, memory) = rest.split_at(steps_len);
    let platform = Platform::new(facts).map_err(|e| format!("platform: {e}"))?;
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
    /// Doorbells that changed the service.
    changes: u32,
    /// A witness whose buffers the next doorbell refills.
    spare: Option<Witness>,
}

/// The connections a RETARGET's handle names (the connection, or a group's
/// lead and members), with their handles, taken before its doorbell.
struct Moving {
    handle: Handle,
    members: Vec<(Handle, Connection)>,
}

/// What one doorbell may change in the service, taken before it: every
/// slot with its generation and live connection, the free list, each
/// vector's chain order, every pin's route, the storm marks and count, the
/// declared APIC model, the objects in use. Equal witnesses mean an
/// unchanged service (its derived indexes aside, which
/// [`crate::registry::Registry::check_consistency`] checks in the full
/// check; the topology is the platform's with the model, checked there
/// too). A witness is words, one-to-one with that state: two compare with
/// one memory compare, where comparing the typed values field by field was
/// most of the harness's time under coverage instrumentation, and one
/// witness's buffer is refilled for the next doorbell.
///
/// Layout: [`SLOT_WORDS`] per slot (its generation, then
/// [`connection_words`]), the free slots, `slot | vector << 32` per chain
/// entry (vectors ascending, chains in connection order), the three
/// section lengths, [`ROUTE_WORDS`] per pin ([`packed`]), the storm marks
/// and count, the APIC model, the objects in use.
#[derive(PartialEq, Eq)]
struct Witness {
    words: Vec<u64>,
    slots: usize,
    free: usize,
    chained: usize,
}

/// Words per slot in a [`Witness`].
const SLOT_WORDS: usize = 8;

/// Words per pin in a [`Witness`].
const ROUTE_WORDS: usize = 3;

/// Words after the routes: storm, model, objects.
const TAIL_WORDS: usize = 3;

/// The live flag in a slot's second connection word.
const LIVE: u64 = 1;
/// The message flag in a slot's second connection word.
const MESSAGE: u64 = 1 << 5;

/// IOAPIC pins.
const PINS: usize = irqconnect_abi::layout::IOAPIC_PINS as usize;

/// A route as [`ROUTE_WORDS`] words, one-to-one.
fn packed(route: &PinRoute) -> [u64; ROUTE_WORDS] {
    // Every field by name, so that a new one breaks the build here.
    let PinRoute {
        masked,
        vector,
        trigger,
        group,
        destination: targets,
        lowest_priority: lowest,
        connections: count,
        target,
    } = *route;
    let level = trigger == irqchip::apic_bus::TriggerMode::Level;
    let flags = u64::from(masked) | u64::from(lowest) << 1 | u64::from(level) << 2;
    [
        targets,
        u64::from(count) | u64::from(vector) << 32 | flags << 40 | u64::from(group) << 48,
        destination_word(target),
    ]
}

/// An APIC destination as one word, one-to-one: the kind in bits 0..2,
/// logical lowest priority in bit 2, the ID in bits 32..64.
fn destination_word(target: ApicDestination) -> u64 {
    match target {
        ApicDestination::None => 0,
        ApicDestination::Physical { apic_id } => 1 | u64::from(apic_id) << 32,
        ApicDestination::Logical {
            destination,
            lowest_priority,
        } => 2 | u64::from(lowest_priority) << 2 | u64::from(destination) << 32,
    }
}

/// A slot's connection (or its absence: zeros) as words, one-to-one: the
/// vector in bits 32..40 of the first, [`LIVE`] and [`MESSAGE`] in the
/// second, the processor group in its bits 16..32.
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
        group,
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
        flags
            | u64::from(message.unwrap_or(0)) << 8
            | u64::from(group) << 16
            | u64::from(version) << 32,
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
            core::iter::repeat_n([u64::MAX; ROUTE_WORDS], PINS.saturating_sub(routes.len()))
                .flatten(),
        );
        self.words
            .push(u64::from(service.storm_bits()) | u64::from(service.storm_masked_pins()) << 32);
        self.words
            .push(u64::from(service.topology().model().to_abi()));
        self.words.push(u64::from(registry.objects_in_use()));
    }

    /// Slot `i`'s words: its generation, then [`connection_words`].
    fn slot(&self, i: usize) -> Option<&[u64]> {
        let at = i.checked_mul(SLOT_WORDS)?;
        self.words
            .get(at..at + SLOT_WORDS)
            .filter(|_| i < self.slots)
    }

    /// Slot `i`'s live connection with its handle.
    fn live_at(&self, i: usize) -> Option<(Handle, LiveSlot<'_>)> {
        let (&generation, connection) = self.slot(i)?.split_first()?;
        if connection.get(1).is_none_or(|w| w & LIVE == 0) {
            return None;
        }
        let handle = Handle::new(i, generation as u32)?;
        Some((handle, LiveSlot { words: connection }))
    }

    /// The live connections, slot order, with their handles.
    fn live(&self) -> impl Iterator<Item = (Handle, LiveSlot<'_>)> + '_ {
        (0..self.slots).filter_map(|i| self.live_at(i))
    }

    /// The live connection `handle` names.
    fn get(&self, handle: Handle) -> Option<LiveSlot<'_>> {
        self.live_at(handle.slot()?)
            .filter(|(h, _)| *h == handle)
            .map(|(_, c)| c)
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
        self.words
            .get(start..start + ROUTE_WORDS * PINS)
            .unwrap_or(&[])
    }

    /// The word `back` places before the end.
    fn tail(&self, back: usize) -> u64 {
        self.words
            .len()
            .checked_sub(back)
            .and_then(|i| self.words.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The storm marks (bits) and count.
    fn storm(&self) -> u64 {
        self.tail(TAIL_WORDS)
    }

    /// The declared APIC model (its ABI value).
    fn model(&self) -> u64 {
        self.tail(2)
    }

    /// Interrupt objects in use.
    fn objects(&self) -> u32 {
        self.tail(1) as u32
    }

    /// Everything but the APIC model.
    fn without_model(&self) -> [&[u64]; 2] {
        let at = self.words.len().saturating_sub(2);
        let (head, rest) = self.words.split_at(at);
        [head, rest.get(1..).unwrap_or(&[])]
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
        let moving = self.moving(gpa);
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
                    || after.model() != before.model()
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
                // The header is as the guest left it, so its version and
                // opcode are the request's.
                let opcode_field = read_u16(bytes, start + offset_of!(RequestHeader, opcode));
                let version_field = read_u16(bytes, start + offset_of!(RequestHeader, abi_version));
                let size =
                    request_size(version_field, opcode_field).unwrap_or(size_of::<RequestHeader>());
                let end = start.saturating_add(size.max(size_of::<RequestHeader>()));
                // A successful MESSAGE_BASED CONNECT_EX or RETARGET also
                // writes its table.
                let table = match answer.opcode {
                    _ if answer.refusal.is_some() => None,
                    opcode::CONNECT_EX => written_table(bytes, start, base),
                    opcode::RETARGET => retarget_table(service, bytes, start, base),
                    _ => None,
                };
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
                } else if answer.opcode == opcode::RETARGET {
                    let block: Retarget = read_block(bytes, start)?;
                    let moving = moving
                        .as_ref()
                        .ok_or("RETARGET succeeded, but its block named nothing before")?;
                    let table = table
                        .map(|range| bytes.get(range).ok_or("the table is outside RAM"))
                        .transpose()?;
                    check_retargeted(service, [&before, &after], moving, &block, table, answer)?;
                } else if answer.opcode == opcode::SET_APIC_MODEL {
                    check_model_set(service, [&before, &after], bytes, start)?;
                } else if answer.opcode == opcode::DISCONNECT
                    || answer.opcode == opcode::DISCONNECT_EX
                {
                    check_disconnected(service, &before, bytes, start, answer)?;
                } else if changed {
                    return Err(format!(
                        "query opcode {} changed the service",
                        answer.opcode
                    ));
                } else if answer.opcode == opcode::QUERY_ROUTE && version_field == ABI_VERSION_2 {
                    check_route_v2(service, bytes, start)?;
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

    /// For a doorbell whose block (as the guest wrote it) is a RETARGET:
    /// the connections its handle names now.
    fn moving(&self, gpa: u64) -> Option<Moving> {
        let start = self.ram.offsets(gpa, size_of::<RequestHeader>())?.start;
        let bytes = self.ram.bytes();
        if read_u16(bytes, start + offset_of!(RequestHeader, opcode)) != opcode::RETARGET {
            return None;
        }
        let handle = Handle::from_raw(read_u64(bytes, start + offset_of!(Retarget, handle))?);
        Some(Moving {
            handle,
            members: members_of(&self.service, handle),
        })
    }

    /// After a doorbell that changed the service: handles that died are
    /// dead for good, the touched vectors keep their invariants, and every
    /// [`FULL_CHECK_EVERY`] changes everything is checked. A vector is
    /// touched when a slot's connection on it came, went or changed (a
    /// RETARGET's new masks), or a pin's route on it changed.
    fn changed(&mut self, before: &Witness, after: &Witness) -> Result<(), String> {
        let mut touched = Vec::new();
        for i in 0..before.slots.max(after.slots) {
            if before.slot(i) == after.slot(i) {
                continue;
            }
            if let Some((h, c)) = before.live_at(i) {
                if after.get(h).is_none() {
                    self.dead.insert(h);
                }
                touched.push(c.vector());
            }
            if let Some((h, c)) = after.live_at(i) {
                if before.get(h).is_none() && self.dead.contains(&h) {
                    return Err(format!(
                        "handle {:#x} accepted after its disconnect",
                        h.raw()
                    ));
                }
                touched.push(c.vector());
            }
        }
        let pairs = before
            .routes()
            .chunks(ROUTE_WORDS)
            .zip(after.routes().chunks(ROUTE_WORDS));
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
    /// message programming, the configuration and the topology.
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
        if *service.topology() != Topology::new(&self.platform, service.topology().model()) {
            return Err("the topology is not the platform's with the declared model".into());
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
    let pairs = before.chunks(ROUTE_WORDS).zip(after.chunks(ROUTE_WORDS));
    for (pin, (was, now)) in (0..).zip(pairs) {
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
    answer: &Answer,
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

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
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

/// Where a MESSAGE_BASED CONNECT_EX at `start` put its table (RAM offsets),
/// from the block's inputs and `message_table_required`.
fn written_table(after: &[u8], start: usize, base: u64) -> Option<Range<usize>> {
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
    answer: &Answer,
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
    let members = members_of(service, handle);
    let union = members.iter().fold(0, |m, (_, c)| m | c.mask);
    let objects: u32 = members.iter().map(|(_, c)| c.objects()).sum();
    let grew = service.registry().objects_in_use() - before.objects();
    if before.get(handle).is_some()
        || members.len() != count as usize
        || members.iter().any(|(_, c)| c.version != version)
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
        check_table(bytes, &members, answer)?;
    }
    Ok(handle)
}

/// A message table as written (`bytes`) describes `members` (one entry
/// each, in order) exactly as `answer` programmed them.
fn check_table(
    bytes: &[u8],
    members: &[(Handle, Connection)],
    answer: &Answer,
) -> Result<(), String> {
    let head = MessageTableHeader::read_from_prefix(bytes)
        .map_err(|_| "short table")?
        .0;
    if bytes.len() != message_table_size(members.len())
        || head.message_count as usize != members.len()
        || answer.messages.len() != members.len()
    {
        return Err("the table's size or count is wrong".into());
    }
    let entries = bytes.get(size_of::<MessageTableHeader>()..).unwrap_or(&[]);
    for ((chunk, (_, c)), u) in entries
        .chunks_exact(size_of::<MessageInfoEntry>())
        .zip(members)
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
    Ok(())
}

/// The connections a handle names, with their handles: a group's lead and
/// members, or the connection.
fn members_of(service: &Service, handle: Handle) -> Vec<(Handle, Connection)> {
    let registry = service.registry();
    match registry.group_members(handle) {
        Some(g) => g.into_iter().map(|(h, c)| (h, *c)).collect(),
        None => registry
            .get(handle)
            .map(|c| (handle, *c))
            .into_iter()
            .collect(),
    }
}

/// Where a successful RETARGET of a MESSAGE_BASED connection at `start`
/// rewrote its table (RAM offsets).
fn retarget_table(
    service: &Service,
    after: &[u8],
    start: usize,
    base: u64,
) -> Option<Range<usize>> {
    let handle = Handle::from_raw(read_u64(after, start + offset_of!(Retarget, handle))?);
    let members = members_of(service, handle);
    if !members.iter().any(|(_, c)| c.message.is_some()) {
        return None;
    }
    let at = read_u64(after, start + offset_of!(Retarget, message_table))?;
    let from = usize::try_from(at.checked_sub(base)?).ok()?;
    Some(from..from.checked_add(message_table_size(members.len()))?)
}

/// A successful RETARGET: the same connections under the same handle
/// (`moving`, taken before: only their masks and group moved), now in the
/// request's group and inside its mask (online processors), every other
/// slot as the witness before (`witnesses`: before, after) holds it; the
/// answer's mask is their union and its count theirs; the objects follow
/// the masks; a MESSAGE_BASED table is the new programming (`table`, as
/// written).
fn check_retargeted(
    service: &Service,
    [before, after]: [&Witness; 2],
    moving: &Moving,
    block: &Retarget,
    table: Option<&[u8]>,
    answer: &Answer,
) -> Result<(), String> {
    let handle = Handle::from_raw(block.handle);
    let old = &moving.members;
    let new = members_of(service, handle);
    let online = service.platform().group_online(block.group);
    let union = new.iter().fold(0, |m, (_, c)| m | c.mask);
    let objects = |cs: &[(Handle, Connection)]| cs.iter().map(|(_, c)| c.objects()).sum::<u32>();
    let grew = i64::from(service.registry().objects_in_use()) - i64::from(before.objects());
    let same_connections = old.len() == new.len()
        && old.iter().zip(&new).all(|((ho, o), (hn, n))| {
            ho == hn
                && Connection {
                    mask: n.mask,
                    group: n.group,
                    ..*o
                } == *n
        });
    if moving.handle != handle
        || old.is_empty()
        || !same_connections
        || new.iter().any(|(_, c)| {
            c.group != block.group || c.mask == 0 || c.mask & !(block.processor_mask & online) != 0
        })
        || block.effective_mask != union
        || block.count as usize != new.len()
        || grew != i64::from(objects(&new)) - i64::from(objects(old))
    {
        return Err(format!(
            "RETARGET {block:?} answered, connections {old:?} became {new:?}"
        ));
    }
    let moved: Vec<usize> = old.iter().filter_map(|(h, _)| h.slot()).collect();
    if let Some(i) = (0..before.slots.max(after.slots))
        .find(|&i| !moved.contains(&i) && before.slot(i) != after.slot(i))
    {
        return Err(format!("RETARGET of {handle:?} changed slot {i}"));
    }
    if let Some(bytes) = table {
        check_table(bytes, &new, answer)?;
    }
    Ok(())
}

/// A successful SET_APIC_MODEL: no connection was live, the model is the
/// one asked for, nothing else changed (`witnesses`: before, after).
fn check_model_set(
    service: &Service,
    [before, after]: [&Witness; 2],
    bytes: &[u8],
    start: usize,
) -> Result<(), String> {
    let block: SetApicModel = read_block(bytes, start)?;
    let asked = ApicModel::from_abi(block.model);
    let connections = before.live().count();
    if connections != 0
        || Some(service.topology().model()) != asked
        || after.without_model() != before.without_model()
    {
        return Err(format!(
            "SET_APIC_MODEL {:?} accepted: model {:?}, {connections} connections before",
            block.model,
            service.topology().model(),
        ));
    }
    Ok(())
}

/// The answered block of type `T` at RAM offset `start`.
fn read_block<T: FromBytes>(bytes: &[u8], start: usize) -> Result<T, String> {
    let block = bytes
        .get(start..start.saturating_add(size_of::<T>()))
        .ok_or_else(|| format!("an answered {} is not RAM", core::any::type_name::<T>()))?;
    T::read_from_bytes(block).map_err(|_| "a short block".into())
}

/// A QUERY_ROUTE version 2 answer is the pin's route.
fn check_route_v2(service: &Service, bytes: &[u8], start: usize) -> Result<(), String> {
    let block: QueryRouteV2 = read_block(bytes, start)?;
    let route = u8::try_from(block.base.pin)
        .ok()
        .and_then(|pin| service.route(pin))
        .ok_or("QUERY_ROUTE succeeded for a pin without a route")?;
    let (mode, id) = match route.target {
        ApicDestination::Logical { destination, .. } => (route_destination::LOGICAL, destination),
        ApicDestination::Physical { apic_id } => (route_destination::PHYSICAL, apic_id),
        ApicDestination::None => (route_destination::NONE, 0),
    };
    if block.base.destination_mask != route.destination
        || block.group != route.group
        || (block.destination_mode, block.apic_destination) != (mode, id)
        || block.base.masked != u8::from(route.masked)
    {
        return Err(format!("QUERY_ROUTE version 2 {block:?} is not {route:?}"));
    }
    Ok(())
}

/// The message programming `programming` with `answer`'s updates applied.
fn applied(programming: &[MessageUpdate], answer: &Answer) -> Vec<MessageUpdate> {
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
