//! Power cuts, simulated: the target and the journal sit on fault-injecting media whose
//! writes stay volatile until flushed. After a budget of I/O operations the power goes:
//! every later operation fails, and each write not yet flushed is independently kept,
//! dropped or torn (a random subset of its 512-byte sectors reaches the medium). Then
//! the same sync runs again, and may be cut again, until one run completes. The target
//! must then hold exactly the new image, every time, and the store must not have served
//! more than the uninterrupted run plus what each cut run had fetched or held in scratch.

use std::fs;
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_engine::sync::{sync_io, JournalIo, SyncIo};
use tessera_engine::sync::{ReadAt, WriteAt};
use tessera_engine::{DeviceKind, Error, Index, NoProgress, Result};
use tessera_fixtures::{Fixtures, Pair, Params};

use crate::util::*;

const SECTOR: u64 = 512;

enum Pending {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    SetLen(u64),
    Remove,
}

#[derive(Default, Clone)]
struct Medium {
    /// What the running program sees.
    current: Vec<u8>,
    /// What survives a cut.
    durable: Vec<u8>,
    exists: bool,
    durable_exists: bool,
}

#[derive(Default)]
struct State {
    target: Medium,
    journal: Medium,
    target_log: Vec<Pending>,
    journal_log: Vec<Pending>,
    /// Operations left before the cut; `None`: no cut planned.
    budget: Option<u64>,
    cut: bool,
    ops: u64,
}

/// Both media and the power switch.
struct Rig {
    state: Mutex<State>,
    kind: DeviceKind,
}

fn power_cut() -> Error {
    Error::io(
        "writing",
        "rig",
        std::io::Error::other("simulated power cut"),
    )
}

