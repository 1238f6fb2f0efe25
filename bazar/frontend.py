"""The front end: the public API of DESIGN.md, a versioned LRU cache for info and
search, round robin over live replicas, writes through the primaries."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from attrs import define, field
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from twisted.web.iweb import IRequest

from bazar.balancer import ReplicaSet, ReplicaState
from bazar.cache import LRUCache
from bazar.config import BazarOptions, parse_redis, parse_urls, secret_of
from bazar.errors import Invalid, Unavailable
from bazar.http.app import Created, JsonApp, Raw
from bazar.http.client import error_of, passthrough
from bazar.http.request import INTERNAL_BODY, page_of, parse_id, read_books, read_object, require_admin, require_secret
from bazar.invalidation import MAX_SEQ, Announcement, InvalidationStream, Refused, Siblings, subscribe
from bazar.messages import PURCHASE_PATH, PUSH_PATH, Purchased, PurchaseRequest
from bazar.ops import AddBook, ImportBooks, Restock, UpdatePrice, new_rid
from bazar.pages.clusterpage import install_cluster_page
from bazar.pages.storefront import install_storefront
from bazar.process import Node, serve, the_reactor
from bazar.records import (
    NewBook,
    Page,
    info_key,
    page_key,
    parse_idempotency_key,
    parse_new_book,
    parse_price,
    parse_purchase,
    parse_restock,
    search_key,
)
from bazar.settings import FrontendSettings

OPENAPI = os.path.join(os.path.dirname(__file__), "openapi.json")

# a path segment of unreserved characters and %-escapes (RFC 3986 2.3), as a search's
# topic usually comes: `search_now` takes it without Klein's routing
PLAIN_SEGMENT = re.compile(rb"(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2}){1,600}")


class Frontend:
    def __init__(self, *, catalog: ReplicaSet, order: ReplicaSet, cache: LRUCache, stream: InvalidationStream,
                 admin_token: str | None, secret: str | None, siblings: Siblings | None = None,
                 listening: dict[str, Any] | None = None):
        self.catalog = catalog
        self.order = order
        self.cache = cache
        self.stream = stream
        self.admin_token = admin_token
        self.secret = secret
        self.siblings = siblings  # the other processes on this one's port, if it shares it
        self.listening = listening or {}  # how it listens, for /health: reuse_port, internal_port
        self.order_floor = 0
        catalog.listeners.append(self._catalog_polled)

    def _catalog_polled(self, primary: ReplicaState | None) -> None:
        if primary is not None:
            self.stream.observe_primary(primary.last_seq)
        self.stream.confirm(max(self.catalog.high_water(), primary.last_seq if primary is not None else 0))

    async def poll(self) -> None:
        await DeferredList([ensureDeferred(self.catalog.poll()), ensureDeferred(self.order.poll())],
                           consumeErrors=True)

    # -- reads ----------------------------------------------------------------
    async def cached_read(self, key: str, path: str, under: str | None = None) -> tuple[int, bytes]:
        """`path`'s answer, from the cache under `key` or from a replica at least as new
        as the last invalidation of `key` (or of `under`, the list a page is filed under)."""
        hit = self.cache.get(key)
        if hit is not None:
            return 200, hit
        generation = self.cache.generation
        status, body, seq = await self.catalog.read(path, self.cache.required(under if under is not None else key))
        if status == 200:
            self.cache.put(key, body, seq, generation, under)
        return status, body

    async def info(self, book_id: int) -> tuple[int, bytes]:
        return await self.cached_read(info_key(book_id), f"/books/{book_id}")

    async def search(self, topic: str, page: Page | None = None) -> tuple[int, bytes]:
        key, path = search_key(topic), "/books?topic=" + quote(topic, safe="")
        if page is None:
            return await self.cached_read(key, path)
        # A page of a topic is cached too, filed under the topic's key: every write that
        # changes the topic's list (a new book in it) announces that key, which drops all
        # its pages at once (bazar.cache). The pages of info/all are not cached: no key
        # stands for the whole catalogue, so nothing would ever invalidate them.
        return await self.cached_read(page_key(key, page), f"{path}&{page.query()}", under=key)

    async def all_books(self, page: Page | None = None) -> tuple[int, bytes]:
        # no replica older than any write this front end made or heard of
        path = "/books" if page is None else "/books?" + page.query()
        status, body, _ = await self.catalog.read(path, max(self.stream.upto or 0, self.stream.newest))
        return status, body

    # -- writes ---------------------------------------------------------------
    async def catalog_write(self, op: AddBook | ImportBooks | UpdatePrice | Restock) -> dict[str, Any]:
        outcome = await self.catalog.write(op.to_json())
        await self.written(outcome.seq, outcome.keys)
        return outcome.result

    async def written(self, seq: int, keys: tuple[str, ...], order_seq: int | None = None) -> None:
        """A write made here, before it is answered: the catalog write's keys dropped from
        this cache and (on a shared port) from the siblings', which also learn the order
        write's index, so that the client reads its own write whichever process its next
        connection reaches."""
        self.stream.written(seq, keys)
        if self.siblings is not None:
            await self.siblings.tell(seq, keys, order_seq)

    async def import_books(self, books: tuple[NewBook, ...]) -> list[int]:
        """Add every book in one replicated write (all or nothing): their new ids, in order."""
        result = await self.catalog_write(ImportBooks(rid=new_rid(), books=tuple(book.row() for book in books)))
        ids = result.get("ids")
        if not isinstance(ids, list) or len(ids) != len(books):
            raise Unavailable("the catalog answered an import with something malformed")
        return ids

    async def purchase(self, book_id: int, quantity: int, key: str | None) -> dict[str, Any]:
        # Without a client key, make one: the retries below must never buy twice.
        key = "client:" + key if key is not None else new_rid()
        status, answer = await self.order.post(PURCHASE_PATH, PurchaseRequest(book_id, quantity, key).to_json())
        if status != 200:
            raise error_of(status, answer)
        try:
            purchased = Purchased.from_json(answer)
        except Invalid:
            raise Unavailable("the order service answered a purchase with something malformed") from None
        # read-your-writes for orders: no order replica older than this purchase
        self.order_floor = max(self.order_floor, purchased.seq)
        await self.written(purchased.catalog_seq, purchased.catalog_keys, order_seq=purchased.seq)
        return {"order": purchased.order}

    async def orders(self, page: Page | None = None) -> tuple[int, bytes]:
        headers = {b"Authorization": b"Bearer " + (self.admin_token or "").encode()}
        path = "/orders" if page is None else "/orders?" + page.query()
        status, body, _ = await self.order.read(path, self.order_floor, headers=headers)
        return status, body


class FrontendFigures(Collector):
    """What a front end counts and sees, read at scrape time (the cache keeps plain
    ints: nothing more on the hot path): its cache, whether it knows each service's
    primary, and the invalidation messages it did not take (unsigned, forged,
    malformed, oversized, or naming writes no replica confirmed), by reason."""

    def __init__(self, fe: Frontend):
        self.fe = fe

    def collect(self) -> Iterator[Metric]:
        cache = self.fe.cache
        yield CounterMetricFamily("bazar_cache_hits", "reads answered from the front end's cache", value=cache.hits)
        yield CounterMetricFamily("bazar_cache_misses", "cacheable reads the cache could not answer",
                                  value=cache.misses)
        yield CounterMetricFamily("bazar_cache_evictions", "entries the cache dropped to stay within its capacity",
                                  value=cache.evictions)
        yield GaugeMetricFamily("bazar_cache_entries", "entries in the cache", value=len(cache.entries))
        known = GaugeMetricFamily("bazar_service_primary_known", "1 while this front end's health checks know "
                                  "the service's primary, else 0", labels=["service"])
        for replicas in (self.fe.catalog, self.fe.order):
            known.add_metric([replicas.service], 1.0 if replicas.primary_state() is not None else 0.0)
        yield known
        dropped = CounterMetricFamily("bazar_invalidations_dropped", "invalidation messages not taken",
                                      labels=["reason"])
        for reason, n in sorted(self.fe.stream.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped


def frontend_app(fe: Frontend) -> JsonApp:
    api = JsonApp("frontend")
    token = fe.admin_token

    @api.route("/health", "GET", "health")
    def health(request: IRequest) -> dict[str, Any]:
        def view(rs: ReplicaSet) -> list[dict[str, Any]]:
            return [{"url": r.url, "alive": r.alive, "ok": r.ok, "primary": r.primary, "last_seq": r.last_seq}
                    for r in rs.replicas]
        primary = fe.catalog.primary_state()
        return {"service": "frontend", "replica": 0, "pid": os.getpid(), "role": "frontend", "status": "ok",
                # like every /health, epoch and last_seq (here: the catalog's, as this front end sees it)
                "epoch": primary.epoch if primary is not None else 0, "last_seq": fe.stream.upto or 0,
                "catalog": view(fe.catalog), "order": view(fe.order), "cache": fe.cache.stats(),
                "cache_bypass": fe.cache.bypass, **fe.listening}

    @api.route("/ready", "GET", "ready")
    def ready(request: IRequest) -> dict[str, Any]:
        # What a load balancer needs before sending clients here: a primary for every
        # write, and (with Redis) the invalidations that keep the cache honest.
        missing = [rs.service for rs in (fe.catalog, fe.order) if rs.primary_state() is None]
        if missing:
            raise Unavailable(f"no {' or '.join(missing)} primary known")
        if fe.stream.channel_down:
            raise Unavailable("the invalidation channel (Redis) is not subscribed")
        return {"ready": True, "service": "frontend"}

    # the reads whose answer is a whole representation carry an ETag of it (If-None-Match: 304)
    @api.route("/bazar/info/all", "GET", "info_all", etag=True)
    async def info_all(request: IRequest) -> tuple[int, bytes]:
        return passthrough(*await fe.all_books(page_of(request)))

    @api.route("/bazar/info/<string:book_id>", "GET", "info", etag=True)
    async def info(request: IRequest, book_id: str) -> tuple[int, bytes]:
        return passthrough(*await fe.info(parse_id(book_id)))

    def info_now(request: IRequest, rest: bytes) -> Any:
        """GET /bazar/info/{id} without Klein's routing: from the cache, or (a miss)
        straight to the read; a path that is not a plain id goes the normal way."""
        if not rest.isdigit() or len(rest) > 18:
            return None
        hit: bytes | None = fe.cache.hit(info_key(int(rest)))
        if hit is not None:
            return hit
        return info(request, rest.decode("ascii"))

    api.fast("GET", "/bazar/info/", "info", info_now, etag=True, bare=True)

    @api.route("/bazar/search/<text:topic>", "GET", "search", etag=True)
    async def search(request: IRequest, topic: str) -> tuple[int, bytes]:
        return passthrough(*await fe.search(topic, page_of(request)))

    def search_now(request: IRequest, rest: bytes) -> Any:
        """GET /bazar/search/{topic} without Klein's routing, for a topic of one plain
        path segment (letters, digits, `-._~` and %-escapes of anything but "/"); any
        other goes the normal way, which knows every other form."""
        if not PLAIN_SEGMENT.fullmatch(rest):
            return None
        try:
            topic = unquote_to_bytes(rest).decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "/" in topic:
            return None
        if b"?" not in request.uri:
            hit: bytes | None = fe.cache.hit(search_key(topic))
            if hit is not None:
                return hit
        return search(request, topic)

    api.fast("GET", "/bazar/search/", "search", search_now, etag=True, bare=True)

    @api.route("/bazar/purchase/<string:book_id>", "POST", "purchase")
    async def purchase(request: IRequest, book_id: str) -> dict[str, Any]:
        ident = parse_id(book_id)
        quantity = parse_purchase(read_object(request, optional=True))
        key = parse_idempotency_key(request.getHeader(b"Idempotency-Key"))
        return await fe.purchase(ident, quantity, key)

    def purchase_now(request: IRequest, rest: bytes) -> Any:
        """POST /bazar/purchase/{id} without Klein's routing (a path that is not a plain
        id goes the normal way, which answers it)."""
        if not rest.isdigit() or len(rest) > 18:
            return None
        return purchase(request, rest.decode("ascii"))

    api.fast("POST", "/bazar/purchase/", "purchase", purchase_now, bare=True)

    @api.route("/bazar/update_price/<string:book_id>", "PUT", "update_price")
    async def update_price(request: IRequest, book_id: str) -> dict[str, Any]:
        require_admin(request, token)
        ident = parse_id(book_id)
        price = parse_price(read_object(request) or {})
        return await fe.catalog_write(UpdatePrice(rid=new_rid(), id=ident, price=price))

    @api.route("/bazar/restock/<string:book_id>", "POST", "restock")
    async def restock(request: IRequest, book_id: str) -> dict[str, Any]:
        require_admin(request, token)
        ident = parse_id(book_id)
        quantity = parse_restock(read_object(request) or {})
        return await fe.catalog_write(Restock(rid=new_rid(), id=ident, quantity=quantity))

    @api.route("/bazar/books", "POST", "add_book")
    async def add_book(request: IRequest) -> Created:
        require_admin(request, token)
        new = parse_new_book(read_object(request) or {})
        book = await fe.catalog_write(AddBook(rid=new_rid(), title=new.title, topic=new.topic, price=new.price,
                                              quantity=new.quantity))
        return Created(f"/bazar/info/{book['id']}", book)

    @api.route("/bazar/books/import", "POST", "import_books")
    async def import_books(request: IRequest) -> tuple[int, dict[str, Any]]:
        require_admin(request, token)
        books = read_books(request)  # every row checked before anything is written
        return 201, {"ids": await fe.import_books(books)}

    @api.route("/bazar/orders", "GET", "orders")
    async def orders(request: IRequest) -> tuple[int, bytes]:
        require_admin(request, token)
        return passthrough(*await fe.orders(page_of(request, "order")))

    @api.route("/bazar/cache/<string:book_id>", "DELETE", "cache_drop")
    def cache_drop(request: IRequest, book_id: str) -> dict[str, Any]:
        require_admin(request, token)
        ident = parse_id(book_id)
        return {"dropped": fe.cache.drop(info_key(ident)), "id": ident}

    @api.route("/bazar/cache", "GET", "cache")
    def cache_stats(request: IRequest) -> dict[str, int]:
        return fe.cache.stats()

    with open(OPENAPI, "rb") as f:
        spec = f.read()

    @api.route("/openapi.json", "GET", "openapi")
    def openapi(request: IRequest) -> Raw:
        return Raw(spec, b"application/json")

    @api.rpc(PUSH_PATH, "POST", "invalidate", bare=True)
    def invalidate(request: IRequest) -> dict[str, Any]:
        require_secret(request, fe.secret)
        # (a push may hold an import's keys, a key per book: the limit of internal doors)
        body = read_object(request, limit=INTERNAL_BODY) or {}
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise Invalid("expected {\"messages\": [{\"seq\", \"keys\"}, ...]}")
        try:
            announced = [Announcement.from_json(message) for message in messages]
        except Refused:
            raise Invalid("each message needs an integer seq and a list of keys") from None
        # a purchase made through a sibling on this port: its order's index (bazar.invalidation.Siblings)
        order_seq = body.get("order_seq")
        if order_seq is not None and (type(order_seq) is not int or not 0 <= order_seq < MAX_SEQ):
            raise Invalid("order_seq must be a log index")
        for announcement in announced:
            fe.stream.receive(announcement.seq, announcement.keys)
        if order_seq is not None:
            fe.order_floor = max(fe.order_floor, order_seq)
        return {"ok": True, "upto": fe.stream.upto}

    api.registry.register(FrontendFigures(fe))

    # the browser pages: storefront at / and the live cluster page
    install_storefront(api, fe)
    install_cluster_page(api, fe)
    return api


@define
class FrontendNode(Node):
    frontend: Frontend = field(kw_only=True)
    app: JsonApp = field(kw_only=True)


def build_frontend(settings: FrontendSettings, *, clock: IReactorTime, http: HTTPClient,
                   reactor: Any = None) -> FrontendNode:
    """A front end: the replica sets of both services, the cache and its invalidation
    stream, its app; with a Redis URL (and a `reactor` to connect with), the
    subscription to the invalidation channel once it starts."""
    catalog = ReplicaSet("catalog", settings.catalog, http, clock, settings.secret, settings.catalog_client)
    order = ReplicaSet("order", settings.order, http, clock, settings.secret, settings.order_client)
    cache = LRUCache(settings.cache_size)
    stream = InvalidationStream(cache, clock, grace=settings.invalidation_grace, secret=settings.secret)
    siblings = (Siblings(http=http, clock=clock, secret=settings.secret, urls=settings.siblings,
                         timeout=settings.sibling_timeout) if settings.siblings else None)
    fe = Frontend(catalog=catalog, order=order, cache=cache, stream=stream, admin_token=settings.admin_token,
                  secret=settings.secret, siblings=siblings,
                  listening={"reuse_port": settings.reuse_port, "internal_port": settings.internal_port})
    app = frontend_app(fe)
    subscriber: list[Any] = []

    def start() -> None:
        if settings.redis:
            subscriber.append(subscribe(reactor, settings.redis, stream))

    def stop() -> None:
        for factory in subscriber:
            factory.disconnect()

    return FrontendNode(app.resource(), on_start=[start], on_stop=[stop],
                        periodic=[(settings.poll_every, lambda: ensureDeferred(fe.poll()), "the health check")],
                        frontend=fe, app=app)


class Options(BazarOptions):
    optParameters = [
        ["port", None, 5000, "Port to listen on.", int],
        ["catalog", None, "http://127.0.0.1:5101", "Catalog replicas: http://h:p,..."],
        ["order", None, "http://127.0.0.1:5201", "Order replicas: http://h:p,..."],
        ["cache-size", None, 1024, "Entries in the LRU cache (0: no cache).", int],
        ["redis", None, None, "Redis URL to receive invalidations from, e.g. redis://127.0.0.1:6379."],
        ["internal-port", None, None, "A port of this process alone, beside --port (the same doors): where the "
                                      "catalog pushes invalidations, and health checks and scrapes reach this "
                                      "very process when --port is shared.", int],
        ["siblings", None, "", "The other front ends sharing --port, by their own URLs (http://h:internal-port,...): "
                               "a write made here drops its keys from their caches before it is answered."],
    ]
    optFlags: list[list[Any]] = [
        ["reuse-port", None, "Listen on --port with SO_REUSEPORT (Linux): front ends started with it share the "
                             "port, the kernel spreading new connections across them."],
    ]

    def postOptions(self) -> None:
        if self["cache-size"] < 0:
            raise usage.UsageError("--cache-size must be 0 or more")
        if self["reuse-port"] and not hasattr(socket, "SO_REUSEPORT"):
            raise usage.UsageError("--reuse-port: this system has no SO_REUSEPORT")
        internal = self["internal-port"]
        if internal is not None and (not 0 < internal < 65536 or internal == self["port"]):
            raise usage.UsageError(f"--internal-port {internal}: expected a port (1-65535) other than --port")
        self.settings = FrontendSettings(catalog=tuple(parse_urls(self["catalog"])),
                                         order=tuple(parse_urls(self["order"])), cache_size=self["cache-size"],
                                         redis=parse_redis(self["redis"]), secret=secret_of(self, "cluster-secret"),
                                         admin_token=secret_of(self, "admin-token"),
                                         reuse_port=bool(self["reuse-port"]), internal_port=internal,
                                         siblings=tuple(parse_urls(self["siblings"])))


def makeService(options: Options, reactor: Any = None) -> MultiService:
    reactor = the_reactor(reactor)
    settings = options.settings
    return serve(lambda clock, http: build_frontend(settings, clock=clock, http=http, reactor=reactor),
                 options, reactor, reuse_port=settings.reuse_port, internal_port=settings.internal_port)
