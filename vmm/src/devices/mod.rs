//! The platform's devices and how they are put on the buses.
//!
//! Models are plain structs behind the narrow [`crate::bus::BusDevice`] and
//! `irqchip_kvm::LineSink` traits; this module wires them to ports
//! (constants from `irqconnect_abi::layout`), the interrupt controller's
//! lines and MMIO windows ([`Wiring`]: the VMM's `Irqchip`, or the fuzz
//! harness's recording stand-in), and the event loop.

pub(crate) mod exit;
pub(crate) mod fw_cfg;
pub(crate) mod marker;
pub(crate) mod msidev;
pub(crate) mod pc_testdev;
pub(crate) mod pic;
pub(crate) mod serial;
pub(crate) mod testdev;
pub(crate) mod testdev_port;
pub(crate) mod unclaimed;

use std::io::Write;
use std::sync::{Arc, Mutex};

use irqconnect_abi::layout;

use irqchip_kvm::{IrqLine, Irqchip, LineSink, MmioWindow, Mode};
use vm_superio::Trigger;

use crate::bus::{Access, Bus, BusDevice, BusKind};
use crate::control::VmControl;
use crate::error::{Error, Result};
use crate::report::GuestReport;
use serial::{SerialDevice, SerialOut, Uart};
use testdev::{TestDevice, TestdevSpec};
use testdev_port::{SharedTestdev, TestdevPort, TestdevSlot};

/// What the device set depends on.
pub(crate) struct DeviceConfig {
    /// vCPUs.
    pub(crate) cpus: u16,
    /// RAM in bytes.
    pub(crate) ram: u64,
    /// The interrupt-controller mode (decides who owns the PIC ports).
    pub(crate) mode: Mode,
    /// The test devices of the PV device table (`crate::pv::testdev_specs`);
    /// the ports of devices not listed stay unclaimed.
    pub(crate) testdevs: Vec<TestdevSpec>,
    /// The message-signaled test devices the PV service owns
    /// (`crate::pv::PvConnect::msidevs`); the ports of devices not listed
    /// stay unclaimed.
    pub(crate) msidevs: Vec<msidev::SharedMsidev>,
    /// The PV connect doorbell (`crate::pv::doorbell`), at `PV_DOORBELL_PORT`.
    pub(crate) pv_doorbell: Option<Arc<Mutex<dyn BusDevice>>>,
    /// The snapshot device (`crate::snapshot::SnapshotDevice`), at
    /// `SNAPSHOT_PORT`.
    pub(crate) snapshot: Option<Arc<Mutex<dyn BusDevice>>>,
    /// COM1's state when the VM is restored (vm-superio's own state).
    pub(crate) serial_state: Option<vm_superio::SerialState>,
}

/// The buses and the devices the event loop needs to reach; `L` is the
/// devices' interrupt line ([`Wiring::Line`]).
pub(crate) struct Devices<L: Trigger + LineSink = IrqLine> {
    /// Port I/O.
    pub(crate) pio: Arc<Bus>,
    /// MMIO.
    pub(crate) mmio: Arc<Bus>,
    /// COM1, for stdin input and the final flush.
    pub(crate) uart: Arc<Mutex<Uart<L>>>,
    /// The test devices, for their timers.
    pub(crate) testdevs: Vec<SharedTestdev<L>>,
    /// The pc-testdev ports (snapshots).
    pub(crate) pc_testdev: Arc<Mutex<pc_testdev::PcTestdev<L>>>,
    /// fw_cfg (snapshots).
    pub(crate) fw_cfg: Arc<Mutex<fw_cfg::FwCfg>>,
    /// The 8259 port model, in split and user modes (snapshots).
    pub(crate) pic: Option<Arc<Mutex<pic::LegacyPic>>>,
}

