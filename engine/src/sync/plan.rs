//! The planner: for each chunk of the new image, where its bytes come from, and in which
//! phase it is written.
//!
//! [`plan`] is pure: it takes the index and what the target and seeds were found to hold
//! ([`Holdings`], from a scan or from seed indexes) and returns a [`SyncPlan`], a value that
//! can be printed, stored in the resume journal and executed. No I/O happens here, so the
//! planner is unit- and property-tested on its own.
//!
//! Sources, best first: a chunk already in place is not written at all; then a copy in the
//! target that no write of this sync touches; a seed (read-only, so no ordering
//! constraint); a copy in the target that some write will destroy (a *move*, ordered by
//! [`super::order`]); the store. Chunks of zeros become holes on files. A chunk needed at
//! several places is read or fetched once per phase, and a chunk fetched in one phase is
//! copied from its new place in later phases instead of being fetched again.

use std::collections::HashMap;

use serde::{Serialize, Serializer};

use super::order::{schedule, Node};
use crate::index::Index;
use crate::ChunkId;

/// What holds a copy of a chunk: the target itself or one of the seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder {
    /// The target (always a seed of itself).
    Target,
    /// Seed number `n` (0-based, in the order given).
    Seed(u16),
}

/// A place where a chunk of the image was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The target or a seed.
    pub holder: Holder,
    /// Byte offset of the chunk there.
    pub offset: u64,
    /// True when this run hashed the bytes there; false when only an index says so. Both
    /// kinds are hashed again when read, so this only ranks sources.
    pub verified: bool,
}

/// Whether the target already holds a chunk of the image at its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InPlace {
    /// It does not (or nobody knows): the chunk is written.
    No,
    /// This run hashed the target there and found the chunk.
    Verified,
    /// An index of the target (or the target's creation) says so; the final check of the
    /// sync reads it back.
    Assumed,
}

/// What the target and the seeds hold: the planner's whole view of the world.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Per chunk of the image, in index order.
    pub in_place: Vec<InPlace>,
    /// Where non-zero chunks of the image were seen, by id.
    pub locations: HashMap<ChunkId, Vec<Location>>,
}

/// Where one write takes its bytes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum Source {
    /// Zeros: a hole on a file, zeros on a block device.
    Zero,
    /// Fetched from the store.
    Store,
    /// Read from seed `seed` at `offset`.
    Seed {
        /// Seed number.
        seed: u16,
        /// Byte offset in the seed.
        offset: u64,
    },
    /// Read from the target at `offset` (intact for the whole phase).
    Target {
        /// Byte offset in the target.
        offset: u64,
    },
    /// Taken from scratch, where the stash of chunk `chunk` put it.
    Scratch {
        /// The chunk (index position) whose stash holds the bytes.
        chunk: u32,
    },
}

/// A read into scratch at the start of a phase, before any of its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stash {
    /// The chunk (index position) the bytes are for.
    pub chunk: u32,
    /// Where they are read in the target.
    pub offset: u64,
}

/// One chunk's bytes obtained once and written at one or more places.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    /// The chunk id.
    #[serde(serialize_with = "hex")]
    pub id: ChunkId,
    /// Its length.
    pub len: u32,
    /// Where its bytes come from.
    #[serde(flatten)]
    pub source: Source,
    /// Index positions of the chunks it is written as, ascending.
    pub chunks: Vec<u32>,
}

/// Writes that may go in any order, followed by a barrier (flush, then checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Phase {
    /// Target ranges read into scratch before the phase's first write.
    pub stash: Vec<Stash>,
    /// The writes, by ascending first destination.
    pub ops: Vec<Op>,
}

/// What a plan will do, in bytes of the image (each byte counted once).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanTotals {
    /// Bytes in the image.
    pub image_size: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// Bytes already in place: not written.
    pub bytes_in_place: u64,
    /// Bytes copied from seeds.
    pub bytes_from_seeds: u64,
    /// Bytes copied from elsewhere in the target (moves, via scratch or not).
    pub bytes_moved: u64,
    /// Bytes fetched from the store (uncompressed, each fetched chunk once).
    pub bytes_fetched: u64,
    /// Chunks fetched from the store.
    pub chunks_fetched: u64,
    /// Bytes written as further copies of a chunk read or fetched once for several places.
    pub bytes_duplicated: u64,
    /// Bytes of zero chunks written (holes on files).
    pub bytes_zero: u64,
    /// Bytes read into scratch.
    pub bytes_stashed: u64,
    /// Most bytes held in scratch at once.
    pub scratch_peak: u64,
    /// Phases (each ends with a flush and a checkpoint).
    pub phases: u64,
}

/// A complete sync plan: the phases to execute, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncPlan {
    /// Totals over the whole plan.
    pub totals: PlanTotals,
    /// The phases.
    pub phases: Vec<Phase>,
}

