#!/usr/bin/env bash
# Fuzz the HBONE CONNECT request/header parsing (hbone/fuzz). Needs cargo-fuzz; on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags it needs.
# Usage: ci/fuzz.sh [seconds]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/../hbone"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
RUSTC_BOOTSTRAP=1 cargo fuzz run connect_request -- -max_total_time="${1:-60}"
