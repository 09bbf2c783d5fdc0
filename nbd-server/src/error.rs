//! The crate's error type, and the one place where failures become NBD error codes.
//!
//! Policy: [`Error`] is what ends a connection (I/O failure, a client breaking the
//! protocol) and names what was being done; a failed request never ends a connection,
//! it becomes an error reply through [`errno`]. `Display` does not repeat the source.

use std::io;

use crate::backend::ErrorKind as BackendErrorKind;

/// NBD error values (`doc/proto.md`, "Error values").
pub mod code {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// The NBD error value for a backend failure.
pub fn errno(kind: BackendErrorKind) -> u32 {
    match kind {
        BackendErrorKind::Io => code::EIO,
        BackendErrorKind::ReadOnly => code::EPERM,
        BackendErrorKind::NoSpace => code::ENOSPC,
        BackendErrorKind::Invalid => code::EINVAL,
        BackendErrorKind::Shutdown => code::ESHUTDOWN,
    }
}

/// What ended a connection, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The socket failed or closed early.
    Io,
    /// The client broke the protocol (bad magic, unknown flags, truncated message).
    Protocol,
    /// The client took too long to negotiate, or to read its replies.
    Timeout,
}

/// Why a connection or listener stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error while doing `what`.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A protocol violation by the client.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The handshake did not finish in time.
    #[error("handshake not finished within {0} seconds")]
    Timeout(u64),
    /// The client took no reply bytes for this long.
    #[error("client read no reply for {0:?}")]
    Stalled(std::time::Duration),
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::Timeout(_) | Error::Stalled(_) => ErrorKind::Timeout,
        }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
