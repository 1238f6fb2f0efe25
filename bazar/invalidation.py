"""Cache invalidation between the catalog primary and the front ends.

The catalog primary announces every committed write as {"seq", "keys"}: pushed over
HTTP to the configured front ends and, with a Redis URL, published on a Redis
pub/sub channel. Because every write is announced, the announcements form a gap-free
sequence; the front end's `InvalidationStream` notices a gap (a lost message, a
primary that died before announcing, a broken channel) and flushes the cache rather
than risk serving stale data.

Redis is outside the cluster's secret, so every message published there is signed:
HMAC-SHA256 with the cluster secret over (seq, keys, the sender's epoch). A front end
drops (and counts) unsigned, forged, malformed or oversized messages. And no message
may hold the cache's floors above what a catalog replica has confirmed for long: a
floor no replica can serve would turn every read into a 503 (`InvalidationStream`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import txredisapi
from attrs import frozen
from treq.client import HTTPClient
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from bazar.cache import LRUCache
from bazar.codec import JSONDecodeError, dumps, loads
from bazar.http.client import Unreachable, call
from bazar.messages import PUSH_PATH
from bazar.replication.store import Outcome

log = Logger()

CHANNEL = "bazar:invalidations"
MAX_QUEUE = 10_000
MAX_MESSAGE = 64 * 1024  # bytes of one Redis message
MAX_KEYS = 1_000  # keys in one announcement
MAX_KEY = 300  # characters of one cache key
MAX_SEQ = 2**62
ANNOUNCED_BYTES = 24 * 1024  # bytes of keys in one announcement (signed, it stays well under MAX_MESSAGE)
PUSH_MESSAGES = 1_000  # announcements in one push ...
PUSH_BYTES = 256 * 1024  # ... and about this many bytes of keys (a write's announcements never split)


class Refused(ValueError):
    """An invalidation message that is not taken (the reason is its text)."""


def signature(secret: str, seq: int, keys: list[str], epoch: int) -> str:
    return hmac.new(secret.encode(), dumps([seq, keys, epoch]), hashlib.sha256).hexdigest()


@frozen
class Announcement:
    """A committed catalog write, as the front ends hear of it: its log index and the
    cache keys it changed."""

    seq: int
    keys: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "keys": list(self.keys)}

    def signed_json(self, secret: str, epoch: int) -> dict[str, Any]:
        """The form published on Redis, signed with the cluster secret."""
        return {**self.to_json(), "epoch": epoch, "sig": signature(secret, self.seq, list(self.keys), epoch)}

    @classmethod
    def from_json(cls, data: Any) -> Announcement:
        """Or Refused: seq a non-negative integer, keys a list of at most MAX_KEYS
        strings of at most MAX_KEY characters."""
        if not isinstance(data, dict):
            raise Refused("not an object")
        seq, keys = data.get("seq"), data.get("keys")
        if type(seq) is not int or not 0 <= seq < MAX_SEQ:
            raise Refused("seq is not a log index")
        if not isinstance(keys, list) or len(keys) > MAX_KEYS \
                or not all(isinstance(k, str) and len(k) <= MAX_KEY for k in keys):
            raise Refused("keys are not a list of cache keys")
        return cls(seq, tuple(keys))


def signed(raw: bytes, secret: str | None) -> Announcement:
    """The announcement of a Redis message, or Refused: too large, not JSON, malformed,
    or not signed with this cluster's secret."""
    if len(raw) > MAX_MESSAGE:
        raise Refused("oversized")
    try:
        data = loads(raw)
    except JSONDecodeError:
        raise Refused("not JSON") from None
    announced = Announcement.from_json(data)
    epoch, sig = data.get("epoch"), data.get("sig")
    if not secret or type(epoch) is not int or not isinstance(sig, str) \
            or not hmac.compare_digest(sig, signature(secret, announced.seq, list(announced.keys), epoch)):
        raise Refused("bad signature")
    return announced


def announcements(seq: int, keys: tuple[str, ...]) -> list[Announcement]:
    """A committed write as the front ends hear of it: one announcement, or, when its
    keys would not fit one message (an import changes a key per book), several of the
    same seq, each within MAX_KEYS keys and ANNOUNCED_BYTES. A front end takes any of
    them as the write's; the publisher sends them together (one push, consecutive
    Redis messages), so a front end gets all of them or sees the write missing."""
    if len(keys) <= 8:
        return [Announcement(seq, keys)]
    parts: list[Announcement] = []
    part: list[str] = []
    size = 0
    for key in keys:
        n = len(dumps(key)) + 1
        if part and (len(part) >= MAX_KEYS or size + n > ANNOUNCED_BYTES):
            parts.append(Announcement(seq, tuple(part)))
            part, size = [], 0
        part.append(key)
        size += n
    parts.append(Announcement(seq, tuple(part)))
    return parts


