//! The crate's errors: [`Error`] for setting up and running the chip (a
//! host problem, the VM cannot go on), [`IrqError`] for a line change or a
//! pin program the chip refused (counted; the VM goes on).

use std::io;

/// Setting up the chip or running a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The ioctl or what was being done.
        op: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// A host resource (timerfd, eventfd, signal handler) failed.
    #[error("{op}: {source}")]
    Host {
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// The builder's settings cannot make a chip (for example 0 vCPUs).
    #[error("irqchip configuration: {0}")]
    Config(String),
    /// KVM lacks a capability the mode needs.
    #[error("KVM lacks {0}, which --irqchip {1} needs")]
    Capability(&'static str, &'static str),
    /// A vCPU index the chip was not built for.
    #[error("vcpu {index} does not exist (the chip has {cpus})")]
    NoSuchVcpu {
        /// The index asked for.
        index: usize,
        /// The chip's vCPU count.
        cpus: usize,
    },
    /// `KVM_RUN` returned an exit this mode cannot get (a bug of the mode,
    /// or a KVM that behaves differently).
    #[error("unexpected exit {0} for this interrupt-controller mode")]
    UnexpectedExit(&'static str),
}

impl Error {
    /// Wraps a KVM ioctl error with what was being done.
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }

    /// Wraps a host error with what was being done.
    pub(crate) fn host<E: Into<io::Error>>(op: &'static str) -> impl FnOnce(E) -> Error {
        move |source| Error::Host {
            op,
            source: source.into(),
        }
    }
}

/// Why a line change or a host pin program was not applied.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// The GSI (IOAPIC pin) does not exist.
    #[error("GSI {0} does not exist")]
    NoSuchGsi(u32),
    /// KVM refused a line change.
    #[error("KVM_IRQ_LINE for GSI {gsi}: {source}")]
    Kvm {
        /// The GSI.
        gsi: u32,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// A KVM ioctl on the in-kernel IOAPIC failed.
    #[error("{op}: {source}")]
    KvmChip {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// An MSI that is no interrupt message (its address is not in the
    /// 0xfee window, or it has a reserved delivery mode).
    #[error("MSI {address:#x}/{data:#x} is not an interrupt message: {why}")]
    BadMsi {
        /// The address.
        address: u64,
        /// The data.
        data: u32,
        /// Why it does not decode.
        why: String,
    },
}
