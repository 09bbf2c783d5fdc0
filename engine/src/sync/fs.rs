//! The file-system operations sync performs, behind a small trait, so that tests can model
//! what a power cut loses.
//!
//! A sync opens (or creates) its target, opens its seeds, and creates, writes, syncs and
//! removes its journal. All of that goes through [`Fs`]: [`RealFs`] is the real thing
//! (std and Linux calls); the power-cut rig (`engine/tests/sync_inplace/powercut.rs`)
//! implements it with volatile and durable states of directory entries, file sizes and
//! contents, which is what POSIX promises after a crash: nothing that was not synced.
//!
//! What each operation promises to sync (and what the rig checks it relies on):
//! - file contents and size are durable after [`FsFile::sync_all`] (or
//!   [`WriteAt::flush`] for contents of an existing size);
//! - a directory entry (a creation, rename or removal) is durable only after
//!   [`Fs::sync_dir`] of its directory.
//!
//! Names tessera picks itself (a journal, a temporary target) are never followed through a
//! symbolic link and never replace an existing file: [`Fs::create_new`] and
//! [`Fs::open_rw_nofollow`] refuse them, and temporary names (`.NAME.tessera-new.` and 16
//! random hex digits) cannot be guessed; leftovers of that exact shape are deleted by the
//! next run, nothing else.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::WriteAt;
use crate::device::Device;
use crate::error::{Error, Result};

/// An open file or block device, as sync uses it.
pub trait FsFile: WriteAt {
    /// Cuts or extends a regular file to `len` bytes (not durable before
    /// [`FsFile::sync_all`]).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file; block devices cannot be resized.
    fn set_len(&self, len: u64) -> Result<()>;
    /// Makes the contents and the size durable (`fsync`).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    fn sync_all(&self) -> Result<()>;
    /// What identifies the node across opens: `(device, inode)` for a file,
    /// `(u64::MAX, device number)` for a block device.
    fn node(&self) -> (u64, u64);
    /// The name it is known by after a rename (for messages).
    fn renamed(&mut self, path: &Path);
    /// The user id owning it, where the file system has owners (`None`: unknown).
    fn owner(&self) -> Option<u32> {
        None
    }
}

/// The file-system operations of a sync. Every error names the path involved.
pub trait Fs: Sync {
    /// The files it opens.
    type File: FsFile;
    /// Opens an existing file or block device to read.
    ///
    /// # Errors
    /// [`Error::Io`] (not found included); [`Error::InvalidInput`] for other file types.
    fn open_read(&self, path: &Path) -> Result<Self::File>;
    /// Opens an existing file or block device to read and write, following symbolic
    /// links (the caller named it). With `exclusive`, a block device is opened with
    /// `O_EXCL`: Linux refuses it with `EBUSY` while it is mounted or claimed by the
    /// kernel (device-mapper, RAID, swap).
    ///
    /// # Errors
    /// As [`Fs::open_read`].
    fn open_rw(&self, path: &Path, exclusive: bool) -> Result<Self::File>;
    /// Opens an existing regular file to read and write; a symbolic link at `path` is
    /// refused (`ELOOP`), never followed.
    ///
    /// # Errors
    /// As [`Fs::open_read`].
    fn open_rw_nofollow(&self, path: &Path) -> Result<Self::File>;
    /// Creates a new, empty regular file with permission bits `mode` (less the umask);
    /// fails with `AlreadyExists` when anything, a symbolic link included, is at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path.
    fn create_new(&self, path: &Path, mode: u32) -> Result<Self::File>;
    /// Renames `from` to `to`; fails with `AlreadyExists` when `to` exists.
    ///
    /// # Errors
    /// [`Error::Io`] naming the paths.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<()>;
    /// Removes the name `path` (a symbolic link itself, never what it points to).
    ///
    /// # Errors
    /// [`Error::Io`] naming the path (not found included).
    fn remove_file(&self, path: &Path) -> Result<()>;
    /// Makes the creations, renames and removals of names in `dir` durable.
    ///
    /// # Errors
    /// [`Error::Io`] naming the directory.
    fn sync_dir(&self, dir: &Path) -> Result<()>;
    /// Creates the directory `dir` with permission bits `mode` (less the umask); fails
    /// with `AlreadyExists` when anything is at `dir`, and `NotFound` when its parent is
    /// missing. Not durable before [`Fs::sync_dir`] of its parent.
    ///
    /// # Errors
    /// [`Error::Io`] naming the directory.
    fn create_dir(&self, dir: &Path, mode: u32) -> Result<()>;
    /// The names in `dir`.
    ///
    /// # Errors
    /// [`Error::Io`] naming the directory.
    fn list_dir(&self, dir: &Path) -> Result<Vec<OsString>>;
}

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl Fs for RealFs {
    type File = Device;

    fn open_read(&self, path: &Path) -> Result<Device> {
        Device::open_read(path)
    }

    fn open_rw(&self, path: &Path, exclusive: bool) -> Result<Device> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        // O_EXCL without O_CREAT is defined for block devices only: ask for it there.
        let block = fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        if exclusive && block {
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts
            .open(path)
            .map_err(|e| Error::io("opening target", path, e))?;
        Device::from_file(file, path)
    }

    fn open_rw_nofollow(&self, path: &Path) -> Result<Device> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io("opening", path, e))?;
        Device::from_file(file, path)
    }

    fn create_new(&self, path: &Path, mode: u32) -> Result<Device> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| Error::io("creating", path, e))?;
        Device::from_file(file, path)
    }

    fn rename_noreplace(&self, from: &Path, to: &Path) -> Result<()> {
        crate::sys::rename_noreplace(from, to).map_err(|e| Error::io("renaming into", to, e))
    }

    fn remove_file(&self, path: &Path) -> Result<()> {
        fs::remove_file(path).map_err(|e| Error::io("removing", path, e))
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("syncing directory", dir, e))
    }

    fn create_dir(&self, dir: &Path, mode: u32) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(mode)
            .create(dir)
            .map_err(|e| Error::io("creating directory", dir, e))
    }

    fn list_dir(&self, dir: &Path) -> Result<Vec<OsString>> {
        let entries = fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
        Ok(entries.flatten().map(|e| e.file_name()).collect())
    }
}

