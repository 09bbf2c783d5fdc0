//! `sync`: write an image into a target file or block device, then verify it.
//!
//! Workers fetch, decompress and verify chunks and write them with positional writes;
//! zero chunks become holes on regular files. Success is reported only after the whole
//! target was read back and hashed against the index.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

use crate::device::Device;
use crate::error::Result;
use crate::index::Index;
use crate::progress::Progress;
use crate::store::ChunkStore;
use crate::verify::{check_report, verify_device};

/// What [`sync`] did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SyncReport {
    /// Bytes in the image.
    pub image_size: u64,
    /// Uncompressed bytes fetched from the store.
    pub bytes_fetched: u64,
    /// Compressed bytes read from the store.
    pub bytes_downloaded: u64,
    /// Chunks fetched from the store.
    pub chunks_fetched: u64,
    /// Bytes of zero chunks (holes on files).
    pub bytes_zero: u64,
}

/// Writes the image of `index` into `target` from `store` and verifies the result.
///
/// # Errors
/// [`crate::Error::InvalidInput`] if the target is too small (nothing written), missing or
/// corrupt chunks, I/O errors, or [`crate::Error::VerifyFailed`].
pub fn sync(
    index: &Index,
    target: &Path,
    store: &dyn ChunkStore,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    let device = Device::open_target(target, index.image_size())?;
    progress.start("writing", index.image_size());
    let next = AtomicUsize::new(0);
    let fetched = AtomicU64::new(0);
    let downloaded = AtomicU64::new(0);
    let chunks_fetched = AtomicU64::new(0);
    let zero = AtomicU64::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let result = (|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(entry) = index.chunks().get(i) else {
                            return Ok(());
                        };
                        if entry.zero {
                            device.write_zeros(entry.offset, u64::from(entry.len))?;
                            zero.fetch_add(u64::from(entry.len), Ordering::Relaxed);
                        } else {
                            let (chunk, compressed_len) = store.fetch_counted(entry)?;
                            device.write_all_at(chunk.data(), entry.offset)?;
                            fetched.fetch_add(u64::from(entry.len), Ordering::Relaxed);
                            downloaded.fetch_add(compressed_len, Ordering::Relaxed);
                            chunks_fetched.fetch_add(1, Ordering::Relaxed);
                        }
                        progress.advance(u64::from(entry.len));
                    })();
                    if result.is_err() {
                        // Stop the other workers early.
                        next.store(usize::MAX / 2, Ordering::Relaxed);
                    }
                    result
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
    })?;
    device.sync()?;
    let report = verify_device(index, &device, progress)?;
    check_report(&report, target)?;
    Ok(SyncReport {
        image_size: index.image_size(),
        bytes_fetched: fetched.into_inner(),
        bytes_downloaded: downloaded.into_inner(),
        chunks_fetched: chunks_fetched.into_inner(),
        bytes_zero: zero.into_inner(),
    })
}
