"""The small web helper shared by the three Klein apps.

JSON in and out, JSON errors for every status (Werkzeug's HTML pages and tracebacks
never reach a client), admin-token and cluster-secret checks, the body size limit, and
per-route Prometheus metrics.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any, Awaitable, Callable

import orjson
from klein import Klein
from klein.resource import KleinResource
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

log = Logger()

MAX_BODY = 64 * 1024
JSON = b"application/json"
SECRET_HEADER = b"X-Bazar-Secret"

Request = Any  # twisted.web.server.Request; zope interfaces do not type-check well


class HTTPError(Exception):
    """An error with an HTTP status and a sentence for the client."""

    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes) -> Any:
    """Parse JSON; NaN, Infinity and invalid UTF-8 are rejected (orjson is strict)."""
    return orjson.loads(data)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def respond(request: Request, body: bytes, status: int = 200, content_type: bytes = JSON) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type)
    # a known length spares both sides chunked transfer encoding
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    length = request.getHeader(b"Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPError(413, f"request body is larger than {limit} bytes")
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(limit + 1)
    if len(data) > limit:
        raise HTTPError(413, f"request body is larger than {limit} bytes")
    return data


def read_json(request: Request, *, optional: bool = False) -> Any:
    """The request body as JSON; an empty body is `NO_BODY` when `optional`."""
    data = read_body(request)
    if not data.strip():
        if optional:
            return NO_BODY
        raise HTTPError(400, "a JSON body is required")
    try:
        value = loads(data)
    except orjson.JSONDecodeError:
        raise HTTPError(400, "the body is not valid JSON (UTF-8, no NaN or Infinity)") from None
    if isinstance(value, (dict, list)) and data.count(b":") > 1:
        # JSON leaves duplicate keys to the reader ({"quantity": -5, "quantity": 1});
        # two readers may take different ones, so such a body is refused
        json.loads(data, object_pairs_hook=_unique_keys)
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise HTTPError(400, "the body has a key more than once")
    return dict(pairs)


NO_BODY = object()


def read_object(request: Request, *, optional: bool = False) -> dict[str, Any] | None:
    """The body as a JSON object; None only for an empty, optional body (a JSON
    `null` is not an object and gets a 400 like any other non-object)."""
    body = read_json(request, optional=optional)
    if body is NO_BODY:
        return None
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return body


def bearer(request: Request) -> bytes | None:
    value = request.getHeader(b"Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def require_admin(request: Request, token: str | None) -> None:
    """401 unless the request carries the admin token (compared in constant time)."""
    if not token:
        raise HTTPError(401, "admin calls are disabled: no admin token is configured",
                        {b"WWW-Authenticate": b'Bearer realm="bazar"'})
    given = bearer(request)
    if given is None or not hmac.compare_digest(given, token.encode()):
        raise HTTPError(401, "a valid admin token is required (Authorization: Bearer <token>)",
                        {b"WWW-Authenticate": b'Bearer realm="bazar"'})


def require_secret(request: Request, secret: str | None) -> None:
    """403 unless the request carries the cluster secret: internal endpoints only."""
    given = request.getHeader(SECRET_HEADER)
    if not secret or given is None or not hmac.compare_digest(given, secret.encode()):
        raise HTTPError(403, "this endpoint is internal: the cluster secret is required")


def parse_id(text: str) -> int:
    """Book and order ids in paths: a non-negative integer, else 404 (as for unknown ids)."""
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise HTTPError(404, f"no book with id {text[:40]!r}")
    return int(text)


class TextConverter(PathConverter):
    """`<text:name>`: any text, slashes included, like `<path:name>`, but also across
    line breaks (werkzeug's `.` stops at a newline: /bazar/search/a%0Ab matched no route)."""

    regex = "[^/][\\s\\S]*?"


class JsonApp:
    """A Klein app whose handlers return JSON-able values (or raw bytes) and raise HTTPError.

    Every route gets a request counter and a latency histogram in this app's own
    Prometheus registry, so several apps can live in one process (as in the tests).
    """

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
        self.shortcuts: list[tuple[bytes, bytes, Callable[[Request, bytes], Any]]] = []
        self._install_error_pages()
        self.route("/metrics", "GET", "metrics")(self._metrics)

    def _install_error_pages(self) -> None:
        @self.app.handle_errors(HTTPException)
        def werkzeug_error(request: Request, failure: Failure) -> bytes:
            exc = failure.value
            code = getattr(exc, "code", None) or 400
            messages = {404: "no such resource", 405: "method not allowed on this resource"}
            message = messages.get(code, getattr(exc, "description", None) or "bad request")
            self.requests.labels(self.service, "unmatched", str(code)).inc()
            return respond(request, error_body(message), code)

        @self.app.handle_errors(Exception)
        def any_error(request: Request, failure: Failure) -> bytes:
            log.failure("unhandled error in {service}", failure, service=self.service)
            return respond(request, error_body("internal error"), 500)

    def route(self, path: str, methods: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register `handler(request, **kw)`; it may be async and returns JSON-able data,
        a (status, data) pair, or bytes (already-encoded JSON)."""

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            answer = Answer(self, name)

            def endpoint(request: Request, **kw: Any) -> Any:
                started = time.perf_counter()
                try:
                    result = handler(request, **kw)
                except Exception:
                    return answer.fail(request, Failure(), started)
                if isinstance(result, (Deferred, Awaitable)):
                    d = result if isinstance(result, Deferred) else ensureDeferred(result)  # type: ignore[arg-type]
                    return d.addCallbacks(lambda r: answer.finish(request, r, started),
                                          lambda f: answer.fail(request, f, started))
                return answer.finish(request, result, started)

            endpoint.__name__ = f"{self.service}_{name}"
            self.app.route(path, methods=[methods], branch=False, endpoint=f"{name}_{methods}")(endpoint)
            return handler

        return register

    def _metrics(self, request: Request) -> "Raw":
        return Raw(generate_latest(self.registry), CONTENT_TYPE_LATEST.encode())

    def shortcut(self, method: bytes, prefix: bytes, name: str, handler: Callable[[Request, bytes], Any]) -> None:
        """A way in for `method` on paths under `prefix`, tried before Klein's routing:
        `handler(request, rest_of_path)` answers like a route's handler (data, bytes,
        a (status, data) pair, a Deferred or coroutine of one, or an HTTPError), or
        returns None to let the route registered as `name` handle the request. For the
        hottest requests (cache hits, replica reads, replication, the purchase path),
        where Klein's routing and its Deferreds cost more than the work."""
        answer = Answer(self, name)

        def attempt(request: Request, rest: bytes) -> Any:
            started = time.perf_counter()
            try:
                result = handler(request, rest)
            except Exception:
                return answer.fail(request, Failure(), started)
            if result is None:
                return None
            if not isinstance(result, (Deferred, Awaitable)):
                return answer.finish(request, result, started)
            d = result if isinstance(result, Deferred) else ensureDeferred(result)  # type: ignore[arg-type]
            gone: list[bool] = []
            request.notifyFinish().addErrback(lambda _: gone.append(True))

            def send(body: bytes) -> None:
                if not gone:
                    request.write(body)
                    request.finish()

            d.addCallbacks(lambda r: answer.finish(request, r, started),
                           lambda f: answer.fail(request, f, started)).addCallback(send)
            return NOT_DONE_YET

        self.shortcuts.append((method, prefix, attempt))

    def resource(self) -> Any:
        resource = JsonKleinResource(self.app)
        resource.shortcuts = self.shortcuts
        return resource


class Answer:
    """Turns a handler's result or failure into the JSON response, and counts it
    (per-status counter and latency histogram of one route)."""

    def __init__(self, api: JsonApp, name: str):
        self.api = api
        self.name = name
        self.counters: dict[int, Any] = {}
        self.histogram = api.latency.labels(api.service, name)

    def count(self, status: int, started: float) -> None:
        counter = self.counters.get(status)
        if counter is None:
            counter = self.counters[status] = self.api.requests.labels(self.api.service, self.name, str(status))
        counter.inc()
        self.histogram.observe(time.perf_counter() - started)

    def finish(self, request: Request, result: Any, started: float) -> bytes:
        status = 200
        if isinstance(result, tuple):
            status, result = result
        self.count(status, started)
        if isinstance(result, Raw):
            return respond(request, result.body, status, result.content_type)
        return respond(request, result if isinstance(result, bytes) else dumps(result), status)

    def fail(self, request: Request, failure: Failure, started: float) -> bytes:
        exc = failure.value
        if isinstance(exc, HTTPError):
            for key, value in exc.headers.items():
                request.setHeader(key, value)
            status, body = exc.status, error_body(exc.message)
        else:
            log.failure("unhandled error in {service} {route}", failure, service=self.api.service, route=self.name)
            status, body = 500, error_body("internal error")
        self.count(status, started)
        return respond(request, body, status)


class JsonKleinResource(KleinResource):
    """Klein's resource, but a URL that is not UTF-8 gets a JSON 400 (Klein answers
    it with a text/plain body before any route or error handler runs)."""

    shortcuts: list[tuple[bytes, bytes, Callable[[Request, bytes], Any]]] = []

    def render(self, request: Request) -> Any:
        method, path = request.method, request.path
        for way, prefix, answer in self.shortcuts:
            if method == way and path.startswith(prefix):
                body = answer(request, path[len(prefix):])
                if body is not None:
                    return body
                break
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


class Raw:
    """A non-JSON response body (e.g. Prometheus text)."""

    __slots__ = ("body", "content_type")

    def __init__(self, body: bytes, content_type: bytes):
        self.body = body
        self.content_type = content_type
