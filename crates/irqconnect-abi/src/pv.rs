//! The paravirtual connect interface: request blocks, opcodes and their rules.
//!
//! A request is a block of guest memory that starts with a [`RequestHeader`].
//! The guest fills the header and the opcode's input fields, zeroes everything
//! else, and writes the block's guest-physical address to
//! [`crate::layout::PV_DOORBELL_PORT`] with a 32-bit `out`. Before the vCPU
//! resumes, the VMM writes the answer into the same block: `status` in the
//! header, and the opcode's output fields. Input fields are never modified.
//!
//! A block must be 8-byte aligned, lie wholly in guest RAM, have
//! `length == ` the opcode's size for the block's `abi_version`, and have every
//! `reserved` field zero. A block the VMM cannot read at all gets no answer; a
//! readable but malformed one gets its defined status and changes nothing.
//!
//! Versioning: each opcode's layout for a version is fixed. A later version
//! may only append fields, so `length` tells which layout the guest used and
//! the VMM answers a version it knows with that version's layout. Version 2
//! appends processor groups and the route's APIC destination to
//! QUERY_PLATFORM, QUERY_RESOURCES, QUERY_ROUTE and QUERY_MESSAGES
//! ([`QueryPlatformV2`], [`QueryResourcesV2`], [`QueryRouteV2`],
//! [`QueryMessagesV2`]) and adds two opcodes, RETARGET ([`Retarget`]) and
//! SET_APIC_MODEL ([`SetApicModel`]); every other opcode has the same
//! layout in both versions.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `RequestHeader::magic`: `"IRQP"` in little-endian byte order.
pub const PV_MAGIC: u32 = u32::from_le_bytes(*b"IRQP");
/// The first ABI version: processor group 0 only.
pub const ABI_VERSION_1: u16 = 1;
/// ABI version 2: processor groups, RETARGET and SET_APIC_MODEL.
pub const ABI_VERSION_2: u16 = 2;
/// Highest ABI version the VMM implements.
pub const ABI_VERSION_MAX: u16 = ABI_VERSION_2;
/// Required alignment of a request block's guest-physical address.
pub const BLOCK_ALIGN: u64 = 8;

/// Opcodes of [`RequestHeader::opcode`].
pub mod opcode {
    /// [`super::QueryPlatform`]: processors, limits, conventions.
    pub const QUERY_PLATFORM: u16 = 1;
    /// [`super::QueryResources`]: a device's translated interrupt resources.
    pub const QUERY_RESOURCES: u16 = 2;
    /// [`super::Connect`]: IoConnectInterrupt.
    pub const CONNECT: u16 = 3;
    /// [`super::Disconnect`]: IoDisconnectInterrupt.
    pub const DISCONNECT: u16 = 4;
    /// [`super::QueryRoute`]: how a pin is programmed (introspection for tests).
    pub const QUERY_ROUTE: u16 = 5;
    /// [`super::ConnectEx`]: IoConnectInterruptEx, every version.
    pub const CONNECT_EX: u16 = 6;
    /// [`super::DisconnectEx`]: IoDisconnectInterruptEx.
    pub const DISCONNECT_EX: u16 = 7;
    /// [`super::QueryMessages`]: a device's message-signaled interrupts.
    pub const QUERY_MESSAGES: u16 = 8;
    /// [`super::Retarget`] (version 2): moves a live connection to other
    /// processors of its group.
    pub const RETARGET: u16 = 9;
    /// [`super::SetApicModel`] (version 2): the guest says how its local
    /// APICs decode logical destinations.
    pub const SET_APIC_MODEL: u16 = 10;

    /// The opcode's constant name (`"CONNECT"`), or `"unknown opcode"`.
    pub const fn name(op: u16) -> &'static str {
        match op {
            QUERY_PLATFORM => "QUERY_PLATFORM",
            QUERY_RESOURCES => "QUERY_RESOURCES",
            CONNECT => "CONNECT",
            DISCONNECT => "DISCONNECT",
            QUERY_ROUTE => "QUERY_ROUTE",
            CONNECT_EX => "CONNECT_EX",
            DISCONNECT_EX => "DISCONNECT_EX",
            QUERY_MESSAGES => "QUERY_MESSAGES",
            RETARGET => "RETARGET",
            SET_APIC_MODEL => "SET_APIC_MODEL",
            _ => "unknown opcode",
        }
    }
}

