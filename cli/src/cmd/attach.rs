//! `tessera attach` and `tessera detach`: an image as a kernel block device in one step.
//! The image is served in-process over socket pairs, whose other ends are handed to the
//! kernel's NBD driver through netlink (`attach/netlink.rs`).

mod netlink;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use tessera_engine::{ImageReader, Overlay, ReaderOptions};
use tessera_nbd::wire::{self, opt};
use tessera_nbd::{Backend, Export, Exports, Server};
use tokio::sync::mpsc;

use self::netlink::{Config, Nbd};
use super::serve::ImageBackend;
use crate::output::{human_bytes, Output};
use crate::store_args::{parse_size, StoreArgs};
use crate::trust_args::TrustArgs;

/// Seconds the kernel keeps requests queued while every connection is down, waiting for
/// the reconnection.
const DEAD_CONNECTION_SECS: u64 = 60;

/// Attach an image as a kernel block device (/dev/nbdN), in one step.
///
/// Serves INDEX in this process (as `tessera serve` would, every byte verified) and
/// configures the kernel's NBD device through its netlink interface, like `qemu-nbd -c`
/// or `nbd-client -netlink`: no network port, no separate client. Runs until the device
/// is detached (`tessera detach DEVICE`, `nbd-client -d DEVICE`) or until SIGINT/SIGTERM,
/// which detach it; then flushes the overlay and exits 0. A connection that fails on
/// this side is replaced (NBD_CMD_RECONFIGURE) while the kernel holds its requests.
/// Needs root (CAP_SYS_ADMIN) and the nbd module.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Index file (path or http(s):// or s3:// URL) of the image.
    #[arg(value_name = "INDEX")]
    index: PathBuf,
    /// The kernel NBD device to configure, /dev/nbdN (created by the kernel if N is
    /// beyond the existing ones).
    #[arg(value_name = "DEVICE")]
    device: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Make the device writable: writes go to this copy-on-write file (created if
    /// missing), which keeps them across attachments; the image and store stay untouched.
    #[arg(long, value_name = "FILE")]
    overlay: Option<PathBuf>,
    /// Refuse writes even with --overlay (the device shows the overlay's changes).
    #[arg(long)]
    readonly: bool,
    /// Connections between the kernel and this process: the kernel spreads requests
    /// over them (one queue each), like `nbd-client -C N`.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    connections: u16,
    /// Bytes of decompressed chunks kept in memory (K, M, G suffixes: powers of 1024).
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size)]
    cache_size: u64,
    #[command(flatten)]
    trust: TrustArgs,
}

/// Detach a kernel NBD device (/dev/nbdN).
///
/// Asks the kernel to disconnect the device (NBD_CMD_DISCONNECT over netlink): it sends
/// NBD_CMD_DISC to the server and fails new I/O. A `tessera attach` serving the device
/// then flushes its overlay and exits 0. Works for devices attached by any client.
#[derive(clap::Args, Debug)]
pub struct DetachArgs {
    /// The device, /dev/nbdN.
    #[arg(value_name = "DEVICE")]
    device: PathBuf,
}

/// N of /dev/nbdN.
fn device_index(device: &Path) -> anyhow::Result<u32> {
    device
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("nbd"))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .with_context(|| {
            format!(
                "{}: not an NBD device name (expected /dev/nbdN)",
                device.display()
            )
        })
}

/// The largest logical block size (4096 down to 512) dividing `size`.
fn block_size(size: u64) -> anyhow::Result<u64> {
    if size == 0 {
        bail!("the image is empty: a kernel block device needs at least 512 bytes");
    }
    match [4096, 2048, 1024, 512].into_iter().find(|b| size % b == 0) {
        Some(b) => Ok(b),
        None => bail!(
            "the image is {size} bytes, not a multiple of 512: the kernel's NBD device \
             would hide its last {} bytes (attach it with nbdfuse or serve it instead)",
            size % 512
        ),
    }
}

/// The client half of the fixed newstyle handshake (`NBD_OPT_EXPORT_NAME`) on the
/// kernel's end of a socket pair: the kernel takes over in transmission. Returns the
/// export's size and transmission flags.
fn handshake(s: &mut UnixStream, name: &str) -> anyhow::Result<(u64, u16)> {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into()?);
    let ihaveopt = u64::from_be_bytes(greeting[8..16].try_into()?);
    let flags = u16::from_be_bytes(greeting[16..18].try_into()?);
    if magic != wire::NBD_MAGIC || ihaveopt != wire::IHAVEOPT {
        bail!("unexpected greeting {greeting:02x?}");
    }
    let no_zeroes = flags & wire::FLAG_NO_ZEROES != 0;
    let mut msg = Vec::new();
    let client = wire::CLIENT_FIXED_NEWSTYLE | if no_zeroes { wire::CLIENT_NO_ZEROES } else { 0 };
    msg.extend_from_slice(&client.to_be_bytes());
    msg.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&opt::EXPORT_NAME.to_be_bytes());
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name.as_bytes());
    s.write_all(&msg)?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply)?;
    if !no_zeroes {
        s.read_exact(&mut [0u8; 124])?;
    }
    Ok((
        u64::from_be_bytes(reply[0..8].try_into()?),
        u16::from_be_bytes(reply[8..10].try_into()?),
    ))
}

