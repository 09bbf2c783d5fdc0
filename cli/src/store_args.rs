//! `--store` and its companions, shared by every subcommand that reads or writes chunks.
//!
//! Flatten [`StoreArgs`] into a subcommand's arguments (`#[command(flatten)]`), then
//! [`StoreArgs::open`] and [`StoreArgs::chunks`] (readers: the verified chunks of one
//! index, through the --cache) or [`StoreArgs::open_for_write`] (`make`), and
//! [`StoreArgs::fetch_index`] for an index given as a path or URL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_engine::casync::CasyncStore;
use tessera_engine::{
    CacheOptions, CacheStore, ChunkDigest, ChunkStore, Index, PackFetcher, StoreRead, StoreWrite,
};
use tessera_stores::{HttpOptions, IndexDest, IndexSource, MirrorStore, S3Options, StoreOptions};

/// Where chunks live, and how to reach them.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Pack store: a directory, http(s)://HOST/PATH (any web server or CDN that honours
    /// Range requests, read-only; https://USER:PASSWORD@HOST/PATH for Basic
    /// authentication, percent-encoded, never shown in messages), or s3://BUCKET/PREFIX
    /// (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY). For a casync index
    /// (.caibx): its casync chunk store (.castr), as a directory or URL (docs/CASYNC.md).
    /// Repeat it to name mirrors (sync and serve): each request tries them in order; one
    /// that fails, or serves bytes that fail verification, is warned of and tried last
    /// from then on. Proxies come from https_proxy/HTTPS_PROXY, http_proxy/HTTP_PROXY and
    /// ALL_PROXY (NO_PROXY: hosts reached directly).
    #[arg(long = "store", value_name = "DIR|URL", required = true)]
    pub stores: Vec<String>,
    /// Keep fetched chunks in this local directory, in front of the store; shared safely
    /// by concurrent processes, least recently used chunks evicted past --cache-limit.
    /// For readers only (sync, serve): `make` refuses it.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Bound of the --cache directory (K, M, G, T suffixes: powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "10G")]
    pub cache_limit: String,
    /// Requests in flight to a remote store (fetches and uploads).
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub jobs: usize,
    /// Seconds without progress before a request is abandoned and retried.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub timeout: f64,
    /// Longest one request may take, from connecting to the last byte of its answer,
    /// however steadily bytes arrive: a server trickling bytes is abandoned then (not
    /// retried). Raise it to fetch very large indexes over a slow link.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub deadline: f64,
    /// Largest index accepted by URL (K, M, G, T suffixes: powers of 1024); a fetched
    /// index and its signature are held in memory, never written to disk.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub max_index_size: u64,
    /// Further attempts after a failed request or a chunk that fails verification.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub retries: u32,
    /// S3 service URL [default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, or AWS].
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region for signing [default: AWS_REGION, AWS_DEFAULT_REGION, or us-east-1].
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Send this header with every request to an http(s):// store or index URL, e.g.
    /// 'Authorization: Bearer TOKEN' (repeatable). Other local users can read a command
    /// line: put secrets in --header-file instead. Not sent after a redirect to another
    /// host, nor to s3:// (signed with AWS credentials).
    #[arg(long = "header", value_name = "'NAME: VALUE'", help_heading = "HTTP")]
    pub headers: Vec<String>,
    /// Send the headers in FILE (one 'NAME: VALUE' a line; blank lines and # comments
    /// skipped), as --header does. The file must not be readable by every user.
    #[arg(long, value_name = "FILE", help_heading = "HTTP")]
    pub header_file: Option<PathBuf>,
    /// Trust the CA certificates (PEM) in FILE for https:// servers, instead of the
    /// built-in Mozilla roots (repeatable; to keep trusting public CAs too, also give
    /// /etc/ssl/certs/ca-certificates.crt).
    #[arg(long, value_name = "FILE", help_heading = "HTTP")]
    pub ca_cert: Vec<PathBuf>,
    /// Present the client certificate (PEM, leaf first) in FILE to https:// servers that
    /// verify clients (mTLS); needs --client-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "client_key",
        help_heading = "HTTP"
    )]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert; the file must not be readable by every
    /// user.
    #[arg(
        long,
        value_name = "FILE",
        requires = "client_cert",
        help_heading = "HTTP"
    )]
    pub client_key: Option<PathBuf>,
}

