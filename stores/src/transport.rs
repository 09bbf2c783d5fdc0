//! HTTP requests with timeouts, connection reuse and retries: the one place that decides
//! which failures are worth another attempt.
//!
//! Retried: connection errors (refused, reset, closed early), timeouts (a stalled
//! connection or a slow exchange), truncated bodies, and the answers 408, 429 and 5xx.
//! Not retried: 404/410 (the caller turns it into "missing"), other 4xx (a wrong URL,
//! bucket or credentials will not heal), malformed URLs and TLS certificate failures.
//! Pauses double from [`StoreOptions::backoff`] up to 5 s, with jitter so that many
//! workers do not hammer a recovering server in step.
//!
//! Every request has two clocks: [`StoreOptions::timeout`] without a byte (retried) and
//! [`StoreOptions::deadline`] for the whole exchange, redirects and body included (not
//! retried: a server trickling bytes would trickle again). Bodies are bounded by the
//! caller's limit, by Content-Length before reading and by what arrives while reading.
//! Redirects are followed to http(s) URLs only, and never from https to plain http.
//!
//! Ranged GETs ([`Transport::get_range`]) send `Range: bytes=A-B` and accept only a 206
//! whose `Content-Range` is exactly the range asked, with a body of exactly that length
//! (cut off there). A server that ignores `Range` and answers 200 with the whole file is
//! refused before its body is read (unless the file is exactly the range asked): a store
//! of 64 MiB packs must never cost a whole pack per chunk.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_engine::Error;
use ureq::Agent;

use crate::options::Proxies;
use crate::StoreOptions;

/// One attempt's failure.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another attempt.
    Retry(String),
    /// Will not get better.
    Fatal(String),
    /// The server or proxy refuses us (credentials, TLS trust): will not get better, and
    /// told apart (as an I/O error of kind `PermissionDenied`) so that a fetcher does not
    /// try again chunk by chunk.
    Refused(String),
    /// The body is over the caller's limit: fatal, and told apart (as an I/O error of kind
    /// `FileTooLarge`) so callers can name the limit's setting.
    TooLarge(String),
}

impl Failure {
    /// The same failure with its message changed by `f`.
    fn map(self, f: impl FnOnce(String) -> String) -> Failure {
        match self {
            Failure::Retry(m) => Failure::Retry(f(m)),
            Failure::Fatal(m) => Failure::Fatal(f(m)),
            Failure::Refused(m) => Failure::Refused(f(m)),
            Failure::TooLarge(m) => Failure::TooLarge(f(m)),
        }
    }
}

/// What a GET found.
pub(crate) enum Got {
    /// The body: the whole file (200), or the range asked (206).
    Body(Vec<u8>),
    /// 404 or 410.
    NotFound,
}

