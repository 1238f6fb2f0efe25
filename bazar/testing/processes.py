"""Real Bazar processes on this machine, for the real-process tests and for
`bazar-bench --start`: loopback ports, a `twistd -n bazar-cluster` (`Cluster`), a
`redis-server` (`RedisServer`), named local processes (`Processes`), small urllib
HTTP helpers, a minimal Redis client, and bounded waits.

Nothing here loops without a deadline, and nothing signals a process this module did
not start itself: every process starts in a session of its own, so its process group
holds exactly what it started (a cluster's supervisor and the replicas it spawned). A
process is signalled through the Popen that started it, as a member of that group, or
as a descendant of it that /health named (and whose start time has not changed since).
Whatever is still running is stopped by `stop_everything`: a test session calls it at
its end, and this module registers it to run at interpreter exit too.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from bazar.testing.procfs import is_descendant, proc_stat

HOST = "127.0.0.1"
TOKEN = "test-admin-token"
SECRET = "test-cluster-secret"
TWISTD = "from twisted.scripts.twistd import run; run()"

T = TypeVar("T")


class Stoppable(Protocol):
    def stop(self) -> None: ...


# Everything started here (or handed to `track`) and not stopped yet.
_RUNNING: list[Stoppable] = []


def track(thing: Stoppable) -> None:
    """Have `stop_everything` stop `thing` if nothing else does."""
    if thing not in _RUNNING:
        _RUNNING.append(thing)


def untrack(thing: Stoppable) -> None:
    if thing in _RUNNING:
        _RUNNING.remove(thing)


def stop_everything() -> None:
    """Stop whatever was started here and is still running, newest first."""
    for thing in list(reversed(_RUNNING)):
        try:
            thing.stop()
        except Exception as exc:  # at the very end: say so, and go on with the others
            sys.stderr.write(f"could not stop {type(thing).__name__}: {type(exc).__name__}: {exc}\n")
        untrack(thing)


atexit.register(stop_everything)


class ClusterError(AssertionError):
    """A cluster exited, or was not healthy in time. An AssertionError, so that a test
    whose cluster does not come up fails rather than errs."""


# -- ports ---------------------------------------------------------------------

def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that can be bound now, chosen below the
    ephemeral range (outgoing connections never take them, so a replica restarted
    by the supervisor can bind its port again), and never handed out twice by this
    process."""
    low, _ = _ephemeral_range()
    top = min(low - 1, 32000)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    ports: list[int] = []
    for _ in range(2000):
        if len(ports) == count:
            break
        port = rng.randint(20000, top)
        if port in _handed_out or port in ports or not _bindable(port):
            continue
        ports.append(port)
    if len(ports) != count:
        raise RuntimeError(f"could not find {count} free loopback ports")
    _handed_out.update(ports)
    return ports


def consecutive_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports (front ends listen on
    frontend_port, frontend_port + 1, ...)."""
    for _ in range(200):
        base = free_ports(1)[0]
        rest = list(range(base + 1, base + count))
        if not (set(rest) & _handed_out) and all(_bindable(port) for port in rest):
            _handed_out.update(rest)
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


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


# -- processes -----------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    st = proc_stat(pid)
    return st is not None and st["state"] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid` (read from /proc), never this one."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        st = proc_stat(int(entry))
        if st is not None and st["pgid"] == pgid and st["state"] not in ("Z", "X"):
            members.append(int(entry))
    return members


def spawn(argv: list[str], output: str, *, env: dict[str, str] | None = None, cwd: str | None = None,
          preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own (its process group is then exactly what
    it starts), stdin from /dev/null, stdout and stderr appended to the file `output`."""
    with open(output, "ab") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec_fn)


