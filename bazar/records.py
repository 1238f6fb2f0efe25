"""Bazar's records: books, orders and the sales behind them; the cache keys a book
is known by; and the validation of client input into them (a bad value is an
`Invalid` with one sentence saying what is wrong)."""

from __future__ import annotations

import math
from typing import Any

from attrs import asdict, astuple, fields, frozen

from bazar.errors import Invalid

MAX_PRICE = 1e9
MAX_QUANTITY = 10**6
MAX_TEXT = 200

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
class NewBook:
    title: str
    topic: str
    price: float
    quantity: int


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
