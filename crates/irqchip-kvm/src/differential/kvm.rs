//! The KVM side of the differential: a process-wide pool of two VMs (one
//! per `KVM_CAP_X2APIC_API` setting) whose vCPUs never run, brought back to
//! their creation state before every input.
//!
//! Creating a VM with an in-kernel irqchip and its vCPUs costs about 20 ms
//! here, so a VM per input would cap the target at ~40 inputs/s. Each VM is
//! created once per process instead, with a fixed set of vCPUs
//! ([`POOL_IDS`]: their vCPU IDs are their x2APIC IDs, which KVM fixes at
//! creation); an input selects which of them it uses and the others stay
//! globally disabled (absent for every interrupt path of KVM and of our
//! bus). [`PoolVm::reset`] writes back, before each input, everything an
//! input can change:
//!
//! - per used vCPU: pending INIT/SIPI are flushed (`KVM_GET_MP_STATE`),
//!   the MP state set runnable, pending NMI/SMI cleared
//!   (`KVM_SET_VCPU_EVENTS`), IA32_APIC_BASE (`KVM_SET_MSRS`) and the
//!   register page (`KVM_SET_LAPIC`, which also zeroes KVM's
//!   lowest-priority `apic_arb_prio`) set to what `KVM_CREATE_VCPU` left;
//! - every line low (`KVM_IRQ_LINE`), then the IOAPIC and both PICs as
//!   created (`KVM_SET_IRQCHIP`; after the LAPICs, so the RTC pin's EOI
//!   tracking is rebuilt from clean LAPICs).
//!
//! The harness then compares the whole observed state with a fresh model
//! before the first operation, so anything left over that the oracle can
//! see fails the input; what it cannot see is covered by the list above
//! (and the corpus replay test runs every input twice).

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SMM,
    KVM_X2APIC_API_USE_32BIT_IDS, Msrs, kvm_enable_cap, kvm_ioapic_state, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msi, kvm_msr_entry, kvm_vcpu_events,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use irqchip::lapic::{IA32_APIC_BASE, KVM_LAPIC_PAGE_SIZE};

use crate::cpuid::{self, Features};
use crate::kernel::edit_ioapic_state;
use irqchip::ioapic::RedirectionEntry;

/// The vCPU IDs (= x2APIC IDs, and xAPIC IDs truncated to 8 bits) of each
/// pool VM: the BSP 0, x2APIC cluster 0 members 1..3, a member of cluster 1
/// (0x12), the ID that is also the 8-bit broadcast (0xff), and an ID above
/// 0xff whose xAPIC ID aliases vCPU 1's (0x101, x2APIC cluster 0x10).
pub const POOL_IDS: [u32; 7] = [0, 1, 2, 3, 0x12, 0xff, 0x101];

/// IA32_APIC_BASE global enable (SDM Vol. 3A 11.4.4).
pub(super) const BASE_EN: u64 = 1 << 11;

/// A KVM register page as bytes.
pub(super) type Page = [u8; KVM_LAPIC_PAGE_SIZE];

pub(super) fn page_of(state: &kvm_lapic_state) -> Page {
    let mut page = [0u8; KVM_LAPIC_PAGE_SIZE];
    for (dst, src) in page.iter_mut().zip(state.regs.iter()) {
        *dst = *src as u8;
    }
    page
}

pub(super) fn state_of(page: &Page) -> kvm_lapic_state {
    let mut state = kvm_lapic_state::default();
    for (dst, src) in state.regs.iter_mut().zip(page.iter()) {
        *dst = *src as std::os::raw::c_char;
    }
    state
}

