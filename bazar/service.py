"""What the three twistd plugins share: options from flags, environment or a TOML
file; the quiet web Site; the service that starts and stops a replica; the watchdog
that ends a child process whose supervisor is gone."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import sys
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import reflect, usage
from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder
from twisted.web.server import Request, Site

log = Logger()

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def env_name(option: str) -> str:
    return "BAZAR_" + option.upper().replace("-", "_")


class BazarOptions(usage.Options):
    """Options whose values come, in order of precedence, from the command line, the
    environment (BAZAR_<NAME>), a TOML file (--config, or BAZAR_CONFIG) or defaults."""

    optParameters: list[list[Any]] = [
        ["host", None, "127.0.0.1", "Interface to listen on."],
        ["config", None, None, "TOML file with settings (keys are option names)."],
        ["admin-token", None, None, "Admin token (or BAZAR_ADMIN_TOKEN)."],
        ["cluster-secret", None, None, "Secret shared by the processes of one store (or BAZAR_CLUSTER_SECRET)."],
    ]

    def _coercions(self) -> dict[str, Callable[[Any], Any]]:
        params: list[list[Any]] = []
        reflect.accumulateClassList(self.__class__, "optParameters", params)
        return {p[0]: (p[4] if len(p) > 4 and p[4] else str) for p in params}

    def parseOptions(self, options: list[str] | None = None) -> None:
        args = sys.argv[1:] if options is None else list(options)
        coerce = self._coercions()
        values: dict[str, Any] = {}
        path = _prescan(args, "--config") or os.environ.get("BAZAR_CONFIG")
        if path:
            try:
                with open(path, "rb") as f:
                    values.update(tomllib.load(f))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise usage.UsageError(f"cannot read config file {path}: {exc}") from None
        for name in coerce:
            if env_name(name) in os.environ:
                values[name] = os.environ[env_name(name)]
        # on/off flags too (BAZAR_ID_FROM_HOSTNAME=true): a container sets them like any other setting
        flags: list[list[Any]] = []
        reflect.accumulateClassList(self.__class__, "optFlags", flags)
        for flag in flags:
            text = os.environ.get(env_name(flag[0]))
            if text is not None:
                if text.strip().lower() not in FLAG_VALUES:
                    raise usage.UsageError(f"bad value for {env_name(flag[0])}: {text!r} (expected true or false)")
                self[flag[0]] = self.opts[flag[0]] = FLAG_VALUES[text.strip().lower()]
        for name, value in values.items():
            if name not in coerce:
                raise usage.UsageError(f"unknown setting {name!r} in {path}")
            try:
                self[name] = coerce[name](value)
            except (TypeError, ValueError) as exc:
                raise usage.UsageError(f"bad value for {name}: {exc}") from None
            self.opts[name] = self[name]
        super().parseOptions(options)


FLAG_VALUES = {"1": 1, "true": 1, "yes": 1, "on": 1, "0": 0, "false": 0, "no": 0, "off": 0, "": 0}


class ReplicaOptions(BazarOptions):
    """What catalog and order replicas have in common: who this replica is among its
    peers. The plugin's own class adds --id, --peers and the rest."""

    optFlags: list[list[Any]] = [
        ["id-from-hostname", None, "Take --id from the host name: its trailing number plus one "
                                   "(catalog-0 -> 1), as a Kubernetes StatefulSet names its pods. Wins over --id."],
    ]

    def postOptions(self) -> None:
        if self["id-from-hostname"]:
            self["id"] = id_from_hostname(socket.gethostname())
        peers = parse_peers(self["peers"])
        if peers and self["id"] not in peers:
            raise usage.UsageError(f"--id {self['id']} is not one of the --peers ({', '.join(map(str, peers))})")


def id_from_hostname(hostname: str) -> int:
    """'catalog-0' (or 'catalog-0.catalog.ns.svc...') -> 1: a StatefulSet numbers its pods
    from 0, while replica ids start at 1, as in bazar-cluster and docker/compose.yaml."""
    name = hostname.split(".", 1)[0]
    _, dash, ordinal = name.rpartition("-")
    if not dash or not ordinal.isdigit() or not ordinal.isascii():
        raise usage.UsageError(f"--id-from-hostname: the host name {hostname!r} does not end in -N "
                               "(the ordinal of a StatefulSet pod, e.g. catalog-0)")
    return int(ordinal) + 1


