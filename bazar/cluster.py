"""`twistd -n bazar-cluster`: the whole store on one machine.

Each replica and front end is its own twistd process under a
`twisted.runner.procmon.ProcessMonitor`, which restarts any that dies. Children learn
the supervisor's pid and stop by themselves if it disappears, so stopping the
cluster (SIGTERM, Ctrl-C, even kill -9 of the supervisor) leaves no orphans.

One store per data directory: the supervisor holds an exclusive lock on
`<data>/bazar-cluster.lock` for its whole life, and checks that its ports are free, before
it starts anything; a second start on the same directory or ports exits at once with
one line on stderr and touches nothing. Once the first front end answers `/ready`
with 200, it prints one line with the store's URL.

With `--shared-port-frontends N`, N more front end processes listen on the first front
end's port beside it (SO_REUSEPORT: the kernel spreads new connections across them), so
that cached reads use more than one core. Each of these also listens on a port of its
own (`--internal-port`, then the next ones): the catalog pushes invalidations there, to
every process (a push to the shared port would reach whichever one the kernel picks),
and the ready line waits for every one of them.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
from typing import Any

import treq
from twisted.application.service import MultiService
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.runner.procmon import ProcessMonitor

from bazar.config import SCHEDULING, BazarOptions, env_name
from bazar.http.client import TRANSPORT_FAILURES, quiet_pool
from bazar.lifecycle import every, hold_directory, refuse_to_start, safe_signals
from bazar.process import the_reactor
from bazar.trace import ENV as TRACE_ENV

log = Logger()

TWISTD = "from twisted.scripts.twistd import run; run()"


def ports(text: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise usage.UsageError(f"bad port list {text!r}") from None
    if not values or any(not 0 < p < 65536 for p in values):
        raise usage.UsageError(f"bad port list {text!r}")
    return values


INTERNAL_OFFSET = 50  # the default first internal port: --frontend-port + 50 (5050 beside 5000)


def default_topology(frontends: int = 1, frontend_port: int = 5000,
                     catalog_ports: tuple[int, ...] = (5101, 5102, 5103),
                     order_ports: tuple[int, ...] = (5201, 5202, 5203), shared: int = 0,
                     internal_port: int | None = None) -> list[dict[str, Any]]:
    """The processes bazar-cluster runs: name, service, replica id and port. With
    `shared` front ends sharing the first one's port, each process on that port (the
    first front end too) has `"reuse_port": True` and an `"internal_port"` of its own:
    internal_port, internal_port + 1, ... (default: frontend_port + INTERNAL_OFFSET)."""
    topology = [{"name": f"catalog-{i}", "service": "catalog", "id": i, "port": p}
                for i, p in enumerate(catalog_ports, 1)]
    topology += [{"name": f"order-{i}", "service": "order", "id": i, "port": p}
                 for i, p in enumerate(order_ports, 1)]
    topology += [{"name": f"frontend-{i}" if i else "frontend", "service": "frontend", "id": i,
                  "port": frontend_port + i} for i in range(frontends)]
    if shared:
        first = frontend_port + INTERNAL_OFFSET if internal_port is None else internal_port
        group = [next(p for p in topology if p["service"] == "frontend")]
        group += [{"name": f"frontend-shared-{j}", "service": "frontend", "id": frontends - 1 + j,
                   "port": frontend_port} for j in range(1, shared + 1)]
        for j, proc in enumerate(group):
            proc.update(reuse_port=True, internal_port=first + j)
        topology += group[1:]
    return topology


def own_url(proc: dict[str, Any], host: str) -> str:
    """Where this very process answers: its internal port if it shares its port, else its port."""
    return f"http://{host}:{proc.get('internal_port') or proc['port']}"


def listening_ports(topology: list[dict[str, Any]]) -> list[int]:
    """Every port the topology listens on, a shared port once."""
    ports: list[int] = []
    for proc in topology:
        if not (proc.get("reuse_port") and proc["port"] in ports):
            ports.append(proc["port"])
        if proc.get("internal_port"):
            ports.append(proc["internal_port"])
    return ports


def clashing_ports(topology: list[dict[str, Any]]) -> list[int]:
    """The ports given to more than one listener (a shared port counts once): with
    --internal-port or --frontend-port set by hand, one may land on another's."""
    wanted = listening_ports(topology)
    return sorted({p for p in wanted if wanted.count(p) > 1})


