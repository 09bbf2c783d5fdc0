//! Raw protocol exchanges over `tokio::io::duplex`: every byte checked by hand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tessera_nbd::wire::{self, cmd, cmd_flag, info, opt, rep, reply, Request};
use tessera_nbd::{
    Backend, BackendError, BackendResult, Capabilities, ErrorKind, Export, Exports, Extent,
    MemoryBackend, Server,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use crate::util::{pattern, two_exports};

const EINVAL: u32 = 22;
const EPERM: u32 = 1;
const EIO: u32 = 5;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

/// A backend whose bytes in `[bad, bad + 100)` fail like a corrupt chunk.
struct Flaky {
    inner: MemoryBackend,
    bad: u64,
}

impl Backend for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> BackendResult<Vec<Extent>> {
        if offset < self.bad + 100 && offset + buf.len() as u64 > self.bad {
            return Err(BackendError::new(
                ErrorKind::Io,
                "corrupt chunk c0ffee from test store",
            ));
        }
        self.inner.read(offset, buf)
    }
}

struct Client {
    s: DuplexStream,
    server: JoinHandle<tessera_nbd::Result<()>>,
    log: Arc<Mutex<Vec<String>>>,
}

fn start(exports: Exports) -> Client {
    let (c, s) = tokio::io::duplex(1 << 20);
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let server = Server::builder(exports)
        .log(Arc::new(move |l: &str| {
            sink.lock().unwrap().push(l.to_string())
        }))
        .build();
    let server = tokio::spawn(async move { server.serve_connection(s).await });
    Client { s: c, server, log }
}

