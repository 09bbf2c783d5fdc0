//! [`PackFetcher`]: the verified chunks of one index, fetched from a store's packs with
//! coalesced range requests.
//!
//! Opening one reads the index's location file (`locations/<root>.tloc`), so it knows the
//! pack, offset and frame length of every distinct chunk. [`ChunkStore::fetch_ordered`]
//! then plans requests with [`crate::pack::plan_requests`] (frames of one pack whose gap
//! is at most [`MAX_GAP`] merged into requests of at most [`MAX_REQUEST`]), runs up to
//! [`StoreRead::in_flight`] of them at once on its own threads, splits each answer into
//! frames and verifies each chunk there (decompressed bounded to the index's length, then
//! hashed against its id), and yields the chunks in the order asked. Bytes held ahead of
//! the consumer (requests running plus chunks not yet taken) stay under a window (64 MiB,
//! or what [`set_fetch_window`] says: a sync sets an eighth of its memory budget), and a
//! coalesced request is at most a quarter of that window.
//!
//! A chunk that fails verification is fetched again on its own, up to
//! [`StoreRead::retries`] times, before its error is yielded: a hostile or damaged
//! location file or pack can make a fetch fail, never deliver wrong bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::{
    locations_path, pack_path, ChunkStore, Estimate, FetchStream, Fetched, PackId, StoreRead,
};
use crate::chunk::decompress_verified;
use crate::error::{Error, Result};
use crate::index::{ChunkEntry, Index};
use crate::pack::{plan_requests, Location, Locations, Request, Want};
use crate::ChunkId;

/// Largest gap between two wanted frames of a pack that one request reads through
/// (the gap's bytes are downloaded and dropped). 64 KiB: on the release update of
/// `benches/chunk-sweep.sh` with 4K:16K:64K chunks, 136 requests (bita: 161) and 8% more
/// bytes than reading no gap at all (232 requests); 256 KiB makes 84 requests for 26% more
/// bytes.
pub const MAX_GAP: u64 = 64 << 10;
/// The gap a [`PackFetcher`] reads through: [`MAX_GAP`], or the environment variable
/// `TESSERA_MAX_GAP` (bytes, K/M/G suffixes) when it is set and valid. A knob for
/// measuring (`benches/chunk-sweep.sh`), not a setting users need.
fn max_gap() -> u64 {
    std::env::var("TESSERA_MAX_GAP")
        .ok()
        .and_then(|v| crate::parse_size(&v).ok())
        .unwrap_or(MAX_GAP)
}

/// Largest coalesced request, in bytes (a frame larger than this gets a request alone).
pub const MAX_REQUEST: u64 = 8 << 20;
/// Bytes held ahead of the consumer of [`ChunkStore::fetch_ordered`] (requests running
/// plus verified chunks waiting), beyond the request the consumer waits for.
static WINDOW: AtomicU64 = AtomicU64::new(64 << 20);
/// Smallest window: one request of 256 KiB at a time, four of them at most.
const MIN_WINDOW: u64 = 1 << 20;

/// Sets the window of every later [`ChunkStore::fetch_ordered`] of this process (at least
/// 1 MiB): bytes of requests running plus verified chunks waiting. Requests coalesce up to
/// a quarter of it (at most [`MAX_REQUEST`]); a single frame larger than that still gets
/// a request of its own.
pub fn set_fetch_window(bytes: u64) {
    WINDOW.store(bytes.max(MIN_WINDOW), Ordering::Relaxed);
}

fn window() -> u64 {
    WINDOW.load(Ordering::Relaxed)
}

/// Largest coalesced request under the current window.
fn max_request() -> u64 {
    (window() / 4).min(MAX_REQUEST)
}
/// Frame bytes of consecutive wanted chunks that one round of coalescing considers
/// together: a request never covers chunks needed further apart than this.
const SEGMENT: u64 = 16 << 20;

