//! SMP bring-up by INIT/SIPI and the per-CPU work mailboxes.
//!
//! Two rounds, so no AP spins while the others come up (every vCPU is
//! emulated on the host's few cores: spinning APs would slow the rest and
//! make bring-up quadratic in the processor count):
//!
//! 1. The BSP copies the real-mode trampoline to 0x8000 and broadcasts
//!    INIT, SIPI, SIPI (all excluding self). Each AP enters long mode,
//!    takes a ticket (its stack), reports its APIC ID and halts with
//!    interrupts off. The BSP waits while arrivals keep coming, then sorts
//!    the APIC IDs, so processor index = APIC ID order (BSP = 0).
//! 2. The BSP broadcasts INIT (every AP back to waiting for SIPI), resets
//!    the tickets, marks the APs released and broadcasts SIPI, SIPI. Each
//!    AP enters long mode again, finds its index, sets up its GS base,
//!    TSS, IDT and LAPIC and goes idle: `cli; check mailbox; sti; hlt`.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::interrupts::WAKE_VECTOR;
use crate::lapic::{self, Delivery, Dest};
use crate::percpu::{self, MAX_CPUS, WorkFn};
use crate::{boot, cpu, gdt, idt, time};

static ARRIVED: AtomicU32 = AtomicU32::new(0);
static ARRIVAL_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];
static RELEASED: AtomicBool = AtomicBool::new(false);

/// Starts the APs; `expected` counts the BSP. Returns the number of CPUs
/// online (BSP included).
pub fn start_aps(expected: usize) -> usize {
    let t0 = time::now_us();
    let expected = expected.clamp(1, MAX_CPUS);
    if expected > 1 {
        let (src, len) = boot::trampoline();
        // SAFETY: 0x8000.. (below 1 MiB, under 4 KiB) is free RAM that
        // nothing of the kernel uses; the trampoline is position-dependent on
        // exactly this address.
        unsafe { core::ptr::copy_nonoverlapping(src, boot::TRAMPOLINE_ADDR as *mut u8, len) };
        init_sipi_sipi();
        wait_while_progressing(|| ARRIVED.load(Ordering::Acquire) as usize, expected - 1);
    }
    let t_arrived = time::now_us();
    let arrived = (ARRIVED.load(Ordering::Acquire) as usize).min(MAX_CPUS - 1);
    let mut ids = [u32::MAX; MAX_CPUS];
    for (slot, id) in ids.iter_mut().zip(ARRIVAL_IDS.iter()).take(arrived) {
        *slot = id.load(Ordering::Acquire);
    }
    ids[..arrived].sort_unstable();
    for (i, id) in ids[..arrived].iter().enumerate() {
        let slot = percpu::cpu(i + 1);
        slot.apic_id.store(*id, Ordering::Relaxed);
        slot.index.store((i + 1) as u32, Ordering::Relaxed);
    }
    RELEASED.store(true, Ordering::Release);
    let total = arrived + 1;
    if arrived > 0 {
        // Round 2: INIT first puts every AP back to waiting for SIPI; only
        // then the tickets restart (a halted AP takes none).
        lapic::send_ipi(0, Delivery::Init, Dest::AllExcludingSelf);
        time::delay_us(INIT_DELAY_US);
        boot::reset_ap_tickets();
        start_up_twice();
    }
    wait_while_progressing(
        || {
            (1..total)
                .filter(|&i| percpu::cpu(i).online.load(Ordering::Acquire))
                .count()
        },
        total - 1,
    );
    let online = 1
        + (1..total)
            .filter(|&i| percpu::cpu(i).online.load(Ordering::Acquire))
            .count();
    percpu::set_count(online);
    BRING_UP_MS.store(
        ((((t_arrived - t0) / 1000) << 32) | ((time::now_us() - t_arrived) / 1000)) as usize,
        Ordering::Relaxed,
    );
    online
}

static BRING_UP_MS: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// How long the last bring-up took, in ms of guest time: until every AP
/// arrived, then until every one was online.
pub fn bring_up_ms() -> (u64, u64) {
    let v = BRING_UP_MS.load(Ordering::Relaxed) as u64;
    (v >> 32, v & 0xffff_ffff)
}

/// The wait after INIT before the first SIPI (SDM Vol. 3A 9.4.4.1's
/// universal start-up algorithm).
const INIT_DELAY_US: u64 = 10_000;
/// The wait between the two SIPIs.
const SIPI_DELAY_US: u64 = 200;

/// INIT, then SIPI twice, to every AP.
fn init_sipi_sipi() {
    lapic::send_ipi(0, Delivery::Init, Dest::AllExcludingSelf);
    time::delay_us(INIT_DELAY_US);
    start_up_twice();
}

/// SIPI twice to every AP (the trampoline's page as the vector): an AP
/// waiting for SIPI starts, one already started ignores the second.
fn start_up_twice() {
    let page = (boot::TRAMPOLINE_ADDR >> 12) as u8;
    lapic::send_ipi(page, Delivery::StartUp, Dest::AllExcludingSelf);
    time::delay_us(SIPI_DELAY_US);
    lapic::send_ipi(page, Delivery::StartUp, Dest::AllExcludingSelf);
}

