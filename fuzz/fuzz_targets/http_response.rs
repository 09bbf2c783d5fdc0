//! HTTP store responses: whatever a server or CDN answers (any status line, headers,
//! length, body), the remote store must return an error or exactly what was asked, never
//! panic or hang. The input is the raw response, served by a local TCP server to
//! `RemoteStore`'s real client, which asks for bytes 100..164 of a pack (a 206 with
//! `Content-Range: bytes 100-163/N` and 64 bytes is the success path), then for the
//! whole of a file of at most 64 bytes, then for a file's size. Answers that redirect (to
//! any scheme), claim another range or bodies past the length asked must fail, not be
//! followed out of http or read past the length.
#![no_main]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tessera_engine::StoreRead;
use tessera_stores::{RemoteStore, StoreOptions};

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
    let store =
        RemoteStore::open(&format!("http://127.0.0.1:{port}/store"), &opts).expect("store");
    let rel = format!("packs/ab/{}.tpack", "ab".repeat(32));
    if let Ok(bytes) = store.read_range(&rel, 100, 64) {
        assert_eq!(bytes.len(), 64);
    }
    if let Ok(Some(bytes)) = store.read_file(&rel, 64) {
        assert!(bytes.len() <= 64);
    }
    let _ = store.file_size(&rel);
});
