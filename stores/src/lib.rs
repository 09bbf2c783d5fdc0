//! Remote chunk stores for tessera: HTTP(S) servers and CDNs ([`HttpStore`]),
//! S3-compatible object stores ([`S3Store`]), and [`open_store`], which turns a store
//! spec (a path, a URL or `s3://bucket/prefix`) into a [`ChunkStore`], with an optional
//! local cache ([`tessera_engine::CacheStore`]) in front.
//!
//! The engine is synchronous, so these clients are too: requests are made by `ureq` on
//! blocking threads, one pool per store, no async runtime. Every store keeps
//! [`StoreOptions::jobs`] requests in flight for [`ChunkStore::fetch_ordered`] and for
//! uploads, reuses connections, and retries transient failures (see `transport`); chunk
//! bytes are verified against their id before anything sees them, and fetched again when
//! they do not match.
//!
//! ```no_run
//! use tessera_stores::{load_index, open_store, StoreOptions};
//!
//! # fn main() -> tessera_engine::Result<()> {
//! let opts = StoreOptions { cache: Some("/var/cache/tessera".into()), ..Default::default() };
//! let store = open_store("https://cdn.example.com/store", &opts)?;
//! let index = load_index("https://cdn.example.com/rootfs-2.0.tidx", &opts)?;
//! let wanted: Vec<_> = index.chunks().iter().filter(|c| !c.zero).copied().collect();
//! for fetched in store.fetch_ordered(wanted) {
//!     let chunk = fetched?.chunk; // verified: its bytes hash to its id
//!     # let _ = chunk;
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod http;
mod options;
mod pipeline;
mod s3;
mod transport;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use http::HttpStore;
pub use options::{S3Options, StoreOptions};
pub use s3::S3Store;
use tessera_engine::{CacheOptions, CacheStore, ChunkStore, Error, Index, LocalStore, Result};

/// What kind of place a spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecKind {
    /// A local path.
    Local,
    /// `http://` or `https://`.
    Http,
    /// `s3://`.
    S3,
}

/// Tells a local path from a URL.
pub fn spec_kind(spec: &str) -> SpecKind {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        SpecKind::Http
    } else if spec.starts_with("s3://") {
        SpecKind::S3
    } else {
        SpecKind::Local
    }
}

/// Opens the store named by `spec`: a directory path, `http(s)://host/path` (read-only),
/// or `s3://bucket/prefix`; with [`StoreOptions::cache`] set, a [`CacheStore`] in front.
///
/// # Errors
/// [`Error::InvalidInput`] for an `http(s)://` store with [`StoreOptions::create`] (writers
/// need a directory or S3).
/// [`Error::Io`] for a local directory that is missing (without `opts.create`) or cannot
/// be created, [`Error::InvalidInput`] for a malformed URL.
pub fn open_store(spec: &str, opts: &StoreOptions) -> Result<Arc<dyn ChunkStore>> {
    let store: Arc<dyn ChunkStore> = match spec_kind(spec) {
        SpecKind::Http if opts.create => {
            return Err(Error::InvalidInput(format!(
                "{spec} is an HTTP store, which is read-only: make into a local directory or \
                 an s3:// store and serve that over HTTP"
            )))
        }
        SpecKind::Http => Arc::new(HttpStore::new(spec, opts)?),
        SpecKind::S3 => Arc::new(S3Store::new(spec, opts)?),
        SpecKind::Local => Arc::new(LocalStore::open(spec, opts.create)?),
    };
    match &opts.cache {
        Some(dir) => Ok(Arc::new(CacheStore::open(
            dir.clone(),
            store,
            &CacheOptions {
                max_bytes: opts.cache_size,
            },
        )?)),
        None => Ok(store),
    }
}

/// Loads an index from a path, an `http(s)://` URL or `s3://bucket/key`, without trust
/// checks (see [`fetch_index`] for those). [`Index::load`] keeps working for paths; this
/// adds URLs, fetched into memory.
///
/// # Errors
/// [`Error::Io`] naming the path or URL when it cannot be read (a 404 included) or is
/// larger than [`StoreOptions::max_index_size`], [`Error::InvalidIndex`] when its bytes
/// are not a valid index.
pub fn load_index(spec: &str, opts: &StoreOptions) -> Result<Index> {
    match fetch_index(spec, opts)? {
        IndexSource::Local(path) => Index::load(&path),
        IndexSource::Remote(r) => Index::from_bytes(&r.bytes, &r.url),
    }
}

/// An index named on a command line: a local file, or one fetched by URL.
#[derive(Debug)]
pub enum IndexSource {
    /// A local path, read (with its `.minisig` beside it) by the trust checks.
    Local(PathBuf),
    /// An index fetched by URL, held in memory.
    Remote(Box<RemoteIndex>),
}

/// An index fetched by URL. It stays in memory (it is bounded by
/// [`StoreOptions::max_index_size`]) and is checked from bytes, as is its signature
/// ([`RemoteIndex::fetch_signature`], at most 64 KiB): nothing is written to disk, so no
/// file path another user could predict or plant is ever involved.
#[derive(Debug)]
pub struct RemoteIndex {
    /// The index's URL, which every message names.
    pub url: String,
    /// The index file's bytes, not checked yet.
    pub bytes: Vec<u8>,
    /// The URL of its signature: `URL.minisig`.
    pub signature_url: String,
    opts: StoreOptions,
}

impl RemoteIndex {
    /// Fetches the signature from [`RemoteIndex::signature_url`] into memory, when the
    /// trust checks need it (and only then: an index used without trusted keys costs no
    /// request for it). `Ok(None)` when the server has none (a 404).
    ///
    /// # Errors
    /// Transport errors naming the signature's URL, a body over 64 KiB included.
    pub fn fetch_signature(&self) -> Result<Option<Vec<u8>>> {
        fetch_file(
            &self.signature_url,
            &self.opts,
            tessera_engine::trust::MAX_SIGNATURE_LEN,
        )
    }
}

