//! A store in an S3-compatible bucket: `s3://BUCKET/PREFIX` holds `PREFIX/chunks/...`.
//!
//! Requests are presigned with SigV4 by `rusty-s3` (no I/O of its own) and sent by the
//! same blocking transport as HTTP stores. Writes (from `make`) go to a queue drained by
//! the store's threads, so uploads run in parallel while `make`'s workers keep chunking;
//! [`ChunkStore::flush`] waits for the queue and reports the first failed upload, and
//! `make` publishes the index only after it.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use tessera_engine::index::ChunkEntry;
use tessera_engine::store::{chunk_path, ChunkStore, FetchStream, Fetched};
use tessera_engine::{ChunkId, Error, Result};

use crate::http::{fetch_verified, MAX_CHUNK_FILE};
use crate::pipeline::{ordered, Pool};
use crate::transport::{remote_error, Got, Transport};
use crate::{S3Options, StoreOptions};

/// Signed URLs live this long; each request signs a fresh one.
const SIGNED_FOR: Duration = Duration::from_secs(3600);

/// A bucket (and key prefix) on S3 or an S3-compatible service.
#[derive(Debug)]
pub struct S3Store {
    inner: Arc<Inner>,
    pool: Pool,
    uploads: Arc<Uploads>,
}

#[derive(Debug)]
struct Inner {
    bucket: Bucket,
    credentials: Option<Credentials>,
    /// Key prefix, empty or ending in `/`.
    prefix: String,
    transport: Transport,
    /// Chunk ids known to be in the bucket (listed once for writers, plus uploads).
    known: Mutex<Option<HashSet<ChunkId>>>,
    writable: bool,
}

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

/// An `s3://bucket/key` spec split up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Path {
    pub(crate) bucket: String,
    pub(crate) key: String,
}

impl S3Path {
    pub(crate) fn parse(spec: &str) -> Result<S3Path> {
        let rest = spec
            .strip_prefix("s3://")
            .ok_or_else(|| Error::InvalidInput(format!("not an s3:// URL: {spec}")))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::InvalidInput(format!(
                "no bucket in {spec} (expected s3://BUCKET/PREFIX)"
            )));
        }
        Ok(S3Path {
            bucket: bucket.to_string(),
            key: key.trim_matches('/').to_string(),
        })
    }
}

/// The bucket and credentials for `bucket` under `opts`.
pub(crate) fn bucket(name: &str, opts: &S3Options) -> Result<(Bucket, Option<Credentials>)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let region = opts
        .region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".to_string());
    let custom = opts
        .endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"));
    let path_style = opts.path_style.unwrap_or(custom.is_some());
    let endpoint = custom.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let url = endpoint
        .parse()
        .map_err(|e| Error::InvalidInput(format!("S3 endpoint {endpoint}: {e}")))?;
    let style = if path_style {
        UrlStyle::Path
    } else {
        UrlStyle::VirtualHost
    };
    let bucket = Bucket::new(url, style, name.to_string(), region)
        .map_err(|e| Error::InvalidInput(format!("S3 bucket {name} at {endpoint}: {e}")))?;
    Ok((bucket, Credentials::from_env()))
}

/// GETs one object (an index) by key.
pub(crate) fn get_object(
    path: &S3Path,
    opts: &StoreOptions,
    limit: u64,
) -> Result<Option<Vec<u8>>> {
    let (bucket, creds) = bucket(&path.bucket, &opts.s3)?;
    let url = bucket
        .get_object(creds.as_ref(), &path.key)
        .sign(SIGNED_FOR);
    let shown = format!("s3://{}/{}", path.bucket, path.key);
    let transport = Transport::new(opts);
    match transport.retrying("fetching", &shown, |_| {
        transport.get_once(url.as_str(), limit, false)
    })? {
        Got::Body(b) => Ok(Some(b)),
        Got::NotFound => Ok(None),
    }
}

