//! Pack files, their tables of contents, location files, and the planner that coalesces
//! wanted frames into range requests. Everything here is pure (bytes in, bytes out); the
//! formats are described exactly in `docs/FORMAT.md`.
//!
//! Every parser treats its input as hostile: lengths are bounded by the bytes at hand
//! before anything is allocated, and a malformed file is an [`Error::CorruptStore`]
//! naming it, never a panic.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::store::PackId;
use crate::ChunkId;

/// A pack is closed once its frames reach this many bytes (a chunk is never split, so a
/// pack may exceed it by one frame).
pub const PACK_TARGET: u64 = 64 << 20;

/// Magic of the zstd skippable frame holding a pack's table of contents.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// First bytes of a table of contents.
const TOC_MAGIC: &[u8; 8] = b"TPKTOC01";
/// Last bytes of a pack.
const PACK_MAGIC: &[u8; 4] = b"TPK1";
/// Bytes of one table-of-contents record: id, offset, compressed length, chunk length.
const TOC_RECORD: usize = 32 + 8 + 4 + 4;
/// Bytes at the end of a pack that say where its table of contents starts.
pub const PACK_TRAILER: u64 = 8;

/// First bytes of a location file.
const LOC_MAGIC: &[u8; 8] = b"TESSLOC\0";
/// The location-file version this code writes and reads.
const LOC_VERSION: u32 = 1;
/// Bytes of one location record: pack number, offset, compressed length.
const LOC_RECORD: usize = 4 + 8 + 4;

/// One frame of a pack, as its table of contents lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TocEntry {
    /// The chunk's id.
    pub id: ChunkId,
    /// Offset of its zstd frame in the pack.
    pub offset: u64,
    /// Length of the frame.
    pub clen: u32,
    /// Length of the chunk (decompressed).
    pub len: u32,
}

/// Builds one pack: frames appended in the order given, then the table of contents.
#[derive(Debug, Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    toc: Vec<TocEntry>,
}

/// A finished pack: its id, bytes and table of contents.
#[derive(Debug)]
pub struct Pack {
    /// BLAKE3 of `bytes`.
    pub id: PackId,
    /// The whole pack file.
    pub bytes: Vec<u8>,
    /// Its frames, in pack order.
    pub toc: Vec<TocEntry>,
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// Appends the zstd frame `frame` of the chunk `id` (`len` bytes decompressed);
    /// returns the frame's offset in the pack.
    pub fn push(&mut self, id: ChunkId, frame: &[u8], len: u32) -> u64 {
        let offset = self.bytes.len() as u64;
        if self.bytes.capacity() - self.bytes.len() < frame.len() {
            // Grow once to a whole pack (pages are touched only as frames arrive), not by
            // doubling: a doubled 64 MiB buffer would hold 128 MiB.
            let want = (PACK_TARGET as usize + (1 << 20)).max(self.bytes.len() + frame.len());
            self.bytes.reserve_exact(want - self.bytes.len());
        }
        self.bytes.extend_from_slice(frame);
        self.toc.push(TocEntry {
            id,
            offset,
            clen: frame.len() as u32,
            len,
        });
        offset
    }

    /// Bytes of frames so far.
    pub fn frames_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Frames so far.
    pub fn len(&self) -> usize {
        self.toc.len()
    }

    /// Whether no frame was pushed.
    pub fn is_empty(&self) -> bool {
        self.toc.is_empty()
    }

    /// Whether the pack reached [`PACK_TARGET`] and should be finished.
    pub fn is_full(&self) -> bool {
        self.frames_len() >= PACK_TARGET
    }

    /// Appends the table of contents and names the pack.
    pub fn finish(self) -> Pack {
        let PackBuilder { mut bytes, toc } = self;
        bytes.extend_from_slice(&toc_frame(&toc));
        Pack {
            id: PackId::of(&bytes),
            bytes,
            toc,
        }
    }
}

