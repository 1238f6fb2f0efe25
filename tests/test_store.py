"""bazar.replication.store: one replica's SQLite file (the Raft log, the hard state and the
state machine's tables), on real files."""

from __future__ import annotations

import glob
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pytest
from attrs import evolve, frozen
from hypothesis import given, settings
from hypothesis import strategies as st

from bazar.catalog import CatalogMachine
from bazar.errors import Invalid, OutOfStock
from bazar.ops import Op
from bazar.order import OrderMachine, record_op
from bazar.records import SEED_BOOKS, Sale
from bazar.replication.store import Entry, Outcome, Store, fingerprint

# -- helpers --------------------------------------------------------------------------


def catalog(path: Path | str, name: str = "c.sqlite3", **kw: Any) -> Store:
    return Store(os.path.join(str(path), name), CatalogMachine(), **kw)


def reopen(store: Store) -> Store:
    """A clean restart: close (which flushes) and open the same file again."""
    store.close()
    return Store(store.path, type(store.machine)())


def crash(store: Store) -> Store:
    """The process dies: the connection goes away without a flush."""
    store.db.close()
    return Store(store.path, type(store.machine)())


def books(store: Store) -> list[tuple[Any, ...]]:
    return list(store.db.execute("SELECT id, title, topic, price, quantity FROM books ORDER BY id"))


def quantity(store: Store, book: int) -> int:
    return int(store.db.execute("SELECT quantity FROM books WHERE id = ?", (book,)).fetchone()[0])


def tables(store: Store) -> tuple[Any, ...]:
    """What the state machine holds: its tables and the recorded request outcomes."""
    rows = [list(store.db.execute(f"SELECT * FROM {t} ORDER BY rowid")) for t in store.machine.tables]
    return (*rows, list(store.db.execute("SELECT * FROM requests ORDER BY rid")))


def everything(store: Store) -> tuple[Any, ...]:
    """All the durable state, as the file and as the Store's attributes say it."""
    return (tables(store),
            list(store.db.execute("SELECT idx, term, op FROM raft_log ORDER BY idx")),
            list(store.db.execute("SELECT key, value FROM meta ORDER BY key")),
            (store.term, store.vote, store.voter, store.applied, store.last_index()),
            [store.term_at(i) for i in range(store.last_index() + 2)])


def restock(rid: str | None, book: int = 1, n: int = 5) -> dict[str, Any]:
    return {"op": "restock", "rid": rid, "id": book, "quantity": n}


def decrement(rid: str | None, book: int = 1, n: int = 1) -> dict[str, Any]:
    return {"op": "decrement", "rid": rid, "id": book, "quantity": n}


def add_book(rid: str | None, topic: str = "fresh", n: int = 3) -> dict[str, Any]:
    return {"op": "add_book", "rid": rid, "title": "T", "topic": topic, "price": 1.0, "quantity": n}


def feed(store: Store, *ops: dict[str, Any] | None, term: int = 1) -> list[Outcome]:
    """Append ops after the log's end and apply them (a leader's happy path)."""
    first = store.last_index() + 1
    entries = [Entry(first + i, term, op) for i, op in enumerate(ops)]
    store.append(entries)
    return [store.apply(e) for e in entries]


def feed1(store: Store, op: dict[str, Any] | None, term: int = 1) -> Outcome:
    (outcome,) = feed(store, op, term=term)
    return outcome


# -- a new store ----------------------------------------------------------------------


