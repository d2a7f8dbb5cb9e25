//! The whole user-mode chip: one IOAPIC and the VMM's own
//! [`ApicSystem`] (up to six local APICs, xAPIC and x2APIC, any IDs, LDRs
//! and DFR models, the APIC bus and its lowest-priority arbiter), wired as
//! a user-mode VMM wires them.
//!
//! Input format: byte 0 is the IOAPIC configuration (as
//! [`super::ioapic::config`]); byte 1 the number of vCPUs (`1 + b % 6`) and
//! whether they advertise directed EOI (bit 7); then one byte per vCPU for
//! its APIC ID (`b >> 6` 0 or 1: the index; 2: `b & 0xf`; 3: the next two
//! bytes); then operations, an opcode byte and its operands:
//!
//! | opcode % 16 | operation |
//! |---|---|
//! | 0 | IOAPIC line level |
//! | 1 | IOAPIC register write through IOREGSEL/IOWIN |
//! | 2 | host redirection-entry write, from fields |
//! | 3 | IOAPIC EOI register write |
//! | 4 | local APIC register write (MMIO, or MSR in x2APIC mode) |
//! | 5 | IA32_APIC_BASE: disabled, xAPIC or x2APIC |
//! | 6 | IPI through the ICR |
//! | 7 | acknowledge (the vCPU takes its highest deliverable vector) |
//! | 8 | EOI (call, MMIO or MSR) |
//! | 9 | CR8 |
//! | 10 | time advances; every timer ticks |
//! | 11 | local interrupt (LINT0, LINT1, thermal, perf, CMCI) |
//! | 12 | the vCPU loop takes pending events |
//! | 13 | snapshot round trip of the whole chip |
//! | 14 | SVR write (software enable, EOI-broadcast suppression) |
//! | 15 | x2APIC SELF IPI |
//!
//! Checked with oracles independent of the code under test: what an
//! operation does (who a message reaches, what an acknowledge, EOI, CR8
//! write or NMI gives) as it happens; the state invariants below after
//! every operation on what it touched (the IOAPIC if it wrote it; the APICs
//! a message had to reach or reached, the one a vCPU operation ran on,
//! every APIC when time advances or a snapshot is taken), reading registers
//! through [`Lapic::peek_register`] and the banks as words; and on the
//! whole chip every 16 operations that touched something and after the
//! last, reading every APIC through RDMSR and MMIO or x2APIC MSR reads on a
//! copy (the guest's own interface), the banks' registers against the
//! model's words, and, for APICs touched since the previous full check, the
//! words against the per-vector accessors (`is_requested`, ...):
//!
//! - every bus message reaches exactly the APICs whose registers, read back
//!   through MMIO or MSRs, match its destination and accept its delivery
//!   mode (SDM Vol. 3A 11.6.2, 11.12.9, 11.12.10, and KVM's documented
//!   quirks); a lowest-priority message reaches one of them with the lowest
//!   PPR; an accepted fixed message sets the IRR, and the TMR exactly when
//!   level-triggered;
//! - the ISR holds exactly the vectors acknowledged and not yet EOId (an
//!   EOI retires the highest), nothing is acknowledged at or below the PPR,
//!   the PPR follows from the TPR and the ISR (SDM 11.8.3.1), no vector
//!   below 16 is ever requested, in service or level, a disabled APIC holds
//!   nothing, and an EOI is broadcast exactly for a level vector without
//!   suppression;
//! - NMIs are counted as KVM's `process_nmi` and the SDM's NMI latch
//!   allow: an NMI reaching an enabled APIC (a bus message, or a local
//!   source in NMI mode) is latched while fewer than two are pending and
//!   merges into them at two; the vCPU loop takes exactly the count, an
//!   INIT clears it, and a global disable or enable (which resets the
//!   registers) keeps it;
//! - the IOAPIC sends, per pin, exactly what the reference model
//!   ([`super::pin_model::RefIoapic`]) sends, Remote IRR sits on level pins
//!   only, and every other observable matches the reference.

use std::borrow::Cow;

use super::input::Input;
use super::pin_model::{PINS, RefIoapic, RefOutput};
use crate::apic_bus::{DeliveryMode, DestinationMode, Message, Shorthand, TriggerMode};
use crate::apic_system::ApicSystem;
use crate::ioapic::spec::{EOI_OFFSET, IOREGSEL_OFFSET, IOWIN_OFFSET};
use crate::ioapic::{Ioapic, IoapicOutput, RedirectionEntry};
use crate::lapic::{AcceptOutcome, Effect, Lapic, LapicConfig, LocalSource, MAX_PENDING_NMIS};

/// Most vCPUs a system input builds.
pub const MAX_CPUS: usize = 6;

/// Operations that touch something between two full checks (see
/// [`System::check`]).
const FULL_CHECK_EVERY: usize = 16;

// IA32_APIC_BASE (SDM Vol. 3A 11.4.4).
const IA32_APIC_BASE: u32 = 0x1b;
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_EN: u64 = 1 << 11;
const BASE_ADDRESS: u64 = 0xfee0_0000;

// xAPIC register offsets (SDM Vol. 3A 11.4.1, Table 11-1); the x2APIC MSR
// of a register is 0x800 + offset / 16 (SDM 11.12.1.2).
const ID: u16 = 0x20;
const TPR: u16 = 0x80;
const PPR: u16 = 0xa0;
const EOI: u16 = 0xb0;
const LDR: u16 = 0xd0;
const DFR: u16 = 0xe0;
const SVR: u16 = 0xf0;
const ISR0: u16 = 0x100;
const TMR0: u16 = 0x180;
const IRR0: u16 = 0x200;
const ICR_LOW: u16 = 0x300;
const ICR_HIGH: u16 = 0x310;
const SELF_IPI_MSR: u32 = 0x83f;
const ICR_MSR: u32 = 0x830;

