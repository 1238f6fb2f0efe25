"""The invalidation delay across front ends (phase `spread`).

Through one front end a client reads its own writes; through another, a read may lag
a write by the time the catalog primary's announcement takes to reach that front
end's cache. The phase starts a cluster of its own with two front ends
(`bazar-cluster --frontends 2`), and for each of N rounds: reads a book twice at front
end B (so that B holds it in its cache), sets its price through front end A
(`PUT /bazar/update_price`), and reads it at B again and again, in a thread of its
own, from just before the write leaves until B shows the new price. When B showed it
is known within one read's round trip: against the write's sending, and against the
writer's answer. The delay of a round (guarantee 4's "invalidation delay") is how long
after the answer B could still show the old price: 0 when no read sent after the
answer showed it, else up to the end of the first read that showed the new one.

With `redis-server` on PATH it does the same on a second cluster started with a Redis
URL (announcements then travel over HTTP push and Redis pub/sub, and the first to
arrive counts), and times the Redis messages themselves at a subscriber of the bench's
own. Both clusters and the Redis server are the bench's own, stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from typing import Any

from bazar.bench.http import LeanConn, build_request, http_json
from bazar.bench.load import LOAD_ERRORS
from bazar.bench.phases import Ctx, bench_cluster, cache_counters, log
from bazar.bench.stats import fmt_stats, summarize
from bazar.invalidation import CHANNEL
from bazar.records import info_key
from bazar.testing.processes import Cluster, RedisServer, RedisWatcher, free_ports

SPREAD_WRITES = 200
QUICK_SPREAD_WRITES = 50
BOOK = 1
SEEN_BOUND = 3.0  # seconds a round waits for front end B to show the new price (the front end's gap grace is 1 s)
MAX_POLLS = 100_000


def price_of(body: bytes) -> float | None:
    try:
        value = json.loads(body)["price"]
    except (ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


class RedisArrivals:
    """A subscriber of the invalidation channel, in a thread: when each announcement of
    `key` arrived (time.perf_counter)."""

    def __init__(self, port: int, key: str):
        self.key = key
        self.times: list[float] = []
        self.watcher = RedisWatcher(port, CHANNEL)
        self.watcher.sock.settimeout(None)  # (stop() shuts the socket: recv returns at once)
        self.thread = threading.Thread(target=self._run, daemon=True, name="bench-redis-arrivals")

    def start(self) -> RedisArrivals:
        self.thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                reply = self.watcher.reader.read()
            except (OSError, ConnectionError, ValueError):
                return
            now = time.perf_counter()
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                try:
                    keys = json.loads(reply[2]).get("keys") or []
                except (ValueError, AttributeError):
                    continue
                if self.key in keys:
                    self.times.append(now)

    def stop(self) -> None:
        try:
            self.watcher.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5.0)
        self.watcher.close()


def arrivals_after(rounds: list[tuple[float, float]], arrivals: list[float]) -> list[float]:
    """For each round (write sent, answer received), in order and one write at a time:
    when the first announcement received after the write was sent arrived, relative to
    the answer (seconds; negative: before the answer). Rounds without one are left out."""
    out = []
    for i, (sent, answered) in enumerate(rounds):
        until = rounds[i + 1][0] if i + 1 < len(rounds) else float("inf")
        first = next((t for t in arrivals if sent <= t < until), None)
        if first is not None:
            out.append(first - answered)
    return out


Read = tuple[float, float, "float | None"]  # (sent, answered, the price it showed; None: an error)


def poll(conn: LeanConn, raw: bytes, price: float, until: float, reads: list[Read]) -> None:
    """Read at `conn` again and again until it shows `price` or the time is `until`."""
    while time.perf_counter() < until:
        t1 = time.perf_counter()
        try:
            status, body = conn.roundtrip(raw)
        except LOAD_ERRORS:
            reads.append((t1, time.perf_counter(), None))
            conn.close()
            time.sleep(0.005)
            continue
        shown = price_of(body) if status == 200 else None
        reads.append((t1, time.perf_counter(), shown))
        if shown == price:
            return


def round_figures(reads: list[Read], price: float, sent: float, answered: float) -> dict[str, float | int] | None:
    """What one round's reads at B say (times in seconds): `visible`, from the write's
    sending to the end of the first read that showed the new price (an upper bound on
    when B had it); `vs_answer`, the same end against the writer's answer (negative: B
    had it before the writer knew it was done); `stale_after`, reads sent after the
    answer that still showed the old price; `lag`, how long after the answer B could
    still show the old price: 0 without such a read, else up to the end of the first
    read that showed the new one. None if B never showed it."""
    first = next((r for r in reads if r[2] == price), None)
    if first is None:
        return None
    stale_after = sum(1 for r in reads if r[0] >= answered and r[2] is not None and r[2] != price)
    return {"visible": first[1] - sent, "vs_answer": first[1] - answered, "stale_after": stale_after,
            "lag": (first[1] - answered) if stale_after else 0.0}


def measure_rounds(ctx: Ctx, cluster: Cluster, token: str, writes: int,
                   arrivals: RedisArrivals | None = None) -> dict[str, Any]:
    """N rounds of write-through-A, read-at-B (module doc): B is read in a thread of its
    own from just before the write leaves until it shows the new price."""
    a, b = cluster.frontend_port, cluster.frontend_port + 1
    ca, cb = LeanConn(a), LeanConn(b)
    get_b = build_request("GET", f"/bazar/info/{BOOK}", b)
    before = cache_counters(b)
    figures: list[dict[str, float | int]] = []
    write_lat: list[float] = []
    read_lat: list[float] = []
    timed: list[tuple[float, float]] = []
    unseen = errors = 0
    deadline = time.monotonic() + max(30.0, writes * 0.5)
    try:
        for i in range(writes):
            if ctx.stop.is_set() or time.monotonic() > deadline:
                break
            price = round(20.0 + (i % 5000) * 0.01, 2)  # a new price every round
            put = build_request("PUT", f"/bazar/update_price/{BOOK}", a, body={"price": price}, token=token)
            try:
                for _ in range(2):  # B holds the old price: a miss fills its cache, the second read is a hit
                    cb.roundtrip(get_b)
            except LOAD_ERRORS:
                errors += 1
                cb.close()
                continue
            reads: list[Read] = []
            poller = threading.Thread(target=poll, args=(cb, get_b, price, time.perf_counter() + SEEN_BOUND, reads),
                                      daemon=True, name="bench-spread-reads")
            poller.start()
            for _ in range(10_000):  # the reads are under way before the write leaves
                if reads or not poller.is_alive():
                    break
                time.sleep(0.0002)
            t_send = time.perf_counter()
            try:
                status, _ = ca.roundtrip(put)
            except LOAD_ERRORS:
                status = -1
                ca.close()
            t_ack = time.perf_counter()
            poller.join(SEEN_BOUND + 2.0)
            if poller.is_alive():  # stuck in a read: unblock it, and never share its connection
                cb.abort()
                poller.join(5.0)
                cb = LeanConn(b)
            read_lat += [r[1] - r[0] for r in reads if r[2] is not None]
            if status != 200:
                errors += 1
                continue
            write_lat.append(t_ack - t_send)
            timed.append((t_send, t_ack))
            one = round_figures(reads, price, t_send, t_ack)
            if one is None:
                unseen += 1
            else:
                figures.append(one)
    finally:
        ca.close()
        cb.close()
    after = cache_counters(b)
    hits = ((after.get("hits") or 0) - (before.get("hits") or 0)
            if isinstance(before, dict) and isinstance(after, dict) else None)

    def stats(key: str) -> dict[str, Any]:
        return summarize([float(f[key]) for f in figures])

    res: dict[str, Any] = {
        "rounds": len(timed), "errors": errors, "unseen": unseen, "write": summarize(write_lat),
        "read": summarize(read_lat), "lag": stats("lag"), "visible": stats("visible"), "vs_answer": stats("vs_answer"),
        "stale_after_answer": sum(int(f["stale_after"]) for f in figures),
        "rounds_stale_after_answer": sum(1 for f in figures if f["stale_after"]),
        "vs_answer_ms": [round(float(f["vs_answer"]) * 1000.0, 3) for f in figures],
        "b_cache_hits": hits, "seen_bound_s": SEEN_BOUND}
    if arrivals is not None:
        signed = arrivals_after(timed, list(arrivals.times))
        res["redis_arrival"] = summarize(signed)
        res["redis_arrivals_ms"] = [round(x * 1000.0, 3) for x in signed]
    log(f"    write at A {fmt_stats(res['write'])}")
    log(f"    new price at B, after the write was sent: {fmt_stats(res['visible'])}")
    log(f"    ... against the writer's answer: {fmt_stats(res['vs_answer'])}")
    log(f"    stale reads at B sent after the answer: {res['stale_after_answer']} "
        f"(in {res['rounds_stale_after_answer']} of {len(timed)} rounds); lag {fmt_stats(res['lag'])}; "
        f"never seen in {unseen}")
    if "redis_arrival" in res:
        log(f"    Redis message at a subscriber, against the answer: {fmt_stats(res['redis_arrival'])}")
    return res


def started(name: str, root: str, **kw: Any) -> Cluster:
    """A healthy cluster of the bench's with two front ends, both answering the book; or
    an error, and nothing left running."""
    cluster = bench_cluster(name, root, None, frontends=2, **kw)
    try:
        cluster.start(wait=0)
        cluster.wait_healthy(timeout=60.0, serving=True)
        for url in cluster.fronts[1:]:  # B answers the book too
            if http_json(int(url.rsplit(":", 1)[1]), "GET", f"/bazar/info/{BOOK}")[0] != 200:
                raise RuntimeError(f"front end {url} does not answer GET /bazar/info/{BOOK}")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def redis_server_path() -> str | None:
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server")


def phase_spread(ctx: Ctx, root: str, writes: int) -> dict[str, Any]:
    res: dict[str, Any] = {"writes": writes, "book": BOOK, "frontends": 2}
    log("  a cluster with 2 front ends (HTTP push)")
    cluster = started("spread", root)
    try:
        token = cluster.read_token()
        if not token:
            return {"skipped": "no admin token (neither BAZAR_ADMIN_TOKEN nor secrets.json)"}
        res["http"] = measure_rounds(ctx, cluster, token, writes)
    finally:
        cluster.stop()
    if ctx.stop.is_set():
        return res
    if redis_server_path() is None:
        res["redis"] = {"skipped": "not measured (no redis-server on PATH)"}
        return res
    log("  a cluster with 2 front ends and Redis (HTTP push and Redis pub/sub)")
    server = RedisServer(free_ports(1)[0], os.path.join(root, "spread-redis-server")).start()
    redis_cluster: Cluster | None = None
    arrivals = None
    try:
        redis_cluster = cluster = started("spread-redis", root, redis=server.url)
        token = cluster.read_token()
        if not token:
            raise RuntimeError("no admin token for the Redis cluster")
        arrivals = RedisArrivals(server.port, info_key(BOOK)).start()
        res["redis"] = measure_rounds(ctx, cluster, token, writes, arrivals)
    finally:
        if arrivals is not None:
            arrivals.stop()
        if redis_cluster is not None:
            redis_cluster.stop()
        server.stop()
    return res
