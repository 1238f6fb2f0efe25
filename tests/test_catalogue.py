"""A catalogue that grows: POST /bazar/books/import (JSON or CSV, all or nothing, one
replicated write), paging (`?limit=&after=`) at the front end and on the replicas,
the cache of search pages and its invalidation, the search index, the announcements
of an import's many keys, and `bazar import`'s pure parts. In memory (one replica
each, `bazar.testing.memory.Shop`), on the parsers, and on a Store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bazar import invalidation
from bazar.bench.catalogue import BIG_TOPIC, make_books, markdown
from bazar.bench.catalogue import main as bench_main
from bazar.cache import LRUCache
from bazar.catalog import TOPIC_QUERY, CatalogMachine
from bazar.cli import Failed as CliFailed
from bazar.cli import csv_batches, id_ranges, read_import
from bazar.errors import Invalid
from bazar.invalidation import (
    ANNOUNCED_BYTES,
    MAX_KEYS,
    MAX_MESSAGE,
    PUSH_BYTES,
    Announcement,
    Publisher,
    announcements,
    next_push,
)
from bazar.messages import MIN_SEQ_HEADER
from bazar.ops import CATALOG_OPS, ImportBooks, operation_from_json
from bazar.records import (
    MAX_BODY,
    NewBook,
    Page,
    info_key,
    page_key,
    parse_csv_books,
    parse_new_books,
    parse_page,
    search_key,
)
from bazar.replication.raft import Entry
from bazar.replication.store import TAIL_BYTES, Outcome, Store
from bazar.testing.memory import (
    CATALOG_PORT,
    FRONTEND_PORT,
    ORDER_PORT,
    TOKEN,
    Driver,
    Response,
    Shop,
    error,
    ok,
    url_of,
)
from bazar.testing.processes import TOKEN as CLUSTER_TOKEN
from bazar.testing.processes import Cluster, call, get_json

SEED = 7  # books 0..6


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    s = Shop(str(tmp_path), cache_size=256)
    yield s
    s.close()


def book(i: int, topic: str = "imported") -> dict[str, Any]:
    return {"title": f"Imported book {i}", "topic": topic, "price": 1.5 + i, "quantity": 1 + i % 7}


def import_json(shop: Shop, books: list[dict[str, Any]]) -> list[int]:
    ids = ok(shop.api("POST", "/bazar/books/import", admin=True, json=books), 201)["ids"]
    assert isinstance(ids, list)
    return ids


def import_csv(shop: Shop, text: str, **kw: Any) -> Response:
    return shop.api("POST", "/bazar/books/import", admin=True, data=text.encode(),
                    headers={"Content-Type": "text/csv", **kw})


def catalogue(shop: Shop) -> tuple[Any, ...]:
    """Everything an import could change: the books and the catalog's log."""
    return shop.books(), shop.catalog_store.last_index()


# -- the operation ---------------------------------------------------------------------------

def test_the_import_operation_reads_back_as_itself() -> None:
    op = ImportBooks(rid="r1", books=(("A", "t", 1.5, 2), ("B, with a comma", "u", 3.0, 1)))
    data = op.to_json()
    assert data == {"op": "import_books", "rid": "r1", "books": [["A", "t", 1.5, 2], ["B, with a comma", "u", 3.0, 1]]}
    assert operation_from_json(json.loads(json.dumps(data)), CATALOG_OPS, "catalog") == op
    # an integer price is a number: read back as a float
    assert operation_from_json({**data, "books": [["A", "t", 2, 1]]}, CATALOG_OPS, "catalog") == \
        ImportBooks(rid="r1", books=(("A", "t", 2.0, 1),))


@pytest.mark.parametrize("books", [
    None, "A,t,1,1", {"0": ["A", "t", 1, 1]}, [["A", "t", 1]], [["A", "t", 1, 1, "extra"]], [("A", "t", 1, 1, 2)],
    [["A", "t", 1, True]], [["A", "t", True, 1]], [["A", "t", "1", 1]], [["A", "t", 1, 1.0]], [[1, "t", 1, 1]],
    [["A", None, 1, 1]], [["A", "t", float("nan"), 1]], [["A", "t", float("inf"), 1]], [{"title": "A"}],
    [["A", "t", 1, 1], "row"],
])
def test_the_import_operation_is_read_strictly(books: Any) -> None:
    with pytest.raises(Invalid, match="malformed operation"):
        operation_from_json({"op": "import_books", "rid": "r", "books": books}, CATALOG_OPS, "catalog")


def test_an_import_operation_without_books_is_refused() -> None:
    with pytest.raises(Invalid, match="no 'books'"):
        operation_from_json({"op": "import_books", "rid": "r"}, CATALOG_OPS, "catalog")


def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "catalog.sqlite3"), CatalogMachine())


def apply(s: Store, op: dict[str, Any]) -> Outcome:
    """`op` appended to the log and applied, as a committed entry is."""
    entry = Entry(s.last_index() + 1, 1, op)
    s.append([entry])
    outcome = s.apply(entry)
    s.flush()
    return outcome


