//! Client of the paravirtual connect interface (`irqconnect_abi::pv`).
//!
//! - Detection: a 32-bit `in` from [`PV_DOORBELL_PORT`] returns
//!   [`PV_DOORBELL_SIGNATURE`] under our VMM and all ones where no PV device
//!   exists (QEMU). Probed once and cached.
//! - Transport: one static, 8-byte aligned request block in the kernel image.
//!   The kernel is identity-mapped, so the block's address is its
//!   guest-physical address (below 4 GiB: the image is linked at 1 MiB). The
//!   block is used by one request at a time, under a spin lock taken with
//!   interrupts off, so a request never interleaves with another CPU's.
//! - A request: copy the caller's typed block in (header preset with
//!   `STATUS_NO_ANSWER`), a 32-bit `out` of its address to the doorbell (the
//!   VMM answers before the vCPU resumes), copy the answer back. A block the
//!   VMM did not answer keeps `STATUS_NO_ANSWER`, which is returned as is.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use irqconnect_abi::layout::{PV_DOORBELL_PORT, PV_DOORBELL_SIGNATURE};
use irqconnect_abi::ntstatus::{NtStatus, STATUS_SUCCESS};
use irqconnect_abi::pv::{
    ABI_VERSION_1, ABI_VERSION_2, BLOCK_ALIGN, Connect, ConnectEx, Disconnect, DisconnectEx,
    MAX_REQUEST_SIZE, QueryMessages, QueryMessagesV2, QueryPlatform, QueryPlatformV2,
    QueryResources, QueryResourcesV2, QueryRoute, QueryRouteV2, RequestHeader, Retarget,
    STATUS_NO_ANSWER, SetApicModel, opcode,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::spinlock::SpinLock;

/// The reason every PV test gives when it skips for want of the device.
pub const ABSENT_REASON: &str = "no PV device (doorbell reads all ones)";

/// A request block type: its opcode and its header.
pub trait Request: FromBytes + IntoBytes + KnownLayout + Immutable + Sized {
    /// The opcode whose layout this is.
    const OPCODE: u16;
    /// The ABI version whose layout this is.
    const VERSION: u16 = ABI_VERSION_1;
    /// The block's header.
    fn header(&self) -> &RequestHeader;
    /// The block's header, mutably.
    fn header_mut(&mut self) -> &mut RequestHeader;
    /// A zeroed block with its header preset ([`RequestHeader::new`]).
    fn blank() -> Self {
        let mut block = Self::new_zeroed();
        *block.header_mut() = RequestHeader::versioned::<Self>(Self::VERSION, Self::OPCODE);
        block
    }
}

macro_rules! request {
    ($t:ty, $op:expr) => {
        impl Request for $t {
            const OPCODE: u16 = $op;
            fn header(&self) -> &RequestHeader {
                &self.header
            }
            fn header_mut(&mut self) -> &mut RequestHeader {
                &mut self.header
            }
        }
    };
    ($t:ty, $op:expr, v2) => {
        impl Request for $t {
            const OPCODE: u16 = $op;
            const VERSION: u16 = ABI_VERSION_2;
            fn header(&self) -> &RequestHeader {
                &self.header
            }
            fn header_mut(&mut self) -> &mut RequestHeader {
                &mut self.header
            }
        }
    };
    ($t:ty, $op:expr, v2 base) => {
        impl Request for $t {
            const OPCODE: u16 = $op;
            const VERSION: u16 = ABI_VERSION_2;
            fn header(&self) -> &RequestHeader {
                &self.base.header
            }
            fn header_mut(&mut self) -> &mut RequestHeader {
                &mut self.base.header
            }
        }
    };
}

request!(QueryPlatform, opcode::QUERY_PLATFORM);
request!(QueryResources, opcode::QUERY_RESOURCES);
request!(Connect, opcode::CONNECT);
request!(Disconnect, opcode::DISCONNECT);
request!(QueryRoute, opcode::QUERY_ROUTE);
request!(ConnectEx, opcode::CONNECT_EX);
request!(DisconnectEx, opcode::DISCONNECT_EX);
request!(QueryMessages, opcode::QUERY_MESSAGES);
request!(QueryPlatformV2, opcode::QUERY_PLATFORM, v2 base);
request!(QueryResourcesV2, opcode::QUERY_RESOURCES, v2 base);
request!(QueryRouteV2, opcode::QUERY_ROUTE, v2 base);
request!(QueryMessagesV2, opcode::QUERY_MESSAGES, v2 base);
request!(Retarget, opcode::RETARGET, v2);
request!(SetApicModel, opcode::SET_APIC_MODEL, v2);

/// The request block: as large as the largest request, 8-byte aligned.
#[repr(C, align(8))]
struct Block([u8; MAX_REQUEST_SIZE]);

const _: () = assert!(core::mem::align_of::<Block>() as u64 >= BLOCK_ALIGN);

static BLOCK: SpinLock<Block> = SpinLock::new(Block([0; MAX_REQUEST_SIZE]));

const UNKNOWN: u8 = 0;
const PRESENT: u8 = 1;
const ABSENT: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// Typed requests sent since boot (the doorbell rung by [`call`]).
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Typed requests sent since boot: a test that must prove the host was not
/// asked compares it before and after.
pub fn requests() -> u64 {
    REQUESTS.load(Ordering::Acquire)
}

/// What a 32-bit read of the doorbell port returns.
pub fn doorbell_read() -> u32 {
    // SAFETY: the doorbell port (or nothing, reading all ones); a read has
    // no memory effects.
    unsafe { crate::cpu::inl(PV_DOORBELL_PORT) }
}

/// True when the PV device answers with its signature (probed once).
pub fn present() -> bool {
    match STATE.load(Ordering::Acquire) {
        PRESENT => true,
        ABSENT => false,
        _ => {
            let found = doorbell_read() == PV_DOORBELL_SIGNATURE;
            STATE.store(if found { PRESENT } else { ABSENT }, Ordering::Release);
            found
        }
    }
}

/// Rings the doorbell with the address of `block`.
///
/// The `out` is not `nomem`: the compiler must finish writing the block
/// before it and may not read the answer early.
fn ring(block: &mut Block) {
    let gpa = block.0.as_mut_ptr() as u64;
    // The image lives below 4 GiB (linked at 1 MiB, identity-mapped).
    let value = u32::try_from(gpa).unwrap_or(u32::MAX);
    // SAFETY: the doorbell makes the VMM read and write the block we own
    // (and hold locked) and nothing else; the asm is not `nomem`, so every
    // write to the block happens before it and every read after it.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") PV_DOORBELL_PORT, in("eax") value,
                         options(nostack, preserves_flags))
    }
}

