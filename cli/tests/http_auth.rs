//! HTTP as fleets deploy it, through the real binary against real nginx: Basic
//! authentication (user:password in the URL), a bearer token (--header, --header-file),
//! TLS with a private CA (--ca-cert), client certificates (--client-cert/--client-key),
//! and proxies (HTTP_PROXY/HTTPS_PROXY/NO_PROXY). A wrong or missing credential is one
//! request and a clear error naming the URL (never the secret) and the status.

mod remote_support;
mod util;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use remote_support::*;
use tempfile::TempDir;
use util::*;

const PASSWORD: &str = "s3cr3t-p@ss";
const TOKEN: &str = "tok-9f8e7d6c5b4a";

/// An image and its store (index inside, so nginx serves both).
struct Published {
    dir: TempDir,
    image: PathBuf,
    store: PathBuf,
}

fn publish() -> Published {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("image.raw");
    fs::write(&image, random_bytes(1_500_000, 7)).unwrap();
    let store = dir.path().join("store");
    run_ok(&[
        &"make",
        &image,
        &"--store",
        &store,
        &"--index",
        &store.join("image.tidx"),
    ]);
    Published { dir, image, store }
}

/// `tessera ARGS` with no proxy variables but those in `env`.
fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tessera();
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.args(args).envs(env.iter().copied()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "tessera panicked: {stderr}");
    out
}

