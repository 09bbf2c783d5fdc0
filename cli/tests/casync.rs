//! casync compatibility against the real `casync make`: .caibx indexes and .castr stores
//! of files and loop devices, chunks compressed with zstd, xz and gzip, SHA-512/256 and
//! SHA-256 ids, stores on disk and served by nginx; sync (fresh, in place, seeds, resume),
//! verify, serve and import; corrupt chunks and indexes refused.

mod remote_support;
mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use remote_support::*;
use tempfile::TempDir;
use util::*;

fn casync_available() -> bool {
    Command::new("casync")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `casync make --store=STORE INDEX SOURCE EXTRA...`.
fn casync_make(store: &Path, index: &Path, source: &Path, extra: &[&str]) {
    let out = Command::new("casync")
        .arg("make")
        .arg(format!("--store={}", store.display()))
        .args(extra)
        .arg(index)
        .arg(source)
        .output()
        .expect("running casync");
    assert!(
        out.status.success(),
        "casync make failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Random data with a long run of zeros and a repeated block: zero chunks and one chunk
/// at several offsets.
fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut b = random_bytes(len, seed);
    b[len / 3..len / 3 + len * 3 / 10].fill(0);
    let (a, c, n) = (len / 10, len * 8 / 10, len / 16);
    let block = b[a..a + n].to_vec();
    b[c..c + n].copy_from_slice(&block);
    b
}

/// The next release: a few edits and a shifted tail.
fn next_release(old: &[u8], seed: u64) -> Vec<u8> {
    let mut new = old.to_vec();
    let patch = random_bytes(4000, seed);
    new[100_000..104_000].copy_from_slice(&patch);
    new.splice(2_000_000..2_000_000, random_bytes(777, seed + 1));
    new.truncate(old.len());
    new
}

struct Published {
    dir: TempDir,
    image: PathBuf,
    caibx: PathBuf,
    store: PathBuf,
}

fn publish(len: usize, seed: u64, extra: &[&str]) -> Published {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("image.raw");
    fs::write(&image, image_bytes(len, seed)).unwrap();
    let store = dir.path().join("web/default.castr");
    let caibx = dir.path().join("web/image.caibx");
    fs::create_dir_all(store.parent().unwrap()).unwrap();
    casync_make(&store, &caibx, &image, extra);
    Published {
        dir,
        image,
        caibx,
        store,
    }
}

/// Every .cacnk file of a store.
fn chunk_files(store: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for d in fs::read_dir(store).unwrap() {
        let d = d.unwrap().path();
        if d.is_dir() {
            for f in fs::read_dir(&d).unwrap() {
                out.push(f.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn sync_and_verify_with_each_compressor_and_digest() {
    if skip_unless(casync_available(), "casync") {
        return;
    }
    for (n, extra) in [
        &["--compression=zstd"][..],
        &["--compression=xz"],
        &["--compression=gzip"],
        &["--digest=sha256"],
    ]
    .into_iter()
    .enumerate()
    {
        let p = publish(5_000_000, 10 + n as u64, extra);
        let target = p.dir.path().join("out.raw");
        let out = json(&run_ok(&[
            &"sync", &p.caibx, &target, &"--store", &p.store, &"--json",
        ]));
        assert_eq!(
            fs::read(&target).unwrap(),
            fs::read(&p.image).unwrap(),
            "{extra:?}"
        );
        // The zero run is a hole in the new file, not fetched; the repeated block
        // fetched once.
        assert!(
            out["bytes_in_place"].as_u64().unwrap() >= 1_000_000,
            "{extra:?}: {out}"
        );
        let files = chunk_files(&p.store).len() as u64;
        assert!(
            out["chunks_fetched"].as_u64().unwrap() <= files,
            "{extra:?}: {out}"
        );
        let verified = run_ok(&[&"verify", &p.caibx, &target]);
        assert!(verified.contains("OK"), "{verified}");
        // Through pipes, chunks are checked with the index's digest too: verify reads
        // stdin, and a stream takes every chunk from a seed that holds it.
        let piped = tessera()
            .args(["verify".as_ref(), p.caibx.as_os_str(), "-".as_ref()])
            .stdin(fs::File::open(&target).unwrap())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&piped.stdout);
        assert!(
            piped.status.success() && said.contains("OK"),
            "{extra:?}: {said}"
        );
        let streamed = tessera()
            .arg("sync")
            .args([
                p.caibx.as_os_str(),
                "-".as_ref(),
                "--store".as_ref(),
                p.store.as_os_str(),
            ])
            .args(["--seed".as_ref(), target.as_os_str(), "--json".as_ref()])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&streamed.stderr);
        assert!(streamed.status.success(), "{extra:?}: {report}");
        assert!(streamed.stdout == fs::read(&p.image).unwrap(), "{extra:?}");
        let report = json(&report);
        assert_eq!(report["fallbacks"], 0, "{extra:?}: {report}");
        assert_eq!(report["chunks_fetched"], 0, "{extra:?}: {report}");
        // One byte changed: verify names the chunk.
        let mut bytes = fs::read(&target).unwrap();
        bytes[4_500_000] ^= 1;
        fs::write(&target, &bytes).unwrap();
        let err = run_err(&[&"verify", &p.caibx, &target]);
        assert!(err.contains("offset"), "{err}");
    }
}

#[test]
fn sha256_and_sha512_256_indexes_name_their_digest() {
    if skip_unless(casync_available(), "casync") {
        return;
    }
    use tessera_engine::ChunkDigest;
    for (extra, digest) in [
        (&[][..], ChunkDigest::Sha512_256),
        (&["--digest=sha256"], ChunkDigest::Sha256),
    ] {
        let p = publish(1_000_000, 3, extra);
        let bytes = fs::read(&p.caibx).unwrap();
        let index = tessera_engine::casync::parse_index(&bytes, "t").unwrap();
        assert_eq!(index.digest(), digest);
        let image = fs::read(&p.image).unwrap();
        for c in index.chunks() {
            let data = &image[c.offset as usize..c.end() as usize];
            assert_eq!(digest.id(data), c.id, "chunk at {}", c.offset);
            assert_eq!(c.zero, data.iter().all(|&b| b == 0));
        }
    }
}

#[test]
fn the_chunker_cuts_where_casync_cuts() {
    if skip_unless(casync_available(), "casync") {
        return;
    }
    for (len, extra) in [
        (3_000_000, &[][..]),
        (1_000_000, &["--chunk-size=1000:5000:20000"]),
        (100_000, &["--chunk-size=32"]),
        (1_000_000, &["--chunk-size=8192:8192:8192"]),
    ] {
        let p = publish(len, 21, extra);
        let index = tessera_engine::casync::parse_index(&fs::read(&p.caibx).unwrap(), "t").unwrap();
        let image = fs::read(&p.image).unwrap();
        let mut pos = 0;
        for (i, c) in index.chunks().iter().enumerate() {
            let len = tessera_engine::casync::cut_len(&index.params(), &image[pos..]);
            assert_eq!(
                (pos as u64, len as u32),
                (c.offset, c.len),
                "{extra:?}: chunk {i}"
            );
            pos += len;
        }
        assert_eq!(pos, image.len());
    }
}

#[test]
fn in_place_update_with_a_seed_fetches_only_what_changed() {
    if skip_unless(casync_available(), "casync") {
        return;
    }
    let p = publish(6_000_000, 31, &[]);
    let old = fs::read(&p.image).unwrap();
    let new = next_release(&old, 32);
    let new_image = p.dir.path().join("new.raw");
    fs::write(&new_image, &new).unwrap();
    let new_caibx = p.dir.path().join("web/new.caibx");
    casync_make(&p.store, &new_caibx, &new_image, &[]);

    // In place: the target holds the old release.
    let target = p.dir.path().join("slot.raw");
    fs::write(&target, &old).unwrap();
    let out = json(&run_ok(&[
        &"sync", &new_caibx, &target, &"--store", &p.store, &"--json",
    ]));
    assert_eq!(fs::read(&target).unwrap(), new);
    let fetched = out["bytes_fetched"].as_u64().unwrap();
    assert!(fetched < 1_000_000, "fetched {fetched}: {out}");

    // A fresh target with the old release as a seed (scanned with casync's chunker).
    let fresh = p.dir.path().join("fresh.raw");
    let out = json(&run_ok(&[
        &"sync", &new_caibx, &fresh, &"--store", &p.store, &"--seed", &p.image, &"--json",
    ]));
    assert_eq!(fs::read(&fresh).unwrap(), new);
    assert!(
        out["bytes_from_seeds"].as_u64().unwrap() > 3_000_000,
        "{out}"
    );
    assert!(out["bytes_fetched"].as_u64().unwrap() < 1_000_000, "{out}");

    // A seed with its casync index: not scanned, each chunk hashed when read.
    let indexed = p.dir.path().join("indexed.raw");
    let seed_index = format!("{}={}", p.image.display(), p.caibx.display());
    let out = json(&run_ok(&[
        &"sync",
        &new_caibx,
        &indexed,
        &"--store",
        &p.store,
        &"--seed-index",
        &seed_index,
        &"--json",
    ]));
    assert_eq!(fs::read(&indexed).unwrap(), new);
    assert!(
        out["bytes_from_seeds"].as_u64().unwrap() > 3_000_000,
        "{out}"
    );
}

#[test]
fn a_corrupt_chunk_file_is_refused_and_nothing_of_it_written() {
    if skip_unless(casync_available(), "casync") {
        return;
    }
    let p = publish(3_000_000, 41, &[]);
    let files = chunk_files(&p.store);
    assert!(files.len() >= 3);
    let image = fs::read(&p.image).unwrap();
    // A valid .cacnk of another chunk under this chunk's name; then garbage; then a
    // chunk truncated.
    let victim = files[0].clone();
    let good = fs::read(&victim).unwrap();
    let id = victim
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches(".cacnk")
        .to_string();
    for bad in [
        fs::read(&files[1]).unwrap(),
        b"not a chunk at all".to_vec(),
        good[..good.len() / 2].to_vec(),
    ] {
        fs::write(&victim, &bad).unwrap();
        let target = p.dir.path().join("out.raw");
        let _ = fs::remove_file(&target);
        let err = run_err(&[&"sync", &p.caibx, &target, &"--store", &p.store]);
        assert!(err.contains(&id), "{err}");
        assert!(err.contains(&victim.display().to_string()), "{err}");
        let written = fs::read(&target).unwrap_or_default();
        for (i, (t, m)) in written.iter().zip(&image).enumerate() {
            assert!(
                *t == *m || *t == 0,
                "byte {i} is neither the image's nor zero"
            );
        }
    }
    // Restored: the same command completes.
    fs::write(&victim, &good).unwrap();
    let target = p.dir.path().join("out.raw");
    run_ok(&[&"sync", &p.caibx, &target, &"--store", &p.store]);
    assert_eq!(fs::read(&target).unwrap(), image);
    // A missing chunk names its path.
    fs::remove_file(&victim).unwrap();
    let err = run_err(&[
        &"sync",
        &p.caibx,
        &p.dir.path().join("other.raw"),
        &"--store",
        &p.store,
    ]);
    assert!(err.contains("does not exist") && err.contains(&id), "{err}");
}

#[test]
fn a_damaged_index_is_refused_with_its_offset() {
    if skip_unless(casync_available(), "casync") {
        return;
    }
    let p = publish(1_000_000, 51, &[]);
    let bytes = fs::read(&p.caibx).unwrap();
    let bad = p.dir.path().join("bad.caibx");
    let target = p.dir.path().join("out.raw");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (bytes[..bytes.len() - 1].to_vec(), "truncated"),
        (bytes[..bytes.len() - 40].to_vec(), "table tail"),
        (
            {
                let mut b = bytes.clone();
                b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            },
            "offset 24",
        ),
        (
            {
                // The first chunk's end offset pushed past the second's.
                let mut b = bytes.clone();
                b[64..72].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                b
            },
            "item at offset 64",
        ),
    ];
    for (b, want) in cases {
        fs::write(&bad, &b).unwrap();
        let err = run_err(&[&"sync", &bad, &target, &"--store", &p.store]);
        assert!(err.contains("bad.caibx"), "{err}");
        assert!(err.contains(want), "want {want:?}: {err}");
        assert!(!target.exists(), "a target was created for a bad index");
    }
    // A pinned root hash is the BLAKE3 of the .caibx file.
    let root = blake3::hash(&bytes).to_hex().to_string();
    run_ok(&[&"verify", &p.caibx, &p.image, &"--root-hash", &root]);
    let err = run_err(&[
        &"verify",
        &p.caibx,
        &p.image,
        &"--root-hash",
        &"00".repeat(32),
    ]);
    assert!(err.contains("root hash"), "{err}");
}

#[test]
fn index_and_store_served_by_nginx() {
    if skip_unless(casync_available(), "casync") || skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(4_000_000, 61, &["--compression=xz"]);
    let nginx = Nginx::start(p.store.parent().unwrap());
    let index = format!("{}/image.caibx", nginx.url());
    let store = format!("{}/default.castr", nginx.url());
    let target = p.dir.path().join("out.raw");
    let out = json(&run_ok(&[
        &"sync", &index, &target, &"--store", &store, &"--json",
    ]));
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    assert!(out["requests"].as_u64().unwrap() >= 10, "{out}");
    if nbdcopy_available() {
        let served = serve_and_copy(p.dir.path(), &[&index, "--store", &store], &[]);
        assert!(served == fs::read(&p.image).unwrap(), "served bytes differ");
    } else {
        // Fails under CI=true, where nbdcopy must exist.
        skip_unless(false, "nbdcopy");
    }
}

#[test]
fn a_sync_that_loses_its_store_resumes() {
    if skip_unless(casync_available(), "casync") || skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(12_000_000, 71, &[]);
    let image = fs::read(&p.image).unwrap();
    let nginx = Nginx::start(p.store.parent().unwrap());
    let proxy = Arc::new(Proxy::start(
        nginx.addr(),
        Arc::new(|_, _: &str, _: &str| Fault::Pass),
    ));
    let store = format!("{}/default.castr", proxy.url());
    let total = chunk_files(&p.store).len() as u64;
    let p2 = proxy.clone();
    proxy.set_plan(Arc::new(move |n, _: &str, _: &str| {
        if n == total / 2 {
            p2.set_down(true);
        }
        Fault::Delay(Duration::from_millis(2))
    }));
    let target = p.dir.path().join("out.raw");
    let err = run_err(&[
        &"sync",
        &p.caibx,
        &target,
        &"--store",
        &store,
        &"--retries",
        &"1",
        &"--jobs",
        &"1",
    ]);
    assert!(err.contains(&proxy.url()), "{err}");
    let written = fs::read(&target).unwrap();
    for (i, (t, m)) in written.iter().zip(&image).enumerate() {
        assert!(
            *t == *m || *t == 0,
            "byte {i} is neither the image's nor zero"
        );
    }
    proxy.set_down(false);
    proxy.set_plan(Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let before = proxy.requests();
    let out = json(&run_ok(&[
        &"sync", &p.caibx, &target, &"--store", &store, &"--json",
    ]));
    assert_eq!(fs::read(&target).unwrap(), image);
    assert_eq!(out["resumed"], serde_json::Value::Bool(true), "{out}");
    let again = proxy.requests() - before;
    assert!(
        again < total * 3 / 4,
        "the resumed run made {again} requests for {total} chunks"
    );
}

#[test]
fn loop_devices_to_loop_devices() {
    if skip_unless(casync_available(), "casync") || skip_unless(loop_available(), "loop devices") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let src_file = dir.path().join("src.raw");
    let image = image_bytes(8 << 20, 81);
    fs::write(&src_file, &image).unwrap();
    let src = LoopDevice::attach(&src_file);
    let store = dir.path().join("s.castr");
    let caibx = dir.path().join("dev.caibx");
    casync_make(&store, &caibx, &src.path, &["--compression=gzip"]);
    let dst_file = dir.path().join("dst.raw");
    fs::write(&dst_file, random_bytes(9 << 20, 82)).unwrap();
    let dst = LoopDevice::attach(&dst_file);
    run_ok(&[&"sync", &caibx, &dst.path, &"--store", &store]);
    run_ok(&[&"verify", &caibx, &dst.path]);
    drop(dst);
    let written = fs::read(&dst_file).unwrap();
    assert!(written[..image.len()] == image[..], "device differs");
}

#[test]
fn import_converts_to_a_tessera_store() {
    if skip_unless(casync_available(), "casync") {
        return;
    }
    let p = publish(5_000_000, 91, &["--compression=gzip"]);
    let to = p.dir.path().join("tstore");
    let tidx = p.dir.path().join("image.tidx");
    let out = json(&run_ok(&[
        &"import",
        &p.caibx,
        &"--store",
        &p.store,
        &"--to-store",
        &to,
        &"--index",
        &tidx,
        &"--json",
    ]));
    assert_eq!(out["casync_digest"], "sha512-256", "{out}");
    // The work directory is gone.
    let leftovers: Vec<_> = fs::read_dir(p.dir.path())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with(".tessera-import").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let target = p.dir.path().join("out.raw");
    run_ok(&[&"sync", &tidx, &target, &"--store", &to]);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    // The same image made by tessera directly gives the same index.
    let made = p.dir.path().join("made.tidx");
    run_ok(&[&"make", &p.image, &"--store", &to, &"--index", &made]);
    assert_eq!(fs::read(&made).unwrap(), fs::read(&tidx).unwrap());
    // A tessera index is not imported.
    let err = run_err(&[
        &"import",
        &tidx,
        &"--store",
        &to,
        &"--to-store",
        &to,
        &"--index",
        &made,
    ]);
    assert!(err.contains("not a casync one"), "{err}");
}

#[test]
fn a_signed_caibx_is_checked_against_the_trusted_key() {
    if skip_unless(casync_available(), "casync") {
        return;
    }
    let p = publish(1_000_000, 101, &[]);
    let (secret, public) = (p.dir.path().join("k.sec"), p.dir.path().join("k.pub"));
    run_ok(&[
        &"keygen",
        &"--secret-key",
        &secret,
        &"--public-key",
        &public,
    ]);
    run_ok(&[
        &"sign",
        &p.caibx,
        &"--secret-key",
        &secret,
        &"--version",
        &"3",
    ]);
    let target = p.dir.path().join("out.raw");
    run_ok(&[
        &"sync",
        &p.caibx,
        &target,
        &"--store",
        &p.store,
        &"--trusted-key",
        &public,
        &"--min-version",
        &"3",
    ]);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    // One byte of the index changed (a chunk id): the signature no longer matches.
    let mut bytes = fs::read(&p.caibx).unwrap();
    bytes[80] ^= 1;
    fs::write(&p.caibx, &bytes).unwrap();
    let err = run_err(&[&"verify", &p.caibx, &target, &"--trusted-key", &public]);
    assert!(err.contains("signature"), "{err}");
}