/// Rings the doorbell with `value` exactly as given, serialised with every
/// other request: the hostile tests' transport for blocks the typed path
/// cannot express (misaligned, straddling the end of RAM, outside RAM,
/// malformed headers). Returns at once when the PV device is absent.
///
/// # Safety
/// The VMM may answer a readable block at `value`, writing inside
/// `value .. value + MAX_REQUEST_SIZE`: that memory must be the caller's to
/// lose (no live reference to it is used across the call, nothing else of
/// the kernel lives there). Callers read the answer through raw pointers;
/// the `out` is not `nomem`, so the compiler keeps memory accesses on their
/// side of it.
pub unsafe fn ring_raw(value: u32) {
    if !present() {
        return;
    }
    let _serialised = BLOCK.lock_irqsave();
    // SAFETY: the caller vouches for the memory at `value`; the doorbell
    // has no other effect on guest memory.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") PV_DOORBELL_PORT, in("eax") value,
                         options(nostack, preserves_flags))
    }
}

/// Sends `req` (header already filled, e.g. by [`Request::blank`]) and
/// copies the answer back into it. Returns the answer's status, or
/// `STATUS_NO_ANSWER` when the PV device is absent or did not answer.
pub fn call<T: Request>(req: &mut T) -> NtStatus {
    if !present() {
        return STATUS_NO_ANSWER;
    }
    req.header_mut().status = STATUS_NO_ANSWER;
    let size = core::mem::size_of::<T>();
    let mut block = BLOCK.lock_irqsave();
    let Some(bytes) = block.0.get_mut(..size) else {
        return STATUS_NO_ANSWER;
    };
    bytes.copy_from_slice(req.as_bytes());
    REQUESTS.fetch_add(1, Ordering::AcqRel);
    ring(&mut block);
    if let Some(bytes) = block.0.get(..size) {
        req.as_mut_bytes().copy_from_slice(bytes);
    }
    req.header().status
}

