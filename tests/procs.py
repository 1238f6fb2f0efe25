"""Helpers for the real-process tests: loopback ports, a `twistd -n bazar-cluster`
and a `redis-server` started and stopped by PID, small urllib HTTP helpers, and
bounded waits.

Nothing here loops without a deadline, and nothing signals a process this module
did not start itself (the cluster runs in a session of its own, so its process
group holds exactly the supervisor and the replicas it spawned).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

HOST = "127.0.0.1"
TOKEN = "test-admin-token"
SECRET = "test-cluster-secret"
TWISTD = "from twisted.scripts.twistd import run; run()"

T = TypeVar("T")

# Every process started by this module, so a session fixture can stop leftovers.
_RUNNING: list[Any] = []


# -- ports ---------------------------------------------------------------------

def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that can be bound now, chosen below the
    ephemeral range (outgoing connections never take them, so a replica restarted
    by the supervisor can bind its port again)."""
    low, _ = _ephemeral_range()
    top = min(low - 1, 32000)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    ports: list[int] = []
    for _ in range(2000):
        if len(ports) == count:
            break
        port = rng.randint(20000, top)
        if port in _handed_out or port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) != count:
        raise RuntimeError(f"could not find {count} free loopback ports")
    _handed_out.update(ports)
    return ports


# -- HTTP ----------------------------------------------------------------------

