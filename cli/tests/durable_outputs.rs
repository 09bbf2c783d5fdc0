//! Every file the CLI creates survives a power cut once the command has returned: on a
//! file system that keeps only what was synced (POSIX allows it; btrfs, FUSE and network
//! file systems behave like it), a file is durable only when its data was synced before it
//! got its name and its directory was synced after. Checked on the system calls themselves
//! (`strace`), with bare relative names (the directory is then `.`).

mod util;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use util::*;

/// The calls that matter, one per line, unfinished calls of threads joined.
fn trace(dir: &Path, args: &[&str]) -> Vec<String> {
    let log = dir.join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-y", "-qq", "-o"])
        .arg(&log)
        .args([
            "-e",
            "trace=rename,renameat,renameat2,fsync,fdatasync,unlink,unlinkat",
        ])
        .arg(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running strace");
    assert!(
        out.status.success(),
        "tessera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&log).unwrap();
    fs::remove_file(&log).unwrap();
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let (pid, rest) = line.split_once(' ').unwrap_or(("", line));
        // strace pads short pids to a fixed width.
        let rest = rest.trim_start();
        if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid.to_string(), head.to_string());
        } else if let Some((_, tail)) = rest.split_once("resumed>") {
            let head = pending.remove(pid).unwrap_or_default();
            calls.push(format!("{head}{tail}"));
        } else {
            calls.push(rest.to_string());
        }
    }
    calls
}

/// The quoted strings of a call.
fn quoted(call: &str) -> Vec<&str> {
    call.split('"').skip(1).step_by(2).collect()
}

/// Whether `call` is an fsync or fdatasync of the file at `path` that succeeded.
fn syncs(call: &str, path: &Path) -> bool {
    (call.starts_with("fsync(") || call.starts_with("fdatasync("))
        && call.contains(&format!("<{}>)", path.display()))
        && call.ends_with("= 0")
}

/// Asserts that `name` was put in place durably in `dir`: the file renamed to it was
/// synced before the rename, and `dir` after it.
fn assert_durable(calls: &[String], dir: &Path, name: &str) {
    let at = calls
        .iter()
        .rposition(|c| {
            c.starts_with("rename")
                && c.ends_with("= 0")
                && quoted(c)
                    .get(1)
                    .is_some_and(|to| Path::new(to).file_name() == Some(name.as_ref()))
        })
        .unwrap_or_else(|| panic!("{name} was never renamed into place: {calls:#?}"));
    let from = quoted(&calls[at])[0];
    let tmp = dir.join(Path::new(from).file_name().unwrap());
    assert!(
        calls[..at].iter().any(|c| syncs(c, &tmp)),
        "{name}: its data ({}) was not synced before the rename: {calls:#?}",
        tmp.display()
    );
    assert!(
        calls[at..].iter().any(|c| syncs(c, dir)),
        "{name}: its directory {} was not synced after the rename: {calls:#?}",
        dir.display()
    );
}

#[test]
fn every_output_is_durable_when_the_command_returns() {
    if skip_unless(Command::new("strace").arg("-V").output().is_ok(), "strace") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    fs::write(dir.join("image.raw"), random_bytes(3 << 20, 7)).unwrap();

    let calls = trace(
        &dir,
        &[
            "make",
            "image.raw",
            "--store",
            "store",
            "--index",
            "image.tidx",
        ],
    );
    assert_durable(&calls, &dir, "image.tidx");

    let calls = trace(
        &dir,
        &["keygen", "--secret-key", "k.sec", "--public-key", "k.pub"],
    );
    assert_durable(&calls, &dir, "k.sec");
    assert_durable(&calls, &dir, "k.pub");

    let calls = trace(&dir, &["sign", "--secret-key", "k.sec", "image.tidx"]);
    assert_durable(&calls, &dir, "image.tidx.minisig");

    let calls = trace(
        &dir,
        &[
            "verity",
            "--hash-file",
            "hash.img",
            "image.tidx",
            "image.raw",
        ],
    );
    assert_durable(&calls, &dir, "hash.img");

    // A new target, and its journal: created durably, and removed durably at the end.
    let calls = trace(&dir, &["sync", "image.tidx", "new.img", "--store", "store"]);
    assert_durable(&calls, &dir, "new.img");
    assert_durable(&calls, &dir, ".new.img.tessera-journal");
    let removed = calls
        .iter()
        .rposition(|c| {
            c.starts_with("unlink")
                && c.ends_with("= 0")
                && quoted(c)
                    .iter()
                    .any(|q| q.ends_with(".new.img.tessera-journal"))
        })
        .expect("the journal was never removed");
    assert!(
        calls[removed..].iter().any(|c| syncs(c, &dir)),
        "the journal's removal was not made durable: {calls:#?}"
    );
    assert_eq!(
        fs::read(dir.join("new.img")).unwrap(),
        fs::read(dir.join("image.raw")).unwrap()
    );
}
