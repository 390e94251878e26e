#!/usr/bin/env bash
# The full check CI runs: formatting, lints, then the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
# Disk left for the build (a clean test build takes about 2 GB); printed for the CI log.
df -h . || true
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== tests (README test command)"
cargo test --workspace