/// The 16 bytes every request block starts with.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct RequestHeader {
    /// Must be [`PV_MAGIC`].
    pub magic: u32,
    /// The ABI version whose layout the block uses ([`ABI_VERSION_1`] or
    /// [`ABI_VERSION_2`]; [`request_size`] gives each opcode's size).
    pub abi_version: u16,
    /// One of [`opcode`].
    pub opcode: u16,
    /// Size in bytes of the whole block, header included.
    pub length: u32,
    /// Output: the NTSTATUS of the request. The guest should preset it to a
    /// value the VMM never writes (e.g. `u32::MAX`) to detect "no answer".
    pub status: u32,
}

impl RequestHeader {
    /// A header for `opcode` with the layout of `T`, version 1, status preset
    /// to [`STATUS_NO_ANSWER`].
    pub const fn new<T>(opcode: u16) -> Self {
        Self::versioned::<T>(ABI_VERSION_1, opcode)
    }

    /// A header for `opcode` with the layout of `T` in ABI `version`,
    /// status preset to [`STATUS_NO_ANSWER`].
    pub const fn versioned<T>(version: u16, opcode: u16) -> Self {
        Self {
            magic: PV_MAGIC,
            abi_version: version,
            opcode,
            length: core::mem::size_of::<T>() as u32,
            status: STATUS_NO_ANSWER,
        }
    }
}

/// `HIGH_LEVEL`: the highest IRQL on x64 (CR8 holds 4 bits). A
/// `SynchronizeIrql` above it cannot be loaded into CR8 and is refused.
pub const HIGH_LEVEL: u8 = 15;

/// A status value the VMM never writes: guests preset `status` with it.
pub const STATUS_NO_ANSWER: u32 = 0xffff_ffff;

/// `KINTERRUPT_MODE` values (wdm.h): `LevelSensitive` = 0, `Latched` = 1.
pub mod interrupt_mode {
    /// The device holds its line until serviced.
    pub const LEVEL_SENSITIVE: u8 = 0;
    /// The device signals with an edge.
    pub const LATCHED: u8 = 1;
}

/// The irqchip mode the VMM runs, as reported by [`QueryPlatform::irqchip_mode`].
pub mod irqchip_mode {
    /// KVM's in-kernel IOAPIC and LAPICs.
    pub const KERNEL: u8 = 0;
    /// Our IOAPIC, KVM's LAPICs.
    pub const SPLIT: u8 = 1;
    /// Our IOAPIC and our LAPICs.
    pub const USER: u8 = 2;
}

/// Bits of [`QueryPlatform::flags`].
pub mod platform_flags {
    /// The vCPUs offer x2APIC in CPUID.
    pub const X2APIC: u32 = 1 << 0;
    /// Logical-destination convention: flat model, LDR = 1 << processor index
    /// (xAPIC), or the architectural x2APIC cluster LDR (x2APIC).
    pub const LOGICAL_FLAT_BY_INDEX: u32 = 1 << 1;
    /// Routes carry 15-bit destinations: bits 8..14 in IOAPIC entry bits
    /// 49..55 and in MSI address bits 5..11, the extended destination ID
    /// the vCPUs' KVM CPUID leaf offers (`KVM_FEATURE_MSI_EXT_DEST_ID`).
    /// Clear: 8-bit destinations.
    pub const MSI_EXT_DEST_ID: u32 = 1 << 2;
}

/// How the guest's local APICs decode logical destinations
/// ([`SetApicModel::model`], [`PlatformGroups::apic_model`]). The host
/// cannot read the LAPIC registers of every irqchip mode, so it routes by
/// what the guest declared; until then by [`apic_model::UNDECLARED`].
pub mod apic_model {
    /// Nothing declared: a logical destination is used only where the
    /// xAPIC flat reading (LDR = 1 << index) and the x2APIC cluster reading
    /// name the same processors (processors 0..7 with APIC ID = index).
    pub const UNDECLARED: u8 = 0;
    /// Every processor runs its local APIC in x2APIC mode: its LDR is
    /// derived from its x2APIC ID (cluster = ID >> 4, member bit = ID & 15).
    pub const X2APIC: u8 = 1;
    /// xAPIC, flat model (DFR all ones): processor `i < 8` has
    /// LDR = 1 << `i`, the others LDR 0.
    pub const XAPIC_FLAT: u8 = 2;
    /// xAPIC, cluster model (DFR 0x0FFFFFFF): processor `i < 60` has
    /// LDR = (`i` / 4) << 4 | 1 << (`i` % 4), the others LDR 0.
    pub const XAPIC_CLUSTER: u8 = 3;
    /// Physical destinations only (the guest uses its LDRs otherwise).
    pub const PHYSICAL: u8 = 4;
}

