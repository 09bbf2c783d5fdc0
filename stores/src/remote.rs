//! One remote store for HTTP(S) servers, CDNs and S3-compatible buckets.
//!
//! Both are the same static files (see `docs/FORMAT.md`) reached by the same transport;
//! they differ only in how a request is named: a plain URL under the store's base, or a
//! SigV4-presigned URL for a key under the bucket's prefix. S3 can also list keys
//! (`ListObjectsV2`, for [`StoreRead::list_packs`]) and be written (`PUT`, for
//! [`StoreWrite`]); an HTTP store can do neither.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use rusty_s3::{Bucket, Credentials, S3Action};
use tessera_engine::store::{pack_id_from_path, pack_path, PackId, StoreRead, StoreWrite};
use tessera_engine::{Error, Result};

use crate::s3::{self, S3Path, SIGNED_FOR};
use crate::transport::{Got, Transport};
use crate::{spec_kind, SpecKind, StoreOptions};

/// A store on a web server, a CDN or in an S3 bucket: [`StoreRead`] for both, and
/// [`StoreWrite`] for S3 (an HTTP store is read-only: publish into a local directory or
/// a bucket, then serve that).
#[derive(Debug)]
pub struct RemoteStore {
    inner: Arc<Inner>,
    uploads: Arc<Uploads>,
}

#[derive(Debug)]
struct Inner {
    naming: Naming,
    transport: Transport,
    jobs: usize,
    retries: u32,
    /// Ranges fetched lately: asking again for (part of) one is a re-fetch after bad
    /// bytes, which asks caches on the way to revalidate.
    recent: Mutex<VecDeque<(String, u64, u64)>>,
}

/// How a request for a store-relative file is named.
#[derive(Debug)]
enum Naming {
    /// `BASE/REL`, the base without a trailing slash.
    Http { base: String },
    /// The key `PREFIX` + `REL` in a bucket, presigned per request.
    S3 {
        bucket: Box<Bucket>,
        credentials: Option<Credentials>,
        /// Empty or ending in `/`.
        prefix: String,
    },
}

/// Ranges remembered for telling re-fetches apart.
const RECENT_RANGES: usize = 1024;

/// Pack uploads queued at once beyond the one `make` is building: uploads overlap with
/// chunking while memory stays bounded by a pack or two.
const UPLOADS_AHEAD: usize = 1;

/// The upload queue's state.
#[derive(Debug, Default)]
struct Uploads {
    state: Mutex<UploadState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct UploadState {
    pending: usize,
    failed: Option<Error>,
}

impl RemoteStore {
    /// The store at `spec`: `http(s)://HOST/PATH` (with or without a trailing slash) or
    /// `s3://BUCKET/PREFIX`. Nothing is requested until the first read.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a spec that is neither, or a malformed S3 endpoint.
    pub fn open(spec: &str, opts: &StoreOptions) -> Result<RemoteStore> {
        let naming = match spec_kind(spec) {
            SpecKind::Http => Naming::Http {
                base: spec.trim_end_matches('/').to_string(),
            },
            SpecKind::S3 => {
                crate::no_headers_for_s3(spec, opts)?;
                let path = S3Path::parse(spec)?;
                let (bucket, credentials) = s3::bucket(&path.bucket, &opts.s3)?;
                let prefix = if path.key.is_empty() {
                    String::new()
                } else {
                    format!("{}/", path.key)
                };
                Naming::S3 {
                    bucket: Box::new(bucket),
                    credentials,
                    prefix,
                }
            }
            SpecKind::Local => {
                return Err(Error::InvalidInput(format!(
                    "not an http(s):// or s3:// URL: {spec}"
                )))
            }
        };
        let transport = match naming {
            Naming::S3 { .. } => Transport::new(opts).s3(),
            Naming::Http { .. } => Transport::new(opts),
        };
        Ok(RemoteStore {
            inner: Arc::new(Inner {
                naming,
                transport,
                jobs: opts.jobs.max(1),
                retries: opts.retries,
                recent: Mutex::new(VecDeque::new()),
            }),
            uploads: Arc::new(Uploads::default()),
        })
    }

