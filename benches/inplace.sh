#!/usr/bin/env bash
# In-place update of a >= 1 GiB ext4 release pair: tessera sync beside casync extract and
# bita clone, same images, same run. Run by hand (not part of the test suite):
#
#   benches/inplace.sh                      # 1 GiB, both new releases, 3 runs each
#   SIZE=2G RUNS=5 PAIRS=edited benches/inplace.sh
#
# Needs: cargo, casync, GNU time (/usr/bin/time), e2fsprogs, and bita, a benchmark peer
# only (never a dependency): `cargo install bita` (set BITA=/path/to/bita if it is not on
# PATH or in ~/.cargo/bin).
#
# Each run starts from a fresh copy of release N (`old.img`) as the target, page cache warm,
# and updates it in place to release N+1 from a local store, the target being its own seed:
#   tessera  sync NEW.tidx TARGET --store STORE
#   casync   extract --seed=TARGET --store=STORE NEW.caibx OUT   (casync cannot update a
#            file in place: with --seed-output=yes on the existing file it fails with "Stale
#            file handle"; so it writes a new file OUT, seeded by the old release)
#   bita     clone --seed-output NEW.cba TARGET
# Reported per tool: wall time (median), bytes fetched from the store (uncompressed, as each
# tool reports it), bytes written to the target (the kernel's per-process write accounting:
# GNU time's "file system outputs" × 512; a hole punched is not a write), peak RSS. tessera
# flushes the target (and its journal) before it exits; the peers do not, so a "+ sync"
# row adds `sync -f` on the target for them. All three cut 16:64:256 KiB chunks; tessera
# and casync compress with zstd, bita 0.15 with brotli (it has no zstd). Every output is
# compared with the image.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
PAIRS=${PAIRS:-"rebuilt edited"}
WORK=${WORK:-$ROOT/target/bench/inplace}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TESSERA=$TARGET_DIR/release/tessera
TIME=/usr/bin/time
BITA=${BITA:-$(command -v bita || echo "$HOME/.cargo/bin/bita")}

for tool in casync "$TIME" "$BITA"; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install casync time; cargo install bita)" >&2; exit 1; }
done

echo "== building (release)" >&2
cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"

echo "== ext4 fixture, size $SIZE" >&2
declare -A fx
while read -r role path; do fx[$role]=$path; done \
    < <("$TARGET_DIR/release/tessera-fixtures" build ext4 "$FIXTURES" --size "$SIZE")
OLD=${fx[old]}
BYTES=$(stat -c %s "$OLD")
mkdir -p "$WORK"
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

# timed NAME CMD...: runs CMD under GNU time; appends "wall_s max_rss_kib outputs_512 user_s
# sys_s" to
# $WORK/NAME.t and keeps stdout/stderr of the last run in $WORK/NAME.out / .err.
timed() {
    local name=$1; shift
    "$TIME" -f '%e %M %O %U %S' -o "$WORK/$name.one" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
        echo "$name failed:" >&2; cat "$WORK/$name.err" >&2; exit 1; }
    cat "$WORK/$name.one" >>"$WORK/$name.t"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
secs() { cut -d' ' -f1 "$WORK/$1.t" | median; }
cpu_secs() { awk '{printf "%.2f\n", $4 + $5}' "$WORK/$1.t" | median; }
rss_mib() { cut -d' ' -f2 "$WORK/$1.t" | sort -n | tail -1 | awk '{printf "%.0f", $1/1024}'; }
written_mib() { cut -d' ' -f3 "$WORK/$1.t" | median | awk '{printf "%.1f", $1*512/1048576}'; }
# casync and bita print sizes for humans ("2.5M", "12.3 MiB"): normalise to MiB.
to_mib() { awk '{v=$1; u=$2; if (u=="") {u=v; gsub(/[0-9.]/,"",u); gsub(/[^0-9.]/,"",v)}
    m=1/1048576; if (u ~ /^K/) m=1/1024; if (u ~ /^M/) m=1; if (u ~ /^G/) m=1024;
    printf "%.1f", v*m}'; }

