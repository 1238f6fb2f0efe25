"""The purchase path beside an earlier Bazar, in the same run (phase "baseline",
`--baseline DIR`).

The speed targets of a change are ratios to the code it started from ("purchase p50
≤ 0.35× today's"), and this machine's speed moves by a third within an hour: only a
ratio measured in one run, the two sides close together in time, means anything.

DIR is a checkout of the earlier code with its own virtualenv (`DIR/.venv/bin/bazar-bench`,
e.g. `git worktree add ../filed <commit>` then `python3 -m venv .venv && .venv/bin/pip
install -e '.[bench]'` there). Each side runs its own bench's phase 1 (`bazar-bench
--start --only ops --no-plots`: throw-away clusters of its own code, and its own
client), one after the other, `rounds` times, the first side alternating. A figure's
ratio is taken within each pair (this code's ÷ the baseline's) and the median of the
pairs is what the targets judge. A figure the baseline's bench does not measure (an
early bench took no purchases at 64 connections) is reported as such.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from bazar.bench.phases import Ctx, log

# the figures compared, from phase 1 of the cache-on cluster: "op/connections/statistic",
# and their names in the report
LABELS = {"purchase/1/p50_ms": "purchase p50, 1 conn", "purchase/16/rps": "purchases/s, 16 conns",
          "purchase/64/rps": "purchases/s, 64 conns", "info/1/p50_ms": "cached info p50, 1 conn",
          "info/16/rps": "cached info/s, 16 conns"}
SIDE_TIMEOUT = 900.0  # seconds one side's phase 1 may take (it takes about two minutes)
QUICK_ROUNDS, ROUNDS = 1, 3


def baseline_command(directory: str) -> list[str]:
    """The baseline's own bench; ValueError when DIR has none."""
    exe = os.path.join(directory, ".venv", "bin", "bazar-bench")
    if not os.access(exe, os.X_OK):
        raise ValueError(f"{directory}: no .venv/bin/bazar-bench there (a checkout with its own virtualenv: "
                         "python3 -m venv .venv && .venv/bin/pip install -e '.[bench]')")
    return [exe]


def own_command() -> list[str]:
    return [sys.executable, "-m", "bazar.bench"]


def commit_of(directory: str) -> str | None:
    """The checkout's commit, when it is a git work tree."""
    try:
        out = subprocess.run(["git", "-C", directory, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def figures_of(results: Any) -> dict[str, float]:
    """The compared figures found in a bench's results (cache-on phase 1)."""
    found: dict[str, float] = {}
    for name in LABELS:
        value: Any = results
        for part in ("ops", "on", *name.split("/")):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found[name] = float(value)
    return found


def run_side(ctx: Ctx, command: list[str], cwd: str, out: str, timeout: float = SIDE_TIMEOUT) -> dict[str, float]:
    """One side's phase 1, in a process of its own; its figures. The process is stopped
    (SIGTERM, then SIGKILL) on an interrupt or past `timeout`: its bench stops its own
    clusters on SIGTERM."""
    os.makedirs(out, exist_ok=True)
    args = [*command, "--start", "--only", "ops", "--no-plots", "--duration", str(ctx.duration), "--out", out]
    with open(os.path.join(out, "log"), "w") as logfile:
        proc = subprocess.Popen(args, cwd=cwd, stdout=logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if ctx.stop.is_set() or time.monotonic() > deadline:
                    raise RuntimeError("interrupted" if ctx.stop.is_set() else f"took over {timeout:.0f} s")
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    try:
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{' '.join(command)} left no readable results.json in {out} (exit {proc.returncode}): "
                           f"{e}") from None
    return figures_of(results)


def summarize(pairs: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per figure: the ratio (this code ÷ the baseline) of every pair that has it on both
    sides, their median, and the figures the baseline never measured."""
    ratios: dict[str, list[float]] = {}
    for pair in pairs:
        for name, mine in pair["bazar"].items():
            theirs = pair["baseline"].get(name)
            if theirs:
                ratios.setdefault(name, []).append(mine / theirs)
    unmeasured = [name for name in LABELS
                  if any(name in p["bazar"] for p in pairs) and not any(name in p["baseline"] for p in pairs)]
    return {"ratios": ratios, "median": {name: statistics.median(rs) for name, rs in ratios.items()},
            "unmeasured": unmeasured}


def phase_baseline(ctx: Ctx, directory: str, rounds: int, root: str) -> dict[str, Any]:
    directory = os.path.abspath(directory)
    theirs = baseline_command(directory)
    here = os.getcwd()
    pairs: list[dict[str, dict[str, float]]] = []
    for i in range(rounds):
        sides = [("baseline", theirs, directory), ("bazar", own_command(), here)]
        if i % 2:
            sides.reverse()
        pair: dict[str, dict[str, float]] = {}
        for name, command, cwd in sides:
            log(f"phase 16: round {i + 1} of {rounds}, {name} ({' '.join(command)})")
            pair[name] = run_side(ctx, command, cwd, os.path.join(root, f"{name}-{i + 1}"))
        pairs.append(pair)
    return {"dir": directory, "commit": commit_of(directory), "rounds": rounds, "pairs": pairs, **summarize(pairs)}


def median_ratio(name: str) -> Any:
    """A target's measure: the median ratio of figure `name`, or None."""
    return lambda results: ((results.get("baseline") or {}).get("median") or {}).get(name)


def unmeasured_reason(results: Any, name: str) -> str | None:
    """Why a figure has no ratio although the phase ran: the baseline never measured it."""
    if name in ((results.get("baseline") or {}).get("unmeasured") or []):
        return "not measured: the baseline's bench does not measure it"
    return None


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ms" if name.endswith("p50_ms") else f"{value:,.0f}/s"


def baseline_text(b: dict[str, Any]) -> list[str]:
    commit = f" (commit {b['commit']})" if b.get("commit") else ""
    out = [f"The baseline: `{b.get('dir')}`{commit}. Each side ran its own bench's phase 1 (`bazar-bench --start "
           f"--only ops --no-plots`: clusters of its own code, its own client), one after the other, in "
           f"{b.get('rounds')} pair(s) of runs, the first side alternating. Ratios are this code's figure ÷ the "
           "baseline's, within a pair; the targets judge their median.", ""]
    pairs = b.get("pairs") or []
    out += ["| figure | " + " | ".join(f"pair {i + 1}" for i in range(len(pairs))) + " | median ratio |",
            "|---|" + "---|" * len(pairs) + "---:|"]
    for name, label in LABELS.items():
        cells = []
        for p in pairs:
            mine, theirs = p.get("bazar", {}).get(name), p.get("baseline", {}).get(name)
            ratio = f" ({mine / theirs:.2f}×)" if mine and theirs else ""
            cells.append(f"{_fmt(name, theirs)} → {_fmt(name, mine)}{ratio}")
        median = (b.get("median") or {}).get(name)
        out.append(f"| {label} | " + " | ".join(cells) + f" | {'—' if median is None else f'{median:.2f}×'} |")
    out.append("")
    if b.get("unmeasured"):
        out += ["Not measured by the baseline's bench: " + ", ".join(LABELS.get(n, n) for n in b["unmeasured"])
                + ".", ""]
    return out
