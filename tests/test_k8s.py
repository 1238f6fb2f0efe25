"""deploy/k8s against the two other descriptions of the same store: the processes
`bazar-cluster` runs (`bazar.cluster.default_topology()`) and docker/compose.yaml.

The manifests are rendered with `kubectl kustomize` (base and overlays/local) and
compared field by field: services, replica counts and ids, ports, commands, peers,
probes, volumes, security settings and the secrets' names. No cluster is used.
Run with `tox -e k8s` (kubectl must be on the PATH).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bazar.cluster import default_topology
from bazar.config import id_from_hostname, parse_peers, parse_urls

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
TOPOLOGY = default_topology()
REPLICATED = ("catalog", "order")
SECRET = "bazar-secrets"
SECRET_NAMES = {"BAZAR_ADMIN_TOKEN", "BAZAR_CLUSTER_SECRET", "BAZAR_REDIS_PASSWORD"}
IMAGE_USER = 10001  # docker/Dockerfile: USER 10001:10001


def render(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/k8s (tox -e k8s)"
    out = subprocess.run([kubectl, "kustomize", str(path)], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    found = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(found) == len(docs), "two resources of one kind share a name"
    return found


@pytest.fixture(scope="module", params=["base", "overlays/local"])
def manifests(request: pytest.FixtureRequest) -> Iterator[dict[tuple[str, str], dict[str, Any]]]:
    yield render(K8S / request.param)


@pytest.fixture(scope="module")
def local() -> dict[tuple[str, str], dict[str, Any]]:
    return render(K8S / "overlays" / "local")


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict[str, Any]]:
    return render(K8S / "base")


def processes(service: str) -> list[dict[str, Any]]:
    return [p for p in TOPOLOGY if p["service"] == service]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def option(command: list[str], name: str) -> str:
    assert command.count(name) == 1, f"{name} must appear once in {command}"
    return command[command.index(name) + 1]


def compose_command(name: str) -> list[str]:
    return [str(arg) for arg in COMPOSE[name]["command"]]


def compose_env(name: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in COMPOSE[name]["environment"].items()}


def pod_url(service: str, replica_id: int) -> str:
    """The stable name of a replica: pod <service>-<id - 1> of the headless Service."""
    return f"http://{service}-{replica_id - 1}.{service}:{processes(service)[0]['port']}"


def bazar_workloads(m: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    return [m[("StatefulSet", s)] for s in REPLICATED] + [m[("Deployment", "frontend")]]


# -- the topology --------------------------------------------------------------------------------

def test_the_same_services_as_bazar_cluster_and_compose(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    services = {p["service"] for p in TOPOLOGY}
    assert services == {"catalog", "order", "frontend"}
    workloads = {name for kind, name in manifests if kind in ("StatefulSet", "Deployment")}
    assert workloads == services | {"redis"}
    assert {name for kind, name in manifests if kind == "Service"} == services | {"redis"}
    compose_kinds = {name.rstrip("0123456789") for name in COMPOSE}
    assert compose_kinds == services | {"redis"}
    assert manifests[("Deployment", "redis")]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        COMPOSE["redis"]["image"]
    # (compose writes a literal $ as $$)
    assert container(manifests[("Deployment", "redis")])["command"] == \
        [part.replace("$$", "$") for part in COMPOSE["redis"]["command"]]


@pytest.mark.parametrize("service", REPLICATED)
def test_replicated_services_are_statefulsets_of_the_topology_size(
        manifests: dict[tuple[str, str], dict[str, Any]], service: str) -> None:
    sts = manifests[("StatefulSet", service)]
    ids = [p["id"] for p in processes(service)]
    assert sts["spec"]["replicas"] == len(ids) == 3
    assert [n for n in COMPOSE if n.rstrip("0123456789") == service] == [f"{service}{i}" for i in ids]
    # pod <service>-N is replica N + 1, as --id-from-hostname reads it
    assert [id_from_hostname(f"{service}-{n}") for n in range(sts["spec"]["replicas"])] == ids
    assert sts["spec"]["serviceName"] == service
    # all at once: one replica alone can never become ready (no majority, no primary)
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = manifests[("Service", service)]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert headless["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in headless["ports"]] == [processes(service)[0]["port"]]


@pytest.mark.parametrize("service", REPLICATED)
def test_replica_commands_are_the_compose_commands_with_the_id_from_the_pod_name(
        manifests: dict[tuple[str, str], dict[str, Any]], service: str) -> None:
    """Every pod of a StatefulSet runs one command: compose's, with --id N replaced by
    --id-from-hostname, and the port of the topology's first replica (each pod has
    its own address, so all replicas of a service share the port)."""
    c = container(manifests[("StatefulSet", service)])
    first = processes(service)[0]
    expected = compose_command(f"{service}{first['id']}")
    at = expected.index("--id")
    expected[at:at + 2] = ["--id-from-hostname"]
    assert c["command"] == expected
    assert option(c["command"], "--port") == str(first["port"]) == env(c)["BAZAR_PORT"]
    assert [p["containerPort"] for p in c["ports"]] == [first["port"]]


@pytest.mark.parametrize("service", REPLICATED)
def test_peers_are_every_replica_by_its_stable_name(
        manifests: dict[tuple[str, str], dict[str, Any]], service: str) -> None:
    c = container(manifests[("StatefulSet", service)])
    ids = [p["id"] for p in processes(service)]
    peers = parse_peers(env(c)["BAZAR_PEERS"])
    assert peers == {i: pod_url(service, i) for i in ids}
    assert set(peers) == set(parse_peers(compose_env(f"{service}1")["BAZAR_PEERS"]))


def test_everyone_knows_every_replica(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    catalog = [pod_url("catalog", p["id"]) for p in processes("catalog")]
    order = [pod_url("order", p["id"]) for p in processes("order")]
    frontend = env(container(manifests[("Deployment", "frontend")]))
    assert parse_urls(frontend["BAZAR_CATALOG"]) == catalog
    assert parse_urls(frontend["BAZAR_ORDER"]) == order
    assert parse_urls(env(container(manifests[("StatefulSet", "order")]))["BAZAR_CATALOG"]) == catalog
    # the same settings as compose, by name
    assert set(frontend) == set(compose_env("frontend"))
    assert set(env(container(manifests[("StatefulSet", "order")]))) == set(compose_env("order1"))


def test_invalidations_travel_through_redis(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Front ends are a Deployment behind one Service: an HTTP push would reach one of
    them, so the catalog publishes on Redis only (compose also pushes over HTTP)."""
    catalog = env(container(manifests[("StatefulSet", "catalog")]))
    frontend = env(container(manifests[("Deployment", "frontend")]))
    assert catalog["BAZAR_REDIS"] == frontend["BAZAR_REDIS"] == compose_env("catalog1")["BAZAR_REDIS"]
    assert set(catalog) == set(compose_env("catalog1")) - {"BAZAR_FRONTENDS"}
    host_port = catalog["BAZAR_REDIS"].removeprefix("redis://")
    assert host_port == "redis:" + str(manifests[("Service", "redis")]["spec"]["ports"][0]["port"])


