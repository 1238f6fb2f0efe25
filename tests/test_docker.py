"""The Docker deployment (docker/): compose topology, Dockerfile, and a local run.

No Docker engine is used here: compose.yaml and the Dockerfile are parsed, and
the integration test runs each compose service's exact command and environment
as a plain local process on loopback ports, which is what the containers do.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from bazar.testing.processes import TWISTD, Processes, call, free_ports

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / "bazar.env.example"
ENV_FILE_NAME = "bazar.env"

SECRET_NAMES = {"BAZAR_ADMIN_TOKEN", "BAZAR_CLUSTER_SECRET", "BAZAR_REDIS_PASSWORD"}
# Replicated services and the port of replica 0 (replica N listens on base + N).
REPLICATED = {"catalog": 5100, "order": 5200}
REPLICAS = (1, 2, 3)
FRONTEND_PORT = 5000
REDIS_PORT = 6379
BAZAR_SERVICES = [f"{kind}{i}" for kind in REPLICATED for i in REPLICAS] + ["frontend"]
URL_RE = re.compile(r"(?P<scheme>[a-z]+)://(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)")


# --- reading the compose file ---------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return cast(dict[str, dict[str, Any]], compose["services"])


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    # The list form keeps the empty --pidfile= value and needs no shell quoting.
    assert isinstance(command, list), "use the list form for command:"
    return [str(arg) for arg in command]


def option(command: list[str], name: str) -> str:
    assert command.count(name) == 1, f"{name} must appear exactly once in {command}"
    return command[command.index(name) + 1]


def plugin_of(command: list[str]) -> str:
    plugins = [arg for arg in command if arg.startswith("bazar-")]
    assert len(plugins) == 1, command
    return plugins[0]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}


def peers(value: str) -> dict[int, str]:
    pairs = (item.split("=", 1) for item in value.split(","))
    return {int(replica): url for replica, url in pairs}


def urls(value: str) -> list[str]:
    return value.split(",")


def replica_url(kind: str, replica: int) -> str:
    return f"http://{kind}{replica}:{REPLICATED[kind] + replica}"


def published_ports(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(published, target) pairs of a service's ports, short or long syntax."""
    result = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            result.append((str(port.get("published")), str(port["target"])))
        else:
            parts = str(port).split(":")
            assert len(parts) >= 2, f"publish an explicit host port, not {port!r}"
            result.append((parts[-2], parts[-1].split("/")[0]))
    return result


def env_files_of(service: dict[str, Any]) -> list[str]:
    env_file = service.get("env_file") or []
    entries = env_file if isinstance(env_file, list) else [env_file]
    return [entry["path"] if isinstance(entry, dict) else entry for entry in entries]


# --- compose topology --------------------------------------------------------


