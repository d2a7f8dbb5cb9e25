//! The `kvm_differential` fuzz harness: the same operations applied to our
//! models (`irqchip::ioapic::Ioapic` and `irqchip::apic_system::ApicSystem`)
//! and to KVM's in-kernel IOAPIC and LAPICs in a VM whose vCPUs never run,
//! with the state both sides expose compared after every step. The oracle is
//! the Linux kernel's own interrupt controller, which nobody here wrote.
//!
//! Input format: byte 0 chooses the VM (bit 0: with `KVM_CAP_X2APIC_API`
//! 32-bit IDs, as our register page and x2APIC MSI format assume; clear:
//! without it, as kernel mode runs) and the number of vCPUs (`1 +
//! (b >> 1) % 4`); then one byte per vCPU picks its pool vCPU
//! ([`POOL_IDS`]`[b % 7]`, the next unused one on a repeat), whose vCPU ID
//! is its APIC ID; then operations, an opcode byte and its operands:
//!
//! | opcode % 5 | operation | KVM | ours |
//! |---|---|---|---|
//! | 0 | line level (pin `b % 24`, level `b & 1`) | `KVM_IRQ_LINE` | `Ioapic::set_line`, then the bus |
//! | 1 | host redirection-entry write (fields, vector, destination) | `KVM_GET_IRQCHIP`, edit, `KVM_SET_IRQCHIP`, as kernel mode's `program_pin` | `Ioapic::write_rte`, then the bus |
//! | 2 | MSI (destination, address flags, vector, data mode bits) | `KVM_SIGNAL_MSI` | `irqchip::msi::decode`, then the bus |
//! | 3 | LAPIC register (ID, TPR, LDR, DFR, SVR) | `KVM_GET_LAPIC`, edit, `KVM_SET_LAPIC` | `Lapic::to_kvm_page`, edit, `Lapic::load_kvm_page` |
//! | 4 | IA32_APIC_BASE: disabled, xAPIC, x2APIC | `KVM_SET_MSRS` | `Lapic::msr_write` |
//!
//! "Then the bus" is [`ApicSystem::deliver_each`]; a lowest-priority
//! message is checked on a copy of our bus and then given KVM's choice (N2).
//! The VMs are created once per process and reset before each input (see
//! the `kvm` submodule). After every step the harness
//! compares, per used vCPU, IRR, TMR, ISR, ID, TPR, PPR, LDR, DFR, SVR
//! (`KVM_GET_LAPIC` against `Lapic::to_kvm_page`), IA32_APIC_BASE
//! (`KVM_GET_MSRS`) and, after an NMI or INIT, the pending NMI
//! (`KVM_GET_VCPU_EVENTS`); and per IOAPIC pin the redirection entry with
//! its Remote IRR and, for level pins, the line level (`KVM_GET_IRQCHIP`).
//!
//! Differences that are by design are normalised here; each is named
//! `N1`..`N23` in the code and listed with its reason in `fuzz/README.md`.
//! Every other difference is an `Err`. With `KVM_DIFFERENTIAL_TRACE` set in
//! the environment, both sides' registers and IOAPIC entries are printed to
//! stderr after every step.

mod kvm;

use std::sync::{Mutex, PoisonError};

use irqchip::apic_bus::{
    self, ApicSet, ApicTarget, DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode,
};
use irqchip::apic_system::ApicSystem;
use irqchip::ioapic::spec::{RTE_EXTENDED_DESTINATION_MASK, RTE_REMOTE_IRR};
use irqchip::ioapic::{Ioapic, IoapicConfig, NUM_PINS, RedirectionEntry};
use irqchip::lapic::{AcceptOutcome, IA32_APIC_BASE, Lapic, LapicConfig};
use irqchip::msi::{self, Msi, MsiFormat};

pub use kvm::POOL_IDS;
use kvm::{BASE_EN, Page, Pool, PoolVm, reg, set_reg};

/// The pool of VMs, created by the first input (see [`kvm`]).
static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Most vCPUs an input uses.
pub const MAX_CPUS: usize = 4;

// IA32_APIC_BASE (SDM Vol. 3A 11.4.4).
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_ADDRESS: u64 = 0xfee0_0000;

// Register offsets (SDM Vol. 3A Table 11-1).
const ID: u16 = 0x20;
const TPR: u16 = 0x80;
const PPR: u16 = 0xa0;
const LDR: u16 = 0xd0;
const DFR: u16 = 0xe0;
const SVR: u16 = 0xf0;
const ISR0: u16 = 0x100;
const TMR0: u16 = 0x180;
const IRR0: u16 = 0x200;

/// Reads little-endian values off the front of the input; missing bytes
/// read as 0.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// Runs the operations `data` encodes (see the module documentation) on
/// KVM and on our models. `Err` names the first difference that is not by
/// design, or a KVM call that failed (no `/dev/kvm` included).
pub fn run(data: &[u8]) -> Result<(), String> {
    let mut guard = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if guard.is_none() {
        *guard = Some(Pool::create()?);
    }
    let pool = guard.as_mut().ok_or("no VM pool")?;
    let mut input = Reader(data);
    let config = input.u8();
    let x2apic_api = config & 1 != 0;
    let count = 1 + usize::from(config >> 1) % MAX_CPUS;
    let mut used: Vec<usize> = Vec::with_capacity(count);
    for _ in 0..count {
        let mut pick = usize::from(input.u8()) % POOL_IDS.len();
        while used.contains(&pick) {
            pick = (pick + 1) % POOL_IDS.len();
        }
        used.push(pick);
    }
    let smm = pool.smm();
    let vm = pool.vm(x2apic_api);
    vm.reset(&used)?;
    let mut diff = Diff::new(vm, used, smm)?;
    diff.compare_all()
        .map_err(|e| format!("after reset: {e}"))?;
    let trace = std::env::var_os("KVM_DIFFERENTIAL_TRACE").is_some();
    let mut step = 0usize;
    while !input.is_empty() {
        let op = input.u8() % 5;
        diff.apply(&mut input, op)
            .map_err(|e| format!("step {step} (op {op}): {e}"))?;
        if trace {
            diff.trace(step, op);
        }
        step += 1;
    }
    Ok(())
}

