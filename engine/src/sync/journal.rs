//! The resume journal: the plan of an in-place sync and how far it durably got.
//!
//! Written before the first write to the target and removed after the final check, the
//! journal lets a sync killed at any instant be resumed by running the same command again:
//! the rerun finds the journal, checks that it belongs to the same image, target, seeds
//! and scratch size (its *identity*), and continues the stored plan from the last
//! checkpoint instead of scanning and planning afresh. Layout (little-endian, see
//! `docs/SYNC.md`):
//!
//! ```text
//! header   magic "TESSJNL\0" | version u32 = 1 | flags u32 = 0 | identity [32]
//!          | plan length u64 | plan | BLAKE3 of everything before [32]
//! records  32 bytes each: tag u8 = 1 | 3 zero bytes | next phase u32 | record number u32
//!          | 4 zero bytes | first 16 bytes of BLAKE3-keyed(identity, first 16 bytes
//!          | header checksum)
//! ```
//!
//! A checkpoint record `n` says that phases `0..n` are durable on the target: it is
//! appended and flushed only after the target was flushed. A torn or stale tail fails its
//! MAC and ends the list; the journal is cut back to its valid prefix before anything is
//! appended, so leftover bytes are never read as records.

use std::io;
use std::path::{Path, PathBuf};

use super::fs::{
    create_dir_durably, is_errno, is_io_kind, remove_temp_debris, temp_path, Fs, FsFile, RealFs,
};
use super::io::{ReadAt, WriteAt};
use super::plan::{Op, Phase, Source, Stash};
use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::index::Index;

const MAGIC: [u8; 8] = *b"TESSJNL\0";
const VERSION: u32 = 1;
const PLAN_AT: usize = 56;
const RECORD_LEN: usize = 32;
const TAG_CHECKPOINT: u8 = 1;

/// Storage of a journal: a small file that must survive power cuts once synced.
///
/// [`FileJournal`] is the real one; tests supply fault-injecting ones.
pub trait JournalIo: Send {
    /// Where the journal is, for messages.
    fn location(&self) -> String;
    /// The journal's bytes; empty when it does not exist.
    ///
    /// # Errors
    /// I/O errors other than "not found".
    fn load(&mut self) -> Result<Vec<u8>>;
    /// Writes `bytes` at `offset`, creating the journal if needed.
    ///
    /// # Errors
    /// I/O errors.
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()>;
    /// Cuts or extends the journal to `len` bytes.
    ///
    /// # Errors
    /// I/O errors.
    fn set_len(&mut self, len: u64) -> Result<()>;
    /// Makes everything written so far durable, including the journal's existence.
    ///
    /// # Errors
    /// I/O errors.
    fn sync(&mut self) -> Result<()>;
    /// Deletes the journal (durably); nothing happens when it does not exist.
    ///
    /// # Errors
    /// I/O errors.
    fn remove(&mut self) -> Result<()>;
    /// Replaces the journal with `bytes`, atomically and durably: after a crash it holds
    /// either what it held before or exactly `bytes`, never a prefix or a mix.
    ///
    /// # Errors
    /// I/O errors.
    fn replace(&mut self, bytes: &[u8]) -> Result<()>;
}

/// A journal in a file, on the file system `F` (the real one by default).
///
/// The file is never reached through a symbolic link (`O_NOFOLLOW`: a link at its path is
/// an error), and an existing file that is not a journal (it is neither empty nor starts
/// with the magic) is refused, never overwritten. A journal owned by another user is
/// never resumed or written into: it is replaced by a new one of ours. A new journal is written whole under a
/// temporary name (`O_EXCL|O_NOFOLLOW`, mode 0600, random suffix), synced and renamed into
/// place ([`JournalIo::replace`]), so the file at the journal's path always starts with a
/// complete header.
#[derive(Debug)]
pub struct FileJournal<'a, F: Fs = RealFs> {
    fs: &'a F,
    path: PathBuf,
    file: Option<F::File>,
    created: bool,
    /// [`JournalIo::load`] found the path free or holding a journal.
    checked: bool,
}

