//! Power cuts, simulated: sync runs on a file system (the rig, [`Rig`]) that keeps two
//! states of everything: what the running program sees, and what survives a cut. File
//! contents and sizes become durable at `fsync`; directory entries (creations, renames,
//! removals) only at a sync of their directory, the way POSIX allows and btrfs or a
//! FUSE-backed file can behave. After a budget of I/O operations the power goes: every
//! later operation fails; each unsynced write is independently kept, dropped or torn (a
//! random subset of its 512-byte sectors reaches the medium), each unsynced size change
//! and directory entry change independently kept or dropped. Then the same sync runs
//! again, and may be cut again, until one run completes. The target must then hold
//! exactly the new image, durably, every time; no temporary target may be left; and the
//! store must not have served more than the uninterrupted run plus what each cut run had
//! fetched or held in scratch.
//!
//! Cases: existing targets (files and block devices), fresh targets (created by the sync,
//! with a leftover temporary file of an earlier cut), a fresh target filled from a seed, a
//! file shorter than the image (grown), and a tiny scratch.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_engine::sync::fs::{Fs, FsFile};
use tessera_engine::sync::{sync_with_fs, ReadAt, WriteAt};
use tessera_engine::{DeviceKind, Error, Index, NoProgress, Result, SeedSpec, SyncOptions};
use tessera_fixtures::{Fixtures, Pair, Params};

use crate::util::*;

const SECTOR: u64 = 512;
const DIR: &str = "/rig";
const TARGET: &str = "/rig/target";
const SEED: &str = "/rig/seed";
/// What an earlier cut run could have left: a temporary target.
const LEFTOVER: &str = "/rig/.target.tessera-new.0123456789abcdef";

enum Pending {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    SetLen(u64),
}

enum DirOp {
    Link(String, usize),
    Rename(String, String, usize),
    Unlink(String),
    Mkdir(String),
}

impl DirOp {
    /// The directory whose entries it changes.
    fn dir(&self) -> String {
        match self {
            DirOp::Link(n, _) | DirOp::Rename(n, _, _) | DirOp::Unlink(n) | DirOp::Mkdir(n) => {
                parent_of(n)
            }
        }
    }
}

/// The directory of a rig path.
fn parent_of(name: &str) -> String {
    Path::new(name)
        .parent()
        .map_or_else(|| "/".into(), |p| p.to_string_lossy().into_owned())
}

/// Whether `name` and all its ancestors up to the rig's root are in `dirs` (the root
/// always is).
fn reachable(name: &str, dirs: &BTreeSet<String>) -> bool {
    let mut p = parent_of(name);
    while p != "/" {
        if p != DIR && !dirs.contains(&p) {
            return false;
        }
        p = parent_of(&p);
    }
    true
}

/// A file or block device of the rig.
struct Node {
    kind: DeviceKind,
    /// What the running program sees.
    current: Vec<u8>,
    /// What survives a cut.
    durable: Vec<u8>,
    log: Vec<Pending>,
}

#[derive(Default)]
struct State {
    nodes: Vec<Node>,
    /// The directory as the running program sees it: name to node.
    names: BTreeMap<String, usize>,
    /// The directory as it survives a cut.
    durable_names: BTreeMap<String, usize>,
    /// Directories below `DIR` (which always exists), as seen and as durable.
    dirs: BTreeSet<String>,
    durable_dirs: BTreeSet<String>,
    dir_log: Vec<DirOp>,
    /// The journal's path: whenever the target is written, the journal (if there is
    /// one) must be durable, its name and every directory above it included.
    journal: Option<String>,
    /// Operations left before the cut; `None`: no cut planned.
    budget: Option<u64>,
    cut: bool,
    ops: u64,
}

/// The rig: one directory of nodes, and the power switch. Clones share it.
#[derive(Default, Clone)]
struct Rig {
    state: Arc<Mutex<State>>,
}

fn power_cut() -> Error {
    Error::io("writing", "rig", io::Error::other("simulated power cut"))
}

