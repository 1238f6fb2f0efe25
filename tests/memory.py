"""In-memory wiring for Bazar's unit tests: no sockets, no sleeping.

- `Network` is one `treq.testing.RequestTraversalAgent` (the agent behind
  `StubTreq`) over a router resource that picks the app by the port of the URL
  (`request.getHost().port`). Each process gets its own `HTTPClient` (`client()`),
  so a replica can be "killed" (its port refuses and its in-flight exchanges are
  dropped), two replicas partitioned from each other (`cut`, or one way: `block`),
  or a port's answers held back (`hold`/`release`) to stage a race. With a
  `latency`, every request leaves that many (Clock) seconds after it is made.
- `Cluster` is N replicas of one service over such a network, driven by a
  `task.Clock`: `run(seconds)` advances time in small steps, ticks every live
  replica (their election clocks) and delivers every pending byte.
- `Shop` is a whole front end -> order -> catalog chain, one replica each.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent, IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from bazar.balancer import ReplicaSet
from bazar.cache import LRUCache
from bazar.catalog import CatalogMachine, catalog_app
from bazar.frontend import Frontend, frontend_app
from bazar.invalidation import InvalidationStream, Publisher
from bazar.order import OrderMachine, Purchases, order_app
from bazar.replication import Replica
from bazar.store import Store
from bazar.web import JsonApp, error_body

SECRET = "cluster-secret-for-tests"
TOKEN = "admin-token-for-tests"
HOST = "127.0.0.1"


def url_of(port: int) -> str:
    return f"http://{HOST}:{port}"


class Router(Resource):
    """The server side of the whole network: dispatch on the port that was dialled."""

    isLeaf = True

    def __init__(self, network: Network):
        super().__init__()
        self.network = network

    def render(self, request: Any) -> Any:
        port = request.getHost().port
        app = self.network.apps.get(port)
        if app is None:  # the gate refuses these; reaching here is a harness bug
            request.setResponseCode(599)
            return error_body(f"nothing listens on {port}")
        return app.render(request)


@implementer(IAgent)
class Gate:
    """One process's outgoing HTTP: refused when the target (or the caller) is down
    or the two are partitioned, else handed to the in-memory traversal agent."""

    def __init__(self, network: Network, source: int | None):
        self.network = network
        self.source = source

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        port = urlsplit(uri.decode()).port or 80
        network = self.network
        if not network.reachable(self.source, port):
            return fail(ConnectionRefusedError(f"port {port} refused"))
        if port in network.held:
            # the exchange happens now; its answer reaches the caller on release()
            answer: Deferred[Any] = Deferred()
            inner = network.agent.request(method, uri, headers, bodyProducer)
            inner.addBoth(lambda result: network.parked.append((port, answer, result)))
            return answer
        if network.latency and network.clock is not None:
            # the request leaves after `latency` (and is refused if the target died meanwhile)
            def send() -> Deferred[Any]:
                if not network.reachable(self.source, port):
                    return fail(ConnectionRefusedError(f"port {port} refused"))
                return network.agent.request(method, uri, headers, bodyProducer)
            return deferLater(network.clock, network.latency, send)
        return network.agent.request(method, uri, headers, bodyProducer)


class Network:
    def __init__(self, clock: Clock | None = None, latency: float = 0.0) -> None:
        self.clock = clock
        self.latency = latency
        self.apps: dict[int, Any] = {}
        self.down: set[int] = set()
        self.cuts: set[frozenset[int]] = set()  # both ways
        self.blocked: set[tuple[int, int]] = set()  # (from, to): one way only
        self.held: set[int] = set()  # answers from these ports wait for release()
        self.parked: list[tuple[int, Deferred[Any], Any]] = []
        self.agent = RequestTraversalAgent(Router(self))

    def add(self, port: int, resource: Any) -> None:
        self.apps[port] = resource
        self.down.discard(port)

    def client(self, source: int | None = None) -> HTTPClient:
        return HTTPClient(Gate(self, source), data_to_body_producer=body_producer)

    def reachable(self, source: int | None, port: int) -> bool:
        if port not in self.apps or port in self.down:
            return False
        if source is not None and (source in self.down or frozenset((source, port)) in self.cuts
                                   or (source, port) in self.blocked):
            return False
        return True

    def kill(self, port: int) -> None:
        self.down.add(port)

    def revive(self, port: int) -> None:
        self.down.discard(port)

    def cut(self, a: int, b: int) -> None:
        self.cuts.add(frozenset((a, b)))

    def block(self, source: int, port: int) -> None:
        self.blocked.add((source, port))

    def hold(self, port: int) -> None:
        self.held.add(port)

    def release(self, port: int) -> None:
        self.held.discard(port)
        parked, self.parked = self.parked, []
        for held_port, answer, result in parked:
            if held_port == port:
                answer.callback(result)  # a Failure goes down the errback chain
            else:
                self.parked.append((held_port, answer, result))

    def heal(self) -> None:
        self.cuts.clear()
        self.blocked.clear()

    def flush(self) -> None:
        """Deliver every pending byte, repeatedly, until nothing moves. Exchanges with
        a dead port are dropped (the caller's timeout sees them), as after kill -9."""
        agent = self.agent
        for _ in range(10_000):
            moved = False
            pumps, agent._pumps = agent._pumps, set()
            for pump in pumps:
                port = pump.serverIO.getHost().port
                if port in self.down:
                    continue
                if pump.flush():
                    moved = True
                if not (pump.clientIO.disconnected and pump.serverIO.disconnected):
                    agent._pumps.add(pump)
            if not moved:
                return
        raise AssertionError("the in-memory network never went quiet")


def body_producer(data: Any) -> Any:
    """Bodies for the in-memory agent: producers as they are (as treq's default
    adapter does), bytes and text written at once."""
    return data if IBodyProducer.providedBy(data) else _SynchronousProducer(data)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a fired Deferred (its failure re-raised)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return _unbox(box)


def _unbox(box: list[Any]) -> Any:
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class Driver:
    """Time and delivery for everything on one network."""

    def __init__(self, network: Network | None = None, clock: Clock | None = None, latency: float = 0.0):
        self.clock = clock or Clock()
        self.network = network or Network(self.clock, latency)
        self.tickers: list[Callable[[], Any]] = []

    def step(self, seconds: float) -> None:
        self.network.flush()
        self.clock.advance(seconds)
        for tick in list(self.tickers):
            tick()
        self.network.flush()

    def run(self, seconds: float, step: float = 0.05) -> None:
        for _ in range(max(1, round(seconds / step))):
            self.step(step)

    def wait(self, d: Deferred[Any], limit: float = 30.0, step: float = 0.05) -> Any:
        """Advance time until `d` has a result (at most `limit` seconds); that result."""
        box: list[Any] = []
        d.addBoth(box.append)
        self.network.flush()
        waited = 0.0
        while not box:
            assert waited < limit, f"still waiting after {limit} simulated seconds"
            self.step(step)
            waited += step
        return _unbox(box)

    def until(self, condition: Callable[[], bool], limit: float = 30.0, step: float = 0.05) -> float:
        waited = 0.0
        self.network.flush()
        while not condition():
            assert waited < limit, f"condition not met after {limit} simulated seconds"
            self.step(step)
            waited += step
        return waited

    def do(self, coroutine: Any, limit: float = 30.0) -> Any:
        return self.wait(ensureDeferred(coroutine), limit)

    def http(self, method: str, url: str, *, json: Any = None, data: bytes | str | None = None,
             headers: dict[str, str] | None = None, source: int | None = None) -> Response:
        """One client exchange through the network: (status, headers, body)."""
        client = self.network.client(source)
        kw: dict[str, Any] = {"headers": headers or {}}
        if json is not None:
            kw["json"] = json
        if data is not None:
            kw["data"] = data
        response = self.wait(client.request(method, url, **kw))
        body = self.wait(treq.content(response))
        return Response(response.code, response.headers, body)


class Response:
    def __init__(self, code: int, headers: Any, body: bytes):
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        import orjson
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.code} {self.body[:200]!r}>"


