"""HTTP framing at the edge (bazar.http.server: GuardedChannel, QuietSite), in memory: a
request that two parsers could read two ways is refused, not guessed at."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bazar.http.app import JsonApp
from bazar.http.request import read_object
from bazar.http.server import QuietSite


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
