//! Thin wrappers over x86-64 instructions: port I/O, MSRs, CPUID, control
//! registers, the TSC and the interrupt flag.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must be one whose write has no effect on memory safety (a device
/// register of ours, not e.g. a DMA controller pointed at kernel memory).
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// As for [`outb`] (reads can have side effects too).
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a 32-bit word from an I/O port.
///
/// # Safety
/// As for [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a model-specific register.
///
/// # Safety
/// The MSR must exist (else #GP) and reading it must have no side effects
/// the caller has not accounted for.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller vouches for the MSR.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR must exist and the value must not break memory safety (e.g.
/// moving GS base under code that relies on it).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID only reads; RBX is reserved by LLVM so it is saved in a
    // scratch register around the instruction.
    unsafe {
        asm!("mov {tmp:r}, rbx", "cpuid", "xchg {tmp:r}, rbx",
             tmp = out(reg) b, inout("eax") leaf => a, inout("ecx") subleaf => c, out("edx") d,
             options(nomem, nostack, preserves_flags))
    }
    (a, b, c, d)
}

/// Initial APIC ID of this CPU from CPUID (leaf 0xB x2APIC ID when present,
/// else leaf 1 EBX[31:24]).
pub fn cpuid_apic_id() -> u32 {
    let (max, ..) = cpuid(0, 0);
    if max >= 0xb {
        let (_, ebx, _, edx) = cpuid(0xb, 0);
        if ebx & 0xffff != 0 {
            return edx;
        }
    }
    cpuid(1, 0).1 >> 24
}

/// Time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CR8 (task priority class).
pub fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: reading CR8 has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Sets CR8. Memory-safe: it only changes which interrupt classes are held.
pub fn write_cr8(v: u64) {
    // SAFETY: CR8 only masks interrupt priority classes; `nomem` is not given
    // so the compiler does not move memory accesses across the change.
    unsafe { asm!("mov cr8, {}", in(reg) v, options(nostack, preserves_flags)) }
}

/// CR2 (last page-fault address).
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// RFLAGS.
pub fn rflags() -> u64 {
    let v: u64;
    // SAFETY: pushfq/pop only touch the stack slot they use.
    unsafe { asm!("pushfq", "pop {}", out(reg) v, options(nomem, preserves_flags)) }
    v
}

/// True when RFLAGS.IF is set.
pub fn interrupts_enabled() -> bool {
    rflags() & (1 << 9) != 0
}

/// Clears RFLAGS.IF.
pub fn cli() {
    // SAFETY: masking interrupts cannot break memory safety.
    unsafe { asm!("cli", options(nostack)) }
}

/// Sets RFLAGS.IF (interrupt handlers may run from here on).
pub fn sti() {
    // SAFETY: the IDT and handlers are installed before any caller runs.
    unsafe { asm!("sti", options(nostack)) }
}

/// `sti; hlt` back to back: an interrupt pending at the `sti` wakes the
/// `hlt` (the `sti` shadow covers the window), so checks done under `cli`
/// before this call cannot miss a wake-up.
pub fn sti_hlt() {
    // SAFETY: as for `sti`.
    unsafe { asm!("sti", "hlt", options(nostack)) }
}

/// `cli; hlt` forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops this CPU; nothing else.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Saves RFLAGS.IF and disables interrupts; restores IF when dropped.
pub struct IrqGuard {
    was_enabled: bool,
}

impl IrqGuard {
    /// Disables interrupts until the guard is dropped.
    pub fn new() -> Self {
        let was_enabled = interrupts_enabled();
        cli();
        Self { was_enabled }
    }
}

impl Drop for IrqGuard {
    fn drop(&mut self) {
        if self.was_enabled {
            sti();
        }
    }
}
