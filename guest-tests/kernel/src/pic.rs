//! The legacy 8259 pair: remapped out of the exception range and fully masked.

use irqconnect_abi::layout::{
    PIC_MASTER_CMD_PORT, PIC_MASTER_DATA_PORT, PIC_SLAVE_CMD_PORT, PIC_SLAVE_DATA_PORT,
};

use crate::cpu;

/// Re-initialises both PICs with vectors 0x20..0x2F and masks every line.
pub fn disable() {
    // SAFETY: 8259 command/data ports; no memory effects.
    unsafe {
        cpu::outb(PIC_MASTER_CMD_PORT, 0x11);
        cpu::outb(PIC_SLAVE_CMD_PORT, 0x11);
        cpu::outb(PIC_MASTER_DATA_PORT, 0x20);
        cpu::outb(PIC_SLAVE_DATA_PORT, 0x28);
        cpu::outb(PIC_MASTER_DATA_PORT, 0x04);
        cpu::outb(PIC_SLAVE_DATA_PORT, 0x02);
        cpu::outb(PIC_MASTER_DATA_PORT, 0x01);
        cpu::outb(PIC_SLAVE_DATA_PORT, 0x01);
        cpu::outb(PIC_MASTER_DATA_PORT, 0xff);
        cpu::outb(PIC_SLAVE_DATA_PORT, 0xff);
    }
}
