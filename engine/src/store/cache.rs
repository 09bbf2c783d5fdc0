//! A local, size-bounded cache in front of another (usually remote) store.
//!
//! The cache is a directory holding one file per chunk (`chunks/XX/ID.zst`, the chunk's
//! zstd frame exactly as the store served it). Only chunks that passed verification are written to it, and every hit is
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
//! # Names it owns, and power cuts
//! The cache touches only names of its own shape: `chunks/XX/ID.zst` (XX the first two hex
//! digits of ID) and its temporary files `chunks/XX/.ID.zst.cache-tmp.RANDOM`. It never
//! follows a symbolic link: links at any of those places are skipped by the scan and
//! eviction, refused when reading (`O_NOFOLLOW`, and the directories above checked not to
//! be links), and never written through (temporary files are created with
//! `O_EXCL|O_NOFOLLOW` under a random name, then renamed without replacing anything).
//! Writes and removals work by name inside the fan-out directory, reached from the cache
//! root with `O_NOFOLLOW|O_DIRECTORY` at `chunks` and at `XX`: a directory swapped for a
//! link at any moment (after a scan, say) never redirects them elsewhere.
//!
//! Cache files are not synced: after a power cut a file may be missing, empty or cut
//! short. Each is verified when used, so such a file is a miss: it is deleted and the
//! chunk fetched again.
//!
//! Each process keeps an estimate of the directory size (scanned at open, then increased
//! by its own writes); an eviction rescans the directory, so other processes' writes are
//! counted there.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{ChunkStore, Estimate, FetchStream, Fetched};
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
    root: PathBuf,
    remote: Arc<dyn ChunkStore>,
    max_bytes: u64,
    /// Estimated bytes of chunk files in the directory.
    used: AtomicU64,
    evicting: AtomicBool,
    evict_lock: Mutex<()>,
}

/// Temporary files older than this are debris of a killed process.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// What marks the cache's temporary files: `.ID.zst` + this + 16 random hex digits.
const TEMP_TAG: &str = ".cache-tmp.";

/// Cache files larger than this are not read: no chunk compresses to more than its
/// 16 MiB maximum plus zstd's small overhead.
const MAX_CACHE_FILE: u64 = 17 << 20;

/// The relative path of a chunk's cache file: `chunks/<first 2 hex>/<hex>.zst`.
fn chunk_path(id: &ChunkId) -> String {
    let hex = id.to_string();
    format!("chunks/{}/{hex}.zst", &hex[..2])
}

