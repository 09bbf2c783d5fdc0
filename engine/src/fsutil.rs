//! Small filesystem helpers shared by stores and index writers.
//!
//! Every file tessera creates goes through a temporary file made here: its name ends in
//! 16 random hex digits (so it cannot be guessed in advance), and it is created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW`, so a file or symbolic link planted under that name
//! is never opened, followed or clobbered (the name is drawn again instead). The finished
//! file is then renamed into place, which replaces a name and never follows a link.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Names drawn before giving up on a directory where every name is taken (a planted
/// name is a 1-in-2^64 event per draw; several in a row means something is wrong).
const TEMP_ATTEMPTS: usize = 16;

/// Flags for a new temporary file: created now, never through a link.
const TEMP_FLAGS: libc::c_int = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;

static FALLBACK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// 64 random bits from the kernel; should `getrandom` ever fail, a hash of the time, the
/// process id and a counter (unique, if less unpredictable: creation is `O_EXCL` anyway).
fn random_u64() -> u64 {
    let mut random = [0u8; 8];
    if crate::sys::random_bytes(&mut random).is_err() {
        let mut h = blake3::Hasher::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        h.update(&now.as_nanos().to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(
            &FALLBACK_COUNTER
                .fetch_add(1, Ordering::Relaxed)
                .to_le_bytes(),
        );
        random.copy_from_slice(&h.finalize().as_bytes()[..8]);
    }
    u64::from_le_bytes(random)
}

/// A fresh temporary name for a file that will be renamed to `name`:
/// `.NAME.tmp.<16 random hex digits>`.
fn temp_name(name: &OsStr) -> OsString {
    let mut out = OsString::from(".");
    out.push(name);
    out.push(format!(".tmp.{:016x}", random_u64()));
    out
}

/// A fresh, unpredictable temporary path beside `path` (`.NAME.tmp.<16 random hex>`).
/// Prefer [`create_temp_beside`], which also creates the file safely; a caller of this
/// one must create the file with `O_CREAT | O_EXCL` (`create_new`) itself.
pub(crate) fn temp_path_for(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or(OsStr::new("tessera"));
    path.with_file_name(temp_name(name))
}

/// Tries fresh names until `create` makes one that did not exist.
fn with_fresh_name<T>(
    name: &OsStr,
    mut create: impl FnMut(&OsStr) -> io::Result<T>,
) -> io::Result<(OsString, T)> {
    for _ in 0..TEMP_ATTEMPTS {
        let tmp = temp_name(name);
        match create(&tmp) {
            Ok(t) => return Ok((tmp, t)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{TEMP_ATTEMPTS} random temporary names were all taken"),
    ))
}

/// Creates a new temporary file beside `path` (in the same directory, so it can be
/// renamed over `path`), never following or reusing an existing name. Returns its path.
pub(crate) fn create_temp_beside(path: &Path) -> io::Result<(PathBuf, File)> {
    create_temp_beside_mode(path, 0o666)
}

/// [`create_temp_beside`] with permission bits `mode` from the moment the file exists
/// (less the umask), so a private file is never readable by others, not even empty.
fn create_temp_beside_mode(path: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    let name = path.file_name().unwrap_or(OsStr::new("tessera"));
    let (tmp, file) = with_fresh_name(name, |tmp| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path.with_file_name(tmp))
    })?;
    Ok((path.with_file_name(tmp), file))
}

/// The directory holding `path`: its parent, or `.` for a bare name.
pub(crate) fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes the creations, renames and removals of names in the directory holding `path`
/// durable (`fsync` of the directory).
pub(crate) fn sync_dir_of(path: &Path) -> io::Result<()> {
    File::open(dir_of(path))?.sync_all()
}

/// Creates a new temporary file in the directory open as `dir`, for a file that will be
/// renamed to `name` there; returns its name (relative to `dir`).
pub(crate) fn create_temp_in(dir: &File, name: &OsStr) -> io::Result<(OsString, File)> {
    with_fresh_name(name, |tmp| crate::sys::open_at(dir, tmp, TEMP_FLAGS, 0o666))
}

/// Temporary files older than this are debris of a killed or cut process, not files in
/// the making.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes what a killed or cut run left beside `path`: regular files named exactly as
/// [`temp_path_for`] names them (`.NAME.tmp.` and 16 hex digits) and untouched for an
/// hour (younger ones may be another process's file in the making). Links and other
/// names are left alone; removing a name never follows a link. Best effort.
pub(crate) fn remove_stale_temps(path: &Path) {
    let Some(name) = path.file_name() else {
        return;
    };
    let prefix = format!(".{}.tmp.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir_of(path)) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        let ours = n
            .strip_prefix(&prefix)
            .is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()));
        // `DirEntry::metadata` does not follow a link.
        let stale = |m: fs::Metadata| {
            m.is_file()
                && m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TEMP)
        };
        if ours && e.metadata().is_ok_and(stale) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Refuses a user-named output `path` that is a symbolic link: tessera replaces output
/// files by renaming a new file over them, which would silently replace the link itself
/// rather than the file it names, so it asks for the real path instead. A missing path
/// is fine.
///
/// # Errors
/// [`Error::InvalidInput`] for a symbolic link, [`Error::Io`] if `path` cannot be
/// inspected.
pub(crate) fn refuse_symlink(path: &Path, what: &str) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::InvalidInput(format!(
            "{what} {} is a symbolic link; tessera does not write through links (name the \
             file it points to, or remove the link)",
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("inspecting", path, e)),
    }
}

