//! What the suites share: counters, bounded waits, CPU-set helpers, the pins
//! and vectors they may use.
//!
//! Pins: IOAPIC pins 1..15 only (16..23 are for PV devices), chosen where
//! neither our VMM nor QEMU's PC models put a device (COM1 is pin 4).
//! Vectors: 0x30..0x5F for IOAPIC tests, 0xC0..0xFD for IPIs and timers
//! (0xFE is the kernel's wake IPI, 0xFF the spurious vector).

use core::sync::atomic::{AtomicBool, Ordering};

use crate::lapic::{self, Delivery, Dest};
use crate::runner::{Failure, TestResult};
use crate::{cpu, fail, interrupts, multiboot, percpu, skip, time};

/// Test pin A (edge tests).
pub const PIN_A: u8 = 3;
/// Test pin B (level tests).
pub const PIN_B: u8 = 5;
/// Test pin C.
pub const PIN_C: u8 = 10;

/// How long a test waits for an expected interrupt.
pub const TIMEOUT_US: u64 = 500_000;
/// How long a test waits before asserting that nothing (more) arrived.
pub const SETTLE_US: u64 = 2_000;

/// Interrupts counted on `vector` by CPU `cpu`.
pub fn count(cpu: usize, vector: u8) -> u32 {
    percpu::cpu(cpu).count(vector)
}

/// Interrupts counted on `vector` by all CPUs.
pub fn total(vector: u8) -> u32 {
    (0..percpu::count()).map(|c| count(c, vector)).sum()
}

/// Waits until CPU `cpu` counted at least `n` interrupts on `vector`.
pub fn wait_count(cpu: usize, vector: u8, n: u32) -> TestResult {
    if time::wait_until(TIMEOUT_US, || count(cpu, vector) >= n) {
        Ok(())
    } else {
        fail!(
            "timeout: cpu {} took {} interrupts on vector {}, expected {}",
            crate::display::dec(cpu),
            crate::display::dec(count(cpu, vector)),
            crate::display::hex(vector),
            crate::display::dec(n)
        )
    }
}

/// Waits until all CPUs together counted at least `n` interrupts on `vector`.
pub fn wait_total(vector: u8, n: u32) -> TestResult {
    if time::wait_until(TIMEOUT_US, || total(vector) >= n) {
        Ok(())
    } else {
        fail!(
            "timeout: {} interrupts on vector {}, expected {}",
            crate::display::dec(total(vector)),
            crate::display::hex(vector),
            crate::display::dec(n)
        )
    }
}

/// Lets stragglers arrive before a "nothing more" assertion.
pub fn settle() {
    time::delay_us(SETTLE_US);
}

/// Checks that every CPU counted exactly `expected(cpu)` on `vector`.
pub fn expect_counts(vector: u8, expected: impl Fn(usize) -> u32) -> TestResult {
    for c in 0..percpu::count() {
        let (got, want) = (count(c, vector), expected(c));
        if got != want {
            fail!(
                "cpu {} took {} interrupts on vector {}, expected {}",
                crate::display::dec(c),
                crate::display::dec(got),
                crate::display::hex(vector),
                crate::display::dec(want)
            );
        }
    }
    Ok(())
}

/// Skips unless at least `n` CPUs are online.
pub fn need_cpus(n: usize) -> TestResult {
    if percpu::count() < n {
        skip!(
            "needs {} CPUs, {} online",
            crate::display::dec(n),
            crate::display::dec(percpu::count())
        );
    }
    Ok(())
}

/// APIC ID of CPU `cpu`.
pub fn apic_id(cpu: usize) -> u32 {
    percpu::cpu(cpu).apic_id()
}

/// A destination set for "logical set" tests: CPUs {1, 2} with 3 or more
/// CPUs online, else {0, 1}. Needs 2 CPUs.
pub fn target_set() -> Result<&'static [usize], Failure> {
    need_cpus(2)?;
    Ok(if percpu::count() >= 3 {
        &[1, 2]
    } else {
        &[0, 1]
    })
}