/// Registers the register-write operation picks from.
const REGISTERS: [u16; 16] = [
    ID, TPR, EOI, LDR, DFR, SVR, 0x280, 0x2f0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380,
    0x3e0,
];

/// LVT register of each local source (SDM Vol. 3A 11.5.1).
const LOCAL_SOURCES: [(LocalSource, u16); 5] = [
    (LocalSource::Lint0, 0x350),
    (LocalSource::Lint1, 0x360),
    (LocalSource::Thermal, 0x330),
    (LocalSource::Perf, 0x340),
    (LocalSource::Cmci, 0x2f0),
];

/// Delivery mode INIT in an LVT or ICR (SDM Vol. 3A 11.5.1).
const DM_INIT: u32 = 0b101;
/// Delivery mode NMI in an LVT or ICR (SDM Vol. 3A 11.5.1).
const DM_NMI: u32 = 0b100;

/// A set of 256 vectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Vectors([u64; 4]);

impl Vectors {
    fn set(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] |= 1 << (v & 63);
    }
    fn clear(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] &= !(1 << (v & 63));
    }
    fn contains(&self, v: u8) -> bool {
        self.0[usize::from(v >> 6)] & (1 << (v & 63)) != 0
    }
    fn highest(&self) -> Option<u8> {
        let word = self.0.iter().rposition(|&w| w != 0)?;
        let bit = 63 - self.0[word].leading_zeros();
        u8::try_from(word * 64 + bit as usize).ok()
    }
    fn from_registers(regs: [u32; 8]) -> Self {
        let mut set = Self::default();
        for (n, reg) in regs.iter().enumerate() {
            set.0[n / 2] |= u64::from(*reg) << (32 * (n % 2));
        }
        set
    }
    fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }
}

/// A local APIC as its guest-visible registers show it.
#[derive(Clone, Copy, Debug, Default)]
struct Observed {
    hw_enabled: bool,
    x2apic: bool,
    apic_id: u32,
    logical_id: u32,
    dfr_flat: bool,
    svr: u32,
    tpr: u8,
    ppr: u8,
    isr: Vectors,
    tmr: Vectors,
    irr: Vectors,
}

impl Observed {
    fn sw_enabled(&self) -> bool {
        self.svr & 0x100 != 0
    }
}

/// How [`System::check_apic`] reads an APIC.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// After an operation that touched the APIC: through [`observe`],
    /// without the banks (TPR and PPR against the ISR; the banks' words
    /// stand for the model's view).
    Quick,
    /// Every [`FULL_CHECK_EVERY`] operations and after the last: through
    /// [`observe_guest`], the three banks' registers against their words;
    /// `sweep`: the words against the per-vector accessors too.
    Full { sweep: bool },
}

/// Which register banks an observation reads (those it does not read are
/// left empty).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Banks {
    isr: bool,
    tmr: bool,
    irr: bool,
}

impl Banks {
    /// None: what the destination oracle and the quick check need.
    const NONE: Self = Self {
        isr: false,
        tmr: false,
        irr: false,
    };
    const ALL: Self = Self {
        isr: true,
        tmr: true,
        irr: true,
    };
    const IRR: Self = Self {
        irr: true,
        ..Self::NONE
    };
    const TMR: Self = Self {
        tmr: true,
        ..Self::NONE
    };
}

/// Builds an [`Observed`] from IA32_APIC_BASE (`base`) and `read`, which
/// reads the register at an xAPIC offset through the mode's interface.
fn observed_from(
    base: u64,
    mut read: impl FnMut(u16) -> Result<u32, String>,
    banks: Banks,
) -> Result<Observed, String> {
    if base & BASE_EN == 0 {
        return Ok(Observed::default());
    }
    let x2apic = base & BASE_EXTD != 0;
    let mut bank = |base: u16, wanted: bool| -> Result<Vectors, String> {
        if !wanted {
            return Ok(Vectors::default());
        }
        let mut regs = [0u32; 8];
        for (n, reg) in (0u16..).zip(regs.iter_mut()) {
            *reg = read(base + n * 0x10)?;
        }
        Ok(Vectors::from_registers(regs))
    };
    let isr = bank(ISR0, banks.isr)?;
    let tmr = bank(TMR0, banks.tmr)?;
    let irr = bank(IRR0, banks.irr)?;
    let (apic_id, logical_id, dfr_flat) = if x2apic {
        (read(ID)?, read(LDR)?, true)
    } else {
        (read(ID)? >> 24, read(LDR)? >> 24, read(DFR)? >> 28 == 0xf)
    };
    Ok(Observed {
        hw_enabled: true,
        x2apic,
        apic_id,
        logical_id,
        dfr_flat,
        svr: read(SVR)?,
        tpr: read(TPR)? as u8,
        ppr: read(PPR)? as u8,
        isr,
        tmr,
        irr,
    })
}

/// Reads `lapic`'s registers the way a guest would: RDMSR of IA32_APIC_BASE,
/// then MMIO or x2APIC MSR reads, on a copy (a read may tick the timer).
/// The full check's observation.
fn observe_guest(lapic: &Lapic, now: u64) -> Result<Observed, String> {
    let mut probe = lapic.clone();
    let base = probe
        .msr_read(IA32_APIC_BASE, now)
        .map_err(|gp| format!("IA32_APIC_BASE read faulted: {gp:?}"))?;
    let x2apic = base & BASE_EXTD != 0;
    let read = |offset: u16| -> Result<u32, String> {
        if x2apic {
            let msr = 0x800 + u32::from(offset >> 4);
            probe
                .msr_read(msr, now)
                .map(|v| v as u32)
                .map_err(|gp| format!("MSR {msr:#x} read faulted: {gp:?}"))
        } else {
            let mut data = [0u8; 4];
            probe.mmio_read(u64::from(offset), &mut data, now);
            Ok(u32::from_le_bytes(data))
        }
    };
    observed_from(base, read, Banks::ALL)
}

