//! HTTP stores through the real binary, with nginx serving a packed store that `make`
//! wrote (packs read by `Range` requests): sync by URL (index too), the local cache, a
//! missing pack, a server that ignores or misanswers `Range`, a read-only store.

mod remote_support;
mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use remote_support::*;
use tempfile::TempDir;
use util::*;

/// An image of random data with a run of zeros, and its store made by `make`, the index
/// inside the store directory so that nginx serves it too.
struct Published {
    dir: TempDir,
    image: PathBuf,
    store: PathBuf,
}

fn publish(len: usize, seed: u64) -> Published {
    let dir = TempDir::new().unwrap();
    let mut bytes = random_bytes(len, seed);
    bytes[len / 3..len / 3 + 600_000].fill(0);
    let image = dir.path().join("image.raw");
    fs::write(&image, &bytes).unwrap();
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

/// Every file below `dir` (a cache directory), whatever its layout.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The distinct non-zero chunks of the published index.
fn unique_chunks(p: &Published) -> u64 {
    let info = json(&run_ok(&[&"info", &p.store.join("image.tidx"), &"--json"]));
    info["unique_chunks"].as_u64().unwrap()
}

#[test]
fn sync_from_nginx_by_url_gives_the_exact_image() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(6_000_000, 1);
    let nginx = Nginx::start(&p.store);
    let proxy = Proxy::start(nginx.addr(), Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let target = p.dir.path().join("out.raw");
    let out = json(&run_ok(&[
        &"sync",
        &format!("{}/image.tidx", proxy.url()),
        &target,
        &"--store",
        &format!("{}/", proxy.url()),
        &"--json",
    ]));
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    let downloaded = out["bytes_downloaded"].as_u64().unwrap();
    assert!(downloaded > 0, "{out}");
    // The packs are read by ranges, a few large ones: far fewer requests than chunks,
    // each of them answered with only the bytes asked.
    let seen = proxy.seen();
    let ranges: Vec<_> = seen.iter().filter(|r| r.path.contains("/packs/")).collect();
    let chunks = unique_chunks(&p);
    assert!(
        !ranges.is_empty() && ranges.len() as u64 * 4 < chunks,
        "{} pack requests for {chunks} chunks: {seen:?}",
        ranges.len()
    );
    assert_eq!(
        out["requests"].as_u64(),
        Some(ranges.len() as u64),
        "the requests sync reports are the range requests made: {out}"
    );
    let asked: u64 = ranges
        .iter()
        .filter_map(|r| r.range.as_deref()?.strip_prefix("bytes="))
        .map(|v| {
            let (a, b) = v.split_once('-').unwrap();
            b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1
        })
        .sum();
    assert_eq!(
        downloaded, asked,
        "bytes_downloaded counts every byte of the ranges asked, gaps included"
    );
    for r in &ranges {
        assert!(
            r.method == "HEAD" || r.range.as_deref().is_some_and(|v| v.starts_with("bytes=")),
            "a pack read without a range: {r:?}"
        );
    }
    assert!(
        downloaded <= pack_bytes(&p.store),
        "{downloaded} bytes downloaded, the packs hold {}",
        pack_bytes(&p.store)
    );
}

/// A server (or a proxy on the way) that ignores `Range` would answer every chunk with
/// its whole pack: refused at the first answer, naming the pack's URL and what the
/// server must do, and nothing is written.
#[test]
fn a_server_that_ignores_range_is_refused_clearly() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(3_000_000, 10);
    let nginx = Nginx::start(&p.store);
    let pack_gets = |proxy: &Proxy| {
        proxy
            .seen()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/packs/"))
            .count()
    };
    // What a sync asks of a server that honours ranges.
    let honest = Proxy::start(nginx.addr(), Arc::new(|_, _: &str, _: &str| Fault::Pass));
    run_ok(&[
        &"sync",
        &p.store.join("image.tidx"),
        &p.dir.path().join("honest.raw"),
        &"--store",
        &honest.url(),
    ]);
    let proxy = Proxy::start(
        nginx.addr(),
        Arc::new(|_, _: &str, path: &str| {
            if path.contains("/packs/") {
                Fault::DropRange
            } else {
                Fault::Pass
            }
        }),
    );
    let target = p.dir.path().join("out.raw");
    let err = run_err(&[
        &"sync",
        &p.store.join("image.tidx"),
        &target,
        &"--store",
        &proxy.url(),
        &"--retries",
        &"0",
    ]);
    assert!(err.contains(&format!("{}/packs/", proxy.url())), "{err}");
    assert!(
        err.contains("answered 200 with the whole file")
            && err.contains("must support HTTP Range requests"),
        "{err}"
    );
    // Each answer is refused as it comes, never retried: at most the honest requests
    // and one request per chunk on its own (the fetcher's fallback).
    assert!(
        pack_gets(&proxy) as u64 <= pack_gets(&honest) as u64 + unique_chunks(&p),
        "{:?}",
        proxy.seen()
    );
    if let Ok(written) = fs::read(&target) {
        assert!(
            written.iter().all(|&b| b == 0),
            "bytes written from a refused answer"
        );
    }
}

