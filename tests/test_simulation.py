"""Deterministic simulation of the whole store (`bazar.sim.world`).

- `test_seeds`: seeds of the short profile (8 s of faults), in chunks so that a failure
  names its seeds; every failing seed is listed with what broke, and replays with
  `bazar-sim --seed S --profile short --verbose`. `BAZAR_SIM_SEEDS` and
  `BAZAR_SIM_START` choose how many and from where (thousands: `bazar-sim`).
- `test_a_seed_replays_exactly`: the same seed twice gives the same history, the
  same events and the same tables.
- Regression schedules, one per class of bug that matters most, each an explicit
  schedule on a `World` without nemesis or clients of its own; each says which
  mechanism it pins, and fails if that mechanism is taken away.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from attrs import evolve
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from bazar.errors import BazarError, Unavailable
from bazar.http.client import call
from bazar.order import record_op
from bazar.records import Sale
from bazar.replication import raft
from bazar.sim.network import DROP, Exchange
from bazar.sim.world import SECRET, TOKEN, Node, World, simulate

SEEDS = int(os.environ.get("BAZAR_SIM_SEEDS", "60"))
START = int(os.environ.get("BAZAR_SIM_START", "0"))
CHUNK = 20


# -- seeds -------------------------------------------------------------------------------------

def chunks() -> list[range]:
    return [range(s, min(s + CHUNK, START + SEEDS)) for s in range(START, START + SEEDS, CHUNK)]


@pytest.mark.parametrize("seeds", chunks(), ids=lambda r: f"seeds-{r.start}-{r.stop - 1}")
def test_seeds(seeds: range) -> None:
    failed = []
    for seed in seeds:
        outcome = simulate(seed, profile="short")
        if not outcome.ok:
            failed.append(f"seed {seed}: " + "; ".join(str(f) for f in outcome.findings))
    assert not failed, "\n".join(failed)


def test_a_seed_replays_exactly() -> None:
    first = simulate(7, profile="short")
    again = simulate(7, profile="short")
    assert first.operations > 10
    assert first.history == again.history
    assert first.events == again.events
    assert first.tables == again.tables
    assert first.stats == again.stats


def test_different_seeds_differ() -> None:
    assert simulate(1, profile="short").history != simulate(2, profile="short").history


# -- the regression schedules ------------------------------------------------------------------

@pytest.fixture
def world(tmp_path: Any) -> Iterator[World]:
    w = World(1, str(tmp_path), frontends=1, profile="short")
    w.start()
    yield w
    w.close()


def others(world: World, node: Node) -> list[Node]:
    return [n for n in world.replicas(node.service) if n is not node]


def raft_message(ex: Exchange) -> dict[str, Any] | None:
    if not ex.uri.startswith(b"/internal/raft"):
        return None
    body = ex.json()
    return body if isinstance(body, dict) else None


def written_op(ex: Exchange) -> dict[str, Any] | None:
    """The op of a forwarded write (`/internal/write`), if `ex` is one."""
    if not ex.uri.startswith(b"/internal/write"):
        return None
    body = ex.json()
    op = body.get("op") if isinstance(body, dict) else None
    return op if isinstance(op, dict) else None


def outcome_of(d: Deferred[Any]) -> list[Any]:
    box: list[Any] = []
    d.addBoth(box.append)
    return box


def settle(world: World, limit: float = 20.0) -> None:
    assert world.run_until(world.settled, limit), "the store did not settle"


def test_figure_8_an_old_term_entry_on_a_majority_is_not_committed(world: World,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Raft §3.6.2, Figure 8: S1 (leader of term t1) appends X and is cut off; B wins
    term t2 and appends its no-op, which nobody gets; B dies; S1 wins term t3 and
    copies X to C. X is now on a majority (S1, C) but is of an old term: it must not
    commit until an entry of t3 does, because B (whose log ends in t2 > t1) can still
    win an election with C's vote and overwrite X. A retry of X's request id must not
    get 200 meanwhile (its outcome is known only once applied, §6.3).

    Pins `Raft._maybe_commit`'s "only entries of the current term commit by counting".
    The batch size is cut to one entry (a tuning knob: correctness must not depend on
    it) so that X travels without the no-op of t3."""
    monkeypatch.setattr(raft, "MAX_BATCH", 1)
    net = world.network
    s1 = world.leader("catalog")
    assert s1 is not None and s1.replica is not None
    b, c = others(world, s1)
    settle(world)
    n = s1.replica.store.last_index()
    t1 = s1.replica.epoch
    op = {"op": "update_price", "rid": "figure-8", "id": 1, "price": 11.0}

    # S1 is cut off; X is appended there only
    for o in (b, c):
        net.cut(s1.port, o.port, DROP)
    first = outcome_of(ensureDeferred(s1.replica.submit(dict(op))))
    world.run_for(0.1)
    assert s1.replica.store.last_index() == n + 1 and s1.replica.store.term_at(n + 1) == t1

    # B wins with C's vote (C cannot campaign: its calls to B vanish); nothing B sends as leader reaches C
    def b_is_silent(ex: Exchange) -> bool:
        m = raft_message(ex)
        return ex.source == b.port and ex.port == c.port and m is not None and m.get("kind") in ("append", "heartbeat")

    net.filters.append(b_is_silent)
    net.block(c.port, b.port, DROP)
    assert world.run_until(lambda: b.replica is not None and b.replica.is_primary, 10)
    assert b.replica is not None and c.replica is not None
    t2 = b.replica.epoch
    assert b.replica.store.term_at(n + 1) == t2 and c.replica.store.last_index() == n
    world.crash(b.name)
    net.filters.remove(b_is_silent)
    net.unblock(c.port, b.port)

    # S1 and C talk again: S1 wins term t3 and copies X to C, but no entry of t3 reaches C
    net.uncut(s1.port, c.port)

    def no_current_entries_to_c(ex: Exchange) -> bool:
        m = raft_message(ex)
        if m is None or m.get("kind") != "append" or ex.source != s1.port or ex.port != c.port:
            return False
        assert s1.replica is not None and c.replica is not None
        current = s1.replica.epoch
        return any(e[1] == current for e in m["entries"]) and c.replica.store.last_index() >= n + 1

    net.filters.append(no_current_entries_to_c)
    assert world.run_until(lambda: s1.replica is not None and s1.replica.is_primary
                           and c.replica is not None and c.replica.store.last_index() >= n + 1, 10)
    assert c.replica.store.entries(n + 1, n + 2)[0].term == t1  # X, of term t1, on S1 and C: a majority
    world.run_for(0.5)
    assert s1.replica.core.commit <= n, "an entry of an older term was committed by counting replicas"
    retry = outcome_of(ensureDeferred(s1.replica.submit(dict(op))))
    world.run_for(1.0)
    assert not retry or isinstance(retry[0], Failure), f"the retried write was answered from X: {retry}"
    assert s1.replica.core.commit <= n and s1.replica.store.applied <= n and c.replica.store.applied <= n
    assert not any(getattr(r, "status", None) == 200 for r in first)

    # S1 dies; B comes back and wins with C's vote: X, never committed, is overwritten
    world.crash(s1.name)
    net.filters.clear()
    net.heal()
    world.restart(b.name)
    assert world.run_until(lambda: b.replica is not None and b.replica.core.committed_in_term(), 10)
    assert c.replica.store.term_at(n + 1) == t2
    world.restart(s1.name)
    assert world.wait(ensureDeferred(b.replica.submit(dict(op))), 20).failed is None
    settle(world)
    for node in world.replicas("catalog"):
        applied = [(i, t) for i, t, o in world.applied_log(node) if o is not None and o.get("rid") == "figure-8"]
        assert len(applied) == 1 and applied[0][1] > t2, (node.name, applied)
    assert not world.errors


