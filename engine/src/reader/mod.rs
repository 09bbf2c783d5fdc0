//! Random-access reads of an image from its index and a store, as an NBD server needs.
//!
//! [`ImageReader`] finds the chunks under a byte range, serves zero chunks without the
//! store, and fetches the others through [`ChunkStore::fetch`], which hands back only
//! [`VerifiedChunk`]s: a chunk that fails its hash is an error naming its id, and none of
//! its bytes are copied out. Decompressed chunks are kept in an LRU cache bounded in
//! bytes; concurrent readers of one chunk fetch it once. Reads that run past what is
//! cached queue the following chunks for background read-ahead threads.
//!
//! Readers of one process (an NBD server's exports) can share a [`ReaderPool`]: one
//! cache and one set of read-ahead threads, so that memory and threads are bounded by its
//! settings, not by the number of images served.
//!
//! [`Overlay`] adds a copy-on-write layer for writable exports.

mod cache;
mod overlay;

pub use overlay::Overlay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use crate::error::{Error, Result};
use crate::index::Index;
use crate::store::ChunkStore;
use crate::VerifiedChunk;
use cache::{ChunkCache, Slot};

/// Reads at least this long fetch their chunks in parallel; from a remote store (one
/// with more than one request in flight) any read over several chunks does.
const PARALLEL_READ: usize = 1 << 20;

/// Settings of an [`ImageReader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Bytes of decompressed chunks kept in memory. Default 256 MiB.
    pub cache_bytes: u64,
    /// Bytes read ahead past the end of each read (0 disables). Default 4 MiB.
    pub readahead_bytes: u64,
    /// Background threads fetching read-ahead and `prefetch` chunks (0 disables them);
    /// raised to [`ChunkStore::in_flight`] for remote stores, whose fetches wait on the
    /// network rather than the CPU. Default 2.
    pub prefetch_threads: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            cache_bytes: 256 << 20,
            readahead_bytes: 4 << 20,
            prefetch_threads: 2,
        }
    }
}

/// Counters of an [`ImageReader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReaderStats {
    /// Chunk lookups served from the cache.
    pub hits: u64,
    /// Chunks fetched from the store (by reads or read-ahead).
    pub fetches: u64,
    /// Decompressed bytes held in the cache now (by every reader sharing its
    /// [`ReaderPool`]).
    pub cached_bytes: u64,
}

/// A run of image bytes that are, or are not, zero chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Length in bytes.
    pub len: u64,
    /// True for zero chunks (no store file; reads as zeros).
    pub zero: bool,
}

struct Inner {
    index: Index,
    store: Arc<dyn ChunkStore>,
    cache: Arc<ChunkCache>,
    hits: AtomicU64,
    fetches: AtomicU64,
}

/// Reads any byte range of an image, verified chunk by chunk. Usable from many threads.
pub struct ImageReader {
    inner: Arc<Inner>,
    readahead: u64,
    /// End of the range already queued for read-ahead.
    ahead_until: AtomicU64,
    /// End of the latest read, to detect sequential readers.
    last_end: AtomicU64,
    pool: Arc<ReaderPool>,
}

/// A background fetch: chunk `.1` of the reader `.0`, unless it was dropped meanwhile.
type Job = (Weak<Inner>, usize);

/// Background fetches queued by all readers of a pool, beyond which hints are dropped.
const QUEUE: usize = 1024;

/// One decompressed-chunk cache and one set of read-ahead threads for any number of
/// [`ImageReader`]s. Chunks are cached by id, so readers of images that share chunks
/// share them in memory too. Threads start when work is first queued, up to the pool's
/// limit, and end when the pool is dropped (after the last reader using it).
pub struct ReaderPool {
    cache: Arc<ChunkCache>,
    /// Taken on drop, which ends the threads.
    jobs: Option<Sender<Job>>,
    rx: Receiver<Job>,
    max_threads: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ReaderPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderPool")
            .field("cache_limit", &self.cache.limit())
            .field("cached_bytes", &self.cache.bytes())
            .field("max_threads", &self.max_threads)
            .field("threads", &self.threads().len())
            .finish()
    }
}

