//! `verify`: check that a target holds exactly an image, and [`check_chunks`], the one
//! loop that hashes a target's chunks against an index (used by `verify`, by the
//! dm-verity builder, and meant for sync's final check).
//!
//! A reader thread reads the chunks in the order asked (index order for `verify`, so the
//! device streams); workers hash each against its id (zero chunks are compared with
//! zeros); the calling thread takes the results back in order. The index's records cover
//! the image exactly (its parser checks that their lengths add up to the image size), so
//! matching every chunk means holding the image: no second whole-image hash is needed.

use std::collections::BTreeMap;
use std::path::Path;

use crossbeam_channel::bounded;
use serde::Serialize;

use crate::device::{size_shortfall, Device};
use crate::error::{Error, Result};
use crate::index::{ChunkEntry, Index};
use crate::progress::Progress;
use crate::sync::ReadAt;
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

/// Checks that the stream `input` (a pipe, stdin) starts with the image of `index`: reads
/// it once, in order, hashing each chunk against its id; bytes past the image are not
/// read. `name` names the stream in messages.
///
/// # Errors
/// [`Error::Io`] if the stream cannot be read; [`Error::VerifyFailed`] if it ends before
/// the image does.
pub fn verify_stream(
    index: &Index,
    input: &mut dyn std::io::Read,
    name: &str,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    progress.start("verifying", index.image_size());
    let mut buf = Vec::new();
    let (mut bad_chunks, mut first_bad_offset) = (0, None);
    for c in index.chunks() {
        buf.resize(c.len as usize, 0);
        if let Err(e) = input.read_exact(&mut buf) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                return Err(Error::VerifyFailed(format!(
                    "{name} does not hold the image: it ends within the chunk at offset {} of \
                     an image of {} bytes",
                    c.offset,
                    index.image_size()
                )));
            }
            return Err(Error::io("reading", name, e));
        }
        if index.digest().id(&buf) != c.id {
            bad_chunks += 1;
            first_bad_offset.get_or_insert(c.offset);
        }
        progress.advance(u64::from(c.len));
        progress.chunks(1);
    }
    Ok(VerifyReport {
        image_size: index.image_size(),
        chunk_count: index.chunks().len() as u64,
        bad_chunks,
        first_bad_offset,
    })
}

/// Checks every chunk of `target` against `index`. Returns the report; use
/// [`VerifyReport::check`] or [`verify_ok`] to turn a mismatch into an error.
///
/// # Errors
/// I/O errors, or [`Error::VerifyFailed`] if the target is smaller than the image.
pub fn verify(index: &Index, target: &Path, progress: &dyn Progress) -> Result<VerifyReport> {
    let device = Device::open_read(target)?;
    if let Some(why) = size_shortfall(
        device.path().display(),
        device.kind(),
        device.size(),
        index.image_size(),
    ) {
        return Err(Error::VerifyFailed(why));
    }
    progress.start("verifying", index.image_size());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bad = check_chunks(index, &device, all_chunks(index)?, workers, progress)?;
    Ok(VerifyReport {
        image_size: index.image_size(),
        chunk_count: index.chunks().len() as u64,
        bad_chunks: bad.len() as u64,
        first_bad_offset: bad.iter().map(|m| m.offset).min(),
    })
}

/// Every position of `index`'s chunk list, for [`check_chunks`].
///
/// # Errors
/// [`Error::InvalidInput`] for an index of more than `u32::MAX` chunks.
pub fn all_chunks(index: &Index) -> Result<std::ops::Range<u32>> {
    let n = u32::try_from(index.chunks().len()).map_err(|_| {
        Error::InvalidInput(format!(
            "the index has {} chunks, more than this build can check",
            index.chunks().len()
        ))
    })?;
    Ok(0..n)
}

/// A chunk of a target that does not hold the bytes the index names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Position of the chunk in [`Index::chunks`].
    pub chunk: u32,
    /// Where the chunk starts in the image.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u32,
    /// The id the index names for it.
    pub id: ChunkId,
}

