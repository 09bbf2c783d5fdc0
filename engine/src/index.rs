//! The index: the ordered list of chunks that rebuilds an image (format v1, see
//! `docs/FORMAT.md`).
//!
//! Parsing treats every byte as hostile: lengths are checked against the real size of the
//! input before anything is allocated from them, and the trailing checksum must match.

use std::collections::HashMap;
use std::path::Path;

use crate::chunker::{ChunkerParams, ALGORITHM_FASTCDC2020_NC1};
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
}

/// Computes chunk ids of all-zero chunks, caching one per length.
#[derive(Default, Debug)]
pub struct ZeroIds(HashMap<u32, ChunkId>);

impl ZeroIds {
    /// The id of `len` zero bytes.
    pub fn get(&mut self, len: u32) -> ChunkId {
        *self
            .0
            .entry(len)
            .or_insert_with(|| ChunkId::of(&vec![0u8; len as usize]))
    }
}

impl Index {
    /// Builds an index from chunk `(id, len)` pairs in image order.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if a length is zero or exceeds `params.max`.
    pub fn new(
        params: ChunkerParams,
        image_hash: [u8; 32],
        records: impl IntoIterator<Item = (ChunkId, u32)>,
    ) -> Result<Index> {
        let (chunks, image_size) = entries(params, records, |(_, id), offset, len| {
            Error::InvalidInput(format!(
                "chunk {id} at offset {offset} has length {len}, outside 1..={}",
                params.max
            ))
        })?;
        let mut index = Index {
            params,
            image_size,
            image_hash,
            chunks,
            root_hash: [0; 32],
        };
        index.root_hash = *blake3::hash(&index.to_bytes()).as_bytes();
        Ok(index)
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

    /// Encodes the index in format v1.
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
        let (chunks, offset) = entries(params, records, |(i, _), _, len| {
            bad(format!(
                "chunk {i} (record at offset {}) has length {len}, outside 1..={}",
                HEADER_LEN + i * RECORD_LEN,
                params.max
            ))
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
        })
    }

    /// Reads and parses an index file.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::InvalidIndex`] if it is malformed.
    pub fn load(path: &Path) -> Result<Index> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading index", path, e))?;
        Index::from_bytes(&bytes, &path.display().to_string())
    }

    /// Writes the index atomically (temporary file, fsync, rename).
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic(path, &self.to_bytes())
    }
}

/// Turns `(id, len)` records into entries with offsets and zero flags, returning them and
/// the image size. A length outside `1..=params.max` is an error made by `bad` from
/// `((position, id), offset, len)`.
fn entries(
    params: ChunkerParams,
    records: impl IntoIterator<Item = (ChunkId, u32)>,
    bad: impl Fn((usize, ChunkId), u64, u32) -> Error,
) -> Result<(Vec<ChunkEntry>, u64)> {
    let records = records.into_iter();
    let mut zeros = ZeroIds::default();
    let mut chunks = Vec::with_capacity(records.size_hint().0);
    let mut offset = 0u64;
    for (i, (id, len)) in records.enumerate() {
        if len == 0 || len > params.max {
            return Err(bad((i, id), offset, len));
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
mod tests {
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

    #[test]
    fn huge_count_does_not_allocate() {
        let mut b = sample().to_bytes();
        b[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Index::from_bytes(&b, "t").unwrap_err().to_string();
        assert!(e.contains("chunk count"), "{e}");
    }
}
