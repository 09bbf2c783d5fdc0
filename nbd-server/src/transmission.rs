//! The transmission phase: read requests, run them on the backend, write replies.
//!
//! One reader (this task) decodes requests and checks them; each valid request runs on
//! tokio's blocking pool, at most `max_in_flight` at a time per connection, and hands its
//! encoded reply to one writer task, so replies go out as they complete, in any order.
//! A failed request gets an error reply and the connection carries on; only a broken
//! stream (bad magic, EOF, socket error) ends it, or a limit: no progress writing
//! replies or reading a write payload for the reply timeout, or the idle timeout.
//! `NBD_CMD_DISC` and server shutdown stop reading but let in-flight requests finish
//! and reply first. READ and WRITE buffers come from the connection's, its peer's and
//! the server's budget, in that order (see [`acquire`]).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::backend::{Backend, BackendError, BlockState, Extent};
use crate::error::{code, errno, Error, Result};
use crate::export::Limits;
use crate::handshake::{Negotiated, BASE_ALLOCATION_ID};
use crate::registry::{Busy, ConnStats, Registry};
use crate::server::{LogFn, Throttle};
use crate::wire::{self, cmd, cmd_flag, reply, state, Decoded, Request};

/// Most descriptors sent in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
const MAX_DESCRIPTORS: usize = 1024;

/// An encoded reply: byte pieces, some of them ranges of a data buffer.
#[derive(Debug, Default)]
struct Outgoing {
    pieces: Vec<Piece>,
    data: Vec<u8>,
    /// Share of the buffer budget, returned once the reply is written.
    budget: Option<Budget>,
    /// Counts the request as in flight until the reply is written.
    busy: Option<Busy>,
}

#[derive(Debug)]
enum Piece {
    Bytes(Vec<u8>),
    Data(Range<usize>),
}

/// Buffer budget held by one request: from the connection's own share and from the
/// server-wide budget.
#[derive(Debug)]
struct Budget {
    _own: OwnedSemaphorePermit,
    _peer: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
    units: u64,
    stats: Arc<ConnStats>,
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.stats.sub_held(self.units);
    }
}

/// Per-connection settings.
#[derive(Clone)]
pub(crate) struct Settings {
    pub limits: Limits,
    pub max_in_flight: usize,
    pub log: LogFn,
    /// Throttles the log lines of failed requests.
    pub failures: Arc<Throttle>,
    /// Server-wide budget of payload buffer memory, in [`BUDGET_UNIT`]s.
    pub buffers: Arc<Semaphore>,
    /// This connection's share of it: the most it may hold at once.
    pub own_buffers: Arc<Semaphore>,
    /// Its peer's share, shared with the peer's other connections.
    pub peer_buffers: Arc<Semaphore>,
    /// How long a client may leave replies unread (or a payload unsent) with no progress.
    pub reply_timeout: Duration,
    /// Closes the connection after this long without requests, if set.
    pub idle_timeout: Option<Duration>,
    /// After waiting this long for budget, reclaim it from a stalled connection.
    pub budget_wait: Duration,
    pub registry: Arc<Registry>,
    /// This connection's id in the registry.
    pub id: u64,
    pub stats: Arc<ConnStats>,
}

/// Bytes per permit of the buffer budget.
pub(crate) const BUDGET_UNIT: u32 = 64 * 1024;

