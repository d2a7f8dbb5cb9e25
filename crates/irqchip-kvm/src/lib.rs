//! An x86 interrupt controller (IOAPIC and local APICs) for VMMs built on
//! KVM, in three modes:
//!
//! | [`Mode`] | IOAPIC | local APICs | how a pin reaches a vCPU |
//! |---|---|---|---|
//! | `kernel` | KVM's | KVM's | `KVM_IRQ_LINE` |
//! | `split` | ours (`irqchip::ioapic`) | KVM's | our IOAPIC -> MSI -> `KVM_SIGNAL_MSI`; EOIs come back as `KVM_EXIT_IOAPIC_EOI` |
//! | `user` | ours | ours (`irqchip::apic_system`) | our IOAPIC -> our APIC bus -> our LAPIC -> `KVM_INTERRUPT` |
//!
//! `kernel` is the reference; `split` and `user` run the pure models of the
//! `irqchip` crate and must behave like it (this project's guest suite
//! checks that in every mode).
//!
//! # What an embedding VMM does
//!
//! 1. Build the chip on a fresh VM, before creating vCPUs:
//!    [`Irqchip::builder`] (mode, vCPU count, x2APIC).
//! 2. Create each vCPU, give it the CPUID bits the chip supports
//!    ([`Irqchip::cpuid_features`], [`cpuid::apply`]) and take its
//!    per-vCPU part: [`Irqchip::vcpu`]. vCPU 0 is the bootstrap processor;
//!    the others wait for INIT/SIPI.
//! 3. Wire devices to lines: [`Irqchip::line`] hands out [`IrqLine`]s (a
//!    vm-superio `Trigger` and a [`LineSink`]); [`Irqchip::eventfd_line`]
//!    gives a line driven by an `EventFd`.
//! 4. Route the chip's MMIO windows ([`Irqchip::mmio_windows`]) to
//!    [`Irqchip::mmio_read`] / [`Irqchip::mmio_write`], and watch its
//!    timers ([`Irqchip::timer_fds`], [`Irqchip::on_timer`]).
//! 5. On each vCPU thread, loop on [`VcpuChip::run`]: it does the chip's
//!    work before and after `KVM_RUN`, handles the exits that belong to the
//!    chip, and returns the others.
//! 6. To stop: [`Irqchip::shutdown`], then join the vCPU threads.
//!
//! A timeline of what the chip does is one optional [`TraceSink`] away
//! ([`IrqchipBuilder::trace`], module [`trace`]); without it nothing is
//! recorded and nothing is paid.
//!
//! Host pin programming (a hypervisor deciding routes itself, as this
//! project's PV connect service does) is [`Irqchip::program_pin`].
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use irqchip_kvm::{Irqchip, Mode, Run};
//! use kvm_ioctls::{Kvm, VcpuExit};
//!
//! let kvm = Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! let chip = Irqchip::builder(Arc::clone(&vm), Mode::Split).cpus(1).build()?;
//! let mut fd = vm.create_vcpu(0)?;
//! let mut vcpu = chip.vcpu(0, &fd)?;
//! let serial_irq = chip.line(4).expect("pin 4 exists");
//! // ... load a guest, set registers and CPUID ...
//! loop {
//!     let exit = vcpu.run(&mut fd, |exit| match exit {
//!         VcpuExit::IoOut(0x3f8, data) => print!("{}", data[0] as char),
//!         VcpuExit::MmioWrite(addr, data) => {
//!             chip.mmio_write(addr, data);
//!         }
//!         _ => {}
//!     })?;
//!     if let Run::Stopped = exit {
//!         break;
//!     }
//! }
//! # let _ = serial_irq;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/minimal_vmm.rs` boots a whole guest with this API in 268
//! lines.
//!
//! # Threads and locks
//!
//! Everything is `Send + Sync`: lines are driven from any thread (vCPU
//! threads for port writes, an event loop for timers), each vCPU's part
//! lives on its thread. Line changes are applied before the call returns,
//! so a vCPU that raised a line sees the effect when it re-enters the
//! guest. A vCPU is kicked out of `KVM_RUN` with a signal ([`kick`]); the
//! chip installs its handler when it is built.

#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod backend;
mod chip;
pub mod cpuid;
#[cfg(feature = "fuzzing")]
pub mod differential;
mod error;
mod ioapic_host;
mod kernel;
pub mod kick;
mod lines;
pub mod ratelimit;
mod split;
pub mod startup;
mod timerfd;
pub mod trace;
mod user;
mod vcpu;

pub use backend::{IrqStats, ModelStats, StormSink};
pub use chip::{Irqchip, IrqchipBuilder, MmioWindow};
pub use error::{Error, IrqError};
pub use irqchip::{Mode, UnknownMode};
pub use lines::{EventFdLine, IrqLine, LineSink};
pub use trace::{TraceEvent, TraceSink};
pub use vcpu::{Run, VcpuChip, VcpuCounters};

/// Consecutive re-deliveries of a still-asserted level pin after EOI past
/// which our IOAPIC reports a storm (split and user modes; see
/// `irqchip::ioapic`, "Storm guard"), unless the builder sets another value
/// ([`IrqchipBuilder::storm_threshold`]).
///
/// The model's own default (10,000, where QEMU and KVM start throttling)
/// lets a storm run for 10,000 EOI round trips before anything is done; the
/// default here is 1,000, still about ten times the longest run of
/// legitimate re-deliveries this project's guest suites make (a level
/// device with 90 pending causes, one acknowledged per ISR call). The
/// README's host section has how long a storm lasts with each value.
pub const DEFAULT_STORM_THRESHOLD: u32 = 1_000;

// The guest-visible pin count (the ABI) is the model's.
const _: () = assert!(irqconnect_abi::layout::IOAPIC_PINS as usize == irqchip::ioapic::NUM_PINS);
