//! A vCPU's part of a snapshot where KVM's LAPIC holds it (kernel and
//! split modes): MP state, the register page, IA32_APIC_BASE and
//! IA32_TSC_DEADLINE.
//!
//! Save order: `KVM_GET_MP_STATE` first, because KVM applies a pending
//! INIT or SIPI when it is read (`kvm_apic_accept_events`), which changes
//! the registers read next. Restore order: IA32_APIC_BASE before the page
//! (KVM takes the page in the mode the base selects, xAPIC or x2APIC),
//! the page before IA32_TSC_DEADLINE (KVM ignores a deadline written while
//! the LVT timer is not in TSC-deadline mode), the MP state last.

use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED, Msrs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
};
use kvm_ioctls::VcpuFd;

use irqchip::lapic::{IA32_APIC_BASE, IA32_TSC_DEADLINE, KVM_LAPIC_PAGE_SIZE};

use crate::error::Error;
use crate::state::{Activity, LapicSnapshot, VcpuChipState};

type Result<T> = std::result::Result<T, Error>;

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs> {
    Msrs::from_entries(entries)
        .map_err(|e| Error::host("build an MSR list")(std::io::Error::other(format!("{e:?}"))))
}

fn read_msr(vcpu: &VcpuFd, index: u32, op: &'static str) -> Result<u64> {
    let mut msrs = msr_list(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])?;
    let read = vcpu.get_msrs(&mut msrs).map_err(Error::kvm(op))?;
    match msrs.as_slice().first() {
        Some(entry) if read == 1 => Ok(entry.data),
        _ => Err(Error::Host {
            op,
            source: std::io::Error::other("KVM returned no value"),
        }),
    }
}

fn write_msr(vcpu: &VcpuFd, index: u32, data: u64, op: &'static str) -> Result<()> {
    let msrs = msr_list(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])?;
    match vcpu.set_msrs(&msrs).map_err(Error::kvm(op))? {
        1 => Ok(()),
        _ => Err(Error::Host {
            op,
            source: std::io::Error::other(format!("KVM refused the value {data:#x}")),
        }),
    }
}

/// The vCPU's part, read from KVM.
pub(crate) fn save(vcpu: &VcpuFd) -> Result<VcpuChipState> {
    let mp = vcpu
        .get_mp_state()
        .map_err(Error::kvm("KVM_GET_MP_STATE"))?;
    let activity = match mp.mp_state {
        KVM_MP_STATE_RUNNABLE => Activity::Running,
        KVM_MP_STATE_HALTED => Activity::Halted,
        KVM_MP_STATE_INIT_RECEIVED | KVM_MP_STATE_UNINITIALIZED => Activity::WaitForSipi,
        other => {
            return Err(Error::Host {
                op: "KVM_GET_MP_STATE",
                source: std::io::Error::other(format!(
                    "MP state {other} has no snapshot form (a start-up IPI in flight)"
                )),
            });
        }
    };
    let lapic = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    let page = lapic.regs.iter().map(|&b| b as u8).collect();
    let apic_base = read_msr(vcpu, IA32_APIC_BASE, "KVM_GET_MSRS(IA32_APIC_BASE)")?;
    let tsc_deadline = read_msr(vcpu, IA32_TSC_DEADLINE, "KVM_GET_MSRS(IA32_TSC_DEADLINE)")?;
    Ok(VcpuChipState {
        lapic: LapicSnapshot::Kvm {
            page,
            apic_base,
            tsc_deadline,
        },
        activity,
    })
}

/// Puts the vCPU's part back into KVM (see the module documentation for
/// the order).
pub(crate) fn restore(vcpu: &VcpuFd, state: &VcpuChipState) -> Result<()> {
    let LapicSnapshot::Kvm {
        page,
        apic_base,
        tsc_deadline,
    } = &state.lapic
    else {
        return Err(Error::Config(
            "a user-mode LAPIC state reached KVM's LAPIC unconverted".to_string(),
        ));
    };
    write_msr(
        vcpu,
        IA32_APIC_BASE,
        *apic_base,
        "KVM_SET_MSRS(IA32_APIC_BASE)",
    )?;
    let mut lapic = kvm_lapic_state::default();
    if page.len() != KVM_LAPIC_PAGE_SIZE {
        return Err(Error::Config(format!(
            "a LAPIC page of {} bytes",
            page.len()
        )));
    }
    for (dst, &src) in lapic.regs.iter_mut().zip(page) {
        *dst = src as _;
    }
    vcpu.set_lapic(&lapic)
        .map_err(Error::kvm("KVM_SET_LAPIC"))?;
    if *tsc_deadline != 0 {
        write_msr(
            vcpu,
            IA32_TSC_DEADLINE,
            *tsc_deadline,
            "KVM_SET_MSRS(IA32_TSC_DEADLINE)",
        )?;
    }
    let mp_state = match state.activity {
        Activity::Running => KVM_MP_STATE_RUNNABLE,
        Activity::Halted => KVM_MP_STATE_HALTED,
        Activity::WaitForSipi => KVM_MP_STATE_INIT_RECEIVED,
    };
    vcpu.set_mp_state(kvm_mp_state { mp_state })
        .map_err(Error::kvm("KVM_SET_MP_STATE"))
}
