//! [`sync_stream`]: the image written to a stream (a pipe, `tessera sync INDEX -`) in
//! image order, for consumers that cannot seek (`ubiupdatevol`, flashers, handler chains).
//!
//! Seeds are scanned (or their indexes read) as for an in-place sync; then each chunk of
//! the image, in order, is taken from a seed (hashed when read, the store used if every
//! copy is wrong), written as zeros, or taken from the store's ordered fetch stream (which
//! keeps requests in flight ahead of the writer). Nothing is written before its hash
//! matched. The whole image's hash is checked at the end: a stream cannot be taken back,
//! so a consumer must commit what it received only when the run ends successfully.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use serde::Serialize;

use super::seed::{self, Found, ScanSource};
use super::{Holder, ReadAt, SeedSpec};
use crate::chunk::VerifiedChunk;
use crate::device::Device;
use crate::digest::ChunkDigest;
use crate::error::{Error, Result};
use crate::index::{hex, ChunkEntry, ImageHasher, Index, FORMAT_VERSION_1};
use crate::progress::Progress;
use crate::store::{ChunkStore, Fetched};
use crate::ChunkId;

/// What [`sync_stream`] did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StreamReport {
    /// Bytes in the image, all written to the stream.
    pub image_size: u64,
    /// BLAKE3 of the image as written, hex (checked against the index's).
    pub image_hash: String,
    /// Bytes taken from seeds (each hashed when read).
    pub bytes_from_seeds: u64,
    /// Bytes of chunks fetched from the store (uncompressed, once per fetch).
    pub bytes_fetched: u64,
    /// Chunks fetched from the store.
    pub chunks_fetched: u64,
    /// Compressed bytes downloaded from the store.
    pub bytes_downloaded: u64,
    /// Requests made to the store.
    pub requests: u64,
    /// Bytes of zero chunks written.
    pub bytes_zero: u64,
    /// Chunks whose seed copies did not hash to their id, fetched from the store instead.
    pub fallbacks: u64,
}

