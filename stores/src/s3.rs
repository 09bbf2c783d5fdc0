//! S3 request naming: `s3://BUCKET/PREFIX` specs, buckets and credentials, single
//! objects (indexes) by key, and the hardened `ListObjectsV2` listing.
//!
//! Requests are presigned with SigV4 by `rusty-s3` (no I/O of its own) and sent by the
//! same blocking transport as HTTP requests; the store itself is
//! [`crate::RemoteStore`].

use std::time::Duration;

use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use tessera_engine::{Error, Result};

use crate::transport::{remote_error, Got, Transport};
use crate::{S3Options, StoreOptions};

/// Signed URLs live this long; each request signs a fresh one.
pub(crate) const SIGNED_FOR: Duration = Duration::from_secs(3600);

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
    match Transport::new(opts)
        .s3()
        .get("fetching", &shown, url.as_str(), limit)?
    {
        Got::Body(b) => Ok(Some(b)),
        Got::NotFound => Ok(None),
    }
}

/// PUTs one object (an index) by key.
pub(crate) fn put_object(path: &S3Path, opts: &StoreOptions, body: &[u8]) -> Result<()> {
    let (bucket, creds) = bucket(&path.bucket, &opts.s3)?;
    let shown = format!("s3://{}/{}", path.bucket, path.key);
    let url = bucket
        .put_object(creds.as_ref(), &path.key)
        .sign(SIGNED_FOR);
    Transport::new(opts).s3().put(&shown, url.as_str(), body)
}

/// Largest answer to one listing request.
const MAX_LIST_PAGE: u64 = 8 << 20;

/// Lists every key under `prefix` (1,000 keys per request). S3 lists keys in ascending
/// order, so a page that does not start past the previous page's last key, or a repeated
/// continuation token, is refused: a broken or hostile service cannot keep the listing
/// going round in circles. Keys not under `prefix` are refused too.
pub(crate) fn list_keys(
    transport: &Transport,
    bucket: &Bucket,
    credentials: Option<&Credentials>,
    prefix: &str,
) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    let mut last_key: Option<String> = None;
    let shown = format!("s3://{}/{prefix}", bucket.name());
    loop {
        let mut action = ListObjectsV2::new(bucket, credentials);
        action.with_prefix(prefix.to_string());
        if let Some(t) = &token {
            action.with_continuation_token(t.clone());
        }
        let url = action.sign(SIGNED_FOR);
        // A page of 1,000 keys is a few hundred KiB of XML.
        let body = match transport.get("listing", &shown, url.as_str(), MAX_LIST_PAGE)? {
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
            if !obj.key.starts_with(prefix) {
                return Err(remote_error(
                    "listing",
                    &shown,
                    format!("key {:?} is not under the prefix asked", obj.key),
                ));
            }
            last_key = Some(obj.key.clone());
            keys.push(obj.key.clone());
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
            _ => return Ok(keys),
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_engine::store::{PackId, StoreRead};

    use super::*;
    use crate::RemoteStore;

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
             <Prefix>packs/</Prefix><MaxKeys>1000</MaxKeys><IsTruncated>{truncated}</IsTruncated>\
             {contents}{next}</ListBucketResult>"
        )
    }

    fn key(i: u8) -> String {
        let id = PackId([i; 32]);
        format!("packs/{}/{id}.tpack", &id.to_string()[..2])
    }

    fn listed(endpoint: String) -> Result<Vec<PackId>> {
        let opts = StoreOptions {
            retries: 0,
            s3: crate::S3Options {
                endpoint: Some(endpoint),
                region: Some("us-east-1".into()),
                path_style: Some(true),
            },
            ..StoreOptions::default()
        };
        RemoteStore::open("s3://b", &opts).unwrap().list_packs()
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
                _ => listing(&["packs/zz/readme.txt".to_string()], None),
            }
        }))
        .unwrap();
        assert_eq!(
            ok,
            vec![PackId([1; 32]), PackId([2; 32])],
            "keys not named <id>.tpack under packs/xx/ are ignored"
        );
        type Page = Box<dyn Fn(usize) -> String + Send>;
        let cases: [(&str, Page); 4] = [
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
            (
                "keys outside the prefix",
                Box::new(|_| listing(&["zz/x".to_string()], None)),
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
                msg.contains("s3://b/packs/")
                    && (msg.contains("does not advance") || msg.contains("not under the prefix")),
                "{what}: {msg}"
            );
        }
    }
}
