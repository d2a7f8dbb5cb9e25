//! Local APIC driver: xAPIC (MMIO at 0xFEE0_0000) or x2APIC (MSRs), chosen
//! once on the BSP from CPUID.1:ECX[21] (the `x2apic=off` command-line option
//! forces xAPIC). Register arguments are xAPIC MMIO offsets; in x2APIC mode
//! they map to MSR 0x800 + offset / 16 (SDM Vol. 3A 11.12.1.2).

use core::sync::atomic::{AtomicBool, Ordering};

use irqconnect_abi::layout::LAPIC_MMIO_BASE;

use crate::cpu;

/// ID register (SDM 11.4.6).
pub const REG_ID: u32 = 0x20;
/// Version register (SDM 11.4.8).
pub const REG_VERSION: u32 = 0x30;
/// Task priority register (SDM 11.8.3.1).
pub const REG_TPR: u32 = 0x80;
/// Processor priority register (SDM 11.8.3.1).
pub const REG_PPR: u32 = 0xa0;
/// EOI register (SDM 11.8.5).
pub const REG_EOI: u32 = 0xb0;
/// Logical destination register (SDM 11.6.2.2).
pub const REG_LDR: u32 = 0xd0;
/// Destination format register, xAPIC only (SDM 11.6.2.2).
pub const REG_DFR: u32 = 0xe0;
/// Spurious-interrupt vector register (SDM 11.9).
pub const REG_SVR: u32 = 0xf0;
/// In-service register, 8 x 32 bits (SDM 11.8.4).
pub const REG_ISR: u32 = 0x100;
/// Trigger-mode register, 8 x 32 bits (SDM 11.8.4).
pub const REG_TMR: u32 = 0x180;
/// Interrupt-request register, 8 x 32 bits (SDM 11.8.4).
pub const REG_IRR: u32 = 0x200;
/// Error status register (SDM 11.5.3).
pub const REG_ESR: u32 = 0x280;
/// Interrupt command register, low half (SDM 11.6.1).
pub const REG_ICR_LOW: u32 = 0x300;
/// Interrupt command register, high half, xAPIC only.
pub const REG_ICR_HIGH: u32 = 0x310;
/// LVT timer (SDM 11.5.1).
pub const REG_LVT_TIMER: u32 = 0x320;
/// LVT LINT0.
pub const REG_LVT_LINT0: u32 = 0x350;
/// LVT LINT1.
pub const REG_LVT_LINT1: u32 = 0x360;
/// LVT error.
pub const REG_LVT_ERROR: u32 = 0x370;
/// Timer initial count (SDM 11.5.4).
pub const REG_TIMER_INITIAL: u32 = 0x380;
/// Timer current count.
pub const REG_TIMER_CURRENT: u32 = 0x390;
/// Timer divide configuration.
pub const REG_TIMER_DIVIDE: u32 = 0x3e0;

/// IA32_APIC_BASE MSR.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_APIC_BASE: this is the BSP.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE: APIC enabled.
pub const APIC_BASE_EN: u64 = 1 << 11;

/// SVR: APIC software enable.
pub const SVR_ENABLE: u32 = 1 << 8;
/// LVT: masked.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer: periodic mode.
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// LVT timer: TSC-deadline mode (CPUID.01H:ECX[24]; SDM 11.5.4.1).
pub const LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;
/// IA32_TSC_DEADLINE MSR (SDM 11.5.4.1).
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// Timer divide configuration value for divide-by-1.
pub const TIMER_DIVIDE_BY_1: u32 = 0b1011;
/// ICR: delivery status (send pending), xAPIC only.
pub const ICR_SEND_PENDING: u32 = 1 << 12;
/// ICR: level assert.
pub const ICR_ASSERT: u32 = 1 << 14;
/// ICR: logical destination mode.
pub const ICR_LOGICAL: u32 = 1 << 11;

/// The spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

static X2APIC: AtomicBool = AtomicBool::new(false);
static XAPIC_CLUSTER: AtomicBool = AtomicBool::new(false);

