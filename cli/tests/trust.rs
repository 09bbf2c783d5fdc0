//! Trust through the real binary: pinned root hashes, signed indexes (cross-checked with
//! the `minisign` tool both ways), rollback refusal, and dm-verity trees checked by
//! `veritysetup`. Every refusal must leave the target untouched.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;
use util::*;

/// A made image with a key pair and a signature of version 3.
struct Signed {
    dir: TempDir,
    image: PathBuf,
    store: PathBuf,
    index: PathBuf,
    root: String,
    public: PathBuf,
    secret: PathBuf,
}

impl Signed {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sig(&self) -> PathBuf {
        self.path("image.tidx.minisig")
    }
}

fn make(dir: &Path, bytes: &[u8]) -> (PathBuf, PathBuf, PathBuf, serde_json::Value) {
    let image = dir.join("image.raw");
    fs::write(&image, bytes).unwrap();
    let store = dir.join("store");
    let index = dir.join("image.tidx");
    let out = json(&run_ok(&[
        &"make", &image, &"--store", &store, &"--index", &index, &"--json",
    ]));
    (image, store, index, out)
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (secret, public) = (
        dir.join(format!("{name}.sec")),
        dir.join(format!("{name}.pub")),
    );
    run_ok(&[
        &"keygen",
        &"--secret-key",
        &secret,
        &"--public-key",
        &public,
    ]);
    (secret, public)
}

fn signed() -> Signed {
    let dir = TempDir::new().unwrap();
    let (image, store, index, made) = make(dir.path(), &random_bytes(900_000, 11));
    let (secret, public) = keygen(dir.path(), "release");
    run_ok(&[
        &"sign",
        &index,
        &"--secret-key",
        &secret,
        &"--version",
        &"3",
    ]);
    Signed {
        root: made["root_hash"].as_str().unwrap().to_string(),
        dir,
        image,
        store,
        index,
        public,
        secret,
    }
}

/// A target that already holds something, to prove refusals write nothing.
fn existing_target(s: &Signed) -> (PathBuf, Vec<u8>) {
    let target = s.path("target.img");
    let before = vec![0xab; 1_000_000];
    fs::write(&target, &before).unwrap();
    (target, before)
}

/// Runs `sync` with extra trust flags; asserts it fails, leaves the existing target
/// byte-for-byte as it was and creates no new one; returns stderr.
fn sync_refused(s: &Signed, extra: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let (target, before) = existing_target(s);
    let fresh = s.path("fresh.img");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"sync", &s.index, &target, &"--store", &s.store];
    args.extend_from_slice(extra);
    let err = run_err(&args);
    assert_eq!(
        fs::read(&target).unwrap(),
        before,
        "target was modified: {err}"
    );
    args[2] = &fresh;
    run_err(&args);
    assert!(!fresh.exists(), "a refused sync created its target");
    // verify applies the same checks.
    let mut v: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"verify", &s.index, &s.image];
    v.extend_from_slice(extra);
    run_err(&v);
    err
}

#[test]
fn correct_root_hash_and_signature_are_accepted() {
    let s = signed();
    let target = s.path("ok.img");
    run_ok(&[
        &"sync",
        &s.index,
        &target,
        &"--store",
        &s.store,
        &"--root-hash",
        &s.root,
        &"--trusted-key",
        &s.public,
        &"--min-version",
        &"3",
    ]);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&s.image).unwrap());
    // The base64 key itself works as well as its file, with its own flag.
    let b64 = base64_key(&s.public);
    run_ok(&[&"verify", &s.index, &target, &"--trusted-key-base64", &b64]);
}

/// The base64 key of a public key file (its second line).
fn base64_key(public: &Path) -> String {
    fs::read_to_string(public)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string()
}

