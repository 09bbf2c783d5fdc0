//! The index: the ordered list of chunks that rebuilds an image (format v1, see
//! `docs/FORMAT.md`).
//!
//! Parsing treats every byte as hostile: lengths are checked against the real size of the
//! input before anything is allocated from them, and the trailing checksum must match.

use std::collections::HashMap;
use std::path::Path;

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use blake3::CHUNK_LEN;

use crate::chunker::{ChunkerParams, ALGORITHM_FASTCDC2020_NC1};
use crate::digest::ChunkDigest;
use crate::error::{Error, Result};
use crate::ChunkId;

/// The first 8 bytes of every index file.
pub const MAGIC: [u8; 8] = *b"TESSIDX\0";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first chunk record.
pub const HEADER_LEN: usize = 80;
/// Bytes per chunk record: 32-byte id + little-endian u32 length.
pub const RECORD_LEN: usize = 36;
/// Bytes of the trailing BLAKE3 checksum.
pub const TRAILER_LEN: usize = 32;

/// One chunk of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// BLAKE3 of the chunk bytes.
    pub id: ChunkId,
    /// Offset of the chunk in the image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// True when every byte is zero: no store file exists, targets get a hole.
    pub zero: bool,
}

impl ChunkEntry {
    /// One past the chunk's last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// A parsed (or freshly built) index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    params: ChunkerParams,
    image_size: u64,
    image_hash: [u8; 32],
    chunks: Vec<ChunkEntry>,
    root_hash: [u8; 32],
    /// The hash the chunk ids are made with (BLAKE3 for format v1).
    digest: ChunkDigest,
}

/// Computes chunk ids of all-zero chunks, caching one per length.
///
/// The work is bounded whatever the lengths asked for: BLAKE3 hashes 1 KiB chunks into a
/// binary tree, and zeros of any length share the complete subtrees along their left edge
/// (a subtree's hash depends on its contents and its position, not on what follows it).
/// Those subtrees are computed once each and cached, so a length costs a few dozen
/// compressions (the tree's height and its last partial chunk), and all lengths up to
/// `max` together cost at most one pass over `max` zero bytes more: linear in the number
/// of lengths, not in their sum. An index of many distinct 16 MiB lengths parses fast.
#[derive(Default, Debug)]
pub struct ZeroIds {
    ids: HashMap<u32, ChunkId>,
    /// Chaining values of complete, aligned subtrees of zeros, by (offset, length).
    subtrees: HashMap<(u64, u64), ChainingValue>,
    /// Bytes fed to BLAKE3 chunk compressions so far (parent merges not counted).
    hashed: u64,
}

/// A BLAKE3 chunk of zeros.
static ZERO_CHUNK: [u8; CHUNK_LEN] = [0; CHUNK_LEN];

