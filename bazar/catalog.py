"""The catalog service: books in SQLite, replicated; reads from any replica, writes
through the primary. A purchase takes its copies here first: `sell` is a conditional
stock decrement that also records the sale (book, quantity, title and price at that
moment, keyed by the purchase's key), so a sale never depends on a later write to be
found again (the order service records every sale as an order, see bazar.order)."""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.application.service import MultiService
from twisted.python import usage

from bazar.books import BOOK_FIELDS, SEED_BOOKS, Book
from bazar.replication import Replica, install_routes
from bazar.service import ReplicaOptions
from bazar.store import OpError, Store
from bazar.web import HTTPError, JsonApp, dumps, parse_id, require_secret

BOOK_COLUMNS = ", ".join(BOOK_FIELDS)
SALE_COLUMNS = ("key", "seq", "book_id", "title", "quantity", "price", "created", "created_ts")
SALES_PAGE = 500


def book_json(row: tuple[Any, ...]) -> dict[str, Any]:
    return Book.from_row(row).to_json()


class CatalogMachine:
    """The catalog's deterministic state: every replica applies the same ops in the
    same order and ends with the same books."""

    tables: tuple[str, ...] = ("books",)

    def create(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, "
                   "topic TEXT NOT NULL, price REAL NOT NULL, quantity INTEGER NOT NULL CHECK (quantity >= 0), "
                   "version INTEGER NOT NULL DEFAULT 0)")
        db.execute("CREATE INDEX IF NOT EXISTS books_topic ON books (topic)")
        db.execute("CREATE TABLE IF NOT EXISTS sales (key TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, "
                   "book_id INTEGER NOT NULL, title TEXT NOT NULL, quantity INTEGER NOT NULL, "
                   "price REAL NOT NULL, created TEXT NOT NULL, created_ts REAL NOT NULL)")
        seeded = db.execute("SELECT value FROM meta WHERE key = 'seeded'").fetchone()
        if not seeded:
            db.executemany("INSERT OR IGNORE INTO books (id, title, topic, price, quantity) VALUES (?, ?, ?, ?, ?)",
                           [(i, *book) for i, book in enumerate(SEED_BOOKS)])
            db.execute("INSERT INTO meta (key, value) VALUES ('seeded', 1)")

    def _book(self, db: sqlite3.Connection, book_id: int) -> tuple[Any, ...]:
        row = db.execute(f"SELECT {BOOK_COLUMNS} FROM books WHERE id = ?", (book_id,)).fetchone()
        if row is None:
            raise OpError(404, f"no book with id {book_id}")
        return tuple(row)

    def apply(self, db: sqlite3.Connection, op: dict[str, Any], seq: int) -> tuple[dict[str, Any], tuple[str, ...]]:
        kind = op["op"]
        if kind == "add_book":
            (book_id,) = db.execute("SELECT COALESCE(MAX(id), -1) + 1 FROM books").fetchone()
            db.execute("INSERT INTO books (id, title, topic, price, quantity, version) VALUES (?, ?, ?, ?, ?, ?)",
                       (book_id, str(op["title"]), str(op["topic"]), float(op["price"]), int(op["quantity"]), seq))
            return book_json(self._book(db, book_id)), (f"info:{book_id}", f"search:{op['topic']}")
        book_id = int(op["id"])
        book = self._book(db, book_id)
        if kind == "update_price":
            db.execute("UPDATE books SET price = ?, version = ? WHERE id = ?", (float(op["price"]), seq, book_id))
        elif kind == "restock":
            db.execute("UPDATE books SET quantity = quantity + ?, version = ? WHERE id = ?",
                       (int(op["quantity"]), seq, book_id))
        elif kind in ("decrement", "sell"):
            quantity = int(op["quantity"])
            if quantity < 1:
                raise OpError(400, "quantity must be positive")
            if book[4] < quantity:
                raise OpError(409, f"book {book_id} is out of stock ({book[4]} left, {quantity} asked)")
            db.execute("UPDATE books SET quantity = quantity - ?, version = ? WHERE id = ?", (quantity, seq, book_id))
            if kind == "sell":
                sale = (str(op["key"]), seq, book_id, book[1], quantity, book[3], str(op["created"]),
                        float(op["created_ts"]))
                db.execute(f"INSERT INTO sales ({', '.join(SALE_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", sale)
                return {"book": book_json(self._book(db, book_id)), "sale": dict(zip(SALE_COLUMNS, sale))}, \
                    (f"info:{book_id}",)
        else:
            raise OpError(400, f"unknown catalog operation {kind!r}")
        return book_json(self._book(db, book_id)), (f"info:{book_id}",)


