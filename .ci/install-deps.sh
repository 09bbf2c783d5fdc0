#!/usr/bin/env bash
# Installs the Debian packages that tessera's tests and demo use. Idempotent: runs
# apt-get only when a package is missing. Needs root (CI is root).
set -euo pipefail

PACKAGES=(
  e2fsprogs      # mkfs.ext4 -d, debugfs: ext4 fixtures
  util-linux     # losetup, blockdev: loop-device tests
  zstd           # zstd -d: chunk files are plain zstd frames
  nginx          # remote store tests: nginx serving a store over HTTP
  openssl        # http_auth, serve_tls tests: htpasswd hashes, a private CA, server and client certs
  casync         # benchmark peer; casync tests: indexes and stores made by casync make
  liblzma-dev    # build: xz decompression of casync chunks (xz2 links the system liblzma)
  pkg-config     # build: finds liblzma
  time           # /usr/bin/time -v: peak memory in benchmarks
  minisign       # trust tests: signatures cross-checked both ways
  cryptsetup-bin # trust tests: veritysetup format/verify of dm-verity trees
  qemu-utils     # NBD tests: qemu-img convert, qemu-io; benchmark peer qemu-nbd
  libnbd-bin     # NBD tests: nbdinfo, nbdcopy, nbdsh, nbdfuse
  python3-libnbd # NBD tests: nbdsh scripts
  nbd-client     # NBD tests: nbd-client -l
  nbdkit         # NBD benchmark peer: nbdkit file
  fuse3          # NBD tests: fusermount3 for nbdfuse mounts
  strace         # durability tests: the order of fsync, rename and directory fsync
  qemu-system-x86 # kernel VM test: boots a Debian kernel (software emulation)
  busybox-static # kernel VM test: the guest's userland
  man-db         # package test: man -w tessera-sync after dpkg -i
  binutils       # package test: strip for the packaged binary
  systemd        # package test: systemd-analyze verify of the example units
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # qemu-system-x86 and qemu-utils in one transaction at the same version: a newer
  # (backported) qemu-utils breaks the distribution's qemu-system-common, so installing
  # qemu-system-x86 alone would remove qemu-img.
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    pinned=("qemu-system-x86=$v" "qemu-utils=$v")
    for p in "${missing[@]}"; do
      [[ $p == qemu-system-x86 || $p == qemu-utils ]] || pinned+=("$p")
    done
    missing=("${pinned[@]}")
  fi
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}"
fi
qemu-img --version >/dev/null

# The kernel VM test (cli/tests/kernel_vm.rs) boots Debian's kernel: the package that
# linux-image-amd64 currently names is downloaded (not installed) and unpacked into
# $TESSERA_VM_CACHE/PACKAGE, and $TESSERA_VM_CACHE/current links to it. Done once; the
# kernel then stays as it is.
vm_cache=${TESSERA_VM_CACHE:-/var/cache/tessera-vm}
if [[ ! -d "$vm_cache/current/boot" ]]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  [[ -n "$kpkg" ]] || { echo "no linux-image-*-amd64 package behind linux-image-amd64" >&2; exit 1; }
  echo "downloading: $kpkg (for the kernel VM test, into $vm_cache)"
  mkdir -p "$vm_cache"
  tmp=$(mktemp -d "$vm_cache/.tmp-XXXXXX")
  # apt warns that it downloads as root outside its sandbox: expected here.
  (cd "$tmp" && apt-get download -q "$kpkg" 2>&1 | grep -v 'unsandboxed' || true)
  dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/root"
  rm -rf "${vm_cache:?}/$kpkg"
  mv "$tmp/root" "$vm_cache/$kpkg"
  rm -rf "$tmp"
  ln -sfn "$kpkg" "$vm_cache/current"
fi

# cargo-deb (crates.io) builds the Debian package in the package test.
if ! command -v cargo-deb >/dev/null; then
  echo "installing: cargo-deb (crates.io)"
  cargo install --locked --quiet cargo-deb
fi

# moto's S3-compatible server (PyPI, pinned) for the S3 store tests.
if ! python3 -c 'import moto.server, flask_cors' 2>/dev/null; then
  echo "installing: moto[server]==5.2.1 (PyPI)"
  python3 -m pip install --quiet 'moto[server]==5.2.1' ||
    python3 -m pip install --quiet --break-system-packages 'moto[server]==5.2.1'
fi
