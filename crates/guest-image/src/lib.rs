//! The guest test kernel, embedded.
//!
//! `build.rs` builds `guest-tests/` (its own cargo workspace, bare-metal
//! flags) and this crate embeds the resulting Multiboot v1 image, so any
//! host binary, test or example can boot the guest suite without a separate
//! build step: `vmm` does, and so does `irqchip-kvm`'s `minimal_vmm`
//! example.
//!
//! The image is an ELF whose load segment starts at 1 MiB with the
//! Multiboot header (a.out kludge: header, load, load-end, bss-end and entry
//! addresses) in its first 8 KiB, so a loader needs only the header
//! (`guest-tests/README.md`, "Build").

#![forbid(unsafe_code)]

/// The guest kernel image (Multiboot v1, ELF32 with the a.out kludge).
///
/// # Example
///
/// ```
/// let image = guest_image::IMAGE;
/// // The Multiboot v1 header magic sits 4-byte aligned in the first 8 KiB.
/// let magic = 0x1bad_b002u32.to_le_bytes();
/// assert!(image[..8192].chunks_exact(4).any(|w| w == magic));
/// ```
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-kernel.bin"));

/// The rule every test that boots a guest under KVM follows: `true` when
/// `/dev/kvm` exists; without it, `false` (skip) if `VMM_SKIP_KVM_TESTS=1`
/// asks to skip explicitly, else a panic that fails the test with a clear
/// message.
///
/// # Panics
///
/// `/dev/kvm` is missing and `VMM_SKIP_KVM_TESTS` is not `1`.
pub fn require_kvm() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("VMM_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: /dev/kvm is missing and VMM_SKIP_KVM_TESTS=1");
        return false;
    }
    panic!(
        "/dev/kvm is missing: these tests boot guests under KVM. \
         Set VMM_SKIP_KVM_TESTS=1 to skip them explicitly."
    );
}
