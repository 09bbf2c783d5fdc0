//! `sync`: turn a target (file or block device) into the image of an index, in place,
//! reusing what the target and any seeds already hold, safely against crashes.
//!
//! One run goes through five stages:
//! 1. **scan** (`seed.rs`): seeds without an index, and the target, are cut and hashed to
//!    find the image's chunks; the target's chunks already at their place are found too;
//! 2. **plan** ([`plan()`], `order.rs`): each chunk not in place gets a source (the target,
//!    a seed, the store, or zeros) and a phase, so that no write destroys a copy an
//!    unfinished write still needs; cycles go through a bounded scratch buffer or are
//!    fetched;
//! 3. **journal** (`journal.rs`): the plan is stored durably before the first write, with a
//!    checkpoint after every phase, so a killed run is resumed by running it again;
//! 4. **apply** ([`apply`]): phase by phase, reads and fetches are overlapped with
//!    coalesced writes, every byte hashed before it is written, then the target flushed;
//! 5. **final check**: every chunk this run did not hash at its place (in the scan or
//!    while writing) is read back and hashed; only then is the journal removed and success
//!    reported.
//!
//! `docs/SYNC.md` gives the design, the crash-safety argument and the journal format.

mod apply;
pub mod fs;
mod io;
mod journal;
pub mod memory;
mod order;
mod plan;
mod seed;
mod stream;
mod target;

use std::collections::{HashMap, HashSet};
use std::fs as stdfs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

pub use io::{ReadAt, WriteAt};
pub use journal::{FileJournal, JournalIo, MemoryJournal};
pub use plan::{
    plan, Holder, Holdings, InPlace, Location, Op, Phase, PlanTotals, Source, Stash, SyncPlan,
};
pub use stream::{sync_stream, StreamReport};
pub use target::{open_target, OpenTarget};

use self::fs::{is_io_kind, Fs, FsFile, RealFs};
use apply::Executor;
use io::{Absent, Padded, TargetRead};
use journal::Journal;
use seed::{Found, ScanSource};

use crate::device::{check_target_size, DeviceKind};
use crate::error::{Error, Result};
use crate::index::{hex, Index};
use crate::progress::Progress;
use crate::store::{ChunkStore, Estimate};
use crate::ChunkId;

/// Default bound of the scratch buffer that breaks move cycles: 16 MiB (a quarter of the
/// default memory budget, [`memory::DEFAULT_MAX_MEMORY`]).
pub const DEFAULT_SCRATCH_SIZE: u64 = 16 << 20;

/// A seed: a file or block device that may hold chunks of the image.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    /// The seed's path.
    pub path: PathBuf,
    /// What the seed holds, when known: it is then not scanned, and each chunk is hashed
    /// when read. When `path` is the target, this is the target's current index.
    pub index: Option<Index>,
}

/// Options of [`sync_with`].
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Seeds besides the target (the target is always one). Default: none.
    pub seeds: Vec<SeedSpec>,
    /// The resume journal. Default (`None`): [`default_journal_path`] of the target.
    pub journal: Option<PathBuf>,
    /// Plan and report, but change nothing (no target is created, no journal written).
    /// Default: false.
    pub dry_run: bool,
    /// Most bytes held in scratch at once to break move cycles; a cycle that does not fit
    /// is broken by fetching. Default: [`DEFAULT_SCRATCH_SIZE`].
    pub scratch_size: u64,
    /// Threads reading, hashing and scanning. Default: the number of CPUs, at least 2.
    pub workers: usize,
    /// Write into a block device even while it is mounted or claimed by the kernel
    /// (device-mapper, RAID, swap): it is then not opened with `O_EXCL`. Whatever uses it
    /// may overwrite the image, or be corrupted by it. Default: false.
    pub force: bool,
    /// Refuse the sync, before the target is created or opened for writing and before any
    /// journal is written, when its plan needs to download more than this many compressed
    /// bytes from the store ([`SyncReport::bytes_downloaded`] of a dry run, computed first;
    /// the target and seeds are then scanned twice). Default: no limit.
    pub max_download: Option<u64>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            seeds: Vec::new(),
            journal: None,
            dry_run: false,
            scratch_size: DEFAULT_SCRATCH_SIZE,
            workers: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .max(2),
            force: false,
            max_download: None,
        }
    }
}

