//! Images and targets: regular files and block devices behind one positional-I/O type.
//!
//! Edge cases: reads past the end are errors (never short), `EINTR` is retried by std's
//! `read_exact_at`/`write_all_at`, a block device's size comes from `BLKGETSIZE64`, and
//! zero ranges become holes on regular files.

use std::fmt::Display;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::chunker::{Segment, Source, ZeroScan};
use crate::error::{Error, Result};
use crate::sync::fs::FsFile;

/// The first `size` bytes of a file as data extents and holes (a [`Source`]): holes found
/// with `SEEK_DATA`/`SEEK_HOLE` are reported without being read; block devices and file
/// systems that cannot tell are all data.
pub struct Extents<'a> {
    file: &'a File,
    /// The device's count of bytes read through [`Device::segments`].
    read: &'a AtomicU64,
    pos: u64,
    size: u64,
    /// End of the data extent `pos` is in (when `pos < data_end`).
    data_end: u64,
    seek: bool,
}

impl Source for Extents<'_> {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<Segment> {
        if self.pos >= self.size {
            return Ok(Segment::End);
        }
        if self.pos >= self.data_end {
            if self.seek {
                match crate::sys::seek_data(self.file, self.pos) {
                    Ok(data) => {
                        let data = data.unwrap_or(self.size).min(self.size);
                        if data > self.pos {
                            let hole = data - self.pos;
                            self.pos = data;
                            return Ok(Segment::Zeros(hole));
                        }
                        self.data_end = crate::sys::seek_hole(self.file, self.pos)?
                            .unwrap_or(self.size)
                            .min(self.size);
                    }
                    // No hole tracking (or not a seekable file): all data.
                    Err(_) => self.seek = false,
                }
            }
            if !self.seek || self.data_end <= self.pos {
                self.data_end = self.size;
            }
        }
        let want = (self.data_end - self.pos).min(buf.len() as u64) as usize;
        loop {
            match self.file.read_at(&mut buf[..want], self.pos) {
                // The file shrank: the caller sees the stream end early.
                Ok(0) => return Ok(Segment::End),
                Ok(n) => {
                    self.pos += n as u64;
                    self.read.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(Segment::Data(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether a device is a regular file or a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A regular file: sparse writes possible.
    File,
    /// A block device: size fixed, zeros must be written.
    BlockDevice,
}

/// An open image source or target.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    kind: DeviceKind,
    /// Changes with [`FsFile::set_len`].
    size: AtomicU64,
    /// `(device, inode)` of a file, `(u64::MAX, device number)` of a block device.
    node: (u64, u64),
    /// Bytes read through [`Device::segments`] (holes are not read).
    read: AtomicU64,
}

impl Device {
    /// Opens a file or block device for reading.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path; [`Error::InvalidInput`] for other file types.
    pub fn open_read(path: &Path) -> Result<Device> {
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        Device::from_file(file, path)
    }

    /// Opens a target for writing an image of `image_size` bytes, as sync does (without
    /// claiming a block device exclusively): a missing path is created durably at that
    /// size (under a temporary name, then renamed), a smaller regular file is grown, a
    /// block device must be at least that large (its tail past the image is left
    /// untouched).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if a block device is too small (nothing is written then);
    /// [`Error::Io`] naming the path.
    pub fn open_target(path: &Path, image_size: u64) -> Result<Device> {
        crate::sync::open_target(&crate::sync::fs::RealFs, path, image_size, false).map(|t| t.file)
    }

    /// Wraps a file just opened at `path`.
    pub(crate) fn from_file(file: File, path: &Path) -> Result<Device> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io("inspecting", path, e))?;
        let ft = meta.file_type();
        let (kind, size, node) = if ft.is_block_device() {
            let size = crate::sys::block_device_size(&file)
                .map_err(|e| Error::io("reading block device size of", path, e))?;
            (DeviceKind::BlockDevice, size, (u64::MAX, meta.rdev()))
        } else if ft.is_file() {
            (DeviceKind::File, meta.len(), (meta.dev(), meta.ino()))
        } else {
            return Err(Error::InvalidInput(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };
        Ok(Device {
            file,
            path: path.to_path_buf(),
            kind,
            size: AtomicU64::new(size),
            node,
            read: AtomicU64::new(0),
        })
    }

    /// Bytes read so far through [`Device::segments`]: the data, not the holes.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Size in bytes (from `BLKGETSIZE64` for block devices).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path, including reads past the end.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("reading", &self.path, e))
    }

    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io("writing", &self.path, e))
    }

    /// Makes `[offset, offset + len)` read as zeros: a hole on a regular file, a zeroed
    /// range on a block device (`FALLOC_FL_ZERO_RANGE`: write-zeroes or discard, no data
    /// sent), falling back to writing zeros where neither is supported.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    pub fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        let quick = match self.kind {
            DeviceKind::File => crate::sys::punch_hole(&self.file, offset, len),
            DeviceKind::BlockDevice => crate::sys::zero_range(&self.file, offset, len),
        };
        if quick.is_ok() {
            return Ok(());
        }
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            self.write_all_at(&ZEROS[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Where the hole of a regular file that `offset` is in ends (`SEEK_DATA`): the bytes
    /// from `offset` to there read as zeros. `offset` itself when there is data at
    /// `offset`, on block devices, or when the file system cannot tell.
    pub fn hole_end(&self, offset: u64) -> u64 {
        if self.kind != DeviceKind::File {
            return offset;
        }
        match crate::sys::seek_data(&self.file, offset) {
            Ok(None) => self.size().max(offset),
            Ok(Some(data)) => data.max(offset),
            Err(_) => offset,
        }
    }

    /// The image's bytes as [`Segments`](crate::chunker::Segments) for the chunker: holes
    /// of a file (`SEEK_DATA`/`SEEK_HOLE`) are skipped without reading, and zero blocks
    /// in the data read (allocated zeros, block devices) are found by a scan.
    pub fn segments(&self, size: u64) -> ZeroScan<Extents<'_>> {
        ZeroScan::new(Extents {
            file: &self.file,
            read: &self.read,
            pos: 0,
            size,
            data_end: 0,
            seek: self.kind == DeviceKind::File,
        })
    }

    /// Flushes written data to stable storage.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("syncing", &self.path, e))
    }
}

