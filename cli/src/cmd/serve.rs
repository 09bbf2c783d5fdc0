//! `tessera serve`: attach images as NBD exports, read lazily and verified.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tessera_engine::{ImageReader, Overlay, ReaderOptions, ReaderPool};
use tessera_nbd::{
    Backend, BackendError, BackendResult, BlockState, Capabilities, ErrorKind, Export, Exports,
    Extent, Server, ServerBuilder, TlsConfig,
};

use crate::output::{human_bytes, Output};
use crate::store_args::{parse_size, StoreArgs};
use crate::trust_args::TrustArgs;

/// Serve images over NBD (nbd-client, qemu nbd://, nbdcopy, nbdfuse...).
///
/// Each INDEX becomes an export named after its file (without extension), the first one
/// also being the default export. Chunks are fetched when first read, and every byte
/// sent has been checked against the index: a chunk that fails its hash is answered
/// with EIO and logged with its id. Exports are read-only unless --overlay is given;
/// writes then go to a local copy-on-write file and the image and store stay untouched.
/// With --tls-cert and --tls-key, clients may upgrade to TLS (nbds:// URIs); add
/// --tls-required to refuse plain text, --tls-ca to require client certificates.
/// Stops cleanly on SIGINT or SIGTERM.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Index files (paths or http(s):// or s3:// URLs), one export each: tessera indexes
    /// or casync .caibx files, whose chunks come from the casync store given as --store
    /// (docs/CASYNC.md).
    #[arg(required = true, value_name = "INDEX")]
    indexes: Vec<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// TCP address to listen on (port 0 picks a free port; the address is printed).
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:10809",
        conflicts_with = "unix"
    )]
    listen: String,
    /// Listen on this Unix socket instead of TCP. An existing file, symlink or live
    /// socket at PATH is refused; a stale socket (no server answering) is replaced.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Permissions of the --unix socket, in octal (600: only this user may connect).
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    unix_mode: u32,
    /// Export name (one INDEX only) [default: the index file name without extension].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Bytes of decompressed chunks kept in memory, for all exports together (one cache,
    /// shared: a chunk used by several images is kept once; K, M, G suffixes: powers of
    /// 1024).
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size)]
    cache_size: u64,
    /// Make the export writable: writes go to this copy-on-write file (created if
    /// missing), which keeps them across restarts. One INDEX only.
    #[arg(long, value_name = "FILE")]
    overlay: Option<PathBuf>,
    /// Refuse writes even with --overlay (serve the image with the overlay's changes).
    #[arg(long)]
    readonly: bool,
    #[command(flatten)]
    trust: TrustArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

/// TLS (NBD_OPT_STARTTLS) with X.509 certificates, on TCP and Unix sockets alike.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "TLS")]
struct TlsArgs {
    /// Offer TLS with this certificate chain (PEM: the server's certificate first, then
    /// any intermediates). Clients connect with nbds:// URIs; TLS is their choice unless
    /// --tls-required. Its names (subjectAltName) must match the host clients connect to.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1; RSA, ECDSA or
    /// Ed25519).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require every client to present a certificate signed by a CA in this PEM file;
    /// other clients fail the TLS handshake. Implies nothing about plain connections:
    /// add --tls-required to refuse them.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Refuse clients that do not start TLS: every option before NBD_OPT_STARTTLS is
    /// answered with NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME closes the connection.
    #[arg(long, requires = "tls_cert")]
    tls_required: bool,
}

impl TlsArgs {
    /// The server's TLS settings, or `None` without --tls-cert.
    fn load(&self) -> anyhow::Result<Option<TlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let config = TlsConfig::from_pem_files(cert, key, self.tls_ca.as_deref())
            .context("loading the TLS credentials")?;
        Ok(Some(config.required(self.tls_required)))
    }
}