/// How a connection's server task ended: its number, and the error if it failed.
type Ended = (usize, tessera_nbd::Result<()>);

/// Starts serving connection `n` on one end of a new socket pair and does the handshake
/// on the other, which it returns (for the kernel) with the export's size and flags.
async fn open_connection(
    server: &Server,
    name: &str,
    n: usize,
    ended: &mpsc::UnboundedSender<Ended>,
) -> anyhow::Result<(OwnedFd, u64, u16)> {
    let (ours, mut kernels) = UnixStream::pair().context("creating a socket pair")?;
    ours.set_nonblocking(true)?;
    let ours = tokio::net::UnixStream::from_std(ours)?;
    let (server, ended) = (server.clone(), ended.clone());
    tokio::spawn(async move {
        let _ = ended.send((n, server.serve_connection(ours).await));
    });
    let name = name.to_string();
    let (kernels, size, flags) = tokio::task::spawn_blocking(move || {
        handshake(&mut kernels, &name).map(|(size, flags)| (kernels, size, flags))
    })
    .await?
    .context("handshake with the in-process server")?;
    Ok((OwnedFd::from(kernels), size, flags))
}

/// `NBD_CMD_RECONFIGURE` with `fd` in place of a dead connection. The kernel notices
/// the old connection's end on its own (`ENOSPC`: no dead connection yet), so that is
/// retried for up to 5 s.
async fn reconfigure(nbd: &mut Nbd, number: u32, fd: &OwnedFd) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        match nbd.reconfigure(number, &[fd.as_raw_fd()]) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && tries < 50 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            r => return r.context("NBD_CMD_RECONFIGURE"),
        }
    }
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let number = device_index(&args.device)?;
    let device = args.device.display().to_string();
    let store = args.store.open()?;
    let index = args.trust.load(&args.store.fetch_index(&args.index)?)?;
    let size = index.image_size();
    let block_size = block_size(size)?;
    let chunks = args.store.chunks(store, &index)?;
    let overlay = match &args.overlay {
        Some(p) => Some(Overlay::open(p, &index).context("opening the overlay")?),
        None => None,
    };
    let writable = overlay.is_some() && !args.readonly;
    let options = ReaderOptions {
        cache_bytes: args.cache_size,
        ..ReaderOptions::default()
    };
    let backend = Arc::new(ImageBackend {
        reader: Arc::new(ImageReader::new(index, chunks, options)),
        overlay,
        writable,
    });
    let name = "image";
    let mut exports = Exports::new();
    exports.add(Export::new(name, backend.clone() as Arc<dyn Backend>));
    let server = Server::builder(exports)
        .log(Arc::new(|line: &str| eprintln!("tessera attach: {line}")))
        .build();
    let mut nbd = Nbd::open().context("opening the kernel's NBD netlink interface")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let (tx, mut ended) = mpsc::unbounded_channel();
        let count = usize::from(args.connections);
        let mut fds = Vec::new();
        let mut flags = 0;
        for n in 0..count {
            let (fd, _, f) = open_connection(&server, name, n, &tx).await?;
            fds.push(fd);
            flags = f;
        }
        let config = Config {
            size,
            block_size,
            server_flags: flags,
            // No timeout: this process always answers, however slow the store.
            timeout_secs: 0,
            dead_conn_timeout_secs: DEAD_CONNECTION_SECS,
        };
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        nbd.connect(number, &config, &raw)
            .map_err(|e| refused(e, &device, "NBD_CMD_CONNECT"))?;
        // The kernel holds its own references to the sockets.
        drop(fds);
        out.line(format!(
            "attached {} ({}) as {device}, {count} connection{}{}",
            args.index.display(),
            human_bytes(size),
            if count == 1 { "" } else { "s" },
            if writable {
                ", writable"
            } else {
                ", read-only"
            },
        ));
        let mut live = count;
        let mut detaching = false;
        while live > 0 {
            tokio::select! {
                _ = int.recv(), if !detaching => detaching = true,
                _ = term.recv(), if !detaching => detaching = true,
                Some((n, result)) = ended.recv() => {
                    match result {
                        // The kernel closed it: the device is being detached.
                        Ok(()) => live -= 1,
                        Err(e) if detaching => {
                            eprintln!("tessera attach: connection {n} ended: {e}");
                            live -= 1;
                        }
                        Err(e) => {
                            eprintln!("tessera attach: connection {n} failed: {e}; reconnecting");
                            let replaced = async {
                                let (fd, _, _) = open_connection(&server, name, n, &tx).await?;
                                reconfigure(&mut nbd, number, &fd).await
                            }
                            .await;
                            if let Err(e) = replaced {
                                eprintln!("tessera attach: connection {n} not replaced: {e:#}");
                                live -= 1;
                            } else {
                                eprintln!("tessera attach: connection {n} replaced");
                            }
                        }
                    }
                    continue;
                }
            }
            // A signal: detach the device; the connections then end one by one.
            eprintln!("tessera attach: detaching {device}");
            nbd.disconnect(number)
                .map_err(|e| refused(e, &device, "NBD_CMD_DISCONNECT"))?;
        }
        anyhow::Ok(())
    });
    // The overlay is flushed however serving ended.
    let flushed = backend
        .flush()
        .map_err(|e| anyhow::anyhow!(e.message))
        .context("flushing the overlay");
    served?;
    flushed?;
    out.line(format!("detached {device}"));
    Ok(ExitCode::SUCCESS)
}

