"""The bazar-bench experiments: each phase drives a running cluster (or, for the LRU
replay, runs in-process) and returns a plain dict of what it measured, which goes
into results.json as it is.

Phases: startup (bazar-cluster start to every /ready 200), ops (info, search and
purchase at 1 and 16 connections, cache on and off, plus the sweeps over connections),
invalidation, lru, rss (front-end memory with a full cache) and crash (kill -9 of the
primaries under load; only on a cluster this tool started, and only its own
processes). Beside other servers: references and compare (bazar.bench.compare), etcd
(bazar.bench.etcd); where a write spends its time: timeline (bazar.bench.timeline); cached
reads on more cores, front ends sharing one port: cores (bazar.bench.cores); under faults:
spread (bazar.bench.spread), and opt-in, hog (bazar.bench.hog) and soak (bazar.bench.soak),
which reuse the crash phase's kill.
Every loop is bounded by a count and by time, and an interrupt (Ctx.stop) cuts every
wait short.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from typing import Any
from urllib.parse import quote, urlsplit

from bazar.bench.http import LeanConn, build_request, health, http_json
from bazar.bench.load import LOAD_ERRORS, LoadRun, always, run_load
from bazar.bench.stats import (
    RefLRU,
    fmt_num,
    fmt_stats,
    make_cache,
    replay_lru,
    summarize,
    zipf_topk_mass,
    zipf_trace,
)
from bazar.testing.processes import Cluster, ClusterError
from bazar.testing.procfs import looks_like_bazar, read_rss_kb

OPS = ("info", "search", "purchase")
PHASES = ("startup", "ops", "references", "compare", "etcd", "invalidation", "lru", "rss", "crash", "timeline",
          "cores", "spread", "hog", "soak", "baseline")
# the phases a run leaves out unless asked for (--cpu-hog, --soak, --only): they take minutes
OPT_IN = ("hog", "soak")
# the phases that drive the cache-on cluster (the others need none, or start their own)
ON_CLUSTER = ("startup", "ops", "references", "compare", "etcd", "invalidation", "rss", "crash", "hog", "soak")
OP_CONNS = ("1", "16")
SWEEP_CONNS = ("1", "4", "16", "64")
# connection counts beyond OP_CONNS, by op and cache (the throughput-vs-connections plot)
EXTRA_CONNS = {("info", "on"): ("4", "64"), ("info", "off"): ("64",), ("purchase", "on"): ("64",)}
RSS_ENTRIES = 10_000
SEARCH_TOPIC = "distributed systems"
CRASH_TIMEOUT = 5.0  # client timeout during the crash experiment (s)
INFO_BOOK = 0

_T_START = time.monotonic()


def log(msg: str) -> None:
    """Progress line on stderr, prefixed with the time since start."""
    sys.stderr.write(f"[{time.monotonic() - _T_START:6.1f}s] {msg}\n")
    sys.stderr.flush()


class Ctx:
    """What every phase shares: the options, and the event that an interrupt sets."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        self.duration = args.duration
        self.stop = threading.Event()
        self.run_id = f"{os.getpid()}-{int(time.time())}"

    def pause(self, seconds: float) -> None:
        """Sleep that an interrupt can cut short."""
        end = time.monotonic() + seconds
        while not self.stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))


def bench_cluster(name: str, root: str, cache_size: int | None, env: dict[str, str] | None = None,
                  **kw: Any) -> Cluster:
    """A throw-away cluster under `root`, on free loopback ports, that runs with this
    process's environment (so BAZAR_ADMIN_TOKEN, if set, is its token) or `env`, reports
    its start and stop as progress lines, and dies with this process (`kw`: more of
    `Cluster`'s fields, e.g. `shared`, `frontends`, `redis`)."""
    return Cluster(data=os.path.join(root, name), name=name, cache_size=cache_size,
                   env=dict(os.environ) if env is None else env, env_secrets=False, token=None,
                   die_with_parent=True, progress=log, **kw)