/// Both sides of one input.
struct Diff<'a> {
    kvm: &'a PoolVm,
    /// Pool vCPU of each of our vCPUs.
    used: Vec<usize>,
    ioapic: Ioapic,
    apics: ApicSystem,
    /// KVM's register pages as last read, per our vCPU.
    pages: Vec<Page>,
    /// KVM delivers SMIs (it has SMM).
    smm: bool,
}

impl<'a> Diff<'a> {
    fn new(kvm: &'a PoolVm, used: Vec<usize>, smm: bool) -> Result<Self, String> {
        let configs = used
            .iter()
            .map(|&p| POOL_IDS.get(p).map(|&id| LapicConfig::new(id, id == 0)))
            .collect::<Option<Vec<_>>>()
            .ok_or("pool index out of range")?;
        let pages = used
            .iter()
            .map(|&p| kvm.page(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            kvm,
            ioapic: Ioapic::new(IoapicConfig::default()),
            apics: ApicSystem::new(configs),
            used,
            pages,
            smm,
        })
    }

    fn pool(&self, cpu: usize) -> Result<usize, String> {
        self.used
            .get(cpu)
            .copied()
            .ok_or_else(|| format!("no vCPU {cpu}"))
    }

    fn cpu(&self, input: &mut Reader<'_>) -> usize {
        usize::from(input.u8()) % self.used.len().max(1)
    }

    fn apply(&mut self, input: &mut Reader<'_>, op: u8) -> Result<(), String> {
        match op {
            0 => {
                let pin = input.u8() % NUM_PINS as u8;
                let level = input.u8() & 1 != 0;
                let preview = self.ioapic.clone().set_line(pin, level);
                if preview.is_some_and(|m| self.kvm_unreliable(&m, false)) {
                    return Ok(());
                }
                self.kvm.set_line(pin, level)?;
                let message = self.ioapic.set_line(pin, level);
                self.delivered(message.map(|m| (Some(pin), m)).into_iter().collect())
            }
            1 => {
                let pin = input.u8() % NUM_PINS as u8;
                let fields = input.u16();
                // N23: active high only. KVM's IOAPIC ignores the polarity
                // bit (`KVM_IRQ_LINE` carries the assertion); ours applies it
                // to the electrical level.
                let entry = RedirectionEntry::new()
                    .with_vector(input.u8())
                    .with_delivery_mode(delivery_mode(fields as u8))
                    .with_logical(fields & 0x8 != 0)
                    .with_level_triggered(fields & 0x20 != 0)
                    .with_masked(fields & 0x40 != 0)
                    .with_extended_destination((fields >> 8) as u8)
                    .with_destination(input.u8());
                if self.rte_unreliable(pin, entry) {
                    return Ok(());
                }
                self.kvm.program_pin(pin, entry)?;
                self.forget_edge_lines()?;
                let output = self
                    .ioapic
                    .write_rte(pin, entry)
                    .map_err(|e| format!("write_rte({pin}) failed: {e}"))?;
                self.forget_edge_lines()?;
                let mut messages: Vec<(Option<u8>, Message)> = output
                    .deliveries()
                    .iter()
                    .map(|d| (Some(d.pin), d.message))
                    .collect();
                // N11: KVM_SET_IRQCHIP re-injects every level line it is
                // given (`kvm_ioapic_inject_all`), which re-services each
                // unmasked level pin with its line high and Remote IRR
                // clear (only N1 leaves one so). Ours re-asserts the same
                // lines.
                for other in (0..NUM_PINS as u8).filter(|&q| q != pin) {
                    let level = self.ioapic.rte(other).is_some_and(|e| e.level_triggered());
                    if level
                        && self.ioapic.line(other) == Some(true)
                        && let Some(m) = self.ioapic.set_line(other, true)
                    {
                        messages.push((Some(other), m));
                    }
                }
                // KVM services the pins in index order.
                messages.sort_by_key(|(pin, _)| *pin);
                self.delivered(messages)
            }
            2 => self.msi(input),
            3 => self.register(input),
            _ => self.mode(input),
        }
    }

    fn msi(&mut self, input: &mut Reader<'_>) -> Result<(), String> {
        let destination = input.u32();
        let flags = input.u8();
        let vector = input.u8();
        let mode = input.u8();
        // Address: the window, destination bits 0..7, destination mode
        // (bit 2), redirection hint (bit 3), and bits the decoders ignore
        // (0, 1, 4, 5..11) from the input.
        let mut address = BASE_ADDRESS
            | u64::from(destination & 0xff) << 12
            | u64::from(flags & 0b1_1111)
            | u64::from(flags >> 5) << 5;
        let format = if self.kvm.x2apic_api {
            address |= u64::from(destination >> 8) << 40;
            MsiFormat::X2apicApi
        } else {
            MsiFormat::Compatibility
        };
        // Data: vector, delivery mode, reserved bits 11..13, assert (14),
        // level (15).
        let data = u32::from(vector)
            | u32::from(delivery_mode(mode).to_bits()) << 8
            | u32::from(mode >> 3 & 0b111) << 11
            | u32::from(mode >> 6) << 14;
        let decoded = msi::decode(Msi { address, data }, format)
            .map_err(|e| format!("decode({address:#x}, {data:#x}) failed: {e}"))?;
        let message = decoded.bus_message();
        // N12: KVM makes every MSI an assert (`kvm_set_msi_irq`: level = 1),
        // so a level-triggered INIT MSI with the assert bit clear resets the
        // vCPU; ours takes it as an INIT level de-assert, which does nothing
        // (SDM Vol. 3A 11.11.2, 11.4.7.4).
        let init_deassert = message.delivery_mode == DeliveryMode::Init
            && message.trigger_mode == TriggerMode::Level
            && !message.level;
        // N17: with the redirection hint, the physical destination must not
        // be 0xff (SDM Vol. 3A 11.11.1). KVM arbitrates it to one APIC (its
        // broadcast exception turns the delivery mode to fixed but keeps
        // the hint), ours broadcasts it like lowest priority to 0xff.
        let undefined = decoded.redirection_hint
            && message.destination_mode == DestinationMode::Physical
            && message.destination == 0xff;
        if init_deassert || undefined || self.kvm_unreliable(&message, decoded.redirection_hint) {
            return Ok(());
        }
        let _ = self.kvm.signal_msi(address, data)?;
        self.delivered(vec![(None, message)])
    }

