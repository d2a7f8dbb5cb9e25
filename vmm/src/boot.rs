//! Initial vCPU state: the BSP as Multiboot v1 requires (spec 3.2, "Machine
//! state"), APs waiting for INIT/SIPI; and the register side of INIT and
//! SIPI for user mode, where no in-kernel LAPIC does it (SDM Vol. 3A 9.1.1
//! Table 9-1, 9.4.4).
//!
//! BSP: EAX = 0x2BADB002, EBX = the info block, CS a flat 32-bit code
//! segment (base 0, limit 4 GiB), DS/ES/FS/GS/SS flat 32-bit data, CR0.PE
//! set and paging off, EFLAGS.IF and VM clear, A20 on (always, under KVM).
//! The descriptor caches match the GDT the loader wrote, so a guest that
//! reloads a segment before setting up its own GDT still gets a flat one.

use kvm_bindings::{
    KVM_MP_STATE_UNINITIALIZED, kvm_debugregs, kvm_mp_state, kvm_segment, kvm_vcpu_events,
};
use kvm_ioctls::VcpuFd;

use crate::cli::IrqchipMode;

use crate::error::{Error, Result};
use crate::loader::BootEntry;
use crate::loader::bootinfo::{BOOT_CS, BOOT_DS, BOOT_GDT};
use crate::loader::multiboot::BOOTLOADER_MAGIC;

/// CR0.PE.
const CR0_PE: u64 = 1 << 0;
/// CR0.ET (hard-wired on processors since the 486).
const CR0_ET: u64 = 1 << 4;
/// CR0.NW and CR0.CD: kept by INIT (SDM Vol. 3A Table 9-1, note 2).
const CR0_NW_CD: u64 = (1 << 29) | (1 << 30);
/// DR6 and DR7 after INIT (SDM Vol. 3A Table 9-1).
const DR6_INIT: u64 = 0xffff_0ff0;
const DR7_INIT: u64 = 0x400;
/// CS selector and base after INIT; IP is [`RESET_IP`] (SDM Vol. 3A 9.1.4).
const RESET_CS_SELECTOR: u16 = 0xf000;
const RESET_CS_BASE: u64 = 0xffff_0000;
const RESET_IP: u64 = 0xfff0;
/// EFLAGS bit 1 is reserved and always set.
const EFLAGS_RESERVED: u64 = 1 << 1;
/// x87 control word after FNINIT.
const FPU_FCW_INIT: u16 = 0x37f;
/// MXCSR after reset.
const MXCSR_INIT: u32 = 0x1f80;

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

    init_fpu(vcpu)
}

/// Leaves an AP waiting for INIT/SIPI. Kernel and split modes: in
/// KVM_MP_STATE_UNINITIALIZED, and KVM's LAPIC starts it in real mode at the
/// SIPI vector. User mode: KVM without an in-kernel LAPIC refuses that MP
/// state, so the vCPU keeps KVM's reset state (which is the INIT state) and
/// its thread holds it until our LAPIC takes a SIPI ([`start_at_sipi`]).
pub(crate) fn setup_ap(vcpu: &VcpuFd, mode: IrqchipMode) -> Result<()> {
    init_fpu(vcpu)?;
    if mode == IrqchipMode::User {
        return Ok(());
    }
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_UNINITIALIZED,
    })
    .map_err(Error::kvm("KVM_SET_MP_STATE"))
}

/// A real-mode segment with `selector` and `base`, limit 64 KiB.
fn real_segment(selector: u16, base: u64, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s,
        ..Default::default()
    }
}

/// INIT (SDM Vol. 3A Table 9-1): general registers 0, EFLAGS 2, CS:IP
/// F000:FFF0 with base FFFF0000, data segments 0 with 64 KiB limits, GDTR
/// and IDTR base 0 limit FFFF, CR0 = ET plus its old CD/NW, CR2/3/4 and EFER
/// 0, DR6/DR7 at their INIT values, no pending event. x87/SSE state and
/// most MSRs (IA32_APIC_BASE included) are kept, as INIT keeps them.
pub(crate) fn init_state(vcpu: &VcpuFd) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    sregs.cs = real_segment(RESET_CS_SELECTOR, RESET_CS_BASE, 0xb, 1);
    let data = real_segment(0, 0, 0x3, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.ldt = real_segment(0, 0, 0x2, 0);
    sregs.tr = real_segment(0, 0, 0xb, 0);
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0xffff;
    sregs.idt.base = 0;
    sregs.idt.limit = 0xffff;
    sregs.cr0 = CR0_ET | (sregs.cr0 & CR0_NW_CD);
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: RESET_IP,
        rflags: EFLAGS_RESERVED,
        ..Default::default()
    })
    .map_err(Error::kvm("KVM_SET_REGS"))?;
    vcpu.set_debug_regs(&kvm_debugregs {
        dr6: DR6_INIT,
        dr7: DR7_INIT,
        ..Default::default()
    })
    .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
    // No exception, interrupt or NMI pending or in flight.
    vcpu.set_vcpu_events(&kvm_vcpu_events::default())
        .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
}

/// A start-up IPI with `vector` (SDM Vol. 3A 9.4.4.1, 11.6.1): real mode at
/// CS = vector << 8 (base vector << 12), IP = 0; everything else as INIT
/// left it.
pub(crate) fn start_at_sipi(vcpu: &VcpuFd, vector: u8) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    sregs.cs = real_segment(u16::from(vector) << 8, u64::from(vector) << 12, 0xb, 1);
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
    regs.rip = 0;
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
}

fn init_fpu(vcpu: &VcpuFd) -> Result<()> {
    let mut fpu = vcpu.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?;
    fpu.fcw = FPU_FCW_INIT;
    fpu.mxcsr = MXCSR_INIT;
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))
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
