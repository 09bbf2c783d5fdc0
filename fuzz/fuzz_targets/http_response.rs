//! HTTP store responses: whatever a server or CDN answers to a chunk request (any status
//! line, headers, length, body), the HTTP store must return an error or a verified chunk,
//! never panic or hang. The input is the raw response, served by a local TCP server to
//! `HttpStore`'s real client; the chunk requested is 64 bytes of `x`, so a well-formed
//! 200 answer with its zstd frame is the success path. Answers that redirect (to any
//! scheme) or claim bodies past zstd's bound for 64 bytes must fail, not be followed
//! out of http or read past the bound.
#![no_main]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tessera_engine::index::ChunkEntry;
use tessera_engine::{ChunkId, ChunkStore};
use tessera_stores::{HttpStore, StoreOptions};

/// The response the server sends next, and its port.
fn server() -> &'static (Arc<Mutex<Vec<u8>>>, u16) {
    static SERVER: OnceLock<(Arc<Mutex<Vec<u8>>>, u16)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a local port");
        let port = listener.local_addr().expect("local address").port();
        let response = Arc::new(Mutex::new(Vec::new()));
        let shared = response.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                // Read the request head, then answer and close.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = shared.lock().expect("response lock").clone();
                let _ = conn.write_all(&reply);
            }
        });
        (response, port)
    })
}

fuzz_target!(|data: &[u8]| {
    let (response, port) = server();
    *response.lock().expect("response lock") = data.to_vec();
    let opts = StoreOptions {
        retries: 0,
        jobs: 1,
        timeout: Duration::from_secs(2),
        deadline: Duration::from_secs(4),
        connect_timeout: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    let store = HttpStore::new(&format!("http://127.0.0.1:{port}/store"), &opts).expect("store");
    let content = [b'x'; 64];
    let entry = ChunkEntry {
        id: ChunkId::of(&content),
        offset: 0,
        len: content.len() as u32,
        zero: false,
    };
    if let Ok(chunk) = store.fetch(&entry) {
        assert_eq!(chunk.data(), &content[..]);
    }
});
