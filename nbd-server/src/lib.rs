//! An NBD server on tokio that serves any [`Backend`]. (Protocol work lands with the NBD issue.)

/// A block device that an NBD export reads from.
pub trait Backend: Send + Sync {
    /// Size of the export in bytes.
    fn size(&self) -> u64;
}
