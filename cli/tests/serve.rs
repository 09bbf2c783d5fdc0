//! `tessera serve` against the real NBD clients: qemu-img, qemu-io, nbdinfo, nbdsh,
//! nbdcopy, nbd-client, and nbdfuse + loop devices for mounted ext4 images.

mod util;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::{have, is_root, pack_frames, random_bytes, run_err, run_ok, sh, skip_unless, tessera};

/// A `tessera serve` child process; SIGTERM'd when dropped.
struct Served {
    child: Child,
    /// Kept open so that the server's stdout never hits a closed pipe.
    _stdout: BufReader<std::process::ChildStdout>,
    addr: String,
    stderr: PathBuf,
}

impl Served {
    /// Starts `tessera serve ARGS --listen 127.0.0.1:0` and waits for its address.
    fn start(dir: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Served {
        let stderr = dir.join(format!("serve-{}.err", Instant::now().elapsed().as_nanos()));
        let mut child = tessera()
            .arg("serve")
            .args(args.iter().map(|a| a.as_ref()))
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting tessera serve");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .split("nbd://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| {
                panic!(
                    "no address in {line:?}: {}",
                    std::fs::read_to_string(&stderr).unwrap()
                )
            })
            .to_string();
        Served {
            child,
            _stdout: stdout,
            addr,
            stderr,
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.addr)
    }

    fn port(&self) -> &str {
        self.addr.rsplit(':').next().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    /// SIGTERM, then the exit status must be success.
    fn stop(mut self) {
        signal(&self.child, "TERM");
        let status = wait_for(&mut self.child, Duration::from_secs(15));
        assert!(
            status.success(),
            "serve exited with {status}: {}",
            self.log()
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

fn wait_for(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "process {} did not exit",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 16 MiB: 6 MiB random, 4 MiB zeros, 6 MiB random.
fn image_bytes() -> Vec<u8> {
    let mut data = random_bytes(16 << 20, 11);
    data[6 << 20..10 << 20].fill(0);
    data
}

/// Writes `data` as DIR/NAME.img and makes DIR/NAME.tidx in DIR/store.
fn make(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let img = dir.join(format!("{name}.img"));
    std::fs::write(&img, data).unwrap();
    let idx = dir.join(format!("{name}.tidx"));
    run_ok(&[
        &"make",
        &"-q",
        &"--store",
        &dir.join("store"),
        &"--index",
        &idx,
        &img,
    ]);
    idx
}

/// nbdsh running `script` with `uri`, `img` and `size` defined.
fn nbdsh(script: &str, uri: &str, img: &Path) -> String {
    let prelude = format!(
        "import nbd, errno, socket, struct\nuri = {uri:?}\nimg = {:?}\nexpected = open(img, 'rb').read()\n",
        img.display().to_string()
    );
    // python3-libnbd is installed for the system interpreter: put it first on PATH.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    sh(Command::new("nbdsh")
        .env("PATH", path)
        .arg("-c")
        .arg(format!("{prelude}{script}")))
}

#[test]
fn qemu_and_nbdinfo_see_the_image_and_its_zero_extents() {
    if !have("qemu-img") || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes();
    let idx = make(dir.path(), "disk", &data);
    let srv = Served::start(dir.path(), &[&idx, &"--store", &dir.path().join("store")]);
    let out = dir.path().join("out.raw");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(srv.uri("disk"))
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "qemu-img convert differs from the image"
    );
    let io = sh(Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0 7M 1M",
            "-c",
            "read 0 64k",
        ])
        .arg(srv.uri("disk")));
    assert!(io.contains("read 1048576/1048576"), "{io}");
    let info: serde_json::Value = serde_json::from_str(&sh(Command::new("nbdinfo")
        .arg("--json")
        .arg(srv.uri("disk"))))
    .unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 16 << 20);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["contexts"][0], "base:allocation");
    let map = sh(Command::new("nbdinfo").arg("--map").arg(srv.uri("disk")));
    let holes: u64 = map
        .lines()
        .filter(|l| l.contains("hole,zero"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    // Chunk boundaries do not fall on the zero run's edges: most of it is zero chunks.
    assert!((3 << 20..=4 << 20).contains(&holes), "{map}");
    srv.stop();
}

#[test]
fn nbdsh_kernel_profile_listing_and_errors_that_keep_the_connection() {
    if !have("nbdsh") || !have("nbd-client") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes();
    let idx = make(dir.path(), "disk", &data);
    let other = make(dir.path(), "other", &data[..1 << 20]);
    let srv = Served::start(
        dir.path(),
        &[&idx, &other, &"--store", &dir.path().join("store")],
    );
    let img = dir.path().join("disk.img");
    // The kernel's profile: no structured replies, no block sizes, pipelined 512-byte
    // aligned reads.
    nbdsh(
        r#"
h.set_request_structured_replies(False)
h.set_request_block_size(False)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
bufs = [(nbd.Buffer(4096), off) for off in range(0, (16 << 20) - 4096, 65536 + 512)]
cookies = [h.aio_pread(b, off) for b, off in bufs]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
for b, off in bufs:
    assert b.to_bytearray() == expected[off:off + 4096], off
h.shutdown()
"#,
        &srv.uri("disk"),
        &img,
    );
    // Structured replies (the libnbd default), whole image.
    nbdsh(
        r#"
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
assert h.pread(16 << 20, 0) == expected
"#,
        &srv.uri("disk"),
        &img,
    );
    // Listing several exports.
    let names = nbdsh(
        r#"
h.set_opt_mode(True)
h.connect_uri(uri)
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
h.opt_abort()
print(sorted(names))
"#,
        &srv.uri(""),
        &img,
    );
    assert_eq!(names.trim(), "['disk', 'other']");
    let listed = sh(Command::new("nbd-client").args(["-l", "127.0.0.1", srv.port()]));
    assert!(
        listed.contains("disk") && listed.contains("other"),
        "{listed}"
    );
    // Errors with strict mode off, each followed by a good read on the same connection.
    nbdsh(
        r#"
h.set_strict_mode(0)
h.connect_uri(uri)
size = h.get_size()
def fails(what, want, f):
    try:
        f()
    except nbd.Error as e:
        assert e.errnum == want, (what, e.errnum, e)
    else:
        raise AssertionError(what + " succeeded")
    assert h.pread(512, 0) == expected[:512], what
fails("read past end", errno.EINVAL, lambda: h.pread(1024, size - 512))
fails("oversized read", errno.EINVAL, lambda: h.pread(48 << 20, 0))
fails("write to read-only", errno.EPERM, lambda: h.pwrite(b"x" * 512, 0))
fails("trim of read-only", errno.EPERM, lambda: h.trim(512, 0))
fails("unknown flag", errno.EINVAL, lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
"#,
        &srv.uri("disk"),
        &img,
    );
    // An unknown command type, sent by hand (libnbd cannot): EINVAL, then a good read.
    nbdsh(
        r#"
host, port = uri[len("nbd://"):].split("/")[0].split(":")
s = socket.create_connection((host, int(port)))
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c
        b += c
    return b
assert recv(18)[:8] == b"NBDMAGIC"
s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 4) + b"disk")
recv(10)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 42, 1, 0, 512))
assert struct.unpack(">IIQ", recv(16)) == (0x67446698, errno.EINVAL, 1)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 2, 0, 512))
assert struct.unpack(">IIQ", recv(16)) == (0x67446698, 0, 2)
assert recv(512) == expected[:512]
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 3, 0, 0))
"#,
        &srv.uri("disk"),
        &img,
    );
    srv.stop();
}

