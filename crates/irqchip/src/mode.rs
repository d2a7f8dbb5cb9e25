//! Which interrupt controllers a VMM runs from these models and which the
//! hypervisor (KVM) provides: the irqchip mode of a VM.
//!
//! | mode | IOAPIC | local APICs |
//! |---|---|---|
//! | `kernel` | the hypervisor's | the hypervisor's |
//! | `split` | ours ([`crate::ioapic`]) | the hypervisor's |
//! | `user` | ours | ours ([`crate::apic_system`]) |

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::msi::MsiFormat;

/// The interrupt-controller mode of a VM (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// KVM's in-kernel PIC, IOAPIC and local APICs (`KVM_CREATE_IRQCHIP`).
    #[default]
    Kernel,
    /// Our IOAPIC model, KVM's local APICs (`KVM_CAP_SPLIT_IRQCHIP`).
    Split,
    /// Our IOAPIC and local APIC models; KVM has no interrupt controller.
    User,
}

impl Mode {
    /// Every mode, in the order of the table above.
    pub const ALL: [Mode; 3] = [Mode::Kernel, Mode::Split, Mode::User];

    /// The mode's name: `kernel`, `split` or `user`.
    ///
    /// # Example
    ///
    /// ```
    /// use irqchip::Mode;
    ///
    /// assert_eq!(Mode::Split.name(), "split");
    /// assert_eq!("user".parse::<Mode>(), Ok(Mode::User));
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::Split => "split",
            Mode::User => "user",
        }
    }

    /// One line on what the mode emulates, for help texts.
    pub const fn description(self) -> &'static str {
        match self {
            Mode::Kernel => "KVM's in-kernel IOAPIC and local APICs",
            Mode::Split => "our IOAPIC model, KVM's local APICs",
            Mode::User => "our IOAPIC and local APIC models, no in-kernel chip",
        }
    }

    /// Whether KVM emulates the local APICs (kernel and split modes).
    pub const fn kvm_lapic(self) -> bool {
        !matches!(self, Mode::User)
    }

    /// Whether our IOAPIC model is the IOAPIC (split and user modes).
    pub const fn our_ioapic(self) -> bool {
        !matches!(self, Mode::Kernel)
    }

    /// How destinations above 8 bits travel in the IOAPIC entries and MSI
    /// addresses the guest and its devices see. Split and user: the
    /// extended destination ID (15 bits; our IOAPIC decodes entry bits
    /// 49..55, and the VMM offers `KVM_FEATURE_MSI_EXT_DEST_ID`). Kernel:
    /// 8 bits, all KVM's IOAPIC decodes (`ioapic.c` takes the entry's
    /// 8-bit `dest_id`), and KVM reads no destination bits from an MSI
    /// address's low dword beyond them.
    ///
    /// # Example
    ///
    /// ```
    /// use irqchip::Mode;
    /// use irqchip::msi::MsiFormat;
    ///
    /// assert_eq!(Mode::Kernel.msi_format(), MsiFormat::Compatibility);
    /// assert_eq!(Mode::User.msi_format(), MsiFormat::ExtendedDestinationId);
    /// ```
    pub const fn msi_format(self) -> MsiFormat {
        match self {
            Mode::Kernel => MsiFormat::Compatibility,
            Mode::Split | Mode::User => MsiFormat::ExtendedDestinationId,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`Mode`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown irqchip mode {0:?} (expected kernel, split or user)")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMode(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_round_trip_through_from_str() {
        for mode in Mode::ALL {
            assert_eq!(mode.name().parse::<Mode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.name());
        }
    }

    #[test]
    fn unit_unknown_name_is_an_error_naming_the_choices() {
        let err = "both".parse::<Mode>().unwrap_err();

        assert!(err.to_string().contains("kernel, split or user"));
    }
}
