//! Engine-core behaviour through the real binary: make → sync → verify round trips,
//! determinism, sparse output, target size rules, loop devices, hostile indexes and chunks.

mod util;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use util::*;

/// An image mixing random, zero and repeated regions, `len` bytes long.
fn mixed_image(len: usize, seed: u64) -> Vec<u8> {
    let mut img = Vec::with_capacity(len);
    let mut s = seed;
    while img.len() < len {
        s += 1;
        match s % 3 {
            0 => img.extend(random_bytes(300_000 + (s as usize * 7919) % 200_000, s)),
            1 => img.extend(std::iter::repeat_n(0u8, 700_000)),
            _ => {
                let start = img.len() / 3;
                let end = (start + 250_000).min(img.len());
                let copy = img[start..end].to_vec();
                img.extend(copy);
            }
        }
    }
    img.truncate(len);
    img
}

struct Made {
    _dir: TempDir,
    image: PathBuf,
    store: PathBuf,
    index: PathBuf,
    make: serde_json::Value,
}

fn make_image(bytes: &[u8], extra: &[&str]) -> Made {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("image.raw");
    fs::write(&image, bytes).unwrap();
    let store = dir.path().join("store");
    let index = dir.path().join("image.tidx");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"make", &image, &"--store", &store, &"--index", &index, &"--json",
    ];
    for e in extra {
        args.push(e);
    }
    let make = json(&run_ok(&args));
    Made {
        _dir: dir,
        image,
        store,
        index,
        make,
    }
}

fn sync_to(m: &Made, target: &Path) -> serde_json::Value {
    json(&run_ok(&[
        &"sync", &m.index, &target, &"--store", &m.store, &"--json",
    ]))
}

fn round_trip(bytes: &[u8], extra: &[&str]) {
    let m = make_image(bytes, extra);
    assert_eq!(m.make["image_size"], bytes.len() as u64);
    let target = m._dir.path().join("out.raw");
    let s = sync_to(&m, &target);
    assert_eq!(s["image_size"], bytes.len() as u64);
    assert_eq!(fs::read(&target).unwrap(), bytes, "synced image differs");
    run_ok(&[&"verify", &m.index, &target]);
}

#[test]
fn round_trip_sizes_not_multiple_of_any_block() {
    for (len, seed) in [
        (1usize, 1u64),
        (4095, 2),
        (16_383, 3),
        (1_048_583, 4),
        (5_000_011, 5),
    ] {
        round_trip(&mixed_image(len, seed), &[]);
    }
}

#[test]
fn round_trip_empty_image() {
    let m = make_image(&[], &[]);
    assert_eq!(m.make["chunk_count"], 0);
    let target = m._dir.path().join("out.raw");
    sync_to(&m, &target);
    assert_eq!(fs::metadata(&target).unwrap().len(), 0);
    run_ok(&[&"verify", &m.index, &target]);
}

#[test]
fn round_trip_small_chunk_sizes() {
    round_trip(&mixed_image(3_000_001, 9), &["--chunk-size", "1K:4K:16K"]);
}

#[test]
fn make_and_info_report_the_promised_fields() {
    let img = mixed_image(4_000_000, 11);
    let m = make_image(&img, &[]);
    for key in [
        "image_size",
        "chunk_count",
        "unique_chunks",
        "new_chunks",
        "stored_bytes",
        "root_hash",
    ] {
        assert!(
            m.make.get(key).is_some(),
            "make --json lacks {key}: {}",
            m.make
        );
    }
    assert!(m.make["unique_chunks"].as_u64().unwrap() < m.make["chunk_count"].as_u64().unwrap());
    let info = json(&run_ok(&[&"info", &m.index, &"--json"]));
    assert_eq!(info["format_version"], 2);
    assert_eq!(info["image_size"], 4_000_000);
    assert_eq!(info["chunk_count"], m.make["chunk_count"]);
    // The default chunk sizes, 4K:16K:64K.
    assert_eq!(info["chunker"]["min"], 4096);
    assert_eq!(info["chunker"]["avg"], 16384);
    assert_eq!(info["chunker"]["max"], 65536);
    // Format v2's image hash: BLAKE3 over the BLAKE3 of each 1 MiB block, then the size.
    let mut blocks = blake3::Hasher::new();
    for block in img.chunks(1 << 20) {
        blocks.update(blake3::hash(block).as_bytes());
    }
    blocks.update(&(img.len() as u64).to_le_bytes());
    assert_eq!(info["image_hash"], blocks.finalize().to_hex().as_str());
    let root = blake3::hash(&fs::read(&m.index).unwrap());
    assert_eq!(info["root_hash"], root.to_hex().as_str());
    assert_eq!(m.make["root_hash"], root.to_hex().as_str());
    // Remaking into the same store writes nothing new.
    let again = json(&run_ok(&[
        &"make", &m.image, &"--store", &m.store, &"--index", &m.index, &"--json",
    ]));
    assert_eq!(again["new_chunks"], 0);
    assert_eq!(again["stored_bytes"], 0);
}

