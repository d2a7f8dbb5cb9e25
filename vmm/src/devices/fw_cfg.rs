//! fw_cfg, legacy I/O interface (QEMU `docs/specs/fw_cfg.rst`): a 16-bit
//! write to the selector port picks an item, byte reads of the data port
//! stream it, and read 0 past its end. Unknown keys are empty items.

use std::collections::BTreeMap;

use irqconnect_abi::fw_cfg::{
    FW_CFG_ID, FW_CFG_MAX_CPUS, FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FW_CFG_SIGNATURE,
    FW_CFG_SIGNATURE_BYTES,
};
use irqconnect_abi::layout::{FW_CFG_DATA_PORT, FW_CFG_SELECTOR_PORT};

use crate::bus::{Access, BusDevice};

/// `FW_CFG_ID` bit 0: the traditional (I/O port) interface.
pub(crate) const ID_TRADITIONAL: u32 = 1;
/// Ports the device decodes, from the selector port.
pub(crate) const FW_CFG_PORT_COUNT: u64 = (FW_CFG_DATA_PORT - FW_CFG_SELECTOR_PORT + 1) as u64;

/// The fw_cfg device.
pub(crate) struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// fw_cfg describing a machine with `cpus` vCPUs and `ram` bytes.
    pub(crate) fn new(cpus: u16, max_cpus: u16, ram: u64) -> Self {
        let mut items = BTreeMap::new();
        items.insert(FW_CFG_SIGNATURE, FW_CFG_SIGNATURE_BYTES.to_vec());
        items.insert(FW_CFG_ID, ID_TRADITIONAL.to_le_bytes().to_vec());
        items.insert(FW_CFG_RAM_SIZE, ram.to_le_bytes().to_vec());
        items.insert(FW_CFG_NB_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(FW_CFG_MAX_CPUS, max_cpus.to_le_bytes().to_vec());
        Self {
            items,
            selected: FW_CFG_SIGNATURE,
            offset: 0,
        }
    }

    fn next_byte(&mut self) -> u8 {
        let b = self
            .items
            .get(&self.selected)
            .and_then(|item| item.get(self.offset).copied())
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        if offset == u64::from(FW_CFG_DATA_PORT - FW_CFG_SELECTOR_PORT) {
            for b in data.iter_mut() {
                *b = self.next_byte();
            }
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        if offset == 0 {
            let key = match data {
                [lo] => u16::from(*lo),
                [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
                [] => return,
            };
            self.selected = key;
            self.offset = 0;
        }
        // Writes to the data port are deprecated in QEMU and ignored here.
    }
}

/// fw_cfg's guest-visible state: the selected item and the read offset
/// (the items are the VM's configuration, rebuilt at restore).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct FwCfgState {
    /// The selector.
    pub(crate) selected: u16,
    /// Bytes of the selected item read so far.
    pub(crate) offset: u64,
}

impl FwCfg {
    /// The snapshot state.
    pub(crate) fn save(&self) -> FwCfgState {
        FwCfgState {
            selected: self.selected,
            offset: self.offset as u64,
        }
    }

    /// Restores a snapshot state (any value is safe: reads past an item's
    /// end return 0).
    pub(crate) fn restore(&mut self, state: FwCfgState) {
        self.selected = state.selected;
        self.offset = usize::try_from(state.offset).unwrap_or(usize::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(dev: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        let a = Access { vcpu: 0 };
        dev.write(a, 0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0];
                dev.read(a, 1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn items_stream_then_read_zero() {
        let mut dev = FwCfg::new(4, 255, 128 << 20);
        assert_eq!(read_item(&mut dev, FW_CFG_SIGNATURE, 5), b"QEMU\0");
        assert_eq!(read_item(&mut dev, FW_CFG_NB_CPUS, 2), 4u16.to_le_bytes());
        assert_eq!(
            read_item(&mut dev, FW_CFG_MAX_CPUS, 2),
            255u16.to_le_bytes()
        );
        assert_eq!(
            read_item(&mut dev, FW_CFG_RAM_SIZE, 8),
            (128u64 << 20).to_le_bytes()
        );
        assert_eq!(read_item(&mut dev, FW_CFG_ID, 4), 1u32.to_le_bytes());
        assert_eq!(read_item(&mut dev, 0x1234, 3), [0, 0, 0]);
    }

    #[test]
    fn reselect_restarts_item() {
        let mut dev = FwCfg::new(1, 255, 1 << 20);
        assert_eq!(read_item(&mut dev, FW_CFG_SIGNATURE, 2), b"QE");
        assert_eq!(read_item(&mut dev, FW_CFG_SIGNATURE, 2), b"QE");
    }
}
