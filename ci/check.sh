#!/usr/bin/env bash
# The full check CI runs: formatting, lints, then the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== tests (README test command)"
cargo test --workspace