fn ok(args: &[&str], env: &[(&str, &str)]) {
    let out = run_env(args, env);
    assert!(
        out.status.success(),
        "tessera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command that must fail; its stderr.
fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_env(args, env);
    assert!(!out.status.success(), "tessera {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

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

fn private(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn basic_auth_in_the_url_is_sent_and_never_shown() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish();
    let nginx = Nginx::start_with(&p.store, "", |dir| {
        let hash = Command::new("openssl")
            .args(["passwd", "-apr1", PASSWORD])
            .output()
            .unwrap();
        assert!(hash.status.success());
        let line = format!("fleet:{}", String::from_utf8(hash.stdout).unwrap().trim());
        fs::write(dir.join("htpasswd"), line).unwrap();
        format!(
            "auth_basic \"tessera\"; auth_basic_user_file {};",
            dir.join("htpasswd").display()
        )
    });
    let port = nginx.port;
    // '@' percent-encoded, as RFC 3986 wants in a password.
    let base = format!("http://fleet:s3cr3t-p%40ss@127.0.0.1:{port}");
    let target = p.dir.path().join("out.raw");
    let (index, store) = (format!("{base}/image.tidx"), format!("{base}/"));
    let t = target.to_str().unwrap();
    ok(&["sync", &index, t, "--store", &store], &[]);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());

    // A wrong password: one request, refused, the URL named without the secret.
    let before = nginx.requests().len();
    let wrong = format!("http://fleet:wrong-{PASSWORD}@127.0.0.1:{port}");
    let err = fails(
        &["sync", &format!("{wrong}/image.tidx"), t, "--store", &wrong],
        &[],
    );
    assert!(
        err.contains(&format!("http://***@127.0.0.1:{port}/image.tidx"))
            && err.contains("HTTP 401")
            && err.contains("the credentials sent were refused"),
        "{err}"
    );
    assert!(!err.contains(PASSWORD) && !err.contains("s3cr3t"), "{err}");
    assert_eq!(
        nginx.requests().len() - before,
        1,
        "one request, no retries"
    );

    // No credentials: told so, one request.
    let before = nginx.requests().len();
    let bare = format!("http://127.0.0.1:{port}");
    let err = fails(
        &["sync", &format!("{bare}/image.tidx"), t, "--store", &bare],
        &[],
    );
    assert!(
        err.contains("HTTP 401") && err.contains("no credentials were sent"),
        "{err}"
    );
    assert_eq!(nginx.requests().len() - before, 1);

    // A local index and a protected store: the store's refusal names the store's URL,
    // after one request (the location file), not one per chunk.
    let before = nginx.requests().len();
    let local_index = p.store.join("image.tidx");
    let err = fails(
        &["sync", local_index.to_str().unwrap(), t, "--store", &wrong],
        &[],
    );
    assert!(
        err.contains(&format!("http://***@127.0.0.1:{port}/locations/")) && err.contains("401"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t"), "{err}");
    assert_eq!(nginx.requests().len() - before, 1);
}

#[test]
fn a_bearer_token_from_a_header_file_or_flag() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish();
    let nginx = Nginx::start_with(&p.store, "", |_| {
        format!("if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401; }}")
    });
    let url = nginx.url();
    let index = format!("{url}/image.tidx");
    let target = p.dir.path().join("out.raw");
    let t = target.to_str().unwrap();
    let headers = p.dir.path().join("headers");
    fs::write(
        &headers,
        format!("# fleet token\nAuthorization: Bearer {TOKEN}\nX-Fleet-Device: d1\n"),
    )
    .unwrap();
    private(&headers);
    let hf = headers.to_str().unwrap();
    ok(
        &["sync", &index, t, "--store", &url, "--header-file", hf],
        &[],
    );
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    fs::remove_file(&target).unwrap();
    let header = format!("Authorization: Bearer {TOKEN}");
    ok(
        &["sync", &index, t, "--store", &url, "--header", &header],
        &[],
    );
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());

    // A wrong token: one request, the status and URL, never the token.
    let before = nginx.requests().len();
    let wrong = format!("Authorization: Bearer not-{TOKEN}");
    let err = fails(
        &["sync", &index, t, "--store", &url, "--header", &wrong],
        &[],
    );
    assert!(
        err.contains(&index) && err.contains("HTTP 401 Unauthorized"),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "{err}");
    assert_eq!(nginx.requests().len() - before, 1, "one request");

    // A header file every user can read is refused before any request.
    fs::set_permissions(&headers, fs::Permissions::from_mode(0o644)).unwrap();
    let before = nginx.requests().len();
    let err = fails(
        &["sync", &index, t, "--store", &url, "--header-file", hf],
        &[],
    );
    assert!(
        err.contains("readable by every user") && err.contains(hf),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "{err}");
    assert_eq!(nginx.requests().len(), before);
    // A malformed header names itself, not its value.
    let err = fails(
        &[
            "sync",
            &index,
            t,
            "--store",
            &url,
            "--header",
            &format!("Bad Name {TOKEN}"),
        ],
        &[],
    );
    assert!(err.contains("--header 1") && !err.contains(TOKEN), "{err}");
    // Headers do not go to S3, which signs its requests: refused, not ignored.
    let err = fails(
        &[
            "sync", &index, t, "--store", "s3://b/p", "--header", &header,
        ],
        &[],
    );
    assert!(err.contains("apply to http(s):// URLs only"), "{err}");
}

/// Certificates for a private CA, a server at 127.0.0.1 and a client, made with openssl.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for ca in ["ca", "client-ca", "other-ca"] {
            let subj = format!("/CN=tessera test {ca}");
            let (key, crt) = (format!("{ca}.key"), format!("{ca}.pem"));
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
            openssl(d, &args);
        }
        fs::write(d.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, ca, subj) in [
            ("server", "ca", "/CN=127.0.0.1"),
            ("client", "client-ca", "/CN=device-1"),
            ("rogue", "other-ca", "/CN=device-2"),
        ] {
            let (key, csr, crt) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", subj]);
            openssl(d, &args);
            let (ca_crt, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            let ext = if name == "server" {
                "server.ext"
            } else {
                "client.ext"
            };
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &ca_crt,
                    "-CAkey",
                    &ca_key,
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-set_serial",
                    "7",
                    "-extfile",
                    ext,
                ],
            );
            private(&d.join(&key));
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

#[test]
fn tls_with_a_private_ca_and_client_certificates() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish();
    let pki = Pki::new();
    let nginx = Nginx::start_with(&p.store, "ssl", |_| {
        format!(
            "ssl_certificate {}; ssl_certificate_key {}; ssl_client_certificate {}; \
             ssl_verify_client on;",
            pki.path("server.pem"),
            pki.path("server.key"),
            pki.path("client-ca.pem")
        )
    });
    let url = format!("https://127.0.0.1:{}", nginx.port);
    let index = format!("{url}/image.tidx");
    let target = p.dir.path().join("out.raw");
    let t = target.to_str().unwrap();
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    ok(
        &[
            "sync",
            &index,
            t,
            "--store",
            &url,
            "--ca-cert",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ],
        &[],
    );
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());

    // The built-in roots do not know the private CA: a TLS failure, not retried.
    let err = fails(&["sync", &index, t, "--store", &url], &[]);
    assert!(
        err.contains(&index) && err.contains("TLS failure") && err.contains("--ca-cert"),
        "{err}"
    );
    assert!(!err.contains("gave up after"), "not retried: {err}");
    // The CA, no client certificate: nginx's 400, one request, with what to give.
    let before = nginx.requests().len();
    let err = fails(&["sync", &index, t, "--store", &url, "--ca-cert", &ca], &[]);
    assert!(
        err.contains(&index) && err.contains("HTTP 400") && err.contains("--client-cert"),
        "{err}"
    );
    assert_eq!(nginx.requests().len() - before, 1);
    // A certificate from a CA nginx does not trust: refused, once.
    let before = nginx.requests().len();
    let (rogue, rogue_key) = (pki.path("rogue.pem"), pki.path("rogue.key"));
    let err = fails(
        &[
            "sync",
            &index,
            t,
            "--store",
            &url,
            "--ca-cert",
            &ca,
            "--client-cert",
            &rogue,
            "--client-key",
            &rogue_key,
        ],
        &[],
    );
    assert!(err.contains(&index) && err.contains("HTTP 400"), "{err}");
    assert!(nginx.requests().len() - before <= 1, "at most one request");
    // A key file every user can read is refused; a key without its certificate too.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(
        &[
            "sync",
            &index,
            t,
            "--store",
            &url,
            "--ca-cert",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
        ],
        &[],
    );
    assert!(
        err.contains("readable by every user") && err.contains(&key),
        "{err}"
    );
    let err = fails(
        &["sync", &index, t, "--store", &url, "--client-key", &key],
        &[],
    );
    assert!(err.contains("--client-cert"), "{err}");
    // A key that is not the certificate's: refused when loaded (ureq would panic).
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let err = fails(
        &[
            "sync",
            &index,
            t,
            "--store",
            &url,
            "--ca-cert",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &rogue_key,
        ],
        &[],
    );
    assert!(
        err.contains("client certificate") && err.contains(&cert),
        "{err}"
    );
    // Not a certificate.
    let err = fails(
        &["sync", &index, t, "--store", &url, "--ca-cert", &key],
        &[],
    );
    assert!(
        err.contains("no PEM certificate") && err.contains(&key),
        "{err}"
    );
}

