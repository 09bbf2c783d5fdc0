#!/usr/bin/env bash
# Remote boot: a 1 GiB ext4 image attached from an HTTP server ~20 ms away, `tessera serve`
# (from a tessera store, with --cache DIR) beside `nbdkit curl` + its `cache` filter (on the
# raw image), both behind the same nginx and the same latency proxy, in the same run. Run by
# hand as root (not part of the test suite):
#
#   benches/remote-boot.sh
#   DELAY_MS=50 FILES=100 READS=1000 benches/remote-boot.sh
#   FIXTURES=/elsewhere/target/fixtures benches/remote-boot.sh   # or IMG=any.img
#
# Needs: cargo, nginx, nbdkit (curl and file plugins, cache filter), libnbd-bin
# (nbdfuse, nbdcopy), python3-libnbd for /usr/bin/python3, fuse3, e2fsprogs, util-linux
# (losetup, mount), root (loop devices, mount).
#
# Image: the `new.img` of the 1 GiB ext4 fixture pair (benches/remote.sh builds it), never
# modified. Published as a tessera store (default chunk sizes, zstd) and as the raw image
# in the same nginx root; every request crosses benches/latency-proxy.py (DELAY_MS added
# per request; a fresh proxy per server, so its request and byte counts are that server's).
# Each measurement starts a fresh server with an empty cache (tessera: empty --cache DIR,
# default --cache-size; nbdkit: `cache-on-read=true`, cache file in an empty TMPDIR):
#   boot    from starting the server until a fixed set of FILES files of the ext4 (chosen
#           deterministically: every n-th regular file in path order) has been read through
#           nbdfuse + a read-only loop device + a read-only ext4 mount (files checked
#           against sha256 of the same files in the image);
#   random  READS reads of 4 KiB at seeded uniform offsets, one at a time
#           (benches/remote-boot.py, libnbd; every block compared with the image): p50, p99;
#   full    nbdcopy --no-extents URI null: cold (fresh server), then warm (same server,
#           again), beside a warm read of the local raw image by `nbdkit file`.
# The markdown section for benches/RESULTS.md is printed and written to $WORK/remote-boot.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DELAY_MS=${DELAY_MS:-20}
FILES=${FILES:-50}
READS=${READS:-300}
SEED=${SEED:-1}
WORK=${WORK:-$ROOT/target/bench/remote-boot}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
IMG=${IMG:-$FIXTURES/ext4-seed0-size1073741824-v1-e2fs1.47.0/new.img}
TESSERA=$ROOT/target/release/tessera
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
PY=/usr/bin/python3

for tool in nbdkit nbdfuse nbdcopy nbdinfo fusermount3 losetup mount "$NGINX" sha256sum bc; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "run as root (loop devices, mount)" >&2; exit 1; }
[[ -f $IMG ]] || { echo "no image at $IMG (build the ext4 fixture pair: benches/remote.sh)" >&2; exit 1; }
$PY -c 'import nbd' || { echo "missing python3-libnbd for $PY" >&2; exit 1; }
nbdkit curl --dump-plugin >/dev/null 2>&1 \
    || { echo "missing the nbdkit curl plugin (apt-get install nbdkit; nbdkit-plugin-curl on some releases)" >&2; exit 1; }

echo "== building (release)" >&2
cargo build --release -q -p tessera-cli --manifest-path "$ROOT/Cargo.toml"

BYTES=$(stat -c %s "$IMG")
rm -rf "$WORK"
mkdir -p "$WORK/www/t" "$WORK/nginx" "$WORK/mnt"
W=$WORK/www
ln -s "$IMG" "$W/raw.img"

