//! `--progress json`: the event stream of real runs (make, sync fresh and resumed, verify,
//! verity, prune) parses, is consistent and monotonic, and ends with `done`.

mod remote_support;
mod util;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use remote_support::*;
use serde_json::Value;
use tempfile::TempDir;
use util::*;

const PHASES: [&str; 5] = ["scan", "plan", "write", "verify", "done"];

/// The JSON lines of `text` (other lines, such as the error message on stderr, skipped).
fn events(text: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(text)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event {e}: {l}")))
        .collect()
}

fn u(e: &Value, key: &str) -> u64 {
    e[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {e}"))
}

/// Checks the invariants of docs/PROGRESS.md; returns the last event (`done`). In a
/// `complete` run (not failed, not resumed) every phase is reported finished before the
/// next starts.
fn check_stream(evs: &[Value], command: &str, complete: bool) -> Value {
    assert!(!evs.is_empty(), "no events");
    let last = evs.last().unwrap().clone();
    assert_eq!(last["phase"], "done", "last event: {last}");
    assert_eq!(
        evs.iter().filter(|e| e["phase"] == "done").count(),
        1,
        "one done event"
    );
    for w in evs.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        for key in ["bytes_done", "chunks", "requests", "step"] {
            assert!(u(a, key) <= u(b, key), "{key} went back: {a} then {b}");
        }
        if let (Some(x), Some(y)) = (a["bytes_total"].as_u64(), b["bytes_total"].as_u64()) {
            assert!(x <= y, "bytes_total went back: {a} then {b}");
        }
        assert!(a["elapsed_seconds"].as_f64().unwrap() <= b["elapsed_seconds"].as_f64().unwrap());
        if u(a, "step") == u(b, "step") {
            assert_eq!(a["phase"], b["phase"]);
            assert_eq!(a["phase_bytes_total"], b["phase_bytes_total"]);
            assert!(u(a, "phase_bytes_done") <= u(b, "phase_bytes_done"));
        }
        // A phase only starts after the previous one was reported complete.
        if complete && u(a, "step") != u(b, "step") && a["phase_bytes_total"].is_u64() {
            assert!(
                u(a, "phase_bytes_done") >= u(a, "phase_bytes_total"),
                "phase left unfinished: {a} then {b}"
            );
        }
    }
    for e in evs {
        assert_eq!(e["command"], command, "{e}");
        let phase = e["phase"].as_str().unwrap();
        assert!(PHASES.contains(&phase), "unknown phase {phase}");
        if let Some(total) = e["bytes_total"].as_u64() {
            assert!(u(e, "bytes_done") <= total, "{e}");
        }
        assert!(e["resumed"].is_boolean(), "{e}");
        assert!(e["eta_seconds"].is_null() || e["eta_seconds"].as_f64().unwrap() >= 0.0);
    }
    if complete {
        assert_eq!(u(&last, "bytes_done"), u(&last, "bytes_total"), "{last}");
    }
    // The rate limit: at most 10 events a second, besides one start and one end per step.
    let steps = u(&last, "step");
    let secs = last["elapsed_seconds"].as_f64().unwrap();
    assert!(
        evs.len() as f64 <= secs * 10.0 + 2.0 * steps as f64 + 2.0,
        "{} events in {secs}s and {steps} steps",
        evs.len()
    );
    last
}

/// The last event of `phase` (the one reporting it complete).
fn last_of<'a>(evs: &'a [Value], phase: &str) -> &'a Value {
    evs.iter()
        .rev()
        .find(|e| e["phase"] == phase)
        .unwrap_or_else(|| panic!("no {phase} event"))
}

/// Runs `tessera ARGS --progress json --progress-fd 3` with descriptor 3 on a file (set
/// up by the shell, as an updater would): (exit code, stdout, events).
fn run_fd3(dir: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> (i32, String, Vec<Value>) {
    let log = dir.join("events.jsonl");
    let out = Command::new("sh")
        .arg("-c")
        .arg("log=$1; shift; exec \"$@\" --progress json --progress-fd 3 3>\"$log\"")
        .arg("sh")
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_tessera"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("\"phase\""),
        "events leaked to stderr: {stderr}"
    );
    let evs = events(&fs::read(&log).unwrap());
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        evs,
    )
}