/// `lapic` as a guest's read finds it at `now`: a read first fires a timer
/// that is due, so a due one fires on a copy; otherwise `lapic` itself.
fn settled(lapic: &Lapic, now: u64) -> Cow<'_, Lapic> {
    if lapic.next_deadline().is_some_and(|due| due <= now) {
        let mut copy = lapic.clone();
        let _ = copy.tick(now);
        Cow::Owned(copy)
    } else {
        Cow::Borrowed(lapic)
    }
}

/// [`observe_guest`] without copying `lapic` or going through the MMIO and
/// MSR entry points: the same registers, decoded for the mode, through
/// [`Lapic::peek_register`] (which the entry points' reads equal, less
/// their side effects), on [`settled`]. The per-operation observation.
fn observe(lapic: &Lapic, now: u64, banks: Banks) -> Result<Observed, String> {
    let lapic = settled(lapic, now);
    let mut base = 0;
    if lapic.hw_enabled() {
        base |= BASE_EN;
    }
    if lapic.is_x2apic() {
        base |= BASE_EXTD;
    }
    let read = |offset: u16| {
        lapic
            .peek_register(offset, now)
            .map(|v| v as u32)
            .ok_or_else(|| format!("register {offset:#x} does not read"))
    };
    observed_from(base, read, banks)
}

/// What the quick check reads of `lapic` (as [`observe`] does): whether it
/// is enabled, its mode, TPR and PPR; the rest left at its default.
fn observe_priorities(lapic: &Lapic, now: u64) -> Result<Observed, String> {
    let lapic = settled(lapic, now);
    if !lapic.hw_enabled() {
        return Ok(Observed::default());
    }
    let read = |offset: u16| {
        lapic
            .peek_register(offset, now)
            .map(|v| v as u8)
            .ok_or_else(|| format!("register {offset:#x} does not read"))
    };
    Ok(Observed {
        hw_enabled: true,
        x2apic: lapic.is_x2apic(),
        tpr: read(TPR)?,
        ppr: read(PPR)?,
        ..Observed::default()
    })
}

/// The vCPUs of `mask` (bit `i`: vCPU `i`), lowest first.
fn cpus(mask: u8) -> impl Iterator<Item = usize> {
    (0..8).filter(move |i| mask & (1 << i) != 0)
}

/// The bit of vCPU `i` in a mask; 0 beyond the eight a mask holds (more
/// than [`MAX_CPUS`] never exist).
fn bit(i: usize) -> u8 {
    u8::try_from(i)
        .ok()
        .and_then(|i| 1u8.checked_shl(u32::from(i)))
        .unwrap_or(0)
}

/// Whether the APIC `target` (vCPU `index`) must receive `message` sent by
/// `source` (`None`: IOAPIC or MSI), from the SDM rules and KVM's documented
/// quirks: 0xff without a sender broadcasts to x2APICs, 8-bit logical
/// destinations reach x2APIC cluster 0, no xAPIC aliasing above 0xff.
fn should_receive(
    message: &Message,
    target: &Observed,
    index: usize,
    source: Option<usize>,
) -> bool {
    let takes = match message.delivery_mode {
        DeliveryMode::Nmi | DeliveryMode::Init | DeliveryMode::StartUp | DeliveryMode::Smi => true,
        DeliveryMode::Fixed | DeliveryMode::LowestPriority | DeliveryMode::ExtInt => {
            target.sw_enabled()
        }
        DeliveryMode::Reserved => false,
    };
    if !target.hw_enabled || !takes {
        return false;
    }
    let d = message.destination;
    let logical = message.destination_mode == DestinationMode::Logical;
    match message.shorthand {
        Shorthand::SelfOnly => source == Some(index),
        Shorthand::AllIncludingSelf => true,
        Shorthand::AllExcludingSelf => source != Some(index),
        Shorthand::None if target.x2apic => {
            let d = if source.is_none() && d == 0xff {
                u32::MAX
            } else {
                d
            };
            d == u32::MAX
                || if logical {
                    d >> 16 == target.logical_id >> 16 && d & target.logical_id & 0xffff != 0
                } else {
                    d == target.apic_id
                }
        }
        Shorthand::None => {
            d == 0xff
                || if !logical {
                    d == target.apic_id
                } else if target.dfr_flat {
                    d & target.logical_id & 0xff != 0
                } else {
                    d >> 4 == target.logical_id >> 4 && d & target.logical_id & 0xf != 0
                }
        }
    }
}

/// The chip under test: the IOAPIC and the VMM's own [`ApicSystem`] (the
/// code a user-mode VMM runs), next to what the harness knows.
struct System {
    ioapic: Ioapic,
    reference: RefIoapic,
    apics: ApicSystem,
    /// Per vCPU: vectors acknowledged and not yet EOId, the ISR its APIC
    /// must show. Cleared when the APIC is reset (INIT, global disable or
    /// enable).
    in_service: Vec<Vectors>,
    /// Per vCPU: NMIs accepted and not yet taken, as the oracle counts them.
    nmis: Vec<u8>,
    now: u64,
    /// The vCPUs (bit `i`: vCPU `i`) whose APIC the operation under way
    /// may have changed: see [`System::check`].
    touched: u8,
    /// Whether the operation under way may have changed the IOAPIC.
    ioapic_touched: bool,
    /// Operations so far that touched something.
    changed: usize,
    /// The vCPUs touched since the last full check (all at first): the
    /// ones whose per-vector accessors it compares.
    unswept: u8,
}

