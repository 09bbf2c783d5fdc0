#!/usr/bin/env bash
# tessera make / sync beside casync make / extract on the same >= 1 GiB ext4 image, in the
# same run. Run by hand (not part of the test suite):
#
#   benches/make-sync.sh                 # 1 GiB image, 3 runs of each step
#   SIZE=2G RUNS=5 benches/make-sync.sh
#
# Needs: cargo, casync, GNU time (/usr/bin/time, Debian package `time`), e2fsprogs.
# Every step runs RUNS times with a warm page cache (the image is read once first, so
# neither tool pays for cold reads); the median wall time and CPU time (user + sys) are
# reported, and peak memory is the largest maximum RSS over the runs. The tools take turns
# going first. Each run writes fresh stores and outputs under $WORK (same file system as
# the image) and nothing is deleted until the end: ext4 without a journal scans recently
# deleted inodes when it allocates new ones, which would tax whichever tool runs right after
# a deletion. `tessera make` ends with a syncfs of the store (its index is only published
# once the chunks are durable); casync does not sync, so a "casync make + sync" row gives
# the like-for-like figure. The markdown section for benches/RESULTS.md is printed at the
# end and written to $WORK/make-sync.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
WORK=${WORK:-$ROOT/target/bench/make-sync}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
CHUNKS=${CHUNKS:-16384:65536:262144}   # the same min:avg:max for both tools (casync's default)
TESSERA=$ROOT/target/release/tessera
TIME=/usr/bin/time

for tool in casync "$TIME"; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install casync time)" >&2; exit 1; }
done

echo "== building (release)" >&2
cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"

echo "== ext4 fixture, size $SIZE" >&2
declare -A fx
while read -r role path; do fx[$role]=$path; done \
    < <("$ROOT/target/release/tessera-fixtures" build ext4 "$FIXTURES" --size "$SIZE")
OLD=${fx[old]} NEW=${fx[rebuilt]}
BYTES=$(stat -c %s "$OLD")
mkdir -p "$WORK"
cat "$OLD" "$NEW" >/dev/null
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
rss_mib() { cut -d' ' -f2 "$WORK/$1.t" | sort -n | tail -1 | awk '{printf "%.0f", $1/1024}'; }
mbps() { awk -v b="$BYTES" -v s="$1" 'BEGIN {printf "%.0f", b/s/1e6}'; }

rm -rf "$WORK"/*.t "$WORK"/run*
sync
for run in $(seq "$RUNS"); do
    echo "== run $run/$RUNS" >&2
    R=$WORK/run$run
    mkdir -p "$R"
    t_make() {
        timed t-make "$TESSERA" make "$OLD" --store "$R/t-store" --index "$R/t.tidx" \
            --chunk-size 16K:64K:256K --json -q
        cp "$WORK/t-make.out" "$WORK/t-make.json"
    }
    c_make() {
        timed c-make casync make --store="$R/c-store" --compression=zstd --chunk-size=$CHUNKS \
            "$R/c.caibx" "$OLD"
    }
    c_make_sync() {
        timed c-make-sync sh -c 'casync make --store="$1" --compression=zstd --chunk-size="$2" \
            "$3" "$4" && sync -f "$1"' sh "$R/c-store-s" "$CHUNKS" "$R/c-s.caibx" "$OLD"
    }
    if (( run % 2 )); then t_make; c_make; c_make_sync; else c_make_sync; c_make; t_make; fi

    # The next release into the same store: only its new chunks are compressed and written.
    timed t-make-next "$TESSERA" make "$NEW" --store "$R/t-store" --index "$R/t-next.tidx" \
        --chunk-size 16K:64K:256K --json -q
    cp "$WORK/t-make-next.out" "$WORK/t-make-next.json"
    timed c-make-next casync make --store="$R/c-store" --compression=zstd --chunk-size=$CHUNKS \
        "$R/c-next.caibx" "$NEW"

    timed t-sync "$TESSERA" sync "$R/t.tidx" "$R/t-out" --store "$R/t-store" --json -q
    cp "$WORK/t-sync.out" "$WORK/t-sync.json"
    cmp "$OLD" "$R/t-out"
    timed c-extract casync extract --store="$R/c-store" "$R/c.caibx" "$R/c-out"
    cmp "$OLD" "$R/c-out"
done

json() { grep -o "\"$2\": *[0-9]*" "$WORK/$1.json" | head -1 | grep -o '[0-9]*$'; }
t_store=$(du -sb "$WORK/run1/t-store" | cut -f1)
c_store=$(du -sb "$WORK/run1/c-store" | cut -f1)
c_chunks=$(find "$WORK/run1/c-store" -name '*.cacnk' | wc -l)
ratio() { awk -v a="$(secs "$1")" -v b="$(secs "$2")" 'BEGIN {printf "%.1f", b/a}'; }
cpu_ratio() { awk -v a="$(cpu_secs "$1")" -v b="$(cpu_secs "$2")" 'BEGIN {printf "%.1f", b/a}'; }

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem=$(free -g | awk '/^Mem:/ {print $2}')
{
echo "## make / sync vs casync (benches/make-sync.sh)"
echo
echo "$(date -u +%Y-%m-%d), \`nproc\` $(nproc), $cpu, ${mem} GiB RAM, $(uname -r); load average"
echo "at the start $LOAD (the machine is shared)."
echo "Image: ext4 fixture \`ext4 --size $SIZE\` ($BYTES bytes, $(( BYTES / 1048576 )) MiB; release N"
echo "\`old.img\`, release N+1 \`new.img\`), page cache warm, median of $RUNS runs, peak RSS"
echo "the largest of the runs. Both tools cut chunks at $CHUNKS bytes and compress"
echo "with zstd; casync hashes with its default SHA-512/256, tessera with BLAKE3."
echo
echo "| step | tessera: wall, rate, CPU, peak RSS | casync: wall, rate, CPU, peak RSS | speed-up wall / CPU |"
echo "| --- | --- | --- | --- |"
cell() { echo "$(secs "$1") s, $(mbps "$(secs "$1")") MB/s, $(cpu_secs "$1") CPU-s, $(rss_mib "$1") MiB"; }
for step in "make:t-make:c-make" "make vs casync make + sync:t-make:c-make-sync" \
    "make next release, same store:t-make-next:c-make-next" \
    "sync / extract into a new file:t-sync:c-extract"; do
    IFS=: read -r label t c <<<"$step"
    echo "| $label | $(cell "$t") | $(cell "$c") | $(ratio "$t" "$c")× / $(cpu_ratio "$t" "$c")× |"
done
echo
echo "Stores after both releases: tessera $((t_store / 1048576)) MiB (release N: $(json t-make chunk_count) chunks,"
echo "$(json t-make unique_chunks) unique; release N+1 added $(json t-make-next new_chunks) new chunks), casync"
echo "$((c_store / 1048576)) MiB in $c_chunks chunk files. Both outputs compared equal to the image (\`cmp\`)."
} | tee "$WORK/make-sync.md"
rm -rf "$WORK"/run*
