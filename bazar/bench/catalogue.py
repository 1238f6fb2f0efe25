"""A catalogue that grows: import a large catalogue into a replicated store, then read
it whole and by pages, through the front end and straight from the replicas.

    python -m bazar.bench.catalogue [--books 100000] [--out DIR] [--keep-data]

It starts its own throw-away `bazar-cluster` on free loopback ports (3 catalog, 3
order, 1 front end, durable commits) and always stops it. What it measures, each
against the machine's load average at the time:

- import: the books in CSV batches that fit a request (64 KiB, as `bazar import`
  sends them), one client, then two at once: books/s;
- `GET /bazar/info/all` without paging: time and size, at the front end and on a
  replica;
- pages of 100 of `info/all` and of a topic's search (the first and a repeated read);
- the search of a topic of 5,000 books at the front end, a cache hit and a miss (the
  read after a write that invalidated the topic), next to the same query on a replica;
- the front end's memory per cache entry (RSS before and after filling it);
- a catalog replica's start with the whole catalogue: its store opened in-process,
  and the process restarted by the supervisor after a kill -9.

Results go to DIR/catalogue.json, and a Markdown summary to stdout. A benchmark
reports; it never asserts. Every loop is bounded by a count and by time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from bazar.bench.http import LOOPBACK
from bazar.bench.phases import log
from bazar.bench.stats import summarize
from bazar.cache import LRUCache
from bazar.catalog import CatalogMachine
from bazar.cli import csv_batches
from bazar.records import NewBook, Page, info_key, page_key, search_key
from bazar.replication.store import Store
from bazar.testing.processes import TOKEN, Cluster, wait_until
from bazar.testing.procfs import read_rss_kb

BIG_TOPIC = "bench big topic"  # the topic of every 20th book: 5,000 of 100,000
TOPICS = 99  # the other books' topics
PAGE = 100
PHASE_SECONDS = 60.0  # no phase's loop runs longer than this


def make_books(n: int, seed: int = 7) -> list[NewBook]:
    """`n` books: every 20th of topic BIG_TOPIC, the others spread over TOPICS topics."""
    rng = random.Random(seed)
    words = ("Raft", "Paxos", "caches", "Twisted", "SQLite", "gossip", "leases", "clocks", "queues", "quorums")
    return [NewBook(title=f"Book {i:06d}: {rng.choice(words)} and {rng.choice(words)}",
                    topic=BIG_TOPIC if i % 20 == 0 else f"bench topic {i % TOPICS}",
                    price=round(rng.uniform(1, 200), 2), quantity=rng.randint(1, 1000)) for i in range(n)]


class Conn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port (http.client reads a large
    body in one piece, where the bench's lean client grows it chunk by chunk)."""

    def __init__(self, port: int, token: str | None = None, timeout: float = 30.0):
        self.port = port
        self.token = token
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", admin: bool = False) -> tuple[int, bytes, float]:
        """(status, body, seconds from sending to the last byte)."""
        headers = {"Content-Type": content_type} if body is not None else {}
        if admin and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (1, 2):  # a kept-alive connection the server closed: once more on a new one
            if self.conn is None:
                self.conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=self.timeout)
            started = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
                continue
            return response.status, data, time.perf_counter() - started
        raise AssertionError("unreachable")

    def get(self, path: str, admin: bool = False) -> tuple[int, bytes, float]:
        return self.request("GET", path, admin=admin)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ms(stats: dict[str, Any]) -> dict[str, Any]:
    """The parts of a summary worth keeping here."""
    return {k: stats[k] for k in ("n", "p50_ms", "p95_ms", "max_ms") if k in stats}


# -- the phases ---------------------------------------------------------------------------

def phase_import(front: int, books: Sequence[NewBook], clients: Sequence[int]) -> dict[str, Any]:
    """The books in CSV batches under the request limit: the first share of the batches
    with one client, the next with more clients at once (`clients`)."""
    batches = csv_batches(books)
    clients = clients[:len(batches)]  # (a small catalogue may not make a batch a step)
    step = len(batches) // len(clients)
    shares = [batches[i * step:(i + 1) * step if i + 1 < len(clients) else len(batches)]
              for i in range(len(clients))]
    return {"steps": [import_step(front, share, n) for n, share in zip(clients, shares)]}