/// Runs the operations `data` encodes (see the module documentation) on
/// the whole chip. `Err` names the first broken invariant.
pub fn run(data: &[u8]) -> Result<(), String> {
    let mut input = Input::new(data);
    let config = super::ioapic::config(input.u8());
    let shape = input.u8();
    let count = 1 + usize::from(shape) % MAX_CPUS;
    let mut configs = Vec::with_capacity(count);
    for index in 0..count {
        let byte = input.u8();
        let apic_id = match byte >> 6 {
            0 | 1 => index as u32,
            2 => u32::from(byte & 0xf),
            _ => u32::from(input.u16()),
        };
        let mut lapic_config = LapicConfig::new(apic_id, index == 0);
        lapic_config.directed_eoi = shape & 0x80 != 0;
        configs.push(lapic_config);
    }
    let mut system = System {
        ioapic: crate::ioapic::Ioapic::new(config),
        reference: RefIoapic::new(&config),
        apics: ApicSystem::new(configs),
        in_service: vec![Vectors::default(); count],
        nmis: vec![0; count],
        now: 0,
        touched: 0,
        ioapic_touched: false,
        changed: 0,
        unswept: u8::MAX,
    };
    let mut step = 0usize;
    while !input.is_empty() {
        let op = input.u8() % 16;
        system
            .apply(&mut input, op)
            .and_then(|()| system.check())
            .map_err(|what| format!("step {step} (op {op}): {what}"))?;
        step += 1;
    }
    system
        .check_all()
        .map_err(|what| format!("after the last step ({step} steps): {what}"))
}

impl System {
    fn cpu_index(&self, input: &mut Input<'_>) -> usize {
        usize::from(input.u8()) % self.apics.len().max(1)
    }

    /// [`ApicSystem::with`], vCPU `cpu` marked touched: every change to one
    /// APIC goes through here, [`Self::deliver`] or [`Self::snapshot`].
    fn with_lapic<R>(&mut self, cpu: usize, f: impl FnOnce(&mut Lapic) -> R) -> Option<R> {
        self.touched |= bit(cpu);
        self.apics.with(cpu, f)
    }

    /// Every vCPU marked touched.
    fn touch_all(&mut self) {
        for cpu in 0..self.apics.len() {
            self.touched |= bit(cpu);
        }
    }

    /// vCPU `cpu` took an INIT: its APIC was reset and its pending NMIs
    /// dropped.
    fn reset(&mut self, cpu: usize) {
        self.reset_registers(cpu);
        if let Some(n) = self.nmis.get_mut(cpu) {
            *n = 0;
        }
    }

    /// vCPU `cpu`'s APIC registers were reset (IA32_APIC_BASE EN cleared or
    /// set): nothing in service. The NMIs it had accepted stay pending: they
    /// belong to the vCPU, not to the register file (KVM's
    /// `kvm_lapic_set_base` leaves `nmi_pending` alone; only a vCPU reset,
    /// as INIT does, drops them).
    fn reset_registers(&mut self, cpu: usize) {
        if let Some(set) = self.in_service.get_mut(cpu) {
            *set = Vectors::default();
        }
    }

    /// An NMI reached `cpu`, which answered `outcome`: latched below the
    /// limit, merged at it (SDM Vol. 3A 7.7.1's latch behind one in
    /// service; KVM's `process_nmi` keeps two).
    fn check_nmi(&mut self, cpu: usize, outcome: AcceptOutcome) -> Result<(), String> {
        let Some(pending) = self.nmis.get_mut(cpu) else {
            return Ok(());
        };
        let want = if *pending < MAX_PENDING_NMIS {
            AcceptOutcome::Latched
        } else {
            AcceptOutcome::Coalesced
        };
        match outcome {
            AcceptOutcome::Disabled => Ok(()),
            got if got == want => {
                *pending = (*pending + 1).min(MAX_PENDING_NMIS);
                Ok(())
            }
            got => Err(format!(
                "cpu {cpu}: an NMI with {pending} pending answered {got:?}, must be {want:?}"
            )),
        }
    }