/// The end of a pack whose frames are `toc`: the skippable frame holding the table of
/// contents, then the trailer.
fn toc_frame(toc: &[TocEntry]) -> Vec<u8> {
    let mut table = Vec::with_capacity(12 + toc.len() * TOC_RECORD + 32);
    table.extend_from_slice(TOC_MAGIC);
    table.extend_from_slice(&(toc.len() as u32).to_le_bytes());
    for e in toc {
        table.extend_from_slice(e.id.as_bytes());
        table.extend_from_slice(&e.offset.to_le_bytes());
        table.extend_from_slice(&e.clen.to_le_bytes());
        table.extend_from_slice(&e.len.to_le_bytes());
    }
    let hash = blake3::hash(&table);
    table.extend_from_slice(hash.as_bytes());
    let toc_len = table.len() as u32;
    let mut out = Vec::with_capacity(table.len() + 16);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(toc_len + PACK_TRAILER as u32).to_le_bytes());
    out.extend_from_slice(&table);
    out.extend_from_slice(&toc_len.to_le_bytes());
    out.extend_from_slice(PACK_MAGIC);
    out
}

/// Writes one pack piece by piece to `out` (a [`PackSink`] of the store), hashing the
/// bytes as they go: the same bytes and id as [`PackBuilder`] for the same frames, without
/// holding the pack in memory.
pub struct PackStream<W> {
    out: W,
    hasher: blake3::Hasher,
    written: u64,
    toc: Vec<TocEntry>,
}

impl<W: PackSink> PackStream<W> {
    /// A pack to be written to `out`.
    pub fn new(out: W) -> PackStream<W> {
        PackStream {
            out,
            hasher: blake3::Hasher::new(),
            written: 0,
            toc: Vec::new(),
        }
    }

    /// Appends the zstd frame `frame` of the chunk `id` (`len` bytes decompressed);
    /// returns the frame's offset in the pack.
    ///
    /// # Errors
    /// The sink's write errors.
    pub fn push(&mut self, id: ChunkId, frame: &[u8], len: u32) -> Result<u64> {
        let offset = self.written;
        self.write(frame)?;
        self.toc.push(TocEntry {
            id,
            offset,
            clen: frame.len() as u32,
            len,
        });
        Ok(offset)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write(bytes)?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends the table of contents and stores the pack under its id; returns the id.
    ///
    /// # Errors
    /// The sink's write and commit errors.
    pub fn finish(mut self) -> Result<PackId> {
        let end = toc_frame(&self.toc);
        self.write(&end)?;
        let id = PackId(*self.hasher.finalize().as_bytes());
        self.out.commit(&id)?;
        Ok(id)
    }
}

/// Where a [`PackStream`] puts a pack's bytes: a store's pack in the making. Dropped
/// without [`PackSink::commit`], it leaves nothing a reader sees.
pub trait PackSink {
    /// Appends `bytes`.
    ///
    /// # Errors
    /// I/O or transport failures.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;

    /// Stores the pack written so far under `id` (its BLAKE3), atomically: readers never
    /// see a partial pack. A pack of that id already present and intact is kept.
    ///
    /// # Errors
    /// I/O or transport failures.
    fn commit(&mut self, id: &PackId) -> Result<()>;
}

impl<S: PackSink + ?Sized> PackSink for Box<S> {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        (**self).write(bytes)
    }

    fn commit(&mut self, id: &PackId) -> Result<()> {
        (**self).commit(id)
    }
}