class Cluster(Driver):
    """N replicas of one service (catalog by default) on an in-memory network."""

    def __init__(self, root: str, n: int = 3, *, service: str = "catalog", base_port: int = 5100,
                 network: Network | None = None, clock: Clock | None = None, start: bool = True,
                 latency: float = 0.01, app: Callable[[Replica], JsonApp] | None = None, **replica_kw: Any):
        super().__init__(network, clock, latency)
        self.root = root
        self.service = service
        self.base_port = base_port
        self.ids = list(range(1, n + 1))
        self.peers = {i: url_of(base_port + i) for i in self.ids}
        self.replica_kw = replica_kw
        self.make_app = app or (lambda r: catalog_app(r, SECRET))
        self.replicas: dict[int, Replica] = {}
        self.alive: set[int] = set()
        self.tickers.append(self._tick)
        for i in self.ids:
            self.boot(i, start=start)

    def machine(self) -> Any:
        return CatalogMachine() if self.service == "catalog" else OrderMachine()

    def path(self, i: int) -> str:
        return os.path.join(self.root, f"{self.service}-{i}.sqlite3")

    def port(self, i: int) -> int:
        return self.base_port + i

    def boot(self, i: int, *, start: bool = True, fresh: bool = False) -> Replica:
        """(Re)start replica i from its SQLite file (or an empty one when `fresh`)."""
        if fresh and os.path.exists(self.path(i)):
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path(i) + suffix):
                    os.remove(self.path(i) + suffix)
        store = Store(self.path(i), self.machine())
        replica = Replica(service=self.service, replica_id=i, peers=self.peers, store=store,
                          http=self.network.client(self.port(i)), clock=self.clock, secret=SECRET,
                          **self.replica_kw)
        self.replicas[i] = replica
        self.network.add(self.port(i), self.make_app(replica).resource())
        if start:
            replica.start()
            self.alive.add(i)
        else:
            self.network.kill(self.port(i))
        return replica

    def start(self, i: int) -> None:
        self.network.revive(self.port(i))
        self.replicas[i].start()
        self.alive.add(i)

    def kill(self, i: int) -> None:
        """kill -9: the port refuses, nothing it had in flight arrives, it runs no more."""
        self.alive.discard(i)
        self.network.kill(self.port(i))
        self.replicas[i].stop()

    def restart(self, i: int, fresh: bool = False) -> Replica:
        self.kill(i)
        self.replicas[i].store.close()
        return self.boot(i, fresh=fresh)

    def _tick(self) -> None:
        for i in sorted(self.alive):
            self.replicas[i].tick()

    def __getitem__(self, i: int) -> Replica:
        return self.replicas[i]

    def primaries(self) -> list[int]:
        return [i for i in sorted(self.alive) if self.replicas[i].is_primary]

    def primary(self) -> Replica:
        found = self.primaries()
        assert len(found) == 1, f"expected one primary, found {found}"
        return self.replicas[found[0]]

    def elect(self, limit: float = 10.0) -> Replica:
        """Run until there is one primary and every live replica knows it."""
        def known() -> bool:
            found = self.primaries()
            return len(found) == 1 and all(self.replicas[i].leader == found[0] for i in self.alive)
        self.until(known, limit)
        return self.primary()

    def submit(self, op: dict[str, Any], via: int | None = None, limit: float = 30.0) -> Any:
        replica = self.replicas[via] if via is not None else self.primary()
        return self.do(replica.submit(op), limit)

    def tables(self, i: int) -> list[tuple[Any, ...]]:
        machine = self.machine()
        db = self.replicas[i].store.db
        rows: list[tuple[Any, ...]] = []
        for table in machine.tables:
            rows += [(table, *r) for r in db.execute(f"SELECT * FROM {table} ORDER BY id")]  # noqa: S608
        return rows

    def log(self, i: int) -> list[tuple[int, int, dict[str, Any]]]:
        return [(e.seq, e.epoch, e.op) for e in self.replicas[i].store.entries_after(0, 100_000)]

    def close(self) -> None:
        for i in self.ids:
            self.replicas[i].stop()
            self.replicas[i].store.close()


