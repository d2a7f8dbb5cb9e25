//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`: the prebuilt
//! `compiler_builtins` for linux-gnu does not export them. Written with
//! string instructions in asm so the compiler cannot turn them into calls to
//! themselves.

use core::arch::asm;

/// C `memcpy`.
///
/// Copies eight bytes per step (`rep movsq`) and the tail byte by byte: on
/// an emulating host each iteration of a string instruction costs about the
/// same whatever its width, so `rep movsq` is up to eight times faster than
/// `rep movsb`.
///
/// # Safety
/// `dst` and `src` valid for `n` bytes and not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; `rep movsq` then `rep movsb`
    // together move exactly `n` bytes forward; DF is clear in Rust code.
    unsafe {
        asm!("rep movsq", "mov rcx, {tail}", "rep movsb",
             tail = in(reg) n % 8,
             inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n / 8 => _,
             options(nostack, preserves_flags))
    }
    dst
}

/// C `memmove`.
///
/// # Safety
/// `dst` and `src` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or disjoint.
        unsafe { memcpy(dst, src, n) };
    } else {
        // SAFETY: backward copy with DF set, restored before returning.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 inout("rcx") n => _, options(nostack))
        }
    }
    dst
}

/// C `memset`.
///
/// Stores eight bytes per step (`rep stosq`) and the tail byte by byte.
///
/// # Safety
/// `dst` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    let pattern = u64::from(value as u8) * 0x0101_0101_0101_0101;
    // SAFETY: the caller guarantees the range; `rep stosq` then `rep stosb`
    // together store exactly `n` bytes forward (AL is the pattern's low byte).
    unsafe {
        asm!("rep stosq", "mov rcx, {tail}", "rep stosb",
             tail = in(reg) n % 8,
             inout("rdi") dst => _, inout("rcx") n / 8 => _, in("rax") pattern,
             options(nostack, preserves_flags))
    }
    dst
}

/// C `memcmp`.
///
/// # Safety
/// Both pointers valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees n readable bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// C `bcmp`.
///
/// # Safety
/// Both pointers valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