fn fs_error(what: &'static str, path: &str, kind: io::ErrorKind) -> Error {
    Error::io(what, path, io::Error::from(kind))
}

impl Rig {
    /// Adds a durable node named `name`.
    fn add(&self, name: &str, bytes: Vec<u8>, kind: DeviceKind) {
        let mut s = self.state.lock().unwrap();
        let n = s.nodes.len();
        s.nodes.push(Node {
            kind,
            current: bytes.clone(),
            durable: bytes,
            log: vec![],
        });
        s.names.insert(name.into(), n);
        s.durable_names.insert(name.into(), n);
    }

    /// Counts one mutating operation; fails once the budget is spent.
    fn tick(s: &mut State) -> Result<()> {
        if s.cut {
            return Err(power_cut());
        }
        s.ops += 1;
        match &mut s.budget {
            Some(0) => {
                s.cut = true;
                Err(power_cut())
            }
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The power comes back: unsynced changes are kept, dropped or torn at random.
    fn restore(&self, rng: &mut ChaCha8Rng) {
        let mut s = self.state.lock().unwrap();
        let s = &mut *s;
        for node in &mut s.nodes {
            let mut bytes = std::mem::take(&mut node.durable);
            for op in node.log.drain(..) {
                let fate = rng.gen_range(0..3); // 0 kept, 1 dropped, 2 torn
                if fate == 1 {
                    continue;
                }
                match op {
                    Pending::Write(off, data) => apply(&mut bytes, off, &data, fate == 2, rng),
                    Pending::Zero(off, len) => {
                        apply(&mut bytes, off, &vec![0; len as usize], fate == 2, rng)
                    }
                    Pending::SetLen(len) => bytes.resize(len as usize, 0),
                }
            }
            node.current = bytes.clone();
            node.durable = bytes;
        }
        for op in s.dir_log.drain(..) {
            if rng.gen_bool(0.5) {
                continue; // lost
            }
            let names = &mut s.durable_names;
            match op {
                DirOp::Link(name, n) => {
                    names.insert(name, n);
                }
                DirOp::Rename(from, to, n) => {
                    names.remove(&from);
                    names.insert(to, n);
                }
                DirOp::Unlink(name) => {
                    names.remove(&name);
                }
                DirOp::Mkdir(dir) => {
                    s.durable_dirs.insert(dir);
                }
            }
        }
        // What hangs below a directory whose own entry was lost is lost with it.
        let dirs = s.durable_dirs.clone();
        s.durable_dirs.retain(|d| reachable(d, &dirs));
        let dirs = s.durable_dirs.clone();
        s.durable_names.retain(|n, _| reachable(n, &dirs));
        s.names = s.durable_names.clone();
        s.dirs = s.durable_dirs.clone();
        s.cut = false;
        s.budget = None;
    }

    /// The durable and current bytes of the node named `name`, if it exists in both views.
    fn bytes_of(&self, name: &str) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let s = self.state.lock().unwrap();
        (
            s.durable_names
                .get(name)
                .map(|&n| s.nodes[n].durable.clone()),
            s.names.get(name).map(|&n| s.nodes[n].current.clone()),
        )
    }

    /// The names as seen, and as durable.
    fn names(&self) -> (Vec<String>, Vec<String>) {
        let s = self.state.lock().unwrap();
        (
            s.names.keys().cloned().collect(),
            s.durable_names.keys().cloned().collect(),
        )
    }

    fn open(&self, path: &Path, writable: bool) -> Result<RigFile> {
        let s = self.state.lock().unwrap();
        if s.cut {
            return Err(power_cut());
        }
        let name = path.to_string_lossy().into_owned();
        match s.names.get(&name) {
            Some(&node) => Ok(RigFile {
                rig: self.clone(),
                node,
                name,
                writable,
            }),
            None => Err(fs_error("opening", &name, io::ErrorKind::NotFound)),
        }
    }
}

/// Writes `data` at `off`, or, torn, only a random subset of its sectors.
fn apply(bytes: &mut Vec<u8>, off: u64, data: &[u8], torn: bool, rng: &mut ChaCha8Rng) {
    let end = off as usize + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    if !torn {
        bytes[off as usize..end].copy_from_slice(data);
        return;
    }
    let mut at = off;
    while at < end as u64 {
        let next = ((at / SECTOR) + 1) * SECTOR;
        let stop = next.min(end as u64);
        if rng.gen_bool(0.5) {
            let (a, b) = ((at - off) as usize, (stop - off) as usize);
            bytes[at as usize..stop as usize].copy_from_slice(&data[a..b]);
        }
        at = stop;
    }
}

/// An open node of the rig.
struct RigFile {
    rig: Rig,
    node: usize,
    name: String,
    writable: bool,
}

impl RigFile {
    /// Checks, before a write to the target, that the target's name and size and the
    /// journal protecting the write are durable.
    fn journal_durable(&self, s: &State) {
        if self.name != TARGET {
            return;
        }
        let t = &s.nodes[self.node];
        assert!(
            s.durable_names.get(TARGET) == Some(&self.node) && t.durable.len() == t.current.len(),
            "the target is written before its name and size are durable"
        );
        let Some(j) = &s.journal else { return };
        let Some(&node) = s.names.get(j) else { return };
        assert!(
            s.durable_names.get(j) == Some(&node) && reachable(j, &s.durable_dirs),
            "the target is written while the journal {j} is not durably in its directory"
        );
        let n = &s.nodes[node];
        assert!(
            n.log.is_empty() && n.durable == n.current,
            "the target is written while the journal {j} has unsynced changes"
        );
    }

