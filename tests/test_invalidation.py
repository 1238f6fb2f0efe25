"""bazar.invalidation: the front end's view of the catalog's announcements (gaps,
silence, a lost Redis channel) and the catalog's HTTP push, on a task.Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from bazar.cache import LRUCache
from bazar.http.app import JsonApp
from bazar.http.request import read_object, require_secret
from bazar.invalidation import (
    Announcement,
    InvalidationStream,
    InvalidationSubscriber,
    Publisher,
    Refused,
    SubscriberFactory,
    redis_address,
    redis_credentials,
    signature,
    signed,
)
from bazar.replication.store import Outcome
from bazar.testing.memory import SECRET, Driver, url_of


def stream_at(upto: int = 0, grace: float = 1.0) -> tuple[InvalidationStream, LRUCache, Clock]:
    clock = Clock()
    cache = LRUCache(16)
    stream = InvalidationStream(cache, clock, grace=grace)
    stream.observe_primary(upto)
    return stream, cache, clock


def fill(cache: LRUCache, *keys: str, version: int = 0) -> None:
    for key in keys:
        assert cache.put(key, key.upper(), version, cache.generation), key


def test_no_caching_until_the_first_look_at_the_catalog() -> None:
    clock = Clock()
    cache = LRUCache(16)
    stream = InvalidationStream(cache, clock)
    assert cache.bypass and stream.upto is None
    assert cache.put("info:1", b"x", 0) is False
    stream.receive(3, ["info:1"])  # no baseline yet: the keys still fall, upto stays unknown
    assert stream.upto is None and cache.required("info:1") == 3
    stream.observe_primary(5)
    assert stream.upto == 5 and not cache.bypass
    assert cache.put("info:2", b"x", 4, cache.generation) is False  # older than the baseline
    assert cache.put("info:2", b"x", 5, cache.generation) is True


def test_contiguous_announcements_advance_upto_and_drop_keys() -> None:
    stream, cache, clock = stream_at(5)
    fill(cache, "info:1", "info:2", "search:new", version=5)
    stream.receive(6, ["info:1"])
    stream.receive(7, ["info:2", "search:new"])
    assert stream.upto == 7 and not stream.pending
    assert list(cache.entries) == []
    stream.receive(6, ["info:1"])  # a duplicate changes nothing
    assert stream.upto == 7
    clock.advance(5)
    stream.observe_primary(7)
    assert stream.flushes == 0


def test_a_gap_filled_within_grace_is_harmless() -> None:
    stream, cache, clock = stream_at(5)
    fill(cache, "info:3", version=5)
    stream.receive(7, ["info:1"])
    assert stream.upto == 5 and stream.pending == {7}
    clock.advance(0.6)
    stream.observe_primary(7)
    stream.receive(6, ["info:2"])
    assert stream.upto == 7 and not stream.pending and stream.gap_since is None
    clock.advance(2)
    stream.observe_primary(7)
    assert stream.flushes == 0 and cache.get("info:3") == "INFO:3"


def test_a_gap_not_filled_within_grace_flushes_the_cache() -> None:
    stream, cache, clock = stream_at(5)
    fill(cache, "info:3", "info:4", version=5)
    generation = cache.generation
    stream.receive(8, ["info:1"])  # 6 and 7 were lost
    clock.advance(0.9)
    stream.observe_primary(8)
    assert stream.flushes == 0 and len(cache.entries) == 2
    clock.advance(0.2)
    stream.observe_primary(8)
    assert stream.flushes == 1 and cache.generation == generation + 1
    assert not cache.entries and stream.upto == 8 and not stream.pending
    assert cache.put("info:3", b"x", 7, cache.generation) is False  # nothing from before the hole
    stream.receive(9, ["info:9"])
    assert stream.upto == 9


def test_a_primary_ahead_of_the_announcements_for_longer_than_grace_flushes() -> None:
    stream, cache, clock = stream_at(5)
    fill(cache, "info:1", version=5)
    stream.observe_primary(8)  # 6..8 written but not announced (yet)
    clock.advance(0.7)
    stream.observe_primary(8)
    assert stream.flushes == 0 and cache.get("info:1") == "INFO:1"
    clock.advance(0.4)
    stream.observe_primary(8)
    assert stream.flushes == 1 and not cache.entries and stream.upto == 8
    clock.advance(5)
    stream.observe_primary(8)
    assert stream.flushes == 1


def test_announcements_that_catch_up_in_time_prevent_the_flush() -> None:
    stream, cache, clock = stream_at(5)
    fill(cache, "info:2", version=5)
    stream.observe_primary(7)
    clock.advance(0.5)
    stream.receive(6, ["info:1"])
    stream.receive(7, ["info:1"])
    clock.advance(0.8)
    stream.observe_primary(7)
    assert stream.flushes == 0 and cache.get("info:2") == "INFO:2"


def test_a_lost_channel_flushes_and_bypasses_until_it_is_back() -> None:
    stream, cache, clock = stream_at(5)
    fill(cache, "info:1", version=5)
    stream.channel_lost()
    assert not cache.entries and cache.bypass
    assert cache.put("info:1", b"x", 9, cache.generation) is False
    generation = cache.generation
    stream.channel_back()
    assert not cache.bypass and cache.generation == generation + 1
    assert cache.put("info:1", b"x", 9, cache.generation) is True
    # a later health check with nothing missing keeps it on
    stream.observe_primary(5)
    assert not cache.bypass


def test_a_channel_back_before_any_baseline_still_bypasses() -> None:
    clock = Clock()
    cache = LRUCache(8)
    stream = InvalidationStream(cache, clock)
    stream.channel_down = True
    stream.channel_back()
    assert cache.bypass  # no baseline yet
    stream.channel_down = True
    stream.observe_primary(3)
    assert cache.bypass  # the channel is still down: the baseline alone is not enough
    stream.channel_back()
    assert not cache.bypass


def test_written_drops_the_keys_of_our_own_writes() -> None:
    stream, cache, clock = stream_at(5)
    fill(cache, "info:1", "info:2", version=5)
    stream.written(9, ["info:1"])
    assert list(cache.entries) == ["info:2"]
    assert cache.required("info:1") == 9
    assert cache.put("info:1", b"old", 8, cache.generation) is False
    assert stream.upto == 5  # the announcement itself is still expected


def test_redis_addresses() -> None:
    assert redis_address("redis://127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert redis_address("redis://cache") == ("cache", 6379)
    assert redis_credentials("redis://cache") == (None, None)
    assert redis_credentials("redis://:p%40ss@cache:6380") == (None, "p@ss")
    assert redis_credentials("redis://bazar:pw@cache") == ("bazar", "pw")
    assert redis_address("redis://bazar:pw@cache:6380") == ("cache", 6380)
    for bad in ("http://h:1", "redis://", "127.0.0.1:6379"):
        with pytest.raises(ValueError):
            redis_address(bad)


SECRET_KEY = "s3cret"


def sign(message: dict[str, Any], secret: str = SECRET_KEY, epoch: int = 2) -> bytes:
    return json.dumps({**message, "epoch": epoch,
                       "sig": signature(secret, message["seq"], message["keys"], epoch)}).encode()


def subscribed_stream() -> tuple[InvalidationStream, LRUCache]:
    cache = LRUCache(8)
    stream = InvalidationStream(cache, Clock(), secret=SECRET_KEY)
    stream.observe_primary(2)
    return stream, cache


@pytest.mark.parametrize("raw, reason", [
    (sign({"seq": 3, "keys": ["info:1"]}), None),
    (json.dumps({"seq": 3, "keys": ["info:1"]}).encode(), "bad signature"),  # unsigned
    (sign({"seq": 3, "keys": ["info:1"]}, secret="another store"), "bad signature"),
    (sign({"seq": 3, "keys": ["info:1"]}).replace(b'"seq": 3', b'"seq": 4'), "bad signature"),  # altered
    (b"not json", "not JSON"), (b"[]", "not an object"),
    (json.dumps({"seq": "3", "keys": [], "epoch": 1, "sig": "x"}).encode(), "seq is not a log index"),
    (json.dumps({"seq": True, "keys": [], "epoch": 1, "sig": "x"}).encode(), "seq is not a log index"),
    (json.dumps({"seq": 3, "keys": [1], "epoch": 1, "sig": "x"}).encode(), "keys are not a list of cache keys"),
    (sign({"seq": 3, "keys": ["k" * 301]}), "keys are not a list of cache keys"),
    (sign({"seq": 3, "keys": [f"info:{i}" for i in range(7000)]}), "oversized"),
], ids=["signed", "unsigned", "other secret", "altered", "not json", "array", "string seq", "bool seq",
        "int key", "long key", "oversized"])
def test_redis_messages_are_taken_only_when_signed_and_well_formed(raw: bytes, reason: str | None) -> None:
    stream, cache = subscribed_stream()
    cache.put("info:1", b"cached", 2, cache.generation)
    protocol = InvalidationSubscriber()
    protocol.factory = SubscriberFactory(on_message=stream.redis_message, on_subscribed=lambda: None,
                                         on_lost=lambda: None)
    protocol.messageReceived(None, "bazar:invalidations", raw)
    if reason is None:
        assert stream.newest == 3 and cache.get("info:1") is None and not stream.dropped
    else:
        assert stream.dropped == {reason: 1}
        assert stream.newest == 0 and cache.get("info:1") == b"cached" and cache.required("info:1") == 2


def test_the_publisher_signs_what_it_publishes() -> None:
    published: list[tuple[str, str]] = []

    class Redis:
        def publish(self, channel: str, message: str) -> Any:
            published.append((channel, message))
            return succeed(1)

    publisher = Publisher(http=None, clock=Clock(), secret=SECRET_KEY, frontends=[],  # type: ignore[arg-type]
                          redis_url=None, epoch=lambda: 7)
    publisher.redis = Redis()
    publisher.committed(Outcome({}, 12, ("info:3",), new=True))
    ((channel, message),) = published
    assert channel == "bazar:invalidations"
    assert signed(message.encode(), SECRET_KEY) == Announcement(12, ("info:3",))
    assert json.loads(message)["epoch"] == 7
    with pytest.raises(Refused):
        signed(message.encode(), "another store")


def test_an_announcement_no_replica_confirms_is_taken_back() -> None:
    """A message far ahead of every catalog replica (forged with a leaked secret, or
    from another store sharing Redis) must not leave reads waiting for a state nobody
    can serve: after 2 x grace without confirmation its floors are taken back."""
    cache = LRUCache(8)
    clock = Clock()
    stream = InvalidationStream(cache, clock, grace=1.0)
    stream.observe_primary(5)
    stream.confirm(5)
    stream.receive(10**12, ["info:1"])
    assert cache.required("info:1") == 10**12
    for _ in range(4):  # health checks every 0.25 s, for 1 s: a push may outrun them
        clock.advance(0.25)
        stream.confirm(6)
        stream.observe_primary(6)
    assert cache.required("info:1") == 10**12
    for _ in range(8):
        clock.advance(0.25)
        stream.confirm(6)
        stream.observe_primary(6)
    assert cache.required("info:1") <= 6 and stream.newest <= 6 and (stream.upto or 0) <= 6
    assert cache.floor <= 6 and stream.dropped["never confirmed"] == 1
    assert cache.put("info:1", b"fresh", 6, cache.generation)  # reads are served again


def test_an_announcement_the_replicas_confirm_in_time_is_kept() -> None:
    cache = LRUCache(8)
    clock = Clock()
    stream = InvalidationStream(cache, clock, grace=1.0)
    stream.observe_primary(5)
    stream.confirm(5)
    stream.receive(6, ["info:1"])
    clock.advance(0.25)
    stream.confirm(5)  # the health check has not seen it yet
    clock.advance(0.25)
    stream.confirm(6)
    for _ in range(12):
        clock.advance(0.25)
        stream.confirm(6)
    assert cache.required("info:1") == 6 and stream.upto == 6 and not stream.dropped


# -- the catalog's HTTP push ---------------------------------------------------------------

FE = 5000
CATALOG = 5101


class Receiver:
    """A front end's /internal/invalidate, recording what arrives."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.api = JsonApp("receiver")

        @self.api.route("/internal/invalidate", "POST", "invalidate")
        def invalidate(request: Any) -> Any:
            require_secret(request, SECRET)
            self.batches.append((read_object(request) or {})["messages"])
            return {"ok": True}

    def seqs(self) -> list[int]:
        return [m["seq"] for batch in self.batches for m in batch]