/// Limits that keep one misbehaving client from denying service to the others.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Connection limits")]
struct LimitArgs {
    /// Connections served at once. When full, a new client takes the place of the
    /// connection idle the longest (negotiating, or with no request in flight); if all
    /// are busy it is refused.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_connections: usize,
    /// Connections served at once for one client address (on a Unix socket: one user
    /// id, so with --unix-mode 600 it applies to all clients together). Beyond it, the
    /// address's own longest-idle connection makes room.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_connections_per_peer: usize,
    /// Seconds a client has to finish the NBD handshake.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    handshake_timeout: Duration,
    /// Seconds after which a connection with no request in flight that sends nothing is
    /// closed; 0 never closes it (kernel nbd-client and qemu keep idle connections).
    #[arg(long, value_name = "SECS", default_value = "0", value_parser = parse_secs_or_zero)]
    idle_timeout: Duration,
    /// Seconds a client may leave its replies unread (no progress at all) before it is
    /// dropped.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    reply_timeout: Duration,
    /// Memory for READ and WRITE buffers of all connections together (K, M, G
    /// suffixes).
    #[arg(long, value_name = "BYTES", default_value = "512M", value_parser = parse_size)]
    buffer_budget: u64,
    /// The most of --buffer-budget one connection may hold [default: a quarter of it].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    connection_budget: Option<u64>,
    /// The most of --buffer-budget the connections of one peer may hold together
    /// [default: half of it].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    peer_budget: Option<u64>,
    /// Seconds a request waits for buffer memory before the server drops the connection
    /// holding the most while making no progress for as long (or moving its data too
    /// slowly to drain it within ten such waits). Also how long a transfer must have been
    /// pending before a full server may evict its connection, the slowest first, for a
    /// new client.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    budget_wait: Duration,
}

impl LimitArgs {
    fn apply(&self, mut b: ServerBuilder) -> ServerBuilder {
        b = b
            .max_connections(self.max_connections)
            .max_connections_per_peer(self.max_connections_per_peer)
            .handshake_timeout(self.handshake_timeout)
            .idle_timeout((!self.idle_timeout.is_zero()).then_some(self.idle_timeout))
            .reply_timeout(self.reply_timeout)
            .buffer_budget(self.buffer_budget)
            .budget_wait(self.budget_wait);
        if let Some(n) = self.connection_budget {
            b = b.connection_budget(n);
        }
        if let Some(n) = self.peer_budget {
            b = b.peer_budget(n);
        }
        b
    }
}

/// A positive number of seconds.
fn parse_secs(s: &str) -> Result<Duration, String> {
    match parse_secs_or_zero(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be more than 0 seconds")),
        d => Ok(d),
    }
}

/// A number of seconds, 0 allowed.
fn parse_secs_or_zero(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Octal permission bits, at most 777.
fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim().trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode such as 600"))?;
    if mode > 0o777 {
        return Err(format!("{s:?}: only permission bits (at most 777)"));
    }
    Ok(mode)
}

/// An engine image (and optional overlay) as an NBD backend (also `tessera attach`'s).
pub(super) struct ImageBackend {
    pub(super) reader: Arc<ImageReader>,
    pub(super) overlay: Option<Overlay>,
    pub(super) writable: bool,
}

fn backend_error(e: tessera_engine::Error) -> BackendError {
    let kind = match e.kind() {
        tessera_engine::ErrorKind::InvalidInput => ErrorKind::Invalid,
        _ => ErrorKind::Io,
    };
    BackendError::new(kind, e.to_string())
}

impl ImageBackend {
    fn overlay(&self) -> BackendResult<&Overlay> {
        match &self.overlay {
            Some(o) if self.writable => Ok(o),
            _ => Err(BackendError::new(
                ErrorKind::ReadOnly,
                "export is read-only",
            )),
        }
    }

    fn image_extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> BackendResult<()> {
        for run in self.reader.runs(offset, len).map_err(backend_error)? {
            let state = if run.zero {
                BlockState::Hole
            } else {
                BlockState::Data
            };
            out.push(Extent {
                len: run.len,
                state,
            });
        }
        Ok(())
    }
}

