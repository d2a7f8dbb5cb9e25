//! Pure models of the x86 interrupt controllers: IOAPIC, local APIC, the APIC
//! bus and MSI.
//!
//! No KVM, no libc, no threads, no clocks: time comes in as an argument and
//! every effect goes out as a return value.

#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed test, not a guest-reachable path.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod apic_bus;
pub mod apic_system;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod harness;
pub mod ioapic;
pub mod lapic;
pub mod mode;
pub mod msi;

pub use error::Error;
pub use mode::{Mode, UnknownMode};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
