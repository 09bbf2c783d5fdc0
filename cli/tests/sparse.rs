//! Sparse disks: `make`, `sync`, `verify`, `verity` and `serve` of an 8 GiB image holding
//! 48 MiB of data, checked with qemu-img (compare, map) and nbdinfo (--map), and against
//! the same commands on the data alone.

mod util;

use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use util::{have, is_root, json, random_bytes, run_ok, sh, skip_unless, tessera, LoopDevice};

const SIZE: u64 = 8 << 30;

/// Where the data of the sparse image is: offset, length.
const PIECES: [(u64, usize); 4] = [
    (0, 4 << 20),
    ((1 << 30) + 12_345, 16 << 20),
    (5 << 30, 24 << 20),
    (SIZE - (4 << 20) - 100, 4 << 20),
];

/// A smaller one for block devices, which are read whole: 1 GiB with 6 MiB of data.
const DEV_SIZE: u64 = 1 << 30;
const DEV_PIECES: [(u64, usize); 3] = [
    (4096, 1 << 20),
    ((300 << 20) + 7, 4 << 20),
    (DEV_SIZE - (1 << 20), 1 << 20),
];

/// The sparse image, and its data alone (the pieces end to end).
fn images(dir: &Path) -> (PathBuf, PathBuf) {
    images_of(dir, SIZE, &PIECES)
}

fn images_of(dir: &Path, size: u64, pieces: &[(u64, usize)]) -> (PathBuf, PathBuf) {
    let sparse = dir.join("sparse.img");
    let alone = dir.join("alone.img");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(size).unwrap();
    let mut a = std::fs::File::create(&alone).unwrap();
    for (i, &(offset, len)) in pieces.iter().enumerate() {
        let bytes = random_bytes(len, i as u64 + 40);
        f.write_all_at(&bytes, offset).unwrap();
        a.write_all(&bytes).unwrap();
    }
    (sparse, alone)
}

fn data_len() -> u64 {
    PIECES.iter().map(|p| p.1 as u64).sum()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn make(dir: &Path, image: &Path, name: &str) -> (PathBuf, serde_json::Value) {
    let index = dir.join(format!("{name}.tidx"));
    let out = run_ok(&[
        &"make",
        &image,
        &"--store",
        &dir.join("store"),
        &"--index",
        &index,
        &"--json",
    ]);
    (index, json(&out))
}

fn same_image(a: &Path, b: &dyn AsRef<std::ffi::OsStr>) {
    let out = sh(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b));
    assert!(out.contains("Images are identical"), "{out}");
}

