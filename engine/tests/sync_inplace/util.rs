//! Helpers shared by the in-place sync tests: an in-memory store, in-memory devices and
//! journals, and index making through the real `make`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rand::{RngCore, SeedableRng};
use tessera_engine::chunk::decompress_verified;
use tessera_engine::pack::{parse_toc, toc_tail_len};
use tessera_engine::store::{pack_id_from_path, pack_path, PackId};
use tessera_engine::sync::{ReadAt, WriteAt};
use tessera_engine::{
    make, ChunkEntry, ChunkId, ChunkStore, ChunkerParams, DeviceKind, Error, Estimate, FetchStream,
    Fetched, Index, LocalStore, MakeOptions, NoProgress, PackFetcher, Result, StoreRead,
    StoreWrite,
};

/// Small chunks, so that test images of a few MiB have hundreds of them.
pub fn small_params() -> ChunkerParams {
    ChunkerParams::new(1024, 4096, 16384).unwrap()
}

/// Deterministic random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A store in memory: `make` writes packs into it ([`StoreWrite`]), and sync fetches
/// chunks from it directly by id ([`ChunkStore`], serving the frames of its packs),
/// counting what is fetched.
#[derive(Default)]
pub struct MemStore {
    files: Mutex<HashMap<String, Vec<u8>>>,
    /// Frames of the chunks of every pack put, by id, with their chunk lengths.
    chunks: Mutex<HashMap<ChunkId, Vec<u8>>>,
    /// Compressed bytes served.
    pub served: AtomicU64,
    /// Times each chunk was served.
    fetches: Mutex<HashMap<ChunkId, u64>>,
}

impl MemStore {
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
    /// Times `id` was served.
    pub fn fetches_of(&self, id: &ChunkId) -> u64 {
        self.fetches.lock().unwrap().get(id).copied().unwrap_or(0)
    }
    pub fn remove(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.chunks.lock().unwrap().remove(id)
    }
    pub fn insert(&self, id: ChunkId, compressed: Vec<u8>) {
        self.chunks.lock().unwrap().insert(id, compressed);
    }
}

impl StoreRead for MemStore {
    fn location(&self) -> String {
        "mem-store".into()
    }
    fn read_file(&self, rel: &str, _limit: u64) -> Result<Option<Vec<u8>>> {
        Ok(self.files.lock().unwrap().get(rel).cloned())
    }
    fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let files = self.files.lock().unwrap();
        let f = files
            .get(rel)
            .ok_or_else(|| Error::MissingFile { origin: rel.into() })?;
        Ok(f.get(offset as usize..(offset + len) as usize)
            .ok_or_else(|| out_of_range(rel))?
            .to_vec())
    }
    fn file_size(&self, rel: &str) -> Result<Option<u64>> {
        Ok(self.files.lock().unwrap().get(rel).map(|f| f.len() as u64))
    }
    fn list_packs(&self) -> Result<Vec<PackId>> {
        let files = self.files.lock().unwrap();
        Ok(files.keys().filter_map(|k| pack_id_from_path(k)).collect())
    }
}

impl StoreWrite for MemStore {
    fn put_pack(&self, id: &PackId, bytes: &[u8]) -> Result<()> {
        let size = bytes.len() as u64;
        let tail = toc_tail_len(&bytes[bytes.len() - 8..], size, "mem")?;
        for e in parse_toc(&bytes[(size - tail) as usize..], size, "mem")? {
            let frame = &bytes[e.offset as usize..(e.offset + u64::from(e.clen)) as usize];
            self.insert(e.id, frame.to_vec());
        }
        self.put_file(&pack_path(id), bytes)
    }
    fn put_file(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        self.files
            .lock()
            .unwrap()
            .insert(rel.into(), bytes.to_vec());
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

impl ChunkStore for MemStore {
    fn location(&self) -> String {
        "mem-store".into()
    }
    fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched> {
        let got = self.chunks.lock().unwrap().get(&entry.id).cloned();
        let compressed = got.ok_or_else(|| Error::MissingChunk {
            id: entry.id,
            origin: "mem-store".into(),
        })?;
        self.served
            .fetch_add(compressed.len() as u64, Ordering::Relaxed);
        *self.fetches.lock().unwrap().entry(entry.id).or_default() += 1;
        let chunk = decompress_verified(entry.id, &compressed, entry.len, "mem-store")?;
        Ok(Fetched {
            chunk,
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
    /// One request per chunk, its whole frame (as `fetch_verified`).
    fn estimate(&self, entries: &[ChunkEntry]) -> Result<Estimate> {
        let chunks = self.chunks.lock().unwrap();
        let mut est = Estimate::default();
        for e in entries {
            let frame = chunks.get(&e.id).ok_or_else(|| Error::MissingChunk {
                id: e.id,
                origin: "mem-store".into(),
            })?;
            est.bytes += frame.len() as u64;
            est.requests += 1;
        }
        Ok(est)
    }
}

/// Makes the index of `image` with `params`, putting its chunks in `store` (the real
/// `make`, through a temporary file).
pub fn make_index(image: &[u8], params: ChunkerParams, store: &dyn StoreWrite) -> Index {
    let dir = tempfile::TempDir::new().unwrap();
    let src = dir.path().join("image");
    std::fs::write(&src, image).unwrap();
    let opts = MakeOptions { params, workers: 2 };
    make(
        &src,
        store,
        &dir.path().join("image.tidx"),
        &opts,
        &NoProgress,
    )
    .unwrap()
    .0
}

/// The chunks of `index` in a local store, fetched from its packs.
pub fn fetcher(store: &LocalStore, index: &Index) -> PackFetcher {
    PackFetcher::open(Arc::new(store.clone()), index).unwrap()
}

/// Writes `bytes` to `path`, then grows the file with zeros to at least `min_len`.
pub fn write_padded(path: &Path, bytes: &[u8], min_len: usize) {
    let mut b = bytes.to_vec();
    if b.len() < min_len {
        b.resize(min_len, 0);
    }
    std::fs::write(path, b).unwrap();
}

/// A device in memory.
pub struct MemDevice {
    pub data: RwLock<Vec<u8>>,
    pub kind: DeviceKind,
    pub name: String,
}

impl MemDevice {
    pub fn new(name: &str, data: Vec<u8>, kind: DeviceKind) -> MemDevice {
        MemDevice {
            data: RwLock::new(data),
            kind,
            name: name.into(),
        }
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }
}

fn out_of_range(name: &str) -> Error {
    Error::io(
        "reading",
        name,
        io::Error::new(io::ErrorKind::UnexpectedEof, "past the end"),
    )
}

impl ReadAt for MemDevice {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self.data.read().unwrap();
        let end = offset as usize + buf.len();
        if end > d.len() {
            return Err(out_of_range(&self.name));
        }
        buf.copy_from_slice(&d[offset as usize..end]);
        Ok(())
    }
}

impl WriteAt for MemDevice {
    fn kind(&self) -> DeviceKind {
        self.kind
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut d = self.data.write().unwrap();
        let end = offset as usize + buf.len();
        assert!(end <= d.len(), "write past the end of {}", self.name);
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        let mut d = self.data.write().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Asserts the report's byte counts add up to the image (no fallbacks expected).
pub fn assert_accounted(r: &tessera_engine::SyncReport) {
    assert_eq!(
        r.bytes_in_place
            + r.bytes_from_seeds
            + r.bytes_moved
            + r.bytes_fetched
            + r.bytes_duplicated
            + r.bytes_zero,
        r.image_size,
        "byte counts do not add up: {r:?}"
    );
}
