//! Content-defined chunking with FastCDC (2020 variant, normalization level 1).
//!
//! [`Chunker`] streams any reader through a large buffer and yields owned chunks in order.
//! It avoids the per-chunk buffer shuffling of `fastcdc::v2020::StreamCDC` by cutting
//! inside a multi-megabyte window and compacting only when fewer than `max` bytes remain.

use std::io::{self, Read};

use fastcdc::v2020::{cut, MASKS};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The chunker algorithm id written in index headers: FastCDC 2020, normalization 1.
pub const ALGORITHM_FASTCDC2020_NC1: u32 = 1;

/// Minimum, average and maximum chunk sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// Smallest chunk (except the last one of an image).
    pub min: u32,
    /// Target average chunk size; must be a power of two.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

impl Default for ChunkerParams {
    /// 4 KiB / 16 KiB / 64 KiB: the fewest bytes on the wire for a release update of the
    /// ext4 pair of `benches/chunk-sweep.sh` (see `benches/RESULTS.md`). Images of tens of
    /// GiB may prefer larger chunks for a smaller index (README).
    fn default() -> Self {
        ChunkerParams {
            min: 4 * 1024,
            avg: 16 * 1024,
            max: 64 * 1024,
        }
    }
}

impl ChunkerParams {
    /// Validates sizes against what FastCDC supports: `64 <= min <= avg <= max`,
    /// `avg` a power of two between 256 B and 4 MiB, `max` between 1 KiB and 16 MiB.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the offending value.
    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let bad = |msg: String| {
            Err(Error::InvalidInput(format!(
                "chunk sizes {min}:{avg}:{max}: {msg}"
            )))
        };
        if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&min) {
            return bad(format!("min must be {MINIMUM_MIN}..={MINIMUM_MAX}"));
        }
        if !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg) || !avg.is_power_of_two() {
            return bad(format!(
                "avg must be a power of two in {AVERAGE_MIN}..={AVERAGE_MAX}"
            ));
        }
        if !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max) {
            return bad(format!("max must be {MAXIMUM_MIN}..={MAXIMUM_MAX}"));
        }
        if !(min <= avg && avg <= max) {
            return bad("need min <= avg <= max".into());
        }
        Ok(ChunkerParams { min, avg, max })
    }

    /// Parses `MIN:AVG:MAX`, each as [`parse_size`] reads it, e.g. `16K:64K:256K`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a malformed string or unsupported sizes.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 3 {
            return Err(Error::InvalidInput(format!(
                "chunk sizes {s:?}: expected MIN:AVG:MAX, e.g. 16K:64K:256K"
            )));
        }
        let mut v = [0u32; 3];
        for (slot, part) in v.iter_mut().zip(&parts) {
            *slot = parse_size(part)
                .ok()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "chunk sizes {s:?}: {part:?} is not a size below 4 GiB"
                    ))
                })?;
        }
        Self::new(v[0], v[1], v[2])
    }

    fn masks(&self) -> (u64, u64) {
        let bits = self.avg.trailing_zeros() as usize;
        (MASKS[bits + 1], MASKS[bits - 1])
    }

    /// Length of the chunk that starts at `data[0]`.
    ///
    /// The cut is the one a stream would get only when `data` holds at least `max` bytes
    /// or ends where the stream ends: a shorter slice is cut at its end. This lets callers
    /// chunk any window of a stream they hold in memory (sync scans seeds in parallel
    /// segments this way).
    pub fn cut_len(&self, data: &[u8]) -> usize {
        let (mask_s, mask_l) = self.masks();
        let (_, len) = cut(
            data,
            self.min as usize,
            self.avg as usize,
            self.max as usize,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        );
        len
    }
}

/// Parses a size in bytes: a whole number with an optional `K`, `M`, `G` or `T` suffix
/// (either case; powers of 1024), e.g. `123`, `64K`, `10G`. The one size parser of every
/// command-line option and of [`ChunkerParams::parse`].
///
/// # Errors
/// [`Error::InvalidInput`] naming the text: not a number, an unknown suffix, or a size
/// that does not fit in 64 bits.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, shift) = match t.as_bytes().last() {
        Some(b'k' | b'K') => (&t[..t.len() - 1], 10),
        Some(b'm' | b'M') => (&t[..t.len() - 1], 20),
        Some(b'g' | b'G') => (&t[..t.len() - 1], 30),
        Some(b't' | b'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    // `u64::from_str` also takes a leading `+`: sizes are plain digits.
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidInput(format!(
            "{s:?} is not a size: expected a whole number of bytes with an optional K, M, G \
             or T suffix (powers of 1024), e.g. 64K or 10G"
        )));
    }
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "size {s:?} is too large (more than 2^64 - 1 bytes)"
            ))
        })
}

