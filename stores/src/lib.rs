//! Remote stores for tessera: one [`RemoteStore`] for HTTP(S) servers, CDNs and
//! S3-compatible buckets, and [`open_store`] / [`open_store_for_write`], which turn a
//! store spec (a path, a URL or `s3://bucket/prefix`) into the engine's
//! [`StoreRead`] / [`StoreWrite`].
//!
//! A store is static files (packs and location files, see `docs/FORMAT.md`); the engine
//! reads chunks from it with ranged reads (`tessera_engine::store::PackFetcher`) and keeps
//! many requests in flight ([`StoreRead::in_flight`] is [`StoreOptions::jobs`]). The
//! engine is synchronous, so these clients are too: requests are made by `ureq` on the
//! caller's threads, no async runtime. Connections are reused, and transient failures
//! retried (see `transport`).
//!
//! ```no_run
//! use tessera_stores::{load_index, open_store, StoreOptions};
//!
//! # fn main() -> tessera_engine::Result<()> {
//! let opts = StoreOptions::default();
//! let store = open_store("https://cdn.example.com/store", &opts)?;
//! let index = load_index("https://cdn.example.com/rootfs-2.0.tidx", &opts)?;
//! let root = index.root_hash();
//! let location = store.read_file(&tessera_engine::store::locations_path(&root), 1 << 30)?;
//! # let _ = location;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod mirrors;
mod options;
mod remote;
mod s3;
mod transport;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use mirrors::{MirrorStore, Warn};
pub use options::{HttpOptions, S3Options, StoreOptions};
pub use remote::RemoteStore;
use tessera_engine::store::{StoreRead, StoreWrite};
use tessera_engine::{Error, Index, LocalStore, Result};
pub use transport::redact;

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

/// Opens the store named by `spec` for reading: an existing directory, `http(s)://HOST/PATH`
/// or `s3://BUCKET/PREFIX`. A cache goes in front of what reads chunks from it (a
/// `PackFetcher`), not here.
///
/// # Errors
/// [`Error::Io`] for a local directory that is missing, [`Error::InvalidInput`] for a
/// malformed URL.
pub fn open_store(spec: &str, opts: &StoreOptions) -> Result<Arc<dyn StoreRead>> {
    Ok(match spec_kind(spec) {
        SpecKind::Http | SpecKind::S3 => Arc::new(RemoteStore::open(spec, opts)?),
        SpecKind::Local => Arc::new(LocalStore::open(spec, false)?),
    })
}

/// Opens the store named by `spec` for `make`: a directory (created if missing) or
/// `s3://BUCKET/PREFIX`.
///
/// # Errors
/// [`Error::InvalidInput`] for an `http(s)://` store (read-only: make into a directory or
/// S3 and serve that) or a malformed URL; [`Error::Io`] for a directory that cannot be
/// created.
pub fn open_store_for_write(spec: &str, opts: &StoreOptions) -> Result<Arc<dyn StoreWrite>> {
    Ok(match spec_kind(spec) {
        SpecKind::Http => return Err(remote::read_only(spec.trim_end_matches('/'))),
        SpecKind::S3 => Arc::new(RemoteStore::open(spec, opts)?),
        SpecKind::Local => Arc::new(LocalStore::open(spec, true)?),
    })
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
    /// The index's URL, which every message names (any `user:password` shown as `***`).
    pub url: String,
    /// The index file's bytes, not checked yet.
    pub bytes: Vec<u8>,
    /// The URL of its signature, `URL.minisig`, as messages show it.
    pub signature_url: String,
    /// The signature's URL as it is fetched (with credentials).
    signature_fetch: String,
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
            &self.signature_fetch,
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
        url: redact(spec),
        bytes,
        signature_url: redact(&format!("{spec}.minisig")),
        signature_fetch: format!("{spec}.minisig"),
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
            match t.get("fetching", &redact(spec), spec, limit)? {
                transport::Got::Body(b) => Ok(Some(b)),
                transport::Got::NotFound => Ok(None),
            }
        }
        SpecKind::S3 => {
            no_headers_for_s3(spec, opts)?;
            s3::get_object(&s3::S3Path::parse(spec)?, opts, limit)
        }
    }
}

/// Refuses extra headers for an `s3://` spec: its requests are signed with AWS
/// credentials, and an `Authorization` of ours would conflict.
pub(crate) fn no_headers_for_s3(spec: &str, opts: &StoreOptions) -> Result<()> {
    if opts.http.has_headers() {
        return Err(Error::InvalidInput(format!(
            "{spec}: --header and --header-file apply to http(s):// URLs only; s3:// requests \
             are signed with AWS credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        )));
    }
    Ok(())
}

fn not_found(spec: &str) -> Error {
    Error::remote_io(
        "fetching index",
        PathBuf::from(redact(spec)),
        std::io::Error::new(std::io::ErrorKind::NotFound, "not found (HTTP 404)"),
    )
}

/// Where `make` writes an index: a local path is written in place; an `s3://` key is
/// written to a local staging file first (in a new directory only this user can enter)
/// and uploaded by [`IndexDest::publish`], after the store was flushed, so no reader sees an index whose chunks are not all there.
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
        no_headers_for_s3(&self.spec, opts)?;
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
