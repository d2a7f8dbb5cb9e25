//! The chip's state for a snapshot of a running VM ([`ChipState`]), and
//! its conversion from one mode to another.
//!
//! # What each mode saves
//!
//! | part | kernel | split | user |
//! |---|---|---|---|
//! | IOAPIC | KVM's (`KVM_GET_IRQCHIP`, version 0x11): [`IoapicSnapshot::Kvm`] | our model: [`IoapicSnapshot::Ours`] | our model |
//! | 8259 PIC pair | KVM's (`KVM_GET_IRQCHIP`) | - (the VMM's port model) | - |
//! | local APICs | KVM's register page (`KVM_GET_LAPIC`), IA32_APIC_BASE, IA32_TSC_DEADLINE: [`LapicSnapshot::Kvm`] | same | our model ([`LapicSnapshot::Ours`]): pending INIT, SIPI, NMI, SMI, ExtINT included; timers as the model's clock reads them |
//! | vCPU activity | `KVM_GET_MP_STATE` | same | the vCPU loop's: halted (parked), waiting for SIPI |
//! | routes | - | rebuilt from the entries (`KVM_SET_GSI_ROUTING` at restore) | - |
//! | lowest-priority cursor, model clock | - | - | yes |
//! | wired-OR line sources, counters | yes | yes | yes |
//!
//! Timers are carried as time remaining: KVM restarts a one-shot or
//! periodic count from the saved current count (`KVM_SET_LAPIC`); user
//! mode's clock continues from the value it had at the save
//! ([`ChipState::clock_ns`]), so every armed deadline is as far away after
//! the restore as it was at the save. A TSC deadline is a guest TSC value,
//! and the VMM restores the guest TSC.
//!
//! # Across modes ([`ChipState::convert`])
//!
//! | from -> to | how |
//! |---|---|
//! | kernel -> split, user | KVM's IOAPIC entries (same bit layout), IOREGSEL and ID become our model's; line levels come from the wired-OR sources (KVM drops the level of an edge pin it delivered); storm counts start at 0 (KVM keeps none). Our model is version 0x20 with an EOI register at +0x40 where KVM's 0x11 has none: a guest that probed 0x11 uses the LAPIC's EOI broadcast, which ours honours too, so nothing it relies on changes. KVM's 8259 must have every input masked (this chip never connects the 8259 in split and user modes) |
//! | kernel, split -> user | KVM's register page loads into our LAPIC (`Lapic::load_kvm_page`) after IA32_APIC_BASE; an armed TSC deadline is re-armed against the guest TSC when the vCPU part is restored |
//! | user -> split | our LAPIC's register page for KVM (`Lapic::to_kvm_page` at the save's clock); refused while our LAPIC holds an event KVM's page cannot carry (a pending NMI, INIT, SIPI, SMI or ExtINT) |
//! | split <-> user | the IOAPIC is the same model: carried as is, storm counts included |
//! | split, user -> kernel | refused: KVM's IOAPIC has no EOI register and no storm count, so the guest would lose EOIs it writes there and the storm guard its count |
//!
//! Every refusal is one [`ConvertError`] line naming the vCPU or the part
//! that cannot be carried; nothing is resumed with a silently changed
//! state.

use irqchip::Mode;
use irqchip::apic_bus::ArbiterState;
use irqchip::ioapic::{IoapicState, NUM_PINS};
use irqchip::lapic::{
    IA32_APIC_BASE, KVM_LAPIC_PAGE_SIZE, Lapic, LapicConfig, LapicState, TscClock,
};
use serde::{Deserialize, Serialize};

/// Version of [`ChipState`]'s layout; a state of another version is refused.
pub const CHIP_STATE_VERSION: u32 = 1;

/// IA32_APIC_BASE: xAPIC global enable (SDM Vol. 3A 11.4.4).
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: x2APIC mode (SDM Vol. 3A 11.12.1).
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// LVT timer mode field (bits 18:17) value of TSC-deadline mode (SDM Vol.
/// 3A 11.5.1).
const LVT_TIMER_TSC_DEADLINE: u32 = 0b10 << 17;
/// LVT timer mode field mask.
const LVT_TIMER_MODE_MASK: u32 = 0b11 << 17;
/// A clock that places every TSC deadline in the far future, for a LAPIC
/// converted from KVM's before its vCPU part gives it the guest's clock.
const PLACEHOLDER_TSC: TscClock = TscClock {
    hz: 1,
    tsc_at_zero: 0,
};

