//! QEMU `pc-testdev` compatible IRQ-line ports: a byte write to
//! `0x2000 + line` sets that line's level (0 low, anything else high).
//!
//! The level is applied on the writing vCPU's thread before it re-enters
//! `KVM_RUN` (the bus calls us synchronously), so the guest sees the effect
//! of its `out` at once. A read returns the line's current level from this
//! device (0 or 1), which QEMU does not define; guests should not rely on it.

use crate::bus::{Access, BusDevice};
use irqchip_kvm::LineSink;

/// The 24 line ports, each with its own line into the wiring.
pub(crate) struct PcTestdev<L: LineSink> {
    lines: Vec<L>,
    levels: Vec<bool>,
}

impl<L: LineSink> PcTestdev<L> {
    /// Ports for `lines` (index = port offset = GSI).
    pub(crate) fn new(lines: Vec<L>) -> Self {
        let levels = vec![false; lines.len()];
        Self { lines, levels }
    }
}

impl<L: LineSink> PcTestdev<L> {
    /// The line levels the guest set (the snapshot state).
    pub(crate) fn levels(&self) -> Vec<bool> {
        self.levels.clone()
    }

    /// Restores the levels of a snapshot without driving the lines (the
    /// interrupt controller's restored state has them).
    pub(crate) fn restore_levels(&mut self, levels: &[bool]) -> Result<(), String> {
        if levels.len() != self.levels.len() {
            return Err(format!(
                "pc-testdev: {} line levels saved, the device has {}",
                levels.len(),
                self.levels.len()
            ));
        }
        self.levels.copy_from_slice(levels);
        Ok(())
    }
}

impl<L: LineSink + Send> BusDevice for PcTestdev<L> {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Some(&level)) = (data.first_mut(), self.levels.get(offset as usize)) {
            *first = u8::from(level);
        }
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let high = value != 0;
        if let (Some(line), Some(level)) = (
            self.lines.get_mut(offset as usize),
            self.levels.get_mut(offset as usize),
        ) {
            *level = high;
            line.set_level(high);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Rec(usize, Arc<Mutex<Vec<(usize, bool)>>>);
    impl LineSink for Rec {
        fn set_level(&mut self, high: bool) {
            self.1.lock().unwrap().push((self.0, high));
        }
    }

    #[test]
    fn byte_write_sets_that_lines_level() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut dev = PcTestdev::new((0..24).map(|i| Rec(i, log.clone())).collect());
        let a = Access { vcpu: 0 };
        dev.write(a, 10, &[1]);
        dev.write(a, 10, &[0x80]);
        dev.write(a, 23, &[0]);
        dev.write(a, 24, &[1]); // past the last line: ignored
        assert_eq!(
            *log.lock().unwrap(),
            vec![(10, true), (10, true), (23, false)]
        );
        let mut b = [0xaa];
        dev.read(a, 10, &mut b);
        assert_eq!(b, [1]);
    }
}