    fn apply(&mut self, input: &mut Input<'_>, op: u8) -> Result<(), String> {
        match op {
            0 => {
                let pin = input.u8() % (PINS as u8 + 2);
                let level = input.bool();
                self.ioapic_touched = true;
                let got = self.ioapic.set_line(pin, level);
                let want = self.reference.set_line(pin, level);
                self.reference.compare_line(got, want)?;
                if let Some(message) = got {
                    self.deliver(&message, None)?;
                }
            }
            1 => {
                let index = input.u8();
                let value = input.u32().to_le_bytes();
                self.ioapic_write(IOREGSEL_OFFSET, &[index])?;
                self.ioapic_write(IOWIN_OFFSET, &value)?;
            }
            2 => {
                let pin = input.u8() % PINS as u8;
                let fields = input.u16();
                let entry = RedirectionEntry::new()
                    .with_vector(input.u8())
                    .with_delivery_mode(DeliveryMode::from_bits(fields as u8))
                    .with_logical(fields & 0x8 != 0)
                    .with_active_low(fields & 0x10 != 0)
                    .with_level_triggered(fields & 0x20 != 0)
                    .with_masked(fields & 0x40 != 0)
                    .with_extended_destination((fields >> 8) as u8)
                    .with_destination(input.u8());
                self.ioapic_touched = true;
                let output = self
                    .ioapic
                    .write_rte(pin, entry)
                    .map_err(|e| format!("write_rte({pin}) failed: {e}"))?;
                let mut expected = RefOutput::default();
                self.reference
                    .write_entry(pin, entry.into_bits(), &mut expected);
                self.reference.compare_output(&output, &expected)?;
                self.deliver_output(&output)?;
            }
            3 => {
                let vector = input.u8();
                self.ioapic_write(EOI_OFFSET, &[vector])?;
            }
            4 => {
                let cpu = self.cpu_index(input);
                let register = input.pick(&REGISTERS).unwrap_or(TPR);
                let value = input.u32();
                self.register_write(cpu, register, value)?;
            }
            5 => {
                let cpu = self.cpu_index(input);
                let mode = input.u8() % 3;
                self.apic_mode(cpu, mode)?;
            }
            6 => {
                let cpu = self.cpu_index(input);
                let low = input.u32();
                let destination = input.u32();
                self.ipi(cpu, low, destination)?;
            }
            7 => {
                let cpu = self.cpu_index(input);
                self.acknowledge(cpu)?;
            }
            8 => {
                let cpu = self.cpu_index(input);
                let how = input.u8() % 3;
                self.eoi(cpu, how)?;
            }
            9 => {
                let cpu = self.cpu_index(input);
                let cr8 = u64::from(input.u8());
                let Some(deliverable) = self.with_lapic(cpu, |l| l.set_cr8(cr8)) else {
                    return Ok(());
                };
                let observed = self.observe(cpu, Banks::IRR)?;
                if let Some(v) = deliverable
                    && (v >> 4 <= observed.ppr >> 4 || observed.irr.highest() != Some(v))
                {
                    return Err(format!("cpu {cpu}: CR8 write reports {v:#x} deliverable"));
                }
            }
            10 => {
                self.now = self
                    .now
                    .saturating_add(u64::from(input.u16()) << (input.u8() % 24));
                let now = self.now;
                // Every APIC: a superset of those with a timer armed.
                for cpu in 0..self.apics.len() {
                    let _ = self.with_lapic(cpu, |l| l.tick(now));
                }
            }
            11 => {
                let cpu = self.cpu_index(input);
                let (source, register) = input
                    .pick(&LOCAL_SOURCES)
                    .unwrap_or((LocalSource::Lint0, 0x350));
                self.raise_local(cpu, source, register)?;
            }
            12 => {
                let cpu = self.cpu_index(input);
                let taken = self.with_lapic(cpu, |l| {
                    let nmis = l.take_nmis();
                    let _ = (l.take_smi(), l.take_init());
                    let _ = (l.take_sipi(), l.take_extint());
                    (nmis, l.has_pending_event())
                });
                let Some((nmis, pending)) = taken else {
                    return Ok(());
                };
                if pending {
                    return Err(format!("cpu {cpu}: events pending after taking them all"));
                }
                let want = self.nmis.get_mut(cpu).map_or(0, core::mem::take);
                if nmis != want {
                    return Err(format!(
                        "cpu {cpu}: the vCPU loop took {nmis} NMIs, {want} were accepted"
                    ));
                }
            }
            13 => self.snapshot()?,
            14 => {
                let cpu = self.cpu_index(input);
                let flags = input.u8();
                let svr = 0xff | u32::from(flags & 1) << 8 | u32::from(flags & 2) << 11;
                self.register_write(cpu, SVR, svr)?;
            }
            _ => {
                let cpu = self.cpu_index(input);
                let vector = input.u8();
                let now = self.now;
                let _ = self.with_lapic(cpu, |l| l.msr_write(SELF_IPI_MSR, u64::from(vector), now));
            }
        }
        Ok(())
    }