/// Everything the interrupt controller of one VM holds, at a point where
/// every vCPU is out of `KVM_RUN` ([`crate::Irqchip::pause`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChipState {
    /// [`CHIP_STATE_VERSION`].
    pub version: u32,
    /// The mode that saved it.
    pub mode: Mode,
    /// Whether the guest was offered x2APIC.
    pub x2apic: bool,
    /// The IOAPIC.
    pub ioapic: IoapicSnapshot,
    /// KVM's 8259 pair (kernel mode): the `struct kvm_irqchip` bytes
    /// (`KVM_GET_IRQCHIP`) of the master, then the slave.
    pub pic: Option<[Vec<u8>; 2]>,
    /// One per vCPU, in vCPU order.
    pub vcpus: Vec<VcpuChipState>,
    /// User mode: the lowest-priority arbiter.
    pub arbiter: Option<ArbiterState>,
    /// User mode: the models' clock (ns) at the save; the restored chip's
    /// clock continues from it. 0 in the other modes.
    pub clock_ns: u64,
    /// Per GSI: bit `s` set when the line's source `s` drives it high (the
    /// wired-OR of `crate::IrqLine`s, in the order the VMM made them).
    pub lines: Vec<u64>,
    /// Per GSI: rising edges of the wired-OR line so far.
    pub line_assertions: Vec<u64>,
    /// The chip's counters.
    pub counters: CountersState,
}

/// The IOAPIC, as the saving mode holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoapicSnapshot {
    /// KVM's in-kernel IOAPIC (`struct kvm_ioapic_state`).
    Kvm(KvmIoapicState),
    /// Our model.
    Ours(Box<IoapicState>),
}

/// KVM's `struct kvm_ioapic_state`, field by field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmIoapicState {
    /// `base_address`.
    pub base_address: u64,
    /// `ioregsel`.
    pub ioregsel: u32,
    /// `id` (the ID register).
    pub id: u32,
    /// `irr`: line levels as KVM keeps them (bit `n` for pin `n`).
    pub irr: u32,
    /// `redirtbl`: the 24 entries, Remote IRR included.
    pub entries: Vec<u64>,
}

/// One vCPU's part of the chip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuChipState {
    /// Its local APIC.
    pub lapic: LapicSnapshot,
    /// Running, halted, or waiting for SIPI.
    pub activity: Activity,
}

/// A local APIC, as the saving mode holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LapicSnapshot {
    /// KVM's in-kernel LAPIC.
    Kvm {
        /// `KVM_GET_LAPIC`'s register page (1 KiB).
        page: Vec<u8>,
        /// IA32_APIC_BASE.
        apic_base: u64,
        /// IA32_TSC_DEADLINE (0: disarmed).
        tsc_deadline: u64,
    },
    /// Our model.
    Ours(Box<LapicState>),
}

/// Where a vCPU is, as far as the chip is concerned (KVM's MP state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activity {
    /// Executing.
    Running,
    /// Halted (`hlt`) until an interrupt wakes it.
    Halted,
    /// An AP after INIT (or at power-up): waits for a start-up IPI.
    WaitForSipi,
}

/// The chip's counters (see [`crate::IrqStats`] and [`crate::ModelStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersState {
    /// Interrupts the VMM injected or sent.
    pub injected: u64,
    /// EOIs the VMM handled.
    pub eois: u64,
    /// Failures on the interrupt path.
    pub errors: u64,
    /// Storm-guard reports.
    pub storm_reports: u64,
    /// Pins that had a storm report.
    pub storm_pins: u32,
    /// Split: halted vCPUs the EOI watch made runnable.
    pub eoi_pokes: u64,
    /// User: events the vCPU loop dropped.
    pub ignored_events: u64,
    /// Line changes the chip refused.
    pub line_errors: u64,
}

/// Why a state cannot be restored into a chip: each message is one line
/// naming what cannot be carried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The state's layout version is not this crate's.
    #[error("chip state version {found}, this build reads {CHIP_STATE_VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The state does not fit the chip (vCPU count, x2APIC offer).
    #[error("{0}")]
    Mismatch(String),
    /// The state is not one the saving mode can produce.
    #[error("corrupt chip state: {0}")]
    Corrupt(String),
    /// The target mode cannot hold something the state holds.
    #[error("cannot restore a {from} snapshot in {to} mode: {what}")]
    CannotCarry {
        /// The saving mode.
        from: &'static str,
        /// The mode asked for.
        to: &'static str,
        /// What cannot be carried.
        what: String,
    },
}

