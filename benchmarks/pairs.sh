#!/usr/bin/env bash
# Interleaved before/after pairs of the purchase path: `bazar-bench --start --only ops`
# from two checkouts (e.g. `git worktree add ../before <commit>`), each with its own
# .venv (`python3 -m venv .venv && .venv/bin/pip install -e '.[bench]'`), one after
# the other, N times; one line per run with the purchase figures of both clusters.
#
#     benchmarks/pairs.sh ../before . 5
#
# Only ratios within a pair mean anything on a shared machine.
set -euo pipefail
before=$(cd "$1" && pwd); after=$(cd "$2" && pwd); n=${3:-5}
out=${PAIRS_OUT:-$(mktemp -d /tmp/bazar-pairs.XXXXXX)}
# a figure of section 1's purchase rows, its column found by the header's name
row() { awk -F'|' -v cache="$2" -v conns="$3" -v name="$4" '
  /^\| op \|/ { for (i = 1; i <= NF; i++) { h = $i; gsub(/^ +| +$/, "", h); if (h == name) col = i } }
  $0 ~ "^\\| purchase \\| " cache " \\| " conns " \\|" && col { v = $col; gsub(/ /, "", v); print v; exit }' "$1"; }
for i in $(seq 1 "$n"); do
  for side in before after; do
    dir=$before; [ "$side" = after ] && dir=$after
    run="$out/$side-$i"; mkdir -p "$run"
    (cd "$dir" && timeout 600 .venv/bin/bazar-bench --start --only ops --no-plots --out "$run" >"$run/log" 2>&1)
    r="$run/report.md"
    echo "pair $i $side: cache on: p50 $(row "$r" on 1 "p50 ms") ms, $(row "$r" on 16 "req/s")/s at 16;" \
         "cache off: p50 $(row "$r" off 1 "p50 ms") ms, $(row "$r" off 16 "req/s")/s at 16"
  done
done
echo "reports in $out"
