"""bazar.replication: the Raft core driven over HTTP, with N catalog replicas in memory
(StubTreq's agent behind a port router) on a task.Clock: elections, commitment,
forwarding, fencing, failover, catch-up, learners, serving rules."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred

from bazar.errors import Conflict, Invalid, NotFound, OutOfStock, Unavailable
from bazar.replication import raft
from bazar.replication.replica import BACKUP, OK, PRIMARY, RECOVERING
from bazar.testing.memory import SECRET, Cluster, restock, rid, update_price, url_of


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    random.seed(1234)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path), 3)
    yield c
    c.close()


def settled(c: Cluster, ids: list[int] | None = None) -> None:
    """Every listed replica applied the same entries and holds the same tables."""
    ids = ids or sorted(c.alive)
    c.until(lambda: len({c[i].store.applied for i in ids}) == 1 and all(c[i].status == OK for i in ids))
    first = ids[0]
    for i in ids[1:]:
        assert c.tables(i) == c.tables(first), f"replica {i} differs from {first}"
        applied = c[i].store.applied
        start = max(c[i].store.snapshot_index, c[first].store.snapshot_index) + 1  # (compacted before)
        assert c.log(i, start)[:applied - start + 1] == c.log(first, start)[:applied - start + 1]


def quantity(c: Cluster, i: int, book: int) -> int:
    row = c[i].store.db.execute("SELECT quantity FROM books WHERE id = ?", (book,)).fetchone()
    return int(row[0])


# -- elections -------------------------------------------------------------------------

def test_one_primary_is_elected_and_stays(cluster: Cluster) -> None:
    primary = cluster.elect()
    assert primary.epoch == 1
    cluster.run(3.0)  # heartbeats keep it that way: no second election
    assert cluster.primaries() == [primary.replica_id] and primary.epoch == 1
    settled(cluster)
    roles = sorted(cluster[i].role for i in (1, 2, 3))
    assert roles == [BACKUP, BACKUP, PRIMARY]
    health = cluster.http("GET", url_of(cluster.port(2)) + "/health").json()
    assert {"service": "catalog", "replica": 2, "status": "ok", "epoch": 1}.items() <= health.items()
    assert isinstance(health["pid"], int) and health["voter"] is True


def test_a_single_replica_is_primary_at_once(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path), 1)
    try:
        assert c.primaries() == [1] and c[1].epoch == 1 and c[1].status == OK
        assert c.submit(restock(1)).seq == 2  # after the primary's no-op (§6.4)
    finally:
        c.close()


def test_no_primary_without_a_majority(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path), 3, start=False)
    try:
        c.start(2)
        c.run(8.0)
        assert c.primaries() == [] and c[2].epoch == 0  # pre-vote: its term never moved (§9.6)
        assert c[2].status == RECOVERING
        c.start(1)
        assert c.elect().replica_id in (1, 2)
    finally:
        c.close()


# -- writes --------------------------------------------------------------------------

def test_a_write_is_acknowledged_once_committed_and_applied_by_every_reachable_replica(cluster: Cluster) -> None:
    primary = cluster.elect()
    cluster.run(0.5)
    d = ensureDeferred(primary.submit(restock(1, 7)))
    box: list[Any] = []
    d.addBoth(box.append)
    cluster.until(lambda: bool(box))
    outcome = box[0]
    assert outcome.result["quantity"] == 67 and outcome.failed is None
    held = [i for i in (1, 2, 3) if cluster[i].store.last_index() >= outcome.seq]
    assert len(held) >= 2  # durable on a majority when acknowledged (guarantee 1)
    for i in (1, 2, 3):  # and applied by every replica the primary can reach, when acknowledged
        assert cluster[i].store.applied >= outcome.seq and quantity(cluster, i, 1) == 67


def test_concurrent_writes_are_applied_in_one_order_everywhere(cluster: Cluster) -> None:
    primary = cluster.elect()
    ops = [restock(b % 7, b + 1) if b % 3 else update_price(b % 7, 10.0 + b) for b in range(30)]
    ds = [ensureDeferred(primary.submit(op)) for op in ops]
    outcomes = [cluster.wait(d) for d in ds]
    assert len({o.seq for o in outcomes}) == 30
    settled(cluster)
    logged = [op["rid"] for _, _, op in cluster.log(2) if op is not None]
    assert logged == [op["rid"] for op in ops]


def test_writes_sent_to_a_backup_are_forwarded_to_the_primary(cluster: Cluster) -> None:
    primary = cluster.elect()
    backup = next(i for i in (1, 2, 3) if i != primary.replica_id)
    outcome = cluster.submit(restock(4, 3), via=backup)
    assert outcome.result["quantity"] == 43
    settled(cluster)


def test_a_retried_write_is_applied_once(cluster: Cluster) -> None:
    primary = cluster.elect()
    op = restock(2, 5)
    first = cluster.submit(op)
    again = cluster.submit(dict(op))
    assert (again.seq, again.result, again.new) == (first.seq, first.result, False)
    settled(cluster)
    assert quantity(cluster, 3, 2) == 13 and primary.store.last_index() == first.seq


def test_a_request_id_reused_for_another_operation_is_refused(cluster: Cluster) -> None:
    cluster.elect()
    op = restock(2, 5)
    cluster.submit(op)
    with pytest.raises(Conflict):
        cluster.submit({**op, "quantity": 6})
    settled(cluster)
    assert quantity(cluster, 1, 2) == 13


def test_a_failed_operation_is_the_same_error_everywhere_and_changes_nothing(cluster: Cluster) -> None:
    cluster.elect()
    before = cluster.tables(1)
    with pytest.raises(OutOfStock):
        cluster.submit({"op": "decrement", "rid": rid(), "id": 2, "quantity": 9})
    with pytest.raises(NotFound):
        cluster.submit({"op": "restock", "rid": rid(), "id": 42, "quantity": 1})
    with pytest.raises(Invalid):  # malformed: refused before it takes a log entry
        cluster.submit({"op": "restock", "rid": rid(), "id": 1})
    settled(cluster)
    assert all(cluster.tables(i) == before for i in (1, 2, 3))


# -- followers that fall behind ------------------------------------------------------

def test_a_follower_that_missed_writes_gets_them_in_order(cluster: Cluster) -> None:
    primary = cluster.elect()
    lagging = next(i for i in (1, 2, 3) if i != primary.replica_id)
    cluster.network.cut(cluster.port(primary.replica_id), cluster.port(lagging))
    for b in range(6):
        cluster.submit(restock(b, b + 1))  # a majority without it
    assert cluster[lagging].store.applied < primary.store.applied
    assert cluster[lagging].epoch == primary.epoch or cluster[lagging].epoch == 1  # it disturbed no one
    cluster.network.heal()
    settled(cluster)
    assert cluster.primaries() == [primary.replica_id] and primary.epoch == 1


def test_a_cut_off_follower_stops_serving_reads(cluster: Cluster) -> None:
    primary = cluster.elect()
    settled(cluster)
    lonely = next(i for i in (1, 2, 3) if i != primary.replica_id)
    for other in (1, 2, 3):
        if other != lonely:
            cluster.network.cut(cluster.port(lonely), cluster.port(other))
    cluster.run(1.5)
    assert cluster[lonely].status == RECOVERING
    r = cluster.http("GET", url_of(cluster.port(lonely)) + "/books/1")
    assert r.code == 503 and r.header("Retry-After") is not None


def committed_by_acknowledgements(primary: Any, op: dict[str, Any]) -> int:
    """Propose `op` on the leader's core and step its followers' acknowledgements in,
    as `_exchange` does when their answers arrive: the entry is committed, and it is
    applied one reactor turn later (not yet)."""
    index, term = primary.core.propose(op)
    primary.store.flush()
    primary.core.persisted(index)
    for peer in primary.core.peers:
        primary.core.step(raft.AppendReply(term, peer, primary.replica_id, True, index))
    assert primary.core.commit == index > primary.store.applied
    return int(index)


def test_a_primary_serves_reads_between_a_commit_and_its_apply_turn(cluster: Cluster) -> None:
    """A read that arrives in the same turn as the acknowledgement that commits an
    entry finds the primary serving, with the entry applied (it once answered 503
    "not caught up": with no backup there yet either, the front end's read failed)."""
    primary = cluster.elect()
    settled(cluster)
    index = committed_by_acknowledgements(primary, restock(1, 2))
    assert primary.serving and primary.store.applied == index
    r = cluster.http("GET", url_of(cluster.port(primary.replica_id)) + "/books/1")
    assert r.code == 200 and int(r.header("X-Bazar-Seq")) >= index and r.json()["quantity"] == 62


def test_a_retried_sale_committed_this_turn_gets_its_outcome_not_a_400(cluster: Cluster) -> None:
    """A retry of a request whose entry an acknowledgement has just committed is
    answered with that entry's outcome: the entry is applied before the retry is
    looked up (a trial run of a sale already applied broke the sales table's key: 400)."""
    primary = cluster.elect()
    settled(cluster)
    sale = {"op": "sell", "rid": rid(), "key": "k-1", "id": 1, "quantity": 1,
            "created": "2026-01-01T00:00:00.000+00:00", "created_ts": 0.0}
    index = committed_by_acknowledgements(primary, sale)
    outcome = cluster.do(primary.submit(dict(sale)))
    assert outcome.seq == index and outcome.result["sale"]["key"] == "k-1"
    assert quantity(cluster, primary.replica_id, 1) == 59  # one copy sold, once


def test_a_writer_whose_answer_runs_the_replica_again_leaves_the_other_writers_answered(cluster: Cluster) -> None:
    """Two writes acknowledged together: the first writer's callback runs the replica
    again (a purchase's next write does), which answers the second writer from inside
    the first answer. The second is answered once, and nothing raises (the release
    loop once popped an answer already given: KeyError, every writer after it hung)."""
    primary = cluster.elect()
    settled(cluster)
    first = ensureDeferred(primary.submit(restock(1, 1)))
    second = ensureDeferred(primary.submit(restock(2, 1)))
    first.addCallback(lambda outcome: (primary._release(), outcome)[1])
    # both backups' answers arrive in one turn: both entries committed and applied everywhere
    index, term = primary.store.last_index(), primary.core.term
    primary.store.flush()
    primary.core.persisted(index)
    for _ in range(2):  # (the second time, each says it applied what the first committed)
        for peer in primary.core.peers:
            primary.core.step(raft.AppendReply(term, peer, primary.replica_id, True, index, index))
    primary._process()
    a, b = cluster.wait(first), cluster.wait(second)
    assert (a.new, b.new) == (True, True) and b.seq == a.seq + 1
    assert quantity(cluster, primary.replica_id, 1) == 61 and quantity(cluster, primary.replica_id, 2) == 9
    assert not primary.decided and not primary.waiters


def test_a_snapshot_decided_while_answering_that_peer_still_reaches_it(cluster: Cluster) -> None:
    """When the leader's core decides on a snapshot for a peer while it is answering a
    message from that very peer, the snapshot is sent as a transfer of its own: as a
    passenger in the answer it was dropped by the peer's core, and the leader waited
    for it for forty election timeouts (a replica cut off, then healed, stayed behind)."""
    primary = cluster.elect()
    settled(cluster)
    peer = next(i for i in (1, 2, 3) if i != primary.replica_id)
    snapshot = raft.InstallSnapshot(primary.core.term, primary.replica_id, peer)
    heartbeat = raft.Heartbeat(primary.core.term, primary.replica_id, peer, 0, 0, 0)
    assert primary._dispatch([snapshot, heartbeat], reply_to=peer) == [heartbeat]
    assert peer in primary.transfers  # on its way
    cluster.until(lambda: not primary.transfers)
    assert primary.snapshots["sent"] == 1  # (the peer, caught up, needed none: it says so)


# -- a primary cut off, paused or dead -----------------------------------------------------

def test_a_cut_off_primary_stops_serving_then_steps_down_and_acknowledges_nothing(cluster: Cluster) -> None:
    old = cluster.elect()
    cluster.submit(restock(1, 1))
    settled(cluster)
    for other in (1, 2, 3):
        if other != old.replica_id:
            cluster.network.cut(cluster.port(old.replica_id), cluster.port(other))
    d = ensureDeferred(old.submit(restock(1, 100)))
    box: list[Any] = []
    d.addBoth(box.append)
    cut_at = cluster.clock.seconds()
    cluster.until(lambda: old.status == RECOVERING, limit=1.0)  # its lease ran out (§6.4.1)
    cluster.until(lambda: not old.is_primary, limit=2.0)  # check-quorum (§6.2)
    assert cluster.clock.seconds() - cut_at <= old.core.election_ticks * old.tick_seconds * 2
    cluster.until(lambda: bool(box))
    assert isinstance(box[0].value, Unavailable)  # never acknowledged
    others = [i for i in (1, 2, 3) if i != old.replica_id]
    cluster.until(lambda: any(cluster[i].is_primary for i in others))
    new = next(cluster[i] for i in others if cluster[i].is_primary)
    assert new.epoch > 1
    assert cluster.submit(restock(1, 5), via=new.replica_id).result["quantity"] == 66
    cluster.network.heal()
    settled(cluster)
    assert quantity(cluster, old.replica_id, 1) == 66  # the unacknowledged write never happened


def test_a_paused_primary_resumes_without_its_lease(cluster: Cluster) -> None:
    old = cluster.elect()
    settled(cluster)
    cluster.alive.discard(old.replica_id)  # SIGSTOP: no ticks, no answers
    cluster.network.kill(cluster.port(old.replica_id))
    new = cluster.elect()
    cluster.submit(restock(3, 2))
    cluster.alive.add(old.replica_id)  # SIGCONT: its clock has jumped
    cluster.network.revive(cluster.port(old.replica_id))
    assert old.status == RECOVERING  # the first thing it does is catch up on time: no lease
    r = cluster.http("GET", url_of(cluster.port(old.replica_id)) + "/books/3")
    assert r.code == 503  # so it serves nothing from before the pause
    resumed = cluster.clock.seconds()
    cluster.until(lambda: not old.is_primary, limit=old.core.election_ticks * old.tick_seconds)
    assert cluster.clock.seconds() - resumed <= 0.7
    settled(cluster)
    assert cluster.primaries() == [new.replica_id]


def test_failover_keeps_every_acknowledged_write(cluster: Cluster) -> None:
    old = cluster.elect()
    for b in range(7):
        cluster.submit(restock(b, 10 + b))
    settled(cluster)
    expected = cluster.tables(old.replica_id)
    cluster.kill(old.replica_id)
    killed_at = cluster.clock.seconds()
    new = cluster.elect()
    assert cluster.clock.seconds() - killed_at < 2.0
    assert new.epoch > 1 and cluster.tables(new.replica_id) == expected
    survivor = next(i for i in cluster.alive if i != new.replica_id)
    cluster.submit(restock(0, 1), via=survivor)
    back = cluster.restart(old.replica_id)
    assert back.role == BACKUP and back.status == RECOVERING
    settled(cluster)
    assert cluster.primaries() == [new.replica_id] and back.epoch == new.epoch


def test_a_retry_of_an_old_epoch_entry_is_answered_only_once_committed_in_a_new_epoch(cluster: Cluster) -> None:
    """§3.6.2: an entry of an old term on a majority is not committed by counting. The
    old primary appends a write that reaches one follower; it dies; the retry of that
    write (same request id) is answered only after the new primary committed its own
    no-op, with the entry applied exactly once."""
    old = cluster.elect()
    settled(cluster)
    a, b = [i for i in (1, 2, 3) if i != old.replica_id]
    cluster.network.cut(cluster.port(old.replica_id), cluster.port(b))
    op = restock(5, 4)
    ensureDeferred(old.submit(op)).addErrback(lambda f: None)
    cluster.until(lambda: cluster[a].store.last_index() > cluster[b].store.last_index())
    cluster.kill(old.replica_id)
    cluster.network.heal()
    new = cluster.elect()
    again = cluster.submit(dict(op))
    assert again.result["quantity"] == 84
    entry_term = cluster[new.replica_id].store.term_at(again.seq)
    assert new.store.applied >= again.seq and entry_term == 1
    assert any(e[1] == new.epoch and e[0] > again.seq for e in cluster.log(new.replica_id))  # its no-op
    settled(cluster, [a, b])
    assert quantity(cluster, a, 5) == quantity(cluster, b, 5) == 84  # applied once


# -- replicas that lost their data ---------------------------------------------------------

def test_a_new_store_elects_once_a_majority_is_new(tmp_path: Path) -> None:
    c = Cluster(str(tmp_path), 3, start=False)
    try:
        c.start(1)
        c.run(3.0)
        assert c.primaries() == [] and not c[1].store.voter  # alone it cannot tell new from wiped
        c.start(3)
        c.elect()
        assert c[1].store.voter and c[3].store.voter
        c.submit(restock(1))
        c.start(2)  # late: the store exists, so it catches up as a learner, then votes
        settled(c)
        assert c[2].store.voter
    finally:
        c.close()


def test_a_wiped_replica_rejoins_as_a_learner_and_votes_only_once_caught_up(cluster: Cluster) -> None:
    primary = cluster.elect()
    for b in range(12):
        cluster.submit(restock(b % 7, b + 1))
    wiped_id = next(i for i in (1, 2, 3) if i != primary.replica_id)
    wiped = cluster.restart(wiped_id, fresh=True)
    assert wiped.store.pristine and not wiped.store.voter
    answer = cluster.http("POST", url_of(cluster.port(wiped_id)) + "/internal/raft", headers={"X-Bazar-Secret": SECRET},
                          json={"kind": "vote", "term": 9, "src": primary.replica_id, "dst": wiped_id,
                                "last_index": 0, "last_term": 0, "pre": False}).json()
    assert answer["messages"][0]["granted"] is False  # §4.2.1: a learner does not vote
    settled(cluster)
    assert wiped.store.voter and cluster.tables(wiped_id) == cluster.tables(primary.replica_id)


def test_a_replica_far_behind_catches_up_by_snapshot_and_every_log_stays_bounded(tmp_path: Path) -> None:
    """§5: each replica compacts its log once enough is applied; a replica that lost
    its data after the others compacted cannot be sent the entries: it gets the
    leader's state in chunks (staged, then installed at once), then the entries
    after it, and votes again. The logs stay bounded all the while."""
    c = Cluster(str(tmp_path), 3, store_kw={"compact_after": 20, "keep_entries": 5})
    try:
        primary = c.elect()
        c.submit({"op": "add_book", "rid": rid(), "title": "Snapshots", "topic": "raft", "price": 3.5,
                  "quantity": 5})
        for b in range(60):
            c.submit(restock(b % 7, 1))
        settled(c)
        c.run(1.0)  # the periodic compaction
        assert all(c[i].store.snapshot_index > 0 for i in (1, 2, 3))
        assert all(c[i].store.last_index() - c[i].store.snapshot_index <= 30 for i in (1, 2, 3))
        wiped_id = next(i for i in (1, 2, 3) if i != primary.replica_id)
        wiped = c.restart(wiped_id, fresh=True)
        for b in range(5):
            c.submit(restock(b, 2))  # while it catches up
        settled(c)
        assert wiped.snapshots["installed"] == 1 and primary.snapshots["sent"] == 1
        assert wiped.store.voter and wiped.store.snapshot_index > 0
        assert c.tables(wiped_id) == c.tables(primary.replica_id)
        rows = c[wiped_id].store.db.execute("SELECT count(*) FROM requests").fetchone()[0]
        assert rows == c[primary.replica_id].store.db.execute("SELECT count(*) FROM requests").fetchone()[0]
        assert wiped.store.request_ids() == rows  # (what /metrics shows as bazar_replica_request_ids)
        health = c.http("GET", url_of(c.port(wiped_id)) + "/health").json()
        assert health["snapshot_index"] == wiped.store.snapshot_index > 0
        assert health["log"] - health["snapshot_index"] <= 30  # the entries it holds
        # a write retried after the snapshot is still answered from its recorded outcome, everywhere
        again = c.submit(restock(4, 2), via=wiped_id)
        assert again.new is True
    finally:
        c.close()


def test_a_corrupt_store_is_moved_aside_and_rebuilt_from_the_peers(cluster: Cluster) -> None:
    primary = cluster.elect()
    for b in range(5):
        cluster.submit(restock(b, 2))
    victim = next(i for i in (1, 2, 3) if i != primary.replica_id)
    cluster.kill(victim)
    cluster[victim].store.close()
    with open(cluster.path(victim), "r+b") as f:
        f.write(b"this is not a database" * 100)
    cluster.boot(victim)
    assert cluster[victim].store.healed
    settled(cluster)
    assert cluster.tables(victim) == cluster.tables(primary.replica_id)


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
        wiped = False

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
                    wipe = b and not wiped  # one lost disk at a time (the fault model)
                    wiped = wiped or bool(wipe)
                    c.restart(a, fresh=bool(wipe))
            elif kind == "cut":
                if a != b:
                    c.network.cut(c.port(a), c.port(b))
            elif kind == "heal":
                c.network.heal()
            else:
                c.run(a * 0.05)
        c.network.heal()
        for i in c.ids:
            if i not in c.alive:
                c.restart(i)
        c.run(5.0)
        assert len(c.primaries()) == 1
        settled(c, c.ids)
        for epoch, ids in leaders.items():
            assert len(ids) == 1, f"two primaries in epoch {epoch}: {ids}"
        for i in c.ids:
            rids = {row[0] for row in c[i].store.db.execute("SELECT rid FROM requests")}
            for op_rid, outcome in acked:
                assert op_rid in rids, f"acknowledged write {op_rid} (seq {outcome.seq}) lost on replica {i}"
    finally:
        c.close()
