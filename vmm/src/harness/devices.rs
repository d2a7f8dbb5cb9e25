//! The device layer under arbitrary guest accesses: port and MMIO reads and
//! writes of any width at any address, through the buses and device models
//! `devices::build` makes for the VMM (serial, exit port, fw_cfg,
//! pc-testdev, test marker, test devices, message-signaled test devices,
//! the PV doorbell over 64 KiB of guest RAM, the PIC ports, the IOAPIC's
//! MMIO window, unclaimed addresses), with the interrupt controller
//! replaced by recording stand-ins (`super::wiring`), so no KVM is needed.
//! Besides accesses, the guest stores into its RAM (request blocks for the
//! doorbell), the event loop feeds console input and expires test-device
//! timers, and the storm guard reports pins, as they would in a VM.
//!
//! Input format ([`run`]):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | the machine: mode `b % 3` (kernel, split, user), `1 + (b / 3) % 8` vCPUs |
//! | 1 | bit 0: the controller refuses host pin programs; bit 1: it refuses messages; bit 2: x2APIC; bit 3: `--trace` on, in a ring of [`TRACE_LIMIT`] events |
//! | 2.. | operations until the input ends: an opcode byte `op`, then operands |
//!
//! | `op & 7` | operation | operands |
//! |---|---|---|
//! | 0 | port read | port |
//! | 1 | port write | port, value (width bytes) |
//! | 2 | MMIO read | address |
//! | 3 | MMIO write | address, value (width bytes) |
//! | 4 | the guest stores into RAM | offset (`u16`), length byte (`% 65`), the bytes |
//! | 5 | a test device's host timer expires | device byte, expirations byte |
//! | 6 | console input | length byte (`% 17`), the bytes |
//! | 7 | the storm guard reports a pin | pin byte (`% 32`) |
//!
//! The access width is `[1, 2, 4, 8][(op >> 3) & 3]` (ports: 8 reads as 4),
//! the accessing vCPU `(op >> 5) % vCPUs`. A port is a selector byte `s`:
//! below [`PORTS`]`.len()` the base of that range plus the next byte modulo
//! its span, otherwise the next two bytes (little-endian). An address is a
//! selector byte: below 0x80 the IOAPIC window's base plus the next two
//! bytes modulo 0x1100 (a little past the window), below 0xc0 the local
//! APIC's base plus the same, otherwise the next eight bytes. Missing
//! bytes read as 0.
//!
//! Checked, beside "no panic" (and, in the fuzz target, a counting
//! allocator that bounds what one input may allocate):
//!
//! - every access reaches the device the platform's layout (written out
//!   here from `irqconnect_abi::layout`) puts at its address, or none:
//!   each bus's per-device read and write counters and its unclaimed
//!   counters equal the accesses made; unclaimed reads return all ones; the
//!   MMIO window is handed only offsets inside it;
//! - the devices' own counters equal what the accesses call for: the
//!   console's bytes are exactly the transmit-register writes outside DLAB
//!   and loopback; the PV doorbell's answered, unreadable and unwritable
//!   requests are its 32-bit writes at offset 0, its bad accesses every
//!   other access; the routes it applied and failed are the programs the
//!   controller took and refused; the message-signaled devices' sends and
//!   send errors are the messages the controller took and refused, their
//!   bad accesses those of another width or alignment, at an undefined
//!   register or raising a message they lack; each test device's pending,
//!   raised and acknowledged counts follow its raises, acknowledges and
//!   timer expirations; each pc-testdev line reads back as last written;
//!   the trace ring keeps at most its limit of the doorbell's requests and
//!   counts the rest as dropped;
//!   fw_cfg streams its items; the first exit-port write is the outcome;
//! - the warnings logged stay within what the rate limiters let through:
//!   [`irqchip_kvm::ratelimit::BURST`] per limiter plus one per limiter and
//!   elapsed second, once per message-signaled device and once per pin of
//!   the storm guard, however many accesses the input makes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use irqchip::Mode;
use irqchip::harness::input::Input;
use irqchip_kvm::ratelimit::BURST;
use irqconnect_abi::fw_cfg::{
    FW_CFG_ID, FW_CFG_MAX_CPUS, FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE,
    FW_CFG_SIGNATURE_BYTES,
};
use irqconnect_abi::layout::{
    EXIT_PORT, EXIT_PORT_SIZE, FW_CFG_DATA_PORT, FW_CFG_SELECTOR_PORT, IOAPIC_MMIO_BASE,
    IOAPIC_MMIO_SIZE, IOAPIC_PINS, LAPIC_MMIO_BASE, MAX_CPUS, MSIDEV_STRIDE, PC_TESTDEV_IRQ_BASE,
    PC_TESTDEV_IRQ_COUNT, PIC_ELCR_PORT, PIC_MASTER_CMD_PORT, PIC_SLAVE_CMD_PORT, PV_DOORBELL_PORT,
    PV_DOORBELL_SIZE, SERIAL_COM1_PORT, SERIAL_PORT_COUNT, TEST_MARKER_PORT, TESTDEV_STRIDE,
};
use irqconnect_abi::testdev::{CTRL_ENABLE, MAX_PENDING, reg as testdev_reg};
use irqconnect_abi::{msidev, testdev};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::logs;
use super::wiring::{ChipHandle, ChipRecorder, CountingOut, FakeWiring};
use crate::bus::{Access, Bus};
use crate::control::{Outcome, VmControl};
use crate::devices::fw_cfg::ID_TRADITIONAL;
use crate::devices::testdev::TestdevSpec;
use crate::devices::{self, DeviceConfig, Devices};
use crate::pv::PvConnect;
use crate::pv::config::{build_service, platform_facts};
use crate::pv::msidev_specs;
use crate::report::GuestReport;
use crate::trace::Recorder;

