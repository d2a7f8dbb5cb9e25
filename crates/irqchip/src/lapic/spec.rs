//! Architectural constants and register layouts of the local APIC, from the
//! Intel SDM Vol. 3A chapter 11 ("Advanced Programmable Interrupt Controller").
//!
//! Every register offset, MSR number and bit the model uses is named here with
//! the section that defines it. Register layouts are `bitfield-struct` types;
//! the write masks are built from them so that a layout and its mask cannot
//! disagree.

use bitfield_struct::bitfield;

// ---------------------------------------------------------------------------
// MSRs
// ---------------------------------------------------------------------------

/// IA32_APIC_BASE: base address, global enable, x2APIC enable and BSP flag
/// (SDM Vol. 3A 11.4.4, Figure 11-5; 11.12.1 for the x2APIC enable bit).
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE: the absolute TSC value at which the timer fires in
/// TSC-deadline mode (SDM Vol. 3A 11.5.4.1).
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
/// First MSR of the x2APIC register space: MSR = `0x800 + (MMIO offset >> 4)`
/// (SDM Vol. 3A 11.12.1.2, Table 11-6).
pub const X2APIC_MSR_FIRST: u32 = 0x800;
/// Last MSR of the x2APIC register space this model decodes; every MSR of
/// `0x800..=0x8ff` not in Table 11-6 is reserved and faults (SDM Vol. 3A
/// 11.12.1.2).
pub const X2APIC_MSR_LAST: u32 = 0x8ff;

// ---------------------------------------------------------------------------
// xAPIC MMIO register offsets (SDM Vol. 3A 11.4.1, Table 11-1). The x2APIC MSR
// of each is `X2APIC_MSR_FIRST + (offset >> 4)` (Table 11-6).
// ---------------------------------------------------------------------------

/// Local APIC ID register (SDM Vol. 3A 11.4.6).
pub(crate) const REG_ID: u16 = 0x020;
/// Local APIC version register (SDM Vol. 3A 11.4.8).
pub(crate) const REG_VERSION: u16 = 0x030;
/// Task priority register, TPR (SDM Vol. 3A 11.8.3.1).
pub(crate) const REG_TPR: u16 = 0x080;
/// Arbitration priority register, APR; xAPIC only (SDM Vol. 3A 11.6.2.4;
/// absent from Table 11-6).
pub(crate) const REG_APR: u16 = 0x090;
/// Processor priority register, PPR (SDM Vol. 3A 11.8.3.1).
pub(crate) const REG_PPR: u16 = 0x0a0;
/// End-of-interrupt register, write-only (SDM Vol. 3A 11.8.5).
pub(crate) const REG_EOI: u16 = 0x0b0;
/// Logical destination register, LDR (SDM Vol. 3A 11.6.2.2; read-only in
/// x2APIC mode, 11.12.10.2).
pub(crate) const REG_LDR: u16 = 0x0d0;
/// Destination format register, DFR; xAPIC only (SDM Vol. 3A 11.6.2.2).
pub(crate) const REG_DFR: u16 = 0x0e0;
/// Spurious-interrupt vector register, SVR (SDM Vol. 3A 11.9).
pub(crate) const REG_SVR: u16 = 0x0f0;
/// First of the eight in-service registers, ISR (SDM Vol. 3A 11.8.4).
pub(crate) const REG_ISR0: u16 = 0x100;
/// First of the eight trigger-mode registers, TMR (SDM Vol. 3A 11.8.4).
pub(crate) const REG_TMR0: u16 = 0x180;
/// First of the eight interrupt-request registers, IRR (SDM Vol. 3A 11.8.4).
pub(crate) const REG_IRR0: u16 = 0x200;
/// Error status register, ESR (SDM Vol. 3A 11.5.3).
pub(crate) const REG_ESR: u16 = 0x280;
/// LVT corrected machine-check interrupt (CMCI) register (SDM Vol. 3A 11.5.1).
pub(crate) const REG_LVT_CMCI: u16 = 0x2f0;
/// Interrupt command register, low half (SDM Vol. 3A 11.6.1); the whole
/// 64-bit ICR in x2APIC mode (11.12.9).
pub(crate) const REG_ICR_LOW: u16 = 0x300;
/// Interrupt command register, high half; xAPIC only (SDM Vol. 3A 11.6.1).
pub(crate) const REG_ICR_HIGH: u16 = 0x310;
/// LVT timer register (SDM Vol. 3A 11.5.1).
pub(crate) const REG_LVT_TIMER: u16 = 0x320;
/// LVT thermal sensor register (SDM Vol. 3A 11.5.1).
pub(crate) const REG_LVT_THERMAL: u16 = 0x330;
/// LVT performance monitoring counters register (SDM Vol. 3A 11.5.1).
pub(crate) const REG_LVT_PERF: u16 = 0x340;
/// LVT LINT0 register (SDM Vol. 3A 11.5.1).
pub(crate) const REG_LVT_LINT0: u16 = 0x350;
/// LVT LINT1 register (SDM Vol. 3A 11.5.1).
pub(crate) const REG_LVT_LINT1: u16 = 0x360;
/// LVT error register (SDM Vol. 3A 11.5.1).
pub(crate) const REG_LVT_ERROR: u16 = 0x370;
/// Timer initial count register (SDM Vol. 3A 11.5.4).
pub(crate) const REG_TIMER_INITIAL: u16 = 0x380;
/// Timer current count register, read-only (SDM Vol. 3A 11.5.4).
pub(crate) const REG_TIMER_CURRENT: u16 = 0x390;
/// Timer divide configuration register (SDM Vol. 3A 11.5.4, Figure 11-10).
pub(crate) const REG_TIMER_DIVIDE: u16 = 0x3e0;
/// SELF IPI register; x2APIC only, write-only (SDM Vol. 3A 11.12.11).
pub(crate) const REG_SELF_IPI: u16 = 0x3f0;

