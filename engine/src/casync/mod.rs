//! Reading what casync publishes: block-image indexes (`.caibx`) and chunk stores
//! (`.castr`), see `docs/CASYNC.md`.
//!
//! - [`parse_index`] turns a `.caibx` into an [`Index`] whose ids are SHA-512/256 or
//!   SHA-256 ([`Index::digest`]), so sync, verify and serve check every chunk with it;
//! - [`CasyncStore`] is a [`ChunkStore`] reading one `<4 hex>/<id>.cacnk` file per chunk
//!   from any [`StoreRead`] (a directory, HTTP(S), S3), with requests in flight in
//!   parallel; [`decompress_chunk`] undoes casync's zstd, xz or gzip compression within
//!   the chunk's length and verifies the bytes before anyone sees them;
//! - [`cut_len`] is casync's chunker, to find an index's chunks in seeds.
//!
//! Every byte of a `.caibx` or `.cacnk` is hostile: sizes are checked before anything is
//! allocated from them, decompression stops one byte past the length the index gives.

mod chunker;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender};

pub use chunker::{cut_len, discriminator};

use crate::chunk::VerifiedChunk;
use crate::chunker::ChunkerParams;
use crate::digest::ChunkDigest;
use crate::error::{Error, Result};
use crate::index::{ChunkEntry, Index};
use crate::store::{ChunkStore, Estimate, FetchStream, Fetched, StoreRead};
use crate::ChunkId;

/// Object type of the index header (`CA_FORMAT_INDEX`).
pub const CA_FORMAT_INDEX: u64 = 0x9682_4d9c_7b12_9ff9;
/// Object type of the chunk table (`CA_FORMAT_TABLE`).
pub const CA_FORMAT_TABLE: u64 = 0xe75b_9e11_2f17_417d;
/// Marker closing the chunk table (`CA_FORMAT_TABLE_TAIL_MARKER`).
pub const CA_FORMAT_TABLE_TAIL_MARKER: u64 = 0x4b4f_050e_5549_ecd1;
/// Feature flag: chunk ids are SHA-512/256 (else SHA-256).
pub const CA_FORMAT_SHA512_256: u64 = 0x2000_0000_0000_0000;
/// Bytes of the index object (header, feature flags, chunk sizes).
const INDEX_LEN: usize = 48;
/// Bytes before the first table item (index object + table header).
const TABLE_START: usize = INDEX_LEN + 16;
/// Bytes per table item (end offset + 32-byte id) and of the table's tail.
const ITEM_LEN: usize = 40;
/// Largest chunk size accepted: tessera's own maximum (casync allows 128 MiB).
pub const MAX_CHUNK: u64 = 16 << 20;
/// Most memory the xz decoder may use for one chunk (xz -9 needs 65 MiB).
const XZ_MEMLIMIT: u64 = 80 << 20;

/// True when `bytes` starts like a casync index (what `tessera` commands use to tell a
/// `.caibx` from a tessera index).
pub fn is_index(bytes: &[u8]) -> bool {
    bytes.len() >= 16 && u64_at(bytes, 0) == INDEX_LEN as u64 && u64_at(bytes, 8) == CA_FORMAT_INDEX
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Largest `.caibx` file read: 16 M chunks, far more than any image needs.
pub const MAX_INDEX_FILE: u64 = 640 << 20;

/// Reads a whole `.caibx` file (at most [`MAX_INDEX_FILE`] bytes) for [`parse_index`].
///
/// # Errors
/// [`Error::Io`] naming the path when it cannot be read or is larger.
pub fn read_index_file(path: &std::path::Path) -> Result<Vec<u8>> {
    let io = |e| Error::io("reading casync index", path, e);
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_INDEX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_INDEX_FILE {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {MAX_INDEX_FILE} bytes"),
        )));
    }
    Ok(bytes)
}