def ready_200(url: str) -> bool:
    """Whether GET <url>/ready answers 200 now."""
    try:
        return http_json(urlsplit(url).port or 80, "GET", "/ready", timeout=0.5)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def process_names(cluster: Cluster) -> dict[str, str]:
    """url -> name of every process of a cluster, as bazar-cluster names them."""
    names = {url: f"catalog-{i}" for i, url in enumerate(cluster.catalogs, 1)}
    names.update({url: f"order-{i}" for i, url in enumerate(cluster.orders, 1)})
    names.update({url: f"frontend-{i}" if i else "frontend" for i, url in enumerate(cluster.fronts)})
    return names


def measure_startup(ctx: Ctx, cluster: Cluster, timeout: float = 60.0, poll: float = 0.05) -> dict[str, Any]:
    """Start `cluster` and time it: seconds from the start of bazar-cluster until each
    process's GET /ready first answers 200, and until all do. Polls only the processes
    not ready yet, every `poll` seconds (what the polls cost the starting processes is
    small next to their start)."""
    names = process_names(cluster)
    ready: dict[str, float] = {}
    t0 = time.monotonic()
    cluster.start(wait=0)
    while len(ready) < len(names) and time.monotonic() - t0 < timeout and not ctx.stop.is_set():
        if cluster.proc is not None and cluster.proc.poll() is not None:
            raise ClusterError(f"cluster {cluster.name} exited with status {cluster.proc.returncode} while starting")
        for url, name in names.items():
            if name not in ready and ready_200(url):
                ready[name] = time.monotonic() - t0
        time.sleep(poll)
    done = len(ready) == len(names)
    order = dict(sorted(ready.items(), key=lambda kv: kv[1]))
    log(f"cluster {cluster.name}: every /ready 200 "
        + (f"{max(ready.values()):.2f}s after bazar-cluster started" if done else f"not within {timeout:.0f}s")
        + f" ({', '.join(f'{n} {t:.2f}s' for n, t in order.items())})")
    return {"cluster": cluster.name, "all_ready_s": max(ready.values()) if done else None, "processes": order,
            "poll_s": poll, "timeout_s": timeout}


def server_pids(port: int, cluster: Cluster | None = None) -> dict[str, int]:
    """The pids of the front end at `port` and of the replicas it knows, named as
    bazar-cluster names them (frontend, catalog-1, ...), read from each /health; only
    processes we may watch: children of the started cluster, or local Bazar processes."""
    def ours(pid: Any) -> bool:
        return isinstance(pid, int) and (cluster.owns(pid) if cluster is not None else looks_like_bazar(pid))

    fe = health(port)
    if fe is None:
        return {}
    found = {"frontend": fe["pid"]} if ours(fe.get("pid")) else {}
    for service in ("catalog", "order"):
        for replica in fe.get(service) or []:
            parts = urlsplit(str(replica.get("url", "")))
            h = health(parts.port or 80) if parts.hostname in ("127.0.0.1", "localhost") else None
            if h is not None and h.get("service") == service and ours(h.get("pid")):
                found[f"{service}-{h.get('replica')}"] = h["pid"]
    return found


def add_bench_book(port: int, token: str, run_id: str) -> int:
    st, data = http_json(port, "POST", "/bazar/books", token=token, body={
        "title": f"Bench book {run_id}", "topic": f"bench {run_id}", "price": 10.0, "quantity": 1_000_000,
    })
    if st not in (200, 201) or not isinstance(data, dict) or "id" not in data:
        raise RuntimeError(f"POST /bazar/books answered {st}: {data}")
    book_id: int = data["id"]
    return book_id


def op_requests(port: int, book_id: int | None) -> dict[str, bytes]:
    reqs = {
        "info": build_request("GET", f"/bazar/info/{INFO_BOOK}", port),
        "search": build_request("GET", "/bazar/search/" + quote(SEARCH_TOPIC, safe=""), port),
    }
    if book_id is not None:
        reqs["purchase"] = build_request("POST", f"/bazar/purchase/{book_id}", port, body={"quantity": 1})
    return reqs


def frontend_pid(port: int, cluster: Cluster | None = None) -> int | None:
    """The front end's pid from /health, if it is a local process we may watch."""
    h = health(port)
    pid = h.get("pid") if h else None
    if not isinstance(pid, int):
        return None
    if cluster is not None:
        return pid if cluster.owns(pid) else None
    return pid if looks_like_bazar(pid) else None


