//! What an export serves: the [`Backend`] trait and a memory implementation.
//!
//! Backends are synchronous; the server calls them from tokio's blocking pool, at most
//! `max_in_flight` calls per connection. Offsets and lengths passed in are already checked
//! against [`Backend::size`], and lengths are never zero.

use std::sync::RwLock;

/// Why a backend call failed. The server maps each kind to one NBD error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The data could not be read or written, or failed verification (`EIO`).
    Io,
    /// The export does not accept this operation (`EPERM`).
    ReadOnly,
    /// No space left for the write (`ENOSPC`).
    NoSpace,
    /// The request is not valid for this backend (`EINVAL`).
    Invalid,
    /// The server is going away (`ESHUTDOWN`).
    Shutdown,
}

/// A failed backend call: a kind for the client and a message for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// What the client is told.
    pub kind: ErrorKind,
    /// What happened and where (for example the corrupt chunk's id); logged by the server
    /// and sent in structured error replies.
    pub message: String,
}

impl BackendError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
        }
    }
}

/// Result of a backend call.
pub type BackendResult<T> = Result<T, BackendError>;

/// The allocation state of a run of bytes (the `base:allocation` metadata context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Allocated data.
    Data,
    /// Allocated, reads as zeroes.
    Zero,
    /// Not allocated, reads as zeroes.
    Hole,
}

impl BlockState {
    /// True when the bytes read as zeroes.
    pub fn is_zero(self) -> bool {
        !matches!(self, BlockState::Data)
    }
}

/// A run of bytes in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, never zero.
    pub len: u64,
    /// Its state.
    pub state: BlockState,
}

/// What a backend supports; sets the transmission flags of its export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Accepts WRITE, TRIM and WRITE_ZEROES (otherwise they get `EPERM`).
    pub writable: bool,
    /// All connections see one state, so `NBD_FLAG_CAN_MULTI_CONN` is set.
    pub multi_conn: bool,
}

/// A block device served by an export.
///
/// Implementations must be usable from many threads at once. Every method gets a range
/// already checked to lie inside `0..size()`.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// What the backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Fills `buf` with the bytes at `offset`, and returns the extents of `buf` that read
    /// as zeroes (they must be zero in `buf` too; an empty list means "all data").
    /// Structured replies send those extents as holes.
    ///
    /// # Errors
    /// Any failure; no byte of `buf` is sent to the client then.
    fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<Vec<Extent>>;

    /// Writes `data` at `offset`, durably before returning when `fua` is set.
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] by default.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> BackendResult<()> {
        let _ = (offset, data, fua);
        Err(BackendError::new(
            ErrorKind::ReadOnly,
            "export is read-only",
        ))
    }

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// I/O failures.
    fn flush(&self) -> BackendResult<()> {
        Ok(())
    }

    /// Discards `len` bytes at `offset` (they may read as anything afterwards).
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] by default.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BackendResult<()> {
        let _ = (offset, len, fua);
        Err(BackendError::new(
            ErrorKind::ReadOnly,
            "export is read-only",
        ))
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    ///
    /// # Errors
    /// [`ErrorKind::ReadOnly`] by default.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BackendResult<()> {
        let _ = (offset, len, fua);
        Err(BackendError::new(
            ErrorKind::ReadOnly,
            "export is read-only",
        ))
    }

    /// Hint that `len` bytes at `offset` will be read soon (`NBD_CMD_CACHE`).
    ///
    /// # Errors
    /// Failures to start the prefetch; the default does nothing.
    fn cache(&self, offset: u64, len: u64) -> BackendResult<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Allocation state of `len` bytes at `offset`, in order, starting at `offset`. May
    /// cover less than `len` (never more, never nothing). Default: all data.
    ///
    /// # Errors
    /// Failures to look the state up.
    fn extents(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent {
            len,
            state: BlockState::Data,
        }])
    }
}

/// A backend holding its bytes in memory; runs of zero bytes report as holes. Handy for
/// tests and examples.
#[derive(Debug)]
pub struct MemoryBackend {
    data: RwLock<Vec<u8>>,
    writable: bool,
}

impl MemoryBackend {
    /// Serves `data`, writable when `writable` is set.
    pub fn new(data: Vec<u8>, writable: bool) -> Self {
        MemoryBackend {
            data: RwLock::new(data),
            writable,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn modify(&self, offset: u64, f: impl FnOnce(&mut [u8])) -> BackendResult<()> {
        if !self.writable {
            return Err(BackendError::new(
                ErrorKind::ReadOnly,
                "export is read-only",
            ));
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        f(&mut data[offset as usize..]);
        Ok(())
    }
}

/// Splits `buf` (at image `offset`) into runs of 512-byte sectors that are or are not
/// all zero; the first and last run may be partial sectors.
fn zero_runs(offset: u64, buf: &[u8]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let sector_end = ((offset + pos as u64) / 512 + 1) * 512 - offset;
        let end = (sector_end as usize).min(buf.len());
        let state = if buf[pos..end].iter().all(|&b| b == 0) {
            BlockState::Hole
        } else {
            BlockState::Data
        };
        let len = (end - pos) as u64;
        match out.last_mut() {
            Some(last) if last.state == state => last.len += len,
            _ => out.push(Extent { len, state }),
        }
        pos = end;
    }
    out
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            writable: self.writable,
            multi_conn: true,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<Vec<Extent>> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(zero_runs(offset, buf))
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> BackendResult<()> {
        self.modify(offset, |d| d[..data.len()].copy_from_slice(data))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BackendResult<()> {
        self.write_zeroes(offset, len, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> BackendResult<()> {
        self.modify(offset, |d| d[..len as usize].fill(0))
    }

    fn extents(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        Ok(zero_runs(offset, &data[start..start + len as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_follow_sectors() {
        let mut buf = vec![0u8; 2048];
        buf[600] = 1;
        let runs = zero_runs(0, &buf);
        assert_eq!(
            runs,
            vec![
                Extent {
                    len: 512,
                    state: BlockState::Hole
                },
                Extent {
                    len: 512,
                    state: BlockState::Data
                },
                Extent {
                    len: 1024,
                    state: BlockState::Hole
                },
            ]
        );
        let mut b = vec![0u8; 1000];
        b[450] = 1;
        let lens: Vec<u64> = zero_runs(100, &b).iter().map(|e| e.len).collect();
        assert_eq!(lens, [412, 512, 76]);
    }
}
