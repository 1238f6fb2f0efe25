"""The order service: the purchase flow, replicated orders, idempotency.

A purchase is two replicated writes, the second started once the first is committed:

1. `Sell` (catalog), request id `sale:{key}`: the catalog takes the copies and, in
   the same entry, records the sale (book, quantity, title and price, keyed by the
   purchase's Idempotency-Key; the front end makes one up when the client gave
   none). Out of stock or an unknown book: refused, nothing is sold.
2. `RecordOrder` (order service), request id `order:{key}`: the sale becomes an
   order, confirmed, with the next order id. It starts as soon as the catalog primary
   has applied the sale (the catalog answers in two parts: `early_write`), while the
   catalog's backups still apply it; the purchase is answered 200 only once both
   writes are acknowledged (DESIGN.md guarantee 1, for each of them).

The sale is the first durable record of a purchase, and everything the order needs
is in it. If any process dies between the two steps, the sale waits in the catalog:
a retry with the same key finds it (both steps are idempotent by their request ids)
and the order primary's sweep records every sale older than `settle_after` that has
no order yet. So a copy taken from the stock always ends up in exactly one confirmed
order, and a confirmed order always took its copy (docs/replication.md).
"""

from __future__ import annotations

import os
import random
import sqlite3
from datetime import datetime, timezone
from typing import Any

from attrs import define, field
from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from bazar.balancer import ReplicaSet
from bazar.codec import dumps, loads
from bazar.config import ReplicaOptions, parse_urls
from bazar.errors import Invalid, NotFound
from bazar.http.app import JsonApp
from bazar.http.request import SECRET_HEADER, min_seq_of, page_of, read_object, require_admin, require_secret
from bazar.messages import PURCHASE_PATH, SALES_PAGE, SALES_PATH, SEQ_HEADER, Purchased, PurchaseRequest
from bazar.ops import ORDER_OPS, Op, RecordOrder, Sell, operation_from_json
from bazar.process import Node, serve
from bazar.records import ALL, ORDER_FIELDS, Order, Sale, quantity_of
from bazar.replication.replica import Replica
from bazar.replication.routes import hop_count, install_routes
from bazar.replication.store import Outcome, Store
from bazar.settings import OrderSettings

log = Logger()

ORDER_COLUMNS = ", ".join(ORDER_FIELDS + ("idem", "sale_seq"))
SWEEP_PAGES = 20  # pages of sales one sweep may go through


def order_json(record: tuple[Any, ...] | dict[str, Any]) -> dict[str, Any]:
    """The public order: from a row, or from a full record (with idem, ...)."""
    if isinstance(record, dict):
        record = tuple(record[k] for k in ORDER_FIELDS)
    return Order.from_row(record).to_json()


def record_op(sale: Sale) -> RecordOrder:
    """The order write for a committed sale: the same operation whoever makes it (the
    purchase or the sweep), so the two meet in one request id."""
    return RecordOrder(rid=f"order:{sale.key}", idem=sale.key, book_id=sale.book_id, quantity=sale.quantity,
                       title=sale.title, price=sale.price, sale_seq=sale.seq, created=sale.created,
                       created_ts=sale.created_ts)


class OrderMachine:
    tables: tuple[str, ...] = ("orders",)
    state_tables: tuple[str, ...] = ("orders",)
    # `parse` refuses whatever `apply` or the table would: a write needs no trial run
    # before it takes an entry (its outcome depends on the state only through the
    # request's key, which makes a repeated one the same order)
    tried = False

    def create(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL, "
                   "title TEXT NOT NULL, quantity INTEGER NOT NULL, price REAL NOT NULL, "
                   "total REAL NOT NULL, created TEXT NOT NULL, idem TEXT NOT NULL UNIQUE, "
                   "sale_seq INTEGER NOT NULL, created_ts REAL NOT NULL)")

    def parse(self, data: Any) -> Op:
        op = operation_from_json(data, ORDER_OPS, "order")
        if isinstance(op, RecordOrder):
            quantity_of({"quantity": op.quantity})
            if not (0 <= op.book_id < 2**63 and 0 <= op.sale_seq < 2**63):
                raise Invalid("malformed operation: an id out of range")
        return op

    def _order(self, db: sqlite3.Connection, order_id: int) -> dict[str, Any]:
        row = db.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise NotFound(f"no order with id {order_id}")
        return dict(zip(ORDER_COLUMNS.split(", "), row))

    def apply(self, db: sqlite3.Connection, op: Op, seq: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        if not isinstance(op, RecordOrder):
            raise Invalid(f"unknown order operation {op.kind!r}")
        row = db.execute("SELECT id FROM orders WHERE idem = ?", (op.idem,)).fetchone()
        if row is not None:
            return self._order(db, row[0]), ()
        (order_id,) = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM orders").fetchone()
        db.execute("INSERT INTO orders (id, book_id, title, quantity, price, total, created, idem, sale_seq, "
                   "created_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (order_id, op.book_id, op.title, op.quantity, op.price, round(op.price * op.quantity, 2),
                    op.created, op.idem, op.sale_seq, op.created_ts))
        return self._order(db, order_id), ()


