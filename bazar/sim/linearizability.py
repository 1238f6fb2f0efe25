"""A linearizability checker for histories of `bazar.sim.history.Op`.

The search is the one of Wing and Gong (1993) with the memoization of Lowe (2017), in
the form used by Porcupine: the history becomes a doubly linked list of call and return
entries sorted by time; the checker repeatedly tries to linearize a call that precedes
the earliest pending return, and backtracks when it meets a return whose operation could
not be placed. A cache of (set of linearized ops, model state) prunes the states already
explored, which is what makes histories of thousands of operations tractable.

Histories are split by key first (P-compositionality, as in Porcupine and Knossos): a
history is linearizable iff the sub-history of every key is, so each book is checked on
its own, which keeps the bitsets short and the search small.

Operations whose outcome is unknown (no answer) return at +infinity and are optional: the
search may place them anywhere after their call, or leave them out altogether. Since such
an op never expires, every one of them multiplies the configurations to explore; two
reductions keep this in check: unknown ops that do the same thing (kind and value) are
counted rather than told apart, and a configuration that assumed more of them than an
explored one with the same linearized known ops and state is pruned. Accepting a
linearizable history stays fast even so; refuting one with many unknown ops (several
percent of a long history) must exhaust the configurations and can reach the time limit,
which yields the "timeout" verdict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from attrs import field, frozen

from bazar.sim.history import OUT_OF_STOCK, History, Op

S = TypeVar("S", bound=Hashable)

LINEARIZABLE = "linearizable"
NOT_LINEARIZABLE = "not linearizable"
TIMEOUT = "timeout"

# How many steps of the search run between two looks at the clock: often enough to stop
# within a few milliseconds of the deadline, rarely enough to cost nothing.
_CLOCK_EVERY = 1024
# How many linearized ops before the failure the explanation shows.
_EXPLAIN_TAIL = 8
# How many of the ops that could not come next it lists.
_EXPLAIN_CANDIDATES = 12


class Model(Protocol[S]):
    """A sequential specification of one key. States must be hashable (they are cached)."""

    def init(self) -> S:
        """The state before any operation."""
        ...

    def step(self, state: S, op: Op) -> tuple[bool, S]:
        """Apply `op` to `state`: (whether `op` with its outcome is legal there, new state).

        For an op of status "unknown" the output is not known and must not be checked;
        only whether it can take effect, and what it does. The result must then depend on
        the state and the op's kind and value alone: the checker treats unknown ops of the
        same kind and value as interchangeable.
        """
        ...

    def keep(self, op: Op) -> bool:
        """Whether the checker has to place `op` at all (False: it neither changed nor told anything)."""
        ...


BookState = tuple[float, int]


def _same_price(a: Any, b: float) -> bool:
    # Prices cross JSON and float arithmetic in the services; an exact comparison would
    # report rounding as a consistency bug.
    return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _same_book(output: Any, state: BookState) -> bool:
    if not isinstance(output, Mapping):
        return False
    quantity = output.get("quantity")
    return (
        _same_price(output.get("price"), state[0])
        and isinstance(quantity, int)
        and not isinstance(quantity, bool)
        and quantity == state[1]
    )


@frozen
class BookModel:
    """One book: state (price, quantity), starting from the given values.

    read: ok iff its output is the state. set_price: sets the price. restock: adds n.
    buy ok: needs quantity >= n, charges the current price, removes n.
    buy failed "out_of_stock": needs quantity < n, changes nothing.
    """

    price: float
    quantity: int

    def init(self) -> BookState:
        return (float(self.price), int(self.quantity))

    def keep(self, op: Op) -> bool:
        if op.status == "fail":
            # Only an out-of-stock refusal says something about the state; any other
            # definite failure (400, 404, ...) did nothing.
            return op.kind == "buy" and op.output == OUT_OF_STOCK
        if op.status == "unknown":
            # An unanswered read changed nothing and told nothing.
            return op.kind != "read"
        return True

    def step(self, state: BookState, op: Op) -> tuple[bool, BookState]:
        price, quantity = state
        known = op.status != "unknown"
        if op.kind == "read":
            return (not known or _same_book(op.output, state)), state
        if op.kind == "set_price":
            after = (float(op.value), quantity)
            return (not known or op.output is None or _same_book(op.output, after)), after
        if op.kind == "restock":
            after = (price, quantity + int(op.value))
            return (not known or op.output is None or _same_book(op.output, after)), after
        if op.kind == "buy":
            n = int(op.value)
            if op.status == "fail":
                return quantity < n, state
            if quantity < n:
                return False, state
            charged = op.output.get("price") if isinstance(op.output, Mapping) else None
            legal = not known or op.output is None or _same_price(charged, price)
            return legal, (price, quantity - n)
        raise ValueError(f"the book model knows no op kind {op.kind!r}")


@frozen
class Result:
    """The verdict on a history.

    `ok` is True only for "linearizable"; "timeout" means the budget ran out before a
    verdict (neither proven nor refuted). For a failure or a timeout, `key` names the key
    and `explanation` says what went wrong; `prefix` is the longest linearization found
    for that key and `unplaced` the ops none of which could come next.
    """

    ok: bool
    verdict: str
    key: str | None = None
    explanation: str = ""
    prefix: tuple[Op, ...] = ()
    unplaced: tuple[Op, ...] = ()
    per_key: Mapping[str, str] = field(factory=dict)
    steps: int = 0


# The op of the list head, which stands for no op.
_SENTINEL = Op(process=-1, kind="", key="", value=None)


class _Entry:
    """A node of the list of call and return entries, in time order."""

    __slots__ = ("index", "op", "is_call", "optional", "time", "bit", "match", "prev", "next")

    def __init__(self, index: int, op: Op, is_call: bool, optional: bool, time: float) -> None:
        self.index = index
        self.time = time
        self.op = op
        self.is_call = is_call
        self.optional = optional
        # Unused for unknown ops: those are counted by kind (see _check_key).
        self.bit = 1 << index if index >= 0 else 0
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _build_list(ops: Sequence[Op], optional: Sequence[bool]) -> _Entry:
    points: list[tuple[float, int, _Entry]] = []
    for index, op in enumerate(ops):
        call = _Entry(index, op, True, optional[index], op.call)
        ret = _Entry(index, op, False, optional[index], math.inf if optional[index] else float(op.ret or 0.0))
        call.match = ret
        points.append((call.time, 0, call))
        points.append((ret.time, 1, ret))
    # At equal times calls sort before returns: touching intervals count as concurrent,
    # since clocks of different clients cannot order them; this can only accept more.
    points.sort(key=lambda point: (point[0], point[1], point[2].index))
    head = _Entry(-1, _SENTINEL, False, False, -math.inf)
    previous = head
    for _, _, entry in points:
        previous.next = entry
        entry.prev = previous
        previous = entry
    return head


def _lift(entry: _Entry) -> None:
    # A call entry always has its return entry after it, so entry.next is set.
    assert entry.prev is not None and entry.next is not None and entry.match is not None
    entry.prev.next = entry.next
    entry.next.prev = entry.prev
    match = entry.match
    assert match.prev is not None
    match.prev.next = match.next
    if match.next is not None:
        match.next.prev = match.prev


def _unlift(entry: _Entry) -> None:
    # The exact reverse of _lift: the return entry goes back first.
    assert entry.prev is not None and entry.next is not None and entry.match is not None
    match = entry.match
    assert match.prev is not None
    match.prev.next = match
    if match.next is not None:
        match.next.prev = match
    entry.prev.next = entry
    entry.next.prev = entry


def _describe(op: Op) -> str:
    ret = "?" if op.ret is None else f"{op.ret:.6f}"
    shown = " -> unknown" if op.status == "unknown" else f" -> {op.status} {op.output!r}"
    value = "" if op.value is None else repr(op.value)
    return f"p{op.process} {op.kind}({value}){shown} [{op.call:.6f}, {ret}]"


def _prepare(ops: Iterable[Op], model: Model[Any]) -> tuple[list[Op], list[bool]]:
    kept: list[Op] = []
    for op in ops:
        if not model.keep(op):
            continue
        if op.status != "unknown" and (op.ret is None or not math.isfinite(op.ret)):
            raise ValueError(f"a completed op needs a return time: {op}")
        kept.append(op)
    required = [op for op in kept if op.status != "unknown"]
    last_return = max((float(op.ret or 0.0) for op in required), default=-math.inf)
    # An unknown op called after every known op returned could only take effect after
    # all of them, and leaving it out is always allowed: it can never matter.
    kept = [op for op in kept if op.status != "unknown" or op.call <= last_return]
    return kept, [op.status == "unknown" for op in kept]


def _kind_of(op: Op) -> Hashable:
    """What an unknown op does, which is all that tells it apart from another (see Model.step)."""
    try:
        hash(op.value)
    except TypeError:
        return (op.kind, repr(op.value))
    return (op.kind, op.value)


def _check_key(key: str, ops: Iterable[Op], model: Model[Any], deadline: float | None, max_steps: int | None) -> Result:
    history, optional = _prepare(ops, model)
    if all(optional):
        return Result(ok=True, verdict=LINEARIZABLE, key=key)
    head = _build_list(history, optional)
    # Unknown ops that do the same thing are interchangeable once called, so the search
    # counts how many of each kind it assumed rather than which. Each kind gets a run of
    # bits in `assumed`, filled from the bottom (a unary count), so that "assumed no more
    # of any kind" is a plain bitset inclusion.
    kinds: dict[Hashable, int] = {}
    kind_of: dict[int, int] = {}
    members: list[int] = []
    for index, op in enumerate(history):
        if optional[index]:
            kind = kinds.setdefault(_kind_of(op), len(kinds))
            if kind == len(members):
                members.append(0)
            members[kind] += 1
            kind_of[index] = kind
    base = [sum(members[:kind]) for kind in range(len(members))]
    counts = [0] * len(members)
    state = model.init()
    # Known ops linearized (one bit each) and unknown ops assumed to have taken effect.
    linearized = 0
    assumed = 0
    # Lowe's memo, extended for optional ops: for each (known ops placed, state), the
    # assumptions of the configurations explored. A configuration that assumed at least
    # as much of every kind has the same future with fewer ops left to choose from, so it
    # can only fail where the other failed or is still being explored.
    cache: dict[tuple[int, Any], list[int]] = {}
    calls: list[tuple[_Entry, Any, int]] = []
    # Each configuration tries the known ops first, then the unknown ones: assuming less
    # is explored first, which lets the memo prune the larger assumptions later.
    trying_unknown = False
    # The dead end that got furthest: latest blocking return, then most ops placed. Every
    # branch must place the culprit before its return, so the branch that reaches it
    # names it; the longest prefix alone may be a wrong turn that got stuck earlier.
    best: list[int] = []
    reach = (-math.inf, 0, -1)
    steps = 0
    entry = head.next
    while entry is not None:
        if (max_steps is not None and steps >= max_steps) or (
            deadline is not None and steps % _CLOCK_EVERY == 0 and time.monotonic() > deadline
        ):
            if len(calls) > len(best):
                best = [e.index for e, _, _ in calls]
            return _timed_out(key, history, best, steps)
        steps += 1
        if entry.is_call:
            if entry.optional is trying_unknown:
                legal, after = model.step(state, entry.op)
                if legal:
                    if trying_unknown:
                        kind = kind_of[entry.index]
                        bit = 1 << (base[kind] + counts[kind])
                        placed, assuming = linearized, assumed | bit
                    else:
                        bit = entry.bit
                        placed, assuming = linearized | bit, assumed
                    seen = cache.get((placed, after))
                    if seen is None:
                        cache[(placed, after)] = [assuming]
                    elif any(other & ~assuming == 0 for other in seen):
                        entry = entry.next
                        continue
                    else:
                        seen.append(assuming)
                    if trying_unknown:
                        counts[kind] += 1
                    calls.append((entry, state, bit))
                    state = after
                    linearized, assumed = placed, assuming
                    _lift(entry)
                    trying_unknown = False
                    entry = head.next
                    continue
            entry = entry.next
            continue
        if not trying_unknown:
            if entry.optional:
                # Returns of unknown ops sort last, so every known op is placed: the
                # unknown ops still listed are the ones that never took effect.
                return Result(ok=True, verdict=LINEARIZABLE, key=key, steps=steps)
            trying_unknown = True
            entry = head.next
            continue
        # The earliest pending return: its op could not be placed after what is
        # linearized, so undo the last choice. A snapshot is taken only at dead ends, so
        # that a search that never backtracks copies nothing.
        # Fewer unknown ops assumed first: the search tries them at every dead end, and
        # such guesses would only clutter the explanation.
        if (entry.time, -sum(counts), len(calls)) > reach:
            reach = (entry.time, -sum(counts), len(calls))
            best = [e.index for e, _, _ in calls]
        if not calls:
            return _refuted(key, history, optional, model, best, steps)
        entry, state, bit = calls.pop()
        if entry.optional:
            assumed ^= bit
            counts[kind_of[entry.index]] -= 1
        else:
            linearized ^= bit
        trying_unknown = entry.optional
        _unlift(entry)
        entry = entry.next
    return Result(ok=True, verdict=LINEARIZABLE, key=key, steps=steps)


def _replay(history: Sequence[Op], model: Model[Any], order: Sequence[int]) -> tuple[Any, list[str]]:
    state = model.init()
    lines = []
    for index in order:
        _, state = model.step(state, history[index])
        lines.append(f"  {_describe(history[index])}  => {state!r}")
    return state, lines


def _refuted(
    key: str, history: Sequence[Op], optional: Sequence[bool], model: Model[Any], best: Sequence[int], steps: int
) -> Result:
    state, lines = _replay(history, model, best)
    placed = set(best)
    rest = [i for i in range(len(history)) if i not in placed]
    blocking = min((i for i in rest if not optional[i]), key=lambda i: float(history[i].ret or 0.0))
    deadline = float(history[blocking].ret or 0.0)
    # The blocking op first, then the other known ops, then the unknown ones.
    candidates = sorted((i for i in rest if history[i].call <= deadline), key=lambda i: (i != blocking, optional[i], i))
    why = []
    for i in candidates[:_EXPLAIN_CANDIDATES]:
        legal, _ = model.step(state, history[i])
        verdict = "leads to no linearization" if legal else "illegal in this state"
        mark = "  <- must precede every later op" if i == blocking else ""
        why.append(f"  {_describe(history[i])}: {verdict}{mark}")
    shown = lines[-_EXPLAIN_TAIL:]
    skipped = len(lines) - len(shown)
    text = "\n".join(
        [
            f"key {key} is not linearizable ({len(history)} ops, {steps} search steps).",
            f"Longest linearizable prefix (of those reaching furthest in time): {len(best)} ops, "
            f"starting from {model.init()!r}" + (f" (first {skipped} not shown):" if skipped else ":"),
            *shown,
            f"State after it: {state!r}. No op can come next:",
            *why,
            *([f"  ... and {len(candidates) - len(why)} more"] if len(candidates) > len(why) else []),
        ]
    )
    return Result(
        ok=False,
        verdict=NOT_LINEARIZABLE,
        key=key,
        explanation=text,
        prefix=tuple(history[i] for i in best),
        unplaced=tuple(history[i] for i in candidates),
        steps=steps,
    )


def _timed_out(key: str, history: Sequence[Op], best: Sequence[int], steps: int) -> Result:
    text = (
        f"key {key}: gave up after {steps} search steps; the longest linearizable prefix found "
        f"has {len(best)} of {len(history)} ops. Neither proven nor refuted."
    )
    return Result(
        ok=False,
        verdict=TIMEOUT,
        key=key,
        explanation=text,
        prefix=tuple(history[i] for i in best),
        steps=steps,
    )


def check(
    history: Iterable[Op] | History,
    models: Callable[[str], Model[Any]] | Mapping[str, Model[Any]],
    *,
    time_limit: float | None = 60.0,
    max_steps: int | None = None,
) -> Result:
    """Decide whether `history` is linearizable, key by key.

    `models` gives each key its model (a mapping, or a function of the key).
    `time_limit` (seconds, for the whole check) and `max_steps` (search steps, per key)
    bound the work: past them the verdict is "timeout" rather than a hang.
    Every key is checked; the result names the first key (in sorted order) that is not
    linearizable, else the first that timed out, and `per_key` has every verdict.
    """
    ops = history.ops if isinstance(history, History) else list(history)
    groups: dict[str, list[Op]] = {}
    for op in ops:
        groups.setdefault(op.key, []).append(op)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    results: dict[str, Result] = {}
    for key in sorted(groups):
        if isinstance(models, Mapping):
            if key not in models:
                raise ValueError(f"no model for key {key!r}")
            model = models[key]
        else:
            model = models(key)
        results[key] = _check_key(key, groups[key], model, deadline, max_steps)
    per_key = {key: result.verdict for key, result in results.items()}
    steps = sum(result.steps for result in results.values())
    for verdict in (NOT_LINEARIZABLE, TIMEOUT):
        for result in results.values():
            if result.verdict == verdict:
                return Result(
                    ok=False,
                    verdict=verdict,
                    key=result.key,
                    explanation=result.explanation,
                    prefix=result.prefix,
                    unplaced=result.unplaced,
                    per_key=per_key,
                    steps=steps,
                )
    return Result(ok=True, verdict=LINEARIZABLE, per_key=per_key, steps=steps)
