//! Hostile servers and hostile neighbours: an index by URL never touches the disk, an
//! index past --max-index-size is refused, range answers are cut off at the length asked,
//! a server trickling bytes is abandoned at the --deadline, and redirects out of http(s)
//! are refused. Every error names the URL.

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
    /// The index, inside the store directory so that nginx serves it.
    index: PathBuf,
    nginx: Nginx,
}

fn setup(len: usize, seed: u64) -> Setup {
    let dir = TempDir::new().unwrap();
    let image = random_bytes(len, seed);
    let path = dir.path().join("image.raw");
    fs::write(&path, &image).unwrap();
    let store = dir.path().join("store");
    let index = store.join("image.tidx");
    run_ok(&[&"make", &path, &"--store", &store, &"--index", &index]);
    let nginx = Nginx::start(&store);
    Setup {
        dir,
        image,
        index,
        nginx,
    }
}

/// The first chunk record of an index: (hex id, length).
fn first_chunk(index: &[u8]) -> (String, u32) {
    let id = index[80..112].iter().map(|b| format!("{b:02x}")).collect();
    (id, u32::from_le_bytes(index[112..116].try_into().unwrap()))
}

/// Everything below `dir`, as paths.
fn listing(dir: &std::path::Path) -> Vec<PathBuf> {
    tree_contents(dir).into_iter().map(|(p, _)| p).collect()
}

/// A remote index and its signature used to be downloaded to a predictable path under
/// $TMPDIR and written there (following symlinks) before any check. Now they stay in
/// memory: a sync and a serve by URL, signature checked, create nothing under TMPDIR.
#[test]
fn an_index_by_url_is_never_written_to_disk() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(3_000_000, 21);
    let (secret, public) = (s.dir.path().join("k.sec"), s.dir.path().join("k.pub"));
    run_ok(&[
        &"keygen",
        &"--secret-key",
        &secret,
        &"--public-key",
        &public,
    ]);
    run_ok(&[&"sign", &s.index, &"--secret-key", &secret]);
    let tmp = s.dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let url = format!("{}/image.tidx", s.nginx.url());
    let target = s.dir.path().join("out.raw");
    let out = tessera()
        .env("TMPDIR", &tmp)
        .args(["sync", &url])
        .arg(&target)
        .args(["--store", &s.nginx.url(), "--trusted-key"])
        .arg(&public)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&target).unwrap(), s.image);
    assert_eq!(
        listing(&tmp),
        Vec::<PathBuf>::new(),
        "sync wrote under TMPDIR"
    );
    // A refused index (wrong key) is refused from memory too.
    let (_, other) = (s.dir.path().join("o.sec"), s.dir.path().join("o.pub"));
    run_ok(&[
        &"keygen",
        &"--secret-key",
        &s.dir.path().join("o.sec"),
        &"--public-key",
        &other,
    ]);
    let out = tessera()
        .env("TMPDIR", &tmp)
        .args(["sync", &url])
        .arg(s.dir.path().join("refused.raw"))
        .args(["--store", &s.nginx.url(), "--trusted-key"])
        .arg(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a trusted key"),
        "{err}"
    );
    assert!(err.contains(&format!("{url}.minisig")), "{err}");
    assert_eq!(
        listing(&tmp),
        Vec::<PathBuf>::new(),
        "refusal wrote under TMPDIR"
    );
    if nbdcopy_available() {
        let tmp_str = tmp.display().to_string();
        let public = public.display().to_string();
        let served = serve_and_copy(
            s.dir.path(),
            &[&url, "--store", &s.nginx.url(), "--trusted-key", &public],
            &[("TMPDIR", &tmp_str)],
        );
        assert!(served == s.image, "served bytes differ");
        assert_eq!(
            listing(&tmp),
            Vec::<PathBuf>::new(),
            "serve wrote under TMPDIR"
        );
    }
}