PIDS=() MOUNTS=() LOOPS=() FUSES=()
cleanup() {
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || true; done
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    for f in "${FUSES[@]}"; do fusermount3 -u "$f" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== choosing $FILES files" >&2
REF=$WORK/mnt/ref
mkdir -p "$REF"
LOOP=$(losetup -r --find --show "$IMG")
LOOPS+=("$LOOP")
mount -o ro,noload "$LOOP" "$REF"
MOUNTS+=("$REF")
(cd "$REF" && find . -type f -size +0 | LC_ALL=C sort) >"$WORK/all-files"
TOTAL=$(wc -l <"$WORK/all-files")
awk -v n="$FILES" -v t="$TOTAL" 'NR % int(t / n) == 0 && c < n {print; c++}' "$WORK/all-files" >"$WORK/files"
(cd "$REF" && xargs -d '\n' sha256sum <"$WORK/files") >"$WORK/files.sha256"
FILE_BYTES=$(cd "$REF" && xargs -d '\n' stat -c %s <"$WORK/files" | awk '{s += $1} END {print s}')
umount "$REF"; MOUNTS=()
losetup -d "$LOOP"; LOOPS=()

echo "== publishing" >&2
"$TESSERA" make -q "$IMG" --store "$W/t" --index "$W/t/img.tidx"
STORE_BYTES=$(du -sb "$W/t" | cut -f1)

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() {
    for _ in $(seq 300); do
        $PY -c "import socket; socket.create_connection(('127.0.0.1',$1))" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listening on port $1" >&2; exit 1
}
NGINX_PORT=$(free_port)
cat >"$WORK/nginx/nginx.conf" <<CONF
daemon off;
master_process off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/t1; proxy_temp_path $WORK/nginx/t2;
  fastcgi_temp_path $WORK/nginx/t3; uwsgi_temp_path $WORK/nginx/t4; scgi_temp_path $WORK/nginx/t5;
  keepalive_requests 1000000;
  sendfile on;
  server { listen 127.0.0.1:$NGINX_PORT; root $W; }
}
CONF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
PIDS+=($!)
wait_tcp "$NGINX_PORT"
cat "$IMG" >/dev/null
find "$W/t" -type f -exec cat {} + >/dev/null

PROXY_PID=
start_proxy() {
    PROXY_PORT=$(free_port)
    $PY "$ROOT/benches/latency-proxy.py" "$PROXY_PORT" "$NGINX_PORT" "$DELAY_MS" "$WORK/proxy.stats" &
    PROXY_PID=$!
    wait_tcp "$PROXY_PORT"
    URL=http://127.0.0.1:$PROXY_PORT
}
# stop_proxy NAME: records "requests bytes_down" of the proxy in $WORK/NAME.req
stop_proxy() {
    kill -TERM "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true; PROXY_PID=
    cut -d' ' -f1,2 "$WORK/proxy.stats" >"$WORK/$1.req"
}

# start_server KIND: a fresh server (and proxy) with an empty cache, on $SPORT
start_server() {
    SPORT=$(free_port)
    case $1 in
    tessera)
        start_proxy
        rm -rf "$WORK/tcache"
        "$TESSERA" serve "$URL/t/img.tidx" --store "$URL/t" --cache "$WORK/tcache" \
            --listen "127.0.0.1:$SPORT" -q 2>"$WORK/tessera.err" &
        ;;
    nbdkit)
        start_proxy
        rm -rf "$WORK/kcache"; mkdir -p "$WORK/kcache"
        TMPDIR=$WORK/kcache nbdkit --foreground --readonly --ipaddr 127.0.0.1 --port "$SPORT" \
            --exportname img --filter=cache curl "$URL/raw.img" cache-on-read=true \
            2>"$WORK/nbdkit.err" &
        ;;
    file)
        nbdkit --foreground --readonly --ipaddr 127.0.0.1 --port "$SPORT" --exportname img \
            file "$IMG" 2>"$WORK/file.err" &
        ;;
    esac
    SPID=$!
    PIDS+=("$SPID")
    wait_tcp "$SPORT"
    SURI=nbd://127.0.0.1:$SPORT/img
}
# CPU seconds (user + sys) the server has used so far.
cpu_server() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$SPID/stat"; }
# stop_server NAME: records the server's CPU seconds in $WORK/NAME.cpu, and its proxy's counts
stop_server() {
    cpu_server >"$WORK/$1.cpu"
    kill -TERM "$SPID"; wait "$SPID" 2>/dev/null || true
    [[ -n $PROXY_PID ]] && stop_proxy "$1"
    return 0
}
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l | xargs printf '%.2f'; }

