//! Remembered seeds: a verified sync records the index its target holds; the next sync of
//! that target, or of the other slot with it as --seed, plans from the record instead of
//! scanning, and scans when the record no longer matches the device.

mod util;

use std::fs;
use std::path::Path;
use std::process::Output;

use tempfile::TempDir;
use util::*;

fn sync(dir: &Path, index: &Path, target: &Path, extra: &[&str]) -> Output {
    let out = tessera()
        .arg("sync")
        .arg(index)
        .arg(target)
        .arg("--store")
        .arg(dir.join("store"))
        .args(extra)
        .env("TESSERA_STATE_DIR", dir.join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sync failed: {stderr}");
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Two releases of an image (v2: some of v1 rewritten), made into one store.
fn releases(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let v1 = random_bytes(2_000_000, 21);
    let mut v2 = v1.clone();
    v2[300_000..700_000].copy_from_slice(&random_bytes(400_000, 22));
    for (name, bytes) in [("v1", &v1), ("v2", &v2)] {
        let image = dir.join(format!("{name}.raw"));
        fs::write(&image, bytes).unwrap();
        run_ok(&[
            &"make",
            &image,
            &"--store",
            &dir.join("store"),
            &"--index",
            &dir.join(format!("{name}.tidx")),
        ]);
    }
    (v1, v2)
}

#[test]
fn a_synced_target_is_planned_from_its_record_and_rescanned_when_it_changed() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let (v1, v2) = releases(dir);
    let (i1, i2) = (dir.join("v1.tidx"), dir.join("v2.tidx"));
    let (a, b) = (dir.join("slot-a"), dir.join("slot-b"));

    // First sync: nothing remembered yet; the record is written after it.
    let out = sync(dir, &i1, &a, &[]);
    assert!(!stderr(&out).contains("remembered"), "{}", stderr(&out));
    let records: Vec<_> = fs::read_dir(dir.join("state/seeds")).unwrap().collect();
    assert_eq!(records.len(), 2, "a record and its index");

    // The update into the other slot, slot A as seed: A is planned from its record.
    let out = sync(dir, &i2, &b, &["--seed", a.to_str().unwrap(), "--json"]);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "planning from the remembered index of {}",
            a.display()
        )),
        "{err}"
    );
    assert_eq!(fs::read(&b).unwrap(), v2);
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert!(
        report["bytes_from_seeds"].as_u64().unwrap() > 1_000_000,
        "{report}"
    );

    // Syncing A in place to v2: planned from A's record, right result.
    let out = sync(dir, &i2, &a, &[]);
    assert!(stderr(&out).contains("planning from the remembered index"));
    assert_eq!(fs::read(&a).unwrap(), v2);

    // A changed behind tessera's back: the record does not match, A is scanned, and the
    // sync is still exact.
    let mut changed = v2.clone();
    changed[10..20].fill(0xee);
    fs::write(&a, &changed).unwrap();
    let out = sync(dir, &i1, &a, &[]);
    let err = stderr(&out);
    assert!(
        err.contains("does not match it") && err.contains("scanning it"),
        "{err}"
    );
    assert_eq!(fs::read(&a).unwrap(), v1);
    // --rescan ignores records; --dry-run writes none.
    let out = sync(dir, &i2, &a, &["--rescan", "--dry-run"]);
    assert!(!stderr(&out).contains("remembered"), "{}", stderr(&out));
    let out = sync(dir, &i2, &a, &["--dry-run"]);
    assert!(stderr(&out).contains("planning from the remembered index"));
    assert_eq!(fs::read(&a).unwrap(), v1, "a dry run changes nothing");
    // -q silences the note.
    let out = sync(dir, &i1, &a, &["-q"]);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}
