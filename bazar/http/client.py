"""Outgoing HTTP: one treq client over one persistent pool per process, a call helper
whose timeout covers the whole exchange (treq's own `timeout=` stops at the response
headers), and a peer's error answer turned back into Bazar's error.

Two private names of treq and Twisted are used, here only: treq's `_Response` (the
response wrapper its public `request` builds, made by hand on the short way below)
and Twisted's `_HTTP11ClientFactory` (to make its factories quiet)."""

from __future__ import annotations

from typing import Any

import orjson
import treq
from treq.client import HTTPClient
from treq.response import _Response
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from bazar.codec import dumps
from bazar.errors import BazarError, Conflict, Forbidden, Invalid, NotFound, TooLarge, Unauthorized, Unavailable
from bazar.http.peer import BytesProducer, PeerAgent
from bazar.http.request import SECRET_HEADER
from bazar.messages import EARLY_HEADER
from bazar.trace import trace

# What a peer that did not answer looks like: refused, reset, closed, timed out.
TRANSPORT_FAILURES = (ConnectError, ConnectionClosed, DNSLookupError, ResponseFailed, ResponseNeverReceived,
                      RequestTransmissionFailed, ResponseDone, PotentialDataLoss, TimeoutError, CancelledError,
                      OSError)

@implementer(IAgentEndpointFactory)
class PeerEndpoints:
    """One endpoint per peer, made once: Agent's default factory builds a new
    HostnameEndpoint (and IDNA-encodes "127.0.0.1") for every request."""

    def __init__(self, reactor: Any, connect_timeout: float):
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self.endpoints.get(key)
        if endpoint is None:
            if uri.scheme != b"http":
                raise ValueError("Bazar's peers speak plain HTTP")
            endpoint = self.endpoints[key] = HostnameEndpoint(
                self.reactor, uri.host.decode("ascii"), uri.port, timeout=self.connect_timeout)
        return endpoint


class PeerClient(HTTPClient):
    """treq's client, with a short way for Bazar's own calls. Peers never redirect,
    set no cookies and send no gzip, and the URLs are plain ASCII: such a request
    goes straight to the pooled Agent, skipping treq's per-request cookie, redirect
    and content-decoding agents and hyperlink's URL re-encoding. The response is
    still treq's, so `treq.content` and the rest work as usual."""

    def request(self, method: str, url: Any, **kw: Any) -> Any:
        headers, data = kw.pop("headers", None), kw.pop("data", None)
        if kw or not isinstance(url, str) or not url.isascii() or not isinstance(headers, (dict, type(None))):
            return super().request(method, url, headers=headers, data=data, **kw)
        agent: Any = self._agent
        d = agent.request(method.encode("ascii"), url.encode("ascii"), headers=Headers(headers or {}),
                          bodyProducer=data)
        return d.addCallback(_Response, self._cookiejar)


class QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" / "Stopping factory" log line for every connection (they
    drowned the logs and made a stop that logs from a signal handler likelier to hang)."""

    noisy = False


def quiet_pool(reactor: Any, persistent: bool = True) -> HTTPConnectionPool:
    """A connection pool whose connections log nothing when they open and close."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool._factory = QuietClientFactory  # (Twisted has no public way to choose it)
    return pool


def make_http(reactor: Any, per_host: int = 64) -> tuple[HTTPClient, PeerAgent]:
    """The process's one HTTP client: `PeerAgent` for Bazar's own exchanges, over a
    quiet pooled `Agent` for anything else; the second value closes its connections."""
    pool = quiet_pool(reactor)
    pool.maxPersistentPerHost = per_host
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False  # a write must never be re-sent behind our back
    endpoints = PeerEndpoints(reactor, 2)
    general = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    agent = PeerAgent(reactor, endpoints, general, per_host=per_host)
    return PeerClient(agent), agent


class Unreachable(Exception):
    """The peer did not answer (refused, reset, timed out)."""


def _request(body: Any, raw: bytes | None, headers: dict[bytes, bytes] | None,
             secret: str | None) -> tuple[dict[Any, Any], Any]:
    """The headers and body producer of one of Bazar's own requests."""
    hdrs: dict[Any, Any] = {}
    for key, value in (headers or {}).items():
        hdrs[key] = [value]
    data = raw
    if body is not None:
        data = dumps(body)
    if data is not None:
        hdrs[b"Content-Type"] = [b"application/json"]
    if secret is not None:
        hdrs[SECRET_HEADER] = [secret.encode()]
    return hdrs, BytesProducer(data) if data is not None else None


def _parsed(content: bytes) -> Any:
    if not content:
        return None
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