/// Whether `path` is a directory itself, not a symbolic link to one.
fn real_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Whether `name` is a chunk file name (`ID.zst`, 64 lowercase hex digits) of fan-out
/// directory `fan` (its first two digits).
fn chunk_file_name(name: &str, fan: &str) -> bool {
    name.strip_suffix(".zst").is_some_and(|id| {
        id.len() == 64
            && id.starts_with(fan)
            && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Whether `name` is one of the cache's temporary files in fan-out directory `fan`.
fn temp_file_name(name: &str, fan: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|rest| rest.split_once(TEMP_TAG))
        .is_some_and(|(file, random)| {
            chunk_file_name(file, fan)
                && random.len() == 16
                && random.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

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
        let root = dir.into();
        fs::create_dir_all(&root).map_err(|e| Error::io("creating cache", &root, e))?;
        let used = scan(&root)?.iter().map(|f| f.len).sum();
        Ok(CacheStore {
            root,
            remote,
            max_bytes: opts.max_bytes,
            used: AtomicU64::new(used),
            evicting: AtomicBool::new(false),
            evict_lock: Mutex::new(()),
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The path of the cache file of `id`: `DIR/chunks/XX/ID.zst`.
    fn path_of(&self, id: &ChunkId) -> PathBuf {
        self.root.join(chunk_path(id))
    }

    /// Whether the cache has a file for `id` (not checked).
    fn has(&self, id: &ChunkId) -> bool {
        fs::symlink_metadata(self.path_of(id)).is_ok()
    }

    /// The store behind the cache.
    pub fn remote(&self) -> &Arc<dyn ChunkStore> {
        &self.remote
    }

    /// A verified hit, or `None` (a damaged cache file is deleted and counts as a miss).
    fn hit(&self, entry: &ChunkEntry) -> Option<Fetched> {
        let path = self.path_of(&entry.id);
        let (file, compressed) = self.read(&entry.id).ok()??;
        let origin = path.display().to_string();
        match decompress_verified(entry.id, &compressed, entry.len, &origin) {
            Ok(chunk) => {
                // LRU: a hit makes the file young again. Best effort.
                let _ = file.set_modified(SystemTime::now());
                Some(Fetched {
                    chunk,
                    compressed,
                    downloaded: 0,
                    requests: 0,
                })
            }
            Err(_) => {
                let _ = remove_owned(&self.root, &path);
                None
            }
        }
    }

    /// The cache file of `id` and its bytes; `None` when there is none. Never through a
    /// symbolic link.
    fn read(&self, id: &ChunkId) -> Result<Option<(File, Vec<u8>)>> {
        let path = self.path_of(id);
        if !path.parent().is_some_and(|d| self.owned_fan(d)) {
            return Ok(None);
        }
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            // Nothing there, or a link (not the cache's file): a miss.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
            Err(e) => return Err(Error::io("opening cache file", path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("inspecting cache file", &path, e))?;
        if !meta.is_file() || meta.len() > MAX_CACHE_FILE {
            return Ok(None);
        }
        let mut buf = Vec::with_capacity(meta.len() as usize);
        (&mut file)
            .take(MAX_CACHE_FILE)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("reading cache file", &path, e))?;
        Ok(Some((file, buf)))
    }

    /// Whether `fan` is a fan-out directory of this cache: a real directory (not a link)
    /// inside a real `chunks` directory.
    fn owned_fan(&self, fan: &Path) -> bool {
        fan.parent().is_some_and(real_dir) && real_dir(fan)
    }

    /// Writes a chunk file: a temporary file of a random name (`O_EXCL|O_NOFOLLOW`),
    /// renamed into place unless the chunk file exists. Returns whether it was written.
    /// Everything happens inside the fan-out directory reached from the cache root with
    /// `O_NOFOLLOW | O_DIRECTORY` (at `chunks` and at `XX`), so nothing is created through
    /// a directory swapped for a link, whenever that happens.
    fn insert(&self, id: &ChunkId, compressed: &[u8]) -> io::Result<bool> {
        use std::ffi::OsStr;
        let path = self.path_of(id);
        let name = path.file_name().expect("chunk paths have a name");
        let fan_name = path
            .parent()
            .and_then(Path::file_name)
            .expect("chunk paths have a fan-out directory");
        let dirs = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let root = File::open(&self.root)?;
        let chunks = match crate::sys::open_at(&root, OsStr::new("chunks"), dirs, 0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match crate::sys::mkdir_at(&root, OsStr::new("chunks"), 0o755) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
                crate::sys::open_at(&root, OsStr::new("chunks"), dirs, 0)?
            }
            other => other?,
        };
        let fan = match crate::sys::open_at(&chunks, fan_name, dirs, 0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match crate::sys::mkdir_at(&chunks, fan_name, 0o755) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
                crate::sys::open_at(&chunks, fan_name, dirs, 0)?
            }
            other => other?,
        };
        let tmp = std::ffi::OsString::from(format!(
            ".{}{TEMP_TAG}{}",
            name.to_string_lossy(),
            crate::sync::fs::random_suffix()
        ));
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let written = (|| {
            let mut f = crate::sys::open_at(&fan, &tmp, flags, 0o644)?;
            f.write_all(compressed)?;
            crate::sys::rename_at(&fan, &tmp, name, false)
        })();
        match written {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = crate::sys::unlink_at(&fan, &tmp);
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Keeps a verified chunk; failures only cost a later re-fetch.
    fn keep(&self, fetched: &Fetched) {
        let id = fetched.chunk.id();
        if let Ok(true) = self.insert(&id, &fetched.compressed) {
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
            let mut files = scan(&self.root)?;
            let mut total: u64 = files.iter().map(|f| f.len).sum();
            let low = self.max_bytes / 10 * 9;
            if total > self.max_bytes {
                files.sort_by_key(|f| f.mtime);
                for f in files {
                    if total <= low {
                        break;
                    }
                    match remove_owned(&self.root, &f.path) {
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
        let cached: Vec<bool> = entries.iter().map(|e| self.has(&e.id)).collect();
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

    /// The chunks the cache holds now cost nothing; the others are the remote's estimate.
    fn estimate(&self, entries: &[ChunkEntry]) -> Result<Estimate> {
        let misses: Vec<ChunkEntry> = entries
            .iter()
            .filter(|e| !self.has(&e.id))
            .copied()
            .collect();
        self.remote.estimate(&misses)
    }
}

/// Removes the cache's file `root/chunks/XX/NAME` (`path`) by name inside its fan-out
/// directory, reached from `root` with `O_NOFOLLOW | O_DIRECTORY` at `chunks` and at `XX`:
/// should either have been swapped for a symbolic link since the scan, nothing is removed
/// (`ELOOP`/`ENOTDIR`), never a file of the same name elsewhere.
fn remove_owned(root: &Path, path: &Path) -> io::Result<()> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "not a cache file path");
    let name = path.file_name().ok_or_else(bad)?;
    let fan = path.parent().and_then(Path::file_name).ok_or_else(bad)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let root = File::open(root)?;
    let chunks = crate::sys::open_at(&root, "chunks".as_ref(), flags, 0)?;
    let fan = crate::sys::open_at(&chunks, fan, flags, 0)?;
    crate::sys::unlink_at(&fan, name)
}

struct CachedFile {
    path: PathBuf,
    len: u64,
    mtime: SystemTime,
}

/// Lists the chunk files of a cache directory, deleting stale temporary files. Only
/// names of the cache's own shape are looked at; symbolic links (to files or to
/// directories) are skipped, never followed.
fn scan(root: &Path) -> Result<Vec<CachedFile>> {
    let chunks = root.join("chunks");
    let mut out = Vec::new();
    if !real_dir(&chunks) {
        return Ok(out);
    }
    let dirs = match fs::read_dir(&chunks) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("scanning cache", &chunks, e)),
    };
    for dir in dirs.flatten() {
        let fan = dir.file_name().to_string_lossy().into_owned();
        let fan_ok = fan.len() == 2 && fan.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        // `DirEntry::file_type` does not follow links: a link to a directory is skipped.
        if !fan_ok || !dir.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(files) = fs::read_dir(dir.path()) else {
            continue; // Removed meanwhile.
        };
        for f in files.flatten() {
            // Not followed either: a link is not a file here.
            let Ok(meta) = f.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let name = f.file_name().to_string_lossy().into_owned();
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if temp_file_name(&name, &fan) {
                // Another process's file in the making, or debris of a killed one.
                if mtime.elapsed().is_ok_and(|age| age > STALE_TEMP) {
                    let _ = remove_owned(root, &f.path());
                }
                continue;
            }
            if !chunk_file_name(&name, &fan) {
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
    use crate::chunk::{compress, VerifiedChunk};
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    /// A store that serves chunks from memory and counts fetches.
    #[derive(Default)]
    struct Counting {
        chunks: Mutex<HashMap<ChunkId, Vec<u8>>>,
        fetches: AtomicUsize,
    }

    impl ChunkStore for Counting {
        fn location(&self) -> String {
            "memory".into()
        }
        fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched> {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            let data = self.chunks.lock().unwrap()[&entry.id].clone();
            let compressed = compress(&data);
            Ok(Fetched {
                chunk: VerifiedChunk::verify(entry.id, data, "memory")?,
                downloaded: compressed.len() as u64,
                compressed,
                requests: 1,
            })
        }
        fn fetch_ordered<'a>(&'a self, entries: Vec<ChunkEntry>) -> FetchStream<'a> {
            Box::new(entries.into_iter().map(|e| self.fetch_verified(&e)))
        }
        fn in_flight(&self) -> usize {
            1
        }
    }

    fn entries(remote: &Counting, n: usize, size: usize) -> Vec<ChunkEntry> {
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
                remote.chunks.lock().unwrap().insert(id, data);
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
        let counting = Arc::new(Counting::default());
        let es = entries(&counting, 4, 5000);
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
        let remote = Counting::default();
        let es = entries(&remote, 10, 20_000);
        let one = remote.fetch_verified(&es[0]).unwrap().compressed.len() as u64;
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
        assert!(cache.has(&es[0].id), "hot chunk kept");
        assert!(cache.has(&es[9].id), "newest kept");
        assert!(!cache.has(&es[1].id), "oldest evicted");
    }

    fn cache_over(
        dir: &Path,
        n: usize,
        max_bytes: u64,
    ) -> (Arc<Counting>, CacheStore, Vec<ChunkEntry>) {
        let counting = Arc::new(Counting::default());
        let es = entries(&counting, n, 5000);
        let cache = CacheStore::open(
            dir.join("cache"),
            counting.clone(),
            &CacheOptions { max_bytes },
        )
        .unwrap();
        (counting, cache, es)
    }

    #[test]
    fn what_a_power_cut_leaves_in_the_cache_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let (counting, cache, es) = cache_over(dir.path(), 5, 1 << 30);
        for e in &es {
            cache.fetch(e).unwrap();
        }
        assert_eq!(counting.fetches.load(Ordering::Relaxed), 5);
        // Unsynced cache files after a cut: one empty, one cut short, one gone, and a
        // temporary file half written.
        let path = |i: usize| cache.dir().join(chunk_path(&es[i].id));
        fs::write(path(0), b"").unwrap();
        let half = fs::read(path(1)).unwrap();
        fs::write(path(1), &half[..half.len() / 2]).unwrap();
        fs::remove_file(path(2)).unwrap();
        let tmp = path(3).with_file_name(format!(
            ".{}{TEMP_TAG}0123456789abcdef",
            path(3).file_name().unwrap().to_string_lossy()
        ));
        fs::write(&tmp, b"half").unwrap();
        drop(cache);
        let cache = CacheStore::open(
            dir.path().join("cache"),
            counting.clone(),
            &CacheOptions::default(),
        )
        .unwrap();
        let got: Vec<_> = cache
            .fetch_ordered(es.clone())
            .map(|r| r.unwrap())
            .collect();
        for (g, e) in got.iter().zip(&es) {
            assert_eq!(g.chunk.id(), e.id);
        }
        assert_eq!(
            counting.fetches.load(Ordering::Relaxed),
            8,
            "exactly the 3 damaged"
        );
        for e in &es {
            cache.fetch(e).unwrap();
        }
        assert_eq!(
            counting.fetches.load(Ordering::Relaxed),
            8,
            "all repaired in the cache"
        );
    }

    #[test]
    fn scan_eviction_and_inserts_never_follow_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let (counting, cache, es) = cache_over(dir.path(), 4, 1);
        let chunks = cache.dir().join("chunks");
        // A link in place of chunk 0's file, to a victim outside.
        let victim = outside.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let p0 = cache.dir().join(chunk_path(&es[0].id));
        fs::create_dir_all(p0.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &p0).unwrap();
        // A link in place of chunk 1's fan-out directory, to a directory outside that
        // holds a file of a chunk's name.
        let p1 = cache.dir().join(chunk_path(&es[1].id));
        let fan1 = p1.parent().unwrap();
        let outside_fan = outside.join("fan");
        fs::create_dir(&outside_fan).unwrap();
        let bait = outside_fan.join(p1.file_name().unwrap());
        fs::write(&bait, vec![1u8; 100_000]).unwrap();
        assert_ne!(
            fan1,
            p0.parent().unwrap(),
            "pick chunks of two fan-out directories"
        );
        std::os::unix::fs::symlink(&outside_fan, fan1).unwrap();
        // Names the cache does not own.
        let foreign = p0.parent().unwrap().join("notes.txt");
        fs::write(&foreign, b"mine").unwrap();
        let old_dot = p0.parent().unwrap().join(".profile");
        fs::write(&old_dot, b"mine").unwrap();
        let f = File::options().write(true).open(&old_dot).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH).unwrap();
        // Fetch everything through the cache (its bound of 1 byte evicts all the time).
        for e in &es {
            assert_eq!(cache.fetch(e).unwrap().id(), e.id);
        }
        let got: Vec<_> = cache
            .fetch_ordered(es.clone())
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got.len(), 4);
        assert!(
            counting.fetches.load(Ordering::Relaxed) >= 8,
            "a link is never a hit"
        );
        cache.evict().unwrap();
        scan(cache.dir()).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&p0).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&bait).unwrap(), vec![1u8; 100_000]);
        assert_eq!(
            fs::read_dir(&outside_fan).unwrap().count(),
            1,
            "nothing written outside"
        );
        assert_eq!(fs::read(&foreign).unwrap(), b"mine");
        assert_eq!(fs::read(&old_dot).unwrap(), b"mine");
        assert!(chunks.is_dir());
    }

    /// The eviction removes what its scan found by name inside the directories it
    /// scanned: a fan-out directory swapped for a link after the scan (another user's
    /// race) never redirects the removal to a file of the same name elsewhere.
    #[test]
    fn eviction_never_follows_a_directory_swapped_after_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let (_counting, cache, es) = cache_over(dir.path(), 2, 1 << 30);
        for e in &es {
            cache.fetch(e).unwrap();
        }
        let files = scan(cache.dir()).unwrap();
        assert_eq!(files.len(), 2);
        let path = &files[0].path;
        let fan = path.parent().unwrap();
        // The fan-out directory moves away; a link to a directory holding a precious
        // file of the same name takes its place.
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let precious = elsewhere.join(path.file_name().unwrap());
        fs::write(&precious, b"precious").unwrap();
        fs::rename(fan, dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, fan).unwrap();
        assert!(remove_owned(cache.dir(), path).is_err());
        assert_eq!(fs::read(&precious).unwrap(), b"precious");
        // In place, the same call removes the cache's file.
        fs::remove_file(fan).unwrap();
        fs::rename(dir.path().join("moved"), fan).unwrap();
        remove_owned(cache.dir(), path).unwrap();
        assert!(!path.exists());
    }
}
