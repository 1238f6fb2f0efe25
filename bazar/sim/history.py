"""A history of client operations, as the clients saw them, for the linearizability checker.

Every operation is recorded at invocation with `History.invoke` and completed with `ok`
(the answer is known and the operation took effect), `fail` (a definite refusal that did
not take effect) or `unknown` (no answer: timeout, dropped connection, crash). An
operation that is never completed stays "unknown" with no return time: the checker then
lets it take effect at any moment after its call, or never.

Op kinds of the book model (key "book:<id>"):

- "read":      value None;  output {"price": float, "quantity": int}
- "set_price": value price; output the book after it, {"price", "quantity"}
- "restock":   value n;     output the book after it, {"price", "quantity"}
- "buy":       value n;     ok output {"price": price charged per copy};
                            fail output "out_of_stock" (HTTP 409)

Other definite failures (400, 404, ...) changed nothing and carry no information the
model checks, so the checker drops them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from attrs import define, evolve, field, frozen

STATUSES = ("ok", "fail", "unknown")
KINDS = ("read", "set_price", "restock", "buy")
OUT_OF_STOCK = "out_of_stock"


@frozen
class Op:
    """One operation of one client.

    `ret` is None when no answer came back: the outcome is unknown, so the operation may
    have taken effect at any time after `call`, or never.
    """

    process: int
    kind: str
    key: str
    value: Any
    output: Any = None
    call: float = 0.0
    ret: float | None = None
    status: str = "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "process": self.process,
            "kind": self.kind,
            "key": self.key,
            "value": self.value,
            "output": self.output,
            "call": self.call,
            "ret": self.ret,
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Op:
        status = data.get("status", "unknown")
        if status not in STATUSES:
            raise ValueError(f"bad status {status!r}")
        ret = data.get("ret")
        return cls(
            process=int(data["process"]),
            kind=str(data["kind"]),
            key=str(data["key"]),
            value=data.get("value"),
            output=data.get("output"),
            call=float(data["call"]),
            ret=None if ret is None else float(ret),
            status=status,
        )


def book_key(book_id: int) -> str:
    """The partition key of a book: each book is checked on its own."""
    return f"book:{book_id}"


@define
class History:
    """The operations of all clients, in invocation order; a handle is an index into `ops`."""

    ops: list[Op] = field(factory=list)
    # Handles already completed: completing one twice is a bug in the client driver.
    _closed: set[int] = field(factory=set, init=False, repr=False, eq=False)

    def invoke(self, process: int, kind: str, key: str, value: Any, now: float) -> int:
        self.ops.append(Op(process=process, kind=kind, key=key, value=value, call=now))
        return len(self.ops) - 1

    def ok(self, handle: int, output: Any, now: float) -> Op:
        return self._complete(handle, "ok", output, now)

    def fail(self, handle: int, output: Any, now: float) -> Op:
        return self._complete(handle, "fail", output, now)

    def unknown(self, handle: int) -> Op:
        """No answer came back: the operation may or may not have taken effect."""
        op = self._pending(handle)
        # Already "unknown" with no return time: recorded explicitly only to catch a
        # second completion of the same handle.
        done = evolve(op, status="unknown", ret=None)
        self.ops[handle] = done
        self._closed.add(handle)
        return done

    def _pending(self, handle: int) -> Op:
        if handle in self._closed:
            raise ValueError(f"operation {handle} was already completed")
        return self.ops[handle]

    def _complete(self, handle: int, status: str, output: Any, now: float) -> Op:
        op = self._pending(handle)
        if now < op.call:
            raise ValueError(f"operation {handle} returns at {now} before its call at {op.call}")
        done = evolve(op, status=status, output=output, ret=now)
        self.ops[handle] = done
        self._closed.add(handle)
        return done

    def by_key(self) -> dict[str, list[Op]]:
        groups: dict[str, list[Op]] = {}
        for op in self.ops:
            groups.setdefault(op.key, []).append(op)
        return groups

    def to_json(self) -> str:
        # One op a line, so that a saved failing history diffs and greps well.
        lines = ",\n".join(json.dumps(op.to_dict(), sort_keys=True) for op in self.ops)
        return '{"ops": [\n' + lines + "\n]}\n"

    @classmethod
    def from_json(cls, text: str) -> History:
        data = json.loads(text)
        return cls.from_ops(Op.from_dict(item) for item in data["ops"])

    @classmethod
    def from_ops(cls, ops: Iterable[Op]) -> History:
        history = cls(list(ops))
        # A loaded history is finished: every op counts as completed.
        history._closed = set(range(len(history.ops)))
        return history