# boot KIND: server start to FILES files read through nbdfuse + loop + ext4
boot() {
    local t0 fuse=$WORK/mnt/fuse-$1 at=$WORK/mnt/ext4-$1
    mkdir -p "$fuse" "$at"
    t0=$(now)
    start_server "$1"
    rm -f "$WORK/fuse.pid"
    nbdfuse -r -P "$WORK/fuse.pid" "$fuse" "$SURI" &
    local fpid=$!
    FUSES+=("$fuse")
    for _ in $(seq 600); do [[ -s $WORK/fuse.pid ]] && break; sleep 0.02; done
    [[ -s $WORK/fuse.pid ]] || { echo "nbdfuse did not mount $SURI" >&2; exit 1; }
    LOOP=$(losetup -r --find --show "$fuse/nbd")
    LOOPS+=("$LOOP")
    mount -o ro,noload "$LOOP" "$at"
    MOUNTS+=("$at")
    (cd "$at" && sha256sum --quiet -c "$WORK/files.sha256") \
        || { echo "$1: files read through nbdfuse differ from the image" >&2; exit 1; }
    since "$t0" >"$WORK/boot-$1.s"
    umount "$at"; MOUNTS=()
    losetup -d "$LOOP"; LOOPS=()
    fusermount3 -u "$fuse"; FUSES=()
    wait "$fpid" 2>/dev/null || true
    stop_server "boot-$1"
}

# random KIND: READS random 4 KiB reads on a fresh server
random_reads() {
    start_server "$1"
    $PY "$ROOT/benches/remote-boot.py" "$SURI" "$READS" "$SEED" "$IMG" >"$WORK/random-$1.out"
    stop_server "random-$1"
}

# copy: wall seconds of one full nbdcopy of $SURI
copy() {
    local t0
    t0=$(now)
    nbdcopy --no-extents "$SURI" null:
    since "$t0"
}
# full KIND: cold then warm full read
full() {
    start_server "$1"
    local c0
    c0=$(cpu_server)
    copy >"$WORK/cold-$1.s"
    echo "$(cpu_server) - $c0" | bc -l | xargs printf '%.2f' >"$WORK/cold-$1.cpu"
    c0=$(cpu_server)
    copy >"$WORK/warm-$1.s"
    echo "$(cpu_server) - $c0" | bc -l | xargs printf '%.2f' >"$WORK/warm-$1.cpu"
    stop_server "full-$1"
}

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for kind in tessera nbdkit; do
    echo "== $kind: boot" >&2
    boot $kind
    echo "== $kind: $READS random reads" >&2
    random_reads $kind
    echo "== $kind: full reads" >&2
    full $kind
done
echo "== nbdkit file: warm full read" >&2
start_server file
copy >/dev/null
c0=$(cpu_server)
copy >"$WORK/warm-file.s"
echo "$(cpu_server) - $c0" | bc -l | xargs printf '%.2f' >"$WORK/warm-file.cpu"
stop_server full-file
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

