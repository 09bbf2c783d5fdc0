//! The index: the ordered list of chunks that rebuilds an image (formats v1 and v2, see
//! `docs/FORMAT.md`). Version 2 stores each run of equal-length zero chunks as one record,
//! so the index of a mostly-empty disk stays as small as the index of its data.
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
/// The format version this build writes (it also reads [`FORMAT_VERSION_1`]).
pub const FORMAT_VERSION: u32 = 2;
/// The first format: one record per chunk, and the image hash is BLAKE3 of the image.
pub const FORMAT_VERSION_1: u32 = 1;
/// Bytes before the first chunk record.
pub const HEADER_LEN: usize = 80;
/// Bytes per record: 32-byte id + little-endian u32 length (v2: or a zero run, below).
pub const RECORD_LEN: usize = 36;
/// Bit 31 of a v2 record's length field: the record is a run of zero chunks, its first 8
/// bytes the number of chunks and the next 24 zero.
pub const ZERO_RUN_FLAG: u32 = 1 << 31;
/// The most chunks (zero runs counted chunk by chunk) an index may hold: the engine keeps
/// one entry per chunk in memory (48 bytes), so a v2 index of a few hundred bytes could
/// otherwise claim more chunks than memory holds. 2^25 chunks is 2 TiB of 64 KiB chunks;
/// larger images take larger chunk sizes.
pub const MAX_CHUNKS: u64 = 1 << 25;
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
    version: u32,
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

/// Bytes per block of the v2 image hash (see [`ImageHasher`]).
pub const IMAGE_HASH_BLOCK: usize = 1 << 20;

/// The image hash of a v2 index: BLAKE3 over the BLAKE3 of each 1 MiB block of the image
/// (the last one may be shorter), followed by the image size as a little-endian u64.
///
/// Unlike BLAKE3 of the whole image (the v1 image hash), a block of zeros hashes to the
/// same value wherever it is, so a hole costs one 32-byte update per MiB instead of
/// hashing its zeros: [`ImageHasher::zeros`].
pub struct ImageHasher {
    outer: blake3::Hasher,
    block: Vec<u8>,
    size: u64,
    zero_block: Option<[u8; 32]>,
}

impl Default for ImageHasher {
    fn default() -> Self {
        ImageHasher {
            outer: blake3::Hasher::new(),
            block: Vec::with_capacity(IMAGE_HASH_BLOCK),
            size: 0,
            zero_block: None,
        }
    }
}

impl ImageHasher {
    /// Feeds the next bytes of the image.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.size += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.block.is_empty() && bytes.len() >= IMAGE_HASH_BLOCK {
                // A whole block in place: hashed without a copy.
                let (block, rest) = bytes.split_at(IMAGE_HASH_BLOCK);
                self.outer.update(blake3::hash(block).as_bytes());
                bytes = rest;
                continue;
            }
            let n = (IMAGE_HASH_BLOCK - self.block.len()).min(bytes.len());
            self.block.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.block.len() == IMAGE_HASH_BLOCK {
                self.outer.update(blake3::hash(&self.block).as_bytes());
                self.block.clear();
            }
        }
    }

    /// Feeds `len` zero bytes: whole blocks of zeros cost one update each.
    pub fn zeros(&mut self, mut len: u64) {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        while len > 0 && !self.block.is_empty() {
            let n = (IMAGE_HASH_BLOCK - self.block.len()).min(ZEROS.len()) as u64;
            let n = n.min(len);
            self.update(&ZEROS[..n as usize]);
            len -= n;
        }
        if len >= IMAGE_HASH_BLOCK as u64 {
            let zero = *self
                .zero_block
                .get_or_insert_with(|| *blake3::hash(&vec![0; IMAGE_HASH_BLOCK]).as_bytes());
            let blocks = len / IMAGE_HASH_BLOCK as u64;
            for _ in 0..blocks {
                self.outer.update(&zero);
            }
            self.size += blocks * IMAGE_HASH_BLOCK as u64;
            len -= blocks * IMAGE_HASH_BLOCK as u64;
        }
        while len > 0 {
            let n = len.min(ZEROS.len() as u64);
            self.update(&ZEROS[..n as usize]);
            len -= n;
        }
    }

    /// The image hash of everything fed so far.
    pub fn finalize(mut self) -> [u8; 32] {
        if !self.block.is_empty() {
            self.outer.update(blake3::hash(&self.block).as_bytes());
        }
        self.outer.update(&self.size.to_le_bytes());
        *self.outer.finalize().as_bytes()
    }
}

