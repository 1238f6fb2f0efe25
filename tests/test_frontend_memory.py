"""The public API of DESIGN.md, end to end in memory: front end -> order -> catalog
(one replica each, StubTreq's agent behind a port router, a task.Clock)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from bazar.records import SEED_BOOKS
from bazar.testing.memory import (
    CATALOG_PORT,
    FRONTEND_PORT,
    ORDER_PORT,
    SECRET,
    TOKEN,
    Shop,
    error,
    ok,
    restock,
    update_price,
    url_of,
)
from bazar.testing.processes import ADMIN_CALLS

BOOK_FIELDS = {"id", "title", "topic", "price", "quantity"}
ORDER_FIELDS = {"id", "book_id", "title", "quantity", "price", "total", "created"}


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    s = Shop(str(tmp_path))
    yield s
    s.close()


def stock(shop: Shop, book: int) -> int:
    return int(ok(shop.api("GET", f"/bazar/info/{book}"))["quantity"])


def confirmed(shop: Shop) -> list[dict[str, Any]]:
    return list(ok(shop.api("GET", "/bazar/orders", admin=True)))


# -- reads ---------------------------------------------------------------------------------

def test_info_all_lists_every_book(shop: Shop) -> None:
    books = ok(shop.api("GET", "/bazar/info/all"))
    assert [set(b) for b in books] == [BOOK_FIELDS] * 7
    assert [(b["id"], b["title"], b["topic"], b["price"], b["quantity"]) for b in books] == [
        (i, *seed) for i, seed in enumerate(SEED_BOOKS)]


def test_info_of_one_book(shop: Shop) -> None:
    assert ok(shop.api("GET", "/bazar/info/3")) == {"id": 3, "title": "Cooking for the Impatient Undergrad.",
                                                   "topic": "undergraduate school", "price": 89.33, "quantity": 65}


@pytest.mark.parametrize("ident", ["7", "99", "abc", "-1", "1.5", "%20", "1e2", "0x1", "9" * 30])
def test_info_of_an_unknown_or_malformed_id_is_404(shop: Shop, ident: str) -> None:
    error(shop.api("GET", f"/bazar/info/{ident}"), 404)


@pytest.mark.parametrize("topic, ids", [
    ("distributed systems", [0, 1]), ("undergraduate school", [2, 3]), ("new", [4, 5, 6]),
    ("unknown", []), ("New", []), ("new ", []), ("a/b", []), ("%", []), ("é", []),
])
def test_search_by_topic(shop: Shop, topic: str, ids: list[int]) -> None:
    found = ok(shop.api("GET", "/bazar/search/" + quote(topic, safe="")))
    assert [b["id"] for b in found] == ids
    assert all(set(b) == {"id", "title"} for b in found)
    assert [b["title"] for b in found] == [SEED_BOOKS[i][0] for i in ids]


def test_search_finds_a_new_book_under_an_unusual_topic(shop: Shop) -> None:
    topic = "Café / théorie & 100%"
    book = ok(shop.api("POST", "/bazar/books", admin=True,
                       json={"title": "Théorie", "topic": topic, "price": 5, "quantity": 2}), 201)
    found = ok(shop.api("GET", "/bazar/search/" + quote(topic, safe="")))
    assert found == [{"id": book["id"], "title": "Théorie"}]


# -- purchases -----------------------------------------------------------------------------

def test_purchase_takes_one_copy_by_default(shop: Shop) -> None:
    order = ok(shop.api("POST", "/bazar/purchase/1"))["order"]
    assert set(order) == ORDER_FIELDS
    assert (order["book_id"], order["quantity"], order["price"], order["total"]) == (1, 1, 22.35, 22.35)
    assert order["title"] == "RPCs for Noobs."
    assert stock(shop, 1) == 59
    assert confirmed(shop) == [order]


def test_purchase_with_a_quantity(shop: Shop) -> None:
    order = ok(shop.api("POST", "/bazar/purchase/3", json={"quantity": 5}))["order"]
    assert (order["quantity"], order["total"]) == (5, round(89.33 * 5, 2))
    assert stock(shop, 3) == 60


def test_out_of_stock_is_409_and_takes_nothing(shop: Shop) -> None:
    error(shop.api("POST", "/bazar/purchase/2", json={"quantity": 9}), 409)
    assert stock(shop, 2) == 8
    ok(shop.api("POST", "/bazar/purchase/2", json={"quantity": 8}))
    error(shop.api("POST", "/bazar/purchase/2"), 409)
    assert stock(shop, 2) == 0
    assert [o["quantity"] for o in confirmed(shop)] == [8]


@pytest.mark.parametrize("ident", ["7", "123", "abc", "-1"])
def test_purchase_of_an_unknown_book_is_404(shop: Shop, ident: str) -> None:
    error(shop.api("POST", f"/bazar/purchase/{ident}"), 404)
    assert confirmed(shop) == []


def test_an_idempotency_key_buys_once(shop: Shop) -> None:
    headers = {"Idempotency-Key": "buy-42"}
    first = ok(shop.api("POST", "/bazar/purchase/4", json={"quantity": 2}, headers=headers))
    again = ok(shop.api("POST", "/bazar/purchase/4", json={"quantity": 2}, headers=headers))
    assert again == first
    assert stock(shop, 4) == 38
    assert len(confirmed(shop)) == 1
    # another key is another purchase
    ok(shop.api("POST", "/bazar/purchase/4", json={"quantity": 2}, headers={"Idempotency-Key": "buy-43"}))
    assert stock(shop, 4) == 36


@pytest.mark.parametrize("path, body", [("/bazar/purchase/4", {"quantity": 3}), ("/bazar/purchase/5", None)])
def test_reusing_a_key_for_another_purchase_is_409(shop: Shop, path: str, body: Any) -> None:
    headers = {"Idempotency-Key": "k"}
    ok(shop.api("POST", "/bazar/purchase/4", headers=headers))
    error(shop.api("POST", path, json=body, headers=headers), 409)
    assert (stock(shop, 4), stock(shop, 5)) == (39, 80)
    assert len(confirmed(shop)) == 1


def test_a_purchase_during_a_catalog_outage_sells_nothing_and_its_retry_buys(shop: Shop) -> None:
    headers = {"Idempotency-Key": "during-outage"}
    shop.network.kill(CATALOG_PORT)
    error(shop.api("POST", "/bazar/purchase/6", headers=headers), 503)
    assert shop.orders() == [] and shop.books()[6][4] == 90  # nothing recorded, nothing taken
    shop.network.revive(CATALOG_PORT)
    shop.run(1.0)
    order = ok(shop.api("POST", "/bazar/purchase/6", headers=headers))["order"]
    assert order["id"] == 1
    assert stock(shop, 6) == 89
    assert confirmed(shop) == [order]


def test_a_sale_whose_order_was_never_recorded_is_recorded_by_the_sweep(shop: Shop) -> None:
    """The order service dies between the two steps of a purchase: the copies are
    taken (the sale is committed in the catalog) but no order records them. The sweep
    of the order primary records it; a retry of the purchase gets that same order."""
    headers = {"Idempotency-Key": "orphan"}
    shop.network.kill(ORDER_PORT)
    # play the order primary's first step (it is down: through the front end's link)
    sold = shop.do(shop.fe.catalog.write({"op": "sell", "rid": "sale:client:orphan", "key": "client:orphan",
                                                 "id": 6, "quantity": 2, "created": "then",
                                                 "created_ts": shop.clock.seconds()}))
    assert stock(shop, 6) == 88 and shop.orders() == []
    shop.network.revive(ORDER_PORT)
    shop.purchases.sweep()  # too young: its own purchase may still be at work
    shop.run(0.5)
    assert shop.orders() == []
    shop.run(shop.purchases.settle_after)
    shop.purchases.sweep()
    shop.run(0.5)
    (order,) = confirmed(shop)
    assert (order["book_id"], order["quantity"], order["total"]) == (6, 2, 1400.0)
    assert shop.orders()[0][-3:-1] == ("client:orphan", sold.seq)
    again = ok(shop.api("POST", "/bazar/purchase/6", json={"quantity": 2}, headers=headers))["order"]
    assert again == order and stock(shop, 6) == 88 and len(confirmed(shop)) == 1


def start(shop: Shop, method: str, path: str, **kw: Any) -> Any:
    """A request left in flight: (Deferred of the response)."""
    return shop.network.client().request(method, url_of(FRONTEND_PORT) + path, **kw)


def finish(shop: Shop, pending: Any) -> tuple[int, Any]:
    import treq
    response = shop.wait(pending)
    return response.code, orjson.loads(shop.wait(treq.content(response)))


@pytest.fixture
def slow_shop(tmp_path: Path) -> Iterator[Shop]:
    """Every hop takes 10 ms: requests started together are really in flight together."""
    s = Shop(str(tmp_path), latency=0.01)
    yield s
    s.close()


def test_concurrent_purchases_never_oversell(slow_shop: Shop) -> None:
    shop = slow_shop
    pending = [start(shop, "POST", "/bazar/purchase/2", json={"quantity": 1}) for _ in range(11)]
    assert not any(d.called for d in pending)
    results = [finish(shop, d) for d in pending]
    assert sorted(code for code, _ in results) == [200] * 8 + [409] * 3
    assert stock(shop, 2) == 0
    orders = confirmed(shop)
    assert sorted(o["id"] for o in orders) == sorted(body["order"]["id"] for code, body in results if code == 200)


def test_concurrent_purchases_with_one_key_buy_once(slow_shop: Shop) -> None:
    shop = slow_shop
    headers = {"Idempotency-Key": "same"}
    pending = [start(shop, "POST", "/bazar/purchase/5", json={"quantity": 3}, headers=headers) for _ in range(4)]
    results = [finish(shop, d) for d in pending]
    assert {code for code, _ in results} == {200}
    assert len({body["order"]["id"] for _, body in results}) == 1
    assert stock(shop, 5) == 77 and len(confirmed(shop)) == 1


def test_a_bad_idempotency_key_is_400(shop: Shop) -> None:
    error(shop.api("POST", "/bazar/purchase/4", headers={"Idempotency-Key": "x" * 201}), 400)
    assert stock(shop, 4) == 40


# -- admin writes --------------------------------------------------------------------------



@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
@pytest.mark.parametrize("auth", [None, "Bearer nope", "Bearer " + SECRET, "Basic " + TOKEN])
def test_admin_calls_need_the_token_and_change_nothing_without(shop: Shop, method: str, path: str, body: Any,
                                                               auth: str | None) -> None:
    ok(shop.api("GET", "/bazar/info/1"))  # cached
    before = shop.state()
    headers = {"Authorization": auth} if auth else {}
    r = shop.api(method, path, json=body, headers=headers)
    error(r, 401)
    assert r.header("WWW-Authenticate") == 'Bearer realm="bazar"'
    assert shop.state() == before and shop.cache.stats()["size"] == 1


def test_update_price(shop: Shop) -> None:
    book = ok(shop.api("PUT", "/bazar/update_price/1", admin=True, json={"price": 30.5}))
    assert book == {"id": 1, "title": "RPCs for Noobs.", "topic": "distributed systems", "price": 30.5,
                    "quantity": 60}
    assert ok(shop.api("GET", "/bazar/info/1"))["price"] == 30.5
    error(shop.api("PUT", "/bazar/update_price/77", admin=True, json={"price": 1}), 404)
    error(shop.api("PUT", "/bazar/update_price/x", admin=True, json={"price": 1}), 404)


def test_restock(shop: Shop) -> None:
    assert ok(shop.api("POST", "/bazar/restock/2", admin=True, json={"quantity": 12}))["quantity"] == 20
    assert stock(shop, 2) == 20
    error(shop.api("POST", "/bazar/restock/77", admin=True, json={"quantity": 1}), 404)


def test_add_book(shop: Shop) -> None:
    body = {"title": "Twisted in Depth", "topic": "new", "price": 42.0, "quantity": 3}
    book = ok(shop.api("POST", "/bazar/books", admin=True, json=body), 201)
    assert book == {"id": 7, **body}
    assert ok(shop.api("GET", "/bazar/info/7")) == book
    assert [b["id"] for b in ok(shop.api("GET", "/bazar/search/new"))] == [4, 5, 6, 7]
    second = ok(shop.api("POST", "/bazar/books", admin=True, json={**body, "title": "Another"}), 201)
    assert second["id"] == 8
    assert len(ok(shop.api("GET", "/bazar/info/all"))) == 9


def test_orders_lists_confirmed_orders_only(shop: Shop) -> None:
    assert confirmed(shop) == []
    a = ok(shop.api("POST", "/bazar/purchase/0"))["order"]
    error(shop.api("POST", "/bazar/purchase/2", json={"quantity": 50}), 409)  # a failed order
    b = ok(shop.api("POST", "/bazar/purchase/6", json={"quantity": 2}))["order"]
    assert confirmed(shop) == [a, b]
    assert a["id"] < b["id"]


# -- the cache -------------------------------------------------------------------------------

def test_cache_figures_count_hits_and_misses(shop: Shop) -> None:
    assert ok(shop.api("GET", "/bazar/cache")) == {"capacity": 64, "size": 0, "hits": 0, "misses": 0,
                                                  "evictions": 0}
    first = ok(shop.api("GET", "/bazar/info/1"))
    served = shop.catalog.store.db.total_changes  # unchanged by reads; just a witness below
    assert ok(shop.api("GET", "/bazar/info/1")) == first
    assert ok(shop.api("GET", "/bazar/search/new")) == ok(shop.api("GET", "/bazar/search/new"))
    assert ok(shop.api("GET", "/bazar/cache")) == {"capacity": 64, "size": 2, "hits": 2, "misses": 2,
                                                  "evictions": 0}
    assert shop.catalog.store.db.total_changes == served


def test_a_cache_hit_does_not_ask_the_catalog(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/info/5"))
    shop.network.kill(CATALOG_PORT)
    assert ok(shop.api("GET", "/bazar/info/5"))["id"] == 5
    error(shop.api("GET", "/bazar/info/6"), 503)


def test_cache_delete_drops_one_book(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/info/1"))
    ok(shop.api("GET", "/bazar/info/2"))
    assert ok(shop.api("DELETE", "/bazar/cache/1", admin=True)) == {"dropped": True, "id": 1}
    assert ok(shop.api("DELETE", "/bazar/cache/1", admin=True)) == {"dropped": False, "id": 1}
    assert list(shop.cache.entries) == ["info:2"]
    error(shop.api("DELETE", "/bazar/cache/abc", admin=True), 404)


def test_eviction_with_a_small_cache(tmp_path: Path) -> None:
    shop = Shop(str(tmp_path), cache_size=2)
    try:
        for book in (0, 1, 2, 0):
            ok(shop.api("GET", f"/bazar/info/{book}"))
        stats = ok(shop.api("GET", "/bazar/cache"))
        assert (stats["size"], stats["evictions"], stats["misses"], stats["capacity"]) == (2, 2, 4, 2)
    finally:
        shop.close()


def test_a_cache_of_size_zero_serves_everything_from_the_catalog(tmp_path: Path) -> None:
    shop = Shop(str(tmp_path), cache_size=0)
    try:
        for _ in range(3):
            assert ok(shop.api("GET", "/bazar/info/1"))["id"] == 1
        assert ok(shop.api("GET", "/bazar/cache"))["size"] == 0
    finally:
        shop.close()


# -- read your writes --------------------------------------------------------------------

def test_read_your_writes_after_a_purchase(shop: Shop) -> None:
    assert stock(shop, 1) == 60
    assert stock(shop, 1) == 60 and shop.cache.hits == 1  # served from the cache
    ok(shop.api("POST", "/bazar/purchase/1", json={"quantity": 4}))
    assert stock(shop, 1) == 56


def test_read_your_writes_does_not_wait_for_the_announcement(shop: Shop) -> None:
    assert stock(shop, 1) == 60
    shop.network.block(CATALOG_PORT, FRONTEND_PORT)  # announcements are late
    ok(shop.api("POST", "/bazar/purchase/1", json={"quantity": 4}))
    assert stock(shop, 1) == 56
    ok(shop.api("PUT", "/bazar/update_price/1", admin=True, json={"price": 2.5}))
    assert ok(shop.api("GET", "/bazar/info/1"))["price"] == 2.5


@pytest.mark.parametrize("method, path, body, field, value", [
    ("PUT", "/bazar/update_price/1", {"price": 1.25}, "price", 1.25),
    ("POST", "/bazar/restock/1", {"quantity": 10}, "quantity", 70),
])
def test_read_your_writes_after_admin_writes(shop: Shop, method: str, path: str, body: Any, field: str,
                                             value: Any) -> None:
    ok(shop.api("GET", "/bazar/info/1"))
    ok(shop.api(method, path, admin=True, json=body))
    assert ok(shop.api("GET", "/bazar/info/1"))[field] == value
    assert ok(shop.api("GET", "/bazar/info/all"))[1][field] == value


def test_a_write_made_elsewhere_reaches_the_cache_as_an_invalidation(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/info/4"))
    # another front end's write, straight to the catalog primary
    shop.do(shop.catalog.submit(update_price(4, 9.99)))
    shop.run(0.1)
    assert ok(shop.api("GET", "/bazar/info/4"))["price"] == 9.99
    assert shop.stream.flushes == 0 and shop.stream.upto == shop.catalog_store.last_seq


def test_a_read_that_overlaps_a_write_does_not_fill_the_cache_with_old_data(shop: Shop) -> None:
    shop.network.hold(CATALOG_PORT)  # the catalog's answers are slow to come back
    reply = shop.network.client().get(url_of(FRONTEND_PORT) + "/bazar/info/1")
    shop.network.flush()
    assert len(shop.network.parked) == 1  # the catalog read the book at the old price
    shop.do(shop.catalog.submit(update_price(1, 5.0)))  # a write elsewhere, announced at once
    shop.run(shop.publisher.push_delay)
    assert shop.stream.upto == shop.catalog_store.last_seq
    shop.network.release(CATALOG_PORT)
    first = shop.wait(reply)
    assert first.code == 200  # this client may see the old price: its read began first
    assert ok(shop.api("GET", "/bazar/info/1"))["price"] == 5.0  # but it was not cached
    assert shop.cache.refused >= 1


def test_a_read_that_overlaps_a_flush_does_not_fill_the_cache(shop: Shop) -> None:
    shop.network.hold(CATALOG_PORT)
    reply = shop.network.client().get(url_of(FRONTEND_PORT) + "/bazar/info/1")
    shop.network.flush()
    shop.stream.channel_lost()
    shop.stream.channel_back()
    shop.network.release(CATALOG_PORT)
    assert shop.wait(reply).code == 200
    assert shop.cache.stats()["size"] == 0 and shop.cache.refused == 1


def test_a_lost_announcement_empties_the_cache_rather_than_serve_stale(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/info/4"))
    ok(shop.api("GET", "/bazar/info/5"))
    shop.network.block(CATALOG_PORT, FRONTEND_PORT)  # the push is lost
    shop.do(shop.catalog.submit(restock(4, 1)))
    shop.run(2.0)  # the front end's health checks see the catalog ahead of the announcements
    assert shop.stream.flushes >= 1 and shop.cache.stats()["size"] == 0
    assert stock(shop, 4) == 41


def test_the_invalidation_push_needs_the_cluster_secret(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/info/1"))
    body = {"messages": [{"seq": 1, "keys": ["info:1"]}]}
    error(shop.api("POST", "/internal/invalidate", json=body), 403)
    error(shop.api("POST", "/internal/invalidate", json=body, headers={"X-Bazar-Secret": "x"}), 403)
    assert shop.cache.stats()["size"] == 1
    for bad in ({}, {"messages": 3}, {"messages": [{"seq": "x", "keys": []}]}, {"messages": [{"keys": []}]}):
        error(shop.api("POST", "/internal/invalidate", json=bad, headers={"X-Bazar-Secret": SECRET}), 400)
    r = shop.api("POST", "/internal/invalidate", json=body, headers={"X-Bazar-Secret": SECRET})
    assert ok(r)["ok"] is True and shop.cache.stats()["size"] == 0


# -- service endpoints -----------------------------------------------------------------------

def test_health(shop: Shop) -> None:
    health = ok(shop.api("GET", "/health"))
    assert {"service": "frontend", "status": "ok"}.items() <= health.items()
    assert {"service", "replica", "pid", "role", "status"} <= set(health)
    assert health["catalog"][0]["alive"] is True and health["catalog"][0]["primary"] is True
    for port, service in ((CATALOG_PORT, "catalog"), (5201, "order")):
        replica = ok(shop.http("GET", url_of(port) + "/health"))
        assert {"service": service, "replica": 1, "role": "primary", "status": "ok"}.items() <= replica.items()


def test_metrics(shop: Shop) -> None:
    ok(shop.api("GET", "/bazar/info/1"))
    ok(shop.api("GET", "/bazar/info/1"))
    r = shop.api("GET", "/metrics")
    assert r.code == 200 and r.header("Content-Type").startswith("text/plain")
    text = r.body.decode()
    assert "bazar_cache_hits_total 1.0" in text and "bazar_cache_misses_total 1.0" in text
    assert 'bazar_requests_total{route="info",service="frontend",status="200"} 2.0' in text
    for port in (CATALOG_PORT, 5201):
        assert shop.http("GET", url_of(port) + "/metrics").code == 200


def test_openapi(shop: Shop) -> None:
    spec = ok(shop.api("GET", "/openapi.json"))
    assert spec["openapi"].startswith("3.")
    assert {"/bazar/info/all", "/bazar/info/{id}", "/bazar/search/{topic}", "/bazar/purchase/{id}",
            "/bazar/update_price/{id}", "/bazar/restock/{id}", "/bazar/books", "/bazar/orders",
            "/bazar/cache/{id}", "/bazar/cache", "/health", "/metrics", "/openapi.json"} <= set(spec["paths"])


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/", 405), ("GET", "/bazar", 404), ("GET", "/bazar/info", 404), ("GET", "/bazar/nothing", 404),
    ("POST", "/bazar/info/1", 405), ("GET", "/bazar/purchase/1", 405), ("POST", "/bazar/update_price/1", 405),
    ("DELETE", "/bazar/books", 405), ("PUT", "/bazar/cache", 405), ("GET", "/bazar/info/%ff", 400),
])
def test_unknown_routes_and_methods_are_json(shop: Shop, method: str, path: str, status: int) -> None:
    error(shop.api(method, path, admin=True), status)


@pytest.mark.parametrize("method, path, allowed", [
    ("POST", "/", "GET, HEAD"), ("POST", "/bazar/info/1", "GET, HEAD"), ("DELETE", "/bazar/info/all", "GET, HEAD"),
    ("GET", "/bazar/purchase/1", "POST"), ("POST", "/bazar/update_price/1", "PUT"), ("GET", "/bazar/books", "POST"),
    ("PUT", "/bazar/cache", "GET, HEAD"), ("POST", "/bazar/cache/1", "DELETE"), ("GET", "/internal/invalidate", "POST"),
    ("POST", "/metrics", "GET, HEAD"), ("PUT", "/book/1", "GET, HEAD"),
])
def test_405_says_which_methods_are_allowed(shop: Shop, method: str, path: str, allowed: str) -> None:
    r = shop.api(method, path, admin=True)
    error(r, 405)
    assert r.header("Allow") == allowed


def test_no_replica_is_503_with_retry_after(shop: Shop) -> None:
    """Every way the public API can find no replica able to answer says when to retry:
    reads (a cache miss, the whole list, a search), writes, purchases, orders, readiness."""
    ok(shop.api("GET", "/bazar/info/1"))  # cached: still answered from memory below
    shop.network.kill(CATALOG_PORT)
    shop.network.kill(ORDER_PORT)
    shop.run(0.5)
    for method, path, body in [
            ("GET", "/bazar/info/all", None), ("GET", "/bazar/info/2", None), ("GET", "/bazar/search/new", None),
            ("POST", "/bazar/purchase/1", {"quantity": 1}), ("PUT", "/bazar/update_price/1", {"price": 5}),
            ("POST", "/bazar/restock/1", {"quantity": 1}),
            ("POST", "/bazar/books", {"title": "T", "topic": "t", "price": 5, "quantity": 1}),
            ("GET", "/bazar/orders", None), ("GET", "/ready", None)]:
        r = shop.api(method, path, json=body, admin=True)
        error(r, 503)
        assert r.header("Retry-After") == "1", (method, path)
    assert ok(shop.api("GET", "/bazar/info/1"))["id"] == 1
    r = shop.http("GET", url_of(FRONTEND_PORT) + "/book/2")  # the storefront's error page too
    assert (r.code, r.header("Retry-After")) == (503, "1")


# -- HTTP details: Location, ETag ------------------------------------------------------------

def test_a_new_book_is_201_with_its_location(shop: Shop) -> None:
    r = shop.api("POST", "/bazar/books", json={"title": "T", "topic": "t", "price": 5, "quantity": 2}, admin=True)
    book = ok(r, 201)
    assert r.header("Location") == f"/bazar/info/{book['id']}"
    assert ok(shop.api("GET", r.header("Location") or "")) == book


@pytest.mark.parametrize("path", ["/bazar/info/1", "/bazar/info/all", "/bazar/search/distributed%20systems"])
def test_reads_carry_an_etag_and_answer_if_none_match_with_304(shop: Shop, path: str) -> None:
    first = shop.api("GET", path)
    tag = first.header("ETag")
    assert first.code == 200 and tag is not None and tag.startswith('"') and tag.endswith('"')
    again = shop.api("GET", path)  # from the cache, for info and search: the same bytes, the same tag
    assert (again.body, again.header("ETag")) == (first.body, tag)
    for asked in (tag, f"W/{tag}", f'"other", {tag}', "*"):
        r = shop.api("GET", path, headers={"If-None-Match": asked})
        assert (r.code, r.body, r.header("ETag")) == (304, b"", tag), asked
        assert r.header("Content-Length") is None and r.header("Content-Type") is None
    r = shop.api("GET", path, headers={"If-None-Match": '"other"'})
    assert (r.code, r.body, r.header("ETag")) == (200, first.body, tag)
    # a write changes the body, so the tag: the old one no longer matches
    ok(shop.api("PUT", "/bazar/update_price/1", json={"price": 33.5}, admin=True))
    new = {"title": "Paxos Made Simple", "topic": "distributed systems", "price": 12, "quantity": 3}
    ok(shop.api("POST", "/bazar/books", json=new, admin=True), 201)
    r = shop.api("GET", path, headers={"If-None-Match": tag})
    assert r.code == 200 and r.header("ETag") not in (None, tag) and r.body != first.body
    metrics = shop.api("GET", "/metrics").body.decode()
    assert 'status="304"' in metrics


def test_errors_carry_no_etag(shop: Shop) -> None:
    r = shop.api("GET", "/bazar/info/99", headers={"If-None-Match": "*"})
    error(r, 404)
    assert r.header("ETag") is None


# -- malformed requests change nothing ---------------------------------------------------------

REQUESTS = [("PUT", "/bazar/update_price/{}"), ("POST", "/bazar/restock/{}"), ("POST", "/bazar/books"),
            ("POST", "/bazar/purchase/{}")]
junk_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.sampled_from(["price", "quantity", "title", "topic", "x"]), inner, max_size=4)),
    max_leaves=8)


def malformed(body: Any) -> bool:
    """Bodies no endpoint accepts: no field set is valid for any of them."""
    if not isinstance(body, dict):
        return body is not None  # no body at all is a purchase of one copy
    if not body:
        return False  # {} too
    q, p = body.get("quantity"), body.get("price")
    bad_q = isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 10**6
    bad_p = isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1e9 or p != p
    return bool((bad_q or "quantity" not in body) and (bad_p or "price" not in body)) or "x" in body


def unacceptable(data: bytes) -> bool:
    if not data.strip():
        return False
    try:
        return malformed(orjson.loads(data))
    except orjson.JSONDecodeError:
        return True


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.sampled_from(REQUESTS), ident=st.sampled_from(["1", "2", "abc", "-1", "99"]),
       body=st.one_of(junk_json.map(lambda b: json.dumps(b).encode()), st.binary(max_size=40))
       .filter(unacceptable),
       auth=st.booleans())
def test_malformed_requests_change_nothing(shop: Shop, request: tuple[str, str], ident: str, body: bytes,
                                           auth: bool) -> None:
    method, path = request
    before = shop.state()
    r = shop.api(method, path.format(ident), data=body, admin=auth)
    assert 400 <= r.code < 500, (request, body, r)
    error(r, r.code)
    assert shop.state() == before


def test_info_all_demands_a_replica_as_new_as_our_own_writes() -> None:
    """Read-your-writes for GET /bazar/info/all: the front end asks the catalog for a
    replica at least as new as its newest write, not only the newest announcement."""
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import Clock

    from bazar.cache import LRUCache
    from bazar.frontend import Frontend
    from bazar.invalidation import InvalidationStream

    class Catalog:
        listeners: list[Any] = []
        asked: list[int] = []

        async def read(self, path: str, min_seq: int = 0, headers: Any = None) -> tuple[int, bytes, int]:
            self.asked.append(min_seq)
            return 200, b"[]", min_seq

    stream = InvalidationStream(LRUCache(4), Clock())
    stream.observe_primary(3)  # announcements seen up to 3
    fe = Frontend(catalog=Catalog(), order=Catalog(), cache=stream.cache, stream=stream,  # type: ignore[arg-type]
                  admin_token=None, secret=None)
    stream.written(9, ["info:1"])  # our own write at 9, not yet announced
    ensureDeferred(fe.all_books())
    assert Catalog.asked == [9]


def test_refused_input_leaves_no_entry_in_any_log(shop: Shop) -> None:
    """Bad input changes nothing, not even the logs: an unknown book, a bad quantity,
    an admin write to an unknown book. A purchase refused for want of stock takes one
    catalog entry (its refusal, so that repeating its key gives 409 again) and no
    order entry."""
    before = (shop.catalog_store.last_index(), shop.order_store.last_index())
    error(shop.api("POST", "/bazar/purchase/99"), 404)
    error(shop.api("POST", "/bazar/purchase/2", json={"quantity": 0}), 400)
    error(shop.api("PUT", "/bazar/update_price/99", json={"price": 3.0}, admin=True), 404)
    error(shop.api("POST", "/bazar/restock/99", json={"quantity": 3}, admin=True), 404)
    assert (shop.catalog_store.last_index(), shop.order_store.last_index()) == before
    headers = {"Idempotency-Key": "too-many"}
    error(shop.api("POST", "/bazar/purchase/2", json={"quantity": 9}, headers=headers), 409)  # 8 in stock
    assert (shop.catalog_store.last_index(), shop.order_store.last_index()) == (before[0] + 1, before[1])
    ok(shop.api("POST", "/bazar/restock/2", json={"quantity": 5}, admin=True))
    error(shop.api("POST", "/bazar/purchase/2", json={"quantity": 9}, headers=headers), 409)  # its outcome
    assert stock(shop, 2) == 13 and shop.orders() == []


def test_a_cache_hit_is_answered_bare_at_the_channel_and_never_stale(shop: Shop) -> None:
    """A plain GET of a cached book is answered by the front end's channel before
    Twisted builds a request (bazar.http.app `bare_response`); a write made elsewhere
    drops it from the cache, so the next plain GET goes to the catalog and is new."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from bazar.http.server import QuietSite

    site = QuietSite(shop.nodes[2].resource)
    assert site.bare is not None
    plain = b"GET /bazar/info/4 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n"
    first = ok(shop.api("GET", "/bazar/info/4"))  # fills the cache
    assert site.bare(plain) is not None and orjson.loads(site.bare(plain).partition(b"\r\n\r\n")[2]) == first
    shop.do(shop.catalog.submit(update_price(4, 7.77)))  # another front end's write
    shop.run(0.1)
    miss = site.bare(plain)  # dropped: a miss, read from the catalog (its bare answer comes later)
    assert isinstance(miss, Deferred)
    answered: list[bytes] = []
    miss.addCallback(answered.append)
    shop.run(0.1)
    assert orjson.loads(answered[0].partition(b"\r\n\r\n")[2])["price"] == 7.77
    shop.do(shop.catalog.submit(update_price(4, 7.78)))
    shop.run(0.1)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(plain)
    shop.run(0.1)
    assert orjson.loads(transport.value().partition(b"\r\n\r\n")[2])["price"] == 7.78
    again = site.bare(plain)  # cached again, at the new price
    assert isinstance(again, bytes) and orjson.loads(again.partition(b"\r\n\r\n")[2])["price"] == 7.78
    channel.connectionLost(None)


