//! A whole NBD connection from a hostile client: the input is everything the client
//! sends (handshake options, then transmission requests with their payloads), played
//! against a server exporting a small writable in-memory disk over an in-process pipe.
//! The server must answer or drop the connection, never panic or hang.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tessera_nbd::{Export, Exports, MemoryBackend, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut exports = Exports::new();
        exports.add(Export::new(
            "disk",
            Arc::new(MemoryBackend::new(vec![0x5a; 64 * 1024], true)),
        ));
        let server = Server::builder(exports).build();
        let (client, conn) = tokio::io::duplex(1 << 20);
        let (mut rd, mut wr) = tokio::io::split(client);
        let input = data.to_vec();
        let writer = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let reader = async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        };
        let serve = async move {
            let _ = server.serve_connection(conn).await;
        };
        tokio::join!(writer, reader, serve);
    });
});