#[test]
fn a_sparse_disk_round_trips_at_the_cost_of_its_data() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sparse, alone) = images(dir.path());
    let (index, made) = make(dir.path(), &sparse, "sparse");
    let (alone_index, _) = make(dir.path(), &alone, "alone");
    assert_eq!(made["image_size"], SIZE);
    assert!(made["zero_chunks"].as_u64().unwrap() > 100_000, "{made}");
    // The index is as small as the index of the data alone, give or take 10 %.
    let (a, b) = (
        std::fs::metadata(&index).unwrap().len(),
        std::fs::metadata(&alone_index).unwrap().len(),
    );
    assert!(a * 10 <= b * 11, "sparse index {a} bytes, data alone {b}");
    let info = json(&run_ok(&[&"info", &index, &"--json"]));
    assert_eq!(info["format_version"], 2);
    assert_eq!(info["zero_chunks"], made["zero_chunks"]);

    // Sync into a new file: holes where the image has zeros.
    let out = dir.path().join("out.img");
    run_ok(&[&"sync", &index, &out, &"--store", &dir.path().join("store")]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), SIZE);
    let blocks = allocated(&out);
    assert!(
        blocks < data_len() + (8 << 20),
        "{blocks} bytes allocated for {} bytes of data",
        data_len()
    );
    same_image(&sparse, &out);
    // qemu-img sees data only around the pieces.
    let map: serde_json::Value = serde_json::from_str(&sh(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&out)))
    .unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(data < data_len() + (8 << 20), "{map}");
    run_ok(&[&"verify", &index, &out]);
    // A byte in a hole is found by verify.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .unwrap()
        .write_all_at(&[7], 3 << 30)
        .unwrap();
    let err = util::run_err(&[&"verify", &index, &out]);
    assert!(err.contains("1 of") && err.contains("out.img"), "{err}");

    // In place over a target with data where the image has holes: zeros there after.
    let garbage = random_bytes(8 << 20, 99);
    let target = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    target.write_all_at(&garbage, (2 << 30) + 333).unwrap();
    target.write_all_at(&garbage, (6 << 30) + 1).unwrap();
    drop(target);
    run_ok(&[&"sync", &index, &out, &"--store", &dir.path().join("store")]);
    same_image(&sparse, &out);
    let f = std::fs::File::open(&out).unwrap();
    let mut back = vec![1u8; garbage.len()];
    f.read_exact_at(&mut back, (2 << 30) + 333).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert!(
        allocated(&out) < data_len() + (8 << 20),
        "holes punched again"
    );
    run_ok(&[&"verify", &index, &out]);

    // dm-verity steps over holes: the original and the synced copy have their holes in
    // different places (sync writes whole chunks, zeros at their edges included), and
    // give the same tree. (The unit tests check zero runs against hashed bytes.)
    let root = |target: &Path, name: &str| {
        let out = run_ok(&[
            &"verity",
            &index,
            &target,
            &"--hash-file",
            &dir.path().join(name),
        ]);
        out.lines().last().unwrap().to_string()
    };
    assert_eq!(root(&sparse, "a.verity"), root(&out, "b.verity"));
}

#[test]
fn serve_reports_zero_runs_as_holes() {
    if !have("nbdinfo") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sparse, _) = images(dir.path());
    let (index, _) = make(dir.path(), &sparse, "sparse");
    let mut child = tessera()
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(dir.path().join("store"))
        .arg(&index)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let uri = format!("nbd://{}", line.split("nbd://").nth(1).unwrap().trim());
    let map = sh(Command::new("nbdinfo").arg("--map").arg(&uri));
    let (mut holes, mut data) = (0u64, 0u64);
    for l in map.lines() {
        let len: u64 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
        if l.contains("hole,zero") {
            holes += len;
        } else {
            data += len;
        }
    }
    assert_eq!(holes + data, SIZE, "{map}");
    assert!(data < data_len() + (4 << 20), "{map}");
    // Few extents: one per zero run, not one per zero chunk.
    assert!(map.lines().count() < 20, "{map}");
    same_image(&sparse, &uri);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_block_device_gives_the_index_of_its_file_and_takes_zeros_in_place() {
    if skip_unless(is_root() && util::loop_available(), "root and loop devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sparse, _) = images_of(dir.path(), DEV_SIZE, &DEV_PIECES);
    let (index, _) = make(dir.path(), &sparse, "file");
    // A copy with data in the image's holes, behind a loop device: make reads its zeros
    // (no SEEK_DATA on a block device) and finds them by the zero scan.
    let copy = dir.path().join("copy.img");
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(&sparse)
        .arg(&copy));
    let dev = LoopDevice::attach(&copy);
    let (from_dev, _) = make(dir.path(), &dev.path, "dev");
    assert_eq!(
        std::fs::read(&index).unwrap(),
        std::fs::read(&from_dev).unwrap(),
        "a block device and a sparse file of the same bytes give different indexes"
    );
    let garbage = random_bytes(4 << 20, 5);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dev.path)
        .unwrap()
        .write_all_at(&garbage, 600 << 20)
        .unwrap();
    run_ok(&[
        &"sync",
        &index,
        &dev.path,
        &"--store",
        &dir.path().join("store"),
    ]);
    run_ok(&[&"verify", &index, &dev.path]);
    drop(dev);
    same_image(&sparse, &copy);
}
