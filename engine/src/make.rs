//! `make`: cut an image into chunks, store the new ones, write the index.
//!
//! One reader thread chunks the source (and hashes the whole image in the same pass) and
//! feeds a bounded channel; worker threads hash, skip chunks the store already holds intact,
//! compress and store; the calling thread puts results back in image order.
//!
//! The index is published only when every chunk it names is in the store: a chunk is
//! skipped only when [`ChunkStore::check_stored`] finds the store's own file good (a
//! cache in front of the store does not count), and a damaged file there (empty,
//! truncated, foreign, a link) is replaced atomically and counted in
//! [`MakeReport::repaired_chunks`]. Memory is bounded by the
//! channel depth times the maximum chunk size, whatever the image size.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::chunk::compress;
use crate::chunker::{Chunker, ChunkerParams};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::index::{hex, Index, ZeroIds};
use crate::progress::Progress;
use crate::store::{ChunkStore, StoredChunk};
use crate::ChunkId;

/// Options for [`make`].
#[derive(Debug, Clone)]
pub struct MakeOptions {
    /// Chunk sizes; default 16/64/256 KiB.
    pub params: ChunkerParams,
    /// Hash/compress worker threads; default: the number of CPUs.
    pub workers: usize,
}

impl Default for MakeOptions {
    fn default() -> Self {
        MakeOptions {
            params: ChunkerParams::default(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// What [`make`] did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MakeReport {
    /// Bytes in the image.
    pub image_size: u64,
    /// Chunks in the index (with repeats).
    pub chunk_count: u64,
    /// Distinct chunks, zero chunks excluded.
    pub unique_chunks: u64,
    /// Chunks the store did not have, written by this run.
    pub new_chunks: u64,
    /// Chunk files the store had but that were damaged (empty, truncated, foreign
    /// content, not a regular file), replaced by this run.
    pub repaired_chunks: u64,
    /// Compressed bytes written to the store by this run (new and repaired chunks).
    pub stored_bytes: u64,
    /// Uncompressed bytes of the chunks written by this run (new and repaired).
    pub new_bytes: u64,
    /// Chunks of zeros (no store file).
    pub zero_chunks: u64,
    /// BLAKE3 of the index file, hex.
    pub root_hash: String,
    /// BLAKE3 of the whole image, hex.
    pub image_hash: String,
}

struct Cut {
    seq: u64,
    data: Vec<u8>,
}

struct Done {
    seq: u64,
    id: ChunkId,
    len: u32,
    zero: bool,
    stored: Option<Stored>,
}

/// A chunk file this run wrote.
struct Stored {
    compressed: u64,
    raw: u64,
    repaired: bool,
}

/// Chunks `source` (file or block device), puts its new chunks into `store`, and writes
/// the index to `index_out` (atomically, after the store is flushed).
///
/// # Errors
/// I/O errors on the source, store or index path.
pub fn make(
    source: &Path,
    store: &dyn ChunkStore,
    index_out: &Path,
    opts: &MakeOptions,
    progress: &dyn Progress,
) -> Result<(Index, MakeReport)> {
    let device = Device::open_read(source)?;
    let image_size = device.size();
    progress.start("chunking", image_size);
    let workers = opts.workers.max(1);
    let (cut_tx, cut_rx) = bounded::<Cut>(workers * 2);
    let (done_tx, done_rx) = bounded::<Result<Done>>(workers * 4);
    let claimed = Mutex::new(HashSet::<ChunkId>::new());
    let params = opts.params;

    let (image_hash, records, report) = std::thread::scope(|s| -> Result<_> {
        let reader = s.spawn(move || -> Result<[u8; 32]> {
            // Read through a `Take` so a growing file never yields more than its size.
            let mut chunker = Chunker::new(std::io::Read::take(device.file(), image_size), params);
            let mut hasher = blake3::Hasher::new();
            let mut seq = 0u64;
            let mut read_total = 0u64;
            loop {
                let next = chunker
                    .next_chunk(&mut |bytes| {
                        hasher.update(bytes);
                        read_total += bytes.len() as u64;
                    })
                    .map_err(|e| Error::io("reading", device.path(), e))?;
                let Some(raw) = next else { break };
                if cut_tx
                    .send(Cut {
                        seq,
                        data: raw.data,
                    })
                    .is_err()
                {
                    break; // A worker failed; its error is reported.
                }
                seq += 1;
            }
            if read_total != image_size {
                return Err(Error::io(
                    "reading",
                    device.path(),
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "source shrank while reading: got {read_total} of {image_size} bytes"
                        ),
                    ),
                ));
            }
            Ok(*hasher.finalize().as_bytes())
        });
        for _ in 0..workers {
            let cut_rx = cut_rx.clone();
            let done_tx = done_tx.clone();
            let claimed = &claimed;
            s.spawn(move || {
                let mut zeros = ZeroIds::default();
                for cut in cut_rx {
                    let result = process(cut, store, claimed, &mut zeros, progress);
                    let failed = result.is_err();
                    if done_tx.send(result).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(cut_rx);
        drop(done_tx);

        let mut pending = BTreeMap::new();
        let mut records = Vec::new();
        let mut report = MakeReport {
            image_size,
            chunk_count: 0,
            unique_chunks: 0,
            new_chunks: 0,
            repaired_chunks: 0,
            stored_bytes: 0,
            new_bytes: 0,
            zero_chunks: 0,
            root_hash: String::new(),
            image_hash: String::new(),
        };
        let mut first_error = None;
        for done in done_rx {
            let done = match done {
                Ok(d) => d,
                Err(e) => {
                    first_error.get_or_insert(e);
                    break;
                }
            };
            if done.zero {
                report.zero_chunks += 1;
            }
            if let Some(stored) = done.stored {
                if stored.repaired {
                    report.repaired_chunks += 1;
                } else {
                    report.new_chunks += 1;
                }
                report.stored_bytes += stored.compressed;
                report.new_bytes += stored.raw;
            }
            pending.insert(done.seq, (done.id, done.len));
            while let Some(entry) = pending.remove(&(records.len() as u64)) {
                records.push(entry);
            }
        }
        // Dropping the receiver (loop ended) unblocks workers; the reader stops on send error.
        let reader_result = reader.join().expect("reader thread panicked");
        if let Some(e) = first_error {
            return Err(e);
        }
        let image_hash = reader_result?;
        report.unique_chunks = claimed.lock().expect("claimed set").len() as u64;
        Ok((image_hash, records, report))
    })?;

    let index = Index::new(params, image_hash, records)?;
    store.flush()?;
    index.save(index_out)?;
    let mut report = report;
    report.chunk_count = index.chunks().len() as u64;
    report.root_hash = hex(&index.root_hash());
    report.image_hash = hex(&index.image_hash());
    Ok((index, report))
}

fn process(
    cut: Cut,
    store: &dyn ChunkStore,
    claimed: &Mutex<HashSet<ChunkId>>,
    zeros: &mut ZeroIds,
    progress: &dyn Progress,
) -> Result<Done> {
    let len = cut.data.len() as u32;
    let id = ChunkId::of(&cut.data);
    progress.advance(u64::from(len));
    let zero = zeros.get(len) == id;
    let mut stored = None;
    // One worker per distinct chunk; skip compression for chunks the store holds intact.
    if !zero && claimed.lock().expect("claimed set").insert(id) {
        let written = match store.check_stored(&id, &cut.data)? {
            StoredChunk::Present => None,
            StoredChunk::Missing => {
                let compressed = compress(&cut.data);
                // False: another writer stored it meanwhile (atomically, so it is whole).
                store
                    .put_compressed(&id, &compressed)?
                    .then_some((compressed, false))
            }
            StoredChunk::Damaged(_) => {
                let compressed = compress(&cut.data);
                store.replace_compressed(&id, &compressed)?;
                Some((compressed, true))
            }
        };
        stored = written.map(|(compressed, repaired)| Stored {
            compressed: compressed.len() as u64,
            raw: u64::from(len),
            repaired,
        });
    }
    Ok(Done {
        seq: cut.seq,
        id,
        len,
        zero,
        stored,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::progress::NoProgress;
    use crate::store::{CacheOptions, CacheStore, LocalStore};

    /// 2 MiB of pseudo-random bytes with a run of zeros.
    fn image(dir: &Path) -> std::path::PathBuf {
        let mut bytes = vec![0u8; 2 << 20];
        blake3::Hasher::new()
            .update(b"make tests")
            .finalize_xof()
            .fill(&mut bytes);
        bytes[1 << 20..(1 << 20) + 300_000].fill(0);
        let path = dir.join("image");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn opts() -> MakeOptions {
        MakeOptions {
            params: ChunkerParams::default(),
            workers: 3,
        }
    }

    #[test]
    fn a_warm_cache_is_never_taken_for_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let first = Arc::new(LocalStore::open(dir.path().join("a"), true).unwrap());
        let (index, _) = make(
            &img,
            &*first,
            &dir.path().join("a.tidx"),
            &opts(),
            &NoProgress,
        )
        .unwrap();
        // Warm a cache with every chunk, fetched through it from the first store.
        let cache_dir = dir.path().join("cache");
        let warm = CacheStore::open(&cache_dir, first, &CacheOptions::default()).unwrap();
        for e in index.chunks().iter().filter(|e| !e.zero) {
            warm.fetch(e).unwrap();
        }
        // Make again into an empty store with that cache in front.
        let second = Arc::new(LocalStore::open(dir.path().join("b"), true).unwrap());
        let cached =
            CacheStore::open(&cache_dir, second.clone(), &CacheOptions::default()).unwrap();
        let (index, report) = make(
            &img,
            &cached,
            &dir.path().join("b.tidx"),
            &opts(),
            &NoProgress,
        )
        .unwrap();
        assert_eq!(report.new_chunks, report.unique_chunks);
        for e in index.chunks().iter().filter(|e| !e.zero) {
            second.fetch(e).unwrap();
        }
    }
}