/// Guest RAM: 64 KiB at guest-physical 0, where request blocks go.
pub const RAM_SIZE: u64 = 0x1_0000;

/// Events the trace ring keeps when an input turns `--trace` on: few, so
/// that inputs reach the ring's dropping.
pub const TRACE_LIMIT: usize = 8;

/// The storm threshold the platform reports (the VMM's default).
const STORM_THRESHOLD: u32 = irqchip_kvm::DEFAULT_STORM_THRESHOLD;

/// Port ranges a selector byte picks (see the module documentation): base
/// and span. Past them, any port.
pub const PORTS: [(u16, u16); 12] = [
    (SERIAL_COM1_PORT, SERIAL_PORT_COUNT),
    (EXIT_PORT, EXIT_PORT_SIZE),
    (FW_CFG_SELECTOR_PORT, 2),
    (PC_TESTDEV_IRQ_BASE, PC_TESTDEV_IRQ_COUNT + 1),
    (testdev::device_port(0), 8 * TESTDEV_STRIDE + 1),
    (msidev::device_port(0), 4 * MSIDEV_STRIDE + 1),
    (PV_DOORBELL_PORT, PV_DOORBELL_SIZE + 1),
    (TEST_MARKER_PORT, 2),
    (PIC_MASTER_CMD_PORT, 2),
    (PIC_SLAVE_CMD_PORT, 2),
    (PIC_ELCR_PORT, 2),
    (0, 0x100),
];

/// The next `n` bytes (missing ones 0).
fn take(input: &mut Input<'_>, n: usize) -> Vec<u8> {
    (0..n).map(|_| input.u8()).collect()
}

/// A port (see the module documentation).
fn port(input: &mut Input<'_>) -> u16 {
    let s = input.u8();
    match PORTS.get(usize::from(s)) {
        Some(&(base, span)) => base.wrapping_add(u16::from(input.u8()) % span),
        None => input.u16(),
    }
}

/// An MMIO address (see the module documentation).
fn address(input: &mut Input<'_>) -> u64 {
    match input.u8() {
        0..=0x7f => IOAPIC_MMIO_BASE + u64::from(input.u16() % 0x1100),
        0x80..=0xbf => LAPIC_MMIO_BASE + u64::from(input.u16() % 0x1100),
        _ => input.u64(),
    }
}

/// Runs the operations `data` encodes (see the module documentation).
/// `Err` names the first broken check.
pub fn run(data: &[u8]) -> Result<(), String> {
    summary(data).map(|_| ())
}

