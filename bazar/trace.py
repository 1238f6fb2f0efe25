"""Opt-in tracing: where one request spends its time, across Bazar's processes.

Off unless the environment variable BAZAR_TRACE names a file when the process starts.
Then every `trace(event, rid, **fields)` appends one JSON line to that file:
`{"ns": time.time_ns(), "process": "catalog-1", "pid": ..., "event": ..., "rid": ..., **fields}`.
Every process of a machine may name the same file: each line is one `write` to a
file opened with O_APPEND, so lines from different processes never mix, and the
wall clock they share puts them on one time line (`bazar-bench --only timeline`).

Off, a call costs one attribute check (and its arguments): the calls stay in the
hot paths of every process. A few are placed where a write passes (bazar.http.app,
bazar.http.client, bazar.replication.replica, bazar.replication.routes); each is one
line. This module imports nothing of Bazar, so every room of it may use it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

ENV = "BAZAR_TRACE"


class _Sink:
    """Where events go: an append-only file descriptor (None: tracing is off), and the
    name of this process in them."""

    fd: int | None = None
    process: str = f"pid-{os.getpid()}"


_sink = _Sink()


def _plain(value: Any) -> Any:
    """JSON for what json cannot write itself: bytes (paths, methods) as text, the rest by str()."""
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def trace(event: str, rid: str | None, **fields: Any) -> None:
    """Record `event` (of the request with id `rid`, if known) with `fields`; nothing when tracing is off."""
    if _sink.fd is None:
        return
    record = {"ns": time.time_ns(), "process": _sink.process, "pid": os.getpid(), "event": event, "rid": rid,
              **fields}
    os.write(_sink.fd, json.dumps(record, default=_plain).encode() + b"\n")


def identify(process: str) -> None:
    """Name this process in its events: the service and replica id ("catalog-1"), or "frontend"."""
    _sink.process = process


def enable(path: str, process: str | None = None) -> None:
    """Append events to `path` from now on (created if missing, readable by its owner only)."""
    disable()
    _sink.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    if process is not None:
        identify(process)


def disable() -> None:
    fd, _sink.fd = _sink.fd, None
    if fd is not None:
        os.close(fd)


def enabled() -> bool:
    return _sink.fd is not None


if os.environ.get(ENV):
    enable(os.environ[ENV])
