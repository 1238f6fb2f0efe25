"""Primary/backup replication of one service's store.

- One primary orders every write: `Store.execute` gives it the next sequence number
  and commits state + log entry together; then the entry is pushed to every backup
  that is not known to be down, each through its own `BackupLink` (one request in
  flight per backup, so entries arrive in order and batch up under load). The writer
  waits on a `DeferredList` of the links' acknowledgements; it is answered only when
  every live backup applied the entry and a majority of the replicas hold it.
- Backups apply strictly in sequence order: a batch must start right after their
  last entry (same sequence number and epoch), else they answer with their position
  and the primary resends from there, or sends a snapshot when the logs diverged.
- Elections: a replica that hears nothing from a primary for its election timeout
  (longer for higher ids, so the lowest live id usually wins) asks the others to
  promise a new epoch. With a majority of promises it first copies the most advanced
  log among them, then becomes primary. A promise fences the old primary: a replica
  never applies a write, nor grants a vote, from an epoch below the one it promised.
"""

from __future__ import annotations

import os
import random
from typing import Any, Awaitable, Callable

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger

from bazar.client import Clock, Unreachable, call, error_of
from bazar.store import Entry, Outcome, Store
from bazar.web import HTTPError, JsonApp, dumps, require_secret

log = Logger()

PRIMARY = "primary"
BACKUP = "backup"
OK = "ok"
RECOVERING = "recovering"
BATCH = 500
INTERNAL_BODY_LIMIT = 512 * 1024 * 1024


class StaleEpoch(Exception):
    def __init__(self, epoch: int):
        super().__init__(epoch)
        self.epoch = epoch


class Stopped(Exception):
    """The link stopped (the primary stepped down or shut down)."""


def sleep(clock: Clock, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, lambda: None if d.called else d.callback(None))
    return d


