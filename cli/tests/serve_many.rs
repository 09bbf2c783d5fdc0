//! Many exports on one `tessera serve` from an HTTP store: threads and memory are bounded
//! by the server's settings (one read-ahead pool, one chunk cache), not by the number of
//! exports. Counted in /proc/PID/status.

mod remote_support;
mod util;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use remote_support::*;
use util::*;

/// Kills the server when the test ends, failed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A field of /proc/PID/status, as a number (`Threads`, `VmRSS` in KiB).
fn status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Makes `n` images of 1 MiB of random data into DIR/store; their index paths.
fn make_images(dir: &Path, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let img = dir.join(format!("d{i:03}.img"));
            std::fs::write(&img, random_bytes(1 << 20, 100 + i as u64)).unwrap();
            let idx = dir.join(format!("d{i:03}.tidx"));
            run_ok(&[
                &"make",
                &"-q",
                &"--store",
                &dir.join("store"),
                &"--index",
                &idx,
                &img,
            ]);
            std::fs::remove_file(img).unwrap();
            idx.display().to_string()
        })
        .collect()
}

#[test]
fn forty_http_exports_share_one_pool_of_threads_and_one_cache() {
    if skip_unless(nginx_available(), "nginx") {
        return;
    }
    let found = Command::new("sh")
        .args(["-c", "command -v nbdsh"])
        .output()
        .is_ok_and(|o| o.status.success());
    if skip_unless(found, "nbdsh") {
        return;
    }
    const N: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let indexes = make_images(dir.path(), N);
    let nginx = Nginx::start(&dir.path().join("store"));
    let mut child = Killed(
        tessera()
            .arg("serve")
            .args(&indexes)
            .arg("--store")
            .arg(nginx.url())
            // A cache of 4 MiB for 40 MiB of images.
            .args(["--cache-size", "4M", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting tessera serve"),
    );
    let pid = child.0.id();
    let mut line = String::new();
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .split("nbd://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    // Idle: the runtime's threads and nothing per export. (Before one shared pool, each
    // export started its own fetch and read-ahead threads: 32 + 32 per export here.)
    let idle = status(pid, "Threads");
    assert!(idle < 16, "{idle} threads idle with {N} exports");
    // Read every export in full, one connection each.
    let script = format!(
        "import nbd\nfor i in range({N}):\n    h = nbd.NBD()\n    \
         h.connect_uri('nbd://{addr}/d%03d' % i)\n    \
         assert len(h.pread(1 << 20, 0)) == 1 << 20\n    h.shutdown()\n"
    );
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new("nbdsh")
        .env("PATH", path)
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Let read-ahead settle before counting.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let busy = status(pid, "Threads");
    assert!(busy < 100, "{busy} threads after reading {N} exports");
    // Memory follows the cache size, not the 40 MiB that went through it (each export
    // had a cache of its own before).
    let rss = status(pid, "VmRSS");
    eprintln!("{N} exports: {idle} threads idle, {busy} after reads, RSS {rss} KiB");
    assert!(
        rss < 44 << 10,
        "RSS {rss} KiB after reading {N} MiB through a 4 MiB cache"
    );
}