/// Size of [`QueryPlatform::apic_ids`].
pub const PLATFORM_MAX_CPUS: usize = 256;
/// Processors in a processor group: the bits of a `KAFFINITY`. Processor
/// `64 * g + b` is bit `b` of group `g` (`GROUP_AFFINITY`).
pub const GROUP_SIZE: usize = 64;
/// Most processor groups a platform has.
pub const MAX_GROUPS: usize = PLATFORM_MAX_CPUS / GROUP_SIZE;

/// `QUERY_PLATFORM`: no inputs; the VMM fills every other field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryPlatform {
    /// Common header.
    pub header: RequestHeader,
    /// Output: highest ABI version the VMM implements.
    pub abi_version_max: u16,
    /// Output: one of [`irqchip_mode`].
    pub irqchip_mode: u8,
    /// Must be zero.
    pub reserved0: u8,
    /// Output: [`platform_flags`].
    pub flags: u32,
    /// Output: number of processors.
    pub cpu_count: u32,
    /// Output: number of devices with interrupt resources.
    pub device_count: u32,
    /// Output: processors a KAFFINITY mask can name that are online.
    pub online_mask: u64,
    /// Output: lowest device vector.
    pub vector_min: u8,
    /// Output: highest device vector.
    pub vector_max: u8,
    /// Must be zero.
    pub reserved1: u16,
    /// Output: the VM-wide quota of interrupt objects.
    pub object_quota: u32,
    /// Output: interrupt objects currently in use.
    pub objects_in_use: u32,
    /// Output: live connections.
    pub connections: u32,
    /// Output: consecutive unclaimed re-deliveries after which the host masks
    /// a level pin (the storm guard).
    pub storm_threshold: u32,
    /// Output: pins the storm guard has masked since boot.
    pub storm_masked_pins: u32,
    /// Output: APIC ID of processor `i` at index `i` (`cpu_count` entries).
    pub apic_ids: [u32; PLATFORM_MAX_CPUS],
}

/// What version 2 appends to QUERY_PLATFORM: the processor groups and how
/// routes address processors.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PlatformGroups {
    /// Output: processor groups (`KeQueryActiveGroupCount`): the processors
    /// in groups of [`GROUP_SIZE`], the last one possibly partial.
    pub group_count: u16,
    /// Output: the [`apic_model`] routes follow (the guest's declaration).
    pub apic_model: u8,
    /// Output: destination bits a route carries: 8, or 15 with
    /// [`platform_flags::MSI_EXT_DEST_ID`].
    pub destination_bits: u8,
    /// Must be zero.
    pub reserved2: u32,
    /// Output: processors in group `g` (`KeQueryActiveProcessorCountEx`);
    /// 0 past `group_count`.
    pub group_sizes: [u32; MAX_GROUPS],
    /// Output: online processors of group `g` (bit `b` = processor
    /// `64 * g + b`).
    pub group_online: [u64; MAX_GROUPS],
}

/// `QUERY_PLATFORM`, version 2: version 1's block and [`PlatformGroups`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryPlatformV2 {
    /// Version 1's fields (`online_mask` is group 0's).
    pub base: QueryPlatform,
    /// The groups.
    pub groups: PlatformGroups,
}

/// Share dispositions (`CM_SHARE_DISPOSITION`).
pub mod share {
    /// `CmResourceShareDeviceExclusive`.
    pub const DEVICE_EXCLUSIVE: u8 = 1;
    /// `CmResourceShareShared`.
    pub const SHARED: u8 = 3;
}

/// `CmResourceTypeInterrupt`.
pub const RESOURCE_TYPE_INTERRUPT: u8 = 2;
/// `CM_RESOURCE_INTERRUPT_LATCHED` in [`InterruptResource::flags`]
/// (clear: `CM_RESOURCE_INTERRUPT_LEVEL_SENSITIVE`).
pub const RESOURCE_FLAG_LATCHED: u16 = 1;