impl Client {
    async fn greet(&mut self, flags: u32) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).await.unwrap();
        assert_eq!(g, wire::encode_greeting());
        self.s.write_u32(flags).await.unwrap();
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        self.s.write_u64(wire::IHAVEOPT).await.unwrap();
        self.s.write_u32(option).await.unwrap();
        self.s.write_u32(data.len() as u32).await.unwrap();
        self.s.write_all(data).await.unwrap();
    }

    /// One option reply: (option, type, data).
    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.s.read_u64().await.unwrap(), wire::OPTION_REPLY_MAGIC);
        let option = self.s.read_u32().await.unwrap();
        let kind = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (option, kind, data)
    }

    /// Replies up to and including the final one (ACK or an error).
    async fn option_replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (_, kind, data) = self.option_reply().await;
            let last = kind == rep::ACK || kind & (1 << 31) != 0;
            out.push((kind, data));
            if last {
                return out;
            }
        }
    }

    /// GO to `name`, optionally negotiating structured replies and base:allocation.
    async fn go(&mut self, name: &str, structured: bool) {
        self.greet(wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES)
            .await;
        if structured {
            self.option(opt::STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.option_replies().await[0].0, rep::ACK);
            self.option(opt::SET_META_CONTEXT, &meta(name, &["base:allocation"]))
                .await;
            let r = self.option_replies().await;
            assert_eq!(r[0].0, rep::META_CONTEXT);
        }
        self.option(opt::GO, &go_data(name, &[])).await;
        let r = self.option_replies().await;
        assert_eq!(r.last().unwrap().0, rep::ACK, "{r:?}");
    }

    async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&wire::encode_request(&r)).await.unwrap();
    }

    /// A simple reply: (error, cookie).
    async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.s.read_u32().await.unwrap(), wire::SIMPLE_REPLY_MAGIC);
        let err = self.s.read_u32().await.unwrap();
        (err, self.s.read_u64().await.unwrap())
    }

    /// One structured chunk: (flags, type, cookie, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(
            self.s.read_u32().await.unwrap(),
            wire::STRUCTURED_REPLY_MAGIC
        );
        let flags = self.s.read_u16().await.unwrap();
        let kind = self.s.read_u16().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut p = vec![0u8; len as usize];
        self.s.read_exact(&mut p).await.unwrap();
        (flags, kind, cookie, p)
    }

    /// A structured read of `len` bytes at `offset` reassembled, or the error value.
    async fn structured_read(
        &mut self,
        offset: u64,
        len: u32,
        flags: u16,
    ) -> (Result<Vec<u8>, u32>, usize) {
        self.request(cmd::READ, flags, 7, offset, len).await;
        let mut buf = vec![0xEE; len as usize];
        let mut error = None;
        let mut chunks = 0;
        loop {
            let (f, kind, cookie, p) = self.chunk().await;
            assert_eq!(cookie, 7);
            chunks += 1;
            match kind {
                reply::OFFSET_DATA => {
                    let at = (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
                    buf[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                }
                reply::OFFSET_HOLE => {
                    let at = (u64::from_be_bytes(p[..8].try_into().unwrap()) - offset) as usize;
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    buf[at..at + n].fill(0);
                }
                reply::ERROR => error = Some(u32::from_be_bytes(p[..4].try_into().unwrap())),
                reply::NONE => {}
                other => panic!("unexpected chunk type {other}"),
            }
            if f & reply::FLAG_DONE != 0 {
                return (error.map_or(Ok(buf), Err), chunks);
            }
        }
    }
}

fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[tokio::test]
async fn every_option_gets_an_answer_and_negotiation_goes_on() {
    let mut c = start(two_exports().0);
    c.greet(wire::CLIENT_FIXED_NEWSTYLE).await;
    for (option, data, want) in [
        (opt::STARTTLS, vec![], rep::ERR_POLICY),
        (opt::EXTENDED_HEADERS, vec![], rep::ERR_UNSUP),
        (99, vec![1, 2, 3], rep::ERR_UNSUP),
        (opt::LIST, vec![0], rep::ERR_INVALID),
        (opt::STRUCTURED_REPLY, vec![0], rep::ERR_INVALID),
        (opt::LIST_META_CONTEXT, meta("mem", &[]), rep::ERR_INVALID),
        (opt::GO, go_data("nope", &[]), rep::ERR_UNKNOWN),
        (opt::INFO, vec![0, 0, 0, 200, b'x'], rep::ERR_INVALID),
    ] {
        c.option(option, &data).await;
        let r = c.option_replies().await;
        assert_eq!(r.last().unwrap().0, want, "option {option}");
        assert!(!r.last().unwrap().1.is_empty(), "errors carry a message");
    }
    // Oversized option data is skipped, not buffered.
    c.option(opt::INFO, &vec![0u8; 100_000]).await;
    assert_eq!(c.option_replies().await[0].0, rep::ERR_TOO_BIG);
    c.option(opt::LIST, &[]).await;
    let r = c.option_replies().await;
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].0, rep::SERVER);
    assert_eq!(&r[0].1[4..7], b"mem");
    assert_eq!(&r[0].1[7..], b"pattern");
    assert_eq!(&r[1].1[4..], b"rw");
    c.option(
        opt::INFO,
        &go_data("", &[info::NAME, info::DESCRIPTION, info::BLOCK_SIZE]),
    )
    .await;
    let r = c.option_replies().await;
    let export = r
        .iter()
        .find(|(k, d)| *k == rep::INFO && d[..2] == [0, 0])
        .unwrap();
    assert_eq!(
        u64::from_be_bytes(export.1[2..10].try_into().unwrap()),
        1 << 20
    );
    let flags = u16::from_be_bytes(export.1[10..12].try_into().unwrap());
    assert!(flags & wire::tflags::READ_ONLY != 0);
    assert!(
        r.iter().any(|(_, d)| d[..2] == [0, 1] && &d[2..] == b"mem"),
        "default export is the first"
    );
    c.option(opt::ABORT, &[]).await;
    assert_eq!(c.option_reply().await.1, rep::ACK);
    assert!(c.server.await.unwrap().is_ok());
}

#[tokio::test]
async fn garbage_and_truncated_handshakes_end_only_their_connection() {
    // Bad option magic.
    let mut c = start(two_exports().0);
    c.greet(0).await;
    c.s.write_all(&[0x55; 16]).await.unwrap();
    let e = c.server.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), tessera_nbd::error::ErrorKind::Protocol);
    // Unknown client flags.
    let mut c = start(two_exports().0);
    c.greet(0x8000_0000).await;
    assert!(c.server.await.unwrap().is_err());
    // Truncated option data, then EOF.
    let mut c = start(two_exports().0);
    c.greet(1).await;
    c.s.write_u64(wire::IHAVEOPT).await.unwrap();
    c.s.write_u32(opt::GO).await.unwrap();
    c.s.write_u32(50).await.unwrap();
    c.s.write_all(&[0; 10]).await.unwrap();
    drop(c.s);
    assert!(c.server.await.unwrap().is_err());
    // EXPORT_NAME of an unknown export: no way to answer, so a disconnect.
    let mut c = start(two_exports().0);
    c.greet(1).await;
    c.option(opt::EXPORT_NAME, b"nope").await;
    assert!(c.server.await.unwrap().is_err());
}

