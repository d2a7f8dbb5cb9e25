//! The local APIC model (xAPIC and x2APIC), after the Intel SDM Vol. 3A
//! chapter 11.
//!
//! One [`Lapic`] per vCPU. It is a pure state machine: the caller passes the
//! time (`now`, nanoseconds since VM start) to every entry point that needs
//! it, and every effect comes back as a value ([`Effect`]), a pending event
//! the vCPU loop takes (`take_nmis`, `take_init`, `take_sipi`, ...), or a
//! [`Gp`] the caller injects as `#GP(0)`.
//!
//! # How a vCPU loop drives it
//!
//! ```text
//! on every exit:       lapic.tick(now)                       // fire due timers
//! MMIO exit in page:   lapic.mmio_read(off, data, now) / lapic.mmio_write(off, data, now)
//! RDMSR / WRMSR:       lapic.msr_read(msr, now) / lapic.msr_write(msr, value, now)
//! message from bus:    lapic.accept(&msg)          // bus_target() says who gets it
//! LINT pin / PMU ...:  lapic.raise_local(LocalSource::Lint0)
//! effects:             Effect::Ipi(msg) -> the bus; Effect::EoiBroadcast -> IOAPICs
//! before entry:        take_init / take_sipi / take_nmis (a count: that many
//!                      KVM_NMIs) / take_smi / take_extint,
//!                      then if IF=1: lapic.acknowledge() -> inject that vector
//! CR8 (no in-kernel LAPIC): lapic.set_cr8(kvm_run.cr8) after every exit,
//!                      kvm_run.cr8 = lapic.cr8() before entry
//! sleep until:         lapic.next_deadline()
//! snapshot:            lapic.save() / Lapic::restore(&state); KVM page:
//!                      to_kvm_page(now) / load_kvm_page(&page, now)
//! ```
//!
//! `harness::run` (feature `fuzzing`) interprets arbitrary bytes as
//! operations and checks the model's invariants, for a fuzz target.
//!
//! # Choices where the SDM leaves room
//!
//! - Version 0x14, max LVT entry 6 (timer, thermal, perf, LINT0, LINT1,
//!   error, CMCI). Version bit 24 (EOI-broadcast suppression) follows
//!   [`LapicConfig::directed_eoi`]; with SVR bit 12 set, the EOI of a
//!   level-triggered vector returns no [`Effect::EoiBroadcast`] and the guest
//!   EOIs the IOAPIC itself through its EOI register (IOAPIC version 0x20).
//! - xAPIC MMIO: 1-, 2- and 4-byte reads inside the first 32 bits of a
//!   register are served (as KVM does); writes must be 4 bytes at a 16-byte
//!   boundary. Anything else reads all ones and is ignored on write, counted
//!   in [`LapicCounters::bad_mmio_accesses`]. A reserved register reads 0,
//!   ignores writes, sets ESR bit 7 (illegal register address) and is counted.
//!   EOI reads 0. Writes to read-only registers are ignored and counted.
//! - x2APIC MSRs follow the SDM's reserved-bit checking (11.12.1.3): any
//!   reserved bit set, a write to a read-only register, a read of a
//!   write-only one, a reserved MSR or any access outside x2APIC mode is a
//!   [`Gp`]. Timer mode 11b (reserved) is a reserved-bit fault in x2APIC mode;
//!   written through MMIO it is kept and runs as one-shot.
//! - A fixed or lowest-priority IPI with an illegal vector (0..15) sets ESR
//!   bit 5 and is not sent. An INIT level de-assert IPI (trigger level, level
//!   0) is not supported by modern processors (SDM 11.4.7.4): nothing is sent.
//!   Every IPI is sent with `level: true`, as the bus message type asks.
//! - Lowest-priority IPIs are sent (as KVM does); the bus arbitrates.
//! - INIT resets the APIC on acceptance (SDM 11.4.7.3: every register to its
//!   power-up value except the APIC ID and IA32_APIC_BASE, so x2APIC mode
//!   survives), clears pending NMI/SMI/SIPI/ExtINT and latches the INIT for
//!   the vCPU loop. A SIPI is latched whatever the vCPU's state; the vCPU
//!   loop drops it unless the vCPU waits for SIPI.
//! - A software-disabled APIC (SVR bit 8 clear) drops fixed and
//!   lowest-priority messages and ExtINT (counted) but takes NMI, SMI, INIT
//!   and SIPI (SDM 11.4.7.2). A globally disabled APIC takes nothing.
//! - Clearing IA32_APIC_BASE bit 11 resets every register to its power-up
//!   value; re-enabling restores the configured APIC ID (SDM 11.4.3, 11.12.5).
//! - Pending NMIs are a count, at most [`MAX_PENDING_NMIS`] (2), and
//!   [`Lapic::take_nmis`] hands the vCPU loop that count to inject, one
//!   `KVM_NMI` each. The SDM (Vol. 3A 7.7.1, "Handling Multiple NMIs"; 6.7.1
//!   in editions before the APIC chapter became 11) says
//!   that while an NMI handler runs, delivery of further NMIs is blocked
//!   until the next IRET; it does not say how many NMIs that arrive
//!   meanwhile are kept. KVM keeps one: its `process_nmi` (x86.c) adds the
//!   queued NMIs to the pending ones and caps them at 2, or at 1 when NMIs
//!   are blocked (a handler runs) or one is being injected ("one NMI
//!   running, and one NMI pending after it"). The LAPIC cannot see whether
//!   the vCPU is inside its NMI handler, so it keeps the larger bound and
//!   lets KVM apply the smaller one: two NMIs accepted before the vCPU takes
//!   either are both delivered (one now, one after the handler's IRET), a
//!   third collapses into them ([`AcceptOutcome::Coalesced`]), and inside a
//!   handler KVM collapses whatever arrives into one latched NMI.
//! - Timer: input clock [`LapicConfig::bus_hz`] (1 GHz by default, as KVM's
//!   in-kernel LAPIC and `irqconnect_abi::layout::LAPIC_BUS_HZ`). An LVT
//!   timer write that changes the mode disarms the timer only on a change
//!   into or out of TSC-deadline mode (the initial count is then cleared
//!   too); between one-shot and periodic the current count keeps counting
//!   down from where it was and the initial count is kept, a periodic timer
//!   reloading from it at zero and a one-shot stopping there, and a one-shot
//!   that already reached zero stays at zero. That is what KVM's in-kernel
//!   LAPIC does (`apic_update_lvtt`, lapic.c), so a guest sees the same in
//!   all three irqchip modes. It departs from the SDM's wording: Vol. 3A
//!   11.5.4.1 ("TSC-Deadline Mode"; 10.5.4.1 in older editions) says "A
//!   write to the LVT Timer Register that changes the timer mode disarms the
//!   local APIC timer", for any mode change. The SDM says nothing of the
//!   counts after a switch between one-shot and periodic (11.5.4 only says
//!   a one-shot timer "remains at its 0 value until reprogrammed"); there
//!   too we follow KVM.
//!   A divide-configuration write while counting keeps the current count and
//!   continues at the new rate. A periodic timer re-arms from its start time
//!   (no drift); periods missed because `tick` came late coalesce into one
//!   interrupt and are counted. TSC-deadline converts TSC ticks to
//!   nanoseconds with [`TscClock`].

