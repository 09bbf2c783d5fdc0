//! `tessera serve`: attach images as NBD exports, read lazily and verified.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use tessera_engine::{ImageReader, Overlay, ReaderOptions};
use tessera_nbd::{
    Backend, BackendError, BackendResult, BlockState, Capabilities, ErrorKind, Export, Exports,
    Extent, Server,
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
/// Stops cleanly on SIGINT or SIGTERM.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Index files (paths or http(s):// or s3:// URLs), one export each.
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
    /// Listen on this Unix socket instead of TCP.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Export name (one INDEX only) [default: the index file name without extension].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Bytes of decompressed chunks kept in memory, per export (K, M, G suffixes: powers
    /// of 1024).
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
}

/// An engine image (and optional overlay) as an NBD backend.
struct ImageBackend {
    reader: Arc<ImageReader>,
    overlay: Option<Overlay>,
    writable: bool,
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

    fn extents(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        let mut out = Vec::new();
        let Some(o) = &self.overlay else {
            self.image_extents(offset, len, &mut out)?;
            return Ok(out);
        };
        let mut at = offset;
        for (n, inside) in o.runs(offset, len).map_err(backend_error)? {
            if inside {
                out.push(Extent {
                    len: n,
                    state: BlockState::Data,
                });
            } else {
                self.image_extents(at, n, &mut out)?;
            }
            at += n;
        }
        Ok(out)
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
    let store = args.store.open()?;
    let options = ReaderOptions {
        cache_bytes: args.cache_size,
        ..ReaderOptions::default()
    };
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
            reader: Arc::new(ImageReader::new(index, chunks, options)),
            overlay,
            writable,
        });
        backends.push(backend.clone());
        exports.add(Export::new(name, backend as Arc<dyn Backend>).description(description));
    }
    let names: Vec<String> = exports.iter().map(|e| e.name().to_string()).collect();
    let server = Server::builder(exports)
        .log(Arc::new(|line: &str| eprintln!("tessera serve: {line}")))
        .build();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
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
            remove_stale_socket(path)?;
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("listening on {}", path.display()))?;
            announce(out, &names, |n| {
                format!("nbd+unix:///{n}?socket={}", path.display())
            });
            let served = server.serve_unix(listener, shutdown).await;
            let _ = std::fs::remove_file(path);
            served.context("accepting connections")
        } else {
            let listener = tokio::net::TcpListener::bind(&args.listen)
                .await
                .with_context(|| format!("listening on {}", args.listen))?;
            let addr = listener
                .local_addr()
                .context("reading the listening address")?;
            announce(out, &names, |n| format!("nbd://{addr}/{n}"));
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

/// Removes a socket file left by a server that did not stop cleanly; refuses to remove
/// anything that is not a socket.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display())),
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}
