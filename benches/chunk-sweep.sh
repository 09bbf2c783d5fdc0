#!/usr/bin/env bash
# Chunk-size sweep on the 1 GiB ext4 release pair: for each chunk size, bytes on the wire
# and requests of the update N -> N+1, beside bita. Bytes, not time: the figures do not
# depend on the machine's load. Run by hand (not part of the test suite):
#
#   benches/chunk-sweep.sh
#   SIZES="8K:32K:128K 16K:64K:256K" benches/chunk-sweep.sh
#
# Needs: cargo, nginx, e2fsprogs, and bita (a benchmark peer only, never a dependency:
# `cargo install bita`; set BITA=/path/to/bita if it is not on PATH or in ~/.cargo/bin).
#
# For each chunk size, release N (`old`) then release N+1 (`rebuilt`) are made into one
# fresh packed store; a copy of release N is then updated in place to N+1:
#   - from the local store: `sync --json` reports `bytes_downloaded` (chunk frames plus the
#     gap bytes coalesced range requests read through) and `requests`;
#   - from nginx on loopback (same store): nginx's access log gives every request and the
#     bytes it sent, body (`$body_bytes_sent`: the index, the location file, the ranges) and
#     total (`$bytes_sent`: HTTP headers included).
# bita 0.15 (brotli, its default build) compresses N+1 with 16K:64K:256K chunks and clones
# it in place over the same nginx with `--seed-output` into a copy of release N.
# "wire (est.)" = downloaded + index + location file + 400 B of HTTP headers per request
# (an estimate for a typical response; nginx's measured figure is beside it).
# A second table varies the coalescing gap (the most bytes between two wanted frames one
# request reads through; the engine's MAX_GAP, set for measuring by TESSERA_MAX_GAP) for
# each chunk size, with the estimate of `sync --dry-run --json` on a copy of release N
# (which equals what the sync then downloads: cli/tests/estimate.rs).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
SIZES=${SIZES:-"4K:16K:64K 8K:32K:128K 16K:64K:256K 32K:128K:512K"}
WORK=${WORK:-$ROOT/target/bench/chunk-sweep}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TESSERA=$TARGET_DIR/release/tessera
BITA=${BITA:-$(command -v bita || echo "$HOME/.cargo/bin/bita")}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
GAPS=${GAPS:-"0 16K 32K 48K 64K 128K 256K"}
HEADER_EST=400

for tool in "$BITA" "$NGINX"; do
    [ -x "$tool" ] || command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nginx; cargo install bita)" >&2; exit 1; }
done

if [ -z "${NO_BUILD:-}" ]; then
    echo "== building (release)" >&2
    cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"
fi

echo "== ext4 fixture pair, size $SIZE" >&2
declare -A fx
while read -r role path; do fx[$role]=$path; done \
    < <("$TARGET_DIR/release/tessera-fixtures" build ext4 "$FIXTURES" --size "$SIZE")
OLD=${fx[old]} NEW=${fx[rebuilt]}
BYTES=$(stat -c %s "$NEW")
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

rm -rf "$WORK"
mkdir -p "$WORK/www" "$WORK/nginx" "$WORK/out"
W=$WORK/www

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
LOG=$WORK/nginx/access.log
cat >"$WORK/nginx/nginx.conf" <<CONF
daemon off;
master_process off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
  log_format sweep '\$status \$body_bytes_sent \$bytes_sent \$request_uri';
  access_log $LOG sweep;
  client_body_temp_path $WORK/nginx/t1; proxy_temp_path $WORK/nginx/t2;
  fastcgi_temp_path $WORK/nginx/t3; uwsgi_temp_path $WORK/nginx/t4; scgi_temp_path $WORK/nginx/t5;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$PORT; root $W; }
}
CONF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
NGINX_PID=$!
trap 'kill $NGINX_PID 2>/dev/null || true' EXIT
sleep 1
URL=http://127.0.0.1:$PORT

# logged CMD...: runs CMD with an empty access log; sets REQ, BODY, TOTAL from the log.
logged() {
    : >"$LOG"
    "$@" >"$WORK/out/cmd.out" 2>"$WORK/out/cmd.err" || {
        echo "failed: $*" >&2; tail -5 "$WORK/out/cmd.err" >&2; exit 1; }
    sleep 0.5
    read -r REQ BODY TOTAL < <(awk '{n++; b+=$2; t+=$3} END {print n+0, b+0, t+0}' "$LOG")
}
jf() { grep -o "\"$1\": *\"\\?[0-9a-f]*" "$2" | grep -o '[0-9a-f]*$'; }
mb() { awk -v b="$1" 'BEGIN {printf "%.2f", b/1e6}'; }

