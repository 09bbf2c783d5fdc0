#!/bin/sh
# PID 1 of the kernel VM test (cli/tests/kernel_vm.rs): a Debian kernel under qemu, with
# busybox, nbd-client, veritysetup, strace, tessera and their libraries in the
# initramfs. It attaches the exports of the `tessera serve` processes on the host
# (10.0.2.2 through qemu's user networking), then runs `tessera attach` (attach.sh),
# each check once, and prints the results on the serial console as
# lines `@@ KEY VALUE...`, which the test parses and compares with what it knows. It never
# decides pass or fail itself: it reports what it saw. `@@ done` is the last line.
#
# /params (written by the test) sets: RO_PORT (exports `fs` and `tree`), RW_PORT (the
# overlay export `rw`), VERITY_ROOT, BAD_ROOT.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt /run/cryptsetup /tmp
. /params

say() { echo "@@ $*"; }

# Runs a command; its failure is reported as `@@ error WHAT: OUTPUT` (the test fails on
# any error line, quoting it).
try() {
  what=$1
  shift
  if ! out=$("$@" 2>&1); then
    say "error $what: $(echo "$out" | tr '\n' ' ')"
    return 1
  fi
}

# Modules in dependency order (written by the test).
while read -r ko; do
  try "insmod $ko" insmod "$ko"
done </modules

ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
say boot "$(uname -r)"

# size and SHA-256 of a whole block device
# (and the guest's uptime, for the log)
measure() {
  say size "$1" "$(blockdev --getsize64 "$2")"
  say sha256 "$1" "$(sha256sum "$2" | cut -d' ' -f1)"
  say uptime "$1" "$(cut -d' ' -f1 /proc/uptime)"
}

# 1. Attach, one connection and four.
try "nbd-client fs" nbd-client -N fs 10.0.2.2 "$RO_PORT" /dev/nbd0 -b 4096 -readonly &&
  measure nbd0 /dev/nbd0
try "nbd-client -C 4 fs" nbd-client -N fs 10.0.2.2 "$RO_PORT" /dev/nbd1 -b 4096 -readonly -C 4 &&
  measure nbd1 /dev/nbd1
# TCP connections to the server: one for nbd0, four for nbd1
say connections "$(netstat -tn | grep -c "10.0.2.2:$RO_PORT .*ESTABLISHED")"

# 2. The ext4 file system, read-only: every entry, and the hash of every regular file.
if try "mount ro" mount -t ext4 -o ro /dev/nbd0 /mnt; then
  (cd /mnt && find . ! -type f | sort | while read -r p; do say entry "$p"; done)
  (cd /mnt && find . -type f | sort | while read -r p; do
    say file "$(sha256sum "$p" | cut -d' ' -f1)" "$p"
  done)
  try "umount ro" umount /mnt
fi

# 3. dm-verity over the attached image, with the tree served as a second export.
if try "nbd-client tree" nbd-client -N tree 10.0.2.2 "$RO_PORT" /dev/nbd2 -b 4096 -readonly; then
  if try "veritysetup open" veritysetup open /dev/nbd0 good /dev/nbd2 "$VERITY_ROOT"; then
    measure verity /dev/mapper/good
    try "veritysetup close" veritysetup close good
  fi
  # A wrong root hash: the table loads, every read fails.
  if try "veritysetup open bad" veritysetup open /dev/nbd1 bad /dev/nbd2 "$BAD_ROOT"; then
    out=$(dd if=/dev/mapper/bad of=/dev/null bs=4096 count=1 2>&1)
    say badroot "rc=$?" "$(echo "$out" | head -1)"
    try "veritysetup close bad" veritysetup close bad
  fi
  try "nbd-client -d tree" nbd-client -d /dev/nbd2
fi
try "nbd-client -d nbd0" nbd-client -d /dev/nbd0
try "nbd-client -d nbd1" nbd-client -d /dev/nbd1

# 4. The overlay export, read-write: write a file, delete one, sync, detach.
if try "nbd-client rw" nbd-client -N rw 10.0.2.2 "$RW_PORT" /dev/nbd3 -b 4096; then
  if try "mount rw" mount -t ext4 /dev/nbd3 /mnt; then
    dd if=/dev/urandom of=/mnt/from-the-vm.bin bs=4096 count=300 2>/dev/null
    say wrote "$(sha256sum /mnt/from-the-vm.bin | cut -d' ' -f1)"
    victim=$(cd /mnt && find . -type f | sort | head -1)
    try "rm" rm "/mnt/$victim" && say removed "$victim"
    sync
    try "umount rw" umount /mnt
  fi
  try "nbd-client -d rw" nbd-client -d /dev/nbd3
fi

# 5. tessera attach, detach, reconnection.
. /attach.sh

say uptime done "$(cut -d' ' -f1 /proc/uptime)"
say done
poweroff -f