/// PUTs one object (an index) by key.
pub(crate) fn put_object(path: &S3Path, opts: &StoreOptions, body: &[u8]) -> Result<()> {
    let (bucket, creds) = bucket(&path.bucket, &opts.s3)?;
    let shown = format!("s3://{}/{}", path.bucket, path.key);
    Transport::new(opts).put(
        &shown,
        || {
            bucket
                .put_object(creds.as_ref(), &path.key)
                .sign(SIGNED_FOR)
                .to_string()
        },
        body,
    )
}

/// Largest answer to one listing request.
const MAX_LIST_PAGE: u64 = 8 << 20;

impl S3Store {
    /// The store at `s3://BUCKET/PREFIX`. With `opts.create`, the store is prepared for
    /// `make`: the chunks it holds are listed once, on the first check.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a malformed spec or endpoint.
    pub fn new(spec: &str, opts: &StoreOptions) -> Result<S3Store> {
        let path = S3Path::parse(spec)?;
        let (bucket, credentials) = bucket(&path.bucket, &opts.s3)?;
        let prefix = if path.key.is_empty() {
            String::new()
        } else {
            format!("{}/", path.key)
        };
        Ok(S3Store {
            inner: Arc::new(Inner {
                bucket,
                credentials,
                prefix,
                transport: Transport::new(opts),
                known: Mutex::new(None),
                writable: opts.create,
            }),
            pool: Pool::new(opts.jobs, "tessera-s3"),
            uploads: Arc::new(Uploads::default()),
        })
    }

    /// Creates the bucket (for tests and first set-ups; needs credentials).
    ///
    /// # Errors
    /// Transport errors, or the service's refusal.
    pub fn create_bucket(&self) -> Result<()> {
        let creds = self.inner.credentials.as_ref().ok_or_else(|| {
            Error::InvalidInput(
                "creating a bucket needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            )
        })?;
        let shown = format!("s3://{}", self.inner.bucket.name());
        self.inner.transport.put(
            &shown,
            || {
                self.inner
                    .bucket
                    .create_bucket(creds)
                    .sign(SIGNED_FOR)
                    .to_string()
            },
            b"",
        )
    }
}

impl Inner {
    fn key(&self, id: &ChunkId) -> String {
        format!("{}{}", self.prefix, chunk_path(id))
    }

    fn shown(&self, id: &ChunkId) -> String {
        format!("s3://{}/{}", self.bucket.name(), self.key(id))
    }

    fn get_url(&self, id: &ChunkId) -> String {
        self.bucket
            .get_object(self.credentials.as_ref(), &self.key(id))
            .sign(SIGNED_FOR)
            .to_string()
    }

    fn fetch(&self, entry: &ChunkEntry) -> Result<Fetched> {
        fetch_verified(&self.transport, entry, &self.shown(&entry.id), &|_| {
            self.get_url(&entry.id)
        })
    }

