#!/usr/bin/env bash
# The test command from README.md: installs the Debian packages the tests use (needs
# root, skipped when all are present), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
cargo build --release --workspace --bins
cargo test --release --workspace
