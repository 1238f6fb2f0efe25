"""HTTP framing at the edge (bazar.http.server: GuardedChannel, QuietSite), in memory: a
request that two parsers could read two ways is refused, not guessed at."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bazar.codec import dumps
from bazar.errors import Invalid, NotFound, Unavailable
from bazar.http.app import WRITTEN, BareRequest, JsonApp, etag_of
from bazar.http.request import read_object
from bazar.http.server import HEADER_DEADLINE, IDLE_TIMEOUT, QuietSite
from bazar.replication.routes import internal_body


def site(max_connections: int = 100) -> QuietSite:
    api = JsonApp("test")

    @api.route("/echo", "POST", "echo")
    def echo(request: Any) -> dict[str, Any]:
        auth = request.getHeader(b"Authorization")
        return {"got": read_object(request), "auth": auth.decode() if auth else None}

    @api.route("/x", "GET", "x")
    def x(request: Any) -> dict[str, Any]:
        return {"x": True}

    return QuietSite(api.resource(), max_connections=max_connections)


def connect(s: QuietSite) -> tuple[Any, StringTransport]:
    channel = s.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    channel.callLater = Clock().callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def exchange(data: bytes, s: QuietSite | None = None) -> tuple[int, dict[str, str], Any]:
    channel, transport = connect(s or site())
    channel.dataReceived(data)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def post(headers: bytes, body: bytes = b'{"quantity": 1}') -> bytes:
    return (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_a_plain_request_goes_through() -> None:
    status, _, body = exchange(post(b"Authorization: Bearer a\r\n"))
    assert status == 200 and body == {"got": {"quantity": 1}, "auth": "Bearer a"}


@pytest.mark.parametrize("header", [b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
                                    b"X-Bazar-Secret: a\r\nx-bazar-secret: b\r\n",
                                    b"Idempotency-Key: a\r\nIdempotency-Key: a\r\n",
                                    b"Content-Length: 15\r\n",
                                    b"Host: y\r\n"])
def test_headers_that_must_be_single_are_refused_when_repeated(header: bytes) -> None:
    status, headers, body = exchange(post(header))
    assert status == 400 and "more than once" in body["error"]
    assert headers["content-type"] == "application/json"


def test_transfer_encoding_on_two_lines_is_refused_like_on_one() -> None:
    for te in (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
               b"Transfer-Encoding: chunked, identity\r\n"):
        data = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + te + b"\r\n5\r\nhello\r\n0\r\n\r\n"
        status, _, body = exchange(data)
        assert status == 400, (te, body)


def test_obsolete_line_folding_is_refused() -> None:
    status, _, body = exchange(post(b"Authorization: Bearer\r\n a\r\n"))
    assert status == 400 and "folding" in body["error"]


def test_a_chunk_announcing_more_than_the_limit_is_refused_at_once() -> None:
    data = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % (64 * 1024 + 1) + b"a" * 10)  # the rest of the chunk never comes
    status, headers, body = exchange(data)
    assert status == 413 and "larger than" in body["error"]


def test_duplicate_json_keys_are_refused() -> None:
    status, _, body = exchange(post(b"", b'{"quantity": -5, "quantity": 1}'))
    assert status == 400 and "more than once" in body["error"]
    status, _, body = exchange(post(b"", b'{"a": {"b": 1, "b": 2}}'))
    assert status == 400
    status, _, body = exchange(post(b"", b'{"a": "x:y", "b": 2}'))
    assert status == 200 and body["got"] == {"a": "x:y", "b": 2}


def test_double_slashes_are_a_plain_404_not_a_redirect() -> None:
    status, headers, body = exchange(b"GET //x HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert status == 404 and "location" not in headers and "evil" not in json.dumps(body)


def test_connections_beyond_the_cap_get_503_and_are_closed() -> None:
    s = site(max_connections=2)
    first, _ = connect(s)
    second, _ = connect(s)
    third, transport = connect(s)
    assert transport.value().startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in transport.value()
    third.connectionLost(None)
    first.connectionLost(None)
    assert s.open_connections == 1
    status, _, body = exchange(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", s)
    assert status == 200 and body == {"x": True}


# --- the bare way in: a whole plain GET answered from memory before Twisted parses it

BOOKS = {b"1": b'{"id":1,"title":"T"}', b"2": b'{"id":2,"title":"U"}'}


def cached_site() -> tuple[QuietSite, list[bool]]:
    """An app like the front end's: /books/{id} from memory (a bare fast path with an
    ETag), a Klein route behind it for what memory does not hold. `bare` records, for
    each call of the fast path, whether the channel took it bare (a `BareRequest`)."""
    api = JsonApp("test")
    bare: list[bool] = []

    def hit(request: Any, rest: bytes) -> bytes | None:
        bare.append(isinstance(request, BareRequest))
        return BOOKS.get(rest)

    @api.route("/books/<string:ident>", "GET", "book", etag=True)
    def book(request: Any, ident: str) -> Any:
        return {"slow": ident}

    api.fast("GET", "/books/", "book", hit, etag=True, bare=True)
    return QuietSite(api.resource()), bare


def answers(data: bytes, *, whole: bool, s: QuietSite | None = None) -> bytes:
    """What the channel writes back for `data`, given whole or a byte at a time (which
    no bare answer can take: the normal way), without the Date line."""
    channel, transport = connect(s or cached_site()[0])
    if whole:
        channel.dataReceived(data)
    else:
        for i in range(len(data)):
            channel.dataReceived(data[i:i + 1])
    return b"\r\n".join(line for line in transport.value().split(b"\r\n") if not line.startswith(b"Date: "))


PLAIN = b"GET /books/1 HTTP/1.1\r\nHost: h\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"
KEEP_ALIVE = b"GET /books/2 HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive\r\nAccept-Encoding: gzip\r\n\r\n"
# each must be answered exactly as the normal way answers it
UNUSUAL = [
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\nIf-None-Match: \"x\"\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\nIf-None-Match: " + etag_of(BOOKS[b"1"]) + b"\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"GET /books/1 HTTP/1.0\r\nHost: h\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\nno colon here\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\nAccept: a\r\n b\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost: h\r\n\r\nGET /books/2 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET  /books/1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"HEAD /books/1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /books/1 HTTP/1.1\r\nHost : h\r\n\r\n",
]


def test_a_plain_get_from_memory_is_answered_bare_and_byte_for_byte_as_the_normal_way() -> None:
    s, bare = cached_site()
    fast = answers(PLAIN, whole=True, s=s)
    assert bare == [True]  # answered before Twisted made a request
    slow = answers(PLAIN, whole=False, s=s)
    assert bare == [True, False]
    assert fast == slow
    assert fast.startswith(b"HTTP/1.1 200 OK\r\nServer: TwistedWeb/")
    assert b"ETag: " + etag_of(BOOKS[b"1"]) + b"\r\n" in fast and fast.endswith(b"\r\n\r\n" + BOOKS[b"1"])
    query = b"GET /books/2?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"  # the path without its query, as Twisted's
    assert answers(query, whole=True, s=s) == answers(query, whole=False, s=s)
    assert bare == [True, False, True, False]
    assert answers(KEEP_ALIVE, whole=True, s=s) == answers(KEEP_ALIVE, whole=False, s=s)
    assert bare[-2:] == [True, False]  # "Connection: keep-alive" says what HTTP/1.1 means anyway


@pytest.mark.parametrize("data", UNUSUAL)
def test_whatever_is_not_a_plain_get_goes_the_normal_way(data: bytes) -> None:
    s, bare = cached_site()
    assert answers(data, whole=True, s=s) == answers(data, whole=False, s=s)
    assert True not in bare  # not even tried


@pytest.mark.parametrize("path", [b"/books/3", b"/books/%31", b"/books/"])
def test_a_plain_get_that_memory_cannot_answer_goes_the_normal_way(path: bytes) -> None:
    s, bare = cached_site()
    data = b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    assert answers(data, whole=True, s=s) == answers(data, whole=False, s=s)
    assert bare[0] is True and bare[1] is False  # tried bare, then answered the normal way


@given(st.lists(st.sampled_from([b"Host: h", b"host: h", b"User-Agent: x", b"Accept: */*", b"Accept-Encoding: gzip",
                                 b"Connection: keep-alive", b"Connection: close", b"If-None-Match: *",
                                 b"connection: Keep-Alive", b"Connection: keep-alive, close",
                                 b"Cache-Control: no-cache", b"X-Bazar-Min-Seq: 9", b"Content-Length: 0",
                                 b"Expect: 100-continue", b"Accept: a, b"]), max_size=5),
       st.sampled_from([b"/books/1", b"/books/2", b"/books/3", b"/books/", b"/x", b"/books/1/2"]))
@settings(max_examples=150, deadline=None)
def test_any_header_mix_is_answered_as_the_normal_way_answers_it(headers: list[bytes], path: bytes) -> None:
    data = b"GET " + path + b" HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    assert answers(data, whole=True) == answers(data, whole=False)


def test_a_connection_answered_bare_keeps_its_deadlines_right() -> None:
    """The header deadline armed at connect does not fire on a connection whose request
    was answered bare; the idle timeout still closes a silent one; the next request
    (bare or not) is answered."""
    s, bare = cached_site()
    channel, transport = connect(s)
    clock = Clock()
    channel.callLater = clock.callLater
    channel._disarm()
    channel._arm()  # the deadline on this clock, as at connect
    channel.setTimeout(None)
    channel.setTimeout(IDLE_TIMEOUT)
    channel.dataReceived(PLAIN)
    clock.advance(HEADER_DEADLINE + 1)
    assert b"408" not in transport.value() and not transport.disconnecting
    channel.dataReceived(b"GET /books/3 HTTP/1.1\r\nHost: h\r\n\r\n")
    channel.dataReceived(PLAIN)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 3 and bare == [True, True, False, True]
    assert b'{"slow":"3"}' in transport.value()
    clock.advance(IDLE_TIMEOUT + 1)
    assert transport.disconnecting  # silent past the idle timeout: closed


def test_bare_answers_are_counted_like_any_other() -> None:
    s, _ = cached_site()
    channel, transport = connect(s)
    channel.dataReceived(PLAIN)
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert b'bazar_requests_total{route="book",service="test",status="200"} 1.0' in transport.value()


def test_only_a_get_or_a_post_can_be_answered_bare() -> None:
    with pytest.raises(ValueError):
        JsonApp("test").fast("PUT", "/x/", "x", lambda request, rest: None, bare=True)


# --- the bare way in for a replication message: a whole plain POST to a bare RPC

SECRET = "s3cret"


def rpc_site() -> tuple[QuietSite, list[bool]]:
    """An app like a replica's: a bare RPC that wants the cluster secret and a JSON
    object (as /internal/raft does), a plain one beside it. `bare` records, for each
    call of the bare RPC, whether the channel took it bare."""
    api = JsonApp("test")
    bare: list[bool] = []

    @api.rpc("/internal/m", "POST", "m", bare=True)
    def message(request: Any) -> bytes:
        bare.append(isinstance(request, BareRequest))
        body = internal_body(request, SECRET)
        if body.get("boom"):
            raise RuntimeError("a bug")
        if body.get("busy"):
            raise Unavailable("busy")
        return dumps({"echo": body, "hops": (request.getHeader(b"X-Bazar-Hops") or b"").decode()})

    @api.rpc("/internal/plain", "POST", "plain")
    def plain(request: Any) -> dict[str, Any]:
        return {"plain": True}

    return QuietSite(api.resource()), bare


def rpc_post(body: bytes = b'{"n": 1}', headers: bytes = b"X-Bazar-Secret: s3cret\r\n", path: bytes = b"/internal/m",
             length: int | None = None) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:5101\r\nContent-Type: application/json\r\n" + headers
            + b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body)


RPC_ANSWERED_BARE = [
    rpc_post(),
    rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nX-Bazar-Hops: 1\r\nConnection: keep-alive\r\n"),
    rpc_post(headers=b""),  # no secret: 403
    rpc_post(headers=b"X-Bazar-Secret: wrong\r\n"),
    rpc_post(b"not json"),
    rpc_post(b"[1, 2]"),
    rpc_post(b""),
    rpc_post(b'{"busy": true}'),  # 503 with its Retry-After
    rpc_post(b'{"boom": true}'),  # a bug: a JSON 500, no traceback
    rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nAuthorization: Bearer a\r\nIdempotency-Key: k-1\r\n"),
]
RPC_THE_NORMAL_WAY = [
    rpc_post(length=3),  # more body than announced: a second request follows (pipelined)
    rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nX-Bazar-Secret: s3cret\r\n"),
    rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nConnection: close\r\n"),
    rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nExpect: 100-continue\r\n"),
    rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nAuthorization: Bearer a\r\nAuthorization: Bearer a\r\n"),
    rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nCookie: a=b\r\n"),
    rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nContent-Length: 8\r\n"),
    rpc_post(path=b"/internal/plain"),
    rpc_post(path=b"/internal/m?x=1"),
    rpc_post(path=b"/internal/other"),
    (b"POST /internal/m HTTP/1.1\r\nHost: h\r\nX-Bazar-Secret: s3cret\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"8\r\n{\"n\": 1}\r\n0\r\n\r\n"),
    rpc_post().replace(b"HTTP/1.1", b"HTTP/1.0"),
    rpc_post().replace(b"Content-Length: 8", b"Content-Length: +8"),
]


@pytest.mark.parametrize("data", RPC_ANSWERED_BARE)
def test_a_whole_plain_post_to_a_bare_rpc_is_answered_bare_byte_for_byte_as_the_normal_way(data: bytes) -> None:
    s, bare = rpc_site()
    fast = answers(data, whole=True, s=s)
    slow = answers(data, whole=False, s=s)
    assert fast == slow
    if bare:  # (a request refused before its body was read never reaches the handler)
        assert bare == [True, False]
    assert fast.startswith(b"HTTP/1.1 ")
    assert b"Traceback" not in fast


def test_a_bare_rpc_gets_the_body_and_headers() -> None:
    s, bare = rpc_site()
    data = rpc_post(headers=b"X-Bazar-Secret: s3cret\r\nX-Bazar-Hops: 1\r\n")
    fast = answers(data, whole=True, s=s)
    assert bare == [True]
    assert fast.startswith(b"HTTP/1.1 200 OK\r\nServer: TwistedWeb/")
    assert fast.endswith(b'\r\n\r\n{"echo":{"n":1},"hops":"1"}')
    assert answers(rpc_post(b'{"busy": true}'), whole=True, s=s).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert bare == [True, True]


@pytest.mark.parametrize("data", RPC_THE_NORMAL_WAY)
def test_whatever_is_not_a_whole_plain_post_to_a_bare_rpc_goes_the_normal_way(data: bytes) -> None:
    s, bare = rpc_site()
    assert answers(data, whole=True, s=s) == answers(data, whole=False, s=s)
    assert True not in bare


def test_a_connection_answered_bare_takes_the_next_request_either_way() -> None:
    s, bare = rpc_site()
    channel, transport = connect(s)
    channel.dataReceived(rpc_post())
    channel.dataReceived(rpc_post(b'{"n": 2}')[:30])
    channel.dataReceived(rpc_post(b'{"n": 2}')[30:])
    channel.dataReceived(rpc_post(b'{"n": 3}'))
    assert transport.value().count(b"HTTP/1.1 200 OK") == 3 and bare == [True, False, True]
    assert b'{"echo":{"n":2}' in transport.value() and b'{"echo":{"n":3}' in transport.value()


def test_only_a_post_rpc_can_be_answered_bare() -> None:
    with pytest.raises(ValueError):
        JsonApp("test").rpc("/internal/x", "GET", "x", bare=True)


def test_the_replication_message_and_the_forwarded_write_are_bare_rpcs() -> None:
    from bazar.messages import RAFT_PATH, WRITE_PATH
    from bazar.replication.routes import install_routes
    api = JsonApp("catalog")

    class Replica:
        secret = SECRET

    install_routes(api, Replica())  # type: ignore[arg-type]
    assert sorted(api.bare_rpcs) == sorted([RAFT_PATH.encode(), WRITE_PATH.encode()])


def test_answers_leave_with_nagle_off() -> None:
    class SocketLike(StringTransport):
        nodelay = False

        def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 (Twisted's name)
            self.nodelay = enabled

    channel = site().buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    channel.callLater = Clock().callLater
    transport = SocketLike()
    channel.makeConnection(transport)
    assert transport.nodelay


# --- a bare way whose answer comes later (a cache miss, a purchase)

def async_site() -> tuple[QuietSite, list[bool], list[Deferred[Any]]]:
    """An app like the front end's: GET /slow/{id} and POST /buy/{id} as bare fast
    paths whose answers come later (each waits on a Deferred put in `waiting`, fired
    by the test); a Klein route behind each for what the fast path declines. `bare`
    records, for each call of a fast path, whether the channel took it bare."""
    api = JsonApp("test")
    bare: list[bool] = []
    waiting: list[Deferred[Any]] = []

    async def later(value: Any) -> Any:
        d: Deferred[Any] = Deferred()
        waiting.append(d)
        await d
        return value

    @api.route("/slow/<string:ident>", "GET", "slow", etag=True)
    async def slow(request: Any, ident: str) -> Any:
        if ident == "404":
            raise NotFound("no such thing")
        request.setHeader(b"X-Seq", b"7")
        return await later({"slow": ident})

    def slow_now(request: Any, rest: bytes) -> Any:
        bare.append(isinstance(request, BareRequest))
        return slow(request, rest.decode()) if rest.isdigit() else None

    api.fast("GET", "/slow/", "slow", slow_now, etag=True, bare=True)

    @api.route("/buy/<string:ident>", "POST", "buy")
    async def buy(request: Any, ident: str) -> Any:
        body = read_object(request, optional=True) or {}
        quantity = body.get("quantity", 1)
        if not isinstance(quantity, int):
            raise Invalid("quantity must be an integer")
        key = (request.getHeader(b"Idempotency-Key") or b"").decode()
        return await later({"book": ident, "quantity": quantity, "key": key})

    def buy_now(request: Any, rest: bytes) -> Any:
        bare.append(isinstance(request, BareRequest))
        return buy(request, rest.decode()) if rest.isdigit() else None

    api.fast("POST", "/buy/", "buy", buy_now, bare=True)
    return QuietSite(api.resource()), bare, waiting


def answers_later(data: bytes, *, whole: bool) -> tuple[bytes, list[bool], bytes]:
    """What the channel writes for `data` (whole, or a byte at a time: the normal
    way) before the handler's Deferreds fire, and after, without the Date line."""
    s, bare, waiting = async_site()
    channel, transport = connect(s)
    if whole:
        channel.dataReceived(data)
    else:
        for i in range(len(data)):
            channel.dataReceived(data[i:i + 1])
    before = transport.value()
    while waiting:
        waiting.pop(0).callback(None)
    after = b"\r\n".join(line for line in transport.value().split(b"\r\n") if not line.startswith(b"Date: "))
    return before, bare, after