/// A translated interrupt resource: the analogue of a
/// `CM_PARTIAL_RESOURCE_DESCRIPTOR` of type `CmResourceTypeInterrupt`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct InterruptResource {
    /// [`RESOURCE_TYPE_INTERRUPT`].
    pub kind: u8,
    /// One of [`share`].
    pub share_disposition: u8,
    /// [`RESOURCE_FLAG_LATCHED`] or 0 (level-sensitive).
    pub flags: u16,
    /// `u.Interrupt.Level`: the DIRQL (vector >> 4).
    pub level: u32,
    /// `u.Interrupt.Vector`: the IDT vector.
    pub vector: u32,
    /// The raw resource: the IOAPIC pin the device drives.
    pub line: u32,
    /// `u.Interrupt.Affinity`: the processors the device may interrupt.
    pub affinity: u64,
}

/// Most interrupt resources one device has.
pub const MAX_RESOURCES: usize = 4;

/// `QUERY_RESOURCES`: the device's translated interrupt resources.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryResources {
    /// Common header.
    pub header: RequestHeader,
    /// Input: the device (0-based).
    pub device_id: u32,
    /// Output: valid entries of `resources`.
    pub count: u32,
    /// Output: the resources.
    pub resources: [InterruptResource; MAX_RESOURCES],
}

/// `QUERY_RESOURCES`, version 2: each resource's affinity with its group,
/// as a `GROUP_AFFINITY` (version 1 reports group 0's resources' masks
/// without saying so).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryResourcesV2 {
    /// Version 1's fields.
    pub base: QueryResources,
    /// Output: the processor group of `base.resources[i].affinity`.
    pub groups: [u16; MAX_RESOURCES],
}

/// `CONNECT`: IoConnectInterrupt's parameters plus the device, as
/// IoConnectInterruptEx's PDO names it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Connect {
    /// Common header.
    pub header: RequestHeader,
    /// Input: the device whose resource is connected.
    pub device_id: u32,
    /// Input: `Vector`.
    pub vector: u32,
    /// Input: `Irql`.
    pub irql: u8,
    /// Input: `SynchronizeIrql`.
    pub synchronize_irql: u8,
    /// Input: `InterruptMode`, one of [`interrupt_mode`].
    pub interrupt_mode: u8,
    /// Input: `ShareVector` (0 or 1).
    pub share_vector: u8,
    /// Input: `FloatingSave` (0 or 1).
    pub floating_save: u8,
    /// Must be zero.
    pub reserved0: [u8; 3],
    /// Input: `ProcessorEnableMask` (KAFFINITY).
    pub processor_enable_mask: u64,
    /// Input: `ServiceRoutine`, a guest address.
    pub service_routine: u64,
    /// Input: `ServiceContext`, a guest-physical address or 0.
    pub service_context: u64,
    /// Input: `SpinLock`, a guest-physical address or 0.
    pub spin_lock: u64,
    /// Output: the connection's handle (never 0 on success).
    pub handle: u64,
    /// Output: the effective mask (processors that got an interrupt object).
    pub effective_mask: u64,
}

/// `DISCONNECT`: IoDisconnectInterrupt.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Disconnect {
    /// Common header.
    pub header: RequestHeader,
    /// Input: a handle [`Connect`] returned.
    pub handle: u64,
}

/// `IO_CONNECT_INTERRUPT_PARAMETERS.Version` values (wdm.h).
pub mod connect_version {
    /// Connect one interrupt resource given in full, processor group 0
    /// (the classic IoConnectInterrupt's parameters).
    pub const FULLY_SPECIFIED: u32 = 1;
    /// Connect every line-based interrupt resource of the device.
    pub const LINE_BASED: u32 = 2;
    /// Connect every message-signaled interrupt of the device; with a
    /// fallback routine, its line-based ones when it has no messages.
    pub const MESSAGE_BASED: u32 = 3;
    /// FULLY_SPECIFIED with a processor group ([`super::ConnectEx::group`]).
    pub const FULLY_SPECIFIED_GROUP: u32 = 4;
}

/// `KINTERRUPT_POLARITY` values of a message table entry.
pub mod polarity {
    /// `InterruptActiveHigh` / `InterruptRisingEdge`: how messages signal.
    pub const ACTIVE_HIGH: u8 = 1;
}

/// Kinds of message-signaled interrupt ([`QueryMessages::kind`]).
pub mod message_kind {
    /// The device has no message-signaled interrupts.
    pub const NONE: u8 = 0;
    /// MSI: one address for every message, data = base data + message number.
    pub const MSI: u8 = 1;
    /// MSI-X: an address, data and mask bit per message.
    pub const MSIX: u8 = 2;
}