class Purchases:
    """The purchase flow and the sweep; run on the order primary."""

    def __init__(self, replica: Replica, catalog: ReplicaSet, clock: IReactorTime, settle_after: float = 2.0):
        self.replica = replica
        self.catalog = catalog
        self.clock = clock
        self.secret = replica.secret
        self.settle_after = settle_after
        self.swept = 0  # every sale at a catalog index up to this one is recorded (as far as this primary knows)
        self.sweeping = False

    async def purchase(self, request: PurchaseRequest) -> Purchased:
        now = self.clock.seconds()
        created = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")
        key = request.key
        sell = Sell(rid=f"sale:{key}", key=key, id=request.book_id, quantity=request.quantity, created=created,
                    created_ts=now).to_json()
        # The sale is recorded as an order as soon as the catalog primary has applied it
        # (committed: durable on a majority), while the catalog's backups apply it; the
        # purchase is answered only once both writes are acknowledged.
        sold, acknowledged = await self.catalog.write_early(sell)
        recording = ensureDeferred(self.record(Sale.from_json(sold.result["sale"])))
        if acknowledged is not None:
            try:
                await acknowledged
            except Exception:
                # the order is still made (from a committed sale), whoever waits for it
                recording.addErrback(lambda f: log.info("recording sale {key} stopped: {why}", key=key,
                                                        why=f.getErrorMessage()))
                raise
        done = await recording
        return Purchased(order_json(done.result), sold.seq, sold.keys, done.seq)

    async def record(self, sale: Sale) -> Outcome:
        """The order of a committed sale (made once, whoever asks first)."""
        return await self.replica.submit(record_op(sale).to_json())

    def elected(self) -> None:
        """This replica just became primary: look at every sale once, soon."""
        self.swept = 0
        self.clock.callLater(self.settle_after, self.sweep)

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

    def _swept(self, _: object) -> None:
        self.sweeping = False

    async def _sweep(self) -> None:
        headers = {SECRET_HEADER: (self.secret or "").encode()}
        for _ in range(SWEEP_PAGES):
            status, body, _seq = await self.catalog.read(f"{SALES_PATH}?after={self.swept}", headers=headers)
            if status != 200:
                return
            sales = [Sale.from_json(sale) for sale in loads(body)["sales"]]
            cutoff = self.clock.seconds() - self.settle_after
            for sale in sales:
                if not self.recorded(sale.key):
                    if sale.created_ts > cutoff:
                        return  # its own purchase is probably still at work: next time
                    if not self.replica.is_primary or not self.replica.serving:
                        return
                    log.info("recording sale {key} (catalog index {seq}) as an order", key=sale.key, seq=sale.seq)
                    await self.record(sale)
                self.swept = max(self.swept, sale.seq)
            if len(sales) < SALES_PAGE:
                return


def order_app(replica: Replica, purchases: Purchases) -> JsonApp:
    api = JsonApp("order")
    admin_token = replica.settings.admin_token

    @api.route("/orders", "GET", "orders")
    def orders(request: IRequest) -> bytes:
        """Every confirmed order, or a page of them (`?limit=&after=`), in id order."""
        require_admin(request, admin_token)
        page = page_of(request, "order") or ALL
        replica.require_serving(min_seq_of(request))
        request.setHeader(SEQ_HEADER, str(replica.store.applied).encode())
        rows = replica.store.db.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id > ? ORDER BY id LIMIT ?",
                                        page.sql())
        # each row straight into the dict Order.to_json makes (its first fields, in order)
        return dumps([dict(zip(ORDER_FIELDS, r)) for r in rows])

    @api.rpc(PURCHASE_PATH, "POST", "purchase", bare=True)
    async def purchase(request: IRequest) -> Any:
        require_secret(request, replica.secret)
        body = read_object(request) or {}
        wanted = PurchaseRequest.from_json(body)
        if not replica.is_primary:
            return await replica.forward(PURCHASE_PATH, body, hop_count(request))
        return (await purchases.purchase(wanted)).to_json()

    install_routes(api, replica)
    return api


@define
class OrderNode(Node):
    replica: Replica = field(kw_only=True)
    purchases: Purchases = field(kw_only=True)
    catalog: ReplicaSet = field(kw_only=True)
    app: JsonApp = field(kw_only=True)


def build_order(settings: OrderSettings, *, store: Store, clock: IReactorTime, http: HTTPClient,
                rng: random.Random | None = None) -> OrderNode:
    """An order replica: its Raft replica over `store`, the catalog it sells from, the
    purchase flow and its sweep, its app."""
    replica = Replica(settings.replica, store=store, http=http, clock=clock, rng=rng)
    catalog = ReplicaSet("catalog", settings.catalog, http, clock, settings.replica.secret, settings.catalog_client)
    purchases = Purchases(replica, catalog, clock, settings.settle_after)
    replica.on_primary = purchases.elected
    app = order_app(replica, purchases)
    return OrderNode(app.resource(), on_start=[replica.start], on_stop=[replica.stop],
                     periodic=[(replica.tick_seconds, replica.tick, "the election clock"),
                               (settings.catalog_poll, lambda: ensureDeferred(catalog.poll()),
                                "the catalog's health check"),
                               (settings.sweep_every, purchases.sweep, "the sweep")],
                     replica=replica, purchases=purchases, catalog=catalog, app=app)


class Options(ReplicaOptions):
    service = "order"
    optParameters = [
        ["port", None, 5201, "Port to listen on.", int],
        ["id", None, 1, "This replica's id (one of the ids in --peers).", int],
        ["peers", None, "", "Every replica of the order service, itself included: 1=http://h:p,2=...,3=..."],
        ["data", None, None, "Data directory (default ./bazar-data/order-<id>)."],
        ["catalog", None, "http://127.0.0.1:5101", "Catalog replicas: http://h:p,..."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self.settings = OrderSettings(replica=self.replica_settings(), catalog=tuple(parse_urls(self["catalog"])))


def makeService(options: Options, reactor: Any = None) -> MultiService:
    store = Store(os.path.join(options.data_directory(), "orders.db"), OrderMachine())
    return serve(lambda clock, http: build_order(options.settings, store=store, clock=clock, http=http),
                 options, reactor)
