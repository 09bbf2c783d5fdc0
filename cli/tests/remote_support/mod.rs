//! Servers for the remote-store tests: nginx serving a store directory (packs by `Range`
//! requests), moto's S3 server, and a fault-injecting HTTP proxy that also logs what it
//! was asked. Each listens on a free loopback port and is stopped when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A free loopback port (the listener is closed again, so a child may bind it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
fn wait_listening(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port} within 30 s");
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Whether nginx is installed.
pub fn nginx_available() -> bool {
    nginx_binary().is_some()
}

/// nginx serving a directory as static files, in the foreground, single process.
pub struct Nginx {
    pub port: u16,
    child: Child,
    _dir: TempDir,
}

impl Nginx {
    /// Serves `root` at `http://127.0.0.1:PORT/`.
    pub fn start(root: &Path) -> Nginx {
        Nginx::start_with(root, "", |_| String::new())
    }

    /// Serves `root` with `listen 127.0.0.1:PORT {listen}` (e.g. `ssl`) and the server
    /// directives `server(dir)` returns (`dir`: nginx's own directory, for files such as
    /// an htpasswd), logging each request (see [`Nginx::requests`]).
    pub fn start_with(root: &Path, listen: &str, server: impl FnOnce(&Path) -> String) -> Nginx {
        let dir = TempDir::new().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let extra = server(dir.path());
        // master_process off: one process that keeps our (root) identity, so it can read
        // the temporary directories the tests create.
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/t1;\n  proxy_temp_path {d}/t2;\n\
             \x20 fastcgi_temp_path {d}/t3;\n  uwsgi_temp_path {d}/t4;\n  scgi_temp_path {d}/t5;\n\
             \x20 keepalive_requests 100000;\n\
             \x20 server {{ listen 127.0.0.1:{port} {listen}; root {root};\n{extra}\n }}\n}}\n",
            root = root.display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new(nginx_binary().expect("nginx"))
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx");
        wait_listening(port, "nginx", &mut child);
        Nginx {
            port,
            child,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// The access log's line of every request answered so far, in order. nginx logs a
    /// request once it is done, which can be just after its client saw the answer: a
    /// request of our own (`/.log-barrier`, left out) is made and waited for in the log
    /// first, so every request answered before is there.
    pub fn requests(&self) -> Vec<String> {
        let log = || {
            std::fs::read_to_string(self._dir.path().join("access.log"))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let barriers =
            |lines: &[String]| lines.iter().filter(|l| l.contains("/.log-barrier")).count();
        let seen = barriers(&log());
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "GET /.log-barrier HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let _ = s.read_to_end(&mut Vec::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lines = log();
            if barriers(&lines) > seen {
                return lines
                    .into_iter()
                    .filter(|l| !l.contains("/.log-barrier"))
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "nginx never logged its barrier request"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether moto's S3 server can be started.
pub fn moto_available() -> bool {
    on_path("moto_server") || moto_module()
}

/// Whether `python3 -m moto.server` works (pip's script may not be on PATH).
fn moto_module() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server, flask_cors"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// moto's S3-compatible server, with a bucket made.
pub struct Moto {
    pub port: u16,
    child: Child,
}

/// Credentials moto accepts (it checks none); set in every tessera command's environment.
pub const S3_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "tessera-test"),
    ("AWS_SECRET_ACCESS_KEY", "tessera-test-secret"),
    ("AWS_REGION", "us-east-1"),
];

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let mut cmd = if on_path("moto_server") {
            Command::new("moto_server")
        } else {
            let mut c = Command::new("python3");
            c.args(["-m", "moto.server"]);
            c
        };
        let mut child = cmd
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        wait_listening(port, "moto_server", &mut child);
        Moto { port, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "creating bucket {name}: {answer}"
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward it.
    Pass,
    /// Close the connection without answering.
    Reset,
    /// Answer 500.
    Status500,
    /// Say nothing for this long, then close.
    Stall(Duration),
    /// Forward the headers (with the full Content-Length) and half the body, then close.
    Truncate,
    /// Forward the answer with one body byte flipped.
    Corrupt,
    /// Forward the answer after this long.
    Delay(Duration),
    /// Forward the headers, then the body one byte per this long.
    Trickle(Duration),
    /// Forward the answer with this many extra bytes after the body, with a Content-Length
    /// that counts them when `declared`, else with none (the body ends at the close).
    Pad { extra: usize, declared: bool },
    /// Answer `302 Found` with this Location.
    Redirect(&'static str),
    /// Forward the request without its `Range` header: the server answers 200 with the
    /// whole file, as a server or proxy that ignores ranges does.
    DropRange,
    /// Forward the request with its `Range` moved one byte on: the server answers 206
    /// with a `Content-Range` that is not the one asked.
    ShiftRange,
}

/// One request the proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The `Range` header's value, if any.
    pub range: Option<String>,
    /// Whether it asked caches to revalidate (`Cache-Control: no-cache`).
    pub no_cache: bool,
}

/// Decides the fault of request number `n` (from 0) for `method` and `path`.
pub type Plan = dyn Fn(u64, &str, &str) -> Fault + Send + Sync;

/// An HTTP/1.1 proxy in front of one upstream, injecting faults.
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

struct ProxyState {
    upstream: SocketAddr,
    plan: Mutex<Arc<Plan>>,
    requests: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    /// Every request gets its connection closed: the server went away.
    down: AtomicBool,
    stop: AtomicBool,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, plan: Arc<Plan>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            upstream,
            plan: Mutex::new(plan),
            requests: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve_client(conn, &st);
                });
            }
        });
        Proxy { port, state }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Every request seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn set_plan(&self, plan: Arc<Plan>) {
        *self.state.plan.lock().unwrap() = plan;
    }

    /// Takes the server away (every connection closed at once) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_client(client: TcpStream, st: &ProxyState) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    loop {
        // Request line and headers.
        let mut head = Vec::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(()); // Client closed.
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if !lower.starts_with("connection:") {
                head.push(line);
            }
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;
        let first = head.first().cloned().unwrap_or_default();
        let mut parts = first.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let range = head.iter().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("range")
                .then(|| value.trim().to_string())
        });
        let no_cache = head.iter().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("cache-control:") && l.contains("no-cache")
        });
        st.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            no_cache,
        });
        let n = st.requests.fetch_add(1, Ordering::Relaxed);
        if st.down.load(Ordering::Relaxed) {
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        let plan = st.plan.lock().unwrap().clone();
        let fault = plan(n, &method, &path);
        match fault {
            Fault::Reset => {
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Fault::Stall(d) => {
                std::thread::sleep(d);
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Fault::Status500 => {
                client.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
                )?;
                continue;
            }
            Fault::Redirect(location) => {
                write!(
                    client,
                    "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
                )?;
                continue;
            }
            _ => {}
        }
        // Forward with one request per upstream connection.
        let mut up = TcpStream::connect(st.upstream)?;
        for line in &head {
            let is_range = line.to_ascii_lowercase().starts_with("range:");
            match fault {
                Fault::DropRange if is_range => {}
                Fault::ShiftRange if is_range => up.write_all(shifted(line).as_bytes())?,
                _ => up.write_all(line.as_bytes())?,
            }
        }
        up.write_all(b"Connection: close\r\n\r\n")?;
        up.write_all(&body)?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(answer.len(), |p| p + 4);
        let (resp_head, resp_body) = answer.split_at(split);
        // Keep the client connection open: drop the upstream's "Connection: close".
        let resp_head: String = String::from_utf8_lossy(resp_head)
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect::<Vec<_>>()
            .join("\r\n");
        let mut resp_body = resp_body.to_vec();
        match fault {
            Fault::Truncate => {
                client.write_all(resp_head.as_bytes())?;
                client.write_all(&resp_body[..resp_body.len() / 2])?;
                let _ = client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Fault::Corrupt if !resp_body.is_empty() => {
                let mid = resp_body.len() / 2;
                resp_body[mid] ^= 0x5a;
            }
            Fault::Delay(d) => std::thread::sleep(d),
            Fault::Trickle(d) => {
                client.write_all(resp_head.as_bytes())?;
                for b in &resp_body {
                    client.write_all(std::slice::from_ref(b))?;
                    std::thread::sleep(d);
                }
                continue;
            }
            Fault::Pad { extra, declared } => {
                let head: String = resp_head
                    .split("\r\n")
                    .filter(|l| !l.to_ascii_lowercase().starts_with("content-length:"))
                    .filter(|l| !l.is_empty())
                    .map(|l| format!("{l}\r\n"))
                    .collect();
                client.write_all(head.as_bytes())?;
                if declared {
                    write!(client, "Content-Length: {}\r\n", resp_body.len() + extra)?;
                } else {
                    client.write_all(b"Connection: close\r\n")?;
                }
                client.write_all(b"\r\n")?;
                client.write_all(&resp_body)?;
                let pad = vec![0x5a; 64 << 10];
                let mut left = extra;
                while left > 0 {
                    let n = left.min(pad.len());
                    client.write_all(&pad[..n])?;
                    left -= n;
                }
                if !declared {
                    let _ = client.shutdown(Shutdown::Both);
                    return Ok(());
                }
                continue;
            }
            _ => {}
        }
        client.write_all(resp_head.as_bytes())?;
        client.write_all(&resp_body)?;
    }
}

/// `Range: bytes=A-B` moved one byte on.
fn shifted(line: &str) -> String {
    let value = line.split_once('=').map_or("", |(_, v)| v.trim());
    let (a, b) = value.split_once('-').unwrap_or(("0", "0"));
    let (a, b): (u64, u64) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
    format!("Range: bytes={}-{}\r\n", a + 1, b + 1)
}

/// The pack files of a store directory.
pub fn pack_files(store: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for d in std::fs::read_dir(store.join("packs")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "tpack") {
                out.push(f);
            }
        }
    }
    out.sort();
    out
}

/// The total size of a store directory's packs.
pub fn pack_bytes(store: &Path) -> u64 {
    pack_files(store)
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum()
}

/// The chunk ids (hex) an index lists, in order (records of 36 bytes from offset 80).
pub fn index_chunk_ids(index: &[u8]) -> Vec<String> {
    let count = u64::from_le_bytes(index[72..80].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| {
            let at = 80 + 36 * i;
            index[at..at + 32]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .collect()
}

/// Whether `nbdcopy` (libnbd-bin) is installed.
pub fn nbdcopy_available() -> bool {
    on_path("nbdcopy")
}

/// Runs `tessera serve ARGS --unix SOCK` with `envs`, copies the default export out with
/// nbdcopy, stops the server and returns the bytes.
pub fn serve_and_copy(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Vec<u8> {
    let sock = dir.join(format!("nbd-{}.sock", free_port()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("serve")
        .args(args)
        .arg("--unix")
        .arg(&sock)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting tessera serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd+unix://"))
        .unwrap_or_else(|| panic!("no NBD URI in {line:?}"))
        .to_string();
    let out = dir.join("served.raw");
    let status = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&out)
        .status()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.success(), "nbdcopy {uri} failed");
    std::fs::read(&out).unwrap()
}
