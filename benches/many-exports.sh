#!/usr/bin/env bash
# Many disks on one host: threads and resident memory of one `tessera serve` with N
# exports (4 MiB images of random data, one store), from nginx over HTTP and from the
# local store, idle after startup and after one 4 KiB read of each export (which also
# reads the rest of each image ahead). Run by hand (not in the test suite):
#
#   benches/many-exports.sh                       # N=200
#   N=50 BEFORE=/path/to/older/tessera benches/many-exports.sh   # side by side
#
# Needs: cargo, nginx, libnbd-bin (nbdinfo), python3-libnbd (nbdsh).
# Threads come from /proc/PID/status (Threads:), memory from VmRSS. The markdown rows for
# benches/RESULTS.md are printed at the end and written to $WORK/many-exports.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-200}
WORK=${WORK:-$ROOT/target/bench/many-exports}
TESSERA=${TESSERA:-$ROOT/target/release/tessera}
BEFORE=${BEFORE:-}
CACHE=${CACHE:-256M}
PORT_H=${PORT_H:-10911} PORT_T=${PORT_T:-10912}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

for tool in nbdinfo nbdsh "$NGINX"; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
if [[ -z ${TESSERA_PREBUILT:-} ]]; then
    echo "== building (release)" >&2
    cargo build --release -q -p tessera-cli --manifest-path "$ROOT/Cargo.toml"
fi

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== $N images of 4 MiB into one store" >&2
rm -rf "$WORK" && mkdir -p "$WORK/img" "$WORK/idx"
for i in $(seq -w 1 "$N"); do
    head -c $((4 << 20)) /dev/urandom >"$WORK/img/d$i.img"
    "$TESSERA" make -q --store "$WORK/store" --index "$WORK/idx/d$i.tidx" "$WORK/img/d$i.img"
    rm "$WORK/img/d$i.img"
done

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<CONF
daemon off;
master_process off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/t1; proxy_temp_path $WORK/nginx/t2;
  fastcgi_temp_path $WORK/nginx/t3; uwsgi_temp_path $WORK/nginx/t4; scgi_temp_path $WORK/nginx/t5;
  keepalive_requests 100000;
  server { listen 127.0.0.1:$PORT_H; root $WORK/store; }
}
CONF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
PIDS+=($!)

status() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# One 4 KiB read of every export, one connection each, from one nbdsh process.
read_all() {
    PATH="/usr/bin:$PATH" nbdsh -c "
import nbd
for i in range(1, $N + 1):
    h = nbd.NBD()
    h.connect_uri('nbd://127.0.0.1:$PORT_T/d%0${#N}d' % i)
    assert len(h.pread(4096, 0)) == 4096
    h.shutdown()
"
}

ROWS=()
measure() { # binary label store
    local bin=$1 label=$2 store=$3
    "$bin" serve "$WORK"/idx/*.tidx --store "$store" --cache-size "$CACHE" \
        --listen "127.0.0.1:$PORT_T" >"$WORK/serve.out" 2>"$WORK/serve.err" &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 600); do
        nbdinfo --size "nbd://127.0.0.1:$PORT_T/d$(printf "%0${#N}d" 1)" >/dev/null 2>&1 && break
        sleep 0.1
    done
    sleep 1
    local t0 r0 t1 r1
    t0=$(status "$pid" Threads) r0=$(status "$pid" VmRSS)
    read_all
    sleep 2
    t1=$(status "$pid" Threads) r1=$(status "$pid" VmRSS)
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    ROWS+=("| $label | $t0 | $((r0 / 1024)) | $t1 | $((r1 / 1024)) |")
    echo "${ROWS[-1]}" >&2
}

for bin_label in "$TESSERA:this build" ${BEFORE:+"$BEFORE:before"}; do
    bin=${bin_label%%:*} name=${bin_label#*:}
    measure "$bin" "$name, HTTP (nginx)" "http://127.0.0.1:$PORT_H/"
    measure "$bin" "$name, local store" "$WORK/store"
done

{
    echo "$N exports of 4 MiB images (one store, --cache-size $CACHE), one tessera serve;"
    echo "threads (/proc/PID/status) and RSS idle after startup, then after one 4 KiB read"
    echo "of each export (one connection each; read-ahead fetches the rest of each image)."
    echo
    echo "| server, store | threads idle | RSS idle (MiB) | threads after reads | RSS after reads (MiB) |"
    echo "| --- | --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
} | tee "$WORK/many-exports.md"