    /// Whether the store is an S3 bucket (writable) rather than a web server.
    pub fn is_s3(&self) -> bool {
        matches!(self.inner.naming, Naming::S3 { .. })
    }

    /// Creates the bucket of an S3 store (for tests and first set-ups; needs
    /// credentials).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an HTTP store or without credentials; transport
    /// errors, or the service's refusal.
    pub fn create_bucket(&self) -> Result<()> {
        let Naming::S3 {
            bucket,
            credentials,
            ..
        } = &self.inner.naming
        else {
            return Err(Error::InvalidInput(format!(
                "{} is not an S3 store: it has no bucket to create",
                self.location()
            )));
        };
        let creds = credentials.as_ref().ok_or_else(|| {
            Error::InvalidInput(
                "creating a bucket needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            )
        })?;
        let url = bucket.create_bucket(creds).sign(SIGNED_FOR).to_string();
        self.inner
            .transport
            .put(&format!("s3://{}", bucket.name()), &url, b"")
    }
}

impl Naming {
    fn location(&self) -> String {
        match self {
            Naming::Http { base } => crate::redact(base),
            Naming::S3 { bucket, prefix, .. } => {
                format!("s3://{}/{}", bucket.name(), prefix.trim_end_matches('/'))
            }
        }
    }

    /// What messages name: the URL (never its `user:password`), or `s3://BUCKET/KEY`
    /// (never a signature).
    fn shown(&self, rel: &str) -> String {
        match self {
            Naming::Http { base } => format!("{}/{rel}", crate::redact(base)),
            Naming::S3 { bucket, prefix, .. } => format!("s3://{}/{prefix}{rel}", bucket.name()),
        }
    }

    fn get_url(&self, rel: &str) -> String {
        match self {
            Naming::Http { base } => format!("{base}/{rel}"),
            Naming::S3 {
                bucket,
                credentials,
                prefix,
            } => bucket
                .get_object(credentials.as_ref(), &format!("{prefix}{rel}"))
                .sign(SIGNED_FOR)
                .to_string(),
        }
    }

    fn head_url(&self, rel: &str) -> String {
        match self {
            Naming::Http { base } => format!("{base}/{rel}"),
            Naming::S3 {
                bucket,
                credentials,
                prefix,
            } => bucket
                .head_object(credentials.as_ref(), &format!("{prefix}{rel}"))
                .sign(SIGNED_FOR)
                .to_string(),
        }
    }
}

/// Refuses a store-relative path that could leave the store or be read as more than a
/// path: only `[A-Za-z0-9._-]` components, no `.` or `..`, no leading or doubled `/`.
fn check_rel(location: &str, rel: &str) -> Result<()> {
    let ok = !rel.is_empty()
        && rel.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "{rel:?} is not a file name inside store {location}"
        )))
    }
}

impl Inner {
    /// Whether `rel`'s bytes `first..=last` lie inside a range fetched lately (so asking
    /// again is a re-fetch), remembering this one.
    fn refetch(&self, rel: &str, first: u64, last: u64) -> bool {
        let mut recent = self.recent.lock().expect("recent ranges");
        let seen = recent
            .iter()
            .any(|(r, a, b)| r == rel && *a <= first && last <= *b);
        if !seen {
            if recent.len() >= RECENT_RANGES {
                recent.pop_front();
            }
            recent.push_back((rel.to_string(), first, last));
        }
        seen
    }

    /// PUTs `body` at store-relative `rel` (S3 only).
    fn put(&self, rel: &str, body: &[u8]) -> Result<()> {
        let Naming::S3 {
            bucket,
            credentials,
            prefix,
        } = &self.naming
        else {
            return Err(read_only(&self.naming.location()));
        };
        let url = bucket
            .put_object(credentials.as_ref(), &format!("{prefix}{rel}"))
            .sign(SIGNED_FOR)
            .to_string();
        self.transport.put(&self.naming.shown(rel), &url, body)
    }
}

/// The error for writing to an HTTP store.
pub(crate) fn read_only(location: &str) -> Error {
    Error::InvalidInput(format!(
        "{location} is an HTTP store, which is read-only: make into a local directory or an \
         s3:// store and serve that over HTTP"
    ))
}

impl StoreRead for RemoteStore {
    fn location(&self) -> String {
        self.inner.naming.location()
    }

    fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        check_rel(&self.location(), rel)?;
        let n = &self.inner.naming;
        match self
            .inner
            .transport
            .get("fetching", &n.shown(rel), &n.get_url(rel), limit)?
        {
            Got::Body(b) => Ok(Some(b)),
            Got::NotFound => Ok(None),
        }
    }

    fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        check_rel(&self.location(), rel)?;
        let n = &self.inner.naming;
        let shown = n.shown(rel);
        let fresh = len > 0
            && self
                .inner
                .refetch(rel, offset, offset.saturating_add(len - 1));
        self.inner
            .transport
            .get_range(&shown, &n.get_url(rel), offset, len, fresh)?
            .ok_or(Error::MissingFile { origin: shown })
    }

    fn file_size(&self, rel: &str) -> Result<Option<u64>> {
        check_rel(&self.location(), rel)?;
        let n = &self.inner.naming;
        self.inner.transport.size(&n.shown(rel), &n.head_url(rel))
    }

    fn list_packs(&self) -> Result<Vec<PackId>> {
        let Naming::S3 {
            bucket,
            credentials,
            prefix,
        } = &self.inner.naming
        else {
            return Err(Error::InvalidInput(format!(
                "{} is an HTTP store, which cannot be listed: its packs are known only \
                 through the location files of its indexes (make into a local directory or \
                 an s3:// store)",
                self.location()
            )));
        };
        let keys = s3::list_keys(
            &self.inner.transport,
            bucket,
            credentials.as_ref(),
            &format!("{prefix}packs/"),
        )?;
        // Keys are under the prefix (the listing refuses others); stray files are no pack.
        Ok(keys
            .iter()
            .filter_map(|k| pack_id_from_path(&k[prefix.len()..]))
            .collect())
    }

    fn in_flight(&self) -> usize {
        self.inner.jobs
    }

    fn retries(&self) -> u32 {
        self.inner.retries
    }
}

impl StoreWrite for RemoteStore {
    /// Queues the upload (at most one waits at once, so memory stays
    /// bounded) and returns; [`StoreWrite::flush`] waits for it. A pack is named by its
    /// bytes, so uploading one that is there already replaces it with the same bytes.
    fn put_pack(&self, id: &PackId, bytes: &[u8]) -> Result<()> {
        if !self.is_s3() {
            return Err(read_only(&self.location()));
        }
        {
            let mut state = self.uploads.state.lock().expect("upload state");
            while state.pending >= UPLOADS_AHEAD && state.failed.is_none() {
                state = self.uploads.changed.wait(state).expect("upload state");
            }
            if let Some(e) = &state.failed {
                return Err(Error::InvalidInput(format!(
                    "an earlier upload to {} failed: {e}",
                    self.location()
                )));
            }
            state.pending += 1;
        }
        let (inner, uploads, rel, body) = (
            self.inner.clone(),
            self.uploads.clone(),
            pack_path(id),
            bytes.to_vec(),
        );
        let done = {
            let uploads = uploads.clone();
            move |result: Result<()>| {
                let mut state = uploads.state.lock().expect("upload state");
                state.pending -= 1;
                if let Err(e) = result {
                    state.failed.get_or_insert(e);
                }
                uploads.changed.notify_all();
            }
        };
        let spawned = std::thread::Builder::new()
            .name("tessera-upload".into())
            .spawn({
                let done = done.clone();
                move || done(inner.put(&rel, &body))
            });
        if let Err(e) = spawned {
            done(Err(Error::InvalidInput(format!(
                "starting an upload thread for pack {id}: {e}"
            ))));
        }
        Ok(())
    }

    fn put_file(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        check_rel(&self.location(), rel)?;
        self.inner.put(rel, bytes)
    }

    fn delete(&self, rel: &str) -> Result<()> {
        check_rel(&self.location(), rel)?;
        let Naming::S3 {
            bucket,
            credentials,
            prefix,
        } = &self.inner.naming
        else {
            return Err(read_only(&self.location()));
        };
        let url = bucket
            .delete_object(credentials.as_ref(), &format!("{prefix}{rel}"))
            .sign(SIGNED_FOR)
            .to_string();
        self.inner
            .transport
            .delete(&self.inner.naming.shown(rel), &url)
    }

