//! libnbd and qemu clients against `MemoryBackend` exports.

use std::process::Command;

use crate::util::{have, pattern, run, serve, two_exports};

#[test]
fn nbdinfo_reports_size_flags_block_sizes_and_holes() {
    if !have("nbdinfo") {
        return;
    }
    let (exports, _) = two_exports();
    let srv = serve(exports);
    let json = run(Command::new("nbdinfo").arg("--json").arg(srv.uri("mem")));
    assert!(json.contains("\"export-size\": 1048576"), "{json}");
    assert!(json.contains("\"is_read_only\": true"), "{json}");
    assert!(json.contains("\"can_multi_conn\": true"), "{json}");
    assert!(json.contains("\"block_size_minimum\": 1"), "{json}");
    assert!(json.contains("\"block_size_maximum\": 33554432"), "{json}");
    assert!(json.contains("\"description\": \"pattern\""), "{json}");
    let map = run(Command::new("nbdinfo").arg("--map").arg(srv.uri("mem")));
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["0", "65536", "0"], "{map}");
    assert_eq!(lines[1][..3], ["65536", "131072", "3"], "{map}");
    assert_eq!(lines[2][..3], ["196608", "851968", "0"], "{map}");
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(srv.uri("")));
    assert!(
        list.contains("\"export-name\": \"mem\"") && list.contains("\"export-name\": \"rw\""),
        "{list}"
    );
}

#[test]
fn qemu_img_convert_copies_the_export() {
    if !have("qemu-img") {
        return;
    }
    let (exports, _) = two_exports();
    let srv = serve(exports);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(srv.uri("mem"))
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == pattern(1 << 20));
}

#[test]
fn nbdcopy_writes_through_a_writable_export() {
    if !have("nbdcopy") {
        return;
    }
    let (exports, rw) = two_exports();
    let srv = serve(exports);
    run(Command::new("nbdcopy")
        .arg(srv.uri("mem"))
        .arg(srv.uri("rw")));
    assert!(rw.contents() == pattern(1 << 20));
}

#[test]
fn garbage_connections_and_eight_concurrent_clients_leave_the_server_serving() {
    use std::io::{Read, Write};
    if !have("nbdcopy") {
        return;
    }
    let (exports, _) = two_exports();
    let srv = serve(exports);
    // Garbage after the greeting, a truncated option, and a silent client.
    let mut garbage = std::net::TcpStream::connect(srv.addr).unwrap();
    garbage.write_all(&[0xff; 64]).unwrap();
    let mut truncated = std::net::TcpStream::connect(srv.addr).unwrap();
    truncated.write_all(&[0, 0, 0, 1, 0x49, 0x48]).unwrap();
    drop(truncated);
    let _silent = std::net::TcpStream::connect(srv.addr).unwrap();
    let mut sink = Vec::new();
    let _ = garbage.read_to_end(&mut sink);
    let dir = tempfile::tempdir().unwrap();
    let copies: Vec<_> = (0..8)
        .map(|i| {
            let out = dir.path().join(format!("c{i}"));
            let uri = srv.uri("mem");
            std::thread::spawn(move || {
                run(Command::new("nbdcopy").arg(&uri).arg(&out));
                std::fs::read(&out).unwrap()
            })
        })
        .collect();
    for c in copies {
        assert!(c.join().unwrap() == pattern(1 << 20));
    }
    let log = srv.log.lock().unwrap().join("\n");
    assert!(
        log.contains("unknown client flags") || log.contains("protocol violation"),
        "{log}"
    );
}