/// Parses a casync block-image index (`.caibx`); `origin` names it in errors. The
/// index's root hash is the BLAKE3 of `bytes` (what `--root-hash` pins).
///
/// # Errors
/// [`Error::InvalidIndex`] saying what is wrong and at which byte offset.
pub fn parse_index(bytes: &[u8], origin: &str) -> Result<Index> {
    let bad = |reason: String| Error::InvalidIndex {
        origin: origin.to_string(),
        reason,
    };
    if !is_index(bytes) {
        return Err(bad(
            "not a casync index (no CA_FORMAT_INDEX header at offset 0)".into(),
        ));
    }
    if bytes.len() < TABLE_START + ITEM_LEN {
        return Err(bad(format!(
            "truncated: {} bytes, a header, table and tail need {}",
            bytes.len(),
            TABLE_START + ITEM_LEN
        )));
    }
    let flags = u64_at(bytes, 16);
    let digest = if flags & CA_FORMAT_SHA512_256 != 0 {
        ChunkDigest::Sha512_256
    } else {
        ChunkDigest::Sha256
    };
    let (min, avg, max) = (u64_at(bytes, 24), u64_at(bytes, 32), u64_at(bytes, 40));
    for (name, v, at) in [
        ("minimum", min, 24),
        ("average", avg, 32),
        ("maximum", max, 40),
    ] {
        if !(1..=MAX_CHUNK).contains(&v) {
            return Err(bad(format!(
                "{name} chunk size {v} at offset {at} is outside 1..={MAX_CHUNK}"
            )));
        }
    }
    if !(min <= avg && avg <= max) {
        return Err(bad(format!(
            "chunk sizes {min}:{avg}:{max} at offset 24 are not minimum <= average <= maximum"
        )));
    }
    if u64_at(bytes, 48) != u64::MAX || u64_at(bytes, 56) != CA_FORMAT_TABLE {
        return Err(bad("no CA_FORMAT_TABLE header at offset 48".into()));
    }
    let table = &bytes[TABLE_START..];
    if table.len() % ITEM_LEN != 0 {
        return Err(bad(format!(
            "{} bytes after the table header at offset {TABLE_START} are not whole \
             {ITEM_LEN}-byte items (truncated or corrupted)",
            table.len()
        )));
    }
    let count = table.len() / ITEM_LEN - 1;
    let tail_at = TABLE_START + count * ITEM_LEN;
    let tail = &bytes[tail_at..];
    let table_size = (16 + (count + 1) * ITEM_LEN) as u64;
    if u64_at(tail, 32) != CA_FORMAT_TABLE_TAIL_MARKER
        || u64_at(tail, 0) != 0
        || u64_at(tail, 8) != 0
        || u64_at(tail, 16) != INDEX_LEN as u64
        || u64_at(tail, 24) != table_size
    {
        return Err(bad(format!(
            "no valid table tail at offset {tail_at} (the last {ITEM_LEN} bytes; truncated \
             or corrupted)"
        )));
    }
    let mut records = Vec::with_capacity(count);
    let mut prev = 0u64;
    for i in 0..count {
        let at = TABLE_START + i * ITEM_LEN;
        let end = u64_at(bytes, at);
        let len = end.wrapping_sub(prev);
        if end <= prev || len > max {
            return Err(bad(format!(
                "chunk {i} (item at offset {at}) ends at {end}, {} (chunks must follow each \
                 other, 1..={max} bytes each)",
                if end <= prev {
                    format!("not after the previous end {prev}")
                } else {
                    format!("{len} bytes after the previous end {prev}")
                }
            )));
        }
        let id = ChunkId(bytes[at + 8..at + ITEM_LEN].try_into().expect("32 bytes"));
        records.push((id, len as u32));
        prev = end;
    }
    let params = ChunkerParams {
        min: min as u32,
        avg: avg as u32,
        max: max as u32,
    };
    Index::with_digest(params, digest, records, *blake3::hash(bytes).as_bytes())
        .map_err(|e| bad(e.to_string()))
}

/// The store-relative path of a chunk: `<first 4 hex>/<64 hex>.cacnk`.
pub fn chunk_path(id: &ChunkId) -> String {
    let hex = id.to_string();
    format!("{}/{hex}.cacnk", &hex[..4])
}

/// The compressions casync writes chunks with, told apart by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd frames (casync's default).
    Zstd,
    /// xz streams.
    Xz,
    /// gzip members.
    Gzip,
}

impl Compression {
    /// The compression `data` starts with, if any casync writes.
    pub fn detect(data: &[u8]) -> Option<Compression> {
        if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Compression::Xz)
        } else if data.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else {
            None
        }
    }
}

