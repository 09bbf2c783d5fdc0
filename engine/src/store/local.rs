//! A store in a local directory: packs and location files read with positioned reads.
//!
//! # Writing safely
//! Files are written relative to open directory handles: each directory below the store's
//! root (`packs`, `packs/xx`, `locations`) is opened with `O_NOFOLLOW | O_DIRECTORY`, so a
//! symbolic link planted in place of one is refused with an error instead of being
//! written through (the store's own root, named by the user, may be a link). Each file is
//! written to a new temporary file (random `.`-prefixed name, `O_EXCL | O_NOFOLLOW`), then
//! renamed into place: a planted file or link is never opened for writing, and readers
//! see no partial file. Readers and [`StoreRead::list_packs`] ignore `.`-prefixed names.
//!
//! A pack already present under its id is kept when it holds exactly the new bytes, and
//! replaced atomically otherwise (a damaged pack is repaired by the next `make` that
//! writes the same pack).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{pack_id_from_path, pack_path, PackId, StoreRead, StoreWrite};
use crate::chunk::frame_holds;
use crate::error::{Error, Result};
use crate::fsutil::create_temp_in;

/// Packs and location files below a directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

/// Opening a directory handle that must not be a link.
const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;

impl LocalStore {
    /// Opens a store, creating its directory when `create` is set.
    ///
    /// # Errors
    /// [`Error::Io`] if the directory cannot be created or is not a directory.
    pub fn open(root: impl Into<PathBuf>, create: bool) -> Result<LocalStore> {
        let root = root.into();
        if create {
            fs::create_dir_all(&root).map_err(|e| Error::io("creating store", &root, e))?;
        }
        let meta = fs::metadata(&root).map_err(|e| Error::io("opening store", &root, e))?;
        if !meta.is_dir() {
            return Err(Error::io(
                "opening store",
                &root,
                io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
            ));
        }
        Ok(LocalStore { root })
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute path of store-relative file `rel`.
    pub fn path_of(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Opens (creating it when `create`) the directory `rel_dir` below the root, one
    /// component at a time, never following a link; `None` if it does not exist and
    /// `create` is off.
    fn dir(&self, rel_dir: &str, create: bool) -> Result<Option<File>> {
        let mut dir =
            File::open(&self.root).map_err(|e| Error::io("opening store", &self.root, e))?;
        let mut path = self.root.clone();
        for part in rel_dir.split('/') {
            let name = OsStr::new(part);
            path.push(part);
            if create {
                match crate::sys::mkdir_at(&dir, name, 0o777) {
                    // A new directory is durable in its parent before anything goes in it
                    // (a file system may lose an unsynced directory entry at a power cut).
                    Ok(()) => dir
                        .sync_all()
                        .map_err(|e| Error::io("syncing store directory", &path, e))?,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::io("creating store directory", path, e)),
                }
            }
            dir = match crate::sys::open_at(&dir, name, DIR_FLAGS, 0) {
                Ok(d) => d,
                Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(dir_error(&path, e)),
            };
        }
        Ok(Some(dir))
    }

    /// Writes `bytes` as store-relative `rel` through a new temporary file and a rename
    /// (replacing an existing file when `replace`); false when the file existed and
    /// `replace` is off.
    fn write(&self, rel: &str, bytes: &[u8], replace: bool) -> Result<bool> {
        let path = self.path_of(rel);
        let (rel_dir, name) = rel.rsplit_once('/').ok_or_else(|| {
            Error::InvalidInput(format!("store file name {rel} has no directory"))
        })?;
        let dir = self.dir(rel_dir, true)?.ok_or_else(|| {
            Error::io(
                "opening store directory",
                &path,
                io::ErrorKind::NotFound.into(),
            )
        })?;
        let name = OsStr::new(name);
        let (tmp, mut f) =
            create_temp_in(&dir, name).map_err(|e| Error::io("creating", &path, e))?;
        let written = (|| {
            f.write_all(bytes)?;
            // Packs and location files are few and large: each is made durable under its
            // name here, on every file system (`syncfs` in `flush` does not reach a FUSE
            // file system's own storage): data, then the rename, then the directory.
            f.sync_all()?;
            crate::sys::rename_at(&dir, &tmp, name, replace)?;
            dir.sync_all()
        })();
        match written {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = crate::sys::unlink_at(&dir, &tmp);
                if e.kind() == io::ErrorKind::AlreadyExists && !replace {
                    Ok(false)
                } else {
                    Err(Error::io("writing", &path, e))
                }
            }
        }
    }