#[test]
fn a_corrupt_chunk_fails_its_range_with_eio_and_is_logged() {
    if !have("nbdsh") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes();
    let idx = make(dir.path(), "disk", &data);
    let index = tessera_engine::Index::load(&idx).unwrap();
    let victim = index
        .chunks()
        .iter()
        .find(|c| !c.zero && c.offset > (1 << 20))
        .copied()
        .unwrap();
    // A flipped byte in the middle of the chunk's frame in its pack.
    let (pack, frame) = pack_frames(&dir.path().join("store"))
        .into_iter()
        .find(|(_, e)| e.id == victim.id)
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[(frame.offset + u64::from(frame.clen) / 2) as usize] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();
    let srv = Served::start(dir.path(), &[&idx, &"--store", &dir.path().join("store")]);
    let script = format!(
        r#"
h.set_request_structured_replies(STRUCTURED)
h.connect_uri(uri)
try:
    h.pread(4096, {off})
except nbd.Error as e:
    assert e.errnum == errno.EIO, e
else:
    raise AssertionError("corrupt range was served")
assert h.pread(4096, 0) == expected[:4096]
assert h.pread(4096, {after}) == expected[{after}:{after} + 4096]
"#,
        off = victim.offset + 10,
        after = victim.end(),
    );
    for structured in ["True", "False"] {
        nbdsh(
            &script.replace("STRUCTURED", structured),
            &srv.uri("disk"),
            &dir.path().join("disk.img"),
        );
    }
    let out = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            &format!("read {} 4096", victim.offset),
        ])
        .arg(srv.uri("disk"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    assert!(
        srv.log().contains(&victim.id.to_string()),
        "log: {}",
        srv.log()
    );
    srv.stop();
}

/// An nbdfuse mount of an export, with a loop device over its file; undone on drop.
struct FuseLoop {
    fuse: Child,
    dir: PathBuf,
    device: String,
}

impl FuseLoop {
    fn attach(uri: &str, dir: &Path, readonly: bool) -> FuseLoop {
        let mnt = dir.join("fuse");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut cmd = Command::new("nbdfuse");
        if readonly {
            cmd.arg("-r");
        }
        let mut fuse = cmd.arg(&mnt).arg(uri).spawn().expect("starting nbdfuse");
        let file = mnt.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(fuse.try_wait().unwrap().is_none(), "nbdfuse exited");
            assert!(Instant::now() < deadline, "nbdfuse did not mount");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut losetup = Command::new("losetup");
        if readonly {
            losetup.arg("-r");
        }
        let device = sh(losetup.args(["--find", "--show"]).arg(&file))
            .trim()
            .to_string();
        FuseLoop {
            fuse,
            dir: mnt,
            device,
        }
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        let _ = wait_for(&mut self.fuse, Duration::from_secs(10));
    }
}

/// A mounted filesystem, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(device: &str, at: &Path, readonly: bool) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let opts = if readonly { "ro" } else { "rw" };
        sh(Command::new("mount").args(["-o", opts, device]).arg(at));
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn can_mount() -> bool {
    let ok =
        is_root() && Path::new("/dev/fuse").exists() && Path::new("/dev/loop-control").exists();
    !skip_unless(ok, "root with /dev/fuse and loop devices")
        && have("nbdfuse")
        && have("mkfs.ext4")
        && have("losetup")
        && have("fusermount3")
}

/// An ext4 image of a small tree: DIR/tree, DIR/fs.tidx.
fn ext4(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    for i in 0..6u64 {
        std::fs::write(
            tree.join(format!("file{i}.bin")),
            random_bytes(100_000 + 37_000 * i as usize, i),
        )
        .unwrap();
    }
    std::fs::write(tree.join("sub/deeper/hello.txt"), "hello from tessera\n").unwrap();
    let img = dir.join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&tree)
        .arg(&img));
    let idx = dir.join("fs.tidx");
    run_ok(&[
        &"make",
        &"-q",
        &"--store",
        &dir.join("store"),
        &"--index",
        &idx,
        &img,
    ]);
    idx
}

