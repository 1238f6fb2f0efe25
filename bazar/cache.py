"""The front end's in-memory LRU cache, with versioned entries.

Every value is stored with the catalog sequence number it reflects. An invalidation
carries the sequence number of the write that made it; the cache remembers the
newest one per key, and a fill older than that is refused. That closes the
stale-set race: a read starts, a write and its invalidation happen, then the old
read result arrives — it is not stored. A fill also carries the cache generation at
the time its read started; a flush (channel lost, gap in the invalidation stream)
starts a new generation, so no read that overlapped an outage is stored.

A page of a list (`?limit=&after=`) is an entry of its own, filed *under* the key of
the whole list (`put(..., under=key)`): what invalidates that key (`search:{topic}`)
drops every page filed under it, and a page's fill is held to that key's versions. So
the writes that announce a topic's key need not know which pages were cached.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from attrs import define, field

MAX_REMEMBERED = 100_000


@define
class LRUCache:
    capacity: int
    entries: "OrderedDict[str, tuple[Any, int]]" = field(factory=OrderedDict)
    pages: dict[str, set[str]] = field(factory=dict)  # a key -> the entries filed under it
    under: dict[str, str] = field(factory=dict)  # an entry filed under a key -> that key
    latest: dict[str, int] = field(factory=dict)  # newest invalidation seen per key
    floor: int = 0  # no fill below this version is stored (raised by flushes)
    generation: int = 0
    bypass: bool = False  # True while the invalidation channel is down
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    refused: int = 0  # fills refused as stale

    def get(self, key: str) -> Any | None:
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found[0]

    def hit(self, key: str) -> Any | None:
        """Like `get`, but a miss is not counted (the caller goes on to a `get`)."""
        found = self.entries.get(key)
        if found is None:
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found[0]

    def required(self, key: str) -> int:
        """The oldest version a read of `key` (or of a page filed under it) may return to a client."""
        return max(self.floor, self.latest.get(key, 0))

    def put(self, key: str, value: Any, version: int, generation: int | None = None, under: str | None = None) -> bool:
        """Store a fill read at `version`, unless an invalidation of `key` (of `under`, for
        a page filed under it) or a flush came after the read started."""
        if self.capacity <= 0 or self.bypass:
            return False
        if (generation is not None and generation != self.generation) \
                or version < self.required(under if under is not None else key):
            self.refused += 1
            return False
        self.entries[key] = (value, version)
        self.entries.move_to_end(key)
        if under is not None:
            self.under[key] = under
            self.pages.setdefault(under, set()).add(key)
        while len(self.entries) > self.capacity:
            evicted, _ = self.entries.popitem(last=False)
            self._unfile(evicted)
            self.evictions += 1
        return True

    def _unfile(self, key: str) -> None:
        """Forget where an entry that is gone was filed."""
        owner = self.under.pop(key, None)
        if owner is not None:
            filed = self.pages[owner]
            filed.discard(key)
            if not filed:
                del self.pages[owner]

    def _pop(self, key: str) -> bool:
        """Drop `key` and every page filed under it; whether `key` itself was there."""
        found = self.entries.pop(key, None) is not None
        if found:
            self._unfile(key)
        for page in self.pages.pop(key, ()):
            self.entries.pop(page, None)
            del self.under[page]
        return found

    def invalidate(self, key: str, version: int) -> None:
        self._pop(key)
        if version > self.latest.get(key, 0):
            if len(self.latest) >= MAX_REMEMBERED:
                # forget per-key versions but keep their guarantee with a global floor
                self.floor = max(self.floor, max(self.latest.values()))
                self.latest.clear()
            self.latest[key] = version

    def drop(self, key: str) -> bool:
        return self._pop(key)

    def flush(self, floor: int = 0) -> None:
        """Forget every entry and refuse fills from reads that started before now."""
        self.entries.clear()
        self.pages.clear()
        self.under.clear()
        self.floor = max(self.floor, floor)
        self.generation += 1

    def clamp(self, version: int) -> None:
        """Take back every requirement above `version` (they named writes nobody has)
        and start afresh: no entry, no fill from a read that started before now."""
        self.latest = {k: min(v, version) for k, v in self.latest.items()}
        self.floor = min(self.floor, version)
        self.flush()

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "size": len(self.entries), "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}
