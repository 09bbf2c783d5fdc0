//! Progress reporting without terminal code: the CLI plugs a progress bar or a JSON event
//! stream in.

/// A `total` for [`Progress::start`] when the size is not known in advance (an image read
/// from a pipe).
pub const UNKNOWN_TOTAL: u64 = u64::MAX;

/// Receives progress of long operations. Called from worker threads.
pub trait Progress: Sync {
    /// A step of the operation starts (`chunking`, `scanning`, `planning`, `writing`,
    /// `verifying`, `verity`); `total` bytes are expected ([`UNKNOWN_TOTAL`] if unknown).
    fn start(&self, what: &str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// `n` more chunks are done (chunked, written or hashed, as the step says).
    fn chunks(&self, _n: u64) {}
    /// `n` more requests were made to a store.
    fn requests(&self, _n: u64) {}
    /// This run resumes an interrupted one (a sync that found its journal).
    fn resumed(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
}
