"""The HTTP agent under treq for Bazar's calls between its own processes.

Every replicated write costs a dozen HTTP exchanges between Bazar's processes (the
hops of a purchase, the appends and commit notices of two Raft groups), and
Twisted's general-purpose client (`twisted.web.client.Agent` with its pool) spent
about 320 µs of CPU on each on this machine (this one: about 90 µs): most of it in its request and response
state machines, header objects and Deferred chains. On two cores that CPU is the
purchase's latency and its throughput (docs/bench/durability.md).

`PeerAgent` is an `IAgent` for the one kind of exchange Bazar makes with its peers,
and hands anything else to the general agent it wraps:

- plain `http://` to a host and port, a body that is bytes already in hand
  (`BytesProducer`) or none;
- the request leaves in one write: request line, headers and body;
- the response's head is parsed in one pass; its body is read by its length, or
  chunked (the two-part answer of `EARLY_HEADER` and any streamed answer), or to the
  connection's end, and handed to `deliverBody`'s protocol as it arrives;
- one request at a time per connection; a connection whose answer was read to the
  end is kept for the next request to that peer (at most `per_host` of them, and for
  at most `IDLE_SECONDS`, under the servers' idle timeout of 15 s, so that a kept
  connection is not one the server is closing);
- a request is never sent twice: a connection that breaks before the answer fails
  the request with `ResponseNeverReceived`, after part of it with `ResponseFailed`,
  as Twisted's agent does with automatic retries off. Cancelling the request (a
  caller's timeout) aborts its connection.

treq's `HTTPClient` runs on top of it unchanged (`bazar.http.client.PeerClient`):
the responses are `IResponse`s, and `treq.content` and `deliverBody` work as usual.

Twisted's `_ChunkedTransferDecoder` and `_IdentityTransferDecoder` (twisted.web.http,
private) decode the bodies: the same code Twisted's own client and server use.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss, _ChunkedTransferDecoder, _IdentityTransferDecoder
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

IDLE_SECONDS = 10.0  # a kept connection unused this long is closed rather than used
MAX_HEAD = 64 * 1024  # a response head longer than this is not an answer of a peer
NO_BODY = frozenset({204, 304})


@implementer(IBodyProducer)
class BytesProducer:
    """A request body written in the same reactor turn as the headers. (treq's default,
    FileBodyProducer, writes it one turn later through a cooperator: the body then
    leaves as a second small TCP segment and waits on the peer's delayed ACK.)"""

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def no_delay(transport: Any) -> None:
    """Nagle's algorithm off (TCP_NODELAY) on a TCP transport: what is written leaves at
    once, not when the previous segment is acknowledged (other transports: nothing)."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        setter(True)


class BadResponse(Exception):
    """The peer's answer is not HTTP/1.1 as Bazar's servers write it."""


@implementer(IResponse)
class PeerResponse:
    """One response, its body handed to `deliverBody`'s protocol as it arrives (what
    came before the protocol did is kept for it)."""

    version = (b"HTTP", 1, 1)
    previousResponse = None
    request = None

    def __init__(self, connection: PeerConnection, code: int, phrase: bytes, headers: Headers, length: Any):
        self._connection = connection
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._protocol: Protocol | None = None
        self._held: list[bytes] = []
        self._end: Failure | None = None

    def deliverBody(self, protocol: Protocol) -> None:  # noqa: N802 (Twisted's name)
        if self._protocol is not None:
            raise RuntimeError("the body of a response can be delivered once only")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self._connection))
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._end is not None:
            protocol.connectionLost(self._end)

    def setPreviousResponse(self, response: Any) -> None:  # noqa: N802 (IResponse's name)
        self.previousResponse = response

    def _data(self, data: bytes) -> None:
        if not data:
            return
        if self._protocol is None:
            self._held.append(data)
        else:
            self._protocol.dataReceived(data)

    def _finish(self, reason: Failure) -> None:
        if self._end is not None:
            return
        self._end = reason
        if self._protocol is not None:
            self._protocol.connectionLost(reason)


class _BodyTransport:
    """What a body's protocol sees as its transport: it may only stop the body (the
    connection is then closed, never kept)."""

    def __init__(self, connection: PeerConnection):
        self._connection = connection

    def stopProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self._connection.abandon()

    def loseConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self._connection.abandon()

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        pass

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        pass


class PeerConnection(Protocol):
    """One kept-alive connection to a peer, one exchange at a time."""

    def __init__(self, agent: PeerAgent, key: tuple[bytes, int]):
        self.agent = agent
        self.key = key
        self.waiting: Deferred[IResponse] | None = None  # the request whose head has not come yet
        self.response: PeerResponse | None = None  # the response whose body is being read
        self.decoder: Any = None
        self.buffer = b""
        self.head_request = False
        self.keep = True  # the answer allows the connection to be kept
        self.lost = False
        self.idle_since = 0.0

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        no_delay(self.transport)  # one write per request, one answer back: nothing for Nagle to gather

    # -- the request --------------------------------------------------------------------
    def send(self, data: bytes, head_request: bool) -> Deferred[IResponse]:
        self.buffer = b""
        self.head_request = head_request
        self.waiting = Deferred(lambda _: self.abandon())
        transport: Any = self.transport
        transport.write(data)
        # On the wire now, not when the reactor next polls: the peer starts on it while
        # this process finishes its turn (a leader's appends, then its own fsync). What
        # the socket does not take now the reactor sends as usual; a broken connection
        # is found there too.
        write_now = getattr(transport, "doWrite", None)
        if write_now is not None and not self.lost:
            write_now()
        return self.waiting

    def abandon(self) -> None:
        """The caller gave up on this exchange: the connection goes with it."""
        self.agent.forget(self)
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- the response -------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self.decoder is not None:
            self._body(data)
            return
        if self.waiting is None:
            self.abandon()  # bytes nobody asked for: this connection is not in step
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._fail_head(BadResponse("response head too long"))
            return
        head, rest = self.buffer[:end], self.buffer[end + 4:]
        self.buffer = b""
        try:
            response, self.decoder, keep = self._parse(head)
        except (BadResponse, ValueError) as exc:
            self._fail_head(BadResponse(str(exc)))
            return
        self.keep = keep
        self.response = response
        waiting, self.waiting = self.waiting, None
        waiting.callback(response)
        if self.decoder is None:
            self._done(b"")
        elif rest:
            self._body(rest)

    def _parse(self, head: bytes) -> tuple[PeerResponse, Any, bool]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"HTTP/1.1" or len(parts[1]) != 3 or not parts[1].isdigit():
            raise BadResponse(f"bad status line {lines[0][:80]!r}")
        code = int(parts[1])
        headers = Headers()
        length: Any = UNKNOWN_LENGTH
        chunked = False
        keep = True
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise BadResponse("bad header line")
            value = value.strip()
            headers.addRawHeader(name, value)
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
                if length < 0:
                    raise BadResponse("negative content-length")
            elif lower == b"transfer-encoding":
                chunked = value.lower() == b"chunked"
            elif lower == b"connection":
                keep = value.lower() != b"close"
        if self.head_request or code in NO_BODY or 100 <= code < 200:
            length, chunked = 0, False
        response = PeerResponse(self, code, parts[2] if len(parts) > 2 else b"", headers, length)
        if chunked:
            response.length = UNKNOWN_LENGTH
            return response, _ChunkedTransferDecoder(response._data, self._done), keep
        if length == 0:
            return response, None, keep
        if length is UNKNOWN_LENGTH:
            return response, _UntilClosed(response._data), False
        return response, _IdentityTransferDecoder(length, response._data, self._done), keep

    def _body(self, data: bytes) -> None:
        try:
            self.decoder.dataReceived(data)
        except Exception as exc:  # noqa: BLE001 (a malformed chunk: the body failed)
            self._fail_body(Failure(ResponseFailed([Failure(exc)])))

    def _done(self, extra: bytes) -> None:
        response = self.response
        self.decoder = None
        self.response = None
        if extra:
            self.keep = False  # bytes past the answer: not in step any more
        if self.keep and not self.lost:
            self.agent.release(self)
        else:
            self.abandon()
        if response is not None:
            response._finish(Failure(ResponseDone("Response body fully received")))

    def _fail_head(self, exc: Exception) -> None:
        waiting, self.waiting = self.waiting, None
        self.abandon()
        if waiting is not None:
            waiting.errback(Failure(ResponseFailed([Failure(exc)])))

    def _fail_body(self, reason: Failure) -> None:
        response, self.response, self.decoder = self.response, None, None
        self.abandon()
        if response is not None:
            response._finish(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 (Twisted's name)
        self.lost = True
        self.agent.forget(self)
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            if not waiting.called:
                waiting.errback(Failure(ResponseNeverReceived([reason])))
        elif self.response is not None:
            if isinstance(self.decoder, _UntilClosed):
                response, self.response, self.decoder = self.response, None, None
                response._finish(Failure(PotentialDataLoss()))
            else:
                self._fail_body(Failure(ResponseFailed([reason])))


class _UntilClosed:
    """A body with neither a length nor chunks: it ends when the connection does."""

    def __init__(self, data: Any):
        self.dataReceived = data


class _Connector(Factory):
    def __init__(self, agent: PeerAgent, key: tuple[bytes, int]):
        self.agent = agent
        self.key = key
        self.noisy = False

    def buildProtocol(self, addr: Any) -> PeerConnection:  # noqa: N802 (Twisted's name)
        return PeerConnection(self.agent, self.key)


@implementer(IAgent)
class PeerAgent:
    """`IAgent` for Bazar's own exchanges (see the module), `general` for the rest;
    `endpoints` makes the connections (`bazar.http.client.PeerEndpoints`)."""

    def __init__(self, reactor: Any, endpoints: Any, general: Any, per_host: int = 64):
        self.reactor = reactor
        self.endpoints = endpoints
        self.general = general
        self.per_host = per_host
        self.idle: dict[tuple[bytes, int], collections.deque[PeerConnection]] = {}
        self.busy: set[PeerConnection] = set()
        self.closed = False

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> Deferred[Any]:  # noqa: N803 (IAgent's name)
        body = bodyProducer.body if isinstance(bodyProducer, BytesProducer) else b"" if bodyProducer is None else None
        if not uri.startswith(b"http://") or not isinstance(body, bytes) or self.closed:
            return self._general(method, uri, headers, bodyProducer)
        authority, slash, rest = uri[7:].partition(b"/")
        host, colon, port_text = authority.rpartition(b":")
        if not colon or not port_text.isdigit() or not host or b"@" in authority:
            return self._general(method, uri, headers, bodyProducer)
        key = (host, int(port_text))
        lines = [method, b" /", rest, b" HTTP/1.1\r\nHost: ", authority, b"\r\n"]
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                if name.lower() in (b"host", b"content-length", b"connection", b"transfer-encoding"):
                    continue
                for value in values:
                    lines += [name, b": ", value, b"\r\n"]
        if bodyProducer is not None or method in (b"POST", b"PUT", b"PATCH"):
            lines += [b"Content-Length: ", str(len(body)).encode(), b"\r\n"]
        lines += [b"\r\n", body]
        data = b"".join(lines)
        head_request = method == b"HEAD"
        connection = self._take(key)
        if connection is not None:
            return connection.send(data, head_request)
        return self._connect(key, authority).addCallback(lambda c: c.send(data, head_request))

    def _general(self, method: bytes, uri: bytes, headers: Headers | None, producer: Any) -> Deferred[Any]:
        d: Deferred[Any] = self.general.request(method, uri, headers, producer)
        return d

    def _take(self, key: tuple[bytes, int]) -> PeerConnection | None:
        idle = self.idle.get(key)
        now = self.reactor.seconds()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closing
            if connection.lost:
                continue
            if now - connection.idle_since > IDLE_SECONDS:
                connection.abandon()
                continue
            self.busy.add(connection)
            return connection
        return None

    def _connect(self, key: tuple[bytes, int], authority: bytes) -> Deferred[PeerConnection]:
        endpoint = self.endpoints.endpointForURI(_URI(b"http", key[0], key[1]))
        d: Deferred[PeerConnection] = endpoint.connect(_Connector(self, key))

        def connected(connection: PeerConnection) -> PeerConnection:
            if self.closed:
                connection.transport.abortConnection()  # type: ignore[union-attr]
                raise CancelledError("the agent is closed")
            self.busy.add(connection)
            return connection

        return d.addCallback(connected)

    def release(self, connection: PeerConnection) -> None:
        """`connection` finished an exchange in good order: keep it for the next one."""
        self.busy.discard(connection)
        idle = self.idle.setdefault(connection.key, collections.deque())
        if self.closed or len(idle) >= self.per_host:
            connection.transport.loseConnection()  # type: ignore[union-attr]
            return
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)

    def forget(self, connection: PeerConnection) -> None:
        self.busy.discard(connection)
        idle = self.idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)

    def closeCachedConnections(self) -> Deferred[Any]:  # noqa: N802 (the pool's name)
        """Close the kept connections (those in an exchange are closed when it ends),
        and the general agent's."""
        self.closed = True
        for idle in self.idle.values():
            while idle:
                connection = idle.pop()
                if connection.transport is not None and not connection.lost:
                    connection.transport.loseConnection()
        pool = getattr(self.general, "_pool", None)
        return pool.closeCachedConnections() if pool is not None else succeed(None)


class _URI:
    """What `IAgentEndpointFactory.endpointForURI` reads of a URI."""

    def __init__(self, scheme: bytes, host: bytes, port: int):
        self.scheme = scheme
        self.host = host
        self.port = port
