//! The executor: runs a [`SyncPlan`](super::SyncPlan)'s phases against a target.
//!
//! Per phase: the stashes are read into scratch (in parallel, each hashed); then a
//! dispatcher hands the phase's ops out in order, store ops to one feeder that drains
//! [`ChunkStore::fetch_ordered`] (so remote stores keep many requests in flight) and local
//! ops (seed, target, scratch) to reader threads that read and hash; the calling thread
//! writes the results back in op order, i.e. by ascending destination, merging adjacent
//! writes and adjacent holes. A window of tokens bounds the ops in flight, so memory stays
//! bounded whatever the phase size. The phase ends with a flush of the target.
//!
//! Bytes reach the writer only as [`VerifiedChunk`]s. When a seed or target copy does not
//! hash to its id (torn by a crash, changed since the scan, a bad sector), the op falls
//! back to the other seed copies the scan knows of, then to the store; a chunk nobody has
//! is an error naming it and every place tried.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{bounded, unbounded};

use super::io::{ReadAt, WriteAt};
use super::plan::{Holder, Location, Op, Phase, Source, Stash};
use crate::chunk::VerifiedChunk;
use crate::error::{Error, Result};
use crate::index::{ChunkEntry, Index};
use crate::progress::Progress;
use crate::store::{ChunkStore, Fetched};
use crate::verify::check_chunks_with;
use crate::ChunkId;

/// Writes of adjacent chunks are merged up to this size.
const COALESCE: usize = 1 << 20;

/// Byte counters of a run, shared by the worker threads.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub from_seeds: AtomicU64,
    pub moved: AtomicU64,
    pub fetched: AtomicU64,
    pub downloaded: AtomicU64,
    pub requests: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub duplicated: AtomicU64,
    pub zero: AtomicU64,
    pub written: AtomicU64,
    pub stashed: AtomicU64,
    pub fallbacks: AtomicU64,
    pub checked: AtomicU64,
    pub repaired: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// How an op's bytes were obtained (after any fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Seed,
    Target,
    Store,
    Zero,
}

/// Runs phases against a target.
pub(crate) struct Executor<'a> {
    pub index: &'a Index,
    pub target: &'a dyn WriteAt,
    pub seeds: &'a [&'a dyn ReadAt],
    pub store: &'a dyn ChunkStore,
    pub progress: &'a dyn Progress,
    pub workers: usize,
    /// Verified-or-claimed copies by id; only seed copies are used as fallbacks (target
    /// copies may have been overwritten since the plan was made).
    pub alternatives: &'a HashMap<ChunkId, Vec<Location>>,
    pub counters: Counters,
    /// Per chunk of the image: this run hashed it at its place, or wrote it there from
    /// verified bytes. The final check reads the others.
    pub verified: Vec<AtomicBool>,
    scratch: Mutex<HashMap<u32, VerifiedChunk>>,
}