mod delivery;
#[cfg(feature = "fuzzing")]
pub mod harness;
mod kvm_regs;
#[cfg(test)]
mod proptests;
mod regs;
pub mod snapshot;
mod spec;
#[cfg(test)]
mod test_support;
mod timer;
mod vectors;
mod x2apic;

use serde::{Deserialize, Serialize};

use crate::apic_bus::{ApicTarget, DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};
use spec::{
    ApicBaseReg, DEFAULT_APIC_BASE_ADDRESS, DFR_MODEL_FLAT, DFR_MODEL_SHIFT, DFR_RESET, DM_EXTINT,
    DM_FIXED, DM_INIT, DM_NMI, DM_SMI, ESR_RECEIVE_ILLEGAL_VECTOR, ESR_SEND_ILLEGAL_VECTOR,
    FIRST_LEGAL_VECTOR, IcrReg, LVT_COUNT, LVT_RESET, LvtKind, LvtReg, PRIORITY_CLASS_MASK,
    SHORTHAND_ALL_EXCLUDING_SELF, SHORTHAND_ALL_INCLUDING_SELF, SHORTHAND_NONE, SHORTHAND_SELF,
    SVR_RESET, SvrReg, XAPIC_DEST_SHIFT, XAPIC_LDR_SHIFT, x2apic_ldr,
};
use timer::Timer;
use vectors::VectorSet;