#[tokio::test]
async fn export_name_enters_transmission_with_or_without_zeroes() {
    for no_zeroes in [false, true] {
        let mut c = start(two_exports().0);
        c.greet(1 | if no_zeroes { 2 } else { 0 }).await;
        c.option(opt::EXPORT_NAME, b"rw").await;
        assert_eq!(c.s.read_u64().await.unwrap(), 1 << 20);
        let flags = c.s.read_u16().await.unwrap();
        assert_eq!(flags & wire::tflags::READ_ONLY, 0);
        if !no_zeroes {
            let mut z = [1u8; 124];
            c.s.read_exact(&mut z).await.unwrap();
            assert_eq!(z, [0; 124]);
        }
        c.request(cmd::WRITE, cmd_flag::FUA, 1, 10, 3).await;
        c.s.write_all(b"abc").await.unwrap();
        assert_eq!(c.simple().await, (0, 1));
        c.request(cmd::READ, 0, 2, 9, 5).await;
        assert_eq!(c.simple().await, (0, 2));
        let mut b = [0u8; 5];
        c.s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"\0abc\0");
        c.request(cmd::DISC, 0, 3, 0, 0).await;
        assert!(c.server.await.unwrap().is_ok());
    }
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_connection_stays_usable() {
    let mut c = start(two_exports().0);
    c.go("mem", false).await;
    let size = 1u64 << 20;
    let cases: Vec<(u16, u16, u64, u32, u32)> = vec![
        (cmd::READ, 0, size - 10, 11, EINVAL),    // past the end
        (cmd::READ, 0, u64::MAX - 2, 10, EINVAL), // offset overflow
        (cmd::READ, 0, 0, 64 << 20, EINVAL),      // larger than the maximum
        (cmd::READ, 0, 0, 0, EINVAL),             // empty
        (cmd::READ, 1 << 9, 0, 10, EINVAL),       // unknown flag
        (cmd::READ, cmd_flag::DF, 0, 10, EINVAL), // DF without structured replies
        (42, 0, 0, 10, EINVAL),                   // unknown command
        (cmd::BLOCK_STATUS, 0, 0, 10, EINVAL),    // no metadata context
        (cmd::TRIM, 0, 0, 10, EPERM),             // read-only
        (cmd::WRITE_ZEROES, 0, 0, 10, EPERM),
    ];
    for (i, (kind, flags, offset, len, want)) in cases.into_iter().enumerate() {
        c.request(kind, flags, i as u64, offset, len).await;
        assert_eq!(c.simple().await, (want, i as u64), "case {i}");
    }
    // A refused write's payload is consumed, so the next request parses.
    c.request(cmd::WRITE, 0, 100, 0, 4).await;
    c.s.write_all(b"data").await.unwrap();
    assert_eq!(c.simple().await, (EPERM, 100));
    c.request(cmd::READ, 0, 101, 0, 16).await;
    assert_eq!(c.simple().await, (0, 101));
    let mut b = [0u8; 16];
    c.s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b[..], &pattern(16)[..]);
    c.request(cmd::FLUSH, 0, 102, 0, 0).await;
    assert_eq!(c.simple().await, (0, 102));
    c.request(cmd::CACHE, 0, 103, 0, 4096).await;
    assert_eq!(c.simple().await, (0, 103));
}

#[tokio::test]
async fn writes_past_the_end_get_enospc_and_oversized_payloads_are_drained() {
    let mut c = start(two_exports().0);
    c.go("rw", false).await;
    c.request(cmd::WRITE, 0, 1, (1 << 20) - 2, 4).await;
    c.s.write_all(b"abcd").await.unwrap();
    assert_eq!(c.simple().await, (ENOSPC, 1));
    let big = 40u32 << 20;
    c.request(cmd::WRITE, 0, 2, 0, big).await;
    let (mut rd, mut wr) = tokio::io::split(c.s);
    let writer = tokio::spawn(async move {
        wr.write_all(&vec![7u8; big as usize]).await.unwrap();
        wr
    });
    assert_eq!(rd.read_u32().await.unwrap(), wire::SIMPLE_REPLY_MAGIC);
    assert_eq!(rd.read_u32().await.unwrap(), EINVAL);
    assert_eq!(rd.read_u64().await.unwrap(), 2);
    let wr = writer.await.unwrap();
    let mut c = Client {
        s: rd.unsplit(wr),
        server: c.server,
        log: c.log,
    };
    c.request(cmd::READ, 0, 3, 0, 8).await;
    assert_eq!(c.simple().await, (0, 3));
}

