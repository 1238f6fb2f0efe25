"""Fault injection for real-process tests: a store of separately started processes
whose every connection to another process goes through a TCP proxy owned by the
test, so that links can be cut (one way or both), slowed, and processes paused.

- `Link`: one TCP proxy for one *directed* link "a calls b". Every connection a opens
  to b, and b's answers on it, pass through it. `cut("refuse")` resets the open
  connections and resets every new one at once (the caller sees a refused or reset
  connection); `cut("drop")` keeps accepting but forwards nothing any more, either
  way (the caller sees a timeout, as behind a silent firewall); `heal()` forwards
  again; `delay` holds every chunk back that long. A cut of a→b leaves b→a working:
  that is the one-way cut. (Cutting a→b also stops b's answers to a's calls, since
  they travel on a's connections; b's own calls to a are untouched.)
- `Network`: all links of a store, and partitions built from them: `isolate` (from
  the replicas of its own service only, or from everyone), `cut_one_way`, `heal_all`.
- `Node`: one twistd process started by the test, stopped, paused (SIGSTOP) and
  resumed (SIGCONT) by the PID of the Popen that started it, and nothing else.
- `Store`: 3 catalog + 3 order replicas + front ends, each with its own data
  directory and log, wired through the proxies; started and stopped as a whole.
- `PrimaryWatch`: polls every replica's /health about every 100 ms and records who
  claimed to be primary in which epoch.

The proxies run on one asyncio event loop in a background thread of the test
process; the test thread drives them through thread-safe calls. Everything listens
on 127.0.0.1 only, every wait has a deadline, and every loop a bound.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bazar.testing import processes
from bazar.testing.processes import HOST, SECRET, TOKEN, TWISTD, free_ports, pid_alive, try_get_json, wait_until

REFUSE = "refuse"
DROP = "drop"
MODES = (REFUSE, DROP)
SERVICES = ("catalog", "order")
REPLICAS = 3
_MAX_BUFFER = 64 * 1024 * 1024  # bytes a proxy holds for a slow reader before it gives up on the connection


# -- the event loop of the proxies ----------------------------------------------

class ProxyLoop:
    """An asyncio event loop in a daemon thread, and a way to run work on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # Resets and refusals are what the proxies are for: asyncio reports them through
        # connection_lost. Anything else reaching the handler is a fault of the harness,
        # kept for the test to report.
        self.errors: list[str] = []
        self.loop.set_exception_handler(self._exception)
        self.thread = threading.Thread(target=self._run, name="fault-proxies", daemon=True)
        self.thread.start()

    def _exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            self.errors.append(f"{context.get('message')}: {exc!r}"[:500])

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run `fn` on the loop's thread and return its result (a coroutine is awaited)."""
        async def runner() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result
        future = asyncio.run_coroutine_threadsafe(runner(), self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close a connection with a TCP reset, as a refusing or vanished host would."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    else:
        transport.close()


class _Half(asyncio.Protocol):
    """One side of a proxied connection; what it receives goes to the other side."""

    def __init__(self, conn: _Connection, downstream: bool):
        self.conn = conn
        self.downstream = downstream  # True: the caller's side; False: the callee's
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.downstream:
            self.conn.accepted(self)
        else:
            self.conn.connected(self)

    def data_received(self, data: bytes) -> None:
        self.conn.forward(self, data)

    def eof_received(self) -> bool:
        self.conn.eof(self)
        return True  # keep the other direction open (HTTP servers half-close after a refusal)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost()


class _Connection:
    """A caller's connection through a link, and the proxy's own to the callee.

    Directions are named by a bool: True carries the caller's bytes to the callee,
    False the callee's answers back. Flow control is left out on purpose: the
    messages of a test store are small, and a reader that falls _MAX_BUFFER behind
    gets its connection reset instead.
    """

    def __init__(self, link: Link):
        self.link = link
        self.down: _Half | None = None
        self.up: _Half | None = None
        self.pending: list[bytes] = []  # from the caller, before the callee's side is connected
        self.blackholed = False
        self.closed = False
        self.ended: set[bool] = set()  # directions whose sender has finished (EOF)
        self.eof_after_queue: set[bool] = set()
        # Delayed chunks per direction, released in order.
        self.queues: dict[bool, collections.deque[tuple[float, bytes]]] = {
            True: collections.deque(), False: collections.deque()}
        self.timers: dict[bool, asyncio.TimerHandle | None] = {True: None, False: None}

    def accepted(self, down: _Half) -> None:
        self.down = down
        link = self.link
        if link.mode == REFUSE:
            self.close(reset=True)
            return
        link.connections.add(self)
        if link.mode == DROP:
            self.blackholed = True  # accepted, then silence: the caller times out
            return
        link.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await asyncio.wait_for(self.link.loop.create_connection(
                lambda: _Half(self, False), HOST, self.link.target_port), timeout=5.0)
        except (OSError, asyncio.TimeoutError):
            self.close(reset=True)  # the callee refuses (or is gone, or paused): so do we

    def connected(self, up: _Half) -> None:
        """The callee's side is up: pass on what the caller sent meanwhile."""
        if self.closed:
            if up.transport is not None:
                up.transport.close()
            return
        self.up = up
        pending, self.pending = self.pending, []
        for data in pending:
            self._send(True, data)
        if True in self.ended:
            self._end(True)

    def forward(self, source: _Half, data: bytes) -> None:
        if self.closed or self.blackholed:
            return  # a dropping link swallows everything, both ways
        if source.downstream and self.up is None:
            self.pending.append(data)
            if sum(map(len, self.pending)) > _MAX_BUFFER:
                self.close(reset=True)
            return
        self._send(source.downstream, data)

    def _send(self, direction: bool, data: bytes) -> None:
        delay = self.link.delay
        queue = self.queues[direction]
        if delay <= 0 and not queue:
            self._write(direction, data)
            return
        loop = self.link.loop
        due = loop.time() + delay
        if queue:
            due = max(due, queue[-1][0])  # never overtake an earlier chunk
        queue.append((due, data))
        if self.timers[direction] is None:
            self.timers[direction] = loop.call_at(queue[0][0], self._release, direction)

    def _release(self, direction: bool) -> None:
        self.timers[direction] = None
        queue = self.queues[direction]
        loop = self.link.loop
        while queue and queue[0][0] <= loop.time():
            self._write(direction, queue.popleft()[1])
        if queue:
            if not self.closed:
                self.timers[direction] = loop.call_at(queue[0][0], self._release, direction)
        elif direction in self.eof_after_queue:
            self.eof_after_queue.discard(direction)
            self._write_eof(direction)

    def _side(self, direction: bool) -> asyncio.Transport | None:
        side = self.up if direction else self.down
        if side is None or side.transport is None or side.transport.is_closing():
            return None
        return side.transport

    def _write(self, direction: bool, data: bytes) -> None:
        if self.closed or self.blackholed:
            return
        transport = self._side(direction)
        if transport is None:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > _MAX_BUFFER:
            self.close(reset=True)

    def eof(self, source: _Half) -> None:
        direction = source.downstream  # the caller finished sending: towards the callee
        self.ended.add(direction)
        if self.blackholed or self.closed:
            return
        if direction and self.up is None:
            return  # passed on by `connected`
        self._end(direction)
        if len(self.ended) == 2:
            self._close_when_sent()

    def _end(self, direction: bool) -> None:
        if self.queues[direction]:
            self.eof_after_queue.add(direction)
        else:
            self._write_eof(direction)

    def _write_eof(self, direction: bool) -> None:
        transport = self._side(direction)
        if transport is not None:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def lost(self) -> None:
        # One side is gone: the other gets what is already on its way, then the end.
        if not self.closed:
            self._close_when_sent()

    def _close_when_sent(self) -> None:
        if any(self.queues.values()) and not self.blackholed:
            # bounded by the link's delay: the last chunk is due by then
            self.link.loop.call_later(max(0.0, self.link.delay) + 0.05, self.close)
        else:
            self.close()

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.link.connections.discard(self)
        for timer in self.timers.values():
            if timer is not None:
                timer.cancel()
        for side in (self.down, self.up):
            if side is None or side.transport is None:
                continue
            if reset:
                _reset(side.transport)
            else:
                side.transport.close()  # after what is buffered


class Link:
    """A TCP proxy for the directed link src -> dst (src calls dst)."""

    def __init__(self, loop: ProxyLoop, src: str, dst: str, target_port: int):
        self.proxies = loop
        self.loop = loop.loop
        self.src = src
        self.dst = dst
        self.target_port = target_port
        self.mode = "open"
        self.delay = 0.0
        self.connections: set[_Connection] = set()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    def __repr__(self) -> str:
        return f"Link({self.src}->{self.dst} :{self.port}->:{self.target_port} {self.mode})"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _listen(self) -> None:
        # Port 0: the kernel picks a free port, which stays ours while we listen (it is
        # never handed to an outgoing connection), so no other process can take it.
        self.server = await self.loop.create_server(lambda: _Half(_Connection(self), True), HOST, 0,
                                                    reuse_address=True, backlog=128)
        self.port = self.server.sockets[0].getsockname()[1]

    def start(self) -> Link:
        self.proxies.call(self._listen)
        return self

    def cut(self, mode: str = REFUSE) -> None:
        """Stop the link: reset its connections and every new one ("refuse"), or keep
        them open and silently swallow everything ("drop")."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")

        def do() -> None:
            self.mode = mode
            for conn in list(self.connections):
                if mode == REFUSE:
                    conn.close(reset=True)
                else:
                    conn.blackholed = True
        self.proxies.call(do)

    def heal(self) -> None:
        """Forward again. Connections that were swallowing data lost part of their
        stream, so they are reset (their callers timed out on them long ago)."""
        def do() -> None:
            self.mode = "open"
            for conn in list(self.connections):
                if conn.blackholed:
                    conn.close(reset=True)
        self.proxies.call(do)

    def set_delay(self, seconds: float) -> None:
        def do() -> None:
            self.delay = max(0.0, seconds)
        self.proxies.call(do)

    def close(self) -> None:
        def do() -> None:
            if self.server is not None:
                self.server.close()
            for conn in list(self.connections):
                conn.close(reset=True)
        try:
            self.proxies.call(do, timeout=5.0)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass  # the loop is already gone


# -- the network of a store ------------------------------------------------------

@dataclass
class Event:
    """One thing the nemesis did, for the report and for failover figures."""

    at: float  # time.monotonic()
    what: str
    services: tuple[str, ...] = ()


class Network:
    """Every directed link of a store, by (src, dst) node name."""

    def __init__(self) -> None:
        self.proxies = ProxyLoop()
        self.links: dict[tuple[str, str], Link] = {}
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def add(self, src: str, dst: str, target_port: int) -> Link:
        link = Link(self.proxies, src, dst, target_port).start()
        self.links[(src, dst)] = link
        return link

    def url(self, src: str, dst: str) -> str:
        return self.links[(src, dst)].url

    def note(self, what: str, services: Iterable[str] = ()) -> Event:
        event = Event(time.monotonic(), what, tuple(services))
        with self.lock:
            self.events.append(event)
        return event

    def cut(self, src: str, dst: str, mode: str = REFUSE) -> None:
        self.links[(src, dst)].cut(mode)

    def cut_one_way(self, src: str, dst: str, mode: str = REFUSE) -> None:
        """src can no longer call dst; dst still calls src."""
        self.cut(src, dst, mode)

    def cut_both(self, a: str, b: str, mode: str = REFUSE) -> None:
        self.cut(a, b, mode)
        self.cut(b, a, mode)

    def cut_between(self, a: str, b: str, mode: str = REFUSE) -> list[Link]:
        """Cut whichever links exist between a and b (an order replica never calls a
        front end, for instance)."""
        cut = [link for key, link in self.links.items() if key in ((a, b), (b, a))]
        for link in cut:
            link.cut(mode)
        return cut

    def isolate(self, node: str, *, peers_only: bool = True, mode: str = REFUSE) -> list[Link]:
        """Cut every link between `node` and the other replicas of its service, both
        ways; with peers_only=False, every link to and from it (front ends and the
        other service too). Returns the links cut."""
        service = _service_of(node)
        cut = [link for (src, dst), link in self.links.items()
               if node in (src, dst) and (not peers_only or _service_of(src) == _service_of(dst) == service)]
        for link in cut:
            link.cut(mode)
        return cut

    def heal_all(self) -> None:
        for link in self.links.values():
            if link.mode != "open" or link.delay:
                link.heal()
                link.set_delay(0.0)

    def cut_links(self) -> list[Link]:
        return [link for link in self.links.values() if link.mode != "open"]

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.proxies.close()


def _service_of(node: str) -> str:
    return node.rsplit("-", 1)[0]


# -- processes ---------------------------------------------------------------------

@dataclass
class Node:
    """One twistd process of the store, started and signalled by the test only."""

    name: str
    service: str  # catalog | order | frontend
    ident: int
    port: int
    data: str
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def url(self) -> str:
        """The process's own port (the test talks to it directly, never through a proxy)."""
        return f"http://{HOST}:{self.port}"

    @property
    def log(self) -> str:
        return os.path.join(self.data, "twistd.log")

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        os.makedirs(self.data, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")}
        # The processes stop by themselves within a second if this test process dies
        # (even by kill -9): no replica outlives the test.
        env.update(BAZAR_ADMIN_TOKEN=TOKEN, BAZAR_CLUSTER_SECRET=SECRET, BAZAR_PARENT_PID=str(os.getpid()),
                   PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", f"--logfile={self.log}",
                f"bazar-{self.service}", "--host", HOST, "--port", str(self.port), *self.args]
        self.proc = processes.spawn(argv, os.path.join(self.data, "stdout.txt"), env=env, cwd=self.data)

    def _signal(self, sig: signal.Signals) -> bool:
        # Only the process we started, and only while it is ours (not yet reaped).
        if self.proc is None or self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, sig)
        return True

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing, sends nothing."""
        if self._signal(signal.SIGSTOP):
            self.paused = True

    def resume(self) -> None:
        if self._signal(signal.SIGCONT):
            self.paused = False

    def begin_stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGCONT)  # a stopped process would hold SIGTERM pending
        self.paused = False
        self._signal(signal.SIGTERM)

    def finish_stop(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log, errors="replace") as f:
                text = [line for line in f if "ing factory" not in line][-lines:]
        except OSError:
            return f"--- {self.name}: no log\n"
        return f"--- {self.name} (pid {self.proc.pid if self.proc else '?'}) {self.log}\n" + "".join(text)


class Store:
    """3 catalog + 3 order replicas and `frontends` front ends, each a process of its
    own with its own data directory, every process-to-process link through its own
    proxy:

    - catalog i -> catalog j and order i -> order j (replication, votes, forwarding);
    - front end -> each catalog and each order replica;
    - order i -> each catalog replica (the purchase's stock decrement);
    - catalog i -> each front end (the invalidation push).
    """

    def __init__(self, root: str, frontends: int = 1):
        self.root = root
        self.net = Network()
        self.nodes: dict[str, Node] = {}
        self.started = False
        ports = free_ports(2 * REPLICAS + frontends)
        names = [f"{s}-{i}" for s in SERVICES for i in range(1, REPLICAS + 1)]
        names += [f"frontend-{i}" for i in range(1, frontends + 1)]
        for name, port in zip(names, ports):
            service, ident = name.rsplit("-", 1)
            self.nodes[name] = Node(name, service, int(ident), port, os.path.join(root, name))
        try:
            self._wire()
        except BaseException:
            self.net.close()
            raise

    # -- who is who --
    def of(self, service: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.service == service]

    @property
    def catalogs(self) -> list[Node]:
        return self.of("catalog")

    @property
    def orders(self) -> list[Node]:
        return self.of("order")

    @property
    def frontends(self) -> list[Node]:
        return self.of("frontend")

    @property
    def replicas(self) -> list[Node]:
        return self.catalogs + self.orders

    @property
    def front(self) -> str:
        return self.frontends[0].url

    def _wire(self) -> None:
        net = self.net
        for a in self.replicas + self.frontends:
            for b in self.replicas + self.frontends:
                if a is b:
                    continue
                wanted = (a.service == b.service != "frontend"
                          or (a.service == "frontend" and b.service in SERVICES)
                          or (a.service == "order" and b.service == "catalog")
                          or (a.service == "catalog" and b.service == "frontend"))
                if wanted:
                    net.add(a.name, b.name, b.port)
        for node in self.replicas:
            # A replica's own entry is its real port (it never calls itself).
            peers = ",".join(f"{p.ident}={p.url if p is node else net.url(node.name, p.name)}"
                             for p in self.of(node.service))
            node.args = ["--id", str(node.ident), "--peers", peers, "--data", node.data]
            if node.service == "catalog":
                node.args += ["--frontends", ",".join(net.url(node.name, f.name) for f in self.frontends)]
            else:
                node.args += ["--catalog", ",".join(net.url(node.name, c.name) for c in self.catalogs)]
        for fe in self.frontends:
            fe.args = ["--catalog", ",".join(net.url(fe.name, c.name) for c in self.catalogs),
                       "--order", ",".join(net.url(fe.name, o.name) for o in self.orders)]

    # -- lifecycle --
    def start(self, wait: float = 60.0) -> Store:
        processes.track(self)  # the session's safety net stops us too
        self.started = True
        for node in self.nodes.values():
            node.start()
        self.wait_healthy(wait)
        for node in self.nodes.values():
            health = self.health(node)
            assert health is not None and health["pid"] == node.pid, f"{node.name}: /health pid is not ours"
        return self

    def stop(self) -> None:
        """Stop every process (resumed first if paused), then close the proxies."""
        deadline = time.monotonic() + 10.0
        for node in self.nodes.values():
            node.begin_stop()
        for node in self.nodes.values():
            node.finish_stop(deadline)
        self.net.close()
        processes.untrack(self)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def leftovers(self) -> list[str]:
        """Processes of ours still alive (should be none after stop)."""
        return [n.name for n in self.nodes.values() if n.proc is not None and pid_alive(n.proc.pid)]

    def tail_logs(self, lines: int = 30) -> str:
        return "\n".join(n.tail(lines) for n in self.nodes.values())

    # -- health --
    def health(self, node: Node, timeout: float = 2.0) -> dict[str, Any] | None:
        return try_get_json(node.url + "/health", timeout=timeout)

    def all_healthy(self) -> dict[str, dict[str, Any]] | None:
        """Every process answers, every replica is ok, each service has exactly one
        primary, and every front end sees every replica alive and ok; else None."""
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is not None:
                # not an AssertionError: wait_until would take that for "not yet"
                raise RuntimeError(f"{node.name} exited with {node.proc.returncode}:\n{node.tail()}")
        hs = {name: self.health(node) for name, node in self.nodes.items()}
        if any(h is None for h in hs.values()):
            return None
        good: dict[str, dict[str, Any]] = {k: v for k, v in hs.items() if v is not None}
        for node in self.replicas:
            if good[node.name].get("status") != "ok":
                return None
        for service in SERVICES:
            if [good[n.name]["role"] for n in self.of(service)].count("primary") != 1:
                return None
        for fe in self.frontends:
            view = good[fe.name]
            if not all(r["alive"] and r["ok"] for r in view["catalog"] + view["order"]):
                return None
        return good

    def wait_healthy(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        try:
            return wait_until(self.all_healthy, timeout, "every process healthy, one primary per service",
                              interval=0.3)
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None

    def wait_quiet(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Healthy, and every replica of a service at the same last_seq twice in a row."""
        try:
            return processes.wait_quiet(self.all_healthy, [[n.name for n in self.of(s)] for s in SERVICES], timeout)
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None

    def primary(self, service: str) -> Node | None:
        """The replica of `service` claiming to be primary in the highest epoch."""
        best: tuple[int, Node] | None = None
        for node in self.of(service):
            h = self.health(node, timeout=1.0)
            if h and h.get("role") == "primary" and (best is None or int(h["epoch"]) > best[0]):
                best = (int(h["epoch"]), node)
        return best[1] if best else None

    def wait_primary(self, service: str, timeout: float = 15.0) -> Node:
        found: Node = wait_until(lambda: self.primary(service), timeout, f"a {service} primary")
        return found


# -- watching the primaries ----------------------------------------------------------

@dataclass
class Sighting:
    at: float
    service: str
    replica: int
    role: str
    epoch: int
    status: str
    last_seq: int


class PrimaryWatch:
    """One thread per replica polls its /health about every `interval` seconds (a
    paused replica then only stalls its own thread), recording every answer."""

    def __init__(self, store: Store, interval: float = 0.1):
        self.store = store
        self.interval = interval
        self.stop_event = threading.Event()
        self.sightings: list[Sighting] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._poll, args=(node,), daemon=True, name=f"watch-{node.name}")
                        for node in store.replicas]

    def start(self) -> PrimaryWatch:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=5)

    def _poll(self, node: Node) -> None:
        # Bounded: at most one poll per interval for at most an hour.
        for _ in range(int(3600 / self.interval)):
            if self.stop_event.is_set():
                return
            started = time.monotonic()
            h = try_get_json(node.url + "/health", timeout=0.5)
            if h is not None:
                s = Sighting(time.monotonic(), str(h["service"]), int(h["replica"]), str(h["role"]),
                             int(h["epoch"]), str(h["status"]), int(h.get("last_seq", 0)))
                with self.lock:
                    self.sightings.append(s)
            self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def primaries_by_epoch(self) -> dict[tuple[str, int], set[int]]:
        """(service, epoch) -> the replicas seen claiming to be its primary."""
        seen: dict[tuple[str, int], set[int]] = collections.defaultdict(set)
        with self.lock:
            for s in self.sightings:
                if s.role == "primary":
                    seen[(s.service, s.epoch)].add(s.replica)
        return dict(seen)

    def election_seconds(self, service: str, start: float) -> float | None:
        """From `start` to the first sighting of a primary of `service` in an epoch
        newer than any seen before `start` (None: no new primary was seen)."""
        with self.lock:
            sightings = sorted((s for s in self.sightings if s.service == service), key=lambda s: s.at)
        before = max((s.epoch for s in sightings if s.at < start), default=0)
        for s in sightings:
            if s.at >= start and s.role == "primary" and s.epoch > before:
                return round(s.at - start, 2)
        return None

    def deposed_primaries(self) -> dict[str, float]:
        """How long each deposed primary kept saying "primary" while a replica of its
        service was already primary in a newer epoch: "service replica epoch" ->
        seconds between the first and the last such sighting (the timing is not
        exact: the polls are ~100 ms apart and a paused replica is not polled)."""
        with self.lock:
            sightings = sorted(self.sightings, key=lambda s: s.at)
        latest: dict[tuple[str, int], Sighting] = {}
        spans: dict[str, tuple[float, float]] = {}
        for s in sightings:
            latest[(s.service, s.replica)] = s
            if s.role != "primary":
                continue
            newer = [x for (svc, rid), x in latest.items()
                     if svc == s.service and rid != s.replica and x.role == "primary" and x.epoch > s.epoch
                     and s.at - x.at < 1.0]
            if newer:
                name = f"{s.service}-{s.replica} epoch {s.epoch}"
                first, _ = spans.get(name, (s.at, s.at))
                spans[name] = (first, s.at)
        return {name: round(last - first, 2) for name, (first, last) in spans.items()}