/// Decompresses a `.cacnk` file, which must hold exactly `expected_len` bytes, and checks
/// they hash to `id` with `digest`. Never holds more than `expected_len + 1` decompressed
/// bytes, whatever the file claims.
///
/// # Errors
/// [`Error::CorruptChunk`] naming `id` and `origin`: unknown compression, a bad stream,
/// a wrong length or a hash mismatch.
pub fn decompress_chunk(
    digest: ChunkDigest,
    id: ChunkId,
    compressed: &[u8],
    expected_len: u32,
    origin: &str,
) -> Result<VerifiedChunk> {
    let corrupt = |reason: String| Error::CorruptChunk {
        id,
        origin: origin.to_string(),
        reason,
    };
    let limit = u64::from(expected_len) + 1;
    let mut data = Vec::with_capacity(expected_len as usize + 1);
    let kind = Compression::detect(compressed).ok_or_else(|| {
        corrupt(format!(
            "not zstd, xz or gzip (starts with {:02x?})",
            &compressed[..compressed.len().min(6)]
        ))
    })?;
    let read = match kind {
        // Into a buffer of the expected length plus one: zstd then needs no window of
        // its own, whatever window size a hostile frame declares.
        Compression::Zstd => zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(compressed, &mut data))
            .map(|_| ()),
        Compression::Xz => xz2::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0)
            .map_err(std::io::Error::other)
            .and_then(|s| {
                xz2::bufread::XzDecoder::new_stream(compressed, s)
                    .take(limit)
                    .read_to_end(&mut data)
            })
            .map(|_| ()),
        Compression::Gzip => flate2::bufread::GzDecoder::new(compressed)
            .take(limit)
            .read_to_end(&mut data)
            .map(|_| ()),
    };
    if let Err(e) = read {
        return Err(corrupt(format!(
            "not a valid {kind:?} stream of {expected_len} bytes: {e}"
        )));
    }
    if data.len() != expected_len as usize {
        return Err(corrupt(format!(
            "decompressed to {}{} bytes, the index says {expected_len}",
            if data.len() as u64 == limit {
                "more than "
            } else {
                ""
            },
            data.len().min(expected_len as usize)
        )));
    }
    VerifiedChunk::verify_with(digest, id, data, origin)
}

/// Most bytes a `.cacnk` of a `len`-byte chunk may take: incompressible data grows a
/// little under each compressor.
fn compressed_limit(len: u32) -> u64 {
    u64::from(len) + u64::from(len) / 64 + 4096
}

/// The verified chunks of a casync index from a casync chunk store (`.castr`): one file
/// per chunk, requests in flight in parallel as the underlying store allows.
pub struct CasyncStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn StoreRead>,
    digest: ChunkDigest,
}

impl std::fmt::Debug for CasyncStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CasyncStore")
            .field("location", &self.inner.store.location())
            .field("digest", &self.inner.digest)
            .finish()
    }
}

impl CasyncStore {
    /// A chunk store reading `store` for the chunks of `index` (a casync index: its digest
    /// checks every chunk).
    pub fn new(store: Arc<dyn StoreRead>, index: &Index) -> CasyncStore {
        CasyncStore {
            inner: Arc::new(Inner {
                store,
                digest: index.digest(),
            }),
        }
    }
}

impl Inner {
    fn fetch(&self, entry: &ChunkEntry) -> Result<Fetched> {
        let rel = chunk_path(&entry.id);
        let origin = format!("{}/{rel}", self.store.location().trim_end_matches('/'));
        let mut downloaded = 0;
        let mut requests = 0;
        let mut attempt = 0;
        loop {
            requests += 1;
            let Some(bytes) = self.store.read_file(&rel, compressed_limit(entry.len))? else {
                return Err(Error::MissingChunk {
                    id: entry.id,
                    origin: format!("{origin}, which does not exist"),
                });
            };
            downloaded += bytes.len() as u64;
            match decompress_chunk(self.digest, entry.id, &bytes, entry.len, &origin) {
                Ok(chunk) => {
                    return Ok(Fetched {
                        chunk,
                        compressed: bytes,
                        downloaded,
                        requests,
                    })
                }
                Err(e) if attempt >= self.store.retries() => return Err(e),
                Err(_) => attempt += 1,
            }
        }
    }
}

