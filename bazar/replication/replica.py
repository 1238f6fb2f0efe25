"""One replica of a replicated service: the Raft core of `bazar.replication.raft` driven by the
reactor, with its log and state machine in `bazar.replication.store`.

The core decides; this module does the I/O:

- time: `tick()` (a TimerService) turns the clock's seconds into core ticks. A
  process that was paused (SIGSTOP) catches up on every tick it missed before it
  answers anything, so a paused leader finds its lease expired (§6.4.1) and steps
  down (§6.2) instead of acting on what it knew before the pause;
- messages: each is one POST to the peer's `/internal/raft`, with treq over the
  pooled connections; the peer's replies come back in the response body. A message
  that could not be delivered is reported to the core (`unreachable`);
- the `ready()` contract: what the core wrote to the store is committed (one fsync,
  for everything of this turn) before its messages leave; committed entries are
  applied in that same transaction; then waiting writers are answered.

Writes: any replica takes one. The leader appends it and answers once the entry is
committed and applied (its outcome comes from the state machine: the same on every
replica); a follower forwards it to the leader. A leader that loses its leadership
fails its waiting writers with 503 (the outcome is then unknown: a retry with the
same request id learns it, §6.3).

Reads: a replica serves reads only while it is `serving`: a leader within its lease
(§6.4.1), a follower that has heard from a leader within an election timeout and
has applied everything that leader told it was committed. What it serves is
committed state (entries are applied only once committed), and the front end asks
for an applied index at least as high as any write it made or heard of, so its reads
are monotonic and see its own writes.
"""

from __future__ import annotations

import collections
import os
import random
from typing import Any, Callable

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from bazar.errors import NotFound, Unavailable
from bazar.http.client import Unreachable, call, error_of
from bazar.messages import HOPS_HEADER, RAFT_PATH, SNAPSHOT_PATH, STATUS_PATH, WRITE_PATH
from bazar.replication import raft
from bazar.replication.raft import Entry, Message, NotLeader, Raft, message_from_json
from bazar.replication.store import Outcome, Store
from bazar.settings import ReplicaSettings
from bazar.trace import trace

log = Logger()

PRIMARY = "primary"
BACKUP = "backup"
OK = "ok"
RECOVERING = "recovering"
MAX_CATCH_UP_TICKS = 10_000
STALL_TICKS = 3  # ticks missed at once that mean a stall (the timer fires every tick otherwise)


