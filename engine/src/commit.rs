//! `commit`: turn a served image's overlay (its writes) into a new release of the image,
//! re-chunking only around the blocks the overlay changed.
//!
//! Content-defined cuts depend only on the bytes of the chunk being cut: a chunk of the
//! base index that starts where a cut of the new image lands, and whose bytes the overlay
//! did not touch, is cut the same way again. So the walk over the new image takes such a
//! chunk whole from the base index (its id, no byte read), and cuts anew only from the
//! first changed chunk until a cut lands on a base chunk boundary again past the change.
//! The bytes read are those of the changed chunks and of the few chunks it takes the cuts
//! to fall back into step; the rest costs one bitmap lookup per base chunk. Where the cuts
//! are out of step in a run of zeros (which the base index and the bitmap show without
//! reading), each chunk is cut as `make` cuts zeros, and nothing is read either.
//!
//! The new chunks go into new packs of the store (streamed like `make`'s); a new chunk
//! that the base index already holds, and every unchanged chunk, keeps its place in the
//! base's packs. Packs, then the location file, then a flush of the store, then the index:
//! the order of `make`, so an interrupted commit leaves no index naming a missing chunk.
//! The new index records no image hash (32 zero bytes, "not recorded"): computing it would
//! mean reading every unchanged byte.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::chunk::compress;
use crate::digest::ChunkDigest;
use crate::error::{Error, Result};
use crate::index::{hex, Index, ZeroIds};
use crate::pack::{Location, Locations, PackStream, PACK_TARGET};
use crate::progress::Progress;
use crate::reader::{ImageReader, Overlay};
use crate::store::{locations_path, PackId, StoreWrite};
use crate::ChunkId;

/// What [`commit`] did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CommitReport {
    /// Bytes in the image.
    pub image_size: u64,
    /// Bytes the overlay holds (written by the VM), in whole overlay blocks.
    pub bytes_changed: u64,
    /// Bytes of the image read to cut chunks anew (changed chunks and their neighbours).
    pub bytes_read: u64,
    /// Chunks in the new index (with repeats).
    pub chunk_count: u64,
    /// Chunks of the new index taken whole from the base index.
    pub chunks_kept: u64,
    /// Chunks cut anew that neither the base index nor this commit had (stored).
    pub new_chunks: u64,
    /// Uncompressed bytes of the new chunks.
    pub new_bytes: u64,
    /// Compressed bytes of the new chunks.
    pub stored_bytes: u64,
    /// Packs written.
    pub new_packs: u64,
    /// Root hash of the new index, hex.
    pub root_hash: String,
}

