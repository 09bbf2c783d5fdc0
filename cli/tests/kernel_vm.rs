//! The Linux kernel's NBD client against `tessera serve`, for real: a Debian kernel boots
//! under `qemu-system-x86_64` (software emulation) with a small initramfs (busybox,
//! `nbd-client`, `veritysetup`, `strace`, the `tessera` under test and their libraries,
//! the nbd, dm-verity and ext4 modules of the unpacked kernel package) and reaches the
//! servers on the host through qemu's user networking, then runs `tessera attach` in the
//! guest. One boot runs every check (`kernel_vm/init.sh`, `kernel_vm/attach.sh`) and
//! prints what it saw on the serial console; this test compares that with the image.
//!
//! The kernel package is downloaded and unpacked by `.ci/install-deps.sh` into
//! `$TESSERA_VM_CACHE` (default `/var/cache/tessera-vm`), `current/` naming it.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::Permissions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_fixtures::{Fixtures, Params};
use util::{run_ok, sh, skip_unless, tessera};

/// Where `.ci/install-deps.sh` unpacks the kernel package.
fn kernel_cache() -> PathBuf {
    std::env::var_os("TESSERA_VM_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/tessera-vm"), PathBuf::from)
        .join("current")
}

/// The guest scripts, next to this file.
fn guest_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/kernel_vm")
        .join(name)
}

/// The path of `tool` in PATH or the sbin directories, if it is there.
fn which(tool: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The kernel image and modules directory, and every host tool the test needs; `None`
/// (a skip, or a failure under CI=true) when something is missing.
fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    for tool in [
        "qemu-system-x86_64",
        "busybox",
        "nbd-client",
        "veritysetup",
        "debugfs",
        "e2fsck",
        "nbdcopy",
        "sha256sum",
        "ldd",
        "strip",
        "strace",
    ] {
        if skip_unless(which(tool).is_some(), tool) {
            return None;
        }
    }
    let static_busybox = Command::new("ldd")
        .arg(which("busybox")?)
        .output()
        .is_ok_and(|o| !o.status.success());
    if skip_unless(static_busybox, "a static busybox (busybox-static)") {
        return None;
    }
    let cache = kernel_cache();
    let first = |dir: PathBuf, prefix: &str| {
        std::fs::read_dir(dir).ok().and_then(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        })
    };
    let kernel = first(cache.join("boot"), "vmlinuz-");
    let modules = first(cache.join("lib/modules"), "");
    let found = kernel.is_some() && modules.is_some();
    let what = format!(
        "a Debian kernel package unpacked in {} (run .ci/install-deps.sh)",
        cache.display()
    );
    if skip_unless(found, &what) {
        return None;
    }
    Some((kernel?, modules?))
}

