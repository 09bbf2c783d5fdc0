//! The server's table of live connections: what the connection limits, eviction and the
//! reclaiming of stalled buffer memory decide on.
//!
//! Each connection publishes a few counters ([`ConnStats`]); the accept loop reads them to
//! admit a new client (evicting the longest-idle connection of a full peer or server),
//! and a request that waits too long for buffer memory reads them to find the connection
//! that holds the most memory without making progress, and drops it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

/// Counters of one connection, shared between its tasks and the registry.
#[derive(Debug)]
pub(crate) struct ConnStats {
    start: Instant,
    /// The handshake is over.
    transmitting: AtomicBool,
    /// Requests read and not yet fully replied to.
    busy: AtomicU64,
    /// Milliseconds (since `start`) of the last request read or reply written.
    last_activity: AtomicU64,
    /// Budget units held by this connection's requests.
    held: AtomicU64,
    /// Milliseconds + 1 of the last progress of a pending reply write; 0 when the writer
    /// has nothing to write.
    writer_since: AtomicU64,
    /// Same for a write payload being read.
    payload_since: AtomicU64,
    /// Milliseconds + 1 when the writer last went from nothing to write to pending; 0
    /// when it has nothing to write.
    writer_start: AtomicU64,
    /// Reply bytes written since `writer_start`.
    writer_bytes: AtomicU64,
    /// Same for the write payload being read.
    payload_start: AtomicU64,
    payload_bytes: AtomicU64,
    killed: Mutex<Option<String>>,
    kill: Notify,
}

impl ConnStats {
    fn new(start: Instant) -> Self {
        let now = ms(start);
        ConnStats {
            start,
            transmitting: AtomicBool::new(false),
            busy: AtomicU64::new(0),
            last_activity: AtomicU64::new(now),
            held: AtomicU64::new(0),
            writer_since: AtomicU64::new(0),
            payload_since: AtomicU64::new(0),
            writer_start: AtomicU64::new(0),
            writer_bytes: AtomicU64::new(0),
            payload_start: AtomicU64::new(0),
            payload_bytes: AtomicU64::new(0),
            killed: Mutex::new(None),
            kill: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        ms(self.start)
    }

    pub(crate) fn enter_transmission(&self) {
        self.transmitting.store(true, Ordering::Relaxed);
        self.touch();
    }

    /// Records activity (a request read, a reply written).
    pub(crate) fn touch(&self) {
        self.last_activity.store(self.now(), Ordering::Relaxed);
    }

    /// How long since the last activity.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = self.last_activity.load(Ordering::Relaxed);
        Duration::from_millis(self.now().saturating_sub(last))
    }

    /// True when no request is in flight.
    pub(crate) fn is_quiet(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0
    }

    pub(crate) fn add_held(&self, units: u64) {
        self.held.fetch_add(units, Ordering::Relaxed);
    }

    pub(crate) fn sub_held(&self, units: u64) {
        self.held.fetch_sub(units, Ordering::Relaxed);
    }

    /// The writer has bytes to send and just sent `bytes` of them (0: just started).
    pub(crate) fn writer_progress(&self, bytes: u64) {
        progress(
            self.now(),
            &self.writer_since,
            &self.writer_start,
            &self.writer_bytes,
            bytes,
        );
    }

    /// The writer has nothing left to send.
    pub(crate) fn writer_done(&self) {
        self.writer_since.store(0, Ordering::Relaxed);
        self.writer_start.store(0, Ordering::Relaxed);
    }

    /// A write payload is being read and `bytes` of it just came (0: the read just
    /// started).
    pub(crate) fn payload_progress(&self, bytes: u64) {
        progress(
            self.now(),
            &self.payload_since,
            &self.payload_start,
            &self.payload_bytes,
            bytes,
        );
    }

    /// No write payload is being read.
    pub(crate) fn payload_done(&self) {
        self.payload_since.store(0, Ordering::Relaxed);
        self.payload_start.store(0, Ordering::Relaxed);
    }