/// `IRQ_DEVICE_POLICY` values (wdm.h): how the host picks the processors
/// of each message ([`QueryMessages::policy`]).
pub mod irq_policy {
    /// No particular assignment: every processor the resource allows.
    pub const MACHINE_DEFAULT: u8 = 0;
    /// Processors close to the device: without NUMA, every processor.
    pub const ALL_CLOSE_PROCESSORS: u8 = 1;
    /// One processor close to the device: without NUMA, any one.
    pub const ONE_CLOSE_PROCESSOR: u8 = 2;
    /// Every processor of the machine.
    pub const ALL_PROCESSORS_IN_MACHINE: u8 = 3;
    /// The processors of the resource's affinity.
    pub const SPECIFIED_PROCESSORS: u8 = 4;
    /// Different messages to different processors, where possible.
    pub const SPREAD_MESSAGES_ACROSS_ALL_PROCESSORS: u8 = 5;
}

/// Most message-signaled interrupts one device has.
pub const MAX_MESSAGES: usize = 64;

/// `CONNECT_EX`: IoConnectInterruptEx. Which inputs count depends on
/// `version` ([`connect_version`]); inputs a version does not use must be
/// zero. The answer's `version_used` says what was connected (a
/// MESSAGE_BASED request on a device without messages falls back to
/// LINE_BASED).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ConnectEx {
    /// Common header.
    pub header: RequestHeader,
    /// Input: `Parameters->Version`, one of [`connect_version`].
    pub version: u32,
    /// Input: the device (`PhysicalDeviceObject`).
    pub device_id: u32,
    /// Input (FULLY_SPECIFIED): `Vector`.
    pub vector: u32,
    /// Input (FULLY_SPECIFIED): `Irql`.
    pub irql: u8,
    /// Input: `SynchronizeIrql` (ignored by LINE_BASED and MESSAGE_BASED
    /// when `spin_lock` is 0).
    pub synchronize_irql: u8,
    /// Input (FULLY_SPECIFIED): `InterruptMode`, one of [`interrupt_mode`].
    pub interrupt_mode: u8,
    /// Input (FULLY_SPECIFIED): `ShareVector` (0 or 1).
    pub share_vector: u8,
    /// Input: `FloatingSave` (0 or 1).
    pub floating_save: u8,
    /// Must be zero.
    pub reserved0: u8,
    /// Input (FULLY_SPECIFIED_GROUP): the processor group of
    /// `processor_enable_mask`.
    pub group: u16,
    /// Input (MESSAGE_BASED): the message table buffer's length in bytes.
    pub message_table_length: u32,
    /// Input: FULLY_SPECIFIED: `ProcessorEnableMask`; LINE_BASED and
    /// MESSAGE_BASED: 0, or processors to keep the device's interrupts
    /// within (a host extension).
    pub processor_enable_mask: u64,
    /// Input: `ServiceRoutine` (FULLY_SPECIFIED, LINE_BASED) or
    /// `MessageServiceRoutine` (MESSAGE_BASED), a guest address.
    pub service_routine: u64,
    /// Input (MESSAGE_BASED): `FallBackServiceRoutine`, or 0.
    pub fallback_service_routine: u64,
    /// Input: `ServiceContext`, a guest-physical address or 0.
    pub service_context: u64,
    /// Input: `SpinLock`, a guest-physical address or 0.
    pub spin_lock: u64,
    /// Input (MESSAGE_BASED): guest-physical address of the buffer that
    /// receives the message table ([`MessageTableHeader`] then
    /// [`MessageInfoEntry`] per message), 8-byte aligned.
    pub message_table: u64,
    /// Output: the version that was connected. The outputs, from here to
    /// the end of the block, are written in one piece: `reserved1`, checked
    /// zero on input, is written back as zero.
    pub version_used: u32,
    /// Output (MESSAGE_BASED): the bytes the table takes; with
    /// `STATUS_BUFFER_TOO_SMALL`, how large the buffer must be.
    pub message_table_required: u32,
    /// Output: the connection's handle, for DISCONNECT_EX (never 0 on
    /// success).
    pub handle: u64,
    /// Output: processors that got an interrupt object (the union over
    /// every line or message connected).
    pub effective_mask: u64,
    /// Output: the IRQL the service routine runs at for every interrupt of
    /// the connection (`UnifiedIrql`).
    pub unified_irql: u8,
    /// Must be zero.
    pub reserved1: [u8; 3],
    /// Output: line resources or messages connected.
    pub count: u32,
}

