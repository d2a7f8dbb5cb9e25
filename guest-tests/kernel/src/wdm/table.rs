//! Message tables: the buffers CONNECT_EX writes a MESSAGE_BASED
//! connection's table into (`MessageTableHeader`, then one
//! `MessageInfoEntry` per message), and the driver's view of them,
//! [`PIO_INTERRUPT_MESSAGE_INFO`] (Windows' `IO_INTERRUPT_MESSAGE_INFO`,
//! with each message's interrupt object added).
//!
//! Bounded static pools, two sizes: [`SMALL_SLOTS`] buffers of
//! [`SMALL_BYTES`] (a table of up to [`SMALL_MESSAGES`] messages, what
//! IoConnectInterruptEx offers first) and [`LARGE_SLOTS`] of [`LARGE_BYTES`]
//! (the most messages a device has), taken when the host answers
//! STATUS_BUFFER_TOO_SMALL. Slots are taken and freed under the registry
//! lock; the host writes a buffer only during the CONNECT_EX that offers
//! it, and nothing writes it afterwards until the slot is freed.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};

use irqconnect_abi::pv::{
    MAX_MESSAGES, MessageInfoEntry, MessageTableHeader, interrupt_mode, message_table_size,
    polarity,
};
use zerocopy::FromBytes;

use super::object::{self, NIL};
use super::{KAFFINITY, KINTERRUPT_MODE, KIRQL, PKINTERRUPT};

/// Messages a small buffer holds.
pub const SMALL_MESSAGES: usize = 4;
/// Bytes of a small buffer.
pub const SMALL_BYTES: usize = message_table_size(SMALL_MESSAGES);
/// Bytes of a large buffer: a table of [`MAX_MESSAGES`] messages.
pub const LARGE_BYTES: usize = message_table_size(MAX_MESSAGES);
/// Small buffers.
pub const SMALL_SLOTS: usize = 16;
/// Large buffers.
pub const LARGE_SLOTS: usize = 4;
const SLOTS: usize = SMALL_SLOTS + LARGE_SLOTS;
/// Every slot free (the registry's initial bitmap).
pub const ALL_SLOTS: u64 = (1 << SLOTS) - 1;
const SMALL_MASK: u64 = (1 << SMALL_SLOTS) - 1;

const _: () =
    assert!(SMALL_BYTES.is_multiple_of(8) && LARGE_BYTES.is_multiple_of(8) && SLOTS <= 64);

#[repr(C, align(8))]
struct Buffers {
    small: UnsafeCell<[[u8; SMALL_BYTES]; SMALL_SLOTS]>,
    large: UnsafeCell<[[u8; LARGE_BYTES]; LARGE_SLOTS]>,
}

// SAFETY: a buffer is written only by the host, during the CONNECT_EX of
// the registry-lock holder that took its slot; it is read only after that,
// and freed under the same lock.
unsafe impl Sync for Buffers {}

static BUFFERS: Buffers = Buffers {
    small: UnsafeCell::new([[0; SMALL_BYTES]; SMALL_SLOTS]),
    large: UnsafeCell::new([[0; LARGE_BYTES]; LARGE_SLOTS]),
};

/// What the guest keeps about a slot's table.
struct Meta {
    generation: AtomicU32,
    live: AtomicBool,
    /// The group's first connection.
    leader: AtomicU16,
    /// Messages in the table.
    count: AtomicU32,
    /// The connection of message `k`.
    members: [AtomicU16; MAX_MESSAGES],
}

static META: [Meta; SLOTS] = [const {
    Meta {
        generation: AtomicU32::new(1),
        live: AtomicBool::new(false),
        leader: AtomicU16::new(NIL),
        count: AtomicU32::new(0),
        members: [const { AtomicU16::new(NIL) }; MAX_MESSAGES],
    }
}; SLOTS];

/// Bytes slot `slot` holds.
pub fn capacity(slot: u16) -> usize {
    if usize::from(slot) < SMALL_SLOTS {
        SMALL_BYTES
    } else {
        LARGE_BYTES
    }
}

