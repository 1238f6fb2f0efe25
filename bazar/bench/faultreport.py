"""The report's sections of the measurements under faults: elections under a CPU hog
(12), disk over a soak (13), the invalidation delay across front ends (14). Like the
rest of the report they read a results object and measure nothing.

`bazar.bench.report` renders them (it imports this module when it renders, since this
one builds on its helpers).
"""

from __future__ import annotations

from typing import Any

from bazar.bench.report import (
    STATS_HEAD,
    STATS_SEP,
    Results,
    _ms,
    _phase_section,
    _plot_link,
    _rps,
    _stats_row,
    _verdict_line,
    crash_reading,
    replica_name,
)
from bazar.bench.soak import judge


def _mb(v: Any) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v / 1e6:.1f}"


def _mib(v: Any) -> str:
    return "its limit" if not isinstance(v, (int, float)) else f"{v / 2**20:.0f} MiB"


def _int(v: Any) -> str:
    """A whole number (a float rounded half to even). Never "-0": Python 3.12's sum()
    of floats is compensated, so a figure 3.11 computes as -0.3 may be 0.0 there, and
    the report must read the same whichever made it."""
    return "—" if not isinstance(v, (int, float)) else f"{round(v):,}"


_b = _int  # bytes per purchase


def _signed_ms(v: Any) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v:+.3f}"


# -- 12. elections under a CPU hog ------------------------------------------------------


def _hog_text(hog: dict[str, Any], results: Results, plots: dict[str, str]) -> list[str]:
    conns = hog.get("conns") or {}
    cores = hog.get("hog_cores")
    out = [f"The same load twice, {hog.get('seconds', 0):g} s each, unpaced: purchases of the bench book at "
           f"{conns.get('purchase')} connections and cached `GET /bazar/info/0` at {conns.get('info')}, at once; "
           f"first alone, then beside {hog.get('hogs')} CPU hogs (a Python busy loop each, started with "
           "`sys.executable` and stopped by PID)"
           + (f", which kept {cores:.2f} cores busy on average" if isinstance(cores, (int, float)) else "")
           + ". Each replica's epoch is read from its `/health` before and after each half.", ""]
    if hog.get("note"):
        out += [f"Note: {hog['note']}.", ""]
    out += ["| load | op | " + STATS_HEAD[2:], "|---|---" + STATS_SEP]
    for label, key in (("alone", "without"), ("beside the hogs", "with")):
        for op, st in ((hog.get("load") or {}).get(key) or {}).items():
            out.append(_stats_row([label, op], st))
    out += ["", "| service | epochs during the load alone | epoch before the hogs | after | epochs under the hogs |",
            "|---|---:|---:|---:|---:|"]
    epochs = hog.get("epochs") or {}
    for service in ("catalog", "order"):
        def top(reading: dict[str, Any] | None, service: str = service) -> str:
            values = [v for k, v in (reading or {}).items() if k.startswith(service + "-") and isinstance(v, int)]
            return str(max(values)) if values else "—"

        out.append(f"| {service} | {_int((hog.get('changes_without') or {}).get(service))} | "
                   f"{top(epochs.get('before'))} | {top(epochs.get('after'))} | "
                   f"{_int((hog.get('changes') or {}).get(service))} |")
    out += ["", "An epoch is a Raft term: every election that gets as far as a candidacy starts one (a pre-vote that "
            "finds no majority does not). None is wanted while the primaries are alive, however slow the machine "
            "makes them.", ""]
    crash = hog.get("crash") or {}
    kill = next((k for k in crash.get("kills") or [] if "t" in k), None)
    if kill:
        out.append(f"Then, the hogs still running, `kill -9` of the catalog primary ({replica_name(kill)}, pid "
                   f"{kill.get('pid')}) under the crash phase's paced purchase + info load: the first successful "
                   "purchase sent after the kill completed "
                   + (f"**{kill['failover_s']:.3f} s** after it" if kill.get("failover_s") is not None
                      else "**not within the wait**")
                   + f"; {kill.get('errors_5s', '—')} errors in the next 5 s.")
    elif crash.get("kills"):
        out.append(f"The kill under the hogs did not happen: {crash['kills'][0].get('error')}.")
    out += ["", _verdict_line(results, "elections under a CPU hog: epoch changes"),
            _verdict_line(results, "failover under a CPU hog: kill → first purchase"), ""]
    out += _plot_link(plots, "hog")
    if plots.get("hog_crash"):
        out += _plot_link(plots, "hog_crash") + crash_reading(crash)
    return out


# -- 13. disk over a soak ---------------------------------------------------------------


