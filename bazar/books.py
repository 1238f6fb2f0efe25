"""attrs records for books and orders, and the validation of client input."""

from __future__ import annotations

import math
from typing import Any

from attrs import asdict, fields, frozen

from bazar.web import HTTPError

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


BOOK_FIELDS = tuple(a.name for a in fields(Book))
ORDER_FIELDS = tuple(a.name for a in fields(Order))


@frozen
class NewBook:
    title: str
    topic: str
    price: float
    quantity: int


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise HTTPError(400, f"unknown field(s): {', '.join(repr(e)[:40] for e in extra[:5])}")


def price_of(body: dict[str, Any]) -> float:
    if "price" not in body:
        raise HTTPError(400, "field 'price' is required")
    value = body["price"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HTTPError(400, "field 'price' must be a number")
    value = float(value)
    if not math.isfinite(value) or not 0 < value < MAX_PRICE:
        raise HTTPError(400, f"field 'price' must be a finite number above 0 and below {MAX_PRICE:g}")
    return value


def quantity_of(body: dict[str, Any] | None, default: int | None = None) -> int:
    if body is None or "quantity" not in body:
        if default is None:
            raise HTTPError(400, "field 'quantity' is required")
        return default
    value = body["quantity"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, "field 'quantity' must be an integer")
    if not 1 <= value <= MAX_QUANTITY:
        raise HTTPError(400, f"field 'quantity' must be between 1 and {MAX_QUANTITY}")
    return value


def text_of(body: dict[str, Any], name: str) -> str:
    if name not in body:
        raise HTTPError(400, f"field {name!r} is required")
    value = body[name]
    if not isinstance(value, str):
        raise HTTPError(400, f"field {name!r} must be a string")
    if not 1 <= len(value) <= MAX_TEXT:
        raise HTTPError(400, f"field {name!r} must be 1 to {MAX_TEXT} characters")
    if not value.isprintable() or not value.strip():
        raise HTTPError(400, f"field {name!r} must be printable text")
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
        raise HTTPError(400, "the Idempotency-Key header must be UTF-8 text") from None
    if not 1 <= len(key) <= MAX_TEXT or not key.isprintable():
        raise HTTPError(400, f"the Idempotency-Key header must be 1 to {MAX_TEXT} printable characters")
    return key