impl ReaderPool {
    /// A pool whose cache holds at most `cache_bytes` of decompressed chunks, with at
    /// most `threads` read-ahead threads (0: no read-ahead nor `prefetch`).
    pub fn new(cache_bytes: u64, threads: usize) -> Arc<ReaderPool> {
        let (tx, rx) = bounded::<Job>(QUEUE);
        Arc::new(ReaderPool {
            cache: Arc::new(ChunkCache::new(cache_bytes)),
            jobs: (threads > 0).then_some(tx),
            rx,
            max_threads: threads,
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Read-ahead threads started so far.
    pub fn thread_count(&self) -> usize {
        self.threads().len()
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a background fetch; false when the queue is full (the pool is busy).
    fn queue(&self, job: Job) -> bool {
        let Some(tx) = &self.jobs else { return false };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return false,
        }
        // Jobs waiting: another thread, if the limit allows.
        let mut threads = self.threads();
        if !self.rx.is_empty() && threads.len() < self.max_threads {
            let rx = self.rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tessera-readahead-{}", threads.len()))
                .spawn(move || {
                    for (reader, i) in rx {
                        if let Some(inner) = reader.upgrade() {
                            inner.prefetch_one(i);
                        }
                    }
                });
            // Out of threads: those running (or the readers themselves) do the work.
            if let Ok(t) = spawned {
                threads.push(t);
            }
        }
        true
    }
}

impl Drop for ReaderPool {
    fn drop(&mut self) {
        // The only sender: the threads see the end of the queue once it is drained.
        self.jobs = None;
        for t in self.threads().drain(..) {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for ImageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageReader")
            .field("image_size", &self.inner.index.image_size())
            .field("store", &self.inner.store.location())
            .field("stats", &self.stats())
            .finish()
    }
}

impl ImageReader {
    /// A reader of the image `index` describes, with chunks from `store`, and a pool of
    /// its own (`options.prefetch_threads`, raised to the store's
    /// [`ChunkStore::in_flight`]).
    pub fn new(index: Index, store: Arc<dyn ChunkStore>, options: ReaderOptions) -> ImageReader {
        let threads = match options.prefetch_threads {
            0 => 0,
            n => n.max(store.in_flight()),
        };
        let pool = ReaderPool::new(options.cache_bytes, threads);
        ImageReader::in_pool(index, store, options.readahead_bytes, pool)
    }

    /// A reader sharing `pool`'s cache and threads with the other readers in it; it
    /// reads `readahead_bytes` ahead of sequential reads.
    pub fn in_pool(
        index: Index,
        store: Arc<dyn ChunkStore>,
        readahead_bytes: u64,
        pool: Arc<ReaderPool>,
    ) -> ImageReader {
        let inner = Arc::new(Inner {
            index,
            store,
            cache: pool.cache.clone(),
            hits: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        });
        ImageReader {
            inner,
            readahead: readahead_bytes,
            ahead_until: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
            pool,
        }
    }

    /// The index being served.
    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.inner.index.image_size()
    }

    /// Cache and fetch counters.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            fetches: self.inner.fetches.load(Ordering::Relaxed),
            cached_bytes: self.inner.cache.bytes(),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(end),
            _ => Err(Error::InvalidInput(format!(
                "range of {len} bytes at {offset} is outside the image of {} bytes",
                self.size()
            ))),
        }
    }

    /// Fills `buf` with the image bytes at `offset`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the range passes the end of the image;
    /// [`Error::MissingChunk`], [`Error::CorruptChunk`] (naming the chunk id) or
    /// [`Error::Io`] if a chunk cannot be fetched and verified. `buf` may then hold part
    /// of the range but never bytes of an unverified chunk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let chunks = self.inner.index.chunks();
        let mut i = self
            .inner
            .index
            .chunk_at(offset)
            .expect("offset checked to be inside");
        // A large read has the background threads fetch its later chunks while this one
        // fetches the first. So does a small read over a chunk boundary from a remote
        // store: a lone reader (a booting VM) would otherwise wait one round trip per
        // chunk. Small reads from a local store come many at a time, already in parallel.
        let parallel = buf.len() >= PARALLEL_READ || self.inner.store.in_flight() > 1;
        if parallel && chunks[i].end() < end {
            self.enqueue(chunks[i].end(), end);
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let entry = &chunks[i];
            let at = offset + pos as u64;
            let within = (at - entry.offset) as usize;
            let n = (entry.len as usize - within).min(buf.len() - pos);
            let dst = &mut buf[pos..pos + n];
            if entry.zero {
                dst.fill(0);
            } else {
                let chunk = self.inner.chunk(i)?;
                dst.copy_from_slice(&chunk.data()[within..within + n]);
            }
            pos += n;
            i += 1;
        }
        self.read_ahead(offset, end);
        Ok(())
    }

