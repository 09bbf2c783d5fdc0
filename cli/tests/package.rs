//! The Debian package: packaging/build-deb.sh packs the binary under test (no second
//! build), `dpkg -i` installs it, and the installed tool, man pages, completions and
//! systemd units work; then it is removed. Needs root, cargo-deb, strip, man-db and
//! systemd-analyze (.ci/install-deps.sh installs them).

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;
use util::*;

const COMMANDS: [&str; 10] = [
    "make", "check", "prune", "serve", "sync", "verify", "info", "keygen", "sign", "verity",
];

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the package however the test ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-r", "tessera"]).output();
    }
}

#[test]
fn the_deb_installs_the_tool_its_man_pages_completions_and_units() {
    let cargo_deb = on_path("cargo-deb");
    if skip_unless(is_root(), "root (dpkg -i)")
        || skip_unless(cargo_deb, "cargo-deb (cargo install cargo-deb)")
        || skip_unless(on_path("strip"), "strip (binutils)")
        || skip_unless(on_path("man"), "man (man-db)")
        || skip_unless(on_path("systemd-analyze"), "systemd-analyze (systemd)")
    {
        return;
    }
    let installed_before = Command::new("dpkg-query")
        .args(["-W", "tessera"])
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        !installed_before,
        "a tessera package is already installed: this test would remove it"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = TempDir::new().unwrap();
    ok(Command::new(root.join("packaging/build-deb.sh"))
        .arg(env!("CARGO_BIN_EXE_tessera"))
        .arg(out.path()));
    let deb: PathBuf = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb was written");

    let _installed = Installed;
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    let version = ok(Command::new("/usr/bin/tessera").arg("--version"));
    assert_eq!(
        version.trim(),
        format!("tessera {}", env!("CARGO_PKG_VERSION"))
    );
    let page = ok(Command::new("man").args(["-w", "tessera-sync"]));
    assert_eq!(page.trim(), "/usr/share/man/man1/tessera-sync.1.gz");
    for c in COMMANDS {
        ok(Command::new("man").args(["-w", &format!("tessera-{c}")]));
    }
    // The page is the command's --help: a flag of this branch is documented there.
    let text = ok(Command::new("sh").arg("-c").arg("man tessera-sync | cat"));
    assert!(text.contains("--progress"), "{text}");
    let hidden = Command::new("man")
        .args(["-w", "tessera-generate"])
        .output()
        .unwrap();
    assert!(!hidden.status.success(), "the hidden generator has no page");

    let completion = ok(Command::new("bash")
        .arg("-c")
        .arg("source /usr/share/bash-completion/completions/tessera && complete -p tessera"));
    assert!(completion.contains("_tessera"), "{completion}");
    for path in [
        "/usr/share/zsh/vendor-completions/_tessera",
        "/usr/share/fish/vendor_completions.d/tessera.fish",
        "/usr/share/doc/tessera/examples/sync.env",
    ] {
        assert!(Path::new(path).is_file(), "{path} not installed");
    }

    // The units as an instance would run them: systemd-analyze finds nothing to say.
    let units = TempDir::new().unwrap();
    for ext in ["service", "timer"] {
        std::fs::copy(
            format!("/usr/lib/systemd/system/tessera-sync@.{ext}"),
            units.path().join(format!("tessera-sync@demo.{ext}")),
        )
        .unwrap();
    }
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.path().join("tessera-sync@demo.service"))
        .arg(units.path().join("tessera-sync@demo.timer"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");

    drop(_installed);
    assert!(
        !Path::new("/usr/bin/tessera").exists(),
        "dpkg -r left the binary"
    );
}
