"""The public contract of DESIGN.md over real HTTP, against a real
`twistd -n bazar-cluster` (3 catalog + 3 order replicas + 1 front end, each its own
process with its own SQLite file), plus the supervisor's lifecycle: restart of a
replica killed with SIGKILL, a clean SIGTERM, restart on the same data directory."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from bazar.testing.processes import (
    ADMIN_CALLS,
    SECRET,
    SEED,
    TOKEN,
    Cluster,
    call,
    get_json,
    group_members,
    pid_alive,
    try_get_json,
    wait_until,
)

pytestmark = pytest.mark.integration

BOOK_FIELDS = {"id", "title", "topic", "price", "quantity"}
ORDER_FIELDS = {"id", "book_id", "title", "quantity", "price", "total", "created"}


@pytest.fixture(scope="module")
def cluster(start_cluster: Callable[..., Cluster]) -> Cluster:
    return start_cluster("api")


# -- small helpers -------------------------------------------------------------

def book(cluster: Cluster, book_id: int) -> dict[str, Any]:
    return get_json(f"{cluster.front}/bazar/info/{book_id}")  # type: ignore[no-any-return]


def orders(cluster: Cluster) -> list[dict[str, Any]]:
    return get_json(cluster.front + "/bazar/orders", token=TOKEN)  # type: ignore[no-any-return]


def add_book(cluster: Cluster, title: str, quantity: int, topic: str = "testing",
             price: float = 10.0) -> dict[str, Any]:
    r = call("POST", cluster.front + "/bazar/books",
             {"title": title, "topic": topic, "price": price, "quantity": quantity}, token=TOKEN)
    assert r.status == 201, (r.status, r.body)
    return r.json  # type: ignore[no-any-return]


def assert_json_error(r: Any, status: int | tuple[int, ...]) -> None:
    wanted = status if isinstance(status, tuple) else (status,)
    assert r.status in wanted, (r.status, r.body[:300])
    assert r.content_type.startswith("application/json"), r.content_type
    body = r.json
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], r.body[:300]


def replicas_identical(cluster: Cluster) -> bool:
    books = [try_get_json(u + "/books") for u in cluster.catalogs]
    order_lists = [try_get_json(u + "/orders", token=TOKEN) for u in cluster.orders]
    return (books[0] is not None and all(b == books[0] for b in books)
            and order_lists[0] is not None and all(o == order_lists[0] for o in order_lists))


# -- /health, /metrics, /openapi.json -------------------------------------------

def test_health_on_all_seven_processes(cluster: Cluster) -> None:
    hs = cluster.wait_healthy(30)
    assert len(hs) == 7
    pids = set()
    members = set(group_members(cluster.proc.pid))  # type: ignore[union-attr]
    for service, urls in (("catalog", cluster.catalogs), ("order", cluster.orders)):
        roles = []
        for replica_id, url in enumerate(urls, 1):
            h = hs[url]
            assert {"service", "replica", "pid", "role", "status", "epoch", "last_seq"} <= set(h), h
            assert h["service"] == service and h["replica"] == replica_id, h
            assert h["status"] == "ok" and isinstance(h["epoch"], int) and h["epoch"] >= 1, h
            assert isinstance(h["last_seq"], int) and h["last_seq"] >= 0, h
            roles.append(h["role"])
            pids.add(h["pid"])
        assert sorted(roles) == ["backup", "backup", "primary"], roles
    fh = hs[cluster.front]
    assert {"service", "replica", "pid", "role", "status", "epoch", "last_seq"} <= set(fh), fh
    assert (fh["service"], fh["replica"], fh["role"], fh["status"]) == ("frontend", 0, "frontend", "ok")
    assert isinstance(fh["epoch"], int) and isinstance(fh["last_seq"], int), fh
    assert fh["cache_bypass"] is False
    pids.add(fh["pid"])
    # seven distinct live processes, all children of the supervisor we started
    assert len(pids) == 7 and all(pid_alive(p) for p in pids)
    assert pids <= members, (pids, members)
    # each one under the batch scheduling policy (bazar.process.schedule)
    assert {os.sched_getscheduler(p) for p in pids} == {os.SCHED_BATCH}


def test_metrics_on_every_process_and_openapi(cluster: Cluster) -> None:
    for url in cluster.everyone:
        r = call("GET", url + "/metrics")
        assert r.status == 200 and r.content_type.startswith("text/plain"), (url, r.status, r.content_type)
        assert b"# TYPE" in r.body and b"bazar_requests" in r.body and b"bazar_build_info{" in r.body
        assert b"process_resident_memory_bytes" in r.body
        figure = b"bazar_service_primary_known" if url in cluster.fronts else b"bazar_replica_role"
        assert figure in r.body, url
    r = call("GET", cluster.front + "/openapi.json")
    assert r.status == 200 and r.content_type.startswith("application/json")
    spec = r.json
    assert spec["openapi"].startswith("3.")
    for path in ("/bazar/info/all", "/bazar/info/{id}", "/bazar/search/{topic}", "/bazar/purchase/{id}",
                 "/bazar/update_price/{id}", "/bazar/restock/{id}", "/bazar/books", "/bazar/orders",
                 "/bazar/cache/{id}", "/bazar/cache", "/health"):
        assert path in spec["paths"], path


# -- reads ---------------------------------------------------------------------

def test_info_all_and_one_hold_the_seed_books(cluster: Cluster) -> None:
    r = call("GET", cluster.front + "/bazar/info/all")
    assert r.status == 200 and r.content_type.startswith("application/json")
    books = {b["id"]: b for b in r.json}
    for book_id, (title, topic, price, quantity) in SEED.items():
        b = books[book_id]
        assert set(b) == BOOK_FIELDS
        assert (b["title"], b["topic"], b["price"], b["quantity"]) == (title, topic, price, quantity)
        assert book(cluster, book_id) == b


def test_304_has_no_body_and_the_connection_goes_on(cluster: Cluster) -> None:
    """If-None-Match over a real socket, on a kept-alive connection: a cache hit's
    304 (the fast path) and an uncached one's (a Klein route) carry the ETag and
    neither body nor Content-Length, and the next request on the connection is
    answered as usual."""
    import http.client

    host, port = urllib.parse.urlsplit(cluster.front).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for path in ("/bazar/info/1", "/bazar/info/1", "/bazar/info/all"):  # the second: from the cache
            connection.request("GET", path)
            first = connection.getresponse()
            body, tag = first.read(), first.getheader("ETag")
            assert first.status == 200 and tag, path
            connection.request("GET", path, headers={"If-None-Match": tag})
            again = connection.getresponse()
            assert (again.status, again.read(), again.getheader("ETag")) == (304, b"", tag), path
            assert again.getheader("Content-Length") is None and again.getheader("Transfer-Encoding") is None
            connection.request("GET", path, headers={"If-None-Match": '"else"'})
            other = connection.getresponse()
            assert (other.status, other.read()) == (200, body)
    finally:
        connection.close()


@pytest.mark.parametrize("bad", ["99", "abc", "-1", "1.5", "%201", "1e3", "0x1", "99999999999999999999999",
                                 "%C3%A9", "%FF", "1%00"])
def test_info_of_unknown_or_malformed_id_is_404_json(cluster: Cluster, bad: str) -> None:
    # a URL that is not UTF-8 at all may be refused as a bad request instead
    assert_json_error(call("GET", f"{cluster.front}/bazar/info/{bad}"), (404, 400) if bad == "%FF" else 404)


def test_search_by_topic(cluster: Cluster) -> None:
    def search(topic: str) -> list[dict[str, Any]]:
        return get_json(cluster.front + "/bazar/search/" + urllib.parse.quote(topic, safe=""))  # type: ignore

    assert sorted(x["id"] for x in search("distributed systems")) == [0, 1]
    assert sorted(x["id"] for x in search("undergraduate school")) == [2, 3]
    new = search("new")
    assert sorted(x["id"] for x in new) == [4, 5, 6]
    assert all(set(x) == {"id", "title"} for x in new)
    assert {x["id"]: x["title"] for x in new}[6] == SEED[6][0]
    assert search("nothing here") == []
    assert search("Distributed Systems") == []  # exact topic
    for weird in ("%00", "a/b", "x" * 300, "%2e%2e%2f", "%E2%82%AC"):
        r = call("GET", cluster.front + "/bazar/search/" + weird)
        assert r.status == 200 and r.json == [], (weird, r.status, r.body[:200])
    r = call("GET", cluster.front + "/bazar/search/%FF")  # not UTF-8: an empty result or a 400, never a 500
    assert (r.status, r.json) == (200, []) or (r.status == 400 and "error" in r.json), (r.status, r.body)


def test_unknown_paths_and_methods_are_json_errors(cluster: Cluster) -> None:
    assert_json_error(call("GET", cluster.front + "/nope"), 404)
    assert_json_error(call("GET", cluster.front + "/bazar/info"), 404)
    assert_json_error(call("DELETE", cluster.front + "/bazar/info/1"), (404, 405))
    assert_json_error(call("GET", cluster.front + "/bazar/purchase/1"), (404, 405))
    assert_json_error(call("POST", cluster.front + "/bazar/info/all", {}), (404, 405))
    assert_json_error(call("GET", cluster.catalogs[0] + "/nope"), 404)


def test_cache_figures_and_drop(cluster: Cluster) -> None:
    before = get_json(cluster.front + "/bazar/cache")
    assert set(before) == {"capacity", "size", "hits", "misses", "evictions"}
    assert before["capacity"] == 1024
    book(cluster, 5)
    book(cluster, 5)
    after = get_json(cluster.front + "/bazar/cache")
    assert after["hits"] >= before["hits"] + 1 and after["size"] >= 1
    r = call("DELETE", cluster.front + "/bazar/cache/5", token=TOKEN)
    assert r.status == 200 and r.content_type.startswith("application/json"), (r.status, r.body)
    misses = get_json(cluster.front + "/bazar/cache")["misses"]
    book(cluster, 5)
    assert get_json(cluster.front + "/bazar/cache")["misses"] == misses + 1  # dropped: the next read missed
    assert_json_error(call("DELETE", cluster.front + "/bazar/cache/abc", token=TOKEN), 404)


# -- purchases -----------------------------------------------------------------

def test_purchase_reads_its_own_write(cluster: Cluster) -> None:
    start = book(cluster, 3)["quantity"]
    r = call("POST", cluster.front + "/bazar/purchase/3")
    assert r.status == 200, (r.status, r.body)
    order = r.json["order"]
    assert set(order) == ORDER_FIELDS
    assert order["book_id"] == 3 and order["quantity"] == 1 and order["title"] == SEED[3][0]
    assert order["price"] == SEED[3][2] and order["total"] == pytest.approx(SEED[3][2])
    assert book(cluster, 3)["quantity"] == start - 1
    r = call("POST", cluster.front + "/bazar/purchase/3", {"quantity": 3})
    assert r.status == 200 and r.json["order"]["quantity"] == 3
    assert r.json["order"]["total"] == pytest.approx(3 * SEED[3][2])
    assert book(cluster, 3)["quantity"] == start - 4
    ids = [o["id"] for o in orders(cluster)]
    assert order["id"] in ids and r.json["order"]["id"] in ids


def test_idempotency_key_buys_once(cluster: Cluster) -> None:
    start = book(cluster, 4)["quantity"]
    headers = {"Idempotency-Key": "cluster-test-key-1"}
    first = call("POST", cluster.front + "/bazar/purchase/4", {"quantity": 2}, headers=headers)
    second = call("POST", cluster.front + "/bazar/purchase/4", {"quantity": 2}, headers=headers)
    assert first.status == second.status == 200
    assert first.json["order"] == second.json["order"]
    assert book(cluster, 4)["quantity"] == start - 2
    assert [o["id"] for o in orders(cluster)].count(first.json["order"]["id"]) == 1
    # the same key for a different purchase is refused and takes nothing
    other = call("POST", cluster.front + "/bazar/purchase/4", {"quantity": 5}, headers=headers)
    assert_json_error(other, (409, 422, 400))
    assert book(cluster, 4)["quantity"] == start - 2


def test_bad_purchases_are_4xx_and_change_nothing(cluster: Cluster) -> None:
    stock = book(cluster, 1)["quantity"]
    count = len(orders(cluster))
    front = cluster.front
    assert_json_error(call("POST", front + "/bazar/purchase/99"), 404)
    assert_json_error(call("POST", front + "/bazar/purchase/abc"), 404)
    assert_json_error(call("POST", front + "/bazar/purchase/-1"), 404)
    for body in ({"quantity": -3}, {"quantity": 0}, {"quantity": "two"}, {"quantity": 10**9}, {"quantity": 2.5},
                 {"quantity": True}, {"quantity": None}, {"quantity": 1, "extra": 1}, [1], "x", 3):
        assert_json_error(call("POST", front + "/bazar/purchase/1", body), 400)
    for raw in (b"{not json", b"\xff\xfe", b'{"quantity": NaN}', b'{"quantity": Infinity}', b"[", b'{"a":'):
        assert_json_error(call("POST", front + "/bazar/purchase/1", raw=raw), 400)
    assert_json_error(call("POST", front + "/bazar/purchase/1", raw=b'{"quantity": ' + b"1" * 70000 + b"}"), 413)
    assert_json_error(call("POST", front + "/bazar/purchase/1", headers={"Idempotency-Key": "k" * 201}), 400)
    assert_json_error(call("POST", front + "/bazar/purchase/1", {"quantity": 61}), 409)  # more than in stock
    assert book(cluster, 1)["quantity"] == stock
    assert len(orders(cluster)) == count


def test_concurrent_buyers_never_oversell(cluster: Cluster) -> None:
    new = add_book(cluster, "Five Copies Only", 1, topic="scarce")
    r = call("POST", f"{cluster.front}/bazar/restock/{new['id']}", {"quantity": 4}, token=TOKEN)
    assert r.status == 200 and r.json["quantity"] == 5

    def buy(_: int) -> tuple[int, Any]:
        res = call("POST", f"{cluster.front}/bazar/purchase/{new['id']}", timeout=30)
        return res.status, res.json

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(buy, range(20)))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 5 and statuses.count(409) == 15, statuses
    assert all("error" in body for s, body in results if s == 409)
    bought = {body["order"]["id"] for s, body in results if s == 200}
    assert len(bought) == 5
    assert book(cluster, new["id"])["quantity"] == 0
    assert_json_error(call("POST", f"{cluster.front}/bazar/purchase/{new['id']}"), 409)
    cluster.wait_quiet()
    for url in cluster.catalogs:
        assert get_json(f"{url}/books/{new['id']}")["quantity"] == 0, url
    for url in cluster.orders:
        mine = [o for o in cluster.order_list(url) if o["book_id"] == new["id"]]
        assert {o["id"] for o in mine} == bought and len(mine) == 5, url


# -- admin ---------------------------------------------------------------------



@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic " + TOKEN, "Bearer", TOKEN,
                                  "Bearer " + TOKEN + "x"])
def test_admin_calls_need_the_token(cluster: Cluster, auth: str | None) -> None:
    before = get_json(cluster.front + "/bazar/info/all")
    headers = {"Authorization": auth} if auth is not None else {}
    for method, path, body in ADMIN_CALLS:
        r = call(method, cluster.front + path, body, headers=headers)
        assert_json_error(r, 401)
    assert get_json(cluster.front + "/bazar/info/all") == before
    assert get_json(cluster.front + "/bazar/search/nope") == []


def test_admin_calls_with_the_token(cluster: Cluster) -> None:
    r = call("PUT", cluster.front + "/bazar/update_price/1", {"price": 30.5}, token=TOKEN)
    assert r.status == 200 and set(r.json) == BOOK_FIELDS and r.json["price"] == 30.5
    assert book(cluster, 1)["price"] == 30.5  # read own write through the cache
    quantity = book(cluster, 1)["quantity"]
    r = call("POST", cluster.front + "/bazar/restock/1", {"quantity": 5}, token=TOKEN)
    assert r.status == 200 and r.json["quantity"] == quantity + 5
    assert book(cluster, 1)["quantity"] == quantity + 5
    get_json(cluster.front + "/bazar/search/admin%20topic")  # cache the (empty) search
    new = add_book(cluster, "Paxos Made Simple", 3, topic="admin topic", price=12.0)
    assert set(new) == BOOK_FIELDS and new["id"] >= 7 and new["quantity"] == 3
    assert get_json(cluster.front + "/bazar/search/admin%20topic") == [{"id": new["id"], "title": "Paxos Made Simple"}]
    assert book(cluster, new["id"]) == new
    listed = orders(cluster)
    assert isinstance(listed, list) and listed and all(set(o) == ORDER_FIELDS for o in listed)
    for method, path in (("PUT", "/bazar/update_price/99"), ("POST", "/bazar/restock/99"),
                         ("PUT", "/bazar/update_price/x"), ("POST", "/bazar/restock/-2")):
        body = {"price": 1.0} if "price" in path else {"quantity": 1}
        assert_json_error(call(method, cluster.front + path, body, token=TOKEN), 404)


BAD_ADMIN_BODIES = [
    ("PUT", "/bazar/update_price/1", {"price": -1}), ("PUT", "/bazar/update_price/1", {"price": 0}),
    ("PUT", "/bazar/update_price/1", {"price": "x"}), ("PUT", "/bazar/update_price/1", {"price": 1e12}),
    ("PUT", "/bazar/update_price/1", {"price": True}), ("PUT", "/bazar/update_price/1", {}),
    ("PUT", "/bazar/update_price/1", {"price": 2, "quantity": 3}), ("PUT", "/bazar/update_price/1", [2]),
    ("POST", "/bazar/restock/1", {"quantity": 0}), ("POST", "/bazar/restock/1", {"quantity": 2.5}),
    ("POST", "/bazar/restock/1", {"quantity": 10**6 + 1}), ("POST", "/bazar/restock/1", {"quantity": "3"}),
    ("POST", "/bazar/restock/1", {}), ("POST", "/bazar/restock/1", None),
    ("POST", "/bazar/books", {"title": ""}),
    ("POST", "/bazar/books", {"title": "T", "topic": "t", "price": 1.0}),
    ("POST", "/bazar/books", {"title": "T" * 201, "topic": "t", "price": 1.0, "quantity": 1}),
    ("POST", "/bazar/books", {"title": "T\x00", "topic": "t", "price": 1.0, "quantity": 1}),
    ("POST", "/bazar/books", {"title": "   ", "topic": "t", "price": 1.0, "quantity": 1}),
    ("POST", "/bazar/books", {"title": "T", "topic": "t", "price": -1.0, "quantity": 1}),
    ("POST", "/bazar/books", {"title": "T", "topic": "t", "price": 1.0, "quantity": 0}),
    ("POST", "/bazar/books", {"title": "T", "topic": 5, "price": 1.0, "quantity": 1}),
    ("POST", "/bazar/books", {"title": "T", "topic": "t", "price": 1.0, "quantity": 1, "id": 3}),
]


def test_bad_admin_input_is_400_and_changes_nothing(cluster: Cluster) -> None:
    before = get_json(cluster.front + "/bazar/info/all")
    for method, path, body in BAD_ADMIN_BODIES:
        assert_json_error(call(method, cluster.front + path, body, token=TOKEN), 400)
    for raw in (b"{not json", b"[1,2]", b"\xff\xfe", b'{"price": NaN}', b'{"price": Infinity}', b"null", b"  "):
        assert_json_error(call("PUT", cluster.front + "/bazar/update_price/1", token=TOKEN, raw=raw), 400)
    big = b'{"price": ' + b"1" * 70000 + b"}"
    assert_json_error(call("PUT", cluster.front + "/bazar/update_price/1", token=TOKEN, raw=big), 413)
    assert_json_error(call("POST", cluster.front + "/bazar/books", token=TOKEN, raw=big), 413)
    assert get_json(cluster.front + "/bazar/info/all") == before


# -- internal endpoints --------------------------------------------------------

INTERNAL = [
    ("POST", "/internal/write", {"op": {"op": "update_price", "rid": "evil", "id": 1, "price": 1.0}}),
    ("POST", "/internal/raft", {"kind": "append", "term": 999, "src": 2, "dst": 1, "prev_index": 0, "prev_term": 0,
                                "entries": [], "commit": 0}),
    ("POST", "/internal/raft", {"kind": "vote", "term": 999, "src": 2, "dst": 1, "last_index": 10**6,
                                "last_term": 999, "pre": False}),
    ("GET", "/internal/status", None),
]


@pytest.mark.parametrize("secret", [None, "wrong-secret", ""])
def test_internal_endpoints_need_the_cluster_secret(cluster: Cluster, secret: str | None) -> None:
    before = get_json(cluster.front + "/bazar/info/all")
    healths = {u: get_json(u + "/health") for u in cluster.replicas}
    headers = {"X-Bazar-Secret": secret} if secret is not None else {}
    for url in cluster.replicas:
        for method, path, body in INTERNAL:
            assert_json_error(call(method, url + path, body, headers=headers), 403)
    for url in cluster.orders:
        r = call("POST", url + "/internal/purchase", {"book_id": 1, "quantity": 1, "key": "evil"}, headers=headers)
        assert_json_error(r, 403)
    r = call("POST", cluster.front + "/internal/invalidate", {"messages": [{"seq": 10**9, "keys": ["info:1"]}]},
             headers=headers)
    assert_json_error(r, 403)
    # the forged vote / write changed nothing: same primaries, same epochs, same books
    after = {u: get_json(u + "/health") for u in cluster.replicas}
    for url in cluster.replicas:
        assert (after[url]["role"], after[url]["epoch"]) == (healths[url]["role"], healths[url]["epoch"]), url
    assert get_json(cluster.front + "/bazar/info/all") == before
    assert "evil" not in json.dumps(orders(cluster))


def test_malformed_internal_messages_with_the_secret_are_400(cluster: Cluster) -> None:
    for url in cluster.replicas:
        for path in ("/internal/write", "/internal/raft"):
            for raw in (b"{}", b"[1]", b"not json", b'{"op": 3}', b'{"kind": "vote", "term": "x", "src": []}'):
                r = call("POST", url + path, raw=raw, secret=SECRET)
                assert_json_error(r, 400)
        assert call("GET", url + "/internal/status", secret=SECRET).status == 200
    for raw in (b"{}", b'{"messages": "x"}', b'{"messages": [{"seq": "a"}]}', b"[", b'{"messages": [3]}'):
        assert_json_error(call("POST", cluster.front + "/internal/invalidate", raw=raw, secret=SECRET), 400)
    cluster.wait_healthy(20)


# -- replicas read directly ------------------------------------------------------

def test_replicas_are_readable_directly_and_identical(cluster: Cluster) -> None:
    cluster.wait_quiet()
    wait_until(lambda: replicas_identical(cluster), 20, "identical replicas")
    via_front = get_json(cluster.front + "/bazar/info/all")
    for url in cluster.catalogs:
        assert get_json(url + "/books") == via_front, url
        assert get_json(url + "/books/2") == book(cluster, 2)
        assert_json_error(call("GET", url + "/books/999"), 404)
        assert_json_error(call("GET", url + "/books/abc"), 404)
        topic = get_json(url + "/books?topic=" + urllib.parse.quote("undergraduate school"))
        assert sorted(x["id"] for x in topic) == [2, 3]
    via_front_orders = orders(cluster)
    assert via_front_orders
    for url in cluster.orders:
        assert_json_error(call("GET", url + "/orders"), 401)
        assert_json_error(call("GET", url + "/orders", token="wrong"), 401)
        assert cluster.order_list(url) == via_front_orders, url


# -- supervision -----------------------------------------------------------------

def test_supervisor_restarts_a_replica_killed_with_sigkill(cluster: Cluster) -> None:
    cluster.wait_quiet()
    catalog_backup = next(u for u in cluster.catalogs if cluster.health(u)["role"] == "backup")  # type: ignore
    order_backup = next(u for u in cluster.orders if cluster.health(u)["role"] == "backup")  # type: ignore
    victims = {u: cluster.health(u)["pid"] for u in (catalog_backup, order_backup)}  # type: ignore[index]
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)
    # writes while they are away (they must catch up on them)
    deadline = time.monotonic() + 30
    done = 0
    while done < 3 and time.monotonic() < deadline:
        r = call("POST", cluster.front + "/bazar/purchase/6", timeout=20)
        assert r.status in (200, 503), (r.status, r.body)
        done += r.status == 200
    assert done == 3
    price = call("PUT", cluster.front + "/bazar/update_price/6", {"price": 650.0}, token=TOKEN, timeout=20)
    assert price.status == 200, (price.status, price.body)

    def restarted() -> bool:
        for url, old in victims.items():
            h = cluster.health(url)
            if not h or h["pid"] == old or h["status"] != "ok":
                return False
        return True

    wait_until(restarted, 40, "the killed replicas to be restarted and caught up")
    for pid in victims.values():
        assert not pid_alive(pid)
    cluster.wait_quiet()
    wait_until(lambda: replicas_identical(cluster), 20, "identical replicas after the restart")
    assert get_json(catalog_backup + "/books/6")["price"] == 650.0
    assert get_json(catalog_backup + "/books") == get_json(cluster.front + "/bazar/info/all")
    assert cluster.order_list(order_backup) == orders(cluster)


# -- lifecycle: SIGTERM, restart on the same data, generated secrets --------------

@pytest.fixture(scope="module")
def stopped_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A cluster without secrets in its environment: write to it, then SIGTERM its
    supervisor (that PID only) and see what is left."""
    data = str(tmp_path_factory.mktemp("lifecycle") / "data")
    first = Cluster(data=data, env_secrets=False)
    state: dict[str, Any] = {"cluster": first}
    try:
        first.start()
        path = os.path.join(data, "secrets.json")
        state["secrets_mode"] = stat.S_IMODE(os.stat(path).st_mode)
        with open(path) as f:
            state["secrets"] = json.load(f)
        token = state["secrets"]["admin_token"]
        first.token = token
        r = call("PUT", first.front + "/bazar/update_price/2", {"price": 55.5}, token=token)
        assert r.status == 200, (r.status, r.body)
        r = call("POST", first.front + "/bazar/purchase/2", {"quantity": 3})
        assert r.status == 200, (r.status, r.body)
        state["order"] = r.json["order"]
        new = call("POST", first.front + "/bazar/books",
                   {"title": "Survives Restarts", "topic": "durable", "price": 9.0, "quantity": 4}, token=token)
        assert new.status == 201
        state["new"] = new.json
        first.wait_quiet()
        state["books"] = get_json(first.front + "/bazar/info/all")
        state["pids"] = [h["pid"] for h in first.healths().values()]  # type: ignore[index]
        supervisor = first.proc
        assert supervisor is not None
        state["supervisor"] = supervisor.pid
        os.kill(supervisor.pid, signal.SIGTERM)
        t0 = time.monotonic()
        wait_until(lambda: supervisor.poll() is not None and not any(pid_alive(p) for p in state["pids"]),
                   30, "the supervisor and its replicas to exit")
        state["stop_seconds"] = time.monotonic() - t0
        state["returncode"] = supervisor.returncode
        state["left"] = group_members(supervisor.pid)
        state["answering"] = [u for u in first.everyone if try_get_json(u + "/health", timeout=1) is not None]
        yield state
    finally:
        first.stop()
        if "second" in state:
            state["second"].stop()


