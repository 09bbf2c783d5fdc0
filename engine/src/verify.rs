//! `verify`: check that a target holds exactly an image.
//!
//! The calling thread reads the target chunk by chunk (in index order, so the device
//! streams); workers hash each chunk against its id. The index's records cover the image
//! exactly (its parser checks that their lengths add up to the image size), so matching
//! every chunk means holding the image: no second whole-image hash is needed.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::index::{ChunkEntry, Index};
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
}

impl VerifyReport {
    /// True when the target holds exactly the image.
    pub fn ok(&self) -> bool {
        self.bad_chunks == 0
    }

    /// `Ok` when the target holds the image, else [`Error::VerifyFailed`] saying where it
    /// differs; `target` names it in the message.
    ///
    /// # Errors
    /// [`Error::VerifyFailed`] on any mismatch.
    pub fn check(&self, target: &Path) -> Result<()> {
        match self.first_bad_offset {
            None => Ok(()),
            Some(off) => Err(Error::VerifyFailed(format!(
                "{} does not hold the image: {} of {} chunks differ, the first at offset {off}",
                target.display(),
                self.bad_chunks,
                self.chunk_count
            ))),
        }
    }
}

/// Checks every chunk of `target` against `index`. Returns the report; use
/// [`VerifyReport::check`] or [`verify_ok`] to turn a mismatch into an error.
///
/// # Errors
/// I/O errors, or [`Error::VerifyFailed`] if the target is smaller than the image.
pub fn verify(index: &Index, target: &Path, progress: &dyn Progress) -> Result<VerifyReport> {
    let device = Device::open_read(target)?;
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
    std::thread::scope(|s| -> Result<()> {
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
        for entry in index.chunks() {
            let mut buf = vec![0u8; entry.len as usize];
            device.read_exact_at(&mut buf, entry.offset)?;
            if tx.send((*entry, buf)).is_err() {
                break;
            }
        }
        drop(tx); // Ends the workers' loops; the scope waits for them.
        Ok(())
    })?;
    let first = first_bad.load(Ordering::Relaxed);
    Ok(VerifyReport {
        image_size: index.image_size(),
        chunk_count: index.chunks().len() as u64,
        bad_chunks: bad.load(Ordering::Relaxed),
        first_bad_offset: (first != u64::MAX).then_some(first),
    })
}

/// Runs [`verify`] and turns any mismatch into [`Error::VerifyFailed`].
///
/// # Errors
/// As [`verify`], plus [`Error::VerifyFailed`] describing the first mismatch.
pub fn verify_ok(index: &Index, target: &Path, progress: &dyn Progress) -> Result<VerifyReport> {
    let report = verify(index, target, progress)?;
    report.check(target)?;
    Ok(report)
}
