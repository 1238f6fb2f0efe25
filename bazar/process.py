"""One Bazar process as its `build_*` function wires it (`Node`), and the twistd
service that runs it (`serve`): the HTTP listener, the start and stop hooks, the
periodic work, and the watch on the supervisor.

The same nodes run in the tests and the simulation, on an in-memory network and a
simulated clock: only `serve` is production's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from twisted.web.resource import IResource

from bazar.http.client import make_http
from bazar.http.peer import PeerAgent
from bazar.http.server import listen
from bazar.lifecycle import Hooks, every, watch_parent
from bazar.trace import identify


@define
class Node:
    """What a process is made of once wired: its HTTP resource, what to do when it
    starts and stops, and its periodic work ((seconds, call, what it is))."""

    resource: IResource
    on_start: list[Callable[[], object]] = field(factory=list)
    on_stop: list[Callable[[], object]] = field(factory=list)
    periodic: list[tuple[float, Callable[[], object], str]] = field(factory=list)

    def start(self) -> None:
        for hook in self.on_start:
            hook()

    def stop(self) -> Deferred[object] | None:
        waits = [d for d in (hook() for hook in self.on_stop) if isinstance(d, Deferred)]
        return DeferredList(waits, consumeErrors=True) if waits else None  # type: ignore[return-value]


def the_reactor(reactor: Any = None) -> Any:
    """`reactor`, or the global one (imported only now: twistd installs its choice first)."""
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    return reactor


def process_name(options: usage.Options) -> str:
    """This process in traces (bazar.trace): "catalog-1", as bazar-cluster names it, or "frontend"."""
    service = getattr(options, "service", "")
    return f"{service}-{options['id']}" if service else "frontend"


def serve(build: Callable[[IReactorTime, HTTPClient], Node], options: usage.Options,
          reactor: Any = None, *, reuse_port: bool = False, internal_port: int | None = None) -> MultiService:
    """The twistd service of a process: the node `build` wires (with the reactor as its
    clock, and one pooled HTTP client) served on the options' host and port (shared
    with other processes with `reuse_port`; beside it, `internal_port`: `listen`)."""
    reactor = the_reactor(reactor)
    identify(process_name(options))
    http, pool = make_http(reactor)
    return serve_node(build(reactor, http), reactor, options["host"], options["port"], pool,
                      reuse_port=reuse_port, internal_port=internal_port)


def serve_node(node: Node, reactor: Any, host: str, port: int, pool: PeerAgent | None = None, *,
               reuse_port: bool = False, internal_port: int | None = None) -> MultiService:
    """`node` served on host:port, as a twistd service."""
    parent = MultiService()
    listen(parent, reactor, node.resource, host, port, reuse_port=reuse_port, internal_port=internal_port)
    for seconds, work, what in node.periodic:
        every(seconds, work, what).setServiceParent(parent)

    def stop() -> object:
        node.stop()
        return pool.closeCachedConnections() if pool is not None else None

    Hooks(on_start=node.start, on_stop=stop).setServiceParent(parent)
    watch_parent(parent, reactor)
    return parent
