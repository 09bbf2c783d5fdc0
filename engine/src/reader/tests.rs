use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::device::DeviceKind;
use crate::pack::{parse_toc, toc_tail_len};
use crate::store::{pack_path, PackFetcher, StoreRead};
use crate::sync::{ReadAt, WriteAt};
use crate::{make, ChunkId, ChunkStore, ErrorKind, LocalStore, MakeOptions, NoProgress};

/// 3 MiB of random bytes with 1 MiB of zeros in the middle.
fn image() -> Vec<u8> {
    let mut data = vec![0u8; 3 << 20];
    ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut data);
    data[(1 << 20)..(2 << 20)].fill(0);
    data
}

struct Fixture {
    _dir: tempfile::TempDir,
    data: Vec<u8>,
    index: Index,
    store: LocalStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    let img = dir.path().join("img");
    std::fs::write(&img, &data).unwrap();
    let store = LocalStore::open(dir.path().join("store"), true).unwrap();
    let (index, _) = make(
        &img,
        &store,
        &dir.path().join("img.tidx"),
        &MakeOptions::default(),
        &NoProgress,
    )
    .unwrap();
    Fixture {
        _dir: dir,
        data,
        index,
        store,
    }
}

fn reader(f: &Fixture, options: ReaderOptions) -> ImageReader {
    let store = Arc::new(f.store.clone());
    let chunks = PackFetcher::open(store, &f.index).unwrap();
    ImageReader::new(f.index.clone(), Arc::new(chunks), options)
}

