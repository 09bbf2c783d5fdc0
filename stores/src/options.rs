//! Settings shared by every remote store.

use std::path::Path;
use std::time::Duration;

use tessera_engine::{Error, Result};
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey};

/// How stores are opened and how their requests behave. Every field has a default that
/// suits a CDN over a mediocre link; `StoreOptions::default()` is a good start.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Requests worth keeping in flight at once per store ([`StoreRead::in_flight`]):
    /// what the engine's fetch pool runs. Default 32.
    ///
    /// [`StoreRead::in_flight`]: tessera_engine::store::StoreRead::in_flight
    pub jobs: usize,
    /// A request gives up (and is retried) when no byte arrives for this long: a stalled
    /// connection. Default 30 s.
    pub timeout: Duration,
    /// The longest one request may take, from connecting to the last byte of the body,
    /// however steadily bytes arrive: a server trickling a byte at a time cannot hold a
    /// request past it. Not retried (a retry would trickle the same way). It bounds the
    /// upload of a pack (up to 64 MiB) too: raise it on a slow uplink. Default 120 s.
    pub deadline: Duration,
    /// Largest index accepted by URL, in bytes; a larger one (by its Content-Length or by
    /// what arrives) is refused before it is all read. Indexes and their signatures are
    /// kept in memory, never written to disk. Default 256 MiB (about 7.4 million chunks:
    /// some 170 GiB of ext4 image at the default 4K:16K:64K chunks, which average about
    /// 25 KB there; 4× that at 16K:64K:256K).
    pub max_index_size: u64,
    /// Time allowed to connect (TCP and TLS). Default 10 s.
    pub connect_timeout: Duration,
    /// Further attempts after a connection error, a timeout, a 5xx/408/429 answer or a
    /// truncated body; also the engine's further fetches of a chunk that fails
    /// verification ([`StoreRead::retries`]). Default 5.
    ///
    /// [`StoreRead::retries`]: tessera_engine::store::StoreRead::retries
    pub retries: u32,
    /// First pause before a retry; it doubles each time, up to 5 s, with jitter.
    /// Default 100 ms.
    pub backoff: Duration,
    /// S3 settings, used by `s3://` specs.
    pub s3: S3Options,
    /// Headers, TLS roots and client certificate, proxies: how requests reach a server
    /// behind authentication.
    pub http: HttpOptions,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            jobs: 32,
            timeout: Duration::from_secs(30),
            deadline: Duration::from_secs(120),
            max_index_size: 256 << 20,
            connect_timeout: Duration::from_secs(10),
            retries: 5,
            backoff: Duration::from_millis(100),
            s3: S3Options::default(),
            http: HttpOptions::default(),
        }
    }
}

/// Where and how to reach an S3-compatible service. Unset fields come from the usual
/// AWS environment variables; credentials always do (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`; none means anonymous requests,
/// which public buckets answer).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Service URL such as `http://127.0.0.1:9000`. Default: `AWS_ENDPOINT_URL_S3`, then
    /// `AWS_ENDPOINT_URL`, then AWS itself (`https://s3.REGION.amazonaws.com`).
    pub endpoint: Option<String>,
    /// Region used for signing. Default: `AWS_REGION`, then `AWS_DEFAULT_REGION`, then
    /// `us-east-1`.
    pub region: Option<String>,
    /// Address buckets as `ENDPOINT/BUCKET/KEY` rather than `BUCKET.HOST/KEY`. Default:
    /// path style for a custom endpoint (MinIO, moto, Ceph...), virtual-host style for AWS.
    pub path_style: Option<bool>,
}

/// How requests authenticate and reach their server: extra headers (a bearer token, an
/// API key), the TLS roots that server certificates must chain to, a client certificate
/// for servers that verify clients (mTLS), and proxies.
///
/// Headers go to `http(s)://` URLs only, and only to the origin (scheme, host and port)
/// of the URL they were given for: a redirect to another origin gets none of them, nor
/// the `user:password` of the URL. `s3://` requests are signed with AWS credentials and
/// refuse extra headers. TLS settings and proxies apply to every request, S3 included.
/// `Debug` never shows a header's value or a key.
#[derive(Clone)]
pub struct HttpOptions {
    pub(crate) headers: Vec<(String, String)>,
    /// Roots that replace the built-in (Mozilla) ones; empty for the built-in ones.
    pub(crate) roots: Vec<Certificate<'static>>,
    pub(crate) client: Option<ClientCert>,
    pub(crate) proxies: Proxies,
}

