//! Shared helpers: a server on a background runtime, and a minimal raw client.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use tessera_nbd::{Backend, Export, Exports, MemoryBackend, Server};
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
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let server = Server::builder(exports)
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
    let ok = Command::new(tool)
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
