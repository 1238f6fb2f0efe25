"""bazar-bench: drive a Bazar cluster with bounded, concurrent load and write a report.

Usage::

    python -m bazar.bench [--url http://127.0.0.1:5000] [--url-nocache URL]
                          [--start] [--out DIR] [--duration S] [--quick]
    python -m bazar.bench --report-only docs/bench/results.json [--out DIR]

With ``--start`` the tool starts two throw-away clusters on free loopback ports
(one with a large cache, one with ``--cache-size 0``), runs every experiment and
always stops them again.  Without it, it drives the cluster at ``--url``
(and, if given, the cache-less cluster at ``--url-nocache``); the crash
experiment is then skipped, since it may only kill processes this tool started.

Output (in ``--out``, default ``./bench-out``): ``report.md``, ``results.json``
and PNG plots.  ``--report-only RESULTS_JSON`` measures nothing: it rewrites
``report.md`` and the plots from a results file of an earlier run (into the
file's own directory unless ``--out`` says otherwise).  Progress goes to stderr, the final table of targets to stdout.
A benchmark reports; it never asserts: the exit status is 0 whenever the run
completed, whatever the numbers.

Load generation: a small pool of threads, each with one keep-alive HTTP/1.1
connection to 127.0.0.1 (a lean socket client, so the client costs little CPU
next to the server on a small machine).  Every loop is bounded both by a count
and by time.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import http.client
import itertools
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any
from urllib.parse import quote, urlsplit

LOOPBACK = "127.0.0.1"
OPS = ("info", "search", "purchase")
PHASES = ("ops", "invalidation", "lru", "rss", "crash")
OP_CONNS = ("1", "16")
SWEEP_CONNS = ("1", "4", "16", "64")
RSS_ENTRIES = 10_000
SEARCH_TOPIC = "distributed systems"
CRASH_TIMEOUT = 5.0  # client timeout during the crash experiment (s)
INFO_BOOK = 0

_T_START = time.monotonic()


def log(msg: str) -> None:
    """Progress line on stderr, prefixed with the time since start."""
    sys.stderr.write(f"[{time.monotonic() - _T_START:6.1f}s] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Pure helpers: statistics, zipf, LRU replay, /proc parsing
# ---------------------------------------------------------------------------


def percentile(sorted_values, p: float):
    """p-th percentile (0..100) of an ascending sequence, linear interpolation
    between closest ranks (numpy's default).  None for an empty sequence."""
    n = len(sorted_values)
    if n == 0:
        return None
    if not 0 <= p <= 100:
        raise ValueError("percentile must be within 0..100")
    if n == 1:
        return float(sorted_values[0])
    rank = (p / 100.0) * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(sorted_values[lo]) + (float(sorted_values[hi]) - float(sorted_values[lo])) * frac


def summarize(latencies_s, errors: int = 0, elapsed: float = 0.0, statuses=None) -> dict:
    """Stats of one measurement: latencies in seconds (successes only) -> ms."""
    xs = sorted(latencies_s)
    n = len(xs)

    def ms(v):
        return None if v is None else v * 1000.0

    return {
        "n": n,
        "errors": int(errors),
        "elapsed_s": elapsed,
        "rps": (n / elapsed) if elapsed > 0 else None,
        "avg_ms": ms(sum(xs) / n) if n else None,
        "p50_ms": ms(percentile(xs, 50)),
        "p95_ms": ms(percentile(xs, 95)),
        "p99_ms": ms(percentile(xs, 99)),
        "max_ms": ms(xs[-1]) if n else None,
        "statuses": dict(statuses or {}),
    }


def zipf_weights(n_keys: int, s: float = 1.0):
    return [1.0 / (k**s) for k in range(1, n_keys + 1)]


def zipf_trace(n_keys: int, length: int, s: float = 1.0, seed: int = 0):
    """A reproducible trace of `length` keys in [0, n_keys); key k has weight
    1/(k+1)**s (key 0 is the most popular)."""
    if n_keys < 1:
        raise ValueError("n_keys must be >= 1")
    if length < 0:
        raise ValueError("length must be >= 0")
    rng = random.Random(seed)
    cum = list(itertools.accumulate(zipf_weights(n_keys, s)))
    return rng.choices(range(n_keys), cum_weights=cum, k=length)


def zipf_topk_mass(n_keys: int, k: int, s: float = 1.0) -> float:
    """Probability mass of the k most popular keys: the hit rate of an ideal
    cache of size k that holds exactly the top k (an upper reference line)."""
    w = zipf_weights(n_keys, s)
    return sum(w[: max(0, min(k, n_keys))]) / sum(w)


class RefLRU:
    """Minimal OrderedDict LRU with the interface expected of bazar.cache.LRUCache."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._d: collections.OrderedDict[Any, tuple[Any, Any]] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key):
        try:
            value, _version = self._d[key]
        except KeyError:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key, value, version):
        if self.capacity <= 0:
            return
        if key in self._d:
            self._d.move_to_end(key)
        self._d[key] = (value, version)
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
            self.evictions += 1


def make_cache(factory, capacity: int):
    try:
        return factory(capacity)
    except TypeError:
        return factory(capacity=capacity)


def replay_lru(trace, cache) -> dict:
    """Replay a key trace through a cache (get; on a miss put).  A miss is a
    get() that returned None or that raised the cache's own miss counter."""
    counted = hasattr(cache, "misses") and hasattr(cache, "hits")
    hits = misses = 0
    for i, key in enumerate(trace):
        m0 = cache.misses if counted else 0
        try:
            value = cache.get(key)
        except KeyError:
            value = None
        missed = value is None or (counted and cache.misses != m0)
        if missed:
            misses += 1
            cache.put(key, {"id": key}, i + 1)
        else:
            hits += 1
    total = hits + misses
    return {
        "hits": hits,
        "misses": misses,
        "evictions": getattr(cache, "evictions", None),
        "hit_rate": hits / total if total else 0.0,
    }


def parse_proc_stat(text: str) -> dict:
    """Parse /proc/<pid>/stat (the command name may hold spaces and parens)."""
    lp = text.index("(")
    rp = text.rindex(")")
    fields = text[rp + 2 :].split()
    return {
        "pid": int(text[:lp].strip()),
        "comm": text[lp + 1 : rp],
        "state": fields[0],
        "ppid": int(fields[1]),
        "pgid": int(fields[2]),
        "utime": int(fields[11]),
        "stime": int(fields[12]),
        "starttime": int(fields[19]),
    }


def read_proc_stat(pid: int) -> str:
    with open(f"/proc/{int(pid)}/stat") as f:
        return f.read()


def is_descendant(pid: int, ancestor: int, read_stat=read_proc_stat, max_depth: int = 64) -> bool:
    """True if `ancestor` is found walking the parent chain up from `pid`
    (the process itself does not count)."""
    if pid is None or ancestor is None or pid <= 1 or ancestor <= 1 or pid == ancestor:
        return False
    cur = pid
    for _ in range(max_depth):
        try:
            ppid = parse_proc_stat(read_stat(cur))["ppid"]
        except (OSError, ValueError, IndexError):
            return False
        if ppid == ancestor:
            return True
        if ppid <= 1:
            return False
        cur = ppid
    return False


def proc_cpu_seconds(pid):
    """User + system CPU seconds used so far by a process, or None."""
    if not pid:
        return None
    try:
        st = parse_proc_stat(read_proc_stat(pid))
        return (st["utime"] + st["stime"]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def self_cpu_seconds():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def read_rss_kb(pid: int):
    try:
        with open(f"/proc/{int(pid)}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# ---------------------------------------------------------------------------
# HTTP: a lean keep-alive client for load, http.client for control calls
# ---------------------------------------------------------------------------


class ProtocolError(Exception):
    pass


def build_request(method: str, path: str, port: int, body=None, token=None, extra=None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}", "Accept: application/json"]
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        lines.append("Content-Type: application/json")
    if body is not None or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(data)}")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def read_response(recv, buf: bytes = b""):
    """Read one HTTP/1.1 response using recv() -> bytes.
    Returns (status, body, leftover_bytes, close)."""

    def more():
        chunk = recv()
        if not chunk:
            raise ProtocolError("connection closed by server")
        return chunk

    while True:
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            break
        if len(buf) > 1 << 20:
            raise ProtocolError("response head too long")
        buf += more()
    head, buf = buf[:i], buf[i + 4 :]
    lines = head.split(b"\r\n")
    try:
        version, status_s = lines[0].split(b" ", 2)[:2]
        status = int(status_s)
    except ValueError:
        raise ProtocolError(f"bad status line {lines[0][:80]!r}") from None
    length = None
    chunked = False
    close = version == b"HTTP/1.0"
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v.strip())
        elif k == b"transfer-encoding":
            chunked = b"chunked" in v.lower()
        elif k == b"connection":
            vl = v.strip().lower()
            if vl == b"close":
                close = True
            elif vl == b"keep-alive":
                close = False
    if 100 <= status < 200 or status in (204, 304):
        return status, b"", buf, close
    if chunked:
        parts: list[bytes] = []
        while True:
            while b"\r\n" not in buf:
                buf += more()
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # trailers end with an empty line
                while True:
                    while b"\r\n" not in buf:
                        buf += more()
                    tline, buf = buf.split(b"\r\n", 1)
                    if not tline:
                        break
                return status, b"".join(parts), buf, close
            while len(buf) < size + 2:
                buf += more()
            parts.append(buf[:size])
            buf = buf[size + 2 :]
    if length is not None:
        while len(buf) < length:
            buf += more()
        return status, buf[:length], buf[length:], close
    # no length: body runs until the server closes
    rest = [buf]
    while True:
        chunk = recv()
        if not chunk:
            break
        rest.append(chunk)
    return status, b"".join(rest), b"", True


class LeanConn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self):
        self.close()
        s = socket.create_connection((LOOPBACK, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.buf = b""

    def close(self):
        s, self.sock = self.sock, None
        self.buf = b""
        if s is not None:
            try:
                s.close()
            except OSError:
                pass

    def abort(self):
        """Unblock a thread stuck in recv (called from another thread)."""
        s = self.sock
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def roundtrip(self, raw: bytes):
        if self.sock is None:
            self.connect()
        sock = self.sock
        assert sock is not None
        try:
            sock.sendall(raw)
            status, body, self.buf, close = read_response(lambda: sock.recv(65536), self.buf)
        except Exception:
            self.close()
            raise
        if close:
            self.close()
        return status, body


def http_json(port: int, method: str, path: str, body=None, token=None, timeout: float = 5.0):
    """One control-plane call on a fresh connection: (status, parsed JSON or None)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return resp.status, parsed
    finally:
        conn.close()


def health(port: int, timeout: float = 1.0):
    try:
        status, data = http_json(port, "GET", "/health", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return None
    return data if status == 200 and isinstance(data, dict) else None


# ---------------------------------------------------------------------------
# Load runs
# ---------------------------------------------------------------------------

_ERRORS = (OSError, ProtocolError, http.client.HTTPException, ValueError)


class LoadRun:
    """`conns` threads, each with its own keep-alive connection, sending the
    requests make(worker, k) -> bytes (None ends that worker) until the
    deadline, max_per_worker requests, or stop()."""

    def __init__(self, port, make, conns, duration, max_per_worker=1_000_000, timeout=5.0,
                 rate=None, timeline=False, stop_event=None, watch_pid=None):
        self.port = port
        self.watch_pid = watch_pid
        self._cpu0: tuple[float | None, float | None] = (None, None)
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
        self._threads = []

    def _go(self):
        self._cpu0 = (self_cpu_seconds(), proc_cpu_seconds(self.watch_pid))
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.duration

    def start(self):
        for w in range(self.n):
            t = threading.Thread(target=self._work, args=(w,), daemon=True, name=f"bench-{w}")
            t.start()
            self._threads.append(t)
        self._barrier.wait(timeout=60)
        return self

    def stop(self):
        self._stop.set()

    def _stopped(self):
        return self._stop.is_set() or (self._global_stop is not None and self._global_stop.is_set())

    def _work(self, w):
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
            except _ERRORS as e:
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

    def wait(self) -> dict:
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
        own0, fe0 = self._cpu0
        fe1 = proc_cpu_seconds(self.watch_pid)
        if own0 is not None and elapsed > 0:
            st["client_cpu"] = (self_cpu_seconds() - own0) / elapsed
        if fe0 is not None and fe1 is not None and elapsed > 0:
            st["frontend_cpu"] = (fe1 - fe0) / elapsed
        return st


def run_load(port, make, conns, duration, **kw) -> dict:
    return LoadRun(port, make, conns, duration, **kw).start().wait()


# ---------------------------------------------------------------------------
# Cluster management (--start)
# ---------------------------------------------------------------------------

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


class ClusterError(Exception):
    pass


def _port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_ports(n: int, rng=None):
    """n distinct free loopback ports, taken below the usual ephemeral range
    so that outgoing connections are unlikely to grab them before use."""
    rng = rng or random.Random()
    ports: list[int] = []
    for _ in range(n * 50):
        if len(ports) == n:
            break
        p = rng.randrange(20000, 32000)
        if p not in ports and _port_free(p):
            ports.append(p)
    while len(ports) < n:  # fall back on the kernel's choice
        s = socket.socket()
        s.bind((LOOPBACK, 0))
        p = s.getsockname()[1]
        s.close()
        if p not in ports:
            ports.append(p)
    return ports


def _set_pdeathsig():
    """In the child: get SIGTERM if the bench process dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


_LIVE_CLUSTERS: list[Cluster] = []


class Cluster:
    def __init__(self, name, root, ports, cache_size):
        self.name = name
        self.data = os.path.join(root, name)
        os.makedirs(self.data, exist_ok=True)
        self.frontend_port = ports[0]
        self.catalog_ports = list(ports[1:4])
        self.order_ports = list(ports[4:7])
        self.cache_size = cache_size
        self.proc: Any = None  # subprocess.Popen once started
        self.logfile = os.path.join(self.data, "bench-cluster.out")
        self.token = None
        self.stopped = False
        self.known = {}  # pid -> starttime, descendants seen in /health

    @property
    def replica_ports(self):
        return {"catalog": self.catalog_ports, "order": self.order_ports}

    @property
    def all_ports(self):
        return [self.frontend_port] + self.catalog_ports + self.order_ports

    def command(self):
        return [
            sys.executable, "-c", TWISTD, "-n", "--pidfile=", "bazar-cluster",
            "--data", self.data,
            "--frontend-port", str(self.frontend_port),
            "--catalog-ports", ",".join(map(str, self.catalog_ports)),
            "--order-ports", ",".join(map(str, self.order_ports)),
            "--cache-size", str(self.cache_size),
        ]

    def start(self):
        out = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
            )
        finally:
            out.close()
        _LIVE_CLUSTERS.append(self)
        log(f"cluster {self.name}: started pid {self.proc.pid}, front end :{self.frontend_port}, "
            f"catalog {self.catalog_ports}, order {self.order_ports}, cache-size {self.cache_size}")

    def log_tail(self, n=25):
        try:
            with open(self.logfile, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def _remember(self, pid):
        if pid and is_descendant(pid, self.proc.pid):
            try:
                self.known[pid] = parse_proc_stat(read_proc_stat(pid))["starttime"]
            except (OSError, ValueError):
                pass

    def wait_ready(self, timeout):
        t_begin = time.monotonic()
        deadline = t_begin + timeout
        last = {}
        for _ in range(int(timeout / 0.25) + 2):
            rc = self.proc.poll()
            if rc is not None:
                raise ClusterError(f"cluster {self.name} exited with status {rc}; log tail:\n{self.log_tail()}")
            last = {p: health(p) for p in self.all_ports}
            ok = all(h is not None and h.get("status") == "ok" for h in last.values())
            prim = collections.Counter(
                h.get("service") for p, h in last.items() if h and h.get("role") == "primary"
            )
            if ok and prim["catalog"] == 1 and prim["order"] == 1:
                try:
                    st, _ = http_json(self.frontend_port, "GET", f"/bazar/info/{INFO_BOOK}", timeout=2.0)
                except (OSError, http.client.HTTPException):
                    st = None
                if st == 200:
                    for h in last.values():
                        self._remember(h.get("pid"))
                    return time.monotonic() - t_begin
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        states = {p: (h and (h.get("service"), h.get("role"), h.get("status"))) for p, h in last.items()}
        raise ClusterError(f"cluster {self.name} not ready after {timeout:.0f}s: {states}\n"
                           f"log tail:\n{self.log_tail()}")

    def read_token(self):
        tok = os.environ.get("BAZAR_ADMIN_TOKEN")
        if tok:
            self.token = tok
            return tok
        try:
            with open(os.path.join(self.data, "secrets.json")) as f:
                self.token = json.load(f).get("admin_token")
        except (OSError, ValueError):
            self.token = None
        return self.token

    def find_primary(self, service):
        """(port, pid, health) of the current primary of a service, or None."""
        best = None
        for port in self.replica_ports[service]:
            h = health(port)
            if (h and h.get("role") == "primary" and h.get("service") == service
                    and (best is None or (h.get("epoch") or 0) > (best[2].get("epoch") or 0))):
                best = (port, h.get("pid"), h)
        return best

    def kill(self, pid) -> bool:
        """kill -9 a replica, only if it is a descendant of this cluster."""
        if not isinstance(pid, int) or pid in (os.getpid(), self.proc.pid):
            return False
        if not is_descendant(pid, self.proc.pid):
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return False
        return True

    def _group_members(self):
        """Live (non-zombie) processes of the session this tool created for the cluster."""
        pids: list[int] = []
        try:
            names = os.listdir("/proc")
        except OSError:
            return pids
        for name in names:
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                st = parse_proc_stat(read_proc_stat(int(name)))
            except (OSError, ValueError, IndexError):
                continue
            if st["pgid"] == self.proc.pid and st["state"] not in ("Z", "X"):
                pids.append(st["pid"])
        return pids

    def _leftovers(self):
        left = set(self._group_members())
        for pid, start in self.known.items():
            try:
                st = parse_proc_stat(read_proc_stat(pid))
            except (OSError, ValueError, IndexError):
                continue
            if st["starttime"] == start and st["state"] not in ("Z", "X"):
                left.add(pid)
        return left

    def stop(self, grace=15.0):
        if self.proc is None or self.stopped:
            return
        self.stopped = True
        if self in _LIVE_CLUSTERS:
            _LIVE_CLUSTERS.remove(self)
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"cluster {self.name}: no exit {grace:.0f}s after SIGTERM, sending SIGKILL")
                try:
                    self.proc.kill()
                except OSError:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        # its children get SIGTERM from the supervisor: give them a moment, then
        # SIGKILL what is left of the session we created and of the replicas we saw
        left = set()
        for _ in range(30):
            left = self._leftovers()
            if not left:
                break
            time.sleep(0.1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if left:
            log(f"cluster {self.name}: killed {len(left)} leftover process(es)")
        rc = self.proc.returncode
        how = "SIGTERM" if rc == -signal.SIGTERM else f"exit status {rc}"
        log(f"cluster {self.name}: stopped ({how})")


def _stop_all_clusters():
    for c in list(_LIVE_CLUSTERS):
        try:
            c.stop(grace=5.0)
        except Exception as e:  # at exit: report, and go on with the others
            log(f"cluster {c.name}: stop at exit failed: {e}")


atexit.register(_stop_all_clusters)


# ---------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------


class Ctx:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.duration = args.duration
        self.stop = threading.Event()
        self.run_id = f"{os.getpid()}-{int(time.time())}"

    def pause(self, seconds):
        """Sleep that an interrupt can cut short."""
        end = time.monotonic() + seconds
        while not self.stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))


