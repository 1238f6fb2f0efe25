"""Shared pytest wiring: the real-process helpers of procs.py as fixtures, a
session-end safety net that stops anything a test started, and the tail of every
Bazar process log attached to the report of a failing integration test."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import procs  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_processes() -> Iterator[None]:
    yield
    procs.stop_everything()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, procs.Cluster):
                report.sections.append((f"bazar logs ({value.data})", value.tail_logs()))


@pytest.fixture(scope="module")
def start_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., procs.Cluster]]:
    """Start clusters (and stop them at module end): start_cluster(frontends=2, redis=url)."""
    started: list[procs.Cluster] = []

    def start(name: str = "cluster", wait: float = 60.0, **kw: Any) -> procs.Cluster:
        data = str(tmp_path_factory.mktemp(name) / "data")
        cluster = procs.Cluster(data=data, **kw)
        started.append(cluster)
        return cluster.start(wait=wait)

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture(scope="module")
def start_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., procs.RedisServer]]:
    started: list[procs.RedisServer] = []

    def start(port: int | None = None) -> procs.RedisServer:
        server = procs.RedisServer(port or procs.free_ports(1)[0], str(tmp_path_factory.mktemp("redis")))
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