#[tokio::test]
async fn pipelined_reads_are_all_answered_and_disc_waits_for_them() {
    let data = pattern(1 << 20);
    let mut c = start(two_exports().0);
    c.go("mem", false).await;
    let n = 200u64;
    for i in 0..n {
        c.request(cmd::READ, 0, i, i * 512, 512).await;
    }
    c.request(cmd::DISC, 0, 999, 0, 0).await;
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (err, cookie) = c.simple().await;
        assert_eq!(err, 0);
        let mut b = vec![0u8; 512];
        c.s.read_exact(&mut b).await.unwrap();
        seen.insert(cookie, b);
    }
    for i in 0..n {
        let at = (i * 512) as usize;
        assert!(seen[&i] == data[at..at + 512], "cookie {i}");
    }
    assert!(c.server.await.unwrap().is_ok());
}

#[tokio::test]
async fn structured_reads_send_holes_and_block_status_extents() {
    let data = pattern(1 << 20);
    let mut c = start(two_exports().0);
    c.go("mem", true).await;
    let (got, chunks) = c.structured_read(60_000, 200_000, 0).await;
    assert!(got.unwrap() == data[60_000..260_000]);
    assert_eq!(chunks, 3, "data, hole, data");
    let (got, chunks) = c.structured_read(60_000, 200_000, cmd_flag::DF).await;
    assert!(got.unwrap() == data[60_000..260_000]);
    assert_eq!(chunks, 1, "DF: one data chunk");
    c.request(cmd::BLOCK_STATUS, 0, 8, 0, 1 << 20).await;
    let (flags, kind, _, p) = c.chunk().await;
    assert_eq!((flags, kind), (reply::FLAG_DONE, reply::BLOCK_STATUS));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), 1);
    let descs: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(descs, [(65536, 0), (131072, 3), (851968, 0)]);
    c.request(cmd::BLOCK_STATUS, cmd_flag::REQ_ONE, 9, 65536, 4096)
        .await;
    let (_, _, _, p) = c.chunk().await;
    assert_eq!(p.len(), 12);
    assert_eq!(&p[4..], &[0, 0, 16, 0, 0, 0, 0, 3]);
    // Errors in structured mode come as error chunks with a message.
    c.request(cmd::READ, 0, 10, 1 << 20, 1).await;
    let (flags, kind, cookie, p) = c.chunk().await;
    assert_eq!((flags, kind, cookie), (reply::FLAG_DONE, reply::ERROR, 10));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EINVAL);
    let msg_len = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
    assert_eq!(p.len(), 6 + msg_len);
}

#[tokio::test]
async fn a_failing_read_never_sends_data_and_is_logged() {
    let flaky = Flaky {
        inner: MemoryBackend::new(pattern(1 << 20), false),
        bad: 300_000,
    };
    let exports = || {
        let mut e = Exports::new();
        e.add(Export::new(
            "f",
            Arc::new(Flaky {
                inner: MemoryBackend::new(pattern(1 << 20), false),
                bad: flaky.bad,
            }) as Arc<dyn Backend>,
        ));
        e
    };
    // Simple replies: EIO and no payload; the next read works.
    let mut c = start(exports());
    c.go("f", false).await;
    c.request(cmd::READ, 0, 1, 299_000, 4096).await;
    assert_eq!(c.simple().await, (EIO, 1));
    c.request(cmd::READ, 0, 2, 0, 4).await;
    assert_eq!(c.simple().await, (0, 2));
    let mut b = [0u8; 4];
    c.s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b[..], &pattern(4)[..]);
    assert!(c
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("corrupt chunk c0ffee")));
    // Structured replies: a single error chunk carrying the message.
    let mut c = start(exports());
    c.go("f", true).await;
    c.request(cmd::READ, 0, 3, 299_000, 4096).await;
    let (flags, kind, _, p) = c.chunk().await;
    assert_eq!((flags, kind), (reply::FLAG_DONE, reply::ERROR));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EIO);
    assert!(String::from_utf8_lossy(&p[6..]).contains("c0ffee"));
    let (got, _) = c.structured_read(0, 4096, 0).await;
    assert!(got.unwrap() == pattern(4096));
}

#[tokio::test]
async fn a_client_vanishing_mid_request_ends_only_its_connection() {
    let mut c = start(two_exports().0);
    c.go("rw", false).await;
    c.request(cmd::WRITE, 0, 1, 0, 4096).await;
    c.s.write_all(&[1; 100]).await.unwrap();
    drop(c.s);
    let e = c.server.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("write payload"), "{e}");
}

