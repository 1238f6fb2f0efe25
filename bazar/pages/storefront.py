"""The storefront: HTML pages served by the front end at `/`.

The pages go through the front end's own internals (`Frontend.info/search/
all_books/purchase/catalog_write/orders`), so the cache, read-your-writes and the
purchase guarantees are exactly those of the JSON API. Each buy form carries an
Idempotency-Key made when the page was rendered: a double click or a reload of the
confirmation sends the same key and buys once.

Admin pages sit behind the admin token. The login form checks it in constant time
and sets an HttpOnly, SameSite=Strict cookie that holds an HMAC of the token, never
the token itself; a POST whose Origin is another site is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

from twisted.web.iweb import IRequest

from bazar.codec import loads
from bazar.errors import Forbidden, Invalid, Unauthorized
from bazar.http.app import JsonApp, Raw
from bazar.http.client import passthrough
from bazar.http.request import parse_id, read_body
from bazar.ops import AddBook, Restock, UpdatePrice, new_rid
from bazar.pages.html import Markup, PageHandler, html_response, html_route, join, page, table, tag
from bazar.records import MAX_QUANTITY, parse_new_book, parse_price, parse_restock

if TYPE_CHECKING:
    from bazar.frontend import Frontend

COOKIE = b"bazar_admin"


def nav() -> Markup:
    return join(tag("a", "Catalogue", href="/"), tag("a", "Cluster", href="/cluster"), tag("a", "Admin", href="/admin"),
                tag("form", tag("input", type="search", name="topic", placeholder="topic", aria_label="topic"),
                    tag("button", "Search", type="submit"), action="/", method="get", class_="inline"))


NAV = nav()


def form_key() -> str:
    """A fresh key for one rendered form: its submissions, however many, are one purchase."""
    return "web-" + secrets.token_urlsafe(18)


def form_fields(request: IRequest) -> dict[str, str]:
    """The urlencoded body of a form POST (the site does not parse bodies itself)."""
    data = read_body(request)
    try:
        parsed = parse_qs(data.decode("utf-8"), keep_blank_values=True, max_num_fields=20, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise Invalid("the form could not be read") from None
    return {k: v[0] for k, v in parsed.items()}


def money(value: Any) -> str:
    return f"{float(value):,.2f}"


def quantity_field(text: str | None, default: int | None = None) -> int:
    if not text and default is not None:
        return default
    if text is None or not text.strip().isdigit() or not 1 <= int(text) <= MAX_QUANTITY:
        raise Invalid(f"the quantity must be a whole number from 1 to {MAX_QUANTITY}")
    return int(text)


def book_link(book: dict[str, Any]) -> Markup:
    return tag("a", book["title"], href=f"/book/{int(book['id'])}")


def same_origin(request: IRequest) -> None:
    """Refuse a form posted from another site (the cookie is SameSite=Strict already;
    this also covers browsers that ignore that attribute)."""
    origin = request.getHeader(b"Origin")
    if origin is None or origin == b"null":
        return
    host = request.getHeader(b"Host") or b""
    if urlsplit(origin.decode("latin-1")).netloc.encode("latin-1") != host:
        raise Forbidden("this form was posted from another site")


def cookie_of(request: IRequest, name: bytes) -> bytes | None:
    """A cookie read from the headers themselves (request.getCookie depends on the
    server having parsed them, which not every way in does)."""
    headers: list[bytes] = request.requestHeaders.getRawHeaders(b"Cookie") or []
    for header in headers:
        for pair in header.split(b";"):
            key, sep, value = pair.strip().partition(b"=")
            if sep and key == name:
                return value
    return None


class Admin:
    """The admin session: a cookie holding an HMAC of the token, so the token itself
    never travels back to the browser."""

    def __init__(self, token: str | None):
        self.token = token
        self.cookie = hmac.new(token.encode(), b"bazar admin session", hashlib.sha256).hexdigest().encode() \
            if token else None

    def check_token(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())  # type: ignore[union-attr]

    def logged_in(self, request: IRequest) -> bool:
        value = cookie_of(request, COOKIE)
        return self.cookie is not None and value is not None and hmac.compare_digest(value, self.cookie)

    def require(self, request: IRequest) -> None:
        if not self.logged_in(request):
            raise Unauthorized("log in with the admin token first (the Admin page)")


def install_storefront(api: JsonApp, fe: Frontend) -> None:
    admin = Admin(fe.admin_token)

    def route(path: str, method: str, name: str) -> Callable[[PageHandler], PageHandler]:
        def register(handler: PageHandler) -> PageHandler:
            api.route(path, method, name)(html_route(handler, NAV))
            return handler
        return register

    @route("/", "GET", "storefront")
    async def catalogue(request: IRequest) -> tuple[int, Raw]:
        topic_arg = request.args.get(b"topic")
        if topic_arg and topic_arg[0].strip():
            try:
                topic = topic_arg[0].decode("utf-8")
            except UnicodeDecodeError:
                raise Invalid("the topic is not valid UTF-8") from None
            found = loads(passthrough(*await fe.search(topic))[1])
            rows = [[b["id"], book_link(b)] for b in found]
            body = table(["id", "title"], rows, {0}, id="results") if rows else tag("p", "No book on that topic.")
            return html_response(page(f"Topic {topic}", tag("h2", f"Books on “{topic}”"), body, nav=NAV))
        books = loads(passthrough(*await fe.all_books())[1])
        topics = sorted({b["topic"] for b in books})
        topic_links = join(*[join(tag("a", t, href="/?topic=" + quote(t, safe="")), " ") for t in topics])
        rows = [[b["id"], book_link(b), tag("a", b["topic"], href="/?topic=" + quote(b["topic"], safe="")),
                 money(b["price"]), b["quantity"]] for b in books]
        return html_response(page("Catalogue", tag("h2", "Catalogue"), tag("p", "Topics: ", topic_links),
                                  table(["id", "title", "topic", "price", "in stock"], rows, {0, 3, 4}, id="books"),
                                  nav=NAV))

    @route("/book/<string:book_id>", "GET", "book_page")
    async def book_page(request: IRequest, book_id: str) -> tuple[int, Raw]:
        book = loads(passthrough(*await fe.info(parse_id(book_id)))[1])
        ident = int(book["id"])
        if book["quantity"] > 0:
            buy = tag("form",
                      tag("input", type="hidden", name="key", value=form_key()),
                      tag("label", "Quantity ", tag("input", type="number", name="quantity", value="1", min="1",
                                                   max=str(min(book["quantity"], MAX_QUANTITY)))),
                      " ", tag("button", "Buy", type="submit", id="buy"),
                      action=f"/book/{ident}/buy", method="post")
        else:
            buy = tag("p", "Out of stock.", class_="error")
        details = table(["topic", "price", "in stock"], [[b_topic_link(book), money(book["price"]), book["quantity"]]],
                        {1, 2}, id="book")
        return html_response(page(book["title"], tag("h2", book["title"], id="title"), details, buy, nav=NAV))

    def b_topic_link(book: dict[str, Any]) -> Markup:
        return tag("a", book["topic"], href="/?topic=" + quote(book["topic"], safe=""))

    @route("/book/<string:book_id>/buy", "POST", "buy_form")
    async def buy(request: IRequest, book_id: str) -> tuple[int, Raw]:
        ident = parse_id(book_id)
        fields = form_fields(request)
        quantity = quantity_field(fields.get("quantity"), default=1)
        key = fields.get("key") or None
        if key is not None and (len(key) > 200 or not key.isprintable()):
            raise Invalid("the form key is malformed; reload the book page")
        order = (await fe.purchase(ident, quantity, key))["order"]
        rows = [["order", order["id"]], ["book", tag("a", order["title"], href=f"/book/{int(order['book_id'])}")],
                ["copies", order["quantity"]], ["price", money(order["price"])], ["total", money(order["total"])],
                ["placed", order["created"]]]
        return html_response(page("Order confirmed", tag("h2", "Thank you: order confirmed"),
                                  tag("p", f"Order {order['id']} is confirmed.", class_="ok", id="confirmation"),
                                  table(["", ""], rows, id="order"), tag("p", tag("a", "Keep shopping", href="/")),
                                  nav=NAV))

    # -- admin ------------------------------------------------------------------
    def login_page(status: int = 200, message: str = "") -> tuple[int, Raw]:
        form = tag("form", tag("label", "Admin token ", tag("input", type="password", name="token",
                                                            autocomplete="current-password")),
                   " ", tag("button", "Log in", type="submit"), action="/admin/login", method="post")
        notice = tag("p", message, class_="error") if message else ""
        return html_response(page("Admin", tag("h2", "Admin"), notice, form, nav=NAV), status)

    @route("/admin", "GET", "admin_page")
    async def admin_page(request: IRequest) -> tuple[int, Raw]:
        if not admin.logged_in(request):
            return login_page(401)
        books = loads(passthrough(*await fe.all_books())[1])
        done = request.args.get(b"done", [b""])[0].decode("utf-8", "replace")[:200]
        rows = []
        for b in books:
            ident = int(b["id"])
            price = tag("form", tag("input", type="hidden", name="rid", value=form_key()),
                        tag("input", type="text", name="price", value=str(b["price"]), size="8"),
                        tag("button", "Set price", type="submit"),
                        action=f"/admin/price/{ident}", method="post", class_="inline")
            restock = tag("form", tag("input", type="hidden", name="rid", value=form_key()),
                          tag("input", type="number", name="quantity", value="1", min="1"),
                          tag("button", "Restock", type="submit"),
                          action=f"/admin/restock/{ident}", method="post", class_="inline")
            rows.append([ident, book_link(b), b["topic"], b["quantity"], price, restock])
        add = tag("form", tag("input", type="hidden", name="rid", value=form_key()),
                  *[tag("label", f"{n} ", tag("input", type="text", name=n), " ") for n in ("title", "topic", "price")],
                  tag("label", "quantity ", tag("input", type="number", name="quantity", min="1")),
                  " ", tag("button", "Add book", type="submit"), action="/admin/books", method="post")
        logout = tag("form", tag("button", "Log out", type="submit"), action="/admin/logout", method="post",
                     class_="inline")
        return html_response(page("Admin", tag("h2", "Admin"), tag("p", done, class_="ok") if done else "",
                                  tag("p", tag("a", "Confirmed orders", href="/admin/orders"), " ", logout),
                                  table(["id", "title", "topic", "in stock", "price", "restock"], rows, {0, 3},
                                        id="admin-books"),
                                  tag("h3", "Add a book"), add, nav=NAV))

    @route("/admin/login", "POST", "admin_login")
    async def login(request: IRequest) -> tuple[int, Raw]:
        same_origin(request)
        if not admin.check_token(form_fields(request).get("token", "")):
            return login_page(401, "That is not the admin token." if admin.token else
                              "Admin pages are disabled: no admin token is configured.")
        # (IRequest declares fewer cookie attributes than twisted.web.server.Request has)
        request.addCookie(COOKIE, admin.cookie, path="/", httpOnly=True, sameSite="strict")  # type: ignore[call-arg]
        return see_other(request, "/admin")

    @route("/admin/logout", "POST", "admin_logout")
    async def logout(request: IRequest) -> tuple[int, Raw]:
        request.addCookie(COOKIE, b"", path="/", httpOnly=True, sameSite="strict",  # type: ignore[call-arg]
                          max_age=0)
        return see_other(request, "/")

    def see_other(request: IRequest, where: str) -> tuple[int, Raw]:
        request.setHeader(b"Location", where.encode("ascii"))
        return html_response(page("Redirect", tag("p", tag("a", "Continue", href=where)), nav=NAV), 303)

    def form_rid(fields: dict[str, str]) -> str:
        """The request id of an admin form's write: one rendered form is one write,
        however often it is sent."""
        rid = fields.get("rid", "")
        if rid.startswith("web-") and len(rid) <= 64 and rid.isprintable():
            return "fe:" + rid
        return new_rid()

    async def admin_fields(request: IRequest) -> dict[str, str]:
        admin.require(request)
        same_origin(request)
        return form_fields(request)

    @route("/admin/price/<string:book_id>", "POST", "admin_price")
    async def set_price(request: IRequest, book_id: str) -> tuple[int, Raw]:
        fields = await admin_fields(request)
        ident = parse_id(book_id)
        try:
            price = float(fields.get("price", ""))
        except ValueError:
            raise Invalid("the price must be a number") from None
        book = await fe.catalog_write(UpdatePrice(rid=form_rid(fields), id=ident,
                                                  price=parse_price({"price": price})))
        return see_other(request, "/admin?done=" + quote(f"price of book {book['id']} set to {book['price']}"))

    @route("/admin/restock/<string:book_id>", "POST", "admin_restock")
    async def restock(request: IRequest, book_id: str) -> tuple[int, Raw]:
        fields = await admin_fields(request)
        ident = parse_id(book_id)
        quantity = parse_restock({"quantity": quantity_field(fields.get("quantity"))})
        book = await fe.catalog_write(Restock(rid=form_rid(fields), id=ident, quantity=quantity))
        return see_other(request, "/admin?done=" + quote(f"book {book['id']} now has {book['quantity']} copies"))

    @route("/admin/books", "POST", "admin_add_book")
    async def add_book(request: IRequest) -> tuple[int, Raw]:
        fields = await admin_fields(request)
        try:
            price: Any = float(fields.get("price", ""))
        except ValueError:
            raise Invalid("the price must be a number") from None
        new = parse_new_book({"title": fields.get("title", ""), "topic": fields.get("topic", ""), "price": price,
                              "quantity": quantity_field(fields.get("quantity"))})
        book = await fe.catalog_write(AddBook(rid=form_rid(fields), title=new.title, topic=new.topic,
                                              price=new.price, quantity=new.quantity))
        return see_other(request, "/admin?done=" + quote(f"added book {book['id']}"))

    @route("/admin/orders", "GET", "admin_orders")
    async def orders(request: IRequest) -> tuple[int, Raw]:
        admin.require(request)
        found = loads(passthrough(*await fe.orders())[1])
        rows = [[o["id"], tag("a", o["title"], href=f"/book/{int(o['book_id'])}"), o["quantity"], money(o["price"]),
                 money(o["total"]), o["created"]] for o in found]
        return html_response(page("Orders", tag("h2", f"Confirmed orders ({len(found)})"),
                                  table(["id", "book", "copies", "price", "total", "placed"], rows, {0, 2, 3, 4},
                                        id="orders"), nav=NAV))
