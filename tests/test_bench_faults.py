"""bazar-bench's measurements under faults: elections under a CPU hog (bazar.bench.hog),
disk over a soak (bazar.bench.soak), the invalidation delay across front ends
(bazar.bench.spread). Their pure parts and report sections without a cluster; each
phase once against real processes, with tiny counts (marker `integration`)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import types

import pytest

from bazar.bench import cli, faultreport, hog, soak, spread
from bazar.bench.report import TARGETS, evaluate_targets, render_report
from bazar.testing.processes import Cluster, pid_alive

# ---------------------------------------------------------------- hog: pure parts


def test_epoch_changes_per_service_from_the_highest_epoch_of_its_replicas():
    before = {"catalog-1": 3, "catalog-2": 3, "catalog-3": 2, "order-1": 1, "order-2": 1, "order-3": None}
    after = {"catalog-1": 5, "catalog-2": 4, "catalog-3": 5, "order-1": 1, "order-2": 1, "order-3": 1}
    assert hog.epoch_changes(before, after) == {"catalog": 2, "order": 0}
    assert hog.total_changes({"catalog": 2, "order": 0}) == 2
    # a service none of whose replicas answered is unknown, and so is the total
    unknown = hog.epoch_changes(before, {**after, "order-1": None, "order-2": None, "order-3": None})
    assert unknown == {"catalog": 2, "order": None}
    assert hog.total_changes(unknown) is None


def test_a_hog_ends_by_itself_when_its_time_is_up_or_its_parent_is_gone():
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", hog.HOG_CODE, "0.3", str(os.getpid())], timeout=20)
    assert done.returncode == 0 and 0.3 <= time.monotonic() - t0 < 10
    t0 = time.monotonic()  # "its parent" is pid 1: not the one that started it, so it is gone at once
    done = subprocess.run([sys.executable, "-c", hog.HOG_CODE, "60", "1"], timeout=20)
    assert done.returncode == 0 and time.monotonic() - t0 < 10


def test_cpu_hogs_burn_cpu_and_are_stopped_by_pid(tmp_path):
    with hog.CpuHogs(1, 60.0, str(tmp_path)) as hogs:
        hogs.start()
        (pid,) = hogs.pids
        time.sleep(1.0)
        assert hogs.running() == 1 and pid_alive(pid)
        assert (hogs.cores_since_start(1.0) or 0) > 0.05  # (a busy machine gives it less than a core)
    assert not pid_alive(pid)


# ---------------------------------------------------------------- soak: pure parts


def test_metric_value_reads_a_sample_by_name_and_labels():
    text = ('# HELP bazar_snapshots_total snapshots\n# TYPE bazar_snapshots_total counter\n'
            'bazar_snapshots_total{kind="installed",replica="1",service="catalog"} 2.0\n'
            'bazar_snapshots_total{kind="taken",replica="1",service="catalog"} 5.0\n'
            'bazar_replica_request_ids{replica="1",service="catalog"} 49999.0\n'
            'bazar_replica_request_ids_other 7\n')
    assert soak.metric_value(text, "bazar_snapshots_total", kind="taken") == 5
    assert soak.metric_value(text, "bazar_snapshots_total", kind="installed") == 2
    assert soak.metric_value(text, "bazar_replica_request_ids") == 49999
    assert soak.metric_value(text, "bazar_snapshots_total", kind="sent") is None
    assert soak.metric_value("", "bazar_replica_request_ids") is None


def test_dir_bytes_by_kind_of_file(tmp_path):
    for name, size in (("catalog.db", 4096), ("catalog.db-wal", 1000), ("catalog.db-shm", 32768),
                       ("bazar-catalog.lock", 6)):
        (tmp_path / name).write_bytes(b"x" * size)
    (tmp_path / "sub").mkdir()
    assert soak.dir_bytes(str(tmp_path)) == {"db": 4096, "wal": 1000, "shm": 32768, "other": 6,
                                             "total": 4096 + 1000 + 32768 + 6}
    assert soak.dir_bytes(str(tmp_path / "missing"))["total"] == 0
    assert soak.db_file(str(tmp_path)) == str(tmp_path / "catalog.db")


def test_table_bytes_accounts_for_every_page_of_a_live_wal_file(tmp_path):
    path = str(tmp_path / "catalog.db")
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT)")
    db.execute("CREATE TABLE sales (key TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, book INTEGER)")
    db.execute("CREATE TABLE raft_log (idx INTEGER PRIMARY KEY, term INTEGER, entry TEXT)")
    db.execute("CREATE TABLE requests (rid TEXT PRIMARY KEY, seq INTEGER, outcome TEXT)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)")
    with db:
        db.executemany("INSERT INTO sales VALUES (?, ?, 1)", [(f"sale:{i:08d}-key", i) for i in range(2000)])
        db.executemany("INSERT INTO raft_log VALUES (?, 1, ?)", [(i, "x" * 300) for i in range(1000)])
        db.executemany("INSERT INTO requests VALUES (?, ?, 'ok')", [(f"rid-{i}", i) for i in range(1000)])
    with db:
        db.execute("DELETE FROM raft_log WHERE idx < 500")  # freed pages
    tables = soak.table_bytes(path, "catalog")  # (another connection, read-only, while this one holds the file)
    db.close()
    assert tables is not None and tables["rows"] == 2000
    parts = soak.parts(tables, "catalog")
    assert parts["data"] >= 2000 * 20 and parts["log"] >= 500 * 300 and parts["requests"] > 0
    assert parts["free"] > 0 and parts["other"] >= 0
    assert sum(parts.values()) == tables["file_bytes"]
    # the table's indexes count with it: more than its rows alone
    assert tables["tables"]["sales"] > tables["tables"]["books"]
    assert 20 < soak.row_bytes(tables, "catalog") < 200
    assert soak.table_bytes(str(tmp_path / "missing.db"), "catalog") is None


def _samples(per_purchase, fixed=0, n=11, step=1000, name="catalog-1", **extra):
    """Samples of one replica whose directory grows by `per_purchase` bytes a purchase
    on top of `fixed(purchases)` bytes."""
    out = []
    for i in range(n):
        p = i * step
        fix = fixed(p) if callable(fixed) else fixed
        out.append({"purchases": p, "t": float(i),
                    "replicas": {name: {"total": 1_000_000 + per_purchase * p + fix, "log": min(p, 12_000),
                                        "request_ids": min(p, 50_000), **extra}}})
    return out


def test_growth_over_the_run_and_in_the_last_half():
    g = soak.growth(_samples(200), "catalog-1")
    assert g["whole"] == pytest.approx(200) and g["last_half"] == pytest.approx(200)
    # overhead that fills up in the first half (a log, request ids) and then stays
    filling = _samples(200, fixed=lambda p: min(p, 5000) * 300)
    g = soak.growth(filling, "catalog-1")
    assert g["whole"] == pytest.approx(350) and g["last_half"] == pytest.approx(200)
    assert soak.growth(_samples(200, n=1), "catalog-1") == {"whole": None, "last_half": None}
    assert soak.slope([1, 1], [2, 3]) is None and soak.slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2)


def _tables(data, log, requests, free, other, rows):
    return {"file_bytes": data + log + requests + free + other, "free_bytes": free, "rows": rows,
            "tables": {"sales": data, "books": 0, "raft_log": log, "requests": requests, "meta": other}}


def _reading(purchases, wal, **tables):
    t = _tables(**tables)
    return {"purchases": purchases, "tables": t,
            "dir": {"db": t["file_bytes"], "wal": wal, "shm": 32768, "other": 6,
                    "total": t["file_bytes"] + wal + 32768 + 6}}


def test_split_of_the_last_half_adds_up_to_the_directory():
    mid = _reading(50_000, 4_000_000, data=10_000_000, log=3_000_000, requests=9_000_000, free=500_000, other=8192,
                   rows=50_000)
    end = _reading(100_000, 4_100_000, data=20_000_000, log=3_100_000, requests=9_050_000, free=400_000, other=8192,
                   rows=100_000)
    s = soak.split(mid, end, "catalog")
    assert s["data"] == pytest.approx(200) and s["log"] == pytest.approx(2) and s["requests"] == pytest.approx(1)
    assert s["free"] == pytest.approx(-2) and s["wal"] == pytest.approx(2) and s["other"] == pytest.approx(0)
    assert s["total"] == pytest.approx(sum(s[k] for k in soak.PARTS))
    assert soak.split(end, mid, "catalog") is None  # no purchases in between
    assert soak.row_bytes(end["tables"], "catalog") == pytest.approx(200)


def test_judge_and_the_worst_ratio_of_a_steady_run():
    mid = _reading(50_000, 4_000_000, data=10_000_000, log=3_000_000, requests=9_000_000, free=0, other=0,
                   rows=50_000)
    end = _reading(100_000, 4_000_000, data=20_000_000, log=3_000_000, requests=9_000_000, free=1_000_000,
                   other=0, rows=100_000)
    res = {"samples": _samples(200, n=11, step=10_000), "readings": {"catalog-1": {"mid": mid, "end": end}},
           "steady": True}
    r = soak.judge(res)["catalog-1"]
    assert r["row"] == pytest.approx(200) and r["total"] == pytest.approx(220)
    assert r["overhead"] == pytest.approx(20) and r["ratio"] == pytest.approx(0.1)
    assert r["max_log"] == 12_000 and r["max_request_ids"] == 50_000
    assert r["in_file"] == pytest.approx(20)
    assert soak.worst_ratio(res) == pytest.approx(0.1)
    assert soak.worst_ratio({**res, "steady": False}) is None
    # the WAL, which checkpoints grow and cut back, counts in the overhead but not in the ratio
    wobbly = {**res, "readings": {"catalog-1": {"mid": mid, "end": {**end, "dir": {
        **end["dir"], "wal": end["dir"]["wal"] + 5_000_000, "total": end["dir"]["total"] + 5_000_000}}}}}
    r = soak.judge(wobbly)["catalog-1"]
    assert r["overhead"] == pytest.approx(120) and r["in_file"] == pytest.approx(20)
    assert r["ratio"] == pytest.approx(0.1)
    # without the file readings the samples' slope stands for the whole growth, and nothing is judged
    r = soak.judge({"samples": res["samples"]})["catalog-1"]
    assert r["total"] == pytest.approx(200) and r["ratio"] is None


def test_steady_once_the_log_is_compacted_and_request_ids_expire_by_half_way():
    assert not soak.steady(10, 2_000)
    assert soak.steady(10, 100_000)  # half way at 50,010 writes
    assert not soak.steady(10, 99_000)
    assert soak.steady(30_000, 40_000) and not soak.steady(None, 100_000)


def test_writes_needed_for_the_primary_to_compact_past_a_stopped_backup():
    # a primary never compacted: its first compaction comes 12,000 entries in
    assert soak.writes_needed({"last_seq": 600, "snapshot_index": 0}, 600) == 12_000 - 600 + 1
    # one that compacted lately: its next compaction, 12,000 entries past the last one
    assert soak.writes_needed({"last_seq": 30_000, "snapshot_index": 28_000}, 30_000) == 10_001
    # one about to compact: still 2,000 entries past the backup, which compaction keeps
    assert soak.writes_needed({"last_seq": 39_990, "snapshot_index": 28_000}, 39_990) == 2_001


# ---------------------------------------------------------------- spread: pure parts


def test_round_figures_say_when_b_had_the_new_price():
    sent, answered = 10.0, 10.010
    # B showed it before the answer: no lag
    reads = [(9.999, 10.0002, 20.0), (10.0002, 10.0004, 20.0), (10.008, 10.0083, 20.5)]
    f = spread.round_figures(reads, 20.5, sent, answered)
    assert f["visible"] == pytest.approx(0.0083) and f["vs_answer"] == pytest.approx(-0.0017)
    assert f["stale_after"] == 0 and f["lag"] == 0.0
    # two reads sent after the answer showed the old price: lag up to the end of the first that did not
    reads = [(10.009, 10.0095, 20.0), (10.0101, 10.0104, 20.0), (10.0105, 10.0108, None), (10.011, 10.012, 20.0),
             (10.0121, 10.0125, 20.5)]
    f = spread.round_figures(reads, 20.5, sent, answered)
    assert f["stale_after"] == 2 and f["lag"] == pytest.approx(0.0025) == f["vs_answer"]
    assert spread.round_figures(reads[:2], 20.5, sent, answered) is None
    assert spread.price_of(b'{"price": 20.5}') == 20.5 and spread.price_of(b"oops") is None


def test_redis_arrivals_are_matched_to_the_round_whose_write_they_follow():
    rounds = [(1.0, 1.010), (2.0, 2.010), (3.0, 3.010)]
    arrivals = [0.5, 1.004, 1.006, 3.020]  # one before any write, two after the first, none for the second
    assert spread.arrivals_after(rounds, arrivals) == pytest.approx([-0.006, 0.010])


# ---------------------------------------------------------------- the launcher's pause and wipe


def test_the_launcher_pauses_and_wipes_only_processes_of_its_cluster(tmp_path):
    cluster = Cluster(data=str(tmp_path), catalog_ports=[1, 2, 3], order_ports=[4, 5, 6], frontend_port=7)
    assert not cluster.pause(os.getpid()) and not cluster.resume(os.getpid())  # no supervisor: nothing is its
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as child:
        try:
            cluster.proc = types.SimpleNamespace(pid=os.getpid())  # as if this process were its supervisor
            assert cluster.owns(child.pid) and cluster.pause(child.pid) and child.pid in cluster.paused
            os.makedirs(tmp_path / "catalog-1")
            (tmp_path / "catalog-1" / "bazar-catalog.lock").write_text(f"{child.pid + 1}\n")
            assert cluster.wipe(child.pid, "catalog-1") is None  # the directory's lock names another process
            assert (tmp_path / "catalog-1").is_dir() and child.poll() is None
            (tmp_path / "catalog-1" / "bazar-catalog.lock").write_text(f"{child.pid}\n")
            aside = cluster.wipe(child.pid, "catalog-1")
            assert aside is not None and os.path.isdir(aside) and not (tmp_path / "catalog-1").exists()
            assert child.wait(timeout=10) == -9 and child.pid not in cluster.paused
        finally:
            cluster.proc = None
            child.kill()


# ---------------------------------------------------------------- options


def test_hog_and_soak_are_opt_in_and_quick_makes_every_count_small():
    a = cli.parse_args([])
    assert "spread" in a.phases and "hog" not in a.phases and "soak" not in a.phases
    assert (a.hog_duration, a.soak_purchases, a.soak_every, a.spread_writes) == (30.0, 100_000, 2_500, 200)
    q = cli.parse_args(["--quick", "--cpu-hog", "--soak"])
    assert "hog" in q.phases and "soak" in q.phases
    assert (q.hog_duration, q.soak_purchases, q.soak_every, q.spread_writes) == (5.0, 2_000, 50, 50)
    only = cli.parse_args(["--only", "soak", "--soak-purchases", "300", "--soak-catchup", "pause"])
    assert only.phases == ["soak"] and only.soak_every == 7 and only.soak_catchup == "pause"
    for bad in (["--soak-purchases", "1"], ["--soak-every", "0"], ["--hog-duration", "0"],
                ["--soak-catchup", "later"], ["--spread-writes", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


# ---------------------------------------------------------------- the report


def _st(rps, p50, n=100, errors=0):
    return {"n": n, "errors": errors, "elapsed_s": 1.0, "rps": rps, "avg_ms": p50, "p50_ms": p50,
            "p95_ms": p50 * 2, "p99_ms": p50 * 3, "max_ms": p50 * 4, "statuses": {}}


def fault_results():
    mid = _reading(50_000, 4_000_000, data=10_000_000, log=3_000_000, requests=9_000_000, free=0, other=0,
                   rows=50_000)
    end = _reading(100_000, 4_000_000, data=20_000_000, log=3_000_000, requests=9_000_000, free=500_000,
                   other=0, rows=100_000)
    return {
        "meta": {"notes": []}, "ops": {}, "ops_skipped": {}, "plots": {"hog": "hog.png", "soak": "soak.png"},
        "hog": {"hogs": 2, "seconds": 30.0, "conns": {"purchase": 8, "info": 8}, "hog_cores": 1.8,
                "load": {"without": {"purchase": _st(300, 40.0), "info": _st(4000, 1.5)},
                         "with": {"purchase": _st(150, 80.0), "info": _st(1500, 4.0)}},
                "epochs": {"before": {"catalog-1": 1, "catalog-2": 1, "order-1": 2},
                           "after": {"catalog-1": 1, "catalog-2": 1, "order-1": 3}},
                "changes_without": {"catalog": 0, "order": 0}, "changes": {"catalog": 0, "order": 1},
                "changes_total": 1, "failover_s": 1.25,
                "crash": {"kills": [{"service": "catalog", "replica": 2, "pid": 42, "t": 2.0, "failover_s": 1.25,
                                     "errors_5s": 3}], "samples": [], "total": _st(100, 2.0)}},
        "soak": {"purchases_wanted": 100_000, "purchases": 100_000, "every": 10_000, "conns": 16, "steady": True,
                 "load": _st(500, 30.0, n=100_000), "bounds": {"retain_requests": 50_000, "compact_after": 10_000,
                                                               "keep_entries": 2_000},
                 "samples": _samples(205, n=11, step=10_000),
                 "readings": {"catalog-1": {"mid": mid, "end": end}},
                 "catchup": {"mode": "wipe", "replica": "catalog-2", "pid": 43, "behind_seq": 100_500,
                             "writes": 11_000, "write_rps": 900.0, "write_errors": 0, "write_s": 12.2,
                             "leader_snapshot_index": 110_000, "target_seq": 111_600, "back_s": 2.5,
                             "installed": 1, "sent": 1, "by_snapshot": True,
                             "after": {"role": "backup", "status": "ok", "last_seq": 111_700,
                                       "snapshot_index": 111_600}}},
        "spread": {"writes": 200, "book": 1,
                   "http": {"rounds": 200, "errors": 0, "unseen": 0, "write": _st(None, 5.0), "read": _st(None, 0.3),
                            "visible": _st(None, 6.0), "vs_answer": _st(None, -0.5), "lag": _st(None, 0.0),
                            "stale_after_answer": 3, "rounds_stale_after_answer": 2, "vs_answer_ms": [-1.0, 0.5]},
                   "redis": {"skipped": "not measured (no redis-server on PATH)"}},
    }


def test_fault_targets_and_their_verdicts():
    rows = {r["name"]: r for r in evaluate_targets(fault_results())}
    assert len(rows) == len(TARGETS)
    assert rows["elections under a CPU hog: epoch changes"]["verdict"] == "FAIL"  # the order service's one
    assert rows["failover under a CPU hog: kill → first purchase"]["verdict"] == "PASS"
    ratio = rows["soak: overhead in the SQLite file ÷ the purchase's own row, steady state"]
    assert ratio["measured"] == pytest.approx(0.05) and ratio["verdict"] == "PASS"
    assert rows["soak: snapshots that bring a far-behind backup back"]["verdict"] == "PASS"
    assert rows["invalidation across front ends: max lag after the answer (HTTP push)"]["verdict"] == "PASS"
    # a soak too short for a steady state is not judged, and says why
    res = fault_results()
    res["soak"].update(steady=False, unjudged="no steady state (too short)")
    name = "soak: overhead in the SQLite file ÷ the purchase's own row, steady state"
    row = {r["name"]: r for r in evaluate_targets(res)}[name]
    assert row["verdict"] == "n/a" and row["why"] == "not judged: no steady state (too short)"


def test_fault_sections_in_the_report():
    md = render_report(fault_results())
    hog_ = md[md.index("## 13. "):md.index("## 14. ")]
    assert "| beside the hogs | purchase | 100 | 150 |" in hog_ and "| order | 0 | 2 | 3 | 1 |" in hog_
    assert "**1.250 s** after it" in hog_ and "kept 1.80 cores busy" in hog_ and "![hog](hog.png)" in hog_
    soak_ = md[md.index("## 14. "):md.index("## 15. ")]
    assert "| catalog-1 | 205 | 210 | 200 | 10 | 10 | 0.05× | — | 12,000 | 50,000 |" in soak_
    assert "| catalog-1 | 210 | 200 | 0 | 0 | 10 | 0 | 0 |" in soak_
    assert "**2.50 s** after it was let go, by a snapshot" in soak_ and "Not judged" not in soak_
    spread_ = md[md.index("## 15. "):md.index("## How")]
    assert "| HTTP push | 200 | 5.000 | 6.000 / 12.000 / 24.000 | -0.500 / -1.000 / -2.000 | 3 (2) |" in spread_
    assert "HTTP push + Redis: not measured (no redis-server on PATH)." in spread_
    # every table row has as many cells as its header
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == lines[i - 1].count("|"), lines[j]
                j += 1


def test_fault_sections_not_measured_or_skipped():
    md = render_report({"meta": {"notes": []}, "ops": {}, "ops_skipped": {}, "plots": {},
                        "hog": {"skipped": "only with --start"}})
    assert "## 13. Elections under a CPU hog\n\nSkipped — only with --start." in md
    assert "## 14. Disk over a soak\n\nNot measured (`--soak`)." in md
    assert "## 15. Invalidation delay across front ends\n\nNot measured." in md
    assert faultreport.fault_sections({}, {})[0] == "## 13. Elections under a CPU hog"


def test_fault_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from bazar.bench import plots

    res = fault_results()
    res["hog"]["crash"]["samples"] = [[0.1, 2.0, "purchase", True, 200], [2.1, 900.0, "purchase", False, 503],
                                      [2.2, 0.3, "info", True, 200], [4.0, 3.0, "purchase", True, 200]]
    made = plots.write_plots(res, str(tmp_path))
    assert {"hog", "hog_crash", "soak", "spread"} <= set(made)
    for name in ("hog", "hog_crash", "soak", "spread"):
        assert (tmp_path / made[name]).read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------- each phase against real processes


def _run(tmp_path, *argv):
    out = tmp_path / "out"
    assert cli.main(["--start", "--quick", "--no-plots", "--out", str(out), *argv]) == 0
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


@pytest.mark.integration
def test_the_hog_phase_counts_epochs_and_times_a_kill_under_the_hogs(tmp_path):
    res, md = _run(tmp_path, "--only", "hog", "--hog-duration", "2")
    h = res["hog"]
    assert "skipped" not in h, h
    assert set(h["changes"]) == {"catalog", "order"} and isinstance(h["changes_total"], int)
    assert h["load"]["with"]["purchase"]["n"] > 0 and h["load"]["without"]["info"]["n"] > 0
    assert h["failover_s"] is not None and h["failover_s"] < 15
    assert not any(pid_alive(pid) for pid in h["hog_pids"])  # stopped, not left behind
    assert "## 13. Elections under a CPU hog" in md and "Not measured (`--cpu-hog`)" not in md


@pytest.mark.integration
def test_the_soak_phase_samples_the_disk_and_a_wiped_backup_comes_back_by_snapshot(tmp_path):
    res, md = _run(tmp_path, "--only", "soak", "--soak-purchases", "150", "--soak-every", "50")
    s = res["soak"]
    assert "skipped" not in s, s
    assert s["purchases"] == 150 and len(s["samples"]) >= 4 and not s["steady"]
    last = s["samples"][-1]["replicas"]
    assert len(last) == 6 and all(r["total"] > 0 and r["request_ids"] >= 150 for r in last.values())
    judged = soak.judge(s)
    assert all(r["row"] and r["split"] for r in judged.values())
    c = s["catchup"]
    assert c["by_snapshot"] and c["back_s"] is not None and c["installed"] == 1, c
    assert "Not judged" in md and "by a snapshot" in md


@pytest.mark.integration
def test_the_spread_phase_times_a_write_seen_at_the_other_front_end(tmp_path):
    res, md = _run(tmp_path, "--only", "spread", "--spread-writes", "10")
    sp = res["spread"]
    for path in ("http", "redis"):
        r = sp[path]
        assert r["rounds"] == 10 and r["unseen"] == 0 and r["errors"] == 0, r
        assert r["lag"]["n"] == 10 and r["lag"]["max_ms"] < 1000
        assert r["b_cache_hits"] >= 10  # the second read of every round was a hit at B
    assert sp["redis"]["redis_arrival"]["n"] >= 5
    assert "| HTTP push + Redis | 10 |" in md
