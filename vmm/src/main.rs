//! `vmm`: boots a Multiboot v1 guest under KVM with our interrupt
//! controllers; by default the guest test suite built from `guest-tests/`
//! and embedded here. Everything but the embedding is the `vmm` library.

use std::process::ExitCode;

fn main() -> ExitCode {
    vmm::main(guest_image::IMAGE)
}