fn hex<S: Serializer>(id: &ChunkId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Plans writing the image of `index` into a target holding `holdings`, with at most
/// `scratch_size` bytes of scratch at any time.
///
/// # Panics
/// If `holdings.in_place` does not have one entry per chunk of the index.
pub fn plan(index: &Index, holdings: &Holdings, scratch_size: u64) -> SyncPlan {
    let chunks = index.chunks();
    assert_eq!(
        holdings.in_place.len(),
        chunks.len(),
        "one in-place flag per chunk"
    );
    let pending: Vec<u32> = (0..chunks.len() as u32)
        .filter(|&k| holdings.in_place[k as usize] == InPlace::No)
        .collect();
    // Destinations still to write, sorted and disjoint: a target copy overlapping none of
    // them is never destroyed.
    let overlapped = |offset: u64, len: u32| -> usize {
        let end = offset + u64::from(len);
        let first = pending.partition_point(|&k| chunks[k as usize].end() <= offset);
        pending[first..]
            .iter()
            .take_while(|&&k| chunks[k as usize].offset < end)
            .count()
    };
    let choices: Vec<Source> = pending
        .iter()
        .map(|&k| {
            let c = &chunks[k as usize];
            if c.zero {
                return Source::Zero;
            }
            let Some(locs) = holdings.locations.get(&c.id) else {
                return Source::Store;
            };
            locs.iter()
                .map(|l| {
                    let (rank, conflicts) = match l.holder {
                        Holder::Target => match overlapped(l.offset, c.len) {
                            0 => (0, 0),
                            n => (4, n),
                        },
                        Holder::Seed(_) => (1, 0),
                    };
                    // Unverified copies rank after verified ones of the next kind.
                    let rank = if l.verified { rank } else { rank + 1 };
                    ((rank, conflicts, l.holder, l.offset), l)
                })
                .min_by_key(|(key, _)| *key)
                .map_or(Source::Store, |(_, l)| match l.holder {
                    Holder::Target => Source::Target { offset: l.offset },
                    Holder::Seed(seed) => Source::Seed {
                        seed,
                        offset: l.offset,
                    },
                })
        })
        .collect();
    let nodes: Vec<Node> = pending
        .iter()
        .zip(&choices)
        .map(|(&k, src)| Node {
            offset: chunks[k as usize].offset,
            len: chunks[k as usize].len,
            source: match *src {
                Source::Target { offset } => Some(offset),
                _ => None,
            },
        })
        .collect();
    let sched = schedule(&nodes, scratch_size);

    let mut phases = Vec::with_capacity(sched.steps.len());
    // First place each id was written, for copies in later phases.
    let mut written: HashMap<ChunkId, u64> = HashMap::new();
    for step in &sched.steps {
        let stash = step
            .stash
            .iter()
            .map(|&j| Stash {
                chunk: pending[j],
                offset: nodes[j].source.expect("stashed nodes read the target"),
            })
            .collect();
        let mut ops: Vec<Op> = Vec::new();
        let mut by_id: HashMap<ChunkId, usize> = HashMap::new();
        for &j in &step.run {
            let k = pending[j];
            let c = &chunks[k as usize];
            let source = if sched.stashed[j] {
                Source::Scratch { chunk: k }
            } else if sched.dropped[j] {
                Source::Store
            } else {
                choices[j]
            };
            if matches!(source, Source::Scratch { .. }) {
                ops.push(Op {
                    id: c.id,
                    len: c.len,
                    source,
                    chunks: vec![k],
                });
                continue;
            }
            match by_id.get(&c.id) {
                Some(&i) => {
                    let op = &mut ops[i];
                    op.chunks.push(k);
                    if op.source == Source::Store {
                        // Any local copy that is intact this phase serves every place.
                        op.source = source;
                    }
                }
                None => {
                    by_id.insert(c.id, ops.len());
                    ops.push(Op {
                        id: c.id,
                        len: c.len,
                        source,
                        chunks: vec![k],
                    });
                }
            }
        }
        for op in &mut ops {
            if op.source == Source::Store {
                if let Some(&offset) = written.get(&op.id) {
                    op.source = Source::Target { offset };
                }
            }
        }
        for op in &ops {
            if op.source != Source::Zero {
                written
                    .entry(op.id)
                    .or_insert(chunks[op.chunks[0] as usize].offset);
            }
        }
        ops.sort_by_key(|op| op.chunks[0]);
        phases.push(Phase { stash, ops });
    }
    let mut totals = totals(index, &phases);
    totals.scratch_peak = sched.scratch_peak;
    SyncPlan { totals, phases }
}

/// Totals of `phases` (all or the remaining ones of a plan) over the image of `index`.
/// `scratch_peak` is left at zero: only the planner knows it.
pub(crate) fn totals(index: &Index, phases: &[Phase]) -> PlanTotals {
    let mut t = PlanTotals {
        image_size: index.image_size(),
        chunks: index.chunks().len() as u64,
        phases: phases.len() as u64,
        ..PlanTotals::default()
    };
    let mut written = 0u64;
    for phase in phases {
        for s in &phase.stash {
            t.bytes_stashed += u64::from(index.chunks()[s.chunk as usize].len);
        }
        for op in &phase.ops {
            let len = u64::from(op.len);
            let n = op.chunks.len() as u64;
            written += len * n;
            let first = match op.source {
                Source::Zero => {
                    t.bytes_zero += len * n;
                    continue;
                }
                Source::Store => {
                    t.chunks_fetched += 1;
                    &mut t.bytes_fetched
                }
                Source::Seed { .. } => &mut t.bytes_from_seeds,
                Source::Target { .. } | Source::Scratch { .. } => &mut t.bytes_moved,
            };
            *first += len;
            t.bytes_duplicated += len * (n - 1);
        }
    }
    t.bytes_in_place = t.image_size - written;
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ZeroIds;
    use crate::ChunkerParams;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    fn index(chunks: &[(u32, u32)]) -> Index {
        let p = ChunkerParams::new(64, 256, 1024).unwrap();
        Index::new(p, [0; 32], chunks.iter().map(|&(n, len)| (id(n), len))).unwrap()
    }

    fn at(holder: Holder, offset: u64) -> Location {
        Location {
            holder,
            offset,
            verified: true,
        }
    }

    #[test]
    fn in_place_chunks_are_not_written_and_sources_are_ranked() {
        // Image: A B C D (100 bytes each). Target: A in place, B at 300 (where D goes),
        // C in a seed and at a stable place past the image, D nowhere.
        let idx = index(&[(1, 100), (2, 100), (3, 100), (4, 100)]);
        let mut h = Holdings {
            in_place: vec![InPlace::Verified, InPlace::No, InPlace::No, InPlace::No],
            ..Holdings::default()
        };
        h.locations.insert(id(2), vec![at(Holder::Target, 300)]);
        h.locations.insert(
            id(3),
            vec![at(Holder::Seed(0), 0), at(Holder::Target, 1000)],
        );
        let p = plan(&idx, &h, 1 << 20);
        let t = &p.totals;
        assert_eq!(
            (
                t.bytes_in_place,
                t.bytes_moved,
                t.bytes_fetched,
                t.bytes_from_seeds
            ),
            (100, 200, 100, 0)
        );
        // B is stashed from 300 before D is written there, all in one phase...
        assert_eq!(p.phases.len(), 1);
        assert_eq!(
            p.phases[0].stash,
            vec![Stash {
                chunk: 1,
                offset: 300
            }]
        );
        let sources: Vec<_> = p.phases[0].ops.iter().map(|o| o.source).collect();
        assert_eq!(
            sources,
            vec![
                Source::Scratch { chunk: 1 },
                Source::Target { offset: 1000 },
                Source::Store
            ]
        );
        // ...or, without scratch, B is copied in a first phase and D written after it.
        let p = plan(&idx, &h, 0);
        assert_eq!(p.phases.len(), 2);
        assert!(p.phases[0]
            .ops
            .iter()
            .any(|o| o.source == Source::Target { offset: 300 }));
        assert_eq!(p.phases[1].ops[0].source, Source::Store);
        assert_eq!(p.totals.bytes_moved, 200);
    }

    #[test]
    fn duplicates_are_fetched_once() {
        let idx = index(&[(1, 100), (2, 100), (1, 100), (1, 100)]);
        let h = Holdings {
            in_place: vec![InPlace::No; 4],
            ..Holdings::default()
        };
        let p = plan(&idx, &h, 0);
        assert_eq!(p.totals.chunks_fetched, 2);
        assert_eq!(p.totals.bytes_duplicated, 200);
        assert_eq!(p.phases.len(), 1);
    }

    #[test]
    fn zero_chunks_are_holes() {
        let p = ChunkerParams::new(64, 256, 1024).unwrap();
        let z = ZeroIds::default().get(500);
        let idx = Index::new(p, [0; 32], [(z, 500), (id(7), 10), (z, 500)]).unwrap();
        let h = Holdings {
            in_place: vec![InPlace::No, InPlace::No, InPlace::Assumed],
            ..Holdings::default()
        };
        let plan = plan(&idx, &h, 0);
        assert_eq!(plan.totals.bytes_zero, 500);
        assert_eq!(plan.totals.bytes_in_place, 500);
        assert_eq!(plan.totals.bytes_fetched, 10);
    }
}