/// What the target chip is, for [`ChipState::convert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Its mode.
    pub mode: Mode,
    /// vCPUs.
    pub cpus: usize,
    /// x2APIC offered.
    pub x2apic: bool,
    /// Physical-address width (user mode's IA32_APIC_BASE).
    pub phys_addr_bits: u8,
    /// TSC-deadline mode offered in CPUID.
    pub tsc_deadline: bool,
}

impl Target {
    /// Whether KVM's LAPIC page holds the x2APIC ID in 32-bit form: split
    /// mode enables `KVM_X2APIC_API_USE_32BIT_IDS` (`split.rs`), and KVM
    /// then refuses a page whose ID is not the vCPU's; kernel mode does
    /// not, and KVM reads the ID shifted as an xAPIC ID
    /// (`kvm_apic_state_fixup`).
    fn kvm_x2apic_ids(&self) -> bool {
        self.mode == Mode::Split
    }

    /// The user-mode LAPIC configuration of vCPU `index`.
    pub(crate) fn lapic_config(&self, index: usize) -> LapicConfig {
        LapicConfig {
            apic_id: index as u32,
            bsp: index == 0,
            x2apic: self.x2apic,
            directed_eoi: true,
            phys_addr_bits: self.phys_addr_bits,
            bus_hz: irqconnect_abi::layout::LAPIC_BUS_HZ,
            tsc: self.tsc_deadline.then_some(PLACEHOLDER_TSC),
        }
    }
}

impl ChipState {
    /// This state as `target`'s mode holds it (see the module
    /// documentation); the same state when the modes are equal. Checks the
    /// version, the vCPU count and the x2APIC offer, and that every part
    /// is of the kind its mode saves.
    ///
    /// # Errors
    ///
    /// One line naming what cannot be carried or what is wrong.
    pub fn convert(&self, target: &Target) -> Result<ChipState, ConvertError> {
        if self.version != CHIP_STATE_VERSION {
            return Err(ConvertError::Version {
                found: self.version,
            });
        }
        if self.vcpus.len() != target.cpus {
            return Err(ConvertError::Mismatch(format!(
                "the snapshot has {} vCPUs, the VM {}",
                self.vcpus.len(),
                target.cpus
            )));
        }
        if self.x2apic != target.x2apic {
            return Err(ConvertError::Mismatch(format!(
                "the snapshot's guest was offered x2APIC {}, the VM {}",
                on_off(self.x2apic),
                on_off(target.x2apic)
            )));
        }
        if self.lines.len() != NUM_PINS || self.line_assertions.len() != NUM_PINS {
            return Err(ConvertError::Corrupt(format!(
                "{} line entries, expected {NUM_PINS}",
                self.lines.len()
            )));
        }
        self.check_kinds()?;
        let refuse = |what: String| ConvertError::CannotCarry {
            from: self.mode.name(),
            to: target.mode.name(),
            what,
        };
        let mut out = self.clone();
        out.mode = target.mode;
        if self.mode == target.mode {
            return Ok(out);
        }
        if target.mode == Mode::Kernel {
            return Err(refuse(
                "KVM's IOAPIC (version 0x11) has no EOI register and no storm count; restore in split or user mode".to_string(),
            ));
        }
        if let IoapicSnapshot::Kvm(kvm) = &self.ioapic {
            if let Some([master, slave]) = &self.pic {
                for (name, pic) in [("master", master), ("slave", slave)] {
                    let imr = pic_imr(pic);
                    if imr != Some(0xff) {
                        return Err(refuse(format!(
                            "the {name} 8259 has unmasked inputs (IMR {}), which {} mode does not connect",
                            imr.map_or("unreadable".to_string(), |m| format!("{m:#04x}")),
                            target.mode.name()
                        )));
                    }
                }
            }
            out.ioapic = IoapicSnapshot::Ours(Box::new(ioapic_from_kvm(kvm, &self.lines)));
            out.pic = None;
        }
        for (index, (vcpu, slot)) in self.vcpus.iter().zip(out.vcpus.iter_mut()).enumerate() {
            slot.lapic = match (&vcpu.lapic, target.mode.kvm_lapic()) {
                (LapicSnapshot::Ours(_), false) => vcpu.lapic.clone(),
                (
                    LapicSnapshot::Kvm {
                        page,
                        apic_base,
                        tsc_deadline,
                    },
                    true,
                ) => {
                    // Kernel and split mode write the x2APIC ID in different
                    // forms.
                    let mut page = page.clone();
                    put_kvm_id(target, index, *apic_base, &mut page);
                    LapicSnapshot::Kvm {
                        page,
                        apic_base: *apic_base,
                        tsc_deadline: *tsc_deadline,
                    }
                }
                (
                    LapicSnapshot::Kvm {
                        page,
                        apic_base,
                        tsc_deadline,
                    },
                    false,
                ) => LapicSnapshot::Ours(
                    lapic_from_kvm(
                        target,
                        index,
                        page,
                        *apic_base,
                        *tsc_deadline,
                        self.clock_ns,
                    )
                    .map(Box::new)
                    .map_err(|why| refuse(format!("vCPU {index}: {why}")))?,
                ),
                (LapicSnapshot::Ours(state), true) => lapic_to_kvm(target, state, self.clock_ns)
                    .map_err(|why| refuse(format!("vCPU {index}: {why}")))?,
            };
        }
        out.arbiter = if target.mode.kvm_lapic() {
            None
        } else {
            Some(self.arbiter.unwrap_or_default())
        };
        Ok(out)
    }