/// The operating-system error under an [`Error::Io`], if that is what `e` is.
pub(crate) fn os_error(e: &Error) -> Option<&io::Error> {
    match e {
        Error::Io { source, .. } => Some(source),
        _ => None,
    }
}

/// Whether `e` is an I/O error of kind `kind`.
pub(crate) fn is_io_kind(e: &Error, kind: io::ErrorKind) -> bool {
    os_error(e).is_some_and(|s| s.kind() == kind)
}

/// Whether `e` is the operating-system error number `errno`.
pub(crate) fn is_errno(e: &Error, errno: i32) -> bool {
    os_error(e).is_some_and(|s| s.raw_os_error() == Some(errno))
}

/// The directory of `path` (`.` for a bare name) and its file name.
///
/// # Errors
/// [`Error::InvalidInput`] when `path` has no file name.
pub(crate) fn split_path(path: &Path) -> Result<(PathBuf, &OsStr)> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{} has no file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Creates `dir` and its missing parents, private to the user (mode 0700: a journal
/// names devices and plans), durably: each new directory's entry is synced in its parent
/// before anything is put in it, so a power cut never takes a synced journal away with a
/// directory that was not. Existing directories are left as they are.
///
/// # Errors
/// [`Error::Io`] naming the directory that could not be created or synced.
pub(crate) fn create_dir_durably<F: Fs>(fs: &F, dir: &Path) -> Result<()> {
    let created = match fs.create_dir(dir, 0o700) {
        Ok(()) => true,
        Err(e) if is_io_kind(&e, io::ErrorKind::AlreadyExists) => false,
        Err(e) if is_io_kind(&e, io::ErrorKind::NotFound) => {
            match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => create_dir_durably(fs, parent)?,
                None => return Err(e),
            }
            match fs.create_dir(dir, 0o700) {
                Ok(()) => true,
                Err(e) if is_io_kind(&e, io::ErrorKind::AlreadyExists) => false,
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    if created {
        let (parent, _) = split_path(dir)?;
        fs.sync_dir(&parent)?;
    }
    Ok(())
}

/// The prefix of the temporary names of `name`: `.NAME.tessera-new.`.
fn temp_prefix(name: &OsStr) -> String {
    format!(".{}.tessera-new.", name.to_string_lossy())
}

/// A new temporary name beside `path`: `.NAME.tessera-new.` and 16 random hex digits.
///
/// # Errors
/// [`Error::InvalidInput`] when `path` has no file name.
pub(crate) fn temp_path(path: &Path) -> Result<PathBuf> {
    let (dir, name) = split_path(path)?;
    Ok(dir.join(format!("{}{}", temp_prefix(name), random_suffix())))
}

/// Deletes the temporary files of `path` (names [`temp_path`] makes) that a killed run
/// left beside it, and nothing else; best effort. Removing a name never follows a link.
pub(crate) fn remove_temp_debris<F: Fs>(fs: &F, path: &Path) {
    let Ok((dir, name)) = split_path(path) else {
        return;
    };
    let prefix = temp_prefix(name);
    let Ok(names) = fs.list_dir(&dir) else {
        return;
    };
    for n in names {
        let n = n.to_string_lossy();
        let ours = n
            .strip_prefix(&prefix)
            .is_some_and(|rest| rest.len() == 16 && rest.bytes().all(|b| b.is_ascii_hexdigit()));
        if ours {
            let _ = fs.remove_file(&dir.join(&*n));
        }
    }
}

/// 16 hex digits nobody can predict (keyed by the randomly seeded hasher of std, plus
/// time, process and a counter), for temporary names.
pub(crate) fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_names_never_follow_or_replace() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = RealFs.create_new(&link, 0o600).unwrap_err();
        assert!(is_io_kind(&e, io::ErrorKind::AlreadyExists), "{e}");
        let e = RealFs.create_new(&victim, 0o600).unwrap_err();
        assert!(is_io_kind(&e, io::ErrorKind::AlreadyExists), "{e}");
        let e = RealFs.open_rw_nofollow(&link).unwrap_err();
        assert!(is_errno(&e, libc::ELOOP), "{e}");
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        let (a, b) = (random_suffix(), random_suffix());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
    }
}