    /// Opens store-relative `rel` for reading (`None` if absent); a link, a FIFO or
    /// another non-regular file is refused with [`Error::CorruptStore`] (so `make` treats
    /// it as a damaged pack and writes the pack again, replacing the link).
    fn open_file(&self, rel: &str) -> Result<Option<(File, u64)>> {
        let path = self.path_of(rel);
        let (rel_dir, name) = rel.rsplit_once('/').ok_or_else(|| {
            Error::InvalidInput(format!("store file name {rel} has no directory"))
        })?;
        let Some(dir) = self.dir(rel_dir, false)? else {
            return Ok(None);
        };
        // O_NONBLOCK: a FIFO planted there must not block the open.
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let not_a_file = |what: &str| Error::CorruptStore {
            origin: path.display().to_string(),
            reason: format!("{what}, not a store file (tessera does not follow it)"),
        };
        let file = match crate::sys::open_at(&dir, OsStr::new(name), flags, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(not_a_file("a symbolic link"))
            }
            Err(e) => return Err(Error::io("opening", path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("inspecting", &path, e))?;
        if !meta.is_file() {
            return Err(not_a_file("not a regular file"));
        }
        Ok(Some((file, meta.len())))
    }
}

/// The error for a store directory that could not be opened as a handle.
fn dir_error(path: &Path, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => Error::InvalidInput(format!(
            "store directory {} is a symbolic link or not a directory; tessera does not \
             read or write store files through links (make it a real directory)",
            path.display()
        )),
        _ => Error::io("opening store directory", path, e),
    }
}

