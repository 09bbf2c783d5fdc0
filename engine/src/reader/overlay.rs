//! A copy-on-write overlay: writes to a served image land in a local sparse file.
//!
//! Format (version 1, little-endian; also in `docs/NBD.md`):
//! ```text
//! 0     8  magic "TESSOVL\0"
//! 8     4  version = 1
//! 12    4  block size = 4096
//! 16    8  image size
//! 24   32  root hash of the index the overlay belongs to
//! 56    8  bitmap offset = 4096
//! 64    8  data offset (a multiple of 1 MiB after the bitmap)
//! 72..4096 zero
//! bitmap   one bit per block, bit (b % 8) of byte (b / 8): set = block b is in the overlay
//! data     image byte o lives at data offset + o (sparse; unwritten blocks are holes)
//! ```
//! Reads take overlay blocks whose bit is set and the image elsewhere. A write of part
//! of a block first copies the rest of that block from its current contents (overlay or
//! image). Zeroing whole blocks punches holes. `flush` makes data durable before the
//! bitmap that points to it (the order is on [`Overlay`]), so a crash loses at most the
//! writes since the last flush, never mixes in garbage. The file is reached through
//! [`WriteAt`], so tests can put a device that loses or tears writes at a cut under it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::ImageReader;
use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::index::{hex, Index};
use crate::sync::{ReadAt, WriteAt};

const MAGIC: [u8; 8] = *b"TESSOVL\0";
const VERSION: u32 = 1;
/// Bytes per overlay block.
pub const BLOCK: u64 = 4096;
const HEADER_LEN: u64 = 4096;
const DATA_ALIGN: u64 = 1 << 20;

/// Range of bitmap words changed since the last flush.
type Dirty = Option<(usize, usize)>;

/// A writable layer over an image, kept in one sparse file (or any [`WriteAt`]).
///
/// Durability order (what [`Overlay::flush`] guarantees, and what a crash can leave):
/// 1. A write stores whole blocks of data (a partial block merged with the current
///    contents first), and only after that store returned sets the blocks' bits in
///    memory.
/// 2. A flush, one at a time, first takes a snapshot of the bitmap words changed since
///    the last flush. Every bit in it belongs to data whose store already returned.
/// 3. It then makes the data durable ([`WriteAt::flush`]), then writes the snapshot's
///    words, then makes them durable.
///
/// So a bit reaches the disk only after the data it names is durable: after a crash a
/// block reads back either its image bytes or bytes some write put there, and every
/// write that returned before a flush started that then succeeded reads back. A write
/// that runs during a flush is durable after the next flush (or this one; either is
/// correct).
pub struct Overlay {
    dev: Arc<dyn WriteAt>,
    image_size: u64,
    data_offset: u64,
    bits: RwLock<Vec<u64>>,
    dirty: Mutex<Dirty>,
    /// Serialises writers: partial-block writes read, merge and write back.
    writing: Mutex<()>,
    /// Serialises flushes, so an older bitmap snapshot never overwrites a newer one.
    flushing: Mutex<()>,
    /// Why a barrier ([`WriteAt::flush`]) failed, if one did. A failed `fdatasync` may
    /// drop any dirty pages, of this flush's data or of writes that ran during it, so
    /// no bit may be written for them: from then on writes and flushes fail until the
    /// overlay is reopened, which brings back the state of the last good flush.
    failed: Mutex<Option<String>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("device", &self.dev.name())
            .field("image_size", &self.image_size)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The overlay file of [`Overlay::open`] behind [`WriteAt`].
struct OverlayFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl OverlayFile {
    fn err(&self, what: &'static str) -> impl Fn(io::Error) -> Error + '_ {
        move |e| Error::io(what, &self.path, e)
    }
}

impl ReadAt for OverlayFile {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(self.err("reading overlay"))
    }
}

impl WriteAt for OverlayFile {
    fn kind(&self) -> DeviceKind {
        DeviceKind::File
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(self.err("writing overlay"))
    }
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        if crate::sys::punch_hole(&self.file, offset, len).is_ok() {
            return Ok(());
        }
        // File systems without hole punching get real zeros.
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(zeros.len() as u64) as usize;
            self.write_all_at(&zeros[..n], offset + pos)?;
            pos += n as u64;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(self.err("syncing overlay"))
    }
}

/// `e` and its sources, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out = format!("{out}: {s}");
        next = s.source();
    }
    out
}