def commands(topology: list[dict[str, Any]], host: str, data: str, redis: str | None,
             cache_size: int, scheduling: str = SCHEDULING[0]) -> dict[str, list[str]]:
    """The twistd argument list of every process of the topology."""
    def urls(service: str) -> list[tuple[int, str]]:
        return [(p["id"], f"http://{host}:{p['port']}") for p in topology if p["service"] == service]

    catalog, order = urls("catalog"), urls("order")
    # the invalidation push goes to each front end process itself: on a shared port,
    # the kernel would hand it to one of them only
    fronts = [p for p in topology if p["service"] == "frontend"]
    frontends = ",".join(own_url(p, host) for p in fronts)
    logs = os.path.join(data, "logs")
    result = {}
    for proc in topology:
        args = ["-n", "--pidfile=", f"--logfile={os.path.join(logs, proc['name'] + '.log')}",
                f"bazar-{proc['service']}", "--host", host, "--port", str(proc["port"]), "--scheduling", scheduling]
        if proc["service"] == "catalog":
            args += ["--id", str(proc["id"]), "--data", os.path.join(data, proc["name"]),
                     "--peers", ",".join(f"{i}={u}" for i, u in catalog), "--frontends", frontends]
            if redis:
                args += ["--redis", redis]
        elif proc["service"] == "order":
            args += ["--id", str(proc["id"]), "--data", os.path.join(data, proc["name"]),
                     "--peers", ",".join(f"{i}={u}" for i, u in order),
                     "--catalog", ",".join(u for _, u in catalog)]
        else:
            args += ["--catalog", ",".join(u for _, u in catalog), "--order", ",".join(u for _, u in order),
                     "--cache-size", str(cache_size)]
            if redis:
                args += ["--redis", redis]
            if proc.get("reuse_port"):
                siblings = [own_url(p, host) for p in fronts
                            if p is not proc and p.get("reuse_port") and p["port"] == proc["port"]]
                args += ["--internal-port", str(proc["internal_port"]), "--siblings", ",".join(siblings),
                         "--reuse-port"]
        result[proc["name"]] = args
    return result


def load_secrets(data: str, options: usage.Options) -> dict[str, str]:
    """Secrets from the options/environment, else the ones generated before for this
    data directory, else new ones (written to <data>/secrets.json, mode 600)."""
    path = os.path.join(data, "secrets.json")
    stored: dict[str, str] = {}
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
    values = {}
    generated = False
    for name, key in (("admin-token", "admin_token"), ("cluster-secret", "cluster_secret")):
        value = options.get(name) or os.environ.get(env_name(name))
        if not value:
            value = stored.get(key)
        if not value:
            value = secrets.token_urlsafe(24)
            generated = True
        values[key] = value
    if generated:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(values, f)
        log.info("generated secrets written to {path}", path=os.path.abspath(path))
        print(f"bazar-cluster: admin token and cluster secret written to {os.path.abspath(path)}",
              file=sys.stderr)
    return values


class Options(BazarOptions):
    optParameters = [
        ["data", None, "bazar-data", "Data directory (SQLite files, logs, generated secrets)."],
        ["redis", None, None, "Redis URL for invalidations, e.g. redis://127.0.0.1:6379 (default: none)."],
        ["frontends", None, 1, "Number of front ends (ports 5000, 5001, ...).", int],
        ["shared-port-frontends", None, 0, "More front end processes on the first front end's port, beside it "
                                           "(SO_REUSEPORT, Linux): cached reads on more cores.", int],
        ["internal-port", None, None, "With --shared-port-frontends: the first of the ports of their own that "
                                      "the front ends sharing a port listen on too, one each (default: "
                                      f"--frontend-port + {INTERNAL_OFFSET}).", int],
        ["cache-size", None, 1024, "Entries in each front end's cache (0: no cache).", int],
        ["frontend-port", None, 5000, "Port of the first front end.", int],
        ["catalog-ports", None, "5101,5102,5103", "Ports of the catalog replicas."],
        ["order-ports", None, "5201,5202,5203", "Ports of the order replicas."],
    ]

    def postOptions(self) -> None:
        if not 1 <= self["frontends"] <= 16:
            raise usage.UsageError("--frontends must be between 1 and 16")
        if not 0 <= self["shared-port-frontends"] <= 16:
            raise usage.UsageError("--shared-port-frontends must be between 0 and 16")
        if self["shared-port-frontends"] and not hasattr(socket, "SO_REUSEPORT"):
            raise usage.UsageError("--shared-port-frontends: this system has no SO_REUSEPORT")
        internal = self["internal-port"]
        if internal is not None and not 0 < internal < 65536 - self["shared-port-frontends"]:
            raise usage.UsageError(f"--internal-port {internal}: expected a port (1-65535) for each of the "
                                   f"{self['shared-port-frontends'] + 1} front ends on the shared port")
        self["catalog-ports"] = tuple(ports(self["catalog-ports"]))
        self["order-ports"] = tuple(ports(self["order-ports"]))