/// Flips a byte in the middle of the frame of chunk `id` in its pack.
fn damage_frame(store: &LocalStore, id: &crate::ChunkId) {
    for pack in store.list_packs().unwrap() {
        let path = store.path_of(&pack_path(&pack));
        let mut bytes = std::fs::read(&path).unwrap();
        let size = bytes.len() as u64;
        let tail = toc_tail_len(&bytes[bytes.len() - 8..], size, "p").unwrap();
        let toc = parse_toc(&bytes[(size - tail) as usize..], size, "p").unwrap();
        if let Some(e) = toc.iter().find(|e| e.id == *id) {
            bytes[(e.offset + u64::from(e.clen) / 2) as usize] ^= 0x55;
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("chunk {id} is in no pack");
}

#[test]
fn random_reads_match_the_image() {
    let f = fixture();
    let r = reader(&f, ReaderOptions::default());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..200 {
        let off = rng.gen_range(0..f.data.len() as u64);
        let len = rng.gen_range(1..=(f.data.len() as u64 - off).min(300_000)) as usize;
        let mut buf = vec![0xAA; len];
        r.read_at(off, &mut buf).unwrap();
        assert!(
            buf == f.data[off as usize..off as usize + len],
            "read {len} at {off}"
        );
    }
    let mut buf = [0u8; 2];
    let err = r.read_at(f.data.len() as u64 - 1, &mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(r.read_at(u64::MAX, &mut buf).is_err());
}

#[test]
fn zero_chunks_need_no_store_and_show_as_runs() {
    let f = fixture();
    let r = reader(
        &f,
        ReaderOptions {
            prefetch_threads: 0,
            ..Default::default()
        },
    );
    let runs = r.runs(0, f.data.len() as u64).unwrap();
    assert_eq!(runs.iter().map(|x| x.len).sum::<u64>(), f.data.len() as u64);
    let zero: u64 = runs.iter().filter(|x| x.zero).map(|x| x.len).sum();
    assert!(zero >= 512 << 10, "zero runs {runs:?}");
    // The middle of the zero region is read without touching the store.
    let mut buf = vec![1u8; 64 << 10];
    r.read_at(3 << 19, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(r.stats().fetches, 0);
}

#[test]
fn corrupt_chunk_fails_only_its_range_and_names_its_id() {
    let f = fixture();
    let victim = f
        .index
        .chunks()
        .iter()
        .find(|c| !c.zero && c.offset > 0)
        .copied()
        .unwrap();
    damage_frame(&f.store, &victim.id);
    let r = reader(
        &f,
        ReaderOptions {
            prefetch_threads: 0,
            ..Default::default()
        },
    );
    let mut buf = vec![0u8; 100];
    let err = r.read_at(victim.offset + 5, &mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CorruptChunk);
    assert!(err.to_string().contains(&victim.id.to_string()), "{err}");
    // Not cached: the next read fails again.
    assert!(r.read_at(victim.offset, &mut buf).is_err());
    let mut before = vec![0u8; victim.offset as usize];
    r.read_at(0, &mut before).unwrap();
    assert!(before == f.data[..victim.offset as usize]);
}

#[test]
fn cache_stays_within_its_size_and_serves_repeats() {
    let f = fixture();
    let limit = 512 << 10;
    let r = reader(
        &f,
        ReaderOptions {
            cache_bytes: limit,
            prefetch_threads: 0,
            ..Default::default()
        },
    );
    let mut buf = vec![0u8; f.data.len()];
    r.read_at(0, &mut buf).unwrap();
    assert!(buf == f.data);
    let s = r.stats();
    assert!(s.cached_bytes <= limit, "{s:?}");
    let fetched = s.fetches;
    let mut small = vec![0u8; 1000];
    r.read_at(f.data.len() as u64 - 1000, &mut small).unwrap();
    r.read_at(f.data.len() as u64 - 1000, &mut small).unwrap();
    assert_eq!(r.stats().fetches, fetched, "the tail is still cached");
}

/// A store that counts the fetches of each chunk and wakes waiters after each.
struct CountingStore {
    inner: PackFetcher,
    fetched: Mutex<HashMap<ChunkId, u64>>,
    changed: Condvar,
}

impl CountingStore {
    fn new(f: &Fixture) -> Arc<CountingStore> {
        Arc::new(CountingStore {
            inner: PackFetcher::open(Arc::new(f.store.clone()), &f.index).unwrap(),
            fetched: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        })
    }

    fn count(&self, id: ChunkId) {
        *self.fetched.lock().unwrap().entry(id).or_default() += 1;
        self.changed.notify_all();
    }

    fn counts(&self) -> HashMap<ChunkId, u64> {
        self.fetched.lock().unwrap().clone()
    }

    /// Waits until every chunk of `ids` was fetched, or 60 s passed (then returns the
    /// counts so far, for the caller's assertion to name what is missing).
    fn wait_for(&self, ids: &[ChunkId]) -> HashMap<ChunkId, u64> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut fetched = self.fetched.lock().unwrap();
        while !ids.iter().all(|id| fetched.contains_key(id)) {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            fetched = self
                .changed
                .wait_timeout(fetched, deadline - now)
                .unwrap()
                .0;
        }
        fetched.clone()
    }
}

impl ChunkStore for CountingStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn fetch_verified(&self, entry: &crate::ChunkEntry) -> Result<crate::Fetched> {
        let got = self.inner.fetch_verified(entry);
        self.count(entry.id);
        got
    }
    fn fetch_ordered<'a>(&'a self, entries: Vec<crate::ChunkEntry>) -> crate::FetchStream<'a> {
        let ids: Vec<ChunkId> = entries.iter().map(|e| e.id).collect();
        Box::new(
            self.inner
                .fetch_ordered(entries)
                .zip(ids)
                .map(move |(got, id)| {
                    self.count(id);
                    got
                }),
        )
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

/// The ids of the non-zero chunks under `[from, to)`.
fn stored_chunks(f: &Fixture, from: u64, to: u64) -> Vec<ChunkId> {
    let mut ids: Vec<ChunkId> = f
        .index
        .chunks()
        .iter()
        .filter(|c| !c.zero && c.end() > from && c.offset < to)
        .map(|c| c.id)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[test]
fn prefetch_fetches_its_range_once_and_reads_then_hit_the_cache() {
    let f = fixture();
    let store = CountingStore::new(&f);
    // Read-ahead off: only `prefetch` can fetch anything before a read.
    let r = ImageReader::new(
        f.index.clone(),
        store.clone(),
        ReaderOptions {
            readahead_bytes: 0,
            ..Default::default()
        },
    );
    let (from, to) = (2 << 20, 3 << 20);
    let want = stored_chunks(&f, from, to);
    assert!(want.len() >= 2, "{want:?}");
    r.prefetch(from, to - from).unwrap();
    let fetched = store.wait_for(&want);
    for id in &want {
        assert_eq!(fetched.get(id), Some(&1), "chunk {id} not prefetched once");
    }
    // Nothing outside the range was fetched.
    assert_eq!(fetched.len(), want.len(), "{fetched:?}");
    let before = r.stats();
    let mut tail = vec![0u8; (to - from) as usize];
    r.read_at(from, &mut tail).unwrap();
    assert!(tail == f.data[from as usize..to as usize]);
    // The read took every chunk from the cache: the store was not asked again.
    assert_eq!(store.counts(), fetched);
    let after = r.stats();
    assert_eq!(after.fetches, before.fetches, "{before:?} {after:?}");
    assert!(
        after.hits >= before.hits + want.len() as u64,
        "{before:?} {after:?}"
    );
}

/// A local store posing as a remote one (several requests in flight) whose range
/// requests each wait until a second one is in flight, or 30 s (then it notes that the
/// requests came one after the other).
struct Rendezvous {
    inner: LocalStore,
    requests: Mutex<u64>,
    arrived: Condvar,
    alone: AtomicU64,
}

impl StoreRead for Rendezvous {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.inner.read_file(rel, limit)
    }
    fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut n = self.requests.lock().unwrap();
        *n += 1;
        self.arrived.notify_all();
        while *n < 2 {
            let now = std::time::Instant::now();
            if now >= deadline {
                self.alone.fetch_add(1, Ordering::SeqCst);
                break;
            }
            n = self.arrived.wait_timeout(n, deadline - now).unwrap().0;
        }
        drop(n);
        self.inner.read_range(rel, offset, len)
    }
    fn file_size(&self, rel: &str) -> Result<Option<u64>> {
        self.inner.file_size(rel)
    }
    fn list_packs(&self) -> Result<Vec<crate::PackId>> {
        self.inner.list_packs()
    }
    fn in_flight(&self) -> usize {
        4
    }
}

#[test]
fn a_small_read_across_chunks_of_a_remote_store_fetches_them_at_once() {
    let f = fixture();
    let remote = Arc::new(Rendezvous {
        inner: f.store.clone(),
        requests: Mutex::new(0),
        arrived: Condvar::new(),
        alone: AtomicU64::new(0),
    });
    let fetcher = PackFetcher::open(remote.clone(), &f.index).unwrap();
    let r = ImageReader::new(
        f.index.clone(),
        Arc::new(fetcher),
        ReaderOptions {
            readahead_bytes: 0,
            ..Default::default()
        },
    );
    let chunks = f.index.chunks();
    // Two stored chunks in a row, and a 4 KiB read with 2 KiB in each.
    let i = (0..chunks.len() - 1)
        .find(|&i| !chunks[i].zero && !chunks[i + 1].zero && chunks[i].id != chunks[i + 1].id)
        .expect("two stored chunks in a row");
    assert!(chunks[i].len >= 2048 && chunks[i + 1].len >= 2048);
    let at = chunks[i + 1].offset - 2048;
    let mut buf = vec![0u8; 4096];
    r.read_at(at, &mut buf).unwrap();
    assert!(buf == f.data[at as usize..at as usize + 4096]);
    // Each request found the other in flight: the chunks were fetched at the same time.
    assert_eq!(*remote.requests.lock().unwrap(), 2);
    assert_eq!(
        remote.alone.load(Ordering::SeqCst),
        0,
        "one chunk after the other"
    );
    assert_eq!(r.stats().fetches, 2);
    // Both are cached now: reading again asks nothing of the store.
    r.read_at(at, &mut buf).unwrap();
    assert!(buf == f.data[at as usize..at as usize + 4096]);
    assert_eq!(*remote.requests.lock().unwrap(), 2);
    // Small reads stay right when some of their chunks are cached and some are not.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..300 {
        let off = rng.gen_range(0..f.data.len() as u64 - 70_000);
        let len = rng.gen_range(1..70_000usize);
        let mut buf = vec![0xAA; len];
        r.read_at(off, &mut buf).unwrap();
        assert!(
            buf == f.data[off as usize..off as usize + len],
            "{len} at {off}"
        );
    }
}