/// Shared HTTP agents (connection pools: one direct, one per proxy), what requests
/// carry (headers, TLS identity) and the retry policy.
#[derive(Debug)]
pub(crate) struct Transport {
    direct: Agent,
    /// The agent for `http://` URLs through `HTTP_PROXY` and what messages call that
    /// proxy, or why it cannot be used.
    http_proxy: Option<Result<(Agent, String), String>>,
    /// The same for `https://` URLs through `HTTPS_PROXY`.
    https_proxy: Option<Result<(Agent, String), String>>,
    proxies: Proxies,
    /// Extra headers, for the origin of the URL asked only.
    headers: Vec<(String, String)>,
    client_cert: bool,
    /// Requests go to S3 (signed with AWS credentials, not ours).
    s3: bool,
    retries: u32,
    backoff: Duration,
    deadline: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Transport {
    pub(crate) fn new(opts: &StoreOptions) -> Transport {
        let proxied = |p: &Option<(String, String)>| {
            p.as_ref().map(|(var, url)| {
                proxy(var, url).map(|proxy| {
                    let shown = format!("proxy {} (from {var})", redact(url));
                    (agent(opts, Some(proxy)), shown)
                })
            })
        };
        Transport {
            direct: agent(opts, None),
            http_proxy: proxied(&opts.http.proxies.http),
            https_proxy: proxied(&opts.http.proxies.https),
            proxies: opts.http.proxies.clone(),
            headers: opts.http.headers.clone(),
            client_cert: opts.http.client.is_some(),
            s3: false,
            retries: opts.retries,
            backoff: opts.backoff,
            deadline: opts.deadline,
        }
    }

    /// The same, for requests to S3: a refusal points at the AWS credentials.
    pub(crate) fn s3(mut self) -> Transport {
        self.s3 = true;
        self
    }

    /// The agent that reaches `url`: through the proxy its scheme has (then also what
    /// messages call it), unless `NO_PROXY` names its host.
    fn agent_for(&self, url: &str) -> Result<(&Agent, Option<&str>), Failure> {
        let proxy = if url.starts_with("https://") {
            &self.https_proxy
        } else {
            &self.http_proxy
        };
        match proxy {
            Some(_) if self.proxies.bypass(&host_of(url)) => Ok((&self.direct, None)),
            Some(Ok((agent, shown))) => Ok((agent, Some(shown))),
            Some(Err(why)) => Err(Failure::Fatal(why.clone())),
            None => Ok((&self.direct, None)),
        }
    }

    /// Sleeps before retry number `attempt` (1-based).
    fn pause(&self, attempt: u32) {
        let base = self
            .backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        // Up to +50 % jitter, from the clock: no RNG dependency for this.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 2000.0);
        std::thread::sleep(base + jitter);
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries run out.
    pub(crate) fn retrying<T>(
        &self,
        what: &'static str,
        url: &str,
        mut attempt: impl FnMut(u32) -> Result<T, Failure>,
    ) -> Result<T, Error> {
        let mut n = 0;
        loop {
            match attempt(n) {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(msg)) => return Err(remote_error(what, url, msg)),
                Err(Failure::Refused(msg)) => {
                    let source = io::Error::new(io::ErrorKind::PermissionDenied, msg);
                    return Err(Error::remote_io(what, PathBuf::from(url), source));
                }
                Err(Failure::TooLarge(msg)) => {
                    let source = io::Error::new(io::ErrorKind::FileTooLarge, msg);
                    return Err(Error::remote_io(what, PathBuf::from(url), source));
                }
                Err(Failure::Retry(msg)) if n >= self.retries => {
                    let msg = format!("{msg} (gave up after {} attempts)", n + 1);
                    return Err(remote_error(what, url, msg));
                }
                Err(Failure::Retry(_)) => {
                    n += 1;
                    self.pause(n);
                }
            }
        }
    }

    /// GETs `url` with retries; bodies over `limit` bytes are refused. `shown` is what
    /// errors name (an S3 URL is signed; its signature is never shown).
    pub(crate) fn get(
        &self,
        what: &'static str,
        shown: &str,
        url: &str,
        limit: u64,
    ) -> Result<Got, Error> {
        self.retrying(what, shown, |_| self.get_once(url, limit))
    }

    /// Sends a GET (or a HEAD) to `url` with the `range` header if given, following up to
    /// [`MAX_REDIRECTS`] redirects to http(s) URLs only, never from https to http, all
    /// within one deadline. The URL's `user:password` (as Basic authorization) and the
    /// extra headers go to the URL's own origin only. An answer 401, 403 or 407 is a
    /// refusal, returned here with what was sent.
    fn call(
        &self,
        head: bool,
        url: &str,
        fresh: bool,
        range: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let started = Instant::now();
        let (mut current, basic) = split_credentials(url).map_err(Failure::Fatal)?;
        let home = origin(&current);
        for _ in 0..=MAX_REDIRECTS {
            let left = self
                .deadline
                .checked_sub(started.elapsed())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| self.past_deadline())?;
            let (agent, via) = self.agent_for(&current)?;
            let mut req = if head {
                agent.head(&current)
            } else {
                agent.get(&current)
            }
            .config()
            .timeout_global(Some(left))
            .build();
            let at_home = origin(&current) == home;
            // Whether anything that may be a credential was sent.
            let mut credentials = false;
            if at_home {
                for (name, value) in &self.headers {
                    req = req.header(name, value);
                    credentials = true;
                }
                let authorization = self
                    .headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("authorization"));
                if let Some(b) = basic.as_ref().filter(|_| !authorization) {
                    req = req.header("authorization", b);
                    credentials = true;
                }
            }
            if fresh && !head {
                req = req.header("cache-control", "no-cache");
            }
            if let Some(r) = range {
                req = req.header("range", r);
            }
            let resp = req.call().map_err(|e| match via {
                Some(proxy) => self.classify(e).map(|m| format!("through {proxy}: {m}")),
                None => self.classify(e),
            })?;
            let status = resp.status().as_u16();
            if let Some(refusal) = self.refusal(status, &current, credentials) {
                return Err(refusal);
            }
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    Failure::Fatal(format!("HTTP {} without a Location", resp.status()))
                })?;
            current = redirect_target(&current, location).map_err(Failure::Fatal)?;
            // Credentials in a Location are dropped, never sent or shown.
            current = split_credentials(&current).map_err(Failure::Fatal)?.0;
        }
        Err(Failure::Fatal(format!(
            "more than {MAX_REDIRECTS} redirects (last to {})",
            redact(&current)
        )))
    }

    /// The failure for an answer that refuses the request (401, 403, 407; a 400 on https
    /// without a client certificate, which is how nginx refuses a client that sent none),
    /// saying what was sent. `None` for any other status.
    fn refusal(&self, status: u16, url: &str, credentials: bool) -> Option<Failure> {
        if self.s3 && matches!(status, 401 | 403) {
            return Some(Failure::Refused(format!(
                "HTTP {status} (refused by the S3 service: check AWS_ACCESS_KEY_ID, \
                 AWS_SECRET_ACCESS_KEY and the bucket's policy; without ListBucket permission \
                 S3 answers 403 for a missing key too)"
            )));
        }
        let sent = if credentials {
            "the credentials sent were refused"
        } else {
            "no credentials were sent: give them with --header, --header-file or \
             user:password in the URL"
        };
        let why = match status {
            401 => format!("HTTP 401 Unauthorized ({sent})"),
            403 => format!("HTTP 403 Forbidden ({sent}, or the server refuses this path)"),
            407 => "HTTP 407 Proxy Authentication Required (give the proxy's credentials in \
                    its URL: http://USER:PASSWORD@PROXY:PORT)"
                .to_string(),
            400 if url.starts_with("https://") && !self.client_cert => "HTTP 400 Bad Request \
                 (a server that requires a client certificate answers so when none is \
                 presented: --client-cert and --client-key)"
                .to_string(),
            _ => return None,
        };
        Some(Failure::Refused(why))
    }

    fn past_deadline(&self) -> Failure {
        Failure::Fatal(format!(
            "did not complete within the {} s deadline for one request (the server is too \
             slow or trickling bytes; raise the deadline if the link is just slow)",
            self.deadline.as_secs_f64()
        ))
    }

    /// One GET.
    pub(crate) fn get_once(&self, url: &str, limit: u64) -> Result<Got, Failure> {
        let mut resp = self.call(false, url, false, None)?;
        let status = resp.status().as_u16();
        match status {
            200 => {}
            404 | 410 => return Ok(Got::NotFound),
            _ => return Err(status_failure(status, resp.status().canonical_reason())),
        }
        self.read_body(&mut resp, limit).map(Got::Body)
    }

    /// Reads a body of at most `limit` bytes, refusing a larger one by its Content-Length
    /// before reading and by what arrives while reading; a body shorter than its
    /// Content-Length is a truncation (retried).
    fn read_body(
        &self,
        resp: &mut ureq::http::Response<ureq::Body>,
        limit: u64,
    ) -> Result<Vec<u8>, Failure> {
        let declared = content_length(resp);
        if let Some(n) = declared.filter(|&n| n > limit) {
            return Err(Failure::TooLarge(format!(
                "the body is {n} bytes, more than the {limit} bytes allowed"
            )));
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => {
                    Failure::TooLarge(format!("the body is more than the {limit} bytes allowed"))
                }
                e => match self.classify(e) {
                    Failure::Retry(m) => Failure::Retry(format!("reading the body: {m}")),
                    Failure::Fatal(m) => Failure::Fatal(format!("reading the body: {m}")),
                    Failure::Refused(m) => Failure::Refused(m),
                    Failure::TooLarge(m) => Failure::TooLarge(m),
                },
            })?;
        if let Some(n) = declared.filter(|&n| n != body.len() as u64) {
            return Err(Failure::Retry(format!(
                "truncated body: {} of {n} bytes",
                body.len()
            )));
        }
        Ok(body)
    }

    /// GETs exactly `len` bytes at `offset` of `url` with retries (`None` for a 404).
    /// `shown` is what errors name; `fresh` asks caches on the way (CDNs, proxies) to
    /// revalidate, for a re-fetch after bad bytes.
    pub(crate) fn get_range(
        &self,
        shown: &str,
        url: &str,
        offset: u64,
        len: u64,
        fresh: bool,
    ) -> Result<Option<Vec<u8>>, Error> {
        if len == 0 {
            return Ok(Some(Vec::new()));
        }
        let Some(last) = offset.checked_add(len - 1) else {
            return Err(Error::InvalidInput(format!(
                "{shown}: a range of {len} bytes at offset {offset} is past any file"
            )));
        };
        match self.retrying("fetching", shown, |_| {
            self.get_range_once(url, offset, last, fresh)
        })? {
            Got::Body(b) => Ok(Some(b)),
            Got::NotFound => Ok(None),
        }
    }

    /// One ranged GET of bytes `first..=last`.
    pub(crate) fn get_range_once(
        &self,
        url: &str,
        first: u64,
        last: u64,
        fresh: bool,
    ) -> Result<Got, Failure> {
        let len = last - first + 1;
        let mut resp = self.call(false, url, fresh, Some(&format!("bytes={first}-{last}")))?;
        let status = resp.status().as_u16();
        match status {
            206 => {
                let header = resp
                    .headers()
                    .get("content-range")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                let Some(header) = header else {
                    return Err(Failure::Fatal(format!(
                        "HTTP 206 without a Content-Range for bytes {first}-{last}"
                    )));
                };
                if content_range(&header) != Some((first, last)) {
                    return Err(Failure::Fatal(format!(
                        "asked for bytes {first}-{last}, the server answered Content-Range \
                         {header:?}"
                    )));
                }
            }
            // The whole file: right only when the file is exactly the range asked. Its
            // body is not read otherwise.
            200 if first == 0 && content_length(&resp) == Some(len) => {}
            200 => {
                return Err(Failure::Fatal(format!(
                    "asked for bytes {first}-{last}, the server answered 200 with the whole \
                     file{}: the server must support HTTP Range requests (nginx, Apache, \
                     S3 and CDNs do; check that no proxy on the way strips them)",
                    content_length(&resp).map_or(String::new(), |n| format!(" ({n} bytes)"))
                )))
            }
            404 | 410 => return Ok(Got::NotFound),
            416 => {
                return Err(Failure::Fatal(format!(
                    "asked for bytes {first}-{last}, past the end of the file (HTTP 416)"
                )))
            }
            _ => return Err(status_failure(status, resp.status().canonical_reason())),
        }
        let body = self.read_body(&mut resp, len)?;
        if body.len() as u64 != len {
            return Err(Failure::Retry(format!(
                "truncated body: {} of the {len} bytes asked",
                body.len()
            )));
        }
        Ok(Got::Body(body))
    }

    /// HEAD with retries: the file's size, `None` for a 404.
    pub(crate) fn size(&self, shown: &str, url: &str) -> Result<Option<u64>, Error> {
        self.retrying("checking", shown, |_| {
            let resp = self.call(true, url, false, None)?;
            match resp.status().as_u16() {
                200 => content_length(&resp).map(Some).ok_or_else(|| {
                    Failure::Fatal("HTTP 200 to a HEAD request without a Content-Length".into())
                }),
                404 | 410 => Ok(None),
                s => Err(status_failure(s, resp.status().canonical_reason())),
            }
        })
    }

    /// PUT with retries. `shown` is what errors name (`url` may be signed).
    /// DELETEs `url` (S3; for prune); an object already gone (404) is not an error.
    pub(crate) fn delete(&self, shown: &str, url: &str) -> Result<(), Error> {
        self.retrying("deleting", shown, |_| {
            let mut resp = self
                .agent_for(url)?
                .0
                .delete(url)
                .call()
                .map_err(|e| self.classify(e))?;
            let status = resp.status().as_u16();
            let _ = resp.body_mut().with_config().limit(1 << 20).read_to_vec();
            match status {
                200..=299 | 404 => Ok(()),
                s => Err(status_failure(s, resp.status().canonical_reason())),
            }
        })
    }

    pub(crate) fn put(&self, shown: &str, url: &str, body: &[u8]) -> Result<(), Error> {
        self.retrying("uploading", shown, |_| {
            let mut resp = self
                .agent_for(url)?
                .0
                .put(url)
                .send(body)
                .map_err(|e| self.classify(e))?;
            let status = resp.status().as_u16();
            // Drain the (small) answer so the connection can be reused.
            let _ = resp.body_mut().with_config().limit(1 << 20).read_to_vec();
            match status {
                200..=299 => Ok(()),
                s => Err(status_failure(s, resp.status().canonical_reason())),
            }
        })
    }
}

