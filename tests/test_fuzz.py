"""Schemathesis against a real `twistd -n bazar-cluster`: every operation of
bazar/openapi.json, positive and negative (schema-violating) data, first without
credentials, then with the admin token.

Checks on every answer: never a 5xx, the body matches the documented schema for its
status, the Content-Type is the documented one; and for schema-violating input, a 4xx
(guarantee 5: bad input gets a clear 4xx and changes nothing).

After the anonymous phase the store must be byte-identical (no purchase can succeed
in it: a purchase that would be valid asks for more copies than exist). After the
admin phase every book must be exactly what the successful writes seen by the test
explain, on every catalog replica, and the orders exactly the purchases that
returned 200.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.parameters import ParameterLocation  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from bazar.records import NewBook, parse_csv_books
from bazar.testing.processes import SEED, TOKEN, Cluster, call

pytestmark = pytest.mark.integration

SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bazar", "openapi.json")
MAX_EXAMPLES = int(os.environ.get("BAZAR_TEST_FUZZ_EXAMPLES", "50"))  # per operation and generation mode
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, status_code_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def cluster(start_cluster: Callable[..., Cluster]) -> Cluster:
    return start_cluster("fuzz")


@pytest.fixture(scope="module")
def before(cluster: Cluster) -> dict[str, bytes]:
    """The store as the fuzzing found it (taken before the first phase)."""
    return snapshot(cluster)


def snapshot(cluster: Cluster) -> dict[str, bytes]:
    """The store's data as raw bytes: through the front end and on every replica."""
    cluster.wait_quiet(30)
    snap = {"info_all": call("GET", cluster.front + "/bazar/info/all").body,
            "orders": call("GET", cluster.front + "/bazar/orders", token=TOKEN).body}
    for url in cluster.catalogs:
        snap[url] = call("GET", url + "/books").body
    for url in cluster.orders:
        snap[url] = call("GET", url + "/orders", token=TOKEN).body
    return snap


def config() -> Any:
    return schemathesis.Config.from_dict({
        "suppress-health-check": ["all"],
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "request-timeout": 20,
    })


# Loaded from the package (pytest collects one test per operation); the test below
# checks that the front end serves exactly this document.
schema = schemathesis.openapi.from_path(SPEC, config=config())


class Ledger:
    """What the writes acknowledged during the admin phase should have done to the store."""

    def __init__(self) -> None:
        self.books = {i: {"id": i, "title": t, "topic": p, "price": pr, "quantity": q}
                      for i, (t, p, pr, q) in SEED.items()}
        self.initial = {i: q for i, (_, _, _, q) in SEED.items()}
        self.restocked: dict[int, int] = {}
        self.orders: list[dict[str, Any]] = []


LEDGER = Ledger()
ADMIN = {"/bazar/update_price/{id}", "/bazar/restock/{id}", "/bazar/books", "/bazar/books/import", "/bazar/orders",
         "/bazar/cache/{id}"}
COUNTS: dict[str, int] = {}  # requests per phase and operation
STATUSES: dict[str, dict[int, int]] = {}  # ... and their statuses
MODES: dict[str, int] = {}  # requests per phase, schemathesis phase and generation mode


def count(phase: str, case: Any, status: int) -> None:
    key = f"{phase} {case.operation.label}"
    COUNTS[key] = COUNTS.get(key, 0) + 1
    meta = case.meta
    how = f"{phase} {meta.phase.name} {meta.generation.mode}" if meta is not None else f"{phase} explicit"
    MODES[how] = MODES.get(how, 0) + 1
    seen = STATUSES.setdefault(key, {})
    seen[status] = seen.get(status, 0) + 1


def must_fail_purchase(case: Any) -> None:
    """Anonymous phase: a purchase the server would accept asks for 10**6 copies
    (more than any book has), so it must end in 409 and take nothing."""
    if case.operation.method.upper() != "POST" or not case.operation.path.startswith("/bazar/purchase/"):
        return
    body = case.body
    if not isinstance(body, (dict, list, str, int, float)):  # no body (None or NOT_SET): 1 copy
        case.body = {"quantity": 10**6}
    elif isinstance(body, dict) and "quantity" not in body:
        case.body = {**body, "quantity": 10**6}
    elif isinstance(body, dict) and type(body["quantity"]) is int and 1 <= body["quantity"] <= 10**6:
        case.body = {**body, "quantity": 10**6}


