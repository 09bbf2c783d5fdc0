//! The default journal of a block device lives under the state directory, in
//! `journal/`, a directory tessera owns: it is created private (0700), and one that
//! others could change (a planted symbolic link, a directory writable by others) is
//! refused before anything is written, so nothing is ever created or replaced through it.

mod util;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Output;

use tempfile::TempDir;
use util::*;

fn sync_with_state(state: &Path, index: &Path, dev: &Path, store: &Path) -> Output {
    let out = tessera()
        .args(["sync", "--store"])
        .arg(store)
        .arg(index)
        .arg(dev)
        .env("TESSERA_STATE_DIR", state)
        .output()
        .expect("running tessera");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    out
}

#[test]
fn the_journal_directory_of_a_block_device_is_private_and_never_followed() {
    if skip_unless(loop_available(), "root and loop devices") {
        return;
    }
    let dir = TempDir::new().unwrap();
    let p = |n: &str| dir.path().join(n);
    let image = random_bytes(2 << 20, 11);
    fs::write(p("image.raw"), &image).unwrap();
    run_ok(&[
        &"make",
        &p("image.raw"),
        &"--store",
        &p("store"),
        &"--index",
        &p("image.tidx"),
    ]);
    fs::write(p("backing"), random_bytes(2 << 20, 12)).unwrap();
    let dev = LoopDevice::attach(&p("backing"));
    let state = p("state");
    fs::create_dir(&state).unwrap();
    fs::create_dir(p("victim")).unwrap();

    // A planted link at `journal/`: refused, nothing created where it points, the
    // device untouched.
    symlink(p("victim"), state.join("journal")).unwrap();
    let out = sync_with_state(&state, &p("image.tidx"), &dev.path, &p("store"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "synced through a planted link");
    assert!(
        err.contains("symbolic link") && err.contains("journal"),
        "{err}"
    );
    assert_eq!(fs::read_dir(p("victim")).unwrap().count(), 0);
    assert_eq!(fs::read(p("backing")).unwrap(), random_bytes(2 << 20, 12));

    // A directory anyone may write to: refused too.
    fs::remove_file(state.join("journal")).unwrap();
    fs::create_dir(state.join("journal")).unwrap();
    fs::set_permissions(state.join("journal"), fs::Permissions::from_mode(0o777)).unwrap();
    let out = sync_with_state(&state, &p("image.tidx"), &dev.path, &p("store"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "synced into a world-writable journal directory"
    );
    assert!(err.contains("writable by others"), "{err}");

    // Created by tessera: 0700, whatever the umask, and the sync works.
    fs::remove_dir(state.join("journal")).unwrap();
    let out = sync_with_state(&state, &p("image.tidx"), &dev.path, &p("store"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = fs::metadata(state.join("journal"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    drop(dev);
    assert_eq!(fs::read(p("backing")).unwrap(), image);
}