/// Writes the image of `index` to `out` in order, taking chunks from `seeds` where they
/// hold them and fetching the rest from `store`; `out_name` names `out` in messages.
/// Every chunk is hashed before it is written; the whole image's hash is checked at the
/// end. `out` is flushed but not synced.
///
/// # Errors
/// [`Error::Io`] for a seed that cannot be read or an `out` that cannot be written (a
/// consumer that went away); [`Error::MissingChunk`] / [`Error::CorruptChunk`] for a chunk
/// no source has intact; [`Error::VerifyFailed`] if the image's hash differs at the end.
/// Part of the image may have been written to `out` when an error is returned.
pub fn sync_stream(
    index: &Index,
    out: &mut dyn Write,
    out_name: &str,
    store: &dyn ChunkStore,
    seeds: &[SeedSpec],
    workers: usize,
    progress: &dyn Progress,
) -> Result<StreamReport> {
    super::memory::apply_fetch_window();
    let repeat_cache = super::memory::repeat_cache();
    let devices = seeds
        .iter()
        .map(|s| Device::open_read(&s.path))
        .collect::<Result<Vec<_>>>()?;
    let sources: Vec<ScanSource<'_>> = devices
        .iter()
        .zip(seeds)
        .enumerate()
        .filter(|(_, (_, spec))| spec.index.is_none())
        .map(|(n, (dev, _))| ScanSource {
            holder: Holder::Seed(n as u16),
            reader: dev,
            len: ReadAt::size(dev),
        })
        .collect();
    let mut found = if sources.is_empty() {
        Found::default()
    } else {
        seed::scan(index, &sources, workers.max(1), progress)?
    };
    for (n, (dev, spec)) in devices.iter().zip(seeds).enumerate() {
        if let Some(si) = &spec.index {
            seed::from_index(
                &mut found,
                index,
                Holder::Seed(n as u16),
                si,
                ReadAt::size(dev),
            );
        }
    }

    // The store's chunks, each id once, in the order of their first occurrence.
    let mut occurrences: HashMap<ChunkId, usize> = HashMap::new();
    let mut from_store = Vec::new();
    let mut listed = HashSet::new();
    for c in index.chunks().iter().filter(|c| !c.zero) {
        *occurrences.entry(c.id).or_default() += 1;
        if !found.locations.contains_key(&c.id) && listed.insert(c.id) {
            from_store.push(*c);
        }
    }
    let mut fetched = store.fetch_ordered(from_store);
    let mut kept: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    let mut kept_bytes = 0;
    let mut report = StreamReport {
        image_size: index.image_size(),
        ..StreamReport::default()
    };
    let count = |report: &mut StreamReport, f: Fetched| {
        report.bytes_fetched += f.chunk.data().len() as u64;
        report.chunks_fetched += 1;
        report.bytes_downloaded += f.downloaded;
        report.requests += f.requests;
        progress.requests(f.requests);
        f.chunk.into_data()
    };
    let zeros = vec![0u8; index.params().max as usize];
    let mut hasher = StreamHasher::for_index(index);
    progress.start("writing", index.image_size());
    for c in index.chunks() {
        let owned: Vec<u8>;
        let data: &[u8] = if c.zero {
            report.bytes_zero += u64::from(c.len);
            &zeros[..c.len as usize]
        } else if let Some(k) = kept.get(&c.id) {
            owned = k.clone();
            &owned
        } else if let Some(locations) = found.locations.get(&c.id) {
            owned = match from_seeds(index.digest(), c, locations, &devices) {
                Some(k) => {
                    report.bytes_from_seeds += u64::from(c.len);
                    k.into_data()
                }
                None => {
                    report.fallbacks += 1;
                    count(&mut report, store.fetch_verified(c)?)
                }
            };
            &owned
        } else {
            let f = match fetched.next() {
                Some(f) => f?,
                None => store.fetch_verified(c)?,
            };
            if f.chunk.id() != c.id {
                return Err(Error::InvalidInput(format!(
                    "store {} answered chunk {} when {} was asked for",
                    store.location(),
                    f.chunk.id(),
                    c.id
                )));
            }
            owned = count(&mut report, f);
            &owned
        };
        hasher.update(data);
        out.write_all(data)
            .map_err(|e| Error::io("writing the image to", out_name, e))?;
        if !c.zero {
            let left = occurrences.get_mut(&c.id).expect("counted above");
            *left -= 1;
            if *left == 0 {
                if let Some(k) = kept.remove(&c.id) {
                    kept_bytes -= k.len();
                }
            } else if !kept.contains_key(&c.id) && kept_bytes + data.len() <= repeat_cache {
                kept_bytes += data.len();
                kept.insert(c.id, data.to_vec());
            }
        }
        progress.advance(u64::from(c.len));
        progress.chunks(1);
    }
    out.flush()
        .map_err(|e| Error::io("writing the image to", out_name, e))?;
    let hash = hasher.finalize();
    if index.image_hash() != [0; 32] && hash != index.image_hash() {
        return Err(Error::VerifyFailed(format!(
            "the image written to {out_name} hashes to {} instead of the index's image hash \
             {}: the consumer must discard it",
            hex(&hash),
            hex(&index.image_hash())
        )));
    }
    report.image_hash = hex(&hash);
    Ok(report)
}

/// The chunk `c` from the first seed copy that hashes to its id.
fn from_seeds(
    digest: ChunkDigest,
    c: &ChunkEntry,
    locations: &[super::Location],
    devices: &[Device],
) -> Option<VerifiedChunk> {
    locations.iter().find_map(|l| {
        let Holder::Seed(n) = l.holder else {
            return None;
        };
        let dev = devices.get(usize::from(n))?;
        let mut buf = vec![0u8; c.len as usize];
        ReadAt::read_exact_at(dev, &mut buf, l.offset).ok()?;
        VerifiedChunk::verify_with(digest, c.id, buf, &dev.path().display().to_string()).ok()
    })
}

/// Hashes the image as written, the way the index's format version defines its image
/// hash (v1: BLAKE3 of the whole image; v2: [`ImageHasher`]). An index that records no
/// image hash (all zeros: `commit`, casync) is checked chunk by chunk only.
enum StreamHasher {
    V1(Box<blake3::Hasher>),
    V2(Box<ImageHasher>),
}

impl StreamHasher {
    fn for_index(index: &Index) -> StreamHasher {
        if index.version() == FORMAT_VERSION_1 {
            StreamHasher::V1(Box::default())
        } else {
            StreamHasher::V2(Box::default())
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            StreamHasher::V1(h) => {
                h.update(bytes);
            }
            StreamHasher::V2(h) => h.update(bytes),
        }
    }

    fn finalize(self) -> [u8; 32] {
        match self {
            StreamHasher::V1(h) => *h.finalize().as_bytes(),
            StreamHasher::V2(h) => h.finalize(),
        }
    }
}