/// A client on its own duplex pipe of `pipe` bytes, served by `server`.
fn attach(server: &Server, pipe: usize) -> Client {
    let (c, s) = tokio::io::duplex(pipe);
    let server = server.clone();
    let task = tokio::spawn(async move { server.serve_connection(s).await });
    Client {
        s: c,
        server: task,
        log: Arc::new(Mutex::new(Vec::new())),
    }
}

/// A server whose whole buffer budget is one 1 MiB payload.
fn one_payload_server(wait: std::time::Duration, log: Arc<Mutex<Vec<String>>>) -> Server {
    let limits = tessera_nbd::Limits {
        max_payload: 1 << 20,
        ..Default::default()
    };
    Server::builder(two_exports().0)
        .limits(limits)
        .buffer_budget(1 << 20)
        .budget_wait(wait)
        .max_in_flight(64)
        .log(Arc::new(move |l: &str| {
            log.lock().unwrap().push(l.to_string())
        }))
        .build()
}

#[tokio::test]
async fn a_small_buffer_budget_makes_requests_wait_not_fail() {
    let hour = std::time::Duration::from_secs(3600);
    let server = one_payload_server(hour, Arc::new(Mutex::new(Vec::new())));
    let data = pattern(1 << 20);
    // A holds the whole budget: its 1 MiB reply does not fit its 4 KiB pipe (nor the
    // server's 64 KiB write buffer).
    let mut a = attach(&server, 4096);
    a.go("mem", false).await;
    a.request(cmd::READ, 0, 1, 0, 1 << 20).await;
    assert_eq!(a.simple().await, (0, 1), "A's reply has started");
    // B's 4 KiB read waits for A's buffer: no reply while A reads nothing.
    let mut b = attach(&server, 1 << 20);
    b.go("mem", false).await;
    b.request(cmd::READ, 0, 2, 4096, 4096).await;
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), b.s.read_u32()).await;
    assert!(
        early.is_err(),
        "B was answered while A held the whole budget"
    );
    // A reads its reply: the budget comes back and B gets its answer.
    let mut got = vec![0u8; 1 << 20];
    a.s.read_exact(&mut got).await.unwrap();
    assert!(got == data);
    assert_eq!(b.simple().await, (0, 2));
    let mut got = vec![0u8; 4096];
    b.s.read_exact(&mut got).await.unwrap();
    assert!(got == data[4096..8192]);
    // Pipelined reads of one client queue behind each other and all complete.
    let (mut rd, mut wr) = tokio::io::split(b.s);
    let sender = tokio::spawn(async move {
        for i in 0..16u64 {
            let r = Request {
                flags: 0,
                kind: cmd::READ,
                cookie: i,
                offset: i * 65536,
                len: 65536,
            };
            wr.write_all(&wire::encode_request(&r)).await.unwrap();
        }
        let r = Request {
            flags: 0,
            kind: cmd::DISC,
            cookie: 99,
            offset: 0,
            len: 0,
        };
        wr.write_all(&wire::encode_request(&r)).await.unwrap();
        wr
    });
    for _ in 0..16 {
        assert_eq!(rd.read_u32().await.unwrap(), wire::SIMPLE_REPLY_MAGIC);
        assert_eq!(rd.read_u32().await.unwrap(), 0);
        let cookie = rd.read_u64().await.unwrap() as usize;
        let mut b = vec![0u8; 65536];
        rd.read_exact(&mut b).await.unwrap();
        assert!(b == data[cookie * 65536..(cookie + 1) * 65536]);
    }
    sender.await.unwrap();
    assert!(b.server.await.unwrap().is_ok());
}

#[tokio::test]
async fn a_bounded_wait_for_memory_drops_the_stalled_holder() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let server = one_payload_server(std::time::Duration::from_millis(200), log.clone());
    let mut a = attach(&server, 4096);
    a.go("mem", false).await;
    a.request(cmd::READ, 0, 1, 0, 1 << 20).await;
    assert_eq!(a.simple().await, (0, 1));
    let mut b = attach(&server, 1 << 20);
    b.go("mem", false).await;
    b.request(cmd::READ, 0, 2, 4096, 4096).await;
    // A never reads: after B waited, A (stalled, holding everything) is dropped.
    let answered = tokio::time::timeout(std::time::Duration::from_secs(20), b.simple()).await;
    assert_eq!(answered.expect("B is answered"), (0, 2));
    let e = a.server.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), tessera_nbd::error::ErrorKind::Limit, "{e}");
    assert!(e.to_string().contains("no progress"), "{e}");
    let log = log.lock().unwrap().join("\n");
    assert!(log.contains("reclaiming buffer memory"), "{log}");
}

