//! The Unix socket: a defined mode, and nothing planted at its path is followed or
//! replaced.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use tessera_nbd::{bind_unix, remove_unix_socket};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_socket_gets_the_mode_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    for want in [0o600, 0o660, 0o666] {
        let path = dir.path().join(format!("s{want:o}"));
        let (listener, ino) = bind_unix(&path, want).unwrap();
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket());
        assert_eq!(mode(&path), want, "{}", path.display());
        // It is a working socket at that path.
        let client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (_accepted, _) = listener.accept().await.unwrap();
        drop(client);
        remove_unix_socket(&path, Some(ino)).unwrap();
        assert!(!path.exists());
    }
    // Nothing is left behind next to the socket.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_planted_symlink_or_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"precious").unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = bind_unix(&link, 0o600).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    assert!(e.to_string().contains("link.sock"), "{e}");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    // A dangling symlink is not followed either (bind would create its target).
    let dangling = dir.path().join("dangling.sock");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    assert!(bind_unix(&dangling, 0o600).is_err());
    assert!(!dir.path().join("nowhere").exists());
    // A regular file is not replaced.
    let e = bind_unix(&target, 0o600).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    // remove_unix_socket leaves non-sockets alone.
    remove_unix_socket(&target, None).unwrap();
    assert!(target.exists());
}

#[tokio::test]
async fn a_stale_socket_is_replaced_but_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let (live, _) = bind_unix(&path, 0o600).unwrap();
    let e = bind_unix(&path, 0o600).unwrap_err();
    assert!(e.to_string().contains("another server"), "{e}");
    // The server dies without removing its socket.
    drop(live);
    let (_listener, _) = bind_unix(&path, 0o600).unwrap();
    assert_eq!(mode(&path), 0o600);
}

#[tokio::test]
async fn on_a_unix_socket_a_peer_is_a_user() {
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let (listener, _) = bind_unix(&path, 0o600).unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = log.clone();
    let server = tessera_nbd::Server::builder(crate::util::two_exports().0)
        .max_connections_per_peer(1)
        .log(Arc::new(move |l: &str| {
            sink.lock().unwrap().push(l.to_string())
        }))
        .build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        server
            .serve_unix(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    // Two clients of the same user: the second takes the first one's place.
    let mut first = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut greeting = [0u8; 18];
    first.read_exact(&mut greeting).await.unwrap();
    let mut second = tokio::net::UnixStream::connect(&path).await.unwrap();
    second.read_exact(&mut greeting).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        first.read_to_end(&mut rest),
    )
    .await
    .expect("the first client is closed");
    assert_eq!(closed.unwrap(), 0);
    let uid = std::fs::metadata(dir.path()).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    // The line is written once the connection's task has ended, just after the close.
    let mut line = String::new();
    for _ in 0..1000 {
        line = log.lock().unwrap().join("\n");
        if line.contains("evicted") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        line.contains("evicted for a new connection from the same peer"),
        "{line}"
    );
    assert!(line.contains(&format!("uid {}", uid.unwrap())), "{line}");
    drop(second);
    let _ = stop.send(());
    served.await.unwrap().unwrap();
}