def import_step(front: int, share: list[tuple[bytes, int]], n_clients: int) -> dict[str, Any]:
    """`share`'s batches sent by `n_clients` clients at once, each taking the next one."""
    latencies: list[float] = []
    errors: list[str] = []
    imported = [0]
    lock = threading.Lock()
    queue = list(share)

    def worker() -> None:
        conn = Conn(front, TOKEN)
        deadline = time.monotonic() + 10 * PHASE_SECONDS
        while time.monotonic() < deadline:
            with lock:
                if not queue:
                    break
                body, count = queue.pop(0)
            status, answer, took = conn.request("POST", "/bazar/books/import", body, "text/csv", admin=True)
            with lock:
                if status == 201:
                    latencies.append(took)
                    imported[0] += count
                else:
                    errors.append(f"{status} {answer[:200]!r}")
        conn.close()

    started_load = load()
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    result: dict[str, Any] = {"clients": n_clients, "batches": len(share), "books": imported[0], "seconds": elapsed,
              "books_per_s": imported[0] / elapsed if elapsed else None,
              "rows_per_batch": round(sum(c for _, c in share) / len(share)) if share else 0,
              "bytes_per_batch": round(sum(len(b) for b, _ in share) / len(share)) if share else 0,
              "batch": ms(summarize(latencies)), "errors": errors[:5], "load": started_load}
    log(f"  import, {n_clients} client(s): {imported[0]} books in {elapsed:.1f}s = "
        f"{result['books_per_s'] or 0:.0f} books/s; batch p50 {result['batch']['p50_ms'] or 0:.1f} ms; "
        f"errors {len(errors)}")
    return result


def interleaved(reads: dict[str, Callable[[], tuple[int, bytes, float]]], rounds: int,
                before: Callable[[], None] | None = None) -> dict[str, Any]:
    """Each read once per round, in turn (so drift in the machine's load touches all
    alike); their latencies and the size of their answers."""
    times: dict[str, list[float]] = {name: [] for name in reads}
    sizes: dict[str, int] = {}
    errors: dict[str, int] = {name: 0 for name in reads}
    deadline = time.monotonic() + PHASE_SECONDS
    for _ in range(rounds):
        if time.monotonic() > deadline:
            break
        if before is not None:
            before()
        for name, read in reads.items():
            status, body, took = read()
            if status == 200:
                times[name].append(took)
                sizes[name] = len(body)
            else:
                errors[name] += 1
    return {name: {**ms(summarize(times[name])), "bytes": sizes.get(name), "errors": errors[name]}
            for name in reads}


def phase_whole(front: int, replica: int, rounds: int) -> dict[str, Any]:
    """GET /bazar/info/all without paging (never cached) next to GET /books on a replica."""
    fe, rep = Conn(front), Conn(replica)
    result = {"load": load(), **interleaved({"frontend": lambda: fe.get("/bazar/info/all"),
                                              "replica": lambda: rep.get("/books")}, rounds)}
    log(f"  info/all: front end p50 {result['frontend']['p50_ms']:.1f} ms, replica p50 "
        f"{result['replica']['p50_ms']:.1f} ms, {result['frontend']['bytes']} bytes")
    return result


def phase_pages(front: int, replica: int, top: int, rounds: int, seed: int = 11) -> dict[str, Any]:
    """Pages of PAGE books at random places: info/all (not cached) and the big topic's
    search (its first read a miss, the same page again a hit), next to the replica."""
    rng = random.Random(seed)
    fe, rep = Conn(front), Conn(replica)
    topic = BIG_TOPIC.replace(" ", "%20")
    after = [0]

    def pick() -> None:
        after[0] = rng.randrange(0, max(top - PAGE * 20, 1))

    result = {"load": load(), **interleaved({
        "info_all_frontend": lambda: fe.get(f"/bazar/info/all?limit={PAGE}&after={after[0]}"),
        "info_all_replica": lambda: rep.get(f"/books?limit={PAGE}&after={after[0]}"),
        "search_frontend_first": lambda: fe.get(f"/bazar/search/{topic}?limit={PAGE}&after={after[0]}"),
        "search_frontend_again": lambda: fe.get(f"/bazar/search/{topic}?limit={PAGE}&after={after[0]}"),
        "search_replica": lambda: rep.get(f"/books?topic={topic}&limit={PAGE}&after={after[0]}"),
    }, rounds, before=pick)}
    for name in ("info_all_frontend", "info_all_replica", "search_frontend_first", "search_frontend_again",
                 "search_replica"):
        log(f"  page {name}: p50 {result[name]['p50_ms']:.2f} ms ({result[name]['bytes']} bytes)")
    return result


