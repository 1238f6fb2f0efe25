"""Elections under a CPU hog (`bazar-bench --cpu-hog`, phase `hog`).

A primary that is alive but slow must not be deposed: on a machine whose cores are
busy with something else, heartbeats arrive late, and a replica that takes lateness
for death starts an election, and every election stalls the writes. The phase runs
a purchase + info load on the cluster the bench started, first alone, then with two
CPU hogs (a Python busy loop each, one per core), reads every replica's epoch from
its /health before and after, and counts the epochs each service went through (the
target is none). Then, with the hogs still running, it kills the catalog primary
(the crash phase's kill, which only ever kills a process of the cluster this tool
started) and times the first successful purchase after the kill (target ≤ 2 s).

The hogs are started with `sys.executable` in a session of their own and stopped by
PID at the end of the phase, whatever happens; each also ends by itself when its time
is up or its parent (this process) is gone, so none is ever left behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from bazar.bench.http import build_request, health
from bazar.bench.load import LoadRun, always
from bazar.bench.phases import INFO_BOOK, Ctx, log, phase_crash, process_names
from bazar.bench.stats import Stats, fmt_stats
from bazar.testing.processes import Cluster, Processes
from bazar.testing.procfs import proc_cpu_seconds

HOGS = 2  # one per core of the 2-core machines the targets are for
PURCHASE_CONNS = 8
INFO_CONNS = 8
HOG_SECONDS = 30.0  # of load with the hogs, and as much without (--hog-duration)
QUICK_HOG_SECONDS = 5.0
SERVICES = ("catalog", "order")
# A hog: busy until its time is up or its parent is gone (checked about every 0.1 s).
HOG_CODE = """\
import os, sys, time
end = time.monotonic() + float(sys.argv[1])
parent = int(sys.argv[2])
n = 0
while True:
    n += 1
    if n % 200000 == 0 and (time.monotonic() > end or os.getppid() != parent):
        break
"""


class CpuHogs:
    """`count` busy-loop processes, each bounded by `seconds`, stopped by PID."""

    def __init__(self, count: int, seconds: float, workdir: str):
        self.count = count
        self.seconds = seconds
        self.workdir = workdir
        self.procs = Processes()
        self._cpu0: float | None = None

    def start(self) -> CpuHogs:
        os.makedirs(self.workdir, exist_ok=True)
        for i in range(self.count):
            self.procs.start(f"hog-{i + 1}", [sys.executable, "-c", HOG_CODE, f"{self.seconds:.1f}", str(os.getpid())],
                             env=dict(os.environ), cwd=self.workdir)
        self._cpu0 = self.cpu_seconds()
        return self

    @property
    def pids(self) -> list[int]:
        return [proc.pid for _, proc, _ in self.procs.started]

    def running(self) -> int:
        return self.count - len(self.procs.exited())

    def cpu_seconds(self) -> float | None:
        """CPU seconds the hogs used so far (None once one is gone)."""
        seconds = [proc_cpu_seconds(pid) for pid in self.pids]
        return None if any(s is None for s in seconds) else sum(s for s in seconds if s is not None)

    def cores_since_start(self, elapsed: float) -> float | None:
        """Cores the hogs kept busy, on average, over the `elapsed` seconds since start."""
        now = self.cpu_seconds()
        if now is None or self._cpu0 is None or elapsed <= 0:
            return None
        return (now - self._cpu0) / elapsed

    def stop(self) -> None:
        self.procs.stop(wait=2.0)

    def __enter__(self) -> CpuHogs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def epochs(cluster: Cluster, timeout: float = 3.0) -> dict[str, int | None]:
    """Every replica's epoch from its /health (None where it did not answer), by name
    (catalog-1, ...). A generous timeout: replicas answer late under a hog."""
    found: dict[str, int | None] = {}
    for url, name in process_names(cluster).items():
        if name.startswith(SERVICES):
            h = health(urlsplit(url).port or 80, timeout=timeout)
            epoch = h.get("epoch") if h else None
            found[name] = epoch if isinstance(epoch, int) else None
    return found


def epoch_changes(before: Mapping[str, int | None], after: Mapping[str, int | None]) -> dict[str, int | None]:
    """The epochs each service went through between two readings: the highest epoch of
    its replicas after, less the highest before (an epoch is a term: every election
    that got as far as a candidacy starts one, won or not). None for a service none
    of whose replicas answered in one of the readings."""
    changes: dict[str, int | None] = {}
    for service in SERVICES:
        b = [e for name, e in before.items() if name.startswith(service + "-") and e is not None]
        a = [e for name, e in after.items() if name.startswith(service + "-") and e is not None]
        changes[service] = (max(a) - max(b)) if a and b else None
    return changes


def total_changes(changes: Mapping[str, int | None]) -> int | None:
    """All services' epoch changes together; None if one is unknown."""
    values = list(changes.values())
    return None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)


