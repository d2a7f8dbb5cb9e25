//! Guest RAM: one anonymous mapping from guest-physical 0, below the MMIO
//! hole (`layout::MMIO_HOLE_START`), registered with KVM as slot 0.

use irqconnect_abi::layout::{MMIO_HOLE_START, RAM_BASE};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};

/// Allocates `bytes` of guest RAM.
pub(crate) fn create(bytes: u64) -> Result<GuestMemoryMmap> {
    if bytes == 0 || RAM_BASE + bytes > MMIO_HOLE_START {
        return Err(Error::Memory(format!(
            "{} MiB does not fit below the MMIO hole at {MMIO_HOLE_START:#x}",
            bytes >> 20
        )));
    }
    let size = usize::try_from(bytes).map_err(|_| Error::Memory("size overflow".into()))?;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM_BASE), size)])
        .map_err(|e| Error::Memory(format!("allocate {} MiB: {e}", bytes >> 20)))
}

/// Registers every region of `mem` with the VM.
pub(crate) fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(format!("host address of guest RAM: {e}")))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned
        // by `mem`, which the caller keeps alive for as long as the VM runs
        // (the VM is torn down before `mem` is dropped, see `machine`). The
        // slot numbers are distinct and the ranges do not overlap.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}
