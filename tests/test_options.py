"""Command-line options of the four plugins: flag > environment > TOML file >
default, the peer/URL lists, and the processes bazar-cluster starts."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage

from bazar import catalog, cluster, frontend, order
from bazar.config import env_name, id_from_hostname, parse_peers, parse_urls

PLUGINS = {"catalog": catalog.Options, "order": order.Options, "frontend": frontend.Options,
           "cluster": cluster.Options}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("BAZAR_"):
            monkeypatch.delenv(name)
    yield


def parse(kind: str, *args: str) -> usage.Options:
    options = PLUGINS[kind]()
    options.parseOptions(list(args))
    return options


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bazar.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("kind, defaults", [
    ("catalog", {"port": 5101, "id": 1, "peers": "", "data": None, "frontends": "", "redis": None,
                 "host": "127.0.0.1", "admin-token": None, "cluster-secret": None}),
    ("order", {"port": 5201, "id": 1, "peers": "", "data": None, "catalog": "http://127.0.0.1:5101"}),
    ("frontend", {"port": 5000, "catalog": "http://127.0.0.1:5101", "order": "http://127.0.0.1:5201",
                  "cache-size": 1024, "redis": None, "reuse-port": 0, "internal-port": None, "siblings": ""}),
    ("cluster", {"data": "bazar-data", "redis": None, "frontends": 1, "cache-size": 1024, "frontend-port": 5000,
                 "catalog-ports": (5101, 5102, 5103), "order-ports": (5201, 5202, 5203),
                 "shared-port-frontends": 0, "internal-port": None}),
])
def test_defaults(kind: str, defaults: dict[str, Any]) -> None:
    options = parse(kind)
    for name, value in defaults.items():
        assert options[name] == value, name


# (option, flag value, env value, toml line, expected flag, expected env, expected toml) per plugin
CASES = [
    ("catalog", "port", "6001", "6002", "port = 6003", 6001, 6002, 6003),
    ("catalog", "peers", "1=http://a:1", "1=http://b:1", 'peers = "1=http://c:1"',
     "1=http://a:1", "1=http://b:1", "1=http://c:1"),
    ("catalog", "cluster-secret", "s-flag", "s-env", 'cluster-secret = "s-toml"', "s-flag", "s-env", "s-toml"),
    ("order", "id", "2", "3", "id = 4", 2, 3, 4),
    ("order", "catalog", "http://f:1", "http://e:1", 'catalog = "http://t:1"', "http://f:1", "http://e:1",
     "http://t:1"),
    ("frontend", "cache-size", "0", "7", '"cache-size" = 9', 0, 7, 9),
    ("frontend", "admin-token", "t-flag", "t-env", 'admin-token = "t-toml"', "t-flag", "t-env", "t-toml"),
    ("frontend", "host", "0.0.0.0", "10.0.0.1", 'host = "10.0.0.2"', "0.0.0.0", "10.0.0.1", "10.0.0.2"),
    ("cluster", "frontends", "3", "2", "frontends = 4", 3, 2, 4),
    ("cluster", "shared-port-frontends", "1", "2", '"shared-port-frontends" = 3', 1, 2, 3),
    ("frontend", "internal-port", "5050", "5051", '"internal-port" = 5052', 5050, 5051, 5052),
    ("cluster", "data", "/d/flag", "/d/env", 'data = "/d/toml"', "/d/flag", "/d/env", "/d/toml"),
]


@pytest.mark.parametrize("kind, name, flag, env, line, by_flag, by_env, by_toml", CASES)
def test_flag_beats_environment_beats_toml_beats_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, name: str, flag: str, env: str, line: str,
        by_flag: Any, by_env: Any, by_toml: Any) -> None:
    config = toml(tmp_path, line + "\n")
    assert parse(kind, "--config", config)[name] == by_toml
    assert parse(kind, f"--config={config}")[name] == by_toml
    monkeypatch.setenv("BAZAR_CONFIG", config)  # the file named by the environment
    assert parse(kind)[name] == by_toml
    monkeypatch.setenv(env_name(name), env)
    assert parse(kind)[name] == by_env
    assert parse(kind, "--config", config)[name] == by_env
    assert parse(kind, f"--{name}", flag)[name] == by_flag
    assert parse(kind, "--config", config, f"--{name}={flag}")[name] == by_flag


def test_environment_names() -> None:
    assert env_name("cache-size") == "BAZAR_CACHE_SIZE"
    assert env_name("admin-token") == "BAZAR_ADMIN_TOKEN"


def test_an_environment_value_is_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BAZAR_PORT", "7000")
    assert parse("frontend")["port"] == 7000
    monkeypatch.setenv("BAZAR_PORT", "seven")
    with pytest.raises(usage.UsageError):
        parse("frontend")


@pytest.mark.parametrize("text", ['nope = 1', 'port = "x"', "port = [1]", "this is not toml", 'port = '])
def test_bad_config_files_are_usage_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(usage.UsageError):
        parse("frontend", "--config", toml(tmp_path, text))


def test_a_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError):
        parse("catalog", "--config", str(tmp_path / "absent.toml"))


@pytest.mark.parametrize("kind, args", [
    ("frontend", ["--cache-size", "-1"]),
    ("frontend", ["--port", "http"]),
    ("catalog", ["--id", "one"]),
    ("catalog", ["--unknown", "1"]),
    ("cluster", ["--frontends", "0"]),
    ("cluster", ["--frontends", "17"]),
    ("cluster", ["--catalog-ports", "5101,x"]),
    ("cluster", ["--order-ports", ""]),
    ("cluster", ["--order-ports", "0,5202"]),
    ("cluster", ["--catalog-ports", "70000"]),
    ("cluster", ["--shared-port-frontends", "-1"]),
    ("cluster", ["--shared-port-frontends", "17"]),
    ("cluster", ["--shared-port-frontends", "2", "--internal-port", "65534"]),
    ("frontend", ["--internal-port", "5000"]),  # its --port
    ("frontend", ["--internal-port", "0"]),
    ("frontend", ["--siblings", "127.0.0.1:5051"]),
    ("frontend", ["--reuse-port", "yes"]),
])
def test_bad_flags_are_usage_errors(kind: str, args: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        parse(kind, *args)


def test_reuse_port_as_a_flag_or_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not parse("frontend").settings.reuse_port
    options = parse("frontend", "--reuse-port", "--internal-port", "5050", "--siblings",
                    "http://127.0.0.1:5051, http://127.0.0.1:5052")
    assert options.settings.reuse_port and options.settings.internal_port == 5050
    assert options.settings.siblings == ("http://127.0.0.1:5051", "http://127.0.0.1:5052")
    monkeypatch.setenv("BAZAR_REUSE_PORT", "true")
    assert parse("frontend").settings.reuse_port
    monkeypatch.setenv("BAZAR_REUSE_PORT", "off")
    assert not parse("frontend").settings.reuse_port
    monkeypatch.setenv("BAZAR_REUSE_PORT", "maybe")
    with pytest.raises(usage.UsageError, match="BAZAR_REUSE_PORT"):
        parse("frontend")


def test_no_reuse_port_where_the_system_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)
    with pytest.raises(usage.UsageError, match="SO_REUSEPORT"):
        parse("frontend", "--reuse-port")
    with pytest.raises(usage.UsageError, match="SO_REUSEPORT"):
        parse("cluster", "--shared-port-frontends", "1")
    assert parse("cluster")["shared-port-frontends"] == 0  # without the option, nothing asks for it


def test_cluster_port_lists() -> None:
    options = parse("cluster", "--catalog-ports", "6101, 6102", "--order-ports", "6201")
    assert options["catalog-ports"] == (6101, 6102) and options["order-ports"] == (6201,)


# -- peers and URLs ---------------------------------------------------------------------------

def test_parse_peers() -> None:
    assert parse_peers("") == {}
    assert parse_peers("1=http://h:5101, 2=http://h:5102/ ,3=https://x") == {
        1: "http://h:5101", 2: "http://h:5102", 3: "https://x"}


@pytest.mark.parametrize("text", ["http://h:1", "a=http://h:1", "1=h:1", "1=ftp://h", "1=", "=http://h:1",
                                  "-1=http://h:1", "1:http://h:1"])
def test_bad_peers_are_usage_errors(text: str) -> None:
    with pytest.raises(usage.UsageError):
        parse_peers(text)


def test_parse_urls() -> None:
    assert parse_urls("") == []
    assert parse_urls(" http://a:1/, https://b ,,") == ["http://a:1", "https://b"]


@pytest.mark.parametrize("text", ["a:1", "http://a:1,b:2", "redis://a:1", "www.example.com"])
def test_bad_urls_are_usage_errors(text: str) -> None:
    with pytest.raises(usage.UsageError):
        parse_urls(text)


# -- bazar-cluster's processes --------------------------------------------------------------------

def test_default_topology_is_the_documented_one() -> None:
    topology = cluster.default_topology()
    assert [(p["name"], p["service"], p["id"], p["port"]) for p in topology] == [
        ("catalog-1", "catalog", 1, 5101), ("catalog-2", "catalog", 2, 5102), ("catalog-3", "catalog", 3, 5103),
        ("order-1", "order", 1, 5201), ("order-2", "order", 2, 5202), ("order-3", "order", 3, 5203),
        ("frontend", "frontend", 0, 5000)]


def test_more_front_ends_take_the_next_ports() -> None:
    fronts = [p for p in cluster.default_topology(frontends=3) if p["service"] == "frontend"]
    assert [(p["name"], p["port"]) for p in fronts] == [("frontend", 5000), ("frontend-1", 5001),
                                                       ("frontend-2", 5002)]


def test_front_ends_sharing_the_first_port() -> None:
    topology = cluster.default_topology(frontends=2, shared=2)
    fronts = [(p["name"], p["port"], p.get("reuse_port", False), p.get("internal_port"))
              for p in topology if p["service"] == "frontend"]
    assert fronts == [("frontend", 5000, True, 5050), ("frontend-1", 5001, False, None),
                      ("frontend-shared-1", 5000, True, 5051), ("frontend-shared-2", 5000, True, 5052)]
    assert cluster.listening_ports(topology) == [5101, 5102, 5103, 5201, 5202, 5203, 5000, 5050, 5001, 5051, 5052]
    moved = cluster.default_topology(frontend_port=6000, shared=1)
    assert [p.get("internal_port") for p in moved if p["service"] == "frontend"] == [6050, 6051]
    assert [p.get("internal_port") for p in cluster.default_topology(shared=1, internal_port=7000)
            if p["service"] == "frontend"] == [7000, 7001]
    assert cluster.default_topology(shared=0) == cluster.default_topology()
    assert cluster.clashing_ports(topology) == []
    assert cluster.clashing_ports(cluster.default_topology(shared=1, internal_port=5102)) == [5102, 5103]
    assert cluster.clashing_ports(cluster.default_topology(frontends=3, shared=1, internal_port=4999)) == [5000]


def test_commands_of_front_ends_sharing_a_port(tmp_path: Path) -> None:
    """Each process on the shared port listens with reuse-port and at its own port,
    where the catalog pushes to it and its siblings tell it of their writes."""
    procs = cluster.commands(cluster.default_topology(frontends=2, shared=1), "127.0.0.1", str(tmp_path), None, 8)
    assert set(procs) > {"frontend", "frontend-1", "frontend-shared-1"}
    pushes = "http://127.0.0.1:5050,http://127.0.0.1:5001,http://127.0.0.1:5051"
    assert all(flags(procs[f"catalog-{i}"])["--frontends"] == pushes for i in (1, 2, 3))
    for name, own, sibling in (("frontend", "5050", "5051"), ("frontend-shared-1", "5051", "5050")):
        args = procs[name]
        assert args[-1] == "--reuse-port"
        named = flags(args[:-1])
        assert named["--port"] == "5000" and named["--internal-port"] == own
        assert named["--siblings"] == f"http://127.0.0.1:{sibling}"
        options = parse("frontend", *args[args.index("bazar-frontend") + 1:])
        assert options.settings.reuse_port and options.settings.internal_port == int(own)
    assert "--reuse-port" not in procs["frontend-1"] and "--internal-port" not in procs["frontend-1"]


def flags(args: list[str]) -> dict[str, str]:
    """--name value pairs after the plugin name."""
    rest = args[args.index(next(a for a in args if a.startswith("bazar-"))) + 1:]
    assert len(rest) % 2 == 0
    return dict(zip(rest[::2], rest[1::2]))


def test_commands_wire_every_process(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    procs = cluster.commands(cluster.default_topology(frontends=2), "127.0.0.1", data, None, 64)
    assert set(procs) == {"catalog-1", "catalog-2", "catalog-3", "order-1", "order-2", "order-3",
                          "frontend", "frontend-1"}
    catalog_peers = "1=http://127.0.0.1:5101,2=http://127.0.0.1:5102,3=http://127.0.0.1:5103"
    order_peers = "1=http://127.0.0.1:5201,2=http://127.0.0.1:5202,3=http://127.0.0.1:5203"
    catalogs = "http://127.0.0.1:5101,http://127.0.0.1:5102,http://127.0.0.1:5103"
    for name, args in procs.items():
        assert args[0] == "-n" and any(a.startswith("--logfile=") and name in a for a in args)
        assert f"bazar-{name.split('-')[0]}" in args
    assert flags(procs["catalog-2"]) == {
        "--host": "127.0.0.1", "--port": "5102", "--scheduling": "batch", "--id": "2",
        "--data": os.path.join(data, "catalog-2"),
        "--peers": catalog_peers, "--frontends": "http://127.0.0.1:5000,http://127.0.0.1:5001"}
    assert flags(procs["order-3"]) == {
        "--host": "127.0.0.1", "--port": "5203", "--scheduling": "batch", "--id": "3",
        "--data": os.path.join(data, "order-3"),
        "--peers": order_peers, "--catalog": catalogs}
    assert flags(procs["frontend-1"]) == {
        "--host": "127.0.0.1", "--port": "5001", "--scheduling": "batch", "--catalog": catalogs,
        "--order": "http://127.0.0.1:5201,http://127.0.0.1:5202,http://127.0.0.1:5203", "--cache-size": "64"}


def test_the_scheduling_policy_is_batch_unless_told_and_reaches_every_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kind in PLUGINS:
        assert parse(kind)["scheduling"] == "batch"
        assert parse(kind, "--scheduling", "normal")["scheduling"] == "normal"
        with pytest.raises(usage.UsageError, match="batch, normal"):
            parse(kind, "--scheduling", "fifo")
    monkeypatch.setenv("BAZAR_SCHEDULING", "normal")
    assert parse("order")["scheduling"] == "normal"
    supervisor = parse("cluster")
    procs = cluster.commands(cluster.default_topology(), "127.0.0.1", str(tmp_path), None, 8, supervisor["scheduling"])
    assert {flags(args)["--scheduling"] for args in procs.values()} == {"normal"}


def test_a_redis_url_goes_to_catalogs_and_front_ends(tmp_path: Path) -> None:
    procs = cluster.commands(cluster.default_topology(), "127.0.0.1", str(tmp_path), "redis://127.0.0.1:6379", 8)
    assert flags(procs["catalog-1"])["--redis"] == "redis://127.0.0.1:6379"
    assert flags(procs["frontend"])["--redis"] == "redis://127.0.0.1:6379"
    assert "--redis" not in flags(procs["order-1"])
    plain = cluster.commands(cluster.default_topology(), "127.0.0.1", str(tmp_path), None, 8)
    assert not any("--redis" in args for args in plain.values())


def test_every_command_parses_with_its_plugin_options(tmp_path: Path) -> None:
    procs = cluster.commands(cluster.default_topology(frontends=2), "127.0.0.1", str(tmp_path), "redis://r:1", 32)
    for name, args in procs.items():
        kind = name.split("-")[0]
        plugin_args = args[args.index(f"bazar-{kind}") + 1:]
        options = parse(kind, *plugin_args)
        assert options["port"] == int(flags(args)["--port"])
        if kind != "frontend":
            peers = parse_peers(options["peers"])
            assert sorted(peers) == [1, 2, 3] and options["id"] in peers
        else:
            assert options["cache-size"] == 32 and len(parse_urls(options["catalog"])) == 3


def test_the_plugins_name_their_modules() -> None:
    from twisted.plugins import bazar_plugins

    makers = {m.tapname: m for m in (bazar_plugins.bazar_frontend, bazar_plugins.bazar_catalog,
                                     bazar_plugins.bazar_order, bazar_plugins.bazar_cluster)}
    assert set(makers) == {"bazar-frontend", "bazar-catalog", "bazar-order", "bazar-cluster"}
    for tapname, maker in makers.items():
        assert maker.options is PLUGINS[tapname.split("-")[1]]


# -- replica identity from the host name (Kubernetes StatefulSet pods) -------------------------

@pytest.mark.parametrize("hostname, replica_id", [
    ("catalog-0", 1), ("catalog-2", 3), ("order-1.order.bazar.svc.cluster.local", 2), ("my-shop-catalog-10", 11)])
def test_id_from_hostname_is_the_ordinal_plus_one(hostname: str, replica_id: int) -> None:
    assert id_from_hostname(hostname) == replica_id


@pytest.mark.parametrize("hostname", ["catalog", "catalog-", "catalog-x", "vm", "-", "catalog-٣", ""])
def test_a_hostname_without_an_ordinal_is_a_usage_error(hostname: str) -> None:
    with pytest.raises(usage.UsageError, match="does not end in -N"):
        id_from_hostname(hostname)


@pytest.mark.parametrize("kind", ["catalog", "order"])
def test_the_id_flag_from_the_hostname(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: f"{kind}-2")
    peers = f"1=http://{kind}-0.{kind}:1,2=http://{kind}-1.{kind}:1,3=http://{kind}-2.{kind}:1"
    assert parse(kind, "--id-from-hostname", "--peers", peers)["id"] == 3
    assert parse(kind, "--id", "2", "--peers", peers)["id"] == 2  # without the flag: --id
    monkeypatch.setenv("BAZAR_ID_FROM_HOSTNAME", "true")
    assert parse(kind, "--id", "1", "--peers", peers)["id"] == 3  # the flag wins over --id
    monkeypatch.setattr(socket, "gethostname", lambda: f"{kind}-3")  # a fourth pod: not a peer
    with pytest.raises(usage.UsageError, match="not one of the --peers"):
        parse(kind, "--peers", peers)
    monkeypatch.setenv("BAZAR_ID_FROM_HOSTNAME", "maybe")
    with pytest.raises(usage.UsageError, match="BAZAR_ID_FROM_HOSTNAME"):
        parse(kind)
    monkeypatch.setenv("BAZAR_ID_FROM_HOSTNAME", "0")
    assert parse(kind)["id"] == 1


def test_one_process_per_data_directory(tmp_path: Any, capsys: Any) -> None:
    from bazar.lifecycle import hold_directory

    fd = hold_directory(str(tmp_path / "catalog-1"), "bazar-catalog")
    with pytest.raises(SystemExit) as refused:
        hold_directory(str(tmp_path / "catalog-1"), "bazar-catalog")
    assert refused.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bazar-catalog: {tmp_path / 'catalog-1'} is in use by another bazar-catalog; not starting"]
    os.close(fd)  # the holder is gone (as after its exit, even kill -9): the directory is free again
    os.close(hold_directory(str(tmp_path / "catalog-1"), "bazar-catalog"))


def test_the_signal_handler_only_hands_off() -> None:
    """Twisted #7736: logging inside a signal handler can deadlock on the log lock. Ours
    only queues the stop for the reactor's thread; the stop (and its log line) runs there."""
    from twisted.logger import globalLogPublisher

    from bazar.lifecycle import stop_from_signal

    class Reactor:
        running = True

        def __init__(self) -> None:
            self.queued: list[Any] = []
            self.stopped = 0

        def callFromThread(self, f: Any, *args: Any) -> None:
            self.queued.append((f, args))

        def stop(self) -> None:
            self.stopped += 1

    events: list[Any] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor = Reactor()
        handler = stop_from_signal(reactor)
        handler(15, None)
        handler(15, None)
        assert events == [] and reactor.stopped == 0 and len(reactor.queued) == 2
        f, args = reactor.queued[0]
        f(*args)
        assert reactor.stopped == 1 and any("stopping on a signal" in str(e.get("log_format")) for e in events)
    finally:
        globalLogPublisher.removeObserver(events.append)


@pytest.mark.parametrize("policy, expected", [("batch", os.SCHED_BATCH), ("normal", os.SCHED_OTHER)])
def test_a_process_takes_its_scheduling_policy(policy: str, expected: int) -> None:
    """In a child of its own (the test's process keeps its policy)."""
    import subprocess
    import sys

    code = (f"import os; from bazar.process import schedule; "
            f"print(schedule({policy!r}), os.sched_getscheduler(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", str(expected)]