impl FsFile for Device {
    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("resizing", &self.path, e))?;
        self.size.store(len, Ordering::Relaxed);
        Ok(())
    }
    fn sync_all(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("syncing", &self.path, e))
    }
    fn node(&self) -> (u64, u64) {
        self.node
    }
    fn renamed(&mut self, path: &Path) {
        self.path = path.to_path_buf();
    }
    fn owner(&self) -> Option<u32> {
        self.file.metadata().ok().map(|m| m.uid())
    }
}

/// Why `name` (of `kind`, `size` bytes) cannot hold an image of `image_size` bytes, or
/// `None` when it can: the one wording that sync, verify and the dm-verity tree share.
pub fn size_shortfall(
    name: impl Display,
    kind: DeviceKind,
    size: u64,
    image_size: u64,
) -> Option<String> {
    let what = match kind {
        DeviceKind::BlockDevice => "block device",
        DeviceKind::File => "file",
    };
    (size < image_size)
        .then(|| format!("{what} {name} holds {size} bytes but the image needs {image_size}"))
}

/// The one check that a target to be written holds the image (see [`size_shortfall`]).
///
/// # Errors
/// [`Error::InvalidInput`] naming the target, both sizes and what to do.
pub fn check_target_size(
    name: impl Display,
    kind: DeviceKind,
    size: u64,
    image_size: u64,
) -> Result<()> {
    let Some(why) = size_shortfall(name, kind, size, image_size) else {
        return Ok(());
    };
    let hint = match kind {
        DeviceKind::BlockDevice => "use a larger device or partition".into(),
        DeviceKind::File => format!("grow it with `truncate -s {image_size}`"),
    };
    Err(Error::InvalidInput(format!(
        "{why}; nothing was written ({hint})"
    )))
}

