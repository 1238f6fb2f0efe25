"""The bazar-bench report: the targets and their verdicts, the Markdown report of a
results object, and the plain-text targets table printed at the end of a run.

Everything here reads a results object (as written to results.json) and measures
nothing, so `bazar-bench --report-only` can rewrite a report from an earlier run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bazar.bench.baseline import baseline_text, median_ratio, unmeasured_reason
from bazar.bench.cores import cores_text
from bazar.bench.phases import OPS, RSS_ENTRIES
from bazar.bench.soak import worst_ratio
from bazar.bench.stats import Stats, fmt_num, percentile

Results = dict[str, Any]


def dig(d: Any, *keys: str) -> Any:
    """d[k1][k2]...; None where a key is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratio(a: Any, b: Any) -> float | None:
    """a ÷ b, or None when either is missing (or b is 0)."""
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return None
    return float(a) / float(b)


def cpu_per_request_ms(st: Stats | None) -> float | None:
    """Server CPU per successful request of a step (ms), from the CPU its server processes used."""
    if not st or not isinstance(st.get("server_cpu_s"), (int, float)) or not st.get("n"):
        return None
    return float(st["server_cpu_s"]) / float(st["n"]) * 1000.0


def at(*path: str) -> Callable[[Results], Any]:
    return lambda results: dig(results, *path)


def versus(mine: tuple[str, ...], theirs: tuple[str, ...]) -> Callable[[Results], float | None]:
    """Bazar's figure at `mine` ÷ the reference's at `theirs`."""
    return lambda results: ratio(dig(results, *mine), dig(results, *theirs))


def cpu_versus(mine: tuple[str, ...], theirs: tuple[str, ...]) -> Callable[[Results], float | None]:
    return lambda results: ratio(cpu_per_request_ms(dig(results, *mine)), cpu_per_request_ms(dig(results, *theirs)))


@dataclass(frozen=True)
class Target:
    """A figure the report judges: how it is read from the results, and what is wanted.
    `phase` names the results part whose "skipped" reason explains a missing figure."""

    name: str
    measure: Callable[[Results], Any]
    cmp: str
    limit: float
    unit: str
    phase: str = ""
    # why the figure is missing although its phase ran (None: the phase's own reason)
    missing: Callable[[Results], str | None] | None = None

    @property
    def wanted(self) -> str:
        sign = self.cmp.replace(">=", "≥").replace("<=", "≤")
        return f"{sign} {self.limit:g}×" if self.unit == "×" else f"{sign} {self.limit:g} {self.unit}"


REFERENCES = ("references", "bazar"), ("references", "twisted")
WRITE, PUT = ("etcd", "bazar", "write"), ("etcd", "etcd", "put")
TARGETS: list[Target] = [
    Target("cached info throughput, 16 conns", at("ops", "on", "info", "16", "rps"), ">=", 9000, "req/s"),
    Target("cached info p50, 1 conn", at("ops", "on", "info", "1", "p50_ms"), "<=", 0.2, "ms"),
    Target("uncached info throughput, 16 conns", at("ops", "off", "info", "16", "rps"), ">=", 2500, "req/s"),
    Target("uncached info p50, 1 conn", at("ops", "off", "info", "1", "p50_ms"), "<=", 0.8, "ms"),
    Target("purchase p50, 1 conn", at("ops", "on", "purchase", "1", "p50_ms"), "<=", 5, "ms"),
    Target("purchase throughput, 16 conns", at("ops", "on", "purchase", "16", "rps"), ">=", 300, "req/s"),
    Target("front-end RSS with 10,000 cached entries", at("rss", "rss_mb"), "<=", 80, "MB", "rss"),
    Target("cached info ÷ raw twisted.web: throughput, 16 conns",
           versus((*REFERENCES[0], "16", "rps"), (*REFERENCES[1], "16", "rps")), ">=", 1.0, "×", "references"),
    Target("cached info ÷ raw twisted.web: p50, 1 conn",
           versus((*REFERENCES[0], "1", "p50_ms"), (*REFERENCES[1], "1", "p50_ms")), "<=", 1.0, "×", "references"),
    Target("start-up: bazar-cluster to every /ready 200", at("startup", "all_ready_s"), "<=", 3, "s", "startup"),
    Target("replicated write ÷ etcd put: p50, 1 conn",
           versus((*WRITE, "1", "p50_ms"), (*PUT, "1", "p50_ms")), "<=", 1.5, "×", "etcd"),
    Target("replicated write ÷ etcd put: throughput, 16 conns",
           versus((*WRITE, "16", "rps"), (*PUT, "16", "rps")), ">=", 0.5, "×", "etcd"),
    Target("replicated write ÷ etcd put: server CPU per write",
           cpu_versus((*WRITE, "16"), (*PUT, "16")), "<=", 2, "×", "etcd"),
    Target("purchase p50 ÷ etcd put p50, 1 conn",
           versus(("etcd", "bazar", "purchase", "1", "p50_ms"), (*PUT, "1", "p50_ms")), "<=", 3, "×", "etcd"),
    # under faults (bazar.bench.faultreport): the issues' own targets, and two bounds of the design
    Target("elections under a CPU hog: epoch changes", at("hog", "changes_total"), "<=", 0, "epochs", "hog"),
    Target("failover under a CPU hog: kill → first purchase", at("hog", "failover_s"), "<=", 2, "s", "hog"),
    # (10%: a MiB of free-page jitter over 50,000 purchases is 20 B each, a tenth of a row)
    Target("soak: overhead in the SQLite file ÷ the purchase's own row, steady state",
           lambda r: worst_ratio(r.get("soak") or {}), "<=", 0.1, "×", "soak"),
    Target("soak: snapshots that bring a far-behind backup back", at("soak", "catchup", "installed"), ">=", 1,
           "snapshots", "soak"),
    # (1 s: the front end's gap grace, after which a lost announcement flushes its cache)
    Target("invalidation across front ends: max lag after the answer (HTTP push)",
           at("spread", "http", "lag", "max_ms"), "<=", 1000, "ms", "spread"),
    # the speed issue's own targets: ratios to the code it was filed against, in the same run
    # (bazar.bench.baseline; with --baseline DIR)
    Target("purchase p50, 1 conn ÷ the baseline's", median_ratio("purchase/1/p50_ms"), "<=", 0.35, "×",
           "baseline"),
    Target("purchase throughput, 16 conns ÷ the baseline's", median_ratio("purchase/16/rps"), ">=", 3, "×",
           "baseline"),
    Target("purchase throughput, 64 conns ÷ the baseline's", median_ratio("purchase/64/rps"), ">=", 3, "×",
           "baseline", lambda r: unmeasured_reason(r, "purchase/64/rps")),
]


