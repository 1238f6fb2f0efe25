"""bazar.replication: primary choice, ordered fan-out, fencing, failover and catch-up,
with N catalog replicas in memory (StubTreq's agent behind a port router) on a
task.Clock."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory import SECRET, Cluster, restock, rid, update_price, url_of
from twisted.internet.defer import ensureDeferred

from bazar.catalog import CatalogMachine
from bazar.replication import BACKUP, OK, PRIMARY, RECOVERING, Replica
from bazar.store import Entry, Store
from bazar.web import HTTPError


@pytest.fixture(autouse=True)
def _deterministic_backoff() -> None:
    random.seed(1234)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path), 3)
    yield c
    c.close()


def settled(c: Cluster, ids: list[int] | None = None) -> None:
    """Every listed replica holds the same tables and the same log."""
    ids = ids or sorted(c.alive)
    first = ids[0]
    for i in ids[1:]:
        assert c.tables(i) == c.tables(first), f"replica {i} differs from {first}"
        assert (c[i].store.last_seq, c[i].store.last_epoch) == (c[first].store.last_seq, c[first].store.last_epoch)


def quantity(c: Cluster, i: int, book: int) -> int:
    row = c[i].store.db.execute("SELECT quantity FROM books WHERE id = ?", (book,)).fetchone()
    return int(row[0])


# -- elections -------------------------------------------------------------------------

def test_the_lowest_id_is_chosen_at_start_with_epoch_1(cluster: Cluster) -> None:
    primary = cluster.elect()
    assert primary.replica_id == 1 and primary.epoch == 1
    cluster.run(3.0)  # heartbeats keep it that way: no second election
    assert cluster.primaries() == [1]
    for i in (1, 2, 3):
        r = cluster[i]
        assert (r.epoch, r.leader, r.store.promised) == (1, 1, 1)
        assert r.status == OK
    assert [cluster[i].role for i in (1, 2, 3)] == [PRIMARY, BACKUP, BACKUP]
    health = cluster.http("GET", url_of(cluster.port(2)) + "/health").json()
    assert {"service": "catalog", "replica": 2, "role": "backup", "status": "ok"}.items() <= health.items()
    assert isinstance(health["pid"], int)


def test_a_single_replica_is_primary_at_once(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path), 1)
    try:
        assert c.primaries() == [1] and c[1].epoch == 1 and c[1].status == OK
        assert c.submit(restock(1)).seq == 1
    finally:
        c.close()


def test_no_primary_without_a_majority(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path), 3, start=False)
    try:
        c.start(2)
        c.run(8.0)
        assert c.primaries() == []
        assert c[2].store.promised == 0  # pre-votes that cannot win promise nothing
        c.start(3)
        assert c.elect().replica_id in (2, 3)
    finally:
        c.close()


# -- writes --------------------------------------------------------------------------

def test_a_write_is_on_every_backup_before_it_is_acknowledged(cluster: Cluster) -> None:
    primary = cluster.elect()
    d = ensureDeferred(primary.submit(restock(1, 7)))
    box: list[Any] = []
    d.addBoth(box.append)
    cluster.until(lambda: bool(box))
    outcome = box[0]
    assert outcome.seq == 1 and outcome.result["quantity"] == 67
    for i in (2, 3):  # checked at the moment of the acknowledgement, not later
        assert cluster[i].store.last_seq == 1 and quantity(cluster, i, 1) == 67


def test_concurrent_writes_are_applied_in_the_primary_order_everywhere(cluster: Cluster) -> None:
    primary = cluster.elect()
    ops = [restock(b % 7, b + 1) if b % 3 else update_price(b % 7, 10.0 + b) for b in range(30)]
    ds = [ensureDeferred(primary.submit(op)) for op in ops]
    outcomes = [cluster.wait(d) for d in ds]
    assert sorted(o.seq for o in outcomes) == list(range(1, 31))
    settled(cluster)
    assert cluster.log(1) == cluster.log(2) == cluster.log(3)
    assert [op["rid"] for _, _, op in cluster.log(2)] == [op["rid"] for op in ops]


def test_writes_sent_to_a_backup_are_forwarded_to_the_primary(cluster: Cluster) -> None:
    cluster.elect()
    outcome = cluster.submit(restock(4, 3), via=3)
    assert outcome.seq == 1 and outcome.result["quantity"] == 43
    settled(cluster)
    assert cluster[1].store.last_seq == 1


def test_a_retried_write_is_applied_once(cluster: Cluster) -> None:
    primary = cluster.elect()
    op = restock(2, 5)
    first = cluster.submit(op)
    again = cluster.submit(dict(op), via=2)
    assert (again.seq, again.result, again.new) == (first.seq, first.result, False)
    settled(cluster)
    assert primary.store.last_seq == 1 and quantity(cluster, 3, 2) == 13


def test_a_failed_operation_is_an_error_everywhere_and_logs_nothing(cluster: Cluster) -> None:
    cluster.elect()
    with pytest.raises(HTTPError) as caught:
        cluster.submit({"op": "decrement", "rid": rid(), "id": 2, "quantity": 9})
    assert caught.value.status == 409
    with pytest.raises(HTTPError) as caught:
        cluster.submit({"op": "restock", "rid": rid(), "id": 42, "quantity": 1}, via=2)
    assert caught.value.status == 404
    cluster.run(1.0)
    assert [cluster[i].store.last_seq for i in (1, 2, 3)] == [0, 0, 0]


# -- backups that fall behind --------------------------------------------------------

def test_a_backup_that_missed_writes_gets_them_in_order(cluster: Cluster) -> None:
    cluster.elect()
    cluster.submit(restock(0))
    cluster.network.cut(cluster.port(1), cluster.port(3))
    for b in range(6):
        cluster.submit(restock(b, b + 1))  # acknowledged by 1 and 2: a majority
    assert cluster[3].store.last_seq == 1
    assert cluster.primaries() == [1] and cluster[1].epoch == 1  # the cut-off backup disturbed no one
    cluster.network.heal()
    cluster.until(lambda: cluster[3].store.last_seq == 7)
    settled(cluster)
    assert cluster.log(3) == cluster.log(1)
    assert cluster[3].status == OK and cluster[1].epoch == 1


def test_a_batch_that_does_not_follow_the_log_is_refused_with_the_position(cluster: Cluster) -> None:
    primary = cluster.elect()
    cluster.submit(restock(1))
    backup = cluster[2]
    entry = Entry(3, 1, restock(1)).to_json()
    before = cluster.tables(2)
    gap = backup.on_replicate({"epoch": 1, "leader": 1, "prev_seq": 2, "prev_epoch": 1, "entries": [entry],
                               "head": 3, "in_sync": True})
    assert gap == {"ok": False, "last_seq": 1, "last_epoch": 1}
    assert backup.status == RECOVERING and cluster.tables(2) == before
    other_epoch = backup.on_replicate({"epoch": 1, "leader": 1, "prev_seq": 1, "prev_epoch": 7,
                                       "entries": [], "head": 1, "in_sync": True})
    assert other_epoch["ok"] is False and cluster.tables(2) == before
    # the primary resends from the position it was given, and the backup serves again
    cluster.submit(restock(1))
    cluster.run(0.5)
    settled(cluster)
    assert backup.status == OK and primary.store.last_seq == 2


# -- fencing ---------------------------------------------------------------------------

def test_a_promise_fences_older_epochs(cluster: Cluster) -> None:
    cluster.elect()
    cluster.submit(restock(1))
    backup = cluster[3]
    backup.store.promise(5)
    before = cluster.tables(3)
    message = {"epoch": 4, "leader": 1, "prev_seq": 1, "prev_epoch": 1,
               "entries": [Entry(2, 4, restock(1)).to_json()], "head": 2, "in_sync": True}
    answer = backup.on_replicate(message)
    assert answer["stale"] is True and answer["epoch"] == 5 and answer["ok"] is False
    snapshot = {"epoch": 4, "leader": 1, "snapshot": cluster[1].store.snapshot()}
    assert backup.on_snapshot(snapshot)["stale"] is True
    assert cluster.tables(3) == before and backup.store.last_seq == 1
    # through HTTP too: the answer is 200 {"stale": true} so the sender learns the epoch
    r = cluster.http("POST", url_of(cluster.port(3)) + "/internal/replicate", json=message,
                     headers={"X-Bazar-Secret": SECRET})
    assert r.code == 200 and r.json()["stale"] is True
    # the primary meets the newer epoch on its next heartbeat and steps down; the
    # next primary has to go above the promise
    cluster.until(lambda: not cluster[1].is_primary or cluster[1].epoch > 5, limit=2.0)
    cluster.until(lambda: len(cluster.primaries()) == 1 and cluster.primary().epoch > 5)
    cluster.run(0.5)
    settled(cluster)


def test_a_partitioned_primary_cannot_acknowledge_and_steps_down(cluster: Cluster) -> None:
    cluster.elect()
    cluster.submit(restock(1, 1))
    for other in (2, 3):
        cluster.network.cut(cluster.port(1), cluster.port(other))
    # the old primary, cut off from both backups, cannot reach a majority
    with pytest.raises(HTTPError) as caught:
        cluster.submit(restock(1, 100), via=1)
    assert caught.value.status == 503
    assert quantity(cluster, 1, 1) == 161  # applied locally, never acknowledged
    # the others elect a new primary and take writes
    cluster.until(lambda: any(cluster[i].is_primary for i in (2, 3)))
    new = next(cluster[i] for i in (2, 3) if cluster[i].is_primary)
    assert new.epoch > 1
    acked = cluster.submit(restock(1, 5), via=new.replica_id)
    assert acked.result["quantity"] == 66
    assert cluster[1].is_primary  # it does not know yet
    cluster.network.heal()
    cluster.until(lambda: not cluster[1].is_primary)
    assert cluster.primaries() == [new.replica_id]
    # the diverged replica is brought back to the new primary's history
    cluster.until(lambda: cluster.tables(1) == cluster.tables(new.replica_id))
    cluster.run(0.5)
    settled(cluster)
    assert quantity(cluster, 1, 1) == 66
    assert cluster[1].store.epoch_at(cluster[1].store.last_seq) == new.epoch


# -- failover ------------------------------------------------------------------------

def test_failover_keeps_every_acknowledged_write(cluster: Cluster) -> None:
    cluster.elect()
    for b in range(7):
        cluster.submit(restock(b, 10 + b))
    expected = cluster.tables(1)
    cluster.kill(1)
    killed_at = cluster.clock.seconds()
    new = cluster.elect()
    assert cluster.clock.seconds() - killed_at < 5.0  # "within a few seconds"
    assert new.replica_id in (2, 3) and new.epoch > 1
    assert cluster.tables(new.replica_id) == expected
    # two of three replicas are a majority: writes go on
    cluster.submit(restock(0, 1), via=5 - new.replica_id)
    settled(cluster, [2, 3])
    # the old primary comes back as a backup and catches up before serving
    back = cluster.restart(1)
    assert back.role == BACKUP and back.status == RECOVERING
    cluster.until(lambda: back.status == OK)
    settled(cluster)
    assert cluster.primaries() == [new.replica_id] and back.epoch == new.epoch


def test_a_new_primary_first_copies_the_most_advanced_log(cluster: Cluster) -> None:
    cluster.elect()
    cluster.submit(restock(1))
    cluster.network.cut(cluster.port(1), cluster.port(2))
    acked = [cluster.submit(restock(3, n)) for n in (1, 2, 3)]  # on 1 and 3 only
    assert cluster[2].store.last_seq == 1 and cluster[3].store.last_seq == 4
    cluster.kill(1)
    new = cluster.elect()
    for outcome in acked:
        assert new.store.epoch_at(outcome.seq) == 1
    assert quantity(cluster, new.replica_id, 3) == 65 + 6
    cluster.run(0.5)
    settled(cluster, [2, 3])


def test_a_replica_with_an_empty_store_joins_and_catches_up(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path), 3, start=False)
    try:
        c.start(1)
        c.start(2)
        c.elect()
        for b in range(12):
            c.submit(restock(b % 7, b + 1))
        c.submit({"op": "add_book", "rid": rid(), "title": "Late", "topic": "new", "price": 5.0, "quantity": 3})
        assert c[3].store.last_seq == 0
        c.start(3)
        c.until(lambda: c[3].status == OK)
        settled(c)
        assert c.log(3) == c.log(1)
        # and the wiped replica, restarted empty, catches up again
        c.restart(3, fresh=True)
        assert c[3].store.last_seq == 0
        c.until(lambda: c[3].status == OK)
        settled(c)
    finally:
        c.close()


def test_a_restarted_replica_keeps_its_promise(cluster: Cluster) -> None:
    cluster.elect()
    cluster.submit(restock(1))
    cluster.kill(1)
    cluster.until(lambda: len(cluster.primaries()) == 1)
    epoch = cluster.primary().epoch
    back = cluster.restart(cluster.primary().replica_id)
    assert back.store.promised >= epoch and back.role == BACKUP
    cluster.until(lambda: len(cluster.primaries()) == 1)
    assert cluster.primary().epoch > epoch


# -- votes -----------------------------------------------------------------------------

def lone_replica(tmp_path: Path, replica_id: int = 2) -> Replica:
    """A replica of a 3-replica service whose peers do not answer (no network)."""
    from memory import Network
    from twisted.internet.task import Clock

    store = Store(str(tmp_path / f"r{replica_id}.sqlite3"), CatalogMachine())
    peers = {i: url_of(5100 + i) for i in (1, 2, 3)}
    replica = Replica(service="catalog", replica_id=replica_id, peers=peers, store=store,
                      http=Network().client(), clock=Clock(), secret=SECRET)
    replica.start()
    return replica


def test_vote_denied_for_an_epoch_not_above_the_promise(tmp_path: Path) -> None:
    r = lone_replica(tmp_path)
    r.store.promise(3)
    for epoch in (1, 2, 3):
        assert r.on_vote({"epoch": epoch, "candidate": 1}) == {"granted": False, "epoch": 3}
    assert r.store.promised == 3


def test_vote_granted_persists_the_promise(tmp_path: Path) -> None:
    r = lone_replica(tmp_path)
    r.store.execute(restock(1), epoch=1)
    answer = r.on_vote({"epoch": 4, "candidate": 3})
    assert answer == {"granted": True, "last_seq": 1, "last_epoch": 1}
    assert r.store.promised == 4 and r.leader is None
    r.store.close()
    r.store = Store(str(tmp_path / "r2.sqlite3"), CatalogMachine())  # as after a restart
    assert r.store.promised == 4
    # one vote per epoch: the same epoch again (another candidate) is denied
    assert r.on_vote({"epoch": 4, "candidate": 1})["granted"] is False


def test_pre_votes_promise_nothing(tmp_path: Path) -> None:
    r = lone_replica(tmp_path)
    assert r.on_vote({"epoch": 2, "candidate": 3, "pre": True})["granted"] is True
    assert r.store.promised == 0
    assert r.on_vote({"epoch": 2, "candidate": 1})["granted"] is True
    assert r.store.promised == 2


def test_vote_denied_while_a_live_primary_is_heard(tmp_path: Path) -> None:
    r = lone_replica(tmp_path)
    clock = r.clock
    assert r.on_replicate({"epoch": 1, "leader": 1, "prev_seq": 0, "prev_epoch": 0, "entries": [],
                           "head": 0, "in_sync": True})["ok"] is True
    clock.advance(0.5)
    assert r.on_vote({"epoch": 2, "candidate": 3})["granted"] is False
    assert r.on_vote({"epoch": 2, "candidate": 3, "pre": True})["granted"] is False
    assert r.store.promised == 1
    # the primary itself may ask (it restarted and lost its role)
    assert r.on_vote({"epoch": 2, "candidate": 1, "pre": True})["granted"] is True
    clock.advance(1.0)  # silence for a whole election timeout: the primary is presumed gone
    assert r.on_vote({"epoch": 2, "candidate": 3})["granted"] is True


def test_a_primary_denies_votes(cluster: Cluster) -> None:
    primary = cluster.elect()
    answer = primary.on_vote({"epoch": 9, "candidate": 2})
    assert answer["granted"] is False and primary.store.promised == 1


# -- property: any schedule of writes, crashes and partitions ----------------------------------

steps = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(1, 3), st.integers(0, 6)),
    st.tuples(st.just("kill"), st.integers(1, 3), st.just(0)),
    st.tuples(st.just("restart"), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("cut"), st.integers(1, 3), st.integers(1, 3)),
    st.tuples(st.just("heal"), st.just(0), st.just(0)),
    st.tuples(st.just("run"), st.integers(1, 40), st.just(0)),
), min_size=5, max_size=25)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(schedule=steps)
def test_no_acknowledged_write_is_lost_and_replicas_converge(tmp_path_factory: Any,
                                                             schedule: list[tuple[str, int, Any]]) -> None:
    c = Cluster(str(tmp_path_factory.mktemp("prop")), 3)
    try:
        c.elect()
        acked: list[tuple[str, Any]] = []
        leaders: dict[int, set[int]] = {}

        def watch() -> None:
            for i in c.primaries():
                leaders.setdefault(c[i].epoch, set()).add(i)

        c.tickers.append(watch)
        for kind, a, b in schedule:
            if kind == "write":
                if a in c.alive:
                    op = restock(b, 1)
                    d = ensureDeferred(c[a].submit(op))
                    d.addCallbacks(lambda outcome, rid=op["rid"]: acked.append((rid, outcome)), lambda f: None)
            elif kind == "kill":
                if len(c.alive) == 3:  # keep a majority
                    c.kill(a)
            elif kind == "restart":
                if a not in c.alive:
                    c.restart(a, fresh=b)
            elif kind == "cut":
                if a != b:
                    c.network.cut(c.port(a), c.port(b))
            elif kind == "heal":
                c.network.heal()
            else:
                c.run(a * 0.05)
        # quiet: everything up and connected
        c.network.heal()
        for i in c.ids:
            if i not in c.alive:
                c.restart(i)
        c.run(12.0)
        assert len(c.primaries()) == 1
        c.until(lambda: all(c[i].status == OK for i in c.ids))
        settled(c, c.ids)
        for epoch, ids in leaders.items():
            assert len(ids) == 1, f"two primaries in epoch {epoch}: {ids}"
        for i in c.ids:
            rids = {row[0] for row in c[i].store.db.execute("SELECT rid FROM requests")}
            for op_rid, outcome in acked:
                assert op_rid in rids, f"acknowledged write {op_rid} (seq {outcome.seq}) lost on replica {i}"
    finally:
        c.close()