_rids = itertools.count(1)


def rid() -> str:
    return f"test:{next(_rids)}"


def restock(book_id: int, quantity: int = 1) -> dict[str, Any]:
    return {"op": "restock", "rid": rid(), "id": book_id, "quantity": quantity}


def update_price(book_id: int, price: float) -> dict[str, Any]:
    return {"op": "update_price", "rid": rid(), "id": book_id, "price": price}


FRONTEND_PORT = 5000
CATALOG_PORT = 5101
ORDER_PORT = 5201


class Shop(Driver):
    """Front end -> order -> catalog, one replica each, everything in memory.

    The catalog announces its writes to the front end over (in-memory) HTTP, as in
    production. `poll()` is the front end's periodic health check."""

    def __init__(self, root: str, *, cache_size: int = 64, admin_token: str | None = TOKEN, latency: float = 0.0):
        super().__init__(latency=latency)
        net = self.network
        self.catalog_store = Store(os.path.join(root, "catalog.sqlite3"), CatalogMachine())
        self.order_store = Store(os.path.join(root, "orders.sqlite3"), OrderMachine())
        self.publisher = Publisher(http=net.client(CATALOG_PORT), clock=self.clock, secret=SECRET,
                                   frontends=[url_of(FRONTEND_PORT)], redis_url=None)
        self.catalog = Replica(service="catalog", replica_id=1, peers={1: url_of(CATALOG_PORT)},
                               store=self.catalog_store, http=net.client(CATALOG_PORT), clock=self.clock,
                               secret=SECRET, on_commit=self.publisher.committed)
        net.add(CATALOG_PORT, catalog_app(self.catalog, SECRET).resource())
        self.order = Replica(service="order", replica_id=1, peers={1: url_of(ORDER_PORT)},
                             store=self.order_store, http=net.client(ORDER_PORT), clock=self.clock, secret=SECRET)
        order_catalog = ReplicaSet("catalog", [url_of(CATALOG_PORT)], net.client(ORDER_PORT), self.clock, SECRET)
        self.purchases = Purchases(self.order, order_catalog, self.clock)
        net.add(ORDER_PORT, order_app(self.order, self.purchases, SECRET, admin_token).resource())
        http = net.client(FRONTEND_PORT)
        self.cache = LRUCache(cache_size)
        self.stream = InvalidationStream(self.cache, self.clock)
        self.fe = Frontend(catalog=ReplicaSet("catalog", [url_of(CATALOG_PORT)], http, self.clock, SECRET),
                           order=ReplicaSet("order", [url_of(ORDER_PORT)], http, self.clock, SECRET),
                           cache=self.cache, stream=self.stream, admin_token=admin_token, secret=SECRET)
        self.app = frontend_app(self.fe)
        net.add(FRONTEND_PORT, self.app.resource())
        self.catalog.start()
        self.order.start()
        self.publisher.start()
        self.poll()
        # the periodic health checks of production (TimerServices there), on our clock
        self.loops = [LoopingCall(lambda: ensureDeferred(self.fe.poll())),
                      LoopingCall(lambda: ensureDeferred(order_catalog.poll()))]
        for loop, every in zip(self.loops, (0.25, 0.5)):
            loop.clock = self.clock
            loop.start(every, now=False)

    def poll(self) -> None:
        self.do(self.fe.poll())

    def api(self, method: str, path: str, *, admin: bool = False, **kw: Any) -> Response:
        headers = dict(kw.pop("headers", None) or {})
        if admin:
            headers["Authorization"] = f"Bearer {TOKEN}"
        return self.http(method, url_of(FRONTEND_PORT) + path, headers=headers, **kw)

    def books(self) -> list[tuple[Any, ...]]:
        return list(self.catalog_store.db.execute("SELECT id, title, topic, price, quantity FROM books ORDER BY id"))

    def orders(self) -> list[tuple[Any, ...]]:
        return list(self.order_store.db.execute("SELECT * FROM orders ORDER BY id"))

    def state(self) -> tuple[Any, ...]:
        return (self.books(), self.orders(), self.catalog_store.last_seq, self.order_store.last_seq)

    def close(self) -> None:
        for loop in self.loops:
            loop.stop()
        self.publisher.stop()
        self.catalog.stop()
        self.order.stop()
        self.catalog_store.close()
        self.order_store.close()
