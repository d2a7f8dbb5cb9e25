//! A minimal 8259A pair for the split and user modes, where KVM has no PIC.
//!
//! Accepted: the ICW1..ICW4 initialisation sequence, OCW1 (the mask
//! register, kept and read back), OCW2 (EOI commands, no effect), OCW3
//! (IRR/ISR read select: both read as 0), and the ELCR ports. The legacy PIC
//! never raises an interrupt: every line is routed through the IOAPIC, and
//! the PIC's output is not connected (guests mask it anyway). In kernel mode
//! KVM's in-kernel PIC handles these ports and this model is not on the bus.

use crate::bus::{Access, BusDevice};

/// ICW1 bit 4: this command word is ICW1.
const ICW1_SELECT: u8 = 1 << 4;
/// ICW1 bit 0: ICW4 follows.
const ICW1_IC4: u8 = 1 << 0;
/// ICW1 bit 1: single (no ICW3).
const ICW1_SNGL: u8 = 1 << 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum InitState {
    /// Normal operation: data-port writes are OCW1 (mask).
    Ready,
    /// Expecting ICW2 (vector base).
    Icw2,
    /// Expecting ICW3 (cascade).
    Icw3,
    /// Expecting ICW4 (mode).
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Pic8259 {
    state: InitState,
    icw1: u8,
    vector_base: u8,
    imr: u8,
}

impl Pic8259 {
    /// A PIC after reset: everything masked (firmware leaves it so).
    pub(crate) fn new() -> Self {
        Self {
            state: InitState::Ready,
            icw1: 0,
            vector_base: 0,
            imr: 0xff,
        }
    }

    /// A write to the command port (offset 0).
    pub(crate) fn write_command(&mut self, value: u8) {
        if value & ICW1_SELECT != 0 {
            self.icw1 = value;
            self.imr = 0;
            self.state = InitState::Icw2;
        }
        // Otherwise OCW2 (EOI, rotate) or OCW3 (read select, special mask):
        // accepted and ignored, there is never an in-service interrupt.
    }

    /// A write to the data port (offset 1).
    pub(crate) fn write_data(&mut self, value: u8) {
        self.state = match self.state {
            InitState::Ready => {
                self.imr = value;
                InitState::Ready
            }
            InitState::Icw2 => {
                self.vector_base = value & 0xf8;
                if self.icw1 & ICW1_SNGL == 0 {
                    InitState::Icw3
                } else if self.icw1 & ICW1_IC4 != 0 {
                    InitState::Icw4
                } else {
                    InitState::Ready
                }
            }
            InitState::Icw3 if self.icw1 & ICW1_IC4 != 0 => InitState::Icw4,
            InitState::Icw3 | InitState::Icw4 => InitState::Ready,
        };
    }

    /// A read of the command port: IRR or ISR, both empty.
    pub(crate) fn read_command(&self) -> u8 {
        0
    }

    /// A read of the data port: the mask register.
    pub(crate) fn read_data(&self) -> u8 {
        self.imr
    }
}

/// Which ports a [`PicPorts`] instance decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PicPortKind {
    /// 0x20/0x21.
    Master,
    /// 0xa0/0xa1.
    Slave,
    /// 0x4d0/0x4d1.
    Elcr,
}

/// The master/slave pair and the ELCR, as one bus device per port range
/// (the three ranges share one instance via `Arc<Mutex<_>>` wrappers).
/// Its snapshot state is the value itself (serde).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LegacyPic {
    master: Pic8259,
    slave: Pic8259,
    elcr: [u8; 2],
}

impl LegacyPic {
    /// Both PICs masked, all lines edge in the ELCR.
    pub(crate) fn new() -> Self {
        Self {
            master: Pic8259::new(),
            slave: Pic8259::new(),
            elcr: [0; 2],
        }
    }

    /// A read of `kind` port `offset`.
    pub(crate) fn read(&self, kind: PicPortKind, offset: u64) -> u8 {
        let pic = match kind {
            PicPortKind::Master => &self.master,
            PicPortKind::Slave => &self.slave,
            PicPortKind::Elcr => return self.elcr.get(offset as usize).copied().unwrap_or(0xff),
        };
        if offset == 0 {
            pic.read_command()
        } else {
            pic.read_data()
        }
    }

