//! The byte reader every interpreter decodes its input with (this crate's,
//! and the VMM's device-layer harness).

/// Reads little-endian values off the front of a fuzz input. Missing bytes
/// read as 0, so every byte string decodes to some operation stream.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub const fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    /// Whether the input is used up.
    pub const fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next `N` bytes, zero-padded.
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let take = self.0.len().min(N);
        let (head, tail) = self.0.split_at(take);
        for (dst, src) in out.iter_mut().zip(head) {
            *dst = *src;
        }
        self.0 = tail;
        out
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        u8::from_le_bytes(self.bytes())
    }

    /// The next byte's bit 0.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    /// The next eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    /// One of `choices`, picked by the next byte.
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> Option<T> {
        let len = choices.len().max(1);
        choices.get(usize::from(self.u8()) % len).copied()
    }

    /// An access width in bytes, 0..=8 (all widths, legal or not).
    pub fn width(&mut self) -> usize {
        usize::from(self.u8() % 9)
    }
}
