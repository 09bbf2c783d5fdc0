//! Chunk stores: where compressed chunk files live.
//!
//! A store is plain files addressed by chunk id (see `docs/FORMAT.md` for the layout), so
//! any web server can serve it. [`ChunkStore`] is what the engine needs of one; the local
//! directory store is [`LocalStore`].

mod local;

pub use local::LocalStore;

use crate::chunk::{decompress_verified, VerifiedChunk};
use crate::error::{Error, Result};
use crate::index::ChunkEntry;
use crate::ChunkId;

/// The relative path of a chunk file inside a store: `chunks/<first 4 hex>/<hex>.zst`.
pub fn chunk_path(id: &ChunkId) -> String {
    let hex = id.to_string();
    format!("chunks/{}/{hex}.zst", &hex[..4])
}

/// A place that holds compressed chunks. Implementations must be usable from many
/// threads at once.
pub trait ChunkStore: Send + Sync {
    /// Where the store is (a path or URL), for messages.
    fn location(&self) -> String;

    /// The compressed bytes of a chunk, `None` if the store does not have it.
    ///
    /// # Errors
    /// I/O or transport failures other than "not found".
    fn get_compressed(&self, id: &ChunkId) -> Result<Option<Vec<u8>>>;

    /// Whether the store has the chunk.
    ///
    /// # Errors
    /// I/O or transport failures.
    fn contains(&self, id: &ChunkId) -> Result<bool>;

    /// Stores a compressed chunk unless present; returns true when it was written now.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for read-only stores, I/O failures otherwise.
    fn put_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<bool>;

    /// Makes everything put so far durable (before an index that names it is published).
    ///
    /// # Errors
    /// I/O failures.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Fetches, decompresses and verifies the chunk of `entry`.
    ///
    /// # Errors
    /// [`Error::MissingChunk`] if absent, [`Error::CorruptChunk`] if the bytes are wrong.
    fn fetch(&self, entry: &ChunkEntry) -> Result<VerifiedChunk> {
        self.fetch_counted(entry).map(|(chunk, _)| chunk)
    }

    /// Like [`ChunkStore::fetch`], also returning the compressed size read from the store.
    ///
    /// # Errors
    /// As [`ChunkStore::fetch`].
    fn fetch_counted(&self, entry: &ChunkEntry) -> Result<(VerifiedChunk, u64)> {
        let compressed = self.get_compressed(&entry.id)?.ok_or_else(|| Error::MissingChunk {
            id: entry.id,
            origin: self.location(),
        })?;
        let origin = format!("{}/{}", self.location(), chunk_path(&entry.id));
        let chunk = decompress_verified(entry.id, &compressed, entry.len, &origin)?;
        Ok((chunk, compressed.len() as u64))
    }
}