/// Makes the index of `base` with `overlay`'s writes applied: cuts anew around the changed
/// blocks (reading the image through `image`, the base image as served), stores the new
/// chunks in new packs of `store` (which must hold `base`'s packs and location file), then
/// writes the new index's location file, flushes the store and writes the index to
/// `index_out` (atomically).
///
/// # Errors
/// [`Error::InvalidInput`] if `overlay` or `image` belong to another index; errors reading
/// the image (a chunk missing or corrupt in the store), the store, or writing the index.
pub fn commit(
    base: &Index,
    overlay: &Overlay,
    image: &ImageReader,
    store: &dyn StoreWrite,
    index_out: &Path,
    progress: &dyn Progress,
) -> Result<(Index, CommitReport)> {
    if image.index().root_hash() != base.root_hash() {
        return Err(Error::InvalidInput(format!(
            "commit: the image read is index {}, not the base index {}",
            hex(&image.index().root_hash()),
            hex(&base.root_hash())
        )));
    }
    if base.digest() != ChunkDigest::Blake3 {
        return Err(Error::InvalidInput(format!(
            "commit: the base index {} names its chunks by {} (a casync index): import it \
             first (tessera import) and serve the imported index",
            hex(&base.root_hash()),
            base.digest()
        )));
    }
    let size = base.image_size();
    let params = base.params();
    let chunks = base.chunks();
    let base_places = base_locations(base, store)?;
    let mut report = CommitReport {
        image_size: size,
        ..CommitReport::default()
    };
    report.bytes_changed = overlay
        .runs(0, size)?
        .iter()
        .filter(|r| r.1)
        .map(|r| r.0)
        .sum();
    progress.start("committing", size);

    let mut zeros = ZeroIds::default();
    let mut placer = Placer::new(store, base_places);
    let mut records: Vec<(ChunkId, u32)> = Vec::with_capacity(chunks.len());
    let mut buf = vec![0u8; params.max as usize];
    let zero_cut = params.zero_cut_len();
    // `next`: the first base chunk starting at or after `pos`.
    let (mut pos, mut next) = (0u64, 0usize);
    while pos < size {
        while next < chunks.len() && chunks[next].offset < pos {
            next += 1;
        }
        if let Some(c) = chunks.get(next).filter(|c| c.offset == pos) {
            if !overlay
                .runs(c.offset, u64::from(c.len))?
                .iter()
                .any(|r| r.1)
            {
                records.push((c.id, c.len));
                if !c.zero {
                    placer.place_base(c.id)?;
                }
                report.chunks_kept += 1;
                pos = c.end();
                progress.advance(u64::from(c.len));
                continue;
            }
        }
        let max = u64::from(params.max);
        if pos + max <= size && zeros_ahead(base, overlay, pos, max)? {
            // The next `max` bytes are zeros: the chunk is cut as `make` cuts a zero run,
            // known without reading it.
            records.push((zeros.get(zero_cut), zero_cut));
            pos += u64::from(zero_cut);
            progress.advance(u64::from(zero_cut));
            continue;
        }
        let want = (size - pos).min(max) as usize;
        overlay.read_at(image, pos, &mut buf[..want])?;
        report.bytes_read += want as u64;
        let len = params.cut_len(&buf[..want]);
        let data = &buf[..len];
        let id = ChunkId::of(data);
        if zeros.get(len as u32) != id && placer.place_new(id, data, &mut report)? {
            report.new_chunks += 1;
            report.new_bytes += len as u64;
        }
        records.push((id, len as u32));
        pos += len as u64;
        progress.advance(len as u64);
    }
    let (packs, places) = placer.finish(&mut report)?;

    let index = Index::new(params, [0; 32], records)?;
    let root = index.root_hash();
    // Only the packs the new index uses, numbered in the order its chunks first name them.
    let mut seen = std::collections::HashSet::new();
    let mut numbers = HashMap::new();
    let mut locations = Locations {
        root,
        packs: Vec::new(),
        records: Vec::new(),
    };
    for c in index.chunks() {
        if !c.zero && seen.insert(c.id) {
            let mut place = places[&c.id];
            place.pack = *numbers.entry(place.pack).or_insert_with(|| {
                locations.packs.push(packs[place.pack as usize]);
                locations.packs.len() as u32 - 1
            });
            locations.records.push(place);
        }
    }
    store.put_file(&locations_path(&root), &locations.to_bytes())?;
    store.flush()?;
    index.save(index_out)?;
    report.chunk_count = index.chunks().len() as u64;
    report.root_hash = hex(&root);
    Ok((index, report))
}

/// Whether `[pos, pos + len)` of the new image is zeros as far as the base index and the
/// overlay's bitmap tell without reading: every base chunk over it is a zero chunk and the
/// overlay changed none of it.
fn zeros_ahead(base: &Index, overlay: &Overlay, pos: u64, len: u64) -> Result<bool> {
    let Some(mut k) = base.chunk_at(pos) else {
        return Ok(false);
    };
    let chunks = base.chunks();
    while let Some(c) = chunks.get(k).filter(|c| c.offset < pos + len) {
        if !c.zero {
            return Ok(false);
        }
        k += 1;
    }
    Ok(!overlay.runs(pos, len)?.iter().any(|r| r.1))
}

/// Where each distinct non-zero chunk of `base` lives, from its location file in `store`.
fn base_locations(
    base: &Index,
    store: &dyn StoreWrite,
) -> Result<(Vec<PackId>, HashMap<ChunkId, Location>)> {
    let mut ids = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in base.chunks() {
        if !c.zero && seen.insert(c.id) {
            ids.push(c.id);
        }
    }
    let root = base.root_hash();
    let rel = locations_path(&root);
    let origin = format!("{}/{rel}", store.location().trim_end_matches('/'));
    let limit = 4096 + ids.len() as u64 * 64;
    let bytes = store.read_file(&rel, limit)?.ok_or_else(|| {
        Error::InvalidInput(format!(
            "store {} has no location data for the base index {} ({rel}): commit into the \
             store the base image was made into",
            store.location(),
            hex(&root)
        ))
    })?;
    let locs = Locations::parse(&bytes, &root, ids.len(), &origin)?;
    Ok((locs.packs, ids.into_iter().zip(locs.records).collect()))
}

/// Gives every distinct chunk of the new index its place: the base's, or a frame of a new
/// pack streamed into the store.
struct Placer<'a> {
    store: &'a dyn StoreWrite,
    /// Packs by number: the base's first, then the new ones (named when stored).
    packs: Vec<Option<PackId>>,
    /// Where each chunk placed so far lives.
    places: HashMap<ChunkId, Location>,
    /// The base's places, for chunks not placed yet.
    base: HashMap<ChunkId, Location>,
    open: Option<(u32, PackStream<Box<dyn crate::pack::PackSink + 'a>>)>,
}

