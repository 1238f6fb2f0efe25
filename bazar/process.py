"""One Bazar process as its `build_*` function wires it (`Node`), and the twistd
service that runs it (`serve`): the HTTP listener, the start and stop hooks, the
periodic work, and the watch on the supervisor.

The same nodes run in the tests and the simulation, on an in-memory network and a
simulated clock: only `serve` is production's own."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from attrs import define, field
from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import IResource

from bazar.http.client import make_http
from bazar.http.peer import PeerAgent
from bazar.http.server import listen
from bazar.lifecycle import Hooks, every, watch_parent
from bazar.trace import identify

log = Logger()


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


def schedule(policy: str) -> bool:
    """Run this process under the Linux CPU scheduling `policy` ("batch" or
    "normal"); False where the system has no such call or refuses it.

    Batch (SCHED_BATCH) is the default. Bazar's processes wake one another all the
    time: every message on loopback wakes its receiver, and under the normal policy
    the receiver, having slept, preempts the sender in the middle of its reactor turn
    (a leader between its two appends, a front end between two answers). Under batch
    a woken process waits for a free core or for the sender to finish its turn, so
    each turn does its work in one go and more of it arrives in batches. An idle core
    still runs a woken process at once: a lone request is not delayed. Measured on 2
    cores (docs/bench/durability.md): purchases/s at 16 connections 15-21% higher, the
    p50 at one connection no worse. Nothing needs privileges: a process may always
    lower itself to batch."""
    setter = getattr(os, "sched_setscheduler", None)
    if setter is None:
        return False
    try:
        setter(0, os.SCHED_BATCH if policy == "batch" else os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        return False
    return True


def serve(build: Callable[[IReactorTime, HTTPClient], Node], options: usage.Options,
          reactor: Any = None, *, reuse_port: bool = False, internal_port: int | None = None) -> MultiService:
    """The twistd service of a process: the node `build` wires (with the reactor as its
    clock, and one pooled HTTP client) served on the options' host and port (shared
    with other processes with `reuse_port`; beside it, `internal_port`: `listen`),
    under the options' CPU scheduling policy (`schedule`)."""
    reactor = the_reactor(reactor)
    identify(process_name(options))
    if not schedule(options["scheduling"]):
        log.info("this system refused the {policy} scheduling policy: running under its default one",
                 policy=options["scheduling"])
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
