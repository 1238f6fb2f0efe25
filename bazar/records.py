"""Bazar's records: books, orders and the sales behind them; the cache keys a book
is known by; a page of a list; and the validation of client input into them (a bad
value is an `Invalid` with one sentence saying what is wrong; in an import, the
sentence names the row)."""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any

from attrs import asdict, astuple, fields, frozen

from bazar.errors import Invalid

MAX_PRICE = 1e9
MAX_QUANTITY = 10**6
MAX_TEXT = 200
MAX_BODY = 64 * 1024  # bytes of a public request's body: an import's batch must fit in it
MAX_PAGE = 1000  # books or orders in one page (?limit=)
MAX_ID_DIGITS = 18  # ids are below 10**18: what SQLite's 64-bit integers hold with room to spare

SEED_BOOKS = (
    ("How to get a good grade in DOS in 40 minutes a day.", "distributed systems", 100.0, 85),
    ("RPCs for Noobs.", "distributed systems", 22.35, 60),
    ("Xen and the Art of Surviving Undergraduate School.", "undergraduate school", 50.0, 8),
    ("Cooking for the Impatient Undergrad.", "undergraduate school", 89.33, 65),
    ("How to finish Project 3 on time", "new", 70.0, 40),
    ("Why theory classes are so hard", "new", 100.0, 80),
    ("Spring in the Pioneer Valley", "new", 700.0, 90),
)


@frozen
class Book:
    id: int
    title: str
    topic: str
    price: float
    quantity: int

    @classmethod
    def from_row(cls, row: Any) -> "Book":
        """From a SQLite row whose first columns are BOOK_FIELDS, in that order."""
        return cls(*row[:5])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@frozen
class Order:
    id: int
    book_id: int
    title: str
    quantity: int
    price: float
    total: float
    created: str

    @classmethod
    def from_row(cls, row: Any) -> "Order":
        """From a SQLite row whose first columns are ORDER_FIELDS, in that order."""
        return cls(*row[:7])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@frozen
class Sale:
    """Copies taken from the stock by a purchase (the catalog's record of it, at log
    index `seq`), with the title and price of that moment; `key` is the purchase's
    Idempotency-Key. The order service makes it an order."""

    key: str
    seq: int
    book_id: int
    title: str
    quantity: int
    price: float
    created: str
    created_ts: float

    @classmethod
    def from_row(cls, row: Any) -> "Sale":
        """From a SQLite row whose columns are SALE_FIELDS, in that order."""
        return cls(*row[:8])

    def row(self) -> tuple[Any, ...]:
        return astuple(self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "Sale":
        """A sale as a catalog replica sent it; Invalid when it is not one."""
        if not isinstance(data, dict):
            raise Invalid("a sale is an object")
        try:
            sale = cls(**{name: data[name] for name in SALE_FIELDS})
        except KeyError as missing:
            raise Invalid(f"a sale without {missing}") from None
        types: tuple[type | tuple[type, ...], ...] = (str, int, int, str, int, (int, float), str, (int, float))
        if not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(sale.row(), types)):
            raise Invalid("a sale with a field of the wrong type")
        return sale


BOOK_FIELDS = tuple(a.name for a in fields(Book))
ORDER_FIELDS = tuple(a.name for a in fields(Order))
SALE_FIELDS = tuple(a.name for a in fields(Sale))


def info_key(book_id: int) -> str:
    """The cache key of one book's record (GET /bazar/info/{id})."""
    return f"info:{book_id}"


def search_key(topic: str) -> str:
    """The cache key of one topic's search (GET /bazar/search/{topic})."""
    return f"search:{topic}"


@frozen
class Page:
    """A page of a list in id order: the ids above `after` (-1: from the first), at
    most `limit` of them (None: all the rest)."""

    after: int = -1
    limit: int | None = None

    def sql(self) -> tuple[int, int]:
        """(after, limit) for `WHERE id > ? ... LIMIT ?` (SQLite's LIMIT -1: no limit)."""
        return self.after, self.limit if self.limit is not None else -1

    def query(self) -> str:
        """The page as a query string (`after=5&limit=100`), as the replicas read it."""
        parts = ([f"after={self.after}"] if self.after >= 0 else []) + \
            ([f"limit={self.limit}"] if self.limit is not None else [])
        return "&".join(parts)


ALL = Page()


def parse_page(limit: str | None, after: str | None, what: str = "book") -> Page | None:
    """`?limit=N&after=ID` (either may be left out), or None when neither is given: the
    whole list. limit: 1..MAX_PAGE; after: an id (the page holds the ids above it)."""
    if limit is None and after is None:
        return None
    page_limit = None
    if limit is not None:
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 4 and 1 <= int(limit) <= MAX_PAGE):
            raise Invalid(f"limit must be an integer from 1 to {MAX_PAGE}")
        page_limit = int(limit)
    page_after = -1
    if after is not None:
        if not (after.isascii() and after.isdigit() and len(after) <= MAX_ID_DIGITS):
            raise Invalid(f"after must be {'an' if what[0] in 'aeiou' else 'a'} {what} id (a non-negative integer)")
        page_after = int(after)
    return Page(after=page_after, limit=page_limit)


def page_key(key: str, page: Page) -> str:
    """The cache key of one page of the list cached as `key` (and filed under it, so
    that invalidating `key` drops the page: bazar.cache). After and limit are digits,
    so two pages never share a key, and no key of a whole list starts with "page:"."""
    return f"page:{page.after}:{page.limit or ''}:{key}"


