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
row() { grep -E "^\| purchase \| $2 \| $3 \|" "$1" | awk -F'|' -v col="$4" '{gsub(/ /, "", $col); print $col}'; }
for i in $(seq 1 "$n"); do
  for side in before after; do
    dir=$before; [ "$side" = after ] && dir=$after
    run="$out/$side-$i"; mkdir -p "$run"
    (cd "$dir" && timeout 600 .venv/bin/bazar-bench --start --only ops --no-plots --out "$run" >"$run/log" 2>&1)
    r="$run/report.md"
    echo "pair $i $side: cache on: p50 $(row "$r" on 1 9) ms, $(row "$r" on 16 6)/s at 16;" \
         "cache off: p50 $(row "$r" off 1 9) ms, $(row "$r" off 16 6)/s at 16"
  done
done
echo "reports in $out"
