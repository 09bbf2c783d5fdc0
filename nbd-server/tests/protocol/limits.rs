//! Misbehaving clients against a TCP server: none of them may keep a well-behaved client
//! from connecting and reading. Each attack keeps running while the good client reads,
//! and the good client must be done long before anything the attackers hold would time
//! out on its own (reply timeout 60 s, handshake timeout set to 60 s): it is served
//! because of the limits, not because the attackers went away.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_nbd::{Backend, Export, Exports, MemoryBackend};

use crate::util::{have, pattern, run_within, serve_with, RawClient};

/// Far below the attackers' own timeouts (60 s), far above a loaded machine's noise.
const GOOD_CLIENT_LIMIT: Duration = Duration::from_secs(20);

/// "mem": 1 MiB pattern; "big": 32 MiB of zeros, for maximum-size reads.
fn exports() -> Exports {
    let mut e = Exports::new();
    e.add(Export::new(
        "mem",
        Arc::new(MemoryBackend::new(pattern(1 << 20), false)) as Arc<dyn Backend>,
    ));
    e.add(Export::new(
        "big",
        Arc::new(MemoryBackend::new(vec![0; 32 << 20], false)) as Arc<dyn Backend>,
    ));
    e
}

/// The well-behaved client: connects, negotiates, reads 4 KiB and checks it. Returns how
/// long that took.
fn good_client(addr: std::net::SocketAddr) -> Duration {
    let start = Instant::now();
    let mut c = RawClient::go(addr, "mem", GOOD_CLIENT_LIMIT)
        .unwrap_or_else(|e| panic!("the good client could not negotiate: {e}"));
    let data = c
        .read(8192, 4096)
        .unwrap_or_else(|e| panic!("the good client could not read: {e}"));
    assert!(data == pattern(12288)[8192..]);
    let took = start.elapsed();
    eprintln!("good client served in {took:?}");
    took
}

#[test]
fn silent_clients_after_the_handshake_do_not_lock_out_a_new_client() {
    let srv = serve_with(exports(), |b| {
        b.max_connections(64)
            .handshake_timeout(Duration::from_secs(60))
    });
    // 64 clients finish the handshake and go silent, filling the server.
    let silent: Vec<RawClient> = (0..64)
        .map(|_| RawClient::go(srv.addr, "mem", GOOD_CLIENT_LIMIT).unwrap())
        .collect();
    assert!(good_client(srv.addr) < GOOD_CLIENT_LIMIT);
    let mut newcomers = 1;
    // A real client too (python3-libnbd is installed for the system interpreter).
    if have("nbdsh") {
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        run_within(
            Command::new("nbdsh").env("PATH", path).args([
                "-u",
                &srv.uri("mem"),
                "-c",
                "assert h.pread(4096, 8192) == bytes(((i // 7) & 0xff) | 1 for i in range(8192, 12288))",
            ]),
            GOOD_CLIENT_LIMIT,
        );
        newcomers += 1;
    }
    let log = srv.wait_for_log("evicted");
    assert!(log.contains("evicted for a new connection"), "{log}");
    // Each newcomer made room for itself only (nbdsh may find the slot the first good
    // client left): the other attackers are still connected and served.
    let mut alive = 0;
    for mut c in silent {
        if c.read(0, 512).is_ok() {
            alive += 1;
        }
    }
    assert!(
        (64 - newcomers..=63).contains(&alive),
        "{alive} alive: {log}"
    );
}

#[test]
fn a_thousand_idle_sockets_do_not_lock_out_a_new_client() {
    let srv = serve_with(exports(), |b| b.handshake_timeout(Duration::from_secs(60)));
    let idle: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(srv.addr).unwrap())
        .collect();
    assert!(good_client(srv.addr) < GOOD_CLIENT_LIMIT);
    // With a real client too.
    if have("nbdinfo") {
        run_within(
            Command::new("nbdinfo").arg(srv.uri("mem")),
            GOOD_CLIENT_LIMIT,
        );
    }
    drop(idle);
}

