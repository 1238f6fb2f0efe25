"""The storefront and the cluster page, in memory: front end -> order -> catalog
(tests/memory.py's Shop), pages fetched over in-memory HTTP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from bazar.pages.storefront import Admin
from bazar.testing.memory import TOKEN, Response, Shop

HTML = "text/html; charset=utf-8"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    s = Shop(str(tmp_path))
    yield s
    s.close()


def html(r: Response, status: int = 200) -> str:
    assert r.code == status, r
    assert r.header("Content-Type") == HTML
    # only the page's own style and script may run, and no page is kept in a cache
    assert (r.header("Content-Security-Policy") or "").startswith("default-src 'none'; style-src 'sha256-")
    assert r.header("Cache-Control") == "no-store"
    text = r.body.decode("utf-8")
    assert text.startswith("<!doctype html>")
    assert "Traceback" not in text
    return text


def get(shop: Shop, path: str, **kw: Any) -> Response:
    return shop.api("GET", path, **kw)


def post_form(shop: Shop, path: str, fields: dict[str, Any], cookie: bool = False,
              headers: dict[str, str] | None = None) -> Response:
    hdrs = {**FORM, **(headers or {})}
    if cookie:
        hdrs["Cookie"] = "bazar_admin=" + admin_cookie()
    return shop.api("POST", path, data=urlencode(fields).encode(), headers=hdrs)


def admin_cookie() -> str:
    cookie = Admin(TOKEN).cookie
    assert cookie is not None
    return cookie.decode()


def form_key(page: str) -> str:
    found = re.search(r'name="key" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def stock(shop: Shop, book: int) -> int:
    return int(shop.api("GET", f"/bazar/info/{book}").json()["quantity"])


def orders(shop: Shop) -> list[dict[str, Any]]:
    return list(shop.api("GET", "/bazar/orders", admin=True).json())


# -- catalogue, search, book page ----------------------------------------------------------

def test_catalogue_lists_every_book_with_price_and_stock(shop: Shop) -> None:
    page = html(get(shop, "/"))
    assert "RPCs for Noobs." in page and "22.35" in page
    assert page.count('href="/book/') == 7
    assert 'href="/?topic=distributed%20systems"' in page


def test_search_by_topic_lists_only_that_topic(shop: Shop) -> None:
    page = html(get(shop, "/?topic=undergraduate%20school"))
    assert "Xen and the Art of Surviving Undergraduate School." in page
    assert "Cooking for the Impatient Undergrad." in page
    assert "RPCs for Noobs." not in page
    assert "No book on that topic." in html(get(shop, "/?topic=nothing%20here"))


def test_book_page_shows_price_stock_and_a_buy_form_with_a_fresh_key(shop: Shop) -> None:
    first, second = html(get(shop, "/book/2")), html(get(shop, "/book/2"))
    assert "Xen and the Art of Surviving Undergraduate School." in first
    assert "50.00" in first and ">8<" in first
    assert 'action="/book/2/buy" method="post"' in first
    assert form_key(first) != form_key(second)  # one key per rendered form


@pytest.mark.parametrize("path", ["/book/99", "/book/abc", "/book/-1"])
def test_unknown_book_page_is_a_404_page(shop: Shop, path: str) -> None:
    page = html(get(shop, path), 404)
    assert "Not found" in page


# -- buying ----------------------------------------------------------------------------------

def test_buy_from_the_form_confirms_the_order(shop: Shop) -> None:
    key = form_key(html(get(shop, "/book/1")))
    page = html(post_form(shop, "/book/1/buy", {"key": key, "quantity": "2"}))
    assert "order confirmed" in page and "RPCs for Noobs." in page and "44.70" in page
    assert stock(shop, 1) == 58
    assert [(o["book_id"], o["quantity"]) for o in orders(shop)] == [(1, 2)]


def test_double_submit_of_one_form_buys_once(shop: Shop) -> None:
    key = form_key(html(get(shop, "/book/3")))
    pages = [html(post_form(shop, "/book/3/buy", {"key": key, "quantity": "1"})) for _ in range(3)]
    ids = {re.search(r"Order (\d+) is confirmed", p).group(1) for p in pages}  # type: ignore[union-attr]
    assert len(ids) == 1
    assert stock(shop, 3) == 64
    assert len(orders(shop)) == 1
    # a new rendering of the page is a new purchase
    html(post_form(shop, "/book/3/buy", {"key": form_key(html(get(shop, "/book/3"))), "quantity": "1"}))
    assert stock(shop, 3) == 63 and len(orders(shop)) == 2


def test_out_of_stock_is_a_409_page_and_takes_nothing(shop: Shop) -> None:
    key = form_key(html(get(shop, "/book/2")))
    page = html(post_form(shop, "/book/2/buy", {"key": key, "quantity": "9"}), 409)
    assert "Out of stock" in page
    assert stock(shop, 2) == 8 and orders(shop) == []
    html(post_form(shop, "/book/2/buy", {"key": "web-all", "quantity": "8"}))
    assert "Out of stock." in html(get(shop, "/book/2"))  # no form once none are left


@pytest.mark.parametrize("quantity", ["0", "-1", "abc", "1.5", "10000000"])
def test_bad_quantity_is_a_400_page(shop: Shop, quantity: str) -> None:
    html(post_form(shop, "/book/1/buy", {"key": "web-x", "quantity": quantity}), 400)
    assert stock(shop, 1) == 60


def test_unavailable_service_is_a_503_page(shop: Shop) -> None:
    from bazar.testing.memory import ORDER_PORT
    shop.network.kill(ORDER_PORT)
    shop.poll()
    r = shop.api("POST", "/book/1/buy", data=b"key=web-down&quantity=1", headers=FORM)
    page = html(r, 503)
    assert "Service unavailable" in page
    assert r.header("Retry-After")


def test_a_title_with_markup_is_shown_as_text(shop: Shop) -> None:
    evil = '<script>alert("x")</script> & <b>bold</b>'
    r = shop.api("POST", "/bazar/books", admin=True, json={"title": evil, "topic": "<i>t</i>", "price": 1.0,
                                                           "quantity": 3})
    ident = r.json()["id"]
    for page in (html(get(shop, "/")), html(get(shop, f"/book/{ident}")), html(get(shop, "/?topic=%3Ci%3Et%3C/i%3E"))):
        assert "<script>alert" not in page and "<b>bold" not in page and "<i>t</i>" not in page
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page \
            or "&lt;i&gt;t&lt;/i&gt;" in page
    confirmation = html(post_form(shop, f"/book/{ident}/buy", {"key": "web-evil"}))
    assert "<script>alert" not in confirmation and "&lt;script&gt;" in confirmation


# -- admin -------------------------------------------------------------------------------------

ADMIN_POSTS = [("/admin/price/1", {"price": "1.5"}), ("/admin/restock/1", {"quantity": "5"}),
               ("/admin/books", {"title": "T", "topic": "t", "price": "1", "quantity": "1"})]


@pytest.mark.parametrize("path, fields", ADMIN_POSTS)
def test_admin_writes_refuse_without_the_token_and_change_nothing(shop: Shop, path: str,
                                                                   fields: dict[str, str]) -> None:
    before = shop.books()
    for headers in ({}, {"Cookie": "bazar_admin=forged"}, {"Cookie": "bazar_admin=" + TOKEN},
                    {"Authorization": "Bearer " + TOKEN + "x"}):
        html(post_form(shop, path, {**fields, "token": TOKEN}, headers=headers), 401)
    assert shop.books() == before


def test_admin_pages_refuse_without_the_token(shop: Shop) -> None:
    assert 'action="/admin/login"' in html(get(shop, "/admin"), 401)
    html(get(shop, "/admin/orders"), 401)
    page = html(post_form(shop, "/admin/login", {"token": "wrong"}), 401)
    assert "not the admin token" in page


def test_login_sets_a_cookie_that_is_not_the_token(shop: Shop) -> None:
    r = shop.network.client(None).request("POST", "http://127.0.0.1:5000/admin/login",
                                          data=urlencode({"token": TOKEN}).encode(), headers=FORM,
                                          allow_redirects=False)
    response = shop.wait(r)
    assert response.code == 303 and response.headers.getRawHeaders("Location") == ["/admin"]
    [cookie] = response.headers.getRawHeaders("Set-Cookie")
    assert cookie.startswith("bazar_admin=" + admin_cookie())
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert TOKEN not in cookie


def test_admin_pages_with_the_cookie(shop: Shop) -> None:
    cookie = {"Cookie": "bazar_admin=" + admin_cookie()}
    page = html(get(shop, "/admin", headers=cookie))
    assert TOKEN not in page  # the token is never echoed
    rid = re.search(r'action="/admin/restock/4" method="post"', page)
    assert rid
    restock_rid = re.findall(r'name="rid" value="([^"]+)"', page)[0]
    for _ in range(2):  # one rendered form is one restock, however often it is sent
        assert post_form(shop, "/admin/restock/4", {"quantity": "5", "rid": restock_rid}, cookie=True).code in (
            200, 303)
    assert stock(shop, 4) == 45
    assert post_form(shop, "/admin/price/4", {"price": "12.5"}, cookie=True).code in (200, 303)
    assert shop.api("GET", "/bazar/info/4").json()["price"] == 12.5  # read your write
    assert post_form(shop, "/admin/books", {"title": "New one", "topic": "fresh", "price": "3", "quantity": "2"},
                     cookie=True).code in (200, 303)
    assert "New one" in html(get(shop, "/?topic=fresh"))
    html(post_form(shop, "/admin/price/4", {"price": "nan"}, cookie=True), 400)
    html(post_form(shop, "/admin/books", {"title": "", "topic": "x", "price": "1", "quantity": "1"}, cookie=True), 400)
    # a form posted from another site is refused even with the cookie
    html(post_form(shop, "/admin/restock/4", {"quantity": "5"}, cookie=True,
                   headers={"Origin": "http://evil.example"}), 403)
    assert stock(shop, 4) == 45
    html(post_form(shop, "/book/4/buy", {"key": "web-1", "quantity": "2"}))
    listing = html(get(shop, "/admin/orders", headers=cookie))
    assert "Confirmed orders (1)" in listing and "How to finish Project 3 on time" in listing


def test_admin_pages_are_closed_without_a_configured_token(tmp_path: Path) -> None:
    shop = Shop(str(tmp_path), admin_token=None)
    try:
        assert "no admin token is configured" in html(post_form(shop, "/admin/login", {"token": ""}), 401)
        html(post_form(shop, "/admin/restock/1", {"quantity": "1"}, headers={"Cookie": "bazar_admin="}), 401)
    finally:
        shop.close()


# -- cluster page ----------------------------------------------------------------------------

def test_cluster_page_lists_every_replica_and_the_cache(shop: Shop) -> None:
    html(get(shop, "/book/1"))
    html(get(shop, "/book/1"))
    page = html(get(shop, "/cluster"))
    assert 'id="replicas"' in page and 'id="cache"' in page
    assert page.count(">primary<") == 2  # one per service, in the table without any script
    snap = get(shop, "/cluster.json").json()
    rows = {r["service"]: r for r in snap["replicas"]}
    assert set(rows) == {"catalog", "order"}
    assert rows["catalog"]["role"] == "primary" and rows["catalog"]["status"] == "ok"
    assert rows["catalog"]["lag"] == 0 and rows["catalog"]["epoch"] >= 1
    assert isinstance(rows["order"]["pid"], int)
    assert snap["cache"]["hits"] >= 1 and 0 < snap["cache"]["hit_rate"] <= 1


def test_cluster_page_shows_a_dead_replica_as_down(shop: Shop) -> None:
    from bazar.testing.memory import ORDER_PORT
    shop.network.kill(ORDER_PORT)
    shop.poll()
    rows = {r["service"]: r for r in get(shop, "/cluster.json").json()["replicas"]}
    assert rows["order"]["status"] == "down" and rows["order"]["lag"] is None
    assert ">down<" in html(get(shop, "/cluster"))