    /// The slowest of the connection's pending transfers (replies to write, a payload to
    /// read) that started at least `after` ago: its average rate in bytes per second and
    /// its age. `None` when nothing has been pending that long.
    fn slowest(&self, after: Duration) -> Option<(u64, Duration)> {
        let now = self.now() + 1;
        [
            (&self.writer_start, &self.writer_bytes),
            (&self.payload_start, &self.payload_bytes),
        ]
        .iter()
        .filter_map(|(start, bytes)| {
            let start = start.load(Ordering::Relaxed);
            if start == 0 {
                return None;
            }
            let age = Duration::from_millis(now.saturating_sub(start));
            let ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX).max(1);
            let rate = bytes.load(Ordering::Relaxed).saturating_mul(1000) / ms;
            (age >= after).then_some((rate, age))
        })
        .min_by_key(|(rate, _)| *rate)
    }

    /// How long the connection has had data to move without moving any, if it has.
    fn stalled_for(&self) -> Option<Duration> {
        let now = self.now();
        [&self.writer_since, &self.payload_since]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&s| s != 0)
            .map(|s| Duration::from_millis((now + 1).saturating_sub(s)))
            .max()
    }

    /// Asks the connection to stop, for `reason` (the first reason wins).
    fn kill(&self, reason: String) {
        let mut k = self.killed.lock().unwrap_or_else(|e| e.into_inner());
        if k.is_none() {
            *k = Some(reason);
            self.kill.notify_one();
        }
    }

    fn is_killed(&self) -> bool {
        self.killed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Completes when the connection was asked to stop, with the reason.
    pub(crate) async fn killed(&self) -> String {
        self.kill.notified().await;
        self.killed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// Records `bytes` of progress of a transfer at `now`, starting it if none is pending.
fn progress(now: u64, since: &AtomicU64, start: &AtomicU64, moved: &AtomicU64, bytes: u64) {
    since.store(now + 1, Ordering::Relaxed);
    if start.load(Ordering::Relaxed) == 0 {
        moved.store(0, Ordering::Relaxed);
        start.store(now + 1, Ordering::Relaxed);
    }
    moved.fetch_add(bytes, Ordering::Relaxed);
}

fn ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A request in flight: counted in [`ConnStats`] until dropped (once its reply is
/// written, or abandoned).
#[derive(Debug)]
pub(crate) struct Busy(Arc<ConnStats>);

impl Busy {
    pub(crate) fn new(stats: &Arc<ConnStats>) -> Self {
        stats.busy.fetch_add(1, Ordering::Relaxed);
        Busy(stats.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Entry {
    peer: String,
    stats: Arc<ConnStats>,
    /// The peer's share of the buffer budget, shared by its connections.
    peer_buffers: Arc<Semaphore>,
}

/// The live connections of a server.
pub(crate) struct Registry {
    start: Instant,
    /// Budget units one peer may hold.
    peer_units: usize,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

/// A connection's place in the registry; removes it when dropped.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    /// Key in the registry.
    pub id: u64,
    /// The connection's counters.
    pub stats: Arc<ConnStats>,
    /// Its peer's share of the buffer budget.
    pub peer_buffers: Arc<Semaphore>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Connection limits applied by [`Registry::admit`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub max: usize,
    pub per_peer: usize,
    /// A busy connection is evictable once a transfer of its has been pending this long;
    /// the slowest one goes.
    pub slow_after: Duration,
}

impl Registry {
    /// An empty registry; each peer may hold `peer_units` of the buffer budget.
    pub(crate) fn new(peer_units: usize) -> Arc<Self> {
        Arc::new(Registry {
            start: Instant::now(),
            peer_units,
            next: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection without checking limits, as a peer of its own.
    pub(crate) fn register(self: &Arc<Self>) -> Registration {
        let mut conns = self.lock();
        let peer = format!("direct connection {}", self.next.load(Ordering::Relaxed));
        self.insert(&mut conns, &peer)
    }

    fn insert(self: &Arc<Self>, conns: &mut HashMap<u64, Entry>, peer: &str) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(ConnStats::new(self.start));
        // The peer's share lives as long as one of its connections does.
        let peer_buffers = conns
            .values()
            .find(|e| e.peer == peer)
            .map(|e| e.peer_buffers.clone())
            .unwrap_or_else(|| Arc::new(Semaphore::new(self.peer_units)));
        conns.insert(
            id,
            Entry {
                peer: peer.to_string(),
                stats: stats.clone(),
                peer_buffers: peer_buffers.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            id,
            stats,
            peer_buffers,
        }
    }

    /// Admits a new connection from `peer`, making room when `peer` or the server is at
    /// its limit by evicting a connection of that peer or of the server: the longest-idle
    /// one (still negotiating, or with nothing in flight), or else the one whose pending
    /// transfer (replies it does not read, a payload it trickles) has moved the fewest
    /// bytes per second over at least `caps.slow_after`. `Err` says why the client is
    /// refused: every connection is busy and none is that slow yet.
    pub(crate) fn admit(self: &Arc<Self>, peer: &str, caps: Caps) -> Result<Registration, String> {
        let mut conns = self.lock();
        let live = |e: &&Entry| !e.stats.is_killed();
        let from_peer = conns
            .values()
            .filter(live)
            .filter(|e| e.peer == peer)
            .count();
        if from_peer >= caps.per_peer {
            let why = format!(
                "evicted for a new connection from the same peer ({} connections per peer)",
                caps.per_peer
            );
            if !evict(&conns, Some(peer), caps.slow_after, &why) {
                return Err(format!(
                    "{from_peer} connections from this peer are all busy (limit {})",
                    caps.per_peer
                ));
            }
        }
        let total = conns.values().filter(live).count();
        if total >= caps.max {
            let why = format!(
                "evicted for a new connection ({} connections at most)",
                caps.max
            );
            if !evict(&conns, None, caps.slow_after, &why) {
                return Err(format!(
                    "{total} connections are all busy (limit {})",
                    caps.max
                ));
            }
        }
        Ok(self.insert(&mut conns, peer))
    }

    /// Drops the connection (other than `me`, and of `me`'s peer if `same_peer`) that
    /// holds the most buffer budget while either making no progress for at least `stall`
    /// or moving its pending transfers so slowly (measured over at least `stall`) that
    /// what it holds would take more than [`DRAIN_HORIZON`] `stall`s to drain: a client
    /// reading its replies at a trickle holds memory as surely as one that reads
    /// nothing. Returns what it did, if anything.
    pub(crate) fn reclaim(
        &self,
        me: u64,
        same_peer: bool,
        stall: Duration,
        unit: u64,
    ) -> Option<String> {
        let conns = self.lock();
        let my_peer = conns.get(&me).map(|e| e.peer.clone());
        let horizon = stall.saturating_mul(DRAIN_HORIZON);
        let (id, entry, held, why) = conns
            .iter()
            .filter(|(id, e)| **id != me && !e.stats.is_killed())
            .filter(|(_, e)| !same_peer || my_peer.as_deref() == Some(e.peer.as_str()))
            .filter_map(|(id, e)| {
                let held = e.stats.held.load(Ordering::Relaxed);
                if held == 0 {
                    return None;
                }
                if let Some(stalled) = e.stats.stalled_for().filter(|s| *s >= stall) {
                    let why = format!("with no progress for {} ms", stalled.as_millis());
                    return Some((*id, e, held, why));
                }
                let (rate, age) = e.stats.slowest(stall)?;
                let drain_ms = (held * unit).saturating_mul(1000) / rate.max(1);
                (u128::from(drain_ms) > horizon.as_millis()).then(|| {
                    let why = format!(
                        "moving only {rate} B/s over {} ms ({} s to drain, more than {} s)",
                        age.as_millis(),
                        drain_ms / 1000,
                        horizon.as_secs()
                    );
                    (*id, e, held, why)
                })
            })
            .max_by_key(|c| c.2)?;
        let msg = format!(
            "held {} KiB of reply and payload buffers {why} while other clients waited for \
             memory",
            held * unit / 1024,
        );
        entry.stats.kill(msg.clone());
        Some(format!("{} (connection {id}): {msg}", entry.peer))
    }
}

/// A connection holding buffer memory others wait for is reclaimed when, at the pace of
/// its pending transfers, it would need more than this many budget waits to drain it.
pub(crate) const DRAIN_HORIZON: u32 = 10;

/// Kills the longest-idle evictable connection (of `peer`, if given), or else the one
/// whose transfer pending for at least `slow_after` is the slowest. False if none.
fn evict(conns: &HashMap<u64, Entry>, peer: Option<&str>, slow_after: Duration, why: &str) -> bool {
    let candidates = || {
        conns
            .values()
            .filter(|e| !e.stats.is_killed() && peer.is_none_or(|p| e.peer == p))
    };
    let victim = candidates()
        .filter(|e| !e.stats.transmitting.load(Ordering::Relaxed) || e.stats.is_quiet())
        .max_by_key(|e| e.stats.idle_for());
    if victim.is_none() {
        // Every connection has requests in flight: a client that keeps its transfers
        // going at a trickle must not hold its place against a new client forever.
        let slow = candidates()
            .filter_map(|e| Some((e, e.stats.slowest(slow_after)?)))
            .min_by_key(|(_, (rate, age))| (*rate, std::cmp::Reverse(*age)));
        if let Some((e, (rate, age))) = slow {
            e.stats.kill(format!(
                "{why}; its pending transfer moved {rate} B/s over {} ms",
                age.as_millis()
            ));
            return true;
        }
    }
    match victim {
        Some(e) => {
            let idle = e.stats.idle_for();
            let phase = if e.stats.transmitting.load(Ordering::Relaxed) {
                "idle"
            } else {
                "negotiating"
            };
            e.stats
                .kill(format!("{why}; {phase} for {} ms", idle.as_millis()));
            true
        }
        None => false,
    }
}
