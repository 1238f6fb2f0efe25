"""How a Bazar process is configured: twistd options whose values come from the command
line, the environment (BAZAR_<OPTION>) or a TOML file, checked in `postOptions` (a bad
value is a usage error, never a traceback at start), and the parsing of peer lists."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable
from urllib.parse import urlparse

from twisted.python import reflect, usage

from bazar.lifecycle import hold_directory
from bazar.settings import ReplicaSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def env_name(option: str) -> str:
    return "BAZAR_" + option.upper().replace("-", "_")


SCHEDULING = ("batch", "normal")  # the first is the default (bazar.process.schedule)


def scheduling_policy(text: str) -> str:
    if text not in SCHEDULING:
        raise ValueError(f"--scheduling must be one of {', '.join(SCHEDULING)}, not {text!r}")
    return text


class BazarOptions(usage.Options):
    """Options whose values come, in order of precedence, from the command line, the
    environment (BAZAR_<NAME>), a TOML file (--config, or BAZAR_CONFIG) or defaults."""

    optParameters: list[list[Any]] = [
        ["host", None, "127.0.0.1", "Interface to listen on."],
        ["config", None, None, "TOML file with settings (keys are option names)."],
        ["admin-token", None, None, "Admin token (or BAZAR_ADMIN_TOKEN)."],
        ["cluster-secret", None, None, "Secret shared by the processes of one store (or BAZAR_CLUSTER_SECRET)."],
        ["scheduling", None, SCHEDULING[0], "Linux CPU scheduling policy of the process: batch (SCHED_BATCH, for "
                                      "throughput) or normal.", scheduling_policy],
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
    peers, and where its data lives. The plugin's own class adds --id, --peers, --data
    and the rest, and names its `service`."""

    service = ""
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

    def replica_settings(self) -> ReplicaSettings:
        return ReplicaSettings(service=self.service, replica_id=self["id"], peers=parse_peers(self["peers"]),
                               secret=secret_of(self, "cluster-secret"), admin_token=secret_of(self, "admin-token"))

    def data_directory(self) -> str:
        """The replica's data directory, held (an exclusive lock) for the life of the
        process: a second replica on it refuses to start."""
        data: str = self["data"] or os.path.join("bazar-data", f"{self.service}-{self['id']}")
        hold_directory(data, f"bazar-{self.service}")
        return data


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


def peer_url(text: str) -> str | None:
    """The URL of a peer (a scheme, a host, maybe a port, no path), without its
    trailing slash; None when `text` is not one."""
    url = text.strip().rstrip("/")
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        return None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path or parsed.query:
        return None
    return url


def parse_peers(text: str) -> dict[int, str]:
    """'1=http://h:5101,2=http://h:5102' -> {1: 'http://h:5101', 2: ...}"""
    peers: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        ident, sep, url = part.partition("=")
        checked = peer_url(url)
        if not sep or not ident.strip().isdigit() or checked is None:
            raise usage.UsageError(f"bad peer {part!r}: expected ID=http://host:port")
        peers[int(ident)] = checked
    return peers


def parse_urls(text: str) -> list[str]:
    """'http://h:5101,http://h:5102' -> the URLs."""
    urls = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        checked = peer_url(part)
        if checked is None:
            raise usage.UsageError(f"bad URL {part!r}: expected http://host:port")
        urls.append(checked)
    return urls


def parse_redis(text: str | None) -> str | None:
    """A Redis URL (redis://[[user]:password@]host[:port]), checked now rather than at
    the first connection."""
    if not text:
        return None
    try:
        parsed = urlparse(text)
        parsed.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        raise usage.UsageError(f"bad Redis URL {text!r}: expected redis://[[user]:password@]host:port") from None
    if parsed.scheme != "redis" or not parsed.hostname:
        raise usage.UsageError(f"bad Redis URL {text!r}: expected redis://[[user]:password@]host:port")
    return text


def secret_of(options: usage.Options, name: str) -> str | None:
    return options.get(name) or os.environ.get(env_name(name)) or None

