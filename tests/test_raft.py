"""bazar.replication.raft, the consensus core without I/O: each rule on its own, then thousands of
random schedules (loss, duplication, reordering, partitions, crashes, disk loss) over
an in-memory message bus, checked against Raft's safety properties (§3.6.3):
election safety, log matching, leader completeness and state machine safety."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from bazar.replication.raft import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    PRE_CANDIDATE,
    AppendEntries,
    AppendReply,
    Entry,
    Heartbeat,
    InstallSnapshot,
    MemoryLog,
    Message,
    NotLeader,
    Raft,
    RequestVote,
    VoteReply,
    message_from_json,
)


def node(i: int, voters: tuple[int, ...] = (1, 2, 3), log: MemoryLog | None = None, seed: int = 0,
         **kw: Any) -> Raft:
    return Raft(id=i, voters=voters, log=log or MemoryLog(), rng=random.Random(seed * 10 + i), **kw)


def op(n: int) -> dict[str, Any]:
    return {"op": "restock", "rid": f"r{n}", "id": 1, "quantity": n}


class Bus:
    """Delivers every message at once, in order, unless the link is cut."""

    def __init__(self, nodes: dict[int, Raft]):
        self.nodes = nodes
        self.cut: set[frozenset[int]] = set()
        self.applied: dict[int, list[Entry]] = {i: [] for i in nodes}
        self.reads: dict[int, list[tuple[int, int]]] = {i: [] for i in nodes}

    def deliver(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for i, n in list(self.nodes.items()):
                ready = n.ready()
                n.persisted(n.log.last_index())  # the memory log is on "disk" at once
                self.applied[i].extend(ready.committed)
                self.reads[i].extend((r.ctx, r.index) for r in ready.reads)
                for m in ready.messages:
                    if frozenset((m.src, m.dst)) in self.cut:
                        n.unreachable(m.dst)
                        continue
                    moved = True
                    self.nodes[m.dst].step(m)
            if not moved:
                return

    def tick(self, times: int = 1, only: list[int] | None = None) -> None:
        for _ in range(times):
            for i in only or list(self.nodes):
                self.nodes[i].tick()
            self.deliver()

    def leaders(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.role == LEADER]

    def elect(self, limit: int = 200) -> Raft:
        for _ in range(limit):
            self.tick()
            leaders = self.leaders()
            if len(leaders) == 1 and all(n.leader == leaders[0] for n in self.nodes.values()
                                         if frozenset((n.id, leaders[0])) not in self.cut):
                return self.nodes[leaders[0]]
        raise AssertionError("no leader")


def cluster(n: int = 3, seed: int = 0) -> Bus:
    voters = tuple(range(1, n + 1))
    return Bus({i: node(i, voters, seed=seed) for i in voters})


# -- elections ---------------------------------------------------------------------------

def test_a_leader_is_elected_and_commits_a_no_op_of_its_term_first() -> None:
    bus = cluster()
    leader = bus.elect()
    assert leader.term == 1 and leader.log.entries(1, 2) == [Entry(1, 1, None)]  # §6.4
    assert all(n.commit == 1 for n in bus.nodes.values()) or bus.tick(2) is None
    bus.tick(2)
    assert {n.commit for n in bus.nodes.values()} == {1}
    assert [e.index for e in bus.applied[leader.id]] == [1]


def test_a_single_voter_elects_itself_and_commits_alone() -> None:
    n = node(1, (1,))
    for _ in range(40):
        n.tick()
    assert n.role == LEADER
    n.persisted(1)
    index, term = n.propose(op(1))
    assert (index, term, n.commit) == (2, 1, 1)  # not before its own disk holds it (§10.2.1)
    n.persisted(2)
    assert n.commit == 2
    assert [e.index for e in n.ready().committed] == [1, 2]


def test_pre_vote_persists_nothing_and_a_lone_candidate_never_raises_its_term() -> None:
    bus = cluster()
    bus.cut = {frozenset((1, 2)), frozenset((1, 3))}
    bus.tick(300, only=[1])
    one = bus.nodes[1]
    assert one.term == 0 and one.log.vote is None  # §9.6: it asked, and took nothing
    assert one.role == PRE_CANDIDATE


def test_votes_go_only_to_logs_at_least_as_up_to_date() -> None:
    log = MemoryLog(term=2, log=[Entry(1, 1, None), Entry(2, 2, op(1))])
    voter = node(2, log=log)
    behind = RequestVote(3, 1, 2, last_index=5, last_term=1, pre=False)  # longer, but older term
    voter.step(behind)
    (reply,) = voter.ready().messages
    assert isinstance(reply, VoteReply) and not reply.granted  # §3.6.1
    ahead = RequestVote(3, 3, 2, last_index=2, last_term=2, pre=False)
    voter.step(ahead)
    (reply,) = voter.ready().messages
    assert reply.granted and voter.log.vote == 3 and voter.term == 3


def test_one_vote_per_term_and_it_survives_a_restart() -> None:
    log = MemoryLog(term=1)
    voter = node(2, log=log)
    voter.step(RequestVote(4, 1, 2, 0, 0, False))
    assert voter.ready().messages[0].granted  # type: ignore[attr-defined]
    again = node(2, log=log)  # restarted with what it persisted (§3.8)
    again.step(RequestVote(4, 3, 2, 0, 0, False))
    assert not again.ready().messages[0].granted  # type: ignore[attr-defined]
    assert log.vote == 1


def test_a_server_that_hears_a_leader_ignores_vote_requests() -> None:
    follower = node(2)
    follower.step(Heartbeat(1, 1, 2, 0, 0, 1))
    follower.ready()
    follower.step(RequestVote(5, 3, 2, 10, 5, False))  # §4.2.3: within the minimum election timeout
    follower.step(RequestVote(5, 3, 2, 10, 5, True))
    assert follower.ready().messages == [] and follower.term == 1 and follower.log.vote is None
    for _ in range(follower.election_ticks):
        follower.tick()
    follower.ready()
    follower.step(RequestVote(5, 3, 2, 10, 5, False))
    assert follower.ready().messages[0].granted and follower.term == 5  # type: ignore[attr-defined]


def test_a_learner_neither_votes_nor_campaigns_until_it_holds_the_leaders_commit() -> None:
    learner = node(3, log=MemoryLog(voter=False))
    for _ in range(100):
        learner.tick()
    assert learner.role == FOLLOWER and learner.ready().messages == []  # §4.2.1
    learner.step(RequestVote(1, 1, 3, 0, 0, True))
    assert not learner.ready().messages[0].granted  # type: ignore[attr-defined]
    learner.step(AppendEntries(1, 1, 3, 0, 0, (Entry(1, 1, None),), 2))
    assert learner.ready().messages[0].learner  # type: ignore[attr-defined]
    assert not learner.log.voter  # the leader has committed 2: it holds 1
    learner.recover(1)  # a majority of the others told it their term
    learner.step(AppendEntries(1, 1, 3, 1, 1, (Entry(2, 1, op(1)),), 2))
    learner.ready()
    assert learner.log.voter and learner.commit == 2


def test_a_replica_that_lost_its_state_lets_no_deposed_leader_commit_with_it() -> None:
    """Leader 3 (term 1) is paused; 1 is elected in term 2 with 2's vote and commits its
    no-op on {1, 2}; then 2 loses its disk and 1 dies. When 3 wakes up, still leader of
    term 1, the wiped 2 answers it, but as a learner: 3 commits nothing with it (it once
    committed its own term-1 entry at the no-op's index with the wiped replica's word).
    2 rejoins only once a majority of the others told it their term: then it takes
    term 2, and follows 1 when 1 is back. (Until then, 3 steps down: a learner's
    answers renew no lease, §6.2.)"""
    bus = cluster(seed=3)
    first = bus.elect()
    a, b = (i for i in (1, 2, 3) if i != first.id)
    first.propose(op(1))
    bus.tick(2)
    committed = first.commit
    bus.cut = {frozenset((first.id, a)), frozenset((first.id, b))}  # the first leader is paused
    for _ in range(100):
        bus.tick(only=[a, b])
        if any(bus.nodes[i].role == LEADER for i in (a, b)):
            break
    second = next(bus.nodes[i] for i in (a, b) if bus.nodes[i].role == LEADER)
    other = b if second.id == a else a
    bus.tick(2, only=[a, b])
    assert second.term == 2 and second.commit > committed  # its no-op, on {second, other}
    noop = second.commit
    bus.nodes[other] = node(other, log=MemoryLog(voter=False), seed=3)  # other's disk is lost
    bus.cut = {frozenset((second.id, first.id)), frozenset((second.id, other))}  # second dies
    index, _ = first.propose(op(2))  # first wakes up, still the leader of term 1
    wiped = bus.nodes[other]
    for _ in range(3):
        bus.tick(only=[first.id, other])
    assert wiped.term == 1 and wiped.log.last_index() >= index  # it took the entries ...
    assert first.commit == committed < index  # ... which commit nowhere
    for _ in range(25):  # two election timeouts: what it heard before its pause counts for one
        bus.tick(only=[first.id, other])
    assert first.commit == committed and first.role != LEADER  # check-quorum: a learner is no majority
    assert not wiped.log.voter and wiped.commit <= committed
    assert not wiped.recovered  # only one of the others answers it: it waits
    bus.cut = set()  # second is back
    wiped.recover(max(first.term, second.term))
    assert wiped.term == 2 and wiped.log.vote == wiped.id  # its vote in term 2 is spent
    for _ in range(50):
        bus.tick()
        if wiped.log.voter:
            break
    assert wiped.log.voter
    leader = bus.nodes[bus.leaders()[0]]
    assert leader.term >= 2 and leader.log.term_at(noop) == 2
    assert wiped.log.term_at(noop) == 2  # the committed no-op, not the deposed leader's entry


# -- replication and commitment ----------------------------------------------------------

def test_entries_commit_on_a_majority_and_apply_in_order_everywhere() -> None:
    bus = cluster()
    leader = bus.elect()
    bus.cut = {frozenset((leader.id, 3 if leader.id != 3 else 2))}
    for n in range(5):
        leader.propose(op(n))
    bus.deliver()
    bus.tick(2)
    assert leader.commit == 6
    bus.cut = set()
    bus.tick(4)
    logs = [[(e.index, e.term) for e in bus.applied[i]] for i in bus.nodes]
    assert logs[0] == logs[1] == logs[2] and len(logs[0]) == 6


def test_an_old_term_entry_on_a_majority_is_not_committed_by_counting() -> None:
    """§3.6.2, the dissertation's Figure 3.7: a leader of term 4 that finds an entry of
    term 2 on a majority must not commit it until an entry of its own term is."""
    log = MemoryLog(term=4, log=[Entry(1, 1, None), Entry(2, 2, op(2))])
    leader = node(1, log=log)
    leader._become_leader()
    leader.ready()
    leader.log.log.pop()  # take back its no-op, to look at counting alone
    leader.step(AppendReply(4, 2, 1, True, 2))
    assert leader.commit == 0  # entry 2 is on 1 and 2, a majority, but of term 2
    leader.log.append([Entry(3, 4, op(3))])
    leader.persisted(3)
    leader.step(AppendReply(4, 2, 1, True, 3))
    assert leader.commit == 3  # with an entry of term 4: both commit


def test_a_conflicting_uncommitted_tail_is_replaced_and_a_committed_one_never() -> None:
    follower = node(2, log=MemoryLog(term=2, log=[Entry(1, 1, None), Entry(2, 2, op(9))]))
    follower.step(AppendEntries(3, 1, 2, 1, 1, (Entry(2, 3, op(2)), Entry(3, 3, op(3))), 1))
    (reply,) = follower.ready().messages
    assert isinstance(reply, AppendReply) and reply.success and reply.index == 3
    assert [e.term for e in follower.log.log] == [1, 3, 3]
    follower.step(AppendEntries(3, 1, 2, 5, 3, (), 3))  # a gap: refused with a hint
    (reply,) = follower.ready().messages
    assert not reply.success and reply.index == 3  # type: ignore[attr-defined]


def test_a_stale_leader_learns_the_new_term_and_steps_down() -> None:
    leader = node(1)
    leader.log.set_hard_state(1, 1)
    leader._become_leader()
    leader.ready()
    leader.step(AppendReply(2, 2, 1, False, 0))
    assert leader.role == FOLLOWER and leader.term == 2


def test_check_quorum_a_cut_off_leader_steps_down_within_an_election_timeout() -> None:
    bus = cluster()
    leader = bus.elect()
    others = [i for i in bus.nodes if i != leader.id]
    bus.cut = {frozenset((leader.id, o)) for o in others}
    for t in range(2 * leader.election_ticks + 1):
        leader.tick()
        bus.deliver()
        if t >= leader.election_ticks - 1:
            assert not leader.lease_valid()  # §6.4.1: it stops serving first
    assert leader.role == FOLLOWER  # §6.2


def test_read_index_waits_for_a_quorum_and_for_the_leaders_first_commit() -> None:
    bus = cluster()
    leader = bus.elect()
    bus.tick(2)
    ctx = leader.read_index()
    assert leader.reads_ready == []  # not before the followers answered
    bus.deliver()
    assert bus.reads[leader.id] == [(ctx, leader.commit)]
    # a leader cut off from everyone never confirms the read, and fails it when it steps down
    bus.cut = {frozenset((leader.id, o)) for o in bus.nodes if o != leader.id}
    ctx = leader.read_index()
    for _ in range(3 * leader.election_ticks):
        leader.tick()
        bus.deliver()
    assert leader.role != LEADER  # (a follower, or already asking for votes of its own)
    assert bus.reads[leader.id][-1] == (ctx, -1)
    with pytest.raises(NotLeader):
        leader.read_index()


def test_a_write_is_acknowledged_once_every_reachable_backup_applied_it() -> None:
    """Beyond Raft (the store's contract): committed is not enough; the leader tells
    the backups the commit index at once and waits until each one it can reach has
    applied the entry; a backup that does not answer in time is not waited for until
    it has caught up."""
    bus = cluster()
    leader = bus.elect()
    bus.tick(4)
    slow = next(i for i in bus.nodes if i != leader.id)
    index, _ = leader.propose(op(1))
    bus.deliver()
    assert leader.commit == index and leader.acknowledged() == index  # both applied it
    assert all(n.commit >= index for n in bus.nodes.values())
    assert all(len(bus.applied[i]) >= index for i in bus.nodes)

    # a backup whose answers stop: the next write waits for it a moment, then not
    bus.cut = {frozenset((leader.id, slow))}
    index, _ = leader.propose(op(2))
    bus.deliver()
    assert leader.commit == index and leader.acknowledged() < index  # it was heard from just now
    bus.tick(leader.ack_wait_ticks + 2 * leader.heartbeat_ticks + 2, only=[leader.id])
    assert leader.acknowledged() == index  # no longer heard from: not waited for
    # back and caught up: waited for again
    bus.cut = set()
    bus.tick(4)
    assert leader.progress[slow].applied == leader.commit and not leader.progress[slow].lagging
    index, _ = leader.propose(op(3))
    bus.deliver()
    assert leader.acknowledged() == index and len(bus.applied[slow]) >= index


def _append_and_replies(leader: Raft) -> tuple[list[AppendEntries], list[Message]]:
    out = leader.ready().messages
    leader.persisted(leader.log.last_index())
    return [m for m in out if isinstance(m, AppendEntries)], [m for m in out if not isinstance(m, AppendEntries)]


def test_a_backup_with_an_append_in_flight_is_told_its_commit_at_once() -> None:
    """§10.2.2: when the first backup's answer commits an entry, the second backup,
    whose append is still on its way back, is told at once (`upto`) instead of after
    its answer; it commits once it holds the leader's entry there (§3.5), and its
    answer to the append brings no second commit heartbeat."""
    bus = cluster()
    leader = bus.elect()
    bus.tick(4)
    first, second = sorted(i for i in bus.nodes if i != leader.id)
    index, _ = leader.propose(op(1))
    appends, _ = _append_and_replies(leader)
    assert sorted(m.dst for m in appends) == [first, second]
    answers = {}
    for m in appends:
        bus.nodes[m.dst].step(m)
        (answers[m.dst],) = bus.nodes[m.dst].ready().messages
    assert bus.nodes[second].commit < index  # it holds the entry, not knowing it is committed
    leader.step(answers[first])
    assert leader.commit == index
    notices = [m for m in leader.ready().messages if isinstance(m, Heartbeat)]
    told = {m.dst: m for m in notices}
    assert told[first].commit == index and told[first].upto == 0  # its answer said it holds it
    assert told[second].commit < index and (told[second].upto, told[second].upto_term) == (index, leader.term)
    bus.nodes[second].step(told[second])
    assert bus.nodes[second].commit == index
    bus.nodes[second].ready()
    leader.step(answers[second])  # the append's answer, after the notice
    assert not [m for m in leader.ready().messages if m.dst == second]  # told already


def test_a_commit_notice_that_overtakes_its_append_waits_for_it() -> None:
    """A pipelined notice may arrive before the append it speaks of: the backup keeps
    it and commits once that append has brought the leader's entry; an entry of
    another term at that index never commits by it."""
    follower = node(2)
    follower.step(AppendEntries(1, 1, 2, 0, 0, (Entry(1, 1, None),), 1))
    follower.ready()
    follower.step(Heartbeat(1, 1, 2, 1, 2, 0, upto=2, upto_term=1))  # entry 2 is on its way
    follower.ready()
    assert follower.commit == 1
    follower.step(AppendEntries(1, 1, 2, 1, 1, (Entry(2, 1, op(2)),), 1))
    follower.ready()
    assert follower.commit == 2

    other = node(3)  # holds an entry 2 of term 1 that the leader of term 2 does not have
    other.step(AppendEntries(1, 1, 3, 0, 0, (Entry(1, 1, None), Entry(2, 1, op(1))), 1))
    other.ready()
    other.step(Heartbeat(2, 1, 3, 1, 2, 0, upto=2, upto_term=2))
    other.ready()
    assert other.commit == 1  # its entry 2 is not the leader's
    other.step(AppendEntries(2, 1, 3, 1, 1, (Entry(2, 2, op(2)),), 1))
    other.ready()
    assert other.commit == 2 and other.log.term_at(2) == 2

    learner = node(3, log=MemoryLog(voter=False))
    learner.step(AppendEntries(1, 1, 3, 0, 0, (Entry(1, 1, None),), 0))
    learner.ready()
    learner.step(Heartbeat(1, 1, 3, 0, 1, 0, upto=1, upto_term=1))
    learner.ready()
    assert learner.commit == 0  # a learner commits on an append's check only (§4.2.1)


def test_an_acknowledgement_does_not_count_a_backup_that_lost_its_state() -> None:
    """A backup that lost its disk says it has applied nothing; the leader believes
    the latest word, not the most it ever heard, and waits for it again."""
    from bazar.replication.raft import HeartbeatReply

    bus = cluster()
    leader = bus.elect()
    for n in range(3):
        leader.propose(op(n))
    bus.tick(4)
    wiped = next(i for i in bus.nodes if i != leader.id)
    assert leader.progress[wiped].applied == leader.commit
    leader.step(HeartbeatReply(leader.term, wiped, leader.id, leader.read_ctx, 0, 0))  # its answer after the wipe
    assert leader.progress[wiped].applied == 0 and not leader.progress[wiped].lagging
    bus.cut = {frozenset((leader.id, wiped))}
    index, _ = leader.propose(op(9))
    bus.deliver()
    assert leader.commit == index and leader.acknowledged() < index  # waits for the wiped backup


def test_a_leader_that_was_starved_steps_down_only_on_what_it_hears_after_it_wakes() -> None:
    """A leader whose process was starved catches up on its ticks quietly (its lease
    runs out at once) and judges check-quorum (§6.2) only once it has read what its
    followers sent meanwhile: merely slow, it stays; really alone, it steps down."""
    bus = cluster()
    leader = bus.elect()
    bus.tick(4)
    for _ in range(leader.election_ticks * 2):  # starved: the ticks come all at once
        leader.tick(quiet=True)
    assert leader.role == LEADER and not leader.lease_valid()
    bus.deliver()  # what the followers sent meanwhile (they answer its heartbeats)
    leader.due()
    assert leader.role == LEADER
    bus.cut = {frozenset((leader.id, i)) for i in bus.nodes if i != leader.id}
    for _ in range(leader.election_ticks * 2):
        leader.tick(quiet=True)
    bus.deliver()
    leader.due()
    assert leader.role == FOLLOWER


def test_a_follower_that_was_starved_campaigns_only_if_the_leader_is_silent_after_it_wakes() -> None:
    bus = cluster()
    leader = bus.elect()
    follower = next(n for n in bus.nodes.values() if n is not leader)
    for _ in range(follower.election_ticks * 3):
        follower.tick(quiet=True)
    assert follower.role == FOLLOWER  # no election on the evidence of its own silence
    leader.tick()
    leader.tick()  # a heartbeat waiting to be read
    bus.deliver()
    follower.due()
    assert follower.role == FOLLOWER and follower.term == leader.term
    for _ in range(follower.election_ticks * 3):
        follower.tick(quiet=True)
    follower.due()  # nothing came: now it campaigns (pre-vote first)
    assert follower.role == PRE_CANDIDATE


def test_messages_travel_as_json() -> None:
    m = AppendEntries(3, 1, 2, 4, 2, (Entry(5, 3, op(5)), Entry(6, 3, None)), 4)
    assert message_from_json(m.to_json()) == m
    for bad in ({"kind": "append"}, {"kind": "x", "term": 1, "src": 1, "dst": 2},
                {**RequestVote(1, 1, 2, 0, 0, True).to_json(), "term": "1"}, [], None):
        with pytest.raises((KeyError, TypeError, ValueError)):
            message_from_json(bad)


# -- random schedules --------------------------------------------------------------------

class World:
    """N cores on a lossy, reordering, duplicating bus with partitions, crashes and disk loss,
    each compacting its log now and then; a snapshot goes over the same bus (§5.3)."""

    def __init__(self, seed: int, n: int = 3):
        self.rng = random.Random(seed)
        self.seed = seed
        self.voters = tuple(range(1, n + 1))
        self.disks = {i: MemoryLog() for i in self.voters}
        self.nodes = {i: node(i, self.voters, self.disks[i], seed=seed) for i in self.voters}
        self.down: set[int] = set()
        self.cut: set[tuple[int, int]] = set()
        self.queue: list[tuple[int, int, Message]] = []  # (deliver at, order, message)
        self.now = 0
        self.order = 0
        self.applied: dict[int, list[Entry]] = {i: [] for i in self.voters}
        self.leaders: dict[int, set[int]] = {}
        self.committed: dict[int, Entry] = {}  # index -> entry, as first seen committed
        self.wiped = False

    def restart(self, i: int, wipe: bool = False) -> None:
        disk = self.disks[i]
        if wipe:
            disk = self.disks[i] = MemoryLog(voter=False)
            self.applied[i] = []
        self.nodes[i] = Raft(id=i, voters=self.voters, log=disk, applied=len(self.applied[i]),
                             rng=random.Random(self.rng.random()))
        self.down.discard(i)

    def step(self) -> None:
        rng = self.rng
        self.now += 1
        roll = rng.random()
        if roll < 0.01 and len(self.down) == 0:
            self.down.add(rng.choice(self.voters))
        elif roll < 0.03 and self.down:
            i = rng.choice(sorted(self.down))
            self.restart(i, wipe=not self.wiped and rng.random() < 0.3)
            self.wiped = self.wiped or not self.disks[i].voter
        elif roll < 0.05:
            a, b = rng.sample(self.voters, 2)
            self.cut.add((a, b))
            if rng.random() < 0.5:
                self.cut.add((b, a))
        elif roll < 0.08:
            self.cut.clear()
        for i in self.voters:
            if i in self.down:
                continue
            n = self.nodes[i]
            disk = self.disks[i]
            if rng.random() < 0.05 and n.applied > disk.snapshot_index:
                disk.compact(rng.randint(disk.snapshot_index + 1, n.applied))  # §5.1: up to an applied index
            if rng.random() < 0.9:
                n.tick()
            if n.role == LEADER and rng.random() < 0.3:
                n.propose(op(self.now))
            self.flush(i)
        due = [q for q in self.queue if q[0] <= self.now]
        self.queue = [q for q in self.queue if q[0] > self.now]
        rng.shuffle(due)
        self.recover_learners()
        for _, _, m in due:
            if m.dst in self.down or (m.src, m.dst) in self.cut:
                if isinstance(m, InstallSnapshot) and m.src not in self.down:
                    self.nodes[m.src].unreachable(m.dst)
                continue
            if isinstance(m, InstallSnapshot):
                self.install(m)
                continue
            self.nodes[m.dst].step(m)
            self.flush(m.dst)
        for i, n in self.nodes.items():
            if n.role == LEADER and i not in self.down:
                self.leaders.setdefault(n.term, set()).add(i)

    def recover_learners(self) -> None:
        """The caller's probe of a replica that lost its state (`Raft.recover`): once a
        majority of the others can answer it, it learns their highest term."""
        for i, n in self.nodes.items():
            if i in self.down or n.log.voter or n.recovered:
                continue
            others = [j for j in self.voters if j != i and j not in self.down
                      and (i, j) not in self.cut and (j, i) not in self.cut]
            if len(others) >= n.majority:
                n.recover(max(self.nodes[j].term for j in others))
                self.flush(i)

    def install(self, m: InstallSnapshot) -> None:
        """The caller's part of §5.3: the leader's state as of its applied index goes to
        the follower, which installs it if newer, and its answer comes back."""
        leader, follower = self.nodes[m.src], self.nodes[m.dst]
        if leader.role != LEADER or leader.term != m.term:
            leader.unreachable(m.dst)
            return
        index = leader.applied
        term = self.disks[m.src].term_at(index)
        assert term is not None
        if follower.accepts_snapshot(m.term, m.src, index):
            self.disks[m.dst].reset(index, term)
            self.applied[m.dst] = list(self.applied[m.src][:index])
            follower.restore(index, term)
        answer = AppendReply(follower.term, m.dst, m.src, follower.term == m.term, follower.commit, follower.commit,
                             not follower.log.voter)
        self.flush(m.dst)
        self.order += 1
        self.queue.append((self.now + 1, self.order, answer))

    def flush(self, i: int) -> None:
        ready = self.nodes[i].ready()
        self.nodes[i].persisted(self.disks[i].last_index())
        for e in ready.committed:
            first = self.committed.setdefault(e.index, e)
            assert first == e, f"seed {self.seed}: index {e.index} committed as {first} and as {e}"
            self.applied[i].append(e)
        for m in ready.messages:
            if self.rng.random() < 0.1:
                if isinstance(m, InstallSnapshot):
                    self.nodes[i].unreachable(m.dst)  # a transfer that fails is known to its sender
                continue  # lost
            copies = 2 if self.rng.random() < 0.05 else 1
            for _ in range(copies):
                self.order += 1
                self.queue.append((self.now + self.rng.randrange(0, 4), self.order, m))

    def check(self) -> None:
        for term, ids in self.leaders.items():
            assert len(ids) == 1, f"seed {self.seed}: two leaders in term {term}: {ids}"
        # state machine safety: every replica applied a prefix of one sequence
        for i, entries in self.applied.items():
            for e in entries:
                assert self.committed[e.index] == e, f"seed {self.seed}: replica {i} applied {e}"
        # leader completeness: every live leader holds every committed entry, and
        # acknowledges only what is committed and applied
        for i, n in self.nodes.items():
            if n.role == LEADER and i not in self.down:
                assert n.acknowledged() <= min(n.commit, n.applied), f"seed {self.seed}: {i} acknowledged too much"
                for index, e in self.committed.items():
                    if e.term <= n.term and index > n.log.snapshot_index:
                        assert n.log.entries(index, index + 1) == [e], f"seed {self.seed}: leader {i} lacks {e}"

    def heal_and_settle(self) -> None:
        self.cut.clear()
        for i in sorted(self.down):
            self.restart(i)
        for _ in range(400):
            self.step_quiet()
        leaders = [i for i, n in self.nodes.items() if n.role == LEADER]
        assert len(leaders) == 1, f"seed {self.seed}: no single leader after healing: {leaders}"
        logs = {i: [(e.index, e.term) for e in self.applied[i]] for i in self.voters}
        assert logs[1] == logs[2] == logs[3], f"seed {self.seed}: replicas differ after healing"
        assert all(d.voter for d in self.disks.values()), f"seed {self.seed}: a learner never caught up"

    def step_quiet(self) -> None:
        self.now += 1
        self.recover_learners()
        for i in self.voters:
            self.nodes[i].tick()
            self.flush_reliably(i)
        due = sorted(q for q in self.queue if q[0] <= self.now)
        self.queue = [q for q in self.queue if q[0] > self.now]
        for _, _, m in due:
            if isinstance(m, InstallSnapshot):
                self.install(m)
                continue
            self.nodes[m.dst].step(m)
            self.flush_reliably(m.dst)

    def flush_reliably(self, i: int) -> None:
        ready = self.nodes[i].ready()
        self.nodes[i].persisted(self.disks[i].last_index())
        for e in ready.committed:
            assert self.committed.setdefault(e.index, e) == e
            self.applied[i].append(e)
        for m in ready.messages:
            self.order += 1
            self.queue.append((self.now + 1, self.order, m))


SEEDS = int(os.environ.get("BAZAR_RAFT_SEEDS", "300"))
CHUNKS = 10


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_schedules_keep_raft_safety(chunk: int) -> None:
    per = -(-SEEDS // CHUNKS)
    for seed in range(chunk * per, chunk * per + per):
        world = World(seed)
        for _ in range(600):
            world.step()
            world.check()
        world.heal_and_settle()
        world.check()
        assert len(world.committed) > 1, f"seed {seed}: nothing was ever committed"


def test_candidates_that_lose_step_back() -> None:
    bus = cluster()
    bus.elect()
    n = bus.nodes[2] if bus.nodes[2].role != LEADER else bus.nodes[3]
    n._campaign(pre=False)
    assert n.role == CANDIDATE
    for _ in range(100):
        bus.tick()
    assert len(bus.leaders()) == 1