/// What a sync did (or, for a dry run, would do). Byte counts are of image bytes:
/// `bytes_in_place + bytes_from_seeds + bytes_moved + bytes_fetched + bytes_duplicated +
/// bytes_zero` is the image size, except that fallbacks (a copy that failed its hash and
/// was fetched instead) make `bytes_fetched` count the chunk where it came from.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SyncReport {
    /// Bytes in the image.
    pub image_size: u64,
    /// Bytes the target already held at their place (not written).
    pub bytes_in_place: u64,
    /// Bytes copied from seeds.
    pub bytes_from_seeds: u64,
    /// Bytes copied from elsewhere in the target (moves, through scratch or not).
    pub bytes_moved: u64,
    /// Uncompressed bytes fetched from the store.
    pub bytes_fetched: u64,
    /// Bytes read from the store: chunk frames, the gaps between frames that coalesced
    /// requests read through, and attempts that failed verification. For a dry run, what
    /// the plan's requests read ([`ChunkStore::estimate`]): exactly what the sync then
    /// downloads unless a copy fails its hash or a download its verification (or, when an
    /// interrupted sync is resumed, at most that).
    pub bytes_downloaded: u64,
    /// Requests made to the store (one per coalesced range request, plus refetches); for
    /// a dry run, the plan's.
    pub requests: u64,
    /// Chunks fetched from the store.
    pub chunks_fetched: u64,
    /// Bytes written as further copies of a chunk obtained once for several places.
    pub bytes_duplicated: u64,
    /// Bytes of zero chunks written (holes on files).
    pub bytes_zero: u64,
    /// Bytes written to the target (holes included).
    pub bytes_written: u64,
    /// Bytes read into scratch to break move cycles.
    pub bytes_stashed: u64,
    /// Bytes read back and hashed by the final check (and, on resume, before writing).
    pub bytes_checked: u64,
    /// Chunks found wrong by the final check and written again.
    pub chunks_repaired: u64,
    /// Chunks whose planned source did not hash to their id, taken from elsewhere.
    pub fallbacks: u64,
    /// Phases of the plan run (each ends with a flush and a checkpoint).
    pub phases: u64,
    /// A journal of an interrupted run of this sync was picked up.
    pub resumed: bool,
    /// Nothing was changed: the counts are the plan's.
    pub dry_run: bool,
}

/// Writes the image of `index` into `target` from `store` with default options (the
/// target is its own seed), then verifies it.
///
/// # Errors
/// As [`sync_with`].
pub fn sync(
    index: &Index,
    target: &Path,
    store: &dyn ChunkStore,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    sync_with(index, target, store, &SyncOptions::default(), progress)
}

/// Where the journal of a sync into `target` lives by default: beside a regular file (a
/// hidden `.NAME.tessera-journal`), and for a block device under the state directory
/// (`$TESSERA_STATE_DIR`, else `$XDG_STATE_HOME/tessera`, else `~/.local/state/tessera`,
/// else `/var/lib/tessera`) in `journal/`, named after the device path. That directory is
/// created with mode 0700 and must be a real directory owned by this user and writable by
/// no one else, or [`sync_with`] refuses to run.
pub fn default_journal_path(target: &Path) -> PathBuf {
    let is_block = stdfs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    if !is_block {
        let name = target
            .file_name()
            .map_or_else(|| "target".into(), |n| n.to_string_lossy().into_owned());
        return target.with_file_name(format!(".{name}.tessera-journal"));
    }
    let canonical = stdfs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let shown: String = canonical
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let tag = &blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex()[..8];
    state_dir()
        .join("journal")
        .join(format!("{shown}-{tag}.tessera-journal"))
}

