"""Raft, as a state machine without I/O.

The protocol of Diego Ongaro's dissertation, "Consensus: Bridging Theory and
Practice" (Stanford, 2014), shaped like etcd-io/raft: `tick()` advances logical
time, `step(message)` feeds an input, `propose(op)` and `read_index(ctx)` are the
leader's two client calls, and `ready()` hands back what the caller must do next:
persist (the `Log` was written through; the caller commits it durably), then send
`messages`, then apply `committed` entries and answer `reads`. No sockets, clocks or
threads live here, so every schedule can be replayed by a test.

Each rule lives in one named place with its section beside it:

- §3.3/§3.4  terms; a server that sees a newer term becomes a follower (`_become_follower`).
- §3.4       elections with randomized timeouts (`_campaign`, `_reset_timeout`).
- §3.5       log replication and the log-matching check (`_on_append`, `_send_append`).
- §3.6.1     votes only for a log at least as up to date as ours (`_log_ok_for`).
- §3.6.2     only entries of the current term are committed by counting replicas (`_maybe_commit`).
- §3.8       term, vote and log are persisted before any message that depends on them leaves
             (the caller's part of the `ready()` contract).
- §4.2.1     learners: a replica that lost its state catches up without voting (`voter`),
             and its answers count for no majority: commit, check-quorum, lease (`learner`).
- Recovery from a lost disk (beyond Raft, which assumes stable storage; Viewstamped
  Replication Revisited §4.3): a learner rejoins only after it has heard the term of a
  majority of the others and taken it with its vote spent (`recover`), then caught up.
- §4.2.3     a server that hears from a leader ignores vote requests for the minimum
             election timeout (`_on_vote`), so a removed or restarted server cannot disrupt it.
- §6.2       check-quorum: a leader that has not heard from a majority within an election
             timeout steps down (`_tick_leader`).
- §6.3       request ids make retried commands apply once (the store's requests table).
- §6.4       a new leader commits a no-op of its own term first (`_become_leader`);
             ReadIndex (`read_index`) and, §6.4.1, the lease (`lease_valid`).
- Bazar's acknowledgement rule (beyond Raft, from the store's contract): a committed
  entry is acknowledged (`acked`) once every backup the leader can reach has applied
  it too; the leader tells them the commit index at once (`_send_commits`), and a
  backup that does not answer in time stops being waited for until it has caught up
  (`_update_acked`).
- §9.6       pre-vote: a candidate first asks whether it could win, persisting nothing
             (`_campaign(pre=True)`).
- §10.2.1    the leader writes its log in parallel with sending it (the caller's part:
             `persisted` counts the leader once its own write is on disk).
- §10.2.2    pipelining, for the commit index only: a follower with an append still in
             flight is told at once what of it is committed, checked by §3.5's
             log-matching rule on its side (`_flush_commits`, `_take_upto`); appends
             stay one in flight per follower, so they arrive in order.
- §5.1–5.4   log compaction: the caller compacts its log up to an applied index (the
             state machine's tables are the snapshot); a follower that needs entries
             the leader no longer holds is sent a snapshot (`InstallSnapshot`, carried
             out by the caller, which steps the follower's answer back in), and a
             follower installs one only if it is newer than what it has (`restore`).

Names: the rest of Bazar says *epoch* for term and *seq* for index.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Protocol

from attrs import NOTHING, asdict, define, field, frozen

FOLLOWER = "follower"
PRE_CANDIDATE = "pre-candidate"
CANDIDATE = "candidate"
LEADER = "leader"

MAX_BATCH = 512  # entries in one AppendEntries
SNAPSHOT_PATIENCE = 40  # election timeouts a snapshot's transfer may take before it is tried again


@frozen
class Entry:
    """One log entry: its index, the term of the leader that created it, and the
    operation (a JSON object with "op" and "rid"; None for a leader's no-op)."""

    index: int
    term: int
    op: dict[str, Any] | None

    def to_json(self) -> list[Any]:
        return [self.index, self.term, self.op]

    @classmethod
    def from_json(cls, data: Any) -> Entry:
        index, term, op = data
        if op is not None and not isinstance(op, dict):
            raise ValueError("an entry's op is an object or null")
        return cls(int(index), int(term), op)


# -- messages -------------------------------------------------------------------------

_KINDS: dict[str, type[Message]] = {}


@frozen
class Message:
    """Every message carries the sender's term, its id and the receiver's id."""

    kind: ClassVar[str] = ""
    term: int
    src: int
    dst: int

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _KINDS[cls.kind] = cls

    def to_json(self) -> dict[str, Any]:
        data = asdict(self, recurse=False)
        if "entries" in data:
            data["entries"] = [e.to_json() for e in data["entries"]]
        data["kind"] = self.kind
        return data


def message_from_json(data: Any) -> Message:
    """A message from its JSON form; ValueError/KeyError/TypeError when malformed."""
    if not isinstance(data, dict):
        raise TypeError("a message is an object")
    cls = _KINDS[data["kind"]]
    values: dict[str, Any] = {}
    for a in cls.__attrs_attrs__:
        if a.name not in data and a.default is not NOTHING:
            continue  # a field added later: an older sender leaves it out
        value = data[a.name]
        if a.name == "entries":
            value = tuple(Entry.from_json(e) for e in value)
        elif a.type in ("int", int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{a.name} must be an integer")
        elif a.type in ("bool", bool):
            value = bool(value)
        values[a.name] = value
    return cls(**values)


@frozen
class AppendEntries(Message):
    kind: ClassVar[str] = "append"
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@frozen
class AppendReply(Message):
    kind: ClassVar[str] = "append_reply"
    success: bool
    index: int  # success: the highest index known to match; refusal: a hint (the follower's last index)
    commit: int = 0  # the follower's commit index: applied by the time this reply leaves
    learner: bool = False  # the sender lost its state and has not rejoined: it counts for no majority


@frozen
class Heartbeat(Message):
    kind: ClassVar[str] = "heartbeat"
    commit: int  # min(the follower's match, the leader's commit): safe for it to commit
    leader_commit: int  # the leader's commit index (a learner is caught up once it holds it)
    ctx: int  # the read round this heartbeat confirms (§6.4)
    # A committed index the follower may not hold yet, from an append still in flight
    # (§10.2.2), and the term of the leader's entry there: the follower commits up to it
    # once its own entry at that index has that term (§3.5, the Log Matching Property)
    upto: int = 0
    upto_term: int = 0


@frozen
class HeartbeatReply(Message):
    kind: ClassVar[str] = "heartbeat_reply"
    ctx: int
    last_index: int
    commit: int = 0  # as in AppendReply
    learner: bool = False  # as in AppendReply


@frozen
class InstallSnapshot(Message):
    """§5.3: the follower needs entries this leader has compacted away. The caller
    streams the leader's state (as of an index it reads then) to the follower and
    steps the follower's `AppendReply` back in; this message itself is never sent."""

    kind: ClassVar[str] = "install_snapshot"


@frozen
class RequestVote(Message):
    kind: ClassVar[str] = "vote"
    last_index: int
    last_term: int
    pre: bool


@frozen
class VoteReply(Message):
    kind: ClassVar[str] = "vote_reply"
    granted: bool
    pre: bool


class Log(Protocol):
    """What the core needs of durable storage. Writes may be buffered: the caller
    makes them durable before it sends the messages of the same `ready()`."""

    term: int
    vote: int | None
    voter: bool
    snapshot_index: int  # the last index the log was compacted up to (0: never); its term is term_at()

    def set_hard_state(self, term: int, vote: int | None) -> None: ...

    def set_voter(self) -> None: ...

    def last_index(self) -> int: ...

    def term_at(self, index: int) -> int | None: ...

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries lo..hi-1 (hi exclusive)."""
        ...

    def append(self, entries: list[Entry]) -> None:
        """Add entries; any entry at or after the first one's index is replaced."""
        ...


class NotLeader(Exception):
    def __init__(self, leader: int | None):
        super().__init__(leader)
        self.leader = leader


@define
class Progress:
    """The leader's view of one follower (§3.5: nextIndex, matchIndex)."""

    match: int = 0
    next: int = 1
    inflight: bool = False
    sent_at: int = 0  # tick at which the append in flight left
    sent: int = 0  # the last index of the append in flight
    active: bool = True  # heard from since the last check-quorum round (§6.2)
    snapshotting: bool = False  # a snapshot is on its way to it (§5.3): no appends meanwhile
    applied: int = 0  # the highest index it said it has applied
    heard: int = 0  # tick of its last answer
    commit_sent: int = 0  # the highest commit index it has been told (or `Heartbeat.upto`)
    lagging: bool = False  # not waited for before an acknowledgement until it has caught up
    learner: bool = False  # it says it lost its state and has not rejoined: counted for no majority


@frozen
class ReadState:
    ctx: int
    index: int


@define
class Ready:
    messages: list[Message]
    committed: list[Entry]
    reads: list[ReadState]


@define
class _ReadRound:
    ctx: int
    index: int
    acks: set[int]


@define
class Raft:
    id: int
    voters: tuple[int, ...]
    log: Log
    applied: int = 0
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    rng: random.Random = field(factory=random.Random)
    check_quorum: bool = True
    pre_vote: bool = True
    ack_wait_ticks: int = 4  # how long an acknowledgement waits for a reachable backup's apply

    role: str = FOLLOWER
    leader: int | None = None
    commit: int = 0
    ticks: int = 0  # logical time, for the lease
    elapsed: int = 0
    timeout: int = 0
    beat: int = 0
    votes: dict[int, bool] = field(factory=dict)
    progress: dict[int, Progress] = field(factory=dict)
    outbox: list[Message] = field(factory=list)
    reads_ready: list[ReadState] = field(factory=list)
    read_rounds: list[_ReadRound] = field(factory=list)
    deferred_reads: list[int] = field(factory=list)
    read_ctx: int = 0
    lease_from: int | None = None  # tick at which the last heartbeat round acked by a majority was sent
    round_sent: dict[int, int] = field(factory=dict)  # read ctx -> tick sent
    term_start: int = 0  # index of this leader's no-op
    stable: int = 0  # the last index of our own log known to be on disk
    acked: int = 0  # the highest committed index that may be acknowledged to clients
    commits_due: bool = False  # the backups are to be told a new commit index (`_send_commits`)
    committed_at: list[tuple[int, int]] = field(factory=list)  # (commit index, tick) of commits not yet acked
    elections: int = 0  # campaigns this replica started as a candidate (a term of its own; pre-votes not counted)
    recovered: bool = False  # a learner that has learned the term a majority of the others know (`recover`)
    upto: tuple[int, int] = (0, 0)  # a committed (index, term) a leader told us of, maybe not held yet (§10.2.2)

    def __attrs_post_init__(self) -> None:
        # Only applied entries are known committed after a restart (commit is volatile, §3.8).
        self.commit = self.applied
        self.recovered = self.log.voter
        self.stable = self.log.last_index()  # what a new process finds is on disk
        self._reset_timeout()
        # A process that has just started knows no leader: its first timeout is half the
        # usual, so a store that starts elects sooner. A running leader is not disturbed:
        # its followers hear it (§4.2.3), and a pre-vote asks before any term moves (§9.6).
        self.timeout = (self.election_ticks + self.rng.randrange(self.election_ticks)) // 2

    # -- facts ------------------------------------------------------------------------
    @property
    def term(self) -> int:
        return self.log.term

    @property
    def majority(self) -> int:
        return len(self.voters) // 2 + 1

    @property
    def peers(self) -> list[int]:
        return [v for v in self.voters if v != self.id]

    def last(self) -> tuple[int, int]:
        index = self.log.last_index()
        return index, self.log.term_at(index) or 0

    def lease_valid(self) -> bool:
        """§6.4.1: a leader whose heartbeat round, sent less than a minimum election
        timeout ago, was acknowledged by a majority knows no other leader can exist
        yet: followers refuse votes that long after hearing from it (§4.2.3)."""
        if self.role != LEADER:
            return False
        if len(self.voters) == 1:
            return True
        return self.lease_from is not None and self.ticks - self.lease_from < self.election_ticks - 1

    @property
    def learner(self) -> bool:
        """It lost its state and has not rejoined: its answers say so, and count for no
        majority (§4.2.1)."""
        return not self.log.voter

    def committed_in_term(self) -> bool:
        """Has this leader committed an entry of its own term (§6.4, step 1)?"""
        return self.role == LEADER and self.commit >= self.term_start

    # -- time -------------------------------------------------------------------------
    def _reset_timeout(self) -> None:
        # §3.4: randomized in [T, 2T) so that split votes are rare
        self.elapsed = 0
        self.timeout = self.election_ticks + self.rng.randrange(self.election_ticks)

    def tick(self, quiet: bool = False) -> None:
        """One tick of logical time. `quiet`: the caller is catching up on ticks it
        missed (its process was starved or paused) and has not yet read what its peers
        sent meanwhile; the timers advance (the lease runs out, §6.4.1), but a timeout
        is only noted, and acted on by `due()` once those messages have been read: a
        process that was merely slow must not start an election or step down on the
        evidence of its own silence."""
        self.ticks += 1
        if self.role == LEADER:
            self._tick_leader(quiet)
            return
        self.elapsed += 1
        if self.elapsed >= self.timeout and self.log.voter and not quiet:
            self._campaign(pre=self.pre_vote)

    def due(self) -> None:
        """Act on what quiet ticks left due (see `tick`)."""
        if self.role == LEADER:
            if self.elapsed >= self.election_ticks:
                self._check_quorum()
        elif self.elapsed >= self.timeout and self.log.voter:
            self._campaign(pre=self.pre_vote)

    def _tick_leader(self, quiet: bool = False) -> None:
        self.beat += 1
        self.elapsed += 1
        self._update_acked()
        if self.beat >= self.heartbeat_ticks:
            self.beat = 0
            self._broadcast_heartbeat()
        if self.elapsed >= self.election_ticks and not quiet:
            self._check_quorum()

    def _check_quorum(self) -> None:
        """§6.2: step down when a majority has not been heard from within an election timeout."""
        self.elapsed = 0
        if self.check_quorum:
            active = 1 + sum(1 for p, pr in self.progress.items() if pr.active and not pr.learner)
            for pr in self.progress.values():
                pr.active = False
            if active < self.majority:
                self._become_follower(self.term, None)

    # -- roles ------------------------------------------------------------------------
    def _become_follower(self, term: int, leader: int | None) -> None:
        if term > self.log.term:
            self.log.set_hard_state(term, None)
        self.role = FOLLOWER
        self.leader = leader
        self.progress = {}
        self.lease_from = None
        self._fail_reads()
        self._reset_timeout()

    def _campaign(self, pre: bool) -> None:
        """§3.4 (and §9.6 when `pre`): ask every voter for its vote."""
        if pre:
            self.role = PRE_CANDIDATE
            term = self.term + 1  # asked for, not taken: nothing is persisted (§9.6)
        else:
            self.role = CANDIDATE
            term = self.term + 1
            self.log.set_hard_state(term, self.id)
            self.elections += 1
        self.leader = None
        self.votes = {self.id: True}
        self._reset_timeout()
        if self._won():
            return
        last_index, last_term = self.last()
        for peer in self.peers:
            self.outbox.append(RequestVote(term, self.id, peer, last_index, last_term, pre))

    def _won(self) -> bool:
        granted = sum(1 for ok in self.votes.values() if ok)
        if granted < self.majority:
            return False
        if self.role == PRE_CANDIDATE:
            self._campaign(pre=False)
        else:
            self._become_leader()
        return True

    def _become_leader(self) -> None:
        self.role = LEADER
        self.leader = self.id
        self.elapsed = self.beat = 0
        last_index, _ = self.last()
        self.progress = {p: Progress(match=0, next=last_index + 1, heard=self.ticks) for p in self.peers}
        self.lease_from = None
        self.acked = self.applied  # nothing of this term has been acknowledged
        self.committed_at = []
        self.stable = min(self.stable, last_index)
        # §6.4 (and §3.6.2): a leader commits a blank entry of its own term at the start,
        # which commits everything before it and tells it its commit index.
        self.term_start = last_index + 1
        self.log.append([Entry(self.term_start, self.term, None)])
        self._maybe_commit()
        self._broadcast_append()

    # -- client calls -----------------------------------------------------------------
    def propose(self, op: dict[str, Any]) -> tuple[int, int]:
        """Append `op` to the leader's log: its (index, term)."""
        if self.role != LEADER:
            raise NotLeader(self.leader)
        index = self.log.last_index() + 1
        self.log.append([Entry(index, self.term, op)])
        self._maybe_commit()
        self._broadcast_append()
        return index, self.term

    def read_index(self) -> int:
        """§6.4 ReadIndex: a context whose ReadState (with the index to wait for) comes
        out of `ready()` once a majority confirmed this leader is still the leader."""
        if self.role != LEADER:
            raise NotLeader(self.leader)
        self.read_ctx += 1
        ctx = self.read_ctx
        if len(self.voters) == 1:
            self.reads_ready.append(ReadState(ctx, self.commit))
        elif not self.committed_in_term():
            self.deferred_reads.append(ctx)  # step 1: wait for the no-op of this term
        else:
            self._start_read_round(ctx)
        return ctx

    def _start_read_round(self, ctx: int) -> None:
        self.read_rounds.append(_ReadRound(ctx, self.commit, {self.id}))
        self.round_sent[ctx] = self.ticks
        self._broadcast_heartbeat(ctx)

    def _fail_reads(self) -> None:
        for r in self.read_rounds:
            if r.index >= 0:  # (lease-only rounds have no reader)
                self.reads_ready.append(ReadState(r.ctx, -1))
        for ctx in self.deferred_reads:
            self.reads_ready.append(ReadState(ctx, -1))
        self.read_rounds = []
        self.deferred_reads = []
        self.round_sent = {}

    # -- sending ----------------------------------------------------------------------
    def _broadcast_append(self) -> None:
        for peer in self.peers:
            self._send_append(peer)

    def _send_append(self, peer: int) -> None:
        pr = self.progress[peer]
        if pr.inflight:
            return  # one AppendEntries in flight per follower keeps them in order
        last_index = self.log.last_index()
        prev = pr.next - 1
        prev_term = self.log.term_at(prev)
        if prev_term is None or prev < self.log.snapshot_index:
            # §5.3: compacted away here: the follower gets the state instead
            pr.inflight = pr.snapshotting = True
            pr.sent_at = self.ticks
            self.outbox.append(InstallSnapshot(self.term, self.id, peer))
            return
        entries = self.log.entries(pr.next, min(last_index + 1, pr.next + MAX_BATCH))
        if not entries and pr.match >= last_index and pr.match > 0:
            return
        pr.inflight = True
        pr.sent_at = self.ticks
        pr.sent = prev + len(entries)
        pr.commit_sent = max(pr.commit_sent, min(self.commit, prev + len(entries)))
        self.outbox.append(AppendEntries(self.term, self.id, peer, prev, prev_term, tuple(entries), self.commit))

    def _broadcast_heartbeat(self, ctx: int | None = None) -> None:
        if ctx is None:
            # every heartbeat is also a read round: its acks renew the lease
            self.read_ctx += 1
            ctx = self.read_ctx
            self.round_sent[ctx] = self.ticks
            self.read_rounds.append(_ReadRound(ctx, -1, {self.id}))
            self._drop_old_rounds()
        for peer in self.peers:
            pr = self.progress[peer]
            pr.commit_sent = max(pr.commit_sent, min(pr.match, self.commit))
            self.outbox.append(Heartbeat(self.term, self.id, peer, min(pr.match, self.commit), self.commit, ctx))

    def _send_commits(self) -> None:
        """Tell the backups the commit index as soon as they may apply more: an
        acknowledgement waits for the reachable backups' apply (the rule at the top).
        Noted now, sent by `ready()`: one message per backup for everything this turn
        committed, and none to a backup that an append of this turn already told."""
        self.commits_due = True

    def _flush_commits(self) -> None:
        """The commit heartbeats `_send_commits` noted. A heartbeat of the newest read
        round: an answer to it confirms the leadership after that round started.

        Pipelining (§10.2.2): a follower whose append is still in flight is told at
        once what of that append is committed (`upto`), rather than once its reply is
        back: a second message in flight, which the follower takes only if the append
        came first (its entry at `upto` is then the leader's, §3.5). An acknowledgement
        waits for the apply of the slower backup: it is told one round trip sooner. A
        follower that has not got the append yet keeps `upto` until it has
        (`_take_upto`), so the leader counts it as told either way."""
        self.commits_due = False
        if self.role != LEADER:
            return
        for peer in self.peers:
            pr = self.progress[peer]
            commit = min(pr.match, self.commit)
            upto = min(pr.sent, self.commit) if pr.inflight and not pr.snapshotting else 0
            upto_term = self.log.term_at(upto) if upto > max(commit, pr.commit_sent) else None
            if upto_term is None:
                upto = 0
                if commit <= pr.commit_sent:
                    continue
            pr.commit_sent = max(pr.commit_sent, commit, upto)
            self.outbox.append(Heartbeat(self.term, self.id, peer, commit, self.commit, self.read_ctx,
                                         upto, upto_term or 0))

    def _drop_old_rounds(self) -> None:
        """Lease-only rounds that no majority answered within an election timeout are
        dead; client read rounds stay until answered or the leader steps down."""
        horizon = self.ticks - self.election_ticks
        keep = []
        for r in self.read_rounds:
            if r.index < 0 and self.round_sent.get(r.ctx, 0) < horizon:
                self.round_sent.pop(r.ctx, None)
                continue
            keep.append(r)
        self.read_rounds = keep

    def persisted(self, index: int) -> None:
        """The caller made our log durable up to `index`. A leader sends its entries
        while it writes them to its own disk, and counts itself for them only from
        now on (§10.2.1)."""
        self.stable = max(self.stable, min(index, self.log.last_index()))
        if self.role == LEADER:
            self._maybe_commit()

    def unreachable(self, peer: int) -> None:
        """The caller could not deliver to `peer`: the message is lost, try again later."""
        pr = self.progress.get(peer)
        if pr is not None:
            pr.inflight = pr.snapshotting = False

    def restore(self, index: int, term: int) -> None:
        """§5.3, a follower: the caller has replaced the state machine with a snapshot as
        of `index` (of `term`), and the log with an empty one compacted up to there.
        Everything up to `index` is committed and applied."""
        assert self.log.snapshot_index == index and self.log.term_at(index) == term, "the log was not reset"
        self.commit = max(self.commit, index)
        self.applied = index
        self.stable = max(self.stable, index)

    def accepts_snapshot(self, term: int, leader: int, index: int) -> bool:
        """Is a snapshot from `leader` in `term`, as of `index`, one to install now?
        A leader of an older term is refused; one of this term (or a newer one) is
        followed like any leader's message; a snapshot no newer than our commit is
        not installed (§5.3: it would take us back)."""
        if term < self.term or leader not in self.voters or leader == self.id:
            return False
        if term > self.term or self.role != FOLLOWER or self.leader != leader:
            self._become_follower(term, leader)
        self.elapsed = 0
        return index > self.commit

    # -- receiving --------------------------------------------------------------------
    def step(self, m: Message) -> None:
        if m.dst != self.id or m.src not in self.voters or m.src == self.id:
            return
        if m.term > self.term:
            if isinstance(m, RequestVote):
                if self._hears_leader() and m.src != self.leader:
                    return  # §4.2.3: ignore it, and keep our term
                if m.pre:
                    self._on_vote(m)  # §9.6: a pre-vote never changes our term
                    return
                self._become_follower(m.term, None)
            elif isinstance(m, VoteReply) and m.pre and m.granted:
                pass  # a granted pre-vote carries the term asked for, not one in use
            elif isinstance(m, (AppendEntries, Heartbeat)):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            # A stale leader learns our term from the refusal and steps down (§3.3);
            # pre-votes from behind are refused the same way.
            if isinstance(m, (AppendEntries, Heartbeat)):
                self.outbox.append(AppendReply(self.term, self.id, m.src, False, self.log.last_index(), self.commit,
                                               self.learner))
            elif isinstance(m, RequestVote):
                self.outbox.append(VoteReply(self.term, self.id, m.src, False, m.pre))
            return
        if isinstance(m, RequestVote):
            self._on_vote(m)
        elif isinstance(m, VoteReply):
            self._on_vote_reply(m)
        elif isinstance(m, AppendEntries):
            self._on_append(m)
        elif isinstance(m, Heartbeat):
            self._on_heartbeat(m)
        elif isinstance(m, AppendReply):
            self._on_append_reply(m)
        elif isinstance(m, HeartbeatReply):
            self._on_heartbeat_reply(m)

    def _hears_leader(self) -> bool:
        """§4.2.3: within the minimum election timeout of hearing from a leader."""
        if self.role == LEADER:
            return self.check_quorum
        return self.leader is not None and self.elapsed < self.election_ticks

    def _log_ok_for(self, m: RequestVote) -> bool:
        """§3.6.1: the candidate's log is at least as up to date as ours."""
        last_index, last_term = self.last()
        return (m.last_term, m.last_index) >= (last_term, last_index)

    def _on_vote(self, m: RequestVote) -> None:
        if self.learner:
            # §4.2.1: a replica catching up (it lost its state) does not vote
            self.outbox.append(VoteReply(self.term, self.id, m.src, False, m.pre))
            return
        if m.pre:
            grant = m.term > self.term and self._log_ok_for(m)
            self.outbox.append(VoteReply(m.term if grant else self.term, self.id, m.src, grant, True))
            return
        grant = self.log.vote in (None, m.src) and self._log_ok_for(m)
        if grant:
            self.log.set_hard_state(self.term, m.src)
            self._reset_timeout()
        self.outbox.append(VoteReply(self.term, self.id, m.src, grant, False))

    def _on_vote_reply(self, m: VoteReply) -> None:
        wanted = PRE_CANDIDATE if m.pre else CANDIDATE
        if self.role != wanted:
            return
        self.votes[m.src] = m.granted
        if self._won():
            return
        refused = sum(1 for ok in self.votes.values() if not ok)
        if refused >= self.majority:
            self._become_follower(self.term, None)

    def _on_append(self, m: AppendEntries) -> None:
        self.role, self.leader = FOLLOWER, m.src
        self.elapsed = 0
        if m.prev_index < self.commit:
            # already committed here: never touch it; say how far we are
            self.outbox.append(AppendReply(self.term, self.id, m.src, True, self.commit, self.commit,
                                           self.learner))
            return
        if self.log.term_at(m.prev_index) != m.prev_term:
            # §3.5: the logs differ at prev_index: the leader must go further back
            hint = min(m.prev_index - 1, self.log.last_index())
            self.outbox.append(AppendReply(self.term, self.id, m.src, False, max(hint, 0), self.commit,
                                           self.learner))
            return
        fresh: list[Entry] = []
        for i, e in enumerate(m.entries):
            if self.log.term_at(e.index) != e.term:
                # §3.5: a conflicting entry and all that follow it go; committed ones never do
                assert e.index > self.commit, "a committed entry would be overwritten"
                fresh = list(m.entries[i:])
                break
        if fresh:
            self.log.append(fresh)
        match = m.prev_index + len(m.entries)
        self._advance_commit(min(m.commit, match))
        if not self.learner:
            self._take_upto()  # (the append that a pipelined commit heartbeat overtook)
        self.outbox.append(AppendReply(self.term, self.id, m.src, True, match, self.commit, self.learner))
        self._maybe_join(m.commit)

    def _on_heartbeat(self, m: Heartbeat) -> None:
        self.role, self.leader = FOLLOWER, m.src
        self.elapsed = 0
        if not self.learner:
            # (a heartbeat's commit is min(match, commit): the leader has checked that our
            # log matches its own up to there. A learner's may not: it lost what the leader
            # checked, and may hold other entries at those indexes since. It commits only
            # on an AppendEntries, after the log-matching check, §3.5.)
            self._advance_commit(min(m.commit, self.log.last_index()))
            if m.upto > self.upto[0]:
                self.upto = (m.upto, m.upto_term)
            self._take_upto()
        self.outbox.append(HeartbeatReply(self.term, self.id, m.src, m.ctx, self.log.last_index(), self.commit,
                                          self.learner))
        self._maybe_join(m.leader_commit)

    def _take_upto(self) -> None:
        """Commit up to a leader's `Heartbeat.upto` once our entry there has its term:
        by §3.5 our log is then the leader's up to there, and the leader had committed
        it (a committed entry is in the log of every later leader, §3.6.3: the pair
        is never stale, whatever term we are in when the entry comes)."""
        index, term = self.upto
        if index > self.commit and self.log.term_at(index) == term:
            self._advance_commit(index)

    def _maybe_join(self, leader_commit: int) -> None:
        """§4.2.1: a learner that holds everything the leader has committed votes again,
        once it has recovered (`recover`): a leader of a term it has not yet caught up
        with may be a deposed one, whose commit index is not the store's."""
        if self.learner and self.recovered and self.commit >= leader_commit:
            self.log.set_voter()

    def recover(self, term: int) -> None:
        """A replica that lost its state has heard from a majority of the others, the
        highest term among them being `term` (Viewstamped Replication's recovery, as in
        Revisiting VR §4.3; Raft assumes stable storage and has no rule for this). Any
        majority it was part of before its loss shares a member with the ones that
        answered, so no term it voted in is above `term`. It takes that term with its
        vote spent, since it may have voted in it already: a leader of an older term
        can no longer append to it, and it votes again only in a later term. Until it
        has rejoined, its answers say `learner` and count for no majority (§4.2.1), so
        a deposed leader cannot commit with what it forgot."""
        if self.log.voter or self.recovered:
            return
        if term > self.term:
            self.log.set_hard_state(term, self.id)  # one write: the term with its vote spent
            self._become_follower(term, None)
        elif self.log.vote is None:
            self.log.set_hard_state(self.term, self.id)
        self.recovered = True

    def _advance_commit(self, index: int) -> None:
        if index > self.commit:
            self.commit = index

    def _on_append_reply(self, m: AppendReply) -> None:
        if self.role != LEADER:
            return
        pr = self.progress[m.src]
        pr.learner = m.learner
        pr.active = True
        pr.inflight = pr.snapshotting = False
        self._heard(pr, m.commit)
        if m.success:
            if m.index > pr.match:
                pr.match = m.index
            pr.next = max(pr.next, pr.match + 1)
            self._maybe_commit()
            self._send_commits()
        else:
            # §3.5: back up, at once to the follower's last index when it is shorter.
            # A follower that lost its disk holds less than it once acknowledged:
            # its match goes back too, so that it is sent everything again.
            pr.match = min(pr.match, m.index)
            pr.next = max(pr.match + 1, min(pr.next - 1, m.index + 1))
        self._send_append(m.src)

    def _on_heartbeat_reply(self, m: HeartbeatReply) -> None:
        if self.role != LEADER:
            return
        pr = self.progress[m.src]
        pr.learner = m.learner
        pr.active = True
        self._heard(pr, m.commit)
        if m.last_index < pr.match:  # it lost entries it had (a wiped disk): start again from there
            pr.match = m.last_index
            pr.next = m.last_index + 1
        if m.learner and m.commit < pr.match:
            # it lost its state: only what it has committed since is known to match ours
            pr.match = m.commit
            pr.next = m.commit + 1
        if pr.inflight and self.ticks - pr.sent_at >= self.election_ticks * (SNAPSHOT_PATIENCE if pr.snapshotting
                                                                           else 1) // 2:
            # the follower answers beats, so that append (or its answer) was lost; a
            # snapshot's transfer is given much longer (its caller says when it fails)
            pr.inflight = pr.snapshotting = False
        if pr.match < self.log.last_index() or m.last_index != pr.match:
            self._send_append(m.src)
        self._ack_read(m.ctx, m.src)

    def _ack_read(self, ctx: int, peer: int) -> None:
        pr = self.progress.get(peer)
        if pr is not None and pr.learner:
            return  # a learner's word renews no lease and confirms no read (§4.2.1)
        done = [r for r in self.read_rounds if r.ctx <= ctx]
        if not done:
            return
        # a quorum's ack of round ctx also confirms every earlier round (§6.4)
        for r in done:
            r.acks.add(peer)
        newest = done[-1]
        if len(newest.acks) < self.majority:
            return
        sent = self.round_sent.get(newest.ctx)
        if sent is not None and (self.lease_from is None or sent > self.lease_from):
            self.lease_from = sent
        for r in done:
            self.round_sent.pop(r.ctx, None)
            if r.index >= 0:
                self.reads_ready.append(ReadState(r.ctx, r.index))
        self.read_rounds = [r for r in self.read_rounds if r.ctx > ctx]

    def _maybe_commit(self) -> None:
        """§3.6.2: the highest index held by a majority commits, but only if that entry
        is of the current term (older entries commit with it, never by counting)."""
        own = min(self.stable, self.log.last_index())
        # a learner holds entries but is no member of a majority (§4.2.1)
        matches = sorted([own] + [0 if pr.learner else pr.match for pr in self.progress.values()], reverse=True)
        index = matches[self.majority - 1]
        if index > self.commit and self.log.term_at(index) == self.term:
            self.commit = index
            self.committed_at.append((index, self.ticks))
            self._send_commits()
            if self.deferred_reads and self.committed_in_term():
                deferred, self.deferred_reads = self.deferred_reads, []
                for ctx in deferred:
                    self._start_read_round(ctx)

    # -- acknowledgement ----------------------------------------------------------------
    def _heard(self, pr: Progress, commit: int) -> None:
        pr.heard = self.ticks
        # as it says now (not the most it ever said: a backup that lost its disk has
        # applied nothing, whatever it once said)
        pr.applied = min(commit, self.commit)
        if pr.lagging and pr.applied >= self.commit:
            pr.lagging = False  # caught up: waited for again
        self._update_acked()

    def _waited_for(self, pr: Progress) -> bool:
        """A backup the leader can reach (heard from within two heartbeats) and that
        keeps up: an acknowledgement waits for its apply."""
        return not pr.lagging and self.ticks - pr.heard <= 2 * self.heartbeat_ticks + 1

    def _update_acked(self) -> None:
        """Advance `acked`: committed, applied here, and applied by every backup waited
        for. An entry committed `ack_wait_ticks` ago that some of them still have not
        applied stops waiting for those (they lag until they catch up)."""
        if self.role != LEADER:
            return
        for _ in range(2):
            target = min(self.applied, self.commit)
            behind = [pr for pr in self.progress.values() if self._waited_for(pr) and pr.applied < target]
            for pr in behind:
                target = min(target, pr.applied)
            if target > self.acked:
                self.acked = target
                while self.committed_at and self.committed_at[0][0] <= target:
                    self.committed_at.pop(0)
            if not behind or not self.committed_at or self.ticks - self.committed_at[0][1] < self.ack_wait_ticks:
                return
            for pr in behind:
                pr.lagging = True  # late: acknowledge without it from now on

    def acknowledged(self) -> int:
        """The highest index whose writers may be answered (see the rule at the top)."""
        if self.role != LEADER:
            return 0
        if len(self.voters) == 1:
            return min(self.applied, self.commit)
        self._update_acked()
        return self.acked

    # -- output -----------------------------------------------------------------------
    def ready(self) -> Ready:
        """What to do now: persist (already written to `log`), send, apply, answer."""
        committed = self.log.entries(self.applied + 1, self.commit + 1) if self.commit > self.applied else []
        if committed:
            self.applied = committed[-1].index
            self._update_acked()
        if self.commits_due:
            self._flush_commits()
        out, self.outbox = self.outbox, []
        reads, self.reads_ready = self.reads_ready, []
        return Ready(out, committed, reads)

    def has_ready(self, unstable: bool = True) -> bool:
        """Is there anything for `ready()` (or, with `unstable`, a log write to persist)?"""
        return bool(self.outbox or self.reads_ready or self.commit > self.applied or self.commits_due
                    or (unstable and self.stable < self.log.last_index()))


@define
class MemoryLog:
    """A `Log` in memory, for tests and simulations: what a disk would hold. `log`
    holds the entries after `snapshot_index` (the compacted prefix is gone)."""

    term: int = 0
    vote: int | None = None
    voter: bool = True
    log: list[Entry] = field(factory=list)
    snapshot_index: int = 0
    snapshot_term: int = 0

    def set_hard_state(self, term: int, vote: int | None) -> None:
        self.term, self.vote = term, vote

    def set_voter(self) -> None:
        self.voter = True

    def last_index(self) -> int:
        return self.snapshot_index + len(self.log)

    def term_at(self, index: int) -> int | None:
        if index == self.snapshot_index:
            return self.snapshot_term
        if self.snapshot_index < index <= self.last_index():
            return self.log[index - self.snapshot_index - 1].term
        return None

    def entries(self, lo: int, hi: int) -> list[Entry]:
        base = self.snapshot_index
        if lo <= base and hi > lo:
            raise ValueError(f"entries from {lo} are compacted (up to {base})")
        return self.log[max(lo - base, 1) - 1:max(hi - base - 1, 0)]

    def append(self, entries: list[Entry]) -> None:
        if entries:
            first = entries[0].index
            if not self.snapshot_index < first <= self.last_index() + 1:
                raise ValueError(f"entry {first} does not follow the log")
            del self.log[first - self.snapshot_index - 1:]
            self.log.extend(entries)

    def compact(self, upto: int) -> None:
        """Forget the entries up to `upto` (applied: the state holds them)."""
        if self.snapshot_index < upto <= self.last_index():
            term = self.term_at(upto)
            assert term is not None
            del self.log[:upto - self.snapshot_index]
            self.snapshot_index, self.snapshot_term = upto, term

    def reset(self, index: int, term: int) -> None:
        """An installed snapshot: an empty log compacted up to `index` (of `term`)."""
        self.log = []
        self.snapshot_index, self.snapshot_term = index, term
