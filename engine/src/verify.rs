//! `verify`: check that a target holds exactly an image.
//!
//! A reader thread reads the target chunk by chunk (in index order, so the device streams)
//! and hashes the whole image; workers hash each chunk against its id.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::index::{hex, ChunkEntry, Index};
use crate::progress::Progress;
use crate::ChunkId;

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    /// Bytes of the image checked.
    pub image_size: u64,
    /// Chunks checked.
    pub chunk_count: u64,
    /// Chunks whose bytes on the target do not hash to the index.
    pub bad_chunks: u64,
    /// Offset of the first bad chunk, if any.
    pub first_bad_offset: Option<u64>,
    /// Whether the BLAKE3 of the whole image matches the index.
    pub image_hash_ok: bool,
    /// The whole-image hash the index names, hex.
    pub expected_image_hash: String,
}

impl VerifyReport {
    /// True when the target holds exactly the image.
    pub fn ok(&self) -> bool {
        self.bad_chunks == 0 && self.image_hash_ok
    }
}

/// Checks every chunk of `target` against `index`. Returns the report; use
/// [`VerifyReport::ok`] or [`verify_ok`] to turn a mismatch into an error.
///
/// # Errors
/// I/O errors, or [`Error::VerifyFailed`] if the target is smaller than the image.
pub fn verify(index: &Index, target: &Path, progress: &dyn Progress) -> Result<VerifyReport> {
    let device = Device::open_read(target)?;
    verify_device(index, &device, progress)
}

/// Like [`verify`] but on an open device.
///
/// # Errors
/// As [`verify`].
pub fn verify_device(
    index: &Index,
    device: &Device,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    if device.size() < index.image_size() {
        return Err(Error::VerifyFailed(format!(
            "{} holds {} bytes, less than the image's {}",
            device.path().display(),
            device.size(),
            index.image_size()
        )));
    }
    progress.start("verifying", index.image_size());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bad = AtomicU64::new(0);
    let first_bad = AtomicU64::new(u64::MAX);
    let (tx, rx) = bounded::<(ChunkEntry, Vec<u8>)>(workers * 4);
    let image_hash = std::thread::scope(|s| -> Result<[u8; 32]> {
        for _ in 0..workers {
            let rx = rx.clone();
            let (bad, first_bad) = (&bad, &first_bad);
            s.spawn(move || {
                for (entry, data) in rx {
                    if ChunkId::of(&data) != entry.id {
                        bad.fetch_add(1, Ordering::Relaxed);
                        first_bad.fetch_min(entry.offset, Ordering::Relaxed);
                    }
                    progress.advance(u64::from(entry.len));
                }
            });
        }
        drop(rx);
        let mut hasher = blake3::Hasher::new();
        for entry in index.chunks() {
            let mut buf = vec![0u8; entry.len as usize];
            device.read_exact_at(&mut buf, entry.offset)?;
            hasher.update(&buf);
            if tx.send((*entry, buf)).is_err() {
                break;
            }
        }
        drop(tx);
        Ok(*hasher.finalize().as_bytes())
    })?;
    let first = first_bad.load(Ordering::Relaxed);
    Ok(VerifyReport {
        image_size: index.image_size(),
        chunk_count: index.chunks().len() as u64,
        bad_chunks: bad.load(Ordering::Relaxed),
        first_bad_offset: (first != u64::MAX).then_some(first),
        image_hash_ok: image_hash == index.image_hash(),
        expected_image_hash: hex(&index.image_hash()),
    })
}

/// Runs [`verify`] and turns any mismatch into [`Error::VerifyFailed`].
///
/// # Errors
/// As [`verify`], plus [`Error::VerifyFailed`] describing the first mismatch.
pub fn verify_ok(index: &Index, target: &Path, progress: &dyn Progress) -> Result<VerifyReport> {
    let report = verify(index, target, progress)?;
    check_report(&report, target)?;
    Ok(report)
}

pub(crate) fn check_report(report: &VerifyReport, target: &Path) -> Result<()> {
    if report.ok() {
        return Ok(());
    }
    Err(Error::VerifyFailed(match report.first_bad_offset {
        Some(off) => format!(
            "{} does not hold the image: {} of {} chunks differ, the first at offset {off}",
            target.display(),
            report.bad_chunks,
            report.chunk_count
        ),
        None => format!(
            "{}: every chunk matches but the whole-image hash differs from the index's {} \
             (the index is inconsistent)",
            target.display(),
            report.expected_image_hash
        ),
    }))
}