/// tessera's state directory: `$TESSERA_STATE_DIR`, else `$XDG_STATE_HOME/tessera`, else
/// `~/.local/state/tessera`, else `/var/lib/tessera`.
pub fn state_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("TESSERA_STATE_DIR")
        .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("tessera")))
        .or_else(|| env("HOME").map(|d| d.join(".local/state/tessera")))
        .unwrap_or_else(|| PathBuf::from("/var/lib/tessera"))
}

/// Refuses a directory of tessera's state (`what`: "journal directory", ...) that others
/// could change: it must be a directory itself (not a symbolic link), owned by this user,
/// and writable by no one else. A missing one is fine (nothing is created by a dry run).
/// `remedy` ends the error message.
///
/// # Errors
/// [`Error::InvalidInput`] saying what is wrong; [`Error::Io`] if it cannot be inspected.
pub fn check_private_dir(dir: &Path, what: &str, remedy: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = match stdfs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("inspecting", dir, e)),
    };
    let euid = crate::sys::euid();
    let found = if m.file_type().is_symlink() {
        Some("a symbolic link".to_string())
    } else if !m.is_dir() {
        Some("not a directory".to_string())
    } else if m.uid() != euid {
        Some(format!("owned by uid {}", m.uid()))
    } else if m.mode() & 0o022 != 0 {
        Some(format!("mode {:o}, writable by others", m.mode() & 0o7777))
    } else {
        None
    };
    match found {
        None => Ok(()),
        Some(found) => Err(Error::InvalidInput(format!(
            "{what} {} is {found}: it must be a real directory owned by uid {euid} and \
             writable by no one else, since whoever can change it can replace what is in \
             it ({remedy})",
            dir.display()
        ))),
    }
}

/// Identity of an open file or device across runs: path, inode (or device number), size.
fn device_identity(path: &Path, dev: &dyn FsFile) -> String {
    let canonical = stdfs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let node = match dev.node() {
        (u64::MAX, rdev) => format!("block {rdev:#x}"),
        (dev, ino) => format!("file {dev:#x}:{ino}"),
    };
    format!("{} {node} size {}", canonical.display(), dev.size())
}

/// Writes the image of `index` into `target` (created if missing), reusing what the
/// target and `opts.seeds` hold and fetching the rest from `store`; resumes an
/// interrupted run of the same sync from its journal. Returns only after every chunk of
/// the target was hashed against the index.
///
/// A missing file target is created durably at the image size before anything else is
/// written (temporary name, size, fsync, rename, fsync of the directory); a file shorter
/// than the image is grown. A block device is opened with `O_EXCL` (unless
/// [`SyncOptions::force`]), so one that is mounted or claimed by the kernel is refused.
///
/// # Errors
/// [`Error::InvalidInput`] if a block device is too small, mounted or claimed (the error
/// names its mount point; nothing is written then), if the journal path is a symbolic
/// link or a file that is not a journal, or a seed is unusable;
/// [`Error::MissingChunk`] / [`Error::CorruptChunk`] for a chunk no source has intact;
/// I/O errors; [`Error::VerifyFailed`] if the final check fails. After an error, running
/// the same sync again resumes it.
pub fn sync_with(
    index: &Index,
    target: &Path,
    store: &dyn ChunkStore,
    opts: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    sync_with_fs(&RealFs, index, target, store, opts, progress)
}