/// Size of the xAPIC MMIO window (SDM Vol. 3A 11.4.1: one 4-KiB page).
pub(crate) const MMIO_PAGE_SIZE: u64 = 0x1000;
/// Registers sit on 16-byte boundaries (SDM Vol. 3A 11.4.1: "aligned on
/// 128-bit boundaries").
pub(crate) const REG_STRIDE: u64 = 16;
/// Registers are 32 bits wide and accessed with 32-bit loads and stores (SDM
/// Vol. 3A 11.4.1).
pub(crate) const REG_WIDTH: usize = 4;

// ---------------------------------------------------------------------------
// Version register (SDM Vol. 3A 11.4.8, Figure 11-7)
// ---------------------------------------------------------------------------

/// Version of an integrated local APIC (SDM Vol. 3A 11.4.8: 1XH). 0x14 as
/// KVM's in-kernel LAPIC reports.
pub(crate) const APIC_VERSION: u8 = 0x14;
/// Number of LVT entries this model implements: timer, thermal, perf, LINT0,
/// LINT1, error and CMCI. The version register reports this count minus one
/// (SDM Vol. 3A 11.4.8: "Max LVT Entry").
pub(crate) const LVT_COUNT: u8 = 7;

/// Local APIC version register (SDM Vol. 3A 11.4.8, Figure 11-7).
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct VersionReg {
    /// Bits 0..7: the APIC version.
    pub(crate) version: u8,
    #[bits(8)]
    __: u8,
    /// Bits 16..23: the number of LVT entries minus one.
    pub(crate) max_lvt: u8,
    /// Bit 24: software may set SVR bit 12 to suppress EOI broadcasts.
    pub(crate) eoi_broadcast_suppression: bool,
    #[bits(7)]
    __: u8,
}

// ---------------------------------------------------------------------------
// ID, TPR, LDR, DFR (SDM Vol. 3A 11.4.6, 11.8.3.1, 11.6.2.2)
// ---------------------------------------------------------------------------

