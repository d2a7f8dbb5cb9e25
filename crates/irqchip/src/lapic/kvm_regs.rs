//! KVM.
