//! Fault injection between `sync` and nginx serving a packed store: resets, 500s, stalls
//! past the timeout, truncated and corrupted range answers, and the server going away
//! mid-sync. A sync either completes with the exact image or fails with a clear error,
//! and no byte that failed verification ever reaches the target.

mod remote_support;
mod util;

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use remote_support::*;
use tempfile::TempDir;
use util::*;

struct Setup {
    dir: TempDir,
    image: Vec<u8>,
    index: PathBuf,
    nginx: Nginx,
}

fn setup(len: usize, seed: u64) -> Setup {
    let dir = TempDir::new().unwrap();
    let image = random_bytes(len, seed);
    let path = dir.path().join("image.raw");
    fs::write(&path, &image).unwrap();
    let store = dir.path().join("store");
    let index = dir.path().join("image.tidx");
    run_ok(&[&"make", &path, &"--store", &store, &"--index", &index]);
    let nginx = Nginx::start(&store);
    Setup {
        dir,
        image,
        index,
        nginx,
    }
}

fn is_pack(path: &str) -> bool {
    path.contains("/packs/")
}

/// Range GETs of packs a sync through `proxy` made.
fn pack_gets(proxy: &Proxy) -> u64 {
    proxy
        .seen()
        .iter()
        .filter(|r| r.method == "GET" && is_pack(&r.path))
        .count() as u64
}

/// Every byte of `target` is either the image's or zero (never unverified data).
fn assert_only_image_or_zero(target: &[u8], image: &[u8]) {
    for (i, (t, m)) in target.iter().zip(image).enumerate() {
        assert!(
            *t == *m || *t == 0,
            "byte {i} is neither the image's nor zero"
        );
    }
}

#[test]
fn transient_faults_are_retried_and_the_image_is_exact() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(20_000_000, 10);
    let faults: [(&str, Fault); 5] = [
        ("reset", Fault::Reset),
        ("500", Fault::Status500),
        ("truncated", Fault::Truncate),
        ("corrupted", Fault::Corrupt),
        ("stall", Fault::Stall(Duration::from_millis(2500))),
    ];
    for (name, fault) in faults {
        // The first and every third pack request after it fail this way.
        let packs = Arc::new(AtomicU64::new(0));
        let injected = Arc::new(AtomicU64::new(0));
        let (p, i) = (packs.clone(), injected.clone());
        let plan: Arc<Plan> = Arc::new(move |_n, m: &str, path: &str| {
            if m == "GET" && is_pack(path) && p.fetch_add(1, Ordering::SeqCst) % 3 == 0 {
                i.fetch_add(1, Ordering::SeqCst);
                fault
            } else {
                Fault::Pass
            }
        });
        let proxy = Proxy::start(s.nginx.addr(), plan);
        let target = s.dir.path().join(format!("out-{name}.raw"));
        run_ok(&[
            &"sync",
            &s.index,
            &target,
            &"--store",
            &proxy.url(),
            &"--timeout",
            &"1",
            &"--jobs",
            &"8",
        ]);
        assert_eq!(fs::read(&target).unwrap(), s.image, "after {name} faults");
        assert!(
            injected.load(Ordering::SeqCst) >= 1,
            "{name}: no fault injected: {:?}",
            proxy.seen()
        );
    }
}