    /// Lists every chunk under the prefix (1,000 keys per request). S3 lists keys in
    /// ascending order, so a page that does not start past the previous page's last key,
    /// or a repeated continuation token, is refused: a broken or hostile service cannot
    /// keep the listing going round in circles.
    fn list_chunks(&self) -> Result<HashSet<ChunkId>> {
        let mut ids = HashSet::new();
        let mut token: Option<String> = None;
        let mut last_key: Option<String> = None;
        let shown = format!("s3://{}/{}chunks/", self.bucket.name(), self.prefix);
        loop {
            let mut action = ListObjectsV2::new(&self.bucket, self.credentials.as_ref());
            action.with_prefix(format!("{}chunks/", self.prefix));
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let url = action.sign(SIGNED_FOR);
            // A page of 1,000 keys is a few hundred KiB of XML.
            let body = match self.transport.retrying("listing", &shown, |_| {
                self.transport.get_once(url.as_str(), MAX_LIST_PAGE, false)
            })? {
                Got::Body(b) => b,
                Got::NotFound => {
                    return Err(remote_error(
                        "listing",
                        &shown,
                        "HTTP 404 (no such bucket?)".into(),
                    ))
                }
            };
            let text = String::from_utf8_lossy(&body);
            let page = ListObjectsV2::parse_response(&text)
                .map_err(|e| remote_error("listing", &shown, format!("unreadable answer: {e}")))?;
            for obj in &page.contents {
                if last_key.as_ref().is_some_and(|last| obj.key <= *last) {
                    return Err(remote_error(
                        "listing",
                        &shown,
                        format!(
                            "key {:?} comes after {:?}: the listing does not advance",
                            obj.key,
                            last_key.unwrap_or_default()
                        ),
                    ));
                }
                last_key = Some(obj.key.clone());
                let name = obj.key.rsplit('/').next().unwrap_or("");
                if let Some(id) = name.strip_suffix(".zst").and_then(|h| h.parse().ok()) {
                    ids.insert(id);
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => {
                    if page.contents.is_empty() || token.as_ref() == Some(&t) {
                        return Err(remote_error(
                            "listing",
                            &shown,
                            format!(
                                "continuation token {t:?} after a page of {} keys: the \
                                 listing does not advance",
                                page.contents.len()
                            ),
                        ));
                    }
                    token = Some(t);
                }
                _ => return Ok(ids),
            }
        }
    }

    /// Whether the chunk is known present, listing the bucket on the first call.
    fn known_contains(&self, id: &ChunkId) -> Result<bool> {
        let mut known = self.known.lock().expect("known set");
        if known.is_none() {
            *known = Some(self.list_chunks()?);
        }
        Ok(known.as_ref().expect("listed").contains(id))
    }
}

impl ChunkStore for S3Store {
    fn location(&self) -> String {
        format!(
            "s3://{}/{}",
            self.inner.bucket.name(),
            self.inner.prefix.trim_end_matches('/')
        )
    }

    fn get_compressed(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let url = self.inner.get_url(id);
        let shown = self.inner.shown(id);
        let t = &self.inner.transport;
        match t.retrying("fetching", &shown, |_| {
            t.get_once(&url, MAX_CHUNK_FILE, false)
        })? {
            Got::Body(b) => Ok(Some(b)),
            Got::NotFound => Ok(None),
        }
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        if self.inner.writable {
            return self.inner.known_contains(id);
        }
        let key = self.inner.key(id);
        let url = self
            .inner
            .bucket
            .head_object(self.inner.credentials.as_ref(), &key)
            .sign(SIGNED_FOR);
        self.inner.transport.exists(url.as_str())
    }

    fn put_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<bool> {
        if self.inner.known_contains(id)? {
            return Ok(false);
        }
        {
            let mut state = self.uploads.state.lock().expect("upload state");
            if let Some(e) = &state.failed {
                return Err(Error::InvalidInput(format!(
                    "an earlier upload failed: {e}"
                )));
            }
            // Backpressure: at most two uploads per thread queued, so memory stays bounded.
            while state.pending >= self.pool.threads() * 2 {
                state = self.uploads.changed.wait(state).expect("upload state");
            }
            state.pending += 1;
        }
        // Claimed now so that no other worker uploads it too; forgotten again on failure.
        self.inner
            .known
            .lock()
            .expect("known set")
            .as_mut()
            .expect("listed")
            .insert(*id);
        let (inner, uploads, id, body) = (
            self.inner.clone(),
            self.uploads.clone(),
            *id,
            compressed.to_vec(),
        );
        self.pool.spawn(move || {
            let key = inner.key(&id);
            let result = inner.transport.put(
                &inner.shown(&id),
                || {
                    inner
                        .bucket
                        .put_object(inner.credentials.as_ref(), &key)
                        .sign(SIGNED_FOR)
                        .to_string()
                },
                &body,
            );
            if result.is_err() {
                if let Some(k) = inner.known.lock().expect("known set").as_mut() {
                    k.remove(&id);
                }
            }
            let mut state = uploads.state.lock().expect("upload state");
            state.pending -= 1;
            if let Err(e) = result {
                state.failed.get_or_insert(e);
            }
            uploads.changed.notify_all();
        });
        Ok(true)
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

    fn fetch_verified(&self, entry: &ChunkEntry) -> Result<Fetched> {
        self.inner.fetch(entry)
    }

    fn fetch_ordered<'a>(&'a self, entries: Vec<ChunkEntry>) -> FetchStream<'a> {
        let inner = self.inner.clone();
        ordered(
            &self.pool,
            entries,
            Arc::new(move |e: &ChunkEntry| inner.fetch(e)),
        )
    }

