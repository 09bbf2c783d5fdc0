//! The accept loop: connection limits (global and per peer, with eviction of idle
//! connections), handshake timeout, graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::error::{chain, Error, Result};
use crate::export::{Exports, Limits};
use crate::handshake::negotiate;
use crate::registry::{Caps, Registration, Registry};
use crate::tls::{Conn, TlsConfig};
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
    max_connections_per_peer: usize,
    max_in_flight: usize,
    handshake_timeout: Duration,
    idle_timeout: Option<Duration>,
    shutdown_grace: Duration,
    reply_timeout: Duration,
    buffer_budget: u64,
    connection_budget: Option<u64>,
    peer_budget: Option<u64>,
    budget_wait: Duration,
    tls: Option<TlsConfig>,
    log: LogFn,
}

impl ServerBuilder {
    /// Block sizes and the largest payload. Default: [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Connections served at once. A client arriving when the server is full takes the
    /// place of the connection idle the longest (still negotiating, or in transmission
    /// with no request in flight), or else of the one whose transfer pending for at least
    /// [`ServerBuilder::budget_wait`] moves the fewest bytes per second, which is closed;
    /// if no connection is either, the new client is refused (closed at once).
    /// Default 256.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Connections served at once for one peer: an IP address, or on a Unix socket a
    /// user id (all clients of a socket with mode 0600 are one peer). Beyond it, a new
    /// connection of that peer evicts the peer's longest-idle connection, or is refused
    /// if all of them are busy. Default 64.
    pub fn max_connections_per_peer(mut self, n: usize) -> Self {
        self.max_connections_per_peer = n.max(1);
        self
    }

    /// Requests of one connection run at once (pipelining depth). Default 16.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Time a client gets to finish option negotiation. Default 10 s.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Closes a connection in transmission that sent nothing and had no request in
    /// flight for this long. Default: never (kernel `nbd-client` and qemu keep idle
    /// connections for as long as a device is attached; idle connections are evicted
    /// anyway when the server or their peer is full).
    pub fn idle_timeout(mut self, t: Option<Duration>) -> Self {
        self.idle_timeout = t;
        self
    }

    /// How long shutdown waits for in-flight requests before dropping connections.
    /// Default 10 s.
    pub fn shutdown_grace(mut self, t: Duration) -> Self {
        self.shutdown_grace = t;
        self
    }

    /// How long a client may take no reply bytes while replies wait (or send no bytes
    /// of a write payload it announced) before it is dropped. Progress of any size
    /// restarts the clock. Default 60 s.
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

    /// The most of the buffer budget one connection may hold; its further requests
    /// wait for its own replies to be read. Clamped between one maximum payload and the
    /// whole budget. Default: a quarter of the budget (128 MiB).
    pub fn connection_budget(mut self, bytes: u64) -> Self {
        self.connection_budget = Some(bytes);
        self
    }

    /// The most of the buffer budget the connections of one peer (see
    /// [`ServerBuilder::max_connections_per_peer`]) may hold together, so that one peer
    /// cannot take all of it from the others. Clamped between the connection budget and
    /// the whole budget. Default: half the budget (256 MiB).
    pub fn peer_budget(mut self, bytes: u64) -> Self {
        self.peer_budget = Some(bytes);
        self
    }

    /// Bounded wait for buffer memory: a request that waited this long makes the server
    /// drop the connection holding the most memory among those that made no progress
    /// (reading replies, sending a payload) for at least as long, or that moves its
    /// transfers too slowly to drain what it holds within ten such waits, and again after
    /// each further such wait. Default 1 s.
    pub fn budget_wait(mut self, t: Duration) -> Self {
        self.budget_wait = t;
        self
    }

    /// TLS credentials: clients may (or, with [`TlsConfig::required`], must) upgrade
    /// with `NBD_OPT_STARTTLS`. The TLS handshake counts against the handshake
    /// timeout, and every other limit applies to TLS connections as to plain ones.
    /// Default: none (`NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`).
    pub fn tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Where log lines go. Default: standard error, prefixed with `nbd: `.
    pub fn log(mut self, log: LogFn) -> Self {
        self.log = log;
        self
    }

