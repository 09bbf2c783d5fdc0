//! A local, size-bounded cache in front of another (usually remote) store.
//!
//! The cache is a [`LocalStore`] directory holding chunk files exactly as the remote
//! serves them. Only chunks that passed verification are written to it, and every hit is
//! verified again on its way out, so a damaged cache file costs a re-fetch, never a wrong
//! byte. Each hit bumps the file's modification time; when the directory grows past its
//! bound, the least recently used files are deleted until it is back under 90 % of it.
//!
//! # Several processes at once
//! Any number of `sync` and `serve` processes may share one cache directory with no lock:
//! - chunk files appear atomically (temporary name, then rename), so a reader sees a
//!   whole file or none;
//! - a file deleted by another process's eviction is either already open (Linux keeps
//!   its bytes until closed) or not found, which is an ordinary miss;
//! - two processes evicting at once may delete a little more than needed, which costs
//!   re-fetches only.
//!
//! Each process keeps an estimate of the directory size (scanned at open, then increased
//! by its own writes); an eviction rescans the directory, so other processes' writes are
//! counted there.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{ChunkStore, FetchStream, Fetched, LocalStore, StoredChunk};
use crate::chunk::decompress_verified;
use crate::error::{Error, Result};
use crate::index::ChunkEntry;
use crate::ChunkId;

/// Settings of a [`CacheStore`].
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Bound on the bytes of chunk files kept; default 10 GiB.
    pub max_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            max_bytes: 10 << 30,
        }
    }
}

/// A local cache directory in front of another store. See the module documentation.
pub struct CacheStore {
    local: LocalStore,
    remote: Arc<dyn ChunkStore>,
    max_bytes: u64,
    /// Estimated bytes of chunk files in the directory.
    used: AtomicU64,
    evicting: AtomicBool,
    evict_lock: Mutex<()>,
}

/// Temporary files older than this are debris of a killed process.
const STALE_TEMP: Duration = Duration::from_secs(3600);

