//! Fault injection between `sync` and nginx: resets, 500s, stalls past the timeout,
//! truncated and corrupted bodies, and the server going away mid-sync. A sync either
//! completes with the exact image or fails with a clear error, and no byte that failed
//! verification ever reaches the target.

mod remote_support;
mod util;

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use remote_support::*;
use tempfile::TempDir;
use util::*;

struct Setup {
    dir: TempDir,
    image: Vec<u8>,
    store: PathBuf,
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
        store,
        index,
        nginx,
    }
}

fn chunk_count(store: &std::path::Path) -> u64 {
    fs::read_dir(store.join("chunks"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count() as u64)
        .sum()
}

fn is_chunk(path: &str) -> bool {
    path.contains("/chunks/")
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
    let s = setup(5_000_000, 10);
    let faults: [(&str, Fault); 5] = [
        ("reset", Fault::Reset),
        ("500", Fault::Status500),
        ("truncated", Fault::Truncate),
        ("corrupted", Fault::Corrupt),
        ("stall", Fault::Stall(Duration::from_millis(2500))),
    ];
    for (name, fault) in faults {
        // Every third chunk request fails this way.
        let plan: Arc<Plan> = Arc::new(move |n, _m: &str, p: &str| {
            if is_chunk(p) && n % 3 == 1 {
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
            proxy.requests() > chunk_count(&s.store),
            "{name}: faults were injected"
        );
    }
}

#[test]
fn a_chunk_corrupted_on_every_fetch_fails_with_its_id_and_url() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(3_000_000, 11);
    let index = fs::read(&s.index).unwrap();
    // The first chunk record starts at byte 80 of the index.
    let id: String = index[80..112].iter().map(|b| format!("{b:02x}")).collect();
    let needle = id.clone();
    let plan: Arc<Plan> = Arc::new(move |_n, _m: &str, p: &str| {
        if p.contains(&needle) {
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
    assert!(err.contains(&id) && err.contains(&proxy.url()), "{err}");
    assert!(err.contains("corrupt"), "{err}");
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
    let s = setup(8_000_000, 13);
    let chunks = chunk_count(&s.store);
    let proxy = Arc::new(Proxy::start(
        s.nginx.addr(),
        Arc::new(|_, _: &str, _: &str| Fault::Pass),
    ));
    // Take the server away after a third of the chunks.
    let p2 = proxy.clone();
    proxy.set_plan(Arc::new(move |n, _: &str, _: &str| {
        if n == chunks / 3 {
            p2.set_down(true);
        }
        Fault::Delay(Duration::from_millis(5))
    }));
    let cache = s.dir.path().join("cache");
    let target = s.dir.path().join("out.raw");
    let err = run_err(&[
        &"sync",
        &s.index,
        &target,
        &"--store",
        &proxy.url(),
        &"--cache",
        &cache,
        &"--retries",
        &"2",
        &"--jobs",
        &"4",
    ]);
    assert!(err.contains(&proxy.url()), "{err}");
    if let Ok(written) = fs::read(&target) {
        assert_only_image_or_zero(&written, &s.image);
    }
    // Back again: the same command completes, fetching only what the cache lacks.
    proxy.set_down(false);
    proxy.set_plan(Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let before = proxy.requests();
    run_ok(&[
        &"sync",
        &s.index,
        &target,
        &"--store",
        &proxy.url(),
        &"--cache",
        &cache,
    ]);
    assert_eq!(fs::read(&target).unwrap(), s.image);
    let refetched = proxy.requests() - before;
    assert!(
        refetched < chunks,
        "re-run fetched {refetched} of {chunks} chunks"
    );
}