@frozen
class NewBook:
    title: str
    topic: str
    price: float
    quantity: int

    def row(self) -> tuple[str, str, float, int]:
        return self.title, self.topic, self.price, self.quantity


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise Invalid(f"unknown field(s): {', '.join(repr(e)[:40] for e in extra[:5])}")


def price_of(body: dict[str, Any]) -> float:
    if "price" not in body:
        raise Invalid("field 'price' is required")
    value = body["price"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid("field 'price' must be a number")
    value = float(value)
    if not math.isfinite(value) or not 0 < value < MAX_PRICE:
        raise Invalid(f"field 'price' must be a finite number above 0 and below {MAX_PRICE:g}")
    return value


def quantity_of(body: dict[str, Any] | None, default: int | None = None) -> int:
    if body is None or "quantity" not in body:
        if default is None:
            raise Invalid("field 'quantity' is required")
        return default
    value = body["quantity"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("field 'quantity' must be an integer")
    if not 1 <= value <= MAX_QUANTITY:
        raise Invalid(f"field 'quantity' must be between 1 and {MAX_QUANTITY}")
    return value


def text_of(body: dict[str, Any], name: str) -> str:
    if name not in body:
        raise Invalid(f"field {name!r} is required")
    value = body[name]
    if not isinstance(value, str):
        raise Invalid(f"field {name!r} must be a string")
    if not 1 <= len(value) <= MAX_TEXT:
        raise Invalid(f"field {name!r} must be 1 to {MAX_TEXT} characters")
    if not value.isprintable() or not value.strip():
        raise Invalid(f"field {name!r} must be printable text")
    return value


def parse_price(body: dict[str, Any]) -> float:
    _only(body, {"price"})
    return price_of(body)


def parse_restock(body: dict[str, Any]) -> int:
    _only(body, {"quantity"})
    return quantity_of(body)


def parse_purchase(body: dict[str, Any] | None) -> int:
    if body is not None:
        _only(body, {"quantity"})
    return quantity_of(body, default=1)


def parse_new_book(body: dict[str, Any]) -> NewBook:
    _only(body, {"title", "topic", "price", "quantity"})
    return NewBook(title=text_of(body, "title"), topic=text_of(body, "topic"),
                   price=price_of(body), quantity=quantity_of(body))


IMPORT_FIELDS = ("title", "topic", "price", "quantity")  # a CSV import's header, in any order
CSV_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
CSV_QUANTITY = re.compile(r"[0-9]{1,9}")  # (more digits are out of range anyway, and int() of 5,000 refuses)


def _row(where: str, body: dict[str, Any]) -> NewBook:
    """One book of an import: what `parse_new_book` says of it, prefixed with its place."""
    try:
        return parse_new_book(body)
    except Invalid as exc:
        raise Invalid(f"{where}: {exc.message}") from None


def parse_new_books(body: Any) -> tuple[NewBook, ...]:
    """A JSON import: a non-empty list of new books, each as for POST /bazar/books.
    The first bad one is named by its row (1: the list's first item) and field."""
    if not isinstance(body, list):
        raise Invalid("an import is a JSON list of books (or CSV, with Content-Type: text/csv)")
    if not body:
        raise Invalid("an import needs at least one book")
    books = []
    for row, item in enumerate(body, 1):
        if not isinstance(item, dict):
            raise Invalid(f"row {row}: a book must be a JSON object")
        books.append(_row(f"row {row}", item))
    return tuple(books)


def parse_csv_books(data: bytes) -> tuple[NewBook, ...]:
    """A CSV import (UTF-8, an optional byte order mark): a header naming the four
    fields title,topic,price,quantity (in any order), then one book per line (blank
    lines are skipped). The first bad one is named by its row (1: the first book),
    its line in the text, and its field."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Invalid("the CSV is not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    books: list[NewBook] = []
    try:
        header = next(reader, None)
        if header is None or sorted(h.strip() for h in header) != sorted(IMPORT_FIELDS):
            raise Invalid(f"the CSV's first line must be the header {','.join(IMPORT_FIELDS)}")
        names = [h.strip() for h in header]
        line = reader.line_num + 1  # the first line of the next record (a quoted field may span lines)
        for fields_ in reader:
            where, line = f"row {len(books) + 1} (line {line})", reader.line_num + 1
            if not fields_:
                continue
            if len(fields_) != len(names):
                raise Invalid(f"{where}: {len(fields_)} fields, not the header's {len(names)}")
            body: dict[str, Any] = dict(zip(names, fields_))
            price, quantity = body["price"].strip(), body["quantity"].strip()
            if not CSV_NUMBER.fullmatch(price):
                raise Invalid(f"{where}: field 'price' must be a number")
            if not CSV_QUANTITY.fullmatch(quantity):
                raise Invalid(f"{where}: field 'quantity' must be an integer between 1 and {MAX_QUANTITY}")
            body["price"], body["quantity"] = float(price), int(quantity)
            books.append(_row(where, body))
    except csv.Error as exc:
        raise Invalid(f"line {reader.line_num} of the CSV is malformed: {exc}") from None
    if not books:
        raise Invalid("an import needs at least one book")
    return tuple(books)


def parse_idempotency_key(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        key = value.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("the Idempotency-Key header must be UTF-8 text") from None
    if not 1 <= len(key) <= MAX_TEXT or not key.isprintable():
        raise Invalid(f"the Idempotency-Key header must be 1 to {MAX_TEXT} printable characters")
    return key
