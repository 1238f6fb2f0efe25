"""A Bazar process's life: start and stop hooks, periodic work that survives its own
errors, signal handlers that cannot hang (Twisted #7736), the watch on the
supervisor, one store per data directory, and JSON logs for containers."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import sys
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import FileLogObserver, Logger, formatEvent

log = Logger()


def guarded(work: Callable[[], object], what: str) -> Callable[[], object]:
    """`work` for a timer: an error it raises, or a Deferred of it that fails, is
    logged and the timer goes on (a TimerService whose call fails stops for good)."""
    def call() -> object:
        try:
            result = work()
        except Exception:
            log.failure("{what} failed", what=what)
            return None
        if isinstance(result, Deferred):
            return result.addErrback(lambda f: log.failure("{what} failed", f, what=what))
        return result

    return call


def every(seconds: float, work: Callable[[], object], what: str) -> TimerService:
    """Periodic work that survives its own errors."""
    return TimerService(seconds, guarded(work, what))


class Hooks(Service):
    """Run callables when the service starts and stops."""

    def __init__(self, on_start: Callable[[], Any] | None = None, on_stop: Callable[[], Any] | None = None):
        self.on_start = on_start
        self.on_stop = on_stop

    def startService(self) -> None:
        super().startService()
        if self.on_start is not None:
            self.on_start()

    def stopService(self) -> Any:
        super().stopService()
        if self.on_stop is not None:
            return self.on_stop()
        return None


def stop_from_signal(reactor: Any) -> Callable[[int, Any], None]:
    """A SIGTERM/SIGINT handler that only asks the reactor to stop. Twisted's own logs
    "Received SIGTERM" from inside the handler: a signal that lands while the same
    thread holds the log lock then deadlocks the process for ever (Twisted #7736).
    `callFromThread` only appends to a queue and writes a byte to the waker's pipe."""
    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(_stop_once, reactor)

    return handler


def _stop_once(reactor: Any) -> None:
    if reactor.running:
        log.info("stopping on a signal")
        reactor.stop()


def safe_signals(reactor: Any) -> None:
    """Once the reactor runs (after twistd installed its handlers), replace its
    SIGTERM and SIGINT handlers with ones that do nothing but hand off."""
    def install() -> None:
        handler = stop_from_signal(reactor)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    reactor.callWhenRunning(install)


def die_with_parent() -> None:
    """Linux: SIGTERM when the parent dies (PR_SET_PDEATHSIG), whatever this process's
    event loop is doing; the parent watch below is the portable fallback."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def watch_parent(parent: MultiService, reactor: Any) -> None:
    """Stop on SIGTERM/SIGINT without logging in the handler, and, under
    bazar-cluster, stop when the supervisor is gone (even after its kill -9), so no
    replica is ever left behind as an orphan."""
    safe_signals(reactor)
    expected = os.environ.get("BAZAR_PARENT_PID")
    if not expected or not expected.isdigit():
        return
    die_with_parent()
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor died before the line above

    def check() -> None:
        if os.getppid() != int(expected) and reactor.running:
            log.warn("supervisor {pid} is gone: stopping", pid=expected)
            reactor.stop()

    TimerService(1.0, check).setServiceParent(parent)


def json_line(event: dict[str, Any]) -> str:
    """One log event as one line of plain JSON: `time` (ISO 8601, UTC), `level`,
    `namespace`, `message` (rendered from its format), and `traceback` when it carries
    a failure. (Twisted's own JSON observer writes a record separator before each event
    and nests its private fields, which log collectors do not read.)"""
    when = datetime.fromtimestamp(event.get("log_time") or 0.0, timezone.utc)
    record = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
              "level": getattr(event.get("log_level"), "name", "info"),
              "namespace": event.get("log_namespace") or "",
              "message": formatEvent(event)}
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a log line is no place to fail: say what it was
            record["traceback"] = repr(failure)
    # default=str: nothing an event holds can keep it from being written
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def json_logger() -> Any:
    """For `twistd --logger=bazar.lifecycle.json_logger`: one JSON object per line on
    stdout (what container log collectors want); see `json_line`."""
    return FileLogObserver(sys.stdout, json_line)


def refuse_to_start(who: str, why: str) -> None:
    """One clear line on stderr, a non-zero exit, nothing started."""
    print(f"{who}: {why}; not starting", file=sys.stderr, flush=True)
    raise SystemExit(1)


def hold_directory(directory: str, who: str) -> int:
    """An exclusive lock (flock) on `<directory>/<who>.lock` for the life of this
    process (it goes with the process, even after kill -9): one store per directory.
    A second taker refuses to start."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(directory, f"{who}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            refuse_to_start(who, f"{directory} is in use by another {who}")
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd

