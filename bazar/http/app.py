"""The small web layer the three Klein apps share.

A `JsonApp` is a Klein app whose handlers return JSON-able data (or bytes, or `Raw`)
and raise `bazar.errors` exceptions; this module is where those become statuses and
JSON bodies, so Werkzeug's HTML pages and tracebacks never reach a client. Every
route is counted (requests by status, latency) in the app's own Prometheus registry.

Three ways in, tried in this order by `JsonResource.render`:

- internal RPCs (`rpc`): exact paths, answered without Klein's routing, and with no
  Klein route behind them (replication messages, forwarded writes, purchases);
- fast paths (`fast`): try first, else fall through to the route of the same name.
  For answers from memory (cache hits), where routing costs more than the work, and
  for the routes on the hot path (a cache miss, a purchase), taken straight to them;
- Klein's routes (`route`), for everything public.

A `bare` RPC or fast path may be answered by the channel before Twisted builds a
request at all (`JsonResource.bare_response`): a whole plain request alone on an idle
keep-alive connection, its handler given a `BareRequest` (the headers and body the
channel parsed). The answer is the normal way's, byte for byte but the Date, written
at once or, for an async handler, when it comes (the connection waits for it as for a
request in hand: `bazar.http.server.GuardedChannel`).

Beyond bodies and statuses, the headers DESIGN.md promises are set here, once for
every route: `Retry-After` on every 503, `Allow` on every 405, `Location` on every 201
(a handler returns `Created`), and, on the routes that ask for it, an `ETag` of the
body with `If-None-Match` answered 304. Every app's registry also holds the process,
platform and garbage-collector collectors and `bazar_build_info`.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, Union, cast

from klein import Klein
from klein.resource import KleinResource
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString, parse_qs
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.server import version as SERVER_VERSION
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from bazar import __version__
from bazar.codec import dumps
from bazar.errors import (
    BazarError,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from bazar.http.request import body_limit
from bazar.trace import enabled as trace_enabled
from bazar.trace import trace

log = Logger()

JSON = b"application/json"

# The one place where Bazar's errors become HTTP statuses (and back: bazar.http.client).
STATUS: dict[type[BazarError], int] = {
    Invalid: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, Conflict: 409, TooLarge: 413, Unavailable: 503,
}


def status_of(error: BazarError) -> int:
    for cls in type(error).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 400


class Raw:
    """A non-JSON response body (Prometheus text, HTML)."""

    __slots__ = ("body", "content_type")

    def __init__(self, body: bytes, content_type: bytes):
        self.body = body
        self.content_type = content_type


class Created:
    """A 201 answer: what was made (`body`, as a handler would return it) and where it
    can be read from now on (`location`, a path: the `Location` header)."""

    __slots__ = ("body", "location")

    def __init__(self, location: str, body: Any):
        self.location = location
        self.body = body


class Written:
    """What a handler returns once it has written its answer's body itself (a body in
    parts, `request.write` by `request.write`, with its status and headers set before
    the first): the response is only finished."""


WRITTEN = Written()

# What a handler may return: data to encode as JSON, JSON already encoded, a Raw body,
# a Created, or data, JSON or a Raw with a status: (409, data).
Result = Union[Any, bytes, Raw, Created, tuple[int, Any]]
Handler = Callable[..., Union[Result, Awaitable[Result], Deferred[Result]]]
FastHandler = Callable[[IRequest, bytes], Union[Result, None]]


# A GET that a bare fast path may answer before Twisted parses it: one whole request,
# HTTP/1.1, a target of visible ASCII, and well-formed header lines, of which only the names below (see `BARE_HEADERS`).
BARE_REQUEST = re.compile(rb"GET (/[!-~]{1,256}) HTTP/1\.1\r\n"
                          rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}:[\t -~]{0,1024}\r\n){0,32})\r\n\Z")
# Request headers a bare way may take: those that change nothing in the answer, and
# those only the handler reads (Bazar's own: the cluster secret, the oldest state a
# reader takes, the hop count; a bearer token). Any other (If-None-Match, Connection:
# close, a body's framing, Expect...) sends the request the normal way, which knows
# what each means; so does any header given twice.
BARE_HEADERS = frozenset({b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language",
                          b"x-bazar-secret", b"x-bazar-min-seq", b"authorization"})
# A POST that a bare way may answer: the same, and a body of exactly its Content-Length
# right after the head, in the same piece. Of the headers, also the body's type and
# length, the hop count and the Idempotency-Key.
BARE_POST = re.compile(rb"POST (/[!-~]{1,256}) HTTP/1\.1\r\n"
                       rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}:[\t -~]{0,1024}\r\n){0,32})\r\n")
BARE_POST_HEADERS = BARE_HEADERS | {b"content-type", b"content-length", b"x-bazar-hops", b"idempotency-key"}


def _given(value: Any) -> Callable[[], Any]:
    return lambda: value


def error_body(message: str) -> bytes:
    return dumps({"error": message})


def respond(request: IRequest, body: bytes, status: int = 200, content_type: bytes = JSON) -> bytes:
    request.setResponseCode(status)
    if status == 503 and not request.responseHeaders.hasHeader(b"Retry-After"):
        # every 503 says when to try again (DESIGN.md), whichever way it came about
        request.setHeader(b"Retry-After", b"1")
    request.setHeader(b"Content-Type", content_type)
    # a known length spares both sides chunked transfer encoding
    request.setHeader(b"Content-Length", b"%d" % len(body))
    trace("http.answer", None, path=request.path, status=status)
    return body


def etag_of(body: bytes) -> bytes:
    """A strong validator of a body: the same bytes give the same tag in every process
    (two front ends agree). BLAKE2b cut to 64 bits costs well under a microsecond for
    a book, and two versions of one resource do not collide in practice."""
    return b'"' + hashlib.blake2b(body, digest_size=8).hexdigest().encode("ascii") + b'"'


def none_match(header: bytes, tag: bytes) -> bool:
    """Does an If-None-Match value name `tag`, or `*`? The weak comparison of RFC 9110
    §13.1.2 (a `W/` prefix is ignored), over a comma-separated list."""
    for candidate in header.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == tag:
            return True
    return False


def without_body(request: IRequest, body: bytes) -> bytes | int:
    """What a resource's render returns for `body`: the bytes, except after a 304,
    which is finished here, bodiless (returned bytes would get a `Content-Length: 0`
    from Twisted, which a 304 must not carry: RFC 9110 §8.6)."""
    if cast(Request, request).code == 304:
        request.finish()
        return NOT_DONE_YET
    return body


def _plain_headers(block: bytes, allowed: frozenset[bytes]) -> dict[bytes, bytes] | None:
    """The header lines of a request a bare way may answer (matched by BARE_REQUEST or
    BARE_POST), by lower-case name; None when one is outside `allowed` or comes twice
    (the normal way decides what those mean). `Connection: keep-alive` is allowed and
    left out: it says what HTTP/1.1 does anyway (many clients say it)."""
    headers: dict[bytes, bytes] = {}
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if name not in allowed:
            if name == b"connection" and value.lower() == b"keep-alive":
                continue
            return None
        if name in headers:
            return None
        headers[name] = value
    return headers


_date: list[Any] = [0, b""]


def http_date() -> bytes:
    """The Date header's value, made once a second (as Twisted's own is, per request)."""
    second = int(time.time())
    if _date[0] != second:
        _date[:] = [second, datetimeToString(second)]
    return cast(bytes, _date[1])


class BareSink(Protocol):
    """What a channel lends a bare request whose body goes in parts (`BareRequest.write`)."""

    def write_now(self, data: bytes) -> None: ...

    def when_lost(self, notify: Callable[[], object]) -> None: ...


class BareRequest:
    """What a bare handler (and `Answer`, `respond`) use of a request, for one the
    channel parsed itself (`JsonResource.bare_response`): method, path, headers (by
    lower-case name, each once), body; the status and headers of the answer."""

    __slots__ = ("method", "path", "uri", "_headers", "content", "code", "responseHeaders", "touched", "sink",
                 "_parts", "_finished")
    clientproto = b"HTTP/1.1"

    def __init__(self, path: bytes, headers: dict[bytes, bytes], body: bytes, method: bytes = b"POST",
                 uri: bytes | None = None, sink: BareSink | None = None):
        self.method = method
        self.path = path
        self.uri = uri if uri is not None else path
        self._headers = headers
        self.content = io.BytesIO(body)
        self.code = 200
        self.responseHeaders = Headers()
        self.touched = False  # has the handler set a header?
        self.sink = sink  # where a body in parts goes as it comes (`write`)
        self._parts = False  # has a part of the body been written?
        self._finished: list[Deferred[None]] = []

    @property
    def requestHeaders(self) -> Headers:  # noqa: N802 (IRequest's name)
        return Headers({name: [value] for name, value in self._headers.items()})

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        """The query's arguments, as Twisted's request parses them."""
        _, mark, query = self.uri.partition(b"?")
        return parse_qs(query, 1) if mark else {}

    def getHeader(self, name: bytes) -> bytes | None:  # noqa: N802 (IRequest's name)
        return self._headers.get(name.lower())

    def setResponseCode(self, code: int) -> None:  # noqa: N802 (IRequest's name)
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802 (IRequest's name)
        self.touched = True
        self.responseHeaders.setRawHeaders(name, [value])

    def response(self, server: bytes, date: bytes, body: bytes) -> bytes:
        """The whole HTTP response: status line, Server, Date, the headers set, the
        body; or, after a body written in parts, the rest of it and its end."""
        finished, self._finished = self._finished, []
        for d in finished:
            if not d.called:
                d.callback(None)
        if self._parts:
            return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        return self._head(server, date) + body

    def _head(self, server: bytes, date: bytes) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n"
                 % (self.code, RESPONSES.get(self.code, b"Unknown"), server, date)]
        for name, values in self.responseHeaders.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def write(self, data: bytes) -> None:
        """A part of the body, sent now, chunked (as Twisted's `Request.write` sends a
        body of no announced length); the handler then returns WRITTEN."""
        if self.sink is None:
            raise RuntimeError("this bare request has nowhere to write its parts")
        head = b""
        if not self._parts:
            self._parts = True
            self.responseHeaders.setRawHeaders(b"Transfer-Encoding", [b"chunked"])
            head = self._head(SERVER_VERSION, http_date())
        self.sink.write_now(head + (b"%x\r\n%s\r\n" % (len(data), data) if data else b""))

    def notifyFinish(self) -> Deferred[None]:  # noqa: N802 (Request's name)
        """Fires once the answer is whole; fails if the client went before."""
        d: Deferred[None] = Deferred()
        self._finished.append(d)
        if self.sink is not None:
            self.sink.when_lost(lambda: None if d.called else d.errback(ConnectionLost()))
        return d


class TextConverter(PathConverter):
    """`<text:name>`: any text, slashes included, like `<path:name>`, but also across
    line breaks (werkzeug's `.` stops at a newline: /bazar/search/a%0Ab matched no route)."""

    regex = "[^/][\\s\\S]*?"


class Answer:
    """Turns a handler's result or failure into the JSON response, and counts it
    (per-status counter and latency histogram of one route). With `etag`, a 200 carries
    the ETag of its body, and a request whose If-None-Match names it gets a bodiless
    304 instead."""

    def __init__(self, api: JsonApp, name: str, etag: bool = False):
        self.api = api
        self.name = name
        self.etag = etag
        self.counters: dict[int, Any] = {}
        self.histogram = api.latency.labels(api.service, name)

    def count(self, status: int, started: float) -> None:
        counter = self.counters.get(status)
        if counter is None:
            counter = self.counters[status] = self.api.requests.labels(self.api.service, self.name, str(status))
        counter.inc()
        self.histogram.observe(time.perf_counter() - started)

    def finish(self, request: IRequest, result: Result, started: float) -> bytes:
        if result is WRITTEN:
            self.count(request.code, started)  # type: ignore[attr-defined]
            return b""
        status = 200
        if isinstance(result, tuple):
            status, result = result
        elif isinstance(result, Created):
            request.setHeader(b"Location", result.location.encode("ascii"))
            status, result = 201, result.body
        if isinstance(result, Raw):
            body, content_type = result.body, result.content_type
        else:
            body, content_type = result if isinstance(result, bytes) else dumps(result), JSON
        if self.etag and status == 200:
            tag = etag_of(body)
            request.setHeader(b"ETag", tag)
            wanted = request.requestHeaders.getRawHeaders(b"if-none-match")
            if wanted is not None and none_match(b",".join(wanted), tag):
                self.count(304, started)
                request.setResponseCode(304)
                return b""
        self.count(status, started)
        return respond(request, body, status, content_type)

    def fail(self, request: IRequest, failure: Failure, started: float) -> bytes:
        error = failure.value
        if isinstance(error, BazarError):
            status = status_of(error)
            if error.retry_after is not None:
                request.setHeader(b"Retry-After", b"%d" % max(1, round(error.retry_after)))
            if isinstance(error, Unauthorized):
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="bazar"')
            body = error_body(error.message)
        else:
            log.failure("unhandled error in {service} {route}", failure, service=self.api.service, route=self.name)
            status, body = 500, error_body("internal error")
        self.count(status, started)
        return respond(request, body, status)

    def run(self, request: IRequest, handler: Callable[[], Any]) -> bytes | Deferred[bytes]:
        """Call `handler`; its answer as bytes, or a Deferred of them when it is async."""
        started = time.perf_counter()
        try:
            result = handler()
        except Exception:
            return self.fail(request, Failure(), started)
        if isinstance(result, (Deferred, Awaitable)):
            d = result if isinstance(result, Deferred) else ensureDeferred(result)  # type: ignore[arg-type]
            return d.addCallbacks(lambda r: self.finish(request, r, started),
                                  lambda f: self.fail(request, f, started))
        return self.finish(request, result, started)

    def deliver(self, request: IRequest, handler: Callable[[], Any]) -> bytes | int:
        """`run` for a resource's render: bytes now, or NOT_DONE_YET and the bytes
        written when they come (unless the client has gone)."""
        answer = self.run(request, handler)
        if not isinstance(answer, Deferred):
            return without_body(request, answer)
        gone: list[bool] = []
        cast(Request, request).notifyFinish().addErrback(lambda _: gone.append(True))

        def send(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        answer.addCallback(send)
        return NOT_DONE_YET


class JsonApp:
    """A Klein app whose handlers return JSON-able values (or raw bytes) and raise
    `bazar.errors` exceptions; see the module's docstring for its three ways in."""

    def __init__(self, service: str):
        self.service = service
        self.app = Klein()
        self.app.url_map.converters["text"] = TextConverter
        self.registry = CollectorRegistry()
        self.requests = Counter("bazar_requests", "HTTP requests by route and status",
                                ["service", "route", "status"], registry=self.registry)
        self.latency = Histogram("bazar_request_seconds", "HTTP request latency by route",
                                 ["service", "route"], registry=self.registry,
                                 buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05,
                                          .1, .25, .5, 1, 2.5, 5, 10))
        # what every process exposes besides its own figures (each app its own
        # collectors: several apps can share a test process, and none may see another's)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Info("bazar_build", "the Bazar release this process runs", registry=self.registry).info(
            {"version": __version__})
        self.rpcs: dict[bytes, dict[bytes, tuple[Answer, Handler]]] = {}
        self.fast_paths: list[tuple[bytes, bytes, Answer, FastHandler]] = []
        self.bare_paths: dict[bytes, list[tuple[bytes, Answer, FastHandler]]] = {}
        self.bare_rpcs: dict[bytes, tuple[Answer, Handler]] = {}
        self._install_error_pages()
        self.route("/metrics", "GET", "metrics")(self._metrics)

    def _install_error_pages(self) -> None:
        @self.app.handle_errors(HTTPException)
        def werkzeug_error(request: IRequest, failure: Failure) -> bytes:
            exc = failure.value
            code = getattr(exc, "code", None) or 400
            messages = {404: "no such resource", 405: "method not allowed on this resource"}
            message = messages.get(code, getattr(exc, "description", None) or "bad request")
            allowed = getattr(exc, "valid_methods", None)
            if code == 405 and allowed:
                # the methods of every route this path matches (werkzeug's MethodNotAllowed)
                request.setHeader(b"Allow", ", ".join(sorted(allowed)).encode("ascii"))
            self.requests.labels(self.service, "unmatched", str(code)).inc()
            return respond(request, error_body(message), code)

        @self.app.handle_errors(Exception)
        def any_error(request: IRequest, failure: Failure) -> bytes:
            log.failure("unhandled error in {service}", failure, service=self.service)
            return respond(request, error_body("internal error"), 500)

    def route(self, path: str, method: str, name: str, *, etag: bool = False) -> Callable[[Handler], Handler]:
        """Register `handler(request, **path_values)` as a Klein route; it may be async
        and returns JSON-able data, bytes (JSON already), a `Raw`, a `Created`, or
        (status, one of the first three). With `etag`, its 200s carry an ETag and
        answer If-None-Match (for reads whose body is the whole representation)."""

        def register(handler: Handler) -> Handler:
            answer = Answer(self, name, etag)

            def endpoint(request: IRequest, **kw: Any) -> Any:
                return answer.run(request, lambda: handler(request, **kw))

            endpoint.__name__ = f"{self.service}_{name}"
            self.app.route(path, methods=[method], branch=False, endpoint=f"{name}_{method}")(endpoint)
            return handler

        return register

    def rpc(self, path: str, method: str, name: str, *, bare: bool = False) -> Callable[[Handler], Handler]:
        """Register `handler(request)` for exactly `path` (no Klein route behind it).
        A `bare` one (a POST's) may be called by the channel with a `BareRequest`
        (`JsonResource.bare_response`)."""
        if bare and method != "POST":
            raise ValueError("only a POST's RPC can be answered bare")

        def register(handler: Handler) -> Handler:
            answer = Answer(self, name)
            self.rpcs.setdefault(path.encode(), {})[method.encode()] = (answer, handler)
            if bare:
                self.bare_rpcs[path.encode()] = (answer, handler)
            return handler

        return register

    def fast(self, method: str, prefix: str, name: str, handler: FastHandler, *, etag: bool = False,
             bare: bool = False) -> None:
        """Try `handler(request, rest_of_path)` before Klein's routing; it answers at
        once (from memory, or with an awaitable of its answer: a route whose own work
        dwarfs the routing, taken straight to it), or returns None, having done
        nothing, to let the route registered as `name` answer (`etag` as for that
        route). A `bare` one (a GET's or a POST's) may be called by the channel with
        a `BareRequest` (`JsonResource.bare_response`)."""
        answer = Answer(self, name, etag)
        self.fast_paths.append((method.encode(), prefix.encode(), answer, handler))
        if bare:
            if method not in ("GET", "POST"):
                raise ValueError("only a GET or a POST can be answered bare")
            self.bare_paths.setdefault(method.encode(), []).append((prefix.encode(), answer, handler))

    def _metrics(self, request: IRequest) -> Raw:
        return Raw(generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())

    def resource(self) -> JsonResource:
        return JsonResource(self)