impl Default for HttpOptions {
    /// No headers, the built-in roots, no client certificate, and the proxies the
    /// environment names: `https_proxy`/`HTTPS_PROXY` for
    /// `https://` URLs, `http_proxy`/`HTTP_PROXY` for `http://` ones (`HTTP_PROXY` is
    /// ignored when `REQUEST_METHOD` is set: a CGI environment, where a client's `Proxy:`
    /// header would set it), `all_proxy`/`ALL_PROXY` for both, and `no_proxy`/`NO_PROXY`
    /// for hosts reached directly.
    fn default() -> Self {
        HttpOptions {
            headers: Vec::new(),
            roots: Vec::new(),
            client: None,
            proxies: Proxies::from_env(),
        }
    }
}

impl std::fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOptions")
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("roots", &self.roots.len())
            .field("client_cert", &self.client.is_some())
            .field("proxies", &self.proxies)
            .finish()
    }
}

/// Header names tessera sets itself, or that would change how a message is framed or
/// routed: refused in `--header`.
const RESERVED_HEADERS: [&str; 11] = [
    "host",
    "range",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "expect",
    "accept-encoding",
    "cache-control",
    "proxy-authorization",
];

impl HttpOptions {
    /// Adds a request header given as `NAME: VALUE`. `what` names where it came from in
    /// errors (`--header 2`, `FILE line 3`); no error ever shows the value.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a line without `:`, a name that is not an HTTP token,
    /// a value with control characters, or a header tessera sets itself (`Range`,
    /// `Host`, `Cache-Control`...).
    pub fn add_header(&mut self, line: &str, what: &str) -> Result<()> {
        let Some((name, value)) = line.split_once(':') else {
            return Err(Error::InvalidInput(format!(
                "{what}: expected NAME: VALUE (no ':' found)"
            )));
        };
        let name = name.trim();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(Error::InvalidInput(format!(
                "{what}: {:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~ only)",
                name.chars().take(64).collect::<String>()
            )));
        }
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            return Err(Error::InvalidInput(format!(
                "{what}: the {name} header is not allowed (tessera sets it itself, or it would \
                 change how requests are framed or routed; proxy credentials go in the proxy \
                 URL)"
            )));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(Error::InvalidInput(format!(
                "{what}: the value of {name} has a control character (CR, LF, NUL...)"
            )));
        }
        self.headers.push((name.to_string(), value.to_string()));
        Ok(())
    }

    /// Adds the headers of `path`: one `NAME: VALUE` a line; blank lines and lines
    /// starting with `#` are skipped. Keeps secrets off the command line, where every
    /// local user can read them.
    ///
    /// # Errors
    /// A file every user may read (it holds secrets), an unreadable file, or a bad line
    /// (as [`HttpOptions::add_header`], naming the line, never its value).
    pub fn add_header_file(&mut self, path: &Path) -> Result<()> {
        let text = read_secret(path, "header file")?;
        let text = String::from_utf8(text).map_err(|_| {
            Error::InvalidInput(format!("header file {}: not UTF-8 text", path.display()))
        })?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.add_header(
                line,
                &format!("header file {} line {}", path.display(), i + 1),
            )?;
        }
        Ok(())
    }

    /// Whether any header was added.
    pub fn has_headers(&self) -> bool {
        !self.headers.is_empty()
    }

    /// Trusts the CA certificates (PEM, one or more) in `path` as roots. The first call
    /// replaces the built-in (Mozilla) roots: a private CA alone is then trusted. To
    /// trust both, give a bundle that holds the system's roots too (e.g.
    /// `/etc/ssl/certs/ca-certificates.crt`) as another file.
    ///
    /// # Errors
    /// An unreadable file, or one with no PEM certificate.
    pub fn add_ca_file(&mut self, path: &Path) -> Result<()> {
        let pem = std::fs::read(path).map_err(|e| Error::io("reading CA certificates", path, e))?;
        let certs = certificates(&pem, path, "CA certificate file")?;
        let mut store = rustls::RootCertStore::empty();
        for (i, c) in certs.iter().enumerate() {
            store
                .add(rustls::pki_types::CertificateDer::from(c.der()))
                .map_err(|e| {
                    Error::InvalidInput(format!(
                        "CA certificate file {}: certificate {} cannot be a root: {e}",
                        path.display(),
                        i + 1
                    ))
                })?;
        }
        self.roots.extend(certs);
        Ok(())
    }

    /// Presents the certificate chain in `cert` (PEM, leaf first) and the private key in
    /// `key` (PEM: PKCS#8, PKCS#1 or SEC1) to servers that ask for a client certificate.
    ///
    /// # Errors
    /// Unreadable files, a key file every user may read, no certificate, or not exactly
    /// one private key.
    pub fn set_client_identity(&mut self, cert: &Path, key: &Path) -> Result<()> {
        let pem =
            std::fs::read(cert).map_err(|e| Error::io("reading client certificate", cert, e))?;
        let chain = certificates(&pem, cert, "client certificate file")?;
        let key_pem = read_secret(key, "client key")?;
        let mut keys = Vec::new();
        for item in ureq::tls::parse_pem(&key_pem) {
            match item {
                Ok(PemItem::PrivateKey(k)) => keys.push(k),
                Ok(_) => {}
                Err(_) => {
                    return Err(Error::InvalidInput(format!(
                        "client key {}: malformed PEM",
                        key.display()
                    )))
                }
            }
        }
        let key_der: PrivateKey<'static> = match keys.len() {
            1 => keys.pop().expect("one key"),
            n => {
                return Err(Error::InvalidInput(format!(
                    "client key {}: expected one PEM private key (PKCS#8, PKCS#1 or SEC1), \
                     found {n}",
                    key.display()
                )))
            }
        };
        usable_identity(&chain, &key_pem).map_err(|e| {
            Error::InvalidInput(format!(
                "client certificate {} with key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
        self.client = Some(ClientCert::new_with_certs(&chain, key_der));
        Ok(())
    }
}

/// Whether TLS can present `chain` with `key` (a version 3 leaf certificate that this
/// key belongs to), checked as the connection will: ureq panics on one it cannot use.
fn usable_identity(
    chain: &[Certificate<'static>],
    key_pem: &[u8],
) -> std::result::Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key: {e}"))?;
    let chain = chain
        .iter()
        .map(|c| rustls::pki_types::CertificateDer::from(c.der().to_vec()))
        .collect();
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_root_certificates(rustls::RootCertStore::empty())
            .with_client_auth_cert(chain, key)
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// The certificates of a PEM file, at least one.
fn certificates(pem: &[u8], path: &Path, what: &str) -> Result<Vec<Certificate<'static>>> {
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(Error::InvalidInput(format!(
                    "{what} {}: malformed PEM ({e})",
                    path.display()
                )))
            }
        }
    }
    if certs.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads a file that holds secrets, refusing one that every user may read.
