"""Cached reads on more cores (phase "cores", `--only cores`): front end processes
sharing one port.

One front end process answers every request on its reactor, so cached reads are bound
by one core. A cluster of its own is started with `--shared-port-frontends 1`: two
front end processes listen on one port (SO_REUSEPORT), each also on a port of its own.
Cached `GET /bazar/info/0` is measured at 16 and 64 connections, N = 1 then N = 2 at
each count: N = 1 through the first process's own port (the other one idles), N = 2
through the shared port, where the kernel spreads the connections. Each step records
the CPU of the client and of the two front end processes, and how many reads each
process answered (its cache counters). The cluster is stopped at the end.

The report (`cores_text`) gives the gain of the added process and what the CPU says
of more: the cores the step used (client and front ends; the replicas idle, as every
read is a hit), and the CPU each read costs a front end and the client.
"""

from __future__ import annotations

import os
from typing import Any

from bazar.bench.http import build_request, http_json
from bazar.bench.load import always, run_load
from bazar.bench.phases import INFO_BOOK, Ctx, bench_cluster, log
from bazar.bench.stats import fmt_stats

CORE_CONNS = ("16", "64")
PROCESSES = 2  # front end processes on the shared port; N = 1 is the first of them alone


def reads(port: int) -> int | None:
    """The cacheable reads a front end process has answered (its cache's hits and misses)."""
    status, stats = http_json(port, "GET", "/bazar/cache")
    if status != 200 or not isinstance(stats, dict):
        return None
    return int(stats.get("hits", 0)) + int(stats.get("misses", 0))


def phase_cores(ctx: Ctx, root: str) -> dict[str, Any]:
    """Start a cluster with PROCESSES front ends on one port, measure N = 1 and N = PROCESSES, stop it."""
    cluster = bench_cluster("cores", root, cache_size=None, shared=PROCESSES - 1)
    res: dict[str, Any] = {"processes": PROCESSES, "conns": list(CORE_CONNS), "cpus": os.cpu_count(),
                           "book": INFO_BOOK, "loadavg_before": list(os.getloadavg()), "steps": {}}
    try:
        cluster.start(wait=0)
        cluster.wait_healthy(timeout=60.0, serving=True)
        own = [int(url.rsplit(":", 1)[1]) for url in cluster.internals]
        pids = []
        for port in own:
            _, health = http_json(port, "GET", "/health")
            pid = health.get("pid") if isinstance(health, dict) else None
            if not cluster.owns(pid):
                return {"skipped": f"the front end at port {port} is not a process of the started cluster"}
            pids.append(pid)
            for _ in range(3):  # its cache holds the book
                http_json(port, "GET", f"/bazar/info/{INFO_BOOK}")
        ports = {"1": own[0], str(PROCESSES): cluster.frontend_port}
        res["ports"] = {"shared": cluster.frontend_port, "own": own}
        for conns in CORE_CONNS:
            for n, port in ports.items():
                if ctx.stop.is_set():
                    return res
                before = [reads(p) for p in own]
                st = run_load(port, always(build_request("GET", f"/bazar/info/{INFO_BOOK}", port)), int(conns),
                              ctx.duration, stop_event=ctx.stop, server_pids=pids)
                after = [reads(p) for p in own]
                st["answered"] = [b - a if a is not None and b is not None else None for a, b in zip(before, after)]
                res["steps"].setdefault(n, {})[conns] = st
                log(f"  N={n} conns={conns:>2s}: {fmt_stats(st)}  answered {st['answered']}")
                ctx.pause(0.1)
    finally:
        cluster.stop()
        res["loadavg_after"] = list(os.getloadavg())
    return res


# -- the report's section (reads the results only) -------------------------------------------

def _num(v: Any, fmt: str) -> str:
    return "—" if not isinstance(v, (int, float)) else format(v, fmt)


def _cores(st: dict[str, Any]) -> float | None:
    """The front end processes' CPU over a step, in cores."""
    cpu, elapsed = st.get("server_cpu_s"), st.get("elapsed_s")
    return cpu / elapsed if isinstance(cpu, (int, float)) and isinstance(elapsed, (int, float)) and elapsed else None


def _us_per_request(seconds: float | None, st: dict[str, Any]) -> float | None:
    n = st.get("n")
    return seconds / n * 1e6 if isinstance(seconds, (int, float)) and isinstance(n, int) and n else None


def _client_cpu_s(st: dict[str, Any]) -> float | None:
    share, elapsed = st.get("client_cpu"), st.get("elapsed_s")
    return share * elapsed if isinstance(share, (int, float)) and isinstance(elapsed, (int, float)) else None