/// Where the bitmap and the data of an overlay for an image of `image_size` bytes go:
/// (bitmap bytes, data offset).
fn layout(image_size: u64) -> (u64, u64) {
    let bitmap_len = image_size.div_ceil(BLOCK).div_ceil(8);
    let data_offset = (HEADER_LEN + bitmap_len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
    (bitmap_len, data_offset)
}

/// The size an overlay file for `index` has.
fn overlay_len(path: &str, index: &Index) -> Result<u64> {
    let (_, data_offset) = layout(index.image_size());
    data_offset.checked_add(index.image_size()).ok_or_else(|| {
        Error::InvalidInput(format!(
            "overlay {path}: an image of {} bytes is too large for an overlay",
            index.image_size()
        ))
    })
}

/// Opens an existing file for read and write without following a symlink at `path`.
fn open_existing(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl Overlay {
    /// Opens the overlay at `path` for the image of `index`, creating it if missing.
    ///
    /// A new overlay is built under a fresh temporary name beside `path` (created with
    /// `O_EXCL | O_NOFOLLOW`, mode 0600: a VM's writes are private) and renamed into
    /// place without replacing anything, so `path` holds either nothing or a complete
    /// overlay. An existing one is reopened (resuming after a restart), but never
    /// through a symlink, and an empty or foreign file is refused, never overwritten.
    ///
    /// # Errors
    /// [`Error::Io`] on I/O failure; [`Error::InvalidInput`] if `path` is a symlink or not
    /// a regular file, if the file is not an overlay, or if it belongs to another index.
    pub fn open(path: &Path, index: &Index) -> Result<Overlay> {
        let file = match open_existing(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Overlay::create(path, index),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Error::InvalidInput(format!(
                    "overlay {} is a symbolic link; refusing to follow it (name the file itself)",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io("opening overlay", path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("inspecting overlay", path, e))?;
        if !meta.file_type().is_file() {
            return Err(Error::InvalidInput(format!(
                "overlay {} is not a regular file",
                path.display()
            )));
        }
        let dev = OverlayFile {
            file,
            path: path.to_path_buf(),
            size: meta.len(),
        };
        Overlay::open_on(Arc::new(dev), index)
    }

    /// Creates a new overlay file at `path` (see [`Overlay::open`]).
    fn create(path: &Path, index: &Index) -> Result<Overlay> {
        let len = overlay_len(&path.display().to_string(), index)?;
        crate::fsutil::remove_stale_temps(path);
        let tmp = crate::fsutil::temp_path_for(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| Error::io("creating a temporary file beside overlay", path, e))?;
        let built = (|| {
            // Exactly 0600 whatever the umask.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io("setting permissions of new overlay", path, e))?;
            file.set_len(len)
                .map_err(|e| Error::io("sizing new overlay", path, e))?;
            let dev = OverlayFile {
                file,
                path: path.to_path_buf(),
                size: len,
            };
            let overlay = Overlay::create_on(Arc::new(dev), index)?;
            crate::sys::rename_noreplace(&tmp, path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Error::InvalidInput(format!(
                        "overlay {} appeared while it was being created; not replacing it",
                        path.display()
                    ))
                } else {
                    Error::io("renaming new overlay into place", path, e)
                }
            })?;
            Ok(overlay)
        })();
        let overlay = match built {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("syncing the directory of overlay", path, e))?;
        Ok(overlay)
    }

    /// Makes `dev` a new, empty overlay for the image of `index`: zeroes its bitmap,
    /// writes the header and flushes. `dev` must hold at least the overlay's size
    /// (header, bitmap and one byte per image byte, about 1 MiB more than the image).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `dev` is too small; errors of `dev`.
    pub fn create_on(dev: Arc<dyn WriteAt>, index: &Index) -> Result<Overlay> {
        let name = dev.name();
        let len = overlay_len(&name, index)?;
        if dev.size() < len {
            return Err(Error::InvalidInput(format!(
                "overlay {name} holds {} bytes but the overlay of this image needs {len}",
                dev.size()
            )));
        }
        let image_size = index.image_size();
        let (bitmap_len, data_offset) = layout(image_size);
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..56].copy_from_slice(&index.root_hash());
        h[56..64].copy_from_slice(&HEADER_LEN.to_le_bytes());
        h[64..72].copy_from_slice(&data_offset.to_le_bytes());
        dev.write_zeros(HEADER_LEN, bitmap_len)?;
        dev.write_all_at(&h, 0)?;
        dev.flush()?;
        Overlay::open_on(dev, index)
    }

    /// Opens the existing overlay on `dev` for the image of `index`, checking its header.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `dev` does not hold an overlay of this index (bad magic,
    /// version, block size, image size, offsets or root hash, or truncated); errors of
    /// `dev`.
    pub fn open_on(dev: Arc<dyn WriteAt>, index: &Index) -> Result<Overlay> {
        let name = dev.name();
        let bad = |reason: String| Error::InvalidInput(format!("overlay {name}: {reason}"));
        let len = dev.size();
        let image_size = index.image_size();
        let need = overlay_len(&name, index)?;
        let (bitmap_len, data_offset) = layout(image_size);
        if len < HEADER_LEN {
            return Err(bad(format!(
                "not a tessera overlay ({len} bytes; remove it to have a new one created)"
            )));
        }
        let mut h = vec![0u8; HEADER_LEN as usize];
        dev.read_exact_at(&mut h, 0)?;
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if h[..8] != MAGIC {
            return Err(bad("not a tessera overlay (bad magic)".into()));
        }
        if u32_at(8) != VERSION || u32_at(12) != BLOCK as u32 {
            return Err(bad(format!(
                "version {} with block size {} is not supported",
                u32_at(8),
                u32_at(12)
            )));
        }
        let mut root = [0u8; 32];
        root.copy_from_slice(&h[24..56]);
        if root != index.root_hash() || u64_at(16) != image_size {
            return Err(bad(format!(
                "made for index {} of {} bytes, not this index {} of {image_size} bytes",
                hex(&root),
                u64_at(16),
                hex(&index.root_hash())
            )));
        }
        if u64_at(56) != HEADER_LEN || u64_at(64) != data_offset {
            return Err(bad(format!(
                "bitmap offset {} or data offset {} does not match its image size \
                 (expected {HEADER_LEN} and {data_offset})",
                u64_at(56),
                u64_at(64)
            )));
        }
        if len < need {
            return Err(bad(format!(
                "truncated to {len} bytes (an overlay of this image has {need})"
            )));
        }
        let words = image_size.div_ceil(BLOCK).div_ceil(64) as usize;
        let mut raw = vec![0u8; words * 8];
        dev.read_exact_at(&mut raw[..bitmap_len as usize], HEADER_LEN)?;
        let bits = raw
            .chunks_exact(8)
            .map(|w| {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(Overlay {
            dev,
            image_size,
            data_offset,
            bits: RwLock::new(bits),
            dirty: Mutex::new(None),
            writing: Mutex::new(()),
            flushing: Mutex::new(()),
            failed: Mutex::new(None),
        })
    }

    /// Fails once a barrier has failed (see `failed`).
    fn usable(&self) -> Result<()> {
        match &*lock(&self.failed) {
            None => Ok(()),
            Some(why) => Err(Error::io(
                "an earlier flush failed (writes since the last good flush may be lost; \
                 reopen the overlay), so nothing more is written to overlay",
                self.dev.name(),
                io::Error::other(why.clone()),
            )),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.image_size => Ok(()),
            _ => Err(Error::InvalidInput(format!(
                "range of {len} bytes at {offset} is outside the image of {} bytes",
                self.image_size
            ))),
        }
    }

    /// Whether each block of `[first, last]` is in the overlay.
    fn present(&self, first: u64, last: u64) -> Vec<bool> {
        let bits = self.bits.read().unwrap_or_else(|e| e.into_inner());
        (first..=last)
            .map(|b| bits[(b / 64) as usize] & (1 << (b % 64)) != 0)
            .collect()
    }

    fn mark(&self, first: u64, last: u64) {
        let mut bits = self.bits.write().unwrap_or_else(|e| e.into_inner());
        for b in first..=last {
            bits[(b / 64) as usize] |= 1 << (b % 64);
        }
        drop(bits);
        self.redirty((first / 64) as usize, (last / 64) as usize);
    }

    /// Runs of `len` bytes at `offset`: (length, in overlay), in order.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        self.check(offset, len)?;
        let mut out: Vec<(u64, bool)> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let end = offset + len;
        let first = offset / BLOCK;
        for (k, p) in self
            .present(first, (end - 1) / BLOCK)
            .into_iter()
            .enumerate()
        {
            let b = first + k as u64;
            let n = ((b + 1) * BLOCK).min(end) - (b * BLOCK).max(offset);
            match out.last_mut() {
                Some(r) if r.1 == p => r.0 += n,
                _ => out.push((n, p)),
            }
        }
        Ok(out)
    }

    /// Reads `buf` at `offset`: overlay blocks where written, `image` elsewhere.
    ///
    /// # Errors
    /// As [`ImageReader::read_at`], and [`Error::Io`] for the overlay file.
    pub fn read_at(&self, image: &ImageReader, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        for (n, inside) in self.runs(offset, buf.len() as u64)? {
            let at = offset + pos as u64;
            let dst = &mut buf[pos..pos + n as usize];
            if inside {
                self.dev.read_exact_at(dst, self.data_offset + at)?;
            } else {
                image.read_at(at, dst)?;
            }
            pos += n as usize;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay; durable before returning if `fua`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] outside the image, [`Error::Io`] (also once a flush's
    /// barrier failed), or errors reading the image for the rest of a partly written
    /// block.
    pub fn write_at(&self, image: &ImageReader, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.usable()?;
        let w = lock(&self.writing);
        let end = offset + data.len() as u64;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let start = first * BLOCK;
        let stop = ((last + 1) * BLOCK).min(self.image_size);
        let mut buf = vec![0u8; (stop - start) as usize];
        // Partial edge blocks keep their current contents around the new bytes.
        if offset > start {
            let n = BLOCK.min(stop - start) as usize;
            self.read_at(image, start, &mut buf[..n])?;
        }
        if end < stop && (last > first || offset == start) {
            let b = last * BLOCK;
            let at = (b - start) as usize;
            self.read_at(image, b, &mut buf[at..])?;
        }
        buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
        // The data is stored before the bits naming it are set (see the type's docs).
        self.dev.write_all_at(&buf, self.data_offset + start)?;
        self.mark(first, last);
        drop(w);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros: whole blocks become holes.
    ///
    /// # Errors
    /// As [`Overlay::write_at`].
    pub fn zero(&self, image: &ImageReader, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check(offset, len)?;
        self.usable()?;
        let end = offset + len;
        let inner_start = offset.div_ceil(BLOCK) * BLOCK;
        let inner_end = if end == self.image_size {
            end
        } else {
            end / BLOCK * BLOCK
        };
        if inner_start >= inner_end {
            return self.write_zeros(image, offset, len, fua);
        }
        self.write_zeros(image, offset, inner_start - offset, false)?;
        {
            let _w = lock(&self.writing);
            self.dev
                .write_zeros(self.data_offset + inner_start, inner_end - inner_start)?;
            self.mark(inner_start / BLOCK, (inner_end - 1) / BLOCK);
        }
        self.write_zeros(image, inner_end, end - inner_end, false)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeros(&self, image: &ImageReader, offset: u64, len: u64, fua: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.write_at(image, offset, &vec![0u8; len as usize], fua)
    }

    /// Makes every write that returned before this call durable: a snapshot of the
    /// changed bitmap words, then the data, then those words (see the type's docs).
    ///
    /// # Errors
    /// Errors of the device. After a failed bitmap write the next flush writes it again;
    /// after a failed barrier every later write and flush fails (reopen the overlay to
    /// go on from the last good flush).
    pub fn flush(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.flushing);
        self.usable()?;
        // The snapshot comes first: every bit in it names data whose store returned, so
        // the data flush below makes all of it durable. Writes landing after it are left
        // to the next flush.
        let snapshot = {
            let mut dirty = lock(&self.dirty);
            dirty.take().map(|(lo, hi)| {
                let bits = self.bits.read().unwrap_or_else(|e| e.into_inner());
                let bytes: Vec<u8> = bits[lo..=hi].iter().flat_map(|w| w.to_le_bytes()).collect();
                (lo, hi, bytes)
            })
        };
        let result = self.write_bitmap(snapshot.as_ref());
        if result.is_err() {
            if let Some((lo, hi, _)) = snapshot {
                self.redirty(lo, hi);
            }
        }
        result
    }

    /// Flushes the data, then writes and flushes the bitmap words of `snapshot`.
    fn write_bitmap(&self, snapshot: Option<&(usize, usize, Vec<u8>)>) -> Result<()> {
        self.barrier()?;
        let Some((lo, _, bytes)) = snapshot else {
            return Ok(());
        };
        // The last word may extend past the bitmap on disk: cut it to the bitmap length.
        let (bitmap_len, _) = layout(self.image_size);
        let start = *lo as u64 * 8;
        let n = (bitmap_len - start).min(bytes.len() as u64) as usize;
        self.dev.write_all_at(&bytes[..n], HEADER_LEN + start)?;
        self.barrier()
    }

    /// [`WriteAt::flush`] of the device; a failure makes the overlay unusable (see
    /// `failed`).
    fn barrier(&self) -> Result<()> {
        self.dev
            .flush()
            .inspect_err(|e| *lock(&self.failed) = Some(chain(e)))
    }

    /// Marks words `[lo, hi]` changed again after a failed flush.
    fn redirty(&self, lo: usize, hi: usize) {
        let mut dirty = lock(&self.dirty);
        *dirty = Some(match *dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
    }
}