fn base(slot: u16) -> *mut u8 {
    let i = usize::from(slot);
    if i < SMALL_SLOTS {
        BUFFERS
            .small
            .get()
            .cast::<u8>()
            .wrapping_add(i * SMALL_BYTES)
    } else {
        BUFFERS
            .large
            .get()
            .cast::<u8>()
            .wrapping_add((i - SMALL_SLOTS).min(LARGE_SLOTS - 1) * LARGE_BYTES)
    }
}

/// The guest-physical address of slot `slot`'s buffer (identity map; the
/// image lies below 4 GiB).
pub fn address(slot: u16) -> u64 {
    base(slot) as u64
}

/// The buffer of `slot` (read only outside the CONNECT_EX that fills it).
fn bytes(slot: u16) -> &'static [u8] {
    // SAFETY: inside the pool; no one writes the buffer while a table is
    // read (see `Buffers`).
    unsafe { core::slice::from_raw_parts(base(slot), capacity(slot)) }
}

/// The table header the host wrote into `slot`.
pub fn header(slot: u16) -> MessageTableHeader {
    MessageTableHeader::read_from_prefix(bytes(slot))
        .map_or_else(|_| Default::default(), |(h, _)| h)
}

/// Entry `k` the host wrote into `slot` (`None` past the buffer).
pub fn entry(slot: u16, k: usize) -> Option<MessageInfoEntry> {
    let at = message_table_size(k);
    let end = message_table_size(k + 1);
    bytes(slot)
        .get(at..end)
        .and_then(|b| MessageInfoEntry::read_from_bytes(b).ok())
}

impl super::object::Registry {
    /// Takes a free buffer of at least `len` bytes (small when it fits).
    pub fn take_table(&mut self, len: usize) -> Option<u16> {
        let candidates = if len <= SMALL_BYTES {
            self.tables_free
        } else if len <= LARGE_BYTES {
            self.tables_free & !SMALL_MASK
        } else {
            0
        };
        // Small requests prefer small buffers.
        let pick = if candidates & SMALL_MASK != 0 {
            candidates & SMALL_MASK
        } else {
            candidates
        };
        if pick == 0 {
            return None;
        }
        let slot = pick.trailing_zeros() as u16;
        self.tables_free &= !(1u64 << slot);
        Some(slot)
    }

    /// Records that slot `slot` holds the table of the group led by
    /// `leader`, whose message `k` is connection `members[k]`; returns the
    /// driver's handle.
    pub fn publish_table(
        &mut self,
        slot: u16,
        leader: u16,
        members: &[u16],
    ) -> PIO_INTERRUPT_MESSAGE_INFO {
        let m = &META[usize::from(slot)];
        m.leader.store(leader, Ordering::Relaxed);
        m.count.store(members.len() as u32, Ordering::Relaxed);
        for (dst, &c) in m.members.iter().zip(members) {
            dst.store(c, Ordering::Relaxed);
        }
        m.live.store(true, Ordering::Release);
        PIO_INTERRUPT_MESSAGE_INFO {
            slot,
            generation: m.generation.load(Ordering::Acquire),
        }
    }

    /// Returns slot `slot`; every handle naming its table goes stale.
    pub fn free_table(&mut self, slot: u16) {
        let Some(m) = META.get(usize::from(slot)) else {
            return;
        };
        m.live.store(false, Ordering::Release);
        let next = m.generation.load(Ordering::Relaxed).wrapping_add(1).max(1);
        m.generation.store(next, Ordering::Release);
        self.tables_free |= 1u64 << slot;
    }
}

/// `KINTERRUPT_POLARITY` (Windows' names).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KINTERRUPT_POLARITY {
    /// `InterruptPolarityUnknown` (or a value this kernel does not know).
    InterruptPolarityUnknown,
    /// `InterruptActiveHigh` (= `InterruptRisingEdge`).
    InterruptActiveHigh,
    /// `InterruptActiveLow` (= `InterruptFallingEdge`).
    InterruptActiveLow,
}

impl KINTERRUPT_POLARITY {
    fn from_abi(v: u8) -> Self {
        match v {
            polarity::ACTIVE_HIGH => Self::InterruptActiveHigh,
            2 => Self::InterruptActiveLow,
            _ => Self::InterruptPolarityUnknown,
        }
    }
}