    fn register(&mut self, input: &mut Reader<'_>) -> Result<(), String> {
        let cpu = self.cpu(input);
        let which = input.u8() % 5;
        let value = input.u32();
        let pool = self.pool(cpu)?;
        let Some(lapic) = self.apics.get(cpu) else {
            return Ok(());
        };
        // N22: KVM_SET_LAPIC copies any page; only what a guest could
        // write is sent. A globally disabled APIC has no registers a guest
        // could write.
        if !lapic.hw_enabled() {
            return Ok(());
        }
        let x2apic = lapic.is_x2apic();
        // The bits a guest write could set (SDM Vol. 3A 11.4.6, 11.6.2,
        // 11.8.3, 11.9); ID, LDR and DFR only in xAPIC mode (read-only or
        // absent in x2APIC mode, SDM 11.12.1).
        let (offset, value) = match which {
            0 if !x2apic => (ID, value << 24),
            2 if !x2apic => (LDR, value & 0xff00_0000),
            // N15: the DFR model is 1111 (flat) or 0000 (cluster); the SDM
            // defines no other. KVM's slow path matches nothing with another
            // model, its map and ours take it as cluster.
            3 if !x2apic => (
                DFR,
                if value & 1 != 0 {
                    u32::MAX
                } else {
                    0x0fff_ffff
                },
            ),
            4 => (SVR, value & 0x3ff),
            _ => (TPR, value & 0xff),
        };
        let mut page = self.kvm.page(pool)?;
        set_reg(&mut page, offset, value);
        self.kvm.set_page(pool, &page)?;
        self.apics.with(cpu, |l| {
            let mut page = l.to_kvm_page(0);
            set_reg(&mut page, offset, value);
            l.load_kvm_page(&page, 0);
        });
        self.refresh(cpu)?;
        self.compare_cpu(cpu)
    }

    fn mode(&mut self, input: &mut Reader<'_>) -> Result<(), String> {
        let cpu = self.cpu(input);
        let mode = input.u8() % 3;
        let pool = self.pool(cpu)?;
        let Some(before) = self.apics.get(cpu).map(base_of) else {
            return Ok(());
        };
        let before = before?;
        let bits = match mode {
            0 => 0,
            1 => BASE_EN,
            _ => BASE_EN | BASE_EXTD,
        };
        let value = BASE_ADDRESS | (before & BASE_BSP) | bits;
        // N22: the transitions a guest may make (SDM Vol. 3A 11.12.5,
        // Figure 11-27); KVM lets the host make the others, so only these
        // are sent to it.
        let from_x2apic = before & BASE_EXTD != 0;
        let from_disabled = before & BASE_EN == 0;
        let legal = !(from_disabled && mode == 2 || from_x2apic && mode == 1);
        let ours = self
            .apics
            .with(cpu, |l| l.msr_write(IA32_APIC_BASE, value, 0))
            .ok_or("no vCPU")?;
        if ours.is_ok() != legal {
            return Err(format!(
                "cpu {cpu}: IA32_APIC_BASE {before:#x} -> {value:#x} is {} but the model answered {ours:?}",
                if legal { "legal" } else { "illegal" }
            ));
        }
        if legal && value != before {
            self.kvm.set_base(pool, value)?;
            if value & BASE_EN == 0 {
                // N4: KVM keeps a disabled APIC's registers (SDM 11.4.3:
                // they "may be lost"); ours resets them. Make KVM's copy
                // the power-up page, as ours is.
                let reset = self.kvm.reset_page(pool)?;
                self.kvm.set_page(pool, &reset)?;
            }
        }
        let kvm_base = self.kvm.base(pool)?;
        let our_base = self.apics.get(cpu).map(base_of).ok_or("no vCPU")??;
        if kvm_base != our_base {
            return Err(format!(
                "cpu {cpu}: IA32_APIC_BASE KVM {kvm_base:#x}, ours {our_base:#x}"
            ));
        }
        self.refresh(cpu)?;
        self.compare_cpu(cpu)
    }

