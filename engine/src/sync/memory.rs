//! One memory budget for a sync (`--max-memory`), split between the buffers that grow
//! with it: the scan's segments, the scratch that breaks move cycles, the fetcher's
//! window of requests in flight and chunks waiting, the apply look-ahead, and the stream's
//! repeat cache. `docs/SYNC.md` ("Memory") gives the split and what stays outside it.
//!
//! The budget is process-wide: a process runs one sync at a time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Default budget: 64 MiB, for a device with 128 MiB of RAM running an application too.
pub const DEFAULT_MAX_MEMORY: u64 = 64 << 20;
/// Smallest budget accepted: 8 MiB.
pub const MIN_MAX_MEMORY: u64 = 8 << 20;

static MAX_MEMORY: AtomicU64 = AtomicU64::new(DEFAULT_MAX_MEMORY);

/// Sets the process's sync memory budget (bytes) for the syncs it starts later.
///
/// # Errors
/// [`Error::InvalidInput`] below [`MIN_MAX_MEMORY`].
pub fn set_max_memory(bytes: u64) -> Result<()> {
    if bytes < MIN_MAX_MEMORY {
        return Err(Error::InvalidInput(format!(
            "a memory budget of {bytes} bytes is too small: at least {MIN_MAX_MEMORY} bytes \
             (8M)"
        )));
    }
    MAX_MEMORY.store(bytes, Ordering::Relaxed);
    one_arena();
    Ok(())
}

/// Makes glibc's allocator keep one arena for all threads. With its default of one arena
/// per thread (up to 8 per CPU), chunks read by one worker and freed by another leave
/// memory behind in each arena: a 16 MiB budget then peaked at 31 MB of RSS instead of
/// 20 MB on a 256 MiB update, for the same CPU time. musl has no arenas.
fn one_arena() {
    crate::sys::one_malloc_arena();
}

/// Sets the fetcher's window from the budget: an eighth of it (requests running count
/// their compressed bytes only, while they hold about three times that: the answer, its
/// chunks decompressed and their frames).
pub(crate) fn apply_fetch_window() {
    crate::store::set_fetch_window(max_memory() / 8);
}

/// The process's sync memory budget (bytes).
pub fn max_memory() -> u64 {
    MAX_MEMORY.load(Ordering::Relaxed)
}

/// Largest scratch the budget allows: a quarter of it.
pub fn max_scratch() -> u64 {
    max_memory() / 4
}

/// Bytes one scan worker reads and cuts at once, of `workers` scanning chunks of at most
/// `max_chunk` bytes: half the budget shared by the workers, less each one's overlap of
/// three maximum chunks, and at least four maximum chunks.
pub(crate) fn scan_segment(workers: usize, max_chunk: u64) -> u64 {
    let share = max_memory() / 2 / workers.max(1) as u64;
    share
        .saturating_sub(3 * max_chunk)
        .max(4 * max_chunk)
        .min(32 << 20)
}

/// Chunks the apply stage obtains ahead of the one it writes: an eighth of the budget in
/// chunks of at most `max_chunk` bytes, at least 2 and at most `cap`.
pub(crate) fn look_ahead(max_chunk: u64, cap: usize) -> usize {
    let n = max_memory() / 8 / max_chunk.max(1);
    usize::try_from(n)
        .unwrap_or(usize::MAX)
        .clamp(2, cap.max(2))
}

/// Bytes of fetched chunks a stream keeps for their later occurrences: a quarter of the
/// budget.
pub(crate) fn repeat_cache() -> usize {
    usize::try_from(max_memory() / 4).unwrap_or(usize::MAX)
}

/// Checks that `scratch` fits the budget.
///
/// # Errors
/// [`Error::InvalidInput`] naming both when it does not.
pub fn check_scratch(scratch: u64) -> Result<()> {
    let max = max_scratch();
    if scratch > max {
        return Err(Error::InvalidInput(format!(
            "a scratch of {scratch} bytes does not fit the memory budget of {} bytes: scratch \
             gets at most a quarter of it ({max} bytes); lower --scratch-size or raise \
             --max-memory",
            max_memory()
        )));
    }
    Ok(())
}