    fn list_files(&self, dir: &str) -> Result<Vec<String>> {
        check_rel(&self.location(), dir)?;
        let Naming::S3 {
            bucket,
            credentials,
            prefix,
        } = &self.inner.naming
        else {
            return Err(read_only(&self.location()));
        };
        let under = format!("{prefix}{dir}/");
        let keys = s3::list_keys(&self.inner.transport, bucket, credentials.as_ref(), &under)?;
        // Only the files directly in `dir`; the listing refuses keys outside the prefix.
        let mut out: Vec<String> = keys
            .iter()
            .map(|k| &k[under.len()..])
            .filter(|name| !name.is_empty() && !name.contains('/') && !name.starts_with('.'))
            .map(|name| format!("{dir}/{name}"))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        let mut state = self.uploads.state.lock().expect("upload state");
        while state.pending > 0 {
            state = self.uploads.changed.wait(state).expect("upload state");
        }
        match state.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for RemoteStore {
    fn drop(&mut self) {
        // Uploads hold their own references; waiting here keeps a process from exiting
        // in the middle of one without flush having been called.
        let mut state = self.uploads.state.lock().expect("upload state");
        while state.pending > 0 {
            state = self.uploads.changed.wait(state).expect("upload state");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// How the fake server answers a ranged GET of its file.
    #[derive(Clone, Copy)]
    enum Mode {
        Honest,
        IgnoreRange,
        ShiftRange,
        /// 206, the right Content-Range, a Content-Length and body 10 bytes longer.
        Pad,
        /// 206, the right Content-Range, a Content-Length, half the body, then close.
        Truncate,
        NoContentRange,
        /// Honest, behind a redirect from `/r/…` to `/s/…`.
        Redirect,
    }

    /// A web server with one file, `FILE` at `/s/packs/ab/f.tpack`; everything else is
    /// 404. Returns the store URL and the number of requests seen.
    fn server(mode: Mode) -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let _ = conn.write_all(&answer(mode, &head));
            }
        });
        (format!("http://127.0.0.1:{port}/s"), seen)
    }

    const FILE: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

    fn answer(mode: Mode, head: &str) -> Vec<u8> {
        let first = head.lines().next().unwrap_or("");
        if matches!(mode, Mode::Redirect) && first.contains(" /r/packs/ab/f.tpack ") {
            return b"HTTP/1.1 302 Found\r\nLocation: /s/packs/ab/f.tpack\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec();
        }
        if !first.contains(" /s/packs/ab/f.tpack ") {
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec();
        }
        let n = FILE.len();
        if first.starts_with("head ") {
            return format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")
                .into_bytes();
        }
        let range = head.lines().find_map(|l| l.strip_prefix("range: bytes="));
        let (a, b) = match range.and_then(|r| r.trim().split_once('-')) {
            Some((a, b)) if !matches!(mode, Mode::IgnoreRange) => {
                (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap())
            }
            _ => {
                let mut out =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")
                        .into_bytes();
                out.extend_from_slice(FILE);
                return out;
            }
        };
        let (shown_a, shown_b) = match mode {
            Mode::ShiftRange => (a + 1, b + 1),
            _ => (a, b),
        };
        let body = &FILE[shown_a..=shown_b.min(n - 1)];
        let content_range = match mode {
            Mode::NoContentRange => String::new(),
            _ => format!("Content-Range: bytes {shown_a}-{shown_b}/{n}\r\n"),
        };
        let (declared, sent): (usize, Vec<u8>) = match mode {
            Mode::Pad => (body.len() + 10, [body, &[b'!'; 10][..]].concat()),
            Mode::Truncate => (body.len(), body[..body.len() / 2].to_vec()),
            _ => (body.len(), body.to_vec()),
        };
        let mut out = format!(
            "HTTP/1.1 206 Partial Content\r\n{content_range}Content-Length: {declared}\r\n\
             Connection: close\r\n\r\n"
        )
        .into_bytes();
        out.extend_from_slice(&sent);
        out
    }

    fn open(url: &str) -> RemoteStore {
        let opts = StoreOptions {
            retries: 2,
            backoff: Duration::from_millis(1),
            ..StoreOptions::default()
        };
        RemoteStore::open(url, &opts).unwrap()
    }

