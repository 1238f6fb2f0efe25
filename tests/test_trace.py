"""bazar.trace: off by default, one JSON line per event when on, turned on by BAZAR_TRACE."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bazar import trace as tracing
from bazar.process import process_name


@pytest.fixture
def sink(tmp_path):
    path = tmp_path / "trace.jsonl"
    yield path
    tracing.disable()
    tracing.identify(f"pid-{os.getpid()}")


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_off_by_default_it_writes_nothing(sink):
    assert not tracing.enabled()
    tracing.trace("http.request", None, path=b"/x")
    assert not sink.exists()


def test_on_it_appends_one_json_line_per_event(sink):
    tracing.enable(str(sink), "catalog-2")
    assert tracing.enabled()
    tracing.trace("propose", "fe:abc", index=7)
    tracing.trace("http.request", None, method=b"PUT", path=b"/bazar/update_price/1", extra={"a": 1})
    first, second = lines(sink)
    assert first["event"] == "propose" and first["rid"] == "fe:abc" and first["index"] == 7
    assert first["process"] == "catalog-2" and first["pid"] == os.getpid()
    assert isinstance(first["ns"], int) and first["ns"] <= second["ns"]
    assert (second["method"], second["path"], second["extra"]) == ("PUT", "/bazar/update_price/1", {"a": 1})
    assert second["rid"] is None
    tracing.disable()
    tracing.trace("after", None)
    assert len(lines(sink)) == 2
    assert oct(sink.stat().st_mode & 0o777) == oct(0o600)


def test_enabling_again_appends_to_what_is_there(sink):
    sink.write_text('{"ns": 1, "event": "old"}\n')
    tracing.enable(str(sink))
    tracing.trace("new", None)
    assert [e["event"] for e in lines(sink)] == ["old", "new"]


def test_the_environment_variable_turns_it_on_at_import(tmp_path):
    path = tmp_path / "env.jsonl"
    code = "from bazar.trace import identify, trace; identify('frontend'); trace('one', 'r1', n=1)"
    env = {**os.environ, tracing.ENV: str(path)}
    for _ in range(2):  # two processes, one file
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    events = lines(path)
    assert [(e["process"], e["event"], e["rid"], e["n"]) for e in events] == [("frontend", "one", "r1", 1)] * 2
    assert events[0]["pid"] != events[1]["pid"]
    off = {k: v for k, v in os.environ.items() if k != tracing.ENV}
    subprocess.run([sys.executable, "-c", code.replace("'one'", "'two'")], env=off, check=True, timeout=60)
    assert len(lines(path)) == 2


def test_a_process_is_named_as_bazar_cluster_names_it():
    from bazar import catalog, frontend, order

    replica = catalog.Options()
    replica["id"] = 2
    assert process_name(replica) == "catalog-2"
    replica = order.Options()
    replica["id"] = 3
    assert process_name(replica) == "order-3"
    assert process_name(frontend.Options()) == "frontend"