/// How long the BSP waits for the next AP to arrive or come online before
/// it gives up on the rest: APs are emulated on the host's few cores, so
/// under host load they come slowly, but they keep coming.
const BRING_UP_STALL_US: u64 = 2_000_000;

/// Waits until `count()` reaches `want`, as long as it keeps growing: at
/// most [`BRING_UP_STALL_US`] without progress.
fn wait_while_progressing(count: impl Fn() -> usize, want: usize) {
    let mut seen = count();
    while seen < want {
        let grew = time::wait_until(BRING_UP_STALL_US, || count() != seen);
        let now = count();
        if !grew || now <= seen {
            return;
        }
        seen = now;
    }
}

/// Rust entry of an AP (from `ap_long_entry`, on its ticket's stack).
#[unsafe(no_mangle)]
extern "C" fn ap_main(ticket: u32) -> ! {
    let apic_id = cpu::cpuid_apic_id();
    if !RELEASED.load(Ordering::Acquire) {
        // Round 1: report, then halt until round 2's INIT.
        ARRIVAL_IDS[ticket as usize].store(apic_id, Ordering::Release);
        ARRIVED.fetch_add(1, Ordering::AcqRel);
        cpu::halt_forever();
    }
    let Some(index) =
        (1..MAX_CPUS).find(|&i| percpu::cpu(i).apic_id() == apic_id && percpu::cpu(i).index() == i)
    else {
        cpu::halt_forever();
    };
    // SAFETY: first thing this AP does with its own slot and index.
    unsafe { percpu::install(index) };
    // SAFETY: once, on this CPU, during its bring-up.
    unsafe { gdt::init_cpu(index) };
    idt::load();
    let me = percpu::this();
    let logical = lapic::init_cpu(index);
    me.logical_id.store(logical, Ordering::Relaxed);
    me.apic_id.store(lapic::id(), Ordering::Relaxed);
    me.online.store(true, Ordering::Release);
    idle()
}

/// The idle loop of an AP: run posted work, else sleep until an interrupt.
fn idle() -> ! {
    let me = percpu::this();
    loop {
        cpu::cli();
        if !me.mailbox.idle() {
            cpu::sti();
            me.mailbox.run_pending();
            continue;
        }
        cpu::sti_hlt();
    }
}

/// Posts `func(arg)` to CPU `cpu` (not the caller) and wakes it.
pub fn post(cpu: usize, func: WorkFn, arg: usize) -> Result<(), &'static str> {
    if cpu == 0 || cpu >= percpu::count() {
        return Err("post to a CPU that is not an online AP");
    }
    let slot = percpu::cpu(cpu);
    if !slot.mailbox.post(func, arg) {
        return Err("CPU still busy with a previous work item");
    }
    lapic::send_ipi(WAKE_VECTOR, Delivery::Fixed, Dest::Physical(slot.apic_id()));
    Ok(())
}

/// Waits up to `timeout_us` for CPU `cpu`'s work item; returns its result.
pub fn wait(cpu: usize, timeout_us: u64) -> Result<usize, &'static str> {
    let slot = percpu::cpu(cpu);
    if time::wait_until(timeout_us, || slot.mailbox.idle()) {
        slot.mailbox
            .result()
            .ok_or("timeout waiting for a work item")
    } else {
        Err("timeout waiting for a work item")
    }
}

/// Runs `func(arg)` on CPU `cpu` (0 = here) and returns its result.
pub fn run_on(cpu: usize, func: WorkFn, arg: usize) -> Result<usize, &'static str> {
    if cpu == 0 {
        return Ok(func(arg));
    }
    post(cpu, func, arg)?;
    wait(cpu, 2_000_000)
}

/// Sends INIT to AP `cpu` alone: it goes back to waiting for SIPI and is
/// marked offline (its slot, mailbox and counters stay). [`restart`]
/// starts it again.
pub fn init_one(cpu: usize) {
    let slot = percpu::cpu(cpu);
    slot.online.store(false, Ordering::Release);
    lapic::send_ipi(0, Delivery::Init, Dest::Physical(slot.apic_id()));
    time::delay_us(INIT_DELAY_US);
}

/// Starts AP `cpu`, waiting for SIPI after [`init_one`], with SIPI twice,
/// on the stack of ticket `ticket` (one no running AP uses); it sets itself
/// up as at boot and goes idle. Returns whether it came online within
/// `timeout_us`.
pub fn restart(cpu: usize, ticket: u32, timeout_us: u64) -> bool {
    let slot = percpu::cpu(cpu);
    boot::set_ap_ticket(ticket);
    let page = (boot::TRAMPOLINE_ADDR >> 12) as u8;
    lapic::send_ipi(page, Delivery::StartUp, Dest::Physical(slot.apic_id()));
    time::delay_us(SIPI_DELAY_US);
    lapic::send_ipi(page, Delivery::StartUp, Dest::Physical(slot.apic_id()));
    time::wait_until(timeout_us, || slot.online.load(Ordering::Acquire))
}
