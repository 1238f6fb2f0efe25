"""The bazar-bench report: the targets and their verdicts, the Markdown report of a
results object, and the plain-text targets table printed at the end of a run.

Everything here reads a results object (as written to results.json) and measures
nothing, so `bazar-bench --report-only` can rewrite a report from an earlier run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bazar.bench.phases import OPS, RSS_ENTRIES
from bazar.bench.stats import Stats, fmt_num, percentile

Results = dict[str, Any]


def dig(d: Any, *keys: str) -> Any:
    """d[k1][k2]...; None where a key is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# name, path into results, comparison, limit, unit
TARGETS: list[tuple[str, tuple[str, ...], str, float, str]] = [
    ("cached info throughput, 16 conns", ("ops", "on", "info", "16", "rps"), ">=", 9000, "req/s"),
    ("cached info p50, 1 conn", ("ops", "on", "info", "1", "p50_ms"), "<=", 0.2, "ms"),
    ("uncached info throughput, 16 conns", ("ops", "off", "info", "16", "rps"), ">=", 2500, "req/s"),
    ("uncached info p50, 1 conn", ("ops", "off", "info", "1", "p50_ms"), "<=", 0.8, "ms"),
    ("purchase p50, 1 conn", ("ops", "on", "purchase", "1", "p50_ms"), "<=", 5, "ms"),
    ("purchase throughput, 16 conns", ("ops", "on", "purchase", "16", "rps"), ">=", 300, "req/s"),
    ("front-end RSS with 10,000 cached entries", ("rss", "rss_mb"), "<=", 80, "MB"),
]


def evaluate_targets(results: Results) -> list[dict[str, Any]]:
    rows = []
    for name, path, cmp, limit, unit in TARGETS:
        measured = dig(results, *path)
        verdict = None
        why = ""
        if path[0] == "rss":
            entries = dig(results, "rss", "entries")
            if measured is not None and (not isinstance(entries, int) or entries < RSS_ENTRIES):
                why = f"only {entries} entries"
                verdict = "n/a"
        if verdict is None:
            if measured is None:
                verdict = "n/a"
                why = "not measured"
            else:
                ok = measured >= limit if cmp == ">=" else measured <= limit
                verdict = "PASS" if ok else "FAIL"
        rows.append({"name": name, "target": f"{cmp.replace('>=', '≥').replace('<=', '≤')} {limit:g} {unit}",
                     "measured": measured, "unit": unit, "verdict": verdict, "why": why})
    return rows


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


def targets_text(rows: list[dict[str, Any]]) -> str:
    """Plain-text table for the terminal."""
    lines = [f"{'target':44s} {'wanted':>14s} {'measured':>12s}  verdict"]
    for r in rows:
        measured = fmt_num(r["measured"], r["unit"]) + " " + r["unit"]
        lines.append(f"{r['name']:44s} {r['target']:>14s} {measured:>12s}  "
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

    out += ["## Targets", "", "| target | wanted | measured | verdict |", "|---|---|---:|---|"]
    for r in evaluate_targets(results):
        verdict = r["verdict"] if not r["why"] else f"{r['verdict']} ({r['why']})"
        out.append(f"| {r['name']} | {r['target']} | {fmt_num(r['measured'], r['unit'])} {r['unit']} | **{verdict}** |")
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

    out += ["## How this was measured", "",
            ("`bazar-bench` (bazar/bench.py): threads with one keep-alive HTTP/1.1 connection each, all to "
            "127.0.0.1; every step bounded by time and by count; latencies at the client with "
            "`time.perf_counter`; percentiles by linear interpolation. The client shares the machine's CPUs "
            "with the cluster, so absolute numbers are a lower bound on what the server alone could do."), ""]
    return "\n".join(out)
