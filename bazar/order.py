"""The order service: the purchase flow, replicated orders, idempotency.

A purchase is three steps, each durable before the next starts:

1. `create`: the order is recorded as *pending* (replicated), keyed by its
   Idempotency-Key (the front end makes one up when the client gave none);
2. `decrement`: the catalog takes the stock, idempotently keyed by the order id, and
   only if the copies are there;
3. `confirm` (or `fail` when the catalog said out of stock / unknown book).

If any process dies between two steps, the order stays pending and is finished by
the order primary (a retry with the same key, or the periodic sweep of pending
orders, re-runs step 2 — harmless thanks to the order-id key — and step 3). So a
copy taken from the stock always ends up in a confirmed order, and a confirmed order
always took its copy.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from bazar.balancer import ReplicaSet
from bazar.books import ORDER_FIELDS, Order
from bazar.client import Clock
from bazar.replication import Replica, hop_count, install_routes
from bazar.service import ReplicaOptions
from bazar.store import OpError
from bazar.web import HTTPError, JsonApp, dumps, read_object, require_admin, require_secret

log = Logger()

ORDER_COLUMNS = ", ".join(ORDER_FIELDS + ("status", "idem", "reason"))
SETTLE_AFTER = 2.0  # seconds a pending order may be left to its own request


def order_json(row: tuple[Any, ...] | dict[str, Any]) -> dict[str, Any]:
    """The public order: from a row, or from a full record (with status, idem, ...)."""
    if isinstance(row, dict):
        row = tuple(row[k] for k in ORDER_FIELDS)
    return Order.from_row(row).to_json()


def order_record(row: tuple[Any, ...]) -> dict[str, Any]:
    names = ORDER_COLUMNS.split(", ")
    return dict(zip(names, row))


class OrderMachine:
    tables: tuple[str, ...] = ("orders",)

    def create(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL, "
                   "title TEXT NOT NULL DEFAULT '', quantity INTEGER NOT NULL, price REAL NOT NULL DEFAULT 0, "
                   "total REAL NOT NULL DEFAULT 0, created TEXT NOT NULL, created_ts REAL NOT NULL, "
                   "status TEXT NOT NULL, idem TEXT UNIQUE, reason TEXT NOT NULL DEFAULT '')")
        db.execute("CREATE INDEX IF NOT EXISTS orders_status ON orders (status)")

    def _order(self, db: sqlite3.Connection, order_id: int) -> dict[str, Any]:
        row = db.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise OpError(404, f"no order with id {order_id}")
        return order_record(tuple(row))

    def apply(self, db: sqlite3.Connection, op: dict[str, Any], seq: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        kind = op["op"]
        if kind == "create":
            idem = str(op["idem"])
            row = db.execute("SELECT id FROM orders WHERE idem = ?", (idem,)).fetchone()
            if row is not None:
                return self._order(db, row[0]), ()
            (order_id,) = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM orders").fetchone()
            db.execute("INSERT INTO orders (id, book_id, quantity, created, created_ts, status, idem) "
                       "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                       (order_id, int(op["book_id"]), int(op["quantity"]), str(op["created"]),
                        float(op["created_ts"]), idem))
            return self._order(db, order_id), ()
        order_id = int(op["id"])
        order = self._order(db, order_id)
        if order["status"] == "pending":
            if kind == "confirm":
                price = float(op["price"])
                total = round(price * order["quantity"], 2)
                db.execute("UPDATE orders SET status = 'confirmed', title = ?, price = ?, total = ? WHERE id = ?",
                           (str(op["title"]), price, total, order_id))
            elif kind == "fail":
                db.execute("UPDATE orders SET status = 'failed', reason = ? WHERE id = ?",
                           (str(op["reason"])[:300], order_id))
            else:
                raise OpError(400, f"unknown order operation {kind!r}")
        return self._order(db, order_id), ()


class Purchases:
    """The purchase flow; runs on the order primary."""

    def __init__(self, replica: Replica, catalog: ReplicaSet, clock: Clock):
        self.replica = replica
        self.catalog = catalog
        self.clock = clock
        self.settling: dict[int, list[Deferred[Any]]] = {}

    def read(self, order_id: int) -> dict[str, Any]:
        row = self.replica.store.db.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise HTTPError(404, f"no order with id {order_id}")
        return order_record(tuple(row))

    async def purchase(self, book_id: int, quantity: int, key: str) -> dict[str, Any]:
        now = self.clock.seconds()
        created = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
        outcome = await self.replica.submit({"op": "create", "rid": f"create:{key}", "idem": key,
                                             "book_id": book_id, "quantity": quantity,
                                             "created": created, "created_ts": now})
        order = outcome.result
        if order["book_id"] != book_id or order["quantity"] != quantity:
            raise HTTPError(409, "this Idempotency-Key was already used for a different purchase")
        return await self.settle(int(order["id"]))

    async def settle(self, order_id: int) -> dict[str, Any]:
        """Finish a pending order (one run at a time per order); answer its final state."""
        waiter: Deferred[Any] = Deferred()
        waiters = self.settling.get(order_id)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self.settling[order_id] = [waiter]
            ensureDeferred(self._settle(order_id)).addBoth(self._settled, order_id)
        return await waiter  # type: ignore[no-any-return]

    def _settled(self, result: Any, order_id: int) -> None:
        for waiter in self.settling.pop(order_id, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _settle(self, order_id: int) -> dict[str, Any]:
        order = self.read(order_id)
        seq = self.replica.store.applied  # what a reader must have applied to see this order's state
        catalog: dict[str, Any] = {"seq": 0, "keys": [f"info:{order['book_id']}"]}
        if order["status"] == "pending":
            try:
                taken = await self.catalog.write({"op": "decrement", "rid": f"order:{order_id}",
                                                  "id": order["book_id"], "quantity": order["quantity"]})
            except HTTPError as exc:
                if exc.status not in (400, 404, 409):
                    raise  # catalog unavailable: the order stays pending and is settled later
                await self.replica.submit({"op": "fail", "rid": f"fail:{order_id}", "id": order_id,
                                           "reason": exc.message})
                raise
            catalog = {"seq": taken.seq, "keys": list(taken.keys)}
            book = taken.result
            done = await self.replica.submit({"op": "confirm", "rid": f"confirm:{order_id}", "id": order_id,
                                              "title": book["title"], "price": book["price"]})
            order = done.result
            seq = max(seq, done.seq)
        if order["status"] == "failed":
            status = 404 if order["reason"].startswith("no book") else 409
            raise HTTPError(status, order["reason"] or "the purchase failed")
        return {"order": order_json(order), "catalog": catalog, "seq": seq}

    def sweep(self) -> None:
        """Finish pending orders left behind by a crash (a primary within its lease
        only: a deposed one must not act on what it knew)."""
        if not self.replica.is_primary or not self.replica.serving:
            return
        cutoff = self.clock.seconds() - SETTLE_AFTER
        rows = self.replica.store.db.execute(
            "SELECT id FROM orders WHERE status = 'pending' AND created_ts < ? ORDER BY id LIMIT 100", (cutoff,))
        for (order_id,) in rows.fetchall():
            if order_id not in self.settling:
                log.info("settling pending order {id}", id=order_id)
                ensureDeferred(self.settle(order_id)).addErrback(lambda f: None)


def order_app(replica: Replica, purchases: Purchases, secret: str | None, admin_token: str | None) -> JsonApp:
    api = JsonApp("order")

    @api.route("/health", "GET", "health")
    def health(request: Any) -> dict[str, Any]:
        return replica.health()

    @api.route("/orders", "GET", "orders")
    def orders(request: Any) -> bytes:
        require_admin(request, admin_token)
        replica.require_serving()
        request.setHeader(b"X-Bazar-Seq", str(replica.store.applied).encode())
        rows = replica.store.db.execute(
            f"SELECT {ORDER_COLUMNS} FROM orders WHERE status = 'confirmed' ORDER BY id")
        return dumps([order_json(tuple(r)) for r in rows])

    @api.route("/internal/purchase", "POST", "purchase")
    async def purchase(request: Any) -> Any:
        require_secret(request, secret)
        body = read_object(request) or {}
        try:
            book_id, quantity, key = int(body["book_id"]), int(body["quantity"]), str(body["key"])
        except (KeyError, TypeError, ValueError):
            raise HTTPError(400, "a purchase needs book_id, quantity and key") from None
        if not replica.is_primary:
            status, answer = await replica.forward("/internal/purchase", body, hop_count(request))
            return status, answer
        return await purchases.purchase(book_id, quantity, key)

    api.shortcut(b"POST", b"/internal/purchase", "purchase",
                 lambda request, rest: None if rest else purchase(request))
    install_routes(api, replica, secret)
    return api


class Options(ReplicaOptions):
    optParameters = [
        ["port", None, 5201, "Port to listen on.", int],
        ["id", None, 1, "This replica's id (one of the ids in --peers).", int],
        ["peers", None, "", "Every replica of the order service, itself included: 1=http://h:p,2=...,3=..."],
        ["data", None, None, "Data directory (default ./bazar-data/order-<id>)."],
        ["catalog", None, "http://127.0.0.1:5101", "Catalog replicas: http://h:p,..."],
    ]


def makeService(options: usage.Options) -> MultiService:
    from bazar.service import ReplicaProcess, parse_urls

    process = ReplicaProcess(options, "order", OrderMachine(), "orders.db")
    reactor = process.reactor
    catalog = ReplicaSet("catalog", parse_urls(options["catalog"]), process.http, reactor, process.secret,
                         write_budget=8.0)
    purchases = Purchases(process.replica, catalog, reactor)
    process.replica.on_primary = lambda: reactor.callLater(SETTLE_AFTER, purchases.sweep)
    TimerService(0.5, lambda: ensureDeferred(catalog.poll())).setServiceParent(process.parent)
    TimerService(1.0, purchases.sweep).setServiceParent(process.parent)
    return process.serve(order_app(process.replica, purchases, process.secret, process.admin_token).resource())
