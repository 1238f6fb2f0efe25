"""Where one Bazar write spends its time (phase "timeline", `--only timeline`).

A cluster of its own is started with BAZAR_TRACE naming one file (`bazar.trace`: every
process appends a JSON line per step of a request to it), N single writes
(`PUT /bazar/update_price/1`) are made one at a time, and the file is read back.

Assembly (`assemble`, pure): each write is the span between the front end's
`http.request` of an update_price and its `http.answer`; as the writes are made one
at a time, every event of that write falls inside it. Within it, the primary's
`propose` gives the entry's index, and the other events are found by process, kind
and index: the appends that carry the entry to each backup, each backup's `receive`
and `durable`, the replies, the primary's own `flushed`, `commit` and `applied`,
and the answers on the way back. The backups are ranked by the arrival of their
reply: the first one makes the majority. Times come from each process's
`time.time_ns()`, one clock on one machine. The cluster has one front end.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bazar.bench.http import LeanConn, build_request
from bazar.bench.load import LOAD_ERRORS
from bazar.bench.phases import Ctx, bench_cluster, log, timed
from bazar.bench.stats import fmt_stats, summarize
from bazar.messages import WRITE_PATH
from bazar.trace import ENV

Event = dict[str, Any]
BOOK = 1
NETWORK = "network"

# key, what the span is; the order of the bars in the plot, top to bottom
STEPS: tuple[tuple[str, str], ...] = (
    ("fe_in", "front end: request in → forwarded"),
    ("forward", "front end → primary (HTTP)"),
    ("primary_in", "primary: request in → proposed"),
    ("primary_fsync", "primary: own append fsync'd"),
    ("b1_out", "append → 1st backup (HTTP)"),
    ("b1_fsync", "1st backup: append fsync'd"),
    ("b1_back", "1st backup's reply → primary"),
    ("b2_out", "append → 2nd backup (HTTP)"),
    ("b2_fsync", "2nd backup: append fsync'd"),
    ("b2_back", "2nd backup's reply → primary"),
    ("quorum", "primary: proposed → committed"),
    ("apply", "primary: committed → applied"),
    ("answer", "primary: applied → answer written"),
    ("back", "primary → front end (HTTP answer)"),
    ("fe_out", "front end: answer in → answer written"),
    ("total", "the whole write at the front end"),
)
LABELS = dict(STEPS)


def read_events(path: str) -> list[Event]:
    """The events of a trace file in time order (lines that are not an event are skipped:
    a process stopped in the middle of a write leaves at most its last line short)."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("ns"), int) and isinstance(event.get("event"), str):
                events.append(event)
    events.sort(key=lambda e: e["ns"])
    return events


def is_write(e: Event) -> bool:
    return str(e.get("path", "")).startswith("/bazar/update_price/")


def windows(events: Sequence[Event]) -> list[tuple[Event, Event]]:
    """(request, answer) of every update_price a front end answered."""
    found = []
    open_: dict[Any, Event] = {}
    for e in events:
        if e.get("process") != "frontend" or not is_write(e):
            continue
        if e["event"] == "http.request":
            open_[e.get("pid")] = e
        elif e["event"] == "http.answer" and e.get("pid") in open_:
            found.append((open_.pop(e.get("pid")), e))
    return found


def carries(e: Event, index: int) -> bool:
    """Whether an append event (send, receive, durable) holds the entry at `index`."""
    prev, n = e.get("prev"), e.get("n")
    if not isinstance(prev, int) or prev >= index:
        return False
    return not isinstance(n, int) or prev + n >= index  # (a receive does not know n: its durable does)