/// xAPIC ID register: the 8-bit ID sits in bits 24..31 (SDM Vol. 3A 11.4.6,
/// Figure 11-6).
pub(crate) const XAPIC_ID_SHIFT: u32 = 24;
/// TPR bits software may write: the task-priority class (7:4) and sub-class
/// (3:0); bits 8..31 are reserved (SDM Vol. 3A 11.8.3.1, Figure 11-18).
pub(crate) const TPR_WRITE_MASK: u32 = 0xff;
/// xAPIC LDR: the 8-bit logical APIC ID sits in bits 24..31, the rest is
/// reserved (SDM Vol. 3A 11.6.2.2, Figure 11-13).
pub(crate) const XAPIC_LDR_MASK: u32 = 0xff00_0000;
/// Shift of the logical APIC ID in the xAPIC LDR (SDM Vol. 3A 11.6.2.2).
pub(crate) const XAPIC_LDR_SHIFT: u32 = 24;
/// DFR model bits 28..31 (1111b flat, 0000b cluster); bits 0..27 are
/// reserved and read as ones (SDM Vol. 3A 11.6.2.2, Figure 11-14).
pub(crate) const DFR_MODEL_MASK: u32 = 0xf000_0000;
/// DFR model value of the flat model (SDM Vol. 3A 11.6.2.2).
pub(crate) const DFR_MODEL_FLAT: u32 = 0xf;
/// Shift of the DFR model field (SDM Vol. 3A 11.6.2.2).
pub(crate) const DFR_MODEL_SHIFT: u32 = 28;
/// DFR value after power-up, reset and INIT: all ones (SDM Vol. 3A 11.4.7.1).
pub(crate) const DFR_RESET: u32 = 0xffff_ffff;
/// x2APIC logical ID: the cluster (x2APIC ID bits 4..19) goes in LDR bits
/// 16..31 (SDM Vol. 3A 11.12.10.2).
pub(crate) const X2APIC_LDR_CLUSTER_SHIFT: u32 = 16;
/// x2APIC logical ID: the position in the cluster is the x2APIC ID's low four
/// bits (SDM Vol. 3A 11.12.10.2).
pub(crate) const X2APIC_LDR_POSITION_MASK: u32 = 0xf;

/// The x2APIC logical ID (LDR) the hardware derives from an x2APIC ID (SDM
/// Vol. 3A 11.12.10.2): cluster `id >> 4` in bits 16..31, bit `id & 0xf` in
/// bits 0..15.
pub(crate) const fn x2apic_ldr(x2apic_id: u32) -> u32 {
    ((x2apic_id >> 4) << X2APIC_LDR_CLUSTER_SHIFT) | (1 << (x2apic_id & X2APIC_LDR_POSITION_MASK))
}

// ---------------------------------------------------------------------------
// SVR (SDM Vol. 3A 11.9, Figure 11-23)
// ---------------------------------------------------------------------------

/// Spurious-interrupt vector register (SDM Vol. 3A 11.9, Figure 11-23).
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct SvrReg {
    /// Bits 0..7: the vector delivered for a spurious interrupt.
    pub(crate) spurious_vector: u8,
    /// Bit 8: APIC software enable (SDM Vol. 3A 11.4.7.2).
    pub(crate) apic_enabled: bool,
    /// Bit 9: focus processor checking disabled (kept for compatibility; this
    /// model has no focus processor).
    pub(crate) focus_check_disabled: bool,
    #[bits(2)]
    __: u8,
    /// Bit 12: suppress EOI broadcasts (SDM Vol. 3A 11.8.5); writable only
    /// when the version register advertises bit 24.
    pub(crate) suppress_eoi_broadcast: bool,
    #[bits(19)]
    __: u32,
}

/// SVR value after power-up, reset and INIT: vector 0xff, software disabled
/// (SDM Vol. 3A 11.4.7.1).
pub(crate) const SVR_RESET: u32 = 0xff;

impl SvrReg {
    /// Bits a write may change; `directed_eoi` adds bit 12 (SDM Vol. 3A 11.9).
    pub(crate) const fn write_mask(directed_eoi: bool) -> u32 {
        Self::new()
            .with_spurious_vector(0xff)
            .with_apic_enabled(true)
            .with_focus_check_disabled(true)
            .with_suppress_eoi_broadcast(directed_eoi)
            .into_bits()
    }
}

// ---------------------------------------------------------------------------
// ESR (SDM Vol. 3A 11.5.3, Figure 11-9)
// ---------------------------------------------------------------------------

