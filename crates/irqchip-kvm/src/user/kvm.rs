//! The KVM side of user mode: the one raw ioctl kvm-ioctls lacks
//! (`KVM_INTERRUPT`), the MSR exits that bring x2APIC, IA32_APIC_BASE and
//! IA32_TSC_DEADLINE to our LAPIC, the IA32_APIC_BASE mirror KVM needs for
//! CPUID, whether KVM still holds an NMI, and the guest TSC as a clock for
//! TSC-deadline mode.

use irqchip::lapic::{IA32_APIC_BASE, IA32_TSC_DEADLINE, TscClock};
use kvm_bindings::{
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN, KVMIO, Msrs, kvm_enable_cap, kvm_interrupt, kvm_msr_entry,
};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};
use vmm_sys_util::ioctl::{_IOC_WRITE, ioctl_expr, ioctl_with_ref};

use crate::error::Error;

type Result<T> = std::result::Result<T, Error>;

/// `KVM_INTERRUPT`: `_IOW(KVMIO, 0x86, struct kvm_interrupt)` (KVM API 4.16).
const KVM_INTERRUPT: libc::c_ulong = ioctl_expr(
    _IOC_WRITE,
    KVMIO,
    0x86,
    std::mem::size_of::<kvm_interrupt>() as u32,
);

/// Queues external interrupt `vector` for injection at the next entry
/// (valid only without an in-kernel LAPIC). `EEXIST` when one is already
/// queued.
pub(super) fn interrupt(vcpu: &VcpuFd, vector: u8) -> std::result::Result<(), kvm_ioctls::Error> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: `vcpu` is an open vCPU descriptor; KVM_INTERRUPT reads one
    // `struct kvm_interrupt` through the pointer, which points at `irq`,
    // alive and of that type for the whole call; the kernel writes no memory
    // of ours. The return value is checked.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT, &irq) };
    if ret == 0 {
        Ok(())
    } else {
        Err(kvm_ioctls::Error::last())
    }
}

/// Sends RDMSR/WRMSR of MSRs KVM does not handle itself to user space:
/// without an in-kernel LAPIC, KVM fails the x2APIC range 0x800..0x8FF
/// (reason INVAL), knows nothing of some MSRs (UNKNOWN), and the filter
/// below makes it give up IA32_APIC_BASE and IA32_TSC_DEADLINE (FILTER),
/// which it would otherwise absorb: it stores IA32_APIC_BASE without any of
/// the LAPIC's side effects and ignores IA32_TSC_DEADLINE writes.
pub(super) fn route_msrs_to_user_space(vm: &VmFd) -> Result<()> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(
        KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER,
    );
    vm.enable_cap(&cap)
        .map_err(Error::kvm("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)"))?;
    let deny = [0u8];
    let both = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
    let ranges = [IA32_APIC_BASE, IA32_TSC_DEADLINE].map(|base| MsrFilterRange {
        flags: both,
        base,
        msr_count: 1,
        bitmap: &deny,
    });
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(Error::kvm("KVM_X86_SET_MSR_FILTER"))
}

/// Whether KVM holds an NMI it has not delivered: pending, or being
/// injected (`KVM_GET_VCPU_EVENTS` first moves NMIs queued by `KVM_NMI`
/// to pending).
pub(super) fn nmi_held(vcpu: &VcpuFd) -> std::result::Result<bool, kvm_ioctls::Error> {
    let events = vcpu.get_vcpu_events()?;
    Ok(events.nmi.pending != 0 || events.nmi.injected != 0)
}

/// IA32_TIME_STAMP_COUNTER (SDM Vol. 4, Table 2-2).
const IA32_TSC: u32 = 0x10;

/// The guest's TSC as a function of the LAPIC models' clock (`now()`, ns),
/// for TSC-deadline mode.
///
/// The rate is KVM's for this vCPU (`KVM_GET_TSC_KHZ`), at which the guest
/// TSC runs whether or not KVM scales it. The offset comes from reading the
/// guest TSC (IA32_TSC through `KVM_GET_MSRS`; host-initiated, so the MSR
/// filter does not apply) and then `now()`: the clock maps each instant to
/// a TSC value no later than the guest's, and with the rate rounded down to
/// a kHz, a deadline fires no earlier than the guest's TSC reaches it
/// (later by the read's duration at most). The TSC is read, not set: KVM
/// keeps the vCPUs' TSCs synchronised from their creation on, and a write
/// could undo that.
pub(super) fn tsc_clock(vcpu: &VcpuFd, now: impl FnOnce() -> u64) -> Result<TscClock> {
    let khz = vcpu.get_tsc_khz().map_err(Error::kvm("KVM_GET_TSC_KHZ"))?;
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        ..Default::default()
    }])
    .map_err(|e| Error::Host {
        op: "build an MSR list",
        source: std::io::Error::other(format!("{e:?}")),
    })?;
    let read = vcpu
        .get_msrs(&mut msrs)
        .map_err(Error::kvm("KVM_GET_MSRS(IA32_TSC)"))?;
    let at = now();
    let tsc = match msrs.as_slice().first() {
        Some(entry) if read == 1 => entry.data,
        _ => {
            return Err(Error::Host {
                op: "KVM_GET_MSRS(IA32_TSC)",
                source: std::io::Error::other("KVM returned no value"),
            });
        }
    };
    let hz = u64::from(khz).saturating_mul(1000);
    let elapsed = TscClock { hz, tsc_at_zero: 0 }.tsc_at(at);
    // Negative when KVM started this TSC after the models' clock.
    let tsc_at_zero =
        i64::try_from(i128::from(tsc) - i128::from(elapsed)).map_err(|_| Error::Host {
            op: "KVM_GET_MSRS(IA32_TSC)",
            source: std::io::Error::other(format!("guest TSC {tsc:#x} out of range")),
        })?;
    Ok(TscClock { hz, tsc_at_zero })
}

/// Tells KVM the vCPU's IA32_APIC_BASE (host-initiated, so the filter does
/// not apply): KVM derives CPUID.01H:EDX.APIC from its enable bit.
pub(super) fn mirror_apic_base(vcpu: &VcpuFd, value: u64) -> Result<()> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_APIC_BASE,
        data: value,
        ..Default::default()
    }])
    .map_err(|e| Error::host("build an MSR list")(std::io::Error::other(format!("{e:?}"))))?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(_) => Err(Error::Host {
            op: "KVM_SET_MSRS(IA32_APIC_BASE)",
            source: std::io::Error::other("KVM refused the value"),
        }),
        Err(e) => Err(Error::kvm("KVM_SET_MSRS(IA32_APIC_BASE)")(e)),
    }
}
