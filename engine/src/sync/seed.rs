//! Finding what the target and the seeds already hold.
//!
//! A seed without an index, and the target, are *scanned*: read in large segments, cut
//! with the image's chunker parameters and hashed, in parallel. Each segment is cut from
//! its start and on past its end until the cuts have realigned with the next segment's, so
//! splitting the work loses (almost) no chunk. Every chunk found this way was hashed, so
//! its location is *verified*. For the target, the scan also hashes the range of every
//! chunk of the image at its own place, reusing the cut's hash when the ranges coincide:
//! that tells which chunks are already in place (nothing is written there).
//!
//! A segment that lies in a hole of its file (`SEEK_DATA`) is not read: it holds no chunk
//! worth finding, and the image's zero chunks there are in place.
//!
//! A seed with an index (`--seed-index`) is not read at all here: its index gives
//! unverified locations, which the executor hashes when it reads them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::io::ReadAt;
use super::plan::{Holder, Holdings, InPlace, Location};
use crate::digest::ChunkDigest;
use crate::error::Result;
use crate::index::Index;
use crate::progress::Progress;
use crate::ChunkId;

/// Locations kept per chunk id: enough to choose a source that no write destroys.
const MAX_LOCATIONS: usize = 8;

/// A device to scan.
pub(crate) struct ScanSource<'a> {
    /// The target or a seed.
    pub holder: Holder,
    /// Its bytes.
    pub reader: &'a dyn ReadAt,
    /// How many bytes from the start to scan.
    pub len: u64,
}

/// What a scan found.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// Per chunk of the image: the target holds it at its place (hashed).
    pub in_place: Vec<bool>,
    /// Per chunk of the image: the target is said to hold it at its place (by its index,
    /// or because it was just created and reads as zeros), unhashed.
    pub assumed: Vec<bool>,
    /// Verified locations of the image's chunks.
    pub locations: HashMap<ChunkId, Vec<Location>>,
}

impl Found {
    /// Adds a location unless already known or the id has enough of them.
    pub fn add(&mut self, id: ChunkId, loc: Location) {
        let list = self.locations.entry(id).or_default();
        if list.len() < MAX_LOCATIONS
            && !list
                .iter()
                .any(|l| l.holder == loc.holder && l.offset == loc.offset)
        {
            list.push(loc);
        }
    }

    /// The planner's view of what was found.
    pub fn holdings(&self) -> Holdings {
        let in_place = self
            .in_place
            .iter()
            .zip(self.assumed.iter().chain(std::iter::repeat(&false)))
            .map(|(&hashed, &assumed)| match (hashed, assumed) {
                (true, _) => InPlace::Verified,
                (false, true) => InPlace::Assumed,
                (false, false) => InPlace::No,
            })
            .collect();
        Holdings {
            in_place,
            locations: self.locations.clone(),
        }
    }
}

/// The ids worth finding: the image's non-zero chunks.
pub(crate) fn wanted(index: &Index) -> HashSet<ChunkId> {
    index
        .chunks()
        .iter()
        .filter(|c| !c.zero)
        .map(|c| c.id)
        .collect()
}

/// Scans `sources` with `workers` threads.
///
/// # Errors
/// Read errors of any source, naming it.
pub(crate) fn scan(
    index: &Index,
    sources: &[ScanSource<'_>],
    workers: usize,
    progress: &dyn Progress,
) -> Result<Found> {
    let wanted = wanted(index);
    // Bytes a scan worker reads and cuts at once (plus a few maximum chunks of overlap).
    let segment = super::memory::scan_segment(workers, u64::from(index.params().max));
    let mut tasks = Vec::new();
    for (s, src) in sources.iter().enumerate() {
        let mut start = 0;
        while start < src.len {
            let end = (start + segment).min(src.len);
            tasks.push((s, start, end));
            start = end;
        }
    }
    progress.start("scanning", sources.iter().map(|s| s.len).sum());
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let found = Mutex::new(Found {
        in_place: vec![false; index.chunks().len()],
        ..Found::default()
    });
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers.clamp(1, tasks.len().max(1)))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let Some(&(src, start, end)) =
                            tasks.get(next.fetch_add(1, Ordering::Relaxed))
                        else {
                            break;
                        };
                        let r = scan_segment(
                            index,
                            &wanted,
                            &sources[src],
                            start,
                            end,
                            &mut buf,
                            &found,
                        );
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                            return r;
                        }
                        progress.advance(end - start);
                    }
                    Ok(())
                })
            })
            .collect();
        let mut result = Ok(());
        for h in handles {
            let r = h.join().expect("scan worker panicked");
            if result.is_ok() {
                result = r;
            }
        }
        result
    })?;
    Ok(found.into_inner().expect("scan results"))
}

