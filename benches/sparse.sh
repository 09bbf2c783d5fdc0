#!/usr/bin/env bash
# A sparse VM disk against its data alone: tessera make / sync / verify of a 32 GiB sparse
# file holding the 1 GiB ext4 fixture (cut in four 256 MiB pieces placed across the disk),
# beside the same commands on the 1 GiB fixture itself, with qemu-img convert and casync
# make as peers, in the same run. Run by hand (not part of the test suite):
#
#   benches/sparse.sh                        # 32 GiB disk, 1 GiB of data, 3 runs
#   SIZE=8G RUNS=1 benches/sparse.sh
#   FIXTURES=/work/main/target/fixtures benches/sparse.sh   # reuse built fixtures
#
# Needs: cargo, qemu-img, casync, GNU time (/usr/bin/time). Every step runs RUNS times with
# a warm page cache; the median wall time and CPU time (user + sys) are reported. Each run
# makes into a fresh store and syncs into a fresh file, deleted after the run (the disk
# holds one store and one copy at a time). casync make of the sparse disk reads and chunks
# every zero (minutes): it runs once. The markdown table for benches/RESULTS.md is printed
# at the end and written to $WORK/sparse.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-32G}
RUNS=${RUNS:-3}
WORK=${WORK:-$ROOT/target/bench/sparse}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
TESSERA=$ROOT/target/release/tessera
TIME=/usr/bin/time

for tool in qemu-img casync "$TIME"; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-utils casync time)" >&2; exit 1; }
done

echo "== building (release)" >&2
cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"

echo "== ext4 fixture (1 GiB) and a $SIZE sparse disk holding it" >&2
declare -A fx
while read -r role path; do fx[$role]=$path; done \
    < <("$ROOT/target/release/tessera-fixtures" build ext4 "$FIXTURES" --size 1G)
ALONE=${fx[old]}
rm -rf "$WORK"
mkdir -p "$WORK"
DISK=$WORK/disk.img
truncate -s "$SIZE" "$DISK"
DISK_BYTES=$(stat -c %s "$DISK")
PIECE=$((256 << 20))
# Pieces at the start, at one and two thirds, and at the end of the disk.
OFFSETS=(0 $((DISK_BYTES / 3 / 4096 * 4096)) $((DISK_BYTES * 2 / 3 / 4096 * 4096)) $((DISK_BYTES - PIECE)))
for i in 0 1 2 3; do
    dd if="$ALONE" of="$DISK" bs=1M skip=$((i * 256)) count=256 seek="${OFFSETS[$i]}" \
        oflag=seek_bytes conv=sparse,notrunc status=none
done
cat "$ALONE" "$DISK" >/dev/null
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# timed NAME CMD...: runs CMD under GNU time, appends "wall_s max_rss_kib user_s sys_s" to
# $WORK/NAME.t
timed() {
    local name=$1; shift
    "$TIME" -f '%e %M %U %S' -o "$WORK/$name.one" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
        echo "$name failed:" >&2; cat "$WORK/$name.err" >&2; exit 1; }
    cat "$WORK/$name.one" >>"$WORK/$name.t"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
secs() { cut -d' ' -f1 "$WORK/$1.t" | median; }
cpu_secs() { awk '{printf "%.2f\n", $3 + $4}' "$WORK/$1.t" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }

for run in $(seq 1 "$RUNS"); do
    echo "== run $run/$RUNS" >&2
    for subject in disk alone; do
        img=$DISK; [ "$subject" = alone ] && img=$ALONE
        store=$WORK/store-$subject out=$WORK/out-$subject.img
        rm -rf "$store" "$out"
        timed "make-$subject" "$TESSERA" make "$img" --store "$store" --index "$WORK/$subject.tidx" --json
        timed "sync-$subject" "$TESSERA" sync "$WORK/$subject.tidx" "$out" --store "$store" -q
        timed "verify-$subject" "$TESSERA" verify "$WORK/$subject.tidx" "$out" -q
        if [ "$run" = 1 ]; then
            qemu-img compare -f raw -F raw "$img" "$out" | grep -q "Images are identical" || {
                echo "sync of $subject differs from its image" >&2; exit 1; }
        fi
        stat -c %b "$out" | awk '{print $1 * 512}' >"$WORK/alloc-$subject"
        rm -rf "$out"
        timed "qemu-$subject" qemu-img convert -f raw -O raw "$img" "$out"
        rm -rf "$out" "$store"
    done
done

echo "== casync make (once each)" >&2
timed casync-disk casync make --store="$WORK/castr-disk" "$WORK/disk.caibx" "$DISK"
rm -rf "$WORK/castr-disk"
timed casync-alone casync make --store="$WORK/castr-alone" "$WORK/alone.caibx" "$ALONE"
rm -rf "$WORK/castr-alone"

idx_disk=$(stat -c %s "$WORK/disk.tidx")
idx_alone=$(stat -c %s "$WORK/alone.tidx")
zero_chunks=$(grep -o '"zero_chunks": *[0-9]*' "$WORK/make-disk.out" | grep -o '[0-9]*$')
{
    echo "### Sparse disk: $SIZE holding 1 GiB of data vs the 1 GiB alone ($(date -u +%F), load $LOAD at start, $RUNS runs)"
    echo
    echo "Disk: \`truncate -s $SIZE\`, the 1 GiB ext4 fixture cut in four 256 MiB pieces at"
    echo "offsets ${OFFSETS[*]}. \"Alone\" is the fixture itself. Median wall and CPU (user + sys)"
    echo "seconds; ratio = disk / alone. Index: $idx_disk bytes for the disk, $idx_alone alone"
    echo "($(ratio "$idx_disk" "$idx_alone")x; $zero_chunks zero chunks in the disk's index)."
    echo "Allocated after sync: $(cat "$WORK/alloc-disk") bytes for the disk, $(cat "$WORK/alloc-alone") alone."
    echo
    echo "| step | disk wall s | disk CPU s | alone wall s | alone CPU s | wall ratio | CPU ratio |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    for step in make sync verify qemu casync; do
        label=$step
        case $step in
            make) label="tessera make";; sync) label="tessera sync (new file)";;
            verify) label="tessera verify";; qemu) label="qemu-img convert";;
            casync) label="casync make (1 run)";;
        esac
        dw=$(secs "$step-disk") dc=$(cpu_secs "$step-disk")
        aw=$(secs "$step-alone") ac=$(cpu_secs "$step-alone")
        echo "| $label | $dw | $dc | $aw | $ac | $(ratio "$dw" "$aw") | $(ratio "$dc" "$ac") |"
    done
} | tee "$WORK/sparse.md"