    /// Every part is of the kind the saving mode produces.
    fn check_kinds(&self) -> Result<(), ConvertError> {
        let ours = self.mode.our_ioapic();
        match (&self.ioapic, ours) {
            (IoapicSnapshot::Ours(_), true) => {}
            (IoapicSnapshot::Kvm(kvm), false) if kvm.entries.len() == NUM_PINS => {}
            _ => {
                return Err(ConvertError::Corrupt(format!(
                    "the IOAPIC part does not belong to {} mode",
                    self.mode.name()
                )));
            }
        }
        if self.pic.is_some() != (self.mode == Mode::Kernel) {
            return Err(ConvertError::Corrupt(format!(
                "the 8259 part does not belong to {} mode",
                self.mode.name()
            )));
        }
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let fits = match &vcpu.lapic {
                LapicSnapshot::Kvm { page, .. } => {
                    self.mode.kvm_lapic() && page.len() == KVM_LAPIC_PAGE_SIZE
                }
                LapicSnapshot::Ours(state) => {
                    !self.mode.kvm_lapic() && state.config.apic_id == index as u32
                }
            };
            if !fits {
                return Err(ConvertError::Corrupt(format!(
                    "vCPU {index}'s LAPIC part does not belong to {} mode",
                    self.mode.name()
                )));
            }
        }
        Ok(())
    }
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// IMR of a saved `struct kvm_pic_state`.
fn pic_imr(bytes: &[u8]) -> Option<u8> {
    bytes.get(PIC_IMR_OFFSET).copied()
}

/// Offset of `imr` in a `struct kvm_irqchip` holding a PIC: `chip_id` and
/// `pad` (8 bytes), then `struct kvm_pic_state` (`last_irr`, `irr`, `imr`).
const PIC_IMR_OFFSET: usize = 8 + 2;

/// KVM's IOAPIC state as our model's: entries, IOREGSEL and ID as they are
/// (KVM keeps the ID register's bits 27:24 in `id`'s low nibble), line
/// levels from the wired-OR sources, storm counts 0.
fn ioapic_from_kvm(kvm: &KvmIoapicState, lines: &[u64]) -> IoapicState {
    let mut entries = [0u64; NUM_PINS];
    let defined = irqchip::ioapic::spec::RTE_DEFINED_MASK;
    for (slot, &bits) in entries.iter_mut().zip(&kvm.entries) {
        let entry = irqchip::ioapic::RedirectionEntry::from_bits(bits & defined);
        // Delivery status is always 0 in our model (delivery is
        // immediate), and Remote IRR exists on level entries only.
        let entry = entry
            .with_delivery_status(false)
            .with_remote_irr(entry.remote_irr() && entry.level_triggered());
        *slot = entry.into_bits();
    }
    let levels = lines
        .iter()
        .enumerate()
        .filter(|&(_, &sources)| sources != 0)
        .fold(0u32, |acc, (pin, _)| acc | (1 << pin));
    IoapicState {
        id: (kvm.id & 0xf) << 24,
        ioregsel: kvm.ioregsel as u8,
        entries,
        lines: levels,
        storm_counts: [0; NUM_PINS],
        route_generation: 1,
        counters: Default::default(),
    }
}