/// ESR bit 5: the APIC tried to send an IPI with an illegal vector (0..15)
/// (SDM Vol. 3A 11.5.3).
pub(crate) const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: the APIC received an interrupt with an illegal vector (0..15),
/// from the bus or its own LVT (SDM Vol. 3A 11.5.3).
pub(crate) const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bit 7: software accessed an unimplemented register of the xAPIC page
/// (SDM Vol. 3A 11.5.3).
pub(crate) const ESR_ILLEGAL_REGISTER_ADDRESS: u32 = 1 << 7;

/// Vectors 0..15 are reserved; the APIC never accepts them (SDM Vol. 3A 11.5.2).
pub(crate) const FIRST_LEGAL_VECTOR: u8 = 16;

// ---------------------------------------------------------------------------
// LVT (SDM Vol. 3A 11.5.1, Figure 11-8)
// ---------------------------------------------------------------------------

/// One LVT entry: the union of every LVT's fields (SDM Vol. 3A 11.5.1, Figure
/// 11-8). Which fields a given entry implements is [`LvtReg::write_mask`].
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct LvtReg {
    /// Bits 0..7: the vector.
    pub(crate) vector: u8,
    /// Bits 8..10: delivery mode (thermal, perf, CMCI, LINT0, LINT1).
    #[bits(3)]
    pub(crate) delivery_mode: u8,
    #[bits(1)]
    __: u8,
    /// Bit 12: delivery status, read-only; always idle in this model.
    pub(crate) delivery_pending: bool,
    /// Bit 13: input pin polarity, 1 = active low (LINT0, LINT1).
    pub(crate) active_low: bool,
    /// Bit 14: remote IRR, read-only (LINT0, LINT1; fixed level interrupts).
    pub(crate) remote_irr: bool,
    /// Bit 15: trigger mode, 1 = level (LINT0, LINT1).
    pub(crate) level_triggered: bool,
    /// Bit 16: interrupt masked.
    pub(crate) masked: bool,
    /// Bits 17..18: timer mode (timer only), see `TIMER_MODE_*`.
    #[bits(2)]
    pub(crate) timer_mode: u8,
    #[bits(13)]
    __: u16,
}

/// LVT entries after power-up, reset and INIT: zero except the mask bit (SDM
/// Vol. 3A 11.4.7.1).
pub(crate) const LVT_RESET: u32 = LvtReg::new().with_masked(true).into_bits();

/// Timer mode 00b: one-shot (SDM Vol. 3A 11.5.4, Table 11-2).
pub(crate) const TIMER_MODE_ONE_SHOT: u8 = 0b00;
/// Timer mode 01b: periodic (SDM Vol. 3A 11.5.4, Table 11-2).
pub(crate) const TIMER_MODE_PERIODIC: u8 = 0b01;
/// Timer mode 10b: TSC-deadline (SDM Vol. 3A 11.5.4.1, Table 11-2).
pub(crate) const TIMER_MODE_TSC_DEADLINE: u8 = 0b10;

/// Timer mode 11b: reserved (SDM Vol. 3A 11.5.4, Table 11-2).
pub(crate) const TIMER_MODE_RESERVED: u8 = 0b11;

/// Which LVT entry (SDM Vol. 3A 11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum LvtKind {
    /// LVT timer register (offset 0x320).
    Timer,
    /// LVT thermal sensor register (offset 0x330).
    Thermal,
    /// LVT performance monitoring counters register (offset 0x340).
    Perf,
    /// LVT LINT0 register (offset 0x350).
    Lint0,
    /// LVT LINT1 register (offset 0x360).
    Lint1,
    /// LVT error register (offset 0x370).
    Error,
    /// LVT CMCI register (offset 0x2f0).
    Cmci,
}

impl LvtKind {
    /// Every LVT, in the order of the model's LVT array.
    pub(crate) const ALL: [Self; LVT_COUNT as usize] = [
        Self::Timer,
        Self::Thermal,
        Self::Perf,
        Self::Lint0,
        Self::Lint1,
        Self::Error,
        Self::Cmci,
    ];

    /// Position in the model's LVT array (always below [`LVT_COUNT`]).
    pub(crate) const fn index(self) -> usize {
        match self {
            Self::Timer => 0,
            Self::Thermal => 1,
            Self::Perf => 2,
            Self::Lint0 => 3,
            Self::Lint1 => 4,
            Self::Error => 5,
            Self::Cmci => 6,
        }
    }

