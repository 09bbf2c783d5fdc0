#!/usr/bin/env bash
# The test command from README.md: installs the Debian packages the tests use (needs
# root; apt-get runs only when something is missing), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
cargo test --workspace --no-fail-fast
# Every parser of untrusted bytes, fuzzed for a bounded time from the seed corpus (docs/TRUST.md).
bash fuzz/run.sh "${FUZZ_SECONDS:-30}"
