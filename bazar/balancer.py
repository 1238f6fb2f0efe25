"""The replicas of one service as seen by a client (the front end, or the order
service calling the catalog): health-checked, read round robin over the live ones,
writes to the current primary, retried across a failover."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from typing import Any, Callable

from attrs import define, field
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, TimeoutError, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from bazar.errors import Unavailable
from bazar.http.client import Unreachable, call, call_early, error_of
from bazar.messages import MIN_SEQ_HEADER, SEQ_HEADER, WRITE_PATH
from bazar.replication.store import Outcome
from bazar.settings import ClientTiming

log = Logger()

RETRYABLE = (502, 503, 504)


class Busy(Exception):
    """Every slot of a replica is taken (and waiting was not wanted, or took too long)."""


@define
class ReplicaState:
    url: str
    alive: bool = False
    ok: bool = False
    primary: bool = False
    epoch: int = 0
    last_seq: int = 0
    # the replica's last /health answer, for the cluster page (kept while it is down)
    health: dict[str, Any] = field(factory=dict, repr=False, eq=False)
    # Requests in flight to this replica: one that stops answering promptly gets at
    # most this many waiting on it (connections, memory, sockets), while the others
    # keep serving.
    slots: DeferredSemaphore = field(factory=lambda: DeferredSemaphore(ClientTiming().max_in_flight),
                                     repr=False, eq=False)


class ReplicaSet:
    def __init__(self, service: str, urls: list[str] | tuple[str, ...], http: HTTPClient, clock: IReactorTime,
                 secret: str | None, timing: ClientTiming = ClientTiming()):
        self.service = service
        self.timing = timing
        self.replicas = [ReplicaState(url, slots=DeferredSemaphore(timing.max_in_flight)) for url in urls]
        self.http = http
        self.clock = clock
        self.secret = secret
        self._turn = count()
        self.listeners: list[Callable[[ReplicaState | None], None]] = []

    # -- health ---------------------------------------------------------------
    async def poll(self) -> None:
        await DeferredList([ensureDeferred(self._check(r)) for r in self.replicas], consumeErrors=True)
        primary = self.primary_state()
        for listener in self.listeners:
            listener(primary)

    async def _check(self, replica: ReplicaState) -> None:
        try:
            # a healthy replica answers in milliseconds; a paused one must not hold up a
            # write that is looking for the new primary
            status, health, _ = await call(self.http, self.clock, "GET", replica.url + "/health",
                                           timeout=self.timing.health_timeout)
        except Unreachable:
            replica.alive = replica.ok = replica.primary = False
            return
        if status != 200 or not isinstance(health, dict):
            replica.alive = replica.ok = replica.primary = False
            return
        replica.alive = True
        replica.health = health
        replica.ok = health.get("status") == "ok"
        replica.primary = health.get("role") == "primary"
        replica.epoch = int(health.get("epoch", 0))
        replica.last_seq = int(health.get("last_seq", 0))

    def high_water(self) -> int:
        return max((r.last_seq for r in self.replicas if r.ok), default=0)

    def primary_state(self) -> ReplicaState | None:
        primaries = [r for r in self.replicas if r.primary and r.alive]
        return max(primaries, key=lambda r: r.epoch) if primaries else None

    async def _call(self, replica: ReplicaState, method: str, path: str, *, timeout: float, wait: bool = True,
                    caller: Callable[..., Any] | None = None, **kw: Any) -> tuple[int, Any, Any]:
        """`call` within the replica's slots (`ClientTiming.max_in_flight`). Uncontended this is one
        acquire and one release; a full replica raises Busy at once (not `wait`) or
        after waiting, the wait counting against `timeout`."""
        slots = replica.slots
        if not slots.tokens and not wait:
            raise Busy(replica.url)
        acquired = slots.acquire()
        if not acquired.called:
            started = self.clock.seconds()
            acquired.addTimeout(timeout, self.clock)
            try:
                await acquired
            except TimeoutError:
                raise Busy(replica.url) from None
            timeout = max(timeout - (self.clock.seconds() - started), 0.001)
        try:
            if caller is not None:  # (call_early: its own method)
                return await caller(self.http, self.clock, replica.url + path, timeout=timeout, **kw)  # type: ignore[no-any-return]
            return await call(self.http, self.clock, method, replica.url + path, timeout=timeout, **kw)
        finally:
            slots.release()

    # -- reads ----------------------------------------------------------------
    def read_order(self, min_seq: int = 0) -> list[ReplicaState]:
        """Live replicas in round-robin order; replicas not known live come last. A read
        of a state newer than any replica was last seen at (a read after a write) asks
        the primary first: it applies a write before the backups hear that it is
        committed."""
        n = len(self.replicas)
        start = next(self._turn) % n
        ordered = self.replicas[start:] + self.replicas[:start]
        live = [r for r in ordered if r.ok]
        if min_seq > max((r.last_seq for r in live), default=min_seq):
            live.sort(key=lambda r: not r.primary)
        return live + [r for r in ordered if not r.ok]

    async def read(self, path: str, min_seq: int = 0,
                   headers: dict[bytes, bytes] | None = None) -> tuple[int, bytes, int]:
        """GET `path` from a live replica whose state is at least `min_seq`:
        (status, raw body, the replica's seq). No replica may be able to answer for a
        moment (the backups learn of a commit with the next heartbeat, a primary
        renews its lease, a new one is being elected): the read is tried again, a few
        milliseconds later, until the read budget is spent."""
        deadline = self.clock.seconds() + self.timing.read_budget
        attempt = 0
        while True:
            answer = await self._read_once(path, min_seq, headers)
            if answer is not None:
                return answer
            attempt += 1
            if self.clock.seconds() >= deadline:
                raise Unavailable(f"no {self.service} replica is available; retry shortly")
            await deferLater(self.clock, min(0.01 * attempt, 0.1))

    async def _read_once(self, path: str, min_seq: int,
                         headers: dict[bytes, bytes] | None) -> tuple[int, bytes, int] | None:
        """One round over the replicas. A replica that refuses the connection is
        skipped and the read tried on the next one; a replica with every slot taken is
        passed over, and waited for only when no other one could answer."""
        busy: list[ReplicaState] = []

        def attempts() -> Iterator[tuple[ReplicaState, bool]]:
            for replica in self.read_order(min_seq):
                yield replica, False
            if busy:  # no other replica could answer: wait for a slot on a saturated one
                yield busy[0], True

        for replica, wait in attempts():
            # A replica not known to be caught up must at least be as new as the
            # newest state seen on the healthy ones.
            floor = min_seq if replica.ok else max(min_seq, self.high_water())
            # the replica refuses (503) at once when it is older than that, rather than
            # build an answer (a whole catalogue, maybe) that would be dropped here
            asked = {**(headers or {}), MIN_SEQ_HEADER: b"%d" % floor} if floor else headers
            try:
                status, body, hdrs = await self._call(replica, "GET", path, headers=asked,
                                                      timeout=self.timing.timeout, parse=False, wait=wait)
            except Busy:
                busy.append(replica)
                continue
            except Unreachable:
                replica.alive = replica.ok = False
                continue
            seq_header = hdrs.getRawHeaders(SEQ_HEADER)
            seq = int(seq_header[0]) if seq_header and seq_header[0].isdigit() else 0
            if status in RETRYABLE or seq < floor:
                continue
            return status, body, seq
        return None

    # -- writes ---------------------------------------------------------------
    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST to the primary (or, not knowing it, any live replica, which forwards),
        retrying through a failover until the write budget is spent. Only for
        requests that are idempotent by their request id."""
        deadline = self.clock.seconds() + self.timing.write_budget
        attempt = 0
        tried: set[str] = set()  # replicas that could not take the write since the last health check
        polling: Any = None
        while True:
            target = self.primary_state() or self._another(tried)
            if target is not None:
                try:
                    # a primary that does not answer within one attempt may be paused or cut off: ask again
                    # (the request is idempotent), maybe elsewhere, rather than wait out the whole budget
                    left = max(deadline - self.clock.seconds(), 0.001)
                    status, parsed, _ = await self._call(target, "POST", path, body=body, secret=self.secret,
                                                         timeout=min(left, self.timing.attempt))
                    if status not in RETRYABLE:
                        return status, parsed
                    # it cannot take writes now (not primary any more, or no primary known to it):
                    # any other replica forwards to the primary it knows
                    target.primary = False
                    tried.add(target.url)
                except Busy:
                    pass  # the primary is saturated: retry until the budget is spent
                except Unreachable:
                    target.alive = target.ok = target.primary = False
                    tried.add(target.url)
            attempt += 1
            if self.clock.seconds() >= deadline:
                raise Unavailable(f"the {self.service} service has no reachable primary; retry shortly")
            if polling is None or polling.called:
                # the health check runs alongside: one replica that does not answer must not hold up the next try
                polling = ensureDeferred(self.poll())
                polling.addCallback(lambda _: tried.clear())
            await deferLater(self.clock, min(0.05 * attempt, 0.15))  # a new primary is used within 0.15 s

    def _another(self, tried: set[str]) -> ReplicaState | None:
        """A live replica not yet tried (any replica forwards a write to its primary)."""
        candidates = [r for r in self.read_order() if r.alive and r.url not in tried]
        return candidates[0] if candidates else next((r for r in self.read_order() if r.alive), None)

    async def write(self, op: dict[str, Any]) -> Outcome:
        status, parsed = await self.post(WRITE_PATH, {"op": op})
        if status != 200:
            raise error_of(status, parsed)
        return Outcome.from_json(parsed)

    async def write_early(self, op: dict[str, Any]) -> tuple[Outcome, Deferred[Outcome] | None]:
        """`write`, but with the outcome as soon as the primary has applied it: (the
        outcome, a Deferred that fires with it once the write is acknowledged), or
        (the outcome, None) when it came acknowledged already. Committed is durable
        (a majority has it), so the caller may build on the outcome at once; it
        acknowledges nothing to its own client before the Deferred fires. One early
        attempt, at the primary known; anything else (no primary known, no answer,
        not primary any more, an acknowledgement that does not come) is `write`,
        the same request id again: a retry, answered from the write's recorded
        outcome if it was applied."""
        target = self.primary_state()
        if target is not None:
            try:
                status, parsed, rest = await self._call(target, "POST", WRITE_PATH, caller=call_early,
                                                        body={"op": op, "early": True}, secret=self.secret,
                                                        timeout=self.timing.attempt)
            except Busy:
                pass
            except Unreachable:
                target.alive = target.ok = target.primary = False
            else:
                if status == 200:
                    outcome = Outcome.from_json(parsed)
                    if rest is None:
                        return outcome, None
                    return outcome, ensureDeferred(self._acknowledged(op, outcome, rest))
                if status not in RETRYABLE:
                    raise error_of(status, parsed)
                target.primary = False
        return await self.write(op), None

    async def _acknowledged(self, op: dict[str, Any], outcome: Outcome, rest: Deferred[Any]) -> Outcome:
        try:
            last = await rest
        except Unreachable:
            last = None
        if isinstance(last, dict) and last.get("acknowledged") is True:
            return outcome
        return await self.write(op)