impl FileJournal<'static> {
    /// A journal at `path` (nothing is opened or created yet).
    pub fn new(path: impl Into<PathBuf>) -> FileJournal<'static> {
        FileJournal::with_fs(&RealFs, path)
    }
}

impl<'a, F: Fs> FileJournal<'a, F> {
    /// A journal at `path` on `fs` (nothing is opened or created yet).
    pub fn with_fs(fs: &'a F, path: impl Into<PathBuf>) -> FileJournal<'a, F> {
        FileJournal {
            fs,
            path: path.into(),
            file: None,
            created: false,
            checked: false,
        }
    }

    fn dir(&self) -> PathBuf {
        match self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => d.to_path_buf(),
            None => PathBuf::from("."),
        }
    }

    fn write_temp(&self, tmp: &Path, bytes: &[u8]) -> Result<F::File> {
        let f = self.fs.create_new(tmp, 0o600)?;
        f.write_all_at(bytes, 0)?;
        f.sync_all()?;
        Ok(f)
    }

    /// The open journal, created (exclusively) if it does not exist yet.
    fn file(&mut self) -> Result<&F::File> {
        if self.file.is_none() {
            create_dir_durably(self.fs, &self.dir())?;
            let f = self.fs.create_new(&self.path, 0o600).map_err(|e| {
                if is_io_kind(&e, io::ErrorKind::AlreadyExists) {
                    Error::InvalidInput(format!(
                        "journal {} appeared while tessera was creating it; refusing to \
                         overwrite it",
                        self.path.display()
                    ))
                } else {
                    e
                }
            })?;
            self.file = Some(f);
            self.created = true;
        }
        Ok(self.file.as_ref().expect("just opened"))
    }
}

/// Whether `head` (the first bytes of an existing file) may be a journal: it starts with
/// (a prefix of) the magic, or the file is empty.
fn may_be_journal(head: &[u8]) -> bool {
    let n = head.len().min(MAGIC.len());
    head[..n] == MAGIC[..n]
}

