//! Chunk bytes: compression, decompression and verification.
//!
//! Bytes from a store, a seed or a target become a [`VerifiedChunk`] only through
//! [`VerifiedChunk::verify`], which hashes them against the expected id. Writers and
//! servers take `VerifiedChunk`, so "verified before use" is enforced by the types.

use std::cell::RefCell;

use crate::digest::ChunkDigest;
use crate::error::{Error, Result};
use crate::ChunkId;

/// zstd level of chunk frames. Fixed so that two `make` runs write identical packs.
pub const ZSTD_LEVEL: i32 = 3;

/// Chunk bytes that hashed to their id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChunk {
    id: ChunkId,
    data: Vec<u8>,
}

impl VerifiedChunk {
    /// Checks that `data` hashes to `id`; `origin` names the source for the error.
    ///
    /// # Errors
    /// [`Error::CorruptChunk`] if the hash differs.
    pub fn verify(id: ChunkId, data: Vec<u8>, origin: &str) -> Result<VerifiedChunk> {
        VerifiedChunk::verify_with(ChunkDigest::Blake3, id, data, origin)
    }

    /// Checks that `data` hashes to `id` with `digest` (the index's, see
    /// [`crate::Index::digest`]); `origin` names the source for the error.
    ///
    /// # Errors
    /// [`Error::CorruptChunk`] if the hash differs.
    pub fn verify_with(
        digest: ChunkDigest,
        id: ChunkId,
        data: Vec<u8>,
        origin: &str,
    ) -> Result<VerifiedChunk> {
        let actual = digest.id(&data);
        if actual != id {
            return Err(Error::CorruptChunk {
                id,
                origin: origin.to_string(),
                reason: format!("{} bytes hash to {actual} ({digest})", data.len()),
            });
        }
        Ok(VerifiedChunk { id, data })
    }

    /// The chunk id.
    pub fn id(&self) -> ChunkId {
        self.id
    }

    /// The verified bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The verified bytes, owned.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses chunk bytes into a standalone zstd frame (readable with `zstd -d`).
pub fn compress(data: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let comp = c.get_or_insert_with(|| {
            zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd level 3 is valid")
        });
        comp.compress(data)
            .expect("compressing into a growable buffer cannot fail")
    })
}

/// Decompresses a chunk's zstd frame, which must hold exactly `expected_len` bytes, then
/// verifies it.
///
/// Never allocates more than `expected_len` bytes, whatever the frame claims.
///
/// # Errors
/// [`Error::CorruptChunk`] naming `id` and `origin` for a bad frame, a wrong length or a
/// hash mismatch.
pub fn decompress_verified(
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
    let data = DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let dec = d.get_or_insert_with(|| {
            zstd::bulk::Decompressor::new().expect("creating a zstd context")
        });
        // One spare byte so that a frame holding more than expected is detected.
        let mut out = Vec::with_capacity(expected_len as usize + 1);
        dec.decompress_to_buffer(compressed, &mut out)
            .map(|_| out)
            .map_err(|e| {
                corrupt(format!(
                    "not a valid zstd frame of at most {expected_len} bytes: {e}"
                ))
            })
    })?;
    if data.len() != expected_len as usize {
        return Err(corrupt(format!(
            "decompressed to {} bytes, the index says {expected_len}",
            data.len()
        )));
    }
    VerifiedChunk::verify(id, data, origin)
}

/// `Ok` when `compressed` is a zstd frame of exactly the bytes `expected`; else why not.
///
/// For checking a stored chunk frame against chunk bytes already verified: decompressing
/// and comparing costs less than decompressing and hashing again.
pub(crate) fn frame_holds(compressed: &[u8], expected: &[u8]) -> std::result::Result<(), String> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let dec = d.get_or_insert_with(|| {
            zstd::bulk::Decompressor::new().expect("creating a zstd context")
        });
        // One spare byte so that a frame holding more than expected is detected.
        let mut out = Vec::with_capacity(expected.len() + 1);
        dec.decompress_to_buffer(compressed, &mut out)
            .map_err(|e| {
                format!(
                    "not a valid zstd frame of at most {} bytes: {e}",
                    expected.len()
                )
            })?;
        if out.len() != expected.len() {
            return Err(format!(
                "decompresses to {} bytes, the chunk has {}",
                out.len(),
                expected.len()
            ));
        }
        if out != expected {
            return Err("holds other bytes than the chunk".into());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let data = b"hello hello hello hello".to_vec();
        let id = ChunkId::of(&data);
        let z = compress(&data);
        let v = decompress_verified(id, &z, data.len() as u32, "t").unwrap();
        assert_eq!(v.data(), &data[..]);
        // Wrong expected length.
        assert!(decompress_verified(id, &z, 5, "t").is_err());
        assert!(decompress_verified(id, &z, 500, "t").is_err());
        // Wrong id.
        assert!(decompress_verified(ChunkId::of(b"x"), &z, data.len() as u32, "t").is_err());
        // Garbage.
        assert!(decompress_verified(id, b"garbage", data.len() as u32, "t").is_err());
        let mut flipped = z.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(decompress_verified(id, &flipped, data.len() as u32, "t").is_err());
        assert!(frame_holds(&flipped, &data).is_err());
    }

    #[test]
    fn frame_holds_only_the_exact_bytes() {
        let data = b"hello hello hello hello".to_vec();
        let z = compress(&data);
        assert_eq!(frame_holds(&z, &data), Ok(()));
        assert!(frame_holds(&z, &data[1..]).is_err());
        let mut longer = data.clone();
        longer.push(b'!');
        assert!(frame_holds(&z, &longer).is_err());
        let mut other = data.clone();
        other[3] = b'X';
        assert!(frame_holds(&z, &other).unwrap_err().contains("other bytes"));
        assert!(frame_holds(b"", &data).is_err());
        assert!(frame_holds(&z[..z.len() / 2], &data).is_err());
    }
}