def why_missing(results: Results, phase: str) -> str:
    """Why a target's figure is missing: its phase's reason for skipping, if it gave one."""
    for path in ((phase,), (phase, "etcd")):
        skipped = dig(results, *path, "skipped") if phase else None
        if isinstance(skipped, str):
            return skipped if skipped.startswith("not measured") else f"not measured: {skipped}"
    unjudged = dig(results, phase, "unjudged") if phase else None  # measured, but not what the target is about
    return f"not judged: {unjudged}" if isinstance(unjudged, str) else "not measured"


def evaluate_targets(results: Results) -> list[dict[str, Any]]:
    rows = []
    for t in TARGETS:
        measured = t.measure(results)
        verdict = None
        why = ""
        if t.phase == "rss":
            entries = dig(results, "rss", "entries")
            if measured is not None and (not isinstance(entries, int) or entries < RSS_ENTRIES):
                why = f"only {entries} entries"
                verdict = "n/a"
        if verdict is None:
            if measured is None:
                verdict = "n/a"
                why = (t.missing(results) if t.missing else None) or why_missing(results, t.phase)
            else:
                ok = measured >= t.limit if t.cmp == ">=" else measured <= t.limit
                verdict = "PASS" if ok else "FAIL"
        rows.append({"name": t.name, "target": t.wanted, "measured": measured, "unit": t.unit, "verdict": verdict,
                     "why": why})
    return rows


def verdict_of(results: Results, name: str) -> dict[str, Any]:
    """The evaluated row of the target called `name`."""
    return next(r for r in evaluate_targets(results) if r["name"] == name)


def _ms(v: float | None) -> str:
    return "—" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.0f}")


def _rps(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0%}"


def _stats_row(prefix_cells: list[str], st: Stats | None, cpu: bool = False) -> str:
    cells = list(prefix_cells)
    if not st:
        cells += ["—"] * (10 if cpu else 8)
    else:
        cells += [str(st.get("n", "—")), _rps(st.get("rps")), _ms(st.get("avg_ms")), _ms(st.get("p50_ms")),
                  _ms(st.get("p95_ms")), _ms(st.get("p99_ms")), _ms(st.get("max_ms")), str(st.get("errors", 0))]
        if cpu:
            cells += [_pct(st.get("client_cpu")), _pct(st.get("frontend_cpu"))]
    return "| " + " | ".join(cells) + " |"


def replica_name(kill: dict[str, Any]) -> str:
    """bazar-cluster's name of a killed replica (catalog-1, order-2, ...); its port
    only if the replica id is unknown (the ports are picked at random per run)."""
    if kill.get("replica") is not None and kill.get("service"):
        return f"{kill['service']}-{kill['replica']}"
    return f"port {kill.get('port', '?')}"


def _after_text(kill: dict[str, Any]) -> str:
    after = kill.get("after")
    if not after:
        return "not answering /health"
    pid = after.get("pid")
    who = f"restarted, new pid {pid}" if pid is not None and pid != kill.get("pid") else f"pid {pid}"
    return f"{who}; {after.get('role')}, {after.get('status')}"


def failover_windows(crash: dict[str, Any]) -> list[tuple[float, float]]:
    """(start, end) of every failover: from a kill to the first successful purchase after it."""
    return [(k["t"], k["t"] + k["failover_s"]) for k in crash.get("kills", [])
            if "t" in k and k.get("failover_s") is not None]