    /// A write of `kind` port `offset`.
    pub(crate) fn write(&mut self, kind: PicPortKind, offset: u64, value: u8) {
        let pic = match kind {
            PicPortKind::Master => &mut self.master,
            PicPortKind::Slave => &mut self.slave,
            PicPortKind::Elcr => {
                // IRQ 0, 1, 2, 8 and 13 are always edge on the PIIX.
                let mask = if offset == 0 { 0xf8 } else { 0xde };
                if let Some(r) = self.elcr.get_mut(offset as usize) {
                    *r = value & mask;
                }
                return;
            }
        };
        if offset == 0 {
            pic.write_command(value);
        } else {
            pic.write_data(value);
        }
    }
}

/// One port range of the [`LegacyPic`] on the bus.
pub(crate) struct PicPorts {
    pic: std::sync::Arc<std::sync::Mutex<LegacyPic>>,
    kind: PicPortKind,
}

impl PicPorts {
    /// The `kind` range of `pic`.
    pub(crate) fn new(pic: std::sync::Arc<std::sync::Mutex<LegacyPic>>, kind: PicPortKind) -> Self {
        Self { pic, kind }
    }
}

impl BusDevice for PicPorts {
    fn read(&mut self, _access: Access, offset: u64, data: &mut [u8]) {
        let pic = self
            .pic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, b) in data.iter_mut().enumerate() {
            *b = pic.read(self.kind, offset + i as u64);
        }
    }

    fn write(&mut self, _access: Access, offset: u64, data: &[u8]) {
        let mut pic = self
            .pic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, &b) in data.iter().enumerate() {
            pic.write(self.kind, offset + i as u64, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_sequence_then_mask_read_back() {
        let mut pic = LegacyPic::new();
        // The classic remap: ICW1 0x11, ICW2 0x20/0x28, ICW3 4/2, ICW4 1.
        pic.write(PicPortKind::Master, 0, 0x11);
        pic.write(PicPortKind::Slave, 0, 0x11);
        pic.write(PicPortKind::Master, 1, 0x20);
        pic.write(PicPortKind::Slave, 1, 0x28);
        pic.write(PicPortKind::Master, 1, 4);
        pic.write(PicPortKind::Slave, 1, 2);
        pic.write(PicPortKind::Master, 1, 1);
        pic.write(PicPortKind::Slave, 1, 1);
        assert_eq!(pic.master.vector_base, 0x20);
        assert_eq!(pic.slave.vector_base, 0x28);
        // ICW1 cleared the mask; OCW1 now sets it.
        assert_eq!(pic.read(PicPortKind::Master, 1), 0);
        pic.write(PicPortKind::Master, 1, 0xfb);
        pic.write(PicPortKind::Slave, 1, 0xff);
        assert_eq!(pic.read(PicPortKind::Master, 1), 0xfb);
        assert_eq!(pic.read(PicPortKind::Slave, 1), 0xff);
        // OCW2 EOI and OCW3 read-ISR are accepted; ISR reads empty.
        pic.write(PicPortKind::Master, 0, 0x20);
        pic.write(PicPortKind::Master, 0, 0x0b);
        assert_eq!(pic.read(PicPortKind::Master, 0), 0);
        assert_eq!(pic.read(PicPortKind::Master, 1), 0xfb);
    }

    #[test]
    fn single_mode_without_icw4_skips_icw3_and_icw4() {
        let mut pic = Pic8259::new();
        pic.write_command(ICW1_SELECT | ICW1_SNGL);
        pic.write_data(0x40);
        pic.write_data(0x0f); // OCW1 already
        assert_eq!(pic.read_data(), 0x0f);
    }

    #[test]
    fn elcr_keeps_only_programmable_bits() {
        let mut pic = LegacyPic::new();
        pic.write(PicPortKind::Elcr, 0, 0xff);
        pic.write(PicPortKind::Elcr, 1, 0xff);
        assert_eq!(pic.read(PicPortKind::Elcr, 0), 0xf8);
        assert_eq!(pic.read(PicPortKind::Elcr, 1), 0xde);
    }
}
