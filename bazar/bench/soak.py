"""Disk over a soak (phase `soak`, opt-in: `--soak`): does the disk stay flat?

Log compaction and the expiry of request ids promise that what grows on a replica's
disk is the store's own data (a sale row on the catalog, an order row on the order
service), not the log nor the table of request ids. The phase makes N purchases
(default 100,000) at 16 connections, as fast as the load runner goes, and every K
purchases samples each replica: the bytes of its data directory (the SQLite file, its
-wal and -shm), the entries its log holds (/health: `log` less `snapshot_index`) and
the request ids it keeps (/metrics: `bazar_replica_request_ids`). At the start, at
half way and at the end it also reads each file's own accounting (SQLite's `dbstat`,
through a read-only connection of its own), which splits the growth of the last half,
the steady state, into the store's own rows, the log, the request ids, free pages and
the WAL.

Then the catch-up: one catalog backup is paused (SIGSTOP, through the launcher, which
only signals processes of the cluster this tool started), writes (`update_price`,
cheap) go on until the primary has compacted its log past it (with production
settings, about 12,000 writes after its last compaction), and the backup is let go:
by default its data directory is first moved aside and it is killed (the supervisor
restarts it on an empty directory: a replica that lost its data), or, with
`--soak-catchup pause`, it is only resumed (a replica far behind). Either way it can
only come back by a snapshot: the phase times it, and reads
`bazar_snapshots_total{kind="installed"}` on its /metrics to say whether it did.
"""

from __future__ import annotations

import itertools
import os
import re
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from bazar.bench.http import build_request, health
from bazar.bench.load import LoadRun
from bazar.bench.phases import Ctx, add_bench_book, log, process_names
from bazar.bench.stats import fmt_stats
from bazar.replication.store import COMPACT_AFTER, KEEP_ENTRIES, RETAIN_REQUESTS, WAL_LIMIT
from bazar.testing.processes import Cluster, call

SOAK_PURCHASES = 100_000
QUICK_SOAK_PURCHASES = 2_000
SOAK_SAMPLES = 40  # samples over a run, unless --soak-every says otherwise
CONNS = 16
CATCHUP_MODES = ("wipe", "pause", "none")
# the table whose rows each purchase adds, on each service (with its indexes)
ROW_TABLE = {"catalog": "sales", "order": "orders"}
DATA_TABLES = {"catalog": ("books", "sales"), "order": ("orders",)}
PARTS = ("data", "log", "requests", "free", "wal", "other")  # what the growth of a replica's directory is made of


# -- reading a replica ---------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample `name` in a Prometheus text exposition whose labels
    include `labels`; None if there is none."""
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != name:
            continue
        found = dict(_LABEL.findall(m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            try:
                return float(m.group(3))
            except ValueError:
                return None
    return None


def metrics_text(url: str, timeout: float = 3.0) -> str | None:
    """A process's GET /metrics, or None."""
    try:
        r = call("GET", url + "/metrics", timeout=timeout)
    except OSError:
        return None
    return r.body.decode("utf-8", "replace") if r.status == 200 else None


def dir_bytes(path: str) -> dict[str, int]:
    """The bytes of a replica's data directory by kind of file: its SQLite file ("db"),
    the file's -wal and -shm, anything else ("other"), and "total"."""
    sizes = {"db": 0, "wal": 0, "shm": 0, "other": 0}
    try:
        entries = list(os.scandir(path))
    except OSError:
        entries = []
    for entry in entries:
        try:
            size = entry.stat(follow_symlinks=False).st_size if entry.is_file(follow_symlinks=False) else 0
        except OSError:
            continue
        kind = ("wal" if entry.name.endswith(".db-wal") else "shm" if entry.name.endswith(".db-shm")
                else "db" if entry.name.endswith(".db") else "other")
        sizes[kind] += size
    sizes["total"] = sum(sizes.values())
    return sizes


def db_file(path: str) -> str | None:
    """The SQLite file of a replica's data directory (catalog.db, orders.db)."""
    try:
        names = sorted(n for n in os.listdir(path) if n.endswith(".db"))
    except OSError:
        return None
    return os.path.join(path, names[0]) if names else None