/// Processors the xAPIC flat model names (one LDR bit each).
pub const FLAT_PROCESSORS: usize = 8;
/// Processors in an xAPIC logical cluster.
pub const CLUSTER_SIZE: usize = 4;
/// Clusters of the xAPIC cluster model (cluster 15 is the broadcast).
pub const CLUSTERS: usize = 15;

/// True when the local APICs use the xAPIC cluster model (xAPIC mode with
/// more processors than the flat model names).
pub fn xapic_cluster() -> bool {
    !x2apic() && XAPIC_CLUSTER.load(Ordering::Relaxed)
}

/// Chooses the xAPIC logical model for `cpus` processors: flat up to 8,
/// cluster above (SDM Vol. 3A 11.6.2.2). Call on the BSP before the APs
/// run `init_cpu`.
pub fn choose_logical_model(cpus: usize) {
    XAPIC_CLUSTER.store(cpus > FLAT_PROCESSORS, Ordering::Relaxed);
}

/// The xAPIC logical ID processor `index` gets (LDR bits 24..31): flat
/// `1 << index` (0 past index 7), cluster `(index / 4) << 4 | 1 << (index
/// % 4)` (0 past index 59): the conventions SET_APIC_MODEL declares.
pub fn xapic_logical_id(index: usize) -> u32 {
    if xapic_cluster() {
        if index < CLUSTERS * CLUSTER_SIZE {
            (((index / CLUSTER_SIZE) << 4) | (1 << (index % CLUSTER_SIZE))) as u32
        } else {
            0
        }
    } else if index < FLAT_PROCESSORS {
        1 << index
    } else {
        0
    }
}

/// True when the local APICs run in x2APIC mode.
pub fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// True when CPUID.1:ECX[21] advertises x2APIC.
pub fn cpuid_has_x2apic() -> bool {
    cpu::cpuid(1, 0).2 & (1 << 21) != 0
}

/// Chooses the mode for every CPU. Call once on the BSP before `init_cpu`.
pub fn choose_mode(allow_x2apic: bool) {
    X2APIC.store(allow_x2apic && cpuid_has_x2apic(), Ordering::Relaxed);
}

/// Reads register `reg` (an xAPIC offset).
pub fn read(reg: u32) -> u32 {
    if x2apic() {
        // SAFETY: x2APIC mode is on, so MSR 0x800 + reg/16 exists for the
        // architectural registers callers pass; reads have no side effects.
        unsafe { cpu::rdmsr(0x800 + (reg >> 4)) as u32 }
    } else {
        // SAFETY: the LAPIC page is identity-mapped uncached; a 32-bit aligned
        // read of a register has no memory effects.
        unsafe { core::ptr::read_volatile((LAPIC_MMIO_BASE + u64::from(reg)) as *const u32) }
    }
}

/// Writes register `reg` (an xAPIC offset).
pub fn write(reg: u32, value: u32) {
    if x2apic() {
        // SAFETY: as in `read`; APIC register writes do not touch memory.
        unsafe { cpu::wrmsr(0x800 + (reg >> 4), u64::from(value)) }
    } else {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((LAPIC_MMIO_BASE + u64::from(reg)) as *mut u32, value) }
    }
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    let raw = read(REG_ID);
    if x2apic() { raw } else { raw >> 24 }
}

/// The IA32_APIC_BASE MSR.
pub fn apic_base() -> u64 {
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC.
    unsafe { cpu::rdmsr(MSR_APIC_BASE) }
}