pub use kvm_regs::KVM_LAPIC_PAGE_SIZE;
pub use snapshot::LapicState;
pub use spec::{IA32_APIC_BASE, IA32_TSC_DEADLINE, X2APIC_MSR_FIRST, X2APIC_MSR_LAST};

/// The guest's time-stamp counter as a function of `now`, for TSC-deadline
/// mode: `tsc(now) = tsc_at_zero + now * hz / 10^9`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TscClock {
    /// TSC frequency in Hz (KVM: `KVM_GET_TSC_KHZ * 1000`). Zero is treated
    /// as 1 Hz.
    pub hz: u64,
    /// The guest's TSC value at `now == 0`, extended backwards: negative
    /// when the TSC started after time zero (a vCPU whose TSC KVM started
    /// at 0 when it was created, after the VMM's clock started). A TSC at
    /// 2^63 or more at time zero is not representable.
    pub tsc_at_zero: i64,
}

impl TscClock {
    /// The guest TSC at `now` nanoseconds (modulo 2^64, as the counter).
    pub const fn tsc_at(&self, now: u64) -> u64 {
        let ticks = (now as u128 * self.hz as u128) / timer::NS_PER_SEC;
        (self.tsc_at_zero as i128 + ticks as i128) as u64
    }

    /// The first `now` at which the TSC has reached `tsc`, compared as
    /// unsigned values as the processor does (0 if it already had at time
    /// zero; `u64::MAX` if never representable).
    pub const fn ns_at(&self, tsc: u64) -> u64 {
        let ticks = tsc as i128 - self.tsc_at_zero as i128;
        if ticks <= 0 {
            return 0;
        }
        let hz = if self.hz == 0 { 1 } else { self.hz as u128 };
        let ns = (ticks as u128 * timer::NS_PER_SEC).div_ceil(hz);
        if ns > u64::MAX as u128 {
            u64::MAX
        } else {
            ns as u64
        }
    }
}

/// What a local APIC is configured with at creation; constant for its life
/// but for the TSC clock, which [`Lapic::set_tsc_clock`] may supply later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LapicConfig {
    /// The APIC ID the hardware initialises: the x2APIC ID, whose low 8 bits
    /// are the initial xAPIC ID (SDM Vol. 3A 11.4.6, 11.12.5.1).
    pub apic_id: u32,
    /// Whether IA32_APIC_BASE bit 8 (BSP) is set at power-up.
    pub bsp: bool,
    /// Whether x2APIC mode may be enabled (`CPUID.01H:ECX[21]`).
    pub x2apic: bool,
    /// Whether the version register advertises EOI-broadcast suppression
    /// (bit 24) and SVR bit 12 is writable (SDM Vol. 3A 11.8.5).
    pub directed_eoi: bool,
    /// Physical-address width (`CPUID.80000008H:EAX[7:0]`); IA32_APIC_BASE bits
    /// at and above it are reserved.
    pub phys_addr_bits: u8,
    /// Timer input clock in Hz before the divider. Zero is treated as 1 Hz.
    pub bus_hz: u64,
    /// The TSC, when TSC-deadline mode is offered (`CPUID.01H:ECX[24]`);
    /// `None` makes timer mode 10b reserved and IA32_TSC_DEADLINE fault.
    pub tsc: Option<TscClock>,
}

/// Default timer input clock: 1 GHz, the value of
/// `irqconnect_abi::layout::LAPIC_BUS_HZ` and of KVM's in-kernel LAPIC.
pub const DEFAULT_BUS_HZ: u64 = 1_000_000_000;

impl LapicConfig {
    /// The configuration of APIC `apic_id`: x2APIC and directed EOI offered,
    /// 40 physical-address bits, a 1 GHz timer clock, no TSC-deadline mode.
    pub const fn new(apic_id: u32, bsp: bool) -> Self {
        Self {
            apic_id,
            bsp,
            x2apic: true,
            directed_eoi: true,
            phys_addr_bits: 40,
            bus_hz: DEFAULT_BUS_HZ,
            tsc: None,
        }
    }