/// The 32-bit register at `offset` of a page.
pub(super) fn reg(page: &Page, offset: u16) -> u32 {
    let at = usize::from(offset);
    page.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

/// Sets the 32-bit register at `offset` of a page.
pub(super) fn set_reg(page: &mut Page, offset: u16, value: u32) {
    let at = usize::from(offset);
    if let Some(slot) = page.get_mut(at..at + 4) {
        slot.copy_from_slice(&value.to_le_bytes());
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what} failed: {e}")
}

/// One vCPU of a pool VM.
pub(super) struct PoolVcpu {
    fd: VcpuFd,
    reset_page: kvm_lapic_state,
    reset_base: u64,
    /// Changed since its last reset (used by an input).
    dirty: bool,
    /// Globally disabled (the state of a vCPU no input uses).
    parked: bool,
}

/// One VM of the pool.
pub(super) struct PoolVm {
    vm: VmFd,
    vcpus: Vec<PoolVcpu>,
    ioapic_reset: kvm_irqchip,
    pic_reset: [kvm_irqchip; 2],
    /// `KVM_CAP_X2APIC_API` with `KVM_X2APIC_API_USE_32BIT_IDS` enabled.
    pub(super) x2apic_api: bool,
}

/// Both VMs and the `/dev/kvm` handle they came from.
pub(super) struct Pool {
    _kvm: Kvm,
    vms: [PoolVm; 2],
    smm: bool,
}

impl Pool {
    /// Opens `/dev/kvm` and creates both VMs.
    pub(super) fn create() -> Result<Self, String> {
        let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        let vms = [PoolVm::create(&kvm, false)?, PoolVm::create(&kvm, true)?];
        let smm = kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_X86_SMM)) > 0;
        Ok(Self {
            _kvm: kvm,
            vms,
            smm,
        })
    }

    /// Whether KVM delivers SMIs (it has SMM).
    pub(super) fn smm(&self) -> bool {
        self.smm
    }

    /// The VM with or without the x2APIC API.
    pub(super) fn vm(&mut self, x2apic_api: bool) -> &mut PoolVm {
        let [legacy, api] = &mut self.vms;
        if x2apic_api { api } else { legacy }
    }
}

