//! A vCPU's architectural state in a snapshot: registers, special
//! registers, FPU/SSE/AVX (XSAVE), XCRs, debug registers, the MSRs KVM
//! reports as saveable, and vCPU events (pending exception, NMI, interrupt
//! shadow). The interrupt controller's part (LAPIC, MP state) is
//! `irqchip_kvm`'s.
//!
//! Restore order, as KVM needs it: special registers, registers, XSAVE,
//! XCRs, debug registers, MSRs (IA32_TSC among them: the chip's part
//! anchors user mode's TSC-deadline clock to it), then the chip's part,
//! then the events last ([`restore_events`]), so nothing a later call
//! does drops a pending NMI or exception.

use kvm_bindings::{
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR, Msrs, kvm_debugregs,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use irqchip::lapic::{IA32_APIC_BASE, IA32_TSC_DEADLINE, X2APIC_MSR_FIRST, X2APIC_MSR_LAST};

use crate::error::{Error, Result};

/// Most MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS` call (kvm-bindings' `Msrs`
/// holds at most 256).
const MSR_CHUNK: usize = 200;

/// One vCPU's registers.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

impl VcpuState {
    /// A vCPU at reset as KVM's structures are zeroed (the fuzz harness's
    /// synthetic snapshots; never restored into KVM).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn zeroed() -> Self {
        Self {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 0x1234,
                ..Default::default()
            }],
            events: Default::default(),
        }
    }
}

/// The MSRs to save: KVM's saveable list, minus those the interrupt
/// controller's part carries (IA32_APIC_BASE, IA32_TSC_DEADLINE, the
/// x2APIC range).
pub(crate) fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| {
            i != IA32_APIC_BASE
                && i != IA32_TSC_DEADLINE
                && !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&i)
        })
        .collect())
}

/// KVM's XSAVE area fits the 4 KiB `kvm_xsave` (no AMX state): what
/// `KVM_SET_XSAVE` with a `kvm_xsave` needs.
pub(crate) fn check_xsave(vm: &VmFd) -> Result<()> {
    let size = vm.check_extension_int(Cap::Xsave2);
    if size > 0 && size as usize > std::mem::size_of::<kvm_xsave>() {
        return Err(Error::Snapshot(format!(
            "the guest's XSAVE state needs {size} bytes, more than the 4 KiB this snapshot format holds"
        )));
    }
    Ok(())
}

fn msrs(entries: &[kvm_msr_entry]) -> Result<Msrs> {
    Msrs::from_entries(entries)
        .map_err(|e| Error::Snapshot(format!("MSR list of {} entries: {e:?}", entries.len())))
}

/// Reads `indices`; an MSR KVM lists but refuses to read is left out.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut list = msrs(&entries)?;
        let n = vcpu
            .get_msrs(&mut list)
            .map_err(Error::kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&list.as_slice()[..n.min(chunk.len())]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let skip = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[skip.min(rest.len())..];
    }
    Ok(out)
}

/// Reads every register of a paused vCPU.
pub(crate) fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(Error::kvm("KVM_GET_DEBUGREGS"))?,
        msrs: read_msrs(vcpu, msr_indices)?,
        events: vcpu
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Writes every register but the events (see the module documentation).
/// `check_xsave` must have passed on the VM.
pub(crate) fn restore_registers(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    vcpu.set_sregs(&state.sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&state.regs)
        .map_err(Error::kvm("KVM_SET_REGS"))?;
    // SAFETY: `check_xsave` found KVM's XSAVE area no larger than
    // `kvm_xsave`, so KVM reads nothing past the structure.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(Error::kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
    let mut rest: &[kvm_msr_entry] = &state.msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let n = vcpu
            .set_msrs(&msrs(chunk)?)
            .map_err(Error::kvm("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            // KVM refuses some writes in some modes (a paravirtual MSR
            // whose feature needs an in-kernel LAPIC); one that would not
            // change the value KVM holds changes nothing and is skipped.
            let refused = chunk[n];
            let now = read_msrs(vcpu, &[refused.index])?;
            if now.first().map(|e| e.data) != Some(refused.data) {
                return Err(Error::Snapshot(format!(
                    "KVM refused MSR {:#x} = {:#x}",
                    refused.index, refused.data
                )));
            }
        }
        let done = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[done.min(rest.len())..];
    }
    Ok(())
}

/// Writes the vCPU events, last: the pending NMI and the SIPI vector
/// count as given.
pub(crate) fn restore_events(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    let mut events = state.events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    vcpu.set_vcpu_events(&events)
        .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
}
