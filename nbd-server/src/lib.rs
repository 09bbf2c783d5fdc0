//! An NBD (Network Block Device) server on tokio that serves any [`Backend`].
//!
//! The protocol is implemented in layers:
//! - [`wire`]: pure encoding and decoding of magics, options, requests and replies;
//! - handshake: fixed newstyle negotiation (GO, INFO, EXPORT_NAME, LIST, ABORT,
//!   STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`, STARTTLS);
//! - [`TlsConfig`]: X.509 credentials (rustls) for STARTTLS, optionally required and
//!   with client certificates checked against a CA;
//! - transmission: pipelined requests, replies out of order from one writer task;
//! - [`Server`]: accept loop with connection limits (global, per peer, eviction of idle
//!   connections), timeouts, a fair share of the buffer budget, graceful shutdown;
//! - [`bind_unix`]: a Unix socket with a defined mode that never replaces a planted file.
//!
//! Everything is generic over `AsyncRead + AsyncWrite`, so a connection can be served
//! over `tokio::io::duplex` as well as TCP or Unix sockets. The crate knows nothing of
//! where the bytes come from: a [`Backend`] (size, read, write, flush, trim, zero,
//! extents, capabilities) provides them. See `docs/NBD.md` for the protocol surface.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tessera_nbd::{Export, Exports, MemoryBackend, Server};
//!
//! # async fn demo() -> std::io::Result<()> {
//! let mut exports = Exports::new();
//! exports.add(Export::new("disk", Arc::new(MemoryBackend::new(vec![0; 1 << 20], false))));
//! let server = Server::builder(exports).build();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! server.serve_tcp(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
pub mod error;
mod export;
mod handshake;
mod registry;
mod server;
mod tls;
mod transmission;
mod unix;
pub mod wire;

pub use backend::{
    Backend, BackendError, BackendResult, BlockState, Capabilities, ErrorKind, Extent,
    MemoryBackend,
};
pub use error::{Error, Result};
pub use export::{Export, Exports, Limits};
pub use server::{LogFn, Server, ServerBuilder};
pub use tls::TlsConfig;
pub use unix::{bind_unix, remove_unix_socket};
