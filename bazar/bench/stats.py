"""Numbers for bazar-bench, without I/O: percentiles and the summary of one load
step (and its one-line form), and the synthetic workload of the LRU experiment
(zipf traces replayed through a cache, next to a textbook LRU).
"""

from __future__ import annotations

import collections
import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Stats = dict[str, Any]


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """p-th percentile (0..100) of an ascending sequence, linear interpolation
    between closest ranks (numpy's default).  None for an empty sequence."""
    n = len(sorted_values)
    if n == 0:
        return None
    if not 0 <= p <= 100:
        raise ValueError("percentile must be within 0..100")
    if n == 1:
        return float(sorted_values[0])
    rank = (p / 100.0) * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(sorted_values[lo]) + (float(sorted_values[hi]) - float(sorted_values[lo])) * frac


def summarize(latencies_s: Sequence[float], errors: int = 0, elapsed: float = 0.0,
              statuses: Mapping[str, int] | None = None) -> Stats:
    """Stats of one measurement: latencies in seconds (successes only) -> ms."""
    xs = sorted(latencies_s)
    n = len(xs)

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1000.0

    return {
        "n": n,
        "errors": int(errors),
        "elapsed_s": elapsed,
        "rps": (n / elapsed) if elapsed > 0 else None,
        "avg_ms": ms(sum(xs) / n) if n else None,
        "p50_ms": ms(percentile(xs, 50)),
        "p95_ms": ms(percentile(xs, 95)),
        "p99_ms": ms(percentile(xs, 99)),
        "max_ms": ms(xs[-1]) if n else None,
        "statuses": dict(statuses or {}),
    }


def fmt_stats(st: Stats | None) -> str:
    """One progress line for a load step."""
    if not st or st.get("p50_ms") is None:
        return f"no successes ({st and st.get('errors')} errors)"
    rate = f"{st['rps']:.0f} req/s  " if st.get("rps") else f"{st['n']} ok  "
    cpu = ""
    if st.get("client_cpu") is not None:
        cpu += f"  cpu: client {st['client_cpu']:.0%}"
    if st.get("frontend_cpu") is not None:
        cpu += f", front end {st['frontend_cpu']:.0%}"
    if st.get("server_cpu_s") is not None and st.get("n"):
        cpu += f", servers {st['server_cpu_s'] / st['n'] * 1e6:.0f} µs/req"
    return (f"{rate}p50 {st['p50_ms']:.3f}  p95 {st['p95_ms']:.3f}  "
            f"p99 {st['p99_ms']:.3f} ms  errors {st['errors']}{cpu}")


def fmt_num(v: Any, unit: str = "") -> str:
    """A measured value as the report and the progress lines show it ("—" if missing)."""
    if v is None:
        return "—"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "MB":
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


# -- zipf traces and LRU replay ------------------------------------------------------


def zipf_weights(n_keys: int, s: float = 1.0) -> list[float]:
    return [1.0 / (k**s) for k in range(1, n_keys + 1)]


def zipf_trace(n_keys: int, length: int, s: float = 1.0, seed: int = 0) -> list[int]:
    """A reproducible trace of `length` keys in [0, n_keys); key k has weight
    1/(k+1)**s (key 0 is the most popular)."""
    if n_keys < 1:
        raise ValueError("n_keys must be >= 1")
    if length < 0:
        raise ValueError("length must be >= 0")
    rng = random.Random(seed)
    cum = list(itertools.accumulate(zipf_weights(n_keys, s)))
    return rng.choices(range(n_keys), cum_weights=cum, k=length)


def zipf_topk_mass(n_keys: int, k: int, s: float = 1.0) -> float:
    """Probability mass of the k most popular keys: the hit rate of an ideal
    cache of size k that holds exactly the top k (an upper reference line)."""
    w = zipf_weights(n_keys, s)
    return sum(w[: max(0, min(k, n_keys))]) / sum(w)


class RefLRU:
    """Minimal OrderedDict LRU with the interface expected of bazar.cache.LRUCache."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._d: collections.OrderedDict[Any, tuple[Any, Any]] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Any) -> Any:
        try:
            value, _version = self._d[key]
        except KeyError:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Any, value: Any, version: Any) -> None:
        if self.capacity <= 0:
            return
        if key in self._d:
            self._d.move_to_end(key)
        self._d[key] = (value, version)
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
            self.evictions += 1


def make_cache(factory: Callable[..., Any], capacity: int) -> Any:
    try:
        return factory(capacity)
    except TypeError:
        return factory(capacity=capacity)


def replay_lru(trace: Sequence[Any], cache: Any) -> dict[str, Any]:
    """Replay a key trace through a cache (get; on a miss put).  A miss is a
    get() that returned None or that raised the cache's own miss counter."""
    counted = hasattr(cache, "misses") and hasattr(cache, "hits")
    hits = misses = 0
    for i, key in enumerate(trace):
        m0 = cache.misses if counted else 0
        try:
            value = cache.get(key)
        except KeyError:
            value = None
        missed = value is None or (counted and cache.misses != m0)
        if missed:
            misses += 1
            cache.put(key, {"id": key}, i + 1)
        else:
            hits += 1
    total = hits + misses
    return {
        "hits": hits,
        "misses": misses,
        "evictions": getattr(cache, "evictions", None),
        "hit_rate": hits / total if total else 0.0,
    }
