"""Unit tests of bazar-bench's pure parts: no cluster, a few seconds in all."""

from __future__ import annotations

import collections
import http.client
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
import types

import pytest

from bazar.bench import cli, compare, phases, timeline
from bazar.bench.http import LeanConn, ProtocolError, build_request, read_response
from bazar.bench.load import LoadRun, run_load
from bazar.bench.report import TARGETS, evaluate_targets, info_latency_split, render_report, targets_text
from bazar.bench.stats import (
    RefLRU,
    fmt_stats,
    make_cache,
    percentile,
    replay_lru,
    summarize,
    zipf_topk_mass,
    zipf_trace,
)
from bazar.testing.processes import Cluster, free_ports
from bazar.testing.procfs import is_descendant, parse_proc_stat, proc_cpu_seconds, read_proc_stat

# ---------------------------------------------------------------- statistics


def test_percentile_interpolates_like_numpy_linear():
    xs = list(range(1, 11))  # 1..10
    assert percentile(xs, 0) == 1
    assert percentile(xs, 100) == 10
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 95) == pytest.approx(9.55)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile([0.0, 1.0], 25) == pytest.approx(0.25)


def test_percentile_edge_cases():
    assert percentile([], 50) is None
    assert percentile([7], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1, 2], 101)


def test_summarize_converts_to_ms_and_rate():
    st = summarize([0.003, 0.001, 0.002], errors=2, elapsed=0.5, statuses={"503": 2})
    assert st["n"] == 3
    assert st["errors"] == 2
    assert st["rps"] == pytest.approx(6.0)
    assert st["avg_ms"] == pytest.approx(2.0)
    assert st["p50_ms"] == pytest.approx(2.0)
    assert st["max_ms"] == pytest.approx(3.0)
    assert st["statuses"] == {"503": 2}


def test_summarize_empty():
    st = summarize([])
    assert st["n"] == 0 and st["p50_ms"] is None and st["rps"] is None


# ---------------------------------------------------------------- zipf + LRU


def test_zipf_trace_reproducible_and_in_range():
    a = zipf_trace(100, 5000, s=1.0, seed=7)
    b = zipf_trace(100, 5000, s=1.0, seed=7)
    c = zipf_trace(100, 5000, s=1.0, seed=8)
    assert a == b
    assert a != c
    assert len(a) == 5000
    assert all(0 <= k < 100 for k in a)


def test_zipf_trace_is_skewed():
    counts = collections.Counter(zipf_trace(50, 20000, s=1.0, seed=1))
    assert counts.most_common(1)[0][0] == 0
    # P(key 0) = 1 / H(50) ≈ 0.222; P(key 1) is half of it
    assert counts[0] / 20000 == pytest.approx(1 / sum(1 / k for k in range(1, 51)), abs=0.02)
    assert counts[0] > 1.6 * counts[1]
    assert counts[1] > counts[10] > counts[49]


def test_zipf_trace_rejects_bad_arguments():
    with pytest.raises(ValueError):
        zipf_trace(0, 10)
    with pytest.raises(ValueError):
        zipf_trace(10, -1)
    assert zipf_trace(3, 0) == []


def test_zipf_topk_mass():
    assert zipf_topk_mass(10, 10) == pytest.approx(1.0)
    assert zipf_topk_mass(10, 0) == 0.0
    assert zipf_topk_mass(2, 1, s=1.0) == pytest.approx(2 / 3)


def test_replay_reference_lru_evicts_least_recently_used():
    # cap 2: 1 2 1(hit) 3(evicts 2) 2(miss, evicts 1) 3(hit)
    cache = RefLRU(2)
    r = replay_lru([1, 2, 1, 3, 2, 3], cache)
    assert (r["hits"], r["misses"], r["evictions"]) == (2, 4, 2)
    assert r["hit_rate"] == pytest.approx(2 / 6)


def test_replay_zero_capacity_never_hits():
    r = replay_lru([1, 1, 1], RefLRU(0))
    assert r["hits"] == 0 and r["misses"] == 3


def test_replay_detects_misses_by_counter_when_get_returns_a_sentinel():
    class SentinelCache(RefLRU):
        def get(self, key):
            v = super().get(key)
            return "MISSING" if v is None else v

    r = replay_lru([5, 5, 6, 5], SentinelCache(4))
    assert (r["hits"], r["misses"]) == (2, 2)


def test_replay_hit_rate_grows_with_capacity():
    trace = zipf_trace(200, 5000, seed=3)
    rates = [replay_lru(trace, RefLRU(c))["hit_rate"] for c in (1, 10, 50, 200)]
    assert rates == sorted(rates)
    assert rates[-1] == pytest.approx(1 - len(set(trace)) / len(trace))


def test_replay_through_bazar_cache_matches_reference():
    import bazar.cache as cache_mod
    trace = zipf_trace(100, 3000, seed=5)
    for cap in (1, 10, 50):
        ours = replay_lru(trace, make_cache(cache_mod.LRUCache, cap))
        ref = replay_lru(trace, RefLRU(cap))
        assert ours["hit_rate"] == pytest.approx(ref["hit_rate"])


# ---------------------------------------------------------------- /proc


def test_parse_proc_stat_with_awkward_command_name():
    text = "1234 (we(ir) d) S 77 1234 1234 0 -1 4194560 " + " ".join(["0"] * 12) + " 98765 0 0\n"
    st = parse_proc_stat(text)
    assert st["pid"] == 1234
    assert st["comm"] == "we(ir) d"
    assert st["state"] == "S"
    assert st["ppid"] == 77
    assert st["pgid"] == 1234
    assert st["starttime"] == 98765
    assert (st["utime"], st["stime"]) == (0, 0)


def test_parse_real_proc_stat():
    st = parse_proc_stat(read_proc_stat(os.getpid()))
    assert (st["pid"], st["ppid"], st["pgid"]) == (os.getpid(), os.getppid(), os.getpgid(0))
    assert st["starttime"] > 0
    assert proc_cpu_seconds(os.getpid()) > 0
    assert proc_cpu_seconds(None) is None


def _fake_stats(parents):
    def read(pid):
        if pid not in parents:
            raise FileNotFoundError(pid)
        return f"{pid} (p) S {parents[pid]} 1 1 " + " ".join(["0"] * 16) + " 5 0\n"

    return read