fn corrupt(origin: &str, reason: impl Into<String>) -> Error {
    Error::CorruptStore {
        origin: origin.to_string(),
        reason: reason.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// From the last [`PACK_TRAILER`] bytes of a pack of `file_size` bytes, how many bytes at
/// its end hold the table of contents (its skippable frame, trailer included): read those
/// and give them to [`parse_toc`]. `origin` names the pack in errors.
///
/// # Errors
/// [`Error::CorruptStore`] for a bad magic or a table larger than the file allows.
pub fn toc_tail_len(trailer: &[u8], file_size: u64, origin: &str) -> Result<u64> {
    if trailer.len() as u64 != PACK_TRAILER || file_size < PACK_TRAILER {
        return Err(corrupt(
            origin,
            format!("{file_size} bytes is too short for a pack"),
        ));
    }
    if &trailer[4..8] != PACK_MAGIC {
        return Err(corrupt(origin, "does not end with the pack magic TPK1"));
    }
    let toc_len = u64::from(u32_at(trailer, 0));
    let tail = toc_len + 8 + PACK_TRAILER;
    if toc_len < 12 + 32 || tail > file_size {
        return Err(corrupt(
            origin,
            format!("table of contents of {toc_len} bytes does not fit a {file_size}-byte pack"),
        ));
    }
    Ok(tail)
}

/// Parses a pack's table of contents from `tail`, the last bytes of the pack (as many as
/// [`toc_tail_len`] said), `file_size` being the whole pack's size. The records must
/// cover the frame area exactly, in order, without gaps or overlaps, with distinct ids.
///
/// # Errors
/// [`Error::CorruptStore`] naming `origin` for anything malformed.
pub fn parse_toc(tail: &[u8], file_size: u64, origin: &str) -> Result<Vec<TocEntry>> {
    let bad = |reason: String| corrupt(origin, reason);
    let n = tail.len();
    if (n as u64) < 8 + 12 + 32 + PACK_TRAILER || n as u64 > file_size {
        return Err(bad(format!(
            "table of contents of {n} bytes does not fit a {file_size}-byte pack"
        )));
    }
    let toc_len = u32_at(tail, n - 8) as usize;
    if &tail[n - 4..] != PACK_MAGIC || toc_len + 16 != n {
        return Err(bad(
            "pack trailer does not match its table of contents".into()
        ));
    }
    if u32_at(tail, 0) != SKIPPABLE_MAGIC || u32_at(tail, 4) as usize != toc_len + 8 {
        return Err(bad(
            "table of contents is not in a well-formed zstd skippable frame".into(),
        ));
    }
    let table = &tail[8..8 + toc_len - 32];
    let hash = &tail[8 + toc_len - 32..8 + toc_len];
    if blake3::hash(table).as_bytes() != hash {
        return Err(bad("table of contents does not match its checksum".into()));
    }
    if &table[..8] != TOC_MAGIC {
        return Err(bad("table of contents has an unknown magic".into()));
    }
    let count = u32_at(table, 8) as usize;
    if (table.len() - 12) / TOC_RECORD != count || (table.len() - 12) % TOC_RECORD != 0 {
        return Err(bad(format!(
            "table of contents claims {count} records in {} bytes",
            table.len() - 12
        )));
    }
    let frames_end = file_size - n as u64;
    let mut seen = HashSet::with_capacity(count);
    let mut next = 0u64;
    let mut toc = Vec::with_capacity(count);
    for rec in table[12..].chunks_exact(TOC_RECORD) {
        let e = TocEntry {
            id: ChunkId(rec[..32].try_into().expect("32 bytes")),
            offset: u64_at(rec, 32),
            clen: u32_at(rec, 40),
            len: u32_at(rec, 44),
        };
        if e.offset != next || e.clen == 0 {
            return Err(bad(format!(
                "frame of chunk {} at offset {} ({} bytes) does not follow the previous \
                 frame, which ends at {next}",
                e.id, e.offset, e.clen
            )));
        }
        next = e.offset + u64::from(e.clen);
        if next > frames_end {
            return Err(bad(format!(
                "frame of chunk {} ends at {next}, past the frames (which end at {frames_end})",
                e.id
            )));
        }
        if !seen.insert(e.id) {
            return Err(bad(format!("chunk {} is listed twice", e.id)));
        }
        toc.push(e);
    }
    if next != frames_end {
        return Err(bad(format!(
            "frames end at {next} but the table of contents starts at {frames_end}"
        )));
    }
    Ok(toc)
}

/// Where one chunk of an index lives: a pack (by its number in [`Locations::packs`]), the
/// frame's offset in it and the frame's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Index into [`Locations::packs`].
    pub pack: u32,
    /// Offset of the chunk's frame in the pack.
    pub offset: u64,
    /// Length of the frame.
    pub clen: u32,
}

/// A parsed location file: where each distinct non-zero chunk of one index lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locations {
    /// Root hash of the index described.
    pub root: [u8; 32],
    /// The packs the records refer to, by number.
    pub packs: Vec<PackId>,
    /// One record per distinct non-zero chunk id of the index, in index order of first
    /// appearance.
    pub records: Vec<Location>,
}