/// Aborts a task when dropped: the connection's writer must not outlive it (it would
/// keep writing to a client that was dropped, holding its replies' memory).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves requests until the client disconnects, breaks the protocol, or `shutdown`
/// turns true.
pub(crate) async fn transmit<S>(
    stream: S,
    neg: Negotiated,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Outgoing>(settings.max_in_flight.max(1) * 2);
    let stats = settings.stats.clone();
    let mut writer = AbortOnDrop(tokio::spawn(write_replies(
        wr,
        rx,
        settings.reply_timeout,
        stats.clone(),
    )));
    let slots = Arc::new(Semaphore::new(settings.max_in_flight.max(1)));
    let ctx = Arc::new(Context {
        backend: neg.export.backend().clone(),
        name: neg.export.name().to_string(),
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        limits: settings.limits,
        log: settings.log.clone(),
        failures: settings.failures.clone(),
    });
    let mut ended: Result<()> = Ok(());
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.wait_for(|s| *s) => break,
            // The writer gave up on this client: stop reading its requests.
            _ = tx.closed() => break,
        };
        let mut header = [0u8; wire::REQUEST_LEN];
        let read = tokio::select! {
            r = read_header(&mut rd, &mut header, settings.idle_timeout, &stats) => r,
            _ = shutdown.wait_for(|s| *s) => break,
            _ = tx.closed() => break,
        };
        match read {
            Ok(()) => {}
            Err(e) => {
                ended = e;
                break;
            }
        }
        let req = match wire::decode_request(&header) {
            Ok(Decoded::Done(r, _)) => r,
            Ok(Decoded::Incomplete(n)) => {
                ended = Err(Error::Protocol(format!("request needs {n} bytes")));
                break;
            }
            Err(e) => {
                ended = Err(Error::Protocol(e.0));
                break;
            }
        };
        if req.kind == cmd::DISC {
            break;
        }
        let busy = Busy::new(&stats);
        // READ and WRITE buffers come out of the connection's share of the server-wide
        // budget, so that neither many clients nor one greedy client can exhaust memory
        // or lock the others out; they wait instead, and a wait for the server-wide
        // budget is bounded by dropping a stalled holder.
        let mut budget = None;
        if matches!(req.kind, cmd::READ | cmd::WRITE) && req.len <= ctx.limits.max_payload {
            let units = req.len.div_ceil(BUDGET_UNIT).max(1);
            budget = tokio::select! {
                b = acquire(&settings, units) => Some(b),
                _ = shutdown.wait_for(|s| *s) => break,
                _ = tx.closed() => break,
            };
        }
        // A write's payload is always consumed, even when the write is refused.
        let mut payload = Vec::new();
        if req.kind == cmd::WRITE {
            let keep = req.len <= ctx.limits.max_payload;
            let res = read_payload(&mut rd, req.len, keep, settings.reply_timeout, &stats).await;
            stats.payload_done();
            match res {
                Ok(p) => payload = p,
                Err(e) => {
                    ended = Err(e);
                    break;
                }
            }
        }
        let tx = tx.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut out = match ctx.check(&req) {
                Err((err, msg)) => ctx.error_reply(&req, err, &msg),
                Ok(()) => {
                    let worker = ctx.clone();
                    match tokio::task::spawn_blocking(move || worker.run(&req, payload)).await {
                        Ok(out) => out,
                        Err(e) => {
                            ctx.error_reply(&req, code::EIO, &format!("backend task failed: {e}"))
                        }
                    }
                }
            };
            out.budget = budget;
            out.busy = Some(busy);
            // The writer is gone only when the client is; nothing left to tell it.
            let _ = tx.send(out).await;
            drop(permit);
        });
    }
    drop(tx);
    // The writer ends once every in-flight request has replied.
    match (&mut writer.0).await {
        Ok(Ok(())) => ended,
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Error::Protocol(format!("reply writer failed: {e}"))),
    }
}

/// Reads a request header; with an idle timeout, gives up once the connection has had
/// nothing in flight and received nothing for that long. `Err(Ok(()))` is a clean end
/// (EOF between requests).
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
    header: &mut [u8; wire::REQUEST_LEN],
    idle: Option<Duration>,
    stats: &ConnStats,
) -> Result<(), Result<()>> {
    let read = rd.read_exact(header);
    let mut read = std::pin::pin!(read);
    let res = match idle {
        None => read.await,
        Some(idle) => loop {
            let left = idle.saturating_sub(stats.idle_for());
            tokio::select! {
                r = &mut read => break r,
                _ = tokio::time::sleep(if left.is_zero() { idle / 4 } else { left }
                    .max(Duration::from_millis(10))) => {
                    if stats.is_quiet() && stats.idle_for() >= idle {
                        return Err(Err(Error::Idle(idle)));
                    }
                }
            }
        },
    };
    match res {
        Ok(_) => {
            stats.touch();
            Ok(())
        }
        // Many clients (nbdfuse, qemu on exit) just close between requests.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Ok(())),
        Err(e) => Err(Err(Error::io("reading a request")(e))),
    }
}