def table_bytes(path: str, service: str) -> dict[str, Any] | None:
    """A replica's SQLite file as the file itself accounts for it: the bytes of each
    table with its indexes (SQLite's dbstat), the free pages, and the rows of the table
    each purchase adds to. Read through a read-only connection of its own: a read
    transaction, which the replica's WAL mode lets it go on writing beside."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return None
    try:
        owner = dict(db.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        btrees: dict[str, int] = {}
        for name, size in db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            btrees[table] = btrees.get(table, 0) + int(size or 0)
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        row_table = ROW_TABLE[service]
        rows = int(db.execute(f"SELECT COUNT(*) FROM {row_table}").fetchone()[0])
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return {"file_bytes": page_size * pages, "free_bytes": page_size * free, "tables": btrees, "rows": rows}


def parts(tables: Mapping[str, Any], service: str) -> dict[str, int]:
    """A file's bytes as data (the service's own tables), log, request ids, free pages
    and other (meta, the schema, staged snapshot tables)."""
    btrees: Mapping[str, int] = tables.get("tables") or {}
    data = sum(v for k, v in btrees.items() if k in DATA_TABLES[service])
    log_ = btrees.get("raft_log", 0)
    requests = btrees.get("requests", 0)
    free = int(tables.get("free_bytes") or 0)
    other = int(tables.get("file_bytes") or 0) - data - log_ - requests - free
    return {"data": data, "log": log_, "requests": requests, "free": free, "other": other}


def replica_dirs(cluster: Cluster) -> dict[str, tuple[str, str]]:
    """name -> (url, data directory) of every replica, as bazar-cluster lays them out."""
    return {name: (url, os.path.join(cluster.data, name)) for url, name in process_names(cluster).items()
            if name.startswith(("catalog-", "order-"))}


def sample_replica(url: str, path: str) -> dict[str, Any]:
    """One replica now: its directory's bytes, the log it holds, its request ids."""
    h = health(urlsplit(url).port or 80, timeout=3.0) or {}
    text = metrics_text(url)
    ids = metric_value(text, "bazar_replica_request_ids") if text else None
    last, snap = h.get("log"), h.get("snapshot_index")
    return {**dir_bytes(path), "last_seq": h.get("last_seq"), "snapshot_index": snap,
            "log": (last - snap) if isinstance(last, int) and isinstance(snap, int) else None,
            "request_ids": int(ids) if ids is not None else None, "role": h.get("role")}


def service_of(name: str) -> str:
    return name.split("-", 1)[0]


# -- what the samples say ------------------------------------------------------------


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The least-squares slope of ys over xs; None with fewer than 2 distinct xs."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def series(samples: Sequence[Mapping[str, Any]], name: str, key: str) -> tuple[list[float], list[float]]:
    """(purchases, value) of one replica's figure over the samples that have it."""
    xs: list[float] = []
    ys: list[float] = []
    for s in samples:
        v = (s.get("replicas") or {}).get(name, {}).get(key)
        if isinstance(v, (int, float)):
            xs.append(float(s["purchases"]))
            ys.append(float(v))
    return xs, ys


def growth(samples: Sequence[Mapping[str, Any]], name: str) -> dict[str, float | None]:
    """A replica's directory growth in bytes per purchase: over the whole run (first to
    last sample), and in the last half (the least-squares slope of the samples from
    half way on: the steady state, once the log and the request ids are at their
    bounds)."""
    xs, ys = series(samples, name, "total")
    if len(xs) < 2 or xs[-1] == xs[0]:
        return {"whole": None, "last_half": None}
    half = xs[0] + (xs[-1] - xs[0]) / 2
    tail = [(x, y) for x, y in zip(xs, ys) if x >= half]
    return {"whole": (ys[-1] - ys[0]) / (xs[-1] - xs[0]),
            "last_half": slope([x for x, _ in tail], [y for _, y in tail])}


def split(mid: Mapping[str, Any], end: Mapping[str, Any], service: str) -> dict[str, float] | None:
    """The growth of the last half, per purchase, by part: mid and end are a replica's
    readings at half way and at the end ({"purchases", "dir": dir_bytes, "tables":
    table_bytes}). The parts add up to the directory's growth ("total")."""
    dp = (end.get("purchases") or 0) - (mid.get("purchases") or 0)
    if dp <= 0 or not mid.get("tables") or not end.get("tables") or not mid.get("dir") or not end.get("dir"):
        return None
    a, b = parts(mid["tables"], service), parts(end["tables"], service)
    out = {k: (b[k] - a[k]) / dp for k in ("data", "log", "requests", "free")}
    out["wal"] = ((end["dir"]["wal"] + end["dir"]["shm"]) - (mid["dir"]["wal"] + mid["dir"]["shm"])) / dp
    out["total"] = (end["dir"]["total"] - mid["dir"]["total"]) / dp
    out["other"] = out["total"] - sum(out[k] for k in ("data", "log", "requests", "free", "wal"))
    return out


