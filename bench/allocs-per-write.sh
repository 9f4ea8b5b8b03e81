#!/usr/bin/env bash
# Heap allocations per mirrored client write, per msld thread.
#
#   sudo bench/allocs-per-write.sh [BIN_DIR] [JOB] [SECONDS]
#
# Runs `msl-bench nbd` (one run of JOB, default randwrite-4k-qd1, against
# the mirrored pair only) with the msld in BIN_DIR (default
# target/release), counts malloc/calloc/realloc calls of both msld
# processes with a perf uprobe on libc while fio runs, and divides by the
# writes fio completed in that window. Needs perf (linux-perf).
set -euo pipefail

bin=${1:-target/release}
job=${2:-randwrite-4k-qd1}
secs=${3:-10}
bin=$(cd "$bin" && pwd)
libc=$(ldconfig -p | awk '/libc.so.6 .*x86-64/ {print $NF; exit}')
work=$(mktemp -d)
probes=()
cleanup() {
    for p in "${probes[@]}"; do perf probe -q -d "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

for f in malloc calloc realloc; do
    perf probe -q -x "$libc" "allocs_$f=$f" >/dev/null 2>&1 || true
    probes+=("probe_libc:allocs_$f")
done

MSL_BIN_DIR=$bin "$bin/msl-bench" nbd --runs 1 --seconds "$secs" --ramp 1 \
    --jobs "$job" --servers msl --no-fill --json --chart "$work/chart.svg" \
    >"$work/bench.json" 2>"$work/bench.log" &
bench=$!

# Wait for fio's measured phase: the ramp second after it starts.
for _ in $(seq 240); do
    pgrep -f "^fio .*--name=$job" >/dev/null && break
    sleep 0.5
done
sleep 1
pids=$(pgrep -f "^$bin/msld " | paste -sd, || true)
[ -n "$pids" ] || { echo "no msld running from $bin" >&2; exit 1; }
window=$((secs - 2))
perf stat -x, --per-thread -e "$(IFS=,; echo "${probes[*]}")" -p "$pids" \
    -o "$work/stat.csv" -- sleep "$window" >/dev/null 2>&1
wait "$bench"

iops=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    try: o = json.loads(l)
    except ValueError: continue
    if o.get("server") == "msl": print(o.get("iops", 0)); break' "$work/bench.json")
python3 - "$work/stat.csv" "$iops" "$window" "$job" <<'EOF'
import collections, sys
path, iops, window, job = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
per = collections.Counter()
for line in open(path):
    f = line.strip().split(",")
    if len(f) < 4 or not f[1].replace(".", "").isdigit():
        continue
    thread = f[0].rsplit("-", 1)[0]
    per[thread] += float(f[1])
writes = iops * window
total = sum(per.values())
print(f"{job}: {iops:.0f} IOPS, ~{writes:.0f} writes in the {window:.0f} s window")
for t, n in per.most_common():
    if n / writes >= 0.001:
        print(f"  {t:<16} {n / writes:7.3f} allocations per write ({n:.0f})")
print(f"  {'both msld':<16} {total / writes:7.3f} allocations per write ({total:.0f})")
EOF
