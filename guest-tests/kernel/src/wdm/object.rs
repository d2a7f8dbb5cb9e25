//! The interrupt objects: a bounded static pool of per-processor
//! [`KINTERRUPT`]s, a pool of connections (what `*InterruptObject` names),
//! and the per-(processor, vector) chains dispatch walks.
//!
//! Everything dispatch reads is an atomic: a writer (connect, disconnect)
//! fills an object with `Relaxed` stores and publishes it with one `Release`
//! store of its index into a chain link; dispatch follows links with
//! `Acquire`. Writers are serialised by the registry lock ([`REGISTRY`]).
//! An unlinked object keeps its `next` link, so a dispatch standing on it
//! walks on correctly; it is freed (and may be reused) only after the grace
//! period of `dispatch::wait_quiescent`.
//!
//! IoConnectInterruptEx connects a group: LINE_BASED one connection per
//! line resource, MESSAGE_BASED one per message. The group's connections
//! are chained by `next_member` from its first one (`leader`), share one
//! host handle and one spin lock, and go together at disconnect.

use core::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

use super::lock::KSPIN_LOCK;
use crate::percpu::MAX_CPUS;
use crate::spinlock::SpinLock;

/// Most per-processor interrupt objects alive at once (the host's default
/// quota is 64; configured quotas above this are refused here).
pub const MAX_OBJECTS: usize = 256;
/// Most connections alive at once.
pub const MAX_CONNECTIONS: usize = 128;
/// "No object" in a chain link.
pub const NIL: u16 = u16::MAX;

/// What a connection is ([`Connection::kind`]).
pub(super) mod kind {
    /// IoConnectInterrupt, or IoConnectInterruptEx FULLY_SPECIFIED: alone.
    pub const SINGLE: u8 = 0;
    /// One line resource of a LINE_BASED group.
    pub const LINE: u8 = 1;
    /// One message of a MESSAGE_BASED group: its routine is a
    /// `KMESSAGE_SERVICE_ROUTINE`, its vector has no other connection.
    pub const MESSAGE: u8 = 2;
}

/// A per-processor interrupt object: one for each processor of a
/// connection's effective mask, linked into that processor's chain for the
/// connection's vector. Its ISR receives it as the first argument.
pub struct KINTERRUPT {
    connection: AtomicU16,
    processor: AtomicU16,
    vector: AtomicU8,
    next: AtomicU16,
}

impl KINTERRUPT {
    const fn new() -> Self {
        Self {
            connection: AtomicU16::new(NIL),
            processor: AtomicU16::new(0),
            vector: AtomicU8::new(0),
            next: AtomicU16::new(NIL),
        }
    }

    /// The processor whose chain holds this object.
    pub fn processor(&self) -> usize {
        usize::from(self.processor.load(Ordering::Relaxed))
    }

    /// The vector the object is connected on.
    pub fn vector(&self) -> u8 {
        self.vector.load(Ordering::Relaxed)
    }

    /// The connection this object belongs to.
    pub(super) fn connection(&self) -> &'static Connection {
        conn(self.connection.load(Ordering::Relaxed))
    }

    /// The connection's `SynchronizeIrql` (a message's: the `UnifiedIrql`).
    pub fn synchronize_irql(&self) -> u8 {
        self.connection().sync_irql.load(Ordering::Relaxed)
    }

    /// The spin lock the object's service routine runs under (the
    /// driver's, or the one the connection's group was given).
    pub fn spin_lock(&self) -> &'static KSPIN_LOCK {
        self.connection().spin_lock()
    }

    /// The message this object serves (`None` for a line-based one).
    pub fn message_id(&self) -> Option<u32> {
        let c = self.connection();
        (c.kind.load(Ordering::Relaxed) == kind::MESSAGE)
            .then(|| c.message_id.load(Ordering::Relaxed))
    }

    /// The handle (`*InterruptObject`) of the connection this object belongs to.
    pub fn interrupt_object(&self) -> super::PKINTERRUPT {
        let index = self.connection.load(Ordering::Relaxed);
        super::PKINTERRUPT {
            slot: index,
            generation: conn(index).generation.load(Ordering::Relaxed),
        }
    }

    /// The next object of the chain (`NIL` at the tail).
    pub(super) fn next(&self) -> u16 {
        self.next.load(Ordering::Acquire)
    }
}