fn same_tree(a: &Path, b: &Path) {
    sh(Command::new("diff")
        .args(["-r", "--exclude=lost+found"])
        .arg(a)
        .arg(b));
}

/// Hash of `path`, or of every file under it, with their paths.
fn digest(path: &Path) -> String {
    sh(Command::new("sh").arg("-c").arg(format!(
        "find {} -type f -print0 | sort -z | xargs -0 sha256sum",
        path.display()
    )))
}

#[test]
fn ext4_mounts_read_only_through_nbdfuse_and_a_loop_device() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let idx = ext4(dir.path());
    let srv = Served::start(dir.path(), &[&idx, &"--store", &dir.path().join("store")]);
    {
        let fl = FuseLoop::attach(&srv.uri("fs"), dir.path(), true);
        let m = Mount::new(&fl.device, &dir.path().join("mnt"), true);
        same_tree(&dir.path().join("tree"), &m.0);
    }
    srv.stop();
}

#[test]
fn overlay_mount_is_writable_and_persists_across_restarts_leaving_the_image_alone() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let idx = ext4(dir.path());
    let store = dir.path().join("store");
    let overlay = dir.path().join("fs.overlay");
    let before = (digest(&store), digest(&dir.path().join("fs.img")));
    let args: [&dyn AsRef<std::ffi::OsStr>; 5] = [&idx, &"--store", &store, &"--overlay", &overlay];
    let srv = Served::start(dir.path(), &args);
    {
        let fl = FuseLoop::attach(&srv.uri("fs"), dir.path(), false);
        let m = Mount::new(&fl.device, &dir.path().join("mnt"), false);
        std::fs::write(m.0.join("new.txt"), "written through NBD\n").unwrap();
        std::fs::remove_file(m.0.join("file0.bin")).unwrap();
        std::fs::write(m.0.join("sub/big.bin"), random_bytes(3 << 20, 99)).unwrap();
        sh(&mut Command::new("sync"));
    }
    srv.stop();
    let srv = Served::start(dir.path(), &args);
    {
        let fl = FuseLoop::attach(&srv.uri("fs"), dir.path(), true);
        let m = Mount::new(&fl.device, &dir.path().join("mnt"), true);
        assert_eq!(
            std::fs::read_to_string(m.0.join("new.txt")).unwrap(),
            "written through NBD\n"
        );
        assert!(!m.0.join("file0.bin").exists());
        assert!(std::fs::read(m.0.join("sub/big.bin")).unwrap() == random_bytes(3 << 20, 99));
        assert_eq!(
            std::fs::read_to_string(m.0.join("sub/deeper/hello.txt")).unwrap(),
            "hello from tessera\n"
        );
    }
    srv.stop();
    assert_eq!(
        before,
        (digest(&store), digest(&dir.path().join("fs.img"))),
        "image or store changed"
    );
    // Without the overlay the export is the original image, read-only.
    let srv = Served::start(dir.path(), &[&idx, &"--store", &store]);
    {
        let fl = FuseLoop::attach(&srv.uri("fs"), dir.path(), true);
        let m = Mount::new(&fl.device, &dir.path().join("mnt"), true);
        same_tree(&dir.path().join("tree"), &m.0);
    }
    srv.stop();
}