def test_the_front_end_is_a_scalable_deployment_behind_a_service(
        manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    (fe,) = processes("frontend")
    deployment = manifests[("Deployment", "frontend")]
    assert deployment["spec"]["replicas"] >= 2
    c = container(deployment)
    assert c["command"] == compose_command("frontend")
    assert option(c["command"], "--port") == str(fe["port"]) == env(c)["BAZAR_PORT"]
    service = manifests[("Service", "frontend")]["spec"]
    assert [p["port"] for p in service["ports"]] == [fe["port"]]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]


# -- probes, volumes, security -------------------------------------------------------------------

def test_liveness_is_health_and_readiness_is_ready(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for workload in bazar_workloads(manifests):
        c = container(workload)
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
            get = c[probe]["httpGet"]
            assert get["path"] == path, (workload["metadata"]["name"], probe)
            assert named[get["port"]] == int(option(c["command"], "--port"))


@pytest.mark.parametrize("service", REPLICATED)
def test_each_replica_has_its_own_volume_at_data(
        manifests: dict[tuple[str, str], dict[str, Any]], service: str) -> None:
    sts = manifests[("StatefulSet", service)]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    c = container(sts)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == option(c["command"], "--data") == "/data"
    compose_volume = COMPOSE[f"{service}1"]["volumes"][0]
    assert compose_volume.split(":")[1] == "/data"


def test_non_root_read_only_and_bounded(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for workload in [*bazar_workloads(manifests), manifests[("Deployment", "redis")]]:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["automountServiceAccountToken"] is False, name
        c = container(workload)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
    for workload in bazar_workloads(manifests):
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == IMAGE_USER
        mounts = {m["mountPath"] for m in container(workload)["volumeMounts"]}
        assert "/tmp" in mounts  # the one writable place besides /data


def test_secrets_come_from_one_secret_that_is_not_in_the_manifests(
        manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert not [key for key in manifests if key[0] == "Secret"]
    for workload in bazar_workloads(manifests):
        c = container(workload)
        assert c["envFrom"] == [{"secretRef": {"name": SECRET}}]
        assert not SECRET_NAMES & set(env(c)), "a secret value in a manifest"
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert example["kind"] == "Secret" and example["metadata"]["name"] == SECRET
    assert set(example["stringData"]) == SECRET_NAMES
    assert all(value.startswith("change-me") for value in example["stringData"].values())
    env_example = (ROOT / "docker" / "bazar.env.example").read_text().splitlines()
    assert {line.split("=", 1)[0] for line in env_example if line and not line.startswith("#")} == SECRET_NAMES


# -- availability ----------------------------------------------------------------------------------

@pytest.mark.parametrize("service", REPLICATED)
def test_a_majority_survives_voluntary_disruption(
        manifests: dict[tuple[str, str], dict[str, Any]], service: str) -> None:
    sts = manifests[("StatefulSet", service)]
    pdb = manifests[("PodDisruptionBudget", service)]["spec"]
    assert pdb["minAvailable"] == sts["spec"]["replicas"] // 2 + 1 == 2
    assert pdb["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def test_the_front_end_may_lose_one_pod_to_a_drain(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    pdb = manifests[("PodDisruptionBudget", "frontend")]["spec"]
    assert 1 <= pdb["minAvailable"] < manifests[("Deployment", "frontend")]["spec"]["replicas"]


def anti_affinity(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("service", REPLICATED)
def test_one_replica_per_node_required_in_base_preferred_locally(
        base: dict[tuple[str, str], dict[str, Any]], local: dict[tuple[str, str], dict[str, Any]],
        service: str) -> None:
    own = {"matchLabels": base[("StatefulSet", service)]["spec"]["selector"]["matchLabels"]}
    (required,) = anti_affinity(base[("StatefulSet", service)])["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required == {"labelSelector": own, "topologyKey": "kubernetes.io/hostname"}
    relaxed = anti_affinity(local[("StatefulSet", service)])
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in relaxed  # a one-node cluster fits all three
    assert relaxed["preferredDuringSchedulingIgnoredDuringExecution"] == [{"weight": 100, "podAffinityTerm": required}]


def test_the_local_overlay_uses_the_locally_built_image_in_its_namespace(
        local: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert ("Namespace", "bazar") in local
    for workload in bazar_workloads(local):
        assert workload["metadata"]["namespace"] == "bazar"
        c = container(workload)
        assert c["image"] == "bazar:local" and c["imagePullPolicy"] == "IfNotPresent"