def test_a_new_store_is_pristine_and_seeded_once(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    assert [b[1:] for b in books(store)] == [tuple(b) for b in SEED_BOOKS]
    assert (store.term, store.vote, store.voter, store.applied, store.last_seq) == (0, None, False, 0, 0)
    assert (store.last_index(), store.term_at(0), store.term_at(1), store.entries(0, 10)) == (0, 0, None, [])
    assert store.pristine and not store.healed
    assert store.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert store.db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    feed(store, decrement("d", 2, 8), add_book("a"))
    store = reopen(store)
    # not seeded again: the sold-out book stays sold out, the added one stays
    assert quantity(store, 2) == 0
    assert len(books(store)) == len(SEED_BOOKS) + 1
    assert store.db.execute("SELECT value FROM meta WHERE key = 'seeded'").fetchone() == (1,)
    store.close()


def test_the_synchronous_level_is_an_option(tmp_path: Path) -> None:
    store = catalog(tmp_path, synchronous="NORMAL")
    assert store.db.execute("PRAGMA synchronous").fetchone() == (1,)
    store.close()


# -- the Raft log -----------------------------------------------------------------------


def test_the_log_appends_and_reads_back(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    ops = [restock("a"), None, {"op": "update_price", "rid": "ü", "id": 4, "price": 12.5, "note": [1, {"x": None}]}]
    store.append([Entry(1, 1, ops[0]), Entry(2, 1, ops[1]), Entry(3, 2, ops[2])])
    assert store.last_index() == 3
    assert [store.term_at(i) for i in range(6)] == [0, 1, 1, 2, None, None]
    assert store.term_at(-1) is None
    assert store.entries(1, 4) == [Entry(1, 1, ops[0]), Entry(2, 1, None), Entry(3, 2, ops[2])]
    assert [e.index for e in store.entries(1, 3)] == [1, 2]  # hi is exclusive
    assert [e.index for e in store.entries(-5, 100)] == [1, 2, 3]  # clamped to the log
    assert store.entries(2, 2) == [] and store.entries(3, 1) == [] and store.entries(4, 9) == []
    # appending nothing writes nothing (no transaction is opened)
    store.flush()
    store.append([])
    assert not store.db.in_transaction
    # appending is not applying
    assert store.applied == 0 and books(store) == [(i, *b) for i, b in enumerate(SEED_BOOKS)]
    store.close()


def test_append_replaces_everything_from_its_first_index(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    store.append([Entry(i, 1, restock(f"r{i}")) for i in range(1, 6)])
    store.append([Entry(3, 2, restock("new3")), Entry(4, 2, None)])
    assert store.last_index() == 4
    assert [store.term_at(i) for i in range(6)] == [0, 1, 1, 2, 2, None]
    assert store.entries(1, 10) == [Entry(1, 1, restock("r1")), Entry(2, 1, restock("r2")),
                                     Entry(3, 2, restock("new3")), Entry(4, 2, None)]
    # a shorter replacement drops the rest of the tail
    store.append([Entry(2, 3, restock("new2"))])
    assert (store.last_index(), store.term_at(2), store.term_at(3)) == (2, 3, None)
    assert store.entries(1, 10) == [Entry(1, 1, restock("r1")), Entry(2, 3, restock("new2"))]
    # and the replacement is what a restart finds
    store = reopen(store)
    assert store.entries(1, 10) == [Entry(1, 1, restock("r1")), Entry(2, 3, restock("new2"))]
    assert [store.term_at(i) for i in range(4)] == [0, 1, 3, None]
    store.close()


def test_append_refuses_a_gap_and_the_replacement_of_an_applied_entry(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    feed(store, restock("a"), restock("b"))
    store.append([Entry(3, 1, restock("c"))])
    before = everything(store)
    for bad in ([Entry(5, 1, None)],                    # a gap: 4 is missing
                [Entry(0, 1, None)],                    # there is no entry 0
                [Entry(2, 2, None)],                    # 2 is applied
                [Entry(1, 2, None), Entry(2, 2, None)]):  # so is 1
        with pytest.raises(ValueError):
            store.append(bad)
        assert everything(store) == before
    # the unapplied entry 3 may still be replaced, and 4 follows
    store.append([Entry(3, 2, None), Entry(4, 2, restock("d"))])
    assert [store.term_at(i) for i in range(5)] == [0, 1, 1, 2, 2]
    store.close()


def test_hard_state_and_voter(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    store.set_hard_state(2, 3)
    assert (store.term, store.vote, store.pristine) == (2, 3, False)
    store.set_hard_state(2, None)
    assert (store.term, store.vote) == (2, None)
    store.set_hard_state(5, 1)
    store.set_voter()
    store.set_voter()
    assert store.voter
    store = reopen(store)
    assert (store.term, store.vote, store.voter) == (5, 1, True)
    assert not store.pristine
    store.close()


@pytest.mark.parametrize("touch", [
    lambda s: s.set_hard_state(1, None),   # took part in an election
    lambda s: s.set_hard_state(0, 2),      # voted
    lambda s: s.append([Entry(1, 1, None)]),  # holds an entry
])
def test_a_store_that_voted_or_holds_entries_is_not_pristine(tmp_path: Path, touch: Any) -> None:
    store = catalog(tmp_path)
    touch(store)
    assert not store.pristine
    store = reopen(store)
    assert not store.pristine
    store.close()


# -- transactions -------------------------------------------------------------------------


def test_writes_are_one_transaction_that_flush_commits(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    reader = sqlite3.connect(store.path)  # another connection sees committed data only

    def applied_on_disk() -> int:
        row = reader.execute("SELECT value FROM meta WHERE key = 'applied'").fetchone()
        return int(row[0]) if row else 0

    assert not store.db.in_transaction
    store.set_hard_state(1, 1)
    assert store.db.in_transaction
    feed(store, restock("a", 1, 5), restock("b", 2, 4))
    assert applied_on_disk() == 0  # written, not yet committed
    store.flush()
    assert not store.db.in_transaction and applied_on_disk() == 2
    flushed = everything(store)
    store.flush()  # nothing pending: nothing happens
    assert not store.db.in_transaction

    # a second turn, never flushed: more entries (one applied), a new term and vote, voter
    store.append([Entry(3, 2, decrement("c", 1, 1)), Entry(4, 2, restock("d", 3, 3))])
    assert store.apply(Entry(3, 2, decrement("c", 1, 1))).failed is None
    store.set_hard_state(2, 3)
    store.set_voter()
    assert quantity(store, 1) == 64 and store.applied == 3
    assert applied_on_disk() == 2
    reader.close()

    store = crash(store)
    assert everything(store) == flushed
    assert (store.term, store.vote, store.voter, store.applied, store.last_index()) == (1, 1, False, 2, 2)
    assert quantity(store, 1) == 65 and quantity(store, 2) == 12
    assert store.recorded(decrement("c", 1, 1)) is None
    # the lost turn can be done again
    feed(store, decrement("c", 1, 1), term=2)
    assert quantity(store, 1) == 64
    store.close()


def test_reopening_keeps_everything(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    store.set_hard_state(3, 2)
    store.set_voter()
    done = feed(store, restock("a"), None, decrement("b", 2, 3), term=3)
    store.append([Entry(4, 3, restock("unapplied"))])
    before = everything(store)
    store = reopen(store)
    assert everything(store) == before
    assert (store.term, store.vote, store.voter, store.applied, store.last_seq, store.last_index()) == \
        (3, 2, True, 3, 3, 4)
    assert not store.healed
    # the request ids are remembered across the restart
    assert store.recorded(decrement("b", 2, 3)) == Outcome(done[2].result, 3, done[2].keys, new=False)
    assert store.apply(Entry(4, 3, restock("unapplied"))).new
    store.close()


# -- the state machine ----------------------------------------------------------------------


def test_apply_runs_committed_entries_in_order(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    entries = [Entry(1, 1, restock("a", 1, 5)),
               Entry(2, 1, {"op": "update_price", "rid": "b", "id": 4, "price": 12.5}),
               Entry(3, 2, add_book("c", "fresh", 2)),
               Entry(4, 2, decrement("d", 7, 2))]
    store.append(entries)
    first, second, third, fourth = (store.apply(e) for e in entries)
    assert first == Outcome({"id": 1, "title": SEED_BOOKS[1][0], "topic": SEED_BOOKS[1][1], "price": 22.35,
                             "quantity": 65}, 1, ("info:1",), new=True)
    assert first.error() is None
    assert (second.result["price"], second.seq, second.keys) == (12.5, 2, ("info:4",))
    assert third.result == {"id": 7, "title": "T", "topic": "fresh", "price": 1.0, "quantity": 2}
    assert (third.seq, third.keys) == (3, ("info:7", "search:fresh"))
    assert (fourth.result["quantity"], fourth.seq, fourth.keys) == (0, 4, ("info:7",))
    assert (store.applied, store.last_seq) == (4, 4)
    assert store.db.execute("SELECT value FROM meta WHERE key = 'applied'").fetchone() == (4,)
    # a changed row carries the index of the entry that changed it
    assert store.db.execute("SELECT version FROM books WHERE id = 4").fetchone() == (2,)

    store.append([Entry(5, 2, restock("e")), Entry(6, 2, restock("f"))])
    before = everything(store)
    for wrong in (Entry(4, 2, decrement("d", 7, 2)),  # already applied
                  Entry(6, 2, restock("f")),          # skips 5
                  Entry(1, 1, restock("a", 1, 5))):
        with pytest.raises(ValueError):
            store.apply(wrong)
        assert everything(store) == before
    store.close()


def test_a_no_op_entry_only_advances_applied(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    feed(store, restock("a"))
    before = tables(store)
    outcome = feed1(store, None, term=2)
    assert outcome == Outcome({}, 2, (), new=False)
    assert tables(store) == before
    assert store.applied == 2
    store.close()


FAILING = [
    (decrement("x", 2, 9), "OutOfStock", "out of stock"),   # 8 in stock
    (decrement("x", 99, 1), "NotFound", "no book"),
    (restock("x", 99), "NotFound", "no book"),
    ({"op": "update_price", "rid": "x", "id": 123, "price": 1.0}, "NotFound", "no book"),
    ({"op": "teleport", "rid": "x", "id": 1}, "Invalid", "unknown catalog operation"),
    ({"rid": "x", "id": 1}, "Invalid", "unknown catalog operation"),            # no op at all
    ({"op": "restock", "rid": "x", "id": 1}, "Invalid", "no 'quantity'"),
    ({"op": "restock", "rid": "x", "id": "one", "quantity": 1}, "Invalid", "'id' is not an integer"),
    ({"op": "decrement", "rid": "x", "id": 1, "quantity": "lots"}, "Invalid", "'quantity' is not an integer"),
    ({"op": "decrement", "rid": "x", "id": 1, "quantity": 0}, "Invalid", "positive"),
    ({"op": "restock", "rid": "x", "id": [1], "quantity": 1}, "Invalid", "'id' is not an integer"),
    ({"op": "update_price", "rid": "x", "id": 1, "price": "nan"}, "Invalid", "'price' is not a number"),
    # values the tables refuse: a constraint, integers beyond 64 bits
    ({"op": "restock", "rid": "x", "id": 1, "quantity": -1000}, "Invalid", "IntegrityError"),
    (add_book("x", "t", -1), "Invalid", "IntegrityError"),
    ({"op": "restock", "rid": "x", "id": 1, "quantity": 2**63}, "Invalid", "OverflowError"),
    ({"op": "restock", "rid": "x", "id": 2**63, "quantity": 1}, "Invalid", "OverflowError"),
]


@pytest.mark.parametrize("op, kind, message", FAILING)
def test_failed_operations_are_outcomes_that_change_no_table(
        tmp_path: Path, op: dict[str, Any], kind: str, message: str) -> None:
    store = catalog(tmp_path)
    feed(store, restock("warm-up"))
    store.flush()
    before = tables(store)
    failed = feed1(store, op)
    assert (failed.failed, failed.seq, failed.keys, failed.new) == (kind, 2, (), True)
    error = failed.error()
    assert error is not None and error.kind == kind and message in error.message
    assert failed.result == {"error": error.message}
    assert store.applied == 2
    recorded = list(store.db.execute("SELECT rid, seq, outcome FROM requests WHERE rid = 'x'"))
    if kind == "Invalid":
        # not recorded: the request id stays free, and the same malformed op fails again
        assert tables(store) == before and recorded == []
        assert feed1(store, op) == Outcome(failed.result, 3, (), new=True, failed="Invalid")
        reused = feed1(store, restock("x"))
        assert (reused.failed, reused.new) == (None, True)
    else:
        # recorded: a retry gets the same failure (even once it would succeed), and the id
        # cannot be reused for another operation
        assert tables(store)[:-1] == before[:-1] and recorded == [("x", 2, kind)]
        feed(store, restock("more", 2, 100))
        assert feed1(store, op) == Outcome(failed.result, 2, (), new=False, failed=kind)
        conflict = feed1(store, restock("x"))
        assert (conflict.failed, conflict.new) == ("Conflict", False)
    store = reopen(store)  # what was (not) recorded survives a restart
    if kind == "Invalid":
        assert store.recorded(restock("x")) == Outcome(reused.result, 4, ("info:1",), new=False)
    else:
        assert store.recorded(op) == Outcome(failed.result, 2, (), new=False, failed=kind)
    store.close()


@pytest.mark.parametrize("op, kind, message", FAILING)
def test_validate_refuses_malformed_operations_and_changes_nothing(
        tmp_path: Path, op: dict[str, Any], kind: str, message: str) -> None:
    store = catalog(tmp_path)
    feed(store, restock("warm-up"))
    before = everything(store)
    if kind == "Invalid":
        with pytest.raises(Invalid) as caught:
            store.validate(op)
        assert message in caught.value.message
    else:
        store.validate(op)  # NotFound, OutOfStock depend on the state when applied: not refused here
    assert everything(store) == before
    store = reopen(store)
    assert everything(store) == before
    store.close()


def test_validate_takes_its_trial_back(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    store.set_hard_state(1, 1)
    feed(store, restock("a"))  # unflushed writes before the trial are kept
    before = everything(store)
    for op in (restock("b", 1, 1000), add_book("c"), decrement("d", 3, 1)):
        store.validate(op)
        assert everything(store) == before
    store = reopen(store)
    assert everything(store) == before
    store.close()


@frozen
class Odd(Op):
    """An operation of the test's own (`what` it does, see HalfWayFails)."""

    kind: ClassVar[str] = "odd"
    what: str


class HalfWayFails(CatalogMachine):
    """Changes rows, then fails."""

    def parse(self, data: Any) -> Op:
        if data.get("op") in ("half", "half400", "crash"):
            return Odd(rid=data["rid"], what=data["op"])
        return super().parse(data)

    def apply(self, db: sqlite3.Connection, op: Op, seq: int) -> Any:
        if isinstance(op, Odd) and op.what in ("half", "half400"):
            db.execute("UPDATE books SET quantity = 0")
            db.execute("INSERT INTO books (id, title, topic, price, quantity) VALUES (100, 't', 't', 1, 1)")
            raise (OutOfStock if op.what == "half" else Invalid)("changed my mind")
        if isinstance(op, Odd) and op.what == "crash":
            db.execute("UPDATE books SET quantity = 0")
            raise RuntimeError("a bug")
        return super().apply(db, op, seq)


@pytest.mark.parametrize("kind, failed", [("half", "OutOfStock"), ("half400", "Invalid")])
def test_an_op_error_after_partial_changes_rolls_them_back(tmp_path: Path, kind: str, failed: str) -> None:
    store = Store(str(tmp_path / "h.sqlite3"), HalfWayFails())
    feed(store, restock("r"))
    before = tables(store)
    outcome = feed1(store, {"op": kind, "rid": "boom"})
    assert (outcome.failed, outcome.result, outcome.new, store.applied) == (
        failed, {"error": "changed my mind"}, True, 2)
    assert tables(store)[0] == before[0]
    assert feed1(store, restock("after")).seq == 3  # the store is still usable
    store = reopen(store)
    assert store.db.execute("SELECT count(*) FROM books WHERE id = 100 OR quantity = 0").fetchone() == (0,)
    assert quantity(store, 1) == 70
    store.close()


def test_a_bug_in_the_machine_propagates_and_a_restart_finds_the_tables_unchanged(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "h.sqlite3"), HalfWayFails())
    feed(store, restock("r"))
    store.flush()
    before = everything(store)
    entry = Entry(2, 1, {"op": "crash", "rid": "boom"})
    store.append([entry])
    with pytest.raises(RuntimeError, match="a bug"):
        store.apply(entry)
    assert store.applied == 1  # not applied
    assert store.recorded({"op": "crash", "rid": "boom"}) is None
    # the process dies of it: its open transaction goes with it
    store = crash(store)
    assert everything(store) == before
    assert quantity(store, 1) == 65
    # the trial run of validate() is always taken back, even when the machine breaks
    with pytest.raises(RuntimeError, match="a bug"):
        store.validate({"op": "crash", "rid": "boom"})
    assert everything(store) == before
    store = reopen(store)
    assert everything(store) == before
    store.close()


# -- request ids (§6.3) -----------------------------------------------------------------------


def test_the_same_request_id_and_operation_gives_the_recorded_outcome(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    first = feed1(store, decrement("order:1", 1, 2))
    assert store.recorded(decrement("order:1", 1, 2)) == Outcome(first.result, 1, ("info:1",), new=False)
    before = tables(store)
    again = feed1(store, decrement("order:1", 1, 2), term=2)
    assert again == Outcome(first.result, first.seq, first.keys, new=False)
    assert tables(store) == before and store.applied == 2
    # the volatile fields of a retry (its id, when it was sent) are not part of the operation
    stamped = {**decrement("order:1", 1, 2), "created": "later", "created_ts": 99.0}
    assert feed1(store, stamped).new is False
    assert tables(store) == before and quantity(store, 1) == 58
    assert fingerprint(stamped) == fingerprint(decrement("order:1", 1, 2)) == \
        fingerprint(dict(reversed(list(decrement("order:2", 1, 2).items()))))
    store.close()


def test_the_same_request_id_with_another_operation_is_a_conflict(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    first = feed1(store, decrement("order:1", 1, 2))
    before = tables(store)
    other = decrement("order:1", 1, 50)
    assert store.recorded(other) is not None and store.recorded(other).failed == "Conflict"
    conflict = feed1(store, other)
    assert (conflict.failed, conflict.new, conflict.keys, conflict.seq) == ("Conflict", False, (), first.seq)
    assert "different operation" in conflict.result["error"]
    assert tables(store) == before and store.applied == 2
    # the recorded outcome is still the first one
    assert store.recorded(decrement("order:1", 1, 2)) == Outcome(first.result, 1, ("info:1",), new=False)
    store.close()


def test_recorded_reads_without_writing(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    feed(store, restock("a"))
    store.flush()
    before = everything(store)
    assert store.recorded(restock("nobody")) is None
    assert store.recorded(restock("a")) is not None
    assert not store.db.in_transaction and everything(store) == before
    store.close()


def test_operations_without_a_request_id_apply_every_time(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    outcomes = feed(store, restock(None, 1, 5), restock(None, 1, 5), {"op": "restock", "id": 1, "quantity": 5})
    assert [(o.new, o.result["quantity"]) for o in outcomes] == [(True, 65), (True, 70), (True, 75)]
    assert list(store.db.execute("SELECT * FROM requests")) == []
    store.close()


def test_order_machine_records_a_sale_once_keyed_by_idem(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "o.sqlite3"), OrderMachine())
    sale = Sale(key="k", seq=7, book_id=3, title="T", quantity=2, price=2.5, created="now", created_ts=1.0)
    record = record_op(sale).to_json()
    made = feed1(store, record)
    assert (made.result["id"], made.result["total"], made.result["sale_seq"], made.new) == (1, 5.0, 7, True)
    # the same request sent again later (another timestamp): the recorded outcome
    retried = feed1(store, {**record, "created": "later", "created_ts": 2.0})
    assert (retried.result, retried.seq, retried.new) == (made.result, 1, False)
    # another request id with the same idempotency key: the same order, no new row
    again = feed1(store, {**record, "rid": "order:k-again", "created": "later"})
    assert (again.result, again.new) == (made.result, True)
    assert store.db.execute("SELECT count(*) FROM orders").fetchone() == (1,)
    # the next sale takes the next id
    assert feed1(store, record_op(evolve(sale, key="m", seq=9)).to_json()).result["id"] == 2
    unknown = feed1(store, {"op": "confirm", "rid": "x", "id": 1})
    assert (unknown.failed, unknown.result) == ("Invalid", {"error": "unknown order operation 'confirm'"})
    with pytest.raises(Invalid, match="no 'created'"):
        store.validate({k: v for k, v in record_op(evolve(sale, key="z")).to_json().items() if k != "created"})
    store = reopen(store)
    assert [(r[0], r[-3], r[-2]) for r in store.db.execute("SELECT * FROM orders")] == [(1, "k", 7), (2, "m", 9)]
    store.close()


def test_the_order_machine_refuses_at_parse_what_its_table_would_and_runs_no_trial(tmp_path: Path) -> None:
    """The order's write takes no trial run before its entry (`tried`), so its parse
    refuses whatever the apply or the table would: nothing is opened or written."""
    store = Store(str(tmp_path / "o.sqlite3"), OrderMachine())
    record = record_op(Sale(key="k", seq=7, book_id=3, title="T", quantity=2, price=2.5, created="now",
                            created_ts=1.0)).to_json()
    before = everything(store)
    for bad in ({"quantity": 0}, {"quantity": 10**6 + 1}, {"book_id": 2**63}, {"sale_seq": -1}):
        with pytest.raises(Invalid):
            store.validate({**record, **bad})
    store.validate(record)
    assert not store.db.in_transaction and everything(store) == before
    store.close()


def test_a_sale_takes_the_copies_and_is_recorded_with_them(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    sell = {"op": "sell", "rid": "sale:k", "key": "k", "id": 2, "quantity": 3, "created": "now", "created_ts": 1.0}
    sold = feed1(store, sell)
    assert sold.result["book"]["quantity"] == 5 and sold.keys == ("info:2",)
    assert sold.result["sale"] == {"key": "k", "seq": 1, "book_id": 2, "title": SEED_BOOKS[2][0], "quantity": 3,
                                   "price": SEED_BOOKS[2][2], "created": "now", "created_ts": 1.0}
    refused = feed1(store, {**sell, "rid": "sale:m", "key": "m", "quantity": 6})
    assert (refused.failed, refused.result) == ("OutOfStock", {"error": "book 2 is out of stock (5 left, 6 asked)"})
    reused = feed1(store, {**sell, "quantity": 1})  # the same key for another purchase
    assert reused.failed == "Conflict" and "already used" in reused.result["error"]
    assert [r[0] for r in store.db.execute("SELECT key FROM sales")] == ["k"]
    store.close()


# -- a corrupt file ------------------------------------------------------------------------------


def healthy_and_fresh(store: Store) -> None:
    assert store.healed and store.pristine
    assert (store.applied, store.last_index(), store.voter) == (0, 0, False)
    assert books(store) == [(i, *b) for i, b in enumerate(SEED_BOOKS)]
    assert feed1(store, restock("a")).failed is None
    store = reopen(store)
    assert not store.healed and store.applied == 1
    store.close()


def test_a_file_of_garbage_is_moved_aside_and_a_fresh_store_made(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sqlite3")
    garbage = os.urandom(20000)
    Path(path).write_bytes(garbage)
    Path(path + "-wal").write_bytes(os.urandom(5000))  # a garbage WAL beside it must not spoil the new store
    store = Store(path, CatalogMachine())
    (aside,) = glob.glob(path + ".corrupt-*[0-9]")
    assert aside.rsplit("-", 1)[1].isdigit()
    assert Path(aside).read_bytes() == garbage
    healthy_and_fresh(store)


def overwrite(data: bytes, *pages: int, size: int = 4096) -> bytes:
    """Random bytes over the pages given (numbered from 1, as SQLite does)."""
    for page in pages:
        data = data[:(page - 1) * size] + os.urandom(size) + data[page * size:]
    return data


# Each damage gets the file's bytes and the root page of each table and index. The last
# two hit pages that opening the store never reads: only the integrity check finds them.
@pytest.mark.parametrize("damage", [
    lambda b, roots: overwrite(b, 2),
    lambda b, roots: overwrite(b, len(b) // 4096),
    lambda b, roots: overwrite(b, 3, 5),
    lambda b, roots: b[:100] + bytes(4096 - 100) + b[4096:],  # the schema's page zeroed (not its header)
    lambda b, roots: b[: len(b) // 2],                          # truncated
    lambda b, roots: overwrite(b, roots["requests"]),
    lambda b, roots: overwrite(b, roots["books_topic"]),
], ids=["page-2", "last-page", "pages-3-5", "schema-page", "truncated", "requests-root", "index-root"])
def test_a_damaged_store_is_moved_aside_and_a_fresh_store_made(tmp_path: Path, damage: Any) -> None:
    store = catalog(tmp_path)
    store.set_hard_state(4, 2)
    feed(store, *(restock(f"r{i}", i % 7, i) for i in range(1, 150)), term=4)
    assert store.db.execute("PRAGMA page_size").fetchone() == (4096,)
    roots = dict(store.db.execute("SELECT name, rootpage FROM sqlite_master WHERE rootpage > 0"))
    store.close()
    path = store.path
    assert not os.path.exists(path + "-wal")  # checkpointed into the main file on close
    data = Path(path).read_bytes()
    assert len(data) >= 6 * 4096
    broken = damage(data, roots)
    assert broken != data
    Path(path).write_bytes(broken)
    store = Store(path, CatalogMachine())
    (aside,) = glob.glob(path + ".corrupt-*[0-9]")
    assert Path(aside).read_bytes() == broken
    assert store.term == 0
    healthy_and_fresh(store)


# -- property: the log replays to the same state, in any batching ---------------------------

RIDS = st.one_of(st.none(), st.sampled_from([f"r{i}" for i in range(6)]))
BOOK = st.integers(0, 8)  # 0-6 are seeded, 7 and 8 exist once books are added

OPS = st.one_of(
    st.none(),  # a leader's no-op
    st.builds(restock, RIDS, BOOK, st.integers(1, 50)),
    st.builds(decrement, RIDS, BOOK, st.integers(1, 40)),
    st.builds(lambda r, b, p: {"op": "update_price", "rid": r, "id": b, "price": p},
              RIDS, BOOK, st.floats(0.01, 1e6)),
    st.builds(add_book, RIDS, st.sampled_from(["a", "b"])),
    st.builds(lambda r, b: {"op": "restock", "rid": r, "id": b}, RIDS, BOOK),  # malformed
    st.builds(lambda r, t: {**decrement(r, 1, 1), "created": t, "created_ts": 1.0}, RIDS, st.sampled_from("xy")),
)


def expected(ops: list[dict[str, Any] | None]) -> tuple[list[tuple[str | None, bool]], dict[int, int]]:
    """A model of the catalog: the (kind of failure or None, new) each op must get, and
    the stock at the end."""
    stock = {b: q for b, (_, _, _, q) in enumerate(SEED_BOOKS)}
    seen: dict[str, tuple[str, str | None]] = {}  # rid: (fingerprint, failure)
    out: list[tuple[str | None, bool]] = []
    for op in ops:
        if op is None:
            out.append((None, False))
            continue
        rid = op["rid"]
        if rid is not None and rid in seen:
            fp, failed = seen[rid]
            out.append((failed if fp == fingerprint(op) else "Conflict", False))
            continue
        failed: str | None = None
        if op["op"] == "add_book":
            stock[len(stock)] = op["quantity"]
        elif "quantity" not in op and op["op"] != "update_price":
            failed = "Invalid"
        elif op["id"] not in stock:
            failed = "NotFound"
        elif op["op"] == "decrement" and stock[op["id"]] < op["quantity"]:
            failed = "OutOfStock"
        elif op["op"] != "update_price":
            stock[op["id"]] += op["quantity"] if op["op"] == "restock" else -op["quantity"]
        if rid is not None and failed != "Invalid":
            seen[rid] = (fingerprint(op), failed)
        out.append((failed, True))
    return out, stock


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(OPS, max_size=30), terms=st.lists(st.integers(0, 2), min_size=30, max_size=30),
       data=st.data())
def test_any_history_replays_identically(ops: list[dict[str, Any] | None], terms: list[int], data: Any) -> None:
    term = 1
    log: list[Entry] = []
    for i, op in enumerate(ops):
        term += terms[i]
        log.append(Entry(i + 1, term, op))
    n = len(log)
    with tempfile.TemporaryDirectory() as root:
        # the reference: everything appended, applied one by one, flushed once
        reference = catalog(root, "ref.sqlite3")
        reference.append(log)
        want = [reference.apply(e) for e in log]
        reference.flush()
        outcomes, stock = expected(ops)
        assert [(o.failed, o.new) for o in want] == outcomes
        assert {b[0]: b[4] for b in books(reference)} == stock
        for entry, outcome in zip(log, want):
            # a new outcome comes from its own entry; a recorded one from an earlier entry
            assert outcome.seq == entry.index if outcome.new or entry.op is None else outcome.seq < entry.index

        # a replica that gets the same log in other batches, flushes at random points, sees
        # entries of another leader replaced, and crashes (losing what it did not flush)
        replica = catalog(root, "replica.sqlite3")
        got: dict[int, Outcome] = {}
        durable = (0, 0)  # (applied, last index) as of the last flush

        def agreed() -> int:
            """How far the replica's log matches the reference log."""
            i = replica.applied
            while i < replica.last_index() and replica.entries(i + 1, i + 2) == [log[i]]:
                i += 1
            return i

        for _ in range(data.draw(st.integers(0, 40), label="steps")):
            action = data.draw(st.sampled_from(["append", "apply", "flush", "stale", "crash"]), label="action")
            if action == "append" and agreed() < n:
                lo = agreed() + 1
                hi = data.draw(st.integers(lo, n), label="append to")
                replica.append(log[lo - 1:hi])
            elif action == "apply" and agreed() > replica.applied:
                upto = data.draw(st.integers(replica.applied + 1, agreed()), label="apply to")
                for entry in replica.entries(replica.applied + 1, upto + 1):
                    got[entry.index] = replica.apply(entry)
            elif action == "flush":
                replica.flush()
                durable = (replica.applied, replica.last_index())
            elif action == "stale" and replica.last_index() < n:
                replica.append([Entry(replica.last_index() + 1, 99, restock("stale", 1, 1000))])
            elif action == "crash":
                before = replica.applied
                replica = crash(replica)
                # the log is exactly what was flushed; applied state at least that (an
                # apply-only transaction is committed, without fsync, when the next log
                # write opens its own), and never more than was applied
                assert replica.last_index() == durable[1]
                assert durable[0] <= replica.applied <= before
        if agreed() < n:
            replica.append(log[agreed():])
        for entry in replica.entries(replica.applied + 1, n + 1):
            got[entry.index] = replica.apply(entry)
        replica.flush()

        assert [got[i] for i in range(1, n + 1)] == want
        assert everything(replica) == everything(reference)
        replica = reopen(replica)
        assert everything(replica) == everything(reference)
        replica.close()
        reference.close()


def test_store_files_are_private(tmp_path: Path) -> None:
    store = catalog(tmp_path)
    feed1(store, restock("r", 1, 1))
    for name in os.listdir(tmp_path):
        if name.startswith("c"):
            assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600, name
    store.close()


def test_a_store_of_the_first_layout_keeps_its_recorded_outcomes(tmp_path: Path) -> None:
    """Stores written before outcomes were recorded by kind (requests.status held the
    number: 200, 404, 409) open with every outcome kept, as the same kind."""
    path = str(tmp_path / "old.sqlite3")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE requests (rid TEXT PRIMARY KEY, seq INTEGER NOT NULL, fp TEXT NOT NULL, "
               "status INTEGER NOT NULL, result TEXT NOT NULL, keys TEXT NOT NULL)")
    sold_out, unknown, done = decrement("a", 2, 9), restock("b", 99), restock("c", 1)
    db.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?)", [
        ("a", 1, fingerprint(sold_out), 409, '{"error": "book 2 is out of stock"}', "[]"),
        ("b", 2, fingerprint(unknown), 404, '{"error": "no book with id 99"}', "[]"),
        ("c", 3, fingerprint(done), 200, '{"id": 1}', '["info:1"]')])
    db.commit()
    db.close()
    store = Store(path, CatalogMachine())
    assert store.db.execute("PRAGMA user_version").fetchone() == (1,)
    assert store.recorded(sold_out) == Outcome({"error": "book 2 is out of stock"}, 1, (), new=False,
                                               failed="OutOfStock")
    assert store.recorded(unknown) == Outcome({"error": "no book with id 99"}, 2, (), new=False, failed="NotFound")
    assert store.recorded(done) == Outcome({"id": 1}, 3, ("info:1",), new=False)
    store = reopen(store)  # once upgraded, opened as it is
    assert store.recorded(sold_out) is not None and store.recorded(sold_out).failed == "OutOfStock"
    store.close()


# -- compaction and snapshots (§5) ------------------------------------------------------------


def test_compaction_forgets_the_log_up_to_an_applied_index_and_survives_a_restart(tmp_path: Path) -> None:
    store = catalog(tmp_path, compact_after=4, keep_entries=2)
    feed(store, *[restock(f"r{i}", 1, 1) for i in range(8)])
    assert store.compaction_due() == 6
    assert not store.compact(9) and not store.compact(0)  # not applied / nothing to forget
    assert store.compact(6)
    assert (store.snapshot_index, store.last_index(), store.term_at(6), store.term_at(5)) == (6, 8, 1, None)
    with pytest.raises(ValueError, match="compacted"):
        store.entries(5, 7)
    assert [e.index for e in store.entries(7, 9)] == [7, 8]
    store = reopen(store)
    assert (store.snapshot_index, store.last_index(), store.term_at(6), store.applied) == (6, 8, 1, 8)
    assert list(store.db.execute("SELECT min(idx) FROM raft_log")) == [(7,)]
    feed(store, restock("after", 1, 1))  # the log goes on from there
    assert store.last_index() == 9 and quantity(store, 1) == 69
    store.close()


def test_request_ids_are_forgotten_after_the_retention_at_the_same_log_index_everywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bazar.replication import store as store_module

    monkeypatch.setattr(store_module, "RETAIN_REQUESTS", 5)
    monkeypatch.setattr(store_module, "EXPIRE_EVERY", 4)
    store = catalog(tmp_path)
    feed(store, *[restock(f"r{i}", 1, 1) for i in range(7)])  # indexes 1..7: at 4, ids of seq <= -1 go
    assert store.recorded(restock("r0", 1, 1)) is not None
    feed(store, restock("r7", 1, 1))  # index 8: ids of seq <= 3 go
    assert store.recorded(restock("r0", 1, 1)) is None and store.recorded(restock("r2", 1, 1)) is None
    assert store.recorded(restock("r3", 1, 1)) is not None
    store.close()


def snapshot_of(store: Store) -> tuple[int, int, list[dict[str, list[list[Any]]]]]:
    reader = store.snapshot_reader()
    chunks = []
    while (chunk := reader.chunk(rows=3)) is not None:
        chunks.append(chunk)
    reader.close()
    return reader.index, reader.term, chunks


def test_a_snapshot_is_the_committed_state_read_in_chunks_and_installs_in_one_step(tmp_path: Path) -> None:
    leader = catalog(tmp_path, "leader.sqlite3")
    sell = {"op": "sell", "rid": "sale:k", "key": "k", "id": 2, "quantity": 3, "created": "now", "created_ts": 1.0}
    feed(leader, restock("a", 0, 2), add_book("b"), sell, term=3)
    leader.flush()
    reader = leader.snapshot_reader()
    feed(leader, restock("later", 1, 5), term=3)  # after the read began: not in this snapshot
    leader.flush()
    chunks = []
    while (chunk := reader.chunk(rows=3)) is not None:
        chunks.append(chunk)
    reader.close()
    assert (reader.index, reader.term) == (3, 3)
    assert {name for chunk in chunks for name in chunk} == {"books", "sales", "requests"}

    follower = catalog(tmp_path, "follower.sqlite3")
    feed(follower, restock("own", 4, 9))  # it will be replaced
    for i, chunk in enumerate(chunks):
        follower.stage_snapshot(i == 0, chunk)
    follower.install_snapshot(3, 3)
    assert (follower.applied, follower.snapshot_index, follower.last_index(), follower.term_at(3)) == (3, 3, 3, 3)
    assert books(follower) != books(leader)  # the leader went on after its snapshot
    leader_then = [b if b[0] != 1 else (*b[:4], b[4] - 5) for b in books(leader)]
    assert books(follower) == leader_then
    assert list(follower.db.execute("SELECT key, seq FROM sales")) == [("k", 3)]
    assert follower.recorded(sell) is not None and follower.recorded(restock("own", 4, 9)) is None
    follower = reopen(follower)  # installed for good
    assert (follower.applied, follower.snapshot_index) == (3, 3) and books(follower) == leader_then
    assert not [t for (t,) in follower.db.execute("SELECT name FROM sqlite_master") if t.startswith("staged_")]
    follower.close()
    leader.close()


def test_a_snapshot_staged_but_not_installed_changes_nothing(tmp_path: Path) -> None:
    leader = catalog(tmp_path, "leader.sqlite3")
    feed(leader, restock("a", 0, 2))
    leader.flush()
    _, _, chunks = snapshot_of(leader)
    follower = catalog(tmp_path, "follower.sqlite3")
    feed(follower, restock("own", 4, 9))
    follower.flush()
    before = everything(follower)
    follower.stage_snapshot(True, chunks[0])
    follower = crash(follower)  # died before the last chunk
    assert everything(follower) == before
    follower.close()
    leader.close()
