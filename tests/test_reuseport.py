"""Front end processes sharing one port (SO_REUSEPORT): the listening socket and its
endpoint, a write through one process dropping its keys from the others' caches
before it is answered (in memory), and `bazar-cluster --shared-port-frontends 1` with
real processes: both serve the port, a write through the port is seen by every read
after it whichever process answers, and stopping the store leaves nothing."""

from __future__ import annotations

import errno
import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.web.resource import Resource

from bazar.frontend import build_frontend
from bazar.http.server import Listener, QuietSite, ReusePortEndpoint, reuse_port_socket
from bazar.settings import FrontendSettings
from bazar.sim.network import DROP
from bazar.testing import processes
from bazar.testing.memory import CATALOG_PORT, FRONTEND_PORT, ORDER_PORT, SECRET, TOKEN, Shop, ok, url_of
from bazar.testing.processes import Cluster, call, get_json, group_members, pid_alive, wait_until

linux_only = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")


# -- the socket and its endpoint ---------------------------------------------------------------

@linux_only
def test_two_reuse_port_sockets_share_a_port_and_a_plain_one_cannot_join() -> None:
    first = reuse_port_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert not first.getblocking() and not first.get_inheritable()
        second = reuse_port_socket("127.0.0.1", port)  # the same port, beside it
        second.close()
        with socket.socket() as plain, pytest.raises(OSError) as refused:
            plain.bind(("127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE
    finally:
        first.close()


@linux_only
def test_a_port_held_without_reuse_port_cannot_be_shared() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        with pytest.raises(OSError) as refused:
            reuse_port_socket("127.0.0.1", holder.getsockname()[1])
        assert refused.value.errno == errno.EADDRINUSE


class AdoptingReactor:
    """What the endpoint asks of the reactor: adoptStreamPort, which (as the reactor
    does) takes its own duplicate of the descriptor; here it only looks at it."""

    def __init__(self) -> None:
        self.adopted: list[dict[str, Any]] = []

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> str:  # noqa: N802 - Twisted's name
        with socket.socket(fileno=os.dup(fd)) as sock:
            self.adopted.append({"family": family, "factory": factory, "name": sock.getsockname(),
                                 "reuse": sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
                                 "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
                                 "nonblocking": bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)})
        return "the listening port"


@linux_only
def test_the_endpoint_hands_a_listening_reuse_port_socket_to_the_reactor() -> None:
    reactor = AdoptingReactor()
    factory = object()
    ports: list[Any] = []
    ReusePortEndpoint(reactor, 0, "127.0.0.1").listen(factory).addCallback(ports.append)
    assert ports == ["the listening port"]
    [adopted] = reactor.adopted
    assert adopted["family"] == socket.AF_INET and adopted["factory"] is factory
    assert adopted["name"][0] == "127.0.0.1" and adopted["reuse"] == 1 and adopted["listening"] == 1
    assert adopted["nonblocking"] is True


@linux_only
def test_a_port_that_cannot_be_had_fails_the_endpoint_and_ends_the_process(
        capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        endpoint = ReusePortEndpoint(AdoptingReactor(), port, "127.0.0.1")
        failures: list[Any] = []
        endpoint.listen(object()).addErrback(failures.append)
        assert failures and failures[0].check(CannotListenError)
        listener = Listener(endpoint, QuietSite(Resource()), f"127.0.0.1:{port}")
        with pytest.raises(SystemExit) as ended:
            listener.privilegedStartService()
        assert ended.value.code == 1
    assert capfd.readouterr().err.splitlines() == [
        f"bazar: cannot listen on 127.0.0.1:{port} (Address already in use); not starting"]


# -- a write through one process of the port, read through another (in memory) ----------------

SIBLING_PORT = FRONTEND_PORT + 50


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Shop, Any]]:
    """The shop's front end, and a second one that names it as its sibling (as two
    processes on one port would, each at its own port)."""
    shop = Shop(str(tmp_path))
    other = build_frontend(FrontendSettings(catalog=(url_of(CATALOG_PORT),), order=(url_of(ORDER_PORT),),
                                            secret=SECRET, admin_token=TOKEN, siblings=(url_of(FRONTEND_PORT),)),
                           clock=shop.clock, http=shop.network.client(SIBLING_PORT))
    shop.network.add(SIBLING_PORT, other.resource)
    shop.do(other.frontend.poll())
    yield shop, other
    other.stop()
    shop.close()


def through(shop: Shop, port: int, method: str, path: str, **kw: Any) -> Any:
    return ok(shop.http(method, url_of(port) + path, headers={"Authorization": f"Bearer {TOKEN}"}, **kw))