#[test]
fn make_is_deterministic_across_stores() {
    let img = mixed_image(6_000_000, 21);
    let a = make_image(&img, &["--threads", "1"]);
    let b = make_image(&img, &["--threads", "3"]);
    assert_eq!(fs::read(&a.index).unwrap(), fs::read(&b.index).unwrap());
    let files_a = tree_contents(&a.store);
    let files_b = tree_contents(&b.store);
    assert!(!files_a.is_empty());
    assert_eq!(
        files_a, files_b,
        "packs or location files differ between two makes"
    );
    // A pack is plain zstd frames of the chunk bytes (its table of contents is a skippable
    // frame): `zstd -d` gives the chunks back, and each frame hashes to its id.
    let frames = pack_frames(&a.store);
    let (pack, _) = &frames[0];
    let all = zstd::decode_all(&fs::read(pack).unwrap()[..]).unwrap();
    let mut at = 0;
    for (path, e) in &frames {
        assert_eq!(path, pack, "one pack for a small image");
        let raw = zstd::decode_all(&frame_bytes(path, e)[..]).unwrap();
        assert_eq!(blake3::hash(&raw).as_bytes(), e.id.as_bytes());
        assert_eq!(raw, all[at..at + raw.len()]);
        at += raw.len();
    }
    assert_eq!(at, all.len());
}

#[test]
fn zero_chunks_are_not_stored_and_become_holes() {
    let mut img = random_bytes(300_000, 1);
    img.extend(vec![0u8; 8 << 20]);
    img.extend(random_bytes(300_000, 2));
    let m = make_image(&img, &[]);
    assert!(m.make["zero_chunks"].as_u64().unwrap() > 10);
    let stored = pack_frames(&m.store).len();
    assert_eq!(stored as u64, m.make["unique_chunks"].as_u64().unwrap());
    let target = m._dir.path().join("out.raw");
    let s = sync_to(&m, &target);
    assert!(s["bytes_fetched"].as_u64().unwrap() < 2_000_000);
    assert_eq!(fs::read(&target).unwrap(), img);
    let allocated = fs::metadata(&target).unwrap().blocks() * 512;
    assert!(
        allocated < 4 << 20,
        "target is not sparse: {allocated} bytes allocated"
    );
}

