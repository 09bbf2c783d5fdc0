//! Exit codes by class (docs/INTEGRATION.md): 3 retry later (network, store incomplete),
//! 4 refused (trust, corrupt data), 5 broken (local I/O), 6 invalid request, 1 a target
//! that does not hold the image.

mod remote_support;
mod util;

use std::fs;
use std::path::{Path, PathBuf};

use remote_support::*;
use tempfile::TempDir;
use util::*;

fn code(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (i32, String) {
    let out = run(args);
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn made(dir: &Path) -> (Vec<u8>, PathBuf, PathBuf) {
    let image = random_bytes(2_000_000, 9);
    let path = dir.join("image.raw");
    fs::write(&path, &image).unwrap();
    let store = dir.join("store");
    let index = dir.join("image.tidx");
    run_ok(&[&"make", &path, &"--store", &store, &"--index", &index]);
    (image, store, index)
}

#[test]
fn network_failures_say_retry_later() {
    let dir = TempDir::new().unwrap();
    let store = format!("http://127.0.0.1:{}", free_port());
    let url = format!("{store}/image.tidx");
    let target = dir.path().join("t.raw");
    let (c, err) = code(&[
        &"sync",
        &url,
        &target,
        &"--store",
        &store,
        &"--retries",
        &"0",
    ]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains(&url), "{err}");
}

#[test]
fn every_mirror_unreachable_says_retry_later() {
    let dir = TempDir::new().unwrap();
    let (_, _, index) = made(dir.path());
    let dead = |_| format!("http://127.0.0.1:{}", free_port());
    let (one, two) = (dead(1), dead(2));
    let target = dir.path().join("t.raw");
    let (c, err) = code(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &one,
        &"--store",
        &two,
        &"--retries",
        &"0",
    ]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("every mirror failed"), "{err}");
}

#[test]
fn a_store_missing_a_pack_says_retry_later() {
    let dir = TempDir::new().unwrap();
    let (_, store, index) = made(dir.path());
    for pack in pack_files(&store) {
        fs::remove_file(pack).unwrap();
    }
    let target = dir.path().join("t.raw");
    let (c, err) = code(&[&"sync", &index, &target, &"--store", &store]);
    assert_eq!(c, 3, "{err}");
}

#[test]
fn untrusted_indexes_and_corrupt_chunks_are_refused() {
    let dir = TempDir::new().unwrap();
    let (_, store, index) = made(dir.path());
    let target = dir.path().join("t.raw");
    let wrong = "ab".repeat(32);
    let (c, err) = code(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &store,
        &"--root-hash",
        &wrong,
    ]);
    assert_eq!(c, 4, "{err}");

    let garbage = dir.path().join("garbage.tidx");
    fs::write(&garbage, b"not an index at all").unwrap();
    let (c, err) = code(&[&"sync", &garbage, &target, &"--store", &store]);
    assert_eq!(c, 4, "{err}");

    // Every pack's bytes flipped in the middle: chunks no longer hash to their ids.
    for pack in pack_files(&store) {
        let mut bytes = fs::read(&pack).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid - 5000..mid + 5000] {
            *b ^= 0x55;
        }
        fs::write(&pack, bytes).unwrap();
    }
    let (c, err) = code(&[&"sync", &index, &target, &"--store", &store]);
    assert_eq!(c, 4, "{err}");
}

#[test]
fn local_io_failures_are_broken() {
    let dir = TempDir::new().unwrap();
    let (_, store, index) = made(dir.path());
    let target = dir.path().join("no-such-dir").join("t.raw");
    let (c, err) = code(&[&"sync", &index, &target, &"--store", &store]);
    assert_eq!(c, 5, "{err}");
    let seed = dir.path().join("no-such-seed");
    let target = dir.path().join("t.raw");
    let (c, err) = code(&[
        &"sync", &index, &target, &"--store", &store, &"--seed", &seed,
    ]);
    assert_eq!(c, 5, "{err}");
    assert!(err.contains("no-such-seed"), "{err}");
}

#[test]
fn impossible_requests_are_invalid_and_mismatches_are_1() {
    let dir = TempDir::new().unwrap();
    let (image, store, index) = made(dir.path());
    let target = dir.path().join("t.raw");
    let journal = dir.path().join("not-a-journal");
    fs::write(&journal, b"something else entirely").unwrap();
    let (c, err) = code(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &store,
        &"--journal",
        &journal,
    ]);
    assert_eq!(c, 6, "{err}");

    let mut other = image.clone();
    other[5] ^= 1;
    fs::write(&target, &other).unwrap();
    let (c, err) = code(&[&"verify", &index, &target]);
    assert_eq!(c, 1, "{err}");
    // Usage errors stay clap's 2.
    let (c, _) = code(&[&"sync", &"--no-such-flag"]);
    assert_eq!(c, 2);
}
