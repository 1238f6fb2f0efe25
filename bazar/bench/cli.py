"""`bazar-bench` on the command line: options, the order of the phases, the clusters
it starts with --start (and always stops), and the files it writes.

A benchmark reports; it never asserts: the exit status is 0 whenever the run
completed, whatever the numbers (1 if a cluster could not be started, 130 on Ctrl-C
or SIGTERM; a partial report is still written).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from bazar.bench.baseline import QUICK_ROUNDS, ROUNDS, baseline_command, phase_baseline
from bazar.bench.compare import parse_store, phase_compare, phase_references
from bazar.bench.cores import phase_cores
from bazar.bench.etcd import phase_etcd
from bazar.bench.hog import HOG_SECONDS, QUICK_HOG_SECONDS, phase_hog
from bazar.bench.http import health
from bazar.bench.phases import (
    ON_CLUSTER,
    OPT_IN,
    PHASES,
    RSS_ENTRIES,
    SWEEP_CONNS,
    Ctx,
    add_bench_book,
    bench_cluster,
    frontend_pid,
    log,
    measure_ops,
    measure_startup,
    phase_crash,
    phase_invalidation,
    phase_lru,
    phase_rss,
    server_pids,
)
from bazar.bench.report import Results, evaluate_targets, render_report, targets_text
from bazar.bench.soak import CATCHUP_MODES, QUICK_SOAK_PURCHASES, SOAK_PURCHASES, SOAK_SAMPLES, phase_soak
from bazar.bench.spread import QUICK_SPREAD_WRITES, SPREAD_WRITES, phase_spread
from bazar.bench.timeline import phase_timeline
from bazar.testing.processes import Cluster, ClusterError


def loopback_port(url: str) -> int:
    """Port of an http URL on 127.0.0.1 (or localhost); anything else is refused."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url}: only http:// URLs are supported")
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"{url}: bazar-bench only ever targets 127.0.0.1")
    return parts.port or 80


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bazar-bench",
        description="Benchmark a Bazar cluster on this machine and write a Markdown report with plots.",
    )
    p.add_argument("--url", default="http://127.0.0.1:5000", help="front end of a running cluster (127.0.0.1 only)")
    p.add_argument("--url-nocache", default=None,
                   help="front end of a running cluster started with --cache-size 0 (for the cache-off column)")
    p.add_argument("--start", action="store_true",
                   help="start throw-away clusters (cache on and cache off) on free ports, and stop them at the end")
    p.add_argument("--out", default=None,
                   help="output directory (default ./bench-out; with --report-only, the directory of its file)")
    p.add_argument("--report-only", metavar="RESULTS_JSON", default=None,
                   help="measure nothing: rewrite report.md and the plots from an existing results.json "
                        "(its numbers are used as they are)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per load step (default 2.0, 0.5 with --quick)")
    p.add_argument("--quick", action="store_true", help="short smoke run (~20-30 s with --start)")
    p.add_argument("--cache-size", type=int, default=RSS_ENTRIES,
                   help=f"front-end cache size of the cache-on cluster started with --start (default {RSS_ENTRIES})")
    p.add_argument("--keep-data", action="store_true", help="keep the started clusters' data directories and logs")
    p.add_argument("--only", default=",".join(p for p in PHASES if p not in OPT_IN),
                   help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all but "
                        f"{' and '.join(OPT_IN)}, which take minutes)")
    p.add_argument("--no-crash", action="store_true", help="skip the crash experiment")
    p.add_argument("--compare", action="append", default=[], metavar="SPEC",
                   help="another store to run the same workloads against (repeatable): "
                        "'name=NAME,info=[GET ]URL,purchase=[POST ]URL[,id=N][,body=JSON]', "
                        "{id} in a URL is replaced by N (default 1); 127.0.0.1 URLs only")
    p.add_argument("--baseline", metavar="DIR", default=None,
                   help="a checkout of earlier Bazar code with its own virtualenv (DIR/.venv/bin/bazar-bench): "
                        "its bench's phase 1 and this one's, one after the other, --baseline-rounds times; the "
                        "report judges the purchase path as ratios to it")
    p.add_argument("--baseline-rounds", type=int, default=None,
                   help=f"pairs of runs beside --baseline (default {ROUNDS}, {QUICK_ROUNDS} with --quick)")
    p.add_argument("--timeline-writes", type=int, default=None,
                   help="single writes traced by the timeline phase (default 50, 20 with --quick)")
    p.add_argument("--no-plots", action="store_true", help="write the report without PNG plots")
    faults = p.add_argument_group("faults", "elections under a CPU hog, disk over a soak, invalidation across "
                                  "front ends")
    faults.add_argument("--cpu-hog", action="store_true",
                        help="add the hog phase: the load with and without two CPU hogs, epochs before and after, "
                             "then a kill of the catalog primary under the hogs")
    faults.add_argument("--hog-duration", type=float, default=None,
                        help=f"seconds of load with the hogs, and as many without (default {HOG_SECONDS:g}, "
                             f"{QUICK_HOG_SECONDS:g} with --quick)")
    faults.add_argument("--soak", action="store_true",
                        help="add the soak phase: disk, log and request ids over many purchases, then a catalog "
                             "backup far behind catching up")
    faults.add_argument("--soak-purchases", type=int, default=None,
                        help=f"purchases of the soak (default {SOAK_PURCHASES:,}, "
                             f"{QUICK_SOAK_PURCHASES:,} with --quick)")
    faults.add_argument("--soak-every", type=int, default=None,
                        help=f"purchases between two samples (default: the purchases / {SOAK_SAMPLES})")
    faults.add_argument("--soak-catchup", choices=CATCHUP_MODES, default="wipe",
                        help="after the soak, a catalog backup falls behind until the primary has compacted past it, "
                             "then: wipe (its data lost, restarted empty; default), pause (only resumed), none")
    faults.add_argument("--spread-writes", type=int, default=None,
                        help=f"writes of the spread phase (default {SPREAD_WRITES}, "
                             f"{QUICK_SPREAD_WRITES} with --quick)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = (os.path.dirname(os.path.abspath(args.report_only)) if args.report_only else "bench-out")
    if args.report_only and args.start:
        p.error("--report-only measures nothing: it cannot be combined with --start")
    if args.duration is None:
        args.duration = 0.5 if args.quick else 2.0
    if not 0 < args.duration <= 60:
        p.error("--duration must be within (0, 60]")
    args.phases = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.phases if x not in PHASES]
    if unknown or not args.phases:
        p.error(f"--only: unknown phase(s) {unknown}; choose from {','.join(PHASES)}")
    if args.no_crash and "crash" in args.phases:
        args.phases.remove("crash")
    args.phases += [phase for phase, asked in (("hog", args.cpu_hog), ("soak", args.soak))
                    if asked and phase not in args.phases]
    if args.hog_duration is None:
        args.hog_duration = QUICK_HOG_SECONDS if args.quick else HOG_SECONDS
    if args.soak_purchases is None:
        args.soak_purchases = QUICK_SOAK_PURCHASES if args.quick else SOAK_PURCHASES
    if args.soak_every is None:
        args.soak_every = max(1, args.soak_purchases // SOAK_SAMPLES)
    if args.spread_writes is None:
        args.spread_writes = QUICK_SPREAD_WRITES if args.quick else SPREAD_WRITES
    if not 0 < args.hog_duration <= 600:
        p.error("--hog-duration must be within (0, 600]")
    if not 2 <= args.soak_purchases <= 10_000_000 or not 1 <= args.soak_every <= args.soak_purchases:
        p.error("--soak-purchases must be within [2, 10000000], --soak-every within [1, --soak-purchases]")
    if not 1 <= args.spread_writes <= 100_000:
        p.error("--spread-writes must be within [1, 100000]")
    if args.baseline_rounds is None:
        args.baseline_rounds = QUICK_ROUNDS if args.quick else ROUNDS
    if not 1 <= args.baseline_rounds <= 20:
        p.error("--baseline-rounds must be within [1, 20]")
    if args.baseline is not None:
        try:
            baseline_command(args.baseline)
        except ValueError as e:
            p.error(f"--baseline: {e}")
    if args.timeline_writes is None:
        args.timeline_writes = 20 if args.quick else 50
    if not 1 <= args.timeline_writes <= 10_000:
        p.error("--timeline-writes must be within [1, 10000]")
    try:
        args.compare = [parse_store(spec) for spec in args.compare]
    except ValueError as e:
        p.error(str(e))
    try:
        args.port = loopback_port(args.url)
        args.port_nocache = loopback_port(args.url_nocache) if args.url_nocache else None
    except ValueError as e:
        p.error(str(e))
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class Guard:
    """Runs the phases: an error in one is reported (progress line, note, "skipped" in its
    results) and the run goes on; after an interrupt, nothing more runs."""

    def __init__(self, ctx: Ctx, notes: list[str]):
        self.ctx = ctx
        self.notes = notes

    def __call__(self, name: str, fn: Callable[..., Any], *fargs: Any, **fkw: Any) -> Any:
        if self.ctx.stop.is_set():
            return {"skipped": "run interrupted"}
        try:
            return fn(*fargs, **fkw)
        except (ClusterError, RuntimeError, OSError, ValueError, KeyError, TypeError,
                http.client.HTTPException) as e:
            import traceback

            traceback.print_exc()
            log(f"{name}: failed: {type(e).__name__}: {e}")
            self.notes.append(f"{name} failed: {type(e).__name__}: {e}")
            return {"skipped": f"failed with {type(e).__name__}: {e}"}


class Run:
    """One run of the bench: its options, the clusters it started (stopped at its end),
    its own directory (data, logs, trace), and the results it fills."""

    def __init__(self, args: argparse.Namespace, results: Results):
        self.args = args
        self.results = results
        self.ctx = Ctx(args)
        self.notes: list[str] = results["meta"]["notes"]
        self.guarded = Guard(self.ctx, self.notes)
        self.root = tempfile.mkdtemp(prefix="bazar-bench-")
        self.clusters: list[Cluster] = []
        self.on: Cluster | None = None  # the clusters of --start
        self.off: Cluster | None = None

    def want(self, phase: str) -> bool:
        return phase in self.args.phases and not self.ctx.stop.is_set()

    def dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    # -- the clusters ------------------------------------------------------------------
    def start_clusters(self) -> None:
        """The cache-on cluster first, alone (its start-up is timed on a machine that does
        nothing else), then the cache-off one if phase 1 runs; both healthy."""
        args, meta = self.args, self.results["meta"]
        self.on = bench_cluster("cache-on", self.root, args.cache_size)
        self.clusters.append(self.on)
        if self.want("startup"):
            self.results["startup"] = measure_startup(self.ctx, self.on)
        else:
            self.on.start(wait=0)
        if self.want("ops"):
            self.off = bench_cluster("cache-off", self.root, 0)
            self.clusters.append(self.off)
            self.off.start(wait=0)
        for c in self.clusters:
            t0 = time.monotonic()
            c.wait_healthy(timeout=60.0, serving=True)
            log(f"cluster {c.name}: healthy {time.monotonic() - t0:.1f}s later (all 7 /health ok, one primary "
                "per service)")
            if not c.read_token():
                self.notes.append(f"cluster {c.name}: no admin token (neither BAZAR_ADMIN_TOKEN nor secrets.json)")
        meta["url"] = self.on.front
        meta["url_nocache"] = self.off.front if self.off else None
        meta["clusters"] = (f"cache-on cluster started with --cache-size {args.cache_size}"
                            + ("; cache-off cluster with --cache-size 0" if self.off else ""))

    def stop_clusters(self) -> None:
        for c in self.clusters:
            try:
                c.stop()
            except Exception as e:  # keep stopping the others
                log(f"cluster {c.name}: stop failed: {e}")

    def bench_book(self, port: int, token: str | None, label: str) -> int | None:
        if not token:
            self.notes.append(f"cache-{label}: no admin token, so no well-stocked bench book: purchase, "
                              "invalidation, etcd and crash phases skipped there")
            return None
        r = self.guarded(f"adding the bench book (cache {label})", add_bench_book, port, token, self.ctx.run_id)
        return None if isinstance(r, dict) else r

    # -- the phases --------------------------------------------------------------------
    def run(self) -> None:
        try:
            if any(self.want(p) for p in ON_CLUSTER):
                self.on_cluster_phases()
            self.stop_clusters()  # (the timeline runs a cluster of its own, on a machine otherwise idle)
            if self.want("lru"):
                log("phase 4: LRU hit rate vs size over a zipf trace (in-process)")
                self.results["lru"] = self.guarded("phase 4 (LRU)", phase_lru, self.ctx)
            if self.want("timeline"):
                log("phase 11: where one write spends its time (a traced cluster)")
                self.results["timeline"] = self.guarded("phase 11 (timeline)", phase_timeline, self.ctx,
                                                        self.dir("timeline"), self.args.timeline_writes)
            if self.want("cores"):
                log("phase 12: cached reads on more cores (front ends sharing one port)")
                self.results["cores"] = self.guarded("phase 12 (cores)", phase_cores, self.ctx, self.dir("cores"))
            if self.want("spread"):
                log("phase 15: the invalidation delay across front ends (clusters of 2 front ends)")
                self.results["spread"] = self.guarded("phase 15 (spread)", phase_spread, self.ctx, self.root,
                                                      self.args.spread_writes)
            if self.want("baseline"):
                self.results["baseline"] = self.baseline()
        except KeyboardInterrupt:
            self.ctx.stop.set()
            self.notes.append("interrupted: the report is partial")
            log("interrupted; stopping")
            raise
        finally:
            self.ctx.stop.set()
            self.stop_clusters()
            if self.args.keep_data:
                log(f"data and logs kept in {self.root}")
                self.notes.append(f"cluster data kept in {self.root}")
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    def on_cluster_phases(self) -> None:
        args, results = self.args, self.results
        if args.start:
            self.start_clusters()
            assert self.on is not None
            port, token = self.on.frontend_port, self.on.token
            port_off, token_off = (self.off.frontend_port, self.off.token) if self.off else (None, None)
        else:
            port, port_off = args.port, args.port_nocache
            token = token_off = os.environ.get("BAZAR_ADMIN_TOKEN")
            if health(port) is None:
                raise ClusterError(f"no Bazar front end answers GET /health at {args.url} (use --start?)")
            if self.want("startup"):
                results["startup"] = {"skipped": "only with --start: it times the start of a cluster this tool "
                                                 "starts"}
        book = self.bench_book(port, token, "on")
        fe_pid = frontend_pid(port, self.on)
        if self.want("ops"):
            self.ops(port, book, fe_pid, port_off, token_off)
        if self.off is not None:
            self.off.stop()
        if self.want("references"):
            log("phase 7: cached info beside a raw twisted.web resource and a bare Klein route")
            results["references"] = self.guarded("phase 7 (references)", phase_references, self.ctx, port, fe_pid,
                                                 self.dir("references"))
        if self.want("compare") and args.compare:
            log(f"phase 8: beside {len(args.compare)} other store(s)")
            results["compare"] = self.guarded("phase 8 (compare)", phase_compare, self.ctx, port, book,
                                              args.compare, fe_pid)
        if self.want("etcd"):
            log("phase 10: replicated writes beside etcd")
            results["etcd"] = (self.guarded("phase 10 (etcd)", phase_etcd, self.ctx, port, token, book,
                                            server_pids(port, self.on), self.dir("etcd"))
                               if book is not None and token else
                               {"skipped": "needs the admin token and the bench book"})
        if self.want("invalidation"):
            log("phase 2: invalidation")
            results["invalidation"] = (self.guarded("phase 2 (invalidation)", phase_invalidation, self.ctx, port,
                                                    token, book, 15 if args.quick else 50)
                                       if book is not None else {"skipped": "needs the admin token and the bench book"})
        if self.want("rss"):
            log("phase 6: front-end RSS with a full cache")
            results["rss"] = self.guarded("phase 6 (RSS)", phase_rss, self.ctx, port, cluster=self.on)
        if self.want("crash"):
            results["crash"] = self.crash(book, token)
        if self.want("hog"):
            results["hog"] = self.hog(book, token)
        if self.want("soak"):
            results["soak"] = self.soak(token)

    def ops(self, port: int, book: int | None, fe_pid: int | None, port_off: int | None,
            token_off: str | None) -> None:
        """Phase 1, cache on then cache off (5, the sweep, comes with the cache-on half)."""
        results = self.results
        log("phase 1: info / search / purchase, cache on")
        ops_on: dict[str, Any] = {}
        results["ops"]["on"] = ops_on
        r = self.guarded("phase 1 (cache on)", measure_ops, self.ctx, port, book, "on", fe_pid=fe_pid, out=ops_on)
        if "skipped" in r:
            results["ops_skipped"]["on"] = r["skipped"]
        results["throughput"] = {c: st for c, st in ops_on.get("info", {}).items() if c in SWEEP_CONNS}
        if not port_off:
            results["ops_skipped"]["off"] = ("no cache-less cluster (use --start, or --url-nocache with "
                                             "a cluster started with --cache-size 0)")
            return
        log("phase 1: info / search / purchase, cache off")
        book_off = self.bench_book(port_off, token_off, "off")
        r = self.guarded("phase 1 (cache off)", measure_ops, self.ctx, port_off, book_off, "off",
                         fe_pid=frontend_pid(port_off, self.off), out=results["ops"].setdefault("off", {}))
        if "skipped" in r:
            results["ops_skipped"]["off"] = r["skipped"]

    def baseline(self) -> dict[str, Any]:
        if self.args.baseline is None:
            return {"skipped": "not measured (no --baseline DIR)"}
        log(f"phase 16: the purchase path beside {self.args.baseline}, {self.args.baseline_rounds} pair(s) of runs")
        r: dict[str, Any] = self.guarded("phase 16 (baseline)", phase_baseline, self.ctx, self.args.baseline,
                                         self.args.baseline_rounds, self.dir("baseline"))
        return r

    def crash(self, book: int | None, token: str | None) -> dict[str, Any]:
        if self.on is None:
            return {"skipped": "only with --start: it kills processes, and only those this tool started"}
        if book is None:
            return {"skipped": "needs the admin token to add a bench book"}
        log("phase 3: crash experiment")
        r: dict[str, Any] = self.guarded("phase 3 (crash)", phase_crash, self.ctx, self.on, book, token)
        return r


    def hog(self, book: int | None, token: str | None) -> dict[str, Any]:
        if self.on is None:
            return {"skipped": "only with --start: it kills a primary, and only of a cluster this tool started"}
        if book is None:
            return {"skipped": "needs the admin token to add a bench book"}
        log("phase 13: elections under a CPU hog")
        r: dict[str, Any] = self.guarded("phase 13 (hog)", phase_hog, self.ctx, self.on, book, token,
                                         self.dir("hog"), self.args.hog_duration)
        return r

    def soak(self, token: str | None) -> dict[str, Any]:
        if self.on is None:
            return {"skipped": "only with --start: it reads the replicas' data directories and stops a replica"}
        log(f"phase 14: disk over a soak of {self.args.soak_purchases:,} purchases")
        r: dict[str, Any] = self.guarded("phase 14 (soak)", phase_soak, self.ctx, self.on, token,
                                         self.args.soak_purchases, self.args.soak_every, self.args.soak_catchup)
        return r


def run(args: argparse.Namespace, results: Results) -> None:
    Run(args, results).run()


def write_outputs(results: Results, out_dir: str, plots: bool = True) -> None:
    """The plots (unless plots=False or matplotlib is missing) and report.md into out_dir.
    Notes about plotting go into results["meta"]["notes"]; results["plots"] lists the PNGs."""
    os.makedirs(out_dir, exist_ok=True)
    results["plots"] = {}
    if plots:
        try:
            from bazar.bench.plots import write_plots  # needs matplotlib: the `bench` extra

            results["plots"] = write_plots(results, out_dir)
        except ImportError:
            results.setdefault("meta", {}).setdefault("notes", []).append(
                "matplotlib not installed: no plots (pip install 'bazar[bench]')")
        except Exception as e:
            results.setdefault("meta", {}).setdefault("notes", []).append(
                f"plotting failed: {type(e).__name__}: {e}")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_report(results))