/// What the devices need from the interrupt controller: a line per GSI,
/// and the MMIO windows it decodes with the bus device serving each.
pub(crate) trait Wiring {
    /// A device's interrupt line: a level ([`LineSink`]) or an edge per
    /// call (vm-superio's [`Trigger`], for the UART).
    type Line: LineSink + Trigger + Send + 'static;

    /// A new source on interrupt line `gsi`, or `None` when there is none.
    fn line(&self, gsi: u8) -> Option<Self::Line>;

    /// The MMIO windows the controller emulates, each with its bus device.
    fn mmio_windows(&self) -> Vec<(MmioWindow, Arc<Mutex<dyn BusDevice>>)>;
}

impl Wiring for Irqchip {
    type Line = IrqLine;

    fn line(&self, gsi: u8) -> Option<IrqLine> {
        Irqchip::line(self, u32::from(gsi))
    }

    fn mmio_windows(&self) -> Vec<(MmioWindow, Arc<Mutex<dyn BusDevice>>)> {
        Irqchip::mmio_windows(self)
            .into_iter()
            .map(|window| {
                let device: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(ChipWindow {
                    chip: self.clone(),
                    base: window.base,
                }));
                (window, device)
            })
            .collect()
    }
}

fn overlap(e: crate::bus::OverlapError) -> Error {
    Error::Host {
        op: "build the device buses",
        source: std::io::Error::other(e.to_string()),
    }
}

fn line<W: Wiring>(wiring: &W, gsi: u8) -> Result<W::Line> {
    wiring.line(gsi).ok_or_else(|| Error::Host {
        op: "wire a device interrupt",
        source: std::io::Error::other(format!("GSI {gsi} is not available")),
    })
}

/// An MMIO window of the chip on the bus: accesses go to the chip at their
/// guest-physical address.
struct ChipWindow {
    chip: Irqchip,
    base: u64,
}

impl BusDevice for ChipWindow {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        if !self.chip.mmio_read(self.base.wrapping_add(offset), data) {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        self.chip.mmio_write(self.base.wrapping_add(offset), data);
    }
}

