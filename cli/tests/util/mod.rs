//! Helpers shared by the CLI integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{RngCore, SeedableRng};

/// The `tessera` binary under test.
pub fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

/// Runs `tessera ARGS`, returning its output; fails the test if it panicked.
pub fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let out = tessera()
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("running tessera");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "tessera panicked: {stderr}");
    out
}

/// Runs `tessera ARGS` and asserts success, returning stdout.
pub fn run_ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "tessera {:?} failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `tessera ARGS` and asserts failure, returning stderr.
pub fn run_err(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = run(args);
    assert!(
        !out.status.success(),
        "tessera {:?} unexpectedly succeeded",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    );
    String::from_utf8(out.stderr).expect("utf-8 stderr")
}

/// Parses JSON from a command's stdout.
pub fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("bad JSON {e}: {stdout}"))
}

/// Deterministic random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// True when this process runs as root (loop devices, mounts).
pub fn is_root() -> bool {
    // Root's home is /root and `id -u` prints 0; avoid libc in tests.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

/// Skips (returns true) when a prerequisite is missing on a developer machine; fails the
/// test when it is missing under CI (`CI=true`), where every prerequisite must exist.
pub fn skip_unless(available: bool, what: &str) -> bool {
    if available {
        return false;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} is required under CI=true but missing");
    }
    eprintln!("skipping: {what} is not available here");
    true
}

/// A loop device over `file`, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device (needs root).
    pub fn attach(file: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("running losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        LoopDevice { path }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Whether loop devices can be used here.
pub fn loop_available() -> bool {
    is_root() && Path::new("/dev/loop-control").exists()
}

/// Lists every file below `dir` as (relative path, bytes), sorted.
pub fn tree_contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Every frame of every pack below `store`, as (pack path, its table-of-contents record),
/// packs in path order, frames in pack order.
pub fn pack_frames(store: &Path) -> Vec<(PathBuf, tessera_engine::pack::TocEntry)> {
    use tessera_engine::pack::{parse_toc, toc_tail_len};
    let mut out = Vec::new();
    for (rel, bytes) in tree_contents(&store.join("packs")) {
        if rel.file_name().unwrap().to_string_lossy().starts_with('.') {
            continue; // A temporary file.
        }
        let size = bytes.len() as u64;
        let tail = toc_tail_len(&bytes[bytes.len() - 8..], size, "pack").unwrap();
        let path = store.join("packs").join(rel);
        for e in parse_toc(&bytes[(size - tail) as usize..], size, "pack").unwrap() {
            out.push((path.clone(), e));
        }
    }
    out
}

/// The bytes of frame `e` of the pack at `pack`.
pub fn frame_bytes(pack: &Path, e: &tessera_engine::pack::TocEntry) -> Vec<u8> {
    let bytes = std::fs::read(pack).unwrap();
    bytes[e.offset as usize..(e.offset + u64::from(e.clen)) as usize].to_vec()
}

/// True when `tool` can be run; skips (or fails under CI=true) otherwise.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    !skip_unless(found, tool)
}

/// Runs `cmd`, asserts it succeeded (showing its output otherwise), returns its stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