def test_a_primary_cut_off_from_its_backups_steps_down_and_its_sweep_records_nothing(world: World) -> None:
    """The order primary L loses its backups (it still reaches the front end and the
    catalog). Within an election timeout it stops serving reads and acknowledging
    writes, and steps down; a sweep that runs after its lease lapsed (before it
    noticed it lost the majority) must not record the orphan sale it would see, since
    a new primary may already be recording it.

    Pins the lease (§6.4.1, `Replica.serving`), check-quorum (§6.2) and the
    `serving` guard of `Purchases.sweep`."""
    net = world.network
    lead = world.leader("order")
    catalog = world.leader("catalog")
    assert lead is not None and lead.replica is not None and lead.purchases is not None
    assert catalog is not None and catalog.replica is not None
    settle(world)
    now = world.now()
    # a sale left behind long ago (its purchase died before the order was recorded)
    sell = {"op": "sell", "rid": "sale:client:old", "key": "client:old", "id": 1, "quantity": 1,
            "created": "1970-01-01T00:00:00.000+00:00", "created_ts": now - 60}
    sale = Sale.from_json(world.wait(ensureDeferred(catalog.replica.submit(sell)), 5).result["sale"])
    recorded: list[float] = []
    purchases = lead.purchases
    real_record = purchases.record

    def record(sale: Sale) -> Any:
        recorded.append(world.now())
        return real_record(sale)

    purchases.record = record  # type: ignore[method-assign]
    for o in others(world, lead):
        net.cut(lead.port, o.port, DROP)
    cut_at = world.now()
    assert not recorded, "the sale was recorded before the cut (the schedule needs another moment)"
    replica = lead.replica
    election = replica.core.election_ticks * replica.tick_seconds

    # the lease lapses (no reads, no sweep) before it steps down
    assert world.run_until(lambda: replica.is_primary and not replica.serving, election)
    assert world.now() - cut_at <= election  # the lease lapsed within an election timeout
    purchases.sweep()  # the periodic sweep, firing now
    world.run_for(0.2)
    assert not recorded, "a primary whose lease lapsed recorded a sale"
    status, _, _ = world.wait(ensureDeferred(call(world.network.client(6001), world.clock, "GET",
                                                  f"http://127.0.0.1:{lead.port}/orders", timeout=5,
                                                  headers={b"Authorization": b"Bearer " + TOKEN.encode()})))
    assert status == 503
    assert world.run_until(lambda: not replica.is_primary, 2 * election)
    again = outcome_of(ensureDeferred(replica.submit(record_op(evolve(sale, key="client:new")).to_json())))
    world.run_for(2.0)
    assert not again or isinstance(again[0], Failure) and again[0].check(BazarError), \
        f"a deposed primary acknowledged a write: {again}"
    assert not recorded

    # the new primary records the sale; the old one, healed, agrees
    net.heal()
    settle(world)
    assert not recorded
    for node in world.replicas("order"):
        assert node.replica is not None
        row = node.replica.store.db.execute("SELECT book_id, quantity, sale_seq FROM orders WHERE idem = ?",
                                            ("client:old",)).fetchone()
        assert row == (1, 1, sale.seq), (node.name, row)
    assert not world.check(), world.findings