class BackupLink:
    """The primary's view of one backup: what it holds (`match`), whether it answers
    (`down`), and the writers waiting for it to apply their entry."""

    def __init__(self, replica: "Replica", peer_id: int, url: str):
        self.replica = replica
        self.peer_id = peer_id
        self.url = url
        self.match: int | None = None  # highest seq known to be applied there
        self.down = False
        self.active = True
        self.waiters: list[tuple[int, Deferred[None]]] = []
        self._wake: Deferred[None] | None = None

    def wait(self, seq: int) -> Deferred[None]:
        """Fires when the backup holds `seq`; fails when the backup is (or goes) down."""
        if self.match is not None and self.match >= seq:
            return Deferred.fromCoroutine(_done())
        d: Deferred[None] = Deferred()
        if self.down or not self.active:
            d.errback(Unreachable(f"backup {self.peer_id} is down"))
            return d
        self.waiters.append((seq, d))
        return d

    def notify(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    def stop(self) -> None:
        self.active = False
        self._fail_waiters(Stopped())
        self.notify()

    def _fail_waiters(self, exc: Exception) -> None:
        waiters, self.waiters = self.waiters, []
        for _, d in waiters:
            d.errback(exc)

    def _advance(self, match: int) -> None:
        self.match = match
        while self.waiters and self.waiters[0][0] <= match:
            _, d = self.waiters.pop(0)
            d.callback(None)

    async def run(self) -> None:
        r = self.replica
        while self.active:
            try:
                if self.match is not None and self.match >= r.store.last_seq:
                    self._wake = Deferred()
                    timer = r.clock.callLater(r.heartbeat, self.notify)
                    await self._wake
                    if timer.active():
                        timer.cancel()
                    if not self.active:
                        break
                await self._send()
                self.down = False
            except StaleEpoch as stale:
                log.info("backup {peer} knows a newer epoch {epoch}: stepping down",
                         peer=self.peer_id, epoch=stale.epoch)
                r.step_down(stale.epoch)
                break
            except Exception as exc:
                if not self.down:
                    log.info("backup {peer} is unreachable: {why}", peer=self.peer_id, why=str(exc))
                self.down = True
                self.match = None
                self._fail_waiters(Unreachable(str(exc)))
                await sleep(r.clock, r.retry_interval)

    async def _send(self) -> None:
        r = self.replica
        store = r.store
        prev = self.match if self.match is not None else store.last_seq
        prev_epoch = store.epoch_at(prev)
        if prev_epoch is None:
            await self._send_snapshot()
            return
        entries = store.entries_after(prev, BATCH) if self.match is not None else []
        upto = entries[-1].seq if entries else prev
        message = {"epoch": r.epoch, "leader": r.replica_id, "prev_seq": prev, "prev_epoch": prev_epoch,
                   "entries": [e.to_json() for e in entries], "head": store.last_seq,
                   "in_sync": self.match is not None and upto >= store.last_seq}
        answer = await r.rpc(self.url, "/internal/replicate", message)
        if not self.active:
            return
        if answer.get("stale"):
            raise StaleEpoch(int(answer["epoch"]))
        their_seq, their_epoch = int(answer["last_seq"]), int(answer["last_epoch"])
        if answer.get("ok"):
            self._advance(their_seq)
        elif their_seq <= store.last_seq and store.epoch_at(their_seq) == their_epoch:
            self._advance(their_seq)  # resend from where the backup is
        else:
            await self._send_snapshot()

    async def _send_snapshot(self) -> None:
        r = self.replica
        log.info("sending a snapshot at {seq} to backup {peer}", seq=r.store.last_seq, peer=self.peer_id)
        message = {"epoch": r.epoch, "leader": r.replica_id, "snapshot": r.store.snapshot()}
        answer = await r.rpc(self.url, "/internal/snapshot", message, timeout=30.0)
        if answer.get("stale"):
            raise StaleEpoch(int(answer["epoch"]))
        if self.active and answer.get("ok"):
            self._advance(int(answer["last_seq"]))


async def _done() -> None:
    return None


class Replica:
    """One replica of a replicated service: its role, its links and its election clock."""

    def __init__(self, *, service: str, replica_id: int, peers: dict[int, str], store: Store,
                 http: HTTPClient, clock: Clock, secret: str | None,
                 on_commit: Callable[[Outcome], None] | None = None,
                 on_primary: Callable[[], Any] | None = None,
                 heartbeat: float = 0.2, election_timeout: float = 1.0,
                 rpc_timeout: float = 1.0, retry_interval: float = 0.25):
        self.service = service
        self.replica_id = replica_id
        self.peers = dict(peers) if peers else {}
        self.peers.setdefault(replica_id, "")
        self.others = {pid: url for pid, url in self.peers.items() if pid != replica_id}
        self.majority = len(self.peers) // 2 + 1
        self.store = store
        self.http = http
        self.clock = clock
        self.secret = secret
        self.on_commit = on_commit
        self.on_primary = on_primary
        self.heartbeat = heartbeat
        self.base_timeout = election_timeout
        self.election_timeout = election_timeout + 0.5 * sorted(self.peers).index(replica_id)
        self.rpc_timeout = rpc_timeout
        self.retry_interval = retry_interval
        self.role = BACKUP
        self.status = RECOVERING
        self.leader: int | None = None
        self.epoch = store.promised
        self.seen_epoch = store.promised
        self.last_heard = clock.seconds()
        self.links: dict[int, BackupLink] = {}
        self.electing = False

    # -- helpers --------------------------------------------------------------
    async def rpc(self, url: str, path: str, body: Any, timeout: float | None = None) -> dict[str, Any]:
        status, parsed, _ = await call(self.http, self.clock, "POST", url + path, body=body,
                                       secret=self.secret, timeout=timeout or self.rpc_timeout)
        if status != 200 or not isinstance(parsed, dict):
            raise Unreachable(f"{url}{path} answered {status}")
        return parsed

    @property
    def is_primary(self) -> bool:
        return self.role == PRIMARY

    def health(self) -> dict[str, Any]:
        return {"service": self.service, "replica": self.replica_id, "pid": os.getpid(),
                "role": self.role, "status": self.status, "epoch": self.epoch,
                "last_seq": self.store.last_seq, "leader": self.leader,
                "in_sync": sorted(p for p, link in self.links.items() if not link.down and link.match is not None)}

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self.last_heard = self.clock.seconds()
        if not self.others:
            self._become_primary(max(self.store.promised, self.seen_epoch) + 1)

    def stop(self) -> None:
        for link in self.links.values():
            link.stop()
        self.links = {}

    def tick(self) -> None:
        """Called periodically: start an election when the primary has gone quiet."""
        if self.role == PRIMARY or self.electing or not self.others:
            return
        if self.clock.seconds() - self.last_heard >= self.election_timeout:
            d = ensureDeferred(self.elect())
            d.addErrback(lambda f: log.failure("election failed", f))

    # -- writes ---------------------------------------------------------------
    async def submit(self, op: dict[str, Any], hops: int = 0) -> Outcome:
        """Apply a write through the primary and return once it is durable."""
        if self.role != PRIMARY:
            return await self.forward_write(op, hops)
        outcome = self.store.execute(op, self.epoch)
        if outcome.new:
            for link in self.links.values():
                link.notify()
        await self.replicate(outcome.seq)
        if outcome.new and self.on_commit is not None:
            self.on_commit(outcome)
        return outcome

    async def replicate(self, seq: int) -> None:
        epoch = self.epoch
        waits = [link.wait(seq) for link in self.links.values()]
        acks = 1
        if waits:
            results = await DeferredList(waits, consumeErrors=True)
            acks += sum(1 for ok, _ in results if ok)
        if self.role != PRIMARY or self.epoch != epoch:
            raise HTTPError(503, "the primary changed during the write; retry")
        if acks < self.majority:
            raise HTTPError(503, f"only {acks} of {len(self.peers)} replicas hold the write; retry")

    def leader_url(self) -> str:
        if self.leader is None or self.leader == self.replica_id or self.leader not in self.others:
            raise HTTPError(503, f"no {self.service} primary is known yet; retry")
        return self.others[self.leader]

    async def forward(self, path: str, body: Any, hops: int, timeout: float = 10.0) -> tuple[int, Any]:
        """Pass a write to the primary (any replica may receive one)."""
        if hops >= 2:
            raise HTTPError(503, f"no {self.service} primary is known yet; retry")
        url = self.leader_url()
        try:
            status, parsed, _ = await call(self.http, self.clock, "POST", url + path, body=body,
                                           secret=self.secret, timeout=timeout,
                                           headers={b"X-Bazar-Hops": str(hops + 1).encode()})
        except Unreachable:
            raise HTTPError(503, f"the {self.service} primary did not answer; retry") from None
        return status, parsed

    async def forward_write(self, op: dict[str, Any], hops: int) -> Outcome:
        status, parsed = await self.forward("/internal/write", {"op": op}, hops)
        if status != 200:
            raise error_of(status, parsed)
        return Outcome(parsed["result"], int(parsed["seq"]), tuple(parsed["keys"]), bool(parsed["new"]))

    # -- backup side ----------------------------------------------------------
    def _hear(self, epoch: int, leader: int) -> dict[str, Any] | None:
        """Common checks for messages from a primary; a dict answer means 'stale'."""
        if epoch < self.store.promised:
            return {"ok": False, "stale": True, "epoch": self.store.promised,
                    "last_seq": self.store.last_seq, "last_epoch": self.store.last_epoch}
        self.store.promise(epoch)
        if self.role == PRIMARY and leader != self.replica_id:
            self.step_down(epoch)
        self.epoch = self.seen_epoch = max(self.seen_epoch, epoch)
        self.leader = leader
        self.last_heard = self.clock.seconds()
        return None

    def on_replicate(self, msg: dict[str, Any]) -> dict[str, Any]:
        stale = self._hear(int(msg["epoch"]), int(msg["leader"]))
        if stale is not None:
            return stale
        store = self.store
        if int(msg["prev_seq"]) != store.last_seq or int(msg["prev_epoch"]) != store.last_epoch:
            self.status = RECOVERING
            return {"ok": False, "last_seq": store.last_seq, "last_epoch": store.last_epoch}
        store.append([Entry.from_json(e) for e in msg["entries"]])
        if msg.get("in_sync") and store.last_seq >= int(msg["head"]):
            if self.status != OK:
                log.info("caught up at {seq} (epoch {epoch}): serving", seq=store.last_seq, epoch=self.epoch)
            self.status = OK
        return {"ok": True, "last_seq": store.last_seq, "last_epoch": store.last_epoch}

    def on_snapshot(self, msg: dict[str, Any]) -> dict[str, Any]:
        stale = self._hear(int(msg["epoch"]), int(msg["leader"]))
        if stale is not None:
            return stale
        self.status = RECOVERING
        self.store.install(msg["snapshot"])
        log.info("installed a snapshot at {seq}", seq=self.store.last_seq)
        return {"ok": True, "last_seq": self.store.last_seq, "last_epoch": self.store.last_epoch}

    def on_log(self, after: int, epoch: int) -> dict[str, Any]:
        """Entries after (after, epoch) for a replica catching up, or a snapshot
        when our logs do not share that entry."""
        store = self.store
        if store.epoch_at(after) != epoch:
            return {"snapshot": store.snapshot()}
        return {"entries": [e.to_json() for e in store.entries_after(after, BATCH)],
                "last_seq": store.last_seq}

    def on_vote(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Grant (and persist) a promise of a new epoch; with "pre", only say whether
        we would, persisting nothing (so a candidate that cannot win disturbs no one)."""
        epoch, candidate = int(msg["epoch"]), int(msg["candidate"])
        now = self.clock.seconds()
        deny = {"granted": False, "epoch": max(self.store.promised, self.seen_epoch)}
        if epoch <= self.store.promised:
            return deny
        if self.role == PRIMARY:
            return deny
        if self.leader is not None and self.leader != candidate and now - self.last_heard < self.base_timeout:
            return deny  # we hear a live primary: do not let a late-comer disrupt it
        if msg.get("pre"):
            return {"granted": True, "last_seq": self.store.last_seq, "last_epoch": self.store.last_epoch}
        self.store.promise(epoch)
        self.last_heard = now
        self.leader = None
        log.info("promised epoch {epoch} to replica {candidate}", epoch=epoch, candidate=candidate)
        return {"granted": True, "last_seq": self.store.last_seq, "last_epoch": self.store.last_epoch}

    # -- elections ------------------------------------------------------------
    async def elect(self) -> None:
        self.electing = True
        try:
            await self._elect()
        finally:
            self.electing = False

    async def _ask(self, message: dict[str, Any]) -> list[tuple[int, int, int]]:
        """Send a vote request to every other replica; (last_epoch, last_seq, id) of each grant."""
        ids = list(self.others)
        answers = await DeferredList([ensureDeferred(self.rpc(self.others[i], "/internal/vote", message))
                                      for i in ids], consumeErrors=True)
        grants = []
        for pid, (ok, answer) in zip(ids, answers):
            if not ok:
                continue
            if answer.get("granted"):
                grants.append((int(answer["last_epoch"]), int(answer["last_seq"]), pid))
            else:
                self.seen_epoch = max(self.seen_epoch, int(answer.get("epoch", 0)))
        return grants

    def _back_off(self) -> None:
        # wait a random part of a timeout more, so two candidates do not keep colliding
        self.last_heard = self.clock.seconds() + random.uniform(0, 0.5)

    async def _elect(self) -> None:
        epoch = max(self.store.promised, self.seen_epoch) + 1
        message = {"epoch": epoch, "candidate": self.replica_id, "pre": True,
                   "last_seq": self.store.last_seq, "last_epoch": self.store.last_epoch}
        if 1 + len(await self._ask(message)) < self.majority or self.role == PRIMARY:
            self._back_off()  # a pre-vote lost: nothing was promised, the primary is undisturbed
            return
        epoch = max(epoch, self.store.promised + 1)
        self.store.promise(epoch)  # our own vote: one per epoch, like everyone's
        self.leader = None
        log.info("no primary heard: asking for epoch {epoch}", epoch=epoch)
        grants = await self._ask({**message, "epoch": epoch, "pre": False})
        if 1 + len(grants) < self.majority or self.store.promised != epoch or self.role == PRIMARY:
            self._back_off()
            return
        best = max(grants)
        if (best[0], best[1]) > (self.store.last_epoch, self.store.last_seq):
            await self.catch_up(self.others[best[2]])
        if self.store.promised != epoch or self.leader is not None:
            return  # someone else won meanwhile
        self._become_primary(epoch)

    async def catch_up(self, url: str) -> None:
        """Copy a more advanced replica's log (or snapshot) into ours."""
        while True:
            after, epoch = self.store.last_seq, self.store.last_epoch
            status, answer, _ = await call(self.http, self.clock, "GET",
                                           f"{url}/internal/log?after={after}&epoch={epoch}",
                                           secret=self.secret, timeout=30.0)
            if status != 200 or not isinstance(answer, dict):
                raise Unreachable(f"catch-up from {url} answered {status}")
            if "snapshot" in answer:
                self.store.install(answer["snapshot"])
                continue
            entries = [Entry.from_json(e) for e in answer["entries"]]
            if not entries:
                return
            self.store.append(entries)

    def _become_primary(self, epoch: int) -> None:
        self.store.promise(epoch)
        self.epoch = self.seen_epoch = epoch
        self.role = PRIMARY
        self.status = OK
        self.leader = self.replica_id
        log.info("primary for epoch {epoch} at seq {seq}", epoch=epoch, seq=self.store.last_seq)
        self.links = {pid: BackupLink(self, pid, url) for pid, url in self.others.items()}
        for link in self.links.values():
            d = ensureDeferred(link.run())
            d.addErrback(lambda f: log.failure("backup link failed", f))
        if self.on_primary is not None:
            self.on_primary()

    def step_down(self, epoch: int) -> None:
        if self.role != PRIMARY:
            return
        log.info("stepping down: epoch {epoch} is newer than ours ({ours})", epoch=epoch, ours=self.epoch)
        self.store.promise(epoch)
        self.seen_epoch = max(self.seen_epoch, epoch)
        self.role = BACKUP
        self.status = RECOVERING
        self.leader = None
        self.last_heard = self.clock.seconds()
        self.stop()


def install_routes(api: JsonApp, replica: Replica, secret: str | None,
                   write: Callable[[dict[str, Any], int], Awaitable[Any]] | None = None) -> None:
    """The internal endpoints of a replica: replication, catch-up, votes, forwarded writes."""
    from bazar.web import loads, read_body

    def internal_json(request: Any) -> dict[str, Any]:
        require_secret(request, secret)
        data = read_body(request, INTERNAL_BODY_LIMIT)
        try:
            body = loads(data)
        except Exception:
            raise HTTPError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return body

    def guarded(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
        def route(request: Any) -> dict[str, Any]:
            body = internal_json(request)
            try:
                return handler(body)
            except (KeyError, TypeError, ValueError) as exc:
                raise HTTPError(400, f"malformed internal message: {exc.__class__.__name__}") from None
        return route

    replicate = guarded(replica.on_replicate)
    api.route("/internal/replicate", "POST", "replicate")(replicate)
    # every write reaches each backup here: answer it without Klein's routing
    api.shortcut(b"POST", b"/internal/replicate", "replicate",
                 lambda request, rest: None if rest else dumps(replicate(request)))
    api.route("/internal/snapshot", "POST", "snapshot")(guarded(replica.on_snapshot))
    api.route("/internal/vote", "POST", "vote")(guarded(replica.on_vote))

    @api.route("/internal/log", "GET", "log")
    def log_after(request: Any) -> dict[str, Any]:
        require_secret(request, secret)
        try:
            after = int(request.args.get(b"after", [b"0"])[0])
            epoch = int(request.args.get(b"epoch", [b"0"])[0])
        except ValueError:
            raise HTTPError(400, "after and epoch must be integers") from None
        return replica.on_log(after, epoch)

    @api.route("/internal/status", "GET", "status")
    def status(request: Any) -> dict[str, Any]:
        require_secret(request, secret)
        return replica.health()

    @api.route("/internal/write", "POST", "write")
    async def forwarded_write(request: Any) -> dict[str, Any]:
        body = internal_json(request)
        op = body.get("op")
        if not isinstance(op, dict) or not isinstance(op.get("rid"), str) or not isinstance(op.get("op"), str):
            raise HTTPError(400, "a write needs an op object with 'op' and 'rid'")
        hops = hop_count(request)
        outcome = await replica.submit(op, hops) if write is None else await write(op, hops)
        return {"result": outcome.result, "seq": outcome.seq, "keys": list(outcome.keys), "new": outcome.new}

    api.shortcut(b"POST", b"/internal/write", "write",
                 lambda request, rest: None if rest else forwarded_write(request))


def hop_count(request: Any) -> int:
    value = request.getHeader(b"X-Bazar-Hops") or b"0"
    return int(value) if value.isdigit() else 2
