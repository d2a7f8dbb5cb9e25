//! Sets of processors of the whole platform, and processor groups.
//!
//! A `KAFFINITY` names 64 processors; Windows numbers the processors of a
//! larger machine in groups of 64 and names a set of them with a
//! `GROUP_AFFINITY` (a group and a 64-bit mask). The PV interface does the
//! same (`irqconnect_abi::pv::GROUP_SIZE`): processor `64 * g + b` is bit
//! `b` of group `g`. A [`ProcessorSet`] holds processors of every group
//! (up to `PLATFORM_MAX_CPUS`), so the unions of a vector's connections and
//! the destination chooser need no group arithmetic.

use core::ops::{BitAnd, BitAndAssign, BitOr, BitOrAssign, Not, Sub};

use irqconnect_abi::pv::{GROUP_SIZE, MAX_GROUPS};
use serde::{Deserialize, Serialize};

/// A set of processors (bit `i` of word `i / 64` = processor `i`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessorSet([u64; MAX_GROUPS]);

impl ProcessorSet {
    /// No processor.
    pub const EMPTY: Self = Self([0; MAX_GROUPS]);

    /// The processors of `mask` in `group`; empty for a group past
    /// [`MAX_GROUPS`].
    pub fn of_group(group: u16, mask: u64) -> Self {
        let mut set = Self::EMPTY;
        if let Some(word) = set.0.get_mut(usize::from(group)) {
            *word = mask;
        }
        set
    }

    /// Processors `0..count` (saturating at the set's size).
    pub fn first_n(count: u32) -> Self {
        let mut set = Self::EMPTY;
        for (g, word) in set.0.iter_mut().enumerate() {
            let below = (count as usize).saturating_sub(g * GROUP_SIZE);
            *word = match below {
                0 => 0,
                n if n >= GROUP_SIZE => u64::MAX,
                n => (1u64 << n) - 1,
            };
        }
        set
    }

    /// The set holding only `processor` (empty past the set's size).
    pub fn single(processor: u32) -> Self {
        let mut set = Self::EMPTY;
        set.insert(processor);
        set
    }

    /// Group `group`'s 64-bit mask (0 for a group past [`MAX_GROUPS`]).
    pub fn group_mask(&self, group: u16) -> u64 {
        self.0.get(usize::from(group)).copied().unwrap_or(0)
    }

    /// The one group holding every processor of the set, with its mask;
    /// `None` for an empty set or one spanning groups.
    pub fn as_group_affinity(&self) -> Option<(u16, u64)> {
        let mut found = None;
        for (g, &word) in self.0.iter().enumerate() {
            if word != 0 {
                if found.is_some() {
                    return None;
                }
                found = Some((g as u16, word));
            }
        }
        found
    }

    /// Adds `processor`; false when it lies past the set's size.
    pub fn insert(&mut self, processor: u32) -> bool {
        let (word, bit) = split(processor);
        match self.0.get_mut(word) {
            Some(w) => {
                *w |= 1 << bit;
                true
            }
            None => false,
        }
    }

    /// Removes `processor`.
    pub fn remove(&mut self, processor: u32) {
        let (word, bit) = split(processor);
        if let Some(w) = self.0.get_mut(word) {
            *w &= !(1 << bit);
        }
    }

    /// Whether `processor` is in the set.
    pub fn contains(&self, processor: u32) -> bool {
        let (word, bit) = split(processor);
        self.0.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// True for the empty set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Processors in the set.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// True when every processor of the set is in `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & !b == 0)
    }

    /// The lowest processor.
    pub fn first(&self) -> Option<u32> {
        self.0
            .iter()
            .enumerate()
            .find(|(_, w)| **w != 0)
            .map(|(g, w)| (g * GROUP_SIZE) as u32 + w.trailing_zeros())
    }

    /// The highest processor.
    pub fn last(&self) -> Option<u32> {
        self.0
            .iter()
            .enumerate()
            .rev()
            .find(|(_, w)| **w != 0)
            .map(|(g, w)| (g * GROUP_SIZE) as u32 + 63 - w.leading_zeros())
    }

    /// The processors in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(g, &word)| {
            let base = (g * GROUP_SIZE) as u32;
            Bits(word).map(move |b| base + b)
        })
    }

    /// The words, group 0 first.
    pub fn words(&self) -> &[u64; MAX_GROUPS] {
        &self.0
    }
}

/// The bits of a word, lowest first.
struct Bits(u64);

impl Iterator for Bits {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

fn split(processor: u32) -> (usize, u32) {
    (
        processor as usize / GROUP_SIZE,
        processor % GROUP_SIZE as u32,
    )
}

impl BitOr for ProcessorSet {
    type Output = Self;

    fn bitor(mut self, rhs: Self) -> Self {
        self |= rhs;
        self
    }
}

impl BitOrAssign for ProcessorSet {
    fn bitor_assign(&mut self, rhs: Self) {
        for (a, b) in self.0.iter_mut().zip(rhs.0) {
            *a |= b;
        }
    }
}

impl BitAnd for ProcessorSet {
    type Output = Self;

    fn bitand(mut self, rhs: Self) -> Self {
        self &= rhs;
        self
    }
}

impl BitAndAssign for ProcessorSet {
    fn bitand_assign(&mut self, rhs: Self) {
        for (a, b) in self.0.iter_mut().zip(rhs.0) {
            *a &= b;
        }
    }
}

impl Sub for ProcessorSet {
    type Output = Self;

    fn sub(mut self, rhs: Self) -> Self {
        for (a, b) in self.0.iter_mut().zip(rhs.0) {
            *a &= !b;
        }
        self
    }
}

impl Not for ProcessorSet {
    type Output = Self;

    fn not(mut self) -> Self {
        for a in &mut self.0 {
            *a = !*a;
        }
        self
    }
}

impl FromIterator<u32> for ProcessorSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut set = Self::EMPTY;
        for p in iter {
            set.insert(p);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processor_set_groups_of_64() {
        let s = ProcessorSet::of_group(1, 0b101);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![64, 66]);
        assert_eq!(s.as_group_affinity(), Some((1, 0b101)));
        assert_eq!(s.group_mask(0), 0);
        assert_eq!(ProcessorSet::of_group(4, 1), ProcessorSet::EMPTY);
        let both = s | ProcessorSet::single(3);
        assert_eq!(both.as_group_affinity(), None);
        assert_eq!(
            (both.first(), both.last(), both.len()),
            (Some(3), Some(66), 3)
        );
    }

    #[test]
    fn processor_set_first_n_and_bounds() {
        assert_eq!(ProcessorSet::first_n(0), ProcessorSet::EMPTY);
        assert_eq!(ProcessorSet::first_n(65).len(), 65);
        assert_eq!(ProcessorSet::first_n(255).last(), Some(254));
        assert_eq!(ProcessorSet::first_n(1000).len(), 256);
        let mut s = ProcessorSet::EMPTY;
        assert!(!s.insert(256));
        assert!(!s.contains(256));
        assert!(s.insert(255) && s.contains(255));
        s.remove(255);
        assert!(s.is_empty());
    }

    #[test]
    fn processor_set_algebra() {
        let a: ProcessorSet = [1, 70, 200].into_iter().collect();
        let b: ProcessorSet = [70, 201].into_iter().collect();
        assert_eq!((a & b).iter().collect::<Vec<_>>(), vec![70]);
        assert_eq!((a - b).iter().collect::<Vec<_>>(), vec![1, 200]);
        assert!((a & b).is_subset(&a) && !a.is_subset(&b));
        assert_eq!((!ProcessorSet::EMPTY).len(), 256);
    }
}
