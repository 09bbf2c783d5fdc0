//! In-place sync through the real binary: ext4 release pairs (rebuilt and edited in place)
//! into files and loop devices, A/B updates from a seed, dry runs, and a loop that
//! SIGKILLs `tessera sync` at random moments and then lets it finish.

mod util;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use tempfile::TempDir;
use tessera_fixtures::{Ext4Pair, Fixtures, Pair, Params};
use util::*;

fn ext4() -> Ext4Pair {
    Fixtures::from_env()
        .ext4(Params::default())
        .expect("building the ext4 fixture")
}

/// Makes the index of `image` into `store`, returning the index path.
fn make(dir: &Path, image: &Path, store: &Path, name: &str) -> PathBuf {
    let index = dir.join(format!("{name}.tidx"));
    run_ok(&[
        &"make",
        &image,
        &"--store",
        &store,
        &"--index",
        &index,
        &"--chunk-size",
        &"4K:16K:64K",
    ]);
    index
}

fn sync(
    index: &Path,
    target: &Path,
    store: &Path,
    extra: &[&dyn AsRef<std::ffi::OsStr>],
) -> serde_json::Value {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"sync", &index, &target, &"--store", &store, &"--json"];
    args.extend_from_slice(extra);
    json(&run_ok(&args))
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

const FIELDS: [&str; 7] = [
    "image_size",
    "bytes_in_place",
    "bytes_from_seeds",
    "bytes_moved",
    "bytes_fetched",
    "bytes_downloaded",
    "chunks_fetched",
];

#[test]
fn ext4_release_pairs_update_a_file_in_place() {
    let pair = ext4();
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    for (name, new) in [("rebuilt", &pair.rebuilt), ("edited", &pair.edited)] {
        let index = make(dir.path(), new, &store, name);
        let target = dir.path().join(format!("{name}.img"));
        fs::copy(&pair.old, &target).unwrap();
        let r = sync(&index, &target, &store, &[]);
        for f in FIELDS {
            field(&r, f);
        }
        assert_eq!(r["resumed"], false);
        let size = field(&r, "image_size");
        assert_eq!(fs::read(&target).unwrap(), fs::read(new).unwrap(), "{name}");
        // Most of the new release is already in the old one.
        assert!(field(&r, "bytes_fetched") < size / 4, "{name}: {r}");
        assert!(field(&r, "bytes_in_place") > size / 4, "{name}: {r}");
        eprintln!("ext4 {name}: {r}");
        run_ok(&[&"verify", &index, &target]);
    }
}