class CatalogReads:
    """Queries answered by any replica (no log entry)."""

    def __init__(self, store: Store):
        self.db = store.db

    def all(self) -> list[dict[str, Any]]:
        return [book_json(r) for r in self.db.execute(f"SELECT {BOOK_COLUMNS} FROM books ORDER BY id")]

    def one(self, book_id: int) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {BOOK_COLUMNS} FROM books WHERE id = ?", (book_id,)).fetchone()
        return book_json(row) if row else None

    def topic(self, topic: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT id, title FROM books WHERE topic = ? ORDER BY id", (topic,))
        return [{"id": r[0], "title": r[1]} for r in rows]

    def sales(self, after: int, limit: int = SALES_PAGE) -> list[dict[str, Any]]:
        """Sales recorded at log indexes above `after`, oldest first."""
        rows = self.db.execute(f"SELECT {', '.join(SALE_COLUMNS)} FROM sales WHERE seq > ? ORDER BY seq LIMIT ?",
                               (after, limit))
        return [dict(zip(SALE_COLUMNS, r)) for r in rows]


def catalog_app(replica: Replica, secret: str | None) -> JsonApp:
    api = JsonApp("catalog")
    reads = CatalogReads(replica.store)

    def seq_header(request: Any) -> None:
        replica.require_serving()
        request.setHeader(b"X-Bazar-Seq", str(replica.store.applied).encode())
        request.setHeader(b"X-Bazar-Status", replica.status.encode())

    @api.route("/health", "GET", "health")
    def health(request: Any) -> dict[str, Any]:
        return replica.health()

    @api.route("/books", "GET", "books")
    def books(request: Any) -> bytes:
        seq_header(request)
        topic = request.args.get(b"topic")
        if topic is not None:
            try:
                text = topic[0].decode("utf-8")
            except UnicodeDecodeError:
                return dumps([])
            return dumps(reads.topic(text))
        return dumps(reads.all())

    @api.route("/books/<string:book_id>", "GET", "book")
    def book(request: Any, book_id: str) -> bytes:
        seq_header(request)
        found = reads.one(parse_id(book_id))
        if found is None:
            raise HTTPError(404, f"no book with id {book_id}")
        return dumps(found)

    def book_hit(request: Any, rest: bytes) -> bytes | None:
        """GET /books/{id} for an existing book without Klein's routing (the front
        end's cache misses land here); anything else goes the normal way."""
        if not rest.isdigit() or len(rest) > 18 or not replica.serving:
            return None
        found = reads.one(int(rest))
        if found is None:
            return None
        seq_header(request)
        return dumps(found)

    api.shortcut(b"GET", b"/books/", "book", book_hit)

    @api.route("/internal/sales", "GET", "sales")
    def sales(request: Any) -> bytes:
        """Committed sales after `?after=` (a log index): the order primary records
        each as an order (its sweep finds those a crash left unrecorded)."""
        require_secret(request, secret)
        seq_header(request)
        after = (request.args.get(b"after") or [b"0"])[0]
        if not after.isdigit() or len(after) > 18:
            raise HTTPError(400, "after must be a log index")
        return dumps({"sales": reads.sales(int(after)), "seq": replica.store.applied})

    install_routes(api, replica, secret)
    return api


class Options(ReplicaOptions):
    optParameters = [
        ["port", None, 5101, "Port to listen on.", int],
        ["id", None, 1, "This replica's id (one of the ids in --peers).", int],
        ["peers", None, "", "Every replica of the catalog, itself included: 1=http://h:p,2=...,3=..."],
        ["data", None, None, "Data directory (default ./bazar-data/catalog-<id>)."],
        ["frontends", None, "", "Front ends to notify of changes over HTTP: http://h:p,..."],
        ["redis", None, None, "Redis URL to publish invalidations on, e.g. redis://127.0.0.1:6379."],
    ]


def makeService(options: usage.Options) -> MultiService:
    from bazar.invalidation import Publisher
    from bazar.service import ReplicaProcess, parse_urls

    process = ReplicaProcess(options, "catalog", CatalogMachine(), "catalog.db")
    publisher = Publisher(http=process.http, clock=process.reactor, secret=process.secret,
                          frontends=parse_urls(options["frontends"]), redis_url=options["redis"],
                          epoch=lambda: process.replica.epoch)
    process.replica.on_commit = publisher.committed
    process.on_start.append(publisher.start)
    process.on_stop.append(publisher.stop)
    return process.serve(catalog_app(process.replica, process.secret).resource())
