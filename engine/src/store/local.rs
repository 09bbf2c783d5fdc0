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
//! `make` streams each pack to a temporary file in `packs/` and renames it into its
//! fan-out directory once it is complete and synced. A pack already present under its id
//! is kept when it is intact (its bytes hash to its id), and replaced atomically otherwise
//! (a damaged pack is repaired by the next `make` that writes the same pack).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{pack_id_from_path, pack_path, PackId, StoreRead, StoreWrite};
use crate::chunk::frame_holds;
use crate::error::{Error, Result};
use crate::fsutil::create_temp_in;
use crate::pack::PackSink;

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

/// Bytes a [`LocalPack`] collects before writing them to its file.
const PACK_BUFFER: usize = 1 << 20;
/// Bytes a [`LocalPack`] writes before asking the kernel to start writing them back.
const WRITEBACK_STEP: u64 = 8 << 20;

/// A pack streamed to a temporary file `packs/.pack.tmp.RANDOM`, renamed to its place
/// `packs/XX/ID.tpack` at commit (after an fsync; the directory is synced after the
/// rename). Writeback starts every [`WRITEBACK_STEP`] bytes, so the disk works while
/// `make` chunks and the final fsync has little left to wait for. Dropped before commit,
/// the temporary file is removed.
struct LocalPack<'a> {
    store: &'a LocalStore,
    /// The `packs` directory, holding the temporary file.
    packs: File,
    /// The temporary file's name; `None` once it was renamed or removed.
    tmp: Option<std::ffi::OsString>,
    file: File,
    buf: Vec<u8>,
    /// Bytes in the file (not counting `buf`).
    written: u64,
    /// Bytes whose writeback was started.
    kicked: u64,
}

impl LocalPack<'_> {
    fn tmp_path(&self) -> PathBuf {
        let name = self.tmp.as_deref().unwrap_or(OsStr::new(".pack.tmp"));
        self.store.path_of("packs").join(name)
    }

    fn drain(&mut self) -> Result<()> {
        self.file
            .write_all(&self.buf)
            .map_err(|e| Error::io("writing", self.tmp_path(), e))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        if self.written - self.kicked >= WRITEBACK_STEP {
            // Only a hint: a file system without it still gets the fsync at commit.
            let _ =
                crate::sys::start_writeback(&self.file, self.kicked, self.written - self.kicked);
            self.kicked = self.written;
        }
        Ok(())
    }

    /// Whether the file at `rel` is intact pack `id` (a pack is named by its BLAKE3).
    fn holds_pack(&self, rel: &str, id: &PackId) -> bool {
        let Ok(Some((mut file, _))) = self.store.open_file(rel) else {
            return false;
        };
        let mut hasher = blake3::Hasher::new();
        io::copy(&mut file, &mut hasher).is_ok() && PackId(*hasher.finalize().as_bytes()) == *id
    }
}

impl PackSink for LocalPack<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= PACK_BUFFER {
            self.drain()?;
        }
        Ok(())
    }

    fn commit(&mut self, id: &PackId) -> Result<()> {
        self.drain()?;
        let tmp_path = self.tmp_path();
        let Some(tmp) = self.tmp.clone() else {
            return Err(Error::InvalidInput(format!(
                "pack {} committed twice",
                tmp_path.display()
            )));
        };
        self.file
            .sync_all()
            .map_err(|e| Error::io("syncing", &tmp_path, e))?;
        let rel = pack_path(id);
        let path = self.store.path_of(&rel);
        let (rel_dir, name) = rel.rsplit_once('/').expect("pack paths have a directory");
        let fan = self.store.dir(rel_dir, true)?.ok_or_else(|| {
            Error::io(
                "opening store directory",
                &path,
                io::ErrorKind::NotFound.into(),
            )
        })?;
        let name = OsStr::new(name);
        let renamed = match crate::sys::rename_between(&self.packs, &tmp, &fan, name, false) {
            // A pack of that name exists: keep it if intact, else replace it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if self.holds_pack(&rel, id) {
                    crate::sys::unlink_at(&self.packs, &tmp)
                } else {
                    crate::sys::rename_between(&self.packs, &tmp, &fan, name, true)
                }
            }
            other => other,
        };
        renamed.map_err(|e| Error::io("storing pack", &path, e))?;
        self.tmp = None;
        fan.sync_all()
            .map_err(|e| Error::io("syncing store directory", &path, e))
    }
}