    /// Runs a mutation of this node, counted against the budget.
    fn mutate(&self, f: impl FnOnce(&mut Node) -> Result<Option<Pending>>) -> Result<()> {
        let mut s = self.rig.state.lock().unwrap();
        Rig::tick(&mut s)?;
        if !self.writable {
            return Err(fs_error(
                "writing",
                &self.name,
                io::ErrorKind::PermissionDenied,
            ));
        }
        let node = &mut s.nodes[self.node];
        if let Some(p) = f(node)? {
            node.log.push(p);
        }
        Ok(())
    }
}

impl ReadAt for RigFile {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> u64 {
        self.rig.state.lock().unwrap().nodes[self.node]
            .current
            .len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let s = self.rig.state.lock().unwrap();
        if s.cut {
            return Err(power_cut());
        }
        let data = &s.nodes[self.node].current;
        let end = offset as usize + buf.len();
        if end > data.len() {
            return Err(fs_error(
                "reading",
                &self.name,
                io::ErrorKind::UnexpectedEof,
            ));
        }
        buf.copy_from_slice(&data[offset as usize..end]);
        Ok(())
    }
}

impl WriteAt for RigFile {
    fn kind(&self) -> DeviceKind {
        self.rig.state.lock().unwrap().nodes[self.node].kind
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.journal_durable(&self.rig.state.lock().unwrap());
        self.mutate(|n| {
            let end = offset as usize + buf.len();
            if n.current.len() < end {
                assert_eq!(n.kind, DeviceKind::File, "write past a block device's end");
                n.current.resize(end, 0);
            }
            n.current[offset as usize..end].copy_from_slice(buf);
            Ok(Some(Pending::Write(offset, buf.to_vec())))
        })
    }
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        self.journal_durable(&self.rig.state.lock().unwrap());
        self.mutate(|n| {
            let end = (offset + len) as usize;
            assert!(end <= n.current.len(), "zeros past the end of a target");
            n.current[offset as usize..end].fill(0);
            Ok(Some(Pending::Zero(offset, len)))
        })
    }
    fn flush(&self) -> Result<()> {
        self.mutate(|n| {
            n.durable = n.current.clone();
            n.log.clear();
            Ok(None)
        })
    }
}

