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

    /// The writer has bytes to send and just sent some (or just started).
    pub(crate) fn writer_progress(&self) {
        self.writer_since.store(self.now() + 1, Ordering::Relaxed);
    }

    /// The writer has nothing left to send.
    pub(crate) fn writer_done(&self) {
        self.writer_since.store(0, Ordering::Relaxed);
    }

    /// A write payload is being read and some bytes just came (or the read just started).
    pub(crate) fn payload_progress(&self) {
        self.payload_since.store(self.now() + 1, Ordering::Relaxed);
    }

    /// No write payload is being read.
    pub(crate) fn payload_done(&self) {
        self.payload_since.store(0, Ordering::Relaxed);
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
    /// its limit by evicting the longest-idle connection (still negotiating, or with
    /// nothing in flight) of that peer or of the server. `Err` says why the client is
    /// refused: every connection is busy.
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
            if !evict(&conns, Some(peer), &why) {
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
            if !evict(&conns, None, &why) {
                return Err(format!(
                    "{total} connections are all busy (limit {})",
                    caps.max
                ));
            }
        }
        Ok(self.insert(&mut conns, peer))
    }

    /// Drops the connection (other than `me`, and of `me`'s peer if `same_peer`) that
    /// holds the most buffer budget while making no progress for at least `stall`.
    /// Returns what it did, if anything.
    pub(crate) fn reclaim(
        &self,
        me: u64,
        same_peer: bool,
        stall: Duration,
        unit: u64,
    ) -> Option<String> {
        let conns = self.lock();
        let my_peer = conns.get(&me).map(|e| e.peer.clone());
        let (id, entry, held, stalled) = conns
            .iter()
            .filter(|(id, e)| **id != me && !e.stats.is_killed())
            .filter(|(_, e)| !same_peer || my_peer.as_deref() == Some(e.peer.as_str()))
            .filter_map(|(id, e)| {
                let held = e.stats.held.load(Ordering::Relaxed);
                let stalled = e.stats.stalled_for()?;
                (held > 0 && stalled >= stall).then_some((*id, e, held, stalled))
            })
            .max_by_key(|c| c.2)?;
        let msg = format!(
            "held {} KiB of reply and payload buffers with no progress for {} ms while \
             other clients waited for memory",
            held * unit / 1024,
            stalled.as_millis()
        );
        entry.stats.kill(msg.clone());
        Some(format!("{} (connection {id}): {msg}", entry.peer))
    }
}

/// Kills the longest-idle evictable connection (of `peer`, if given). False if none.
fn evict(conns: &HashMap<u64, Entry>, peer: Option<&str>, why: &str) -> bool {
    let victim = conns
        .values()
        .filter(|e| !e.stats.is_killed() && peer.is_none_or(|p| e.peer == p))
        .filter(|e| !e.stats.transmitting.load(Ordering::Relaxed) || e.stats.is_quiet())
        .max_by_key(|e| e.stats.idle_for());
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