/// Runs `tessera ARGS` in `cwd`, returning (success, stderr).
fn run_in(cwd: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> (bool, String) {
    let out = tessera()
        .current_dir(cwd)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (out.status.success(), err)
}

/// The old `--trusted-key` read a file named like the key when one existed: whoever could
/// plant such a file in the working directory chose the trusted key. A key given as text
/// is never read from a file, and a key file argument that is also a key is refused.
#[test]
fn a_file_named_like_the_trusted_key_is_never_used() {
    let s = signed();
    let b64 = base64_key(&s.public);
    // The attacker signs the index with their own key...
    let (evil_secret, evil_public) = keygen(s.dir.path(), "evil");
    run_ok(&[&"sign", &s.index, &"--secret-key", &evil_secret]);
    // ...and plants their public key in the victim's working directory under the name
    // of the trusted key (a base64 key may hold '/': then in subdirectories).
    let cwd = s.path("cwd");
    let planted = cwd.join(&b64);
    fs::create_dir_all(planted.parent().unwrap()).unwrap();
    fs::copy(&evil_public, &planted).unwrap();
    let (target, before) = existing_target(&s);
    for flag in ["--trusted-key-base64", "--trusted-key"] {
        let (ok, err) = run_in(
            &cwd,
            &[
                &"sync", &s.index, &target, &"--store", &s.store, &flag, &b64,
            ],
        );
        assert!(!ok, "{flag} {b64}: the planted key was trusted");
        assert_eq!(
            fs::read(&target).unwrap(),
            before,
            "{flag}: target modified"
        );
        if flag == "--trusted-key" {
            assert!(
                err.contains("is a base64 public key") && err.contains("--trusted-key-base64"),
                "{err}"
            );
        } else {
            assert!(err.contains("which is not a trusted key"), "{err}");
        }
    }
    // Signed by the real key again, the literal key is accepted with the file still there.
    run_ok(&[&"sign", &s.index, &"--secret-key", &s.secret]);
    let (ok, err) = run_in(
        &cwd,
        &[&"verify", &s.index, &s.image, &"--trusted-key-base64", &b64],
    );
    assert!(ok, "{err}");
}

#[test]
fn wrong_root_hash_is_refused() {
    let s = signed();
    let wrong = format!("{}0", &s.root[..63]);
    let wrong = if wrong == s.root {
        format!("{}1", &s.root[..63])
    } else {
        wrong
    };
    let err = sync_refused(&s, &[&"--root-hash", &wrong]);
    assert!(err.contains(&format!("not the pinned {wrong}")), "{err}");
    assert!(err.contains(&s.root), "{err}");
    let err = run_err(&[&"verify", &s.index, &s.image, &"--root-hash", &"abcd"]);
    assert!(err.contains("64-digit hex"), "{err}");
}

#[test]
fn signature_from_an_untrusted_key_is_refused() {
    let s = signed();
    let (_, other) = keygen(s.dir.path(), "other");
    let err = sync_refused(&s, &[&"--trusted-key", &other]);
    assert!(err.contains("which is not a trusted key"), "{err}");
}

#[test]
fn tampered_index_is_refused() {
    let s = signed();
    let mut bytes = fs::read(&s.index).unwrap();
    bytes[50] ^= 0x01; // inside the image hash: only the signature can tell
    fs::write(&s.index, &bytes).unwrap();
    let err = sync_refused(&s, &[&"--trusted-key", &s.public]);
    assert!(
        err.contains("the index is not the one that was signed"),
        "{err}"
    );
}

#[test]
fn tampered_trusted_comment_is_refused() {
    let s = signed();
    let text = fs::read_to_string(s.sig()).unwrap();
    let tampered = text.replace("version:3", "version:9");
    assert_ne!(text, tampered);
    fs::write(s.sig(), tampered).unwrap();
    let err = sync_refused(&s, &[&"--trusted-key", &s.public]);
    assert!(err.contains("trusted comment was altered"), "{err}");
}

#[test]
fn rollback_to_an_older_version_is_refused() {
    let s = signed();
    let err = sync_refused(&s, &[&"--trusted-key", &s.public, &"--min-version", &"4"]);
    assert!(err.contains("rollback refused"), "{err}");
    assert!(
        err.contains("version 3, older than the minimum version 4"),
        "{err}"
    );
    // An index signed without a version cannot satisfy a minimum.
    run_ok(&[&"sign", &s.index, &"--secret-key", &s.secret]);
    let err = sync_refused(&s, &[&"--trusted-key", &s.public, &"--min-version", &"1"]);
    assert!(err.contains("carries no version"), "{err}");
}

#[test]
fn missing_or_garbage_signatures_and_keys_are_refused() {
    let s = signed();
    fs::remove_file(s.sig()).unwrap();
    let err = sync_refused(&s, &[&"--trusted-key", &s.public]);
    assert!(
        err.contains("signature") && err.contains("cannot be read"),
        "{err}"
    );
    let garbage = s.path("garbage.minisig");
    fs::write(&garbage, "untrusted comment: x\nnot base64 at all\n").unwrap();
    let err = sync_refused(&s, &[&"--trusted-key", &s.public, &"--signature", &garbage]);
    assert!(err.contains("not a minisign signature"), "{err}");
    fs::write(&garbage, vec![0xff; 100_000]).unwrap();
    let err = sync_refused(&s, &[&"--trusted-key", &s.public, &"--signature", &garbage]);
    assert!(err.contains("larger than"), "{err}");
    let err = sync_refused(&s, &[&"--trusted-key-base64", &"RWQnotakey"]);
    assert!(err.contains("not a minisign public key"), "{err}");
    // A key file that does not exist is that, never a key.
    let err = sync_refused(&s, &[&"--trusted-key", &"RWQnotakey"]);
    assert!(
        err.contains("reading --trusted-key RWQnotakey") && err.contains("No such file"),
        "{err}"
    );
    // A key file's text is not a base64 key.
    let text = fs::read_to_string(&s.public).unwrap();
    let err = sync_refused(&s, &[&"--trusted-key-base64", &text]);
    assert!(err.contains("expected the base64 key alone"), "{err}");
    // Flags that need a key say so.
    for flag in ["--min-version", "--signature"] {
        let err = run_err(&[&"verify", &s.index, &s.image, &flag, &"1"]);
        assert!(
            err.contains(&format!(
                "{flag} needs --trusted-key FILE or --trusted-key-base64"
            )),
            "{err}"
        );
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn minisign_verifies_tessera_signatures() {
    if skip_unless(have("minisign"), "minisign (Debian package minisign)") {
        return;
    }
    let s = signed();
    let out = Command::new("minisign")
        .arg("-V")
        .arg("-p")
        .arg(&s.public)
        .arg("-m")
        .arg(&s.index)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "minisign -V: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("version:3") && stdout.contains(&s.root),
        "{stdout}"
    );
    // And rejects the index once altered.
    let mut bytes = fs::read(&s.index).unwrap();
    bytes[60] ^= 1;
    fs::write(&s.index, &bytes).unwrap();
    let status = Command::new("minisign")
        .args(["-V", "-q", "-p"])
        .arg(&s.public)
        .arg("-m")
        .arg(&s.index)
        .status()
        .unwrap();
    assert!(!status.success());
}

#[test]
fn tessera_verifies_minisign_signatures_and_signs_with_minisign_keys() {
    if skip_unless(have("minisign"), "minisign (Debian package minisign)") {
        return;
    }
    let s = signed();
    let (sec, public) = (s.path("mini.key"), s.path("mini.pub"));
    let st = Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&sec)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "minisign -G: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let st = Command::new("minisign")
        .args(["-S", "-s"])
        .arg(&sec)
        .arg("-m")
        .arg(&s.index)
        .args(["-t", "release version:7"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "minisign -S: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let target = s.path("t.img");
    run_ok(&[
        &"sync",
        &s.index,
        &target,
        &"--store",
        &s.store,
        &"--trusted-key",
        &public,
        &"--min-version",
        &"7",
    ]);
    let err = sync_refused(&s, &[&"--trusted-key", &public, &"--min-version", &"8"]);
    assert!(
        err.contains("version 7, older than the minimum version 8"),
        "{err}"
    );
    // The key tessera made earlier is not trusted for minisign's signature...
    let err = sync_refused(&s, &[&"--trusted-key", &s.public]);
    assert!(err.contains("not a trusted key"), "{err}");
    // ...but either key is when both are trusted.
    run_ok(&[
        &"verify",
        &s.index,
        &target,
        &"--trusted-key",
        &s.public,
        &"--trusted-key",
        &public,
    ]);
    // tessera signs with minisign's (unencrypted) secret key.
    run_ok(&[&"sign", &s.index, &"--secret-key", &sec, &"--version", &"8"]);
    run_ok(&[
        &"verify",
        &s.index,
        &target,
        &"--trusted-key",
        &public,
        &"--min-version",
        &"8",
    ]);
}

#[test]
fn keygen_refuses_to_overwrite_keys() {
    let dir = TempDir::new().unwrap();
    let (secret, public) = keygen(dir.path(), "k");
    let before = fs::read(&secret).unwrap();
    let err = run_err(&[
        &"keygen",
        &"--secret-key",
        &secret,
        &"--public-key",
        &public,
    ]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(fs::read(&secret).unwrap(), before);
    run_ok(&[
        &"keygen",
        &"--secret-key",
        &secret,
        &"--public-key",
        &public,
        &"--force",
    ]);
    assert_ne!(fs::read(&secret).unwrap(), before);
}

#[test]
fn sign_refuses_a_corrupt_index() {
    let s = signed();
    let mut bytes = fs::read(&s.index).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    fs::write(&s.index, &bytes).unwrap();
    let err = run_err(&[
        &"sign",
        &s.index,
        &"--secret-key",
        &s.secret,
        &"--signature",
        &s.path("x.sig"),
    ]);
    assert!(err.contains("checksum"), "{err}");
    assert!(!s.path("x.sig").exists());
}

fn veritysetup(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    Command::new("veritysetup")
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("running veritysetup")
}

/// An image of `blocks` 4096-byte blocks: random data with a zero stretch in the middle.
fn block_image(blocks: usize, seed: u64) -> Vec<u8> {
    let len = blocks * 4096;
    let mut img = random_bytes(len, seed);
    if blocks > 200 {
        let (a, b) = (len / 4, len / 2);
        img[a..b].fill(0);
    }
    img
}

#[test]
fn veritysetup_accepts_tessera_trees_and_rejects_changed_data() {
    if skip_unless(
        have("veritysetup"),
        "veritysetup (Debian package cryptsetup-bin)",
    ) {
        return;
    }
    for blocks in [1usize, 128, 129, 16_500] {
        let dir = TempDir::new().unwrap();
        let (image, _, index, _) = make(dir.path(), &block_image(blocks, blocks as u64));
        let hash = dir.path().join("image.verity");
        let salt = "5a".repeat(32);
        let v = json(&run_ok(&[
            &"verity",
            &index,
            &image,
            &"--hash-file",
            &hash,
            &"--salt",
            &salt,
            &"--json",
        ]));
        let root = v["verity_root_hash"].as_str().unwrap().to_string();
        assert_eq!(v["salt"], salt.as_str());
        assert_eq!(v["data_blocks"], blocks as u64);

        // Byte-identical to veritysetup format with the same salt and UUID.
        let reference = dir.path().join("reference.verity");
        let uuid = v["uuid"].as_str().unwrap();
        let out = veritysetup(&[
            &"format", &image, &reference, &"--salt", &salt, &"--uuid", &uuid,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&root),
            "{blocks} blocks: veritysetup says {stdout}"
        );
        assert!(
            fs::read(&hash).unwrap() == fs::read(&reference).unwrap(),
            "{blocks} blocks: hash files differ"
        );

        let out = veritysetup(&[&"verify", &image, &hash, &root]);
        assert!(
            out.status.success(),
            "{blocks} blocks: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // One changed data byte: veritysetup rejects the tree, tessera refuses to build one.
        let mut bytes = fs::read(&image).unwrap();
        let at = bytes.len() / 2 + 17;
        bytes[at] ^= 0x40;
        fs::write(&image, &bytes).unwrap();
        let out = veritysetup(&[&"verify", &image, &hash, &root]);
        assert!(
            !out.status.success(),
            "{blocks} blocks: veritysetup accepted changed data"
        );
        let rebuilt = dir.path().join("rebuilt.verity");
        let err = run_err(&[&"verity", &index, &image, &"--hash-file", &rebuilt]);
        assert!(
            err.contains("does not hold the image") && err.contains("offset"),
            "{err}"
        );
        assert!(!rebuilt.exists());
    }
}

#[test]
fn make_sync_and_verity_write_the_same_tree() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("image.raw");
    fs::write(&image, block_image(300, 5)).unwrap();
    let (store, index) = (dir.path().join("store"), dir.path().join("image.tidx"));
    let (h_make, h_sync, h_cmd) = (
        dir.path().join("m.verity"),
        dir.path().join("s.verity"),
        dir.path().join("c.verity"),
    );
    let made = json(&run_ok(&[
        &"make",
        &image,
        &"--store",
        &store,
        &"--index",
        &index,
        &"--verity",
        &h_make,
        &"--json",
    ]));
    let target = dir.path().join("target.img");
    let synced = json(&run_ok(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &store,
        &"--verity-hash-file",
        &h_sync,
        &"--json",
    ]));
    let cmd = json(&run_ok(&[
        &"verity",
        &index,
        &target,
        &"--hash-file",
        &h_cmd,
        &"--json",
    ]));
    assert_eq!(made["verity"]["verity_root_hash"], cmd["verity_root_hash"]);
    assert_eq!(
        synced["verity"]["verity_root_hash"],
        cmd["verity_root_hash"]
    );
    // The default salt is the index's root hash: reproducible trees.
    assert_eq!(cmd["salt"], made["root_hash"]);
    let bytes = fs::read(&h_cmd).unwrap();
    assert_eq!(fs::read(&h_make).unwrap(), bytes);
    assert_eq!(fs::read(&h_sync).unwrap(), bytes);
    // Human output ends with the root hash alone on a line.
    let human = run_ok(&[&"verity", &index, &target, &"--hash-file", &h_cmd]);
    assert_eq!(
        human.lines().last().unwrap(),
        cmd["verity_root_hash"].as_str().unwrap()
    );
}

#[test]
fn verity_rejects_bad_salts_and_short_targets() {
    let dir = TempDir::new().unwrap();
    let (image, _, index, _) = make(dir.path(), &block_image(10, 1));
    let hash = dir.path().join("h");
    let err = run_err(&[
        &"verity",
        &index,
        &image,
        &"--hash-file",
        &hash,
        &"--salt",
        &"xyz",
    ]);
    assert!(err.contains("--salt"), "{err}");
    let long = "00".repeat(257);
    let err = run_err(&[
        &"verity",
        &index,
        &image,
        &"--hash-file",
        &hash,
        &"--salt",
        &long,
    ]);
    assert!(err.contains("at most 256 bytes"), "{err}");
    let short = dir.path().join("short.img");
    fs::write(&short, vec![0u8; 4096]).unwrap();
    let err = run_err(&[&"verity", &index, &short, &"--hash-file", &hash]);
    assert!(
        err.contains("holds 4096 bytes but the image needs"),
        "{err}"
    );
    assert!(!hash.exists());
}

/// Runs `tessera ARGS`, killing it after 30 s; returns (exited in time, success, stderr).
fn run_bounded(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (bool, bool, String) {
    let mut child = tessera()
        .args(args.iter().map(|a| a.as_ref()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (true, status.success(), err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (false, false, String::new());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn serve_refuses_untrusted_indexes_before_listening() {
    let s = signed();
    let (_, other) = keygen(s.dir.path(), "other");
    let (sock, overlay) = (s.path("nbd.sock"), s.path("overlay.cow"));
    let wrong = "0".repeat(64);
    let cases: [Vec<&dyn AsRef<std::ffi::OsStr>>; 3] = [
        vec![&"--root-hash", &wrong],
        vec![&"--trusted-key", &other],
        vec![&"--trusted-key", &s.public, &"--min-version", &"4"],
    ];
    for extra in cases {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"serve",
            &s.index,
            &"--store",
            &s.store,
            &"--unix",
            &sock,
            &"--overlay",
            &overlay,
        ];
        args.extend(extra);
        let (exited, ok, err) = run_bounded(&args);
        assert!(exited, "serve kept running with an untrusted index");
        assert!(!ok && err.contains("refusing index"), "{err}");
        assert!(
            !sock.exists() && !overlay.exists(),
            "serve listened or wrote: {err}"
        );
    }
}