/// One record of a v2 index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// A chunk that is not all zeros.
    Chunk(ChunkId, u32),
    /// `count` zero chunks of `len` bytes each.
    Zeros { len: u32, count: u64 },
}

impl Index {
    /// Builds an index (format v2) from chunk `(id, len)` pairs in image order.
    /// `image_hash` is the v2 image hash ([`ImageHasher`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if a length is zero or exceeds `params.max`, if one id
    /// is listed with two different lengths, or if there are more than [`MAX_CHUNKS`].
    pub fn new(
        params: ChunkerParams,
        image_hash: [u8; 32],
        records: impl IntoIterator<Item = (ChunkId, u32)>,
    ) -> Result<Index> {
        let (chunks, image_size) =
            entries(params, records, &mut ZeroIds::default()).map_err(|e| match e {
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
                Invalid::TooMany => Error::InvalidInput(format!(
                    "the image has more than {MAX_CHUNKS} chunks, the most an index holds: \
                     use larger chunk sizes (max {} now)",
                    params.max
                )),
            })?;
        let mut index = Index {
            version: FORMAT_VERSION,
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

    /// The format version the index was read in (or [`FORMAT_VERSION`] for a new one);
    /// [`Index::to_bytes`] writes it in the same version, so its root hash stays the same.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Chunker parameters the image was cut with.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Size of the image in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// The image hash: BLAKE3 of the whole image in a v1 index, the hash of
    /// [`ImageHasher`] in a v2 index.
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

    /// The v2 records: each maximal run of zero chunks of one length is one record.
    fn records_v2(&self) -> Vec<Record> {
        let mut out: Vec<Record> = Vec::new();
        for c in &self.chunks {
            match out.last_mut() {
                Some(Record::Zeros { len, count }) if c.zero && *len == c.len => *count += 1,
                _ if c.zero => out.push(Record::Zeros {
                    len: c.len,
                    count: 1,
                }),
                _ => out.push(Record::Chunk(c.id, c.len)),
            }
        }
        out
    }

    /// Encodes the index in its format version ([`Index::version`]); meaningful for
    /// BLAKE3 indexes only (see [`Index::save`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let records = if self.version == FORMAT_VERSION_1 {
            self.chunks
                .iter()
                .map(|c| Record::Chunk(c.id, c.len))
                .collect()
        } else {
            self.records_v2()
        };
        let mut out = Vec::with_capacity(HEADER_LEN + RECORD_LEN * records.len() + TRAILER_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // flags
        out.extend_from_slice(&ALGORITHM_FASTCDC2020_NC1.to_le_bytes());
        out.extend_from_slice(&self.params.min.to_le_bytes());
        out.extend_from_slice(&self.params.avg.to_le_bytes());
        out.extend_from_slice(&self.params.max.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.image_hash);
        out.extend_from_slice(&(records.len() as u64).to_le_bytes());
        debug_assert_eq!(out.len(), HEADER_LEN);
        for r in records {
            match r {
                Record::Chunk(id, len) => {
                    out.extend_from_slice(id.as_bytes());
                    out.extend_from_slice(&len.to_le_bytes());
                }
                Record::Zeros { len, count } => {
                    out.extend_from_slice(&count.to_le_bytes());
                    out.extend_from_slice(&[0; 24]);
                    out.extend_from_slice(&(len | ZERO_RUN_FLAG).to_le_bytes());
                }
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses an index (v1 or v2); `origin` names where the bytes came from, for error
    /// messages.
    ///
    /// Every invariant the rest of the engine relies on holds for an index this returns:
    /// lengths within `1..=params.max`, offsets contiguous from 0 to the image size, one
    /// length per id, zero flags exact, at most [`MAX_CHUNKS`] chunks. A v2 index is
    /// accepted only in its one canonical encoding (zero chunks only in runs, runs
    /// maximal), so that [`Index::to_bytes`] gives back the same bytes and the root hash
    /// names one index. Parsing is linear in the size of `bytes` plus the chunk count.
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
        if version != FORMAT_VERSION && version != FORMAT_VERSION_1 {
            return Err(bad(format!(
                "format version {version} at offset 8 is not supported (this build reads \
                 versions {FORMAT_VERSION_1} and {FORMAT_VERSION})"
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
                "record count {count} at offset 72 needs {} bytes, the index has {} (truncated or corrupted)",
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
        let record_at = |i: usize| HEADER_LEN + i * RECORD_LEN;
        let raw = bytes[HEADER_LEN..body_len]
            .chunks_exact(RECORD_LEN)
            .map(|rec| {
                (
                    rec,
                    u32::from_le_bytes(rec[32..36].try_into().expect("4 bytes")),
                )
            });
        let mut zeros = ZeroIds::default();
        let mut records = Vec::with_capacity(raw.len());
        if version == FORMAT_VERSION_1 {
            records.extend(
                raw.map(|(rec, len)| {
                    Record::Chunk(ChunkId(rec[..32].try_into().expect("32")), len)
                }),
            );
        } else {
            let mut chunks = 0u64;
            // Bytes the records cover, checked against the header before any expansion.
            let mut covered = 0u128;
            for (i, (rec, field)) in raw.enumerate() {
                let len = field & !ZERO_RUN_FLAG;
                let at = record_at(i);
                if len == 0 || len > params.max {
                    return Err(bad(format!(
                        "record {i} (at offset {at}) has chunk length {len}, outside 1..={} \
                         (the index's maximum chunk size)",
                        params.max
                    )));
                }
                let record = if field & ZERO_RUN_FLAG == 0 {
                    let id = ChunkId(rec[..32].try_into().expect("32 bytes"));
                    if zeros.get(len) == id {
                        return Err(bad(format!(
                            "record {i} (at offset {at}) lists a zero chunk of length {len} \
                             as a chunk: version {FORMAT_VERSION} writes zero chunks only as \
                             zero runs"
                        )));
                    }
                    chunks += 1;
                    Record::Chunk(id, len)
                } else {
                    let n = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
                    if rec[8..32].iter().any(|&b| b != 0) {
                        return Err(bad(format!(
                            "zero run record {i} (at offset {at}): bytes 8..32 must be zero"
                        )));
                    }
                    if n == 0 {
                        return Err(bad(format!(
                            "zero run record {i} (at offset {at}) has a count of 0"
                        )));
                    }
                    if matches!(records.last(), Some(Record::Zeros { len: l, .. }) if *l == len) {
                        return Err(bad(format!(
                            "zero run record {i} (at offset {at}) continues the run before it \
                             (same length {len}): runs must be written whole"
                        )));
                    }
                    chunks = chunks.saturating_add(n);
                    Record::Zeros { len, count: n }
                };
                if chunks > MAX_CHUNKS {
                    return Err(bad(format!(
                        "record {i} (at offset {at}) takes the index past {MAX_CHUNKS} chunks, \
                         the most this build holds"
                    )));
                }
                covered += match record {
                    Record::Chunk(_, len) => u128::from(len),
                    Record::Zeros { len, count } => u128::from(len) * u128::from(count),
                };
                records.push(record);
            }
            if covered != u128::from(image_size) {
                return Err(bad(format!(
                    "chunk lengths add up to {covered} bytes but the header says the image \
                     has {image_size}"
                )));
            }
        }
        // Chunk position where each record starts, to name records in errors.
        let mut starts = Vec::with_capacity(records.len());
        let mut position = 0u64;
        for r in &records {
            starts.push(position);
            position += match r {
                Record::Chunk(..) => 1,
                Record::Zeros { count, .. } => *count,
            };
        }
        let record_of = |position: usize| {
            let r = starts.partition_point(|&s| s <= position as u64) - 1;
            format!("record at offset {}", record_at(r))
        };
        let mut zero_ids = ZeroIds::default();
        let expanded = records.iter().flat_map(|r| {
            let (id, len, n) = match *r {
                Record::Chunk(id, len) => (id, len, 1),
                Record::Zeros { len, count } => (zero_ids.get(len), len, count),
            };
            std::iter::repeat_n((id, len), n as usize)
        });
        let (chunks, offset) = entries(params, expanded, &mut zeros).map_err(|e| match e {
            Invalid::Length { position, len, .. } => bad(format!(
                "chunk {position} ({}) has length {len}, outside 1..={} \
                 (the index's maximum chunk size)",
                record_of(position),
                params.max
            )),
            Invalid::Conflict { id, first, second } => bad(format!(
                "chunk {id} is listed with length {} at position {} ({}) and \
                 with length {} at position {} ({}): one id cannot have two \
                 lengths",
                first.1,
                first.0,
                record_of(first.0),
                second.1,
                second.0,
                record_of(second.0)
            )),
            Invalid::TooMany => bad(format!(
                "more than {MAX_CHUNKS} chunks, the most this build holds"
            )),
        })?;
        if offset != image_size {
            return Err(bad(format!(
                "chunk lengths add up to {offset} bytes but the header says the image has {image_size}"
            )));
        }
        Ok(Index {
            version,
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
    /// file: the header comes first, and the rest only as far as the header's record count
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
                    "record count {count} at offset 72 needs {expected} bytes, the file has {} \
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
    /// More than [`MAX_CHUNKS`] records.
    TooMany,
}

/// Turns `(id, len)` records into entries with offsets and zero flags, returning them and
/// the image size. Linear in the number of records (see [`ZeroIds`]).
fn entries(
    params: ChunkerParams,
    records: impl IntoIterator<Item = (ChunkId, u32)>,
    zeros: &mut ZeroIds,
) -> std::result::Result<(Vec<ChunkEntry>, u64), Invalid> {
    let records = records.into_iter();
    let hint = records.size_hint().0.min(MAX_CHUNKS as usize);
    let mut chunks: Vec<ChunkEntry> = Vec::with_capacity(hint);
    // First position of each id, to refuse an id listed with two lengths.
    let mut first: HashMap<ChunkId, usize> = HashMap::with_capacity(hint);
    let mut offset = 0u64;
    for (i, (id, len)) in records.enumerate() {
        if i as u64 >= MAX_CHUNKS {
            return Err(Invalid::TooMany);
        }
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

    /// Encodes records as a v1 index without checking them (what a hostile writer can do).
    fn raw_index(params: ChunkerParams, records: &[(ChunkId, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION_1.to_le_bytes());
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
        assert!(e.contains("record count"), "{e}");
    }

    /// Encodes raw v2 records (`(first 32 bytes, length field)`) with a right checksum.
    fn raw_v2(params: ChunkerParams, size: u64, records: &[([u8; 32], u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&ALGORITHM_FASTCDC2020_NC1.to_le_bytes());
        out.extend_from_slice(&params.min.to_le_bytes());
        out.extend_from_slice(&params.avg.to_le_bytes());
        out.extend_from_slice(&params.max.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&[0; 32]);
        out.extend_from_slice(&(records.len() as u64).to_le_bytes());
        for (head, field) in records {
            out.extend_from_slice(head);
            out.extend_from_slice(&field.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    fn run(count: u64) -> [u8; 32] {
        let mut head = [0; 32];
        head[..8].copy_from_slice(&count.to_le_bytes());
        head
    }

    #[test]
    fn zero_runs_are_one_record_each() {
        let p = ChunkerParams::default();
        let mut z = ZeroIds::default();
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"bb"));
        let mut records = vec![(a, 1)];
        records.extend(std::iter::repeat_n((z.get(p.max), p.max), 1000));
        records.extend([(z.get(100), 100), (z.get(100), 100), (b, 2)]);
        records.extend([(z.get(p.max), p.max), (z.get(7), 7)]);
        let index = Index::new(p, [1; 32], records.clone()).unwrap();
        assert_eq!(index.version(), FORMAT_VERSION);
        assert_eq!(index.chunks().len(), 1006);
        assert_eq!(index.chunks().iter().filter(|c| c.zero).count(), 1004);
        let bytes = index.to_bytes();
        // a, run of 1000, run of 2, b, run of 1, run of 1.
        assert_eq!(bytes.len(), HEADER_LEN + 6 * RECORD_LEN + TRAILER_LEN);
        assert_eq!(&bytes[72..80], &6u64.to_le_bytes());
        let run_at = HEADER_LEN + RECORD_LEN;
        assert_eq!(&bytes[run_at..run_at + 8], &1000u64.to_le_bytes());
        assert_eq!(
            &bytes[run_at + 32..run_at + 36],
            &(p.max | ZERO_RUN_FLAG).to_le_bytes()
        );
        let back = Index::from_bytes(&bytes, "t").unwrap();
        assert_eq!(back, index);
        assert_eq!(back.root_hash(), *blake3::hash(&bytes).as_bytes());
        assert_eq!(back.chunks()[1001].offset, 1 + 1000 * u64::from(p.max));
        assert_eq!(back.image_size(), 3 + 1001 * u64::from(p.max) + 207);
        // The same chunks in a v1 index: still read, and written back as v1 (same root).
        let v1 = raw_index(p, &records);
        let old = Index::from_bytes(&v1, "old").unwrap();
        assert_eq!(old.version(), FORMAT_VERSION_1);
        assert_eq!(old.chunks(), index.chunks());
        assert_eq!(old.to_bytes(), v1);
        assert_eq!(old.root_hash(), *blake3::hash(&v1).as_bytes());
        // Every truncation and bit flip of a v2 index with runs is refused.
        for n in 0..bytes.len() {
            assert!(Index::from_bytes(&bytes[..n], "t").is_err(), "len {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x04;
            assert!(Index::from_bytes(&b, "t").is_err(), "flip at {i}");
        }
    }

    #[test]
    fn hostile_zero_runs_are_refused_with_their_offset() {
        let p = ChunkerParams::default();
        let zero = *ZeroIds::default().get(100).as_bytes();
        let flag = 100 | ZERO_RUN_FLAG;
        let err = |bytes: Vec<u8>| Index::from_bytes(&bytes, "h.tidx").unwrap_err().to_string();
        // A zero chunk written as a chunk record: a second encoding of the same index.
        let e = err(raw_v2(p, 100, &[(zero, 100)]));
        assert!(
            e.contains("h.tidx") && e.contains("record 0 (at offset 80)"),
            "{e}"
        );
        assert!(e.contains("only as zero runs"), "{e}");
        // A run split in two.
        let e = err(raw_v2(p, 500, &[(run(2), flag), (run(3), flag)]));
        assert!(e.contains("record 1 (at offset 116)"), "{e}");
        assert!(e.contains("runs must be written whole"), "{e}");
        // Two runs of different lengths side by side are fine.
        let ok = raw_v2(
            p,
            399,
            &[(run(2), flag), (run(1), 100), (run(1), 99 | ZERO_RUN_FLAG)],
        );
        assert!(Index::from_bytes(&ok, "t").is_ok());
        // A count of 0, padding that is not zero, a length past the maximum or of 0.
        let e = err(raw_v2(p, 0, &[(run(0), flag)]));
        assert!(e.contains("count of 0"), "{e}");
        let mut padded = run(1);
        padded[31] = 1;
        let e = err(raw_v2(p, 100, &[(padded, flag)]));
        assert!(e.contains("bytes 8..32 must be zero"), "{e}");
        let e = err(raw_v2(p, 0, &[(run(1), (p.max + 1) | ZERO_RUN_FLAG)]));
        assert!(e.contains("outside 1..=65536"), "{e}");
        let e = err(raw_v2(p, 0, &[(run(1), ZERO_RUN_FLAG)]));
        assert!(e.contains("outside 1..="), "{e}");
        // Lengths that do not add up to the header's size.
        let e = err(raw_v2(p, 199, &[(run(2), flag)]));
        assert!(e.contains("add up to 200"), "{e}");
    }

    #[test]
    fn a_tiny_index_cannot_claim_more_chunks_than_memory_holds() {
        let p = ChunkerParams::default();
        let flag = p.max | ZERO_RUN_FLAG;
        let size = u64::MAX;
        for records in [
            vec![(run(u64::MAX), flag)],
            vec![(run(MAX_CHUNKS + 1), flag)],
            vec![(run(MAX_CHUNKS), flag), (ChunkId::of(b"x").0, 1)],
        ] {
            let e = Index::from_bytes(&raw_v2(p, size, &records), "t")
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("past {MAX_CHUNKS} chunks")), "{e}");
        }
        // Index::new refuses to build one as well.
        let zero = ZeroIds::default().get(1);
        let too_many = std::iter::repeat_n((zero, 1), MAX_CHUNKS as usize + 1);
        let e = Index::new(p, [0; 32], too_many).unwrap_err().to_string();
        assert!(e.contains("use larger chunk sizes"), "{e}");
    }

    #[test]
    fn image_hash_of_holes_equals_hash_of_written_zeros() {
        let mut data = vec![0u8; 5 * IMAGE_HASH_BLOCK + 12_345];
        for (i, b) in data.iter_mut().enumerate() {
            if (i / 300_000) % 3 == 1 {
                *b = (i % 251) as u8 | 1;
            }
        }
        let mut whole = ImageHasher::default();
        whole.update(&data);
        let want = whole.finalize();
        // The definition: BLAKE3 over the hashes of 1 MiB blocks, then the size.
        let mut outer = blake3::Hasher::new();
        for block in data.chunks(IMAGE_HASH_BLOCK) {
            outer.update(blake3::hash(block).as_bytes());
        }
        outer.update(&(data.len() as u64).to_le_bytes());
        assert_eq!(want, *outer.finalize().as_bytes());
        // Zero runs fed as zeros (any split) give the same hash.
        let mut sparse = ImageHasher::default();
        let mut at = 0;
        while at < data.len() {
            let zero = data[at] == 0;
            let n = data[at..]
                .iter()
                .position(|&b| (b == 0) != zero)
                .unwrap_or(data.len() - at);
            if zero {
                sparse.zeros(n as u64);
            } else {
                sparse.update(&data[at..at + n]);
            }
            at += n;
        }
        assert_eq!(sparse.finalize(), want);
        let mut empty = ImageHasher::default();
        empty.zeros(0);
        assert_eq!(
            empty.finalize(),
            *blake3::hash(&0u64.to_le_bytes()).as_bytes()
        );
    }
}
