"""Reading a request at the HTTP edge: its body (size limit, strict JSON, no
duplicate keys), ids in its path, and who sent it (admin token, cluster secret).
Everything refused here is a domain error (`bazar.errors`), answered like any other."""

from __future__ import annotations

import hmac
import json
from typing import Any

from twisted.web.iweb import IRequest

from bazar.codec import JSONDecodeError, loads
from bazar.errors import Forbidden, Invalid, NotFound, TooLarge, Unauthorized
from bazar.messages import MIN_SEQ_HEADER
from bazar.records import MAX_BODY, NewBook, Page, parse_csv_books, parse_new_books, parse_page

# MAX_BODY (bazar.records): bytes of a public request's body
INTERNAL_BODY = 512 * 1024 * 1024  # bytes of an internal one (a batch of log entries)
SECRET_HEADER = b"X-Bazar-Secret"
NO_BODY = object()


def body_limit(path: bytes) -> int:
    """The largest request body worth receiving for `path` (the apps check the exact
    limit again; this only stops an oversized body before it is buffered)."""
    return INTERNAL_BODY if path.startswith(b"/internal/") else MAX_BODY


def read_body(request: IRequest, limit: int = MAX_BODY) -> bytes:
    length = request.getHeader(b"Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes")
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes")
    return data


def parse_json(data: bytes) -> Any:
    """A JSON value with no key given twice at any depth. JSON leaves duplicate keys
    to the reader ({"quantity": -5, "quantity": 1}); two readers may take different
    ones, so such a body is refused."""
    try:
        value = loads(data)
    except JSONDecodeError:
        raise Invalid("the body is not valid JSON (UTF-8, no NaN or Infinity)") from None
    if isinstance(value, (dict, list)) and data.count(b":") > 1:
        json.loads(data, object_pairs_hook=_unique_keys)
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Invalid("the body has a key more than once")
    return dict(pairs)


def read_json(request: IRequest, *, optional: bool = False, limit: int = MAX_BODY) -> Any:
    """The request body as JSON; an empty body is `NO_BODY` when `optional`."""
    data = read_body(request, limit)
    if not data.strip():
        if optional:
            return NO_BODY
        raise Invalid("a JSON body is required")
    return parse_json(data)


def read_object(request: IRequest, *, optional: bool = False, limit: int = MAX_BODY) -> dict[str, Any] | None:
    """The body as a JSON object; None only for an empty, optional body (a JSON
    `null` is not an object and is refused like any other non-object)."""
    body = read_json(request, optional=optional, limit=limit)
    if body is NO_BODY:
        return None
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    return body


def read_books(request: IRequest) -> tuple[NewBook, ...]:
    """The books of an import: CSV when the Content-Type says text/csv, else a JSON list."""
    content_type = (request.getHeader(b"Content-Type") or b"").split(b";")[0].strip().lower()
    data = read_body(request)
    if content_type == b"text/csv":
        return parse_csv_books(data)
    if not data.strip():
        raise Invalid("a JSON list of books (or CSV, with Content-Type: text/csv) is required")
    return parse_new_books(parse_json(data))


def min_seq_of(request: IRequest) -> int:
    """The oldest state a reader can use (`MIN_SEQ_HEADER`); 0 when it does not say
    or says something else than an index."""
    value = request.getHeader(MIN_SEQ_HEADER)
    return int(value) if value is not None and value.isdigit() and len(value) <= 18 else 0


PAGING = frozenset({b"limit", b"after"})


def page_of(request: IRequest, what: str = "book", allowed: frozenset[bytes] = PAGING) -> Page | None:
    """`?limit=N&after=ID` of a list's request (None: neither, the whole list); each
    given at most once, and no other query parameter than those `allowed`."""
    args = request.args
    unknown = sorted(set(args) - allowed)
    if unknown:
        names = ", ".join(repr(name.decode("utf-8", "replace"))[:40] for name in unknown[:5])
        raise Invalid(f"unknown query parameter(s): {names}")

    def one(name: bytes) -> str | None:
        values = args.get(name)
        if values is None:
            return None
        if len(values) != 1:
            raise Invalid(f"{name.decode()} is given more than once")
        value: bytes = values[0]
        return value.decode("latin-1")  # (anything but ASCII digits is refused next)

    return parse_page(one(b"limit"), one(b"after"), what)


def bearer(request: IRequest) -> bytes | None:
    value: bytes | None = request.getHeader(b"Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def require_admin(request: IRequest, token: str | None) -> None:
    """Unauthorized unless the request carries the admin token (compared in constant time)."""
    if not token:
        raise Unauthorized("admin calls are disabled: no admin token is configured")
    given = bearer(request)
    if given is None or not hmac.compare_digest(given, token.encode()):
        raise Unauthorized("a valid admin token is required (Authorization: Bearer <token>)")


def require_secret(request: IRequest, secret: str | None) -> None:
    """Forbidden unless the request carries the cluster secret: internal doors only."""
    given = request.getHeader(SECRET_HEADER)
    if not secret or given is None or not hmac.compare_digest(given, secret.encode()):
        raise Forbidden("this endpoint is internal: the cluster secret is required")


def parse_id(text: str, what: str = "book") -> int:
    """Ids in paths: a non-negative integer, else NotFound (as for unknown ids)."""
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise NotFound(f"no {what} with id {text[:40]!r}")
    return int(text)
