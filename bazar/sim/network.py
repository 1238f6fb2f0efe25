"""An in-memory network for whole Bazar stores: every process in one Python process,
HTTP between them without sockets, time from one simulated clock (`SimClock`).

- `Network` carries each HTTP exchange as an event on the clock: the request is
  rendered by the target's real resource (Klein app, `twisted.web.server.Request`,
  the app's shortcuts, exactly as in production) and the answer comes back as an
  `IResponse` that treq reads as usual. Only the wire is skipped (no HTTP framing
  is written or parsed): an exchange costs about 2.5 times less than through
  `treq.testing.RequestTraversalAgent` (measured), which with `SimClock` is what
  lets the simulation run thousands of seeds. Nothing is delivered inside the
  caller's own call stack: every hop is a separate clock event, as it would be on a
  real network, so no process is ever re-entered by another one.
- Faults, all decided by the network's own `random.Random` so that a seed replays:
  per-message loss (of the request, or of the answer after the request was
  handled: the caller sees its own timeout either way), delay (each way, so
  messages overtake each other), duplication (a request handled twice; the second
  answer goes nowhere); partitions, both ways (`cut`) or one way (`block`: the
  calls of one process to another fail, the other way still works), each either
  refusing (a reset, seen at once) or dropping (silence, seen as a timeout);
  processes killed (`crash`: nothing sent to it is answered, nothing it sent comes
  back, every exchange it was handling is reset), and paused (`pause`: what is
  sent to it and what comes back to it waits until `resume`, like the socket
  buffers of a SIGSTOPped process).
- `filters` stage races for the regression schedules: each is shown every request
  as it arrives (and may make it vanish, or act, e.g. cut a link just then).
- `ProcessClock` is one process's view of the shared clock: its timers are held
  while it is paused (and fire late, all at once, on resume: the process finds its
  clock has jumped) and never fire once it is dead.
- `Driver` advances time in small steps and delivers what is due; `Response` is an
  exchange as a test sees it.

The older unit-test API is kept: `kill`/`revive` a port (it refuses; the objects
behind it are the caller's to stop), `hold`/`release` the answers of a port, and a
fixed `latency` for every request.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable
from functools import partial
from io import BytesIO
from typing import Any, cast

import orjson
import treq
from attrs import define
from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import AlreadyCalledError, Deferred, ensureDeferred, fail
from twisted.internet.error import AlreadyCalled, AlreadyCancelled, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from bazar.http.app import error_body
from bazar.http.client import PeerClient
from bazar.http.peer import BytesProducer
from bazar.messages import EARLY_HEADER

HOST = "127.0.0.1"
REFUSE = "refuse"  # a cut link resets connections: the caller learns at once
DROP = "drop"  # a cut link swallows everything: the caller learns by its timeout
MODES = (REFUSE, DROP)


def url_of(port: int) -> str:
    return f"http://{HOST}:{port}"


# -- time ---------------------------------------------------------------------------------


@implementer(IReactorTime)
class SimClock:
    """Simulated time, as `task.Clock`, with its pending calls in a heap. `Clock`
    sorts the whole list on every call scheduled and every call made; a store has
    hundreds pending (every request's timeout), which made that sort the single
    largest cost of a run. Calls due at the same time run in the order they were
    scheduled, as with `Clock`."""

    def __init__(self) -> None:
        self.rightNow = 0.0
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._order = itertools.count()

    def seconds(self) -> float:
        return self.rightNow

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object,  # noqa: N802
                  **kwargs: object) -> DelayedCall:
        dc = DelayedCall(self.rightNow + delay, callable, args, kwargs, _ignore, self._moved, self.seconds)
        heapq.heappush(self._heap, (dc.time, next(self._order), dc))
        return dc

    def _moved(self, dc: DelayedCall) -> None:
        # reset to an earlier time: the old entry is left behind and skipped when met
        heapq.heappush(self._heap, (dc.time, next(self._order), dc))

    def getDelayedCalls(self) -> list[DelayedCall]:  # noqa: N802
        found: dict[int, DelayedCall] = {}
        for _, _, dc in self._heap:
            if not (dc.cancelled or dc.called):
                found[id(dc)] = dc
        return list(found.values())

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        heap = self._heap
        while heap and heap[0][0] <= self.rightNow:
            when, _, dc = heapq.heappop(heap)
            if dc.cancelled or dc.called or when != dc.time:
                continue  # cancelled, or an entry a reset left behind
            if dc.delayed_time:
                dc.activate_delay()  # postponed: it goes back in at its new time
                heapq.heappush(heap, (dc.time, next(self._order), dc))
                continue
            dc.called = 1
            dc.func(*dc.args, **dc.kw)


def _ignore(dc: DelayedCall) -> None:
    """Cancelled calls stay in the heap, marked, and are skipped when met."""


@implementer(IReactorTime)
class ProcessClock:
    """One process's clock: the shared clock's time, its own timers.

    While the process is paused its timers that come due are held, and run (in
    order) when it resumes; once it is dead none runs again. `seconds()` is always
    the shared time, so a resumed process sees how long it was away."""

    def __init__(self, clock: SimClock, name: str = ""):
        self.clock = clock
        self.name = name
        self.paused = False
        self.dead = False
        self.backlog: list[ProcessCall] = []

    def seconds(self) -> float:
        return self.clock.seconds()

    def getDelayedCalls(self) -> list[IDelayedCall]:  # noqa: N802
        return []  # (nobody asks a process's clock for them)

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object,  # noqa: N802
                  **kwargs: object) -> ProcessCall:
        call = ProcessCall(self, callable, args, kwargs, self.clock.seconds() + delay)
        if not self.dead:
            call.inner = self.clock.callLater(delay, call.fire)
        return call

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        """Run the held timers, in their order, each as its own event after what is
        already due now (the caller resumes the network first: see `World.resume`)."""
        self.paused = False
        backlog, self.backlog = self.backlog, []
        for call in backlog:
            if call.state == "held":
                call.inner = self.clock.callLater(0, call.fire)
                call.state = "pending"

    def kill(self) -> None:
        self.dead = True
        self.backlog = []


@implementer(IDelayedCall)
class ProcessCall:
    """An `IDelayedCall` of a `ProcessClock`."""

    def __init__(
        self, owner: ProcessClock, f: Callable[..., Any], args: tuple[object, ...], kw: dict[str, object], due: float
    ):
        self.owner = owner
        self.f = f
        self.args = args
        self.kw = kw
        self.inner: Any = None
        self.state = "pending"  # pending | held | called | cancelled
        self.time = due

    def fire(self) -> None:
        if self.state != "pending" or self.owner.dead:
            return
        if self.owner.paused:
            self.state = "held"
            self.owner.backlog.append(self)
            return
        self.state = "called"
        self.f(*self.args, **self.kw)

    def getTime(self) -> float:  # noqa: N802
        return float(self.inner.getTime()) if self.inner is not None and self.inner.active() else self.time

    def cancel(self) -> None:
        if self.state == "called":
            raise AlreadyCalled()
        if self.state == "cancelled":
            raise AlreadyCancelled()
        self.state = "cancelled"
        if self.inner is not None and self.inner.active():
            self.inner.cancel()

    def delay(self, seconds: float) -> None:
        if self.inner is not None and self.inner.active():
            self.inner.delay(seconds)

    def reset(self, seconds: float) -> None:
        if self.inner is not None and self.inner.active():
            self.inner.reset(seconds)

    def active(self) -> bool:
        return self.state in ("pending", "held")


# -- faults -------------------------------------------------------------------------------


@define
class LinkFaults:
    """What may happen to any one message; every draw is the network's."""

    loss: float = 0.0  # the request never arrives
    reply_loss: float = 0.0  # the request is handled, its answer never arrives
    duplicate: float = 0.0  # the request is handled twice
    delay: float = 0.0  # the longest extra delay of each way, uniform from 0
    slow: float = 0.0  # chance that a message is slow: up to `slow_delay` instead
    slow_delay: float = 1.5

    @property
    def calm(self) -> bool:
        return not (self.loss or self.reply_loss or self.duplicate or self.delay or self.slow)


# -- the server side ----------------------------------------------------------------------


class Router(Resource):
    """The server side of the whole network: the app listening on the port dialled."""

    isLeaf = True

    def __init__(self, network: Network):
        super().__init__()
        self.network = network

    def render(self, request: Any) -> Any:
        port = request.getHost().port
        app = self.network.apps.get(port)
        if app is None:  # the network refuses these; reaching here is a harness bug
            request.setResponseCode(599)
            return error_body(f"nothing listens on {port}")
        return app.render(request)


class _Channel:
    """What `twisted.web.server.Request` needs of its HTTPChannel: addresses, the
    site, somewhere to write the answer, and a call when the answer is complete."""

    factory = None  # no access log

    def __init__(self, site: Site, port: int, peer: int, done: Callable[[int, bytes, Headers, bytes], None],
                 part: Callable[[int, bytes, Headers, bytes | None], None] | None = None):
        self.site = site
        self.host = IPv4Address("TCP", HOST, port)
        self.peer = IPv4Address("TCP", HOST, peer)
        self.transport = self
        self.done = done
        # an answer in parts (EARLY_HEADER) goes out a part at a time, as over TCP;
        # then `part` gets each part, and None at the end
        self.part = part
        self.streaming = False
        self.code = 0
        self.phrase = b""
        self.headers = Headers()
        self.body: list[bytes] = []

    def getHost(self) -> IPv4Address:  # noqa: N802
        return self.host

    def getPeer(self) -> IPv4Address:  # noqa: N802
        return self.peer

    def isSecure(self) -> bool:  # noqa: N802
        return False

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:  # noqa: N802
        self.code, self.phrase, self.headers = int(code), reason, headers
        self.streaming = self.part is not None and headers.hasHeader(EARLY_HEADER)

    def write(self, data: bytes) -> None:
        if self.streaming and self.part is not None:
            self.part(self.code, self.phrase, self.headers, data)
        else:
            self.body.append(data)

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        for chunk in data:
            self.write(chunk)

    def requestDone(self, request: Any) -> None:  # noqa: N802
        if self.streaming and self.part is not None:
            self.part(self.code, self.phrase, self.headers, None)
        else:
            self.done(self.code, self.phrase, self.headers, b"".join(self.body))

    def loseConnection(self) -> None:  # noqa: N802
        pass


@implementer(IResponse)
class Answer:
    """An answer as the caller's treq sees it."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None  # noqa: N815

    def __init__(self, code: int, phrase: bytes, headers: Headers, body: bytes):
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.body = body
        self.length: int | str = len(body)

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        protocol.makeConnection(None)
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: Any) -> None:  # noqa: N802
        self.previousResponse = response


class StreamedAnswer(Answer):
    """An answer whose body arrives a part at a time (EARLY_HEADER): the caller's body
    protocol is given each part as the network delivers it, then the end (or a reset);
    parts that arrive before the caller asks for the body wait for it."""

    def __init__(self, code: int, phrase: bytes, headers: Headers):
        super().__init__(code, phrase, headers, b"")
        self.length = UNKNOWN_LENGTH
        self.protocol: Any = None
        self.backlog: list[bytes | Failure] = []
        self.closed = False

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        self.protocol = protocol
        protocol.makeConnection(None)
        backlog, self.backlog = self.backlog, []
        for item in backlog:
            self.feed(item)

    def feed(self, item: bytes | Failure) -> None:
        """A part (bytes), or the end (a Failure: ResponseDone, or the reset)."""
        if self.closed:
            return
        if self.protocol is None:
            self.backlog.append(item)
        elif isinstance(item, Failure):
            self.closed = True
            self.protocol.connectionLost(item)
        else:
            self.protocol.dataReceived(item)


# -- the client side ----------------------------------------------------------------------


@implementer(IAgent)
class Gate:
    """One process's outgoing HTTP. A gate belongs to one incarnation of its
    process: once that one is dead (`Network.crash`), nothing it sends arrives and
    nothing it was waiting for comes back."""

    def __init__(self, network: Network, source: int | None):
        self.network = network
        self.source = source
        self.incarnation = network.incarnations.get(source, 0) if source is not None else 0

    @property
    def dead(self) -> bool:
        return self.source is not None and self.network.incarnations.get(self.source, 0) != self.incarnation

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:  # noqa: N803
        return self.network.send(self, method, uri, headers, bodyProducer)


class Exchange:
    """One HTTP request and its answer, in flight."""

    __slots__ = (
        "gate",
        "port",
        "method",
        "uri",
        "headers",
        "body",
        "answer",
        "request",
        "finished",
        "incarnation",
        "reply_lost",
        "twin",
        "stream",
        "due",
        "held_parts",
    )

    def __init__(
        self,
        gate: Gate,
        port: int,
        method: bytes,
        uri: bytes,
        headers: Headers,
        body: bytes,
        incarnation: int,
        twin: bool = False,
    ):
        self.gate = gate
        self.port = port
        self.method = method
        self.uri = uri
        self.headers = headers
        self.body = body
        self.incarnation = incarnation  # of the target, when sent: a restarted target never sees it
        self.answer: Deferred[Any] | None = None
        self.request: Any = None
        self.finished = False  # answered, failed or abandoned by the caller
        self.reply_lost = False
        self.twin = twin  # a duplicate: handled, its answer dropped
        # an answer in parts: its StreamedAnswer (None: not one, or none goes back), when
        # its last part is due, and the parts that wait for a paused caller, in order
        self.stream: StreamedAnswer | None = None
        self.due = 0.0
        self.held_parts: list[bytes | Failure] | None = None

    @property
    def source(self) -> int | None:
        return self.gate.source

    def json(self) -> Any:
        """The request body as JSON (None when it is not)."""
        try:
            return orjson.loads(self.body) if self.body else None
        except orjson.JSONDecodeError:
            return None


class _Client(PeerClient):
    """Bazar's own client (its short way for `bazar.http.client.call`, whose header
    values are lists); anything else, as from a test, takes treq's full way."""

    def request(self, method: str, url: Any, **kw: Any) -> Any:
        headers = kw.get("headers")
        if isinstance(headers, dict) and not all(isinstance(v, list) for v in headers.values()):
            return HTTPClient.request(self, method, url, **kw)
        return super().request(method, url, **kw)


