//! The hash a chunk id is made with: BLAKE3 for tessera's own indexes, SHA-512/256 or
//! SHA-256 for casync's (see `docs/CASYNC.md`). Every place that checks chunk bytes
//! against an id asks the index's [`ChunkDigest`].

use std::collections::HashMap;

use sha2::Digest as _;

use crate::ChunkId;

/// How the chunk ids of an index are computed from chunk bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChunkDigest {
    /// BLAKE3 (tessera indexes).
    #[default]
    Blake3,
    /// SHA-512/256 (casync's default).
    Sha512_256,
    /// SHA-256 (casync without its `sha512-256` feature flag).
    Sha256,
}

impl ChunkDigest {
    /// The id of `data`.
    pub fn id(self, data: &[u8]) -> ChunkId {
        match self {
            ChunkDigest::Blake3 => ChunkId::of(data),
            ChunkDigest::Sha512_256 => ChunkId(sha2::Sha512_256::digest(data).into()),
            ChunkDigest::Sha256 => ChunkId(sha2::Sha256::digest(data).into()),
        }
    }

    /// The name messages use: `blake3`, `sha512-256`, `sha256`.
    pub fn name(self) -> &'static str {
        match self {
            ChunkDigest::Blake3 => "blake3",
            ChunkDigest::Sha512_256 => "sha512-256",
            ChunkDigest::Sha256 => "sha256",
        }
    }

    /// The ids of all-zero chunks of each length in `lens`, with work linear in the
    /// largest length plus the number of lengths (not in their sum): SHA-2 hashes left to
    /// right, so one hasher fed zeros is cloned and finished at each length in turn.
    /// For BLAKE3 use [`crate::index::ZeroIds`], which bounds the work the same way.
    pub fn zero_ids(self, lens: impl IntoIterator<Item = u32>) -> HashMap<u32, ChunkId> {
        let mut lens: Vec<u32> = lens.into_iter().collect();
        lens.sort_unstable();
        lens.dedup();
        let mut out = HashMap::with_capacity(lens.len());
        if self == ChunkDigest::Blake3 {
            let mut z = crate::index::ZeroIds::default();
            for len in lens {
                out.insert(len, z.get(len));
            }
            return out;
        }
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        fn run<H: sha2::Digest + Clone>(lens: &[u32], out: &mut HashMap<u32, ChunkId>) {
            let mut h = H::new();
            let mut fed = 0u64;
            for &len in lens {
                while fed < u64::from(len) {
                    let n = (u64::from(len) - fed).min(ZEROS.len() as u64) as usize;
                    h.update(&ZEROS[..n]);
                    fed += n as u64;
                }
                let sum = h.clone().finalize();
                out.insert(len, ChunkId(sum[..32].try_into().expect("32-byte digest")));
            }
        }
        match self {
            ChunkDigest::Sha512_256 => run::<sha2::Sha512_256>(&lens, &mut out),
            _ => run::<sha2::Sha256>(&lens, &mut out),
        }
        out
    }
}

impl std::fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        // FIPS 180-4 "abc" test vectors.
        assert_eq!(
            ChunkDigest::Sha256.id(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            ChunkDigest::Sha512_256.id(b"abc").to_string(),
            "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"
        );
        assert_eq!(ChunkDigest::Blake3.id(b"abc"), ChunkId::of(b"abc"));
    }

    #[test]
    fn zero_ids_match_hashing_zeros() {
        let lens = [
            1u32, 63, 64, 65, 127, 128, 129, 4096, 65_535, 65_536, 65_537, 300_000,
        ];
        for d in [
            ChunkDigest::Sha256,
            ChunkDigest::Sha512_256,
            ChunkDigest::Blake3,
        ] {
            let ids = d.zero_ids(lens.iter().rev().copied().chain([64, 1]));
            assert_eq!(ids.len(), lens.len());
            for len in lens {
                assert_eq!(ids[&len], d.id(&vec![0; len as usize]), "{d} {len}");
            }
        }
    }
}
