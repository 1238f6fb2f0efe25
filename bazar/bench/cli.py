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

from bazar.bench.http import LOOPBACK, health
from bazar.bench.phases import (
    PHASES,
    RSS_ENTRIES,
    SWEEP_CONNS,
    Ctx,
    add_bench_book,
    frontend_pid,
    log,
    measure_ops,
    phase_crash,
    phase_invalidation,
    phase_lru,
    phase_rss,
)
from bazar.bench.report import Results, evaluate_targets, render_report, targets_text
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
    p.add_argument("--only", default=",".join(PHASES),
                   help=f"comma-separated phases to run, of {','.join(PHASES)} (default: all)")
    p.add_argument("--no-crash", action="store_true", help="skip the crash experiment")
    p.add_argument("--no-plots", action="store_true", help="write the report without PNG plots")
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
    try:
        args.port = loopback_port(args.url)
        args.port_nocache = loopback_port(args.url_nocache) if args.url_nocache else None
    except ValueError as e:
        p.error(str(e))
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def bench_cluster(name: str, root: str, cache_size: int) -> Cluster:
    """A throw-away cluster under `root`, on free loopback ports, that runs with this
    process's environment (so BAZAR_ADMIN_TOKEN, if set, is its token), reports its
    start and stop as progress lines, and dies with this process."""
    return Cluster(data=os.path.join(root, name), name=name, cache_size=cache_size, env=dict(os.environ),
                   env_secrets=False, token=None, die_with_parent=True, progress=log)


def run(args: argparse.Namespace, results: Results) -> None:
    ctx = Ctx(args)
    meta = results["meta"]
    notes = meta["notes"]
    phases = args.phases
    clusters: list[Cluster] = []
    tmp_root = None
    on = off = None  # Cluster objects with --start
    try:
        if args.start:
            tmp_root = tempfile.mkdtemp(prefix="bazar-bench-")
            on = bench_cluster("cache-on", tmp_root, args.cache_size)
            clusters = [on]
            if "ops" in phases:
                off = bench_cluster("cache-off", tmp_root, 0)
                clusters.append(off)
            for c in clusters:
                c.start(wait=0)
            for c in clusters:
                t0 = time.monotonic()
                c.wait_healthy(timeout=60.0, serving=True)
                t = time.monotonic() - t0
                log(f"cluster {c.name}: ready in {t:.1f}s (all 7 /health ok, one primary per service)")
                if not c.read_token():
                    notes.append(f"cluster {c.name}: no admin token (neither BAZAR_ADMIN_TOKEN nor secrets.json)")
            port, token = on.frontend_port, on.token
            port_off, token_off = (off.frontend_port, off.token) if off else (None, None)
            meta["url"] = f"http://{LOOPBACK}:{port}"
            meta["url_nocache"] = f"http://{LOOPBACK}:{port_off}" if off else None
            meta["clusters"] = (f"cache-on cluster started with --cache-size {args.cache_size}"
                                + ("; cache-off cluster with --cache-size 0" if off else ""))
        else:
            port, port_off = args.port, args.port_nocache
            token = token_off = os.environ.get("BAZAR_ADMIN_TOKEN")
            if health(port) is None:
                raise ClusterError(f"no Bazar front end answers GET /health at {args.url} (use --start?)")

        def guarded(name: str, fn: Callable[..., Any], *fargs: Any, **fkw: Any) -> Any:
            """Run one phase; an error in it is reported, and the run goes on."""
            if ctx.stop.is_set():
                return {"skipped": "run interrupted"}
            try:
                return fn(*fargs, **fkw)
            except (ClusterError, RuntimeError, OSError, ValueError, KeyError, TypeError,
                    http.client.HTTPException) as e:
                import traceback

                traceback.print_exc()
                log(f"{name}: failed: {type(e).__name__}: {e}")
                notes.append(f"{name} failed: {type(e).__name__}: {e}")
                return {"skipped": f"failed with {type(e).__name__}: {e}"}

        def bench_book(p: int, tok: str | None, label: str) -> int | None:
            if not tok:
                notes.append(f"cache-{label}: no admin token, so no well-stocked bench book: purchase, "
                             "invalidation and crash phases skipped there")
                return None
            r = guarded(f"adding the bench book (cache {label})", add_bench_book, p, tok, ctx.run_id)
            return None if isinstance(r, dict) else r

        book_on = bench_book(port, token, "on")

        # 1 (cache on) + 5 (sweep)
        if "ops" in phases:
            log("phase 1: info / search / purchase, cache on")
            ops_on: dict[str, Any] = {}
            results["ops"]["on"] = ops_on
            r = guarded("phase 1 (cache on)", measure_ops, ctx, port, book_on, "on", extra_conns=("4", "64"),
                        fe_pid=frontend_pid(port, on), out=ops_on)
            if "skipped" in r:
                results["ops_skipped"]["on"] = r["skipped"]
            results["throughput"] = {c: st for c, st in ops_on.get("info", {}).items() if c in SWEEP_CONNS}

            # 1 (cache off)
            if port_off:
                log("phase 1: info / search / purchase, cache off")
                book_off = bench_book(port_off, token_off, "off")
                r = guarded("phase 1 (cache off)", measure_ops, ctx, port_off, book_off, "off",
                            fe_pid=frontend_pid(port_off, off), out=results["ops"].setdefault("off", {}))
                if "skipped" in r:
                    results["ops_skipped"]["off"] = r["skipped"]
            else:
                results["ops_skipped"]["off"] = ("no cache-less cluster (use --start, or --url-nocache with "
                                                 "a cluster started with --cache-size 0)")
        if off is not None:
            off.stop()

        # 2 invalidation
        if "invalidation" in phases:
            log("phase 2: invalidation")
            if book_on is not None:
                results["invalidation"] = guarded("phase 2 (invalidation)", phase_invalidation, ctx, port, token,
                                                  book_on, 15 if args.quick else 50)
            else:
                results["invalidation"] = {"skipped": "needs the admin token and the bench book"}

        # 4 LRU (in-process)
        if "lru" in phases:
            log("phase 4: LRU hit rate vs size over a zipf trace (in-process)")
            results["lru"] = guarded("phase 4 (LRU)", phase_lru, ctx)

        # 6 memory
        if "rss" in phases:
            log("phase 6: front-end RSS with a full cache")
            results["rss"] = guarded("phase 6 (RSS)", phase_rss, ctx, port, cluster=on)

        # 3 crash
        if "crash" in phases:
            if on is None:
                results["crash"] = {"skipped": "only with --start: it kills processes, "
                                               "and only those this tool started"}
            elif book_on is None:
                results["crash"] = {"skipped": "needs the admin token to add a bench book"}
            else:
                log("phase 3: crash experiment")
                results["crash"] = guarded("phase 3 (crash)", phase_crash, ctx, on, book_on, token)
    except KeyboardInterrupt:
        ctx.stop.set()
        notes.append("interrupted: the report is partial")
        log("interrupted; stopping")
        raise
    finally:
        ctx.stop.set()
        for c in clusters:
            try:
                c.stop()
            except Exception as e:  # keep stopping the others
                log(f"cluster {c.name}: stop failed: {e}")
        if tmp_root:
            if args.keep_data:
                log(f"data and logs kept in {tmp_root}")
                notes.append(f"cluster data kept in {tmp_root}")
            else:
                shutil.rmtree(tmp_root, ignore_errors=True)


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