def test_an_import_takes_consecutive_ids_and_names_the_keys_it_changed(tmp_path: Path) -> None:
    s = store(tmp_path)
    try:
        op = ImportBooks(rid="r1", books=(("A", "t", 1.0, 1), ("B", "u", 2.0, 2), ("C", "t", 3.0, 3))).to_json()
        outcome = apply(s, op)
        assert outcome.failed is None and outcome.result == {"ids": [7, 8, 9]}
        assert outcome.keys == ("info:7", "info:8", "info:9", "search:t", "search:u")
        rows = s.db.execute("SELECT id, title, topic, price, quantity FROM books WHERE id >= 7 ORDER BY id").fetchall()
        assert rows == [(7, "A", "t", 1.0, 1), (8, "B", "u", 2.0, 2), (9, "C", "t", 3.0, 3)]
        again = apply(s, op)  # the same request id: its recorded outcome, no second copy
        assert again.result == {"ids": [7, 8, 9]} and not again.new
        assert s.db.execute("SELECT COUNT(*) FROM books").fetchone() == (10,)
        second = apply(s, ImportBooks(rid="r2", books=(("D", "t", 1.0, 1),)).to_json())
        assert second.result == {"ids": [10]}
    finally:
        s.close()


def test_an_import_the_tables_refuse_adds_nothing(tmp_path: Path) -> None:
    """All or nothing at apply time too: one row the tables refuse (a negative
    quantity, which the front end never sends) takes the whole import back."""
    s = store(tmp_path)
    try:
        before = s.db.execute("SELECT * FROM books ORDER BY id").fetchall()
        outcome = apply(s, {"op": "import_books", "rid": "bad", "books": [["A", "t", 1.0, 1], ["B", "t", 1.0, -1]]})
        assert outcome.failed == "Invalid"
        assert s.db.execute("SELECT * FROM books ORDER BY id").fetchall() == before
        empty = apply(s, {"op": "import_books", "rid": "empty", "books": []})
        assert empty.failed == "Invalid" and "at least one book" in empty.result["error"]
    finally:
        s.close()


def test_a_topic_page_is_one_range_of_the_topic_index(tmp_path: Path) -> None:
    s = store(tmp_path)
    try:
        plan = " ".join(row[-1] for row in s.db.execute("EXPLAIN QUERY PLAN " + TOPIC_QUERY, ("t", 5, 100)))
        assert "USING INDEX books_topic (topic=? AND rowid>?)" in plan, plan
        assert "TEMP B-TREE" not in plan  # no sort: the index is in id order within a topic
    finally:
        s.close()


def test_the_log_tail_in_memory_is_bounded_in_bytes(tmp_path: Path) -> None:
    """Imports are large entries: the store keeps about TAIL_BYTES of the newest in
    memory, and serves the older ones from SQLite, the same."""
    s = store(tmp_path)
    try:
        rows = [[f"Book {i:04d} with a long enough title", "topic", 1.0, 1] for i in range(900)]
        ops = [{"op": "import_books", "rid": f"r{n}", "books": rows} for n in range(120)]
        for op in ops:
            s.append([Entry(s.last_index() + 1, 1, op)])
        s.flush()
        assert s._tail_bytes <= TAIL_BYTES and len(s._tail) < len(ops)
        assert s._tail_bytes == sum(len(json.dumps(e.op, separators=(",", ":"))) for e in s._tail)
        assert [e.op for e in s.entries(1, len(ops) + 1)] == ops
    finally:
        s.close()


# -- the parsers ---------------------------------------------------------------------------

def test_a_json_import_is_a_list_of_new_books() -> None:
    books = parse_new_books([book(1), book(2, "other")])
    assert books == (NewBook("Imported book 1", "imported", 2.5, 2), NewBook("Imported book 2", "other", 3.5, 3))


@pytest.mark.parametrize("body, message", [
    ([], "at least one book"),
    ({"title": "A"}, "JSON list of books"),
    ("A,t,1,1", "JSON list of books"),
    ([book(1), "a book"], "row 2: a book must be a JSON object"),
    ([book(1), book(2), {**book(3), "price": "12"}], "row 3: field 'price' must be a number"),
    ([book(1), {**book(2), "quantity": 0}], "row 2: field 'quantity' must be between 1 and 1000000"),
    ([{**book(1), "title": ""}], "row 1: field 'title' must be 1 to 200 characters"),
    ([{**book(1), "topic": "a\nb"}], "row 1: field 'topic' must be printable text"),
    ([{**book(1), "isbn": "x"}], "row 1: unknown field(s): 'isbn'"),
    ([{k: v for k, v in book(1).items() if k != "title"}], "row 1: field 'title' is required"),
])
def test_a_bad_json_import_names_its_row_and_field(body: Any, message: str) -> None:
    with pytest.raises(Invalid) as refused:
        parse_new_books(body)
    assert message in refused.value.message
    assert refused.value.message.startswith(message) or not message.startswith("row")  # the row first


def test_a_csv_import() -> None:
    text = ("\ufefftitle, topic ,price,quantity\r\n"
            "Plain,new,12,3\r\n"
            "\r\n"
            '"Time, Clocks, and ""Ordering""",distributed systems, 7.25 ,1\r\n'
            "Théorie des ensembles,maths,1e2,0001\n")
    assert parse_csv_books(text.encode()) == (
        NewBook("Plain", "new", 12.0, 3), NewBook('Time, Clocks, and "Ordering"', "distributed systems", 7.25, 1),
        NewBook("Théorie des ensembles", "maths", 100.0, 1))
    # the columns in another order
    assert parse_csv_books(b"quantity,price,topic,title\n2,3.5,t,A\n") == (NewBook("A", "t", 3.5, 2),)


