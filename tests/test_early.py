"""A write answered in two parts (bazar.replication.routes.early_write, read by
bazar.http.client.call_early): the outcome as soon as the primary has applied it, then
its acknowledgement — over real HTTP framing (StubTreq: Twisted's client and server
protocols on an in-memory transport), the replica's part played by a test double whose
`submit` the test drives step by step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from bazar.balancer import ReplicaSet
from bazar.errors import Conflict, NotFound, Unavailable
from bazar.http.app import JsonApp
from bazar.http.client import Unreachable, call_early
from bazar.messages import WRITE_PATH
from bazar.replication.routes import early_write
from bazar.replication.store import Outcome
from bazar.testing.memory import SECRET, Cluster, restock, url_of

URL = "http://replica" + WRITE_PATH
SOLD = Outcome({"sale": {"key": "k"}}, 7, ("book:1",), True)
REFUSED = Outcome({"error": "only 0 left"}, 8, (), True, failed="OutOfStock")


class Writes:
    """The replica's `submit`, as far as `early_write` uses it: each write waits until
    the test says what happened to it."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[Outcome], None] | None, Deferred[Outcome]]] = []

    async def submit(self, op: dict[str, Any], hops: int = 0,
                     early: Callable[[Outcome], None] | None = None) -> Outcome:
        d: Deferred[Outcome] = Deferred()
        self.pending.append((early, d))
        return await d

    def applied(self, outcome: Outcome) -> None:
        early, _ = self.pending[-1]
        assert early is not None
        early(outcome)

    def acknowledged(self, outcome: Outcome) -> None:
        self.pending[-1][1].callback(outcome)

    def failed(self, error: Exception) -> None:
        self.pending[-1][1].errback(error)


class Client:
    """StubTreq as `call_early` calls a client (StubTreq takes bytes, not a producer)."""

    def __init__(self, stub: StubTreq):
        self.stub = stub

    def request(self, method: str, url: str, *, data: Any, headers: Any) -> Any:
        return self.stub.request(method, url, data=data.body, headers=headers)

    def flush(self) -> None:
        self.stub.flush()


@pytest.fixture
def setup() -> tuple[Writes, Client, Clock]:
    writes = Writes()
    api = JsonApp("test")

    @api.rpc(WRITE_PATH, "POST", "write")
    async def write(request: Any) -> Any:
        return await early_write(request, writes, {"rid": "r", "op": "sell"}, 0)  # type: ignore[arg-type]

    return writes, Client(StubTreq(api.resource())), Clock()


def started(stub: Client, clock: Clock) -> Deferred[Any]:
    http: Any = stub
    d = ensureDeferred(call_early(http, clock, URL, body={"op": {}, "early": True}, secret=None, timeout=1.0))
    stub.flush()
    return d


def applied_early(writes: Writes, stub: Client, clock: Clock) -> Deferred[Any]:
    """A write whose outcome was sent as applied: the Deferred of its second part."""
    d = started(stub, clock)
    writes.applied(SOLD)
    stub.flush()
    status, first, second = fired(d)
    assert status == 200 and Outcome.from_json(first) == SOLD
    return second  # type: ignore[no-any-return]


