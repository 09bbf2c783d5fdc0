//! A read-only store on any web server or CDN: `BASE/chunks/<first 2 hex of id>/<id>.zst` by GET.

use std::sync::Arc;

use tessera_engine::chunk::decompress_verified;
use tessera_engine::index::ChunkEntry;
use tessera_engine::store::{chunk_path, ChunkStore, FetchStream, Fetched};
use tessera_engine::{ChunkId, Error, Result};

use crate::pipeline::{ordered, Pool};
use crate::transport::{Got, Transport};
use crate::StoreOptions;

/// Chunk files fetched without a known length are refused past this size: no valid chunk
/// compresses to more than its 16 MiB maximum plus zstd's small overhead.
pub(crate) const MAX_CHUNK_FILE: u64 = 17 * 1024 * 1024;

/// The largest zstd frame a chunk of `len` bytes can compress to (`ZSTD_COMPRESSBOUND`):
/// a chunk file longer than this cannot be that chunk, so its body is cut off there
/// rather than read to the end.
pub(crate) fn chunk_file_bound(len: u32) -> u64 {
    let len = u64::from(len);
    let small = 128 << 10;
    len + (len >> 8) + if len < small { (small - len) >> 11 } else { 0 }
}

/// A store served over HTTP(S) as static files. Read-only: publish with `make` into a
/// local directory or an S3 bucket, then serve that.
#[derive(Debug)]
pub struct HttpStore {
    inner: Arc<Inner>,
    pool: Pool,
}

#[derive(Debug)]
struct Inner {
    base: String,
    transport: Transport,
}

impl HttpStore {
    /// A store at `base` (`http://host/path` or `https://…`, with or without a trailing
    /// slash). Nothing is requested until the first fetch.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `base` is not an http(s) URL.
    pub fn new(base: &str, opts: &StoreOptions) -> Result<HttpStore> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::InvalidInput(format!("not an http(s) URL: {base}")));
        }
        Ok(HttpStore {
            inner: Arc::new(Inner {
                base: base.trim_end_matches('/').to_string(),
                transport: Transport::new(opts),
            }),
            pool: Pool::new(opts.jobs, "tessera-http"),
        })
    }

    /// The URL of a chunk file.
    pub fn chunk_url(&self, id: &ChunkId) -> String {
        self.inner.chunk_url(id)
    }
}

impl Inner {
    fn chunk_url(&self, id: &ChunkId) -> String {
        format!("{}/{}", self.base, chunk_path(id))
    }

    fn fetch(&self, entry: &ChunkEntry) -> Result<Fetched> {
        fetch_verified(&self.transport, entry, &self.chunk_url(&entry.id), &|_| {
            self.chunk_url(&entry.id)
        })
    }
}

/// GETs a chunk file (at most [`chunk_file_bound`] of the entry's length: the body is
/// cut off there, and decompression never yields more than the entry's length) and
/// verifies it, fetching again (asking caches on the way to
/// revalidate) when the bytes are bad; `url` may differ per attempt (signed URLs), and
/// `display_url` is what errors name.
pub(crate) fn fetch_verified(
    transport: &Transport,
    entry: &ChunkEntry,
    display_url: &str,
    url: &dyn Fn(u32) -> String,
) -> Result<Fetched> {
    let mut attempt = 0;
    loop {
        let got = transport.retrying("fetching", display_url, |_| {
            transport.get_once(&url(attempt), chunk_file_bound(entry.len), attempt > 0)
        })?;
        let compressed = match got {
            Got::Body(b) => b,
            Got::NotFound => {
                return Err(Error::MissingChunk {
                    id: entry.id,
                    origin: display_url.to_string(),
                })
            }
        };
        match decompress_verified(entry.id, &compressed, entry.len, display_url) {
            Ok(chunk) => return Ok(Fetched { chunk, compressed }),
            Err(e) if attempt >= transport.retries() => return Err(e),
            Err(_) => {
                attempt += 1;
                transport.pause(attempt);
            }
        }
    }
}

impl ChunkStore for HttpStore {
    fn location(&self) -> String {
        self.inner.base.clone()
    }

    fn get_compressed(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let url = self.inner.chunk_url(id);
        match self
            .inner
            .transport
            .get("fetching", &url, MAX_CHUNK_FILE, false)?
        {
            Got::Body(b) => Ok(Some(b)),
            Got::NotFound => Ok(None),
        }
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.inner.transport.exists(&self.inner.chunk_url(id))
    }

    fn put_compressed(&self, _id: &ChunkId, _compressed: &[u8]) -> Result<bool> {
        Err(Error::InvalidInput(format!(
            "{} is an HTTP store, which is read-only: make into a local directory or an \
             s3:// store and serve that over HTTP",
            self.inner.base
        )))
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
    use super::chunk_file_bound;

    /// The bound is zstd's own: every frame zstd makes of incompressible data fits.
    #[test]
    fn chunk_file_bound_holds_real_frames() {
        for len in [1u32, 100, 4096, 65_536, 131_071, 131_072, 1 << 20] {
            // xorshift64: incompressible, zstd's worst case.
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let z = tessera_engine::chunk::compress(&data);
            assert!(
                z.len() as u64 <= chunk_file_bound(len),
                "len {len}: {}",
                z.len()
            );
        }
        assert_eq!(chunk_file_bound(16 << 20), (16 << 20) + (16 << 12));
        assert_eq!(chunk_file_bound(0), 64);
    }
}