def mixed_load(ctx: Ctx, port: int, book_id: int, seconds: float) -> dict[str, Stats]:
    """Purchases of the bench book and cached info reads at once, unpaced, for `seconds`."""
    purchase = build_request("POST", f"/bazar/purchase/{book_id}", port, body={"quantity": 1})
    info = build_request("GET", f"/bazar/info/{INFO_BOOK}", port)
    runs = {"purchase": LoadRun(port, always(purchase), PURCHASE_CONNS, seconds, stop_event=ctx.stop),
            "info": LoadRun(port, always(info), INFO_CONNS, seconds, stop_event=ctx.stop)}
    for run in runs.values():
        run.start()
    return {op: run.wait() for op, run in runs.items()}


def phase_hog(ctx: Ctx, cluster: Cluster, book_id: int, token: str | None, workdir: str,
              seconds: float) -> dict[str, Any]:
    port = cluster.frontend_port
    cluster.wait_healthy(timeout=60.0, serving=True)  # (after the crash phase: its replicas are back)
    log(f"  {seconds:.0f}s of purchase ({PURCHASE_CONNS} conns) + info ({INFO_CONNS} conns) load, without a hog")
    start = epochs(cluster)
    without = mixed_load(ctx, port, book_id, seconds)
    for op, st in without.items():
        log(f"    {op:8s} {fmt_stats(st)}")
    before = epochs(cluster)
    res: dict[str, Any] = {"hogs": HOGS, "seconds": seconds, "conns": {"purchase": PURCHASE_CONNS, "info": INFO_CONNS},
                           "load": {"without": without}, "epochs": {"start": start, "before": before},
                           "changes_without": epoch_changes(start, before)}
    # the hogs outlive the load and the kill by a margin; they are stopped by PID long before
    with CpuHogs(HOGS, seconds + 120.0, workdir) as hogs:
        hogs.start()
        res["hog_pids"] = hogs.pids
        log(f"  {HOGS} CPU hogs started (pids {', '.join(map(str, hogs.pids))}); the same load again")
        with_hog = mixed_load(ctx, port, book_id, seconds)
        elapsed = max((st.get("elapsed_s") or 0.0) for st in with_hog.values())
        res["hog_cores"] = hogs.cores_since_start(elapsed)
        for op, st in with_hog.items():
            log(f"    {op:8s} {fmt_stats(st)}")
        res["load"]["with"] = with_hog
        after = epochs(cluster)
        res["epochs"]["after"] = after
        res["changes"] = epoch_changes(before, after)
        res["changes_total"] = total_changes(res["changes"])
        log(f"  epochs before {before}, after {after}: changes {res['changes']}")
        if hogs.running() < HOGS:
            res["note"] = "a hog ended early: the load ran on a machine less busy than intended"
        if not ctx.stop.is_set():
            log("  still under the hogs: kill -9 of the catalog primary")
            crash = phase_crash(ctx, cluster, book_id, token, services=("catalog",))
            res["crash"] = crash
            kill = next((k for k in crash.get("kills", []) if "t" in k), None)
            res["failover_s"] = kill.get("failover_s") if kill else None
    log("  hogs stopped")
    return res
