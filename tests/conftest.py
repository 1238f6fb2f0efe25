"""Shared pytest wiring: the real-process helpers of bazar.testing.processes as fixtures, a
session-end safety net that stops anything a test started, and the tail of every
Bazar process log attached to the report of a failing integration test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bazar.testing import processes


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_processes() -> Iterator[None]:
    yield
    processes.stop_everything()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, processes.Cluster):
                report.sections.append((f"bazar logs ({value.data})", value.tail_logs()))


@pytest.fixture(scope="module")
def start_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., processes.Cluster]]:
    """Start clusters (and stop them at module end): start_cluster(frontends=2, redis=url)."""
    started: list[processes.Cluster] = []

    def start(name: str = "cluster", wait: float = 60.0, **kw: Any) -> processes.Cluster:
        data = str(tmp_path_factory.mktemp(name) / "data")
        cluster = processes.Cluster(data=data, **kw)
        started.append(cluster)
        return cluster.start(wait=wait)

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture(scope="module")
def start_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., processes.RedisServer]]:
    started: list[processes.RedisServer] = []

    def start(port: int | None = None) -> processes.RedisServer:
        server = processes.RedisServer(port or processes.free_ports(1)[0], str(tmp_path_factory.mktemp("redis")))
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test proves nothing: the suite fails when any test was skipped."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == 0:
        reporter.write_line(f"{skipped} test(s) skipped: every test must run", red=True)
        session.exitstatus = 1