impl CacheStore {
    /// Opens (creating it if needed) the cache directory `dir` in front of `remote`.
    ///
    /// # Errors
    /// [`Error::Io`] if the directory cannot be created or scanned.
    pub fn open(
        dir: impl Into<PathBuf>,
        remote: Arc<dyn ChunkStore>,
        opts: &CacheOptions,
    ) -> Result<CacheStore> {
        let local = LocalStore::open(dir, true)?;
        let used = scan(local.root())?.iter().map(|f| f.len).sum();
        Ok(CacheStore {
            local,
            remote,
            max_bytes: opts.max_bytes,
            used: AtomicU64::new(used),
            evicting: AtomicBool::new(false),
            evict_lock: Mutex::new(()),
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        self.local.root()
    }

    /// The store behind the cache.
    pub fn remote(&self) -> &Arc<dyn ChunkStore> {
        &self.remote
    }

    /// A verified hit, or `None` (a damaged cache file is deleted and counts as a miss).
    fn hit(&self, entry: &ChunkEntry) -> Option<Fetched> {
        let path = self.local.path_of(&entry.id);
        let compressed = self.local.get_compressed(&entry.id).ok()??;
        let origin = path.display().to_string();
        match decompress_verified(entry.id, &compressed, entry.len, &origin) {
            Ok(chunk) => {
                // LRU: a hit makes the file young again. Best effort.
                if let Ok(f) = fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(Fetched { chunk, compressed })
            }
            Err(_) => {
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps a verified chunk; failures only cost a later re-fetch.
    fn keep(&self, fetched: &Fetched) {
        let id = fetched.chunk.id();
        if let Ok(true) = self.local.put_compressed(&id, &fetched.compressed) {
            let used = self
                .used
                .fetch_add(fetched.compressed.len() as u64, Ordering::Relaxed)
                + fetched.compressed.len() as u64;
            if used > self.max_bytes {
                let _ = self.evict();
            }
        }
    }

    /// Deletes least recently used chunk files until the directory is under 90 % of its
    /// bound. Runs in one thread of this process at a time; others skip it.
    ///
    /// # Errors
    /// [`Error::Io`] if the directory cannot be scanned.
    pub fn evict(&self) -> Result<()> {
        if self.evicting.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _guard = self.evict_lock.lock().expect("evict lock");
        let result = (|| {
            let mut files = scan(self.local.root())?;
            let mut total: u64 = files.iter().map(|f| f.len).sum();
            let low = self.max_bytes / 10 * 9;
            if total > self.max_bytes {
                files.sort_by_key(|f| f.mtime);
                for f in files {
                    if total <= low {
                        break;
                    }
                    match fs::remove_file(&f.path) {
                        Ok(()) => total -= f.len,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => total -= f.len,
                        Err(_) => {}
                    }
                }
            }
            self.used.store(total, Ordering::Relaxed);
            Ok(())
        })();
        self.evicting.store(false, Ordering::Release);
        result
    }

    /// Bytes of chunk files this process believes the cache holds.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl ChunkStore for CacheStore {
    fn location(&self) -> String {
        self.remote.location()
    }

    fn get_compressed(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        // Unverified bytes are never cached: only `fetch_*` (which knows the length) fills it.
        match self.local.get_compressed(id)? {
            Some(bytes) => Ok(Some(bytes)),
            None => self.remote.get_compressed(id),
        }
    }

    // Writers ask whether the store has a chunk: a cache hit is not the store's file.
    fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.remote.contains(id)
    }

    fn check_stored(&self, id: &ChunkId, data: &[u8]) -> Result<StoredChunk> {
        self.remote.check_stored(id, data)
    }

    fn put_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<bool> {
        self.remote.put_compressed(id, compressed)
    }

    fn replace_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<()> {
        self.remote.replace_compressed(id, compressed)
    }

    fn flush(&self) -> Result<()> {
        self.remote.flush()
    }

    fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched> {
        if let Some(hit) = self.hit(entry) {
            return Ok(hit);
        }
        let fetched = self.remote.fetch_verified(entry)?;
        self.keep(&fetched);
        Ok(fetched)
    }

    fn fetch_ordered<'a>(&'a self, entries: Vec<ChunkEntry>) -> FetchStream<'a> {
        // Misses go to the remote's pipelined stream, in the same relative order; hits
        // are read here as the consumer reaches them.
        let cached: Vec<bool> = entries
            .iter()
            .map(|e| self.local.contains(&e.id).unwrap_or(false))
            .collect();
        let misses: Vec<ChunkEntry> = entries
            .iter()
            .zip(&cached)
            .filter(|(_, c)| !**c)
            .map(|(e, _)| *e)
            .collect();
        let mut remote = self.remote.fetch_ordered(misses);
        Box::new(
            entries
                .into_iter()
                .zip(cached)
                .map(move |(entry, was_cached)| {
                    if was_cached {
                        // Evicted or damaged since: fetch it alone.
                        return self.fetch_verified(&entry);
                    }
                    let fetched = remote.next().unwrap_or_else(|| {
                        Err(Error::InvalidInput(format!(
                            "store {} ended its stream before chunk {}",
                            self.remote.location(),
                            entry.id
                        )))
                    })?;
                    self.keep(&fetched);
                    Ok(fetched)
                }),
        )
    }

    fn in_flight(&self) -> usize {
        self.remote.in_flight()
    }
}

struct CachedFile {
    path: PathBuf,
    len: u64,
    mtime: SystemTime,
}

/// Lists the chunk files of a cache directory, deleting stale temporary files.
fn scan(root: &Path) -> Result<Vec<CachedFile>> {
    let chunks = root.join("chunks");
    let mut out = Vec::new();
    let dirs = match fs::read_dir(&chunks) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("scanning cache", &chunks, e)),
    };
    for dir in dirs.flatten() {
        let Ok(files) = fs::read_dir(dir.path()) else {
            continue; // Removed meanwhile, or not a directory.
        };
        for f in files.flatten() {
            let Ok(meta) = f.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if f.file_name().to_string_lossy().starts_with('.') {
                // Another process's file in the making, or debris of a killed one.
                if mtime.elapsed().is_ok_and(|age| age > STALE_TEMP) {
                    let _ = fs::remove_file(f.path());
                }
                continue;
            }
            out.push(CachedFile {
                path: f.path(),
                len: meta.len(),
                mtime,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::compress;
    use crate::store::chunk_path;
    use std::sync::atomic::AtomicUsize;

    /// A store that counts fetches from a local directory.
    struct Counting {
        inner: LocalStore,
        fetches: AtomicUsize,
    }

    impl ChunkStore for Counting {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn get_compressed(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            self.inner.get_compressed(id)
        }
        fn contains(&self, id: &ChunkId) -> Result<bool> {
            self.inner.contains(id)
        }
        fn put_compressed(&self, id: &ChunkId, c: &[u8]) -> Result<bool> {
            self.inner.put_compressed(id, c)
        }
    }

    fn entries(remote: &LocalStore, n: usize, size: usize) -> Vec<ChunkEntry> {
        (0..n)
            .map(|i| {
                // Incompressible-ish bytes so that file sizes are predictable.
                let data: Vec<u8> = (0..size)
                    .map(|j| {
                        ((i * 7919 + j * 31) as u32)
                            .wrapping_mul(2654435761)
                            .to_le_bytes()[3]
                    })
                    .collect();
                let id = ChunkId::of(&data);
                remote.put_compressed(&id, &compress(&data)).unwrap();
                ChunkEntry {
                    id,
                    offset: (i * size) as u64,
                    len: size as u32,
                    zero: false,
                }
            })
            .collect()
    }

    #[test]
    fn hits_are_served_locally_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalStore::open(dir.path().join("remote"), true).unwrap();
        let es = entries(&remote, 4, 5000);
        let counting = Arc::new(Counting {
            inner: remote,
            fetches: AtomicUsize::new(0),
        });
        let cache = CacheStore::open(
            dir.path().join("cache"),
            counting.clone(),
            &CacheOptions::default(),
        )
        .unwrap();
        for e in &es {
            cache.fetch(e).unwrap();
        }
        assert_eq!(counting.fetches.load(Ordering::Relaxed), 4);
        let got: Vec<_> = cache
            .fetch_ordered(es.clone())
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got.len(), 4);
        assert_eq!(counting.fetches.load(Ordering::Relaxed), 4, "all hits");
        // A damaged cache file is dropped and fetched again.
        let victim = cache.dir().join(chunk_path(&es[1].id));
        let mut bytes = fs::read(&victim).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&victim, bytes).unwrap();
        assert_eq!(cache.fetch(&es[1]).unwrap().id(), es[1].id);
        assert_eq!(counting.fetches.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn evicts_least_recently_used_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let remote = LocalStore::open(dir.path().join("remote"), true).unwrap();
        let es = entries(&remote, 10, 20_000);
        let one = remote.get_compressed(&es[0].id).unwrap().unwrap().len() as u64;
        let remote: Arc<dyn ChunkStore> = Arc::new(remote);
        let cache = CacheStore::open(
            dir.path().join("cache"),
            remote,
            &CacheOptions { max_bytes: one * 5 },
        )
        .unwrap();
        for (i, e) in es.iter().enumerate() {
            cache.fetch(e).unwrap();
            // Keep chunk 0 hot.
            if i > 0 {
                cache.fetch(&es[0]).unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let files = scan(cache.dir()).unwrap();
        let total: u64 = files.iter().map(|f| f.len).sum();
        assert!(total <= one * 5, "{total} > {}", one * 5);
        assert!(cache.local.contains(&es[0].id).unwrap(), "hot chunk kept");
        assert!(cache.local.contains(&es[9].id).unwrap(), "newest kept");
        assert!(!cache.local.contains(&es[1].id).unwrap(), "oldest evicted");
    }
}
