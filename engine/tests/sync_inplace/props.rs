//! Property test of the in-place planner and executor over random layouts: blocks of
//! random bytes (chunks) arranged into an old target, a seed and a new image, with
//! repeats, zeros, junk and shifts by any amount.
//!
//! The plan is first replayed on a model of the target with no I/O at all: every read
//! (stash, move, seed) must find the bytes of its chunk, no read in a phase may overlap a
//! write of the same phase, scratch never holds more than its bound, and the model ends
//! as the image. Then the executor runs the same plan on in-memory devices: the target
//! must end as the image without a single fallback (a read after destroy would have
//! failed its hash) and without fetching more than planned.

use std::collections::HashMap;

use proptest::prelude::*;
use tessera_engine::chunk::compress;
use tessera_engine::sync::{
    apply, plan, Holder, Holdings, InPlace, Location, SeedIo, Source, SyncIo,
};
use tessera_engine::{ChunkId, ChunkerParams, DeviceKind, Index, NoProgress};

use crate::util::*;

#[derive(Debug, Clone)]
struct Layout {
    /// Block lengths; block `i` holds `random_bytes(len, 1000 + i)`.
    blocks: Vec<usize>,
    /// The new image: block numbers; numbers past the blocks are zero runs of that many
    /// bytes modulo 700, plus one.
    new: Vec<usize>,
    /// The old target: block numbers; numbers past the blocks are junk runs.
    old: Vec<usize>,
    /// A seed: block numbers.
    seed: Vec<usize>,
    scratch: u64,
    block_device: bool,
}

fn layouts() -> impl Strategy<Value = Layout> {
    (1usize..24).prop_flat_map(|n| {
        (
            prop::collection::vec(1usize..=1000, n),
            prop::collection::vec(0..n + n / 3 + 1, 1..32),
            prop::collection::vec(0..n + n / 2 + 1, 0..36),
            prop::collection::vec(0..n, 0..6),
            0u64..4000,
            any::<bool>(),
        )
            .prop_map(|(blocks, new, old, seed, scratch, block_device)| Layout {
                blocks,
                new,
                old,
                seed,
                scratch,
                block_device,
            })
    })
}

fn block(layout: &Layout, b: usize, junk_salt: u64) -> Vec<u8> {
    match layout.blocks.get(b) {
        Some(&len) => random_bytes(len, 1000 + b as u64),
        None if junk_salt == 0 => vec![0; b * 37 % 700 + 1],
        None => random_bytes(b * 53 % 900 + 1, junk_salt + b as u64),
    }
}

/// The bytes of a list of blocks, and where each starts.
fn assemble(layout: &Layout, list: &[usize], junk_salt: u64) -> (Vec<u8>, Vec<u64>) {
    let mut bytes = Vec::new();
    let mut starts = Vec::new();
    for &b in list {
        starts.push(bytes.len() as u64);
        bytes.extend(block(layout, b, junk_salt));
    }
    (bytes, starts)
}

fn run(layout: Layout) -> Result<(), TestCaseError> {
    run_counting(layout).map(|_| ())
}