v() { cat "$WORK/$1"; }
field() { cut -d' ' -f"$2" "$WORK/$1"; }
# ratio A B: B / A (> 1: A is faster)
ratio() { echo "$2 / $1" | bc -l | xargs printf '%.2f'; }
mib() { echo "$1 / 1048576" | bc -l | xargs printf '%.1f'; }
reqs() { echo "$(field "$1.req" 1) requests, $(mib "$(field "$1.req" 2)") MiB"; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
echo "## Remote boot over HTTP, ${DELAY_MS} ms per request (benches/remote-boot.sh)"
echo
echo "$(date -u +%Y-%m-%d), \`nproc\` $(nproc), $cpu, $(uname -r), nbdkit $(nbdkit --version | awk '{print $2}'),"
echo "libnbd $(nbdcopy --version | head -1 | awk '{print $2}'). Load average $LOAD0 at the start, $LOAD1 at the end"
echo "(the machine is shared; one run, so read the ratios rather than the absolute times)."
echo "Image: \`$(basename "$(dirname "$IMG")")/$(basename "$IMG")\` ($BYTES bytes of ext4), published as a tessera"
echo "store ($(mib "$STORE_BYTES") MiB, default chunk sizes) and as the raw file in one nginx root; every request"
echo "crosses benches/latency-proxy.py (+$DELAY_MS ms each). tessera: \`serve URL/img.tidx --store URL"
echo "--cache DIR\` (default --cache-size); nbdkit: \`--filter=cache curl URL/raw.img cache-on-read=true\`."
echo "Every measurement starts a fresh server with an empty cache (and a fresh proxy, whose"
echo "request counts are in the last column), except \"warm\", the same server read a second time."
echo
echo "| measurement | tessera serve | nbdkit curl + cache | tessera faster by | tessera / nbdkit requests over HTTP |"
echo "| --- | --- | --- | --- | --- |"
echo "| boot: start server, nbdfuse + loop + mount ext4, read $FILES files ($(mib "$FILE_BYTES") MiB) | $(v boot-tessera.s) s | $(v boot-nbdkit.s) s | $(ratio "$(v boot-tessera.s)" "$(v boot-nbdkit.s)")× | $(reqs boot-tessera) / $(reqs boot-nbdkit) |"
echo "| $READS random 4 KiB reads, p50 | $(field random-tessera.out 1) ms | $(field random-nbdkit.out 1) ms | $(ratio "$(field random-tessera.out 1)" "$(field random-nbdkit.out 1)")× | |"
echo "| $READS random 4 KiB reads, p99 | $(field random-tessera.out 2) ms | $(field random-nbdkit.out 2) ms | $(ratio "$(field random-tessera.out 2)" "$(field random-nbdkit.out 2)")× | |"
echo "| $READS random 4 KiB reads, max | $(field random-tessera.out 3) ms | $(field random-nbdkit.out 3) ms | $(ratio "$(field random-tessera.out 3)" "$(field random-nbdkit.out 3)")× | |"
echo "| $READS random 4 KiB reads, total | $(field random-tessera.out 4) s | $(field random-nbdkit.out 4) s | $(ratio "$(field random-tessera.out 4)" "$(field random-nbdkit.out 4)")× | $(reqs random-tessera) / $(reqs random-nbdkit) |"
echo "| full read, cold (nbdcopy --no-extents) | $(v cold-tessera.s) s | $(v cold-nbdkit.s) s | $(ratio "$(v cold-tessera.s)" "$(v cold-nbdkit.s)")× | $(reqs full-tessera) / $(reqs full-nbdkit) (cold + warm) |"
echo "| full read, warm (same server again) | $(v warm-tessera.s) s | $(v warm-nbdkit.s) s | $(ratio "$(v warm-tessera.s)" "$(v warm-nbdkit.s)")× | |"
echo "| full read, warm, nbdkit file on the local raw image | | $(v warm-file.s) s | $(ratio "$(v warm-tessera.s)" "$(v warm-file.s)")× | |"
echo
echo "\"faster by\" = nbdkit's figure / tessera's (> 1: tessera is faster). Server CPU seconds"
echo "(user + sys): boot $(v boot-tessera.cpu) / $(v boot-nbdkit.cpu), random reads $(v random-tessera.cpu) / $(v random-nbdkit.cpu),"
echo "cold full read $(v cold-tessera.cpu) / $(v cold-nbdkit.cpu), warm full read $(v warm-tessera.cpu) / $(v warm-nbdkit.cpu) (tessera / nbdkit curl);"
echo "nbdkit file warm full read $(v warm-file.cpu). Files read at boot matched their sha256 in the image,"
echo "every random block matched the image."
} | tee "$WORK/remote-boot.md"
