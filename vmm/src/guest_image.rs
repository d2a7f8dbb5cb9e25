//! The guest test kernel built by `build.rs` from `guest-tests/`.
//!
//! Empty while `guest-tests/` does not exist yet; `vmm` without `--kernel`
//! then says "no embedded guest image".

static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-kernel.bin"));

/// The embedded image (possibly empty).
pub(crate) fn embedded() -> &'static [u8] {
    IMAGE
}