/// Fetches the verified chunks of one index from the packs of a store.
pub struct PackFetcher {
    shared: Arc<Shared>,
    /// Threads of [`ChunkStore::fetch_ordered`], started on its first call: a fetcher
    /// that only serves single chunks (an NBD export) has none.
    pool: OnceLock<Pool>,
    threads: usize,
}

struct Shared {
    store: Arc<dyn StoreRead>,
    location: String,
    root: [u8; 32],
    /// The index's distinct non-zero chunk ids, in order, until the location file is read.
    distinct: Mutex<Option<Vec<ChunkId>>>,
    located: OnceLock<Located>,
    /// Largest gap between frames one request reads through.
    max_gap: u64,
}

/// What the location file says.
struct Located {
    packs: Vec<PackId>,
    places: HashMap<ChunkId, Location>,
}

impl std::fmt::Debug for PackFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackFetcher")
            .field("store", &self.shared.location)
            .field("index", &ChunkId(self.shared.root))
            .finish()
    }
}

impl PackFetcher {
    /// Reads and checks the location file of `index` in `store` now.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the store has no location file for the index (it was
    /// not made into this store), [`Error::CorruptStore`] when the file is malformed or
    /// describes another index, I/O or transport errors.
    pub fn open(store: Arc<dyn StoreRead>, index: &Index) -> Result<PackFetcher> {
        let fetcher = PackFetcher::open_lazy(store, index);
        fetcher.shared.located()?;
        Ok(fetcher)
    }

    /// Like [`PackFetcher::open`], but reads the location file only when the first chunk
    /// is fetched (its errors are then that fetch's): for a cache in front, which may hold
    /// every chunk while the store is unreachable.
    pub fn open_lazy(store: Arc<dyn StoreRead>, index: &Index) -> PackFetcher {
        let mut distinct = Vec::new();
        let mut seen = HashSet::new();
        for e in index.chunks().iter().filter(|e| !e.zero) {
            if seen.insert(e.id) {
                distinct.push(e.id);
            }
        }
        let threads = store.in_flight().max(2);
        PackFetcher {
            shared: Arc::new(Shared {
                location: store.location(),
                store,
                root: index.root_hash(),
                distinct: Mutex::new(Some(distinct)),
                located: OnceLock::new(),
                max_gap: max_gap(),
            }),
            pool: OnceLock::new(),
            threads,
        }
    }

    fn pool(&self) -> &Pool {
        self.pool
            .get_or_init(|| Pool::new(self.threads, "tessera-fetch"))
    }
}

/// Whether a store refused a request (an I/O error of kind `PermissionDenied`: HTTP 401,
/// 403, 407, a TLS failure), which no further request would change.
fn refused(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
}

/// `base/rel`, without doubling a slash.
fn join(base: &str, rel: &str) -> String {
    format!("{}/{rel}", base.trim_end_matches('/'))
}

impl Shared {
    /// The location file's content, read on first use.
    fn located(&self) -> Result<&Located> {
        if let Some(l) = self.located.get() {
            return Ok(l);
        }
        // One reader at a time; the others then find it read.
        let mut distinct = self.distinct.lock().expect("distinct ids");
        if let Some(l) = self.located.get() {
            return Ok(l);
        }
        let ids = distinct
            .as_ref()
            .expect("ids are kept until the file is read");
        let rel = locations_path(&self.root);
        // Header, pack ids (at most one per record that names it) and zstd's worst case.
        let limit = 4096 + ids.len() as u64 * 64;
        let bytes = self.store.read_file(&rel, limit)?.ok_or_else(|| {
            Error::InvalidInput(format!(
                "store {} has no location data for index {} ({rel}): was the index made \
                 into this store?",
                self.location,
                ChunkId(self.root)
            ))
        })?;
        let origin = join(&self.location, &rel);
        let locs = Locations::parse(&bytes, &self.root, ids.len(), &origin)?;
        let ids = distinct
            .take()
            .expect("ids are kept until the file is read");
        let located = Located {
            packs: locs.packs,
            places: ids.into_iter().zip(locs.records).collect(),
        };
        Ok(self.located.get_or_init(|| located))
    }

