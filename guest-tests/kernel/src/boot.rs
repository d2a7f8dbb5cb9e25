//! Boot code in assembly: the Multiboot v1 header (a.out kludge), the 32-bit
//! entry that builds the identity map and enters long mode, the GDT, the boot
//! and AP stacks, the AP real-mode trampoline and the interrupt entry stubs.
//!
//! Memory map set up here: 0..4 GiB identity-mapped with 2 MiB pages; the
//! pages from 0xFEC0_0000 up (IOAPIC, LAPIC) are uncached (PCD|PWT).
//!
//! Interrupt entry: every vector has a 16-byte stub at `isr_stubs + 16 * v`
//! that pushes a dummy error code (when the CPU pushes none) and the vector.
//! Vectors 0..31 run on their IST stack (`isr_direct`). Vectors 32..255 arrive
//! on IST1 and `isr_switch` moves the frame onto the interrupted stack 128
//! bytes below its RSP, so a leaf function's red zone is never touched and
//! IST1 is free again for a nested interrupt. The common body saves the 15
//! general registers and the FXSAVE area (16-byte aligned), calls
//! `interrupt_dispatch(&mut InterruptFrame)`, restores and `iretq`s.

use crate::gdt::{GDT_ENTRIES, SEL_CODE32, SEL_CODE64, SEL_DATA};
use crate::percpu::MAX_CPUS;

/// Bytes of each AP's kernel stack.
pub const AP_STACK_SIZE: usize = 64 * 1024;
/// Bytes of the IST1 stack (interrupts; holds only the entry frame).
pub const IST1_SIZE: usize = 4 * 1024;
/// Bytes of the IST2 stack (NMI).
pub const IST2_SIZE: usize = 16 * 1024;
/// Bytes of the IST3 stack (exceptions).
pub const IST3_SIZE: usize = 16 * 1024;
/// IST bytes per CPU.
pub const IST_PER_CPU: usize = IST1_SIZE + IST2_SIZE + IST3_SIZE;
/// Physical address the AP trampoline is copied to (SIPI vector 0x08).
pub const TRAMPOLINE_ADDR: usize = 0x8000;