/// Enables this CPU's local APIC in the chosen mode: SVR (spurious vector
/// 0xFF), TPR 0, LVTs masked, and in xAPIC mode DFR flat or cluster with
/// the LDR of [`xapic_logical_id`]. Returns the logical APIC ID.
pub fn init_cpu(index: usize) -> u32 {
    let base = apic_base();
    let mut want = base | APIC_BASE_EN;
    if x2apic() {
        if base & APIC_BASE_EN == 0 {
            // SAFETY: disabled -> xAPIC is a legal transition.
            unsafe { cpu::wrmsr(MSR_APIC_BASE, want) };
        }
        want |= APIC_BASE_EXTD;
    }
    if want != base {
        // SAFETY: xAPIC -> x2APIC (or disabled -> xAPIC) is a legal transition.
        unsafe { cpu::wrmsr(MSR_APIC_BASE, want) };
    }
    write(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(REG_TPR, 0);
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_ERROR, LVT_MASKED);
    let logical = if x2apic() {
        read(REG_LDR)
    } else {
        write(
            REG_DFR,
            if xapic_cluster() {
                0x0fff_ffff
            } else {
                0xffff_ffff
            },
        );
        write(REG_LDR, xapic_logical_id(index) << 24);
        read(REG_LDR) >> 24
    };
    write(REG_ESR, 0);
    logical
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

fn bit(base: u32, vector: u8) -> bool {
    let v = u32::from(vector);
    read(base + 0x10 * (v / 32)) & (1 << (v % 32)) != 0
}

/// ISR bit of `vector`.
pub fn in_service(vector: u8) -> bool {
    bit(REG_ISR, vector)
}

/// IRR bit of `vector`.
pub fn requested(vector: u8) -> bool {
    bit(REG_IRR, vector)
}

/// TMR bit of `vector` (set: accepted as level-triggered).
pub fn level_triggered(vector: u8) -> bool {
    bit(REG_TMR, vector)
}

/// ICR delivery modes (SDM 11.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Fixed.
    Fixed = 0,
    /// Lowest priority.
    LowestPriority = 1,
    /// NMI (vector ignored).
    Nmi = 4,
    /// INIT (vector ignored).
    Init = 5,
    /// Start-up (vector = page number).
    StartUp = 6,
}

/// ICR destinations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// One APIC ID.
    Physical(u32),
    /// A logical destination (flat bitmap, or x2APIC cluster ID).
    Logical(u32),
    /// Shorthand: self.
    SelfOnly,
    /// Shorthand: all including self.
    AllIncludingSelf,
    /// Shorthand: all excluding self.
    AllExcludingSelf,
}

/// Sends an IPI. Interrupts are held off while the ICR is written, so a
/// handler cannot interleave its own IPI between the xAPIC ICR halves.
pub fn send_ipi(vector: u8, delivery: Delivery, dest: Dest) {
    let (shorthand, logical, target) = match dest {
        Dest::Physical(id) => (0u32, false, id),
        Dest::Logical(id) => (0, true, id),
        Dest::SelfOnly => (1, false, 0),
        Dest::AllIncludingSelf => (2, false, 0),
        Dest::AllExcludingSelf => (3, false, 0),
    };
    let mut low = u32::from(vector) | ((delivery as u32) << 8) | ICR_ASSERT | (shorthand << 18);
    if logical {
        low |= ICR_LOGICAL;
    }
    let _irq = cpu::IrqGuard::new();
    if x2apic() {
        // SAFETY: x2APIC ICR MSR; sending an IPI has no memory effects here.
        unsafe { cpu::wrmsr(0x830, (u64::from(target) << 32) | u64::from(low)) };
    } else {
        wait_icr_idle();
        write(REG_ICR_HIGH, (target & 0xff) << 24);
        write(REG_ICR_LOW, low);
        wait_icr_idle();
    }
}

fn wait_icr_idle() {
    let mut spins = 0u32;
    while read(REG_ICR_LOW) & ICR_SEND_PENDING != 0 && spins < 1_000_000 {
        spins += 1;
        cpu::pause();
    }
}

/// Starts the timer: divide by 1 (one tick per bus cycle), `initial` ticks,
/// one-shot or periodic, optionally masked.
pub fn timer_start(vector: u8, initial: u32, periodic: bool, masked: bool) {
    let mut lvt = u32::from(vector);
    if periodic {
        lvt |= LVT_TIMER_PERIODIC;
    }
    if masked {
        lvt |= LVT_MASKED;
    }
    write(REG_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
    write(REG_LVT_TIMER, lvt);
    write(REG_TIMER_INITIAL, initial);
}

/// Stops the timer and masks its LVT.
pub fn timer_stop() {
    write(REG_TIMER_INITIAL, 0);
    write(REG_LVT_TIMER, LVT_MASKED);
}

/// Timer current count.
pub fn timer_current() -> u32 {
    read(REG_TIMER_CURRENT)
}