impl ZeroIds {
    /// The id of `len` zero bytes.
    pub fn get(&mut self, len: u32) -> ChunkId {
        if let Some(id) = self.ids.get(&len) {
            return *id;
        }
        let n = u64::from(len);
        let id = if n <= CHUNK_LEN as u64 {
            self.hashed += n;
            ChunkId::of(&ZERO_CHUNK[..len as usize])
        } else {
            let left = left_subtree_len(n);
            let l = self.complete(0, left);
            let r = self.subtree(left, n - left);
            ChunkId(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
        };
        self.ids.insert(len, id);
        id
    }

    /// Bytes of zeros hashed so far by chunk compressions: the measure of the work done.
    pub fn bytes_hashed(&self) -> u64 {
        self.hashed
    }

    /// Chaining value of the (non-root) subtree of `len` zeros starting at `offset`, on
    /// the tree's right edge (`offset` is aligned to the largest power of two >= `len`).
    fn subtree(&mut self, offset: u64, len: u64) -> ChainingValue {
        if len <= CHUNK_LEN as u64 {
            return self.chunk(offset, len);
        }
        if len.is_power_of_two() {
            return self.complete(offset, len);
        }
        let left = left_subtree_len(len);
        let l = self.complete(offset, left);
        let r = self.subtree(offset + left, len - left);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }

    /// Chaining value of the complete subtree of `len` zeros (a power of two of at least
    /// one chunk) at `offset` (a multiple of `len`), cached.
    fn complete(&mut self, offset: u64, len: u64) -> ChainingValue {
        if let Some(cv) = self.subtrees.get(&(offset, len)) {
            return *cv;
        }
        let cv = if len <= CHUNK_LEN as u64 {
            self.chunk(offset, len)
        } else {
            let half = len / 2;
            let l = self.complete(offset, half);
            let r = self.complete(offset + half, half);
            merge_subtrees_non_root(&l, &r, Mode::Hash)
        };
        self.subtrees.insert((offset, len), cv);
        cv
    }

    /// Chaining value of one (possibly partial) chunk of zeros at `offset`.
    fn chunk(&mut self, offset: u64, len: u64) -> ChainingValue {
        self.hashed += len;
        blake3::Hasher::new()
            .set_input_offset(offset)
            .update(&ZERO_CHUNK[..len as usize])
            .finalize_non_root()
    }
}

impl Index {
    /// Builds an index from chunk `(id, len)` pairs in image order.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if a length is zero or exceeds `params.max`, or if one id
    /// is listed with two different lengths.
    pub fn new(
        params: ChunkerParams,
        image_hash: [u8; 32],
        records: impl IntoIterator<Item = (ChunkId, u32)>,
    ) -> Result<Index> {
        let (chunks, image_size) = entries(params, records).map_err(|e| match e {
            Invalid::Length {
                id, offset, len, ..
            } => Error::InvalidInput(format!(
                "chunk {id} at offset {offset} has length {len}, outside 1..={}",
                params.max
            )),
            Invalid::Conflict { id, first, second } => Error::InvalidInput(format!(
                "chunk {id} has length {} at position {} and length {} at position {}: \
                 one id cannot have two lengths",
                first.1, first.0, second.1, second.0
            )),
        })?;
        let mut index = Index {
            params,
            image_size,
            image_hash,
            chunks,
            root_hash: [0; 32],
            digest: ChunkDigest::Blake3,
        };
        index.root_hash = *blake3::hash(&index.to_bytes()).as_bytes();
        Ok(index)
    }

    /// Builds an index whose chunk ids are made with `digest` (a casync index): as
    /// [`Index::new`], with zero flags computed with `digest`, no image hash (all zeros),
    /// and `root_hash` given by the caller (the BLAKE3 of the file it was read from).
    /// Such an index cannot be saved in format v1.
    ///
    /// # Errors
    /// As [`Index::new`].
    pub fn with_digest(
        params: ChunkerParams,
        digest: ChunkDigest,
        records: impl IntoIterator<Item = (ChunkId, u32)>,
        root_hash: [u8; 32],
    ) -> Result<Index> {
        let mut index = Index::new(params, [0; 32], records)?;
        let zeros = digest.zero_ids(index.chunks.iter().map(|c| c.len));
        for c in &mut index.chunks {
            c.zero = zeros.get(&c.len) == Some(&c.id);
        }
        index.digest = digest;
        index.root_hash = root_hash;
        Ok(index)
    }

    /// The hash the chunk ids are made with.
    pub fn digest(&self) -> ChunkDigest {
        self.digest
    }

    /// Chunker parameters the image was cut with.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Size of the image in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// BLAKE3 of the whole image.
    pub fn image_hash(&self) -> [u8; 32] {
        self.image_hash
    }

    /// The chunks in image order.
    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.chunks
    }

    /// BLAKE3 of the encoded index: the value to pin.
    pub fn root_hash(&self) -> [u8; 32] {
        self.root_hash
    }