core::arch::global_asm!(
    r#"
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x00010000

.section .multiboot, "a"
.balign 4
multiboot_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long multiboot_header
    .long __image_start
    .long __load_end
    .long __bss_end
    .long _start32

.section .text.boot, "ax"
.code32
.global _start32
_start32:
    cli
    cld
    movl $boot_stack_top, %esp
    movl %eax, boot_magic
    movl %ebx, boot_info

    /* zero PML4 and PDPT (the PDs are written in full below) */
    movl $pml4, %edi
    xorl %eax, %eax
    movl $2048, %ecx
    rep stosl

    movl $pdpt, %eax
    orl $3, %eax
    movl %eax, pml4
    movl $pd, %eax
    orl $3, %eax
    movl %eax, pdpt
    addl $4096, %eax
    movl %eax, pdpt + 8
    addl $4096, %eax
    movl %eax, pdpt + 16
    addl $4096, %eax
    movl %eax, pdpt + 24

    /* pd[i] = i * 2 MiB | P | RW | PS, uncached from 0xFEC00000 up */
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    cmpl $0x7F6, %ecx
    jb 2f
    orl $0x18, %eax
2:
    movl %eax, pd(,%ecx,8)
    movl $0, pd + 4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 1b

    call enter_long_mode_32
    lgdt gdt_ptr
    ljmp ${code64}, $long_entry

/* Shared by the BSP and the APs: PAE + OSFXSR + OSXMMEXCPT, CR3, EFER.LME,
   then CR0.PG|NE|MP|PE with EM clear. Must run from a 32-bit segment. */
.global enter_long_mode_32
enter_long_mode_32:
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xFFFFFFFB, %eax
    orl $0x80000023, %eax
    movl %eax, %cr0
    ret

.code64
long_entry:
    movw ${data}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq boot_stack_top(%rip), %rsp
    fninit
    /* MXCSR keeps its reset value 0x1F80 (an emulating host may lack ldmxcsr; see guest-tests/README.md) */
    movl boot_magic(%rip), %edi
    movl boot_info(%rip), %esi
    call kernel_main
3:
    cli
    hlt
    jmp 3b

/* An AP after the trampoline: take a ticket, pick that ticket's stack. */
.global ap_long_entry
ap_long_entry:
    movw ${data}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl $1, %eax
    lock xaddl %eax, ap_ticket(%rip)
    cmpl ${max_aps}, %eax
    jae 9f
    movl %eax, %edi
    leal 1(%rax), %ecx
    imulq ${ap_stack}, %rcx, %rcx
    leaq ap_stacks(%rip), %rsp
    addq %rcx, %rsp
    fninit
    /* MXCSR keeps its reset value 0x1F80 (an emulating host may lack ldmxcsr; see guest-tests/README.md) */
    call ap_main
9:
    cli
    hlt
    jmp 9b

/* AP trampoline: copied to TRAMPOLINE_ADDR, entered in real mode at 0x0800:0 */
.section .text.trampoline, "ax"
.balign 16
.global ap_tramp_start
ap_tramp_start:
.code16
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    lgdtl ap_gdtr - ap_tramp_start + {tramp}
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl ${code32}, $(ap_prot - ap_tramp_start + {tramp})
.code32
ap_prot:
    movw ${data}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $(ap_tramp_stack - ap_tramp_start + {tramp}), %esp
    movl $enter_long_mode_32, %eax
    call *%eax
    ljmp ${code64}, $ap_long_entry
.balign 8
ap_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
    .long 0
    .skip 32
ap_tramp_stack:
.global ap_tramp_end
ap_tramp_end:

.section .data
.balign 16
.global gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CF9A000000FFFF
    .fill {gdt_tss_slots}, 8, 0
gdt_end:
.balign 8
.global gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
mxcsr_init:
    .long 0x1F80
.global boot_magic
boot_magic:
    .long 0
.global boot_info
boot_info:
    .long 0
.global ap_ticket
ap_ticket:
    .long 0

.section .bss.boot, "aw", @nobits
.balign 4096
.global pml4
pml4:
    .skip 4096
pdpt:
    .skip 4096
pd:
    .skip 16384
.balign 16
boot_stack_bottom:
    .skip 65536
.global boot_stack_top
boot_stack_top:
.global ap_stacks
ap_stacks:
    .skip {ap_stacks_size}
.global ist_stacks
ist_stacks:
    .skip {ist_size}

/* ---------------- interrupt entry ---------------- */
.section .text
.code64
.balign 16
.global isr_stubs
isr_stubs:
.set vec, 0
.rept 256
.balign 16
.if (vec == 8) | (vec == 10) | (vec == 11) | (vec == 12) | (vec == 13) | (vec == 14) | (vec == 17) | (vec == 21) | (vec == 29) | (vec == 30)
    pushq $vec
.else
    pushq $0
    pushq $vec
.endif
.if vec < 32
    jmp isr_direct
.else
    jmp isr_switch
.endif
.set vec, vec + 1
.endr

/* On IST1: move {{vector, error, rip, cs, rflags, rsp, ss}} below the red
   zone of the interrupted stack and continue there. */
isr_switch:
    pushq %rax
    pushq %rcx
    pushq %rsi
    movq 64(%rsp), %rax
    subq $128, %rax
    andq $-16, %rax
    subq $80, %rax
    xorl %ecx, %ecx
4:
    movq (%rsp,%rcx,8), %rsi
    movq %rsi, (%rax,%rcx,8)
    incl %ecx
    cmpl $10, %ecx
    jne 4b
    movq %rax, %rsp
    popq %rsi
    popq %rcx
    popq %rax
isr_direct:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rbx
    subq $512, %rsp
    fxsave64 (%rsp)
    movq %rbx, %rdi
    cld
    call interrupt_dispatch
    fxrstor64 (%rsp)
    movq %rbx, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
"#,
    code64 = const SEL_CODE64,
    code32 = const SEL_CODE32,
    data = const SEL_DATA,
    tramp = const TRAMPOLINE_ADDR,
    max_aps = const MAX_CPUS - 1,
    ap_stack = const AP_STACK_SIZE,
    ap_stacks_size = const AP_STACK_SIZE * (MAX_CPUS - 1),
    ist_size = const IST_PER_CPU * MAX_CPUS,
    gdt_tss_slots = const GDT_ENTRIES - 4,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_ticket: core::sync::atomic::AtomicU32;
    static isr_stubs: u8;
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ist_stacks: u8;
}

/// Restarts the APs' tickets (their stacks) at 0: for the second start of
/// every AP, once none of them runs (all wait for SIPI after INIT).
pub fn reset_ap_tickets() {
    // SAFETY: `ap_ticket` is the asm's 4-byte, 4-aligned counter, which
    // the APs only touch with a locked xadd: an atomic fits it.
    unsafe { ap_ticket.store(0, core::sync::atomic::Ordering::SeqCst) };
}

/// Sets the next AP ticket (the stack the next AP to start takes) to
/// `ticket`: for restarting one AP (INIT, SIPI) on a stack no running AP
/// uses.
pub fn set_ap_ticket(ticket: u32) {
    // SAFETY: as in `reset_ap_tickets`.
    unsafe { ap_ticket.store(ticket, core::sync::atomic::Ordering::SeqCst) };
}

/// Address of the entry stub of `vector`.
pub fn isr_stub(vector: u8) -> u64 {
    // The stubs are 16-byte aligned slots, one per vector (see the asm above).
    (&raw const isr_stubs) as u64 + 16 * u64::from(vector)
}

/// The AP trampoline's bytes inside the image, as (start, length).
pub fn trampoline() -> (*const u8, usize) {
    let start = &raw const ap_tramp_start;
    let end = &raw const ap_tramp_end;
    (start, end as usize - start as usize)
}

/// Top (exclusive) of IST stack `ist` (1..=3) of CPU `index`.
pub fn ist_top(index: usize, ist: usize) -> u64 {
    let base = (&raw const ist_stacks) as u64 + (index * IST_PER_CPU) as u64;
    let end = match ist {
        1 => IST1_SIZE,
        2 => IST1_SIZE + IST2_SIZE,
        _ => IST_PER_CPU,
    };
    base + end as u64
}