def fmt_stats(st) -> str:
    if not st or st.get("p50_ms") is None:
        return f"no successes ({st and st.get('errors')} errors)"
    rate = f"{st['rps']:.0f} req/s  " if st.get("rps") else f"{st['n']} ok  "
    cpu = ""
    if st.get("client_cpu") is not None:
        cpu += f"  cpu: client {st['client_cpu']:.0%}"
    if st.get("frontend_cpu") is not None:
        cpu += f", front end {st['frontend_cpu']:.0%}"
    return (f"{rate}p50 {st['p50_ms']:.3f}  p95 {st['p95_ms']:.3f}  "
            f"p99 {st['p99_ms']:.3f} ms  errors {st['errors']}{cpu}")


def add_bench_book(port, token, run_id):
    st, data = http_json(port, "POST", "/bazar/books", token=token, body={
        "title": f"Bench book {run_id}", "topic": f"bench {run_id}", "price": 10.0, "quantity": 1_000_000,
    })
    if st not in (200, 201) or not isinstance(data, dict) or "id" not in data:
        raise RuntimeError(f"POST /bazar/books answered {st}: {data}")
    return data["id"]


def op_requests(port, book_id):
    reqs = {
        "info": build_request("GET", f"/bazar/info/{INFO_BOOK}", port),
        "search": build_request("GET", "/bazar/search/" + quote(SEARCH_TOPIC, safe=""), port),
    }
    if book_id is not None:
        reqs["purchase"] = build_request("POST", f"/bazar/purchase/{book_id}", port, body={"quantity": 1})
    return reqs


