//! The IDT, shared by all CPUs: every vector an interrupt gate (IF cleared on
//! entry) on an IST stack: exceptions IST3, NMI IST2, everything else IST1.

use core::cell::UnsafeCell;

use crate::boot;
use crate::gdt::SEL_CODE64;

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

struct Idt(UnsafeCell<[Gate; 256]>);

// SAFETY: written once by the BSP before any AP starts or interrupts are
// enabled; read-only afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new(
    [Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    }; 256],
));

/// Fills the IDT. Call once on the BSP before interrupts are enabled.
pub fn init() {
    let table = IDT.0.get();
    for vector in 0..=255u8 {
        let handler = boot::isr_stub(vector);
        let ist = match vector {
            2 => 2,
            0..=31 => 3,
            _ => 1,
        };
        let gate = Gate {
            offset_low: handler as u16,
            selector: SEL_CODE64,
            ist,
            type_attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
        // SAFETY: single writer before any CPU loads the table (see `Sync`).
        unsafe { (*table)[usize::from(vector)] = gate };
    }
}

/// Loads the IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer {
        limit: (256 * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is static and filled by `init`; every gate points at a
    // stub of `boot.rs`.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags))
    }
}