impl<'a> Placer<'a> {
    fn new(store: &'a dyn StoreWrite, base: (Vec<PackId>, HashMap<ChunkId, Location>)) -> Self {
        Placer {
            store,
            packs: base.0.into_iter().map(Some).collect(),
            places: HashMap::new(),
            base: base.1,
            open: None,
        }
    }

    /// Places an unchanged chunk of the base where the base has it.
    fn place_base(&mut self, id: ChunkId) -> Result<()> {
        if self.places.contains_key(&id) {
            return Ok(());
        }
        let place = self
            .base
            .get(&id)
            .copied()
            .ok_or_else(|| Error::MissingChunk {
                id,
                origin: "the base index's location file".into(),
            })?;
        self.places.insert(id, place);
        Ok(())
    }

    /// Places a chunk cut anew: where the base or this commit has it, else as a new frame;
    /// true when it was stored.
    fn place_new(&mut self, id: ChunkId, data: &[u8], report: &mut CommitReport) -> Result<bool> {
        if self.places.contains_key(&id) {
            return Ok(false);
        }
        if let Some(&place) = self.base.get(&id) {
            self.places.insert(id, place);
            return Ok(false);
        }
        if self.open.is_none() {
            let number = self.packs.len() as u32;
            self.packs.push(None);
            self.open = Some((number, PackStream::new(self.store.begin_pack()?)));
        }
        let (number, pack) = self.open.as_mut().expect("a pack is open");
        let frame = compress(data);
        let offset = pack.push(id, &frame, data.len() as u32)?;
        self.places.insert(
            id,
            Location {
                pack: *number,
                offset,
                clen: frame.len() as u32,
            },
        );
        report.stored_bytes += frame.len() as u64;
        if offset + frame.len() as u64 >= PACK_TARGET {
            self.close(report)?;
        }
        Ok(true)
    }

    fn close(&mut self, report: &mut CommitReport) -> Result<()> {
        if let Some((number, pack)) = self.open.take() {
            self.packs[number as usize] = Some(pack.finish()?);
            report.new_packs += 1;
        }
        Ok(())
    }