impl FsFile for RigFile {
    fn set_len(&self, len: u64) -> Result<()> {
        let name = self.name.clone();
        self.mutate(|n| {
            if n.kind == DeviceKind::BlockDevice {
                return Err(fs_error("resizing", &name, io::ErrorKind::InvalidInput));
            }
            n.current.resize(len as usize, 0);
            Ok(Some(Pending::SetLen(len)))
        })
    }
    fn sync_all(&self) -> Result<()> {
        self.flush()
    }
    fn node(&self) -> (u64, u64) {
        (0, self.node as u64)
    }
    fn renamed(&mut self, path: &Path) {
        self.name = path.to_string_lossy().into_owned();
    }
}

impl Rig {
    /// A directory mutation, counted against the budget.
    fn dir_op<T>(&self, f: impl FnOnce(&mut State) -> Result<(T, Option<DirOp>)>) -> Result<T> {
        let mut s = self.state.lock().unwrap();
        Rig::tick(&mut s)?;
        let (t, op) = f(&mut s)?;
        s.dir_log.extend(op);
        Ok(t)
    }
}

fn name_of(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Fs for Rig {
    type File = RigFile;

    fn open_read(&self, path: &Path) -> Result<RigFile> {
        self.open(path, false)
    }
    fn open_rw(&self, path: &Path, _exclusive: bool) -> Result<RigFile> {
        self.open(path, true)
    }
    fn open_rw_nofollow(&self, path: &Path) -> Result<RigFile> {
        self.open(path, true)
    }
    fn create_new(&self, path: &Path, _mode: u32) -> Result<RigFile> {
        let name = name_of(path);
        let node = self.dir_op(|s| {
            if s.names.contains_key(&name) || s.dirs.contains(&name) {
                return Err(fs_error("creating", &name, io::ErrorKind::AlreadyExists));
            }
            if !reachable(&name, &s.dirs) {
                return Err(fs_error("creating", &name, io::ErrorKind::NotFound));
            }
            let n = s.nodes.len();
            s.nodes.push(Node {
                kind: DeviceKind::File,
                current: vec![],
                durable: vec![],
                log: vec![],
            });
            s.names.insert(name.clone(), n);
            Ok((n, Some(DirOp::Link(name.clone(), n))))
        })?;
        Ok(RigFile {
            rig: self.clone(),
            node,
            name,
            writable: true,
        })
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<()> {
        let (from, to) = (name_of(from), name_of(to));
        self.dir_op(|s| {
            if s.names.contains_key(&to) {
                return Err(fs_error("renaming into", &to, io::ErrorKind::AlreadyExists));
            }
            let Some(n) = s.names.remove(&from) else {
                return Err(fs_error("renaming", &from, io::ErrorKind::NotFound));
            };
            s.names.insert(to.clone(), n);
            Ok(((), Some(DirOp::Rename(from, to, n))))
        })
    }
    fn remove_file(&self, path: &Path) -> Result<()> {
        let name = name_of(path);
        self.dir_op(|s| match s.names.remove(&name) {
            Some(_) => Ok(((), Some(DirOp::Unlink(name.clone())))),
            None => Err(fs_error("removing", &name, io::ErrorKind::NotFound)),
        })
    }
    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let dir = name_of(dir);
        self.dir_op(|s| {
            assert!(
                dir == DIR || s.dirs.contains(&dir),
                "syncing {dir}, which does not exist"
            );
            let inside = |n: &String| parent_of(n) == dir;
            let names = std::mem::take(&mut s.durable_names);
            s.durable_names = names.into_iter().filter(|(n, _)| !inside(n)).collect();
            let now: Vec<_> = s.names.iter().filter(|(n, _)| inside(n)).collect();
            let now: Vec<(String, usize)> = now.into_iter().map(|(n, &i)| (n.clone(), i)).collect();
            s.durable_names.extend(now);
            s.durable_dirs.retain(|d| !inside(d));
            let dirs: Vec<String> = s.dirs.iter().filter(|d| inside(d)).cloned().collect();
            s.durable_dirs.extend(dirs);
            s.dir_log.retain(|op| op.dir() != dir);
            Ok(((), None))
        })
    }
    fn create_dir(&self, dir: &Path, _mode: u32) -> Result<()> {
        let dir = name_of(dir);
        self.dir_op(|s| {
            if dir == DIR || dir == "/" || s.dirs.contains(&dir) || s.names.contains_key(&dir) {
                return Err(fs_error("creating", &dir, io::ErrorKind::AlreadyExists));
            }
            if !reachable(&dir, &s.dirs) {
                return Err(fs_error("creating", &dir, io::ErrorKind::NotFound));
            }
            s.dirs.insert(dir.clone());
            Ok(((), Some(DirOp::Mkdir(dir.clone()))))
        })
    }
    fn list_dir(&self, dir: &Path) -> Result<Vec<OsString>> {
        let s = self.state.lock().unwrap();
        if s.cut {
            return Err(power_cut());
        }
        Ok(s.names
            .keys()
            .filter_map(|n| {
                let p = Path::new(n);
                (p.parent() == Some(dir)).then(|| p.file_name().unwrap().to_owned())
            })
            .collect())
    }
}
/// What the target is before the sync.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The old image (grown with zeros to the new image's size if shorter).
    Old,
    /// A regular file holding the first third of the old image: grown by the sync.
    Short,
    /// No target (but a temporary target left by an earlier cut): created by the sync.
    Absent,
}

