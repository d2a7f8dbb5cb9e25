//! The register side of a processor's start: APs waiting for INIT/SIPI,
//! and the INIT and SIPI register changes that user mode makes itself,
//! where no in-kernel LAPIC does them (SDM Vol. 3A 9.1.1 Table 9-1,
//! 9.4.4).

use kvm_bindings::{
    KVM_MP_STATE_UNINITIALIZED, kvm_debugregs, kvm_mp_state, kvm_segment, kvm_vcpu_events,
};
use kvm_ioctls::VcpuFd;

use crate::error::Error;
use irqchip::Mode;

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
pub const EFLAGS_RESERVED: u64 = 1 << 1;
/// x87 control word after FNINIT.
const FPU_FCW_INIT: u16 = 0x37f;
/// MXCSR after reset.
const MXCSR_INIT: u32 = 0x1f80;

type Result<T> = std::result::Result<T, Error>;

/// Leaves an AP waiting for INIT/SIPI. Kernel and split modes: in
/// KVM_MP_STATE_UNINITIALIZED, and KVM's LAPIC starts it in real mode at the
/// SIPI vector. User mode: KVM without an in-kernel LAPIC refuses that MP
/// state, so the vCPU keeps KVM's reset state (which is the INIT state) and
/// its thread holds it until our LAPIC takes a SIPI ([`start_at_sipi`]).
pub(crate) fn leave_waiting_for_sipi(vcpu: &VcpuFd, mode: Mode) -> Result<()> {
    reset_fpu(vcpu)?;
    if !mode.kvm_lapic() {
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

/// Puts the x87 and SSE control registers in their reset state (FCW
/// 0x37f, MXCSR 0x1f80), which KVM does not do for a new vCPU. A VMM that
/// starts the BSP itself calls it for the BSP; the chip calls it for APs.
///
/// # Errors
///
/// `KVM_GET_FPU` or `KVM_SET_FPU` failed.
pub fn reset_fpu(vcpu: &VcpuFd) -> Result<()> {
    let mut fpu = vcpu.get_fpu().map_err(Error::kvm("KVM_GET_FPU"))?;
    fpu.fcw = FPU_FCW_INIT;
    fpu.mxcsr = MXCSR_INIT;
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))
}
