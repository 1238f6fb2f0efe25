"""bazar.balancer: reads from the replicas of one service, as the front end makes them."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.web.http_headers import Headers

from bazar import balancer
from bazar.errors import Unavailable
from bazar.settings import ClientTiming


def replicas_answering(monkeypatch: pytest.MonkeyPatch, clock: task.Clock,
                       answer: Any) -> balancer.ReplicaSet:
    """Two live replicas whose GETs `answer(url)` gives: (status, seq)."""
    async def fake_call(http: Any, clk: Any, method: str, url: str, **kw: Any) -> tuple[int, Any, Any]:
        status, seq = answer(url)
        return status, b"{}", Headers({b"X-Bazar-Seq": [str(seq).encode()]})

    monkeypatch.setattr(balancer, "call", fake_call)
    replicas = balancer.ReplicaSet("catalog", ["http://a", "http://b"], http=None, clock=clock,  # type: ignore[arg-type]
                                   secret=None, timing=ClientTiming(read_budget=2.0))
    for r in replicas.replicas:
        r.alive = r.ok = True
    return replicas


def test_a_read_waits_for_a_replica_to_reach_its_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """No replica holds the write the reader must see yet (the backups learn of the
    commit with the next heartbeat, the primary is between two lease rounds): the read
    is tried again a moment later instead of failing at once."""
    clock = task.Clock()
    def answer(url: str) -> tuple[int, int]:  # a cannot serve; b catches up, 10 entries a second
        return (503, 0) if url.startswith("http://a") else (200, 6 + int(clock.seconds() * 10))

    replicas = replicas_answering(monkeypatch, clock, answer)
    d = defer.ensureDeferred(replicas.read("/books/1", min_seq=9))
    assert not d.called  # b is at 6 and a cannot serve
    for _ in range(40):
        clock.advance(0.01)
    status, _, seq = d.result
    assert status == 200 and seq >= 9 and clock.seconds() < 1.0


def test_a_read_no_replica_can_serve_is_503_once_its_budget_is_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = task.Clock()
    replicas = replicas_answering(monkeypatch, clock, lambda url: (503, 0))
    d = defer.ensureDeferred(replicas.read("/books/1"))
    failures: list[Any] = []
    d.addErrback(failures.append)
    clock.pump([0.05] * 39)
    assert not failures  # still trying within the budget (2 s)
    clock.pump([0.05] * 4)
    assert len(failures) == 1 and isinstance(failures[0].value, Unavailable)
