//! The one contract shared by the guest kernel and the VMM.
//!
//! Everything both sides must agree on lives here and nowhere else: I/O ports
//! and guest-physical addresses ([`layout`]), the fw_cfg keys ([`fw_cfg`]),
//! the interrupt-source test device's registers ([`testdev`]), the
//! message-signaled test device's registers ([`msidev`]), NTSTATUS values
//! ([`ntstatus`]) and the paravirtual connect interface ([`pv`]).
//!
//! The crate is `no_std`, has no `unsafe`, and every request type is
//! `#[repr(C)]` with explicit reserved fields, so it has no padding and can be
//! read from and written to guest memory as plain bytes with `zerocopy`.

#![no_std]
#![forbid(unsafe_code)]

pub mod fw_cfg;
pub mod layout;
pub mod msidev;
pub mod ntstatus;
pub mod pv;
pub mod snapshot;
pub mod testdev;