@pytest.mark.parametrize("text, message", [
    (b"", "the CSV's first line must be the header title,topic,price,quantity"),
    (b"title,topic,price\nA,t,1\n", "the CSV's first line must be the header title,topic,price,quantity"),
    (b"title,topic,price,quantity,isbn\nA,t,1,1,x\n", "the CSV's first line must be the header"),
    (b"title,topic,price,quantity\n", "an import needs at least one book"),
    (b"title,topic,price,quantity\nA,t,1,1\nB,t,1\n", "row 2 (line 3): 3 fields, not the header's 4"),
    (b"title,topic,price,quantity\nA,t,1,1\nB,t,abc,1\n", "row 2 (line 3): field 'price' must be a number"),
    (b"title,topic,price,quantity\nA,t,nan,1\n", "row 1 (line 2): field 'price' must be a number"),
    (b"title,topic,price,quantity\nA,t,inf,1\n", "row 1 (line 2): field 'price' must be a number"),
    (b"title,topic,price,quantity\nA,t,1_0,1\n", "row 1 (line 2): field 'price' must be a number"),
    (b"title,topic,price,quantity\nA,t,0,1\n", "row 1 (line 2): field 'price' must be a finite number above 0"),
    (b"title,topic,price,quantity\nA,t,1,-1\n", "row 1 (line 2): field 'quantity' must be an integer"),
    (b"title,topic,price,quantity\nA,t,1,1.0\n", "row 1 (line 2): field 'quantity' must be an integer"),
    ("title,topic,price,quantity\nA,t,1,١\n".encode(), "row 1 (line 2): field 'quantity' must be an integer"),
    (b"title,topic,price,quantity\nA,t,1," + b"9" * 5000 + b"\n", "row 1 (line 2): field 'quantity' must be"),
    (b"title,topic,price,quantity\nA,t,1,1000001\n", "row 1 (line 2): field 'quantity' must be between 1 and"),
    (b"title,topic,price,quantity\n,t,1,1\n", "row 1 (line 2): field 'title' must be 1 to 200 characters"),
    (b"title,topic,price,quantity\nA,\"t\x01\",1,1\n", "row 1 (line 2): field 'topic' must be printable text"),
    (b"title,topic,price,quantity\n\"A\nB\",t,1,1\n", "row 1 (line 2): field 'title' must be printable text"),
    (b"title,topic,price,quantity\nA\x00,t,1,1\n", "row 1 (line 2): field 'title' must be printable text"),
    (b"title,topic,price,quantity\nA,t,1,1\n\n\nB,t,x,1\n", "row 2 (line 5): field 'price' must be a number"),
    (b"title,topic,price,quantity\n\"A\"x,t,1,1\n", "line 2 of the CSV is malformed"),
    (b"title,topic,price,quantity\nA\xff,t,1,1\n", "the CSV is not UTF-8 text"),
])
def test_a_bad_csv_import_names_its_row_line_and_field(text: bytes, message: str) -> None:
    with pytest.raises(Invalid) as refused:
        parse_csv_books(text)
    assert refused.value.message.startswith(message), refused.value.message


@pytest.mark.parametrize("limit, after, page", [
    (None, None, None), ("1", None, Page(limit=1)), ("1000", None, Page(limit=1000)), (None, "0", Page(after=0)),
    ("100", "6", Page(after=6, limit=100)), ("0100", "007", Page(after=7, limit=100)),
    (None, "9" * 18, Page(after=10**18 - 1)),
])
def test_pages(limit: str | None, after: str | None, page: Page | None) -> None:
    assert parse_page(limit, after) == page


@pytest.mark.parametrize("limit, after", [
    ("0", None), ("1001", None), ("-1", None), ("", None), ("1.5", None), ("1e2", None), (" 1", None), ("١", None),
    ("10000", None), (None, "-1"), (None, ""), (None, "x"), (None, "9" * 19), (None, "1.0"), (None, "٣"),
])
def test_bad_pages(limit: str | None, after: str | None) -> None:
    with pytest.raises(Invalid):
        parse_page(limit, after)


def test_a_page_as_the_replicas_read_it() -> None:
    assert Page(after=5, limit=10).query() == "after=5&limit=10"
    assert Page(limit=10).query() == "limit=10" and Page(after=0).query() == "after=0"
    assert Page().sql() == (-1, -1) and Page(after=3, limit=2).sql() == (3, 2)
    # a page's cache key is filed under its list's, and never a list's own key
    keys = {page_key(search_key("t"), p) for p in (Page(limit=1), Page(after=1), Page(after=1, limit=1))}
    assert len(keys) == 3 and not any(k.startswith(("search:", "info:")) for k in keys)


# -- importing through the front end --------------------------------------------------------

def test_import_as_json(shop: Shop) -> None:
    books = [book(i) for i in range(5)]
    ids = import_json(shop, books)
    assert ids == list(range(SEED, SEED + 5))
    for ident, sent in zip(ids, books):
        assert ok(shop.api("GET", f"/bazar/info/{ident}")) == {"id": ident, **sent}
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/search/imported"))] == ids
    assert len(ok(shop.api("GET", "/bazar/info/all"))) == SEED + 5


def test_import_as_csv(shop: Shop) -> None:
    r = import_csv(shop, 'title,topic,price,quantity\nA,csv,1.25,2\n"B, the second",csv,3,1\n',
                   **{"Content-Type": "text/csv; charset=utf-8"})
    assert ok(r, 201) == {"ids": [7, 8]}
    assert ok(shop.api("GET", "/bazar/search/csv")) == [{"id": 7, "title": "A"}, {"id": 8, "title": "B, the second"}]
    assert ok(shop.api("GET", "/bazar/info/8"))["price"] == 3.0


