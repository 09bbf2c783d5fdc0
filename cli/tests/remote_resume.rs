//! A sync that loses its HTTP store mid-way resumes from its journal on the next run:
//! it re-fetches only what was not yet durably written, with no cache involved.

mod remote_support;
mod util;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use remote_support::*;
use tempfile::TempDir;
use util::*;

fn chunk_count(store: &Path) -> u64 {
    fs::read_dir(store.join("chunks"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count() as u64)
        .sum()
}

#[test]
fn network_loss_mid_sync_resumes_from_the_journal() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = random_bytes(12_000_000, 14);
    let path = dir.path().join("image.raw");
    fs::write(&path, &image).unwrap();
    let store = dir.path().join("store");
    let index = dir.path().join("image.tidx");
    run_ok(&[&"make", &path, &"--store", &store, &"--index", &index]);
    let nginx = Nginx::start(&store);
    let chunks = chunk_count(&store);

    // The server goes away after two thirds of the chunks.
    let proxy = Arc::new(Proxy::start(
        nginx.addr(),
        Arc::new(|_, _: &str, _: &str| Fault::Pass),
    ));
    let p2 = proxy.clone();
    proxy.set_plan(Arc::new(move |n, _: &str, _: &str| {
        if n == chunks * 2 / 3 {
            p2.set_down(true);
        }
        Fault::Delay(Duration::from_millis(5))
    }));
    let target = dir.path().join("out.raw");
    let err = run_err(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &proxy.url(),
        &"--retries",
        &"1",
        &"--jobs",
        &"2",
    ]);
    assert!(err.contains(&proxy.url()), "{err}");
    let written = fs::read(&target).unwrap();
    for (i, (t, m)) in written.iter().zip(&image).enumerate() {
        assert!(
            *t == *m || *t == 0,
            "byte {i} is neither the image's nor zero"
        );
    }

    // Back again: the same command resumes and fetches only what is missing.
    proxy.set_down(false);
    proxy.set_plan(Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let before = proxy.requests();
    let out = json(&run_ok(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &proxy.url(),
        &"--json",
    ]));
    assert_eq!(fs::read(&target).unwrap(), image);
    assert_eq!(out["resumed"], serde_json::Value::Bool(true), "{out}");
    let refetched = proxy.requests() - before;
    assert!(
        refetched < chunks / 2,
        "re-run fetched {refetched} of {chunks} chunks"
    );
}