impl ConnectEx {
    /// A CONNECT_EX block of `version` for `device_id` with
    /// `service_routine`: its header set, every other field 0.
    pub fn request(version: u32, device_id: u32, service_routine: u64) -> Self {
        let mut block = <Self as zerocopy::FromZeros>::new_zeroed();
        block.header = RequestHeader::new::<Self>(opcode::CONNECT_EX);
        block.version = version;
        block.device_id = device_id;
        block.service_routine = service_routine;
        block
    }
}

/// The head of a MESSAGE_BASED connection's message table
/// (`IO_INTERRUPT_MESSAGE_INFO`), written at [`ConnectEx::message_table`].
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MessageTableHeader {
    /// `UnifiedIrql`: the IRQL every message's service routine runs at.
    pub unified_irql: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// `MessageCount`: the entries that follow.
    pub message_count: u32,
}

/// One message of a connection (`IO_INTERRUPT_MESSAGE_INFO_ENTRY`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MessageInfoEntry {
    /// `MessageAddress`: where the device writes to signal the message.
    pub message_address: u64,
    /// `TargetProcessorSet`: the processors the message is delivered to,
    /// exactly (the route's effective set).
    pub target_processor_set: u64,
    /// `MessageData`: the value the device writes.
    pub message_data: u32,
    /// `Vector`: the message's own IDT vector.
    pub vector: u32,
    /// `Irql`: the message's DIRQL (`vector >> 4`).
    pub irql: u8,
    /// `Mode`: always [`interrupt_mode::LATCHED`].
    pub mode: u8,
    /// `Polarity`: [`polarity::ACTIVE_HIGH`].
    pub polarity: u8,
    /// Zero.
    pub reserved0: u8,
    /// The message number (its index in the table).
    pub message_id: u32,
    /// The processor group of `target_processor_set`.
    pub group: u16,
    /// Zero.
    pub reserved1: [u8; 6],
}

/// Bytes a message table of `count` messages takes.
pub const fn message_table_size(count: usize) -> usize {
    core::mem::size_of::<MessageTableHeader>() + count * core::mem::size_of::<MessageInfoEntry>()
}

/// `DISCONNECT_EX`: IoDisconnectInterruptEx.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DisconnectEx {
    /// Common header.
    pub header: RequestHeader,
    /// Input: the `version_used` CONNECT_EX answered with.
    pub version: u32,
    /// Must be zero.
    pub reserved0: u32,
    /// Input: the handle CONNECT_EX answered with.
    pub handle: u64,
}

/// `QUERY_MESSAGES`: a device's message-signaled interrupts, as the PnP
/// manager assigned them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryMessages {
    /// Common header.
    pub header: RequestHeader,
    /// Input: the device.
    pub device_id: u32,
    /// Output: its messages (0: none).
    pub message_count: u32,
    /// Output: [`message_kind`].
    pub kind: u8,
    /// Output: [`irq_policy`].
    pub policy: u8,
    /// Output: the IRQL (priority class) the messages' vectors are in.
    pub irql: u8,
    /// Output: the first message's vector (the others follow it).
    pub first_vector: u8,
    /// Output: the message-signaled test device of this device
    /// ([`crate::msidev`]), or `u32::MAX` when it has none.
    pub test_device: u32,
    /// Output: the processors the resource allows (its affinity).
    pub affinity: u64,
    /// Output: the bytes a CONNECT_EX message table needs
    /// ([`message_table_size`]).
    pub table_size: u32,
    /// Must be zero.
    pub reserved0: u32,
}

/// `QUERY_MESSAGES`, version 2: the group of the messages' affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryMessagesV2 {
    /// Version 1's fields.
    pub base: QueryMessages,
    /// Output: the processor group of `base.affinity`.
    pub group: u16,
    /// Must be zero.
    pub reserved1: [u8; 6],
}

/// Values of [`QueryRoute::trigger`].
pub mod trigger {
    /// Edge-triggered.
    pub const EDGE: u8 = 0;
    /// Level-triggered.
    pub const LEVEL: u8 = 1;
}

/// `QUERY_ROUTE`: how the host has programmed a pin.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryRoute {
    /// Common header.
    pub header: RequestHeader,
    /// Input: the IOAPIC pin.
    pub pin: u32,
    /// Output: 1 when the pin is masked.
    pub masked: u8,
    /// Output: one of [`trigger`].
    pub trigger: u8,
    /// Output: the vector.
    pub vector: u8,
    /// Output: 1 when routed lowest-priority to a set, 0 for fixed.
    pub lowest_priority: u8,
    /// Output: processors the route may deliver to.
    pub destination_mask: u64,
    /// Output: live connections on the pin's vector.
    pub connections: u32,
    /// Must be zero.
    pub reserved0: u32,
}

