//! Store lifecycle through the real binary: `check` finds damage (a flipped byte, a
//! deleted pack) in a local store and over nginx; `prune` condemns, then deletes after
//! the grace, locally and in S3 (moto); a `make` racing prunes into the same S3 store
//! publishes an index whose every chunk stays.

mod remote_support;
mod util;

use std::fs;
use std::path::Path;
use std::process::Command;

use remote_support::*;
use tempfile::TempDir;
use util::*;

/// Makes `data` into `store` (a directory or URL), index at `index`.
fn make(dir: &Path, name: &str, data: &[u8], store: &str, env: &[(&str, &str)]) -> String {
    let img = dir.join(format!("{name}.img"));
    fs::write(&img, data).unwrap();
    let index = dir.join(format!("{name}.tidx"));
    let out = with_env(
        &[
            "make",
            img.to_str().unwrap(),
            "--store",
            store,
            "--index",
            index.to_str().unwrap(),
            "--chunk-size",
            "4K:16K:64K",
        ],
        env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    index.to_str().unwrap().to_string()
}

fn with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running tessera");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    out
}

/// Two releases sharing their first half.
fn releases() -> (Vec<u8>, Vec<u8>) {
    let v1 = random_bytes(1_500_000, 1);
    let mut v2 = v1.clone();
    v2[750_000..].copy_from_slice(&random_bytes(750_000, 2));
    (v1, v2)
}

/// `check ARGS --json`: (exit code, report).
fn check(args: &[&str], env: &[(&str, &str)]) -> (i32, serde_json::Value) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = with_env(&all, env);
    let code = out.status.code().unwrap();
    (code, json(&String::from_utf8(out.stdout).unwrap()))
}

fn kinds(report: &serde_json::Value) -> Vec<String> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn check_finds_a_flipped_byte_and_a_deleted_pack() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let (v1, v2) = releases();
    let i1 = make(dir.path(), "v1", &v1, s, &[]);
    let i2 = make(dir.path(), "v2", &v2, s, &[]);
    let (code, r) = check(&["--store", s], &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["packs"], 2);
    let (code, _) = check(&["--store", s, &i1, &i2], &[]);
    assert_eq!(code, 0);

    // Flip one byte in the middle of a frame of v1's pack.
    let frames = pack_frames(&store);
    let (pack, e) = frames[frames.len() / 3].clone();
    let good = fs::read(&pack).unwrap();
    let mut bad = good.clone();
    bad[(e.offset + u64::from(e.clen) / 2) as usize] ^= 0x40;
    fs::write(&pack, &bad).unwrap();
    for args in [vec!["--store", s], vec!["--store", s, &i1]] {
        let (code, r) = check(&args, &[]);
        assert_eq!(code, 1, "{r}");
        let k = kinds(&r);
        assert!(k.contains(&"corrupt_pack".to_string()), "{r}");
        let chunk = r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["kind"] == "corrupt_chunk")
            .unwrap_or_else(|| panic!("no corrupt chunk in {r}"));
        assert_eq!(chunk["chunk"], e.id.to_string());
        assert_eq!(chunk["offset"], e.offset);
        let name = pack.file_stem().unwrap().to_str().unwrap();
        assert_eq!(chunk["pack"], name);
    }
    // The human form names the chunk on stderr, exit 1.
    let err = run_err(&[&"check", &"--store", &s]);
    assert!(
        err.contains(&e.id.to_string()) && err.contains("is corrupt"),
        "{err}"
    );
    fs::write(&pack, &good).unwrap();

    // Delete v2's own pack: checking v2 reports it and its chunks missing.
    let other = pack_files(&store).into_iter().find(|p| *p != pack).unwrap();
    fs::remove_file(&other).unwrap();
    let (code, r) = check(&["--store", s, &i2], &[]);
    assert_eq!(code, 1, "{r}");
    let k = kinds(&r);
    assert!(k.contains(&"missing_pack".to_string()), "{r}");
    assert!(k.contains(&"missing_chunk".to_string()), "{r}");
    let (code, _) = check(&["--store", s, &i1], &[]);
    assert_eq!(code, 0, "v1 does not need that pack");

    // An index made elsewhere has no location file here.
    let elsewhere = dir.path().join("elsewhere");
    let i3 = make(
        dir.path(),
        "v3",
        &random_bytes(100_000, 3),
        elsewhere.to_str().unwrap(),
        &[],
    );
    let (code, r) = check(&["--store", s, &i3], &[]);
    assert_eq!(code, 1);
    assert_eq!(kinds(&r), vec!["missing_locations".to_string()]);
}

#[test]
fn check_over_http_needs_indexes_and_finds_damage() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    let (v1, _) = releases();
    let i1 = make(dir.path(), "v1", &v1, store.to_str().unwrap(), &[]);
    let nginx = Nginx::start(&store);
    let url = nginx.url();
    let (code, r) = check(&["--store", &url, &i1], &[]);
    assert_eq!(code, 0, "{r}");
    assert!(r["chunks"].as_u64().unwrap() > 10);
    let err = run_err(&[&"check", &"--store", &url]);
    assert!(
        err.contains("cannot be listed") && err.contains("INDEX"),
        "{err}"
    );
    // An HTTP store is read-only: it cannot be pruned.
    let err = run_err(&[&"prune", &"--store", &url, &"--keep", &i1]);
    assert!(err.contains("read-only"), "{err}");
    let (pack, e) = pack_frames(&store)[3].clone();
    let mut bytes = fs::read(&pack).unwrap();
    bytes[e.offset as usize + 5] ^= 1;
    fs::write(&pack, &bytes).unwrap();
    let (code, r) = check(&["--store", &url, &i1], &[]);
    assert_eq!(code, 1, "{r}");
    assert!(kinds(&r).contains(&"corrupt_chunk".to_string()), "{r}");
    fs::remove_file(&pack).unwrap();
    let (code, r) = check(&["--store", &url, &i1], &[]);
    assert_eq!(code, 1, "{r}");
    assert!(kinds(&r).contains(&"missing_pack".to_string()), "{r}");
}

