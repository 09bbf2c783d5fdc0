//! The engine's error type.
//!
//! Policy: every error names *what* failed and *where* (a path, an offset, a chunk id, a
//! store location). `Display` gives that context in one line and does not repeat the
//! underlying `source()`, so callers that print the chain (`{:#}` with anyhow) see each
//! cause once. [`Error::kind`] lets programs branch without matching on messages.

use std::io;
use std::path::PathBuf;

use crate::ChunkId;

/// A `Result` whose error is the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, for callers that branch on the kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing a file, device or store failed.
    Io,
    /// An index file is malformed, truncated or of an unknown version.
    InvalidIndex,
    /// Chunk bytes did not hash to the id the index names, or did not decompress.
    CorruptChunk,
    /// A chunk is in no store or seed, or the store file that should hold it is gone.
    MissingChunk,
    /// The caller asked for something impossible (bad parameters, target too small...).
    InvalidInput,
    /// A target does not hold the image.
    VerifyFailed,
    /// The index is not the one the caller trusts (root hash, signature, version).
    Untrusted,
}

/// An engine error with its context.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a path.
    #[error("{what} {path}")]
    Io {
        /// What was being done ("reading", "writing"...).
        what: &'static str,
        /// The file, device or store path involved (a URL for a remote store).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
        /// Whether it happened on the network (a remote store or index): worth retrying
        /// later, unlike a local disk's failure.
        remote: bool,
    },
    /// A malformed index.
    #[error("invalid index {origin}: {reason}")]
    InvalidIndex {
        /// Where the index came from (path or URL).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A chunk whose bytes cannot be trusted.
    #[error("corrupt chunk {id} from {origin}: {reason}")]
    CorruptChunk {
        /// The chunk's expected id.
        id: ChunkId,
        /// Which store, seed or file it came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A chunk found nowhere.
    #[error("chunk {id} is missing from {origin}")]
    MissingChunk {
        /// The chunk's id.
        id: ChunkId,
        /// The store (or stores) searched.
        origin: String,
    },
    /// A store file (a pack's table of contents, a location file) that is malformed.
    #[error("invalid store file {origin}: {reason}")]
    CorruptStore {
        /// The file's path or URL.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A store file (a pack, most often) that does not exist.
    #[error("{origin} does not exist")]
    MissingFile {
        /// The file's path or URL.
        origin: String,
    },
    /// Bad parameters or an impossible request.
    #[error("{0}")]
    InvalidInput(String),
    /// A target that does not hold the image.
    #[error("{0}")]
    VerifyFailed(String),
    /// An index the caller does not trust.
    #[error("{0}")]
    Untrusted(String),
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::InvalidIndex { .. } => ErrorKind::InvalidIndex,
            Error::CorruptChunk { .. } | Error::CorruptStore { .. } => ErrorKind::CorruptChunk,
            Error::MissingChunk { .. } | Error::MissingFile { .. } => ErrorKind::MissingChunk,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::VerifyFailed(_) => ErrorKind::VerifyFailed,
            Error::Untrusted(_) => ErrorKind::Untrusted,
        }
    }

    /// Wraps an I/O error with what was being done and on which path.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
            remote: false,
        }
    }

    /// An I/O error on the network: `url` (redacted) could not be reached, answered an
    /// error, or cut its answer short.
    pub fn remote_io(what: &'static str, url: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            what,
            path: url.into(),
            source,
            remote: true,
        }
    }

    /// Whether this is an I/O error on the network (see [`Error::remote_io`]).
    pub fn is_remote(&self) -> bool {
        matches!(self, Error::Io { remote: true, .. })
    }
}