def _prescan(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def parse_peers(text: str) -> dict[int, str]:
    """'1=http://h:5101,2=http://h:5102' -> {1: 'http://h:5101', 2: ...}"""
    peers: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        ident, sep, url = part.partition("=")
        if not sep or not ident.strip().isdigit() or not url.startswith(("http://", "https://")):
            raise usage.UsageError(f"bad peer {part!r}: expected ID=http://host:port")
        peers[int(ident)] = url.rstrip("/")
    return peers


def parse_urls(text: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in (text or "").split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise usage.UsageError(f"bad URL {url!r}: expected http://host:port")
    return urls


def secret_of(options: usage.Options, name: str) -> str | None:
    return options.get(name) or os.environ.get(env_name(name)) or None


HEADER_DEADLINE = 10.0  # seconds a client has to send a request's line and headers (and a small body)
MIN_BODY_RATE = 64 * 1024  # bytes/s: a body of n bytes adds n / MIN_BODY_RATE seconds to the deadline
LINGER = 2.0  # seconds, after a refusal, to drain (and drop) what the client still sends
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large",
           431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
# Headers that decide who a request is, what it is, or where its body ends: sent twice,
# two parts of a chain could each believe another one (RFC 9110 5.3), so refuse them.
SINGLE_HEADERS = frozenset({b"authorization", b"x-bazar-secret", b"idempotency-key", b"content-length",
                            b"transfer-encoding", b"host", b"content-type", b"x-bazar-hops"})
MAX_CONNECTIONS = 4096  # open connections one process accepts; beyond them: 503 and close
# seconds a kept-alive connection may stay silent; beyond HEADER_DEADLINE, so that a
# silent new connection gets its JSON 408 first
IDLE_TIMEOUT = 15


class LimitedChunks(_ChunkedTransferDecoder):
    """A chunked body refused (413) as soon as a chunk announces more than the
    route's limit, not once that many bytes have been received."""

    limit = 0
    channel: Any = None

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        done = super()._dataReceived_CHUNK_LENGTH()
        if done and self.state == "BODY" and self.length > self.limit:  # type: ignore[has-type]
            self.state = "FINISHED"
            del self._buffer[:]
            self.channel.refuse(413, f"request body is larger than {self.limit} bytes")
            return False
        return done


def body_limit(path: bytes) -> int:
    """The largest request body worth receiving for `path` (the apps check the exact
    limit again; this only stops an oversized body before it is buffered)."""
    from bazar.replication import INTERNAL_BODY_LIMIT
    from bazar.web import MAX_BODY

    return INTERNAL_BODY_LIMIT if path.startswith(b"/internal/") else MAX_BODY


class GuardedChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel with what hostile clients call for:

    - a deadline for the request line and headers (HEADER_DEADLINE from the first
      byte of a request, or from the connection), extended for the body by its
      announced length at MIN_BODY_RATE: the idle timeout alone is reset by every
      byte, so a client dribbling a header (slowloris) or body byte (slow POST)
      every few seconds would hold its connection for ever;
    - a body over the route's limit is refused (413) from its Content-Length, or as
      soon as a chunked body passes the limit, instead of being buffered first;
    - these refusals and Twisted's own for malformed requests (bare `400 Bad
      Request`, no body) are JSON like every other error. After a refusal the rest
      of the request is drained for a moment, so the client reads the answer instead
      of a connection reset, then the connection is closed.
    """

    header_deadline = HEADER_DEADLINE
    _deadline: Any = None
    _linger: Any = None
    _linger_left = 0
    _refused = False
    _awaiting_request = True

    _host: Any = None

    over_capacity = False
    site_counted: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.over_capacity:
            self.refuse(503, "too many open connections; retry shortly")
            return
        self._arm()

    def getHost(self) -> Any:
        # Twisted asks for it (a getsockname call) on every request; it never changes.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def _arm(self) -> None:
        if self._deadline is None and self.header_deadline:
            self._deadline = self.callLater(self.header_deadline, self._request_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _request_late(self) -> None:
        self._deadline = None
        self.refuse(408, "the request did not arrive in time", expected=0)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            self._drain(data)
            return
        if self._awaiting_request:
            self._arm()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if line[:1] in (b" ", b"\t") and not getattr(self, "_HTTPChannel__first_line", 1):
            self.refuse(400, "obsolete line folding in the request's headers")  # RFC 9112 5.2
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self._refused:
            return False
        name = line.split(b":", 1)[0].strip().lower()
        request = self.requests[-1] if self.requests else None
        seen = getattr(request, "_single_seen", None)
        if request is not None and seen is None:
            seen = request._single_seen = set()
        if name in SINGLE_HEADERS and seen is not None:
            if name in seen:
                self.refuse(400, f"the {name.decode('ascii', 'replace')} header is given more than once")
                return False
            seen.add(name)
        return bool(super().headerReceived(line))

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            self._drain(data)
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        limit = body_limit(self._path)  # type: ignore[arg-type]  # (bytes; Twisted's annotation is off)
        self.requests[-1].body_limit = limit
        if self.length is not None and self.length > limit:
            self.refuse(413, f"request body is larger than {limit} bytes", expected=self.length)
            return
        if self.length and self._deadline is not None:
            self._deadline.delay(self.length / MIN_BODY_RATE)
        decoder = getattr(self, "_transferDecoder", None)
        if type(decoder) is _ChunkedTransferDecoder:
            decoder.__class__ = LimitedChunks
            decoder.limit, decoder.channel = limit, self  # type: ignore[attr-defined]
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self._refused:
            self._awaiting_request = False
            self._disarm()
            super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._awaiting_request = True  # the next request's deadline starts with its first byte
        super().requestDone(request)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's answer to a malformed request line, header, length or chunk.
        self.refuse(400, "malformed HTTP request")

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would drop the connection without a word.
        self.refuse(431, f"request line or header longer than {self.MAX_LENGTH} bytes")

    def refuse(self, status: int, message: str, expected: int | None = None) -> None:
        """Answer `status` with a JSON error, drain the rest for a moment, close."""
        if self._refused:
            return
        self._refused = True
        self._disarm()
        from bazar.web import error_body

        body = error_body(message)
        transport: Any = self.transport
        extra = b"Retry-After: 1\r\n" if status == 503 else b""
        transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                        b"%sConnection: close\r\n\r\n%s" % (status, REASONS[status], len(body), extra, body))
        # Drain the announced body (or, its length unknown, whatever comes) for at most
        # LINGER seconds: a client still sending would otherwise get a connection reset
        # instead of this answer. Dropped bytes cost no memory.
        self._linger_left = expected if expected is not None else -1
        if self._linger_left == 0:
            self.loseConnection()
            return
        self._linger = self.callLater(LINGER, self.loseConnection)
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()  # the client sees the end of the answer now, and may close first

    def _drain(self, data: bytes) -> None:
        if self._linger_left > 0:
            self._linger_left -= len(data)
            if self._linger_left <= 0:
                self.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.site_counted is not None:
            self.site_counted.open_connections -= 1
            self.site_counted = None
        self._disarm()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)


class GuardedRequest(Request):
    """Stops a chunked body at the route's limit (a Content-Length is checked by the
    channel before any byte of the body)."""

    body_limit: int | None = None
    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.body_limit is not None and self._received > self.body_limit:
            channel: Any = self.channel
            channel.refuse(413, f"request body is larger than {self.body_limit} bytes")
            return
        super().handleContentChunk(data)


class QuietSite(Site):
    """No access log (it costs a write per request and would record tokens in URLs),
    no tracebacks, an idle timeout so a silent client cannot hold a connection, and
    GuardedChannel's deadlines and limits. Request bodies are never parsed as HTML
    forms (Twisted would answer a bad multipart body with a bare 400 of its own)."""

    displayTracebacks = False
    protocol = GuardedChannel  # type: ignore[assignment]  # (plain HTTP/1.1: no TLS, so no HTTP/2 to negotiate)
    requestFactory = GuardedRequest

    def __init__(self, resource: Any, max_connections: int = MAX_CONNECTIONS, **kw: Any):
        super().__init__(resource, parsePOSTFormSubmission=False, **kw)
        self.max_connections = max_connections
        self.open_connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.site_counted = self
            self.open_connections += 1
            if self.open_connections > self.max_connections:
                channel.over_capacity = True
        return channel

    def log(self, request: Any) -> None:
        pass


def listen(parent: MultiService, reactor: Any, resource: Any, host: str, port: int) -> Site:
    site = QuietSite(resource, timeout=IDLE_TIMEOUT)
    endpoint = serverFromString(reactor, f"tcp:{port}:interface={host}")
    StreamServerEndpointService(endpoint, site).setServiceParent(parent)
    return site


class Hooks(Service):
    """Run callables when the service starts and stops."""

    def __init__(self, on_start: Callable[[], Any] | None = None, on_stop: Callable[[], Any] | None = None):
        self.on_start = on_start
        self.on_stop = on_stop

    def startService(self) -> None:
        super().startService()
        if self.on_start is not None:
            self.on_start()

    def stopService(self) -> Any:
        super().stopService()
        if self.on_stop is not None:
            return self.on_stop()
        return None


def stop_from_signal(reactor: Any) -> Callable[[int, Any], None]:
    """A SIGTERM/SIGINT handler that only asks the reactor to stop. Twisted's own logs
    "Received SIGTERM" from inside the handler: a signal that lands while the same
    thread holds the log lock then deadlocks the process for ever (Twisted #7736).
    `callFromThread` only appends to a queue and writes a byte to the waker's pipe."""
    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(_stop_once, reactor)

    return handler


def _stop_once(reactor: Any) -> None:
    if reactor.running:
        log.info("stopping on a signal")
        reactor.stop()


def safe_signals(reactor: Any) -> None:
    """Once the reactor runs (after twistd installed its handlers), replace its
    SIGTERM and SIGINT handlers with ones that do nothing but hand off."""
    def install() -> None:
        handler = stop_from_signal(reactor)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    reactor.callWhenRunning(install)


def die_with_parent() -> None:
    """Linux: SIGTERM when the parent dies (PR_SET_PDEATHSIG), whatever this process's
    event loop is doing; the parent watch below is the portable fallback."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def watch_parent(parent: MultiService, reactor: Any) -> None:
    """Stop on SIGTERM/SIGINT without logging in the handler, and, under
    bazar-cluster, stop when the supervisor is gone (even after its kill -9), so no
    replica is ever left behind as an orphan."""
    safe_signals(reactor)
    expected = os.environ.get("BAZAR_PARENT_PID")
    if not expected or not expected.isdigit():
        return
    die_with_parent()
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before the line above

    def check() -> None:
        if os.getppid() != int(expected) and reactor.running:
            log.warn("supervisor {pid} is gone: stopping", pid=expected)
            reactor.stop()

    TimerService(1.0, check).setServiceParent(parent)


def json_logger() -> Any:
    """For `twistd --logger=bazar.service.json_logger`: one JSON event per line on
    stdout (what container log collectors want)."""
    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout)


def refuse_to_start(who: str, why: str) -> None:
    """One clear line on stderr, a non-zero exit, nothing started."""
    print(f"{who}: {why}; not starting", file=sys.stderr, flush=True)
    raise SystemExit(1)


def hold_directory(directory: str, who: str) -> int:
    """An exclusive lock (flock) on `<directory>/<who>.lock` for the life of this
    process (it goes with the process, even after kill -9): one store per directory.
    A second taker refuses to start."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(directory, f"{who}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            refuse_to_start(who, f"{directory} is in use by another {who}")
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class ReplicaProcess:
    """What a catalog or order replica process is made of, before its app is added:
    the store, the Replica, one HTTP pool, the election tick, start/stop hooks and
    the supervisor watchdog. The caller adds its app with `serve` and its own
    start/stop work to `on_start`/`on_stop`."""

    def __init__(self, options: usage.Options, service: str, machine: Any, filename: str):
        from twisted.internet import reactor

        from bazar.client import make_http
        from bazar.replication import Replica
        from bazar.store import Store

        self.reactor: Any = reactor
        self.options = options
        replica_id = options["id"]
        peers = parse_peers(options["peers"])
        if peers and replica_id not in peers:
            raise usage.UsageError(f"--id {replica_id} is not one of the --peers")
        self.secret = secret_of(options, "cluster-secret")
        self.admin_token = secret_of(options, "admin-token")
        data = options["data"] or os.path.join("bazar-data", f"{service}-{replica_id}")
        hold_directory(data, f"bazar-{service}")
        self.parent = MultiService()
        self.http, self.pool = make_http(reactor)
        self.replica = Replica(service=service, replica_id=replica_id, peers=peers,
                               store=Store(os.path.join(data, filename), machine),
                               http=self.http, clock=reactor, secret=self.secret)
        self.on_start: list[Callable[[], Any]] = [self.replica.start]
        self.on_stop: list[Callable[[], Any]] = [self.replica.stop]
        TimerService(self.replica.tick_seconds, self.replica.tick).setServiceParent(self.parent)
        Hooks(on_start=self._start, on_stop=self._stop).setServiceParent(self.parent)
        watch_parent(self.parent, reactor)

    def _start(self) -> None:
        for hook in self.on_start:
            hook()

    def _stop(self) -> Any:
        for hook in self.on_stop:
            hook()
        return self.pool.closeCachedConnections()

    def serve(self, resource: Any) -> MultiService:
        listen(self.parent, self.reactor, resource, self.options["host"], self.options["port"])
        return self.parent