impl Locations {
    /// The location file's bytes (deterministic).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = Vec::with_capacity(60 + self.packs.len() * 32);
        head.extend_from_slice(LOC_MAGIC);
        head.extend_from_slice(&LOC_VERSION.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&self.root);
        head.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for p in &self.packs {
            head.extend_from_slice(&p.0);
        }
        head.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        let mut raw = Vec::with_capacity(self.records.len() * LOC_RECORD);
        for r in &self.records {
            raw.extend_from_slice(&r.pack.to_le_bytes());
            raw.extend_from_slice(&r.offset.to_le_bytes());
            raw.extend_from_slice(&r.clen.to_le_bytes());
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        hasher.update(&raw);
        let mut out = head;
        out.extend_from_slice(&crate::chunk::compress(&raw));
        out.extend_from_slice(hasher.finalize().as_bytes());
        out
    }

    /// Parses a location file that must describe the index whose root hash is `root` and
    /// which has `distinct` distinct non-zero chunk ids.
    ///
    /// # Errors
    /// [`Error::CorruptStore`] naming `origin` for anything malformed or for another index.
    pub fn parse(bytes: &[u8], root: &[u8; 32], distinct: usize, origin: &str) -> Result<Self> {
        let bad = |reason: String| corrupt(origin, reason);
        let fixed = 8 + 4 + 4 + 32 + 4;
        if bytes.len() < fixed + 8 + 32 {
            return Err(bad(format!(
                "{} bytes is too short for a location file",
                bytes.len()
            )));
        }
        if &bytes[..8] != LOC_MAGIC {
            return Err(bad("not a location file (bad magic)".into()));
        }
        let version = u32_at(bytes, 8);
        if version != LOC_VERSION {
            return Err(bad(format!("unknown location file version {version}")));
        }
        let flags = u32_at(bytes, 12);
        if flags != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        if &bytes[16..48] != root {
            return Err(bad(format!(
                "describes index {}, not {}",
                ChunkId(bytes[16..48].try_into().expect("32 bytes")),
                ChunkId(*root)
            )));
        }
        let pack_count = u32_at(bytes, 48) as usize;
        let packs_end = (pack_count as u64) * 32 + fixed as u64;
        if packs_end + 8 + 32 > bytes.len() as u64 {
            return Err(bad(format!(
                "{pack_count} packs do not fit in {} bytes",
                bytes.len()
            )));
        }
        let packs_end = packs_end as usize;
        let packs: Vec<PackId> = bytes[fixed..packs_end]
            .chunks_exact(32)
            .map(|p| PackId(p.try_into().expect("32 bytes")))
            .collect();
        let count = u64_at(bytes, packs_end);
        if count != distinct as u64 {
            return Err(bad(format!(
                "lists {count} chunks, the index has {distinct} distinct non-zero chunks"
            )));
        }
        let head_end = packs_end + 8;
        let frame = &bytes[head_end..bytes.len() - 32];
        let want = distinct
            .checked_mul(LOC_RECORD)
            .ok_or_else(|| bad(format!("{distinct} records cannot be held in memory")))?;
        let mut raw = Vec::with_capacity(want + 1);
        zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(frame, &mut raw))
            .map_err(|e| {
                bad(format!(
                    "records are not a zstd frame of at most {want} bytes: {e}"
                ))
            })?;
        if raw.len() != want {
            return Err(bad(format!(
                "records decompress to {} bytes, {want} expected",
                raw.len()
            )));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&bytes[..head_end]);
        hasher.update(&raw);
        if hasher.finalize().as_bytes() != &bytes[bytes.len() - 32..] {
            return Err(bad("does not match its checksum".into()));
        }
        let mut records = Vec::with_capacity(distinct);
        for (i, rec) in raw.chunks_exact(LOC_RECORD).enumerate() {
            let r = Location {
                pack: u32_at(rec, 0),
                offset: u64_at(rec, 4),
                clen: u32_at(rec, 12),
            };
            if r.pack as usize >= pack_count {
                return Err(bad(format!(
                    "record {i} names pack number {}, the file lists {pack_count}",
                    r.pack
                )));
            }
            if r.clen == 0 || r.offset.checked_add(u64::from(r.clen)).is_none() {
                return Err(bad(format!(
                    "record {i} has an impossible frame ({} bytes at offset {})",
                    r.clen, r.offset
                )));
            }
            records.push(r);
        }
        Ok(Locations {
            root: *root,
            packs,
            records,
        })
    }
}

/// A frame a reader wants: which pack, where, how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// Pack number (the caller's numbering).
    pub pack: u32,
    /// Offset of the frame in the pack.
    pub offset: u64,
    /// Length of the frame.
    pub clen: u32,
}