/// Sends `req` and returns it answered, or the failure status.
fn ask<T: Request>(mut req: T) -> Result<T, NtStatus> {
    match call(&mut req) {
        STATUS_SUCCESS => Ok(req),
        status => Err(status),
    }
}

/// QUERY_PLATFORM.
pub fn query_platform() -> Result<QueryPlatform, NtStatus> {
    ask(QueryPlatform::blank())
}

/// QUERY_PLATFORM, version 2 (with the processor groups).
pub fn query_platform_v2() -> Result<QueryPlatformV2, NtStatus> {
    ask(QueryPlatformV2::blank())
}

/// QUERY_RESOURCES, version 2 (each resource's group), of `device_id`.
pub fn query_resources_v2(device_id: u32) -> Result<QueryResourcesV2, NtStatus> {
    let mut req = QueryResourcesV2::blank();
    req.base.device_id = device_id;
    ask(req)
}

/// QUERY_ROUTE, version 2 (the destination's group and APIC destination),
/// of IOAPIC pin `pin`.
pub fn query_route_v2(pin: u32) -> Result<QueryRouteV2, NtStatus> {
    let mut req = QueryRouteV2::blank();
    req.base.pin = pin;
    ask(req)
}

/// RETARGET with `req`'s inputs: the answered block and its status.
pub fn retarget(mut req: Retarget) -> (NtStatus, Retarget) {
    let status = call(&mut req);
    (status, req)
}

/// SET_APIC_MODEL: the guest's logical destination model
/// (`irqconnect_abi::pv::apic_model`).
pub fn set_apic_model(model: u8) -> NtStatus {
    let mut req = SetApicModel::blank();
    req.model = model;
    call(&mut req)
}

/// QUERY_RESOURCES of device `device_id`.
pub fn query_resources(device_id: u32) -> Result<QueryResources, NtStatus> {
    let mut req = QueryResources::blank();
    req.device_id = device_id;
    ask(req)
}

/// QUERY_ROUTE of IOAPIC pin `pin`.
pub fn query_route(pin: u32) -> Result<QueryRoute, NtStatus> {
    let mut req = QueryRoute::blank();
    req.pin = pin;
    ask(req)
}

/// CONNECT with `req`'s inputs: the answered block (handle, effective mask)
/// on success.
pub fn connect(req: Connect) -> Result<Connect, NtStatus> {
    ask(req)
}

/// DISCONNECT of host handle `handle`.
pub fn disconnect(handle: u64) -> NtStatus {
    let mut req = Disconnect::blank();
    req.handle = handle;
    call(&mut req)
}

/// QUERY_MESSAGES of device `device_id`.
pub fn query_messages(device_id: u32) -> Result<QueryMessages, NtStatus> {
    let mut req = QueryMessages::blank();
    req.device_id = device_id;
    ask(req)
}

/// CONNECT_EX with `req`'s inputs: the answered block and its status (a
/// refusal's block carries `message_table_required`).
pub fn connect_ex(mut req: ConnectEx) -> (NtStatus, ConnectEx) {
    let status = call(&mut req);
    (status, req)
}

/// DISCONNECT_EX of host handle `handle`, naming the connect's
/// `version_used` as `version`.
pub fn disconnect_ex(version: u32, handle: u64) -> NtStatus {
    let mut req = DisconnectEx::blank();
    req.version = version;
    req.handle = handle;
    call(&mut req)
}

/// A CONNECT block with the header set and every input zero.
pub fn connect_block() -> Connect {
    Connect::blank()
}