def frontend_pid(port, cluster=None):
    """The front end's pid from /health, if it is a local process we may watch."""
    h = health(port)
    pid = h.get("pid") if h else None
    if not isinstance(pid, int):
        return None
    if cluster is not None:
        return pid if is_descendant(pid, cluster.proc.pid) else None
    return pid if _proc_looks_like_bazar(pid) else None


def measure_ops(ctx, port, book_id, label, extra_conns=(), fe_pid=None, out=None):
    """Each op at 1 and 16 connections (plus extra_conns for info); purchase
    only with a bench book to buy.  Fills `out` as it goes (kept if interrupted)."""
    out = {} if out is None else out
    reqs = op_requests(port, book_id)
    warm = LeanConn(port)
    for raw in reqs.values():  # warm up: fill the cache, open paths
        for _ in range(3):
            try:
                warm.roundtrip(raw)
            except _ERRORS:
                pass
    warm.close()
    for op in OPS:
        if op not in reqs:
            continue
        conns_list = list(OP_CONNS) + (list(extra_conns) if op == "info" else [])
        conns_list = sorted(set(conns_list), key=int)
        out[op] = {}
        for c in conns_list:
            if ctx.stop.is_set():
                return out
            raw = reqs[op]
            st = run_load(port, lambda w, k, raw=raw: raw, int(c), ctx.duration, stop_event=ctx.stop,
                          watch_pid=fe_pid)
            out[op][c] = st
            log(f"  {op:8s} cache={label:3s} conns={c:>2s}: {fmt_stats(st)}")
            ctx.pause(0.1)
    return out