def ports_in_use(host: str, wanted: list[int]) -> list[int]:
    busy = []
    for port in wanted:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


class ReadyLine:
    """Prints one line when the store answers: the first front end's /ready is 200 (with
    a shared port: the /ready of every process on it, each at its own port)."""

    def __init__(self, url: str, reactor: Any, checks: list[str] | None = None):
        self.url = url
        self.checks = checks or [url]
        self.reactor = reactor
        self.done = False
        self.asking = False
        self.pool = quiet_pool(reactor, persistent=False)

    def check(self) -> None:
        if not self.done and not self.asking:
            self.asking = True
            ensureDeferred(self._ask()).addBoth(self._asked)

    def _asked(self, _: Any) -> None:
        self.asking = False

    async def _ask(self) -> None:
        for url in self.checks:
            try:
                response = await treq.get(url + "/ready", timeout=1.0, pool=self.pool)
                await treq.content(response)
            except TRANSPORT_FAILURES:
                return  # not listening yet
            if response.code != 200:
                return
        if not self.done:
            self.done = True
            print(f"bazar-cluster: ready at {self.url}", flush=True)


def makeService(options: usage.Options, reactor: Any = None) -> MultiService:
    reactor = the_reactor(reactor)

    # Ctrl-C must stop the store even when we were started with SIGINT ignored (as a
    # shell does for background jobs): Twisted only installs its SIGINT handler over
    # Python's default one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    safe_signals(reactor)  # and once running, handlers that only hand off (no logging in them)

    data = os.path.abspath(options["data"])
    os.makedirs(os.path.join(data, "logs"), exist_ok=True)
    hold_directory(data, "bazar-cluster")
    topology = default_topology(options["frontends"], options["frontend-port"], options["catalog-ports"],
                                options["order-ports"], options["shared-port-frontends"], options["internal-port"])
    twice = clashing_ports(topology)
    if twice:
        refuse_to_start("bazar-cluster", f"port(s) {', '.join(map(str, twice))} given to more than one process")
    busy = ports_in_use(options["host"], listening_ports(topology))
    if busy:
        refuse_to_start("bazar-cluster", f"port(s) {', '.join(map(str, busy))} on {options['host']} already in use")
    values = load_secrets(data, options)
    # the children take their settings from their flags, not from the supervisor's BAZAR_ variables;
    # the trace file (bazar.trace) is no setting: every process of the store traces into it
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAZAR_") or k == TRACE_ENV}
    env.update(BAZAR_ADMIN_TOKEN=values["admin_token"], BAZAR_CLUSTER_SECRET=values["cluster_secret"],
               BAZAR_PARENT_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
    monitor = ProcessMonitor(reactor=reactor)
    monitor.minRestartDelay = 0.5  # type: ignore[assignment]
    monitor.maxRestartDelay = 2
    monitor.killTime = 5
    for name, args in commands(topology, options["host"], data, options["redis"], options["cache-size"],
                               options["scheduling"]).items():
        monitor.addProcess(name, [sys.executable, "-c", TWISTD, *args], env=env, cwd=data)
    log.info("bazar-cluster: {n} processes, data in {data}, logs in {logs}",
             n=len(topology), data=data, logs=os.path.join(data, "logs"))
    parent = MultiService()
    monitor.setServiceParent(parent)
    front = next(p for p in topology if p["service"] == "frontend")
    host = options["host"] if options["host"] not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    # the first front end; on a shared port, every process on it (each at its own port)
    checks = [own_url(p, host) for p in topology if p.get("reuse_port") and p["port"] == front["port"]]
    ready = ReadyLine(f"http://{host}:{front['port']}", reactor, checks)
    every(0.5, ready.check, "the readiness check").setServiceParent(parent)
    return parent