/// Takes `units` of budget: first from the connection's own share (waiting only for its
/// own replies to be read), then from its peer's share and from the server's; each
/// `budget_wait` spent waiting for one of the latter drops the connection (of the same
/// peer, or any) that holds the most while stalled for as long.
async fn acquire(settings: &Settings, units: u32) -> Budget {
    let own = settings
        .own_buffers
        .clone()
        .acquire_many_owned(units)
        .await
        .expect("the semaphore is never closed");
    let peer = reclaiming(settings, true, &settings.peer_buffers, units).await;
    let global = reclaiming(settings, false, &settings.buffers, units).await;
    settings.stats.add_held(u64::from(units));
    Budget {
        _own: own,
        _peer: peer,
        _global: global,
        units: u64::from(units),
        stats: settings.stats.clone(),
    }
}

/// Waits for `units` of `sem`, reclaiming from a stalled connection after each
/// `budget_wait` (keeping its place in the semaphore's queue meanwhile).
async fn reclaiming(
    settings: &Settings,
    same_peer: bool,
    sem: &Arc<Semaphore>,
    units: u32,
) -> OwnedSemaphorePermit {
    let permit = sem.clone().acquire_many_owned(units);
    let mut permit = std::pin::pin!(permit);
    let wait = settings.budget_wait.max(Duration::from_millis(10));
    loop {
        tokio::select! {
            p = &mut permit => return p.expect("the semaphore is never closed"),
            _ = tokio::time::sleep(wait) => {
                let unit = u64::from(BUDGET_UNIT);
                let registry = &settings.registry;
                if let Some(done) = registry.reclaim(settings.id, same_peer, wait, unit) {
                    (settings.log)(&format!("reclaiming buffer memory: dropping {done}"));
                }
            }
        }
    }
}

/// Reads a write payload of `len` bytes (kept if `keep`, else discarded), failing if the
/// client sends nothing for `stall`.
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    len: u32,
    keep: bool,
    stall: Duration,
    stats: &ConnStats,
) -> Result<Vec<u8>> {
    let mut payload = vec![0u8; if keep { len as usize } else { 0 }];
    let mut scratch = if keep {
        Vec::new()
    } else {
        vec![0u8; 64 * 1024]
    };
    let mut left = len as usize;
    stats.payload_progress(0);
    while left > 0 {
        let buf = if keep {
            let at = len as usize - left;
            &mut payload[at..]
        } else {
            let n = left.min(scratch.len());
            &mut scratch[..n]
        };
        let n = match tokio::time::timeout(stall, rd.read(buf)).await {
            Err(_) => return Err(Error::Stalled(stall)),
            Ok(Err(e)) => return Err(Error::io("reading a write payload")(e)),
            Ok(Ok(0)) => {
                return Err(Error::Protocol(
                    "client closed inside a write payload".into(),
                ))
            }
            Ok(Ok(n)) => n,
        };
        left -= n;
        stats.payload_progress(n as u64);
    }
    Ok(payload)
}

/// Writes all of `bytes`, failing if the client takes no bytes for `stall`.
async fn write_progress<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut bytes: &[u8],
    stall: Duration,
    stats: &ConnStats,
) -> Result<()> {
    while !bytes.is_empty() {
        match tokio::time::timeout(stall, wr.write(bytes)).await {
            Err(_) => return Err(Error::Stalled(stall)),
            Ok(Err(e)) => return Err(Error::io("sending a reply")(e)),
            Ok(Ok(0)) => {
                return Err(Error::io("sending a reply")(std::io::Error::from(
                    std::io::ErrorKind::WriteZero,
                )))
            }
            Ok(Ok(n)) => {
                bytes = &bytes[n..];
                stats.writer_progress(n as u64);
            }
        }
    }
    Ok(())
}