pub fn run_detach(args: DetachArgs, out: &Output) -> anyhow::Result<ExitCode> {
    let number = device_index(&args.device)?;
    let device = args.device.display();
    Nbd::open()
        .context("opening the kernel's NBD netlink interface")?
        .disconnect(number)
        .map_err(|e| refused(e, &device.to_string(), "NBD_CMD_DISCONNECT"))?;
    out.line(format!("detached {device}"));
    Ok(ExitCode::SUCCESS)
}

/// The kernel's refusal of `command` for `device`, with what it usually means.
fn refused(e: std::io::Error, device: &str, command: &str) -> anyhow::Error {
    let hint = match e.raw_os_error() {
        Some(libc::EBUSY) => " (the device is in use: attached already?)",
        Some(libc::EPERM) => " (needs root: CAP_SYS_ADMIN)",
        Some(libc::EINVAL) if command == "NBD_CMD_DISCONNECT" => {
            " (no such device, or not attached)"
        }
        _ => "",
    };
    anyhow::anyhow!("{device}: the kernel refused {command}: {e}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_and_block_sizes() {
        assert_eq!(device_index(Path::new("/dev/nbd0")).unwrap(), 0);
        assert_eq!(device_index(Path::new("/dev/nbd15")).unwrap(), 15);
        for bad in ["/dev/sda", "/dev/nbd", "/dev/nbd1p1", "nbdx", "/dev/nbd-1"] {
            let e = device_index(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("/dev/nbdN"), "{e}");
        }
        assert_eq!(block_size(32 << 20).unwrap(), 4096);
        assert_eq!(block_size(4096 + 512).unwrap(), 512);
        assert!(block_size(0).is_err());
        let e = block_size(1000).unwrap_err().to_string();
        assert!(
            e.contains("1000 bytes") && e.contains("last 488 bytes"),
            "{e}"
        );
    }

    #[test]
    fn the_handshake_reads_size_and_flags_from_the_in_process_server() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut exports = Exports::new();
            let data = vec![7u8; 1 << 20];
            exports.add(Export::new(
                "image",
                Arc::new(tessera_nbd::MemoryBackend::new(data, false)) as Arc<dyn Backend>,
            ));
            let server = Server::builder(exports).build();
            let (tx, _ended) = mpsc::unbounded_channel();
            let (fd, size, flags) = open_connection(&server, "image", 0, &tx).await.unwrap();
            assert_eq!(size, 1 << 20);
            assert_ne!(flags & wire::tflags::READ_ONLY, 0);
            assert_ne!(flags & wire::tflags::CAN_MULTI_CONN, 0);
            // The stream is in transmission: a READ of 4 bytes is answered.
            let mut s = UnixStream::from(fd);
            let req = wire::encode_request(&wire::Request {
                flags: 0,
                kind: wire::cmd::READ,
                cookie: 9,
                offset: 0,
                len: 4,
            });
            s.write_all(&req).unwrap();
            let mut reply = [0u8; 16 + 4];
            s.read_exact(&mut reply).unwrap();
            assert_eq!(&reply[16..], &[7, 7, 7, 7]);
        });
    }
}
