//! `tessera serve` with TLS (NBD_OPT_STARTTLS, X.509) against the real clients:
//! libnbd (nbdinfo, nbdcopy), qemu-img with a `tls-creds-x509` object, nbd-client, and
//! raw sockets for what no client does on purpose (plain text on a TLS-only server,
//! garbage after STARTTLS). Certificates are made with the openssl command.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use util::{have, random_bytes, run_ok, sh, tessera};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test PKI: two CAs (`ca`, trusted by the server, and `rogue`), a server certificate
/// for localhost and 127.0.0.1, and client certificates signed by each CA. Client
/// credential directories in the layout libnbd and qemu read (`ca-cert.pem`,
/// `client-cert.pem`, `client-key.pem`).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(root: &Path) -> Pki {
        let dir = root.join("pki");
        std::fs::create_dir_all(&dir).unwrap();
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for ca in ["ca", "rogue"] {
            let subj = format!("/CN=tessera test {ca}");
            let (k, c) = (format!("{ca}-key.pem"), format!("{ca}-cert.pem"));
            let mut args = vec!["req", "-x509"];
            args.extend(key);
            args.extend(["-keyout", &k, "-out", &c, "-days", "3650", "-subj", &subj]);
            args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
            args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
            openssl(&dir, &args);
        }
        let leaf = |name: &str, ca: &str, ext: &str| {
            let (k, r, c, e) = (
                format!("{name}-key.pem"),
                format!("{name}.csr"),
                format!("{name}-cert.pem"),
                format!("{name}.ext"),
            );
            let subj = format!("/CN={name}");
            let mut args = vec!["req", "-new"];
            args.extend(key);
            args.extend(["-keyout", &k, "-out", &r, "-subj", &subj]);
            openssl(&dir, &args);
            let common = "basicConstraints=critical,CA:FALSE\n\
                          keyUsage=critical,digitalSignature,keyEncipherment\n";
            std::fs::write(dir.join(&e), format!("{common}{ext}\n")).unwrap();
            let (cac, cak) = (format!("{ca}-cert.pem"), format!("{ca}-key.pem"));
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &r,
                    "-CA",
                    &cac,
                    "-CAkey",
                    &cak,
                    "-set_serial",
                    &format!("{}", name.len() * 1000 + ca.len()),
                    "-days",
                    "3650",
                    "-out",
                    &c,
                    "-extfile",
                    &e,
                ],
            );
        };
        leaf(
            "server",
            "ca",
            "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1",
        );
        leaf("client", "ca", "extendedKeyUsage=clientAuth");
        leaf("outsider", "rogue", "extendedKeyUsage=clientAuth");
        let pki = Pki { dir };
        // What the clients are given.
        pki.client_dir("good", "ca", Some("client"));
        pki.client_dir("no-cert", "ca", None);
        pki.client_dir("outsider", "ca", Some("outsider"));
        pki.client_dir("distrusting", "rogue", Some("client"));
        pki
    }

    fn client_dir(&self, name: &str, ca: &str, cert: Option<&str>) {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.file(&format!("{ca}-cert.pem")), d.join("ca-cert.pem")).unwrap();
        if let Some(c) = cert {
            std::fs::copy(
                self.file(&format!("{c}-cert.pem")),
                d.join("client-cert.pem"),
            )
            .unwrap();
            std::fs::copy(self.file(&format!("{c}-key.pem")), d.join("client-key.pem")).unwrap();
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A client credential directory: `good`, `no-cert`, `outsider` (client certificate
    /// from the rogue CA), `distrusting` (trusts only the rogue CA).
    fn client(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `--tls-cert`, `--tls-key` and `--tls-ca` for the server.
    fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.file("server-cert.pem").display().to_string(),
            "--tls-key".into(),
            self.file("server-key.pem").display().to_string(),
            "--tls-ca".into(),
            self.file("ca-cert.pem").display().to_string(),
        ]
    }
}

/// A `tessera serve` child process, killed when dropped.
struct Served {
    child: Child,
    _stdout: BufReader<std::process::ChildStdout>,
    /// The first announced URI.
    uri: String,
    stderr: PathBuf,
}