impl<F: Fs> JournalIo for FileJournal<'_, F> {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&mut self) -> Result<Vec<u8>> {
        self.file = None;
        self.checked = false;
        let f = match self.fs.open_rw_nofollow(&self.path) {
            Ok(f) => f,
            Err(e) if is_io_kind(&e, io::ErrorKind::NotFound) => {
                self.checked = true;
                return Ok(Vec::new());
            }
            Err(e) if is_errno(&e, libc::ELOOP) => {
                return Err(Error::InvalidInput(format!(
                    "journal {} is a symbolic link: refusing to follow it (remove it, or \
                     name another journal)",
                    self.path.display()
                )))
            }
            Err(e) => return Err(e),
        };
        if f.kind() != DeviceKind::File {
            return Err(Error::InvalidInput(format!(
                "journal {} is not a regular file",
                self.path.display()
            )));
        }
        let len = usize::try_from(f.size()).map_err(|_| {
            Error::InvalidInput(format!("journal {} is too large", self.path.display()))
        })?;
        let mut head = vec![0u8; len.min(MAGIC.len())];
        f.read_exact_at(&mut head, 0)?;
        if !may_be_journal(&head) {
            return Err(Error::InvalidInput(format!(
                "{} is not a tessera journal: refusing to overwrite it (remove it, or name \
                 another journal)",
                self.path.display()
            )));
        }
        self.checked = true;
        if f.owner().is_some_and(|uid| uid != crate::sys::euid()) {
            // Someone else's file (planted in a directory others may write, say): never
            // resumed or appended to. A fresh plan replaces it with a journal of ours.
            return Ok(Vec::new());
        }
        let mut bytes = vec![0u8; len];
        f.read_exact_at(&mut bytes, 0)?;
        self.file = Some(f);
        Ok(bytes)
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.file()?.write_all_at(bytes, offset)
    }

    fn set_len(&mut self, len: u64) -> Result<()> {
        self.file()?.set_len(len)
    }

    fn sync(&mut self) -> Result<()> {
        self.file()?.sync_all()?;
        if self.created {
            self.fs.sync_dir(&self.dir())?;
            self.created = false;
        }
        Ok(())
    }

    fn remove(&mut self) -> Result<()> {
        self.file = None;
        match self.fs.remove_file(&self.path) {
            Ok(()) => self.fs.sync_dir(&self.dir()),
            Err(e) if is_io_kind(&e, io::ErrorKind::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn replace(&mut self, bytes: &[u8]) -> Result<()> {
        if !self.checked {
            // Never replace what was not seen to be a journal.
            self.load()?;
        }
        let dir = self.dir();
        create_dir_durably(self.fs, &dir)?;
        remove_temp_debris(self.fs, &self.path);
        let tmp = temp_path(&self.path)?;
        let mut f = self.write_temp(&tmp, bytes).inspect_err(|_| {
            let _ = self.fs.remove_file(&tmp);
        })?;
        // The old journal (checked to be one by `load`) makes way; a crash from here to
        // the directory sync leaves the old journal or none, and the target unwritten.
        self.file = None;
        let moved = match self.fs.remove_file(&self.path) {
            Err(e) if !is_io_kind(&e, io::ErrorKind::NotFound) => Err(e),
            _ => self.fs.rename_noreplace(&tmp, &self.path),
        };
        if let Err(e) = moved {
            let _ = self.fs.remove_file(&tmp);
            return Err(e);
        }
        f.renamed(&self.path);
        self.fs.sync_dir(&dir)?;
        self.file = Some(f);
        self.created = false;
        Ok(())
    }
}

/// A journal being written.
pub(crate) struct Journal<'a> {
    io: &'a mut dyn JournalIo,
    identity: [u8; 32],
    header_sum: [u8; 32],
    end: u64,
    records: u32,
}

/// What a matching journal says: the plan and the first phase not known to be durable.
#[derive(Debug)]
pub(crate) struct Resume {
    pub phases: Vec<Phase>,
    pub next_phase: usize,
}

impl<'a> Journal<'a> {
    /// Reads the journal in `io`. Returns the stored plan and checkpoint when the journal
    /// belongs to `identity` (the image, target, seeds and settings of this sync) and is
    /// intact; anything else (no journal, another sync's, a corrupted one) gives `None` and
    /// is overwritten by [`Journal::start`].
    pub fn open(
        io: &'a mut dyn JournalIo,
        identity: [u8; 32],
        index: &Index,
        seeds: usize,
    ) -> Result<(Journal<'a>, Option<Resume>)> {
        let bytes = io.load()?;
        let mut journal = Journal {
            io,
            identity,
            header_sum: [0; 32],
            end: 0,
            records: 0,
        };
        let Some((phases, header_len)) = parse_header(&bytes, &identity, index, seeds) else {
            return Ok((journal, None));
        };
        journal.header_sum = bytes[header_len - 32..header_len]
            .try_into()
            .expect("32 bytes");
        let mut next_phase = 0usize;
        let mut at = header_len;
        while let Some(rec) = bytes.get(at..at + RECORD_LEN) {
            match journal.parse_record(rec) {
                Some(n) if n >= next_phase && n <= phases.len() => next_phase = n,
                _ => break,
            }
            journal.records += 1;
            at += RECORD_LEN;
        }
        journal.end = at as u64;
        Ok((journal, Some(Resume { phases, next_phase })))
    }

    /// Cuts a resumed journal back to its valid records, so that appends follow them.
    pub fn truncate_tail(&mut self) -> Result<()> {
        self.io.set_len(self.end)?;
        self.io.sync()
    }

    /// Starts a new journal for `phases` (replacing any other), durably.
    pub fn start(&mut self, phases: &[Phase]) -> Result<()> {
        let plan = encode_plan(phases);
        let mut header = Vec::with_capacity(PLAN_AT + plan.len() + 32);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&self.identity);
        header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
        header.extend_from_slice(&plan);
        self.header_sum = *blake3::hash(&header).as_bytes();
        header.extend_from_slice(&self.header_sum);
        // Whole or not at all: never an old journal's records behind a new header, never a
        // torn header at the journal's path.
        self.io.replace(&header)?;
        self.end = header.len() as u64;
        self.records = 0;
        Ok(())
    }

    /// Records durably that phases `0..next_phase` are on the target. Call only after the
    /// target was flushed.
    pub fn checkpoint(&mut self, next_phase: usize) -> Result<()> {
        let mut rec = [0u8; RECORD_LEN];
        rec[0] = TAG_CHECKPOINT;
        rec[4..8].copy_from_slice(&(next_phase as u32).to_le_bytes());
        rec[8..12].copy_from_slice(&self.records.to_le_bytes());
        let mac = self.mac(&rec[..16]);
        rec[16..].copy_from_slice(&mac);
        self.io.write_at(self.end, &rec)?;
        self.io.sync()?;
        self.end += RECORD_LEN as u64;
        self.records += 1;
        Ok(())
    }

    /// Deletes the journal: the sync is complete and verified.
    pub fn finish(self) -> Result<()> {
        self.io.remove()
    }

    fn mac(&self, body: &[u8]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.identity);
        h.update(body);
        h.update(&self.header_sum);
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }

    fn parse_record(&self, rec: &[u8]) -> Option<usize> {
        let u32_at = |o: usize| u32::from_le_bytes(rec[o..o + 4].try_into().expect("4 bytes"));
        let ok = rec[0] == TAG_CHECKPOINT
            && rec[1..4] == [0, 0, 0]
            && u32_at(8) == self.records
            && rec[12..16] == [0, 0, 0, 0]
            && self.mac(&rec[..16]) == rec[16..];
        ok.then(|| u32_at(4) as usize)
    }
}