/// One range request: `len` bytes at `offset` of pack `pack`, covering the frames of the
/// wants listed (by their position in the planner's input), in offset order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Pack number.
    pub pack: u32,
    /// First byte of the range.
    pub offset: u64,
    /// Bytes in the range.
    pub len: u64,
    /// Positions in the input of the wants this range covers, by offset.
    pub wants: Vec<usize>,
}

/// Plans range requests for `wants` (in the order the caller needs them): the wants are
/// cut into consecutive segments of at most `segment` frame bytes (so a request never
/// covers frames needed far apart, which bounds what a reader holds ahead); within a
/// segment, frames of one pack are sorted by offset and neighbours whose gap is at most
/// `max_gap` are merged into one request of at most `max_request` bytes (a larger frame
/// gets a request of its own). Requests come out in the order their first want is
/// needed. Every want is covered by exactly one request.
pub fn plan_requests(wants: &[Want], max_gap: u64, max_request: u64, segment: u64) -> Vec<Request> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < wants.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < wants.len() && (end == start || bytes + u64::from(wants[end].clen) <= segment) {
            bytes += u64::from(wants[end].clen);
            end += 1;
        }
        let mut order: Vec<usize> = (start..end).collect();
        order.sort_by_key(|&i| (wants[i].pack, wants[i].offset, i));
        let mut segment_requests: Vec<Request> = Vec::new();
        for i in order {
            let w = wants[i];
            let w_end = w.offset.saturating_add(u64::from(w.clen));
            if let Some(r) = segment_requests.last_mut() {
                let r_end = r.offset + r.len;
                let merged = w_end.max(r_end) - r.offset;
                if r.pack == w.pack
                    && w.offset <= r_end.saturating_add(max_gap)
                    && merged <= max_request
                {
                    r.len = merged;
                    r.wants.push(i);
                    continue;
                }
            }
            segment_requests.push(Request {
                pack: w.pack,
                offset: w.offset,
                len: w_end - w.offset,
                wants: vec![i],
            });
        }
        segment_requests.sort_by_key(|r| r.wants.iter().copied().min());
        out.extend(segment_requests);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::compress;

    fn chunk(i: u32) -> Vec<u8> {
        let mut data = vec![0u8; 1000 + i as usize * 37];
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut data);
        data
    }

    fn pack_of(n: u32) -> Pack {
        let mut b = PackBuilder::new();
        for i in 0..n {
            let data = chunk(i);
            b.push(ChunkId::of(&data), &compress(&data), data.len() as u32);
        }
        b.finish()
    }

    fn toc_of(bytes: &[u8]) -> Result<Vec<TocEntry>> {
        let size = bytes.len() as u64;
        let trailer = &bytes[bytes.len().saturating_sub(8)..];
        let tail = toc_tail_len(trailer, size, "p")?;
        parse_toc(&bytes[(size - tail) as usize..], size, "p")
    }

    #[test]
    fn pack_round_trip_is_deterministic_and_zstd_readable() {
        let pack = pack_of(5);
        assert_eq!(pack.id, PackId::of(&pack.bytes));
        assert_eq!(pack_of(5).bytes, pack.bytes, "same chunks, same bytes");
        assert_eq!(toc_of(&pack.bytes).unwrap(), pack.toc);
        // `zstd -d` sees the chunks concatenated (the TOC frame is skipped).
        let mut all = Vec::new();
        zstd::stream::copy_decode(&pack.bytes[..], &mut all).unwrap();
        let want: Vec<u8> = (0..5).flat_map(chunk).collect();
        assert_eq!(all, want);
        for e in &pack.toc {
            let frame = &pack.bytes[e.offset as usize..(e.offset + u64::from(e.clen)) as usize];
            crate::chunk::decompress_verified(e.id, frame, e.len, "t").unwrap();
        }
        // An empty pack is valid too.
        assert!(toc_of(&PackBuilder::new().finish().bytes)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn hostile_packs_are_refused_without_panicking() {
        let pack = pack_of(4);
        let good = &pack.bytes;
        // Every truncation.
        for cut in 1..good.len() {
            assert!(toc_of(&good[..cut]).is_err(), "truncated to {cut}");
            assert!(toc_of(&good[cut..]).is_err(), "head cut by {cut}");
        }
        // Every bit flip in the tail (frames are covered by chunk verification).
        let tail = toc_tail_len(&good[good.len() - 8..], good.len() as u64, "p").unwrap();
        for at in good.len() - tail as usize..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[at] ^= 1 << bit;
                assert!(toc_of(&bad).is_err(), "flip at {at} bit {bit}");
            }
        }
        // A table whose checksum matches but whose records lie: rebuild with bad records.
        let forge = |edit: &dyn Fn(&mut Vec<TocEntry>)| {
            let mut toc = pack.toc.clone();
            edit(&mut toc);
            let frames = &good[..pack.toc.iter().map(|e| u64::from(e.clen)).sum::<u64>() as usize];
            let mut b = PackBuilder {
                bytes: frames.to_vec(),
                toc,
            };
            b.toc.shrink_to_fit();
            b.finish().bytes
        };
        type Edit = Box<dyn Fn(&mut Vec<TocEntry>)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("duplicate id", Box::new(|t| t[2].id = t[1].id)),
            ("overlap", Box::new(|t| t[1].offset -= 1)),
            ("gap", Box::new(|t| t[1].offset += 1)),
            ("past the end", Box::new(|t| t[3].clen += 1)),
            ("short", Box::new(|t| t[3].clen -= 1)),
            ("huge length", Box::new(|t| t[3].clen = u32::MAX)),
            ("huge offset", Box::new(|t| t[0].offset = u64::MAX)),
            ("zero length", Box::new(|t| t[0].clen = 0)),
            (
                "missing record",
                Box::new(|t| {
                    t.pop();
                }),
            ),
        ];
        for (what, edit) in cases {
            let err = toc_of(&forge(&*edit)).unwrap_err();
            assert!(matches!(err, Error::CorruptStore { .. }), "{what}: {err}");
            assert!(
                err.to_string().contains("invalid store file p"),
                "{what}: {err}"
            );
        }
        // A count that disagrees with the records, checksum recomputed.
        let mut bad = good.clone();
        let count_at = good.len() - tail as usize + 8 + 8;
        bad[count_at] ^= 1;
        let table_end = good.len() - 8 - 32;
        let table_start = good.len() - tail as usize + 8;
        let h = blake3::hash(&bad[table_start..table_end]);
        bad[table_end..table_end + 32].copy_from_slice(h.as_bytes());
        let err = toc_of(&bad).unwrap_err();
        assert!(err.to_string().contains("claims"), "{err}");
    }

    fn locations() -> Locations {
        Locations {
            root: [7; 32],
            packs: vec![PackId([1; 32]), PackId([2; 32])],
            records: (0..50)
                .map(|i| Location {
                    pack: i % 2,
                    offset: u64::from(i) * 1000,
                    clen: 900 + i,
                })
                .collect(),
        }
    }

    #[test]
    fn locations_round_trip() {
        let loc = locations();
        let bytes = loc.to_bytes();
        assert_eq!(bytes, loc.to_bytes(), "deterministic");
        assert_eq!(Locations::parse(&bytes, &[7; 32], 50, "l").unwrap(), loc);
        let empty = Locations {
            root: [1; 32],
            packs: vec![],
            records: vec![],
        };
        assert_eq!(
            Locations::parse(&empty.to_bytes(), &[1; 32], 0, "l").unwrap(),
            empty
        );
    }

    #[test]
    fn hostile_location_files_are_refused_without_panicking() {
        let loc = locations();
        let good = loc.to_bytes();
        for cut in 0..good.len() {
            assert!(Locations::parse(&good[..cut], &[7; 32], 50, "l").is_err());
        }
        // Every bit flip is refused, or (a flip in zstd framing that decodes to the same
        // records, which the checksum covers) parses to the very same locations.
        for at in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[at] ^= 1 << bit;
                match Locations::parse(&bad, &[7; 32], 50, "l") {
                    Err(e) => assert!(matches!(e, Error::CorruptStore { .. }), "{e}"),
                    Ok(same) => assert_eq!(same, loc, "flip at {at} bit {bit}"),
                }
            }
        }
        let err = Locations::parse(&good, &[8; 32], 50, "l").unwrap_err();
        assert!(err.to_string().contains("describes index"), "{err}");
        let err = Locations::parse(&good, &[7; 32], 49, "l").unwrap_err();
        assert!(err.to_string().contains("lists 50 chunks"), "{err}");
        // Well-formed files (checksums right) with impossible records.
        let forged = |edit: &dyn Fn(&mut Locations)| {
            let mut l = loc.clone();
            edit(&mut l);
            Locations::parse(&l.to_bytes(), &[7; 32], l.records.len(), "l")
        };
        let err = forged(&|l| l.records[3].pack = 2).unwrap_err();
        assert!(err.to_string().contains("pack number 2"), "{err}");
        let err = forged(&|l| {
            l.records[3].offset = u64::MAX;
        })
        .unwrap_err();
        assert!(err.to_string().contains("impossible frame"), "{err}");
        assert!(forged(&|l| l.records[0].clen = 0).is_err());
        // A pack count that claims more than the file holds.
        let mut bad = good.clone();
        bad[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = Locations::parse(&bad, &[7; 32], 50, "l").unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        // A record count far larger than the index: refused before decompressing.
        assert!(Locations::parse(&good, &[7; 32], 1 << 40, "l").is_err());
    }

    fn w(pack: u32, offset: u64, clen: u32) -> Want {
        Want { pack, offset, clen }
    }

    #[test]
    fn planner_coalesces_neighbours_within_bounds() {
        let wants = [
            w(0, 0, 100),
            w(0, 150, 100),   // gap 50: merged
            w(1, 0, 100),     // other pack
            w(0, 1000, 100),  // gap 750 > 500: own request
            w(0, 1100, 5000), // adjacent but would pass 2000 bytes? 1000..6100 = 5100: own
        ];
        let reqs = plan_requests(&wants, 500, 6000, u64::MAX);
        assert_eq!(
            reqs,
            vec![
                Request {
                    pack: 0,
                    offset: 0,
                    len: 250,
                    wants: vec![0, 1]
                },
                Request {
                    pack: 1,
                    offset: 0,
                    len: 100,
                    wants: vec![2]
                },
                Request {
                    pack: 0,
                    offset: 1000,
                    len: 5100,
                    wants: vec![3, 4]
                },
            ]
        );
        let reqs = plan_requests(&wants, 500, 2000, u64::MAX);
        assert_eq!(reqs.len(), 4, "{reqs:?}");
        assert_eq!(reqs[3].wants, vec![4]);
        assert_eq!(
            reqs[3].len, 5000,
            "a frame larger than the bound gets its own"
        );
        // Wanted out of pack order: sorted by offset inside a request, requests by need.
        let wants = [w(0, 300, 100), w(0, 0, 100), w(0, 100, 100)];
        let reqs = plan_requests(&wants, 0, 1 << 20, u64::MAX);
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].wants, vec![0]);
        assert_eq!(reqs[1].wants, vec![1, 2]);
        // Segments keep far-apart needs in separate requests.
        let wants: Vec<Want> = (0..10).map(|i| w(0, i * 100, 100)).collect();
        let reqs = plan_requests(&wants, 0, 1 << 20, 300);
        assert_eq!(reqs.len(), 4);
        assert!(reqs.iter().all(|r| r.len <= 300));
    }

    #[test]
    fn planner_covers_every_want_once_even_for_hostile_values() {
        let wants = [
            w(3, u64::MAX - 10, u32::MAX),
            w(3, u64::MAX - 10, u32::MAX),
            w(0, 5, 10),
            w(0, 5, 10),
            w(0, 0, 100),
            w(u32::MAX, 0, 1),
        ];
        let reqs = plan_requests(&wants, u64::MAX, u64::MAX, 0);
        let mut covered: Vec<usize> = reqs.iter().flat_map(|r| r.wants.clone()).collect();
        covered.sort_unstable();
        assert_eq!(covered, (0..wants.len()).collect::<Vec<_>>());
        for r in &reqs {
            for &i in &r.wants {
                assert!(wants[i].offset >= r.offset);
                assert!(
                    wants[i].offset.saturating_add(u64::from(wants[i].clen)) <= r.offset + r.len
                );
            }
        }
        let reqs = plan_requests(&wants, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(
            reqs.iter().map(|r| r.wants.len()).sum::<usize>(),
            wants.len()
        );
        assert!(plan_requests(&[], 1, 1, 1).is_empty());
    }
}
