#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 60), starting from the
# committed seed corpus in corpus/TARGET. New interesting inputs go to a scratch
# directory, so the committed corpus only changes by hand. A crash stops the run with a
# non-zero status and leaves the input in artifacts/TARGET/ (replay it with
# `fuzz/run.sh`'s flags: `cargo fuzz run -O TARGET artifacts/TARGET/crash-…`); fix it
# with a regression test.
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]
#
# Only the stable toolchain is needed: cargo-fuzz passes nightly-only flags (-Z
# sanitizer, coverage instrumentation), which stable rustc accepts with RUSTC_BOOTSTRAP=1.
# cargo-fuzz itself is installed from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list)
fi

# Built outside the work tree and kept between runs (like a CI cache): the instrumented
# dependencies take minutes to build on a small machine, the project's own crates seconds.
target_dir=${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera-fuzz/target}
mkdir -p "$target_dir"

# Release code with debug assertions (overflow checks and debug_assert! fire as crashes);
# 16 codegen units build faster on a small CI machine, for slightly slower runs.
flags=(-O --debug-assertions --codegen-units 16 --target-dir "$target_dir")
started=$SECONDS
cargo fuzz build "${flags[@]}"
echo "fuzz: built ${#targets[@]} targets in $((SECONDS - started)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
passed=0
failed=0
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "corpus/$t"
  log="$scratch/$t.log"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: runaway allocation (which
  # also stands in for leak checks: LeakSanitizer reports glibc's per-thread destructor
  # lists of the threads the HTTP client starts, and a leak is not memory-unsafe).
  if cargo fuzz run "${flags[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -detect_leaks=0 \
      -print_final_stats=1 \
      >"$log" 2>&1; then
    runs=$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    echo "fuzz: $t ok, $runs runs in ${seconds} s"
    passed=$((passed + 1))
  else
    echo "fuzz: $t FAILED"
    tail -n 60 "$log"
    failed=$((failed + 1))
  fi
done
echo "fuzz: $passed targets ran without a crash, $failed crashed"
((failed == 0))
