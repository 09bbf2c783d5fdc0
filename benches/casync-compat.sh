#!/usr/bin/env bash
# A casync-published release update over HTTP behind a ~20 ms-per-request proxy:
# `tessera sync` against `casync extract` on the same .caibx and .castr, from the same
# nginx. Run by hand (not part of the test suite):
#
#   benches/casync-compat.sh                 # 1 GiB ext4 release pair, 3 runs
#   SIZE=2G RUNS=5 DELAY_MS=50 benches/casync-compat.sh
#
# Needs: cargo, nginx, casync (with its casync-http helper), python3, GNU time, e2fsprogs.
#
# Scenario: a device holds release N (`old`) and updates to release N+1 (`rebuilt`, a
# fresh mkfs of the next tree), published once with `casync make` (default 16K/64K/256K
# chunks, zstd, SHA-512/256). Both tools read that one index and store:
# - casync: `extract --seed=old` into a new file;
# - tessera (seed): `sync --seed old` into a new file (the same work as casync's);
# - tessera (in place): `sync` into a copy of release N (the copy is not timed).
# Every request crosses benches/latency-proxy.py, which delays each by DELAY_MS and
# counts the bytes sent back ("downloaded"). Outputs are compared with the image (`cmp`),
# then deleted (at most one output exists at a time: the bench needs about the store's
# size plus 1 GiB of free space).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
DELAY_MS=${DELAY_MS:-20}
JOBS=${JOBS:-32}
WORK=${WORK:-$ROOT/target/bench/casync-compat}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
TESSERA=$ROOT/target/release/tessera
TIME=/usr/bin/time
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

for tool in casync python3 "$TIME" "$NGINX"; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

echo "== building (release)" >&2
cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"

echo "== ext4 fixture pair, size $SIZE" >&2
declare -A fx
while read -r role path; do fx[$role]=$path; done \
    < <("$ROOT/target/release/tessera-fixtures" build ext4 "$FIXTURES" --size "$SIZE")
OLD=${fx[old]} NEW=${fx[rebuilt]}
BYTES=$(stat -c %s "$NEW")

rm -rf "$WORK"
mkdir -p "$WORK/www/c" "$WORK/out"
W=$WORK/www

echo "== publishing release N+1 with casync make" >&2
casync make --store="$W/c/store.castr" --compression=zstd "$W/c/new.caibx" "$NEW" >/dev/null
CHUNK_FILES=$(find "$W/c/store.castr" -name '*.cacnk' | wc -l)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NGINX_PORT=$(free_port)
mkdir -p "$WORK/nginx"
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
NGINX_PID=$!
PROXY_PID=
cleanup() { kill $NGINX_PID ${PROXY_PID:-} 2>/dev/null || true; }
trap cleanup EXIT
sleep 1

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# run NAME CMD...: runs CMD timed through the proxy started last, records
# "wall_s rss_kib user_s sys_s requests bytes_down" in $WORK/NAME.t
run() {
    local name=$1; shift
    "$TIME" -f '%e %M %U %S' -o "$WORK/$name.one" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
        echo "$name failed:" >&2; tail -5 "$WORK/$name.err" >&2; exit 1; }
    kill -TERM "$PROXY_PID"; wait "$PROXY_PID" 2>/dev/null || true; PROXY_PID=
    echo "$(cat "$WORK/$name.one") $(cat "$WORK/proxy.stats")" >>"$WORK/$name.t"
}
start_proxy() {
    PORT=$(free_port)
    python3 "$ROOT/benches/latency-proxy.py" "$PORT" "$NGINX_PORT" "$DELAY_MS" "$WORK/proxy.stats" &
    PROXY_PID=$!
    for _ in $(seq 50); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT))" 2>/dev/null && break
        sleep 0.1
    done
    URL=http://127.0.0.1:$PORT
}

for run in $(seq "$RUNS"); do
    echo "== run $run/$RUNS" >&2
    O=$WORK/out
    rm -f "$O"/*
    seed_run() {
        start_proxy
        run tessera-seed "$TESSERA" sync "$URL/c/new.caibx" "$O/s.img" --store "$URL/c/store.castr" \
            --seed "$OLD" --jobs "$JOBS" --json -q
        cmp "$NEW" "$O/s.img"; rm -f "$O/s.img"
    }
    inplace_run() {
        cp --sparse=always "$OLD" "$O/t.img"; sync
        start_proxy
        run tessera-inplace "$TESSERA" sync "$URL/c/new.caibx" "$O/t.img" --store "$URL/c/store.castr" \
            --jobs "$JOBS" --json -q
        cmp "$NEW" "$O/t.img"; rm -f "$O/t.img"
    }
    casync_run() {
        start_proxy
        run casync casync extract --store="$URL/c/store.castr" --seed="$OLD" "$URL/c/new.caibx" "$O/c.img"
        cmp "$NEW" "$O/c.img"; rm -f "$O/c.img"
    }
    case $((run % 3)) in
        1) seed_run; casync_run; inplace_run ;;
        2) casync_run; inplace_run; seed_run ;;
        0) inplace_run; seed_run; casync_run ;;
    esac
done

col() { cut -d' ' -f"$2" "$WORK/$1.t" | median; }
secs() { col "$1" 1; }
cpu_s() { awk '{print $3 + $4}' "$WORK/$1.t" | median; }
rss() { cut -d' ' -f2 "$WORK/$1.t" | sort -n | tail -1 | awk '{printf "%.0f", $1/1024}'; }
reqs() { col "$1" 5; }
down() { col "$1" 6 | awk '{printf "%.1f", $1/1048576}'; }
ratio() { awk -v a="$(secs "$1")" -v b="$(secs "$2")" 'BEGIN {printf "%.1f", b/a}'; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
echo "## casync-published update over HTTP, ${DELAY_MS} ms per request (benches/casync-compat.sh)"
echo
echo "$(date -u +%Y-%m-%d), \`nproc\` $(nproc), $cpu, $(uname -r); load average at the"
echo "start $LOAD. Image: ext4 fixture pair \`ext4 --size $SIZE\` ($BYTES bytes), release"
echo "N+1 published once with \`casync make --compression=zstd\` (default 16K/64K/256K chunks,"
echo "SHA-512/256; $CHUNK_FILES chunk files). Both tools read that .caibx and .castr from nginx"
echo "on loopback through a proxy adding $DELAY_MS ms to every request. Median of $RUNS runs;"
echo "downloaded = bytes the proxy sent back (HTTP headers included); CPU = user + system."
echo
echo "| tool | wall | CPU | requests | downloaded | peak RSS | faster than casync by |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for t in tessera-seed tessera-inplace casync; do
    echo "| $t | $(secs $t) s | $(cpu_s $t) s | $(reqs $t) | $(down $t) MiB | $(rss $t) MiB | $(ratio $t casync)× |"
done
echo
echo "All outputs compared equal to release N+1 (\`cmp\`)."
} | tee "$WORK/casync-compat.md"
