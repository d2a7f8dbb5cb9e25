//! COM1 16550 console, polled output, and the line-atomic `println!`.
//!
//! Lines never interleave across CPUs: a print lock (owner = CPU index + 1)
//! is taken with interrupts off; a CPU that already holds it (a fault while
//! printing) prints through instead of deadlocking.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

use irqconnect_abi::layout::SERIAL_COM1_PORT as COM1;

use crate::cpu;
use crate::percpu;

const THR: u16 = 0;
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Reads COM1's line status register and drops the value: a read without
/// side effects that every VMM serves in its user space, so the vCPU makes
/// one round trip there. A host may inject a pending interrupt or NMI only
/// when a vCPU comes back from such an exit (in-kernel exits and other
/// vCPUs' kicks do not get it delivered sooner); a loop that waits for one
/// calls this each time round.
pub fn exit_to_vmm() {
    // SAFETY: COM1's line status register; reading it changes nothing.
    let _ = unsafe { cpu::inb(COM1 + LSR) };
}

/// Programs 115200 8N1, FIFOs on, UART interrupts off.
pub fn init() {
    // SAFETY: COM1's registers; no memory effects.
    unsafe {
        cpu::outb(COM1 + IER, 0);
        cpu::outb(COM1 + LCR, 0x80);
        cpu::outb(COM1, 1);
        cpu::outb(COM1 + 1, 0);
        cpu::outb(COM1 + LCR, 0x03);
        cpu::outb(COM1 + FCR, 0x07);
        cpu::outb(COM1 + MCR, 0x03);
    }
}

fn put_byte(b: u8) {
    // SAFETY: COM1's registers; no memory effects.
    unsafe {
        let mut spins = 0u32;
        while cpu::inb(COM1 + LSR) & LSR_THR_EMPTY == 0 && spins < 100_000 {
            spins += 1;
            cpu::pause();
        }
        cpu::outb(COM1 + THR, b);
    }
}

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put_byte(b'\r');
            }
            put_byte(b);
        }
        Ok(())
    }
}

static OWNER: AtomicU32 = AtomicU32::new(0);

/// Prints one formatted line atomically with respect to other CPUs.
pub fn print_line(args: fmt::Arguments<'_>) {
    let _irq = cpu::IrqGuard::new();
    let me = percpu::current_index() as u32 + 1;
    let nested = OWNER.load(Ordering::Relaxed) == me;
    if !nested {
        while OWNER
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            cpu::pause();
        }
    }
    let _ = Uart.write_fmt(args);
    let _ = Uart.write_str("\n");
    if !nested {
        OWNER.store(0, Ordering::Release);
    }
}

/// Prints one line to COM1 (no interleaving across CPUs).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::serial::print_line(format_args!($($arg)*)) };
}