    /// The entry's xAPIC MMIO offset (SDM Vol. 3A 11.4.1, Table 11-1).
    pub(crate) const fn offset(self) -> u16 {
        match self {
            Self::Timer => REG_LVT_TIMER,
            Self::Thermal => REG_LVT_THERMAL,
            Self::Perf => REG_LVT_PERF,
            Self::Lint0 => REG_LVT_LINT0,
            Self::Lint1 => REG_LVT_LINT1,
            Self::Error => REG_LVT_ERROR,
            Self::Cmci => REG_LVT_CMCI,
        }
    }

    /// Whether the entry has a delivery-mode field (SDM Vol. 3A 11.5.1: the
    /// timer and error entries always deliver fixed interrupts).
    pub(crate) const fn has_delivery_mode(self) -> bool {
        !matches!(self, Self::Timer | Self::Error)
    }
}

impl LvtReg {
    /// Bits software may write in `kind`'s entry (SDM Vol. 3A 11.5.1, Figure
    /// 11-8). `tsc_deadline` makes timer bit 18 writable (11.5.4.1: reserved
    /// without CPUID.01H:ECX.TSC_Deadline).
    pub(crate) const fn write_mask(kind: LvtKind, tsc_deadline: bool) -> u32 {
        let common = Self::new().with_vector(0xff).with_masked(true);
        let with_mode = common.with_delivery_mode(0b111);
        let reg = match kind {
            LvtKind::Timer => common.with_timer_mode(if tsc_deadline { 0b11 } else { 0b01 }),
            LvtKind::Error => common,
            LvtKind::Thermal | LvtKind::Perf | LvtKind::Cmci => with_mode,
            LvtKind::Lint0 | LvtKind::Lint1 => {
                with_mode.with_active_low(true).with_level_triggered(true)
            }
        };
        reg.into_bits()
    }

    /// Read-only bits of `kind`'s entry: delivery status, and remote IRR for
    /// LINT0/LINT1 (SDM Vol. 3A 11.5.1). Writing them is not a reserved-bit
    /// violation; the written value is ignored.
    pub(crate) const fn read_only_mask(kind: LvtKind) -> u32 {
        let status = Self::new().with_delivery_pending(true);
        match kind {
            LvtKind::Lint0 | LvtKind::Lint1 => status.with_remote_irr(true).into_bits(),
            _ => status.into_bits(),
        }
    }
}

// ---------------------------------------------------------------------------
// Timer divide configuration (SDM Vol. 3A 11.5.4, Figure 11-10)
// ---------------------------------------------------------------------------

/// Divide configuration register (SDM Vol. 3A 11.5.4, Figure 11-10): the
/// divisor is encoded in bits 3, 1 and 0; bit 2 and bits 4..31 are reserved.
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct DivideReg {
    /// Bits 0..1: low two bits of the divide value.
    #[bits(2)]
    pub(crate) low: u8,
    #[bits(1)]
    __: u8,
    /// Bit 3: high bit of the divide value.
    pub(crate) high: bool,
    #[bits(28)]
    __: u32,
}

impl DivideReg {
    /// Bits a write may change (SDM Vol. 3A 11.5.4, Figure 11-10).
    pub(crate) const WRITE_MASK: u32 = Self::new().with_low(0b11).with_high(true).into_bits();

    /// The divisor, 1..=128 (SDM Vol. 3A 11.5.4, Figure 11-10): encodings
    /// 000b..110b divide by 2..128, 111b divides by 1.
    pub(crate) const fn divisor(self) -> u32 {
        let code = self.low() as u32 | ((self.high() as u32) << 2);
        if code == 0b111 { 1 } else { 2 << code }
    }
}

// ---------------------------------------------------------------------------
// ICR (SDM Vol. 3A 11.6.1, Figure 11-12; x2APIC 11.12.9, Figure 11-28)
// ---------------------------------------------------------------------------