impl Served {
    fn start(dir: &Path, args: &[String]) -> Served {
        let stderr = dir.join(format!("serve-{}.err", Instant::now().elapsed().as_nanos()));
        let mut child = tessera()
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting tessera serve");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let uri = line
            .split(" on ")
            .nth(1)
            .unwrap_or_else(|| {
                panic!(
                    "no URI in {line:?}: {}",
                    std::fs::read_to_string(&stderr).unwrap()
                )
            })
            .trim()
            .to_string();
        Served {
            child,
            _stdout: stdout,
            uri,
            stderr,
        }
    }

    /// HOST:PORT of a TCP server.
    fn addr(&self) -> &str {
        self.uri
            .split("://")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
    }

    fn port(&self) -> &str {
        self.addr().rsplit(':').next().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    /// Waits (up to 20 s) for a log line containing `needle`.
    fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs `cmd`, which must fail; returns its stderr.
fn fails(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An 8 MiB image (2 MiB of zeros inside) as DIR/disk.tidx over DIR/store.
fn make(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = random_bytes(8 << 20, 31);
    data[3 << 20..5 << 20].fill(0);
    let img = dir.join("disk.img");
    std::fs::write(&img, &data).unwrap();
    let idx = dir.join("disk.tidx");
    run_ok(&[
        &"make",
        &"-q",
        &"--store",
        &dir.join("store"),
        &"--index",
        &idx,
        &img,
    ]);
    (idx, data)
}

fn serve_args(dir: &Path, idx: &Path, pki: &Pki, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        idx.display().to_string(),
        "--store".into(),
        dir.join("store").display().to_string(),
    ];
    a.extend(pki.server_args());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// nbdcopy of `uri` into DIR/NAME; its bytes.
fn nbdcopy(dir: &Path, uri: &str, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    sh(Command::new("nbdcopy").arg(uri).arg(&out));
    std::fs::read(out).unwrap()
}

/// A raw client: greeting read, fixed-newstyle flags sent.
fn raw_client(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut m = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
}

/// Option, reply type and message of the next option reply.
fn option_reply(s: &mut TcpStream) -> (u32, u32, String) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut data = vec![0; len];
    s.read_exact(&mut data).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        String::from_utf8_lossy(&data).into_owned(),
    )
}

/// True when the server closes `s` (EOF or reset) within 20 s.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

const STARTTLS: u32 = 5;
const ERR_TLS_REQD: u32 = (1 << 31) + 5;
const ACK: u32 = 1;

#[test]
fn libnbd_qemu_and_nbd_client_read_through_tls_with_client_certificates() {
    for tool in ["nbdinfo", "nbdcopy", "qemu-img", "nbd-client", "openssl"] {
        if !have(tool) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (idx, data) = make(dir.path());
    let pki = Pki::new(dir.path());
    let srv = Served::start(
        dir.path(),
        &serve_args(
            dir.path(),
            &idx,
            &pki,
            &["--tls-required", "--listen", "127.0.0.1:0"],
        ),
    );
    assert!(srv.uri.starts_with("nbds://127.0.0.1:"), "{}", srv.uri);
    let uri = format!("{}?tls-certificates={}", srv.uri, pki.client("good"));
    // libnbd: nbdinfo and nbdcopy.
    let info: serde_json::Value =
        serde_json::from_str(&sh(Command::new("nbdinfo").arg("--json").arg(&uri))).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 8 << 20, "{info}");
    assert!(
        nbdcopy(dir.path(), &uri, "libnbd.raw") == data,
        "nbdcopy differs"
    );
    // qemu-img with a tls-creds-x509 object.
    let out = dir.path().join("qemu.raw");
    sh(Command::new("qemu-img")
        .arg("convert")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            pki.client("good")
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=disk,tls-creds=tls0",
            srv.port()
        ))
        .args(["-O", "raw"])
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == data, "qemu-img differs");
    // nbd-client (built with GnuTLS): list the exports over TLS (attaching needs the
    // kernel's nbd module, which the VM test covers).
    let listed = sh(Command::new("nbd-client")
        .args(["-l", "127.0.0.1", srv.port()])
        .arg("-cacertfile")
        .arg(pki.file("ca-cert.pem"))
        .arg("-certfile")
        .arg(pki.file("client-cert.pem"))
        .arg("-keyfile")
        .arg(pki.file("client-key.pem"))
        .args(["-tlshostname", "localhost", "-enable-tls"]));
    assert!(listed.contains("disk"), "{listed}");
    // The same nbd-client without TLS gets nothing.
    let refused = output(Command::new("nbd-client").args(["-l", "127.0.0.1", srv.port()]));
    let said = String::from_utf8_lossy(&refused.stdout);
    assert!(!said.contains("disk"), "listed in plain text: {said}");
}