impl Transport {
    /// Whether a transport error is worth another attempt.
    fn classify(&self, e: ureq::Error) -> Failure {
        use ureq::Error as E;
        match e {
            E::BadUri(_)
            | E::Http(_)
            | E::RequireHttpsOnly(_)
            | E::InvalidProxyUrl
            | E::TooManyRedirects
            | E::RedirectFailed => Failure::Fatal(e.to_string()),
            E::Tls(_) | E::Rustls(_) => Failure::Refused(tls_failure(&e.to_string())),
            // rustls reports a refused handshake (an untrusted certificate, an alert from
            // the server) as an I/O error: it will not heal either.
            E::Io(io)
                if io
                    .get_ref()
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
            {
                Failure::Refused(tls_failure(&io.to_string()))
            }
            E::Timeout(ureq::Timeout::Global) => self.past_deadline(),
            E::Timeout(t) => Failure::Retry(format!("timed out ({t})")),
            e => Failure::Retry(e.to_string()),
        }
    }
}

/// Redirects followed at most, per request.
const MAX_REDIRECTS: usize = 5;

/// The URL a redirect from `from` to `location` leads to: absolute http(s), or relative
/// (`//host/path`, `/path`, `path`). Anything else (`file:`, `ftp:`...) is refused, as
/// is leaving https for plain http.
fn redirect_target(from: &str, location: &str) -> Result<String, String> {
    let (scheme, rest) = from
        .split_once("://")
        .ok_or_else(|| format!("not a URL: {from}"))?;
    let authority_end = rest.find('/').map_or(from.len(), |i| scheme.len() + 3 + i);
    let target = if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if let Some(r) = location.strip_prefix("//") {
        format!("{scheme}://{r}")
    } else if location.starts_with('/') {
        format!("{}{location}", &from[..authority_end])
    } else if location
        .split(['/', '?', '#'])
        .next()
        .is_some_and(|first| first.contains(':'))
    {
        return Err(format!(
            "redirected to {location:?}, refused: only http(s) URLs are followed"
        ));
    } else {
        let path = from[authority_end..].split(['?', '#']).next().unwrap_or("");
        let dir = path.rfind('/').map_or("/", |i| &path[..=i]);
        format!("{}{dir}{location}", &from[..authority_end])
    };
    if from.starts_with("https://") && !target.starts_with("https://") {
        return Err(format!(
            "redirected from https to {target}, refused: plain http may not stand in for https"
        ));
    }
    Ok(target)
}

