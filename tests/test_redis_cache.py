"""Cache invalidation over Redis pub/sub, with a real redis-server started (and
killed) by the test and `bazar-cluster --redis ... --frontends 2`."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bazar.invalidation import signature
from bazar.testing.processes import (
    SECRET,
    TOKEN,
    Cluster,
    RedisServer,
    RedisWatcher,
    call,
    get_json,
    redis_command,
    wait_until,
)

pytestmark = pytest.mark.integration

CHANNEL = "bazar:invalidations"


@pytest.fixture(scope="module")
def redis(start_redis: Callable[..., RedisServer]) -> RedisServer:
    return start_redis()


@pytest.fixture(scope="module")
def cluster(start_cluster: Callable[..., Cluster], redis: RedisServer) -> Cluster:
    return start_cluster("redis", frontends=2, redis=redis.url)


@pytest.fixture
def watcher(redis: RedisServer) -> Iterator[RedisWatcher]:
    w = RedisWatcher(redis.port, CHANNEL)
    yield w
    w.close()


def info(front: str, book_id: int) -> dict[str, Any]:
    return get_json(f"{front}/bazar/info/{book_id}")  # type: ignore[no-any-return]


def stats(front: str) -> dict[str, int]:
    return get_json(front + "/bazar/cache")  # type: ignore[no-any-return]


def health(front: str) -> dict[str, Any]:
    return get_json(front + "/health")  # type: ignore[no-any-return]


def cache_in_front(front: str, book_id: int) -> dict[str, Any]:
    """Read a book twice through `front`; the second read must be a cache hit."""
    info(front, book_id)
    hits = stats(front)["hits"]
    value = info(front, book_id)
    assert stats(front)["hits"] == hits + 1, f"{front} did not cache book {book_id}"
    return value


def set_price(front: str, book_id: int, price: float) -> None:
    r = call("PUT", f"{front}/bazar/update_price/{book_id}", {"price": price}, token=TOKEN, timeout=20)
    assert r.status == 200 and r.json["price"] == price, (r.status, r.body)


def subscribers(redis: RedisServer) -> int:
    reply = redis_command(redis.port, "PUBSUB", "NUMSUB", CHANNEL)
    return int(reply[1])


def test_both_front_ends_subscribe_and_the_catalog_publishes(cluster: Cluster, redis: RedisServer,
                                                             watcher: RedisWatcher) -> None:
    wait_until(lambda: subscribers(redis) == 3, 20, "two front ends (and the test) subscribed")
    fe1, fe2 = cluster.fronts
    set_price(fe2, 0, 101.5)
    got = watcher.messages(10, lambda ms: any("info:0" in m["keys"] for m in ms))
    message = next(m for m in got if "info:0" in m["keys"])
    assert isinstance(message["seq"], int) and message["seq"] >= 1
    assert info(fe1, 0)["price"] == 101.5


def test_a_message_on_redis_alone_drops_the_cached_entry(cluster: Cluster, redis: RedisServer) -> None:
    """Publish an invalidation straight on the channel (no HTTP push involved): the
    front end drops the entry, so the next read misses."""
    fe1 = cluster.fronts[0]
    cache_in_front(fe1, 4)
    upto = wait_until(lambda: health(fe1)["last_seq"] or None, 10, "a baseline seq at the front end")
    message = {"seq": upto, "keys": ["info:4"], "epoch": 1, "sig": signature(SECRET, upto, ["info:4"], 1)}
    receivers = redis_command(redis.port, "PUBLISH", CHANNEL, json.dumps(message))
    assert receivers >= 2

    def dropped() -> bool:
        misses = stats(fe1)["misses"]
        info(fe1, 4)
        return stats(fe1)["misses"] == misses + 1
    wait_until(dropped, 10, "the entry to be dropped by the Redis message")


def test_forged_or_unsigned_messages_on_redis_change_nothing(cluster: Cluster, redis: RedisServer) -> None:
    """Redis is outside the cluster secret: a message that is not signed with it, or
    names a write far ahead of every replica, neither drops entries nor stops reads."""
    fe1 = cluster.fronts[0]
    cache_in_front(fe1, 4)
    # without the password Redis takes nothing at all
    refused = redis_command(redis.port, "PUBLISH", CHANNEL, '{"seq": 1, "keys": []}', password=None)
    assert isinstance(refused, str) and refused.startswith("NOAUTH"), refused
    for forged in ({"seq": 10**12, "keys": ["info:4"]},
                   {"seq": 10**12, "keys": ["info:4"], "epoch": 1, "sig": signature("guess", 10**12, ["info:4"], 1)},
                   {"seq": "1", "keys": ["info:4"]}):
        assert redis_command(redis.port, "PUBLISH", CHANNEL, json.dumps(forged)) >= 2
    time.sleep(1.0)
    hits = stats(fe1)["hits"]
    assert info(fe1, 4)["id"] == 4 and stats(fe1)["hits"] == hits + 1  # still cached
    for book in range(7):
        assert info(fe1, book)["id"] == book  # and every read is answered
    metrics = urllib.request.urlopen(fe1 + "/metrics", timeout=5).read().decode()
    assert 'bazar_invalidations_dropped_total{reason="bad signature"} 2.0' in metrics, metrics[-2000:]
    assert 'bazar_invalidations_dropped_total{reason="seq is not a log index"} 1.0' in metrics


def test_price_update_through_front_end_2_reaches_front_end_1(cluster: Cluster) -> None:
    fe1, fe2 = cluster.fronts
    old = cache_in_front(fe1, 1)
    new_price = old["price"] + 7.25
    set_price(fe2, 1, new_price)
    t0 = time.monotonic()
    wait_until(lambda: info(fe1, 1)["price"] == new_price, 10, "front end 1 to see the new price", interval=0.05)
    print(f"\ninvalidation reached front end 1 within {time.monotonic() - t0:.3f}s")
    cache_in_front(fe1, 1)  # cached again, now with the new price
    assert info(fe1, 1)["price"] == new_price


def test_redis_outage_never_serves_stale_data(cluster: Cluster, redis: RedisServer,
                                              start_redis: Callable[..., RedisServer]) -> None:
    fe1, fe2 = cluster.fronts
    cluster.wait_healthy(30)
    before = cache_in_front(fe1, 2)
    cache_in_front(fe1, 3)
    assert stats(fe1)["size"] >= 2 and health(fe1)["cache_bypass"] is False

    redis.kill()  # SIGKILL, our own redis-server
    wait_until(lambda: health(fe1)["cache_bypass"] is True and health(fe2)["cache_bypass"] is True, 15,
               "both front ends to bypass their cache while Redis is down")
    assert stats(fe1)["size"] == 0  # dropped, not kept for later

    outage_price = before["price"] + 3.5
    set_price(fe2, 2, outage_price)
    # every read through front end 1 from now on shows the write (the cache is bypassed)
    hits = stats(fe1)["hits"]
    for _ in range(5):
        assert info(fe1, 2)["price"] == outage_price
    assert stats(fe1)["hits"] == hits  # nothing served from the cache
    r = call("POST", fe2 + "/bazar/purchase/3", timeout=20)
    assert r.status == 200, (r.status, r.body)  # the store keeps working without Redis
    quantity_3 = info(fe2, 3)["quantity"]
    assert info(fe1, 3)["quantity"] == quantity_3

    # Redis comes back on the same port: the front ends resubscribe and cache again
    back = RedisServer(redis.port, redis.workdir).start()
    try:
        wait_until(lambda: health(fe1)["cache_bypass"] is False and health(fe2)["cache_bypass"] is False, 20,
                   "the front ends to resubscribe")
        assert info(fe1, 2)["price"] == outage_price  # not the entry cached before the outage
        assert info(fe1, 3)["quantity"] == quantity_3
        cache_in_front(fe1, 2)
        # and invalidations flow again: a new write through front end 2 reaches front end 1
        set_price(fe2, 2, outage_price + 1)
        wait_until(lambda: info(fe1, 2)["price"] == outage_price + 1, 10, "the post-outage invalidation",
                   interval=0.05)
        # the catalog publishes on Redis again (its connection came back)
        watcher = RedisWatcher(back.port, CHANNEL)
        try:
            def published() -> bool:
                set_price(fe2, 5, 99.0 + time.monotonic() % 1)
                return bool(watcher.messages(1.0, lambda ms: any("info:5" in m["keys"] for m in ms)))
            wait_until(published, 20, "the catalog to publish on the restarted Redis", interval=0.1)
        finally:
            watcher.close()
    finally:
        back.stop()


def test_internal_invalidate_still_needs_the_secret(cluster: Cluster) -> None:
    for fe in cluster.fronts:
        r = call("POST", fe + "/internal/invalidate", {"messages": []})
        assert r.status == 403 and "error" in r.json
        r = call("POST", fe + "/internal/invalidate", {"messages": []}, secret=SECRET)
        assert r.status == 200