#[test]
fn sequential_reads_queue_read_ahead() {
    let f = fixture();
    let store = CountingStore::new(&f);
    let r = ImageReader::new(f.index.clone(), store.clone(), ReaderOptions::default());
    let mut buf = vec![0u8; 4096];
    r.read_at(0, &mut buf).unwrap();
    r.read_at(4096, &mut buf).unwrap();
    // The second read continued the first: the next 4 MiB (here the rest of the image)
    // is fetched in the background without being read.
    let want = stored_chunks(&f, 8192, f.data.len() as u64);
    let fetched = store.wait_for(&want);
    for id in &want {
        assert!(fetched.contains_key(id), "chunk {id} not read ahead");
    }
}

#[test]
fn overlay_merges_writes_and_survives_reopen() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ovl");
    let r = reader(&f, ReaderOptions::default());
    let mut expect = f.data.clone();
    {
        let o = Overlay::open(&path, &f.index).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..50 {
            let off = rng.gen_range(0..expect.len() as u64 - 20_000);
            let len = rng.gen_range(1..20_000usize);
            let fill: u8 = rng.gen();
            if rng.gen_bool(0.2) {
                o.zero(&r, off, len as u64, false).unwrap();
                expect[off as usize..off as usize + len].fill(0);
            } else {
                o.write_at(&r, off, &vec![fill; len], false).unwrap();
                expect[off as usize..off as usize + len].fill(fill);
            }
        }
        let last = expect.len() as u64 - 10;
        o.write_at(&r, last, &[9; 10], true).unwrap();
        expect[last as usize..].fill(9);
        o.flush().unwrap();
        let mut buf = vec![0u8; expect.len()];
        o.read_at(&r, 0, &mut buf).unwrap();
        assert!(buf == expect);
    }
    let o = Overlay::open(&path, &f.index).unwrap();
    let mut buf = vec![0u8; expect.len()];
    o.read_at(&r, 0, &mut buf).unwrap();
    assert!(buf == expect, "overlay contents lost on reopen");
    // The image itself is untouched.
    r.read_at(0, &mut buf).unwrap();
    assert!(buf == f.data);
}

#[test]
fn overlay_refuses_another_index_and_garbage() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ovl");
    Overlay::open(&path, &f.index).unwrap();
    let other = Index::new(
        f.index.params(),
        [0; 32],
        vec![(crate::ChunkId::of(b"x"), 1)],
    )
    .unwrap();
    let err = Overlay::open(&path, &other).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 8 << 20]).unwrap();
    let err = Overlay::open(&junk, &f.index).unwrap_err().to_string();
    assert!(err.contains("bad magic"), "{err}");
    assert!(Overlay::open(Path::new("/nonexistent/dir/ovl"), &f.index).is_err());
}

/// How a [`Medium`] decides what survives a power cut.
#[derive(Clone, Copy)]
enum CutMode {
    /// Each write since the last flush is lost, kept, or torn (a random subset of its
    /// 512-byte sectors kept).
    Random,
    /// Writes below this offset (the header and bitmap) are kept, all others lost: the
    /// worst case for an overlay that writes a bit before its data is durable.
    KeepBelow(u64),
}

