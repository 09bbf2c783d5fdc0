//! Pipes: `make -` reads stdin, `sync INDEX -` streams the verified image to stdout (a
//! pipe or a file) using seeds, `verify INDEX -` reads stdin.

mod remote_support;
mod util;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;

use remote_support::*;
use tempfile::TempDir;
use util::*;

/// Runs `tessera ARGS` with `input` written to its stdin through a pipe (from a thread, so
/// a full pipe cannot deadlock) and stdout read from a pipe.
fn piped(args: &[&dyn AsRef<std::ffi::OsStr>], input: &[u8]) -> Output {
    let mut child = tessera()
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // A command that stops reading early closes the pipe: not an error here.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    out
}

/// v1 and v2 sharing their first two thirds, v2 with a run of zeros.
fn releases() -> (Vec<u8>, Vec<u8>) {
    let v1 = random_bytes(6_000_000, 21);
    let mut v2 = v1.clone();
    v2[4_000_000..].copy_from_slice(&random_bytes(2_000_000, 22));
    v2[4_500_000..4_800_000].fill(0);
    (v1, v2)
}

fn make(dir: &Path, name: &str, image: &[u8]) -> (PathBuf, PathBuf) {
    let path = dir.join(format!("{name}.raw"));
    fs::write(&path, image).unwrap();
    let store = dir.join("store");
    let index = dir.join(format!("{name}.tidx"));
    run_ok(&[&"make", &path, &"--store", &store, &"--index", &index]);
    (store, index)
}

#[test]
fn make_from_stdin_gives_the_index_make_from_a_file_gives() {
    let dir = TempDir::new().unwrap();
    let (_, v2) = releases();
    let (store, index) = make(dir.path(), "v2", &v2);
    let again = dir.path().join("again.tidx");
    let out = piped(
        &[
            &"make", &"-", &"--store", &store, &"--index", &again, &"--json",
        ],
        &v2,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&again).unwrap(), fs::read(&index).unwrap());
    let report = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(report["new_chunks"], 0, "{report}");
    assert_eq!(report["image_size"], v2.len() as u64);

    // Into a fresh store, then synced back: the bytes made it.
    let store2 = dir.path().join("store2");
    let fresh = dir.path().join("fresh.tidx");
    let out = piped(
        &[&"make", &"-", &"--store", &store2, &"--index", &fresh],
        &v2,
    );
    assert!(out.status.success());
    let copy = dir.path().join("copy.raw");
    run_ok(&[&"sync", &fresh, &copy, &"--store", &store2]);
    assert_eq!(fs::read(&copy).unwrap(), v2);

    let err = String::from_utf8(
        piped(
            &[
                &"make",
                &"-",
                &"--store",
                &store,
                &"--index",
                &again,
                &"--verity",
                &"t",
            ],
            b"",
        )
        .stderr,
    )
    .unwrap();
    assert!(err.contains("--verity"), "{err}");
}

/// The image hash of a v2 index (docs/FORMAT.md): BLAKE3 over the BLAKE3 of each 1 MiB
/// block, then the size as a little-endian u64; hex.
fn image_hash_v2(image: &[u8]) -> String {
    let mut outer = blake3::Hasher::new();
    for block in image.chunks(1 << 20) {
        outer.update(blake3::hash(block).as_bytes());
    }
    outer.update(&(image.len() as u64).to_le_bytes());
    outer.finalize().to_hex().to_string()
}