class Window:
    """The events of one write, and the first of them that match."""

    def __init__(self, events: Sequence[Event]):
        self.events = events

    def first(self, after: int, process: str | None, event: str, match: Callable[[Event], bool] = bool) -> Event | None:
        """The first `event` of `process` (any, if None) at or after `after` that `match`es."""
        for e in self.events:
            if e["ns"] < after or e["event"] != event or (process is not None and e.get("process") != process):
                continue
            if match(e):
                return e
        return None

    def last(self, before: int, process: str, event: str, match: Callable[[Event], bool]) -> Event | None:
        """The last `event` of `process` at or before `before` that `match`es."""
        found = None
        for e in self.events:
            if e["ns"] > before:
                break
            if e["event"] == event and e.get("process") == process and match(e):
                found = e
        return found


def to_write(e: Event) -> bool:
    return str(e.get("url", e.get("path", ""))).endswith(WRITE_PATH)


def backup_spans(w: Window, primary: str, propose: Event, index: int) -> list[list[tuple[str, Event, Event]]]:
    """For each backup the entry went to: its three spans (out, fsync, back), the backups
    in the order their replies arrived."""
    service = primary.rsplit("-", 1)[0]
    found = []
    seen: set[Any] = set()
    for send in w.events:
        if (send["ns"] < propose["ns"] or send["event"] != "send" or send.get("process") != primary
                or send.get("kind") != "append" or not carries(send, index) or send.get("to") in seen):
            continue
        seen.add(send.get("to"))
        backup = f"{service}-{send.get('to')}"
        same = {"kind": "append", "prev": send.get("prev")}

        def same_append(e: Event, same: dict[str, Any] = same) -> bool:
            return all(e.get(k) == v for k, v in same.items())

        def its_reply(e: Event, to: Any = send.get("to")) -> bool:
            return e.get("frm") == to and e.get("kind") == "append"

        got = w.first(send["ns"], backup, "receive", same_append)
        durable = w.first(got["ns"], backup, "durable", same_append) if got else None
        reply = w.first(durable["ns"], primary, "reply", its_reply) if durable else None
        if got and durable and reply:
            found.append((reply["ns"], backup, [("out", send, got), ("fsync", got, durable), ("back", durable, reply)]))
    found.sort(key=lambda f: f[0])
    return [[(f"b{rank}_{part}", a, b) for part, a, b in spans] for rank, (_, _, spans) in enumerate(found, 1)]


def assemble_one(events: Sequence[Event], request: Event, answer: Event) -> dict[str, Any] | None:
    """The spans of one write: {"rid", "index", "primary", "spans": [[key, process, start_ns, end_ns]]}."""
    w = Window([e for e in events if request["ns"] <= e["ns"] <= answer["ns"]])
    propose = w.first(request["ns"], None, "propose")
    if propose is None or not isinstance(propose.get("index"), int):
        return None
    primary, index, t0 = propose["process"], propose["index"], request["ns"]
    at: dict[str, Event | None] = {"F_req": request, "F_ans": answer, "propose": propose}
    at["F_send"] = w.first(t0, "frontend", "call.send", to_write)
    at["P_req"] = w.last(propose["ns"], primary, "http.request", to_write)
    at["flushed"] = w.first(propose["ns"], primary, "flushed", lambda e: (e.get("upto") or 0) >= index)
    at["commit"] = w.first(propose["ns"], primary, "commit", lambda e: (e.get("upto") or 0) >= index)
    at["applied"] = w.first(propose["ns"], primary, "applied", lambda e: e.get("index") == index)
    applied = at["applied"]
    applied_ns = applied["ns"] if applied else propose["ns"]
    p_ans = at["P_ans"] = w.first(applied_ns, primary, "http.answer", to_write)
    at["F_back"] = w.first(p_ans["ns"] if p_ans else applied_ns, "frontend", "call.answer", to_write)
    plan = [("fe_in", "frontend", "F_req", "F_send"), ("forward", NETWORK, "F_send", "P_req"),
            ("primary_in", primary, "P_req", "propose"), ("primary_fsync", primary, "propose", "flushed"),
            ("quorum", primary, "propose", "commit"), ("apply", primary, "commit", "applied"),
            ("answer", primary, "applied", "P_ans"), ("back", NETWORK, "P_ans", "F_back"),
            ("fe_out", "frontend", "F_back", "F_ans"), ("total", "frontend", "F_req", "F_ans")]
    spans = []
    for key, process, a, b in plan:
        start, end = at.get(a), at.get(b)
        if start is not None and end is not None:
            spans.append([key, process, start["ns"], end["ns"]])
    for backup in backup_spans(w, primary, propose, index):
        for key, begin, finish in backup:
            where = NETWORK if not key.endswith("fsync") else begin["process"]
            spans.append([key, where, begin["ns"], finish["ns"]])
    order = [k for k, _ in STEPS]
    spans.sort(key=lambda s: order.index(s[0]))
    return {"rid": propose.get("rid"), "index": index, "primary": primary, "t0_ns": t0, "spans": spans}