#[test]
fn verify_fails_on_a_one_byte_change() {
    let img = mixed_image(2_000_000, 31);
    let m = make_image(&img, &[]);
    let mut changed = img.clone();
    changed[1_234_567] ^= 0x01;
    let target = m._dir.path().join("changed.raw");
    fs::write(&target, &changed).unwrap();
    let err = run_err(&[&"verify", &m.index, &target]);
    assert!(err.contains("does not hold the image"), "{err}");
    let out = run(&[&"verify", &m.index, &target, &"--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(std::str::from_utf8(&out.stdout).unwrap());
    assert_eq!(v["ok"], false);
    assert_eq!(v["bad_chunks"], 1);
    run_ok(&[&"verify", &m.index, &m.image]);
}

#[test]
fn target_larger_keeps_its_tail_and_smaller_file_is_grown() {
    let img = mixed_image(1_500_000, 41);
    let m = make_image(&img, &[]);
    let big = m._dir.path().join("big.raw");
    let tail = random_bytes(100_000, 42);
    let mut content = random_bytes(img.len(), 43);
    content.extend(&tail);
    fs::write(&big, &content).unwrap();
    sync_to(&m, &big);
    let after = fs::read(&big).unwrap();
    assert_eq!(&after[..img.len()], &img[..]);
    assert_eq!(&after[img.len()..], &tail[..]);

    let small = m._dir.path().join("small.raw");
    // A file is not a partition: a shorter one is grown to the image (block devices
    // too small are refused, see the loop-device test).
    fs::write(&small, random_bytes(img.len() - 1, 44)).unwrap();
    sync_to(&m, &small);
    assert_eq!(fs::read(&small).unwrap(), img);
}

#[test]
fn hostile_indexes_give_clear_errors() {
    let img = mixed_image(2_000_000, 51);
    let m = make_image(&img, &[]);
    let good = fs::read(&m.index).unwrap();
    let dir = m._dir.path();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("random".into(), random_bytes(5000, 52)),
        ("truncated header".into(), good[..40].to_vec()),
        ("truncated records".into(), good[..good.len() - 50].to_vec()),
        ("extended".into(), [good.clone(), vec![0; 36]].concat()),
    ];
    for pos in [9usize, 20, 33, 45, 75, 100, good.len() - 40, good.len() - 1] {
        let mut b = good.clone();
        b[pos] ^= 0x40;
        cases.push((format!("flip at {pos}"), b));
    }
    let mut random_magic = random_bytes(good.len(), 53);
    random_magic[..8].copy_from_slice(&good[..8]);
    cases.push(("random after magic".into(), random_magic));
    for (name, bytes) in cases {
        let bad = dir.join("bad.tidx");
        fs::write(&bad, &bytes).unwrap();
        let target = dir.join("never.raw");
        for args in [
            vec![&"info" as &dyn AsRef<std::ffi::OsStr>, &bad],
            vec![&"verify", &bad, &m.image],
            vec![&"sync", &bad, &target, &"--store", &m.store],
        ] {
            let err = run_err(&args);
            assert!(
                err.contains("invalid index") && err.contains("bad.tidx"),
                "{name}: {err}"
            );
        }
        assert!(
            !target.exists(),
            "{name}: sync created a target from a bad index"
        );
    }
    let err = run_err(&[&"info", &dir.join("missing.tidx")]);
    assert!(err.contains("missing.tidx"), "{err}");
}

#[test]
fn corrupted_or_missing_pack_data_fails_sync_naming_chunk_and_pack() {
    let img = mixed_image(3_000_000, 61);
    let m = make_image(&img, &[]);
    let frames = pack_frames(&m.store);
    let (pack, e) = &frames[frames.len() / 2];
    let id = e.id.to_string();
    let pack_name = pack.file_name().unwrap().to_str().unwrap().to_string();
    let good = fs::read(pack).unwrap();
    let target = m._dir.path().join("out.raw");
    let sync_err = || run_err(&[&"sync", &m.index, &target, &"--store", &m.store]);

    // A flipped byte inside the chunk's frame.
    let mut bad = good.clone();
    bad[(e.offset + u64::from(e.clen) / 2) as usize] ^= 0xff;
    fs::write(pack, &bad).unwrap();
    let err = sync_err();
    assert!(
        err.contains(&id) && err.contains("corrupt chunk") && err.contains(&pack_name),
        "{err}"
    );

    // Garbage in place of the whole frame.
    let mut bad = good.clone();
    bad[e.offset as usize..(e.offset + u64::from(e.clen)) as usize].fill(0x5a);
    fs::write(pack, &bad).unwrap();
    let err = sync_err();
    assert!(err.contains(&id) && err.contains(&pack_name), "{err}");

    // The pack cut short before the frame ends.
    fs::write(pack, &good[..e.offset as usize + 1]).unwrap();
    let err = sync_err();
    assert!(err.contains(&pack_name), "{err}");

    // The pack deleted.
    fs::remove_file(pack).unwrap();
    let err = sync_err();
    assert!(
        err.contains("missing") && err.contains(&pack_name) && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !target.exists() || fs::read(&target).unwrap() != img,
        "no sync succeeded"
    );

    // The location file deleted: the store does not know the index.
    fs::write(pack, &good).unwrap();
    let root = m.make["root_hash"].as_str().unwrap();
    fs::remove_file(m.store.join(format!("locations/{root}.tloc"))).unwrap();
    let err = sync_err();
    assert!(
        err.contains("no location data for index") && err.contains(root),
        "{err}"
    );

    // A location file of another index in its place is refused, never followed.
    let other = make_image(&mixed_image(1_000_000, 62), &[]);
    let other_root = other.make["root_hash"].as_str().unwrap();
    fs::copy(
        other.store.join(format!("locations/{other_root}.tloc")),
        m.store.join(format!("locations/{root}.tloc")),
    )
    .unwrap();
    let err = sync_err();
    assert!(
        err.contains("invalid store file") && err.contains(root),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let img = mixed_image(100_000, 71);
    let m = make_image(&img, &[]);
    let out = m._dir.path().join("x.tidx");
    for cs in ["16K:60K:256K", "1:2", "300K:64K:256K", "abc"] {
        let err = run_err(&[
            &"make",
            &m.image,
            &"--store",
            &m.store,
            &"--index",
            &out,
            &"--chunk-size",
            &cs,
        ]);
        assert!(err.contains("chunk sizes"), "{cs}: {err}");
    }
    let err = run_err(&[
        &"make",
        &m._dir.path().join("nope.raw"),
        &"--store",
        &m.store,
        &"--index",
        &out,
    ]);
    assert!(err.contains("nope.raw"), "{err}");
    let err = run_err(&[
        &"sync",
        &m.index,
        &m._dir.path().join("t.raw"),
        &"--store",
        &m._dir.path().join("nostore"),
    ]);
    assert!(err.contains("nostore"), "{err}");
}

#[test]
fn loop_device_as_source_and_target() {
    if skip_unless(loop_available(), "root and loop devices") {
        return;
    }
    let dir = TempDir::new().unwrap();
    // A loop device is a multiple of 512 bytes; the image inside it need not be.
    let img = mixed_image(4 * 1024 * 1024, 81);
    let src_file = dir.path().join("src.raw");
    fs::write(&src_file, &img).unwrap();
    let src = LoopDevice::attach(&src_file);
    let store = dir.path().join("store");
    let index = dir.path().join("dev.tidx");
    let made = json(&run_ok(&[
        &"make", &src.path, &"--store", &store, &"--index", &index, &"--json",
    ]));
    assert_eq!(made["image_size"], img.len() as u64);

    // Target: a larger loop device full of other bytes.
    let dst_file = dir.path().join("dst.raw");
    let junk = random_bytes(6 * 1024 * 1024, 82);
    fs::write(&dst_file, &junk).unwrap();
    let dst = LoopDevice::attach(&dst_file);
    json(&run_ok(&[
        &"sync", &index, &dst.path, &"--store", &store, &"--json",
    ]));
    run_ok(&[&"verify", &index, &dst.path]);
    drop(dst);
    let after = fs::read(&dst_file).unwrap();
    assert_eq!(&after[..img.len()], &img[..]);
    assert_eq!(
        &after[img.len()..],
        &junk[img.len()..],
        "tail past the image changed"
    );

    // A loop device smaller than the image is refused.
    let small_file = dir.path().join("small.raw");
    fs::write(&small_file, vec![7u8; 1024 * 1024]).unwrap();
    let small = LoopDevice::attach(&small_file);
    let err = run_err(&[&"sync", &index, &small.path, &"--store", &store]);
    assert!(
        err.contains(&format!(
            "block device {} holds 1048576 bytes but the image needs {}",
            small.path.display(),
            img.len()
        )),
        "{err}"
    );
}

#[test]
fn make_refuses_a_cache() {
    let img = mixed_image(1_000_000, 71);
    let m = make_image(&img, &[]);
    let cache = m._dir.path().join("cache");
    // A sync through a cache fills it.
    let first = m._dir.path().join("first.raw");
    run_ok(&[
        &"sync", &m.index, &first, &"--store", &m.store, &"--cache", &cache,
    ]);
    assert!(
        !tree_contents(&cache).is_empty(),
        "the cache was not filled"
    );
    // make writes the store itself: a cache in front makes no sense and is refused.
    let store2 = m._dir.path().join("store2");
    let index2 = m._dir.path().join("again.tidx");
    let err = run_err(&[
        &"make", &m.image, &"--store", &store2, &"--index", &index2, &"--cache", &cache,
    ]);
    assert!(
        err.contains("--cache") && err.contains("readers") && err.contains("store2"),
        "{err}"
    );
    assert!(!store2.exists() && !index2.exists());
}

#[test]
fn make_writes_damaged_frames_again_and_ignores_unreadable_packs() {
    let img = mixed_image(3_000_000, 73);
    let m = make_image(&img, &[]);
    let frames = pack_frames(&m.store);
    assert!(frames.len() >= 4, "need four chunks, have {}", frames.len());
    let (pack, e) = &frames[1];
    let good = fs::read(pack).unwrap();
    // A damaged frame: that chunk goes into a new pack.
    let mut bad = good.clone();
    bad[(e.offset + 2) as usize] ^= 0xff;
    fs::write(pack, &bad).unwrap();
    let again = json(&run_ok(&[
        &"make", &m.image, &"--store", &m.store, &"--index", &m.index, &"--json",
    ]));
    assert_eq!(again["repaired_chunks"], 1, "{again}");
    assert_eq!(again["new_chunks"], 0, "{again}");
    assert_eq!(again["new_packs"], 1, "{again}");
    assert_eq!(again["packs"], 2, "{again}");
    let target = m._dir.path().join("out.raw");
    sync_to(&m, &target);
    assert!(fs::read(&target).unwrap() == img, "synced image differs");
    // An emptied pack (its table of contents unreadable) is ignored: its chunks are
    // written again.
    fs::write(pack, b"").unwrap();
    let third = json(&run_ok(&[
        &"make", &m.image, &"--store", &m.store, &"--index", &m.index, &"--json",
    ]));
    assert_eq!(
        third["new_chunks"].as_u64().unwrap(),
        third["unique_chunks"].as_u64().unwrap() - 1,
        "{third}"
    );
    fs::remove_file(&target).unwrap();
    sync_to(&m, &target);
    assert!(fs::read(&target).unwrap() == img, "synced image differs");
}

#[test]
fn make_replaces_a_planted_link_in_place_of_a_pack_without_following_it() {
    let img = mixed_image(2_000_000, 75);
    let m = make_image(&img, &[]);
    let before = tree_contents(&m.store);
    let (pack, _) = pack_frames(&m.store).remove(0);
    let victim = m._dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    fs::remove_file(&pack).unwrap();
    std::os::unix::fs::symlink(&victim, &pack).unwrap();
    // A reader refuses the link.
    let target = m._dir.path().join("out.raw");
    let err = run_err(&[&"sync", &m.index, &target, &"--store", &m.store]);
    assert!(err.contains("symbolic link"), "{err}");
    let again = json(&run_ok(&[
        &"make", &m.image, &"--store", &m.store, &"--index", &m.index, &"--json",
    ]));
    assert_eq!(again["new_packs"], 1, "{again}");
    assert!(
        fs::read(&victim).unwrap() == b"precious",
        "the victim was written"
    );
    assert!(fs::symlink_metadata(&pack).unwrap().is_file());
    assert!(
        tree_contents(&m.store) == before,
        "the pack was not restored"
    );
}

#[test]
fn make_refuses_symlinked_store_directories() {
    let img = mixed_image(2_000_000, 77);
    let m = make_image(&img, &[]);
    let elsewhere = m._dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let index2 = m._dir.path().join("two.tidx");
    // A fresh store whose pack fan-out directory is a link elsewhere.
    let store2 = m._dir.path().join("store2");
    fs::create_dir_all(store2.join("packs")).unwrap();
    for e in fs::read_dir(m.store.join("packs")).unwrap() {
        let name = e.unwrap().file_name();
        std::os::unix::fs::symlink(&elsewhere, store2.join("packs").join(name)).unwrap();
    }
    let err = run_err(&[&"make", &m.image, &"--store", &store2, &"--index", &index2]);
    assert!(
        err.contains("symbolic link") && err.contains("store2/packs/"),
        "{err}"
    );
    // So is a symlinked `packs` or `locations` directory.
    for dir in ["packs", "locations"] {
        let store3 = m._dir.path().join(format!("store-{dir}"));
        fs::create_dir(&store3).unwrap();
        std::os::unix::fs::symlink(&elsewhere, store3.join(dir)).unwrap();
        let err = run_err(&[&"make", &m.image, &"--store", &store3, &"--index", &index2]);
        assert!(
            err.contains("symbolic link") && err.contains(&format!("store-{dir}/{dir}")),
            "{err}"
        );
    }
    assert_eq!(
        fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "wrote through the link"
    );
    assert!(!index2.exists(), "an index was published");
}

#[test]
fn make_and_verity_refuse_outputs_that_are_links_and_leave_their_targets_alone() {
    let img = mixed_image(1_000_000, 79);
    let m = make_image(&img, &[]);
    let victim = m._dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let link = m._dir.path().join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let err = run_err(&[&"make", &m.image, &"--store", &m.store, &"--index", &link]);
    assert!(
        err.contains("symbolic link") && err.contains("link"),
        "{err}"
    );
    let err = run_err(&[&"verity", &m.index, &m.image, &"--hash-file", &link]);
    assert!(
        err.contains("symbolic link") && err.contains("link"),
        "{err}"
    );
    assert!(
        fs::read(&victim).unwrap() == b"precious",
        "the victim was written"
    );
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    // Nothing else was left beside them (no temporary files).
    let mut names: Vec<_> = fs::read_dir(m._dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["image.raw", "image.tidx", "link", "store", "victim"]
    );
}

#[test]
fn make_killed_after_some_packs_leaves_a_store_the_next_make_completes() {
    // Incompressible, so the image needs five packs of at most 64 MiB of frames.
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("big.raw");
    fs::write(&image, random_bytes(300 << 20, 91)).unwrap();
    let store = dir.path().join("store");
    let index = dir.path().join("big.tidx");
    let mut child = tessera()
        .args(["make", "--threads", "2", "--json", "--store"])
        .arg(&store)
        .arg("--index")
        .arg(&index)
        .arg(&image)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let packs_written = || {
        let Ok(fans) = fs::read_dir(store.join("packs")) else {
            return 0;
        };
        // Fan-out directories only: packs in the making are files in packs/.
        fans.filter(|f| f.as_ref().unwrap().file_type().unwrap().is_dir())
            .flat_map(|f| fs::read_dir(f.unwrap().path()).unwrap())
            .filter(|f| {
                let name = f.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.ends_with(".tpack") && !name.starts_with('.')
            })
            .count()
    };
    while packs_written() < 2 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "make ended before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!index.exists(), "no index is published by a killed make");
    let kept = pack_frames(&store);
    assert!(!kept.is_empty(), "every pack left is whole and readable");
    // The next make reuses what the killed one wrote and completes.
    let made = json(&run_ok(&[
        &"make", &image, &"--store", &store, &"--index", &index, &"--json",
    ]));
    let reused = kept.len() as u64;
    assert_eq!(
        made["new_chunks"].as_u64().unwrap(),
        made["unique_chunks"].as_u64().unwrap() - reused,
        "{made}"
    );
    assert!(made["packs"].as_u64().unwrap() > made["new_packs"].as_u64().unwrap());
    let target = dir.path().join("out.raw");
    run_ok(&[&"sync", &index, &target, &"--store", &store]);
    run_ok(&[&"verify", &index, &target]);
    assert!(
        fs::read(&target).unwrap() == fs::read(&image).unwrap(),
        "synced image differs"
    );
}