    fn in_flight(&self) -> usize {
        self.pool.threads()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let p = S3Path::parse("s3://b/some/prefix/").unwrap();
        assert_eq!((p.bucket.as_str(), p.key.as_str()), ("b", "some/prefix"));
        let p = S3Path::parse("s3://b").unwrap();
        assert_eq!((p.bucket.as_str(), p.key.as_str()), ("b", ""));
        assert!(S3Path::parse("s3:///x").is_err());
        assert!(S3Path::parse("http://x").is_err());
    }

    /// A fake S3 service that answers every listing with the page `page(n)`.
    fn fake_s3(page: impl Fn(usize) -> String + Send + 'static) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let body = page(n);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    fn listing(keys: &[String], token: Option<&str>) -> String {
        let contents: String = keys
            .iter()
            .map(|k| format!("<Contents><Key>{k}</Key><Size>1</Size></Contents>"))
            .collect();
        let (truncated, next) = match token {
            Some(t) => (
                "true",
                format!("<NextContinuationToken>{t}</NextContinuationToken>"),
            ),
            None => ("false", String::new()),
        };
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult \
             xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name>\
             <Prefix>chunks/</Prefix><MaxKeys>1000</MaxKeys><IsTruncated>{truncated}</IsTruncated>\
             {contents}{next}</ListBucketResult>"
        )
    }

    fn key(i: u8) -> String {
        let id = ChunkId::of(&[i]);
        format!("chunks/{}/{id}.zst", &id.to_string()[..2])
    }

    fn listed(endpoint: String) -> Result<HashSet<ChunkId>> {
        let opts = StoreOptions {
            create: true,
            retries: 0,
            s3: crate::S3Options {
                endpoint: Some(endpoint),
                region: Some("us-east-1".into()),
                path_style: Some(true),
            },
            ..StoreOptions::default()
        };
        S3Store::new("s3://b", &opts).unwrap().inner.list_chunks()
    }

    /// A service that keeps answering "there is more" without advancing (the same token,
    /// the same keys, or empty pages) is refused instead of being listed forever.
    #[test]
    fn a_listing_that_does_not_advance_is_refused() {
        // An honest two-page listing.
        let ok = listed(fake_s3(|n| {
            let mut keys = vec![key(1), key(2)];
            keys.sort();
            match n {
                0 => listing(&keys, Some("t1")),
                _ => listing(&["chunks/zz/readme.txt".to_string()], None),
            }
        }))
        .unwrap();
        assert_eq!(
            ok.len(),
            2,
            "keys not named <id>.zst under chunks/xx/ are ignored"
        );
        type Page = Box<dyn Fn(usize) -> String + Send>;
        let cases: [(&str, Page); 3] = [
            (
                "same token",
                Box::new(|n| listing(&[key(n as u8)], Some("again"))),
            ),
            (
                "same keys",
                Box::new(|n| listing(&[key(1)], Some(&format!("t{n}")))),
            ),
            (
                "empty pages",
                Box::new(|n| listing(&[], Some(&format!("t{n}")))),
            ),
        ];
        for (what, page) in cases {
            let e = listed(fake_s3(page)).unwrap_err();
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            assert!(
                msg.contains("s3://b/chunks/") && msg.contains("does not advance"),
                "{what}: {msg}"
            );
        }
    }
}