def next_push(queue: list[dict[str, Any]]) -> int:
    """How many announcements at the head of `queue` go in the next push: up to
    PUSH_MESSAGES and about PUSH_BYTES, never splitting one write's announcements."""
    size = taken = 0
    for message in queue:
        if taken and message["seq"] != queue[taken - 1]["seq"] \
                and (taken >= PUSH_MESSAGES or size >= PUSH_BYTES):
            break
        size += sum(len(key) + 3 for key in message["keys"])
        taken += 1
    return taken


def redis_address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.scheme != "redis" or not parsed.hostname:
        raise ValueError("bad Redis URL: expected redis://[[user]:password@]host:port")
    return parsed.hostname, parsed.port or 6379


def redis_credentials(url: str) -> tuple[str | None, str | None]:
    """(user, password) from redis://user:password@host:port (ACL) or
    redis://:password@host:port (requirepass); without a password in the URL, the
    password in BAZAR_REDIS_PASSWORD (a secret, like the cluster secret), if any."""
    parsed = urlparse(url)
    password = unquote(parsed.password) if parsed.password else os.environ.get("BAZAR_REDIS_PASSWORD") or None
    return (unquote(parsed.username) if parsed.username else None), password


class Publisher:
    """Catalog side: announce committed writes to every front end."""

    def __init__(self, *, http: HTTPClient, clock: IReactorTime, secret: str | None,
                 frontends: list[str] | tuple[str, ...], redis_url: str | None,
                 epoch: Callable[[], int] = lambda: 0, push_delay: float = 0.001):
        self.epoch = epoch
        self.push_delay = push_delay
        self.http = http
        self.clock = clock
        self.secret = secret
        self.queues: dict[str, list[dict[str, Any]]] = {url: [] for url in frontends}  # announcements, as JSON
        self.sending: set[str] = set()
        self.redis_url = redis_url
        self.redis: Any = None
        self.running = False

    def start(self) -> None:
        self.running = True
        if self.redis_url:
            host, port = redis_address(self.redis_url)
            user, password = redis_credentials(self.redis_url)
            self.redis = txredisapi.lazyConnection(host, port, reconnect=True, username=user, password=password)

    def stop(self) -> Any:
        self.running = False
        if self.redis is not None:
            return self.redis.disconnect()
        return None

    def committed(self, outcome: Outcome) -> None:
        parts = announcements(outcome.seq, outcome.keys)
        messages = [announced.to_json() for announced in parts]
        for url, queue in self.queues.items():
            queue.extend(messages)
            if len(queue) > MAX_QUEUE:
                # the front end will see the gap and flush; cut between two writes, never
                # inside one (the rest of a write's keys would pass for all of them)
                cut = len(queue) - MAX_QUEUE
                while cut < len(queue) and queue[cut]["seq"] == queue[cut - 1]["seq"]:
                    cut += 1
                del queue[:cut]
            if url not in self.sending:
                self.sending.add(url)
                # a moment later: the write's own answer leaves first, and the writes of
                # that moment travel together
                self.clock.callLater(self.push_delay, self._start_drain, url)
        if self.redis is not None:
            for announced in parts:
                d = self.redis.publish(CHANNEL, dumps(announced.signed_json(self.secret or "", self.epoch())).decode())
                d.addErrback(lambda f: log.warn("redis publish failed: {why}", why=f.getErrorMessage()))

    def _start_drain(self, url: str) -> None:
        ensureDeferred(self._drain(url)).addErrback(lambda f: log.failure("push failed", f))

    async def _drain(self, url: str) -> None:
        queue = self.queues[url]
        failures = 0
        try:
            while queue and self.running:
                batch = queue[:next_push(queue)]
                try:
                    status, _, _ = await call(self.http, self.clock, "POST", url + PUSH_PATH,
                                              body={"messages": batch}, secret=self.secret, timeout=1.0)
                except Unreachable:
                    status = 0
                if status == 200:
                    failures = 0
                    del queue[: len(batch)]
                    continue
                failures += 1
                if failures >= 3:
                    del queue[: len(batch)]  # the front end is away; it will notice the gap
                    failures = 0
                await deferLater(self.clock, 0.25)
        finally:
            self.sending.discard(url)


