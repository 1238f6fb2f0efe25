"""JSON as Bazar writes and reads it: orjson, strict (no NaN or Infinity, UTF-8 only).
The same bytes on every replica for the same value, which the log and the request
fingerprints rely on."""

from __future__ import annotations

from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes | str) -> Any:
    """Parse JSON; NaN, Infinity and invalid UTF-8 are rejected (orjson is strict)."""
    return orjson.loads(data)
