//! QEMU-compatible fw_cfg reader (legacy I/O: 16-bit selector, byte data).

use irqconnect_abi::fw_cfg::{
    FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE, FW_CFG_SIGNATURE_BYTES,
};
use irqconnect_abi::layout::{FW_CFG_DATA_PORT, FW_CFG_SELECTOR_PORT};

use crate::cpu;

fn read(key: u16, out: &mut [u8]) {
    // SAFETY: the fw_cfg ports only stream configuration bytes.
    unsafe {
        cpu::outw(FW_CFG_SELECTOR_PORT, key);
        for b in out.iter_mut() {
            *b = cpu::inb(FW_CFG_DATA_PORT);
        }
    }
}

/// True when the device answers with the "QEMU" signature.
pub fn present() -> bool {
    let mut sig = [0u8; 4];
    read(FW_CFG_SIGNATURE, &mut sig);
    sig == FW_CFG_SIGNATURE_BYTES
}

/// Number of vCPUs, when fw_cfg is present.
pub fn cpu_count() -> Option<u16> {
    if !present() {
        return None;
    }
    let mut b = [0u8; 2];
    read(FW_CFG_NB_CPUS, &mut b);
    Some(u16::from_le_bytes(b))
}

/// RAM size in bytes, when fw_cfg is present.
pub fn ram_size() -> Option<u64> {
    if !present() {
        return None;
    }
    let mut b = [0u8; 8];
    read(FW_CFG_RAM_SIZE, &mut b);
    Some(u64::from_le_bytes(b))
}