impl Backend for ImageBackend {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            writable: self.writable,
            // One reader, cache and overlay are shared by every connection.
            multi_conn: true,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<Vec<Extent>> {
        match &self.overlay {
            Some(o) => o.read_at(&self.reader, offset, buf),
            None => self.reader.read_at(offset, buf),
        }
        .map_err(backend_error)?;
        self.extents(offset, buf.len() as u64)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> BackendResult<()> {
        self.overlay()?
            .write_at(&self.reader, offset, data, fua)
            .map_err(backend_error)
    }

    fn flush(&self) -> BackendResult<()> {
        match &self.overlay {
            Some(o) => o.flush().map_err(backend_error),
            None => Ok(()),
        }
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BackendResult<()> {
        self.write_zeroes(offset, len, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BackendResult<()> {
        self.overlay()?
            .zero(&self.reader, offset, len, fua)
            .map_err(backend_error)
    }

    fn cache(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.reader.prefetch(offset, len).map_err(backend_error)
    }

    /// At most [`MAX_EXTENTS`] extents from the start of the range (the trait lets them
    /// cover less than `len`), looked up [`EXTENT_WINDOW`] bytes at a time.
    fn extents(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        let end = offset.checked_add(len).ok_or_else(|| {
            BackendError::new(
                ErrorKind::Invalid,
                format!("range of {len} bytes at {offset} passes 2^64"),
            )
        })?;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && out.len() < MAX_EXTENTS {
            let n = (end - at).min(EXTENT_WINDOW);
            self.window_extents(at, n, &mut out)?;
            at += n;
        }
        out.truncate(MAX_EXTENTS);
        Ok(out)
    }
}

/// Most extents computed for one request: a BLOCK_STATUS reply carries at most 1024
/// descriptors anyway, and an overlay written one block in two (or a finely cut image)
/// must not cost memory in proportion to the 4 GiB one request may cover, times every
/// request in flight.
const MAX_EXTENTS: usize = 1024;
/// Bytes of a range looked up at a time before checking [`MAX_EXTENTS`].
const EXTENT_WINDOW: u64 = 64 << 20;

impl ImageBackend {
    /// Appends the extents of `len` bytes at `offset` to `out`.
    fn window_extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> BackendResult<()> {
        let Some(o) = &self.overlay else {
            return self.image_extents(offset, len, out);
        };
        let mut at = offset;
        for (n, inside) in o.runs(offset, len).map_err(backend_error)? {
            if inside {
                out.push(Extent {
                    len: n,
                    state: BlockState::Data,
                });
            } else {
                self.image_extents(at, n, out)?;
            }
            at += n;
        }
        Ok(())
    }
}

fn export_name(index: &Path) -> String {
    index
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| index.display().to_string())
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    if args.indexes.len() > 1 && (args.name.is_some() || args.overlay.is_some()) {
        bail!("--name and --overlay need exactly one INDEX");
    }
    // Bad credentials fail before any index or store is touched.
    let tls = args.tls.load()?;
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let store = args.store.open()?;
    // One cache and one set of read-ahead threads for every export: memory and threads
    // do not grow with the number of exports.
    let defaults = ReaderOptions::default();
    let pool = ReaderPool::new(
        args.cache_size,
        defaults.prefetch_threads.max(store.in_flight()),
    );
    let mut exports = Exports::new();
    let mut names = HashSet::new();
    let mut backends = Vec::new();
    for path in &args.indexes {
        let index = args.trust.load(&args.store.fetch_index(path)?)?;
        let name = args.name.clone().unwrap_or_else(|| export_name(path));
        if !names.insert(name.clone()) {
            bail!("two indexes would both be exported as {name:?}; rename one");
        }
        let chunks = args.store.chunks(store.clone(), &index)?;
        let overlay = match &args.overlay {
            Some(p) => Some(Overlay::open(p, &index).context("opening the overlay")?),
            None => None,
        };
        let description = format!(
            "tessera image {}, root hash {}",
            human_bytes(index.image_size()),
            tessera_engine::index::hex(&index.root_hash())
        );
        let writable = overlay.is_some() && !args.readonly;
        let backend = Arc::new(ImageBackend {
            reader: Arc::new(ImageReader::in_pool(
                index,
                chunks,
                defaults.readahead_bytes,
                pool.clone(),
            )),
            overlay,
            writable,
        });
        backends.push(backend.clone());
        exports.add(Export::new(name, backend as Arc<dyn Backend>).description(description));
    }
    let names: Vec<String> = exports.iter().map(|e| e.name().to_string()).collect();
    let server = args
        .limits
        .apply(Server::builder(exports))
        .tls(tls)
        .log(Arc::new(|line: &str| eprintln!("tessera serve: {line}")))
        .build();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered before the address is announced: a signal sent as soon as someone
        // has read it must stop the server cleanly, not kill it.
        let signals = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        );
        let shutdown = async move {
            match signals {
                (Ok(mut int), Ok(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                // Without signal handlers the server runs until killed.
                _ => std::future::pending::<()>().await,
            }
        };
        if let Some(path) = &args.unix {
            let (listener, ino) = tessera_nbd::bind_unix(path, args.unix_mode)?;
            announce(out, &names, |n| {
                format!("{scheme}+unix:///{n}?socket={}", path.display())
            });
            let served = server.serve_unix(listener, shutdown).await;
            // Only our own socket: whatever replaced it meanwhile stays.
            let _ = tessera_nbd::remove_unix_socket(path, Some(ino));
            served.context("accepting connections")
        } else {
            let listener = tokio::net::TcpListener::bind(&args.listen)
                .await
                .with_context(|| format!("listening on {}", args.listen))?;
            let addr = listener
                .local_addr()
                .context("reading the listening address")?;
            announce(out, &names, |n| format!("{scheme}://{addr}/{n}"));
            server
                .serve_tcp(listener, shutdown)
                .await
                .context("accepting connections")
        }
    })?;
    for b in backends {
        b.flush()
            .map_err(|e| anyhow::anyhow!(e.message))
            .context("flushing the overlay on shutdown")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints one line per export in a single write: whoever reads the first line (a script
/// waiting for the address) may close the pipe, and no later print must fail.
fn announce(out: &Output, names: &[String], uri: impl Fn(&str) -> String) {
    let lines: Vec<String> = names
        .iter()
        .map(|n| format!("serving {n:?} on {}", uri(n)))
        .collect();
    out.line(lines.join("\n"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_engine::index::ZeroIds;
    use tessera_engine::{ChunkerParams, Index, LocalStore, PackFetcher};

    #[test]
    fn extents_of_a_fragmented_overlay_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        // A 256 MiB image of zeros (no chunk files needed).
        let params = ChunkerParams::default();
        let zero = ZeroIds::default().get(params.max);
        let count = (256 << 20) / params.max;
        let index = Index::new(params, [0; 32], (0..count).map(|_| (zero, params.max))).unwrap();
        let store = LocalStore::open(dir.path().join("store"), true).unwrap();
        // Zero chunks are never fetched: no location data is needed.
        let chunks = PackFetcher::open_lazy(Arc::new(store), &index);
        let reader = Arc::new(ImageReader::new(
            index.clone(),
            Arc::new(chunks),
            ReaderOptions::default(),
        ));
        // A client wrote one 4 KiB block in two over the first 32 MiB.
        let overlay = Overlay::open(&dir.path().join("overlay"), &index).unwrap();
        for b in (0..(32u64 << 20) / 4096).step_by(2) {
            overlay
                .write_at(&reader, b * 4096, &[1; 4096], false)
                .unwrap();
        }
        let backend = ImageBackend {
            reader,
            overlay: Some(overlay),
            writable: true,
        };
        // A BLOCK_STATUS of 4 GiB would otherwise compute an extent per block.
        let x = backend.extents(0, 256 << 20).unwrap();
        assert!(x.len() <= MAX_EXTENTS, "{} extents", x.len());
        assert!(!x.is_empty());
        for (i, e) in x.iter().enumerate() {
            assert_eq!(e.len, 4096, "extent {i}");
            let data = i % 2 == 0;
            assert_eq!(e.state == BlockState::Data, data, "extent {i}");
        }
        // Past the written part, one hole extent per window.
        let x = backend.extents(64 << 20, 192 << 20).unwrap();
        assert_eq!(x.len(), 3);
        assert!(x.iter().all(|e| e.state == BlockState::Hole));
        assert_eq!(x.iter().map(|e| e.len).sum::<u64>(), 192 << 20);
    }
}