    /// Position in [`Index::chunks`] of the chunk holding image byte `offset`, if any.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.image_size {
            return None;
        }
        Some(self.chunks.partition_point(|c| c.end() <= offset))
    }

    /// Encodes the index in format v1 (meaningful for BLAKE3 indexes only: see
    /// [`Index::save`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + RECORD_LEN * self.chunks.len() + TRAILER_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // flags
        out.extend_from_slice(&ALGORITHM_FASTCDC2020_NC1.to_le_bytes());
        out.extend_from_slice(&self.params.min.to_le_bytes());
        out.extend_from_slice(&self.params.avg.to_le_bytes());
        out.extend_from_slice(&self.params.max.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.image_hash);
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        debug_assert_eq!(out.len(), HEADER_LEN);
        for c in &self.chunks {
            out.extend_from_slice(c.id.as_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses an index; `origin` names where the bytes came from, for error messages.
    ///
    /// Every invariant the rest of the engine relies on holds for an index this returns:
    /// lengths within `1..=params.max`, offsets contiguous from 0 to the image size, one
    /// length per id, zero flags exact. Parsing is linear in the size of `bytes`.
    ///
    /// # Errors
    /// [`Error::InvalidIndex`] saying what is wrong and at which byte offset.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Index> {
        let bad = |reason: String| Error::InvalidIndex {
            origin: origin.to_string(),
            reason,
        };
        if bytes.len() < 8 || bytes[..8] != MAGIC {
            return Err(bad("not a tessera index (bad magic at offset 0)".into()));
        }
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(bad(format!(
                "truncated: {} bytes, a header and trailer need {}",
                bytes.len(),
                HEADER_LEN + TRAILER_LEN
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} at offset 8 is not supported (this build reads version {FORMAT_VERSION})"
            )));
        }
        let flags = u32_at(12);
        if flags != 0 {
            return Err(bad(format!("unknown flags {flags:#x} at offset 12")));
        }
        let algorithm = u32_at(16);
        if algorithm != ALGORITHM_FASTCDC2020_NC1 {
            return Err(bad(format!(
                "unknown chunker algorithm {algorithm} at offset 16"
            )));
        }
        let params = ChunkerParams::new(u32_at(20), u32_at(24), u32_at(28))
            .map_err(|e| bad(format!("chunker parameters at offset 20: {e}")))?;
        let image_size = u64_at(32);
        let image_hash: [u8; 32] = bytes[40..72].try_into().expect("32 bytes");
        let count = u64_at(72);
        let expected_len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(RECORD_LEN))
            .and_then(|r| r.checked_add(HEADER_LEN + TRAILER_LEN));
        if expected_len != Some(bytes.len()) {
            return Err(bad(format!(
                "chunk count {count} at offset 72 needs {} bytes, the index has {} (truncated or corrupted)",
                expected_len.map_or("more than addressable".to_string(), |l| l.to_string()),
                bytes.len()
            )));
        }
        let body_len = bytes.len() - TRAILER_LEN;
        if blake3::hash(&bytes[..body_len]).as_bytes() != &bytes[body_len..] {
            return Err(bad(format!(
                "checksum at offset {body_len} does not match the contents (corrupted)"
            )));
        }
        let records = bytes[HEADER_LEN..body_len]
            .chunks_exact(RECORD_LEN)
            .map(|rec| {
                let id = ChunkId(rec[..32].try_into().expect("32 bytes"));
                (
                    id,
                    u32::from_le_bytes(rec[32..36].try_into().expect("4 bytes")),
                )
            });
        let record_at = |i: usize| HEADER_LEN + i * RECORD_LEN;
        let (chunks, offset) = entries(params, records).map_err(|e| match e {
            Invalid::Length { position, len, .. } => bad(format!(
                "chunk {position} (record at offset {}) has length {len}, outside 1..={} \
                 (the index's maximum chunk size)",
                record_at(position),
                params.max
            )),
            Invalid::Conflict { id, first, second } => bad(format!(
                "chunk {id} is listed with length {} at position {} (record at offset {}) and \
                 with length {} at position {} (record at offset {}): one id cannot have two \
                 lengths",
                first.1,
                first.0,
                record_at(first.0),
                second.1,
                second.0,
                record_at(second.0)
            )),
        })?;
        if offset != image_size {
            return Err(bad(format!(
                "chunk lengths add up to {offset} bytes but the header says the image has {image_size}"
            )));
        }
        Ok(Index {
            params,
            image_size,
            image_hash,
            chunks,
            root_hash: *blake3::hash(bytes).as_bytes(),
            digest: ChunkDigest::Blake3,
        })
    }

    /// Reads and parses an index file.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::InvalidIndex`] if it is malformed.
    pub fn load(path: &Path) -> Result<Index> {
        let bytes = Index::read_file(path)?;
        Index::from_bytes(&bytes, &path.display().to_string())
    }

    /// Reads the bytes of an index file for [`Index::from_bytes`] without trusting the
    /// file: the header comes first, and the rest only as far as the header's chunk count
    /// says (and one byte more, so that a longer file is seen as such). A file that is no
    /// index (an image given by mistake, `/dev/zero`) fails after its first bytes, and a
    /// regular file whose size does not match its header fails before the rest is read,
    /// instead of all of it being read into memory first.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::InvalidIndex`] if its size does
    /// not match its header. Other defects are left to [`Index::from_bytes`].
    pub fn read_file(path: &Path) -> Result<Vec<u8>> {
        use std::io::Read;
        let io = |e| Error::io("reading index", path, e);
        let file = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::with_capacity(HEADER_LEN);
        (&file)
            .take(HEADER_LEN as u64)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
            return Ok(bytes);
        }
        let count = u64::from_le_bytes(bytes[72..80].try_into().expect("8 bytes"));
        let Some(expected) = count
            .checked_mul(RECORD_LEN as u64)
            .and_then(|r| r.checked_add((HEADER_LEN + TRAILER_LEN) as u64))
        else {
            // from_bytes says the count is impossible.
            return Ok(bytes);
        };
        let meta = file.metadata().map_err(io)?;
        if meta.is_file() && meta.len() != expected {
            return Err(Error::InvalidIndex {
                origin: path.display().to_string(),
                reason: format!(
                    "chunk count {count} at offset 72 needs {expected} bytes, the file has {} \
                     (truncated or corrupted)",
                    meta.len()
                ),
            });
        }
        if meta.is_file() {
            bytes.reserve_exact(
                usize::try_from(expected)
                    .unwrap_or(0)
                    .saturating_sub(HEADER_LEN),
            );
        }
        (&file)
            .take(expected - HEADER_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        Ok(bytes)
    }

    /// Writes the index atomically (temporary file, fsync, rename).
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    pub fn save(&self, path: &Path) -> Result<()> {
        if self.digest != ChunkDigest::Blake3 {
            return Err(Error::InvalidInput(format!(
                "an index of {} chunk ids cannot be written as a tessera index ({}): \
                 `tessera import` converts it",
                self.digest,
                path.display()
            )));
        }
        crate::fsutil::write_atomic(path, &self.to_bytes())
    }
}