def test_a_purchase_is_never_answered_409_from_a_refusal_that_was_not_committed(world: World) -> None:
    """The catalog primary C is cut off from its backups and its lease has lapsed (it
    has not noticed yet that it lost the majority) when a sale it must refuse (out of
    stock) reaches it. Its state may be old, so it must neither refuse at once nor
    answer 409 from the entry it appends (that entry can never commit): it answers 503
    once it steps down. Through the front end, the purchase then gets its 409 from the
    new primary, and it never happens later.

    Pins "answer only from committed or current state": `Replica.submit` refuses
    without an entry only while `serving` (a read under the lease, §6.4.1), and
    otherwise returns the outcome the state machine gave the committed entry."""
    net = world.network
    lead = world.leader("catalog")
    assert lead is not None and lead.replica is not None
    # book 2 (8 copies) is sold out first
    sold = world.wait(ensureDeferred(world.buy(0, 2, 8, "sell-out")), 30)
    assert sold.status == 200
    settle(world)
    replica = lead.replica
    for o in others(world, lead):
        net.cut(lead.port, o.port, DROP)
    election = replica.core.election_ticks * replica.tick_seconds
    assert world.run_until(lambda: replica.is_primary and not replica.serving, election)
    sell = {"op": "sell", "rid": "sale:client:late", "key": "client:late", "id": 2, "quantity": 1,
            "created": "now", "created_ts": world.now()}
    answer = outcome_of(ensureDeferred(replica.submit(sell)))
    assert not answer, f"a primary whose lease lapsed answered at once: {answer}"
    assert world.run_until(lambda: bool(answer), 2 * election)
    assert isinstance(answer[0], Failure) and answer[0].check(Unavailable), answer
    # through the front end: the new primary refuses it
    purchase = world.wait(ensureDeferred(world.buy(1, 2, 1, "refused")), 60)
    assert purchase.status == 409, purchase
    net.heal()
    settle(world)
    for node in world.replicas("catalog"):
        assert node.replica is not None
        assert not node.replica.store.db.execute(
            "SELECT key FROM sales WHERE key IN ('client:late', 'client:refused')").fetchall()
        refusals = [o for _, _, o in world.applied_log(node) if o is not None and o.get("key") == "client:late"]
        assert all(o["rid"] == "sale:client:late" for o in refusals)  # committed later as a refusal, if at all
    assert not world.check(), world.findings


