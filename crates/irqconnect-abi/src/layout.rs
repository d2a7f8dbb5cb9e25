//! Every I/O port and guest-physical address the platform defines.
//!
//! The machine is a small PC: a 16550 UART, the QEMU-compatible exit and
//! pc-testdev IRQ-line ports (so one guest image runs under QEMU as well), a
//! fw_cfg interface, an IOAPIC and local APICs at their architectural
//! addresses, and two paravirtual devices of our own: the connect doorbell and
//! the interrupt-source test devices.

/// First COM port: a 16550A UART whose output goes to the VMM's stdout.
pub const SERIAL_COM1_PORT: u16 = 0x3f8;
/// Number of I/O ports the UART decodes (THR/RBR .. SCR).
pub const SERIAL_PORT_COUNT: u16 = 8;
/// Legacy ISA IRQ line of COM1 (IOAPIC pin 4).
pub const SERIAL_COM1_IRQ: u8 = 4;

/// QEMU `isa-debug-exit` compatible port: a 4-byte write of `v` ends the VM.
///
/// Our VMM exits with status `v`; QEMU exits with `(v << 1) | 1`.
pub const EXIT_PORT: u16 = 0xf4;
/// Width in bytes of the exit port.
pub const EXIT_PORT_SIZE: u16 = 4;

/// QEMU `pc-testdev` compatible IRQ-line ports: a byte write to
/// `PC_TESTDEV_IRQ_BASE + line` sets that interrupt line's level (0 = low,
/// anything else = high). The level is applied before the writing vCPU resumes.
pub const PC_TESTDEV_IRQ_BASE: u16 = 0x2000;
/// Number of lines the pc-testdev ports cover: one per IOAPIC pin.
pub const PC_TESTDEV_IRQ_COUNT: u16 = IOAPIC_PINS as u16;

/// fw_cfg legacy I/O selector port (16-bit write selects a key).
pub const FW_CFG_SELECTOR_PORT: u16 = 0x510;
/// fw_cfg legacy I/O data port (byte reads stream the selected item).
pub const FW_CFG_DATA_PORT: u16 = 0x511;

/// Master 8259 PIC command port.
pub const PIC_MASTER_CMD_PORT: u16 = 0x20;
/// Master 8259 PIC data (mask) port.
pub const PIC_MASTER_DATA_PORT: u16 = 0x21;
/// Slave 8259 PIC command port.
pub const PIC_SLAVE_CMD_PORT: u16 = 0xa0;
/// Slave 8259 PIC data (mask) port.
pub const PIC_SLAVE_DATA_PORT: u16 = 0xa1;
/// ELCR (edge/level control) ports of the PIIX/ICH, master then slave.
pub const PIC_ELCR_PORT: u16 = 0x4d0;

/// Paravirtual connect doorbell. A 32-bit `out` carries the guest-physical
/// address of a request block (see [`crate::pv`]); the VMM answers in the same
/// block before the vCPU resumes. A 32-bit `in` returns [`PV_DOORBELL_SIGNATURE`]
/// under our VMM and all ones where no PV device exists (QEMU).
pub const PV_DOORBELL_PORT: u16 = 0x2200;
/// Width in bytes of the doorbell port.
pub const PV_DOORBELL_SIZE: u16 = 4;
/// What a 32-bit read of the doorbell returns when the PV device exists
/// (`"IRQC"` in little-endian byte order).
pub const PV_DOORBELL_SIGNATURE: u32 = u32::from_le_bytes(*b"IRQC");

/// First port of the interrupt-source test devices (see [`crate::testdev`]).
pub const TESTDEV_BASE_PORT: u16 = 0x2100;
/// Ports per test device.
pub const TESTDEV_STRIDE: u16 = 0x20;
/// Maximum number of test devices the port window holds.
pub const TESTDEV_MAX_DEVICES: u16 = 8;

/// First port of the message-signaled test devices (see [`crate::msidev`]).
pub const MSIDEV_BASE_PORT: u16 = 0x2300;
/// Ports per message-signaled test device.
pub const MSIDEV_STRIDE: u16 = 0x40;
/// Maximum number of message-signaled test devices the port window holds.
pub const MSIDEV_MAX_DEVICES: u16 = 4;

/// Guest-physical base of the IOAPIC's MMIO window (82093AA default).
pub const IOAPIC_MMIO_BASE: u64 = 0xfec0_0000;
/// Size of the IOAPIC's MMIO window.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;
/// Guest-physical base of the local APIC's MMIO window (SDM Vol. 3A 11.4.1).
pub const LAPIC_MMIO_BASE: u64 = 0xfee0_0000;
/// Size of the local APIC's MMIO window.
pub const LAPIC_MMIO_SIZE: u64 = 0x1000;

/// Number of IOAPIC pins (redirection entries), as the guest sees the
/// platform. The IOAPIC model (`irqchip::ioapic::NUM_PINS`) is the source;
/// the host crates that see both assert at compile time that they agree.
pub const IOAPIC_PINS: u8 = 24;

/// Guest-physical address where guest RAM starts.
pub const RAM_BASE: u64 = 0;
/// Start of the 32-bit MMIO hole: RAM never extends past it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Largest RAM size the VMM accepts, in MiB (RAM stays below the MMIO hole,
/// so every RAM address fits the 32-bit doorbell).
pub const MAX_RAM_MIB: u64 = MMIO_HOLE_START >> 20;
/// Most vCPUs the platform supports (xAPIC IDs 0..=254; 0xff is broadcast).
pub const MAX_CPUS: usize = 255;

/// First vector the PnP manager assigns to devices (IRQL 3).
pub const DEVICE_VECTOR_MIN: u8 = 0x30;
/// Last vector the PnP manager assigns to devices (IRQL 11).
pub const DEVICE_VECTOR_MAX: u8 = 0xbf;

/// Test-marker port: the guest's test runner writes the name of the test it is
/// starting, one byte per `out`, ended by `b'\n'` (names longer than
/// [`TEST_MARKER_MAX_LEN`] are truncated). The VMM remembers the last complete
/// name, so `--timeout` can say which test was running. Harmless elsewhere.
pub const TEST_MARKER_PORT: u16 = 0x2208;
/// Longest test name the VMM keeps.
pub const TEST_MARKER_MAX_LEN: usize = 96;

/// Local APIC timer input clock: 1 GHz (one tick per nanosecond before the
/// divider), as KVM's in-kernel LAPIC runs it and as our model is configured,
/// so the guest programs the timer the same way in every mode.
pub const LAPIC_BUS_HZ: u64 = 1_000_000_000;