/// One scenario.
#[derive(Clone, Copy)]
struct Case {
    pair: Pair,
    /// Fixture seed.
    seed: u64,
    start: Start,
    kind: DeviceKind,
    scratch: u64,
    /// The old image is a seed (`--seed`).
    old_as_seed: bool,
    /// `--journal`, in directories that do not exist yet (as a block device's default
    /// journal under a state directory used for the first time).
    journal_in_new_dirs: bool,
}

/// The journal of a case with `journal_in_new_dirs`.
const NESTED_JOURNAL: &str = "/rig/state/tessera/journal/target.journal";

impl Case {
    fn new(pair: Pair, seed: u64, start: Start, kind: DeviceKind, scratch: u64) -> Case {
        Case {
            pair,
            seed,
            start,
            kind,
            scratch,
            old_as_seed: false,
            journal_in_new_dirs: false,
        }
    }

    /// The journal's path.
    fn journal(&self) -> PathBuf {
        if self.journal_in_new_dirs {
            NESTED_JOURNAL.into()
        } else if self.kind == DeviceKind::BlockDevice {
            "/rig/target.journal".into()
        } else {
            // A file's journal goes to its default place beside it.
            "/rig/.target.tessera-journal".into()
        }
    }

    /// A rig holding the case's target (and seed) durably.
    fn rig(&self, old: &[u8], new_len: usize) -> Rig {
        let rig = Rig::default();
        match self.start {
            Start::Old => {
                let mut t = old.to_vec();
                if t.len() < new_len {
                    t.resize(new_len, 0);
                }
                rig.add(TARGET, t, self.kind);
            }
            Start::Short => rig.add(TARGET, old[..new_len / 3].to_vec(), DeviceKind::File),
            Start::Absent => rig.add(LEFTOVER, vec![7; 1000], DeviceKind::File),
        }
        if self.old_as_seed {
            rig.add(SEED, old.to_vec(), DeviceKind::File);
        }
        rig.state.lock().unwrap().journal = Some(name_of(&self.journal()));
        rig
    }

    fn options(&self) -> SyncOptions {
        SyncOptions {
            seeds: if self.old_as_seed {
                vec![SeedSpec {
                    path: SEED.into(),
                    index: None,
                }]
            } else {
                vec![]
            },
            // A file's journal goes to its default place beside it.
            journal: (self.kind == DeviceKind::BlockDevice || self.journal_in_new_dirs)
                .then(|| self.journal()),
            scratch_size: self.scratch,
            workers: 2,
            ..SyncOptions::default()
        }
    }

