"""The front end: the public API of DESIGN.md, a versioned LRU cache for info and
search, round robin over live replicas, writes through the primaries."""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable
from urllib.parse import quote

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.python import usage

from bazar.balancer import ReplicaSet
from bazar.books import parse_idempotency_key, parse_new_book, parse_price, parse_purchase, parse_restock
from bazar.cache import LRUCache
from bazar.client import error_of
from bazar.invalidation import InvalidationStream, Refused, announcement
from bazar.service import BazarOptions
from bazar.web import HTTPError, JsonApp, Raw, dumps, loads, parse_id, read_object, require_admin, require_secret

OPENAPI = os.path.join(os.path.dirname(__file__), "openapi.json")


class Frontend:
    def __init__(self, *, catalog: ReplicaSet, order: ReplicaSet, cache: LRUCache, stream: InvalidationStream,
                 admin_token: str | None, secret: str | None):
        self.catalog = catalog
        self.order = order
        self.cache = cache
        self.stream = stream
        self.admin_token = admin_token
        self.secret = secret
        self.order_floor = 0
        catalog.listeners.append(self._catalog_polled)

    def _catalog_polled(self, primary: Any) -> None:
        if primary is not None:
            self.stream.observe_primary(primary.last_seq)
        self.stream.confirm(max(self.catalog.high_water(), primary.last_seq if primary is not None else 0))

    async def poll(self) -> None:
        await DeferredList([ensureDeferred(self.catalog.poll()), ensureDeferred(self.order.poll())],
                           consumeErrors=True)

    # -- reads ----------------------------------------------------------------
    async def cached_read(self, key: str, path: str) -> tuple[int, bytes]:
        hit = self.cache.get(key)
        if hit is not None:
            return 200, hit
        generation = self.cache.generation
        status, body, seq = await self.catalog.read(path, self.cache.required(key))
        if status == 200:
            self.cache.put(key, body, seq, generation)
        return status, body

    async def info(self, book_id: int) -> tuple[int, bytes]:
        return await self.cached_read(f"info:{book_id}", f"/books/{book_id}")

    async def search(self, topic: str) -> tuple[int, bytes]:
        return await self.cached_read(f"search:{topic}", "/books?topic=" + quote(topic, safe=""))

    async def all_books(self) -> tuple[int, bytes]:
        # no replica older than any write this front end made or heard of
        status, body, _ = await self.catalog.read("/books", max(self.stream.upto or 0, self.stream.newest))
        return status, body

    # -- writes ---------------------------------------------------------------
    async def catalog_write(self, op: dict[str, Any]) -> dict[str, Any]:
        op.setdefault("rid", "fe:" + uuid.uuid4().hex)  # a storefront form brings its own: sent twice, done once
        outcome = await self.catalog.write(op)
        self.stream.written(outcome.seq, list(outcome.keys))  # read-your-writes
        return outcome.result

    async def purchase(self, book_id: int, quantity: int, key: str | None) -> dict[str, Any]:
        # Without a client key, make one: the retries below must never buy twice.
        key = "client:" + key if key is not None else "fe:" + uuid.uuid4().hex
        status, answer = await self.order.post("/internal/purchase",
                                               {"book_id": book_id, "quantity": quantity, "key": key})
        if status != 200 or not isinstance(answer, dict) or "order" not in answer:
            raise error_of(status if status != 200 else 502, answer)
        catalog = answer.get("catalog") or {}
        self.stream.written(int(catalog.get("seq", 0)), [str(k) for k in catalog.get("keys", [])])
        # read-your-writes for orders: no order replica older than this purchase
        self.order_floor = max(self.order_floor, int(answer.get("seq", 0)))
        return {"order": answer["order"]}

    async def orders(self) -> tuple[int, bytes]:
        headers = {b"Authorization": b"Bearer " + (self.admin_token or "").encode()}
        status, body, _ = await self.order.read("/orders", self.order_floor, headers=headers)
        return status, body


def passthrough(status: int, body: bytes) -> tuple[int, bytes]:
    """A replica's answer as ours: JSON bodies unchanged, anything else made JSON."""
    if status >= 400:
        try:
            parsed = loads(body)
        except Exception:
            parsed = None
        raise error_of(status, parsed)
    return status, body


