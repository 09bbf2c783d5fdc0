//! Chunk stores: where compressed chunk files live.
//!
//! A store is plain files addressed by chunk id (see `docs/FORMAT.md` for the layout), so
//! any web server can serve it. [`ChunkStore`] is what the engine needs of one; the local
//! directory store is [`LocalStore`]; [`CacheStore`] keeps verified chunks of another
//! (remote) store in a size-bounded local directory. HTTP(S) and S3 stores live in the
//! `tessera-stores` crate, which keeps their network dependencies out of the engine.
//!
//! # Fetching many chunks
//! [`ChunkStore::fetch`] is one blocking request; many threads may call it at once.
//! [`ChunkStore::fetch_ordered`] takes the whole list of chunks a caller will need, in the
//! order it will write them, and yields them in that order while the store keeps up to
//! [`ChunkStore::in_flight`] requests running ahead: a remote store over a slow link then
//! still feeds a sequential writer at full speed, with memory bounded by the window.

mod cache;
mod local;

pub use cache::{CacheOptions, CacheStore};
pub use local::LocalStore;

use crate::chunk::{decompress_verified, VerifiedChunk};
use crate::error::{Error, Result};
use crate::index::ChunkEntry;
use crate::ChunkId;

/// What a store holds under a chunk id, as [`ChunkStore::check_stored`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredChunk {
    /// No file for the id.
    Missing,
    /// A file that passed every check the store makes (the local store: it decompresses
    /// to exactly the chunk's bytes; by default: it exists).
    Present,
    /// A file that is not the chunk (the reason, for messages): a writer replaces it
    /// with [`ChunkStore::replace_compressed`].
    Damaged(String),
}

/// A chunk fetched from a store and verified, with the compressed bytes it came from (a
/// cache keeps those; callers that only count them read [`Fetched::compressed`]`.len()`).
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The verified chunk bytes.
    pub chunk: VerifiedChunk,
    /// The chunk file as the store served it.
    pub compressed: Vec<u8>,
}

/// Fetched chunks in the order they were asked for, each `Ok` or the error for that chunk.
/// Dropping the iterator cancels the requests not yet started.
pub type FetchStream<'a> = Box<dyn Iterator<Item = Result<Fetched>> + Send + 'a>;

/// The relative path of a chunk file inside a store: `chunks/<first 2 hex>/<hex>.zst`
/// (256 directories, like git's objects: a million chunks is 4096 files a directory).
pub fn chunk_path(id: &ChunkId) -> String {
    let hex = id.to_string();
    format!("chunks/{}/{hex}.zst", &hex[..2])
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

    /// For writers (`make`): whether the store already holds a good file for the chunk
    /// `id` whose bytes are `data` (the caller has them, and they hash to `id`), checked
    /// as far as the store can. A writer skips a `Present` chunk, so an implementation
    /// must never call present a chunk that a reader of this store could not fetch (a
    /// cache in front of a store asks the store, never the cache). The default trusts
    /// [`ChunkStore::contains`].
    ///
    /// # Errors
    /// I/O or transport failures.
    fn check_stored(&self, id: &ChunkId, data: &[u8]) -> Result<StoredChunk> {
        let _ = data;
        Ok(if self.contains(id)? {
            StoredChunk::Present
        } else {
            StoredChunk::Missing
        })
    }

    /// Stores a compressed chunk, atomically replacing a file of that id that
    /// [`ChunkStore::check_stored`] found damaged (readers see the old file or the new
    /// one, never a mix). The default is [`ChunkStore::put_compressed`], and an error when
    /// that finds a file in place, as it cannot replace one.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for read-only stores or a store that cannot replace the
    /// file, I/O failures otherwise.
    fn replace_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<()> {
        if self.put_compressed(id, compressed)? {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "chunk file {}/{} is damaged and this store cannot replace it; delete it \
                 and run again",
                self.location(),
                chunk_path(id)
            )))
        }
    }

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
        let fetched = self.fetch_verified(entry)?;
        let len = fetched.compressed.len() as u64;
        Ok((fetched.chunk, len))
    }

    /// Like [`ChunkStore::fetch`], also returning the compressed bytes. Remote stores
    /// override it to fetch again when the bytes fail verification (a flaky proxy or a
    /// truncated body), so one bad response is not fatal.
    ///
    /// # Errors
    /// As [`ChunkStore::fetch`].
    fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched> {
        let compressed = self
            .get_compressed(&entry.id)?
            .ok_or_else(|| Error::MissingChunk {
                id: entry.id,
                origin: format!("{}/{}", self.location(), chunk_path(&entry.id)),
            })?;
        let origin = format!("{}/{}", self.location(), chunk_path(&entry.id));
        let chunk = decompress_verified(entry.id, &compressed, entry.len, &origin)?;
        Ok(Fetched { chunk, compressed })
    }

    /// Fetches and verifies `entries`, yielding them in the same order, with up to
    /// [`ChunkStore::in_flight`] requests running ahead of the consumer.
    ///
    /// Pass the chunks in the order they will be written, each id once (a chunk that
    /// appears at several offsets is fetched once and written several times); zero chunks
    /// have no file and must be left out. Each item is the chunk or the error for it; after
    /// an error the stream goes on with the next entries, so a caller may keep what it got
    /// and stop, or retry the failed ones. The default fetches one chunk at a time when
    /// the iterator is advanced, which is right for local directories.
    fn fetch_ordered<'a>(&'a self, entries: Vec<ChunkEntry>) -> FetchStream<'a> {
        Box::new(entries.into_iter().map(move |e| self.fetch_verified(&e)))
    }

    /// How many requests [`ChunkStore::fetch_ordered`] keeps in flight (1 for local
    /// stores). Callers that fetch from their own threads can size their pools with it.
    fn in_flight(&self) -> usize {
        1
    }
}

impl<S: ChunkStore + ?Sized> ChunkStore for std::sync::Arc<S> {
    fn location(&self) -> String {
        (**self).location()
    }
    fn get_compressed(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        (**self).get_compressed(id)
    }
    fn contains(&self, id: &ChunkId) -> Result<bool> {
        (**self).contains(id)
    }
    fn put_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<bool> {
        (**self).put_compressed(id, compressed)
    }
    fn check_stored(&self, id: &ChunkId, data: &[u8]) -> Result<StoredChunk> {
        (**self).check_stored(id, data)
    }
    fn replace_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<()> {
        (**self).replace_compressed(id, compressed)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn fetch(&self, entry: &ChunkEntry) -> Result<VerifiedChunk> {
        (**self).fetch(entry)
    }
    fn fetch_counted(&self, entry: &ChunkEntry) -> Result<(VerifiedChunk, u64)> {
        (**self).fetch_counted(entry)
    }
    fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched> {
        (**self).fetch_verified(entry)
    }
    fn fetch_ordered<'a>(&'a self, entries: Vec<ChunkEntry>) -> FetchStream<'a> {
        (**self).fetch_ordered(entries)
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
}