#[tokio::test]
async fn a_slow_reader_that_keeps_reading_is_not_dropped() {
    let server = Server::builder(two_exports().0)
        .reply_timeout(std::time::Duration::from_millis(300))
        .build();
    let mut c = attach(&server, 65536);
    c.go("mem", false).await;
    c.request(cmd::READ, 0, 1, 0, 1 << 20).await;
    assert_eq!(c.simple().await, (0, 1));
    // 1 MiB in 64 KiB steps, 100 ms apart: 1.6 s in all, far over the reply timeout,
    // but never 300 ms without progress.
    let mut got = Vec::new();
    while got.len() < 1 << 20 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut b = vec![0u8; 65536];
        c.s.read_exact(&mut b).await.unwrap();
        got.extend_from_slice(&b);
    }
    assert!(got == pattern(1 << 20));
    c.request(cmd::DISC, 0, 2, 0, 0).await;
    assert!(c.server.await.unwrap().is_ok());
}

#[tokio::test]
async fn an_idle_timeout_closes_a_silent_connection_but_not_a_busy_one() {
    let server = Server::builder(two_exports().0)
        .idle_timeout(Some(std::time::Duration::from_millis(300)))
        .build();
    let mut c = attach(&server, 1 << 20);
    c.go("mem", false).await;
    c.request(cmd::READ, 0, 1, 0, 4096).await;
    assert_eq!(c.simple().await, (0, 1));
    let mut b = vec![0u8; 4096];
    c.s.read_exact(&mut b).await.unwrap();
    let e = tokio::time::timeout(std::time::Duration::from_secs(20), c.server)
        .await
        .expect("the idle connection is closed")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, tessera_nbd::Error::Idle(_)), "{e}");
    // A request that takes longer than the idle timeout keeps its connection.
    let mut e = Exports::new();
    e.add(Export::new("slow", Arc::new(Slow) as Arc<dyn Backend>));
    let server = Server::builder(e)
        .idle_timeout(Some(std::time::Duration::from_millis(300)))
        .build();
    let mut c = attach(&server, 1 << 20);
    c.go("slow", false).await;
    c.request(cmd::READ, 0, 1, 0, 4096).await;
    assert_eq!(c.simple().await, (0, 1));
    let mut b = vec![0u8; 4096];
    c.s.read_exact(&mut b).await.unwrap();
    c.request(cmd::FLUSH, 0, 2, 0, 0).await;
    assert_eq!(
        c.simple().await,
        (0, 2),
        "still connected after a long request"
    );
}

/// A backend whose reads take 1 s.
struct Slow;

impl Backend for Slow {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            writable: false,
            multi_conn: true,
        }
    }
    fn read(&self, _offset: u64, buf: &mut [u8]) -> BackendResult<Vec<Extent>> {
        std::thread::sleep(std::time::Duration::from_secs(1));
        buf.fill(0);
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_client_that_reads_no_replies_is_dropped() {
    let server = Server::builder(two_exports().0)
        .reply_timeout(std::time::Duration::from_millis(300))
        .build();
    let (mut c, s) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move { server.serve_connection(s).await });
    let mut client = Client {
        s: c,
        server: task,
        log: Arc::new(Mutex::new(Vec::new())),
    };
    client.go("mem", false).await;
    c = client.s;
    for i in 0..64u64 {
        let r = Request {
            flags: 0,
            kind: cmd::READ,
            cookie: i,
            offset: 0,
            len: 65536,
        };
        c.write_all(&wire::encode_request(&r)).await.unwrap();
    }
    let e = tokio::time::timeout(std::time::Duration::from_secs(10), client.server)
        .await
        .expect("the server gives up on the client")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), tessera_nbd::error::ErrorKind::Timeout, "{e}");
    drop(c);
}