/// A 206 whose `Content-Range` is not the range asked is refused, naming both.
#[test]
fn a_content_range_that_does_not_match_is_refused() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(3_000_000, 11);
    let nginx = Nginx::start(&p.store);
    let proxy = Proxy::start(
        nginx.addr(),
        Arc::new(|_, m: &str, path: &str| {
            if m == "GET" && path.contains("/packs/") {
                Fault::ShiftRange
            } else {
                Fault::Pass
            }
        }),
    );
    let err = run_err(&[
        &"sync",
        &p.store.join("image.tidx"),
        &p.dir.path().join("out.raw"),
        &"--store",
        &proxy.url(),
    ]);
    assert!(err.contains(&format!("{}/packs/", proxy.url())), "{err}");
    assert!(
        err.contains("the server answered Content-Range") && err.contains("asked for bytes"),
        "{err}"
    );
}

#[test]
fn serve_from_nginx_by_url_gives_the_exact_image() {
    if skip_unless(nginx_available(), "nginx") || skip_unless(nbdcopy_available(), "nbdcopy") {
        return;
    }
    let p = publish(5_000_000, 7);
    let nginx = Nginx::start(&p.store);
    let index = format!("{}/image.tidx", nginx.url());
    let cache = p.dir.path().join("cache").display().to_string();
    let served = serve_and_copy(
        p.dir.path(),
        &[&index, "--store", &nginx.url(), "--cache", &cache],
        &[],
    );
    assert!(served == fs::read(&p.image).unwrap(), "served bytes differ");
}

#[test]
fn signed_index_by_url_is_checked_against_the_trusted_key() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(2_000_000, 8);
    let index = p.store.join("image.tidx");
    let (secret, public) = (p.dir.path().join("k.sec"), p.dir.path().join("k.pub"));
    run_ok(&[
        &"keygen",
        &"--secret-key",
        &secret,
        &"--public-key",
        &public,
    ]);
    run_ok(&[&"sign", &index, &"--secret-key", &secret]);
    let nginx = Nginx::start(&p.store);
    let url = format!("{}/image.tidx", nginx.url());
    let target = p.dir.path().join("out.raw");
    run_ok(&[
        &"sync",
        &url,
        &target,
        &"--store",
        &nginx.url(),
        &"--trusted-key",
        &public,
    ]);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    // Another key: refused before any chunk is fetched.
    let (s2, p2) = (p.dir.path().join("o.sec"), p.dir.path().join("o.pub"));
    run_ok(&[&"keygen", &"--secret-key", &s2, &"--public-key", &p2]);
    let err = run_err(&[
        &"sync",
        &url,
        &p.dir.path().join("o.raw"),
        &"--store",
        &nginx.url(),
        &"--trusted-key",
        &p2,
    ]);
    assert!(err.contains("refusing index"), "{err}");
    assert!(
        !p.dir.path().join("o.raw").exists(),
        "nothing written for an untrusted index"
    );
    // Without the signature on the server, a required signature is missing.
    fs::remove_file(p.store.join("image.tidx.minisig")).unwrap();
    let err = run_err(&[
        &"sync",
        &url,
        &p.dir.path().join("o.raw"),
        &"--store",
        &nginx.url(),
        &"--trusted-key",
        &public,
    ]);
    assert!(err.contains("signature"), "{err}");
}

#[test]
fn cache_fills_on_first_sync_and_serves_the_second_offline() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(4_000_000, 2);
    let cache = p.dir.path().join("cache");
    let nginx = Nginx::start(&p.store);
    let url = nginx.url();
    let first = p.dir.path().join("first.raw");
    run_ok(&[
        &"sync",
        &p.store.join("image.tidx"),
        &first,
        &"--store",
        &url,
        &"--cache",
        &cache,
    ]);
    assert_eq!(fs::read(&first).unwrap(), fs::read(&p.image).unwrap());
    assert!(
        files_below(&cache).len() as u64 >= unique_chunks(&p),
        "every fetched chunk is cached"
    );
    drop(nginx);
    // The server is gone; every chunk comes from the cache.
    let second = p.dir.path().join("second.raw");
    run_ok(&[
        &"sync",
        &p.store.join("image.tidx"),
        &second,
        &"--store",
        &url,
        &"--cache",
        &cache,
        &"--retries",
        &"0",
    ]);
    assert_eq!(fs::read(&second).unwrap(), fs::read(&p.image).unwrap());
    // Without the cache the same command fails, naming the server.
    let err = run_err(&[
        &"sync",
        &p.store.join("image.tidx"),
        &p.dir.path().join("third.raw"),
        &"--store",
        &url,
        &"--retries",
        &"1",
    ]);
    assert!(err.contains(&url), "{err}");
}