def frontend_app(fe: Frontend) -> JsonApp:
    api = JsonApp("frontend")
    token = fe.admin_token

    @api.route("/health", "GET", "health")
    def health(request: Any) -> dict[str, Any]:
        def view(rs: ReplicaSet) -> list[dict[str, Any]]:
            return [{"url": r.url, "alive": r.alive, "ok": r.ok, "primary": r.primary, "last_seq": r.last_seq}
                    for r in rs.replicas]
        primary = fe.catalog.primary_state()
        return {"service": "frontend", "replica": 0, "pid": os.getpid(), "role": "frontend", "status": "ok",
                # CLI.md: every /health has epoch and last_seq (here: the catalog's, as this front end sees it)
                "epoch": primary.epoch if primary is not None else 0, "last_seq": fe.stream.upto or 0,
                "catalog": view(fe.catalog), "order": view(fe.order), "cache": fe.cache.stats(),
                "cache_bypass": fe.cache.bypass}

    @api.route("/ready", "GET", "ready")
    def ready(request: Any) -> dict[str, Any]:
        # What a load balancer needs before sending clients here: a primary for every
        # write, and (with Redis) the invalidations that keep the cache honest.
        missing = [rs.service for rs in (fe.catalog, fe.order) if rs.primary_state() is None]
        if missing:
            raise HTTPError(503, f"no {' or '.join(missing)} primary known", {b"Retry-After": b"1"})
        if fe.stream.channel_down:
            raise HTTPError(503, "the invalidation channel (Redis) is not subscribed", {b"Retry-After": b"1"})
        return {"ready": True, "service": "frontend"}

    @api.route("/bazar/info/all", "GET", "info_all")
    async def info_all(request: Any) -> tuple[int, bytes]:
        return passthrough(*await fe.all_books())

    @api.route("/bazar/info/<string:book_id>", "GET", "info")
    async def info(request: Any, book_id: str) -> tuple[int, bytes]:
        return passthrough(*await fe.info(parse_id(book_id)))

    @api.route("/bazar/search/<text:topic>", "GET", "search")
    async def search(request: Any, topic: str) -> tuple[int, bytes]:
        return passthrough(*await fe.search(topic))

    @api.route("/bazar/purchase/<string:book_id>", "POST", "purchase")
    async def purchase(request: Any, book_id: str) -> dict[str, Any]:
        ident = parse_id(book_id)
        quantity = parse_purchase(read_object(request, optional=True))
        key = parse_idempotency_key(request.getHeader(b"Idempotency-Key"))
        return await fe.purchase(ident, quantity, key)

    @api.route("/bazar/update_price/<string:book_id>", "PUT", "update_price")
    async def update_price(request: Any, book_id: str) -> dict[str, Any]:
        require_admin(request, token)
        ident = parse_id(book_id)
        price = parse_price(read_object(request) or {})
        return await fe.catalog_write({"op": "update_price", "id": ident, "price": price})

    @api.route("/bazar/restock/<string:book_id>", "POST", "restock")
    async def restock(request: Any, book_id: str) -> dict[str, Any]:
        require_admin(request, token)
        ident = parse_id(book_id)
        quantity = parse_restock(read_object(request) or {})
        return await fe.catalog_write({"op": "restock", "id": ident, "quantity": quantity})

    @api.route("/bazar/books", "POST", "add_book")
    async def add_book(request: Any) -> tuple[int, dict[str, Any]]:
        require_admin(request, token)
        new = parse_new_book(read_object(request) or {})
        book = await fe.catalog_write({"op": "add_book", "title": new.title, "topic": new.topic,
                                       "price": new.price, "quantity": new.quantity})
        return 201, book

    @api.route("/bazar/orders", "GET", "orders")
    async def orders(request: Any) -> tuple[int, bytes]:
        require_admin(request, token)
        return passthrough(*await fe.orders())

    @api.route("/bazar/cache/<string:book_id>", "DELETE", "cache_drop")
    def cache_drop(request: Any, book_id: str) -> dict[str, Any]:
        require_admin(request, token)
        ident = parse_id(book_id)
        return {"dropped": fe.cache.drop(f"info:{ident}"), "id": ident}

    @api.route("/bazar/cache", "GET", "cache")
    def cache_stats(request: Any) -> dict[str, int]:
        return fe.cache.stats()

    def info_hit(request: Any, rest: bytes) -> bytes | None:
        """GET /bazar/info/{id} answered from the cache without Klein's routing; a
        miss (or anything unusual) goes the normal way."""
        if not rest.isdigit() or len(rest) > 18:
            return None
        return fe.cache.hit(f"info:{int(rest)}")  # type: ignore[no-any-return]

    api.shortcut(b"GET", b"/bazar/info/", "info", info_hit)
    # purchases too skip Klein's routing (the same handler, the same answers)
    api.shortcut(b"POST", b"/bazar/purchase/", "purchase",
                 lambda request, rest: purchase(request, rest.decode()) if rest.isdigit() and len(rest) <= 18
                 else None)

    with open(OPENAPI, "rb") as f:
        spec = f.read()

    @api.route("/openapi.json", "GET", "openapi")
    def openapi(request: Any) -> Raw:
        return Raw(spec, b"application/json")

    @api.route("/internal/invalidate", "POST", "invalidate")
    def invalidate(request: Any) -> dict[str, Any]:
        require_secret(request, fe.secret)
        body = read_object(request) or {}
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise HTTPError(400, "expected {\"messages\": [{\"seq\", \"keys\"}, ...]}")
        try:
            announced = [announcement(message) for message in messages]
        except Refused:
            raise HTTPError(400, "each message needs an integer seq and a list of keys") from None
        for seq, keys in announced:
            fe.stream.receive(seq, keys)
        return {"ok": True, "upto": fe.stream.upto}

    from prometheus_client import Gauge

    def figure(name: str) -> Callable[[], float]:
        return lambda: float(fe.cache.stats()[name])

    for name in ("hits", "misses", "evictions", "size"):
        Gauge(f"bazar_cache_{name}", f"front-end cache {name}", registry=api.registry).set_function(figure(name))

    from prometheus_client.core import CounterMetricFamily

    class Dropped:
        """Invalidation messages not taken (unsigned, forged, malformed, oversized, or
        naming writes no replica confirmed), by reason."""

        def collect(self) -> Any:
            family = CounterMetricFamily("bazar_invalidations_dropped", "invalidation messages not taken",
                                         labels=["reason"])
            for reason, n in sorted(fe.stream.dropped.items()):
                family.add_metric([reason], n)
            yield family

    api.registry.register(Dropped())  # type: ignore[arg-type]

    # the browser pages: storefront at / and the live cluster page (imported here: they import this module)
    from bazar.clusterpage import install_cluster_page
    from bazar.storefront import install_storefront
    install_storefront(api, fe)
    install_cluster_page(api, fe)
    return api