    /// The same configuration with TSC-deadline mode driven by `tsc`.
    pub const fn with_tsc(mut self, tsc: TscClock) -> Self {
        self.tsc = Some(tsc);
        self
    }
}

/// A side effect of a register write that leaves the local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use]
pub enum Effect {
    /// An ICR write: put this message on the APIC bus. Shorthands are left
    /// for the bus to resolve (`SelfOnly` comes back to this APIC).
    Ipi(Message),
    /// The EOI of a level-triggered vector: tell every IOAPIC (SDM Vol. 3A
    /// 11.8.5). Not produced while SVR bit 12 suppresses broadcasts.
    EoiBroadcast {
        /// The vector whose service ended.
        vector: u8,
    },
}

/// An MSR access the processor answers with a general-protection fault,
/// `#GP(0)`. The caller injects it; the register state is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gp {
    /// An x2APIC MSR while the APIC is not in x2APIC mode (SDM Vol. 3A 11.12.1.2).
    NotX2apicMode,
    /// A reserved MSR of the x2APIC range, or an MSR this model does not own.
    ReservedMsr,
    /// A write to a read-only register.
    ReadOnly,
    /// A read of a write-only register (EOI, SELF IPI).
    WriteOnly,
    /// A reserved bit set (SDM Vol. 3A 11.12.1.3), or a non-zero write to
    /// EOI or ESR in x2APIC mode.
    ReservedBits,
    /// An IA32_APIC_BASE write to the invalid state or an illegal mode
    /// transition (SDM Vol. 3A 11.12.5).
    InvalidTransition,
    /// IA32_TSC_DEADLINE without TSC-deadline support configured.
    Unsupported,
}

/// What happened to an interrupt offered to the local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AcceptOutcome {
    /// The vector's IRR bit was set.
    Requested,
    /// The vector was already requested, or [`MAX_PENDING_NMIS`] NMIs were
    /// already pending; the two merged.
    Coalesced,
    /// An NMI, SMI, INIT, SIPI or ExtINT was latched for the vCPU loop.
    Latched,
    /// The LVT entry is masked (local interrupts only).
    Masked,
    /// Vector 0..15: ESR "receive illegal vector" set, nothing requested.
    IllegalVector,
    /// The APIC is disabled (globally, or in software for this kind).
    Disabled,
    /// Ignored by design: INIT level de-assert, a reserved delivery mode.
    Ignored,
}

impl AcceptOutcome {
    /// Whether the interrupt reached the APIC's state.
    pub const fn accepted(self) -> bool {
        matches!(self, Self::Requested | Self::Coalesced | Self::Latched)
    }
}

/// The local interrupt sources a VMM can raise (SDM Vol. 3A 11.5.1). The
/// timer and error entries are raised by the model itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LocalSource {
    /// The LINT0 pin (often ExtINT from the 8259).
    Lint0,
    /// The LINT1 pin (often NMI).
    Lint1,
    /// The thermal sensor.
    Thermal,
    /// A performance-counter overflow.
    Perf,
    /// A corrected machine-check error.
    Cmci,
}

impl LocalSource {
    const fn lvt(self) -> LvtKind {
        match self {
            Self::Lint0 => LvtKind::Lint0,
            Self::Lint1 => LvtKind::Lint1,
            Self::Thermal => LvtKind::Thermal,
            Self::Perf => LvtKind::Perf,
            Self::Cmci => LvtKind::Cmci,
        }
    }
}

/// Counters of guest mistakes and notable events; never reset by the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LapicCounters {
    /// MMIO accesses of a bad width or alignment, or outside the page.
    pub bad_mmio_accesses: u64,
    /// MMIO accesses to reserved register offsets.
    pub reserved_register_accesses: u64,
    /// MMIO accesses while the xAPIC page is not decoded (globally disabled
    /// or in x2APIC mode).
    pub disabled_mmio_accesses: u64,
    /// MMIO writes to read-only registers (ignored).
    pub read_only_writes: u64,
    /// MSR accesses answered with #GP.
    pub msr_faults: u64,
    /// Interrupts received with an illegal vector (0..15).
    pub illegal_vectors_received: u64,
    /// IPIs (ICR, SELF IPI) with an illegal vector, not sent.
    pub illegal_vectors_sent: u64,
    /// Messages dropped because the APIC was disabled or the mode reserved.
    pub dropped_messages: u64,
    /// Fixed interrupts that found their vector already requested.
    pub coalesced_interrupts: u64,
    /// EOIs with nothing in service.
    pub spurious_eois: u64,
    /// Timer expirations (masked or not).
    pub timer_expirations: u64,
    /// Periodic-timer periods that elapsed between two `tick`s and merged.
    pub timer_missed_periods: u64,
}