def test_ctrl_c_stops_the_store_even_when_started_with_sigint_ignored(tmp_path: Any) -> None:
    """A shell starts background jobs with SIGINT ignored; Ctrl-C (SIGINT) must still
    stop the supervisor and every replica."""
    cluster = Cluster(data=str(tmp_path / "data"), sigint_ignored=True)
    try:
        cluster.start()
        pids = [h["pid"] for h in cluster.healths().values()]  # type: ignore[index]
        supervisor = cluster.proc
        assert supervisor is not None and len(pids) == 7
        os.kill(supervisor.pid, signal.SIGINT)
        wait_until(lambda: supervisor.poll() is not None and not any(pid_alive(p) for p in pids),
                   30, "the supervisor and its replicas to exit on SIGINT")
        assert group_members(supervisor.pid) == []
    finally:
        cluster.stop()


def test_sigterm_to_the_supervisor_leaves_no_process(stopped_cluster: dict[str, Any]) -> None:
    s = stopped_cluster
    assert len(s["pids"]) == 7
    assert s["returncode"] in (0, -signal.SIGTERM)  # twistd re-raises the signal after a clean shutdown
    assert not any(pid_alive(p) for p in s["pids"])
    assert s["left"] == []
    assert s["answering"] == []


def test_restart_on_the_same_data_keeps_data_and_generated_secrets(stopped_cluster: dict[str, Any]) -> None:
    s = stopped_cluster
    first: Cluster = s["cluster"]
    assert s["secrets_mode"] == 0o600
    assert set(s["secrets"]) == {"admin_token", "cluster_secret"}
    assert all(isinstance(v, str) and len(v) >= 16 for v in s["secrets"].values())
    second = Cluster(data=first.data, env_secrets=False, frontend_port=first.frontend_port,
                     catalog_ports=first.catalog_ports, order_ports=first.order_ports)
    s["second"] = second
    second.start()
    with open(os.path.join(first.data, "secrets.json")) as f:
        assert json.load(f) == s["secrets"]  # reused, not regenerated
    token = s["secrets"]["admin_token"]
    second.token = token
    assert get_json(second.front + "/bazar/info/all") == s["books"]  # not reseeded
    assert book(second, 2)["price"] == 55.5 and book(second, 2)["quantity"] == SEED[2][3] - 3
    assert book(second, s["new"]["id"]) == s["new"]
    listed = get_json(second.front + "/bazar/orders", token=token)
    assert s["order"] in listed
    assert_json_error(call("GET", second.front + "/bazar/orders", token=TOKEN), 401)
    # the secret generated for the first run still guards the internal endpoints
    cluster_secret = s["secrets"]["cluster_secret"]
    assert call("GET", second.catalogs[0] + "/internal/status", secret=cluster_secret).status == 200
    assert_json_error(call("GET", second.catalogs[0] + "/internal/status", secret=SECRET), 403)
    r = call("POST", second.front + "/bazar/purchase/2")
    assert r.status == 200 and r.json["order"]["id"] > s["order"]["id"]
    second.stop()


