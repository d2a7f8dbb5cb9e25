//! Interrupt dispatch: the entry stubs call [`interrupt_dispatch`].
//!
//! - Exceptions (0..31 but NMI) are fatal: the vector, error code, RIP, CR2
//!   and CPU are printed and the run ends with a FAIL line and exit code 1.
//! - NMI (2): counted per CPU, then the optional handler runs. No EOI.
//! - The spurious vector (0xFF): counted, no EOI.
//! - Any other vector: the handler installed with [`set_handler`] runs, or,
//!   when there is none, the chain of interrupt objects connected through
//!   `wdm::IoConnectInterrupt` ([`wdm::dispatch`], which sends its own EOI);
//!   then EOI (unless already sent with [`eoi_now`]), then the per-CPU count
//!   goes up, so a test that sees the count also sees what the handler did.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::{cpu, lapic, percpu, runner, wdm};

/// The saved state of an interrupted context, as the stubs lay it out.
#[repr(C)]
#[allow(missing_docs)]
pub struct InterruptFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A vector's handler: runs with interrupts off on the receiving CPU.
pub type Handler = fn(vector: u8);

/// Vector the BSP uses to wake an idle AP for its mailbox.
pub const WAKE_VECTOR: u8 = 0xfe;

static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Installs (or with `None` removes) the handler of `vector`.
pub fn set_handler(vector: u8, handler: Option<Handler>) {
    HANDLERS[usize::from(vector)].store(handler.map_or(0, |h| h as usize), Ordering::Release);
}

/// Removes every handler.
pub fn clear_handlers() {
    for h in HANDLERS.iter() {
        h.store(0, Ordering::Release);
    }
}

fn handler(vector: u8) -> Option<Handler> {
    let raw = HANDLERS[usize::from(vector)].load(Ordering::Acquire);
    // SAFETY: non-zero values are only ever stored from a `Handler` by `set_handler`.
    (raw != 0).then(|| unsafe { core::mem::transmute::<usize, Handler>(raw) })
}

/// Sends the LAPIC EOI from inside a handler; the dispatcher then skips its own.
pub fn eoi_now() {
    lapic::eoi();
    percpu::this().eoi_sent.store(true, Ordering::Relaxed);
}

const NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF9", "#TS", "#NP", "#SS",
    "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
    "#26", "#27", "#HV", "#VC", "#SX", "#31",
];

/// Called by the entry stubs with the saved frame.
#[unsafe(no_mangle)]
extern "C" fn interrupt_dispatch(frame: &mut InterruptFrame) {
    let vector = frame.vector as u8;
    let me = percpu::this();
    match vector {
        2 => {
            me.nmi_count.fetch_add(1, Ordering::AcqRel);
            if let Some(h) = handler(2) {
                h(2);
            }
        }
        0..=31 => exception(frame),
        lapic::SPURIOUS_VECTOR => {
            me.vector_count[usize::from(vector)].fetch_add(1, Ordering::AcqRel);
        }
        _ => {
            me.eoi_sent.store(false, Ordering::Relaxed);
            match handler(vector) {
                Some(h) => h(vector),
                None => wdm::dispatch(vector),
            }
            if !me.eoi_sent.load(Ordering::Relaxed) {
                lapic::eoi();
            }
            me.vector_count[usize::from(vector)].fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn exception(frame: &InterruptFrame) -> ! {
    let me = percpu::this();
    if me.in_exception.swap(true, Ordering::AcqRel) {
        // A fault while reporting a fault: leave at once.
        runner::exit(1);
    }
    let cr2 = cpu::read_cr2();
    runner::fatal(format_args!(
        "exception {} (vector {}) error={} rip={} cr2={} rsp={} cpu={}",
        NAMES[frame.vector as usize & 31],
        crate::display::dec(frame.vector),
        crate::display::hex(frame.error),
        crate::display::hex(frame.rip),
        crate::display::hex(cr2),
        crate::display::hex(frame.rsp),
        crate::display::dec(me.index())
    ))
}
