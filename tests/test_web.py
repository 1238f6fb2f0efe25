"""bazar.http (app, request): JSON responses and errors for every status, body limits, the admin
token and the cluster secret — through a real Klein app over StubTreq."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
import treq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.web.test.requesthelper import DummyRequest

from bazar.errors import BazarError, Conflict, Forbidden, Invalid, NotFound, TooLarge, Unauthorized, Unavailable
from bazar.http import request as web
from bazar.http.app import Created, JsonApp, Raw, etag_of, none_match
from bazar.http.request import MAX_BODY, NO_BODY, parse_id, read_json, read_object, require_admin
from bazar.testing.memory import SECRET, TOKEN, Cluster, Response, result_of, url_of


def exchange(stub: StubTreq, method: str, url: str, **kw: Any) -> Response:
    d = stub.request(method, url, **kw)
    stub.flush()
    response = result_of(d)
    body = treq.content(response)
    stub.flush()
    return Response(response.code, response.headers, result_of(body))


def assert_json_error(r: Response, status: int) -> dict[str, Any]:
    assert r.code == status, r
    assert r.header("Content-Type") == "application/json"
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert b"Traceback" not in r.body and b"<html" not in r.body.lower()
    return body


def sample_app() -> JsonApp:
    api = JsonApp("sample")

    @api.route("/plain", "GET", "plain")
    def plain(request: Any) -> dict[str, Any]:
        return {"ok": True}

    @api.route("/created", "POST", "created")
    def created(request: Any) -> Created:
        return Created("/created/1", read_object(request))

    @api.route("/optional", "POST", "optional")
    def optional(request: Any) -> Any:
        return {"body": read_object(request, optional=True)}

    @api.route("/raw", "GET", "raw")
    def raw(request: Any) -> Raw:
        return Raw(b"hello", b"text/plain")

    @api.route("/teapot", "GET", "teapot")
    def teapot(request: Any) -> Any:
        raise Unavailable("short and stout", retry_after=3)

    @api.route("/unsure", "GET", "unsure")
    def unsure(request: Any) -> Any:
        raise Unavailable("no idea when", retry_after=None)

    @api.route("/busy", "GET", "busy")
    def busy(request: Any) -> tuple[int, Any]:
        return 503, {"error": "a handler's own 503"}

    @api.route("/tagged", "GET", "tagged", etag=True)
    def tagged(request: Any) -> bytes:
        return b'{"tagged":true}'

    @api.route("/boom", "GET", "boom")
    def boom(request: Any) -> Any:
        raise ZeroDivisionError("secret internals")

    @api.route("/async", "GET", "async")
    async def later(request: Any) -> Any:
        await succeed(None)
        return [1, 2, 3]

    @api.route("/async-error", "GET", "async_error")
    async def later_error(request: Any) -> Any:
        await succeed(None)
        raise Conflict("conflict, later")

    @api.route("/async-boom", "GET", "async_boom")
    async def later_boom(request: Any) -> Any:
        await succeed(None)
        raise KeyError("secret internals")

    @api.route("/admin", "GET", "admin")
    def admin(request: Any) -> Any:
        require_admin(request, TOKEN)
        return {"admin": True}

    @api.route("/internal/thing", "POST", "internal")
    def internal(request: Any) -> Any:
        web.require_secret(request, SECRET)
        return {"internal": True}

    return api


@pytest.fixture
def stub() -> StubTreq:
    return StubTreq(sample_app().resource())


URL = "http://127.0.0.1:8000"


def test_json_success_and_status_pairs(stub: StubTreq) -> None:
    r = exchange(stub, "GET", URL + "/plain")
    assert (r.code, r.json(), r.header("Content-Type")) == (200, {"ok": True}, "application/json")
    r = exchange(stub, "POST", URL + "/created", data=b'{"a": [1, "x"]}')
    assert (r.code, r.json(), r.header("Location")) == (201, {"a": [1, "x"]}, "/created/1")
    assert exchange(stub, "GET", URL + "/plain").header("Location") is None
    r = exchange(stub, "GET", URL + "/async")
    assert (r.code, r.json()) == (200, [1, 2, 3])


def test_raw_bodies_keep_their_content_type(stub: StubTreq) -> None:
    r = exchange(stub, "GET", URL + "/raw")
    assert (r.code, r.body, r.header("Content-Type")) == (200, b"hello", "text/plain")


def test_errors_carry_status_headers_and_sentence(stub: StubTreq) -> None:
    r = exchange(stub, "GET", URL + "/teapot")
    assert assert_json_error(r, 503) == {"error": "short and stout"}
    assert r.header("Retry-After") == "3"
    assert assert_json_error(exchange(stub, "GET", URL + "/async-error"), 409) == {"error": "conflict, later"}


@pytest.mark.parametrize("path", ["/unsure", "/busy"])
def test_every_503_carries_retry_after(stub: StubTreq, path: str) -> None:
    r = exchange(stub, "GET", URL + path)
    assert_json_error(r, 503)
    assert r.header("Retry-After") == "1"


def test_405_from_routes_carries_allow(stub: StubTreq) -> None:
    r = exchange(stub, "PUT", URL + "/plain")
    assert_json_error(r, 405)
    assert r.header("Allow") == "GET, HEAD"
    r = exchange(stub, "GET", URL + "/created")
    assert_json_error(r, 405)
    assert r.header("Allow") == "POST"
    assert exchange(stub, "GET", URL + "/nowhere").header("Allow") is None  # a 404 allows nothing


def test_etag_and_if_none_match(stub: StubTreq) -> None:
    body = b'{"tagged":true}'
    tag = etag_of(body)
    r = exchange(stub, "GET", URL + "/tagged")
    assert (r.code, r.body, r.header("ETag")) == (200, body, tag.decode())
    r = exchange(stub, "GET", URL + "/tagged", headers={"If-None-Match": tag})
    assert (r.code, r.body, r.header("ETag"), r.header("Content-Length")) == (304, b"", tag.decode(), None)
    r = exchange(stub, "GET", URL + "/tagged", headers={"If-None-Match": ['"a"', tag]})  # given twice: both count
    assert r.code == 304
    assert exchange(stub, "GET", URL + "/tagged", headers={"If-None-Match": '"a"'}).code == 200
    assert exchange(stub, "GET", URL + "/plain").header("ETag") is None  # only routes that ask for it


def test_etags_name_the_bytes_and_if_none_match_compares_weakly() -> None:
    tag = etag_of(b"[1]")
    assert tag == etag_of(b"[1]") != etag_of(b"[2]")
    assert tag.startswith(b'"') and tag.endswith(b'"') and len(tag) == 18
    for header in (tag, b"W/" + tag, b'"x", ' + tag, b"*", b' "x" ,W/' + tag + b" "):
        assert none_match(header, tag), header
    for header in (b'"x"', b"", tag[1:-1], b'"x", W/"y"'):
        assert not none_match(header, tag), header


@pytest.mark.parametrize("path", ["/boom", "/async-boom"])
def test_unexpected_errors_are_json_500_without_internals(stub: StubTreq, path: str) -> None:
    r = exchange(stub, "GET", URL + path)
    assert assert_json_error(r, 500) == {"error": "internal error"}
    assert b"secret internals" not in r.body


@pytest.mark.parametrize("path", ["/nope", "/plain/extra", "/", "/%C3%A9", "/bazar/info/1/2"])
def test_unknown_routes_are_json_404(stub: StubTreq, path: str) -> None:
    assert_json_error(exchange(stub, "GET", URL + path), 404)


@pytest.mark.parametrize("path", ["/%ff%fe", "/plain/%80", "/%ed%a0%80"])
def test_urls_that_are_not_utf8_are_json_400(stub: StubTreq, path: str) -> None:
    assert_json_error(exchange(stub, "GET", URL + path), 400)


@pytest.mark.parametrize("method, path", [("POST", "/plain"), ("DELETE", "/plain"), ("GET", "/created"),
                                          ("PUT", "/raw"), ("PATCH", "/admin")])
def test_wrong_methods_are_json_405(stub: StubTreq, method: str, path: str) -> None:
    assert_json_error(exchange(stub, method, URL + path), 405)


def test_bodies_over_64_kib_are_413(stub: StubTreq) -> None:
    at_limit = b'{"a": "' + b"x" * (MAX_BODY - 10) + b'"}'
    assert len(at_limit) <= MAX_BODY
    assert exchange(stub, "POST", URL + "/created", data=at_limit).code == 201
    too_big = b'{"a": "' + b"x" * MAX_BODY + b'"}'
    assert_json_error(exchange(stub, "POST", URL + "/created", data=too_big), 413)
    assert_json_error(exchange(stub, "POST", URL + "/optional", data=b" " * (MAX_BODY + 1)), 413)


def dummy(body: bytes, length: bytes | None = None) -> DummyRequest:
    request = DummyRequest([b""])
    request.content = io.BytesIO(body)
    if length is not None:
        request.requestHeaders.setRawHeaders(b"Content-Length", [length])
    return request


def test_read_body_limits_without_or_with_a_lying_content_length() -> None:
    # No Content-Length (chunked upload): the limit holds on what was read.
    with pytest.raises(TooLarge):
        web.read_body(dummy(b"x" * (MAX_BODY + 1)))
    # A Content-Length claiming less than was sent changes nothing.
    with pytest.raises(TooLarge):
        web.read_body(dummy(b"x" * (MAX_BODY + 1), b"3"))
    # A Content-Length above the limit is refused before reading.
    with pytest.raises(TooLarge):
        web.read_body(dummy(b"{}", str(MAX_BODY + 1).encode()))
    assert web.read_body(dummy(b"x" * MAX_BODY)) == b"x" * MAX_BODY


def test_json_null_is_not_an_optional_body() -> None:
    assert read_json(dummy(b"null"), optional=True) is None
    with pytest.raises(Invalid):
        read_object(dummy(b"null"), optional=True)


@pytest.mark.parametrize("body", [b"", b"   ", b"\n\t"])
def test_empty_bodies(body: bytes) -> None:
    assert read_json(dummy(body), optional=True) is NO_BODY
    assert read_object(dummy(body), optional=True) is None
    with pytest.raises(Invalid):
        read_json(dummy(body))


@pytest.mark.parametrize("body", [b"NaN", b'{"p": NaN}', b'{"p": Infinity}', b'{"p": -Infinity}', b"1e400",
                                  b"{'p': 1}", b"{", b'{"a":1}x', b"\xff\xfe", b'"\xed\xa0\x80"',
                                  b"\xef\xbb\xbf{}", b'{"a": "\\ud800"}', b"\x00"])
def test_invalid_json_is_400(body: bytes) -> None:
    with pytest.raises(Invalid):
        read_json(dummy(body))


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"', b"true", b"[{}]"])
def test_read_object_wants_an_object(body: bytes) -> None:
    with pytest.raises(Invalid):
        read_object(dummy(body), optional=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300))
def test_arbitrary_bytes_are_json_answers_never_500(stub: StubTreq, body: bytes) -> None:
    r = exchange(stub, "POST", URL + "/created", data=body)
    if r.code == 201:
        assert isinstance(orjson.loads(body), dict)
    else:
        assert_json_error(r, 400)


# -- admin token ---------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Bearer " + TOKEN + "x"},
    {"Authorization": "Bearer " + TOKEN[:-1]},
    {"Authorization": "Basic " + TOKEN},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer    "},
])
def test_admin_routes_refuse_without_the_token(stub: StubTreq, headers: dict[str, str]) -> None:
    r = exchange(stub, "GET", URL + "/admin", headers=headers)
    assert_json_error(r, 401)
    assert r.header("WWW-Authenticate") == 'Bearer realm="bazar"'


@pytest.mark.parametrize("value", ["Bearer " + TOKEN, "bearer " + TOKEN, "BEARER  " + TOKEN + " "])
def test_admin_routes_accept_the_token(stub: StubTreq, value: str) -> None:
    r = exchange(stub, "GET", URL + "/admin", headers={"Authorization": value})
    assert (r.code, r.json()) == (200, {"admin": True})


def test_admin_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []

    def compare(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return a == b

    monkeypatch.setattr(web.hmac, "compare_digest", compare)
    request = dummy(b"")
    request.requestHeaders.setRawHeaders(b"Authorization", [b"Bearer guess"])
    with pytest.raises(Unauthorized):
        require_admin(request, TOKEN)
    assert seen == [(b"guess", TOKEN.encode())]


@pytest.mark.parametrize("configured", [None, ""])
def test_no_configured_token_disables_admin_calls(configured: str | None) -> None:
    for header in (b"Bearer ", b"Bearer x", b""):
        request = dummy(b"")
        request.requestHeaders.setRawHeaders(b"Authorization", [header])
        with pytest.raises(Unauthorized):
            require_admin(request, configured)


# -- cluster secret ------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"X-Bazar-Secret": "nope"}, {"X-Bazar-Secret": SECRET + "x"},
                                     {"X-Bazar-Secret": SECRET[:-1]}, {"X-Bazar-Secret": ""},
                                     {"Authorization": "Bearer " + SECRET}])
def test_internal_routes_need_the_cluster_secret(stub: StubTreq, headers: dict[str, str]) -> None:
    assert_json_error(exchange(stub, "POST", URL + "/internal/thing", headers=headers), 403)
    r = exchange(stub, "POST", URL + "/internal/thing", headers={"X-Bazar-Secret": SECRET})
    assert (r.code, r.json()) == (200, {"internal": True})


def test_no_configured_secret_closes_internal_routes() -> None:
    for header in (None, b"", b"anything"):
        request = dummy(b"")
        if header is not None:
            request.requestHeaders.setRawHeaders(web.SECRET_HEADER, [header])
        with pytest.raises(Forbidden):
            web.require_secret(request, None)


def test_replica_internal_endpoints_are_closed_to_the_public(tmp_path: Any) -> None:
    cluster = Cluster(str(tmp_path), 1)
    try:
        before = cluster.log(1)
        base = url_of(cluster.port(1))
        calls = [("POST", "/internal/raft"), ("POST", "/internal/write"), ("GET", "/internal/status")]
        for method, path in calls:
            for headers in ({}, {"X-Bazar-Secret": "wrong"}):
                r = cluster.http(method, base + path, headers=headers,
                                 json={"op": {"op": "restock", "rid": "x", "id": 1, "quantity": 5}})
                assert_json_error(r, 403)
        assert cluster.log(1) == before
        r = cluster.http("GET", base + "/internal/status", headers={"X-Bazar-Secret": SECRET})
        assert r.code == 200 and r.json()["role"] == "primary"
    finally:
        cluster.close()


@pytest.mark.parametrize("body", [b"", b"[]", b"{", b'{"epoch": "x", "leader": 1}', b'{"epoch": 1}',
                                  b'{"op": 3}', b'{"op": {"op": "restock"}}',
                                  b'{"op": {"op": "restock", "rid": "r", "id": 1, "quantity": -1000}}',
                                  b'{"op": {"op": "restock", "rid": "r", "id": 1, "quantity": 9223372036854775808}}',
                                  b'{"op": {"op": "update_price", "rid": "r", "id": 1, "price": "nan"}}',
                                  b'{"kind": "append", "term": 1, "src": 2, "dst": 1, "prev_index": 0,'
                                  b' "prev_term": 0, "entries": {"a": 1}, "commit": 0}',
                                  b'{"kind": "append", "term": 1, "src": 2, "dst": 1, "prev_index": 0,'
                                  b' "prev_term": 0, "entries": [{"seq": 1}], "commit": 0}',
                                  b'{"kind": "vote", "term": "9", "src": 2, "dst": 1, "last_index": 0,'
                                  b' "last_term": 0, "pre": false}',
                                  b'{"kind": "nonsense", "term": 9, "src": 2, "dst": 1}'])
def test_malformed_internal_messages_are_400(tmp_path: Any, body: bytes) -> None:
    cluster = Cluster(str(tmp_path), 1)
    try:
        base = url_of(cluster.port(1))
        before = cluster.log(1), cluster[1].epoch
        for path in ("/internal/raft", "/internal/write"):
            r = cluster.http("POST", base + path, data=body, headers={"X-Bazar-Secret": SECRET})
            assert_json_error(r, 400)
        assert (cluster.log(1), cluster[1].epoch) == before
    finally:
        cluster.close()


# -- ids and metrics -----------------------------------------------------------

@pytest.mark.parametrize("text, value", [("0", 0), ("7", 7), ("000123", 123), ("9" * 18, 10**18 - 1)])
def test_parse_id_accepts_plain_decimal(text: str, value: int) -> None:
    assert parse_id(text) == value


@pytest.mark.parametrize("text", ["", "-1", "+1", "1.0", "abc", " 1", "1 ", "0x1", "1e3", "\u0661", "\uff11",
                                  "\u00b2", "9" * 19, "1_000"])
def test_parse_id_refuses_anything_else_with_404(text: str) -> None:
    with pytest.raises(NotFound):
        parse_id(text)


def test_metrics_count_requests_per_route_and_status(stub: StubTreq) -> None:
    for _ in range(3):
        exchange(stub, "GET", URL + "/plain")
    exchange(stub, "GET", URL + "/teapot")
    exchange(stub, "GET", URL + "/nowhere")
    r = exchange(stub, "GET", URL + "/metrics")
    assert r.code == 200 and r.header("Content-Type").startswith("text/plain")
    text = r.body.decode()
    assert 'bazar_requests_total{route="plain",service="sample",status="200"} 3.0' in text
    assert 'bazar_requests_total{route="teapot",service="sample",status="503"} 1.0' in text
    assert 'bazar_requests_total{route="unmatched",service="sample",status="404"} 1.0' in text
    assert 'bazar_request_seconds_count{route="plain",service="sample"} 3.0' in text


def test_two_apps_in_one_process_have_their_own_metrics() -> None:
    a, b = StubTreq(sample_app().resource()), StubTreq(sample_app().resource())
    exchange(a, "GET", URL + "/plain")
    text = exchange(b, "GET", URL + "/metrics").body.decode()
    assert 'bazar_requests_total{route="plain"' not in text
    assert 'bazar_request_seconds_count{route="plain",service="sample"} 0.0' in text


def test_fast_paths_answer_json_for_results_errors_and_crashes() -> None:
    from twisted.logger import globalLogPublisher

    api = JsonApp("test")
    calls: list[bytes] = []

    def handler(request: Any, rest: bytes) -> bytes | None:
        calls.append(rest)
        if rest == b"ok":
            return b'{"fast": true}'
        if rest == b"gone":
            raise NotFound("not here")
        if rest == b"boom":
            raise RuntimeError("broken")
        return None  # falls through to the Klein route

    @api.route("/x/<string:rest>", "GET", "x")
    def slow(request: Any, rest: str) -> dict[str, Any]:
        return {"slow": rest}

    api.fast("GET", "/x/", "x", handler)
    stub = StubTreq(api.resource())
    errors: list[Any] = []
    globalLogPublisher.addObserver(errors.append)
    try:
        assert exchange(stub, "GET", "http://h/x/ok").code == 200
        assert exchange(stub, "GET", "http://h/x/ok").json() == {"fast": True}
        gone = exchange(stub, "GET", "http://h/x/gone")
        assert (gone.code, gone.json()) == (404, {"error": "not here"})
        boom = exchange(stub, "GET", "http://h/x/boom")
        assert (boom.code, boom.json()) == (500, {"error": "internal error"})
        assert boom.header("Content-Type") == "application/json"
        slow_answer = exchange(stub, "GET", "http://h/x/other")
        assert (slow_answer.code, slow_answer.json()) == (200, {"slow": "other"})
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert calls == [b"ok", b"ok", b"gone", b"boom", b"other"]
    assert any("log_failure" in event for event in errors)  # the crash is logged, not shown
    metrics = exchange(stub, "GET", "http://h/metrics").body.decode()
    assert 'route="x",service="test",status="404"' in metrics


def test_rpcs_answer_their_exact_path_only() -> None:
    """Internal RPCs: an exact path, no Klein route behind it (another path under it is
    a 404), a wrong method a 405 that says which are allowed; async handlers and
    errors answered like routes'."""
    api = JsonApp("test")

    @api.rpc("/internal/echo", "POST", "echo")
    async def echo(request: Any) -> Any:
        await succeed(None)
        body = read_object(request)
        if body == {"fail": True}:
            raise Invalid("asked to fail")
        return body

    @api.rpc("/internal/echo", "PUT", "echo_put")
    def echo_put(request: Any) -> Any:
        return 201, {"put": True}

    stub = StubTreq(api.resource())
    r = exchange(stub, "POST", "http://h/internal/echo", data=b'{"a": 1}')
    assert (r.code, r.json()) == (200, {"a": 1})
    r = exchange(stub, "PUT", "http://h/internal/echo")
    assert (r.code, r.json()) == (201, {"put": True})
    assert_json_error(exchange(stub, "POST", "http://h/internal/echo", data=b'{"fail": true}'), 400)
    r = exchange(stub, "GET", "http://h/internal/echo")
    assert_json_error(r, 405)
    assert r.header("Allow") == "POST, PUT"
    assert_json_error(exchange(stub, "POST", "http://h/internal/echo/more", data=b"{}"), 404)
    metrics = exchange(stub, "GET", "http://h/metrics").body.decode()
    assert 'route="echo",service="test",status="200"' in metrics
    assert 'route="echo",service="test",status="400"' in metrics


@pytest.mark.parametrize("error, status", [(Invalid("x"), 400), (Unauthorized("x"), 401), (Forbidden("x"), 403),
                                           (NotFound("x"), 404), (Conflict("x"), 409), (TooLarge("x"), 413),
                                           (Unavailable("x"), 503)])
def test_every_error_has_its_status_and_a_peer_gives_it_back(error: BazarError, status: int) -> None:
    from bazar.http.app import status_of
    from bazar.http.client import error_of

    assert status_of(error) == status
    back = error_of(status, {"error": "said the peer"})
    assert type(back) is type(error) and back.message == "said the peer"