def test_is_descendant_walks_the_parent_chain():
    # 1 <- 100 (bench) <- 200 (twistd) <- 300 (procmon child) <- 400 (grandchild)
    read = _fake_stats({100: 1, 200: 100, 300: 200, 400: 300, 500: 1})
    assert is_descendant(300, 200, read_stat=read)
    assert is_descendant(400, 200, read_stat=read)
    assert is_descendant(400, 100, read_stat=read)
    assert not is_descendant(500, 200, read_stat=read)  # unrelated
    assert not is_descendant(200, 300, read_stat=read)  # parent is not a child
    assert not is_descendant(200, 200, read_stat=read)  # itself does not count
    assert not is_descendant(999, 200, read_stat=read)  # gone
    assert not is_descendant(1, 200, read_stat=read)
    assert not is_descendant(300, 1, read_stat=read)  # never init


def test_is_descendant_terminates_on_a_cycle():
    read = _fake_stats({10: 11, 11: 10})
    assert not is_descendant(10, 12, read_stat=read)


def test_is_descendant_on_real_processes_and_kill_guard():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert is_descendant(child.pid, os.getpid())
        assert not is_descendant(os.getpid(), child.pid)
        assert not is_descendant(child.pid, other.pid)
        # a cluster whose supervisor is `other` refuses to kill `child`
        c = Cluster.__new__(Cluster)
        c.proc = types.SimpleNamespace(pid=other.pid)
        assert not c.kill(child.pid)
        assert not c.kill(other.pid)  # never the supervisor itself
        assert child.poll() is None
        # ... and kills it when it is its descendant
        c.proc = types.SimpleNamespace(pid=os.getpid())
        assert c.kill(child.pid)
        assert child.wait(5) == -9
    finally:
        for p in (child, other):
            if p.poll() is None:
                p.kill()
            p.wait()


# ---------------------------------------------------------------- HTTP client


def _reader(data: bytes, step: int):
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    it = iter(chunks)
    return lambda: next(it, b"")


def test_read_response_content_length_and_pipelined_leftover():
    data = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\n[1,2]"
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
    recv = _reader(data, 7)
    status, body, rest, close = read_response(recv)
    assert (status, body, close) == (200, b"[1,2]", False)
    status, body, rest, close = read_response(recv, rest)
    assert (status, body, rest) == (404, b"{}", b"")
    # both in one read: the second is left over whole
    status, body, rest, close = read_response(_reader(data, len(data)))
    assert rest == data[data.index(b"HTTP/1.1 404"):]


def test_read_response_chunked_in_tiny_pieces():
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\nNEXT"
    recv = _reader(data, 3)
    status, body, rest, close = read_response(recv)
    assert (status, body, close) == (200, b"abcdefg", False)
    tail = rest
    while chunk := recv():
        tail += chunk
    assert tail == b"NEXT"


def test_read_response_no_body_statuses_and_close():
    status, body, rest, close = read_response(_reader(b"HTTP/1.1 204 No Content\r\n\r\n", 100))
    assert (status, body, close) == (204, b"", False)
    data = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
    status, body, rest, close = read_response(_reader(data, 5))
    assert (status, body, close) == (200, b"until the end", True)


def test_read_response_errors():
    with pytest.raises(ProtocolError):
        read_response(_reader(b"HTTP/1.1 200 OK\r\nContent-Le", 4))
    with pytest.raises(ProtocolError):
        read_response(_reader(b"garbage\r\n\r\n", 100))