def info_latency_split(crash: dict[str, Any]) -> tuple[float | None, float | None]:
    """Median latency (ms) of the successful info reads sent inside the failover
    windows, and of those sent outside them (None where there are none)."""
    windows = failover_windows(crash)

    def inside(t: float) -> bool:
        return any(a <= t < b for a, b in windows)

    ins = sorted(s[1] for s in crash.get("samples") or [] if s[2] == "info" and s[3] and inside(s[0]))
    outs = sorted(s[1] for s in crash.get("samples") or [] if s[2] == "info" and s[3] and not inside(s[0]))
    return percentile(ins, 50), percentile(outs, 50)


def crash_reading(crash: dict[str, Any]) -> list[str]:
    """Lines under the crash plot: what the shaded spans are, and why info reads get
    faster during a failover (the purchases that invalidate its cache entry wait)."""
    windows = failover_windows(crash)
    if not windows or not crash.get("samples"):
        return []
    n_info = (crash.get("ops") or {}).get("info")
    rate = crash.get("rate_per_worker")
    text = ("Reading the plot: the shaded spans are the failovers. Purchases sent during one wait for the new "
            "primary")
    if isinstance(n_info, int) and isinstance(rate, (int, float)):
        text += (f", so successes per second fall to about what the info workers alone are paced to "
                 f"({n_info} × {rate:.0f} = {n_info * rate:.0f} req/s)")
    text += "."
    med_in, med_out = info_latency_split(crash)
    if med_in is not None and med_out is not None and med_in < med_out:
        text += (" Info reads get *faster* during a failover, not slower: they read the book the purchases buy, "
                 "and every completed purchase changes its stock and so drops its cached info entry at the front "
                 "end. Between failovers many info reads therefore miss the cache and go to a catalog replica; "
                 "while the purchases wait, nothing drops the entry, so after one miss the info reads are cache "
                 f"hits. Median info latency: {_ms(med_in)} ms inside the shaded spans, {_ms(med_out)} ms "
                 "outside them.")
    elif med_in is not None and med_out is not None:
        text += f" Median info latency: {_ms(med_in)} ms inside the shaded spans, {_ms(med_out)} ms outside them."
    return [text, ""]


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _zipf_ratio(s: Any) -> str:
    if isinstance(s, (int, float)) and s == 1:
        return "1/k"
    return f"1/k^{s:g}" if isinstance(s, (int, float)) else f"1/k^{s}"


def lru_crosscheck(lru: dict[str, Any]) -> str | None:
    """How bazar.cache.LRUCache compares with the textbook LRU replayed over the
    same trace: "same", "differs", or None (no cross-check: the replay fell back
    to the textbook LRU itself, or no reference figures)."""
    pts = lru.get("points") or []
    if not pts or "reference" in str(lru.get("source", "")):
        return None
    pairs = [(p.get("hit_rate"), p.get("ref_hit_rate")) for p in pts]
    if any(r is None or h is None for h, r in pairs):
        return None
    return "same" if all(abs(h - r) < 1e-12 for h, r in pairs) else "differs"


STATS_HEAD = "| requests | req/s | avg ms | p50 ms | p95 ms | p99 ms | max ms | errors |"
STATS_SEP = "|---:|---:|---:|---:|---:|---:|---:|---:|"
CPU_HEAD = " client CPU | front-end CPU |"
CPU_SEP = "---:|---:|"


def fmt_measured(value: Any, unit: str) -> str:
    """A target's measured figure with its unit (a ratio as 0.93×)."""
    if unit == "×":
        return "—" if value is None else f"{value:.2f}×"
    if unit == "s":
        return "—" if value is None else f"{value:.2f} s"
    return f"{fmt_num(value, unit)} {unit}"


def targets_text(rows: list[dict[str, Any]]) -> str:
    """Plain-text table for the terminal."""
    width = max([len("target")] + [len(r["name"]) for r in rows])
    lines = [f"{'target':{width}s} {'wanted':>14s} {'measured':>12s}  verdict"]
    for r in rows:
        lines.append(f"{r['name']:{width}s} {r['target']:>14s} {fmt_measured(r['measured'], r['unit']):>12s}  "
                     f"{r['verdict']}{(' (' + r['why'] + ')') if r['why'] else ''}")
    return "\n".join(lines)


def _plot_link(plots: dict[str, str], name: str) -> list[str]:
    """The Markdown image of plot `name`, if one was drawn."""
    return [f"![{name}]({plots[name]})", ""] if plots.get(name) else []


def _phase_section(title: str, data: dict[str, Any] | None, text: Callable[[dict[str, Any]], list[str]],
                   missing: str = "Not run.") -> list[str]:
    """A phase's section: its heading, then why the phase was skipped, its `text`, or
    `missing` when it left no results."""
    data = data or {}
    if "skipped" in data:
        return [title, "", f"Skipped — {data['skipped']}.", ""]
    return [title, ""] + (text(data) if data else [missing, ""])