impl ChunkStore for CasyncStore {
    fn location(&self) -> String {
        self.inner.store.location()
    }

    fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched> {
        self.inner.fetch(entry)
    }

    fn fetch_ordered<'a>(&'a self, entries: Vec<ChunkEntry>) -> FetchStream<'a> {
        let threads = self.in_flight().max(1).min(entries.len().max(1));
        let (jobs_tx, jobs_rx) = unbounded::<(usize, ChunkEntry)>();
        let (done_tx, done_rx) = unbounded::<(usize, Result<Fetched>)>();
        for _ in 0..threads {
            let (jobs_rx, done_tx) = (jobs_rx.clone(), done_tx.clone());
            let inner = Arc::clone(&self.inner);
            std::thread::Builder::new()
                .name("casync-fetch".into())
                .spawn(move || {
                    for (i, entry) in jobs_rx {
                        if done_tx.send((i, inner.fetch(&entry))).is_err() {
                            return;
                        }
                    }
                })
                .expect("spawning a fetch thread");
        }
        let mut ordered = Ordered {
            entries,
            next: 0,
            queued: 0,
            window: threads * 4,
            jobs: Some(jobs_tx),
            done: done_rx,
            ready: HashMap::new(),
        };
        ordered.feed();
        Box::new(ordered)
    }

    fn in_flight(&self) -> usize {
        self.inner.store.in_flight()
    }

    fn estimate(&self, entries: &[ChunkEntry]) -> Result<Estimate> {
        // One request per chunk; its size is unknown until fetched: the uncompressed
        // length bounds it (compression only shrinks real chunks).
        Ok(Estimate {
            bytes: entries.iter().map(|e| u64::from(e.len)).sum(),
            requests: entries.len() as u64,
        })
    }
}

/// [`CasyncStore::fetch_ordered`]'s stream: at most `window` chunks queued or held past
/// the one the caller waits for.
struct Ordered {
    entries: Vec<ChunkEntry>,
    next: usize,
    queued: usize,
    window: usize,
    /// Dropped with the stream: the fetch threads then end after their current chunk.
    jobs: Option<Sender<(usize, ChunkEntry)>>,
    done: Receiver<(usize, Result<Fetched>)>,
    ready: HashMap<usize, Result<Fetched>>,
}

impl Ordered {
    fn feed(&mut self) {
        let Some(jobs) = &self.jobs else { return };
        while self.queued < self.entries.len() && self.queued < self.next + self.window {
            let _ = jobs.send((self.queued, self.entries[self.queued]));
            self.queued += 1;
        }
        if self.queued == self.entries.len() {
            self.jobs = None;
        }
    }
}

