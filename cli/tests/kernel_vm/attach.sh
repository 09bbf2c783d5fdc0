# Sourced by init.sh: `tessera attach` (the host's binary, with its
# libraries) serving /data/fs.tidx from the local store /data/store in the guest, and
# configuring the kernel's NBD devices through netlink. Reports `@@ KEY VALUE...` lines.

# Waits until DEVICE has a size (the kernel configured it) while attach process PID
# runs; reports its early exit or a timeout as an error.
wait_attached() {
  i=0
  while [ "$(cat /sys/block/$1/size 2>/dev/null)" = 0 ] || [ ! -e /sys/block/$1/size ]; do
    i=$((i + 1))
    if ! kill -0 "$2" 2>/dev/null; then
      say error "attach $1 exited early: $(tr '\n' ' ' </tmp/$1.log)"
      return 1
    fi
    if [ $i -gt 600 ]; then
      say error "$1 was not attached within 60 s: $(cat /tmp/$1.log | tr '\n' ' ')"
      return 1
    fi
    sleep 0.1
  done
}

# Sockets the attach process holds (its ends of the socket pairs, and a few of its own).
sockets() {
  ls -l /proc/$1/fd | grep -c socket
}

# Stops the attach process PID of DEVICE with `tessera detach` or a signal; reports how
# it exited.
finish() {
  wait "$2"
  say exit "$1" "$?" "$(tr '\n' ' ' </tmp/$1.log)"
}

# 1. One connection: the whole device, and a second attach to the busy device is refused.
tessera attach /data/fs.tidx --store /data/store /dev/nbd4 >/tmp/nbd4.log 2>&1 &
p4=$!
if wait_attached nbd4 $p4; then
  measure attach1 /dev/nbd4
  say sockets one "$(sockets $p4)"
  out=$(tessera attach /data/fs.tidx --store /data/store /dev/nbd4 2>&1)
  say busy "rc=$?" "$(echo "$out" | tr '\n' ' ')"
  try "tessera detach nbd4" tessera detach /dev/nbd4
fi
finish nbd4 $p4

# 2. Four connections.
tessera attach /data/fs.tidx --store /data/store /dev/nbd5 --connections 4 >/tmp/nbd5.log 2>&1 &
p5=$!
if wait_attached nbd5 $p5; then
  measure attach4 /dev/nbd5
  say sockets four "$(sockets $p5)"
  try "tessera detach nbd5" tessera detach /dev/nbd5
fi
finish nbd5 $p5

# 3. An overlay: mounted read-write, written, then SIGTERM (detaches and flushes).
tessera attach /data/fs.tidx --store /data/store /dev/nbd6 --overlay /tmp/fs.overlay >/tmp/nbd6.log 2>&1 &
p6=$!
if wait_attached nbd6 $p6 && try "mount attach rw" mount -t ext4 /dev/nbd6 /mnt; then
  dd if=/dev/urandom of=/mnt/attached.bin bs=4096 count=100 2>/dev/null
  written=$(sha256sum /mnt/attached.bin | cut -d' ' -f1)
  try "umount attach rw" umount /mnt
fi
kill -TERM $p6
finish nbd6 $p6

# 4. The overlay again, read-only: the file written before is there.
tessera attach /data/fs.tidx --store /data/store /dev/nbd7 --overlay /tmp/fs.overlay --readonly >/tmp/nbd7.log 2>&1 &
p7=$!
if wait_attached nbd7 $p7 && try "mount attach ro" mount -t ext4 -o ro /dev/nbd7 /mnt; then
  say reattached "$written" "$(sha256sum /mnt/attached.bin | cut -d' ' -f1)"
  try "umount attach ro" umount /mnt
  out=$(dd if=/dev/zero of=/dev/nbd7 bs=4096 count=1 2>&1)
  say readonly "rc=$?" "$(echo "$out" | head -1)"
fi
kill -INT $p7
finish nbd7 $p7
say uptime overlay "$(cut -d' ' -f1 /proc/uptime)"

# 5. Reconnection: strace makes one read of the in-process server's socket fail
# (ECONNRESET, on the 20th recvfrom of a thread: the first few are the handshake's);
# attach replaces the connection (NBD_CMD_RECONFIGURE) while the kernel holds its
# requests, and the whole device still reads back right. With --seccomp-bpf only
# recvfrom stops the process; one tokio worker thread makes it one failure (strace
# counts per thread). The requests in flight on the failed connection are requeued by
# the kernel when its request timer (30 s) finds the connection replaced: this part
# takes about that long.
TOKIO_WORKER_THREADS=1 strace -f --seccomp-bpf -qq -o /dev/null -e trace=recvfrom \
  -e inject=recvfrom:error=ECONNRESET:when=20 \
  tessera attach /data/fs.tidx --store /data/store /dev/nbd8 >/tmp/nbd8.log 2>&1 &
p8=$!
if wait_attached nbd8 $p8; then
  measure reconnect /dev/nbd8
  # The kernel's view, for the log: the failure, the new socket, the requeued requests.
  dmesg | grep -i nbd8 | tail -8 | while read -r l; do say kmsg "$l"; done
  say replaced "$(grep -c 'connection 0 replaced' /tmp/nbd8.log)"
  try "tessera detach nbd8" tessera detach /dev/nbd8
fi
finish nbd8 $p8

# 6. Detaching a device that does not exist is an error naming it.
out=$(tessera detach /dev/nbd999 2>&1)
say nodevice "rc=$?" "$(echo "$out" | tr '\n' ' ')"