def fired(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def test_the_outcome_comes_when_applied_and_the_acknowledgement_after(setup: Any) -> None:
    writes, stub, clock = setup
    d = started(stub, clock)
    assert not d.called  # nothing applied yet: nothing said
    writes.applied(SOLD)
    stub.flush()
    status, first, second = fired(d)
    assert status == 200 and Outcome.from_json(first) == SOLD
    assert second is not None and not second.called  # not acknowledged yet
    writes.acknowledged(SOLD)
    stub.flush()
    assert fired(second) == {"acknowledged": True}


def test_a_write_that_fails_after_its_outcome_says_so_in_its_second_part(setup: Any) -> None:
    writes, stub, clock = setup
    second = applied_early(writes, stub, clock)
    writes.failed(Unavailable("the catalog primary stepped down during the write; retry"))
    stub.flush()
    assert fired(second) == {"error": "the catalog primary stepped down during the write; retry", "status": 503}


def test_a_refusal_is_answered_once_acknowledged_in_one_piece(setup: Any) -> None:
    writes, stub, clock = setup
    d = started(stub, clock)
    writes.applied(REFUSED)
    stub.flush()
    assert not d.called  # a refusal is not sent early
    writes.failed(Conflict("only 0 left"))
    stub.flush()
    assert fired(d) == (409, {"error": "only 0 left"}, None)


@pytest.mark.parametrize("end", ["acknowledged", "failed"])
def test_a_write_that_ends_before_it_is_applied_here_is_answered_in_one_piece(setup: Any, end: str) -> None:
    """(Forwarded to the primary, or failed before its entry was applied here.)"""
    writes, stub, clock = setup
    d = started(stub, clock)
    if end == "acknowledged":
        writes.acknowledged(SOLD)
        stub.flush()
        status, parsed, second = fired(d)
        assert (status, Outcome.from_json(parsed), second) == (200, SOLD, None)
    else:
        writes.failed(Unavailable("no catalog primary is known yet; retry"))
        stub.flush()
        assert fired(d) == (503, {"error": "no catalog primary is known yet; retry"}, None)


def test_a_second_part_that_does_not_come_in_time_fails_as_unreachable(setup: Any) -> None:
    writes, stub, clock = setup
    second = applied_early(writes, stub, clock)
    clock.advance(1.5)
    with pytest.raises(Unreachable):
        fired(second)


def test_a_first_part_that_does_not_come_in_time_is_unreachable(setup: Any) -> None:
    _, stub, clock = setup
    d = started(stub, clock)
    clock.advance(1.5)
    with pytest.raises(Unreachable):
        fired(d)


# -- over the simulation's network, between real replicas --------------------------------

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path), 3)
    yield c
    c.close()


def test_an_early_write_reaches_its_caller_in_two_parts_over_the_simulated_network(cluster: Cluster) -> None:
    """The first part (applied by the primary) while a backup has not applied the
    write; the second once the acknowledgement rule allows it."""
    primary = cluster.elect()
    cluster.run(0.5)
    slow = next(i for i in cluster.ids if i != primary.replica_id)
    cluster.network.hold(cluster.port(slow))  # its answers to the primary wait
    d = ensureDeferred(call_early(cluster.network.client(), cluster.clock,
                                  url_of(cluster.port(primary.replica_id)) + WRITE_PATH,
                                  body={"op": restock(1, 5), "early": True}, secret=SECRET))
    cluster.until(lambda: d.called, step=0.001)
    status, first, second = fired(d)
    assert status == 200 and first["result"]["quantity"] == 65 and second is not None
    assert not second.called and cluster[slow].store.applied < first["seq"]
    cluster.network.release(cluster.port(slow))
    cluster.until(lambda: second.called)
    assert fired(second) == {"acknowledged": True}
    assert all(cluster[i].store.applied >= first["seq"] for i in cluster.ids)


def test_an_early_write_whose_primary_dies_before_the_acknowledgement_is_acknowledged_by_the_next(
        cluster: Cluster) -> None:
    """`ReplicaSet.write_early`: the outcome when applied; the primary dies before its
    backups' apply answers come; the acknowledgement comes from the next primary, for
    the same entry (the sale sent again, answered from its recorded outcome)."""
    primary = cluster.elect()
    cluster.run(0.5)
    replicas = ReplicaSet("catalog", [url_of(cluster.port(i)) for i in cluster.ids], cluster.network.client(),
                          cluster.clock, SECRET)
    cluster.do(replicas.poll())
    slow = next(i for i in cluster.ids if i != primary.replica_id)
    cluster.network.hold(cluster.port(slow))
    box: list[Any] = []
    ensureDeferred(replicas.write_early(restock(1, 3))).addBoth(box.append)
    cluster.until(lambda: bool(box), step=0.001)
    outcome, acknowledged = box[0]
    assert outcome.result["quantity"] == 63 and acknowledged is not None and not acknowledged.called
    cluster.kill(primary.replica_id)
    cluster.network.release(cluster.port(slow))
    again = cluster.wait(acknowledged)
    assert (again.seq, again.result) == (outcome.seq, outcome.result)
    assert len(cluster.primaries()) == 1 and cluster.primary().replica_id != primary.replica_id
    assert all(quantity == 63 for quantity in (cluster[i].store.db.execute(
        "SELECT quantity FROM books WHERE id = 1").fetchone()[0] for i in sorted(cluster.alive)))


def test_a_refused_early_write_is_refused_like_a_plain_one(cluster: Cluster) -> None:
    cluster.elect()
    replicas = ReplicaSet("catalog", [url_of(cluster.port(i)) for i in cluster.ids], cluster.network.client(),
                          cluster.clock, SECRET)
    cluster.do(replicas.poll())
    with pytest.raises(NotFound):
        cluster.do(replicas.write_early(restock(999, 1)))
