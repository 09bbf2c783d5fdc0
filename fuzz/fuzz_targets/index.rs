//! Index files: `Index::from_bytes` must reject anything malformed with an error, never
//! panic or allocate from an unchecked count, and whatever it accepts must encode back to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_engine::Index;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = Index::from_bytes(data, "fuzz") {
        assert_eq!(index.to_bytes(), data, "accepted index does not round-trip");
        assert_eq!(
            index.root_hash(),
            *tessera_engine::ChunkId::of(data).as_bytes()
        );
    }
});