    fn run(
        &self,
        rig: &Rig,
        index: &Index,
        store: &MemStore,
    ) -> Result<tessera_engine::SyncReport> {
        sync_with_fs(
            rig,
            index,
            Path::new(TARGET),
            store,
            &self.options(),
            &NoProgress,
        )
    }
}

struct Outcome {
    cuts: u64,
    resumed: u64,
    extra_fetched: i64,
}

/// Runs the sync of `index` until it succeeds, cutting the power after a random number
/// of operations (between 1 and `max_ops`) in each of the first runs.
#[allow(clippy::too_many_arguments)]
fn cut_until_done(
    case: &Case,
    index: &Index,
    old: &[u8],
    new: &[u8],
    store: &MemStore,
    max_ops: u64,
    baseline_served: u64,
    rng: &mut ChaCha8Rng,
) -> Outcome {
    let rig = case.rig(old, new.len());
    let mut cuts = 0;
    let mut resumed = 0;
    let mut allowance = 0u64;
    let start = store.served();
    for attempt in 0.. {
        {
            let mut s = rig.state.lock().unwrap();
            // Mostly cut, sooner and sooner (a resumed run has less to do); from the
            // tenth attempt on, let it finish.
            let horizon = (max_ops >> attempt.min(4)).max(1);
            s.budget = (attempt < 10 && rng.gen_bool(0.85)).then(|| rng.gen_range(0..horizon));
        }
        let served_before = store.served();
        match case.run(&rig, index, store) {
            Ok(r) => {
                resumed += u64::from(r.resumed);
                break;
            }
            Err(e) => {
                assert!(
                    rig.state.lock().unwrap().cut,
                    "attempt {attempt} failed without a cut: {e}"
                );
                // What this run fetched, or held in scratch, may be lost with it (scratch
                // is counted uncompressed: allow zstd's few bytes per frame on top).
                allowance += store.served() - served_before + case.scratch + case.scratch / 16;
                cuts += 1;
                rig.restore(rng);
            }
        }
    }
    let (durable, current) = rig.bytes_of(TARGET);
    let current = current.expect("no target after success");
    let durable = durable.expect("the target's directory entry is not durable after success");
    assert!(
        current[..new.len()] == new[..],
        "target differs from the image after {cuts} cuts"
    );
    assert!(
        durable[..new.len()] == new[..],
        "the image is not durable after success"
    );
    if case.start != Start::Old {
        assert_eq!(
            durable.len(),
            new.len(),
            "a created or grown target has the image's size"
        );
    }
    // Nothing is left, and its removal is durable: a cut after success brings no
    // journal back (a rerun would re-read the whole target) and no temporary file.
    let (names, durable_names) = rig.names();
    for names in [&names, &durable_names] {
        assert!(
            !names.iter().any(|n| n.contains(".tessera-new.")),
            "a temporary target is left after success: {names:?}"
        );
        assert!(
            !names.iter().any(|n| n.ends_with("journal")),
            "a journal is left after success: {names:?}"
        );
    }
    let served = store.served() - start;
    assert!(
        served <= baseline_served + allowance,
        "served {served}, uninterrupted {baseline_served}, allowance {allowance} after {cuts} cuts"
    );
    Outcome {
        cuts,
        resumed,
        extra_fetched: served as i64 - baseline_served as i64,
    }
}

