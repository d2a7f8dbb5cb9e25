//! The byte reader every interpreter decodes its input with.

/// Reads little-endian values off the front of a fuzz input. Missing bytes
/// read as 0, so every byte string decodes to some operation stream.
pub(crate) struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    /// A reader over `data`.
    pub(crate) const fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    /// Whether the input is used up.
    pub(crate) const fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next `N` bytes, zero-padded.
    pub(crate) fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let take = self.0.len().min(N);
        let (head, tail) = self.0.split_at(take);
        for (dst, src) in out.iter_mut().zip(head) {
            *dst = *src;
        }
        self.0 = tail;
        out
    }

    pub(crate) fn u8(&mut self) -> u8 {
        u8::from_le_bytes(self.bytes())
    }

    pub(crate) fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    /// One of `choices`, picked by the next byte.
    pub(crate) fn pick<T: Copy>(&mut self, choices: &[T]) -> Option<T> {
        let len = choices.len().max(1);
        choices.get(usize::from(self.u8()) % len).copied()
    }

    /// An access width in bytes, 0..=8 (all widths, legal or not).
    pub(crate) fn width(&mut self) -> usize {
        usize::from(self.u8() % 9)
    }
}