/// `IO_INTERRUPT_MESSAGE_INFO_ENTRY`: one message of a MESSAGE_BASED
/// connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IO_INTERRUPT_MESSAGE_INFO_ENTRY {
    /// `MessageAddress`: where the device writes to signal the message.
    pub MessageAddress: u64,
    /// `TargetProcessorSet`: the processors the message is delivered to.
    pub TargetProcessorSet: KAFFINITY,
    /// `InterruptObject`: the message's own interrupt object (for
    /// KeSynchronizeExecution and the interrupt spin lock).
    pub InterruptObject: PKINTERRUPT,
    /// `MessageData`: the value the device writes.
    pub MessageData: u32,
    /// `Vector`.
    pub Vector: u32,
    /// `Irql`: the message's DIRQL.
    pub Irql: KIRQL,
    /// `Mode`.
    pub Mode: KINTERRUPT_MODE,
    /// `Polarity`.
    pub Polarity: KINTERRUPT_POLARITY,
    /// The processor group of `TargetProcessorSet` (a platform extension,
    /// as `GROUP_AFFINITY` pairs a mask with its group).
    pub Group: u16,
}

/// `PIO_INTERRUPT_MESSAGE_INFO`: what `ConnectionContext` receives for a
/// MESSAGE_BASED connection. A `Copy` handle on the guest's table
/// (`UnifiedIrql`, `MessageCount`, `MessageInfo[]`), generation-tagged so
/// a copy kept past IoDisconnectInterruptEx reads as stale (count 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PIO_INTERRUPT_MESSAGE_INFO {
    slot: u16,
    generation: u32,
}

impl PIO_INTERRUPT_MESSAGE_INFO {
    fn meta(self) -> Option<&'static Meta> {
        let m = META.get(usize::from(self.slot))?;
        (m.live.load(Ordering::Acquire) && m.generation.load(Ordering::Acquire) == self.generation)
            .then_some(m)
    }

    /// The connection that leads the table's group, while it is live.
    pub(super) fn leader(self) -> Option<u16> {
        self.meta().map(|m| m.leader.load(Ordering::Relaxed))
    }

    /// True while the connection is live.
    pub fn is_live(self) -> bool {
        self.meta().is_some()
    }

    /// `UnifiedIrql`: the IRQL every message's service routine runs at and
    /// the interrupt spin lock is taken at (0 once stale).
    pub fn UnifiedIrql(self) -> KIRQL {
        self.meta().map_or(0, |_| header(self.slot).unified_irql)
    }

    /// `MessageCount` (0 once stale).
    pub fn MessageCount(self) -> u32 {
        self.meta().map_or(0, |m| m.count.load(Ordering::Relaxed))
    }

    /// `MessageInfo[k]`, `None` past `MessageCount` or once stale.
    pub fn MessageInfo(self, k: u32) -> Option<IO_INTERRUPT_MESSAGE_INFO_ENTRY> {
        let m = self.meta()?;
        if k >= m.count.load(Ordering::Relaxed) {
            return None;
        }
        let e = entry(self.slot, k as usize)?;
        let c = m.members.get(k as usize)?.load(Ordering::Relaxed);
        Some(IO_INTERRUPT_MESSAGE_INFO_ENTRY {
            MessageAddress: e.message_address,
            TargetProcessorSet: e.target_processor_set,
            InterruptObject: PKINTERRUPT {
                slot: c,
                generation: object::conn(c).generation.load(Ordering::Acquire),
            },
            MessageData: e.message_data,
            Vector: e.vector,
            Irql: e.irql,
            Mode: if e.mode == interrupt_mode::LATCHED {
                KINTERRUPT_MODE::Latched
            } else {
                KINTERRUPT_MODE::LevelSensitive
            },
            Polarity: KINTERRUPT_POLARITY::from_abi(e.polarity),
            Group: e.group,
        })
    }

    /// A non-zero number naming this table (slot and generation).
    pub fn to_bits(self) -> u64 {
        (u64::from(self.slot) << 32) | u64::from(self.generation)
    }
}