def _invalidation_text(inv: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Section 2's text: the invalidation rounds."""
    out: list[str] = []
    out.append("| step " + STATS_HEAD)
    out.append("|---" + STATS_SEP)
    out.append(_stats_row(["PUT update_price (write)"], inv.get("write")))
    out.append(_stats_row(["first GET info after the write"], inv.get("miss_read")))
    out.append(_stats_row([f"repeated GET info (×{inv.get('hit_repeats', 3)})"], inv.get("hit_read")))
    out.append("")
    out.append(f"{inv.get('iterations')} rounds on one keep-alive connection; errors {inv.get('errors')}; "
               f"reads that did not show the price just written: **{inv.get('stale_reads')}**.")
    if inv.get("cache_counter_delta") is not None:
        d = inv["cache_counter_delta"]
        out.append(f"Front-end cache counters over the phase: hits +{d.get('hits')}, misses +{d.get('misses')}, "
                   f"evictions +{d.get('evictions')} "
                   "(a miss per round is expected: the write invalidates the entry).")
    out.append("")
    out += _plot_link(plots, "invalidation")
    return out

def _crash_text(crash: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Section 3's text: the kills and failovers."""
    out: list[str] = []
    ops_c = crash.get("ops", {})
    out.append(f"Load: {ops_c.get('purchase')} purchase + {ops_c.get('info')} info workers, all on the same "
               f"bench book, each paced at ≤ {crash.get('rate_per_worker', 0):.0f} req/s, "
               f"{crash.get('duration_s', 0):.1f} s, client timeout {crash.get('client_timeout_s', '?')} s. "
               "Failover time: from a kill to the completion of the first successful write (purchase) "
               "sent after it.")
    out.append("")
    out.append("| killed | replica | pid killed | at t (s) | failover (s) | errors in next 5 s "
               "| max latency in next 5 s (ms) | that replica at the end |")
    out.append("|---|---|---:|---:|---:|---:|---:|---|")
    for k in crash.get("kills", []):
        if "t" not in k:
            out.append(f"| {k.get('service')} | — | {k.get('pid', '—')} | — | — | — | — | {k.get('error')} |")
            continue
        fo = k.get("failover_s")
        out.append(f"| {k['service']} primary | {replica_name(k)} | {k.get('pid')} | {k['t']:.2f} | "
                   f"{'not seen' if fo is None else f'{fo:.3f}'} | {k.get('errors_5s', '—')} | "
                   f"{_ms(k.get('max_latency_ms_5s'))} | {_after_text(k)} |")
    out.append("")
    out.append("Replica names are bazar-cluster's (catalog-1…3, order-1…3). Last column: the killed "
               "replica's `GET /health` at the end of the experiment. bazar-cluster's process monitor "
               "restarts a process that dies, so a new pid there means the replica came back; the role is "
               "the one it reported then.")
    out.append("")
    tot = crash.get("total") or {}
    out.append(f"Whole run: {tot.get('n', 0)} successful requests, {tot.get('errors', 0)} errors "
               f"({', '.join(f'{k}: {v}' for k, v in (tot.get('statuses') or {}).items()) or 'none'}).")
    out.append("")
    out += _plot_link(plots, "crash")
    out += crash_reading(crash)
    return out

def _lru_text(lru: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Section 4's text: hit rate against cache size."""
    out: list[str] = []
    pts = lru.get("points", [])
    cross = lru_crosscheck(lru)
    out.append(f"In-process replay of {lru.get('trace_len')} requests for {lru.get('keys')} book ids (seed "
               f"{lru.get('seed')}) through {lru.get('source')}, starting from an empty cache; on a miss the "
               f"book is put in the cache. The requests follow a zipf law with s = {lru.get('s')}: the k-th "
               f"most requested book is asked for {_zipf_ratio(lru.get('s'))} as often as the most requested "
               "one, so a few books get most of the requests.")
    if lru.get("note"):
        out.append(f"Note: {lru['note']}.")
    out.append("")
    head = "| cache size (N entries) | hit rate |"
    sep = "|---:|---:|"
    if cross == "differs":
        head += " textbook LRU (cross-check) |"
        sep += "---:|"
    out.append(head + " best possible: share of requests to the N most requested books | evictions |")
    out.append(sep + "---:|---:|")
    for p in pts:
        row = f"| {p['capacity']} | {p['hit_rate']:.3f} |"
        if cross == "differs":
            row += f" {_rate(p.get('ref_hit_rate'))} |"
        ev = "—" if p.get("evictions") is None else p["evictions"]
        out.append(row + f" {_rate(p.get('top_k_mass'))} | {ev} |")
    out.append("")
    out.append("*Hit rate*: the share of requests answered from the cache. *Best possible*: the share of "
               "requests that go to the N most requested books (from the zipf law above): a cache that always "
               "held exactly those books would hit that often, and when requests are drawn independently, as "
               "here, no cache of N entries that cannot see future requests can expect more. LRU stays below "
               "it: it also keeps books that were requested only once, recently, and the first request for "
               "each book misses. *Evictions*: entries pushed out to make room.")
    full = [p for p in pts if isinstance(lru.get("keys"), int) and p["capacity"] >= lru["keys"]
            and p.get("evictions") == 0]
    if full:
        p = full[0]
        out.append(f"At N = {p['capacity']} every book fits and nothing is evicted: the gap to the best "
                   f"possible ({_rate(p.get('top_k_mass'))} vs {p['hit_rate']:.3f}) is only the first request "
                   "of each book, which misses in a cache that starts empty.")
    if cross == "same":
        out.append("Cross-check: the same requests replayed through a textbook LRU (an `OrderedDict` in "
                   "bench.py) give exactly the same hit rate at every size, so bazar.cache.LRUCache evicts "
                   "the least recently used entry, as it should.")
    elif cross == "differs":
        out.append("The *textbook LRU* column replays the same requests through a plain `OrderedDict` LRU in "
                   "bench.py. It should equal the hit rate; a difference means bazar.cache.LRUCache does not "
                   "evict in least-recently-used order.")
    out.append("")
    out += _plot_link(plots, "lru")
    return out

def _throughput_text(tp: dict[str, Any], plots: dict[str, str], ops: dict[str, Any]) -> list[str]:
    """Section 5's text: the sweep's rows section 1 lacks."""
    out: list[str] = []
    items = sorted(tp.items(), key=lambda kv: int(kv[0]))
    in_ops = dig(ops, "on", "info") or {}
    shared = [c for c, st in items if in_ops.get(c) == st]
    extra = [(c, st) for c, st in items if in_ops.get(c) != st]
    if shared:
        out.append(f"The numbers at {', '.join(shared)} connections are the cached info rows of "
                   "section 1; they are not repeated here.")
    if extra:
        out.append("Measurements not in section 1:")
        out.append("")
        out.append("| conns " + STATS_HEAD + CPU_HEAD)
        out.append("|---:" + STATS_SEP + CPU_SEP)
        for c, st in extra:
            out.append(_stats_row([c], st, cpu=True))
    out.append("")
    (c0, st0), (c1, st1) = items[0], items[-1]
    if len(items) > 1 and st0.get("rps") and st1.get("rps"):
        out.append(f"From {c0} to {c1} connections, throughput goes from {_rps(st0['rps'])} to "
                   f"{_rps(st1['rps'])} req/s (×{st1['rps'] / st0['rps']:.1f}) and p50 latency from "
                   f"{_ms(st0.get('p50_ms'))} to {_ms(st1.get('p50_ms'))} ms.")
        out.append("")
    out += _plot_link(plots, "throughput")
    if plots.get("connections"):
        out += ["The same against connections for cached and uncached reads and for writes, beside the reference "
                "servers, etcd and the stores compared, when this run measured them (sections 7, 8 and 10):", ""]
        out += _plot_link(plots, "connections")
    return out

def _memory_text(rss: dict[str, Any]) -> list[str]:
    """Section 6's text: the front end's memory."""
    out: list[str] = []
    out.append(f"Front end pid {rss.get('pid')} (cache capacity {rss.get('capacity')}): VmRSS "
               f"{fmt_num(rss.get('rss_before_mb'), 'MB')} MB with {rss.get('entries_before')} entries → "
               f"**{fmt_num(rss.get('rss_mb'), 'MB')} MB with {rss.get('entries')} entries**, after "
               f"{rss.get('fill_requests')} searches of distinct unknown topics "
               f"({_rps(rss.get('fill_rps'))} req/s, {rss.get('fill_errors')} errors; "
               "each caches an empty result).")
    if rss.get("note"):
        out.append(f"Note: {rss['note']}.")
    out.append("")
    return out


def _verdict_line(results: Results, name: str) -> str:
    """One target's verdict as a sentence of its section."""
    r = verdict_of(results, name)
    why = f" ({r['why']})" if r["why"] else ""
    return f"- {name}: {fmt_measured(r['measured'], r['unit'])}, wanted {r['target']}: **{r['verdict']}**{why}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _cpu_us(st: Stats | None) -> str:
    ms = cpu_per_request_ms(st)
    return "—" if ms is None else f"{ms * 1000:.0f}"


def _side_by_side(rows: list[tuple[str, str, Stats | None, Stats | None]]) -> list[str]:
    """A table of steps, each beside Bazar's at the same connection count: (server, conns,
    its stats, Bazar's stats or None for Bazar's own rows)."""
    out = ["| server | conns | req/s | p50 ms | p99 ms | errors | server CPU µs/req | Bazar ÷ it: req/s "
           "| Bazar ÷ it: p50 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c, st, bazar in rows:
        st = st or {}
        mine = (_x(ratio((bazar or {}).get("rps"), st.get("rps"))), _x(ratio((bazar or {}).get("p50_ms"),
                st.get("p50_ms")))) if bazar is not None else ("", "")
        out.append(f"| {name} | {c} | {_rps(st.get('rps'))} | {_ms(st.get('p50_ms'))} | {_ms(st.get('p99_ms'))} "
                   f"| {st.get('errors', '—')} | {_cpu_us(st)} | {mine[0]} | {mine[1]} |")
    return out


RATIO_READING = ("*Bazar ÷ it*: Bazar's figure divided by the other server's, measured one step after the other "
                 "with the same client and connections: above 1 for req/s, or below 1 for p50, is Bazar ahead.")


def _references_text(refs: dict[str, Any], results: Results, plots: dict[str, str]) -> list[str]:
    """Section 7's text: cached info beside the raw twisted.web resource and the bare Klein route."""
    theirs = ", ".join(f"{k} {v}" for k, v in (refs.get("reference_bytes") or {}).items())
    out = [f"`GET {refs.get('path', '/bazar/info/0')}` from Bazar's front end (a cache hit) beside two reference "
           f"servers started by the bench, each answering a constant JSON body of the same size "
           f"({refs.get('body_bytes')} bytes; theirs: {theirs}) "
           "with `Content-Type: application/json` and a `Content-Length`, without an access log: a raw "
           "twisted.web `Resource` (`isLeaf`, `render_GET`) and a bare Klein route. Same client, same "
           "connection counts, the three in turn at each count.", ""]
    rows: list[tuple[str, str, Stats | None, Stats | None]] = []
    for c in refs.get("conns") or sorted((refs.get("bazar") or {}), key=int):
        bazar = dig(refs, "bazar", c)
        rows.append(("Bazar (cached info)", c, bazar, None))
        for kind, label in (("twisted", "raw twisted.web"), ("klein", "bare Klein")):
            rows.append((label, c, dig(refs, kind, c), bazar or {}))
    out += _side_by_side(rows) + ["", RATIO_READING, "",
                                  _verdict_line(results, "cached info ÷ raw twisted.web: throughput, 16 conns"),
                                  _verdict_line(results, "cached info ÷ raw twisted.web: p50, 1 conn"), ""]
    # the plot of every server against connections: in section 5, or here when section 5 has none
    out += _plot_link(plots, "connections") if not results.get("throughput") else [
        "Section 5's plots draw these servers beside Bazar against connections.", ""]
    return out


def _compare_text(cmp: dict[str, Any]) -> list[str]:
    """Section 8's text: a row per compared store and op, beside Bazar's."""
    out = ["The same workloads against the stores named with `--compare` (their info and purchase URLs), each "
           "connection count measured for Bazar and then for each store: Bazar's info is the cached "
           "`GET /bazar/info/0`, its purchase `POST /bazar/purchase/<bench book>`.", ""]
    out.append("| store | op | conns | req/s | p50 ms | errors | Bazar req/s | Bazar p50 ms | Bazar ÷ store: req/s "
               "| Bazar ÷ store: p50 |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for store in cmp.get("stores") or []:
        for op in ("info", "purchase"):
            for c, st in sorted((store.get(op) or {}).items(), key=lambda kv: int(kv[0])):
                bazar = dig(cmp, "bazar", op, c) or {}
                out.append(f"| {store.get('name')} | {op} | {c} | {_rps(st.get('rps'))} | {_ms(st.get('p50_ms'))} "
                           f"| {st.get('errors', '—')} | {_rps(bazar.get('rps'))} | {_ms(bazar.get('p50_ms'))} "
                           f"| {_x(ratio(bazar.get('rps'), st.get('rps')))} "
                           f"| {_x(ratio(bazar.get('p50_ms'), st.get('p50_ms')))} |")
    out += ["", RATIO_READING, ""]
    for store in cmp.get("stores") or []:
        out.append(f"- {store.get('name')}: `--compare '{store.get('spec')}'`")
    out.append("")
    return out


def _startup_text(st: dict[str, Any], results: Results) -> list[str]:
    """Section 9's text: how long the started cluster took to answer /ready everywhere."""
    out = [f"Cluster {st.get('cluster')}: from the start of `bazar-cluster` (the supervisor's process is created) "
           f"until each process's `GET /ready` first answers 200 (each polled every {st.get('poll_s', 0) * 1000:.0f} "
           "ms until it does; the cluster was started alone, before anything else of the bench ran).", "",
           "| process | /ready 200 after (s) |", "|---|---:|"]
    for name, t in (st.get("processes") or {}).items():
        out.append(f"| {name} | {t:.2f} |")
    out += ["", _verdict_line(results, "start-up: bazar-cluster to every /ready 200"),
            "  (the target is for an idle 2-core machine)", ""]
    return out


def _etcd_text(e: dict[str, Any], results: Results) -> list[str]:
    """Section 10's text: Bazar's replicated write, purchase and read beside etcd's put and range."""
    etcd = e.get("etcd") or {}
    skipped = etcd.get("skipped")
    out = []
    if skipped:
        out.append(f"etcd: {skipped}; Bazar's side was measured all the same.")
    else:
        out.append(f"A {e.get('members', 3)}-member etcd cluster ({e.get('etcd_version') or 'etcd'}) on loopback, "
                   "started and stopped by the bench, driven through its v3 JSON gateway at its leader: "
                   "`POST /v3/kv/put` (a 100-byte value) and `POST /v3/kv/range` (linearizable). Beside it, in "
                   "the same sweeps: Bazar's replicated write `PUT /bazar/update_price/<bench book>` (admin "
                   "token), its purchase and its cached `GET /bazar/info/0`.")
    out += ["", "| measure | Bazar | etcd | Bazar ÷ etcd |", "|---|---:|---:|---:|"]

    def row(what: str, mine: Any, theirs: Any, fmt: Callable[[Any], str]) -> None:
        out.append(f"| {what} | {fmt(mine)} | {fmt(theirs)} | {_x(ratio(mine, theirs))} |")

    put = etcd.get("put") or {}
    row("write p50, 1 conn (ms): update_price vs put", dig(e, "bazar", "write", "1", "p50_ms"),
        dig(put, "1", "p50_ms"), _ms)
    row("write throughput, 16 conns (req/s): update_price vs put", dig(e, "bazar", "write", "16", "rps"),
        dig(put, "16", "rps"), _rps)
    row("server CPU per write, 16 conns (ms)", cpu_per_request_ms(dig(e, "bazar", "write", "16")),
        cpu_per_request_ms(dig(put, "16")), _ms)
    row("purchase p50 vs put p50, 1 conn (ms)", dig(e, "bazar", "purchase", "1", "p50_ms"), dig(put, "1", "p50_ms"),
        _ms)
    row("purchase vs put throughput, 16 conns (req/s)", dig(e, "bazar", "purchase", "16", "rps"),
        dig(put, "16", "rps"), _rps)
    row("read p50, 1 conn (ms): cached info vs range", dig(e, "bazar", "read", "1", "p50_ms"),
        dig(etcd, "range", "1", "p50_ms"), _ms)
    row("read throughput, 16 conns (req/s): cached info vs range", dig(e, "bazar", "read", "16", "rps"),
        dig(etcd, "range", "16", "rps"), _rps)
    out += ["", "Targets:", ""]
    for name in ("replicated write ÷ etcd put: p50, 1 conn", "replicated write ÷ etcd put: throughput, 16 conns",
                 "replicated write ÷ etcd put: server CPU per write", "purchase p50 ÷ etcd put p50, 1 conn"):
        out.append(_verdict_line(results, name))
    out += ["", "Every step:", "", "| server | op | conns " + STATS_HEAD + " server CPU per request (ms) |",
            "|---|---|---:" + STATS_SEP + "---:|"]
    for server, ops in (("Bazar", e.get("bazar") or {}), ("etcd", {k: v for k, v in etcd.items() if k != "skipped"})):
        for op, steps in ops.items():
            for c, st in sorted(steps.items(), key=lambda kv: int(kv[0])):
                out.append(_stats_row([server, op, c], st)[:-1] + f"| {_ms(cpu_per_request_ms(st))} |")
    out += ["", (f"Server CPU: the CPU seconds of the server processes over a step, divided by its successful "
                 f"requests: etcd's {e.get('members', 3)} members; for Bazar, the front end and the replicas the "
                 f"operation passes through (a write: the catalog's; a purchase: the catalog's and the order "
                 f"service's; a cached read: the front end alone), of {', '.join(e.get('bazar_processes') or [])}. "
                 "Bazar's write passes through its front end before it reaches the primary; etcd's put is sent "
                 "straight to its leader."), ""]
    return out


def _timeline_text(tl: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Section 11's text: the median of each step of a write, and the typical write's plot."""
    client = tl.get("client") or {}
    out = [f"A cluster of its own, started with `BAZAR_TRACE` naming one file, took {tl.get('sent')} single writes "
           f"(`PUT /bazar/update_price/{tl.get('book', 1)}`), one at a time; {tl.get('writes')} were assembled from "
           f"{tl.get('events')} trace events. The client saw a p50 of {_ms(client.get('p50_ms'))} ms (tracing adds a "
           "JSON line and a write per event, a few µs each).", "",
           "| step | median ms | writes |", "|---|---:|---:|"]
    for step in (tl.get("steps") or {}).values():
        out.append(f"| {step['label']} | {_ms(step['median_ms'])} | {step['n']} |")
    out += ["", ("Steps overlap: the primary's own fsync runs while the appends are on their way (its messages "
                 "leave before it writes), and the entry commits once the primary and one backup hold it on disk, "
                 "whichever comes last; the 2nd backup's reply comes after the answer may already be on its way. "
                 "\"HTTP\" steps are the time between one process sending and the other receiving: loopback, "
                 "the HTTP framing, and the wait for the reactor of the receiver."), ""]
    typical = tl.get("typical")
    if typical:
        out.append(f"The plot shows the typical write (the one whose whole time is closest to the median): entry "
                   f"{typical.get('index')} at primary {typical.get('primary')}.")
        out.append("")
    out += _plot_link(plots, "timeline")
    return out


def render_report(results: Results) -> str:
    meta = results.get("meta", {})
    plots = results.get("plots", {})
    out = ["# Bazar benchmark report", ""]
    out.append(f"- run: {meta.get('started', '?')}, {meta.get('total_s', 0):.0f} s in all"
               + (" (`--quick`)" if meta.get("quick") else ""))
    out.append(f"- mode: {meta.get('mode', '?')}; front end {meta.get('url', '?')}"
               + (f"; cache-off front end {meta['url_nocache']}" if meta.get("url_nocache") else "")
               + (" (free loopback ports picked for this run; the clusters were stopped at its end)"
                  if str(meta.get("mode", "")).startswith("--start") else ""))
    out.append(f"- machine: {meta.get('cpus', '?')} CPU(s), {meta.get('platform', '?')}, "
               f"Python {meta.get('python', '?')}")
    out.append(f"- each load step: {meta.get('duration', '?')} s; client: "
               f"{meta.get('client', 'threads, one keep-alive connection each')}")
    if meta.get("clusters"):
        out.append(f"- {meta['clusters']}")
    for n in meta.get("notes", []):
        out.append(f"- note: {n}")
    out.append("")

    out += ["## Targets", "", "A ratio (×) is Bazar's figure divided by the reference's, both measured in this run.",
            "", "| target | wanted | measured | verdict |", "|---|---|---:|---|"]
    for r in evaluate_targets(results):
        verdict = r["verdict"] if not r["why"] else f"{r['verdict']} ({r['why']})"
        out.append(f"| {r['name']} | {r['target']} | {fmt_measured(r['measured'], r['unit'])} | **{verdict}** |")
    out.append("")

    # 1. ops
    out += ["## 1. Latency and throughput: info, search, purchase", ""]
    ops = results.get("ops", {})
    skipped = results.get("ops_skipped", {})
    out.append("| op | cache | conns " + STATS_HEAD + CPU_HEAD)
    out.append("|---|---|---:" + STATS_SEP + CPU_SEP)
    for op in OPS:
        for cache in ("on", "off"):
            for c, st in sorted((dig(ops, cache, op) or {}).items(), key=lambda kv: int(kv[0])):
                out.append(_stats_row([op, cache, c], st, cpu=True))
    out.append("")
    for cache, why in skipped.items():
        out.append(f"Cache {cache}: skipped — {why}.")
    if skipped:
        out.append("")
    out.append("Latency is measured at the client (request sent → full response read), successes only. "
               "CPU columns: share of one core used by the bench client and by the front-end process "
               "during the step (100% = one core busy).")
    out.append("")
    out += _plot_link(plots, "latency")

    out += _phase_section("## 2. Invalidation: write, first read after it, repeated read",
                          results.get("invalidation"), lambda inv: _invalidation_text(inv, plots))
    out += _phase_section("## 3. Crash experiment: kill -9 of the catalog primary, then of the order primary",
                          results.get("crash"), lambda crash: _crash_text(crash, plots))
    out += _phase_section("## 4. LRU hit rate vs cache size (simulated requests)",
                          results.get("lru"), lambda lru: _lru_text(lru, plots))
    out += _phase_section("## 5. Throughput vs connections (cached GET /bazar/info)",
                          results.get("throughput"), lambda tp: _throughput_text(tp, plots, ops),
                          missing="Not measured.")
    out += _phase_section("## 6. Front-end memory", results.get("rss"), _memory_text)
    out += _phase_section("## 7. Beside a raw twisted.web resource and a bare Klein route", results.get("references"),
                          lambda refs: _references_text(refs, results, plots), missing="Not measured.")
    out += _phase_section("## 8. Beside other stores (`--compare`)", results.get("compare"), _compare_text,
                          missing="Not measured: no store named with `--compare`.")
    out += _phase_section("## 9. Start-up", results.get("startup"), lambda st: _startup_text(st, results),
                          missing="Not measured.")
    out += _phase_section("## 10. Replicated writes beside etcd", results.get("etcd"),
                          lambda e: _etcd_text(e, results), missing="Not measured.")
    out += _phase_section("## 11. Where one write spends its time", results.get("timeline"),
                          lambda tl: _timeline_text(tl, plots), missing="Not measured.")
    out += _phase_section("## 12. Cached reads on more cores: front ends sharing one port", results.get("cores"),
                          cores_text, missing="Not measured.")
    from bazar.bench.faultreport import fault_sections  # (built on this module's helpers)

    out += fault_sections(results, plots)
    out += _phase_section("## 16. The purchase path beside the code before (`--baseline`)", results.get("baseline"),
                          baseline_text, missing="Not measured: no `--baseline DIR` given.")

    out += ["## How this was measured", "",
            ("`bazar-bench` (bazar/bench.py): threads with one keep-alive HTTP/1.1 connection each, all to "
            "127.0.0.1; every step bounded by time and by count; latencies at the client with "
            "`time.perf_counter`; percentiles by linear interpolation. The client shares the machine's CPUs "
            "with the cluster, so absolute numbers are a lower bound on what the server alone could do."), ""]
    return "\n".join(out)
