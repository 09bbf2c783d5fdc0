//! Creating and removing the server's Unix socket safely.
//!
//! The socket gets the mode asked for from the start (it is bound in a private
//! directory, given its mode there, then hard-linked into place), and nothing already at
//! the path is followed or replaced: a symlink, a regular file or a directory is refused;
//! a socket is replaced only when no server answers on it (left by a crash).

use std::io::{Error, ErrorKind, Result};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Binds a Unix socket at `path` with permissions `mode` (e.g. `0o600`: only this user
/// may connect). Returns the listener and the socket's inode number (for
/// [`remove_unix_socket`]). Must be called inside a tokio runtime.
///
/// # Errors
/// When `path` exists and is not a socket (a planted symlink or file is never followed
/// or replaced), when another server answers on it, or when binding fails; each error
/// names the path.
pub fn bind_unix(path: &Path, mode: u32) -> Result<(tokio::net::UnixListener, u64)> {
    let named =
        |e: Error, what: &str| Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::new(
                    ErrorKind::AddrInUse,
                    format!("another server is listening on {}", path.display()),
                ));
            }
            // A stale socket of a server that did not stop cleanly.
            std::fs::remove_file(path).map_err(|e| named(e, "removing stale socket"))?;
        }
        Ok(m) => {
            let kind = if m.file_type().is_symlink() {
                "a symlink"
            } else if m.is_dir() {
                "a directory"
            } else {
                "a file that is not a socket"
            };
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is {kind}; refusing to replace it",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(named(e, "checking")),
    }
    let dir = private_dir(path).map_err(|e| named(e, "creating a private directory next to"))?;
    let tmp = dir.join("socket");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o777))?;
        let ino = std::fs::symlink_metadata(&tmp)?.ino();
        // link(2) never replaces what may have appeared at `path` meanwhile.
        std::fs::hard_link(&tmp, path)?;
        listener.set_nonblocking(true)?;
        Ok::<_, Error>((listener, ino))
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    let (listener, ino) = bound.map_err(|e| named(e, "creating the socket"))?;
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|e| named(e, "listening on"))?;
    Ok((listener, ino))
}

/// A new directory only this user can enter, next to `path`.
fn private_dir(path: &Path) -> Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let dir = parent.join(format!(
            ".nbd-socket-{}-{nanos:x}-{attempt}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::new(
        ErrorKind::AlreadyExists,
        "no free name for a temporary directory",
    ))
}

/// Removes the socket at `path` if it is still the one created by [`bind_unix`] (inode
/// `ino`, when given); anything else found there is left alone.
///
/// # Errors
/// When the socket cannot be removed.
pub fn remove_unix_socket(path: &Path, ino: Option<u64>) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && ino.is_none_or(|i| i == m.ino()) => {
            std::fs::remove_file(path)
                .map_err(|e| Error::new(e.kind(), format!("removing {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}