def test_imports_and_single_adds_never_share_an_id(shop: Shop) -> None:
    first = import_json(shop, [book(i) for i in range(3)])
    single = ok(shop.api("POST", "/bazar/books", admin=True, json=book(9)), 201)["id"]
    second = import_json(shop, [book(i) for i in range(4)])
    assert first + [single] + second == list(range(SEED, SEED + 8))


@pytest.mark.parametrize("books, position, field", [
    ([book(0), book(1), {**book(2), "price": -1}], "row 3", "price"),
    ([{**book(0), "quantity": "2"}, book(1)], "row 1", "quantity"),
    ([book(0), {**book(1), "title": "x" * 201}], "row 2", "title"),
])
def test_a_bad_row_refuses_the_whole_import_and_leaves_no_log_entry(shop: Shop, books: list[Any], position: str,
                                                                     field: str) -> None:
    before = catalogue(shop)
    message = error(shop.api("POST", "/bazar/books/import", admin=True, json=books), 400)
    assert message.startswith(position + ":") and f"'{field}'" in message
    assert catalogue(shop) == before


@pytest.mark.parametrize("body, content_type", [
    (b"[]", "application/json"), (b"", "application/json"), (b"{}", "application/json"), (b"[1]", None),
    (b"[{\"title\": \"A\", \"title\": \"B\", \"topic\": \"t\", \"price\": 1, \"quantity\": 1}]", None),
    (b"not json", None), (b"title,topic,price,quantity\n", "text/csv"), (b"", "text/csv"),
    (b"title,topic,price,quantity\nA,t,1,1\nB,t,x,1\n", "text/csv"),
    (b"title,topic,price,quantity\nA,t,1,1\n", "application/json"),  # CSV sent as JSON
])
def test_bad_imports_are_400_and_change_nothing(shop: Shop, body: bytes, content_type: str | None) -> None:
    before = catalogue(shop)
    headers = {"Content-Type": content_type} if content_type else {}
    error(shop.api("POST", "/bazar/books/import", admin=True, data=body, headers=headers), 400)
    assert catalogue(shop) == before


def test_a_csv_error_names_the_row_and_line(shop: Shop) -> None:
    r = import_csv(shop, "title,topic,price,quantity\nA,t,1,1\nB,t,1,1\nC,t,1,zero\n")
    assert error(r, 400) == "row 3 (line 4): field 'quantity' must be an integer between 1 and 1000000"


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Basic " + TOKEN])
def test_an_import_needs_the_admin_token(shop: Shop, auth: str | None) -> None:
    before = catalogue(shop)
    headers = {"Authorization": auth} if auth else {}
    for body in (json.dumps([book(0)]).encode(), b"not even a body"):
        r = shop.api("POST", "/bazar/books/import", data=body, headers=headers)
        error(r, 401)
    assert catalogue(shop) == before


def test_an_import_over_64_kib_is_413_and_changes_nothing(shop: Shop) -> None:
    before = catalogue(shop)
    rows = "".join(f"A title long enough to fill the body {i:06d},t,1.5,1\n" for i in range(1500))
    body = ("title,topic,price,quantity\n" + rows).encode()
    assert len(body) > MAX_BODY
    error(import_csv(shop, body.decode()), 413)
    error(shop.api("POST", "/bazar/books/import", admin=True, json=[book(i) for i in range(1200)]), 413)
    assert catalogue(shop) == before


def test_a_batch_just_under_the_limit_is_one_write(shop: Shop) -> None:
    books = [NewBook(f"Title {i:05d}", f"topic {i % 3}", 1.0 + i, 1 + i % 5) for i in range(3000)]
    batches = csv_batches(books)
    assert len(batches) > 1 and all(len(body) <= MAX_BODY for body, _ in batches)
    before = shop.catalog_store.last_index()
    ids: list[int] = []
    for body, count in batches:
        got = ok(import_csv(shop, body.decode()), 201)["ids"]
        assert len(got) == count
        ids += got
    assert ids == list(range(SEED, SEED + 3000))
    assert shop.catalog_store.last_index() == before + len(batches)  # one log entry a batch
    assert ok(shop.api("GET", "/bazar/info/3006"))["title"] == "Title 02999"