class JsonResource(KleinResource):
    """Klein's resource behind the exact RPC table and the fast paths; a URL that is
    not UTF-8 gets a JSON 400 (Klein answers it with a text/plain body before any route
    or error handler runs), and "//" in a path a plain 404."""

    def __init__(self, api: JsonApp):
        super().__init__(api.app)
        self.api = api

    def bare_response(self, data: bytes, sink: BareSink | None = None) -> bytes | Deferred[bytes] | None:
        """The whole HTTP response to `data`, a request the channel received in one
        piece while idle, if a bare RPC or fast path answers it: bytes, or a Deferred of
        them when its handler is async. Else None, and the request goes the normal way
        (a route with no bare way, an unusual header, a malformed or pipelined
        request, a fast path that declines, or tracing). The response is the one the
        normal way gives the same request, byte for byte but the Date; the route's
        counters count it. Twisted's request machinery (a Request, its header
        objects, resource traversal) is what it saves. `sink` (the channel) takes the
        parts of a body written in parts as they come; the bytes returned end it."""
        if trace_enabled():
            return None
        if data[:5] == b"POST ":
            return self._bare_post(data, sink)
        gets = self.api.bare_paths.get(b"GET")
        if not gets:
            return None
        match = BARE_REQUEST.match(data)
        if match is None:
            return None
        target = match.group(1)
        path = target.partition(b"?")[0]  # as Twisted's request.path: without the query
        for prefix, answer, fast in gets:
            if path.startswith(prefix):
                headers = _plain_headers(match.group(2), BARE_HEADERS)
                if headers is None:
                    return None
                request = BareRequest(path, headers, b"", b"GET", target)
                return self._bare_fast(request, answer, fast, path[len(prefix):])
        return None

    def _bare_post(self, data: bytes, sink: BareSink | None) -> bytes | Deferred[bytes] | None:
        """`bare_response` for a POST to a bare RPC or fast path: its handler runs with
        a `BareRequest` (the headers and body as parsed here)."""
        match = BARE_POST.match(data)
        if match is None:
            return None
        path = match.group(1)
        rpc = self.api.bare_rpcs.get(path)
        fast: tuple[Answer, FastHandler, bytes] | None = None
        if rpc is None:
            for prefix, answer, handler in self.api.bare_paths.get(b"POST", ()):
                if path.startswith(prefix):
                    fast = answer, handler, path[len(prefix):]
                    break
            else:
                return None
        headers = _plain_headers(match.group(2), BARE_POST_HEADERS)
        if headers is None:
            return None
        body = data[match.end():]
        length = headers.get(b"content-length")
        if length is None or not length.isdigit() or len(length) > 9 or int(length) != len(body) \
                or len(body) > body_limit(path):
            return None
        request = BareRequest(path, headers, body, sink=sink)
        if rpc is not None:
            answer, rpc_handler = rpc
            return self._bare_answer(request, answer, lambda: rpc_handler(request))
        return self._bare_fast(request, *cast(tuple[Answer, FastHandler, bytes], fast))

    def _bare_fast(self, request: BareRequest, answer: Answer, fast: FastHandler,
                   rest: bytes) -> bytes | Deferred[bytes] | None:
        """A bare fast path's whole response, or None when it declines (or fails: the
        normal way then answers, and reports it)."""
        started = time.perf_counter()
        try:
            found = fast(cast(IRequest, request), rest)
        except Exception:
            return None
        if found is None:
            return None
        if isinstance(found, bytes) and not request.touched:  # a hit from memory: its head made here
            answer.count(200, started)
            tag = b"ETag: " + etag_of(found) + b"\r\n" if answer.etag else b""
            return (b"HTTP/1.1 200 OK\r\nServer: %s\r\nDate: %s\r\n%sContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (SERVER_VERSION, http_date(), tag, len(found), found))
        return self._bare_answer(request, answer, _given(found))

    def _bare_answer(self, request: BareRequest, answer: Answer,
                     handler: Callable[[], Any]) -> bytes | Deferred[bytes]:
        """The whole response of a bare request: `handler`'s answer (now or to come)
        as `Answer` makes it, with the status line and headers the normal way writes."""
        result = answer.run(cast(IRequest, request), handler)
        if isinstance(result, Deferred):
            return result.addCallback(lambda body: request.response(SERVER_VERSION, http_date(), body))
        return request.response(SERVER_VERSION, http_date(), result)

    def render(self, request: IRequest) -> Any:
        method, path = request.method, request.path
        trace("http.request", None, method=method, path=path)
        methods = self.api.rpcs.get(path)
        if methods is not None:
            rpc = methods.get(method)
            if rpc is None:
                request.setHeader(b"Allow", b", ".join(sorted(methods)))
                return respond(request, error_body("method not allowed on this resource"), 405)
            answer, handler = rpc
            return answer.deliver(request, lambda: handler(request))
        for way, prefix, answer, fast in self.api.fast_paths:
            if method == way and path.startswith(prefix):
                started = time.perf_counter()
                try:
                    found = fast(request, path[len(prefix):])
                except Exception:
                    return answer.fail(request, Failure(), started)
                if found is None:
                    break
                if isinstance(found, (Deferred, Awaitable)):  # an async answer (the purchase)
                    return answer.deliver(request, _given(found))
                return without_body(request, answer.finish(request, found, started))
        if b"//" in path:
            # "//x" is not "/x": no route has an empty segment (werkzeug would redirect,
            # echoing the Host, before any route's checks)
            return respond(request, error_body("no such resource"), 404)
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
            (request.getHeader(b"host") or b"").decode("utf-8")
        except UnicodeDecodeError:
            return respond(request, error_body("the URL is not valid UTF-8"), 400)
        return super().render(request)