/// [`sync_with`] on the file system `fs`: every file-system operation of the run (target
/// creation, sizing, renames, syncs, seeds, journal) goes through it. Tests put a
/// file system that loses what was not synced at a simulated power cut behind it.
///
/// # Errors
/// As [`sync_with`].
pub fn sync_with_fs<F: Fs>(
    fs: &F,
    index: &Index,
    target: &Path,
    store: &dyn ChunkStore,
    opts: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    if let (Some(max), false) = (opts.max_download, opts.dry_run) {
        let dry = SyncOptions {
            dry_run: true,
            max_download: None,
            ..opts.clone()
        };
        let planned = sync_with_fs(fs, index, target, store, &dry, progress)?;
        if planned.bytes_downloaded > max {
            return Err(Error::InvalidInput(format!(
                "syncing {} would download {} bytes in {} requests from {}, more than the \
                 limit of {max} bytes: nothing was changed",
                target.display(),
                planned.bytes_downloaded,
                planned.requests,
                store.location()
            )));
        }
    }
    let image_size = index.image_size();
    let (device, fresh) = if opts.dry_run {
        match fs.open_read(target) {
            Ok(d) => (Some(d), false),
            Err(e) if is_io_kind(&e, std::io::ErrorKind::NotFound) => (None, true),
            Err(e) => return Err(e),
        }
    } else {
        let t = open_target(fs, target, image_size, !opts.force)?;
        (Some(t.file), t.fresh)
    };
    let absent = Absent(image_size);
    // A dry run sees a short file as the sync would make it: grown with zeros (a block
    // device keeps its size, and is refused below if too small).
    let padded = device.as_ref().map(|d| Padded {
        inner: d,
        size: match d.kind() {
            DeviceKind::File => d.size().max(image_size),
            DeviceKind::BlockDevice => d.size(),
        },
    });
    let (target_io, target_id): (&dyn WriteAt, String) = match (&device, &padded) {
        (Some(d), Some(p)) => {
            check_target_size(target.display(), d.kind(), p.size, image_size)?;
            let io: &dyn WriteAt = if opts.dry_run { p } else { d };
            (io, device_identity(target, d))
        }
        _ => (&absent, format!("{} (absent)", target.display())),
    };
    let target_key = device.as_ref().map(|d| d.node());

    let mut opened = Vec::new();
    let mut target_index = None;
    let mut seen = HashSet::new();
    for spec in &opts.seeds {
        let dev = fs.open_read(&spec.path)?;
        let key = dev.node();
        if Some(key) == target_key {
            // The target is always scanned; an index of it replaces the scan.
            if spec.index.is_some() {
                target_index = spec.index.as_ref();
            }
            continue;
        }
        if seen.insert(key) {
            let id = device_identity(&spec.path, &dev);
            opened.push((dev, id, spec.index.as_ref()));
        }
    }
    let seeds = opened
        .iter()
        .map(|(dev, id, index)| SeedIo {
            reader: dev,
            id: id.clone(),
            index: *index,
        })
        .collect();
    let journal_path = match &opts.journal {
        Some(p) => p.clone(),
        None => {
            let path = default_journal_path(target);
            if device
                .as_ref()
                .is_some_and(|d| d.kind() == DeviceKind::BlockDevice)
            {
                // The state directory's `journal/` is tessera's own: made private and
                // durable here, and refused if others could replace what is in it.
                let (dir, _) = self::fs::split_path(&path)?;
                if !opts.dry_run {
                    self::fs::create_dir_durably(fs, &dir)?;
                }
                check_private_dir(
                    &dir,
                    "journal directory",
                    "fix or remove it, or name a journal with --journal",
                )?;
            }
            path
        }
    };
    let mut journal = FileJournal::with_fs(fs, journal_path);
    let io = SyncIo {
        target: target_io,
        target_id,
        target_fresh: fresh,
        target_index,
        seeds,
        journal: Some(&mut journal),
        dry_run: opts.dry_run,
        scratch_size: opts.scratch_size,
        workers: opts.workers,
    };
    sync_io(index, io, store, progress)
}

/// A seed opened by the caller.
pub struct SeedIo<'a> {
    /// Its bytes.
    pub reader: &'a dyn ReadAt,
    /// What identifies it across runs (path, inode, size): part of the journal identity.
    pub id: String,
    /// What it holds, when known (then it is not scanned).
    pub index: Option<&'a Index>,
}

/// Everything a sync works on, opened by the caller: the lower-level entry point behind
/// [`sync_with`], which tests use to put fault-injecting devices and journals in.
pub struct SyncIo<'a> {
    /// The target.
    pub target: &'a dyn WriteAt,
    /// What identifies the target across runs: part of the journal identity.
    pub target_id: String,
    /// This run created the target (a file found at the start, even one a cut run
    /// created, is not fresh): it reads as zeros and is not scanned.
    pub target_fresh: bool,
    /// What the target holds, when known: it is then not scanned; chunks it claims are
    /// hashed when read and by the final check.
    pub target_index: Option<&'a Index>,
    /// The seeds besides the target.
    pub seeds: Vec<SeedIo<'a>>,
    /// The resume journal; `None` runs without one (a killed run then starts afresh).
    pub journal: Option<&'a mut dyn JournalIo>,
    /// Plan and report only.
    pub dry_run: bool,
    /// Scratch bound, as [`SyncOptions::scratch_size`].
    pub scratch_size: u64,
    /// Threads, as [`SyncOptions::workers`].
    pub workers: usize,
}