fn made(dir: &Path, image: &[u8]) -> (std::path::PathBuf, std::path::PathBuf) {
    let path = dir.join("image.raw");
    fs::write(&path, image).unwrap();
    let store = dir.join("store");
    let index = dir.join("image.tidx");
    run_ok(&[&"make", &path, &"--store", &store, &"--index", &index]);
    (store, index)
}

#[test]
fn make_events_count_the_image_and_its_chunks() {
    let dir = TempDir::new().unwrap();
    let mut image = random_bytes(6_000_000, 1);
    image[1_000_000..2_000_000].fill(0);
    let path = dir.path().join("image.raw");
    fs::write(&path, &image).unwrap();
    let store = dir.path().join("store");
    let index = dir.path().join("image.tidx");
    let (code, stdout, evs) = run_fd3(
        dir.path(),
        &[
            &"make", &path, &"--store", &store, &"--index", &index, &"--json",
        ],
    );
    assert_eq!(code, 0);
    let report = json(&stdout);
    let done = check_stream(&evs, "make", true);
    assert_eq!(done["ok"], true);
    assert_eq!(done["exit_code"], 0);
    let scan = last_of(&evs, "scan");
    assert_eq!(u(scan, "phase_bytes_done"), image.len() as u64);
    assert_eq!(u(scan, "phase_bytes_total"), image.len() as u64);
    assert_eq!(u(&done, "bytes_done"), image.len() as u64);
    assert_eq!(u(&done, "chunks"), u(&report, "chunk_count"));
    assert_eq!(done["resumed"], false);

    // From stdin the size is unknown until the end: totals are null while reading.
    let mut child = util::tessera()
        .args(["make", "-", "--progress", "json", "--json", "--index"])
        .arg(dir.path().join("again.tidx"))
        .arg("--store")
        .arg(&store)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&image).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let evs = events(&out.stderr);
    let done = check_stream(&evs, "make", true);
    assert!(last_of(&evs, "scan")["phase_bytes_total"].is_null());
    assert_eq!(u(&done, "bytes_done"), image.len() as u64);
}

#[test]
fn sync_events_go_through_scan_plan_write_verify_done() {
    let dir = TempDir::new().unwrap();
    let v1 = random_bytes(4_000_000, 2);
    let mut v2 = v1.clone();
    v2[2_000_000..].copy_from_slice(&random_bytes(2_000_000, 3));
    let (store, index) = made(dir.path(), &v2);
    let target = dir.path().join("target.raw");
    fs::write(&target, &v1).unwrap();
    let (code, stdout, evs) = run_fd3(
        dir.path(),
        &[&"sync", &index, &target, &"--store", &store, &"--json"],
    );
    assert_eq!(code, 0);
    assert_eq!(fs::read(&target).unwrap(), v2);
    let report = json(&stdout);
    let done = check_stream(&evs, "sync", true);
    let order: Vec<&str> = evs.iter().map(|e| e["phase"].as_str().unwrap()).collect();
    let mut seen: Vec<&str> = order.clone();
    seen.dedup();
    assert_eq!(
        seen,
        ["scan", "plan", "write", "verify", "done"],
        "{order:?}"
    );
    assert_eq!(
        u(last_of(&evs, "scan"), "phase_bytes_done"),
        v1.len() as u64
    );
    assert_eq!(
        u(last_of(&evs, "write"), "phase_bytes_done"),
        u(&report, "bytes_written")
    );
    assert_eq!(u(&done, "requests"), u(&report, "requests"));
    assert!(u(&done, "chunks") > 0);
    assert_eq!(done["resumed"], false);
    // On stderr by default, beside nothing else when it succeeds.
    let out = run(&[&"verify", &index, &target, &"--progress", &"json"]);
    assert!(out.status.success());
    let done = check_stream(&events(&out.stderr), "verify", true);
    assert_eq!(u(&done, "bytes_done"), v2.len() as u64);
}