/// Runs a flush or shutdown, failing if it takes longer than `stall`.
async fn timed<F: std::future::Future<Output = std::io::Result<()>>>(
    stall: Duration,
    what: &'static str,
    f: F,
) -> Result<()> {
    match tokio::time::timeout(stall, f).await {
        Ok(r) => r.map_err(Error::io(what)),
        Err(_) => Err(Error::Stalled(stall)),
    }
}

/// Writes replies as they come; a client that takes no reply bytes for `stall` is
/// dropped, as its unsent replies hold buffer budget that other clients need.
async fn write_replies<W: AsyncWrite>(
    wr: W,
    mut rx: mpsc::Receiver<Outgoing>,
    stall: Duration,
    stats: Arc<ConnStats>,
) -> Result<()> {
    let wr = BufWriter::with_capacity(64 * 1024, wr);
    let mut wr = std::pin::pin!(wr);
    while let Some(first) = rx.recv().await {
        stats.writer_progress(0);
        let mut next = Some(first);
        while let Some(out) = next {
            for piece in &out.pieces {
                let bytes = match piece {
                    Piece::Bytes(b) => &b[..],
                    Piece::Data(r) => &out.data[r.clone()],
                };
                write_progress(&mut wr, bytes, stall, &stats).await?;
            }
            next = rx.try_recv().ok();
        }
        timed(stall, "sending a reply", wr.flush()).await?;
        stats.writer_done();
    }
    timed(stall, "closing the connection", wr.shutdown()).await
}

struct Context {
    backend: Arc<dyn Backend>,
    name: String,
    structured: bool,
    base_allocation: bool,
    limits: Limits,
    log: LogFn,
    failures: Arc<Throttle>,
}

