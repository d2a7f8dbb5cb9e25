//! Integer formatting that never reaches `core`'s integer `Display`/`Debug`.
//!
//! Guest code here runs under an instruction emulator that lacks most SSE
//! instructions (`movd`, `pinsrw`, `pxor`, `pcmpeqd`, ... fault with a KVM
//! emulation error). Our crate is built with SSE off, but the prebuilt
//! `core` is not: its decimal integer formatting uses `movd`/`pinsrw` for
//! values of 1000 and more, and its width/precision padding counts chars with
//! SSE. So every integer printed goes through [`Dec`]/[`Hex`], which only
//! call `write_str`, and format strings use no width, precision or `#`.

use core::fmt;

/// Integers that [`dec`] and [`hex`] accept.
pub trait Num: Copy {
    /// The value widened to u64.
    fn widen(self) -> u64;
}

macro_rules! num {
    ($($t:ty),*) => { $(impl Num for $t { fn widen(self) -> u64 { self as u64 } })* };
}
num!(u8, u16, u32, u64, usize, bool);

/// Decimal.
#[derive(Clone, Copy)]
pub struct Dec(pub u64);

/// Hexadecimal with a `0x` prefix.
#[derive(Clone, Copy)]
pub struct Hex(pub u64);

/// `x` in decimal.
pub fn dec(x: impl Num) -> Dec {
    Dec(x.widen())
}

/// `x` in hexadecimal, `0x`-prefixed.
pub fn hex(x: impl Num) -> Hex {
    Hex(x.widen())
}

fn digits(mut v: u64, radix: u64, buf: &mut [u8; 24]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        let d = (v % radix) as u8;
        buf[i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        v /= radix;
        if v == 0 {
            break;
        }
    }
    core::str::from_utf8(&buf[i..]).unwrap_or("?")
}

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 24];
        f.write_str(digits(self.0, 10, &mut buf))
    }
}

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 24];
        f.write_str("0x")?;
        f.write_str(digits(self.0, 16, &mut buf))
    }
}

/// A list of CPU indices, as `{1,2}`.
pub struct Set<'a>(pub &'a [usize]);

impl fmt::Display for Set<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            Dec(*c as u64).fmt(f)?;
        }
        f.write_str("}")
    }
}

/// A list of vectors, as `[0xe3,0xd3]`.
pub struct Vectors<'a>(pub &'a [u32]);

impl fmt::Display for Vectors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            Hex(u64::from(*v)).fmt(f)?;
        }
        f.write_str("]")
    }
}
