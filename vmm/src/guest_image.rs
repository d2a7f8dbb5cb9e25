//! The guest test kernel built by `build.rs` from `guest-tests/`.

static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-kernel.bin"));

/// The embedded image.
pub(crate) fn embedded() -> &'static [u8] {
    IMAGE
}