fn cmd_name(kind: u16) -> &'static str {
    match kind {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

impl Context {
    /// Checks a request against the spec and the export; the error value and message
    /// to reply with otherwise.
    fn check(&self, req: &Request) -> Result<(), (u32, String)> {
        let name = cmd_name(req.kind);
        let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        let allowed = cmd_flag::FUA
            | match req.kind {
                cmd::READ if self.structured => cmd_flag::DF,
                cmd::WRITE_ZEROES => cmd_flag::NO_HOLE,
                cmd::BLOCK_STATUS => cmd_flag::REQ_ONE,
                cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => 0,
                other => return Err((code::EINVAL, format!("unknown command {other}"))),
            };
        if req.flags & !allowed != 0 {
            return Err((
                code::EINVAL,
                format!(
                    "{name}: flags {:#x} are not valid for this command",
                    req.flags & !allowed
                ),
            ));
        }
        if writes && !self.backend.capabilities().writable {
            return Err((
                code::EPERM,
                format!("{name}: export {:?} is read-only", self.name),
            ));
        }
        if req.kind == cmd::BLOCK_STATUS && !self.base_allocation {
            return Err((
                code::EINVAL,
                "BLOCK_STATUS without a negotiated metadata context".into(),
            ));
        }
        if req.kind == cmd::FLUSH {
            return Ok(());
        }
        if req.len == 0 {
            return Err((code::EINVAL, format!("{name} of length 0")));
        }
        if req.kind == cmd::READ && req.len > self.limits.max_payload {
            // The spec keeps EOVERFLOW for DF reads (structured replies only).
            let df = self.structured && req.flags & cmd_flag::DF != 0;
            return Err((
                if df { code::EOVERFLOW } else { code::EINVAL },
                format!(
                    "READ of {} bytes exceeds the maximum {}",
                    req.len, self.limits.max_payload
                ),
            ));
        }
        if req.kind == cmd::WRITE && req.len > self.limits.max_payload {
            return Err((
                code::EINVAL,
                format!(
                    "WRITE of {} bytes exceeds the maximum {}",
                    req.len, self.limits.max_payload
                ),
            ));
        }
        let size = self.backend.size();
        let end = req.offset.checked_add(u64::from(req.len));
        if !matches!(end, Some(e) if e <= size) {
            // ENOSPC for writes of data (WRITE, WRITE_ZEROES); EINVAL for READ, TRIM,
            // CACHE and BLOCK_STATUS, as the spec says.
            let err = if matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
                code::ENOSPC
            } else {
                code::EINVAL
            };
            return Err((
                err,
                format!(
                    "{name} of {} bytes at {} is beyond the export size {size}",
                    req.len, req.offset
                ),
            ));
        }
        Ok(())
    }

    /// Runs a checked request on the backend (on a blocking thread).
    fn run(&self, req: &Request, payload: Vec<u8>) -> Outgoing {
        let fua = req.flags & cmd_flag::FUA != 0;
        let (offset, len) = (req.offset, u64::from(req.len));
        let done = match req.kind {
            cmd::READ => return self.read(req),
            cmd::BLOCK_STATUS => return self.block_status(req),
            cmd::WRITE => self.backend.write(offset, &payload, fua),
            cmd::FLUSH => self.backend.flush(),
            cmd::TRIM => self.backend.trim(offset, len, fua),
            cmd::WRITE_ZEROES => self.backend.write_zeroes(offset, len, fua),
            cmd::CACHE => self.backend.cache(offset, len),
            other => Err(BackendError::new(
                crate::backend::ErrorKind::Invalid,
                format!("unknown command {other}"),
            )),
        };
        match done {
            Ok(()) => {
                let mut head = Vec::with_capacity(16);
                wire::encode_simple_reply(&mut head, 0, req.cookie);
                Outgoing {
                    pieces: vec![Piece::Bytes(head)],
                    ..Default::default()
                }
            }
            Err(e) => self.backend_error(req, &e),
        }
    }

    fn backend_error(&self, req: &Request, e: &BackendError) -> Outgoing {
        let line = format!(
            "export {:?}: {} of {} bytes at {}: {}",
            self.name,
            cmd_name(req.kind),
            req.len,
            req.offset,
            e.message
        );
        self.failures.note(&self.log, &line);
        self.error_reply(req, errno(e.kind), &e.message)
    }

    /// An error reply: structured with the message when negotiated, simple otherwise.
    fn error_reply(&self, req: &Request, err: u32, msg: &str) -> Outgoing {
        let mut head = Vec::new();
        if self.structured {
            wire::encode_error_chunk(&mut head, req.cookie, err, msg);
        } else {
            wire::encode_simple_reply(&mut head, err, req.cookie);
        }
        Outgoing {
            pieces: vec![Piece::Bytes(head)],
            ..Default::default()
        }
    }

    fn read(&self, req: &Request) -> Outgoing {
        let mut data = vec![0u8; req.len as usize];
        let extents = match self.backend.read(req.offset, &mut data) {
            Ok(x) => x,
            Err(e) => return self.backend_error(req, &e),
        };
        let mut pieces = Vec::new();
        if !self.structured {
            let mut head = Vec::with_capacity(16);
            wire::encode_simple_reply(&mut head, 0, req.cookie);
            pieces.push(Piece::Bytes(head));
            pieces.push(Piece::Data(0..data.len()));
            return Outgoing {
                pieces,
                data,
                ..Default::default()
            };
        }
        let runs = if req.flags & cmd_flag::DF != 0 {
            vec![(0..data.len(), false)]
        } else {
            runs_of(&extents, data.len())
        };
        let last = runs.len() - 1;
        for (i, (range, zero)) in runs.into_iter().enumerate() {
            let flags = if i == last { reply::FLAG_DONE } else { 0 };
            let at = req.offset + range.start as u64;
            let mut head = Vec::with_capacity(32);
            if zero {
                wire::encode_chunk_header(&mut head, flags, reply::OFFSET_HOLE, req.cookie, 12);
                head.extend_from_slice(&at.to_be_bytes());
                head.extend_from_slice(&(range.len() as u32).to_be_bytes());
                pieces.push(Piece::Bytes(head));
            } else {
                let len = 8 + range.len() as u32;
                wire::encode_chunk_header(&mut head, flags, reply::OFFSET_DATA, req.cookie, len);
                head.extend_from_slice(&at.to_be_bytes());
                pieces.push(Piece::Bytes(head));
                pieces.push(Piece::Data(range));
            }
        }
        Outgoing {
            pieces,
            data,
            ..Default::default()
        }
    }

    fn block_status(&self, req: &Request) -> Outgoing {
        let extents = match self.backend.extents(req.offset, u64::from(req.len)) {
            Ok(x) => x,
            Err(e) => return self.backend_error(req, &e),
        };
        let mut descs: Vec<(u32, u32)> = Vec::new();
        let mut left = u64::from(req.len);
        for e in extents {
            if left == 0 || descs.len() == MAX_DESCRIPTORS {
                break;
            }
            let len = e.len.min(left);
            if len == 0 {
                continue;
            }
            left -= len;
            let flags = match e.state {
                BlockState::Data => 0,
                BlockState::Zero => state::ZERO,
                BlockState::Hole => state::HOLE | state::ZERO,
            };
            match descs.last_mut() {
                Some(last) if last.1 == flags => last.0 += len as u32,
                _ => descs.push((len as u32, flags)),
            }
        }
        if descs.is_empty() {
            descs.push((req.len, 0));
        }
        if req.flags & cmd_flag::REQ_ONE != 0 {
            descs.truncate(1);
        }
        let mut head = Vec::with_capacity(24 + 8 * descs.len());
        let len = 4 + 8 * descs.len() as u32;
        wire::encode_chunk_header(
            &mut head,
            reply::FLAG_DONE,
            reply::BLOCK_STATUS,
            req.cookie,
            len,
        );
        head.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (len, flags) in descs {
            head.extend_from_slice(&len.to_be_bytes());
            head.extend_from_slice(&flags.to_be_bytes());
        }
        Outgoing {
            pieces: vec![Piece::Bytes(head)],
            ..Default::default()
        }
    }
}

