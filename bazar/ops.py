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
from typing import Any, ClassVar, Union

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


CatalogOp = Union[AddBook, UpdatePrice, Restock, Sell, Decrement]
OrderOp = RecordOrder
Operation = Union[CatalogOp, OrderOp]

CATALOG_OPS: dict[str, type[Op]] = {cls.kind: cls for cls in (AddBook, UpdatePrice, Restock, Sell, Decrement)}
ORDER_OPS: dict[str, type[Op]] = {RecordOrder.kind: RecordOrder}


def _field(data: dict[str, Any], name: str, kind: type | None) -> Any:
    if name not in data:
        if kind is None:
            return None
        raise Invalid(f"malformed operation: no {name!r}")
    value = data[name]
    if kind is None:  # an optional string
        ok = value is None or isinstance(value, str)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        wanted = "an integer" if kind is int else "a number" if kind is float else "a string"
        raise Invalid(f"malformed operation: {name!r} is not {wanted}")
    return value


def operation_from_json(data: Any, known: dict[str, type[Op]], service: str) -> Op:
    """The operation `data` stands for (other fields are ignored), or Invalid."""
    if not isinstance(data, dict):
        raise Invalid("malformed operation: not an object")
    cls = known.get(data.get("op"))  # type: ignore[arg-type]
    if cls is None:
        raise Invalid(f"unknown {service} operation {data.get('op')!r}")
    types: dict[str, type | None] = {"int": int, "float": float, "str": str, "str | None": None}
    values = {a.name: _field(data, a.name, types[str(a.type)]) for a in fields(cls)}
    return cls(**values)