/// Interrupt command register as one 64-bit value (SDM Vol. 3A 11.6.1; the
/// x2APIC MSR 0x830 holds it whole, 11.12.9).
#[bitfield(u64)]
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct IcrReg {
    /// Bits 0..7: vector (start page for SIPI).
    pub(crate) vector: u8,
    /// Bits 8..10: delivery mode.
    #[bits(3)]
    pub(crate) delivery_mode: u8,
    /// Bit 11: destination mode, 1 = logical.
    pub(crate) logical: bool,
    /// Bit 12: delivery status (xAPIC, read-only; reserved in x2APIC).
    pub(crate) delivery_pending: bool,
    #[bits(1)]
    __: u8,
    /// Bit 14: level, 1 = assert (0 only for INIT level de-assert).
    pub(crate) assert: bool,
    /// Bit 15: trigger mode, 1 = level.
    pub(crate) level_triggered: bool,
    #[bits(2)]
    __: u8,
    /// Bits 18..19: destination shorthand, see `SHORTHAND_*`.
    #[bits(2)]
    pub(crate) shorthand: u8,
    #[bits(12)]
    __: u16,
    /// Bits 32..63: destination. xAPIC uses bits 56..63 only; x2APIC uses all.
    pub(crate) destination: u32,
}

impl IcrReg {
    /// Bits software may write in the low half (SDM Vol. 3A 11.6.1); in x2APIC
    /// mode any other low bit set faults (11.12.1.3).
    pub(crate) const LOW_WRITE_MASK: u32 = Self::new()
        .with_vector(0xff)
        .with_delivery_mode(0b111)
        .with_logical(true)
        .with_assert(true)
        .with_level_triggered(true)
        .with_shorthand(0b11)
        .into_bits() as u32;
}

/// xAPIC ICR high: the 8-bit destination is in bits 24..31, the rest reserved
/// (SDM Vol. 3A 11.6.1, Figure 11-12).
pub(crate) const XAPIC_ICR_HIGH_MASK: u32 = 0xff00_0000;
/// Shift of the 8-bit xAPIC destination in the ICR high half (SDM Vol. 3A 11.6.1).
pub(crate) const XAPIC_DEST_SHIFT: u32 = 24;

/// Shorthand 00b: use the destination field (SDM Vol. 3A 11.6.1).
pub(crate) const SHORTHAND_NONE: u8 = 0b00;
/// Shorthand 01b: self (SDM Vol. 3A 11.6.1).
pub(crate) const SHORTHAND_SELF: u8 = 0b01;
/// Shorthand 10b: all including self (SDM Vol. 3A 11.6.1).
pub(crate) const SHORTHAND_ALL_INCLUDING_SELF: u8 = 0b10;
/// Shorthand 11b: all excluding self (SDM Vol. 3A 11.6.1).
pub(crate) const SHORTHAND_ALL_EXCLUDING_SELF: u8 = 0b11;

/// SELF IPI register: vector in bits 0..7, bits 8..31 reserved (SDM Vol. 3A
/// 11.12.11, Figure 11-30).
pub(crate) const SELF_IPI_VECTOR_MASK: u64 = 0xff;

// ---------------------------------------------------------------------------
// IA32_APIC_BASE (SDM Vol. 3A 11.4.4, Figure 11-5; 11.12.1)
// ---------------------------------------------------------------------------

/// IA32_APIC_BASE MSR (SDM Vol. 3A 11.4.4, Figure 11-5).
#[bitfield(u64)]
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct ApicBaseReg {
    #[bits(8)]
    __: u8,
    /// Bit 8: this processor is the bootstrap processor.
    pub(crate) bsp: bool,
    #[bits(1)]
    __: u8,
    /// Bit 10: x2APIC mode enable, EXTD (SDM Vol. 3A 11.12.1).
    pub(crate) x2apic: bool,
    /// Bit 11: APIC global enable, EN (SDM Vol. 3A 11.4.3).
    pub(crate) enabled: bool,
    /// Bits 12..63: the 4-KiB page number of the xAPIC MMIO window; the bits
    /// from MAXPHYADDR up are reserved.
    #[bits(52)]
    pub(crate) base_page: u64,
}

/// Default xAPIC MMIO base after reset (SDM Vol. 3A 11.4.1: FEE00000H).
pub(crate) const DEFAULT_APIC_BASE_ADDRESS: u64 = 0xfee0_0000;

