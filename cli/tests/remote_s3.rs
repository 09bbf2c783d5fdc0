//! S3 stores through the real binary, against moto's S3 server on loopback: `make` into a
//! bucket (a few pack PUTs, the location file, the index last), `sync` from it with the
//! index by s3:// URL (ranged GETs), incremental uploads, and an index never published
//! when an upload fails.

mod remote_support;
mod util;

use std::fs;
use std::process::Command;
use std::sync::Arc;

use remote_support::*;
use tempfile::TempDir;
use util::*;

/// `tessera ARGS` with moto's endpoint and credentials in the environment.
fn tessera_s3(endpoint: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.args(args.iter().map(|a| a.as_ref()))
        .env("AWS_ENDPOINT_URL", endpoint)
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env_remove("AWS_SESSION_TOKEN");
    for (k, v) in S3_ENV {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running tessera");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    out
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn make_into_s3_then_sync_from_it_by_url() {
    if skip_unless(moto_available(), "moto_server (pip install 'moto[server]')") {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("images");
    let ep = moto.endpoint();
    let dir = TempDir::new().unwrap();
    let mut v1 = random_bytes(6_000_000, 20);
    v1[1_000_000..1_700_000].fill(0);
    let img = dir.path().join("v1.raw");
    fs::write(&img, &v1).unwrap();

    let made = json(&ok(tessera_s3(
        &ep,
        &[
            &"make",
            &img,
            &"--store",
            &"s3://images/fleet",
            &"--index",
            &"s3://images/fleet/v1.tidx",
            &"--json",
        ],
    )));
    let unique = made["unique_chunks"].as_u64().unwrap();
    assert_eq!(made["new_chunks"].as_u64().unwrap(), unique);

    let target = dir.path().join("out.raw");
    ok(tessera_s3(
        &ep,
        &[
            &"sync",
            &"s3://images/fleet/v1.tidx",
            &target,
            &"--store",
            &"s3://images/fleet",
        ],
    ));
    assert_eq!(fs::read(&target).unwrap(), v1);

    // The same image again uploads nothing; an edited one only its changed chunks.
    let again = json(&ok(tessera_s3(
        &ep,
        &[
            &"make",
            &img,
            &"--store",
            &"s3://images/fleet",
            &"--index",
            &"s3://images/fleet/v1.tidx",
            &"--json",
        ],
    )));
    assert_eq!(again["new_chunks"].as_u64().unwrap(), 0);
    let mut v2 = v1.clone();
    v2[3_000_000..3_000_100].copy_from_slice(&random_bytes(100, 21));
    let img2 = dir.path().join("v2.raw");
    fs::write(&img2, &v2).unwrap();
    let second = json(&ok(tessera_s3(
        &ep,
        &[
            &"make",
            &img2,
            &"--store",
            &"s3://images/fleet",
            &"--index",
            &"s3://images/fleet/v2.tidx",
            &"--json",
        ],
    )));
    let new = second["new_chunks"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&new),
        "{new} new chunks for a 100-byte edit"
    );
    let target2 = dir.path().join("out2.raw");
    ok(tessera_s3(
        &ep,
        &[
            &"sync",
            &"s3://images/fleet/v2.tidx",
            &target2,
            &"--store",
            &"s3://images/fleet",
            &"--cache",
            &dir.path().join("cache"),
        ],
    ));
    assert_eq!(fs::read(&target2).unwrap(), v2);

    // `serve` from the bucket, the index by URL too.
    if nbdcopy_available() {
        let mut envs: Vec<(&str, &str)> = S3_ENV.to_vec();
        envs.push(("AWS_ENDPOINT_URL", &ep));
        let served = serve_and_copy(
            dir.path(),
            &["s3://images/fleet/v2.tidx", "--store", "s3://images/fleet"],
            &envs,
        );
        assert!(served == v2, "served bytes differ");
    } else {
        skip_unless(false, "nbdcopy");
    }

    // The --s3-endpoint flag works in place of the environment.
    let target3 = dir.path().join("out3.raw");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.args(["sync", "s3://images/fleet/v1.tidx"])
        .arg(&target3)
        .args(["--store", "s3://images/fleet", "--s3-endpoint", &ep])
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_S3");
    for (k, v) in S3_ENV {
        cmd.env(k, v);
    }
    ok(cmd.output().unwrap());
    assert_eq!(fs::read(&target3).unwrap(), v1);
}

#[test]
fn a_failed_upload_leaves_no_index_behind() {
    if skip_unless(moto_available(), "moto_server (pip install 'moto[server]')") {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("bkt");
    // Pack uploads fail for good; everything else passes.
    let proxy = Proxy::start(
        ([127, 0, 0, 1], moto.port).into(),
        Arc::new(|_, m: &str, p: &str| {
            if m == "PUT" && p.contains("/packs/") {
                Fault::Status500
            } else {
                Fault::Pass
            }
        }),
    );
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("i.raw");
    fs::write(&img, random_bytes(2_000_000, 22)).unwrap();
    let out = tessera_s3(
        &proxy.url(),
        &[
            &"make",
            &img,
            &"--store",
            &"s3://bkt/p",
            &"--index",
            &"s3://bkt/p/i.tidx",
            &"--retries",
            &"1",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("500") && err.contains("s3://bkt/p/packs/"),
        "{err}"
    );
    // No index was published.
    let out = tessera_s3(
        &moto.endpoint(),
        &[
            &"sync",
            &"s3://bkt/p/i.tidx",
            &dir.path().join("o"),
            &"--store",
            &"s3://bkt/p",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("s3://bkt/p/i.tidx") && err.contains("404"),
        "{err}"
    );
}

/// A release into S3 costs one PUT per 64 MiB pack of new data plus a constant (the
/// location file and the index), not one per chunk; the same release again uploads no
/// pack at all.
#[test]
fn a_release_into_s3_makes_one_put_per_64_mib_of_new_data() {
    if skip_unless(moto_available(), "moto_server (pip install 'moto[server]')") {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("rel");
    let proxy = Proxy::start(
        ([127, 0, 0, 1], moto.port).into(),
        Arc::new(|_, _: &str, _: &str| Fault::Pass),
    );
    let dir = TempDir::new().unwrap();
    // Random data: every byte is new, and just over one pack's worth.
    let len = 70_000_000;
    let image = random_bytes(len, 23);
    let img = dir.path().join("big.raw");
    fs::write(&img, &image).unwrap();
    let make = |index: &str| {
        ok(tessera_s3(
            &proxy.url(),
            &[
                &"make",
                &img,
                &"--store",
                &"s3://rel/store",
                &"--index",
                &index,
            ],
        ))
    };
    let puts = |from: usize| {
        let seen = proxy.seen();
        let puts: Vec<_> = seen[from..]
            .iter()
            .filter(|r| r.method == "PUT")
            .cloned()
            .collect();
        let packs = puts.iter().filter(|r| r.path.contains("/packs/")).count();
        (puts.len(), packs, puts)
    };
    make("s3://rel/store/v1.tidx");
    let (all, packs, list) = puts(0);
    let per_64_mib = (len as u64).div_ceil(64 << 20) as usize;
    assert!(
        (1..=per_64_mib).contains(&packs) && all <= packs + 2,
        "{all} PUTs ({packs} of packs) for {len} new bytes: {list:?}"
    );
    let before = proxy.seen().len();
    make("s3://rel/store/v1-again.tidx");
    let (all, packs, list) = puts(before);
    assert!(
        packs == 0 && all <= 2,
        "{all} PUTs ({packs} of packs) for no new data: {list:?}"
    );
    let target = dir.path().join("out.raw");
    ok(tessera_s3(
        &moto.endpoint(),
        &[
            &"sync",
            &"s3://rel/store/v1-again.tidx",
            &target,
            &"--store",
            &"s3://rel/store",
        ],
    ));
    assert!(fs::read(&target).unwrap() == image, "synced bytes differ");
}

/// S3 reads are ranged GETs under the same rules as HTTP: a service (or a proxy before
/// it) that answers a range with the whole object is refused, naming the object.
#[test]
fn an_s3_service_ignoring_range_is_refused() {
    if skip_unless(moto_available(), "moto_server (pip install 'moto[server]')") {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("rng");
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("i.raw");
    fs::write(&img, random_bytes(2_000_000, 24)).unwrap();
    ok(tessera_s3(
        &moto.endpoint(),
        &[
            &"make",
            &img,
            &"--store",
            &"s3://rng/s",
            &"--index",
            &dir.path().join("i.tidx"),
        ],
    ));
    let proxy = Proxy::start(
        ([127, 0, 0, 1], moto.port).into(),
        Arc::new(|_, _: &str, p: &str| {
            if p.contains("/packs/") {
                Fault::DropRange
            } else {
                Fault::Pass
            }
        }),
    );
    let out = tessera_s3(
        &proxy.url(),
        &[
            &"sync",
            &dir.path().join("i.tidx"),
            &dir.path().join("o.raw"),
            &"--store",
            &"s3://rng/s",
            &"--retries",
            &"0",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("s3://rng/s/packs/") && err.contains("must support HTTP Range requests"),
        "{err}"
    );
    assert!(
        !err.contains("X-Amz-Signature"),
        "a signature was shown: {err}"
    );
}
