//! Index files (v1, and v2 with its zero-run records): `Index::from_bytes` must reject
//! anything malformed with an error, never panic or allocate from an unchecked count (a
//! zero run's count included), and whatever it accepts must encode back to the same bytes
//! and hold every invariant the engine relies on.
//!
//! Random bytes almost never carry a valid trailing checksum, so each input is parsed
//! twice: as it is, and with its record count and checksum fixed up, so that the
//! semantic checks (lengths, one length per id, zero flags, offsets) see hostile but
//! well-formed indexes.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use tessera_engine::index::{ZeroIds, HEADER_LEN, MAX_CHUNKS, RECORD_LEN, TRAILER_LEN};
use tessera_engine::{ChunkId, Index};

/// `data` as a well-formed index: the header's count matches the whole records that
/// follow it, and the checksum is right.
fn fixed_up(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < HEADER_LEN {
        return None;
    }
    let records = (data.len() - HEADER_LEN) / RECORD_LEN;
    let mut out = data[..HEADER_LEN + records * RECORD_LEN].to_vec();
    out[72..80].copy_from_slice(&(records as u64).to_le_bytes());
    // A chunk id is the BLAKE3 of its bytes: the index checksum's hash.
    let sum = ChunkId::of(&out);
    out.extend_from_slice(sum.as_bytes());
    Some(out)
}

fn check(data: &[u8]) {
    let Ok(index) = Index::from_bytes(data, "fuzz") else {
        return;
    };
    assert_eq!(index.to_bytes(), data, "accepted index does not round-trip");
    assert_eq!(index.root_hash(), *ChunkId::of(data).as_bytes());
    let records = u64::from_le_bytes(data[72..80].try_into().unwrap()) as usize;
    assert_eq!(data.len(), HEADER_LEN + records * RECORD_LEN + TRAILER_LEN);
    assert!(index.chunks().len() as u64 <= MAX_CHUNKS);
    if index.version() == 1 {
        assert_eq!(index.chunks().len(), records);
    } else {
        // v2: one record per chunk, except runs of equal zero chunks share one.
        let mut runs = 0;
        for w in index.chunks().windows(2) {
            if w[0].zero && w[1].zero && w[0].len == w[1].len {
                runs += 1;
            }
        }
        assert_eq!(index.chunks().len() - runs, records);
    }
    let max = index.params().max;
    let mut zeros = ZeroIds::default();
    let mut lengths: HashMap<ChunkId, u32> = HashMap::new();
    let mut offset = 0u64;
    for (i, c) in index.chunks().iter().enumerate() {
        assert!(c.len >= 1 && c.len <= max, "chunk {i}: length {}", c.len);
        assert_eq!(c.offset, offset, "chunk {i} is not contiguous");
        let first = *lengths.entry(c.id).or_insert(c.len);
        assert_eq!(first, c.len, "chunk {} listed with two lengths", c.id);
        // Zero flags are exact: checked against plain hashing where that is cheap.
        let zero_id = if c.len <= 1 << 16 {
            ChunkId::of(&vec![0u8; c.len as usize])
        } else {
            zeros.get(c.len)
        };
        assert_eq!(c.zero, c.id == zero_id, "chunk {i}: wrong zero flag");
        assert_eq!(index.chunk_at(c.offset), Some(i));
        assert_eq!(index.chunk_at(c.end() - 1), Some(i));
        offset = c.end();
    }
    assert_eq!(offset, index.image_size());
    assert_eq!(index.chunk_at(index.image_size()), None);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = fixed_up(data) {
        check(&fixed);
    }
});
