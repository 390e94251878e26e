#!/usr/bin/env bash
# Fuzz the parsers that read what a peer sends: the HBONE CONNECT request and its headers
# (hbone/fuzz: connect_request) and the waypoint's handling of a tunnel's HTTP/1.1 bytes
# (waypoint/fuzz: http1_request: detection, head, framing, policy and routing decision,
# upstream head, response parsers). Needs cargo-fuzz; on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags it needs.
# Usage: ci/fuzz.sh [seconds per target] [hbone|waypoint|all]   (default 60 all)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
secs="${1:-60}"
which="${2:-all}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
run() {
    (cd "$root/$1" && RUSTC_BOOTSTRAP=1 cargo fuzz run "$2" -- -max_total_time="$secs")
}
case "$which" in
    hbone) run hbone connect_request ;;
    waypoint) run waypoint http1_request ;;
    all) run hbone connect_request; run waypoint http1_request ;;
    *) echo "usage: $0 [seconds] [hbone|waypoint|all]" >&2; exit 2 ;;
esac