def test_an_import_drops_its_topics_searches_and_their_pages(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/search/new"))
    ok(shop.api("GET", "/bazar/search/new?limit=2"))
    ok(shop.api("GET", "/bazar/search/new?limit=2&after=4"))
    ok(shop.api("GET", "/bazar/search/undergraduate%20school"))
    ok(shop.api("GET", "/bazar/info/4"))
    assert shop.cache.stats()["size"] == 5
    ids = import_json(shop, [book(0, "new"), book(1, "brand new")])
    assert set(shop.cache.entries) == {"search:undergraduate school", "info:4"}  # the rest are dropped
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/search/new"))] == [4, 5, 6, ids[0]]
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/search/new?limit=2&after=5"))] == [6, ids[0]]
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/search/brand%20new"))] == [ids[1]]


def test_an_import_made_elsewhere_reaches_the_cache_as_an_invalidation(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/search/new?limit=10"))
    ok(shop.api("GET", "/bazar/search/new"))
    ok(shop.api("GET", "/bazar/info/3"))
    # another front end's import, straight to the catalog primary
    shop.do(shop.catalog.submit(ImportBooks(rid="elsewhere", books=(("Elsewhere", "new", 5.0, 1),)).to_json()))
    shop.run(0.1)
    assert list(shop.cache.entries) == ["info:3"]
    assert ok(shop.api("GET", "/bazar/search/new?limit=10"))[-1] == {"id": 7, "title": "Elsewhere"}
    assert shop.stream.flushes == 0 and shop.stream.upto == shop.catalog_store.last_seq


def test_read_your_own_import_without_waiting_for_the_announcement(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/search/new?limit=5"))
    shop.network.block(CATALOG_PORT, FRONTEND_PORT)  # announcements are late
    ids = import_json(shop, [book(i, "new") for i in range(3)])
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/search/new?limit=5"))] == [4, 5, 6, *ids[:2]]
    assert [b["id"] for b in ok(shop.api("GET", f"/bazar/info/all?after={ids[0] - 1}"))] == ids
    assert ok(shop.api("GET", f"/bazar/info/{ids[-1]}"))["title"] == "Imported book 2"


# -- paging through the front end ------------------------------------------------------------

def walk(shop: Shop, path: str, limit: int, admin: bool = False) -> list[Any]:
    """Every item of a list, page by page (at most 1,000 pages)."""
    found: list[Any] = []
    after = None
    sep = "&" if "?" in path else "?"
    for _ in range(1000):
        page = ok(shop.api("GET", f"{path}{sep}limit={limit}" + (f"&after={after}" if after is not None else ""),
                           admin=admin))
        assert len(page) <= limit
        if not page:
            return found
        found += page
        after = page[-1]["id"]
    raise AssertionError("too many pages")


@pytest.mark.parametrize("limit", [1, 3, 50, 1000])
def test_pages_of_info_all_and_of_a_search_make_the_whole_list(shop: Shop, limit: int) -> None:
    import_json(shop, [book(i, "paged" if i % 2 else "other") for i in range(40)])
    whole = ok(shop.api("GET", "/bazar/info/all"))
    assert walk(shop, "/bazar/info/all", limit) == whole
    assert [b["id"] for b in whole] == list(range(SEED + 40))
    found = ok(shop.api("GET", "/bazar/search/paged"))
    assert walk(shop, "/bazar/search/paged", limit) == found and len(found) == 20
    assert walk(shop, "/bazar/search/nothing%20here", limit) == [] == ok(shop.api("GET", "/bazar/search/nothing"))


def test_a_page_is_the_ids_above_after_in_order(shop: Shop) -> None:
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/info/all?limit=3"))] == [0, 1, 2]
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/info/all?after=0&limit=3"))] == [1, 2, 3]
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/info/all?after=4"))] == [5, 6]
    assert ok(shop.api("GET", "/bazar/info/all?after=6")) == []
    assert ok(shop.api("GET", "/bazar/info/all?after=999999999999999999")) == []
    assert ok(shop.api("GET", "/bazar/search/new?after=4&limit=1")) == [{"id": 5, "title": SEED_TITLE_5}]
    # the same page twice: the same bytes (the second from the cache)
    first = shop.api("GET", "/bazar/search/new?after=4&limit=1")
    assert first.body == shop.api("GET", "/bazar/search/new?after=4&limit=1").body


SEED_TITLE_5 = "Why theory classes are so hard"


@pytest.mark.parametrize("query", [
    "limit=0", "limit=1001", "limit=-5", "limit=", "limit=abc", "limit=1.5", "limit=10&limit=20", "after=-1",
    "after=", "after=x", "after=1e3", "after=" + "9" * 19, "after=1&after=2", "limit=%EF%BC%91",
    "limit=2&sort=desc", "page=2", "=1", "limit=2&topic=new", "%FF=1",
])
@pytest.mark.parametrize("path", ["/bazar/info/all", "/bazar/search/new", "/bazar/orders"])
def test_bad_paging_is_400(shop: Shop, path: str, query: str) -> None:
    message = error(shop.api("GET", f"{path}?{query}", admin=True), 400)
    assert any(word in message for word in ("limit", "after", "unknown query parameter"))


def test_pages_of_orders(shop: Shop) -> None:
    orders = [ok(shop.api("POST", f"/bazar/purchase/{i % 7}"))["order"] for i in range(9)]
    assert ok(shop.api("GET", "/bazar/orders", admin=True)) == orders
    assert walk(shop, "/bazar/orders", 2, admin=True) == orders
    assert ok(shop.api("GET", f"/bazar/orders?after={orders[3]['id']}&limit=2", admin=True)) == orders[4:6]
    error(shop.api("GET", "/bazar/orders?limit=2"), 401)  # the token first, whatever the page


def test_search_pages_are_cached_under_their_topic(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/search/new?limit=2"))
    hits = shop.cache.hits
    ok(shop.api("GET", "/bazar/search/new?limit=2"))
    assert shop.cache.hits == hits + 1
    assert shop.cache.pages == {"search:new": {page_key("search:new", Page(limit=2))}}
    # info/all pages are never cached: no key stands for the whole catalogue
    ok(shop.api("GET", "/bazar/info/all?limit=2"))
    ok(shop.api("GET", "/bazar/info/all?limit=2"))
    assert shop.cache.stats()["size"] == 1


# -- paging on the replicas -----------------------------------------------------------------

def replica(shop: Shop, port: int, path: str, **kw: Any) -> Response:
    return shop.http("GET", url_of(port) + path, **kw)


def test_the_replicas_page_like_the_front_end(shop: Shop) -> None:
    import_json(shop, [book(i, "paged") for i in range(12)])
    assert ok(replica(shop, CATALOG_PORT, "/books?limit=4&after=5")) == \
        ok(shop.api("GET", "/bazar/info/all?limit=4&after=5"))
    assert ok(replica(shop, CATALOG_PORT, "/books?topic=paged&after=10&limit=3")) == \
        [{"id": i, "title": f"Imported book {i - SEED}"} for i in (11, 12, 13)]
    assert ok(replica(shop, CATALOG_PORT, "/books")) == ok(shop.api("GET", "/bazar/info/all"))
    for query in ("limit=0", "after=x", "limit=5&limit=6", "sort=id"):
        error(replica(shop, CATALOG_PORT, "/books?" + query), 400)
        error(replica(shop, CATALOG_PORT, "/books?topic=paged&" + query), 400)
    orders = [ok(shop.api("POST", "/bazar/purchase/1"))["order"] for _ in range(3)]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert ok(replica(shop, ORDER_PORT, "/orders?after=1&limit=1", headers=auth)) == orders[1:2]
    error(replica(shop, ORDER_PORT, "/orders?limit=1001", headers=auth), 400)
    error(replica(shop, ORDER_PORT, "/orders?limit=1"), 401)


def test_a_replica_older_than_the_reader_needs_refuses_at_once(shop: Shop) -> None:
    """The front end says how new a state it needs: a replica not there yet answers 503
    before building the answer (a whole catalogue, maybe) that would be dropped."""
    applied = shop.catalog_store.applied
    fine = replica(shop, CATALOG_PORT, "/books?limit=1", headers={MIN_SEQ_HEADER.decode(): str(applied)})
    assert fine.code == 200 and fine.header("X-Bazar-Seq") == str(applied)
    for path in ("/books", "/books?topic=new", "/books/1"):
        late = replica(shop, CATALOG_PORT, path, headers={MIN_SEQ_HEADER.decode(): str(applied + 1)})
        assert "not applied write" in error(late, 503) and late.header("Retry-After") == "1"
    auth = {"Authorization": f"Bearer {TOKEN}", MIN_SEQ_HEADER.decode(): "999"}
    error(replica(shop, ORDER_PORT, "/orders", headers=auth), 503)
    # (something that is not an index asks for nothing)
    assert replica(shop, CATALOG_PORT, "/books/1", headers={MIN_SEQ_HEADER.decode(): "x"}).code == 200


# -- an import's announcements --------------------------------------------------------------

def test_an_import_is_announced_in_parts_that_each_fit_a_message() -> None:
    keys = tuple(f"info:{i}" for i in range(7, 2507)) + tuple(search_key("t" * 190 + str(i)) for i in range(300))
    parts = announcements(42, keys)
    assert len(parts) > 2 and all(p.seq == 42 for p in parts)
    assert tuple(k for p in parts for k in p.keys) == keys
    for part in parts:
        assert len(part.keys) <= MAX_KEYS
        assert len(json.dumps(list(part.keys), separators=(",", ":"), ensure_ascii=False)) <= ANNOUNCED_BYTES + 2
        signed = json.dumps(part.signed_json("secret", 3)).encode()
        assert len(signed) < MAX_MESSAGE
        assert Announcement.from_json(part.to_json()) == part
    assert announcements(5, ("info:1", "search:t")) == [Announcement(5, ("info:1", "search:t"))]


def test_a_push_never_splits_one_writes_announcements() -> None:
    big = [a.to_json() for a in announcements(2, tuple(f"info:{i}" for i in range(30_000)))]
    queue = [{"seq": 1, "keys": ["info:1"]}, *big, {"seq": 3, "keys": ["info:2"]}]
    first = next_push(queue)
    assert first == 1 + len(big)  # seq 1, then every part of seq 2 (over the budget) ...
    assert sum(len(k) + 3 for m in queue[:first] for k in m["keys"]) > PUSH_BYTES
    assert next_push(queue[first:]) == 1  # ... and seq 3 next time
    small = [{"seq": s, "keys": ["info:1"]} for s in range(1500)]
    assert next_push(small) == 1000


def test_the_push_of_a_large_import_reaches_the_front_end_whole(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/search/new"))
    books = tuple((f"Pushed {i}", "new" if i == 2999 else f"topic {i}", 1.0, 1) for i in range(3000))
    outcome = shop.do(shop.catalog.submit(ImportBooks(rid="pushed", books=books).to_json()))
    assert len(outcome.keys) == 6000
    shop.run(0.2)
    assert shop.stream.upto == shop.catalog_store.last_seq and shop.stream.flushes == 0
    assert shop.cache.required(info_key(3006)) == outcome.seq and shop.cache.required("search:new") == outcome.seq
    assert shop.cache.stats()["size"] == 0


def test_a_full_push_queue_is_cut_between_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue over MAX_QUEUE loses its oldest announcements (the front end will see
    the gap), and never some parts of a write while others stay: those would pass
    for the whole write at the front end."""
    monkeypatch.setattr(invalidation, "MAX_QUEUE", 10)
    driver = Driver()
    publisher = Publisher(http=driver.network.client(CATALOG_PORT), clock=driver.clock, secret="s",
                          frontends=[url_of(FRONTEND_PORT)], redis_url=None)
    queue = publisher.queues[url_of(FRONTEND_PORT)]
    for seq in range(1, 4):
        publisher.committed(Outcome({}, seq, tuple(f"info:{i}" for i in range(4000)), new=True))
        assert len(queue) <= 10
    assert [m["seq"] for m in queue] == [2] * 4 + [3] * 4  # seq 1 went whole, not its first two parts
    publisher.committed(Outcome({}, 4, ("info:1",), new=True))
    assert [m["seq"] for m in queue] == [2] * 4 + [3] * 4 + [4]


# -- the cache of pages ---------------------------------------------------------------------

def test_invalidating_a_list_drops_every_page_filed_under_it() -> None:
    cache = LRUCache(10)
    assert cache.put("search:a", b"all", 1)
    for after in (-1, 5, 9):
        assert cache.put(f"page:{after}:2:search:a", b"page", 1, under="search:a")
    assert cache.put("page:-1:2:search:b", b"other", 1, under="search:b")
    cache.invalidate("search:a", 2)
    assert list(cache.entries) == ["page:-1:2:search:b"]
    assert cache.pages == {"search:b": {"page:-1:2:search:b"}} and cache.under == {"page:-1:2:search:b": "search:b"}
    # a page read before that invalidation is not stored; one read after it is
    assert not cache.put("page:5:2:search:a", b"old", 1, under="search:a")
    assert cache.put("page:5:2:search:a", b"new", 2, under="search:a")


def test_pages_leave_no_trace_when_evicted_dropped_or_flushed() -> None:
    cache = LRUCache(2)
    for i in range(5):
        cache.put(f"page:{i}:1:search:a", b"p", 1, under="search:a")
    assert len(cache.entries) == 2 and cache.pages == {"search:a": set(cache.entries)}
    assert set(cache.under) == set(cache.entries)
    assert cache.drop("search:a") is False  # the list itself was not cached; its pages go
    assert not cache.entries and not cache.pages and not cache.under
    cache.put("page:1:1:search:a", b"p", 1, under="search:a")
    assert cache.drop("page:1:1:search:a") and not cache.pages and not cache.under
    cache.put("page:1:1:search:a", b"p", 1, under="search:a")
    cache.flush()
    assert not cache.entries and not cache.pages and not cache.under


# -- bazar import's pure parts --------------------------------------------------------------

printable = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn"),
                                  blacklist_characters="\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                                  "\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"),
                    min_size=1, max_size=40).filter(lambda s: s.isprintable() and bool(s.strip()))
new_books = st.builds(NewBook, title=printable, topic=printable,
                      price=st.floats(min_value=1e-6, max_value=1e9, exclude_max=True, allow_nan=False),
                      quantity=st.integers(1, 10**6))


@settings(max_examples=60, deadline=None)
@given(books=st.lists(new_books, min_size=1, max_size=40), limit=st.integers(300, 4000))
def test_csv_batches_read_back_as_the_books_and_fit_the_limit(books: list[NewBook], limit: int) -> None:
    batches = csv_batches(books, limit)
    read: list[NewBook] = []
    for body, count in batches:
        assert len(body) <= limit or count == 1
        got = parse_csv_books(body)
        assert len(got) == count
        read += got
    assert read == books


def test_read_import_by_name_or_content(tmp_path: Path) -> None:
    rows = [book(0), book(1)]
    (tmp_path / "books.json").write_text(json.dumps(rows))
    (tmp_path / "books.csv").write_text("title,topic,price,quantity\nA,t,1,1\n")
    (tmp_path / "books.txt").write_text("  \n" + json.dumps(rows))
    (tmp_path / "other.dat").write_text("title,topic,price,quantity\nA,t,1,1\n")
    expected = parse_new_books(rows)
    assert read_import(str(tmp_path / "books.json")) == expected == read_import(str(tmp_path / "books.txt"))
    assert read_import(str(tmp_path / "books.csv")) == (NewBook("A", "t", 1.0, 1),) == \
        read_import(str(tmp_path / "other.dat"))


@pytest.mark.parametrize("name, text, message", [
    ("bad.csv", "title,topic,price,quantity\nA,t,1,1\nB,t,-2,1\n", "row 2 (line 3): field 'price'"),
    ("bad.json", json.dumps([book(0), {**book(1), "quantity": 0}]), "row 2: field 'quantity'"),
    ("dup.json", '[{"title": "A", "title": "B", "topic": "t", "price": 1, "quantity": 1}]', "more than once"),
    ("broken.json", "[{", "not a JSON list of books"),
    ("none.csv", None, "cannot read"),
])
def test_read_import_refuses_a_bad_file_before_sending_anything(tmp_path: Path, name: str, text: str | None,
                                                                message: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(CliFailed) as refused:
        read_import(str(tmp_path / name))
    assert message in str(refused.value) and str(tmp_path / name) in str(refused.value)


def test_id_ranges() -> None:
    assert id_ranges([]) == ""
    assert id_ranges([7]) == "7"
    assert id_ranges([7, 8, 9, 12, 15, 16]) == "7-9, 12, 15-16"


def test_the_index_serves_a_large_topic(tmp_path: Path) -> None:
    """A topic of 5,000 books among 50,000: a page of it reads its rows only."""
    db = sqlite3.connect(str(tmp_path / "plain.sqlite3"))
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    CatalogMachine().create(db)
    db.executemany("INSERT INTO books (id, title, topic, price, quantity) VALUES (?, ?, ?, 1.0, 1)",
                   [(i, f"T{i}", "big" if i % 10 == 0 else f"t{i % 97}") for i in range(7, 50_007)])
    steps: list[int] = []

    def step() -> int:
        steps.append(1)
        return 0  # go on

    db.set_progress_handler(step, 1000)  # called every 1,000 instructions of SQLite's machine
    rows = db.execute(TOPIC_QUERY, ("big", 25_000, 100)).fetchall()
    db.set_progress_handler(None, 0)
    assert [r[0] for r in rows] == list(range(25_010, 26_010, 10))
    assert len(steps) < 50  # a scan of the table would take hundreds of thousands of steps
    db.close()


# -- through a real bazar-cluster ------------------------------------------------------------

def bazar_import(path: Path, cluster: Cluster, *options: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")}, "BAZAR_ADMIN_TOKEN": CLUSTER_TOKEN}
    return subprocess.run([sys.executable, "-m", "bazar.cli", "--url", cluster.front, *options, "import", str(path)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def pages(url: str, limit: int) -> list[Any]:
    """Every item behind `url`, page by page (at most 1,000 pages)."""
    found: list[Any] = []
    sep = "&" if "?" in url else "?"
    for _ in range(1000):
        after = f"&after={found[-1]['id']}" if found else ""
        page = get_json(f"{url}{sep}limit={limit}{after}")
        assert len(page) <= limit
        if not page:
            return found
        found += page
    raise AssertionError("too many pages")


@pytest.mark.integration
def test_import_and_page_through_a_real_store(start_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    cluster = start_cluster("catalogue")
    books = [NewBook(f"Cluster book {i:05d}, vol. {i % 3}", f"cluster topic {i % 5}", 1.0 + i % 100, 1 + i % 9)
             for i in range(4000)]
    (tmp_path / "books.csv").write_bytes(b"title,topic,price,quantity\n" + b"".join(
        body.split(b"\n", 1)[1] for body, _ in csv_batches(books)))
    done = bazar_import(tmp_path / "books.csv", cluster)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported 4000 books: ids 7-4006"
    # a JSON file, read back at once through the same front end (its own writes)
    extra = [{"title": f"JSON book {i}", "topic": "cluster topic 3", "price": 2.5, "quantity": 1} for i in range(300)]
    (tmp_path / "more.json").write_text(json.dumps(extra))
    more = bazar_import(tmp_path / "more.json", cluster, "--json")
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout) == {"ids": list(range(4007, 4307))}
    assert [b["title"] for b in get_json(cluster.front + "/bazar/info/all?after=4006&limit=1000")] == \
        [b["title"] for b in extra]
    # a bad file: one line on stderr, exit 1, nothing imported
    (tmp_path / "bad.csv").write_text("title,topic,price,quantity\nA,t,1,1\nB,t,free,1\n")
    bad = bazar_import(tmp_path / "bad.csv", cluster)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "row 2 (line 3): field 'price'" in bad.stderr
    # paging through the front end gives the whole list, in id order
    whole = get_json(cluster.front + "/bazar/info/all")
    assert [b["id"] for b in whole] == list(range(4307))
    assert pages(cluster.front + "/bazar/info/all", 1000) == whole
    assert whole[4006] == {"id": 4006, "title": "Cluster book 03999, vol. 0", "topic": "cluster topic 4",
                           "price": 100.0, "quantity": 4}
    topic = "/bazar/search/" + quote("cluster topic 3", safe="")
    found = get_json(cluster.front + topic)
    assert len(found) == 800 + 300 and pages(cluster.front + topic, 250) == found
    assert [b["id"] for b in found] == sorted(b["id"] for b in found)
    bad_page = call("GET", cluster.front + "/bazar/info/all?limit=0")
    assert bad_page.status == 400 and "limit" in bad_page.json["error"]
    # every replica pages the same
    cluster.wait_quiet(60)
    for url in cluster.catalogs:
        assert get_json(url + "/books?after=2000&limit=500") == whole[2001:2501]
        assert get_json(url + "/books?topic=cluster%20topic%203&limit=1000") == found[:1000]


# -- the benchmark of a large catalogue -----------------------------------------------------

def test_the_bench_catalogue_and_its_report() -> None:
    books = make_books(2000)
    assert sum(b.topic == BIG_TOPIC for b in books) == 100 and len({b.title for b in books}) == 2000
    assert parse_new_books([{"title": b.title, "topic": b.topic, "price": b.price, "quantity": b.quantity}
                            for b in books]) == tuple(books)
    # the committed report's figures are the committed results'
    bench = Path(__file__).resolve().parent.parent / "docs" / "bench"
    table = markdown(json.loads((bench / "catalogue.json").read_text()))
    report = (bench / "catalogue.md").read_text()
    for figure in ("24,452 books/s", "30,129 books/s", "276 ms / 218 ms", "13.72 ms / 1.21 ms / 11.20 ms",
                   "320 bytes", "5,671 bytes", "34 ms", "1.11 s / 1.13 s"):
        assert figure in table, figure
    for figure in ("24,452 books/s", "30,129 books/s", "276 ms / 218 ms", "13.7 ms / 1.21 ms / 11.2 ms",
                   "320 bytes / 5,671 bytes", "34 ms", "1.11 s / 1.13 s"):
        assert figure in report, figure


@pytest.mark.integration
def test_the_bench_of_a_large_catalogue_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--books", "600", "--rounds", "1", "--entries", "40", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "catalogue.json").read_text())
    assert sum(step["books"] for step in results["import"]["steps"]) == 600
    assert not any(step["errors"] for step in results["import"]["steps"])
    assert results["store_open"]["books"] >= 607 and results["restart"]["serving_s"] > 0
    assert results["memory"]["info"]["entries_added"] == 40
    assert "| import, 1 client(s)" in capsys.readouterr().out