#[test]
fn a_client_that_never_reads_its_replies_does_not_starve_others() {
    let srv = serve_with(exports(), |b| b.handshake_timeout(Duration::from_secs(60)));
    // 16 reads of 32 MiB (the whole default budget of 512 MiB), replies never read.
    let mut hog = RawClient::go(srv.addr, "big", GOOD_CLIENT_LIMIT).unwrap();
    for i in 0..16 {
        hog.send_read(i, 0, 32 << 20).unwrap();
    }
    // The first reply has started: the hog holds its buffers.
    let mut head = [0u8; 16];
    std::io::Read::read_exact(&mut hog.s, &mut head).unwrap();
    assert!(good_client(srv.addr) < GOOD_CLIENT_LIMIT);
    if have("nbdcopy") {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("copy");
        run_within(
            Command::new("nbdcopy").arg(srv.uri("mem")).arg(&out),
            GOOD_CLIENT_LIMIT,
        );
        assert!(std::fs::read(&out).unwrap() == pattern(1 << 20));
    }
    // The hog was not dropped to make this work: it still gets its data when it reads.
    let mut rest = vec![0u8; 1 << 20];
    std::io::Read::read_exact(&mut hog.s, &mut rest).unwrap();
}

#[test]
fn many_connections_of_one_peer_holding_replies_do_not_starve_another_peer() {
    let srv = serve_with(exports(), |b| b.handshake_timeout(Duration::from_secs(60)));
    let addr = srv.addr;
    // 63 connections from 127.0.0.2, each sending 16 reads of 32 MiB and reading nothing.
    let hogs: Vec<RawClient> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..63)
            .map(|_| {
                s.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let sock = rt.block_on(async {
                        let sock = tokio::net::TcpSocket::new_v4().unwrap();
                        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                        sock.connect(addr).await.unwrap().into_std().unwrap()
                    });
                    sock.set_nonblocking(false).unwrap();
                    let mut c = RawClient::go_on(sock, "big", GOOD_CLIENT_LIMIT).unwrap();
                    for i in 0..16 {
                        c.send_read(i, 0, 32 << 20).unwrap();
                    }
                    c
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    // A client of another peer (127.0.0.1) still finds memory.
    assert!(good_client(addr) < GOOD_CLIENT_LIMIT);
    drop(hogs);
}

#[test]
fn a_failed_reply_says_why_in_the_log() {
    let srv = serve_with(exports(), |b| b);
    let mut c = RawClient::go(srv.addr, "big", GOOD_CLIENT_LIMIT).unwrap();
    let local = c.s.local_addr().unwrap().to_string();
    c.send_read(1, 0, 32 << 20).unwrap();
    let mut head = [0u8; 16];
    std::io::Read::read_exact(&mut c.s, &mut head).unwrap();
    // Closing with unread data resets the connection under the server's writer.
    drop(c);
    let log = srv.wait_for_log("sending a reply");
    let line = log
        .lines()
        .find(|l| l.starts_with(&local))
        .unwrap_or_else(|| panic!("no line for {local}: {log}"))
        .to_lowercase();
    assert!(line.contains("sending a reply"), "{line}");
    assert!(
        line.contains("reset") || line.contains("broken pipe"),
        "the line says why: {line}"
    );
}

#[test]
fn a_full_server_evicts_the_longest_idle_connection_or_refuses_when_all_are_busy() {
    let srv = serve_with(exports(), |b| {
        b.max_connections(2)
            .handshake_timeout(Duration::from_secs(60))
            // Busy connections only become evictable for being slow after this long.
            .budget_wait(Duration::from_secs(60))
    });
    // Two idle clients fill the server: a third takes the place of the older one.
    let mut older = RawClient::go(srv.addr, "mem", GOOD_CLIENT_LIMIT).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut newer = RawClient::go(srv.addr, "mem", GOOD_CLIENT_LIMIT).unwrap();
    newer.read(0, 512).unwrap();
    good_client(srv.addr);
    let log = srv.wait_for_log("evicted");
    assert!(log.contains("(2 connections at most); idle for"), "{log}");
    assert!(
        older.read(0, 512).is_err(),
        "the longest-idle client was closed"
    );
    newer.read(0, 512).unwrap();
    drop(older);
    // Two clients with requests in flight (replies they do not read): nobody to evict.
    drop(newer);
    let mut busy: Vec<RawClient> = Vec::new();
    let deadline = Instant::now() + GOOD_CLIENT_LIMIT;
    while busy.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the closed clients' slots never freed"
        );
        // Slots free up as the closed clients' connections end.
        if let Ok(mut c) = RawClient::go(srv.addr, "big", Duration::from_secs(2)) {
            c.send_read(1, 0, 32 << 20).unwrap();
            let mut head = [0u8; 16];
            std::io::Read::read_exact(&mut c.s, &mut head).unwrap();
            busy.push(c);
        }
    }
    assert!(
        RawClient::go(srv.addr, "mem", GOOD_CLIENT_LIMIT).is_err(),
        "a client is refused when every connection is busy"
    );
    let log = srv.wait_for_log("refused");
    assert!(log.contains("connections are all busy (limit 2)"), "{log}");
}

