//! The crate's error type, and the one place where failures become NBD error codes.
//!
//! Policy: [`Error`] is what ends a connection (I/O failure, a client breaking the
//! protocol, a limit: timeouts, eviction, reclaimed buffer memory) and names what was
//! being done; a failed request never ends a connection, it becomes an error reply
//! through [`errno`]. `Display` does not repeat the source; log lines use [`chain`] so
//! they say why a socket failed (broken pipe, reset).

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
    /// The client took too long to negotiate, or to read its replies, or stayed idle.
    Timeout,
    /// The server dropped the connection to keep serving others: evicted to make room
    /// for a new client, or its unread replies held buffer memory others waited for.
    Limit,
    /// The TLS handshake failed: garbage instead of TLS, a certificate refused by
    /// either side.
    Tls,
    /// The server's configuration is unusable (TLS certificate or key files).
    Config,
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
    /// The client took no reply bytes (or sent no payload bytes) for this long.
    #[error("client made no progress reading replies or sending a payload for {0:?}")]
    Stalled(std::time::Duration),
    /// The client sent nothing and had nothing in flight for this long.
    #[error("idle for {0:?} after the handshake")]
    Idle(std::time::Duration),
    /// The server dropped the connection for the reason given, to serve other clients.
    #[error("dropped: {0}")]
    Dropped(String),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (rustls's reason).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// A configuration file is unusable: the message names it and why.
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::Timeout(_) | Error::Stalled(_) | Error::Idle(_) => ErrorKind::Timeout,
            Error::Dropped(_) => ErrorKind::Limit,
            Error::Tls(_) => ErrorKind::Tls,
            Error::Config(_) => ErrorKind::Config,
        }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

/// `e` and its sources, `: `-separated, for log lines (`Display` of this crate's errors
/// leaves the source out, so a log would not say "broken pipe" or "reset" otherwise).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A client-supplied string for a log line or message: quoted, and cut to 64 bytes
/// (with its full length) so that a client cannot make the server echo 4 KiB names.
pub fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        format!("{s:?}")
    } else {
        format!("{:?}... ({} bytes)", crate::wire::truncate(s, MAX), s.len())
    }
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