/// Names an index by path or URL: a path is left for the caller to read; a URL is
/// fetched into memory (see [`RemoteIndex`]).
///
/// # Errors
/// [`Error::Io`] naming the URL when the index cannot be fetched (a 404 included) or is
/// larger than [`StoreOptions::max_index_size`] (then of kind `FileTooLarge`).
pub fn fetch_index(spec: &str, opts: &StoreOptions) -> Result<IndexSource> {
    if spec_kind(spec) == SpecKind::Local {
        return Ok(IndexSource::Local(PathBuf::from(spec)));
    }
    let bytes = fetch_file(spec, opts, opts.max_index_size)?.ok_or_else(|| not_found(spec))?;
    Ok(IndexSource::Remote(Box::new(RemoteIndex {
        url: spec.to_string(),
        bytes,
        signature_url: format!("{spec}.minisig"),
        opts: opts.clone(),
    })))
}

/// GETs a file by `http(s)://` or `s3://` URL (`None` for a 404), with the store
/// transport's retries; bodies past `limit` bytes are refused.
///
/// # Errors
/// [`Error::InvalidInput`] for a local path; transport errors naming the URL.
pub fn fetch_file(spec: &str, opts: &StoreOptions, limit: u64) -> Result<Option<Vec<u8>>> {
    match spec_kind(spec) {
        SpecKind::Local => Err(Error::InvalidInput(format!("not a URL: {spec}"))),
        SpecKind::Http => {
            let t = transport::Transport::new(opts);
            match t.get("fetching", spec, limit, false)? {
                transport::Got::Body(b) => Ok(Some(b)),
                transport::Got::NotFound => Ok(None),
            }
        }
        SpecKind::S3 => s3::get_object(&s3::S3Path::parse(spec)?, opts, limit),
    }
}

fn not_found(spec: &str) -> Error {
    Error::io(
        "fetching index",
        PathBuf::from(spec),
        std::io::Error::new(std::io::ErrorKind::NotFound, "not found (HTTP 404)"),
    )
}

/// Where `make` writes an index: a local path is written in place; an `s3://` key is
/// written to a local staging file first (in a new directory only this user can enter) and uploaded by [`IndexDest::publish`], after the
/// store was flushed, so no reader sees an index whose chunks are not all there.
#[derive(Debug)]
pub struct IndexDest {
    spec: String,
    local: PathBuf,
    staged: bool,
}

impl IndexDest {
    /// Prepares the destination `spec`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an `http(s)://` destination (read-only) or a malformed
    /// `s3://` one.
    pub fn new(spec: &str) -> Result<IndexDest> {
        match spec_kind(spec) {
            SpecKind::Local => Ok(IndexDest {
                spec: spec.to_string(),
                local: PathBuf::from(spec),
                staged: false,
            }),
            SpecKind::Http => Err(Error::InvalidInput(format!(
                "cannot publish an index to {spec}: HTTP stores are read-only (write it to a \
                 local directory or s3:// and serve that)"
            ))),
            SpecKind::S3 => {
                s3::S3Path::parse(spec)?;
                let dir = private_temp_dir()?;
                Ok(IndexDest {
                    spec: spec.to_string(),
                    local: dir.join("index.tidx"),
                    staged: true,
                })
            }
        }
    }

    /// The local file `make` should write.
    pub fn path(&self) -> &Path {
        &self.local
    }

    /// Uploads a staged index (no-op for a local path). Call after `make` returned.
    ///
    /// # Errors
    /// [`Error::Io`] if the staged file cannot be read or the upload fails.
    pub fn publish(&self, opts: &StoreOptions) -> Result<()> {
        if !self.staged {
            return Ok(());
        }
        let bytes = std::fs::read(&self.local)
            .map_err(|e| Error::io("reading staged index", &self.local, e))?;
        s3::put_object(&s3::S3Path::parse(&self.spec)?, opts, &bytes)
    }
}

impl Drop for IndexDest {
    fn drop(&mut self) {
        if self.staged {
            if let Some(dir) = self.local.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Creates a new directory under `$TMPDIR` that only this user can enter. `mkdir` fails
/// on any existing name, a symlink included, so nothing planted there is followed, and
/// files inside cannot be planted by others.
fn private_temp_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static N: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    let mut last = None;
    for _ in 0..16 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!(
            "tessera-{}-{}-{nanos:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((dir, e)),
            Err(e) => return Err(Error::io("creating a private directory", &dir, e)),
        }
    }
    let (dir, e) = last.expect("the loop ran");
    Err(Error::io("creating a private directory", &dir, e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// `make` into S3 stages the index in a directory of its own that only this user can
    /// enter, never at a path in the shared $TMPDIR that another user could plant.
    #[test]
    fn an_s3_index_is_staged_in_a_private_directory() {
        let a = IndexDest::new("s3://bucket/prefix/a.tidx").unwrap();
        let b = IndexDest::new("s3://bucket/prefix/b.tidx").unwrap();
        let dir = a.path().parent().unwrap().to_path_buf();
        assert_ne!(dir, std::env::temp_dir(), "staged directly in $TMPDIR");
        assert_ne!(Some(dir.as_path()), b.path().parent());
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert!(
            !a.path().exists(),
            "nothing is written before make writes it"
        );
        drop(a);
        assert!(!dir.exists(), "the staging directory is removed on drop");
        // A local destination is used as it is.
        let local = IndexDest::new("out/x.tidx").unwrap();
        assert_eq!(local.path(), Path::new("out/x.tidx"));
    }
}
