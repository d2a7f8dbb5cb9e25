//! Host-side paravirtual IoConnectInterrupt service.
//!
//! The VMM plays PnP manager and kernel: it owns a [`Service`] built from
//! platform facts ([`platform`]) and a device table ([`devices`]), and on
//! every doorbell write calls [`Service::handle_doorbell`] with its guest
//! memory ([`ram::GuestRam`]). The service decodes the request block
//! ([`request`]), checks `docs/semantics.md`'s rules in order ([`validate`]
//! for CONNECT, [`connect_ex`] for IoConnectInterruptEx), keeps the
//! interrupt objects per (processor, vector) ([`registry`]), decides how
//! each IOAPIC pin is programmed ([`route`]) and each message-signaled
//! interrupt is addressed ([`messages`]), and answers in the block. Route
//! and message changes come back as values ([`route::RouteUpdate`],
//! [`messages::MessageUpdate`]) for the VMM to apply to whichever irqchip
//! and devices are active; nothing on the per-interrupt path consults the
//! service.
//!
//! Pure: no KVM, no libc, no threads, no clocks. A guest's mistake is an
//! NTSTATUS answer; only host configuration mistakes are [`Error`]s.

#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed test, not a guest-reachable path.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod connect_ex;
pub mod destination;
pub mod devices;
pub mod error;
pub mod handle;
#[cfg(feature = "fuzzing")]
pub mod harness;
pub mod messages;
pub mod platform;
pub mod processors;
pub mod ram;
pub mod registry;
pub mod request;
pub mod retarget;
pub mod route;
pub mod service;
pub mod validate;

pub use destination::{ApicDestination, ApicModel, Topology};
pub use devices::{DeviceTable, InterruptMode, ShareDisposition};
pub use error::Error;
pub use handle::Handle;
pub use messages::{MessageRoute, MessageUpdate};
pub use platform::{Platform, PlatformFacts};
pub use processors::ProcessorSet;
pub use ram::{FlatRam, GuestRam};
pub use request::Outcome;
pub use route::{PinRoute, RouteUpdate};
pub use service::{Service, ServiceConfig, ServiceState};
pub use validate::{ConnectRequest, Violation};

// The ABI's pin count (what the guest and the device table see) is the
// IOAPIC model's: one fact, checked where both are in scope.
const _: () = assert!(irqconnect_abi::layout::IOAPIC_PINS as usize == irqchip::ioapic::NUM_PINS);