impl Drop for LocalPack<'_> {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = crate::sys::unlink_at(&self.packs, &tmp);
        }
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
    fn begin_pack(&self) -> Result<Box<dyn PackSink + '_>> {
        let packs = self.dir("packs", true)?.ok_or_else(|| {
            Error::io(
                "opening store directory",
                self.path_of("packs"),
                io::ErrorKind::NotFound.into(),
            )
        })?;
        // Packs a killed `make` left half written (untouched for an hour) go first.
        crate::fsutil::remove_stale_temps(&self.path_of("packs/pack"));
        let (tmp, file) = create_temp_in(&packs, OsStr::new("pack"))
            .map_err(|e| Error::io("creating a pack in", self.path_of("packs"), e))?;
        Ok(Box::new(LocalPack {
            store: self,
            packs,
            tmp: Some(tmp),
            file,
            buf: Vec::with_capacity(PACK_BUFFER),
            written: 0,
            kicked: 0,
        }))
    }

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

    /// Frames of a few chunks, as `make` would push them.
    fn frames() -> Vec<(crate::ChunkId, Vec<u8>, u32)> {
        (0..40u32)
            .map(|n| {
                let data = vec![n as u8; 30_000 + n as usize * 1000];
                let id = crate::ChunkId::of(&data);
                (id, crate::chunk::compress(&data), data.len() as u32)
            })
            .collect()
    }

    fn stream(sink: Box<dyn PackSink + '_>) -> PackId {
        let mut pack = crate::pack::PackStream::new(sink);
        for (id, frame, len) in frames() {
            pack.push(id, &frame, len).unwrap();
        }
        pack.finish().unwrap()
    }

    /// Entries of `packs/` that are not fan-out directories: temporary files left over.
    fn leftovers(store: &LocalStore) -> Vec<String> {
        fs::read_dir(store.path_of("packs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() != 2)
            .collect()
    }

    #[test]
    fn a_streamed_pack_is_the_pack_built_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let mut built = crate::pack::PackBuilder::new();
        for (id, frame, len) in frames() {
            built.push(id, &frame, len);
        }
        let built = built.finish();
        // Streamed to a temporary file (more than one write buffer), then renamed.
        let id = stream(store.begin_pack().unwrap());
        assert_eq!(id, built.id);
        assert_eq!(
            fs::read(store.path_of(&pack_path(&id))).unwrap(),
            built.bytes
        );
        assert_eq!(store.list_packs().unwrap(), vec![id]);
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
        // The default (buffered, then `put_pack`), as remote stores use it.
        let other = LocalStore::open(dir.path().join("o"), true).unwrap();
        let sink = Box::new(crate::store::BufferedPack {
            store: &other,
            bytes: Vec::new(),
        });
        assert_eq!(stream(sink), built.id);
        assert_eq!(
            fs::read(other.path_of(&pack_path(&id))).unwrap(),
            built.bytes
        );
    }

    #[test]
    fn a_pack_dropped_before_its_commit_leaves_nothing_and_stale_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let mut pack = crate::pack::PackStream::new(store.begin_pack().unwrap());
        for (id, frame, len) in frames() {
            pack.push(id, &frame, len).unwrap();
        }
        assert_eq!(leftovers(&store).len(), 1, "the pack in the making");
        drop(pack);
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
        assert!(store.list_packs().unwrap().is_empty());
        // What a killed make left: removed by the next one once an hour old.
        let packs = store.path_of("packs");
        let old = fs::File::create(packs.join(".pack.tmp.0123456789abcdef")).unwrap();
        let hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        old.set_modified(hours_ago).unwrap();
        fs::write(packs.join(".pack.tmp.fedcba9876543210"), b"young").unwrap();
        let id = stream(store.begin_pack().unwrap());
        assert_eq!(leftovers(&store), vec![".pack.tmp.fedcba9876543210"]);
        assert_eq!(store.list_packs().unwrap(), vec![id]);
    }

    #[test]
    fn a_streamed_pack_keeps_an_intact_copy_and_replaces_a_damaged_one() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let id = stream(store.begin_pack().unwrap());
        let path = store.path_of(&pack_path(&id));
        let good = fs::read(&path).unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        assert_eq!(stream(store.begin_pack().unwrap()), id);
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode, "intact: kept");
        let mut flipped = good.clone();
        flipped[1000] ^= 1;
        fs::write(&path, &flipped).unwrap();
        assert_eq!(stream(store.begin_pack().unwrap()), id);
        assert_eq!(fs::read(&path).unwrap(), good, "damaged: replaced");
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
    }

    #[test]
    fn a_streamed_pack_never_writes_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let id = stream(store.begin_pack().unwrap());
        let fan = store.path_of(&pack_path(&id));
        let fan = fan.parent().unwrap();
        fs::remove_dir_all(fan).unwrap();
        std::os::unix::fs::symlink(&victim, fan).unwrap();
        let mut pack = crate::pack::PackStream::new(store.begin_pack().unwrap());
        for (id, frame, len) in frames() {
            pack.push(id, &frame, len).unwrap();
        }
        let err = pack.finish().unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(
            fs::read_dir(&victim).unwrap().count(),
            0,
            "written through the link"
        );
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
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