/// One chunk cut from a stream.
#[derive(Debug)]
pub struct RawChunk {
    /// Offset of the chunk in the image.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

/// Streams a reader into content-defined chunks, also feeding every byte to `on_bytes`
/// (used to hash the whole image in the same pass).
pub struct Chunker<R> {
    source: R,
    params: ChunkerParams,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    offset: u64,
}

/// Size of the read window; large reads keep block devices and page cache streaming.
const WINDOW: usize = 8 * 1024 * 1024;

impl<R: Read> Chunker<R> {
    /// A chunker over `source` with validated parameters.
    pub fn new(source: R, params: ChunkerParams) -> Self {
        let cap = WINDOW.max(4 * params.max as usize);
        Chunker {
            source,
            params,
            buf: vec![0; cap],
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
        }
    }

    /// The next chunk, calling `on_bytes` with newly read bytes before cutting them.
    ///
    /// # Errors
    /// Any read error from the source.
    pub fn next_chunk(&mut self, on_bytes: &mut dyn FnMut(&[u8])) -> io::Result<Option<RawChunk>> {
        let max = self.params.max as usize;
        if self.end - self.start < max && !self.eof {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < self.buf.len() {
                match self.source.read(&mut self.buf[self.end..]) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => {
                        on_bytes(&self.buf[self.end..self.end + n]);
                        self.end += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if self.start == self.end {
            return Ok(None);
        }
        let len = self.params.cut_len(&self.buf[self.start..self.end]);
        let data = self.buf[self.start..self.start + len].to_vec();
        let chunk = RawChunk {
            offset: self.offset,
            data,
        };
        self.start += len;
        self.offset += len as u64;
        Ok(Some(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size(" 10G ").unwrap(), 10 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in ["", "K", "x", "1X", "1.5G", "-1", "+1", "1 K", "0x10"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{bad:?} is not a size")),
                "{bad:?}: {e}"
            );
        }
        // 2^64 - 1 fits; one more, or a suffix that overflows, does not.
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        for big in ["18446744073709551616", "16777216T", "99999999999T"] {
            let e = parse_size(big).unwrap_err().to_string();
            assert!(e.contains("too large"), "{big}: {e}");
        }
        assert_eq!(parse_size("16777215T").unwrap(), 16_777_215u64 << 40);
    }

    #[test]
    fn chunk_sizes_use_the_shared_parser_and_fit_u32() {
        let p = ChunkerParams::parse("16K:64k:256K").unwrap();
        assert_eq!((p.min, p.avg, p.max), (16 << 10, 64 << 10, 256 << 10));
        let e = ChunkerParams::parse("16K:64K:4G").unwrap_err().to_string();
        assert!(e.contains("\"4G\" is not a size below 4 GiB"), "{e}");
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn cuts(data: &[u8], params: ChunkerParams) -> Vec<(u64, usize)> {
        let mut c = Chunker::new(data, params);
        let mut out = vec![];
        while let Some(ch) = c.next_chunk(&mut |_| {}).unwrap() {
            out.push((ch.offset, ch.data.len()));
        }
        out
    }

    #[test]
    fn matches_fastcdc_stream_reference() {
        let data = random(3 * 1024 * 1024 + 17, 1);
        let p = ChunkerParams::new(4096, 16384, 65536).unwrap();
        let ours = cuts(&data, p);
        let reference: Vec<(u64, usize)> =
            fastcdc::v2020::StreamCDC::new(&data[..], p.min, p.avg, p.max)
                .map(|c| c.unwrap())
                .map(|c| (c.offset, c.length))
                .collect();
        assert_eq!(ours, reference);
    }

    #[test]
    fn chunks_cover_input_and_respect_bounds() {
        let data = random(20 * 1024 * 1024 + 3, 2);
        let p = ChunkerParams::default();
        let c = cuts(&data, p);
        let total: usize = c.iter().map(|x| x.1).sum();
        assert_eq!(total, data.len());
        for (i, (_, len)) in c.iter().enumerate() {
            assert!(*len <= p.max as usize);
            if i + 1 < c.len() {
                assert!(*len >= p.min as usize);
            }
        }
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(cuts(&[], ChunkerParams::default()).is_empty());
    }

    #[test]
    fn params_validation_and_parsing() {
        assert_eq!(
            ChunkerParams::parse("4K:16K:64K").unwrap(),
            ChunkerParams::default()
        );
        assert!(ChunkerParams::parse("16K:60K:256K").is_err());
        assert!(ChunkerParams::parse("64K:16K:256K").is_err());
        assert!(ChunkerParams::parse("1:2").is_err());
        assert!(ChunkerParams::parse("a:b:c").is_err());
        assert!(ChunkerParams::parse("16K:64K:99999999999999999999").is_err());
    }
}