/// xorshift64*: deterministic noise without a dependency.
fn noise(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[tokio::test]
async fn random_handshakes_and_requests_never_panic_the_server() {
    let mut seed = 0x1234_5678_9abc_def1u64;
    for round in 0..300 {
        let mut c = start(two_exports().0);
        let structured = round % 2 == 0;
        if round < 150 {
            // Random option traffic after a valid greeting, with valid magics half the time.
            c.greet(1).await;
            let mut bytes = Vec::new();
            for _ in 0..(noise(&mut seed) % 6) {
                if noise(&mut seed) % 2 == 0 {
                    bytes.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
                    bytes.extend_from_slice(&((noise(&mut seed) % 13) as u32).to_be_bytes());
                    let len = (noise(&mut seed) % 40) as u32;
                    bytes.extend_from_slice(&len.to_be_bytes());
                }
                for _ in 0..(noise(&mut seed) % 48) {
                    bytes.push(noise(&mut seed) as u8);
                }
            }
            let _ = c.s.write_all(&bytes).await;
        } else {
            // Requests with a valid magic and random everything else.
            c.go(if round % 3 == 0 { "rw" } else { "mem" }, structured)
                .await;
            for _ in 0..20 {
                let r = Request {
                    flags: noise(&mut seed) as u16 & 0x3f,
                    kind: (noise(&mut seed) % 10) as u16,
                    cookie: noise(&mut seed),
                    offset: match noise(&mut seed) % 3 {
                        0 => noise(&mut seed),
                        _ => noise(&mut seed) % (2 << 20),
                    },
                    len: match noise(&mut seed) % 3 {
                        0 => noise(&mut seed) as u32,
                        _ => (noise(&mut seed) % 300_000) as u32,
                    },
                };
                if r.kind == cmd::WRITE || r.kind == cmd::DISC {
                    continue;
                }
                let _ = c.s.write_all(&wire::encode_request(&r)).await;
            }
        }
        // Drain whatever the server answers, then hang up.
        let _ = c.s.shutdown().await;
        let mut s = c.s;
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), c.server)
            .await
            .expect("the server ends the connection");
        assert!(done.is_ok(), "round {round}: the connection task panicked");
        drain.abort();
    }
}

#[tokio::test]
async fn export_name_over_64k_closes_without_a_reply() {
    let mut c = start(two_exports().0);
    c.greet(wire::CLIENT_FIXED_NEWSTYLE).await;
    let (mut rd, mut wr) = tokio::io::split(c.s);
    // The server may hang up before taking it all: write errors are expected.
    let writer = tokio::spawn(async move {
        let _ = wr.write_u64(wire::IHAVEOPT).await;
        let _ = wr.write_u32(opt::EXPORT_NAME).await;
        let _ = wr.write_u32(70_000).await;
        let _ = wr.write_all(&vec![b'a'; 70_000]).await;
        wr
    });
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.is_empty(),
        "no reply of any kind: {} bytes",
        rest.len()
    );
    let e = c.server.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), tessera_nbd::error::ErrorKind::Protocol, "{e}");
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn trim_past_the_end_is_einval_and_writes_past_the_end_enospc() {
    let mut c = start(two_exports().0);
    c.go("rw", false).await;
    let size = 1u64 << 20;
    c.request(cmd::TRIM, 0, 1, size - 2, 4).await;
    assert_eq!(c.simple().await, (EINVAL, 1));
    c.request(cmd::TRIM, 0, 2, u64::MAX - 1, 4).await;
    assert_eq!(c.simple().await, (EINVAL, 2));
    c.request(cmd::WRITE_ZEROES, 0, 3, size - 2, 4).await;
    assert_eq!(c.simple().await, (ENOSPC, 3));
    c.request(cmd::TRIM, 0, 4, size - 4, 4).await;
    assert_eq!(c.simple().await, (0, 4));
}

#[tokio::test]
async fn oversized_reads_are_einval_and_eoverflow_only_for_df() {
    let big = 33u32 << 20;
    let mut c = start(two_exports().0);
    c.go("mem", false).await;
    c.request(cmd::READ, 0, 1, 0, big).await;
    assert_eq!(c.simple().await, (EINVAL, 1), "simple replies");
    let mut c = start(two_exports().0);
    c.go("mem", true).await;
    for (cookie, flags, want) in [(2, 0, EINVAL), (3, cmd_flag::DF, EOVERFLOW)] {
        c.request(cmd::READ, flags, cookie, 0, big).await;
        let (f, kind, got_cookie, p) = c.chunk().await;
        assert_eq!(
            (f, kind, got_cookie),
            (reply::FLAG_DONE, reply::ERROR, cookie)
        );
        assert_eq!(
            u32::from_be_bytes(p[..4].try_into().unwrap()),
            want,
            "flags {flags}"
        );
    }
}