type Hook = Box<dyn FnOnce() + Send>;

struct MediumState {
    /// What a read sees.
    current: Vec<u8>,
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// Writes since the last flush, oldest first.
    pending: Vec<(u64, Vec<u8>)>,
    ops: u64,
    flushes: u64,
    /// The write/zero/flush call (counted from 1) that finds the power gone.
    cut_at_op: Option<u64>,
    /// The flush call (counted from 1) that finds the power gone.
    cut_at_flush: Option<u64>,
    /// The flush call (counted from 1) that fails and loses the writes it should have
    /// made durable (as a failed `fdatasync` may), while reads still see them.
    fail_flush: Option<u64>,
    mode: CutMode,
    rng: ChaCha8Rng,
    /// What survived the cut, once it happened.
    survivor: Option<Vec<u8>>,
    /// Runs at the end of the given flush call, after it made everything durable.
    after_flush: Option<(u64, Hook)>,
    /// Sleep a random few microseconds after each flush, to let other threads' calls
    /// land between a flush and what its caller does next.
    jitter: bool,
}

/// An in-memory disk with a volatile write cache: writes are lost or torn at a power cut
/// unless a flush made them durable. After the cut every call fails.
struct Medium {
    size: u64,
    state: Mutex<MediumState>,
}

impl Medium {
    fn new(bytes: Vec<u8>, seed: u64) -> Medium {
        Medium {
            size: bytes.len() as u64,
            state: Mutex::new(MediumState {
                current: bytes.clone(),
                durable: bytes,
                pending: Vec::new(),
                ops: 0,
                flushes: 0,
                cut_at_op: None,
                cut_at_flush: None,
                fail_flush: None,
                mode: CutMode::Random,
                rng: ChaCha8Rng::seed_from_u64(seed),
                survivor: None,
                after_flush: None,
                jitter: false,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MediumState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power now (if it was not cut already) and returns what survived.
    fn power_cut(&self) -> Vec<u8> {
        let mut st = self.state();
        st.cut();
        st.survivor.clone().expect("cut")
    }

    fn dead(&self) -> Error {
        Error::io(
            "using medium",
            "(in-memory medium)",
            std::io::Error::other("power cut"),
        )
    }

    /// Counts a write-like call; false if the power is gone (now or before).
    fn tick(&self, st: &mut MediumState) -> bool {
        if st.survivor.is_some() {
            return false;
        }
        st.ops += 1;
        if st.cut_at_op == Some(st.ops) {
            st.cut();
            return false;
        }
        true
    }

    fn store(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut st = self.state();
        if !self.tick(&mut st) {
            return Err(self.dead());
        }
        let at = offset as usize;
        assert!(at + buf.len() <= st.current.len(), "write past the medium");
        st.current[at..at + buf.len()].copy_from_slice(buf);
        st.pending.push((offset, buf.to_vec()));
        Ok(())
    }
}

impl MediumState {
    fn cut(&mut self) {
        if self.survivor.is_some() {
            return;
        }
        let mut out = self.durable.clone();
        for (offset, data) in std::mem::take(&mut self.pending) {
            let keep_all = match self.mode {
                CutMode::KeepBelow(limit) => {
                    if offset < limit {
                        Some(true)
                    } else {
                        None
                    }
                }
                CutMode::Random => match self.rng.gen_range(0..3) {
                    0 => None,
                    1 => Some(true),
                    _ => Some(false),
                },
            };
            let Some(all) = keep_all else { continue };
            // Sectors are 512-byte aligned on the medium.
            let mut pos = 0usize;
            while pos < data.len() {
                let abs = offset as usize + pos;
                let n = (512 - abs % 512).min(data.len() - pos);
                if all || self.rng.gen_bool(0.5) {
                    out[abs..abs + n].copy_from_slice(&data[pos..pos + n]);
                }
                pos += n;
            }
        }
        self.survivor = Some(out);
    }
}

impl ReadAt for Medium {
    fn name(&self) -> String {
        "(in-memory medium)".into()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let st = self.state();
        if st.survivor.is_some() {
            return Err(self.dead());
        }
        let at = offset as usize;
        buf.copy_from_slice(&st.current[at..at + buf.len()]);
        Ok(())
    }
}

impl WriteAt for Medium {
    fn kind(&self) -> DeviceKind {
        DeviceKind::File
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.store(buf, offset)
    }
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        self.store(&vec![0u8; len as usize], offset)
    }
    fn flush(&self) -> Result<()> {
        let (hook, pause) = {
            let mut st = self.state();
            if !self.tick(&mut st) {
                return Err(self.dead());
            }
            st.flushes += 1;
            if st.cut_at_flush == Some(st.flushes) {
                st.cut();
                return Err(self.dead());
            }
            if st.fail_flush == Some(st.flushes) {
                st.pending.clear();
                return Err(Error::io(
                    "syncing",
                    "(in-memory medium)",
                    std::io::Error::other("write-back failed"),
                ));
            }
            for (offset, data) in std::mem::take(&mut st.pending) {
                let at = offset as usize;
                st.durable[at..at + data.len()].copy_from_slice(&data);
            }
            let pause = if st.jitter {
                st.rng.gen_range(0..300)
            } else {
                0
            };
            let hook = match st.after_flush.take() {
                Some((n, hook)) if n == st.flushes => Some(hook),
                other => {
                    st.after_flush = other;
                    None
                }
            };
            (hook, pause)
        };
        if pause > 0 {
            std::thread::sleep(std::time::Duration::from_micros(pause));
        }
        if let Some(hook) = hook {
            hook();
        }
        Ok(())
    }
}

/// Size of a [`Medium`] that holds the overlay of the fixture's image.
fn medium_size(f: &Fixture) -> usize {
    // Header and bitmap round up to 1 MiB, then one byte per image byte.
    (1 << 20) + f.data.len()
}

/// A new overlay on a fresh medium (its creation flushed, so durable).
fn overlay_on_medium(f: &Fixture, seed: u64) -> (Arc<Medium>, Overlay) {
    let medium = Arc::new(Medium::new(vec![0u8; medium_size(f)], seed));
    let overlay = Overlay::create_on(medium.clone(), &f.index).unwrap();
    (medium, overlay)
}

/// The overlay reopened from what survived a power cut.
fn reopen(f: &Fixture, survivor: Vec<u8>) -> Overlay {
    Overlay::open_on(Arc::new(Medium::new(survivor, 0)), &f.index).unwrap()
}

#[test]
fn overlay_keeps_flushed_writes_when_later_ones_are_lost() {
    let f = fixture();
    let r = reader(&f, ReaderOptions::default());
    let mut torn = 0;
    for seed in 0..20 {
        let (medium, o) = overlay_on_medium(&f, seed);
        o.write_at(&r, 5000, &[1; 10_000], false).unwrap();
        o.flush().unwrap();
        // Never flushed, then the power goes.
        o.write_at(&r, 100_000, &[2; 10_000], false).unwrap();
        o.write_at(&r, 7000, &[3; 100], false).unwrap();
        let o = reopen(&f, medium.power_cut());
        let mut buf = vec![0u8; 10_000];
        o.read_at(&r, 5000, &mut buf).unwrap();
        for (k, &b) in buf.iter().enumerate() {
            let x = 5000 + k;
            assert!(
                b == 1 || ((7000..7100).contains(&x) && b == 3),
                "seed {seed}: flushed write lost at byte {x}: {b}"
            );
        }
        // The unflushed write is there or not, byte by byte: never zeros or garbage.
        o.read_at(&r, 100_000, &mut buf).unwrap();
        let image = &f.data[100_000..110_000];
        let mut kinds = (false, false);
        for (k, &b) in buf.iter().enumerate() {
            assert!(
                b == 2 || b == image[k],
                "seed {seed}: garbage {b} at byte {}",
                100_000 + k
            );
            kinds.0 |= b == 2;
            kinds.1 |= b == image[k] && image[k] != 2;
        }
        if kinds.0 && kinds.1 {
            torn += 1;
        }
    }
    assert!(torn > 0, "no cut ever kept part of an unflushed write");
}

#[test]
fn overlay_bit_is_never_durable_before_its_data() {
    // A write lands while a flush runs (right after the flush made the data durable);
    // the power goes just before the flush's bitmap is durable, keeping the bitmap and
    // losing every data write. The late write must be absent, never read as zeros.
    let f = fixture();
    let r = Arc::new(reader(&f, ReaderOptions::default()));
    let (medium, o) = overlay_on_medium(&f, 1);
    let o = Arc::new(o);
    o.write_at(&r, 0, &[5; 4096], false).unwrap();
    {
        let mut st = medium.state();
        let done = st.flushes;
        st.mode = CutMode::KeepBelow(1 << 20);
        st.cut_at_flush = Some(done + 2);
        let (o2, r2) = (o.clone(), r.clone());
        let hook: Hook = Box::new(move || {
            std::thread::spawn(move || o2.write_at(&r2, 40_960, &[6; 6000], false))
                .join()
                .unwrap()
                .unwrap();
        });
        st.after_flush = Some((done + 1, hook));
    }
    // The first write is durable; the flush fails at its second barrier.
    assert!(o.flush().is_err());
    let survivor = medium.power_cut();
    let o = reopen(&f, survivor);
    let mut buf = vec![0u8; 4096];
    o.read_at(&r, 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 5) || buf[..] == f.data[..4096],
        "block 0 is garbage"
    );
    let mut buf = vec![0u8; 8192];
    o.read_at(&r, 40_960, &mut buf).unwrap();
    assert!(
        buf[..] == f.data[40_960..40_960 + 8192],
        "a bit became durable before its data: {:?}",
        &buf[..8]
    );
}

#[test]
fn overlay_flushes_run_one_at_a_time() {
    // A second write and flush run while a first flush waits on its data barrier. If
    // they could overtake it, the first flush would then write its older bitmap words
    // over the second's, and the second write, reported durable, would be lost.
    let f = fixture();
    let r = Arc::new(reader(&f, ReaderOptions::default()));
    let (medium, o) = overlay_on_medium(&f, 2);
    let o = Arc::new(o);
    o.write_at(&r, 0, &[5; 4096], false).unwrap();
    let second = Arc::new(Mutex::new(None));
    {
        let mut st = medium.state();
        let done = st.flushes;
        let (o2, r2, second2) = (o.clone(), r.clone(), second.clone());
        let hook: Hook = Box::new(move || {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let t = std::thread::spawn(move || {
                let result = o2
                    .write_at(&r2, 8192, &[6; 4096], false)
                    .and_then(|()| o2.flush());
                let _ = tx.send(());
                result
            });
            // Serialised flushes make the second wait for this one: do not wait forever
            // (the outcome is checked below either way).
            let _ = rx.recv_timeout(std::time::Duration::from_millis(500));
            *second2.lock().unwrap() = Some(t);
        });
        st.after_flush = Some((done + 1, hook));
    }
    o.flush().unwrap();
    let t = second.lock().unwrap().take().expect("hook ran");
    t.join().unwrap().unwrap();
    let o = reopen(&f, medium.power_cut());
    let mut buf = vec![0u8; 4096];
    o.read_at(&r, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 5), "first flushed write lost");
    o.read_at(&r, 8192, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 6), "second flushed write lost");
}

