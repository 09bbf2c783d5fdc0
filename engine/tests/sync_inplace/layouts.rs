//! Every synthetic release pair of `tessera-fixtures` synced in place into a file target,
//! plus bad sources: seed and target copies that do not hash to their id are never used,
//! and a chunk that exists nowhere is a clear error that a rerun recovers from.

use std::collections::HashSet;
use std::fs;

use tessera_engine::sync::ReadAt;
use tessera_engine::sync::{sync_io, FileJournal, MemoryJournal, SeedIo, SyncIo};
use tessera_engine::{
    sync_with, ChunkId, DeviceKind, ErrorKind, Index, LocalStore, NoProgress, Result, SeedSpec,
    SyncOptions,
};
use tessera_fixtures::{Fixtures, Pair, Params};

use crate::util::*;

/// Syncs `new` into a file holding `old` (grown to the image size if needed) and checks
/// the result and the report.
fn sync_pair(pair: Pair) {
    let fixtures = Fixtures::from_env();
    let files = fixtures.pair(pair, Params::default()).unwrap();
    let mut old = fs::read(&files.old).unwrap();
    let new = fs::read(&files.new).unwrap();
    // A target smaller than the image is refused: grow it as an operator would.
    if old.len() < new.len() {
        old.resize(new.len(), 0);
    }
    let dir = tempfile::TempDir::new().unwrap();
    let store = LocalStore::open(dir.path().join("store"), true).unwrap();
    let index = make_index(&new, small_params(), &store);
    let target = dir.path().join("target.img");
    fs::write(&target, &old).unwrap();
    let r = sync_with(
        &index,
        &target,
        &fetcher(&store, &index),
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", pair.name()));
    let after = fs::read(&target).unwrap();
    assert!(
        after[..new.len()] == new[..],
        "{}: target differs from the new image",
        pair.name()
    );
    assert_eq!(after.len(), old.len(), "{}: target resized", pair.name());
    assert!(
        after[new.len()..] == old[new.len()..],
        "{}: bytes past the image changed",
        pair.name()
    );
    assert_accounted(&r);
    assert_eq!(r.fallbacks, 0, "{}: {r:?}", pair.name());
    assert!(!r.resumed);
    assert!(
        !dir.path().join(".target.img.tessera-journal").exists(),
        "{}: journal left behind",
        pair.name()
    );
    // What was there is reused: the store serves only what the old image lacks.
    let novel = novel_bytes(&index, &old);
    assert!(
        r.bytes_fetched <= novel,
        "{}: fetched {} but only {novel} bytes are new: {r:?}",
        pair.name(),
        r.bytes_fetched
    );
    match pair {
        Pair::Identical => assert_eq!((r.bytes_written, r.phases), (0, 0), "{r:?}"),
        Pair::Edit => assert!(r.bytes_in_place > new.len() as u64 * 9 / 10, "{r:?}"),
        Pair::ShiftForward | Pair::ShiftBack | Pair::Rotate | Pair::Swap => {
            assert!(
                r.bytes_moved > 20 * r.bytes_fetched,
                "{}: {r:?}",
                pair.name()
            );
            // Scratch (16 MiB by default) holds these 8 MiB moves: few barriers.
            assert!(r.phases <= 3, "{}: {r:?}", pair.name());
        }
        _ => {}
    }
    // A second run finds everything in place and writes nothing.
    let again = sync_with(
        &index,
        &target,
        &fetcher(&store, &index),
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(again.bytes_written, 0, "{}: {again:?}", pair.name());
}

/// Bytes of the image's distinct non-zero chunks that the old image, cut the same way,
/// does not hold: what a sync has to fetch.
fn novel_bytes(index: &Index, old: &[u8]) -> u64 {
    let store = MemStore::default();
    let have: HashSet<ChunkId> = make_index(old, index.params(), &store)
        .chunks()
        .iter()
        .map(|c| c.id)
        .collect();
    let mut seen = HashSet::new();
    index
        .chunks()
        .iter()
        .filter(|c| !c.zero && !have.contains(&c.id) && seen.insert(c.id))
        .map(|c| u64::from(c.len))
        .sum()
}

macro_rules! pair_tests {
    ($($name:ident => $pair:expr,)*) => {
        $(
            #[test]
            fn $name() {
                sync_pair($pair);
            }
        )*
        const COVERED: &[Pair] = &[$($pair),*];
    };
}

pair_tests! {
    pair_identical => Pair::Identical,
    pair_edit => Pair::Edit,
    pair_insert => Pair::Insert,
    pair_delete => Pair::Delete,
    pair_append => Pair::Append,
    pair_truncate => Pair::Truncate,
    pair_shift_forward => Pair::ShiftForward,
    pair_shift_back => Pair::ShiftBack,
    pair_swap => Pair::Swap,
    pair_rotate => Pair::Rotate,
    pair_shuffle => Pair::Shuffle,
    pair_duplicate => Pair::Duplicate,
    pair_grow => Pair::Grow,
    pair_shrink => Pair::Shrink,
    pair_from_empty => Pair::FromEmpty,
    pair_to_empty => Pair::ToEmpty,
    pair_release => Pair::Release,
    pair_scramble => Pair::Scramble,
}

#[test]
fn every_fixture_pair_is_covered() {
    for pair in Pair::ALL {
        assert!(
            COVERED.contains(&pair),
            "{} needs a test above",
            pair.name()
        );
    }
}

#[test]
fn scratch_size_zero_fetches_cycles_instead() {
    let fixtures = Fixtures::from_env();
    let files = fixtures.pair(Pair::Rotate, Params::default()).unwrap();
    let (old, new) = (fs::read(&files.old).unwrap(), fs::read(&files.new).unwrap());
    let store = MemStore::default();
    let index = make_index(&new, small_params(), &store);
    let mut runs = vec![];
    for scratch in [0u64, 64 << 10, 16 << 20] {
        let t = MemDevice::new("target", old.clone(), DeviceKind::BlockDevice);
        let r = sync_io(&index, io(&t, vec![], scratch), &store, &NoProgress).unwrap();
        assert_eq!(t.bytes()[..new.len()], new[..]);
        assert!(r.bytes_stashed <= scratch.max(1) * r.phases.max(1), "{r:?}");
        runs.push(r);
    }
    // Without scratch every cycle costs a fetch; with more scratch, fewer fetches and
    // fewer phases.
    assert!(runs[0].bytes_fetched > runs[2].bytes_fetched, "{runs:?}");
    assert_eq!(runs[0].bytes_stashed, 0);
    assert!(runs[1].phases >= runs[2].phases, "{runs:?}");
}

fn io<'a>(target: &'a MemDevice, seeds: Vec<SeedIo<'a>>, scratch: u64) -> SyncIo<'a> {
    SyncIo {
        target,
        target_id: "target".into(),
        target_fresh: false,
        target_index: None,
        seeds,
        journal: None,
        dry_run: false,
        scratch_size: scratch,
        workers: 2,
    }
}

/// A seed that holds good bytes when scanned but is corrupted when copied from (a device
/// changing under the sync, or a bad sector that reads differently).
struct Flaky {
    inner: MemDevice,
    reads: std::sync::atomic::AtomicU64,
}

impl ReadAt for Flaky {
    fn name(&self) -> String {
        "flaky-seed".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_exact_at(buf, offset)?;
        // The scan reads whole segments; copies read one chunk: corrupt those.
        if buf.len() <= 16384 {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            buf[buf.len() / 2] ^= 0x55;
        }
        Ok(())
    }
}

#[test]
fn seed_bytes_that_fail_their_hash_are_never_written() {
    let old = random_bytes(1 << 20, 1);
    let new: Vec<u8> = [random_bytes(100_000, 2), old[..600_000].to_vec()].concat();
    let store = MemStore::default();
    let index = make_index(&new, small_params(), &store);
    let seed = Flaky {
        inner: MemDevice::new("seed", old.clone(), DeviceKind::File),
        reads: Default::default(),
    };
    let target = MemDevice::new("target", vec![0xAA; new.len()], DeviceKind::BlockDevice);
    let seeds = vec![SeedIo {
        reader: &seed,
        id: "seed".into(),
        index: None,
    }];
    let r = sync_io(&index, io(&target, seeds, 1 << 20), &store, &NoProgress).unwrap();
    assert_eq!(target.bytes(), new);
    assert!(
        seed.reads.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the seed was used"
    );
    assert_eq!(r.bytes_from_seeds, 0, "{r:?}");
    assert!(r.fallbacks > 0, "{r:?}");
}

#[test]
fn seed_index_claims_are_hash_checked_and_fall_back() {
    let old = random_bytes(2 << 20, 3);
    let new: Vec<u8> = [old[300_000..1_300_000].to_vec(), random_bytes(50_000, 4)].concat();
    let dir = tempfile::TempDir::new().unwrap();
    let store = LocalStore::open(dir.path().join("store"), true).unwrap();
    let old_index = make_index(&old, small_params(), &store);
    let index = make_index(&new, small_params(), &store);
    // The seed on disk differs from what its index claims in one region.
    let mut damaged = old.clone();
    for b in &mut damaged[600_000..700_000] {
        *b ^= 0xFF;
    }
    let seed = dir.path().join("seed.img");
    fs::write(&seed, &damaged).unwrap();
    let target = dir.path().join("target.img");
    let opts = SyncOptions {
        seeds: vec![SeedSpec {
            path: seed,
            index: Some(old_index),
        }],
        ..SyncOptions::default()
    };
    let r = sync_with(
        &index,
        &target,
        &fetcher(&store, &index),
        &opts,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fs::read(&target).unwrap(), new);
    assert!(r.fallbacks > 0 && r.bytes_from_seeds > 500_000, "{r:?}");
}

#[test]
fn a_target_index_that_lies_is_caught_by_the_final_check() {
    let old = random_bytes(1 << 20, 5);
    let new = old.clone();
    let store = MemStore::default();
    let index = make_index(&new, small_params(), &store);
    // The target claims to hold the image, but a region was overwritten since.
    let mut bytes = old.clone();
    bytes[400_000..400_100].fill(7);
    let target = MemDevice::new("target", bytes, DeviceKind::File);
    let mut sio = io(&target, vec![], 1 << 20);
    sio.target_index = Some(&index);
    let r = sync_io(&index, sio, &store, &NoProgress).unwrap();
    assert_eq!(target.bytes(), new);
    assert_eq!(r.chunks_repaired, 1, "{r:?}");
    assert_eq!(r.bytes_checked, new.len() as u64);
}

#[test]
fn a_chunk_found_nowhere_is_a_clear_error_and_the_rerun_resumes() {
    let old = random_bytes(1 << 20, 6);
    let new: Vec<u8> = [random_bytes(40_000, 7), old[200_000..].to_vec()].concat();
    let store = MemStore::default();
    let index = make_index(&new, small_params(), &store);
    let missing = index.chunks()[0].id;
    let saved = store.remove(&missing).unwrap();
    let target = MemDevice::new("target", old.clone(), DeviceKind::File);
    let mut journal = MemoryJournal::default();
    let mut sio = io(&target, vec![], 1 << 20);
    sio.journal = Some(&mut journal);
    let err = sync_io(&index, sio, &store, &NoProgress).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingChunk);
    let msg = err.to_string();
    assert!(
        msg.contains(&missing.to_string()) && msg.contains("mem-store"),
        "{msg}"
    );
    assert!(!journal.0.is_empty(), "the journal is kept for the rerun");
    store.insert(missing, saved);
    let mut sio = io(&target, vec![], 1 << 20);
    sio.journal = Some(&mut journal);
    let r = sync_io(&index, sio, &store, &NoProgress).unwrap();
    assert!(r.resumed, "{r:?}");
    assert_eq!(target.bytes()[..new.len()], new[..]);
    assert!(journal.0.is_empty(), "journal removed after success");
}

#[test]
fn dry_run_changes_nothing_and_matches_the_run() {
    let fixtures = Fixtures::from_env();
    let files = fixtures.pair(Pair::Release, Params::default()).unwrap();
    let (old, new) = (fs::read(&files.old).unwrap(), fs::read(&files.new).unwrap());
    let dir = tempfile::TempDir::new().unwrap();
    let store = LocalStore::open(dir.path().join("store"), true).unwrap();
    let index = make_index(&new, small_params(), &store);
    let target = dir.path().join("t.img");
    write_padded(&target, &old, new.len());
    let before = fs::read(&target).unwrap();
    let dry = SyncOptions {
        dry_run: true,
        ..SyncOptions::default()
    };
    let plan = sync_with(&index, &target, &fetcher(&store, &index), &dry, &NoProgress).unwrap();
    // A dry run reports what the sync would download (compared with the run below).
    assert!(plan.dry_run && plan.bytes_downloaded > 0 && plan.requests > 0);
    assert_eq!(fs::read(&target).unwrap(), before);
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        2,
        "no journal written"
    );
    // A dry run of a missing target creates nothing.
    let missing = dir.path().join("missing.img");
    let p = sync_with(
        &index,
        &missing,
        &fetcher(&store, &index),
        &dry,
        &NoProgress,
    )
    .unwrap();
    assert!(!missing.exists());
    assert_eq!(
        p.bytes_fetched,
        index
            .chunks()
            .iter()
            .filter(|c| !c.zero)
            .map(|c| u64::from(c.len))
            .sum::<u64>()
            - p.bytes_duplicated
    );
    let run = sync_with(
        &index,
        &target,
        &fetcher(&store, &index),
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap();
    for (a, b) in [
        (plan.bytes_in_place, run.bytes_in_place),
        (plan.bytes_moved, run.bytes_moved),
        (plan.bytes_fetched, run.bytes_fetched),
        (plan.bytes_downloaded, run.bytes_downloaded),
        (plan.requests, run.requests),
        (plan.phases, run.phases),
    ] {
        assert_eq!(a, b, "plan {plan:?} run {run:?}");
    }
}

#[test]
fn a_block_device_too_small_is_untouched_and_gets_no_journal() {
    // A file shorter than the image is grown (see `names.rs`); a block device is not.
    let new = random_bytes(300_000, 8);
    let dir = tempfile::TempDir::new().unwrap();
    let store = LocalStore::open(dir.path().join("store"), true).unwrap();
    let index = make_index(&new, small_params(), &store);
    let target = MemDevice::new("/dev/small", vec![1u8; 1000], DeviceKind::BlockDevice);
    let journal_path = dir.path().join("journal");
    let mut journal = FileJournal::new(&journal_path);
    let sio = SyncIo {
        journal: Some(&mut journal),
        ..io(&target, vec![], 1 << 20)
    };
    let err = sync_io(&index, sio, &fetcher(&store, &index), &NoProgress).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        err.to_string(),
        "block device /dev/small holds 1000 bytes but the image needs 300000; nothing was \
         written (use a larger device or partition)"
    );
    assert_eq!(target.bytes(), vec![1u8; 1000]);
    assert!(!journal_path.exists(), "no journal for a refused target");
}

#[test]
fn the_target_given_as_a_seed_is_not_a_second_copy() {
    // `--seed TARGET` must not make the target a read-only seed (its bytes change).
    let old = random_bytes(1 << 20, 9);
    let new: Vec<u8> = [old[500_000..].to_vec(), old[..500_000].to_vec()].concat();
    let dir = tempfile::TempDir::new().unwrap();
    let store = LocalStore::open(dir.path().join("store"), true).unwrap();
    let index = make_index(&new, small_params(), &store);
    let target = dir.path().join("t.img");
    fs::write(&target, &old).unwrap();
    let opts = SyncOptions {
        seeds: vec![SeedSpec {
            path: target.clone(),
            index: None,
        }],
        ..SyncOptions::default()
    };
    let r = sync_with(
        &index,
        &target,
        &fetcher(&store, &index),
        &opts,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fs::read(&target).unwrap(), new);
    assert_eq!(r.bytes_from_seeds, 0, "{r:?}");
    assert!(r.bytes_moved > 900_000, "{r:?}");
}
