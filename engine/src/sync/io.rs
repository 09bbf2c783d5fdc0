//! What sync needs of a seed and of a target: positional reads, and for the target
//! writes, zeroing and a durability barrier. [`Device`] implements both; tests put
//! fault-injecting devices (lost or torn writes at a simulated power cut) and in-memory
//! ones behind the same traits.

use crate::device::{Device, DeviceKind};
use crate::error::{Error, Result};

/// Positional reads of an image source: a seed, or a target being synced.
///
/// Implementations must be usable from many threads at once. Contract, shared by every
/// implementation: a read is exact (a short read is an error, never partial data), a read
/// that reaches past [`ReadAt::size`] is an error, an empty buffer is a no-op, and
/// interrupted system calls are retried rather than reported.
pub trait ReadAt: Send + Sync {
    /// Where the bytes are (a path), for messages.
    fn name(&self) -> String;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// [`Error::Io`] naming the device, including reads past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Where the hole that `offset` is in ends: bytes from `offset` up to the returned
    /// offset are known to read as zeros without reading them (a hole of a regular file).
    /// `offset` itself when there is data there or nothing is known.
    fn hole_end(&self, offset: u64) -> u64 {
        offset
    }
}

/// A device sync may write: positional writes, zeroing, and a durability barrier.
///
/// Writes may sit in a volatile cache until [`WriteAt::flush`] returns: a power cut can
/// lose any of them, or tear one (some of its sectors written, others not). Sync is
/// designed for exactly that: it never relies on a write being durable before the next
/// flush.
pub trait WriteAt: ReadAt {
    /// File (holes possible) or block device.
    fn kind(&self) -> DeviceKind;
    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    /// [`Error::Io`] naming the device.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes `[offset, offset + len)` read as zeros (a hole on a regular file).
    ///
    /// # Errors
    /// [`Error::Io`] naming the device.
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every write that returned before this call durable.
    ///
    /// # Errors
    /// [`Error::Io`] naming the device.
    fn flush(&self) -> Result<()>;
}

impl ReadAt for Device {
    fn name(&self) -> String {
        self.path().display().to_string()
    }
    fn size(&self) -> u64 {
        Device::size(self)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Device::read_exact_at(self, buf, offset)
    }
    fn hole_end(&self, offset: u64) -> u64 {
        Device::hole_end(self, offset)
    }
}

impl WriteAt for Device {
    fn kind(&self) -> DeviceKind {
        Device::kind(self)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Device::write_all_at(self, buf, offset)
    }
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        Device::write_zeros(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.sync()
    }
}

/// The target seen through [`ReadAt`] only (for the scanner).
pub(crate) struct TargetRead<'a>(pub &'a dyn WriteAt);

impl ReadAt for TargetRead<'_> {
    fn name(&self) -> String {
        self.0.name()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn hole_end(&self, offset: u64) -> u64 {
        self.0.hole_end(offset)
    }
}

/// A target that does not exist yet, for dry runs: reads as zeros, refuses writes.
pub(crate) struct Absent(pub u64);

impl ReadAt for Absent {
    fn name(&self) -> String {
        "(absent target)".into()
    }
    fn size(&self) -> u64 {
        self.0
    }
    fn read_exact_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

impl WriteAt for Absent {
    fn kind(&self) -> DeviceKind {
        DeviceKind::File
    }
    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::InvalidInput("a dry run writes nothing".into()))
    }
    fn write_zeros(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::InvalidInput("a dry run writes nothing".into()))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A target seen by a dry run as the sync would make it: a file shorter than the image
/// reads as grown with zeros up to `size`; writes are refused.
pub(crate) struct Padded<'a, D: WriteAt> {
    pub inner: &'a D,
    pub size: u64,
}

impl<D: WriteAt> ReadAt for Padded<'_, D> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "read of {} bytes at offset {offset} past the end of {}",
                    buf.len(),
                    self.name()
                ))
            })?;
        let have = self.inner.size();
        let split = (have.clamp(offset, end) - offset) as usize;
        let (head, tail) = buf.split_at_mut(split);
        if !head.is_empty() {
            self.inner.read_exact_at(head, offset)?;
        }
        tail.fill(0);
        Ok(())
    }
}

impl<D: WriteAt> WriteAt for Padded<'_, D> {
    fn kind(&self) -> DeviceKind {
        self.inner.kind()
    }
    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::InvalidInput("a dry run writes nothing".into()))
    }
    fn write_zeros(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::InvalidInput("a dry run writes nothing".into()))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}