ROWS=$WORK/rows.md
GAP_ROWS=$WORK/gap-rows.md
: >"$ROWS"
: >"$GAP_ROWS"
for cs in $SIZES; do
    echo "== $cs: make N, make N+1" >&2
    S=$W/t-${cs//:/-}
    "$TESSERA" make "$OLD" --store "$S" --index "$S/old.tidx" --chunk-size "$cs" --json -q >"$WORK/out/make-old.json"
    "$TESSERA" make "$NEW" --store "$S" --index "$S/new.tidx" --chunk-size "$cs" --json -q >"$WORK/out/make-new.json"
    root=$(jf root_hash "$WORK/out/make-new.json")
    idx=$(stat -c %s "$S/new.tidx")
    loc=$(stat -c %s "$S/locations/$root.tloc")
    chunks=$(jf chunk_count "$WORK/out/make-new.json")

    echo "== $cs: sync N -> N+1 from the local store" >&2
    cp --sparse=always "$OLD" "$WORK/out/t.img"
    "$TESSERA" sync "$S/new.tidx" "$WORK/out/t.img" --store "$S" --json -q >"$WORK/out/sync.json"
    cmp "$NEW" "$WORK/out/t.img"
    down=$(jf bytes_downloaded "$WORK/out/sync.json")
    reqs=$(jf requests "$WORK/out/sync.json")
    fetched=$(jf bytes_fetched "$WORK/out/sync.json")

    echo "== $cs: sync N -> N+1 over nginx" >&2
    cp --sparse=always "$OLD" "$WORK/out/t.img"
    logged "$TESSERA" sync "$URL/${S#"$W"/}/new.tidx" "$WORK/out/t.img" --store "$URL/${S#"$W"/}" -q
    cmp "$NEW" "$WORK/out/t.img"
    est=$((down + idx + loc + reqs * HEADER_EST))
    echo "| tessera $cs | $chunks | $(mb "$fetched") | $(mb "$down") | $reqs | $(mb "$idx") | $(mb "$loc") | $(mb "$est") | $REQ | $(mb "$BODY") | $(mb "$TOTAL") |" >>"$ROWS"
    cat "$ROWS" >&2

    echo "== $cs: coalescing gaps (dry-run estimates)" >&2
    cp --sparse=always "$OLD" "$WORK/out/t.img"
    for gap in $GAPS; do
        TESSERA_MAX_GAP=$gap "$TESSERA" sync "$S/new.tidx" "$WORK/out/t.img" --store "$S" \
            --dry-run --json -q >"$WORK/out/dry.json"
        gd=$(jf bytes_downloaded "$WORK/out/dry.json")
        gr=$(jf requests "$WORK/out/dry.json")
        echo "| $cs | $gap | $(mb "$gd") | $gr | $(mb $((gd + idx + loc + gr * HEADER_EST))) | $(mb $((idx * 64))) |" >>"$GAP_ROWS"
    done
    # Each store holds two releases (~750 MB): keep the disk free for the next.
    rm -rf "$S" "$WORK/out/t.img"
done

echo "== bita 16K:64K:256K" >&2
mkdir -p "$W/b"
"$BITA" compress --compression brotli --compression-level 6 \
    --min-chunk-size 16KiB --avg-chunk-size 64KiB --max-chunk-size 256KiB \
    -i "$NEW" "$W/b/new.cba" >/dev/null 2>&1
cp --sparse=always "$OLD" "$WORK/out/b.img"
logged "$BITA" clone --seed-output "$URL/b/new.cba" "$WORK/out/b.img"
cmp "$NEW" "$WORK/out/b.img"
rm -f "$WORK/out/b.img"
cba=$(stat -c %s "$W/b/new.cba")
echo "| bita 16K:64K:256K | | | | | | | | $REQ | $(mb "$BODY") | $(mb "$TOTAL") |" >>"$ROWS"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
echo "## Chunk-size sweep: bytes on the wire of a release update (benches/chunk-sweep.sh)"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), \`nproc\` $(nproc), $cpu, $(uname -r); load average at"
echo "the start $LOAD (bytes and requests do not depend on it). Image: ext4 fixture pair"
echo "\`ext4 --size $SIZE\` ($BYTES bytes). For each chunk size, release N then N+1 are made into one"
echo "packed store, and a copy of release N is updated in place to N+1. \"downloaded\" and"
echo "\"requests\" are \`sync --json\` from the local store (frames + gap bytes of coalesced"
echo "requests); \"index\" and \"tloc\" are the sizes of N+1's index and location file;"
echo "\"wire (est.)\" = downloaded + index + tloc + $HEADER_EST B of HTTP headers per request. The"
echo "last three columns are measured by nginx's access log for the same update over HTTP"
echo "(loopback): requests (index and location file included), body bytes, and bytes with HTTP"
echo "headers. bita 0.15 (brotli level 6, its default build; ${cba} bytes archive) clones in place"
echo "with \`--seed-output\` over the same nginx. MB = 10^6 bytes."
echo
echo "| tool, chunks | chunks in N+1 | fetched (uncompressed) MB | downloaded MB | requests | index MB | tloc MB | wire (est.) MB | HTTP requests | HTTP body MB | HTTP total MB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
cat "$ROWS"
echo
echo "Coalescing gap (default MAX_GAP $(grep -o 'MAX_GAP: u64 = [0-9]* << 10' "$ROOT/engine/src/store/fetch.rs" | grep -o '[0-9]* <<' | tr -d ' <') KiB in the first table): the same updates, bytes and requests"
echo "from \`sync --dry-run --json\` with \`TESSERA_MAX_GAP\`; \"wire (est.)\" as above; \"index at"
echo "64 GiB\" = the index size scaled to a 64 GiB image of the same kind (an index grows with the"
echo "image, and every sync downloads it whole)."
echo
echo "| chunks | gap | downloaded MB | requests | wire (est.) MB | index at 64 GiB MB |"
echo "| --- | --- | --- | --- | --- | --- |"
cat "$GAP_ROWS"
echo
echo "All outputs compared equal to release N+1 (\`cmp\`)."
} | tee "$WORK/chunk-sweep.md"
