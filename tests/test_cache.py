"""bazar.cache: LRU order, eviction, and versioned fills against invalidations and
flushes (the stale-set race)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bazar.cache import LRUCache


def test_get_put_and_counts() -> None:
    cache = LRUCache(3)
    assert cache.get("a") is None
    assert cache.put("a", b"A", 1) is True
    assert cache.get("a") == b"A"
    assert cache.get("b") is None
    assert cache.stats() == {"capacity": 3, "size": 1, "hits": 1, "misses": 2, "evictions": 0}


def test_least_recently_used_goes_first() -> None:
    cache = LRUCache(3)
    for key in "abc":
        cache.put(key, key.upper(), 1)
    cache.get("a")          # a is now the most recent: b is the oldest
    cache.put("d", "D", 1)
    assert list(cache.entries) == ["c", "a", "d"]
    assert cache.get("b") is None and cache.evictions == 1
    cache.put("c", "C2", 2)  # a refill refreshes too
    cache.put("e", "E", 2)
    assert list(cache.entries) == ["d", "c", "e"] and cache.evictions == 2
    assert cache.get("c") == "C2"


def test_capacity_one_and_eviction_counts() -> None:
    cache = LRUCache(1)
    for i in range(10):
        cache.put(f"k{i}", i, 0)
    assert list(cache.entries) == ["k9"] and cache.evictions == 9
    assert cache.stats()["size"] == 1


def test_capacity_zero_stores_nothing() -> None:
    cache = LRUCache(0)
    assert cache.put("a", 1, 5) is False
    assert cache.get("a") is None
    assert cache.stats() == {"capacity": 0, "size": 0, "hits": 0, "misses": 1, "evictions": 0}


def test_invalidate_drops_and_refuses_older_fills() -> None:
    cache = LRUCache(4)
    cache.put("a", "v1", 3)
    cache.invalidate("a", 5)
    assert cache.get("a") is None
    assert cache.required("a") == 5 and cache.required("other") == 0
    assert cache.put("a", "v-old", 4) is False and cache.refused == 1
    assert cache.put("a", "v5", 5) is True and cache.get("a") == "v5"
    cache.invalidate("a", 2)  # an older invalidation still drops, but does not lower the bar
    assert cache.get("a") is None and cache.required("a") == 5


def test_drop_only_removes() -> None:
    cache = LRUCache(4)
    cache.put("a", 1, 1)
    assert cache.drop("a") is True and cache.drop("a") is False
    assert cache.put("a", 1, 1) is True  # no version bar was set


def test_flush_forgets_everything_and_refuses_reads_from_before() -> None:
    cache = LRUCache(4)
    cache.put("a", 1, 1)
    cache.put("b", 2, 1)
    generation = cache.generation
    cache.flush(floor=7)
    assert cache.stats()["size"] == 0 and cache.generation == generation + 1
    assert cache.put("a", 1, 9, generation) is False  # the read started before the flush
    assert cache.put("a", 1, 6, cache.generation) is False  # below the floor
    assert cache.put("a", 1, 7, cache.generation) is True
    cache.flush()  # a later flush never lowers the floor
    assert cache.required("zzz") == 7


def test_bypass_stores_nothing() -> None:
    cache = LRUCache(4)
    cache.bypass = True
    assert cache.put("a", 1, 1) is False and cache.get("a") is None


def test_forgetting_per_key_versions_keeps_their_guarantee(monkeypatch: Any) -> None:
    import bazar.cache
    monkeypatch.setattr(bazar.cache, "MAX_REMEMBERED", 3)
    cache = LRUCache(10)
    for i, key in enumerate("abc", 1):
        cache.invalidate(key, 10 * i)
    cache.invalidate("d", 5)  # table full: folded into a floor of 30
    assert len(cache.latest) <= 3
    for key, version in (("a", 10), ("b", 20), ("c", 30)):
        assert cache.required(key) >= version
        assert cache.put(key, "old", version - 1) is False


# -- the race, as a state machine ---------------------------------------------------------
#
# The catalog is a store of per-key values with a global sequence number; every write
# makes an invalidation that is delivered later, in any order. A read captures the
# cache generation and the data at the moment it reaches a replica (which answers
# with the replica's seq), and its result arrives later. Flushes come at any time.

KEYS = ("info:1", "info:2", "search:new")


class FillsAndInvalidations(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = LRUCache(2)
        self.seq = 0
        self.written: dict[str, int] = {k: 0 for k in KEYS}  # seq of the last write per key
        self.undelivered: list[tuple[str, int]] = []
        self.delivered: dict[str, int] = {k: 0 for k in KEYS}
        self.reads: list[dict[str, Any]] = []
        self.flushes = 0
        self.stored_from: dict[str, int] = {}  # key -> flush count when its read started

    @rule(key=st.sampled_from(KEYS))
    def read_starts(self, key: str) -> None:
        self.reads.append({"key": key, "generation": self.cache.generation, "flushes": self.flushes,
                           "required": self.cache.required(key), "value": self.written[key], "version": self.seq})

    @rule(key=st.sampled_from(KEYS))
    def write(self, key: str) -> None:
        self.seq += 1
        self.written[key] = self.seq
        self.undelivered.append((key, self.seq))

    @precondition(lambda self: self.undelivered)
    @rule(pick=st.integers(0, 100))
    def invalidation_arrives(self, pick: int) -> None:
        key, seq = self.undelivered.pop(pick % len(self.undelivered))
        self.cache.invalidate(key, seq)
        self.delivered[key] = max(self.delivered[key], seq)

    @precondition(lambda self: self.reads)
    @rule(pick=st.integers(0, 100))
    def read_result_arrives(self, pick: int) -> None:
        read = self.reads.pop(pick % len(self.reads))
        if read["version"] < read["required"]:
            return  # the front end asked for at least `required`: this replica would be skipped
        stored = self.cache.put(read["key"], read["value"], read["version"], read["generation"])
        if stored:
            assert read["flushes"] == self.flushes, "a fill whose read started before a flush was stored"
            self.stored_from[read["key"]] = read["flushes"]

    @rule(floor=st.booleans())
    def flush(self, floor: bool) -> None:
        self.flushes += 1
        self.cache.flush(self.seq if floor else 0)
        assert not self.cache.entries

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: str) -> None:
        self.cache.get(key)

    @invariant()
    def never_older_than_a_delivered_invalidation(self) -> None:
        for key, (value, version) in self.cache.entries.items():
            assert value >= self.delivered[key], (key, value, self.delivered[key])
            assert version >= self.delivered[key]
            assert self.stored_from[key] == self.flushes
        assert len(self.cache.entries) <= self.cache.capacity


FillsAndInvalidations.TestCase.settings = settings(max_examples=300, stateful_step_count=20, deadline=None)
TestFillsAndInvalidations = FillsAndInvalidations.TestCase


@settings(max_examples=50, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(["put", "get", "inv", "flush"]), st.sampled_from(KEYS),
                                 st.integers(0, 20)), max_size=40))
def test_capacity_zero_never_stores_whatever_happens(events: list[tuple[str, str, int]]) -> None:
    cache = LRUCache(0)
    for kind, key, n in events:
        if kind == "put":
            assert cache.put(key, n, n, cache.generation) is False
        elif kind == "get":
            assert cache.get(key) is None
        elif kind == "inv":
            cache.invalidate(key, n)
        else:
            cache.flush(n)
        assert cache.stats()["size"] == 0 and cache.evictions == 0