def measure_ops(ctx: Ctx, port: int, book_id: int | None, label: str,
                fe_pid: int | None = None, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each op at 1 and 16 connections (plus EXTRA_CONNS of the op with the cache `label`);
    purchase only with a bench book to buy.  Fills `out` as it goes (kept if interrupted)."""
    out = {} if out is None else out
    reqs = op_requests(port, book_id)
    warm = LeanConn(port)
    for raw in reqs.values():  # warm up: fill the cache, open paths
        for _ in range(3):
            try:
                warm.roundtrip(raw)
            except LOAD_ERRORS:
                pass
    warm.close()
    for op in OPS:
        if op not in reqs:
            continue
        conns_list = list(OP_CONNS) + list(EXTRA_CONNS.get((op, label), ()))
        conns_list = sorted(set(conns_list), key=int)
        out[op] = {}
        for c in conns_list:
            if ctx.stop.is_set():
                return out
            st = run_load(port, always(reqs[op]), int(c), ctx.duration, stop_event=ctx.stop, watch_pid=fe_pid)
            out[op][c] = st
            log(f"  {op:8s} cache={label:3s} conns={c:>2s}: {fmt_stats(st)}")
            ctx.pause(0.1)
    return out


def timed(conn: LeanConn, raw: bytes) -> tuple[int, bytes, float]:
    """One round trip on `conn`: (status, body, seconds it took)."""
    t1 = time.perf_counter()
    status, body = conn.roundtrip(raw)
    return status, body, time.perf_counter() - t1


def cache_counters(port: int) -> Any:
    """The front end's GET /bazar/cache (its cache counters), or None."""
    try:
        return http_json(port, "GET", "/bazar/cache")[1]
    except (OSError, http.client.HTTPException):
        return None


def phase_invalidation(ctx: Ctx, port: int, token: str | None, book_id: int, iterations: int,
                       hit_repeats: int = 3) -> dict[str, Any]:
    conn = LeanConn(port)
    write: list[float] = []
    miss: list[float] = []
    hit: list[float] = []
    stale = errors = 0
    get_raw = build_request("GET", f"/bazar/info/{book_id}", port)
    before = cache_counters(port)
    deadline = time.monotonic() + max(5.0, ctx.duration * 4)
    done = 0
    for i in range(iterations):
        if ctx.stop.is_set() or time.monotonic() > deadline:
            break
        price = round(11.0 + (i % 500) * 0.25, 2)
        put_raw = build_request("PUT", f"/bazar/update_price/{book_id}", port, body={"price": price}, token=token)
        try:
            st, _, took = timed(conn, put_raw)
            if st != 200:
                errors += 1
                continue
            write.append(took)
            st, body, took = timed(conn, get_raw)
            if st != 200:
                errors += 1
                continue
            miss.append(took)
            try:
                if abs(float(json.loads(body)["price"]) - price) > 1e-9:
                    stale += 1
            except (ValueError, KeyError, TypeError):
                stale += 1
            for _ in range(hit_repeats):
                st, _, took = timed(conn, get_raw)
                if st == 200:
                    hit.append(took)
                else:
                    errors += 1
            done += 1
        except LOAD_ERRORS:
            errors += 1
            conn.close()
    conn.close()
    after = cache_counters(port)
    delta = None
    if isinstance(before, dict) and isinstance(after, dict):
        delta = {k: (after.get(k) or 0) - (before.get(k) or 0) for k in ("hits", "misses", "evictions")
                 if isinstance(after.get(k), (int, float))}
    res: dict[str, Any] = {
        "iterations": done,
        "errors": errors,
        "stale_reads": stale,
        "write": summarize(write),
        "miss_read": summarize(miss),
        "hit_read": summarize(hit),
        "cache_counter_delta": delta,
        "hit_repeats": hit_repeats,
    }
    log(f"  write     {fmt_stats(res['write'])}")
    log(f"  1st read  {fmt_stats(res['miss_read'])}")
    log(f"  reread    {fmt_stats(res['hit_read'])}  stale reads {stale}  counter delta {delta}")
    return res


def phase_lru(ctx: Ctx) -> dict[str, Any]:
    n_keys = 1000
    s = 1.0
    length = 10_000 if ctx.quick else 50_000
    sizes = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    trace = zipf_trace(n_keys, length, s=s, seed=42)
    source = "bazar.cache.LRUCache"
    factory: Any = None
    note = None
    try:
        from bazar import cache as cache_mod

        factory = cache_mod.LRUCache
    except Exception as e:  # the core may not be there (yet)
        note = (f"bazar.cache.LRUCache not importable ({type(e).__name__}: {e}); "
                "replayed through the reference OrderedDict LRU")
        source = "reference OrderedDict LRU (bench.py)"
    points = []
    for cap in sizes:
        if ctx.stop.is_set():
            break
        ref = replay_lru(trace, RefLRU(cap))
        point = {"capacity": cap, "ref_hit_rate": ref["hit_rate"], "top_k_mass": zipf_topk_mass(n_keys, cap, s)}
        if factory is not None:
            try:
                r = replay_lru(trace, make_cache(factory, cap))
                point.update(hit_rate=r["hit_rate"], evictions=r["evictions"])
            except Exception as e:
                note = f"bazar.cache.LRUCache failed during replay ({type(e).__name__}: {e}); reference LRU only"
                source = "reference OrderedDict LRU (bench.py)"
                factory = None
        if factory is None:
            point.update(hit_rate=ref["hit_rate"], evictions=None)
        points.append(point)
        log(f"  capacity {cap:5d}: hit rate {point['hit_rate']:.3f} (reference LRU {ref['hit_rate']:.3f}, "
            f"top-k mass {point['top_k_mass']:.3f})")
    res = {"source": source, "keys": n_keys, "s": s, "trace_len": length, "seed": 42, "points": points}
    if note:
        res["note"] = note
    return res


def phase_rss(ctx: Ctx, port: int, cluster: Cluster | None = None) -> dict[str, Any]:
    h = health(port)
    if not h or not isinstance(h.get("pid"), int):
        return {"skipped": "front end /health gave no pid"}
    pid = h["pid"]
    if cluster is not None:
        if not cluster.owns(pid):
            return {"skipped": f"front end pid {pid} from /health is not a child of the started cluster"}
    elif not looks_like_bazar(pid):
        return {"skipped": f"pid {pid} from /health is not a local twistd/bazar process (other machine or container?)"}
    _, cache0 = http_json(port, "GET", "/bazar/cache")
    cap = (cache0 or {}).get("capacity")
    rss_before = read_rss_kb(pid)
    size0 = (cache0 or {}).get("size")
    want = RSS_ENTRIES if not isinstance(cap, int) else min(RSS_ENTRIES, cap)
    n = max(0, want - size0) if isinstance(size0, int) else want  # new distinct entries needed
    budget = 8.0 if ctx.quick else 25.0
    conns = 16
    prefix = f"bench-fill-{ctx.run_id}-"

    def make(w: int, k: int) -> bytes | None:
        i = w + k * conns
        if i >= n:
            return None
        return build_request("GET", "/bazar/search/" + prefix + str(i), port)

    log(f"  filling the front-end cache with {n} distinct searches (≤ {budget:.0f}s)")
    st = run_load(port, make, conns, budget, max_per_worker=n // conns + 1, stop_event=ctx.stop)
    log(f"  fill: {fmt_stats(st)}")
    time.sleep(0.3)
    _, cache1 = http_json(port, "GET", "/bazar/cache")
    rss_after = read_rss_kb(pid)
    res = {
        "pid": pid,
        "capacity": cap,
        "entries_before": (cache0 or {}).get("size"),
        "entries": (cache1 or {}).get("size"),
        "fill_requests": st["n"],
        "fill_errors": st["errors"],
        "fill_rps": st["rps"],
        "rss_before_mb": rss_before / 1024.0 if rss_before else None,
        "rss_mb": rss_after / 1024.0 if rss_after else None,
    }
    if isinstance(cap, int) and cap < RSS_ENTRIES:
        res["note"] = f"cache capacity is {cap} < {RSS_ENTRIES}: the memory target cannot be checked on this cluster"
    log(f"  front end pid {pid}: RSS {fmt_num(res['rss_before_mb'], 'MB')} -> {fmt_num(res['rss_mb'], 'MB')} MB "
        f"with {res['entries']} cache entries")
    return res


def phase_crash(ctx: Ctx, cluster: Cluster, book_id: int, token: str | None,
                services: tuple[str, ...] = ("catalog", "order")) -> dict[str, Any]:
    """kill -9 of the primary of each of `services` in turn, under a paced purchase +
    info load: the failover time of each, and the load's timeline."""
    quick = ctx.quick
    pre, settle, post = (1.0, 0.5, 1.5) if quick else (2.0, 1.5, 2.5)
    max_wait = 8.0 if quick else 15.0
    port = cluster.frontend_port
    purchase = build_request("POST", f"/bazar/purchase/{book_id}", port, body={"quantity": 1})
    info = build_request("GET", f"/bazar/info/{book_id}", port)
    n_purchase, n_info = 2, 2
    ops = ["purchase"] * n_purchase + ["info"] * n_info

    def make(w: int, k: int) -> bytes | None:
        return purchase if w < n_purchase else info

    run = LoadRun(port, make, len(ops), duration=90.0, timeout=CRASH_TIMEOUT, rate=150.0, timeline=True,
                  stop_event=ctx.stop).start()
    kills: list[dict[str, Any]] = []

    def now() -> float:
        return time.perf_counter() - run.t0

    def first_write_after(t_kill: float) -> float | None:
        best = None
        for w in range(n_purchase):
            for t_send, lat, ok, _st in list(run.timeline[w]):
                if ok and t_send >= t_kill:
                    done = t_send + lat
                    if best is None or done < best:
                        best = done
        return best

    try:
        ctx.pause(pre)
        for service in services:
            if ctx.stop.is_set():
                break
            prim = cluster.find_primary(service)
            if prim is None:
                kills.append({"service": service, "error": "no primary found via /health"})
                log(f"  {service}: no primary found, not killing")
                continue
            url, h = prim
            kport, pid = urlsplit(url).port, h.get("pid")
            if not cluster.kill(pid):
                kills.append({"service": service, "port": kport, "pid": pid,
                              "error": "pid is not a child of the started cluster (or kill failed); not killed"})
                log(f"  {service}: refusing to kill pid {pid}")
                continue
            t_kill = now()
            log(f"  kill -9 {service} primary replica {h.get('replica')} (pid {pid}, port {kport}) at t={t_kill:.2f}s")
            kill = {"service": service, "port": kport, "pid": pid, "replica": h.get("replica"), "t": t_kill}
            kills.append(kill)
            done = None
            for _ in range(int(max_wait / 0.05) + 1):
                done = first_write_after(t_kill)
                if done is not None or ctx.stop.is_set() or now() - t_kill > max_wait:
                    break
                time.sleep(0.05)
            kill["failover_s"] = (done - t_kill) if done is not None else None
            log(f"  {service}: first successful write after the kill "
                + (f"{kill['failover_s']:.3f}s after it" if done is not None else f"not seen within {max_wait:.0f}s"))
            ctx.pause(settle)
        ctx.pause(post)
        for kill in kills:
            if "t" in kill:
                after = health(kill["port"])
                kill["after"] = ({"pid": after.get("pid"), "role": after.get("role"), "status": after.get("status")}
                                 if after else None)
                if after:
                    cluster.remember(after.get("pid"))
    finally:
        run.stop()
        total = run.wait()
    samples: list[list[Any]] = []
    for w, op in enumerate(ops):
        for t_send, lat, ok, st in run.timeline[w]:
            samples.append([round(t_send, 4), round(lat * 1000.0, 3), op, bool(ok), st])
    samples.sort()
    for kill in kills:
        if "t" not in kill:
            continue
        t = kill["t"]
        window = [s for s in samples if t <= s[0] < t + 5.0]
        kill["errors_5s"] = sum(1 for s in window if not s[3])
        kill["max_latency_ms_5s"] = max((s[1] for s in window), default=None)
    return {
        "client_timeout_s": CRASH_TIMEOUT,
        "kills": kills,
        "samples": samples,
        "total": total,
        "ops": {"purchase": n_purchase, "info": n_info},
        "rate_per_worker": 150.0,
        "duration_s": total["elapsed_s"],
    }