impl<'a> Executor<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: &'a Index,
        target: &'a dyn WriteAt,
        seeds: &'a [&'a dyn ReadAt],
        store: &'a dyn ChunkStore,
        progress: &'a dyn Progress,
        workers: usize,
        alternatives: &'a HashMap<ChunkId, Vec<Location>>,
        verified: Vec<bool>,
    ) -> Executor<'a> {
        Executor {
            index,
            target,
            seeds,
            store,
            progress,
            workers: workers.max(1),
            alternatives,
            counters: Counters::default(),
            verified: verified.into_iter().map(AtomicBool::new).collect(),
            scratch: Mutex::new(HashMap::new()),
        }
    }

    fn entry(&self, chunk: u32) -> &ChunkEntry {
        &self.index.chunks()[chunk as usize]
    }

    /// Runs `f` on every item with the worker threads; the first error stops the others.
    fn parallel<T: Sync>(&self, items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.workers.min(items.len()))
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        while !failed.load(Ordering::Relaxed) {
                            let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else {
                                break;
                            };
                            if let Err(e) = f(item) {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            let mut result = Ok(());
            for h in handles {
                let r = h.join().expect("sync worker panicked");
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }

    /// Reads `len` bytes at `offset` of `dev` and checks they hash to `id`.
    fn read_verified<D: ReadAt + ?Sized>(
        &self,
        dev: &D,
        what: &str,
        id: ChunkId,
        len: u32,
        offset: u64,
    ) -> Result<VerifiedChunk> {
        let mut buf = vec![0u8; len as usize];
        dev.read_exact_at(&mut buf, offset)?;
        VerifiedChunk::verify_with(
            self.index.digest(),
            id,
            buf,
            &format!("{what} {} at offset {offset}", dev.name()),
        )
    }

    fn fetch(&self, entry: &ChunkEntry) -> Result<VerifiedChunk> {
        self.store
            .fetch_verified(entry)
            .map(|f| self.count_fetch(f))
    }

    /// Counts a fetched chunk (once, however many places it is written to).
    fn count_fetch(&self, fetched: Fetched) -> VerifiedChunk {
        add(&self.counters.fetched, fetched.chunk.data().len() as u64);
        add(&self.counters.downloaded, fetched.downloaded);
        add(&self.counters.requests, fetched.requests);
        self.progress.requests(fetched.requests);
        add(&self.counters.chunks_fetched, 1);
        fetched.chunk
    }

    /// The bytes of `op` from its planned source, or from a fallback when that fails.
    fn obtain(&self, id: ChunkId, chunk: u32, source: Source) -> Result<(VerifiedChunk, Got)> {
        let len = self.entry(chunk).len;
        let first = match source {
            Source::Seed { seed, offset } => match self.seeds.get(usize::from(seed)) {
                Some(dev) => self
                    .read_verified(*dev, "seed", id, len, offset)
                    .map(|c| (c, Got::Seed)),
                None => Err(Error::InvalidInput(format!(
                    "the plan names seed {seed}, which is not open"
                ))),
            },
            Source::Target { offset } => self
                .read_verified(self.target, "target", id, len, offset)
                .map(|c| (c, Got::Target)),
            Source::Scratch { chunk } => match self.scratch.lock().expect("scratch").remove(&chunk)
            {
                Some(c) => Ok((c, Got::Target)),
                None => Err(Error::MissingChunk {
                    id,
                    origin: "scratch".into(),
                }),
            },
            Source::Store => return self.fetch(self.entry(chunk)).map(|c| (c, Got::Store)),
            Source::Zero => unreachable!("zero ops have no bytes to obtain"),
        };
        let first_err = match first {
            Ok(got) => return Ok(got),
            Err(e) => e,
        };
        add(&self.counters.fallbacks, 1);
        self.fallback(id, chunk, source, first_err)
    }

    /// Other seed copies, then the store. The error names every place tried.
    fn fallback(
        &self,
        id: ChunkId,
        chunk: u32,
        failed: Source,
        first_err: Error,
    ) -> Result<(VerifiedChunk, Got)> {
        let len = self.entry(chunk).len;
        let mut tried = vec![first_err.to_string()];
        for loc in self.alternatives.get(&id).into_iter().flatten() {
            let Holder::Seed(seed) = loc.holder else {
                continue;
            };
            if failed
                == (Source::Seed {
                    seed,
                    offset: loc.offset,
                })
            {
                continue;
            }
            let Some(dev) = self.seeds.get(usize::from(seed)) else {
                continue;
            };
            match self.read_verified(*dev, "seed", id, len, loc.offset) {
                Ok(c) => return Ok((c, Got::Seed)),
                Err(e) => tried.push(e.to_string()),
            }
        }
        match self.fetch(self.entry(chunk)) {
            Ok(c) => Ok((c, Got::Store)),
            Err(Error::MissingChunk { .. }) => Err(Error::MissingChunk {
                id,
                origin: format!(
                    "{} and every other source ({})",
                    self.store.location(),
                    tried.join("; ")
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// Reads the stashes into scratch.
    fn stash(&self, stashes: &[Stash]) -> Result<()> {
        self.parallel(stashes, |s| {
            let id = self.entry(s.chunk).id;
            let (chunk, _) = self.obtain(id, s.chunk, Source::Target { offset: s.offset })?;
            add(&self.counters.stashed, chunk.data().len() as u64);
            self.scratch.lock().expect("scratch").insert(s.chunk, chunk);
            Ok(())
        })
    }

    /// Runs one phase: stashes (plus `restash`, live stashes of earlier phases that a
    /// resumed run must read again), writes, flush.
    pub fn run_phase(&self, phase: &Phase, restash: &[Stash]) -> Result<()> {
        self.stash(restash)?;
        self.stash(&phase.stash)?;
        self.write_ops(&phase.ops)?;
        self.target.flush()
    }

    /// Hashes the chunks `list` at their place in the target; returns those that differ.
    pub fn check(&self, list: &[u32]) -> Result<Vec<u32>> {
        let bad = check_chunks_with(
            self.index,
            self.target,
            list.iter().copied(),
            self.workers,
            self.progress,
            |k, c, _, good| {
                add(&self.counters.checked, u64::from(c.len));
                if good {
                    self.verified[k as usize].store(true, Ordering::Relaxed);
                }
                Ok(())
            },
        )?;
        let mut bad: Vec<u32> = bad.into_iter().map(|m| m.chunk).collect();
        bad.sort_unstable();
        Ok(bad)
    }

    /// Rewrites `bad` chunks from seeds or the store, then flushes. Nothing else is
    /// pending, so these writes conflict with nothing.
    pub fn repair(&self, bad: &[u32]) -> Result<()> {
        let mut ops: Vec<Op> = Vec::new();
        let mut by_id: HashMap<ChunkId, usize> = HashMap::new();
        for &k in bad {
            let c = self.entry(k);
            if let Some(&i) = by_id.get(&c.id) {
                ops[i].chunks.push(k);
                continue;
            }
            let seed = self
                .alternatives
                .get(&c.id)
                .into_iter()
                .flatten()
                .find_map(|l| match l.holder {
                    Holder::Seed(seed) => Some(Source::Seed {
                        seed,
                        offset: l.offset,
                    }),
                    Holder::Target => None,
                });
            by_id.insert(c.id, ops.len());
            ops.push(Op {
                id: c.id,
                len: c.len,
                source: if c.zero {
                    Source::Zero
                } else {
                    seed.unwrap_or(Source::Store)
                },
                chunks: vec![k],
            });
        }
        add(&self.counters.repaired, bad.len() as u64);
        self.write_ops(&ops)?;
        self.target.flush()
    }

    /// Obtains and writes `ops` in order, with bounded look-ahead.
    fn write_ops(&self, ops: &[Op]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let window = super::memory::look_ahead(
            u64::from(self.index.params().max),
            (self.workers * 8).max(self.store.in_flight() * 2).max(16),
        );
        let (token_tx, token_rx) = bounded::<()>(window);
        for _ in 0..window {
            token_tx.send(()).expect("receiver alive");
        }
        let (local_tx, local_rx) = bounded::<usize>(window);
        let (store_tx, store_rx) = bounded::<usize>(window);
        let (done_tx, done_rx) = unbounded::<(usize, Result<Option<(VerifiedChunk, Got)>>)>();
        let abort = AtomicBool::new(false);
        let store_list = store_entries(self.index, ops);
        std::thread::scope(|s| {
            let abort = &abort;
            {
                let done_tx = done_tx.clone();
                s.spawn(move || {
                    for (i, op) in ops.iter().enumerate() {
                        if token_rx.recv().is_err() || abort.load(Ordering::Relaxed) {
                            break;
                        }
                        let sent = match op.source {
                            Source::Zero => done_tx.send((i, Ok(None))).is_ok(),
                            Source::Store => store_tx.send(i).is_ok(),
                            _ => local_tx.send(i).is_ok(),
                        };
                        if !sent {
                            break;
                        }
                    }
                });
            }
            {
                let done_tx = done_tx.clone();
                s.spawn(move || {
                    let mut stream = self.store.fetch_ordered(store_list);
                    for i in store_rx {
                        let entry = self.entry(ops[i].chunks[0]);
                        let r = match stream.next() {
                            Some(Ok(f)) => Ok(Some((self.count_fetch(f), Got::Store))),
                            Some(Err(e)) => Err(e),
                            None => Err(Error::MissingChunk {
                                id: entry.id,
                                origin: format!(
                                    "{} (its fetch stream ended early)",
                                    self.store.location()
                                ),
                            }),
                        };
                        if done_tx.send((i, r)).is_err() {
                            break;
                        }
                    }
                });
            }
            for _ in 0..self.workers {
                let done_tx = done_tx.clone();
                let local_rx = local_rx.clone();
                s.spawn(move || {
                    for i in local_rx {
                        let op = &ops[i];
                        let r = if abort.load(Ordering::Relaxed) {
                            Err(Error::InvalidInput("cancelled".into()))
                        } else {
                            self.obtain(op.id, op.chunks[0], op.source).map(Some)
                        };
                        if done_tx.send((i, r)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(done_tx);
            drop(local_rx);

            let mut writer = Writer::new(self.target, self.index.image_size());
            let mut pending = BTreeMap::new();
            let mut next = 0;
            let result = (|| -> Result<()> {
                while next < ops.len() {
                    let (i, r) = done_rx
                        .recv()
                        .map_err(|_| Error::InvalidInput("sync workers stopped early".into()))?;
                    pending.insert(i, r);
                    while let Some(r) = pending.remove(&next) {
                        self.write_op(&mut writer, &ops[next], r?)?;
                        let _ = token_tx.send(());
                        next += 1;
                    }
                }
                writer.finish()
            })();
            if result.is_err() {
                abort.store(true, Ordering::Relaxed);
                // Best effort: keep what was written so far for the next run.
                let _ = writer.finish();
            }
            drop(token_tx);
            drop(done_rx);
            result
        })
    }

    fn write_op(
        &self,
        writer: &mut Writer<'_>,
        op: &Op,
        got: Option<(VerifiedChunk, Got)>,
    ) -> Result<()> {
        let len = u64::from(op.len);
        let n = op.chunks.len() as u64;
        let (data, how) = match &got {
            Some((c, how)) => (Some(c.data()), *how),
            None => (None, Got::Zero),
        };
        for &k in &op.chunks {
            let offset = self.entry(k).offset;
            match data {
                Some(d) => {
                    writer.write(offset, d)?;
                    self.verified[k as usize].store(true, Ordering::Relaxed);
                }
                // Read back by the final check: a hole is not a hash.
                None => writer.zero(offset, len)?,
            }
        }
        match how {
            Got::Seed => add(&self.counters.from_seeds, len),
            Got::Target => add(&self.counters.moved, len),
            // Counted (once per fetch) when fetched.
            Got::Store => {}
            Got::Zero => add(&self.counters.zero, len),
        }
        let extra = len * (n - 1);
        add(
            if how == Got::Zero {
                &self.counters.zero
            } else {
                &self.counters.duplicated
            },
            extra,
        );
        add(&self.counters.written, len * n);
        self.progress.advance(len * n);
        self.progress.chunks(n);
        Ok(())
    }
}

/// The one door through which the executor writes to the target: any range that
/// leaves `0..image_size` is an error naming it, never a write (a malformed index or plan
/// must not make sync write past the image, into the rest of a partition).
pub(crate) struct Bounded<'a> {
    pub target: &'a dyn WriteAt,
    pub image_size: u64,
}

impl Bounded<'_> {
    fn check(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.image_size => Ok(()),
            _ => Err(Error::InvalidInput(format!(
                "refusing to {what} {len} bytes at offset {offset} of {}: outside the image \
                 (0..{}); the index or plan is inconsistent",
                self.target.name(),
                self.image_size
            ))),
        }
    }

    /// Writes `data` at `offset` if it lies within the image.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check("write", offset, data.len() as u64)?;
        self.target.write_all_at(data, offset)
    }

    /// Zeros `len` bytes at `offset` if they lie within the image.
    pub fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        self.check("zero", offset, len)?;
        self.target.write_zeros(offset, len)
    }
}

/// Merges adjacent writes (and adjacent holes) into large ones.
struct Writer<'a> {
    target: Bounded<'a>,
    buf: Vec<u8>,
    buf_at: u64,
    zero_at: u64,
    zero_len: u64,
}

impl<'a> Writer<'a> {
    fn new(target: &'a dyn WriteAt, image_size: u64) -> Writer<'a> {
        Writer {
            target: Bounded { target, image_size },
            buf: Vec::with_capacity(COALESCE),
            buf_at: 0,
            zero_at: 0,
            zero_len: 0,
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.flush_zeros()?;
        if !self.buf.is_empty()
            && self.buf_at + self.buf.len() as u64 == offset
            && self.buf.len() + data.len() <= COALESCE
        {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        self.flush_data()?;
        if data.len() >= COALESCE {
            return self.target.write_all_at(data, offset);
        }
        self.buf_at = offset;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.flush_data()?;
        if self.zero_len > 0 && self.zero_at + self.zero_len == offset {
            self.zero_len += len;
            return Ok(());
        }
        self.flush_zeros()?;
        self.zero_at = offset;
        self.zero_len = len;
        Ok(())
    }

    fn flush_data(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.target.write_all_at(&self.buf, self.buf_at)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if self.zero_len > 0 {
            self.target.write_zeros(self.zero_at, self.zero_len)?;
            self.zero_len = 0;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.flush_data()?;
        self.flush_zeros()
    }
}

/// The chunks `ops` fetch from the store, in the order [`Executor`] asks for them (one
/// [`ChunkStore::fetch_ordered`] per list of ops): what a dry run estimates.
pub(super) fn store_entries(index: &Index, ops: &[Op]) -> Vec<ChunkEntry> {
    ops.iter()
        .filter(|op| op.source == Source::Store)
        .map(|op| index.chunks()[op.chunks[0] as usize])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceKind;
    use std::sync::Mutex;

    /// Records every write that reaches it.
    struct Recorder(Mutex<Vec<(u64, u64)>>);

    impl ReadAt for Recorder {
        fn name(&self) -> String {
            "recorder".into()
        }
        fn size(&self) -> u64 {
            1 << 40
        }
        fn read_exact_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
    }

    impl WriteAt for Recorder {
        fn kind(&self) -> DeviceKind {
            DeviceKind::BlockDevice
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.0.lock().unwrap().push((offset, buf.len() as u64));
            Ok(())
        }
        fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
            self.0.lock().unwrap().push((offset, len));
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_write_ever_leaves_the_image() {
        let rec = Recorder(Mutex::new(Vec::new()));
        let b = Bounded {
            target: &rec,
            image_size: 1000,
        };
        b.write_all_at(&[1; 100], 900).unwrap();
        b.write_zeros(0, 1000).unwrap();
        let e = b.write_all_at(&[1; 101], 900).unwrap_err();
        assert!(e.to_string().contains("offset 900 of recorder"), "{e}");
        assert!(b.write_zeros(1000, 1).is_err());
        assert!(b.write_zeros(u64::MAX, 2).is_err());
        // Through the coalescing writer too: the bad range is refused when it goes out.
        let mut w = Writer::new(&rec, 1000);
        w.write(990, &[2; 20]).unwrap();
        assert!(w.finish().is_err());
        assert_eq!(*rec.0.lock().unwrap(), [(900, 100), (0, 1000)]);
    }
}
