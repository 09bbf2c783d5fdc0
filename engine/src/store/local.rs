//! A chunk store in a local directory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{chunk_path, ChunkStore};
use crate::error::{Error, Result};
use crate::fsutil::temp_path_for;
use crate::ChunkId;

/// Chunk files below a directory. Writes are atomic (temporary file + rename) and never
/// replace an existing chunk file.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// Fan-out directories known to exist (by first id byte): creating a directory costs
    /// as much as a chunk file on ext4, so each is created at most once per process.
    made_dirs: Arc<Mutex<[bool; 256]>>,
}

/// Chunk files larger than this are refused before reading: no valid chunk compresses
/// to more than its 16 MiB maximum plus zstd's small overhead.
const MAX_CHUNK_FILE: u64 = 17 * 1024 * 1024;

impl LocalStore {
    /// Opens a store, creating its directory when `create` is set.
    ///
    /// # Errors
    /// [`Error::Io`] if the directory cannot be created or is not a directory.
    pub fn open(root: impl Into<PathBuf>, create: bool) -> Result<LocalStore> {
        let root = root.into();
        if create {
            fs::create_dir_all(root.join("chunks"))
                .map_err(|e| Error::io("creating store", &root, e))?;
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
        Ok(LocalStore {
            root,
            made_dirs: Arc::new(Mutex::new([false; 256])),
        })
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Absolute path of a chunk's file.
    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        self.root.join(chunk_path(id))
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

    fn put_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<bool> {
        let path = self.path_of(id);
        let dir = path.parent().expect("chunk paths have a parent");
        let fan = usize::from(id.as_bytes()[0]);
        if !self.made_dirs.lock().expect("dir cache")[fan] {
            fs::create_dir_all(dir).map_err(|e| Error::io("creating store directory", dir, e))?;
            self.made_dirs.lock().expect("dir cache")[fan] = true;
        }
        let tmp = temp_path_for(&path);
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(compressed)?;
            // Start writeback now so `flush` overlaps with chunking instead of paying for
            // the whole store at the end; a hint only, so its error is ignored.
            let _ = crate::sys::start_writeback(&f);
            // No fsync per chunk: `flush` syncs the whole filesystem once before the
            // index is published. The rename never replaces an existing chunk file.
            crate::sys::rename_noreplace(&tmp, &path)
        })();
        match written {
            Ok(()) => Ok(true),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(false)
                } else {
                    Err(Error::io("writing chunk file", &path, e))
                }
            }
        }
    }

    fn flush(&self) -> Result<()> {
        crate::sys::syncfs(&self.root).map_err(|e| Error::io("syncing store", &self.root, e))
    }
}