/// The most NMIs a local APIC holds for its vCPU: one to deliver now and
/// one latched behind it (see the [module documentation](self)).
pub const MAX_PENDING_NMIS: u8 = 2;

/// Events the vCPU loop takes instead of injecting a vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct PendingEvents {
    /// NMIs accepted and not yet taken, at most [`MAX_PENDING_NMIS`].
    pub(crate) nmis: u8,
    pub(crate) smi: bool,
    pub(crate) init: bool,
    pub(crate) sipi: Option<u8>,
    pub(crate) extint: bool,
}

/// One local APIC. See the [module documentation](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lapic {
    config: LapicConfig,
    apic_base: ApicBaseReg,
    /// The xAPIC ID (ID register bits 24..31); x2APIC mode uses `config.apic_id`.
    xapic_id: u8,
    tpr: u8,
    /// LDR as read: xAPIC bits 24..31, or the derived x2APIC logical ID.
    ldr: u32,
    dfr: u32,
    svr: SvrReg,
    isr: VectorSet,
    irr: VectorSet,
    tmr: VectorSet,
    /// ESR as software reads it (latched by the last ESR write).
    esr: u32,
    /// Errors detected since the last ESR write (SDM Vol. 3A 11.5.3).
    esr_pending: u32,
    icr: IcrReg,
    lvt: [LvtReg; LVT_COUNT as usize],
    timer: Timer,
    events: PendingEvents,
    counters: LapicCounters,
}

impl Lapic {
    /// A local APIC in its power-up state (SDM Vol. 3A 11.4.7.1): globally
    /// enabled in xAPIC mode at 0xFEE00000, software disabled, LVTs masked.
    pub fn new(config: LapicConfig) -> Self {
        let apic_base = ApicBaseReg::new()
            .with_bsp(config.bsp)
            .with_enabled(true)
            .with_base_page(DEFAULT_APIC_BASE_ADDRESS >> 12);
        let mut lapic = Self {
            config,
            apic_base,
            xapic_id: config.apic_id as u8,
            tpr: 0,
            ldr: 0,
            dfr: DFR_RESET,
            svr: SvrReg::from_bits(SVR_RESET),
            isr: VectorSet::EMPTY,
            irr: VectorSet::EMPTY,
            tmr: VectorSet::EMPTY,
            esr: 0,
            esr_pending: 0,
            icr: IcrReg::new(),
            lvt: [LvtReg::from_bits(LVT_RESET); LVT_COUNT as usize],
            timer: Timer::default(),
            events: PendingEvents::default(),
            counters: LapicCounters::default(),
        };
        lapic.reset_registers();
        lapic
    }

    /// The configuration this APIC was created with.
    pub const fn config(&self) -> &LapicConfig {
        &self.config
    }

    /// The counters of guest mistakes and events.
    pub const fn counters(&self) -> &LapicCounters {
        &self.counters
    }

    /// The current APIC ID: the 32-bit x2APIC ID in x2APIC mode, else the
    /// 8-bit xAPIC ID.
    pub const fn apic_id(&self) -> u32 {
        if self.is_x2apic() {
            self.config.apic_id
        } else {
            self.xapic_id as u32
        }
    }

    /// IA32_APIC_BASE bit 11: globally enabled.
    pub const fn hw_enabled(&self) -> bool {
        self.apic_base.enabled()
    }

    /// SVR bit 8: software enabled.
    pub const fn sw_enabled(&self) -> bool {
        self.svr.apic_enabled()
    }

    /// Whether the APIC is in x2APIC mode (EN and EXTD set).
    pub const fn is_x2apic(&self) -> bool {
        self.apic_base.enabled() && self.apic_base.x2apic()
    }

    /// Guest-physical base of the xAPIC MMIO page (IA32_APIC_BASE bits 12..).
    pub const fn mmio_base(&self) -> u64 {
        self.apic_base.address()
    }