def report_only(path: str, out_dir: str, plots: bool = True) -> int:
    """Rewrite report.md and the plots from an existing results.json, measuring nothing.
    The results file itself is left as it is (copied, unchanged, when out_dir is elsewhere)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        log(f"error: cannot read {path}: {e}")
        return 1
    if not isinstance(results, dict):
        log(f"error: {path} does not hold a bazar-bench results object")
        return 1
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "results.json")
    if not (os.path.exists(target) and os.path.samefile(path, target)):
        shutil.copyfile(path, target)
    write_outputs(results, out_dir, plots=plots)
    log(f"report rewritten from {path} into {os.path.join(out_dir, 'report.md')}")
    print(targets_text(evaluate_targets(results)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args.report_only, args.out, plots=not args.no_plots)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    results = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "mode": "--start (two throw-away clusters)" if args.start else "existing cluster",
            "url": args.url,
            "url_nocache": args.url_nocache,
            "quick": args.quick,
            "duration": args.duration,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "client": "threads, one keep-alive HTTP/1.1 socket each (bazar.bench.LeanConn)",
            "notes": [],
        },
        "ops": {},
        "ops_skipped": {},
    }
    t0 = time.monotonic()
    rc = 0
    try:
        run(args, results)
    except KeyboardInterrupt:
        rc = 130
    except ClusterError as e:
        log(f"error: {e}")
        results["meta"]["notes"].append(f"error: {str(e).splitlines()[0]}")
        rc = 1
    except Exception as e:  # still write what was measured
        import traceback

        traceback.print_exc()
        log(f"error: {type(e).__name__}: {e}")
        results["meta"]["notes"].append(f"error: {type(e).__name__}: {e}")
        rc = 1
    results["meta"]["total_s"] = time.monotonic() - t0
    write_outputs(results, args.out, plots=not args.no_plots)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    log(f"report written to {os.path.join(args.out, 'report.md')}")
    print(targets_text(evaluate_targets(results)))
    return rc