def test_build_request():
    raw = build_request("PUT", "/bazar/update_price/3", 5000, body={"price": 9.5}, token="tok")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"PUT /bazar/update_price/3 HTTP/1.1\r\n")
    assert b"Host: 127.0.0.1:5000" in head
    assert b"Authorization: Bearer tok" in head
    assert b"Content-Length: %d" % len(body) in head
    assert body == b'{"price": 9.5}'
    get = build_request("GET", "/health", 1)
    assert get.endswith(b"\r\n\r\n") and b"Content-Length" not in get


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536  # one write per response (no Nagle/delayed-ACK stalls)
    disable_nagle_algorithm = True

    def do_GET(self):  # noqa: N802
        body = b'{"ok": true}'
        self.send_response(200 if self.path != "/fail" else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_load_run_against_a_local_server_is_bounded(local_server):
    port = local_server
    ok = build_request("GET", "/x", port)
    st = run_load(port, lambda w, k: ok, 2, 5.0, max_per_worker=50)
    assert st["n"] == 100 and st["errors"] == 0
    assert st["elapsed_s"] < 5.0
    assert st["client_cpu"] >= 0
    fail = build_request("GET", "/fail", port)
    st = run_load(port, lambda w, k: fail, 1, 5.0, max_per_worker=10)
    assert st["n"] == 0 and st["errors"] == 10 and st["statuses"] == {"503": 10}
    # make() returning None ends a worker; time bound holds
    st = run_load(port, lambda w, k: ok if k < 3 else None, 4, 5.0)
    assert st["n"] == 12


def test_load_run_records_connection_errors():
    port = free_ports(1)[0]  # nothing listens there
    run = LoadRun(port, lambda w, k: b"GET / HTTP/1.1\r\n\r\n", 1, 0.3, max_per_worker=5, timeline=True)
    st = run.start().wait()
    assert st["n"] == 0 and st["errors"] == 5
    assert all(not ok for _t, _lat, ok, _s in run.timeline[0])


def test_loopback_only():
    assert cli.loopback_port("http://127.0.0.1:5000") == 5000
    assert cli.loopback_port("http://localhost:5001/") == 5001
    for bad in ("http://10.0.0.1:5000", "https://127.0.0.1:5000", "http://example.com"):
        with pytest.raises(ValueError):
            cli.loopback_port(bad)


def test_parse_args_defaults():
    a = cli.parse_args([])
    assert (a.port, a.duration, a.start, a.out) == (5000, 2.0, False, "bench-out")
    q = cli.parse_args(["--quick", "--start", "--out", "x"])
    assert q.duration == 0.5 and q.start
    with pytest.raises(SystemExit):
        cli.parse_args(["--url", "http://192.168.1.2:5000"])


# ---------------------------------------------------------------- report


def _st(rps, p50, n=1000, errors=0):
    return {"n": n, "errors": errors, "elapsed_s": 1.0, "rps": rps, "avg_ms": p50 * 1.1, "p50_ms": p50,
            "p95_ms": p50 * 2, "p99_ms": p50 * 3, "max_ms": p50 * 5, "statuses": {}}


def fixed_results():
    return {
        "meta": {"started": "2024-01-01 00:00:00", "mode": "--start", "url": "http://127.0.0.1:5000",
                 "url_nocache": "http://127.0.0.1:6000", "quick": False, "duration": 2.0, "cpus": 2,
                 "platform": "Linux", "python": "3.11", "total_s": 95.0, "notes": ["a note"]},
        "ops": {
            "on": {"info": {"1": _st(5000, 0.15), "16": _st(9500, 1.6)},
                   "search": {"1": _st(4800, 0.16), "16": _st(9100, 1.7)},
                   "purchase": {"1": _st(250, 3.9),
                                "16": _st(280, 55.0, errors=3) | {"client_cpu": 0.35, "frontend_cpu": 0.981}}},
            "off": {"info": {"1": _st(1500, 0.9), "16": _st(2600, 6.0)},
                    "search": {"1": _st(1400, 0.95), "16": _st(2500, 6.2)},
                    "purchase": {"1": _st(250, 4.0), "16": _st(290, 54.0)}},
        },
        "ops_skipped": {},
        "throughput": {"1": _st(5000, 0.15), "4": _st(8000, 0.5), "16": _st(9500, 1.6), "64": _st(9000, 7.0)},
        "invalidation": {"iterations": 50, "errors": 0, "stale_reads": 0, "write": _st(None, 4.2, n=50),
                         "miss_read": _st(None, 0.7, n=50), "hit_read": _st(None, 0.15, n=150),
                         "cache_counter_delta": {"hits": 150, "misses": 50, "evictions": 0}, "hit_repeats": 3},
        "crash": {"kills": [
            {"service": "catalog", "port": 5101, "pid": 42, "replica": 1, "t": 2.0, "failover_s": 1.234,
             "errors_5s": 7, "max_latency_ms_5s": 1500.0, "after": {"pid": 99, "role": "backup", "status": "ok"}},
            {"service": "order", "error": "no primary found via /health"}],
            "samples": [[0.1, 2.0, "purchase", True, 200], [2.1, 1500.0, "purchase", False, 503],
                        [2.2, 0.3, "info", True, 200], [4.0, 3.0, "purchase", True, 200]],
            "total": _st(300, 2.0, n=3, errors=1) | {"statuses": {"503": 1}},
            "ops": {"purchase": 2, "info": 2}, "rate_per_worker": 150.0, "duration_s": 12.0},
        "lru": {"source": "bazar.cache.LRUCache", "keys": 1000, "s": 1.0, "trace_len": 50000, "seed": 42,
                "points": [{"capacity": 10, "hit_rate": 0.2, "ref_hit_rate": 0.2, "top_k_mass": 0.39,
                            "evictions": 100},
                           {"capacity": 100, "hit_rate": 0.57, "ref_hit_rate": 0.57, "top_k_mass": 0.69,
                            "evictions": None}]},
        "rss": {"pid": 4242, "capacity": 10000, "entries_before": 12, "entries": 10000, "fill_requests": 10000,
                "fill_errors": 0, "fill_rps": 2000.0, "rss_before_mb": 40.0, "rss_mb": 61.5},
        "plots": {"latency": "latency.png", "crash": "crash.png"},
    }


def _cpu(st, seconds):
    return st | {"server_cpu_s": seconds, "server_processes": 3}


def side_by_side_results():
    """fixed_results() with the measurements beside other servers, the start-up and the timeline."""
    res = fixed_results()
    res["references"] = {
        "path": "/bazar/info/0", "body_bytes": 128, "reference_bytes": {"twisted": 128, "klein": 128},
        "conns": ["1", "16", "64"],
        "bazar": {"1": _cpu(_st(5000, 0.15), 0.2), "16": _cpu(_st(9500, 1.6), 0.15), "64": _st(9000, 7.0)},
        "twisted": {"1": _st(5500, 0.14), "16": _st(9000, 1.7), "64": _st(9100, 6.9)},
        "klein": {"1": _st(4000, 0.2), "16": _st(6000, 2.5), "64": _st(6100, 10.0)},
    }
    res["compare"] = {"conns": ["1", "16"],
                      "bazar": {"info": {"1": _st(5000, 0.15), "16": _st(9500, 1.6)},
                                "purchase": {"1": _st(250, 4.0), "16": _st(300, 50.0)}},
                      "stores": [{"name": "flask", "spec": "name=flask,info=http://127.0.0.1:8000/info/{id}",
                                  "info": {"1": _st(1000, 0.9), "16": _st(1900, 8.0)},
                                  "purchase": {"1": _st(125, 8.0)}}]}
    res["startup"] = {"cluster": "cache-on", "all_ready_s": 2.5, "poll_s": 0.05, "timeout_s": 60.0,
                      "processes": {"order-1": 2.1, "frontend": 2.3, "catalog-1": 2.5}}
    res["etcd"] = {"members": 3, "etcd_version": "etcd 3.4.23",
                   "bazar_processes": ["catalog-1", "catalog-2", "catalog-3", "frontend"],
                   "bazar": {"write": {"1": _cpu(_st(400, 2.4, n=800), 2.4), "16": _cpu(_st(900, 17.0, n=1800), 2.7)},
                             "purchase": {"1": _st(200, 4.8), "16": _st(590, 27.0)},
                             "read": {"1": _st(7000, 0.13), "16": _st(15000, 1.0)}},
                   "etcd": {"put": {"1": _cpu(_st(1000, 2.0, n=2000), 1.0), "16": _cpu(_st(2000, 8.0, n=4000), 2.0)},
                            "range": {"1": _st(1200, 0.8), "16": _st(2300, 7.0)}}}
    res["timeline"] = {"sent": 3, "writes": 3, "events": 120, "book": 1, "client": _st(None, 2.1, n=3),
                       "steps": {"fe_in": {"label": "front end: request in → forwarded", "median_ms": 0.3, "n": 3},
                                 "total": {"label": "the whole write at the front end", "median_ms": 2.0, "n": 3}},
                       "typical": {"rid": "fe:1", "index": 9, "primary": "catalog-1",
                                   "spans": [["fe_in", "front end: request in → forwarded", "frontend", 0.0, 0.3],
                                             ["b1_fsync", "1st backup: append fsync'd", "catalog-2", 0.9, 1.4],
                                             ["forward", "front end → primary (HTTP)", "network", 0.3, 0.5],
                                             ["total", "the whole write at the front end", "frontend", 0.0, 2.0]]}}
    return res


def test_evaluate_targets_verdicts():
    rows = {r["name"]: r for r in evaluate_targets(fixed_results())}
    assert len(rows) == len(TARGETS)
    assert rows["cached info throughput, 16 conns"]["verdict"] == "PASS"
    assert rows["cached info p50, 1 conn"]["verdict"] == "PASS"
    assert rows["uncached info throughput, 16 conns"]["verdict"] == "PASS"
    assert rows["uncached info p50, 1 conn"]["verdict"] == "FAIL"
    assert rows["purchase p50, 1 conn"]["verdict"] == "PASS"
    assert rows["purchase throughput, 16 conns"]["verdict"] == "FAIL"
    assert rows["front-end RSS with 10,000 cached entries"]["verdict"] == "PASS"


def test_evaluate_targets_not_measured_and_too_few_entries():
    res = fixed_results()
    del res["ops"]["off"]
    res["rss"]["entries"] = 4000
    rows = {r["name"]: r for r in evaluate_targets(res)}
    assert rows["uncached info throughput, 16 conns"]["verdict"] == "n/a"
    assert rows["front-end RSS with 10,000 cached entries"]["verdict"] == "n/a"
    assert "4000" in rows["front-end RSS with 10,000 cached entries"]["why"]
    text = targets_text(evaluate_targets(res))
    assert "n/a (not measured)" in text and "FAIL" in text


def test_render_report_markdown():
    md = render_report(fixed_results())
    assert md.startswith("# Bazar benchmark report")
    for heading in ("## Targets", "## 1. Latency", "## 2. Invalidation", "## 3. Crash", "## 4. LRU",
                    "## 5. Throughput", "## 6. Front-end memory"):
        assert heading in md
    assert "| cached info throughput, 16 conns | ≥ 9000 req/s | 9,500 req/s | **PASS** |" in md
    assert "| uncached info p50, 1 conn | ≤ 0.8 ms | 0.900 ms | **FAIL** |" in md
    assert "| purchase | on | 16 | 1000 | 280 | 60.500 | 55.000 | 110 | 165 | 275 | 3 | 35% | 98% |" in md
    assert "| info | on | 1 | 1000 | 5,000 | 0.165 | 0.150 | 0.300 | 0.450 | 0.750 | 0 | — | — |" in md
    assert ("| catalog primary | catalog-1 | 42 | 2.00 | 1.234 | 7 | 1500 | restarted, new pid 99; backup, ok |"
            in md)
    assert "no primary found via /health" in md
    assert "| 100 | 0.570 | 0.690 | — |" in md
    assert "**61.5 MB with 10000 entries**" in md
    assert "![latency](latency.png)" in md and "![crash](crash.png)" in md
    assert "![lru]" not in md  # no plot listed, none linked
    assert "- note: a note" in md
    # every table row has as many cells as its header
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            cols = lines[i - 1].count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == cols, lines[j]
                j += 1


def test_render_report_with_skipped_sections():
    res = {"meta": {"notes": []}, "ops": {}, "ops_skipped": {"off": "no cache-less cluster"},
           "crash": {"skipped": "only with --start"}, "invalidation": {"skipped": "needs the admin token"},
           "rss": {"skipped": "no pid"}, "lru": {}, "plots": {}}
    md = render_report(res)
    assert "Cache off: skipped — no cache-less cluster." in md
    assert "Skipped — only with --start." in md
    assert "Skipped — needs the admin token." in md
    assert "Not measured." in md
    assert "Not run." in md  # lru
    assert md.count("**n/a") == len(TARGETS)


def test_write_plots(tmp_path):
    from bazar.bench import plots

    made = plots.write_plots(fixed_results(), str(tmp_path))
    assert set(made) == {"latency", "invalidation", "crash", "lru", "throughput"}  # nothing to draw Bazar beside
    made = plots.write_plots(side_by_side_results(), str(tmp_path))
    assert set(made) == {"latency", "invalidation", "crash", "lru", "throughput", "connections", "timeline"}
    for name in made.values():
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG")


# ---------------------------------------------------------------- report wording and regeneration

COMMITTED = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bench"


def _section(md, number):
    """The text of report section `number` (from its heading to the next one)."""
    start = md.index(f"## {number}. ")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_report_lru_in_plain_words_with_cross_check_sentence():
    md = render_report(fixed_results())
    lru = _section(md, 4)
    assert "top-k" not in md and "reference LRU" not in md
    assert "best possible: share of requests to the N most requested books" in lru
    assert "| 10 | 0.200 | 0.390 | 100 |" in lru  # no column repeating the hit rate
    assert "Cross-check" in lru and "exactly the same hit rate" in lru
    assert "1/k as often" in lru


def test_report_lru_shows_the_textbook_column_only_when_it_differs():
    res = fixed_results()
    res["lru"]["points"][0]["ref_hit_rate"] = 0.25
    lru = _section(render_report(res), 4)
    assert "textbook LRU (cross-check)" in lru
    assert "| 10 | 0.200 | 0.250 | 0.390 | 100 |" in lru
    assert "exactly the same hit rate" not in lru
    # a replay that fell back to the textbook LRU itself has nothing to cross-check
    res["lru"]["source"] = "reference OrderedDict LRU (bench.py)"
    lru = _section(render_report(res), 4)
    assert "textbook LRU (cross-check)" not in lru and "Cross-check" not in lru


def test_report_lru_explains_the_gap_when_everything_fits():
    res = fixed_results()
    res["lru"]["points"].append({"capacity": 1000, "hit_rate": 0.98, "ref_hit_rate": 0.98, "top_k_mass": 1.0,
                                 "evictions": 0})
    lru = _section(render_report(res), 4)
    assert "At N = 1000 every book fits" in lru and "(1.000 vs 0.980)" in lru
    assert "every book fits" not in _section(render_report(fixed_results()), 4)


def test_report_throughput_section_shows_only_rows_section_1_lacks():
    md = render_report(fixed_results())
    sweep = _section(md, 5)
    rows = _table_rows(sweep)
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["4", "64"]  # header, then 4 and 64 only
    assert "1, 16 connections are the cached info rows of section 1" in sweep
    assert "from 5,000 to 9,000 req/s" in sweep
    # when section 1 already holds every sweep point, section 5 has no table at all
    res = fixed_results()
    res["ops"]["on"]["info"].update(res["throughput"])
    sweep = _section(render_report(res), 5)
    assert _table_rows(sweep) == []
    assert "1, 4, 16, 64 connections are the cached info rows of section 1" in sweep


def _crash_with_info(inside_ms, outside_ms):
    res = fixed_results()
    res["crash"]["samples"] = (
        [[0.5 + i * 0.01, outside_ms, "info", True, 200] for i in range(20)]
        + [[2.1 + i * 0.01, inside_ms, "info", True, 200] for i in range(20)]
        + [[2.0, 1234.0, "purchase", True, 200], [4.0, 8.0, "purchase", True, 200]])
    return res


def test_report_crash_names_replicas_and_explains_faster_info_reads():
    res = _crash_with_info(inside_ms=0.1, outside_ms=1.5)
    assert info_latency_split(res["crash"]) == (pytest.approx(0.1), pytest.approx(1.5))
    crash = _section(render_report(res), 3)
    assert "port 5101" not in crash and "catalog-1" in crash
    assert "process monitor restarts a process that dies" in crash
    assert "*faster*" in crash and "drops its cached info entry" in crash
    assert "0.100 ms inside the shaded spans, 1.500 ms outside them" in crash
    assert "(2 × 150 = 300 req/s)" in crash
    # the explanation is only given when the data show it
    crash = _section(render_report(_crash_with_info(inside_ms=2.0, outside_ms=1.5)), 3)
    assert "*faster*" not in crash and "2.000 ms inside the shaded spans" in crash


def test_report_crash_falls_back_to_the_port_without_a_replica_id():
    res = fixed_results()
    del res["crash"]["kills"][0]["replica"]
    assert "| catalog primary | port 5101 |" in render_report(res)


def test_report_explains_the_random_ports_of_started_clusters():
    md = render_report(fixed_results())
    assert "free loopback ports picked for this run" in md.splitlines()[3]
    res = fixed_results()
    res["meta"]["mode"] = "existing cluster"
    assert "free loopback ports" not in render_report(res)


def test_throughput_figure_axes_start_at_zero():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bazar.bench import plots

    fig = plots.fig_throughput(fixed_results())  # req/s 5000..9500: autoscale alone would start near 4800
    try:
        assert len(fig.axes) == 2
        for ax in fig.axes:
            assert ax.get_ylim()[0] == 0
        assert fig.axes[0].get_ylim()[1] >= 9500
    finally:
        plt.close(fig)
    assert plots.fig_throughput({"throughput": {}}) is None


def test_crash_figure_shades_failovers_and_says_why_info_is_fast():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bazar.bench import plots

    for inside, outside, want in ((0.1, 1.5, "purchases wait;\ninfo served\nfrom the cache"),
                                  (2.0, 1.5, "purchases wait")):
        fig = plots.fig_crash(_crash_with_info(inside, outside))
        try:
            texts = [t.get_text() for t in fig.axes[0].texts]
            assert want in texts
            if inside > outside:
                assert not any("cache" in t for t in texts)
            labels = fig.axes[0].get_legend_handles_labels()[1]
            assert "failover: purchases wait" in labels
        finally:
            plt.close(fig)


def test_report_only_rewrites_the_report_without_measuring(tmp_path, monkeypatch):
    def no_measuring(*a, **kw):
        raise AssertionError("--report-only must not measure")

    monkeypatch.setattr(cli, "run", no_measuring)
    src = tmp_path / "run"
    src.mkdir()
    res = fixed_results()
    raw = json.dumps(res, indent=1)
    (src / "results.json").write_text(raw)
    out = tmp_path / "out"
    assert cli.main(["--report-only", str(src / "results.json"), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert md == render_report(res | {"plots": {}})
    assert "| cached info throughput, 16 conns | ≥ 9000 req/s | 9,500 req/s | **PASS** |" in md
    assert (out / "results.json").read_text() == raw  # copied, numbers untouched
    assert (src / "results.json").read_text() == raw
    assert not list(out.glob("*.png"))
    # without --out: next to the results file, which stays as it was
    assert cli.main(["--report-only", str(src / "results.json"), "--no-plots"]) == 0
    assert (src / "report.md").read_text() == md
    assert (src / "results.json").read_text() == raw


def test_report_only_with_plots(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "results.json").write_text(json.dumps(fixed_results()))
    assert cli.main(["--report-only", str(tmp_path / "results.json")]) == 0
    md = (tmp_path / "report.md").read_text()
    for name in ("latency", "invalidation", "crash", "lru", "throughput"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert f"![{name}]({name}.png)" in md


def test_report_only_errors(tmp_path):
    assert cli.main(["--report-only", str(tmp_path / "missing.json"), "--no-plots"]) == 1
    (tmp_path / "list.json").write_text("[]")
    assert cli.main(["--report-only", str(tmp_path / "list.json"), "--no-plots"]) == 1
    with pytest.raises(SystemExit):
        cli.parse_args(["--report-only", "x.json", "--start"])


@pytest.mark.skipif(not (COMMITTED / "results.json").exists(), reason="no committed benchmark results")
def test_committed_report_is_what_the_generator_makes_of_the_committed_results():
    res = json.loads((COMMITTED / "results.json").read_text())
    md = render_report(res)
    assert (COMMITTED / "report.md").read_text() == md, "regenerate: bazar-bench --report-only docs/bench/results.json"
    for jargon in ("top-k", "reference LRU", "ideal static"):
        assert jargon not in md
    rows = [r for r in _table_rows(md) if not r.startswith("| target |")]
    body = [r for r in rows if not any(r.startswith(h) for h in ("| op |", "| step |", "| killed |", "| cache size"))]
    assert len(body) == len(set(body)), "a table row appears twice"
    assert "| 1 | 13999 |" not in _section(md, 5)


# ---------------------------------------------------------------- beside other servers: report


def test_side_by_side_targets_are_ratios_with_verdicts():
    rows = {r["name"]: r for r in evaluate_targets(side_by_side_results())}
    tw = rows["cached info ÷ raw twisted.web: throughput, 16 conns"]
    assert tw["measured"] == pytest.approx(9500 / 9000) and tw["verdict"] == "PASS" and tw["target"] == "≥ 1×"
    p50 = rows["cached info ÷ raw twisted.web: p50, 1 conn"]
    assert p50["measured"] == pytest.approx(0.15 / 0.14) and p50["verdict"] == "FAIL"
    assert rows["start-up: bazar-cluster to every /ready 200"]["verdict"] == "PASS"
    write = rows["replicated write ÷ etcd put: p50, 1 conn"]
    assert write["measured"] == pytest.approx(1.2) and write["verdict"] == "PASS"
    assert rows["replicated write ÷ etcd put: throughput, 16 conns"]["measured"] == pytest.approx(0.45)
    assert rows["replicated write ÷ etcd put: throughput, 16 conns"]["verdict"] == "FAIL"
    cpu = rows["replicated write ÷ etcd put: server CPU per write"]
    assert cpu["measured"] == pytest.approx((2.7 / 1800) / (2.0 / 4000)) and cpu["verdict"] == "FAIL"
    assert rows["purchase p50 ÷ etcd put p50, 1 conn"]["measured"] == pytest.approx(2.4)
    assert "0.45×" in targets_text(list(rows.values()))


def test_without_etcd_the_report_says_not_measured():
    res = side_by_side_results()
    res["etcd"]["etcd"] = {"skipped": "not measured (no etcd on PATH)"}
    rows = {r["name"]: r for r in evaluate_targets(res)}
    for name in ("replicated write ÷ etcd put: p50, 1 conn", "purchase p50 ÷ etcd put p50, 1 conn"):
        assert (rows[name]["verdict"], rows[name]["why"]) == ("n/a", "not measured (no etcd on PATH)")
    md = render_report(res)
    assert "etcd: not measured (no etcd on PATH); Bazar's side was measured all the same." in md
    assert "| write p50, 1 conn (ms): update_price vs put | 2.400 | — | — |" in md
    assert md.count("**n/a (not measured (no etcd on PATH))**") == 4


def test_render_report_sections_beside_other_servers():
    md = render_report(side_by_side_results())
    refs = _section(md, 7)
    assert "128 bytes; theirs: twisted 128, klein 128" in refs
    assert "| raw twisted.web | 16 | 9,000 | 1.700 | 5.100 | 0 | — | 1.06× | 0.94× |" in refs
    assert "| Bazar (cached info) | 1 | 5,000 | 0.150 | 0.450 | 0 | 200 |  |  |" in refs
    assert "**PASS**" in refs and "**FAIL**" in refs
    cmp = _section(md, 8)
    assert "| flask | info | 16 | 1,900 | 8.000 | 0 | 9,500 | 1.600 | 5.00× | 0.20× |" in cmp
    assert "| flask | purchase | 1 | 125 | 8.000 | 0 | 250 | 4.000 | 2.00× | 0.50× |" in cmp
    assert "`--compare 'name=flask,info=http://127.0.0.1:8000/info/{id}'`" in cmp
    assert "| catalog-1 | 2.50 |" in _section(md, 9) and "2.50 s, wanted ≤ 3 s: **PASS**" in _section(md, 9)
    etcd = _section(md, 10)
    assert "(etcd 3.4.23)" in etcd
    assert "| server CPU per write, 16 conns (ms) | 1.500 | 0.500 | 3.00× |" in etcd
    assert "| etcd | put | 16 | 4000 | 2,000 |" in etcd
    tl = _section(md, 11)
    assert "| the whole write at the front end | 2.000 | 3 |" in tl and "entry 9 at primary catalog-1" in tl
    # with nothing of these measured, each section says so
    md = render_report(fixed_results())
    assert "Not measured: no store named with `--compare`." in _section(md, 8)
    for number in (7, 9, 10, 11):
        assert "Not measured." in _section(md, number)


def test_connections_and_timeline_figures():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bazar.bench import plots

    fig = plots.fig_connections(side_by_side_results())
    try:
        labels = [fig.axes[0].get_legend_handles_labels()[1], fig.axes[2].get_legend_handles_labels()[1]]
        assert labels[0] == ["Bazar", "raw twisted.web", "bare Klein", "flask info"]
        assert labels[1] == ["Bazar purchase", "Bazar update_price", "etcd put", "flask purchase"]
        assert all(ax.get_ylim()[0] == 0 for ax in fig.axes)
    finally:
        plt.close(fig)
    fig = plots.fig_timeline(side_by_side_results())
    try:
        assert len(fig.axes[0].patches) == 4
    finally:
        plt.close(fig)
    assert plots.fig_timeline(fixed_results()) is None
    fig = plots.fig_throughput(side_by_side_results())
    try:
        assert "raw twisted.web req/s" in fig.axes[0].get_legend_handles_labels()[1] or \
            "raw twisted.web req/s" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- --compare


def test_parse_store_syntax():
    store = compare.parse_store("name=flask,info=http://127.0.0.1:8000/info/{id},"
                                "purchase=POST http://localhost:8000/buy/{id}?x=1,id=3")
    assert store.name == "flask"
    assert (store.info.method, store.info.port, store.info.path) == ("GET", 8000, "/info/3")
    assert (store.purchase.method, store.purchase.path) == ("POST", "/buy/3?x=1")
    assert store.body is None
    store = compare.parse_store('name=x,info=PUT http://127.0.0.1:9/i,body={"quantity": 1, "a": [1,2]}')
    assert store.purchase is None and store.body == {"quantity": 1, "a": [1, 2]}
    assert store.info.method == "PUT"
    for bad in ("info=http://127.0.0.1:1/x", "name=a", "name=a,info=http://10.0.0.1:1/x",
                "name=a,info=https://127.0.0.1:1/x", "name=a,info=http://127.0.0.1:1/x,id=one",
                "name=a,info=http://127.0.0.1:1/x,body={nope", "colour=red,name=a,info=http://127.0.0.1:1/x",
                "name=a,name=b,info=http://127.0.0.1:1/x", "name=a,info=get http://127.0.0.1:1/x"):
        with pytest.raises(ValueError):
            compare.parse_store(bad)
    with pytest.raises(SystemExit):
        cli.parse_args(["--compare", "name=a"])
    assert cli.parse_args(["--compare", "name=a,info=http://127.0.0.1:1/x"]).compare[0].name == "a"


class _Store(http.server.BaseHTTPRequestHandler):
    """A tiny store: GET /info/<id>, POST /buy/<id> (HTTP/1.1, keep-alive); and, when it
    plays Bazar, the few doors bazar-bench asks of a front end."""

    protocol_version = "HTTP/1.1"
    wbufsize = 65536
    disable_nagle_algorithm = True

    def answer(self, status, data):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path == "/health":
            self.answer(200, {"service": "frontend", "pid": 1, "status": "ok", "catalog": [], "order": []})
        elif self.path.startswith(("/info/", "/bazar/info/")):
            self.answer(200, {"id": int(self.path.rsplit("/", 1)[1]), "title": "t", "price": 1.0})
        else:
            self.answer(404, {"error": "no"})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/bazar/books":
            self.answer(201, {"id": 7})
        elif self.path.startswith(("/buy/", "/bazar/purchase/")):
            self.answer(200, {"ok": True})
        else:
            self.answer(404, {"error": "no"})

    def log_message(self, *args):
        pass


@pytest.fixture
def stores():
    """Two stdlib stores: one plays Bazar's front end, the other is the store compared."""
    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 256  # 64 connections at once (the default backlog, 5, refuses some)

    servers = [Server(("127.0.0.1", 0), _Store) for _ in range(2)]
    for srv in servers:
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield [srv.server_address[1] for srv in servers]
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_compare_runs_the_same_workloads_against_another_store(stores, tmp_path, monkeypatch):
    bazar, other = stores
    monkeypatch.setenv("BAZAR_ADMIN_TOKEN", "t")
    spec = f"name=peer,info=http://127.0.0.1:{other}/info/{{id}},purchase=POST http://127.0.0.1:{other}/buy/{{id}}"
    out = tmp_path / "out"
    assert cli.main(["--url", f"http://127.0.0.1:{bazar}", "--only", "compare", "--compare", spec,
                     "--duration", "0.1", "--out", str(out), "--no-plots"]) == 0
    res = json.loads((out / "results.json").read_text())
    row = res["compare"]["stores"][0]
    assert row["name"] == "peer" and row["spec"] == spec
    for op in ("info", "purchase"):
        assert set(row[op]) == set(res["compare"]["bazar"][op]) == {"1", "16", "64"}
        assert all(st["n"] > 0 and st["errors"] == 0 for st in row[op].values())
    md = (out / "report.md").read_text()
    assert "| peer | purchase | 16 |" in _section(md, 8)


# ---------------------------------------------------------------- the reference servers, etcd, start-up


def test_reference_servers_answer_a_book_sized_json_body(tmp_path):
    from bazar.bench.references import book_body

    assert len(book_body(128)) == 128 and json.loads(book_body(300))["topic"] == "distributed systems"
    assert len(book_body(10)) > 10  # never less than a book with an empty title
    servers = compare.ReferenceServers(str(tmp_path), 150).start()
    try:
        for kind in ("twisted", "klein"):
            port = servers.ports[kind]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/bazar/info/0")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and len(body) == 150
            assert resp.getheader("Content-Type") == "application/json"
            assert resp.getheader("Content-Length") == "150"
            conn.close()
            assert is_descendant(servers.pid(kind), os.getpid())
        pids = [servers.pid(kind) for kind in ("twisted", "klein")]
    finally:
        servers.stop()
    assert all(not os.path.exists(f"/proc/{pid}") or proc_stat_state(pid) == "Z" for pid in pids)


def proc_stat_state(pid):
    try:
        return parse_proc_stat(read_proc_stat(pid))["state"]
    except OSError:
        return None


@pytest.mark.skipif(shutil.which("etcd") is None, reason="no etcd on PATH")
def test_etcd_cluster_takes_puts_and_ranges(tmp_path):
    from bazar.bench import etcd

    cluster = etcd.EtcdCluster(shutil.which("etcd"), str(tmp_path), "test-token").start()
    try:
        leader = cluster.leader_port()
        conn = LeanConn(leader)
        status, _ = conn.roundtrip(etcd.put_request(leader, "k", "value"))
        assert status == 200
        status, body = conn.roundtrip(etcd.range_request(leader, "k"))
        assert status == 200 and json.loads(body)["kvs"][0]["value"] == etcd.b64("value")
        conn.close()
        assert len(cluster.pids) == 3
    finally:
        cluster.stop()
    assert not any(proc_stat_state(pid) not in (None, "Z") for pid in cluster.pids)


def test_without_etcd_bazars_side_is_measured_alone(stores, tmp_path, monkeypatch):
    from bazar.bench import etcd

    monkeypatch.setattr(etcd.shutil, "which", lambda name: None)
    bazar, _ = stores
    ctx = phases.Ctx(cli.parse_args(["--duration", "0.1"]))
    res = etcd.phase_etcd(ctx, bazar, "t", 7, {}, str(tmp_path))
    assert res["etcd"] == {"skipped": "not measured (no etcd on PATH)"}
    assert set(res["bazar"]) == {"write", "purchase", "read"}
    assert set(res["bazar"]["write"]) == {"1", "16", "64"}


class _Starting(http.server.BaseHTTPRequestHandler):
    """/ready: 503 until the server's `ready_at` (monotonic), then 200."""

    def do_GET(self):  # noqa: N802
        ready = time.monotonic() >= self.server.ready_at
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_startup_is_timed_until_every_process_is_ready():
    servers = []
    for _ in range(2):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Starting)
        srv.daemon_threads = True
        srv.ready_at = float("inf")
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)

    def start(wait):  # the processes get ready 0.2 and 0.4 s after their start
        for srv, delay in zip(servers, (0.2, 0.4)):
            srv.ready_at = time.monotonic() + delay

    urls = [f"http://127.0.0.1:{srv.server_address[1]}" for srv in servers]
    cluster = types.SimpleNamespace(name="fake", catalogs=[urls[0]], orders=[], fronts=[urls[1]], proc=None,
                                    start=start)
    try:
        ctx = phases.Ctx(cli.parse_args([]))
        res = phases.measure_startup(ctx, cluster, timeout=10.0, poll=0.02)
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
    assert list(res["processes"]) == ["catalog-1", "frontend"]
    assert 0.2 <= res["processes"]["catalog-1"] < res["processes"]["frontend"] == res["all_ready_s"] < 2.0


def test_load_run_charges_the_cpu_of_the_server_processes(local_server):
    st = run_load(local_server, lambda w, k: build_request("GET", "/x", local_server), 1, 5.0, max_per_worker=200,
                  server_pids=[os.getpid()])
    assert st["server_cpu_s"] > 0 and st["server_processes"] == 1
    assert "µs/req" in fmt_stats(st)


# ---------------------------------------------------------------- the timeline of one write


def _write_trace(t0, index, rid="fe:1", primary="catalog-1", backups=("catalog-2", "catalog-3")):
    """The events of one update_price, handmade: times in µs after t0."""
    def ev(us, process, event, **fields):
        return {"ns": t0 + us * 1000, "process": process, "pid": hash(process) % 1000, "event": event, "rid": None,
                **fields}

    write = "/internal/write"
    events = [
        ev(0, "frontend", "http.request", method="PUT", path="/bazar/update_price/1"),
        ev(300, "frontend", "call.send", method="POST", url="http://127.0.0.1:1/internal/write"),
        ev(700, primary, "http.request", method="POST", path=write),
        ev(1000, primary, "propose", index=index) | {"rid": rid},
        ev(1100, primary, "send", to=2, kind="append", prev=index - 1, n=1),
        ev(1150, primary, "send", to=3, kind="append", prev=index - 1, n=1),
        ev(1200, primary, "send", to=2, kind="heartbeat", prev=0, n=0),  # noise
        ev(1500, backups[0], "receive", frm=1, kind="append", prev=index - 1),
        ev(1700, backups[1], "receive", frm=1, kind="append", prev=index - 1),
        ev(2500, primary, "flushed", upto=index),
        ev(3000, backups[0], "durable", frm=1, kind="append", prev=index - 1, n=1),
        ev(3400, primary, "reply", frm=2, kind="append", status=200),
        ev(3500, primary, "commit", upto=index),
        ev(3600, primary, "applied", index=index),
        ev(3700, primary, "http.answer", path=write, status=200),
        ev(3900, backups[1], "durable", frm=1, kind="append", prev=index - 1, n=1),
        ev(4000, "frontend", "call.answer", url="http://127.0.0.1:1/internal/write", status=200),
        ev(4100, primary, "reply", frm=3, kind="append", status=200),
        ev(4200, "frontend", "http.answer", path="/bazar/update_price/1", status=200),
        ev(4300, primary, "send", to=2, kind="append", prev=index, n=0),  # the commit index, after the answer
    ]
    return events


def test_timeline_assembles_a_write_from_a_handmade_trace(tmp_path):
    t0 = 1_700_000_000_000_000_000
    events = _write_trace(t0, 5) + _write_trace(t0 + 10_000_000, 6, rid="fe:2") + [
        {"ns": t0 + 5_000_000, "process": "catalog-1", "pid": 1, "event": "http.request", "path": "/health"}]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in reversed(events)) + '{"ns": 1, "ev')  # a cut last line
    read = timeline.read_events(str(path))
    assert len(read) == len(events) and [e["ns"] for e in read] == sorted(e["ns"] for e in events)
    writes = timeline.assemble(read)
    assert [(w["rid"], w["index"], w["primary"]) for w in writes] == [("fe:1", 5, "catalog-1"),
                                                                      ("fe:2", 6, "catalog-1")]
    spans = {key: (process, (end - start) / 1000) for key, process, start, end in writes[0]["spans"]}
    assert spans == {
        "fe_in": ("frontend", 300), "forward": ("network", 400), "primary_in": ("catalog-1", 300),
        "primary_fsync": ("catalog-1", 1500),
        "b1_out": ("network", 400), "b1_fsync": ("catalog-2", 1500), "b1_back": ("network", 400),
        "b2_out": ("network", 550), "b2_fsync": ("catalog-3", 2200), "b2_back": ("network", 200),
        "quorum": ("catalog-1", 2500), "apply": ("catalog-1", 100), "answer": ("catalog-1", 100),
        "back": ("network", 300), "fe_out": ("frontend", 200), "total": ("frontend", 4200)}
    assert [s[0] for s in writes[0]["spans"]] == [key for key, _ in timeline.STEPS]
    summary = timeline.summarize_writes(writes)
    assert summary["writes"] == 2 and summary["steps"]["total"]["median_ms"] == pytest.approx(4.2)
    assert summary["steps"]["b2_fsync"]["label"] == "2nd backup: append fsync'd"
    typical = summary["typical"]
    assert typical["spans"][0] == ["fe_in", "front end: request in → forwarded", "frontend", 0.0, 0.3]
    assert typical["spans"][-1][3:] == [0.0, pytest.approx(4.2)]