    /// Whether MMIO at [`Self::mmio_base`] reaches the registers: globally
    /// enabled and not in x2APIC mode. Otherwise reads are all ones.
    pub const fn mmio_decoded(&self) -> bool {
        self.hw_enabled() && !self.apic_base.x2apic()
    }

    /// The task-priority register (SDM Vol. 3A 11.8.3.1).
    pub const fn tpr(&self) -> u8 {
        self.tpr
    }

    /// Whether vector `v` is requested (IRR).
    pub const fn is_requested(&self, v: u8) -> bool {
        self.irr.contains(v)
    }

    /// Whether vector `v` is in service (ISR).
    pub const fn is_in_service(&self, v: u8) -> bool {
        self.isr.contains(v)
    }

    /// Whether vector `v` was last accepted level-triggered (TMR).
    pub const fn is_level(&self, v: u8) -> bool {
        self.tmr.contains(v)
    }

    /// The IRR as four words, vector `v` at bit `v % 64` of word `v / 64`:
    /// [`Self::is_requested`] of all 256 vectors at once.
    pub const fn requested_words(&self) -> [u64; 4] {
        self.irr.0
    }

    /// The ISR as four words, laid out as [`Self::requested_words`].
    pub const fn in_service_words(&self) -> [u64; 4] {
        self.isr.0
    }

    /// The TMR as four words, laid out as [`Self::requested_words`].
    pub const fn level_words(&self) -> [u64; 4] {
        self.tmr.0
    }

    /// What the APIC bus needs to decide whether a message reaches this APIC.
    pub const fn bus_target(&self) -> ApicTarget {
        let x2apic = self.is_x2apic();
        ApicTarget {
            apic_id: self.apic_id(),
            x2apic,
            logical_id: if x2apic {
                self.ldr
            } else {
                self.ldr >> XAPIC_LDR_SHIFT
            },
            dfr_flat: self.dfr >> DFR_MODEL_SHIFT == DFR_MODEL_FLAT,
            hw_enabled: self.hw_enabled(),
            sw_enabled: self.sw_enabled(),
            arbitration_priority: self.ppr(),
        }
    }

    // -----------------------------------------------------------------------
    // Pending events for the vCPU loop
    // -----------------------------------------------------------------------

    /// Takes the pending NMIs: how many the vCPU loop injects now (0, 1 or
    /// [`MAX_PENDING_NMIS`]), one `KVM_NMI` each; KVM then keeps at most one
    /// of them latched while the guest's NMI handler runs (see the
    /// [module documentation](self)).
    pub fn take_nmis(&mut self) -> u8 {
        core::mem::take(&mut self.events.nmis)
    }

    /// Takes a pending SMI.
    pub fn take_smi(&mut self) -> bool {
        core::mem::take(&mut self.events.smi)
    }

    /// Takes a pending INIT: the vCPU enters wait-for-SIPI (the APIC itself
    /// was already reset when the INIT arrived). A BSP resets instead.
    pub fn take_init(&mut self) -> bool {
        core::mem::take(&mut self.events.init)
    }

    /// Takes a pending start-up IPI: the vCPU, if waiting for SIPI, starts in
    /// real mode at `vector << 12`.
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.events.sipi.take()
    }

    /// Takes a pending ExtINT: the vCPU loop acknowledges the 8259 and
    /// injects the vector it gives (ExtINT bypasses IRR, ISR and EOI).
    pub fn take_extint(&mut self) -> bool {
        core::mem::take(&mut self.events.extint)
    }

    /// Whether any event (NMI, SMI, INIT, SIPI, ExtINT) is pending.
    pub const fn has_pending_event(&self) -> bool {
        let e = &self.events;
        e.nmis != 0 || e.smi || e.init || e.sipi.is_some() || e.extint
    }

    // -----------------------------------------------------------------------
    // Internals shared by the register, timer and MSR code
    // -----------------------------------------------------------------------

    /// INIT (SDM Vol. 3A 11.4.7.3): registers to their power-up values except
    /// the APIC ID and IA32_APIC_BASE; pending events cleared; INIT latched.
    pub(super) fn init(&mut self) {
        self.reset_registers();
        self.events = PendingEvents {
            init: true,
            ..PendingEvents::default()
        };
    }

    /// Every register except the APIC ID and IA32_APIC_BASE to its power-up
    /// value (SDM Vol. 3A 11.4.7.1). In x2APIC mode the LDR is re-derived.
    pub(super) fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = if self.is_x2apic() {
            x2apic_ldr(self.config.apic_id)
        } else {
            0
        };
        self.dfr = DFR_RESET;
        self.svr = SvrReg::from_bits(SVR_RESET);
        self.isr = VectorSet::EMPTY;
        self.irr = VectorSet::EMPTY;
        self.tmr = VectorSet::EMPTY;
        self.esr = 0;
        self.esr_pending = 0;
        self.icr = IcrReg::new();
        self.lvt = [LvtReg::from_bits(LVT_RESET); LVT_COUNT as usize];
        self.timer = Timer::default();
    }

    /// Sets the mask bit of every LVT entry (SDM Vol. 3A 11.4.7.2: software
    /// disable).
    pub(super) fn mask_all_lvts(&mut self) {
        for lvt in &mut self.lvt {
            lvt.set_masked(true);
        }
    }

    pub(super) fn lvt(&self, kind: LvtKind) -> LvtReg {
        self.lvt[kind.index()]
    }
}