#[test]
fn sync_to_a_pipe_uses_seeds_and_fetches_only_the_rest() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let (v1, v2) = releases();
    let (store, index) = make(dir.path(), "v2", &v2);
    let seed = dir.path().join("v1.raw");
    fs::write(&seed, &v1).unwrap();
    let nginx = Nginx::start(&store);
    let proxy = Proxy::start(nginx.addr(), Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let url = proxy.url();
    // Bytes of packs asked for by the requests from number `from` on.
    let pack_bytes_asked = |from: usize| -> u64 {
        proxy.seen()[from..]
            .iter()
            .filter(|s| s.path.contains("/packs/"))
            .map(|s| {
                let range = s.range.as_deref().expect("range requests for packs");
                let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap();
                b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1
            })
            .sum()
    };

    let full = piped(&[&"sync", &index, &"-", &"--store", &url, &"--json"], b"");
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    assert_eq!(full.stdout, v2);
    let full_report = json(&String::from_utf8(full.stderr).unwrap());
    let full_requests = proxy.seen().len();
    let full_bytes = pack_bytes_asked(0);
    assert!(full_bytes >= 5_000_000, "{full_bytes}");

    let out = piped(
        &[
            &"sync", &index, &"-", &"--store", &url, &"--seed", &seed, &"--json",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, v2);
    let report = json(&String::from_utf8(out.stderr).unwrap());
    // The shared two thirds come from the seed: at most the last third is fetched.
    assert!(
        report["bytes_from_seeds"].as_u64().unwrap() >= 3_800_000,
        "{report}"
    );
    let fetched = report["bytes_fetched"].as_u64().unwrap();
    assert!(fetched <= 2_200_000, "{report}");
    assert!(
        report["bytes_downloaded"].as_u64().unwrap()
            < full_report["bytes_downloaded"].as_u64().unwrap() / 2,
        "{report} vs {full_report}"
    );
    assert!(report["bytes_zero"].as_u64().unwrap() > 0, "{report}");
    // What the server saw: only the last third's packs bytes were asked for.
    let seeded_bytes = pack_bytes_asked(full_requests);
    assert!(seeded_bytes <= 2_300_000, "{seeded_bytes} of {full_bytes}");
    assert_eq!(report["bytes_downloaded"], seeded_bytes, "{report}");
    assert_eq!(
        report["image_hash"].as_str().unwrap(),
        image_hash_v2(&v2).as_str()
    );
}

#[test]
fn sync_to_stdout_as_a_file_and_with_a_lying_seed_index() {
    let dir = TempDir::new().unwrap();
    let (v1, v2) = releases();
    let (_, i1) = make(dir.path(), "v1", &v1);
    let (store, i2) = make(dir.path(), "v2", &v2);
    let seed = dir.path().join("v1.raw");
    let out_path = dir.path().join("stdout.raw");
    // The seed's index claims v2 but it holds v1: its last third fails its hash and is
    // fetched instead; the output is v2 all the same.
    let status = tessera()
        .arg("sync")
        .arg(&i2)
        .arg("-")
        .arg("--store")
        .arg(&store)
        .arg("--seed-index")
        .arg(format!("{}={}", seed.display(), i2.display()))
        .arg("--json")
        .stdout(Stdio::from(fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(fs::read(&out_path).unwrap(), v2);
    let report = json(&String::from_utf8(status.stderr).unwrap());
    assert!(report["fallbacks"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["bytes_from_seeds"].as_u64().unwrap() >= 3_800_000,
        "{report}"
    );
    let _ = i1;

    // Flags that make no sense for a stream are refused, not ignored.
    for flag in ["--dry-run", "--force"] {
        let out = piped(&[&"sync", &i2, &"-", &"--store", &store, &flag], b"");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(flag));
    }
}

#[test]
fn a_corrupt_store_fails_the_stream_after_bytes_were_written() {
    let dir = TempDir::new().unwrap();
    let (_, v2) = releases();
    let (store, index) = make(dir.path(), "v2", &v2);
    for pack in pack_files(&store) {
        let mut bytes = fs::read(&pack).unwrap();
        let at = bytes.len() * 3 / 4;
        for b in &mut bytes[at..at + 1000] {
            *b ^= 0xff;
        }
        fs::write(&pack, bytes).unwrap();
    }
    let out = piped(&[&"sync", &index, &"-", &"--store", &store], b"");
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What was written before the bad chunk is the image's beginning, and no more.
    assert!(!out.stdout.is_empty());
    assert!(out.stdout.len() < v2.len());
    assert_eq!(out.stdout[..], v2[..out.stdout.len()]);
}

#[test]
fn verify_reads_stdin() {
    let dir = TempDir::new().unwrap();
    let (_, v2) = releases();
    let (_, index) = make(dir.path(), "v2", &v2);
    let out = piped(&[&"verify", &index, &"-"], &v2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stdin: OK"));

    // Bytes past the image are not read.
    let mut longer = v2.clone();
    longer.extend_from_slice(&[7; 10_000]);
    assert!(piped(&[&"verify", &index, &"-"], &longer).status.success());

    let mut changed = v2.clone();
    changed[5_000_000] ^= 1;
    let out = piped(&[&"verify", &index, &"-", &"--json"], &changed);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(report["bad_chunks"], 1);

    let out = piped(&[&"verify", &index, &"-"], &v2[..3_000_000]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin does not hold the image"));

    // Through a real pipe from another process, too.
    let mut cat = std::process::Command::new("cat")
        .arg(dir.path().join("v2.raw"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tessera()
        .args(["verify".as_ref(), index.as_os_str(), "-".as_ref()])
        .stdin(Stdio::from(cat.stdout.take().unwrap()))
        .output()
        .unwrap();
    cat.wait().unwrap();
    assert!(out.status.success());
}

#[test]
fn flags_of_an_in_place_sync_are_refused_for_a_stream() {
    let dir = TempDir::new().unwrap();
    let (_, v2) = releases();
    let (store, index) = make(dir.path(), "v2", &v2);
    let journal = dir.path().join("j");
    for flag in [
        &[&"--dry-run" as &dyn AsRef<std::ffi::OsStr>][..],
        &[&"--journal", &journal],
        &[&"--force"],
        &[&"--rescan"],
        &[&"--scratch-size", &"1M"],
    ] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"sync", &index, &"-", &"--store", &store];
        args.extend_from_slice(flag);
        let out = piped(&args, b"");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        let name = flag[0].as_ref().to_string_lossy();
        assert!(err.contains(&format!("{name} does not apply")), "{err}");
        assert!(out.stdout.is_empty(), "{name}: bytes written");
    }
}