/// Turns a backend's zero extents into consecutive (range, is_zero) runs covering
/// exactly `len` bytes; whatever the backend did not describe counts as data.
fn runs_of(extents: &[Extent], len: usize) -> Vec<(Range<usize>, bool)> {
    let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
    let mut pos = 0usize;
    for e in extents {
        if pos == len {
            break;
        }
        let end = pos + usize::try_from(e.len).unwrap_or(usize::MAX).min(len - pos);
        // An empty extent would become an empty chunk, which the spec forbids.
        if end == pos {
            continue;
        }
        let zero = e.state.is_zero();
        match runs.last_mut() {
            Some((r, z)) if *z == zero => r.end = end,
            _ => runs.push((pos..end, zero)),
        }
        pos = end;
    }
    if pos < len {
        match runs.last_mut() {
            Some((r, false)) => r.end = len,
            _ => runs.push((pos..len, false)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u64, state: BlockState) -> Extent {
        Extent { len, state }
    }

    #[test]
    fn runs_cover_exactly_the_request() {
        assert_eq!(runs_of(&[], 10), vec![(0..10, false)]);
        let x = [
            ext(4, BlockState::Hole),
            ext(4, BlockState::Zero),
            ext(100, BlockState::Data),
        ];
        assert_eq!(runs_of(&x, 10), vec![(0..8, true), (8..10, false)]);
        let x = [ext(4, BlockState::Hole)];
        assert_eq!(runs_of(&x, 10), vec![(0..4, true), (4..10, false)]);
        let x = [ext(u64::MAX, BlockState::Hole), ext(5, BlockState::Data)];
        assert_eq!(runs_of(&x, 10), vec![(0..10, true)]);
        // Empty extents from a backend never become empty chunks.
        let x = [
            ext(0, BlockState::Hole),
            ext(4, BlockState::Data),
            ext(0, BlockState::Zero),
            ext(6, BlockState::Data),
        ];
        assert_eq!(runs_of(&x, 10), vec![(0..10, false)]);
    }
}
