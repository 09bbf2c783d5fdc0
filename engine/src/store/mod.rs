//! Stores: where packed chunks live, and how verified chunks are fetched from them.
//!
//! A store is plain files (see `docs/FORMAT.md`): immutable pack files
//! `packs/<2 hex>/<pack id>.tpack`, each a run of zstd frames (one per chunk) followed by a
//! table of contents, and one location file `locations/<root hash>.tloc` per published
//! index saying which pack and offset holds each of its chunks. Any web server can serve
//! it.
//!
//! - [`StoreRead`] reads a store's files (whole, or a byte range); [`StoreWrite`] adds
//!   writing (local directories and S3; never HTTP). The local directory is
//!   [`LocalStore`]; HTTP(S) and S3 live in the `tessera-stores` crate, which keeps their
//!   network dependencies out of the engine.
//! - [`ChunkStore`] is what sync and the NBD reader fetch verified chunks from. It is
//!   bound to one index: [`PackFetcher`] reads that index's location file, then groups the
//!   wanted chunks by pack and coalesces neighbours into few large range requests;
//!   [`CacheStore`] keeps verified chunks in a local directory in front of another
//!   `ChunkStore`.
//!
//! # Fetching many chunks
//! [`ChunkStore::fetch_verified`] is one blocking request for one chunk; many threads may
//! call it at once. [`ChunkStore::fetch_ordered`] takes the whole list of chunks a caller
//! will need, in the order it will write them, and yields them in that order while up to
//! [`ChunkStore::in_flight`] requests run ahead: a remote store over a slow link then still
//! feeds a sequential writer at full speed, with memory bounded by a window.

mod cache;
pub mod check;
mod fetch;
mod local;
pub mod prune;

use std::fmt;
use std::str::FromStr;

pub use cache::{CacheOptions, CacheStore};
pub use fetch::{set_fetch_window, PackFetcher, MAX_GAP, MAX_REQUEST};
pub use local::LocalStore;

use crate::chunk::VerifiedChunk;
use crate::error::Result;
use crate::id::ParseIdError;
use crate::index::ChunkEntry;
use crate::pack::PackSink;
use crate::ChunkId;

/// A pack's name: BLAKE3 of the whole pack file. Displays as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    /// Hashes a whole pack file into its id.
    pub fn of(bytes: &[u8]) -> PackId {
        PackId(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&ChunkId(self.0), f)
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

impl FromStr for PackId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChunkId::from_str(s).map(|id| PackId(id.0))
    }
}

/// The store-relative path of a pack: `packs/<first 2 hex>/<64 hex>.tpack`.
pub fn pack_path(id: &PackId) -> String {
    let hex = id.to_string();
    format!("packs/{}/{hex}.tpack", &hex[..2])
}

/// The store-relative path of the location file of the index whose root hash is `root`:
/// `locations/<64 hex>.tloc`.
pub fn locations_path(root: &[u8; 32]) -> String {
    format!("locations/{}.tloc", ChunkId(*root))
}

/// The pack id named by a store-relative path `packs/xx/<hex>.tpack` (for listers), or
/// `None` for any other path (temporary files, foreign files).
pub fn pack_id_from_path(rel: &str) -> Option<PackId> {
    let rest = rel.strip_prefix("packs/")?;
    let (dir, file) = rest.split_once('/')?;
    let hex = file.strip_suffix(".tpack")?;
    let id: PackId = hex.parse().ok()?;
    (dir.len() == 2 && hex.starts_with(dir) && hex == id.to_string()).then_some(id)
}

/// Reading a store's files: a local directory, an HTTP(S) server or CDN, S3. Thread-safe.
pub trait StoreRead: Send + Sync {
    /// Where the store is (path or URL), for messages.
    fn location(&self) -> String;

    /// The whole store-relative file `rel`, `None` if it does not exist.
    ///
    /// # Errors
    /// I/O or transport failures; a file larger than `limit` bytes.
    fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>>;

    /// Exactly `len` bytes at `offset` of store-relative file `rel` (HTTP: one `Range`
    /// request answered 206 with a matching `Content-Range`, body bounded to `len`; S3: a
    /// ranged GET).
    ///
    /// # Errors
    /// [`crate::Error::MissingFile`] naming the path or URL when the file does not exist;
    /// a short answer; I/O or transport failures.
    fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// The size of store-relative file `rel`, `None` if absent (for reading a pack's TOC
    /// from its tail).
    ///
    /// # Errors
    /// I/O or transport failures.
    fn file_size(&self, rel: &str) -> Result<Option<u64>>;