    /// The error and its sources, as `{:#}` would print them.
    fn chain(e: &Error) -> String {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            msg = format!("{msg}: {s}");
            source = s.source();
        }
        msg
    }

    const PACK: &str = "packs/ab/f.tpack";

    #[test]
    fn a_range_is_read_exactly() {
        let (url, _) = server(Mode::Honest);
        let store = open(&url);
        assert_eq!(store.read_range(PACK, 10, 5).unwrap(), b"abcde");
        assert_eq!(store.read_range(PACK, 0, 62).unwrap(), FILE);
        assert_eq!(store.read_range(PACK, 3, 0).unwrap(), b"");
        assert_eq!(store.file_size(PACK).unwrap(), Some(62));
        assert_eq!(store.file_size("packs/ab/g.tpack").unwrap(), None);
        assert_eq!(store.read_file(PACK, 62).unwrap().unwrap(), FILE);
        assert_eq!(store.read_file("locations/x.tloc", 62).unwrap(), None);
        let e = store.read_file(PACK, 61).unwrap_err();
        assert!(
            chain(&e).contains("more than the 61 bytes allowed"),
            "{}",
            chain(&e)
        );
        match store.read_range("packs/ab/g.tpack", 0, 5) {
            Err(Error::MissingFile { origin }) => {
                assert_eq!(origin, format!("{url}/packs/ab/g.tpack"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A redirect (a CDN sending readers to a mirror) keeps the range asked.
    #[test]
    fn a_redirected_range_request_keeps_its_range() {
        let (url, seen) = server(Mode::Redirect);
        let store = open(&url.replace("/s", "/r"));
        assert_eq!(store.read_range(PACK, 10, 5).unwrap(), b"abcde");
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    /// A server that ignores `Range` is refused at its first answer, without retries and
    /// without reading the whole file, unless the file is exactly the range asked.
    #[test]
    fn a_server_ignoring_range_is_refused_at_once() {
        let (url, seen) = server(Mode::IgnoreRange);
        let store = open(&url);
        let e = store.read_range(PACK, 10, 5).unwrap_err();
        let msg = chain(&e);
        assert!(msg.contains(&format!("{url}/{PACK}")), "{msg}");
        assert!(
            msg.contains(
                "asked for bytes 10-14, the server answered 200 with the whole file (62 bytes)"
            ) && msg.contains("must support HTTP Range requests"),
            "{msg}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 1, "not retried");
        // The whole file is the range asked: fine.
        assert_eq!(store.read_range(PACK, 0, 62).unwrap(), FILE);
    }

    #[test]
    fn a_content_range_other_than_asked_is_refused() {
        for mode in [Mode::ShiftRange, Mode::NoContentRange] {
            let (url, seen) = server(mode);
            let e = open(&url).read_range(PACK, 10, 5).unwrap_err();
            let msg = chain(&e);
            assert!(msg.contains(&format!("{url}/{PACK}")), "{msg}");
            assert!(msg.contains("bytes 10-14"), "{msg}");
            assert_eq!(seen.load(Ordering::SeqCst), 1, "not retried: {msg}");
        }
    }

    #[test]
    fn a_range_body_is_bounded_and_a_short_one_retried() {
        let (url, _) = server(Mode::Pad);
        let msg = chain(&open(&url).read_range(PACK, 10, 5).unwrap_err());
        assert!(
            msg.contains("the body is 15 bytes, more than the 5 bytes allowed"),
            "{msg}"
        );
        let (url, seen) = server(Mode::Truncate);
        let msg = chain(&open(&url).read_range(PACK, 10, 6).unwrap_err());
        assert!(
            msg.contains(&format!("{url}/{PACK}")) && msg.contains("gave up after 3 attempts"),
            "{msg}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn store_relative_names_stay_inside_the_store() {
        for ok in ["packs/ab/x.tpack", "locations/00.tloc", "a"] {
            check_rel("s", ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "packs//x",
            "../x",
            "packs/../../x",
            "./x",
            "x?y=1",
            "x#y",
            "a b",
            "packs/",
        ] {
            assert!(check_rel("s", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_range_asked_again_is_a_refetch() {
        let store = RemoteStore::open("http://127.0.0.1:9/s", &StoreOptions::default()).unwrap();
        let inner = &store.inner;
        assert!(!inner.refetch("p", 100, 199));
        assert!(inner.refetch("p", 150, 160), "inside a range fetched");
        assert!(inner.refetch("p", 100, 199));
        assert!(!inner.refetch("p", 150, 250), "not all inside");
        assert!(!inner.refetch("q", 100, 199), "another file");
    }

    #[test]
    fn http_stores_cannot_be_listed_or_written() {
        let store = RemoteStore::open("http://127.0.0.1:9/s/", &StoreOptions::default()).unwrap();
        assert_eq!(store.location(), "http://127.0.0.1:9/s");
        let e = store.list_packs().unwrap_err().to_string();
        assert!(
            e.contains("http://127.0.0.1:9/s") && e.contains("cannot be listed"),
            "{e}"
        );
        let e = store
            .put_pack(&PackId([1; 32]), b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("read-only"), "{e}");
        let e = store
            .put_file("locations/x.tloc", b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("read-only"), "{e}");
    }

    /// A server that reads each request (body included) and answers `status`.
    fn status_server(status: u16) -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let want = |got: &[u8]| {
                    let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
                    Some(end + len)
                };
                while want(&got).is_none_or(|n| got.len() < n) {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        (format!("http://127.0.0.1:{port}"), seen)
    }

    fn s3_store(endpoint: String) -> RemoteStore {
        let opts = StoreOptions {
            retries: 2,
            backoff: Duration::from_millis(1),
            s3: crate::S3Options {
                endpoint: Some(endpoint),
                region: Some("us-east-1".into()),
                path_style: Some(true),
            },
            ..StoreOptions::default()
        };
        RemoteStore::open("s3://b/p", &opts).unwrap()
    }

    /// S3 refusing a request: one request, and the error points at the AWS credentials,
    /// not at headers.
    #[test]
    fn an_s3_refusal_is_not_retried_and_names_the_aws_credentials() {
        let (url, seen) = status_server(403);
        let msg = chain(
            &s3_store(url)
                .read_file("locations/x.tloc", 100)
                .unwrap_err(),
        );
        assert!(
            msg.contains("s3://b/p/locations/x.tloc")
                && msg.contains("HTTP 403")
                && msg.contains("AWS_ACCESS_KEY_ID")
                && !msg.contains("--header"),
            "{msg}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    /// Pack uploads run behind `make`; flush waits for them and reports the first
    /// failure (after its retries), naming the key, and later puts are refused.
    #[test]
    fn s3_uploads_are_queued_and_flush_reports_their_failure() {
        let (ok_url, ok_seen) = status_server(200);
        let store = s3_store(ok_url);
        assert_eq!(store.location(), "s3://b/p");
        for i in 0..3 {
            store.put_pack(&PackId([i; 32]), &[i; 1000]).unwrap();
        }
        store.put_file("locations/x.tloc", b"loc").unwrap();
        store.flush().unwrap();
        assert_eq!(
            ok_seen.load(Ordering::SeqCst),
            4,
            "one PUT per pack and file"
        );

        let (bad_url, bad_seen) = status_server(500);
        let store = s3_store(bad_url);
        let id = PackId([7; 32]);
        store.put_pack(&id, b"pack").unwrap();
        let msg = chain(&store.flush().unwrap_err());
        assert!(
            msg.contains(&format!("s3://b/p/{}", pack_path(&id)))
                && msg.contains("HTTP 500")
                && msg.contains("3 attempts"),
            "{msg}"
        );
        assert_eq!(bad_seen.load(Ordering::SeqCst), 3);
        // A failure not yet reported by flush refuses the next put (which waits for the
        // upload before it), and flush still reports it.
        store.put_pack(&id, b"pack").unwrap();
        let refused = store.put_pack(&PackId([8; 32]), b"next").unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("an earlier upload to s3://b/p failed"),
            "{refused}"
        );
        assert_eq!(
            bad_seen.load(Ordering::SeqCst),
            6,
            "the refused pack was not sent"
        );
        assert!(chain(&store.flush().unwrap_err()).contains("HTTP 500"));
        store.flush().unwrap();
    }
}
