//! A pool of blocking request threads, and the ordered stream built on it.
//!
//! Each remote store owns one pool of `jobs` threads; a request occupies one thread while
//! it waits on the network, so `jobs` is the number of requests in flight. The ordered
//! stream hands the pool up to `2 × jobs` chunks ahead of its consumer and gives results
//! back strictly in the order asked: the consumer writes sequentially while requests
//! overlap, and memory stays bounded by the window.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use tessera_engine::index::ChunkEntry;
use tessera_engine::store::{FetchStream, Fetched};
use tessera_engine::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

/// Worker threads that run blocking jobs; they end when the pool is dropped.
#[derive(Debug)]
pub(crate) struct Pool {
    tx: Sender<Job>,
    threads: usize,
}

impl Pool {
    pub(crate) fn new(threads: usize, name: &str) -> Pool {
        let threads = threads.max(1);
        let (tx, rx) = unbounded::<Job>();
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .expect("spawning a store thread");
        }
        Pool { tx, threads }
    }

    /// Threads in the pool (requests in flight at most).
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Queues a job.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        // The threads only stop when `tx` is dropped, so sending cannot fail.
        let _ = self.tx.send(Box::new(job));
    }
}

/// Fetches `entries` on `pool` with `fetch`, yielding results in order.
pub(crate) fn ordered<F>(pool: &Pool, entries: Vec<ChunkEntry>, fetch: Arc<F>) -> FetchStream<'_>
where
    F: Fn(&ChunkEntry) -> Result<Fetched> + Send + Sync + 'static,
{
    Box::new(Ordered {
        pool,
        fetch,
        rest: entries.into_iter(),
        window: pool.threads() * 2,
        pending: VecDeque::new(),
        cancelled: Arc::new(AtomicBool::new(false)),
    })
}

struct Ordered<'a, F> {
    pool: &'a Pool,
    fetch: Arc<F>,
    rest: std::vec::IntoIter<ChunkEntry>,
    window: usize,
    pending: VecDeque<(ChunkEntry, Receiver<Result<Fetched>>)>,
    cancelled: Arc<AtomicBool>,
}

impl<F> Iterator for Ordered<'_, F>
where
    F: Fn(&ChunkEntry) -> Result<Fetched> + Send + Sync + 'static,
{
    type Item = Result<Fetched>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.pending.len() < self.window {
            let Some(entry) = self.rest.next() else { break };
            let (tx, rx) = bounded(1);
            let fetch = self.fetch.clone();
            let cancelled = self.cancelled.clone();
            self.pool.spawn(move || {
                if !cancelled.load(Ordering::Relaxed) {
                    let _ = tx.send(fetch(&entry));
                }
            });
            self.pending.push_back((entry, rx));
        }
        let (entry, rx) = self.pending.pop_front()?;
        Some(rx.recv().unwrap_or_else(|_| {
            Err(Error::InvalidInput(format!(
                "a fetch thread died while fetching chunk {}",
                entry.id
            )))
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.pending.len() + self.rest.len();
        (n, Some(n))
    }
}

impl<F> Drop for Ordered<'_, F> {
    fn drop(&mut self) {
        // Jobs not started yet see this and skip their request.
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tessera_engine::{ChunkId, VerifiedChunk};

    use super::*;

    fn entries(n: usize) -> Vec<ChunkEntry> {
        (0..n)
            .map(|i| {
                let data = i.to_le_bytes();
                ChunkEntry {
                    id: ChunkId::of(&data),
                    offset: i as u64 * 8,
                    len: 8,
                    zero: false,
                }
            })
            .collect()
    }

    #[test]
    fn yields_in_order_with_requests_overlapping() {
        let pool = Pool::new(8, "test");
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        let fetch = Arc::new(move |e: &ChunkEntry| {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            // Later entries finish first half of the time.
            let i = e.offset / 8;
            std::thread::sleep(Duration::from_millis(if i.is_multiple_of(2) {
                20
            } else {
                2
            }));
            r.fetch_sub(1, Ordering::SeqCst);
            let data = i.to_le_bytes().to_vec();
            let chunk = VerifiedChunk::verify(e.id, data, "test")?;
            Ok(Fetched {
                chunk,
                compressed: vec![],
            })
        });
        let es = entries(40);
        let got: Vec<ChunkId> = ordered(&pool, es.clone(), fetch)
            .map(|r| r.unwrap().chunk.id())
            .collect();
        assert_eq!(got, es.iter().map(|e| e.id).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) > 4, "requests overlapped");
        assert!(peak.load(Ordering::SeqCst) <= 8, "never more than the pool");
    }

    #[test]
    fn errors_are_per_item() {
        let pool = Pool::new(2, "test");
        let fetch = Arc::new(move |e: &ChunkEntry| {
            if e.offset == 8 {
                return Err(Error::InvalidInput("boom".into()));
            }
            let chunk = VerifiedChunk::verify(e.id, (e.offset / 8).to_le_bytes().to_vec(), "t")?;
            Ok(Fetched {
                chunk,
                compressed: vec![],
            })
        });
        let mut stream = ordered(&pool, entries(10), fetch);
        assert!(stream.next().unwrap().is_ok());
        assert!(stream.next().unwrap().is_err());
        assert!(
            stream.next().unwrap().is_ok(),
            "the stream goes on after an error"
        );
        assert_eq!(stream.count(), 7);
    }

    /// What cancellation guarantees: a job queued but not started when the stream is
    /// dropped never makes its request; requests already running finish.
    #[test]
    fn dropping_the_stream_skips_queued_requests() {
        let pool = Pool::new(2, "test");
        let started = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = unbounded::<()>();
        let s = started.clone();
        let fetch = Arc::new(move |e: &ChunkEntry| {
            s.lock().unwrap().push(e.offset / 8);
            if e.offset > 0 {
                // Entries after the first hold their thread until the test opens the gate.
                let _ = gate_rx.recv();
            }
            let chunk = VerifiedChunk::verify(e.id, (e.offset / 8).to_le_bytes().to_vec(), "t")?;
            Ok(Fetched {
                chunk,
                compressed: vec![],
            })
        });
        let mut stream = ordered(&pool, entries(1000), fetch);
        // The first call queues a window of 4 (2 threads × 2) and returns entry 0; the two
        // threads then hold entries 1 and 2, and entry 3 waits in the queue.
        assert!(stream.next().unwrap().is_ok());
        while started.lock().unwrap().len() < 3 {
            std::thread::yield_now();
        }
        drop(stream);
        drop(gate_tx); // releases both threads
                       // Both threads reaching this barrier means the queue before it (entry 3) was
                       // taken and handled: jobs run in the order queued.
        let barrier = Arc::new(std::sync::Barrier::new(3));
        for _ in 0..2 {
            let b = barrier.clone();
            pool.spawn(move || {
                b.wait();
            });
        }
        barrier.wait();
        let mut got = started.lock().unwrap().clone();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![0, 1, 2],
            "entry 3 was queued but must not be fetched"
        );
    }
}
