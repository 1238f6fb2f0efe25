"""Hostile input and access against a real `twistd -n bazar-cluster` (DESIGN.md:
admin token, cluster secret, limits, "every error is JSON, never a traceback").

Every door is tried without and with wrong credentials on every process; bad bodies
of many kinds (malformed JSON, wrong types, huge numbers, NaN, unicode edge cases,
oversized, chunked, lying lengths) must get a JSON 4xx and change nothing; every
route refuses unknown methods with a JSON 405; 50 slow clients (slowloris) are cut
off by the header deadline while a normal client is served promptly; a front end
without an admin token refuses admin calls; no answer and no log line carries a
traceback or a credential.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bazar.testing.processes import (
    ADMIN_CALLS,
    HOST,
    SECRET,
    TOKEN,
    TWISTD,
    Cluster,
    Response,
    free_ports,
    get_json,
    stop_group,
    wait_until,
)
from bazar.testing.processes import call as _call

pytestmark = pytest.mark.integration

WRONG = "wrong-credential-7f3a"  # never valid; must not show up in any log either
SEEN: list[Response] = []  # every answer of this module, checked for tracebacks at the end


def call(method: str, url: str, body: Any = None, **kw: Any) -> Response:
    r = _call(method, url, body, **kw)
    SEEN.append(r)
    return r


@pytest.fixture(scope="module")
def cluster(start_cluster: Callable[..., Cluster]) -> Cluster:
    return start_cluster("hostile")


def state(cluster: Cluster) -> dict[str, Any]:
    """Everything a write could change, read directly from every replica (raw bytes)."""
    cluster.wait_quiet(30)
    snap: dict[str, Any] = {"front": call("GET", cluster.front + "/bazar/info/all").body}
    for url in cluster.catalogs:
        snap[url] = call("GET", url + "/books").body
    for url in cluster.orders:
        snap[url] = call("GET", url + "/orders", token=TOKEN).body
    for url in cluster.replicas:
        h = get_json(url + "/health")
        snap[url + " role"] = (h["role"], h["epoch"], h["last_seq"])
    return snap


def assert_json_error(r: Response, *statuses: int) -> dict[str, Any]:
    assert r.status in statuses, (r.status, r.body[:300])
    assert r.content_type.startswith("application/json"), (r.status, r.content_type, r.body[:200])
    body = json.loads(r.body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"].strip(), r.body[:300]
    return body


# -- admin doors ----------------------------------------------------------------

BAD_AUTH: list[dict[str, str]] = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {WRONG}"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},  # a prefix of the token
    {"Authorization": f"Bearer {TOKEN}x"},  # the token plus one character
    {"Authorization": f"Bearer {TOKEN.upper()}"},
    {"Authorization": TOKEN},  # no scheme
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Token {TOKEN}"},
    {"X-Bazar-Secret": SECRET},  # the cluster secret is not an admin credential
    {"Authorization": f"Bearer {SECRET}"},
    {"Cookie": f"token={TOKEN}"},
]


def test_admin_doors_stay_shut_without_the_right_token(cluster: Cluster) -> None:
    before = state(cluster)
    tried = 0
    for method, path, body in ADMIN_CALLS:
        for headers in BAD_AUTH:
            for url in (cluster.front + path, cluster.front + path + f"?token={TOKEN}"):
                r = call(method, url, body, headers=headers)
                assert_json_error(r, 401)
                assert r.headers.get("www-authenticate", "").startswith("Bearer"), (path, headers)
                tried += 1
    for url in cluster.orders:  # replicas answer GET /orders to operators with the token only
        for headers in BAD_AUTH:
            r = call("GET", url + "/orders", headers=headers)
            assert_json_error(r, 401)
            assert r.headers.get("www-authenticate", "").startswith("Bearer")
            tried += 1
    assert tried == len(ADMIN_CALLS) * len(BAD_AUTH) * 2 + 3 * len(BAD_AUTH)
    assert state(cluster) == before
    assert get_json(cluster.front + "/bazar/search/forged") == []


# -- internal doors ---------------------------------------------------------------

REPLICA_INTERNAL = [
    ("POST", "/internal/write", {"op": {"op": "restock", "rid": "forged-1", "id": 1, "quantity": 1000}}),
    ("POST", "/internal/raft", {"kind": "append", "term": 10**6, "src": 3, "dst": 1, "prev_index": 0,
                                "prev_term": 0, "entries": [], "commit": 0}),
    ("POST", "/internal/raft", {"kind": "vote", "term": 10**6, "src": 3, "dst": 1, "last_index": 10**9,
                                "last_term": 10**6, "pre": False}),
    ("GET", "/internal/status", None),
]
ORDER_INTERNAL = [("POST", "/internal/purchase", {"book_id": 1, "quantity": 1, "key": "forged-purchase"})]
CATALOG_INTERNAL = [("GET", "/internal/sales?after=0", None)]
FRONT_INTERNAL = [("POST", "/internal/invalidate", {"messages": [{"seq": 10**12, "keys": ["info:1"]}]})]
BAD_SECRETS: list[dict[str, str]] = [
    {},
    {"X-Bazar-Secret": ""},
    {"X-Bazar-Secret": WRONG},
    {"X-Bazar-Secret": SECRET[:-1]},
    {"X-Bazar-Secret": SECRET + "x"},
    {"X-Bazar-Secret": SECRET.upper()},
    {"X-Bazar-Secret": TOKEN},  # the admin token opens no internal door
    {"Authorization": f"Bearer {TOKEN}"},
    {"Authorization": f"Bearer {SECRET}"},
    {"X-Bazar-Secret-Extra": SECRET},
]


def doors(cluster: Cluster) -> Iterator[tuple[str, str, Any]]:
    for url in cluster.catalogs:
        for method, path, body in REPLICA_INTERNAL + CATALOG_INTERNAL:
            yield method, url + path, body
    for url in cluster.orders:
        for method, path, body in REPLICA_INTERNAL + ORDER_INTERNAL:
            yield method, url + path, body
    for method, path, body in FRONT_INTERNAL:
        yield method, cluster.front + path, body


def test_internal_doors_are_403_on_every_process(cluster: Cluster) -> None:
    before = state(cluster)
    count = 0
    for method, url, body in doors(cluster):
        for headers in BAD_SECRETS:
            assert_json_error(call(method, url, body, headers=headers), 403)
            count += 1
    assert count == (3 * (len(REPLICA_INTERNAL) + 1) + 3 * (len(REPLICA_INTERNAL) + 1) + 1) * len(BAD_SECRETS)
    # the forged votes, writes, purchases and invalidations moved nothing
    assert state(cluster) == before
    assert b"forged" not in b"".join(v for v in before.values() if isinstance(v, bytes))
    assert get_json(cluster.front + "/health")["last_seq"] < 10**12


# -- a front end without an admin token ---------------------------------------------

@pytest.fixture(scope="module")
def tokenless_front(cluster: Cluster) -> Iterator[str]:
    """A second front end over the same replicas, started without any admin token."""
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAZAR_")}
    env.update(BAZAR_CLUSTER_SECRET=SECRET, PYTHONUNBUFFERED="1")
    log = os.path.join(cluster.data, "tokenless-frontend.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "bazar-frontend", "--port", str(port),
             "--catalog", ",".join(cluster.catalogs), "--order", ",".join(cluster.orders)],
            env=env, cwd=cluster.data, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"bazar-frontend exited with {proc.returncode}; see {log}"
            h = get_json(url + "/health")
            return all(r["ok"] for r in h["catalog"] + h["order"])
        wait_until(ready, 30, "the tokenless front end")
        yield url
    finally:
        stop_group(proc)


def test_a_front_end_without_admin_token_refuses_admin_calls(cluster: Cluster, tokenless_front: str) -> None:
    before = state(cluster)
    for method, path, body in ADMIN_CALLS:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer "}):
            r = call(method, tokenless_front + path, body, headers=headers)
            error = assert_json_error(r, 401)
            assert "no admin token is configured" in error["error"], error
            assert r.headers.get("www-authenticate", "").startswith("Bearer")
    assert state(cluster) == before
    # it is otherwise a working front end
    assert get_json(tokenless_front + "/bazar/info/1") == get_json(cluster.front + "/bazar/info/1")


# -- bad bodies ---------------------------------------------------------------------

RAW_BAD = [
    b"{", b"{price: 1}", b"{'price': 1}", b'{"price": 1,}', b'{"price": 01}', b'{"price": .5}',
    b'{"price": 1}{"price": 2}', b'{"price": 1} x', b"\xff\xfe{}", b"\xef\xbb\xbf{}",
    b'{"price": NaN}', b'{"price": Infinity}', b'{"price": -Infinity}', b'{"price": 1e400}',
    b'{"title": "\\ud800"}', b'{"title": "\\udc00x"}', b'{"title": "\xed\xa0\x80"}',  # lone surrogates
    b'{"title": "\xc0\xaf"}', b'{"title": "\x00"}', b'"\\u0000"', b"[" * 5000 + b"]" * 5000,
    b"null", b"true", b"1", b'"price"', b"[]", b"{}", b" \t\r\n ",
]
PRICES = [0, -0.0, -1, 1e9, 1e308, -1e308, 10**30, 2**63, -(2**63), "12", None, True, False, [1], {"v": 1},
          5e-324 * 0]
QUANTITIES = [0, -1, 10**6 + 1, 10**30, 2**64, 1.5, 1e2, 1.0, "3", None, True, [1], {"n": 1}]
TEXT_BAD = [
    "", " ", "\t", "a\nb", "a\rb", "\x00", "a\x1fb", "\x7f", "\x85", "\u2028", "\u2029",
    "\u200b", "a\u200bb", "\u200e", "\u202e" + "evil", "\ufeff", "\u2066x\u2069", "\ue000",
    "T" * 201, "\U0001F600" * 201,
]
TEXT_GOOD = [
    "T" * 200, "\U0001F600" * 200, "كتاب العربية", "ספר עברי", "e\u0301t\u00e9", "日本語の本", "Ω≈ç√∫",
    "<script>alert(1)</script>", "'; DROP TABLE books; --", "%s%n{0}{title}", "../../etc/passwd", "x" + "\u0301" * 199,
]


def test_malformed_and_hostile_bodies_are_400_and_change_nothing(cluster: Cluster) -> None:
    before = state(cluster)
    book = {"title": "T", "topic": "t", "price": 1.0, "quantity": 1}
    tried = 0
    for raw in RAW_BAD:
        for method, path in (("PUT", "/bazar/update_price/1"), ("POST", "/bazar/restock/1"),
                             ("POST", "/bazar/books"), ("POST", "/bazar/purchase/1")):
            if raw.strip() in (b"", b"null", b"{}") and path.startswith("/bazar/purchase/"):
                continue  # no body is a valid purchase of one copy
            assert_json_error(call(method, cluster.front + path, raw=raw, token=TOKEN), 400)
            tried += 1
    for price in PRICES:
        assert_json_error(call("PUT", cluster.front + "/bazar/update_price/1", {"price": price}, token=TOKEN), 400)
        assert_json_error(call("POST", cluster.front + "/bazar/books", {**book, "price": price}, token=TOKEN), 400)
        tried += 2
    for quantity in QUANTITIES:
        for method, path in (("POST", "/bazar/restock/1"), ("POST", "/bazar/purchase/1")):
            assert_json_error(call(method, cluster.front + path, {"quantity": quantity}, token=TOKEN), 400)
        assert_json_error(call("POST", cluster.front + "/bazar/books", {**book, "quantity": quantity}, token=TOKEN),
                          400)
        tried += 3
    for text in TEXT_BAD:
        for field in ("title", "topic"):
            assert_json_error(call("POST", cluster.front + "/bazar/books", {**book, field: text}, token=TOKEN), 400)
            tried += 1
    for key in ("x" * 201, "", "\u200b"):
        r = call("POST", cluster.front + "/bazar/purchase/1", {"quantity": 1},
                 headers={"Idempotency-Key": key.encode().decode("latin-1")})
        assert_json_error(r, 400)
        tried += 1
    for ident in ("-1", "1e3", "0x10", "1.0", "+1", "1%20", "%EF%BC%91", "9" * 19, str(10**30), "%00", "1;2"):
        for method, path, body in (("GET", "/bazar/info/", None), ("POST", "/bazar/purchase/", {"quantity": 1}),
                                   ("PUT", "/bazar/update_price/", {"price": 2.0}),
                                   ("POST", "/bazar/restock/", {"quantity": 1}), ("DELETE", "/bazar/cache/", None)):
            assert_json_error(call(method, cluster.front + path + ident, body, token=TOKEN), 404)
            tried += 1
    assert tried > 250
    assert state(cluster) == before


def test_unicode_titles_are_stored_exactly(cluster: Cluster) -> None:
    for text in TEXT_GOOD:
        r = call("POST", cluster.front + "/bazar/books",
                 {"title": text, "topic": "unicode " + text[:50], "price": 1.25, "quantity": 2}, token=TOKEN)
        assert r.status == 201, (text, r.body[:200])
        new = r.json
        assert new["title"] == text
        assert get_json(f"{cluster.front}/bazar/info/{new['id']}")["title"] == text
        topic = "unicode " + text[:50]
        from urllib.parse import quote
        assert {"id": new["id"], "title": text} in get_json(cluster.front + "/bazar/search/" + quote(topic, safe=""))
    # the same escaped as surrogate pairs in the JSON text
    raw = b'{"title": "\\ud83d\\ude00 pair", "topic": "pairs", "price": 2, "quantity": 1}'
    r = call("POST", cluster.front + "/bazar/books", raw=raw, token=TOKEN)
    assert r.status == 201 and r.json["title"] == "\U0001F600 pair"
    cluster.wait_quiet(30)
    books = [get_json(u + "/books") for u in cluster.catalogs]
    assert books[0] == books[1] == books[2]


# -- oversized bodies -----------------------------------------------------------------

def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        data, body = body, b""
        while data:
            size, _, rest = data.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            body, data = body + rest[:n], rest[n + 2:]
    return status, headers, body


def test_oversized_bodies_are_413_before_they_are_read(cluster: Cluster) -> None:
    before = state(cluster)
    price = b'{"price": 12.5}'
    exactly = price + b" " * (64 * 1024 - len(price))
    over = exactly + b" "
    assert_json_error(call("PUT", cluster.front + "/bazar/update_price/2", raw=over, token=TOKEN), 413)
    assert_json_error(call("POST", cluster.front + "/bazar/books", raw=b"x" * (10 * 1024 * 1024), token=TOKEN), 413)
    assert_json_error(call("POST", cluster.front + "/bazar/purchase/2", raw=over), 413)
    for url in cluster.catalogs + cluster.orders:  # replicas have the same public limit
        assert_json_error(call("POST", url + "/books", raw=over), 405, 413)
    assert state(cluster) == before
    port = cluster.frontend_port
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # a Content-Length of a terabyte is refused at once: nothing waits for (or buffers) the body
    started = time.monotonic()
    answer = raw_exchange(port, b"PUT /bazar/update_price/2 HTTP/1.1\r\nHost: x\r\n" + auth +
                          b"Content-Length: 1000000000000\r\n\r\n" + b"{" * 1000)
    status, headers, body = parse_raw(answer)
    assert status == 413 and headers["content-type"] == "application/json" and b"larger than" in body
    assert time.monotonic() - started < 5
    # a chunked body is cut off once it passes the limit
    chunks = b"".join(b"%x\r\n%s\r\n" % (4096, b" " * 4096) for _ in range(20)) + b"0\r\n\r\n"
    answer = raw_exchange(port, b"PUT /bazar/update_price/2 HTTP/1.1\r\nHost: x\r\n" + auth +
                          b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    status, headers, body = parse_raw(answer)
    assert status == 413 and headers["content-type"] == "application/json", answer[:300]
    # exactly 64 KiB is fine
    r = call("PUT", cluster.front + "/bazar/update_price/2", raw=exactly, token=TOKEN)
    assert r.status == 200 and r.json["price"] == 12.5
    r = call("PUT", cluster.front + "/bazar/update_price/2", {"price": 50.0}, token=TOKEN)
    assert r.status == 200


def test_malformed_http_gets_json_errors(cluster: Cluster) -> None:
    port = cluster.frontend_port
    for data in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1 extra\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                 b"POST /bazar/purchase/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                 b"POST /bazar/purchase/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
                 b"POST /bazar/purchase/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                 b"GET /health HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",
                 b"POST /bazar/books HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Connection: close\r\nContent-Length: 10\r\n\r\n--b\r\nxxxxx"):
        status, headers, body = parse_raw(raw_exchange(port, data))
        assert 400 <= status < 500, (data[:60], status, body[:200])
        assert headers.get("content-type") == "application/json", (data[:60], headers)
        assert isinstance(json.loads(body)["error"], str)
    # a header that is not UTF-8, and a URL that is not: clear answers, no crash
    status, headers, body = parse_raw(raw_exchange(port, b"GET /bazar/info/1 HTTP/1.1\r\nHost: x\r\n"
                                                         b"Idempotency-Key: \xff\xfe\r\nConnection: close\r\n\r\n"))
    assert status == 200
    status, _, body = parse_raw(raw_exchange(port, b"POST /bazar/purchase/1 HTTP/1.1\r\nHost: x\r\n"
                                                   b"Content-Type: application/json\r\nContent-Length: 15\r\n"
                                                   b"Idempotency-Key: \xff\xfe\r\nConnection: close\r\n\r\n"
                                                   b'{"quantity": 1}'))
    assert status == 400 and "Idempotency-Key" in json.loads(body)["error"]
    status, _, body = parse_raw(raw_exchange(port, b"GET /bazar/search/\xff\xfe HTTP/1.1\r\nHost: x\r\n"
                                                   b"Connection: close\r\n\r\n"))
    assert status == 400 and json.loads(body)["error"]


# -- methods ----------------------------------------------------------------------------

PUBLIC_ROUTES = {
    "/bazar/info/all": "GET", "/bazar/info/1": "GET", "/bazar/search/new": "GET", "/bazar/purchase/1": "POST",
    "/bazar/update_price/1": "PUT", "/bazar/restock/1": "POST", "/bazar/books": "POST", "/bazar/orders": "GET",
    "/bazar/cache/1": "DELETE", "/bazar/cache": "GET", "/health": "GET", "/ready": "GET", "/metrics": "GET",
    "/openapi.json": "GET", "/internal/invalidate": "POST",
}
REPLICA_ROUTES = {"/health": "GET", "/ready": "GET", "/metrics": "GET", "/internal/write": "POST",
                  "/internal/raft": "POST", "/internal/status": "GET"}
CATALOG_ROUTES = {**REPLICA_ROUTES, "/books": "GET", "/books/1": "GET", "/internal/sales": "GET"}
ORDER_ROUTES = {**REPLICA_ROUTES, "/orders": "GET", "/internal/purchase": "POST"}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "BREW"]


def test_unknown_methods_are_405_json_on_every_route(cluster: Cluster) -> None:
    before = state(cluster)
    checked = 0
    targets = [(cluster.front, PUBLIC_ROUTES)] + [(u, CATALOG_ROUTES) for u in cluster.catalogs] + \
        [(u, ORDER_ROUTES) for u in cluster.orders]
    for base, routes in targets:
        for path, allowed in routes.items():
            for method in METHODS:
                if method == allowed:
                    continue
                body = {"quantity": 1} if method in ("POST", "PUT", "PATCH") else None
                r = call(method, base + path, body, token=TOKEN)
                assert_json_error(r, 405)
                assert allowed in r.headers.get("allow", "").split(", "), (base + path, method, r.headers)
                checked += 1
    assert checked > 300
    assert state(cluster) == before


# -- slow clients ----------------------------------------------------------------------------

def test_slow_clients_are_cut_off_and_never_block_others(cluster: Cluster) -> None:
    """40 slowloris connections dribble a header byte per second (the idle timeout never
    fires), 10 a body byte per second (slow POST), 10 more connect and say nothing. A
    normal client is served promptly all along, and the request deadline (10 s) closes
    every slow connection with a JSON 408."""
    port = cluster.frontend_port
    slow: list[socket.socket] = []
    for i in range(60):
        s = socket.create_connection((HOST, port), timeout=5)
        s.setblocking(False)
        if i < 40:
            s.send(b"GET /bazar/info/1 HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        elif i < 50:
            s.send(b"POST /bazar/purchase/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        slow.append(s)
    started = time.monotonic()
    answers: dict[int, bytes] = {i: b"" for i in range(len(slow))}
    closed_at: dict[int, float] = {}
    latencies: list[float] = []
    try:
        while len(closed_at) < len(slow) and time.monotonic() - started < 16:
            readable, _, _ = select.select([s for i, s in enumerate(slow) if i not in closed_at], [], [], 0.2)
            for s in readable:
                i = slow.index(s)
                try:
                    chunk = s.recv(4096)
                except OSError:
                    chunk = b""
                answers[i] += chunk
                if not chunk:
                    closed_at[i] = time.monotonic() - started
            for i, s in enumerate(slow[:50]):
                if i not in closed_at:
                    try:
                        s.send(b"a")
                    except OSError:
                        pass
            t = time.monotonic()
            r = call("GET", cluster.front + "/bazar/info/1", timeout=5)
            latencies.append(time.monotonic() - t)
            assert r.status == 200
            time.sleep(0.8)
    finally:
        for s in slow:
            s.close()
    assert len(closed_at) == len(slow), f"{len(slow) - len(closed_at)} slow connections still open after 16 s"
    assert all(8 <= t <= 15 for t in closed_at.values()), sorted(closed_at.values())
    for answer in answers.values():
        status, headers, body = parse_raw(answer)
        assert status == 408 and headers["content-type"] == "application/json", answer[:200]
        assert "did not arrive in time" in json.loads(body)["error"]
    assert len(latencies) >= 8 and max(latencies) < 1.0, latencies


# -- what answers and logs never contain --------------------------------------------------------

def test_no_answer_carries_a_traceback_or_credential(cluster: Cluster) -> None:
    for url in cluster.everyone:
        r = call("GET", url + "/health")
        assert r.status == 200 and get_json(url + "/health")["status"] in ("ok", "recovering")
    assert len(SEEN) > 500
    for r in SEEN:
        text = r.body.decode("utf-8", "replace")
        for marker in ("Traceback", 'File "', ".py\", line", "twisted.", "werkzeug"):
            assert marker not in text, (r.status, text[:300])
        if r.status >= 400:
            assert r.content_type.startswith("application/json"), (r.status, r.content_type)
        assert TOKEN not in text and SECRET not in text and WRONG not in text, text[:300]


def test_logs_never_record_a_credential(cluster: Cluster) -> None:
    paths = [os.path.join(cluster.data, "cluster.out"), os.path.join(cluster.data, "tokenless-frontend.log")]
    logs = os.path.join(cluster.data, "logs")
    paths += [os.path.join(logs, name) for name in os.listdir(logs)]
    scanned = 0
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            text = f.read()
        scanned += 1
        for secret in (TOKEN, SECRET, WRONG):
            assert secret.encode() not in text, (path, secret)
        assert b"Traceback" not in text, path
    assert scanned >= 8


# -- one slow replica (in memory: no sockets, a fake clock) -------------------------------------

def test_a_slow_replica_holds_at_most_max_in_flight_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads that would queue on a replica with every slot taken go to the next
    replica at once; when all are saturated a read waits for a slot, at most its
    timeout, then gets a 503."""
    from twisted.internet import defer, task
    from twisted.web.http_headers import Headers

    from bazar import balancer
    from bazar.errors import Unavailable
    from bazar.settings import ClientTiming

    clock = task.Clock()
    hanging: list[defer.Deferred[Any]] = []
    in_flight = {"http://slow": 0, "http://fast": 0}
    most = dict(in_flight)
    slow = {"http://slow"}

    async def fake_call(http: Any, clk: Any, method: str, url: str, **kw: Any) -> tuple[int, Any, Any]:
        host = url[:url.index("/", 7)]
        if host in slow:
            in_flight[host] += 1
            most[host] = max(most[host], in_flight[host])
            d: defer.Deferred[Any] = defer.Deferred()
            hanging.append(d)
            try:
                return await d  # type: ignore[no-any-return]
            finally:
                in_flight[host] -= 1
        return 200, b"[]", Headers({b"X-Bazar-Seq": [b"0"]})

    monkeypatch.setattr(balancer, "call", fake_call)
    replicas = balancer.ReplicaSet("catalog", ["http://slow", "http://fast"], http=None, clock=clock,  # type: ignore[arg-type]
                                   secret=None, timing=ClientTiming(timeout=2.0))
    for r in replicas.replicas:
        r.alive = r.ok = True
    reads = [defer.ensureDeferred(replicas.read("/books")) for _ in range(200)]
    done = [d for d in reads if d.called]
    assert most["http://slow"] == ClientTiming().max_in_flight == 32
    assert len(hanging) == 32 and len(done) == 200 - 32  # the rest were served by the fast replica
    # now every replica is saturated: a read waits for a slot, then gives up with a 503
    slow.add("http://fast")
    more = [defer.ensureDeferred(replicas.read("/books")) for _ in range(40)]
    assert most == {"http://slow": 32, "http://fast": 32} and len(hanging) == 64
    assert not any(d.called for d in more)
    assert sum(len(r.slots.waiting) for r in replicas.replicas) == 8
    waiting = more[32:]
    clock.advance(2.1)
    failures: list[Any] = []
    for d in waiting:
        d.addErrback(failures.append)
    assert len(failures) == 8 and all(isinstance(f.value, Unavailable) for f in failures)
    # the hung calls finishing frees every slot
    for d in hanging:
        d.callback((200, b"[]", Headers({b"X-Bazar-Seq": [b"0"]})))
    assert all(r.slots.tokens == 32 for r in replicas.replicas)
    assert all(d.called for d in reads + more)