def test_read_your_writes_and_monotonic_reads_across_a_leader_change(world: World) -> None:
    """Through one front end, with its cache on: a client reads its own price updates
    across a crash of the catalog primary, and a backup that missed the latest write
    (cut from the new primary, but still within its "heard from a leader" window, so
    still serving) is never read from.

    Pins the front end's `InvalidationStream.written` (own writes invalidate before the
    answer) and `LRUCache.required` as the `min_seq` of `ReplicaSet.read` (a replica
    older than what this front end wrote or saw is skipped)."""
    prices: list[float] = []

    def read() -> float:
        book = world.wait(ensureDeferred(world.read(0, 1)), 20)
        assert book is not None
        prices.append(book["price"])
        return float(book["price"])

    def set_price(price: float) -> None:
        world.wait(ensureDeferred(world.admin(0, "set_price", 1, price)), 30)
        assert world.history.ops[-1].status == "ok", world.history.ops[-1]

    set_price(30.0)
    assert read() == 30.0 and read() == 30.0  # the second one is a cache hit
    old = world.leader("catalog")
    assert old is not None
    world.crash(old.name)
    set_price(31.0)
    assert read() == 31.0
    world.restart(old.name)
    settle(world)

    lead = world.leader("catalog")
    assert lead is not None and lead.replica is not None
    lagging = others(world, lead)[0]
    asked: list[int] = []

    def watch(ex: Exchange) -> bool:
        if ex.port == lagging.port and ex.uri.startswith(b"/books/1"):
            asked.append(ex.port)
        return False

    world.network.filters.append(watch)
    world.network.cut(lead.port, lagging.port, DROP)
    set_price(32.0)
    assert lagging.replica is not None and lagging.replica.serving, "the schedule needs a stale backup still serving"
    assert lagging.replica.store.applied < lead.replica.store.applied
    world.frontends[0].fe.cache.drop("info:1")
    # concurrent misses: each starts its round robin on another replica, one on the stale one
    reads = [ensureDeferred(world.read(p, 1)) for p in range(3)]
    for d in reads:
        book = world.wait(d, 20)
        assert book is not None and book["price"] == 32.0, book
        prices.append(book["price"])
    assert asked, "the stale backup was never asked: the schedule does not exercise the protection"
    world.network.heal()
    settle(world)
    assert read() == 32.0
    assert prices == sorted(prices), "reads went back in time"
    assert not world.check(), world.findings