    /// Whether KVM's delivery of `message` (with the MSI redirection hint
    /// `hint`) depends on state the harness does not model; such messages
    /// are not sent to either side:
    ///
    /// - N5: a logical-destination NMI, INIT, SIPI or SMI that a
    ///   software-disabled APIC matches. Ours delivers it (SDM Vol. 3A
    ///   11.4.7.2); KVM's optimised map leaves software-disabled xAPICs out
    ///   of its logical clusters, and has no logical destination at all when
    ///   every APIC is software-disabled, while its slow path delivers.
    /// - N6: an MSI with the redirection hint and a delivery mode other
    ///   than fixed or lowest priority: KVM arbitrates it like lowest
    ///   priority (`kvm_lowest_prio_delivery`), ours sends it to every
    ///   destination.
    /// - N13: a logical-destination message while KVM's map is in x2APIC
    ///   logical mode with xAPIC-mode APICs in it: KVM decides the logical
    ///   mode from the software-enabled APICs with a non-zero LDR only,
    ///   then resolves x2APIC clusters through its physical map, where
    ///   xAPIC-mode APICs sit at their xAPIC ID; a logical message then
    ///   reaches an xAPIC-mode APIC whose LDR does not match (KVM finding).
    /// - N14: a physical destination above 0xff equal to the vCPU ID of
    ///   an APIC in xAPIC mode: KVM's "hotplug hack"
    ///   (`kvm_apic_match_physical_addr`) delivers it to that APIC as if
    ///   it were in x2APIC mode, so that a hot-plugged vCPU with an ID above
    ///   255 can be started; ours follows the SDM (an xAPIC matches 8-bit
    ///   IDs only) and the project does not hot-plug vCPUs.
    /// - N18, N19: see the body.
    /// - N16: the x2APIC broadcast 0xffff_ffff from an MSI (x2APIC API
    ///   format): with the x2APIC broadcast quirk on, KVM's fast path takes
    ///   only 0xff as a broadcast for a message without a source and
    ///   resolves 0xffff_ffff as an ID above every APIC's, so nobody gets
    ///   it (KVM finding); ours broadcasts (SDM Vol. 3A 11.12.9).
    fn kvm_unreliable(&self, message: &Message, hint: bool) -> bool {
        if message.destination == u32::MAX {
            return true;
        }
        // N19: with 32-bit IDs (x2APIC API), KVM maps an APIC ID that more
        // than one APIC holds (xAPIC IDs are writable, and vCPU IDs above
        // 0xff alias in xAPIC mode) to the first vCPU only and "silently
        // ignores aliased xAPIC IDs" (`kvm_recalculate_phys_map`); ours
        // delivers to every APIC with the ID, as the architecture does.
        if self.kvm.x2apic_api
            && message.destination_mode == DestinationMode::Physical
            && message.destination != 0xff
            && self
                .apics
                .targets()
                .iter()
                .filter(|t| t.hw_enabled && t.apic_id == message.destination)
                .count()
                > 1
        {
            return true;
        }
        // N18: a logical destination above 0xff (x2APIC API MSIs) while an
        // APIC is in xAPIC mode: KVM's fast path keeps its low 8 bits for
        // xAPIC clusters (`kvm_apic_map_get_logical_dest`), its slow path
        // matches nothing; ours matches no xAPIC above 0xff (KVM finding).
        if message.destination_mode == DestinationMode::Logical
            && message.destination > 0xff
            && self
                .apics
                .lapics()
                .iter()
                .any(|l| l.hw_enabled() && !l.is_x2apic())
        {
            return true;
        }
        let targets = self.apics.targets();
        if message.destination_mode == DestinationMode::Physical
            && message.destination > 0xff
            && self.apics.lapics().iter().any(|l| {
                l.hw_enabled() && !l.is_x2apic() && l.config().apic_id == message.destination
            })
        {
            return true;
        }
        if message.destination_mode == DestinationMode::Logical
            && targets
                .iter()
                .any(|t| t.x2apic && t.hw_enabled && t.sw_enabled)
            && targets.iter().any(|t| !t.x2apic && t.hw_enabled)
            && targets
                .iter()
                .filter(|t| !t.x2apic && t.hw_enabled && t.sw_enabled)
                .all(|t| t.logical_id == 0)
        {
            return true;
        }
        let special = matches!(
            message.delivery_mode,
            DeliveryMode::Nmi
                | DeliveryMode::Init
                | DeliveryMode::StartUp
                | DeliveryMode::Smi
                | DeliveryMode::ExtInt
        );
        if hint && special {
            return true;
        }
        special
            && message.destination_mode == DestinationMode::Logical
            && apic_bus::resolve(message, self.apics.targets(), None)
                .iter()
                .any(|i| self.apics.targets().get(i).is_some_and(|t| !t.sw_enabled))
    }

    /// Whether writing `entry` to `pin` would make either side send a
    /// message [`Self::kvm_unreliable`] rules out, re-injections (N11)
    /// included.
    fn rte_unreliable(&self, pin: u8, entry: RedirectionEntry) -> bool {
        let mut preview = self.ioapic.clone();
        let Ok(output) = preview.write_rte(pin, entry) else {
            return false;
        };
        let mut messages: Vec<Message> = output.deliveries().iter().map(|d| d.message).collect();
        for other in (0..NUM_PINS as u8).filter(|&q| q != pin) {
            if preview.rte(other).is_some_and(|e| e.level_triggered())
                && preview.line(other) == Some(true)
            {
                messages.extend(preview.set_line(other, true));
            }
        }
        messages.iter().any(|m| self.kvm_unreliable(m, false))
    }

    /// N9: a host entry write (`KVM_SET_IRQCHIP`) leaves KVM believing the
    /// line of every edge-triggered pin is low: `KVM_GET_IRQCHIP` hides the
    /// line of an edge already delivered, and kernel mode drops the others
    /// (re-injecting them would fabricate an edge). Our edge pins whose line
    /// KVM now shows low take that level (a falling line on an edge pin
    /// sends nothing).
    fn forget_edge_lines(&mut self) -> Result<(), String> {
        let kvm = self.kvm.ioapic()?;
        for pin in 0..NUM_PINS as u8 {
            let edge = self.ioapic.rte(pin).is_some_and(|e| !e.level_triggered());
            if edge && self.ioapic.line(pin) == Some(true) && kvm.irr & (1 << pin) == 0 {
                let _ = self.ioapic.set_line(pin, false);
            }
        }
        Ok(())
    }

    /// Re-reads KVM's page of `cpu`.
    fn refresh(&mut self, cpu: usize) -> Result<(), String> {
        let page = self.kvm.page(self.pool(cpu)?)?;
        if let Some(slot) = self.pages.get_mut(cpu) {
            *slot = page;
        }
        Ok(())
    }