/// Adds one to a counter; a restored counter at `u64::MAX` stays there.
fn bump(counter: &mut u64) {
    *counter = counter.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn new_power_up_state_per_sdm() {
        // Arrange / Act
        let mut lapic = Lapic::new(LapicConfig::new(3, false));
        // Assert
        assert!(lapic.hw_enabled());
        assert!(!lapic.sw_enabled());
        assert_eq!(lapic.mmio_base(), 0xfee0_0000);
        assert_eq!(read32(&mut lapic, spec::REG_ID, 0), 3 << 24);
        assert_eq!(read32(&mut lapic, spec::REG_SVR, 0), 0xff);
        assert_eq!(read32(&mut lapic, spec::REG_DFR, 0), 0xffff_ffff);
        assert_eq!(read32(&mut lapic, spec::REG_LVT_LINT0, 0), 1 << 16);
    }

    #[test]
    fn bus_target_xapic_reports_id_ldr_dfr_ppr() {
        // Arrange
        let mut lapic = enabled_lapic(7);
        set32(&mut lapic, spec::REG_LDR, 0x0800_0000);
        set32(&mut lapic, spec::REG_DFR, 0x0fff_ffff);
        set32(&mut lapic, spec::REG_TPR, 0x20);
        // Act
        let target = lapic.bus_target();
        // Assert
        assert_eq!(
            target,
            ApicTarget {
                apic_id: 7,
                x2apic: false,
                logical_id: 0x08,
                dfr_flat: false,
                hw_enabled: true,
                sw_enabled: true,
                arbitration_priority: 0x20,
            }
        );
    }

    #[test]
    fn bus_target_x2apic_reports_32_bit_id_and_derived_ldr() {
        // Arrange
        let mut lapic = enabled_lapic(0x123);
        to_x2apic(&mut lapic);
        // Act
        let target = lapic.bus_target();
        // Assert
        assert_eq!(target.apic_id, 0x123);
        assert!(target.x2apic);
        assert_eq!(target.logical_id, (0x12 << 16) | (1 << 3));
    }

    #[test]
    fn tsc_clock_started_after_time_zero_reaches_values_later() {
        // Arrange: a 1 GHz TSC that was 0 at 5000 ns.
        let clock = TscClock {
            hz: 1_000_000_000,
            tsc_at_zero: -5000,
        };
        // Act / Assert: unsigned comparison, as the processor's.
        assert_eq!(clock.tsc_at(5000), 0);
        assert_eq!(clock.tsc_at(7000), 2000);
        assert_eq!(clock.ns_at(0), 5000);
        assert_eq!(clock.ns_at(2000), 7000);
        assert_eq!(clock.ns_at(u64::MAX), u64::MAX);
    }

    #[test]
    fn tsc_clock_ns_at_inverts_tsc_at() {
        // Arrange
        let clock = TscClock {
            hz: 2_500_000_000,
            tsc_at_zero: 77,
        };
        // Act
        let ns = clock.ns_at(1_077);
        // Assert: the first ns at which the TSC has reached the value.
        assert_eq!(ns, 400);
        assert!(clock.tsc_at(ns) >= 1_077);
        assert!(clock.tsc_at(ns - 1) < 1_077);
    }
}
