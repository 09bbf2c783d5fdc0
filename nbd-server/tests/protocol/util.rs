//! Shared helpers: a server on a background runtime, and a minimal raw client.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use tessera_nbd::{Backend, Export, Exports, MemoryBackend, Server, ServerBuilder};
use tokio::sync::oneshot;

/// A pattern with zero runs: byte i is (i / 7) as u8 except in [64 KiB, 192 KiB).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if (65536..196608).contains(&i) {
                0
            } else {
                (i / 7) as u8 | 1
            }
        })
        .collect()
}

/// A running TCP server; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.addr, name)
    }

    /// The log so far, one line each.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (up to 20 s) for a log line containing `needle`, returning the log.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let log = self.log_text();
            if log.contains(needle) || std::time::Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `exports` on 127.0.0.1 with log lines collected.
pub fn serve(exports: Exports) -> Running {
    serve_with(exports, |b| b)
}

/// Like [`serve`], with the builder adjusted by `configure`.
pub fn serve_with(
    exports: Exports,
    configure: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> Running {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let server = configure(Server::builder(exports))
        .log(Arc::new(move |l: &str| {
            sink.lock().unwrap().push(l.to_string())
        }))
        .build();
    let (stop, stopped) = oneshot::channel();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            server
                .serve_tcp(l, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    Running {
        addr: addr_rx.recv().unwrap(),
        log,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Exports "mem" (read-only pattern) and "rw" (writable zeros), both 1 MiB.
pub fn two_exports() -> (Exports, Arc<MemoryBackend>) {
    let rw = Arc::new(MemoryBackend::new(vec![0; 1 << 20], true));
    let mut e = Exports::new();
    e.add(
        Export::new(
            "mem",
            Arc::new(MemoryBackend::new(pattern(1 << 20), false)) as Arc<dyn Backend>,
        )
        .description("pattern"),
    );
    e.add(Export::new("rw", rw.clone() as Arc<dyn Backend>));
    (e, rw)
}

/// True when `tool` runs; otherwise prints why the test skips (or panics under CI=true).
pub fn have(tool: &str) -> bool {
    // python3-libnbd (for nbdsh) is installed for the system interpreter.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let ok = Command::new(tool)
        .env("PATH", path)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is required under CI=true (install libnbd-bin / qemu-utils)");
        }
        eprintln!("skipping: {tool} not installed");
    }
    ok
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd`, killing it and failing if it takes longer than `limit`; returns how long
/// it took.
pub fn run_within(cmd: &mut Command, limit: std::time::Duration) -> std::time::Duration {
    let start = std::time::Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{cmd:?} failed: {status}");
            return start.elapsed();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A blocking raw NBD client over TCP, for attackers and well-behaved clients alike.
pub struct RawClient {
    pub s: std::net::TcpStream,
}

impl RawClient {
    /// Connects and negotiates `name` with simple replies (NBD_OPT_GO); every socket
    /// operation fails after `limit`.
    pub fn go(
        addr: SocketAddr,
        name: &str,
        limit: std::time::Duration,
    ) -> std::io::Result<RawClient> {
        let s = std::net::TcpStream::connect(addr)?;
        RawClient::go_on(s, name, limit)
    }

    /// Negotiates `name` on an already connected socket.
    pub fn go_on(
        s: std::net::TcpStream,
        name: &str,
        limit: std::time::Duration,
    ) -> std::io::Result<RawClient> {
        use std::io::{Read, Write};
        s.set_read_timeout(Some(limit))?;
        s.set_write_timeout(Some(limit))?;
        let mut c = RawClient { s };
        let mut greeting = [0u8; 18];
        c.s.read_exact(&mut greeting)?;
        assert_eq!(greeting, tessera_nbd::wire::encode_greeting());
        let mut msg = 3u32.to_be_bytes().to_vec();
        msg.extend_from_slice(&tessera_nbd::wire::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&tessera_nbd::wire::opt::GO.to_be_bytes());
        msg.extend_from_slice(&(name.len() as u32 + 6).to_be_bytes());
        msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
        msg.extend_from_slice(name.as_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        c.s.write_all(&msg)?;
        loop {
            let mut head = [0u8; 20];
            c.s.read_exact(&mut head)?;
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            c.s.read_exact(&mut data)?;
            if kind == tessera_nbd::wire::rep::ACK {
                return Ok(c);
            }
            assert_eq!(
                kind,
                tessera_nbd::wire::rep::INFO,
                "GO {name}: reply {kind:#x}"
            );
        }
    }

    /// Sends a READ request without waiting for its reply.
    pub fn send_read(&mut self, cookie: u64, offset: u64, len: u32) -> std::io::Result<()> {
        use std::io::Write;
        let r = tessera_nbd::wire::Request {
            flags: 0,
            kind: tessera_nbd::wire::cmd::READ,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&tessera_nbd::wire::encode_request(&r))
    }

    /// Reads `len` bytes at `offset` (simple reply).
    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        self.send_read(1, offset, len)?;
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head)?;
        assert_eq!(
            head[..4],
            tessera_nbd::wire::SIMPLE_REPLY_MAGIC.to_be_bytes()
        );
        assert_eq!(head[4..8], [0; 4], "READ failed");
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data)?;
        Ok(data)
    }
}