def _soak_text(soak: dict[str, Any], results: Results, plots: dict[str, str]) -> list[str]:
    load = soak.get("load") or {}
    bounds = soak.get("bounds") or {}
    out = [f"{_int(soak.get('purchases'))} purchases (of {_int(soak.get('purchases_wanted'))} asked) at "
           f"{soak.get('conns')} connections, as fast as they went ({_rps(load.get('rps'))} req/s, p99 "
           f"{_ms(load.get('p99_ms'))} ms, {load.get('errors', 0)} errors), each replica sampled every "
           f"{_int(soak.get('every'))} purchases: the bytes of its data directory (the SQLite file, its -wal and "
           "-shm), the entries its log holds (`/health`: `log` − `snapshot_index`) and the request ids it keeps "
           "(`/metrics`: `bazar_replica_request_ids`). The last half is judged as the steady state, if by half way "
           f"each service had made enough writes for its log to be compacted ({_int(bounds.get('compact_after'))} "
           f"+ {_int(bounds.get('keep_entries'))} entries) and its request ids to expire "
           f"({_int(bounds.get('retain_requests'))} writes).", ""]
    if not soak.get("steady"):
        out += [f"**Not judged**: {soak.get('unjudged', 'no steady state')}. The figures below are those of a "
                "store still filling its bounds.", ""]
    if soak.get("note"):
        out += [f"Note: {soak['note']}.", ""]
    judged = judge(soak)
    out += ["| replica | bytes per purchase, whole run | last half | its row (table size ÷ rows) | overhead | "
            "of which in the SQLite file | that ÷ row | largest WAL (MB) | most log entries held | "
            "most request ids kept |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in judged.items():
        ratio = r.get("ratio")
        out.append(f"| {name} | {_b(r['whole'])} | {_b(r['total'])} | {_b(r['row'])} | {_b(r['overhead'])} | "
                   f"{_b(r.get('in_file'))} | {'—' if ratio is None else f'{ratio:.2f}×'} | "
                   f"{_mb(r.get('max_wal'))} | {_int(r['max_log'])} | {_int(r['max_request_ids'])} |")
    out += ["", "*Its row*: what one purchase adds to the store's own data on that service (the catalog's sale, "
            "the order service's order), from the size of that table with its indexes divided by its rows. "
            "*Overhead*: the rest of the last half's growth per purchase; *of which in the SQLite file*: less "
            "the WAL's, which the store bounds on its own (cut back to "
            f"{_mib(bounds.get('wal_limit'))} after each checkpoint) and which only wobbles with the checkpoints; "
            "that part, divided by the row, is what the target judges. Where the growth goes, from each file's "
            "own accounting (SQLite's `dbstat`) at half way and at the end, in bytes per purchase:", "",
            "| replica | all | own data | log | request ids | free pages | WAL | other |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in judged.items():
        s = r.get("split") or {}
        out.append(f"| {name} | " + " | ".join(_b(s.get(k)) for k in ("total", "data", "log", "requests", "free",
                                                                       "wal", "other")) + " |")
    out += ["", "Free pages are those compaction and the expiry of request ids freed and SQLite has not reused "
            "yet (a negative figure: more reused than freed). *Other*: the rest of the file (the schema, the "
            "replica's meta table, staged snapshot tables).", "",
            _verdict_line(results, "soak: overhead in the SQLite file ÷ the purchase's own row, steady state"), ""]
    out += _plot_link(plots, "soak")
    out += _catchup_text(soak.get("catchup"), results)
    return out


def _catchup_text(c: dict[str, Any] | None, results: Results) -> list[str]:
    out = ["### A catalog backup far behind", ""]
    if not c:
        return out + ["Not measured (`--soak-catchup none`).", ""]
    if "skipped" in c:
        return out + [f"Skipped — {c['skipped']}.", ""]
    how = ("its data directory moved aside and the process killed (the supervisor restarted it on an empty "
           "directory: a replica that lost its data)" if c.get("mode") == "wipe"
           else "the process resumed (SIGCONT)")
    out.append(f"{c.get('replica')} (pid {c.get('pid')}) was paused (SIGSTOP) at seq {_int(c.get('behind_seq'))}; "
               f"{_int(c.get('writes'))} `update_price` writes ({_rps(c.get('write_rps'))} req/s, "
               f"{c.get('write_errors', 0)} errors, {c.get('write_s', 0):.1f} s) took the primary past its next "
               f"compaction, up to index {_int(c.get('leader_snapshot_index'))}; then {how}.")
    if c.get("error"):
        out.append(f"It went wrong: {c['error']}.")
    else:
        back = c.get("back_s")
        after = c.get("after") or {}
        out.append("It was back, serving and voting at the primary's commit index "
                   f"({_int(c.get('target_seq'))}), "
                   + (f"**{back:.2f} s** after it was let go" if back is not None else "**not within the wait**")
                   + f", by {'a snapshot' if c.get('by_snapshot') else 'entries, not a snapshot'}: "
                   f"`bazar_snapshots_total{{kind=\"installed\"}}` +{_int(c.get('installed'))} on it, "
                   f"`{{kind=\"sent\"}}` +{_int(c.get('sent'))} on the primary. At the end: "
                   f"{after.get('role')}, {after.get('status')}, seq {_int(after.get('last_seq'))}, its log "
                   f"compacted up to {_int(after.get('snapshot_index'))}.")
    out += ["", _verdict_line(results, "soak: snapshots that bring a far-behind backup back"), ""]
    return out


# -- 14. the invalidation delay across front ends ---------------------------------------


def _triple(st: dict[str, Any] | None, signed: bool = False) -> str:
    fmt = _signed_ms if signed else _ms
    st = st or {}
    return f"{fmt(st.get('p50_ms'))} / {fmt(st.get('p95_ms'))} / {fmt(st.get('max_ms'))}"


def _spread_text(sp: dict[str, Any], results: Results, plots: dict[str, str]) -> list[str]:
    out = [f"A cluster of the bench's own with two front ends, A and B (`bazar-cluster --frontends 2`). In each "
           f"of {sp.get('writes')} rounds: book {sp.get('book')} is read twice at B (a miss that fills B's cache, "
           "then a hit), its price is set through A (`PUT /bazar/update_price`), and B is read again and again, "
           "from just before the write leaves until B shows the new price. With `redis-server` on PATH, the same "
           "on a second cluster started with a Redis URL, whose announcements travel both ways (HTTP push and "
           "Redis pub/sub: the first to arrive counts).", "",
           "| path | rounds | write at A, p50 ms | B shows it, after the write left: p50 / p95 / max ms | "
           "… against the writer's answer | reads at B sent after the answer that showed the old price (rounds) "
           "| lag after the answer: p50 / p95 / max ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for key, label in (("http", "HTTP push"), ("redis", "HTTP push + Redis")):
        r = sp.get(key)
        if not r:
            continue
        if "skipped" in r:
            notes.append(f"{label}: {r['skipped']}.")
            continue
        out.append(f"| {label} | {r.get('rounds')} | {_ms((r.get('write') or {}).get('p50_ms'))} | "
                   f"{_triple(r.get('visible'))} | {_triple(r.get('vs_answer'), signed=True)} | "
                   f"{r.get('stale_after_answer')} ({r.get('rounds_stale_after_answer')}) | {_triple(r.get('lag'))} |")
        if r.get("unseen") or r.get("errors"):
            notes.append(f"{label}: B never showed the new price within {r.get('seen_bound_s')} s in "
                         f"{r.get('unseen')} round(s); {r.get('errors')} error(s).")
        if r.get("redis_arrival"):
            notes.append(f"{label}: the Redis message reached a subscriber of the bench's own "
                         f"{_triple(r['redis_arrival'], signed=True)} ms against the writer's answer "
                         "(p50 / p95 / max; negative: before it).")
    read = (sp.get("http") or {}).get("read") or {}
    out += [""] + notes + ([""] if notes else []) + [
        "*Against the writer's answer*: the end of the first read at B that showed the new price, less the moment "
        "A's answer arrived (negative: B had it first). *Lag after the answer*: how long B could still show the "
        "old price once the writer had its answer: 0 when no read sent after the answer showed it, else up to "
        "the end of the first read that showed the new one (an upper bound, within one read at B: p50 "
        f"{_ms(read.get('p50_ms'))} ms here). That lag is guarantee 4's invalidation delay.", "",
        _verdict_line(results, "invalidation across front ends: max lag after the answer (HTTP push)"), ""]
    out += _plot_link(plots, "spread")
    return out


def fault_sections(results: Results, plots: dict[str, str]) -> list[str]:
    """Sections 12, 13 and 14."""
    return (_phase_section("## 13. Elections under a CPU hog", results.get("hog"),
                           lambda hog: _hog_text(hog, results, plots),
                           missing="Not measured (`--cpu-hog`).")
            + _phase_section("## 14. Disk over a soak", results.get("soak"),
                             lambda soak: _soak_text(soak, results, plots), missing="Not measured (`--soak`).")
            + _phase_section("## 15. Invalidation delay across front ends", results.get("spread"),
                             lambda sp: _spread_text(sp, results, plots), missing="Not measured."))
