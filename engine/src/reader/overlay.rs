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
//! of a block first copies the rest of that block from the image. Zeroing whole blocks
//! punches holes. `flush` makes data durable before the bitmap that points to it, so a
//! crash loses at most the writes since the last flush, never mixes in garbage.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};

use super::ImageReader;
use crate::error::{Error, Result};
use crate::index::{hex, Index};

const MAGIC: [u8; 8] = *b"TESSOVL\0";
const VERSION: u32 = 1;
/// Bytes per overlay block.
pub const BLOCK: u64 = 4096;
const HEADER_LEN: u64 = 4096;
const DATA_ALIGN: u64 = 1 << 20;

/// Range of bitmap words changed since the last flush.
type Dirty = Option<(usize, usize)>;

/// A writable layer over an image, kept in one sparse file.
#[derive(Debug)]
pub struct Overlay {
    file: File,
    path: PathBuf,
    image_size: u64,
    data_offset: u64,
    bits: RwLock<Vec<u64>>,
    dirty: Mutex<Dirty>,
    /// Serialises writers: partial-block writes read, merge and write back.
    writing: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Overlay {
    /// Opens the overlay at `path` for the image of `index`, creating it if missing or
    /// empty.
    ///
    /// # Errors
    /// [`Error::Io`] on I/O failure; [`Error::InvalidInput`] if the file is not an overlay
    /// or belongs to another index.
    pub fn open(path: &Path, index: &Index) -> Result<Overlay> {
        let io = |what| move |e| Error::io(what, path, e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("opening overlay"))?;
        let image_size = index.image_size();
        let blocks = image_size.div_ceil(BLOCK);
        let words = blocks.div_ceil(64) as usize;
        let bitmap_len = blocks.div_ceil(8);
        let data_offset = (HEADER_LEN + bitmap_len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        let len = file.metadata().map_err(io("reading overlay size"))?.len();
        let bad =
            |reason: String| Error::InvalidInput(format!("overlay {}: {reason}", path.display()));
        if len == 0 {
            let mut h = vec![0u8; HEADER_LEN as usize];
            h[..8].copy_from_slice(&MAGIC);
            h[8..12].copy_from_slice(&VERSION.to_le_bytes());
            h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
            h[16..24].copy_from_slice(&image_size.to_le_bytes());
            h[24..56].copy_from_slice(&index.root_hash());
            h[56..64].copy_from_slice(&HEADER_LEN.to_le_bytes());
            h[64..72].copy_from_slice(&data_offset.to_le_bytes());
            file.set_len(data_offset + image_size)
                .map_err(io("sizing overlay"))?;
            file.write_all_at(&h, 0)
                .map_err(io("writing overlay header"))?;
            file.sync_all().map_err(io("syncing overlay"))?;
        } else {
            let mut h = vec![0u8; HEADER_LEN as usize];
            if len < HEADER_LEN {
                return Err(bad(format!("not a tessera overlay ({len} bytes)")));
            }
            file.read_exact_at(&mut h, 0)
                .map_err(io("reading overlay header"))?;
            let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
            let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
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
            if h[24..56] != index.root_hash() || u64_at(16) != image_size {
                return Err(bad(format!(
                    "made for index {} of {} bytes, not this index {}",
                    hex(h[24..56].try_into().expect("32 bytes")),
                    u64_at(16),
                    hex(&index.root_hash())
                )));
            }
            if u64_at(56) != HEADER_LEN || u64_at(64) != data_offset {
                return Err(bad(
                    "bitmap or data offset does not match its image size".into()
                ));
            }
            if len < data_offset + image_size {
                return Err(bad(format!("truncated to {len} bytes")));
            }
        }
        let mut raw = vec![0u8; words * 8];
        file.read_exact_at(&mut raw[..bitmap_len as usize], HEADER_LEN)
            .map_err(io("reading overlay bitmap"))?;
        let bits = raw
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        Ok(Overlay {
            file,
            path: path.to_path_buf(),
            image_size,
            data_offset,
            bits: RwLock::new(bits),
            dirty: Mutex::new(None),
            writing: Mutex::new(()),
        })
    }

    fn io(&self, what: &'static str) -> impl Fn(std::io::Error) -> Error + '_ {
        move |e| Error::io(what, &self.path, e)
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
        let (lo, hi) = ((first / 64) as usize, (last / 64) as usize);
        let mut dirty = lock(&self.dirty);
        *dirty = Some(match *dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
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
                self.file
                    .read_exact_at(dst, self.data_offset + at)
                    .map_err(self.io("reading overlay"))?;
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
    /// [`Error::InvalidInput`] outside the image, [`Error::Io`], or errors reading the
    /// image for the rest of a partly written block.
    pub fn write_at(&self, image: &ImageReader, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _w = lock(&self.writing);
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
        self.file
            .write_all_at(&buf, self.data_offset + start)
            .map_err(self.io("writing overlay"))?;
        self.mark(first, last);
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
            let at = self.data_offset + inner_start;
            if crate::sys::punch_hole(&self.file, at, inner_end - inner_start).is_err() {
                // Filesystems without hole punching get real zeros.
                let zeros = vec![0u8; 1 << 20];
                let mut pos = inner_start;
                while pos < inner_end {
                    let n = (inner_end - pos).min(zeros.len() as u64) as usize;
                    self.file
                        .write_all_at(&zeros[..n], self.data_offset + pos)
                        .map_err(self.io("zeroing overlay"))?;
                    pos += n as u64;
                }
            }
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

    /// Makes every write so far durable: data first, then the bitmap naming it.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(self.io("syncing overlay data"))?;
        let Some((lo, hi)) = lock(&self.dirty).take() else {
            return Ok(());
        };
        let bytes: Vec<u8> = {
            let bits = self.bits.read().unwrap_or_else(|e| e.into_inner());
            bits[lo..=hi].iter().flat_map(|w| w.to_le_bytes()).collect()
        };
        // The last word may extend past the bitmap on disk: cut it to the bitmap length.
        let bitmap_len = self.image_size.div_ceil(BLOCK).div_ceil(8);
        let start = lo as u64 * 8;
        let n = (bitmap_len - start).min(bytes.len() as u64) as usize;
        self.file
            .write_all_at(&bytes[..n], HEADER_LEN + start)
            .map_err(self.io("writing overlay bitmap"))?;
        self.file
            .sync_data()
            .map_err(self.io("syncing overlay bitmap"))
    }
}