#[test]
fn overlay_takes_nothing_more_after_a_failed_data_barrier() {
    // The data barrier fails and the medium drops the write it should have saved. A
    // later flush must not write the bit for it (that block would read as zeros), so
    // the overlay refuses writes and flushes until it is reopened.
    let f = fixture();
    let r = reader(&f, ReaderOptions::default());
    let (medium, o) = overlay_on_medium(&f, 3);
    o.write_at(&r, 0, &[5; 4096], true).unwrap();
    o.write_at(&r, 40_960, &[6; 4096], false).unwrap();
    {
        let mut st = medium.state();
        st.fail_flush = Some(st.flushes + 1);
    }
    let err = o.flush().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    let err = o.flush().unwrap_err();
    let (msg, cause) = (err.to_string(), std::error::Error::source(&err).unwrap());
    assert!(
        msg.contains("an earlier flush failed") && msg.contains("(in-memory medium)"),
        "{msg}"
    );
    assert!(cause.to_string().contains("write-back failed"), "{cause}");
    assert!(o.write_at(&r, 81_920, &[7; 10], false).is_err());
    assert!(o.zero(&r, 81_920, 8192, false).is_err());
    // Not a power cut: what is durable now is what the medium holds.
    let o = reopen(&f, medium.state().durable.clone());
    let mut buf = vec![0u8; 4096];
    o.read_at(&r, 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 5),
        "write made durable by FUA lost"
    );
    o.read_at(&r, 40_960, &mut buf).unwrap();
    assert!(
        buf[..] == f.data[40_960..40_960 + 4096],
        "lost write's block reads {:?}",
        &buf[..8]
    );
}