fn parse_header(
    bytes: &[u8],
    identity: &[u8; 32],
    index: &Index,
    seeds: usize,
) -> Option<(Vec<Phase>, usize)> {
    if bytes.len() < PLAN_AT + 32 || bytes[..8] != MAGIC {
        return None;
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    let flags = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
    if version != VERSION || flags != 0 || bytes[16..48] != identity[..] {
        return None;
    }
    let plan_len = usize::try_from(u64::from_le_bytes(bytes[48..56].try_into().ok()?)).ok()?;
    let sum_at = PLAN_AT.checked_add(plan_len)?;
    let header_len = sum_at.checked_add(32)?;
    if bytes.len() < header_len
        || blake3::hash(&bytes[..sum_at]).as_bytes()[..] != bytes[sum_at..header_len]
    {
        return None;
    }
    let phases = decode_plan(&bytes[PLAN_AT..sum_at], index, seeds)?;
    Some((phases, header_len))
}

/// Encodes phases compactly: chunk ids and lengths are not stored, the index has them.
pub(crate) fn encode_plan(phases: &[Phase]) -> Vec<u8> {
    let mut out = Vec::new();
    let u32s = |out: &mut Vec<u8>, v: usize| out.extend_from_slice(&(v as u32).to_le_bytes());
    u32s(&mut out, phases.len());
    for phase in phases {
        u32s(&mut out, phase.stash.len());
        for s in &phase.stash {
            out.extend_from_slice(&s.chunk.to_le_bytes());
            out.extend_from_slice(&s.offset.to_le_bytes());
        }
        u32s(&mut out, phase.ops.len());
        for op in &phase.ops {
            match op.source {
                Source::Zero => out.push(0),
                Source::Store => out.push(1),
                Source::Seed { seed, offset } => {
                    out.push(2);
                    out.extend_from_slice(&seed.to_le_bytes());
                    out.extend_from_slice(&offset.to_le_bytes());
                }
                Source::Target { offset } => {
                    out.push(3);
                    out.extend_from_slice(&offset.to_le_bytes());
                }
                Source::Scratch { chunk } => {
                    out.push(4);
                    out.extend_from_slice(&chunk.to_le_bytes());
                }
            }
            u32s(&mut out, op.chunks.len());
            for c in &op.chunks {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_at_checked(N)?;
        self.0 = rest;
        head.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    /// A count of items of at least `item_len` bytes each, refused when the rest of the
    /// input could not hold them (so nothing is allocated from a hostile count).
    fn count(&mut self, item_len: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.checked_mul(item_len)? <= self.0.len()).then_some(n)
    }
}

/// Decodes what [`encode_plan`] wrote, checking every reference against the index.
pub(crate) fn decode_plan(bytes: &[u8], index: &Index, seeds: usize) -> Option<Vec<Phase>> {
    let chunks = index.chunks();
    let chunk = |c: u32| chunks.get(c as usize);
    let mut r = Reader(bytes);
    let phases_len = r.count(8)?;
    let mut phases = Vec::with_capacity(phases_len);
    for _ in 0..phases_len {
        let stash_len = r.count(12)?;
        let mut stash = Vec::with_capacity(stash_len);
        for _ in 0..stash_len {
            let s = Stash {
                chunk: r.u32()?,
                offset: r.u64()?,
            };
            chunk(s.chunk)?;
            stash.push(s);
        }
        let ops_len = r.count(5)?;
        let mut ops = Vec::with_capacity(ops_len);
        for _ in 0..ops_len {
            let source = match r.u8()? {
                0 => Source::Zero,
                1 => Source::Store,
                2 => Source::Seed {
                    seed: r.u16()?,
                    offset: r.u64()?,
                },
                3 => Source::Target { offset: r.u64()? },
                4 => Source::Scratch { chunk: r.u32()? },
                _ => return None,
            };
            let n = r.count(4)?;
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                list.push(r.u32()?);
            }
            let first = chunk(*list.first()?)?;
            if list
                .iter()
                .any(|&c| chunk(c).map(|e| e.id) != Some(first.id))
            {
                return None;
            }
            match source {
                Source::Seed { seed, .. } if usize::from(seed) >= seeds => return None,
                Source::Scratch { chunk } if list != [chunk] => return None,
                _ => {}
            }
            ops.push(Op {
                id: first.id,
                len: first.len,
                source,
                chunks: list,
            });
        }
        phases.push(Phase { stash, ops });
    }
    r.0.is_empty().then_some(phases)
}

/// A journal held in memory: for tests and for callers that persist it themselves.
/// Its bytes are the journal file's.
#[derive(Debug, Default, Clone)]
pub struct MemoryJournal(pub Vec<u8>);

impl JournalIo for MemoryJournal {
    fn location(&self) -> String {
        "memory journal".into()
    }
    fn load(&mut self) -> Result<Vec<u8>> {
        Ok(self.0.clone())
    }
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let end = offset as usize + bytes.len();
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[offset as usize..end].copy_from_slice(bytes);
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> Result<()> {
        self.0.resize(len as usize, 0);
        Ok(())
    }
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
    fn remove(&mut self) -> Result<()> {
        self.0.clear();
        Ok(())
    }
    fn replace(&mut self, bytes: &[u8]) -> Result<()> {
        self.0 = bytes.to_vec();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::plan::{plan, Holder, Holdings, InPlace, Location};
    use crate::{ChunkId, ChunkerParams};

    fn sample() -> (Index, Vec<Phase>) {
        let p = ChunkerParams::new(64, 256, 1024).unwrap();
        let ids: Vec<ChunkId> = (0u32..6).map(|n| ChunkId::of(&n.to_le_bytes())).collect();
        let idx = Index::new(p, [0; 32], ids.iter().map(|&id| (id, 100))).unwrap();
        // The target holds the image rotated by one chunk, a seed holds chunk 5.
        let mut h = Holdings {
            in_place: vec![InPlace::No; 6],
            ..Holdings::default()
        };
        for (i, id) in ids.iter().enumerate().take(5) {
            let loc = Location {
                holder: Holder::Target,
                offset: ((i as u64 + 1) % 6) * 100,
                verified: true,
            };
            h.locations.insert(*id, vec![loc]);
        }
        h.locations.insert(
            ids[5],
            vec![Location {
                holder: Holder::Seed(0),
                offset: 7,
                verified: false,
            }],
        );
        let plan = plan(&idx, &h, 150);
        (idx, plan.phases)
    }

    #[test]
    fn plan_round_trips_and_checkpoints_survive_reopen() {
        let (idx, phases) = sample();
        assert!(phases.len() > 1);
        assert_eq!(decode_plan(&encode_plan(&phases), &idx, 1).unwrap(), phases);
        let id = [9u8; 32];
        let mut mem = MemoryJournal::default();
        {
            let (mut j, resume) = Journal::open(&mut mem, id, &idx, 1).unwrap();
            assert!(resume.is_none());
            j.start(&phases).unwrap();
            j.checkpoint(1).unwrap();
            j.checkpoint(2).unwrap();
        }
        let (_, resume) = Journal::open(&mut mem, id, &idx, 1).unwrap();
        let resume = resume.unwrap();
        assert_eq!((resume.phases, resume.next_phase), (phases.clone(), 2));
        // Another identity, or fewer seeds than the plan uses: not this sync's journal.
        assert!(Journal::open(&mut mem, [8; 32], &idx, 1)
            .unwrap()
            .1
            .is_none());
        assert!(Journal::open(&mut mem, id, &idx, 0).unwrap().1.is_none());
    }

    #[test]
    fn torn_tails_and_damage_are_never_trusted() {
        let (idx, phases) = sample();
        let id = [1u8; 32];
        let mut mem = MemoryJournal::default();
        {
            let (mut j, _) = Journal::open(&mut mem, id, &idx, 1).unwrap();
            j.start(&phases).unwrap();
            j.checkpoint(1).unwrap();
            j.checkpoint(2).unwrap();
        }
        let full = mem.0.clone();
        let header_len = full.len() - 2 * RECORD_LEN;
        for cut in 0..full.len() {
            let mut m = MemoryJournal(full[..cut].to_vec());
            let (_, resume) = Journal::open(&mut m, id, &idx, 1).unwrap();
            let expect = match cut {
                c if c < header_len => None,
                c if c < header_len + RECORD_LEN => Some(0),
                c if c < header_len + 2 * RECORD_LEN => Some(1),
                _ => Some(2),
            };
            assert_eq!(resume.map(|r| r.next_phase), expect, "cut at {cut}");
        }
        for i in 0..full.len() {
            let mut m = MemoryJournal(full.clone());
            m.0[i] ^= 0x20;
            let (_, resume) = Journal::open(&mut m, id, &idx, 1).unwrap();
            // Damage in the header voids the journal; in a record, ends the list there.
            let expect = match i {
                i if i < header_len => None,
                i if i < header_len + RECORD_LEN => Some(0),
                _ => Some(1),
            };
            assert_eq!(
                resume.map(|r| r.next_phase),
                expect,
                "byte {i} damaged (header {header_len} bytes)"
            );
        }
        // A torn record followed by a new append: the leftover is cut first.
        let mut m = MemoryJournal(full[..header_len + RECORD_LEN + 10].to_vec());
        {
            let (mut j, resume) = Journal::open(&mut m, id, &idx, 1).unwrap();
            assert_eq!(resume.unwrap().next_phase, 1);
            j.truncate_tail().unwrap();
            j.checkpoint(2).unwrap();
        }
        let (_, resume) = Journal::open(&mut m, id, &idx, 1).unwrap();
        assert_eq!(resume.unwrap().next_phase, 2);
    }

    #[test]
    fn hostile_plans_are_refused_without_allocating() {
        let (idx, phases) = sample();
        let mut bytes = encode_plan(&phases);
        bytes[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_plan(&bytes, &idx, 1).is_none());
        let good = encode_plan(&phases);
        for cut in 0..good.len() {
            assert!(decode_plan(&good[..cut], &idx, 1).is_none());
        }
    }
}