def terminate(procs: Iterable[subprocess.Popen[bytes]], wait: float = 10.0) -> None:
    """SIGTERM each of `procs` still running (by its PID), give them `wait` seconds in
    all, then SIGKILL what is left; every one is reaped."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + wait
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def stop_group(proc: subprocess.Popen[bytes], term_wait: float = 15.0,
               also: Callable[[], set[int]] = set) -> set[int]:
    """SIGTERM the process group we created for `proc` (its session), wait up to
    `term_wait` seconds for `proc` to exit and the group to empty, then SIGKILL what
    is left of it and of the pids `also()` names; those pids that needed SIGKILL."""
    pgid = proc.pid

    def left() -> set[int]:
        return set(group_members(pgid)) | also()

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + term_wait
    while time.monotonic() < deadline:
        if proc.poll() is not None and not left():
            break
        time.sleep(0.1)
    killed = left()
    if killed or proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        for pid in killed:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return killed


def _set_pdeathsig() -> None:
    """In the child, before exec: get SIGTERM when the thread that started us ends (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _tail(path: str, lines: int) -> list[str] | None:
    """The last `lines` lines of a log (without Twisted's factory chatter); None if unreadable."""
    try:
        with open(path, errors="replace") as f:
            return [line for line in f if "ing factory" not in line][-lines:]
    except OSError:
        return None


# -- bazar-cluster ---------------------------------------------------------------

@dataclass(eq=False)
class Cluster:
    """One `twistd -n bazar-cluster` on loopback ports (free ones unless given), in a
    session of its own; its output goes to <data>/cluster.out, and each process logs
    to <data>/logs/.

    By default it runs as the tests want it: with TOKEN and SECRET in an environment
    holding no other BAZAR_ variable. `env` gives it another environment, and
    `env_secrets=False` leaves its secrets to that environment or to bazar-cluster,
    which then generates <data>/secrets.json (see `read_token`). `die_with_parent`
    has the kernel SIGTERM the supervisor when the thread that started it ends, and
    `progress` receives one line when it starts and when it stops. With `shared`, that
    many more front end processes listen on the first front end's port
    (`--shared-port-frontends`), every process on it also at its own port (`internals`).
    """

    data: str
    frontends: int = 1
    shared: int = 0
    internal_port: int = 0  # the first internal port, with `shared` (free ones unless given)
    redis: str | None = None
    env_secrets: bool = True
    extra_args: list[str] = field(default_factory=list)
    frontend_port: int = 0
    catalog_ports: list[int] = field(default_factory=list)
    order_ports: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    token: str | None = TOKEN
    secret: str = SECRET
    sigint_ignored: bool = False  # start it as a shell starts a background job
    name: str = "bazar-cluster"
    cache_size: int | None = None  # None: bazar-cluster's default
    env: dict[str, str] | None = field(default=None, repr=False)
    die_with_parent: bool = False
    progress: Callable[[str], None] | None = field(default=None, repr=False)
    # pid -> start time of every process of this cluster seen in /health, so that
    # stop() finds a replica even if it left the session
    known: dict[int, int] = field(default_factory=dict, repr=False)
    paused: set[int] = field(default_factory=set, repr=False)  # SIGSTOPped by `pause`, not resumed yet
    stopped: bool = False

    def __post_init__(self) -> None:
        if not self.catalog_ports:
            ports = free_ports(6)
            self.catalog_ports, self.order_ports = ports[:3], ports[3:6]
            self.frontend_port = consecutive_ports(self.frontends)
        if self.shared and not self.internal_port:
            self.internal_port = consecutive_ports(self.shared + 1)

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(f"cluster {self.name}: {line}")

    # -- addresses --
    @property
    def front(self) -> str:
        return self.fronts[0]

    @property
    def fronts(self) -> list[str]:
        return [f"http://{HOST}:{self.frontend_port + i}" for i in range(self.frontends)]

    @property
    def internals(self) -> list[str]:
        """Each front end process on the shared port, at its own port (none without `shared`)."""
        return [f"http://{HOST}:{self.internal_port + i}" for i in range(self.shared + 1)] if self.shared else []

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
        return self.replicas + self.fronts + self.internals

    def log(self, name: str) -> str:
        return os.path.join(self.data, "logs", name + ".log")

    @property
    def output(self) -> str:
        """The supervisor's stdout and stderr."""
        return os.path.join(self.data, "cluster.out")

    def tail_logs(self, lines: int = 25) -> str:
        """The end of every process log, for failure reports."""
        parts = []
        logs = os.path.join(self.data, "logs")
        names = sorted(os.listdir(logs)) if os.path.isdir(logs) else []
        for path in [self.output] + [os.path.join(logs, name) for name in names]:
            text = _tail(path, lines)
            if text is not None:
                parts.append(f"--- {os.path.normpath(path)}\n" + "".join(text))
        return "\n".join(parts)

    # -- lifecycle --
    def argv(self) -> list[str]:
        args = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "bazar-cluster", "--data", self.data,
                "--frontend-port", str(self.frontend_port),
                "--catalog-ports", ",".join(map(str, self.catalog_ports)),
                "--order-ports", ",".join(map(str, self.order_ports)),
                "--frontends", str(self.frontends)]
        if self.shared:
            args += ["--shared-port-frontends", str(self.shared), "--internal-port", str(self.internal_port)]
        if self.redis:
            args += ["--redis", self.redis]
        if self.cache_size is not None:
            args += ["--cache-size", str(self.cache_size)]
        return args + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(self.env) if self.env is not None else {
            k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.env_secrets:
            env["BAZAR_ADMIN_TOKEN"] = self.token or TOKEN
            env["BAZAR_CLUSTER_SECRET"] = self.secret
        return env

    def _child_setup(self) -> Callable[[], None] | None:
        ignore_sigint = self.sigint_ignored
        pdeathsig = self.die_with_parent and sys.platform.startswith("linux")
        if not (ignore_sigint or pdeathsig):
            return None

        def setup() -> None:
            if ignore_sigint:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            if pdeathsig:
                _set_pdeathsig()

        return setup

    def start(self, wait: float = 60.0) -> Cluster:
        """Start it; with `wait`, return once it is healthy (see `wait_healthy`)."""
        os.makedirs(self.data, exist_ok=True)
        self.proc = spawn(self.argv(), self.output, env=self.environment(), cwd=self.data,
                          preexec_fn=self._child_setup())
        self.stopped = False
        self.known.clear()
        self.paused.clear()
        track(self)
        self._say(f"started pid {self.proc.pid}, front end :{self.frontend_port}, catalog {self.catalog_ports}, "
                  f"order {self.order_ports}"
                  + (f", cache-size {self.cache_size}" if self.cache_size is not None else ""))
        if wait:
            self.wait_healthy(wait)
        return self

    def stop(self, term_wait: float = 15.0) -> None:
        """SIGTERM its session, and SIGKILL whatever of it (or of the processes seen in
        /health) is left `term_wait` seconds later. Stopping twice does nothing."""
        untrack(self)
        if self.proc is None or self.stopped:
            return
        self.stopped = True
        for pid in list(self.paused):  # a stopped process would take SIGTERM only once continued
            self.resume(pid)
        killed = stop_group(self.proc, term_wait, also=self._known_alive)
        if killed:
            self._say(f"killed {len(killed)} leftover process(es) {term_wait:.0f}s after SIGTERM")
        rc = self.proc.returncode
        self._say(f"stopped ({'SIGTERM' if rc == -signal.SIGTERM else f'exit status {rc}'})")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- its processes --
    def owns(self, pid: int | None) -> bool:
        """Whether `pid` descends from this cluster's supervisor (the supervisor itself does not count)."""
        return self.proc is not None and is_descendant(pid, self.proc.pid)

    def remember(self, pid: Any) -> None:
        """Note a pid seen in /health, if it is one of ours, so that stop() finds it."""
        if isinstance(pid, int) and self.owns(pid):
            st = proc_stat(pid)
            if st is not None:
                self.known[pid] = st["starttime"]

    def _known_alive(self) -> set[int]:
        """The remembered pids still running as the same process (same start time)."""
        alive = set()
        for pid, start in self.known.items():
            st = proc_stat(pid)
            if st is not None and st["starttime"] == start and st["state"] not in ("Z", "X"):
                alive.add(pid)
        return alive

    def _signal(self, pid: Any, sig: signal.Signals) -> bool:
        """Send `sig` to a process of this cluster (never the supervisor, never another process)."""
        if not isinstance(pid, int) or self.proc is None or pid in (os.getpid(), self.proc.pid):
            return False
        if not self.owns(pid):
            return False
        try:
            os.kill(pid, sig)
        except OSError:
            return False
        return True

    def kill(self, pid: Any) -> bool:
        """kill -9 a process of this cluster (never the supervisor, never another process)."""
        return self._signal(pid, signal.SIGKILL)

    def pause(self, pid: Any) -> bool:
        """SIGSTOP a process of this cluster; `resume` (or `stop`, which resumes it
        first so that it can take SIGTERM) sends SIGCONT."""
        if not self._signal(pid, signal.SIGSTOP):
            return False
        self.paused.add(pid)
        return True

    def resume(self, pid: Any) -> bool:
        """SIGCONT a process `pause` stopped."""
        self.paused.discard(pid)
        return self._signal(pid, signal.SIGCONT)

    def wipe(self, pid: Any, name: str, timeout: float = 2.0) -> str | None:
        """Lose the data of the paused replica `name` (catalog-1, ...): its data directory
        is moved aside while it cannot write (stopped, and holding the directory's lock
        file that names its pid), then it is killed with SIGKILL; the supervisor
        restarts it on an empty directory. The directory moved aside, or None when any
        check fails (then nothing was moved or killed)."""
        if pid not in self.paused or not self.owns(pid):
            return None
        service = name.split("-", 1)[0]
        data = os.path.join(self.data, name)
        try:
            with open(os.path.join(data, f"bazar-{service}.lock")) as f:
                holder = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return None
        deadline = time.monotonic() + timeout
        while (st := proc_stat(pid)) is not None and st["state"] != "T" and time.monotonic() < deadline:
            time.sleep(0.01)  # (SIGSTOP takes effect at the process's next return to user space)
        if holder != pid or st is None or st["state"] != "T":
            return None
        aside = f"{data}.wiped-{time.time_ns()}"
        os.rename(data, aside)
        self.paused.discard(pid)
        self._signal(pid, signal.SIGKILL)
        return aside

    def read_token(self) -> str | None:
        """The admin token it runs with: the one its environment gives it, else the one
        bazar-cluster generated into <data>/secrets.json; kept in `token`."""
        token = self.environment().get("BAZAR_ADMIN_TOKEN")
        if not token:
            try:
                with open(os.path.join(self.data, "secrets.json")) as f:
                    token = json.load(f).get("admin_token")
            except (OSError, ValueError, AttributeError):
                token = None
        self.token = token if isinstance(token, str) else None
        return self.token

    # -- health --
    def health(self, url: str) -> dict[str, Any] | None:
        h = try_get_json(url + "/health", timeout=2.0)
        return h if isinstance(h, dict) else None

    def healths(self, urls: Iterable[str] | None = None) -> dict[str, dict[str, Any] | None]:
        return {u: self.health(u) for u in (self.everyone if urls is None else urls)}

    def all_healthy(self) -> dict[str, dict[str, Any]] | None:
        """Every process answers status ok, each service has exactly one primary and
        every front end sees all replicas alive; None otherwise."""
        hs = self.healths()
        good = {u: h for u, h in hs.items() if h is not None and h.get("status") == "ok"}
        if len(good) != len(hs):
            return None
        for urls in (self.catalogs, self.orders):
            if [good[u]["role"] for u in urls].count("primary") != 1:
                return None
        for u in self.fronts + self.internals:
            h = good[u]
            if not all(r["alive"] and r["ok"] for r in h["catalog"] + h["order"]):
                return None
        if self.redis and any(good[u]["cache_bypass"] for u in self.fronts + self.internals):
            return None
        return good

    def wait_healthy(self, timeout: float = 60.0, serving: bool = False) -> dict[str, dict[str, Any]]:
        """Wait until `all_healthy` (and, with `serving`, until the front end answers a
        book's info); remember every pid /health named. ClusterError if it exits or
        times out."""
        def check() -> dict[str, dict[str, Any]] | None:
            if self.proc is not None and self.proc.poll() is not None:
                # not an AssertionError: wait_until would take that for "not yet"
                raise RuntimeError(f"cluster {self.name} exited with status {self.proc.returncode}")
            hs = self.all_healthy()
            if hs is None or (serving and try_get_json(self.front + "/bazar/info/0") is None):
                return None
            return hs

        try:
            hs = wait_until(check, timeout, f"every process of cluster {self.name} healthy", interval=0.25)
        except RuntimeError as exc:
            raise ClusterError(f"{exc}; log tail:\n{self._output_tail()}") from None
        except AssertionError:
            states = {u: h and (h.get("service"), h.get("role"), h.get("status")) for u, h in self.healths().items()}
            raise ClusterError(f"cluster {self.name} not ready after {timeout:.0f}s: {states}\n"
                               f"log tail:\n{self._output_tail()}") from None
        for h in hs.values():
            self.remember(h.get("pid"))
        return hs

    def _output_tail(self, lines: int = 25) -> str:
        text = _tail(self.output, lines)
        return "(no output)" if text is None else "".join(text)

    def find_primary(self, service: str) -> tuple[str, dict[str, Any]] | None:
        """(url, /health) of the replica of `service` that claims to be primary in the
        highest epoch, or None."""
        best: tuple[str, dict[str, Any]] | None = None
        for url in self.catalogs if service == "catalog" else self.orders:
            h = self.health(url)
            if (h and h.get("role") == "primary" and h.get("service") == service
                    and (best is None or (h.get("epoch") or 0) > (best[1].get("epoch") or 0))):
                best = (url, h)
        return best

    def primary(self, service: str) -> tuple[str, dict[str, Any]]:
        found = self.find_primary(service)
        if found is None:
            raise AssertionError(f"no {service} primary")
        return found

    def wait_quiet(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """All healthy, and every replica of a service at the same last_seq twice in a row."""
        return wait_quiet(self.all_healthy, [self.catalogs, self.orders], timeout)

    # -- direct replica reads --
    def catalog_books(self, url: str) -> list[dict[str, Any]]:
        books: list[dict[str, Any]] = get_json(url + "/books")
        return books

    def order_list(self, url: str) -> list[dict[str, Any]]:
        orders: list[dict[str, Any]] = get_json(url + "/orders", token=self.token)
        return orders


# -- named local processes -------------------------------------------------------

class Processes:
    """Local processes started one by one with their own argv, environment and working
    directory, each logging to <cwd>/<name>.log; stopped by PID, never by name."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes], str]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: str | os.PathLike[str]) -> None:
        log = os.path.join(cwd, f"{name}.log")
        self.started.append((name, spawn(argv, log, env=env, cwd=os.fspath(cwd)), log))
        track(self)

    def exited(self) -> list[str]:
        return [name for name, process, _ in self.started if process.poll() is not None]

    def logs(self, last: int = 30) -> str:
        parts = []
        for name, process, log in self.started:
            lines = _tail(log, last) or []
            parts.append(f"--- {name} (pid {process.pid}, rc {process.poll()})\n" + "".join(lines))
        return "\n".join(parts)

    def stop(self, wait: float = 10.0) -> None:
        """SIGTERM each (by its PID), and SIGKILL those still running `wait` seconds later."""
        untrack(self)
        terminate((process for _, process, _ in self.started), wait)


# -- redis-server --------------------------------------------------------------

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


@dataclass(eq=False)
class RedisServer:
    port: int
    workdir: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{REDIS_PASSWORD}@{HOST}:{self.port}"

    def start(self, timeout: float = 15.0) -> RedisServer:
        os.makedirs(self.workdir, exist_ok=True)
        self.proc = spawn([redis_binary(), "--port", str(self.port), "--bind", HOST,
                           "--save", "", "--appendonly", "no", "--dir", self.workdir,
                           "--requirepass", REDIS_PASSWORD], os.path.join(self.workdir, "redis.out"))
        track(self)
        wait_until(lambda: redis_ping(self.port), timeout, f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL our redis-server (by its PID) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        untrack(self)

    def stop(self) -> None:
        if self.proc is not None:
            terminate([self.proc])
        untrack(self)


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
    ("POST", "/bazar/books/import", [{"title": "Unauthorised", "topic": "nope", "price": 1.0, "quantity": 1}]),
    ("GET", "/bazar/orders", None),
    ("DELETE", "/bazar/cache/1", None),
]
