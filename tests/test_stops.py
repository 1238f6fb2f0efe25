"""Stops that cannot hang: processes stopped with SIGTERM while clients hammer them,
again and again, and never one left behind (Twisted #7736: a handler that logs from
inside the signal could deadlock on the log lock; Bazar's only hands the stop to the
event loop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bazar.testing.processes import (
    SECRET,
    TOKEN,
    TWISTD,
    Cluster,
    call,
    free_ports,
    pid_alive,
    spawn,
    wait_until,
)

pytestmark = pytest.mark.integration

STOPS = 50


@pytest.fixture(scope="module")
def cluster(start_cluster: Callable[..., Cluster]) -> Cluster:
    return start_cluster("stops")


def hammer(url: str, until: threading.Event) -> threading.Thread:
    """A client that reads and buys as fast as it can until told to stop (bounded)."""
    def run() -> None:
        deadline = time.monotonic() + 60
        n = 0
        while not until.is_set() and time.monotonic() < deadline and n < 100_000:
            n += 1
            try:
                call("GET", f"{url}/bazar/info/{n % 7}", timeout=2)
                if n % 5 == 0:
                    call("POST", f"{url}/bazar/purchase/6", timeout=2)
            except OSError:
                time.sleep(0.01)  # between the stop and the next start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_fifty_stops_under_load_leave_nothing_behind(cluster: Cluster, tmp_path: Any) -> None:
    """A front end started, loaded by four clients, stopped with SIGTERM: fifty times.
    Each one exits 0 within 10 s (no hang), its port is free again, and no process
    of its own is left."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")}
    env.update(BAZAR_ADMIN_TOKEN=TOKEN, BAZAR_CLUSTER_SECRET=SECRET)
    catalogs, orders = ",".join(cluster.catalogs), ",".join(cluster.orders)
    took: list[float] = []
    for round_ in range(STOPS):
        (port,) = free_ports(1)
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", f"--logfile={tmp_path / 'frontend.log'}",
                "bazar-frontend", "--port", str(port), "--catalog", catalogs, "--order", orders]
        proc = spawn(argv, str(tmp_path / "frontend.out"), env=env, cwd=str(tmp_path))
        try:
            wait_until(lambda: call("GET", url + "/ready", timeout=1).status == 200, 30,  # noqa: B023
                       f"front end {round_} ready")
            stop = threading.Event()
            clients = [hammer(url, stop) for _ in range(4)]
            time.sleep(0.2)  # mid-load
            started = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"stop {round_}: the front end did not stop within 10 s of SIGTERM (a hang)")
            took.append(time.monotonic() - started)
            stop.set()
            for client in clients:
                client.join(5)
            assert code == 0, f"stop {round_}: exit status {code}"
            assert not pid_alive(proc.pid)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    print(f"\n{STOPS} stops under load: slowest {max(took):.2f} s, median {sorted(took)[len(took) // 2]:.2f} s")
    # nothing of them is left: no process still runs the front end's command line
    mine = [p for p in os.listdir("/proc") if p.isdigit() and pid_alive(int(p))]
    leftovers = []
    for pid in mine:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(tmp_path).encode() in f.read():
                    leftovers.append(pid)
        except OSError:
            continue
    assert leftovers == []


def test_the_store_stopped_under_load_leaves_no_process(start_cluster: Callable[..., Cluster]) -> None:
    """bazar-cluster itself, SIGTERM while clients buy: every child goes with it."""
    for round_ in range(3):
        cluster = start_cluster(f"stop-{round_}")
        children = [h["pid"] for h in cluster.healths().values() if h]
        stop = threading.Event()
        clients = [hammer(cluster.front, stop) for _ in range(3)]
        time.sleep(0.3)
        cluster.stop(term_wait=15.0)
        stop.set()
        for client in clients:
            client.join(5)
        wait_until(lambda: not any(pid_alive(pid) for pid in children), 10,  # noqa: B023
                   f"round {round_}: every child of the store gone")