def test_timeline_ranks_backups_by_their_reply_and_skips_unfinished_writes():
    t0 = 1_000_000_000
    events = _write_trace(t0, 8)
    for e in events:  # the second backup answers first now
        if e["event"] == "reply":
            e["ns"] = t0 + (3450_000 if e["frm"] == 3 else 4150_000)
        if e["event"] == "durable" and e["process"] == "catalog-3":
            e["ns"] = t0 + 3300_000
    spans = {s[0]: s[1] for s in timeline.assemble(events)[0]["spans"]}
    assert spans["b1_fsync"] == "catalog-3" and spans["b2_fsync"] == "catalog-2"
    # a write that never reached a primary (no propose) is no write of the timeline
    assert timeline.assemble([e for e in events if e["event"] != "propose"]) == []
    assert timeline.summarize_writes([]) == {"writes": 0, "steps": {}, "typical": None}


# ---------------------------------------------------------------- cores: front ends sharing one port

def _cores_results(load=0.1):
    def step(rps, n, client, front_s, answered):
        return _st(rps, 1.0, n=n) | {"client_cpu": client, "server_cpu_s": front_s, "server_processes": 2,
                                      "answered": answered}
    return {"processes": 2, "conns": ["16", "64"], "cpus": 2, "book": 0, "loadavg_before": [load, 0, 0],
            "loadavg_after": [load, 0, 0], "ports": {"shared": 5000, "own": [5050, 5051]},
            "steps": {"1": {"16": step(10000, 10000, 0.5, 0.6, [10000, 0]),
                            "64": step(9500, 9500, 0.5, 0.6, [9500, 0])},
                      "2": {"16": step(13000, 13000, 0.7, 1.1, [7000, 6000]),
                            "64": step(14250, 14250, 0.8, 1.15, [7200, 7050])}}}