@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def call(method: str, url: str, body: Any = None, *, token: str | None = None, secret: str | None = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None, timeout: float = 10.0) -> Response:
    """One HTTP exchange; HTTP errors are answers (Response), connection trouble raises OSError."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", "Bearer " + token)
    if secret is not None:
        req.add_header("X-Bazar-Secret", secret)
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Response(r.status, r.read(), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as e:
        with e:
            return Response(e.code, e.read(), {k.lower(): v for k, v in e.headers.items()})
    except urllib.error.URLError as e:
        reason = e.reason
        raise reason if isinstance(reason, OSError) else OSError(str(reason)) from None


def get_json(url: str, **kw: Any) -> Any:
    r = call("GET", url, **kw)
    assert r.status == 200, f"GET {url}: {r.status} {r.body[:300]!r}"
    return r.json


def try_get_json(url: str, timeout: float = 2.0, **kw: Any) -> Any | None:
    """The JSON of a 200 answer, or None (error status, no connection, bad JSON)."""
    try:
        r = call("GET", url, timeout=timeout, **kw)
        return r.json if r.status == 200 else None
    except (OSError, ValueError):
        return None


# -- waiting -------------------------------------------------------------------

def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, ValueError, AssertionError, KeyError, TypeError) as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"[:2000])
        time.sleep(interval)


# -- processes -----------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (read from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def stop_group(proc: subprocess.Popen[bytes], term_wait: float = 15.0) -> None:
    """SIGTERM the process group we created for `proc`, wait, then SIGKILL it."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + term_wait
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_members(pgid):
            break
        time.sleep(0.1)
    if group_members(pgid) or proc.poll() is None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class Cluster:
    """One `twistd -n bazar-cluster` on loopback ports, in its own session."""

    data: str
    frontends: int = 1
    redis: str | None = None
    env_secrets: bool = True
    extra_args: list[str] = field(default_factory=list)
    frontend_port: int = 0
    catalog_ports: list[int] = field(default_factory=list)
    order_ports: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    token: str = TOKEN
    secret: str = SECRET
    sigint_ignored: bool = False  # start it as a shell starts a background job

    def __post_init__(self) -> None:
        if not self.catalog_ports:
            ports = free_ports(6)
            self.catalog_ports, self.order_ports = ports[:3], ports[3:6]
            # front ends need consecutive ports: frontend_port, frontend_port + 1, ...
            self.frontend_port = self._consecutive(self.frontends)

    @staticmethod
    def _consecutive(n: int) -> int:
        for _ in range(200):
            base = free_ports(1)[0]
            rest = list(range(base + 1, base + n))
            ok = True
            for port in rest:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    try:
                        s.bind((HOST, port))
                    except OSError:
                        ok = False
                        break
            if ok and not (set(rest) & _handed_out):
                _handed_out.update(rest)
                return base
        raise RuntimeError(f"no {n} consecutive free ports")

    # -- addresses --
    @property
    def front(self) -> str:
        return self.fronts[0]

    @property
    def fronts(self) -> list[str]:
        return [f"http://{HOST}:{self.frontend_port + i}" for i in range(self.frontends)]

    @property
    def catalogs(self) -> list[str]:
        return [f"http://{HOST}:{p}" for p in self.catalog_ports]

    @property
    def orders(self) -> list[str]:
        return [f"http://{HOST}:{p}" for p in self.order_ports]

    @property
    def replicas(self) -> list[str]:
        return self.catalogs + self.orders

    @property
    def everyone(self) -> list[str]:
        return self.replicas + self.fronts

    def log(self, name: str) -> str:
        return os.path.join(self.data, "logs", name + ".log")

    def tail_logs(self, lines: int = 25) -> str:
        """The end of every process log, for failure reports."""
        parts = []
        logs = os.path.join(self.data, "logs")
        names = sorted(os.listdir(logs)) if os.path.isdir(logs) else []
        for name in ["../cluster.out"] + names:
            path = os.path.join(logs, name)
            try:
                with open(path, errors="replace") as f:
                    text = [line for line in f if "ing factory" not in line][-lines:]
            except OSError:
                continue
            parts.append(f"--- {os.path.normpath(path)}\n" + "".join(text))
        return "\n".join(parts)

    # -- lifecycle --
    def argv(self) -> list[str]:
        args = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "bazar-cluster", "--data", self.data,
                "--frontend-port", str(self.frontend_port),
                "--catalog-ports", ",".join(map(str, self.catalog_ports)),
                "--order-ports", ",".join(map(str, self.order_ports)),
                "--frontends", str(self.frontends)]
        if self.redis:
            args += ["--redis", self.redis]
        return args + self.extra_args

    def start(self, wait: float = 60.0) -> "Cluster":
        os.makedirs(self.data, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.env_secrets:
            env["BAZAR_ADMIN_TOKEN"] = self.token
            env["BAZAR_CLUSTER_SECRET"] = self.secret
        out = open(os.path.join(self.data, "cluster.out"), "ab")  # noqa: SIM115
        try:
            ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if self.sigint_ignored else None
            self.proc = subprocess.Popen(self.argv(), env=env, cwd=self.data, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=ignore)
        finally:
            out.close()
        _RUNNING.append(self)
        if wait:
            self.wait_healthy(wait)
        return self

    def stop(self, term_wait: float = 15.0) -> None:
        if self.proc is not None:
            stop_group(self.proc, term_wait)
        if self in _RUNNING:
            _RUNNING.remove(self)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- health --
    def health(self, url: str) -> dict[str, Any] | None:
        return try_get_json(url + "/health", timeout=2.0)  # type: ignore[no-any-return]

    def healths(self, urls: Iterable[str] | None = None) -> dict[str, dict[str, Any] | None]:
        return {u: self.health(u) for u in (self.everyone if urls is None else urls)}

    def all_healthy(self) -> dict[str, dict[str, Any]] | None:
        """Every process answers status ok, each service has exactly one primary and
        every front end sees all replicas alive; None otherwise."""
        hs = self.healths()
        if any(h is None or h.get("status") != "ok" for h in hs.values()):
            return None
        for urls in (self.catalogs, self.orders):
            if [hs[u]["role"] for u in urls].count("primary") != 1:  # type: ignore[index]
                return None
        for u in self.fronts:
            h = hs[u]
            if not all(r["alive"] and r["ok"] for r in h["catalog"] + h["order"]):  # type: ignore[index]
                return None
        if self.redis and any(hs[u]["cache_bypass"] for u in self.fronts):  # type: ignore[index]
            return None
        return hs  # type: ignore[return-value]

    def wait_healthy(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        def check() -> dict[str, dict[str, Any]] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bazar-cluster exited with {self.proc.returncode}; see {self.data}/cluster.out")
            return self.all_healthy()
        try:
            return wait_until(check, timeout, "every bazar process healthy", interval=0.3)
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None

    def primary(self, service: str) -> tuple[str, dict[str, Any]]:
        urls = self.catalogs if service == "catalog" else self.orders
        for url in urls:
            h = self.health(url)
            if h and h.get("role") == "primary":
                return url, h
        raise AssertionError(f"no {service} primary")

    def wait_quiet(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """All healthy, and every replica of a service at the same last_seq twice in a row."""
        return wait_quiet(self.all_healthy, [self.catalogs, self.orders], timeout)

    # -- direct replica reads --
    def catalog_books(self, url: str) -> list[dict[str, Any]]:
        return get_json(url + "/books")  # type: ignore[no-any-return]

    def order_list(self, url: str) -> list[dict[str, Any]]:
        return get_json(url + "/orders", token=self.token)  # type: ignore[no-any-return]


# -- redis-server --------------------------------------------------------------

def wait_quiet(all_healthy: Callable[[], dict[str, dict[str, Any]] | None], groups: list[list[str]],
               timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until `all_healthy()` answers, and the replicas of each group (names in its
    answer) report the same last_seq, twice in a row; that answer."""
    previous: list[Any] = [None]

    def check() -> dict[str, dict[str, Any]] | None:
        hs = all_healthy()
        if hs is None:
            previous[0] = None
            return None
        seqs = tuple(tuple(hs[name]["last_seq"] for name in group) for group in groups)
        same = all(len(set(s)) == 1 for s in seqs)
        stable = same and previous[0] == seqs
        previous[0] = seqs if same else None
        return hs if stable else None

    return wait_until(check, timeout, "a quiet store (replicas at the same seq)", interval=0.4)


def redis_binary() -> str:
    path = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    assert os.path.exists(path), f"redis-server not found ({path}); install it or set REDIS_SERVER"
    return path


REDIS_PASSWORD = "test-redis-password"  # the tests' Redis asks for one, as a deployed one should


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        return bool(redis_command(port, "PING", timeout=timeout) == "PONG")
    except (OSError, ConnectionError):
        return False


@dataclass
class RedisServer:
    port: int
    workdir: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{REDIS_PASSWORD}@{HOST}:{self.port}"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        os.makedirs(self.workdir, exist_ok=True)
        out = open(os.path.join(self.workdir, "redis.out"), "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen([redis_binary(), "--port", str(self.port), "--bind", HOST,
                                          "--save", "", "--appendonly", "no", "--dir", self.workdir,
                                          "--requirepass", REDIS_PASSWORD],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            out.close()
        _RUNNING.append(self)
        wait_until(lambda: redis_ping(self.port), timeout, f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL our redis-server (by its PID) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self in _RUNNING:
            _RUNNING.remove(self)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self in _RUNNING:
            _RUNNING.remove(self)


def stop_everything() -> None:
    """Stop whatever this module started and is still running (session teardown)."""
    for thing in list(reversed(_RUNNING)):
        try:
            thing.stop()
        except Exception:  # noqa: S110 - best effort at the very end
            pass


# -- a minimal Redis (RESP) client, enough to watch the invalidation channel -----

def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RespReader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"-"):
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ValueError(f"unexpected RESP line {line!r}")


def redis_command(port: int, *args: str, timeout: float = 2.0, password: str | None = REDIS_PASSWORD) -> Any:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        reader = RespReader(s)
        if password is not None:
            s.sendall(_resp("AUTH", password))
            reader.read()
        s.sendall(_resp(*args))
        return reader.read()


class RedisWatcher:
    """SUBSCRIBE to a channel and collect the messages published on it."""

    def __init__(self, port: int, channel: str):
        self.sock = socket.create_connection((HOST, port), timeout=5.0)
        self.reader = RespReader(self.sock)
        self.sock.sendall(_resp("AUTH", REDIS_PASSWORD))
        self.reader.read()
        self.sock.sendall(_resp("SUBSCRIBE", channel))
        reply = self.reader.read()
        assert reply[0] == b"subscribe", reply

    def messages(self, within: float, until: Callable[[list[Any]], bool]) -> list[Any]:
        """Messages (parsed JSON) received within `within` seconds, stopping early
        once `until(messages)` holds."""
        got: list[Any] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and not until(got):
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                reply = self.reader.read()
            except TimeoutError:
                break
            if isinstance(reply, list) and reply[0] == b"message":
                got.append(json.loads(reply[2]))
        return got

    def close(self) -> None:
        self.sock.close()


# The seed catalog of DESIGN.md: id -> (title, topic, price, quantity).
SEED = {
    0: ("How to get a good grade in DOS in 40 minutes a day.", "distributed systems", 100.0, 85),
    1: ("RPCs for Noobs.", "distributed systems", 22.35, 60),
    2: ("Xen and the Art of Surviving Undergraduate School.", "undergraduate school", 50.0, 8),
    3: ("Cooking for the Impatient Undergrad.", "undergraduate school", 89.33, 65),
    4: ("How to finish Project 3 on time", "new", 70.0, 40),
    5: ("Why theory classes are so hard", "new", 100.0, 80),
    6: ("Spring in the Pioneer Valley", "new", 700.0, 90),
}


# The admin calls of DESIGN.md, each of which must refuse a caller without the token.
ADMIN_CALLS = [
    ("PUT", "/bazar/update_price/1", {"price": 30.5}),
    ("POST", "/bazar/restock/1", {"quantity": 5}),
    ("POST", "/bazar/books", {"title": "Unauthorised", "topic": "nope", "price": 1.0, "quantity": 1}),
    ("GET", "/bazar/orders", None),
    ("DELETE", "/bazar/cache/1", None),
]