def cores_text(cores: dict[str, Any]) -> list[str]:
    """Section 12: the steps, the gain per added process, and what more cores would give."""
    top = str(cores.get("processes", PROCESSES))
    steps: dict[str, dict[str, Any]] = cores.get("steps") or {}
    cpus = cores.get("cpus")
    out = [f"A cluster of its own, started with `--shared-port-frontends {int(top) - 1}`: {top} front end processes "
           "on one port (SO_REUSEPORT), each also on a port of its own. Cached `GET /bazar/info/"
           f"{cores.get('book', INFO_BOOK)}`: N = 1 is the first process alone (through its own port; the other "
           f"idles), N = {top} the shared port, where the kernel spreads the connections. Load average "
           f"{_num((cores.get('loadavg_before') or [None])[0], '.2f')} before, "
           f"{_num((cores.get('loadavg_after') or [None])[0], '.2f')} after, on {cpus} CPU(s).", "",
           "| N | conns | req/s | p50 ms | p99 ms | errors | client CPU | front ends' CPU (cores) "
           "| front end µs/read | client µs/read | reads answered, by process |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for conns in cores.get("conns") or CORE_CONNS:
        for n in sorted(steps, key=int):
            st = steps[n].get(conns)
            if not st:
                continue
            answered = " / ".join("—" if a is None else str(a) for a in st.get("answered") or [])
            out.append(f"| {n} | {conns} | {_num(st.get('rps'), ',.0f')} | {_num(st.get('p50_ms'), '.3f')} "
                       f"| {_num(st.get('p99_ms'), '.3f')} | {st.get('errors', '—')} "
                       f"| {_num(st.get('client_cpu'), '.0%')} | {_num(_cores(st), '.2f')} "
                       f"| {_num(_us_per_request(st.get('server_cpu_s'), st), '.0f')} "
                       f"| {_num(_us_per_request(_client_cpu_s(st), st), '.0f')} | {answered or '—'} |")
    out.append("")
    gains = []
    for conns in cores.get("conns") or CORE_CONNS:
        one, more = (steps.get("1") or {}).get(conns) or {}, (steps.get(top) or {}).get(conns) or {}
        if isinstance(one.get("rps"), (int, float)) and isinstance(more.get("rps"), (int, float)) and one["rps"]:
            x = more["rps"] / one["rps"]
            gains.append(f"at {conns} connections, N = {top} served {x:.2f}× the reads of N = 1 "
                         f"({(x - 1) / (int(top) - 1):+.0%} per added process)")
    if not gains:
        return out + ["No step of both N was measured.", ""]
    out += ["Scaling: " + "; ".join(gains) + ".", ""]
    # where it stops: the cores the busiest step used, against the machine's
    busiest = max((st for by in steps.values() for st in by.values() if st), key=lambda st: st.get("rps") or 0)
    client, front = busiest.get("client_cpu"), _cores(busiest)
    if isinstance(client, (int, float)) and front is not None and isinstance(cpus, int):
        used = client + front
        load = max([x for x in (cores.get("loadavg_before") or [])[:1] + (cores.get("loadavg_after") or [])[:1]
                    if isinstance(x, (int, float))], default=None)
        if used >= 0.85 * cpus:
            why = "The machine is full: the client takes a core of its own, so a process more would find no core."
        elif load is not None and load + used >= cpus:
            why = (f"The rest was not free: a load average of {load:.2f} says other work ran on this machine, "
                   "so these are smoke figures; on a quiet one the steps have the whole machine.")
        else:
            why = ("The machine was not full: what held the step back is the client's threads or the spread of "
                   "connections, not the cores.")
        out += [f"Where it stops here: the busiest step used {used:.2f} of the machine's {cpus} cores, the client "
                f"{client:.2f} of them and the front ends {front:.2f} (the replicas idle: every read is a cache "
                "hit). " + why, ""]
    one = (steps.get("1") or {}).get(CORE_CONNS[0]) or {}
    front_us = _us_per_request(one.get("server_cpu_s"), one)
    client_us = _us_per_request(_client_cpu_s(one), one)
    if front_us and client_us:
        out.append(f"What more cores would give: a front end process spends {front_us:.0f} µs of CPU on a cached "
                   f"read (N = 1, {CORE_CONNS[0]} connections), so each core given to one more process adds up to "
                   f"about {1e6 / front_us:,.0f} reads/s; the client spends {client_us:.0f} µs on each, about "
                   f"{1e6 / client_us:,.0f} reads/s per core of its own. With clients elsewhere and a core per "
                   "process, reads grow with processes until the cores, the network or the spread of connections "
                   "runs out; the kernel spreads connections, not requests, so a few long connections may load "
                   "the processes unevenly (the last column).")
    out.append("")
    return out
