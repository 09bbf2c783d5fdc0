#!/usr/bin/env bash
# A release update over HTTP behind a ~20 ms-per-request proxy: tessera sync beside
# `casync extract` and `bita clone`, in the same run, from the same nginx. Run by hand
# (not part of the test suite):
#
#   benches/remote.sh                    # 1 GiB ext4 release pair, 3 runs
#   SIZE=2G RUNS=5 DELAY_MS=50 benches/remote.sh
#
# Needs: cargo, nginx, casync (with its casync-http helper), python3, GNU time, e2fsprogs;
# bita is installed with `cargo install bita` when missing (a peer, never a dependency).
#
# Scenario: a device holds release N (`old`) and updates to release N+1 (`rebuilt`, a
# fresh mkfs of the next tree) from a static HTTP store. Each tool gets release N as its
# seed: tessera syncs in place into a copy of it (its A/B-less mode; the copy is not
# timed), casync extracts with `--seed=old`, bita clones with `--seed old`. casync and bita
# are published with 16K/64K/256K chunks (their usual sizes), tessera with its default
# (4K/16K/64K; TESSERA_CHUNKS=16K:64K:256K for the same sizes); tessera and casync
# compress with zstd, bita with brotli (its default build has no zstd). Every request crosses benches/latency-proxy.py,
# which delays each request by DELAY_MS and counts the bytes sent back; its totals are the
# "downloaded" column. Outputs are compared with the image (`cmp`).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
DELAY_MS=${DELAY_MS:-20}
JOBS=${JOBS:-32}
WORK=${WORK:-$ROOT/target/bench/remote}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
CHUNKS=16384:65536:262144
TESSERA=$ROOT/target/release/tessera
TIME=/usr/bin/time
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

for tool in casync python3 "$TIME" "$NGINX"; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
if ! command -v bita >/dev/null; then
    echo "== cargo install bita (benchmark peer)" >&2
    cargo install --locked bita >&2
fi
BITA=$(command -v bita)

echo "== building (release)" >&2
cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"

echo "== ext4 fixture pair, size $SIZE" >&2
declare -A fx
while read -r role path; do fx[$role]=$path; done \
    < <("$ROOT/target/release/tessera-fixtures" build ext4 "$FIXTURES" --size "$SIZE")
OLD=${fx[old]} NEW=${fx[rebuilt]}
BYTES=$(stat -c %s "$NEW")

rm -rf "$WORK"
mkdir -p "$WORK/www" "$WORK/out"
W=$WORK/www

echo "== publishing release N+1 with each tool" >&2
# A tessera store keeps every release: N was published before N+1, so N+1's new chunks
# sit together in packs of their own (casync's store has one file per chunk, and bita's
# archive holds every chunk of N+1 in image order either way).
"$TESSERA" make "$OLD" --store "$W/t" --index "$W/t/old.tidx" ${TESSERA_CHUNKS:+--chunk-size "$TESSERA_CHUNKS"} -q
"$TESSERA" make "$NEW" --store "$W/t" --index "$W/t/new.tidx" ${TESSERA_CHUNKS:+--chunk-size "$TESSERA_CHUNKS"} -q
mkdir -p "$W/c"
casync make --store="$W/c/store" --compression=zstd --chunk-size=$CHUNKS "$W/c/new.caibx" "$NEW" >/dev/null
mkdir -p "$W/b"
# bita as `cargo install bita` builds it compresses with brotli (or nothing), not zstd.
"$BITA" compress --compression brotli --compression-level 6 \
    --min-chunk-size 16KiB --avg-chunk-size 64KiB --max-chunk-size 256KiB \
    -i "$NEW" "$W/b/new.cba" >/dev/null 2>&1

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

# run NAME CMD...: starts a fresh proxy on $PORT, runs CMD timed, records
# "wall_s rss_kib requests bytes_down" in $WORK/NAME.t
run() {
    local name=$1; shift
    "$TIME" -f '%e %M' -o "$WORK/$name.one" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
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
    t_run() {
        cp --sparse=always "$OLD" "$O/t.img"; sync
        start_proxy
        run tessera "$TESSERA" sync "$URL/t/new.tidx" "$O/t.img" --store "$URL/t" --jobs "$JOBS" --json -q
        cmp "$NEW" "$O/t.img"
    }
    c_run() {
        start_proxy
        run casync casync extract --store="$URL/c/store" --seed="$OLD" "$URL/c/new.caibx" "$O/c.img"
        cmp "$NEW" "$O/c.img"
    }
    b_run() {
        start_proxy
        run bita "$BITA" clone --seed "$OLD" "$URL/b/new.cba" "$O/b.img"
        cmp "$NEW" "$O/b.img"
    }
    case $((run % 3)) in
        1) t_run; c_run; b_run ;;
        2) c_run; b_run; t_run ;;
        0) b_run; t_run; c_run ;;
    esac
done

secs() { cut -d' ' -f1 "$WORK/$1.t" | median; }
rss() { cut -d' ' -f2 "$WORK/$1.t" | sort -n | tail -1 | awk '{printf "%.0f", $1/1024}'; }
reqs() { cut -d' ' -f3 "$WORK/$1.t" | median; }
down() { cut -d' ' -f4 "$WORK/$1.t" | median | awk '{printf "%.1f", $1/1048576}'; }
ratio() { awk -v a="$(secs "$1")" -v b="$(secs "$2")" 'BEGIN {printf "%.1f", b/a}'; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
echo "## Release update over HTTP, ${DELAY_MS} ms per request (benches/remote.sh)"
echo
echo "$(date -u +%Y-%m-%d), \`nproc\` $(nproc), $cpu, $(uname -r); load average at the"
echo "start $LOAD (the machine is shared). Image: ext4 fixture pair \`ext4 --size $SIZE\`"
echo "($BYTES bytes): each tool updates release N (\`old\`, its seed) to release N+1"
echo "(\`rebuilt\`) from nginx on loopback through a proxy adding $DELAY_MS ms to every request."
echo "casync and bita use 16K/64K/256K chunks, tessera ${TESSERA_CHUNKS:-its default 4K/16K/64K} (zstd; bita brotli, its"
echo "default build). Median of $RUNS runs; downloaded ="
echo "bytes the proxy sent back (HTTP headers included); tessera's store holds release N and N+1"
echo "(made in that order), casync's and bita's release N+1; tessera with \`--jobs $JOBS\`, in place"
echo "into a copy of release N; casync \`extract --seed\`; bita \`clone --seed\`."
echo
echo "| tool | wall | requests | downloaded | peak RSS | tessera faster by |"
echo "| --- | --- | --- | --- | --- | --- |"
for t in tessera casync bita; do
    echo "| $t | $(secs $t) s | $(reqs $t) | $(down $t) MiB | $(rss $t) MiB | $(ratio tessera $t)× |"
done
echo
echo "All outputs compared equal to release N+1 (\`cmp\`)."
} | tee "$WORK/remote.md"
