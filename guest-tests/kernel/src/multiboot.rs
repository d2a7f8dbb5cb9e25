//! Multiboot v1 boot information: the command line, copied into the kernel
//! before anything can overwrite it.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// EAX value a Multiboot v1 loader passes.
pub const BOOT_MAGIC: u32 = 0x2bad_b002;
const INFO_FLAG_CMDLINE: u32 = 1 << 2;
const CMDLINE_MAX: usize = 1024;

struct Cmdline(UnsafeCell<[u8; CMDLINE_MAX]>);

// SAFETY: written once by the BSP in `init` before any other CPU runs or any
// reader exists; read-only afterwards.
unsafe impl Sync for Cmdline {}

static CMDLINE: Cmdline = Cmdline(UnsafeCell::new([0; CMDLINE_MAX]));
static CMDLINE_LEN: AtomicUsize = AtomicUsize::new(0);

/// Copies the command line out of the boot information.
///
/// # Safety
/// `info` must be the physical (= virtual) address the loader passed in EBX
/// together with [`BOOT_MAGIC`], and no other CPU may run yet.
pub unsafe fn init(info: u32) {
    let info = info as usize as *const u32;
    // SAFETY: the loader's info block is readable (identity-mapped RAM).
    let flags = unsafe { core::ptr::read_volatile(info) };
    if flags & INFO_FLAG_CMDLINE == 0 {
        return;
    }
    // SAFETY: as above; offset 16 is `cmdline`.
    let src = unsafe { core::ptr::read_volatile(info.add(4)) } as usize as *const u8;
    let dst = CMDLINE.0.get();
    let mut len = 0;
    while len < CMDLINE_MAX {
        // SAFETY: a NUL-terminated string in RAM; we stop at NUL or the cap.
        let b = unsafe { core::ptr::read_volatile(src.add(len)) };
        if b == 0 {
            break;
        }
        // SAFETY: len < CMDLINE_MAX; single writer (see `Sync`).
        unsafe { (*dst)[len] = b };
        len += 1;
    }
    CMDLINE_LEN.store(len, Ordering::Release);
}

/// The command line ("" when none, or when it is not UTF-8).
pub fn cmdline() -> &'static str {
    let len = CMDLINE_LEN.load(Ordering::Acquire);
    // SAFETY: the buffer is immutable once `init` published `len`.
    let bytes = unsafe { &(&*CMDLINE.0.get())[..len] };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// The value of the first `key=value` token of the command line.
pub fn option(key: &str) -> Option<&'static str> {
    cmdline().split_ascii_whitespace().find_map(|token| {
        let (k, v) = token.split_once('=')?;
        (k == key).then_some(v)
    })
}
