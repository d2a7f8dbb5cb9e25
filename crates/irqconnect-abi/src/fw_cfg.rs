//! fw_cfg keys, with QEMU's numbering so one guest image reads either VMM.
//!
//! Protocol (legacy I/O): write the 16-bit key to
//! [`crate::layout::FW_CFG_SELECTOR_PORT`], then read bytes from
//! [`crate::layout::FW_CFG_DATA_PORT`]; each read returns the next byte of the
//! item, and 0 past its end. Integers are little-endian.

/// `"QEMU"`: 4 bytes.
pub const FW_CFG_SIGNATURE: u16 = 0x0000;
/// Interface revision and features: 4 bytes (bit 0: traditional interface).
pub const FW_CFG_ID: u16 = 0x0001;
/// RAM size in bytes: 8 bytes.
pub const FW_CFG_RAM_SIZE: u16 = 0x0003;
/// Number of vCPUs started by firmware convention: 2 bytes.
pub const FW_CFG_NB_CPUS: u16 = 0x0005;
/// Maximum number of vCPUs: 2 bytes.
pub const FW_CFG_MAX_CPUS: u16 = 0x000f;

/// The bytes of the signature item.
pub const FW_CFG_SIGNATURE_BYTES: [u8; 4] = *b"QEMU";