impl Rig {
    fn new(target: Vec<u8>, kind: DeviceKind) -> Rig {
        let medium = Medium {
            current: target.clone(),
            durable: target,
            exists: true,
            durable_exists: true,
        };
        Rig {
            state: Mutex::new(State {
                target: medium,
                ..State::default()
            }),
            kind,
        }
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

    /// The power comes back: unflushed writes are kept, dropped or torn at random.
    fn restore(&self, rng: &mut ChaCha8Rng) {
        let mut s = self.state.lock().unwrap();
        let s = &mut *s;
        for (m, log) in [
            (&mut s.target, &mut s.target_log),
            (&mut s.journal, &mut s.journal_log),
        ] {
            let mut bytes = std::mem::take(&mut m.durable);
            let mut exists = m.durable_exists;
            for op in log.drain(..) {
                let fate = rng.gen_range(0..3); // 0 kept, 1 dropped, 2 torn
                if fate == 1 {
                    continue;
                }
                match op {
                    Pending::Write(off, data) => apply(&mut bytes, off, &data, fate == 2, rng),
                    Pending::Zero(off, len) => {
                        apply(&mut bytes, off, &vec![0; len as usize], fate == 2, rng)
                    }
                    Pending::SetLen(len) => {
                        bytes.resize(len as usize, 0);
                        exists = true;
                    }
                    Pending::Remove => {
                        bytes.clear();
                        exists = false;
                    }
                }
            }
            m.current = bytes.clone();
            m.durable = bytes;
            m.exists = exists;
            m.durable_exists = exists;
        }
        s.cut = false;
        s.budget = None;
    }

    fn target_bytes(&self) -> (Vec<u8>, Vec<u8>) {
        let s = self.state.lock().unwrap();
        (s.target.current.clone(), s.target.durable.clone())
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

struct CutTarget<'a>(&'a Rig);

impl ReadAt for CutTarget<'_> {
    fn name(&self) -> String {
        "cut-target".into()
    }
    fn size(&self) -> u64 {
        self.0.state.lock().unwrap().target.current.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let s = self.0.state.lock().unwrap();
        if s.cut {
            return Err(power_cut());
        }
        buf.copy_from_slice(&s.target.current[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl WriteAt for CutTarget<'_> {
    fn kind(&self) -> DeviceKind {
        self.0.kind
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut s = self.0.state.lock().unwrap();
        Rig::tick(&mut s)?;
        let end = offset as usize + buf.len();
        assert!(end <= s.target.current.len(), "write past the target's end");
        s.target.current[offset as usize..end].copy_from_slice(buf);
        s.target_log.push(Pending::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        let mut s = self.0.state.lock().unwrap();
        Rig::tick(&mut s)?;
        s.target.current[offset as usize..(offset + len) as usize].fill(0);
        s.target_log.push(Pending::Zero(offset, len));
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        let mut s = self.0.state.lock().unwrap();
        Rig::tick(&mut s)?;
        s.target.durable = s.target.current.clone();
        s.target_log.clear();
        Ok(())
    }
}

struct CutJournal<'a>(&'a Rig);

impl JournalIo for CutJournal<'_> {
    fn location(&self) -> String {
        "cut-journal".into()
    }
    fn load(&mut self) -> Result<Vec<u8>> {
        let s = self.0.state.lock().unwrap();
        Ok(if s.journal.exists {
            s.journal.current.clone()
        } else {
            vec![]
        })
    }
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let mut s = self.0.state.lock().unwrap();
        Rig::tick(&mut s)?;
        let end = offset as usize + bytes.len();
        let j = &mut s.journal;
        if j.current.len() < end {
            j.current.resize(end, 0);
        }
        j.current[offset as usize..end].copy_from_slice(bytes);
        j.exists = true;
        s.journal_log.push(Pending::Write(offset, bytes.to_vec()));
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> Result<()> {
        let mut s = self.0.state.lock().unwrap();
        Rig::tick(&mut s)?;
        s.journal.current.resize(len as usize, 0);
        s.journal.exists = true;
        s.journal_log.push(Pending::SetLen(len));
        Ok(())
    }
    fn sync(&mut self) -> Result<()> {
        let mut s = self.0.state.lock().unwrap();
        Rig::tick(&mut s)?;
        s.journal.durable = s.journal.current.clone();
        s.journal.durable_exists = s.journal.exists;
        s.journal_log.clear();
        Ok(())
    }
    fn remove(&mut self) -> Result<()> {
        let mut s = self.0.state.lock().unwrap();
        Rig::tick(&mut s)?;
        s.journal.current.clear();
        s.journal.exists = false;
        s.journal_log.push(Pending::Remove);
        Ok(())
    }
}

struct Outcome {
    cuts: u64,
    resumed: u64,
    extra_fetched: i64,
}

/// Runs the sync of `index` over `old` until it succeeds, cutting the power after a
/// random number of operations (between 1 and `max_ops`) in each of the first runs.
#[allow(clippy::too_many_arguments)]
fn cut_until_done(
    index: &Index,
    old: &[u8],
    new: &[u8],
    store: &MemStore,
    kind: DeviceKind,
    scratch: u64,
    max_ops: u64,
    baseline_served: u64,
    rng: &mut ChaCha8Rng,
) -> Outcome {
    let rig = Rig::new(old.to_vec(), kind);
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
        let target = CutTarget(&rig);
        let mut journal = CutJournal(&rig);
        let io = SyncIo {
            target: &target,
            target_id: "rig".into(),
            target_fresh: false,
            target_index: None,
            seeds: vec![],
            journal: Some(&mut journal),
            dry_run: false,
            scratch_size: scratch,
            workers: 2,
        };
        match sync_io(index, io, store, &NoProgress) {
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
                allowance += store.served() - served_before + scratch + scratch / 16;
                cuts += 1;
                rig.restore(rng);
            }
        }
    }
    let (current, durable) = rig.target_bytes();
    assert!(
        current[..new.len()] == new[..],
        "target differs from the image after {cuts} cuts"
    );
    assert!(
        durable[..new.len()] == new[..],
        "the image is not durable after success"
    );
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

fn power_cuts_on(pair: Pair, kind: DeviceKind, scratch: u64, seed: u64) {
    let fixtures = Fixtures::from_env();
    let files = fixtures
        .pair(pair, Params::default().with_size(2 << 20).with_seed(seed))
        .unwrap();
    let (mut old, new) = (fs::read(&files.old).unwrap(), fs::read(&files.new).unwrap());
    if old.len() < new.len() {
        old.resize(new.len(), 0);
    }
    let store = MemStore::default();
    let index = make_index(&new, small_params(), &store);
    // The uninterrupted run: its operation count bounds the cut points.
    let rig = Rig::new(old.clone(), kind);
    let served = store.served();
    let r = sync_io(
        &index,
        SyncIo {
            target: &CutTarget(&rig),
            target_id: "rig".into(),
            target_fresh: false,
            target_index: None,
            seeds: vec![],
            journal: Some(&mut CutJournal(&rig)),
            dry_run: false,
            scratch_size: scratch,
            workers: 2,
        },
        &store,
        &NoProgress,
    )
    .unwrap();
    let baseline = store.served() - served;
    let max_ops = rig.state.lock().unwrap().ops;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let (mut cuts, mut resumed, mut extra) = (0, 0, 0i64);
    for _ in 0..trials() {
        let o = cut_until_done(
            &index, &old, &new, &store, kind, scratch, max_ops, baseline, &mut rng,
        );
        cuts += o.cuts;
        resumed += o.resumed;
        extra += o.extra_fetched;
    }
    eprintln!(
        "power cuts {}: {} phases, {max_ops} I/O ops, {cuts} cuts over {} trials, {resumed} completions \
         resumed a journal, {} bytes fetched uninterrupted, {extra} extra bytes fetched in all",
        pair.name(),
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
    power_cuts_on(Pair::Release, DeviceKind::File, 64 << 10, 1);
}

#[test]
fn power_cuts_during_a_rotation() {
    power_cuts_on(Pair::Rotate, DeviceKind::BlockDevice, 48 << 10, 2);
}

#[test]
fn power_cuts_during_a_shift() {
    power_cuts_on(Pair::ShiftForward, DeviceKind::BlockDevice, 128 << 10, 3);
}

#[test]
fn power_cuts_during_a_shuffle_with_duplicates() {
    power_cuts_on(Pair::Shuffle, DeviceKind::File, 32 << 10, 4);
    power_cuts_on(Pair::Duplicate, DeviceKind::File, 32 << 10, 5);
}

#[test]
fn power_cuts_during_a_shrink() {
    power_cuts_on(Pair::Shrink, DeviceKind::File, 64 << 10, 6);
}