def assemble(events: Sequence[Event]) -> list[dict[str, Any]]:
    """Every write of a trace, assembled (writes whose entry was never proposed are left out)."""
    writes = []
    for request, answer in windows(events):
        one = assemble_one(events, request, answer)
        if one is not None:
            writes.append(one)
    return writes


def summarize_writes(writes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of each step over the writes, and the typical write: the one whose
    whole time is closest to the median, its spans in ms from its start."""
    durations: dict[str, list[float]] = {}
    for w in writes:
        for key, _process, start, end in w["spans"]:
            durations.setdefault(key, []).append((end - start) / 1e6)
    steps = {key: {"label": label, "median_ms": statistics.median(durations[key]), "n": len(durations[key])}
             for key, label in STEPS if key in durations}
    typical = None
    totals = [(s[3] - s[2], w) for w in writes for s in w["spans"] if s[0] == "total"]
    if totals:
        middle = statistics.median(t for t, _ in totals)
        _, w = min(totals, key=lambda tw: abs(tw[0] - middle))
        typical = {"rid": w["rid"], "index": w["index"], "primary": w["primary"],
                   "spans": [[key, LABELS[key], process, (start - w["t0_ns"]) / 1e6, (end - w["t0_ns"]) / 1e6]
                             for key, process, start, end in w["spans"]]}
    return {"writes": len(writes), "steps": steps, "typical": typical}


def make_writes(ctx: Ctx, port: int, token: str | None, count: int) -> list[float]:
    """`count` update_price writes, one at a time on one connection: their latencies (s)."""
    conn = LeanConn(port)
    latencies = []
    deadline = time.monotonic() + max(10.0, count * 0.5)
    try:
        for i in range(count):
            if ctx.stop.is_set() or time.monotonic() > deadline:
                break
            raw = build_request("PUT", f"/bazar/update_price/{BOOK}", port, body={"price": 20 + (i % 400) * 0.25},
                                token=token)
            try:
                status, _, took = timed(conn, raw)
            except LOAD_ERRORS:
                conn.close()
                continue
            if status == 200:
                latencies.append(took)
            ctx.pause(0.03)  # the backups learn the commit before the next write begins
    finally:
        conn.close()
    return latencies


def phase_timeline(ctx: Ctx, root: str, count: int) -> dict[str, Any]:
    """Start a traced cluster, make `count` single writes, stop it, read and assemble the trace."""
    path = os.path.join(root, "trace.jsonl")
    cluster = bench_cluster("traced", root, cache_size=None, env={**os.environ, ENV: path})
    try:
        cluster.start(wait=0)
        cluster.wait_healthy(timeout=60.0, serving=True)
        token = cluster.read_token()
        latencies = make_writes(ctx, cluster.frontend_port, token, count)
    finally:
        cluster.stop()
    events = read_events(path)
    res = summarize_writes(assemble(events))
    res.update(sent=count, client=summarize(latencies), events=len(events), book=BOOK)
    log(f"  {len(latencies)} writes, {len(events)} trace events, {res['writes']} assembled; "
        f"client: {fmt_stats(res['client'])}")
    for step in res["steps"].values():
        log(f"  {step['label']:42s} median {step['median_ms']:.3f} ms")
    return res