/// A response's Content-Length, if it has a valid one.
fn content_length(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    resp.headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The first and last byte of a `Content-Range: bytes A-B/TOTAL` (or `/*`) header, `None`
/// unless it is exactly that form with `A <= B < TOTAL`.
fn content_range(header: &str) -> Option<(u64, u64)> {
    let rest = header.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) || !(total == "*" || digits(total)) {
        return None;
    }
    let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
    if a > b {
        return None;
    }
    if total != "*" && total.parse::<u64>().ok()? <= b {
        return None;
    }
    Some((a, b))
}

fn status_failure(status: u16, reason: Option<&str>) -> Failure {
    let msg = format!("HTTP {status} {}", reason.unwrap_or(""));
    let msg = msg.trim_end().to_string();
    match status {
        408 | 429 | 500..=599 => Failure::Retry(msg),
        401 | 403 | 407 => Failure::Refused(msg),
        _ => Failure::Fatal(msg),
    }
}

/// A TLS failure's message, with what to check for the usual ones.
fn tls_failure(msg: &str) -> String {
    let hint = if msg.contains("UnknownIssuer") {
        " (the server's certificate is not signed by a trusted CA: for a private CA, \
         give its certificate with --ca-cert)"
    } else if msg.contains("NotValidForName") {
        " (the server's certificate is not for this host name)"
    } else if msg.contains("Expired") {
        " (the server's certificate has expired, or this machine's clock is wrong)"
    } else if msg.contains("CertificateRequired") || msg.contains("BadCertificate") {
        " (the server wants a client certificate it trusts: --client-cert and --client-key)"
    } else {
        ""
    };
    format!("TLS failure: {msg}{hint}")
}