def row_bytes(tables: Mapping[str, Any] | None, service: str) -> float | None:
    """What one purchase's row costs on this service: the bytes of the table each
    purchase adds a row to (with its indexes), divided by its rows."""
    if not tables or not tables.get("rows"):
        return None
    return float((tables.get("tables") or {}).get(ROW_TABLE[service], 0)) / float(tables["rows"])


def steady(first_seq: int | None, purchases: int) -> bool:
    """Whether the last half of a run is a steady state: by half way the service has
    made enough writes for its log to be compacted and its request ids to expire
    (one write per purchase on each service)."""
    if first_seq is None:
        return False
    return first_seq + purchases // 2 >= max(RETAIN_REQUESTS, COMPACT_AFTER + KEEP_ENTRIES)


def judge(soak: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per replica, from a soak's results: bytes per purchase over the whole run and in
    the last half, the row's own bytes (from the table's size), the overhead (the rest),
    the part of it in the SQLite file and its ratio to the row, the split of the last
    half, the bounds seen. The ratio leaves the WAL out: the store bounds it on its own
    (cut back to WAL_LIMIT after each checkpoint), and its size only wobbles with the
    checkpoints, so over a stretch of a run it is noise, not growth."""
    samples = soak.get("samples") or []
    readings = soak.get("readings") or {}
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(readings or ((samples[0].get("replicas") or {}) if samples else {})):
        service = service_of(name)
        g = growth(samples, name)
        mine = readings.get(name) or {}
        row = row_bytes((mine.get("end") or {}).get("tables"), service)
        parts_ = split(mine.get("mid") or {}, mine.get("end") or {}, service) if mine else None
        total = parts_["total"] if parts_ else g["last_half"]
        over = (total - row) if total is not None and row is not None else None
        in_file = (parts_["total"] - parts_["wal"] - row) if parts_ and row is not None else None
        _, logs = series(samples, name, "log")
        _, ids = series(samples, name, "request_ids")
        _, wal = series(samples, name, "wal")
        out[name] = {"service": service, "whole": g["whole"], "last_half": g["last_half"], "row": row,
                     "total": total, "overhead": over, "in_file": in_file,
                     "ratio": (in_file / row) if in_file is not None and row else None,
                     "split": parts_, "max_log": max(logs) if logs else None,
                     "max_request_ids": max(ids) if ids else None, "max_wal": max(wal) if wal else None}
    return out


def worst_ratio(soak: Mapping[str, Any]) -> float | None:
    """The highest overhead in the SQLite file ÷ row of the replicas, if the run reached a
    steady state."""
    if not soak.get("steady"):
        return None
    ratios = [r["ratio"] for r in judge(soak).values() if r["ratio"] is not None]
    return max(ratios) if ratios else None


# -- the phase -----------------------------------------------------------------------


def readings(cluster: Cluster, purchases: int, which: Mapping[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Every replica's directory and file accounting now (start, half way, end)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (_url, path) in which.items():
        db = db_file(path)
        out[name] = {"purchases": purchases, "dir": dir_bytes(path),
                     "tables": table_bytes(db, service_of(name)) if db else None}
    return out


def phase_soak(ctx: Ctx, cluster: Cluster, token: str | None, purchases: int, every: int,
               catchup: str) -> dict[str, Any]:
    if not token:
        return {"skipped": "needs the admin token (a bench book to buy, update_price for the catch-up)"}
    port = cluster.frontend_port
    cluster.wait_healthy(timeout=60.0, serving=True)
    book = add_bench_book(port, token, f"{ctx.run_id}-soak")
    which = replica_dirs(cluster)
    raw = build_request("POST", f"/bazar/purchase/{book}", port, body={"quantity": 1})
    sent = itertools.count()

    def make(_w: int, _k: int) -> bytes | None:
        return raw if next(sent) < purchases else None  # (itertools.count: one step at a time, threads or not)

    def sample(done: int, t: float) -> dict[str, Any]:
        return {"purchases": done, "t": round(t, 3),
                "replicas": {name: sample_replica(url, path) for name, (url, path) in which.items()}}

    first = sample(0, 0.0)
    samples = [first]
    seqs = [r.get("last_seq") for n, r in first["replicas"].items() if isinstance(r.get("last_seq"), int)]
    res: dict[str, Any] = {"purchases_wanted": purchases, "every": every, "conns": CONNS, "book": book,
                           "first_seq": min(seqs) if seqs else None, "samples": samples,
                           "bounds": {"retain_requests": RETAIN_REQUESTS, "compact_after": COMPACT_AFTER,
                                      "keep_entries": KEEP_ENTRIES, "wal_limit": WAL_LIMIT}}
    start = readings(cluster, 0, which)
    mid: dict[str, dict[str, Any]] | None = None
    # a time bound far beyond any rate the store reaches (40 purchases/s), for the loop's sake
    bound = max(60.0, purchases / 40.0)
    log(f"  {purchases} purchases at {CONNS} connections, a sample every {every} (≤ {bound:.0f}s)")
    run = LoadRun(port, make, CONNS, bound, stop_event=ctx.stop).start()
    t0 = time.monotonic()
    mark = every
    try:
        while not ctx.stop.is_set() and any(t is None for t in run.t_end):
            done = sum(len(lat) for lat in run.lat)
            if done >= mark:
                samples.append(sample(done, time.monotonic() - t0))
                if mid is None and done >= purchases // 2:
                    mid = readings(cluster, done, which)
                if len(samples) % 5 == 0:
                    log(f"    {done} purchases, {time.monotonic() - t0:.0f}s: "
                        + ", ".join(f"{n} {r['total'] / 1e6:.1f} MB" for n, r in samples[-1]["replicas"].items()))
                mark = (done // every + 1) * every
            time.sleep(0.05)
    finally:
        run.stop()
        total = run.wait()
    res["load"] = total
    res["purchases"] = total["n"]
    log(f"  soak: {fmt_stats(total)}")
    try:
        cluster.wait_quiet(timeout=30.0)  # every replica at the same seq: the last sample is the same state
    except AssertionError as e:
        res["note"] = f"not quiet at the end: {str(e)[:200]}"
    samples.append(sample(total["n"], time.monotonic() - t0))
    end = readings(cluster, total["n"], which)
    res["readings"] = {name: {"start": start[name], "mid": (mid or {}).get(name), "end": end[name]} for name in which}
    res["steady"] = steady(res["first_seq"], total["n"])
    if not res["steady"]:
        res["unjudged"] = (f"no steady state (half way, the services had made fewer than "
                           f"{max(RETAIN_REQUESTS, COMPACT_AFTER + KEEP_ENTRIES):,} writes: more --soak-purchases)")
    for name, r in judge(res).items():
        log(f"  {name}: {_per(r['whole'])} B/purchase over the run, {_per(r['total'])} in the last half "
            f"(row {_per(r['row'])}, overhead {_per(r['overhead'])}, in the SQLite file {_per(r['in_file'])}); "
            f"log ≤ {_per(r['max_log'])}, request ids ≤ {_per(r['max_request_ids'])}")
    if catchup != "none" and not ctx.stop.is_set():
        log(f"  catch-up: a catalog backup far behind ({catchup})")
        res["catchup"] = catch_up(ctx, cluster, token, book, catchup)
    return res


def _per(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


# -- the catch-up --------------------------------------------------------------------


def snapshots(url: str, kind: str) -> int | None:
    text = metrics_text(url)
    value = metric_value(text, "bazar_snapshots_total", kind=kind) if text else None
    return int(value) if value is not None else None


def primary_among(urls: Sequence[str]) -> tuple[str, dict[str, Any]] | None:
    """(url, /health) of the replica among `urls` that is primary in the highest epoch."""
    best: tuple[str, dict[str, Any]] | None = None
    for url in urls:
        h = health(urlsplit(url).port or 80, timeout=1.0)
        if h and h.get("role") == "primary" and (best is None or (h.get("epoch") or 0) > (best[1].get("epoch") or 0)):
            best = (url, h)
    return best


def writes_needed(leader: Mapping[str, Any], behind_seq: int) -> int:
    """update_price writes before the primary compacts its log past a backup stopped at
    `behind_seq`: its next compaction comes COMPACT_AFTER + KEEP_ENTRIES entries past its
    last one, and cuts KEEP_ENTRIES short of its applied index."""
    last, snap = int(leader.get("last_seq") or 0), int(leader.get("snapshot_index") or 0)
    due = snap + COMPACT_AFTER + KEEP_ENTRIES - last
    past = behind_seq + KEEP_ENTRIES - last
    return max(due, past, 0) + 1


def catch_up(ctx: Ctx, cluster: Cluster, token: str, book: int, mode: str,
             write_bound: float = 600.0, back_bound: float = 180.0) -> dict[str, Any]:
    cluster.wait_healthy(timeout=60.0)
    found = cluster.find_primary("catalog")
    if found is None:
        return {"skipped": "no catalog primary"}
    names = process_names(cluster)
    backup_url = next(u for u in cluster.catalogs if u != found[0])
    name = names[backup_url]
    h = cluster.health(backup_url) or {}
    pid, behind = h.get("pid"), h.get("last_seq")
    installed0 = snapshots(backup_url, "installed") if mode == "pause" else 0  # (wiped: a new process counts from 0)
    sent0 = snapshots(found[0], "sent")
    if not isinstance(behind, int) or not cluster.pause(pid):
        return {"skipped": f"could not pause {name} (pid {pid}): not a process of the started cluster"}
    res: dict[str, Any] = {"mode": mode, "replica": name, "pid": pid, "behind_seq": behind}
    try:
        log(f"    {name} (pid {pid}) paused at seq {behind}")
        leader_port = urlsplit(found[0]).port or 80
        lh = health(leader_port, timeout=3.0) or {}
        needed = writes_needed(lh, behind)
        res["writes_needed"] = needed
        enough = threading.Event()
        prices = itertools.count()

        def make(_w: int, _k: int) -> bytes | None:
            if enough.is_set():
                return None
            price = 10.0 + (next(prices) % 1000) * 0.01
            return build_request("PUT", f"/bazar/update_price/{book}", cluster.frontend_port,
                                 body={"price": round(price, 2)}, token=token)

        log(f"    update_price writes until the primary compacts past seq {behind} (about {needed})")
        run = LoadRun(cluster.frontend_port, make, CONNS, write_bound, max_per_worker=2 * needed // CONNS + 5_000,
                      stop_event=ctx.stop).start()
        t0 = time.monotonic()
        compacted = None
        others = [u for u in cluster.catalogs if u != backup_url]  # (the paused one would only time out)
        try:
            while not ctx.stop.is_set() and any(t is None for t in run.t_end):
                found = primary_among(others) or found
                snap = found[1].get("snapshot_index")
                if isinstance(snap, int) and snap > behind:
                    compacted = snap
                    break
                time.sleep(0.25)
        finally:
            enough.set()
            run.stop()
            writes = run.wait()
        res.update(writes=writes["n"], write_errors=writes["errors"], write_s=time.monotonic() - t0,
                   write_rps=writes["rps"], leader_snapshot_index=compacted)
        if compacted is None:
            res["error"] = f"the primary did not compact past seq {behind} within the writes made"
            return res
        log(f"    {writes['n']} writes in {res['write_s']:.1f}s; the primary compacted up to {compacted}")
        target = found[1].get("commit") or compacted
        t1 = time.monotonic()
        if mode == "wipe":
            aside = cluster.wipe(pid, name)
            if aside is None:
                res["error"] = "the launcher refused to wipe it (not paused, or its lock names another pid)"
                return res
            res["moved_aside"] = os.path.basename(aside)
        else:
            cluster.resume(pid)
        back = None
        last: dict[str, Any] | None = None
        while not ctx.stop.is_set() and time.monotonic() - t1 < back_bound:
            last = cluster.health(backup_url)
            if (last and last.get("status") == "ok" and last.get("voter") and isinstance(last.get("last_seq"), int)
                    and last["last_seq"] >= target):
                back = time.monotonic() - t1
                break
            time.sleep(0.05)
        res.update(target_seq=target, back_s=back, after={k: (last or {}).get(k) for k in (
            "pid", "role", "status", "voter", "last_seq", "snapshot_index")})
        if last:
            cluster.remember(last.get("pid"))
        installed = snapshots(backup_url, "installed")
        sent = snapshots(found[0], "sent")
        res["installed"] = (installed - installed0) if installed is not None and installed0 is not None else None
        res["sent"] = (sent - sent0) if sent is not None and sent0 is not None else None
        res["by_snapshot"] = bool(res["installed"])
        log(f"    {name} back " + (f"{back:.2f}s after it was let go" if back is not None else "not in time")
            + f"; snapshots installed: {res['installed']}")
    finally:
        if pid in cluster.paused:
            cluster.resume(pid)
    return res