/// Writes `bytes` to `path` atomically: a new temporary file beside it (created
/// `O_EXCL | O_NOFOLLOW` under a random name), fsync, rename, then fsync of the
/// directory (`.` for a bare name). Readers see the old file or the whole new one, and
/// once it returns the new file survives a power cut.
///
/// # Errors
/// [`Error::InvalidInput`] if `path` is a symbolic link (see the module documentation);
/// [`Error::Io`] naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, &Output::default())
}

/// How [`write_file`] places a file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    /// Permission bits: `0o600` for a secret (exactly, whatever the umask), else `0o666`
    /// less the umask.
    pub mode: u32,
    /// Replace an existing file; without it an existing name (a dangling link included)
    /// is an `AlreadyExists` error and nothing is written.
    pub replace: bool,
}

impl Default for Output {
    fn default() -> Output {
        Output {
            mode: 0o666,
            replace: true,
        }
    }
}

/// Writes `bytes` to `path` as [`write_atomic`] does, with the mode and replacement
/// rule of `how`. A file created private (`mode` without group or other bits) keeps
/// exactly `mode` whatever the umask, and is never readable by others at any point.
///
/// # Errors
/// As [`write_atomic`]; [`Error::Io`] of kind `AlreadyExists` when `path` exists and
/// `how.replace` is false.
pub(crate) fn write_file(path: &Path, bytes: &[u8], how: &Output) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    refuse_symlink(path, "output")?;
    remove_stale_temps(path);
    let (tmp, mut f) =
        create_temp_beside_mode(path, how.mode).map_err(|e| Error::io("writing", path, e))?;
    let result = (|| {
        if how.mode & 0o077 == 0 {
            f.set_permissions(fs::Permissions::from_mode(how.mode))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        if how.replace {
            fs::rename(&tmp, path)?;
        } else {
            crate::sys::rename_noreplace(&tmp, path)?;
        }
        sync_dir_of(path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("writing", path, e)
    })
}

/// True when `name` looks like one of the temporary names made here for `final_name`.
#[cfg(test)]
fn is_temp_for(name: &OsStr, final_name: &str) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let prefix = format!(".{final_name}.tmp.");
    name.as_bytes().starts_with(prefix.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn temp_names_are_random_and_hidden() {
        let a = temp_name(OsStr::new("x.tidx"));
        let b = temp_name(OsStr::new("x.tidx"));
        assert_ne!(a, b);
        assert!(is_temp_for(&a, "x.tidx"), "{a:?}");
        assert_eq!(a.len(), ".x.tidx.tmp.".len() + 16);
    }

    /// The old names were `.NAME.tmp.PID.N`: plant links at every one this process could
    /// use next, and links in general must never be followed.
    #[test]
    fn write_atomic_never_follows_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let out = dir.path().join("out.tidx");
        for n in 0..64 {
            let planted = dir
                .path()
                .join(format!(".out.tidx.tmp.{}.{n}", std::process::id()));
            symlink(&victim, planted).unwrap();
        }
        write_atomic(&out, b"index bytes").unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"index bytes");
        assert!(
            fs::read(&victim).unwrap() == b"precious",
            "the victim was written"
        );
        // No temporary file is left behind.
        let temps = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let e = e.as_ref().unwrap();
                is_temp_for(&e.file_name(), "out.tidx") && !e.file_type().unwrap().is_symlink()
            })
            .count();
        assert_eq!(temps, 0);
    }

    #[test]
    fn write_atomic_refuses_a_link_at_the_output_path() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let out = dir.path().join("out.tidx");
        symlink(&victim, &out).unwrap();
        let err = write_atomic(&out, b"index bytes").unwrap_err().to_string();
        assert!(
            err.contains("symbolic link") && err.contains("out.tidx"),
            "{err}"
        );
        assert!(
            fs::read(&victim).unwrap() == b"precious",
            "the victim was written"
        );
        assert!(fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
        // A regular file there is replaced.
        fs::remove_file(&out).unwrap();
        fs::write(&out, b"old").unwrap();
        write_atomic(&out, b"new").unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"new");
    }

    #[test]
    fn a_temp_name_taken_by_a_link_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let mut calls = 0;
        // The first name drawn is taken (as if planted); the next one is used.
        let (name, _) = with_fresh_name(OsStr::new("c.zst"), |tmp| {
            calls += 1;
            if calls == 1 {
                symlink(&victim, dir.path().join(tmp)).unwrap();
            }
            crate::sys::open_at(&d, tmp, TEMP_FLAGS, 0o666)
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert!(fs::symlink_metadata(dir.path().join(&name))
            .unwrap()
            .is_file());
        assert!(
            fs::read(&victim).unwrap() == b"precious",
            "the victim was written"
        );
    }

    /// What a cut run left (an old temporary file of the output's shape) is removed by
    /// the next write of that output; a young one (another process's, in the making), a
    /// link of that shape and other names are not, and the link's target is untouched.
    #[test]
    fn stale_temporary_files_of_an_output_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let out = p("out.tidx");
        let old = p(".out.tidx.tmp.00112233445566aa");
        let young = p(".out.tidx.tmp.00112233445566bb");
        let link = p(".out.tidx.tmp.00112233445566cc");
        let other = p(".out.tidx.tmp.notours");
        for f in [&old, &young, &other] {
            fs::write(f, b"half").unwrap();
        }
        fs::write(p("victim"), b"precious").unwrap();
        symlink(p("victim"), &link).unwrap();
        let hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(hours_ago)
            .unwrap();
        File::options()
            .write(true)
            .open(p("victim"))
            .unwrap()
            .set_modified(hours_ago)
            .unwrap();
        write_atomic(&out, b"index").unwrap();
        assert!(!old.exists(), "debris of a cut run is left");
        assert!(young.exists() && other.exists());
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(p("victim")).unwrap(), b"precious");
    }
}