@pytest.mark.parametrize("method, path, body, field, value", [
    ("PUT", "/bazar/update_price/1", {"price": 3.5}, "price", 3.5),
    ("POST", "/bazar/purchase/1", {"quantity": 2}, "quantity", 58),
    ("POST", "/bazar/restock/1", {"quantity": 5}, "quantity", 65),
])
def test_a_write_through_one_process_drops_its_keys_from_the_siblings_before_its_answer(
        two: tuple[Shop, Any], method: str, path: str, body: Any, field: str, value: Any) -> None:
    shop, _ = two
    before = through(shop, FRONTEND_PORT, "GET", "/bazar/info/1")
    assert through(shop, FRONTEND_PORT, "GET", "/bazar/info/1") == before and shop.cache.hits == 1  # cached
    shop.network.block(CATALOG_PORT, FRONTEND_PORT)  # the catalog's push is late
    through(shop, SIBLING_PORT, method, path, json=body)
    assert through(shop, FRONTEND_PORT, "GET", "/bazar/info/1")[field] == value


def test_a_purchase_through_one_process_raises_the_others_order_floor(two: tuple[Shop, Any]) -> None:
    shop, other = two
    bought = through(shop, SIBLING_PORT, "POST", "/bazar/purchase/2", json={"quantity": 1})["order"]
    assert other.frontend.order_floor == shop.fe.order_floor == shop.order_store.last_seq > 0
    assert bought in through(shop, FRONTEND_PORT, "GET", "/bazar/orders")


@pytest.mark.parametrize("order_seq", ["7", -1, 2**62, 1.5, True])
def test_a_malformed_order_seq_is_400_and_changes_nothing(two: tuple[Shop, Any], order_seq: Any) -> None:
    shop, _ = two
    before = shop.fe.order_floor, shop.stream.upto
    r = shop.http("POST", url_of(FRONTEND_PORT) + "/internal/invalidate", headers={"X-Bazar-Secret": SECRET},
                  json={"messages": [{"seq": 1, "keys": ["info:1"]}], "order_seq": order_seq})
    assert r.code == 400 and (shop.fe.order_floor, shop.stream.upto) == before


def test_without_siblings_the_other_cache_waits_for_the_push(tmp_path: Path) -> None:
    """What the siblings close: a front end that does not tell the other one."""
    shop = Shop(str(tmp_path))
    try:
        other = build_frontend(FrontendSettings(catalog=(url_of(CATALOG_PORT),), order=(url_of(ORDER_PORT),),
                                                secret=SECRET, admin_token=TOKEN),
                               clock=shop.clock, http=shop.network.client(SIBLING_PORT))
        shop.network.add(SIBLING_PORT, other.resource)
        shop.do(other.frontend.poll())
        through(shop, FRONTEND_PORT, "GET", "/bazar/info/1")
        shop.network.block(CATALOG_PORT, FRONTEND_PORT)
        through(shop, SIBLING_PORT, "PUT", "/bazar/update_price/1", json={"price": 3.5})
        assert through(shop, FRONTEND_PORT, "GET", "/bazar/info/1")["price"] == 22.35  # stale, for now
        other.stop()
    finally:
        shop.close()


def test_a_sibling_away_delays_no_write_beyond_its_timeout(two: tuple[Shop, Any]) -> None:
    shop, other = two
    shop.network.kill(FRONTEND_PORT)  # refused at once
    assert through(shop, SIBLING_PORT, "PUT", "/bazar/update_price/2", json={"price": 7.0})["price"] == 7.0
    assert other.frontend.siblings.missed[url_of(FRONTEND_PORT)] == 1
    shop.network.revive(FRONTEND_PORT)
    shop.network.block(SIBLING_PORT, FRONTEND_PORT, DROP)  # silent: no answer, ever
    started = shop.clock.seconds()
    assert through(shop, SIBLING_PORT, "PUT", "/bazar/update_price/2", json={"price": 8.0})["price"] == 8.0
    assert shop.clock.seconds() - started <= FrontendSettings().sibling_timeout + 0.1
    assert other.frontend.siblings.missed[url_of(FRONTEND_PORT)] == 2
    shop.network.unblock(SIBLING_PORT, FRONTEND_PORT)
    through(shop, SIBLING_PORT, "PUT", "/bazar/update_price/2", json={"price": 9.0})
    assert other.frontend.siblings.away == set()  # back: taken again
    assert through(shop, FRONTEND_PORT, "GET", "/bazar/info/2")["price"] == 9.0


# -- bazar-cluster --shared-port-frontends 1, real processes -----------------------------------

def fresh_get(url: str) -> tuple[int, Any]:
    """GET on a connection of its own (closed after): the kernel picks the process anew."""
    request = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def shared(start_cluster: Callable[..., Cluster]) -> Cluster:
    return start_cluster("shared", shared=1)


@pytest.mark.integration
def test_both_processes_serve_the_port(shared: Cluster) -> None:
    own = {get_json(url + "/health")["pid"] for url in shared.internals}
    assert len(own) == 2
    seen: set[int] = set()
    for _ in range(400):  # new connections until the kernel has handed some to each
        seen.add(fresh_get(shared.front + "/health")[1]["pid"])
        if seen == own:
            break
    assert seen == own
    for url in shared.internals:
        h = get_json(url + "/health")
        assert h["reuse_port"] is True and h["internal_port"] == int(url.rsplit(":", 1)[1])
        assert call("GET", url + "/ready").status == 200


