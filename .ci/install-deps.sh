#!/usr/bin/env bash
# Installs the Debian packages that tessera's tests and demo use. Idempotent: runs
# apt-get only when a package is missing. Needs root (CI is root).
set -euo pipefail

PACKAGES=(
  e2fsprogs      # mkfs.ext4 -d, debugfs: ext4 fixtures
  util-linux     # losetup, blockdev: loop-device tests
  zstd           # zstd -d: chunk files are plain zstd frames
  nginx          # remote store tests: nginx serving a store over HTTP
  casync         # benchmark peer
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
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
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
