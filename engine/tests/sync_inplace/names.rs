//! Names sync picks itself, on the real file system: the journal and the temporary name
//! of a new target are never reached through a planted symbolic link, and never replace
//! a file that is not theirs. Plus the target-creation protocol seen from outside: a
//! missing target is created at the image size, a short file is grown, and what a killed
//! creation left is cleaned up.

use std::fs;
use std::os::unix::fs::symlink;

use tessera_engine::{sync_with, ErrorKind, NoProgress, SyncOptions};

use crate::util::*;

/// A store holding a 300 kB image, its index, the image.
fn setup() -> (MemStore, tessera_engine::Index, Vec<u8>) {
    let store = MemStore::default();
    let image = random_bytes(300_000, 11);
    let index = make_index(&image, small_params(), &store);
    (store, index, image)
}

#[test]
fn a_symlink_at_the_journal_path_is_refused_and_its_victim_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (store, index, _) = setup();
    let target = dir.path().join("t.img");
    let old = random_bytes(300_000, 12);
    fs::write(&target, &old).unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    symlink(&victim, dir.path().join(".t.img.tessera-journal")).unwrap();
    let err = sync_with(
        &index,
        &target,
        &store,
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(".t.img.tessera-journal") && msg.contains("symbolic link"),
        "{msg}"
    );
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(
        fs::read(&target).unwrap(),
        old,
        "nothing written before the refusal"
    );
}

#[test]
fn a_foreign_file_at_the_journal_path_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (store, index, image) = setup();
    let target = dir.path().join("t.img");
    let old = random_bytes(300_000, 13);
    fs::write(&target, &old).unwrap();
    let journal = dir.path().join("notes.txt");
    fs::write(&journal, b"my notes").unwrap();
    let opts = SyncOptions {
        journal: Some(journal.clone()),
        ..SyncOptions::default()
    };
    let err = sync_with(&index, &target, &store, &opts, &NoProgress).unwrap_err();
    assert!(
        err.to_string().contains("is not a tessera journal"),
        "{err}"
    );
    assert_eq!(fs::read(&journal).unwrap(), b"my notes");
    assert_eq!(fs::read(&target).unwrap(), old);
    // Nor one that starts with zeros (a blank disk image, say).
    fs::write(&journal, vec![0u8; 4096]).unwrap();
    let err = sync_with(&index, &target, &store, &opts, &NoProgress).unwrap_err();
    assert!(
        err.to_string().contains("is not a tessera journal"),
        "{err}"
    );
    assert_eq!(fs::read(&journal).unwrap(), vec![0u8; 4096]);
    // An empty file holds nothing to lose: it is taken over.
    fs::write(&journal, b"").unwrap();
    sync_with(&index, &target, &store, &opts, &NoProgress).unwrap();
    assert_eq!(fs::read(&target).unwrap(), image);
    assert!(!journal.exists());
}

#[test]
fn a_missing_target_is_created_and_debris_of_a_killed_creation_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, index, image) = setup();
    let target = dir.path().join("new.img");
    // What a killed creation leaves (a temporary target), and a planted link of the same
    // shape: both names are removed, what the link points to is not touched.
    let debris = dir.path().join(".new.img.tessera-new.00000000deadbeef");
    fs::write(&debris, b"half").unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    symlink(
        &victim,
        dir.path().join(".new.img.tessera-new.0123456789abcdef"),
    )
    .unwrap();
    // A name that only looks similar is not ours.
    let other = dir.path().join(".new.img.tessera-new.mine");
    fs::write(&other, b"mine").unwrap();
    let r = sync_with(
        &index,
        &target,
        &store,
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fs::read(&target).unwrap(), image);
    assert_eq!(r.bytes_in_place, 0);
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".new.img.tessera-new.mine", "new.img", "victim"]);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
}

#[test]
fn a_file_shorter_than_the_image_is_grown_and_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let (store, index, image) = setup();
    let target = dir.path().join("short.img");
    // The first half of the image is already there: it must be found, not rewritten.
    fs::write(&target, &image[..150_000]).unwrap();
    let r = sync_with(
        &index,
        &target,
        &store,
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fs::read(&target).unwrap(), image);
    assert!(r.bytes_in_place > 100_000, "{r:?}");
    // An empty file (what a cut during creation may leave on some file systems) too.
    fs::write(&target, b"").unwrap();
    sync_with(
        &index,
        &target,
        &store,
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fs::read(&target).unwrap(), image);
    // A dry run on a short file plans the same and changes nothing.
    fs::write(&target, &image[..150_000]).unwrap();
    let opts = SyncOptions {
        dry_run: true,
        ..SyncOptions::default()
    };
    let plan = sync_with(&index, &target, &store, &opts, &NoProgress).unwrap();
    assert_eq!(plan.bytes_in_place, r.bytes_in_place, "{plan:?}");
    assert_eq!(fs::read(&target).unwrap(), &image[..150_000]);
}

/// A journal at the path that belongs to another user (planted in a shared directory) is
/// never resumed or appended to: it is replaced by a journal of this run, whose result is
/// the image.
#[test]
fn a_journal_owned_by_another_user_is_never_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, index, image) = setup();
    let target = dir.path().join("t.img");
    fs::write(&target, random_bytes(300_000, 14)).unwrap();
    let journal = dir.path().join(".t.img.tessera-journal");
    // A run that stops at a chunk missing from the store leaves a valid journal.
    let id = index.chunks()[index.chunks().len() / 2].id;
    let held = store.remove(&id).unwrap();
    sync_with(
        &index,
        &target,
        &store,
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(journal.exists(), "the failed run left no journal");
    store.insert(id, held);
    // As another user's file, it is not resumed.
    if skip_without_root(std::os::unix::fs::chown(&journal, Some(65534), Some(65534)), "changing a file's owner") {
        return;
    }
    let r = sync_with(
        &index,
        &target,
        &store,
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert!(!r.resumed, "another user's journal was resumed");
    assert_eq!(fs::read(&target).unwrap(), image);
    assert!(!journal.exists());
}

/// A symbolic link another user planted at the target's name in a shared directory
/// (world-writable, sticky, like /tmp) is never followed, whatever
/// `fs.protected_symlinks` says; a link of one's own there is.
#[test]
fn a_target_link_planted_by_another_user_in_a_shared_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (store, index, image) = setup();
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let target = shared.join("new.img");
    symlink(&victim, &target).unwrap();
    if skip_without_root(std::os::unix::fs::lchown(&target, Some(65534), Some(65534)), "changing a link's owner") {
        return;
    }
    let err = sync_with(
        &index,
        &target,
        &store,
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    // One's own link there is followed.
    fs::remove_file(&target).unwrap();
    symlink(&victim, &target).unwrap();
    sync_with(
        &index,
        &target,
        &store,
        &SyncOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fs::read(&victim).unwrap(), image);
}

/// True (skip) when `changed` failed because this is not root; under `CI=true`, where
/// root is required, a failure fails the test instead.
fn skip_without_root(changed: std::io::Result<()>, what: &str) -> bool {
    let Err(e) = changed else { return false };
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{what} needs root (root is required under CI=true): {e}"
    );
    eprintln!("skipping: {what} needs root ({e})");
    true
}
