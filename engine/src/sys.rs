//! The engine's only `unsafe` code: thin wrappers over Linux calls that std lacks.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of the block device open as `file`.
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live,
    // properly aligned u64; the fd is owned by `file` and open for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Deallocates `[offset, offset + len)` of a regular file, keeping its size; reads of the
/// range return zeros afterwards.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_PUNCH_HOLE, offset, len)
}

/// Where `lseek` with `whence` (`SEEK_DATA` or `SEEK_HOLE`) from `offset` lands: `None`
/// when there is no data at or after `offset` (`ENXIO`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = i64::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek takes plain integers; the fd is owned by `file` and stays open. Only
    // positional reads and writes use this fd, so moving its offset disturbs nothing.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(rc as u64))
}

/// The start of the first data at or after `offset` (`SEEK_DATA`), `None` if only a hole
/// follows. File systems without hole tracking report everything as data.
pub(crate) fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// The start of the first hole at or after `offset` (`SEEK_HOLE`; the end of the file
/// counts as one), `None` if `offset` is past the end.
pub(crate) fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_HOLE)
}

/// Makes `[offset, offset + len)` of a block device read as zeros without writing them
/// (`fallocate` with `FALLOC_FL_ZERO_RANGE`: the device's write-zeroes or discard path).
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_ZERO_RANGE, offset, len)
}

/// `fallocate(file, mode | FALLOC_FL_KEEP_SIZE, offset, len)`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: fallocate takes plain integers; the fd is owned by `file` and stays open.
    let rc =
        unsafe { libc::fallocate(file.as_raw_fd(), mode | libc::FALLOC_FL_KEEP_SIZE, off, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Flushes the whole filesystem holding `path` (one call instead of an fsync per file).
pub(crate) fn syncfs(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    // SAFETY: syncfs takes an fd owned by `dir`, open for the whole call.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`). Falls back to
/// link + unlink on file systems without `RENAME_NOREPLACE`, and, on those without hard
/// links either (many FUSE file systems, network shares), to a check then a plain rename.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    rename_noreplace_with(from, to, renameat2_noreplace, |f, t| {
        std::fs::hard_link(f, t)
    })
}

/// `renameat2(2)` through its system call: musl before 1.2.5 has no wrapper for it, and
/// the static musl build for devices must link.
///
/// # Safety
/// As `renameat2(2)`: `old` and `new` are valid NUL-terminated strings, the descriptors
/// are open directories or `AT_FDCWD`.
unsafe fn renameat2(
    olddirfd: libc::c_int,
    old: *const libc::c_char,
    newdirfd: libc::c_int,
    new: *const libc::c_char,
    flags: libc::c_uint,
) -> libc::c_int {
    libc::syscall(libc::SYS_renameat2, olddirfd, old, newdirfd, new, flags) as libc::c_int
}

/// `renameat2(from, to, RENAME_NOREPLACE)`.
fn renameat2_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
    };
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call;
    // AT_FDCWD makes relative paths relative to the working directory as usual.
    let rc = unsafe {
        renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    Err(io::Error::last_os_error())
}

/// [`rename_noreplace`] with its two primitives given, so the fallbacks can be tested.
fn rename_noreplace_with(
    from: &Path,
    to: &Path,
    rename2: impl Fn(&Path, &Path) -> io::Result<()>,
    link: impl Fn(&Path, &Path) -> io::Result<()>,
) -> io::Result<()> {
    match rename2(from, to) {
        Ok(()) => return Ok(()),
        // Flags unsupported by this file system (EINVAL) or kernel (ENOSYS).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {}
        Err(e) => return Err(e),
    }
    let exists = || match std::fs::symlink_metadata(to) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    };
    noreplace_fallback(
        || link(from, to),
        || std::fs::remove_file(from),
        exists,
        || std::fs::rename(from, to),
    )
}

