"""The plots of the measurements under faults (report sections 12 to 14): the load
with and without CPU hogs and the kill under them, disk against purchases over a
soak, and the invalidation delay across front ends. `bazar.bench.plots` draws them
with its own (it imports this module when it draws)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from bazar.bench.plots import fig_crash
from bazar.bench.report import Results, dig
from bazar.bench.soak import series


def fig_hog(results: Results) -> Figure | None:
    """Throughput and p99 of each op of the load, alone and beside the hogs."""
    load = dig(results, "hog", "load") or {}
    ops = [op for op in ("purchase", "info") if dig(load, "without", op) or dig(load, "with", op)]
    if not ops:
        return None
    fig, axes = plt.subplots(1, 2 * len(ops), figsize=(4 * len(ops) * 2, 4))
    for i, op in enumerate(ops):
        steps = [dig(load, "without", op) or {}, dig(load, "with", op) or {}]
        for ax, key, label in ((axes[2 * i], "rps", "req/s"), (axes[2 * i + 1], "p99_ms", "p99 (ms)")):
            ax.bar([0, 1], [st.get(key) or 0 for st in steps], color=["tab:green", "tab:red"])
            ax.set_xticks([0, 1], ["alone", "beside the hogs"])
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{op}: {label}")
    fig.suptitle(f"the load alone and beside {dig(results, 'hog', 'hogs')} CPU hogs")
    fig.tight_layout()
    return fig


def fig_hog_crash(results: Results) -> Figure | None:
    """The kill of the catalog primary under the hogs, drawn as the crash phase's."""
    crash = dig(results, "hog", "crash")
    if not crash:
        return None
    fig = fig_crash({"crash": crash})
    if fig is not None:
        fig.axes[0].set_title("purchase + info load while the catalog primary is killed, beside the CPU hogs")
    return fig


def fig_soak(results: Results) -> Figure | None:
    """Per replica, against purchases: its directory's bytes, and the log entries and
    request ids it holds."""
    soak = results.get("soak") or {}
    samples = soak.get("samples") or []
    if len(samples) < 2:
        return None
    names = sorted(samples[0].get("replicas") or {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in names:
        style = "-" if name.startswith("catalog") else "--"
        xs, ys = series(samples, name, "total")
        ax1.plot(xs, [y / 1e6 for y in ys], style, marker=".", label=name)
        xs, ys = series(samples, name, "log")
        ax2.plot(xs, ys, style, label=f"{name}: log entries")
        xs, ys = series(samples, name, "request_ids")
        ax2.plot(xs, ys, style, alpha=0.5, label=f"{name}: request ids")
    ax1.set_xlabel("purchases")
    ax1.set_ylabel("data directory (MB)")
    ax1.set_ylim(bottom=0)
    ax1.set_title("disk per replica against purchases")
    ax1.legend(fontsize=8)
    half = samples[-1]["purchases"] / 2
    ax1.axvline(half, color="grey", linestyle=":", linewidth=1)
    ax1.annotate("half way", (half, 0.02), xycoords=("data", "axes fraction"), xytext=(4, 0),
                 textcoords="offset points", fontsize=8, color="dimgrey")
    ax2.set_xlabel("purchases")
    ax2.set_ylabel("rows")
    ax2.set_ylim(bottom=0)
    ax2.set_title("log entries held, request ids kept")
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def fig_spread(results: Results) -> Figure | None:
    """When front end B showed a write made through A, against the writer's answer
    (and, with Redis, when the Redis message arrived): the share of rounds by then."""
    sp = results.get("spread") or {}
    lines: list[tuple[list[float], str, Any]] = []
    for key, label in (("http", "HTTP push: B shows it"), ("redis", "HTTP push + Redis: B shows it")):
        values = dig(sp, key, "vs_answer_ms")
        if values:
            lines.append((sorted(values), label, "-"))
    arrivals = dig(sp, "redis", "redis_arrivals_ms")
    if arrivals:
        lines.append((sorted(arrivals), "Redis message at a subscriber", ":"))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for values, label, style in lines:
        ax.step(values, [(i + 1) / len(values) for i in range(len(values))], style, where="post", label=label)
    ax.axvline(0, color="black", linewidth=1)
    ax.annotate("the writer's answer", (0, 0.97), xycoords=("data", "axes fraction"), xytext=(4, 0),
                textcoords="offset points", fontsize=8, va="top")
    ax.set_xlabel("ms against the writer's answer (negative: before it)")
    ax.set_ylabel("share of rounds")
    ax.set_ylim(0, 1.02)
    ax.set_title("a write through front end A, seen at front end B")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


FIGURES = (("hog", fig_hog), ("hog_crash", fig_hog_crash), ("soak", fig_soak), ("spread", fig_spread))