/// Why a list of records cannot be an index.
enum Invalid {
    /// A length outside `1..=max`.
    Length {
        position: usize,
        id: ChunkId,
        offset: u64,
        len: u32,
    },
    /// One id listed with two different lengths: no image can hold both, and writing one
    /// chunk's bytes where the other's length is expected runs past the image's end.
    Conflict {
        id: ChunkId,
        first: (usize, u32),
        second: (usize, u32),
    },
}

/// Turns `(id, len)` records into entries with offsets and zero flags, returning them and
/// the image size. Linear in the number of records (see [`ZeroIds`]).
fn entries(
    params: ChunkerParams,
    records: impl IntoIterator<Item = (ChunkId, u32)>,
) -> std::result::Result<(Vec<ChunkEntry>, u64), Invalid> {
    let records = records.into_iter();
    let mut zeros = ZeroIds::default();
    let mut chunks: Vec<ChunkEntry> = Vec::with_capacity(records.size_hint().0);
    // First position of each id, to refuse an id listed with two lengths.
    let mut first: HashMap<ChunkId, usize> = HashMap::with_capacity(records.size_hint().0);
    let mut offset = 0u64;
    for (i, (id, len)) in records.enumerate() {
        if len == 0 || len > params.max {
            return Err(Invalid::Length {
                position: i,
                id,
                offset,
                len,
            });
        }
        let seen = *first.entry(id).or_insert(i);
        if chunks.get(seen).is_some_and(|c| c.len != len) {
            return Err(Invalid::Conflict {
                id,
                first: (seen, chunks[seen].len),
                second: (i, len),
            });
        }
        let zero = zeros.get(len) == id;
        chunks.push(ChunkEntry {
            id,
            offset,
            len,
            zero,
        });
        offset += u64::from(len);
    }
    Ok((chunks, offset))
}