/// Runs a sync on devices opened by the caller: scans, plans and applies, or resumes
/// the plan of an interrupted run from `io.journal`. See [`sync_with`].
///
/// # Errors
/// As [`sync_with`].
pub fn sync_io(
    index: &Index,
    mut io: SyncIo<'_>,
    store: &dyn ChunkStore,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    check_size(index, io.target)?;
    memory::check_scratch(io.scratch_size)?;
    memory::apply_fetch_window();
    let identity = journal_identity(index, &io);
    let mut journal = None;
    let mut resume = None;
    if let Some(j) = io.journal.take() {
        let (j, r) = Journal::open(j, identity, index, io.seeds.len())?;
        journal = Some(j);
        resume = r;
    }
    if let Some(r) = resume {
        progress.resumed();
        let run = Run {
            phases: &r.phases,
            start: r.next_phase,
            resumed: true,
            verified: vec![false; index.chunks().len()],
            alternatives: &HashMap::new(),
        };
        return execute(index, &io, run, journal, store, progress);
    }
    let found = survey(index, &io, progress)?;
    progress.start("planning", 0);
    let plan = plan(index, &found.holdings(), io.scratch_size);
    let run = Run {
        phases: &plan.phases,
        start: 0,
        resumed: false,
        verified: found.in_place.clone(),
        alternatives: &found.locations,
    };
    execute(index, &io, run, journal, store, progress)
}

/// Executes `plan` (made by [`plan()`] for what the target holds now): a fresh journal is
/// started in `io.journal` if given; ends with the final check like [`sync_io`]. Nothing
/// is assumed about the target: every chunk `plan` does not write is hashed at the end.
///
/// # Errors
/// As [`sync_with`].
pub fn apply(
    index: &Index,
    plan: &SyncPlan,
    mut io: SyncIo<'_>,
    store: &dyn ChunkStore,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    check_size(index, io.target)?;
    memory::check_scratch(io.scratch_size)?;
    memory::apply_fetch_window();
    let identity = journal_identity(index, &io);
    let journal = match io.journal.take() {
        Some(j) => Some(Journal::open(j, identity, index, io.seeds.len())?.0),
        None => None,
    };
    let run = Run {
        phases: &plan.phases,
        start: 0,
        resumed: false,
        verified: vec![false; index.chunks().len()],
        alternatives: &HashMap::new(),
    };
    execute(index, &io, run, journal, store, progress)
}

fn check_size(index: &Index, target: &dyn WriteAt) -> Result<()> {
    check_target_size(
        target.name(),
        target.kind(),
        target.size(),
        index.image_size(),
    )
}

/// The phases to run and what is known before running them.
struct Run<'p> {
    phases: &'p [Phase],
    /// First phase not known to be durable.
    start: usize,
    resumed: bool,
    /// Chunks hashed at their place by this run's scan.
    verified: Vec<bool>,
    /// Copies known from the scan, for fallbacks.
    alternatives: &'p HashMap<ChunkId, Vec<Location>>,
}

