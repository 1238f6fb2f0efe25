"""The HTTP server side of every Bazar process: Twisted's HTTP/1.1 channel hardened
against hostile clients (deadlines, body limits, strict framing, a cap on open
connections, JSON for every refusal), the quiet Site, and `listen`.

Twisted's channel has no public hooks for these; what this module overrides of its
private interface (`_ChunkedTransferDecoder`, `_respondToBadRequestAndDisconnect`,
the name-mangled first-line flag) is kept here and nowhere else, each with its reason.

`listen` also gives a front end what its `--reuse-port` and `--internal-port` ask for:
a port shared with other processes (SO_REUSEPORT), and a port of its own beside it."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder
from twisted.web.server import Request, Site
from zope.interface import implementer

from bazar.http.app import error_body
from bazar.http.peer import no_delay
from bazar.http.request import body_limit

HEADER_DEADLINE = 10.0  # seconds a client has to send a request's line and headers (and a small body)
MIN_BODY_RATE = 64 * 1024  # bytes/s: a body of n bytes adds n / MIN_BODY_RATE seconds to the deadline
LINGER = 2.0  # seconds, after a refusal, to drain (and drop) what the client still sends
log = Logger()

REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large",
           431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 503: b"Service Unavailable"}
# Headers that decide who a request is, what it is, or where its body ends: sent twice,
# two parts of a chain could each believe another one (RFC 9110 5.3), so refuse them.
SINGLE_HEADERS = frozenset({b"authorization", b"x-bazar-secret", b"idempotency-key", b"content-length",
                            b"transfer-encoding", b"host", b"content-type", b"x-bazar-hops"})
MAX_CONNECTIONS = 4096  # open connections one process accepts; beyond them: 503 and close
# seconds a kept-alive connection may stay silent; beyond HEADER_DEADLINE, so that a
# silent new connection gets its JSON 408 first
IDLE_TIMEOUT = 15


class LimitedChunks(_ChunkedTransferDecoder):
    """A chunked body refused (413) as soon as a chunk announces more than the
    route's limit, not once that many bytes have been received."""

    limit = 0
    channel: Any = None

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        done = super()._dataReceived_CHUNK_LENGTH()
        if done and self.state == "BODY" and self.length > self.limit:
            self.state = "FINISHED"
            del self._buffer[:]
            self.channel.refuse(413, f"request body is larger than {self.limit} bytes")
            return False
        return done


class GuardedChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel with what hostile clients call for:

    - a deadline for the request line and headers (HEADER_DEADLINE from the first
      byte of a request, or from the connection), extended for the body by its
      announced length at MIN_BODY_RATE: the idle timeout alone is reset by every
      byte, so a client dribbling a header (slowloris) or body byte (slow POST)
      every few seconds would hold its connection for ever;
    - a body over the route's limit is refused (413) from its Content-Length, or as
      soon as a chunked body passes the limit, instead of being buffered first;
    - these refusals and Twisted's own for malformed requests (bare `400 Bad
      Request`, no body) are JSON like every other error. After a refusal the rest
      of the request is drained for a moment, so the client reads the answer instead
      of a connection reset, then the connection is closed.
    """

    header_deadline = HEADER_DEADLINE
    _deadline: Any = None
    _linger: Any = None
    _linger_left = 0
    _refused = False
    _awaiting_request = True

    _host: Any = None

    over_capacity = False
    site_counted: Any = None
    # the resource's `bare_response` (bazar.http.app), or None: a whole plain request
    # that arrives alone on an idle connection may be answered before Twisted parses it
    bare: Any = None
    _bare_lost: list[Callable[[], object]] = []  # (never changed in place: `when_lost`)
    _lost = False

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)  # an answer leaves as soon as it is written (a two-part one too)
        if self.over_capacity:
            self.refuse(503, "too many open connections; retry shortly")
            return
        self._arm()

    def getHost(self) -> Any:
        # Twisted asks for it (a getsockname call) on every request; it never changes.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def _arm(self) -> None:
        if self._deadline is None and self.header_deadline:
            self._deadline = self.callLater(self.header_deadline, self._request_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _request_late(self) -> None:
        self._deadline = None
        self.refuse(408, "the request did not arrive in time", expected=0)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            self._drain(data)
            return
        if self.bare is not None and (data[:4] == b"GET " and data[-4:] == b"\r\n\r\n" or data[:5] == b"POST ") \
                and self._idle():
            response = self.bare(data, self)
            if response is not None:
                self.resetTimeout()
                self._disarm()  # this request is whole and in hand: no deadline runs for it
                if isinstance(response, Deferred):
                    self._await_bare(response)
                else:
                    if self._bare_lost:
                        self._bare_lost = []
                    self.transport.write(response)  # type: ignore[union-attr]
                return
        if self._awaiting_request:
            self._arm()
        super().dataReceived(data)

    def _await_bare(self, answer: Deferred[bytes]) -> None:
        """Hold the connection while a bare answer is still to come, as Twisted holds
        it behind a request in hand: what arrives meanwhile is buffered by Twisted
        (backpressure past a limit), no idle timeout runs; when the answer is written,
        the buffered data is read as the next request. The answer is not cancelled if
        the client goes (a purchase runs to its end either way, as the normal way's)."""
        self._handlingRequest = True
        self._awaiting_request = False  # what arrives meanwhile waits: no header deadline runs for it yet
        self.setRawMode()
        self._savedTimeOut = self.setTimeout(None)
        answer.addCallbacks(self._bare_answered, self._bare_failed)

    def write_now(self, data: bytes) -> None:
        """A part of a bare answer, on its way at once (`bazar.http.app.BareSink`)."""
        if not self._lost:
            self.transport.write(data)  # type: ignore[union-attr]

    def when_lost(self, notify: Callable[[], object]) -> None:
        """Call `notify` if the connection goes before the bare answer in hand is whole."""
        self._bare_lost = [*self._bare_lost, notify]

    def _bare_answered(self, response: bytes) -> None:
        # then as Twisted's `requestDone`: read again, the idle timeout back, the
        # buffered bytes as the next request
        self._bare_lost = []
        if self._lost:
            return
        self.transport.write(response)  # type: ignore[union-attr]
        self._handlingRequest = False
        self._awaiting_request = True
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        if self._savedTimeOut:
            self.setTimeout(self._savedTimeOut)
        data = b"".join(self._dataBuffer)
        self._dataBuffer = []
        self.setLineMode(data)

    def _bare_failed(self, failure: Any) -> None:
        # (`Answer` turns every failure of a handler into an answer: this is a bug's)
        self._bare_lost = []
        log.failure("a bare answer failed", failure)
        if not self._lost:
            self.refuse(500, "internal error", expected=0)

    def _idle(self) -> bool:
        """Between requests: none in hand, nothing of the next one buffered, and the
        connection kept alive (Twisted's own state, read, not changed)."""
        return bool(not self._handlingRequest and not self.requests and self.line_mode and not self._buffer
                    and self.persistent and getattr(self, "_HTTPChannel__first_line", 0) == 1)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if line[:1] in (b" ", b"\t") and not getattr(self, "_HTTPChannel__first_line", 1):
            self.refuse(400, "obsolete line folding in the request's headers")  # RFC 9112 5.2
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._refused:
            return False
        name = line.split(b":", 1)[0].strip().lower()
        request = self.requests[-1] if self.requests else None
        seen = getattr(request, "_single_seen", None)
        if request is not None and seen is None:
            seen = request._single_seen = set()
        if name in SINGLE_HEADERS and seen is not None:
            if name in seen:
                self.refuse(400, f"the {name.decode('ascii', 'replace')} header is given more than once")
                return False
            seen.add(name)
        return bool(super().headerReceived(line))

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            self._drain(data)
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        limit = body_limit(self._path)  # (bytes; Twisted's annotation is off)
        self.requests[-1].body_limit = limit
        if self.length is not None and self.length > limit:
            self.refuse(413, f"request body is larger than {limit} bytes", expected=self.length)
            return
        if self.length and self._deadline is not None:
            self._deadline.delay(self.length / MIN_BODY_RATE)
        decoder = getattr(self, "_transferDecoder", None)
        if type(decoder) is _ChunkedTransferDecoder:
            decoder.__class__ = LimitedChunks
            decoder.limit, decoder.channel = limit, self  # type: ignore[attr-defined]
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self._refused:
            self._awaiting_request = False
            self._disarm()
            super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._awaiting_request = True  # the next request's deadline starts with its first byte
        super().requestDone(request)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's answer to a malformed request line, header, length or chunk.
        self.refuse(400, "malformed HTTP request")

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would drop the connection without a word.
        self.refuse(431, f"request line or header longer than {self.MAX_LENGTH} bytes")

    def refuse(self, status: int, message: str, expected: int | None = None) -> None:
        """Answer `status` with a JSON error, drain the rest for a moment, close."""
        if self._refused:
            return
        self._refused = True
        self._disarm()
        body = error_body(message)
        transport: Any = self.transport
        extra = b"Retry-After: 1\r\n" if status == 503 else b""
        transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                        b"%sConnection: close\r\n\r\n%s" % (status, REASONS[status], len(body), extra, body))
        # Drain the announced body (or, its length unknown, whatever comes) for at most
        # LINGER seconds: a client still sending would otherwise get a connection reset
        # instead of this answer. Dropped bytes cost no memory.
        self._linger_left = expected if expected is not None else -1
        if self._linger_left == 0:
            self.loseConnection()
            return
        self._linger = self.callLater(LINGER, self.loseConnection)
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()  # the client sees the end of the answer now, and may close first

    def _drain(self, data: bytes) -> None:
        if self._linger_left > 0:
            self._linger_left -= len(data)
            if self._linger_left <= 0:
                self.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        lost, self._bare_lost = self._bare_lost, []
        for notify in lost:
            notify()
        if self.site_counted is not None:
            self.site_counted.open_connections -= 1
            self.site_counted = None
        self._disarm()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)


class GuardedRequest(Request):
    """Stops a chunked body at the route's limit (a Content-Length is checked by the
    channel before any byte of the body)."""

    body_limit: int | None = None
    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.body_limit is not None and self._received > self.body_limit:
            channel: Any = self.channel
            channel.refuse(413, f"request body is larger than {self.body_limit} bytes")
            return
        super().handleContentChunk(data)


class QuietSite(Site):
    """No access log (it costs a write per request and would record tokens in URLs),
    no tracebacks, an idle timeout so a silent client cannot hold a connection, and
    GuardedChannel's deadlines and limits. Request bodies are never parsed as HTML
    forms (Twisted would answer a bad multipart body with a bare 400 of its own)."""

    displayTracebacks = False
    noisy = False  # no "Starting factory" line at every start
    protocol = GuardedChannel  # type: ignore[assignment]  # (plain HTTP/1.1: no TLS, so no HTTP/2 to negotiate)
    requestFactory = GuardedRequest

    def __init__(self, resource: Any, max_connections: int = MAX_CONNECTIONS, **kw: Any):
        super().__init__(resource, parsePOSTFormSubmission=False, **kw)
        self.max_connections = max_connections
        self.open_connections = 0
        self.bare = getattr(resource, "bare_response", None)

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.site_counted = self
            channel.bare = self.bare
            self.open_connections += 1
            if self.open_connections > self.max_connections:
                channel.over_capacity = True
        return channel

    def log(self, request: Any) -> None:
        pass


class Listener(StreamServerEndpointService):
    """The process's port. One that cannot be had (in use, not allowed) ends the
    process at start, with one line on stderr and a non-zero exit: a replica that
    cannot be reached must not run on (it would vote and hold its store for nothing)."""

    _raiseSynchronously = True

    def __init__(self, endpoint: Any, site: Site, where: str):
        super().__init__(endpoint, site)
        self.where = where

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as exc:
            self._refuse(exc)

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as exc:
            self._refuse(exc)

    def _refuse(self, exc: CannotListenError) -> None:
        why = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
        # the terminal's stderr (twistd has turned sys.stderr into a log)
        print(f"bazar: cannot listen on {self.where} ({why}); not starting", file=sys.__stderr__, flush=True)
        raise SystemExit(1) from None


BACKLOG = 50  # connections the kernel queues before they are accepted: Twisted's own default for TCP ports


def reuse_port_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A non-blocking listening TCP socket on host:port with SO_REUSEPORT set, so that
    other sockets with it set (of the same user) may listen on the same port: Linux
    then spreads new connections across them. OSError if the port cannot be had."""
    reuse = getattr(socket, "SO_REUSEPORT", None)
    if reuse is None:
        raise OSError("SO_REUSEPORT is not available on this system")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR as Twisted's own ports set it: a restarted process binds through
        # the TIME_WAIT connections of its predecessor
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, reuse, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock  # (close-on-exec already: Python's sockets are not inheritable)


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose port other processes may share (SO_REUSEPORT).
    Twisted's `tcp:` endpoint has no such option, so the socket is made here and
    handed to the reactor (`IReactorSocket.adoptStreamPort`); a port that cannot be
    had fails like Twisted's own, with CannotListenError (which `Listener` turns into
    one line and exit 1)."""

    def __init__(self, reactor: Any, port: int, interface: str, backlog: int = BACKLOG):
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:  # noqa: N803 - the interface's name
        try:
            sock = reuse_port_socket(self.interface, self.port, self.backlog)
        except OSError as exc:
            return fail(CannotListenError(self.interface, self.port, exc))
        try:
            port: IListeningPort = self.reactor.adoptStreamPort(sock.fileno(), sock.family, protocolFactory)
        finally:
            sock.close()  # the reactor listens on a duplicate of the descriptor
        return succeed(port)


def listen(parent: MultiService, reactor: Any, resource: Any, host: str, port: int, *, reuse_port: bool = False,
           internal_port: int | None = None) -> Site:
    """`resource` served on host:port, its listener a child of `parent`. With
    `reuse_port`, the port may be shared with other processes (`ReusePortEndpoint`).
    With `internal_port`, the same site is also served on that port, which is this
    process's alone: whoever must reach this very process (the invalidation push, a
    health check, a scrape) goes there, not to a port the kernel shares out. One site
    for both, so the cap on open connections is the process's."""
    site = QuietSite(resource, timeout=IDLE_TIMEOUT)
    endpoint = (ReusePortEndpoint(reactor, port, host) if reuse_port
                else serverFromString(reactor, f"tcp:{port}:interface={host}"))
    Listener(endpoint, site, f"{host}:{port}").setServiceParent(parent)
    if internal_port is not None:
        own = serverFromString(reactor, f"tcp:{internal_port}:interface={host}")
        Listener(own, site, f"{host}:{internal_port}").setServiceParent(parent)
    return site