#[test]
fn plain_text_is_refused_when_tls_is_required_and_served_when_optional() {
    for tool in ["nbdinfo", "nbdcopy", "openssl"] {
        if !have(tool) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (idx, data) = make(dir.path());
    let pki = Pki::new(dir.path());
    let srv = Served::start(
        dir.path(),
        &serve_args(
            dir.path(),
            &idx,
            &pki,
            &["--tls-required", "--listen", "127.0.0.1:0"],
        ),
    );
    let plain = format!("nbd://{}/disk", srv.addr());
    fails(Command::new("nbdinfo").arg(&plain));
    // By hand: every option before STARTTLS gets NBD_REP_ERR_TLS_REQD, with a message.
    let mut s = raw_client(srv.addr());
    for option in [3u32, 8, 6, 7, 10] {
        let data: &[u8] = if matches!(option, 6 | 7) {
            b"\0\0\0\x04disk\0\0"
        } else {
            b""
        };
        send_option(&mut s, option, data);
        let (o, kind, msg) = option_reply(&mut s);
        assert_eq!((o, kind), (option, ERR_TLS_REQD), "option {option}: {msg}");
        assert!(msg.contains("STARTTLS"), "{msg}");
    }
    // NBD_OPT_EXPORT_NAME cannot be refused: the connection ends.
    send_option(&mut s, 1, b"disk");
    assert!(closed(&mut s), "EXPORT_NAME in plain text was not refused");
    srv.wait_for_log("NBD_OPT_EXPORT_NAME before STARTTLS");
    // NBD_OPT_ABORT is still answered.
    let mut s = raw_client(srv.addr());
    send_option(&mut s, 2, b"");
    assert_eq!(option_reply(&mut s).1, ACK);
    drop(srv);

    // Without --tls-required, the same server serves plain and TLS clients, and a
    // client certificate is still required for TLS.
    let srv = Served::start(
        dir.path(),
        &serve_args(dir.path(), &idx, &pki, &["--listen", "127.0.0.1:0"]),
    );
    assert!(
        nbdcopy(
            dir.path(),
            &format!("nbd://{}/disk", srv.addr()),
            "plain.raw"
        ) == data,
        "plain copy differs"
    );
    let uri = format!("{}?tls-certificates={}", srv.uri, pki.client("good"));
    assert!(
        nbdcopy(dir.path(), &uri, "tls.raw") == data,
        "TLS copy differs"
    );
}

#[test]
fn a_wrong_ca_is_refused_both_ways() {
    for tool in ["nbdinfo", "openssl"] {
        if !have(tool) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = make(dir.path());
    let pki = Pki::new(dir.path());
    let srv = Served::start(
        dir.path(),
        &serve_args(
            dir.path(),
            &idx,
            &pki,
            &["--tls-required", "--listen", "127.0.0.1:0"],
        ),
    );
    let with = |creds: &str| format!("{}?tls-certificates={}", srv.uri, pki.client(creds));
    // The client does not trust the server's CA.
    let err = fails(Command::new("nbdinfo").arg(with("distrusting")));
    assert!(
        err.contains("certificate") || err.contains("verif"),
        "{err}"
    );
    let log = srv.wait_for_log("TLS handshake failed");
    assert!(log.contains("TLS handshake failed"), "{log}");
    // The server gets no client certificate. (GnuTLS does not even offer a certificate
    // from another CA than those the server names, so the outsider sends none either.)
    for creds in ["no-cert", "outsider"] {
        fails(Command::new("nbdinfo").arg(with(creds)));
    }
    let log = srv.wait_for_log("peer sent no certificates");
    assert!(log.contains("peer sent no certificates"), "{log}");
    // OpenSSL (Python's ssl) sends the outsider's certificate anyway: the server's
    // verifier refuses it.
    if have("python3") {
        let (host, port) = srv.addr().split_once(':').unwrap();
        let script = format!(
            r#"
import socket, ssl, struct
s = socket.create_connection(({host:?}, {port}))
assert s.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
s.sendall(struct.pack(">I", 1))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 5, 0))
assert struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))[2] == 1
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations({ca:?})
ctx.load_cert_chain({cert:?}, {key:?})
t = ctx.wrap_socket(s, server_hostname="localhost")
try:
    t.sendall(struct.pack(">QII", 0x49484156454F5054, 3, 0))
    assert t.recv(20) == b"", "a listing came back"
except (ssl.SSLError, ConnectionError):
    pass
"#,
            ca = pki.file("ca-cert.pem").display().to_string(),
            cert = pki.file("outsider-cert.pem").display().to_string(),
            key = pki.file("outsider-key.pem").display().to_string(),
        );
        sh(Command::new("python3").arg("-c").arg(script));
        let log = srv.wait_for_log("UnknownIssuer");
        assert!(log.contains("UnknownIssuer"), "{log}");
    }
    // The good client still gets in.
    sh(Command::new("nbdinfo").arg(with("good")));
}

