//! The download estimate of `sync --dry-run` and the `--max-download` limit, through the
//! real binary: the estimate equals what the sync then downloads (local packed store and
//! nginx), and a refused sync leaves its target untouched.

mod remote_support;
mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use remote_support::*;
use tempfile::TempDir;
use tessera_fixtures::{Fixtures, Params};
use util::*;

/// Release N and N+1 (ext4 pair), both made into one store with small chunks (so that a
/// sync coalesces many frames, with gaps, into few requests); the indexes sit in the
/// store directory so that nginx serves them too.
struct Releases {
    dir: TempDir,
    old: PathBuf,
    new: PathBuf,
    store: PathBuf,
}

fn releases() -> Releases {
    let pair = Fixtures::from_env()
        .ext4(Params::default())
        .expect("building the ext4 fixture");
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    for (image, name) in [(&pair.old, "old.tidx"), (&pair.rebuilt, "new.tidx")] {
        run_ok(&[
            &"make",
            image,
            &"--store",
            &store,
            &"--index",
            &store.join(name),
            &"--chunk-size",
            &"4K:16K:64K",
        ]);
    }
    Releases {
        old: pair.old,
        new: pair.rebuilt,
        store,
        dir,
    }
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

/// `sync INDEX TARGET --store STORE --json EXTRA...` (index and store paths or URLs).
fn sync(index: &str, target: &Path, store: &str, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"sync", &index, &target, &"--store", &store, &"--json"];
    for e in extra {
        args.push(e);
    }
    json(&run_ok(&args))
}

fn journal_of(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap().to_string_lossy();
    target.with_file_name(format!(".{name}.tessera-journal"))
}

/// Dry run then sync; asserts the dry run's bytes and requests are the sync's, and that
/// the sync coalesced (fewer requests than chunks, gap bytes read). Returns the sync's
/// report.
fn estimate_then_sync(index: &str, target: &Path, store: &str) -> serde_json::Value {
    let before = fs::read(target).ok();
    let dry = sync(index, target, store, &["--dry-run"]);
    assert_eq!(
        fs::read(target).ok(),
        before,
        "the dry run changed the target"
    );
    assert!(!journal_of(target).exists(), "the dry run wrote a journal");
    let real = sync(index, target, store, &[]);
    assert!(dry["dry_run"].as_bool().unwrap(), "{dry}");
    for f in [
        "bytes_downloaded",
        "requests",
        "chunks_fetched",
        "bytes_fetched",
    ] {
        assert_eq!(
            field(&dry, f),
            field(&real, f),
            "{f}: dry run {dry}, sync {real}"
        );
    }
    assert!(
        field(&real, "requests") > 0 && field(&real, "requests") < field(&real, "chunks_fetched"),
        "no coalescing to check: {real}"
    );
    real
}

#[test]
fn dry_run_estimate_equals_the_local_download() {
    let r = releases();
    let store = r.store.to_str().unwrap();
    let new_index = r.store.join("new.tidx");
    let new_index = new_index.to_str().unwrap();

    // An update in place: release N -> N+1.
    let target = r.dir.path().join("target.img");
    fs::copy(&r.old, &target).unwrap();
    estimate_then_sync(new_index, &target, store);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&r.new).unwrap());

    // A missing target: everything but zeros comes from the store.
    let fresh = r.dir.path().join("fresh.img");
    estimate_then_sync(new_index, &fresh, store);
    assert_eq!(fs::read(&fresh).unwrap(), fs::read(&r.new).unwrap());

    // Nothing left to fetch: an estimate of zero, and a sync that downloads nothing.
    let again = sync(new_index, &target, store, &["--dry-run"]);
    assert_eq!(
        (field(&again, "bytes_downloaded"), field(&again, "requests")),
        (0, 0),
        "{again}"
    );
}

/// Over HTTP the estimate counts the ranges' bodies: nginx answers exactly the ranges
/// asked, so the bytes and requests the proxy sees for packs are the estimate's (the
/// index and location file, and HTTP headers, are not counted).
#[test]
fn dry_run_estimate_equals_the_http_download() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let r = releases();
    let nginx = Nginx::start(&r.store);
    let proxy = Proxy::start(nginx.addr(), Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let url = proxy.url();
    let target = r.dir.path().join("target.img");
    fs::copy(&r.old, &target).unwrap();
    let index = format!("{url}/new.tidx");
    let store = format!("{url}/");

    let dry = sync(&index, &target, &store, &["--dry-run"]);
    let seen_before = proxy.seen().len();
    let real = estimate_then_sync(&index, &target, &store);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&r.new).unwrap());

    let seen = proxy.seen();
    // Requests of the two dry runs and the sync: the sync's are those after the second dry
    // run, which made as many requests as the first.
    let sync_reqs: Vec<_> = seen[2 * seen_before..]
        .iter()
        .filter(|s| s.path.contains("/packs/"))
        .collect();
    let range_bytes: u64 = sync_reqs
        .iter()
        .map(|s| {
            let v = s.range.as_deref().expect("a pack read without a range");
            let (a, b) = v
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .expect("a single range");
            b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1
        })
        .sum();
    assert_eq!(
        sync_reqs.len() as u64,
        field(&dry, "requests"),
        "{sync_reqs:?}"
    );
    assert_eq!(range_bytes, field(&dry, "bytes_downloaded"));
    assert_eq!(
        field(&real, "bytes_downloaded"),
        field(&dry, "bytes_downloaded")
    );
}

#[test]
fn max_download_refuses_before_touching_the_target() {
    let r = releases();
    let store = r.store.to_str().unwrap();
    let new_index = r.store.join("new.tidx");
    let new_index = new_index.to_str().unwrap();
    let target = r.dir.path().join("target.img");
    fs::copy(&r.old, &target).unwrap();
    let missing = r.dir.path().join("missing.img");

    for t in [&target, &missing] {
        let dry = sync(new_index, t, store, &["--dry-run"]);
        let need = field(&dry, "bytes_downloaded");
        let requests = field(&dry, "requests");
        assert!(need > 1024, "{dry}");
        let before = fs::read(t).ok();
        let limit = (need - 1).to_string();
        let err = run_err(&[
            &"sync",
            &new_index,
            t,
            &"--store",
            &store,
            &"--max-download",
            &limit,
        ]);
        assert!(
            err.contains(&need.to_string())
                && err.contains(&limit)
                && err.contains(&format!("{requests} requests")),
            "the refusal names neither what is needed nor the limit: {err}"
        );
        assert_eq!(fs::read(t).ok(), before, "{} was touched", t.display());
        assert!(
            !journal_of(t).exists(),
            "a journal was written for {}",
            t.display()
        );
        // K suffix, rounded down below the need: refused too.
        let kib = format!("{}K", (need - 1) / 1024);
        run_err(&[
            &"sync",
            &new_index,
            t,
            &"--store",
            &store,
            &"--max-download",
            &kib,
        ]);
        assert_eq!(fs::read(t).ok(), before);

        // Exactly the need is allowed.
        let out = sync(new_index, t, store, &["--max-download", &need.to_string()]);
        assert_eq!(field(&out, "bytes_downloaded"), need, "{out}");
        assert_eq!(fs::read(t).unwrap(), fs::read(&r.new).unwrap());
    }
}