#[test]
fn an_index_over_the_size_limit_is_refused_until_the_limit_is_raised() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(3_000_000, 22);
    let size = fs::metadata(&s.index).unwrap().len();
    assert!(size > 1024, "the index is {size} bytes");
    let url = format!("{}/image.tidx", s.nginx.url());
    let target = s.dir.path().join("out.raw");
    let sync = |limit: &str| {
        run(&[
            &"sync",
            &url,
            &target,
            &"--store",
            &s.nginx.url(),
            &"--max-index-size",
            &limit,
        ])
    };
    let out = sync("1K");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a {size}-byte index passed a 1 KiB limit"
    );
    assert!(err.contains(&url), "{err}");
    assert!(
        err.contains("larger than --max-index-size (1024 bytes)")
            && err.contains("1024 bytes allowed"),
        "{err}"
    );
    assert!(!target.exists());
    let out = sync("1M");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&target).unwrap(), s.image);
}

/// A range answer is bounded by the length asked, whether the server declares the extra
/// bytes (refused before reading) or streams them without a length (cut off there).
#[test]
fn a_range_body_past_the_length_asked_is_cut_off_and_refused() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(2_000_000, 23);
    for declared in [true, false] {
        let plan: Arc<Plan> = Arc::new(move |_n, m: &str, p: &str| {
            if m == "GET" && p.contains("/packs/") {
                Fault::Pad {
                    extra: 64 << 20,
                    declared,
                }
            } else {
                Fault::Pass
            }
        });
        let proxy = Proxy::start(s.nginx.addr(), plan);
        let target = s.dir.path().join(format!("out-{declared}.raw"));
        let err = run_err(&[
            &"sync",
            &s.index,
            &target,
            &"--store",
            &proxy.url(),
            &"--retries",
            &"0",
        ]);
        assert!(err.contains(&format!("{}/packs/", proxy.url())), "{err}");
        assert!(err.contains("bytes allowed"), "declared {declared}: {err}");
    }
}

/// A server that sends one byte a second never stalls long enough for the no-progress
/// timeout; the per-request deadline abandons it.
#[test]
fn a_server_trickling_bytes_is_abandoned_at_the_deadline() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(1_000_000, 24);
    let plan: Arc<Plan> = Arc::new(|_n, _m: &str, p: &str| {
        if p.contains("/packs/") {
            Fault::Trickle(Duration::from_secs(1))
        } else {
            Fault::Pass
        }
    });
    let proxy = Proxy::start(s.nginx.addr(), plan);
    let err = run_err(&[
        &"sync",
        &s.index,
        &s.dir.path().join("out.raw"),
        &"--store",
        &proxy.url(),
        &"--timeout",
        &"30",
        &"--deadline",
        &"2",
        &"--jobs",
        &"2",
    ]);
    assert!(err.contains(&format!("{}/packs/", proxy.url())), "{err}");
    assert!(err.contains("within the 2 s deadline"), "{err}");
}

#[test]
fn redirects_out_of_http_are_refused() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(1_000_000, 25);
    let plan: Arc<Plan> = Arc::new(|_n, _m: &str, p: &str| {
        if p.ends_with(".tidx") {
            Fault::Redirect("file:///etc/passwd")
        } else {
            Fault::Pass
        }
    });
    let proxy = Proxy::start(s.nginx.addr(), plan);
    let url = format!("{}/image.tidx", proxy.url());
    let target = s.dir.path().join("out.raw");
    let err = run_err(&[&"sync", &url, &target, &"--store", &proxy.url()]);
    assert!(err.contains(&url), "{err}");
    assert!(
        err.contains("redirected to \"file:///etc/passwd\", refused"),
        "{err}"
    );
    assert!(!target.exists());
}

