//! A set of the 256 interrupt vectors: the shape of the IRR, ISR and TMR (SDM
//! Vol. 3A 11.8.4, Figure 11-20), stored as four 64-bit words for fast
//! highest-bit search.

/// One bit per vector, vector `v` at bit `v % 64` of word `v / 64`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct VectorSet(pub(super) [u64; 4]);

impl VectorSet {
    /// The empty set.
    pub(crate) const EMPTY: Self = Self([0; 4]);

    /// Word index and bit of vector `v`: the index is at most 3 for any `u8`.
    const fn locate(v: u8) -> (usize, u64) {
        ((v >> 6) as usize, 1 << (v & 63))
    }

    /// Adds `v`.
    pub(crate) fn set(&mut self, v: u8) {
        let (word, bit) = Self::locate(v);
        self.0[word] |= bit;
    }

    /// Removes `v`.
    pub(crate) fn clear(&mut self, v: u8) {
        let (word, bit) = Self::locate(v);
        self.0[word] &= !bit;
    }

    /// Whether `v` is in the set.
    pub(crate) const fn contains(&self, v: u8) -> bool {
        let (word, bit) = Self::locate(v);
        self.0[word] & bit != 0
    }

    /// The highest vector in the set.
    pub(crate) const fn highest(&self) -> Option<u8> {
        let mut word = 4;
        while word > 0 {
            word -= 1;
            let bits = self.0[word];
            if bits != 0 {
                return Some((word as u8) * 64 + (63 - bits.leading_zeros() as u8));
            }
        }
        None
    }

    /// The 32-bit register `n` (0..8) of the xAPIC view: vectors `32n..32n+31`
    /// (SDM Vol. 3A 11.8.4, Figure 11-20). Returns 0 for `n >= 8`.
    pub(crate) fn register(&self, n: u8) -> u32 {
        let word = usize::from(n / 2);
        let shift = u32::from(n % 2) * 32;
        self.0.get(word).map_or(0, |w| (w >> shift) as u32)
    }

    /// Replaces register `n` (0..8); does nothing for `n >= 8`.
    pub(crate) fn set_register(&mut self, n: u8, value: u32) {
        let word = usize::from(n / 2);
        let shift = u32::from(n % 2) * 32;
        if let Some(w) = self.0.get_mut(word) {
            *w = (*w & !(0xffff_ffff_u64 << shift)) | (u64::from(value) << shift);
        }
    }

    /// The eight 32-bit registers, register 0 first.
    pub(crate) fn to_registers(self) -> [u32; 8] {
        let mut out = [0; 8];
        for (n, slot) in (0u8..).zip(out.iter_mut()) {
            *slot = self.register(n);
        }
        out
    }

    /// Builds a set from eight 32-bit registers, register 0 first.
    pub(crate) fn from_registers(regs: [u32; 8]) -> Self {
        let mut set = Self::EMPTY;
        for (n, value) in (0u8..).zip(regs) {
            set.set_register(n, value);
        }
        set
    }

    /// Whether every vector of `self` is in `other`.
    #[cfg(test)]
    pub(crate) fn is_subset(&self, other: &Self) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & !b == 0)
    }

    /// The vectors in `self` below 16 (the architecturally illegal ones).
    #[cfg(test)]
    pub(crate) const fn illegal_bits(&self) -> u64 {
        self.0[0] & 0xffff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_three_vectors_returns_largest() {
        // Arrange
        let mut set = VectorSet::EMPTY;
        set.set(0x31);
        set.set(0xe0);
        set.set(0x7f);
        // Act
        let highest = set.highest();
        // Assert
        assert_eq!(highest, Some(0xe0));
    }

    #[test]
    fn register_vector_0x45_lands_in_register_2_bit_5() {
        // Arrange
        let mut set = VectorSet::EMPTY;
        set.set(0x45);
        // Act
        let regs = set.to_registers();
        // Assert
        assert_eq!(regs, [0, 0, 1 << 5, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn from_registers_round_trip_is_exact() {
        // Arrange
        let regs = [1, 2, 3, 0xffff_ffff, 5, 6, 7, 0x8000_0000];
        // Act
        let back = VectorSet::from_registers(regs).to_registers();
        // Assert
        assert_eq!(back, regs);
    }
}