#[test]
fn ext4_release_pair_updates_a_loop_device_in_place() {
    if skip_unless(loop_available(), "root and loop devices") {
        return;
    }
    let pair = ext4();
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    for (name, new) in [("rebuilt", &pair.rebuilt), ("edited", &pair.edited)] {
        let index = make(dir.path(), new, &store, name);
        let backing = dir.path().join(format!("{name}.loop"));
        fs::copy(&pair.old, &backing).unwrap();
        let dev = LoopDevice::attach(&backing);
        let journal = dir.path().join(format!("{name}.journal"));
        let r = sync(&index, &dev.path, &store, &[&"--journal", &journal]);
        assert!(!journal.exists(), "journal removed after success");
        assert!(field(&r, "bytes_in_place") > 0, "{r}");
        drop(dev);
        assert_eq!(
            fs::read(&backing).unwrap(),
            fs::read(new).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn synthetic_layouts_update_a_loop_device_in_place() {
    if skip_unless(loop_available(), "root and loop devices") {
        return;
    }
    let fixtures = Fixtures::from_env();
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    for pair in [
        Pair::ShiftForward,
        Pair::Rotate,
        Pair::Swap,
        Pair::Duplicate,
        Pair::Grow,
        Pair::Shrink,
    ] {
        let files = fixtures.pair(pair, Params::default()).unwrap();
        let (old, new) = (fs::read(&files.old).unwrap(), fs::read(&files.new).unwrap());
        let index = make(dir.path(), &files.new, &store, pair.name());
        // A loop device is whole sectors, at least as large as the image.
        let mut backing_bytes = old.clone();
        backing_bytes.resize(old.len().max(new.len()).div_ceil(512) * 512, 0);
        let backing = dir.path().join(format!("{}.loop", pair.name()));
        fs::write(&backing, &backing_bytes).unwrap();
        let dev = LoopDevice::attach(&backing);
        let journal = dir.path().join(format!("{}.journal", pair.name()));
        let r = sync(
            &index,
            &dev.path,
            &store,
            &[&"--journal", &journal, &"--scratch-size", &"1M"],
        );
        drop(dev);
        let after = fs::read(&backing).unwrap();
        assert!(after[..new.len()] == new[..], "{}: {r}", pair.name());
        assert!(
            after[new.len()..] == backing_bytes[new.len()..],
            "{}: tail changed",
            pair.name()
        );
        if pair != Pair::Grow {
            // Only data moved: almost nothing to fetch (Grow adds new data).
            assert!(
                field(&r, "bytes_fetched") < new.len() as u64 / 10,
                "{}: {r}",
                pair.name()
            );
        }
    }
}

#[test]
fn ab_update_takes_chunks_from_the_other_slot() {
    let pair = ext4();
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    let old_index = make(dir.path(), &pair.old, &store, "old");
    let index = make(dir.path(), &pair.edited, &store, "edited");
    let new = fs::read(&pair.edited).unwrap();
    // Slot B is empty; slot A holds the old release, scanned or known by its index.
    let seed_index = format!("{}={}", pair.old.display(), old_index.display());
    for (n, extra) in [
        vec![&"--seed" as &dyn AsRef<std::ffi::OsStr>, &pair.old],
        vec![&"--seed-index", &seed_index],
    ]
    .into_iter()
    .enumerate()
    {
        let target = dir.path().join(format!("slot-b-{n}.img"));
        let r = sync(&index, &target, &store, &extra);
        assert_eq!(fs::read(&target).unwrap(), new);
        assert!(
            field(&r, "bytes_from_seeds") > field(&r, "image_size") / 4,
            "{r}"
        );
        assert!(
            field(&r, "bytes_fetched") < field(&r, "image_size") / 4,
            "{r}"
        );
    }
    let err = run_err(&[
        &"sync",
        &index,
        &dir.path().join("x.img"),
        &"--store",
        &store,
        &"--seed-index",
        &"nothing",
    ]);
    assert!(err.contains("PATH=INDEX"), "{err}");
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let pair = ext4();
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    let index = make(dir.path(), &pair.rebuilt, &store, "rebuilt");
    let target = dir.path().join("t.img");
    fs::copy(&pair.old, &target).unwrap();
    let before = fs::read(&target).unwrap();
    let plan = sync(&index, &target, &store, &[&"--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(fs::read(&target).unwrap(), before);
    assert!(!dir.path().join(".t.img.tessera-journal").exists());
    let human = run_ok(&[&"sync", &index, &target, &"--store", &store, &"--dry-run"]);
    assert!(human.contains("nothing changed"), "{human}");
    let done = sync(&index, &target, &store, &[]);
    for f in [
        "bytes_in_place",
        "bytes_moved",
        "bytes_fetched",
        "bytes_from_seeds",
    ] {
        assert_eq!(plan[f], done[f], "{f}: plan {plan} run {done}");
    }
}

#[test]
fn sigkill_at_random_moments_then_the_same_command_finishes() {
    let pair = ext4();
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    let index = make(dir.path(), &pair.rebuilt, &store, "rebuilt");
    let new = fs::read(&pair.rebuilt).unwrap();
    let target = dir.path().join("t.img");
    let journal = dir.path().join("t.journal");
    let args = |t: &Path| -> Vec<std::ffi::OsString> {
        [
            "sync".as_ref(),
            index.as_os_str(),
            t.as_os_str(),
            "--store".as_ref(),
            store.as_os_str(),
            "--journal".as_ref(),
            journal.as_os_str(),
            // Small scratch: many phases, so kills land between and inside them.
            "--scratch-size".as_ref(),
            "256K".as_ref(),
            "--json".as_ref(),
        ]
        .into_iter()
        .map(Into::into)
        .collect()
    };
    // How long an uninterrupted run takes, and what it fetches.
    fs::copy(&pair.old, &target).unwrap();
    let started = Instant::now();
    let baseline = json(&run_ok(
        &args(&target)
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect::<Vec<_>>(),
    ));
    let full = started.elapsed();
    assert!(!journal.exists());

    let kills = std::env::var("TESSERA_SIGKILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut mid_sync = 0;
    fs::copy(&pair.old, &target).unwrap();
    for _ in 0..kills {
        let mut child = tessera()
            .args(args(&target))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(rng.gen_range(0.2..1.05)));
        let _ = child.kill(); // SIGKILL
        if child.wait().unwrap().success() {
            // It finished before the kill: start over from the old release.
            fs::copy(&pair.old, &target).unwrap();
        } else if journal.exists() {
            mid_sync += 1;
        }
    }
    let pending = journal.exists();
    let last = json(&run_ok(
        &args(&target)
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect::<Vec<_>>(),
    ));
    assert_eq!(
        fs::read(&target).unwrap(),
        new,
        "target differs after {kills} kills"
    );
    assert!(!journal.exists(), "journal left after success");
    assert!(mid_sync > 0, "no kill landed mid-sync ({full:?} per run)");
    assert_eq!(last["resumed"], pending, "{last}");
    eprintln!(
        "sigkill: {kills} kills, {mid_sync} mid-sync; an uninterrupted run takes {full:?} and fetches {} bytes, \
         the run after the last kill fetched {} bytes (resumed: {pending})",
        field(&baseline, "bytes_fetched"),
        field(&last, "bytes_fetched"),
    );
}

/// A mount of a device, unmounted on drop.
struct Mount {
    point: PathBuf,
}

impl Mount {
    fn new(dev: &Path, point: &Path) -> Mount {
        fs::create_dir_all(point).unwrap();
        let st = std::process::Command::new("mount")
            .arg(dev)
            .arg(point)
            .status()
            .expect("running mount");
        assert!(st.success(), "mount {} failed", dev.display());
        Mount {
            point: point.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.point)
            .status();
    }
}

#[test]
fn a_mounted_block_device_is_refused_unless_forced() {
    let mkfs = std::process::Command::new("mkfs.ext4")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if skip_unless(loop_available() && mkfs, "root, loop devices and mkfs.ext4") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let store = dir.path().join("store");
    let image = dir.path().join("image.raw");
    fs::write(&image, random_bytes(3 << 20, 61)).unwrap();
    let index = make(dir.path(), &image, &store, "image");
    let backing = dir.path().join("disk.loop");
    fs::write(&backing, vec![0u8; 8 << 20]).unwrap();
    let dev = LoopDevice::attach(&backing);
    // No lazy initialisation: nothing writes to the idle file system once mounted.
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&dev.path)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 failed");
    let point = dir.path().join("mnt point");
    let mount = Mount::new(&dev.path, &point);
    std::process::Command::new("sync").status().unwrap();
    let before = fs::read(&dev.path).unwrap();
    let journal = dir.path().join("j");
    let err = run_err(&[
        &"sync",
        &index,
        &dev.path,
        &"--store",
        &store,
        &"--journal",
        &journal,
    ]);
    assert!(
        err.contains(&format!("is mounted on {}", point.display())),
        "the mount point is not named: {err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        fs::read(&dev.path).unwrap(),
        before,
        "a refused device was written"
    );
    assert!(!journal.exists(), "a refused device got a journal");
    // With --force it is written (and the file system under the mount is destroyed).
    let r = json(&run_ok(&[
        &"sync",
        &index,
        &dev.path,
        &"--store",
        &store,
        &"--journal",
        &journal,
        &"--json",
        &"--force",
    ]));
    assert_eq!(field(&r, "image_size"), 3 << 20);
    let after = fs::read(&dev.path).unwrap();
    assert!(
        after[..3 << 20] == fs::read(&image).unwrap()[..],
        "forced sync did not write"
    );
    drop(mount);
    drop(dev);
}

#[test]
fn help_explains_the_in_place_flags() {
    let help = run_ok(&[&"sync", &"--help"]);
    for flag in [
        "--seed ",
        "--seed-index",
        "--dry-run",
        "--journal",
        "--scratch-size",
        "--force",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}
