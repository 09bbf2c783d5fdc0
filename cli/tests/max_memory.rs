//! `sync --max-memory`: the peak resident memory of a real in-place sync of a 96 MiB
//! update (a shifted, edited and reordered image, so the sync scans, moves through
//! scratch and fetches) stays within the budget plus 8 MiB, and flags that do not fit
//! the budget are refused.
#![allow(unsafe_code)]

mod util;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tempfile::TempDir;
use util::*;

const MIB: usize = 1 << 20;

/// Writes the release pair A and B, 96 MiB each, 1 MiB at a time: this process must stay
/// small, as a child's `ru_maxrss` counts the memory of the process it was forked from
/// (until its exec). B is A with 1 MiB inserted at 24 MiB (shifting the rest), 24 regions
/// of 128 KiB rewritten, and two 8 MiB regions swapped (a cycle of moves).
fn pair(dir: &Path) {
    let a = fs::File::create(dir.join("a.img")).unwrap();
    for i in 0..96 {
        a.write_all_at(&random_bytes(MIB, 100 + i), i * MIB as u64)
            .unwrap();
    }
    // Where each MiB of B comes from: a MiB of A, or fresh bytes.
    let mut parts: Vec<Option<u64>> = (0..24).map(Some).collect();
    parts.push(None);
    parts.extend((24..95).map(Some));
    let (x, y) = (40, 72);
    for k in 0..8 {
        parts.swap(x + k, y + k);
    }
    let a = fs::File::open(dir.join("a.img")).unwrap();
    let b = fs::File::create(dir.join("b.img")).unwrap();
    let mut buf = vec![0u8; MIB];
    for (i, part) in parts.iter().enumerate() {
        match part {
            Some(m) => a.read_exact_at(&mut buf, m * MIB as u64).unwrap(),
            None => buf.copy_from_slice(&random_bytes(MIB, 2)),
        }
        if i % 4 == 1 && i < 96 {
            // A rewritten region.
            buf[4321..4321 + (128 << 10)].copy_from_slice(&random_bytes(128 << 10, i as u64));
        }
        b.write_all_at(&buf, (i * MIB) as u64).unwrap();
    }
}

/// Whether two files have the same bytes, read 1 MiB at a time.
fn same_file(x: &Path, y: &Path) -> bool {
    let (x, y) = (fs::File::open(x).unwrap(), fs::File::open(y).unwrap());
    let len = x.metadata().unwrap().len();
    if len != y.metadata().unwrap().len() {
        return false;
    }
    let (mut p, mut q) = (vec![0u8; MIB], vec![0u8; MIB]);
    (0..len.div_ceil(MIB as u64)).all(|i| {
        let n = (len - i * MIB as u64).min(MIB as u64) as usize;
        x.read_exact_at(&mut p[..n], i * MIB as u64).unwrap();
        y.read_exact_at(&mut q[..n], i * MIB as u64).unwrap();
        p[..n] == q[..n]
    })
}

/// What [`run_measured`] saw.
struct Measured {
    ok: bool,
    stdout: String,
    stderr: String,
    /// Peak resident set size in bytes (the kernel's `ru_maxrss` of the child).
    peak: u64,
}

/// Runs `tessera ARGS` to its end, measuring its peak memory.
fn run_measured(dir: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Measured {
    let err_path = dir.join("stderr");
    let out_path = dir.join("stdout");
    // Reaped by wait4 below, which std's `Child::wait` cannot replace: it has no rusage.
    #[allow(clippy::zombie_processes)]
    let child = tessera()
        .args(args.iter().map(|a| a.as_ref()))
        .env("TESSERA_STATE_DIR", dir.join("state"))
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("running tessera");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into two live locals; `child` is not
    // waited for again (dropping a std Child does not wait).
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let stderr = fs::read_to_string(&err_path).unwrap();
    assert!(!stderr.contains("panicked"), "tessera panicked: {stderr}");
    Measured {
        ok,
        stdout: fs::read_to_string(&out_path).unwrap(),
        stderr,
        // Kilobytes on Linux.
        peak: u64::try_from(usage.ru_maxrss).unwrap() * 1024,
    }
}

#[test]
fn sync_peak_memory_stays_within_budget() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    pair(d);
    let store = d.join("store");
    let index = d.join("b.tidx");
    run_ok(&[
        &"make",
        &d.join("b.img"),
        &"--store",
        &store,
        &"--index",
        &index,
        &"--chunk-size",
        &"4K:16K:64K",
    ]);
    let target = d.join("target.img");
    for budget in [16u64 << 20, 32 << 20] {
        fs::copy(d.join("a.img"), &target).unwrap();
        let max = format!("{budget}");
        let m = run_measured(
            d,
            &[
                &"sync",
                &index,
                &target,
                &"--store",
                &store,
                &"--max-memory",
                &max,
                &"--json",
            ],
        );
        assert!(m.ok, "sync --max-memory {budget} failed: {}", m.stderr);
        assert!(
            same_file(&target, &d.join("b.img")),
            "target differs from the image"
        );
        // The sync did each kind of work: reused, moved (through scratch) and fetched.
        let report = json(&m.stdout);
        for field in [
            "bytes_in_place",
            "bytes_moved",
            "bytes_fetched",
            "bytes_stashed",
        ] {
            assert!(
                report[field].as_u64().is_some_and(|n| n > 0),
                "no {field} in {report}"
            );
        }
        let bound = budget + (8 << 20);
        assert!(
            m.peak <= bound,
            "peak RSS {} bytes over --max-memory {budget} + 8 MiB ({bound})",
            m.peak
        );
    }
}

#[test]
fn flags_that_do_not_fit_the_budget_are_refused() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let image = d.join("img");
    fs::write(&image, random_bytes(MIB, 4)).unwrap();
    let store = d.join("store");
    let index = d.join("img.tidx");
    run_ok(&[&"make", &image, &"--store", &store, &"--index", &index]);
    let target = d.join("target");
    let err = run_err(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &store,
        &"--max-memory",
        &"16M",
        &"--scratch-size",
        &"8M",
    ]);
    assert!(
        err.contains("--scratch-size")
            && err.contains(
                "a scratch of 8388608 bytes does not fit the memory budget of \
                 16777216 bytes"
            )
            && err.contains("raise --max-memory"),
        "{err}"
    );
    let err = run_err(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &store,
        &"--max-memory",
        &"4M",
    ]);
    assert!(
        err.contains("--max-memory") && err.contains("at least 8388608 bytes"),
        "{err}"
    );
    assert!(!target.exists(), "a refused sync created its target");
    // What fits is accepted: a quarter of the budget.
    run_ok(&[
        &"sync",
        &index,
        &target,
        &"--store",
        &store,
        &"--max-memory",
        &"16M",
        &"--scratch-size",
        &"4M",
    ]);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&image).unwrap());
}
