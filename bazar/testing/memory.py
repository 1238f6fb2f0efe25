"""In-memory wiring for Bazar's unit tests: no sockets, no sleeping.

The network, the driver of time and the test's view of an answer live in
`bazar.sim.network` (the simulation runs on them too) and are re-exported here:

- `Network`: HTTP between in-memory processes, by port; a replica can be "killed"
  (its port refuses), two replicas partitioned from each other (`cut`, or one way:
  `block`), or a port's answers held back (`hold`/`release`) to stage a race. With a
  `latency`, every request leaves that many (simulated) seconds after it is made.
- `Driver`: `run(seconds)` advances time in small steps, runs its tickers and
  delivers everything due.
- `Cluster` is N replicas of one service over such a network, driven by a
  `SimClock`: it ticks every live replica (their election clocks).
- `Shop` is a whole front end -> order -> catalog chain, one replica each.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall

from bazar.catalog import CatalogMachine, build_catalog, catalog_app
from bazar.frontend import build_frontend
from bazar.http.app import JsonApp
from bazar.order import OrderMachine, build_order
from bazar.replication.replica import Replica
from bazar.replication.store import Store
from bazar.settings import CatalogSettings, FrontendSettings, OrderSettings, RaftTiming, ReplicaSettings
from bazar.sim.network import (
    HOST,
    Driver,
    Gate,
    Network,
    Response,
    Router,
    SimClock,
    body_producer,
    result_of,
    url_of,
)

__all__ = ["HOST", "SECRET", "TOKEN", "Cluster", "Driver", "Gate", "Network", "Response", "Router", "Shop", "SimClock",
           "body_producer", "error", "ok", "restock", "result_of", "rid", "update_price", "url_of"]

SECRET = "cluster-secret-for-tests"
TOKEN = "admin-token-for-tests"


class Cluster(Driver):
    """N replicas of one service (catalog by default) on an in-memory network."""

    def __init__(self, root: str, n: int = 3, *, service: str = "catalog", base_port: int = 5100,
                 network: Network | None = None, clock: SimClock | None = None, start: bool = True,
                 latency: float = 0.01, app: Callable[[Replica], JsonApp] | None = None,
                 store_kw: dict[str, Any] | None = None, **replica_kw: Any):
        super().__init__(network, clock, latency)
        self.root = root
        self.service = service
        self.base_port = base_port
        self.ids = list(range(1, n + 1))
        self.peers = {i: url_of(base_port + i) for i in self.ids}
        self.timing = RaftTiming(**replica_kw)
        self.store_kw = store_kw or {}
        self.make_app = app or catalog_app
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
        store = Store(self.path(i), self.machine(), **self.store_kw)
        settings = ReplicaSettings(service=self.service, replica_id=i, peers=self.peers, secret=SECRET,
                                   admin_token=TOKEN, timing=self.timing)
        replica = Replica(settings, store=store, http=self.network.client(self.port(i)), clock=self.clock)
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

    def log(self, i: int, start: int = 1) -> list[tuple[int, int, dict[str, Any] | None]]:
        """Replica i's log from `start` (or from where it was compacted, if later)."""
        store = self.replicas[i].store
        first = max(start, store.snapshot_index + 1)
        return [(e.index, e.term, e.op) for e in store.entries(first, store.last_index() + 1)]

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


def ok(r: Response, status: int = 200) -> Any:
    """The JSON body of an answer that must be `status`, in JSON."""
    assert r.code == status, r
    assert r.header("Content-Type") == "application/json"
    return r.json()


def error(r: Response, status: int) -> str:
    """The sentence of an answer that must be a JSON error of `status`."""
    body = ok(r, status)
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return str(body["error"])


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
        catalog_settings = ReplicaSettings(service="catalog", replica_id=1, peers={1: url_of(CATALOG_PORT)},
                                           secret=SECRET, admin_token=admin_token)
        catalog = build_catalog(CatalogSettings(replica=catalog_settings, frontends=(url_of(FRONTEND_PORT),)),
                                store=self.catalog_store, clock=self.clock, http=net.client(CATALOG_PORT))
        order_settings = ReplicaSettings(service="order", replica_id=1, peers={1: url_of(ORDER_PORT)},
                                         secret=SECRET, admin_token=admin_token)
        order = build_order(OrderSettings(replica=order_settings, catalog=(url_of(CATALOG_PORT),)),
                            store=self.order_store, clock=self.clock, http=net.client(ORDER_PORT))
        front = build_frontend(FrontendSettings(catalog=(url_of(CATALOG_PORT),), order=(url_of(ORDER_PORT),),
                                                cache_size=cache_size, secret=SECRET, admin_token=admin_token),
                               clock=self.clock, http=net.client(FRONTEND_PORT))
        self.nodes = (catalog, order, front)
        self.catalog, self.publisher = catalog.replica, catalog.publisher
        self.order, self.purchases = order.replica, order.purchases
        self.fe, self.app = front.frontend, front.app
        self.cache, self.stream = self.fe.cache, self.fe.stream
        for port, node in ((CATALOG_PORT, catalog), (ORDER_PORT, order), (FRONTEND_PORT, front)):
            net.add(port, node.resource)
        catalog.start()
        order.start()
        self.poll()
        # the periodic health checks of production (TimerServices there), on our clock; the
        # replicas' ticks are left out: a single replica is its own primary for good
        self.loops = [LoopingCall(lambda: ensureDeferred(self.fe.poll())),
                      LoopingCall(lambda: ensureDeferred(order.catalog.poll()))]
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
        for node in self.nodes:
            node.stop()
        self.catalog_store.close()
        self.order_store.close()