fn sha256(path: &Path) -> String {
    sh(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A `tessera serve` child process listening on a free port; killed when dropped.
struct Served {
    child: Child,
    _stdout: BufReader<std::process::ChildStdout>,
    port: u16,
    stderr: PathBuf,
}

impl Served {
    fn start(dir: &Path, tag: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Served {
        let stderr = dir.join(format!("serve-{tag}.err"));
        let mut child = tessera()
            .arg("serve")
            .args(args.iter().map(|a| a.as_ref()))
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting tessera serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let port = line
            .split("nbd://127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no address in {line:?}: {}",
                    std::fs::read_to_string(&stderr).unwrap()
                )
            });
        Served {
            child,
            _stdout: stdout,
            port,
            stderr,
        }
    }

    /// SIGTERM; the server must exit 0 (it flushes its overlay first).
    fn stop(mut self) {
        sh(Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string()));
        let status = wait(&mut self.child, Duration::from_secs(30))
            .expect("tessera serve did not exit within 30 s of SIGTERM");
        assert!(
            status.success(),
            "serve exited with {status}: {}",
            std::fs::read_to_string(&self.stderr).unwrap()
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

/// Waits for `child`; kills it and returns `None` after `limit` (a hung guest or server
/// must not hang the suite).
fn wait(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The modules `wanted` and everything they depend on (from the `depends=` of each
/// module's `.modinfo`), in an order that loads dependencies first.
fn module_closure(modules: &Path, wanted: &[&str]) -> Vec<PathBuf> {
    let mut by_name = BTreeMap::new();
    let mut stack = vec![modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().unwrap().to_str() {
                if let Some(stem) = name.strip_suffix(".ko") {
                    by_name.insert(stem.replace('-', "_"), path.clone());
                }
            }
        }
    }
    fn visit(
        name: &str,
        by_name: &BTreeMap<String, PathBuf>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) {
        let name = name.replace('-', "_");
        if done.contains(&name) {
            return;
        }
        let path = by_name
            .get(&name)
            .unwrap_or_else(|| panic!("module {name} not found in the kernel package"));
        let bytes = std::fs::read(path).unwrap();
        let key = b"\0depends=";
        let deps = bytes
            .windows(key.len())
            .position(|w| w == key)
            .map(|at| {
                let rest = &bytes[at + key.len()..];
                let end = rest.iter().position(|&b| b == 0).unwrap();
                String::from_utf8(rest[..end].to_vec()).unwrap()
            })
            .unwrap_or_default();
        for dep in deps.split(',').filter(|d| !d.is_empty()) {
            visit(dep, by_name, done, order);
        }
        done.insert(name);
        order.push(path.clone());
    }
    let (mut done, mut order) = (BTreeSet::new(), Vec::new());
    for name in wanted {
        visit(name, &by_name, &mut done, &mut order);
    }
    order
}

/// Copies `file` to the same path under `root`, following links.
fn copy_in(root: &Path, file: &Path) {
    let dest = root.join(file.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(file, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", file.display()));
}

/// Copies the libraries `ldd` names for the dynamically linked `binary`.
fn copy_libraries(root: &Path, binary: &Path) {
    for line in sh(Command::new("ldd").arg(binary)).lines() {
        let lib = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
            copy_in(root, Path::new(lib));
        }
    }
}

/// Copies the directory `from` to `to`, recursively.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// Builds the initramfs (an uncompressed newc cpio archive) in DIR/initramfs.cpio, with
/// the tessera binary under test (stripped) and `data` as /data.
fn initramfs(dir: &Path, modules: &Path, params: &str, data: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    for sub in ["bin", "sbin", "proc", "sys", "dev", "lib/modules"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy(which("busybox").unwrap(), root.join("bin/busybox")).unwrap();
    let applets = sh(Command::new(root.join("bin/busybox")).arg("--list"));
    for applet in applets.lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    for tool in ["nbd-client", "veritysetup", "strace"] {
        let path = which(tool).unwrap();
        copy_in(&root, &path);
        copy_libraries(&root, &path);
    }
    let tessera = Path::new(env!("CARGO_BIN_EXE_tessera"));
    copy_libraries(&root, tessera);
    sh(Command::new("strip")
        .arg("-o")
        .arg(root.join("bin/tessera"))
        .arg(tessera));
    copy_tree(data, &root.join("data"));
    let wanted = ["e1000", "nbd", "crc32c_generic", "ext4", "dm_verity"];
    let mut list = String::new();
    for ko in module_closure(modules, &wanted) {
        let inside = Path::new("/lib/modules").join(ko.file_name().unwrap());
        std::fs::copy(&ko, root.join(inside.strip_prefix("/").unwrap())).unwrap();
        list.push_str(&format!("{}\n", inside.display()));
    }
    std::fs::write(root.join("modules"), list).unwrap();
    std::fs::write(root.join("params"), params).unwrap();
    for (script, name) in [("init.sh", "init"), ("attach.sh", "attach.sh")] {
        std::fs::copy(guest_file(script), root.join(name)).unwrap();
        std::fs::set_permissions(root.join(name), Permissions::from_mode(0o755)).unwrap();
    }
    let cpio = dir.join("initramfs.cpio");
    sh(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | busybox cpio -o -H newc > {}",
        cpio.display()
    )));
    cpio
}

/// What the guest printed: `@@ KEY REST` lines, by key, in order.
struct Report {
    console: String,
    lines: Vec<(String, String)>,
}

impl Report {
    fn parse(console: String) -> Report {
        let lines = console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').split_once("@@ "))
            .map(|(_, rest)| {
                let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
                (key.to_string(), value.to_string())
            })
            .collect();
        Report { console, lines }
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the one `@@ KEY ...` line starting with `prefix`.
    fn one(&self, key: &str, prefix: &str) -> &str {
        let found: Vec<_> = self
            .all(key)
            .into_iter()
            .filter_map(|v| v.strip_prefix(prefix))
            .collect();
        assert!(
            found.len() == 1,
            "expected one `@@ {key} {prefix}...` line, got {found:?}; console:\n{}",
            self.console
        );
        found[0].trim()
    }
}

/// How long the VM may run (it takes well under a minute on a 2-core machine).
const VM_LIMIT_SECS: u64 = 300;

/// Boots the VM and returns what its console showed.
fn boot(dir: &Path, kernel: &Path, initramfs: &Path) -> Report {
    let console = dir.join("console.log");
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "768",
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-nic", "user,model=e1000"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.err")).unwrap())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let status = wait(&mut qemu, Duration::from_secs(VM_LIMIT_SECS));
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!("VM ran for {:?}", started.elapsed());
    let status = status.unwrap_or_else(|| {
        panic!("the VM did not finish within {VM_LIMIT_SECS} s; console:\n{console}")
    });
    assert!(
        status.success(),
        "qemu exited with {status}: {}\nconsole:\n{console}",
        std::fs::read_to_string(dir.join("qemu.err")).unwrap()
    );
    let report = Report::parse(console);
    for (key, value) in &report.lines {
        eprintln!("guest: {key} {value}");
    }
    assert!(
        report.all("done").len() == 1,
        "the guest did not finish; console:\n{}",
        report.console
    );
    let errors = report.all("error");
    assert!(
        errors.is_empty(),
        "errors in the guest: {errors:#?}; console:\n{}",
        report.console
    );
    report
}

/// Every path under `root` as the guest lists it (`./a/b`): regular files with their
/// SHA-256, and everything else.
fn host_tree(root: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let list = |kind: &str| {
        sh(Command::new("sh")
            .current_dir(root)
            .arg("-c")
            .arg(format!("find . {kind}")))
    };
    let entries = list("! -type f").lines().map(String::from).collect();
    let files = list("-type f")
        .lines()
        .map(|p| format!("{} {p}", sha256(&root.join(p))))
        .collect();
    (entries, files)
}

#[test]
fn the_kernel_attaches_mounts_and_verifies_tessera_exports() {
    let Some((kernel, modules)) = prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let image = Fixtures::from_env()
        .ext4(Params::default())
        .expect("building the ext4 fixture")
        .old;
    let image_sha = sha256(&image);
    let image_len = std::fs::metadata(&image).unwrap().len();
    let store = dir.join("store");
    let index = dir.join("fs.tidx");
    run_ok(&[
        &"make", &"-q", &"--store", &store, &"--index", &index, &image,
    ]);

    // The dm-verity tree, made into an image of its own and served next to the disk.
    let tree = dir.join("tree.img");
    let verity = run_ok(&[&"verity", &"--json", &"--hash-file", &tree, &index, &image]);
    let verity: serde_json::Value = serde_json::from_str(&verity).unwrap();
    let root = verity["verity_root_hash"].as_str().unwrap().to_string();
    let bad_root = format!(
        "{}{}",
        if &root[..1] == "0" { "1" } else { "0" },
        &root[1..]
    );
    let tree_index = dir.join("tree.tidx");
    run_ok(&[
        &"make",
        &"-q",
        &"--store",
        &store,
        &"--index",
        &tree_index,
        &tree,
    ]);

    // The files the guest must find.
    let host = dir.join("host-tree");
    std::fs::create_dir(&host).unwrap();
    sh(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", host.display()))
        .arg(&image));
    let (entries, files) = host_tree(&host);

    let read_only = Served::start(dir, "ro", &[&index, &tree_index, &"--store", &store]);
    let overlay = dir.join("fs.overlay");
    let writable = Served::start(
        dir,
        "rw",
        &[
            &index,
            &"--store",
            &store,
            &"--overlay",
            &overlay,
            &"--name",
            &"rw",
        ],
    );
    let params = format!(
        "RO_PORT={}\nRW_PORT={}\nVERITY_ROOT={root}\nBAD_ROOT={bad_root}\n",
        read_only.port, writable.port
    );
    // For `tessera attach` in the guest: the index and its store.
    let data = dir.join("data");
    copy_tree(&store, &data.join("store"));
    std::fs::copy(&index, data.join("fs.tidx")).unwrap();
    let initramfs = initramfs(dir, &modules, &params, &data);
    let report = boot(dir, &kernel, &initramfs);
    read_only.stop();
    writable.stop();

    // 1. Both attachments: the whole image, byte for byte, over one connection and four.
    for dev in ["nbd0", "nbd1", "verity"] {
        assert_eq!(report.one("size", dev), image_len.to_string(), "{dev}");
        assert_eq!(report.one("sha256", dev), image_sha, "{dev}");
    }
    assert_eq!(report.one("connections", ""), "5", "1 for nbd0, 4 for nbd1");
    // 2. Every entry and every file's contents through the kernel's ext4.
    let guest_entries: BTreeSet<String> =
        report.all("entry").into_iter().map(String::from).collect();
    let guest_files: BTreeSet<String> = report.all("file").into_iter().map(String::from).collect();
    assert_eq!(guest_entries, entries);
    assert_eq!(guest_files, files);
    assert!(
        files.len() > 20,
        "only {} files in the fixture",
        files.len()
    );
    // 3. dm-verity: the good root read everything (above); a wrong one fails every read.
    let bad = report.one("badroot", "");
    assert!(
        !bad.starts_with("rc=0") && bad.contains("Input/output error"),
        "{bad}"
    );

    // 4. The overlay took the guest's writes: its view on the host has the new file, not
    // the removed one, and a clean file system; the image itself is untouched.
    let wrote = report.one("wrote", "");
    let removed = report
        .one("removed", "")
        .trim_start_matches("./")
        .to_string();
    let view_server = Served::start(
        dir,
        "view",
        &[
            &index,
            &"--store",
            &store,
            &"--overlay",
            &overlay,
            &"--readonly",
        ],
    );
    let view = dir.join("view.img");
    sh(Command::new("nbdcopy")
        .arg(format!("nbd://127.0.0.1:{}/fs", view_server.port))
        .arg(&view));
    view_server.stop();
    let written = dir.join("from-the-vm.bin");
    sh(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /from-the-vm.bin {}", written.display()))
        .arg(&view));
    assert_eq!(sha256(&written), wrote);
    let stat = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat /{removed}"))
        .arg(&view)
        .output()
        .unwrap();
    let stat =
        String::from_utf8_lossy(&stat.stderr).into_owned() + &String::from_utf8_lossy(&stat.stdout);
    assert!(stat.contains("File not found"), "{removed}: {stat}");
    sh(Command::new("e2fsck").args(["-f", "-n"]).arg(&view));
    assert_eq!(sha256(&image), image_sha, "the image changed");

    // 5. `tessera attach` in the guest: the whole image over one connection and four,
    // the busy device refused, detach and signals ending it with status 0, and the
    // overlay's writes kept across attachments while --readonly refuses new ones.
    for dev in ["attach1", "attach4", "reconnect"] {
        assert_eq!(report.one("size", dev), image_len.to_string(), "{dev}");
        assert_eq!(report.one("sha256", dev), image_sha, "{dev}");
    }
    let sockets = |n| report.one("sockets", n).parse::<i64>().unwrap();
    assert_eq!(
        sockets("four") - sockets("one"),
        3,
        "one socket pair per connection"
    );
    let busy = report.one("busy", "");
    assert!(
        busy.starts_with("rc=1")
            && busy.contains("/dev/nbd4: the kernel refused NBD_CMD_CONNECT")
            && busy.contains("in use"),
        "{busy}"
    );
    for dev in ["nbd4 ", "nbd5 ", "nbd6 ", "nbd7 ", "nbd8 "] {
        let exit = report.one("exit", dev);
        assert!(exit.starts_with("0 "), "attach {dev}exited: {exit}");
        assert!(exit.contains("detached /dev/"), "attach {dev}: {exit}");
    }
    let (before, after) = report.one("reattached", "").split_once(' ').unwrap();
    assert_eq!(before.len(), 64, "nothing written through the overlay");
    assert_eq!(
        before, after,
        "the overlay lost the file written before SIGTERM"
    );
    let replaced: u32 = report.one("replaced", "").parse().unwrap();
    assert_eq!(
        replaced, 1,
        "connections replaced after the injected failure"
    );
    let nodevice = report.one("nodevice", "");
    assert!(
        nodevice.starts_with("rc=1")
            && nodevice.contains("/dev/nbd999: the kernel refused NBD_CMD_DISCONNECT"),
        "{nodevice}"
    );
    let readonly = report.one("readonly", "");
    assert!(
        !readonly.starts_with("rc=0")
            && ["not permitted", "Permission denied", "Read-only"]
                .iter()
                .any(|m| readonly.contains(m)),
        "{readonly}"
    );
}