def phase_invalidation(ctx, port, token, book_id, iterations, hit_repeats=3):
    conn = LeanConn(port)
    write, miss, hit = [], [], []
    stale = errors = 0
    perf = time.perf_counter
    get_raw = build_request("GET", f"/bazar/info/{book_id}", port)
    try:
        _, before = http_json(port, "GET", "/bazar/cache")
    except (OSError, http.client.HTTPException):
        before = None
    deadline = time.monotonic() + max(5.0, ctx.duration * 4)
    done = 0
    for i in range(iterations):
        if ctx.stop.is_set() or time.monotonic() > deadline:
            break
        price = round(11.0 + (i % 500) * 0.25, 2)
        put_raw = build_request("PUT", f"/bazar/update_price/{book_id}", port, body={"price": price}, token=token)
        try:
            t1 = perf()
            st, _ = conn.roundtrip(put_raw)
            t2 = perf()
            if st != 200:
                errors += 1
                continue
            write.append(t2 - t1)
            t1 = perf()
            st, body = conn.roundtrip(get_raw)
            t2 = perf()
            if st != 200:
                errors += 1
                continue
            miss.append(t2 - t1)
            try:
                if abs(float(json.loads(body)["price"]) - price) > 1e-9:
                    stale += 1
            except (ValueError, KeyError, TypeError):
                stale += 1
            for _ in range(hit_repeats):
                t1 = perf()
                st, _ = conn.roundtrip(get_raw)
                t2 = perf()
                if st == 200:
                    hit.append(t2 - t1)
                else:
                    errors += 1
            done += 1
        except _ERRORS:
            errors += 1
            conn.close()
    conn.close()
    try:
        _, after = http_json(port, "GET", "/bazar/cache")
    except (OSError, http.client.HTTPException):
        after = None
    delta = None
    if isinstance(before, dict) and isinstance(after, dict):
        delta = {k: (after.get(k) or 0) - (before.get(k) or 0) for k in ("hits", "misses", "evictions")
                 if isinstance(after.get(k), (int, float))}
    res = {
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


def phase_lru(ctx):
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


def _proc_looks_like_bazar(pid):
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").lower()
    except OSError:
        return False
    return b"twist" in cmd or b"bazar" in cmd


def phase_rss(ctx, port, cluster=None):
    h = health(port)
    if not h or not isinstance(h.get("pid"), int):
        return {"skipped": "front end /health gave no pid"}
    pid = h["pid"]
    if cluster is not None:
        if not is_descendant(pid, cluster.proc.pid):
            return {"skipped": f"front end pid {pid} from /health is not a child of the started cluster"}
    elif not _proc_looks_like_bazar(pid):
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

    def make(w, k):
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
    log(f"  front end pid {pid}: RSS {_num(res['rss_before_mb'], 'MB')} -> {_num(res['rss_mb'], 'MB')} MB "
        f"with {res['entries']} cache entries")
    return res


def phase_crash(ctx, cluster, book_id, token):
    quick = ctx.quick
    pre, settle, post = (1.0, 0.5, 1.5) if quick else (2.0, 1.5, 2.5)
    max_wait = 8.0 if quick else 15.0
    port = cluster.frontend_port
    purchase = build_request("POST", f"/bazar/purchase/{book_id}", port, body={"quantity": 1})
    info = build_request("GET", f"/bazar/info/{book_id}", port)
    n_purchase, n_info = 2, 2
    ops = ["purchase"] * n_purchase + ["info"] * n_info

    def make(w, k):
        return purchase if w < n_purchase else info

    run = LoadRun(port, make, len(ops), duration=90.0, timeout=CRASH_TIMEOUT, rate=150.0, timeline=True,
                  stop_event=ctx.stop).start()
    kills: list[dict[str, Any]] = []

    def now():
        return time.perf_counter() - run.t0

    def first_write_after(t_kill):
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
        for service in ("catalog", "order"):
            if ctx.stop.is_set():
                break
            prim = cluster.find_primary(service)
            if prim is None:
                kills.append({"service": service, "error": "no primary found via /health"})
                log(f"  {service}: no primary found, not killing")
                continue
            kport, pid, h = prim
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
                h = health(kill["port"])
                kill["after"] = ({"pid": h.get("pid"), "role": h.get("role"), "status": h.get("status")}
                                 if h else None)
                if h:
                    cluster._remember(h.get("pid"))
    finally:
        run.stop()
        total = run.wait()
    samples = []
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


# ---------------------------------------------------------------------------
# Targets, report, plots
# ---------------------------------------------------------------------------


def dig(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# name, target text, path into results, comparison, limit, unit
TARGETS = [
    ("cached info throughput, 16 conns", ("ops", "on", "info", "16", "rps"), ">=", 9000, "req/s"),
    ("cached info p50, 1 conn", ("ops", "on", "info", "1", "p50_ms"), "<=", 0.2, "ms"),
    ("uncached info throughput, 16 conns", ("ops", "off", "info", "16", "rps"), ">=", 2500, "req/s"),
    ("uncached info p50, 1 conn", ("ops", "off", "info", "1", "p50_ms"), "<=", 0.8, "ms"),
    ("purchase p50, 1 conn", ("ops", "on", "purchase", "1", "p50_ms"), "<=", 5, "ms"),
    ("purchase throughput, 16 conns", ("ops", "on", "purchase", "16", "rps"), ">=", 300, "req/s"),
    ("front-end RSS with 10,000 cached entries", ("rss", "rss_mb"), "<=", 80, "MB"),
]


def evaluate_targets(results) -> list:
    rows = []
    for name, path, cmp, limit, unit in TARGETS:
        measured = dig(results, *path)
        verdict = None
        why = ""
        if path[0] == "rss":
            entries = dig(results, "rss", "entries")
            if measured is not None and (not isinstance(entries, int) or entries < RSS_ENTRIES):
                why = f"only {entries} entries"
                verdict = "n/a"
        if verdict is None:
            if measured is None:
                verdict = "n/a"
                why = "not measured"
            else:
                ok = measured >= limit if cmp == ">=" else measured <= limit
                verdict = "PASS" if ok else "FAIL"
        rows.append({"name": name, "target": f"{cmp.replace('>=', '≥').replace('<=', '≤')} {limit:g} {unit}",
                     "measured": measured, "unit": unit, "verdict": verdict, "why": why})
    return rows


def _num(v, unit=""):
    if v is None:
        return "—"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "MB":
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _ms(v):
    return "—" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.0f}")


def _rps(v):
    return "—" if v is None else f"{v:,.0f}"


def _pct(v):
    return "—" if v is None else f"{v:.0%}"


def _stats_row(prefix_cells, st, cpu=False):
    cells = list(prefix_cells)
    if not st:
        cells += ["—"] * (10 if cpu else 8)
    else:
        cells += [str(st.get("n", "—")), _rps(st.get("rps")), _ms(st.get("avg_ms")), _ms(st.get("p50_ms")),
                  _ms(st.get("p95_ms")), _ms(st.get("p99_ms")), _ms(st.get("max_ms")), str(st.get("errors", 0))]
        if cpu:
            cells += [_pct(st.get("client_cpu")), _pct(st.get("frontend_cpu"))]
    return "| " + " | ".join(cells) + " |"


def replica_name(kill) -> str:
    """bazar-cluster's name of a killed replica (catalog-1, order-2, ...); its port
    only if the replica id is unknown (the ports are picked at random per run)."""
    if kill.get("replica") is not None and kill.get("service"):
        return f"{kill['service']}-{kill['replica']}"
    return f"port {kill.get('port', '?')}"


def _after_text(kill) -> str:
    after = kill.get("after")
    if not after:
        return "not answering /health"
    pid = after.get("pid")
    who = f"restarted, new pid {pid}" if pid is not None and pid != kill.get("pid") else f"pid {pid}"
    return f"{who}; {after.get('role')}, {after.get('status')}"


def failover_windows(crash) -> list:
    """(start, end) of every failover: from a kill to the first successful purchase after it."""
    return [(k["t"], k["t"] + k["failover_s"]) for k in crash.get("kills", [])
            if "t" in k and k.get("failover_s") is not None]


def info_latency_split(crash):
    """Median latency (ms) of the successful info reads sent inside the failover
    windows, and of those sent outside them (None where there are none)."""
    windows = failover_windows(crash)

    def inside(t):
        return any(a <= t < b for a, b in windows)

    ins = sorted(s[1] for s in crash.get("samples") or [] if s[2] == "info" and s[3] and inside(s[0]))
    outs = sorted(s[1] for s in crash.get("samples") or [] if s[2] == "info" and s[3] and not inside(s[0]))
    return percentile(ins, 50), percentile(outs, 50)


def crash_reading(crash) -> list:
    """Lines under the crash plot: what the shaded spans are, and why info reads get
    faster during a failover (the purchases that invalidate its cache entry wait)."""
    windows = failover_windows(crash)
    if not windows or not crash.get("samples"):
        return []
    n_info = (crash.get("ops") or {}).get("info")
    rate = crash.get("rate_per_worker")
    text = ("Reading the plot: the shaded spans are the failovers. Purchases sent during one wait for the new "
            "primary")
    if isinstance(n_info, int) and isinstance(rate, (int, float)):
        text += (f", so successes per second fall to about what the info workers alone are paced to "
                 f"({n_info} × {rate:.0f} = {n_info * rate:.0f} req/s)")
    text += "."
    med_in, med_out = info_latency_split(crash)
    if med_in is not None and med_out is not None and med_in < med_out:
        text += (" Info reads get *faster* during a failover, not slower: they read the book the purchases buy, "
                 "and every completed purchase changes its stock and so drops its cached info entry at the front "
                 "end. Between failovers many info reads therefore miss the cache and go to a catalog replica; "
                 "while the purchases wait, nothing drops the entry, so after one miss the info reads are cache "
                 f"hits. Median info latency: {_ms(med_in)} ms inside the shaded spans, {_ms(med_out)} ms "
                 "outside them.")
    elif med_in is not None and med_out is not None:
        text += f" Median info latency: {_ms(med_in)} ms inside the shaded spans, {_ms(med_out)} ms outside them."
    return [text, ""]


def _rate(v):
    return "—" if v is None else f"{v:.3f}"


def _zipf_ratio(s) -> str:
    if isinstance(s, (int, float)) and s == 1:
        return "1/k"
    return f"1/k^{s:g}" if isinstance(s, (int, float)) else f"1/k^{s}"


def lru_crosscheck(lru) -> str | None:
    """How bazar.cache.LRUCache compares with the textbook LRU replayed over the
    same trace: "same", "differs", or None (no cross-check: the replay fell back
    to the textbook LRU itself, or no reference figures)."""
    pts = lru.get("points") or []
    if not pts or "reference" in str(lru.get("source", "")):
        return None
    pairs = [(p.get("hit_rate"), p.get("ref_hit_rate")) for p in pts]
    if any(r is None or h is None for h, r in pairs):
        return None
    return "same" if all(abs(h - r) < 1e-12 for h, r in pairs) else "differs"


STATS_HEAD = "| requests | req/s | avg ms | p50 ms | p95 ms | p99 ms | max ms | errors |"
STATS_SEP = "|---:|---:|---:|---:|---:|---:|---:|---:|"
CPU_HEAD = " client CPU | front-end CPU |"
CPU_SEP = "---:|---:|"


def targets_text(rows) -> str:
    """Plain-text table for the terminal."""
    lines = [f"{'target':44s} {'wanted':>14s} {'measured':>12s}  verdict"]
    for r in rows:
        lines.append(f"{r['name']:44s} {r['target']:>14s} {(_num(r['measured'], r['unit']) + ' ' + r['unit']):>12s}  "
                     f"{r['verdict']}{(' (' + r['why'] + ')') if r['why'] else ''}")
    return "\n".join(lines)


def render_report(results) -> str:
    meta = results.get("meta", {})
    plots = results.get("plots", {})
    out = ["# Bazar benchmark report", ""]
    out.append(f"- run: {meta.get('started', '?')}, {meta.get('total_s', 0):.0f} s in all"
               + (" (`--quick`)" if meta.get("quick") else ""))
    out.append(f"- mode: {meta.get('mode', '?')}; front end {meta.get('url', '?')}"
               + (f"; cache-off front end {meta['url_nocache']}" if meta.get("url_nocache") else "")
               + (" (free loopback ports picked for this run; the clusters were stopped at its end)"
                  if str(meta.get("mode", "")).startswith("--start") else ""))
    out.append(f"- machine: {meta.get('cpus', '?')} CPU(s), {meta.get('platform', '?')}, "
               f"Python {meta.get('python', '?')}")
    out.append(f"- each load step: {meta.get('duration', '?')} s; client: "
               f"{meta.get('client', 'threads, one keep-alive connection each')}")
    if meta.get("clusters"):
        out.append(f"- {meta['clusters']}")
    for n in meta.get("notes", []):
        out.append(f"- note: {n}")
    out.append("")

    out += ["## Targets", "", "| target | wanted | measured | verdict |", "|---|---|---:|---|"]
    for r in evaluate_targets(results):
        verdict = r["verdict"] if not r["why"] else f"{r['verdict']} ({r['why']})"
        out.append(f"| {r['name']} | {r['target']} | {_num(r['measured'], r['unit'])} {r['unit']} | **{verdict}** |")
    out.append("")

    # 1. ops
    out += ["## 1. Latency and throughput: info, search, purchase", ""]
    ops = results.get("ops", {})
    skipped = results.get("ops_skipped", {})
    out.append("| op | cache | conns " + STATS_HEAD + CPU_HEAD)
    out.append("|---|---|---:" + STATS_SEP + CPU_SEP)
    for op in OPS:
        for cache in ("on", "off"):
            for c, st in sorted((dig(ops, cache, op) or {}).items(), key=lambda kv: int(kv[0])):
                out.append(_stats_row([op, cache, c], st, cpu=True))
    out.append("")
    for cache, why in skipped.items():
        out.append(f"Cache {cache}: skipped — {why}.")
    if skipped:
        out.append("")
    out.append("Latency is measured at the client (request sent → full response read), successes only. "
               "CPU columns: share of one core used by the bench client and by the front-end process "
               "during the step (100% = one core busy).")
    out.append("")
    if plots.get("latency"):
        out += [f"![latency]({plots['latency']})", ""]

    # 2. invalidation
    inv = results.get("invalidation") or {}
    out += ["## 2. Invalidation: write, first read after it, repeated read", ""]
    if "skipped" in inv:
        out += [f"Skipped — {inv['skipped']}.", ""]
    elif inv:
        out.append("| step " + STATS_HEAD)
        out.append("|---" + STATS_SEP)
        out.append(_stats_row(["PUT update_price (write)"], inv.get("write")))
        out.append(_stats_row(["first GET info after the write"], inv.get("miss_read")))
        out.append(_stats_row([f"repeated GET info (×{inv.get('hit_repeats', 3)})"], inv.get("hit_read")))
        out.append("")
        out.append(f"{inv.get('iterations')} rounds on one keep-alive connection; errors {inv.get('errors')}; "
                   f"reads that did not show the price just written: **{inv.get('stale_reads')}**.")
        if inv.get("cache_counter_delta") is not None:
            d = inv["cache_counter_delta"]
            out.append(f"Front-end cache counters over the phase: hits +{d.get('hits')}, misses +{d.get('misses')}, "
                       f"evictions +{d.get('evictions')} "
                       "(a miss per round is expected: the write invalidates the entry).")
        out.append("")
        if plots.get("invalidation"):
            out += [f"![invalidation]({plots['invalidation']})", ""]
    else:
        out += ["Not run.", ""]

    # 3. crash
    crash = results.get("crash") or {}
    out += ["## 3. Crash experiment: kill -9 of the catalog primary, then of the order primary", ""]
    if "skipped" in crash:
        out += [f"Skipped — {crash['skipped']}.", ""]
    elif crash:
        ops_c = crash.get("ops", {})
        out.append(f"Load: {ops_c.get('purchase')} purchase + {ops_c.get('info')} info workers, all on the same "
                   f"bench book, each paced at ≤ {crash.get('rate_per_worker', 0):.0f} req/s, "
                   f"{crash.get('duration_s', 0):.1f} s, client timeout {crash.get('client_timeout_s', '?')} s. "
                   "Failover time: from a kill to the completion of the first successful write (purchase) "
                   "sent after it.")
        out.append("")
        out.append("| killed | replica | pid killed | at t (s) | failover (s) | errors in next 5 s "
                   "| max latency in next 5 s (ms) | that replica at the end |")
        out.append("|---|---|---:|---:|---:|---:|---:|---|")
        for k in crash.get("kills", []):
            if "t" not in k:
                out.append(f"| {k.get('service')} | — | {k.get('pid', '—')} | — | — | — | — | {k.get('error')} |")
                continue
            fo = k.get("failover_s")
            out.append(f"| {k['service']} primary | {replica_name(k)} | {k.get('pid')} | {k['t']:.2f} | "
                       f"{'not seen' if fo is None else f'{fo:.3f}'} | {k.get('errors_5s', '—')} | "
                       f"{_ms(k.get('max_latency_ms_5s'))} | {_after_text(k)} |")
        out.append("")
        out.append("Replica names are bazar-cluster's (catalog-1…3, order-1…3). Last column: the killed "
                   "replica's `GET /health` at the end of the experiment. bazar-cluster's process monitor "
                   "restarts a process that dies, so a new pid there means the replica came back; the role is "
                   "the one it reported then.")
        out.append("")
        tot = crash.get("total") or {}
        out.append(f"Whole run: {tot.get('n', 0)} successful requests, {tot.get('errors', 0)} errors "
                   f"({', '.join(f'{k}: {v}' for k, v in (tot.get('statuses') or {}).items()) or 'none'}).")
        out.append("")
        if plots.get("crash"):
            out += [f"![crash]({plots['crash']})", ""]
        out += crash_reading(crash)
    else:
        out += ["Not run.", ""]

    # 4. LRU
    lru = results.get("lru") or {}
    out += ["## 4. LRU hit rate vs cache size (simulated requests)", ""]
    if "skipped" in lru:
        out += [f"Skipped — {lru['skipped']}.", ""]
    elif lru:
        pts = lru.get("points", [])
        cross = lru_crosscheck(lru)
        out.append(f"In-process replay of {lru.get('trace_len')} requests for {lru.get('keys')} book ids (seed "
                   f"{lru.get('seed')}) through {lru.get('source')}, starting from an empty cache; on a miss the "
                   f"book is put in the cache. The requests follow a zipf law with s = {lru.get('s')}: the k-th "
                   f"most requested book is asked for {_zipf_ratio(lru.get('s'))} as often as the most requested "
                   "one, so a few books get most of the requests.")
        if lru.get("note"):
            out.append(f"Note: {lru['note']}.")
        out.append("")
        head = "| cache size (N entries) | hit rate |"
        sep = "|---:|---:|"
        if cross == "differs":
            head += " textbook LRU (cross-check) |"
            sep += "---:|"
        out.append(head + " best possible: share of requests to the N most requested books | evictions |")
        out.append(sep + "---:|---:|")
        for p in pts:
            row = f"| {p['capacity']} | {p['hit_rate']:.3f} |"
            if cross == "differs":
                row += f" {_rate(p.get('ref_hit_rate'))} |"
            ev = "—" if p.get("evictions") is None else p["evictions"]
            out.append(row + f" {_rate(p.get('top_k_mass'))} | {ev} |")
        out.append("")
        out.append("*Hit rate*: the share of requests answered from the cache. *Best possible*: the share of "
                   "requests that go to the N most requested books (from the zipf law above): a cache that always "
                   "held exactly those books would hit that often, and when requests are drawn independently, as "
                   "here, no cache of N entries that cannot see future requests can expect more. LRU stays below "
                   "it: it also keeps books that were requested only once, recently, and the first request for "
                   "each book misses. *Evictions*: entries pushed out to make room.")
        full = [p for p in pts if isinstance(lru.get("keys"), int) and p["capacity"] >= lru["keys"]
                and p.get("evictions") == 0]
        if full:
            p = full[0]
            out.append(f"At N = {p['capacity']} every book fits and nothing is evicted: the gap to the best "
                       f"possible ({_rate(p.get('top_k_mass'))} vs {p['hit_rate']:.3f}) is only the first request "
                       "of each book, which misses in a cache that starts empty.")
        if cross == "same":
            out.append("Cross-check: the same requests replayed through a textbook LRU (an `OrderedDict` in "
                       "bench.py) give exactly the same hit rate at every size, so bazar.cache.LRUCache evicts "
                       "the least recently used entry, as it should.")
        elif cross == "differs":
            out.append("The *textbook LRU* column replays the same requests through a plain `OrderedDict` LRU in "
                       "bench.py. It should equal the hit rate; a difference means bazar.cache.LRUCache does not "
                       "evict in least-recently-used order.")
        out.append("")
        if plots.get("lru"):
            out += [f"![lru]({plots['lru']})", ""]
    else:
        out += ["Not run.", ""]

    # 5. throughput sweep
    tp = results.get("throughput") or {}
    out += ["## 5. Throughput vs connections (cached GET /bazar/info)", ""]
    if tp:
        items = sorted(tp.items(), key=lambda kv: int(kv[0]))
        in_ops = dig(ops, "on", "info") or {}
        shared = [c for c, st in items if in_ops.get(c) == st]
        extra = [(c, st) for c, st in items if in_ops.get(c) != st]
        if shared:
            out.append(f"The numbers at {', '.join(shared)} connections are the cached info rows of "
                       "section 1; they are not repeated here.")
        if extra:
            out.append("Measurements not in section 1:")
            out.append("")
            out.append("| conns " + STATS_HEAD + CPU_HEAD)
            out.append("|---:" + STATS_SEP + CPU_SEP)
            for c, st in extra:
                out.append(_stats_row([c], st, cpu=True))
        out.append("")
        (c0, st0), (c1, st1) = items[0], items[-1]
        if len(items) > 1 and st0.get("rps") and st1.get("rps"):
            out.append(f"From {c0} to {c1} connections, throughput goes from {_rps(st0['rps'])} to "
                       f"{_rps(st1['rps'])} req/s (×{st1['rps'] / st0['rps']:.1f}) and p50 latency from "
                       f"{_ms(st0.get('p50_ms'))} to {_ms(st1.get('p50_ms'))} ms.")
            out.append("")
        if plots.get("throughput"):
            out += [f"![throughput]({plots['throughput']})", ""]
    else:
        out += ["Not measured.", ""]

    # 6. memory
    rss = results.get("rss") or {}
    out += ["## 6. Front-end memory", ""]
    if "skipped" in rss:
        out += [f"Skipped — {rss['skipped']}.", ""]
    elif rss:
        out.append(f"Front end pid {rss.get('pid')} (cache capacity {rss.get('capacity')}): VmRSS "
                   f"{_num(rss.get('rss_before_mb'), 'MB')} MB with {rss.get('entries_before')} entries → "
                   f"**{_num(rss.get('rss_mb'), 'MB')} MB with {rss.get('entries')} entries**, after "
                   f"{rss.get('fill_requests')} searches of distinct unknown topics "
                   f"({_rps(rss.get('fill_rps'))} req/s, {rss.get('fill_errors')} errors; "
                   "each caches an empty result).")
        if rss.get("note"):
            out.append(f"Note: {rss['note']}.")
        out.append("")
    else:
        out += ["Not run.", ""]

    out += ["## How this was measured", "",
            ("`bazar-bench` (bazar/bench.py): threads with one keep-alive HTTP/1.1 connection each, all to "
            "127.0.0.1; every step bounded by time and by count; latencies at the client with "
            "`time.perf_counter`; percentiles by linear interpolation. The client shares the machine's CPUs "
            "with the cluster, so absolute numbers are a lower bound on what the server alone could do."), ""]
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_latency(results):
    """Latency at 1 connection and throughput at 16, by op and cache; None without data."""
    ops = results.get("ops") or {}
    rows = []
    for op in OPS:
        for cache in ("on", "off"):
            st1 = dig(ops, cache, op, "1")
            st16 = dig(ops, cache, op, "16")
            if st1 or st16:
                rows.append((f"{op}\ncache {cache}", st1 or {}, st16 or {}))
    if not rows:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    for j, (key, lab) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        ax1.bar([i + (j - 1) * 0.27 for i in x], [r[1].get(key) or 0 for r in rows], width=0.27, label=lab)
    ax1.set_xticks(list(x), [r[0] for r in rows], fontsize=8)
    ax1.set_ylabel("latency (ms), 1 connection")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("latency at 1 connection")
    ax2.bar(list(x), [r[2].get("rps") or 0 for r in rows], color="tab:green")
    ax2.set_xticks(list(x), [r[0] for r in rows], fontsize=8)
    ax2.set_ylabel("req/s")
    ax2.set_title("throughput at 16 connections")
    fig.tight_layout()
    return fig


def fig_invalidation(results):
    inv = results.get("invalidation") or {}
    if not inv.get("write"):
        return None
    plt = _pyplot()
    labels = ["write (PUT)", "1st read", "reread"]
    sts = [inv.get("write") or {}, inv.get("miss_read") or {}, inv.get("hit_read") or {}]
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, (key, lab) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        ax.bar([i + (j - 1) * 0.27 for i in range(3)], [s.get(key) or 0 for s in sts], width=0.27, label=lab)
    ax.set_xticks(range(3), labels)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_title("invalidation: write, first read after it, repeated read")
    ax.legend()
    fig.tight_layout()
    return fig


def fig_crash(results):
    """Latency and successes/errors over time, kills marked, failovers shaded."""
    crash = results.get("crash") or {}
    samples = crash.get("samples") or []
    if not samples:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    colors = {"purchase": "tab:blue", "info": "tab:orange"}
    for op, color in colors.items():
        pts = [(s[0], s[1]) for s in samples if s[2] == op and s[3]]
        if pts:
            ax1.scatter([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], s=3, color=color, label=f"{op} ok")
        bad = [(s[0], s[1]) for s in samples if s[2] == op and not s[3]]
        if bad:
            ax1.scatter([p[0] for p in bad], [max(p[1], 1e-3) for p in bad], s=12, marker="x", color="red",
                        label=f"{op} error" if op == "purchase" else None)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    end = max(s[0] for s in samples)
    width = 0.25
    nb = max(1, int(end / width))  # whole bins only: the last partial one would dip
    okb = [0] * nb
    errb = [0] * nb
    for s in samples:
        b = int(s[0] / width)
        if b < nb:
            (okb if s[3] else errb)[b] += 1
    xs = [i * width for i in range(nb)]
    ax2.plot(xs, [v / width for v in okb], color="tab:green", label="successes/s")
    ax2.bar(xs, [v / width for v in errb], width=width, color="red", alpha=0.6, align="edge", label="errors/s")
    ax2.set_ylabel("per second")
    ax2.set_xlabel("time since load start (s)")
    for k in crash.get("kills", []):
        if "t" in k:
            for ax in (ax1, ax2):
                ax.axvline(k["t"], color="black", linestyle="--", linewidth=1)
            ax1.annotate(f"kill {k['service']} primary", (k["t"], 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize=8)
    med_in, med_out = info_latency_split(crash)
    info_hits = med_in is not None and med_out is not None and med_in < med_out  # see crash_reading
    for i, (a, b) in enumerate(failover_windows(crash)):
        for ax in (ax1, ax2):
            ax.axvspan(a, b, color="grey", alpha=0.15, linewidth=0,
                       label="failover: purchases wait" if i == 0 and ax is ax1 else None)
        ax1.annotate("purchases wait;\ninfo served\nfrom the cache" if info_hits else "purchases wait",
                     ((a + b) / 2, 0.55), xycoords=("data", "axes fraction"), ha="center", va="center",
                     fontsize=8, color="dimgrey")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax1.set_title("purchase + info load on one book while the primaries are killed")
    fig.tight_layout()
    return fig


def fig_lru(results):
    lru = results.get("lru") or {}
    lru_pts = lru.get("points") or []
    if not lru_pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    caps = [p["capacity"] for p in lru_pts]
    ax.plot(caps, [p["hit_rate"] for p in lru_pts], marker="o", label=lru.get("source", "LRU"))
    if lru_crosscheck(lru) == "differs":
        ax.plot(caps, [p["ref_hit_rate"] for p in lru_pts], linestyle=":", marker=".", label="textbook LRU")
    ax.plot(caps, [p["top_k_mass"] for p in lru_pts], linestyle="--", color="grey",
            label="best possible: share of requests\nto the N most requested books")
    ax.set_xscale("log")
    ax.set_xticks(caps, [str(c) for c in caps], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"cache size N (entries; {lru.get('keys')} books)")
    ax.set_ylabel("hit rate")
    ax.set_title(f"LRU hit rate vs cache size, zipf s={lru.get('s')}")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def fig_throughput(results):
    """Cached info req/s and latency vs connections; both y axes start at 0."""
    tp = results.get("throughput") or {}
    if not tp:
        return None
    plt = _pyplot()
    items = sorted(tp.items(), key=lambda kv: int(kv[0]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cs = [int(c) for c, _ in items]
    ax.plot(cs, [st.get("rps") or 0 for _, st in items], marker="o", color="tab:green", label="req/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("connections")
    ax.set_ylabel("req/s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(cs, [st.get("p50_ms") or 0 for _, st in items], marker="s", color="tab:purple", label="p50 ms")
    ax2.plot(cs, [st.get("p99_ms") or 0 for _, st in items], marker="^", color="tab:red", label="p99 ms")
    ax2.set_ylabel("latency (ms)")
    ax2.set_ylim(bottom=0)
    ax.set_title("cached GET /bazar/info: throughput vs connections")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


FIGURES = (("latency", fig_latency), ("invalidation", fig_invalidation), ("crash", fig_crash),
           ("lru", fig_lru), ("throughput", fig_throughput))


def write_plots(results, out_dir) -> dict:
    """PNG plots into out_dir; returns {name: filename}.  Needs matplotlib."""
    plt = _pyplot()
    made: dict[str, str] = {}
    for name, make in FIGURES:
        fig = make(results)
        if fig is None:
            continue
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=100)
        plt.close(fig)
        made[name] = f"{name}.png"
    return made


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def loopback_port(url: str) -> int:
    """Port of an http URL on 127.0.0.1 (or localhost); anything else is refused."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url}: only http:// URLs are supported")
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"{url}: bazar-bench only ever targets 127.0.0.1")
    return parts.port or 80


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bazar-bench",
        description="Benchmark a Bazar cluster on this machine and write a Markdown report with plots.",
    )
    p.add_argument("--url", default="http://127.0.0.1:5000", help="front end of a running cluster (127.0.0.1 only)")
    p.add_argument("--url-nocache", default=None,
                   help="front end of a running cluster started with --cache-size 0 (for the cache-off column)")
    p.add_argument("--start", action="store_true",
                   help="start throw-away clusters (cache on and cache off) on free ports, and stop them at the end")
    p.add_argument("--out", default=None,
                   help="output directory (default ./bench-out; with --report-only, the directory of its file)")
    p.add_argument("--report-only", metavar="RESULTS_JSON", default=None,
                   help="measure nothing: rewrite report.md and the plots from an existing results.json "
                        "(its numbers are used as they are)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per load step (default 2.0, 0.5 with --quick)")
    p.add_argument("--quick", action="store_true", help="short smoke run (~20-30 s with --start)")
    p.add_argument("--cache-size", type=int, default=RSS_ENTRIES,
                   help=f"front-end cache size of the cache-on cluster started with --start (default {RSS_ENTRIES})")
    p.add_argument("--keep-data", action="store_true", help="keep the started clusters' data directories and logs")
    p.add_argument("--only", default=",".join(PHASES),
                   help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all)")
    p.add_argument("--no-crash", action="store_true", help="skip the crash experiment")
    p.add_argument("--no-plots", action="store_true", help="write the report without PNG plots")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = (os.path.dirname(os.path.abspath(args.report_only)) if args.report_only else "bench-out")
    if args.report_only and args.start:
        p.error("--report-only measures nothing: it cannot be combined with --start")
    if args.duration is None:
        args.duration = 0.5 if args.quick else 2.0
    if not 0 < args.duration <= 60:
        p.error("--duration must be within (0, 60]")
    args.phases = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.phases if x not in PHASES]
    if unknown or not args.phases:
        p.error(f"--only: unknown phase(s) {unknown}; choose from {','.join(PHASES)}")
    if args.no_crash and "crash" in args.phases:
        args.phases.remove("crash")
    try:
        args.port = loopback_port(args.url)
        args.port_nocache = loopback_port(args.url_nocache) if args.url_nocache else None
    except ValueError as e:
        p.error(str(e))
    return args


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run(args, results) -> None:
    ctx = Ctx(args)
    meta = results["meta"]
    notes = meta["notes"]
    phases = args.phases
    clusters = []
    tmp_root = None
    on = off = None  # Cluster objects with --start
    try:
        if args.start:
            tmp_root = tempfile.mkdtemp(prefix="bazar-bench-")
            ports = free_ports(14)
            on = Cluster("cache-on", tmp_root, ports[:7], args.cache_size)
            clusters = [on]
            if "ops" in phases:
                off = Cluster("cache-off", tmp_root, ports[7:], 0)
                clusters.append(off)
            for c in clusters:
                c.start()
            for c in clusters:
                t = c.wait_ready(timeout=60.0)
                log(f"cluster {c.name}: ready in {t:.1f}s (all 7 /health ok, one primary per service)")
                if not c.read_token():
                    notes.append(f"cluster {c.name}: no admin token (neither BAZAR_ADMIN_TOKEN nor secrets.json)")
            port, token = on.frontend_port, on.token
            port_off, token_off = (off.frontend_port, off.token) if off else (None, None)
            meta["url"] = f"http://{LOOPBACK}:{port}"
            meta["url_nocache"] = f"http://{LOOPBACK}:{port_off}" if off else None
            meta["clusters"] = (f"cache-on cluster started with --cache-size {args.cache_size}"
                                + ("; cache-off cluster with --cache-size 0" if off else ""))
        else:
            port, port_off = args.port, args.port_nocache
            token = token_off = os.environ.get("BAZAR_ADMIN_TOKEN")
            if health(port) is None:
                raise ClusterError(f"no Bazar front end answers GET /health at {args.url} (use --start?)")

        def guarded(name, fn, *fargs, **fkw):
            """Run one phase; an error in it is reported, and the run goes on."""
            if ctx.stop.is_set():
                return {"skipped": "run interrupted"}
            try:
                return fn(*fargs, **fkw)
            except (ClusterError, RuntimeError, OSError, ValueError, KeyError, TypeError,
                    http.client.HTTPException) as e:
                import traceback

                traceback.print_exc()
                log(f"{name}: failed: {type(e).__name__}: {e}")
                notes.append(f"{name} failed: {type(e).__name__}: {e}")
                return {"skipped": f"failed with {type(e).__name__}: {e}"}

        def bench_book(p, tok, label):
            if not tok:
                notes.append(f"cache-{label}: no admin token, so no well-stocked bench book: purchase, "
                             "invalidation and crash phases skipped there")
                return None
            r = guarded(f"adding the bench book (cache {label})", add_bench_book, p, tok, ctx.run_id)
            return None if isinstance(r, dict) else r

        book_on = bench_book(port, token, "on")

        # 1 (cache on) + 5 (sweep)
        if "ops" in phases:
            log("phase 1: info / search / purchase, cache on")
            ops_on: dict[str, Any] = {}
            results["ops"]["on"] = ops_on
            r = guarded("phase 1 (cache on)", measure_ops, ctx, port, book_on, "on", extra_conns=("4", "64"),
                        fe_pid=frontend_pid(port, on), out=ops_on)
            if "skipped" in r:
                results["ops_skipped"]["on"] = r["skipped"]
            results["throughput"] = {c: st for c, st in ops_on.get("info", {}).items() if c in SWEEP_CONNS}

            # 1 (cache off)
            if port_off:
                log("phase 1: info / search / purchase, cache off")
                book_off = bench_book(port_off, token_off, "off")
                r = guarded("phase 1 (cache off)", measure_ops, ctx, port_off, book_off, "off",
                            fe_pid=frontend_pid(port_off, off), out=results["ops"].setdefault("off", {}))
                if "skipped" in r:
                    results["ops_skipped"]["off"] = r["skipped"]
            else:
                results["ops_skipped"]["off"] = ("no cache-less cluster (use --start, or --url-nocache with "
                                                 "a cluster started with --cache-size 0)")
        if off is not None:
            off.stop()

        # 2 invalidation
        if "invalidation" in phases:
            log("phase 2: invalidation")
            if book_on is not None:
                results["invalidation"] = guarded("phase 2 (invalidation)", phase_invalidation, ctx, port, token,
                                                  book_on, 15 if args.quick else 50)
            else:
                results["invalidation"] = {"skipped": "needs the admin token and the bench book"}

        # 4 LRU (in-process)
        if "lru" in phases:
            log("phase 4: LRU hit rate vs size over a zipf trace (in-process)")
            results["lru"] = guarded("phase 4 (LRU)", phase_lru, ctx)

        # 6 memory
        if "rss" in phases:
            log("phase 6: front-end RSS with a full cache")
            results["rss"] = guarded("phase 6 (RSS)", phase_rss, ctx, port, cluster=on)

        # 3 crash
        if "crash" in phases:
            if on is None:
                results["crash"] = {"skipped": "only with --start: it kills processes, "
                                               "and only those this tool started"}
            elif book_on is None:
                results["crash"] = {"skipped": "needs the admin token to add a bench book"}
            else:
                log("phase 3: crash experiment")
                results["crash"] = guarded("phase 3 (crash)", phase_crash, ctx, on, book_on, token)
    except KeyboardInterrupt:
        ctx.stop.set()
        notes.append("interrupted: the report is partial")
        log("interrupted; stopping")
        raise
    finally:
        ctx.stop.set()
        for c in clusters:
            try:
                c.stop()
            except Exception as e:  # keep stopping the others
                log(f"cluster {c.name}: stop failed: {e}")
        if tmp_root:
            if args.keep_data:
                log(f"data and logs kept in {tmp_root}")
                notes.append(f"cluster data kept in {tmp_root}")
            else:
                shutil.rmtree(tmp_root, ignore_errors=True)


def write_outputs(results, out_dir, plots=True) -> None:
    """The plots (unless plots=False or matplotlib is missing) and report.md into out_dir.
    Notes about plotting go into results["meta"]["notes"]; results["plots"] lists the PNGs."""
    os.makedirs(out_dir, exist_ok=True)
    results["plots"] = {}
    if plots:
        try:
            results["plots"] = write_plots(results, out_dir)
        except ImportError:
            results.setdefault("meta", {}).setdefault("notes", []).append(
                "matplotlib not installed: no plots (pip install 'bazar[bench]')")
        except Exception as e:
            results.setdefault("meta", {}).setdefault("notes", []).append(
                f"plotting failed: {type(e).__name__}: {e}")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_report(results))


def report_only(path, out_dir, plots=True) -> int:
    """Rewrite report.md and the plots from an existing results.json, measuring nothing.
    The results file itself is left as it is (copied, unchanged, when out_dir is elsewhere)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        log(f"error: cannot read {path}: {e}")
        return 1
    if not isinstance(results, dict):
        log(f"error: {path} does not hold a bazar-bench results object")
        return 1
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "results.json")
    if not (os.path.exists(target) and os.path.samefile(path, target)):
        shutil.copyfile(path, target)
    write_outputs(results, out_dir, plots=plots)
    log(f"report rewritten from {path} into {os.path.join(out_dir, 'report.md')}")
    print(targets_text(evaluate_targets(results)))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args.report_only, args.out, plots=not args.no_plots)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    results = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "mode": "--start (two throw-away clusters)" if args.start else "existing cluster",
            "url": args.url,
            "url_nocache": args.url_nocache,
            "quick": args.quick,
            "duration": args.duration,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "client": "threads, one keep-alive HTTP/1.1 socket each (bazar.bench.LeanConn)",
            "notes": [],
        },
        "ops": {},
        "ops_skipped": {},
    }
    t0 = time.monotonic()
    rc = 0
    try:
        run(args, results)
    except KeyboardInterrupt:
        rc = 130
    except ClusterError as e:
        log(f"error: {e}")
        results["meta"]["notes"].append(f"error: {str(e).splitlines()[0]}")
        rc = 1
    except Exception as e:  # still write what was measured
        import traceback

        traceback.print_exc()
        log(f"error: {type(e).__name__}: {e}")
        results["meta"]["notes"].append(f"error: {type(e).__name__}: {e}")
        rc = 1
    results["meta"]["total_s"] = time.monotonic() - t0
    write_outputs(results, args.out, plots=not args.no_plots)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    log(f"report written to {os.path.join(args.out, 'report.md')}")
    print(targets_text(evaluate_targets(results)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