impl StoreArgs {
    /// The engine-side options these arguments mean.
    ///
    /// # Errors
    /// Out-of-range values.
    pub fn options(&self) -> anyhow::Result<StoreOptions> {
        anyhow::ensure!(self.jobs > 0, "--jobs must be at least 1");
        anyhow::ensure!(
            self.timeout.is_finite() && self.timeout > 0.0,
            "--timeout must be a positive number of seconds"
        );
        anyhow::ensure!(
            self.deadline.is_finite() && self.deadline > 0.0,
            "--deadline must be a positive number of seconds"
        );
        let mut http = HttpOptions::default();
        for (i, h) in self.headers.iter().enumerate() {
            http.add_header(h, &format!("--header {}", i + 1))?;
        }
        if let Some(f) = &self.header_file {
            http.add_header_file(f).context("--header-file")?;
        }
        for f in &self.ca_cert {
            http.add_ca_file(f).context("--ca-cert")?;
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            http.set_client_identity(cert, key)
                .context("--client-cert/--client-key")?;
        }
        Ok(StoreOptions {
            jobs: self.jobs,
            timeout: Duration::from_secs_f64(self.timeout),
            deadline: Duration::from_secs_f64(self.deadline),
            max_index_size: self.max_index_size,
            retries: self.retries,
            s3: S3Options {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                path_style: None,
            },
            http,
            ..StoreOptions::default()
        })
    }

    /// The store for messages (its URL's `user:password` shown as `***`).
    pub fn shown(&self) -> String {
        tessera_stores::redact(&self.stores[0])
    }

    /// Opens the store for reading; with several --store, the mirrors, whose failures are
    /// warned of on stderr.
    ///
    /// # Errors
    /// A missing directory, a malformed URL, bad options.
    pub fn open(&self) -> anyhow::Result<Arc<dyn StoreRead>> {
        let opts = self.options()?;
        let mut mirrors = Vec::new();
        for spec in &self.stores {
            mirrors.push(
                tessera_stores::open_store(spec, &opts)
                    .with_context(|| format!("opening store {}", tessera_stores::redact(spec)))?,
            );
        }
        if mirrors.len() == 1 {
            return Ok(mirrors.pop().expect("one store"));
        }
        let warn = Box::new(|msg: &str| eprintln!("tessera: warning: {msg}"));
        Ok(Arc::new(MirrorStore::new(mirrors, warn)?))
    }

    /// Opens the one store a command that checks or changes a store works on.
    ///
    /// # Errors
    /// Several --store given; as [`StoreArgs::open`].
    pub fn open_single(&self, command: &str) -> anyhow::Result<Arc<dyn StoreRead>> {
        self.single(command)?;
        self.open()
    }