def test_cores_is_a_phase_of_its_own():
    assert "cores" in phases.PHASES and "cores" not in phases.ON_CLUSTER
    assert cli.parse_args(["--only", "cores"]).phases == ["cores"]


def test_report_cores_gives_the_gain_per_process_and_where_it_stops():
    md = render_report({"meta": {"notes": []}, "ops": {}, "ops_skipped": {}, "plots": {},
                        "cores": _cores_results()})
    text = _section(md, 12)
    rows = _table_rows(text)
    assert rows[1].split(" | ")[:3] == ["| 1", "16", "10,000"]
    assert rows[2].split(" | ")[:3] == ["| 2", "16", "13,000"] and rows[2].endswith("| 7000 / 6000 |")
    assert "at 16 connections, N = 2 served 1.30× the reads of N = 1 (+30% per added process)" in text
    assert "at 64 connections, N = 2 served 1.50×" in text
    # the busiest step (64 connections, N = 2): 0.8 + 1.15 of 2 cores: full
    assert "used 1.95 of the machine's 2 cores" in text and "The machine is full" in text
    assert "spends 60 µs of CPU on a cached read" in text and "about 16,667 reads/s" in text
    assert "the client spends 50 µs on each" in text


def test_report_cores_on_a_busy_machine_says_smoke_and_missing_says_not_measured():
    busy = _cores_results(load=4.0)
    busy["steps"]["2"]["64"]["server_cpu_s"] = 0.5
    text = _section(render_report({"meta": {"notes": []}, "ops": {}, "plots": {}, "cores": busy}), 12)
    assert "a load average of 4.00 says other work ran on this machine" in text
    md = render_report({"meta": {"notes": []}, "ops": {}, "plots": {}})
    assert _section(md, 12).splitlines()[2] == "Not measured."
    skipped = render_report({"meta": {"notes": []}, "ops": {}, "plots": {}, "cores": {"skipped": "interrupted"}})
    assert "Skipped — interrupted." in _section(skipped, 12)