impl Iterator for Ordered {
    type Item = Result<Fetched>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.entries.len() {
            return None;
        }
        loop {
            if let Some(r) = self.ready.remove(&self.next) {
                self.next += 1;
                self.feed();
                return Some(r);
            }
            match self.done.recv() {
                Ok((i, r)) => {
                    self.ready.insert(i, r);
                }
                Err(_) => {
                    let id = self.entries[self.next].id;
                    self.next += 1;
                    return Some(Err(Error::InvalidInput(format!(
                        "a fetch thread died while fetching chunk {id}"
                    ))));
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.entries.len() - self.next;
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A `.caibx` of `chunks` as casync writes it.
    fn caibx(flags: u64, sizes: (u64, u64, u64), chunks: &[(ChunkId, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [
            INDEX_LEN as u64,
            CA_FORMAT_INDEX,
            flags,
            sizes.0,
            sizes.1,
            sizes.2,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&CA_FORMAT_TABLE.to_le_bytes());
        let mut end = 0;
        for (id, len) in chunks {
            end += len;
            b.extend_from_slice(&end.to_le_bytes());
            b.extend_from_slice(id.as_bytes());
        }
        let size = (16 + (chunks.len() + 1) * ITEM_LEN) as u64;
        for v in [0, 0, INDEX_LEN as u64, size, CA_FORMAT_TABLE_TAIL_MARKER] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn sample() -> Vec<u8> {
        let d = ChunkDigest::Sha512_256;
        caibx(
            CA_FORMAT_SHA512_256,
            (16, 64, 256),
            &[(d.id(b"abc"), 3), (d.id(&[0; 200]), 200), (d.id(b"x"), 1)],
        )
    }

    #[test]
    fn parses_what_casync_writes() {
        let index = parse_index(&sample(), "t").unwrap();
        assert_eq!(index.digest(), ChunkDigest::Sha512_256);
        assert_eq!(index.image_size(), 204);
        let c = index.chunks();
        assert_eq!((c[1].offset, c[1].len, c[1].zero), (3, 200, true));
        assert!(!c[0].zero && !c[2].zero);
        assert_eq!(index.root_hash(), *blake3::hash(&sample()).as_bytes());
        let sha256 = caibx(0, (16, 64, 256), &[(ChunkId([1; 32]), 5)]);
        assert_eq!(
            parse_index(&sha256, "t").unwrap().digest(),
            ChunkDigest::Sha256
        );
        // An empty image.
        assert_eq!(
            parse_index(&caibx(0, (1, 1, 1), &[]), "t")
                .unwrap()
                .image_size(),
            0
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_handled() {
        let bytes = sample();
        for n in 0..bytes.len() {
            let e = parse_index(&bytes[..n], "t.caibx").unwrap_err().to_string();
            assert!(e.contains("t.caibx"), "{e}");
        }
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            // Flips in ids and flags give another valid index; none may panic.
            let _ = parse_index(&b, "t");
        }
    }

    #[test]
    fn chunks_out_of_order_or_too_large_are_refused() {
        let id = ChunkId([2; 32]);
        let e = parse_index(&caibx(0, (16, 64, 256), &[(id, 300)]), "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("item at offset 64") && e.contains("300 bytes"),
            "{e}"
        );
        let e = parse_index(&caibx(0, (16, 64, 256), &[(id, 5), (id, 0)]), "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("item at offset 104") && e.contains("not after"),
            "{e}"
        );
        let e = parse_index(&caibx(0, (16, 64, 32 << 20), &[]), "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("maximum chunk size") && e.contains("offset 40"),
            "{e}"
        );
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut w = xz2::write::XzEncoder::new(Vec::new(), 6);
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn each_compression_decompresses_verified_and_bounded() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = ChunkDigest::Sha256;
        let id = d.id(&data);
        for file in [crate::chunk::compress(&data), xz(&data), gzip(&data)] {
            let c = decompress_chunk(d, id, &file, 5000, "t").unwrap();
            assert_eq!(c.data(), &data[..]);
            // Wrong length, wrong id, wrong digest, damaged stream: all refused.
            assert!(decompress_chunk(d, id, &file, 4999, "t").is_err());
            assert!(decompress_chunk(d, id, &file, 5001, "t").is_err());
            assert!(decompress_chunk(d, ChunkId([0; 32]), &file, 5000, "t").is_err());
            assert!(decompress_chunk(ChunkDigest::Sha512_256, id, &file, 5000, "t").is_err());
            let mut bad = file.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x55;
            assert!(decompress_chunk(d, id, &bad, 5000, "t").is_err());
            assert!(decompress_chunk(d, id, &file[..file.len() - 3], 5000, "t").is_err());
        }
        let e = decompress_chunk(d, id, b"plain bytes", 11, "here")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not zstd, xz or gzip") && e.contains("here"),
            "{e}"
        );
    }

    #[test]
    fn a_bomb_stops_one_byte_past_the_expected_length() {
        // 64 MiB of zeros in a few KiB: decompression stops after 4097 bytes.
        let zeros = vec![0u8; 64 << 20];
        for file in [xz(&zeros), gzip(&zeros), crate::chunk::compress(&zeros)] {
            assert!(file.len() < 100 << 10);
            let e = decompress_chunk(ChunkDigest::Sha256, ChunkId([0; 32]), &file, 4096, "t")
                .unwrap_err()
                .to_string();
            // xz and gzip stop reading at 4097 bytes; zstd fills a 4097-byte buffer.
            assert!(
                e.contains("more than 4096 bytes") || e.contains("too small"),
                "{e}"
            );
        }
    }

    #[test]
    fn chunk_paths_are_casyncs() {
        let id: ChunkId = "ab12".repeat(16).parse().unwrap();
        assert_eq!(chunk_path(&id), format!("ab12/{}.cacnk", "ab12".repeat(16)));
    }
}
