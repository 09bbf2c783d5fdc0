//! A chunk store in a local directory.
//!
//! # Writing safely
//! Chunk files are written relative to open directory handles: the `chunks` directory
//! and each fan-out directory below it are opened with `O_NOFOLLOW | O_DIRECTORY`, so a
//! symbolic link planted in place of one is refused with an error instead of being
//! written through (the store's own root, named by the user, may be a link). Each chunk
//! is written to a new temporary file (random name, `O_EXCL | O_NOFOLLOW`), then renamed
//! into place: a planted file or link is never opened for writing.
//!
//! Before `make` skips a chunk because its file exists, [`ChunkStore::check_stored`]
//! reads the file and checks it completely (it must decompress to exactly the chunk's
//! bytes); an empty, truncated or foreign file, or a link, is replaced by an atomic
//! rename over it.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{chunk_path, ChunkStore, StoredChunk};
use crate::chunk::frame_holds;
use crate::error::{Error, Result};
use crate::fsutil::create_temp_in;
use crate::ChunkId;

/// Chunk files below a directory. Writes are atomic (temporary file + rename) and never
/// replace an existing chunk file, unless [`ChunkStore::check_stored`] found it damaged.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    dirs: Arc<Mutex<WriteDirs>>,
}

/// Directory handles for writing, opened on first use.
#[derive(Debug)]
struct WriteDirs {
    /// `ROOT/chunks`, opened without following a link.
    chunks: Option<Arc<File>>,
    /// Fan-out directories known to exist (by first id byte): creating a directory costs
    /// as much as a chunk file on ext4, so each is created at most once per process.
    made: [bool; 256],
}

/// Chunk files larger than this are refused before reading: no valid chunk compresses
/// to more than its 16 MiB maximum plus zstd's small overhead.
const MAX_CHUNK_FILE: u64 = 17 * 1024 * 1024;

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
        } else {
            let meta = fs::metadata(&root).map_err(|e| Error::io("opening store", &root, e))?;
            if !meta.is_dir() {
                return Err(Error::io(
                    "opening store",
                    &root,
                    io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
                ));
            }
        }
        let store = LocalStore {
            root,
            dirs: Arc::new(Mutex::new(WriteDirs {
                chunks: None,
                made: [false; 256],
            })),
        };
        if create {
            store.chunks_dir()?;
        }
        Ok(store)
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Absolute path of a chunk's file.
    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        self.root.join(chunk_path(id))
    }

    /// The `chunks` directory, created if missing, opened without following a link.
    fn chunks_dir(&self) -> Result<Arc<File>> {
        let mut dirs = self.dirs.lock().expect("store dirs");
        if let Some(d) = &dirs.chunks {
            return Ok(Arc::clone(d));
        }
        let root = File::open(&self.root).map_err(|e| Error::io("opening store", &self.root, e))?;
        let name = OsStr::new("chunks");
        let path = self.root.join(name);
        match crate::sys::mkdir_at(&root, name, 0o777) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("creating store directory", path, e)),
        }
        let dir =
            crate::sys::open_at(&root, name, DIR_FLAGS, 0).map_err(|e| dir_error(&path, e))?;
        let dir = Arc::new(dir);
        dirs.chunks = Some(Arc::clone(&dir));
        Ok(dir)
    }

    /// The fan-out directory of `id` (created when `create`), opened without following a
    /// link; `None` when it does not exist and `create` is off.
    fn fan_dir(&self, id: &ChunkId, create: bool) -> Result<Option<File>> {
        let chunks = self.chunks_dir()?;
        let hex = id.to_string();
        let name = OsStr::new(&hex[..2]);
        let path = self.root.join("chunks").join(name);
        let fan = usize::from(id.as_bytes()[0]);
        if create && !self.dirs.lock().expect("store dirs").made[fan] {
            match crate::sys::mkdir_at(&chunks, name, 0o777) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("creating store directory", path, e)),
            }
            self.dirs.lock().expect("store dirs").made[fan] = true;
        }
        match crate::sys::open_at(&chunks, name, DIR_FLAGS, 0) {
            Ok(d) => Ok(Some(d)),
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(dir_error(&path, e)),
        }
    }

    /// Writes `compressed` as the file of `id`: a new temporary file, then a rename that
    /// replaces an existing file only when `replace` is set. Returns false when the file
    /// existed (and `replace` is off).
    fn write_chunk(&self, id: &ChunkId, compressed: &[u8], replace: bool) -> Result<bool> {
        let path = self.path_of(id);
        // `fan_dir` with `create` gives a directory or an error; `None` cannot happen.
        let dir = self.fan_dir(id, true)?.ok_or_else(|| {
            Error::io(
                "opening store directory",
                &path,
                io::ErrorKind::NotFound.into(),
            )
        })?;
        let hex = id.to_string();
        let name = format!("{hex}.zst");
        let name = OsStr::new(&name);
        let (tmp, mut f) =
            create_temp_in(&dir, name).map_err(|e| Error::io("creating chunk file", &path, e))?;
        let written = (|| {
            f.write_all(compressed)?;
            // Start writeback now so `flush` overlaps with chunking instead of paying for
            // the whole store at the end; a hint only, so its error is ignored.
            let _ = crate::sys::start_writeback(&f);
            // No fsync per chunk: `flush` syncs the whole filesystem once before the
            // index is published.
            crate::sys::rename_at(&dir, &tmp, name, replace)
        })();
        match written {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = crate::sys::unlink_at(&dir, &tmp);
                if e.kind() == io::ErrorKind::AlreadyExists && !replace {
                    Ok(false)
                } else {
                    Err(Error::io("writing chunk file", &path, e))
                }
            }
        }
    }
}