#[test]
fn garbage_after_starttls_and_stalled_tls_handshakes_are_dropped() {
    for tool in ["nbdinfo", "openssl"] {
        if !have(tool) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = make(dir.path());
    let pki = Pki::new(dir.path());
    let srv = Served::start(
        dir.path(),
        &serve_args(
            dir.path(),
            &idx,
            &pki,
            &[
                "--tls-required",
                "--listen",
                "127.0.0.1:0",
                "--handshake-timeout",
                "2",
                "--max-connections",
                "2",
            ],
        ),
    );
    // Garbage where the TLS ClientHello should be.
    let mut s = raw_client(srv.addr());
    send_option(&mut s, STARTTLS, b"");
    assert_eq!(option_reply(&mut s).1, ACK);
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff]).unwrap();
    s.write_all(&random_bytes(4096, 5)).unwrap();
    assert!(closed(&mut s), "garbage after STARTTLS kept the connection");
    let log = srv.wait_for_log("TLS handshake failed");
    assert!(log.contains("TLS handshake failed"), "{log}");
    // Plain NBD options after STARTTLS are garbage too.
    let mut s = raw_client(srv.addr());
    send_option(&mut s, STARTTLS, b"");
    assert_eq!(option_reply(&mut s).1, ACK);
    send_option(&mut s, 3, b"");
    assert!(
        closed(&mut s),
        "plain text after STARTTLS kept the connection"
    );
    // A client that stops after STARTTLS is closed by the handshake timeout.
    let mut s = raw_client(srv.addr());
    send_option(&mut s, STARTTLS, b"");
    assert_eq!(option_reply(&mut s).1, ACK);
    let started = Instant::now();
    assert!(closed(&mut s), "a stalled TLS handshake was not timed out");
    assert!(started.elapsed() < Duration::from_secs(15));
    srv.wait_for_log("handshake not finished within 2 seconds");
    // Two connections stuck in their TLS handshake hold both slots; a real client
    // takes the place of one.
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let mut s = raw_client(srv.addr());
        send_option(&mut s, STARTTLS, b"");
        assert_eq!(option_reply(&mut s).1, ACK);
        stuck.push(s);
    }
    let uri = format!("{}?tls-certificates={}", srv.uri, pki.client("good"));
    sh(Command::new("nbdinfo").arg(&uri));
    let log = srv.wait_for_log("evicted");
    assert!(log.contains("evicted"), "{log}");
}