fn execute(
    index: &Index,
    io: &SyncIo<'_>,
    run: Run<'_>,
    mut journal: Option<Journal<'_>>,
    store: &dyn ChunkStore,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    let Run {
        phases,
        start,
        resumed,
        verified,
        alternatives,
    } = run;
    let remaining = plan::totals(index, &phases[start..]);
    if io.dry_run {
        let mut download = Estimate::default();
        for phase in &phases[start..] {
            download += store.estimate(&apply::store_entries(index, &phase.ops))?;
        }
        return Ok(SyncReport {
            image_size: remaining.image_size,
            bytes_in_place: remaining.bytes_in_place,
            bytes_from_seeds: remaining.bytes_from_seeds,
            bytes_moved: remaining.bytes_moved,
            bytes_fetched: remaining.bytes_fetched,
            chunks_fetched: remaining.chunks_fetched,
            bytes_duplicated: remaining.bytes_duplicated,
            bytes_zero: remaining.bytes_zero,
            bytes_written: remaining.image_size - remaining.bytes_in_place,
            bytes_stashed: remaining.bytes_stashed,
            bytes_downloaded: download.bytes,
            requests: download.requests,
            phases: remaining.phases,
            resumed,
            dry_run: true,
            ..SyncReport::default()
        });
    }
    if let Some(j) = journal.as_mut() {
        if resumed {
            j.truncate_tail()?;
        } else if !phases.is_empty() {
            // Durable before the first write: a crash from here on is resumed.
            j.start(phases)?;
        }
    }
    let seed_readers: Vec<&dyn ReadAt> = io.seeds.iter().map(|s| s.reader).collect();
    let exec = Executor::new(
        index,
        io.target,
        &seed_readers,
        store,
        progress,
        io.workers,
        alternatives,
        verified,
    );
    let to_write = remaining.image_size - remaining.bytes_in_place;
    let written = |phases: &[Phase]| {
        let t = plan::totals(index, phases);
        t.image_size - t.bytes_in_place
    };
    if !resumed {
        progress.start("writing", to_write);
    }
    for p in start..phases.len() {
        if resumed && p == start {
            // The interrupted phase's destinations are hashed first; what they hold
            // already is not written again.
            let planned = written(&phases[start..=start]);
            progress.start("verifying", planned);
            let (phase, restash) = resume_phase(&exec, phases, start)?;
            let skipped = planned - written(std::slice::from_ref(&phase));
            progress.start("writing", to_write - skipped);
            exec.run_phase(&phase, &restash)?;
        } else {
            exec.run_phase(&phases[p], &[])?;
        }
        if let Some(j) = journal.as_mut() {
            j.checkpoint(p + 1)?;
        }
    }

    // Final check: every chunk this run did not hash at its place.
    let todo: Vec<u32> = (0..index.chunks().len() as u32)
        .filter(|&k| !exec.verified[k as usize].load(Ordering::Relaxed))
        .collect();
    progress.start(
        "verifying",
        todo.iter()
            .map(|&k| u64::from(index.chunks()[k as usize].len))
            .sum(),
    );
    let bad = exec.check(&todo)?;
    if !bad.is_empty() {
        exec.repair(&bad)?;
    }
    if let Some(k) = exec
        .verified
        .iter()
        .position(|v| !v.load(Ordering::Relaxed))
    {
        let c = &index.chunks()[k];
        return Err(Error::VerifyFailed(format!(
            "{} does not hold chunk {} at offset {} after the sync",
            io.target.name(),
            c.id,
            c.offset
        )));
    }
    if let Some(j) = journal {
        j.finish()?;
    }
    let c = &exec.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let written = get(&c.written);
    Ok(SyncReport {
        image_size: index.image_size(),
        bytes_in_place: index.image_size().saturating_sub(written),
        bytes_from_seeds: get(&c.from_seeds),
        bytes_moved: get(&c.moved),
        bytes_fetched: get(&c.fetched),
        bytes_downloaded: get(&c.downloaded),
        requests: get(&c.requests),
        chunks_fetched: get(&c.chunks_fetched),
        bytes_duplicated: get(&c.duplicated),
        bytes_zero: get(&c.zero),
        bytes_written: written,
        bytes_stashed: get(&c.stashed),
        bytes_checked: get(&c.checked),
        chunks_repaired: get(&c.repaired),
        fallbacks: get(&c.fallbacks),
        phases: (phases.len() - start) as u64,
        resumed,
        dry_run: false,
    })
}

