//! The VMM's one error type. Every message is a single line a person can act on.

use std::io;
use std::path::PathBuf;

use crate::loader::LoadError;

/// Process exit status for VMM errors (usage errors exit with 2, from clap).
pub(crate) const EXIT_VMM_ERROR: u8 = 3;
/// Process exit status for bad user input found after parsing (an output
/// file that cannot be created), as clap's usage errors.
pub(crate) const EXIT_USAGE: u8 = 2;
/// Process exit status when `--timeout` expires (as coreutils `timeout`).
pub(crate) const EXIT_TIMEOUT: u8 = 124;

/// Everything that stops the VMM other than the guest's own exit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("open /dev/kvm: {0}")]
    KvmOpen(String),
    /// KVM reports an API version other than 12.
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    /// A capability this VMM needs is missing.
    #[error("KVM lacks {0}, which this VMM needs")]
    KvmCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The interrupt controller could not be set up or run.
    #[error(transparent)]
    Irqchip(#[from] irqchip_kvm::Error),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A file could not be read.
    #[error("read {}: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file could not be written.
    #[error("write {}: {source}", path.display())]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An output file named on the command line cannot be created.
    #[error("{flag} {}: {source}; give a path in a writable directory", path.display())]
    OutputFile {
        /// The flag (`--trace`).
        flag: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The kernel image or a module is not loadable.
    #[error("{what}: {source}")]
    Load {
        /// The image (path or "embedded guest image").
        what: String,
        /// What is wrong with it.
        source: LoadError,
    },
    /// The PV connect service cannot be built (a bad `--devices` table).
    #[error("{what}: {source}")]
    PvConfig {
        /// What was being built ("device table PATH", ...).
        what: String,
        /// What is wrong with it.
        source: irqconnect::Error,
    },
    /// The guest stopped with a shutdown exit (triple fault).
    #[error("vcpu {cpu}: guest shutdown (triple fault); {regs}")]
    GuestShutdown {
        /// The vCPU index.
        cpu: usize,
        /// Its registers, one line.
        regs: String,
    },
    /// KVM could not run the guest (internal error, failed entry, unexpected exit).
    #[error("vcpu {cpu}: {what}; {regs}")]
    VcpuFault {
        /// The vCPU index.
        cpu: usize,
        /// What happened.
        what: String,
        /// Its registers, one line.
        regs: String,
    },
    /// `--timeout` expired.
    #[error("timeout after {secs} s {}", match test {
        Some(t) => format!("while running test {t}"),
        None => "before the guest announced a test".to_string(),
    })]
    Timeout {
        /// The timeout.
        secs: u64,
        /// The test the marker port named last.
        test: Option<String>,
    },
    /// The host ran out of something (threads, file descriptors, epoll).
    #[error("{op}: {source}")]
    Host {
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        source: io::Error,
    },
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

    /// The process exit status for this error.
    pub(crate) fn exit_status(&self) -> u8 {
        match self {
            Error::Timeout { .. } => EXIT_TIMEOUT,
            Error::OutputFile { .. } => EXIT_USAGE,
            _ => EXIT_VMM_ERROR,
        }
    }
}

/// Result with the VMM's error.
pub(crate) type Result<T> = std::result::Result<T, Error>;
