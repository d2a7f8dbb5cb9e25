//! The BSP's initial state, as Multiboot v1 requires (spec 3.2, "Machine
//! state"). APs and the INIT/SIPI register side belong to the interrupt
//! controller (`irqchip_kvm::startup`).
//!
//! BSP: EAX = 0x2BADB002, EBX = the info block, CS a flat 32-bit code
//! segment (base 0, limit 4 GiB), DS/ES/FS/GS/SS flat 32-bit data, CR0.PE
//! set and paging off, EFLAGS.IF and VM clear, A20 on (always, under KVM).
//! The descriptor caches match the GDT the loader wrote, so a guest that
//! reloads a segment before setting up its own GDT still gets a flat one.

use irqchip_kvm::startup::{EFLAGS_RESERVED, reset_fpu};
use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;

use crate::error::{Error, Result};
use crate::loader::BootEntry;
use crate::loader::bootinfo::{BOOT_CS, BOOT_DS, BOOT_GDT};
use crate::loader::multiboot::BOOTLOADER_MAGIC;

/// CR0.PE.
const CR0_PE: u64 = 1 << 0;
/// CR0.ET (hard-wired on processors since the 486).
const CR0_ET: u64 = 1 << 4;

/// A flat 4 GiB 32-bit segment of `type_` (0xb: code exec/read accessed;
/// 0x3: data read/write accessed).
fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the BSP at the kernel's entry in 32-bit protected mode.
pub(crate) fn setup_bsp(vcpu: &VcpuFd, boot: &BootEntry) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    sregs.cs = flat_segment(BOOT_CS, 0xb);
    let data = flat_segment(BOOT_DS, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = u64::from(boot.gdt_addr);
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;

    let mut regs = vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
    regs.rip = u64::from(boot.entry);
    regs.rax = u64::from(BOOTLOADER_MAGIC);
    regs.rbx = u64::from(boot.info_addr);
    regs.rflags = EFLAGS_RESERVED;
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;

    Ok(reset_fpu(vcpu)?)
}

/// The vCPU's registers on one line, for fault reports.
pub(crate) fn regs_line(vcpu: &VcpuFd) -> String {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("registers unavailable: {e}"),
    };
    let mut s = format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.rbp
    );
    if let Ok(sr) = vcpu.get_sregs() {
        s.push_str(&format!(
            " cs={:#x} ss={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} gdt={:#x}/{:#x} idt={:#x}/{:#x}",
            sr.cs.selector,
            sr.ss.selector,
            sr.cr0,
            sr.cr2,
            sr.cr3,
            sr.cr4,
            sr.efer,
            sr.gdt.base,
            sr.gdt.limit,
            sr.idt.base,
            sr.idt.limit
        ));
    }
    if let Ok(ev) = vcpu.get_vcpu_events()
        && (ev.exception.injected != 0 || ev.exception.pending != 0)
    {
        s.push_str(&format!(
            " exception={} error_code={:#x}",
            ev.exception.nr, ev.exception.error_code
        ));
    }
    s
}
