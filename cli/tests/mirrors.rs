//! Mirrors (`--store` repeated) through the real binary against nginx: one mirror down and
//! one serving a copy of the store with a flipped byte in a pack; the sync completes and
//! verifies, and stderr names the mirror that failed and why.

mod remote_support;
mod util;

use std::fs;
use std::path::{Path, PathBuf};

use remote_support::*;
use tempfile::TempDir;
use util::*;

struct Published {
    dir: TempDir,
    image: PathBuf,
    store: PathBuf,
}

fn publish() -> Published {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("image.raw");
    fs::write(&image, random_bytes(3_000_000, 11)).unwrap();
    let store = dir.path().join("store");
    run_ok(&[
        &"make",
        &image,
        &"--store",
        &store,
        &"--index",
        &store.join("image.tidx"),
    ]);
    Published { dir, image, store }
}

/// A copy of `store` at `to` with one byte flipped in the middle of the frame of its
/// `n`th chunk; that chunk's id.
fn corrupt_copy(store: &Path, to: &Path, n: usize) -> String {
    for (rel, bytes) in tree_contents(store) {
        let path = to.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }
    let (pack, entry) = pack_frames(to).swap_remove(n);
    let mut bytes = fs::read(&pack).unwrap();
    let at = (entry.offset + u64::from(entry.clen) / 2) as usize;
    bytes[at] ^= 0x10;
    fs::write(&pack, bytes).unwrap();
    entry.id.to_string()
}

#[test]
fn a_dead_and_a_corrupt_mirror_cost_time_not_the_update() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish();
    let bad_store = p.dir.path().join("bad-store");
    let bad_chunk = corrupt_copy(&p.store, &bad_store, 3);
    let corrupt = Nginx::start_with(&bad_store, "", |_| String::new());
    let good = Nginx::start_with(&p.store, "", |_| String::new());
    let dead = format!("http://127.0.0.1:{}", free_port());
    let target = p.dir.path().join("out.raw");
    let out = run(&[
        &"sync",
        &p.store.join("image.tidx"),
        &target,
        &"--store",
        &dead,
        &"--store",
        &corrupt.url(),
        &"--store",
        &good.url(),
        &"--retries",
        &"1",
        &"--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    // Success is reported only after every chunk of the target was hashed.
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["bytes_written"], report["image_size"], "{report}");

    // The dead mirror: warned of once, with why.
    let dead_warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&format!("mirror 1 ({dead})")))
        .collect();
    assert_eq!(dead_warnings.len(), 1, "{stderr}");
    assert!(
        dead_warnings[0].starts_with("tessera: warning:")
            && dead_warnings[0].contains("failed")
            && dead_warnings[0].contains("tried last"),
        "{stderr}"
    );
    // The corrupt mirror: named with the chunk that failed verification.
    let corrupt_line = stderr
        .lines()
        .find(|l| l.contains(&format!("mirror 2 ({})", corrupt.url())))
        .unwrap_or_else(|| panic!("no warning about mirror 2: {stderr}"));
    assert!(
        corrupt_line.contains("failed verification")
            && corrupt_line.contains(&bad_chunk)
            && corrupt_line.contains(&format!("from {}/packs/", corrupt.url()))
            && !corrupt_line.contains(&dead),
        "{corrupt_line}"
    );
    // The bad chunk came from the good mirror, which served only what the corrupt one got
    // wrong (everything else came from the corrupt mirror, ahead of it).
    let good_log = good.requests();
    assert!(!good_log.is_empty(), "the good mirror served the bad chunk");
    assert!(
        good_log.len() < corrupt.requests().len(),
        "good {good_log:?} corrupt {:?}",
        corrupt.requests()
    );
}

#[test]
fn every_mirror_failing_names_each_and_writers_refuse_mirrors() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish();
    let empty = TempDir::new().unwrap();
    let lagging = Nginx::start_with(empty.path(), "", |_| String::new());
    let dead = format!("http://127.0.0.1:{}", free_port());
    let target = p.dir.path().join("out.raw");
    let err = run_err(&[
        &"sync",
        &p.store.join("image.tidx"),
        &target,
        &"--store",
        &lagging.url(),
        &"--store",
        &dead,
        &"--retries",
        &"0",
    ]);
    assert!(
        err.contains(&format!("mirror 2 ({dead})")) && err.contains("every mirror failed"),
        "{err}"
    );
    // A mirror lacking the index's files while another has them is passed over.
    let good = Nginx::start_with(&p.store, "", |_| String::new());
    let out = run(&[
        &"sync",
        &p.store.join("image.tidx"),
        &target,
        &"--store",
        &lagging.url(),
        &"--store",
        &good.url(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    assert!(
        stderr.contains(&format!("mirror 1 ({}) lacks", lagging.url())),
        "{stderr}"
    );
    // Writers and check work on one store.
    for cmd in ["check", "prune"] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &cmd,
            &"--store",
            &p.store,
            &"--store",
            &"/nonexistent-mirror",
        ];
        if cmd == "prune" {
            args.extend([&"--keep" as &dyn AsRef<std::ffi::OsStr>, &"x.tidx"]);
        }
        let err = run_err(&args);
        assert!(err.contains("mirrors are for readers"), "{cmd}: {err}");
    }
}
