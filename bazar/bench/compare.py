"""Bazar beside other servers, with the same client and the same connection counts:
the reference servers of `bazar.bench.references` (phase "references") and other
stores named with `--compare` (phase "compare").

Each connection count is measured for every server in turn, Bazar first, one step
after the other, so that all of them run under the same conditions of the machine.

`--compare` names a store's URLs: comma-separated `key=value` fields,

    name=flask,info=http://127.0.0.1:8000/info/{id},purchase=POST http://127.0.0.1:8000/buy/{id}

`info` and `purchase` are `[METHOD ]URL` (GET and POST by default), `{id}` is
replaced by `id=N` (default 1), and `body=JSON` is sent with each purchase (default:
none). A value may hold commas: a field starts only at `,name=`, `,info=`,
`,purchase=`, `,id=` or `,body=`. Only `http://127.0.0.1` (or `localhost`) URLs.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from bazar.bench.http import LeanConn, build_request
from bazar.bench.load import LOAD_ERRORS, always, run_load
from bazar.bench.phases import Ctx, log
from bazar.bench.references import KINDS, PATH
from bazar.bench.stats import Stats, fmt_stats
from bazar.testing.processes import Processes, free_ports, wait_until

CONNS = ("1", "16", "64")
FIELDS = ("name", "info", "purchase", "id", "body")
WARM_UP = 3  # requests to each server before its first step (fill the cache, open the paths)


# -- what a step sends where ---------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One server's request of a workload: where it goes, what is sent, and the
    server processes whose CPU it costs (when they run here)."""

    port: int
    raw: bytes
    pids: tuple[int, ...] = ()


def sweep(ctx: Ctx, targets: dict[str, Target], conns: Sequence[str] = CONNS,
          label: str = "") -> dict[str, dict[str, Stats]]:
    """Each target at each connection count, the targets in turn at each count:
    {target: {conns: stats}}. Fills as it goes (kept if interrupted)."""
    for target in targets.values():
        warm_up(target)
    out: dict[str, dict[str, Stats]] = {name: {} for name in targets}
    for c in conns:
        for name, target in targets.items():
            if ctx.stop.is_set():
                return out
            st = run_load(target.port, always(target.raw), int(c), ctx.duration, stop_event=ctx.stop,
                          server_pids=target.pids)
            out[name][c] = st
            log(f"  {label}{name:24s} conns={c:>2s}: {fmt_stats(st)}")
            ctx.pause(0.1)
    return out


def warm_up(target: Target) -> None:
    conn = LeanConn(target.port)
    for _ in range(WARM_UP):
        try:
            conn.roundtrip(target.raw)
        except LOAD_ERRORS:
            pass
    conn.close()


# -- the reference servers -------------------------------------------------------------

class ReferenceServers:
    """The reference servers (`python -m bazar.bench.references`), each a process of
    its own on a free loopback port, started with this interpreter and stopped by PID."""

    def __init__(self, workdir: str, size: int):
        self.workdir = workdir
        self.size = size
        self.ports = dict(zip(KINDS, free_ports(len(KINDS))))
        self.procs = Processes()

    def argv(self, kind: str) -> list[str]:
        return [sys.executable, "-m", "bazar.bench.references", "--port", str(self.ports[kind]), "--kind", kind,
                "--size", str(self.size), "--parent", str(os.getpid())]

    def start(self, timeout: float = 20.0) -> ReferenceServers:
        os.makedirs(self.workdir, exist_ok=True)
        for kind in KINDS:
            self.procs.start(f"reference-{kind}", self.argv(kind), env=dict(os.environ), cwd=self.workdir)
        for kind in KINDS:
            wait_until(partial(self.answers, kind), timeout, f"the {kind} reference server")
        log(f"  reference servers: {', '.join(f'{k} :{p} (pid {self.pid(k)})' for k, p in self.ports.items())}")
        return self

    def answers(self, kind: str) -> bool:
        if self.procs.exited():
            raise RuntimeError(f"a reference server exited:\n{self.procs.logs()}")
        conn = LeanConn(self.ports[kind], timeout=1.0)
        try:
            status, _ = conn.roundtrip(build_request("GET", PATH, self.ports[kind]))
        finally:
            conn.close()
        return status == 200

    def pid(self, kind: str) -> int:
        return next(p.pid for name, p, _ in self.procs.started if name == f"reference-{kind}")

    def body(self, kind: str) -> bytes:
        conn = LeanConn(self.ports[kind])
        try:
            return conn.roundtrip(build_request("GET", PATH, self.ports[kind]))[1]
        finally:
            conn.close()

    def stop(self) -> None:
        self.procs.stop()