def phase_search(front: int, replica: int, rounds: int) -> dict[str, Any]:
    """The whole big topic: a miss (the first read after a write that invalidated it),
    then a hit, next to the replica's own time for the same query. The miss is read at
    once after the write (some replicas have not applied it yet: the front end must
    find one that has), and again after `settle` seconds (every replica has)."""
    fe, rep, writer = Conn(front), Conn(replica), Conn(front, TOKEN)
    topic = BIG_TOPIC.replace(" ", "%20")
    n = [0]
    result: dict[str, Any] = {"load": load()}
    for name, settle in (("at_once", 0.0), ("settled", 0.15)):
        def invalidate(settle: float = settle) -> None:
            n[0] += 1
            book = {"title": f"Invalidating book {n[0]}", "topic": BIG_TOPIC, "price": 1.0, "quantity": 1}
            writer.request("POST", "/bazar/books", json.dumps(book).encode(), admin=True)
            time.sleep(settle)

        def replica_read() -> tuple[int, bytes, float]:
            time.sleep(0.15)  # (a moment after the miss: this replica has applied the write by then)
            return rep.get(f"/books?topic={topic}")

        step = interleaved({"frontend_miss": lambda: fe.get(f"/bazar/search/{topic}"), "replica": replica_read,
                            "frontend_hit": lambda: fe.get(f"/bazar/search/{topic}")}, rounds, before=invalidate)
        step["miss_over_replica"] = step["frontend_miss"]["p50_ms"] / step["replica"]["p50_ms"]
        step["settle_s"] = settle
        result[name] = step
        log(f"  search of {step['replica']['bytes']} bytes, miss read {name}: miss p50 "
            f"{step['frontend_miss']['p50_ms']:.2f} ms, replica p50 {step['replica']['p50_ms']:.2f} ms "
            f"({step['miss_over_replica']:.2f}x), hit p50 {step['frontend_hit']['p50_ms']:.2f} ms")
    return result


def phase_memory(front: int, pid: int | None, fills: dict[str, list[str]]) -> dict[str, Any]:
    """The front end's RSS before and after filling its cache with each kind of entry
    (`fills`: the paths to read, each a new entry), and its RSS over its entries."""
    if pid is None:
        return {"skipped": "no front-end pid"}
    conn = Conn(front)
    result: dict[str, Any] = {"load": load()}

    def size() -> int:
        status, body, _ = conn.get("/bazar/cache")
        return int(json.loads(body)["size"]) if status == 200 else 0

    for kind, paths in fills.items():
        before, rss_before = size(), read_rss_kb(pid)
        deadline = time.monotonic() + PHASE_SECONDS
        for path in paths:
            if time.monotonic() > deadline:
                break
            conn.get(path)
        time.sleep(0.3)
        after, rss_after = size(), read_rss_kb(pid)
        added = after - before
        result[kind] = {"entries_added": added, "rss_before_kb": rss_before, "rss_after_kb": rss_after,
                        "bytes_per_entry": (rss_after - rss_before) * 1024 / added
                        if rss_after and rss_before and added > 0 else None}
        log(f"  memory, {kind}: RSS {rss_before} -> {rss_after} kB for {added} entries: "
            f"{result[kind]['bytes_per_entry'] or 0:.0f} bytes per entry")
    entries, rss = size(), read_rss_kb(pid)
    result.update(entries=entries, rss_kb=rss, rss_per_entry_bytes=rss * 1024 / entries if rss and entries else None)
    return result


def cache_entry_bytes(bodies: dict[str, bytes], n: int = 10_000) -> dict[str, float]:
    """What one entry of each kind costs in the front end's cache (bazar.cache.LRUCache),
    measured in-process with tracemalloc: its key, its body, its bookkeeping."""
    import tracemalloc

    found = {}
    for kind, body in bodies.items():
        cache = LRUCache(n)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            value = bytes(bytearray(body))  # a body of its own, as each answer is
            if kind == "info":
                cache.put(info_key(10**6 + i), value, 1)
            else:
                cache.put(page_key(search_key(BIG_TOPIC), Page(after=i, limit=PAGE)), value, 1,
                          under=search_key(BIG_TOPIC))
        found[kind] = (tracemalloc.get_traced_memory()[0] - base) / n
        tracemalloc.stop()
        found[f"{kind}_body_bytes"] = len(body)
    return found


