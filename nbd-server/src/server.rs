//! The accept loop: connection cap, handshake timeout, graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::export::{Exports, Limits};
use crate::handshake::negotiate;
use crate::transmission::{transmit, Settings, BUDGET_UNIT};

/// Where the server reports what it cannot tell a client directly: failed requests
/// (with the backend's message, such as a corrupt chunk's id) and dropped connections.
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Builds a [`Server`]; every setter documents its default.
#[derive(Clone)]
pub struct ServerBuilder {
    exports: Exports,
    limits: Limits,
    max_connections: usize,
    max_in_flight: usize,
    handshake_timeout: Duration,
    shutdown_grace: Duration,
    reply_timeout: Duration,
    buffer_budget: u64,
    log: LogFn,
}

impl ServerBuilder {
    /// Block sizes and the largest payload. Default: [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Connections served at once; more wait in the listen backlog. Default 64.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Requests of one connection run at once (pipelining depth). Default 16.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Time a client gets to finish option negotiation. Default 30 s.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// How long shutdown waits for in-flight requests before dropping connections.
    /// Default 10 s.
    pub fn shutdown_grace(mut self, t: Duration) -> Self {
        self.shutdown_grace = t;
        self
    }

    /// How long a client may take no reply bytes before it is dropped (its unsent
    /// replies hold buffer budget). Default 60 s.
    pub fn reply_timeout(mut self, t: Duration) -> Self {
        self.reply_timeout = t;
        self
    }

    /// Memory for READ and WRITE payloads of all connections together; requests wait
    /// for their share. Never less than one maximum payload. Default 512 MiB.
    pub fn buffer_budget(mut self, bytes: u64) -> Self {
        self.buffer_budget = bytes;
        self
    }

    /// Where log lines go. Default: standard error, prefixed with `nbd: `.
    pub fn log(mut self, log: LogFn) -> Self {
        self.log = log;
        self
    }

    /// The server.
    pub fn build(self) -> Server {
        let bytes = self.buffer_budget.max(u64::from(self.limits.max_payload));
        let units = bytes.div_ceil(u64::from(BUDGET_UNIT));
        let units = usize::try_from(units)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Server {
            buffers: Arc::new(Semaphore::new(units)),
            inner: Arc::new(self),
        }
    }
}

/// An NBD server for a set of [`Exports`]. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerBuilder>,
    buffers: Arc<Semaphore>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.inner.exports)
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Server {
    /// A builder for a server of `exports`.
    pub fn builder(exports: Exports) -> ServerBuilder {
        ServerBuilder {
            exports,
            limits: Limits::default(),
            max_connections: 64,
            max_in_flight: 16,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(60),
            buffer_budget: 512 << 20,
            log: Arc::new(|line| eprintln!("nbd: {line}")),
        }
    }

    /// Serves one client on `stream` (a socket, or `tokio::io::duplex` in tests) until it
    /// disconnects.
    ///
    /// # Errors
    /// Why the connection ended, unless the client left cleanly (`NBD_OPT_ABORT`,
    /// `NBD_CMD_DISC`).
    pub async fn serve_connection<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (_keep, rx) = watch::channel(false);
        self.connection(stream, rx).await
    }

    async fn connection<S>(&self, mut stream: S, shutdown: watch::Receiver<bool>) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.inner;
        let secs = cfg.handshake_timeout.as_secs();
        let neg = tokio::time::timeout(
            cfg.handshake_timeout,
            negotiate(&mut stream, &cfg.exports, &cfg.limits),
        )
        .await
        .map_err(|_| Error::Timeout(secs))??;
        let Some(neg) = neg else { return Ok(()) };
        let settings = Settings {
            limits: cfg.limits,
            max_in_flight: cfg.max_in_flight,
            log: cfg.log.clone(),
            buffers: self.buffers.clone(),
            reply_timeout: cfg.reply_timeout,
        };
        transmit(stream, neg, settings, shutdown).await
    }

    /// Accepts TCP clients until `shutdown` completes, then lets connections finish
    /// their in-flight requests (up to the grace period) and returns.
    ///
    /// # Errors
    /// Never for a client's failure (those are logged); only if the listener fails.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.accept_loop(
            || async {
                let (s, peer) = listener.accept().await?;
                // Small replies must not wait for Nagle.
                s.set_nodelay(true)?;
                Ok((s, peer.to_string()))
            },
            shutdown,
        )
        .await
    }

    /// Like [`Server::serve_tcp`] on a Unix socket.
    ///
    /// # Errors
    /// Only if the listener fails.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.accept_loop(
            || async {
                let (s, _) = listener.accept().await?;
                Ok((s, "unix socket client".to_string()))
            },
            shutdown,
        )
        .await
    }

    async fn accept_loop<S, F, A>(
        &self,
        mut accept: A,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Future<Output = std::io::Result<(S, String)>>,
        A: FnMut() -> F,
    {
        let cap = Arc::new(Semaphore::new(self.inner.max_connections));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = cap.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = &mut shutdown => break,
            };
            // Reap finished connections so the set does not grow without bound.
            while tasks.try_join_next().is_some() {}
            let accepted = tokio::select! {
                a = accept() => a,
                _ = &mut shutdown => break,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) if is_transient(&e) => {
                    (self.inner.log)(&format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let server = self.clone();
            let stop = stop_rx.clone();
            tasks.spawn(async move {
                if let Err(e) = server.connection(stream, stop).await {
                    (server.inner.log)(&format!("{peer}: {e}"));
                }
                drop(permit);
            });
        }
        let _ = stop_tx.send(true);
        let grace = self.inner.shutdown_grace;
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            (self.inner.log)(&format!(
                "{} connections still busy after {} s, dropping them",
                tasks.len(),
                grace.as_secs()
            ));
            tasks.shutdown().await;
        }
        Ok(())
    }
}

/// Accept errors that concern one client or a momentary shortage, not the listener.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        // ENFILE, EMFILE: out of file descriptors for now.
        || matches!(e.raw_os_error(), Some(23 | 24))
}