/// What one input made the devices do (for tests that a seed reaches what
/// it is named for).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Operations run.
    pub operations: usize,
    /// Bytes the console sent.
    pub console_bytes: u64,
    /// PV requests answered (whatever the status).
    pub answered: u64,
    /// PV requests answered STATUS_SUCCESS.
    pub succeeded: u64,
    /// Routes the PV service programmed.
    pub routes_applied: u64,
    /// Messages the message-signaled devices sent.
    pub messages_sent: u64,
    /// Accesses nobody claims (ports and MMIO).
    pub unclaimed: u64,
    /// The exit-port value, if the guest wrote one.
    pub exit: Option<u32>,
    /// Warnings logged.
    pub warnings: u64,
}

/// [`run`], returning what the input made the devices do.
pub fn summary(data: &[u8]) -> Result<Summary, String> {
    logs::install()?;
    let warnings_before = logs::warnings();
    let started = Instant::now();
    let mut input = Input::new(data);
    let machine = input.u8();
    let mode = Mode::ALL[usize::from(machine % 3)];
    let cpus = 1 + u32::from(machine / 3 % 8);
    let flags = input.u8();
    let mut vm = Vm::new(mode, cpus, flags)?;
    let mut operations = 0usize;
    while !input.is_empty() {
        vm.step(&mut input)
            .map_err(|what| format!("operation {operations}: {what}"))?;
        operations += 1;
    }
    vm.check_counters()?;
    vm.check_device_state()?;
    let warnings = logs::warnings() - warnings_before;
    let bound = vm.warning_bound(started.elapsed().as_secs());
    if warnings > bound {
        return Err(format!(
            "{warnings} warnings logged for {operations} operations (rate limits allow {bound})"
        ));
    }
    let stats = vm.pv.stats();
    Ok(Summary {
        operations,
        console_bytes: vm.expect.console,
        answered: stats.answered(),
        succeeded: stats
            .by_status
            .iter()
            .find(|(name, _)| *name == "ok")
            .map_or(0, |&(_, n)| n),
        routes_applied: stats.routes_applied,
        messages_sent: stats.msi_sent,
        unclaimed: vm.expect.pio_unclaimed.0
            + vm.expect.pio_unclaimed.1
            + vm.expect.mmio_unclaimed.0
            + vm.expect.mmio_unclaimed.1,
        exit: vm.expect.exit,
        warnings,
    })
}

/// A VM's device layer with the stand-ins, and what the harness expects.
struct Vm {
    mode: Mode,
    cpus: u32,
    devices: Devices<super::wiring::FakeLine>,
    wiring: FakeWiring,
    pv: Arc<PvConnect>,
    chip: Arc<ChipRecorder>,
    msi: Arc<ChipRecorder>,
    out: CountingOut,
    mem: GuestMemoryMmap,
    control: Arc<VmControl>,
    trace: Option<Arc<Recorder>>,
    testdevs: Vec<TestdevSpec>,
    /// Message count per message-signaled device, by index.
    msidevs: Vec<u8>,
    /// The platform's port map ([`port_map`]), fixed with the devices.
    ports: Vec<(u64, u64, &'static str)>,
    expect: Expect,
}

/// What the accesses made so far call for.
#[derive(Default)]
struct Expect {
    /// Per bus device name: (reads, writes).
    pio: BTreeMap<&'static str, (u64, u64)>,
    mmio: BTreeMap<&'static str, (u64, u64)>,
    /// (reads, writes) nobody claims.
    pio_unclaimed: (u64, u64),
    mmio_unclaimed: (u64, u64),
    /// The UART's line and modem control registers, and the bytes it sent.
    lcr: u8,
    mcr: u8,
    console: u64,
    /// fw_cfg's selected item and position.
    fw_cfg: (u16, usize),
    /// The doorbell's 32-bit writes at offset 0, and its other accesses.
    rings: u64,
    doorbell_bad: u64,
    /// Bad accesses of the message-signaled devices.
    msidev_bad: u64,
    /// Per test device: its model as the accesses drive it.
    testdevs: Vec<TestdevExpect>,
    /// Per pc-testdev line: the level last written.
    pc_levels: Vec<bool>,
    /// The first exit-port write.
    exit: Option<u32>,
    /// Storm reports made.
    storm_reports: u64,
}

/// A test device's counts as its register map defines them.
#[derive(Clone, Copy, Default)]
struct TestdevExpect {
    pending: u32,
    asserted: u32,
    acked: u32,
    timer: u32,
}

impl TestdevExpect {
    fn raise(&mut self, n: u32) {
        self.pending = self.pending.saturating_add(n).min(MAX_PENDING);
        self.asserted = self.asserted.wrapping_add(n);
    }