#[test]
fn writes_without_an_overlay_are_refused_and_bad_arguments_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes();
    let idx = make(dir.path(), "disk", &data);
    let store = dir.path().join("store");
    let err = util::run_err(&[
        &"serve",
        &idx,
        &idx,
        &"--store",
        &store,
        &"--overlay",
        &dir.path().join("o"),
    ]);
    assert!(err.contains("exactly one INDEX"), "{err}");
    let err = util::run_err(&[
        &"serve",
        &idx,
        &idx,
        &"--store",
        &store,
        &"--listen",
        &"127.0.0.1:0",
    ]);
    assert!(err.contains("both be exported as \"disk\""), "{err}");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![1u8; 1 << 20]).unwrap();
    let err = util::run_err(&[
        &"serve",
        &idx,
        &"--store",
        &store,
        &"--overlay",
        &junk,
        &"--listen",
        &"127.0.0.1:0",
    ]);
    assert!(err.contains("not a tessera overlay"), "{err}");
}

#[test]
fn unix_socket_and_nbdcopy() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes();
    let idx = make(dir.path(), "disk", &data);
    let sock = dir.path().join("nbd.sock");
    let mut child = tessera()
        .args(["serve", "--unix"])
        .arg(&sock)
        .arg(&idx)
        .arg("--store")
        .arg(dir.path().join("store"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("nbd+unix:///disk?socket="), "{line}");
    let out = dir.path().join("copy.raw");
    sh(Command::new("nbdcopy")
        .arg(format!("nbd+unix:///disk?socket={}", sock.display()))
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == data);
    signal(&child, "INT");
    assert!(wait_for(&mut child, Duration::from_secs(15)).success());
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[test]
fn overlay_takes_writes_zeroes_and_trims_from_nbdsh_and_keeps_them() {
    if !have("nbdsh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = image_bytes();
    let idx = make(dir.path(), "disk", &data);
    let store = dir.path().join("store");
    let overlay = dir.path().join("disk.overlay");
    let img = dir.path().join("disk.img");
    // The expected contents after the writes below, computed the same way in Python.
    let model = r#"
import random
rnd = random.Random(5)
patch = bytes(rnd.getrandbits(8) for _ in range(1 << 20))
want = bytearray(expected)
want[12345:12345 + len(patch)] = patch
want[4 << 20:6 << 20] = bytes(2 << 20)
want[(8 << 20) + 100:(8 << 20) + 100 + 65536] = bytes(65536)
want[(16 << 20) - 3:] = b"end"
"#;
    let args: [&dyn AsRef<std::ffi::OsStr>; 5] = [&idx, &"--store", &store, &"--overlay", &overlay];
    let srv = Served::start(dir.path(), &args);
    nbdsh(
        &format!(
            r#"{model}
h.connect_uri(uri)
assert not h.is_read_only() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
h.pwrite(patch, 12345, nbd.CMD_FLAG_FUA)
h.zero(2 << 20, 4 << 20)
h.trim(65536, (8 << 20) + 100)
h.pwrite(b"end", (16 << 20) - 3)
h.flush()
assert h.pread(16 << 20, 0) == want
"#
        ),
        &srv.uri("disk"),
        &img,
    );
    srv.stop();
    // After a restart the writes are still there; --readonly serves them but refuses more.
    let srv = Served::start(
        dir.path(),
        &[
            &idx,
            &"--store",
            &store,
            &"--overlay",
            &overlay,
            &"--readonly",
        ],
    );
    nbdsh(
        &format!(
            r#"{model}
h.set_strict_mode(0)
h.connect_uri(uri)
assert h.is_read_only()
assert h.pread(16 << 20, 0) == want
try:
    h.pwrite(b"x", 0)
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
else:
    raise AssertionError("write accepted by a --readonly export")
"#
        ),
        &srv.uri("disk"),
        &img,
    );
    srv.stop();
    assert!(
        std::fs::read(&img).unwrap() == data,
        "the image file changed"
    );
}

#[test]
fn commit_turns_an_overlay_written_over_nbd_into_a_release() {
    if !have("nbdsh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut want = image_bytes();
    let idx = make(dir.path(), "disk", &want);
    let store = dir.path().join("store");
    let overlay = dir.path().join("disk.overlay");
    let args: [&dyn AsRef<std::ffi::OsStr>; 5] = [&idx, &"--store", &store, &"--overlay", &overlay];
    let srv = Served::start(dir.path(), &args);
    nbdsh(
        r#"
h.connect_uri(uri)
h.pwrite(b"x" * 5000, 3_000_000)
h.zero(1 << 20, (12 << 20) + 7)
h.pwrite(b"end", (16 << 20) - 3)
h.flush()
"#,
        &srv.uri("disk"),
        &dir.path().join("disk.img"),
    );
    srv.stop();
    want[3_000_000..3_005_000].fill(b'x');
    want[(12 << 20) + 7..(13 << 20) + 7].fill(0);
    want[(16 << 20) - 3..].copy_from_slice(b"end");

    let new = dir.path().join("new.tidx");
    let json = run_ok(&[
        &"commit", &overlay, &"--base", &idx, &"--store", &store, &"--index", &new, &"--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["image_size"], 16 << 20, "{json}");
    assert!(report["chunks_kept"].as_u64().unwrap() > 0, "{json}");
    // The changed blocks and a few neighbours, not the image.
    assert!(report["bytes_read"].as_u64().unwrap() < 4 << 20, "{json}");
    let out = dir.path().join("out.img");
    run_ok(&[&"sync", &new, &out, &"--store", &store, &"-q"]);
    assert!(std::fs::read(&out).unwrap() == want, "the release differs");
    let info = run_ok(&[&"info", &new]);
    assert!(info.contains("image hash     not recorded"), "{info}");

    // A missing overlay is an error, not a new empty overlay.
    let missing = dir.path().join("missing.overlay");
    let err = run_err(&[
        &"commit", &missing, &"--base", &idx, &"--store", &store, &"--index", &new,
    ]);
    assert!(err.contains("missing.overlay"), "{err}");
    assert!(!missing.exists());
}

#[test]
fn unix_socket_mode_is_set_and_planted_files_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let idx = make(dir.path(), "disk", &image_bytes());
    let store = dir.path().join("store");
    // A planted symlink is neither followed nor replaced.
    let target = dir.path().join("target");
    std::fs::write(&target, b"keep").unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = util::run_err(&[&"serve", &"--unix", &link, &idx, &"--store", &store]);
    assert!(
        err.contains("symlink") && err.contains("link.sock"),
        "{err}"
    );
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    let err = util::run_err(&[&"serve", &"--unix", &target, &idx, &"--store", &store]);
    assert!(err.contains("not a socket"), "{err}");
    let err = util::run_err(&[&"serve", &"--unix-mode", &"999", &idx, &"--store", &store]);
    assert!(err.contains("octal"), "{err}");
    // The socket gets --unix-mode.
    let sock = dir.path().join("nbd.sock");
    let mut child = tessera()
        .args(["serve", "--unix-mode", "660", "--unix"])
        .arg(&sock)
        .arg(&idx)
        .arg("--store")
        .arg(&store)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("nbd+unix:///disk?socket="), "{line}");
    let mode = std::fs::symlink_metadata(&sock)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    signal(&child, "INT");
    assert!(wait_for(&mut child, Duration::from_secs(15)).success());
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[test]
fn connection_limit_flags_take_effect() {
    use std::io::Read;
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let idx = make(dir.path(), "disk", &image_bytes());
    let store = dir.path().join("store");
    let err = util::run_err(&[
        &"serve",
        &idx,
        &"--store",
        &store,
        &"--handshake-timeout",
        &"0",
    ]);
    assert!(err.contains("more than 0 seconds"), "{err}");
    let served = Served::start(
        dir.path(),
        &[
            &idx,
            &"--store",
            &store,
            &"--max-connections-per-peer",
            &"1",
            &"--handshake-timeout",
            &"60",
        ],
    );
    // A silent client holds this address's only slot; a new client evicts it.
    let mut silent = std::net::TcpStream::connect(&served.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut greeting = [0u8; 18];
    silent.read_exact(&mut greeting).unwrap();
    sh(Command::new("nbdinfo").arg(served.uri("disk")));
    let mut rest = Vec::new();
    let n = silent.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "the evicted client is closed without data");
    let log = served.log();
    assert!(
        log.contains("evicted for a new connection from the same peer"),
        "{log}"
    );
    served.stop();
}
