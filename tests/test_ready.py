"""GET /ready, in memory: a replica is ready while it may serve reads (caught up with
a primary it hears from); a front end while every service has a primary it knows of
and its invalidation channel, when it has one, is subscribed. Orchestrators rely on
it (deploy/k8s: readiness probes, the PodDisruptionBudgets)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bazar.replication.replica import OK
from bazar.testing.memory import CATALOG_PORT, ORDER_PORT, Cluster, Response, Shop, restock, url_of


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    random.seed(4321)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path), 3)
    yield c
    c.close()


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    s = Shop(str(tmp_path))
    yield s
    s.close()


def ready(driver: Any, port: int) -> Response:
    return driver.http("GET", url_of(port) + "/ready")  # type: ignore[no-any-return]


def not_ready(r: Response) -> str:
    """A 503 as DESIGN.md has it: JSON {"error": reason}, with Retry-After."""
    assert r.code == 503, r
    assert r.header("Content-Type") == "application/json"
    assert r.header("Retry-After") == "1"
    body = r.json()
    assert set(body) == {"error"} and body["error"]
    return str(body["error"])


def settle(c: Cluster) -> None:
    c.until(lambda: len({c[i].store.applied for i in c.alive}) == 1 and all(c[i].status == OK for i in c.alive))


# -- replicas --------------------------------------------------------------------------------

def test_every_replica_of_a_healthy_group_is_ready(cluster: Cluster) -> None:
    primary = cluster.elect()
    cluster.submit(restock(1, 2))
    settle(cluster)
    for i in (1, 2, 3):
        r = ready(cluster, cluster.port(i))
        assert r.code == 200, r
        body = r.json()
        assert body["ready"] is True and body["service"] == "catalog" and body["replica"] == i
        assert body["role"] == ("primary" if i == primary.replica_id else "backup")
        assert body["leader"] == primary.replica_id and body["last_seq"] == primary.store.applied


def test_a_replica_cut_off_from_the_others_is_not_ready_until_it_hears_a_primary_again(cluster: Cluster) -> None:
    primary = cluster.elect()
    settle(cluster)
    lonely = next(i for i in (1, 2, 3) if i != primary.replica_id)
    for other in (1, 2, 3):
        if other != lonely:
            cluster.network.cut(cluster.port(lonely), cluster.port(other))
    cluster.run(1.5)  # more than an election timeout without a word from the primary
    reason = not_ready(ready(cluster, cluster.port(lonely)))
    assert reason.startswith(f"catalog replica {lonely}: ")
    assert "no primary known" in reason or "not caught up with a primary" in reason
    assert ready(cluster, cluster.port(primary.replica_id)).code == 200  # the majority side serves on
    cluster.network.heal()
    cluster.until(lambda: ready(cluster, cluster.port(lonely)).code == 200, limit=5.0)


def test_a_cut_off_primary_is_not_ready_once_its_lease_is_gone(cluster: Cluster) -> None:
    old = cluster.elect()
    settle(cluster)
    for other in (1, 2, 3):
        if other != old.replica_id:
            cluster.network.cut(cluster.port(old.replica_id), cluster.port(other))
    cluster.run(1.5)
    not_ready(ready(cluster, cluster.port(old.replica_id)))
    others = [i for i in (1, 2, 3) if i != old.replica_id]
    cluster.until(lambda: any(cluster[i].is_primary for i in others))
    new = next(i for i in others if cluster[i].is_primary)
    cluster.until(lambda: ready(cluster, cluster.port(new)).code == 200, limit=3.0)


def test_a_fresh_replica_is_not_ready_until_it_has_caught_up(cluster: Cluster) -> None:
    primary = cluster.elect()
    for book in range(7):
        cluster.submit(restock(book, book + 1))
    settle(cluster)
    committed = primary.store.applied
    wiped_id = next(i for i in (1, 2, 3) if i != primary.replica_id)
    wiped = cluster.restart(wiped_id, fresh=True)
    reason = not_ready(ready(cluster, cluster.port(wiped_id)))
    assert "no primary known" in reason or "not caught up with a primary" in reason
    answers = []
    for _ in range(100):
        r = ready(cluster, cluster.port(wiped_id))
        answers.append((r.code, wiped.store.applied))
        if r.code == 200:
            break
        not_ready(r)
    assert answers[-1][0] == 200, answers
    # never ready before it held everything committed before it came back
    assert all(applied >= committed for code, applied in answers if code == 200)
    assert cluster.tables(wiped_id) == cluster.tables(primary.replica_id)


def test_a_replica_alone_knows_no_primary(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path), 3, start=False)
    try:
        c.start(1)
        c.run(3.0)  # alone it cannot win an election
        assert "no primary known" in not_ready(ready(c, c.port(1)))
    finally:
        c.close()


def test_order_replicas_are_ready_too(shop: Shop) -> None:
    shop.until(lambda: shop.order.serving)
    body = ready(shop, ORDER_PORT).json()
    assert body["ready"] is True and body["service"] == "order" and body["role"] == "primary"


# -- the front end ---------------------------------------------------------------------------

def test_the_front_end_is_ready_when_every_service_has_a_primary(shop: Shop) -> None:
    shop.until(lambda: shop.fe.catalog.primary_state() is not None and shop.fe.order.primary_state() is not None)
    r = shop.api("GET", "/ready")
    assert r.code == 200, r
    assert r.json() == {"ready": True, "service": "frontend"}


@pytest.mark.parametrize("port, service", [(CATALOG_PORT, "catalog"), (ORDER_PORT, "order")])
def test_the_front_end_is_not_ready_while_a_service_has_no_primary(shop: Shop, port: int, service: str) -> None:
    shop.poll()
    assert shop.api("GET", "/ready").code == 200
    shop.network.kill(port)
    shop.poll()
    assert not_ready(shop.api("GET", "/ready")) == f"no {service} primary known"
    assert shop.api("GET", "/health").code == 200  # alive all the same: liveness is not readiness
    shop.network.revive(port)
    shop.poll()
    assert shop.api("GET", "/ready").code == 200


def test_the_front_end_is_not_ready_while_its_invalidation_channel_is_down(shop: Shop) -> None:
    shop.poll()
    assert shop.api("GET", "/ready").code == 200
    shop.stream.channel_lost()  # what the Redis subscriber reports when its link drops
    assert "invalidation channel" in not_ready(shop.api("GET", "/ready"))
    assert shop.cache.bypass
    shop.stream.channel_back()
    assert shop.api("GET", "/ready").code == 200