#[tokio::test]
async fn client_names_are_cut_in_logs_and_messages() {
    let name = "n".repeat(4096);
    // An unknown name in NBD_OPT_INFO: the error message quotes at most a prefix.
    let mut c = start(two_exports().0);
    c.greet(wire::CLIENT_FIXED_NEWSTYLE).await;
    c.option(opt::INFO, &go_data(&name, &[])).await;
    let r = c.option_replies().await;
    assert_eq!(r[0].0, rep::ERR_UNKNOWN);
    assert!(r[0].1.len() < 200, "message of {} bytes", r[0].1.len());
    assert!(String::from_utf8_lossy(&r[0].1).contains("(4096 bytes)"));
    // An unknown name in NBD_OPT_EXPORT_NAME ends the connection; so does the reason.
    c.option(opt::EXPORT_NAME, name.as_bytes()).await;
    let e = c.server.await.unwrap().unwrap_err().to_string();
    assert!(e.len() < 200, "{} bytes: {e}", e.len());
    assert!(e.contains("(4096 bytes)"), "{e}");
}

#[tokio::test]
async fn too_many_options_end_the_negotiation() {
    let mut c = start(two_exports().0);
    c.greet(wire::CLIENT_FIXED_NEWSTYLE).await;
    let mut answered = 0;
    loop {
        c.option(opt::LIST, &[]).await;
        let (_, kind, _) = c.option_reply().await;
        if kind == rep::ERR_POLICY {
            break;
        }
        // The rest of this LIST's replies.
        while c.option_reply().await.1 != rep::ACK {}
        answered += 1;
        assert!(answered <= 1000, "the server answers options forever");
    }
    assert!(answered >= 16, "real clients need a few options");
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert!(c.server.await.unwrap().is_err());
}

#[tokio::test]
async fn a_client_that_does_not_finish_the_handshake_is_dropped() {
    let server = Server::builder(two_exports().0)
        .handshake_timeout(std::time::Duration::from_millis(300))
        .build();
    let mut c = attach(&server, 1 << 20);
    c.greet(wire::CLIENT_FIXED_NEWSTYLE).await;
    // Half an option header, then nothing.
    c.s.write_all(&wire::IHAVEOPT.to_be_bytes()).await.unwrap();
    let e = tokio::time::timeout(std::time::Duration::from_secs(20), c.server)
        .await
        .expect("the server gives up on the client")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, tessera_nbd::Error::Timeout(_)), "{e}");
}

#[tokio::test]
async fn a_failed_set_meta_context_clears_the_earlier_selection() {
    // "Issuing this command replaces all previously-set metadata contexts (including
    // when this command fails)": after a failing SET, BLOCK_STATUS has no context.
    for failing in [meta("nope", &["base:allocation"]), b"\0\0\0\x03me".to_vec()] {
        let mut c = start(two_exports().0);
        c.greet(wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES)
            .await;
        c.option(opt::STRUCTURED_REPLY, &[]).await;
        assert_eq!(c.option_replies().await[0].0, rep::ACK);
        c.option(opt::SET_META_CONTEXT, &meta("mem", &["base:allocation"]))
            .await;
        assert_eq!(c.option_replies().await[0].0, rep::META_CONTEXT);
        c.option(opt::SET_META_CONTEXT, &failing).await;
        let r = c.option_replies().await;
        assert!(r[0].0 & (1 << 31) != 0, "the SET fails: {r:?}");
        c.option(opt::GO, &go_data("mem", &[])).await;
        assert_eq!(c.option_replies().await.last().unwrap().0, rep::ACK);
        c.request(cmd::BLOCK_STATUS, 0, 1, 0, 4096).await;
        let (_, kind, _, p) = c.chunk().await;
        assert_eq!(kind, reply::ERROR);
        assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EINVAL);
    }
}

#[tokio::test]
async fn a_flood_of_failing_requests_does_not_flood_the_log() {
    let mut e = Exports::new();
    e.add(Export::new(
        "f",
        Arc::new(Flaky {
            inner: MemoryBackend::new(pattern(1 << 20), false),
            bad: 0,
        }) as Arc<dyn Backend>,
    ));
    let mut c = start(e);
    c.go("f", false).await;
    // 200 reads of a corrupt chunk, each answered with EIO.
    for i in 0..200 {
        c.request(cmd::READ, 0, i, 0, 512).await;
        assert_eq!(c.simple().await, (EIO, i));
    }
    let lines = |c: &Client| {
        c.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("corrupt chunk c0ffee"))
            .count()
    };
    let logged = lines(&c);
    assert!(
        (1..200).contains(&logged),
        "{logged} lines for 200 failures"
    );
    // A second later, a failure is logged again, with the count of those held back.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    c.request(cmd::READ, 0, 999, 0, 512).await;
    assert_eq!(c.simple().await, (EIO, 999));
    assert_eq!(lines(&c), logged + 1);
    let log = c.log.lock().unwrap().join("\n");
    assert!(
        log.contains(&format!("{} more failed requests not logged", 200 - logged)),
        "{log}"
    );
}
