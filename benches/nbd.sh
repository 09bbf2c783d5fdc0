#!/usr/bin/env bash
# tessera serve beside qemu-nbd and nbdkit (file plugin) serving the same >= 1 GiB image,
# read in full by nbdcopy to null:, in the same run. Run by hand (not in the test suite):
#
#   benches/nbd.sh                  # 1 GiB "mixed" fixture, 3 runs per case
#   SIZE=2G RUNS=5 benches/nbd.sh
#
# Needs: cargo, qemu-utils (qemu-nbd), nbdkit, libnbd-bin (nbdcopy).
# qemu-nbd and nbdkit serve the raw image, warm in the page cache. tessera serves the
# image's index and a local store: "warm" runs after one full read (every chunk in the
# decompressed-chunk cache, --cache-size larger than the image), "cold" runs each start
# a fresh server (empty cache; the store's files are in the page cache, so a cold read
# costs decompression and hashing). Two read modes: "all bytes" (nbdcopy --no-extents:
# every byte crosses the socket) and "extents" (nbdcopy's default: zero extents are
# skipped). The median wall time of RUNS is reported. The markdown section for
# benches/RESULTS.md is printed at the end and written to $WORK/nbd.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=${SIZE:-1G}
RUNS=${RUNS:-3}
WORK=${WORK:-$ROOT/target/bench/nbd}
FIXTURES=${FIXTURES:-$ROOT/target/fixtures}
TESSERA=$ROOT/target/release/tessera
PORT_T=${PORT_T:-10901} PORT_Q=${PORT_Q:-10902} PORT_K=${PORT_K:-10903}

for tool in qemu-nbd nbdkit nbdcopy; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-utils nbdkit libnbd-bin)" >&2; exit 1; }
done

echo "== building (release)" >&2
cargo build --release -q -p tessera-cli -p tessera-fixtures --manifest-path "$ROOT/Cargo.toml"

echo "== mixed fixture, size $SIZE" >&2
IMG=$("$ROOT/target/release/tessera-fixtures" build mixed "$FIXTURES" --size "$SIZE" | awk '$1 == "image" {print $2}')
BYTES=$(stat -c %s "$IMG")
mkdir -p "$WORK"
rm -rf "$WORK/store"
"$TESSERA" make -q --store "$WORK/store" --index "$WORK/img.tidx" "$IMG"
cat "$IMG" >/dev/null
find "$WORK/store" -type f -exec cat {} + >/dev/null
CACHE=$((BYTES * 2))

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        nbdinfo --size "nbd://127.0.0.1:$1/$2" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "server on port $1 did not come up" >&2; exit 1
}
start_tessera() {
    "$TESSERA" serve "$WORK/img.tidx" --store "$WORK/store" --cache-size "$CACHE" \
        --listen "127.0.0.1:$PORT_T" >"$WORK/tessera.out" 2>"$WORK/tessera.err" &
    TPID=$!
    wait_port "$PORT_T" img
}
stop_tessera() { kill -TERM "$TPID"; wait "$TPID" || true; }
# CPU seconds (user + sys) the tessera server has used so far.
cpu_tessera() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$TPID/stat"; }