/// A CONNECT proxy that logs the targets it was asked for.
struct ConnectProxy {
    port: u16,
    targets: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let targets = Arc::new(Mutex::new(Vec::new()));
        let seen = targets.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let _ = tunnel(conn, &seen);
                });
            }
        });
        ConnectProxy { port, targets }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

fn tunnel(client: TcpStream, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let mut client = client;
    let target = match first.strip_prefix("CONNECT ") {
        Some(rest) => rest.split_whitespace().next().unwrap_or("").to_string(),
        None => {
            client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(());
        }
    };
    seen.lock().unwrap().push(target.clone());
    let upstream = TcpStream::connect(&target)?;
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    let (mut up_r, mut up_w) = (upstream.try_clone()?, upstream);
    let mut client_w = client;
    let pump = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_r, &mut client_w);
    });
    let mut buffered = reader.buffer().to_vec();
    up_w.write_all(&buffered)?;
    buffered.clear();
    let mut rest = reader.into_inner();
    let mut buf = [0u8; 16384];
    loop {
        match rest.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => up_w.write_all(&buf[..n])?,
        }
    }
    let _ = up_w.shutdown(std::net::Shutdown::Both);
    let _ = pump.join();
    Ok(())
}

#[test]
fn proxies_from_the_environment_and_no_proxy() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish();
    let nginx = Nginx::start_with(&p.store, "", |_| String::new());
    let proxy = ConnectProxy::start();
    let url = nginx.url();
    let index = format!("{url}/image.tidx");
    let target = p.dir.path().join("out.raw");
    let t = target.to_str().unwrap();
    let upstream = format!("127.0.0.1:{}", nginx.port);
    let purl = proxy.url();

    ok(
        &["sync", &index, t, "--store", &url],
        &[("HTTP_PROXY", &purl)],
    );
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    let seen = proxy.targets();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| *s == upstream),
        "{seen:?}"
    );

    // NO_PROXY naming the host: straight to nginx.
    fs::remove_file(&target).unwrap();
    let n = proxy.targets().len();
    ok(
        &["sync", &index, t, "--store", &url],
        &[("HTTP_PROXY", &purl), ("NO_PROXY", "localhost,127.0.0.0/8")],
    );
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    assert_eq!(proxy.targets().len(), n, "NO_PROXY matched: no CONNECT");

    // HTTPS_PROXY is for https:// URLs only: an http:// store goes direct.
    ok(
        &["sync", &index, t, "--store", &url],
        &[("HTTPS_PROXY", &purl)],
    );
    assert_eq!(proxy.targets().len(), n);

    // A proxy that is not there: a clear error naming the URL asked.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let err = fails(
        &["sync", &index, t, "--store", &url, "--retries", "0"],
        &[("HTTP_PROXY", &dead)],
    );
    assert!(
        err.contains(&index) && err.contains(&format!("through proxy {dead} (from HTTP_PROXY)")),
        "{err}"
    );
    // An unsupported proxy scheme is refused, naming the variable.
    let err = fails(
        &["sync", &index, t, "--store", &url],
        &[("http_proxy", "socks5://127.0.0.1:1")],
    );
    assert!(
        err.contains("http_proxy=socks5://127.0.0.1:1")
            && err.contains("only http:// and https://"),
        "{err}"
    );
}

#[test]
fn https_through_a_proxy_keeps_end_to_end_tls() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish();
    let pki = Pki::new();
    let nginx = Nginx::start_with(&p.store, "ssl", |_| {
        format!(
            "ssl_certificate {}; ssl_certificate_key {};",
            pki.path("server.pem"),
            pki.path("server.key")
        )
    });
    let proxy = ConnectProxy::start();
    let url = format!("https://127.0.0.1:{}", nginx.port);
    let index = format!("{url}/image.tidx");
    let target = p.dir.path().join("out.raw");
    let t = target.to_str().unwrap();
    let ca = pki.path("ca.pem");
    ok(
        &["sync", &index, t, "--store", &url, "--ca-cert", &ca],
        &[
            ("HTTPS_PROXY", &proxy.url()),
            ("HTTP_PROXY", "http://127.0.0.1:1"),
        ],
    );
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    let seen = proxy.targets();
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|s| *s == format!("127.0.0.1:{}", nginx.port)),
        "{seen:?}"
    );
}