#[test]
fn a_failed_then_resumed_sync_reports_both_runs() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = random_bytes(24_000_000, 4);
    let (store, index) = made(dir.path(), &image);
    let nginx = Nginx::start(&store);
    // The server goes away after a few requests (small ones: --jobs 1).
    let proxy = Arc::new(Proxy::start(
        nginx.addr(),
        Arc::new(|_, _: &str, _: &str| Fault::Pass),
    ));
    let p2 = proxy.clone();
    proxy.set_plan(Arc::new(move |n, _: &str, _: &str| {
        if n == 3 {
            p2.set_down(true);
        }
        Fault::Pass
    }));
    let target = dir.path().join("out.raw");
    let url = proxy.url();
    let (code, _, evs) = run_fd3(
        dir.path(),
        &[
            &"sync",
            &index,
            &target,
            &"--store",
            &url,
            &"--retries",
            &"1",
            &"--jobs",
            &"1",
            &"--timeout",
            &"2",
        ],
    );
    let done = check_stream(&evs, "sync", false);
    assert_eq!(code, 3, "a store gone away is 'retry later'");
    assert_eq!(done["ok"], false);
    assert_eq!(done["exit_code"], 3);
    assert!(done["error"].as_str().unwrap().contains(&url), "{done}");
    let interrupted_write = u(last_of(&evs, "write"), "phase_bytes_done");
    assert!(interrupted_write < image.len() as u64);

    proxy.set_down(false);
    proxy.set_plan(Arc::new(|_, _: &str, _: &str| Fault::Pass));
    let (code, stdout, evs) = run_fd3(
        dir.path(),
        &[&"sync", &index, &target, &"--store", &url, &"--json"],
    );
    assert_eq!(code, 0);
    assert_eq!(fs::read(&target).unwrap(), image);
    let report = json(&stdout);
    assert_eq!(report["resumed"], true);
    let done = check_stream(&evs, "sync", false);
    assert!(evs.iter().all(|e| e["resumed"] == true), "{evs:?}");
    assert!(
        evs.iter().all(|e| e["phase"] != "scan"),
        "a resumed sync does not scan"
    );
    assert_eq!(u(&done, "requests"), u(&report, "requests"));
    // The interrupted phase's destinations are hashed first (a verify step).
    assert!(
        evs.iter()
            .any(|e| e["phase"] == "verify" && u(e, "phase_bytes_done") > 0),
        "{evs:?}"
    );
    assert_eq!(done["ok"], true);
}

#[test]
fn verify_of_stdin_verity_and_prune_end_with_done() {
    let dir = TempDir::new().unwrap();
    let image = random_bytes(3_000_000, 5);
    let (store, index) = made(dir.path(), &image);
    let target = dir.path().join("image.raw");

    let mut child = util::tessera()
        .args(["verify", "--progress", "json"])
        .arg(&index)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&image).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let evs = events(&out.stderr);
    let done = check_stream(&evs, "verify", true);
    assert_eq!(
        u(last_of(&evs, "verify"), "phase_bytes_done"),
        image.len() as u64
    );
    assert_eq!(
        u(&done, "chunks"),
        index_chunk_ids(&fs::read(&index).unwrap()).len() as u64
    );

    let tree = dir.path().join("tree");
    let (code, _, evs) = run_fd3(
        dir.path(),
        &[&"verity", &index, &target, &"--hash-file", &tree],
    );
    assert_eq!(code, 0);
    let done = check_stream(&evs, "verity", true);
    assert_eq!(u(&done, "bytes_done"), image.len() as u64);

    let (code, _, evs) = run_fd3(
        dir.path(),
        &[&"prune", &"--store", &store, &"--keep", &index],
    );
    assert_eq!(code, 0);
    check_stream(&evs, "prune", true);

    // A failing verify ends with done too, with the verdict.
    let mut bad = image.clone();
    bad[100] ^= 1;
    fs::write(&target, &bad).unwrap();
    let out = run(&[&"verify", &index, &target, &"--progress", &"json"]);
    assert_eq!(out.status.code(), Some(1));
    let done = check_stream(&events(&out.stderr), "verify", true);
    assert_eq!(done["ok"], false);
    assert_eq!(done["exit_code"], 1);
}

#[test]
fn progress_flags_are_checked() {
    let err = run_err(&[
        &"info",
        &"x.tidx",
        &"--progress-fd",
        &"1",
        &"--progress",
        &"json",
    ]);
    assert!(err.contains("--progress-fd 1"), "{err}");
    let err = run_err(&[&"info", &"x.tidx", &"--progress-fd", &"7"]);
    assert!(err.contains("--progress json"), "{err}");
    let err = run_err(&[
        &"info",
        &"x.tidx",
        &"--progress",
        &"json",
        &"--progress-fd",
        &"9",
    ]);
    assert!(err.contains("descriptor 9"), "{err}");
}
