"""What Linux's /proc says about a process: its stat line (parent, process group,
CPU ticks, start time), its resident memory, and whether it descends from another.

bazar-bench reads these to charge CPU to the client and the front end, to measure
the front end's memory, and to kill only processes it started; the cluster launcher
of bazar.testing.processes uses them to find what is left of a cluster it stops.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any


def parse_proc_stat(text: str) -> dict[str, Any]:
    """Parse /proc/<pid>/stat (the command name may hold spaces and parens)."""
    lp = text.index("(")
    rp = text.rindex(")")
    fields = text[rp + 2 :].split()
    return {
        "pid": int(text[:lp].strip()),
        "comm": text[lp + 1 : rp],
        "state": fields[0],
        "ppid": int(fields[1]),
        "pgid": int(fields[2]),
        "utime": int(fields[11]),
        "stime": int(fields[12]),
        "starttime": int(fields[19]),
    }


def read_proc_stat(pid: int) -> str:
    with open(f"/proc/{int(pid)}/stat") as f:
        return f.read()


def proc_stat(pid: int) -> dict[str, Any] | None:
    """The parsed stat line of `pid`, or None if there is no such process (any more)."""
    try:
        return parse_proc_stat(read_proc_stat(pid))
    except (OSError, ValueError, IndexError):
        return None


def is_descendant(pid: int | None, ancestor: int | None, read_stat: Callable[[int], str] = read_proc_stat,
                  max_depth: int = 64) -> bool:
    """True if `ancestor` is found walking the parent chain up from `pid`
    (the process itself does not count)."""
    if pid is None or ancestor is None or pid <= 1 or ancestor <= 1 or pid == ancestor:
        return False
    cur = pid
    for _ in range(max_depth):
        try:
            ppid: int = parse_proc_stat(read_stat(cur))["ppid"]
        except (OSError, ValueError, IndexError):
            return False
        if ppid == ancestor:
            return True
        if ppid <= 1:
            return False
        cur = ppid
    return False


def proc_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds used so far by a process, or None."""
    if not pid:
        return None
    st = proc_stat(pid)
    if st is None:
        return None
    return float(st["utime"] + st["stime"]) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def read_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{int(pid)}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def looks_like_bazar(pid: int) -> bool:
    """Whether the local process `pid` runs twistd or bazar (a pid from /health may
    belong to another machine or container)."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").lower()
    except OSError:
        return False
    return b"twist" in cmd or b"bazar" in cmd