#[test]
fn overlay_takes_nothing_more_after_a_failed_bitmap_barrier() {
    // A write lands during a flush (after its data barrier); the flush's bitmap barrier
    // then fails, dropping the bitmap words and that write's data. A later flush must
    // not write the write's bit (its block would read as zeros).
    let f = fixture();
    let r = Arc::new(reader(&f, ReaderOptions::default()));
    let (medium, o) = overlay_on_medium(&f, 4);
    let o = Arc::new(o);
    o.write_at(&r, 0, &[5; 4096], false).unwrap();
    {
        let mut st = medium.state();
        let done = st.flushes;
        st.fail_flush = Some(done + 2);
        let (o2, r2) = (o.clone(), r.clone());
        let hook: Hook = Box::new(move || {
            std::thread::spawn(move || o2.write_at(&r2, 40_960, &[6; 4096], false))
                .join()
                .unwrap()
                .unwrap();
        });
        st.after_flush = Some((done + 1, hook));
    }
    assert!(o.flush().is_err());
    let err = o.flush().unwrap_err().to_string();
    assert!(err.contains("an earlier flush failed"), "{err}");
    let o = reopen(&f, medium.state().durable.clone());
    let mut buf = vec![0u8; 4096];
    o.read_at(&r, 40_960, &mut buf).unwrap();
    assert!(
        buf[..] == f.data[40_960..40_960 + 4096],
        "dropped write's block reads {:?}",
        &buf[..8]
    );
}

/// One overlay operation of the interleaving test, with the sequence numbers at which
/// it started and returned successfully.
#[derive(Clone, Copy, Debug)]
struct Op {
    id: u64,
    offset: u64,
    len: u64,
    zero: bool,
    fua: bool,
    start: u64,
    done: Option<u64>,
}

/// The byte write `id` puts at image offset `x`: never zero, different per write.
fn pattern(id: u64, x: u64) -> u8 {
    let h = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ x.wrapping_mul(0xD6E8_FEB8_6659_FD93))
        .wrapping_mul(0x2545_F491_4F6C_DD1D);
    ((h >> 56) as u8) | 1
}

