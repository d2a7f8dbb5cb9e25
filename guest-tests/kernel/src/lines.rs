//! Interrupt lines driven through the pc-testdev ports (a byte write to
//! 0x2000 + line sets the level; applied before the vCPU resumes).

use irqconnect_abi::layout::{PC_TESTDEV_IRQ_BASE, PC_TESTDEV_IRQ_COUNT};

use crate::cpu;

/// Sets line `line`'s level.
pub fn set(line: u8, high: bool) {
    if u16::from(line) >= PC_TESTDEV_IRQ_COUNT {
        return;
    }
    // SAFETY: a pc-testdev IRQ-line port; no memory effects.
    unsafe { cpu::outb(PC_TESTDEV_IRQ_BASE + u16::from(line), u8::from(high)) }
}

/// Raises then lowers line `line` (one rising edge).
pub fn pulse(line: u8) {
    set(line, true);
    set(line, false);
}
