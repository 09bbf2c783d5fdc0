//! Content-defined chunking with FastCDC (2020 variant, normalization level 1).
//!
//! [`Chunker`] streams an image through a large buffer and yields owned chunks in order.
//! It avoids the per-chunk buffer shuffling of `fastcdc::v2020::StreamCDC` by cutting
//! inside a multi-megabyte window and compacting only when fewer than `max` bytes remain.
//! Its input is [`Segments`]: data and runs of zeros (holes of a file, zero blocks found
//! by [`ZeroScan`]); chunks that lie wholly in zeros come out as one [`Piece::Zeros`]
//! each run, without the zeros being read, cut or hashed.

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

    /// Length of the chunk that starts where at least `max` zero bytes follow: every
    /// chunk cut inside a long run of zeros has this length.
    pub fn zero_cut_len(&self) -> u32 {
        self.cut_len(&vec![0; self.max as usize]) as u32
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

/// What [`Chunker::next_piece`] yields: a chunk, or a run of equal chunks of zeros.
#[derive(Debug)]
pub enum Piece {
    /// A chunk with its bytes (it may be all zeros: short zero stretches are cut as usual).
    Chunk(RawChunk),
    /// `count` chunks of `len` zero bytes each, from `offset`: the chunks a stream of
    /// these zeros would give, without the zeros ever being in memory.
    Zeros {
        /// Offset of the first chunk in the image.
        offset: u64,
        /// Length of each chunk.
        len: u32,
        /// Number of chunks.
        count: u64,
    },
}

/// A piece of an image's byte stream, as [`Segments`] hands it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// This many bytes were written to the start of the buffer (at least one).
    Data(usize),
    /// This many zero bytes come next (a hole, or zeros the source found).
    Zeros(u64),
    /// The stream has ended.
    End,
}

/// An image's byte stream as data and runs of zeros: the seam between where the bytes
/// come from (a file with holes, a block device, a pipe) and the chunker. Zero runs are
/// a shortcut, never a different stream: the chunks are those of the same bytes read
/// plainly.
pub trait Segments {
    /// The next piece of the stream; data goes to `buf` (which is never empty).
    ///
    /// # Errors
    /// Read errors of the source.
    fn next_segment(&mut self, buf: &mut [u8]) -> io::Result<Segment>;
}

impl<S: Segments + ?Sized> Segments for Box<S> {
    fn next_segment(&mut self, buf: &mut [u8]) -> io::Result<Segment> {
        (**self).next_segment(buf)
    }
}

/// Where [`ZeroScan`] gets bytes from: data, or holes it knows of without reading.
pub trait Source {
    /// Fills the start of `buf` (returning [`Segment::Data`]), or reports a hole
    /// ([`Segment::Zeros`]) or the end.
    ///
    /// # Errors
    /// Read errors.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<Segment>;
}

/// A plain reader as a [`Source`]: no holes (a pipe, standard input).
pub struct Plain<R>(pub R);