def phase_restart(cluster: Cluster) -> dict[str, Any]:
    """kill -9 a catalog backup: the time until the supervisor's new process answers
    /health, and until it serves reads again (status ok)."""
    backup = next((u for u in cluster.catalogs if (cluster.health(u) or {}).get("role") == "backup"), None)
    if backup is None:
        return {"skipped": "no catalog backup"}
    pid = (cluster.health(backup) or {}).get("pid")
    killed_at = time.monotonic()
    if not cluster.kill(pid):
        return {"skipped": f"pid {pid} is not this cluster's"}
    answered: list[float] = []

    def back() -> bool:
        h = cluster.health(backup)
        if h is None or h.get("pid") == pid:
            return False
        if not answered:
            answered.append(time.monotonic() - killed_at)
        return h.get("status") == "ok"

    wait_until(back, PHASE_SECONDS, "the restarted catalog replica serving", interval=0.02)
    serving = time.monotonic() - killed_at
    cluster.remember((cluster.health(backup) or {}).get("pid"))
    result = {"load": load(), "health_s": answered[0] if answered else None, "serving_s": serving,
              "supervisor_restart_delay_s": 0.5}
    log(f"  restart after kill -9: /health answers after {result['health_s']:.2f}s, serving after {serving:.2f}s "
        "(the supervisor waits 0.5 s before it restarts a process)")
    return result


def store_open(data: str) -> dict[str, Any]:
    """Open a catalog replica's store in-process (integrity check, the log's terms)."""
    source = os.path.join(data, "catalog-1")
    files = [f for f in os.listdir(source) if f.startswith("catalog.db")]
    with tempfile.TemporaryDirectory(prefix="bazar-open-") as tmp:
        for name in files:
            shutil.copy(os.path.join(source, name), tmp)
        times = []
        size = sum(os.path.getsize(os.path.join(tmp, name)) for name in files)
        for _ in range(3):
            started = time.perf_counter()
            store = Store(os.path.join(tmp, "catalog.db"), CatalogMachine())
            times.append(time.perf_counter() - started)
            entries, books = store.last_index(), store.db.execute("SELECT COUNT(*) FROM books").fetchone()[0]
            store.close()
    result = {"load": load(), "seconds": min(times), "db_bytes": size, "log_entries": entries, "books": books}
    log(f"  store open: {result['seconds'] * 1000:.0f} ms for {books} books, {entries} log entries, "
        f"{size / 1e6:.1f} MB")
    return result


def rss_of(cluster: Cluster, urls: Sequence[str]) -> dict[str, int | None]:
    found = {}
    for url in urls:
        pid = (cluster.health(url) or {}).get("pid")
        found[url] = read_rss_kb(pid) if isinstance(pid, int) and cluster.owns(pid) else None
    return found


# -- the run ------------------------------------------------------------------------------