def _body_of(producer: Any) -> bytes:
    """The bytes of a request body (every producer Bazar and treq use here writes
    its body at once)."""
    if producer is None:
        return b""
    if isinstance(producer, (bytes, str)):
        return producer.encode() if isinstance(producer, str) else producer
    body = getattr(producer, "body", None)
    if isinstance(body, bytes):
        return body
    chunks: list[bytes] = []

    class Consumer:
        write = chunks.append

    producer.startProducing(Consumer())
    return b"".join(chunks)


def body_producer(data: Any) -> Any:
    """Bodies for treq's full client: producers as they are, bytes and text at once."""
    if IBodyProducer.providedBy(data):
        return data
    return BytesProducer(data.encode() if isinstance(data, str) else data)


class Network:
    def __init__(self, clock: SimClock | None = None, latency: float = 0.0, rng: random.Random | None = None) -> None:
        self.clock = clock or SimClock()
        self.latency = latency
        self.rng = rng or random.Random(0)
        self.faults = LinkFaults()
        self.apps: dict[int, Any] = {}
        self.down: set[int] = set()
        self.cuts: dict[frozenset[int], str] = {}  # both ways
        self.blocked: dict[tuple[int, int], str] = {}  # (from, to): one way only
        self.held: set[int] = set()  # answers from these ports wait for release()
        self.parked: list[tuple[int, Deferred[Any], Any]] = []
        self.paused: set[int] = set()
        self.waiting: dict[int, list[Callable[[], None]]] = {}  # deliveries to/for a paused process
        self.incarnations: dict[int, int] = {}
        self.handling: dict[int, list[Exchange]] = {}  # per port: requests being handled
        self.exempt: set[int | None] = {None}  # sources whose messages the faults spare (the harness)
        # Sources whose requests are never duplicated: TCP never delivers a request
        # twice; a duplicate is a re-send behind the caller's back, which Bazar's
        # own processes must tolerate, but a public client's admin call is, by
        # contract, not idempotent (each gets a new request id).
        self.once: set[int | None] = set()
        self.jitter = 0.0  # every hop takes up to this long on top of `latency`: messages overtake each other
        # Staged races: each is asked about every request as it arrives; one that
        # answers True makes it vanish (the caller sees its timeout).
        self.filters: list[Callable[[Exchange], bool]] = []
        self.site = Site(Router(self))
        self.stats: Counter[str] = Counter()

    # -- processes ----------------------------------------------------------------------
    def add(self, port: int, resource: Any) -> None:
        self.apps[port] = resource
        self.down.discard(port)

    def client(self, source: int | None = None) -> HTTPClient:
        return _Client(cast(IAgent, Gate(self, source)), data_to_body_producer=body_producer)

    def kill(self, port: int) -> None:
        self.down.add(port)

    def revive(self, port: int) -> None:
        self.down.discard(port)

    def crash(self, port: int) -> None:
        """kill -9 of the process on `port`: it refuses from now on, its gates die
        (start it again with `add` and new clients), and every exchange it was
        handling is reset."""
        self.down.add(port)
        self.incarnations[port] = self.incarnations.get(port, 0) + 1
        self.paused.discard(port)
        self.waiting.pop(port, None)
        for ex in self.handling.pop(port, []):
            if ex.stream is not None:  # an answer in parts, begun: what left arrives, then the reset
                self._flow_later(ex, Failure(ConnectionLost(f"port {port} died")))
            else:
                self._later(0.0, partial(self._fail, ex, ConnectionLost(f"port {port} died")))

    def pause(self, port: int) -> None:
        self.paused.add(port)

    def resume(self, port: int) -> None:
        """What waited for it is delivered now, in any order: a process woken by
        SIGCONT finds many sockets ready at once and reads them in no set order."""
        self.paused.discard(port)
        waiting = self.waiting.pop(port, [])
        self.rng.shuffle(waiting)
        for deliver in waiting:
            self._later(0.0, deliver)

    # -- links ----------------------------------------------------------------------------
    def cut(self, a: int, b: int, mode: str = REFUSE) -> None:
        self.cuts[frozenset((a, b))] = mode

    def block(self, source: int, port: int, mode: str = REFUSE) -> None:
        self.blocked[(source, port)] = mode

    def uncut(self, a: int, b: int) -> None:
        self.cuts.pop(frozenset((a, b)), None)

    def unblock(self, source: int, port: int) -> None:
        self.blocked.pop((source, port), None)

    def heal(self) -> None:
        self.cuts.clear()
        self.blocked.clear()

    def hold(self, port: int) -> None:
        self.held.add(port)

    def release(self, port: int) -> None:
        self.held.discard(port)
        parked, self.parked = self.parked, []
        for held_port, answer, result in parked:
            if held_port == port:
                answer.callback(result)  # a Failure goes down the errback chain
            else:
                self.parked.append((held_port, answer, result))

    def link(self, source: int | None, port: int) -> str | None:
        """How a call from `source` to `port` fares now: None (it goes), REFUSE or DROP."""
        if port not in self.apps or port in self.down:
            return REFUSE
        if source is None:
            return None
        if source in self.down:
            return REFUSE
        mode = self.cuts.get(frozenset((source, port)))
        if mode is None:
            mode = self.blocked.get((source, port))
        return mode

    def reachable(self, source: int | None, port: int) -> bool:
        return self.link(source, port) is None

    # -- delivery -------------------------------------------------------------------------
    def _later(self, delay: float, f: Callable[[], None]) -> None:
        self.clock.callLater(delay, f)

    def _delay(self, source: int | None) -> float:
        faults = self.faults
        if source in self.exempt:
            return 0.0
        extra = self.rng.uniform(0.0, self.jitter) if self.jitter else 0.0
        if faults.slow and self.rng.random() < faults.slow:
            extra += self.rng.uniform(0.0, faults.slow_delay)
        elif faults.delay:
            extra += self.rng.uniform(0.0, faults.delay)
        return extra

    def send(self, gate: Gate, method: bytes, uri: bytes, headers: Any, producer: Any) -> Deferred[Any]:
        if gate.dead:
            return Deferred()  # a dead process sends nothing (and hears nothing)
        target = uri.split(b"/", 3)  # http: / "" / host:port / path
        host, _, digits = target[2].rpartition(b":") if len(target) > 2 else (b"", b"", b"")
        port = int(digits) if host and digits.isdigit() else 80
        path = b"/" + target[3] if len(target) > 3 else b"/"
        source = gate.source
        self.stats["sent"] += 1
        if self.link(source, port) == REFUSE:
            self.stats["refused"] += 1
            return fail(ConnectionRefusedError(f"port {port} refused"))
        hdrs = Headers() if headers is None else headers  # made for this request by the caller's client
        body = _body_of(producer)
        hdrs.setRawHeaders(b"host", [f"{HOST}:{port}".encode()])
        if producer is not None:
            hdrs.setRawHeaders(b"content-length", [b"%d" % len(body)])
        ex = Exchange(gate, port, method, path, hdrs, body, self.incarnations.get(port, 0))
        ex.answer = Deferred(lambda _: self._abandon(ex))
        answer = ex.answer
        faults = self.faults
        lost = False
        if source not in self.exempt and not faults.calm:
            rng = self.rng
            if faults.loss and rng.random() < faults.loss:
                lost = True
                self.stats["lost"] += 1
            elif faults.reply_loss and rng.random() < faults.reply_loss:
                ex.reply_lost = True
                self.stats["reply lost"] += 1
            if faults.duplicate and source not in self.once and rng.random() < faults.duplicate:
                twin = Exchange(gate, port, method, path, hdrs.copy(), body, ex.incarnation, twin=True)
                self.stats["duplicated"] += 1
                self._later(self.latency + self._delay(source), lambda: self._arrive(twin))
        if not lost:
            self._later(self.latency + self._delay(source), lambda: self._arrive(ex))
        return answer

    def _abandon(self, ex: Exchange) -> None:
        """The caller gave up (its timeout): it closes the connection, and a request
        still being handled learns that its client is gone (Klein cancels it)."""
        ex.finished = True
        request = ex.request
        if request is not None and not request.finished and request.channel is not None:
            self._unhandle(ex)
            request.connectionLost(Failure(ConnectionLost("the client went away")))

    def _arrive(self, ex: Exchange) -> None:
        if ex.finished or ex.gate.dead:
            return
        port = ex.port
        if self.incarnations.get(port, 0) != ex.incarnation:
            self._fail(ex, ConnectionLost(f"port {port} restarted"))  # the connection was to the old process
            return
        mode = self.link(ex.source, port)
        if mode == REFUSE:
            self._fail(ex, ConnectionRefusedError(f"port {port} refused"))
            return
        if mode == DROP:
            self.stats["dropped by a cut"] += 1
            return
        if port in self.paused:
            self.waiting.setdefault(port, []).append(lambda: self._arrive(ex))
            return
        for drop in self.filters:
            if drop(ex):
                self.stats["dropped by a filter"] += 1
                return
        self._handle(ex)

    def _handle(self, ex: Exchange) -> None:
        self.stats["handled"] += 1
        peer = ex.source if ex.source is not None else 1
        channel = _Channel(self.site, ex.port, peer, lambda *answer: self._answered(ex, *answer),
                           lambda *part: self._part(ex, *part))
        # Bazar takes JSON only: no form parsing (which would parse every Content-Type)
        request = Request(channel, parsePOSTFormSubmission=False)
        request.requestHeaders = ex.headers
        request.content = BytesIO(ex.body)
        request.content.seek(0, 2)
        ex.request = request
        self.handling.setdefault(ex.port, []).append(ex)
        request.requestReceived(ex.method, ex.uri, b"HTTP/1.0")

    def _unhandle(self, ex: Exchange) -> None:
        handling = self.handling.get(ex.port)
        if handling is not None and ex in handling:
            handling.remove(ex)

    def _answered(self, ex: Exchange, code: int, phrase: bytes, headers: Headers, body: bytes) -> None:
        self._unhandle(ex)
        if ex.twin or ex.reply_lost or ex.finished:
            return
        if self.incarnations.get(ex.port, 0) != ex.incarnation or ex.port in self.down:
            return  # the process died before its answer left
        answer = Answer(code, phrase, headers, body)
        self._later(self._delay(ex.source), lambda: self._reply(ex, answer))

    def _part(self, ex: Exchange, code: int, phrase: bytes, headers: Headers, data: bytes | None) -> None:
        """A part of an answer in parts leaves (None: the answer is complete). The
        first starts the answer as `_answered` does; each part then travels with a delay
        of its own, never overtaking the one before (one TCP connection)."""
        now = self.clock.seconds()
        if ex.stream is None:
            if data is None:
                self._answered(ex, code, phrase, headers, b"")
                return
            self._unhandle(ex)
            if ex.twin or ex.reply_lost or ex.finished or ex.port in self.down \
                    or self.incarnations.get(ex.port, 0) != ex.incarnation:
                ex.reply_lost = True  # and so are its other parts
                return
            ex.stream = StreamedAnswer(code, phrase, headers)
            self.handling.setdefault(ex.port, []).append(ex)  # a crash resets it
            ex.due = now + self._delay(ex.source)
            stream = ex.stream
            self._later(ex.due - now, lambda: self._reply(ex, stream))
        if ex.port in self.down:
            return  # the process died before this part left
        item: bytes | Failure = data if data is not None else Failure(ResponseDone())
        if data is None:
            self._unhandle(ex)
        self._flow_later(ex, item)

    def _flow_later(self, ex: Exchange, item: bytes | Failure) -> None:
        now = self.clock.seconds()
        ex.due = max(ex.due, now + self._delay(ex.source))
        self._later(ex.due - now, lambda: self._flow(ex, item))

    def _flow(self, ex: Exchange, item: bytes | Failure) -> None:
        stream = ex.stream
        if stream is None or stream.closed or ex.gate.dead:
            return
        if ex.held_parts is not None:
            ex.held_parts.append(item)  # behind the parts that wait already
            return
        source = ex.source
        if source is not None and source in self.paused:
            ex.held_parts = [item]

            def flush() -> None:
                held, ex.held_parts = ex.held_parts or [], None
                for part in held:
                    self._flow(ex, part)

            self.waiting.setdefault(source, []).append(flush)
            return
        mode = self.link(ex.source, ex.port) if ex.port not in self.down else None
        if mode == REFUSE:
            stream.feed(Failure(ConnectionLost(f"the link to {ex.port} was cut")))
            return
        if mode == DROP:
            self.stats["dropped by a cut"] += 1
            stream.closed = True  # nothing more comes through: the caller times out
            return
        stream.feed(item)

    def _reply(self, ex: Exchange, answer: Answer) -> None:
        if ex.finished or ex.gate.dead:
            return
        source = ex.source
        if source is not None and source in self.paused:
            self.waiting.setdefault(source, []).append(lambda: self._reply(ex, answer))
            return
        mode = self.link(ex.source, ex.port) if ex.port not in self.down else None
        if mode == REFUSE:
            self._fail(ex, ConnectionLost(f"the link to {ex.port} was cut"))
            return
        if mode == DROP:
            self.stats["dropped by a cut"] += 1
            return
        ex.finished = True
        assert ex.answer is not None
        if ex.port in self.held:
            self.parked.append((ex.port, ex.answer, answer))
            return
        ex.answer.callback(answer)

    def _fail(self, ex: Exchange, why: Exception) -> None:
        if ex.finished or ex.gate.dead or ex.twin:
            return
        source = ex.source
        if source is not None and source in self.paused:
            self.waiting.setdefault(source, []).append(lambda: self._fail(ex, why))
            return
        ex.finished = True
        assert ex.answer is not None
        try:
            ex.answer.errback(Failure(why))
        except AlreadyCalledError:  # cancelled meanwhile
            pass

    def flush(self) -> None:
        """Deliver everything due now (and what that sends in turn, without delay)."""
        self.clock.advance(0)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a fired Deferred (its failure re-raised)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return _unbox(box)