    /// After KVM and our IOAPIC (or MSI decoder) acted: delivers `messages`
    /// (each with the pin that sent it, `None` for an MSI) on our bus, with
    /// lowest-priority arbitration following KVM's choice (N2), then
    /// compares everything.
    fn delivered(&mut self, mut messages: Vec<(Option<u8>, Message)>) -> Result<(), String> {
        let before = self.pages.clone();
        for cpu in 0..self.used.len() {
            self.refresh(cpu)?;
        }
        // N20: KVM latches INIT (and SIPI) for the vCPU's next entry, after
        // everything else this step delivered; ours acts on acceptance. Ours
        // takes a step's INIT messages last, and KVM's vCPUs process theirs
        // at the end of the step (`KVM_GET_MP_STATE`).
        messages.sort_by_key(|(_, m)| m.delivery_mode == DeliveryMode::Init);
        let events = messages.iter().any(|(_, m)| {
            matches!(
                m.delivery_mode,
                DeliveryMode::Init | DeliveryMode::StartUp | DeliveryMode::Nmi
            )
        });
        // IRR bits (vCPU, vector) that a message of this step already
        // accounts for, so a later message with the same vector is not
        // credited with the same change.
        let mut consumed: Vec<(usize, u8)> = Vec::new();
        let vectors: Vec<u8> = messages.iter().map(|(_, m)| m.vector).collect();
        // Where each message can land, on the targets as they stand before
        // any of them is delivered (an INIT, which changes them, comes last).
        let targets: Vec<ApicTarget> = self.apics.targets().to_vec();
        let reach: Vec<ApicSet> = messages
            .iter()
            .map(|(_, m)| apic_bus::resolve(m, &targets, None))
            .collect();
        for (n, (pin, message)) in messages.into_iter().enumerate() {
            let shared = vectors.iter().filter(|&&v| v == message.vector).count() > 1;
            // The APICs a later message with the same vector can reach: an
            // IRR change there may be that message's.
            let mut later = ApicSet::new();
            for (m, r) in reach.iter().enumerate().skip(n + 1) {
                if vectors.get(m) == Some(&message.vector) {
                    for i in r.iter() {
                        later.insert(i);
                    }
                }
            }
            let took = self.deliver(&message, &before, &mut consumed, shared, &later)?;
            if let Some(pin) = pin
                && message.trigger_mode == TriggerMode::Level
                && took.is_empty()
            {
                self.sync_remote_irr(pin)?;
            }
        }
        if events {
            for cpu in 0..self.used.len() {
                self.kvm.accept_events(self.pool(cpu)?)?;
                self.refresh(cpu)?;
            }
            self.compare_nmis()?;
        }
        self.compare_all()
    }