/// Sends a WRITE header of `len` bytes and the first byte of its payload, then trickles
/// one more byte every 100 ms from a thread until `stop` (so that the payload is never
/// stalled for long): a slowloris in transmission.
fn trickling_writer(
    addr: std::net::SocketAddr,
    len: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let mut c = RawClient::go(addr, "mem", GOOD_CLIENT_LIMIT).unwrap();
    let r = tessera_nbd::wire::Request {
        flags: 0,
        kind: tessera_nbd::wire::cmd::WRITE,
        cookie: 1,
        offset: 0,
        len,
    };
    std::io::Write::write_all(&mut c.s, &tessera_nbd::wire::encode_request(&r)).unwrap();
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if std::io::Write::write_all(&mut c.s, &[0]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn clients_trickling_write_payloads_do_not_lock_out_a_new_client() {
    let srv = serve_with(exports(), |b| {
        b.max_connections(8)
            .handshake_timeout(Duration::from_secs(60))
            .budget_wait(Duration::from_millis(200))
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Every slot holds a request in flight whose payload never ends: 4 of them within the
    // maximum payload (holding a little budget), 4 over it (drained, holding none).
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let len = if i % 2 == 0 { 1 << 20 } else { u32::MAX };
            trickling_writer(srv.addr, len, stop.clone())
        })
        .collect();
    // Let the trickles run longer than the budget wait: they are slow, not just starting.
    std::thread::sleep(Duration::from_secs(1));
    assert!(good_client(srv.addr) < GOOD_CLIENT_LIMIT);
    let log = srv.wait_for_log("evicted");
    assert!(log.contains("evicted for a new connection"), "{log}");
    assert!(
        log.contains("B/s"),
        "the log says how slow the victim was: {log}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}

/// Connects from `ip` and negotiates "big".
fn connect_from(ip: &str, addr: std::net::SocketAddr) -> RawClient {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sock = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        sock.connect(addr).await.unwrap().into_std().unwrap()
    });
    sock.set_nonblocking(false).unwrap();
    RawClient::go_on(sock, "big", GOOD_CLIENT_LIMIT).unwrap()
}

#[test]
fn clients_reading_their_replies_at_a_trickle_do_not_starve_others_of_memory() {
    let srv = serve_with(exports(), |b| b.handshake_timeout(Duration::from_secs(60)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two peers with two connections each take their whole share (4 reads of 32 MiB a
    // connection, 512 MiB in all: the whole budget) and read the replies at 2.5 MiB/s,
    // never stalling long enough to count as stalled.
    let threads: Vec<_> = ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|ip| {
            let mut c = connect_from(ip, srv.addr);
            for i in 0..4 {
                c.send_read(i, 0, 32 << 20).unwrap();
            }
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 << 10];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if std::io::Read::read_exact(&mut c.s, &mut buf).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    // At that pace the hogs would hold the memory for almost a minute.
    assert!(good_client(srv.addr) < GOOD_CLIENT_LIMIT);
    let log = srv.wait_for_log("reclaiming");
    assert!(
        log.contains("B/s"),
        "the log says how slow the holder was: {log}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_flood_of_garbage_connections_does_not_flood_the_log() {
    let srv = serve_with(exports(), |b| b);
    // 300 connections that break the protocol at once (bad client flags).
    for _ in 0..300 {
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        let mut greeting = [0u8; 18];
        std::io::Read::read_exact(&mut s, &mut greeting).unwrap();
        std::io::Write::write_all(&mut s, &0x8000_0000u32.to_be_bytes()).unwrap();
        // Wait for the server to close it: every connection has ended when we go on.
        let _ = std::io::Read::read(&mut s, &mut greeting);
    }
    // The server still serves, and its last lines include the count of those not logged.
    assert!(good_client(srv.addr) < GOOD_CLIENT_LIMIT);
    // Stopping the server logs the count of lines held back.
    let lines = srv.log.clone();
    drop(srv);
    let log = lines.lock().unwrap().join("\n");
    let failures = log
        .lines()
        .filter(|l| l.contains("unknown client flags"))
        .count();
    assert!(failures >= 1, "{log}");
    assert!(
        failures < 300,
        "one line per garbage connection: {failures}"
    );
    assert!(log.contains("more failed connections not logged"), "{log}");
}