class Replica:
    """One replica of a replicated service. `on_commit` is told every outcome the
    leader applies (the catalog announces them); `on_primary`, that this replica has
    just become the leader."""

    def __init__(self, settings: ReplicaSettings, *, store: Store, http: HTTPClient, clock: IReactorTime,
                 rng: random.Random | None = None):
        timing = settings.timing
        self.settings = settings
        self.service = settings.service
        self.replica_id = settings.replica_id
        self.peers = dict(settings.peers)
        self.peers.setdefault(self.replica_id, "")
        self.others = {pid: url for pid, url in self.peers.items() if pid != self.replica_id}
        self.store = store
        self.http = http
        self.clock = clock
        self.secret = settings.secret
        self.on_commit: Callable[[Outcome], None] | None = None
        self.on_primary: Callable[[], Any] | None = None
        self.tick_seconds = timing.tick
        self.rpc_timeout = timing.rpc_timeout
        self.write_timeout = timing.write_timeout
        self.forward_timeout = timing.forward_timeout
        self.core = Raft(id=self.replica_id, voters=tuple(sorted(self.peers)), log=store, applied=store.applied,
                         election_ticks=timing.election_ticks, heartbeat_ticks=timing.heartbeat_ticks,
                         rng=rng or random.Random(random.random()))
        # writers by log index: the term they proposed in, their Deferred, and who else
        # wants the outcome as soon as it is applied here, before the acknowledgement
        # rule allows it (`submit`'s `early`)
        self.waiters: dict[int, tuple[int, Deferred[Outcome], Callable[[Outcome], None] | None]] = {}
        # outcomes of applied entries whose writers wait for the acknowledgement rule
        # (every backup the leader can reach has applied them too: `Raft.acknowledged`)
        self.decided: dict[int, Outcome] = {}
        self.leader_commit = 0  # the commit index the leader last told us
        # snapshots by kind: "taken" (the log compacted), "sent" (to a backup that needed
        # one), "installed" (from the leader); /metrics reads them
        self.snapshots: collections.Counter[str] = collections.Counter()
        self.running = False
        self._scheduled: IDelayedCall | None = None
        self._flusher: IDelayedCall | None = None
        self._after_stall: IDelayedCall | None = None
        self._tick_base = clock.seconds()
        self._was_leader = False
        self._probing = False
        self._processing = False
        self.transfers: set[int] = set()  # backups a snapshot is being sent to
        self.staging: tuple[int, int, int] | None = None  # (term, leader, index) of the snapshot being received

    # -- facts ------------------------------------------------------------------------
    @property
    def role(self) -> str:
        return PRIMARY if self.core.role == raft.LEADER else BACKUP

    @property
    def is_primary(self) -> bool:
        return self.core.role == raft.LEADER

    @property
    def epoch(self) -> int:
        return self.store.term

    @property
    def leader(self) -> int | None:
        return self.core.leader

    @property
    def serving(self) -> bool:
        """May this replica answer reads (and an order primary settle orders)?"""
        self._current()
        core = self.core
        if core.role == raft.LEADER:
            return core.lease_valid() and core.committed_in_term() and self.store.applied >= core.commit
        return (core.leader is not None and core.elapsed < core.election_ticks
                and self.store.applied >= self.leader_commit and self.store.applied > 0)

    @property
    def status(self) -> str:
        return OK if self.serving else RECOVERING

    @property
    def lag(self) -> int:
        """Entries this replica has yet to apply of those its leader last told it are
        committed; a leader: 0 (its own commit index is the news)."""
        if self.is_primary:
            return 0
        return max(0, self.leader_commit - self.store.applied)

    def health(self) -> dict[str, Any]:
        return {"service": self.service, "replica": self.replica_id, "pid": os.getpid(),
                "role": self.role, "status": self.status, "epoch": self.epoch,
                "last_seq": self.store.applied, "commit": self.core.commit,
                "log": self.store.last_index(), "snapshot_index": self.store.snapshot_index, "leader": self.leader,
                "voter": self.store.voter}

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        self._tick_base = self.clock.seconds()
        if not self.store.voter:
            if not self.others:
                self.store.set_voter()
                self.store.flush()
            else:
                ensureDeferred(self._bootstrap()).addErrback(lambda f: log.failure("bootstrap failed", f))
        if not self.others:
            self.core.tick()  # a single replica elects itself at once
            while self.core.role != raft.LEADER:
                self.core.tick()
        self._process()
        if self._flusher is not None:  # a single replica commits its first entry before it serves
            self._flusher.cancel()
            self._flush_now()
            self._process()

    def stop(self) -> None:
        self.running = False
        for pending in (self._scheduled, self._flusher, self._after_stall):
            if pending is not None and pending.active():
                pending.cancel()
        self._scheduled = self._flusher = self._after_stall = None
        self._fail_waiters("this replica is shutting down; retry")

    async def _bootstrap(self) -> None:
        """A replica that does not vote has no state at all (a new one, or one that
        lost its data) or lost its data before and has not caught up since. It must not
        vote, nor count for any majority, before it knows which: a lost vote or entry
        could elect a leader without an acknowledged write, or let a deposed one commit.
        It votes at once only when a majority, itself included, is just as new (a new
        store). Otherwise it waits until a majority of the others have told it their
        term (`Raft.recover`), then is a learner until a leader has brought it up to
        date (§4.2.1)."""
        self._probing = True
        try:
            while self.running and not self.store.voter:
                answers = await DeferredList(
                    [ensureDeferred(self._probe(url)) for url in self.others.values()], consumeErrors=True)
                states = [answer for ok, answer in answers if ok and answer is not None]
                new_store = self.store.pristine and self.store.term == 0 and all(s[0] for s in states)
                if new_store and 1 + len(states) >= self.core.majority:
                    log.info("a new store: {n} of {total} replicas are new, voting from now on",
                             n=1 + len(states), total=len(self.peers))
                    self.store.set_voter()
                    self.store.flush()
                    return
                if not new_store and len(states) >= self.core.majority:
                    term = max(s[1] for s in states)
                    log.info("catching up as a learner: {n} of the others answered, epoch {term}",
                             n=len(states), term=term)
                    self.core.recover(term)
                    self._changed()
                    return
                await deferLater(self.clock, 0.2)
        finally:
            self._probing = False

    async def _probe(self, url: str) -> tuple[bool, int] | None:
        """Is the peer pristine too, and what is its term? (None: no answer)"""
        try:
            status, answer, _ = await call(self.http, self.clock, "GET", url + STATUS_PATH,
                                           secret=self.secret, timeout=self.rpc_timeout)
        except Unreachable:
            return None
        if status != 200 or not isinstance(answer, dict):
            return None
        term = answer.get("term")
        if type(term) is not int:
            return None
        return bool(answer.get("pristine")), term

    # -- time -------------------------------------------------------------------------
    def _catch_up(self) -> None:
        """Bring the core's logical time up to the clock (after a pause too). More than
        STALL_TICKS at once means this process was starved or paused: the ticks are
        quiet (the lease runs out at once, but no election starts and no step-down
        happens) until the next turn of the reactor, which first reads what the peers
        sent meanwhile (`Raft.tick`)."""
        if not self.running:
            return
        due = int((self.clock.seconds() - self._tick_base) / self.tick_seconds)
        if due <= 0:
            return
        self._tick_base += due * self.tick_seconds
        quiet = due > STALL_TICKS
        for _ in range(min(due, MAX_CATCH_UP_TICKS)):
            self.core.tick(quiet)
        if quiet and self._after_stall is None:
            self._after_stall = self.clock.callLater(0, self._stalled)
        self._changed()
        self._release()

    def _stalled(self) -> None:
        self._after_stall = None
        if self.running:
            self._catch_up()
            self.core.due()
            self._changed()

    def tick(self) -> None:
        self._catch_up()
        if self.running and not self._processing:
            self._compact()

    def _current(self) -> None:
        """Bring the replica up to now before it answers: the ticks it missed, and on a
        leader the entries that acknowledgements stepped in this turn have committed
        (they are applied one reactor turn later otherwise, and a read or a write
        arriving in between must neither find the leader unable to serve nor miss an
        outcome that is already decided)."""
        self._catch_up()
        if self.core.role == raft.LEADER and self.store.applied < self.core.commit and not self._processing:
            self._process()

    # -- the ready() loop -------------------------------------------------------------
    def _changed(self) -> None:
        if self.core.has_ready(unstable=self._flusher is None) and self._scheduled is None and self.running:
            self._scheduled = self.clock.callLater(0, self._process)
        self._watch_role()

    def _process(self, reply_to: int | None = None) -> list[Message]:
        """Rounds of the ready() contract until the core has nothing more; the messages
        for `reply_to` are handed back (they travel in the response to its request)
        instead of being sent."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        replies: list[Message] = []
        self._processing = True
        try:
            self._rounds(reply_to, replies)
        finally:
            self._processing = False
        return replies

    def _rounds(self, reply_to: int | None, replies: list[Message]) -> None:
        for _ in range(100):
            if not self.running:
                break
            ready = self.core.ready()
            if ready.committed:
                trace("commit", None, upto=ready.committed[-1].index)
            # A leader's messages need nothing of its own disk: they leave while it
            # writes (§10.2.1; it counts itself once `persisted`). Anyone else's (votes,
            # acknowledgements) leave only once what they promise is on disk (§3.8).
            # A leader's commit notices leave before it applies the entries itself: the
            # backups' apply, which its acknowledgement waits for, overlaps its own.
            early = self.core.role == raft.LEADER
            if early:
                replies += self._dispatch(ready.messages, reply_to)
                outcomes = [(e, self.store.apply(e)) for e in ready.committed]
                self._flush_soon()  # after the reactor has written those messages out
            else:
                outcomes = [(e, self.store.apply(e)) for e in ready.committed]
                self.store.flush()
                self.core.persisted(self.store.last_index())
                replies += self._dispatch(ready.messages, reply_to)
            self._watch_role()
            for entry, outcome in outcomes:
                self._applied(entry, outcome)
            if not self.core.has_ready(unstable=not early):
                break
        self._release()

    def _flush_soon(self) -> None:
        if self._flusher is None and self.running:
            self._flusher = self.clock.callLater(0, self._flush_next_turn)

    def _flush_next_turn(self) -> None:
        # A transport's write only fills its buffer; the reactor sends it when it next
        # polls, which comes after the timed calls of this turn. So the fsync waits one
        # turn more: the messages must be on the wire before the reactor blocks on it.
        self._flusher = self.clock.callLater(0, self._flush_now)

    def _flush_now(self) -> None:
        """The leader's own disk write, once its messages have left: the fsync then
        overlaps the followers' (§10.2.1); it counts itself from now on."""
        self._flusher = None
        if not self.running:
            return
        self.store.flush()
        trace("flushed", None, upto=self.store.last_index())
        self.core.persisted(self.store.last_index())
        self._changed()

    def _dispatch(self, messages: list[Message], reply_to: int | None) -> list[Message]:
        replies = []
        for m in messages:
            # a snapshot is a transfer of its own (`_send`), never an answer's passenger:
            # the peer's core would drop it, and ours would wait for it in vain
            if m.dst == reply_to and not isinstance(m, raft.InstallSnapshot):
                replies.append(m)
            else:
                self._send(m)
        return replies

    def _applied(self, entry: Entry, outcome: Outcome) -> None:
        trace("applied", None, index=entry.index)
        waiter = self.waiters.get(entry.index)
        early = None
        if waiter is not None:
            term, d, early = waiter
            if term == entry.term:
                self.decided[entry.index] = outcome  # answered once acknowledged (`_release`)
            else:
                del self.waiters[entry.index]
                early = None
                d.errback(Unavailable(f"the {self.service} primary changed during the write; retry"))
        if self.is_primary and self.on_commit is not None:
            self.on_commit(outcome)
        if early is not None:
            early(outcome)  # (last: whatever it resumes finds this entry wholly applied)

    def _release(self) -> None:
        """Answer the writers whose entries the acknowledgement rule now allows."""
        if not self.decided:
            return
        acked = self.core.acknowledged()
        # A writer's callback may run the replica again (a purchase's next write), and
        # that may release, or fail, the next waiters itself: take one at a time.
        while self.decided:
            index = next(iter(self.decided))
            if index > acked:
                break
            outcome = self.decided.pop(index)
            waiter = self.waiters.pop(index, None)
            if waiter is not None:
                waiter[1].callback(outcome)

    def _watch_role(self) -> None:
        leader = self.core.role == raft.LEADER
        if leader and not self._was_leader:
            log.info("primary for epoch {epoch} at index {index}", epoch=self.epoch, index=self.store.last_index())
            if self.on_primary is not None:
                self.on_primary()
        elif self._was_leader and not leader:
            log.info("no longer primary (epoch {epoch})", epoch=self.epoch)
            self._fail_waiters(f"the {self.service} primary stepped down during the write; retry")
        self._was_leader = leader

    def _fail_waiters(self, why: str) -> None:
        waiters, self.waiters = self.waiters, {}
        self.decided.clear()
        for _, d, _ in waiters.values():
            d.errback(Unavailable(why))

    # -- messages ---------------------------------------------------------------------
    def _send(self, m: Message) -> None:
        url = self.others.get(m.dst)
        if url is None:
            return
        if isinstance(m, raft.InstallSnapshot):
            if m.dst not in self.transfers:
                self.transfers.add(m.dst)
                d = ensureDeferred(self._transfer(url, m))
                d.addErrback(lambda f: log.failure("sending a snapshot to replica {peer} failed", f, peer=m.dst))
                d.addBoth(lambda _: self.transfers.discard(m.dst))
            return
        d = ensureDeferred(self._exchange(url, m))
        d.addErrback(lambda f: log.failure("sending to replica {peer} failed", f, peer=m.dst))

    async def _transfer(self, url: str, m: raft.InstallSnapshot) -> None:
        """§5.3, the leader's part: stream its state, as of the applied index a read
        transaction of its own sees, to a backup that needs entries compacted away,
        one chunk per request; the backup's last answer is stepped in like an append's."""
        reader = self.store.snapshot_reader()
        log.info("sending replica {peer} a snapshot as of index {index}", peer=m.dst, index=reader.index)
        self.snapshots["sent"] += 1
        try:
            first, answer = True, None
            while self.running and self.core.role == raft.LEADER and self.core.term == m.term:
                tables = reader.chunk()
                body = {"term": m.term, "src": self.replica_id, "index": reader.index, "snap_term": reader.term,
                        "first": first, "done": tables is None, "tables": tables or {}}
                try:
                    status, answer, _ = await call(self.http, self.clock, "POST", url + SNAPSHOT_PATH, body=body,
                                                   secret=self.secret, timeout=4 * self.rpc_timeout)
                except Unreachable:
                    status = 0
                if status != 200 or not isinstance(answer, dict) or answer.get("refused"):
                    break
                first = False
                if tables is None or answer.get("messages"):
                    break
        finally:
            reader.close()
        if not self.running:
            return
        replies = answer.get("messages") if isinstance(answer, dict) else None
        if not replies:
            self.core.unreachable(m.dst)  # it did not take it: tried again later
        else:
            self._catch_up()
            for data in replies:
                self._step(message_from_json(data))
        self._changed()
        self._release()

    def receive_snapshot(self, body: dict[str, Any]) -> dict[str, Any]:
        """§5.3, a backup's part: a chunk of the leader's state. Staged until the last
        one, then installed in one durable transaction if it is newer than what this
        replica has; the answer to the last chunk is the leader's `AppendReply`."""
        term, src, index, snap_term = body["term"], body["src"], body["index"], body["snap_term"]
        tables, first, done = body["tables"], body["first"], body["done"]
        if not all(type(v) is int for v in (term, src, index, snap_term)) or not isinstance(tables, dict):
            raise ValueError("a malformed snapshot chunk")
        if not self.running:
            return {"refused": True}
        self._catch_up()
        if not self.core.accepts_snapshot(term, src, index):
            # an old leader learns the term; a snapshot we need not, where we are
            reply = raft.AppendReply(self.core.term, self.replica_id, src, term == self.core.term,
                                     self.core.commit, self.core.commit, self.core.learner)
            self._process()
            return {"messages": [reply.to_json()]}
        if first:
            self.staging = (term, src, index)
        elif self.staging != (term, src, index):
            return {"refused": True}  # a chunk of a transfer that is not the one staged
        self.store.stage_snapshot(bool(first), tables)
        if not done:
            self._process()
            return {"messages": []}
        self.staging = None
        self.store.install_snapshot(index, snap_term)
        self.core.restore(index, snap_term)
        self.leader_commit = max(self.leader_commit, index)
        self.snapshots["installed"] += 1
        log.info("installed a snapshot of replica {src} as of index {index}", src=src, index=index)
        self._process()
        reply = raft.AppendReply(self.core.term, self.replica_id, src, True, index, index, self.core.learner)
        return {"messages": [reply.to_json()]}

    def _compact(self) -> None:
        """§5.1: forget the log up to a point the tables already hold. A leader keeps
        what its reachable backups have not yet got, so that they need no snapshot."""
        upto = self.store.compaction_due()
        if upto is None:
            return
        if self.core.role == raft.LEADER:
            reachable = [pr.match for pr in self.core.progress.values() if self.core.ticks - pr.heard <= 20]
            floor = self.store.applied - 5 * (self.store.compact_after + self.store.keep_entries)
            upto = max(min([upto, *reachable]), floor)  # (not for ever: a backup that never catches up)
        if self.store.compact(upto):
            self.snapshots["taken"] += 1  # (the tables are the snapshot: compacting is taking one)
            log.info("log compacted up to index {index}", index=upto)

    async def _exchange(self, url: str, m: Message) -> None:
        trace("send", None, to=m.dst, kind=m.kind, prev=getattr(m, "prev_index", 0), n=len(getattr(m, "entries", ())))
        try:
            status, answer, _ = await call(self.http, self.clock, "POST", url + RAFT_PATH,
                                           body=m.to_json(), secret=self.secret,
                                           timeout=self.rpc_timeout if not isinstance(m, raft.AppendEntries)
                                           else 2 * self.rpc_timeout)
        except Unreachable:
            status, answer = 0, None
        trace("reply", None, frm=m.dst, kind=m.kind, status=status)
        if not self.running:
            return
        if status != 200 or not isinstance(answer, dict):
            self.core.unreachable(m.dst)
            self._changed()
            return
        self._catch_up()
        for data in answer.get("messages", []):
            try:
                reply = message_from_json(data)
            except (KeyError, TypeError, ValueError):
                log.warn("replica {peer} sent a malformed message", peer=m.dst)
                continue
            self._step(reply)
        if self.core.commit > self.store.applied and not self._processing:
            # it committed something: apply it, answer who waited and tell the backups
            # now, rather than a reactor turn later
            self._process()
        else:
            self._changed()
        self._release()  # an answer may be what an acknowledgement waited for

    def _step(self, m: Message) -> None:
        if isinstance(m, raft.Heartbeat):
            self.leader_commit = m.leader_commit
        elif isinstance(m, raft.AppendEntries):
            self.leader_commit = m.commit
        self.core.step(m)

    def receive(self, data: Any) -> dict[str, Any]:
        """A message from a peer: step it, make the result durable, answer with the
        replies to it."""
        m = message_from_json(data)
        if not self.running:
            return {"messages": []}
        self._catch_up()
        self._step(m)
        replies = self._process(reply_to=m.src)
        return {"messages": [r.to_json() for r in replies]}

    # -- writes -----------------------------------------------------------------------
    async def submit(self, op: dict[str, Any], hops: int = 0,
                     early: Callable[[Outcome], None] | None = None) -> Outcome:
        """Apply a write through the leader and return its outcome once acknowledged.
        `early`, if given, is told the outcome as soon as this leader has applied the
        entry (it is committed: durable on a majority, never lost), which may be well
        before the acknowledgement rule lets the write be answered; not told at all
        when the write fails first, or goes to another replica."""
        self._current()
        if not self.is_primary:
            return await self.forward_write(op, hops)
        done = self.store.recorded(op)  # §6.3: applied before: its recorded outcome
        if done is None:
            # A leader within its lease holds every acknowledged write: an operation on
            # an id its state does not hold is answered 404 now, as a read of that
            # state, and leaves no entry in the log. (A 409, out of stock, is logged: a
            # purchase repeated with its key must get the same answer after a restock.)
            self.store.validate(op, refuse=(NotFound,) if self.serving else ())
            try:
                index, term = self.core.propose(op)
            except NotLeader:
                return await self.forward_write(op, hops)
            trace("propose", op.get("rid"), index=index)
            d: Deferred[Outcome] = Deferred()
            self.waiters[index] = (term, d, early)
            if self._processing:
                self._changed()
            else:
                self._process()  # the entry leaves now, before the rest of this request's handling
            d.addTimeout(self.write_timeout, self.clock)
            try:
                done = await d
            except Unavailable:
                raise
            except TimeoutError:
                self.waiters.pop(index, None)
                self.decided.pop(index, None)
                raise Unavailable(f"the {self.service} write was not committed in time; retry") from None
        else:
            if early is not None:
                early(done)
            await self._until_acknowledged(done.seq)
        error = done.error()
        if error is not None:
            raise error
        return done

    async def _until_acknowledged(self, index: int) -> None:
        """A retried request already applied here is answered, like its first sending,
        once the acknowledgement rule allows its entry (soon: it is committed)."""
        deadline = self.clock.seconds() + self.write_timeout
        while index > self.core.acknowledged():
            if not self.is_primary or self.clock.seconds() >= deadline:
                raise Unavailable(f"the {self.service} write was not acknowledged in time; retry")
            await deferLater(self.clock, self.tick_seconds)
            self._current()

    def leader_url(self) -> str:
        self._catch_up()
        leader = self.leader
        if leader is None or leader == self.replica_id or leader not in self.others:
            raise Unavailable(f"no {self.service} primary is known yet; retry")
        if self.core.elapsed > 2 * self.core.heartbeat_ticks + 1:
            # its heartbeats stopped: it may be paused, dead or cut off, and a forwarded
            # write would only wait on it; the caller tries elsewhere, or again soon
            raise Unavailable(f"the {self.service} primary has not been heard from lately; retry")
        return self.others[leader]

    async def forward(self, path: str, body: dict[str, Any], hops: int) -> tuple[int, Any]:
        """Pass a write to the primary (any replica may receive one): its answer."""
        if hops >= 2:
            raise Unavailable(f"no {self.service} primary is known yet; retry")
        url = self.leader_url()
        try:
            status, parsed, _ = await call(self.http, self.clock, "POST", url + path, body=body,
                                           secret=self.secret, timeout=self.forward_timeout,
                                           headers={HOPS_HEADER: str(hops + 1).encode()})
        except Unreachable:
            raise Unavailable(f"the {self.service} primary did not answer; retry") from None
        return status, parsed

    async def forward_write(self, op: dict[str, Any], hops: int) -> Outcome:
        status, parsed = await self.forward(WRITE_PATH, {"op": op}, hops)
        if status != 200:
            raise error_of(status, parsed)
        return Outcome.from_json(parsed)

    def require_serving(self, min_seq: int = 0) -> None:
        """Reads are answered only from state known current (see `serving`), and at
        least as new as the reader asks (`min_seq`: it would drop an older answer)."""
        if not self.serving:
            raise Unavailable(f"this {self.service} replica is not caught up with a primary; retry")
        if self.store.applied < min_seq:
            raise Unavailable(f"this {self.service} replica has not applied write {min_seq} yet; retry")

    def not_ready_because(self) -> str | None:
        """Why this replica may not serve reads now (None: it may)."""
        if self.serving:
            return None
        if self.is_primary:
            return "primary not confirmed by a majority (lease or no-op of its epoch pending)"
        if self.leader is None:
            return "no primary known"
        return "not caught up with a primary"