    /// Stores the last pack; the packs by number and every chunk's place.
    fn finish(
        mut self,
        report: &mut CommitReport,
    ) -> Result<(Vec<PackId>, HashMap<ChunkId, Location>)> {
        self.close(report)?;
        let packs = self
            .packs
            .into_iter()
            .map(|p| p.expect("every pack is stored"))
            .collect();
        Ok((packs, self.places))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::make::{make, MakeOptions};
    use crate::progress::NoProgress;
    use crate::reader::ReaderOptions;
    use crate::store::{ChunkStore, LocalStore, PackFetcher, StoreRead};

    const SIZE: usize = 4 << 20;

    /// Pseudo-random bytes with 2 MiB of zeros in the middle.
    fn base_bytes() -> Vec<u8> {
        let mut bytes = vec![0u8; SIZE];
        blake3::Hasher::new()
            .update(b"commit base")
            .finalize_xof()
            .fill(&mut bytes);
        bytes[1 << 20..3 << 20].fill(0);
        bytes
    }

    fn reader(store: &Arc<LocalStore>, index: &Index) -> ImageReader {
        let read: Arc<dyn StoreRead> = store.clone();
        let chunks: Arc<dyn ChunkStore> = Arc::new(PackFetcher::open(read, index).unwrap());
        ImageReader::new(index.clone(), chunks, ReaderOptions::default())
    }

    /// Makes the base image into a store, applies `edit` through an overlay, commits, and
    /// checks the new index against a plain `make` of the edited image: the same chunks,
    /// and every byte read back from the store. Returns the commit's report.
    fn commit_edit(edit: impl Fn(&Overlay, &ImageReader, &mut Vec<u8>)) -> CommitReport {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = base_bytes();
        std::fs::write(dir.path().join("base.img"), &bytes).unwrap();
        let store = Arc::new(LocalStore::open(dir.path().join("store"), true).unwrap());
        let opts = MakeOptions::default();
        let (base, _) = make(
            &dir.path().join("base.img"),
            &*store,
            &dir.path().join("base.tidx"),
            &opts,
            &NoProgress,
        )
        .unwrap();
        let image = reader(&store, &base);
        let overlay = Overlay::open(&dir.path().join("overlay"), &base).unwrap();
        edit(&overlay, &image, &mut bytes);
        overlay.flush().unwrap();
        let out = dir.path().join("new.tidx");
        let (new, report) = commit(&base, &overlay, &image, &*store, &out, &NoProgress).unwrap();
        assert_eq!(Index::load(&out).unwrap().root_hash(), new.root_hash());

        std::fs::write(dir.path().join("edited.img"), &bytes).unwrap();
        let other = LocalStore::open(dir.path().join("other"), true).unwrap();
        let (made, _) = make(
            &dir.path().join("edited.img"),
            &other,
            &dir.path().join("made.tidx"),
            &opts,
            &NoProgress,
        )
        .unwrap();
        let cuts = |i: &Index| {
            i.chunks()
                .iter()
                .map(|c| (c.offset, c.len, c.id))
                .collect::<Vec<_>>()
        };
        assert_eq!(cuts(&new), cuts(&made), "commit cut otherwise than make");
        let mut back = vec![0u8; SIZE];
        reader(&store, &new).read_at(0, &mut back).unwrap();
        assert!(back == bytes, "the committed image reads back otherwise");
        assert_eq!(report.chunk_count, new.chunks().len() as u64);
        report
    }

    #[test]
    fn a_small_write_is_cut_anew_locally_and_the_rest_is_kept() {
        let report = commit_edit(|overlay, image, bytes| {
            let at = 1_000_003;
            overlay
                .write_at(image, at as u64, b"changed!", false)
                .unwrap();
            bytes[at..at + 8].copy_from_slice(b"changed!");
        });
        assert_eq!(report.bytes_changed, 4096);
        assert!(report.new_chunks >= 1, "{report:?}");
        // The changed chunk and the few it takes the cuts to fall back into step.
        assert!(report.bytes_read <= 8 * 65536, "{report:?}");
        assert!(report.chunks_kept + 8 >= report.chunk_count, "{report:?}");
        assert!(report.new_bytes <= 4 * 65536, "{report:?}");
    }

    #[test]
    fn writes_at_both_ends_zeroes_and_a_reverted_block_commit_exactly() {
        let report = commit_edit(|overlay, image, bytes| {
            // The first and last bytes, a block rewritten with its own bytes, and zeros
            // punched into the data and over the zero run's edge.
            overlay.write_at(image, 0, b"head", false).unwrap();
            bytes[..4].copy_from_slice(b"head");
            let end = SIZE - 5;
            overlay
                .write_at(image, end as u64, b"tail!", false)
                .unwrap();
            bytes[end..].copy_from_slice(b"tail!");
            let same = bytes[2_000_000..2_004_096].to_vec();
            overlay.write_at(image, 2_000_000, &same, false).unwrap();
            overlay.zero(image, 3 << 20, 1 << 18, false).unwrap();
            bytes[3 << 20..(3 << 20) + (1 << 18)].fill(0);
            let edge = SIZE / 2 - 100_000;
            overlay.zero(image, edge as u64, 200_000, false).unwrap();
            bytes[edge..edge + 200_000].fill(0);
        });
        assert!(report.chunks_kept > 0, "{report:?}");
        assert!(report.bytes_read < SIZE as u64 / 2, "{report:?}");
    }

    #[test]
    fn a_write_into_zeros_reads_neither_the_rest_of_them_nor_more() {
        let report = commit_edit(|overlay, image, bytes| {
            let at = (1 << 20) + 4196;
            overlay
                .write_at(image, at as u64, b"inside", false)
                .unwrap();
            bytes[at..at + 6].copy_from_slice(b"inside");
        });
        // The cuts after the write are out of step with the base's all through the 2 MiB
        // of zeros; those chunks are known without reading them.
        assert!(report.bytes_read <= 6 * 65536, "{report:?}");
        assert!(report.new_chunks >= 1, "{report:?}");
    }

    #[test]
    fn an_empty_overlay_gives_the_base_chunks_back() {
        let report = commit_edit(|_, _, _| {});
        assert_eq!(report.bytes_changed, 0);
        assert_eq!(report.bytes_read, 0);
        assert_eq!(report.new_chunks, 0);
        assert_eq!(report.new_packs, 0);
        assert_eq!(report.chunks_kept, report.chunk_count);
    }

    #[test]
    fn a_store_without_the_base_location_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.img"), base_bytes()).unwrap();
        let store = Arc::new(LocalStore::open(dir.path().join("store"), true).unwrap());
        let (base, _) = make(
            &dir.path().join("base.img"),
            &*store,
            &dir.path().join("base.tidx"),
            &MakeOptions::default(),
            &NoProgress,
        )
        .unwrap();
        let image = reader(&store, &base);
        let overlay = Overlay::open(&dir.path().join("overlay"), &base).unwrap();
        let empty = LocalStore::open(dir.path().join("empty"), true).unwrap();
        let out = dir.path().join("new.tidx");
        let err = commit(&base, &overlay, &image, &empty, &out, &NoProgress).unwrap_err();
        assert!(err.to_string().contains("no location data"), "{err}");
        assert!(!out.exists());
    }
}