    fn place(&self, entry: &ChunkEntry) -> Result<(Location, String)> {
        let located = self.located()?;
        let place = located
            .places
            .get(&entry.id)
            .ok_or_else(|| Error::MissingChunk {
                id: entry.id,
                origin: format!(
                    "the location data of this index in {} (the index does not name it)",
                    self.location
                ),
            })?;
        let rel = pack_path(&located.packs[place.pack as usize]);
        // No frame of a chunk is longer than zstd's bound for its length: a longer one in
        // the location file is refused before anything that large is requested.
        let bound = zstd::zstd_safe::compress_bound(entry.len as usize);
        if place.clen as usize > bound {
            return Err(Error::CorruptChunk {
                id: entry.id,
                origin: self.origin(&rel, place.offset),
                reason: format!(
                    "the location file gives its frame {} bytes, more than any frame of a \
                     {}-byte chunk",
                    place.clen, entry.len
                ),
            });
        }
        Ok((*place, rel))
    }

    fn origin(&self, rel: &str, offset: u64) -> String {
        format!("{} (offset {offset})", join(&self.location, rel))
    }

    /// The error for a chunk whose pack does not exist.
    fn missing(&self, entry: &ChunkEntry, rel: &str) -> Error {
        Error::MissingChunk {
            id: entry.id,
            origin: format!("{}, which does not exist", join(&self.location, rel)),
        }
    }