/// What a rename without replacing does where `RENAME_NOREPLACE` is missing: hard-link
/// then unlink the old name; where hard links are missing too (EPERM, EOPNOTSUPP, ENOSYS,
/// or EROFS from a FUSE file system's defaults), check that the new name is free, then
/// rename. That last step is not atomic: a name appearing in between is replaced; the
/// names renamed this way are tessera's own, in a directory the caller chose.
fn noreplace_fallback(
    link: impl FnOnce() -> io::Result<()>,
    unlink_from: impl FnOnce() -> io::Result<()>,
    exists: impl FnOnce() -> io::Result<bool>,
    rename: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    match link() {
        Ok(()) => return unlink_from(),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
        // The rename below reports a real failure itself.
        Err(_) => {}
    }
    if exists()? {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "destination exists",
        ));
    }
    rename()
}

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`: opens `name` relative to the directory
/// open as `dir`. With `O_NOFOLLOW` a symbolic link at `name` is refused (`ELOOP`).
pub(crate) fn open_at(dir: &File, name: &OsStr, flags: libc::c_int, mode: u32) -> io::Result<File> {
    let name = c_name(name)?;
    // SAFETY: `name` is a valid NUL-terminated string outliving the call; the dir fd is
    // owned by `dir` and open for the whole call. On success the returned fd is new and
    // owned by nobody else, so `File` may take it.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `mkdirat(dir, name, mode)`.
pub(crate) fn mkdir_at(dir: &File, name: &OsStr, mode: u32) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: valid NUL-terminated string; the dir fd is owned by `dir` and open.
    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renames `from` to `to`, both relative to the directory open as `dir`. With `replace`
/// an existing `to` is replaced atomically (a symbolic link there is replaced, never
/// followed); without it an existing `to` gives `AlreadyExists` (falling back to link +
/// unlink on filesystems without `RENAME_NOREPLACE`).
pub(crate) fn rename_at(dir: &File, from: &OsStr, to: &OsStr, replace: bool) -> io::Result<()> {
    rename_between(dir, from, dir, to, replace)
}

/// [`rename_at`] from `from` in the directory open as `from_dir` to `to` in the one open
/// as `to_dir` (on the same file system).
pub(crate) fn rename_between(
    from_dir: &File,
    from: &OsStr,
    to_dir: &File,
    to: &OsStr,
    replace: bool,
) -> io::Result<()> {
    let (f, t) = (c_name(from)?, c_name(to)?);
    let flags = if replace { 0 } else { libc::RENAME_NOREPLACE };
    // SAFETY: both pointers are valid NUL-terminated strings outliving the call; the dir
    // fds are owned by `from_dir` and `to_dir` and open for the whole call.
    let rc = unsafe {
        renameat2(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !replace && matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        let link = || {
            // SAFETY: as above; linkat with flags 0 does not follow a symlink at `from`.
            let rc = unsafe {
                libc::linkat(
                    from_dir.as_raw_fd(),
                    f.as_ptr(),
                    to_dir.as_raw_fd(),
                    t.as_ptr(),
                    0,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let exists = || {
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: `t` is a valid NUL-terminated string, `st` is writable stat
            // storage, the dir fd is open; AT_SYMLINK_NOFOLLOW inspects a link itself.
            let rc = unsafe {
                libc::fstatat(
                    to_dir.as_raw_fd(),
                    t.as_ptr(),
                    st.as_mut_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if rc == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::NotFound => Ok(false),
                _ => Err(err),
            }
        };
        let rename = || {
            // SAFETY: as for renameat2 above.
            let rc = unsafe {
                libc::renameat(
                    from_dir.as_raw_fd(),
                    f.as_ptr(),
                    to_dir.as_raw_fd(),
                    t.as_ptr(),
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        return noreplace_fallback(link, || unlink_at(from_dir, from), exists, rename);
    }
    Err(err)
}

/// Starts writing back `len` bytes of `file` at `offset` without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a later `fsync` has less left to wait for.
/// Durability still needs the `fsync`.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: sync_file_range takes plain integers; the fd is owned by `file` and open.
    let rc =
        unsafe { libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `unlinkat(dir, name, 0)`: removes a file (never a directory) relative to `dir`.
pub(crate) fn unlink_at(dir: &File, name: &OsStr) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: valid NUL-terminated string; the dir fd is owned by `dir` and open.
    let rc = unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `buf` from the kernel's random source (`getrandom(2)`), for unpredictable
/// temporary names.
pub(crate) fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe the live, writable slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

/// Makes glibc's allocator keep one arena for all threads (`M_ARENA_MAX` 1); nothing
/// elsewhere (musl has no arenas).
pub(crate) fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes a setting of the allocator; M_ARENA_MAX limits the
    // arenas created from then on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file system with neither `RENAME_NOREPLACE` nor hard links (a FUSE file system
    /// answering EINVAL and EROFS, as fusepy's defaults do) still gets the rename, and
    /// still never replaces an existing name.
    #[test]
    fn rename_noreplace_works_without_flags_or_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        std::fs::write(&from, b"new").unwrap();
        let no_flags = |_: &Path, _: &Path| Err(io::Error::from_raw_os_error(libc::EINVAL));
        let no_links = |_: &Path, _: &Path| Err(io::Error::from_raw_os_error(libc::EROFS));
        rename_noreplace_with(&from, &to, no_flags, no_links).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"new");
        assert!(!from.exists());

        std::fs::write(&from, b"newer").unwrap();
        let e = rename_noreplace_with(&from, &to, no_flags, no_links).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(
            std::fs::read(&to).unwrap(),
            b"new",
            "an existing name was replaced"
        );
        // A dangling link is a name too.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        let e = rename_noreplace_with(&from, &link, no_flags, no_links).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert!(!dir.path().join("nowhere").exists());
    }
}
