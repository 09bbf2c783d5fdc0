#!/usr/bin/env bash
# `tessera commit` of a VM's overlay against `make` of the whole changed image: the cost
# of a commit should grow with the bytes changed, not with the image. Run by hand (not
# part of the test suite):
#
#   benches/commit.sh                      # 1 GiB ext4 image, 1 MiB and 16 MiB changed
#   TESSERA=target/debug/tessera benches/commit.sh   # an already built binary
#
# Needs: cargo, nbdsh (libnbd-bin, python3-libnbd), GNU time, e2fsprogs. Each change is
# made the way a VM makes it: `tessera serve --overlay` takes 64 KiB writes at random
# 4 KiB-aligned offsets over NBD (nbdsh), then the server stops and `tessera commit` turns
# the overlay into a new index. For comparison `make` cuts the whole changed image into a
# fresh store. Prints a Markdown table.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
WORK=${WORK:-$ROOT/target/bench/commit}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
TIME=/usr/bin/time
if [[ -z ${TESSERA:-} ]]; then
    echo "== building (release)" >&2
    cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"
    TESSERA=$ROOT/target/release/tessera
fi
FIXTURES_BIN=$ROOT/target/release/tessera-fixtures
[[ -x $FIXTURES_BIN ]] || FIXTURES_BIN=$ROOT/target/debug/tessera-fixtures
[[ -x $FIXTURES_BIN ]] || cargo build -q -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"
[[ -x $FIXTURES_BIN ]] || FIXTURES_BIN=$ROOT/target/debug/tessera-fixtures

declare -A fx
while read -r role path; do fx[$role]=$path; done \
    < <("$FIXTURES_BIN" build ext4 "$FIXTURES" --size "$SIZE")
IMAGE=${fx[old]}

rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"
"$TESSERA" make "$IMAGE" --store store --index base.tidx -q
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu() { awk '{printf "%.2f", $2 + $3}' "$1"; }
wall() { awk '{printf "%.2f", $1}' "$1"; }

echo "| change | bytes changed | commit wall | commit CPU | bytes read | new chunks | new bytes | stored | make of the changed image: wall, CPU |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for writes in 16 256; do
    port=$(free_port)
    "$TESSERA" serve base.tidx --store store --overlay "ov$writes" --listen "127.0.0.1:$port" \
        >serve.out 2>serve.err &
    pid=$!
    for _ in $(seq 100); do grep -q nbd:// serve.out 2>/dev/null && break; sleep 0.1; done
    PATH=/usr/bin:$PATH nbdsh -u "nbd://127.0.0.1:$port/base" -c "
import random
r = random.Random($writes)
for i in range($writes):
    off = r.randrange(0, h.get_size() - 65536) & ~4095
    h.pwrite(r.randbytes(65536), off)
h.flush()
"
    kill -TERM "$pid"; wait "$pid" || true
    "$TIME" -f '%e %U %S' -o commit.t "$TESSERA" commit "ov$writes" --base base.tidx \
        --store store --index "new$writes.tidx" --json >"commit$writes.json"
    "$TESSERA" sync "new$writes.tidx" changed.img --store store -q
    rm -rf fresh
    "$TIME" -f '%e %U %S' -o make.t "$TESSERA" make changed.img --store fresh --index full.tidx -q
    rm -rf fresh changed.img
    field() { python3 -c "import json,sys; print(json.load(open('commit$writes.json'))['$1'])"; }
    mb() { awk -v b="$1" 'BEGIN {printf "%.2f MB", b / 1e6}'; }
    echo "| $writes × 64 KiB | $(mb "$(field bytes_changed)") | $(wall commit.t) s | $(cpu commit.t) s | $(mb "$(field bytes_read)") | $(field new_chunks) | $(mb "$(field new_bytes)") | $(mb "$(field stored_bytes)") | $(wall make.t) s, $(cpu make.t) s |"
done
