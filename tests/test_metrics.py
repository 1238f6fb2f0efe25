"""Prometheus: what every process serves at /metrics (promtool finds nothing to say
about it), the figures of replicas and front ends read at scrape time, and the alert
rules of deploy/prometheus (promtool check rules, promtool test rules).

promtool comes with Debian's `prometheus` package, which the README's test command
installs: without it these tests fail rather than skip."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bazar import __version__
from bazar.replication.routes import ReplicaFigures
from bazar.testing.memory import CATALOG_PORT, ORDER_PORT, TOKEN, Cluster, Driver, Shop, restock, url_of

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
ROLES = ("primary", "follower", "pre-candidate", "candidate")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install -y prometheus (the README's test command does)"
    return subprocess.run([found, *args], input=stdin, capture_output=True, timeout=120, cwd=ROOT, check=False)


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def scrape(driver: Driver, port: int) -> Samples:
    r = driver.http("GET", url_of(port) + "/metrics")
    assert r.code == 200
    return samples(r.body.decode())


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[Shop]:
    with closing(Shop(str(tmp_path), cache_size=2)) as s:  # a small cache, to see evictions
        yield s


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with closing(Cluster(str(tmp_path))) as c:
        yield c


def exercise(shop: Shop) -> None:
    """Traffic that gives every kind of figure a value: cache hits, misses and an
    eviction, a purchase, an admin write, a 404, a 304."""
    for path in ("/bazar/info/1", "/bazar/info/1", "/bazar/info/2", "/bazar/search/new", "/bazar/info/99"):
        shop.api("GET", path)
    tag = shop.api("GET", "/bazar/info/all").header("ETag") or ""
    assert shop.api("GET", "/bazar/info/all", headers={"If-None-Match": tag}).code == 304
    assert shop.api("POST", "/bazar/purchase/1", json={"quantity": 1}).code == 200
    assert shop.api("POST", "/bazar/restock/1", json={"quantity": 1}, admin=True).code == 200


# -- the exposition ---------------------------------------------------------------------

def test_every_process_serves_what_promtool_accepts_without_a_word(shop: Shop) -> None:
    exercise(shop)
    for node in shop.nodes:
        text = generate_latest(node.app.registry)
        checked = promtool("check", "metrics", stdin=text)
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, b"", b""), (node.app.service, checked)


def test_every_process_serves_the_process_collectors_and_its_build(shop: Shop) -> None:
    for port in (CATALOG_PORT, ORDER_PORT, 5000):
        found = scrape(shop, port)
        assert value(found, "bazar_build_info", version=__version__) == 1
        names = {name for name, _ in found}
        assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                "python_info", "python_gc_collections_total"} <= names, port


# -- a replica's figures ----------------------------------------------------------------

def test_replica_figures_follow_its_state(cluster: Cluster) -> None:
    leader = cluster.elect()
    cluster.submit(restock(1))
    cluster.run(0.5)
    for i in cluster.ids:
        replica = cluster[i]
        found = scrape(cluster, cluster.port(i))
        ids = {"service": "catalog", "replica": str(i)}
        role = "primary" if i == leader.replica_id else "follower"
        assert {r: value(found, "bazar_replica_role", role=r, **ids) for r in ROLES} == \
            {r: float(r == role) for r in ROLES}
        assert value(found, "bazar_replica_epoch", **ids) == replica.epoch == leader.epoch
        assert value(found, "bazar_replica_commit_index", **ids) == replica.core.commit
        assert value(found, "bazar_replica_applied_index", **ids) == replica.store.applied == leader.store.applied
        assert value(found, "bazar_replica_lag_entries", **ids) == 0
        assert value(found, "bazar_replica_serving", **ids) == 1
        assert value(found, "bazar_replica_voter", **ids) == 1
        assert value(found, "bazar_replica_request_ids", **ids) == replica.store.request_ids() >= 1
        assert value(found, "bazar_elections_total", **ids) == replica.core.elections
        assert value(found, "bazar_snapshots_total", kind="taken", **ids) == 0
        assert value(found, "bazar_snapshots_total", kind="installed", **ids) == 0
    assert leader.core.elections >= 1

    # log compaction counts its snapshots on the replica; the metric reads them
    leader.snapshots["taken"] += 2
    found = scrape(cluster, cluster.port(leader.replica_id))
    assert value(found, "bazar_snapshots_total", kind="taken", service="catalog", replica=str(leader.replica_id)) == 2

    # a backup told of commits it has not applied yet lags by them (read at once: time
    # running on, the next heartbeat would bring it up to date)
    backup = next(cluster[i] for i in cluster.ids if i != leader.replica_id)
    backup.leader_commit = backup.store.applied + 5
    registry = CollectorRegistry()
    registry.register(ReplicaFigures(backup))
    found = samples(generate_latest(registry).decode())
    assert value(found, "bazar_replica_lag_entries", service="catalog", replica=str(backup.replica_id)) == 5


def test_elections_count_candidacies_not_pre_votes(cluster: Cluster) -> None:
    old = cluster.elect()
    others = [i for i in cluster.ids if i != old.replica_id]
    before = {i: cluster[i].core.elections for i in others}
    cluster.kill(old.replica_id)
    new = cluster.elect()
    assert new.epoch > old.epoch
    found = scrape(cluster, cluster.port(new.replica_id))
    ids = {"service": "catalog", "replica": str(new.replica_id)}
    assert value(found, "bazar_elections_total", **ids) == new.core.elections > before[new.replica_id]
    assert value(found, "bazar_replica_epoch", **ids) == new.epoch

    # a backup cut off from the primary stops serving; its pre-votes fail, so it starts
    # no election and its term stays (the primary is not disturbed when it returns)
    backup = next(i for i in others if i != new.replica_id)
    elections, epoch = cluster[backup].core.elections, cluster[backup].epoch
    cluster.network.cut(cluster.port(backup), cluster.port(new.replica_id))
    cluster.run(5.0)
    found = scrape(cluster, cluster.port(backup))
    ids = {"service": "catalog", "replica": str(backup)}
    assert value(found, "bazar_replica_serving", **ids) == 0
    assert value(found, "bazar_replica_role", role="primary", **ids) == 0
    assert value(found, "bazar_elections_total", **ids) == elections
    assert value(found, "bazar_replica_epoch", **ids) == epoch


def test_a_replica_that_lost_its_data_is_no_voter_until_caught_up(cluster: Cluster) -> None:
    leader = cluster.elect()
    for n in range(3):
        cluster.submit(restock(n))
    lost = next(i for i in cluster.ids if i != leader.replica_id)
    cluster.restart(lost, fresh=True)
    ids = {"service": "catalog", "replica": str(lost)}
    found = scrape(cluster, cluster.port(lost))
    assert (value(found, "bazar_replica_voter", **ids), value(found, "bazar_replica_serving", **ids)) == (0, 0)
    cluster.until(lambda: cluster[lost].store.voter and cluster[lost].serving)
    found = scrape(cluster, cluster.port(lost))
    assert (value(found, "bazar_replica_voter", **ids), value(found, "bazar_replica_serving", **ids)) == (1, 1)


# -- a front end's figures --------------------------------------------------------------

def test_front_end_figures(shop: Shop) -> None:
    for path in ("/bazar/info/1", "/bazar/info/1", "/bazar/info/2", "/bazar/info/3"):
        assert shop.api("GET", path).code == 200
    text = shop.api("GET", "/metrics").body.decode()
    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert {name: types[name] for name in ("bazar_cache_hits", "bazar_cache_misses", "bazar_cache_evictions",
                                           "bazar_cache_entries", "bazar_service_primary_known")} == \
        {"bazar_cache_hits": "counter", "bazar_cache_misses": "counter", "bazar_cache_evictions": "counter",
         "bazar_cache_entries": "gauge", "bazar_service_primary_known": "gauge"}
    found = samples(text)
    stats = shop.cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["size"]) == (1, 3, 1, 2)
    assert value(found, "bazar_cache_hits_total") == 1
    assert value(found, "bazar_cache_misses_total") == 3
    assert value(found, "bazar_cache_evictions_total") == 1
    assert value(found, "bazar_cache_entries") == 2
    assert value(found, "bazar_service_primary_known", service="catalog") == 1
    assert value(found, "bazar_service_primary_known", service="order") == 1

    shop.network.kill(ORDER_PORT)
    shop.poll()
    found = scrape(shop, 5000)
    assert value(found, "bazar_service_primary_known", service="catalog") == 1
    assert value(found, "bazar_service_primary_known", service="order") == 0
    assert shop.api("GET", "/ready").code == 503


# -- the alert rules --------------------------------------------------------------------

def test_alert_rules_are_valid_and_their_tests_pass() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked
    assert b"SUCCESS" in checked.stdout and b"WARNING" not in checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested


def test_every_alert_is_tested_firing_and_silent() -> None:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    alerts = {rule["alert"] for rule in rules}
    assert alerts == {"BazarNoPrimary", "BazarFrequentElections", "BazarReplicaNotServing", "BazarFrontendNoPrimary"}
    fires: set[str] = set()
    silent: set[str] = set()
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    assert fires == silent == alerts


def test_alerts_read_only_figures_bazar_serves(shop: Shop) -> None:
    exercise(shop)
    served = set()
    for node in shop.nodes:
        served |= {name for name, _ in samples(generate_latest(node.app.registry).decode())}
    used = set(re.findall(r"\bbazar_[a-z_]+\b", ALERTS.read_text()))
    assert used and used <= served, used - served


def test_the_admin_token_is_not_in_metrics(shop: Shop) -> None:
    exercise(shop)
    for node in shop.nodes:
        assert TOKEN.encode() not in generate_latest(node.app.registry)
