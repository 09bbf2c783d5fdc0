//! casync inputs: a `.caibx` index (`casync::parse_index`) and a `.cacnk` chunk file
//! (`casync::decompress_chunk`, zstd, xz or gzip) must be refused with an error, never a
//! panic, and never allocate past the lengths the index gives.
//!
//! Input: 1 byte choosing what is parsed, then:
//! - even: the rest is a `.caibx`; a parsed index must be consistent (contiguous chunks
//!   adding up to the image size, each within the index's maximum);
//! - odd: 2 bytes of expected length (little-endian, in 4-byte units: up to 256 KiB),
//!   1 byte choosing the digest (bit 0: SHA-256, else SHA-512/256) and, in bit 1, whether
//!   the expected id is that of the frame's zstd content (so the success path is reached)
//!   or a wrong one, then the `.cacnk` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_engine::casync::{decompress_chunk, parse_index};
use tessera_engine::{ChunkDigest, ChunkId};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(index) = parse_index(rest, "fuzz") {
            let mut offset = 0;
            for c in index.chunks() {
                assert_eq!(c.offset, offset);
                assert!(c.len >= 1 && c.len <= index.params().max);
                offset = c.end();
            }
            assert_eq!(offset, index.image_size());
        }
        return;
    }
    if rest.len() < 3 {
        return;
    }
    let expected_len = u32::from(u16::from_le_bytes([rest[0], rest[1]])) * 4;
    let digest = if rest[2] & 1 == 1 {
        ChunkDigest::Sha256
    } else {
        ChunkDigest::Sha512_256
    };
    let file = &rest[3..];
    let id = match (
        rest[2] & 2,
        zstd::bulk::decompress(file, expected_len as usize),
    ) {
        (0, Ok(content)) => digest.id(&content),
        _ => ChunkId([rest[2]; 32]),
    };
    if let Ok(chunk) = decompress_chunk(digest, id, file, expected_len, "fuzz") {
        assert_eq!(chunk.data().len(), expected_len as usize);
        assert_eq!(digest.id(chunk.data()), id);
    }
});