/// `prune --keep NEW` twice with no grace: the old release's pack and location file are
/// condemned, then deleted; the kept one stays whole.
fn prune_round_trip(store: &str, dir: &Path, env: &[(&str, &str)]) {
    let (v1, v2) = releases();
    let i1 = make(dir, "v1", &v1, store, env);
    let i2 = make(dir, "v2", &v2, store, env);
    let prune = |extra: &[&str]| {
        let mut args = vec!["prune", "--store", store, "--keep", &i2, "--json"];
        args.extend_from_slice(extra);
        let out = with_env(&args, env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&String::from_utf8(out.stdout).unwrap())
    };
    let dry = prune(&["--grace", "0", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["condemned_locations"].as_array().unwrap().len(), 1);
    let (_, before) = check(&["--store", store], env);
    // First prune: v1's location file is condemned, nothing is deleted yet.
    let first = prune(&["--grace", "0"]);
    assert_eq!(
        first["condemned_locations"].as_array().unwrap().len(),
        1,
        "{first}"
    );
    assert!(
        first["deleted_packs"].as_array().unwrap().is_empty(),
        "{first}"
    );
    let (code, r) = check(&["--store", store, &i1, &i2], env);
    assert_eq!(code, 0, "condemned files stay readable: {r}");
    let second = prune(&["--grace", "0"]);
    assert_eq!(
        second["deleted_locations"].as_array().unwrap().len(),
        1,
        "{second}"
    );
    let (code, r) = check(&["--store", store, &i2], env);
    assert_eq!(code, 0, "{r}");
    let (code, _) = check(&["--store", store, &i1], env);
    assert_eq!(code, 1, "v1's location data is gone");
    let (code, after) = check(&["--store", store], env);
    assert_eq!(code, 0);
    assert!(
        after["bytes_read"].as_u64() < before["bytes_read"].as_u64(),
        "{before} {after}"
    );
    // A kept index must have location data.
    let out = with_env(&["prune", "--store", store, "--keep", &i1], env);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no valid location data"));
}

#[test]
fn prune_local_store() {
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    prune_round_trip(store.to_str().unwrap(), dir.path(), &[]);
    assert!(fs::read_dir(store.join("makes")).unwrap().next().is_none());
    assert!(fs::read_dir(store.join("prunes")).unwrap().next().is_none());
}

fn s3_env(moto: &Moto) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&str, String)> = S3_ENV.iter().map(|(k, v)| (*k, v.to_string())).collect();
    env.push(("AWS_ENDPOINT_URL", moto.endpoint()));
    env
}

#[test]
fn prune_s3_store() {
    if skip_unless(moto_available(), "moto_server (pip install 'moto[server]')") {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("lifecycle");
    let env = s3_env(&moto);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = TempDir::new().unwrap();
    prune_round_trip("s3://lifecycle/store", dir.path(), &env);
}

#[test]
fn a_make_racing_prunes_in_s3_publishes_a_whole_index() {
    if skip_unless(moto_available(), "moto_server (pip install 'moto[server]')") {
        return;
    }
    let moto = Moto::start();
    moto.create_bucket("race");
    let env = s3_env(&moto);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = TempDir::new().unwrap();
    let store = "s3://race/s";
    let images: Vec<Vec<u8>> = (0..5).map(|i| random_bytes(400_000, 10 + i)).collect();
    let first = make(dir.path(), "r0", &images[0], store, &env);
    let latest = dir.path().join("latest.tidx");
    fs::copy(&first, &latest).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pruner = {
        let (env, latest, stop) = (
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
            latest.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || runs < 2 {
                // Grace 1 s: a release's packs are condemned when the next is kept and
                // deleted about when the cycle of releases comes back to it, so makes
                // reuse packs that prunes are deleting.
                let out = with_env(
                    &[
                        "prune",
                        "--store",
                        store,
                        "--keep",
                        latest.to_str().unwrap(),
                        "--grace",
                        "1s",
                    ],
                    &env,
                );
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };
    // Releases cycle, so makes keep reusing packs that prunes condemned.
    for round in 1..12 {
        let name = format!("r{round}");
        let index = make(
            dir.path(),
            &name,
            &images[round % images.len()],
            store,
            &env,
        );
        let tmp = dir.path().join("latest.tmp");
        fs::copy(&index, &tmp).unwrap();
        fs::rename(&tmp, &latest).unwrap();
        let (code, r) = check(&["--store", store, &index], &env);
        assert_eq!(code, 0, "round {round}: {r}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(pruner.join().unwrap() >= 2);
    let last = latest.to_str().unwrap();
    let (code, r) = check(&["--store", store, last], &env);
    assert_eq!(code, 0, "{r}");
    // Past the grace, later prunes delete what they may; the last index stays whole.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    for _ in 0..2 {
        let out = with_env(
            &["prune", "--store", store, "--keep", last, "--grace", "2s"],
            &env,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (code, r) = check(&["--store", store, last], &env);
    assert_eq!(code, 0, "{r}");
    let (code, r) = check(&["--store", store], &env);
    assert_eq!(code, 0, "{r}");
}