    /// One chunk on its own: one range request, verified, fetched again on corruption.
    fn fetch_one(&self, entry: &ChunkEntry) -> Result<Fetched> {
        let (place, rel) = self.place(entry)?;
        let origin = self.origin(&rel, place.offset);
        let mut downloaded = 0;
        let mut requests = 0;
        let mut attempt = 0;
        loop {
            requests += 1;
            let frame = match self
                .store
                .read_range(&rel, place.offset, u64::from(place.clen))
            {
                Ok(f) => f,
                Err(Error::MissingFile { .. }) => return Err(self.missing(entry, &rel)),
                Err(e) => return Err(e),
            };
            downloaded += frame.len() as u64;
            match decompress_verified(entry.id, &frame, entry.len, &origin) {
                Ok(chunk) => {
                    return Ok(Fetched {
                        chunk,
                        compressed: frame,
                        downloaded,
                        requests,
                    })
                }
                Err(e) => {
                    self.store
                        .bad_bytes(&rel, place.offset, u64::from(place.clen), &e);
                    if attempt >= self.store.retries() {
                        return Err(e);
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Runs one coalesced request and splits it into verified chunks, by want.
    fn run(&self, req: &Request, entries: &[ChunkEntry]) -> Vec<Result<Fetched>> {
        let located = match self.located() {
            Ok(l) => l,
            Err(_) => return entries.iter().map(|e| self.fetch_one(e)).collect(),
        };
        let rel = pack_path(&located.packs[req.pack as usize]);
        let bytes = match self.store.read_range(&rel, req.offset, req.len) {
            Ok(b) => b,
            Err(Error::MissingFile { .. }) => {
                return entries.iter().map(|e| Err(self.missing(e, &rel))).collect()
            }
            // A refusal (credentials, TLS trust) is the same for every chunk: asking for
            // each on its own would only repeat it, once per chunk.
            Err(e) if refused(&e) => {
                let why = match &e {
                    Error::Io { source, .. } => format!("{e}: {source}"),
                    e => e.to_string(),
                };
                let mut first = Some(e);
                return entries
                    .iter()
                    .map(|entry| {
                        Err(first.take().unwrap_or_else(|| Error::MissingChunk {
                            id: entry.id,
                            origin: format!("{} ({why})", self.location),
                        }))
                    })
                    .collect();
            }
            // Each chunk on its own: its own error, or its bytes after all.
            Err(_) => return entries.iter().map(|e| self.fetch_one(e)).collect(),
        };
        let frames: u64 = entries
            .iter()
            .filter_map(|e| located.places.get(&e.id))
            .map(|p| u64::from(p.clen))
            .sum();
        let mut gap = req.len.saturating_sub(frames);
        let mut first = true;
        entries
            .iter()
            .map(|e| {
                let (place, _) = self.place(e)?;
                let origin = self.origin(&rel, place.offset);
                let start = place.offset - req.offset;
                let frame = usize::try_from(start)
                    .ok()
                    .and_then(|s| bytes.get(s..s.checked_add(place.clen as usize)?));
                let verified = frame
                    .ok_or_else(|| Error::CorruptChunk {
                        id: e.id,
                        origin: origin.clone(),
                        reason: "frame lies outside the bytes read".into(),
                    })
                    .and_then(|f| decompress_verified(e.id, f, e.len, &origin).map(|c| (c, f)));
                let share = std::mem::take(&mut gap) + u64::from(place.clen);
                let requests = u64::from(std::mem::take(&mut first));
                match verified {
                    Ok((chunk, frame)) => Ok(Fetched {
                        chunk,
                        compressed: frame.to_vec(),
                        downloaded: share,
                        requests,
                    }),
                    Err(e_first) => {
                        self.store
                            .bad_bytes(&rel, place.offset, u64::from(place.clen), &e_first);
                        if self.store.retries() == 0 {
                            return Err(e_first);
                        }
                        self.fetch_one(e).map(|mut f| {
                            f.downloaded += share;
                            f.requests += requests;
                            f
                        })
                    }
                }
            })
            .collect()
    }
}

impl Shared {
    /// The requests [`ChunkStore::fetch_ordered`] makes for `entries` (each naming its
    /// wants by position in `entries`), in the order they run, and the entries the
    /// location data has no place for, with their errors. The one planner of both the
    /// fetch and [`ChunkStore::estimate`].
    fn plan(&self, entries: &[ChunkEntry]) -> (VecDeque<Request>, Vec<(usize, Error)>) {
        let mut unplaced = Vec::new();
        let mut located = Vec::new();
        let mut wants = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match self.place(e) {
                Ok((place, _)) => {
                    located.push(i);
                    wants.push(Want {
                        pack: place.pack,
                        offset: place.offset,
                        clen: place.clen,
                    });
                }
                Err(err) => unplaced.push((i, err)),
            }
        }
        let queue = plan_requests(&wants, self.max_gap, max_request(), SEGMENT)
            .into_iter()
            .map(|mut r| {
                for w in &mut r.wants {
                    *w = located[*w];
                }
                r
            })
            .collect();
        (queue, unplaced)
    }
}

impl ChunkStore for PackFetcher {
    fn location(&self) -> String {
        self.shared.location.clone()
    }

    fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched> {
        self.shared.fetch_one(entry)
    }

    fn fetch_ordered<'a>(&'a self, entries: Vec<ChunkEntry>) -> FetchStream<'a> {
        if entries.is_empty() {
            return Box::new(std::iter::empty());
        }
        if let Err(e) = self.shared.located() {
            // Every chunk fails for the same reason: the first with the error, the others
            // naming it.
            let why = e.to_string();
            let location = self.shared.location.clone();
            let rest = entries.into_iter().skip(1).map(move |entry| {
                Err(Error::MissingChunk {
                    id: entry.id,
                    origin: format!("{location} ({why})"),
                })
            });
            return Box::new(std::iter::once(Err(e)).chain(rest));
        }
        let (queue, unplaced) = self.shared.plan(&entries);
        let ready = unplaced
            .into_iter()
            .map(|(i, err)| (i, (Err(err), 0)))
            .collect();
        Box::new(Ordered {
            fetcher: self,
            entries,
            next: 0,
            ready,
            held: 0,
            queue,
            running: VecDeque::new(),
            cancelled: Arc::new(AtomicBool::new(false)),
        })
    }

    fn in_flight(&self) -> usize {
        self.shared.store.in_flight()
    }

    fn estimate(&self, entries: &[ChunkEntry]) -> Result<Estimate> {
        if entries.is_empty() {
            return Ok(Estimate::default());
        }
        self.shared.located()?;
        let (queue, unplaced) = self.shared.plan(entries);
        if let Some((_, err)) = unplaced.into_iter().next() {
            return Err(err);
        }
        Ok(Estimate {
            bytes: queue.iter().map(|r| r.len).sum(),
            requests: queue.len() as u64,
        })
    }
}

/// Results of one request: (position in the caller's list, result).
type Batch = Vec<(usize, Result<Fetched>)>;

struct Ordered<'a> {
    fetcher: &'a PackFetcher,
    entries: Vec<ChunkEntry>,
    next: usize,
    /// Results not yet taken, with the bytes each holds.
    ready: HashMap<usize, (Result<Fetched>, u64)>,
    /// Bytes of running requests plus results not yet taken.
    held: u64,
    queue: VecDeque<Request>,
    running: VecDeque<(u64, Receiver<Batch>)>,
    cancelled: Arc<AtomicBool>,
}

impl Ordered<'_> {
    fn start(&mut self) {
        while self.running.len() < self.fetcher.threads {
            let Some(head) = self.queue.front() else {
                break;
            };
            if !self.running.is_empty() && self.held + head.len > window() {
                break;
            }
            let req = self.queue.pop_front().expect("queue has a head");
            let wanted: Vec<ChunkEntry> = req.wants.iter().map(|&i| self.entries[i]).collect();
            let (tx, rx) = bounded(1);
            let shared = Arc::clone(&self.fetcher.shared);
            let cancelled = Arc::clone(&self.cancelled);
            let len = req.len;
            self.fetcher.pool().spawn(move || {
                if cancelled.load(Ordering::Relaxed) {
                    return;
                }
                let results = shared.run(&req, &wanted);
                let _ = tx.send(req.wants.into_iter().zip(results).collect());
            });
            self.held += len;
            self.running.push_back((len, rx));
        }
    }
}