#[test]
fn cache_is_bounded_by_its_size() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(6_000_000, 3);
    let cache = p.dir.path().join("cache");
    let nginx = Nginx::start(&p.store);
    let target = p.dir.path().join("out.raw");
    run_ok(&[
        &"sync",
        &p.store.join("image.tidx"),
        &target,
        &"--store",
        &nginx.url(),
        &"--cache",
        &cache,
        &"--cache-limit",
        &"2M",
    ]);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&p.image).unwrap());
    let cached: u64 = files_below(&cache)
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(cached <= 2 << 20, "cache holds {cached} bytes, bound 2 MiB");
    assert!(cached > 0);
}

#[test]
fn concurrent_syncs_share_one_small_cache() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(6_000_000, 9);
    let cache = p.dir.path().join("cache");
    let nginx = Nginx::start(&p.store);
    // Four processes at once, the cache bound well under the image: files come and go
    // under each other's feet while they read and evict.
    let children: Vec<_> = (0..4)
        .map(|i| {
            tessera()
                .arg("sync")
                .arg(p.store.join("image.tidx"))
                .arg(p.dir.path().join(format!("out{i}.raw")))
                .args([
                    "--store",
                    &nginx.url(),
                    "--cache-limit",
                    "1M",
                    "--jobs",
                    "4",
                ])
                .arg("--cache")
                .arg(&cache)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let image = fs::read(&p.image).unwrap();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "sync {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(fs::read(p.dir.path().join(format!("out{i}.raw"))).unwrap() == image);
    }
    let cached: u64 = files_below(&cache)
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum();
    // Each process counts the others' writes only when it rescans, so the bound holds
    // up to what the others wrote since their last eviction.
    assert!(cached <= 2 << 20, "cache holds {cached} bytes, bound 1 MiB");
}

#[test]
fn missing_pack_is_an_error_naming_its_url() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(3_000_000, 4);
    let victim = pack_files(&p.store)[0].clone();
    let rel = victim.strip_prefix(&p.store).unwrap().display().to_string();
    fs::remove_file(&victim).unwrap();
    let nginx = Nginx::start(&p.store);
    let err = run_err(&[
        &"sync",
        &p.store.join("image.tidx"),
        &p.dir.path().join("out.raw"),
        &"--store",
        &nginx.url(),
    ]);
    assert!(
        err.contains(&format!("{}/{rel}", nginx.url())) && err.contains("does not exist"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
}

/// An index made into another store has no location file here: a clear error naming
/// the store and the file looked for.
#[test]
fn an_index_without_location_data_in_the_store_is_refused_clearly() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(1_000_000, 12);
    let other = publish(1_000_000, 13);
    let nginx = Nginx::start(&p.store);
    let err = run_err(&[
        &"sync",
        &other.store.join("image.tidx"),
        &p.dir.path().join("out.raw"),
        &"--store",
        &nginx.url(),
    ]);
    assert!(
        err.contains(&nginx.url()) && err.contains("locations/") && err.contains(".tloc"),
        "{err}"
    );
}

#[test]
fn index_url_errors_name_the_url() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let p = publish(1_000_000, 5);
    let nginx = Nginx::start(&p.store);
    let missing = format!("{}/nope.tidx", nginx.url());
    let err = run_err(&[
        &"sync",
        &missing,
        &p.dir.path().join("o"),
        &"--store",
        &nginx.url(),
    ]);
    assert!(err.contains(&missing) && err.contains("404"), "{err}");
    // A pack file served as an index is refused as invalid.
    let chunk = pack_files(&p.store)[0]
        .strip_prefix(&p.store)
        .unwrap()
        .display()
        .to_string();
    let bogus = format!("{}/{chunk}", nginx.url());
    let err = run_err(&[
        &"sync",
        &bogus,
        &p.dir.path().join("o"),
        &"--store",
        &nginx.url(),
    ]);
    assert!(
        err.contains("invalid index") || err.contains("not a tessera index"),
        "{err}"
    );
    // The index is checked from memory: the error names its URL, never a local copy.
    assert!(err.contains(&bogus), "{err}");
    let tmp = std::env::temp_dir().display().to_string();
    assert!(
        !err.contains("tessera-index") && !err.contains(&tmp),
        "{err}"
    );
}

#[test]
fn http_stores_are_read_only() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("i");
    fs::write(&image, random_bytes(100_000, 6)).unwrap();
    let err = run_err(&[
        &"make",
        &image,
        &"--store",
        &"http://127.0.0.1:9/store",
        &"--index",
        &dir.path().join("i.tidx"),
    ]);
    assert!(err.contains("read-only"), "{err}");
}