/// Builds every device and both buses, the devices' lines and MMIO windows
/// from `chip`.
pub(crate) fn build<W: Wiring>(
    cfg: &DeviceConfig,
    chip: &W,
    control: &Arc<VmControl>,
    report: &Arc<Mutex<GuestReport>>,
    out: Box<dyn Write + Send>,
) -> Result<Devices<W::Line>> {
    let mut pio = Bus::new(BusKind::Pio);
    let mut mmio = Bus::new(BusKind::Mmio);

    let serial_line = line(chip, layout::SERIAL_COM1_IRQ)?;
    let serial_out = SerialOut::new(out, Arc::clone(report));
    let uart = match &cfg.serial_state {
        None => Uart::new(serial_line, serial_out),
        Some(state) => {
            Uart::from_state(state, serial_line, vm_superio::serial::NoEvents, serial_out)
                .map_err(|e| Error::Snapshot(format!("serial state: {e:?}")))?
        }
    };
    let uart: Arc<Mutex<Uart<W::Line>>> = Arc::new(Mutex::new(uart));
    pio.insert(
        u64::from(layout::SERIAL_COM1_PORT),
        u64::from(layout::SERIAL_PORT_COUNT),
        "serial",
        Arc::new(Mutex::new(SerialDevice::new(Arc::clone(&uart)))),
    )
    .map_err(overlap)?;

    pio.insert(
        u64::from(layout::EXIT_PORT),
        u64::from(layout::EXIT_PORT_SIZE),
        "exit",
        Arc::new(Mutex::new(exit::ExitPort::new(Arc::clone(control)))),
    )
    .map_err(overlap)?;

    let pc_lines = (0..layout::PC_TESTDEV_IRQ_COUNT as u8)
        .map(|gsi| line(chip, gsi))
        .collect::<Result<Vec<_>>>()?;
    let pc_testdev = Arc::new(Mutex::new(pc_testdev::PcTestdev::new(pc_lines)));
    pio.insert(
        u64::from(layout::PC_TESTDEV_IRQ_BASE),
        u64::from(layout::PC_TESTDEV_IRQ_COUNT),
        "pc-testdev",
        Arc::clone(&pc_testdev) as Arc<Mutex<dyn BusDevice>>,
    )
    .map_err(overlap)?;

    let fw_cfg = Arc::new(Mutex::new(fw_cfg::FwCfg::new(
        cfg.cpus,
        layout::MAX_CPUS as u16,
        cfg.ram,
    )));
    pio.insert(
        u64::from(layout::FW_CFG_SELECTOR_PORT),
        fw_cfg::FW_CFG_PORT_COUNT,
        "fw_cfg",
        Arc::clone(&fw_cfg) as Arc<Mutex<dyn BusDevice>>,
    )
    .map_err(overlap)?;

    pio.insert(
        u64::from(layout::TEST_MARKER_PORT),
        1,
        "test-marker",
        Arc::new(Mutex::new(marker::TestMarker::new(Arc::clone(report)))),
    )
    .map_err(overlap)?;

    let mut testdevs = Vec::new();
    for &spec in &cfg.testdevs {
        let slot = TestdevSlot::new(TestDevice::from_spec(spec), line(chip, spec.pin)?)?;
        pio.insert(
            u64::from(irqconnect_abi::testdev::device_port(u16::from(spec.index))),
            u64::from(layout::TESTDEV_STRIDE),
            "testdev",
            Arc::new(Mutex::new(TestdevPort::new(Arc::clone(&slot)))),
        )
        .map_err(overlap)?;
        testdevs.push(slot);
    }

    for dev in &cfg.msidevs {
        let index = dev
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .spec()
            .index;
        pio.insert(
            u64::from(irqconnect_abi::msidev::device_port(u16::from(index))),
            u64::from(layout::MSIDEV_STRIDE),
            "msidev",
            Arc::new(Mutex::new(msidev::MsidevPort::new(Arc::clone(dev)))),
        )
        .map_err(overlap)?;
    }

    if let Some(doorbell) = &cfg.pv_doorbell {
        pio.insert(
            u64::from(layout::PV_DOORBELL_PORT),
            u64::from(layout::PV_DOORBELL_SIZE),
            "pv-doorbell",
            Arc::clone(doorbell),
        )
        .map_err(overlap)?;
    }

    if let Some(device) = &cfg.snapshot {
        pio.insert(
            u64::from(irqconnect_abi::snapshot::SNAPSHOT_PORT),
            u64::from(irqconnect_abi::snapshot::SNAPSHOT_PORT_SIZE),
            "snapshot",
            Arc::clone(device),
        )
        .map_err(overlap)?;
    }

    // In kernel mode KVM's PIC decodes these ports and they never exit.
    let mut legacy_pic = None;
    if cfg.mode != Mode::Kernel {
        let pic = Arc::new(Mutex::new(pic::LegacyPic::new()));
        legacy_pic = Some(Arc::clone(&pic));
        for (port, kind) in [
            (layout::PIC_MASTER_CMD_PORT, pic::PicPortKind::Master),
            (layout::PIC_SLAVE_CMD_PORT, pic::PicPortKind::Slave),
            (layout::PIC_ELCR_PORT, pic::PicPortKind::Elcr),
        ] {
            pio.insert(
                u64::from(port),
                2,
                "pic",
                Arc::new(Mutex::new(pic::PicPorts::new(Arc::clone(&pic), kind))),
            )
            .map_err(overlap)?;
        }
    }

    for (MmioWindow { base, len, name }, device) in chip.mmio_windows() {
        mmio.insert(base, len, name, device).map_err(overlap)?;
    }

    log::debug!("{}", pio.describe());
    log::debug!("{}", mmio.describe());
    Ok(Devices {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        uart,
        testdevs,
        pc_testdev,
        fw_cfg,
        pic: legacy_pic,
    })
}