    fn single(&self, command: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.stores.len() == 1,
            "--store given {} times: mirrors are for readers (sync, serve); {command} works \
             on one store: run it on each",
            self.stores.len()
        );
        Ok(())
    }

    /// The verified chunks of `index` from `store` (opened by [`StoreArgs::open`]): its
    /// location file is read now; with --cache, a cache in front and the location file
    /// read only when a chunk is not in the cache.
    ///
    /// # Errors
    /// The store has no (or a malformed) location file for the index; the cache directory
    /// cannot be opened; a bad --cache-limit.
    pub fn chunks(
        &self,
        store: Arc<dyn StoreRead>,
        index: &Index,
    ) -> anyhow::Result<Arc<dyn ChunkStore>> {
        if index.digest() != ChunkDigest::Blake3 {
            // A casync index: its chunks are files of a casync store (docs/CASYNC.md).
            if let Some(dir) = &self.cache {
                anyhow::bail!(
                    "--cache {} is not supported with a casync index: drop --cache",
                    dir.display()
                );
            }
            return Ok(Arc::new(CasyncStore::new(store, index)));
        }
        let Some(dir) = &self.cache else {
            return Ok(Arc::new(PackFetcher::open(store, index)?));
        };
        // The location file is read only if a chunk is not in the cache: a warm cache
        // serves an index while its store is unreachable.
        let fetcher: Arc<dyn ChunkStore> = Arc::new(PackFetcher::open_lazy(store, index));
        let opts = CacheOptions {
            max_bytes: parse_size(&self.cache_limit).context("--cache-limit")?,
        };
        Ok(Arc::new(
            CacheStore::open(dir.clone(), fetcher, &opts)
                .with_context(|| format!("opening the cache {}", dir.display()))?,
        ))
    }

    /// Opens the store for `make`: a local directory is created if missing; an HTTP store
    /// and --cache are refused.
    ///
    /// # Errors
    /// As [`StoreArgs::open`], and --cache given.
    pub fn open_for_write(&self) -> anyhow::Result<Arc<dyn StoreWrite>> {
        if let Some(dir) = &self.cache {
            anyhow::bail!(
                "--cache {} is for readers (sync, serve): make writes the store {} itself \
                 and reads it directly; drop --cache",
                dir.display(),
                self.shown()
            );
        }
        self.single("a command that writes a store")?;
        tessera_stores::open_store_for_write(&self.stores[0], &self.options()?)
            .with_context(|| format!("opening store {}", self.shown()))
    }

    /// An index given as a path or URL, for `TrustArgs::load`: a path is left to be read
    /// there; a URL is fetched into memory (at most --max-index-size), with its `.minisig`
    /// if the server has one. Nothing is written to disk.
    ///
    /// # Errors
    /// The URL cannot be fetched, or its index is larger than --max-index-size.
    pub fn fetch_index(&self, index: &Path) -> anyhow::Result<IndexSource> {
        let spec = index.to_string_lossy();
        tessera_stores::fetch_index(&spec, &self.options()?).map_err(|e| self.index_error(&spec, e))
    }

    /// The index named by `index` (a path or URL, fetched as [`StoreArgs::fetch_index`]
    /// does), parsed, without trust checks (for `check`, `prune` and `commit`, which verify
    /// every chunk they use); `what` names it in errors ("kept index").
    ///
    /// # Errors
    /// As [`StoreArgs::fetch_index`], and a malformed index.
    pub fn load_index(&self, index: &Path, what: &str) -> anyhow::Result<Index> {
        let spec = index.to_string_lossy();
        tessera_stores::load_index(&spec, &self.options()?)
            .map_err(|e| self.index_error(&spec, e))
            .with_context(|| format!("loading {what} {}", tessera_stores::redact(&spec)))
    }

    /// Explains an index over --max-index-size; other errors as they are.
    fn index_error(&self, spec: &str, e: tessera_engine::Error) -> anyhow::Error {
        let too_large = matches!(
            &e,
            tessera_engine::Error::Io { source, .. }
                if source.kind() == std::io::ErrorKind::FileTooLarge
        );
        if too_large {
            anyhow::Error::new(e).context(format!(
                "index {} is larger than --max-index-size ({} bytes); raise it if the index \
                 is genuine",
                tessera_stores::redact(spec),
                self.max_index_size
            ))
        } else {
            e.into()
        }
    }

    /// Where `make` writes an index given as a path or s3:// URL: write to
    /// [`IndexDest::path`], then call [`StoreArgs::publish_index`].
    ///
    /// # Errors
    /// An http(s):// destination (read-only) or a malformed URL.
    pub fn index_dest(&self, index: &Path) -> anyhow::Result<IndexDest> {
        Ok(IndexDest::new(&index.to_string_lossy())?)
    }

    /// Uploads an index staged by [`StoreArgs::index_dest`] (no-op for a local path).
    ///
    /// # Errors
    /// The upload failed.
    pub fn publish_index(&self, dest: &IndexDest) -> anyhow::Result<()> {
        dest.publish(&self.options()?)
            .context("publishing the index")
    }
}

/// Parses `10G`, `512M`, `1048576`: [`tessera_engine::parse_size`], for clap.
pub(crate) fn parse_size(s: &str) -> anyhow::Result<u64> {
    Ok(tessera_engine::parse_size(s)?)
}