/// Length of the chunk cut at the start of `data` with the index's chunker: FastCDC for
/// tessera indexes, casync's buzhash chunker for casync ones (their SHA-2 ids).
fn cut_len(index: &Index, data: &[u8]) -> usize {
    match index.digest() {
        ChunkDigest::Blake3 => index.params().cut_len(data),
        ChunkDigest::Sha512_256 | ChunkDigest::Sha256 => {
            crate::casync::cut_len(&index.params(), data)
        }
    }
}

fn scan_segment(
    index: &Index,
    wanted: &HashSet<ChunkId>,
    src: &ScanSource<'_>,
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
    found: &Mutex<Found>,
) -> Result<()> {
    let params = index.params();
    let digest = index.digest();
    let max = u64::from(params.max);
    // Cuts started before `end + 2 max` realign with the next segment's (FastCDC
    // resynchronises within a chunk or two); one more `max` lets the last of them be cut
    // exactly as a sequential scan would.
    let limit = (end + 2 * max).min(src.len);
    let buf_end = (end + 3 * max).min(src.len);
    if src.reader.hole_end(start) >= buf_end {
        // All zeros, known without reading: no chunk worth finding (zero chunks are not
        // wanted), and the target holds every zero chunk of the image that starts here.
        if src.holder == Holder::Target {
            let chunks = index.chunks();
            let first = chunks.partition_point(|c| c.offset < start);
            let mut f = found.lock().expect("scan results");
            for (k, c) in chunks.iter().enumerate().skip(first) {
                if c.offset >= end || c.end() > src.len {
                    break;
                }
                f.in_place[k] |= c.zero;
            }
        }
        return Ok(());
    }
    buf.resize((buf_end - start) as usize, 0);
    src.reader.read_exact_at(buf, start)?;
    let mut cuts: Vec<(u64, u32, ChunkId)> = Vec::new();
    let mut hits: Vec<(ChunkId, u64)> = Vec::new();
    let mut pos = start;
    while pos < limit {
        if buf_end - pos < max && buf_end < src.len {
            break;
        }
        let rel = (pos - start) as usize;
        let len = cut_len(index, &buf[rel..]);
        let id = digest.id(&buf[rel..rel + len]);
        if wanted.contains(&id) {
            hits.push((id, pos));
        }
        cuts.push((pos, len as u32, id));
        pos += len as u64;
    }
    let mut in_place = Vec::new();
    if src.holder == Holder::Target {
        // Chunks of the image that start in this segment, hashed at their own place.
        let chunks = index.chunks();
        let first = chunks.partition_point(|c| c.offset < start);
        let mut cut = cuts.iter().peekable();
        for (k, c) in chunks.iter().enumerate().skip(first) {
            if c.offset >= end || c.end() > src.len {
                break;
            }
            while cut.next_if(|x| x.0 < c.offset).is_some() {}
            let id = match cut.peek() {
                Some(&&(off, len, id)) if off == c.offset && len == c.len => id,
                _ => {
                    let rel = (c.offset - start) as usize;
                    digest.id(&buf[rel..rel + c.len as usize])
                }
            };
            if id == c.id {
                in_place.push(k);
                if !c.zero {
                    hits.push((id, c.offset));
                }
            }
        }
    }
    let mut f = found.lock().expect("scan results");
    for k in in_place {
        f.in_place[k] = true;
    }
    for (id, offset) in hits {
        f.add(
            id,
            Location {
                holder: src.holder,
                offset,
                verified: true,
            },
        );
    }
    Ok(())
}

/// Locations claimed by `seed_index` for a seed (or the target) called `holder`: nothing
/// is read, so none is verified. Chunks past `size` (the device's) are left out.
pub(crate) fn from_index(
    found: &mut Found,
    index: &Index,
    holder: Holder,
    seed_index: &Index,
    size: u64,
) {
    let wanted = wanted(index);
    for c in seed_index.chunks() {
        if c.end() <= size && wanted.contains(&c.id) {
            found.add(
                c.id,
                Location {
                    holder,
                    offset: c.offset,
                    verified: false,
                },
            );
        }
    }
}

/// The image's chunks that `target_index` says the target holds at their place.
pub(crate) fn assumed_in_place(index: &Index, target_index: &Index) -> Vec<bool> {
    index
        .chunks()
        .iter()
        .map(|c| {
            target_index
                .chunk_at(c.offset)
                .map(|i| &target_index.chunks()[i])
                .is_some_and(|t| t.offset == c.offset && t.len == c.len && t.id == c.id)
        })
        .collect()
}
