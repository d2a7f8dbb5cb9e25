//! `vmm`: boots a guest under KVM with our interrupt controllers.

fn main() {}
