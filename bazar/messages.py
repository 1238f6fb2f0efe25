"""The internal doors between Bazar's processes and the typed bodies they carry (Raft's
own messages are in `bazar.replication.raft`; an applied write's answer is
`bazar.replication.store.Outcome`; an invalidation is `bazar.invalidation.Announcement`).

Every door is behind the cluster secret and is an exact path in its app's RPC table
(`bazar.http.app.JsonApp.rpc`). A body is made with `to_json` and read back with
`from_json`, which refuses (`Invalid`) anything that is not one."""

from __future__ import annotations

from typing import Any

from attrs import frozen

from bazar.errors import Invalid

RAFT_PATH = "/internal/raft"  # POST a Raft message; the replies come back in the answer
STATUS_PATH = "/internal/status"  # GET a replica's health, and whether it is pristine
# POST {"op": operation}: a write, forwarded to the primary. With "early": true, a primary
# may answer in two parts (EARLY_HEADER): the outcome once decided, then its acknowledgement.
WRITE_PATH = "/internal/write"
PURCHASE_PATH = "/internal/purchase"  # POST PurchaseRequest to the order primary: Purchased
SALES_PATH = "/internal/sales"  # GET ?after=INDEX: the catalog's sales after a log index, SALES_PAGE at most
# POST {"messages": [announcement, ...]} to a front end; from a sibling on a shared port,
# a purchase's order index too: "order_seq" (bazar.invalidation.Siblings)
PUSH_PATH = "/internal/invalidate"
SNAPSHOT_PATH = "/internal/snapshot"  # POST a chunk of the leader's state to a backup that needs it (§5.3)

SALES_PAGE = 500
HOPS_HEADER = b"X-Bazar-Hops"  # how many replicas a forwarded request has passed through
# On a write's answer: it comes in two parts, one JSON line each (bazar.http.client.call_early)
EARLY_HEADER = b"X-Bazar-Early"
SEQ_HEADER = b"X-Bazar-Seq"  # on a replica's read answer: the index of the last write it applied
# On a read: the index of the oldest state the reader can use. A replica that has not
# applied it answers 503 at once, rather than build an answer the reader would drop.
MIN_SEQ_HEADER = b"X-Bazar-Min-Seq"


@frozen
class PurchaseRequest:
    """What the front end asks the order primary to buy."""

    book_id: int
    quantity: int
    key: str

    def to_json(self) -> dict[str, Any]:
        return {"book_id": self.book_id, "quantity": self.quantity, "key": self.key}

    @classmethod
    def from_json(cls, body: Any) -> PurchaseRequest:
        if not isinstance(body, dict):
            raise Invalid("a purchase needs book_id, quantity and key")
        book_id, quantity, key = body.get("book_id"), body.get("quantity"), body.get("key")
        if type(book_id) is not int or type(quantity) is not int or not isinstance(key, str):
            raise Invalid("a purchase needs book_id, quantity and key")
        return cls(book_id, quantity, key)


@frozen
class Purchased:
    """The answer to a purchase: the order, and the two log positions the front end
    needs to read its own writes (the catalog's sale, with the cache keys it changed;
    the order's index)."""

    order: dict[str, Any]
    catalog_seq: int
    catalog_keys: tuple[str, ...]
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {"order": self.order, "catalog": {"seq": self.catalog_seq, "keys": list(self.catalog_keys)},
                "seq": self.seq}

    @classmethod
    def from_json(cls, data: Any) -> Purchased:
        try:
            order, catalog, seq = data["order"], data["catalog"], data["seq"]
            catalog_seq, keys = catalog["seq"], catalog["keys"]
        except (KeyError, TypeError):
            raise Invalid("a malformed purchase answer") from None
        if not isinstance(order, dict) or type(seq) is not int or type(catalog_seq) is not int \
                or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise Invalid("a malformed purchase answer")
        return cls(order, catalog_seq, tuple(keys), seq)
