#!/usr/bin/env bash
# In-place update of the 1 GiB ext4 release pair with and without a remembered seed index
# (docs/SYNC.md, "Remembered seeds"). Run by hand (not part of the test suite):
#
#   benches/remembered.sh            # 1 GiB, 3 runs each
#   SIZE=2G RUNS=5 benches/remembered.sh
#
# Each run starts from a fresh copy of release N as the target and updates it in place to
# release N+1 from a local store:
#   scan        tessera sync NEW.tidx TARGET --store STORE --rescan   (TARGET scanned)
#   remembered  tessera sync OLD.tidx TARGET --store STORE  (untimed: records TARGET's index)
#               tessera sync NEW.tidx TARGET --store STORE  (planned from the record)
# Reported: wall time and CPU time (user + sys) of each timed sync, median of RUNS, and
# the outputs compared with the new image.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
WORK=${WORK:-$ROOT/target/bench/remembered}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TESSERA=$TARGET_DIR/release/tessera
TIME=/usr/bin/time

echo "== building (release)" >&2
cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"
declare -A fx
while read -r role path; do fx[$role]=$path; done \
    < <("$TARGET_DIR/release/tessera-fixtures" build ext4 "$FIXTURES" --size "$SIZE")
OLD=${fx[old]}
NEW=${fx[rebuilt]}
rm -rf "$WORK"
mkdir -p "$WORK/state"
export TESSERA_STATE_DIR=$WORK/state
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
"$TESSERA" make "$OLD" --store "$WORK/store" --index "$WORK/old.tidx" -q
"$TESSERA" make "$NEW" --store "$WORK/store" --index "$WORK/new.tidx" -q
cat "$OLD" "$NEW" >/dev/null

# timed NAME CMD...: appends "wall_s cpu_s" of CMD to $WORK/NAME.t.
timed() {
    local name=$1; shift
    "$TIME" -f '%e %U %S' -o "$WORK/one" "$@" >/dev/null
    awk '{ printf "%s %.2f\n", $1, $2 + $3 }' "$WORK/one" >>"$WORK/$name.t"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

for run in $(seq "$RUNS"); do
    echo "== run $run/$RUNS" >&2
    cp --sparse=always "$OLD" "$WORK/target.img"; sync
    timed scan "$TESSERA" sync "$WORK/new.tidx" "$WORK/target.img" --store "$WORK/store" --rescan -q
    cmp "$WORK/target.img" "$NEW"
    cp --sparse=always "$OLD" "$WORK/target.img"; sync
    "$TESSERA" sync "$WORK/old.tidx" "$WORK/target.img" --store "$WORK/store" -q
    timed remembered "$TESSERA" sync "$WORK/new.tidx" "$WORK/target.img" --store "$WORK/store" -q
    cmp "$WORK/target.img" "$NEW"
done

echo "## In-place update with a remembered seed index (benches/remembered.sh)"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), \`nproc\` $(nproc), load average at the start $LOAD"
echo "(the machine is shared: compare CPU seconds and the two rows of one run). Image:"
echo "\`ext4 --size $SIZE\` old -> rebuilt, in place, local store, median of $RUNS runs."
echo
echo "| sync | wall s | CPU s (user + sys) | runs (wall/CPU) |"
echo "| --- | --- | --- | --- |"
for name in scan remembered; do
    wall=$(cut -d' ' -f1 "$WORK/$name.t" | median)
    cpu=$(cut -d' ' -f2 "$WORK/$name.t" | median)
    all=$(tr '\n' ',' <"$WORK/$name.t" | sed 's/ /\//g; s/,$//; s/,/, /g')
    echo "| $name | $wall | $cpu | $all |"
done
