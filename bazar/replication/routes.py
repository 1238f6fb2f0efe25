"""The doors every replica has besides its service's own: readiness (public), the
replica's figures on /metrics, and the internal RPCs of replication (Raft messages,
status, forwarded writes), behind the cluster secret."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from bazar.codec import JSONDecodeError, dumps, loads
from bazar.errors import BazarError, Invalid, Unavailable
from bazar.http.app import JSON, WRITTEN, JsonApp, status_of
from bazar.http.request import INTERNAL_BODY, read_body, require_secret
from bazar.messages import EARLY_HEADER, HOPS_HEADER, RAFT_PATH, SNAPSHOT_PATH, STATUS_PATH, WRITE_PATH
from bazar.replication import raft
from bazar.replication.replica import PRIMARY, Replica
from bazar.replication.store import RETAIN_REQUESTS, Outcome
from bazar.trace import trace

log = Logger()

# bazar_replica_role's `role` label, one series per role (1 for the one it holds): the
# Raft role, with the leader named as /health names it. /health's "backup" is any of
# the other three.
ROLES = {raft.LEADER: PRIMARY, raft.FOLLOWER: "follower", raft.PRE_CANDIDATE: "pre-candidate",
         raft.CANDIDATE: "candidate"}
# taken: the log compacted (the tables are the snapshot); sent: to a backup that needed
# one; installed: from the leader
SNAPSHOT_KINDS = ("taken", "sent", "installed")


def readiness(replica: Replica) -> dict[str, Any]:
    """`GET /ready` of a replica: 200 while it may answer reads (`serving`), else 503
    with the reason. Orchestrators route to, and count as available, only replicas
    that say 200, so a replica that is cut off or still catching up takes no reads
    and holds up a rolling restart until it has caught up."""
    why = replica.not_ready_because()
    if why is not None:
        raise Unavailable(f"{replica.service} replica {replica.replica_id}: {why}")
    return {"ready": True, "service": replica.service, "replica": replica.replica_id, "role": replica.role,
            "epoch": replica.epoch, "last_seq": replica.store.applied, "leader": replica.leader}


async def early_write(request: IRequest, replica: Replica, op: dict[str, Any], hops: int) -> Any:
    """A write whose caller can use its outcome before it is acknowledged (the order
    primary records a sale while the catalog's backups apply it): a primary that has
    applied it answers in two parts (EARLY_HEADER), the outcome as soon as it is
    applied here (committed: durable on a majority), then `{"acknowledged": true}`
    once the acknowledgement rule allows, or `{"error": ..., "status": ...}` if the
    write could not be acknowledged here. A refusal, a write that ends before it is
    applied here, or one this replica forwards, is answered in one piece, as usual.
    The caller acknowledges nothing to its own client before the second part."""
    # which comes first: the outcome applied here, or the end of the write (its outcome
    # or failure, taken over from `final` here: it may fire in the middle of its own
    # callbacks, where `final` itself cannot be awaited)
    first: Deferred[tuple[bool, Any]] = Deferred()

    def applied(outcome: Outcome) -> None:
        if not first.called:
            first.callback((True, outcome))

    def ended(result: Any) -> Any:
        if first.called:
            return result
        first.callback((False, result))
        return None

    final = ensureDeferred(replica.submit(op, hops, early=applied))
    final.addBoth(ended)
    early, result = await first
    if not early:
        if isinstance(result, Failure):
            result.raiseException()
        return result.to_json()
    if result.error() is not None:
        return (await final).to_json()  # a refusal: answered once acknowledged, in one piece
    outcome = result
    gone: list[bool] = []
    cast(Request, request).notifyFinish().addErrback(lambda _: gone.append(True))
    request.setHeader(EARLY_HEADER, b"1")
    request.setHeader(b"Content-Type", JSON)
    request.write(dumps(outcome.to_json()) + b"\n")
    try:
        await final
        last: dict[str, Any] = {"acknowledged": True}
    except BazarError as exc:
        last = {"error": exc.message, "status": status_of(exc)}
    except Exception:  # noqa: BLE001 (the status is sent: the caller must still learn it failed)
        log.failure("an early write failed after its outcome was sent")
        last = {"error": "internal error", "status": 500}
    if not gone:
        request.write(dumps(last) + b"\n")
    return WRITTEN


def hop_count(request: IRequest) -> int:
    """How many replicas a forwarded request has passed through (a malformed count: too many)."""
    value = request.getHeader(HOPS_HEADER) or b"0"
    return int(value) if value.isdigit() else 2


def internal_body(request: IRequest, secret: str | None) -> dict[str, Any]:
    """The JSON object of an internal request, from a caller that has the cluster secret
    (Bazar's own encoder wrote it: no second parse for duplicate keys, which would
    double the cost of every replication message)."""
    require_secret(request, secret)
    try:
        body = loads(read_body(request, INTERNAL_BODY))
    except JSONDecodeError:
        raise Invalid("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    return body


class ReplicaFigures(Collector):
    """A replica's state as Prometheus reads it, at scrape time: nothing is kept up to
    date on the hot path. Every series is labelled with the service and replica id, so
    that rules group by service whatever the scrape configuration calls its jobs."""

    def __init__(self, replica: Replica):
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        replica = self.replica
        serving = replica.serving  # first: it brings the replica up to now (missed ticks)
        names = ["service", "replica"]
        ids = [replica.service, str(replica.replica_id)]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(ids, value)
            return family

        role = GaugeMetricFamily("bazar_replica_role", "1 for the Raft role this replica holds "
                                 "(primary, follower, pre-candidate, candidate), 0 for the others",
                                 labels=[*names, "role"])
        for core_role, name in ROLES.items():
            role.add_metric([*ids, name], 1.0 if replica.core.role == core_role else 0.0)
        yield role
        yield gauge("bazar_replica_epoch", "the Raft term (epoch) this replica is in", replica.epoch)
        yield gauge("bazar_replica_commit_index", "the highest log index this replica knows committed",
                    replica.core.commit)
        yield gauge("bazar_replica_applied_index", "the highest log index applied to this replica's tables",
                    replica.store.applied)
        yield gauge("bazar_replica_lag_entries", "a backup: committed entries its primary told it of that it "
                    "has not applied yet; a primary: 0", replica.lag)
        yield gauge("bazar_replica_serving", "1 while this replica may answer reads (status ok), "
                    "0 while recovering", 1.0 if serving else 0.0)
        yield gauge("bazar_replica_request_ids", "request ids this replica keeps (with their outcomes, for "
                    f"retries): bounded by the service's last {RETAIN_REQUESTS:,} writes", replica.store.request_ids())
        yield gauge("bazar_replica_voter", "1 when this replica votes, 0 while a learner catching up",
                    1.0 if replica.store.voter else 0.0)
        elections = CounterMetricFamily("bazar_elections", "elections this replica started as a candidate, "
                                        "since its process started (pre-votes that went no further not counted)",
                                        labels=names)
        elections.add_metric(ids, replica.core.elections)
        yield elections
        snapshots = CounterMetricFamily("bazar_snapshots", "snapshots of the store taken (log compacted), sent to "
                                        "a backup and installed from a primary, since the process started",
                                        labels=[*names, "kind"])
        for kind in sorted(set(SNAPSHOT_KINDS) | set(replica.snapshots)):
            snapshots.add_metric([*ids, kind], replica.snapshots[kind])
        yield snapshots


def install_routes(api: JsonApp, replica: Replica) -> None:
    secret = replica.secret
    api.route("/ready", "GET", "ready")(lambda request: readiness(replica))

    @api.route("/health", "GET", "health")
    def health(request: IRequest) -> dict[str, Any]:
        return replica.health()

    # the balancers of every front end and order replica poll it several times a
    # second: answered at the channel, without Klein's routing
    api.fast("GET", "/health", "health", lambda request, rest: None if rest else dumps(health(request)), bare=True)
    api.registry.register(ReplicaFigures(replica))

    @api.rpc(RAFT_PATH, "POST", "raft", bare=True)
    def message(request: IRequest) -> bytes:
        body = internal_body(request, secret)
        trace("receive", None, frm=body.get("src"), kind=body.get("kind"), prev=body.get("prev_index"))
        try:
            answer = replica.receive(body)  # (a follower's answer leaves once what it promises is on disk)
        except (KeyError, TypeError, ValueError) as exc:
            raise Invalid(f"malformed internal message: {exc.__class__.__name__}") from None
        trace("durable", None, frm=body.get("src"), kind=body.get("kind"), prev=body.get("prev_index"),
              n=len(body.get("entries") or ()))
        return dumps(answer)

    @api.rpc(SNAPSHOT_PATH, "POST", "snapshot")
    def snapshot(request: IRequest) -> dict[str, Any]:
        body = internal_body(request, secret)
        try:
            return replica.receive_snapshot(body)
        except (KeyError, TypeError, ValueError, sqlite3.Error) as exc:
            raise Invalid(f"malformed snapshot chunk: {exc.__class__.__name__}") from None

    @api.rpc(STATUS_PATH, "GET", "status")
    def status(request: IRequest) -> dict[str, Any]:
        require_secret(request, secret)
        return {**replica.health(), "pristine": replica.store.pristine, "term": replica.core.term}

    @api.rpc(WRITE_PATH, "POST", "write", bare=True)
    async def forwarded_write(request: IRequest) -> Any:
        body = internal_body(request, secret)
        op = body.get("op")
        if not isinstance(op, dict) or not isinstance(op.get("rid"), str) or not isinstance(op.get("op"), str):
            raise Invalid("a write needs an op object with 'op' and 'rid'")
        if body.get("early") is True:
            return await early_write(request, replica, op, hop_count(request))
        outcome = await replica.submit(op, hop_count(request))
        return outcome.to_json()
