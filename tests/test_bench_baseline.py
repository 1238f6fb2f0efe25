"""`bazar-bench --baseline DIR`: the purchase path beside earlier code, judged as
same-run ratios (bazar.bench.baseline)."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import threading
import time

import pytest

from bazar.bench import baseline, cli
from bazar.bench.phases import Ctx
from bazar.bench.report import evaluate_targets, render_report

P50, R16, R64 = "purchase/1/p50_ms", "purchase/16/rps", "purchase/64/rps"


def _ops(p50: float, r16: float, r64: float | None = None) -> dict:
    purchase = {"1": {"p50_ms": p50, "rps": 1000 / p50}, "16": {"p50_ms": 40.0, "rps": r16}}
    if r64 is not None:
        purchase["64"] = {"p50_ms": 90.0, "rps": r64}
    return {"ops": {"on": {"purchase": purchase, "info": {"1": {"p50_ms": 0.2, "rps": 5000.0},
                                                           "16": {"p50_ms": 1.0, "rps": 12000.0}}},
                    "off": {"purchase": {"1": {"p50_ms": 99.0, "rps": 1.0}}}}}


def fake_bench(path: str, figures: dict, calls: str) -> str:
    """An executable standing in for a bench: it appends its arguments to `calls`, and
    writes `figures` as the results.json of its --out (or, with {"sleep": S}, sleeps S
    seconds first and exits 0 on SIGTERM; with {"none": true}, writes nothing)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
            import json, os, signal, sys, time
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            figures = json.loads({json.dumps(json.dumps(figures))})
            with open({calls!r}, "a") as f:
                f.write(json.dumps(sys.argv[1:]) + "\\n")
            time.sleep(figures.pop("sleep", 0))
            if not figures.pop("none", False):
                out = sys.argv[sys.argv.index("--out") + 1]
                with open(os.path.join(out, "results.json"), "w") as f:
                    json.dump(figures, f)
            """))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def ctx(*argv: str) -> Ctx:
    return Ctx(cli.parse_args(["--quick", *argv]))


def test_figures_of_reads_the_cache_on_purchases_and_skips_what_is_not_a_figure():
    res = _ops(8.0, 300.0, 500.0)
    res["ops"]["on"]["purchase"]["16"]["rps"] = True  # not a number
    res["ops"]["on"]["info"]["16"]["rps"] = 0  # nothing measured
    found = baseline.figures_of(res)
    assert found == {P50: 8.0, R64: 500.0, "info/1/p50_ms": 0.2}
    assert baseline.figures_of({}) == {} and baseline.figures_of(None) == {}
    assert baseline.figures_of({"ops": {"on": {"purchase": ["not", "a", "table"], "info": {"1": 3}}}}) == {}


def test_summarize_takes_ratios_within_pairs_and_their_median():
    pairs = [{"baseline": {P50: 8.0, R16: 300.0}, "bazar": {P50: 6.0, R16: 450.0, R64: 600.0}},
             {"baseline": {P50: 10.0, R16: 250.0}, "bazar": {P50: 9.0, R16: 500.0, R64: 620.0}},
             {"baseline": {P50: 6.0, R16: 400.0}, "bazar": {P50: 7.2, R16: 400.0, R64: 640.0}}]
    s = baseline.summarize(pairs)
    assert s["ratios"][P50] == pytest.approx([0.75, 0.9, 1.2])
    assert s["median"][P50] == pytest.approx(0.9)
    assert s["median"][R16] == pytest.approx(1.5)
    assert R64 not in s["median"] and s["unmeasured"] == [R64]


def test_targets_judge_the_median_ratios_and_say_why_one_is_missing():
    res = {"baseline": {"median": {P50: 0.30, R16: 1.5}, "unmeasured": [R64]}}
    rows = {r["name"]: r for r in evaluate_targets(res)}
    assert rows["purchase p50, 1 conn ÷ the baseline's"]["verdict"] == "PASS"
    assert rows["purchase throughput, 16 conns ÷ the baseline's"]["verdict"] == "FAIL"
    r64 = rows["purchase throughput, 64 conns ÷ the baseline's"]
    assert r64["verdict"] == "n/a" and "baseline's bench does not measure it" in r64["why"]
    res = {"baseline": {"skipped": "not measured (no --baseline DIR)"}}
    rows = {r["name"]: r for r in evaluate_targets(res)}
    assert rows["purchase p50, 1 conn ÷ the baseline's"]["why"] == "not measured (no --baseline DIR)"


def test_report_shows_every_pair_and_the_median():
    pairs = [{"baseline": {P50: 8.0, R16: 300.0}, "bazar": {P50: 6.0, R16: 450.0, R64: 600.0}}]
    res = {"baseline": {"dir": "/src/filed", "commit": "8bdb8df", "rounds": 1, "pairs": pairs,
                        **baseline.summarize(pairs)}}
    md = render_report(res)
    section = md.split("## 16.")[1].split("## How")[0]
    assert "`/src/filed` (commit 8bdb8df)" in section
    assert "| purchase p50, 1 conn | 8.00 ms → 6.00 ms (0.75×) | 0.75× |" in section
    assert "| purchases/s, 16 conns | 300/s → 450/s (1.50×) | 1.50× |" in section
    assert "Not measured by the baseline's bench: purchases/s, 64 conns." in section
    assert "| purchase p50, 1 conn ÷ the baseline's | ≤ 0.35× | 0.75× | **FAIL** |" in md
    assert "Not measured: no `--baseline DIR` given." in render_report({})


def test_options_refuse_a_baseline_without_its_bench(tmp_path):
    with pytest.raises(SystemExit):
        cli.parse_args(["--baseline", str(tmp_path)])
    fake_bench(str(tmp_path / ".venv" / "bin" / "bazar-bench"), {}, str(tmp_path / "calls"))
    a = cli.parse_args(["--baseline", str(tmp_path)])
    assert a.baseline == str(tmp_path) and a.baseline_rounds == baseline.ROUNDS
    assert cli.parse_args(["--quick"]).baseline_rounds == baseline.QUICK_ROUNDS
    with pytest.raises(SystemExit):
        cli.parse_args(["--baseline-rounds", "0"])


def test_both_benches_run_one_after_the_other_the_first_alternating(tmp_path, monkeypatch):
    calls = str(tmp_path / "calls")
    old = tmp_path / "old"
    fake_bench(str(old / ".venv" / "bin" / "bazar-bench"), _ops(8.0, 300.0), calls)
    mine = fake_bench(str(tmp_path / "mine"), _ops(6.0, 450.0, 600.0), calls)
    monkeypatch.setattr(baseline, "own_command", lambda: [mine])
    r = baseline.phase_baseline(ctx(), str(old), 2, str(tmp_path / "runs"))
    ran = [json.loads(line) for line in open(calls)]
    outs = [args[args.index("--out") + 1] for args in ran]
    assert [os.path.basename(o) for o in outs] == ["baseline-1", "bazar-1", "bazar-2", "baseline-2"]
    for args in ran:
        assert args[:4] == ["--start", "--only", "ops", "--no-plots"] and args[args.index("--duration") + 1] == "0.5"
    assert r["median"] == pytest.approx({P50: 0.75, R16: 1.5, "info/1/p50_ms": 1.0, "info/16/rps": 1.0})
    assert r["unmeasured"] == [R64] and r["rounds"] == 2 and r["dir"] == str(old)


def test_a_side_that_leaves_no_results_or_takes_too_long_fails_the_phase(tmp_path):
    calls = str(tmp_path / "calls")
    quiet = fake_bench(str(tmp_path / "quiet"), {"none": True}, calls)
    with pytest.raises(RuntimeError, match="no readable results.json"):
        baseline.run_side(ctx(), [quiet], str(tmp_path), str(tmp_path / "q"))
    slow = fake_bench(str(tmp_path / "slow"), {"sleep": 60}, calls)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="took over"):
        baseline.run_side(ctx(), [slow], str(tmp_path), str(tmp_path / "s"), timeout=1.0)
    assert time.monotonic() - t0 < 30


def test_an_interrupt_stops_the_side_that_runs(tmp_path):
    slow = fake_bench(str(tmp_path / "slow"), {"sleep": 60}, str(tmp_path / "calls"))
    c = ctx()
    threading.Timer(1.0, c.stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="interrupted"):
        baseline.run_side(c, [slow], str(tmp_path), str(tmp_path / "s"))
    assert time.monotonic() - t0 < 30