/// Hashes the chunks of `index` at `positions` (indices into [`Index::chunks`]) as they
/// are on `target`, and returns those whose bytes differ, in the order given.
///
/// One thread reads the chunks in the order given (pass them sorted by offset, so a
/// device streams) while `workers` threads hash them; zero chunks are compared with
/// zeros instead of hashed, and a zero chunk that lies in a hole of the target
/// ([`ReadAt::hole_end`]) is not read at all: a hole costs one `SEEK_DATA`. Memory stays at a few chunks per worker. Progress advances
/// by each chunk's length.
///
/// # Errors
/// [`Error::InvalidInput`] for a position past the index's end; read errors (naming the
/// target) stop the check.
pub fn check_chunks(
    index: &Index,
    target: &(impl ReadAt + ?Sized),
    positions: impl IntoIterator<Item = u32, IntoIter: Send>,
    workers: usize,
    progress: &dyn Progress,
) -> Result<Vec<Mismatch>> {
    check_chunks_with(index, target, positions, workers, progress, |_, _, _, _| {
        Ok(())
    })
}

/// Like [`check_chunks`], also handing each chunk to `each`, in the order given: its
/// position, its entry, the bytes read and whether they matched (for consumers of the
/// image's bytes, such as the dm-verity tree, or callers that record which chunks
/// passed). The bytes are empty for a zero chunk found in a hole: its bytes are zeros. An error from `each` stops the check and is returned.
///
/// # Errors
/// As [`check_chunks`], and the first error of `each`.
pub fn check_chunks_with(
    index: &Index,
    target: &(impl ReadAt + ?Sized),
    positions: impl IntoIterator<Item = u32, IntoIter: Send>,
    workers: usize,
    progress: &dyn Progress,
    mut each: impl FnMut(u32, &ChunkEntry, &[u8], bool) -> Result<()>,
) -> Result<Vec<Mismatch>> {
    let chunks = index.chunks();
    let digest = index.digest();
    let positions = positions.into_iter();
    let workers = workers.max(1);
    // Buffers circulate: reader → hashers → this thread (in order) → back to the reader.
    // The reader takes one before each read, which bounds memory and the reorder window.
    let depth = workers * 4;
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(depth);
    for _ in 0..depth {
        pool_tx
            .send(Vec::new())
            .expect("the pool has room for its buffers");
    }
    let (read_tx, read_rx) = bounded::<(u64, u32, Vec<u8>)>(depth);
    let (done_tx, done_rx) = bounded::<Result<(u64, Checked)>>(depth);
    // `move`: this thread's channel ends must drop when the closure returns (early on an
    // error too), so that the reader and the hashers stop before the scope joins them.
    std::thread::scope(move |s| {
        let reader_done = done_tx.clone();
        s.spawn(move || {
            // Messages are numbered in order; zero chunks in a hole go in batches.
            let mut seq = 0u64;
            let mut holes: Vec<u32> = Vec::new();
            // The last hole found, `(start, end)`: zero chunks inside it are not read.
            let mut hole = (0u64, 0u64);
            let flush = |holes: &mut Vec<u32>, seq: &mut u64| {
                if holes.is_empty() {
                    return true;
                }
                let batch = Checked::Holes(std::mem::take(holes));
                *seq += 1;
                reader_done.send(Ok((*seq - 1, batch))).is_ok()
            };
            for k in positions {
                let c = chunks.get(k as usize);
                if let Some(c) = c.filter(|c| c.zero) {
                    if !(hole.0 <= c.offset && c.end() <= hole.1) {
                        hole = (c.offset, target.hole_end(c.offset));
                    }
                    if c.end() <= hole.1 {
                        holes.push(k);
                        if holes.len() == HOLE_BATCH && !flush(&mut holes, &mut seq) {
                            return;
                        }
                        continue;
                    }
                }
                if !flush(&mut holes, &mut seq) {
                    return;
                }
                let Ok(mut buf) = pool_rx.recv() else { return };
                let read = match c {
                    Some(c) => {
                        buf.resize(c.len as usize, 0);
                        target.read_exact_at(&mut buf, c.offset)
                    }
                    None => Err(Error::InvalidInput(format!(
                        "chunk {k} is past the end of the index ({} chunks)",
                        chunks.len()
                    ))),
                };
                if let Err(e) = read {
                    let _ = reader_done.send(Err(e));
                    return;
                }
                if read_tx.send((seq, k, buf)).is_err() {
                    return;
                }
                seq += 1;
            }
            flush(&mut holes, &mut seq);
        });
        for _ in 0..workers {
            let (read_rx, done_tx) = (read_rx.clone(), done_tx.clone());
            s.spawn(move || {
                for (seq, k, buf) in read_rx {
                    let c = &chunks[k as usize];
                    let good = if c.zero {
                        crate::chunker::is_zero(&buf)
                    } else {
                        digest.id(&buf) == c.id
                    };
                    if done_tx
                        .send(Ok((seq, Checked::Read(k, buf, good))))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop((read_rx, done_tx));
        let mut bad = Vec::new();
        let mut pending = BTreeMap::new();
        let mut next = 0u64;
        for done in &done_rx {
            let (seq, checked) = done?;
            pending.insert(seq, checked);
            while let Some(checked) = pending.remove(&next) {
                match checked {
                    Checked::Read(k, buf, good) => {
                        let c = &chunks[k as usize];
                        each(k, c, &buf, good)?;
                        progress.advance(u64::from(c.len));
                        progress.chunks(1);
                        if !good {
                            bad.push(Mismatch {
                                chunk: k,
                                offset: c.offset,
                                len: c.len,
                                id: c.id,
                            });
                        }
                        let _ = pool_tx.send(buf);
                    }
                    Checked::Holes(ks) => {
                        let (mut len, count) = (0, ks.len() as u64);
                        for k in ks {
                            let c = &chunks[k as usize];
                            each(k, c, &[], true)?;
                            len += u64::from(c.len);
                        }
                        progress.advance(len);
                        progress.chunks(count);
                    }
                }
                next += 1;
            }
        }
        Ok(bad)
    })
}

/// Zero chunks in a hole are handed over this many at a time.
const HOLE_BATCH: usize = 4096;

/// A message from the reader or a hasher to the in-order loop of [`check_chunks_with`].
enum Checked {
    /// A chunk read: its position, its bytes, whether they matched.
    Read(u32, Vec<u8>, bool),
    /// Zero chunks found in a hole of the target, not read: their positions.
    Holes(Vec<u32>),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::ChunkerParams;
    use crate::progress::NoProgress;

    /// An image in memory; reads at `fail_at` fail.
    struct Mem {
        bytes: Vec<u8>,
        fail_at: Option<u64>,
    }

    impl ReadAt for Mem {
        fn name(&self) -> String {
            "mem".into()
        }
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let start = offset as usize;
            if Some(offset) == self.fail_at || start + buf.len() > self.bytes.len() {
                return Err(Error::io(
                    "reading",
                    "mem",
                    std::io::ErrorKind::Other.into(),
                ));
            }
            buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
            Ok(())
        }
    }

    /// 40 chunks of 1000 bytes; every fourth is zeros.
    fn image() -> (Index, Vec<u8>) {
        let mut bytes = Vec::new();
        let mut records = Vec::new();
        for i in 0..40u32 {
            let piece: Vec<u8> = if i % 4 == 0 {
                vec![0; 1000]
            } else {
                (0..1000).map(|j| (i * 31 + j) as u8 | 1).collect()
            };
            records.push((ChunkId::of(&piece), 1000));
            bytes.extend(piece);
        }
        let index = Index::new(ChunkerParams::default(), [0; 32], records).unwrap();
        (index, bytes)
    }

    #[test]
    fn mismatches_come_back_in_order_with_their_offsets() {
        let (index, mut bytes) = image();
        assert!(index.chunks()[8].zero);
        bytes[8 * 1000 + 999] = 1; // a zero chunk that is not zeros
        bytes[3 * 1000] ^= 0xff;
        bytes[21 * 1000 + 500] ^= 0x01;
        let target = Mem {
            bytes,
            fail_at: None,
        };
        for workers in [1, 3, 8] {
            let bad = check_chunks(
                &index,
                &target,
                all_chunks(&index).unwrap(),
                workers,
                &NoProgress,
            )
            .unwrap();
            let got: Vec<_> = bad.iter().map(|m| (m.chunk, m.offset, m.len)).collect();
            assert_eq!(got, [(3, 3000, 1000), (8, 8000, 1000), (21, 21000, 1000)]);
            assert_eq!(bad[0].id, index.chunks()[3].id);
            // A subset, in the caller's order.
            let bad = check_chunks(&index, &target, [21, 4, 3], workers, &NoProgress).unwrap();
            let got: Vec<_> = bad.iter().map(|m| m.chunk).collect();
            assert_eq!(got, [21, 3]);
        }
        // Trait objects work too (sync holds its target as one).
        let dynamic: &dyn ReadAt = &target;
        assert_eq!(
            check_chunks(&index, dynamic, [3], 2, &NoProgress)
                .unwrap()
                .len(),
            1
        );
        assert!(check_chunks(&index, &target, [], 2, &NoProgress)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bytes_reach_the_consumer_in_order_and_errors_stop_the_check() {
        let (index, bytes) = image();
        let target = Mem {
            bytes: bytes.clone(),
            fail_at: None,
        };
        let mut seen = Vec::new();
        let bad = check_chunks_with(
            &index,
            &target,
            all_chunks(&index).unwrap(),
            4,
            &NoProgress,
            |_, _, b, good| {
                assert!(good);
                seen.extend_from_slice(b);
                Ok(())
            },
        )
        .unwrap();
        assert!(bad.is_empty());
        assert_eq!(seen, bytes);
        // The consumer's error comes back (and the threads stop: no hang).
        let mut calls = 0;
        let err = check_chunks_with(&index, &target, 0..40, 2, &NoProgress, |k, c, _, _| {
            assert_eq!(u64::from(k) * 1000, c.offset);
            calls += 1;
            if c.offset == 5000 {
                Err(Error::VerifyFailed("stop here".into()))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "stop here");
        assert_eq!(calls, 6);
        // A read error and a position past the end are errors, not panics.
        let failing = Mem {
            bytes,
            fail_at: Some(7000),
        };
        let err = check_chunks(&index, &failing, 0..40, 3, &NoProgress).unwrap_err();
        assert!(err.to_string().contains("mem"), "{err}");
        let err = check_chunks(&index, &target, [1, 40], 3, &NoProgress).unwrap_err();
        assert!(err.to_string().contains("chunk 40"), "{err}");
    }

    #[test]
    fn holes_are_not_read_and_data_in_them_is_found() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let p = ChunkerParams::default();
        let head: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 | 1).collect();
        let zero = crate::index::ZeroIds::default().get(p.max);
        let run = 60_000u64; // 3.7 GiB of zero chunks
        let mut records = vec![(ChunkId::of(&head), head.len() as u32)];
        records.extend(std::iter::repeat_n((zero, p.max), run as usize));
        let index = Index::new(p, [0; 32], records).unwrap();
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(index.image_size()).unwrap();
        f.write_all_at(&head, 0).unwrap();
        // The bytes asked of the file, counted at the file (not the whole process's
        // reads, which other tests share).
        struct Counted(Device, std::sync::atomic::AtomicU64);
        impl ReadAt for Counted {
            fn name(&self) -> String {
                self.0.name()
            }
            fn size(&self) -> u64 {
                ReadAt::size(&self.0)
            }
            fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
                self.1
                    .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
                ReadAt::read_exact_at(&self.0, buf, offset)
            }
            fn hole_end(&self, offset: u64) -> u64 {
                self.0.hole_end(offset)
            }
        }
        let counted = Counted(Device::open_read(&path).unwrap(), Default::default());
        let bad = check_chunks(
            &index,
            &counted,
            all_chunks(&index).unwrap(),
            2,
            &NoProgress,
        );
        assert!(bad.unwrap().is_empty());
        let read = counted.1.into_inner();
        assert!(
            read < 16 << 20,
            "read {read} bytes of a file that is almost all hole"
        );
        let report = verify(&index, &path, &NoProgress).unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.chunk_count, run + 1);
        // A byte written in the hole: that chunk is read and found.
        let at = 5000 + 1234 * u64::from(p.max) + 17;
        f.write_all_at(&[1], at).unwrap();
        let report = verify(&index, &path, &NoProgress).unwrap();
        assert_eq!(report.bad_chunks, 1);
        assert_eq!(
            report.first_bad_offset,
            Some(5000 + 1234 * u64::from(p.max))
        );
    }
}