/// Lowercase hex of a 32-byte hash.
pub fn hex(bytes: &[u8; 32]) -> String {
    ChunkId(*bytes).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn sample() -> Index {
        let p = ChunkerParams::default();
        Index::new(
            p,
            [7; 32],
            vec![
                (ChunkId::of(b"abc"), 3),
                (ZeroIds::default().get(5), 5),
                (ChunkId::of(b"x"), 1),
            ],
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let idx = sample();
        let bytes = idx.to_bytes();
        let back = Index::from_bytes(&bytes, "t").unwrap();
        assert_eq!(idx, back);
        assert_eq!(back.image_size(), 9);
        assert!(back.chunks()[1].zero);
        assert!(!back.chunks()[0].zero);
        assert_eq!(back.chunk_at(0), Some(0));
        assert_eq!(back.chunk_at(3), Some(1));
        assert_eq!(back.chunk_at(8), Some(2));
        assert_eq!(back.chunk_at(9), None);
    }

    /// Bytes this thread has read through system calls so far.
    pub(crate) fn thread_read_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        let line = io.lines().find(|l| l.starts_with("rchar:")).unwrap();
        line["rchar:".len()..].trim().parse().unwrap()
    }

    #[test]
    fn loading_a_file_that_is_no_index_reads_only_its_header() {
        let dir = tempfile::tempdir().unwrap();
        // An image given as the index by mistake: 1 GiB (sparse), no magic.
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let before = thread_read_bytes();
        let err = Index::load(&image).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidIndex, "{err}");
        assert!(err.to_string().contains("bad magic"), "{err}");
        assert!(
            thread_read_bytes() - before < 1 << 20,
            "read the whole file"
        );
        // A valid header on a file of the wrong size: refused from the size alone.
        let grown = dir.path().join("grown.tidx");
        std::fs::write(&grown, sample().to_bytes()).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&grown)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let before = thread_read_bytes();
        let err = Index::load(&grown).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidIndex, "{err}");
        assert!(err.to_string().contains("the file has 1073741824"), "{err}");
        assert!(err.to_string().contains("grown.tidx"), "{err}");
        assert!(
            thread_read_bytes() - before < 1 << 20,
            "read the whole file"
        );
        // And an index of the right size still loads.
        let good = dir.path().join("good.tidx");
        std::fs::write(&good, sample().to_bytes()).unwrap();
        assert_eq!(Index::load(&good).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() {
            let err = Index::from_bytes(&bytes[..n], "t").unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidIndex, "len {n}");
        }
    }

    #[test]
    fn every_bit_flip_is_rejected() {
        let bytes = sample().to_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Index::from_bytes(&b, "t").is_err(), "flip at {i}");
        }
    }

    /// Encodes records as an index without checking them (what a hostile writer can do).
    fn raw_index(params: ChunkerParams, records: &[(ChunkId, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&ALGORITHM_FASTCDC2020_NC1.to_le_bytes());
        out.extend_from_slice(&params.min.to_le_bytes());
        out.extend_from_slice(&params.avg.to_le_bytes());
        out.extend_from_slice(&params.max.to_le_bytes());
        let size: u64 = records.iter().map(|r| u64::from(r.1)).sum();
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&[0; 32]);
        out.extend_from_slice(&(records.len() as u64).to_le_bytes());
        for (id, len) in records {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    #[test]
    fn one_id_with_two_lengths_is_refused() {
        let p = ChunkerParams::default();
        let a = ChunkId::of(b"abc");
        let records = [(a, 3), (ChunkId::of(b"x"), 1), (a, 3), (a, 4000)];
        let e = Index::from_bytes(&raw_index(p, &records), "t.tidx")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.tidx"), "{e}");
        assert!(e.contains(&a.to_string()), "{e}");
        assert!(
            e.contains("length 3 at position 0 (record at offset 80)")
                && e.contains("length 4000 at position 3 (record at offset 188)"),
            "{e}"
        );
        let e = Index::new(p, [0; 32], records).unwrap_err().to_string();
        assert!(e.contains("position 0") && e.contains("position 3"), "{e}");
        // The same id with the same length, as often as it likes, is fine.
        let ok = Index::from_bytes(&raw_index(p, &records[..3]), "t").unwrap();
        assert_eq!(ok.chunks().len(), 3);
    }

    #[test]
    fn zero_ids_match_hashing_zeros() {
        let mut z = ZeroIds::default();
        let mut lens: Vec<u32> = vec![1, 2, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049];
        lens.extend([
            3072, 3073, 4095, 4096, 4097, 5000, 65535, 65536, 65537, 100_000,
        ]);
        lens.extend([(1 << 20) + 12_345, (16 << 20) - 1, 16 << 20]);
        for len in lens {
            let want = ChunkId::of(&vec![0u8; len as usize]);
            assert_eq!(z.get(len), want, "len {len}");
            // Cached lengths and shared subtrees give the same answer the second time.
            assert_eq!(z.get(len), want, "len {len} again");
        }
    }

    #[test]
    fn many_distinct_huge_lengths_cost_linear_work() {
        // The attack: every record a distinct length near the 16 MiB maximum. Hashing each
        // length's zeros would feed BLAKE3 ~ 20000 * 16 MiB; the shared subtrees cost one
        // pass over 16 MiB plus a partial chunk per length.
        let p = ChunkerParams::new(64 << 10, 256 << 10, 16 << 20).unwrap();
        let n = 20_000u32;
        let records: Vec<(ChunkId, u32)> = (0..n)
            .map(|i| (ChunkId::of(&i.to_le_bytes()), (16 << 20) - 3 * i))
            .collect();
        let mut z = ZeroIds::default();
        for (_, len) in &records {
            z.get(*len);
        }
        let bound = (16u64 << 20) + u64::from(n) * CHUNK_LEN as u64;
        assert!(z.bytes_hashed() <= bound, "{} > {bound}", z.bytes_hashed());
        // And the parser, which uses the same cache, flags a real zero chunk among them.
        let mut records = records;
        records[7].0 = ZeroIds::default().get(records[7].1);
        let index = Index::from_bytes(&raw_index(p, &records), "t").unwrap();
        assert!(index.chunks()[7].zero);
        assert_eq!(index.chunks().iter().filter(|c| c.zero).count(), 1);
    }

    #[test]
    fn lengths_beyond_the_index_maximum_are_refused() {
        let p = ChunkerParams::default();
        let e = Index::from_bytes(&raw_index(p, &[(ChunkId::of(b"a"), p.max + 1)]), "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("record at offset 80") && e.contains("maximum chunk size"),
            "{e}"
        );
    }

    #[test]
    fn huge_count_does_not_allocate() {
        let mut b = sample().to_bytes();
        b[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Index::from_bytes(&b, "t").unwrap_err().to_string();
        assert!(e.contains("chunk count"), "{e}");
    }
}