impl StoreRead for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(rel);
        let Some((file, len)) = self.open_file(rel)? else {
            return Ok(None);
        };
        if len > limit {
            return Err(Error::io(
                "reading",
                path,
                io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!("{len} bytes, more than the {limit} allowed"),
                ),
            ));
        }
        let mut buf = Vec::with_capacity(len as usize + 1);
        file.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("reading", &path, e))?;
        if buf.len() as u64 > limit {
            return Err(Error::io(
                "reading",
                path,
                io::Error::new(io::ErrorKind::FileTooLarge, "grew past its limit"),
            ));
        }
        Ok(Some(buf))
    }

    fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let path = self.path_of(rel);
        let Some((file, size)) = self.open_file(rel)? else {
            return Err(Error::MissingFile {
                origin: path.display().to_string(),
            });
        };
        let end = offset.checked_add(len).filter(|&e| e <= size);
        if end.is_none() {
            return Err(Error::io(
                "reading",
                path,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{len} bytes at offset {offset} wanted, the file has {size}"),
                ),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).map_err(|e| {
            Error::io(
                "reading",
                &path,
                io::Error::new(e.kind(), format!("{len} bytes at offset {offset}: {e}")),
            )
        })?;
        Ok(buf)
    }

    fn file_size(&self, rel: &str) -> Result<Option<u64>> {
        Ok(self.open_file(rel)?.map(|(_, len)| len))
    }

    fn list_packs(&self) -> Result<Vec<PackId>> {
        let Some(packs) = self.dir("packs", false)? else {
            return Ok(Vec::new());
        };
        drop(packs);
        let dir = self.root.join("packs");
        let mut out = Vec::new();
        let entries = fs::read_dir(&dir).map_err(|e| Error::io("listing", &dir, e))?;
        for fan in entries {
            let fan = fan.map_err(|e| Error::io("listing", &dir, e))?;
            let Some(fan_name) = fan.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if fan_name.len() != 2 || fan_name.starts_with('.') {
                continue;
            }
            let Some(fan_dir) = self.dir(&format!("packs/{fan_name}"), false)? else {
                continue;
            };
            drop(fan_dir);
            let fan_path = fan.path();
            let files = fs::read_dir(&fan_path).map_err(|e| Error::io("listing", &fan_path, e))?;
            for f in files {
                let f = f.map_err(|e| Error::io("listing", &fan_path, e))?;
                if let Some(name) = f.file_name().to_str() {
                    if let Some(id) = pack_id_from_path(&format!("packs/{fan_name}/{name}")) {
                        out.push(id);
                    }
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn holds_chunk(&self, id: &PackId, offset: u64, clen: u32, data: &[u8]) -> Result<bool> {
        let rel = pack_path(id);
        let Some((file, size)) = self.open_file(&rel)? else {
            return Ok(false);
        };
        if offset
            .checked_add(u64::from(clen))
            .is_none_or(|end| end > size)
        {
            return Ok(false);
        }
        let mut buf = vec![0u8; clen as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| Error::io("reading", self.path_of(&rel), e))?;
        Ok(frame_holds(&buf, data).is_ok())
    }
}

impl StoreWrite for LocalStore {
    fn put_pack(&self, id: &PackId, bytes: &[u8]) -> Result<()> {
        let rel = pack_path(id);
        if self.write(&rel, bytes, false)? {
            return Ok(());
        }
        // A pack of that name exists: keep it if it is these bytes, else replace it.
        let same = match self.open_file(&rel) {
            Ok(Some((file, len))) if len == bytes.len() as u64 => {
                let mut have = vec![0u8; bytes.len()];
                file.read_exact_at(&mut have, 0).is_ok() && have == bytes
            }
            _ => false,
        };
        if !same {
            self.write(&rel, bytes, true)?;
        }
        Ok(())
    }

    fn put_file(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        self.write(rel, bytes, true).map(|_| ())
    }

    fn flush(&self) -> Result<()> {
        crate::sys::syncfs(&self.root).map_err(|e| Error::io("syncing store", &self.root, e))
    }

    fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path_of(rel);
        let (rel_dir, name) = rel.rsplit_once('/').ok_or_else(|| {
            Error::InvalidInput(format!("store file name {rel} has no directory"))
        })?;
        let Some(dir) = self.dir(rel_dir, false)? else {
            return Ok(());
        };
        match crate::sys::unlink_at(&dir, OsStr::new(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("deleting", path, e)),
        }
    }

    fn list_files(&self, dir: &str) -> Result<Vec<String>> {
        // Opening the handle first refuses a link planted in place of the directory.
        if self.dir(dir, false)?.is_none() {
            return Ok(Vec::new());
        }
        let path = self.path_of(dir);
        let mut out = Vec::new();
        for f in fs::read_dir(&path).map_err(|e| Error::io("listing", &path, e))? {
            let f = f.map_err(|e| Error::io("listing", &path, e))?;
            let is_file = f.file_type().is_ok_and(|t| t.is_file());
            if let Some(name) = f.file_name().to_str() {
                if is_file && !name.starts_with('.') {
                    out.push(format!("{dir}/{name}"));
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::locations_path;

    #[test]
    fn files_round_trip_and_ranges_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        assert!(store.list_packs().unwrap().is_empty());
        let bytes: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let id = PackId::of(&bytes);
        store.put_pack(&id, &bytes).unwrap();
        store.put_pack(&id, &bytes).unwrap();
        assert_eq!(store.list_packs().unwrap(), vec![id]);
        let rel = pack_path(&id);
        assert_eq!(store.file_size(&rel).unwrap(), Some(10_000));
        assert_eq!(store.read_range(&rel, 100, 50).unwrap(), &bytes[100..150]);
        assert_eq!(store.read_range(&rel, 9_990, 10).unwrap(), &bytes[9_990..]);
        for (off, len) in [(9_991, 10), (u64::MAX, 2), (0, 10_001)] {
            let err = store.read_range(&rel, off, len).unwrap_err();
            assert!(err.to_string().contains(&rel), "{err}");
        }
        let missing = pack_path(&PackId([0; 32]));
        let err = store.read_range(&missing, 0, 1).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
        assert_eq!(store.file_size(&missing).unwrap(), None);
        let loc = locations_path(&[1; 32]);
        assert_eq!(store.read_file(&loc, 100).unwrap(), None);
        store.put_file(&loc, b"one").unwrap();
        store.put_file(&loc, b"two!").unwrap();
        assert_eq!(store.read_file(&loc, 100).unwrap().unwrap(), b"two!");
        assert!(store.read_file(&loc, 3).is_err(), "past its limit");
        // Temporary and foreign files are not packs.
        let fan = store.path_of(&rel);
        let fan = fan.parent().unwrap();
        fs::write(fan.join(format!(".{id}.tpack.tmp.0123456789abcdef")), b"x").unwrap();
        fs::write(fan.join("README"), b"x").unwrap();
        assert_eq!(store.list_packs().unwrap(), vec![id]);
    }

    #[test]
    fn a_damaged_pack_is_replaced_by_the_same_pack_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let bytes = vec![5u8; 4096];
        let id = PackId::of(&bytes);
        store.put_pack(&id, &bytes).unwrap();
        let path = store.path_of(&pack_path(&id));
        fs::write(&path, &bytes[..100]).unwrap();
        store.put_pack(&id, &bytes).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
        let mut flipped = bytes.clone();
        flipped[7] ^= 1;
        fs::write(&path, &flipped).unwrap();
        store.put_pack(&id, &bytes).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn planted_links_at_temporary_names_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let bytes = vec![3u8; 2000];
        let id = PackId::of(&bytes);
        let path = store.path_of(&pack_path(&id));
        let fan = path.parent().unwrap();
        fs::create_dir_all(fan).unwrap();
        // Every name a predictable `.NAME.tmp.PID.N` scheme could pick soon.
        for n in 0..4096 {
            let planted = fan.join(format!(".{id}.tpack.tmp.{}.{n}", std::process::id()));
            std::os::unix::fs::symlink(&victim, planted).unwrap();
        }
        store.put_pack(&id, &bytes).unwrap();
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"precious",
            "the victim was written"
        );
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn store_directories_that_are_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let bytes = vec![9u8; 100];
        let id = PackId::of(&bytes);
        let fan = store.path_of(&pack_path(&id));
        let fan = fan.parent().unwrap();
        fs::create_dir_all(fan.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, fan).unwrap();
        let err = store.put_pack(&id, &bytes).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        std::os::unix::fs::symlink(&elsewhere, store.path_of("locations")).unwrap();
        let err = store.put_file(&locations_path(&[0; 32]), b"x").unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn holds_chunk_checks_the_frame() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let data = vec![4u8; 3000];
        let frame = crate::chunk::compress(&data);
        let mut bytes = vec![0u8; 10];
        bytes.extend_from_slice(&frame);
        let id = PackId::of(&bytes);
        store.put_pack(&id, &bytes).unwrap();
        let clen = frame.len() as u32;
        assert!(store.holds_chunk(&id, 10, clen, &data).unwrap());
        assert!(!store.holds_chunk(&id, 9, clen, &data).unwrap());
        assert!(!store.holds_chunk(&id, 10, clen + 1, &data).unwrap());
        assert!(!store.holds_chunk(&id, u64::MAX, clen, &data).unwrap());
        assert!(!store.holds_chunk(&id, 10, clen, &data[1..]).unwrap());
        assert!(!store
            .holds_chunk(&PackId([0; 32]), 10, clen, &data)
            .unwrap());
    }
}
