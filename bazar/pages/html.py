"""The small HTML helper of the browser pages (storefront, cluster page): every piece
of text goes through `html.escape` on its way into a page, so a title such as
`<script>` is shown as text. No template engine, no front-end build chain."""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from bazar.errors import BazarError
from bazar.http.app import Raw, status_of

log = Logger()

HTML = b"text/html; charset=utf-8"

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#234;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#fff;text-decoration:none}header h1{font-size:1.3em;margin:0}
main{padding:1em 1.5em;max-width:70em}
table{border-collapse:collapse;margin:.6em 0}th,td{border-bottom:1px solid #ddd;padding:.3em .7em;text-align:left}
th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums}
.error{border-left:4px solid #b22;padding:.4em 1em;background:#fee}
.ok{border-left:4px solid #2a2;padding:.4em 1em;background:#efe}
.primary{font-weight:bold;color:#063}.down{color:#b22}.recovering{color:#a60}
form.inline{display:inline}input[type=number]{width:6em}
"""


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


# Content-Security-Policy of every page: only our own style and the scripts registered
# with `allow_script` run, so even a title that slipped past escaping could not run code.
_SCRIPTS: list[str] = []


def allow_script(text: str) -> str:
    """Register a page script (a constant of ours) with the policy; returns it."""
    _SCRIPTS.append(_digest(text))
    return text


def policy() -> bytes:
    scripts = " ".join(_SCRIPTS) or "'none'"
    return (f"default-src 'none'; style-src {_digest(STYLE)}; script-src {scripts}; connect-src 'self'; "
            "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'").encode()


class Markup(str):
    """Text that is already HTML (built by `tag` or `page`): never escaped again."""


def esc(value: Any) -> Markup:
    """`value` as HTML: markup stays as is, anything else is escaped text."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def tag(element: str, /, *children: Any, **attrs: Any) -> Markup:
    """`<element attrs>children</element>`; attribute values and text children are escaped.
    A trailing underscore in an attribute name is dropped (`class_`)."""
    parts = [element]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        key = key.rstrip("_").replace("_", "-")
        parts.append(key if value is True else f'{key}="{esc(value)}"')
    opening = "<" + " ".join(parts) + ">"
    if element in ("input", "meta", "br", "link"):
        return Markup(opening)
    return Markup(opening + "".join(esc(c) for c in children) + f"</{element}>")


def join(*children: Any) -> Markup:
    return Markup("".join(esc(c) for c in children))


def table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None, **attrs: Any) -> Markup:
    numeric = numeric or set()
    head = tag("tr", *[tag("th", h) for h in headers])
    body = [tag("tr", *[tag("td", c, class_="n" if i in numeric else None) for i, c in enumerate(row)])
            for row in rows]
    return tag("table", tag("thead", head), tag("tbody", *body), **attrs)


def page(title: str, *content: Any, nav: Any = "", script: str = "") -> bytes:
    header = tag("header", tag("h1", tag("a", "Bazar", href="/")), nav)
    head = join(Markup('<meta charset="utf-8">'),
                tag("meta", name="viewport", content="width=device-width, initial-scale=1"),
                tag("title", f"{title} — Bazar"), Markup(f"<style>{STYLE}</style>"))
    # the script is ours (a constant), never built from data
    tail = Markup(f"<script>{script}</script>") if script else ""
    doc = "<!doctype html>\n" + tag("html", tag("head", head), tag("body", header, tag("main", *content), tail),
                                    lang="en")
    return doc.encode("utf-8")


def html_response(body: bytes, status: int = 200) -> tuple[int, Raw]:
    return status, Raw(body, HTML)


ERROR_TITLES = {400: "Bad request", 401: "Admin token required", 403: "Forbidden", 404: "Not found",
                409: "Out of stock", 413: "Too large", 503: "Service unavailable"}


def error_page(status: int, message: str, nav: Any = "") -> bytes:
    title = ERROR_TITLES.get(status, "Something went wrong")
    hint = {503: "The store is busy failing over or recovering; try again in a moment.",
            404: "Maybe it was never in the catalogue.",
            409: "There are not enough copies left."}.get(status, "")
    return page(title, tag("h2", title), tag("p", message, class_="error"), tag("p", hint) if hint else "",
                tag("p", tag("a", "Back to the catalogue", href="/")), nav=nav)


# A page: an async handler of (request, **path values) that answers (status, Raw).
PageHandler = Callable[..., Awaitable[tuple[int, Raw]]]


def html_route(handler: PageHandler, nav: Any = "") -> PageHandler:
    """Wrap a page handler (async, returning (status, Raw)) so that an error of Bazar's
    becomes an HTML error page with the status and Retry-After the JSON API would
    give, and anything unexpected a plain 500 page: a browser never sees JSON or a
    traceback."""

    async def wrapped(request: Any, **kw: Any) -> tuple[int, Raw]:
        # each rendering of a buy form carries a new key: a page from the browser's
        # cache (the back button) would carry an old one
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Security-Policy", policy())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        try:
            result: tuple[int, Raw] = await handler(request, **kw)
            return result
        except BazarError as exc:
            # (no WWW-Authenticate: a browser would pop up a Bearer prompt it cannot answer)
            status = status_of(exc)
            if status == 503:
                request.setHeader(b"Retry-After", b"%d" % max(1, round(exc.retry_after or 1)))
            return html_response(error_page(status, exc.message, nav), status)
        except Exception:
            log.failure("unhandled error in a page", Failure())
            return html_response(error_page(500, "internal error", nav), 500)

    wrapped.__name__ = handler.__name__
    return wrapped