def buy_post(body: bytes = b'{"quantity": 2}', headers: bytes = b"") -> bytes:
    return (b"POST /buy/3 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n" + headers
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


LATER_ANSWERED_BARE = [
    b"GET /slow/1 HTTP/1.1\r\nHost: h\r\nX-Bazar-Min-Seq: 4\r\n\r\n",
    b"GET /slow/404 HTTP/1.1\r\nHost: h\r\n\r\n",  # a 404, at once
    buy_post(),
    buy_post(b""),
    buy_post(b"", b"Idempotency-Key: k-9\r\nAuthorization: Bearer t\r\n"),
    buy_post(b'{"quantity": "2"}'),  # a 400, at once
    buy_post(b"{"),
]


@pytest.mark.parametrize("data", LATER_ANSWERED_BARE)
def test_a_bare_answer_that_comes_later_is_byte_for_byte_the_normal_ways(data: bytes) -> None:
    before, bare, fast = answers_later(data, whole=True)
    _, bare_slow, slow = answers_later(data, whole=False)
    assert bare == [True] and bare_slow == [False]
    assert fast == slow and fast.startswith(b"HTTP/1.1 ") and b"Traceback" not in fast
    if b"404" not in data and b'"2"' not in data and data[-1:] != b"{":
        assert before == b""  # nothing written before the answer is there
        assert fast.startswith(b"HTTP/1.1 200 OK\r\n")


def test_requests_behind_a_bare_answer_still_to_come_wait_for_it_and_keep_their_order() -> None:
    s, bare, waiting = async_site()
    channel, transport = connect(s)
    channel.dataReceived(b"GET /slow/1 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert bare == [True] and len(waiting) == 1
    # the next requests arrive while the first answer is still to come
    channel.dataReceived(buy_post() + b"GET /slow/2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert transport.value() == b"" and len(waiting) == 1  # held, not read yet
    waiting.pop(0).callback(None)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1 and b'{"slow":"1"}' in transport.value()
    assert len(waiting) == 1  # then the purchase was read (the normal way: it came pipelined)
    waiting.pop(0).callback(None)
    waiting.pop(0).callback(None)
    out = transport.value()
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b'{"slow":"1"}') < out.index(b'"book":"3"') < out.index(b'{"slow":"2"}')
    channel.dataReceived(b"GET /slow/5 HTTP/1.1\r\nHost: h\r\n\r\n")  # idle again: bare again
    assert bare[-1] is True and len(waiting) == 1


def test_a_client_gone_before_its_bare_answer_gets_nothing_and_the_handler_runs_to_its_end() -> None:
    s, bare, waiting = async_site()
    channel, transport = connect(s)
    channel.dataReceived(buy_post())
    assert bare == [True] and len(waiting) == 1
    channel.connectionLost(None)
    waiting[0].callback(None)  # not cancelled: the purchase ends; its answer goes nowhere
    assert transport.value() == b""


def test_no_idle_timeout_runs_while_a_bare_answer_is_to_come() -> None:
    s, bare, waiting = async_site()
    channel, transport = connect(s)
    clock = Clock()
    channel.callLater = clock.callLater
    channel.setTimeout(None)
    channel.setTimeout(IDLE_TIMEOUT)
    channel.dataReceived(b"GET /slow/1 HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(IDLE_TIMEOUT + 1)
    assert not transport.disconnecting
    waiting.pop(0).callback(None)
    assert b'{"slow":"1"}' in transport.value()
    clock.advance(IDLE_TIMEOUT + 1)
    assert transport.disconnecting  # idle again after the answer: the timeout is back


def test_a_body_over_the_limit_is_never_taken_bare() -> None:
    s, bare, _ = async_site()
    channel, transport = connect(s)
    body = b'{"quantity": 1, "pad": "' + b"x" * (70 * 1024) + b'"}'
    channel.dataReceived(buy_post(body))
    assert bare == [] and transport.value().startswith(b"HTTP/1.1 413 ")


def parts_site() -> tuple[QuietSite, list[bool], list[Deferred[Any]], list[str]]:
    """An app like a replica's early write: a bare RPC that answers in two parts, the
    second once a Deferred in `waiting` fires; `ends` records how each answer ended
    for the handler (its notifyFinish: "whole" or "gone")."""
    api = JsonApp("test")
    bare: list[bool] = []
    waiting: list[Deferred[Any]] = []
    ends: list[str] = []

    @api.rpc("/internal/parts", "POST", "parts", bare=True)
    async def parts(request: Any) -> Any:
        bare.append(isinstance(request, BareRequest))
        body = internal_body(request, SECRET)
        if body.get("plain"):
            return {"one": "piece"}
        request.notifyFinish().addCallbacks(lambda _: ends.append("whole"), lambda _: ends.append("gone"))
        request.setHeader(b"X-Parts", b"2")
        request.setHeader(b"Content-Type", b"application/json")
        request.write(b'{"first":1}\n')
        d: Deferred[Any] = Deferred()
        waiting.append(d)
        await d
        request.write(b'{"second":2}\n')
        return WRITTEN

    return QuietSite(api.resource()), bare, waiting, ends


@pytest.mark.parametrize("body", [b'{"n": 1}', b'{"plain": true}'])
def test_a_bare_answer_in_parts_is_byte_for_byte_the_normal_ways_and_each_part_leaves_at_once(body: bytes) -> None:
    outputs = []
    for whole in (True, False):
        s, bare, waiting, ends = parts_site()
        channel, transport = connect(s)
        data = rpc_post(body, path=b"/internal/parts")
        if whole:
            channel.dataReceived(data)
        else:
            for i in range(len(data)):
                channel.dataReceived(data[i:i + 1])
        if waiting:
            if whole:  # the first part is on its way before the second is known
                assert transport.value().endswith(b'{"first":1}\n\r\n') and b"0\r\n\r\n" not in transport.value()
            waiting.pop().callback(None)
            assert ends == ["whole"]
        assert bare == [whole]
        lines = transport.value().split(b"\r\n")
        outputs.append(b"\r\n".join(line for line in lines if not line.startswith(b"Date: ")))
    assert outputs[0] == outputs[1]
    if body == b'{"n": 1}':
        assert b"Transfer-Encoding: chunked\r\n" in outputs[0] and outputs[0].endswith(b"\r\n0\r\n\r\n")


def test_a_client_gone_in_the_middle_of_a_bare_answer_in_parts_is_noticed() -> None:
    s, bare, waiting, ends = parts_site()
    channel, transport = connect(s)
    channel.dataReceived(rpc_post(path=b"/internal/parts"))
    assert bare == [True] and ends == []
    channel.connectionLost(None)
    assert ends == ["gone"]
    written = transport.value()
    waiting.pop().callback(None)  # the handler ends; nothing more is written
    assert transport.value() == written


def test_a_request_pipelined_behind_a_slow_bare_answer_gets_no_header_deadline() -> None:
    """What arrives while a bare answer is to come waits, as behind a request in hand:
    the header deadline starts only once it is read (after the answer), so a slow
    answer does not turn into a 408 for the request behind it."""
    s, bare, waiting = async_site()
    channel, transport = connect(s)
    clock = Clock()
    channel.callLater = clock.callLater
    channel._disarm()
    channel.dataReceived(b"GET /slow/1 HTTP/1.1\r\nHost: h\r\n\r\n")
    channel.dataReceived(b"GET /slow/2 HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(HEADER_DEADLINE + 1)
    assert transport.value() == b"" and not transport.disconnecting
    waiting.pop(0).callback(None)
    waiting.pop(0).callback(None)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2 and b"408" not in transport.value()


def test_a_bare_answer_that_fails_gets_a_json_500_and_the_connection_closes() -> None:
    """`Answer` turns a handler's failure into its answer, so only a bug gets here:
    the client still reads JSON, never a hang or a traceback."""
    s, _, _ = async_site()
    channel, transport = connect(s)
    channel._await_bare(fail(RuntimeError("a bug")))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and json.loads(body) == {"error": "internal error"}
    assert transport.disconnecting
