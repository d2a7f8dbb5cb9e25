//! Well-formed request blocks of every opcode, for the cases to break one
//! field at a time.

use irqconnect_abi::pv::{
    Connect, Disconnect, MAX_REQUEST_SIZE, QueryPlatform, QueryResources, QueryRoute,
};
use zerocopy::{Immutable, IntoBytes};

use super::pvfix::Env;
use crate::pv::Request;
use crate::runner::Failure;
use crate::wdm::{KINTERRUPT, KINTERRUPT_MODE, KSERVICE_ROUTINE, PVOID};

/// Bytes of a block kept inline; every byte past them is zero.
pub const INLINE: usize = 128;

/// A request block: its first [`INLINE`] bytes, and its length (the bytes
/// past [`INLINE`], only QUERY_PLATFORM's output array, are zero). Small,
/// because moving a value costs a `memcpy`, which an emulating host runs a
/// string-instruction step at a time (`guest-tests/README.md`).
#[derive(Clone, Copy)]
pub struct Block {
    head: [u8; INLINE],
    len: usize,
}

impl Block {
    /// The block `t` (whose bytes past [`INLINE`] must be zero: a typed
    /// block from `Request::blank` with inputs set).
    pub fn of<T: IntoBytes + Immutable>(t: &T) -> Self {
        let bytes = t.as_bytes();
        let len = bytes.len().min(MAX_REQUEST_SIZE);
        let mut head = [0u8; INLINE];
        let n = len.min(INLINE);
        head[..n].copy_from_slice(&bytes[..n]);
        Self { head, len }
    }

    /// The inline bytes (all of the block when it is at most [`INLINE`]).
    pub fn bytes(&self) -> &[u8] {
        &self.head[..self.len.min(INLINE)]
    }

    /// The inline bytes, mutably.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.head[..self.len.min(INLINE)]
    }

    /// The block's size.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// The ServiceRoutine of raw CONNECTs: never linked into a chain, so never
/// called; it only has to be a real code address.
pub fn raw_isr(_interrupt: &KINTERRUPT, _context: PVOID) -> bool {
    false
}

/// The address of [`raw_isr`].
pub fn raw_isr_address() -> u64 {
    let routine: KSERVICE_ROUTINE = raw_isr;
    routine as usize as u64
}

/// QUERY_ROUTE of `pin`, typed.
pub fn route_typed(pin: u32) -> QueryRoute {
    let mut q = QueryRoute::blank();
    q.pin = pin;
    q
}

/// QUERY_ROUTE of `pin`.
pub fn route(pin: u32) -> Block {
    Block::of(&route_typed(pin))
}

/// QUERY_PLATFORM.
pub fn platform() -> Block {
    Block::of(&QueryPlatform::blank())
}

/// QUERY_RESOURCES of `device`.
pub fn resources(device: u32) -> Block {
    let mut q = QueryResources::blank();
    q.device_id = device;
    Block::of(&q)
}

/// DISCONNECT of `handle`.
pub fn disconnect(handle: u64) -> Block {
    let mut d = Disconnect::blank();
    d.handle = handle;
    Block::of(&d)
}

/// A CONNECT the host accepts: the first exclusive level device's first
/// resource, every online processor, [`raw_isr`], no context, no lock.
pub fn connect_typed(env: &Env) -> Result<Connect, Failure> {
    let dev = env.exclusive(KINTERRUPT_MODE::LevelSensitive)?;
    let r = dev.res(0);
    let mut c = Connect::blank();
    c.device_id = dev.id();
    c.vector = r.vector;
    c.irql = r.level;
    c.synchronize_irql = r.level;
    c.interrupt_mode = KINTERRUPT_MODE::LevelSensitive as u8;
    c.share_vector = u8::from(r.share_vector());
    c.processor_enable_mask = env.online();
    c.service_routine = raw_isr_address();
    Ok(c)
}

/// [`connect_typed`] as bytes.
pub fn connect_valid(env: &Env) -> Result<Block, Failure> {
    Ok(Block::of(&connect_typed(env)?))
}

/// One well-formed block per opcode, with its name.
pub fn every_opcode(env: &Env) -> Result<[(&'static str, Block); 5], Failure> {
    Ok([
        ("QUERY_PLATFORM", platform()),
        ("QUERY_RESOURCES", resources(0)),
        ("CONNECT", connect_valid(env)?),
        ("DISCONNECT", disconnect(1)),
        ("QUERY_ROUTE", route(0)),
    ])
}
