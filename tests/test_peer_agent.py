"""bazar.http.peer.PeerAgent, the agent under treq for Bazar's own exchanges: the
bytes it sends, the answers it reads (by length, chunked, to the end), the
connections it keeps and the ones it must not, and every way an exchange can break.
The peer's side is played by hand on an in-memory transport (StringTransport), the
time by a Clock; the last tests run it against Bazar's real HTTP server over
in-memory sockets (Twisted's iosim)."""

from __future__ import annotations

from typing import Any

import pytest
import treq
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource

from bazar.http.client import PeerClient, Unreachable, call, call_early
from bazar.http.peer import IDLE_SECONDS, BytesProducer, PeerAgent
from bazar.http.server import QuietSite

URL = "http://127.0.0.1:5101/internal/raft"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"messages\":[]}"


class Endpoints:
    """Connections as the agent makes them, each on its own StringTransport (or
    another kind: `transport`)."""

    def __init__(self, transport: Any = StringTransport) -> None:
        self.transport = transport
        self.made: list[tuple[Any, StringTransport]] = []

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 (Twisted's name)
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = self.transport()
        protocol.makeConnection(transport)
        self.made.append((protocol, transport))
        return succeed(protocol)

    @property
    def last(self) -> tuple[Any, StringTransport]:
        return self.made[-1]


class General:
    """The general agent: records what is handed to it."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        self.requests.append((method, uri))
        return Deferred()


def agent(clock: Clock | None = None, per_host: int = 4) -> tuple[PeerAgent, Endpoints, General]:
    endpoints, general = Endpoints(), General()
    return PeerAgent(clock or Clock(), endpoints, general, per_host=per_host), endpoints, general


def answered(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def kept(clock: Clock | None = None) -> tuple[PeerAgent, Endpoints, Any, StringTransport]:
    """An agent that made one exchange, answered in full: its connection is kept."""
    clock = clock or Clock()
    a, endpoints, _ = agent(clock)
    d = ensureDeferred(call(PeerClient(a), clock, "POST", URL, body={}))
    protocol, transport = endpoints.last
    protocol.dataReceived(OK)
    answered(d)
    assert len(a.idle[(b"127.0.0.1", 5101)]) == 1
    return a, endpoints, protocol, transport


def test_a_request_leaves_in_one_write_with_its_length_and_host() -> None:
    a, endpoints, _ = agent()
    client = PeerClient(a)
    client.request("POST", URL, headers={b"X-Bazar-Secret": [b"s"]}, data=BytesProducer(b'{"a":1}'))
    _, transport = endpoints.last
    sent = transport.value()
    head, _, body = sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /internal/raft HTTP/1.1"
    assert b"Host: 127.0.0.1:5101" in lines
    assert b"X-Bazar-Secret: s" in lines
    assert b"Content-Length: 7" in lines
    assert body == b'{"a":1}'


def test_a_get_has_no_body_and_no_length() -> None:
    a, endpoints, _ = agent()
    a.request(b"GET", b"http://127.0.0.1:5101/bazar/info/1?x=1")
    sent = endpoints.last[1].value()
    assert sent.startswith(b"GET /bazar/info/1?x=1 HTTP/1.1\r\n")
    assert b"Content-Length" not in sent and sent.endswith(b"\r\n\r\n")


def test_an_answer_by_length_is_read_and_its_connection_kept_for_the_next_request() -> None:
    a, endpoints, _ = agent()
    client = PeerClient(a)
    for n in range(3):
        d = ensureDeferred(call(client, Clock(), "POST", URL, body={"n": n}))
        protocol, transport = endpoints.last
        protocol.dataReceived(OK[:40])
        protocol.dataReceived(OK[40:])
        status, parsed, headers = answered(d)
        assert (status, parsed) == (200, {"messages": []})
        assert headers.getRawHeaders(b"content-type") == [b"application/json"]
        transport.clear()
    assert len(endpoints.made) == 1


def test_a_chunked_answer_reaches_the_reader_part_by_part() -> None:
    a, endpoints, _ = agent()
    client = PeerClient(a)
    d = ensureDeferred(call_early(client, Clock(), URL, body={"op": {}}, secret=None, timeout=1.0))
    protocol, _ = endpoints.last
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-Bazar-Early: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    protocol.dataReceived(b"d\r\n{\"first\": 1}\n\r\n")
    status, first, second = answered(d)
    assert (status, first) == (200, {"first": 1})
    assert second is not None and not second.called
    assert not a.idle.get((b"127.0.0.1", 5101))  # still reading: not kept yet
    protocol.dataReceived(b"17\r\n{\"acknowledged\": true}\n\r\n0\r\n\r\n")
    assert answered(second) == {"acknowledged": True}
    assert len(a.idle[(b"127.0.0.1", 5101)]) == 1


def test_an_answer_without_length_or_chunks_ends_with_its_connection() -> None:
    a, endpoints, _ = agent()
    d = ensureDeferred(call(PeerClient(a), Clock(), "GET", URL))
    protocol, _ = endpoints.last
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n{\"a\":")
    protocol.dataReceived(b"2}")
    assert not d.called
    protocol.connectionLost(Failure(ConnectionResetError()))
    assert answered(d)[:2] == (200, {"a": 2})


@pytest.mark.parametrize("status", [204, 304])
def test_answers_that_have_no_body_end_at_their_head(status: int) -> None:
    a, endpoints, _ = agent()
    d = ensureDeferred(call(PeerClient(a), Clock(), "GET", URL))
    endpoints.last[0].dataReceived(b"HTTP/1.1 %d X\r\n\r\n" % status)
    assert answered(d)[0] == status
    assert len(a.idle[(b"127.0.0.1", 5101)]) == 1


def test_a_peer_that_says_close_is_not_kept() -> None:
    a, endpoints, _ = agent()
    d = ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={}))
    protocol, transport = endpoints.last
    protocol.dataReceived(OK.replace(b"Content-Length", b"Connection: close\r\nContent-Length"))
    assert answered(d)[0] == 200
    assert transport.disconnecting
    assert not a.idle.get((b"127.0.0.1", 5101))


def test_at_most_per_host_connections_are_kept() -> None:
    a, endpoints, _ = agent(per_host=2)
    pending = [ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={})) for _ in range(4)]
    assert len(endpoints.made) == 4
    for protocol, _ in endpoints.made:
        protocol.dataReceived(OK)
    assert all(answered(d)[0] == 200 for d in pending)
    assert len(a.idle[(b"127.0.0.1", 5101)]) == 2
    assert sum(t.disconnecting for _, t in endpoints.made) == 2


def test_a_connection_kept_too_long_is_not_used_again() -> None:
    clock = Clock()
    a, endpoints, _, transport = kept(clock)
    clock.advance(IDLE_SECONDS + 1)
    ensureDeferred(call(PeerClient(a), clock, "POST", URL, body={}))
    assert len(endpoints.made) == 2
    assert transport.disconnected


def test_a_connection_the_peer_closed_while_kept_is_forgotten() -> None:
    a, endpoints, protocol, _ = kept()
    protocol.connectionLost(Failure(ConnectionResetError()))
    assert not a.idle[(b"127.0.0.1", 5101)]
    ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={}))
    assert len(endpoints.made) == 2


def test_bytes_from_a_kept_connection_that_nobody_asked_for_close_it() -> None:
    a, _, protocol, transport = kept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert transport.disconnected
    assert not a.idle[(b"127.0.0.1", 5101)]


def test_bytes_past_the_answer_make_the_connection_unusable() -> None:
    a, endpoints, _ = agent()
    d = ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={}))
    protocol, transport = endpoints.last
    protocol.dataReceived(OK + b"HTTP/1.1 200 OK\r\n")
    assert answered(d)[0] == 200
    assert transport.disconnected and not a.idle.get((b"127.0.0.1", 5101))


def test_a_connection_lost_before_the_answer_is_a_peer_that_did_not_answer() -> None:
    a, endpoints, _ = agent()
    raw = a.request(b"POST", URL.encode(), None, BytesProducer(b"{}"))
    endpoints.last[0].connectionLost(Failure(ConnectionResetError()))
    with pytest.raises(ResponseNeverReceived):
        answered(raw)
    d = ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={}))
    endpoints.last[0].connectionLost(Failure(ConnectionResetError()))
    with pytest.raises(Unreachable):
        answered(d)


def test_a_connection_lost_in_the_middle_of_the_body_fails_it() -> None:
    a, endpoints, _ = agent()
    d = ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={}))
    protocol, _ = endpoints.last
    protocol.dataReceived(OK[:-4])
    protocol.connectionLost(Failure(ConnectionResetError()))
    with pytest.raises(Unreachable):
        answered(d)
    assert not a.idle.get((b"127.0.0.1", 5101))


@pytest.mark.parametrize("head", [b"HTTP/1.0 200 OK", b"garbage", b"HTTP/1.1 2x0 OK", b"HTTP/1.1 200 OK\r\nNo colon",
                                  b"HTTP/1.1 200 OK\r\nContent-Length: -3", b"HTTP/1.1 200 OK\r\nContent-Length: x"])
def test_a_malformed_answer_fails_the_request_and_drops_the_connection(head: bytes) -> None:
    a, endpoints, _ = agent()
    raw = a.request(b"POST", URL.encode(), None, BytesProducer(b"{}"))
    protocol, transport = endpoints.last
    protocol.dataReceived(head + b"\r\n\r\n")
    with pytest.raises(ResponseFailed):
        answered(raw)
    assert transport.disconnected


def test_a_malformed_chunk_fails_the_body() -> None:
    a, endpoints, _ = agent()
    d = ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={}))
    protocol, transport = endpoints.last
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(Unreachable):
        answered(d)
    assert transport.disconnected


def test_an_endless_head_is_refused() -> None:
    a, endpoints, _ = agent()
    raw = a.request(b"GET", URL.encode())
    protocol, transport = endpoints.last
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000)
    with pytest.raises(ResponseFailed):
        answered(raw)
    assert transport.disconnected


def test_a_timeout_aborts_the_exchange_and_its_connection() -> None:
    clock = Clock()
    a, endpoints, _ = agent(clock)
    d = ensureDeferred(call(PeerClient(a), clock, "POST", URL, body={}, timeout=1.0))
    _, transport = endpoints.last
    clock.advance(1.5)
    with pytest.raises(Unreachable):
        answered(d)
    assert transport.disconnected
    raw = a.request(b"GET", URL.encode())
    raw.cancel()
    with pytest.raises(CancelledError):
        answered(raw)


def test_what_is_not_a_plain_peer_exchange_goes_to_the_general_agent() -> None:
    a, endpoints, general = agent()

    class Streamed:
        length = 3

    a.request(b"POST", b"https://127.0.0.1:5101/x", None, BytesProducer(b"{}"))
    a.request(b"POST", URL.encode(), None, Streamed())
    a.request(b"GET", b"http://127.0.0.1/no-port")
    assert [u for _, u in general.requests] == [b"https://127.0.0.1:5101/x", URL.encode(), b"http://127.0.0.1/no-port"]
    assert endpoints.made == []


def test_closing_closes_the_kept_connections_and_takes_no_more() -> None:
    a, endpoints, _, transport = kept()
    general = a.general
    a.closeCachedConnections()
    assert transport.disconnecting
    a.request(b"GET", URL.encode())
    assert len(endpoints.made) == 1 and len(general.requests) == 1


class Pumped:
    """Endpoints whose connections reach a real server over in-memory sockets."""

    def __init__(self, site: QuietSite):
        self.site = site
        self.pumps: list[IOPump] = []

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 (Twisted's name)
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        server = self.site.buildProtocol(None)
        client_transport = FakeTransport(client, isServer=False)
        server_transport = FakeTransport(server, isServer=True)
        server.makeConnection(server_transport)
        client.makeConnection(client_transport)
        self.pumps.append(IOPump(client, server, client_transport, server_transport, debug=False))
        return succeed(client)

    def pump(self) -> None:
        for _ in range(10):
            for pump in self.pumps:
                pump.pump()


class Echo(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 (Twisted's name)
        request.setHeader(b"content-type", b"application/json")
        return b'{"got": ' + request.content.read() + b"}"

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (Twisted's name)
        request.write(b'{"streamed"')  # no length: the server chunks it
        request.write(b": true}")
        request.finish()
        return 1  # NOT_DONE_YET


def test_against_bazars_own_server_answers_by_length_and_chunked_on_one_connection() -> None:
    endpoints = Pumped(QuietSite(Echo()))
    a = PeerAgent(Clock(), endpoints, General())
    client = PeerClient(a)
    for n in range(3):
        d = ensureDeferred(call(client, Clock(), "POST", "http://127.0.0.1:5101/echo", body={"n": n}))
        endpoints.pump()
        assert answered(d)[:2] == (200, {"got": {"n": n}})
        d = ensureDeferred(call(client, Clock(), "GET", "http://127.0.0.1:5101/stream"))
        endpoints.pump()
        assert answered(d)[:2] == (200, {"streamed": True})
    assert len(endpoints.pumps) == 1


def test_treqs_own_helpers_read_its_answers() -> None:
    endpoints = Pumped(QuietSite(Echo()))
    client = PeerClient(PeerAgent(Clock(), endpoints, General()))
    d = client.request("POST", "http://127.0.0.1:5101/echo", data=BytesProducer(b"[1, 2]"))
    endpoints.pump()
    response = answered(d)
    d2 = treq.json_content(response)
    endpoints.pump()
    assert answered(d2) == {"got": [1, 2]}


class SocketLike(StringTransport):
    """A transport with a socket's two extra calls: Nagle off, and a write now."""

    def __init__(self) -> None:
        super().__init__()
        self.nodelay = False
        self.written_now = 0

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 (Twisted's name)
        self.nodelay = enabled

    def doWrite(self) -> None:  # noqa: N802 (Twisted's name)
        self.written_now += 1


def test_a_request_leaves_at_once_with_nagle_off() -> None:
    endpoints = Endpoints(SocketLike)
    a = PeerAgent(Clock(), endpoints, General())
    d = ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={}))
    protocol, transport = endpoints.last
    assert isinstance(transport, SocketLike)
    assert transport.nodelay and transport.written_now == 1
    protocol.dataReceived(OK)
    answered(d)
    ensureDeferred(call(PeerClient(a), Clock(), "POST", URL, body={}))
    assert transport.written_now == 2 and len(endpoints.made) == 1