def test_services_are_three_catalog_three_order_one_frontend_and_redis(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(services) == set(BAZAR_SERVICES) | {"redis"}
    assert services["redis"]["image"].startswith("redis:7")
    for name in BAZAR_SERVICES:
        kind = name.rstrip("0123456789")
        assert plugin_of(command_of(services[name])) == f"bazar-{kind}"


def test_common_block_is_an_extension_field(compose: dict[str, Any]) -> None:
    assert "x-bazar" in compose
    text = COMPOSE_FILE.read_text()
    assert text.count("<<: *bazar") == len(BAZAR_SERVICES)


def test_every_service_runs_twistd_in_the_foreground_without_pidfile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in BAZAR_SERVICES:
        command = command_of(services[name])
        assert command[0] == "twistd"
        twistd_options = command[: command.index(plugin_of(command))]
        assert "-n" in twistd_options and "--pidfile=" in twistd_options, name
        assert option(command, "--host") == "0.0.0.0", name


def test_only_the_frontend_publishes_a_port(
    services: dict[str, dict[str, Any]],
) -> None:
    publishing = {name for name, service in services.items() if service.get("ports")}
    assert publishing == {"frontend"}
    assert published_ports(services["frontend"]) == [
        (str(FRONTEND_PORT), str(FRONTEND_PORT))
    ]
    assert option(command_of(services["frontend"]), "--port") == str(FRONTEND_PORT)


def test_each_replica_has_its_own_named_volume_at_data(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    sources = []
    for kind in REPLICATED:
        for replica in REPLICAS:
            service = services[f"{kind}{replica}"]
            volumes = service.get("volumes") or []
            assert len(volumes) == 1, f"{kind}{replica}: {volumes}"
            volume = volumes[0]
            if isinstance(volume, dict):
                source, target = volume["source"], volume["target"]
            else:
                source, target = volume.split(":")[:2]
            assert target == "/data"
            assert source in declared, f"{source} is not a named volume"
            assert option(command_of(service), "--data") == "/data"
            sources.append(source)
    assert len(set(sources)) == len(sources), "replicas share a volume"


def test_replica_ids_and_ports_match_their_names(
    services: dict[str, dict[str, Any]],
) -> None:
    for kind, base in REPLICATED.items():
        for replica in REPLICAS:
            service = services[f"{kind}{replica}"]
            command = command_of(service)
            assert option(command, "--id") == str(replica)
            assert option(command, "--port") == str(base + replica)
    for name in BAZAR_SERVICES:
        # The health check reads BAZAR_PORT; it must be the port served.
        command = command_of(services[name])
        assert environment_of(services[name])["BAZAR_PORT"] == option(command, "--port")


def test_every_replica_lists_all_three_replicas_of_its_service(
    services: dict[str, dict[str, Any]],
) -> None:
    for kind in REPLICATED:
        expected = {replica: replica_url(kind, replica) for replica in REPLICAS}
        for replica in REPLICAS:
            env = environment_of(services[f"{kind}{replica}"])
            assert peers(env["BAZAR_PEERS"]) == expected, f"{kind}{replica}"


def test_catalog_pushes_to_the_frontend_and_uses_redis(
    services: dict[str, dict[str, Any]],
) -> None:
    for replica in REPLICAS:
        env = environment_of(services[f"catalog{replica}"])
        assert urls(env["BAZAR_FRONTENDS"]) == [f"http://frontend:{FRONTEND_PORT}"]
        assert env["BAZAR_REDIS"] == f"redis://redis:{REDIS_PORT}"


def test_order_and_frontend_know_every_replica(
    services: dict[str, dict[str, Any]],
) -> None:
    catalog = [replica_url("catalog", replica) for replica in REPLICAS]
    order = [replica_url("order", replica) for replica in REPLICAS]
    for replica in REPLICAS:
        assert (
            urls(environment_of(services[f"order{replica}"])["BAZAR_CATALOG"])
            == catalog
        )
    frontend = environment_of(services["frontend"])
    assert urls(frontend["BAZAR_CATALOG"]) == catalog
    assert urls(frontend["BAZAR_ORDER"]) == order
    assert frontend["BAZAR_REDIS"] == f"redis://redis:{REDIS_PORT}"


def test_every_url_names_a_service_and_the_port_it_serves(
    services: dict[str, dict[str, Any]],
) -> None:
    served = {
        name: int(option(command_of(services[name]), "--port"))
        for name in BAZAR_SERVICES
    }
    served["redis"] = REDIS_PORT
    for name, service in services.items():
        for key, value in environment_of(service).items():
            for match in URL_RE.finditer(value):
                host, port = match["host"], int(match["port"])
                assert host in served, f"{name} {key}: unknown host {host}"
                assert port == served[host], (
                    f"{name} {key}: {host} serves {served[host]}"
                )


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        healthcheck = service.get("healthcheck")
        assert healthcheck and healthcheck.get("test"), name
        assert not healthcheck.get("disable"), name
    for name in BAZAR_SERVICES:
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "/health" in test and "BAZAR_PORT" in test and "urllib" in test, name


def test_secrets_come_from_the_env_file_only(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in BAZAR_SERVICES:
        assert env_files_of(services[name]) == [ENV_FILE_NAME], name
        env = environment_of(services[name])
        assert not SECRET_NAMES & set(env), f"{name} sets a secret in compose.yaml"
        for key in env:
            assert not re.search(r"TOKEN|SECRET|PASSWORD", key), f"{name}: {key}"
    text = COMPOSE_FILE.read_text()
    for secret in SECRET_NAMES:
        assert not re.search(rf"{secret}\s*[:=]", text), (
            f"{secret} has a value in compose.yaml"
        )
    for value in env_file_values(ENV_EXAMPLE).values():
        assert value not in text
    # The real env file is never committed; the example names every secret.
    assert ENV_FILE_NAME in (DOCKER / ".gitignore").read_text().split()
    assert set(env_file_values(ENV_EXAMPLE)) == SECRET_NAMES


def env_file_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_compose_matches_the_bazar_cluster_default_topology(
    services: dict[str, dict[str, Any]],
) -> None:
    from bazar.cluster import default_topology

    topology = default_topology()
    replicas = {
        (entry["service"], int(entry["id"]), int(entry["port"]))
        for entry in topology
        if entry["service"] != "frontend"
    }
    frontends = {
        int(entry["port"]) for entry in topology if entry["service"] == "frontend"
    }
    assert len(topology) == len(BAZAR_SERVICES)

    compose_replicas = set()
    for kind in REPLICATED:
        for replica in REPLICAS:
            command = command_of(services[f"{kind}{replica}"])
            compose_replicas.add(
                (kind, int(option(command, "--id")), int(option(command, "--port")))
            )
    assert replicas == compose_replicas
    assert frontends == {int(option(command_of(services["frontend"]), "--port"))}
    for entry in topology:
        if entry["service"] != "frontend":
            assert entry["name"] == f"{entry['service']}-{entry['id']}"


# --- Dockerfile ----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def test_dockerfile_uses_python_slim() -> None:
    assert final_stage()[0][1].split()[0] == "python:3.12-slim"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [arguments for name, arguments in final_stage() if name == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_dockerfile_installs_the_package_and_builds_the_plugin_cache() -> None:
    runs = " ".join(arguments for name, arguments in final_stage() if name == "RUN")
    assert "pip install" in runs
    assert "getPlugins(IPlugin)" in runs
    # The cache is built before dropping root: the runtime user cannot write it.
    names = [name for name, _ in final_stage()]
    cache_run = next(
        i
        for i, (name, args) in enumerate(final_stage())
        if name == "RUN" and "getPlugins" in args
    )
    assert cache_run < names.index("USER")


def test_dockerfile_has_a_healthcheck_on_health() -> None:
    healthchecks = [
        arguments for name, arguments in final_stage() if name == "HEALTHCHECK"
    ]
    assert len(healthchecks) == 1
    assert "/health" in healthchecks[0] and "urllib" in healthchecks[0]
    assert "curl" not in healthchecks[0]


def test_dockerfile_shows_how_to_run_a_service() -> None:
    assert "--pidfile=" in DOCKERFILE.read_text()
    assert [name for name, _ in final_stage()].count("CMD") == 1
    assert "--logger=bazar.lifecycle.json_logger" in DOCKERFILE.read_text()


def test_json_logger_writes_one_plain_json_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    """What a container's log collector reads: a JSON object per line (no record
    separator, no nesting), with the time in UTC, the level, the namespace, the
    rendered message and, for a failure, its traceback as text."""
    import json
    from datetime import datetime, timedelta, timezone

    from twisted.logger import Logger

    from bazar.lifecycle import json_logger

    log = Logger(observer=json_logger(), namespace="bazar.test")
    log.info("applied {seq}\nof {service}", seq=7, service="catalog")
    try:
        raise ZeroDivisionError("the failure's own words")
    except ZeroDivisionError:
        log.failure("sending to replica {peer} failed", peer=2)
    out = capsys.readouterr().out
    assert "\x1e" not in out and out.endswith("\n")
    lines = out.splitlines()
    assert len(lines) == 2, out
    info, failure = (json.loads(line) for line in lines)
    assert info == {"time": info["time"], "level": "info", "namespace": "bazar.test",
                    "message": "applied 7\nof catalog"}
    assert info["time"].endswith("Z")
    when = datetime.fromisoformat(info["time"].replace("Z", "+00:00"))
    assert abs(datetime.now(timezone.utc) - when) < timedelta(minutes=1)
    assert set(failure) == {"time", "level", "namespace", "message", "traceback"}
    assert (failure["level"], failure["message"]) == ("critical", "sending to replica 2 failed")
    assert failure["traceback"].startswith("Traceback") and "the failure's own words" in failure["traceback"]


# --- running the compose commands as local processes ----------------------------


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON or None) of one call."""
    response = call(method, url, body, headers=headers, timeout=5)
    try:
        return response.status, response.json
    except ValueError:
        return response.status, None


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.stop()


# twistd itself (`python -m twisted` would be `twist`, which has no -n/--pidfile).
TWISTD_ARGV = [sys.executable, "-c", TWISTD]


def local_argv(command: list[str], port: int, data: Path) -> list[str]:
    assert command[0] == "twistd"
    argv = TWISTD_ARGV + command[1:]
    replacements = {"--host": "127.0.0.1", "--port": str(port), "--data": str(data)}
    for flag, value in replacements.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    return argv


def local_environment(
    service: dict[str, Any], port: int, local_ports: dict[str, int]
) -> dict[str, str]:
    """The service's compose environment with service names turned into loopback
    addresses, plus test secrets standing in for bazar.env."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("BAZAR_")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    for secret in env_file_values(ENV_EXAMPLE):
        env[secret] = f"test-{secret.lower().replace('_', '-')}"

    def to_loopback(match: re.Match[str]) -> str:
        return f"{match['scheme']}://127.0.0.1:{local_ports[match['host']]}"

    for key, value in environment_of(service).items():
        hosts = {match["host"] for match in URL_RE.finditer(value)}
        if not hosts <= set(local_ports):
            continue  # e.g. BAZAR_REDIS when no redis-server is installed here
        env[key] = URL_RE.sub(to_loopback, value)
    env["BAZAR_PORT"] = str(port)
    return env


def wait_until_healthy(
    processes: Processes, ports: dict[str, int], deadline: float
) -> None:
    pending = dict(ports)
    while pending:
        assert not processes.exited(), (
            f"exited early: {processes.exited()}\n{processes.logs()}"
        )
        assert time.monotonic() < deadline, (
            f"not healthy: {sorted(pending)}\n{processes.logs()}"
        )
        for name, port in list(pending.items()):
            try:
                status, body = http("GET", f"http://127.0.0.1:{port}/health")
            except OSError:
                continue
            if status == 200 and isinstance(body, dict) and body.get("status") == "ok":
                del pending[name]
        time.sleep(0.5)


@pytest.mark.integration
def test_compose_commands_run_locally(
    services: dict[str, dict[str, Any]], processes: Processes, tmp_path: Path
) -> None:
    names = list(BAZAR_SERVICES)
    ports = free_ports(len(names) + 1)
    local_ports = dict(zip(names, ports))
    redis_server = shutil.which("redis-server")
    if redis_server:
        local_ports["redis"] = ports[-1]
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir()
        processes.start(
            "redis",
            [
                redis_server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(ports[-1]),
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                "test-bazar-redis-password",  # the value local_environment gives every service
            ],
            dict(os.environ),
            redis_dir,
        )

    for name in names:
        workdir = tmp_path / name
        data = workdir / "data"
        data.mkdir(parents=True)
        port = local_ports[name]
        argv = local_argv(command_of(services[name]), port, data)
        env = local_environment(services[name], port, local_ports)
        processes.start(name, argv, env, workdir)

    wait_until_healthy(
        processes, {name: local_ports[name] for name in names}, time.monotonic() + 60
    )

    frontend = f"http://127.0.0.1:{local_ports['frontend']}"
    # A fresh cluster may still be choosing its primaries: retry 503s, safely,
    # under one idempotency key.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    deadline = time.monotonic() + 30
    while True:
        try:
            status, body = http(
                "POST", f"{frontend}/bazar/purchase/1", {"quantity": 1}, key
            )
        except OSError:
            status, body = 0, None
        if status not in (0, 503) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200, f"{status} {body}\n{processes.logs()}"
    assert body["order"]["book_id"] == 1

    status, book = http("GET", f"{frontend}/bazar/info/1")
    assert status == 200, book
    assert book["quantity"] == 59
