//! The crate's one error type.
//!
//! A guest's bad register access is never an [`Error`]: it is ignored and
//! counted by the model it hit. Errors are for the host: a caller passing a
//! pin that does not exist, an MSI address outside the interrupt window, a
//! snapshot that no model could have produced.

/// What went wrong in a host-side call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The IOAPIC has no input with this number.
    #[error("pin {0} is not an IOAPIC input (the IOAPIC has 24 pins, 0 to 23)")]
    PinOutOfRange(u8),
    /// An MSI address whose bits 20..31 are not 0xfee.
    #[error("address {0:#x} is not in the MSI window 0xfee00000..=0xfeefffff")]
    NotMsiAddress(u64),
    /// A destination ID too wide for the chosen MSI address format.
    #[error("destination {0:#x} does not fit the chosen MSI address format")]
    DestinationTooWide(u32),
    /// A message with a destination shorthand, which an MSI cannot carry.
    #[error("a message with a destination shorthand cannot be encoded as an MSI")]
    ShorthandInMsi,
    /// A saved state that no model could have produced.
    #[error("the saved state is invalid: {0}")]
    InvalidSnapshot(&'static str),
}