def connections_to_each(cluster: Cluster) -> dict[int, http.client.HTTPConnection]:
    """A keep-alive connection through the shared port to each process, by pid (new
    connections until the kernel has handed one to each; the others are closed)."""
    found: dict[int, http.client.HTTPConnection] = {}
    for _ in range(400):
        conn = http.client.HTTPConnection("127.0.0.1", cluster.frontend_port, timeout=10)
        conn.request("GET", "/health")
        pid = json.loads(conn.getresponse().read())["pid"]
        if pid in found:
            conn.close()
            continue
        found[pid] = conn
        if len(found) == len(cluster.internals):
            return found
    raise AssertionError(f"the kernel handed new connections to {len(found)} process(es) only")


def ask(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {processes.TOKEN}", "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
    answer = conn.getresponse()
    data = json.loads(answer.read())
    assert answer.status == 200, (answer.status, data)
    return data


@pytest.mark.integration
def test_a_write_through_the_port_is_seen_by_every_read_after_it(shared: Cluster) -> None:
    """The read right after a write's answer, on a connection the kernel gave the other
    process, is the race: the catalog's push to that process leaves a moment after the
    write commits. Both caches must have dropped the book before the write was answered."""
    book = 3
    conns = list(connections_to_each(shared).values())
    try:
        for step in range(20):
            writer, reader = conns[step % 2], conns[1 - step % 2]
            for conn in conns:  # the book in both caches, so that a stale read is possible
                ask(conn, "GET", f"/bazar/info/{book}")
            hits = [get_json(url + "/bazar/cache")["hits"] for url in shared.internals]
            for conn in conns:
                ask(conn, "GET", f"/bazar/info/{book}")
            assert [get_json(url + "/bazar/cache")["hits"] for url in shared.internals] == [h + 1 for h in hits]
            price = 40.0 + step
            assert ask(writer, "PUT", f"/bazar/update_price/{book}", {"price": price})["price"] == price
            assert ask(reader, "GET", f"/bazar/info/{book}")["price"] == price, step
            assert ask(writer, "GET", f"/bazar/info/{book}")["price"] == price, step
            if step % 4 == 0:  # a purchase: the stock, and the order among the orders, on the other process
                stock = ask(writer, "GET", f"/bazar/info/{book}")["quantity"]
                order = ask(writer, "POST", f"/bazar/purchase/{book}", {"quantity": 1})["order"]
                assert ask(reader, "GET", f"/bazar/info/{book}")["quantity"] == stock - 1, step
                assert order in ask(reader, "GET", "/bazar/orders"), step
            for _ in range(3):  # and on new connections, whichever process the kernel picks
                status, body = fresh_get(f"{shared.front}/bazar/info/{book}")
                assert status == 200 and body["price"] == price, (step, body)
    finally:
        for conn in conns:
            conn.close()
    # the catalog's push reached each process too (at its own port): every stream caught up
    newest = max(get_json(u + "/health")["last_seq"] for u in shared.catalogs)
    for url in shared.internals:
        wait_until(lambda url=url: get_json(url + "/health")["last_seq"] >= newest, 5, f"{url} caught up")


@pytest.mark.integration
def test_the_ready_line_and_status_on_a_shared_port(shared: Cluster) -> None:
    def said() -> bool:
        with open(os.path.join(shared.data, "cluster.out"), errors="replace") as f:
            return f"bazar-cluster: ready at {shared.front}" in f.read()
    wait_until(said, 10, "the ready line")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")}
    for url in [shared.front, *shared.internals]:
        out = subprocess.run([sys.executable, "-m", "bazar.cli", "--url", url, "status"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.splitlines()[-1].startswith("ok: ")


@pytest.mark.integration
def test_stopping_a_store_with_a_shared_port_leaves_no_process(tmp_path: Path) -> None:
    cluster = Cluster(data=str(tmp_path / "data"), shared=1)
    try:
        cluster.start()
        pids = [h["pid"] for h in cluster.healths().values() if h]
        assert len(set(pids)) == 8  # 3 + 3 replicas, 2 front ends (the shared port names one of them again)
        supervisor = cluster.proc
        assert supervisor is not None
        os.kill(supervisor.pid, signal.SIGTERM)
        t0 = time.monotonic()
        wait_until(lambda: supervisor.poll() is not None and not any(pid_alive(p) for p in pids),
                   30, "the supervisor and every process to exit")
        assert time.monotonic() - t0 < 15  # by themselves, before any SIGKILL
        assert group_members(supervisor.pid) == []
        assert all(cluster.health(u) is None for u in cluster.everyone)
    finally:
        cluster.stop()
