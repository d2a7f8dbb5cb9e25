//! Per-CPU data: one [`PerCpu`] slot per processor index, found through the
//! GS base (`gs:[0]` holds the index). Index order = APIC ID order; the BSP
//! is index 0.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crate::cpu;

/// Most processors this kernel drives: as many as the platform has
/// (`irqconnect_abi::layout::MAX_CPUS`, 255). Per processor the kernel
/// keeps a [`PerCpu`] (1.1 KiB), a 64 KiB stack, 36 KiB of IST stacks, two
/// GDT slots, a TSS, 1 KiB of dispatch counters and 512 bytes of chain
/// heads: about 104 KiB, 26 MiB for 255 processors.
pub const MAX_CPUS: usize = irqconnect_abi::layout::MAX_CPUS;

/// A work item posted to a CPU: `run(arg)`, result reported back.
pub type WorkFn = fn(usize) -> usize;

/// One CPU's mailbox: the BSP posts, the CPU runs the item from its idle loop.
pub struct Mailbox {
    func: AtomicUsize,
    arg: AtomicUsize,
    result: AtomicUsize,
    posted: AtomicU32,
    done: AtomicU32,
}

impl Mailbox {
    const fn new() -> Self {
        Self {
            func: AtomicUsize::new(0),
            arg: AtomicUsize::new(0),
            result: AtomicUsize::new(0),
            posted: AtomicU32::new(0),
            done: AtomicU32::new(0),
        }
    }

    /// True when no posted item is outstanding.
    pub fn idle(&self) -> bool {
        self.posted.load(Ordering::Acquire) == self.done.load(Ordering::Acquire)
    }

    /// Posts `func(arg)`; returns false when the previous item is still running.
    pub fn post(&self, func: WorkFn, arg: usize) -> bool {
        if !self.idle() {
            return false;
        }
        self.arg.store(arg, Ordering::Relaxed);
        self.func.store(func as usize, Ordering::Relaxed);
        self.posted.fetch_add(1, Ordering::Release);
        true
    }

    /// The result of the last finished item, when no item is outstanding.
    pub fn result(&self) -> Option<usize> {
        self.idle().then(|| self.result.load(Ordering::Acquire))
    }

    /// Runs the pending item, if any; called by the owning CPU only.
    pub fn run_pending(&self) -> bool {
        let posted = self.posted.load(Ordering::Acquire);
        if posted == self.done.load(Ordering::Relaxed) {
            return false;
        }
        let raw = self.func.load(Ordering::Relaxed);
        // SAFETY: `func` only ever holds a `WorkFn` stored by `post`, published
        // by the Release increment of `posted` that the Acquire load above saw.
        let func: WorkFn = unsafe { core::mem::transmute::<usize, WorkFn>(raw) };
        let result = func(self.arg.load(Ordering::Relaxed));
        self.result.store(result, Ordering::Release);
        self.done.store(posted, Ordering::Release);
        true
    }
}

/// Everything the kernel keeps per processor.
#[repr(C, align(64))]
pub struct PerCpu {
    /// Processor index; must stay the first field (read as `gs:[0]`).
    pub index: AtomicU32,
    /// Local APIC ID (x2APIC ID in x2APIC mode).
    pub apic_id: AtomicU32,
    /// Logical APIC ID as programmed/read from the LDR (flat: 1 << index).
    pub logical_id: AtomicU32,
    /// Set when the CPU finished its bring-up and idles.
    pub online: AtomicBool,
    /// Set while the CPU handles a fatal exception (a nested one exits at once).
    pub in_exception: AtomicBool,
    /// Set by a handler that sent its own EOI (the dispatcher then does not).
    pub eoi_sent: AtomicBool,
    /// Work posted by the BSP.
    pub mailbox: Mailbox,
    /// Interrupts taken per vector (counted after the handler and the EOI).
    pub vector_count: [AtomicU32; 256],
    /// NMIs taken.
    pub nmi_count: AtomicU32,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            index: AtomicU32::new(0),
            apic_id: AtomicU32::new(0),
            logical_id: AtomicU32::new(0),
            online: AtomicBool::new(false),
            in_exception: AtomicBool::new(false),
            eoi_sent: AtomicBool::new(false),
            mailbox: Mailbox::new(),
            vector_count: [const { AtomicU32::new(0) }; 256],
            nmi_count: AtomicU32::new(0),
        }
    }

    /// This CPU's index.
    pub fn index(&self) -> usize {
        self.index.load(Ordering::Relaxed) as usize
    }

    /// This CPU's APIC ID.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }

    /// This CPU's logical APIC ID.
    pub fn logical_id(&self) -> u32 {
        self.logical_id.load(Ordering::Relaxed)
    }

    /// Interrupts counted on `vector`.
    pub fn count(&self, vector: u8) -> u32 {
        self.vector_count[usize::from(vector)].load(Ordering::Acquire)
    }
}

static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
static CPU_COUNT: AtomicUsize = AtomicUsize::new(1);

/// The slot of processor `index` (panics past [`MAX_CPUS`]).
pub fn cpu(index: usize) -> &'static PerCpu {
    &CPUS[index]
}

/// Number of processors online (the BSP included).
pub fn count() -> usize {
    CPU_COUNT.load(Ordering::Acquire)
}

/// Records the number of processors online.
pub fn set_count(n: usize) {
    CPU_COUNT.store(n.min(MAX_CPUS), Ordering::Release);
}

/// Index of the CPU running this code.
pub fn current_index() -> usize {
    let index: u32;
    // SAFETY: GS base points at this CPU's `PerCpu` (set by `install` before
    // any Rust code that can call this runs); `index` is its first field.
    unsafe {
        core::arch::asm!("mov {:e}, gs:[0]", out(reg) index, options(nostack, readonly, preserves_flags))
    }
    index as usize
}

/// The slot of the CPU running this code.
pub fn this() -> &'static PerCpu {
    cpu(current_index())
}

/// Points this CPU's GS base at slot `index` and stores the index there.
///
/// # Safety
/// Must be called once per CPU, with that CPU's own index, before anything
/// calls [`current_index`].
pub unsafe fn install(index: usize) {
    let slot = &CPUS[index];
    slot.index.store(index as u32, Ordering::Relaxed);
    // SAFETY: IA32_GS_BASE exists on every x86-64 CPU; the caller guarantees
    // that nothing relies on the previous value.
    unsafe { cpu::wrmsr(0xc000_0101, slot as *const PerCpu as u64) }
}

/// Zeroes the interrupt counters of the online CPUs (only slots that can
/// have counted: guest memory writes are slow under an emulating host).
pub fn reset_counters() {
    for slot in CPUS.iter().take(count()) {
        for c in slot.vector_count.iter() {
            c.store(0, Ordering::Relaxed);
        }
        slot.nmi_count.store(0, Ordering::Relaxed);
    }
    core::sync::atomic::fence(Ordering::SeqCst);
}
