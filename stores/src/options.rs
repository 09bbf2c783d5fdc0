//! Settings shared by every remote store.

use std::time::Duration;

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
