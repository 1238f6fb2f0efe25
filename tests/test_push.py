"""Cache invalidation pushed over HTTP (no Redis): `bazar-cluster --frontends 2`.
A write through one front end must reach the other front end's cache."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from bazar.testing.processes import SECRET, TOKEN, Cluster, call, get_json, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(start_cluster: Callable[..., Cluster]) -> Cluster:
    c = start_cluster("push", frontends=2)
    for fe in c.fronts:
        assert get_json(fe + "/health")["cache_bypass"] is False
    return c


def info(front: str, book_id: int) -> dict[str, Any]:
    return get_json(f"{front}/bazar/info/{book_id}")  # type: ignore[no-any-return]


def search(front: str, topic: str) -> list[dict[str, Any]]:
    return get_json(f"{front}/bazar/search/" + urllib.parse.quote(topic, safe=""))  # type: ignore


def stats(front: str) -> dict[str, int]:
    return get_json(front + "/bazar/cache")  # type: ignore[no-any-return]


def cached(front: str, read: Callable[[], Any]) -> Any:
    """Read twice; the second read must be a hit (the value is in `front`'s cache)."""
    read()
    hits = stats(front)["hits"]
    value = read()
    assert stats(front)["hits"] == hits + 1, f"{front} did not cache the value"
    return value


def timed_wait(check: Callable[[], bool], what: str) -> float:
    t0 = time.monotonic()
    wait_until(check, 10, what, interval=0.05)
    return time.monotonic() - t0


def test_price_update_through_one_front_end_invalidates_the_other(cluster: Cluster) -> None:
    fe1, fe2 = cluster.fronts
    old = cached(fe1, lambda: info(fe1, 1))
    new_price = round(old["price"] + 1.5, 2)
    r = call("PUT", f"{fe2}/bazar/update_price/1", {"price": new_price}, token=TOKEN)
    assert r.status == 200
    misses = stats(fe1)["misses"]
    took = timed_wait(lambda: info(fe1, 1)["price"] == new_price, "front end 1 to see the new price")
    print(f"\npush invalidation seen by front end 1 within {took:.3f}s")
    assert stats(fe1)["misses"] > misses  # the entry was dropped, then refilled from a replica
    assert cached(fe1, lambda: info(fe1, 1))["price"] == new_price


def test_purchase_and_restock_through_one_front_end_reach_the_other(cluster: Cluster) -> None:
    fe1, fe2 = cluster.fronts
    start = cached(fe1, lambda: info(fe1, 3))["quantity"]
    r = call("POST", f"{fe2}/bazar/purchase/3", {"quantity": 2})
    assert r.status == 200, (r.status, r.body)
    timed_wait(lambda: info(fe1, 3)["quantity"] == start - 2, "front end 1 to see the purchase")
    cached(fe1, lambda: info(fe1, 3))
    r = call("POST", f"{fe2}/bazar/restock/3", {"quantity": 10}, token=TOKEN)
    assert r.status == 200 and r.json["quantity"] == start + 8
    timed_wait(lambda: info(fe1, 3)["quantity"] == start + 8, "front end 1 to see the restock")


def test_new_book_invalidates_the_other_front_ends_search(cluster: Cluster) -> None:
    fe1, fe2 = cluster.fronts
    topic = "push topic"
    assert cached(fe1, lambda: search(fe1, topic)) == []
    r = call("POST", fe2 + "/bazar/books", {"title": "Pushed Around", "topic": topic, "price": 5.0, "quantity": 2},
             token=TOKEN)
    assert r.status == 201, (r.status, r.body)
    new = r.json
    timed_wait(lambda: search(fe1, topic) == [{"id": new["id"], "title": "Pushed Around"}],
               "front end 1's search to show the new book")
    assert info(fe1, new["id"]) == new
    # a second book on the same topic, after the first search result was cached again
    cached(fe1, lambda: search(fe1, topic))
    r = call("POST", fe2 + "/bazar/books", {"title": "Pushed Again", "topic": topic, "price": 6.0, "quantity": 1},
             token=TOKEN)
    assert r.status == 201
    timed_wait(lambda: [b["title"] for b in search(fe1, topic)] == ["Pushed Around", "Pushed Again"],
               "front end 1's search to show the second book")


def test_the_writer_front_end_reads_its_own_writes_at_once(cluster: Cluster) -> None:
    fe1, fe2 = cluster.fronts
    for i in range(5):
        cached(fe2, lambda: info(fe2, 6))
        price = 500.0 + i
        r = call("PUT", f"{fe2}/bazar/update_price/6", {"price": price}, token=TOKEN)
        assert r.status == 200
        assert info(fe2, 6)["price"] == price  # no wait: read-your-writes through the same front end
    timed_wait(lambda: info(fe1, 6)["price"] == 504.0, "front end 1 to catch up")


def test_a_pushed_invalidation_drops_exactly_that_entry(cluster: Cluster) -> None:
    fe1 = cluster.fronts[0]
    cached(fe1, lambda: info(fe1, 4))
    cached(fe1, lambda: info(fe1, 5))
    upto = get_json(fe1 + "/health")["last_seq"]
    r = call("POST", fe1 + "/internal/invalidate", {"messages": [{"seq": upto, "keys": ["info:4"]}]}, secret=SECRET)
    assert r.status == 200 and r.json["ok"] is True
    misses = stats(fe1)["misses"]
    info(fe1, 5)
    assert stats(fe1)["misses"] == misses  # info:5 is still cached
    info(fe1, 4)
    assert stats(fe1)["misses"] == misses + 1  # info:4 was dropped


def test_a_gap_in_the_pushed_sequence_flushes_the_cache(cluster: Cluster) -> None:
    """An announcement that never arrives (here: seq upto+1 is skipped) means the
    front end cannot know what changed: it drops its whole cache."""
    fe1, fe2 = cluster.fronts
    cluster.wait_quiet()
    cached(fe1, lambda: info(fe1, 0))
    cached(fe1, lambda: info(fe1, 2))
    assert stats(fe1)["size"] >= 2
    upto = get_json(fe1 + "/health")["last_seq"]
    r = call("POST", fe1 + "/internal/invalidate", {"messages": [{"seq": upto + 2, "keys": ["info:999"]}]},
             secret=SECRET)
    assert r.status == 200
    wait_until(lambda: stats(fe1)["size"] == 0, 10, "the front end to flush its cache after the gap")
    # the real writes catch up with the sequence; caching works again afterwards
    for price in (41.0, 42.0, 43.0):
        assert call("PUT", f"{fe2}/bazar/update_price/2", {"price": price}, token=TOKEN).status == 200
    timed_wait(lambda: info(fe1, 2)["price"] == 43.0, "front end 1 to see the last price")
    wait_until(lambda: cached(fe1, lambda: info(fe1, 2)), 10, "caching to resume")


def test_racing_writes_and_reads_on_both_front_ends_converge(cluster: Cluster) -> None:
    """Writers on both front ends and readers filling both caches at the same time:
    once the writes stop, every front end serves the replicas' value (no stale entry
    is left behind by a fill that raced with an invalidation)."""
    from concurrent.futures import ThreadPoolExecutor

    fe1, fe2 = cluster.fronts
    book_ids = (0, 5)

    def writer(n: int) -> None:
        front = cluster.fronts[n % 2]
        for i in range(12):
            book_id = book_ids[i % 2]
            r = call("PUT", f"{front}/bazar/update_price/{book_id}", {"price": 100.0 + n * 100 + i}, token=TOKEN,
                     timeout=20)
            assert r.status == 200, (r.status, r.body)

    def reader(n: int) -> None:
        front = cluster.fronts[n % 2]
        deadline = time.monotonic() + 30
        for i in range(400):
            if time.monotonic() > deadline:
                break
            assert call("GET", f"{front}/bazar/info/{book_ids[i % 2]}").status == 200

    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(writer, n) for n in range(4)] + [pool.submit(reader, n) for n in range(4)]
        for job in jobs:
            job.result(timeout=120)
    cluster.wait_quiet()
    truth = {b: get_json(f"{cluster.catalogs[0]}/books/{b}")["price"] for b in book_ids}
    for url in cluster.catalogs:
        assert {b: get_json(f"{url}/books/{b}")["price"] for b in book_ids} == truth
    for front in (fe1, fe2):
        for b in book_ids:
            def read(front: str = front, b: int = b) -> dict[str, Any]:
                return info(front, b)
            wait_until(lambda: read()["price"] == truth[b], 5,  # noqa: B023 - used at once
                       f"{front} to serve the final price of book {b}", interval=0.05)
            cached(front, read)
            for _ in range(5):
                assert read()["price"] == truth[b]