    /// Every pack in the store (for `make`'s dedup).
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] for stores that cannot list (HTTP); I/O or transport
    /// failures.
    fn list_packs(&self) -> Result<Vec<PackId>>;

    /// Requests worth keeping in flight at once (1 for local directories).
    fn in_flight(&self) -> usize {
        1
    }

    /// Further attempts a fetcher makes for a chunk that failed verification (a flaky
    /// proxy, a truncated body): 0 for local directories, `--retries` for remote stores.
    fn retries(&self) -> u32 {
        0
    }

    /// Told by a fetcher that the `len` bytes at `offset` of `rel` that this store returned
    /// failed verification (`why`), before it asks for them again: a store of mirrors
    /// asks another mirror then, and says which one failed. Default: nothing.
    fn bad_bytes(&self, rel: &str, offset: u64, len: u64, why: &crate::Error) {
        let _ = (rel, offset, len, why);
    }

    /// For writers: a cheap check that the frame at `offset` (`clen` bytes) of the pack
    /// `id` holds exactly `data`, when reading it costs little (the local store does it;
    /// the default trusts the pack's table of contents and answers `true`). `make` writes
    /// a chunk found damaged again into a new pack.
    ///
    /// # Errors
    /// I/O failures other than a missing or short file (those answer `false`).
    fn holds_chunk(&self, id: &PackId, offset: u64, clen: u32, data: &[u8]) -> Result<bool> {
        let _ = (id, offset, clen, data);
        Ok(true)
    }
}

/// Writing a store (a local directory, S3; never HTTP).
pub trait StoreWrite: StoreRead {
    /// Stores a finished pack under its id (no-op if present). Atomic: readers never see
    /// a partial pack.
    ///
    /// # Errors
    /// I/O or transport failures.
    fn put_pack(&self, id: &PackId, bytes: &[u8]) -> Result<()>;

    /// Starts a pack written piece by piece (by `make`, through a
    /// [`PackStream`](crate::pack::PackStream)). The default collects the bytes in memory
    /// and stores them with [`StoreWrite::put_pack`] at commit; the local store streams
    /// them to a temporary file.
    ///
    /// # Errors
    /// I/O or transport failures.
    fn begin_pack(&self) -> Result<Box<dyn PackSink + '_>> {
        Ok(Box::new(BufferedPack {
            store: self,
            bytes: Vec::new(),
        }))
    }

    /// Writes (or atomically replaces) the store-relative file `rel` (location files).
    ///
    /// # Errors
    /// I/O or transport failures.
    fn put_file(&self, rel: &str, bytes: &[u8]) -> Result<()>;

    /// Makes everything put so far durable (before an index naming it is published).
    ///
    /// # Errors
    /// I/O or transport failures.
    fn flush(&self) -> Result<()>;

    /// Removes the store-relative file `rel` (for `prune`); a file already absent is not
    /// an error. The default refuses: a store that cannot delete cannot be pruned.
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] from the default; I/O or transport failures.
    fn delete(&self, rel: &str) -> Result<()> {
        Err(crate::Error::InvalidInput(format!(
            "store {} cannot delete files (deleting {rel})",
            self.location()
        )))
    }

    /// The store-relative names (`dir/name`) of the files directly in directory `dir`
    /// (`locations`, `trash`, `makes`, `prunes`; for `prune`), without `.`-prefixed
    /// temporary files, sorted; empty when the directory does not exist. The default
    /// refuses, like [`StoreWrite::delete`].
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] from the default; I/O or transport failures.
    fn list_files(&self, dir: &str) -> Result<Vec<String>> {
        Err(crate::Error::InvalidInput(format!(
            "store {} cannot list {dir}/",
            self.location()
        )))
    }
}

/// A chunk fetched from a store and verified, with the compressed frame it came from (a
/// cache keeps those) and what fetching it cost.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The verified chunk bytes.
    pub chunk: VerifiedChunk,
    /// The chunk's zstd frame as the store served it.
    pub compressed: Vec<u8>,
    /// Bytes downloaded for this chunk: its frame, plus its share of the gaps a coalesced
    /// request read between frames, plus any attempts that failed verification. Zero for
    /// a chunk served from a local cache.
    pub downloaded: u64,
    /// Requests made for this chunk: a coalesced request is counted on its first chunk
    /// (the others count 0), a refetch counts 1 more. Zero from a local cache.
    pub requests: u64,
}

/// What fetching some chunks would download, planned without fetching
/// ([`ChunkStore::estimate`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Compressed bytes the requests read: chunk frames plus the gaps coalesced requests
    /// read through (protocol overhead such as HTTP headers is not counted).
    pub bytes: u64,
    /// Requests made.
    pub requests: u64,
}

impl std::ops::AddAssign for Estimate {
    fn add_assign(&mut self, other: Estimate) {
        self.bytes += other.bytes;
        self.requests += other.requests;
    }
}

