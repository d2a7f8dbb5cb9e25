//! GDT (defined in `boot.rs`) and one TSS per CPU with three IST stacks:
//! IST1 interrupts, IST2 NMI, IST3 exceptions.

use core::cell::UnsafeCell;

use crate::boot;
use crate::percpu::MAX_CPUS;

/// 64-bit kernel code selector.
pub const SEL_CODE64: u16 = 0x08;
/// Kernel data selector.
pub const SEL_DATA: u16 = 0x10;
/// 32-bit code selector (AP trampoline).
pub const SEL_CODE32: u16 = 0x18;
/// GDT entries: null, code64, data, code32, then a 16-byte TSS descriptor per CPU.
pub const GDT_ENTRIES: usize = 4 + 2 * MAX_CPUS;

/// The 64-bit TSS (SDM Vol. 3A 7.7).
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

struct TssSlot(UnsafeCell<Tss>);

// SAFETY: each slot is written only by its own CPU during its bring-up,
// before `ltr`; the CPU reads it afterwards.
unsafe impl Sync for TssSlot {}

static TSS: [TssSlot; MAX_CPUS] = [const {
    TssSlot(UnsafeCell::new(Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: 104,
    }))
}; MAX_CPUS];

unsafe extern "C" {
    static mut gdt: [u64; GDT_ENTRIES];
}

/// Fills CPU `index`'s TSS and GDT descriptor and loads TR.
///
/// # Safety
/// Call once on CPU `index` itself, during its bring-up.
pub unsafe fn init_cpu(index: usize) {
    let tss = TSS[index].0.get();
    // SAFETY: only this CPU touches its slot, and TR is not loaded yet.
    unsafe {
        (*tss).ist[0] = boot::ist_top(index, 1);
        (*tss).ist[1] = boot::ist_top(index, 2);
        (*tss).ist[2] = boot::ist_top(index, 3);
    }
    let base = tss as u64;
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let high = base >> 32;
    let slot = 4 + 2 * index;
    // SAFETY: slots 4 + 2i and 5 + 2i belong to CPU i alone; the GDT is
    // static and already loaded, so writing a not-yet-used descriptor is fine.
    unsafe {
        let table = &raw mut gdt;
        (*table)[slot] = low;
        (*table)[slot + 1] = high;
        core::arch::asm!("ltr {:x}", in(reg) (slot * 8) as u16, options(nostack, preserves_flags));
    }
}