def _unbox(box: list[Any]) -> Any:
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class Driver:
    """Time and delivery for everything on one network."""

    def __init__(self, network: Network | None = None, clock: SimClock | None = None, latency: float = 0.0):
        self.clock = clock or (network.clock if network is not None else SimClock())
        self.network = network or Network(self.clock, latency)
        self.tickers: list[Callable[[], Any]] = []

    def step(self, seconds: float) -> None:
        self.network.flush()
        self.clock.advance(seconds)
        for tick in list(self.tickers):
            tick()
        self.network.flush()

    def run(self, seconds: float, step: float = 0.05) -> None:
        for _ in range(max(1, round(seconds / step))):
            self.step(step)

    def wait(self, d: Deferred[Any], limit: float = 30.0, step: float = 0.05) -> Any:
        """Advance time until `d` has a result (at most `limit` seconds); that result."""
        box: list[Any] = []
        d.addBoth(box.append)
        self.network.flush()
        waited = 0.0
        while not box:
            assert waited < limit, f"still waiting after {limit} simulated seconds"
            self.step(step)
            waited += step
        return _unbox(box)

    def until(self, condition: Callable[[], bool], limit: float = 30.0, step: float = 0.05) -> float:
        waited = 0.0
        self.network.flush()
        while not condition():
            assert waited < limit, f"condition not met after {limit} simulated seconds"
            self.step(step)
            waited += step
        return waited

    def do(self, coroutine: Any, limit: float = 30.0) -> Any:
        return self.wait(ensureDeferred(coroutine), limit)

    def http(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        source: int | None = None,
    ) -> Response:
        """One client exchange through the network: (status, headers, body)."""
        client = self.network.client(source)
        kw: dict[str, Any] = {"headers": headers or {}}
        if json is not None:
            kw["json"] = json
        if data is not None:
            kw["data"] = data
        response = self.wait(client.request(method, url, **kw))
        body = self.wait(treq.content(response))
        return Response(response.code, response.headers, body)


class Response:
    def __init__(self, code: int, headers: Any, body: bytes):
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.code} {self.body[:200]!r}>"


__all__ = [
    "DROP",
    "HOST",
    "MODES",
    "REFUSE",
    "Answer",
    "Driver",
    "Exchange",
    "Gate",
    "LinkFaults",
    "Network",
    "ProcessCall",
    "ProcessClock",
    "Response",
    "Router",
    "SimClock",
    "body_producer",
    "result_of",
    "url_of",
]
