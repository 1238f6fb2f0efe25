"""The catalog service: books in SQLite, replicated; reads from any replica, writes
through the primary. A purchase takes its copies here first: `sell` is a conditional
stock decrement that also records the sale (book, quantity, title and price at that
moment, keyed by the purchase's key), so a sale never depends on a later write to be
found again (the order service records every sale as an order, see bazar.order)."""

from __future__ import annotations

import os
import random
import sqlite3
from typing import Any

from attrs import define, field
from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from bazar.codec import dumps
from bazar.config import ReplicaOptions, parse_redis, parse_urls
from bazar.errors import Invalid, NotFound, OutOfStock
from bazar.http.app import JsonApp
from bazar.http.request import min_seq_of, page_of, parse_id, require_secret
from bazar.invalidation import Publisher
from bazar.messages import SALES_PAGE, SALES_PATH, SEQ_HEADER
from bazar.ops import (
    CATALOG_OPS,
    AddBook,
    Decrement,
    ImportBooks,
    Op,
    Restock,
    Sell,
    UpdatePrice,
    operation_from_json,
)
from bazar.process import Node, serve
from bazar.records import ALL, BOOK_FIELDS, SALE_FIELDS, SEED_BOOKS, Book, Page, Sale, info_key, search_key
from bazar.replication.replica import Replica
from bazar.replication.routes import install_routes
from bazar.replication.store import Store
from bazar.settings import CatalogSettings

BOOK_COLUMNS = ", ".join(BOOK_FIELDS)
SALE_COLUMNS = ", ".join(SALE_FIELDS)