/// The error for a store directory that could not be opened as a handle.
fn dir_error(path: &Path, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => Error::InvalidInput(format!(
            "store directory {} is a symbolic link or not a directory; tessera does not write \
             chunk files through links (make it a real directory)",
            path.display()
        )),
        _ => Error::io("opening store directory", path, e),
    }
}

impl ChunkStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn get_compressed(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("opening chunk file", path, e)),
        };
        // `Take` hides the file's size from `read_to_end`: reserve it, or the buffer grows
        // from 32 bytes by doubling (a dozen reads per chunk file).
        let len_hint = file
            .metadata()
            .map_or(0, |m| m.len().min(MAX_CHUNK_FILE + 1));
        let mut buf = Vec::with_capacity(len_hint as usize + 1);
        file.take(MAX_CHUNK_FILE + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("reading chunk file", &path, e))?;
        if buf.len() as u64 > MAX_CHUNK_FILE {
            return Err(Error::CorruptChunk {
                id: *id,
                origin: path.display().to_string(),
                reason: format!("chunk file is larger than {MAX_CHUNK_FILE} bytes"),
            });
        }
        Ok(Some(buf))
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        let path = self.path_of(id);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("checking chunk file", path, e)),
        }
    }

    fn check_stored(&self, id: &ChunkId, data: &[u8]) -> Result<StoredChunk> {
        let path = self.path_of(id);
        let Some(dir) = self.fan_dir(id, false)? else {
            return Ok(StoredChunk::Missing);
        };
        let name = format!("{id}.zst");
        // O_NONBLOCK: a FIFO planted there must not block the open (it is then refused
        // as not a regular file); it changes nothing for regular files.
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let file = match crate::sys::open_at(&dir, OsStr::new(&name), flags, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(StoredChunk::Missing),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Ok(StoredChunk::Damaged("a symbolic link".into()))
            }
            Err(e) => return Err(Error::io("opening chunk file", path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("inspecting chunk file", &path, e))?;
        if !meta.is_file() {
            return Ok(StoredChunk::Damaged("not a regular file".into()));
        }
        if meta.len() == 0 {
            return Ok(StoredChunk::Damaged("empty".into()));
        }
        if meta.len() > MAX_CHUNK_FILE {
            return Ok(StoredChunk::Damaged(format!(
                "{} bytes, more than any chunk file",
                meta.len()
            )));
        }
        let mut buf = vec![0u8; meta.len() as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| Error::io("reading chunk file", &path, e))?;
        match frame_holds(&buf, data) {
            Ok(()) => Ok(StoredChunk::Present),
            Err(reason) => Ok(StoredChunk::Damaged(reason)),
        }
    }

    fn put_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<bool> {
        self.write_chunk(id, compressed, false)
    }

    fn replace_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<()> {
        self.write_chunk(id, compressed, true).map(|_| ())
    }

    fn flush(&self) -> Result<()> {
        crate::sys::syncfs(&self.root).map_err(|e| Error::io("syncing store", &self.root, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::compress;

    fn stored(store: &LocalStore, data: &[u8]) -> (ChunkId, PathBuf) {
        let id = ChunkId::of(data);
        assert!(store.put_compressed(&id, &compress(data)).unwrap());
        (id, store.path_of(&id))
    }

    #[test]
    fn check_stored_reads_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let data = vec![7u8; 5000];
        let id = ChunkId::of(&data);
        assert_eq!(
            store.check_stored(&id, &data).unwrap(),
            StoredChunk::Missing
        );
        let (_, path) = stored(&store, &data);
        assert_eq!(
            store.check_stored(&id, &data).unwrap(),
            StoredChunk::Present
        );
        let good = fs::read(&path).unwrap();
        let damaged = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            store.check_stored(&id, &data).unwrap()
        };
        let other = compress(&[8u8; 5000]);
        for bad in [&b""[..], &good[..good.len() - 1], b"not zstd", &other[..]] {
            assert!(matches!(damaged(bad), StoredChunk::Damaged(_)), "{bad:?}");
        }
        // A FIFO must not block the check.
        fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success(), "mkfifo {}", path.display());
        assert_eq!(
            store.check_stored(&id, &data).unwrap(),
            StoredChunk::Damaged("not a regular file".into())
        );
        store.replace_compressed(&id, &good).unwrap();
        assert_eq!(
            store.check_stored(&id, &data).unwrap(),
            StoredChunk::Present
        );
        assert_eq!(fs::read(&path).unwrap(), good);
    }

    #[test]
    fn planted_links_at_temporary_names_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let data = vec![3u8; 2000];
        let id = ChunkId::of(&data);
        let path = store.path_of(&id);
        let fan = path.parent().unwrap();
        fs::create_dir_all(fan).unwrap();
        // Every name the old `.NAME.tmp.PID.N` scheme could pick soon in this process.
        for n in 0..4096 {
            let planted = fan.join(format!(".{id}.zst.tmp.{}.{n}", std::process::id()));
            std::os::unix::fs::symlink(&victim, planted).unwrap();
        }
        assert!(store.put_compressed(&id, &compress(&data)).unwrap());
        assert!(
            fs::read(&victim).unwrap() == b"precious",
            "the victim was written"
        );
        assert_eq!(
            store.check_stored(&id, &data).unwrap(),
            StoredChunk::Present
        );
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
    }

    #[test]
    fn writes_never_go_through_a_linked_fan_out_directory() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let store = LocalStore::open(dir.path().join("s"), true).unwrap();
        let data = vec![9u8; 100];
        let id = ChunkId::of(&data);
        let fan = store.path_of(&id).parent().unwrap().to_path_buf();
        std::os::unix::fs::symlink(&elsewhere, &fan).unwrap();
        let err = store.put_compressed(&id, &compress(&data)).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let err = store.check_stored(&id, &data).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }
}
