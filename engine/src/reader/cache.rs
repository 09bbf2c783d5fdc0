//! The decompressed-chunk cache: LRU, bounded in bytes, one slot per chunk id.
//!
//! A slot is created (and counted at the chunk's length) before its chunk is fetched,
//! so that concurrent readers share one fetch: they wait on the slot's lock. Evicting a
//! slot only drops the cache's reference; readers holding it finish normally.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::{ChunkId, VerifiedChunk};

/// One cached chunk, filled at most once.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    chunk: OnceLock<Arc<VerifiedChunk>>,
    loading: Mutex<()>,
}

impl Slot {
    /// The chunk, if fetched.
    pub(crate) fn get(&self) -> Option<Arc<VerifiedChunk>> {
        self.chunk.get().cloned()
    }

    /// Held while fetching, so that other readers wait instead of fetching again.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.loading.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while some thread is fetching the chunk.
    pub(crate) fn is_locked(&self) -> bool {
        self.loading.try_lock().is_err()
    }

    /// Stores the fetched chunk (the first one stored wins) and returns it.
    pub(crate) fn fill(&self, chunk: VerifiedChunk) -> Arc<VerifiedChunk> {
        self.chunk.get_or_init(|| Arc::new(chunk)).clone()
    }
}

struct Entry {
    slot: Arc<Slot>,
    len: u64,
    tick: u64,
}

#[derive(Default)]
struct Lru {
    map: HashMap<ChunkId, Entry>,
    /// Last use → id, oldest first.
    order: BTreeMap<u64, ChunkId>,
    tick: u64,
    bytes: u64,
}

/// Chunk slots, least recently used evicted first once their lengths pass the limit.
pub(crate) struct ChunkCache {
    lru: Mutex<Lru>,
    limit: u64,
}

impl ChunkCache {
    pub(crate) fn new(limit: u64) -> Self {
        ChunkCache {
            lru: Mutex::new(Lru::default()),
            limit,
        }
    }

    fn lru(&self) -> MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The size limit in bytes.
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes of the slots held now.
    pub(crate) fn bytes(&self) -> u64 {
        self.lru().bytes
    }

    /// True when the chunk is cached (fetched or being fetched).
    pub(crate) fn contains(&self, id: &ChunkId) -> bool {
        self.lru().map.contains_key(id)
    }

    /// The slot of `id` (created empty if absent), marked most recently used. Older
    /// slots are evicted to stay within the limit; the returned one never is.
    pub(crate) fn slot(&self, id: ChunkId, len: u64) -> Arc<Slot> {
        let mut lru = self.lru();
        lru.tick += 1;
        let tick = lru.tick;
        if let Some(e) = lru.map.get_mut(&id) {
            let old = std::mem::replace(&mut e.tick, tick);
            let slot = e.slot.clone();
            lru.order.remove(&old);
            lru.order.insert(tick, id);
            return slot;
        }
        let slot = Arc::new(Slot::default());
        lru.map.insert(
            id,
            Entry {
                slot: slot.clone(),
                len,
                tick,
            },
        );
        lru.order.insert(tick, id);
        lru.bytes += len;
        while lru.bytes > self.limit {
            let Some((&t, &victim)) = lru.order.iter().next() else {
                break;
            };
            if victim == id {
                break;
            }
            lru.order.remove(&t);
            if let Some(e) = lru.map.remove(&victim) {
                lru.bytes -= e.len;
            }
        }
        slot
    }

    /// Drops the slot of `id` (after a failed fetch).
    pub(crate) fn forget(&self, id: &ChunkId) {
        let mut lru = self.lru();
        if let Some(e) = lru.map.remove(id) {
            lru.order.remove(&e.tick);
            lru.bytes -= e.len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_the_limit() {
        let c = ChunkCache::new(300);
        let ids: Vec<ChunkId> = (0u8..4).map(|i| ChunkId::of(&[i])).collect();
        c.slot(ids[0], 100);
        c.slot(ids[1], 100);
        c.slot(ids[2], 100);
        c.slot(ids[0], 100); // ids[1] is now the oldest
        c.slot(ids[3], 100);
        assert!(c.contains(&ids[0]) && c.contains(&ids[2]) && c.contains(&ids[3]));
        assert!(!c.contains(&ids[1]));
        assert_eq!(c.bytes(), 300);
        c.forget(&ids[0]);
        assert_eq!(c.bytes(), 200);
        // A chunk larger than the limit is still handed out, alone.
        c.slot(ids[1], 1000);
        assert!(c.contains(&ids[1]));
        assert_eq!(c.bytes(), 1000);
    }
}