impl Iterator for Ordered<'_> {
    type Item = Result<Fetched>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.entries.len() {
            return None;
        }
        loop {
            if let Some((result, bytes)) = self.ready.remove(&self.next) {
                self.held -= bytes;
                self.next += 1;
                return Some(result);
            }
            self.start();
            let Some((len, rx)) = self.running.pop_front() else {
                // Every entry is in a request or ready: unreachable, but never hang.
                let id = self.entries[self.next].id;
                self.next += 1;
                return Some(Err(Error::InvalidInput(format!(
                    "chunk {id} was in no planned request"
                ))));
            };
            self.held -= len;
            let batch = rx.recv().unwrap_or_default();
            for (i, result) in batch {
                let bytes = result
                    .as_ref()
                    .map_or(0, |f| (f.compressed.len() + f.chunk.data().len()) as u64);
                self.held += bytes;
                self.ready.insert(i, (result, bytes));
            }
            if !self.ready.contains_key(&self.next)
                && self.running.is_empty()
                && self.queue.is_empty()
            {
                // A fetch thread died before answering.
                let id = self.entries[self.next].id;
                self.next += 1;
                return Some(Err(Error::InvalidInput(format!(
                    "a fetch thread died while fetching chunk {id}"
                ))));
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.entries.len() - self.next;
        (n, Some(n))
    }
}