/// One agent: timeouts, connection reuse, TLS roots and client certificate, and the
/// proxy it goes through (`None`: direct, whatever the environment says).
fn agent(opts: &StoreOptions, proxy: Option<ureq::Proxy>) -> Agent {
    let mut tls = ureq::tls::TlsConfig::builder().client_cert(opts.http.client.clone());
    if !opts.http.roots.is_empty() {
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&opts.http.roots));
    }
    let config = Agent::config_builder()
        .proxy(proxy)
        .tls_config(tls.build())
        .http_status_as_error(false)
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_per_read(Some(opts.timeout))
        .timeout_per_write(Some(opts.timeout))
        // The whole exchange, across redirects and including the body: no-progress
        // timeouts alone let a server trickling a byte at a time hold a request.
        .timeout_global(Some(opts.deadline))
        // Redirects are followed by `Transport::call`, which checks where they lead.
        .max_redirects(0)
        .max_redirects_will_error(false)
        // Keep a connection per worker (and some) open to each host.
        .max_idle_connections(opts.jobs.max(1) * 2 + 8)
        .max_idle_connections_per_host(opts.jobs.max(1) * 2 + 8)
        // Chunk files are zstd already: never let a proxy re-encode them.
        .accept_encoding("identity")
        .user_agent(concat!("tessera/", env!("CARGO_PKG_VERSION")))
        .build();
    Agent::new_with_config(config)
}

