#!/usr/bin/env bash
# The built-in example: build tessera, generate a small ext4 release pair, make images of
# both, sync release 1 into a fresh file, then update it in place to release 2, and verify.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
cargo build --release --quiet -p tessera-cli -p tessera-fixtures
T=target/release/tessera
OUT=target/demo
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== generating an ext4 release pair (fixtures)"
FIX=$(target/release/tessera-fixtures build ext4 "$OUT/fixtures")
V1=$(awk '$1 == "old" { print $2 }' <<<"$FIX")
V2=$(awk '$1 == "rebuilt" { print $2 }' <<<"$FIX")

echo "== tessera make (release 1 and release 2 into one store)"
$T make "$V1" --store "$OUT/store" --index "$OUT/v1.tidx"
$T make "$V2" --store "$OUT/store" --index "$OUT/v2.tidx"
$T info "$OUT/v2.tidx"

echo "== tessera sync release 1 into a new disk file"
$T sync "$OUT/v1.tidx" "$OUT/disk.img" --store "$OUT/store"

echo "== tessera sync the same disk in place to release 2"
$T sync "$OUT/v2.tidx" "$OUT/disk.img" --store "$OUT/store"

echo "== tessera verify"
$T verify "$OUT/v2.tidx" "$OUT/disk.img"
cmp <(head -c "$(stat -c %s "$V2")" "$OUT/disk.img") "$V2" && echo "disk.img is byte-identical to release 2"