/// Scans (or reads the indexes of) the target and seeds.
fn survey(index: &Index, io: &SyncIo<'_>, progress: &dyn Progress) -> Result<Found> {
    let (target, seeds, fresh) = (io.target, &io.seeds, io.target_fresh);
    let target_read = TargetRead(target);
    let mut sources = Vec::new();
    if !fresh && io.target_index.is_none() {
        // A file is the old image: scan all of it. A partition may be much larger than
        // any image written into it: scan the image's extent only.
        let len = match target.kind() {
            DeviceKind::File => target.size(),
            DeviceKind::BlockDevice => index.image_size(),
        };
        sources.push(ScanSource {
            holder: Holder::Target,
            reader: &target_read,
            len,
        });
    }
    for (n, s) in seeds.iter().enumerate() {
        if s.index.is_none() {
            sources.push(ScanSource {
                holder: Holder::Seed(n as u16),
                reader: s.reader,
                len: s.reader.size(),
            });
        }
    }
    let mut found = if sources.is_empty() {
        Found {
            in_place: vec![false; index.chunks().len()],
            ..Found::default()
        }
    } else {
        seed::scan(index, &sources, io.workers.max(1), progress)?
    };
    let mut assumed = vec![false; index.chunks().len()];
    if fresh {
        // A new file reads as zeros.
        for (a, c) in assumed.iter_mut().zip(index.chunks()) {
            *a = c.zero;
        }
    } else if let Some(ti) = io.target_index {
        assumed = seed::assumed_in_place(index, ti);
        seed::from_index(&mut found, index, Holder::Target, ti, target.size());
    }
    for (n, s) in seeds.iter().enumerate() {
        if let Some(si) = s.index {
            seed::from_index(
                &mut found,
                index,
                Holder::Seed(n as u16),
                si,
                s.reader.size(),
            );
        }
    }
    found.assumed = assumed;
    Ok(found)
}

/// The part of the resumed phase still to do: chunks the crashed run wrote durably are
/// found by hashing their places; stashes of earlier phases still needed are read again.
fn resume_phase(
    exec: &Executor<'_>,
    phases: &[Phase],
    start: usize,
) -> Result<(Phase, Vec<Stash>)> {
    let phase = &phases[start];
    let dests: Vec<u32> = phase
        .ops
        .iter()
        .flat_map(|op| op.chunks.iter().copied())
        .collect();
    let bad: HashSet<u32> = exec.check(&dests)?.into_iter().collect();
    let ops = phase
        .ops
        .iter()
        .filter_map(|op| {
            let chunks: Vec<u32> = op
                .chunks
                .iter()
                .copied()
                .filter(|k| bad.contains(k))
                .collect();
            (!chunks.is_empty()).then(|| Op {
                chunks,
                ..op.clone()
            })
        })
        .collect();
    // Stashes still needed: those whose write is not found done, of this phase and of
    // earlier ones (scratch was lost with the crashed process).
    let here: HashSet<u32> = dests.into_iter().collect();
    let needed: HashSet<u32> = phases[start..]
        .iter()
        .flat_map(|p| &p.ops)
        .filter_map(|op| match op.source {
            Source::Scratch { chunk } if !here.contains(&chunk) || bad.contains(&chunk) => {
                Some(chunk)
            }
            _ => None,
        })
        .collect();
    let still_needed = |s: &Stash| needed.contains(&s.chunk);
    let stash = phase.stash.iter().copied().filter(still_needed).collect();
    let restash = phases[..start]
        .iter()
        .flat_map(|p| p.stash.iter().copied())
        .filter(still_needed)
        .collect();
    Ok((Phase { stash, ops }, restash))
}

/// What a journal must match to be resumed: image, target, seeds and scratch bound.
fn journal_identity(index: &Index, io: &SyncIo<'_>) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("tessera sync journal identity v1");
    let mut field = |s: &str| {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(&hex(&index.root_hash()));
    field(&io.target_id);
    field(
        &io.target_index
            .map_or("scan".into(), |i| hex(&i.root_hash())),
    );
    for s in &io.seeds {
        field(&s.id);
        field(&s.index.map_or("scan".into(), |i| hex(&i.root_hash())));
    }
    field(&io.scratch_size.to_string());
    *h.finalize().as_bytes()
}