#[test]
fn a_chunk_corrupted_on_every_fetch_fails_with_its_id_and_url() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(3_000_000, 11);
    let ids = index_chunk_ids(&fs::read(&s.index).unwrap());
    // Every answer from a pack has a byte flipped (in the middle of what was asked): the
    // chunk there fails verification, is fetched again on its own, and fails again.
    let plan: Arc<Plan> = Arc::new(move |_n, _m: &str, p: &str| {
        if is_pack(p) {
            Fault::Corrupt
        } else {
            Fault::Pass
        }
    });
    let proxy = Proxy::start(s.nginx.addr(), plan);
    let target = s.dir.path().join("out.raw");
    let err = run_err(&[
        &"sync",
        &s.index,
        &target,
        &"--store",
        &proxy.url(),
        &"--retries",
        &"2",
    ]);
    assert!(
        err.contains(&proxy.url()) && err.contains("/packs/"),
        "{err}"
    );
    assert!(err.contains("corrupt"), "{err}");
    assert!(
        ids.iter().any(|id| err.contains(id.as_str())),
        "the error names no chunk of the index: {err}"
    );
    // The refetches: the chunk alone, as many times as --retries allows, asking caches
    // on the way to revalidate; the first request did not.
    let gets: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|r| r.method == "GET" && is_pack(&r.path))
        .collect();
    assert!(gets.len() >= 3, "{gets:?}");
    assert!(!gets[0].no_cache, "{gets:?}");
    assert!(gets[1..].iter().any(|r| r.no_cache), "{gets:?}");
    if let Ok(written) = fs::read(&target) {
        assert_only_image_or_zero(&written, &s.image);
    }
}

#[test]
fn persistent_500s_fail_with_the_status_and_url() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(1_000_000, 12);
    let proxy = Proxy::start(
        s.nginx.addr(),
        Arc::new(|_, _: &str, _: &str| Fault::Status500),
    );
    let err = run_err(&[
        &"sync",
        &s.index,
        &s.dir.path().join("o"),
        &"--store",
        &proxy.url(),
        &"--retries",
        &"2",
    ]);
    assert!(
        err.contains("500") && err.contains(&proxy.url()) && err.contains("3 attempts"),
        "{err}"
    );
}

#[test]
fn server_going_away_mid_sync_fails_clearly_and_the_rerun_completes() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(24_000_000, 13);
    // What an undisturbed sync asks, one request at a time.
    let honest = Proxy::start(s.nginx.addr(), Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let args = |proxy: &Proxy, target: &std::path::Path, cache: &std::path::Path| {
        vec![
            "sync".to_string(),
            s.index.display().to_string(),
            target.display().to_string(),
            "--store".to_string(),
            proxy.url(),
            "--cache".to_string(),
            cache.display().to_string(),
            "--jobs".to_string(),
            "1".to_string(),
            "--json".to_string(),
        ]
    };
    let full = json(&run_ok_strings(&args(
        &honest,
        &s.dir.path().join("honest.raw"),
        &s.dir.path().join("honest-cache"),
    )));
    let full_bytes = full["bytes_downloaded"].as_u64().unwrap();
    let requests = honest.requests();
    assert!(
        pack_gets(&honest) >= 2,
        "want a sync of several range requests: {:?}",
        honest.seen()
    );
    // Take the server away half way through.
    let proxy = Arc::new(Proxy::start(
        s.nginx.addr(),
        Arc::new(|_, _: &str, _: &str| Fault::Pass),
    ));
    let p2 = proxy.clone();
    proxy.set_plan(Arc::new(move |n, _: &str, _: &str| {
        if n == requests / 2 {
            p2.set_down(true);
        }
        Fault::Delay(Duration::from_millis(5))
    }));
    let cache = s.dir.path().join("cache");
    let target = s.dir.path().join("out.raw");
    let mut first = args(&proxy, &target, &cache);
    first.extend(["--retries".to_string(), "2".to_string()]);
    let err = run_err_strings(&first);
    assert!(err.contains(&proxy.url()), "{err}");
    if let Ok(written) = fs::read(&target) {
        assert_only_image_or_zero(&written, &s.image);
    }
    // Back again: the same command completes, fetching only what the cache lacks.
    proxy.set_down(false);
    proxy.set_plan(Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let again = json(&run_ok_strings(&args(&proxy, &target, &cache)));
    assert_eq!(fs::read(&target).unwrap(), s.image);
    let refetched = again["bytes_downloaded"].as_u64().unwrap();
    assert!(
        refetched < full_bytes,
        "re-run downloaded {refetched} of {full_bytes} bytes"
    );
}

fn run_ok_strings(args: &[String]) -> String {
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    run_ok(&args)
}

fn run_err_strings(args: &[String]) -> String {
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    run_err(&args)
}