class Options(BazarOptions):
    optParameters = [
        ["port", None, 5000, "Port to listen on.", int],
        ["catalog", None, "http://127.0.0.1:5101", "Catalog replicas: http://h:p,..."],
        ["order", None, "http://127.0.0.1:5201", "Order replicas: http://h:p,..."],
        ["cache-size", None, 1024, "Entries in the LRU cache (0: no cache).", int],
        ["redis", None, None, "Redis URL to receive invalidations from, e.g. redis://127.0.0.1:6379."],
    ]

    def postOptions(self) -> None:
        if self["cache-size"] < 0:
            raise usage.UsageError("--cache-size must be 0 or more")


def makeService(options: usage.Options) -> MultiService:
    from twisted.internet import reactor

    from bazar.client import make_http
    from bazar.invalidation import subscribe
    from bazar.service import Hooks, listen, parse_urls, secret_of, watch_parent

    secret = secret_of(options, "cluster-secret")
    parent = MultiService()
    http, pool = make_http(reactor)
    catalog = ReplicaSet("catalog", parse_urls(options["catalog"]), http, reactor, secret)
    order = ReplicaSet("order", parse_urls(options["order"]), http, reactor, secret, write_budget=15.0)
    cache = LRUCache(options["cache-size"])
    stream = InvalidationStream(cache, reactor, secret=secret)
    fe = Frontend(catalog=catalog, order=order, cache=cache, stream=stream,
                  admin_token=secret_of(options, "admin-token"), secret=secret)
    listen(parent, reactor, frontend_app(fe).resource(), options["host"], options["port"])
    TimerService(0.25, lambda: ensureDeferred(fe.poll())).setServiceParent(parent)
    subscriber: list[Any] = []

    def start() -> None:
        if options["redis"]:
            subscriber.append(subscribe(reactor, options["redis"], stream))

    def stop() -> Any:
        for factory in subscriber:
            factory.disconnect()
        return pool.closeCachedConnections()

    Hooks(on_start=start, on_stop=stop).setServiceParent(parent)
    watch_parent(parent, reactor)
    return parent


__all__ = ["Frontend", "frontend_app", "Options", "makeService", "dumps"]