def outcome(seq: int, *keys: str) -> Outcome:
    return Outcome({}, seq, keys, new=True)


@pytest.fixture
def push() -> tuple[Driver, Receiver, Publisher]:
    driver = Driver(latency=0.01)
    receiver = Receiver()
    driver.network.add(FE, receiver.api.resource())
    publisher = Publisher(http=driver.network.client(CATALOG), clock=driver.clock, secret=SECRET,
                          frontends=[url_of(FE)], redis_url=None)
    publisher.start()
    return driver, receiver, publisher


def test_every_commit_is_pushed_in_order(push: tuple[Driver, Receiver, Publisher]) -> None:
    driver, receiver, publisher = push
    publisher.committed(outcome(1, "info:1"))
    driver.clock.advance(publisher.push_delay)  # the first push leaves; the next ones wait behind it
    for seq in range(2, 8):
        publisher.committed(outcome(seq, f"info:{seq}"))
    driver.until(lambda: receiver.seqs() == list(range(1, 8)))
    assert receiver.batches[0] == [{"seq": 1, "keys": ["info:1"]}]
    assert len(receiver.batches) < 7  # the ones queued behind the first went as one batch
    assert not publisher.sending and not publisher.queues[url_of(FE)]


def test_an_absent_front_end_loses_messages_it_will_notice(push: tuple[Driver, Receiver, Publisher]) -> None:
    driver, receiver, publisher = push
    driver.network.kill(FE)
    publisher.committed(outcome(1, "info:1"))
    publisher.committed(outcome(2, "info:2"))
    driver.run(2.0)
    assert receiver.seqs() == [] and not publisher.queues[url_of(FE)]  # given up, not piled up
    driver.network.revive(FE)
    publisher.committed(outcome(3, "info:3"))
    driver.until(lambda: receiver.seqs() == [3])  # the front end sees the gap 1..2 itself


def test_a_stopped_publisher_sends_nothing(push: tuple[Driver, Receiver, Publisher]) -> None:
    driver, receiver, publisher = push
    publisher.stop()
    publisher.committed(outcome(1, "info:1"))
    driver.run(1.0)
    assert receiver.seqs() == []


def test_newest_tracks_own_writes_and_announcements() -> None:
    stream = InvalidationStream(LRUCache(4), Clock())
    assert stream.newest == 0
    stream.written(7, ["info:1"])
    assert stream.newest == 7
    stream.receive(5, ["info:2"])
    assert stream.newest == 7
    stream.receive(9, [])
    assert stream.newest == 9
