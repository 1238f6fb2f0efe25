"""The references Bazar's cached read is measured against: the same kind of answer
(a constant JSON body the size of a book, `Content-Type: application/json`, a
`Content-Length`) served by a raw twisted.web `Resource` and by a bare Klein route,
each in a process of its own on loopback.

    python -m bazar.bench.references --port N --kind twisted|klein [--size BYTES] [--parent PID]

Neither writes an access log: Bazar's own site writes none, and a log line per request
would measure the log, not the server. Both answer `GET /bazar/info/<id>`, the path
the bench asks Bazar for. With `--parent`, the server stops by itself once that
process is gone, so a bench that dies leaves none behind. `bazar-bench` starts them
with `sys.executable` and stops them by PID (`bazar.bench.compare.ReferenceServers`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from klein import Klein
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

KINDS = ("twisted", "klein")
PATH = "/bazar/info/0"  # what the bench asks each server for, Bazar included
BOOK_SIZE = 128  # bytes of Bazar's answer to GET /bazar/info/0 (the seed book 0)


def book_body(size: int = BOOK_SIZE) -> bytes:
    """A book's JSON, its title padded so that the body is `size` bytes (never less
    than the book with an empty title)."""
    book: dict[str, Any] = {"id": 0, "title": "", "topic": "distributed systems", "price": 100.0, "quantity": 85}
    bare = len(json.dumps(book, separators=(",", ":")))
    book["title"] = "x" * max(0, size - bare)
    return json.dumps(book, separators=(",", ":")).encode()


def answer(request: Any, body: bytes) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


class Constant(Resource):
    """twisted.web at its plainest: one leaf resource, the same body for every GET."""

    isLeaf = True

    def __init__(self, body: bytes):
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (twisted.web's name)
        return answer(request, self.body)


def klein_resource(body: bytes) -> IResource:
    """A bare Klein app with one route, as Bazar's front end routes its reads."""
    app = Klein()

    @app.route("/bazar/info/<int:book_id>", methods=["GET"])
    def info(request: Any, book_id: int) -> bytes:
        return answer(request, body)

    resource: IResource = app.resource()
    return resource


class SilentSite(Site):
    """A Site without its access log (one write per request)."""

    def log(self, request: Any) -> None:
        return None


def resource_of(kind: str, body: bytes) -> IResource:
    if kind == "twisted":
        return Constant(body)
    return klein_resource(body)


def stop_without(parent: int, reactor: Any) -> None:
    """Stop once `parent` is gone (this process then belongs to another parent: init or a subreaper)."""
    if os.getppid() != parent:
        reactor.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bazar.bench.references",
                                description="A reference JSON server for bazar-bench, on 127.0.0.1.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--size", type=int, default=BOOK_SIZE, help="bytes of the JSON body (default: a seed book's)")
    p.add_argument("--parent", type=int, default=None, help="stop once this process is gone")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from twisted.internet import reactor  # (imported only now: nothing of it runs in the bench itself)
    from twisted.internet.task import LoopingCall

    site = SilentSite(resource_of(args.kind, book_body(args.size)))
    site.noisy = False
    # (Twisted's annotations ask for a ServerFactory of a typed protocol: a Site is one)
    reactor.listenTCP(args.port, site, interface="127.0.0.1")  # type: ignore[arg-type]
    if args.parent is not None:
        LoopingCall(stop_without, args.parent, reactor).start(1.0)
    print(f"reference {args.kind} on 127.0.0.1:{args.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
