//! Generation-tagged connection handles.
//!
//! A handle is `generation << 32 | (slot + 1)`. The slot part is never 0, so
//! handle 0 (the guest's NULL) is never valid; generations start at 1, so a
//! small integer is never valid either. A slot's generation advances each time
//! its connection is removed, so a stale handle names a dead generation and
//! is refused. A slot whose generation would wrap is retired for good, so no
//! handle is ever accepted for two connections.

use serde::{Deserialize, Serialize};

/// The handle of a live or former connection, as the guest holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Handle(u64);

/// The generation a fresh slot starts with.
pub const FIRST_GENERATION: u32 = 1;

impl Handle {
    /// The handle the guest passed (any value; it may be forged).
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The value the guest receives.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The handle of `slot` at `generation`; `None` for the one slot index
    /// that cannot be encoded.
    pub fn new(slot: usize, generation: u32) -> Option<Self> {
        let low = u32::try_from(slot).ok()?.checked_add(1)?;
        Some(Self((u64::from(generation) << 32) | u64::from(low)))
    }

    /// The slot index, or `None` for a handle whose slot part is 0.
    pub fn slot(self) -> Option<usize> {
        (self.0 as u32)
            .checked_sub(1)
            .and_then(|s| usize::try_from(s).ok())
    }

    /// The generation part.
    pub const fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_roundtrips_slot_and_generation() {
        let h = Handle::new(5, 7);
        assert_eq!(h.map(Handle::raw), Some((7 << 32) | 6));
        assert_eq!(h.and_then(Handle::slot), Some(5));
        assert_eq!(h.map(Handle::generation), Some(7));
    }

    #[test]
    fn handle_zero_has_no_slot() {
        assert_eq!(Handle::from_raw(0).slot(), None);
        assert_eq!(Handle::from_raw(5 << 32).slot(), None);
        assert_eq!(Handle::new(u32::MAX as usize, 1), None);
    }
}