    /// A guest MMIO write to the IOAPIC, compared with the reference, and
    /// its messages delivered.
    fn ioapic_write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.ioapic_touched = true;
        let output = self.ioapic.mmio_write(offset, data);
        let mut expected = RefOutput::default();
        self.reference.mmio_write(offset, data, &mut expected);
        self.reference.compare_output(&output, &expected)?;
        self.deliver_output(&output)
    }

    fn deliver_output(&mut self, output: &IoapicOutput) -> Result<(), String> {
        for delivery in output.deliveries() {
            self.deliver(&delivery.message, None)?;
        }
        Ok(())
    }

    /// Puts `message` on the bus through the [`ApicSystem`], checks who it
    /// reaches against the oracle, and what each destination made of it.
    /// The APICs it must reach and those it reached are marked touched.
    fn deliver(&mut self, message: &Message, source: Option<usize>) -> Result<(), String> {
        let now = self.now;
        let mut observed = [Observed::default(); MAX_CPUS];
        let mut eligible = 0u8;
        for (i, lapic) in self.apics.lapics().iter().enumerate() {
            let Some(slot) = observed.get_mut(i) else {
                return Err(format!("vCPU {i} beyond {MAX_CPUS}"));
            };
            *slot = observe(lapic, now, Banks::NONE)?;
            if should_receive(message, slot, i, source) {
                eligible |= bit(i);
            }
        }
        let mut outcomes = [None; MAX_CPUS];
        let mut answers = 0usize;
        let destinations = self.apics.deliver_each(message, source, |i, o| {
            if let Some(slot) = outcomes.get_mut(answers) {
                *slot = Some((i, o));
            }
            answers += 1;
        });
        let mut reached = 0u8;
        for i in destinations.iter() {
            if i >= MAX_CPUS {
                return Err(format!("{message:?} routed to missing vCPU {i}"));
            }
            reached |= bit(i);
        }
        self.touched |= eligible | reached;
        let list = |mask: u8| cpus(mask).collect::<Vec<_>>();
        let arbitrated = message.delivery_mode == DeliveryMode::LowestPriority
            && !(message.shorthand == Shorthand::None
                && message.destination_mode == DestinationMode::Physical
                && message.destination == 0xff);
        if arbitrated {
            if reached.count_ones() != u32::from(eligible != 0) {
                return Err(format!(
                    "lowest-priority {message:?} from {source:?} reached {:?}, eligible {:?}",
                    list(reached),
                    list(eligible)
                ));
            }
            if let Some(winner) = cpus(reached).next() {
                let lowest = cpus(eligible)
                    .filter_map(|i| observed.get(i))
                    .map(|o| o.ppr)
                    .min();
                let won = observed.get(winner).map(|o| o.ppr);
                if eligible & bit(winner) == 0 || won != lowest {
                    return Err(format!(
                        "lowest-priority {message:?} went to {winner} (PPR {won:?}), eligible {:?} (lowest PPR {lowest:?})",
                        list(eligible)
                    ));
                }
            }
        } else if reached != eligible {
            return Err(format!(
                "{message:?} from {source:?} reached {:?}, must reach {:?}",
                list(reached),
                list(eligible)
            ));
        }
        let answered = outcomes.iter().take(answers).flatten().map(|&(i, _)| i);
        if answers > MAX_CPUS || answered.ne(destinations.iter()) {
            return Err(format!(
                "{message:?}: destinations {:?} but {answers} answers {outcomes:?}",
                list(reached)
            ));
        }
        for (index, outcome) in outcomes.into_iter().take(answers).flatten() {
            self.check_accept(index, message, outcome)?;
        }
        Ok(())
    }

    /// What LAPIC `index` answered to `message` against what it must hold now.
    fn check_accept(
        &mut self,
        index: usize,
        message: &Message,
        outcome: AcceptOutcome,
    ) -> Result<(), String> {
        let Some(lapic) = self.apics.get(index) else {
            return Err(format!("message routed to missing vCPU {index}"));
        };
        let v = message.vector;
        match message.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => match outcome {
                AcceptOutcome::Requested | AcceptOutcome::Coalesced => {
                    let level = message.trigger_mode == TriggerMode::Level;
                    if !lapic.is_requested(v) || lapic.is_level(v) != level {
                        return Err(format!(
                            "cpu {index} accepted {message:?} ({outcome:?}) but IRR/TMR of {v:#x} are {}/{}",
                            lapic.is_requested(v),
                            lapic.is_level(v)
                        ));
                    }
                    // The registers holding `v`, as the guest reads them
                    // (the whole banks are compared after the operation).
                    let lapic = settled(lapic, self.now);
                    let register = |bank: u16| {
                        lapic
                            .peek_register(bank + u16::from(v >> 5) * 0x10, self.now)
                            .map(|r| r & (1 << (v & 31)) != 0)
                    };
                    let (irr, tmr) = (register(IRR0), register(TMR0));
                    if irr != Some(true) || tmr != Some(level) {
                        return Err(format!(
                            "cpu {index} accepted {message:?} ({outcome:?}) but the IRR/TMR registers of {v:#x} read {irr:?}/{tmr:?}"
                        ));
                    }
                }
                AcceptOutcome::IllegalVector if v < 16 => {}
                other => {
                    return Err(format!(
                        "cpu {index}, a resolved target, answered {other:?} to {message:?}"
                    ));
                }
            },
            DeliveryMode::Init => {
                if outcome == AcceptOutcome::Latched {
                    self.reset(index);
                }
            }
            DeliveryMode::Nmi => self.check_nmi(index, outcome)?,
            DeliveryMode::Reserved => {
                return Err(format!(
                    "reserved-mode message {message:?} reached cpu {index}"
                ));
            }
            _ => {
                if !outcome.accepted() {
                    return Err(format!("cpu {index} answered {outcome:?} to {message:?}"));
                }
            }
        }
        Ok(())
    }

    /// LAPIC `cpu` as the guest reads it now.
    fn observe(&self, cpu: usize, banks: Banks) -> Result<Observed, String> {
        match self.apics.get(cpu) {
            Some(lapic) => observe(lapic, self.now, banks),
            None => Err(format!("no vCPU {cpu}")),
        }
    }

    fn effect(&mut self, cpu: usize, effect: Option<Effect>) -> Result<(), String> {
        match effect {
            Some(Effect::Ipi(message)) => self.deliver(&message, Some(cpu)),
            Some(Effect::EoiBroadcast { vector }) => {
                self.ioapic_touched = true;
                let output = self.ioapic.eoi(vector);
                let mut expected = RefOutput::default();
                self.reference.eoi(vector, &mut expected);
                self.reference.compare_output(&output, &expected)?;
                self.deliver_output(&output)
            }
            None => Ok(()),
        }
    }

    /// A register write through the interface of the APIC's mode; an EOI
    /// write is checked as an EOI.
    fn register_write(&mut self, cpu: usize, register: u16, value: u32) -> Result<(), String> {
        if register == EOI {
            return self.eoi_with(cpu, |lapic, now, x2apic| {
                if x2apic {
                    lapic
                        .msr_write(0x80b, u64::from(value), now)
                        .ok()
                        .map(|e| (true, e))
                } else {
                    Some((
                        lapic.mmio_decoded(),
                        lapic.mmio_write(u64::from(EOI), &value.to_le_bytes(), now),
                    ))
                }
            });
        }
        let now = self.now;
        let effect = self.with_lapic(cpu, |l| {
            if l.is_x2apic() {
                let msr = 0x800 + u32::from(register >> 4);
                l.msr_write(msr, u64::from(value), now).unwrap_or(None)
            } else {
                l.mmio_write(u64::from(register), &value.to_le_bytes(), now)
            }
        });
        self.effect(cpu, effect.flatten())
    }

    fn apic_mode(&mut self, cpu: usize, mode: u8) -> Result<(), String> {
        let now = self.now;
        let Some(before) = self
            .apics
            .get(cpu)
            .map(|l| l.clone().msr_read(IA32_APIC_BASE, now))
        else {
            return Ok(());
        };
        let before = before.map_err(|gp| format!("IA32_APIC_BASE read faulted: {gp:?}"))?;
        let bits = match mode {
            0 => 0,
            1 => BASE_EN,
            _ => BASE_EN | BASE_EXTD,
        };
        let value = BASE_ADDRESS | (before & BASE_BSP) | bits;
        let written = self.with_lapic(cpu, |l| l.msr_write(IA32_APIC_BASE, value, now).is_ok());
        if written == Some(true) && (before & BASE_EN != 0) != (value & BASE_EN != 0) {
            self.reset_registers(cpu);
        }
        Ok(())
    }

    fn ipi(&mut self, cpu: usize, low: u32, destination: u32) -> Result<(), String> {
        let now = self.now;
        let written = self.with_lapic(cpu, |l| {
            if l.is_x2apic() {
                let icr = u64::from(destination) << 32 | u64::from(low & 0x000c_cfff);
                Ok(l.msr_write(ICR_MSR, icr, now).unwrap_or(None))
            } else {
                let high =
                    l.mmio_write(u64::from(ICR_HIGH), &(destination << 24).to_le_bytes(), now);
                if high.is_some() {
                    return Err(format!("cpu {cpu}: an ICR high write had an effect"));
                }
                Ok(l.mmio_write(u64::from(ICR_LOW), &low.to_le_bytes(), now))
            }
        });
        match written {
            Some(effect) => self.effect(cpu, effect?),
            None => Ok(()),
        }
    }

    fn acknowledge(&mut self, cpu: usize) -> Result<(), String> {
        if self.apics.get(cpu).is_none() {
            return Ok(());
        }
        let before = self.observe(cpu, Banks::IRR)?;
        let taken = self.with_lapic(cpu, Lapic::acknowledge).flatten();
        let highest = before.irr.highest();
        let expected = match highest {
            Some(v) if before.hw_enabled && v >> 4 > before.ppr >> 4 => Some(v),
            _ => None,
        };
        if taken != expected {
            return Err(format!(
                "cpu {cpu} acknowledged {taken:x?}; IRR highest {highest:x?}, PPR {:#x}",
                before.ppr
            ));
        }
        if let (Some(v), Some(set)) = (taken, self.in_service.get_mut(cpu)) {
            set.set(v);
        }
        Ok(())
    }

    fn eoi(&mut self, cpu: usize, how: u8) -> Result<(), String> {
        self.eoi_with(cpu, |lapic, now, x2apic| match how {
            0 => Some((true, lapic.eoi())),
            1 if x2apic => lapic.msr_write(0x80b, 0, now).ok().map(|e| (true, e)),
            _ => Some((
                lapic.mmio_decoded(),
                lapic.mmio_write(u64::from(EOI), &[0; 4], now),
            )),
        })
    }

    /// Runs `write`, an EOI by some interface returning (whether the APIC
    /// took it, its effect), and checks the ISR and the broadcast.
    fn eoi_with(
        &mut self,
        cpu: usize,
        write: impl FnOnce(&mut Lapic, u64, bool) -> Option<(bool, Option<Effect>)>,
    ) -> Result<(), String> {
        let now = self.now;
        if self.apics.get(cpu).is_none() {
            return Ok(());
        }
        let before = self.observe(cpu, Banks::TMR)?;
        let Some((taken, effect)) = self
            .with_lapic(cpu, |l| write(l, now, before.x2apic))
            .flatten()
        else {
            return Ok(());
        };
        let in_service = self.in_service.get(cpu).copied().unwrap_or_default();
        let retired = if taken && before.hw_enabled {
            in_service.highest()
        } else {
            None
        };
        let broadcast = match retired {
            Some(v) if before.tmr.contains(v) => before.svr & 0x1000 == 0,
            _ => false,
        };
        let expected = match (retired, broadcast) {
            (Some(vector), true) => Some(Effect::EoiBroadcast { vector }),
            _ => None,
        };
        if effect != expected {
            return Err(format!(
                "cpu {cpu}: EOI retiring {retired:x?} gave {effect:?}, expected {expected:?}"
            ));
        }
        if let (Some(v), Some(set)) = (retired, self.in_service.get_mut(cpu)) {
            set.clear(v);
        }
        self.effect(cpu, effect)
    }

    fn raise_local(
        &mut self,
        cpu: usize,
        source: LocalSource,
        register: u16,
    ) -> Result<(), String> {
        let now = self.now;
        let Some(lapic) = self.apics.get(cpu) else {
            return Ok(());
        };
        let before = observe(lapic, now, Banks::NONE)?;
        let lvt = if before.hw_enabled {
            settled(lapic, now)
                .peek_register(register, now)
                .unwrap_or(0) as u32
        } else {
            0
        };
        let outcome = self.with_lapic(cpu, |l| l.raise_local(source));
        let masked = lvt & (1 << 16) != 0;
        match (outcome, (lvt >> 8) & 7) {
            (Some(AcceptOutcome::Latched), DM_INIT) => self.reset(cpu),
            (Some(outcome), DM_NMI) if before.hw_enabled && !masked => {
                self.check_nmi(cpu, outcome)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<(), String> {
        let state = self.ioapic.save();
        let mut ioapic = Ioapic::new(*self.ioapic.config());
        ioapic
            .restore(&state)
            .map_err(|e| format!("IOAPIC restore of a saved state failed: {e}"))?;
        if ioapic != self.ioapic {
            return Err("IOAPIC restore(save(x)) differs from x".into());
        }
        let mut restored = Vec::with_capacity(self.apics.len());
        for (i, lapic) in self.apics.lapics().iter().enumerate() {
            let copy = Lapic::restore(&lapic.save());
            if copy != *lapic {
                return Err(format!("cpu {i}: restore(save(x)) differs from x"));
            }
            restored.push(copy);
        }
        self.touch_all();
        self.ioapic_touched = true;
        let arbiter = self.apics.arbiter();
        let before = self.apics.clone();
        self.apics.replace(restored, &arbiter);
        if self.apics != before {
            return Err("APIC system replace(its own state) differs from itself".into());
        }
        self.ioapic = ioapic;
        Ok(())
    }

    /// The invariants every operation must leave intact, checked where the
    /// operation may have broken them: the IOAPIC if it touched it, the
    /// APICs it touched ([`Self::with_lapic`], [`Self::deliver`], time
    /// advancing and snapshots mark them); every [`FULL_CHECK_EVERY`]
    /// operations that touched something, [`Self::check_all`] instead.
    fn check(&mut self) -> Result<(), String> {
        let (touched, ioapic) = (self.touched, self.ioapic_touched);
        self.touched = 0;
        self.ioapic_touched = false;
        if touched == 0 && !ioapic {
            return Ok(());
        }
        self.changed += 1;
        self.unswept |= touched;
        if self.changed.is_multiple_of(FULL_CHECK_EVERY) {
            return self.check_all();
        }
        if ioapic {
            self.check_ioapic()?;
        }
        for cpu in cpus(touched) {
            self.check_apic(cpu, Check::Quick)?;
        }
        Ok(())
    }

    /// Every invariant on the whole chip, each APIC read through the
    /// guest's own interface ([`observe_guest`]); the banks of those
    /// touched since the last full check also through the per-vector
    /// accessors (the others' banks have not moved since).
    fn check_all(&mut self) -> Result<(), String> {
        self.check_ioapic()?;
        for cpu in 0..self.apics.len() {
            let sweep = self.unswept & bit(cpu) != 0;
            self.check_apic(cpu, Check::Full { sweep })?;
        }
        self.unswept = 0;
        Ok(())
    }

    /// The IOAPIC against the reference; Remote IRR on level entries only.
    fn check_ioapic(&self) -> Result<(), String> {
        self.reference.compare(&self.ioapic)?;
        for (pin, entry) in self.ioapic.entries() {
            if entry.remote_irr() && !entry.level_triggered() {
                return Err(format!("pin {pin}: Remote IRR on an edge entry"));
            }
        }
        Ok(())
    }

    /// APIC `i`: the ISR is what was acknowledged and not EOId, no vector
    /// below 16 anywhere, nothing while globally disabled, the PPR follows
    /// from TPR and ISR; in a full check, the ISR, TMR and IRR registers
    /// agree with the model's banks (and, with a sweep, the banks with the
    /// per-vector accessors). See [`Check`].
    fn check_apic(&self, i: usize, how: Check) -> Result<(), String> {
        let (Some(lapic), Some(in_service)) = (self.apics.get(i), self.in_service.get(i)) else {
            return Err(format!("no vCPU {i}"));
        };
        let o = match how {
            Check::Quick => observe_priorities(lapic, self.now)?,
            Check::Full { .. } => observe_guest(lapic, self.now)?,
        };
        let isr = Vectors(lapic.in_service_words());
        let irr = Vectors(lapic.requested_words());
        let tmr = Vectors(lapic.level_words());
        if how == (Check::Full { sweep: true }) && banks_by_accessors(lapic) != [isr, irr, tmr] {
            return Err(format!(
                "cpu {i}: is_in_service/is_requested/is_level disagree with the banks"
            ));
        }
        if isr != *in_service {
            return Err(format!(
                "cpu {i}: ISR {:x?}, acknowledged and not EOId {:x?}",
                isr.0, in_service.0
            ));
        }
        for (name, set) in [("IRR", irr), ("ISR", isr), ("TMR", tmr)] {
            if set.0[0] & 0xffff != 0 {
                return Err(format!("cpu {i}: {name} holds a vector below 16"));
            }
            if !lapic.hw_enabled() && !set.is_empty() {
                return Err(format!("cpu {i}: {name} not empty while globally disabled"));
            }
        }
        if !o.hw_enabled {
            return Ok(());
        }
        if how != Check::Quick && (o.isr != isr || o.irr != irr || o.tmr != tmr) {
            return Err(format!(
                "cpu {i}: ISR/IRR/TMR registers disagree with the accessors"
            ));
        }
        let isrv = isr.highest().unwrap_or(0) & 0xf0;
        let ppr = if o.tpr & 0xf0 >= isrv { o.tpr } else { isrv };
        if o.ppr != ppr {
            return Err(format!(
                "cpu {i}: PPR {:#x}, TPR {:#x} and ISR give {ppr:#x}",
                o.ppr, o.tpr
            ));
        }
        Ok(())
    }
}

/// The ISR, IRR and TMR as the per-vector accessors show them, one pass
/// over the 256 vectors (no branch per vector: this runs under coverage
/// instrumentation).
fn banks_by_accessors(lapic: &Lapic) -> [Vectors; 3] {
    let mut banks = [Vectors::default(); 3];
    let [isr, irr, tmr] = &mut banks;
    for word in 0..4u8 {
        let (mut i, mut r, mut t) = (0u64, 0u64, 0u64);
        for bit in 0..64u8 {
            let v = word * 64 + bit;
            i |= u64::from(lapic.is_in_service(v)) << bit;
            r |= u64::from(lapic.is_requested(v)) << bit;
            t |= u64::from(lapic.is_level(v)) << bit;
        }
        let w = usize::from(word);
        (isr.0[w], irr.0[w], tmr.0[w]) = (i, r, t);
    }
    banks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_empty_input_ok() {
        assert_eq!(run(&[]), Ok(()));
    }

    #[test]
    fn run_level_pin_to_cpu_1_ack_eoi_redelivers_ok() {
        let data = [
            0x00, 0x01, 0x00, 0x00, // IOAPIC config, 2 vCPUs, IDs 0 and 1
            14, 0, 1, 14, 1, 1, // SVR enable on both
            2, 3, 0x20, 0x00, 0x42, 1, // pin 3: level, unmasked, vector 0x42, dest 1
            0, 3, 1, // line 3 high
            7, 1, // cpu 1 acknowledges
            8, 1, 0,  // cpu 1 EOIs: broadcast, re-delivery
            13, // snapshot
        ];
        assert_eq!(run(&data), Ok(()));
    }

    /// Found by the fuzzer (minimised): two NMIs pending on cpu 1 survive a
    /// global disable and re-enable, so the next NMI merges; the oracle used
    /// to forget them at the disable and expect a latch.
    #[test]
    fn regression_nmis_survive_global_disable() {
        let data = [
            0x00, 0x9d, 0x4e, 0x4e, // 2 vCPUs, directed EOI, IDs 0 and 1
            0x32, 0x3b, 0x34, 0x13, 0x13,
            0x01, // RTE: level NMI to APIC 1, pin asserted (active low)
            0x05, 0x01, 0x00, // cpu 1 globally disabled
            0x05, 0x23, 0xb5, // cpu 1 enabled again (xAPIC)
            0x13, 0x13, 0x13, 0x13, // IOAPIC EOIs: the NMI is sent again
        ];
        assert_eq!(run(&data), Ok(()));
    }
}
