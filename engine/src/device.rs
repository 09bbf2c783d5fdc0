//! Images and targets: regular files and block devices behind one positional-I/O type.
//!
//! Edge cases: reads past the end are errors (never short), `EINTR` is retried by std's
//! `read_exact_at`/`write_all_at`, a block device's size comes from `BLKGETSIZE64`, and
//! zero ranges become holes on regular files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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
    size: u64,
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

    /// Opens a target for writing an image of `image_size` bytes. A missing path is
    /// created as a file of that size; an existing target must be at least that large
    /// (its tail past the image is left untouched).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the target is too small (nothing is written then).
    pub fn open_target(path: &Path, image_size: u64) -> Result<Device> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| Error::io("creating target", path, e))?;
                f.set_len(image_size)
                    .map_err(|e| Error::io("sizing target", path, e))?;
                f
            }
            Err(e) => return Err(Error::io("opening target", path, e)),
        };
        let dev = Device::from_file(file, path)?;
        if dev.size < image_size {
            return Err(Error::InvalidInput(format!(
                "target {} holds {} bytes but the image needs {image_size}; nothing was written \
                 (use a larger partition, or grow the file with `truncate -s {image_size}`)",
                path.display(),
                dev.size
            )));
        }
        Ok(dev)
    }

    fn from_file(file: File, path: &Path) -> Result<Device> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io("inspecting", path, e))?;
        let ft = meta.file_type();
        let (kind, size) = if ft.is_block_device() {
            let size = crate::sys::block_device_size(&file)
                .map_err(|e| Error::io("reading block device size of", path, e))?;
            (DeviceKind::BlockDevice, size)
        } else if ft.is_file() {
            (DeviceKind::File, meta.len())
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
            size,
        })
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
        self.size
    }

    /// The underlying file, for sequential reading.
    pub fn file(&self) -> &File {
        &self.file
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

    /// Makes `[offset, offset + len)` read as zeros: a hole on a regular file (falling
    /// back to writing zeros where holes are unsupported), zeros on a block device.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    pub fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        if self.kind == DeviceKind::File && crate::sys::punch_hole(&self.file, offset, len).is_ok()
        {
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