/// The logical destination naming exactly `cpus` (OR of their logical IDs;
/// in x2APIC and in the xAPIC cluster model they must share a cluster).
pub fn logical_dest(cpus: &[usize]) -> Result<u32, Failure> {
    let mut dest = 0u32;
    let cluster_shift = if lapic::xapic_cluster() { 4 } else { 16 };
    for &c in cpus {
        let id = percpu::cpu(c).logical_id();
        let member = if lapic::xapic_cluster() {
            id & 0xf
        } else {
            id & 0xffff
        };
        if member == 0 {
            skip!(
                "cpu {} has no usable logical ID ({})",
                crate::display::dec(c),
                crate::display::hex(id)
            );
        }
        if dest != 0 && (dest >> cluster_shift) != (id >> cluster_shift) {
            skip!(
                "cpus {} are in different logical clusters",
                crate::display::Set(cpus)
            );
        }
        dest |= id;
    }
    Ok(dest)
}

/// The 8-bit IOAPIC logical destination naming exactly `cpus`.
pub fn ioapic_logical_dest(cpus: &[usize]) -> Result<u8, Failure> {
    let dest = logical_dest(cpus)?;
    if dest > 0xff {
        skip!(
            "logical destination {} does not fit the IOAPIC's 8-bit field",
            crate::display::hex(dest)
        );
    }
    Ok(dest as u8)
}

/// True when `cpu` is in `set`.
pub fn in_set(set: &[usize], cpu: usize) -> bool {
    set.contains(&cpu)
}

static ISR_HELD: AtomicBool = AtomicBool::new(true);
static ISR_PROBE: AtomicBool = AtomicBool::new(false);
const PROBE_VECTOR: u8 = 0xfd;

fn isr_probe(vector: u8) {
    ISR_PROBE.store(lapic::in_service(vector), Ordering::Relaxed);
}

/// Checks once, at boot, that the local APIC holds a delivered interrupt's
/// ISR bit until EOI (SDM 11.8.4). Some hosts' KVM does not (the top-level
/// README's "Host KVM quirks"): it acks and EOIs at injection, so the ISR
/// and PPR read 0 inside handlers, a lower vector preempts an un-EOI'd
/// higher one, and a level pin still asserted at injection is delivered
/// again at once. Returns the result
/// and records it for [`need_isr_held`].
pub fn probe_isr_held() -> bool {
    interrupts::set_handler(PROBE_VECTOR, Some(isr_probe));
    lapic::send_ipi(PROBE_VECTOR, Delivery::Fixed, Dest::SelfOnly);
    cpu::sti();
    time::wait_until(TIMEOUT_US, || count(0, PROBE_VECTOR) >= 1);
    cpu::cli();
    interrupts::set_handler(PROBE_VECTOR, None);
    let held = ISR_PROBE.load(Ordering::Relaxed);
    ISR_HELD.store(held, Ordering::Relaxed);
    held
}

/// What the boot probe found: the local APIC holds ISR until EOI.
pub fn isr_held() -> bool {
    ISR_HELD.load(Ordering::Relaxed)
}

/// Skips a test that needs the ISR held until EOI when the boot probe found
/// a host that does not (unless the command line says `strict=1`).
pub fn need_isr_held() -> TestResult {
    if !ISR_HELD.load(Ordering::Relaxed) && multiboot::option("strict") != Some("1") {
        skip!(
            "host LAPIC does not hold ISR until EOI (acks and EOIs at injection; boot probe), EOI semantics not observable"
        );
    }
    Ok(())
}

/// The lowest vector (other than `except`) that CPU `cpu` counted, for
/// failure messages that want to say where an interrupt went instead.
pub fn stray_vector(cpu: usize, except: u8) -> Option<u8> {
    (0x20..=0xfeu8).find(|&v| v != except && count(cpu, v) != 0)
}
