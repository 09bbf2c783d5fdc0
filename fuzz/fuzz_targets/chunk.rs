//! Chunk files from a store: `decompress_verified` must reject bad frames, wrong lengths
//! and wrong hashes with an error, never panic nor allocate more than the expected length.
//!
//! Input: 2 bytes of expected length (little-endian, in 4-byte units, so up to 256 KiB),
//! 1 byte choosing the expected id (0: the id of what the frame really holds, so the
//! success path is reached too; other values: a wrong id), then the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_engine::chunk::decompress_verified;
use tessera_engine::ChunkId;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let expected_len = u32::from(u16::from_le_bytes([data[0], data[1]])) * 4;
    let frame = &data[3..];
    let id = match (
        data[2],
        zstd::bulk::decompress(frame, expected_len as usize),
    ) {
        (0, Ok(content)) => ChunkId::of(&content),
        _ => ChunkId([data[2]; 32]),
    };
    if let Ok(chunk) = decompress_verified(id, frame, expected_len, "fuzz") {
        assert_eq!(chunk.data().len(), expected_len as usize);
        assert_eq!(ChunkId::of(chunk.data()), id);
    }
});