impl ApicBaseReg {
    /// The bits a write may set for a processor with `phys_addr_bits` of
    /// physical address (SDM Vol. 3A 11.4.4, Figure 11-5); x2APIC enable only
    /// when `x2apic_supported` (11.12.1: `CPUID.01H:ECX[21]`).
    pub(crate) const fn valid_mask(phys_addr_bits: u8, x2apic_supported: bool) -> u64 {
        let bits = if phys_addr_bits > 63 {
            63
        } else {
            phys_addr_bits as u32
        };
        let addr = ((1u64 << bits) - 1) & !0xfff;
        let flags = Self::new()
            .with_bsp(true)
            .with_x2apic(x2apic_supported)
            .with_enabled(true)
            .into_bits();
        addr | flags
    }

    /// The MMIO base address.
    pub(crate) const fn address(self) -> u64 {
        self.base_page() << 12
    }
}

// ---------------------------------------------------------------------------
// Priorities (SDM Vol. 3A 11.8.3)
// ---------------------------------------------------------------------------

/// Priority class of a vector or priority value: bits 4..7 (SDM Vol. 3A 11.8.3).
pub(crate) const PRIORITY_CLASS_MASK: u8 = 0xf0;
/// CR8 holds TPR bits 7:4 (SDM Vol. 3A 11.8.6).
pub(crate) const CR8_SHIFT: u32 = 4;
/// CR8 bits 0..3 are the only defined ones (SDM Vol. 3A 11.8.6).
pub(crate) const CR8_MASK: u64 = 0xf;

// ---------------------------------------------------------------------------
// Delivery-mode encodings (SDM Vol. 3A 11.5.1 and 11.6.1)
// ---------------------------------------------------------------------------

/// Delivery mode 000b: fixed (SDM Vol. 3A 11.5.1).
pub(crate) const DM_FIXED: u8 = 0b000;
/// Delivery mode 010b: SMI (SDM Vol. 3A 11.5.1).
pub(crate) const DM_SMI: u8 = 0b010;
/// Delivery mode 100b: NMI (SDM Vol. 3A 11.5.1).
pub(crate) const DM_NMI: u8 = 0b100;
/// Delivery mode 101b: INIT (SDM Vol. 3A 11.5.1).
pub(crate) const DM_INIT: u8 = 0b101;
/// Delivery mode 111b: ExtINT (SDM Vol. 3A 11.5.1).
pub(crate) const DM_EXTINT: u8 = 0b111;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divide_reg_each_encoding_maps_to_sdm_divisor() {
        // Arrange: the encodings of Figure 11-10 (bits 3, 1, 0).
        let table = [
            (0b0000, 2),
            (0b0001, 4),
            (0b0010, 8),
            (0b0011, 16),
            (0b1000, 32),
            (0b1001, 64),
            (0b1010, 128),
            (0b1011, 1),
        ];
        for (raw, expected) in table {
            // Act
            let divisor = DivideReg::from_bits(raw).divisor();
            // Assert
            assert_eq!(divisor, expected, "encoding {raw:#06b}");
        }
    }

    #[test]
    fn x2apic_ldr_id_0x23_gives_cluster_2_bit_3() {
        // Arrange / Act
        let ldr = x2apic_ldr(0x23);
        // Assert
        assert_eq!(ldr, (2 << 16) | (1 << 3));
    }

    #[test]
    fn lvt_write_mask_lint0_includes_polarity_and_trigger() {
        // Arrange / Act
        let mask = LvtReg::write_mask(LvtKind::Lint0, true);
        // Assert
        assert_eq!(mask, 0x1_a7ff);
    }

    #[test]
    fn icr_low_write_mask_matches_figure_11_12() {
        // Arrange / Act / Assert
        assert_eq!(IcrReg::LOW_WRITE_MASK, 0x000c_cfff);
    }

    #[test]
    fn apic_base_valid_mask_40_bits_excludes_reserved() {
        // Arrange / Act
        let mask = ApicBaseReg::valid_mask(40, true);
        // Assert: bits 8, 10, 11 and 12..39.
        assert_eq!(mask, 0x0000_00ff_ffff_fd00);
    }
}