/// One IoConnectInterrupt: the parameters dispatch and KeSynchronizeExecution
/// need, the host's handle, the effective mask and the objects per processor.
pub(super) struct Connection {
    pub generation: AtomicU32,
    pub live: AtomicBool,
    pub host_handle: AtomicU64,
    pub vector: AtomicU8,
    pub irql: AtomicU8,
    pub sync_irql: AtomicU8,
    pub latched: AtomicBool,
    pub floating_save: AtomicBool,
    pub routine: AtomicUsize,
    pub context: AtomicUsize,
    /// Address of the lock in use: the driver's, or `own_lock`.
    pub lock: AtomicUsize,
    /// The lock used when the driver passes none (shared by all of this
    /// connection's per-processor objects).
    pub own_lock: KSPIN_LOCK,
    /// The effective mask, of processor group `group`.
    pub mask: AtomicU64,
    /// The processor group of `mask`.
    pub group: AtomicU16,
    /// The device (its PnP id).
    pub device: AtomicU32,
    /// LINE: the resource's line (IOAPIC pin) and affinity.
    pub line: AtomicU8,
    pub affinity: AtomicU64,
    pub objects: [AtomicU16; MAX_CPUS],
    /// One of [`kind`].
    pub kind: AtomicU8,
    /// The first connection of this one's group (itself for the first);
    /// `NIL` for a connection alone.
    pub leader: AtomicU16,
    /// The group's next connection (`NIL` at its end).
    pub next_member: AtomicU16,
    /// MESSAGE: the message number.
    pub message_id: AtomicU32,
    /// The version IoConnectInterruptEx connected (the host's
    /// `version_used`); 0 for IoConnectInterrupt.
    pub version_used: AtomicU32,
    /// The leader of a MESSAGE_BASED group: its message table's slot.
    pub table: AtomicU16,
}

impl Connection {
    const fn new() -> Self {
        Self {
            generation: AtomicU32::new(1),
            live: AtomicBool::new(false),
            host_handle: AtomicU64::new(0),
            vector: AtomicU8::new(0),
            irql: AtomicU8::new(0),
            sync_irql: AtomicU8::new(0),
            latched: AtomicBool::new(false),
            floating_save: AtomicBool::new(false),
            routine: AtomicUsize::new(0),
            context: AtomicUsize::new(0),
            lock: AtomicUsize::new(0),
            own_lock: KSPIN_LOCK::new(),
            mask: AtomicU64::new(0),
            group: AtomicU16::new(0),
            device: AtomicU32::new(0),
            line: AtomicU8::new(0),
            affinity: AtomicU64::new(0),
            objects: [const { AtomicU16::new(NIL) }; MAX_CPUS],
            kind: AtomicU8::new(kind::SINGLE),
            leader: AtomicU16::new(NIL),
            next_member: AtomicU16::new(NIL),
            message_id: AtomicU32::new(0),
            version_used: AtomicU32::new(0),
            table: AtomicU16::new(NIL),
        }
    }

    /// The spin lock this connection's ISR and synchronized routines take.
    pub fn spin_lock(&'static self) -> &'static KSPIN_LOCK {
        let addr = self.lock.load(Ordering::Relaxed);
        if addr == 0 {
            return &self.own_lock;
        }
        // SAFETY: `lock` only ever holds the address of a `&'static
        // KSPIN_LOCK`: one passed to IoConnectInterrupt(Ex), or the
        // `own_lock` of the group's first connection (a static), set before
        // the connection was published.
        unsafe { &*(addr as *const KSPIN_LOCK) }
    }

    /// The group's first connection (this one when it is alone).
    pub fn leader_slot(&self, me: u16) -> u16 {
        match self.leader.load(Ordering::Relaxed) {
            NIL => me,
            l => l,
        }
    }
}

static OBJECTS: [KINTERRUPT; MAX_OBJECTS] = [const { KINTERRUPT::new() }; MAX_OBJECTS];
static CONNECTIONS: [Connection; MAX_CONNECTIONS] = [const { Connection::new() }; MAX_CONNECTIONS];
/// Chain heads per (processor, vector).
static CHAINS: [[AtomicU16; 256]; MAX_CPUS] =
    [const { [const { AtomicU16::new(NIL) }; 256] }; MAX_CPUS];

/// Object `index` (an index the pool handed out; `NIL` and out-of-range
/// indices are a kernel bug).
pub(super) fn obj(index: u16) -> &'static KINTERRUPT {
    &OBJECTS[usize::from(index)]
}

