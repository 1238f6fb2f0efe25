"""What the three twistd plugins share: options from flags, environment or a TOML
file; the quiet web Site; the service that starts and stops a replica; the watchdog
that ends a child process whose supervisor is gone."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import reflect, usage
from twisted.web.server import Site

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
        for name, value in values.items():
            if name not in coerce:
                raise usage.UsageError(f"unknown setting {name!r} in {path}")
            try:
                self[name] = coerce[name](value)
            except (TypeError, ValueError) as exc:
                raise usage.UsageError(f"bad value for {name}: {exc}") from None
            self.opts[name] = self[name]
        super().parseOptions(options)


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


class QuietSite(Site):
    """No access log (it costs a write per request and would record tokens in URLs),
    no tracebacks, and an idle timeout so a silent client cannot hold a connection."""

    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


def listen(parent: MultiService, reactor: Any, resource: Any, host: str, port: int) -> Site:
    site = QuietSite(resource, timeout=30)
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


def watch_parent(parent: MultiService, reactor: Any) -> None:
    """Under bazar-cluster, stop when the supervisor is gone (even after its kill -9),
    so no replica is ever left behind as an orphan."""
    expected = os.environ.get("BAZAR_PARENT_PID")
    if not expected or not expected.isdigit():
        return

    def check() -> None:
        if os.getppid() != int(expected):
            log.warn("supervisor {pid} is gone: stopping", pid=expected)
            reactor.stop()

    TimerService(1.0, check).setServiceParent(parent)


def json_logger() -> Any:
    """For `twistd --logger=bazar.service.json_logger`: one JSON event per line on
    stdout (what container log collectors want)."""
    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout)