#[test]
fn tls_works_on_a_unix_socket() {
    for tool in ["nbdcopy", "openssl"] {
        if !have(tool) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (idx, data) = make(dir.path());
    let pki = Pki::new(dir.path());
    let sock = dir.path().join("nbd.sock");
    let srv = Served::start(
        dir.path(),
        &serve_args(
            dir.path(),
            &idx,
            &pki,
            &["--tls-required", "--unix", sock.to_str().unwrap()],
        ),
    );
    assert!(
        srv.uri.starts_with("nbds+unix:///disk?socket="),
        "{}",
        srv.uri
    );
    let good = format!(
        "{}&tls-certificates={}&tls-hostname=localhost",
        srv.uri,
        pki.client("good")
    );
    assert!(
        nbdcopy(dir.path(), &good, "unix.raw") == data,
        "copy differs"
    );
    let plain = format!("nbd+unix:///disk?socket={}", sock.display());
    fails(Command::new("nbdinfo").arg(&plain));
}

#[test]
fn unusable_credentials_stop_the_server_at_startup_naming_the_file() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = make(dir.path());
    let pki = Pki::new(dir.path());
    let run = |cert: PathBuf, key: PathBuf, ca: Option<PathBuf>| {
        let mut c = tessera();
        c.arg("serve")
            .arg(&idx)
            .arg("--store")
            .arg(dir.path().join("store"))
            .args(["--listen", "127.0.0.1:0", "--tls-cert"])
            .arg(cert)
            .arg("--tls-key")
            .arg(key);
        if let Some(ca) = ca {
            c.arg("--tls-ca").arg(ca);
        }
        fails(&mut c)
    };
    // A key that is not the certificate's.
    let err = run(
        pki.file("server-cert.pem"),
        pki.file("client-key.pem"),
        None,
    );
    assert!(
        err.contains("server-cert.pem") && err.contains("client-key.pem"),
        "{err}"
    );
    // A missing key file, a key where the certificate should be, an empty CA file.
    let err = run(pki.file("server-cert.pem"), pki.file("missing.pem"), None);
    assert!(
        err.contains("missing.pem") && err.contains("No such file"),
        "{err}"
    );
    let err = run(pki.file("server-key.pem"), pki.file("server-key.pem"), None);
    assert!(
        err.contains("server-key.pem") && err.contains("CERTIFICATE"),
        "{err}"
    );
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    let err = run(
        pki.file("server-cert.pem"),
        pki.file("server-key.pem"),
        Some(dir.path().join("empty.pem")),
    );
    assert!(err.contains("empty.pem"), "{err}");
    // --tls-required without credentials is a usage error.
    let out = output(
        tessera()
            .arg("serve")
            .arg(&idx)
            .arg("--store")
            .arg(dir.path().join("store"))
            .arg("--tls-required"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--tls-cert"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn options_negotiated_before_starttls_are_forgotten() {
    for tool in ["python3", "openssl"] {
        if !have(tool) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (idx, data) = make(dir.path());
    let pki = Pki::new(dir.path());
    // TLS optional: structured replies can be negotiated in plain text first.
    let srv = Served::start(
        dir.path(),
        &serve_args(dir.path(), &idx, &pki, &["--listen", "127.0.0.1:0"]),
    );
    let (host, port) = srv.addr().split_once(':').unwrap();
    let script = format!(
        r#"
import socket, ssl, struct
s = socket.create_connection(({host:?}, {port}))
assert s.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
s.sendall(struct.pack(">I", 1))
def option(sock, opt, data=b""):
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)
def replies(sock):
    out = []
    while True:
        h = b""
        while len(h) < 20:
            h += sock.recv(20 - len(h))
        _, o, kind, n = struct.unpack(">QIII", h)
        d = b""
        while len(d) < n:
            d += sock.recv(n - len(d))
        out.append(kind)
        if kind == 1 or kind >= 1 << 31:
            return out
# Structured replies, in plain text (a man in the middle could have sent this).
option(s, 8)
assert replies(s) == [1]
option(s, 5)
assert replies(s) == [1]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations({ca:?})
ctx.load_cert_chain({cert:?}, {key:?})
t = ctx.wrap_socket(s, server_hostname="localhost")
# STARTTLS again: invalid once TLS runs.
option(t, 5)
assert replies(t) == [(1 << 31) + 3]
option(t, 7, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
assert replies(t)[-1] == 1
t.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 4096, 512))
h = b""
while len(h) < 16:
    h += t.recv(16 - len(h))
# A simple reply: the structured replies asked for in plain text were forgotten.
assert struct.unpack(">IIQ", h) == (0x67446698, 0, 7), h
d = b""
while len(d) < 512:
    d += t.recv(512 - len(d))
open({out:?}, "wb").write(d)
"#,
        ca = pki.file("ca-cert.pem").display().to_string(),
        cert = pki.file("client-cert.pem").display().to_string(),
        key = pki.file("client-key.pem").display().to_string(),
        out = dir.path().join("read.bin").display().to_string(),
    );
    sh(Command::new("python3").arg("-c").arg(script));
    let got = std::fs::read(dir.path().join("read.bin")).unwrap();
    assert!(got == data[4096..4096 + 512], "read over TLS differs");
}