/// Why a block device was refused with `EBUSY` when opened exclusively: the mount points
/// that `/proc/self/mountinfo` gives for its device number or those of its partitions, or
/// the kernel holders listed in `/sys/dev/block/MAJOR:MINOR/holders` (device-mapper, RAID).
pub(crate) fn busy_error(path: &Path) -> Error {
    let rdev = std::fs::metadata(path).map_or(0, |m| m.rdev());
    let numbers = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let why = busy_reason(&numbers, &mountinfo, Path::new("/sys/dev/block"));
    Error::InvalidInput(format!(
        "block device {} ({numbers}) {why}: refusing to write into a live file system, \
         which would overwrite the image or be overwritten by it (unmount or release it \
         first; --force writes anyway)",
        path.display()
    ))
}

/// What holds block device `numbers` (`MAJOR:MINOR`), from the text of a `mountinfo` and
/// a `/sys/dev/block` directory.
fn busy_reason(numbers: &str, mountinfo: &str, sys_block: &Path) -> String {
    let sys = sys_block.join(numbers);
    // The device itself, then its partitions (a whole disk is busy while one is mounted).
    let mut nodes = vec![(String::new(), numbers.to_string(), sys.clone())];
    for e in std::fs::read_dir(&sys).into_iter().flatten().flatten() {
        let p = e.path();
        if p.join("partition").exists() {
            if let Ok(n) = std::fs::read_to_string(p.join("dev")) {
                let name = e.file_name().to_string_lossy().into_owned();
                nodes.push((format!(" (partition {name})"), n.trim().to_string(), p));
            }
        }
    }
    nodes[1..].sort();
    let mut mounts = Vec::new();
    let mut holders = Vec::new();
    for (label, n, dir) in &nodes {
        for line in mountinfo.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.get(2) == Some(&n.as_str()) {
                if let Some(point) = f.get(4).and_then(|m| unescape_mount(m)) {
                    mounts.push(format!("{point}{label}"));
                }
            }
        }
        let mut held: Vec<String> = std::fs::read_dir(dir.join("holders"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| format!("{}{label}", e.file_name().to_string_lossy()))
            .collect();
        held.sort();
        holders.extend(held);
    }
    if !mounts.is_empty() {
        format!("is mounted on {}", mounts.join(", "))
    } else if !holders.is_empty() {
        format!("is held by {}", holders.join(", "))
    } else {
        "is in use (mounted, part of a device-mapper, RAID or swap set, or opened \
         exclusively by another program)"
            .into()
    }
}

/// A mount point as `/proc/self/mountinfo` escapes it (`\040` for a space...).
fn unescape_mount(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wording_for_a_target_too_small() {
        check_target_size("/dev/x", DeviceKind::BlockDevice, 10, 10).unwrap();
        let e = check_target_size("/dev/x", DeviceKind::BlockDevice, 9, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "block device /dev/x holds 9 bytes but the image needs 10; nothing was written \
             (use a larger device or partition)"
        );
        let e = check_target_size("a.img", DeviceKind::File, 0, 10).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("file a.img holds 0 bytes but the image needs 10"));
    }

    #[test]
    fn what_holds_a_busy_device_is_named() {
        let sys = tempfile::tempdir().unwrap();
        let disk = sys.path().join("7:0");
        let part = disk.join("loop0p1");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::write(part.join("partition"), "1\n").unwrap();
        std::fs::write(part.join("dev"), "259:0\n").unwrap();
        std::fs::create_dir_all(part.join("holders")).unwrap();
        std::fs::create_dir_all(disk.join("holders")).unwrap();
        let mountinfo = "22 1 259:0 / /mnt/a\\040b rw,relatime shared:1 - ext4 /dev/loop0p1 rw\n\
                         23 1 7:0 / /srv rw - ext4 /dev/loop0 rw\n\
                         24 1 8:0 / / rw - ext4 /dev/sda rw\n";
        assert_eq!(
            busy_reason("7:0", mountinfo, sys.path()),
            "is mounted on /srv, /mnt/a b (partition loop0p1)"
        );
        // Not mounted, but held by device-mapper (through its partition).
        std::fs::create_dir(part.join("holders/dm-3")).unwrap();
        assert_eq!(
            busy_reason("7:0", "", sys.path()),
            "is held by dm-3 (partition loop0p1)"
        );
        assert!(busy_reason("7:9", "", sys.path()).starts_with("is in use"));
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount("/mnt/a\\040b").unwrap(), "/mnt/a b");
        assert_eq!(unescape_mount("/x\\").unwrap(), "/x\\");
    }
}
