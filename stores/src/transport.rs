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

use crate::StoreOptions;

/// One attempt's failure.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another attempt.
    Retry(String),
    /// Will not get better.
    Fatal(String),
    /// The body is over the caller's limit: fatal, and told apart (as an I/O error of kind
    /// `FileTooLarge`) so callers can name the limit's setting.
    TooLarge(String),
}

/// What a GET found.
pub(crate) enum Got {
    /// The body: the whole file (200), or the range asked (206).
    Body(Vec<u8>),
    /// 404 or 410.
    NotFound,
}

/// A shared HTTP agent (connection pool) and the retry policy.
#[derive(Debug)]
pub(crate) struct Transport {
    agent: Agent,
    retries: u32,
    backoff: Duration,
    deadline: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Transport {
    pub(crate) fn new(opts: &StoreOptions) -> Transport {
        let config = Agent::config_builder()
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
        Transport {
            agent: Agent::new_with_config(config),
            retries: opts.retries,
            backoff: opts.backoff,
            deadline: opts.deadline,
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
                Err(Failure::TooLarge(msg)) => {
                    let source = io::Error::new(io::ErrorKind::FileTooLarge, msg);
                    return Err(Error::io(what, PathBuf::from(url), source));
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
    /// within one deadline.
    fn call(
        &self,
        head: bool,
        url: &str,
        fresh: bool,
        range: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let started = Instant::now();
        let mut current = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let left = self
                .deadline
                .checked_sub(started.elapsed())
                .ok_or_else(|| self.past_deadline())?;
            let resp = if head {
                self.agent
                    .head(&current)
                    .config()
                    .timeout_global(Some(left))
                    .build()
                    .call()
            } else {
                let mut req = self
                    .agent
                    .get(&current)
                    .config()
                    .timeout_global(Some(left))
                    .build();
                if fresh {
                    req = req.header("cache-control", "no-cache");
                }
                if let Some(r) = range {
                    req = req.header("range", r);
                }
                req.call()
            }
            .map_err(|e| self.classify(e))?;
            if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
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
        }
        Err(Failure::Fatal(format!(
            "more than {MAX_REDIRECTS} redirects (last to {current})"
        )))
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
                .agent
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
                .agent
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
            | E::RedirectFailed
            | E::Tls(_)
            | E::Rustls(_) => Failure::Fatal(e.to_string()),
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
        _ => Failure::Fatal(msg),
    }
}

/// An engine error naming the URL; `msg` becomes the source so `{:#}` prints both once.
pub(crate) fn remote_error(what: &'static str, url: &str, msg: String) -> Error {
    Error::io(what, PathBuf::from(url), io::Error::other(msg))
}

#[cfg(test)]
mod tests {
    use super::{content_range, redirect_target};

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