/// Values of [`QueryRouteV2::destination_mode`].
pub mod route_destination {
    /// The pin is masked or unused: no destination.
    pub const NONE: u8 = 0;
    /// A physical destination: one APIC ID, fixed delivery.
    pub const PHYSICAL: u8 = 1;
    /// A logical destination (the guest's [`super::apic_model`]).
    pub const LOGICAL: u8 = 2;
}

/// `QUERY_ROUTE`, version 2: the destination with its group, and the APIC
/// destination the pin is programmed with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryRouteV2 {
    /// Version 1's fields: `destination_mask` is relative to `group` (in
    /// version 1, group 0's processors only).
    pub base: QueryRoute,
    /// Output: the processor group of `base.destination_mask`.
    pub group: u16,
    /// Output: one of [`route_destination`].
    pub destination_mode: u8,
    /// Must be zero.
    pub reserved1: u8,
    /// Output: the destination ID programmed (a logical destination or an
    /// APIC ID; 8 or 15 bits, [`PlatformGroups::destination_bits`]).
    pub apic_destination: u32,
}

/// `RETARGET` (version 2): moves a live connection to other processors of
/// its group, as Hyper-V's `HvCallRetargetDeviceInterrupt` moves a device
/// interrupt (a host extension: Windows drivers have no such call). The
/// checks, their order and the guarantees are `docs/semantics.md`'s
/// "RETARGET".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Retarget {
    /// Common header.
    pub header: RequestHeader,
    /// Input: a handle CONNECT or CONNECT_EX answered (a connection, or a
    /// LINE_BASED or MESSAGE_BASED group).
    pub handle: u64,
    /// Input: the processor group of `processor_mask`: the connection's.
    pub group: u16,
    /// Input: must be zero (no flag is defined).
    pub flags: u16,
    /// Input (MESSAGE_BASED): the message table buffer's length.
    pub message_table_length: u32,
    /// Input: the new processors (bit `b` = processor `64 * group + b`).
    pub processor_mask: u64,
    /// Input (MESSAGE_BASED): the connection's message table buffer, which
    /// the host rewrites with the new addresses, data and target sets;
    /// 0 for other connections.
    pub message_table: u64,
    /// Output: processors holding an interrupt object now, which is where
    /// the connection's interrupts arrive (the union over its lines or
    /// messages).
    pub effective_mask: u64,
    /// Output: lines or messages rerouted.
    pub count: u32,
    /// Must be zero.
    pub reserved0: u32,
}

/// `SET_APIC_MODEL` (version 2): how the guest's local APICs decode
/// logical destinations, so routes can use them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SetApicModel {
    /// Common header.
    pub header: RequestHeader,
    /// Input: one of [`apic_model`].
    pub model: u8,
    /// Must be zero.
    pub reserved0: [u8; 7],
}

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<RequestHeader>() == 16);
    assert!(size_of::<InterruptResource>() == 24);
    assert!(size_of::<QueryPlatform>() == 64 + 4 * PLATFORM_MAX_CPUS);
    assert!(size_of::<QueryResources>() == 24 + 24 * MAX_RESOURCES);
    assert!(size_of::<Connect>() == 80);
    assert!(size_of::<Disconnect>() == 24);
    assert!(size_of::<QueryRoute>() == 40);
    assert!(size_of::<ConnectEx>() == 120);
    assert!(size_of::<DisconnectEx>() == 32);
    assert!(size_of::<QueryMessages>() == 48);
    assert!(size_of::<MessageTableHeader>() == 8);
    assert!(size_of::<MessageInfoEntry>() == 40);
    assert!(size_of::<PlatformGroups>() == 56);
    assert!(size_of::<QueryPlatformV2>() == size_of::<QueryPlatform>() + 56);
    assert!(size_of::<QueryResourcesV2>() == size_of::<QueryResources>() + 8);
    assert!(size_of::<QueryRouteV2>() == size_of::<QueryRoute>() + 8);
    assert!(size_of::<QueryMessagesV2>() == size_of::<QueryMessages>() + 8);
    assert!(size_of::<Retarget>() == 64);
    assert!(size_of::<SetApicModel>() == 24);
    assert!(MAX_GROUPS * GROUP_SIZE == PLATFORM_MAX_CPUS);
    assert!(align_of::<Connect>() as u64 <= BLOCK_ALIGN);
    assert!(align_of::<QueryPlatformV2>() as u64 <= BLOCK_ALIGN);
};