/// Our LAPIC built from KVM's page, IA32_APIC_BASE and TSC deadline.
fn lapic_from_kvm(
    target: &Target,
    index: usize,
    page: &[u8],
    apic_base: u64,
    tsc_deadline: u64,
    now: u64,
) -> Result<LapicState, String> {
    let page: &[u8; KVM_LAPIC_PAGE_SIZE] = page
        .try_into()
        .map_err(|_| format!("KVM's LAPIC page has {} bytes", page.len()))?;
    let mut lapic = Lapic::new(target.lapic_config(index));
    // From the reset state (enabled, xAPIC) to the saved mode: x2APIC
    // needs the enable first; a disabled APIC is one write.
    let mode_bits = APIC_BASE_ENABLE | APIC_BASE_X2APIC;
    let steps: &[u64] = if apic_base & mode_bits == mode_bits {
        &[(apic_base & !APIC_BASE_X2APIC), apic_base]
    } else {
        &[apic_base]
    };
    for &value in steps {
        lapic
            .msr_write(IA32_APIC_BASE, value, now)
            .map_err(|gp| format!("IA32_APIC_BASE {apic_base:#x} refused by our LAPIC ({gp:?})"))?;
    }
    lapic.load_kvm_page(page, now);
    let mut state = lapic.save();
    if state.lvt.timer & LVT_TIMER_MODE_MASK == LVT_TIMER_TSC_DEADLINE && tsc_deadline != 0 {
        if !target.tsc_deadline {
            return Err("a TSC-deadline timer is armed and user mode offers no TSC-deadline mode on this host".to_string());
        }
        state.timer.tsc_deadline = tsc_deadline;
        state.timer.tsc_deadline_ns = PLACEHOLDER_TSC.ns_at(tsc_deadline);
    }
    Ok(state)
}

/// Offset of the APIC ID register in KVM's page.
const KVM_PAGE_ID: usize = 0x20;

/// Writes vCPU `index`'s x2APIC ID into KVM's `page` in the form `target`
/// takes ([`Target::kvm_x2apic_ids`]) when `apic_base` selects x2APIC
/// mode; an xAPIC ID is the same in both forms and stays.
fn put_kvm_id(target: &Target, index: usize, apic_base: u64, page: &mut [u8]) {
    let mode_bits = APIC_BASE_ENABLE | APIC_BASE_X2APIC;
    if apic_base & mode_bits != mode_bits {
        return;
    }
    let id = index as u32;
    let value = if target.kvm_x2apic_ids() {
        id
    } else {
        id.wrapping_shl(24)
    };
    if let Some(slot) = page.get_mut(KVM_PAGE_ID..KVM_PAGE_ID + 4) {
        slot.copy_from_slice(&value.to_le_bytes());
    }
}

/// KVM's page, IA32_APIC_BASE and TSC deadline from our LAPIC, at the
/// save's clock `now`.
fn lapic_to_kvm(target: &Target, state: &LapicState, now: u64) -> Result<LapicSnapshot, String> {
    let events = state.events;
    let mut pending = Vec::new();
    if events.nmis != 0 {
        pending.push("an NMI");
    }
    if events.init {
        pending.push("an INIT");
    }
    if events.sipi.is_some() {
        pending.push("a start-up IPI");
    }
    if events.smi {
        pending.push("an SMI");
    }
    if events.extint {
        pending.push("an ExtINT");
    }
    if !pending.is_empty() {
        return Err(format!(
            "our LAPIC holds {} for the vCPU loop, which KVM's LAPIC page cannot carry",
            pending.join(" and ")
        ));
    }
    let lapic = Lapic::restore(state);
    let mut page = lapic.to_kvm_page(now);
    put_kvm_id(
        target,
        state.config.apic_id as usize,
        state.apic_base,
        &mut page,
    );
    let deadline_mode = state.lvt.timer & LVT_TIMER_MODE_MASK == LVT_TIMER_TSC_DEADLINE;
    Ok(LapicSnapshot::Kvm {
        page: page.to_vec(),
        apic_base: state.apic_base,
        tsc_deadline: if deadline_mode {
            state.timer.tsc_deadline
        } else {
            0
        },
    })
}

#[cfg(test)]
mod tests;