/// The proxy that the environment variable `var` names (`http://` if no scheme is
/// given; `http://` and `https://` proxies only, reached with CONNECT).
fn proxy(var: &str, url: &str) -> Result<ureq::Proxy, String> {
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    if !(full.starts_with("http://") || full.starts_with("https://")) {
        return Err(format!(
            "{var}={}: only http:// and https:// proxies are supported",
            redact(&full)
        ));
    }
    ureq::Proxy::new(&full).map_err(|e| format!("{var}={}: not a proxy URL ({e})", redact(&full)))
}

/// `scheme://host:port` of a URL, lower case, with the scheme's default port.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let has_port = hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| !p.is_empty() && !h.ends_with(':') && !p.contains(']'));
    let default = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    let hostport = if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:{default}")
    };
    format!(
        "{}://{}",
        scheme.to_ascii_lowercase(),
        hostport.to_ascii_lowercase()
    )
}

/// The host of a URL, lower case, an IPv6 address without its brackets.
fn host_of(url: &str) -> String {
    let o = origin(url);
    let hostport = o.split_once("://").map_or(o.as_str(), |(_, h)| h);
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// The URL's authority part: `(start, end)` byte positions after `scheme://`.
fn authority_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    Some((start, end))
}

/// `url` with any `user:password@` shown as `***@`: what every message names.
pub fn redact(url: &str) -> String {
    match authority_span(url) {
        Some((start, end)) => match url[start..end].rfind('@') {
            Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// `url` without its `user:password@`, and the `Basic` authorization they make
/// (percent-decoded, as RFC 3986 wants `@`, `:` and `%` written in them).
fn split_credentials(url: &str) -> Result<(String, Option<String>), String> {
    let Some((start, end)) = authority_span(url) else {
        return Ok((url.to_string(), None));
    };
    let Some(at) = url[start..end].rfind('@') else {
        return Ok((url.to_string(), None));
    };
    let userinfo = &url[start..start + at];
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |s: &str| {
        percent_decode(s).ok_or_else(|| {
            format!(
                "the credentials in {} are not valid percent-encoded UTF-8",
                redact(url)
            )
        })
    };
    let pair = format!("{}:{}", decode(user)?, decode(pass)?);
    let clean = format!("{}{}", &url[..start], &url[start + at + 1..]);
    Ok((clean, Some(format!("Basic {}", base64(pair.as_bytes())))))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Standard base64 with padding (for a Basic authorization).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An engine error naming the URL; `msg` becomes the source so `{:#}` prints both once.
pub(crate) fn remote_error(what: &'static str, url: &str, msg: String) -> Error {
    Error::remote_io(what, PathBuf::from(url), io::Error::other(msg))
}

#[cfg(test)]
mod tests {
    use super::{base64, content_range, origin, redact, redirect_target, split_credentials};

    /// A server answering each request with `answer(port, head)`; returns its port and
    /// the heads (lower case) it saw.
    fn recording_server(
        answer: impl Fn(&str) -> String + Send + 'static,
    ) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let heads = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let _ = conn.write_all(answer(&head).as_bytes());
                heads.lock().unwrap().push(head);
            }
        });
        (port, seen)
    }

    /// Headers and URL credentials go to their origin, and follow a redirect there, but
    /// not to another origin.
    #[test]
    fn credentials_never_follow_a_redirect_to_another_origin() {
        let ok = |_: &str| {
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_string()
        };
        let (other, other_seen) = recording_server(ok);
        let (home, home_seen) = recording_server(move |head: &str| {
            let location = if head.starts_with("get /away ") {
                format!("http://127.0.0.1:{other}/there")
            } else if head.starts_with("get /near ") {
                "/here".to_string()
            } else {
                return ok(head);
            };
            format!(
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            )
        });
        let mut opts = crate::StoreOptions::default();
        opts.http.add_header("X-Token: t0k", "test").unwrap();
        opts.http.proxies = crate::options::Proxies::default(); // Whatever the environment says.
        let t = super::Transport::new(&opts);
        for path in ["near", "away"] {
            let url = format!("http://u:pw@127.0.0.1:{home}/{path}");
            match t.get("fetching", &redact(&url), &url, 10).unwrap() {
                super::Got::Body(b) => assert_eq!(b, b"ok"),
                super::Got::NotFound => panic!("404"),
            }
        }
        let basic = format!(
            "authorization: basic {}",
            base64(b"u:pw").to_ascii_lowercase()
        );
        let home_seen = home_seen.lock().unwrap();
        assert_eq!(home_seen.len(), 3, "near, here, away");
        for head in home_seen.iter() {
            assert!(
                head.contains("x-token: t0k") && head.contains(&basic),
                "{head}"
            );
        }
        let other_seen = other_seen.lock().unwrap();
        assert_eq!(other_seen.len(), 1);
        assert!(
            !other_seen[0].contains("x-token") && !other_seen[0].contains("authorization"),
            "{}",
            other_seen[0]
        );
    }

    #[test]
    fn credentials_in_urls_are_used_and_never_shown() {
        let url = "https://fleet:p%40ss%3Aw0rd@cdn.example.com:8443/store/x?a=b@c";
        assert_eq!(
            redact(url),
            "https://***@cdn.example.com:8443/store/x?a=b@c"
        );
        let (clean, auth) = split_credentials(url).unwrap();
        assert_eq!(clean, "https://cdn.example.com:8443/store/x?a=b@c");
        assert_eq!(
            auth.unwrap(),
            format!("Basic {}", base64(b"fleet:p@ss:w0rd"))
        );
        assert_eq!(
            split_credentials("http://h/p@q").unwrap(),
            ("http://h/p@q".into(), None)
        );
        assert_eq!(redact("http://h/p@q"), "http://h/p@q");
        let e = split_credentials("http://u:%zz-s3cr3t@h/").unwrap_err();
        assert!(e.contains("http://***@h/") && !e.contains("s3cr3t"), "{e}");
        assert_eq!(base64(b"martin:secret"), "bWFydGluOnNlY3JldA==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(origin("HTTP://u:p@Host/x"), "http://host:80");
        assert_eq!(origin("https://h:8443?x"), "https://h:8443");
        assert_eq!(origin("https://[::1]/x"), "https://[::1]:443");
        assert_eq!(origin("https://[::1]:9/x"), "https://[::1]:9");
    }

    #[test]
    fn content_ranges_are_read_strictly() {
        assert_eq!(content_range("bytes 0-99/1000"), Some((0, 99)));
        assert_eq!(content_range("bytes 5-5/*"), Some((5, 5)));
        for bad in [
            "bytes 0-99/99",
            "bytes 10-9/100",
            "bytes -9/100",
            "bytes 0-/100",
            "bytes +1-9/100",
            "items 0-9/100",
            "bytes 0-9",
            "bytes 0-99/1000, bytes 0-1/2",
            "bytes 99999999999999999999-1/*",
        ] {
            assert_eq!(content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn redirects_stay_on_http_and_never_leave_https() {
        let from = "https://cdn.example.com/store/chunks/ab/x.zst?sig=1";
        let ok = [
            ("https://other.example.com/y", "https://other.example.com/y"),
            ("//mirror.example.com/z", "https://mirror.example.com/z"),
            ("/elsewhere/z", "https://cdn.example.com/elsewhere/z"),
            ("y.zst", "https://cdn.example.com/store/chunks/ab/y.zst"),
            (
                "../cd/y.zst",
                "https://cdn.example.com/store/chunks/ab/../cd/y.zst",
            ),
        ];
        for (location, want) in ok {
            assert_eq!(redirect_target(from, location).unwrap(), want, "{location}");
        }
        for location in [
            "http://cdn.example.com/store/x.zst",
            "file:///etc/passwd",
            "ftp://example.com/x",
            "javascript:alert(1)",
        ] {
            let e = redirect_target(from, location).unwrap_err();
            assert!(e.contains("refused"), "{location}: {e}");
        }
        // From plain http, https is fine (and http too).
        let from = "http://127.0.0.1:8080/i.tidx";
        assert_eq!(redirect_target(from, "https://a/b").unwrap(), "https://a/b");
        assert_eq!(
            redirect_target(from, "j.tidx").unwrap(),
            "http://127.0.0.1:8080/j.tidx"
        );
        assert!(redirect_target(from, "file:///etc/passwd").is_err());
    }
}
