"""The plots of the bazar-bench report (PNG, via matplotlib's Agg backend): latency
and throughput by op, invalidation, the crash timeline, LRU hit rate, throughput
against connections (cached info; and cached, uncached and writes beside the
references), and the timeline of one write.

matplotlib comes with the `bench` extra; bazar.bench.cli imports this module only to
draw, and writes the report without plots when matplotlib is missing.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from bazar.bench.phases import OPS
from bazar.bench.report import Results, dig, failover_windows, info_latency_split, lru_crosscheck
from bazar.bench.stats import Stats
from bazar.bench.timeline import NETWORK

matplotlib.use("Agg")  # files only, never a window: the bench runs on machines without a display


def _percentile_bars(ax: Axes, stats: list[Stats]) -> None:
    """p50, p95 and p99 of each of `stats` side by side, on a log scale, with a legend."""
    for j, (key, lab) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        ax.bar([i + (j - 1) * 0.27 for i in range(len(stats))], [st.get(key) or 0 for st in stats], width=0.27,
               label=lab)
    ax.set_yscale("log")
    ax.legend()


def fig_latency(results: Results) -> Figure | None:
    """Latency at 1 connection and throughput at 16, by op and cache; None without data."""
    ops = results.get("ops") or {}
    rows = []
    for op in OPS:
        for cache in ("on", "off"):
            st1 = dig(ops, cache, op, "1")
            st16 = dig(ops, cache, op, "16")
            if st1 or st16:
                rows.append((f"{op}\ncache {cache}", st1 or {}, st16 or {}))
    if not rows:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    _percentile_bars(ax1, [r[1] for r in rows])
    ax1.set_xticks(list(x), [r[0] for r in rows], fontsize=8)
    ax1.set_ylabel("latency (ms), 1 connection")
    ax1.set_title("latency at 1 connection")
    ax2.bar(list(x), [r[2].get("rps") or 0 for r in rows], color="tab:green")
    ax2.set_xticks(list(x), [r[0] for r in rows], fontsize=8)
    ax2.set_ylabel("req/s")
    ax2.set_title("throughput at 16 connections")
    fig.tight_layout()
    return fig


def fig_invalidation(results: Results) -> Figure | None:
    inv = results.get("invalidation") or {}
    if not inv.get("write"):
        return None
    labels = ["write (PUT)", "1st read", "reread"]
    sts = [inv.get("write") or {}, inv.get("miss_read") or {}, inv.get("hit_read") or {}]
    fig, ax = plt.subplots(figsize=(7, 4))
    _percentile_bars(ax, sts)
    ax.set_xticks(range(3), labels)
    ax.set_ylabel("latency (ms)")
    ax.set_title("invalidation: write, first read after it, repeated read")
    fig.tight_layout()
    return fig


def fig_crash(results: Results) -> Figure | None:
    """Latency and successes/errors over time, kills marked, failovers shaded."""
    crash = results.get("crash") or {}
    samples = crash.get("samples") or []
    if not samples:
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    colors = {"purchase": "tab:blue", "info": "tab:orange"}
    for op, color in colors.items():
        pts = [(s[0], s[1]) for s in samples if s[2] == op and s[3]]
        if pts:
            ax1.scatter([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], s=3, color=color, label=f"{op} ok")
        bad = [(s[0], s[1]) for s in samples if s[2] == op and not s[3]]
        if bad:
            ax1.scatter([p[0] for p in bad], [max(p[1], 1e-3) for p in bad], s=12, marker="x", color="red",
                        label=f"{op} error" if op == "purchase" else None)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    end = max(s[0] for s in samples)
    width = 0.25
    nb = max(1, int(end / width))  # whole bins only: the last partial one would dip
    okb = [0] * nb
    errb = [0] * nb
    for s in samples:
        slot = int(s[0] / width)
        if slot < nb:
            (okb if s[3] else errb)[slot] += 1
    xs = [i * width for i in range(nb)]
    ax2.plot(xs, [v / width for v in okb], color="tab:green", label="successes/s")
    ax2.bar(xs, [v / width for v in errb], width=width, color="red", alpha=0.6, align="edge", label="errors/s")
    ax2.set_ylabel("per second")
    ax2.set_xlabel("time since load start (s)")
    for k in crash.get("kills", []):
        if "t" in k:
            for ax in (ax1, ax2):
                ax.axvline(k["t"], color="black", linestyle="--", linewidth=1)
            ax1.annotate(f"kill {k['service']} primary", (k["t"], 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize=8)
    med_in, med_out = info_latency_split(crash)
    info_hits = med_in is not None and med_out is not None and med_in < med_out  # see crash_reading
    for i, (a, b) in enumerate(failover_windows(crash)):
        for ax in (ax1, ax2):
            ax.axvspan(a, b, color="grey", alpha=0.15, linewidth=0,
                       label="failover: purchases wait" if i == 0 and ax is ax1 else None)
        ax1.annotate("purchases wait;\ninfo served\nfrom the cache" if info_hits else "purchases wait",
                     ((a + b) / 2, 0.55), xycoords=("data", "axes fraction"), ha="center", va="center",
                     fontsize=8, color="dimgrey")
    ax1.legend(loc="upper right", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax1.set_title("purchase + info load on one book while the primaries are killed")
    fig.tight_layout()
    return fig


def fig_lru(results: Results) -> Figure | None:
    lru = results.get("lru") or {}
    lru_pts = lru.get("points") or []
    if not lru_pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    caps = [p["capacity"] for p in lru_pts]
    ax.plot(caps, [p["hit_rate"] for p in lru_pts], marker="o", label=lru.get("source", "LRU"))
    if lru_crosscheck(lru) == "differs":
        ax.plot(caps, [p["ref_hit_rate"] for p in lru_pts], linestyle=":", marker=".", label="textbook LRU")
    ax.plot(caps, [p["top_k_mass"] for p in lru_pts], linestyle="--", color="grey",
            label="best possible: share of requests\nto the N most requested books")
    ax.set_xscale("log")
    ax.set_xticks(caps, [str(c) for c in caps], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"cache size N (entries; {lru.get('keys')} books)")
    ax.set_ylabel("hit rate")
    ax.set_title(f"LRU hit rate vs cache size, zipf s={lru.get('s')}")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def fig_throughput(results: Results) -> Figure | None:
    """Cached info req/s and latency vs connections; both y axes start at 0."""
    tp = results.get("throughput") or {}
    if not tp:
        return None
    items = sorted(tp.items(), key=lambda kv: int(kv[0]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cs = [int(c) for c, _ in items]
    ax.plot(cs, [st.get("rps") or 0 for _, st in items], marker="o", color="tab:green", label="Bazar req/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("connections")
    ax.set_ylabel("req/s")
    # the reference servers of this run, drawn before the axis is fixed so that it holds them
    _sweep_line(ax, dig(results, "references", "twisted"), "raw twisted.web req/s", "tab:grey")
    _sweep_line(ax, dig(results, "references", "klein"), "bare Klein req/s", "tab:olive")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(cs, [st.get("p50_ms") or 0 for _, st in items], marker="s", color="tab:purple", label="p50 ms")
    ax2.plot(cs, [st.get("p99_ms") or 0 for _, st in items], marker="^", color="tab:red", label="p99 ms")
    ax2.set_ylabel("latency (ms)")
    ax2.set_ylim(bottom=0)
    ax.set_title("cached GET /bazar/info: throughput vs connections")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _sweep_line(ax: Axes, steps: dict[str, Stats] | None, label: str, color: str | None = None,
                style: str = "--") -> bool:
    """req/s against connections of one server's steps, if there are any."""
    items = sorted((steps or {}).items(), key=lambda kv: int(kv[0]))
    if not items:
        return False
    ax.plot([int(c) for c, _ in items], [st.get("rps") or 0 for _, st in items], linestyle=style, marker=".",
            color=color, label=label)
    return True