async def call(http: HTTPClient, clock: IReactorTime, method: str, url: str, *,
               body: Any = None, raw: bytes | None = None, headers: dict[bytes, bytes] | None = None,
               secret: str | None = None, timeout: float = 2.0, parse: bool = True) -> tuple[int, Any, Any]:
    """One HTTP exchange: (status, parsed JSON or None — or the raw bytes when not
    `parse` — and the response headers).

    Raises Unreachable when no complete answer arrived within `timeout`."""
    hdrs, producer = _request(body, raw, headers, secret)

    async def exchange() -> tuple[int, bytes, Any]:
        response = await http.request(method, url, data=producer, headers=hdrs)
        content = await treq.content(response)
        return response.code, content, response.headers

    trace("call.send", None, method=method, url=url)
    d = ensureDeferred(exchange())
    d.addTimeout(timeout, clock)
    try:
        code, content, response_headers = await d
    except TRANSPORT_FAILURES as exc:
        raise Unreachable(f"{method} {url}: {exc.__class__.__name__}") from None
    trace("call.answer", None, url=url, status=code)
    if not parse:
        return code, content, response_headers
    return code, _parsed(content), response_headers


class _Parts(Protocol):
    """The body of a two-part answer (EARLY_HEADER), read as it comes: each part one
    JSON line, handed to `first` and `second` as it arrives. A body that ends (or
    breaks) before both fails the part still awaited with Unreachable."""

    def __init__(self, url: str):
        self.url = url
        self.first: Deferred[Any] = Deferred()
        self.second: Deferred[Any] = Deferred()
        self.buffer = b""
        self.parts = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.buffer += data
        while b"\n" in self.buffer and self.parts < 2:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.parts += 1
            part = self.first if self.parts == 1 else self.second
            if not part.called:
                part.callback(_parsed(line))

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted's name)
        for part in (self.first, self.second):
            if not part.called:
                part.errback(Unreachable(f"POST {self.url}: the answer ended after {self.parts} of 2 parts"))

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


async def call_early(http: HTTPClient, clock: IReactorTime, url: str, *, body: Any, secret: str | None,
                     timeout: float = 2.0) -> tuple[int, Any, Deferred[Any] | None]:
    """POST `body` to `url`, whose answer may come in two parts (EARLY_HEADER): then
    (200, the first part parsed, a Deferred of the second part parsed), the first
    within `timeout` and the second within `timeout` after it (else the Deferred
    fails with Unreachable and the answer is abandoned); an answer in one piece is
    (status, parsed, None), as from `call`.

    Raises Unreachable when neither came within `timeout`."""
    hdrs, producer = _request(body, None, None, secret)

    async def exchange() -> tuple[int, Any, _Parts | None]:
        response = await http.request("POST", url, data=producer, headers=hdrs)
        if response.code != 200 or not response.headers.hasHeader(EARLY_HEADER):
            return response.code, _parsed(await treq.content(response)), None
        parts = _Parts(url)
        response.deliverBody(parts)
        return 200, await parts.first, parts

    trace("call.send", None, method="POST", url=url)
    d = ensureDeferred(exchange())
    d.addTimeout(timeout, clock)
    try:
        code, parsed, parts = await d
    except (*TRANSPORT_FAILURES, Unreachable) as exc:
        raise Unreachable(f"POST {url}: {exc.__class__.__name__}") from None
    trace("call.answer", None, url=url, status=code)
    if parts is None:
        return code, parsed, None
    second = parts.second

    def late(failure: Any) -> Any:
        if failure.check(TimeoutError, CancelledError):
            parts.abort()
            raise Unreachable(f"POST {url}: no second part within {timeout} s")
        return failure

    second.addTimeout(timeout, clock)
    return code, parsed, second.addErrback(late)


# A peer's error answer as Bazar's own error (the inverse of bazar.http.app.STATUS).
ERRORS: dict[int, type[BazarError]] = {400: Invalid, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                       409: Conflict, 413: TooLarge, 503: Unavailable}


def error_of(status: int, parsed: Any) -> BazarError:
    """Turn a peer's JSON error into the same error for our own client: a 4xx stays
    the client's fault, anything else means the peer could not do it now."""
    message = parsed.get("error") if isinstance(parsed, dict) else None
    text = message if isinstance(message, str) and message else f"a replica answered {status}"
    kind = ERRORS.get(status) or (Invalid if 400 <= status < 500 else Unavailable)
    return kind(text)


def passthrough(status: int, body: bytes) -> tuple[int, bytes]:
    """A replica's answer as ours: a JSON body unchanged, an error as the same error."""
    if status >= 400:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        raise error_of(status, parsed)
    return status, body
