//! Chunk identifiers: the BLAKE3 hash of a chunk's uncompressed bytes.

use std::fmt;
use std::str::FromStr;

/// The id of a chunk: BLAKE3 of its bytes. Displays as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hashes `data` into its chunk id.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id as lowercase hex.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// The error from parsing a [`ChunkId`] out of hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a 64-digit hex hash: {0:?}")]
pub struct ParseIdError(String);

impl FromStr for ChunkId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(ParseIdError(s.chars().take(80).collect()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]);
            let lo = hex_digit(pair[1]);
            match (hi, lo) {
                (Some(h), Some(l)) => out[i] = (h << 4) | l,
                _ => return Err(ParseIdError(s.to_string())),
            }
        }
        Ok(ChunkId(out))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"hello");
        let parsed: ChunkId = id.to_string().parse().unwrap();
        assert_eq!(id, parsed);
        assert_eq!(id.to_string(), blake3::hash(b"hello").to_hex().as_str());
    }

    #[test]
    fn rejects_bad_hex() {
        assert!("zz".parse::<ChunkId>().is_err());
        assert!("g".repeat(64).parse::<ChunkId>().is_err());
    }
}
