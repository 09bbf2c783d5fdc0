//! Progress reporting without terminal code: the CLI plugs a progress bar in.

/// Receives progress of long operations. Called from worker threads.
pub trait Progress: Sync {
    /// The operation starts; `total` bytes are expected.
    fn start(&self, what: &str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
}