    fn write(&mut self, offset: u16, value: u32) {
        match offset {
            testdev_reg::ACK if self.pending > 0 => {
                self.pending -= 1;
                self.acked = self.acked.wrapping_add(1);
            }
            testdev_reg::RAISE => self.raise(value.max(1)),
            testdev_reg::TIMER => self.timer = value >> 16,
            _ => {}
        }
    }

    fn expired(&mut self, n: u64) {
        let k = u32::try_from(n).unwrap_or(u32::MAX).min(self.timer);
        for _ in 0..k {
            self.raise(1);
        }
        self.timer -= k;
    }
}

/// The platform's port map: (base, length, bus device name).
fn port_map(mode: Mode, testdevs: &[TestdevSpec], msidevs: usize) -> Vec<(u64, u64, &'static str)> {
    let mut map = vec![
        (SERIAL_COM1_PORT, SERIAL_PORT_COUNT, "serial"),
        (EXIT_PORT, EXIT_PORT_SIZE, "exit"),
        (PC_TESTDEV_IRQ_BASE, PC_TESTDEV_IRQ_COUNT, "pc-testdev"),
        (
            FW_CFG_SELECTOR_PORT,
            FW_CFG_DATA_PORT - FW_CFG_SELECTOR_PORT + 1,
            "fw_cfg",
        ),
        (TEST_MARKER_PORT, 1, "test-marker"),
        (PV_DOORBELL_PORT, PV_DOORBELL_SIZE, "pv-doorbell"),
    ];
    for t in testdevs {
        map.push((
            testdev::device_port(u16::from(t.index)),
            TESTDEV_STRIDE,
            "testdev",
        ));
    }
    for i in 0..msidevs as u16 {
        map.push((msidev::device_port(i), MSIDEV_STRIDE, "msidev"));
    }
    // In kernel mode KVM's PIC decodes these ports.
    if mode != Mode::Kernel {
        for base in [PIC_MASTER_CMD_PORT, PIC_SLAVE_CMD_PORT, PIC_ELCR_PORT] {
            map.push((base, 2, "pic"));
        }
    }
    map.into_iter()
        .map(|(base, len, name)| (u64::from(base), u64::from(len), name))
        .collect()
}

/// Where `addr` falls in `map`: the device's name and base.
fn claimed(map: &[(u64, u64, &'static str)], addr: u64) -> Option<(&'static str, u64)> {
    map.iter()
        .find(|&&(base, len, _)| base <= addr && addr - base < len)
        .map(|&(base, _, name)| (name, base))
}

impl Vm {
    fn new(mode: Mode, cpus: u32, flags: u8) -> Result<Self, String> {
        let x2apic = flags & 4 != 0;
        let facts = platform_facts(cpus, mode, x2apic, STORM_THRESHOLD);
        let service = build_service(facts, None).map_err(|e| e.to_string())?;
        let mem = crate::memory::create(RAM_SIZE).map_err(|e| e.to_string())?;
        let chip = ChipRecorder::new(flags & 1 != 0);
        let msi = ChipRecorder::new(flags & 2 != 0);
        let msidevs: Vec<u8> = msidev_specs(service.devices())
            .iter()
            .map(|s| s.count)
            .collect();
        let pv = PvConnect::new(
            service,
            mem.clone(),
            ChipHandle(Arc::clone(&chip)),
            Arc::clone(&msi) as Arc<dyn crate::devices::msidev::MsiSink>,
        );
        let control = Arc::new(VmControl::new(cpus as usize).map_err(|e| e.to_string())?);
        let report = Arc::new(Mutex::new(GuestReport::new()));
        let out = CountingOut::default();
        let wiring = FakeWiring::new(mode);
        let testdevs = pv.testdev_specs();
        let trace = (flags & 8 != 0).then(|| Arc::new(Recorder::new(TRACE_LIMIT)));
        let devices = devices::build(
            &DeviceConfig {
                cpus: cpus as u16,
                ram: RAM_SIZE,
                mode,
                testdevs: testdevs.clone(),
                msidevs: pv.msidevs().to_vec(),
                pv_doorbell: Some(crate::pv::doorbell::Doorbell::shared(&pv, trace.clone())),
                snapshot: None,
                serial_state: None,
            },
            &wiring,
            &control,
            &report,
            Box::new(out.clone()),
        )
        .map_err(|e| e.to_string())?;
        let expect = Expect {
            testdevs: vec![TestdevExpect::default(); testdevs.len()],
            pc_levels: vec![false; usize::from(PC_TESTDEV_IRQ_COUNT)],
            ..Expect::default()
        };
        Ok(Self {
            mode,
            cpus,
            devices,
            wiring,
            pv,
            chip,
            msi,
            out,
            mem,
            control,
            trace,
            ports: port_map(mode, &testdevs, msidevs.len()),
            testdevs,
            msidevs,
            expect,
        })
    }

    fn step(&mut self, input: &mut Input<'_>) -> Result<(), String> {
        let op = input.u8();
        let width = [1usize, 2, 4, 8][usize::from(op >> 3) & 3];
        let access = Access {
            vcpu: usize::from(op >> 5) % self.cpus as usize,
        };
        match op & 7 {
            0 => {
                let port = port(input);
                self.port_read(access, port, width.min(4))
            }
            1 => {
                let port = port(input);
                let value = take(input, width.min(4));
                self.port_write(access, port, &value);
                Ok(())
            }
            2 => {
                let addr = address(input);
                self.mmio_access(access, addr, None, width)
            }
            3 => {
                let addr = address(input);
                let value = take(input, width);
                self.mmio_access(access, addr, Some(&value), width)
            }
            4 => {
                let at = input.u16();
                let len = usize::from(input.u8() % 65);
                let bytes = take(input, len);
                // The guest's own store: past the end of RAM it faults,
                // nothing is written.
                let _ = self.mem.write_slice(&bytes, GuestAddress(u64::from(at)));
                Ok(())
            }
            5 => {
                let which = usize::from(input.u8());
                let n = u64::from(input.u8());
                self.timer_expired(which, n);
                Ok(())
            }
            6 => {
                let len = usize::from(input.u8() % 17);
                let bytes = take(input, len);
                let mut uart = self
                    .devices
                    .uart
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                // As the event loop: what does not fit the FIFO is dropped.
                let _ = uart.enqueue_raw_bytes(&bytes);
                Ok(())
            }
            _ => {
                let pin = input.u8() % 32;
                self.expect.storm_reports += 1;
                self.pv.mask_storming_pin(pin);
                Ok(())
            }
        }
    }

    fn port_read(&mut self, access: Access, port: u16, width: usize) -> Result<(), String> {
        let mut buf = [0u8; 8];
        let data = buf
            .get_mut(..width)
            .ok_or("a port read wider than 8 bytes")?;
        self.devices.pio.read(access, u64::from(port), data);
        let data = &*data;
        let Some((name, base)) = claimed(&self.ports, u64::from(port)) else {
            self.expect.pio_unclaimed.0 += 1;
            return all_ones(data, "port", u64::from(port));
        };
        self.expect.pio.entry(name).or_default().0 += 1;
        let offset = u64::from(port) - base;
        match name {
            "fw_cfg" => self.check_fw_cfg_read(offset, data)?,
            "pv-doorbell" if !(width == 4 && offset == 0) => self.expect.doorbell_bad += 1,
            "msidev" => self.msidev_read(base, offset, width),
            _ => {}
        }
        Ok(())
    }

    fn port_write(&mut self, access: Access, port: u16, data: &[u8]) {
        self.devices.pio.write(access, u64::from(port), data);
        let Some((name, base)) = claimed(&self.ports, u64::from(port)) else {
            self.expect.pio_unclaimed.1 += 1;
            return;
        };
        self.expect.pio.entry(name).or_default().1 += 1;
        let offset = u64::from(port) - base;
        let first = data.first().copied().unwrap_or(0);
        match name {
            "serial" => self.serial_write(offset, first),
            "exit" if self.expect.exit.is_none() => {
                self.expect.exit = Some(crate::devices::exit::le_value(data));
            }
            "fw_cfg" if offset == 0 => {
                let key = match data {
                    [lo] => u16::from(*lo),
                    [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
                    [] => return,
                };
                self.expect.fw_cfg = (key, 0);
            }
            "pc-testdev" => {
                if let Some(level) = self.expect.pc_levels.get_mut(offset as usize) {
                    *level = first != 0;
                }
            }
            "pv-doorbell" => {
                if data.len() == 4 && offset == 0 {
                    self.expect.rings += 1;
                } else {
                    self.expect.doorbell_bad += 1;
                }
            }
            "testdev" => {
                let index = self
                    .testdevs
                    .iter()
                    .position(|t| u64::from(testdev::device_port(u16::from(t.index))) == base);
                if let (Some(i), Ok(bytes)) = (index, <[u8; 4]>::try_from(data))
                    && offset.is_multiple_of(4)
                    && let Some(t) = self.expect.testdevs.get_mut(i)
                {
                    t.write(offset as u16, u32::from_le_bytes(bytes));
                }
            }
            "msidev" => self.msidev_write(base, offset, data),
            _ => {}
        }
    }

    /// The UART sends a transmit-register write unless the divisor latch
    /// or loopback is on (16550A, as vm-superio models it).
    fn serial_write(&mut self, offset: u64, value: u8) {
        const DLAB: u8 = 0x80;
        const LOOPBACK: u8 = 0x10;
        match offset {
            0 if self.expect.lcr & DLAB == 0 && self.expect.mcr & LOOPBACK == 0 => {
                self.expect.console += 1;
            }
            3 => self.expect.lcr = value,
            4 => self.expect.mcr = value,
            _ => {}
        }
    }

    /// fw_cfg streams the selected item from the data port, zeros past its
    /// end; the selector port reads all ones.
    fn check_fw_cfg_read(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        let data_offset = u64::from(FW_CFG_DATA_PORT - FW_CFG_SELECTOR_PORT);
        if offset != data_offset {
            return all_ones(data, "fw_cfg selector", offset);
        }
        let (key, at) = self.expect.fw_cfg;
        let item: Vec<u8> = match key {
            FW_CFG_SIGNATURE => FW_CFG_SIGNATURE_BYTES.to_vec(),
            FW_CFG_ID => ID_TRADITIONAL.to_le_bytes().to_vec(),
            FW_CFG_RAM_SIZE => RAM_SIZE.to_le_bytes().to_vec(),
            FW_CFG_NB_CPUS => (self.cpus as u16).to_le_bytes().to_vec(),
            FW_CFG_MAX_CPUS => (MAX_CPUS as u16).to_le_bytes().to_vec(),
            _ => Vec::new(),
        };
        let expected: Vec<u8> = (at..at + data.len())
            .map(|i| item.get(i).copied().unwrap_or(0))
            .collect();
        self.expect.fw_cfg.1 = at + data.len();
        if data == expected {
            Ok(())
        } else {
            Err(format!(
                "fw_cfg item {key:#x} at {at} read {data:02x?}, expected {expected:02x?}"
            ))
        }
    }

    /// The message count of the message-signaled device at `base`.
    fn msidev_count(&self, base: u64) -> u32 {
        (0..self.msidevs.len() as u16)
            .find(|&i| u64::from(msidev::device_port(i)) == base)
            .and_then(|i| self.msidevs.get(usize::from(i)))
            .map_or(0, |&n| u32::from(n))
    }

    fn msidev_read(&mut self, _base: u64, offset: u64, width: usize) {
        use msidev::reg;
        let defined = [
            reg::ID,
            reg::MASK,
            reg::PENDING,
            reg::SELECT,
            reg::ADDRESS_LO,
            reg::ADDRESS_HI,
            reg::DATA,
            reg::SENT,
            reg::DROPPED,
        ];
        let good = width == 4
            && offset.is_multiple_of(4)
            && defined.iter().any(|&r| u64::from(r) == offset);
        if !good {
            self.expect.msidev_bad += 1;
        }
    }

    fn msidev_write(&mut self, base: u64, offset: u64, data: &[u8]) {
        use msidev::reg;
        let good = match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => match u16::try_from(offset) {
                Ok(reg::RAISE) => u32::from_le_bytes(bytes) < self.msidev_count(base),
                Ok(reg::MASK | reg::SELECT) => true,
                _ => false,
            },
            _ => false,
        };
        if !good {
            self.expect.msidev_bad += 1;
        }
    }

    fn mmio_access(
        &mut self,
        access: Access,
        addr: u64,
        value: Option<&[u8]>,
        width: usize,
    ) -> Result<(), String> {
        let window = (IOAPIC_MMIO_BASE, IOAPIC_MMIO_SIZE, "ioapic");
        let map: &[(u64, u64, &str)] = if self.mode.our_ioapic() {
            &[window]
        } else {
            &[]
        };
        let name = claimed(map, addr).map(|(name, _)| name);
        match value {
            Some(data) => {
                self.devices.mmio.write(access, addr, data);
                match name {
                    Some(name) => self.expect.mmio.entry(name).or_default().1 += 1,
                    None => self.expect.mmio_unclaimed.1 += 1,
                }
                Ok(())
            }
            None => {
                let mut data = vec![0u8; width];
                self.devices.mmio.read(access, addr, &mut data);
                match name {
                    Some(name) => {
                        self.expect.mmio.entry(name).or_default().0 += 1;
                        Ok(())
                    }
                    None => {
                        self.expect.mmio_unclaimed.0 += 1;
                        all_ones(&data, "MMIO address", addr)
                    }
                }
            }
        }
    }

    fn timer_expired(&mut self, which: usize, n: u64) {
        let Some(i) = which.checked_rem(self.devices.testdevs.len()) else {
            return;
        };
        if let Some(slot) = self.devices.testdevs.get(i) {
            slot.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .expired(n);
        }
        if let Some(t) = self.expect.testdevs.get_mut(i) {
            t.expired(n);
        }
    }

    /// The buses' counters and the devices' counters against the accesses
    /// made.
    fn check_counters(&self) -> Result<(), String> {
        check_bus(
            &self.devices.pio,
            &self.expect.pio,
            self.expect.pio_unclaimed,
            "port",
        )?;
        check_bus(
            &self.devices.mmio,
            &self.expect.mmio,
            self.expect.mmio_unclaimed,
            "MMIO",
        )?;
        let window = self
            .wiring
            .window()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let window_accesses = self.expect.mmio.get("ioapic").map_or(0, |&(r, w)| r + w);
        if window.outside != 0 || window.accesses != window_accesses {
            return Err(format!(
                "the MMIO window took {} accesses ({} outside it), {window_accesses} made",
                window.accesses, window.outside
            ));
        }
        let console = self.out.0.load(Ordering::Relaxed);
        if console != self.expect.console {
            return Err(format!(
                "the console sent {console} bytes, {} transmit writes made",
                self.expect.console
            ));
        }
        let stats = self.pv.stats();
        let requests = stats.answered() + stats.unreadable + stats.unwritable;
        let (programs, refused) = self.chip.counts();
        let (sent, refused_msi) = self.msi.counts();
        let got = (
            requests,
            stats.bad_accesses,
            stats.routes_applied,
            stats.route_failures,
            stats.msi_sent,
            stats.msi_errors,
            stats.msidev_bad_accesses,
        );
        let want = (
            self.expect.rings,
            self.expect.doorbell_bad,
            programs,
            refused,
            sent,
            refused_msi,
            self.expect.msidev_bad,
        );
        if got != want || stats.storm_masks > self.expect.storm_reports {
            return Err(format!(
                "PV counters (requests, bad accesses, routes, failed, MSIs sent, refused, \
                 msidev bad accesses) {got:?}, accesses call for {want:?}; storm masks {} of {} reports",
                stats.storm_masks, self.expect.storm_reports
            ));
        }
        if let Some(trace) = &self.trace {
            let (kept, dropped) = trace.take();
            if kept.len() > TRACE_LIMIT || kept.len() as u64 + dropped != self.expect.rings {
                return Err(format!(
                    "the trace kept {} and dropped {dropped} of {} requests (limit {TRACE_LIMIT})",
                    kept.len(),
                    self.expect.rings
                ));
            }
        }
        let outcome = self.control.take_outcome();
        match (&outcome, self.expect.exit) {
            (None, None) => Ok(()),
            (Some(Outcome::GuestExit(code)), Some(want)) if *code == want => Ok(()),
            _ => Err(format!(
                "outcome {outcome:?}, the first exit-port write was {:?}",
                self.expect.exit
            )),
        }
    }

    /// Registers read back through the bus (after the counters were
    /// compared): each test device's counts, each pc-testdev line's level.
    fn check_device_state(&self) -> Result<(), String> {
        let access = Access { vcpu: 0 };
        let read32 = |port: u16| {
            let mut b = [0u8; 4];
            self.devices.pio.read(access, u64::from(port), &mut b);
            u32::from_le_bytes(b)
        };
        for (t, want) in self.testdevs.iter().zip(&self.expect.testdevs) {
            let base = testdev::device_port(u16::from(t.index));
            let got = (
                read32(base + testdev_reg::STATUS),
                read32(base + testdev_reg::ASSERT_COUNT),
                read32(base + testdev_reg::ACK_COUNT),
                read32(base + testdev_reg::TIMER),
            );
            let expected = (want.pending, want.asserted, want.acked, want.timer);
            if got != expected {
                return Err(format!(
                    "test device {} (pending, raised, acknowledged, timer) {got:?}, accesses call for {expected:?}",
                    t.index
                ));
            }
            let enabled = read32(base + testdev_reg::CTRL) & CTRL_ENABLE != 0;
            if t.trigger == irqchip::apic_bus::TriggerMode::Level
                && enabled
                && want.pending > 0
                && !self.wiring.is_high(t.pin)
            {
                return Err(format!(
                    "level test device {} is enabled with causes pending, its line {} is low",
                    t.index, t.pin
                ));
            }
        }
        for (line, &level) in (0..IOAPIC_PINS).zip(&self.expect.pc_levels) {
            let mut b = [0u8; 1];
            self.devices.pio.read(
                access,
                u64::from(PC_TESTDEV_IRQ_BASE + u16::from(line)),
                &mut b,
            );
            if (b[0] != 0) != level {
                return Err(format!(
                    "pc-testdev line {line} reads {}, last written {level}",
                    b[0]
                ));
            }
            if level && !self.wiring.is_high(line) {
                return Err(format!(
                    "pc-testdev drives line {line} high, the line is low"
                ));
            }
        }
        Ok(())
    }

    /// The warnings the rate limiters let through in `secs` elapsed
    /// seconds: per limiter a burst and one per second (the unclaimed
    /// ports and addresses, the console, each test device's port window,
    /// the doorbell's four kinds of failure), once per message-signaled
    /// device (its first refused send), once per pin for the storm guard.
    fn warning_bound(&self, secs: u64) -> u64 {
        let limiters = 2 + 1 + self.testdevs.len() as u64 + 4;
        limiters * (u64::from(BURST) + 1 + secs)
            + self.msidevs.len() as u64
            + u64::from(IOAPIC_PINS)
    }
}

/// An unclaimed read returns all ones.
fn all_ones(data: &[u8], what: &str, addr: u64) -> Result<(), String> {
    if data.iter().all(|&b| b == 0xff) {
        Ok(())
    } else {
        Err(format!("unclaimed {what} {addr:#x} read {data:02x?}"))
    }
}

/// A bus's counters against the accesses made.
fn check_bus(
    bus: &Bus,
    expected: &BTreeMap<&'static str, (u64, u64)>,
    unclaimed: (u64, u64),
    what: &str,
) -> Result<(), String> {
    let mut got: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    for c in bus.counters() {
        got.insert(c.name, (c.reads, c.writes));
    }
    if got != *expected || bus.unclaimed_counts() != unclaimed {
        return Err(format!(
            "{what} bus counted {got:?} and {:?} unclaimed, accesses made {expected:?} and {unclaimed:?}",
            bus.unclaimed_counts()
        ));
    }
    Ok(())
}