def test_the_store_says_when_it_is_ready(cluster: Cluster) -> None:
    def said() -> bool:
        with open(os.path.join(cluster.data, "cluster.out"), errors="replace") as f:
            return f"bazar-cluster: ready at {cluster.front}" in f.read()
    wait_until(said, 10, "the ready line")


@pytest.mark.parametrize("clash", ["data", "ports"])
def test_a_second_start_refuses_at_once_and_disturbs_nothing(cluster: Cluster, tmp_path: Any, clash: str) -> None:
    """A second bazar-cluster on the same data directory (other ports), or on the same
    ports (another directory): non-zero exit within 5 s, one line on stderr, and the
    running store goes on as it was (same primaries, same epochs)."""
    before = {name: (h["role"], h["epoch"]) for name, h in cluster.healths().items() if h and "epoch" in h}
    if clash == "data":
        argv = Cluster(data=cluster.data).argv()  # other, free ports
    else:
        argv = [str(tmp_path / "other") if a == cluster.data else a for a in cluster.argv()]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=30, cwd=str(tmp_path))
    assert time.monotonic() - started < 5
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bazar-cluster: ") and "not starting" in lines[0], lines
    time.sleep(1.0)
    after = {name: (h["role"], h["epoch"]) for name, h in cluster.healths().items() if h and "epoch" in h}
    assert after == before


@pytest.mark.parametrize("plugin", ["bazar-frontend", "bazar-catalog", "bazar-order"])
def test_a_process_that_cannot_have_its_port_exits_at_once_with_one_line(tmp_path: Any, plugin: str) -> None:
    """A bind failure is not only logged: the process ends, non-zero, saying why in one
    line, and a replica leaves its data directory to the next taker."""
    import socket
    import sys

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                f"--logfile={tmp_path / 'twistd.log'}", plugin, "--port", str(port)]
        if plugin != "bazar-frontend":
            argv += ["--data", str(tmp_path / "data")]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=60,  # noqa: S603
                              env={k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")})
        assert done.returncode == 1 and time.monotonic() - started < 30
        lines = done.stderr.decode().strip().splitlines()
        assert lines == [f"bazar: cannot listen on 127.0.0.1:{port} (Address already in use); not starting"], lines
    finally:
        holder.close()
    if plugin != "bazar-frontend":  # the lock on its data directory went with it
        import fcntl

        with open(tmp_path / "data" / f"{plugin}.lock", "r+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