fn read_secret(path: &Path, what: &str) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("reading", path, e))?;
    let mode = meta.permissions().mode();
    if meta.is_file() && mode & 0o004 != 0 {
        return Err(Error::InvalidInput(format!(
            "{what} {} is readable by every user (mode {:04o}) although it holds secrets: \
             chmod o-rwx it",
            path.display(),
            mode & 0o7777
        )));
    }
    std::fs::read(path).map_err(|e| Error::io("reading", path, e))
}

/// Proxy URLs from the environment, as given (checked when a request needs one).
/// `Debug` shows them without their credentials.
#[derive(Clone, Default)]
pub(crate) struct Proxies {
    /// (variable, URL) for `http://` URLs.
    pub(crate) http: Option<(String, String)>,
    /// (variable, URL) for `https://` URLs.
    pub(crate) https: Option<(String, String)>,
    /// `NO_PROXY`'s entries, lower case.
    pub(crate) no_proxy: Vec<String>,
}

impl std::fmt::Debug for Proxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |p: &Option<(String, String)>| {
            p.as_ref()
                .map(|(var, url)| format!("{var}={}", crate::redact(url)))
        };
        f.debug_struct("Proxies")
            .field("http", &shown(&self.http))
            .field("https", &shown(&self.https))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl Proxies {
    fn from_env() -> Proxies {
        let var = |names: &[&str]| {
            names.iter().find_map(|n| {
                std::env::var(n)
                    .ok()
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (n.to_string(), v.trim().to_string()))
            })
        };
        let cgi = std::env::var_os("REQUEST_METHOD").is_some();
        let http_names: &[&str] = if cgi {
            &["http_proxy", "all_proxy", "ALL_PROXY"]
        } else {
            &["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        };
        Proxies {
            http: var(http_names),
            https: var(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]),
            no_proxy: var(&["no_proxy", "NO_PROXY"])
                .map(|(_, v)| {
                    v.split([',', ' '])
                        .map(|e| e.trim().to_ascii_lowercase())
                        .filter(|e| !e.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Whether `host` (lower case, IPv6 without brackets) is reached directly: an entry
    /// `*`, the host itself, a domain it is under (`example.com` or `.example.com`), or
    /// an IP network (`10.0.0.0/8`) holding it. An entry's `:PORT` is ignored.
    pub(crate) fn bypass(&self, host: &str) -> bool {
        let ip: Option<std::net::IpAddr> = host.parse().ok();
        self.no_proxy.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let entry = entry.trim_start_matches("*.").trim_start_matches('.');
            let entry = strip_port(entry);
            if let (Some(ip), Some((net, bits))) = (ip, entry.split_once('/')) {
                return in_network(ip, net, bits);
            }
            let entry = entry.trim_start_matches('[').trim_end_matches(']');
            host == entry || host.strip_suffix(entry).is_some_and(|h| h.ends_with('.'))
        })
    }
}

/// `host:port` without the port (an IPv6 address in brackets keeps its colons).
fn strip_port(entry: &str) -> &str {
    if entry.starts_with('[') {
        return entry.find(']').map_or(entry, |i| &entry[..=i]);
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => entry,
    }
}

/// Whether `ip` is in the network `net`/`bits`.
fn in_network(ip: std::net::IpAddr, net: &str, bits: &str) -> bool {
    use std::net::IpAddr;
    let Ok(bits) = bits.parse::<u32>() else {
        return false;
    };
    match (ip, net.parse::<IpAddr>()) {
        (IpAddr::V4(a), Ok(IpAddr::V4(n))) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), Ok(IpAddr::V6(n))) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(no_proxy: &[&str]) -> Proxies {
        Proxies {
            no_proxy: no_proxy.iter().map(|s| s.to_string()).collect(),
            ..Proxies::default()
        }
    }

    #[test]
    fn no_proxy_matches_hosts_domains_and_networks() {
        let p = proxies(&[
            "example.com",
            ".internal",
            "10.0.0.0/8",
            "[::1]",
            "cdn.net:443",
        ]);
        for host in [
            "example.com",
            "a.example.com",
            "x.internal",
            "10.2.3.4",
            "::1",
            "cdn.net",
        ] {
            assert!(p.bypass(host), "{host}");
        }
        for host in [
            "notexample.com",
            "internal.org",
            "11.0.0.1",
            "127.0.0.1",
            "cdn.network",
        ] {
            assert!(!p.bypass(host), "{host}");
        }
        assert!(proxies(&["*"]).bypass("anything"));
        let with_secret = Proxies {
            https: Some(("HTTPS_PROXY".into(), "http://u:s3cr3t@proxy:3128".into())),
            ..Proxies::default()
        };
        let shown = format!("{with_secret:?}");
        assert!(shown.contains("HTTPS_PROXY=http://***@proxy:3128") && !shown.contains("s3cr3t"));
        assert!(!proxies(&[]).bypass("anything"));
    }

    #[test]
    fn headers_are_checked_and_never_echo_their_value() {
        let mut h = HttpOptions::default();
        h.add_header("Authorization: Bearer s3cr3t", "--header 1")
            .unwrap();
        h.add_header("X-Empty:", "--header 2").unwrap();
        assert_eq!(
            h.headers[0],
            ("Authorization".into(), "Bearer s3cr3t".into())
        );
        assert!(!format!("{h:?}").contains("s3cr3t"));
        for bad in [
            "no colon s3cr3t",
            "Bad Name: s3cr3t",
            "Range: s3cr3t",
            "host: s3cr3t",
            "X-A: s3cr3t\r\nX-B: y",
            ": s3cr3t",
        ] {
            let e = h.add_header(bad, "--header 3").unwrap_err().to_string();
            assert!(
                e.contains("--header 3") && !e.contains("s3cr3t"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn a_secret_file_readable_by_everyone_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("headers");
        std::fs::write(
            &f,
            "# token\n\nAuthorization: Bearer s3cr3t\r\nX-Fleet: a\n",
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut h = HttpOptions::default();
        let e = h.add_header_file(&f).unwrap_err().to_string();
        assert!(
            e.contains("readable by every user") && e.contains("0644"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        h.add_header_file(&f).unwrap();
        assert_eq!(h.headers.len(), 2);
        assert_eq!(h.headers[1], ("X-Fleet".into(), "a".into()));
        std::fs::write(&f, "X-Ok: 1\nbroken s3cr3t\n").unwrap();
        let e = h.add_header_file(&f).unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("s3cr3t"), "{e}");
    }
}