/// The block size of `opcode` in ABI version `version`, or `None` when the
/// pair is not defined.
pub const fn request_size(version: u16, opcode: u16) -> Option<usize> {
    use core::mem::size_of;
    let v2 = match version {
        ABI_VERSION_1 => false,
        ABI_VERSION_2 => true,
        _ => return None,
    };
    match opcode {
        opcode::QUERY_PLATFORM if v2 => Some(size_of::<QueryPlatformV2>()),
        opcode::QUERY_PLATFORM => Some(size_of::<QueryPlatform>()),
        opcode::QUERY_RESOURCES if v2 => Some(size_of::<QueryResourcesV2>()),
        opcode::QUERY_RESOURCES => Some(size_of::<QueryResources>()),
        opcode::CONNECT => Some(size_of::<Connect>()),
        opcode::DISCONNECT => Some(size_of::<Disconnect>()),
        opcode::QUERY_ROUTE if v2 => Some(size_of::<QueryRouteV2>()),
        opcode::QUERY_ROUTE => Some(size_of::<QueryRoute>()),
        opcode::CONNECT_EX => Some(size_of::<ConnectEx>()),
        opcode::DISCONNECT_EX => Some(size_of::<DisconnectEx>()),
        opcode::QUERY_MESSAGES if v2 => Some(size_of::<QueryMessagesV2>()),
        opcode::QUERY_MESSAGES => Some(size_of::<QueryMessages>()),
        opcode::RETARGET if v2 => Some(size_of::<Retarget>()),
        opcode::SET_APIC_MODEL if v2 => Some(size_of::<SetApicModel>()),
        _ => None,
    }
}

/// The largest block any known (version, opcode) uses: the most the VMM ever
/// reads for one request.
pub const MAX_REQUEST_SIZE: usize = core::mem::size_of::<QueryPlatformV2>();

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn opcode_name_every_sized_opcode_has_one() {
        for op in 0..=u8::MAX as u16 {
            let known = request_size(ABI_VERSION_MAX, op).is_some();
            assert_eq!(opcode::name(op) != "unknown opcode", known, "opcode {op}");
        }
        assert_eq!(opcode::name(opcode::CONNECT), "CONNECT");
    }

    #[test]
    fn request_size_known_opcodes_match_layouts() {
        assert_eq!(request_size(1, opcode::CONNECT), Some(80));
        assert_eq!(request_size(2, opcode::CONNECT), Some(80));
        assert_eq!(request_size(1, 0), None);
        assert_eq!(request_size(3, opcode::CONNECT), None);
        assert_eq!(request_size(1, opcode::RETARGET), None);
        assert_eq!(request_size(1, opcode::SET_APIC_MODEL), None);
        for (version, last) in [(1, opcode::QUERY_MESSAGES), (2, opcode::SET_APIC_MODEL)] {
            for op in 1..=last {
                let size = request_size(version, op).unwrap_or(0);
                assert!(size > 0 && size <= MAX_REQUEST_SIZE);
                assert_eq!(size % BLOCK_ALIGN as usize, 0);
            }
        }
    }

    /// Version 2 only appends: every version 1 field keeps its offset.
    #[test]
    fn version_2_blocks_append_to_version_1() {
        for op in 1..=opcode::QUERY_MESSAGES {
            let (Some(v1), Some(v2)) = (request_size(1, op), request_size(2, op)) else {
                panic!("opcode {op} missing");
            };
            assert!(v2 >= v1, "opcode {op}");
        }
        assert_eq!(core::mem::offset_of!(QueryPlatformV2, groups), 1088);
        assert_eq!(core::mem::offset_of!(QueryRouteV2, group), 40);
    }

    #[test]
    fn header_new_presets_no_answer() {
        let h = RequestHeader::new::<Connect>(opcode::CONNECT);
        assert_eq!(h.length, 80);
        assert_eq!(h.status, STATUS_NO_ANSWER);
        assert_eq!(h.magic.to_le_bytes(), *b"IRQP");
    }

    #[test]
    fn connect_bytes_roundtrip() {
        let mut c = Connect::new_zeroed();
        c.vector = 0x51;
        c.processor_enable_mask = 0b1010;
        let mut bytes = [0u8; 80];
        bytes.copy_from_slice(c.as_bytes());
        let back = Connect::read_from_bytes(&bytes[..]).unwrap_or_else(|_| Connect::new_zeroed());
        assert_eq!(back, c);
    }
}