class Siblings:
    """Front-end side, for front end processes that share one port (SO_REUSEPORT): a
    write made through one of them is announced to the others, at their own ports,
    before it is answered (a purchase's order index with it). The client's next request
    may open a connection that the kernel hands to another process of the port; that
    process has dropped the write's keys by then, and reads no order replica older than
    the purchase, so reads through the port see their own writes as through one front
    end. (The catalog primary's push reaches every process too, but a moment
    after the write's answer: this closes that moment.) A sibling that does not take
    the announcement within `timeout` is left to the push and to its gap detection,
    as a front end on a port of its own would be."""

    def __init__(self, *, http: HTTPClient, clock: IReactorTime, secret: str | None, urls: tuple[str, ...],
                 timeout: float = 0.5):
        self.http = http
        self.clock = clock
        self.secret = secret
        self.urls = urls
        self.timeout = timeout
        self.missed: Counter[str] = Counter()  # writes a sibling did not take, by its URL
        self.away: set[str] = set()  # siblings whose last announcement failed (said once, not per write)

    async def tell(self, seq: int, keys: Iterable[str], order_seq: int | None = None) -> None:
        """Announce a committed catalog write (and, for a purchase, the index of its order)
        to every sibling; return when each took it (or failed to)."""
        if not self.urls:
            return
        messages = [announced.to_json() for announced in announcements(seq, tuple(keys))]
        extra = {} if order_seq is None else {"order_seq": order_seq}
        await DeferredList([ensureDeferred(self._tell(url, messages, extra)) for url in self.urls],
                           consumeErrors=True)

    async def _tell(self, url: str, messages: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        while messages:
            taken = next_push(messages)
            try:
                status, _, _ = await call(self.http, self.clock, "POST", url + PUSH_PATH,
                                          body={"messages": messages[:taken], **extra}, secret=self.secret,
                                          timeout=self.timeout)
            except Unreachable:
                status = 0
            if status != 200:
                if url not in self.away:
                    self.away.add(url)
                    log.warn("front end {url} did not take a write's invalidation ({status}); the catalog's "
                             "push and its gap detection are left to cover it", url=url, status=status or "no answer")
                self.missed[url] += 1
                return
            messages = messages[taken:]
        if url in self.away:
            self.away.discard(url)
            log.info("front end {url} takes writes' invalidations again", url=url)


class InvalidationStream:
    """Front-end side: apply announcements to the cache and watch the sequence for gaps.

    `upto` is the highest seq up to which every announcement has been seen. A missing
    seq that has not arrived within `grace` seconds, or a catalog primary whose
    last_seq (seen by health checks) stays ahead of `upto` for `grace` seconds, means
    an announcement was lost: the cache is flushed.
    """

    def __init__(self, cache: LRUCache, clock: IReactorTime, grace: float = 1.0, secret: str | None = None):
        self.secret = secret
        self.dropped: Counter[str] = Counter()  # messages not taken, by reason
        self.confirmed: int | None = None  # the highest seq a catalog replica has reported
        self.unconfirmed_since: float | None = None  # since when `newest` is above `confirmed`
        self.cache = cache
        self.clock = clock
        self.grace = grace
        self.upto: int | None = None
        self.pending: set[int] = set()
        self.gap_since: float | None = None
        self.watch: list[tuple[int, float]] = []
        self.flushes = 0
        self.newest = 0  # newest catalog write known here (own writes and announcements)
        self.channel_down = False  # a required Redis subscription is not (yet) in place
        cache.bypass = True  # until the first look at the catalog gives a baseline

    def receive(self, seq: int, keys: Iterable[str]) -> None:
        self.newest = max(self.newest, seq)
        for key in keys:
            self.cache.invalidate(key, seq)
        if self.upto is None or seq <= self.upto:
            return
        self.pending.add(seq)
        while self.upto + 1 in self.pending:
            self.upto += 1
            self.pending.discard(self.upto)
        if self.pending:
            if self.gap_since is None:
                self.gap_since = self.clock.seconds()
        else:
            self.gap_since = None

    def written(self, seq: int, keys: Iterable[str]) -> None:
        """A write made through this front end: drop its keys before answering."""
        self.newest = max(self.newest, seq)
        for key in keys:
            self.cache.invalidate(key, seq)

    def drop(self, why: str) -> None:
        if not self.dropped[why]:
            log.warn("dropping an invalidation message: {why}", why=why)
        self.dropped[why] += 1

    def redis_message(self, raw: bytes) -> None:
        try:
            announced = signed(raw, self.secret)
        except Refused as why:
            self.drop(str(why))
            return
        self.receive(announced.seq, announced.keys)

    def confirm(self, high_water: int) -> None:
        """Called with the highest seq the catalog replicas report, on every health
        check. An announcement above it is normal for a moment (the push outruns the
        health check); one that stays above it for 2 × grace names a write no replica
        has (forged, or of another store): its floors are taken back, so that reads
        do not wait forever for a state nobody can serve."""
        now = self.clock.seconds()
        self.confirmed = max(self.confirmed or 0, high_water)
        confirmed = self.confirmed
        above = self.newest > confirmed or (self.upto or 0) > confirmed or self.cache.floor > confirmed
        if not above:
            self.unconfirmed_since = None
            return
        if self.unconfirmed_since is None:
            self.unconfirmed_since = now
            return
        if now - self.unconfirmed_since > 2 * self.grace:
            log.warn("invalidations announced writes up to {newest} that no catalog replica has (highest "
                     "{confirmed}): taken back", newest=self.newest, confirmed=confirmed)
            self.dropped["never confirmed"] += 1
            self.newest = min(self.newest, confirmed)
            if self.upto is not None:
                self.upto = min(self.upto, confirmed)
            self.pending = {s for s in self.pending if s <= confirmed}
            self.gap_since = self.clock.seconds() if self.pending else None
            self.watch = [(s, t) for s, t in self.watch if s <= confirmed]
            self.cache.clamp(confirmed)
            self.flushes += 1
            self.unconfirmed_since = None

    def observe_primary(self, last_seq: int) -> None:
        """Called with the catalog primary's last_seq on every health check."""
        now = self.clock.seconds()
        if self.upto is None:
            self.upto = last_seq
            self.cache.flush(last_seq)
            self.cache.bypass = self.channel_down
            return
        if self.pending and self.gap_since is not None and now - self.gap_since > self.grace:
            self.flush("a gap in the invalidation sequence", max(self.pending))
        while self.watch and self.watch[0][0] <= self.upto:
            self.watch.pop(0)
        if self.watch and now - self.watch[0][1] > self.grace:
            self.flush("writes that were never announced", max(seq for seq, _ in self.watch))
        if last_seq > self.upto and (not self.watch or self.watch[-1][0] < last_seq):
            self.watch.append((last_seq, now))
            del self.watch[:-8]

    def flush(self, why: str, upto: int) -> None:
        log.info("flushing the cache: {why}", why=why)
        self.flushes += 1
        self.upto = max(self.upto or 0, upto)
        self.pending = {s for s in self.pending if s > self.upto}
        self.gap_since = self.clock.seconds() if self.pending else None
        self.watch = [(s, t) for s, t in self.watch if s > self.upto]
        self.cache.flush(self.upto)

    def channel_lost(self) -> None:
        """The Redis subscription is gone: messages sent meanwhile are lost, so nothing
        cached may survive the gap; bypass the cache until resubscribed."""
        log.info("invalidation channel lost: flushing and bypassing the cache")
        self.channel_down = True
        self.cache.flush()
        self.cache.bypass = True

    def channel_back(self) -> None:
        log.info("invalidation channel subscribed: caching again")
        self.channel_down = False
        self.cache.flush()
        self.cache.bypass = self.upto is None


class InvalidationSubscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]  # (txredisapi is untyped)
    """Subscribes on every (re)connection; tells the stream when the link is lost."""

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        d.addCallback(lambda _: self.subscribe(CHANNEL))
        d.addCallback(lambda _: self.factory.on_subscribed())
        d.addErrback(lambda f: log.warn("redis subscribe failed: {why}", why=f.getErrorMessage()))
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.on_message(message if isinstance(message, bytes) else str(message).encode())

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.factory.on_lost()


class SubscriberFactory(txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = InvalidationSubscriber

    def __init__(self, on_message: Callable[[bytes], None], on_subscribed: Callable[[], None],
                 on_lost: Callable[[], None]):
        super().__init__()
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.on_lost = on_lost
        self.maxDelay = 2.0
        self.initialDelay = 0.2


def subscribe(reactor: Any, url: str, stream: InvalidationStream) -> SubscriberFactory:
    host, port = redis_address(url)
    user, password = redis_credentials(url)
    stream.channel_down = True  # until the first subscription is confirmed
    stream.cache.bypass = True
    factory = SubscriberFactory(on_message=stream.redis_message, on_subscribed=stream.channel_back,
                                on_lost=stream.channel_lost)
    factory.username, factory.password = user, password  # sent by txredisapi's AUTH on every connection
    factory.startConnecting(HostnameEndpoint(reactor, host, port))
    return factory