/// Fetched chunks in the order they were asked for, each `Ok` or the error for that chunk.
/// Dropping the iterator cancels the requests not yet started.
pub type FetchStream<'a> = Box<dyn Iterator<Item = Result<Fetched>> + Send + 'a>;

/// Where the verified chunks of one index come from ([`PackFetcher`], [`CacheStore`]).
/// Implementations must be usable from many threads at once.
pub trait ChunkStore: Send + Sync {
    /// Where the store is (a path or URL), for messages.
    fn location(&self) -> String;

    /// Fetches, decompresses and verifies the chunk of `entry`, fetching again (as many
    /// times as the store allows) when the bytes fail verification.
    ///
    /// # Errors
    /// [`crate::Error::MissingChunk`] if the index's location data has no place for it,
    /// [`crate::Error::MissingFile`] if its pack is gone, [`crate::Error::CorruptChunk`]
    /// if the bytes are wrong.
    fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched>;

    /// Fetches and verifies `entries`, yielding them in the same order, with up to
    /// [`ChunkStore::in_flight`] requests running ahead of the consumer.
    ///
    /// Pass the chunks in the order they will be written, each id once (a chunk that
    /// appears at several offsets is fetched once and written several times); zero chunks
    /// have no frame and must be left out. Each item is the chunk or the error for it;
    /// after an error the stream goes on with the next entries, so a caller may keep what
    /// it got and stop, or retry the failed ones.
    fn fetch_ordered<'a>(&'a self, entries: Vec<ChunkEntry>) -> FetchStream<'a>;

    /// How many requests [`ChunkStore::fetch_ordered`] keeps in flight (1 for local
    /// stores). Callers that fetch from their own threads can size their pools with it.
    fn in_flight(&self) -> usize;

    /// What [`ChunkStore::fetch_ordered`] of `entries` would download if every chunk
    /// verified at its first attempt: the requests planned by the same code, counted,
    /// nothing fetched (a remote store may read the index's location file).
    ///
    /// # Errors
    /// The location data cannot be read; [`crate::Error::InvalidInput`] from a store that
    /// cannot plan without fetching (the default).
    fn estimate(&self, entries: &[ChunkEntry]) -> Result<Estimate> {
        let _ = entries;
        Err(crate::Error::InvalidInput(format!(
            "store {} cannot estimate what fetching its chunks downloads",
            self.location()
        )))
    }

    /// [`ChunkStore::fetch_verified`], keeping only the chunk.
    ///
    /// # Errors
    /// As [`ChunkStore::fetch_verified`].
    fn fetch(&self, entry: &ChunkEntry) -> Result<VerifiedChunk> {
        self.fetch_verified(entry).map(|f| f.chunk)
    }
}

impl<S: ChunkStore + ?Sized> ChunkStore for std::sync::Arc<S> {
    fn location(&self) -> String {
        (**self).location()
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
    fn estimate(&self, entries: &[ChunkEntry]) -> Result<Estimate> {
        (**self).estimate(entries)
    }
    fn fetch(&self, entry: &ChunkEntry) -> Result<VerifiedChunk> {
        (**self).fetch(entry)
    }
}

/// The default [`StoreWrite::begin_pack`]: the pack in memory until it is committed.
pub(crate) struct BufferedPack<'a, S: ?Sized> {
    pub(crate) store: &'a S,
    pub(crate) bytes: Vec<u8>,
}

impl<S: StoreWrite + ?Sized> PackSink for BufferedPack<'_, S> {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn commit(&mut self, id: &PackId) -> Result<()> {
        self.store.put_pack(id, &std::mem::take(&mut self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_ids() {
        let id = PackId::of(b"pack");
        let hex = id.to_string();
        assert_eq!(pack_path(&id), format!("packs/{}/{hex}.tpack", &hex[..2]));
        assert_eq!(pack_id_from_path(&pack_path(&id)), Some(id));
        assert_eq!(hex.parse::<PackId>().unwrap(), id);
        assert_eq!(
            locations_path(&[0xab; 32]),
            format!("locations/{}.tloc", "ab".repeat(32))
        );
        // Foreign names are not packs.
        for bad in [
            format!("packs/00/{hex}.tpack"),
            format!("packs/{}/{}.tpack", &hex[..2], hex.to_uppercase()),
            format!("packs/{}/.{hex}.tpack", &hex[..2]),
            format!("packs/{}/{hex}.tpack.tmp", &hex[..2]),
            format!("packs/{hex}.tpack"),
            format!("other/{}/{hex}.tpack", &hex[..2]),
        ] {
            assert_eq!(pack_id_from_path(&bad), None, "{bad}");
        }
    }
}