/// Connection `index`.
pub(super) fn conn(index: u16) -> &'static Connection {
    &CONNECTIONS[usize::from(index)]
}

/// Connection `index` when it exists (for handle validation).
pub(super) fn conn_checked(index: u16) -> Option<&'static Connection> {
    CONNECTIONS.get(usize::from(index))
}

/// Head of the chain of (`cpu`, `vector`).
pub(super) fn head(cpu: usize, vector: u8) -> u16 {
    CHAINS
        .get(cpu)
        .map_or(NIL, |c| c[usize::from(vector)].load(Ordering::Acquire))
}

/// Allocation state of the pools; its lock serialises connect and disconnect.
pub(super) struct Registry {
    objects_free: [u64; MAX_OBJECTS / 64],
    connections_free: [u64; MAX_CONNECTIONS / 64],
    /// Free message-table slots (bit `i`: slot `i`).
    pub tables_free: u64,
}

/// The registry (held across a whole connect or disconnect).
pub(super) static REGISTRY: SpinLock<Registry> = SpinLock::new(Registry {
    objects_free: [u64::MAX; MAX_OBJECTS / 64],
    connections_free: [u64::MAX; MAX_CONNECTIONS / 64],
    tables_free: super::table::ALL_SLOTS,
});

fn take(bits: &mut [u64]) -> Option<u16> {
    for (w, word) in bits.iter_mut().enumerate() {
        if *word != 0 {
            let b = word.trailing_zeros() as usize;
            *word &= !(1u64 << b);
            return u16::try_from(w * 64 + b).ok();
        }
    }
    None
}

fn give(bits: &mut [u64], index: u16) {
    let i = usize::from(index);
    if let Some(word) = bits.get_mut(i / 64) {
        *word |= 1u64 << (i % 64);
    }
}

fn free_count(bits: &[u64]) -> usize {
    bits.iter().map(|w| w.count_ones() as usize).sum()
}

impl Registry {
    /// Objects free in the pool.
    pub fn objects_free(&self) -> usize {
        free_count(&self.objects_free)
    }

    /// Live connections.
    pub fn connections_live(&self) -> usize {
        MAX_CONNECTIONS - free_count(&self.connections_free)
    }

    /// Takes a connection slot and one object per processor of `mask` in
    /// processor group `group`, all or nothing.
    pub fn allocate(&mut self, group: u16, mask: u64) -> Option<u16> {
        if self.objects_free() < mask.count_ones() as usize
            || free_count(&self.connections_free) == 0
        {
            return None;
        }
        let c = take(&mut self.connections_free)?;
        for cpu in bits(group, mask) {
            self.add_object(c, cpu)?;
        }
        Some(c)
    }

    /// Gives connection `c` an object on processor `cpu`, not yet linked
    /// (a retarget's new processor); `None` when the pool is empty or the
    /// connection already has one there.
    pub fn add_object(&mut self, c: u16, cpu: usize) -> Option<u16> {
        let slot = conn(c).objects.get(cpu)?;
        if slot.load(Ordering::Relaxed) != NIL {
            return None;
        }
        let o = take(&mut self.objects_free)?;
        let object = obj(o);
        object.connection.store(c, Ordering::Relaxed);
        object.processor.store(cpu as u16, Ordering::Relaxed);
        object.next.store(NIL, Ordering::Relaxed);
        slot.store(o, Ordering::Relaxed);
        Some(o)
    }

    /// Returns connection `c`'s object on `cpu` to the pool (after it was
    /// unlinked and a grace period passed).
    pub fn drop_object(&mut self, c: u16, cpu: usize) {
        let Some(slot) = conn(c).objects.get(cpu) else {
            return;
        };
        let o = slot.swap(NIL, Ordering::Relaxed);
        if o != NIL {
            obj(o).connection.store(NIL, Ordering::Relaxed);
            give(&mut self.objects_free, o);
        }
    }