def _through_the_channel(shop: Shop, data: bytes, *, whole: bool, node: int = 2) -> bytes:
    """The answer of a node (the front end's unless told) to `data` through its HTTP
    channel: given whole (a bare way may take it) or a byte at a time (the normal
    way), without the Date line."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from bazar.http.server import QuietSite

    channel = QuietSite(shop.nodes[node].resource).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    if whole:
        channel.dataReceived(data)
    else:
        for i in range(len(data)):
            channel.dataReceived(data[i:i + 1])
    shop.run(0.2)
    channel.connectionLost(None)
    return b"\r\n".join(line for line in transport.value().split(b"\r\n") if not line.startswith(b"Date: "))


@pytest.mark.parametrize("target", [
    b"/bazar/search/distributed%20systems", b"/bazar/search/graduate%20school", b"/bazar/search/nothing",
    b"/bazar/search/caf%C3%A9", b"/bazar/search/%FF", b"/bazar/search/a%0Ab", b"/bazar/search/..",
    b"/bazar/search/a%2Fb", b"/bazar/search/a/b", b"/bazar/search/", b"/bazar/search/a+b",
    b"/bazar/search/distributed%20systems?limit=1", b"/bazar/search/distributed%20systems?limit=x",
    b"/bazar/search/distributed%20systems?limit=1&after=1", b"/bazar/search/%41%42",
    b"/bazar/info/1", b"/bazar/info/99", b"/bazar/info/007", b"/bazar/info/x",
])
def test_reads_on_the_bare_way_answer_as_the_normal_way(shop: Shop, target: bytes) -> None:
    """A search or an info read (a cache miss, then a hit) through the channel whole (the
    bare way, when it takes it) and a byte at a time (the normal way): the same bytes."""
    data = b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n"
    for _ in range(2):  # a miss: the normal way fills the cache
        shop.nodes[2].frontend.cache.flush()
        slow = _through_the_channel(shop, data, whole=False)
        shop.nodes[2].frontend.cache.flush()
        fast = _through_the_channel(shop, data, whole=True)  # a miss on the bare way
        hit = _through_the_channel(shop, data, whole=True)  # then, maybe, a hit
        assert fast == slow == hit
        assert fast.startswith(b"HTTP/1.1 ") and b"Traceback" not in fast


def test_a_plain_search_and_an_info_miss_are_taken_on_the_bare_way(shop: Shop) -> None:
    from bazar.http.server import QuietSite

    site = QuietSite(shop.nodes[2].resource)
    for target in (b"/bazar/search/distributed%20systems", b"/bazar/info/3"):
        shop.nodes[2].frontend.cache.flush()
        miss = site.bare(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        assert isinstance(miss, Deferred)  # read from the catalog, answered when it comes
        answered: list[bytes] = []
        miss.addCallback(answered.append)
        shop.run(0.2)
        assert answered[0].startswith(b"HTTP/1.1 200 OK\r\n")
        hit = site.bare(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        assert isinstance(hit, bytes) and hit.partition(b"\r\n\r\n")[2] == answered[0].partition(b"\r\n\r\n")[2]
    for target in (b"/bazar/search/a%2Fb", b"/bazar/search/a/b", b"/bazar/info/x"):
        assert site.bare(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n") is None  # the normal way


@pytest.mark.parametrize("query", [
    b"topic=distributed%20systems", b"topic=distributed+systems", b"topic=graduate%20school&limit=1",
    b"topic=graduate%20school&limit=1&after=2", b"limit=2", b"limit=2&after=3", b"topic=x;limit=1", b"topic",
    b"topic=", b"limit=x", b"other=1", b"topic=a&topic=b", b"topic=%FF", b"",
])
def test_a_catalog_replica_answers_a_list_on_the_bare_way_as_the_normal_way(shop: Shop, query: bytes) -> None:
    """GET /books?… at a catalog replica (a front end's search miss): whole (the bare
    way) and a byte at a time (the normal way), the same bytes."""
    from bazar.http.server import QuietSite

    shop.run(1.0)
    target = b"/books?" + query if query else b"/books"
    data = b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nX-Bazar-Min-Seq: 1\r\n\r\n"
    outputs = [_through_the_channel(shop, data, whole=whole, node=0) for whole in (True, False)]  # the catalog's
    site = QuietSite(shop.nodes[0].resource)
    assert outputs[0] == outputs[1] and outputs[0].startswith(b"HTTP/1.1 ") and b"Traceback" not in outputs[0]
    if b"200 OK" in outputs[0]:
        assert site.bare(data) is not None  # taken on the bare way (a refusal raised at once goes the normal way)


@pytest.mark.parametrize("node", [0, 1])
@pytest.mark.parametrize("target", [b"/health", b"/health?x=1", b"/healthz", b"/health/", b"/health/1"])
def test_a_replicas_health_is_the_same_on_the_bare_way(shop: Shop, node: int, target: bytes) -> None:
    """/health of a catalog and an order replica, polled by every balancer: whole (the
    bare way, for /health itself) and a byte at a time (the normal way), the same bytes."""
    from bazar.http.server import QuietSite

    shop.run(1.0)
    data = b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    outputs = [_through_the_channel(shop, data, whole=whole, node=node) for whole in (True, False)]
    assert outputs[0] == outputs[1] and b"Traceback" not in outputs[0]
    bare = QuietSite(shop.nodes[node].resource).bare(data)
    if target.partition(b"?")[0] == b"/health":
        assert outputs[0].startswith(b"HTTP/1.1 200 OK\r\n") and b'"role":' in outputs[0]
        assert isinstance(bare, bytes)  # answered at the channel
    else:
        assert outputs[0].startswith(b"HTTP/1.1 404 ") and bare is None