{
echo "## In-place update vs casync and bita (benches/inplace.sh)"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), \`nproc\` $(nproc), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM,"
echo "load average at the start $LOAD (the machine is shared). Image: \`ext4 --size $SIZE\`"
echo "fixture ($BYTES bytes). Target: a fresh copy of release N updated in place to"
echo "release N+1, page cache warm, median of $RUNS runs; store local. \"Fetched\" is"
echo "uncompressed bytes taken from the store as the tool reports it; \"written\" is what the"
echo "kernel accounted as written by the process."
} >"$WORK/inplace.md"

for pair in $PAIRS; do
    NEW=${fx[$pair]}
    P=$WORK/$pair
    rm -rf "$P" "$WORK"/*.t
    mkdir -p "$P"
    echo "== $pair: stores" >&2
    "$TESSERA" make "$NEW" --store "$P/t-store" --index "$P/new.tidx" --chunk-size 16K:64K:256K -q
    casync make --store="$P/c-store" --compression=zstd --chunk-size=16384:65536:262144 \
        "$P/new.caibx" "$NEW" >/dev/null
    # bita 0.15 compresses with brotli (its default) or not at all.
    "$BITA" compress --input "$NEW" --min-chunk-size 16KiB --avg-chunk-size 64KiB \
        --max-chunk-size 256KiB "$P/new.cba" >/dev/null 2>&1
    cat "$OLD" "$NEW" >/dev/null
    for run in $(seq "$RUNS"); do
        echo "== $pair: run $run/$RUNS" >&2
        for tool in tessera casync bita; do
            cp --sparse=always "$OLD" "$P/target.img"
            sync
            case $tool in
            tessera)
                timed t "$TESSERA" sync "$P/new.tidx" "$P/target.img" --store "$P/t-store" --json -q
                cp "$WORK/t.out" "$WORK/t.json" ;;
            casync)
                rm -f "$P/c-out.img"
                timed c casync extract --verbose --seed-output=no --seed="$P/target.img" \
                    --store="$P/c-store" "$P/new.caibx" "$P/c-out.img"
                cp "$WORK/c.err" "$WORK/c.log"
                timed c-sync sync -f "$P/c-out.img"
                mv "$P/c-out.img" "$P/target.img" ;;
            bita)
                timed b "$BITA" clone --seed-output "$P/new.cba" "$P/target.img"
                cat "$WORK/b.out" "$WORK/b.err" >"$WORK/b.log"
                timed b-sync sync -f "$P/target.img" ;;
            esac
            cmp "$NEW" "$P/target.img" || { echo "$tool produced a wrong image" >&2; exit 1; }
        done
    done
    tj() { grep -o "\"$1\": *[0-9]*" "$WORK/t.json" | grep -o '[0-9]*$'; }
    t_fetched=$(awk -v b="$(tj bytes_fetched)" 'BEGIN {printf "%.1f", b/1048576}')
    t_down=$(awk -v b="$(tj bytes_downloaded)" 'BEGIN {printf "%.1f", b/1048576}')
    c_fetched=$(grep -m1 'Bytes used from local store' "$WORK/c.log" | sed 's/.*store: *\([0-9.]*\) *\([A-Za-z]*\).*/\1 \2/' | to_mib)
    b_fetched=$(grep -o 'decompressed to [^(]*([0-9]* bytes)' "$WORK/b.log" | grep -o '([0-9]*' | tr -d '(' |
        awk '{printf "%.1f", $1/1048576}')
    plus() { awk -v a="$(secs "$1")" -v b="$(secs "$2")" 'BEGIN {printf "%.2f", a+b}'; }
    best=$(awk -v c="$(plus c c-sync)" -v b="$(plus b b-sync)" 'BEGIN {print (c<b)?c:b}')
    {
    echo
    echo "### release N+1 $pair ($(stat -c %s "$NEW") bytes)"
    echo
    echo "| tool | wall | wall + sync | CPU | fetched from store | written to target | peak RSS |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    echo "| tessera sync | $(secs t) s | (included) | $(cpu_secs t) s | $t_fetched MiB ($t_down MiB compressed) | $(written_mib t) MiB | $(rss_mib t) MiB |"
    echo "| casync extract --seed | $(secs c) s | $(plus c c-sync) s | $(cpu_secs c) s | $c_fetched MiB | $(written_mib c) MiB | $(rss_mib c) MiB |"
    echo "| bita clone --seed-output | $(secs b) s | $(plus b b-sync) s | $(cpu_secs b) s | $b_fetched MiB | $(written_mib b) MiB | $(rss_mib b) MiB |"
    echo
    echo "tessera: $(tj bytes_in_place) bytes in place, $(tj bytes_moved) moved, $(tj phases) phases;"
    echo "speed-up over the faster peer (both durable): $(awk -v t="$(secs t)" -v p="$best" 'BEGIN {printf "%.1f", p/t}')×."
    } >>"$WORK/inplace.md"
done
cat "$WORK/inplace.md"