@schema.parametrize()
def test_fuzz_without_credentials(case: Any, cluster: Cluster, before: dict[str, bytes]) -> None:
    must_fail_purchase(case)
    response = case.call_and_validate(base_url=cluster.front, checks=CHECKS)
    count("anonymous", case, response.status_code)
    assert response.status_code < 500
    if case.operation.path in ADMIN and case.method.upper() == case.operation.method.upper():
        # every admin door is shut without the token (whatever else is wrong with the request)
        assert response.status_code == 401, (case.operation.label, response.status_code, response.text[:200])
        assert response.headers["www-authenticate"][0].startswith("Bearer")


def test_anonymous_fuzz_changed_nothing(cluster: Cluster, before: dict[str, bytes]) -> None:
    assert snapshot(cluster) == before  # byte for byte, on the front end and on all six replicas


def admin_checks(case: Any) -> list[Any]:
    """The admin phase sends its own Authorization header over whatever headers the
    case was given: a case made negative in its headers (a missing or mangled
    Authorization) is then no longer the request the generator meant, and may rightly
    be accepted. The anonymous phase checks those cases as generated."""
    meta = case.meta
    header = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    if header is not None and header.mode == GenerationMode.NEGATIVE:
        return [check for check in CHECKS if check is not negative_data_rejection]
    return CHECKS


@schema.parametrize()
def test_fuzz_with_the_admin_token(case: Any, cluster: Cluster) -> None:
    response = case.call_and_validate(base_url=cluster.front, headers={"Authorization": f"Bearer {TOKEN}"},
                                      checks=admin_checks(case))
    count("admin", case, response.status_code)
    record(case, response)


def record(case: Any, response: Any) -> None:
    """Keep the ledger: every write the store acknowledged, in order."""
    method, path, status = case.method.upper(), case.operation.path, response.status_code
    if status not in (200, 201) or method == "GET":
        return
    body = response.json()
    if method == "POST" and path == "/bazar/books":
        LEDGER.books[body["id"]] = dict(body)
        LEDGER.initial[body["id"]] = body["quantity"]
    elif method == "POST" and path == "/bazar/books/import":
        sent = case.body
        books = parse_csv_books(sent.encode()) if isinstance(sent, str) else [NewBook(**book) for book in sent]
        for ident, book in zip(body["ids"], books, strict=True):
            LEDGER.books[ident] = {"id": ident, "title": book.title, "topic": book.topic, "price": float(book.price),
                                   "quantity": book.quantity}
            LEDGER.initial[ident] = book.quantity
    elif method == "PUT" and path.startswith("/bazar/update_price/"):
        LEDGER.books[body["id"]]["price"] = case.body["price"]
    elif method == "POST" and path.startswith("/bazar/restock/"):
        LEDGER.books[body["id"]]["quantity"] += case.body["quantity"]
        LEDGER.restocked[body["id"]] = LEDGER.restocked.get(body["id"], 0) + case.body["quantity"]
    elif method == "POST" and path.startswith("/bazar/purchase/"):
        order = body["order"]
        LEDGER.orders.append(order)
        LEDGER.books[order["book_id"]]["quantity"] -= order["quantity"]


def test_admin_fuzz_left_only_what_its_writes_explain(cluster: Cluster) -> None:
    snap = snapshot(cluster)
    expected = [LEDGER.books[i] for i in sorted(LEDGER.books)]
    orders = json.loads(snap["orders"])
    # every book exactly as the acknowledged writes left it, through the front end and on every replica
    for key in ["info_all", *cluster.catalogs]:
        assert json.loads(snap[key]) == expected, key
    # the confirmed orders are exactly the purchases that returned 200, once each, on every replica
    assert sorted(o["id"] for o in orders) == sorted(o["id"] for o in LEDGER.orders)
    assert {o["id"]: o for o in orders} == {o["id"]: o for o in LEDGER.orders}
    for url in cluster.orders:
        assert json.loads(snap[url]) == orders, url
    # DESIGN.md guarantee 3 on every catalog replica: initial + restocked == quantity + sum(confirmed orders)
    for url in cluster.catalogs:
        for book in json.loads(snap[url]):
            sold = sum(o["quantity"] for o in orders if o["book_id"] == book["id"])
            assert LEDGER.initial[book["id"]] + LEDGER.restocked.get(book["id"], 0) == book["quantity"] + sold
    print("schemathesis requests:", sum(COUNTS.values()), MODES)
    for key in sorted(STATUSES):
        print(key, COUNTS[key], dict(sorted(STATUSES[key].items())))


def test_the_served_spec_is_the_packaged_one(cluster: Cluster) -> None:
    with open(SPEC, "rb") as f:
        assert call("GET", cluster.front + "/openapi.json").body == f.read()
