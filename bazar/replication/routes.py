"""The doors every replica has besides its service's own: readiness (public) and the
internal RPCs of replication (Raft messages, status, forwarded writes), behind the
cluster secret."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from bazar.codec import JSONDecodeError, dumps, loads
from bazar.errors import Invalid, Unavailable
from bazar.http.app import JsonApp
from bazar.http.request import INTERNAL_BODY, read_body, require_secret
from bazar.messages import HOPS_HEADER, RAFT_PATH, STATUS_PATH, WRITE_PATH
from bazar.replication.replica import Replica
from bazar.trace import trace


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


def install_routes(api: JsonApp, replica: Replica) -> None:
    secret = replica.secret
    api.route("/ready", "GET", "ready")(lambda request: readiness(replica))

    @api.rpc(RAFT_PATH, "POST", "raft")
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

    @api.rpc(STATUS_PATH, "GET", "status")
    def status(request: IRequest) -> dict[str, Any]:
        require_secret(request, secret)
        return {**replica.health(), "pristine": replica.store.pristine}

    @api.rpc(WRITE_PATH, "POST", "write")
    async def forwarded_write(request: IRequest) -> dict[str, Any]:
        body = internal_body(request, secret)
        op = body.get("op")
        if not isinstance(op, dict) or not isinstance(op.get("rid"), str) or not isinstance(op.get("op"), str):
            raise Invalid("a write needs an op object with 'op' and 'rid'")
        outcome = await replica.submit(op, hop_count(request))
        return outcome.to_json()