class CatalogMachine:
    """The catalog's deterministic state: every replica applies the same ops in the
    same order and ends with the same books."""

    tables: tuple[str, ...] = ("books",)
    state_tables: tuple[str, ...] = ("books", "sales")
    tried = True  # (an unknown book is refused without an entry: a read of the current state)

    def create(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, "
                   "topic TEXT NOT NULL, price REAL NOT NULL, quantity INTEGER NOT NULL CHECK (quantity >= 0), "
                   "version INTEGER NOT NULL DEFAULT 0)")
        # Search is by topic equality (the API has no text search, so no FTS): this index
        # serves it. Its entries are (topic, id), id being the rowid, so a page of a topic
        # (WHERE topic = ? AND id > ? ORDER BY id LIMIT ?) is one range of the index, in
        # order, without a sort (tests/test_catalogue.py checks the plan).
        db.execute("CREATE INDEX IF NOT EXISTS books_topic ON books (topic)")
        db.execute("CREATE TABLE IF NOT EXISTS sales (key TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, "
                   "book_id INTEGER NOT NULL, title TEXT NOT NULL, quantity INTEGER NOT NULL, "
                   "price REAL NOT NULL, created TEXT NOT NULL, created_ts REAL NOT NULL)")
        seeded = db.execute("SELECT value FROM meta WHERE key = 'seeded'").fetchone()
        if not seeded:
            db.executemany("INSERT OR IGNORE INTO books (id, title, topic, price, quantity) VALUES (?, ?, ?, ?, ?)",
                           [(i, *book) for i, book in enumerate(SEED_BOOKS)])
            db.execute("INSERT INTO meta (key, value) VALUES ('seeded', 1)")

    def parse(self, data: Any) -> Op:
        return operation_from_json(data, CATALOG_OPS, "catalog")

    def _book(self, db: sqlite3.Connection, book_id: int) -> Book:
        row = db.execute(f"SELECT {BOOK_COLUMNS} FROM books WHERE id = ?", (book_id,)).fetchone()
        if row is None:
            raise NotFound(f"no book with id {book_id}")
        return Book.from_row(row)

    def apply(self, db: sqlite3.Connection, op: Op, seq: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        if isinstance(op, AddBook):
            (book_id,) = db.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM books").fetchone()
            db.execute("INSERT INTO books (id, title, topic, price, quantity, version) VALUES (?, ?, ?, ?, ?, ?)",
                       (book_id, op.title, op.topic, op.price, op.quantity, seq))
            return self._book(db, book_id).to_json(), (info_key(book_id), search_key(op.topic))
        if isinstance(op, ImportBooks):
            return self._import(db, op, seq)
        if isinstance(op, UpdatePrice):
            self._book(db, op.id)
            db.execute("UPDATE books SET price = ?, version = ? WHERE id = ?", (op.price, seq, op.id))
        elif isinstance(op, Restock):
            self._book(db, op.id)
            db.execute("UPDATE books SET quantity = quantity + ?, version = ? WHERE id = ?", (op.quantity, seq, op.id))
        elif isinstance(op, (Sell, Decrement)):
            book = self._take(db, op.id, op.quantity, seq)
            if isinstance(op, Sell):
                sale = Sale(key=op.key, seq=seq, book_id=op.id, title=book.title, quantity=op.quantity,
                            price=book.price, created=op.created, created_ts=op.created_ts)
                db.execute(f"INSERT INTO sales ({SALE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", sale.row())
                return {"book": self._book(db, op.id).to_json(), "sale": sale.to_json()}, (info_key(op.id),)
            return self._book(db, op.id).to_json(), (info_key(op.id),)
        else:
            raise Invalid(f"unknown catalog operation {op.kind!r}")
        return self._book(db, op.id).to_json(), (info_key(op.id),)

    def _import(self, db: sqlite3.Connection, op: ImportBooks, seq: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Every book of the import, with consecutive new ids, in one statement (the
        caller's savepoint takes all of them back if any is refused)."""
        if not op.books:
            raise Invalid("an import needs at least one book")
        (first,) = db.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM books").fetchone()
        db.executemany("INSERT INTO books (id, title, topic, price, quantity, version) VALUES (?, ?, ?, ?, ?, ?)",
                       [(first + i, title, topic, price, quantity, seq)
                        for i, (title, topic, price, quantity) in enumerate(op.books)])
        ids = list(range(first, first + len(op.books)))
        topics = dict.fromkeys(book[1] for book in op.books)  # each once, in order
        return {"ids": ids}, (*map(info_key, ids), *map(search_key, topics))

    def _take(self, db: sqlite3.Connection, book_id: int, quantity: int, seq: int) -> Book:
        """Take `quantity` copies of a book (the book as it was), or OutOfStock."""
        book = self._book(db, book_id)
        if quantity < 1:
            raise Invalid("quantity must be positive")
        if book.quantity < quantity:
            raise OutOfStock(f"book {book_id} is out of stock ({book.quantity} left, {quantity} asked)")
        db.execute("UPDATE books SET quantity = quantity - ?, version = ? WHERE id = ?", (quantity, seq, book_id))
        return book


BOOKS_QUERY = frozenset({b"topic", b"limit", b"after"})  # what GET /books reads of its query
# a topic's books (a page of them) in id order: one range of the index books_topic
TOPIC_QUERY = "SELECT id, title FROM books WHERE topic = ? AND id > ? ORDER BY id LIMIT ?"


class CatalogReads:
    """Queries answered by any replica (no log entry)."""

    def __init__(self, store: Store):
        self.db = store.db

    def all(self, page: Page = ALL) -> list[dict[str, Any]]:
        # Each row straight into the dict Book.to_json makes (the same keys in the same
        # order): building a Book per row costs more than the query for a large catalogue.
        rows = self.db.execute(f"SELECT {BOOK_COLUMNS} FROM books WHERE id > ? ORDER BY id LIMIT ?", page.sql())
        return [dict(zip(BOOK_FIELDS, r)) for r in rows]

    def one(self, book_id: int) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {BOOK_COLUMNS} FROM books WHERE id = ?", (book_id,)).fetchone()
        return Book.from_row(row).to_json() if row else None

    def topic(self, topic: str, page: Page = ALL) -> list[dict[str, Any]]:
        rows = self.db.execute(TOPIC_QUERY, (topic, *page.sql()))
        return [{"id": r[0], "title": r[1]} for r in rows]

    def sales(self, after: int, limit: int = SALES_PAGE) -> list[dict[str, Any]]:
        """Sales recorded at log indexes above `after`, oldest first."""
        rows = self.db.execute(f"SELECT {SALE_COLUMNS} FROM sales WHERE seq > ? ORDER BY seq LIMIT ?",
                               (after, limit))
        return [Sale.from_row(r).to_json() for r in rows]


def catalog_app(replica: Replica) -> JsonApp:
    api = JsonApp("catalog")
    reads = CatalogReads(replica.store)

    def seq_header(request: IRequest) -> None:
        replica.require_serving(min_seq_of(request))
        request.setHeader(SEQ_HEADER, str(replica.store.applied).encode())
        request.setHeader(b"X-Bazar-Status", replica.status.encode())

    @api.route("/books", "GET", "books")
    def books(request: IRequest) -> bytes:
        """Every book, or a topic's (`?topic=`); a page of them with `?limit=&after=`."""
        page = page_of(request, allowed=BOOKS_QUERY) or ALL
        seq_header(request)
        topic = request.args.get(b"topic")
        if topic is not None:
            try:
                text = topic[0].decode("utf-8")
            except UnicodeDecodeError:
                return dumps([])
            return dumps(reads.topic(text, page))
        return dumps(reads.all(page))

    @api.route("/books/<string:book_id>", "GET", "book")
    def book(request: IRequest, book_id: str) -> bytes:
        seq_header(request)
        found = reads.one(parse_id(book_id))
        if found is None:
            raise NotFound(f"no book with id {book_id}")
        return dumps(found)

    def book_hit(request: IRequest, rest: bytes) -> bytes | None:
        """GET /books/{id} of an existing book, without Klein's routing (the front
        end's cache misses land here); anything else goes the normal way."""
        if not rest.isdigit() or len(rest) > 18 or not replica.serving:
            return None
        seq_header(request)  # (a reader that needs a newer state gets its 503 before any work)
        found = reads.one(int(rest))
        if found is None:
            return None
        return dumps(found)

    api.fast("GET", "/books/", "book", book_hit, bare=True)

    def books_now(request: IRequest, rest: bytes) -> Any:
        """GET /books (a topic's, a page) without Klein's routing: a front end's search
        miss lands here."""
        return books(request) if not rest else None

    api.fast("GET", "/books", "books", books_now, bare=True)

    @api.rpc(SALES_PATH, "GET", "sales")
    def sales(request: IRequest) -> bytes:
        """Committed sales after `?after=` (a log index): the order primary records
        each as an order (its sweep finds those a crash left unrecorded)."""
        require_secret(request, replica.secret)
        seq_header(request)
        after = (request.args.get(b"after") or [b"0"])[0]
        if not after.isdigit() or len(after) > 18:
            raise Invalid("after must be a log index")
        return dumps({"sales": reads.sales(int(after)), "seq": replica.store.applied})

    install_routes(api, replica)
    return api


@define
class CatalogNode(Node):
    replica: Replica = field(kw_only=True)
    publisher: Publisher = field(kw_only=True)
    app: JsonApp = field(kw_only=True)


def build_catalog(settings: CatalogSettings, *, store: Store, clock: IReactorTime, http: HTTPClient,
                  rng: random.Random | None = None) -> CatalogNode:
    """A catalog replica: its Raft replica over `store`, the publisher of its
    invalidations, its app."""
    replica = Replica(settings.replica, store=store, http=http, clock=clock, rng=rng)
    publisher = Publisher(http=http, clock=clock, secret=settings.replica.secret, frontends=settings.frontends,
                          redis_url=settings.redis, epoch=lambda: replica.epoch, push_delay=settings.push_delay)
    replica.on_commit = publisher.committed
    app = catalog_app(replica)
    return CatalogNode(app.resource(), on_start=[replica.start, publisher.start],
                       on_stop=[replica.stop, publisher.stop],
                       periodic=[(replica.tick_seconds, replica.tick, "the election clock")],
                       replica=replica, publisher=publisher, app=app)


class Options(ReplicaOptions):
    service = "catalog"
    optParameters = [
        ["port", None, 5101, "Port to listen on.", int],
        ["id", None, 1, "This replica's id (one of the ids in --peers).", int],
        ["peers", None, "", "Every replica of the catalog, itself included: 1=http://h:p,2=...,3=..."],
        ["data", None, None, "Data directory (default ./bazar-data/catalog-<id>)."],
        ["frontends", None, "", "Front ends to notify of changes over HTTP: http://h:p,..."],
        ["redis", None, None, "Redis URL to publish invalidations on, e.g. redis://127.0.0.1:6379."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self.settings = CatalogSettings(replica=self.replica_settings(), frontends=tuple(parse_urls(self["frontends"])),
                                        redis=parse_redis(self["redis"]))


def makeService(options: Options, reactor: Any = None) -> MultiService:
    store = Store(os.path.join(options.data_directory(), "catalog.db"), CatalogMachine())
    return serve(lambda clock, http: build_catalog(options.settings, store=store, clock=clock, http=http),
                 options, reactor)