fn trials() -> u64 {
    std::env::var("TESSERA_POWERCUT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

fn power_cuts_on(case: Case) {
    let fixtures = Fixtures::from_env();
    let files = fixtures
        .pair(
            case.pair,
            Params::default().with_size(2 << 20).with_seed(case.seed),
        )
        .unwrap();
    let (old, new) = (fs::read(&files.old).unwrap(), fs::read(&files.new).unwrap());
    let store = MemStore::default();
    let index = make_index(&new, small_params(), &store);
    // The uninterrupted run: its operation count bounds the cut points.
    let rig = case.rig(&old, new.len());
    let served = store.served();
    let r = case.run(&rig, &index, &store).unwrap();
    let baseline = store.served() - served;
    let max_ops = rig.state.lock().unwrap().ops;
    let mut rng = ChaCha8Rng::seed_from_u64(case.seed ^ 0x5eed);
    let (mut cuts, mut resumed, mut extra) = (0, 0, 0i64);
    for _ in 0..trials() {
        let o = cut_until_done(
            &case, &index, &old, &new, &store, max_ops, baseline, &mut rng,
        );
        cuts += o.cuts;
        resumed += o.resumed;
        extra += o.extra_fetched;
    }
    eprintln!(
        "power cuts {}: {} phases, {max_ops} I/O ops, {cuts} cuts over {} trials, {resumed} completions \
         resumed a journal, {} bytes fetched uninterrupted, {extra} extra bytes fetched in all",
        case.pair.name(),
        r.phases,
        trials(),
        baseline
    );
    assert!(cuts >= trials(), "too few cuts to mean anything");
    if r.phases > 0 {
        assert!(resumed > 0, "no run ever resumed a journal");
    }
}

#[test]
fn power_cuts_during_a_release_update() {
    power_cuts_on(Case::new(
        Pair::Release,
        1,
        Start::Old,
        DeviceKind::File,
        64 << 10,
    ));
}

#[test]
fn power_cuts_during_a_rotation() {
    power_cuts_on(Case::new(
        Pair::Rotate,
        2,
        Start::Old,
        DeviceKind::BlockDevice,
        48 << 10,
    ));
}

#[test]
fn power_cuts_during_a_shift() {
    power_cuts_on(Case::new(
        Pair::ShiftForward,
        3,
        Start::Old,
        DeviceKind::BlockDevice,
        128 << 10,
    ));
}

#[test]
fn power_cuts_during_a_shuffle_with_duplicates() {
    power_cuts_on(Case::new(
        Pair::Shuffle,
        4,
        Start::Old,
        DeviceKind::File,
        32 << 10,
    ));
    power_cuts_on(Case::new(
        Pair::Duplicate,
        5,
        Start::Old,
        DeviceKind::File,
        32 << 10,
    ));
}

#[test]
fn power_cuts_during_a_shrink() {
    power_cuts_on(Case::new(
        Pair::Shrink,
        6,
        Start::Old,
        DeviceKind::File,
        64 << 10,
    ));
}

#[test]
fn power_cuts_while_creating_the_target() {
    power_cuts_on(Case::new(
        Pair::Release,
        7,
        Start::Absent,
        DeviceKind::File,
        64 << 10,
    ));
}

#[test]
fn power_cuts_while_filling_a_new_target_from_a_seed() {
    power_cuts_on(Case {
        old_as_seed: true,
        ..Case::new(Pair::Release, 8, Start::Absent, DeviceKind::File, 64 << 10)
    });
}

#[test]
fn power_cuts_while_growing_a_short_file() {
    power_cuts_on(Case::new(
        Pair::Release,
        9,
        Start::Short,
        DeviceKind::File,
        64 << 10,
    ));
}

#[test]
fn power_cuts_with_a_tiny_scratch() {
    power_cuts_on(Case::new(
        Pair::Rotate,
        10,
        Start::Old,
        DeviceKind::File,
        4 << 10,
    ));
}

/// A block device's journal in a state directory used for the first time: the directories
/// tessera creates for it must be durable before the journal is relied on.
#[test]
fn power_cuts_with_the_journal_in_new_directories() {
    power_cuts_on(Case {
        journal_in_new_dirs: true,
        ..Case::new(
            Pair::Rotate,
            11,
            Start::Old,
            DeviceKind::BlockDevice,
            48 << 10,
        )
    });
}