def test_a_wiped_replica_rejoins_as_a_learner_and_a_corrupt_one_heals(world: World) -> None:
    """L and F hold an acknowledged write W that G missed. F loses its disk and comes
    back while L dies: F must not vote until it has caught up, or G (without W) would
    be elected with F's vote and W would be lost. When L is back, W survives, and F
    votes again only once it holds everything committed. Then a replica whose file is
    corrupt moves it aside and rebuilds from its peers.

    Pins the learner rule (§4.2.1: `Replica._bootstrap` and `Raft._on_vote`) and the
    store's integrity check on open."""
    net = world.network
    lead = world.leader("catalog")
    assert lead is not None and lead.replica is not None
    settle(world)
    f, g = others(world, lead)
    net.cut(lead.port, g.port, DROP)
    net.cut(f.port, g.port, DROP)
    w = {"op": "update_price", "rid": "acknowledged", "id": 3, "price": 42.0}
    assert world.wait(ensureDeferred(lead.replica.submit(w)), 10).failed is None
    assert g.replica is not None and not any(o and o.get("rid") == "acknowledged" for _, _, o in world.applied_log(g))

    net.cut(lead.port, f.port, DROP)
    net.uncut(f.port, g.port)
    world.wipe(f.name)
    world.restart(f.name)
    world.crash(lead.name)
    world.run_for(0.5)
    assert f.replica is not None and not f.replica.store.voter, "a replica that lost its data votes"
    world.run_for(4.0)
    assert world.leader("catalog") is None, "a leader was elected with the vote of a replica without its data"

    transitions: list[tuple[int, int]] = []
    voter = f.replica.store.voter

    def watch() -> bool:
        nonlocal voter
        assert f.replica is not None
        if f.replica.store.voter and not voter:
            leader = world.leader("catalog")
            transitions.append((f.replica.store.applied, leader.replica.core.commit if leader and leader.replica
                                else -1))
        voter = f.replica.store.voter
        return False

    net.heal()
    world.restart(lead.name)
    world.run_until(watch, 5.0)
    settle(world)
    assert f.replica.store.voter and transitions and all(applied >= commit for applied, commit in transitions)
    for node in world.replicas("catalog"):
        assert [o for _, _, o in world.applied_log(node) if o and o.get("rid") == "acknowledged"] == [w], node.name

    # a corrupt store heals from its peers
    victim = others(world, world.leader("catalog") or lead)[0]
    world.corrupt(victim.name)
    world.restart(victim.name)
    assert victim.replica is not None and victim.replica.store.healed
    settle(world)
    assert not world.check(), world.findings


def test_a_paused_leader_does_not_act_on_stale_leadership(world: World) -> None:
    """The catalog primary is stopped (SIGSTOP), a new primary takes a price update,
    then the old one is resumed (SIGCONT) and the first thing it meets is a client's
    request that waited for it (its peers' messages were lost meanwhile): a read must
    not be answered from its stale state. Then the same with the new primary and a
    write: it must not be committed in the stale term (it is refused, or forwarded).
    One request per pause, so that nothing else catches its clock up first.

    Pins `Replica._catch_up` (logical time caught up before answering anything) with
    the lease (§6.4.1) and check-quorum (§6.2)."""
    http = world.network.client(6002)
    world.wait(ensureDeferred(world.admin(0, "set_price", 1, 30.0)), 30)
    settle(world)

    def stopped(request: Callable[[str], Deferred[Any]], price: float) -> tuple[list[Any], int]:
        """Stop the primary, let another take `price`, send it `request`, resume it."""
        old = world.leader("catalog")
        assert old is not None and old.replica is not None
        term = old.replica.epoch
        world.pause(old.name)
        for o in others(world, old):
            world.network.cut(old.port, o.port, DROP)
        world.run_for(1.5)
        world.wait(ensureDeferred(world.admin(0, "set_price", 1, price)), 30)
        assert world.history.ops[-1].status == "ok"
        answer = outcome_of(request(f"http://127.0.0.1:{old.port}"))
        world.run_for(1.0)
        assert not answer, "answered while stopped"
        world.resume(old.name)
        world.run_for(0.1)
        world.network.heal()
        return answer, term

    read, _ = stopped(lambda url: ensureDeferred(call(http, world.clock, "GET", f"{url}/books/1", timeout=10)), 40.0)
    assert read, "the held read was not answered after the resume"
    status, book, _ = read[0]
    assert status == 503 or book["price"] == 40.0, (status, book)
    settle(world)

    write = {"op": {"op": "update_price", "rid": "while-stopped", "id": 1, "price": 99.0}}
    answer, term = stopped(lambda url: ensureDeferred(call(http, world.clock, "POST", f"{url}/internal/write",
                                                           body=write, secret=SECRET, timeout=10)), 50.0)
    world.run_until(lambda: bool(answer), 12)
    settle(world)
    found: list[int] = []
    for node in world.replicas("catalog"):
        found = [t for _, t, o in world.applied_log(node) if o and o.get("rid") == "while-stopped"]
        assert all(t > term for t in found), "a write was committed in the stale term"
    if answer and not isinstance(answer[0], Failure) and answer[0][0] == 200:
        assert found, "a write was acknowledged and is not in the log"
    assert not world.check(), world.findings
