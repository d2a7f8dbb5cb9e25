//! Bare-metal x86-64 guest kernel: boots by Multiboot v1 (a.out kludge) in
//! 32-bit mode, enters long mode itself, starts the APs by INIT/SIPI and runs
//! interrupt-controller test suites, reporting on COM1 and through the exit
//! port (see README.md).

#![no_std]
#![no_main]
// The driver API (APIC, IOAPIC, IRQL, locks) is wider than what the first
// suites call; later suites (PV connect, wdm) use the rest.
#![allow(dead_code)]

mod boot;
mod cpu;
mod display;
mod fw_cfg;
mod gdt;
mod idt;
mod interrupts;
mod ioapic;
mod irql;
mod lapic;
mod lines;
mod mem;
mod msidev;
mod multiboot;
mod percpu;
mod pic;
mod pv;
mod runner;
mod serial;
mod smp;
mod snapshot;
mod spinlock;
mod testdev;
mod tests;
mod time;
mod wdm;

use core::sync::atomic::Ordering;

/// Rust entry of the BSP, called from `long_entry` with the Multiboot
/// registers (EAX, EBX).
#[unsafe(no_mangle)]
extern "C" fn kernel_main(magic: u32, info: u32) -> ! {
    // SAFETY: first thing on the BSP: slot 0 is the BSP's.
    unsafe { percpu::install(0) };
    serial::init();
    if magic == multiboot::BOOT_MAGIC {
        // SAFETY: `info` came with the Multiboot magic; no AP runs yet.
        unsafe { multiboot::init(info) };
    }
    // SAFETY: once, on the BSP, during bring-up.
    unsafe { gdt::init_cpu(0) };
    idt::init();
    idt::load();
    pic::disable();
    ioapic::mask_all();

    lapic::choose_mode(multiboot::option("x2apic") != Some("off"));
    let fw_cpus = fw_cfg::cpu_count();
    let wanted = usize::from(fw_cpus.unwrap_or(1)).max(1);
    lapic::choose_logical_model(wanted);
    let bsp = percpu::cpu(0);
    bsp.logical_id.store(lapic::init_cpu(0), Ordering::Relaxed);
    bsp.apic_id.store(lapic::id(), Ordering::Relaxed);
    bsp.online.store(true, Ordering::Release);
    let tsc_per_us = time::calibrate();

    let ram = fw_cfg::ram_size();
    let online = smp::start_aps(wanted);
    tests::set_expected_cpus(wanted);

    if pv::present() {
        let status = wdm::declare_apic_model();
        if status != irqconnect_abi::ntstatus::STATUS_SUCCESS {
            println!(
                "# wdm: SET_APIC_MODEL answered {}",
                irqconnect_abi::ntstatus::status_name(status)
            );
        }
    }
    let (arrive_ms, online_ms) = smp::bring_up_ms();
    println!(
        "# smp: {} APs arrived in {} ms, online {} ms later",
        crate::display::dec(online - 1),
        crate::display::dec(arrive_ms),
        crate::display::dec(online_ms)
    );
    let isr_held = tests::fixture::probe_isr_held();
    percpu::reset_counters();
    println!(
        "# guest-kernel: {} of {} cpus online, {} mode, ioapic version {}, ram {} MiB, tsc {} MHz, ISR held until EOI: {}, cmdline \"{}\"",
        crate::display::dec(online),
        crate::display::dec(wanted),
        if lapic::x2apic() {
            "x2apic"
        } else if lapic::xapic_cluster() {
            "xapic cluster"
        } else {
            "xapic"
        },
        crate::display::hex(ioapic::version()),
        crate::display::dec(ram.unwrap_or(0) >> 20),
        crate::display::dec(tsc_per_us),
        if isr_held { "yes" } else { "NO" },
        multiboot::cmdline()
    );
    match multiboot::option("fault") {
        // Exercise the fatal-exception report (for the VMM's own tests).
        // SAFETY: `ud2` only raises #UD, whose handler ends the run.
        Some("ud") => unsafe { core::arch::asm!("ud2") },
        Some("pf") => {
            // SAFETY: reads an unmapped address (past the 4 GiB identity
            // map) on purpose; the #PF handler ends the run.
            unsafe { core::ptr::read_volatile(0x1_0000_0000 as *const u64) };
        }
        _ => {}
    }
    cpu::sti();
    runner::run(tests::SUITES, multiboot::option("tests"))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    runner::fatal(format_args!(
        "panic on cpu {}: {}",
        crate::display::dec(percpu::current_index()),
        info
    ))
}

/// Referenced by the unwind tables of the prebuilt `core` (built with
/// `panic=unwind`); never called, since this kernel aborts on panic.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
