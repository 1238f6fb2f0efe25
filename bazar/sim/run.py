"""`bazar-sim`: run the deterministic simulation over many seeds.

    bazar-sim --seeds 1000 [--start N] [--jobs 2] [--profile full|short]
    bazar-sim --seed S --verbose [--history FILE]

One line per failing seed (the seed and what broke), then a summary; exit status 1
when any seed failed. A failing seed replays exactly: `--seed S --verbose` prints
its fault schedule, every fault as it happens, Bazar's own log lines, and every
finding in full.
"""

from __future__ import annotations

import argparse
import sys
import time
from multiprocessing import Pool
from typing import Any

from bazar.sim.world import PROFILES, Outcome, simulate


def summary(outcome: Outcome) -> str:
    first = str(outcome.findings[0]).splitlines()[0] if outcome.findings else ""
    more = f" (+{len(outcome.findings) - 1} more)" if len(outcome.findings) > 1 else ""
    return f"seed {outcome.seed}: {first}{more}"


def _one(job: tuple[int, str, int | None]) -> tuple[int, bool, str, float]:
    seed, profile, frontends = job
    started = time.perf_counter()
    outcome = simulate(seed, profile=profile, frontends=frontends)
    return seed, outcome.ok, summary(outcome), time.perf_counter() - started


def _quiet_logs() -> None:
    """Twisted keeps log events in memory until logging begins, and prints critical
    ones (unhandled errors in Deferreds) to stderr: a world watches its own."""
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)


def _init_worker() -> None:
    _quiet_logs()


def replay(args: Any) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    _quiet_logs()
    started = time.perf_counter()
    outcome = simulate(
        args.seed,
        profile=args.profile,
        frontends=args.frontends,
        faults=not args.no_faults,
        log=say if args.verbose else None,
    )
    elapsed = time.perf_counter() - started
    if args.history:
        with open(args.history, "w") as f:
            f.write(outcome.history)
    for finding in outcome.findings:
        print(f"FAIL {finding}")
    print(
        f"seed {args.seed}: {'ok' if outcome.ok else 'FAILED'}; {outcome.frontends} front end(s), "
        f"{outcome.operations} operations, {outcome.simulated:.1f} simulated s in {elapsed:.2f} s; "
        f"network {outcome.stats}"
    )
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bazar-sim", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run (default 100)")
    parser.add_argument("--start", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed (with --verbose: tell everything)")
    parser.add_argument("--verbose", "-v", action="store_true", help="with --seed: the schedule, faults, logs")
    parser.add_argument("--history", help="with --seed: write the client history (JSON) here")
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default="full", help="how long each phase lasts (short: the CI subset's)"
    )
    parser.add_argument("--frontends", type=int, choices=(1, 2), help="force 1 or 2 front ends (default: the seed's)")
    parser.add_argument("--no-faults", action="store_true", help="with --seed: the same run without the nemesis")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    if args.seed is not None:
        return replay(args)
    jobs = [(seed, args.profile, args.frontends) for seed in range(args.start, args.start + args.seeds)]
    failed: list[int] = []
    started = time.perf_counter()
    if args.jobs > 1:
        with Pool(args.jobs, initializer=_init_worker) as pool:
            results: Any = pool.imap(_one, jobs)
            failed = _report(results)
    else:
        _quiet_logs()
        failed = _report(_one(job) for job in jobs)
    elapsed = time.perf_counter() - started
    print(
        f"{len(jobs)} seeds from {args.start} ({args.profile}): {len(failed)} failed"
        + (f" ({', '.join(map(str, failed))})" if failed else "")
        + f"; {elapsed:.1f} s, {elapsed / max(1, len(jobs)):.2f} s per seed"
    )
    return 1 if failed else 0


def _report(results: Any) -> list[int]:
    failed = []
    for seed, ok, line, _ in results:
        if not ok:
            failed.append(seed)
            print(line, flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