    /// Puts `message` on our bus; returns the vCPUs that took it as KVM
    /// counts an acceptance (`__apic_accept_irq` returning 1).
    fn deliver(
        &mut self,
        message: &Message,
        before: &[Page],
        consumed: &mut Vec<(usize, u8)>,
        shared_vector: bool,
        later: &ApicSet,
    ) -> Result<ApicSet, String> {
        let mut took = ApicSet::new();
        let smm = self.smm;
        let kvm_takes = move |outcome: AcceptOutcome, mode: DeliveryMode| match mode {
            // KVM ignores ExtINT messages from the bus; SMIs need SMM.
            DeliveryMode::ExtInt => false,
            DeliveryMode::Smi => smm && outcome.accepted(),
            // KVM takes vectors 0..15 (N10).
            _ => outcome.accepted() || outcome == AcceptOutcome::IllegalVector,
        };
        if !arbitrated(message) {
            self.apics.deliver_each(message, None, |i, outcome| {
                if kvm_takes(outcome, message.delivery_mode) {
                    took.insert(i);
                }
            });
            // Its IRR changes are its own: a lowest-priority message of
            // this step with the same vector is not credited with them.
            for i in took.iter() {
                consumed.push((i, message.vector));
            }
            return Ok(took);
        }
        // N2: lowest priority. Any one APIC of the set is right; KVM hashes
        // the vector. Check both sides chose within the set, then give our
        // LAPICs KVM's choice so the states stay comparable.
        let targets: Vec<ApicTarget> = self.apics.targets().to_vec();
        let candidates: Vec<usize> = apic_bus::resolve(message, &targets, None)
            .iter()
            .filter(|&i| {
                targets
                    .get(i)
                    .is_some_and(|t| apic_bus::accepts(DeliveryMode::Fixed, t))
            })
            .collect();
        let ours = self.apics.clone().deliver_each(message, None, |_, _| ());
        let ours_ok = match ours.first() {
            Some(i) => ours.len() == 1 && candidates.contains(&i),
            None => candidates.is_empty(),
        };
        if !ours_ok {
            return Err(format!(
                "our arbiter sent lowest-priority {message:?} to {:?}, candidates {candidates:?}",
                ours.iter().collect::<Vec<_>>()
            ));
        }
        let v = message.vector;
        let level = message.trigger_mode == TriggerMode::Level;
        let x2apic_api = self.kvm.x2apic_api;
        let misses =
            !candidates.is_empty() && kvm_hash_misses(message, &candidates, &targets, x2apic_api);
        if misses && shared_vector {
            // Another message of this step has the vector: a change cannot
            // tell which one KVM delivered, so the hash decides (N3).
            return Ok(took);
        }
        let changed: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| !consumed.contains(&(i, v)))
            .filter(|&i| match (before.get(i), self.pages.get(i)) {
                (Some(b), Some(a)) => {
                    bit(a, IRR0, v) != bit(b, IRR0, v) || bit(a, TMR0, v) != bit(b, TMR0, v)
                }
                _ => false,
            })
            .collect();
        // With no visible change KVM either coalesced the vector into an
        // APIC that had it (same state as taking it there) or dropped it;
        // the two differ only in the Remote IRR of a level pin, which N1
        // then takes from KVM.
        let mut visible = true;
        let chosen = match changed.as_slice() {
            [one] => Some(*one),
            [] => {
                visible = false;
                candidates.iter().copied().find(|&i| {
                    self.pages
                        .get(i)
                        .is_some_and(|a| bit(a, IRR0, v) && bit(a, TMR0, v) == level)
                })
            }
            // Another message of this step with the vector can account
            // for the other changes: this one took an APIC that no later
            // one can reach (any, when all of them can).
            several if shared_vector => several
                .iter()
                .copied()
                .find(|&i| !later.contains(i))
                .or(several.first().copied()),
            several => {
                return Err(format!(
                    "KVM delivered lowest-priority {message:?} to {several:?}"
                ));
            }
        };
        match chosen {
            Some(k) => {
                if visible {
                    consumed.push((k, v));
                }
                if let Some(outcome) = self.apics.with(k, |l| l.accept(message))
                    && kvm_takes(outcome, message.delivery_mode)
                    && visible
                {
                    took.insert(k);
                }
            }
            None if candidates.is_empty() => {}
            None if misses => {
                // N3: KVM's vector hash picked a destination bit with no
                // enabled APIC and dropped the interrupt (finding K2). Ours
                // would deliver it; it is skipped to stay comparable.
            }
            None => {
                return Err(format!(
                    "KVM took lowest-priority {message:?} nowhere; candidates {candidates:?}"
                ));
            }
        }
        Ok(took)
    }

    /// N1: KVM sets Remote IRR only when an APIC accepted the level message
    /// (`ioapic_service`: `ret > 0`, or `-1` from its slow path when nothing
    /// matched); ours sets it when the message is sent. When no APIC took
    /// it, our pin takes KVM's Remote IRR.
    fn sync_remote_irr(&mut self, pin: u8) -> Result<(), String> {
        let kvm = self.kvm.ioapic()?;
        let Some(entry) = kvm.redirtbl.get(usize::from(pin)) else {
            return Ok(());
        };
        // SAFETY: both members of the union are views of the same 8 bytes
        // of plain integers; any bit pattern is a valid u64.
        let kvm_bits = unsafe { entry.bits };
        let mut state = self.ioapic.save();
        if let Some(ours) = state.entries.get_mut(usize::from(pin)) {
            *ours = *ours & !RTE_REMOTE_IRR | kvm_bits & RTE_REMOTE_IRR;
        }
        self.ioapic
            .restore(&state)
            .map_err(|e| format!("IOAPIC restore for Remote IRR of pin {pin}: {e}"))
    }

    /// Compares every vCPU's registers (KVM's pages as last read) and the
    /// IOAPIC.
    fn compare_all(&mut self) -> Result<(), String> {
        for cpu in 0..self.used.len() {
            self.compare_cpu(cpu)?;
        }
        self.compare_ioapic()
    }

    fn compare_cpu(&self, cpu: usize) -> Result<(), String> {
        let (Some(lapic), Some(kvm)) = (self.apics.get(cpu), self.pages.get(cpu)) else {
            return Err(format!("no vCPU {cpu}"));
        };
        if !lapic.hw_enabled() {
            // A disabled APIC has no registers to read (N4).
            return Ok(());
        }
        let ours = lapic.to_kvm_page(0);
        let x2apic = lapic.is_x2apic();
        let mut checks: Vec<(&str, u16)> = vec![("TPR", TPR), ("PPR", PPR), ("SVR", SVR)];
        checks.push(("LDR", LDR));
        if !x2apic {
            checks.push(("ID", ID));
            checks.push(("DFR", DFR));
        }
        for (name, base) in [("ISR", ISR0), ("TMR", TMR0), ("IRR", IRR0)] {
            for n in 0..8u16 {
                let offset = base + n * 0x10;
                // N10: KVM takes vectors 0..15 into the IRR (and TMR); ours
                // refuses them as illegal (SDM Vol. 3A 11.5.3).
                let mask = if n == 0 { 0xffff_0000 } else { u32::MAX };
                if reg(kvm, offset) & mask != reg(&ours, offset) & mask {
                    return Err(self.cpu_diff(cpu, name, kvm, &ours));
                }
            }
        }
        for (name, offset) in checks {
            if reg(kvm, offset) != reg(&ours, offset) {
                return Err(self.cpu_diff(cpu, name, kvm, &ours));
            }
        }
        if x2apic {
            // N21: without KVM_CAP_X2APIC_API KVM shows the x2APIC ID in
            // bits 24..31 (the legacy layout); ours is the 32-bit layout.
            let want = if self.kvm.x2apic_api {
                reg(&ours, ID)
            } else {
                reg(&ours, ID) << 24
            };
            if reg(kvm, ID) != want {
                return Err(self.cpu_diff(cpu, "x2APIC ID", kvm, &ours));
            }
        }
        Ok(())
    }

    /// With `KVM_DIFFERENTIAL_TRACE` set: both sides' registers after a
    /// step, on stderr.
    fn trace(&self, step: usize, op: u8) {
        eprintln!("step {step} (op {op}):");
        for (cpu, (lapic, kvm)) in self.apics.lapics().iter().zip(&self.pages).enumerate() {
            eprintln!(
                "{}",
                self.cpu_diff(cpu, "state", kvm, &lapic.to_kvm_page(0))
            );
        }
        if let Ok(kvm) = self.kvm.ioapic() {
            for (pin, ours) in self.ioapic.entries() {
                let Some(entry) = kvm.redirtbl.get(usize::from(pin)) else {
                    continue;
                };
                // SAFETY: plain integers, as in `sync_remote_irr`.
                let kvm_bits = unsafe { entry.bits };
                if kvm_bits != 0x1_0000 || ours.into_bits() != 0x1_0000 {
                    eprintln!(
                        "  pin {pin}: KVM {kvm_bits:#018x} line {}, ours {:#018x} line {:?}",
                        kvm.irr >> pin & 1,
                        ours.into_bits(),
                        self.ioapic.line(pin)
                    );
                }
            }
        }
    }

    fn cpu_diff(&self, cpu: usize, what: &str, kvm: &Page, ours: &Page) -> String {
        let show = |page: &Page| {
            let bank = |base: u16| {
                (0..8u16)
                    .rev()
                    .map(|n| format!("{:08x}", reg(page, base + n * 0x10)))
                    .collect::<Vec<_>>()
                    .join("")
            };
            format!(
                "ID {:#x} TPR {:#x} PPR {:#x} LDR {:#x} DFR {:#x} SVR {:#x} IRR {} TMR {} ISR {}",
                reg(page, ID),
                reg(page, TPR),
                reg(page, PPR),
                reg(page, LDR),
                reg(page, DFR),
                reg(page, SVR),
                bank(IRR0),
                bank(TMR0),
                bank(ISR0)
            )
        };
        format!(
            "cpu {cpu} (vCPU ID {:#x}): {what} differs\n  KVM:  {}\n  ours: {}",
            self.pool(cpu)
                .ok()
                .and_then(|p| POOL_IDS.get(p))
                .copied()
                .unwrap_or(u32::MAX),
            show(kvm),
            show(ours)
        )
    }

    fn compare_ioapic(&self) -> Result<(), String> {
        let kvm = self.kvm.ioapic()?;
        for (pin, ours) in self.ioapic.entries() {
            let Some(entry) = kvm.redirtbl.get(usize::from(pin)) else {
                return Err(format!("KVM has no pin {pin}"));
            };
            // SAFETY: plain integers, as in `sync_remote_irr`.
            let kvm_bits = unsafe { entry.bits };
            // N7: KVM keeps the extended destination bits the host wrote
            // (KVM_SET_IRQCHIP copies the entry) and never uses them; ours
            // has them read-only zero without `ext_dest_id`.
            let mask = !RTE_EXTENDED_DESTINATION_MASK;
            if kvm_bits & mask != ours.into_bits() & mask {
                return Err(format!(
                    "pin {pin}: entry KVM {kvm_bits:#018x}, ours {:#018x}",
                    ours.into_bits()
                ));
            }
            if ours.level_triggered() {
                let kvm_line = kvm.irr & (1 << pin) != 0;
                let our_line = self.ioapic.line(pin) == Some(true);
                if kvm_line != our_line {
                    return Err(format!(
                        "pin {pin} (level): line KVM {kvm_line}, ours {our_line}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Pending NMI per enabled vCPU (`KVM_GET_VCPU_EVENTS` against our
    /// latched NMI).
    fn compare_nmis(&self) -> Result<(), String> {
        for (cpu, lapic) in self.apics.lapics().iter().enumerate() {
            if !lapic.hw_enabled() {
                continue;
            }
            let kvm = self.kvm.nmi_pending(self.pool(cpu)?)?;
            let ours = lapic.clone().take_nmis() != 0;
            if kvm != ours {
                return Err(format!("cpu {cpu}: NMI pending KVM {kvm}, ours {ours}"));
            }
        }
        Ok(())
    }
}

/// The delivery mode of 3 bits; the reserved 011 is never generated (N8:
/// KVM logs a kernel error per such message, and our bus drops it, which
/// the `apic_system` target checks).
fn delivery_mode(bits: u8) -> DeliveryMode {
    match DeliveryMode::from_bits(bits) {
        DeliveryMode::Reserved => DeliveryMode::Fixed,
        mode => mode,
    }
}

/// Whether the bus narrows `message` to one APIC (as `apic_bus` decides:
/// lowest priority, except to the physical broadcast).
fn arbitrated(message: &Message) -> bool {
    message.delivery_mode == DeliveryMode::LowestPriority
        && !(message.shorthand == Shorthand::None
            && message.destination_mode == DestinationMode::Physical
            && message.destination == 0xff)
}

/// Bit `v` of the 256-bit bank at `base` of a page.
fn bit(page: &Page, base: u16, v: u8) -> bool {
    reg(page, base + u16::from(v >> 5) * 0x10) & (1 << (v & 31)) != 0
}

/// IA32_APIC_BASE of `lapic`.
fn base_of(lapic: &Lapic) -> Result<u64, String> {
    lapic
        .clone()
        .msr_read(IA32_APIC_BASE, 0)
        .map_err(|gp| format!("IA32_APIC_BASE read faulted: {gp:?}"))
}

/// A target's (cluster, member bits) in one logical addressing model.
type Members = fn(&ApicTarget) -> (u32, u32);

/// Whether KVM's vector hashing for a logical lowest-priority `message`
/// lands on a destination bit that no candidate (enabled, matching APIC)
/// holds: `kvm_apic_map_get_dest_lapic` takes the (vector mod n)-th of the
/// n destination bits of the cluster, and drops the interrupt when that
/// slot has no APIC able to take it.
fn kvm_hash_misses(
    message: &Message,
    candidates: &[usize],
    targets: &[ApicTarget],
    x2apic_api: bool,
) -> bool {
    // The logical broadcast goes through KVM's slow path.
    if message.destination_mode != DestinationMode::Logical || message.destination == 0xff {
        return false;
    }
    // Without 32-bit IDs, two enabled APICs with one ID leave KVM without
    // its optimised map at all (`kvm_recalculate_phys_map`: -EINVAL).
    let present: Vec<&ApicTarget> = targets.iter().filter(|t| t.hw_enabled).collect();
    if !x2apic_api
        && present
            .iter()
            .enumerate()
            .any(|(i, a)| present.iter().skip(i + 1).any(|b| a.apic_id == b.apic_id))
    {
        return false;
    }
    // KVM's logical mode comes from the software-enabled APICs with a
    // non-zero LDR (`kvm_recalculate_logical_map`).
    let enabled: Vec<&ApicTarget> = targets
        .iter()
        .filter(|t| apic_bus::accepts(DeliveryMode::Fixed, t) && t.logical_id != 0)
        .collect();
    let d = message.destination;
    let (cluster, mask, of): (u32, u32, Members) = if enabled.iter().all(|t| t.x2apic) {
        // The cluster's slots are x2APIC IDs cluster * 16 + bit, up to
        // the highest present APIC ID (at least 255).
        let max_id = targets
            .iter()
            .filter(|t| t.hw_enabled)
            .map(|t| t.apic_id)
            .max()
            .unwrap_or(0)
            .max(255);
        let offset = (d >> 16) * 16;
        let size = if offset <= max_id {
            (max_id - offset + 1).min(16)
        } else {
            0
        };
        let mask = if size == 0 {
            0
        } else {
            d & (0xffff >> (16 - size))
        };
        (d >> 16, mask, |t| {
            (t.logical_id >> 16, t.logical_id & 0xffff)
        })
    } else if enabled.iter().all(|t| !t.x2apic && t.dfr_flat) {
        (0, d & 0xff, |t| (0, t.logical_id & 0xff))
    } else if enabled.iter().all(|t| !t.x2apic && !t.dfr_flat) {
        ((d >> 4) & 0xf, d & 0xf, |t| {
            ((t.logical_id >> 4) & 0xf, t.logical_id & 0xf)
        })
    } else {
        return false;
    };
    // KVM's xAPIC logical map gives up (slow path, no drop) when an APIC's
    // member bits are more than one bit or two APICs share one. An APIC
    // with no member bits (an LDR with only a cluster part) set the mode
    // above but takes no slot and leaves the map as it is
    // (`kvm_recalculate_logical_map` returns on an empty mask).
    if enabled.iter().all(|t| !t.x2apic) {
        let mut seen: Vec<(u32, u32)> = Vec::new();
        for t in &enabled {
            let (c, members) = of(t);
            if members == 0 {
                continue;
            }
            if !members.is_power_of_two() || seen.contains(&(c, members)) {
                return false;
            }
            seen.push((c, members));
        }
    }
    let n = mask.count_ones();
    if n == 0 {
        return true;
    }
    let nth = u32::from(message.vector) % n;
    let Some(slot) = (0..16u32)
        .filter(|b| mask & (1 << b) != 0)
        .nth(nth as usize)
    else {
        return false;
    };
    !candidates.iter().any(|&i| {
        targets.get(i).is_some_and(|t| {
            let (c, members) = of(t);
            c == cluster && members & (1 << slot) != 0
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(apic_id: u32, logical_id: u32) -> ApicTarget {
        ApicTarget {
            apic_id,
            x2apic: false,
            logical_id,
            dfr_flat: true,
            hw_enabled: true,
            sw_enabled: true,
            arbitration_priority: 0,
        }
    }

    fn lowest(destination: u32, vector: u8) -> Message {
        Message {
            destination,
            destination_mode: DestinationMode::Logical,
            delivery_mode: DeliveryMode::LowestPriority,
            vector,
            trigger_mode: TriggerMode::Edge,
            level: true,
            shorthand: Shorthand::None,
        }
    }

    #[test]
    fn kvm_hash_misses_flat_hole_only_for_the_vector_landing_on_it() {
        // One APIC with logical bit 0; destination bits 0 and 1: KVM takes
        // bit (vector mod 2).
        let targets = [flat(0, 0x01)];
        assert!(kvm_hash_misses(&lowest(0x03, 0x41), &[0], &targets, false));
        assert!(!kvm_hash_misses(&lowest(0x03, 0x42), &[0], &targets, false));
    }

    #[test]
    fn kvm_hash_misses_ignores_apics_with_ldr_zero_for_the_mode() {
        // A cluster-model APIC with LDR 0 does not make the modes mixed.
        let mut cluster = flat(1, 0);
        cluster.dfr_flat = false;
        let targets = [flat(0, 0x04), cluster];
        // Bits 0, 1, 2; vector 0x51 = 81, 81 mod 3 = 0: bit 0, a hole.
        assert!(kvm_hash_misses(&lowest(0x07, 0x51), &[0], &targets, false));
    }

    #[test]
    fn kvm_hash_misses_despite_an_apic_with_no_member_bits() {
        // Cluster model: APIC 1 is cluster 0 member bit 1, APIC 2 has LDR
        // 0x50 (cluster 5, no member bit): KVM's map stays on and skips
        // APIC 2. Destination 0x07 has bits 0..2; vector 80 mod 3 = 2: bit
        // 2, a hole (crash 10 in fuzz/README.md).
        let mut one = flat(1, 0x02);
        one.dfr_flat = false;
        let mut two = flat(2, 0x50);
        two.dfr_flat = false;
        let targets = [one, two];
        assert!(kvm_hash_misses(&lowest(0x07, 80), &[0], &targets, false));
        assert!(!kvm_hash_misses(&lowest(0x07, 82), &[0], &targets, false));
    }

    #[test]
    fn kvm_hash_misses_never_for_physical_destinations() {
        let mut message = lowest(0, 0x41);
        message.destination_mode = DestinationMode::Physical;
        assert!(!kvm_hash_misses(&message, &[0], &[flat(0, 0)], false));
    }

    #[test]
    fn delivery_mode_never_reserved() {
        for bits in 0..8 {
            assert_ne!(delivery_mode(bits), DeliveryMode::Reserved);
        }
    }

    #[test]
    fn arbitrated_except_lowest_priority_to_physical_broadcast() {
        assert!(arbitrated(&lowest(0x03, 0x41)));
        let mut broadcast = lowest(0xff, 0x41);
        broadcast.destination_mode = DestinationMode::Physical;
        assert!(!arbitrated(&broadcast));
    }

    #[test]
    fn reader_pads_missing_bytes_with_zero() {
        let mut input = Reader(&[1, 2, 3]);
        assert_eq!(input.u16(), 0x0201);
        assert_eq!(input.u32(), 3);
        assert!(input.is_empty());
    }
}
