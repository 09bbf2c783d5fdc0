//! A sync that loses its HTTP store mid-way resumes from its journal on the next run:
//! it re-fetches only what was not yet durably written, with no cache involved.

mod remote_support;
mod util;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use remote_support::*;
use tempfile::TempDir;
use util::*;

#[test]
fn network_loss_mid_sync_resumes_from_the_journal() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = random_bytes(24_000_000, 14);
    let path = dir.path().join("image.raw");
    fs::write(&path, &image).unwrap();
    let store = dir.path().join("store");
    let index = dir.path().join("image.tidx");
    run_ok(&[&"make", &path, &"--store", &store, &"--index", &index]);
    let nginx = Nginx::start(&store);

    // What an undisturbed sync asks, one request at a time.
    let honest = Proxy::start(nginx.addr(), Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let full = json(&run_ok(&[
        &"sync",
        &index,
        &dir.path().join("honest.raw"),
        &"--store",
        &honest.url(),
        &"--jobs",
        &"1",
        &"--json",
    ]));
    let full_bytes = full["bytes_downloaded"].as_u64().unwrap();
    let requests = honest.requests();
    assert!(
        requests >= 3,
        "want several range requests: {:?}",
        honest.seen()
    );

    // The server goes away after two thirds of the requests.
    let proxy = Arc::new(Proxy::start(
        nginx.addr(),
        Arc::new(|_, _: &str, _: &str| Fault::Pass),
    ));
    let p2 = proxy.clone();
    proxy.set_plan(Arc::new(move |n, _: &str, _: &str| {
        if n == requests * 2 / 3 {
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

    // Back again: the same command resumes and fetches only what is missing.
    proxy.set_down(false);
    proxy.set_plan(Arc::new(|_, _: &str, _: &str| Fault::Pass));
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
    let refetched = out["bytes_downloaded"].as_u64().unwrap();
    assert!(
        refetched < full_bytes * 2 / 3,
        "re-run downloaded {refetched} of {full_bytes} bytes"
    );
}