# copy URI MODE: wall seconds of one nbdcopy of URI to null:
copy() {
    local flags=()
    [[ $2 == all ]] && flags=(--no-extents)
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy "${flags[@]}" "$1" null:
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# runs URI MODE: median of RUNS copies
runs() { for _ in $(seq "$RUNS"); do copy "$1" "$2"; done | median; }

qemu-nbd --read-only --format=raw --persistent --shared=16 --bind 127.0.0.1 --port "$PORT_Q" \
    --export-name img "$IMG" 2>"$WORK/qemu-nbd.err" &
PIDS+=($!)
nbdkit --foreground --readonly --ipaddr 127.0.0.1 --port "$PORT_K" --exportname img \
    file "$IMG" 2>"$WORK/nbdkit.err" &
PIDS+=($!)
wait_port "$PORT_Q" img
wait_port "$PORT_K" img

declare -A T CPU
LOAD0=$(cut -d' ' -f1 /proc/loadavg)
for mode in all extents; do
    echo "== cold tessera ($mode)" >&2
    cold=() cpu=()
    for _ in $(seq "$RUNS"); do
        start_tessera
        c0=$(cpu_tessera)
        cold+=("$(copy "nbd://127.0.0.1:$PORT_T/img" "$mode")")
        cpu+=("$(echo "$(cpu_tessera) - $c0" | bc -l)")
        stop_tessera
    done
    T[cold-$mode]=$(printf '%s\n' "${cold[@]}" | median)
    CPU[cold-$mode]=$(printf '%s\n' "${cpu[@]}" | median)
    echo "== warm tessera ($mode)" >&2
    start_tessera
    copy "nbd://127.0.0.1:$PORT_T/img" all >/dev/null
    c0=$(cpu_tessera)
    T[tessera-$mode]=$(runs "nbd://127.0.0.1:$PORT_T/img" "$mode")
    CPU[tessera-$mode]=$(echo "($(cpu_tessera) - $c0) / $RUNS" | bc -l)
    stop_tessera
    echo "== qemu-nbd ($mode)" >&2
    T[qemu-$mode]=$(runs "nbd://127.0.0.1:$PORT_Q/img" "$mode")
    echo "== nbdkit file ($mode)" >&2
    T[nbdkit-$mode]=$(runs "nbd://127.0.0.1:$PORT_K/img" "$mode")
done

gibs() { echo "$BYTES / $1 / 1073741824" | bc -l | xargs printf '%.2f'; }
ratio() { echo "$2 / $1" | bc -l | xargs printf '%.2f'; }
{
    echo "## NBD: \`tessera serve\` vs qemu-nbd and nbdkit (benches/nbd.sh)"
    echo
    echo "$(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d). Image: fixture \`mixed\`, $BYTES bytes;"
    echo "\`nbdcopy URI null:\` (libnbd $(nbdcopy --version | head -1 | awk '{print $2}')), median of $RUNS runs."
    echo "qemu-nbd ($(qemu-nbd --version | head -1 | awk '{print $NF}')) and nbdkit file serve the raw image from the page cache;"
    echo "tessera serves index + local store, warm = every chunk in its decompressed cache,"
    echo "cold = fresh server (store files in the page cache: decompression + BLAKE3 bound)."
    echo
    echo "Load average $LOAD0 at the start, $(cut -d' ' -f1 /proc/loadavg) at the end (other sessions share the 2 cores)."
    echo
    echo "| server | all bytes (--no-extents) s | GiB/s | extents (default) s | GiB/s | tessera speed relative to it (all / extents) |"
    echo "| --- | --- | --- | --- | --- | --- |"
    for s in tessera cold qemu nbdkit; do
        case $s in
            tessera) name="tessera serve, warm" ;;
            cold) name="tessera serve, cold" ;;
            qemu) name="qemu-nbd" ;;
            nbdkit) name="nbdkit file" ;;
        esac
        rel="—"
        if [[ $s == qemu || $s == nbdkit ]]; then
            rel="$(ratio "${T[tessera-all]}" "${T[$s-all]}")× / $(ratio "${T[tessera-extents]}" "${T[$s-extents]}")×"
        fi
        printf '| %s | %.2f | %s | %.2f | %s | %s |\n' "$name" "${T[$s-all]}" "$(gibs "${T[$s-all]}")" \
            "${T[$s-extents]}" "$(gibs "${T[$s-extents]}")" "$rel"
    done
    echo
    echo "Relative speed = other server's time / warm tessera time (> 1: tessera is faster)."
    printf 'tessera server CPU per full read (user + sys): warm %.2f s (all) / %.2f s (extents), cold %.2f s / %.2f s.\n' \
        "${CPU[tessera-all]}" "${CPU[tessera-extents]}" "${CPU[cold-all]}" "${CPU[cold-extents]}"
} | tee "$WORK/nbd.md"
