//! Random-access reads of an image from its index and a store, as an NBD server needs.
//!
//! [`ImageReader`] finds the chunks under a byte range, serves zero chunks without the
//! store, and fetches the others through [`ChunkStore::fetch`], which hands back only
//! [`VerifiedChunk`]s: a chunk that fails its hash is an error naming its id, and none of
//! its bytes are copied out. Decompressed chunks are kept in an LRU cache bounded in
//! bytes; concurrent readers of one chunk fetch it once. Reads that run past what is
//! cached queue the following chunks for background read-ahead threads.
//!
//! [`Overlay`] adds a copy-on-write layer for writable exports.

mod cache;
mod overlay;

pub use overlay::Overlay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use crate::error::{Error, Result};
use crate::index::Index;
use crate::store::ChunkStore;
use crate::VerifiedChunk;
use cache::{ChunkCache, Slot};

/// Reads at least this long fetch their chunks in parallel.
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
    /// Decompressed bytes held in the cache now.
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
    cache: ChunkCache,
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
    queue: Option<Sender<usize>>,
    workers: Vec<JoinHandle<()>>,
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
    /// A reader of the image `index` describes, with chunks from `store`.
    pub fn new(index: Index, store: Arc<dyn ChunkStore>, options: ReaderOptions) -> ImageReader {
        let inner = Arc::new(Inner {
            index,
            store,
            cache: ChunkCache::new(options.cache_bytes),
            hits: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        });
        let threads = match options.prefetch_threads {
            0 => 0,
            n => n.max(inner.store.in_flight()),
        };
        let (queue, workers) = if threads > 0 {
            let (tx, rx) = bounded::<usize>(1024);
            let workers = (0..threads)
                .map(|_| {
                    let inner = inner.clone();
                    let rx: Receiver<usize> = rx.clone();
                    std::thread::spawn(move || {
                        for i in rx {
                            inner.prefetch_one(i);
                        }
                    })
                })
                .collect();
            (Some(tx), workers)
        } else {
            (None, Vec::new())
        };
        ImageReader {
            inner,
            readahead: options.readahead_bytes,
            ahead_until: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
            queue,
            workers,
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
        // fetches the first (smaller reads come many at a time, already in parallel).
        if buf.len() >= PARALLEL_READ && chunks[i].end() < end {
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
        let Some(queue) = &self.queue else { return };
        let Some(mut i) = self.inner.index.chunk_at(from) else {
            return;
        };
        let chunks = self.inner.index.chunks();
        while i < chunks.len() && chunks[i].offset < to {
            if !chunks[i].zero && !self.inner.cache.contains(&chunks[i].id) {
                match queue.try_send(i) {
                    Ok(()) => {}
                    // A full queue means the threads are busy: drop the rest of the hint.
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return,
                }
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

impl Drop for ImageReader {
    fn drop(&mut self) {
        self.queue = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests;