    /// Zero-chunk runs of `len` bytes at `offset`, in order, covering the range exactly.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the range passes the end of the image.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let end = self.check_range(offset, len)?;
        let mut out: Vec<Run> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let chunks = self.inner.index.chunks();
        let first = self
            .inner
            .index
            .chunk_at(offset)
            .expect("offset checked to be inside");
        for entry in &chunks[first..] {
            if entry.offset >= end {
                break;
            }
            let n = entry.end().min(end) - entry.offset.max(offset);
            match out.last_mut() {
                Some(r) if r.zero == entry.zero => r.len += n,
                _ => out.push(Run {
                    len: n,
                    zero: entry.zero,
                }),
            }
        }
        Ok(out)
    }

    /// Queues the chunks of `len` bytes at `offset` for background fetching, up to half
    /// the cache size; returns at once.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the range passes the end of the image.
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        let end = self.check_range(offset, len)?;
        let budget = offset.saturating_add(self.inner.cache.limit() / 2);
        self.enqueue(offset, end.min(budget));
        Ok(())
    }

    /// Queues the read-ahead window after a sequential read of `[offset, end)`: one that
    /// starts where the previous read ended, or inside the window already queued.
    fn read_ahead(&self, offset: u64, end: u64) {
        if self.readahead == 0 {
            return;
        }
        let last = self.last_end.swap(end, Ordering::Relaxed);
        let queued = self.ahead_until.load(Ordering::Relaxed);
        let inside = offset < queued && offset.saturating_add(self.readahead) >= queued;
        if offset != last && !inside {
            return;
        }
        let until = end.saturating_add(self.readahead).min(self.size());
        if queued >= until && inside {
            return;
        }
        let from = if inside { queued.max(end) } else { end };
        self.ahead_until.store(until, Ordering::Relaxed);
        self.enqueue(from, until);
    }

    fn enqueue(&self, from: u64, to: u64) {
        if self.pool.jobs.is_none() {
            return;
        }
        let Some(mut i) = self.inner.index.chunk_at(from) else {
            return;
        };
        let chunks = self.inner.index.chunks();
        while i < chunks.len() && chunks[i].offset < to {
            if !chunks[i].zero
                && !self.inner.cache.contains(&chunks[i].id)
                && !self.pool.queue((Arc::downgrade(&self.inner), i))
            {
                // A full queue means the threads are busy: drop the rest of the hint.
                return;
            }
            i += 1;
        }
    }
}

impl Inner {
    /// The verified chunk at position `i` of the index, from the cache or the store.
    fn chunk(&self, i: usize) -> Result<Arc<VerifiedChunk>> {
        let entry = &self.index.chunks()[i];
        let slot = self.cache.slot(entry.id, u64::from(entry.len));
        if let Some(c) = slot.get() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c);
        }
        self.load(&slot, i)
    }

    /// Fetches into `slot` unless another thread did while we waited for its lock.
    fn load(&self, slot: &Slot, i: usize) -> Result<Arc<VerifiedChunk>> {
        let entry = &self.index.chunks()[i];
        let _loading = slot.lock();
        if let Some(c) = slot.get() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c);
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match self.store.fetch(entry) {
            Ok(chunk) => Ok(slot.fill(chunk)),
            Err(e) => {
                // Not cached: a later read tries the store again (and fails again, or
                // succeeds if the store was repaired).
                self.cache.forget(&entry.id);
                Err(e)
            }
        }
    }

    /// Background fetch of chunk `i`, skipped if cached or being fetched already.
    fn prefetch_one(&self, i: usize) {
        let entry = &self.index.chunks()[i];
        let slot = self.cache.slot(entry.id, u64::from(entry.len));
        if slot.get().is_some() || slot.is_locked() {
            return;
        }
        // Errors surface (and are reported) when a client reads the chunk.
        let _ = self.load(&slot, i);
    }
}

#[cfg(test)]
mod tests;