/// Runs `layout`; returns the index and the store (which counts what it served).
fn run_counting(layout: Layout) -> Result<(Index, MemStore), TestCaseError> {
    let params = ChunkerParams::new(64, 256, 1024).unwrap();
    let (new, _) = assemble(&layout, &layout.new, 0);
    let records = layout.new.iter().map(|&b| {
        let data = block(&layout, b, 0);
        (ChunkId::of(&data), data.len() as u32)
    });
    let index = Index::new(params, *blake3::hash(&new).as_bytes(), records).unwrap();
    let (mut old, old_starts) = assemble(&layout, &layout.old, 7_000_000);
    if old.len() < new.len() {
        let pad = random_bytes(new.len() - old.len(), 99);
        old.extend(pad);
    }
    let (seed, seed_starts) = assemble(&layout, &layout.seed, 0);

    // What a perfect scan finds.
    let mut holdings = Holdings {
        in_place: index
            .chunks()
            .iter()
            .map(|c| {
                let here = &old[c.offset as usize..c.end() as usize];
                if ChunkId::of(here) == c.id {
                    InPlace::Verified
                } else {
                    InPlace::No
                }
            })
            .collect(),
        locations: HashMap::new(),
    };
    let wanted: HashMap<ChunkId, u32> = index
        .chunks()
        .iter()
        .filter(|c| !c.zero)
        .map(|c| (c.id, c.len))
        .collect();
    let mut add = |b: usize, holder: Holder, offset: u64| {
        if let Some(&len) = layout.blocks.get(b) {
            let id = ChunkId::of(&random_bytes(len, 1000 + b as u64));
            if wanted.contains_key(&id) {
                let loc = Location {
                    holder,
                    offset,
                    verified: true,
                };
                holdings.locations.entry(id).or_default().push(loc);
            }
        }
    };
    for (&b, &at) in layout.old.iter().zip(&old_starts) {
        add(b, Holder::Target, at);
    }
    for (&b, &at) in layout.seed.iter().zip(&seed_starts) {
        add(b, Holder::Seed(0), at);
    }

    let p = plan(&index, &holdings, layout.scratch);
    prop_assert!(p.totals.scratch_peak <= layout.scratch);

    // Replay on a model.
    let chunk_bytes = |k: u32| {
        let c = &index.chunks()[k as usize];
        new[c.offset as usize..c.end() as usize].to_vec()
    };
    let mut model = old.clone();
    let mut scratch: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut live = 0u64;
    for (n, phase) in p.phases.iter().enumerate() {
        for s in &phase.stash {
            let c = &index.chunks()[s.chunk as usize];
            let data = model[s.offset as usize..(s.offset + u64::from(c.len)) as usize].to_vec();
            prop_assert_eq!(
                ChunkId::of(&data),
                c.id,
                "phase {}: stash reads destroyed bytes",
                n
            );
            live += u64::from(c.len);
            prop_assert!(
                live <= layout.scratch,
                "scratch {} over {}",
                live,
                layout.scratch
            );
            scratch.insert(s.chunk, data);
        }
        let dests: Vec<(u64, u64)> = phase
            .ops
            .iter()
            .flat_map(|op| {
                op.chunks.iter().map(|&k| {
                    (
                        index.chunks()[k as usize].offset,
                        index.chunks()[k as usize].end(),
                    )
                })
            })
            .collect();
        let mut writes = Vec::new();
        for op in &phase.ops {
            let len = u64::from(op.len);
            let data = match op.source {
                Source::Zero => vec![0; op.len as usize],
                Source::Store => chunk_bytes(op.chunks[0]),
                Source::Seed { seed: s, offset } => {
                    prop_assert_eq!(s, 0);
                    seed[offset as usize..(offset + len) as usize].to_vec()
                }
                Source::Target { offset } => {
                    for &(a, b) in &dests {
                        prop_assert!(
                            offset + len <= a || b <= offset,
                            "phase {}: read of {} overlaps a write",
                            n,
                            offset
                        );
                    }
                    model[offset as usize..(offset + len) as usize].to_vec()
                }
                Source::Scratch { chunk } => {
                    live -= len;
                    scratch
                        .remove(&chunk)
                        .ok_or_else(|| TestCaseError::fail("scratch entry missing"))?
                }
            };
            prop_assert_eq!(
                ChunkId::of(&data),
                op.id,
                "phase {}: {:?} reads the wrong bytes",
                n,
                op.source
            );
            for &k in &op.chunks {
                writes.push((index.chunks()[k as usize].offset, data.clone()));
            }
        }
        for (at, data) in writes {
            model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
    }
    prop_assert!(scratch.is_empty(), "stashes never used");
    prop_assert!(
        model[..new.len()] == new[..],
        "the model does not end as the image"
    );

    // Execute it.
    let store = MemStore::default();
    for c in index.chunks().iter().filter(|c| !c.zero) {
        store.insert(c.id, compress(&new[c.offset as usize..c.end() as usize]));
    }
    let kind = if layout.block_device {
        DeviceKind::BlockDevice
    } else {
        DeviceKind::File
    };
    let target = MemDevice::new("target", old.clone(), kind);
    let seed_dev = MemDevice::new("seed", seed.clone(), DeviceKind::File);
    let io = SyncIo {
        target: &target,
        target_id: "target".into(),
        target_fresh: false,
        target_index: None,
        seeds: vec![SeedIo {
            reader: &seed_dev,
            id: "seed".into(),
            index: None,
        }],
        journal: None,
        dry_run: false,
        scratch_size: layout.scratch,
        workers: 3,
    };
    let r = apply(&index, &p, io, &store, &NoProgress).unwrap();
    let after = target.bytes();
    prop_assert!(
        after[..new.len()] == new[..],
        "the target does not end as the image"
    );
    prop_assert!(
        after[new.len()..] == old[new.len()..],
        "bytes past the image changed"
    );
    prop_assert_eq!(r.fallbacks, 0, "a planned source failed its hash: {:?}", r);
    prop_assert_eq!(r.bytes_fetched, p.totals.bytes_fetched);
    prop_assert_eq!(r.chunks_repaired, 0);
    Ok((index, store))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("TESSERA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_layouts_plan_safely_and_apply_exactly(layout in layouts()) {
        run(layout)?;
    }
}

#[test]
fn a_three_cycle_with_no_scratch_is_fetched_once() {
    // Blocks 0 1 2 rotated: every move destroys another's source.
    let layout = Layout {
        blocks: vec![300, 300, 300],
        new: vec![1, 2, 0],
        old: vec![0, 1, 2],
        seed: vec![],
        scratch: 0,
        block_device: true,
    };
    let (index, store) = run_counting(layout).unwrap();
    let counts: Vec<u64> = index
        .chunks()
        .iter()
        .map(|c| store.fetches_of(&c.id))
        .collect();
    eprintln!("fetches per chunk of the cycle: {counts:?}");
    assert_eq!(counts.len(), 3);
    assert!(
        counts.iter().all(|&n| n <= 1),
        "a chunk fetched twice: {counts:?}"
    );
    assert_eq!(
        counts.iter().sum::<u64>(),
        1,
        "the cycle is broken by one fetch: {counts:?}"
    );
}
