"""Bounded concurrent load: a few threads, each with its own keep-alive connection,
sending pre-built requests until a deadline, a count, or a stop.

Latency is measured at the client (request sent -> full response read) with
`time.perf_counter`; while a step runs, the CPU used by this process and, if given,
by the front end's process is charged to it, and so is the CPU of the server processes
named (`server_pids`: what serves the requests, for the CPU each one costs).
"""

from __future__ import annotations

import collections
import http.client
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from bazar.bench.http import LeanConn, ProtocolError
from bazar.bench.stats import Stats, summarize
from bazar.testing.procfs import proc_cpu_seconds, self_cpu_seconds

# What a request may fail with: counted as an error of the step, never raised.
LOAD_ERRORS = (OSError, ProtocolError, http.client.HTTPException, ValueError)

# make(worker, k): the k-th request of a worker, or None to end that worker.
MakeRequest = Callable[[int, int], "bytes | None"]


class LoadRun:
    """`conns` threads, each with its own keep-alive connection, sending the
    requests make(worker, k) -> bytes (None ends that worker) until the
    deadline, max_per_worker requests, or stop()."""

    def __init__(self, port: int, make: MakeRequest, conns: int, duration: float, max_per_worker: int = 1_000_000,
                 timeout: float = 5.0, rate: float | None = None, timeline: bool = False,
                 stop_event: threading.Event | None = None, watch_pid: int | None = None,
                 server_pids: Sequence[int] = ()):
        self.port = port
        self.watch_pid = watch_pid
        self.server_pids = tuple(server_pids)
        self._cpu0: tuple[float | None, float | None, float | None] = (None, None, None)
        self.make = make
        self.n = int(conns)
        self.duration = float(duration)
        self.max_per_worker = int(max_per_worker)
        self.timeout = timeout
        self.rate = rate
        self.record = timeline
        self._stop = threading.Event()
        self._global_stop = stop_event
        self.lat: list[list[float]] = [[] for _ in range(self.n)]
        self.timeline: list[list[tuple[float, float, bool, int]]] = [[] for _ in range(self.n)]
        self.errors: list[collections.Counter[str]] = [collections.Counter() for _ in range(self.n)]
        self.t_end: list[float | None] = [None] * self.n
        self.conns = [LeanConn(port, timeout) for _ in range(self.n)]
        self.t0: float = 0.0
        self.deadline: float = 0.0
        self._barrier = threading.Barrier(self.n + 1, action=self._go)
        self._threads: list[threading.Thread] = []

    def _go(self) -> None:
        self._cpu0 = (self_cpu_seconds(), proc_cpu_seconds(self.watch_pid), cpu_of(self.server_pids))
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.duration

    def start(self) -> LoadRun:
        for w in range(self.n):
            t = threading.Thread(target=self._work, args=(w,), daemon=True, name=f"bench-{w}")
            t.start()
            self._threads.append(t)
        self._barrier.wait(timeout=60)
        return self

    def stop(self) -> None:
        self._stop.set()

    def _stopped(self) -> bool:
        return self._stop.is_set() or (self._global_stop is not None and self._global_stop.is_set())

    def _work(self, w: int) -> None:
        conn = self.conns[w]
        try:
            conn.connect()
        except OSError:
            pass  # counted on the first request
        try:
            self._barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            return
        perf = time.perf_counter
        t0, deadline, make = self.t0, self.deadline, self.make
        lat_append = self.lat[w].append
        tl_append = self.timeline[w].append if self.record else None
        errs = self.errors[w]
        interval = (1.0 / self.rate) if self.rate else 0.0
        next_t = t0
        k = 0
        while k < self.max_per_worker:
            if self._stopped():
                break
            now = perf()
            if now >= deadline:
                break
            if interval:
                if now < next_t:
                    time.sleep(min(next_t, deadline) - now)
                    continue
                next_t = max(next_t, now) + interval
            raw = make(w, k)
            if raw is None:
                break
            k += 1
            t1 = perf()
            try:
                status, _body = conn.roundtrip(raw)
            except LOAD_ERRORS as e:
                t2 = perf()
                errs[type(e).__name__] += 1
                if tl_append is not None:
                    tl_append((t1 - t0, t2 - t1, False, -1))
                time.sleep(0.005)  # never spin on a refused/broken connection
                continue
            t2 = perf()
            ok = 200 <= status < 300
            if ok:
                lat_append(t2 - t1)
            else:
                errs[str(status)] += 1
            if tl_append is not None:
                tl_append((t1 - t0, t2 - t1, ok, status))
        self.t_end[w] = perf()
        conn.close()

    def wait(self) -> Stats:
        limit = time.perf_counter() + self.duration + self.timeout + 2.0
        for t in self._threads:
            t.join(max(0.0, limit - time.perf_counter()))
        if any(t.is_alive() for t in self._threads):
            self._stop.set()
            for c in self.conns:
                c.abort()
            for t in self._threads:
                t.join(2.0)
        ends: list[float] = [e for e in self.t_end if e is not None]
        elapsed = (max(ends) - self.t0) if ends else self.duration
        errors: collections.Counter[str] = collections.Counter()
        for e in self.errors:
            errors.update(e)
        lat = list(itertools.chain.from_iterable(self.lat))
        st = summarize(lat, sum(errors.values()), elapsed, errors)
        own0, fe0, servers0 = self._cpu0
        fe1, servers1 = proc_cpu_seconds(self.watch_pid), cpu_of(self.server_pids)
        if own0 is not None and elapsed > 0:
            st["client_cpu"] = (self_cpu_seconds() - own0) / elapsed
        if fe0 is not None and fe1 is not None and elapsed > 0:
            st["frontend_cpu"] = (fe1 - fe0) / elapsed
        if servers0 is not None and servers1 is not None:
            st["server_cpu_s"] = servers1 - servers0
            st["server_processes"] = len(self.server_pids)
        return st


def cpu_of(pids: Sequence[int]) -> float | None:
    """CPU seconds used so far by all of `pids` together; None without pids, or once one has gone
    (a sum without it would charge the step less than it cost)."""
    seconds = [proc_cpu_seconds(pid) for pid in pids]
    if not seconds or any(s is None for s in seconds):
        return None
    return sum(s for s in seconds if s is not None)


def always(raw: bytes) -> MakeRequest:
    """make() for a step that sends the same request again and again."""
    return lambda _w, _k: raw


def run_load(port: int, make: MakeRequest, conns: int, duration: float, **kw: Any) -> Stats:
    return LoadRun(port, make, conns, duration, **kw).start().wait()
