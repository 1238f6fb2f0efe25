"""The writes of Bazar's two replicated services, as typed records.

Each is one entry of its service's log. On the wire and on disk it is a JSON object
`{"op": kind, "rid": request id, ...fields}` (`to_json`), the same bytes on every
replica; a state machine reads it back with `operation_from_json`, which refuses
(`Invalid`) an object that is not one of these. A request id (`rid`) makes a write
apply once however often it is sent (Raft §6.3, `bazar.replication.store`).
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Callable, ClassVar, Union

from attrs import asdict, fields, frozen

from bazar.errors import Invalid


def new_rid() -> str:
    """A request id for a write its client did not name: retries of it apply once."""
    return "fe:" + uuid.uuid4().hex


@frozen
class Op:
    """What every operation has: its kind (the "op" field) and its request id (None:
    an operation that applies every time it is sent; Bazar's own always have one)."""

    kind: ClassVar[str] = ""
    rid: str | None

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, **asdict(self)}


# -- the catalog ------------------------------------------------------------------------

@frozen
class AddBook(Op):
    kind: ClassVar[str] = "add_book"
    title: str
    topic: str
    price: float
    quantity: int


# One book of an import: (title, topic, price, quantity), as validated at the front end.
BookRow = tuple[str, str, float, int]


@frozen
class ImportBooks(Op):
    """Many new books in one entry: applied all or nothing, each taking the next id
    (at apply time, like `AddBook`, so no two replicas or imports can give one id twice)."""

    kind: ClassVar[str] = "import_books"
    books: tuple[BookRow, ...]

    def to_json(self) -> dict[str, Any]:
        # (attrs' asdict would walk every row looking for attrs instances)
        return {"op": self.kind, "rid": self.rid, "books": [list(book) for book in self.books]}


@frozen
class UpdatePrice(Op):
    kind: ClassVar[str] = "update_price"
    id: int
    price: float


@frozen
class Restock(Op):
    kind: ClassVar[str] = "restock"
    id: int
    quantity: int


@frozen
class Sell(Op):
    """A purchase's first write: take `quantity` copies of book `id` and record the
    sale under the purchase's key, with the title and price of that moment."""

    kind: ClassVar[str] = "sell"
    key: str
    id: int
    quantity: int
    created: str
    created_ts: float


@frozen
class Decrement(Op):
    """Take copies without recording a sale: the stock step of the three-write
    purchase of earlier versions, still applied when a log holds one."""

    kind: ClassVar[str] = "decrement"
    id: int
    quantity: int


# -- the order service ----------------------------------------------------------------

@frozen
class RecordOrder(Op):
    """A purchase's second write: the committed sale `idem` becomes an order."""

    kind: ClassVar[str] = "record"
    idem: str
    book_id: int
    quantity: int
    title: str
    price: float
    sale_seq: int
    created: str
    created_ts: float


CatalogOp = Union[AddBook, ImportBooks, UpdatePrice, Restock, Sell, Decrement]
OrderOp = RecordOrder
Operation = Union[CatalogOp, OrderOp]

CATALOG_OPS: dict[str, type[Op]] = {cls.kind: cls for cls in (AddBook, ImportBooks, UpdatePrice, Restock, Sell,
                                                               Decrement)}
ORDER_OPS: dict[str, type[Op]] = {RecordOrder.kind: RecordOrder}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _scalar(kind: type | None) -> Callable[[str, Any], Any]:
    """The reader of one field of type `kind` (None: an optional string)."""
    wanted = "an integer" if kind is int else "a number" if kind is float else "a string"

    def read(name: str, value: Any) -> Any:
        if kind is None:
            ok = value is None or isinstance(value, str)
        elif kind is int:
            ok = _is_int(value)
        elif kind is float:
            ok = _is_number(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise Invalid(f"malformed operation: {name!r} is not {wanted}")
        return value

    return read


def _book_rows(name: str, value: Any) -> tuple[BookRow, ...]:
    """A list of [title, topic, price, quantity] rows, each exactly that: the types are
    checked here, the limits at the front end (as for `AddBook`)."""
    if not isinstance(value, list):
        raise Invalid(f"malformed operation: {name!r} is not a list of books")
    rows = []
    for i, row in enumerate(value, 1):
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str) and isinstance(row[1], str)
                and _is_number(row[2]) and _is_int(row[3])):
            raise Invalid(f"malformed operation: {name!r} row {i} is not [title, topic, price, quantity]")
        rows.append((row[0], row[1], float(row[2]), row[3]))
    return tuple(rows)


# A field's reader, by its annotation as written in the record above.
READERS: dict[str, Callable[[str, Any], Any]] = {
    "int": _scalar(int), "float": _scalar(float), "str": _scalar(str), "str | None": _scalar(None),
    "tuple[BookRow, ...]": _book_rows,
}


def operation_from_json(data: Any, known: dict[str, type[Op]], service: str) -> Op:
    """The operation `data` stands for (other fields are ignored), or Invalid."""
    if not isinstance(data, dict):
        raise Invalid("malformed operation: not an object")
    cls = known.get(data.get("op"))  # type: ignore[arg-type]
    if cls is None:
        raise Invalid(f"unknown {service} operation {data.get('op')!r}")
    values: dict[str, Any] = {}
    for a in fields(cls):
        if a.name not in data:
            if a.type != "str | None":
                raise Invalid(f"malformed operation: no {a.name!r}")
            values[a.name] = None
        else:
            values[a.name] = READERS[str(a.type)](a.name, data[a.name])
    return cls(**values)