def phase_references(ctx: Ctx, port: int, fe_pid: int | None, workdir: str) -> dict[str, Any]:
    """Bazar's cached GET /bazar/info/0 beside the reference servers answering a body of
    the same size: {"bazar": {conns: stats}, "twisted": ..., "klein": ..., "body_bytes": n}."""
    conn = LeanConn(port)
    try:
        status, body = conn.roundtrip(build_request("GET", PATH, port))
    finally:
        conn.close()
    if status != 200:
        raise RuntimeError(f"GET {PATH} answered {status}")
    servers = ReferenceServers(workdir, len(body)).start()
    try:
        sizes = {kind: len(servers.body(kind)) for kind in KINDS}
        targets = {"bazar": Target(port, build_request("GET", PATH, port), (fe_pid,) if fe_pid else ())}
        for kind in KINDS:
            p = servers.ports[kind]
            targets[kind] = Target(p, build_request("GET", PATH, p), (servers.pid(kind),))
        res: dict[str, Any] = {"path": PATH, "body_bytes": len(body), "reference_bytes": sizes,
                               "conns": list(CONNS)}
        res.update(sweep(ctx, targets))
        return res
    finally:
        servers.stop()


# -- other stores (--compare) ----------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    method: str
    port: int
    path: str

    def request(self, body: Any = None) -> bytes:
        return build_request(self.method, self.path, self.port, body=body)


@dataclass(frozen=True)
class Store:
    """Another store's URLs for the workloads of the comparison (see the module's docstring)."""

    name: str
    info: Endpoint
    purchase: Endpoint | None
    body: Any
    spec: str


def split_fields(spec: str) -> dict[str, str]:
    """`key=value` fields separated by commas; a comma starts a field only before a known key."""
    parts = re.split(",(?=(?:" + "|".join(FIELDS) + ")=)", spec.strip())
    fields: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in FIELDS:
            raise ValueError(f"--compare: {part!r} is not one of {', '.join(k + '=' for k in FIELDS)}")
        if key in fields:
            raise ValueError(f"--compare: {key}= given twice")
        fields[key] = value.strip()
    return fields


def endpoint(text: str, default_method: str, book: str) -> Endpoint:
    """`[METHOD ]URL` with `{id}` replaced; only loopback http URLs."""
    method, _, url = text.partition(" ") if " " in text.strip() else (default_method, "", text)
    url = url.strip().replace("{id}", book)
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"--compare: {url!r}: only http://127.0.0.1 URLs (the bench stays on this machine)")
    if not re.fullmatch(r"[A-Z]+", method.strip()):
        raise ValueError(f"--compare: {method!r} is not an HTTP method")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(method.strip(), parts.port or 80, path)


def parse_store(spec: str) -> Store:
    """A `--compare` value as a Store; ValueError saying what is wrong."""
    fields = split_fields(spec)
    for key in ("name", "info"):
        if not fields.get(key):
            raise ValueError(f"--compare: {key}= is missing in {spec!r}")
    book = fields.get("id", "1")
    if not book.isdigit():
        raise ValueError(f"--compare: id={book!r} is not a number")
    try:
        body = json.loads(fields["body"]) if "body" in fields else None
    except ValueError:
        raise ValueError(f"--compare: body= is not JSON: {fields['body']!r}") from None
    purchase = endpoint(fields["purchase"], "POST", book) if fields.get("purchase") else None
    return Store(fields["name"], endpoint(fields["info"], "GET", book), purchase, body, spec)


def phase_compare(ctx: Ctx, port: int, book_id: int | None, stores: Sequence[Store],
                  fe_pid: int | None = None) -> dict[str, Any]:
    """Bazar's cached info and purchase beside each store's: {"bazar": {op: {conns: stats}},
    "stores": [{"name", "spec", op: {conns: stats}}]}."""
    pids = (fe_pid,) if fe_pid else ()
    ops: dict[str, dict[str, Target]] = {"info": {"bazar": Target(port, build_request("GET", PATH, port), pids)}}
    if book_id is not None:
        ops["purchase"] = {"bazar": Target(port, build_request("POST", f"/bazar/purchase/{book_id}", port,
                                                               body={"quantity": 1}), pids)}
    for i, store in enumerate(stores):
        ops["info"][f"store-{i}"] = Target(store.info.port, store.info.request())
        if store.purchase is not None and "purchase" in ops:
            ops["purchase"][f"store-{i}"] = Target(store.purchase.port, store.purchase.request(store.body))
    measured = {op: sweep(ctx, targets, label=f"{op} ") for op, targets in ops.items()}
    res: dict[str, Any] = {"conns": list(CONNS),
                           "bazar": {op: m.get("bazar", {}) for op, m in measured.items()}, "stores": []}
    for i, store in enumerate(stores):
        row: dict[str, Any] = {"name": store.name, "spec": store.spec}
        for op, m in measured.items():
            if f"store-{i}" in m:
                row[op] = m[f"store-{i}"]
        res["stores"].append(row)
    return res