    /// Returns connection `c` and its objects to the pools; its generation
    /// advances, so every handle naming it goes stale.
    pub fn free(&mut self, c: u16) {
        let connection = conn(c);
        for slot in connection.objects.iter() {
            let o = slot.swap(NIL, Ordering::Relaxed);
            if o != NIL {
                obj(o).connection.store(NIL, Ordering::Relaxed);
                give(&mut self.objects_free, o);
            }
        }
        connection.live.store(false, Ordering::Release);
        connection.kind.store(kind::SINGLE, Ordering::Relaxed);
        connection.leader.store(NIL, Ordering::Relaxed);
        connection.next_member.store(NIL, Ordering::Relaxed);
        connection.table.store(NIL, Ordering::Relaxed);
        connection.version_used.store(0, Ordering::Relaxed);
        connection.lock.store(0, Ordering::Relaxed);
        let next = connection
            .generation
            .load(Ordering::Relaxed)
            .wrapping_add(1)
            .max(1);
        connection.generation.store(next, Ordering::Release);
        give(&mut self.connections_free, c);
    }

    /// Appends each object of connection `c` to the tail of its processor's
    /// chain for `vector` (connection order), publishing it to dispatch.
    pub fn link(&mut self, c: u16, vector: u8) {
        for cpu in 0..MAX_CPUS {
            self.link_one(c, cpu, vector);
        }
    }

    /// Appends connection `c`'s object on `cpu` (if any) to the tail of
    /// the chain of (`cpu`, `vector`), publishing it to dispatch.
    pub fn link_one(&mut self, c: u16, cpu: usize, vector: u8) {
        let (Some(slot), Some(chains)) = (conn(c).objects.get(cpu), CHAINS.get(cpu)) else {
            return;
        };
        let o = slot.load(Ordering::Relaxed);
        if o == NIL {
            return;
        }
        obj(o).vector.store(vector, Ordering::Relaxed);
        obj(o).next.store(NIL, Ordering::Relaxed);
        let mut link = &chains[usize::from(vector)];
        loop {
            let at = link.load(Ordering::Relaxed);
            if at == NIL || at == o {
                break;
            }
            link = &obj(at).next;
        }
        link.store(o, Ordering::Release);
    }

    /// Removes each object of connection `c` from its chain. The objects'
    /// own `next` links stay, so a dispatch standing on one walks on.
    pub fn unlink(&mut self, c: u16, vector: u8) {
        for cpu in 0..MAX_CPUS {
            self.unlink_one(c, cpu, vector);
        }
    }

    /// Removes connection `c`'s object on `cpu` (if any) from the chain of
    /// (`cpu`, `vector`); its own `next` link stays.
    pub fn unlink_one(&mut self, c: u16, cpu: usize, vector: u8) {
        let (Some(slot), Some(chains)) = (conn(c).objects.get(cpu), CHAINS.get(cpu)) else {
            return;
        };
        let o = slot.load(Ordering::Relaxed);
        if o == NIL {
            return;
        }
        let mut link = &chains[usize::from(vector)];
        loop {
            let at = link.load(Ordering::Relaxed);
            if at == NIL {
                break;
            }
            if at == o {
                link.store(obj(o).next.load(Ordering::Relaxed), Ordering::Release);
                break;
            }
            link = &obj(at).next;
        }
    }
}

/// Processors in a processor group (the bits of a KAFFINITY).
pub const GROUP_SIZE: usize = irqconnect_abi::pv::GROUP_SIZE;

/// The processor indices of the bits of `mask` in processor group `group`,
/// lowest first (processor `64 * group + b` for bit `b`).
pub fn bits(group: u16, mask: u64) -> impl Iterator<Item = usize> {
    let base = usize::from(group) * GROUP_SIZE;
    (0..GROUP_SIZE)
        .filter(move |&b| mask & (1u64 << b) != 0)
        .map(move |b| base + b)
        .filter(|&i| i < MAX_CPUS)
}