impl Drop for Ordered<'_> {
    fn drop(&mut self) {
        // Requests not started yet see this and are skipped.
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Worker threads that run blocking jobs; they end when the pool is dropped.
struct Pool {
    tx: Sender<Job>,
}

impl Pool {
    fn new(threads: usize, name: &str) -> Pool {
        let threads = threads.max(1);
        let (tx, rx) = unbounded::<Job>();
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .expect("spawning a fetch thread");
        }
        Pool { tx }
    }

    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        // The threads only stop when `tx` is dropped, so sending cannot fail.
        let _ = self.tx.send(Box::new(job));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::chunk::compress;
    use crate::chunker::ChunkerParams;
    use crate::pack::PackBuilder;
    use crate::store::{LocalStore, StoreWrite};

    fn data(i: usize) -> Vec<u8> {
        let mut d = vec![0u8; 3000 + i * 10];
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut d);
        d
    }

    /// An index of `n` chunks written in one pack (in index order) with its location file.
    fn fixture(dir: &std::path::Path, n: usize) -> (Arc<LocalStore>, Index, PackId) {
        let store = Arc::new(LocalStore::open(dir.join("s"), true).unwrap());
        let mut b = PackBuilder::new();
        let mut records = Vec::new();
        let mut places = Vec::new();
        for i in 0..n {
            let d = data(i);
            let id = ChunkId::of(&d);
            let frame = compress(&d);
            let offset = b.push(id, &frame, d.len() as u32);
            records.push((id, d.len() as u32));
            places.push(Location {
                pack: 0,
                offset,
                clen: frame.len() as u32,
            });
        }
        let pack = b.finish();
        store.put_pack(&pack.id, &pack.bytes).unwrap();
        let index = Index::new(ChunkerParams::default(), [0; 32], records).unwrap();
        let locs = Locations {
            root: index.root_hash(),
            packs: vec![pack.id],
            records: places,
        };
        store
            .put_file(&locations_path(&index.root_hash()), &locs.to_bytes())
            .unwrap();
        (store, index, pack.id)
    }

    /// A store whose first `bad` range answers have a byte flipped; counts the bad bytes
    /// it is told of.
    struct Flaky {
        inner: Arc<LocalStore>,
        bad: AtomicU32,
        retries: u32,
        told: AtomicU32,
    }

    impl StoreRead for Flaky {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
            self.inner.read_file(rel, limit)
        }
        fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
            let mut b = self.inner.read_range(rel, offset, len)?;
            let left = self.bad.load(Ordering::SeqCst);
            if left > 0 {
                self.bad.store(left - 1, Ordering::SeqCst);
                let mid = b.len() / 2;
                b[mid] ^= 0x40;
            }
            Ok(b)
        }
        fn file_size(&self, rel: &str) -> Result<Option<u64>> {
            self.inner.file_size(rel)
        }
        fn list_packs(&self) -> Result<Vec<PackId>> {
            self.inner.list_packs()
        }
        fn retries(&self) -> u32 {
            self.retries
        }
        fn bad_bytes(&self, rel: &str, _: u64, _: u64, why: &Error) {
            assert!(rel.starts_with("packs/"));
            assert_eq!(why.kind(), crate::ErrorKind::CorruptChunk);
            self.told.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn neighbours_are_coalesced_and_gaps_counted_as_downloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (store, index, _) = fixture(dir.path(), 40);
        let f = PackFetcher::open(store, &index).unwrap();
        let all: Vec<ChunkEntry> = index.chunks().to_vec();
        let frames: u64 = all
            .iter()
            .map(|e| u64::from(f.shared.located().unwrap().places[&e.id].clen))
            .sum();
        let got: Vec<Fetched> = f.fetch_ordered(all.clone()).map(|r| r.unwrap()).collect();
        assert_eq!(
            got.iter().map(|g| g.chunk.id()).collect::<Vec<_>>(),
            all.iter().map(|e| e.id).collect::<Vec<_>>()
        );
        assert_eq!(
            got.iter().map(|g| g.requests).sum::<u64>(),
            1,
            "one request"
        );
        assert_eq!(got.iter().map(|g| g.downloaded).sum::<u64>(), frames);
        // Every other chunk, asked in reverse: still one request, gaps downloaded too.
        let some: Vec<ChunkEntry> = all.iter().step_by(2).rev().copied().collect();
        let got: Vec<Fetched> = f.fetch_ordered(some.clone()).map(|r| r.unwrap()).collect();
        assert_eq!(
            got.iter().map(|g| g.chunk.id()).collect::<Vec<_>>(),
            some.iter().map(|e| e.id).collect::<Vec<_>>(),
            "yielded in the order asked"
        );
        assert_eq!(got.iter().map(|g| g.requests).sum::<u64>(), 1);
        let first = f.shared.located().unwrap().places[&all[0].id];
        let last = f.shared.located().unwrap().places[&all[38].id];
        let span = last.offset + u64::from(last.clen) - first.offset;
        assert_eq!(got.iter().map(|g| g.downloaded).sum::<u64>(), span);
        // One chunk alone.
        let one = f.fetch_verified(&all[7]).unwrap();
        assert_eq!((one.requests, one.chunk.data()), (1, &data(7)[..]));
    }

    /// Counts range requests in flight at once.
    struct Concurrent {
        inner: Arc<LocalStore>,
        now: std::sync::atomic::AtomicUsize,
        peak: std::sync::atomic::AtomicUsize,
    }

    impl StoreRead for Concurrent {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
            self.inner.read_file(rel, limit)
        }
        fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            let got = self.inner.read_range(rel, offset, len);
            self.now.fetch_sub(1, Ordering::SeqCst);
            got
        }
        fn file_size(&self, rel: &str) -> Result<Option<u64>> {
            self.inner.file_size(rel)
        }
        fn list_packs(&self) -> Result<Vec<PackId>> {
            self.inner.list_packs()
        }
        fn in_flight(&self) -> usize {
            3
        }
    }

    #[test]
    fn far_apart_chunks_are_separate_requests_within_the_in_flight_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (store, index, _) = fixture(dir.path(), 1500);
        let counting = Arc::new(Concurrent {
            inner: store,
            now: Default::default(),
            peak: Default::default(),
        });
        let f = PackFetcher::open(counting.clone(), &index).unwrap();
        // Every 120th chunk: gaps of about 400 KiB, more than MAX_GAP.
        let some: Vec<ChunkEntry> = index.chunks().iter().step_by(120).copied().collect();
        let got: Vec<Fetched> = f.fetch_ordered(some.clone()).map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), some.len());
        assert_eq!(
            got.iter().map(|g| g.requests).sum::<u64>(),
            some.len() as u64
        );
        assert_eq!(
            got.iter().map(|g| g.downloaded).sum::<u64>(),
            got.iter().map(|g| g.compressed.len() as u64).sum::<u64>(),
            "no gap read"
        );
        for (g, e) in got.iter().zip(&some) {
            assert_eq!(g.chunk.id(), e.id);
        }
        assert!(
            counting.peak.load(Ordering::SeqCst) <= 3,
            "never more than in_flight"
        );
    }

    #[test]
    fn a_corrupt_answer_is_fetched_again_up_to_the_retries() {
        let dir = tempfile::tempdir().unwrap();
        let (store, index, pack) = fixture(dir.path(), 10);
        let all: Vec<ChunkEntry> = index.chunks().to_vec();
        let flaky = Arc::new(Flaky {
            inner: store.clone(),
            bad: AtomicU32::new(2),
            retries: 2,
            told: AtomicU32::new(0),
        });
        let f = PackFetcher::open(flaky.clone(), &index).unwrap();
        let got: Vec<Fetched> = f.fetch_ordered(all.clone()).map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), 10);
        // The coalesced answer was bad for one chunk; its refetch was bad once more. The
        // store was told of each bad answer before it was asked again.
        assert_eq!(got.iter().map(|g| g.requests).sum::<u64>(), 3);
        assert_eq!(flaky.told.load(Ordering::SeqCst), 2);
        // Without retries the error names the chunk, the pack and the offset.
        let f = PackFetcher::open(
            Arc::new(Flaky {
                inner: store,
                bad: AtomicU32::new(1),
                retries: 0,
                told: AtomicU32::new(0),
            }),
            &index,
        )
        .unwrap();
        let err = f.fetch_verified(&all[3]).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind(), crate::ErrorKind::CorruptChunk);
        assert!(
            msg.contains(&all[3].id.to_string())
                && msg.contains(&pack_path(&pack))
                && msg.contains("offset"),
            "{msg}"
        );
    }

    /// A store that refuses every range request (as HTTP 401 does), counting them.
    struct Refusing {
        inner: Arc<LocalStore>,
        asked: AtomicU32,
    }

    impl StoreRead for Refusing {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
            self.inner.read_file(rel, limit)
        }
        fn read_range(&self, rel: &str, _: u64, _: u64) -> Result<Vec<u8>> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let e = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "HTTP 401");
            Err(Error::io("fetching", rel, e))
        }
        fn file_size(&self, rel: &str) -> Result<Option<u64>> {
            self.inner.file_size(rel)
        }
        fn list_packs(&self) -> Result<Vec<PackId>> {
            self.inner.list_packs()
        }
        fn retries(&self) -> u32 {
            5
        }
    }

    /// A refusal is not asked again chunk by chunk: one request, every chunk failing
    /// with it.
    #[test]
    fn a_refused_request_is_not_repeated_per_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (store, index, _) = fixture(dir.path(), 20);
        let refusing = Arc::new(Refusing {
            inner: store,
            asked: AtomicU32::new(0),
        });
        let f = PackFetcher::open(refusing.clone(), &index).unwrap();
        let errs: Vec<String> = f
            .fetch_ordered(index.chunks().to_vec())
            .map(|r| r.unwrap_err().to_string())
            .collect();
        assert_eq!(errs.len(), 20);
        assert!(errs[1].contains("HTTP 401"), "{errs:?}");
        assert_eq!(refusing.asked.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn missing_packs_and_location_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (store, index, pack) = fixture(dir.path(), 5);
        let f = PackFetcher::open(store.clone(), &index).unwrap();
        std::fs::remove_file(store.path_of(&pack_path(&pack))).unwrap();
        let all: Vec<ChunkEntry> = index.chunks().to_vec();
        for (r, e) in f.fetch_ordered(all.clone()).zip(&all) {
            let err = r.unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::MissingChunk);
            let msg = err.to_string();
            assert!(
                msg.contains(&e.id.to_string()) && msg.contains(&pack_path(&pack)),
                "{msg}"
            );
        }
        std::fs::remove_file(store.path_of(&locations_path(&index.root_hash()))).unwrap();
        let err = PackFetcher::open(store.clone(), &index)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has no location data for index")
                && err.contains(&locations_path(&index.root_hash())),
            "{err}"
        );
        // Opened lazily, nothing is read until a chunk is wanted; then the error is the
        // fetch's, for every chunk.
        let lazy = PackFetcher::open_lazy(store, &index);
        assert_eq!(lazy.fetch_ordered(Vec::new()).count(), 0);
        let errs: Vec<String> = lazy
            .fetch_ordered(all.clone())
            .map(|r| r.unwrap_err().to_string())
            .collect();
        assert_eq!(errs.len(), all.len());
        assert!(
            errs.iter().all(|e| e.contains("no location data")),
            "{errs:?}"
        );
        assert!(lazy.fetch_verified(&all[0]).is_err());
        // A frame length past zstd's bound is refused before any request.
        let mut huge = all[0];
        huge.len = 10;
        let err = f.fetch_verified(&huge).unwrap_err().to_string();
        assert!(err.contains("more than any frame"), "{err}");
        // A chunk the index does not name.
        let other = ChunkEntry {
            id: ChunkId::of(b"other"),
            offset: 0,
            len: 5,
            zero: false,
        };
        let err = f.fetch_verified(&other).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::MissingChunk);
    }
}