impl Op {
    fn value(&self, x: u64) -> u8 {
        if self.zero {
            0
        } else {
            pattern(self.id, x)
        }
    }
    fn covers(&self, x: u64) -> bool {
        (self.offset..self.offset + self.len).contains(&x)
    }
}

#[test]
fn overlay_flushes_racing_writes_survive_random_power_cuts() {
    // Threads write, zero and flush overlapping (often partial) blocks of one region
    // while the power goes at a random call. From what survived:
    // - a write that returned before a flush started that then succeeded reads back
    //   (unless a write that may have come after it covers the byte);
    // - every byte is its image byte or one some write put there;
    // - outside the region, the image.
    const REGION: u64 = 96 << 10;
    const THREADS: u64 = 3;
    const OPS: u64 = 40;
    let f = fixture();
    let r = Arc::new(reader(&f, ReaderOptions::default()));
    let mut guaranteed_seen = 0;
    for run in 0..200u64 {
        let (medium, o) = overlay_on_medium(&f, 1000 + run);
        let o = Arc::new(o);
        let mut rng = ChaCha8Rng::seed_from_u64(run);
        {
            let mut st = medium.state();
            // Half the runs lose power at a random call, half at a random barrier
            // (where a flush's order matters most).
            if run % 2 == 0 {
                st.cut_at_op = Some(st.ops + rng.gen_range(1..THREADS * OPS));
            } else {
                st.cut_at_flush = Some(st.flushes + rng.gen_range(1..THREADS * OPS / 4));
            }
            st.jitter = true;
        }
        let seq = Arc::new(AtomicU64::new(0));
        let ops = Arc::new(Mutex::new(Vec::<Op>::new()));
        let flushes = Arc::new(Mutex::new(Vec::<u64>::new()));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (o, r, seq, ops, flushes) = (
                    o.clone(),
                    r.clone(),
                    seq.clone(),
                    ops.clone(),
                    flushes.clone(),
                );
                let mut rng = ChaCha8Rng::seed_from_u64(run * 100 + t);
                std::thread::spawn(move || {
                    for i in 0..OPS {
                        let kind = rng.gen_range(0..100);
                        if kind < 15 {
                            let start = seq.fetch_add(1, Ordering::SeqCst);
                            if o.flush().is_err() {
                                return;
                            }
                            flushes.lock().unwrap().push(start);
                            continue;
                        }
                        let offset = rng.gen_range(0..REGION - 1);
                        let len = rng.gen_range(1..=(REGION - offset).min(12_000));
                        let mut op = Op {
                            id: (t << 32) | i,
                            offset,
                            len,
                            zero: kind < 25,
                            fua: kind >= 95,
                            start: seq.fetch_add(1, Ordering::SeqCst),
                            done: None,
                        };
                        let idx = {
                            let mut ops = ops.lock().unwrap();
                            ops.push(op);
                            ops.len() - 1
                        };
                        let result = if op.zero {
                            o.zero(&r, offset, len, op.fua)
                        } else {
                            let data: Vec<u8> =
                                (offset..offset + len).map(|x| op.value(x)).collect();
                            o.write_at(&r, offset, &data, op.fua)
                        };
                        if result.is_err() {
                            return;
                        }
                        op.done = Some(seq.fetch_add(1, Ordering::SeqCst));
                        ops.lock().unwrap()[idx] = op;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let survivor = medium.power_cut();
        let ops = ops.lock().unwrap().clone();
        let flushes = flushes.lock().unwrap().clone();
        let last_flush = flushes.iter().copied().max();
        let guaranteed = |op: &Op| match op.done {
            Some(d) => op.fua || last_flush.is_some_and(|s| s > d),
            None => false,
        };
        let o = reopen(&f, survivor);
        let mut got = vec![0u8; f.data.len()];
        o.read_at(&r, 0, &mut got).unwrap();
        assert!(
            got[REGION as usize..] == f.data[REGION as usize..],
            "run {run}: bytes outside every write changed"
        );
        // The operations touching each 4 KiB block of the region.
        let mut by_block: HashMap<u64, Vec<Op>> = HashMap::new();
        for op in &ops {
            for b in op.offset / 4096..=(op.offset + op.len - 1) / 4096 {
                by_block.entry(b).or_default().push(*op);
            }
        }
        for x in 0..REGION {
            let v = got[x as usize];
            let near = by_block.get(&(x / 4096)).map(Vec::as_slice).unwrap_or(&[]);
            let written = near.iter().any(|w| w.covers(x) && w.value(x) == v);
            assert!(
                v == f.data[x as usize] || written,
                "run {run}: byte {x} reads {v}, neither its image byte nor a write's"
            );
            for w in near.iter().filter(|w| w.covers(x) && guaranteed(w)) {
                guaranteed_seen += 1;
                // Writes that may have landed after `w` (they had not returned when it
                // started) may hold the byte instead.
                let later = |l: &&Op| l.covers(x) && l.done.is_none_or(|d| d > w.start);
                assert!(
                    w.value(x) == v || near.iter().filter(later).any(|l| l.value(x) == v),
                    "run {run}: byte {x} reads {v}, but write {w:?} was flushed"
                );
            }
        }
    }
    assert!(guaranteed_seen > 0, "no run had a flushed write to check");
}

#[test]
fn overlay_is_created_private_and_never_through_a_symlink() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    // A new overlay is 0600 (the mode is set explicitly, not left to the umask).
    let path = dir.path().join("ovl");
    Overlay::open(&path, &f.index).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "overlay created with mode {mode:o}");
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // Reopening (a restart) works.
    Overlay::open(&path, &f.index).unwrap();

    // A symlink planted at the overlay path is refused, whatever it points to.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"").unwrap();
    let link = dir.path().join("link.ovl");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let err = Overlay::open(&link, &f.index).unwrap_err().to_string();
    assert!(
        err.contains("symbolic link") && err.contains(&link.display().to_string()),
        "{err}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"", "victim changed");
    let dangling = dir.path().join("dangling.ovl");
    let target = dir.path().join("made-through-link");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    let err = Overlay::open(&dangling, &f.index).unwrap_err().to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert!(!target.exists(), "a file was created through a symlink");
    let to_overlay = dir.path().join("to-overlay.ovl");
    std::os::unix::fs::symlink(&path, &to_overlay).unwrap();
    assert!(Overlay::open(&to_overlay, &f.index).is_err());

    // An existing empty file is not an overlay: refused and left alone.
    let empty = dir.path().join("empty.ovl");
    std::fs::write(&empty, b"").unwrap();
    let err = Overlay::open(&empty, &f.index).unwrap_err().to_string();
    assert!(err.contains("not a tessera overlay"), "{err}");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
}

#[test]
fn overlay_header_damage_is_a_clear_error() {
    let f = fixture();
    let (medium, o) = overlay_on_medium(&f, 0);
    drop(o);
    let good = medium.power_cut();
    let size = f.data.len() as u64;
    let put = |img: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        img[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not a tessera overlay", good[..100].to_vec()),
        ("not a tessera overlay", Vec::new()),
        ("bad magic", {
            let mut g = good.clone();
            g[0] ^= 1;
            g
        }),
        ("version 2", {
            let mut g = good.clone();
            put(&mut g, 8, &2u32.to_le_bytes());
            g
        }),
        ("block size 512", {
            let mut g = good.clone();
            put(&mut g, 12, &512u32.to_le_bytes());
            g
        }),
        ("made for index", {
            let mut g = good.clone();
            put(&mut g, 16, &(size * 2).to_le_bytes());
            g
        }),
        ("made for index", {
            let mut g = good.clone();
            g[30] ^= 0xff;
            g
        }),
        ("data offset", {
            let mut g = good.clone();
            put(&mut g, 64, &u64::MAX.to_le_bytes());
            g
        }),
        ("bitmap offset", {
            let mut g = good.clone();
            put(&mut g, 56, &(u64::MAX - 3).to_le_bytes());
            g
        }),
        ("truncated", good[..good.len() - 1].to_vec()),
        ("truncated", good[..(1 << 20) + 4096].to_vec()),
    ];
    for (want, bytes) in cases {
        let len = bytes.len();
        let err = Overlay::open_on(Arc::new(Medium::new(bytes, 0)), &f.index).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(want) && msg.contains("(in-memory medium)"),
            "{len} bytes: want {want:?} in {msg}"
        );
    }
    // The undamaged one opens; a medium too small for a new overlay is refused.
    Overlay::open_on(Arc::new(Medium::new(good, 0)), &f.index).unwrap();
    let small = Arc::new(Medium::new(vec![0u8; 1 << 20], 0));
    let err = Overlay::create_on(small, &f.index).unwrap_err().to_string();
    assert!(err.contains("needs"), "{err}");
}

#[test]
fn readers_in_one_pool_share_its_cache_and_start_threads_only_for_work() {
    let f = fixture();
    let store = CountingStore::new(&f);
    let pool = ReaderPool::new(1 << 20, 3);
    let readers: Vec<ImageReader> = (0..8)
        .map(|_| ImageReader::in_pool(f.index.clone(), store.clone(), 4 << 20, pool.clone()))
        .collect();
    // Eight readers, no thread yet: nothing was queued.
    assert_eq!(pool.thread_count(), 0);
    let mut buf = vec![0u8; 64 << 10];
    for r in &readers {
        r.read_at(0, &mut buf).unwrap();
        assert!(buf[..] == f.data[..64 << 10]);
    }
    // Each read queued read-ahead: the pool started threads, never more than its limit.
    let want = stored_chunks(&f, 64 << 10, 1 << 20);
    store.wait_for(&want);
    let threads = pool.thread_count();
    assert!((1..=3).contains(&threads), "{threads} threads");
    // One cache: the chunks of the first read were fetched once for all eight readers.
    let counts = store.counts();
    for id in stored_chunks(&f, 0, 64 << 10) {
        assert_eq!(counts.get(&id), Some(&1), "chunk {id}");
    }
    // ... and it stays within its limit whatever the number of readers.
    for r in &readers {
        r.read_at(2 << 20, &mut buf).unwrap();
        assert!(r.stats().cached_bytes <= 1 << 20, "{:?}", r.stats());
    }
    // Dropping a reader leaves the others (and the pool's threads) working.
    drop(readers.into_iter().next());
    drop(pool);
}
