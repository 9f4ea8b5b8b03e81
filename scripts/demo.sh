#!/usr/bin/env bash
# The msl demo: a real mirrored pair in network namespaces, the SFT III
# failure scenarios one after another, narrated, then a latency histogram
# and a summary table. Needs root. Arguments go to msl-demo
# (e.g. --json, --scenarios 1,4).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: run as root (network namespaces, raw sockets): sudo bash scripts/demo.sh" >&2
    exit 2
fi
bash scripts/setup.sh >&2   # keep stdout for msl-demo (--json lines)
cargo build --release --bin msld --bin mslctl --bin msl-witness --bin msl-demo >&2
exec target/release/msl-demo "$@"