def fig_connections(results: Results) -> Figure | None:
    """req/s against connections: cached info, uncached info, and writes, Bazar's
    beside the references measured in the run (twisted.web, Klein, etcd, --compare)."""
    stores = dig(results, "compare", "stores") or []
    panels: list[tuple[str, list[tuple[Any, str, str | None, str]]]] = [
        # Bazar's own lines: phase 1's sweeps, else the steps the side-by-side phases took of it
        ("cached GET /bazar/info", [(dig(results, "ops", "on", "info") or dig(results, "references", "bazar"),
                                     "Bazar", "tab:green", "-"),
                                    (dig(results, "references", "twisted"), "raw twisted.web", "tab:grey", "--"),
                                    (dig(results, "references", "klein"), "bare Klein", "tab:olive", "--")]
         + [(s.get("info"), f"{s.get('name')} info", None, ":") for s in stores]),
        ("uncached reads", [(dig(results, "ops", "off", "info"), "Bazar info, cache off", "tab:blue", "-"),
                            (dig(results, "etcd", "etcd", "range"), "etcd range", "tab:red", "--")]),
        ("writes", [(dig(results, "ops", "on", "purchase") or dig(results, "etcd", "bazar", "purchase"),
                     "Bazar purchase", "tab:purple", "-"),
                    (dig(results, "etcd", "bazar", "write"), "Bazar update_price", "tab:cyan", "-"),
                    (dig(results, "etcd", "etcd", "put"), "etcd put", "tab:red", "--")]
         + [(s.get("purchase"), f"{s.get('name')} purchase", None, ":") for s in stores]),
    ]
    references = [steps for _, lines in panels for steps, _label, _color, style in lines if style != "-"]
    if not any(references):  # nothing to draw Bazar beside: section 1 and the throughput plot say it all
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, lines) in zip(axes, panels):
        drawn = [_sweep_line(ax, steps, label, color, style) for steps, label, color, style in lines]
        conns = sorted({int(c) for steps, *_ in lines for c in (steps or {})})
        ax.set_xscale("log", base=2)
        if conns:
            ax.set_xticks(conns, [str(c) for c in conns])
        ax.set_xlabel("connections")
        ax.set_ylabel("req/s")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        if any(drawn):
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", color="grey")
    fig.suptitle("throughput against connections, beside the references of this run")
    fig.tight_layout()
    return fig