def run(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    front = cluster.frontend_port
    replica = port_of(cluster.catalogs[0])
    books = make_books(args.books)
    results: dict[str, Any] = {"books": args.books, "big_topic_books": sum(b.topic == BIG_TOPIC for b in books),
                               "cpus": os.cpu_count(), "load_at_start": load()}
    log(f"import of {args.books} books")
    results["import"] = phase_import(front, books, clients=(1, 2))
    cluster.wait_quiet(120)
    results["catalog_rss_kb"] = rss_of(cluster, cluster.catalogs)
    top = args.books + 7
    log("info/all, whole")
    results["info_all"] = phase_whole(front, replica, args.rounds)
    log("pages")
    results["pages"] = phase_pages(front, replica, top, args.rounds * 10)
    log("search of the big topic")
    results["search"] = phase_search(front, replica, args.rounds * 3)
    log("front-end memory per cache entry")
    fe_pid = (cluster.health(cluster.front) or {}).get("pid")
    rng = random.Random(5)
    topic = BIG_TOPIC.replace(" ", "%20")
    span = max(top - PAGE * 20, 1)  # (the places of pages that are full)
    fills = {"info": [f"/bazar/info/{i}" for i in rng.sample(range(7, top), min(args.entries, top - 7))],
             "search_page": [f"/bazar/search/{topic}?limit={PAGE}&after={a}"
                             for a in rng.sample(range(span), min(args.entries, span))]}
    results["memory"] = phase_memory(front, fe_pid if isinstance(fe_pid, int) and cluster.owns(fe_pid) else None,
                                     fills)
    _, info_body, _ = Conn(front).get("/bazar/info/1000")
    _, page_body, _ = Conn(front).get(f"/bazar/search/{topic}?limit={PAGE}&after=1000")
    results["memory"]["in_process"] = cache_entry_bytes({"info": info_body, "search_page": page_body})
    log("a catalog replica's restart")
    results["restart"] = phase_restart(cluster)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The figures as the rows of a Markdown table."""
    whole, pages, search, mem = results["info_all"], results["pages"], results["search"], results["memory"]
    lines = ["| what | measured |", "|---|---|"]
    for step in results["import"]["steps"]:
        lines.append(f"| import, {step['clients']} client(s), {step['rows_per_batch']} books "
                     f"({step['bytes_per_batch'] / 1024:.0f} KiB) a batch | {step['books_per_s']:,.0f} books/s "
                     f"(batch p50 {step['batch']['p50_ms']:.0f} ms) |")
    lines += [
        f"| `info/all`, {results['books']:,} books, {whole['frontend']['bytes'] / 1e6:.1f} MB: front end / "
        f"replica p50 | {whole['frontend']['p50_ms']:.0f} ms / {whole['replica']['p50_ms']:.0f} ms |",
        f"| `info/all?limit=100&after=…` p50: front end / replica | {pages['info_all_frontend']['p50_ms']:.2f} ms / "
        f"{pages['info_all_replica']['p50_ms']:.2f} ms |",
        f"| search page of 100 p50: front end first read / again (hit) / replica | "
        f"{pages['search_frontend_first']['p50_ms']:.2f} ms / {pages['search_frontend_again']['p50_ms']:.2f} ms / "
        f"{pages['search_replica']['p50_ms']:.2f} ms |",
    ]
    for name, when in (("at_once", "at once after the write"), ("settled", "0.15 s after the write")):
        step = search[name]
        lines.append(f"| search of {results['big_topic_books']:,}+ books ({step['replica']['bytes'] / 1e3:.0f} kB) "
                     f"p50, miss read {when}: front end miss / hit / replica | "
                     f"{step['frontend_miss']['p50_ms']:.2f} ms / {step['frontend_hit']['p50_ms']:.2f} ms / "
                     f"{step['replica']['p50_ms']:.2f} ms (miss = {step['miss_over_replica']:.2f} × replica) |")
    for kind in ("info", "search_page"):
        if (mem.get(kind) or {}).get("bytes_per_entry") is not None:
            lines.append(f"| front-end RSS growth per cache entry, {kind} ({mem[kind]['entries_added']:,} entries) "
                         f"| {mem[kind]['bytes_per_entry']:,.0f} bytes |")
    inproc = mem.get("in_process", {})
    for kind in ("info", "search_page"):
        if kind in inproc:
            lines.append(f"| cache entry, {kind} (a {inproc[kind + '_body_bytes']:,}-byte body), in-process | "
                         f"{inproc[kind]:,.0f} bytes |")
    if mem.get("rss_per_entry_bytes"):
        lines.append(f"| front-end RSS / entries | {mem['rss_kb'] / 1024:.0f} MB / {mem['entries']:,} = "
                     f"{mem['rss_per_entry_bytes'] / 1024:.1f} kB |")
    if "store_open" in results:
        so = results["store_open"]
        lines.append(f"| catalog store opened in-process, {so['books']:,} books, {so['db_bytes'] / 1e6:.0f} MB | "
                     f"{so['seconds'] * 1000:.0f} ms |")
    rs = results.get("restart", {})
    if "serving_s" in rs:
        lines.append(f"| catalog replica after kill -9: /health / serving | {rs['health_s']:.2f} s / "
                     f"{rs['serving_s']:.2f} s (0.5 s of it the supervisor's restart delay) |")
    rss = [kb for kb in results.get("catalog_rss_kb", {}).values() if kb]
    if rss:
        lines.append(f"| catalog replica RSS after the import | {min(rss) / 1024:.0f}–{max(rss) / 1024:.0f} MB |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bazar.bench.catalogue", description=__doc__.split("\n\n")[0])
    p.add_argument("--books", type=int, default=100_000, help="books to import (default 100000)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of the whole-catalogue reads (pages: 10x, "
                   "searches: 3x; default 10)")
    p.add_argument("--entries", type=int, default=10_000, help="cache entries added for the memory figure")
    p.add_argument("--out", default="bench-out", help="directory of catalogue.json (default bench-out)")
    p.add_argument("--keep-data", action="store_true", help="keep the cluster's data directory and logs")
    args = p.parse_args(argv)
    if not 100 <= args.books <= 1_000_000 or not 1 <= args.rounds <= 100 or not 0 <= args.entries <= 100_000:
        p.error("--books 100..1000000, --rounds 1..100, --entries 0..100000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = tempfile.mkdtemp(prefix="bazar-catalogue-")
    data = os.path.join(root, "cluster")
    cluster = Cluster(data=data, name="catalogue", cache_size=2 * args.entries + 1024, die_with_parent=True,
                      progress=log)
    results: dict[str, Any] = {}
    try:
        cluster.start(wait=0)
        cluster.wait_healthy(60, serving=True)
        results = run(cluster, args)
    finally:
        cluster.stop()
        if results:
            log("the catalog store, opened in-process")
            results["store_open"] = store_open(data)
        if args.keep_data:
            log(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "catalogue.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