/// An index (checksum and all well formed) that lists one chunk id with two lengths is
/// refused when parsed, naming the id and both records, before anything is written.
#[test]
fn an_index_listing_one_id_with_two_lengths_is_refused() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(2_000_000, 26);
    let mut bytes = fs::read(&s.index).unwrap();
    let (id, first_len) = first_chunk(&bytes);
    let second_len = u32::from_le_bytes(bytes[148..152].try_into().unwrap());
    assert_ne!(
        first_len, second_len,
        "pick a seed whose first chunks differ in length"
    );
    // Record 1 (at offset 116) now names chunk 0's id, with its own length.
    let first_id = bytes[80..112].to_vec();
    bytes[116..148].copy_from_slice(&first_id);
    let body = bytes.len() - 32;
    let sum = tessera_engine::ChunkId::of(&bytes[..body]);
    bytes[body..].copy_from_slice(sum.as_bytes());
    fs::write(&s.index, &bytes).unwrap();
    let url = format!("{}/image.tidx", s.nginx.url());
    let target = s.dir.path().join("out.raw");
    for index in [url.as_str(), &s.index.display().to_string()] {
        let err = run_err(&[&"sync", &index, &target, &"--store", &s.nginx.url()]);
        assert!(err.contains(index) && err.contains(&id), "{err}");
        assert!(
            err.contains(&format!(
                "length {first_len} at position 0 (record at offset 80) and with length \
                 {second_len} at position 1 (record at offset 116)"
            )),
            "{err}"
        );
        assert!(!target.exists(), "a refused index created its target");
    }
    let err = run_err(&[&"info", &s.index]);
    assert!(err.contains("one id cannot have two lengths"), "{err}");
    // serve refuses it before listening (it used to panic on the first read).
    let sock = s.dir.path().join("nbd.sock");
    let mut child = tessera()
        .args(["serve", &url, "--store", &s.nginx.url(), "--unix"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded wait for the exit, so a server that wrongly starts fails the test.
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > give_up {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "serve started: {err}");
    assert!(err.contains(&id) && err.contains("two lengths"), "{err}");
    assert!(!sock.exists());
}

/// The signature is fetched only when trusted keys need it: without keys a sync by URL
/// never asks for it (a hostile server cannot hold the sync there), with keys it does.
#[test]
fn the_signature_is_fetched_only_when_keys_need_it() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let s = setup(1_000_000, 27);
    let (secret, public) = (s.dir.path().join("k.sec"), s.dir.path().join("k.pub"));
    run_ok(&[
        &"keygen",
        &"--secret-key",
        &secret,
        &"--public-key",
        &public,
    ]);
    run_ok(&[&"sign", &s.index, &"--secret-key", &secret]);
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let plan: Arc<Plan> = Arc::new(move |_n, _m: &str, p: &str| {
        log.lock().unwrap().push(p.to_string());
        if p.ends_with(".minisig") {
            // Would hold the sync for the whole deadline if it were asked for.
            Fault::Trickle(Duration::from_secs(1))
        } else {
            Fault::Pass
        }
    });
    let proxy = Proxy::start(s.nginx.addr(), plan);
    let url = format!("{}/image.tidx", proxy.url());
    let target = s.dir.path().join("out.raw");
    run_ok(&[&"sync", &url, &target, &"--store", &s.nginx.url()]);
    assert_eq!(fs::read(&target).unwrap(), s.image);
    let minisig = |seen: &[String]| seen.iter().filter(|p| p.ends_with(".minisig")).count();
    assert_eq!(
        minisig(&seen.lock().unwrap()),
        0,
        "{:?}",
        seen.lock().unwrap()
    );
    // With a key, it is fetched (here from a trickling server: refused at the deadline,
    // naming the signature's URL).
    let err = run_err(&[
        &"sync",
        &url,
        &s.dir.path().join("out2.raw"),
        &"--store",
        &s.nginx.url(),
        &"--trusted-key",
        &public,
        &"--deadline",
        &"1",
    ]);
    assert_eq!(minisig(&seen.lock().unwrap()), 1);
    assert!(
        err.contains(&format!("{url}.minisig cannot be fetched")) && err.contains("deadline"),
        "{err}"
    );
}