impl<R: Read> Source for Plain<R> {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<Segment> {
        loop {
            match self.0.read(buf) {
                Ok(0) => return Ok(Segment::End),
                Ok(n) => return Ok(Segment::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Granularity of the zero scan: a block of this many zero bytes becomes a zero run.
pub const SCAN_BLOCK: usize = 4096;
/// Bytes [`ZeroScan`] reads at a time.
const SCAN_WINDOW: usize = 1 << 20;

/// [`Segments`] of a [`Source`]: holes pass through as zero runs, and the data read is
/// scanned for all-zero blocks (allocated zeros, block devices) which become zero runs
/// too, so that neither is chunked or hashed byte by byte.
pub struct ZeroScan<S> {
    source: S,
    window: Vec<u8>,
    pos: usize,
    len: usize,
}

impl<S: Source> ZeroScan<S> {
    /// A scan over `source`.
    pub fn new(source: S) -> Self {
        ZeroScan {
            source,
            window: vec![0; SCAN_WINDOW],
            pos: 0,
            len: 0,
        }
    }
}

/// True when `block` is all zeros (compared 16 bytes at a time).
pub fn is_zero(block: &[u8]) -> bool {
    let words = block.chunks_exact(16);
    let tail = words.remainder();
    words
        .map(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")))
        .all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

impl<S: Source> Segments for ZeroScan<S> {
    fn next_segment(&mut self, buf: &mut [u8]) -> io::Result<Segment> {
        // Zeros across holes and windows add up to one run.
        let mut zeros = 0u64;
        loop {
            if self.pos == self.len {
                self.pos = 0;
                self.len = 0;
                match self.source.fill(&mut self.window)? {
                    Segment::Data(n) => self.len = n,
                    Segment::Zeros(n) => {
                        zeros += n;
                        continue;
                    }
                    Segment::End if zeros > 0 => return Ok(Segment::Zeros(zeros)),
                    Segment::End => return Ok(Segment::End),
                }
            }
            let n: usize = self.window[self.pos..self.len]
                .chunks(SCAN_BLOCK)
                .take_while(|b| is_zero(b))
                .map(<[u8]>::len)
                .sum();
            zeros += n as u64;
            self.pos += n;
            if self.pos < self.len {
                break;
            }
        }
        if zeros > 0 {
            return Ok(Segment::Zeros(zeros));
        }
        let rest = &self.window[self.pos..self.len];
        let n: usize = rest
            .chunks(SCAN_BLOCK)
            .take_while(|b| !is_zero(b))
            .map(<[u8]>::len)
            .sum::<usize>()
            .min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(Segment::Data(n))
    }
}

/// What the chunker has taken in, for hashing the whole image in the same pass.
#[derive(Debug)]
pub enum Fed<'a> {
    /// Bytes, in order.
    Data(&'a [u8]),
    /// This many zero bytes.
    Zeros(u64),
}

/// Streams [`Segments`] into content-defined chunks, also reporting everything taken in
/// to a callback (used to hash the whole image in the same pass).
///
/// Deterministic whatever the segments: a run of zeros yields [`Piece::Zeros`] for the
/// chunks lying wholly in it, and those are exactly the chunks the zeros would give if
/// read (a chunk's cut depends only on its first `max` bytes, so every chunk that starts
/// at least `max` bytes before a run's end is a chunk of zeros of one fixed length).
pub struct Chunker<S> {
    source: S,
    params: ChunkerParams,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    offset: u64,
    /// Zeros that follow `buf[..end]` in the stream, not yet in the buffer.
    pending: u64,
    /// The length of a chunk cut from `max` zeros.
    zero_cut: u32,
}

/// Size of the read window; large reads keep block devices and page cache streaming.
const WINDOW: usize = 8 * 1024 * 1024;

impl<S: Segments> Chunker<S> {
    /// A chunker over `source` with validated parameters.
    pub fn new(source: S, params: ChunkerParams) -> Self {
        let cap = WINDOW.max(4 * params.max as usize);
        Chunker {
            source,
            params,
            buf: vec![0; cap],
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
            pending: 0,
            zero_cut: params.zero_cut_len(),
        }
    }

    /// Moves the unconsumed bytes to the start of the buffer.
    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// The next piece, calling `fed` with what is newly taken in before cutting it.
    ///
    /// # Errors
    /// Any read error from the source.
    pub fn next_piece(&mut self, fed: &mut dyn FnMut(Fed<'_>)) -> io::Result<Option<Piece>> {
        let max = self.params.max as usize;
        loop {
            let held = self.end - self.start;
            if self.pending > 0
                && held as u64 + self.pending >= max as u64
                && is_zero(&self.buf[self.start..self.end])
            {
                // Every chunk that starts at least `max` bytes before the zeros end.
                let zeros = held as u64 + self.pending;
                let z = u64::from(self.zero_cut);
                let count = (zeros - max as u64) / z + 1;
                let taken = count * z;
                let from_buf = taken.min(held as u64);
                self.start += from_buf as usize;
                self.pending -= taken - from_buf;
                let offset = self.offset;
                self.offset += taken;
                return Ok(Some(Piece::Zeros {
                    offset,
                    len: self.zero_cut,
                    count,
                }));
            }
            if held >= max || (self.eof && self.pending == 0) {
                break;
            }
            self.compact();
            if self.pending > 0 {
                // Zeros too few for a run of zero chunks (or after other bytes): as bytes.
                let n = (max as u64 - held as u64).min(self.pending) as usize;
                self.buf[self.end..self.end + n].fill(0);
                self.end += n;
                self.pending -= n as u64;
                continue;
            }
            match self.source.next_segment(&mut self.buf[self.end..])? {
                Segment::Data(n) => {
                    fed(Fed::Data(&self.buf[self.end..self.end + n]));
                    self.end += n;
                }
                Segment::Zeros(n) => {
                    fed(Fed::Zeros(n));
                    self.pending += n;
                }
                Segment::End => self.eof = true,
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
        Ok(Some(Piece::Chunk(chunk)))
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

    /// Cuts of `source` with zero runs expanded, checking that what was fed adds up.
    fn cuts_of(source: impl Segments, params: ChunkerParams, data: &[u8]) -> Vec<(u64, usize)> {
        let mut c = Chunker::new(source, params);
        let mut out = vec![];
        let mut fed = crate::index::ImageHasher::default();
        while let Some(piece) = c
            .next_piece(&mut |f| match f {
                Fed::Data(d) => fed.update(d),
                Fed::Zeros(n) => fed.zeros(n),
            })
            .unwrap()
        {
            match piece {
                Piece::Chunk(ch) => {
                    assert_eq!(ch.data, data[ch.offset as usize..][..ch.data.len()]);
                    out.push((ch.offset, ch.data.len()));
                }
                Piece::Zeros { offset, len, count } => {
                    assert!(count >= 1);
                    for i in 0..count {
                        let at = (offset + i * u64::from(len)) as usize;
                        assert!(is_zero(&data[at..at + len as usize]));
                        out.push((at as u64, len as usize));
                    }
                }
            }
        }
        let mut whole = crate::index::ImageHasher::default();
        whole.update(data);
        assert_eq!(fed.finalize(), whole.finalize(), "fed bytes differ");
        out
    }

    fn cuts(data: &[u8], params: ChunkerParams) -> Vec<(u64, usize)> {
        cuts_of(ZeroScan::new(Plain(data)), params, data)
    }

    /// A file with holes: runs of zeros at least `hole` long are reported without their
    /// bytes, in reads of at most `step` bytes.
    struct Holey<'a> {
        data: &'a [u8],
        pos: usize,
        hole: usize,
        step: usize,
    }

    impl Source for Holey<'_> {
        fn fill(&mut self, buf: &mut [u8]) -> io::Result<Segment> {
            let rest = &self.data[self.pos..];
            if rest.is_empty() {
                return Ok(Segment::End);
            }
            let zeros = rest.iter().take_while(|&&b| b == 0).count();
            if zeros >= self.hole {
                self.pos += zeros;
                return Ok(Segment::Zeros(zeros as u64));
            }
            let n = rest.len().min(buf.len()).min(self.step);
            buf[..n].copy_from_slice(&rest[..n]);
            self.pos += n;
            Ok(Segment::Data(n))
        }
    }

    fn reference(data: &[u8], p: ChunkerParams) -> Vec<(u64, usize)> {
        fastcdc::v2020::StreamCDC::new(data, p.min, p.avg, p.max)
            .map(|c| c.unwrap())
            .map(|c| (c.offset, c.length))
            .collect()
    }

    #[test]
    fn holes_and_written_zeros_cut_like_plain_bytes() {
        let p = ChunkerParams::new(4096, 16384, 65536).unwrap();
        let max = p.max as usize;
        let z = p.cut_len(&vec![0; max]);
        // Zero runs of every awkward length: shorter than a chunk, around `max` and
        // `max + z`, unaligned, long, at the start and at the end.
        let runs = [
            0,
            100,
            4095,
            max - 1,
            max,
            max + 1,
            max + z - 1,
            max + z,
            max + z + 1,
            3 * max + 17,
            5 << 20,
            (9 << 20) + 4097,
        ];
        let mut data = vec![0u8; 200_003];
        for (seed, &run) in (10..).zip(runs.iter()) {
            data.extend(random(run % 150_000 + 1, seed));
            data.resize(data.len() + run, 0);
        }
        let want = reference(&data, p);
        assert_eq!(cuts(&data, p), want, "written zeros");
        for (hole, step) in [
            (1, 1 << 20),
            (4096, 7777),
            (max, 1 << 20),
            (1 << 20, 100_000),
        ] {
            let holey = Holey {
                data: &data,
                pos: 0,
                hole,
                step,
            };
            assert_eq!(
                cuts_of(ZeroScan::new(holey), p, &data),
                want,
                "holes of {hole}+ bytes, reads of {step}"
            );
        }
        // An image that is one hole, and one ending in a short hole.
        let empty = vec![0u8; (3 << 20) + 5];
        let holey = Holey {
            data: &empty,
            pos: 0,
            hole: 1,
            step: 1,
        };
        assert_eq!(
            cuts_of(ZeroScan::new(holey), p, &empty),
            reference(&empty, p)
        );
    }

    #[test]
    fn long_zero_runs_come_out_as_one_piece() {
        let p = ChunkerParams::default();
        let mut data = random(100_000, 3);
        data.resize(100_000 + (64 << 20), 0);
        data.extend(random(10, 4));
        let mut c = Chunker::new(ZeroScan::new(Plain(&data[..])), p);
        let mut pieces = 0;
        let mut zero_chunks = 0;
        while let Some(piece) = c.next_piece(&mut |_| {}).unwrap() {
            pieces += 1;
            if let Piece::Zeros { count, .. } = piece {
                zero_chunks += count;
            }
        }
        assert!(zero_chunks > 1000, "{zero_chunks}");
        assert!(pieces < 30, "{pieces} pieces");
    }

    #[test]
    fn matches_fastcdc_stream_reference() {
        let data = random(3 * 1024 * 1024 + 17, 1);
        let p = ChunkerParams::new(4096, 16384, 65536).unwrap();
        assert_eq!(cuts(&data, p), reference(&data, p));
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
