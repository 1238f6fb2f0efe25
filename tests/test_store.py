"""bazar.store: one replica's SQLite state and ordered write log, on real files."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bazar.books import SEED_BOOKS
from bazar.catalog import CatalogMachine
from bazar.order import OrderMachine
from bazar.store import Entry, OpError, Store


def books(store: Store) -> list[tuple[Any, ...]]:
    return list(store.db.execute("SELECT id, title, topic, price, quantity FROM books ORDER BY id"))


def everything(store: Store) -> tuple[Any, ...]:
    return (list(store.db.execute("SELECT * FROM books ORDER BY id")),
            list(store.db.execute("SELECT * FROM requests ORDER BY rid")),
            [(e.seq, e.epoch, e.op) for e in store.entries_after(store.base_seq, 10**6)],
            store.last_seq, store.last_epoch)


def catalog(path: Path | str, name: str = "c.sqlite3") -> Store:
    return Store(os.path.join(str(path), name), CatalogMachine())


def restock(rid: str, book: int = 1, n: int = 5) -> dict[str, Any]:
    return {"op": "restock", "rid": rid, "id": book, "quantity": n}


def decrement(rid: str, book: int = 1, n: int = 1) -> dict[str, Any]:
    return {"op": "decrement", "rid": rid, "id": book, "quantity": n}


def test_a_new_store_is_seeded_once_with_an_empty_log(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    assert [b[1:] for b in books(store)] == [tuple(b) for b in SEED_BOOKS]
    assert (store.last_seq, store.last_epoch, store.promised, store.base_seq) == (0, 0, 0, 0)
    assert store.entries_after(0) == []
    store.execute(decrement("d", 2, 8), epoch=1)
    store.close()
    again = catalog(tmp_path)
    assert again.db.execute("SELECT quantity FROM books WHERE id = 2").fetchone() == (0,)
    assert len(books(again)) == 7


def test_execute_orders_writes_and_records_them(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    first = store.execute(restock("a", 1, 5), epoch=3)
    second = store.execute({"op": "update_price", "rid": "b", "id": 4, "price": 12.5}, epoch=3)
    third = store.execute({"op": "add_book", "rid": "c", "title": "T", "topic": "fresh", "price": 1.0,
                           "quantity": 2}, epoch=4)
    assert (first.seq, second.seq, third.seq) == (1, 2, 3)
    assert first.new and second.new and third.new
    assert first.result["quantity"] == 65 and first.keys == ("info:1",)
    assert second.result["price"] == 12.5
    assert third.result == {"id": 7, "title": "T", "topic": "fresh", "price": 1.0, "quantity": 2}
    assert third.keys == ("info:7", "search:fresh")
    assert (store.last_seq, store.last_epoch) == (3, 4)
    assert [(e.seq, e.epoch, e.op["rid"]) for e in store.entries_after(0)] == [(1, 3, "a"), (2, 3, "b"), (3, 4, "c")]


def test_the_same_request_id_gives_the_same_outcome_and_no_new_entry(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    first = store.execute(decrement("order:1", 1, 2), epoch=1)
    before = everything(store)
    # the same id again, even with another body (a retried request): the recorded outcome
    again = store.execute(decrement("order:1", 1, 50), epoch=2)
    assert (again.result, again.seq, again.keys, again.new) == (first.result, first.seq, first.keys, False)
    assert everything(store) == before


@pytest.mark.parametrize("op, status", [
    (decrement("x", 2, 9), 409),          # 8 in stock
    (decrement("x", 99, 1), 404),         # no such book
    (restock("x", 99), 404),
    ({"op": "update_price", "rid": "x", "id": 123, "price": 1.0}, 404),
    ({"op": "teleport", "rid": "x", "id": 1}, 400),
    ({"op": "restock", "rid": "x", "id": 1}, 400),          # no quantity: KeyError
    ({"op": "restock", "rid": "x", "id": "one", "quantity": 1}, 400),  # ValueError
    ({"op": "decrement", "rid": "x", "id": 1, "quantity": 0}, 400),
    # values the tables refuse: a constraint, NaN (stored as NULL), integers beyond 64 bits
    ({"op": "restock", "rid": "x", "id": 1, "quantity": -1000}, 400),
    ({"op": "add_book", "rid": "x", "title": "t", "topic": "t", "price": 1.0, "quantity": -1}, 400),
    ({"op": "update_price", "rid": "x", "id": 1, "price": "nan"}, 400),
    ({"op": "restock", "rid": "x", "id": 1, "quantity": 2**63}, 400),
    ({"op": "restock", "rid": "x", "id": 2**70, "quantity": 1}, 400),
])
def test_failed_operations_change_nothing_and_log_nothing(tmp_path: Path, op: dict[str, Any], status: int) -> None:
    store = catalog(tmp_path)
    store.execute(restock("warm-up"), epoch=1)
    before = everything(store)
    with pytest.raises(OpError) as caught:
        store.execute(op, epoch=1)
    assert caught.value.status == status
    assert everything(store) == before
    # the failed request id is not remembered: a later valid request with it applies
    store.execute(restock("x"), epoch=1)
    assert store.last_seq == 2


class HalfWayFails(CatalogMachine):
    """Changes a row, then fails: the transaction must take the change back."""

    def apply(self, db: sqlite3.Connection, op: dict[str, Any], seq: int) -> Any:
        if op["op"] == "half":
            db.execute("UPDATE books SET quantity = 0")
            db.execute("INSERT INTO books (id, title, topic, price, quantity) VALUES (100, 't', 't', 1, 1)")
            raise OpError(409, "changed my mind")
        if op["op"] == "crash":
            db.execute("UPDATE books SET quantity = 0")
            raise RuntimeError("a bug")
        return super().apply(db, op, seq)


@pytest.mark.parametrize("kind, error", [("half", OpError), ("crash", RuntimeError)])
def test_an_error_after_partial_changes_rolls_everything_back(tmp_path: Path, kind: str, error: type) -> None:
    store = Store(str(tmp_path / "h.sqlite3"), HalfWayFails())
    store.execute(restock("r"), epoch=1)
    before = everything(store)
    with pytest.raises(error):
        store.execute({"op": kind, "rid": "boom"}, epoch=1)
    assert everything(store) == before
    assert store.execute(restock("after"), epoch=1).seq == 2  # the store is still usable


def test_append_applies_following_entries_in_one_transaction(tmp_path: Path) -> None:
    primary, backup = catalog(tmp_path, "p.sqlite3"), catalog(tmp_path, "b.sqlite3")
    for i in range(5):
        primary.execute(restock(f"r{i}", i, i + 1), epoch=1)
    entries = primary.entries_after(0)
    outcomes = backup.append(entries[:2])
    assert [o.seq for o in outcomes] == [1, 2] and outcomes[0].result["quantity"] == 86
    assert backup.append([]) == []
    before = everything(backup)
    # a gap (3 is missing) and a batch that does not start after 2: nothing is applied
    for bad in ([entries[3]], [entries[2], entries[4]], [entries[1], entries[2]]):
        with pytest.raises(ValueError):
            backup.append(bad)
        assert everything(backup) == before
    backup.append(entries[2:])
    assert everything(backup) == everything(primary)


def test_append_failures_roll_back_the_whole_batch(tmp_path: Path) -> None:
    backup = catalog(tmp_path)
    good = Entry(1, 1, restock("a"))
    broken = Entry(2, 1, {"op": "restock", "rid": "b", "id": 1})  # no quantity
    before = everything(backup)
    with pytest.raises(KeyError):
        backup.append([good, broken])
    assert everything(backup) == before


def test_appended_request_ids_stay_idempotent_after_failover(tmp_path: Path) -> None:
    primary, backup = catalog(tmp_path, "p.sqlite3"), catalog(tmp_path, "b.sqlite3")
    done = primary.execute(decrement("order:7", 3, 4), epoch=1)
    backup.append(primary.entries_after(0))
    # the backup becomes primary; the client retries the same request
    retried = backup.execute(decrement("order:7", 3, 4), epoch=2)
    assert (retried.new, retried.seq, retried.result) == (False, done.seq, done.result)
    assert backup.last_seq == 1


def test_epoch_at_and_entries_after(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    for i, epoch in enumerate([1, 1, 2, 5], 1):
        store.execute(restock(f"r{i}"), epoch=epoch)
    assert [store.epoch_at(s) for s in range(0, 6)] == [0, 1, 1, 2, 5, None]
    assert store.epoch_at(-1) is None
    assert [e.seq for e in store.entries_after(1)] == [2, 3, 4]
    assert [e.seq for e in store.entries_after(1, limit=2)] == [2, 3]
    assert store.entries_after(4) == []
    assert Entry.from_json(orjson.loads(orjson.dumps(store.entries_after(0)[2].to_json()))) == store.entries_after(0)[2]


def test_snapshot_and_install_round_trip(tmp_path: Path) -> None:
    source, target = catalog(tmp_path, "s.sqlite3"), catalog(tmp_path, "t.sqlite3")
    source.execute(restock("a"), epoch=1)
    source.execute({"op": "add_book", "rid": "b", "title": "New", "topic": "x", "price": 3.0, "quantity": 1}, epoch=2)
    source.execute(decrement("c", 7, 1), epoch=2)
    target.execute(restock("diverged", 0, 1000), epoch=1)  # something the source never had
    snap = orjson.loads(orjson.dumps(source.snapshot()))  # it travels as JSON
    target.install(snap)
    assert (target.last_seq, target.last_epoch, target.base_seq, target.base_epoch) == (3, 2, 3, 2)
    assert books(target) == books(source)
    assert target.entries_after(0) == []
    assert target.epoch_at(3) == 2 and target.epoch_at(2) is None
    # the request ids came along: retried requests are still recognised
    assert target.execute(decrement("c", 7, 1), epoch=3).new is False
    # and the log continues right after the snapshot
    source.execute(restock("d", 5, 2), epoch=2)
    target.append(source.entries_after(3))
    assert books(target) == books(source)
    assert (target.last_seq, target.last_epoch) == (4, 2)


def test_a_broken_snapshot_changes_nothing(tmp_path: Path) -> None:
    source, target = catalog(tmp_path, "s.sqlite3"), catalog(tmp_path, "t.sqlite3")
    source.execute(restock("a"), epoch=1)
    target.execute(restock("b"), epoch=1)
    before = everything(target)
    snap = source.snapshot()
    del snap["tables"]["requests"]
    with pytest.raises(KeyError):
        target.install(snap)
    assert everything(target) == before


def test_reopening_keeps_state_log_and_metadata(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    store.execute(restock("a"), epoch=2)
    store.execute(restock("b"), epoch=3)
    store.promise(4)
    store.promise(1)  # never goes back
    assert store.promised == 4
    before = everything(store)
    store.close()
    again = catalog(tmp_path)
    assert everything(again) == before
    assert (again.last_seq, again.last_epoch, again.promised) == (2, 3, 4)
    assert again.execute(restock("a"), epoch=4).new is False


def test_reopening_after_a_snapshot_keeps_its_base(tmp_path: Path) -> None:
    source = catalog(tmp_path, "s.sqlite3")
    for i in range(3):
        source.execute(restock(f"r{i}"), epoch=2)
    target = catalog(tmp_path, "t.sqlite3")
    target.install(source.snapshot())
    target.close()
    again = catalog(tmp_path, "t.sqlite3")
    assert (again.base_seq, again.base_epoch, again.last_seq, again.last_epoch) == (3, 2, 3, 2)
    assert again.epoch_at(3) == 2
    assert books(again) == books(source)


def test_order_machine_create_is_keyed_and_settles_once(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "o.sqlite3"), OrderMachine())
    create = {"op": "create", "rid": "create:k", "idem": "k", "book_id": 3, "quantity": 2,
              "created": "now", "created_ts": 1.0}
    order = store.execute(create, epoch=1).result
    assert (order["id"], order["status"]) == (1, "pending")
    # another request id with the same idempotency key: the same order
    again = store.execute({**create, "rid": "create:k-again"}, epoch=1).result
    assert again["id"] == 1
    confirmed = store.execute({"op": "confirm", "rid": "c", "id": 1, "title": "T", "price": 2.5}, epoch=1).result
    assert (confirmed["status"], confirmed["total"], confirmed["title"]) == ("confirmed", 5.0, "T")
    late = store.execute({"op": "fail", "rid": "f", "id": 1, "reason": "late"}, epoch=1).result
    assert late["status"] == "confirmed"  # a settled order stays settled
    with pytest.raises(OpError) as caught:
        store.execute({"op": "confirm", "rid": "x", "id": 9, "title": "T", "price": 1.0}, epoch=1)
    assert caught.value.status == 404


# -- property: the log replays to the same state, in any batching -------------------

ops = st.lists(st.one_of(
    st.builds(lambda r, b, n: restock(f"r{r}", b, n), st.integers(0, 15), st.integers(0, 8), st.integers(1, 50)),
    st.builds(lambda r, b, n: decrement(f"r{r}", b, n), st.integers(0, 15), st.integers(0, 8), st.integers(1, 40)),
    st.builds(lambda r, b, p: {"op": "update_price", "rid": f"r{r}", "id": b, "price": p},
              st.integers(0, 15), st.integers(0, 8), st.floats(0.01, 1e6)),
    st.builds(lambda r, t: {"op": "add_book", "rid": f"r{r}", "title": "t", "topic": t, "price": 1.0,
                            "quantity": 3}, st.integers(0, 15), st.sampled_from(["a", "b"])),
), max_size=25)


@settings(max_examples=50, deadline=None)
@given(ops=ops, cuts=st.lists(st.integers(0, 25), max_size=4), snap_at=st.integers(0, 25))
def test_any_history_replays_identically(ops: list[dict[str, Any]], cuts: list[int], snap_at: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        primary = catalog(root, "p.sqlite3")
        stock = {b: q for b, (_, _, _, q) in enumerate(SEED_BOOKS)}
        seen: dict[str, Any] = {}
        for op in ops:
            try:
                outcome = primary.execute(op, epoch=1)
            except OpError as exc:
                assert op["rid"] not in seen
                assert exc.status == 404 or (op["op"] == "decrement" and stock[op["id"]] < op["quantity"])
                continue
            if op["rid"] in seen:
                assert not outcome.new and outcome.result == seen[op["rid"]]
                continue
            seen[op["rid"]] = outcome.result
            if op["op"] == "restock":
                stock[op["id"]] += op["quantity"]
            elif op["op"] == "decrement":
                stock[op["id"]] -= op["quantity"]
            elif op["op"] == "add_book":
                stock[len(stock)] = 3
        assert {b[0]: b[4] for b in books(primary)} == stock
        assert min(stock.values()) >= 0
        log = primary.entries_after(0, 10**6)
        assert [e.seq for e in log] == list(range(1, len(log) + 1))

        backup = catalog(root, "b.sqlite3")
        bounds = sorted({0, len(log), *(c for c in cuts if c <= len(log))})
        for lo, hi in zip(bounds, bounds[1:]):
            backup.append(log[lo:hi])
        assert everything(backup) == everything(primary)

        # a replica joining from a snapshot taken part way, then the rest of the log
        late = catalog(root, "l.sqlite3")
        point = min(snap_at, len(log))
        partial = catalog(root, "x.sqlite3")
        partial.append(log[:point])
        late.install(partial.snapshot())
        late.append(log[point:])
        assert books(late) == books(primary)
        assert (late.last_seq, late.last_epoch) == (primary.last_seq, primary.last_epoch)
        for s in (primary, backup, late, partial):
            s.close()
