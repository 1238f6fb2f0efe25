"""The `bazar` command-line client against a real `bazar-cluster`, plus its pure parts
(status's rules, verify's checks) on hand-made answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from bazar.cli import check_orders, service_problems
from bazar.testing.processes import SEED, TOKEN, Cluster, free_ports, get_json


def bazar(*args: str, url: str, token: str | None = TOKEN, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")}
    env["BAZAR_URL"] = url
    if token is not None:
        env["BAZAR_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "bazar.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cluster(start_cluster: Callable[..., Cluster]) -> Cluster:
    return start_cluster("cli")


# -- against a running store ---------------------------------------------------------------

@pytest.mark.integration
def test_info_search_buy_orders(cluster: Cluster) -> None:
    out = bazar("info", url=cluster.front)
    assert out.returncode == 0, out.stderr
    assert "RPCs for Noobs." in out.stdout and out.stdout.splitlines()[0].split() == [
        "id", "title", "topic", "price", "quantity"]
    books = json.loads(bazar("--json", "info", url=cluster.front).stdout)
    assert [(b["id"], b["title"]) for b in books][:7] == [(i, s[0]) for i, s in SEED.items()]
    assert json.loads(bazar("info", "2", "--json", url=cluster.front).stdout)["topic"] == "undergraduate school"
    found = json.loads(bazar("--json", "search", "undergraduate school", url=cluster.front).stdout)
    assert [b["id"] for b in found] == [2, 3]
    first = json.loads(bazar("--json", "buy", "5", "--quantity", "2", "--key", "cli-k1", url=cluster.front).stdout)
    again = json.loads(bazar("--json", "buy", "5", "--quantity", "2", "--key", "cli-k1", url=cluster.front).stdout)
    assert first == again and first["order"]["quantity"] == 2
    listed = json.loads(bazar("--json", "orders", url=cluster.front).stdout)
    assert [o["id"] for o in listed].count(first["order"]["id"]) == 1
    assert get_json(f"{cluster.front}/bazar/info/5")["quantity"] == 78


@pytest.mark.integration
def test_admin_commands(cluster: Cluster) -> None:
    added = json.loads(bazar("--json", "add", "--title", "CLI book", "--topic", "cli", "--price", "9.5",
                             "--quantity", "4", url=cluster.front).stdout)
    ident = str(added["id"])
    assert json.loads(bazar("--json", "price", ident, "11.25", url=cluster.front).stdout)["price"] == 11.25
    assert json.loads(bazar("--json", "restock", ident, "6", url=cluster.front).stdout)["quantity"] == 10
    out = bazar("orders", url=cluster.front, token=None)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("bazar: GET /bazar/orders: 401") and "BAZAR_ADMIN_TOKEN" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_errors_are_one_line(cluster: Cluster) -> None:
    out = bazar("buy", "2", "--quantity", "1000", url=cluster.front)
    assert out.returncode == 1 and out.stderr.startswith("bazar: POST /bazar/purchase/2: 409")
    out = bazar("info", "999", url=cluster.front)
    assert out.returncode == 1 and "404" in out.stderr and "Traceback" not in out.stderr
    port = free_ports(1)[0]
    out = bazar("info", url=f"http://127.0.0.1:{port}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"bazar: cannot reach the front end at http://127.0.0.1:{port}: [Errno 111] Connection refused"]


@pytest.mark.integration
def test_status_lists_every_process(cluster: Cluster) -> None:
    cluster.wait_healthy(30)
    out = bazar("status", url=cluster.front)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["service", "replica", "url", "role", "status", "epoch", "applied", "commit", "lag",
                                "pid"]
    for url in cluster.everyone:
        assert any(url in line for line in lines), url
    rows = [line.split() for line in lines[2:9]]
    assert [r[0] for r in rows] == ["frontend"] + ["catalog"] * 3 + ["order"] * 3
    assert [r[3] for r in rows[1:]].count("primary") == 2
    assert lines[-1].startswith("ok: ")
    report = json.loads(bazar("--json", "status", url=cluster.front).stdout)
    assert report["problems"] == [] and len(report["processes"]) == 7


@pytest.mark.integration
def test_verify_passes_on_a_healthy_store(cluster: Cluster) -> None:
    bazar("buy", "0", "--quantity", "3", url=cluster.front)
    cluster.wait_quiet(30)
    out = bazar("verify", "--no-restocks", url=cluster.front)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: 3 catalog and 3 order replicas agree")
    report = json.loads(bazar("--json", "verify", "--expect-stock", "0=85", url=cluster.front).stdout)
    assert report["ok"] is True and report["problems"] == []
    wrong = bazar("verify", "--expect-stock", "0=84", url=cluster.front)
    assert wrong.returncode == 1 and "BROKEN: book 0:" in wrong.stdout


# -- the rules, on hand-made answers ----------------------------------------------------------

def health(role: str, epoch: int, leader: int | None) -> dict[str, Any]:
    return {"role": role, "epoch": epoch, "leader": leader, "status": "ok", "last_seq": 1}


def test_status_rules() -> None:
    good = {"a": health("primary", 3, 1), "b": health("backup", 3, 1), "c": None}
    assert service_problems("catalog", good) == []
    # a deposed primary of an older epoch that has not heard yet is not a problem
    assert service_problems("catalog", {"a": health("primary", 2, 1), "b": health("primary", 3, 2)}) == []
    assert service_problems("order", {"a": health("backup", 3, None), "b": None}) == ["order: no primary"]
    two = service_problems("order", {"a": health("primary", 4, 1), "b": health("primary", 4, 2)})
    assert any("2 primaries claim epoch 4" in p for p in two)
    split = service_problems("order", {"a": health("primary", 5, 1), "b": health("backup", 5, 3)})
    assert split == ["order: replicas disagree on the primary of epoch 5: 1, 3"]


def book(ident: int, quantity: int) -> dict[str, Any]:
    title, topic, price, _ = SEED[ident]
    return {"id": ident, "title": title, "topic": topic, "price": price, "quantity": quantity}


def order(ident: int, book_id: int, quantity: int) -> dict[str, Any]:
    title, _, price, _ = SEED[book_id]
    return {"id": ident, "book_id": book_id, "title": title, "quantity": quantity, "price": price,
            "total": round(price * quantity, 2), "created": "2026-01-01T00:00:00+00:00"}


def test_verify_checks() -> None:
    books = [book(1, 57), book(2, 8)]
    orders = [order(1, 1, 3)]
    assert check_orders(books, orders, {}, seed_only=True) == []
    assert check_orders(books, orders + [order(1, 1, 3)], {}, False)[0] == "order 1 is listed more than once"
    lost = check_orders([book(1, 56), book(2, 8)], orders, {}, False)
    assert lost == ["book 1: 56 in stock + 3 sold = 59, fewer than the 60 it started with"]
    assert check_orders([book(1, 58), book(2, 8)], orders, {}, seed_only=False) == []  # a restock of 1?
    assert check_orders([book(1, 58), book(2, 8)], orders, {}, seed_only=True) != []
    assert check_orders([book(1, 58), book(2, 8)], orders, {1: 61}, seed_only=True) == []
    wrong_title = dict(order(2, 2, 1), title="Another")
    assert "names 'Another'" in check_orders(books, [wrong_title], {}, False)[0]
    assert "does not hold" in check_orders(books, [order(3, 0, 1)], {}, False)[0]
    assert "oversold" in check_orders([book(1, 60), dict(book(2, 0), quantity=-1)], [], {}, False)[0]


def test_verify_compares_replicas_only_at_one_applied_index(monkeypatch: pytest.MonkeyPatch) -> None:
    from bazar import cli

    answers = {"a": [(4, ["x"]), (5, ["x", "y"])], "b": [(5, ["x", "y"])], "c": [None, (5, ["x", "z"])]}

    def read(url: str, path: str, token: str | None) -> Any:
        queue = answers[url]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    monkeypatch.setattr(cli, "read_replica", read)
    monkeypatch.setattr(cli.time, "sleep", lambda _: None)
    problems: list[str] = []
    records = cli.settled(["a", "b", "c"], "/books", None, cli.time.monotonic() + 5, problems, "catalog")
    assert records == ["x", "y"]
    assert problems == ["catalog: replicas a and c hold different records at applied index 5"]
    answers.update(a=[(6, [])], b=[(7, [])], c=[(7, [])])
    problems = []
    cli.settled(["a", "b", "c"], "/books", None, cli.time.monotonic(), problems, "catalog")
    assert problems and "did not settle" in problems[0] and "a at 6" in problems[0]
