"""The order service: the purchase flow, replicated orders, idempotency.

A purchase is two replicated writes, each committed before the next starts:

1. `sell` (catalog), request id `sale:{key}`: the catalog takes the copies and, in
   the same entry, records the sale (book, quantity, title and price, keyed by the
   purchase's Idempotency-Key; the front end makes one up when the client gave
   none). Out of stock or an unknown book: refused, nothing is sold.
2. `record` (order service), request id `order:{key}`: the sale becomes an order,
   confirmed, with the next order id. Only then is the purchase answered 200.

The sale is the first durable record of a purchase, and everything the order needs
is in it. If any process dies between the two steps, the sale waits in the catalog:
a retry with the same key finds it (both steps are idempotent by their request ids)
and the order primary's sweep records every sale older than SETTLE_AFTER that has no
order yet. So a copy taken from the stock always ends up in exactly one confirmed
order, and a confirmed order always took its copy (docs/replication.md).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python import usage

from bazar.balancer import ReplicaSet
from bazar.books import ORDER_FIELDS, Order
from bazar.catalog import SALES_PAGE
from bazar.client import Clock
from bazar.replication import Replica, hop_count, install_routes
from bazar.service import ReplicaOptions
from bazar.store import OpError, Outcome
from bazar.web import SECRET_HEADER, HTTPError, JsonApp, dumps, loads, read_object, require_admin, require_secret

log = Logger()

ORDER_COLUMNS = ", ".join(ORDER_FIELDS + ("idem", "sale_seq"))
SETTLE_AFTER = 2.0  # seconds a sale may be left to its own purchase before the sweep records it
SWEEP_PAGES = 20  # pages of sales one sweep may go through


def order_json(row: tuple[Any, ...] | dict[str, Any]) -> dict[str, Any]:
    """The public order: from a row, or from a full record (with idem, ...)."""
    if isinstance(row, dict):
        row = tuple(row[k] for k in ORDER_FIELDS)
    return Order.from_row(row).to_json()


def order_record(row: tuple[Any, ...]) -> dict[str, Any]:
    names = ORDER_COLUMNS.split(", ")
    return dict(zip(names, row))


def record_op(sale: dict[str, Any]) -> dict[str, Any]:
    """The order write for a committed sale: the same operation whoever makes it (the
    purchase or the sweep), so the two meet in one request id."""
    key = str(sale["key"])
    return {"op": "record", "rid": f"order:{key}", "idem": key, "book_id": int(sale["book_id"]),
            "quantity": int(sale["quantity"]), "title": str(sale["title"]), "price": float(sale["price"]),
            "sale_seq": int(sale["seq"]), "created": str(sale["created"]), "created_ts": float(sale["created_ts"])}


class OrderMachine:
    tables: tuple[str, ...] = ("orders",)

    def create(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL, "
                   "title TEXT NOT NULL, quantity INTEGER NOT NULL, price REAL NOT NULL, "
                   "total REAL NOT NULL, created TEXT NOT NULL, idem TEXT NOT NULL UNIQUE, "
                   "sale_seq INTEGER NOT NULL, created_ts REAL NOT NULL)")

    def _order(self, db: sqlite3.Connection, order_id: int) -> dict[str, Any]:
        row = db.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise OpError(404, f"no order with id {order_id}")
        return order_record(tuple(row))

    def apply(self, db: sqlite3.Connection, op: dict[str, Any], seq: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        if op["op"] != "record":
            raise OpError(400, f"unknown order operation {op['op']!r}")
        idem = str(op["idem"])
        row = db.execute("SELECT id FROM orders WHERE idem = ?", (idem,)).fetchone()
        if row is not None:
            return self._order(db, row[0]), ()
        quantity, price = int(op["quantity"]), float(op["price"])
        if quantity < 1:
            raise OpError(400, "quantity must be positive")
        (order_id,) = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM orders").fetchone()
        db.execute("INSERT INTO orders (id, book_id, title, quantity, price, total, created, idem, sale_seq, "
                   "created_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (order_id, int(op["book_id"]), str(op["title"]), quantity, price, round(price * quantity, 2),
                    str(op["created"]), idem, int(op["sale_seq"]), float(op["created_ts"])))
        return self._order(db, order_id), ()


class Purchases:
    """The purchase flow and the sweep; run on the order primary."""

    def __init__(self, replica: Replica, catalog: ReplicaSet, clock: Clock, secret: str | None = None):
        self.replica = replica
        self.catalog = catalog
        self.clock = clock
        self.secret = secret
        self.swept = 0  # every sale at a catalog index up to this one is recorded (as far as this primary knows)
        self.sweeping = False

    async def purchase(self, book_id: int, quantity: int, key: str) -> dict[str, Any]:
        now = self.clock.seconds()
        created = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
        sold = await self.catalog.write({"op": "sell", "rid": f"sale:{key}", "key": key, "id": book_id,
                                         "quantity": quantity, "created": created, "created_ts": now})
        sale = sold.result["sale"]
        done = await self.record(sale)
        return {"order": order_json(done.result), "catalog": {"seq": sold.seq, "keys": list(sold.keys)},
                "seq": done.seq}

    async def record(self, sale: dict[str, Any]) -> Outcome:
        """The order of a committed sale (made once, whoever asks first)."""
        return await self.replica.submit(record_op(sale))

    def elected(self) -> None:
        """This replica just became primary: look at every sale once, soon."""
        self.swept = 0
        self.clock.callLater(SETTLE_AFTER, self.sweep)

    def recorded(self, key: str) -> bool:
        return self.replica.store.db.execute("SELECT 1 FROM orders WHERE idem = ?", (key,)).fetchone() is not None

    def sweep(self) -> None:
        """Record the sales a crash left without an order (a primary within its lease
        only: a deposed one must not act on what it knew)."""
        if self.sweeping or not self.replica.is_primary or not self.replica.serving:
            return
        self.sweeping = True
        ensureDeferred(self._sweep()).addErrback(
            lambda f: log.info("sweep stopped: {why}", why=f.getErrorMessage())).addBoth(self._swept)

    def _swept(self, _: Any) -> None:
        self.sweeping = False

    async def _sweep(self) -> None:
        headers = {SECRET_HEADER: (self.secret or "").encode()}
        for _ in range(SWEEP_PAGES):
            status, body, _seq = await self.catalog.read(f"/internal/sales?after={self.swept}", headers=headers)
            if status != 200:
                return
            sales = loads(body)["sales"]
            cutoff = self.clock.seconds() - SETTLE_AFTER
            for sale in sales:
                if not self.recorded(str(sale["key"])):
                    if float(sale["created_ts"]) > cutoff:
                        return  # its own purchase is probably still at work: next time
                    if not self.replica.is_primary or not self.replica.serving:
                        return
                    log.info("recording sale {key} (catalog index {seq}) as an order", key=sale["key"],
                             seq=sale["seq"])
                    await self.record(sale)
                self.swept = max(self.swept, int(sale["seq"]))
            if len(sales) < SALES_PAGE:
                return


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
        rows = replica.store.db.execute(f"SELECT {ORDER_COLUMNS} FROM orders ORDER BY id")
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
    purchases = Purchases(process.replica, catalog, reactor, process.secret)
    process.replica.on_primary = purchases.elected
    TimerService(0.5, lambda: ensureDeferred(catalog.poll())).setServiceParent(process.parent)
    TimerService(1.0, purchases.sweep).setServiceParent(process.parent)
    return process.serve(order_app(process.replica, purchases, process.secret, process.admin_token).resource())