impl PoolVm {
    fn create(kvm: &Kvm, x2apic_api: bool) -> Result<Self, String> {
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if x2apic_api {
            let mut cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X2APIC_API,
                ..Default::default()
            };
            // 32-bit IDs; the broadcast quirk stays on (our bus reproduces
            // it).
            cap.args[0] = u64::from(KVM_X2APIC_API_USE_32BIT_IDS);
            vm.enable_cap(&cap)
                .map_err(kvm_err("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)"))?;
        }
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(POOL_IDS.len());
        for &id in &POOL_IDS {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            cpuid::apply(
                cpuid.as_mut_slice(),
                id,
                Features {
                    x2apic: true,
                    tsc_deadline: false,
                    ext_dest_id: false,
                },
            );
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let reset_page = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
            let reset_base = get_base(&fd)?;
            vcpus.push(PoolVcpu {
                fd,
                reset_page,
                reset_base,
                dirty: true,
                parked: false,
            });
        }
        let chip = |chip_id| -> Result<kvm_irqchip, String> {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(chip)
        };
        let ioapic_reset = chip(KVM_IRQCHIP_IOAPIC)?;
        let pic_reset = [chip(KVM_IRQCHIP_PIC_MASTER)?, chip(KVM_IRQCHIP_PIC_SLAVE)?];
        Ok(Self {
            vm,
            vcpus,
            ioapic_reset,
            pic_reset,
            x2apic_api,
        })
    }

    /// Brings the VM back to its creation state with the pool vCPUs
    /// `used` (indices into [`POOL_IDS`]) enabled and every other one
    /// globally disabled (see the module documentation).
    pub(super) fn reset(&mut self, used: &[usize]) -> Result<(), String> {
        for (index, vcpu) in self.vcpus.iter_mut().enumerate() {
            let wanted_parked = !used.contains(&index);
            if !vcpu.dirty && vcpu.parked == wanted_parked {
                continue;
            }
            let fd = &vcpu.fd;
            // Flush a latched INIT or SIPI, then undo what processing it did.
            fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
            let events = kvm_vcpu_events {
                flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SMM,
                ..Default::default()
            };
            fd.set_vcpu_events(&events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
            set_base(fd, vcpu.reset_base)?;
            fd.set_lapic(&vcpu.reset_page)
                .map_err(kvm_err("KVM_SET_LAPIC"))?;
            if wanted_parked {
                set_base(fd, vcpu.reset_base & !BASE_EN)?;
            }
            vcpu.parked = wanted_parked;
            vcpu.dirty = false;
        }
        for &index in used {
            if let Some(vcpu) = self.vcpus.get_mut(index) {
                vcpu.dirty = true;
            }
        }
        for pin in 0..irqchip::ioapic::NUM_PINS as u32 {
            self.vm
                .set_irq_line(pin, false)
                .map_err(kvm_err("KVM_IRQ_LINE"))?;
        }
        self.vm
            .set_irqchip(&self.ioapic_reset)
            .map_err(kvm_err("KVM_SET_IRQCHIP(IOAPIC)"))?;
        for pic in &self.pic_reset {
            self.vm
                .set_irqchip(pic)
                .map_err(kvm_err("KVM_SET_IRQCHIP(PIC)"))?;
        }
        Ok(())
    }

    fn vcpu(&self, index: usize) -> Result<&PoolVcpu, String> {
        self.vcpus
            .get(index)
            .ok_or_else(|| format!("no pool vCPU {index}"))
    }

    /// `KVM_GET_LAPIC` of pool vCPU `index`.
    pub(super) fn page(&self, index: usize) -> Result<Page, String> {
        let state = self
            .vcpu(index)?
            .fd
            .get_lapic()
            .map_err(kvm_err("KVM_GET_LAPIC"))?;
        Ok(page_of(&state))
    }

    /// `KVM_SET_LAPIC` of pool vCPU `index`.
    pub(super) fn set_page(&self, index: usize, page: &Page) -> Result<(), String> {
        self.vcpu(index)?
            .fd
            .set_lapic(&state_of(page))
            .map_err(kvm_err("KVM_SET_LAPIC"))
    }

    /// The power-up register page KVM gave pool vCPU `index`.
    pub(super) fn reset_page(&self, index: usize) -> Result<Page, String> {
        Ok(page_of(&self.vcpu(index)?.reset_page))
    }

    /// IA32_APIC_BASE of pool vCPU `index`.
    pub(super) fn base(&self, index: usize) -> Result<u64, String> {
        get_base(&self.vcpu(index)?.fd)
    }

    /// Writes IA32_APIC_BASE of pool vCPU `index` (host-initiated).
    pub(super) fn set_base(&self, index: usize, value: u64) -> Result<(), String> {
        set_base(&self.vcpu(index)?.fd, value)
    }

    /// Whether pool vCPU `index` has an NMI pending.
    pub(super) fn nmi_pending(&self, index: usize) -> Result<bool, String> {
        let events = self
            .vcpu(index)?
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(events.nmi.pending != 0)
    }

    /// Makes pool vCPU `index` process a latched INIT or SIPI, as it would
    /// on its next entry (`KVM_GET_MP_STATE` runs `kvm_apic_accept_events`).
    pub(super) fn accept_events(&self, index: usize) -> Result<(), String> {
        self.vcpu(index)?
            .fd
            .get_mp_state()
            .map(|_| ())
            .map_err(kvm_err("KVM_GET_MP_STATE"))
    }

    /// `KVM_IRQ_LINE`.
    pub(super) fn set_line(&self, pin: u8, level: bool) -> Result<(), String> {
        self.vm
            .set_irq_line(u32::from(pin), level)
            .map_err(kvm_err("KVM_IRQ_LINE"))
    }

    /// KVM's IOAPIC state (`KVM_GET_IRQCHIP`).
    pub(super) fn ioapic(&self) -> Result<kvm_ioapic_state, String> {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.vm
            .get_irqchip(&mut chip)
            .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        // SAFETY: with chip_id KVM_IRQCHIP_IOAPIC, KVM_GET_IRQCHIP filled
        // the `ioapic` member; it is plain integers, valid for any bits.
        Ok(unsafe { chip.chip.ioapic })
    }

    /// Programs redirection entry `pin` by a read-modify-write of the whole
    /// IOAPIC state, exactly as kernel mode's `program_pin` does.
    pub(super) fn program_pin(&self, pin: u8, entry: RedirectionEntry) -> Result<(), String> {
        let mut state = self.ioapic()?;
        edit_ioapic_state(&mut state, pin, entry).map_err(|e| e.to_string())?;
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        chip.chip.ioapic = state;
        self.vm
            .set_irqchip(&chip)
            .map_err(kvm_err("KVM_SET_IRQCHIP"))
    }

    /// `KVM_SIGNAL_MSI`: the number of APICs that took it, `None` when KVM
    /// found no destination at all (the ioctl's -1, seen as EPERM).
    pub(super) fn signal_msi(&self, address: u64, data: u32) -> Result<Option<i32>, String> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.errno() == libc::EPERM => Ok(None),
            Err(e) => Err(format!("KVM_SIGNAL_MSI failed: {e}")),
        }
    }
}

fn get_base(fd: &VcpuFd) -> Result<u64, String> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_APIC_BASE,
        ..Default::default()
    }])
    .map_err(|e| format!("MSR list: {e:?}"))?;
    let read = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
    match msrs.as_slice().first() {
        Some(entry) if read == 1 => Ok(entry.data),
        _ => Err("KVM_GET_MSRS read no IA32_APIC_BASE".into()),
    }
}

fn set_base(fd: &VcpuFd, value: u64) -> Result<(), String> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_APIC_BASE,
        data: value,
        ..Default::default()
    }])
    .map_err(|e| format!("MSR list: {e:?}"))?;
    match fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))? {
        1 => Ok(()),
        _ => Err(format!("KVM_SET_MSRS refused IA32_APIC_BASE = {value:#x}")),
    }
}