    /// The server.
    pub fn build(self) -> Server {
        let to_units = |bytes: u64| {
            usize::try_from(bytes.div_ceil(u64::from(BUDGET_UNIT)))
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS)
        };
        let max_payload = u64::from(self.limits.max_payload);
        let units = to_units(self.buffer_budget.max(max_payload));
        let per_conn = self.connection_budget.unwrap_or(self.buffer_budget / 4);
        let connection_units = to_units(per_conn.max(max_payload)).min(units);
        let per_peer = self.peer_budget.unwrap_or(self.buffer_budget / 2);
        let peer_units = to_units(per_peer).clamp(connection_units, units);
        Server {
            buffers: Arc::new(Semaphore::new(units)),
            connection_units,
            registry: Registry::new(peer_units),
            failures: Arc::new(Throttle::new("failed requests")),
            inner: Arc::new(self),
        }
    }
}

/// An NBD server for a set of [`Exports`]. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerBuilder>,
    buffers: Arc<Semaphore>,
    /// Budget units one connection may hold.
    connection_units: usize,
    registry: Arc<Registry>,
    /// Log lines about failed requests, shared by every connection.
    failures: Arc<Throttle>,
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
            max_connections: 256,
            max_connections_per_peer: 64,
            max_in_flight: 16,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            shutdown_grace: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(60),
            buffer_budget: 512 << 20,
            connection_budget: None,
            peer_budget: None,
            budget_wait: Duration::from_secs(1),
            tls: None,
            log: Arc::new(|line| eprintln!("nbd: {line}")),
        }
    }

    /// Serves one client on `stream` (a socket, or `tokio::io::duplex` in tests) until it
    /// disconnects. The connection shares the buffer budget (as a peer of its own) and
    /// can be dropped to reclaim memory, but the connection limits do not apply to it
    /// (they are those of the listeners, [`Server::serve_tcp`] and [`Server::serve_unix`]).
    ///
    /// # Errors
    /// Why the connection ended, unless the client left cleanly (`NBD_OPT_ABORT`,
    /// `NBD_CMD_DISC`).
    pub async fn serve_connection<S>(&self, stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (_keep, rx) = watch::channel(false);
        let reg = self.registry.register();
        self.connection(stream, rx, reg).await
    }

    async fn connection<S>(
        &self,
        stream: S,
        shutdown: watch::Receiver<bool>,
        reg: Registration,
    ) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.inner;
        let stats = reg.stats.clone();
        let mut stream = Conn::Plain(stream);
        let work = async {
            let secs = cfg.handshake_timeout.as_secs();
            let neg = tokio::time::timeout(
                cfg.handshake_timeout,
                negotiate(&mut stream, &cfg.exports, &cfg.limits, cfg.tls.as_ref()),
            )
            .await
            .map_err(|_| Error::Timeout(secs))??;
            let Some(neg) = neg else { return Ok(()) };
            stats.enter_transmission();
            let settings = Settings {
                limits: cfg.limits,
                max_in_flight: cfg.max_in_flight,
                log: cfg.log.clone(),
                failures: self.failures.clone(),
                buffers: self.buffers.clone(),
                own_buffers: Arc::new(Semaphore::new(self.connection_units)),
                peer_buffers: reg.peer_buffers.clone(),
                reply_timeout: cfg.reply_timeout,
                idle_timeout: cfg.idle_timeout,
                budget_wait: cfg.budget_wait,
                registry: self.registry.clone(),
                id: reg.id,
                stats: stats.clone(),
            };
            transmit(stream, neg, settings, shutdown).await
        };
        // Dropping `work` closes the socket and stops this connection's writer.
        tokio::select! {
            r = work => r,
            why = reg.stats.killed() => Err(Error::Dropped(why)),
        }
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
                Ok((s, peer.to_string(), peer.ip().to_string()))
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
                // One peer per user: with mode 0600 every client is the same user.
                let key = match s.peer_cred() {
                    Ok(c) => format!("uid {}", c.uid()),
                    Err(_) => "unix socket".to_string(),
                };
                let name = match s.peer_cred().ok().and_then(|c| c.pid()) {
                    Some(pid) => format!("unix socket client pid {pid} ({key})"),
                    None => format!("unix socket client ({key})"),
                };
                Ok((s, name, key))
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
        F: Future<Output = std::io::Result<(S, String, String)>>,
        A: FnMut() -> F,
    {
        let caps = Caps {
            max: self.inner.max_connections,
            per_peer: self.inner.max_connections_per_peer,
            slow_after: self.inner.budget_wait,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut refusals = Refusals::default();
        let ends = Arc::new(Throttle::new("failed connections"));
        loop {
            // Reap finished connections so the set does not grow without bound.
            while tasks.try_join_next().is_some() {}
            // Accepting never waits for a free slot: a full server makes room by
            // evicting idle connections, so idle clients cannot lock others out.
            let accepted = tokio::select! {
                a = accept() => a,
                _ = &mut shutdown => break,
            };
            let (stream, peer, key) = match accepted {
                Ok(x) => x,
                Err(e) if is_transient(&e) => {
                    (self.inner.log)(&format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let reg = match self.registry.admit(&key, caps) {
                Ok(reg) => reg,
                Err(why) => {
                    refusals.note(&self.inner.log, &peer, &why);
                    drop(stream);
                    continue;
                }
            };
            let server = self.clone();
            let stop = stop_rx.clone();
            let ends = ends.clone();
            tasks.spawn(async move {
                if let Err(e) = server.connection(stream, stop, reg).await {
                    ends.note(&server.inner.log, &format!("{peer}: {}", chain(&e)));
                }
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
        ends.flush(&self.inner.log);
        self.failures.flush(&self.inner.log);
        Ok(())
    }
}

/// Lines of one kind (failed connections, failed requests) one second may log; the rest
/// are counted, and the count logged with the next line that gets through (or at
/// shutdown).
pub(crate) const LINES_PER_SECOND: u64 = 20;

/// A log of one kind of line at most [`LINES_PER_SECOND`] a second: a flood of garbage
/// connections or of failing requests must not become a flood of log lines.
pub(crate) struct Throttle {
    /// What the lines are about, for the count of those held back.
    what: &'static str,
    state: std::sync::Mutex<ThrottleState>,
}

#[derive(Default)]
struct ThrottleState {
    window: Option<std::time::Instant>,
    logged: u64,
    suppressed: u64,
}

impl Throttle {
    pub(crate) fn new(what: &'static str) -> Self {
        Throttle {
            what,
            state: std::sync::Mutex::new(ThrottleState::default()),
        }
    }

    /// Logs `line` unless this second's share is used up.
    pub(crate) fn note(&self, log: &LogFn, line: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if st
            .window
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.report(&mut st, log);
            st.window = Some(now);
            st.logged = 0;
        }
        if st.logged >= LINES_PER_SECOND {
            st.suppressed += 1;
            return;
        }
        st.logged += 1;
        log(line);
    }

    /// Logs the count of lines held back, if any.
    pub(crate) fn flush(&self, log: &LogFn) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.report(&mut st, log);
    }

    fn report(&self, st: &mut ThrottleState, log: &LogFn) {
        match std::mem::take(&mut st.suppressed) {
            0 => {}
            n => log(&format!(
                "{n} more {} not logged (at most {LINES_PER_SECOND} lines a second)",
                self.what
            )),
        }
    }
}

/// Logs refused clients, at most one line a second (a flood of connections must not
/// become a flood of log lines).
#[derive(Default)]
struct Refusals {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Refusals {
    fn note(&mut self, log: &LogFn, peer: &str, why: &str) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        let more = match std::mem::take(&mut self.suppressed) {
            0 => String::new(),
            n => format!(" ({n} more refused in the last second)"),
        };
        log(&format!("{peer}: refused: {why}{more}"));
        self.last = Some(now);
    }
}

/// Accept errors that concern one client or a momentary shortage, not the listener.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        // ENFILE, EMFILE: out of file descriptors for now.
        || matches!(e.raw_os_error(), Some(23 | 24))
}