def _process_color(process: str, primary: str) -> str:
    if process == NETWORK:
        return "tab:grey"
    if process.startswith("frontend"):
        return "tab:blue"
    return "tab:red" if process == primary else "tab:orange"


def fig_timeline(results: Results) -> Figure | None:
    """The typical write as horizontal bars: one per step, from its start to its end (ms
    since the front end received the request), coloured by where it happens."""
    typical = dig(results, "timeline", "typical")
    if not typical or not typical.get("spans"):
        return None
    spans = typical["spans"]
    primary = typical.get("primary") or ""
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(spans) + 1.5))
    for i, (_key, _label, process, start, end) in enumerate(spans):
        ax.barh(i, max(end - start, 0.002), left=start, color=_process_color(process, primary), height=0.6)
        ax.text(end, i, f" {end - start:.3f} ms", va="center", fontsize=7)
    ax.set_yticks(range(len(spans)), [f"{s[1]} ({s[2]})" if s[2] != NETWORK else s[1] for s in spans], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the front end received the write")
    ax.set_title(f"one typical write (update_price), entry {typical.get('index')}: primary {primary}")
    handles = [Patch(color=c) for c in ("tab:blue", "tab:red", "tab:orange", "tab:grey")]
    ax.legend(handles, ["front end", "primary", "backup", "between processes"], fontsize=8, loc="upper right")
    ax.set_xlim(0, max(s[4] for s in spans) * 1.15)  # room for the last bar's figure
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


FIGURES = (("latency", fig_latency), ("invalidation", fig_invalidation), ("crash", fig_crash),
           ("lru", fig_lru), ("throughput", fig_throughput), ("connections", fig_connections),
           ("timeline", fig_timeline))


def write_plots(results: Results, out_dir: str) -> dict[str, str]:
    """PNG plots into out_dir; returns {name: filename}.  Needs matplotlib."""
    from bazar.bench.faultplots import FIGURES as UNDER_FAULTS  # (built on this module's fig_crash)

    made: dict[str, str] = {}
    for name, make in FIGURES + UNDER_FAULTS:
        fig = make(results)
        if fig is None:
            continue
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=100)
        plt.close(fig)
        made[name] = f"{name}.png"
    return made

